"""Settings every layer shares, each defined once: token budgets, dtype names, and how a bad choice is reported.

Importing this module loads no torch (the CLI's argument checks use it before anything heavy is imported).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

# Padded tokens per forward batch (rows x longest sequence) when the caller gives none: large on a GPU, small on a
# CPU (attention is quadratic and CPU caches are small). Every backend and the server's queue start from these.
MAX_TOKENS_CUDA = 65536
MAX_TOKENS_CPU = 8192

# The one dtype vocabulary of the API, the CLI flags, the server and the wire: name -> canonical name.
# "auto" (or None) means float32 on a CPU and bfloat16 (autocast) on CUDA.
DTYPE_NAMES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16",
}
CHOICE = TypeVar("CHOICE")


def check_choice(where: str, value: CHOICE, allowed: Iterable[Any]) -> CHOICE:
    """`value` when it is one of `allowed`, else a one-line ValueError in the package's one style:
    `{where}: must be one of a, b, c, got 'x'` (`where` is a flag such as `--strategy`, or an argument name)."""
    allowed = tuple(allowed)
    if value not in allowed:
        names = ", ".join(str(a) for a in allowed if a is not None)
        raise ValueError(f"{where}: must be one of {names}, got {value!r:.60}")
    return value


def default_max_tokens(device: torch.device | str) -> int:
    """The token budget of a forward batch on `device` when none is given (`MAX_TOKENS_CUDA` / `MAX_TOKENS_CPU`)."""
    kind = device if isinstance(device, str) else device.type
    return MAX_TOKENS_CUDA if kind.split(":")[0] == "cuda" else MAX_TOKENS_CPU


def dtype_name(dtype: str | torch.dtype | None, where: str = "dtype") -> str:
    """The canonical name (`auto`, `float32`, `bfloat16`, `float16`) of a dtype given by any accepted name or as a
    `torch.dtype`; a one-line ValueError naming `where` otherwise."""
    if dtype is None:
        return "auto"
    if not isinstance(dtype, str):
        dtype = str(dtype).removeprefix("torch.")
    return DTYPE_NAMES[check_choice(where, dtype, DTYPE_NAMES)]


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | str, where: str = "dtype") -> torch.dtype:
    """The compute dtype for `device`: the named one, or for `auto`/None float32 on a CPU and bfloat16 on CUDA."""
    import torch

    name = dtype_name(dtype, where)
    if name == "auto":
        kind = device if isinstance(device, str) else device.type
        return torch.bfloat16 if kind.split(":")[0] == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
