"""GRPO (TRL's `GRPOTrainer`) with PairRM rewards.

    python recipes/grpo.py --config recipes/configs/grpo.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/grpo.py --config recipes/configs/grpo.yaml
    python recipes/grpo.py --config recipes/configs/grpo_smoke.yaml      # tiny models, CPU, seconds

`reward_mode: reference` scores each completion against its row's reference response; `reward_mode: group` scores it
round-robin against the other completions of its prompt (no reference needed; GRPO's group-relative advantage then
ranks the group by PairRM's pairwise preferences). Both through `PairwiseReward`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RecipeArguments, cli_args, load_policy, load_prompt_dataset, lora_config, parse_config, resolve_pairrm
from trl import GRPOConfig, GRPOTrainer

from pairrm_rlhf.trl.rewards import AsyncPairwiseReward, PairwiseReward


@dataclass
class GRPORecipeConfig(RecipeArguments, GRPOConfig):
    """GRPO with PairRM comparisons against a reference column or within each group of generations."""

    reward_mode: str = field(default="reference", metadata={"help": "reference (vs the reference column) or group (round-robin)"})
    reward_output: str = field(default="probability", metadata={"help": "PairwiseReward output: probability, logit or win"})
    async_reward: bool = field(default=False, metadata={"help": "score in a worker thread (AsyncPairwiseReward)"})


def build_reward(config: GRPORecipeConfig) -> PairwiseReward:
    cls = AsyncPairwiseReward if config.async_reward else PairwiseReward
    group_size = config.num_generations if config.reward_mode == "group" else None
    return cls(resolve_pairrm(config.pairrm), mode=config.reward_mode, output=config.reward_output, group_size=group_size,
               name=f"pairrm_{config.reward_mode}", device="cpu" if config.use_cpu else None, dtype=config.pairrm_dtype,
               batch_size=config.pairrm_batch_size)


def run(config: GRPORecipeConfig) -> GRPOTrainer:
    """Train and save to `output_dir`; returns the trainer."""
    dataset = load_prompt_dataset(config, need_reference=config.reward_mode == "reference")
    policy, tokenizer = load_policy(config.policy, config.policy_dtype)
    reward = build_reward(config)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=lora_config(config))
    trainer.train()
    trainer.save_model(config.output_dir)
    key = f"rewards/{reward.__name__}/mean"
    logs = [log for log in trainer.state.log_history if key in log]
    if trainer.is_world_process_zero() and logs:
        print(f"GRPO: {trainer.state.global_step} steps; PairRM reward ({config.reward_mode}, {config.reward_output}) "
              f"{logs[0][key]:.3f} -> {logs[-1][key]:.3f}\nSaved to {config.output_dir}")
    return trainer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(parse_config(GRPORecipeConfig, cli_args(argv)))


if __name__ == "__main__":
    main()
