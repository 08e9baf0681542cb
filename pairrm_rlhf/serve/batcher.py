"""`QueueBackend`: the server's request queue as a `PairBackend`, with fair engine batches.

Request threads call `score` as on any backend; one engine thread runs the inner backend. Each engine batch holds at
most `max_batch_pairs` pairs and `max_batch_tokens` tokens (so one batch takes bounded time) and is filled fairly:
every waiting request first gets an equal share of the batch, then the rest goes in arrival order. A large request
is therefore spread over many batches, and a small request that arrives meanwhile is in the next batch: its latency
stays within about two batch times, however large the other request. Concurrent small requests share one batch (the
first waits at most `max_wait_ms` for others to join).

Every `score` call is one request's work: over `max_pairs` pairs or `max_tokens` tokens (summed over its pairs,
counted by the inner backend's `pair_lengths` without building token lists) it raises `RequestTooLarge` before any
forward. Work dies with its client: calls made inside `on_behalf(ticket)` belong to that ticket, and
`cancel(ticket)` drops their pairs not yet in a batch (a batch already running finishes) and fails them with
`RequestCancelled`. A backend with its own probability rule (`reference_probability`, RLHFlow) has it computed on
the engine thread too, one call at a time between batches.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..core.backend import PairBackend, Triple

logger = logging.getLogger(__name__)


class RequestTooLarge(ValueError):
    """One request needs more work than the queue's per-request limits allow (the server answers 413)."""


class RequestCancelled(Exception):
    """The request's client has gone (disconnected or timed out): its queued work was dropped."""


class Ticket:
    """One HTTP request's share of the queue, so that its work can be dropped when its client goes away."""

    def __init__(self) -> None:
        self.cancelled = False


class _Job:
    def __init__(self, triples: list[Triple], costs: list[int], ticket: Ticket | None):
        self.triples, self.costs, self.ticket = triples, costs, ticket
        self.next = 0  # first pair not yet put in a batch
        self.tokens_left = sum(costs)  # tokens of the pairs not yet put in a batch
        self.done = 0
        self.results = np.empty(len(triples), dtype=np.float32)
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.t0 = time.monotonic()


