"""`PairRMArguments`: the one set of judge fields shared by every CLI subcommand and recipe (parsed by TRL's
`TrlParser` next to the script's own dataclasses)."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .backends.registry import JUDGES, find_judge
from .core.assets import DEFAULT_MODEL, TINY, check_local
from .core.entry import bundled_configs, check_device, check_hub_id, resolve_config  # noqa: F401 (the configs: API)
from .core.settings import check_choice, dtype_name

if TYPE_CHECKING:  # the scorer (torch, transformers) loads only when a judge does: `--help` stays fast
    from .pairrm import LazyPairRM, PairRM


@dataclass
class PairRMArguments:
    """Which judge scores the pairs, and how it runs."""

    pairrm: str = field(default=DEFAULT_MODEL, metadata={
        "help": "checkpoint: a hub id or directory of any registered judge; 'tiny' = the bundled tiny PairRM"})
    pairrm_judge: str | None = field(default=None, metadata={
        "help": "which judge the checkpoint is: a name of backends.registry.JUDGES, e.g. pairrm, better-pairrm, "
                "rlhflow (default: from the name)"})
    pairrm_base_model: str | None = field(default=None, metadata={"help": "blender layout: base encoder override"})
    pairrm_template: str | None = field(default=None, metadata={"help": "deprecated: use --pairrm_judge"})
    pairrm_backend: str | None = field(default=None, metadata={"help": "deprecated: use --pairrm_judge"})
    pairrm_device: str | None = field(default=None, metadata={
        "help": "cpu, cuda, cuda:1 ... (None: this process's CUDA device if any, else cpu)"})
    pairrm_dtype: str | None = field(default=None, metadata={
        "help": "float32, bfloat16 or float16 (None: float32 on CPU, bfloat16 on CUDA)"})
    pairrm_batch_size: int | None = field(default=None, metadata={
        "help": "most pairs in one forward (None: the token budget decides)"})
    pairrm_max_tokens: int | None = field(default=None, metadata={
        "help": "padded tokens per forward (None: by device)"})

    def __post_init__(self):
        """Check every field now, before anything loads: one line naming the flag and the value."""
        if self.pairrm != TINY:
            check_local(str(self.pairrm), "--pairrm")
        if self.pairrm_base_model:
            check_local(str(self.pairrm_base_model), "--pairrm_base_model")
        if self.pairrm_template is not None or self.pairrm_backend is not None:
            self.pairrm_judge = self._judge_from_deprecated_flags()
        if self.pairrm_judge is not None:
            check_choice("--pairrm_judge", self.pairrm_judge, JUDGES)
        if self.pairrm_dtype is not None:
            dtype_name(self.pairrm_dtype, "--pairrm_dtype")
        if self.pairrm_device is not None and not re.fullmatch(r"cpu|mps|cuda(:\d+)?", self.pairrm_device):
            raise ValueError(f"--pairrm_device: must be cpu, cuda, cuda:N or mps, got {self.pairrm_device!r}")
        for name in ("pairrm_batch_size", "pairrm_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be >= 1, got {getattr(self, name)}")

    def _judge_from_deprecated_flags(self) -> str:
        """--pairrm_template / --pairrm_backend (before the registry) as a judge name, with a DeprecationWarning."""
        flags = [f"--pairrm_{n}" for n in ("template", "backend") if getattr(self, f"pairrm_{n}") is not None]
        warnings.warn(f"{' and '.join(flags)} is deprecated: use --pairrm_judge", DeprecationWarning, stacklevel=3)
        if self.pairrm_judge is not None:
            raise ValueError(f"--pairrm_judge: pass it alone ({' and '.join(flags)} is its deprecated alias)")
        if self.pairrm_backend is not None:
            if check_choice("--pairrm_backend", self.pairrm_backend, ("pairrm", "rlhflow")) == "rlhflow":
                return "rlhflow"
        if self.pairrm_template is not None:
            return check_choice("--pairrm_template", self.pairrm_template, JUDGES)
        return "better-pairrm" if find_judge(self.pairrm).name == "better-pairrm" else "pairrm"
    def check_environment(self, device: str | None = None) -> None:
        """The checks that need this machine, before anything loads: the device exists, and with HF_HUB_OFFLINE a
        hub id is in the cache (one line each, naming the flag)."""
        check_device(device or self.pairrm_device, "--pairrm_device")
        check_hub_id(self.pairrm, "--pairrm")
        check_hub_id(self.pairrm_base_model, "--pairrm_base_model")

    def load(self, device: str | None = None) -> PairRM:
        """The judge, loaded now (`device` overrides `pairrm_device`). Commands call `check_environment` first."""
        from .pairrm import PairRM

        return PairRM.from_pretrained(
            self.pairrm, judge=self.pairrm_judge, base_model=self.pairrm_base_model,
            device=device or self.pairrm_device, dtype=self.pairrm_dtype, max_tokens=self.pairrm_max_tokens,
        )

    def lazy(self) -> LazyPairRM:
        """The judge, loaded on first use (for TRL reward functions: nothing loads before the trainer calls it)."""
        from .pairrm import LazyPairRM

        return LazyPairRM(
            self.pairrm, device=self.pairrm_device, dtype=self.pairrm_dtype, base_model=self.pairrm_base_model,
            judge=self.pairrm_judge, max_tokens=self.pairrm_max_tokens,
        )
