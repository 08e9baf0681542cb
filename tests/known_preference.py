"""A judge whose preference is known and depends on the prompt, for the recipes' learning tests.

The prompts are plain text (`conversational: false`) ending in the style word, so the policy's last prompt token
carries it: a tiny random policy learns the condition in a few dozen updates (behind a chat template's fixed suffix
it takes far longer).

`StyleBackend` is a `PairBackend` (the seam every judge implements), so `PairRM(StyleBackend())` goes through the
real adapters: the judge, `PairwiseReward`, `OnlineDPOJudgeReward` and the preference labeler. Its rule: when the
prompt asks for an answer "briefly", the response with fewer characters is better; "in detail", the one with more
characters. f(x, A, B) = SCALE * sign(x) * (len(B) - len(A)) / 2, so the two-order logit is
SCALE * sign(x) * (len(B) - len(A)): ties exactly at equal lengths. A policy that ignores the prompt cannot beat
its starting point on both kinds: always shorter wins the brief half and loses the detail half (win rate ~0.5).

`style_prompts()` is the data: 20 topics x 2 styles, with references of a medium length; the last 8 rows (4 topics
never seen in training, both styles) are the held-out prompts (`eval_prompts: 8`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch

from pairrm_rlhf.core.settings import MAX_TOKENS_CPU
from pairrm_rlhf.pairrm import PairRM

BRIEF, DETAIL = "briefly", "in detail"
SCALE = 0.25
TOPICS = ["the sun", "the ocean", "a good book", "green tea", "the moon", "a small garden", "the city at night",
          "a quiet morning", "rain in spring", "the mountains", "a friendly dog", "fresh bread", "the river",
          "a long walk", "music", "the stars", "winter snow", "a helpful answer", "kind words", "simple math"]
_PREFIX = re.compile(r"^<Response \d+>: ")


def response_text(candidate: str) -> str:
    """The response inside PairRM's prepared candidate text (plain, or the multi-turn `<Response k>: ` line)."""
    return getattr(candidate, "response", None) or _PREFIX.sub("", candidate, count=1)


def style(source: str) -> float:
    """+1: the prompt wants brevity; -1: it wants detail; 0: neither (no preference)."""
    return 1.0 if BRIEF in source else -1.0 if DETAIL in source else 0.0


class ToyBackend:
    """What every test backend shares: the `PairBackend` members besides `score` and `identity`, with real values
    (PairRM's template unless given, CPU, float32, the CPU token budget, the default probability, no truncation,
    one token per character)."""

    device = torch.device("cpu")
    dtype = torch.float32
    max_tokens = MAX_TOKENS_CPU

    def __init__(self, template: str = "pairrm"):
        self.template = template

    def reference_probability(self, triples, temperature, *, batch_size=None):
        return None

    def truncation_rate(self, triples: Sequence[tuple[str, str, str]]) -> float:
        return 0.0

    def pair_lengths(self, triples: Sequence[tuple[str, str, str]]) -> list[int]:
        return [len(x) + len(a) + len(b) for x, a, b in triples]


class StyleBackend(ToyBackend):
    """The known, prompt-dependent preference as a `pairrm_rlhf.core.backend.PairBackend`."""

    def score(self, triples: Sequence[tuple[str, str, str]], *, batch_size: int | None = None,
              show_progress_bar: bool | None = None) -> np.ndarray:
        return np.array([SCALE * style(x) * (len(response_text(b)) - len(response_text(a))) / 2
                         for x, a, b in triples], dtype=np.float32)

    def identity(self) -> dict:
        return {"backend": "style-test", "scale": SCALE}


def style_judge() -> PairRM:
    return PairRM(StyleBackend())


def style_prompts(reference_length: int = 15) -> list[dict]:
    """40 rows (prompt, reference): topic-major, so the last 8 rows are 4 unseen topics in both styles."""
    rows = []
    for topic in TOPICS:
        for kind in (BRIEF, DETAIL):
            reference = f"Here is {topic}, in short words".ljust(reference_length, ".")[:reference_length]
            rows.append({"prompt": f"Tell me about {topic}, {kind}", "reference": reference})
    return rows


def preferred_fraction(prompts: list, first: list[str], second: list[str]) -> float:
    """Ground truth: the fraction of pairs where `first` is strictly better by the rule (ties count 1/2)."""
    text = lambda p: p if isinstance(p, str) else " ".join(m["content"] for m in p)  # noqa: E731
    diff = np.array([style(text(p)) * (len(b) - len(a)) for p, a, b in zip(prompts, first, second)])
    return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


class LengthBackend(ToyBackend):
    """A `PairBackend` whose preference is the simplest known one: the longer response wins,
    f(x, A, B) = len(A) - len(B). Counts the triples it scores (`scored`), so tests can count matches."""

    def __init__(self, template: str = "pairrm"):
        super().__init__(template)
        self.scored = 0

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        self.scored += len(triples)
        return np.array([len(a) - len(b) for _, a, b in triples], dtype=np.float32)

    def identity(self):
        return {"backend": "length", "template": self.template}
