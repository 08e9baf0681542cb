"""`PairRM`: load a checkpoint and score with the method names and semantics of llm-blender's `Blender`.

All methods return numpy arrays, like the reference, and go through one `PairScorer`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import detect_backend
from .backends.better_pairrm import BetterPairRMScorer
from .backends.rlhflow import load_rlhflow
from .core import aggregation, assets
from .core.backend import PairBackend, Triple
from .core.engine import PairScorer, default_device
from .core.formats import (
    CONVERSATION_INSTRUCTION,
    check_lengths,
    check_texts,
    conversation_sides,
    conversation_triples,
    conversation_turns,
    pairrm_candidate,
    pairrm_source,
    render_conversations,
)
from .core.generation import SamplingArguments, sample_responses
from .core.loading import load_checkpoint, resolve

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
CMP_TYPES = ("bubble", "full")
# llm-blender's n_generate sampling modes: the fields each sets unless given (plus do_sample and temperature 0.7)
SAMPLING_MODES = {
    "top_p_sampling": lambda fields: {"top_p": fields.get("top_p", 1.0)},
    "top_k_sampling": lambda fields: {"top_k": fields.get("top_k", 50)},
}


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
            max_length, swap_average: RLHFlow only (see `backends.rlhflow.RLHFlowScorer`).
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
        if checkpoint.template == "better-pairrm":
            scorer = BetterPairRMScorer(scorer, clean_up_spaces=_clean_up_spaces(name_or_path))
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
        return self.mode_logits(triples, "[A,B]+[B,A]", batch_size=batch_size, show_progress_bar=show_progress_bar)

    def mode_logits(
        self, triples: Sequence[Triple], mode: str, *, batch_size: int | None = None, show_progress_bar: bool | None = None
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

        At T=1 this is the sigmoid of the mean of the two orders' log-odds. TRL's former soft `PairRMJudge` (and
        our `PairRMJudge(return_scores=True)`) returns sigmoid(z / T) with z = f(x,A,B) - f(x,B,A): this at T/2.
        A backend with its own reference probability (RLHFlow: temperature applied to each order's logits, then
        the two orders' probabilities averaged) computes it itself (`backend.swap_probability`).
        """
        inputs = check_texts("inputs", inputs)
        candidates_A = check_texts("candidates_A", candidates_A)
        candidates_B = check_texts("candidates_B", candidates_B)
        check_lengths(inputs=inputs, candidates_A=candidates_A, candidates_B=candidates_B)
        sources = self._sources(inputs, instructions)
        triples = [(s, pairrm_candidate(a), pairrm_candidate(b)) for s, a, b in zip(sources, candidates_A, candidates_B)]
        return self.triple_probability(triples, temperature, batch_size=batch_size)

    def triple_probability(
        self, triples: Sequence[Triple], temperature: float = 1.0, *, batch_size: int | None = None
    ) -> np.ndarray:
        """`probability` for prepared (source, A, B) triples: the backend's own reference probability when it has
        one (`swap_probability`; RLHFlow: per-order temperature, then the average), else sigmoid(z / (2 T))."""
        aggregation.probability(np.zeros(0), temperature)  # validates the temperature
        own = getattr(self.backend, "swap_probability", None)
        if own is not None:
            return own(triples, temperature, batch_size=batch_size).astype(np.float32)
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

        PairRM (llm-blender's `compare_conversations`): the source is the fixed instruction followed by
        `USER: {u}\\nAssistant: <Response k>` lines; each candidate is `<Response k>: {a}` lines, so the two
        conversations' earlier answers may differ. Better-PairRM (reward-bench's `betterpairrm.py`): each order's
        source is its first candidate's own history, f(x_A, A, B) - f(x_B, B, A), so earlier answers may differ too.
        RLHFlow: the histories must be identical (its training pairs share one context).
        """
        inputs, cands_a, cands_b = render_conversations(conversations_a, conversations_b)
        if self.template == "better-pairrm":
            sides = [
                conversation_sides(conversation_turns(f"conversations_a[{k}]", a), conversation_turns(f"conversations_b[{k}]", b))
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
            return self.pair_logits(ab if mode == "[A,B]" else ba, batch_size=batch_size, show_progress_bar=show_progress_bar)
        if mode != "[A,B]+[B,A]":
            raise ValueError(f"mode must be '[A,B]+[B,A]', '[A,B]' or '[B,A]', got {mode!r:.40}")
        out = np.zeros(len(sides), dtype=np.float32)
        todo = [i for i, (xa, xb, a, b) in enumerate(sides) if (xa, a) != (xb, b)]
        logits = self.pair_logits([ab[i] for i in todo] + [ba[i] for i in todo], batch_size=batch_size,
                                  show_progress_bar=show_progress_bar)
        out[todo] = logits[: len(todo)] - logits[len(todo) :]
        return out

    # ---- best of n (llm-blender's Blender.get_best_of_n, get_worst_of_n, n_generate, best_of_n_generate) ---------
    def get_best_of_n(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        pairrm_cmp_type: str = "bubble",
        return_all: bool = False,
        batch_size: int | None = None,
        *,
        seed: int = 0,
    ) -> list[str] | list[list[str]]:
        """The best candidate of each input, or with `return_all` all candidates with the best first.

        `pairrm_cmp_type` (llm-blender's `Blender.get_best_of_n`, `llm_blender/blender/blender.py`):
        - `"bubble"` (default, as llm-blender): one bubble pass over a random order of the candidates, n - 1
          two-order matches; the winner of each match moves on (a tie goes to the later candidate). `return_all`
          lists the winner, then the losers in match order (not a full ranking). The order is drawn per input from
          `torch.randperm` seeded with `seed`, so the result is reproducible and independent of batching
          (llm-blender draws one order per batch from the global torch RNG).
        - `"full"`: our deterministic full ranking (all n(n-1) ordered pairs, `rank`'s round-robin scores); ties
          keep the candidates' order. `return_all` is the full ranking, best first.
        With one candidate per input nothing is scored.

        Args:
            inputs, candidates, instructions: as in `rank` (the same number of candidates per input).
            pairrm_cmp_type: `"bubble"` or `"full"` (above). return_all: return every candidate, best first.
            batch_size: pairs per scorer batch (default: its token budget). seed: the bubble order's seed.

        Returns:
            One string per input, or with `return_all` one list of all its candidates per input.

        Example:
            >>> pairrm.get_best_of_n(["Say hi"], [["hi!", "go away", "hello"]], pairrm_cmp_type="full")
        """
        return self._select(inputs, candidates, instructions, pairrm_cmp_type, return_all, batch_size, seed, best=True)

    def get_worst_of_n(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        pairrm_cmp_type: str = "bubble",
        return_all: bool = False,
        batch_size: int | None = None,
        *,
        seed: int = 0,
    ) -> list[str] | list[list[str]]:
        """The worst candidate of each input (`return_all`: the worst first), as `get_best_of_n` with the roles
        swapped: in a bubble match the worse one moves on (a tie sends the later one on)."""
        return self._select(inputs, candidates, instructions, pairrm_cmp_type, return_all, batch_size, seed, best=False)

    def _select(
        self, inputs: Sequence[str], candidates: Sequence[Sequence[str]], instructions: Sequence[str] | None,
        cmp_type: str, return_all: bool, batch_size: int | None, seed: int, best: bool,
    ) -> list[str] | list[list[str]]:
        if cmp_type not in CMP_TYPES:
            raise ValueError(f"pairrm_cmp_type must be one of {CMP_TYPES}, got {cmp_type!r:.40}")
        inputs = check_texts("inputs", inputs)
        candidates = check_candidates("candidates", candidates, len(inputs))
        if all(len(c) == 1 for c in candidates):
            orders = [[0] for _ in candidates]
        elif cmp_type == "full":
            ranks = self.rank(inputs, candidates, instructions, batch_size=batch_size)
            orders = np.argsort(ranks if best else -ranks, axis=1, kind="stable").tolist()
        else:
            sources = self._sources(inputs, instructions)
            prepared = [[pairrm_candidate(c) for c in cands] for cands in candidates]
            orders = self.bubble_orders(sources, prepared, best=best, seed=seed, batch_size=batch_size)
        picked = [[cands[i] for i in order] for cands, order in zip(candidates, orders)]
        return picked if return_all else [p[0] for p in picked]

    def bubble_orders(
        self, sources: list[str], candidates: list[list[str]], *, best: bool = True, seed: int = 0,
        batch_size: int | None = None,
    ) -> list[list[int]]:
        """llm-blender's single bubble pass (`PairRanker._bubble_predict`, `llm_blender/pair_ranker/ranker.py`):
        per input, a random order of the candidates (seeded); match j compares the current holder with the next
        candidate by the two-order logit z = f(x,cur,next) - f(x,next,cur); for `best`, `cur` moves on iff z > 0,
        for worst iff z < 0. Returns [winner, losers in match order] per input (n - 1 matches, one scorer call each).
        """
        generator = torch.Generator().manual_seed(int(seed))
        n = len(candidates[0])
        orders = [torch.randperm(n, generator=generator).tolist() for _ in candidates]
        holders = [order[0] for order in orders]
        losers: list[list[int]] = [[] for _ in candidates]
        for j in range(1, n):
            nexts = [order[j] for order in orders]
            triples = [(src, cands[h], cands[nx]) for src, cands, h, nx in zip(sources, candidates, holders, nexts)]
            z = self.two_order_logits(triples, batch_size=batch_size)
            for k, value in enumerate(z):
                cur_moves_on = value > 0 if best else value < 0
                loser = nexts[k] if cur_moves_on else holders[k]
                holders[k] = holders[k] if cur_moves_on else nexts[k]
                losers[k].append(loser)
        return [[h, *rest] for h, rest in zip(holders, losers)]

    def n_generate(
        self,
        model: Any,
        model_tokenizer: Any,
        inputs: Sequence[str],
        instructions: Sequence[str] | None = None,
        n: int = 5,
        sampling_mode: str | None = "top_p_sampling",
        batch_size: int = 4,
        **generate_kwargs: Any,
    ) -> list[list[str]]:
        """`n` sampled responses per input from a causal LM, as llm-blender's `Blender.n_generate`.

        The prompt is `instruction + "\\n" + input` when instructions are given, else the input (tokenized with the
        tokenizer's special tokens). `sampling_mode`: `"top_p_sampling"` (sample, `top_p` default 1.0,
        `temperature` default 0.7), `"top_k_sampling"` (sample, `top_k` default 50, `temperature` default 0.7),
        or None (only `generate_kwargs`). `generate_kwargs` are `core.generation.SamplingArguments` fields
        (`max_new_tokens`, `temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `stop`, ...); sampling
        goes through an explicit `GenerationConfig` (`core.generation`), so fields not given are neutral, not the
        checkpoint's (llm-blender under transformers also gets the checkpoint's or transformers' default
        `top_k=50` in top-p mode: pass `top_k=50` for that), and `max_new_tokens` defaults to 256 (llm-blender:
        the tokenizer's `model_max_length` as total length). Prompts are generated `batch_size` at a time; seed
        the sampling with `torch.manual_seed`.

        Args:
            model, model_tokenizer: a transformers causal LM and its tokenizer.
            inputs, instructions: prompts and optional per-prompt instructions. n: responses per prompt.

        Returns:
            `n` decoded responses (special tokens skipped) per input.

        Example:
            >>> pairrm.n_generate(policy, tokenizer, ["Tell me a joke."], n=4, max_new_tokens=64)
        """
        inputs = check_texts("inputs", inputs)
        if instructions is not None:
            instructions = check_texts("instructions", instructions)
            check_lengths(inputs=inputs, instructions=instructions)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an integer >= 1, got {n!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        fields = dict(generate_kwargs)
        if sampling_mode in SAMPLING_MODES:
            fields.update(do_sample=True, temperature=fields.get("temperature", 0.7), **SAMPLING_MODES[sampling_mode](fields))
        elif sampling_mode is not None:
            raise ValueError(f"sampling_mode must be one of {sorted(SAMPLING_MODES)} or None, got {sampling_mode!r:.40}")
        try:
            sampling = SamplingArguments(**fields)
        except TypeError as err:
            raise TypeError(f"n_generate: {err}; generate_kwargs are SamplingArguments fields "
                            f"({sorted(SamplingArguments.__dataclass_fields__)})") from None
        prompts = [f"{ins}\n{x}" for ins, x in zip(instructions, inputs)] if instructions is not None else inputs
        out: list[list[str]] = []
        for start in range(0, len(prompts), batch_size):
            out += sample_responses(model, model_tokenizer, prompts[start : start + batch_size], n, sampling=sampling)
        return out

    def best_of_n_generate(
        self,
        model: Any,
        model_tokenizer: Any,
        inputs: Sequence[str],
        instructions: Sequence[str] | None = None,
        n: int = 5,
        sampling_mode: str | None = "top_p_sampling",
        batch_size: int = 4,
        pairrm_cmp_type: str = "bubble",
        return_all: bool = False,
        *,
        seed: int = 0,
        **generate_kwargs: Any,
    ) -> list[str] | list[list[str]]:
        """Sample `n` responses per input (`n_generate`) and return the best of each (`get_best_of_n`), with
        llm-blender's `Blender.best_of_n_generate` signature and defaults.

        Generation sees `instruction + "\\n" + input`; ranking sees `instruction + input` (no separator), as in
        llm-blender. `pairrm_cmp_type="bubble"` (default, seeded by `seed`) or `"full"` (deterministic full
        ranking); `return_all` gives every response, best first. `batch_size` is the generation batch (the
        scorer packs its own batches).

        Returns:
            The best response per input, or with `return_all` all `n` responses per input, best first.

        Example:
            >>> pairrm.best_of_n_generate(policy, tokenizer, ["Tell me a joke."], n=4, max_new_tokens=64)
        """
        samples = self.n_generate(model, model_tokenizer, inputs, instructions, n, sampling_mode, batch_size, **generate_kwargs)
        return self.get_best_of_n(inputs, samples, instructions, pairrm_cmp_type, return_all, seed=seed)

    def best_of_n(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> list[str]:
        """The best candidate of each input by full ranking (the first one among equal best scores)."""
        return self.get_best_of_n(inputs, candidates, instructions, "full", batch_size=batch_size)


def _clean_up_spaces(name_or_path: str | Path) -> bool:
    """The checkpoint tokenizer's `clean_up_tokenization_spaces` (transformers' default since 4.45: False)."""
    path = resolve(name_or_path, ["*.json", "spm.model"]) / "tokenizer_config.json"
    try:
        return bool(json.loads(path.read_text()).get("clean_up_tokenization_spaces", False)) if path.is_file() else False
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a JSON object: {err}") from None


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
