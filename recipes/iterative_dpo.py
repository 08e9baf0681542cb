"""Iterative DPO with PairRM labels (Snorkel-Mistral-PairRM-DPO / Online-RLHF / SPPO style).

    python recipes/iterative_dpo.py --config recipes/configs/iterative_dpo.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/iterative_dpo.py --config recipes/configs/iterative_dpo.yaml
    python recipes/iterative_dpo.py --config recipes/configs/iterative_dpo_smoke.yaml   # tiny models, CPU, < 1 min

Each iteration: sample `num_responses` responses per prompt from the current policy, label them with PairRM
(`PreferenceLabeler`: best vs worst by default), then train DPO from the current policy with a frozen copy of it as
the reference (with LoRA: the adapter-disabled model, merged into the policy after the iteration). The next
iteration starts from the result. `sppo: true` trains SPPO's soft-probability loss instead (`SPPOTrainer`).

Layout of `output_dir`, which makes the run resumable (re-run the same command; finished iterations are skipped,
a labeled dataset is reused, labeling resumes from its saved chunks):

    eval_before.json             initial policy's responses to the held-out prompts
    iteration_<i>/pairs/         the iteration's preference dataset (save_to_disk; optionally pushed as a split)
    iteration_<i>/model/         the policy after the iteration
    iteration_<i>/done.json      written last: the iteration is finished
    summary.json                 pairs, margins and win rates
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from _common import (TINY, RecipeArguments, cli_args, generate, load_pairrm, load_policy, load_prompt_dataset,
                     lora_config, parse_config, win_rate)
from accelerate import PartialState
from datasets import Dataset, load_from_disk
from trl import DPOConfig, DPOTrainer

from pairrm_rlhf.labeling.labeler import PreferenceLabeler, save_dataset
from pairrm_rlhf.trl.sppo import PROB_COLUMNS, SPPOTrainer

logger = logging.getLogger("iterative_dpo")
SCHEDULES = ("disjoint", "same")


@dataclass
class IterativeDPOConfig(RecipeArguments, DPOConfig):
    """Iterative DPO (or SPPO): sample K per prompt, label with PairRM, train, repeat from the result."""

    num_iterations: int = field(default=3, metadata={"help": "iterations of sample -> label -> train"})
    prompt_schedule: str = field(default="disjoint", metadata={"help": "disjoint: iteration i uses the i-th of num_iterations prompt slices; same: all prompts every iteration"})
    num_responses: int = field(default=5, metadata={"help": "K responses sampled per prompt"})
    max_new_tokens: int = field(default=512, metadata={"help": "response length limit when sampling"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling p"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    aggregation: str = field(default="rank", metadata={"help": "labeler score: rank, copeland or bradley_terry"})
    strategy: str = field(default="best_vs_worst", metadata={"help": "labeler pairs: best_vs_worst, best_vs_random, best_vs_second, all_pairs"})
    pairs_per_prompt: int | None = field(default=None, metadata={"help": "pairs per prompt (default 1; all_pairs: all)"})
    margin_threshold: float = field(default=0.0, metadata={"help": "drop pairs whose score margin is <= this"})
    label_chunk_size: int = field(default=256, metadata={"help": "prompts per saved labeling chunk (the unit of resume)"})
    sppo: bool = field(default=False, metadata={"help": "train SPPO's soft loss on chosen_probs_win/lose instead of DPO"})
    eval_prompts: int = field(default=64, metadata={"help": "held-out prompts (the last N) for win rates before/after; 0: none"})
    dataset_hub_id: str | None = field(default=None, metadata={"help": "push each iteration's pairs to this hub dataset as split iteration_<i>"})
    dataset_hub_private: bool = field(default=True, metadata={"help": "push the pairs as a private dataset"})


# ---- one iteration -------------------------------------------------------------------------------------------
def label(config: IterativeDPOConfig, iteration: int, prompts: Dataset, policy: Any, tokenizer: Any, pairrm: Any,
          policy_name: str, state: PartialState) -> Dataset:
    """The iteration's preference pairs: loaded when already saved, else labeled (resumable) and saved."""
    directory = Path(config.output_dir) / f"iteration_{iteration}"
    saved = directory / "pairs"
    if (saved / "dataset_info.json").exists():
        logger.info("iteration %d: reusing the labeled pairs in %s", iteration, saved)
        return load_from_disk(str(saved))
    generation = {"do_sample": True, "max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
                  "top_p": config.top_p}
    labeler = PreferenceLabeler(
        pairrm, policy, tokenizer, num_responses=config.num_responses, aggregation=config.aggregation,
        strategy=config.strategy, pairs_per_prompt=config.pairs_per_prompt, margin_threshold=config.margin_threshold,
        seed=config.seed + iteration, generation_kwargs=generation, generation_batch_size=config.generation_batch_size,
    )
    labeler.policy_name = policy_name
    work = directory / "pairs.chunks"
    pairs = labeler.label(prompts, work, chunk_size=config.label_chunk_size)
    if state.is_main_process:
        save_dataset(pairs, str(saved), "save_to_disk")
        shutil.rmtree(work, ignore_errors=True)
        if config.dataset_hub_id:
            pairs.push_to_hub(config.dataset_hub_id, split=f"iteration_{iteration}", private=config.dataset_hub_private)
    state.wait_for_everyone()
    return pairs


