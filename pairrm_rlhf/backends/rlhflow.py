"""RLHFlow's pairwise preference LLM (`RLHFlow/pair-preference-model-LLaMA3-8B`) as a `PairBackend`.

A causal LM asked "A or B?" for one ordered pair. References: RLHFlow/RLHF-Reward-Modeling `pair-pm/README.md`
(usage example) and `pair-pm/process_pair_data.py` (training format); allenai/reward-bench
`rewardbench/models/slicpairpm.py` (the pipeline behind its RewardBench numbers). Both do, per ordered pair:

1. context = `apply_chat_template(history, tokenize=False)` with RLHFlow's "plain" template
   (`core.formats.rlhflow_context`; transformers' renderer, never a hand-built string);
2. prompt = `[CONTEXT] {context} [RESPONSE A] {a} [RESPONSE B] {b} \\n` as one user message, through the model's
   own chat template (`apply_chat_template(message, tokenize=False)`, no `add_generation_prompt` argument: the
   Llama-3 template of the time always ends in the assistant header), the BOS text removed, tokenized with
   `add_special_tokens=False`;
3. P(A) = softmax over the next-token logits of exactly `A` and `B`, each divided by the temperature; the two
   orders' probabilities of the same response are averaged.

Lengths: the reference never truncates; the model was trained with `sequence_len: 3072`
(`pair-pm/llama3-8b-it.yaml`), so prompts longer than that are outside its training lengths. Here the context is
cut from the left only when a prompt exceeds `max_length` (default `MAX_LENGTH`, Llama-3's context).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.backend import Triple
from ..core.engine import plan_batches, state_digest
from ..core.formats import RLHFLOW_PROMPT, response_text, rlhflow_context
from ..core.progress import progress_enabled
from ..core.settings import default_max_tokens

logger = logging.getLogger(__name__)

MAX_LENGTH = 8192  # most prompt tokens by default: Llama-3's context


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def swap_averaged_logit(d_ab: np.ndarray, d_ba: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p = (sigmoid(d_ab) + sigmoid(-d_ba)) / 2, computed stably.

    d_ab = logit_A - logit_B with A in the first slot; d_ba the same with the responses swapped. p is RLHFlow's
    probability that A is better, averaged over the two orders.
    """
    d_ab, d_ba = np.asarray(d_ab, dtype=np.float64), np.asarray(d_ba, dtype=np.float64)
    log_p = np.logaddexp(_log_sigmoid(d_ab), _log_sigmoid(-d_ba))
    log_q = np.logaddexp(_log_sigmoid(-d_ab), _log_sigmoid(d_ba))
    return log_p - log_q


