"""A length-controlled win rate: the win rate a policy would have against a baseline if its answers were as long as
the baseline's.

PairRM, like most judges, prefers longer answers, so a raw win rate rises when a policy learns to ramble. AlpacaEval's
length-controlled win rate (Dubois et al. 2024, "Length-Controlled AlpacaEval", arXiv:2404.04475) fits a generalised
linear model of the judge's preference with a length term and reports the prediction with that term at zero. This is
a smaller version of the same idea, written here: a logistic regression of each verdict (win 1, tie 1/2, loss 0) on
tanh(length difference / its standard deviation), and the fitted win probability at zero length difference,
sigmoid(intercept). AlpacaEval's model also has per-instruction and per-model terms; this one has neither.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def length_controlled_win_rate(wins: Sequence[float], first_lengths: Sequence[float], second_lengths: Sequence[float],
                               l2: float = 1e-2, iterations: int = 100) -> float:
    """sigmoid(w0) of the logistic fit P(win) = sigmoid(w0 + w1 * tanh((len_first - len_second) / std)).

    Args:
        wins: one verdict per comparison in [0, 1] (ties 1/2, used as a soft label).
        first_lengths, second_lengths: the two answers' lengths (characters or tokens, the same unit for both).
        l2: ridge penalty on both weights, so that a verdict that is all wins (or perfectly explained by length)
            still has a finite fit.
        iterations: Newton steps at most (it converges in a handful).

    Returns:
        The win rate at zero length difference; the plain mean when the lengths never differ (NaN for no data).
    """
    y = np.asarray(wins, dtype=np.float64)
    diff = np.asarray(first_lengths, dtype=np.float64) - np.asarray(second_lengths, dtype=np.float64)
    if not (len(y) == len(diff)):
        raise ValueError(f"wins has {len(y)} items but the length difference has {len(diff)}")
    if y.size and not ((y >= 0) & (y <= 1)).all():
        raise ValueError("wins must lie in [0, 1] (win 1, tie 0.5, loss 0)")
    if not y.size:
        return float("nan")
    scale = diff.std()
    if scale == 0:
        return float(y.mean())
    x = np.stack([np.ones_like(diff), np.tanh(diff / scale)], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(x @ w)))
        gradient = x.T @ (p - y) + l2 * w
        hessian = (x * (p * (1 - p))[:, None]).T @ x + l2 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0])))
