"""The recipes' held-out evaluation: sampling in the run's compute dtype (transformers, or vLLM with
`sampling_backend: vllm`), PairRM win rates, and the collective `evaluate_everywhere`. Imported through `_common`.

Not part of the library (`pairrm_rlhf` never imports recipes).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from typing import Any

import numpy as np
import torch

from pairrm_rlhf.core import assets, generation
from pairrm_rlhf.core.generation import SamplingArguments, build_generation_config, sample_responses
from pairrm_rlhf.core.sampling import check_backend
from pairrm_rlhf.evaluation.length import length_controlled_win_rate
from pairrm_rlhf.labeling.generation import ResponseSampler
from pairrm_rlhf.pairrm import PairRM
from pairrm_rlhf.trl.judge import PairRMJudge


def compute_dtype(training_args: Any) -> torch.dtype | None:
    """The dtype the run computes in: bfloat16 with `bf16: true`, float16 with `fp16: true`, else None (the weights').
    Sampling for labeling and evaluation uses it too, so fp32 master weights never sample in fp32 on a bf16 run."""
    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(training_args, "fp16", False) else None


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list,
    sampling: SamplingArguments,
    *,
    seed: int,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """One sampled response per prompt (`core.generation.sample_responses`), reproducible under `seed`, computed in
    `dtype` (autocast; None: the weights' dtype)."""
    model.eval()
    config = build_generation_config(model, tokenizer, sampling)
    device = next(model.parameters()).device
    out: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in range(0, len(prompts), batch_size):
            out += [
                r[0]
                for r in sample_responses(
                    model, tokenizer, prompts[s : s + batch_size], 1, generation_config=config, compute_dtype=dtype
                )
            ]
    return out


def vllm_generate(
    policy: Any,
    prompts: list,
    sampling: SamplingArguments,
    *,
    seed: int,
    dtype: torch.dtype | None = None,
    gpu_memory_utilization: float = 0.3,
) -> list[str]:
    """One response per prompt sampled by vLLM through the labeler's vLLM backend (`ResponseSampler`: the same
    `SamplingParams` as `generate`'s `GenerationConfig`, seeded with `seed`). `policy`: a running `vllm.LLM` (PPO's
    rollout engine, its weights synced), or a saved model's path: an engine is made for this call in `dtype` (None:
    vLLM's `auto`) and released after it, so training gets the memory back."""
    if not isinstance(policy, str):
        return [r[0] for r in ResponseSampler(policy, backend="vllm", num_responses=1, sampling=sampling).generate(
            prompts, seed)]
    engine = generation.load_vllm(assets.resolve(policy, "policy"), option="sampling_backend", seed=seed,
                       dtype=dtype or "auto", gpu_memory_utilization=gpu_memory_utilization)
    try:
        return vllm_generate(engine, prompts, sampling, seed=seed)
    finally:
        del engine  # the engine's process and its GPU memory go with the last reference
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_sampling_backend(config: Any) -> None:
    """A one-line ValueError for a `sampling_backend` that is neither transformers nor vllm; `vllm` also turns on the
    TRL trainer's own vLLM rollouts (`use_vllm`; `vllm_mode` colocate by default, or server) where it has them."""
    check_backend(config.sampling_backend)
    if hasattr(config, "use_vllm"):
        config.use_vllm |= config.sampling_backend == "vllm"


def check_vllm_evaluation(backend: str, use_peft: bool, eval_prompts: int) -> None:
    """A one-line ValueError when the held-out evaluation would have vLLM sample a LoRA adapter: vLLM evaluates the
    saved output, which with `use_peft` is an adapter, not a model it can load."""
    if backend == "vllm" and use_peft and eval_prompts:
        raise ValueError(
            "--sampling_backend vllm: the held-out evaluation samples the saved output with vLLM, which needs full "
            "weights, and with use_peft the output is a LoRA adapter; use eval_prompts 0, or sampling_backend "
            "transformers with use_vllm true (TRL's vLLM rollouts only)"
        )


def win_rate(pairrm: PairRM, prompts: list, first: list[str], second: list[str]) -> dict[str, float]:
    """PairRM's verdicts of `first` over `second`: win rate (ties count 1/2), the length-controlled win rate (at zero
    length difference in characters, `evaluation.length`), tie rate, mean two-order logit."""
    z = PairRMJudge(pairrm).two_order_logits(prompts, [[a, b] for a, b in zip(first, second)])
    wins = (z > 0) + 0.5 * (z == 0)
    lc = length_controlled_win_rate(wins, [len(a) for a in first], [len(b) for b in second])
    return {
        "win_rate": float(np.mean(wins)),
        "lc_win_rate": lc,
        "ties": float(np.mean(z == 0)),
        "mean_logit": float(np.mean(z)),
    }


class Evaluator:
    """Held-out evaluation: the policy's samples vs the initial policy's (the first call's, kept in
    `eval_before.json`) and vs the references, by the judge. Appends to `eval_metrics.json` and the completions
    table `eval_completions.jsonl` in `output_dir`. Sampling runs under a forked RNG (training is unchanged).
    `backend="vllm"`: sampled by vLLM (`vllm_generate`) from a saved path or a running `vllm.LLM`."""

    def __init__(
        self,
        judge: PairRM,
        prompts: list,
        references: list[str] | None,
        sampling: SamplingArguments,
        seed: int,
        output_dir: str,
        dtype: torch.dtype | None = None,
        backend: str = "transformers",
        gpu_memory_utilization: float = 0.3,
    ):
        check_backend(backend)
        self.judge, self.prompts, self.references, self.sampling, self.seed = judge, prompts, references, sampling, seed
        self.dtype = dtype  # the run's compute dtype (`compute_dtype`): sampling runs under autocast to it
        self.backend, self.gpu_memory_utilization = backend, gpu_memory_utilization
        self.output_dir, self.before, self.history = output_dir, None, []
        history_file = os.path.join(output_dir, "eval_metrics.json")
        if os.path.exists(history_file):  # a resumed run continues the history
            with open(history_file) as f:
                self.history = json.load(f)

    def __call__(self, model: Any, tokenizer: Any, step: int, write: bool = True) -> dict[str, float]:
        """The metrics of `model` at `step` (vLLM: its saved path or a `vllm.LLM`; no tokenizer needed);
        `write=False` (the other processes under ZeRO-3) skips the files."""
        if self.backend == "vllm":
            samples = vllm_generate(model, self.prompts, self.sampling, seed=self.seed, dtype=self.dtype,
                                    gpu_memory_utilization=self.gpu_memory_utilization)
        else:
            samples = generate(model, tokenizer, self.prompts, self.sampling, seed=self.seed, dtype=self.dtype)
        before_file = os.path.join(self.output_dir, "eval_before.json")
        if self.before is None and os.path.exists(before_file):  # a resumed run keeps the initial policy's samples
            with open(before_file) as f:
                self.before = json.load(f)
        if self.before is None:
            self.before = samples
            if write:
                os.makedirs(self.output_dir, exist_ok=True)
                with open(before_file, "w") as f:
                    json.dump(samples, f)
        metrics: dict[str, float] = {"step": step, "mean_length": float(sum(len(s) for s in samples) / len(samples))}
        for name, verdict in (
            ("vs_initial", win_rate(self.judge, self.prompts, samples, self.before)),
            ("vs_reference", self.references and win_rate(self.judge, self.prompts, samples, self.references)),
        ):
            if verdict:
                metrics.update({f"{name}/{k}": v for k, v in verdict.items()})
        self.history = [h for h in self.history if h["step"] < step] + [metrics]
        if not write:
            return metrics
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "eval_metrics.json"), "w") as f:
            json.dump(self.history, f, indent=1)
        with open(os.path.join(self.output_dir, "eval_completions.jsonl"), "a") as f:
            for prompt, sample in zip(self.prompts, samples):
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": sample}) + "\n")
        return metrics


