"""One reader for every dataset the package takes: prompts to label (`label`, the recipes), preference data to
evaluate (`eval`), reference tables (`serve --reference_file`). One rule for what a source is, one set of errors.

A source is, in this order:

- `tiny` (when no such path exists): the 32 bundled smoke-test prompts;
- a folder: written by `save_to_disk` (`state.json`, `dataset_info.json` or `dataset_dict.json`; a `DatasetDict`
  takes `split`), else a folder of data files, read by `datasets.load_dataset(folder)` (`split` when it has
  several splits; its only one otherwise, as for a single file);
- a file, by extension: `.jsonl` (JSON Lines), `.json` (an array of objects, an object whose only key, `data` or
  `rows`, holds that array, or JSON Lines), `.parquet`, `.csv`;
- a name that looks like a local path (`./`, `/`, `~`, a file extension) and does not exist: FileNotFoundError,
  never a hub lookup;
- anything else: a hub dataset (`config_name`, `split`).

Every error is one line that starts with the flag (`what`) and names the file: a JSON parse error gives the 1-based
line and column, a line that is not a JSON object (`5`, `[1]`) says so, a column whose values change kind between
rows (a string here, a message list there) names the row, a missing column lists the file's columns. Rows count
from 0 (as `label`'s `prompt_index`). `check_prompts` holds the rule for prompts: all strings, or all message lists
of system/user/assistant turns that end with a user turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .core import assets
from .core.formats import prompt_turns

if TYPE_CHECKING:
    from datasets import Dataset

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
_DISK_MARKERS = ("state.json", "dataset_info.json", "dataset_dict.json")


def read_dataset(
    source: str, *, split: str = "train", config_name: str | None = None, what: str = "--dataset"
) -> Dataset:
    """A `datasets.Dataset` from any source (see the module docstring); errors are ValueError/FileNotFoundError
    whose message starts with `what` (the flag that named the source).

    Example:
        >>> len(read_dataset("tiny"))
        32
    """
    import datasets

    path = _local(source, what)
    if path is None:
        return _hub(source, config_name, split, what)
    if path.is_dir():
        return _folder(path, split, what)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _json_rows(path, what)
        check_kinds(rows, f"{what}: {path}")
        try:
            return datasets.Dataset.from_list(rows)
        except (
            TypeError,
            ValueError,
            ArithmeticError,
        ) as error:  # pyarrow's errors are ValueError/TypeError subclasses
            raise ValueError(f"{what}: {path}: its rows do not make one table ({_first_line(error)})") from None
    return datasets.Dataset(_arrow_table(path, suffix, what))


def read_rows(
    source: str, *, split: str = "train", config_name: str | None = None, what: str = "--dataset"
) -> list[dict]:
    """The rows of any source as dicts. JSON files are read as they are (rows may differ in kind: no table is built);
    other sources through `read_dataset`."""
    path = _local(source, what)
    if path is not None and path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        return _json_rows(path, what)
    return read_dataset(source, split=split, config_name=config_name, what=what).to_list()


def columns_of(rows: Iterable[Mapping]) -> list[str]:
    """Every column name of `rows`, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def require_columns(present: Sequence[str], columns: Mapping[str, str | None], source: str) -> None:
    """ValueError `--<flag>: no column 'x' in <source> (columns: a, b)` for the first of `columns` (flag -> column
    name; None: not asked) that is not `present`."""
    for flag, column in columns.items():
        if column is not None and column not in present:
            raise ValueError(f"--{flag}: no column {column!r} in {source} (columns: {', '.join(sorted(present))})")


def check_prompts(prompts: Iterable[Any], source: str, column: str = "prompt") -> None:
    """ValueError naming `source` and the row for the first prompt that is not a string or a valid message list
    (`core.formats.prompt_turns`: system/user/assistant roles, ending with a user turn), or that is of another kind
    than the first prompt (strings and message lists are not mixed)."""
    first: tuple[str, int] | None = None
    for i, prompt in enumerate(prompts):
        where = f"{source} row {i}: {column}"
        if isinstance(prompt, str):
            kind = "string"
        elif isinstance(prompt, (list, tuple)):
            kind = "message list"
            try:
                prompt_turns(where, prompt)
            except (TypeError, ValueError) as error:
                raise ValueError(str(error)) from None
        else:
            raise ValueError(f"{where} must be a string or a list of messages, got {_kind(prompt)}")
        if first is None:
            first = (kind, i)
        elif kind != first[0]:
            raise ValueError(
                f"{where} is a {kind} but row {first[1]} is a {first[0]}; "
                "prompts must be all strings or all message lists"
            )


