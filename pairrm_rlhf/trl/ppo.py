"""A compact PPO trainer for RLHF on the current stack (transformers + accelerate + peft; TRL removed its PPO).

One update = sample a batch of prompts, generate responses, score them with a reward function (e.g. PairRM against
the row's reference response through `PairwiseReward`), then run several PPO epochs over minibatches.
It follows "The N Implementation Details of RLHF with PPO" (Huang et al., 2024):

- responses are truncated after the first EOS (everything after it is padding, masked out of every loss);
  a response without EOS can be penalised (`missing_eos_penalty` is subtracted from its score);
- the score goes on the last response token; every token gets a KL penalty `-kl_coef * (logp - logp_ref)`;
- log-probabilities are recomputed with the sampling temperature (logits / T) and sampling has no top-k/top-p
  (one explicit `GenerationConfig` from `core.generation.build_generation_config`: the checkpoint's
  generation_config, e.g. Qwen's top_k=20 and repetition penalty, never applies), so the recomputed distribution
  is the one sampled from;
- GAE (gamma, lam) over response tokens, advantages whitened over all processes' valid tokens (optionally rewards);
- clipped policy loss and clipped value loss, `num_ppo_epochs` passes over `num_mini_batches` minibatches with
  gradient accumulation; dropout is disabled; Adam eps 1e-5; linear learning-rate decay.

Value function: a linear head on the policy's last hidden state (shared backbone, zero-initialised), or with
`separate_critic` on a trainable copy of the initial policy's backbone (see `ppo_model.PolicyWithValueHead`).
Reference policy: a frozen copy of the initial policy, or with LoRA (`peft_config`) the same model with its adapter
disabled.
Rollouts: the policy's `generate`, or with `sampling_backend: vllm` a colocated vLLM engine (`ppo_vllm`: the same
sampling and EOS ids, the policy's weights pushed into it after every update).

DeepSpeed: the batch sizes and `max_grad_norm` (as `gradient_clipping`) go into the DeepSpeed config; under
ZeRO-3 generation gathers the sharded parameters, and the reference is wrapped by TRL's `prepare_deepspeed`
(sharded with ZeRO-3, eval mode). Models loaded after `make_accelerator` are partitioned as they load.

Precision (`ppo_model.prepare_models`): what trains (the policy, or only the LoRA adapter) is cast to float32 (master
weights); a frozen LoRA base keeps its loaded dtype. `bf16: true` runs every forward (policy, value head, reference,
generation) under accelerate's autocast, so the reference computes exactly what the policy does at step 0 (KL 0).
`keep_half_precision_weights: true` trains bf16/fp16 weights directly (with a warning: AdamW updates below bf16's
resolution are lost).

Durability (`ppo_checkpoint`): `save_steps` writes `output_dir/checkpoint-<update>`: the trainable weights (with LoRA
the adapter only) and value head, optimizer, scheduler, every process's RNG states, update count and log history, in
safetensors and JSON (no pickle), with a manifest of the run identity and every file's SHA-256, written last.
`resume_from_checkpoint` (a checkpoint directory, or `true` for the latest complete one in `output_dir`) refuses a
damaged, incomplete or foreign checkpoint naming the file, and otherwise continues exactly where it stopped: the
resumed run logs the same metrics as an uninterrupted one.
A reward of None or NaN masks its row out of every loss and the whitening; `objective/invalid_rewards` counts them.
Metrics that only some processes log (a reward function's `log_metric`) are averaged over the processes that have
them, so differing keys cannot hang the reduce.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.integrations import is_deepspeed_zero3_enabled

from ..core.distributed import cpu_deepspeed_backend
from ..core.generation import SamplingArguments, build_generation_config
from ..core.progress import progress_enabled
from . import ppo_checkpoint
from .ppo_checkpoint import checkpoints, latest_complete, run_identity
from .ppo_config import PPOConfig
from .ppo_model import PolicyWithValueHead, masked_mean, prepare_models, separate_critic
from .ppo_rewards import RewardScaler, gae, whiten
from .ppo_vllm import make_rollouts

__all__ = ["PPOConfig", "PPOTrainer", "PolicyWithValueHead", "checkpoints", "make_accelerator"]

logger = logging.getLogger(__name__)

RewardFn = Callable[..., list[float]]


def make_accelerator(config: PPOConfig) -> Accelerator:
    """The run's accelerator, with the batch sizes in its DeepSpeed config (no prepared dataloader infers them).
    Made before the models are loaded, its DeepSpeed ZeRO-3 config (with `zero3_init`) partitions them at load."""
    backend = cpu_deepspeed_backend()  # DeepSpeed on a CPU-only machine: gloo, or every rank thinks it is alone
    handlers = [InitProcessGroupKwargs(backend=backend)] if backend else []
    accelerator = Accelerator(cpu=config.use_cpu, gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision="bf16" if config.bf16 else None, log_with=config.report_to or None,
                              project_dir=config.output_dir, kwargs_handlers=handlers)
    deepspeed = accelerator.state.deepspeed_plugin
    if deepspeed is not None:
        deepspeed.deepspeed_config["train_micro_batch_size_per_gpu"] = config.per_device_train_batch_size
        deepspeed.deepspeed_config["gradient_accumulation_steps"] = config.gradient_accumulation_steps
        deepspeed.deepspeed_config["train_batch_size"] = (
            config.per_device_train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes)
    return accelerator


class PPOTrainer:
    """PPO on prompts (`prompt` column: strings or message lists; other columns go to the reward function).

    Args:
        config: `PPOConfig`.
        policy: a transformers causal LM (trained in place; wrapped with LoRA when `peft_config` is given).
        tokenizer: its tokenizer (left padding is used for prompts).
        reward_fn: TRL-style reward function `f(prompts=..., completions=..., **columns) -> list[float]`,
            e.g. `PairwiseReward(pairrm, output="logit")`. Each process scores its own rollouts.
        train_dataset: a `datasets.Dataset` (or anything indexable by a list of rows returning a dict of lists).
        ref_policy: the frozen reference; default a copy of `policy` (or the adapter-disabled model with LoRA).
            Under ZeRO-3 a policy loaded after `make_accelerator` is partitioned and cannot be copied: load
            the reference like the policy, after `make_accelerator`, and pass it.
        peft_config: a `peft.PeftConfig` to train a LoRA adapter instead of the full policy.
        accelerator: from `make_accelerator(config)` when the models must be loaded after it (ZeRO-3 partitions
            them at load only while its DeepSpeed config is alive); default: made here.
    """

    def __init__(self, config: PPOConfig, policy: nn.Module, tokenizer: Any, reward_fn: RewardFn, train_dataset: Any,
                 ref_policy: nn.Module | None = None, peft_config: Any = None, accelerator: Accelerator | None = None):
        self.config, self.tokenizer, self.reward_fn, self.dataset = config, tokenizer, reward_fn, train_dataset
        if config.local_batch_size < 1 or config.num_ppo_epochs < 1:
            raise ValueError("batch sizes, num_mini_batches and num_ppo_epochs must be >= 1")
        RewardScaler(config.reward_scaling)  # a bad name stops here, before any model work
        self.accelerator = accelerator or make_accelerator(config)
        deepspeed = self.accelerator.state.deepspeed_plugin
        # models loaded after `make_accelerator` under ZeRO-3 are partitioned (transformers' zero.Init)
        partitioned = accelerator is not None and deepspeed is not None and is_deepspeed_zero3_enabled()
        if partitioned and ref_policy is None and peft_config is None:
            raise ValueError("ref_policy: under ZeRO-3 a policy loaded after make_accelerator is partitioned and "
                             "cannot be copied; load the reference the same way and pass it")
        torch.manual_seed(config.seed)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_id, self.eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        # partitioned: DeepSpeed holds the fp32 masters of the trainable partitions itself; nothing is cast here
        policy, ref_policy = prepare_models(policy, ref_policy, peft_config, config.keep_half_precision_weights,
                                            cast=not partitioned)
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable()
            if peft_config is not None:
                policy.enable_input_require_grads()
        self.ref_policy = None
        if ref_policy is not None:
            if deepspeed is not None:  # sharded like the policy under ZeRO-3 (eval mode, no optimizer), as TRL does
                from trl.models.utils import prepare_deepspeed

                self.ref_policy = prepare_deepspeed(ref_policy, self.accelerator)
            else:
                self.ref_policy = ref_policy.to(self.accelerator.device)
        if config.separate_critic and partitioned:
            raise ValueError("separate_critic: not supported with models partitioned at load (ZeRO-3 zero3_init)")
        model = PolicyWithValueHead(policy, separate_critic(policy, peft_config) if config.separate_critic else None)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate,
                                      eps=config.adam_epsilon, weight_decay=config.weight_decay)
        world = self.accelerator.num_processes
        episodes = config.total_episodes or math.ceil(config.num_train_epochs * len(train_dataset))
        self.num_updates = max(1, episodes // (config.local_batch_size * world))
        if len(train_dataset) < config.local_batch_size * world:
            raise ValueError(f"the dataset has {len(train_dataset)} rows; one update needs "
                             f"{config.local_batch_size * world}")
        steps = self.num_updates * config.num_ppo_epochs * config.num_mini_batches
        self.scheduler = get_scheduler(config.lr_scheduler_type, optimizer, config.warmup_steps, steps)
        if deepspeed is not None and config.max_grad_norm:  # DeepSpeed clips inside its own step
            deepspeed.deepspeed_config["gradient_clipping"] = config.max_grad_norm
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.deepspeed = deepspeed is not None
        self.reward_scaler = RewardScaler(config.reward_scaling)
        self.identity = run_identity(config, self.accelerator.num_processes, model)
        torch.manual_seed(config.seed + self.accelerator.process_index)  # each process samples its own responses
        sampling = SamplingArguments(max_new_tokens=config.max_new_tokens, temperature=config.temperature)
        self.generation_config = build_generation_config(policy, tokenizer, sampling)
        self.eos_ids = torch.tensor(self.generation_config.eos_token_id or [self.eos_id])
        # `sampling_backend: vllm`: a colocated vLLM engine samples the rollouts (`ppo_vllm`); None: generate
        self.vllm = make_rollouts(config, policy, self.accelerator, self.eos_ids.tolist(), self.pad_id)
        self.log_history: list[dict[str, float]] = []
        self.update_step = 0
        self._zero3 = getattr(deepspeed, "zero_stage", 0) == 3
        if config.report_to:
            self.accelerator.init_trackers("pairrm-ppo",
                                           config={k: v for k, v in asdict(config).items() if v is not None})

    # ---- data ------------------------------------------------------------------------------------------
    def _batches(self, skip: int = 0) -> Iterator[dict[str, list]]:
        """This process's share of each global batch; one shuffled permutation per epoch, the same on every process.
        The first `skip` batches are passed over without reading them (the data position of a resumed run)."""
        size, rank = self.config.local_batch_size, self.accelerator.process_index
        generator = torch.Generator().manual_seed(self.config.seed)
        while True:
            order = torch.randperm(len(self.dataset), generator=generator).tolist()
            step = size * self.accelerator.num_processes
            for start in range(0, len(order) - step + 1, step):
                if skip:
                    skip -= 1
                    continue
                rows = order[start + rank * size : start + (rank + 1) * size]
                yield self.dataset[rows]

    def _encode(self, prompts: list) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        chat = not isinstance(prompts[0], str)
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if chat else p for p in prompts]
        side, tside = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "left", "left"
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=not chat,
                      truncation=self.config.max_prompt_length is not None, max_length=self.config.max_prompt_length)
        finally:
            tok.padding_side, tok.truncation_side = side, tside
        return {k: v.to(self.accelerator.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    # ---- forward passes ---------------------------------------------------------------------------------
    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.gather(F.log_softmax(logits.float() / self.config.temperature, -1), 2, tokens[..., None])[..., 0]

    @staticmethod
    def _inputs(query: torch.Tensor, query_mask: torch.Tensor, response: torch.Tensor, response_mask: torch.Tensor):
        input_ids = torch.cat([query, response], 1)
        attention_mask = torch.cat([query_mask, response_mask.long()], 1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return input_ids, attention_mask, position_ids

    def _response_logits(self, model: nn.Module, batch: tuple, context: int, value: bool):
        input_ids, attention_mask, position_ids = batch
        if value:
            logits, values = model(input_ids, attention_mask, position_ids)
            return logits[:, context - 1 : -1], values[:, context - 1 : -1]
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).logits
        return logits[:, context - 1 : -1], None

    @torch.no_grad()
    def rollout(self, batch: dict[str, list]) -> dict[str, Any]:
        """Generate, score and evaluate one batch: everything the PPO epochs need."""
        cfg, acc = self.config, self.accelerator
        prompts = batch["prompt"]
        enc = self._encode(prompts)
        query, query_mask, context = enc["input_ids"], enc["attention_mask"], enc["input_ids"].shape[1]
        unwrapped = acc.unwrap_model(self.model)
        unwrapped.eval()  # generation with the KV cache (activation checkpointing is for training only)
        chunk = cfg.local_rollout_forward_batch_size
        responses = []
        if self.vllm is not None:  # the policy's weights pushed first when an update changed them
            self.vllm.sync(unwrapped.policy, self.update_step, self._zero3)
            responses.append(self.vllm.generate(query, query_mask))
        else:
            with self._gathered(unwrapped), acc.autocast():
                for s in range(0, len(prompts), chunk):
                    out = unwrapped.policy.generate(input_ids=query[s : s + chunk],
                                                    attention_mask=query_mask[s : s + chunk],
                                                    generation_config=self.generation_config, synced_gpus=self._zero3)
                    responses.append(out[:, context:])
        width = max(r.shape[1] for r in responses)
        response = torch.cat([F.pad(r, (0, width - r.shape[1]), value=self.pad_id) for r in responses])
        is_eos = torch.isin(response, self.eos_ids.to(response.device))
        has_eos = is_eos.any(1)
        length = torch.where(has_eos, is_eos.int().argmax(1) + 1, torch.full_like(has_eos, width, dtype=torch.long))
        mask = torch.arange(width, device=response.device)[None] < length[:, None]
        response = response.masked_fill(~mask, self.pad_id)
        texts = self.tokenizer.batch_decode([r[: n - int(e)] for r, n, e in zip(response, length, has_eos)],
                                            skip_special_tokens=True)
        completions = texts if isinstance(prompts[0], str) else [[{"role": "assistant", "content": t}] for t in texts]
        columns = {k: v for k, v in batch.items() if k != "prompt"}
        metrics: dict[str, float] = {}
        raw = self.reward_fn(prompts=prompts, completions=completions, log_metric=metrics.__setitem__, **columns)
        scores = torch.tensor([math.nan if r is None else float(r) for r in raw], device=acc.device)
        valid = ~torch.isnan(scores)  # a row without a reward is masked out of every loss
        mask &= valid[:, None]
        penalized = self.reward_scaler(scores, valid, self._sum)
        if cfg.missing_eos_penalty is not None:
            penalized[~has_eos] -= cfg.missing_eos_penalty
        logprobs, ref_logprobs, values = [], [], []
        for s in range(0, len(prompts), chunk):
            part = self._inputs(query[s : s + chunk], query_mask[s : s + chunk], response[s : s + chunk],
                                mask[s : s + chunk])
            logits, value = self._response_logits(self.model, part, context, value=True)
            logprobs.append(self._logprobs(logits, response[s : s + chunk]))
            values.append(value.float())
            with acc.autocast():  # the policy's compute dtype (accelerate wraps only the prepared model's forward)
                if self.ref_policy is not None:
                    ref_logits, _ = self._response_logits(self.ref_policy, part, context, value=False)
                else:
                    with unwrapped.policy.disable_adapter():
                        ref_logits, _ = self._response_logits(unwrapped.policy, part, context, value=False)
            ref_logprobs.append(self._logprobs(ref_logits, response[s : s + chunk]))
        rollout = dict(query=query, query_mask=query_mask, response=response, mask=mask.float(), length=length,
                       logprobs=torch.cat(logprobs), ref_logprobs=torch.cat(ref_logprobs), values=torch.cat(values),
                       scores=scores, penalized=penalized, has_eos=has_eos.float(), texts=texts, metrics=metrics,
                       valid=valid.float())
        self._advantages(rollout)
        return rollout

    def _gathered(self, unwrapped: nn.Module):
        """ZeRO-3 shards parameters: gather them once for the whole generation (as TRL's
        `unwrap_model_for_generation` does; every process generates, with `synced_gpus`)."""
        if not self._zero3:
            return nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(unwrapped.parameters()))

    # ---- advantages (ppo_rewards) -------------------------------------------------------------------------
    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, reduction="sum")

    def _advantages(self, r: dict[str, Any]) -> None:
        cfg, mask = self.config, r["mask"]
        kl = (r["logprobs"] - r["ref_logprobs"]) * mask
        rewards = -cfg.kl_coef * kl
        rows = torch.arange(len(rewards), device=rewards.device)
        rewards[rows, r["length"] - 1] += torch.nan_to_num(r["penalized"], nan=0.0)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, self._sum, shift_mean=False)
        values = r["values"] * mask
        advantages = gae(rewards, values, cfg.gamma, cfg.lam)
        r.update(values=values, kl=kl, returns=(advantages + values) * mask,
                 advantages=whiten(advantages, mask, self._sum), non_score_reward=(-cfg.kl_coef * kl).sum(1))

    # ---- PPO epochs ------------------------------------------------------------------------------------------
    def update(self, r: dict[str, Any]) -> dict[str, float]:
        """`num_ppo_epochs` passes of clipped PPO over minibatches of the rollout; returns averaged stats."""
        cfg, acc = self.config, self.accelerator
        n = len(r["response"])
        mini, micro = n // cfg.num_mini_batches, cfg.per_device_train_batch_size
        context = r["query"].shape[1]
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.model.train()
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(n, device=r["response"].device)
            for m in range(0, n, mini):
                for s in range(m, m + mini, micro):
                    idx = order[s : s + micro]
                    mask = r["mask"][idx]
                    with acc.accumulate(self.model):
                        batch = self._inputs(r["query"][idx], r["query_mask"][idx], r["response"][idx], mask.bool())
                        logits, vpred = self._response_logits(self.model, batch, context, value=True)
                        logprobs = self._logprobs(logits, r["response"][idx])
                        old, adv = r["logprobs"][idx], r["advantages"][idx]
                        ret, old_v = r["returns"][idx], r["values"][idx]
                        ratio = torch.exp(logprobs - old)
                        pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.cliprange, 1 + cfg.cliprange))
                        pg_loss = masked_mean(pg, mask)
                        vpred = vpred.float()
                        v_clipped = old_v + (vpred - old_v).clamp(-cfg.cliprange_value, cfg.cliprange_value)
                        v_losses = torch.max((vpred - ret) ** 2, (v_clipped - ret) ** 2)
                        vf_loss = 0.5 * masked_mean(v_losses, mask)
                        acc.backward(pg_loss + cfg.vf_coef * vf_loss)
                        if acc.sync_gradients and cfg.max_grad_norm:
                            acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    with torch.no_grad():
                        scaled = logits.float() / cfg.temperature
                        entropy = torch.logsumexp(scaled, -1) - (F.softmax(scaled, -1) * scaled).sum(-1)
                        stats["policy/approxkl_avg"].append(0.5 * masked_mean((logprobs - old) ** 2, mask))
                        clipped = ((ratio - 1).abs() > cfg.cliprange).float()
                        stats["policy/clipfrac_avg"].append(masked_mean(clipped, mask))
                        stats["policy/entropy_avg"].append(masked_mean(entropy, mask))
                        stats["loss/policy_avg"].append(pg_loss.detach())
                        stats["loss/value_avg"].append(vf_loss.detach())
                        stats["val/clipfrac_avg"].append(masked_mean((v_losses > (vpred - ret) ** 2).float(), mask))
                        stats["val/ratio"].append(masked_mean(ratio, mask))
        return self._reduce({k: torch.stack(v).mean() for k, v in stats.items()})

    def _reduce(self, local: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """Mean of each metric over the processes that logged it (the union of every process's keys, so keys that
        differ between processes cannot hang the collective); NaN values count as missing."""
        acc = self.accelerator
        keys = sorted(local)
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            keys = sorted(set().union(*gather_object([keys])))
        values = torch.tensor([float(local.get(k, math.nan)) for k in keys], dtype=torch.float64, device=acc.device)
        present = ~torch.isnan(values)
        totals = acc.reduce(torch.stack([torch.nan_to_num(values), present.double()]), reduction="sum")
        return {k: float(t / c) if c else math.nan for k, t, c in zip(keys, totals[0], totals[1])}

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self) -> list[dict[str, float]]:
        """Run `num_updates` PPO updates (from a checkpoint with `resume_from_checkpoint`); returns the log history
        (also saved as `log_history.json`)."""
        cfg, acc = self.config, self.accelerator
        if cfg.resume_from_checkpoint:
            self.load_checkpoint(cfg.resume_from_checkpoint)
        batches = self._batches(skip=self.update_step)
        logger.info("PPO: %d updates of %d rollouts (%d per process)%s", self.num_updates,
                    cfg.local_batch_size * acc.num_processes, cfg.local_batch_size,
                    f", resuming after update {self.update_step}" if self.update_step else "")
        show = acc.is_main_process and progress_enabled(None, self.num_updates - self.update_step, logger)
        bar = tqdm(total=self.num_updates, initial=self.update_step, unit="update", desc="PPO", disable=not show)
        for update in range(self.update_step + 1, self.num_updates + 1):
            lr = self.scheduler.get_last_lr()[0]
            r = self.rollout(next(batches))
            stats = self.update(r)
            self.update_step = update
            if update % cfg.logging_steps == 0 or update == self.num_updates:
                log = self._rollout_metrics(r) | stats
                log.update(lr=lr, episode=update * cfg.local_batch_size * acc.num_processes,
                           update=update)
                self.log_history.append(log)
                if cfg.report_to:
                    acc.log(log, step=update)
                bar.set_postfix(reward=f"{log.get('objective/scores', math.nan):.4g}",
                                loss=f"{log.get('loss/policy_avg', math.nan):.4g}", refresh=False)
                if acc.is_main_process and not show:  # the bar shows these already
                    logger.info("update %d/%d: %s", update, self.num_updates,
                                ", ".join(f"{k}={v:.4g}" for k, v in log.items()
                                          if k.startswith(("objective", "policy/approx"))))
            bar.update(1)
            self.on_update_end()
            if cfg.save_steps and update % cfg.save_steps == 0:
                self.save_checkpoint()
        bar.close()
        if cfg.save_final:
            self.save_model(cfg.output_dir)
        if cfg.report_to:
            acc.end_training()
        return self.log_history

    def on_update_end(self) -> None:
        """Called after each update (and its logging), before its checkpoint: a hook for subclasses (evaluation)."""

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> str:
        """Write `output_dir/checkpoint-<update>` (`ppo_checkpoint`: trainable weights, optimizer, scheduler, RNG
        states, update count and logs, with a checksummed manifest) and drop the oldest beyond `save_total_limit`."""
        directory = os.path.join(self.config.output_dir, f"checkpoint-{self.update_step}")
        ppo_checkpoint.save(self, directory)
        limit = self.config.save_total_limit
        if self.accelerator.is_main_process and limit:
            for old in checkpoints(self.config.output_dir)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return directory

    def load_checkpoint(self, checkpoint: str) -> None:
        """Restore a `save_checkpoint` directory (or the latest complete one in output_dir for 'true'); refuses a
        damaged, incomplete or foreign one naming the file (`ppo_checkpoint.CheckpointError`)."""
        if str(checkpoint).lower() == "true":
            checkpoint = latest_complete(self.config.output_dir)
        ppo_checkpoint.load(self, checkpoint)
        logger.info("resumed from %s (update %d)", checkpoint, self.update_step)

    def _rollout_metrics(self, r: dict[str, Any]) -> dict[str, float]:
        kl_sum = r["kl"].sum(1)
        local = {
            "objective/kl": kl_sum.mean(),
            "objective/entropy": (-r["logprobs"] * r["mask"]).sum(1).mean(),
            "objective/non_score_reward": r["non_score_reward"].mean(),
            "objective/rlhf_reward": (r["penalized"] + r["non_score_reward"])[r["valid"].bool()].mean(),
            "objective/scores": torch.nanmean(r["scores"]),
            "objective/scaled_scores": torch.nanmean(r["penalized"]),
            "val/eos_rate": r["has_eos"].mean(),
            "val/response_length": r["length"].float().mean(),
            **{k: torch.tensor(v, device=kl_sum.device) for k, v in sorted(r["metrics"].items())},
        }
        out = self._reduce(local)
        invalid = self.accelerator.reduce((1 - r["valid"]).sum(), reduction="sum")
        out["objective/invalid_rewards"] = float(invalid)
        return out

    def save_model(self, output_dir: str) -> None:
        """Save the policy (full model, or the LoRA adapter), the tokenizer, the value head (and the critic's backbone
        with `separate_critic`) and the log history."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        unwrapped = acc.unwrap_model(self.model)
        if acc.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            policy_state = {k[len("policy."):]: v for k, v in state.items() if k.startswith("policy.")}
            unwrapped.policy.save_pretrained(output_dir, state_dict=policy_state)
            self.tokenizer.save_pretrained(output_dir)
            save_file({k[len("value_head."):]: v.detach().cpu().contiguous() for k, v in state.items()
                       if k.startswith("value_head.")}, os.path.join(output_dir, "value_head.safetensors"))
            if unwrapped.critic is not None:  # separate_critic: the value head's backbone
                save_file({k[len("critic."):]: v.detach().cpu().contiguous() for k, v in state.items()
                           if k.startswith("critic.")}, os.path.join(output_dir, "critic.safetensors"))
            with open(os.path.join(output_dir, "log_history.json"), "w") as f:
                json.dump(self.log_history, f, indent=1)
        acc.wait_for_everyone()

