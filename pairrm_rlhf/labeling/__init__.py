"""Preference labeling: sample K responses per prompt, score them pairwise, emit DPO pairs (resumable)."""

from .labeler import PreferenceLabeler

__all__ = ["PreferenceLabeler"]
