"""OpenRLHF's remote reward model protocol: `POST /get_reward` queries -> (prompt, response, reference) -> rewards.

The client (OpenRLHF v0.11, `openrlhf/utils/agent.py`, `SingleTurnAgentExecutor._fetch_rewards_via_http`) sends one
sample per request, `{"query": [text], "prompts": [prompt], "labels": [label]}`, with no auth header, to the URL it is
given (so a token can only travel in the URL: `?token=`). The query is
`tokenizer.decode(prompt_ids + response_ids)` where `prompt_ids` may have been cut from the left to fit
`max_len` (`execute`: `prompt_token_ids[-max_prompt_length:]`), so `prompts[i]` need not be a prefix of
`query[i]`. It reads `scores`, falling back to `rewards`, plus `rewards` and `extra_logs` (a dict of per-query
lists), as OpenRLHF's own `openrlhf/cli/serve_rm.py` answers them.

All parsing here is linear in the query's length (no backtracking regex over the text).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.formats import render
from ..data import columns_of, read_rows, require_columns
from .config import DEFAULT_STRIP
from .limits import ApiError, as_list, fields

logger = logging.getLogger(__name__)

GET_REWARD_FIELDS = {"prompts": None, "labels": None, "references": None}  # OpenRLHF's optional fields, and ours
MIN_OVERLAP = 16  # characters of a left-truncated prompt that must match to split there


@dataclass(frozen=True)
class ChatFormat:
    """How a chat template marks messages: a message header (capturing the role), the end of a message, the header
    that starts the answer, and end-of-turn strings cut from responses."""

    header: re.Pattern
    end: str
    assistant_header: str
    stops: tuple[str, ...]

    def messages(self, text: str) -> list[dict]:
        """Every complete message of `text` in order; text outside messages is ignored. Linear time: each header is
        matched once (the role is `\\w+`, bounded by the next non-word character) and each end is searched once."""
        out, position = [], 0
        for header in self.header.finditer(text):
            if header.start() < position:
                continue  # a header inside the previous message's content
            end = text.find(self.end, header.end())
            if end < 0:
                break  # no later message can be complete either
            out.append({"role": header[1], "content": text[header.end() : end]})
            position = end + len(self.end)
        return out


CHAT_FORMATS = {
    "chatml": ChatFormat(
        re.compile(r"<\|im_start\|>(\w+)\n"), "<|im_end|>", "<|im_start|>assistant\n", ("<|im_end|>", "<|endoftext|>")
    ),
    "llama3": ChatFormat(
        re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n"),
        "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|eot_id|>", "<|end_of_text|>"),
    ),
}
MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}


def prompt_end(query: str, prompt: str) -> int | None:
    """Where `prompt` ends in `query`: `len(prompt)` when the query starts with it; else, for a prompt cut from the
    left, the end of the longest suffix of the prompt that begins the query (at least `MIN_OVERLAP` characters, or
    the whole query's start after U+FFFD characters, which a token cut inside a UTF-8 character decodes to); else None.
    Linear time (Knuth-Morris-Pratt failure function of the query's head, run over the prompt)."""
    if query.startswith(prompt):
        return len(prompt)
    skip = len(query[:4]) - len(query[:4].lstrip("\ufffd"))
    head = query[skip : skip + len(prompt)]
    if not head:
        return None
    failure = [0] * len(head)
    k = 0
    for i in range(1, len(head)):
        while k and head[i] != head[k]:
            k = failure[k - 1]
        if head[i] == head[k]:
            k += 1
        failure[i] = k
    k = 0  # length of the longest prefix of `head` that ends at the current position of `prompt`
    for char in prompt:
        while k and (k == len(head) or char != head[k]):
            k = failure[k - 1]
        if char == head[k]:
            k += 1
    return skip + k if k >= min(MIN_OVERLAP, len(head)) else None


class QueryParser:
    """Splits OpenRLHF's full query texts into (prompt, response) for PairRM.

    The split point comes from, in order: `split_regex`; the request's `prompts[i]` (where it ends in the query,
    also when OpenRLHF cut it from the left, see `prompt_end`; else at the last assistant header of its chat
    format), and then the prompt is `prompts[i]` itself, whole; `separator` (its last occurrence); the chat format's
    last assistant header. A chat prompt (ChatML or Llama-3 markers, detected or configured) becomes a message list,
    rendered exactly as the TRL adapters render conversations; any other prompt is plain text. End-of-turn strings
    are cut from the response.
    """

    def __init__(
        self,
        chat_format: str = "auto",
        separator: str | None = None,
        split_regex: str | None = None,
        strip_strings: Sequence[str] = DEFAULT_STRIP,
    ):
        self.chat_format = chat_format
        self.separator = separator
        self.regex = re.compile(split_regex, re.DOTALL) if split_regex else None
        self.strip_strings = tuple(s for s in strip_strings if s)

    def format_of(self, text: str) -> ChatFormat | None:
        if self.chat_format == "plain":
            return None
        if self.chat_format != "auto":
            return CHAT_FORMATS[self.chat_format]
        return next((CHAT_FORMATS[name] for name, marker in MARKERS.items() if marker in text), None)

    def split(self, name: str, query: str, prompt_hint: str | None = None) -> tuple[str | list[dict], str]:
        """(prompt, response) of one query; `name` (e.g. `query[3]`) is used in errors."""
        fmt = self.format_of(query if prompt_hint is None else prompt_hint)
        if self.regex is not None:
            match = self.regex.fullmatch(query)
            if match is None:
                raise ValueError(f"{name} does not match --split_regex")
            prompt_text, response = match["prompt"], match["response"]
        elif prompt_hint is not None:
            cut = prompt_end(query, prompt_hint)
            if cut is None and fmt is not None and (marker := query.rfind(fmt.assistant_header)) >= 0:
                cut = marker + len(fmt.assistant_header)
            if cut is None:
                raise ValueError(
                    f"{name} neither starts with its prompt (prompts entry of the same index) nor ends a "
                    "left-truncated copy of it, and has no chat assistant header to split at"
                )
            prompt_text, response = prompt_hint, query[cut:]
        elif self.separator is not None:
            prompt_text, sep, response = query.rpartition(self.separator)
            if not sep:
                raise ValueError(f"{name} does not contain the separator {self.separator!r}")
        elif fmt is not None:
            cut = query.rfind(fmt.assistant_header)
            if cut < 0:
                raise ValueError(f"{name} has no assistant turn ({fmt.assistant_header!r}) to score")
            prompt_text, response = query[:cut], query[cut + len(fmt.assistant_header) :]
        else:
            raise ValueError(
                f"cannot split {name} into prompt and response: no chat markers found; start the server with "
                "--separator, --split_regex or --chat_format, or send `prompts`"
            )
        return self.prompt(prompt_text, fmt), self.response(response, fmt)

    def prompt(self, text: str, fmt: ChatFormat | None) -> str | list[dict]:
        messages = fmt.messages(text) if fmt else []
        return messages or text.strip()

    def response(self, text: str, fmt: ChatFormat | None) -> str:
        """`text` without trailing end-of-turn strings and whitespace (any number of them, in linear time)."""
        stops = self.strip_strings + (fmt.stops if fmt else ())
        end = len(text)
        while True:
            while end and text[end - 1].isspace():
                end -= 1
            stop = next((s for s in stops if text.endswith(s, 0, end)), None)
            if stop is None:
                return text[:end].strip()
            end -= len(stop)


# ---- references ---------------------------------------------------------------------------------------------
def _prompt_keys(prompt: Any) -> tuple[str, str]:
    """Lookup keys of a prompt: its whole PairRM rendering, and the text of its last user turn."""
    if isinstance(prompt, str):
        return prompt.strip(), prompt.strip()
    users = [m.get("content") for m in prompt if isinstance(m, dict) and str(m.get("role", "")).lower() == "user"]
    last = users[-1].strip() if users and isinstance(users[-1], str) else ""
    return render(prompt, "", name="prompt")[0].strip(), last


class ReferenceTable:
    """References by prompt. A query's prompt matches a row by its whole rendering first, else by the text of its
    last user turn (so a plain-text prompt column matches chat-formatted queries, system prompt or not)."""

    def __init__(self, rows: Iterable[tuple[Any, Any]]):
        self.full: dict[str, Any] = {}
        self.last_user: dict[str, Any] = {}
        duplicates = 0
        for i, (prompt, reference) in enumerate(rows):
            if not isinstance(prompt, (str, list)):
                raise TypeError(
                    f"reference row {i}: prompt must be a string or a message list, got {type(prompt).__name__}"
                )
            if not isinstance(reference, (str, list)):
                raise TypeError(
                    f"reference row {i}: reference must be a string or assistant messages, "
                    f"got {type(reference).__name__}"
                )
            full, last = _prompt_keys(prompt)
            duplicates += full in self.full
            self.full.setdefault(full, reference)
            self.last_user.setdefault(last, reference)
        if duplicates:
            logger.warning(
                "%d reference rows repeat an earlier prompt; the first reference of each prompt is used", duplicates
            )

    def __len__(self) -> int:
        return len(self.full)

    def get(self, prompt: Any) -> Any | None:
        full, last = _prompt_keys(prompt)
        return self.full.get(full, self.last_user.get(last))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, prompt_column: str = "prompt", reference_column: str = "reference"
    ) -> ReferenceTable:
        """Read a .jsonl/.json/.csv/.parquet file or a saved dataset with the package's one reader
        (`pairrm_rlhf.data`: errors name the file and the line or row)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"--reference_file: file not found: {path}")
        rows = read_rows(str(path), what="--reference_file")
        require_columns(
            columns_of(rows), {"prompt_column": prompt_column, "reference_column": reference_column}, str(path)
        )
        pairs = []
        for i, row in enumerate(rows):
            if prompt_column not in row or reference_column not in row:
                raise ValueError(f"{path} row {i} lacks the column {prompt_column!r} or {reference_column!r}")
            pairs.append((row[prompt_column], row[reference_column]))
        return cls(pairs)


# ---- the route ------------------------------------------------------------------------------------------------
class RewardRequests:
    """`/get_reward` bodies -> (source, response, reference) triples, and the answer OpenRLHF reads.

    Fields: `query` (required), and OpenRLHF's optional `prompts` and `labels`, and our `references`; any other field
    is rejected (400) like on every route. The reference comes from, in order: `references[i]`; `labels[i]` with
    `labels_as_reference` (when a non-empty string); the reference table; the fixed `reference`.
    """

    def __init__(
        self,
        parser: QueryParser,
        references: ReferenceTable | None = None,
        reference: str | None = None,
        labels_as_reference: bool = False,
    ):
        self.parser, self.references, self.reference = parser, references, reference
        self.labels_as_reference = labels_as_reference

    def triples(self, body: dict) -> list[tuple[str, str, str]]:
        body = fields(body, ("query",), GET_REWARD_FIELDS)
        queries = as_list("query", body["query"])
        extras = {}
        for key in GET_REWARD_FIELDS:
            if body.get(key) is not None:
                extras[key] = as_list(key, body[key])
                if len(extras[key]) != len(queries):
                    raise ApiError(400, f"{key} has {len(extras[key])} items but query has {len(queries)}")
        hints = extras.get("prompts") or [None] * len(queries)
        triples = []
        for i, query in enumerate(queries):
            if not isinstance(query, str):
                raise ApiError(400, f"query[{i}] must be a string, got {type(query).__name__}")
            if hints[i] is not None and not isinstance(hints[i], str):
                raise ApiError(400, f"prompts[{i}] must be a string, got {type(hints[i]).__name__}")
            try:
                prompt, response = self.parser.split(f"query[{i}]", query, hints[i])
                reference = self._reference(i, prompt, extras)
                source, candidate = render(prompt, response, name=f"query[{i}]")
                triples.append((source, candidate, render(prompt, reference, name=f"reference of query[{i}]")[1]))
            except (TypeError, ValueError) as error:
                message = str(error)
                raise ApiError(
                    400, message if message.startswith(f"query[{i}]") else f"query[{i}]: {message}"
                ) from None
        return triples

    def _reference(self, i: int, prompt: Any, extras: dict) -> Any:
        if "references" in extras:
            return extras["references"][i]
        label = extras["labels"][i] if "labels" in extras else None
        if self.labels_as_reference and isinstance(label, str) and label:
            return label
        if self.references is not None:
            found = self.references.get(prompt)
            if found is not None:
                return found
        if self.reference is not None:
            return self.reference
        where = "in --reference_file" if self.references is not None else "configured (--reference or --reference_file)"
        raise ValueError(f"query[{i}] has no reference: its prompt is not {where}")

    @staticmethod
    def answer(rewards: Sequence[float], logits: Sequence[float]) -> dict:
        """OpenRLHF's answer: `rewards` and `scores` (the same numbers, as `serve_rm.py` sends), and `extra_logs`
        (logged per sample by OpenRLHF): the two-order logit z = f(x, response, reference) -
        f(x, reference, response)."""
        rewards = [float(r) for r in rewards]
        return {"rewards": rewards, "scores": rewards, "extra_logs": {"pairrm_logit": [float(z) for z in logits]}}
