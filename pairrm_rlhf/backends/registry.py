"""The one table of judges: how a checkpoint name is recognised, how it loads, how text is rendered for it, and its
length limits. `PairRM.from_pretrained`, `PairRMArguments` (so every command and recipe, `eval` and the server)
read it; nothing else decides which judge a name is.

Anchor: allenai/reward-bench `rewardbench/models/__init__.py`, whose `REWARD_MODEL_CONFIG` maps a model name to its
model builder and pipeline. Here one `Judge` entry maps a judge name to its loader (which builds the
`PairBackend`), the name patterns that select it, and its limits; the template travels with the loaded backend.

Adding a judge: write its backend file (a `PairBackend` and a `load(name_or_path, options)` function), then add one
`Judge` to `JUDGES` below, or call `register(Judge(...))` from your own code. docs/architecture.md has a worked
example. Importing this module loads no torch: the loaders import their backends when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.settings import check_choice

if TYPE_CHECKING:
    from ..core.backend import LoadOptions, PairBackend

Loader = Callable[[str, "LoadOptions"], "tuple[PairBackend, str]"]


@dataclass(frozen=True)
class Judge:
    """One judge of the registry.

    Attributes:
        name: what `--pairrm_judge` and `PairRM.from_pretrained(judge=...)` call it.
        load: `load(name_or_path, options) -> (backend, layout)`: the loaded `PairBackend` (whose `template` says
            how `PairRM` renders text for it) and a short name of the checkpoint's layout (`PairRM.kind`).
        names: lowercase substrings of a hub id's or directory's last component that select this judge.
        limits: its length limits, in words (for docs and `--help`).
        checkpoints: the published checkpoints it was written for.
    """

    name: str
    load: Loader
    names: tuple[str, ...] = ()
    limits: str = ""
    checkpoints: tuple[str, ...] = ()


def _load_pairrm(name_or_path: str, options: LoadOptions) -> tuple[PairBackend, str]:
    from ..core.loading import load_pair_scorer

    return load_pair_scorer(name_or_path, options, "pairrm")


def _load_better_pairrm(name_or_path: str, options: LoadOptions) -> tuple[PairBackend, str]:
    from .better_pairrm import load_better_pairrm

    return load_better_pairrm(name_or_path, options)


def _load_rlhflow(name_or_path: str, options: LoadOptions) -> tuple[PairBackend, str]:
    from .rlhflow import MAX_LENGTH, load_rlhflow

    scorer = load_rlhflow(
        name_or_path, device=options.device, dtype=options.dtype, max_length=options.max_length or MAX_LENGTH,
        max_tokens=options.max_tokens, swap_average=options.swap_average,
    )
    return scorer, "causal-lm"


DEFAULT_JUDGE = "pairrm"  # a name no judge's patterns match
JUDGES: dict[str, Judge] = {
    "pairrm": Judge(
        "pairrm", _load_pairrm, limits="source 1224 tokens, each candidate 412 (+ unused source), 2048 in all",
        checkpoints=("llm-blender/PairRM-hf", "llm-blender/PairRM"),
    ),
    "better-pairrm": Judge(
        "better-pairrm", _load_better_pairrm, names=("better-pairrm",),
        limits="source 2030 tokens cut from the left, each candidate 670, 3370 in all",
        checkpoints=("maywell/Better-PairRM", "mightbe/Better-PairRM"),
    ),
    "rlhflow": Judge(
        "rlhflow", _load_rlhflow, names=("pair-preference-model", "pair_preference_model"),
        limits="prompt 8192 tokens (max_length), context cut from the left",
        checkpoints=("RLHFlow/pair-preference-model-LLaMA3-8B",),
    ),
}


def register(judge: Judge) -> Judge:
    """Add `judge` to `JUDGES` (a ValueError if its name is taken); returns it."""
    if judge.name in JUDGES:
        raise ValueError(f"a judge named {judge.name!r} is already registered")
    JUDGES[judge.name] = judge
    return judge


def find_judge(name_or_path: str | Path, judge: str | None = None, where: str = "judge") -> Judge:
    """The judge for a checkpoint: `judge` by name when given; else the one a local checkpoint's config.json
    declares (`pairrm_template`); else the first whose `names` occur in the name's last component; else PairRM.

    A `judge` that is not registered is a one-line ValueError naming `where` and the registered names.
    """
    if judge is not None:
        return JUDGES[check_choice(where, judge, JUDGES)]
    path = Path(str(name_or_path)).expanduser()
    if (path / "config.json").is_file():
        from ..core.loading import declared_template

        declared = declared_template(path)
        if declared:
            return JUDGES[check_choice(f"{path / 'config.json'}: field 'pairrm_template'", declared, JUDGES)]
    last = Path(str(name_or_path).rstrip("/")).name.lower()
    for entry in JUDGES.values():
        if any(pattern in last for pattern in entry.names):
            return entry
    return JUDGES[DEFAULT_JUDGE]
