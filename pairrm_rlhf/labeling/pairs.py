"""Which pairs a prompt's K scored responses yield: one score per response (`aggregate`), then a selection
strategy (`select_pairs`); `LabelStats` counts what was kept and dropped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..core import aggregation as agg
from ..core.settings import check_choice

STRATEGIES = ("best_vs_worst", "best_vs_random", "best_vs_second", "all_pairs", "max_min_p")
AGGREGATIONS = ("rank", "copeland", "bradley_terry")


@dataclass
class LabelStats:
    """Counts of one labeling run (or one chunk of it).

    `margin_sum` is the sum of the kept pairs' score margins; `mean_margin` (a property) divides it by `pairs`.
    `truncation_rate` (a property) is `truncated_pairs / scored_pairs`.
    """

    prompts: int = 0
    pairs: int = 0
    ties_dropped: int = 0  # candidate pairs whose two responses had equal scores
    below_margin: int = 0  # candidate pairs with 0 < margin <= margin_threshold
    margin_sum: float = 0.0  # sum of the kept pairs' margins (see mean_margin)
    scored_pairs: int = 0  # unordered response pairs scored (both orders each)
    truncated_pairs: int = 0  # of those, pairs where the judge had to cut some text
    unfinished: int = 0  # sampled responses cut at max_new_tokens (no EOS); never chosen unless allowed

    @property
    def mean_margin(self) -> float:
        """Mean score margin of the kept pairs (NaN when none was kept)."""
        return self.margin_sum / self.pairs if self.pairs else float("nan")

    @property
    def truncation_rate(self) -> float:
        """Fraction of scored pairs in which the judge cut some text."""
        return self.truncated_pairs / self.scored_pairs if self.scored_pairs else 0.0

    def add(self, other: LabelStats) -> None:
        """Add `other`'s counts to these."""
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def aggregate(matrix: np.ndarray, aggregation: str = "rank", temperature: float = 1.0) -> np.ndarray:
    """One score per response from a single-order pairwise matrix M[i, j] = f(x, r_i, r_j).

    `rank`: the reference round-robin score; `copeland`: wins + ties/2 by the two-order logit; `bradley_terry`:
    strengths fitted to P = sigmoid((M - M.T) / 2T).
    """
    if check_choice("aggregation", aggregation, AGGREGATIONS) == "rank":
        return agg.round_robin_scores(matrix)
    if aggregation == "copeland":
        return agg.copeland_scores(matrix)
    return agg.bradley_terry_scores(agg.probability(matrix - matrix.T, temperature))


def select_pairs(
    scores: Sequence[float],
    strategy: str = "best_vs_worst",
    pairs_per_prompt: int | None = None,
    margin_threshold: float = 0.0,
    rng: np.random.Generator | None = None,
    finished: Sequence[bool] | None = None,
    lengths: Sequence[int] | None = None,
    len_penalty: float = 0.0,
) -> tuple[list[tuple[int, int]], int, int]:
    """Pick (chosen, rejected) index pairs from one prompt's response scores.

    `best_vs_worst`, `best_vs_second` and `best_vs_random` pair the best response (the first of equal best)
    with the `pairs_per_prompt` (default 1) worst, next-best or randomly drawn others; `all_pairs` takes every
    pair, largest margin first (default: no cap). A pair whose margin is 0 is a tie and a pair with margin
    <= `margin_threshold` is too close: both are dropped. With `finished` (one flag per response), a response cut
    at the length limit is never chosen: "best" is the best finished response (no pair when none finished), and
    an unfinished one can still be rejected.

    `max_min_p` is RLHFlow's length-penalised best vs worst (RLHFlow/Online-RLHF `dpo_iteration/run_dpo.py`,
    `prepare_data`, `choose_type="max_min_p"`, `--len_penalty`): the pair is the argmax and the argmin of
    `score - len_penalty * length` (`lengths`: characters of each response, as there), then ordered by the raw
    scores, so the longer of two near-equal responses is less likely to be the chosen one. One pair per prompt.

    Returns:
        (pairs, ties dropped, below-margin dropped).

    Example:
        >>> select_pairs([0.1, 3.0, -2.0], "best_vs_worst")
        ([(1, 2)], 0, 0)
    """
    check_choice("strategy", strategy, STRATEGIES)
    scores = [float(s) for s in scores]
    if strategy == "max_min_p":
        return _max_min_p(scores, lengths, len_penalty, margin_threshold, finished)
    if finished is not None and len(finished) != len(scores):
        raise ValueError(f"finished has {len(finished)} flags but there are {len(scores)} scores")
    can_win = [True] * len(scores) if finished is None else [bool(f) for f in finished]
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))  # best first, stable
    if not any(can_win):
        return [], 0, 0
    best = next(i for i in order if can_win[i])
    others = [i for i in order if i != best]
    if strategy == "all_pairs":
        candidates = [(i, j) for a, i in enumerate(order) for j in order[a + 1 :] if can_win[i]]
        candidates.sort(key=lambda p: -(scores[p[0]] - scores[p[1]]))  # stable: ties keep rank order
    elif strategy == "best_vs_worst":
        candidates = [(best, j) for j in reversed(others)]
    elif strategy == "best_vs_second":
        candidates = [(best, j) for j in others]
    else:
        if rng is None:
            raise ValueError("best_vs_random needs an rng")
        candidates = [(best, others[k]) for k in rng.permutation(len(others))]
    if strategy != "all_pairs":
        candidates = candidates[: pairs_per_prompt or 1]
    kept, ties, below = [], 0, 0
    for c, r in candidates:
        margin = scores[c] - scores[r]
        if margin == 0:
            ties += 1
        elif margin <= margin_threshold:
            below += 1
        else:
            kept.append((c, r))
    if strategy == "all_pairs" and pairs_per_prompt:
        kept = kept[:pairs_per_prompt]
    return kept, ties, below


def _max_min_p(scores: list[float], lengths: Sequence[int] | None, len_penalty: float, margin_threshold: float,
               finished: Sequence[bool] | None) -> tuple[list[tuple[int, int]], int, int]:
    if lengths is None or len(lengths) != len(scores):
        raise ValueError(f"max_min_p needs one length per response ({len(scores)}), got "
                         f"{None if lengths is None else len(lengths)}")
    if not len_penalty >= 0:
        raise ValueError(f"len_penalty must be >= 0, got {len_penalty}")
    penalised = np.asarray(scores) - len_penalty * np.asarray(lengths, dtype=np.float64)
    top, bottom = int(np.argmax(penalised)), int(np.argmin(penalised))  # the first of equal ones, as numpy's
    chosen, rejected = (top, bottom) if scores[top] >= scores[bottom] else (bottom, top)
    margin = scores[chosen] - scores[rejected]
    if margin == 0:
        return [], 1, 0
    if margin <= margin_threshold:
        return [], 0, 1
    if finished is not None and not finished[chosen]:
        return [], 0, 0
    return [(chosen, rejected)], 0, 0
