"""PPO's path from a score to advantages: reward scaling, KL penalty, GAE and whitening over every process.

Reward scaling (`reward_scaling`): PPO's coefficients (`kl_coef`, `cliprange_value`, `vf_coef`) come from settings
whose reward is about unit-scale on the initial policy's responses, while a raw PairRM two-order logit
z = f(A,B) - f(B,A) often lies in +-5 (and the zero-initialised value head moves only `cliprange_value` a rollout
towards returns of that size). "The N Implementation Details of RLHF with PPO" (Huang et al.; OpenAI's
lm-human-preferences) normalises the reward with a gain and a bias so that it has mean 0 and std 1 on responses of
the initial policy; OpenRLHF's `normalize_reward` keeps running statistics instead. `RewardScaler` offers both:

- `none`: the scores as the reward function returns them;
- `initial`: mean and std of the first rollout's scores (every process's valid rows), fixed for the whole run;
- `running`: mean and std of every score so far (this rollout included; Chan et al.'s parallel update).

The statistics are part of the checkpoint (`state_dict`), so a resumed run scales exactly as before. The missing-EOS
penalty applies after scaling (it is in units of the scaled reward).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

REWARD_SCALINGS = ("none", "initial", "running")
Reduce = Callable[[torch.Tensor], torch.Tensor]  # a sum over every process


class RewardScaler:
    """Scale scores to mean 0, std 1 by the statistics `mode` says (see the module docstring)."""

    def __init__(self, mode: str = "none"):
        if mode not in REWARD_SCALINGS:
            raise ValueError(f"reward_scaling must be one of {', '.join(REWARD_SCALINGS)}, got {mode!r}")
        self.mode, self.count, self.mean, self.m2 = mode, 0.0, 0.0, 0.0

    def __call__(self, scores: torch.Tensor, valid: torch.Tensor, reduce: Reduce) -> torch.Tensor:
        """`scores` scaled (NaN rows stay NaN); updates the statistics first with the valid rows of every process."""
        if self.mode == "none":
            return scores
        if self.mode == "running" or self.count == 0:
            x = torch.where(valid, scores, torch.zeros_like(scores)).double()
            n, total, total_sq = (float(v) for v in reduce(torch.stack([valid.double().sum(), x.sum(), (x * x).sum()])))
            if n:
                batch_mean = total / n
                batch_m2 = max(total_sq - n * batch_mean * batch_mean, 0.0)
                delta, combined = batch_mean - self.mean, self.count + n
                self.mean += delta * n / combined
                self.m2 += batch_m2 + delta * delta * self.count * n / combined
                self.count = combined
        if self.count < 2:
            return scores - self.mean
        std = (self.m2 / (self.count - 1)) ** 0.5
        return (scores - self.mean) / max(std, 1e-8)

    def state_dict(self) -> dict[str, float | str]:
        return {"mode": self.mode, "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float | str]) -> None:
        self.count, self.mean, self.m2 = float(state["count"]), float(state["mean"]), float(state["m2"])


def whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Reduce, shift_mean: bool = True) -> torch.Tensor:
    """Whiten over the valid tokens of all processes."""
    total, total_sq, count = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = total / count
    var = (total_sq / count - mean * mean) * count / (count - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates over the response tokens (the value after the last token is 0)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages
