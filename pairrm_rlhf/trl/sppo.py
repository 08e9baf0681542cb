"""SPPO's soft-label loss as a `trl.DPOTrainer` subclass.

Self-Play Preference Optimization (Wu et al., 2024, eq. 4.7) regresses each response's log-ratio against the
reference (the previous iteration's policy) onto its estimated win probability against the current policy:

    loss = [(log pi(y_w)/pi_ref(y_w) - (P_w - 1/2) / beta)^2 + (log pi(y_l)/pi_ref(y_l) - (P_l - 1/2) / beta)^2] / 2

where P_w = P(y_w beats pi_t) is estimated as the mean PairRM probability of y_w against the K sampled responses
of its prompt: the labeler's `chosen_probs_win` (and `chosen_probs_lose` for y_l). beta = 1/eta of the paper; the
halving follows the authors' released trainer (their scripts use beta = 0.001, lr 5e-7, RMSprop, K = 5).
Soft labels (`authors_probabilities`): the authors estimate P(y_i beats pi_t) from PairRM's round-robin scores
s_1..s_K of the K responses as P_i = mean_j sigmoid(s_i - s_j), j over all K including i itself (uclaml/SPPO,
scripts/compute_prob.py: `prb[i][j] = 1 / (1 + exp(score[j] - score[i]))`, then `sum(axis=1) / K`, with
`score = blender.rank(..., return_scores=True)` in scripts/rank.py); beta = 0.001 was tuned for these. That is the
recipes' default (`sppo_probabilities: authors`). The labeler's own `chosen_probs_win` (the mean *calibrated*
PairRM probability sigma(z / 2) of each pair's two-order logit) stays available as `sppo_probabilities: calibrated`.

TRL's built-in `loss_type="sppo_hard"` is the same loss with P_w = 1 and P_l = 0; this trainer uses the soft
probabilities, which TRL leaves to the caller. Everything else (data, reference model or disabled LoRA adapter,
precomputed reference log-probs, logging) is `DPOTrainer`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from trl import DPOTrainer

PROB_COLUMNS = ("chosen_probs_win", "chosen_probs_lose")
SPPO_PROBABILITIES = ("authors", "calibrated")


def authors_probabilities(score_chosen: Sequence[float], score_rejected: Sequence[float],
                          all_scores: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """SPPO's soft labels as the authors compute them: P_i = mean_j sigmoid(s_i - s_j) over all K scores of the
    prompt (itself included, sigmoid(0) = 1/2), for each row's chosen and rejected response.

    Args:
        score_chosen / score_rejected: the chosen / rejected response's round-robin score, per row.
        all_scores: the scores of all K responses of the row's prompt (the labeler's `all_rm_scores`).

    Returns:
        (chosen_probs_win, chosen_probs_lose) lists.

    Example:
        >>> authors_probabilities([1.0], [-1.0], [[1.0, -1.0]])[0]  # (sigmoid(0) + sigmoid(2)) / 2
        [0.6903...]
    """
    def p(s: float, scores: Sequence[float]) -> float:
        return float(np.mean(1.0 / (1.0 + np.exp(np.asarray(scores, dtype=np.float64) - s))))

    return ([p(s, all_) for s, all_ in zip(score_chosen, all_scores)],
            [p(s, all_) for s, all_ in zip(score_rejected, all_scores)])


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
        missing = [c for c in PROB_COLUMNS if c not in self._signature_columns]
        self._signature_columns = list(self._signature_columns) + missing

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
            reference = model if self.ref_model is None else self.ref_model
            ref_chosen, ref_rejected = self.compute_ref_log_probs(reference, inputs)
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
