"""Sampling responses from a causal-LM policy exactly as asked, and loading one (`tiny`: the bundled stand-in).

transformers fills every generation field left at None from the checkpoint's `generation_config` (its
`_prepare_generation_config`: user > `model.generation_config` > global defaults), so a checkpoint that ships
`top_k=1` or a repetition penalty silently changes sampling. `build_generation_config` therefore sets every
sampling field explicitly: the user's value, else the neutral one (no top-k/top-p/min-p filtering, no penalty,
temperature 1), or the checkpoint's own value only with `use_checkpoint_sampling=True`. Token ids (EOS, PAD)
always come from the checkpoint and tokenizer. The vLLM backend gets the same parameters (`vllm_sampling_params`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import Any

import torch

from . import assets
from .engine import default_device
from .formats import Response
from .sampling import NEUTRAL, OFF, SamplingArguments  # noqa: F401 (SamplingArguments: API)
from .templates import render_chat


def build_generation_config(model: Any, tokenizer: Any, sampling: SamplingArguments) -> Any:
    """A `GenerationConfig` with every sampling field set explicitly (see the module docstring)."""
    from transformers import GenerationConfig

    checkpoint = getattr(model, "generation_config", None)
    eos = _eos_ids(checkpoint, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0] if eos else None
    config = GenerationConfig(
        do_sample=sampling.do_sample, max_new_tokens=sampling.max_new_tokens, eos_token_id=eos or None,
        pad_token_id=pad, stop_strings=list(sampling.stop) if sampling.stop else None, **OFF,
        **sampling.resolved(checkpoint),
    )
    if not sampling.do_sample:  # greedy: the sampling fields are unused; keep transformers from warning about them
        config.update(**{k: v for k, v in NEUTRAL.items()})
    return config


def _eos_ids(checkpoint: Any, tokenizer: Any) -> list[int]:
    ids = getattr(checkpoint, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def vllm_sampling_params(sampling: SamplingArguments, n: int, seed: int | None = None, checkpoint: Any = None,
                         stop_token_ids: list[int] | None = None) -> Any:
    """The same sampling as `build_generation_config`, as vLLM `SamplingParams` (top_k 0 means off in both).
    `stop_token_ids`: the EOS ids `generate` stops on (PPO passes them, so both backends end on the same tokens)."""
    from vllm import SamplingParams

    values = sampling.resolved(checkpoint)
    if not sampling.do_sample:
        values = {**NEUTRAL, "temperature": 0.0}
    stops = {"stop_token_ids": list(stop_token_ids)} if stop_token_ids else {}
    return SamplingParams(
        n=n, seed=seed, max_tokens=sampling.max_new_tokens, stop=list(sampling.stop) if sampling.stop else None,
        temperature=values["temperature"], top_p=values["top_p"], top_k=values["top_k"] or -1,
        min_p=values["min_p"], repetition_penalty=values["repetition_penalty"], **stops,
    )


def load_vllm(path: str, option: str = "backend", **engine_args: Any) -> Any:
    """A `vllm.LLM` for `path` (`engine_args`: vLLM's, e.g. `gpu_memory_utilization`, `dtype`), or a one-line
    ImportError naming `option` (the setting that asked for vLLM) when vLLM is not installed."""
    try:
        from vllm import LLM
    except ImportError as error:
        raise ImportError(
            f"{option}='vllm' needs the vllm package, which is not importable here "
            f"({error}); install it (pip install vllm) or use {option}='transformers'"
        ) from error
    return LLM(model=path, **engine_args)


def colocated_vllm(path: str, process_index: int, local_process_index: int, num_processes: int,
                   option: str = "sampling_backend", **engine_args: Any) -> Any:
    """A `vllm.LLM` for `path` on this process's own GPU inside a multi-process launch, as TRL's colocate mode makes
    it: vLLM's `distributed_executor_backend="external_launcher"` runs the engine in this process and reads the
    launcher's layout from RANK / LOCAL_RANK / WORLD_SIZE (a plain `LLM` in every process would put every engine on
    the first GPU). `engine_args`: vLLM's (`gpu_memory_utilization`, `dtype`, `seed`, ...)."""
    import os
    import socket

    os.environ["RANK"], os.environ["LOCAL_RANK"] = str(process_index), str(local_process_index)
    os.environ["WORLD_SIZE"] = str(num_processes)
    os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR") or "localhost"
    if not os.environ.get("MASTER_PORT"):  # one process without a launcher: any free port
        with socket.socket() as probe:
            probe.bind(("localhost", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    return load_vllm(path, option, distributed_executor_backend="external_launcher", **engine_args)


def load_policy(name: str, device: str | torch.device | None = None, dtype: str | None = None, *,
                revision: str | None = None, attn_implementation: str | None = None,
                train: bool = False) -> tuple[Any, Any]:
    """A causal LM and its tokenizer (pad token = EOS when it has none) from a hub id or directory; `tiny` is the
    bundled one. The one policy loader: `dtype` None keeps the checkpoint's (`auto`); eval mode on `device` (default:
    the best available) for sampling, or `train=True` (the recipes: train mode, fp32 masters by their `dtype`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve(name, "policy")
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype or "auto",
                                                 attn_implementation=attn_implementation)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device or default_device())
    return (model.train() if train else model.eval()), tokenizer


def render_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[str]:
    """Prompt texts: strings as they are, message lists through the tokenizer's chat template (generation prompt;
    bounded: `templates.render_chat`)."""
    return [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]


def compute_context(model: Any, compute_dtype: torch.dtype | None) -> Any:
    """Autocast to `compute_dtype` on the model's device, so fp32 master weights sample with bf16 matmuls (a run with
    `bf16: true`); nothing when `compute_dtype` is None or already the weights' dtype."""
    device = getattr(model, "device", torch.device("cpu"))
    weights = next(iter(model.parameters()), None)
    if compute_dtype is None or (weights is not None and weights.dtype == compute_dtype):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    n: int,
    sampling: SamplingArguments | None = None,
    generation_config: Any = None,
    *,
    compute_dtype: torch.dtype | None = None,
    **sampling_fields: Any,
) -> list[list[str]]:
    """`n` responses per prompt (strings, or message lists rendered with the chat template), decoded without special
    tokens. The generation config is `generation_config`, else built from `sampling`, else from `sampling_fields`
    (`SamplingArguments` fields such as `temperature=0.7`, `max_new_tokens=64`). `compute_dtype` (e.g. bfloat16 for a
    `bf16: true` run): the forwards run under autocast to it (`compute_context`).
    """
    if sum(x is not None and x != {} for x in (sampling, generation_config, sampling_fields)) > 1:
        raise ValueError("give one of sampling, generation_config or SamplingArguments fields, not several")
    if not prompts:
        return []
    try:
        sampling = sampling or SamplingArguments(**sampling_fields)
    except TypeError as err:
        raise TypeError(f"sample_responses: {err} (fields: {sorted(SamplingArguments.__dataclass_fields__)})") from None
    config = generation_config or build_generation_config(model, tokenizer, sampling)
    config = copy.deepcopy(config)
    config.num_return_sequences = n
    texts = render_prompts(tokenizer, prompts)
    padding_side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"  # generation continues from the right end
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:  # chat templates already hold their special tokens; plain strings get the tokenizer's own (e.g. BOS)
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=isinstance(prompts[0], str))
    finally:
        tokenizer.padding_side, tokenizer.pad_token = padding_side, pad_token
    enc = {k: v.to(model.device) for k, v in enc.items()}
    extra = {"tokenizer": tokenizer} if config.stop_strings else {}
    with torch.inference_mode(), compute_context(model, compute_dtype):
        out = model.generate(**enc, generation_config=config, **extra)
    generated = out[:, enc["input_ids"].shape[1] :]
    decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
    # cut at the limit = the row runs to max_new_tokens and its last token is neither EOS nor padding (TRL's rule)
    ended = set(_eos_ids(config, tokenizer)) | {config.pad_token_id}
    full = generated.shape[1] >= (config.max_new_tokens or generated.shape[1] + 1)
    decoded = [Response(text, finished=not full or int(row[-1]) in ended) for text, row in zip(decoded, generated)]
    return [decoded[i * n : (i + 1) * n] for i in range(len(prompts))]
