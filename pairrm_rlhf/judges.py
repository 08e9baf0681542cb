"""TRL-style pairwise judge over PairRM, plus what every TRL adapter shares: lazy loading and text rendering.

The rendering here (`render`) is the only place where prompts and completions, plain or conversational, become
PairRM's (source, candidate) text; the judge and all reward functions in `rewards` go through it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import aggregation
from .backends import Rendered
from .pairrm import CONVERSATION_INSTRUCTION, PairRM, default_device

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "llm-blender/PairRM-hf"

try:  # older TRL releases shipped the judge interface at top level; TRL 1.x does not
    from trl import BasePairwiseJudge  # type: ignore[attr-defined]
except ImportError:

    class BasePairwiseJudge(ABC):
        """Same contract as TRL's former `trl.BasePairwiseJudge` (used when TRL does not provide it)."""

        @abstractmethod
        def judge(self, prompts: list[str], completions: list[list[str]], shuffle_order: bool = True) -> list[int]:
            """For each prompt, the index (0 or 1) of the better of its two completions."""
            raise NotImplementedError


# ---- rendering: prompts/completions → PairRM text ----------------------------------------------------
def render(prompt: Any, completion: Any, *, name: str = "completion") -> tuple[str, str]:
    """PairRM's prepared (source, candidate) text for one prompt and one completion.

    Plain text: source = prompt, candidate = completion. Conversational (prompt is a list of messages, completion a
    string or a list of assistant messages): PairRM's multi-turn format, exactly as `PairRM.compare_conversations`
    renders it. The source is the fixed instruction followed by `USER: {u}\\nAssistant: <Response k>` lines, one per
    user turn; the candidate is `<Response k>: {a}` lines: the prompt's own assistant turns (identical for every
    completion of that prompt) and then the completion as the last response. System messages are folded into the
    next user turn as `{system}\\n\\n{user}`: the instruction sentence stays exactly the trained one.

    The returned strings are `backends.Rendered`: equal to the PairRM text, and carrying the prompt's messages and
    the bare completion, from which other judges' backends (Better-PairRM, RLHFlow) render their own format.
    """
    if isinstance(prompt, str):
        text = _completion_text(name, completion)
        return PairRM._source(prompt, None), Rendered(PairRM._candidate(text), response=text)
    if isinstance(prompt, Sequence):
        turns = _prompt_turns(f"{name} prompt", prompt)
        text = _completion_text(name, completion)
        answers = [a for _, a in turns[:-1]] + [text]
        source = "\n".join(f"USER: {u}\nAssistant: <Response {k + 1}>" for k, (u, _) in enumerate(turns))
        candidate = "\n".join(f"<Response {k + 1}>: {a}" for k, a in enumerate(answers))
        messages = tuple((str(m.get("role", "")).lower(), _content(f"{name} prompt[{i}]", m)) for i, m in enumerate(prompt))
        return (
            Rendered(PairRM._source(source, CONVERSATION_INSTRUCTION), messages=messages),
            Rendered(PairRM._candidate(candidate), response=text),
        )
    raise TypeError(f"prompt of {name} must be a string or a list of messages, got {type(prompt).__name__}")


def _content(name: str, message: Any) -> str:
    if not isinstance(message, dict):
        raise TypeError(f"{name} must be a message dict with 'role' and 'content', got {type(message).__name__}")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "\n".join(str(p.get("text", "")) for p in content)
    raise TypeError(f"{name} content must be a string or a list of text parts")


