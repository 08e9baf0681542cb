"""Preference labeling: sample K responses per prompt, score them pairwise, emit DPO pairs (resumable).

Rooms: `pairs` (aggregation and pair selection), `generation` (HF and vLLM sampling), `store` (the resumable chunk
store), `io` (datasets in and out, card, histogram), `labeler` (`PreferenceLabeler`), `command` (`label`).
The names below load on first use, so `pairrm-rlhf label --help` imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LabelStats": "pairs",
    "PreferenceLabeler": "labeler",
    "SamplingArguments": "..core.sampling",
    "best_of_n_responses": "labeler",
    "load_prompts": "io",
    "save_dataset": "io",
    "select_pairs": "pairs",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _WHERE[name]
    return getattr(importlib.import_module(where if where.startswith("..") else "." + where, __name__), name)
