"""TRL-style pairwise judge over PairRM (any backend). Text is rendered by `core.formats.render`."""

from __future__ import annotations

import logging
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core import aggregation
from ..core.assets import DEFAULT_MODEL
from ..core.formats import render
from ..pairrm import LazyPairRM, PairRM

logger = logging.getLogger(__name__)


try:  # older TRL releases shipped the judge interface at top level; TRL 1.x does not
    from trl import BasePairwiseJudge  # type: ignore[attr-defined]
except ImportError:

    class BasePairwiseJudge(ABC):
        """Same contract as TRL's former `trl.BasePairwiseJudge` (used when TRL does not provide it)."""

        @abstractmethod
        def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
            """For each prompt, the index (0 or 1) of the better of its two completions."""
            raise NotImplementedError


# ---- the judge -----------------------------------------------------------------------------------------
class PairRMJudge(BasePairwiseJudge):
    """TRL's former pairwise-judge contract over PairRM: which completion of each pair is better.

    Args:
        model: a loaded `PairRM`, or a checkpoint id or path loaded on the first `judge` call (construction
            loads nothing and does not touch CUDA).
        device, dtype, base_model: passed to `PairRM.from_pretrained` when `model` is an id or path.
        batch_size: forwarded to the scorer (default: its token budget).
        seed: seed of the order shuffling.

    Scores use both slot orders, z = f(x,A,B) - f(x,B,A), and P(A better) = sigmoid(z / (2 T)). TRL's former
    soft `PairRMJudge` returned sigmoid(z / T_old): twice as confident; `temperature=0.5` here equals the old
    score at its default temperature 1 (in general ours at T equals the old one at 2T).
    """

    def __init__(
        self,
        model: PairRM | str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ):
        self._lazy = LazyPairRM.wrap(model, device=device, dtype=dtype, base_model=base_model)
        self.batch_size = batch_size
        self._rng = random.Random(seed)

    @property
    def pairrm(self) -> PairRM:
        """The underlying `PairRM` (loaded on first access)."""
        return self._lazy.get()

    def judge(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Sequence[Any]],
        shuffle_order: bool = True,
        return_scores: bool = False,
        temperature: float = 1.0,
    ) -> list[int] | list[float]:
        """For each prompt, 0 if its first completion is better (ties go to 0) else 1; or, with `return_scores`,
        the probability that the first is better.

        `shuffle_order` swaps the two slots of a random subset of pairs before scoring and maps results back;
        since both orders are always scored, the result does not depend on it beyond float rounding.
        """
        z = self.two_order_logits(prompts, completions, shuffle_order=shuffle_order)
        if return_scores:
            return [float(p) for p in aggregation.probability(z, temperature)]
        return [0 if v >= 0 else 1 for v in z]

    def two_order_logits(
        self, prompts: Sequence[Any], completions: Sequence[Sequence[Any]], shuffle_order: bool = False
    ) -> np.ndarray:
        """z_i = f(x, first, second) - f(x, second, first) for each pair (> 0: the first is better)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list, got {type(prompts).__name__}")
        if isinstance(completions, str) or not isinstance(completions, Sequence):
            raise TypeError(f"completions must be a list of pairs, got {type(completions).__name__}")
        if len(prompts) != len(completions):
            raise ValueError(f"completions has {len(completions)} pairs but prompts has {len(prompts)} items")
        triples, flips = [], []
        for i, (prompt, pair) in enumerate(zip(prompts, completions)):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"completions[{i}] must be a pair of two completions, got {pair!r:.80}")
            source, a = render(prompt, pair[0], name=f"completions[{i}][0]")
            _, b = render(prompt, pair[1], name=f"completions[{i}][1]")
            flip = shuffle_order and self._rng.random() < 0.5
            triples.append((source, b, a) if flip else (source, a, b))
            flips.append(flip)
        z = self.pairrm.two_order_logits(triples, batch_size=self.batch_size)
        return np.where(flips, -z, z).astype(np.float32)
