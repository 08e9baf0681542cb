"""The one seam: anything that scores ordered pairs is a `PairBackend`.

The encoder engine (`core.engine.PairScorer`), the Better-PairRM template (`backends.better_pairrm`), RLHFlow's
causal-LM judge (`backends.rlhflow`), an HTTP client of our server (`backends.remote`) and the server's own request
queue (`serve`) all implement it; `PairRM(backend)` is the one face over any of them.

A backend declares what it is here — its prompt template, compute dtype, token limits and reference probability —
so callers never probe it with `getattr`; `check_backend` refuses one that lacks a member. `LoadOptions` is what
every judge loader of `backends.registry` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

Triple = tuple[str, str, str]


@runtime_checkable
class PairBackend(Protocol):
    """Ordered (source, A, B) triples of prepared text in, single-order logits f(x, A, B) out.

    Attributes:
        template: how `PairRM` renders prompts and conversations for this backend: `pairrm`, `better-pairrm` or
            `rlhflow` (`core.formats`). A remote backend reports its server's.
        device: where the backend's model runs (CPU for remote ones).
        dtype: the compute dtype of its forwards (a remote backend reports its server's).
        max_tokens: padded tokens per forward batch (the budget the backend plans its batches with).

    `score` returns f(x, A, B) for each ordered triple (float32, caller's order), where f > 0 means A is better
    and sigmoid((f(x,A,B) - f(x,B,A)) / 2) is the backend's calibrated P(A > B), unless `reference_probability`
    says otherwise. `truncation_rate` is the fraction of triples in which some text is cut to fit the backend's
    length limits. `pair_lengths` is the number of tokens of each triple's forward input (after the backend's own
    rendering and truncation), or None when the backend cannot count them locally (a remote one). `identity` is a
    JSON-able description of everything that changes the backend's numbers (weights digest, dtype, template,
    tokenizer, limits): resumable jobs compare it before reusing earlier results.
    """

    template: str
    device: torch.device
    dtype: torch.dtype
    max_tokens: int

    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray: ...

    def reference_probability(
        self, triples: Sequence[Triple], temperature: float, *, batch_size: int | None = None
    ) -> np.ndarray | None:
        """The backend's own calibrated P(A > B) where its reference defines one other than
        sigmoid((f(x,A,B) - f(x,B,A)) / (2 T)) (RLHFlow: each order's probability at temperature T, averaged);
        None where that default applies (PairRM, Better-PairRM)."""
        ...

    def truncation_rate(self, triples: Sequence[Triple]) -> float: ...

    def pair_lengths(self, triples: Sequence[Triple]) -> list[int] | None: ...

    def identity(self) -> dict: ...


@dataclass(frozen=True)
class LoadOptions:
    """What every judge loader (`backends.registry.Judge.load`) is given; each uses the fields that apply to it.

    Attributes:
        device, dtype: where and in which compute dtype the judge runs (already resolved).
        max_tokens: padded tokens per forward batch (None: `core.settings.default_max_tokens`).
        base_model: encoder checkpoints in the blender layout: the base encoder's config and tokenizer.
        max_length, swap_average: the RLHFlow judge's prompt limit (None: its default) and order averaging.
    """

    device: torch.device
    dtype: torch.dtype
    max_tokens: int | None = None
    base_model: str | Path | None = None
    max_length: int | None = None
    swap_average: bool = True


MEMBERS = ("template", "device", "dtype", "max_tokens", "score", "reference_probability", "truncation_rate",
           "pair_lengths", "identity")


def check_backend(backend: object) -> PairBackend:
    """`backend` itself when it has every `PairBackend` member, else a one-line TypeError naming the missing ones
    (checked once where a backend enters `PairRM`, so nothing fails later deep inside a method)."""
    missing = [name for name in MEMBERS if not hasattr(backend, name)]
    if missing:
        raise TypeError(f"{type(backend).__name__} is not a PairBackend: it lacks {', '.join(missing)} "
                        "(see pairrm_rlhf.core.backend.PairBackend)")
    return backend  # type: ignore[return-value]
