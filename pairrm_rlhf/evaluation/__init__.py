"""Judge evaluation: agreement with human (or benchmark) preference labels.

- `agreement`: reading the public formats and `label`'s outputs, scoring, ties, best-of-4, bootstrap intervals.
- `sections`: RewardBench v1's section weighting and Auto-J's scenario groups, as their own code computes them.
- `report`: per-example predictions, tables, calibration and per-subset plots, the Hub push.
- `length`: a length-controlled win rate (the win rate at zero length difference, after AlpacaEval's LC).
- `command`: `pairrm-rlhf eval` (`EvalArguments`, `make_parser`, `run_eval`).
"""

from .agreement import (
    FORMATS,
    Example,
    SubsetResult,
    bootstrap_ci,
    correctness,
    detect_format,
    evaluate,
    example_logits,
    format_table,
    load_examples,
    map_columns,
    read_rows,
    summarize,
    to_examples,
)
from .length import length_controlled_win_rate
from .sections import autoj_groups, rewardbench_sections

__all__ = [
    "FORMATS",
    "Example",
    "SubsetResult",
    "autoj_groups",
    "bootstrap_ci",
    "correctness",
    "detect_format",
    "evaluate",
    "example_logits",
    "format_table",
    "length_controlled_win_rate",
    "load_examples",
    "map_columns",
    "read_rows",
    "rewardbench_sections",
    "summarize",
    "to_examples",
]
