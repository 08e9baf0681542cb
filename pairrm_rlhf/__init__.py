"""PairRM for RLHF on the current stack: a fast pair scorer, TRL adapters, preference labeling, recipes."""

from .judges import PairRMJudge
from .labeler import PreferenceLabeler
from .pairrm import PairRM
from .rewards import AsyncPairwiseReward, OnlineDPOJudgeReward, PairwiseReward

__all__ = ["PairRM", "PairRMJudge", "PairwiseReward", "AsyncPairwiseReward", "OnlineDPOJudgeReward", "PreferenceLabeler"]
__version__ = "0.1.0"
