"""SPPO's soft-label loss as a `trl.DPOTrainer` subclass.

Self-Play Preference Optimization (Wu et al., 2024, eq. 4.7) regresses each response's log-ratio against the
reference (the previous iteration's policy) onto its estimated win probability against the current policy:

    loss = [(log pi(y_w)/pi_ref(y_w) - (P_w - 1/2) / beta)^2 + (log pi(y_l)/pi_ref(y_l) - (P_l - 1/2) / beta)^2] / 2

where P_w = P(y_w beats pi_t) is estimated as the mean PairRM probability of y_w against the K sampled responses
of its prompt: the labeler's `chosen_probs_win` (and `chosen_probs_lose` for y_l). beta = 1/eta of the paper; the
halving follows the authors' released trainer (their scripts use beta = 0.001, lr 5e-7, RMSprop, K = 5).
TRL's built-in `loss_type="sppo_hard"` is the same loss with P_w = 1 and P_l = 0; this trainer uses the soft
probabilities, which TRL leaves to the caller. Everything else (data, reference model or disabled LoRA adapter,
precomputed reference log-probs, logging) is `DPOTrainer`'s.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import DPOTrainer

PROB_COLUMNS = ("chosen_probs_win", "chosen_probs_lose")


class _ProbsCollator:
    """Adds the two probability columns to the batches of DPOTrainer's preference collator."""

    def __init__(self, inner: Any):
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.inner(examples)
        for column in PROB_COLUMNS:
            batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch


class SPPOTrainer(DPOTrainer):
    """`DPOTrainer` with the soft SPPO loss; the dataset needs `chosen_probs_win` and `chosen_probs_lose` columns
    (as `PreferenceLabeler` writes them). `args.loss_type` is ignored."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
            raise ValueError("SPPOTrainer supports neither ld_alpha nor f_divergence_type other than reverse_kl")
        missing = [c for c in PROB_COLUMNS if c not in self.train_dataset.column_names]
        if missing:
            raise ValueError(f"SPPO needs the columns {list(PROB_COLUMNS)} in train_dataset; missing {missing}")
        self.data_collator = _ProbsCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(self._signature_columns) + [c for c in PROB_COLUMNS if c not in self._signature_columns]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool):
        mode = "train" if self.model.training else "eval"
        p_win, p_lose = (inputs.pop(c) for c in PROB_COLUMNS)
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                        fused_lm_head=True, use_cache=False)
        seq_len = inputs["completion_mask"].shape[1] - 1
        chosen_logps, rejected_logps = outputs.log_probs[:, -seq_len:].sum(1).chunk(2)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # the reference model, or the policy with its LoRA adapter disabled
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model if self.ref_model is None else self.ref_model, inputs)
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        target_chosen, target_rejected = (p_win - 0.5) / self.beta, (p_lose - 0.5) / self.beta
        loss = ((chosen_ratio - target_chosen) ** 2 + (rejected_ratio - target_rejected) ** 2).mean() / 2

        gather = self.accelerator.gather_for_metrics
        chosen_rewards, rejected_rewards = self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps.detach()).mean().item())
        metrics["sppo/prob_win_chosen"].append(gather(p_win).mean().item())
        metrics["sppo/prob_win_rejected"].append(gather(p_lose).mean().item())
        return (loss, outputs) if return_outputs else loss
