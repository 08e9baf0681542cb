"""Preference labeling: sample K responses per prompt, score them pairwise, emit DPO pairs (resumable).

Rooms: `pairs` (aggregation and pair selection), `generation` (HF and vLLM sampling), `store` (the resumable chunk
store), `io` (datasets in and out, card, histogram), `labeler` (`PreferenceLabeler`), `command` (`label`).
"""

from ..core.generation import SamplingArguments
from .io import load_prompts, save_dataset
from .labeler import PreferenceLabeler, best_of_n_responses
from .pairs import LabelStats, select_pairs

__all__ = ["LabelStats", "PreferenceLabeler", "SamplingArguments", "best_of_n_responses", "load_prompts",
           "save_dataset", "select_pairs"]