def _completion_text(name: str, completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        for i, message in enumerate(completion):
            if not isinstance(message, dict) or str(message.get("role", "")).lower() != "assistant":
                raise ValueError(f"{name}[{i}] must be an assistant message, got {message!r:.80}")
        return "\n".join(_content(f"{name}[{i}]", m) for i, m in enumerate(completion))
    raise TypeError(f"{name} must be a string or a non-empty list of assistant messages, got {completion!r:.80}")


def _prompt_turns(name: str, prompt: Sequence) -> list[tuple[str, str | None]]:
    """(user, assistant) turns of a prompt; the last turn is open (the completion answers it)."""
    turns: list[list] = []
    system: list[str] = []
    for i, message in enumerate(prompt):
        text = _content(f"{name}[{i}]", message)
        role = str(message.get("role", "")).lower()
        if role == "system":
            system.append(text)
        elif role == "user":
            if turns and turns[-1][1] is None:
                raise ValueError(f"{name}[{i}] is a user message right after another user message")
            turns.append(["\n\n".join([*system, text]), None])
            system = []
        elif role == "assistant":
            if not turns or turns[-1][1] is not None:
                raise ValueError(f"{name}[{i}] is an assistant message that does not answer a user message")
            turns[-1][1] = text
        else:
            raise ValueError(f"{name}[{i}] has role {message.get('role')!r}; expected system, user or assistant")
    if system:
        raise ValueError(f"{name} has a system message that no user message follows")
    if not turns or turns[-1][1] is not None:
        raise ValueError(f"{name} must end with a user message (the turn the completion answers)")
    return [(u, a) for u, a in turns]


# ---- lazy model ---------------------------------------------------------------------------------------
class LazyPairRM:
    """A `PairRM`, or where to load one from on first use (no model load, no CUDA init before that).

    With no `device`, the model goes to this process's CUDA device when CUDA is available (one per process
    under `accelerate launch`/`torchrun`), else to the CPU.
    """

    def __init__(
        self,
        model: PairRM | str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
    ):
        if isinstance(model, PairRM):
            if device is not None or dtype is not None or base_model is not None:
                raise ValueError("device, dtype and base_model apply only when model is a checkpoint id or path")
        elif not isinstance(model, (str, os.PathLike)):
            raise TypeError(f"model must be a PairRM or a checkpoint id/path, got {type(model).__name__}")
        self._model = model if isinstance(model, PairRM) else None
        self.source = model if self._model is None else None
        self.device, self.dtype, self.base_model = device, dtype, base_model
        self._lock = threading.Lock()

    @classmethod
    def wrap(cls, model: "LazyPairRM | PairRM | str | os.PathLike", **kwargs: Any) -> "LazyPairRM":
        """`model` itself when it is already a `LazyPairRM` (to share one model), else a new one."""
        if isinstance(model, LazyPairRM):
            if any(v is not None for v in kwargs.values()):
                raise ValueError("device, dtype and base_model apply only when model is a checkpoint id or path")
            return model
        return cls(model, **kwargs)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def get(self) -> PairRM:
        """The model, loaded on the first call (thread-safe)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    device = self.device if self.device is not None else default_device()
                    logger.info("Loading PairRM from %s on %s", self.source, device)
                    self._model = PairRM.from_pretrained(
                        os.fspath(self.source), base_model=self.base_model, device=device, dtype=self.dtype,
                    )
        return self._model


# ---- the judge -----------------------------------------------------------------------------------------
class PairRMJudge(BasePairwiseJudge):
    """TRL's former pairwise-judge contract over PairRM: which completion of each pair is better.

    Args:
        model: a loaded `PairRM`, or a checkpoint id or path loaded on the first `judge` call (construction
            loads nothing and does not touch CUDA).
        device, dtype, base_model: passed to `PairRM.from_pretrained` when `model` is an id or path.
        batch_size: forwarded to the scorer (default: its token budget).
        seed: seed of the order shuffling.

    Scores use both slot orders, z = f(x,A,B) - f(x,B,A), and P(A better) = sigmoid(z / (2 T)). TRL's former
    soft `PairRMJudge` returned sigmoid(z / T_old): twice as confident; `temperature=0.5` here equals the old
    score at its default temperature 1 (in general ours at T equals the old one at 2T).
    """

    def __init__(
        self,
        model: PairRM | str | os.PathLike = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        base_model: str | os.PathLike | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ):
        self._lazy = LazyPairRM.wrap(model, device=device, dtype=dtype, base_model=base_model)
        self.batch_size = batch_size
        self._rng = random.Random(seed)

    @property
    def pairrm(self) -> PairRM:
        """The underlying `PairRM` (loaded on first access)."""
        return self._lazy.get()

    def judge(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Sequence[Any]],
        shuffle_order: bool = True,
        return_scores: bool = False,
        temperature: float = 1.0,
    ) -> list[int] | list[float]:
        """For each prompt, 0 if its first completion is better (ties go to 0) else 1; or, with `return_scores`,
        the probability that the first is better.

        `shuffle_order` swaps the two slots of a random subset of pairs before scoring and maps results back;
        since both orders are always scored, the result does not depend on it beyond float rounding.
        """
        z = self.two_order_logits(prompts, completions, shuffle_order=shuffle_order)
        if return_scores:
            return [float(p) for p in aggregation.probability(z, temperature)]
        return [0 if v >= 0 else 1 for v in z]

    def two_order_logits(
        self, prompts: Sequence[Any], completions: Sequence[Sequence[Any]], shuffle_order: bool = False
    ) -> np.ndarray:
        """z_i = f(x, first, second) - f(x, second, first) for each pair (> 0: the first is better)."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list, got {type(prompts).__name__}")
        if isinstance(completions, str) or not isinstance(completions, Sequence):
            raise TypeError(f"completions must be a list of pairs, got {type(completions).__name__}")
        if len(prompts) != len(completions):
            raise ValueError(f"completions has {len(completions)} pairs but prompts has {len(prompts)} items")
        triples, flips = [], []
        for i, (prompt, pair) in enumerate(zip(prompts, completions)):
            if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
                raise ValueError(f"completions[{i}] must be a pair of two completions, got {pair!r:.80}")
            source, a = render(prompt, pair[0], name=f"completions[{i}][0]")
            _, b = render(prompt, pair[1], name=f"completions[{i}][1]")
            flip = shuffle_order and self._rng.random() < 0.5
            triples.append((source, b, a) if flip else (source, a, b))
            flips.append(flip)
        z = self.pairrm.two_order_logits(triples, batch_size=self.batch_size)
        return np.where(flips, -z, z).astype(np.float32)
