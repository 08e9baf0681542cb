"""Sampling K responses per prompt for labeling, with transformers or vLLM, from the same `SamplingArguments`.

Prompts the policy cannot take are refused before any generation (`ResponseSampler.check_lengths`): a prompt whose
tokens (as the policy sees them: rendered with its chat template) plus `max_new_tokens` exceed the policy's context
(the smaller of `max_position_embeddings` and the tokenizer's `model_max_length`) would not fit, and a long one makes
the attention of `generate` grow with its square (one 20,000-word prompt took the tiny policy past 17 GB). vLLM
refuses such prompts itself (`max_model_len`).

Both backends get exactly the sampling that was asked (`core.generation`: `build_generation_config` for
transformers, `vllm_sampling_params` for vLLM); the checkpoint's own sampling fields apply only with
`use_checkpoint_sampling`. Sampling is seeded per call, so a chunk's responses do not depend on which process
labels it or on interruptions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from ..core.assets import resolve
from ..core.formats import Response
from ..core.generation import (
    SamplingArguments,
    build_generation_config,
    load_policy,
    load_vllm,
    render_prompts,
    sample_responses,
)
from ..core.sampling import check_backend


class ResponseSampler:
    """`num_responses` samples per prompt from a policy.

    Args:
        policy: a transformers causal LM or its path (`tiny`: the bundled one); for `backend="vllm"` a model path
            or a `vllm.LLM`.
        tokenizer: the policy's tokenizer (loaded with the policy when it is a path; transformers only).
        num_responses: K samples per prompt.
        sampling: how to sample (default `SamplingArguments()`: temperature 1, no filtering, 256 new tokens).
        backend: `transformers` or `vllm`.
        batch_size: prompts per `generate` call (transformers).
        compute_dtype: the dtype the forwards compute in (transformers; autocast, e.g. bfloat16 for fp32 master
            weights of a `bf16: true` run); None: the weights' own.

    Example:
        >>> sampler = ResponseSampler("tiny", num_responses=2, sampling=SamplingArguments(max_new_tokens=4))
        >>> len(sampler.generate(["Hi"], seed=0)[0])
        2
    """

    def __init__(
        self,
        policy: Any,
        tokenizer: Any = None,
        *,
        num_responses: int = 4,
        sampling: SamplingArguments | None = None,
        backend: str = "transformers",
        batch_size: int = 16,
        compute_dtype: torch.dtype | None = None,
    ):
        check_backend(backend, "backend")
        if batch_size < 1:
            raise ValueError(f"generation_batch_size must be >= 1, got {batch_size}")
        if sampling is not None and not isinstance(sampling, SamplingArguments):
            raise TypeError(f"sampling must be a SamplingArguments, got {type(sampling).__name__}")
        self.num_responses = num_responses
        self.sampling = sampling or SamplingArguments()
        self.backend = backend
        self.batch_size = batch_size
        self.compute_dtype = compute_dtype
        self.name = policy if isinstance(policy, str) else _name_of(policy)
        if backend == "vllm":
            engine = load_vllm(resolve(policy, "policy")) if isinstance(policy, str) else policy  # tiny: bundled
            self.policy, self.tokenizer = engine, None
            return
        self.policy, self.tokenizer = load_policy(policy) if isinstance(policy, str) else (policy.eval(), tokenizer)
        if self.tokenizer is None:
            raise ValueError("tokenizer is required when policy is a model object")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def identity(self) -> dict[str, Any]:
        """What changes the samples: the policy's name, backend, K, every sampling field and the batch size."""
        return {
            "policy": self.name,
            "backend": self.backend,
            "num_responses": self.num_responses,
            "sampling": dataclasses.asdict(self.sampling),
            "batch_size": self.batch_size if self.backend == "transformers" else None,
        }

    def context(self) -> int | None:
        """The most tokens the policy takes (prompt and response), or None when neither its config nor its
        tokenizer says (transformers backend only)."""
        if self.backend != "transformers":
            return None
        config = self.policy.config.get_text_config() if hasattr(self.policy, "config") else None
        limits = [getattr(config, "max_position_embeddings", None), getattr(self.tokenizer, "model_max_length", None)]
        limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 10**8]  # tokenizers say 1e30 for "none"
        return min(limits) if limits else None

    def check_lengths(self, prompts: Sequence[Any], source: str = "dataset", batch_size: int = 256) -> None:
        """ValueError naming the first row whose prompt, rendered as the policy sees it, leaves fewer than
        `max_new_tokens` tokens of the policy's context (see the module docstring); nothing to check for vLLM."""
        context = self.context()
        if context is None:
            return
        room = context - self.sampling.max_new_tokens
        if room < 1:
            raise ValueError(
                f"--max_new_tokens: {self.sampling.max_new_tokens} leaves no room for a prompt in the "
                f"policy's context of {context} tokens"
            )
        if prompts and not isinstance(prompts[0], str) and not self.tokenizer.chat_template:
            raise ValueError(
                "conversational prompts need a policy tokenizer with a chat template "
                "(--conversational false samples on the raw text)"
            )
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            texts = render_prompts(self.tokenizer, batch)
            lengths = [
                len(ids)
                for ids in self.tokenizer(
                    texts,
                    add_special_tokens=isinstance(batch[0], str),
                    return_attention_mask=False,
                    verbose=False,
                )["input_ids"]
            ]
            for k, n in enumerate(lengths):
                if n > room:
                    raise ValueError(
                        f"{source} row {start + k}: the prompt is {n} tokens for the policy; with max_new_tokens "
                        f"{self.sampling.max_new_tokens} its context of {context} tokens leaves room for {room}: "
                        "shorten or drop that prompt (or lower --max_new_tokens)"
                    )

    def generate(self, prompts: list[Any], seed: int) -> list[list[str]]:
        """`num_responses` responses per prompt (strings or message lists), reproducible under `seed`."""
        if not prompts:
            return []
        if self.backend == "vllm":
            return self._generate_vllm(prompts, seed)
        if not isinstance(prompts[0], str) and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("conversational prompts need a policy tokenizer with a chat template")
        config = build_generation_config(self.policy, self.tokenizer, self.sampling)
        device = getattr(self.policy, "device", torch.device("cpu"))
        responses: list[list[str]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                responses += sample_responses(
                    self.policy,
                    self.tokenizer,
                    batch,
                    self.num_responses,
                    generation_config=config,
                    compute_dtype=self.compute_dtype,
                )
        return responses

    def _generate_vllm(self, prompts: list[Any], seed: int) -> list[list[str]]:
        from ..core.generation import vllm_sampling_params

        checkpoint = None
        if self.sampling.use_checkpoint_sampling:  # the model's generation_config, as vLLM reads it
            checkpoint = self.policy.get_default_sampling_params()
        params = vllm_sampling_params(self.sampling, self.num_responses, seed=seed, checkpoint=checkpoint)
        if isinstance(prompts[0], str):
            outputs = self.policy.generate(prompts, params, use_tqdm=False)
        else:
            outputs = self.policy.chat(prompts, params, use_tqdm=False)
        return [[Response(o.text, finished=o.finish_reason != "length") for o in out.outputs] for out in outputs]


def _name_of(model: Any) -> str | None:
    if model is None:
        return None
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or type(model).__name__
