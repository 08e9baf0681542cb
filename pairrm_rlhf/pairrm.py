"""`PairRM`: load a checkpoint and score with the method names and semantics of llm-blender's `Blender`.

All methods return numpy arrays, like the reference, and go through one `PairScorer`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import detect_backend
from .backends.better_pairrm import TemplatedScorer
from .backends.rlhflow import load_rlhflow
from .core import aggregation, assets
from .core.backend import PairBackend, Triple
from .core.engine import PairScorer, default_device
from .core.formats import (
    CONVERSATION_INSTRUCTION,
    check_lengths,
    check_texts,
    conversation_triples,
    pairrm_candidate,
    pairrm_source,
    render_conversations,
)
from .core.generation import sample_responses
from .core.loading import load_checkpoint

logger = logging.getLogger(__name__)

def check_candidates(name: str, candidates: Any, n_inputs: int, same_count: bool = True) -> list[list[str]]:
    """Each input's list of candidate strings, or an error naming `name[i]`."""
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(f"{name} must be a list of lists of strings, got {type(candidates).__name__}")
    if len(candidates) != n_inputs:
        raise ValueError(f"{name} has {len(candidates)} items but inputs has {n_inputs}")
    checked = [check_texts(f"{name}[{i}]", c) for i, c in enumerate(candidates)]
    for i, c in enumerate(checked):
        if not c:
            raise ValueError(f"{name}[{i}] is empty: each input needs at least one candidate")
        if same_count and len(c) != len(checked[0]):
            raise ValueError(f"{name}[{i}] has {len(c)} candidates but {name}[0] has {len(checked[0])}")
    return checked


REF_MODES = ("longest", "shortest", "median_length", "first", "last")
TOURNAMENTS = ("round_robin", "knockout")


