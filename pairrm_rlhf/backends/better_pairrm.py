"""Better-PairRM (`maywell/Better-PairRM`): PairRM's encoder engine behind its own text template.

Same architecture and engine as PairRM; only the rendering (`core.formats.better_pairrm_source`) and the layout's
budgets (set by `core.loading`) differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..core.backend import PairBackend, Triple
from ..core.formats import better_pairrm_source, response_text


class TemplatedScorer:
    """A backend whose texts are re-rendered by `render_source`/`render_candidate` before an inner backend scores
    them. Attributes it lacks (model, tokenizer, layout, dtype, ...) are the inner backend's."""

    def __init__(
        self,
        inner: PairBackend,
        template: str,
        render_source: Callable[[str], str] = better_pairrm_source,
        render_candidate: Callable[[str], str] = response_text,
    ):
        self.inner, self.template = inner, template
        self.render_source, self.render_candidate = render_source, render_candidate

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def convert(self, triples: Sequence[Triple]) -> list[Triple]:
        return [(self.render_source(s), self.render_candidate(a), self.render_candidate(b)) for s, a, b in triples]

    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        return self.inner.score(self.convert(triples), batch_size=batch_size, show_progress_bar=show_progress_bar)

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        return self.inner.truncation_rate(self.convert(triples))

    def identity(self) -> dict:
        return {**self.inner.identity(), "template": self.template}

    def build(self, triples: Sequence[Triple]) -> list:
        return self.inner.build(self.convert(triples))


