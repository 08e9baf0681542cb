"""TRL adapters: the pairwise judge, reward functions, PPO and SPPO trainers (all over `PairRM`, any backend)."""
