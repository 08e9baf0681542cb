"""llm-blender's best-of-n methods of `PairRM` (`Blender.get_best_of_n`, `get_worst_of_n`, `n_generate`,
`best_of_n_generate`; `llm_blender/blender/blender.py`), kept apart from the scoring API they build on.

`BestOfN` is a mixin of `PairRM`: its methods use `PairRM.rank`, `two_order_logits` and the source preparation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .core.formats import check_candidates, check_lengths, check_texts, pairrm_candidate
from .core.generation import SamplingArguments, sample_responses

CMP_TYPES = ("bubble", "full")
# llm-blender's n_generate sampling modes: the fields each sets unless given (plus do_sample and temperature 0.7)
SAMPLING_MODES = {
    "top_p_sampling": lambda fields: {"top_p": fields.get("top_p", 1.0)},
    "top_k_sampling": lambda fields: {"top_k": fields.get("top_k", 50)},
}


class BestOfN:
    """Best and worst of n, and sampling n responses from a causal LM (a mixin of `PairRM`)."""

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
            mode_fields = SAMPLING_MODES[sampling_mode](fields)
            fields.update(do_sample=True, temperature=fields.get("temperature", 0.7), **mode_fields)
        elif sampling_mode is not None:
            raise ValueError(
                f"sampling_mode must be one of {sorted(SAMPLING_MODES)} or None, got {sampling_mode!r:.40}")
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
        samples = self.n_generate(
            model, model_tokenizer, inputs, instructions, n, sampling_mode, batch_size, **generate_kwargs)
        return self.get_best_of_n(inputs, samples, instructions, pairrm_cmp_type, return_all, seed=seed)

    def best_of_n(
        self,
        inputs: Sequence[str],
        candidates: Sequence[Sequence[str]],
        instructions: Sequence[str] | None = None,
        batch_size: int | None = None,
        pairrm_cmp_type: str = "bubble",
        *,
        seed: int = 0,
    ) -> list[str]:
        """The best candidate of each input: `get_best_of_n` with the same default (`"bubble"`); pass
        `pairrm_cmp_type="full"` for the deterministic full ranking (the first one among equal best scores)."""
        return self.get_best_of_n(inputs, candidates, instructions, pairrm_cmp_type, batch_size=batch_size, seed=seed)
