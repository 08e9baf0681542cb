"""PairRM for RLHF on the current stack: a fast pair scorer, TRL adapters, preference labeling, recipes."""

from .pairrm import PairRM

__all__ = ["PairRM"]
__version__ = "0.1.0"