def train(config: IterativeDPOConfig, iteration: int, pairs: Dataset, policy: Any, tokenizer: Any) -> dict[str, float]:
    """DPO (or SPPO) from `policy` against a frozen copy of it; saves the result to iteration_<i>/model."""
    directory = Path(config.output_dir) / f"iteration_{iteration}"
    columns = ["prompt", "chosen", "rejected"] + (list(PROB_COLUMNS) if config.sppo else [])
    args = dataclasses.replace(config, output_dir=str(directory / "trainer"))
    peft = lora_config(config)
    ref_model = None if peft is not None else copy.deepcopy(policy).eval().requires_grad_(False)
    trainer_class = SPPOTrainer if config.sppo else DPOTrainer
    trainer = trainer_class(model=policy, ref_model=ref_model, args=args, train_dataset=pairs.select_columns(columns),
                            processing_class=tokenizer, peft_config=peft)
    result = trainer.train()
    model_dir = str(directory / "model")
    if peft is not None:  # merge the adapter: the next iteration starts from (and is referenced to) the merged policy
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        if trainer.is_world_process_zero():
            merged.save_pretrained(model_dir)
    else:
        trainer.save_model(model_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(model_dir)
    logs = [log for log in trainer.state.log_history if "rewards/margins" in log]
    stats = {"train_loss": float(result.training_loss), "steps": trainer.state.global_step}
    if logs:
        stats.update({k: float(logs[-1][k]) for k in ("rewards/margins", "rewards/accuracies") if k in logs[-1]})
    del trainer, ref_model
    return stats


# ---- the loop ----------------------------------------------------------------------------------------------
def prompt_slices(config: IterativeDPOConfig, prompts: Dataset) -> list[Dataset]:
    if config.prompt_schedule not in SCHEDULES:
        raise ValueError(f"prompt_schedule must be one of {SCHEDULES}, got {config.prompt_schedule!r}")
    if config.prompt_schedule == "same":
        return [prompts] * config.num_iterations
    bounds = np.linspace(0, len(prompts), config.num_iterations + 1).astype(int)
    return [prompts.select(range(bounds[i], bounds[i + 1])) for i in range(config.num_iterations)]


def sample_eval(config: IterativeDPOConfig, policy: Any, tokenizer: Any, prompts: list, device: Any) -> list[str]:
    policy.to(device)
    return generate(policy, tokenizer, prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                    seed=config.seed, batch_size=config.generation_batch_size)


def run(config: IterativeDPOConfig) -> dict[str, Any]:
    """Run (or resume) all iterations; returns the summary (also written to summary.json and printed)."""
    state = PartialState(cpu=config.use_cpu or not torch.cuda.is_available())
    out = Path(config.output_dir)
    data = load_prompt_dataset(config)
    n_eval = min(config.eval_prompts, len(data) // 4)
    eval_set = data.select(range(len(data) - n_eval, len(data))) if n_eval else data.select([])
    train_prompts = data.select(range(len(data) - n_eval))
    slices = prompt_slices(config, train_prompts)
    pairrm = load_pairrm(config, device="cpu" if config.use_cpu else None)
    done = [i for i in range(1, config.num_iterations + 1) if (out / f"iteration_{i}" / "done.json").exists()]
    start = next((i for i in range(1, config.num_iterations + 1) if i not in done), config.num_iterations + 1)
    current = config.policy if start == 1 else str(out / f"iteration_{start - 1}" / "model")
    if start > 1:
        logger.info("resuming: iterations 1..%d are finished, starting from %s", start - 1, current)

    eval_prompts = list(eval_set["prompt"])
    before_file = out / "eval_before.json"
    if n_eval and state.is_main_process and not before_file.exists():
        policy, tokenizer = load_policy(config.policy, config.policy_dtype)  # the initial policy, even when resuming
        out.mkdir(parents=True, exist_ok=True)
        before_file.write_text(json.dumps(sample_eval(config, policy, tokenizer, eval_prompts, state.device)))
        del policy
    state.wait_for_everyone()

    for iteration in range(start, config.num_iterations + 1):
        policy, tokenizer = load_policy(current, config.policy_dtype)
        policy.to(state.device)
        pairs = label(config, iteration, slices[iteration - 1], policy.eval(), tokenizer, pairrm, current, state)
        stats: dict[str, Any] = {"iteration": iteration, "prompts": len(slices[iteration - 1]), "pairs": len(pairs),
                                 "mean_margin": float(np.mean(pairs["margin"])) if len(pairs) else 0.0}
        if len(pairs):
            stats.update(train(config, iteration, pairs, policy.train(), tokenizer))
        else:
            logger.warning("iteration %d produced no pairs (all ties?); the policy is carried over unchanged", iteration)
            if state.is_main_process:
                policy.save_pretrained(out / f"iteration_{iteration}" / "model")
                tokenizer.save_pretrained(out / f"iteration_{iteration}" / "model")
        if state.is_main_process:
            (out / f"iteration_{iteration}" / "done.json").write_text(json.dumps(stats, indent=1))
        state.wait_for_everyone()
        current = str(out / f"iteration_{iteration}" / "model")
        del policy
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    iterations = [json.loads((out / f"iteration_{i}" / "done.json").read_text()) for i in range(1, config.num_iterations + 1)]
    summary: dict[str, Any] = {"iterations": iterations, "loss": "sppo" if config.sppo else "dpo", "eval_prompts": n_eval}
    if n_eval and state.is_main_process:
        before = json.loads(before_file.read_text())
        policy, tokenizer = load_policy(current, config.policy_dtype)
        after = sample_eval(config, policy, tokenizer, eval_prompts, state.device)
        summary["win_rate_after_vs_before"] = win_rate(pairrm, eval_prompts, after, before)
        if "reference" in eval_set.column_names:
            references = list(eval_set["reference"])
            summary["win_rate_vs_reference_before"] = win_rate(pairrm, eval_prompts, before, references)
            summary["win_rate_vs_reference_after"] = win_rate(pairrm, eval_prompts, after, references)
        summary["eval_samples"] = [{"before": b, "after": a} for b, a in zip(before[:3], after[:3])]
    if state.is_main_process:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(config, summary))
    state.wait_for_everyone()
    return summary


def format_summary(config: IterativeDPOConfig, summary: dict[str, Any]) -> str:
    lines = [f"Iterative {summary['loss'].upper()} with PairRM: {len(summary['iterations'])} iteration(s), "
             f"K={config.num_responses} responses per prompt"]
    for it in summary["iterations"]:
        line = (f"  iteration {it['iteration']}: {it['prompts']} prompts -> {it['pairs']} pairs, "
                f"mean PairRM score margin {it['mean_margin']:.3f}")
        if "train_loss" in it:
            line += (f"; {it['steps']} steps, loss {it['train_loss']:.4f}, reward margin "
                     f"{it.get('rewards/margins', float('nan')):.4f}, accuracy {it.get('rewards/accuracies', float('nan')):.2f}")
        lines.append(line)
    n = summary["eval_prompts"]
    if "win_rate_vs_reference_before" in summary:
        lines.append(f"  win rate vs reference on {n} held-out prompts: before {summary['win_rate_vs_reference_before']:.3f}"
                     f" -> after {summary['win_rate_vs_reference_after']:.3f}")
    if "win_rate_after_vs_before" in summary:
        lines.append(f"  win rate of the final policy over the initial one: {summary['win_rate_after_vs_before']:.3f}")
    if config.pairrm == TINY:
        lines.append("  (the bundled tiny PairRM has random weights: these numbers only show that the pipeline runs)")
    lines.append(f"Saved to {config.output_dir} (iteration_<i>/pairs, iteration_<i>/model, summary.json)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(parse_config(IterativeDPOConfig, cli_args(argv)))


if __name__ == "__main__":
    main()