class QueueBackend:
    """A `PairBackend` that queues the `score` calls of many threads into fair, bounded engine batches.

    Args:
        backend: the backend that computes (the loaded model's); its `pair_lengths` prices each pair in tokens
            (one token a pair where it cannot count).
        max_batch_pairs, max_batch_tokens: the most pairs and tokens in one engine batch.
        max_wait_ms: longest the oldest waiting pair waits for a batch to fill.
        max_pairs, max_tokens: the most pairs and tokens one `score` call may need (`RequestTooLarge` above).
        batch_size: rows per forward, passed to the inner backend.

    Example:
        >>> queue = QueueBackend(model.backend).start()
        >>> shared = PairRM(queue)   # use from many threads
        >>> queue.stop()
    """

    def __init__(
        self,
        backend: PairBackend,
        *,
        max_batch_pairs: int = 256,
        max_batch_tokens: int | None = None,
        max_wait_ms: float = 5.0,
        max_pairs: int | None = None,
        max_tokens: int | None = None,
        batch_size: int | None = None,
    ):
        self.backend = backend
        self.max_batch_pairs = max_batch_pairs
        self.max_batch_tokens = max_batch_tokens or (65536 if backend.device.type == "cuda" else 8192)
        self.max_wait = max_wait_ms / 1000.0
        self.max_pairs, self.max_request_tokens, self.batch_size = max_pairs, max_tokens, batch_size
        # None for no triples means the default rule applies to all (`PairBackend.reference_probability`)
        self.own_probability = backend.reference_probability([], 1.0) is not None
        self.stats = {
            "requests": 0,
            "batches": 0,
            "pairs": 0,
            "tokens": 0,
            "engine_s": 0.0,
            "most_requests_in_a_batch": 0,
            "largest_batch_s": 0.0,
            "cancelled_requests": 0,
            "cancelled_pairs": 0,
        }
        self._jobs: collections.deque[_Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future, Ticket | None]] = (
            collections.deque()
        )
        self._cond = threading.Condition()
        self._closed = True
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    # ---- PairBackend ----------------------------------------------------------------------------------
    @property
    def template(self) -> str:
        return self.backend.template

    @property
    def device(self) -> torch.device:
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backend.dtype

    @property
    def max_tokens(self) -> int:
        """Tokens in one engine batch."""
        return self.max_batch_tokens

    def identity(self) -> dict:
        return self.backend.identity()

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        self._check(triples)
        return self.backend.truncation_rate(triples)

    def pair_lengths(self, triples: Sequence[Triple]) -> list[int] | None:
        return self.backend.pair_lengths(triples)

    def reference_probability(
        self, triples: Sequence[Triple], temperature: float, *, batch_size: int | None = None
    ) -> np.ndarray | None:
        """The inner backend's own probability, computed on the engine thread (None where the default applies)."""
        if not self.own_probability:
            return None
        triples = list(triples)
        self._check(triples, forwards=2)
        future: concurrent.futures.Future = concurrent.futures.Future()

        def call() -> np.ndarray | None:
            return self.backend.reference_probability(triples, temperature, batch_size=self.batch_size)

        with self._cond:
            ticket = self._ticket()
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._calls.append((call, future, ticket))
            self._cond.notify()
        return future.result()

    # ---- requests and their tickets ---------------------------------------------------------------------
    @contextlib.contextmanager
    def on_behalf(self, ticket: Ticket) -> Iterator[None]:
        """Calls from this thread inside the block are `ticket`'s work (see `cancel`)."""
        self._local.ticket = ticket
        try:
            yield
        finally:
            self._local.ticket = None

    def cancel(self, ticket: Ticket) -> int:
        """Drop `ticket`'s queued pairs (its running batch finishes) and fail its calls with `RequestCancelled`;
        later calls on its behalf fail at once. Returns the number of pairs dropped."""
        with self._cond:
            ticket.cancelled = True
            mine = [job for job in self._jobs if job.ticket is ticket]
            dropped = sum(len(job.costs) - job.next for job in mine)
            for job in mine:
                self._jobs.remove(job)
                job.future.set_exception(RequestCancelled("the client has gone"))
            for entry in [c for c in self._calls if c[2] is ticket]:
                self._calls.remove(entry)
                dropped += 1
                entry[1].set_exception(RequestCancelled("the client has gone"))
            self.stats["cancelled_requests"] += 1
            self.stats["cancelled_pairs"] += dropped
        if dropped:
            logger.info("client gone: dropped %d queued pairs", dropped)
        return dropped

    def _ticket(self) -> Ticket | None:
        """The current thread's ticket (with the lock held); `RequestCancelled` if it was cancelled."""
        ticket = self._local.__dict__.get("ticket")
        if ticket is not None and ticket.cancelled:
            raise RequestCancelled("the client has gone")
        return ticket

    def _check(self, triples: Sequence[Triple], forwards: int = 1) -> list[int]:
        """The token cost of each triple; `RequestTooLarge` over the per-request limits."""
        pairs = forwards * len(triples)
        if self.max_pairs is not None and pairs > self.max_pairs:
            raise RequestTooLarge(
                f"the request needs {pairs} pair forwards; the limit is {self.max_pairs} (--max_pairs)"
            )
        lengths = self.backend.pair_lengths(triples) if triples else []
        costs = list(lengths) if lengths is not None else [1] * len(triples)
        tokens = forwards * sum(costs)
        if self.max_request_tokens is not None and tokens > self.max_request_tokens:
            raise RequestTooLarge(
                f"the request needs {tokens} tokens over {pairs} pair forwards; the limit is "
                f"{self.max_request_tokens} (--max_request_tokens)"
            )
        return costs

    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """f(x, A, B) of each triple, computed in shared engine batches (blocks the calling thread)."""
        triples = list(triples)
        costs = self._check(triples)
        if not triples:
            return np.zeros(0, dtype=np.float32)
        with self._cond:
            job = _Job(triples, costs, self._ticket())
            if self._closed:
                raise RuntimeError("the server is shutting down")
            self._jobs.append(job)
            self._cond.notify()
        return job.future.result()

    # ---- the engine thread ----------------------------------------------------------------------------
    def start(self) -> QueueBackend:
        """Start the engine thread."""
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="pairrm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish the running batch, then fail every request still queued ("the server is shutting down")."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for future in [job.future for job in self._jobs] + [future for _, future, _ in self._calls]:
                if not future.done():
                    future.set_exception(RuntimeError("the server is shutting down"))
            self._jobs.clear()
            self._calls.clear()

    def pending(self) -> tuple[int, int]:
        """(pairs, tokens) queued and not yet in a batch."""
        with self._cond:
            return (sum(len(j.costs) - j.next for j in self._jobs), sum(j.tokens_left for j in self._jobs))

    def _full(self) -> bool:
        pairs = tokens = 0
        for job in self._jobs:
            pairs += len(job.costs) - job.next
            tokens += job.tokens_left
            if pairs >= self.max_batch_pairs or tokens >= self.max_batch_tokens:
                return True
        return False

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._calls and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                call = self._calls.popleft() if self._calls else None
            if call is not None:  # one call between batches
                self._run_call(*call)
            with self._cond:
                if not self._jobs or self._closed:
                    continue
                deadline = self._jobs[0].t0 + self.max_wait  # the oldest request waits at most max_wait
                while not self._closed and not self._full() and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if not self._jobs or self._closed:  # cancelled while waiting, or shutting down
                    continue
                batch = self._take()
            self._run(batch)

    def _take(self) -> list[tuple[_Job, int, int]]:
        """The next batch as (job, start, end) slices: an equal share for every waiting job first, then the rest in
        arrival order. A pair larger than the whole batch budget runs alone. Called with the lock held."""
        jobs = list(self._jobs)
        share_pairs = max(1, self.max_batch_pairs // len(jobs))
        share_tokens = self.max_batch_tokens // len(jobs)
        taken = {id(job): job.next for job in jobs}
        pairs = tokens = 0
        for per_job in (True, False):
            for job in jobs:
                end, own = taken[id(job)], 0
                while end < len(job.costs) and pairs < self.max_batch_pairs:
                    cost = job.costs[end]
                    if pairs and tokens + cost > self.max_batch_tokens:
                        break
                    if per_job and end > job.next and (end - job.next >= share_pairs or own + cost > share_tokens):
                        break
                    end, own, pairs, tokens = end + 1, own + cost, pairs + 1, tokens + cost
                taken[id(job)] = end
        batch = [(job, job.next, taken[id(job)]) for job in jobs if taken[id(job)] > job.next]
        for job, start, end in batch:
            job.next = end
            job.tokens_left -= sum(job.costs[start:end])
            if end == len(job.triples):
                self._jobs.remove(job)
        return batch

    def _run(self, batch: list[tuple[_Job, int, int]]) -> None:
        triples = [t for job, start, end in batch for t in job.triples[start:end]]
        started = time.monotonic()
        try:
            logits = self.backend.score(triples, batch_size=self.batch_size, show_progress_bar=False)
        except Exception as error:  # noqa: BLE001 - handed to the requests it belongs to
            if len(batch) > 1:  # find the faulty request: the others still get their numbers
                for part in batch:
                    self._run([part])
                return
            self._fail(batch[0][0], error)
            return
        elapsed = time.monotonic() - started
        stats = self.stats
        stats["batches"] += 1
        stats["pairs"] += len(triples)
        stats["tokens"] += sum(c for job, start, end in batch for c in job.costs[start:end])
        stats["engine_s"] += elapsed
        stats["largest_batch_s"] = max(stats["largest_batch_s"], elapsed)
        stats["most_requests_in_a_batch"] = max(stats["most_requests_in_a_batch"], len(batch))
        logger.debug("batch of %d pairs from %d requests in %.1f ms", len(triples), len(batch), 1000 * elapsed)
        offset = 0
        for job, start, end in batch:
            job.results[start:end] = logits[offset : offset + end - start]
            offset += end - start
            job.done += end - start
            if job.done == len(job.triples) and not job.future.done():
                stats["requests"] += 1
                job.future.set_result(job.results)

    @staticmethod
    def _run_call(call: Callable[[], Any], future: concurrent.futures.Future, ticket: Ticket | None) -> None:
        try:
            result = call()
        except Exception as error:  # noqa: BLE001 - handed to the request it belongs to
            if not future.done():
                future.set_exception(error)
            return
        if not future.done():
            future.set_result(result)

    def _fail(self, job: _Job, error: BaseException) -> None:
        with self._cond:
            if job in self._jobs:
                self._jobs.remove(job)
        if not job.future.done():
            job.future.set_exception(error)
