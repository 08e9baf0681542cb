"""Names of models and data: the bundled `tiny` stand-ins, and local paths told apart from hub ids.

`tiny` is resolved here and nowhere else: wherever a PairRM checkpoint, a policy or a prompt dataset is named
(API, CLI flags, YAML configs, `PAIRRM_MODEL`), `tiny` means the small stand-in bundled with the package
(random weights, for smoke runs with no download). A local file or directory literally named `tiny` wins.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

TINY = "tiny"
DEFAULT_MODEL = "llm-blender/PairRM-hf"
BUNDLED = {
    "pairrm": "tiny-pairrm-hf",  # the reference fixture's tiny PairRM, hf layout
    "policy": "tiny-policy",  # a tiny causal LM with a Qwen2.5-style config, chat template and generation config
    "prompts": "tiny-prompts.jsonl",  # 32 prompts with a `reference` column
}


def bundled(kind: str) -> str:
    """Path of the bundled tiny asset of `kind` (pairrm, policy or prompts)."""
    if kind not in BUNDLED:
        raise ValueError(f"kind must be one of {sorted(BUNDLED)}, got {kind!r}")
    return str(resources.files("pairrm_rlhf") / "assets" / BUNDLED[kind])


def resolve(name: str | os.PathLike, kind: str) -> str:
    """`tiny` -> the bundled asset of `kind`; an existing local path as is; a path-looking name that does not exist
    -> FileNotFoundError (never a hub lookup); anything else (a hub id) unchanged."""
    text = os.fspath(name)
    if text == TINY and not Path(TINY).exists():
        return bundled(kind)
    check_local(text, kind)
    return text


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_local(name: str) -> bool:
    """Does `name` look like a local path rather than a hub id? (`./`, `../`, `/`, `~`, a backslash, a file
    extension, more than one `/`, or characters a hub id cannot have.)"""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1 or not _HUB_ID.match(name):
        return True
    return bool(re.search(r"\.(jsonl?|parquet|csv|arrow|ya?ml|txt|safetensors|bin|pt)$", name, re.IGNORECASE))


def check_local(name: str, what: str) -> None:
    """FileNotFoundError naming `what` when `name` looks like a local path that does not exist."""
    if looks_local(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{what}: file not found: {name}")
