"""The one seam: anything that scores ordered pairs is a `PairBackend`.

The encoder engine (`core.engine.PairScorer`), the Better-PairRM template (`backends.better_pairrm`), RLHFlow's
causal-LM judge (`backends.rlhflow`), an HTTP client of our server (`backends.remote`) and the server's own request
queue (`serve`) all implement it; `PairRM(backend)` is the one face over any of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

Triple = tuple[str, str, str]


@runtime_checkable
class PairBackend(Protocol):
    """Ordered (source, A, B) triples of prepared text in, single-order logits f(x, A, B) out.

    `score` returns f(x, A, B) for each ordered triple (float32, caller's order), where f > 0 means A is better
    and sigmoid((f(x,A,B) - f(x,B,A)) / 2) is the backend's calibrated P(A > B). `truncation_rate` is the fraction
    of triples in which some text is cut to fit the backend's length limits. `identity` is a JSON-able description
    of everything that changes the backend's numbers (weights digest, dtype, template, tokenizer, limits): resumable
    jobs compare it before reusing earlier results. `device` is where the backend's model runs (CPU for remote ones).
    """

    device: torch.device

    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray: ...

    def truncation_rate(self, triples: Sequence[Triple]) -> float: ...

    def identity(self) -> dict: ...