class RLHFlowScorer:
    """RLHFlow's pairwise preference LLM (`RLHFlow/pair-preference-model-LLaMA3-8B`) as a `PairBackend`.

    One ordered pair is one prompt (module docstring) and d = logit("A") - logit("B") of its next token.

    Single-order logit: with `swap_average=True` (default) both orders are run and
    f(x, A, B) = logit(p), p = (sigmoid(d_AB) + sigmoid(-d_BA)) / 2, RLHFlow's swap-averaged probability at
    temperature 1. Then f is antisymmetric, PairRM's two-order logit f(x,A,B) - f(x,B,A) = 2 logit(p), and
    `PairRM.probability` returns the reference's probability at any temperature T through `reference_probability`:
    (sigmoid(d_AB / T) + sigmoid(-d_BA / T)) / 2, the temperature applied to each order's logits before averaging.
    With `swap_average=False`, f(x, A, B) = d of that one order (slot-biased, like PairRM's single order).

    Prompts longer than `max_length` tokens lose the left part of their context (the latest turns survive); the
    responses are never cut. Prompts are sorted by length and packed into left-padded batches under `max_tokens`.

    Args:
        model, tokenizer: the causal LM (eval mode, on `device`) and its tokenizer, which must have a chat template
            and encode `A` and `B` as one token each.
        device, dtype: where and in which (autocast) dtype the model runs.
        max_length: most prompt tokens (see above). max_tokens: padded tokens per batch.
        swap_average: see above.
    """

    template = "rlhflow"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        max_length: int = MAX_LENGTH,
        max_tokens: int | None = None,
        swap_average: bool = True,
    ):
        self.model, self.tokenizer, self.device, self.dtype = model, tokenizer, device, dtype
        self.max_length = max_length
        self.max_tokens = max_tokens or default_max_tokens(device)
        self.swap_average = swap_average
        self._identity: dict | None = None
        self.token_a, self.token_b = self._choice_token("A"), self._choice_token("B")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0

    def _choice_token(self, text: str) -> int:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(
                f"the tokenizer encodes {text!r} as {len(ids)} tokens; the RLHFlow judge needs exactly one")
        return ids[0]

    # ---- prompts ----------------------------------------------------------------------------------------
    def _ids(self, context: str, a: str, b: str) -> list[int]:
        message = [{"role": "user", "content": RLHFLOW_PROMPT.format(context=context, a=a, b=b)}]
        text = self.tokenizer.apply_chat_template(message, tokenize=False)
        if self.tokenizer.bos_token:
            text = text.replace(self.tokenizer.bos_token, "")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt_ids(self, triple: Triple) -> tuple[list[int], bool]:
        """Token ids of one ordered pair and whether its context was cut to fit `max_length`."""
        source, a, b = triple
        context, a, b = rlhflow_context(self.tokenizer, source), response_text(a), response_text(b)
        ids = self._ids(context, a, b)
        if len(ids) <= self.max_length:
            return ids, False
        context_ids = self.tokenizer.encode(context, add_special_tokens=False)
        keep = len(context_ids)
        while len(ids) > self.max_length and keep > 0:
            keep = max(keep - (len(ids) - self.max_length), 0)
            ids = self._ids(self.tokenizer.decode(context_ids[len(context_ids) - keep :]), a, b)
        if len(ids) > self.max_length:
            logger.warning("responses alone take %d > max_length=%d tokens; scoring them uncut",
                           len(ids), self.max_length)
        return ids, True

    def identity(self) -> dict:
        """What changes this judge's numbers: weights digest, dtype, tokenizer and chat template, limits."""
        if self._identity is None:
            self._identity = {
                "backend": "rlhflow", "weights": state_digest(self.model),
                "tokenizer": hashlib.sha256(self.tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]
                if hasattr(self.tokenizer, "backend_tokenizer") else type(self.tokenizer).__name__,
                "chat_template": hashlib.sha256(str(self.tokenizer.chat_template).encode()).hexdigest()[:16],
            }
        return {**self._identity, "dtype": str(self.dtype).removeprefix("torch."), "max_length": self.max_length,
                "swap_average": self.swap_average}

    def truncation_rate(self, triples: Sequence[Triple]) -> float:
        if not triples:
            return 0.0
        return sum(self.prompt_ids(t)[1] for t in triples) / len(triples)

    def pair_lengths(self, triples: Sequence[Triple]) -> list[int]:
        """Tokens of each triple's prompt (one order; after cutting the context to `max_length`)."""
        return [len(self.prompt_ids(t)[0]) for t in triples]

    # ---- scoring ------------------------------------------------------------------------------------------
    def score(
        self, triples: Sequence[Triple], *, batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """f(x, A, B) for each ordered triple (see the class docstring), float32 in the caller's order."""
        if not triples:
            return np.zeros(0, dtype=np.float32)
        if not self.swap_average:
            needed = list(dict.fromkeys(triples))
            diffs = dict(zip(needed, self.choice_logits(needed, batch_size, show_progress_bar)))
            return np.array([diffs[t] for t in triples], dtype=np.float32)
        return swap_averaged_logit(*self._order_logits(triples, batch_size, show_progress_bar)).astype(np.float32)

    def reference_probability(
        self, triples: Sequence[Triple], temperature: float = 1.0, *, batch_size: int | None = None
    ) -> np.ndarray:
        """The reference's P(A better): (sigmoid(d_AB / T) + sigmoid(-d_BA / T)) / 2 (float64), both orders always
        run, exactly 0.5 when A == B."""
        if not triples:
            return np.zeros(0)
        d_ab, d_ba = self._order_logits(triples, batch_size, None)
        p = (_sigmoid(d_ab / temperature) + _sigmoid(-d_ba / temperature)) / 2
        return np.where([a == b for _, a, b in triples], 0.5, p)

    def _order_logits(
        self, triples: Sequence[Triple], batch_size: int | None, show_progress_bar: bool | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """d of each triple and d of its swap (one forward per distinct ordered triple)."""
        needed = list(dict.fromkeys([*triples, *((s, b, a) for s, a, b in triples)]))
        diffs = dict(zip(needed, self.choice_logits(needed, batch_size, show_progress_bar)))
        return np.array([diffs[t] for t in triples]), np.array([diffs[(s, b, a)] for s, a, b in triples])

    def choice_logits(
        self, triples: Sequence[Triple], batch_size: int | None = None, show_progress_bar: bool | None = None
    ) -> np.ndarray:
        """logit("A") - logit("B") of the next token for each ordered triple (one forward each, batched by length)."""
        prompts = [self.prompt_ids(t)[0] for t in triples]
        batches = plan_batches([len(p) for p in prompts], self.max_tokens, batch_size)
        show_progress_bar = progress_enabled(show_progress_bar, len(batches), logger)
        out = np.empty(len(prompts), dtype=np.float64)
        with tqdm(total=len(prompts), unit="prompt", desc="RLHFlow", disable=not show_progress_bar) as bar:
            for batch in batches:
                out[batch] = self._forward([prompts[i] for i in batch])
                bar.update(len(batch))
        return out

    def _forward(self, prompts: list[list[int]]) -> np.ndarray:
        longest = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every row's last token is the last column
            input_ids[row, longest - len(ids) :] = torch.tensor(ids)
            mask[row, longest - len(ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.inference_mode(), autocast:  # logits of the last position only: not [B, L, vocab]
            logits = self.model(
                input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                position_ids=positions.to(self.device), logits_to_keep=1,
            ).logits[:, -1].float()
        return (logits[:, self.token_a] - logits[:, self.token_b]).cpu().numpy().astype(np.float64)


def load_rlhflow(
    name_or_path: str,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_length: int = MAX_LENGTH,
    max_tokens: int | None = None,
    swap_average: bool = True,
) -> RLHFlowScorer:
    """Load a causal-LM pair-preference model (hub id or local directory) as an `RLHFlowScorer`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except OSError as err:
        raise OSError(f"cannot load the RLHFlow judge {name_or_path!r}: {err}") from err
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{name_or_path}: the tokenizer has no chat template; the RLHFlow judge needs one")
    probe = [{"role": "user", "content": "?"}]
    if tokenizer.apply_chat_template(probe, tokenize=False) != tokenizer.apply_chat_template(
        probe, tokenize=False, add_generation_prompt=True
    ):
        logger.warning("%s: the chat template adds the assistant header only with add_generation_prompt; RLHFlow's "
                       "reference code does not ask for it, so prompts end at the user turn as they do there",
                       name_or_path)
    model.to(device).eval()
    logger.info("loaded RLHFlow pair-preference model from %s", name_or_path)
    return RLHFlowScorer(
        model, tokenizer, device=device, dtype=dtype, max_length=max_length, max_tokens=max_tokens,
        swap_average=swap_average,
    )
