"""TRL-style pairwise judge over PairRM (any backend). Text is rendered by `core.formats.render`."""

from __future__ import annotations

import logging
import os
import random
import warnings
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


try:  # TRL <= 0.x shipped the judge interface at top level, TRL 1.0 in trl.experimental.judges; 1.16 has neither
    from trl import BasePairwiseJudge  # type: ignore[attr-defined]
except ImportError:
    try:
        with warnings.catch_warnings():  # importing trl.experimental warns that it is experimental
            warnings.simplefilter("ignore")
            from trl.experimental.judges import BasePairwiseJudge  # type: ignore[no-redef]
    except ImportError:

        class BasePairwiseJudge(ABC):  # type: ignore[no-redef]
            """Same contract as TRL's `BasePairwiseJudge` (`trl/experimental/judges/judges.py` at v1.0.0), used when
            the installed TRL provides none."""

            @abstractmethod
            def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
                """For each prompt, the index (0 or 1) of the better of its two completions."""
                raise NotImplementedError


def renamed_argument(owner: str, value: Any, old_value: Any, old: str, default: Any = None) -> Any:
    """`value` of an adapter's `pairrm` argument, or `old_value` passed under its deprecated name `old` (with a
    DeprecationWarning); a TypeError when both are given, or when neither is and there is no default."""
    if old_value is None:
        if value is None:
            raise TypeError(f"{owner} needs pairrm: a PairRM, a LazyPairRM or a checkpoint id/path")
        return value
    warnings.warn(f"{owner}({old}=...) is deprecated: pass pairrm=", DeprecationWarning, stacklevel=3)
    if value is not default:
        raise TypeError(f"{owner} got both pairrm and its deprecated name {old}; pass only pairrm")
    return old_value


# ---- the judge -----------------------------------------------------------------------------------------
class PairRMJudge(BasePairwiseJudge):
    """TRL's former pairwise-judge contract over PairRM: which completion of each pair is better.

    Args:
        pairrm: a loaded `PairRM` (or `LazyPairRM`), or a checkpoint id or path loaded on the first `judge` call
            (construction loads nothing and does not touch CUDA). `model=` is its deprecated name.
        device, dtype, base_model: passed to `PairRM.from_pretrained` when `pairrm` is an id or path.
        batch_size: forwarded to the scorer (default: its token budget).
        seed: seed of the order shuffling.

    Outputs equal TRL <= 1.0's `PairRMJudge` (huggingface/trl `trl/experimental/judges/judges.py` at v1.0.0, which
    ranked with llm-blender): with z = f(x,A,B) - f(x,B,A) (both slot orders), the hard output is 0 when z >= 0
    (ties go to the first) else 1, and `return_scores` gives softmax([s_A, s_B] / T)[0] over the two round-robin
    rank scores s_A = z/2, s_B = -z/2, i.e. sigmoid(z / T). The calibrated probability of `PairRM.probability` and
    `PairwiseReward` is sigmoid(z / (2 T)): the judge's score at T equals it at T/2 (the judge at T=2 gives it at
    T=1).

    Example:
        >>> judge = PairRMJudge("llm-blender/PairRM-hf")
        >>> judge.judge(["What is 2+2?"], [["4", "5"]])  # [0]
    """

    def __init__(
        self,
        pairrm: PairRM | LazyPairRM | str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        model: PairRM | LazyPairRM | str | os.PathLike | None = None,
    ):
        pairrm = renamed_argument(type(self).__name__, pairrm, model, "model", default=DEFAULT_MODEL)
        self._lazy = LazyPairRM.wrap(pairrm, device=device, dtype=dtype, base_model=base_model)
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
        TRL's soft score of the first completion, sigmoid(z / temperature) (see the class docstring).

        `shuffle_order` swaps the two slots of a random subset of pairs before scoring and maps results back;
        since both orders are always scored, the result does not depend on it beyond float rounding.

        Args:
            prompts: strings or message lists. completions: a pair of completions per prompt (strings, or lists
                of assistant messages). temperature: T of the soft score (> 0).

        Returns:
            A list of 0/1 (hard) or floats (soft), one per prompt.
        """
        z = self.two_order_logits(prompts, completions, shuffle_order=shuffle_order)
        if return_scores:
            return [float(p) for p in trl_soft_scores(z, temperature)]
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


def trl_soft_scores(two_order_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """TRL <= 1.0's soft PairRM score of the first completion: the softmax of the two round-robin rank scores
    (z/2, -z/2) divided by T, in float32 as llm-blender's scores are: sigmoid(z / T)."""
    aggregation.probability(np.zeros(0), temperature)  # validates the temperature
    z = np.asarray(two_order_logits, dtype=np.float32)
    scores = np.stack([z / 2, -z / 2], axis=-1) / np.float32(temperature)
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True))[..., 0]
