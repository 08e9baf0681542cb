"""PPO with PairRM as the reward: each response is scored against its row's reference response.

    python recipes/ppo.py --config recipes/configs/ppo.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/ppo.py --config recipes/configs/ppo.yaml
    python recipes/ppo.py --config recipes/configs/ppo_smoke.yaml          # tiny models, CPU, seconds

The trainer is `pairrm_rlhf.trl.ppo.PPOTrainer` (TRL no longer ships PPO). The scalar reward is PairRM's comparison of
the response with the reference (`PairwiseReward`, `reward_output`: the two-order logit by default, or P(win)).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RecipeArguments, cli_args, load_policy, load_prompt_dataset, lora_config, parse_config, resolve_pairrm

from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer
from pairrm_rlhf.trl.rewards import PairwiseReward


@dataclass
class PPORecipeConfig(RecipeArguments, PPOConfig):
    """PPO against PairRM comparisons with each row's reference response."""

    reward_output: str = field(default="logit", metadata={"help": "PairwiseReward output: logit (two-order log-odds), probability or win"})


def run(config: PPORecipeConfig) -> PPOTrainer:
    """Train and save; returns the trainer (its `log_history` holds the logged metrics)."""
    dataset = load_prompt_dataset(config, need_reference=True)
    policy, tokenizer = load_policy(config.policy, config.policy_dtype)
    reward = PairwiseReward(resolve_pairrm(config.pairrm), output=config.reward_output, name="pairrm",
                            device="cpu" if config.use_cpu else None, dtype=config.pairrm_dtype,
                            batch_size=config.pairrm_batch_size)
    trainer = PPOTrainer(config, policy, tokenizer, reward, dataset, peft_config=lora_config(config))
    history = trainer.train()
    if trainer.accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(f"PPO: {len(history)} logged updates of {trainer.num_updates}; "
              f"PairRM score vs reference {first['objective/scores']:.3f} -> {last['objective/scores']:.3f}, "
              f"win rate {first.get('pairrm/win_rate', float('nan')):.2f} -> {last.get('pairrm/win_rate', float('nan')):.2f}, "
              f"KL {last['objective/kl']:.3f}, EOS rate {last['val/eos_rate']:.2f}\nSaved to {config.output_dir}")
    return trainer


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(parse_config(PPORecipeConfig, cli_args(argv)))


if __name__ == "__main__":
    main()
