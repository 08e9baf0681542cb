"""`pairrm-rlhf serve`: PairRM over HTTP, for OpenRLHF (`POST /get_reward`) and for remote TRL rewards.

Built on Starlette + uvicorn: the ASGI pair behind FastAPI, well kept, small (pure Python with h11), with graceful
shutdown (in-flight requests are answered) and concurrency limits built in, and easy to run in a thread for tests.

Every route validates in a worker thread with the `PairRM` methods themselves (so answers and error messages are the
library's), but the forward passes of all concurrent requests are coalesced: a `MicroBatcher` collects ordered
pairs until `max_batch_pairs` or `max_wait_ms` and runs them as one engine call in a single engine thread; the event
loop never blocks on the model.

Routes (all POST unless noted; JSON bodies; errors are `{"error": "..."}` with a 4xx/5xx status):
    /get_reward      OpenRLHF: {"query": [full texts], "prompts"?, "labels"?, "references"?} -> {"rewards": [...]}
    /compare /probability /rank /rank_with_ref /compare_conversations   the `PairRM` methods -> {"result": ...}
    /judge           `PairRMJudge.judge` -> {"result": ...}
    /pair_logits     prepared triples -> {"logits": [...]} (single order, or two-order with "two_order": true)
    GET /health      {"status": "ok", ...}
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..core import aggregation
from ..core.assets import DEFAULT_MODEL
from ..core.formats import render
from ..pairrm import PairRM
from ..trl.judge import PairRMJudge

logger = logging.getLogger(__name__)

TOKEN_ENV = "PAIRRM_SERVER_TOKEN"
OUTPUTS = ("probability", "logit")
DEFAULT_STRIP = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<eos>", "<|end|>"]


@dataclass
class ServeConfig:
    """Serve PairRM over HTTP: OpenRLHF's POST /get_reward and the PairRM API, with micro-batching."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "PairRM checkpoint (hub id or directory); 'tiny': the bundled tiny test one"})
    base_model: str | None = field(default=None, metadata={"help": "blender layout: base encoder override"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default by device)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "port to bind (0: any free port)"})
    token: str | None = field(default=None, metadata={"help": f"bearer token for all routes but /health (default: ${TOKEN_ENV})"})
    # batching
    max_batch_pairs: int = field(default=256, metadata={"help": "most ordered pairs coalesced into one engine call"})
    max_wait_ms: float = field(default=5.0, metadata={"help": "longest a request waits for others to join its batch"})
    batch_size: int | None = field(default=None, metadata={"help": "rows per forward (default: the engine's token budget)"})
    # limits
    max_body_bytes: int = field(default=16 * 2**20, metadata={"help": "largest request body (413 above)"})
    max_items: int = field(default=4096, metadata={"help": "longest list (or object) anywhere in a request"})
    max_text_chars: int = field(default=100_000, metadata={"help": "longest string anywhere in a request"})
    max_pairs: int = field(default=16384, metadata={"help": "most ordered pairs one request may need"})
    max_concurrency: int = field(default=64, metadata={"help": "concurrent requests (503 above)"})
    graceful_timeout_s: int = field(default=60, metadata={"help": "on shutdown, how long in-flight requests may take"})
    access_log: bool = field(default=False, metadata={"help": "log every request"})
    # /get_reward: query -> (prompt, response), reference, reward
    chat_format: str = field(default="auto", metadata={"help": "auto, chatml, llama3 or plain: how queries are parsed"})
    separator: str | None = field(default=None, metadata={"help": "split each query at the last occurrence of this"})
    split_regex: str | None = field(
        default=None, metadata={"help": "regex with groups (?P<prompt>...) and (?P<response>...), on the whole query"})
    strip_strings: list[str] = field(
        default_factory=lambda: list(DEFAULT_STRIP), metadata={"help": "end-of-turn strings cut from responses"})
    reference: str | None = field(default=None, metadata={"help": "reference for every prompt (after --reference_file)"})
    reference_file: str | None = field(
        default=None, metadata={"help": "jsonl/json/csv/parquet file or saved dataset with prompt and reference columns"})
    prompt_column: str = field(default="prompt", metadata={"help": "prompt column of --reference_file"})
    reference_column: str = field(default="reference", metadata={"help": "reference column of --reference_file"})
    labels_as_reference: bool = field(default=False, metadata={"help": "use OpenRLHF's `labels` as the reference"})
    output: str = field(default="probability", metadata={"help": "probability (P(response > reference)) or logit"})
    temperature: float = field(default=1.0, metadata={"help": "T of P = sigmoid(z / (2 T))"})

    def __post_init__(self) -> None:
        if self.chat_format not in ("auto", "plain", *CHAT_FORMATS):
            raise ValueError(f"chat_format must be auto, plain, {' or '.join(CHAT_FORMATS)}; got {self.chat_format!r}")
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if not (isinstance(self.temperature, (int, float)) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        for name in ("max_batch_pairs", "max_body_bytes", "max_items", "max_text_chars", "max_pairs", "max_concurrency"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if self.separator == "":
            raise ValueError("separator must not be empty")
        if self.split_regex is not None:
            groups = re.compile(self.split_regex, re.DOTALL).groupindex
            if "prompt" not in groups or "response" not in groups:
                raise ValueError("split_regex needs the named groups (?P<prompt>...) and (?P<response>...)")


# ---- the micro-batching queue ---------------------------------------------------------------------------
@dataclass
class _Job:
    triples: list
    future: asyncio.Future
    t0: float


class MicroBatcher:
    """Coalesces the ordered pairs of concurrent requests into engine calls.

    A batch starts with the oldest waiting request and takes more until it holds `max_batch_pairs` pairs or the
    oldest has waited `max_wait_ms`; a request is never split (one larger than the cap runs alone). `score` runs
    in one engine thread, so the event loop stays free and calls never overlap. If a batch fails, its requests
    are retried one by one so that only the faulty one gets the error.
    """

    def __init__(self, score: Callable[[list], np.ndarray], max_batch_pairs: int, max_wait_ms: float):
        self.score = score
        self.max_batch_pairs = max_batch_pairs
        self.max_wait = max_wait_ms / 1000.0
        self.closed = True
        self.stats = {"requests": 0, "batches": 0, "pairs": 0, "most_requests_in_a_batch": 0}

    async def start(self) -> None:
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pairrm-engine")
        self._running: list[_Job] = []
        self._carry: _Job | None = None
        self.closed = False
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Stop batching; requests still waiting (only after a graceful-shutdown timeout) get an error."""
        self.closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        left = [*self._running, *([self._carry] if self._carry else [])]
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        for job in left:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, triples: list) -> np.ndarray:
        """Single-order logits of `triples`, computed in a shared batch."""
        if self.closed:
            raise RuntimeError("the server is shutting down")
        job = _Job(triples, asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.put_nowait(job)
        return await job.future

    async def _loop(self) -> None:
        while True:
            job, self._carry = self._carry or await self._queue.get(), None
            jobs, n = [job], len(job.triples)
            deadline = job.t0 + self.max_wait
            while n < self.max_batch_pairs:
                try:
                    nxt = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                if n + len(nxt.triples) > self.max_batch_pairs:
                    self._carry = nxt
                    break
                jobs.append(nxt)
                n += len(nxt.triples)
            self._running = jobs
            await self._execute(jobs)
            self._running = []

    async def _execute(self, jobs: list[_Job]) -> None:
        triples = [t for job in jobs for t in job.triples]
        start = time.monotonic()
        try:
            logits = await asyncio.get_running_loop().run_in_executor(self._executor, self.score, triples)
        except Exception as error:  # noqa: BLE001 - handed to the waiting requests
            if len(jobs) > 1:
                for job in jobs:
                    await self._execute([job])
                return
            if not jobs[0].future.done():
                jobs[0].future.set_exception(error)
            return
        logger.debug("batch of %d pairs from %d requests in %.1f ms", len(triples), len(jobs), 1000 * (time.monotonic() - start))
        self.stats["requests"] += len(jobs)
        self.stats["batches"] += 1
        self.stats["pairs"] += len(triples)
        self.stats["most_requests_in_a_batch"] = max(self.stats["most_requests_in_a_batch"], len(jobs))
        offset = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(logits[offset : offset + len(job.triples)])
            offset += len(job.triples)


class _QueuedPairRM(PairRM):
    """The served `PairRM` as seen by request threads: every method works as usual, but its forward passes
    (`pair_logits`, which all methods go through) are queued into the shared micro-batches."""

    def __init__(self, model: PairRM, batcher: MicroBatcher, loop: asyncio.AbstractEventLoop, max_pairs: int):
        self.__dict__.update(model.__dict__)  # the served model's state (scorer, kind, template, ...), shared
        self.batcher, self.loop, self.max_pairs = batcher, loop, max_pairs

    def pair_logits(self, triples: Sequence, *, batch_size: int | None = None, show_progress_bar: bool | None = None) -> np.ndarray:
        if len(triples) > self.max_pairs:
            raise ApiError(400, f"the request needs {len(triples)} pair forwards; the limit is {self.max_pairs} (--max_pairs)")
        if not triples:
            return np.zeros(0, dtype=np.float32)
        future = asyncio.run_coroutine_threadsafe(self.batcher.submit(list(triples)), self.loop)
        while True:
            try:
                return future.result(timeout=1.0)
            except concurrent.futures.TimeoutError:
                if self.batcher.closed or self.loop.is_closed():
                    future.cancel()
                    raise RuntimeError("the server is shutting down") from None


# ---- /get_reward: queries -> (prompt, response, reference) ------------------------------------------------
@dataclass(frozen=True)
class ChatFormat:
    """How a chat template marks messages: where the answer starts, one complete message, end-of-turn strings."""

    marker: str
    assistant_header: str
    message: re.Pattern
    stops: tuple[str, ...]


CHAT_FORMATS = {
    "chatml": ChatFormat(
        "<|im_start|>", "<|im_start|>assistant\n",
        re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.DOTALL), ("<|im_end|>", "<|endoftext|>"),
    ),
    "llama3": ChatFormat(
        "<|start_header_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n",
        re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.DOTALL),
        ("<|eot_id|>", "<|end_of_text|>"),
    ),
}


class QueryParser:
    """Splits OpenRLHF's full query texts into (prompt, response) for PairRM.

    The split point comes from, in order: `split_regex`; the request's `prompts[i]` when the query starts with it
    (newer OpenRLHF sends them); `separator` (its last occurrence); the chat format's last assistant header. A chat
    prompt (ChatML or Llama-3 markers, detected or configured) becomes a message list, rendered exactly as the TRL
    adapters render conversations; any other prompt is plain text. End-of-turn strings are cut from the response.
    """

    def __init__(self, chat_format: str = "auto", separator: str | None = None, split_regex: str | None = None,
                 strip_strings: Sequence[str] = DEFAULT_STRIP):
        self.chat_format = chat_format
        self.separator = separator
        self.regex = re.compile(split_regex, re.DOTALL) if split_regex else None
        self.strip_strings = tuple(s for s in strip_strings if s)

    def format_of(self, text: str) -> ChatFormat | None:
        if self.chat_format == "plain":
            return None
        if self.chat_format != "auto":
            return CHAT_FORMATS[self.chat_format]
        return next((f for f in CHAT_FORMATS.values() if f.marker in text), None)

    def split(self, name: str, query: str, prompt_hint: str | None = None) -> tuple[str | list[dict], str]:
        fmt = self.format_of(query)
        if self.regex is not None:
            match = self.regex.fullmatch(query)
            if match is None:
                raise ValueError(f"{name} does not match --split_regex")
            prompt_text, response = match["prompt"], match["response"]
        elif prompt_hint is not None:
            if not query.startswith(prompt_hint):
                raise ValueError(f"{name} does not start with its prompt (prompts entry of the same index)")
            prompt_text, response = prompt_hint, query[len(prompt_hint):]
        elif self.separator is not None:
            prompt_text, sep, response = query.rpartition(self.separator)
            if not sep:
                raise ValueError(f"{name} does not contain the separator {self.separator!r}")
        elif fmt is not None:
            cut = query.rfind(fmt.assistant_header)
            if cut < 0:
                raise ValueError(f"{name} has no assistant turn ({fmt.assistant_header!r}) to score")
            prompt_text, response = query[:cut], query[cut + len(fmt.assistant_header):]
        else:
            raise ValueError(
                f"cannot split {name} into prompt and response: no chat markers found; start the server with "
                "--separator, --split_regex or --chat_format, or send `prompts`"
            )
        return self.prompt(prompt_text, fmt), self.response(response, fmt)

    def prompt(self, text: str, fmt: ChatFormat | None) -> str | list[dict]:
        messages = [{"role": role, "content": content} for role, content in fmt.message.findall(text)] if fmt else []
        return messages or text.strip()

    def response(self, text: str, fmt: ChatFormat | None) -> str:
        stops = self.strip_strings + (fmt.stops if fmt else ())
        text = text.rstrip()
        while stops and text.endswith(stops):
            text = text[: -len(next(s for s in stops if text.endswith(s)))].rstrip()
        return text.strip()


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
                raise TypeError(f"reference row {i}: prompt must be a string or a message list, got {type(prompt).__name__}")
            if not isinstance(reference, (str, list)):
                raise TypeError(f"reference row {i}: reference must be a string or assistant messages, got {type(reference).__name__}")
            full, last = _prompt_keys(prompt)
            duplicates += full in self.full
            self.full.setdefault(full, reference)
            self.last_user.setdefault(last, reference)
        if duplicates:
            logger.warning("%d reference rows repeat an earlier prompt; the first reference of each prompt is used", duplicates)

    def __len__(self) -> int:
        return len(self.full)

    def get(self, prompt: Any) -> Any | None:
        full, last = _prompt_keys(prompt)
        return self.full.get(full, self.last_user.get(last))

    @classmethod
    def from_file(cls, path: str | os.PathLike, prompt_column: str = "prompt", reference_column: str = "reference") -> "ReferenceTable":
        """Read a .jsonl/.json (JSON lines or an array of objects), .csv or .parquet file, or a saved dataset."""
        path = Path(path)
        if path.suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            import datasets

            if path.is_dir():
                rows = datasets.load_from_disk(str(path))
            elif path.suffix in (".csv", ".parquet"):
                rows = datasets.load_dataset(path.suffix[1:], data_files=str(path), split="train")
            else:
                raise ValueError(f"reference_file must be .jsonl, .json, .csv, .parquet or a saved dataset: {path}")
        pairs = []
        for i, row in enumerate(rows):
            if prompt_column not in row or reference_column not in row:
                raise ValueError(f"{path} row {i} lacks the column {prompt_column!r} or {reference_column!r}")
            pairs.append((row[prompt_column], row[reference_column]))
        return cls(pairs)


# ---- request handling -------------------------------------------------------------------------------------
class ApiError(Exception):
    """A client error with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _dumps(content: Any) -> bytes:
    """JSON with non-ASCII escaped, so that text echoed in errors (even lone surrogates) stays encodable."""
    return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def json_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(_dumps(content), status_code=status, headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def _reject_constant(name: str) -> None:
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
            raise ApiError(400, f"{child} has {len(value)} characters; the limit is {max_text_chars} (--max_text_chars)")
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
            raise ApiError(400, f"an object key has {len(key)} characters; the limit is {max_text_chars} (--max_text_chars)")
        yield (key if root else f".{key}"), v


def _fields(body: dict, required: Sequence[str], optional: dict[str, Any]) -> dict:
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
            body[key] = _positive(key, value)
    return dict(body)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{name} must be a number, got {json.dumps(value)[:40]}")
    try:
        number = float(value)
    except OverflowError:
        number = float("inf")
    if not 0 < number < float("inf"):
        raise ApiError(400, f"{name} must be a finite number > 0, got {json.dumps(value)[:40]}")
    return number


def _list(name: str, value: Any) -> list:
    if not isinstance(value, list):
        raise ApiError(400, f"{name} must be a list, got {type(value).__name__}")
    return value


class Service:
    """The routes' logic over one loaded `PairRM` (sync handlers run in request threads; see `build_app`)."""

    API = {  # route: (required fields, optional fields -> scalar type, or None for PairRM-validated values)
        "compare": (("inputs", "candidates_A", "candidates_B"), {"instructions": None, "return_logits": bool, "mode": str}),
        "probability": (("inputs", "candidates_A", "candidates_B"), {"instructions": None, "temperature": float}),
        "rank": (("inputs", "candidates"), {"instructions": None, "return_scores": bool}),
        "rank_with_ref": (("inputs", "candidates"), {"instructions": None, "return_scores": bool, "ref_mode": str, "ref_candidates": None}),
        "compare_conversations": (("conversations_a", "conversations_b"), {"return_logits": bool, "mode": str}),
    }

    def __init__(self, config: ServeConfig, model: PairRM):
        self.config = config
        self.model = model
        self.token = config.token if config.token is not None else os.environ.get(TOKEN_ENV) or None
        self.parser = QueryParser(config.chat_format, config.separator, config.split_regex, config.strip_strings)
        self.references = (
            ReferenceTable.from_file(config.reference_file, config.prompt_column, config.reference_column)
            if config.reference_file else None
        )
        self.batcher = MicroBatcher(self._score, config.max_batch_pairs, config.max_wait_ms)
        self.proxy: _QueuedPairRM | None = None

    def _score(self, triples: list) -> np.ndarray:
        return self.model.pair_logits(triples, batch_size=self.config.batch_size, show_progress_bar=False)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.batcher.start()
        self.proxy = _QueuedPairRM(self.model, self.batcher, asyncio.get_running_loop(), self.config.max_pairs)
        self.judge = PairRMJudge(self.proxy)
        self.pool = concurrent.futures.ThreadPoolExecutor(self.config.max_concurrency, thread_name_prefix="pairrm-request")
        try:
            yield
        finally:
            await self.batcher.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- sync handlers (request threads) ----
    def api(self, route: str, body: dict) -> dict:
        required, optional = self.API[route]
        kwargs = _fields(body, required, optional)
        if route.startswith("rank") and kwargs["inputs"] == [] and kwargs["candidates"] == []:
            return {"result": []}  # no inputs, no rows (the library's rank/rank_with_ref fail on this edge)
        if route == "rank" and isinstance(kwargs["candidates"], list):  # N^2 pairs: check before building them
            pairs = sum(len(c) * (len(c) - 1) for c in kwargs["candidates"] if isinstance(c, list))
            if pairs > self.config.max_pairs:
                raise ApiError(400, f"the request needs {pairs} pair forwards; the limit is {self.config.max_pairs} (--max_pairs)")
        return {"result": getattr(self.proxy, route)(**kwargs).tolist()}

    def judge_route(self, body: dict) -> dict:
        kwargs = _fields(body, ("prompts", "completions"), {"shuffle_order": bool, "return_scores": bool, "temperature": float})
        return {"result": self.judge.judge(**kwargs)}

    def pair_logits(self, body: dict) -> dict:
        kwargs = _fields(body, ("triples",), {"two_order": bool})
        triples = []
        for i, triple in enumerate(_list("triples", kwargs["triples"])):
            if not (isinstance(triple, list) and len(triple) == 3 and all(isinstance(t, str) for t in triple)):
                raise ApiError(400, f"triples[{i}] must be a list of 3 strings [source, A, B]")
            triples.append(tuple(triple))
        fn = self.proxy.two_order_logits if kwargs.get("two_order", False) else self.proxy.pair_logits
        return {"logits": fn(triples).tolist()}

    def get_reward(self, body: dict) -> dict:
        if "query" not in body:
            raise ApiError(400, "missing field 'query'")
        queries = _list("query", body["query"])
        extras = {}
        for key in ("prompts", "labels", "references"):
            value = body.get(key)
            if value is not None:
                extras[key] = _list(key, value)
                if len(extras[key]) != len(queries):
                    raise ApiError(400, f"{key} has {len(extras[key])} items but query has {len(queries)}")
        triples = []
        hints = extras.get("prompts") or [None] * len(queries)
        for i, query in enumerate(queries):
            if not isinstance(query, str):
                raise ApiError(400, f"query[{i}] must be a string, got {type(query).__name__}")
            hint = hints[i]
            if hint is not None and not isinstance(hint, str):
                raise ApiError(400, f"prompts[{i}] must be a string, got {type(hint).__name__}")
            prompt, response = self.parser.split(f"query[{i}]", query, hint)
            try:
                reference = self._reference(i, prompt, extras)
                source, candidate = render(prompt, response, name=f"query[{i}]")
                triples.append((source, candidate, render(prompt, reference, name=f"reference of query[{i}]")[1]))
            except (TypeError, ValueError) as error:
                raise ApiError(400, f"query[{i}]: {error}") from None
        z = self.proxy.two_order_logits(triples)
        rewards = aggregation.probability(z, self.config.temperature) if self.config.output == "probability" else z
        return {"rewards": [float(r) for r in rewards]}

    def _reference(self, i: int, prompt: Any, extras: dict) -> Any:
        if "references" in extras:
            return extras["references"][i]
        label = extras["labels"][i] if "labels" in extras else None
        if self.config.labels_as_reference and isinstance(label, str) and label:
            return label
        if self.references is not None:
            found = self.references.get(prompt)
            if found is not None:
                return found
        if self.config.reference is not None:
            return self.config.reference
        where = "in --reference_file" if self.references is not None else "configured (--reference or --reference_file)"
        raise ApiError(400, f"no reference for query[{i}]: its prompt is not {where}")

    def health(self) -> dict:
        return {"status": "ok", "template": getattr(self.model, "template", "pairrm"), **self.batcher.stats}

    # ---- async plumbing ----
    def authorized(self, request: Request) -> bool:
        if self.token is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())

    async def read_body(self, request: Request) -> bytes:
        """The raw body; over `max_body_bytes` is refused from Content-Length before reading, or as soon as the
        stream passes the limit (chunked bodies), so an oversized body is never held in memory."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "invalid Content-Length")
            if int(length) > limit:
                raise ApiError(413, f"request body has {int(length)} bytes; the limit is {limit} (--max_body_bytes)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes (--max_body_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def handle(self, handler: Callable[[dict], dict], raw: bytes) -> bytes:
        """Parse, check limits, run the route, serialize: all in a request thread, off the event loop."""
        try:
            body = json.loads(raw, parse_constant=_reject_constant)
        except RecursionError:
            raise ApiError(400, "malformed JSON: nested too deeply") from None
        except ValueError as error:  # JSONDecodeError, bad UTF-8, NaN/Infinity
            raise ApiError(400, f"malformed JSON: {error}") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        check_limits(body, self.config.max_items, self.config.max_text_chars)
        result = handler(body)
        try:
            return _dumps(result)
        except ValueError as error:  # a non-finite number: a server fault, not the request's
            raise RuntimeError(f"the result cannot be sent as JSON: {error}") from None

    def endpoint(self, handler: Callable[[dict], dict]) -> Callable:
        async def run(request: Request) -> Response:
            if not self.authorized(request):
                return error_response(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            try:
                raw = await self.read_body(request)
                body = await asyncio.get_running_loop().run_in_executor(self.pool, self.handle, handler, raw)
            except ApiError as error:
                return error_response(error.status, str(error))
            except (TypeError, ValueError) as error:  # the PairRM API's input checks
                logger.debug("bad request to %s: %s", request.url.path, error)
                return error_response(400, str(error))
            except Exception as error:  # noqa: BLE001
                logger.exception("error serving %s", request.url.path)
                return error_response(500, f"internal error: {type(error).__name__}: {error}")
            return Response(body, media_type="application/json")

        return run


def build_app(config: ServeConfig, model: PairRM) -> Starlette:
    """The Starlette app serving `model` (already loaded) with `config`."""
    service = Service(config, model)

    async def health(request: Request) -> Response:
        return json_response(service.health())

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    routes = [Route("/health", health, methods=["GET"])]
    routes += [Route(f"/{name}", service.endpoint(functools.partial(service.api, name)), methods=["POST"]) for name in Service.API]
    routes += [
        Route("/judge", service.endpoint(service.judge_route), methods=["POST"]),
        Route("/pair_logits", service.endpoint(service.pair_logits), methods=["POST"]),
        Route("/get_reward", service.endpoint(service.get_reward), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=service.lifespan, exception_handlers={HTTPException: http_error})
    app.state.service = service
    return app


# ---- running ----------------------------------------------------------------------------------------------
def load_model(config: ServeConfig) -> PairRM:
    return PairRM.from_pretrained(config.model, base_model=config.base_model, device=config.device, dtype=config.dtype)


def _uvicorn_server(config: ServeConfig, app: Starlette) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(
        app, log_config=None, access_log=config.access_log, lifespan="on", http="h11", ws="none",
        limit_concurrency=config.max_concurrency + 8,  # + a few for /health; above: 503
        timeout_graceful_shutdown=config.graceful_timeout_s, server_header=False,
    ))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _announce(config: ServeConfig, service: Service, port: int) -> None:
    if service.token is None and config.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without a token: anyone who can reach it can use it (--token)", config.host)
    logger.info(
        "PairRM server on http://%s:%d (model %s on %s; batches of up to %d pairs / %.1f ms; auth %s)",
        config.host, port, config.model, service.model.device, config.max_batch_pairs, config.max_wait_ms,
        "on" if service.token else "off",
    )


def run_serve(config: ServeConfig) -> None:
    """Load the model and serve until SIGINT/SIGTERM; in-flight requests are answered before exiting."""
    model = load_model(config)
    app = build_app(config, model)
    sock = _bind(config.host, config.port)
    _announce(config, app.state.service, sock.getsockname()[1])
    _uvicorn_server(config, app).run(sockets=[sock])


class BackgroundServer:
    """The server in a background thread (tests, notebooks): `with BackgroundServer(config, model) as s: s.url`.

    `stop()` shuts down gracefully: in-flight requests are answered first.
    """

    def __init__(self, config: ServeConfig, model: PairRM | None = None):
        self.config = config
        self.app = build_app(config, model if model is not None else load_model(config))
        self._sock = _bind(config.host, config.port)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{config.host}:{self.port}"
        self.server = _uvicorn_server(config, self.app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True, name="pairrm-server")

    @property
    def service(self) -> Service:
        return self.app.state.service

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        _announce(self.config, self.service, self.port)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the PairRM server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float | None = None) -> None:
        self.server.should_exit = True
        self.thread.join(timeout if timeout is not None else self.config.graceful_timeout_s + 10)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
