"""Online DPO (TRL's `trl.experimental.online_dpo.OnlineDPOTrainer`) with PairRM choosing the preferred sample.

    python recipes/online_dpo.py --config recipes/configs/online_dpo.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/online_dpo.py --config recipes/configs/online_dpo.yaml
    python recipes/online_dpo.py --config recipes/configs/online_dpo_smoke.yaml     # tiny models, CPU, seconds

Per step the trainer samples two responses per prompt; `reward: judge` (default) has PairRM compare them directly
(`OnlineDPOJudgeReward`: the chosen one is PairRM's preferred one), `reward: reference` scores each against the row's
reference response (`PairwiseReward`) and keeps the higher. LoRA with `use_peft: true`.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RecipeArguments, cli_args, load_policy, load_prompt_dataset, lora_config, parse_config, resolve_pairrm
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

from pairrm_rlhf.pairrm import LazyPairRM
from pairrm_rlhf.trl.judge import PairRMJudge
from pairrm_rlhf.trl.rewards import OnlineDPOJudgeReward, PairwiseReward

REWARDS = ("judge", "reference")


@dataclass
class OnlineDPORecipeConfig(RecipeArguments, OnlineDPOConfig):
    """Online DPO with PairRM as the judge of each pair of samples."""

    reward: str = field(default="judge", metadata={"help": "judge: PairRM compares the two samples; reference: each vs the reference column"})
    judge_soft: bool = field(default=True, metadata={"help": "judge: rewards (P, 1-P) instead of (1, 0)"})


def build_reward(config: OnlineDPORecipeConfig):
    """The reward function the trainer gets, with one lazily loaded PairRM (this process's device)."""
    if config.reward not in REWARDS:
        raise ValueError(f"reward must be one of {REWARDS}, got {config.reward!r}")
    pairrm = LazyPairRM(resolve_pairrm(config.pairrm), device="cpu" if config.use_cpu else None, dtype=config.pairrm_dtype)
    if config.reward == "judge":
        return OnlineDPOJudgeReward(PairRMJudge(pairrm, batch_size=config.pairrm_batch_size), soft=config.judge_soft)
    return PairwiseReward(pairrm, batch_size=config.pairrm_batch_size)


def run(config: OnlineDPORecipeConfig) -> OnlineDPOTrainer:
    """Train and save to `output_dir`; returns the trainer."""
    dataset = load_prompt_dataset(config, need_reference=config.reward == "reference")
    policy, tokenizer = load_policy(config.policy, config.policy_dtype)
    trainer = OnlineDPOTrainer(model=policy, reward_funcs=[build_reward(config)], args=config, train_dataset=dataset,
                               processing_class=tokenizer, peft_config=lora_config(config))
    trainer.train()
    trainer.save_model(config.output_dir)
    logs = [log for log in trainer.state.log_history if "objective/scores_margin" in log]
    if trainer.is_world_process_zero() and logs:
        first, last = logs[0], logs[-1]
        print(f"Online DPO: {trainer.state.global_step} steps; PairRM score margin chosen-rejected "
              f"{first['objective/scores_margin']:.3f} -> {last['objective/scores_margin']:.3f}, "
              f"DPO reward margin {last.get('rewards/margins', float('nan')):.3f}, KL {last.get('objective/kl', float('nan')):.3f}"
              f"\nSaved to {config.output_dir}")
    return trainer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(parse_config(OnlineDPORecipeConfig, cli_args(argv)))


if __name__ == "__main__":
    main()
