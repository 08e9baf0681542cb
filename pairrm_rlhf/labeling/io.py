"""Datasets in and out of labeling: prompts from any usual source (`pairrm_rlhf.data`), atomic writes of the pairs,
the dataset card and the margin histogram written next to them (named after the whole output file), and the push to
the Hub (private by default) with that card. A write that fails (disk full, read-only) is one line naming the path."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from datasets import Dataset

from ..data import read_dataset
from .store import writing

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("save_to_disk", "jsonl", "parquet")
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def load_prompts(source: str, config_name: str | None = None, split: str = "train", what: str = "--dataset") -> Dataset:
    """A dataset from a `save_to_disk` directory, a json/jsonl/parquet/csv file, a data directory or a hub id, read
    by the package's one reader (`pairrm_rlhf.data.read_dataset`; errors start with `what` and name the file).

    `"tiny"` (when no such path exists) is the 32 bundled smoke-test prompts with a `reference` column. A name that
    looks like a local path and does not exist is a `FileNotFoundError`, never a hub lookup.

    Example:
        >>> len(load_prompts("tiny"))
        32
    """
    return read_dataset(source, split=split, config_name=config_name, what=what)


def output_format_of(path: str) -> str:
    """The output format an `output_path` implies: `.jsonl`/`.json` -> jsonl, `.parquet` -> parquet, else
    save_to_disk."""
    return _SUFFIXES.get(Path(path).suffix, "save_to_disk")


def companion_path(output_path: str, suffix: str) -> Path:
    """A file next to the output, named after all of it: `data/pairs.jsonl` + `.margins.png` ->
    `data/pairs.jsonl.margins.png` (so a `.jsonl` and a `.parquet` run in one folder keep their own)."""
    path = Path(output_path)
    return path.with_name(path.name + suffix)


def as_conversational(dataset: Dataset, column: str = "prompt") -> Dataset:
    """`dataset` with every string prompt of `column` made one user message (message lists are kept), so a chat
    policy samples through its chat template and the pairs are in TRL's conversational format."""
    from datasets import List, Value

    if len(dataset) == 0 or not isinstance(dataset[0][column], str):
        return dataset
    messages = [[{"role": "user", "content": p}] for p in dataset[column]]
    feature = List({"role": Value("string"), "content": Value("string")})
    converted = dataset.add_column(f"{column}.messages", messages, feature=feature).remove_columns(column)
    return converted.rename_column(f"{column}.messages", column).select_columns(dataset.column_names)


def save_dataset(dataset: Dataset, path: str, output_format: str | None = None) -> str:
    """Write `dataset` atomically as `save_to_disk`, `jsonl` or `parquet` (default: by file extension).

    Temporary files of an earlier interrupted write (`<path>.tmp-<pid>`) are removed first. JSONL floats are
    written exactly (shortest round-trip repr).

    Returns:
        The format written.
    """
    output_format = output_format or output_format_of(path)
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    target = Path(path)
    if output_format == "save_to_disk" and target.exists() and not (target / "dataset_info.json").exists():
        raise ValueError(f"output_path {path!r} exists and is not a saved dataset; refusing to replace it")
    with writing(target):  # disk full, read-only: one line naming the output
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            logger.info("Removing %s, left by an interrupted write", stale)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        if output_format == "save_to_disk":
            dataset.save_to_disk(str(tmp))
            if target.exists():
                shutil.rmtree(target)
        elif output_format == "jsonl":  # our own writer: `to_json` (pandas) rounds floats to 10 digits
            with open(tmp, "w", encoding="utf-8") as f:
                for batch in dataset.iter(batch_size=1000):
                    for values in zip(*batch.values()):
                        f.write(json.dumps(dict(zip(batch, values)), ensure_ascii=False) + "\n")
        else:
            dataset.to_parquet(str(tmp))
        os.replace(tmp, target)
    return output_format


def dataset_card(
    *, policy: str | None, judge: str, judge_identity: dict, strategy: str, settings: dict[str, Any], stats: Any
) -> str:
    """The Markdown dataset card of a labeled dataset: model, judge, strategy, every setting and a summary.

    Args:
        policy: the policy the responses were sampled from (None: existing responses were labeled).
        judge: the judge's name; `judge_identity` is its `PairBackend.identity()`.
        settings: every setting of the run (flags and their values).
        stats: the run's `LabelStats`.
    """
    import yaml

    summary = [
        ("prompts", stats.prompts),
        ("pairs", stats.pairs),
        ("ties dropped", stats.ties_dropped),
        ("below margin dropped", stats.below_margin),
        ("mean margin", f"{stats.mean_margin:.4f}"),
        ("judge truncation rate", f"{stats.truncation_rate:.1%}"),
    ]
    front = {"tags": ["dpo", "preference", "pairrm-rlhf"], "task_categories": ["text-generation"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Preference pairs labeled with pairrm-rlhf",
        "",
        "Each row holds a prompt, a `chosen` and a `rejected` response (TRL's preference format), their scores, "
        "the margin and SPPO-style soft labels (`chosen_probs*`).",
        "",
        f"- **Model** (responses sampled from): {policy or 'existing responses (`responses_column`)'}",
        f"- **Judge**: {judge} (`{judge_identity.get('backend', '?')}`, weights digest "
        f"`{judge_identity.get('weights', '?')}`, dtype {judge_identity.get('dtype', '?')})",
        f"- **Strategy**: {strategy}",
        "",
        "## Summary",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in summary],
        "",
        "## Settings",
        "",
        "```yaml",
        yaml.safe_dump(settings, sort_keys=True).strip(),
        "```",
        "",
        "## Judge identity",
        "",
        "```yaml",
        yaml.safe_dump(judge_identity, sort_keys=True).strip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def push_with_card(dataset: Dataset, repo_id: str, card: str, private: bool = True) -> None:
    """Push `dataset` to the Hub and replace the card's text by `card`, keeping the metadata `datasets` wrote."""
    from huggingface_hub import DatasetCard

    dataset.push_to_hub(repo_id, private=private)
    pushed = DatasetCard.load(repo_id, repo_type="dataset")
    ours = DatasetCard(card)
    for key, value in ours.data.to_dict().items():
        if key not in pushed.data.to_dict():
            setattr(pushed.data, key, value)
    pushed.text = ours.text
    pushed.push_to_hub(repo_id, repo_type="dataset")


def margin_histogram(margins: list[float], path: str | os.PathLike, title: str = "") -> str | None:
    """Save a histogram of the kept pairs' margins as PNG; None (and a log line) when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        logger.warning("No margin histogram written: matplotlib is not installed (pip install pairrm-rlhf[plots])")
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if len(margins):
        ax.hist(margins, bins="auto", color="#4c72b0")
    else:
        ax.text(0.5, 0.5, "no pairs kept", ha="center", va="center", transform=ax.transAxes)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("score margin (chosen - rejected)")
    ax.set_ylabel("pairs")
    ax.set_title(title or f"{len(margins)} pairs")
    fig.tight_layout()
    with writing(path):
        fig.savefig(path, dpi=100)
    return str(path)
