"""PairRM for RLHF on the current stack: a fast pair scorer, TRL adapters, preference labeling, recipes.

Exports are lazy: `import pairrm_rlhf` loads nothing heavy; `pairrm_rlhf.PairRM` imports the scorer only, and
the TRL adapters and the labeler (TRL, datasets) load on first access.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# A library only adds a NullHandler: the application (or `pairrm-rlhf`'s CLI) decides where logs go.
logging.getLogger(__name__).addHandler(logging.NullHandler())

_EXPORTS = {
    "PairRM": "pairrm_rlhf.pairrm",
    "LazyPairRM": "pairrm_rlhf.pairrm",
    "PairBackend": "pairrm_rlhf.core.backend",
    "PairRMJudge": "pairrm_rlhf.trl.judge",
    "PairwiseReward": "pairrm_rlhf.trl.rewards",
    "AsyncPairwiseReward": "pairrm_rlhf.trl.rewards",
    "OnlineDPOJudgeReward": "pairrm_rlhf.trl.rewards",
    "PreferenceLabeler": "pairrm_rlhf.labeling",
}
__all__ = [  # the names of _EXPORTS, spelled out so linters see them
    "PairRM", "LazyPairRM", "PairBackend", "PairRMJudge", "PairwiseReward", "AsyncPairwiseReward",
    "OnlineDPOJudgeReward", "PreferenceLabeler",
]

if TYPE_CHECKING:
    from .core.backend import PairBackend
    from .labeling import PreferenceLabeler
    from .pairrm import LazyPairRM, PairRM
    from .trl.judge import PairRMJudge
    from .trl.rewards import AsyncPairwiseReward, OnlineDPOJudgeReward, PairwiseReward


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pairrm_rlhf' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
