"""`RemoteBackend`: a `PairBackend` whose forward passes run on `pairrm-rlhf serve` servers.

`PairRM(RemoteBackend(urls))` is the whole PairRM API, and every adapter works over it unchanged
(`PairwiseReward(PairRM(RemoteBackend(url)))`, `PairRMJudge(...)`, `PreferenceLabeler(...)`): the texts are rendered
here, exactly as in process, and the server scores the prepared triples (`POST /pair_logits`). A rendered text
keeps what it was rendered from (the prompt's messages, the bare response; `core.formats.Rendered`) on the wire, so
a Better-PairRM or RLHFlow server re-renders it exactly as its in-process backend would. `identity()` is the served
model's (`GET /health`), so a resumable job notices a different model behind the same URL.

Several URLs give failover; timeouts, retries with exponential backoff, and one clear error when every server
fails. Uses `httpx2` (the `serve` extra: `pip install pairrm-rlhf[serve]`).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

try:
    import httpx2
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        f"pairrm_rlhf.backends.remote needs the serve extra ({error.name} is missing): pip install 'pairrm-rlhf[serve]'"
    ) from error

from ..core.backend import Triple
from ..core.formats import Rendered

logger = logging.getLogger(__name__)


WIRE_FIELDS = ("messages", "response")  # what a `Rendered` text carries besides its PairRM text


class PairRMServerError(RuntimeError):
    """No PairRM server answered (every URL failed on every attempt)."""


def to_wire(text: str) -> str | dict:
    """A triple's text for JSON: a plain string, or `{"text": ..., <what it was rendered from>}` for a `Rendered`."""
    extra = {k: getattr(text, k) for k in WIRE_FIELDS if getattr(text, k, None) is not None}
    return {"text": str(text), **extra} if extra else str(text)


