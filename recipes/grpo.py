"""GRPO (TRL's `GRPOTrainer`) with PairRM rewards.

    python recipes/grpo.py --config grpo_smoke        # bundled tiny models, CPU, seconds
    python recipes/grpo.py --config grpo              # Qwen2.5-0.5B-Instruct on UltraFeedback, 1 GPU
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/grpo.py --config grpo

`reward_mode: reference` scores each completion against its row's reference response; `reward_mode: group` scores it
round-robin against the other completions of its prompt (no reference needed; GRPO's group-relative advantage then
ranks the group by PairRM's pairwise preferences). Both through `PairwiseReward`. fp32 master weights (`dtype`,
default float32; bf16 compute with `bf16: true`); sampling from GRPOConfig's own fields only
(`_common.sampling_kwargs`).
With `eval_prompts: N` the last N prompts are held out and evaluated before and after training (`eval_metrics.json`).
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
)
from trl import GRPOConfig, GRPOTrainer

from pairrm_rlhf.core.formats import CONVERSATION_FORMATS
from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.pairrm import PairRM
from pairrm_rlhf.trl.rewards import (
    REWARD_MODES,
    REWARD_OUTPUTS,
    AsyncPairwiseReward,
    PairwiseReward,
    policy_eos_token_ids,
)


@dataclass
class GRPORecipeConfig(GRPOConfig):
    """GRPO with PairRM comparisons against a reference column or within each group of generations."""

    reward_mode: str = field(
        default="reference", metadata={"help": "reference (vs the reference column) or group (round-robin)"}
    )
    reward_output: str = field(
        default="probability", metadata={"help": "PairwiseReward output: probability, logit or win"}
    )
    async_reward: bool = field(default=False, metadata={"help": "score in a worker thread (AsyncPairwiseReward)"})
    conversation_format: str = field(
        default="pairrm",
        metadata={
            "help": "single-turn conversations to PairRM: pairrm (llm-blender's multi-turn format) or plain (user "
            "text + bare response, as SPPO labelled)"
        },
    )
    sampling_backend: str = field(
        default="transformers",
        metadata={
            "help": "vllm: TRL's vLLM rollouts (use_vllm; vllm_mode colocate or server) and the held-out evaluation "
            "sampled by vLLM from the saved model (pip install vllm)"
        },
    )
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={
            "help": "subtracted from the reward of a completion cut at max_completion_length (no EOS); null: no penalty"
        },
    )

    def __post_init__(self):
        for name, allowed in (
            ("reward_mode", REWARD_MODES),
            ("reward_output", REWARD_OUTPUTS),
            ("conversation_format", CONVERSATION_FORMATS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ValueError(f"--missing_eos_penalty must be >= 0 or null, got {self.missing_eos_penalty}")
        check_sampling_backend(self)  # vllm: TRL's vLLM rollouts too (use_vllm)
        super().__post_init__()


def make_parser():
    return make_recipe_parser(GRPORecipeConfig)


def main(
    script_args: RecipeArguments, training_args: GRPORecipeConfig, model_args: Any, judge: PairRM | None = None
) -> GRPOTrainer:
    """Train and save to `output_dir`; returns the trainer. `judge`: a loaded PairRM instead of `script_args.pairrm`."""
    data = load_prompt_dataset(script_args, need_reference=training_args.reward_mode == "reference")
    train_set, eval_set = split_eval(script_args, data)
    policy, tokenizer = load_policy(model_args)
    training_args.generation_kwargs = sampling_kwargs(training_args, policy, tokenizer, script_args)
    cls = AsyncPairwiseReward if training_args.async_reward else PairwiseReward
    group_size = training_args.num_generations if training_args.reward_mode == "group" else None
    reward = cls(
        judge or lazy_judge(script_args, training_args.use_cpu),
        mode=training_args.reward_mode,
        output=training_args.reward_output,
        group_size=group_size,
        name=f"pairrm_{training_args.reward_mode}",
        batch_size=script_args.pairrm_batch_size,
        missing_eos_penalty=training_args.missing_eos_penalty or 0.0,
        conversation_format=training_args.conversation_format,
        eos_token_ids=None if training_args.missing_eos_penalty is None else policy_eos_token_ids(policy, tokenizer),
    )
    check_vllm_evaluation(training_args.sampling_backend, model_args.use_peft, len(eval_set))
    evaluator = None
    if len(eval_set):
        sampling = SamplingArguments(
            max_new_tokens=training_args.max_completion_length, temperature=training_args.temperature
        )
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
    trainer = quiet_log_dicts(
        GRPOTrainer(
            model=policy,
            reward_funcs=[reward],
            args=training_args,
            train_dataset=train_set,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if evaluator is not None:  # every process: under ZeRO-3 each gathers and samples (vLLM: main samples the output)
        step = trainer.state.global_step
        evaluate_everywhere(evaluator, trainer.model, tokenizer, step, saved=training_args.output_dir)
    key = f"rewards/{reward.__name__}/mean"
    logs = [log for log in trainer.state.log_history if key in log]
    if trainer.is_world_process_zero() and logs:
        print(
            f"GRPO: {trainer.state.global_step} steps; PairRM reward ({training_args.reward_mode}, "
            f"{training_args.reward_output}) {logs[0][key]:.3f} -> {logs[-1][key]:.3f}\n"
            f"Saved to {training_args.output_dir}"
        )
    return trainer


if __name__ == "__main__":
    run_recipe(make_parser, main)
