"""The pair-scoring engine: ordered (source, A, B) triples in, single-order logits f(x, A, B) out.

Every scoring method goes through `PairScorer.score`. It is fast because it does as little as it can:
each distinct text is tokenized once, identical inputs (by token ids, not text) are scored once, pairs
are sorted by length and packed into batches under a token budget (padding only to the longest pair of each
batch), the encoder keeps only its last layer, and the forward runs under `torch.no_grad` and one autocast
context per call (`inference_mode` would disable autocast's weight-cast cache). A CUDA out-of-memory error
splits the batch and retries it; nothing is lost.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from .backend import Triple
from .modeling import PairRMModel
from .progress import progress_enabled
from .settings import default_max_tokens
from .tokenization import PairLayout

logger = logging.getLogger(__name__)


def default_device() -> str:
    """CUDA when available, on this process's device (`LOCAL_RANK` under torchrun/accelerate), else CPU."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', torch.cuda.current_device()))}"


def cpu_supports_bf16(flags: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), so bf16 autocast is ~2x float32.

    `flags`: the `flags` line of /proc/cpuinfo (read when None; where it cannot be read, PyTorch's own
    `get_cpu_capability()` decides: "AMX" only, since its "AVX512" does not imply the BF16 extension).
    """
    if flags is None:
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                flags = next((line for line in cpuinfo if line.startswith("flags")), "")
        except OSError:
            flags = ""
        if not flags:
            return "AMX" in torch.backends.cpu.get_cpu_capability()
    present = set(flags.split(":")[-1].split())
    return bool(present & {"avx512_bf16", "amx_bf16"})


def speed_first_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype for speed-first uses (labeling, serving): bfloat16 on CUDA and on CPUs with bf16
    instructions (max |logit diff| vs float32 ~1e-2, see docs/BENCHMARKS.md), float32 elsewhere. Parity-first uses
    (the reference-compatible methods, eval) keep float32 on CPU."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_supports_bf16()):
        return torch.bfloat16
    return torch.float32


def plan_batches(lengths: Sequence[int], max_tokens: int, batch_size: int | None = None) -> list[list[int]]:
    """Indices grouped into length-sorted batches, longest first, each within `max_tokens` padded tokens
    (rows x longest) and at most `batch_size` rows; a sequence longer than the budget gets a batch of its own."""
    batches: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        batch = batches[-1] if batches else None
        if (
            batch
            and (len(batch) + 1) * lengths[batch[0]] <= max_tokens
            and (batch_size is None or len(batch) < batch_size)
        ):
            batch.append(i)
        else:
            batches.append([i])
    return batches


def state_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of every parameter and buffer of `model`: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


class PairScorer:
    """Batched single-order scoring of ordered pairs with one `PairRMModel` (a `PairBackend` with PairRM's template).

    Args:
        model: the encoder + head, already on `device`.
        tokenizer: the text tokenizer (no prefix tokens; see `tokenization`).
        layout: token ids and length budgets of a pair.
        dtype: compute dtype: float32, or bfloat16/float16 through autocast.
        max_tokens: padded tokens per batch (batch rows x longest pair); default by device.
    """

    template = "pairrm"

    def __init__(
        self,
        model: PairRMModel,
        tokenizer: Tokenizer,
        layout: PairLayout,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        max_tokens: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.layout = layout
        self.device = device
        self.dtype = dtype
        self.max_tokens = max_tokens or default_max_tokens(device)
        self._identity: dict | None = None
        self._identity_key: tuple = ()

    def identity(self) -> dict:
        """What changes this scorer's numbers: a digest of every weight, the dtype, the layout and the tokenizer.

        The digest is recomputed only when a weight tensor was replaced or changed in place (its version counter).
        """
        key = tuple((t.data_ptr(), t._version) for t in self.model.state_dict().values())
        if self._identity is None or key != self._identity_key:
            self._identity_key = key
            self._identity = {
                "backend": "pairrm-encoder",
                "weights": state_digest(self.model),
                "tokenizer": hashlib.sha256(self.tokenizer.to_str().encode()).hexdigest()[:16],
                "layout": dataclasses.asdict(self.layout),
            }
        return {**self._identity, "dtype": str(self.dtype).removeprefix("torch.")}

    # ---- tokenization -------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, list[int]]:
        """Token ids (no special tokens) of each distinct text, tokenized once, in one parallel call."""
        distinct = list(dict.fromkeys(texts))
        encodings = self.tokenizer.encode_batch(distinct, add_special_tokens=False)
        return {text: enc.ids for text, enc in zip(distinct, encodings)}

    def build(self, triples: Sequence[Triple]) -> list[tuple[list[int], tuple[int, int, int]]]:
        """Input ids and prefix positions of each triple (no padding)."""
        ids = self.tokenize([text for triple in triples for text in triple])
        return [self.layout.pair(ids[s], ids[a], ids[b]) for s, a, b in triples]

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        """Fraction of triples in which some text is cut to fit PairRM's length budgets."""
        if not triples:
            return 0.0
        ids = self.tokenize([text for triple in triples for text in triple])
        return sum(self.layout.is_truncated(ids[s], ids[a], ids[b]) for s, a, b in triples) / len(triples)

    def token_counts(self, texts: Sequence[str], chunk: int = 256) -> dict[str, int]:
        """Tokens (no special tokens) of each distinct text, counted in chunks without keeping any token list."""
        distinct = list(dict.fromkeys(texts))
        counts: dict[str, int] = {}
        for start in range(0, len(distinct), chunk):
            part = distinct[start : start + chunk]
            counts.update(zip(part, map(len, self.tokenizer.encode_batch(part, add_special_tokens=False))))
        return counts

    def pair_lengths(self, triples: Sequence[Triple]) -> list[int]:
        """Tokens of each triple's forward input after truncation: each distinct text is counted once and no pair's
        token list is built, so checking a request's work costs memory in its distinct texts only."""
        counts = self.token_counts([text for triple in triples for text in triple])
        return [self.layout.pair_length(counts[s], counts[a], counts[b]) for s, a, b in triples]

    def reference_probability(
        self, triples: Sequence[Triple], temperature: float, *, batch_size: int | None = None
    ) -> None:
        """None: PairRM's probability is the default sigmoid((f(x,A,B) - f(x,B,A)) / (2 T))."""
        return None

    # ---- scoring ------------------------------------------------------------------------------------
    def score(
        self,
        triples: Sequence[Triple],
        *,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """f(x, A, B) for each ordered triple, in the caller's order (float32 array).

        `batch_size` caps the rows of one forward (the token budget always applies). The progress bar
        defaults to `core.progress.progress_enabled` (more than one batch, and a terminal or INFO logging).
        """
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r:.40}")
        if not triples:
            return np.zeros(0, dtype=np.float32)
        pairs, slot = self.distinct_inputs(triples)
        batches = plan_batches([len(ids) for ids, _ in pairs], self.max_tokens, batch_size)
        show_progress_bar = progress_enabled(show_progress_bar, len(batches), logger)
        results = np.empty(len(pairs), dtype=np.float32)
        # One autocast context around all batches: weights are cast to the compute dtype once per call.
        with (
            self._autocast(self.dtype),
            tqdm(total=len(pairs), unit="pair", desc="PairRM", disable=not show_progress_bar) as bar,
        ):
            for batch in batches:
                results[batch] = self.forward([pairs[i] for i in batch])
                bar.update(len(batch))
        return results[slot]

    def distinct_inputs(self, triples: Sequence[Triple]) -> tuple[list[tuple[list[int], tuple]], list[int]]:
        """The distinct model inputs (ids, prefix positions) of `triples`, and which one each triple is.

        Deduplicated by the built ids, not the text: texts the tokenizer maps to the same ids (a double space,
        a zero-width space) are the same input, get one forward and one value, so f(x,A,B) - f(x,B,A) is
        exactly 0 when ids(A) == ids(B), whatever batch either order would have landed in.
        """
        distinct = list(dict.fromkeys(triples))
        pairs: list[tuple[list[int], tuple]] = []
        slot_of_input: dict[tuple, int] = {}
        slot_of_triple: dict[Triple, int] = {}
        for triple, (ids, positions) in zip(distinct, self.build(distinct)):
            key = (tuple(ids), positions)
            if key not in slot_of_input:
                slot_of_input[key] = len(pairs)
                pairs.append((ids, positions))
            slot_of_triple[triple] = slot_of_input[key]
        return pairs, [slot_of_triple[t] for t in triples]

    def forward(self, pairs: Sequence[tuple[list[int], tuple]]) -> np.ndarray:
        """Run one padded batch; on CUDA out-of-memory, split it in halves and retry each."""
        try:
            return self._forward(pairs)
        except torch.OutOfMemoryError:
            if len(pairs) == 1:
                raise
            logger.warning("CUDA out of memory on a batch of %d pairs; splitting it and retrying", len(pairs))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.max_tokens = max(self.max_tokens // 2, 1)
            half = len(pairs) // 2
            return np.concatenate([self.forward(pairs[:half]), self.forward(pairs[half:])])

    def _forward(self, pairs: Sequence[tuple[list[int], tuple]]) -> np.ndarray:
        logits = self._run(pairs, self.dtype)
        if not np.isfinite(logits).all():
            if self.dtype == torch.float32:
                raise FloatingPointError(f"PairRM produced non-finite logits in float32 for {len(pairs)} pairs")
            logger.warning(
                "non-finite logits in %s (overflow); recomputing %d pairs in float32", self.dtype, len(pairs)
            )
            logits = self._run(pairs, torch.float32)
            if not np.isfinite(logits).all():
                raise FloatingPointError(f"PairRM produced non-finite logits in float32 for {len(pairs)} pairs")
        return logits

    def _autocast(self, dtype: torch.dtype) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _run(self, pairs: Sequence[tuple[list[int], tuple]], dtype: torch.dtype) -> np.ndarray:
        longest = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), longest), self.layout.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), longest), dtype=torch.long)
        for row, (ids, _) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        positions = torch.tensor([pos for _, pos in pairs], dtype=torch.long)
        with torch.no_grad(), self._autocast(dtype):
            logits = self.model(
                input_ids.to(self.device, non_blocking=True),
                mask.to(self.device, non_blocking=True),
                positions.to(self.device, non_blocking=True),
            )
        return logits.cpu().numpy()