def from_wire(name: str, value: Any) -> str:
    """The inverse of `to_wire`; a ValueError naming `name` when `value` is neither form."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        extra = {k: v for k, v in value.items() if k != "text"}
        unknown = set(extra) - set(WIRE_FIELDS)
        if unknown:
            raise ValueError(f"{name} has unknown keys {sorted(unknown)}; expected text, {', '.join(WIRE_FIELDS)}")
        messages = extra.get("messages")
        if messages is not None:
            if not (isinstance(messages, list) and all(
                    isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m) for m in messages)):
                raise ValueError(f"{name}.messages must be a list of [role, content] string pairs")
            extra["messages"] = tuple(tuple(m) for m in messages)
        if extra.get("response") is not None and not isinstance(extra["response"], str):
            raise ValueError(f"{name}.response must be a string")
        return Rendered(value["text"], **extra)
    raise ValueError(f"{name} must be a string or an object with a string `text`")


class RemoteBackend:
    """A `PairBackend` scored by one or more `pairrm-rlhf serve` servers.

    Args:
        urls: one server URL or several (`http://host:port`); they are tried in turn, starting with the last one
            that answered.
        token: the servers' token (`--token`), sent as `Authorization: Bearer`.
        timeout: seconds per HTTP request (connect: at most 10 s).
        retries: further rounds over all URLs after the first fails, with exponential backoff
            (`backoff`, doubled each round, at most `max_backoff` seconds, with jitter).
        chunk_pairs, chunk_bytes: large jobs are sent in several requests of at most this many triples / JSON bytes,
            under the servers' limits.

    Connection errors, timeouts, 408/429 and 5xx answers fail over and are retried; any other 4xx is the request's
    fault and raises `ValueError` (401/403: `PermissionError`) at once.

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
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
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
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        if token == "":
            raise ValueError("token is empty: pass the server's token, or None for a server without one")
        self.urls = [u.rstrip("/") for u in urls]
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.chunk_pairs, self.chunk_bytes = chunk_pairs, chunk_bytes
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx2.Client(timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)
        self._preferred = 0
        self._lock = threading.Lock()

    # ---- PairBackend ----------------------------------------------------------------------------------
    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """f(x, A, B) of each prepared (source, A, B) triple, computed by the servers (float32, caller's order)."""
        out: list[float] = []
        for chunk in self._chunks(triples):
            answer = self.post("/pair_logits", {"triples": chunk})
            logits = answer.get("logits") if isinstance(answer, dict) else None
            if not isinstance(logits, list) or len(logits) != len(chunk):
                raise PairRMServerError(f"/pair_logits answered {str(answer)[:200]!r}; expected {len(chunk)} logits")
            out.extend(logits)
        return np.asarray(out, dtype=np.float32)

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        """Fraction of triples the served model truncates (`POST /truncation_rate`)."""
        cut = 0.0
        for chunk in self._chunks(triples):
            answer = self.post("/truncation_rate", {"triples": chunk})
            rate = answer.get("truncation_rate") if isinstance(answer, dict) else None
            if not isinstance(rate, (int, float)):
                raise PairRMServerError(f"/truncation_rate answered {str(answer)[:200]!r}")
            cut += rate * len(chunk)
        return cut / len(triples) if len(triples) else 0.0

    def identity(self) -> dict:
        """The served model's identity (weights digest, dtype, template, tokenizer, ...), the same from every server
        that answers; a `ValueError` naming the URLs when two servers serve different models."""
        seen: dict[str, dict] = {}
        for url in self.urls:
            try:
                health = self._health(url)
            except (httpx2.HTTPError, ValueError) as error:
                logger.info("PairRM server %s is not healthy: %s", url, error)
                continue
            if not isinstance(health.get("identity"), dict):
                raise PairRMServerError(f"{url}/health has no model identity (an older server?)")
            seen[url] = health["identity"]
        if not seen:
            raise PairRMServerError("no PairRM server is healthy: " + ", ".join(self.urls))
        first_url, first = next(iter(seen.items()))
        for url, identity in seen.items():
            if identity != first:
                raise ValueError(f"the servers serve different models: {first_url} {first} but {url} {identity}")
        return first

    # ---- transport ------------------------------------------------------------------------------------
    def post(self, path: str, payload: dict) -> dict:
        """POST `payload` to `path` on the first server that answers; failover, retries and backoff included."""
        body = json.dumps(payload, ensure_ascii=True, allow_nan=False).encode()
        errors: dict[str, str] = {}
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
                logger.warning("no PairRM server answered %s (attempt %d of %d); retrying in %.2f s",
                               path, attempt, self.retries + 1, delay)
                time.sleep(delay)
            with self._lock:
                first = self._preferred
            for k in range(len(self.urls)):
                index = (first + k) % len(self.urls)
                url = self.urls[index] + path
                try:
                    response = self._http.post(url, content=body)
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
                    raise PermissionError(f"{url} refused the request (HTTP {status}): {_error_text(response)}; check the token")
                if status >= 400:
                    raise ValueError(f"{url} rejected the request (HTTP {status}): {_error_text(response)}")
                try:
                    answer = response.json()
                except ValueError:
                    errors[url] = "the answer is not JSON"
                    continue
                with self._lock:
                    self._preferred = index
                return answer
        details = "; ".join(f"{url}: {error}" for url, error in errors.items())
        raise PairRMServerError(f"no PairRM server answered {path} after {self.retries + 1} attempt(s): {details}")

    def health(self) -> dict:
        """`GET /health` of the first server that answers."""
        errors = []
        for url in self.urls:
            try:
                return self._health(url)
            except (httpx2.HTTPError, ValueError) as error:
                errors.append(f"{url}: {error}")
        raise PairRMServerError("no PairRM server is healthy: " + "; ".join(errors))

    def _health(self, url: str) -> dict:
        response = self._http.get(url + "/health")
        response.raise_for_status()
        answer = response.json()
        if not isinstance(answer, dict):
            raise ValueError(f"{url}/health answered {str(answer)[:100]!r}")
        return answer

    def _chunks(self, triples: Sequence[Triple]) -> list[list]:
        chunks: list[list] = [[]]
        size = 0
        for triple in triples:
            wire = [to_wire(text) for text in triple]
            n = len(json.dumps(wire, ensure_ascii=True)) + 1
            if chunks[-1] and (len(chunks[-1]) >= self.chunk_pairs or size + n > self.chunk_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(wire)
            size += n
        return [c for c in chunks if c]

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RemoteBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _error_text(response: httpx2.Response) -> str:
    try:
        answer = response.json()
        if isinstance(answer, dict) and "error" in answer:
            return str(answer["error"])
    except ValueError:
        pass
    return response.text[:300]