def check_kinds(rows: Sequence[Mapping], where: str) -> None:
    """ValueError naming the row and column where a value's JSON kind (string, number, boolean, list, object)
    differs from the column's first non-null value: a table column holds one kind."""
    first: dict[str, tuple[str, int]] = {}
    for i, row in enumerate(rows):
        for column, value in row.items():
            if value is None:
                continue
            kind = _kind(value)
            seen = first.setdefault(column, (kind, i))
            if seen[0] != kind:
                raise ValueError(
                    f"{where}: row {i}: column {column!r} holds {kind} but row {seen[1]} holds "
                    f"{seen[0]}; a column must hold one kind"
                )


# ---- the pieces --------------------------------------------------------------------------------------------------
def _local(source: str, what: str) -> Path | None:
    """The local path `source` names (`tiny`: the bundled prompts), or None for a hub id."""
    text = str(source)
    if text == assets.TINY and not Path(text).exists():
        return Path(assets.bundled("prompts"))
    assets.check_local(text, what)
    path = Path(text).expanduser()
    return path if path.exists() else None


def _hub(source: str, config_name: str | None, split: str, what: str) -> Dataset:
    import datasets

    try:
        return datasets.load_dataset(source, config_name, split=split)
    except (OSError, ValueError) as error:  # offline (ConnectionError), no such dataset (FileNotFoundError), split
        raise ValueError(f"{what}: cannot load the hub dataset {source!r}: {_first_line(error)}") from None


def _folder(path: Path, split: str, what: str) -> Dataset:
    import datasets

    if any((path / marker).exists() for marker in _DISK_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"--split: {path} has no split {split!r} (splits: {', '.join(loaded)})")
            loaded = loaded[split]
        return loaded
    if not any(p.suffix.lower() in FILE_TYPES for p in path.rglob("*") if p.is_file()):
        raise ValueError(
            f"{what}: {path} is a folder but not a `save_to_disk` dataset (no state.json or "
            f"dataset_dict.json) and holds no {', '.join(FILE_TYPES)} files"
        )
    try:
        loaded = datasets.load_dataset(str(path))
    except (OSError, ValueError) as error:
        raise ValueError(f"{what}: cannot read the data files in {path}: {_first_line(error)}") from None
    if split in loaded or len(loaded) != 1:  # one split (as a single file has): whatever `split` says
        if split not in loaded:
            raise ValueError(f"--split: {path} has no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split]
    return next(iter(loaded.values()))


def _arrow_table(path: Path, suffix: str, what: str) -> Any:
    import pyarrow as pa

    if suffix not in FILE_TYPES:
        raise ValueError(
            f"{what}: {path}: unsupported file type {suffix or '(none)'!r} (use a save_to_disk folder, "
            f"or a {', '.join(FILE_TYPES)} file)"
        )
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.csv as pcsv

        return pcsv.read_csv(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{what}: {path}: not a readable {suffix[1:]} file ({_first_line(error)})") from None


def _json_rows(path: Path, what: str) -> list[dict]:
    """Rows of a JSON Lines file, or of a `.json` document (an array of objects, or an object holding one under
    `data`/`rows`); every row must be a JSON object."""
    where = f"{what}: {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise ValueError(f"{where}: line {line}: not UTF-8 text") from None
    head = text.lstrip()[:1]
    document_error = None
    if path.suffix.lower() == ".json" and head in ("[", "{"):
        try:
            return _document_rows(json.loads(text), where)
        except json.JSONDecodeError as error:
            if head == "[":
                raise ValueError(
                    f"{where}: line {error.lineno}: invalid JSON ({error.msg}, column {error.colno})"
                ) from None
            document_error = error  # an object that is not one document: JSON Lines in a .json file, or a bad document
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as line_error:
            error = line_error
            if document_error is not None and not rows:  # not JSON Lines either: the document's own error
                error, number = document_error, document_error.lineno
            raise ValueError(f"{where}: line {number}: invalid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{where}: line {number}: a row must be a JSON object, got {_kind(value)} {_short(value)}")
        rows.append(value)
    return rows


def _document_rows(document: Any, where: str) -> list[dict]:
    if isinstance(document, dict):  # {"data": [rows]} (only that key), else one row
        key = next(iter(document), None)
        document = document[key] if len(document) == 1 and key in ("data", "rows") else [document]
    if not isinstance(document, list):
        raise ValueError(f"{where}: expected an array of JSON objects, got {_kind(document)} {_short(document)}")
    for i, row in enumerate(document):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: item {i} of the array must be a JSON object, got {_kind(row)} {_short(row)}")
    return document


def _kind(value: Any) -> str:
    """The JSON kind of a value, as errors name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return f"({text[:40]}…)" if len(text) > 40 else f"({text})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