class PairRM:
    """PairRM pairwise reward model: `from_pretrained`, then `compare`, `rank`, `rank_with_ref`, ...

    f(x, A, B) > 0 means A is better than B for prompt x. The model is not antisymmetric (slot bias), so the
    default comparison uses both orders: f(x, A, B) - f(x, B, A).
    """

    def __init__(self, backend: PairBackend, kind: str = "hf", template: str | None = None):
        self.backend = backend
        self.kind = kind
        self.template = template or getattr(backend, "template", "pairrm")

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        base_model: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_tokens: int | None = None,
        template: str | None = None,
        backend: str | None = None,
        max_length: int = 8192,
        swap_average: bool = True,
    ) -> "PairRM":
        """Load any of the three judges: `llm-blender/PairRM(-hf)`, `maywell/Better-PairRM`,
        `RLHFlow/pair-preference-model-LLaMA3-8B`, or a local directory of one of them.

        Args:
            base_model: blender layout only: the base encoder (hub id or local directory) whose config and
                tokenizer are read, overriding the checkpoint's `model_name`.
            device: default this process's CUDA device (`LOCAL_RANK` under a launcher) when available, else CPU.
            dtype: compute dtype; default float32 on CPU and bfloat16 (autocast) on CUDA. `float16` is the
                reference's GPU mode.
            max_tokens: padded tokens per batch; default 8192 on CPU, 65536 on CUDA.
            template: encoder checkpoints: `pairrm` or `better-pairrm` (default: from the name, see
                `loading.detect_template`).
            backend: `pairrm` (encoder checkpoints) or `rlhflow` (the causal-LM judge); default from the name.
            max_length, swap_average: RLHFlow only (see `backends.RLHFlowScorer`).
        """
        device = torch.device(device or default_device())
        dtype = resolve_dtype(dtype, device)
        backend = backend or ("rlhflow" if template == "rlhflow" else detect_backend(str(name_or_path)))
        if backend == "rlhflow":
            scorer = load_rlhflow(
                str(name_or_path), device=device, dtype=dtype, max_length=max_length, max_tokens=max_tokens,
                swap_average=swap_average,
            )
            return cls(scorer, "causal-lm", "rlhflow")
        if backend != "pairrm":
            raise ValueError(f"backend must be 'pairrm' or 'rlhflow', got {backend!r}")
        checkpoint = load_checkpoint(name_or_path, base_model=base_model, template=template)
        model = checkpoint.model.to(device)
        scorer = PairScorer(model, checkpoint.tokenizer, checkpoint.layout, device=device, dtype=dtype, max_tokens=max_tokens)
        if checkpoint.template != "pairrm":
            scorer = TemplatedScorer(scorer, checkpoint.template)
        return cls(scorer, checkpoint.kind, checkpoint.template)

    @property
    def device(self) -> torch.device:
        return self.backend.device

    # ---- the building blocks ------------------------------------------------------------------------
    def _sources(self, inputs: list[str], instructions: Sequence[str] | None) -> list[str]:
        if instructions is None:
            return [pairrm_source(x, None) for x in inputs]
        instructions = check_texts("instructions", instructions)
        check_lengths(inputs=inputs, instructions=instructions)
        return [pairrm_source(x, ins) for x, ins in zip(inputs, instructions)]

    def pair_logits(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """Single-order f(x, A, B) for ordered triples of already-prepared text."""
        return self.backend.score(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)

    def two_order_logits(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """f(x, A, B) - f(x, B, A) for each triple; exactly 0 without any forward when A == B."""
        out = np.zeros(len(triples), dtype=np.float32)
        todo = [i for i, (_, a, b) in enumerate(triples) if a != b]
        both = [triples[i] for i in todo] + [(s, b, a) for s, a, b in (triples[i] for i in todo)]
        logits = self.pair_logits(both, batch_size=batch_size, show_progress_bar=show_progress_bar)
        out[todo] = logits[: len(todo)] - logits[len(todo) :]
        return out

    def mode_logits(
        self, triples: Sequence[Triple], mode: str, *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """`compare`'s modes: "[A,B]+[B,A]" two-order logits, "[A,B]" f(x,A,B), "[B,A]" f(x,B,A)."""
        if mode == "[A,B]+[B,A]":
            return self.two_order_logits(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)
        if mode in ("[A,B]", "[B,A]"):
            order = triples if mode == "[A,B]" else [(s, b, a) for s, a, b in triples]
            return self.pair_logits(order, batch_size=batch_size, show_progress_bar=show_progress_bar)
        raise ValueError(f"mode must be '[A,B]+[B,A]', '[A,B]' or '[B,A]', got {mode!r:.40}")

    def pairwise_matrices(
        self, sources: list[str], candidates: list[list[str]], *, batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[np.ndarray]:
        """For each source, M[i, j] = f(x, c_i, c_j) for i != j and 0 on the diagonal."""
        triples, where = [], []
        for k, (source, cands) in enumerate(zip(sources, candidates)):
            for i, ci in enumerate(cands):
                for j, cj in enumerate(cands):
                    if i != j:
                        triples.append((source, ci, cj))
                        where.append((k, i, j))
        logits = self.pair_logits(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)
        matrices = [np.zeros((len(c), len(c)), dtype=np.float32) for c in candidates]
        for (k, i, j), value in zip(where, logits):
            matrices[k][i, j] = value
        return matrices

    def knockout_scores(
        self, sources: list[str], candidates: list[list[str]], *, batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Rounds survived by each candidate in a knockout bracket (N-1 matches per source; one engine call per round).

        Each round pairs the surviving candidates in order (1st vs 2nd, 3rd vs 4th, ...; an odd last one advances
        without a match); the two-order logit decides, ties going to the earlier candidate.
        """
        wins = np.zeros((len(sources), len(candidates[0])), dtype=np.float32)
        alive = [list(range(len(c))) for c in candidates]
        while any(len(a) > 1 for a in alive):
            triples, matches = [], []
            for k, survivors in enumerate(alive):
                for m in range(0, len(survivors) - 1, 2):
                    i, j = survivors[m], survivors[m + 1]
                    triples.append((sources[k], candidates[k][i], candidates[k][j]))
                    matches.append((k, i, j))
            z = self.two_order_logits(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)
            losers = {(k, j if value >= 0 else i) for (k, i, j), value in zip(matches, z)}
            alive = [[i for i in survivors if (k, i) not in losers] if len(survivors) > 1 else survivors
                     for k, survivors in enumerate(alive)]
            for k, survivors in enumerate(alive):
                if len(candidates[k]) > 1 and (len(survivors) > 1 or any(m[0] == k for m in matches)):
                    wins[k, survivors] += 1
        return wins

    # ---- llm-blender compatible API -----------------------------------------------------------------
    def compare(
        self,
        inputs: Sequence[str],
        candidates_A: Sequence[str],
        candidates_B: Sequence[str],
        instructions: Sequence[str] | None = None,
        batch_size: int | None = None,
        return_logits: bool = False,
        mode: str = "[A,B]+[B,A]",
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Is A better than B? Booleans, or logits with `return_logits=True` (> 0 means A is better).

        `mode="[A,B]+[B,A]"` (default) gives f(x,A,B) - f(x,B,A); `"[A,B]"` gives f(x,A,B); `"[B,A]"` f(x,B,A).
        """
        inputs = check_texts("inputs", inputs)
        candidates_A = check_texts("candidates_A", candidates_A)
        candidates_B = check_texts("candidates_B", candidates_B)
        check_lengths(inputs=inputs, candidates_A=candidates_A, candidates_B=candidates_B)
        sources = self._sources(inputs, instructions)
        triples = [(s, pairrm_candidate(a), pairrm_candidate(b)) for s, a, b in zip(sources, candidates_A, candidates_B)]
        logits = self.mode_logits(triples, mode, batch_size=batch_size, show_progress_bar=show_progress_bar)
        return logits if return_logits else logits > 0

    def probability(
        self,
        inputs: Sequence[str],
        candidates_A: Sequence[str],
        candidates_B: Sequence[str],
        temperature: float = 1.0,
        instructions: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Calibrated P(A > B | x) = sigmoid((f(x,A,B) - f(x,B,A)) / (2 T)).

        At T=1 this is the sigmoid of the mean of the two orders' log-odds. TRL's former soft PairRMJudge
        returned sigmoid(f(x,A,B) - f(x,B,A)), which is this at T=0.5.
        """
        logits = self.compare(inputs, candidates_A, candidates_B, instructions, batch_size, return_logits=True)
        return aggregation.probability(logits, temperature)

    def rank(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        return_scores: bool = False,
        batch_size: int | None = None,
        show_progress_bar: bool | None = None,
        tournament: str = "round_robin",
    ) -> np.ndarray:
        """Rank each input's candidates: 1-based ranks (1 = best), or scores.

        `round_robin` (default): score_i = (1/N) sum_j (f(x,c_i,c_j) - f(x,c_j,c_i)), as the reference; equal scores
        share a rank. `knockout`: a single-elimination bracket of N-1 two-order matches (RLHFlow's recommendation
        for n > 2); score = matches won, so the winner ranks 1 and candidates out in the same round share a rank.
        """
        if tournament not in TOURNAMENTS:
            raise ValueError(f"tournament must be one of {TOURNAMENTS}, got {tournament!r}")
        inputs = check_texts("inputs", inputs)
        candidates = check_candidates("candidates", candidates, len(inputs))
        sources = self._sources(inputs, instructions)
        if tournament == "knockout":
            scores = self.knockout_scores(
                sources, [[pairrm_candidate(c) for c in cands] for cands in candidates],
                batch_size=batch_size, show_progress_bar=show_progress_bar,
            )
            return scores if return_scores else aggregation.ranks_from_scores(scores)
        matrices = self.pairwise_matrices(
            sources, [[pairrm_candidate(c) for c in cands] for cands in candidates],
            batch_size=batch_size, show_progress_bar=show_progress_bar,
        )
        scores = np.stack([aggregation.round_robin_scores(m) for m in matrices]) if matrices else np.zeros((0, 0), np.float32)
        return scores if return_scores else aggregation.ranks_from_scores(scores)

    def rank_with_ref(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        return_scores: bool = False,
        batch_size: int | None = None,
        ref_mode: str = "longest",
        ref_candidates: Sequence[str] | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Score each candidate against one reference: f(x,c,ref) - f(x,ref,c) (ranks unless return_scores).

        The reference is `ref_candidates[i]` when given, else picked from the candidates by character length:
        `longest` (first on ties), `shortest`, `median_length` (sorted[N//2]), `first` or `last`. A candidate
        equal to its reference scores exactly 0.
        """
        inputs = check_texts("inputs", inputs)
        candidates = check_candidates("candidates", candidates, len(inputs))
        if ref_candidates is None:
            refs = [pick_reference(c, ref_mode) for c in candidates]
        else:
            refs = check_texts("ref_candidates", ref_candidates)
            check_lengths(inputs=inputs, ref_candidates=refs)
        sources = self._sources(inputs, instructions)
        triples = [
            (s, pairrm_candidate(c), pairrm_candidate(ref)) for s, cands, ref in zip(sources, candidates, refs) for c in cands
        ]
        flat = self.two_order_logits(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)
        scores = flat.reshape(len(inputs), len(candidates[0]) if candidates else 0)
        return scores if return_scores else aggregation.ranks_from_scores(scores)

    def compare_conversations(
        self,
        conversations_a: Sequence[Sequence[dict]],
        conversations_b: Sequence[Sequence[dict]],
        batch_size: int | None = None,
        return_logits: bool = False,
        mode: str = "[A,B]+[B,A]",
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """Compare two multi-turn conversations with the same USER turns (roles USER/ASSISTANT, any case).

        Rendered as the reference does: the source is the fixed instruction followed by
        `USER: {u}\\nAssistant: <Response k>` lines; each candidate is `<Response k>: {a}` lines.
        """
        inputs, cands_a, cands_b = render_conversations(conversations_a, conversations_b)
        if self.template != "pairrm":  # other judges see the shared history as context and the last answers
            triples = conversation_triples(conversations_a, conversations_b)
            logits = self.mode_logits(triples, mode, batch_size=batch_size, show_progress_bar=show_progress_bar)
            return logits if return_logits else logits > 0
        instructions = [CONVERSATION_INSTRUCTION] * len(inputs)
        return self.compare(inputs, cands_a, cands_b, instructions, batch_size, return_logits, mode, show_progress_bar)

    def best_of_n(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> list[str]:
        """The best candidate of each input by full ranking (the first one among equal best scores)."""
        scores = self.rank(inputs, candidates, instructions, return_scores=True, batch_size=batch_size)
        return [cands[int(np.argmax(row))] for cands, row in zip(candidates, scores)]

    def best_of_n_generate(
        self,
        model: Any,
        tokenizer: Any,
        prompts: Sequence[str],
        n: int = 5,
        instructions: Sequence[str] | None = None,
        batch_size: int | None = None,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Sample `n` responses per prompt from a causal LM and return the best of each by full ranking.

        `generate_kwargs` go to `model.generate` (default `do_sample=True`, `max_new_tokens=128`).
        """
        prompts = check_texts("prompts", prompts)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        samples = sample_responses(model, tokenizer, prompts, n, **generate_kwargs)
        return self.best_of_n(prompts, samples, instructions, batch_size)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    resolved = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def pick_reference(candidates: list[str], mode: str) -> str:
    if mode == "longest":
        return max(candidates, key=len)
    if mode == "shortest":
        return min(candidates, key=len)
    if mode == "median_length":
        return sorted(candidates, key=len)[len(candidates) // 2]
    if mode == "first":
        return candidates[0]
    if mode == "last":
        return candidates[-1]
    raise ValueError(f"ref_mode must be one of {REF_MODES}, got {mode!r}")


# ---- lazy model ---------------------------------------------------------------------------------------
class LazyPairRM:
    """A `PairRM`, or where to load one from on first use (no model load, no CUDA init before that).

    Args:
        model: a loaded `PairRM`, or a checkpoint id or path (`tiny`: the bundled one).
        device, dtype, base_model, **load_kwargs: passed to `PairRM.from_pretrained` (e.g. `template`, `backend`,
            `max_tokens`). With no `device`, the model goes to this process's CUDA device when CUDA is available
            (one per process under `accelerate launch`/`torchrun`), else to the CPU.
    """

    def __init__(
        self,
        model: PairRM | str | os.PathLike = assets.DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
        **load_kwargs: Any,
    ):
        self.load_kwargs = {k: v for k, v in dict(load_kwargs, dtype=dtype, base_model=base_model).items() if v is not None}
        if isinstance(model, PairRM):
            if device is not None or self.load_kwargs:
                raise ValueError("loading options (device, dtype, ...) apply only when model is a checkpoint id or path")
        elif not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a PairRM or a checkpoint id/path, got {type(model).__name__}")
        self._model = model if isinstance(model, PairRM) else None
        self.source = model if self._model is None else None
        self.device = device
        self._lock = threading.Lock()

    @classmethod
    def wrap(cls, model: "LazyPairRM | PairRM | str | os.PathLike", **kwargs: Any) -> "LazyPairRM":
        """`model` itself when it is already a `LazyPairRM` (to share one model), else a new one."""
        if isinstance(model, LazyPairRM):
            if any(v is not None for v in kwargs.values()):
                raise ValueError("loading options (device, dtype, ...) apply only when model is a checkpoint id or path")
            return model
        return cls(model, **kwargs)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> PairRM:
        """The model, loaded on the first call (thread-safe)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    device = self.device if self.device is not None else default_device()
                    logger.info("Loading PairRM from %s on %s", self.source, device)
                    self._model = PairRM.from_pretrained(os.fspath(self.source), device=device, **self.load_kwargs)
        return self._model