def zero3_enabled() -> bool:
    """Is DeepSpeed ZeRO-3 active (parameters partitioned across processes)?"""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def gathered(model: Any):
    """Every parameter of `model` whole on this process for generation under ZeRO-3, as TRL's
    `unwrap_model_for_generation` does (collective: every process must enter); nothing otherwise."""
    if not zero3_enabled():
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield model


def evaluate_everywhere(
    evaluator: Evaluator, model: Any, tokenizer: Any, step: int, saved: str | None = None
) -> dict[str, float]:
    """`evaluator(model, ...)` as a multi-process run needs it (collective: every process must call it). Under ZeRO-3
    every process gathers the parameters and samples (generation needs every rank; the main process writes the files);
    otherwise the main process samples alone. Every process returns the main process's metrics.

    vLLM (`evaluator.backend`): the main process samples from `saved`, the model's saved path, while the others wait in
    the broadcast. vLLM reads the saved weights itself, so no rank gathers anything; one engine for a few hundred
    held-out prompts instead of one per process spares every other GPU an engine's memory beside its training
    state."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    metrics: list[Any] = [None]
    if evaluator.backend == "vllm":
        if saved is None:
            raise ValueError("evaluate_everywhere: sampling_backend vllm samples from the saved model: pass its path")
        if state.is_main_process:
            metrics = [evaluator(saved, None, step)]
    elif state.is_main_process or zero3_enabled():
        with gathered(model):
            metrics = [evaluator(model, tokenizer, step, write=state.is_main_process)]
    if state.num_processes > 1:
        metrics = broadcast_object_list(metrics)
    return metrics[0]
