"""PPO's rollouts sampled by vLLM (`sampling_backend: vllm`): a `vllm.LLM` colocated with the trainer on each process's
GPU, as TRL's `vllm_mode="colocate"` does for GRPO (`trl/generation/vllm_generation.py`, TRL 1.16).

- Engine: one per process (each process samples its own rollouts, as with transformers), made with vLLM's
  `distributed_executor_backend="external_launcher"` so that it runs inside the launcher's process instead of
  spawning its own; `vllm_gpu_memory_utilization` is its share of the GPU beside the training state; the model's own
  context length (the held-out prompts it also samples are not cut to `max_prompt_length`); bf16 with `bf16: true`
  (the policy's compute dtype).
- Weights: pushed into the engine (`load_weights`, as TRL) whenever the policy changed since the last push: before
  the first rollout, before each later one (after every update) and before an evaluation. Under ZeRO-3 each
  parameter is gathered for its push (a collective: every process syncs). A LoRA policy is gathered whole and each
  adapted weight is pushed as `W + delta` computed out of place: TRL merges the adapter into the base and unmerges it
  after, which on a bf16 frozen base (PPO keeps a LoRA base in its loaded dtype) would move the base, and with it the
  reference, by a rounding error at every push.
- Sampling: `core.generation.vllm_sampling_params` from the same `SamplingArguments` as the transformers path's
  `GenerationConfig` (temperature only; no top-k/top-p, whatever the checkpoint says), with the same EOS ids as stop
  tokens. One `SamplingParams` per prompt, seeded `base + row`, `base` drawn from the process's torch generator (seeded
  `seed + rank`, saved in every checkpoint): a resumed run draws the same seeds, and equal prompts get different
  samples.
- Output: the completion token ids vLLM returns (an EOS it stopped on included), right-padded. The trainer's EOS rule
  is then applied unchanged: a response without an EOS id (vLLM's finish_reason "length") is unfinished.

The recomputed log-probabilities stay the policy's own (the old log-probs of the PPO ratio): vLLM's bf16 kernels
sample from a distribution a little different from the policy's, which PPO's ratio does not correct.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core.generation import SamplingArguments, colocated_vllm, vllm_sampling_params
from ..core.sampling import check_backend
from .ppo_config import PPOConfig


class VLLMRollouts:
    """A colocated `vllm.LLM` for `policy_path` that samples PPO's rollouts from prompt token ids.

    Args:
        policy_path: the policy's checkpoint (vLLM loads its architecture and tokenizer; the weights are replaced
            by the policy's at the first `sync`).
        config: the run's `PPOConfig`.
        accelerator: the run's accelerator (process index and count for the external launcher).
        eos_ids: the ids the transformers path stops on (`GenerationConfig.eos_token_id`).
        pad_id: the padding id of the returned responses.
    """

    def __init__(self, policy_path: str, config: PPOConfig, accelerator: Any, eos_ids: list[int], pad_id: int):
        self.llm = colocated_vllm(
            policy_path, accelerator.process_index, accelerator.local_process_index, accelerator.num_processes,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization, seed=config.seed + accelerator.process_index,
            dtype="bfloat16" if config.bf16 else "auto")
        self.sampling = SamplingArguments(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
        self.eos_ids, self.pad_id = list(eos_ids), pad_id
        self.synced_step: int | None = None  # the update whose weights the engine holds
        accelerator.wait_for_everyone()  # every engine is up before training collectives start (as TRL)

    def sync(self, policy: nn.Module, step: int, zero3: bool) -> None:
        """Push `policy`'s weights (as of update `step`) into the engine unless they are there already. Under ZeRO-3
        a collective: every process calls it at the same point."""
        if self.synced_step == step:
            return
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in policy_weights(policy, zero3):
            model.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.synced_step = step

    def generate(self, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """One response per left-padded prompt row: the sampled token ids, right-padded with `pad_id`, on the
        query's device (see the module docstring for the seeds)."""
        prompts = [{"prompt_token_ids": row[mask.bool()].tolist()} for row, mask in zip(query.cpu(), query_mask.cpu())]
        base = int(torch.randint(0, 2**31 - len(prompts), ()))
        params = [vllm_sampling_params(self.sampling, 1, seed=base + row, stop_token_ids=self.eos_ids)
                  for row in range(len(prompts))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        ids = [list(out.outputs[0].token_ids) for out in outputs]
        response = torch.full((len(ids), max(map(len, ids), default=1)), self.pad_id, dtype=torch.long)
        for row, tokens in zip(response, ids):
            row[: len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return response.to(query.device)


def make_rollouts(config: PPOConfig, policy: nn.Module, accelerator: Any, eos_ids: list[int],
                  pad_id: int) -> VLLMRollouts | None:
    """The vLLM rollout engine for `sampling_backend: vllm`, None for transformers; a one-line error otherwise."""
    check_backend(config.sampling_backend)
    if config.sampling_backend == "transformers":
        return None
    return VLLMRollouts(policy.name_or_path, config, accelerator, eos_ids, pad_id)


@contextmanager
def _gathered(params: list[nn.Parameter], zero3: bool) -> Iterator[None]:
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def policy_weights(policy: nn.Module, zero3: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of each of the policy's weights under the checkpoint's names (what vLLM's `load_weights`
    takes): a plain model's parameters one by one (each gathered under ZeRO-3), or for a LoRA model its base
    weights with the active adapters' deltas added out of place (the model gathered whole; adapter weights and
    PEFT's name prefixes left out). Tied weights come once, as `named_parameters` gives them."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        for name, param in policy.named_parameters():
            with _gathered([param], zero3):
                yield name, param.data
        return
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in policy.named_modules() if isinstance(m, LoraLayer)}
    with _gathered(list(policy.parameters()), zero3):
        for name, param in policy.named_parameters():
            if "lora_" in name or "original_module" in name:  # the adapter itself; modules_to_save's frozen copy
                continue
            tensor = param.data
            owner = name.rsplit(".", 1)[0].removesuffix(".base_layer")
            layer = layers.get(owner)
            if layer is not None and name.endswith("base_layer.weight") and not layer.merged:
                for adapter in layer.active_adapters:
                    if layer.use_dora.get(adapter):
                        raise ValueError("sampling_backend vllm: DoRA adapters are not supported (their merged "
                                         "weight is not W + BA); use plain LoRA or sampling_backend transformers")
                    tensor = tensor.float() + layer.get_delta_weight(adapter).float()
            clean = name.removeprefix("base_model.model.").replace(".base_layer", "")
            yield clean.replace("modules_to_save.default.", ""), tensor
