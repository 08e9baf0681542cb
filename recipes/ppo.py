"""PPO with PairRM as the reward: each response is scored against its row's reference response.

    python recipes/ppo.py --config ppo_smoke          # bundled tiny models, CPU, seconds
    python recipes/ppo.py --config ppo                # Qwen2.5-0.5B-Instruct on UltraFeedback, 1 GPU
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/ppo.py --config ppo

The trainer is `pairrm_rlhf.trl.ppo.PPOTrainer` (TRL no longer ships PPO): fp32 master weights (bf16 compute with
`bf16: true`), explicit sampling (temperature only: no top-k/top-p, whatever the checkpoint's generation_config says),
resumable `save_steps` checkpoints. The scalar reward is PairRM's comparison of the response with the reference
(`PairwiseReward`, `reward_output`: the two-order logit by default, or P(win)). With `eval_prompts: N` the last N
prompts are held out and, every `eval_steps` updates and at the end, the policy's responses to them are compared with
the initial policy's and the references (`eval_metrics.json`, logged as `eval/*`; `eval_completions.jsonl` is the
completions table).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    Evaluator,
    RecipeArguments,
    check_sampling_backend,
    compute_dtype,
    get_peft_config,
    judge_for,
    load_policy,
    load_prompt_dataset,
    make_recipe_parser,
    run_recipe,
    split_eval,
    zero3_enabled,
)
from accelerate.utils import broadcast_object_list

from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.pairrm import PairRM
from pairrm_rlhf.trl import ppo_checkpoint
from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer, make_accelerator
from pairrm_rlhf.trl.rewards import REWARD_OUTPUTS, PairwiseReward

logger = logging.getLogger("ppo")


@dataclass
class PPORecipeConfig(PPOConfig):
    """PPO against PairRM comparisons with each row's reference response."""

    reward_output: str = field(default="logit", metadata={
        "help": "PairwiseReward output: logit (z = f(A,B) - f(B,A): twice the calibrated log-odds), probability, win"})
    eval_steps: int = field(default=0, metadata={
        "help": "evaluate on the held-out prompts every N updates (0: only at the end)"})

    def __post_init__(self):
        if self.reward_output not in REWARD_OUTPUTS:
            raise ValueError(f"--reward_output must be one of {', '.join(REWARD_OUTPUTS)}, got {self.reward_output!r}")
        check_sampling_backend(self)  # vllm: the rollouts and the evaluation sample with a colocated vLLM engine


class EvaluatingPPOTrainer(PPOTrainer):
    """`PPOTrainer` that evaluates on held-out prompts every `eval_steps` updates (see `evaluate`).
    Evaluation samples under a forked RNG: it does not change the training run."""

    evaluator: Evaluator | None = None

    def on_update_end(self) -> None:
        steps = self.config.eval_steps
        if steps and self.update_step % steps == 0 and self.update_step < self.num_updates:
            self.evaluate()

    def evaluate(self) -> dict[str, float] | None:
        """The held-out metrics (on every process). Without ZeRO-3 the main process samples while the others wait;
        under ZeRO-3 every process gathers the partitioned parameters and samples the same prompts with the same
        seed (generation needs every rank's shard), and only the main process writes the files. With
        `sampling_backend: vllm` the main process samples with its rollout engine, the current weights pushed first
        (under ZeRO-3 a collective: every process pushes its engine's)."""
        acc = self.accelerator
        if self.evaluator is None:
            return None
        metrics = [None]
        if self.vllm is not None:
            self.vllm.sync(acc.unwrap_model(self.model).policy, self.update_step, self._zero3)
            if acc.is_main_process:
                metrics = [self.evaluator(self.vllm.llm, None, self.update_step)]
        elif acc.is_main_process or self._zero3:
            policy = acc.unwrap_model(self.model).policy
            with self._gathered(policy):
                metrics = [self.evaluator(policy, self.tokenizer, self.update_step, write=acc.is_main_process)]
            policy.train()
        if acc.num_processes > 1:
            metrics = broadcast_object_list(metrics)
        if acc.is_main_process:
            logger.info("eval at update %d: %s", self.update_step,
                        ", ".join(f"{k}={v:.3f}" for k, v in metrics[0].items() if k != "step"))
        if self.config.report_to:
            acc.log({f"eval/{k}": v for k, v in metrics[0].items() if k != "step"}, step=self.update_step)
        return metrics[0]


