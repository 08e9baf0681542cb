"""`PairRM`: load a judge and score with the method names and semantics of llm-blender's `Blender`.

All methods return numpy arrays, like the reference, and go through one `PairBackend`. The best-of-n methods are in
`best_of_n` (a mixin); which judge a checkpoint is, and how it loads, is `backends.registry`'s.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends.registry import find_judge
from .best_of_n import BestOfN
from .core import aggregation, assets
from .core.backend import LoadOptions, PairBackend, Triple, check_backend
from .core.engine import default_device
from .core.formats import (
    CONVERSATION_INSTRUCTION,
    check_candidates,
    check_lengths,
    check_texts,
    conversation_sides,
    conversation_triples,
    conversation_turns,
    pairrm_candidate,
    pairrm_source,
    render_conversations,
)
from .core.settings import check_choice, resolve_dtype

__all__ = ["PairRM", "LazyPairRM", "check_candidates", "pick_reference", "resolve_dtype"]

logger = logging.getLogger(__name__)

REF_MODES = ("longest", "shortest", "median_length", "first", "last")
TOURNAMENTS = ("round_robin", "knockout")


class PairRM(BestOfN):
    """PairRM pairwise reward model: `from_pretrained`, then `compare`, `rank`, `rank_with_ref`, ...

    f(x, A, B) > 0 means A is better than B for prompt x. The model is not antisymmetric (slot bias), so the
    default comparison uses both orders: f(x, A, B) - f(x, B, A).

    Args:
        backend: any `PairBackend`; its `template` decides how prompts and conversations are rendered.
        kind: a short name of the checkpoint's layout, for messages (`hf`, `blender`, `causal-lm`, ...).
        template: deprecated: the template is the backend's (`backend.template`). Given, it must equal it.
    """

    def __init__(self, backend: PairBackend, kind: str = "hf", template: str | None = None):
        self.backend = check_backend(backend)
        self.kind = kind
        if template is not None:
            if template != backend.template:
                raise ValueError(f"template={template!r} disagrees with the backend's template {backend.template!r}; "
                                 "the backend decides how text is rendered (omit template=)")
            warnings.warn("PairRM(template=...) is deprecated: the template is the backend's (backend.template)",
                          DeprecationWarning, stacklevel=2)

    @property
    def template(self) -> str:
        """How prompts and conversations are rendered for this judge: the backend's `template`."""
        return self.backend.template

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        judge: str | None = None,
        base_model: str | Path | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_tokens: int | None = None,
        max_length: int | None = None,
        swap_average: bool = True,
        template: str | None = None,
        backend: str | None = None,
    ) -> PairRM:
        """Load a judge of the registry (`backends.registry.JUDGES`): `llm-blender/PairRM(-hf)`,
        `maywell/Better-PairRM`, `RLHFlow/pair-preference-model-LLaMA3-8B`, a local directory of one of them, or
        any registered judge.

        Args:
            judge: the registry's name (`pairrm`, `better-pairrm`, `rlhflow`, ...); default from the name
                (`backends.registry.find_judge`).
            base_model: blender layout only: the base encoder (hub id or local directory) whose config and
                tokenizer are read, overriding the checkpoint's `model_name`.
            device: default this process's CUDA device (`LOCAL_RANK` under a launcher) when available, else CPU.
            dtype: compute dtype (`core.settings.DTYPE_NAMES`); default float32 on CPU and bfloat16 (autocast) on
                CUDA. `float16` is the reference's GPU mode.
            max_tokens: padded tokens per batch; default `core.settings.default_max_tokens` (CPU 8192, CUDA 65536).
            max_length, swap_average: RLHFlow only (see `backends.rlhflow.RLHFlowScorer`).
            template, backend: deprecated names of `judge` (they were two overlapping ways to pick it).
        """
        judge = _judge_name(name_or_path, judge, template, backend)
        entry = find_judge(name_or_path, judge, where="template" if template else "judge")
        device = torch.device(device or default_device())
        options = LoadOptions(
            device=device, dtype=resolve_dtype(dtype, device), max_tokens=max_tokens, base_model=base_model,
            max_length=max_length, swap_average=swap_average,
        )
        scorer, kind = entry.load(str(name_or_path), options)
        return cls(scorer, kind)

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
        return self.mode_logits(triples, "[A,B]+[B,A]", batch_size=batch_size, show_progress_bar=show_progress_bar)

    def mode_logits(
        self, triples: Sequence[Triple], mode: str, *, batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """`compare`'s modes: "[A,B]+[B,A]" two-order logits, "[A,B]" f(x,A,B), "[B,A]" f(x,B,A)."""
        sides = [(s, s, a, b) for s, a, b in triples]  # one source for both orders
        return self.sided_logits(sides, mode, batch_size=batch_size, show_progress_bar=show_progress_bar)

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
        wins = np.zeros((len(sources), len(candidates[0]) if candidates else 0), dtype=np.float32)
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
        triples = _prepared(sources, candidates_A, candidates_B)
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

        At T=1 this is the sigmoid of the mean of the two orders' log-odds. TRL's former soft `PairRMJudge` (and
        our `PairRMJudge(return_scores=True)`) returns sigmoid(z / T) with z = f(x,A,B) - f(x,B,A): this at T/2.
        A backend with its own reference probability (RLHFlow: temperature applied to each order's logits, then
        the two orders' probabilities averaged) computes it itself (`backend.reference_probability`).
        """
        inputs = check_texts("inputs", inputs)
        candidates_A = check_texts("candidates_A", candidates_A)
        candidates_B = check_texts("candidates_B", candidates_B)
        check_lengths(inputs=inputs, candidates_A=candidates_A, candidates_B=candidates_B)
        sources = self._sources(inputs, instructions)
        triples = _prepared(sources, candidates_A, candidates_B)
        return self.triple_probability(triples, temperature, batch_size=batch_size)

    def triple_probability(
        self, triples: Sequence[Triple], temperature: float = 1.0, *, batch_size: int | None = None
    ) -> np.ndarray:
        """`probability` for prepared (source, A, B) triples: the backend's own reference probability when it
        defines one (`reference_probability`; RLHFlow: per-order temperature, then the average), else
        sigmoid(z / (2 T))."""
        aggregation.probability(np.zeros(0), temperature)  # validates the temperature
        own = self.backend.reference_probability(triples, temperature, batch_size=batch_size)
        if own is not None:
            return np.asarray(own, dtype=np.float32)
        return aggregation.probability(self.two_order_logits(triples, batch_size=batch_size), temperature)

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
        if not matrices:
            scores = np.zeros((0, 0), np.float32)
        else:
            scores = np.stack([aggregation.round_robin_scores(m) for m in matrices])
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
            (s, pairrm_candidate(c), pairrm_candidate(ref))
            for s, cands, ref in zip(sources, candidates, refs)
            for c in cands
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

        PairRM (llm-blender's `compare_conversations`): the source is the fixed instruction followed by
        `USER: {u}\\nAssistant: <Response k>` lines; each candidate is `<Response k>: {a}` lines, so the two
        conversations' earlier answers may differ. Better-PairRM (reward-bench's `betterpairrm.py`): each order's
        source is its first candidate's own history, f(x_A, A, B) - f(x_B, B, A), so earlier answers may differ too.
        RLHFlow: the histories must be identical (its training pairs share one context).
        """
        inputs, cands_a, cands_b = render_conversations(conversations_a, conversations_b)
        if self.template == "better-pairrm":
            sides = [
                conversation_sides(
                    conversation_turns(f"conversations_a[{k}]", a), conversation_turns(f"conversations_b[{k}]", b)
                )
                for k, (a, b) in enumerate(zip(conversations_a, conversations_b))
            ]
            logits = self.sided_logits(sides, mode, batch_size=batch_size, show_progress_bar=show_progress_bar)
            return logits if return_logits else logits > 0
        if self.template != "pairrm":
            triples = conversation_triples(conversations_a, conversations_b)
            logits = self.mode_logits(triples, mode, batch_size=batch_size, show_progress_bar=show_progress_bar)
            return logits if return_logits else logits > 0
        instructions = [CONVERSATION_INSTRUCTION] * len(inputs)
        return self.compare(inputs, cands_a, cands_b, instructions, batch_size, return_logits, mode, show_progress_bar)

    def sided_logits(
        self, sides: Sequence[tuple[str, str, str, str]], mode: str, *, batch_size: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> np.ndarray:
        """`compare`'s modes when each order has its own source: for (x_A, x_B, A, B), "[A,B]+[B,A]" gives
        f(x_A, A, B) - f(x_B, B, A), "[A,B]" f(x_A, A, B), "[B,A]" f(x_B, B, A); exactly 0 when both sides agree."""
        ab = [(xa, a, b) for xa, _, a, b in sides]
        ba = [(xb, b, a) for _, xb, a, b in sides]
        if mode in ("[A,B]", "[B,A]"):
            one_order = ab if mode == "[A,B]" else ba
            return self.pair_logits(one_order, batch_size=batch_size, show_progress_bar=show_progress_bar)
        if mode != "[A,B]+[B,A]":
            raise ValueError(f"mode must be '[A,B]+[B,A]', '[A,B]' or '[B,A]', got {mode!r:.40}")
        out = np.zeros(len(sides), dtype=np.float32)
        todo = [i for i, (xa, xb, a, b) in enumerate(sides) if (xa, a) != (xb, b)]
        logits = self.pair_logits([ab[i] for i in todo] + [ba[i] for i in todo], batch_size=batch_size,
                                  show_progress_bar=show_progress_bar)
        out[todo] = logits[: len(todo)] - logits[len(todo) :]
        return out

def _judge_name(name_or_path: str | Path, judge: str | None, template: str | None, backend: str | None) -> str | None:
    """`judge`, or the judge the deprecated `template=` / `backend=` named before the registry: `backend="rlhflow"`
    or `template="rlhflow"` -> rlhflow; another template -> that encoder judge; `backend="pairrm"` -> the encoder
    judge the name implies."""
    if template is None and backend is None:
        return judge
    old = " and ".join(name for name, value in (("template", template), ("backend", backend)) if value is not None)
    warnings.warn(f"{old}= is deprecated: pass judge= (a name of backends.registry.JUDGES)", DeprecationWarning,
                  stacklevel=3)
    if judge is not None:
        raise ValueError(f"pass judge= alone: {old}= is its deprecated alias")
    if backend is not None and check_choice("backend", backend, ("pairrm", "rlhflow")) == "rlhflow":
        return "rlhflow"
    if template is not None:
        return template
    return "better-pairrm" if find_judge(name_or_path).name == "better-pairrm" else "pairrm"


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


def _prepared(sources: list[str], candidates_a: list[str], candidates_b: list[str]) -> list[Triple]:
    """(source, A, B) triples of PairRM's prepared text."""
    return [(s, pairrm_candidate(a), pairrm_candidate(b)) for s, a, b in zip(sources, candidates_a, candidates_b)]


# ---- lazy model ---------------------------------------------------------------------------------------
LOADING_OPTIONS_ONLY = "loading options (device, dtype, ...) apply only when model is a checkpoint id or path"


class LazyPairRM:
    """A `PairRM`, or where to load one from on first use (no model load, no CUDA init before that).

    Args:
        model: a loaded `PairRM`, or a checkpoint id or path (`tiny`: the bundled one).
        device, dtype, base_model, **load_kwargs: passed to `PairRM.from_pretrained` (e.g. `judge`,
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
        options = dict(load_kwargs, dtype=dtype, base_model=base_model)
        self.load_kwargs = {k: v for k, v in options.items() if v is not None}
        if isinstance(model, PairRM):
            if device is not None or self.load_kwargs:
                raise ValueError(LOADING_OPTIONS_ONLY)
        elif not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a PairRM or a checkpoint id/path, got {type(model).__name__}")
        self._model = model if isinstance(model, PairRM) else None
        self.source = model if self._model is None else None
        self.device = device
        self._lock = threading.Lock()

    @classmethod
    def wrap(cls, model: LazyPairRM | PairRM | str | os.PathLike, **kwargs: Any) -> LazyPairRM:
        """`model` itself when it is already a `LazyPairRM` (to share one model), else a new one."""
        if isinstance(model, LazyPairRM):
            if any(v is not None for v in kwargs.values()):
                raise ValueError(LOADING_OPTIONS_ONLY)
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
