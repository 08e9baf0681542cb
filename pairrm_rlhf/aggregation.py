"""Pair logits → probabilities, round-robin scores and ranks.

All functions are plain numpy: the scorer produces logits, these turn them into what users consume.
"""

from __future__ import annotations

import numpy as np


def probability(two_order_logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """P(A > B) = sigmoid((f(x,A,B) - f(x,B,A)) / (2 T)); T=1 averages the two orders' log-odds."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
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
