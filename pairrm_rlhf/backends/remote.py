"""`PairRMClient`: the TRL reward functions and judge, scored by one or more `pairrm-rlhf serve` servers.

The client renders prompts and completions exactly as the in-process adapters do (it *is* those adapters, over a
`PairRM` whose forward passes are HTTP calls to `POST /pair_logits` with prepared text), so a reward computed
remotely equals the local one. Several URLs give failover; timeouts, retries with exponential backoff and clear
errors when every server fails.

Uses `httpx2` (the maintained successor of httpx, already required by huggingface_hub).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import httpx2
import numpy as np
import torch

from ..pairrm import PairRM
from ..trl.judge import PairRMJudge
from ..trl.rewards import AsyncPairwiseReward, OnlineDPOJudgeReward, PairwiseReward

logger = logging.getLogger(__name__)

Triple = tuple[str, str, str]


class PairRMServerError(RuntimeError):
    """No PairRM server answered (every URL failed on every attempt)."""


class RemotePairRM(PairRM):
    """A `PairRM` whose forward passes run on PairRM servers: `compare`, `rank`, ... and every adapter work as with a
    local model, with the same numbers."""

    def __init__(self, client: "PairRMClient"):
        super().__init__(backend=None, kind="remote")  # type: ignore[arg-type]
        self.client = client

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def pair_logits(self, triples: Sequence[Triple], *, batch_size: int | None = None,
                    show_progress_bar: bool | None = None) -> np.ndarray:
        return self.client.pair_logits(triples)

    def two_order_logits(self, triples: Sequence[Triple], *, batch_size: int | None = None,
                         show_progress_bar: bool | None = None) -> np.ndarray:
        return self.client.pair_logits(triples, two_order=True)


class PairRMClient:
    """Client of `pairrm-rlhf serve` servers, with the TRL reward functions of `pairrm_rlhf.rewards` on top.

    Args:
        urls: one server URL or several (`http://host:port`); they are tried in turn, starting with the last one
            that answered.
        token: bearer token of the servers (`--token`).
        timeout: seconds per HTTP request (connect: at most 10 s).
        retries: further rounds over all URLs after the first fails, with exponential backoff
            (`backoff`, doubled each round, at most `max_backoff` seconds, with jitter).
        chunk_pairs, chunk_bytes: large jobs are sent in several requests of at most this many triples / JSON bytes,
            under the servers' limits.

    Reward functions (plain callables, `(prompts, completions, **columns) -> list[float]`, as the adapters):
    `reference_reward`, `group_reward`, `async_reward`, `online_dpo_reward`; a judge: `judge`. `pairrm` is the
    `PairRM` API itself. Connection errors, timeouts, 408/429 and 5xx answers fail over and are retried; any other
    4xx is the request's fault and raises `ValueError` (401/403: `PermissionError`) at once.
    """

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
        if not (isinstance(retries, int) and retries >= 0):
            raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.chunk_pairs, self.chunk_bytes = chunk_pairs, chunk_bytes
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx2.Client(timeout=httpx2.Timeout(timeout, connect=min(timeout, 10.0)), headers=headers)
        self._preferred = 0
        self._lock = threading.Lock()
        self.pairrm = RemotePairRM(self)

    # ---- transport ---------------------------------------------------------------------------------------
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
                response = self._http.get(url + "/health")
                response.raise_for_status()
                return response.json()
            except (httpx2.HTTPError, ValueError) as error:
                errors.append(f"{url}: {error}")
        raise PairRMServerError("no PairRM server is healthy: " + "; ".join(errors))

    # ---- scoring -----------------------------------------------------------------------------------------
    def pair_logits(self, triples: Sequence[Triple], two_order: bool = False) -> np.ndarray:
        """f(x, A, B) of prepared (source, A, B) triples, or with `two_order` f(x,A,B) - f(x,B,A)."""
        triples = [tuple(t) for t in triples]
        out: list[float] = []
        for chunk in self._chunks(triples):
            answer = self.post("/pair_logits", {"triples": chunk, "two_order": two_order})
            logits = answer.get("logits") if isinstance(answer, dict) else None
            if not isinstance(logits, list) or len(logits) != len(chunk):
                raise PairRMServerError(f"/pair_logits answered {str(answer)[:200]!r}; expected {len(chunk)} logits")
            out.extend(logits)
        return np.asarray(out, dtype=np.float32)

    def _chunks(self, triples: list) -> list[list]:
        chunks: list[list] = [[]]
        size = 0
        for triple in triples:
            n = len(json.dumps(triple, ensure_ascii=True)) + 1
            if chunks[-1] and (len(chunks[-1]) >= self.chunk_pairs or size + n > self.chunk_bytes):
                chunks.append([])
                size = 0
            chunks[-1].append(list(triple))
            size += n
        return [c for c in chunks if c]

    # ---- the adapters, remote ----------------------------------------------------------------------------
    def reference_reward(self, **kwargs: Any) -> PairwiseReward:
        """`PairwiseReward(mode="reference", ...)` scored by the servers (same arguments, e.g. `output`, `name`)."""
        return PairwiseReward(self.pairrm, mode="reference", **kwargs)

    def group_reward(self, **kwargs: Any) -> PairwiseReward:
        """`PairwiseReward(mode="group", ...)`: round-robin within each prompt's generations, scored by the servers."""
        return PairwiseReward(self.pairrm, mode="group", **kwargs)

    def async_reward(self, **kwargs: Any) -> AsyncPairwiseReward:
        """`AsyncPairwiseReward` (GRPO/RLOO await it; the HTTP calls run in a worker thread)."""
        return AsyncPairwiseReward(self.pairrm, **kwargs)

    def online_dpo_reward(self, soft: bool = True, temperature: float = 1.0, name: str = "pairrm_judge") -> OnlineDPOJudgeReward:
        """`OnlineDPOJudgeReward` for OnlineDPOTrainer's block layout, scored by the servers."""
        return OnlineDPOJudgeReward(PairRMJudge(self.pairrm), soft=soft, temperature=temperature, name=name)

    def judge(self, seed: int | None = None) -> PairRMJudge:
        """`PairRMJudge` scored by the servers."""
        return PairRMJudge(self.pairrm, seed=seed)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "PairRMClient":
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
