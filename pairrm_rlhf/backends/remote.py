"""`RemoteBackend`: a `PairBackend` whose forward passes run on `pairrm-rlhf serve` servers.

`PairRM(RemoteBackend(urls))` is the whole PairRM API, and every adapter works over it unchanged
(`PairwiseReward(PairRM(RemoteBackend(url)))`, `PairRMJudge(...)`, `PreferenceLabeler(...)`): the texts are rendered
here, exactly as in process, and the server scores the prepared triples (`POST /pair_logits`). What the backend is
(`template`, `dtype`, limits, the probability rule, `identity()`) it learns from the server's `GET /health`, so a
Better-PairRM or RLHFlow server is rendered for exactly as in process without being told. A rendered text keeps
what it was rendered from (`core.formats.Rendered`) on the wire, so such a server re-renders it exactly.

It trusts nothing: every answer is checked as the in-process engine checks logits (`backends.wire`), and a wrong
one is an error naming the server and route. Several URLs give failover; each call has a bounded total wait with
exponential backoff (long enough to outlast a server restart) and ends in one clear error. Each call carries an
`Idempotency-Key`, so a retry after a timeout joins the computation already running on the server instead of
starting it again. Uses `httpx2` (the `serve` extra: `pip install pairrm-rlhf[serve]`).
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

try:
    import httpx2
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"pairrm_rlhf.backends.remote needs the serve extra ({error.name} is missing): pip install 'pairrm-rlhf[serve]'"
    ) from error

from ..core.backend import Triple
from .wire import (
    DEFAULT_PROBABILITY,
    IDEMPOTENCY_HEADER,
    LogitsAnswer,
    ProbabilityAnswer,
    ServerInfo,
    TriplesRequest,
    TruncationAnswer,
    WireError,
    from_wire,
    to_wire,
)

__all__ = ["PairRMServerError", "RemoteBackend", "from_wire", "to_wire"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
HEALTH_TIMEOUT = 10.0  # /health is cheap: a server that does not answer it in this long is not healthy


class PairRMServerError(RuntimeError):
    """No PairRM server answered (every URL failed within the wait), or a server answered something invalid."""


class RemoteBackend:
    """A `PairBackend` scored by one or more `pairrm-rlhf serve` servers.

    Args:
        urls: one server URL or several (`http://host:port`); they are tried in turn, starting with the last one
            that answered.
        token: the servers' token (`--token`), sent as `Authorization: Bearer`.
        timeout: seconds one HTTP attempt may take (connect: at most 5 s).
        max_wait: seconds one call may take in all, attempts and backoff included; then `PairRMServerError`.
        retries: at most this many further rounds over all URLs after the first fails (within `max_wait`).
        backoff, max_backoff: the wait before the next round: `backoff`, doubled each round, at most `max_backoff`
            (with jitter). The defaults retry for ~25 s, outlasting a server restart.
        chunk_pairs, chunk_bytes: large jobs are sent in several requests of at most this many triples / JSON bytes
            (keep them under the servers' `--max_pairs` and `--max_body_bytes`).

    Connection errors, timeouts, 408/429 and 5xx answers fail over and are retried; any other 4xx is the request's
    fault and raises `ValueError` (401/403: `PermissionError`) at once; an invalid answer raises `PairRMServerError`
    naming the server and route at once.

    Example:
        >>> from pairrm_rlhf import PairRM, PairwiseReward
        >>> remote = PairRM(RemoteBackend(["http://rm-0:8000", "http://rm-1:8000"], token="change-me"))
        >>> remote.rank(["hello!"], [["hi!", "go away"]])
        >>> reward = PairwiseReward(remote)      # a TRL reward function scored by the servers
    """

    device = torch.device("cpu")

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        timeout: float = 30.0,
        max_wait: float = 60.0,
        retries: int = 8,
        backoff: float = 0.5,
        max_backoff: float = 4.0,
        chunk_pairs: int = 1024,
        chunk_bytes: int = 4 * 2**20,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("urls must name at least one server")
        for url in urls:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"server URLs must start with http:// or https://, got {url!r}")
        if isinstance(retries, bool) or not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        for name, value in (
            ("timeout", timeout),
            ("max_wait", max_wait),
            ("backoff", backoff),
            ("max_backoff", max_backoff),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if token == "":
            raise ValueError("token is empty: pass the server's token, or None for a server without one")
        self.urls = [u.rstrip("/") for u in urls]
        self.timeout, self.max_wait, self.retries = float(timeout), float(max_wait), retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.chunk_pairs, self.chunk_bytes = chunk_pairs, chunk_bytes
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx2.Client(timeout=httpx2.Timeout(timeout, connect=min(timeout, 5.0)), headers=headers)
        self._preferred = 0
        self._lock = threading.Lock()
        self._info: ServerInfo | None = None

    # ---- what the served judge is (GET /health, read once) -----------------------------------------------
    def info(self) -> ServerInfo:
        """The served judge's description from the first healthy server (read once, then kept)."""
        if self._info is None:
            self._info = self.health()
        return self._info

    @property
    def template(self) -> str:
        return self.info().template

    @property
    def dtype(self) -> torch.dtype:
        name = self.info().dtype
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise PairRMServerError(f"the server reports an unknown dtype {name!r:.40}")
        return dtype

    @property
    def max_tokens(self) -> int:
        """Tokens in one of the server's engine batches."""
        return self.info().max_batch_tokens

    # ---- PairBackend ----------------------------------------------------------------------------------
    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """f(x, A, B) of each prepared (source, A, B) triple, computed by the servers (float32, caller's order)."""
        out = [
            self.post(
                "/pair_logits",
                TriplesRequest(chunk).to_json(),
                functools.partial(LogitsAnswer.parse, count=len(chunk)),
            )
            for chunk in self._chunks(triples)
        ]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, dtype=np.float32)

    def reference_probability(
        self, triples: Sequence[Triple], temperature: float, *, batch_size: int | None = None
    ) -> np.ndarray | None:
        """The served judge's own P(A > B) at `temperature` (`POST /reference_probability`), or None where the
        server reports the default rule sigmoid((f(x,A,B) - f(x,B,A)) / 2T) (PairRM, Better-PairRM)."""
        if self.info().probability == DEFAULT_PROBABILITY:
            return None
        out = []
        for chunk in self._chunks(triples):
            p = self.post(
                "/reference_probability",
                TriplesRequest(chunk, temperature=temperature).to_json(),
                functools.partial(ProbabilityAnswer.parse, count=len(chunk)),
            )
            if p is None:
                raise PairRMServerError(
                    "the server's /health reports its own probability rule, but /reference_probability answered null"
                )
            out.append(p)
        return np.concatenate(out) if out else np.zeros(0)

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        """Fraction of triples the served model truncates (`POST /truncation_rate`)."""
        cut = 0.0
        for chunk in self._chunks(triples):
            rate = self.post("/truncation_rate", TriplesRequest(chunk).to_json(), TruncationAnswer.parse)
            cut += rate * len(chunk)
        return cut / len(triples) if len(triples) else 0.0

    def pair_lengths(self, triples: Sequence[Triple]) -> None:
        """None: the served model's tokenizer is on the server (which limits tokens itself)."""
        return None

    def identity(self) -> dict:
        """The served model's identity (weights digest, dtype, template, tokenizer, ...), the same from every server
        that answers; a `ValueError` naming the URLs when two servers serve different models."""
        seen: dict[str, dict] = {}
        errors = []
        for url in self.urls:
            try:
                seen[url] = self._health(url).identity
            except (httpx2.HTTPError, ValueError) as error:
                errors.append(f"{url}: {error}")
                logger.info("PairRM server %s is not healthy: %s", url, error)
        if not seen:
            raise PairRMServerError("no PairRM server is healthy: " + "; ".join(errors))
        first_url, first = next(iter(seen.items()))
        for url, identity in seen.items():
            if identity != first:
                raise ValueError(f"the servers serve different models: {first_url} {first} but {url} {identity}")
        return first

    # ---- transport ------------------------------------------------------------------------------------
    def post(self, path: str, payload: dict, parse: Callable[[Any], T]) -> T:
        """POST `payload` to `path` on the first server that answers and return `parse(answer)`; failover, retries
        and backoff within `max_wait`. One idempotency key for every attempt: a retry joins the running work."""
        body = json.dumps(payload, ensure_ascii=True, allow_nan=False).encode()
        headers = {IDEMPOTENCY_HEADER: uuid.uuid4().hex}
        deadline = time.monotonic() + self.max_wait
        errors: dict[str, str] = {}
        attempt = 0
        while True:
            with self._lock:
                first = self._preferred
            for k in range(len(self.urls)):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                index = (first + k) % len(self.urls)
                url = self.urls[index] + path
                try:
                    timeout = httpx2.Timeout(min(self.timeout, left), connect=min(self.timeout, left, 5.0))
                    response = self._http.post(url, content=body, headers=headers, timeout=timeout)
                except httpx2.TransportError as error:  # connect/read/write errors and timeouts
                    errors[url] = f"{type(error).__name__}: {error}"
                    logger.info("PairRM server %s failed: %s", url, errors[url])
                    continue
                status = response.status_code
                if status in (408, 429) or status >= 500:
                    errors[url] = f"HTTP {status}: {_error_text(response)}"
                    logger.info("PairRM server %s failed: %s", url, errors[url])
                    continue
                if status in (401, 403):
                    raise PermissionError(
                        f"{url} refused the request (HTTP {status}): {_error_text(response)}; check the token"
                    )
                if status >= 400:
                    raise ValueError(f"{url} rejected the request (HTTP {status}): {_error_text(response)}")
                try:
                    result = parse(response.json())
                except (WireError, ValueError) as error:  # not JSON, or not the declared shape
                    raise PairRMServerError(f"{url} answered an invalid value: {error}") from None
                with self._lock:
                    self._preferred = index
                return result
            attempt += 1
            delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            waited = self.max_wait - (deadline - time.monotonic())
            if attempt > self.retries or time.monotonic() + delay >= deadline:
                details = "; ".join(f"{url}: {error}" for url, error in errors.items())
                raise PairRMServerError(
                    f"no PairRM server answered {path} after {attempt} attempt(s) in {waited:.1f} s "
                    f"(max_wait={self.max_wait:g}, retries={self.retries}): {details}"
                )
            logger.warning(
                "no PairRM server answered %s (attempt %d of %d); retrying in %.2f s",
                path,
                attempt,
                self.retries + 1,
                delay,
            )
            time.sleep(delay)

    def health(self) -> ServerInfo:
        """`GET /health` of the first server that answers."""
        errors = []
        for url in self.urls:
            try:
                return self._health(url)
            except (httpx2.HTTPError, ValueError) as error:
                errors.append(f"{url}: {error}")
        raise PairRMServerError("no PairRM server is healthy: " + "; ".join(errors))

    def _health(self, url: str) -> ServerInfo:
        response = self._http.get(url + "/health", timeout=min(self.timeout, HEALTH_TIMEOUT))
        response.raise_for_status()
        return ServerInfo.parse(f"{url}/health", response.json())

    def _chunks(self, triples: Sequence[Triple]) -> list[list[Triple]]:
        """Triples in requests of at most `chunk_pairs` triples and about `chunk_bytes` bytes."""
        most = self.chunk_pairs
        chunks: list[list[Triple]] = [[]]
        size = 0
        for triple in triples:
            n = len(json.dumps([to_wire(text) for text in triple], ensure_ascii=True)) + 1
            if chunks[-1] and (len(chunks[-1]) >= most or size + n > self.chunk_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(triple)
            size += n
        return [c for c in chunks if c]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RemoteBackend:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _error_text(response: httpx2.Response) -> str:
    try:
        answer = response.json()
        if isinstance(answer, dict) and "error" in answer:
            return str(answer["error"])[:300]
    except ValueError:
        pass
    return response.text[:300]
