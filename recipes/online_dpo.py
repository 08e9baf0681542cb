"""Online DPO (TRL's `trl.experimental.online_dpo.OnlineDPOTrainer`) with PairRM choosing the preferred sample.

    python recipes/online_dpo.py --config online_dpo_smoke    # bundled tiny models, CPU, seconds
    python recipes/online_dpo.py --config online_dpo          # Qwen2.5-0.5B-Instruct on UltraFeedback, 1 GPU
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/online_dpo.py --config online_dpo

Per step the trainer samples two responses per prompt; `reward: judge` (default) has PairRM compare them directly
(`OnlineDPOJudgeReward`: the chosen one is PairRM's preferred one), `reward: reference` scores each against the row's
reference response (`PairwiseReward`) and keeps the higher. LoRA with `use_peft: true`. fp32 master weights (`dtype`,
default float32; bf16 compute with `bf16: true`); sampling from the config's own fields only. With `eval_prompts: N`
the last N prompts are held out and evaluated before and after training (`eval_metrics.json`).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    Evaluator,
    RecipeArguments,
    check_sampling_backend,
    check_vllm_evaluation,
    compute_dtype,
    evaluate_everywhere,
    get_peft_config,
    judge_for,
    lazy_judge,
    load_policy,
    load_prompt_dataset,
    make_recipe_parser,
    quiet_log_dicts,
    run_recipe,
    sampling_kwargs,
    split_eval,
    zero3_enabled,
)
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.pairrm import PairRM
from pairrm_rlhf.trl.judge import PairRMJudge
from pairrm_rlhf.trl.rewards import OnlineDPOJudgeReward, PairwiseReward

REWARDS = ("judge", "reference")


@dataclass
class OnlineDPORecipeConfig(OnlineDPOConfig):
    """Online DPO with PairRM as the judge of each pair of samples."""

    reward: str = field(
        default="judge",
        metadata={"help": "judge: PairRM compares the two samples; reference: each vs the reference column"},
    )
    judge_soft: bool = field(default=True, metadata={"help": "judge: rewards (P, 1-P) instead of (1, 0)"})
    sampling_backend: str = field(
        default="transformers",
        metadata={
            "help": "vllm: TRL's vLLM rollouts (use_vllm; vllm_mode colocate or server) and the held-out evaluation "
            "sampled by vLLM from the saved model (pip install vllm)"
        },
    )

    def __post_init__(self):
        if self.reward not in REWARDS:
            raise ValueError(f"--reward must be one of {', '.join(REWARDS)}, got {self.reward!r}")
        check_sampling_backend(self)  # vllm: TRL's vLLM rollouts too (use_vllm)
        super().__post_init__()


def make_parser():
    return make_recipe_parser(OnlineDPORecipeConfig)


def main(
    script_args: RecipeArguments, training_args: OnlineDPORecipeConfig, model_args: Any, judge: PairRM | None = None
) -> OnlineDPOTrainer:
    """Train and save to `output_dir`; returns the trainer. `judge`: a loaded PairRM instead of `script_args.pairrm`."""
    data = load_prompt_dataset(script_args, need_reference=training_args.reward == "reference")
    train_set, eval_set = split_eval(script_args, data)
    policy, tokenizer = load_policy(model_args)
    training_args.generation_kwargs = sampling_kwargs(training_args, policy, tokenizer, script_args)
    pairrm = judge or lazy_judge(script_args, training_args.use_cpu)
    if training_args.reward == "judge":
        reward = OnlineDPOJudgeReward(
            PairRMJudge(pairrm, batch_size=script_args.pairrm_batch_size), soft=training_args.judge_soft
        )
    else:
        reward = PairwiseReward(pairrm, batch_size=script_args.pairrm_batch_size)
    check_vllm_evaluation(training_args.sampling_backend, model_args.use_peft, len(eval_set))
    evaluator = None
    if len(eval_set):
        sampling = SamplingArguments(max_new_tokens=training_args.max_new_tokens, temperature=training_args.temperature)
        evaluator = Evaluator(
            judge or judge_for(script_args, training_args.use_cpu),
            list(eval_set["prompt"]),
            list(eval_set["reference"]) if "reference" in eval_set.column_names else None,
            sampling,
            training_args.seed,
            training_args.output_dir,
            dtype=compute_dtype(training_args),
            backend=training_args.sampling_backend,
            gpu_memory_utilization=script_args.eval_gpu_memory_utilization,
        )
        start = model_args.model_name_or_path  # vLLM samples the initial model from its path
        evaluate_everywhere(evaluator, policy.to(training_args.device), tokenizer, 0, saved=start)
        policy.train()
    peft_config = get_peft_config(model_args)
    # the reference: TRL copies the policy (with LoRA: disables the adapter); under ZeRO-3 a partitioned policy cannot
    # be copied, so it is loaded like the policy (partitioned too) and TRL shards it with DeepSpeed
    ref_model = load_policy(model_args)[0] if zero3_enabled() and peft_config is None else None
    trainer = quiet_log_dicts(
        OnlineDPOTrainer(
            model=policy,
            ref_model=ref_model,
            reward_funcs=[reward],
            args=training_args,
            train_dataset=train_set,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if evaluator is not None:  # every process: under ZeRO-3 each gathers and samples (vLLM: main samples the output)
        step = trainer.state.global_step
        evaluate_everywhere(evaluator, trainer.model, tokenizer, step, saved=training_args.output_dir)
    logs = [log for log in trainer.state.log_history if "objective/scores_margin" in log]
    if trainer.is_world_process_zero() and logs:
        first, last = logs[0], logs[-1]
        print(
            f"Online DPO: {trainer.state.global_step} steps; PairRM score margin chosen-rejected "
            f"{first['objective/scores_margin']:.3f} -> {last['objective/scores_margin']:.3f}, "
            f"DPO reward margin {last.get('rewards/margins', float('nan')):.3f}, "
            f"KL {last.get('objective/kl', float('nan')):.3f}"
            f"\nSaved to {training_args.output_dir}"
        )
    return trainer


if __name__ == "__main__":
    run_recipe(make_parser, main)
