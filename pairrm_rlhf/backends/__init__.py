"""Pair backends other than the plain encoder engine: Better-PairRM's template, RLHFlow's causal-LM judge, and
the HTTP client of a `pairrm-rlhf serve` server. Each implements `core.backend.PairBackend`."""

from __future__ import annotations


def detect_backend(name_or_path: str) -> str:
    """`rlhflow` for RLHFlow pair-preference checkpoints (by name, or a local causal-LM directory), else `pairrm`."""
    name = str(name_or_path).lower()
    if "pair-preference-model" in name or "pair_preference_model" in name:
        return "rlhflow"
    return "pairrm"
