"""Pair logits → probabilities, round-robin scores and ranks.

All functions are plain numpy: the scorer produces logits, these turn them into what users consume.
"""

from __future__ import annotations

import math

import numpy as np


def probability(two_order_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(A > B) = sigmoid((f(x,A,B) - f(x,B,A)) / (2 T)); T=1 averages the two orders' log-odds."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    try:
        temperature = float(temperature)
    except OverflowError:
        temperature = math.inf
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r:.40}")
    z = np.asarray(two_order_logits, dtype=np.float64) / (2.0 * temperature)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # sigmoid without overflow


def round_robin_scores(matrix: np.ndarray) -> np.ndarray:
    """The reference `rank` score: s_i = (1/N) sum_j (M[i,j] - M[j,i]) with M[i,j] = f(x, c_i, c_j)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    return (matrix - matrix.T).mean(axis=-1)


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """1-based ranks along the last axis, higher score first; equal scores share the smaller rank."""
    scores = np.asarray(scores)
    # rank = 1 + number of strictly greater scores in the same row
    return (1 + (scores[..., None, :] > scores[..., :, None]).sum(axis=-1)).astype(np.int32)


def copeland_scores(matrix: np.ndarray) -> np.ndarray:
    """Copeland score: wins + 0.5 * ties over the other N-1 candidates, judged by the two-order logit.

    Candidate i beats j when f(x,c_i,c_j) - f(x,c_j,c_i) > 0 (M[i,j] = f(x, c_i, c_j), single order).
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    diff = matrix - matrix.T
    off_diagonal = ~np.eye(diff.shape[-1], dtype=bool)
    wins = ((diff > 0) & off_diagonal).sum(axis=-1)
    ties = ((diff == 0) & off_diagonal).sum(axis=-1)
    return (wins + 0.5 * ties).astype(np.float32)


def bradley_terry_scores(
    probabilities: np.ndarray, l2: float = 1e-3, max_iter: int = 50, tol: float = 1e-9
) -> np.ndarray:
    """Bradley–Terry strengths s fitted to soft pairwise outcomes P[i,j] = P(c_i beats c_j).

    Maximises sum_{i != j} P[i,j] log sigmoid(s_i - s_j) - (l2 / 2) |s|^2 by damped Newton steps from s = 0
    (deterministic; the small L2 term makes the optimum unique and finite even for certain outcomes).
    The strengths sum to 0. Pass `probability(M - M.T)` for a single-order PairRM matrix M.
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != p.shape[1]:
        raise ValueError(f"probabilities must be a square matrix, got shape {p.shape}")
    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    n = p.shape[0]
    p = p * ~np.eye(n, dtype=bool)
    weight = p + p.T  # comparisons between i and j (1 per unordered pair for complementary P)

    def objective(s: np.ndarray) -> float:
        d = s[:, None] - s[None, :]
        return float((p * -np.logaddexp(0.0, -d)).sum() - 0.5 * l2 * (s @ s))

    s = np.zeros(n)
    value = objective(s)
    for _ in range(max_iter):
        d = s[:, None] - s[None, :]
        sig = 0.5 * (1.0 + np.tanh(0.5 * d))
        grad = (p - weight * sig).sum(axis=1) - l2 * s
        curvature = weight * sig * (1.0 - sig)
        hessian = curvature - np.diag(curvature.sum(axis=1) + l2)  # negative definite
        step = np.linalg.solve(hessian, -grad)
        t = 1.0
        while t > 1e-6:  # backtracking: Newton steps on a logistic likelihood can overshoot
            candidate = s + t * step
            new_value = objective(candidate)
            if new_value >= value:
                break
            t *= 0.5
        else:
            break
        s, improvement, value = candidate, new_value - value, new_value
        if improvement < tol and np.abs(t * step).max() < 1e-7:
            break
    return s.astype(np.float32)