def make_parser():
    return make_recipe_parser(PPORecipeConfig)


def main(script_args: RecipeArguments, training_args: PPORecipeConfig, model_args: Any,
         judge: PairRM | None = None) -> EvaluatingPPOTrainer:
    """Train and save; returns the trainer (its `log_history` holds the logged metrics).

    `judge`: a loaded PairRM to use instead of `script_args.pairrm` (e.g. one over a custom `PairBackend`)."""
    data = load_prompt_dataset(script_args, need_reference=True)
    train_set, eval_set = split_eval(script_args, data)
    peft_config = get_peft_config(model_args)
    # made first: under ZeRO-3 its DeepSpeed config partitions the models as they load (transformers' zero.Init),
    # so no rank holds a whole fp32 policy, let alone a copy of it; the reference is loaded the same way (not copied)
    accelerator = make_accelerator(training_args)
    # the dtype opt-in to training half-precision weights (with LoRA only the adapter trains: it stays fp32)
    training_args.keep_half_precision_weights |= peft_config is None and model_args.dtype not in (None, "float32")
    ppo_checkpoint.check_before_loading(accelerator, training_args)  # a bad checkpoint: refused before any load
    policy, tokenizer = load_policy(model_args)
    ref_policy = load_policy(model_args)[0] if peft_config is None and zero3_enabled() else None
    judge = judge or judge_for(script_args, training_args.use_cpu)
    reward = PairwiseReward(judge, output=training_args.reward_output, name="pairrm",
                            batch_size=script_args.pairrm_batch_size)
    trainer = EvaluatingPPOTrainer(training_args, policy, tokenizer, reward, train_set, ref_policy=ref_policy,
                                   peft_config=peft_config, accelerator=accelerator)
    if len(eval_set):
        sampling = SamplingArguments(max_new_tokens=training_args.max_new_tokens, temperature=training_args.temperature)
        trainer.evaluator = Evaluator(judge, list(eval_set["prompt"]), list(eval_set["reference"]), sampling,
                                      training_args.seed, training_args.output_dir,
                                      dtype=compute_dtype(training_args),  # sample in the run's compute dtype
                                      backend=training_args.sampling_backend)  # vllm: the rollout engine
        if not training_args.resume_from_checkpoint:
            trainer.evaluate()  # the initial policy's samples: the baseline of every later win rate
    history = trainer.train()
    if trainer.evaluator is not None:
        trainer.evaluate()
    if trainer.accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(f"PPO: {len(history)} logged updates of {trainer.num_updates}; "
              f"PairRM score vs reference {first['objective/scores']:.3f} -> {last['objective/scores']:.3f}, "
              f"win rate {first.get('pairrm/win_rate', float('nan')):.2f} -> "
              f"{last.get('pairrm/win_rate', float('nan')):.2f}, KL {last['objective/kl']:.3f}, "
              f"EOS rate {last['val/eos_rate']:.2f}\nSaved to {training_args.output_dir}")
        if trainer.evaluator is not None and trainer.evaluator.history:
            e = trainer.evaluator.history[-1]
            print(f"held-out ({len(eval_set)} prompts): win rate vs initial policy {e['vs_initial/win_rate']:.3f}, "
                  f"vs references {e.get('vs_reference/win_rate', float('nan')):.3f}")
    return trainer


if __name__ == "__main__":
    run_recipe(make_parser, main)
