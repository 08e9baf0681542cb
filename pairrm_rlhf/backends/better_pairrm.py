"""Better-PairRM (`maywell/Better-PairRM`, `mightbe/Better-PairRM`): PairRM's encoder engine behind the input
pipeline that produced its published RewardBench numbers.

Reference: allenai/reward-bench, `rewardbench/models/betterpairrm.py` (`tokenize_conv_pair` + `tokenize_pair`):

1. the source is the prompt's messages rendered with the generation prompt (`core.formats.better_pairrm_source`:
   ends in `ASSISTANT: `; a plain prompt is one USER turn);
2. pre-truncation: the rendered source is tokenized, cut to its last 2030 tokens and decoded; each candidate is
   cut to its first 670 tokens and decoded (`skip_special_tokens=True`, and the tokenizer's
   `clean_up_tokenization_spaces`);
3. the pair: `[CLS] <|source|> [SEP]` as its own segment, then `[CLS] source [SEP]` cut from the left (the prefix
   segment and the specials are never dropped), then each candidate in the rest of 3370 tokens
   (`core.tokenization.PairLayout` with `truncate_source_left` and `source_prefix_segment`).

Both orders are scored (AB − BA) by `PairRM`; in `compare_conversations` each order's source is that side's own
history, as reward-bench renders `convAs[:-1]` for AB and `convBs[:-1]` for BA.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from ..core.backend import LoadOptions, Triple
from ..core.engine import PairScorer
from ..core.formats import better_pairrm_source, response_text
from ..core.loading import load_pair_scorer, resolve
from ..core.modeling import PairRMModel
from ..core.tokenization import PairLayout, pretruncate


class BetterPairRMScorer:
    """A `PairBackend` that turns (source, A, B) into Better-PairRM's text (steps 1–2 of the module docstring) and
    lets the inner encoder engine build and score the pair (step 3). Device, dtype, token budget, model, tokenizer
    and layout are the inner engine's.

    Args:
        inner: the encoder engine (`core.engine.PairScorer`) with Better-PairRM's layout.
        clean_up_spaces: the checkpoint tokenizer's `clean_up_tokenization_spaces` (applied when decoding the
            pre-truncated text, as transformers does).
    """

    template = "better-pairrm"

    def __init__(self, inner: PairScorer, clean_up_spaces: bool = False):
        self.inner, self.clean_up_spaces = inner, clean_up_spaces

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def max_tokens(self) -> int:
        return self.inner.max_tokens

    @max_tokens.setter
    def max_tokens(self, value: int) -> None:
        self.inner.max_tokens = value

    @property
    def model(self) -> PairRMModel:
        return self.inner.model

    @property
    def tokenizer(self) -> Tokenizer:
        return self.inner.tokenizer

    @property
    def layout(self) -> PairLayout:
        return self.inner.layout

    def source_text(self, source: str) -> str:
        """The rendered source, cut to its last `source_max_length` tokens and decoded (reward-bench's step)."""
        text = better_pairrm_source(source)
        limit = self.inner.layout.source_max_length
        return pretruncate(self.inner.tokenizer, text, limit, "left", self.clean_up_spaces)

    def candidate_text(self, candidate: str) -> str:
        """The bare response, cut to its first `candidate_max_length` tokens and decoded."""
        text = response_text(candidate)
        limit = self.inner.layout.candidate_max_length
        return pretruncate(self.inner.tokenizer, text, limit, "right", self.clean_up_spaces)

    def convert(self, triples: Sequence[Triple]) -> list[Triple]:
        sources = {s: self.source_text(s) for s in dict.fromkeys(s for s, _, _ in triples)}
        candidates = {c: self.candidate_text(c) for c in dict.fromkeys(c for _, a, b in triples for c in (a, b))}
        return [(sources[s], candidates[a], candidates[b]) for s, a, b in triples]

    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        return self.inner.score(self.convert(triples), batch_size=batch_size, show_progress_bar=show_progress_bar)

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        """Fraction of triples in which some text loses tokens (pre-truncation or the pair's budget)."""
        if not triples:
            return 0.0
        tok, layout = self.inner.tokenizer, self.inner.layout

        def longer(text: str, limit: int) -> bool:
            return len(tok.encode(text, add_special_tokens=False).ids) > limit

        cut = 0
        for triple, converted in zip(triples, self.convert(triples)):
            s, a, b = triple
            cut += (
                longer(better_pairrm_source(s), layout.source_max_length)
                or any(longer(response_text(c), layout.candidate_max_length) for c in (a, b))
                or self.inner.truncation_rate([converted]) > 0
            )
        return cut / len(triples)

    def reference_probability(
        self, triples: Sequence[Triple], temperature: float, *, batch_size: int | None = None
    ) -> None:
        """None: Better-PairRM's probability is the default sigmoid((f(x,A,B) - f(x,B,A)) / (2 T))."""
        return None

    def pair_lengths(self, triples: Sequence[Triple]) -> list[int]:
        return self.inner.pair_lengths(self.convert(triples))

    def identity(self) -> dict:
        return {**self.inner.identity(), "template": self.template, "clean_up_spaces": self.clean_up_spaces}

    def build(self, triples: Sequence[Triple]) -> list:
        """The inner engine's input ids and prefix positions of each converted triple."""
        return self.inner.build(self.convert(triples))



def load_better_pairrm(name_or_path: str | Path, options: LoadOptions) -> tuple[BetterPairRMScorer, str]:
    """Any PairRM checkpoint (hub id or directory) with Better-PairRM's format, and its layout (`hf`/`blender`)."""
    scorer, kind = load_pair_scorer(name_or_path, options, "better-pairrm")
    return BetterPairRMScorer(scorer, clean_up_spaces=tokenizer_cleans_up_spaces(name_or_path)), kind


def tokenizer_cleans_up_spaces(name_or_path: str | Path) -> bool:
    """The checkpoint tokenizer's `clean_up_tokenization_spaces` (transformers' default since 4.45: False)."""
    path = resolve(name_or_path, ["*.json", "spm.model"]) / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("clean_up_tokenization_spaces", False))
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a JSON object: {err}") from None
