"""PPO's models: the policy with its value head, fp32 master weights for what trains, and the frozen reference.

Precision: what trains (the whole policy, or with LoRA only the adapter) is cast to float32 (master weights); a
frozen LoRA base keeps the dtype it was loaded in (bf16: 2 bytes a parameter, never upcast). Every forward runs in
the run's compute dtype: `bf16: true` is accelerate's autocast around the policy's, the value head's and the
reference's forwards alike, so at step 0 the policy and the reference compute the same numbers (KL exactly 0).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class PolicyWithValueHead(nn.Module):
    """A causal LM plus a linear value head; `forward` returns (logits, values).

    Shared (`critic=None`, the layout of TRL's former `AutoModelForCausalLMWithValueHead`): the head reads the
    policy's last hidden state; one extra `hidden x 1` layer instead of a second model, but the value loss (weighted
    by `vf_coef`) also moves the policy. Separate (`critic`, a decoder backbone such as a copy of the initial policy's
    `get_decoder()`, as OpenRLHF and TRL's PPOv2 do): the head reads the critic's last hidden state and value
    gradients never reach the policy, for one more model's memory. The head is zero-initialised."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None):
        super().__init__()
        self.policy, self.critic = policy, critic
        hidden = (critic or policy).config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor):
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        out = self.policy(**inputs, output_hidden_states=self.critic is None)
        hidden = out.hidden_states[-1] if self.critic is None else self.critic(**inputs).last_hidden_state
        return out.logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "attention_dropout"):
        config.attention_dropout = 0.0


def separate_critic(policy: nn.Module, peft_config: Any) -> nn.Module:
    """A trainable copy of the initial policy's decoder backbone (no LM head), the critic of `separate_critic`."""
    if peft_config is not None:
        raise ValueError("separate_critic: the critic is a fully trained copy of the policy's backbone; with LoRA "
                         "(use_peft) keep the shared value head (separate_critic: false)")
    return copy.deepcopy(policy.get_decoder()).train().requires_grad_(True)


def prepare_models(policy: nn.Module, ref_policy: nn.Module | None, peft_config: Any,
                   keep_half_precision_weights: bool, cast: bool = True) -> tuple[nn.Module, nn.Module | None]:
    """(policy to train, frozen reference or None). With `peft_config` the policy becomes a LoRA model whose
    adapter-disabled self is the reference (None); otherwise the reference is `ref_policy` or a copy of the policy
    made after its cast (same dtype, same weights). Only trainable parameters are cast to float32; nothing with
    `cast=False` (a model partitioned by ZeRO-3 at load, whose fp32 masters DeepSpeed keeps)."""
    if peft_config is not None:
        from peft import get_peft_model

        policy, ref_policy = get_peft_model(policy, peft_config), None  # the base is frozen in its own dtype
    trainable = [p for p in policy.parameters() if p.requires_grad]
    half = sorted({str(p.dtype) for p in trainable if p.dtype != torch.float32 and p.is_floating_point()})
    if not cast:
        pass
    elif half and keep_half_precision_weights:
        logger.warning("training %s weights directly (keep_half_precision_weights): AdamW updates below their "
                       "resolution are lost", "/".join(half))
    elif half and peft_config is not None:
        for p in trainable:  # the adapter only: the frozen base is never upcast
            p.data = p.data.float()
    elif half:
        policy = policy.float()
    if peft_config is None and ref_policy is None:
        ref_policy = copy.deepcopy(policy)
    disable_dropout(policy)
    if ref_policy is not None:
        disable_dropout(ref_policy)
        ref_policy = ref_policy.eval().requires_grad_(False)
    return policy, ref_policy


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)
