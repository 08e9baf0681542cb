"""Request limits and checks: sizes, field validation, the work of a request in tokens, clear 4xx errors.

Every check names the field (and index) that is wrong, as the Python API's messages do. Sizes are checked before
any work: the body's bytes, its JSON values on the raw bytes (`count_json_values`, before parsing), every list's
length and string's characters (`check_limits`), then the pairs and tokens one request needs
(`batcher.QueueBackend`, with token counts from the backend's `pair_lengths`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def count_json_values(raw: bytes | bytearray) -> int:
    """About how many values `json.loads(raw)` would build: 1 + the `[`, `{` and `,` outside strings (each comma
    starts one more entry). Counted on the raw bytes in C-speed passes (one copy of the body at most), so a body
    of a million empty objects is refused before any of them is built."""
    bare = _JSON_STRING.sub(b"", raw)
    return 1 + bare.count(b"[") + bare.count(b"{") + bare.count(b",")


class ApiError(Exception):
    """A client error with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def dumps(content: Any) -> bytes:
    """JSON with non-ASCII escaped, so that text echoed in errors (even lone surrogates) stays encodable."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def check_limits(body: dict, max_items: int, max_text_chars: int) -> None:
    """Every string (keys too) at most `max_text_chars` characters and every list/object at most `max_items` entries;
    the error names the field and index. Depth-first with a stack of iterators: memory grows with nesting depth only."""
    stack = [("", _entries(body, max_text_chars, root=True))]
    while stack:
        path, entries = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        child, value = path + entry[0], entry[1]
        if isinstance(value, str) and len(value) > max_text_chars:
            raise ApiError(
                400, f"{child} has {len(value)} characters; the limit is {max_text_chars} (--max_text_chars)"
            )
        if isinstance(value, (list, dict)):
            if len(value) > max_items:
                raise ApiError(400, f"{child} has {len(value)} entries; the limit is {max_items} (--max_items)")
            stack.append((child, _entries(value, max_text_chars)))


def _entries(value: list | dict, max_text_chars: int, root: bool = False) -> Iterable[tuple[str, Any]]:
    if isinstance(value, list):
        yield from ((f"[{i}]", v) for i, v in enumerate(value))
        return
    for key, v in value.items():
        if len(key) > max_text_chars:
            raise ApiError(
                400, f"an object key has {len(key)} characters; the limit is {max_text_chars} (--max_text_chars)"
            )
        yield (key if root else f".{key}"), v


def fields(body: dict, required: Sequence[str], optional: dict[str, Any]) -> dict:
    """The method's arguments from the body: unknown or missing fields and wrongly typed scalars are errors."""
    for key in body:
        if key not in required and key not in optional:
            raise ApiError(400, f"unknown field {key[:40]!r}; expected {', '.join([*required, *optional])}")
    for key in required:
        if key not in body:
            raise ApiError(400, f"missing field {key!r}")
    for key, kind in optional.items():
        if key not in body or kind is None:
            continue
        value = body[key]
        if kind is bool and not isinstance(value, bool):
            raise ApiError(400, f"{key} must be true or false, got {json.dumps(value)[:40]}")
        if kind is str and not isinstance(value, str):
            raise ApiError(400, f"{key} must be a string, got {json.dumps(value)[:40]}")
        if kind is float:
            body[key] = positive(key, value)
    return dict(body)


def positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)[:40]}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not 0 < number < float("inf"):
        raise ApiError(400, f"{name} must be a finite number > 0, got {json.dumps(value)[:40]}")
    return number


def as_list(name: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ApiError(400, f"{name} must be a list, got {type(value).__name__}")
    return value
