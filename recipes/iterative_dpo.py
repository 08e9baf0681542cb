"""Iterative DPO with PairRM labels (Snorkel-Mistral-PairRM-DPO / Online-RLHF / SPPO style).

    python recipes/iterative_dpo.py --config iterative_dpo_smoke   # bundled tiny models, CPU, < 1 min
    python recipes/iterative_dpo.py --config iterative_dpo         # Qwen2.5-0.5B-Instruct on UltraFeedback, 1 GPU
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/iterative_dpo.py --config iterative_dpo

Each iteration: sample `num_responses` responses per prompt from the current policy, label them with PairRM
(`PreferenceLabeler`: best vs worst by default), then train DPO from the current policy with a frozen copy of it as
the reference (with LoRA: the adapter-disabled model, merged into the fp32 policy after the iteration). The next
iteration starts from the result. `sppo: true` trains SPPO's soft-probability loss instead (`SPPOTrainer`), on the
authors' soft labels by default (`sppo_probabilities: authors`, see `pairrm_rlhf.trl.sppo`).

Precision: the policy is trained and saved in fp32 (`dtype`, default float32; bf16 compute with `bf16: true`), so
iteration i+1 starts from exactly what iteration i learned. Sampling (labeling and evaluation) uses exactly the
config's fields (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`, `max_new_tokens`); unset ones are
neutral unless `use_checkpoint_sampling`.

After every iteration the policy answers the held-out prompts (`eval_prompts`, the last N) and the judge (or
`eval_pairrm`) compares them with the initial policy's answers and the references; the numbers go to the trainer's
`report_to` trackers and to `metrics.json`, plus `win_rate.png` and `margins.png` (with the `plots` extra).

Layout of `output_dir`, which makes the run resumable (re-run the same command; finished iterations are skipped,
a labeled dataset is reused, labeling resumes from its saved chunks, training from the trainer's last
`checkpoint-*` when `save_strategy` writes them):

    manifest.json                the run's identity (`run_identity`): resuming with other settings (another
                                 learning rate, K, strategy, judge dtype, ...) is refused with the exact difference
    eval_before.json             the initial policy's responses to the held-out prompts
    iteration_<i>/pairs/         the iteration's preference dataset (save_to_disk; optionally pushed as a split)
    iteration_<i>/trainer/       the DPO trainer's output_dir (its checkpoints)
    iteration_<i>/model/         the policy after the iteration (fp32)
    iteration_<i>/done.json      written last: the iteration's pairs, training and held-out evaluation
    metrics.json                 per-iteration evaluation (iteration 0 = the initial policy)
    win_rate.png, margins.png    win rate per iteration; histogram of each iteration's pair margins
    summary.json                 all of the above in one file
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import torch
from _common import (
    TINY,
    Evaluator,
    RecipeArguments,
    compute_dtype,
    evaluate_everywhere,
    gathered,
    get_peft_config,
    judge_for,
    load_policy,
    load_prompt_dataset,
    make_recipe_parser,
    quiet_log_dicts,
    run_recipe,
    split_eval,
    warn_half_precision,
    zero3_enabled,
)
from accelerate import PartialState
from datasets import Dataset, load_from_disk
from transformers.trainer_utils import get_last_checkpoint
from trl import DPOConfig, DPOTrainer

from pairrm_rlhf.core import assets
from pairrm_rlhf.core.entry import check_hub_id
from pairrm_rlhf.core.generation import SamplingArguments, colocated_vllm
from pairrm_rlhf.core.identity import check_run_identity
from pairrm_rlhf.core.sampling import BACKENDS
from pairrm_rlhf.labeling import PreferenceLabeler, save_dataset
from pairrm_rlhf.labeling.store import remove_store
from pairrm_rlhf.pairrm import PairRM
from pairrm_rlhf.trl.sppo import PROB_COLUMNS, SPPO_PROBABILITIES, SPPOTrainer, authors_probabilities

logger = logging.getLogger("iterative_dpo")
SCHEDULES = ("disjoint", "same")


@dataclass
class IterativeDPOScriptArguments(RecipeArguments):
    """Script arguments of iterative DPO: the shared ones, plus an optional separate evaluation judge."""

    eval_pairrm: str | None = field(
        default=None,
        metadata={
            "help": "judge of the held-out evaluation (default: the training judge); a different one exposes "
            "reward hacking"
        },
    )

    def check_environment(self, device: str | None = None) -> None:
        super().check_environment(device)
        check_hub_id(self.eval_pairrm, "--eval_pairrm")


@dataclass
class IterativeDPOConfig(DPOConfig):
    """Iterative DPO (or SPPO): sample K per prompt, label with PairRM, train, repeat from the result."""

    num_iterations: int = field(default=3, metadata={"help": "iterations of sample -> label -> train"})
    prompt_schedule: str = field(
        default="disjoint",
        metadata={
            "help": "disjoint: iteration i uses the i-th of num_iterations prompt slices; same: all prompts every "
            "iteration"
        },
    )
    num_responses: int = field(default=5, metadata={"help": "K responses sampled per prompt"})
    max_new_tokens: int = field(default=512, metadata={"help": "response length limit when sampling"})
    temperature: float | None = field(default=None, metadata={"help": "sampling temperature (default 1.0)"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling p (default 1.0: off)"})
    top_k: int | None = field(default=None, metadata={"help": "top-k sampling (default 0: off)"})
    min_p: float | None = field(default=None, metadata={"help": "min-p sampling (default 0: off)"})
    repetition_penalty: float | None = field(default=None, metadata={"help": "repetition penalty (default 1.0: off)"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    sampling_backend: str = field(
        default="transformers",
        metadata={
            "help": "labeling and the held-out evaluation sample with transformers (the policy being trained) or vllm "
            "(a vllm.LLM of the saved policy, as uclaml/SPPO's scripts/generate.py)"
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.5,
        metadata={
            "help": "sampling_backend vllm: the labeling engine's share of each GPU's memory (vLLM's "
            "gpu_memory_utilization; the policy being trained stays on the GPU beside it)"
        },
    )
    aggregation: str = field(default="rank", metadata={"help": "labeler score: rank, copeland or bradley_terry"})
    strategy: str = field(
        default="best_vs_worst",
        metadata={"help": "labeler pairs: best_vs_worst, best_vs_random, best_vs_second, all_pairs"},
    )
    pairs_per_prompt: int | None = field(
        default=None, metadata={"help": "pairs per prompt (default 1; all_pairs: all)"}
    )
    margin_threshold: float = field(default=0.0, metadata={"help": "drop pairs whose score margin is <= this"})
    allow_unfinished_chosen: bool = field(
        default=False, metadata={"help": "let a response cut at max_new_tokens (no EOS) be chosen"}
    )
    conversation_format: str = field(
        default="pairrm",
        metadata={
            "help": "single-turn conversations to PairRM: pairrm or plain (user text + bare response, as SPPO labelled)"
        },
    )
    len_penalty: float = field(
        default=0.0,
        metadata={"help": "strategy max_min_p: score penalty per response character (RLHFlow's --len_penalty)"},
    )
    label_chunk_size: int = field(
        default=256, metadata={"help": "prompts per saved labeling chunk (the unit of resume)"}
    )
    sppo: bool = field(
        default=False, metadata={"help": "train SPPO's soft loss on chosen_probs_win/lose instead of DPO"}
    )
    sppo_probabilities: str = field(
        default="authors",
        metadata={
            "help": "SPPO soft labels: authors (mean_j sigmoid(s_i - s_j) of the round-robin scores, uclaml/SPPO's "
            "compute_prob, for which beta 0.001 was tuned) or calibrated (the labeler's mean calibrated P(i > j))"
        },
    )
    dataset_hub_id: str | None = field(
        default=None, metadata={"help": "push each iteration's pairs to this hub dataset as split iteration_<i>"}
    )
    dataset_hub_private: bool = field(default=True, metadata={"help": "push the pairs as a private dataset"})

    def __post_init__(self):
        for name, allowed in (
            ("prompt_schedule", SCHEDULES),
            ("sppo_probabilities", SPPO_PROBABILITIES),
            ("sampling_backend", BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        super().__post_init__()

    def sampling(self, use_checkpoint_sampling: bool = False) -> SamplingArguments:
        return SamplingArguments(
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            use_checkpoint_sampling=use_checkpoint_sampling,
        )


# ---- one iteration -------------------------------------------------------------------------------------------
def label(
    config: IterativeDPOConfig,
    iteration: int,
    prompts: Dataset,
    policy: Any,
    tokenizer: Any,
    pairrm: Any,
    policy_name: str,
    state: PartialState,
    sampling: SamplingArguments,
) -> Dataset:
    """The iteration's preference pairs: loaded when already saved, else labeled (resumable) and saved."""
    directory = Path(config.output_dir) / f"iteration_{iteration}"
    saved = directory / "pairs"
    if (saved / "dataset_info.json").exists():
        logger.info("iteration %d: reusing the labeled pairs in %s", iteration, saved)
        return load_from_disk(str(saved))
    vllm = config.sampling_backend == "vllm"  # vLLM loads the saved policy itself (its path: policy_name)
    engine = None
    if vllm:  # one engine per process, on its own GPU (each process labels its share of the prompts)
        engine = colocated_vllm(assets.resolve(policy_name, "policy"), state.process_index, state.local_process_index,
                                state.num_processes, gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                                dtype="bfloat16" if config.bf16 else "auto", seed=config.seed + iteration)
    labeler = PreferenceLabeler(
        pairrm,
        engine if vllm else policy,
        None if vllm else tokenizer,
        backend=config.sampling_backend,
        num_responses=config.num_responses,
        aggregation=config.aggregation,
        strategy=config.strategy,
        pairs_per_prompt=config.pairs_per_prompt,
        margin_threshold=config.margin_threshold,
        allow_unfinished_chosen=config.allow_unfinished_chosen,
        len_penalty=config.len_penalty,
        conversation_format=config.conversation_format,
        seed=config.seed + iteration,
        sampling=sampling,
        generation_batch_size=config.generation_batch_size,
    )
    labeler.policy_name = policy_name
    if not vllm:
        labeler.sampler.compute_dtype = compute_dtype(config)  # fp32 masters sample in the run's compute dtype
    work = directory / "pairs.chunks"
    pairs = labeler.label(prompts, work, chunk_size=config.label_chunk_size)
    if engine is not None:  # the engine's GPU memory goes back to training
        del labeler, engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if config.sppo and config.sppo_probabilities == "authors" and len(pairs):
        win, lose = authors_probabilities(pairs["score_chosen"], pairs["score_rejected"], pairs["all_rm_scores"])
        pairs = (
            pairs.remove_columns(list(PROB_COLUMNS)).add_column(PROB_COLUMNS[0], win).add_column(PROB_COLUMNS[1], lose)
        )
    state.wait_for_everyone()  # every process has read the chunks before they are removed
    if state.is_main_process:
        save_dataset(pairs, str(saved), "save_to_disk")
        remove_store(work)
        if config.dataset_hub_id:
            pairs.push_to_hub(config.dataset_hub_id, split=f"iteration_{iteration}", private=config.dataset_hub_private)
    state.wait_for_everyone()
    return pairs


def train(
    config: IterativeDPOConfig, iteration: int, pairs: Dataset, policy: Any, tokenizer: Any, peft: Any, evaluate: Any
) -> dict[str, float]:
    """DPO (or SPPO) from `policy` against a frozen copy of it; saves the result to iteration_<i>/model (fp32),
    evaluates it (`evaluate(model, trainer, iteration)`), and resumes from the trainer's last checkpoint when one
    exists."""
    directory = Path(config.output_dir) / f"iteration_{iteration}"
    columns = ["prompt", "chosen", "rejected"] + (list(PROB_COLUMNS) if config.sppo else [])
    args = dataclasses.replace(config, output_dir=str(directory / "trainer"))
    # the reference: a frozen copy; with LoRA the adapter-disabled policy; under ZeRO-3 (a partitioned policy cannot
    # be copied) TRL loads it from the policy's own path and shards it with the same DeepSpeed config (eval mode)
    copy_reference = peft is None and not zero3_enabled()
    ref_model = copy.deepcopy(policy).eval().requires_grad_(False) if copy_reference else None
    trainer_class = SPPOTrainer if config.sppo else DPOTrainer
    trainer = quiet_log_dicts(
        trainer_class(
            model=policy,
            ref_model=ref_model,
            args=args,
            processing_class=tokenizer,
            train_dataset=pairs.select_columns(columns),
            peft_config=peft,
        )
    )
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    if last:
        logger.info("iteration %d: resuming training from %s", iteration, last)
    result = trainer.train(resume_from_checkpoint=last)
    model_dir = str(directory / "model")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if peft is not None:  # merge the adapter into the fp32 base: the next iteration starts from the merged policy
        model = model.merge_and_unload()
        if trainer.is_world_process_zero():
            model.save_pretrained(model_dir)
    else:
        trainer.save_model(model_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(model_dir)
    logs = [log for log in trainer.state.log_history if "rewards/margins" in log]
    stats = {"train_loss": float(result.training_loss), "steps": trainer.state.global_step}
    if logs:
        stats.update({k: float(logs[-1][k]) for k in ("rewards/margins", "rewards/accuracies") if k in logs[-1]})
    stats.update(evaluate(model, trainer, iteration))
    del trainer, ref_model
    return stats


# ---- resume: the run's identity -------------------------------------------------------------------------------
# DPOConfig's fields that change what a run learns (the rest: logging, saving, hub, workers)
TRAINING_SETTINGS = (
    "beta",
    "loss_type",
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "lr_scheduler_kwargs",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "data_seed",
    "bf16",
    "fp16",
    "max_length",
    "truncation_mode",
    "optim",
    "optim_args",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "label_smoothing",
    "loss_weights",
    "use_weighting",
    "ld_alpha",
    "f_divergence_type",
    "precompute_ref_log_probs",
    "padding_free",
)
# fields of the recipe's own dataclasses that do not change the numbers
NOT_IDENTITY = (
    "generation_batch_size",
    "eval_gpu_memory_utilization",  # the evaluation engine's memory share, not its numbers
    "vllm_gpu_memory_utilization",  # the labeling engine's
    "label_chunk_size",
    "dataset_hub_id",
    "dataset_hub_private",
    "pairrm_device",
    "pairrm_batch_size",
    "pairrm_max_tokens",
)


def run_identity(
    script_args: RecipeArguments, config: IterativeDPOConfig, model_args: Any, processes: int
) -> dict[str, Any]:
    """Everything the run's numbers depend on: the recipe's settings, DPO's `TRAINING_SETTINGS`, the data, judge
    and policy arguments, the number of processes. Recorded in `output_dir/manifest.json` by the first run; a
    resumed run with another identity is refused (`core.identity.check_run_identity`, the labeler's mechanism)."""
    base = {f.name for f in dataclasses.fields(DPOConfig)}
    own = [f.name for f in dataclasses.fields(config) if f.name not in base]
    training = {k: getattr(config, k) for k in [*own, *TRAINING_SETTINGS] if k not in NOT_IDENTITY}
    script = {k: v for k, v in dataclasses.asdict(script_args).items() if k not in NOT_IDENTITY}
    return {
        "training": training,
        "data_and_judge": script,
        "model": dataclasses.asdict(model_args),
        "processes": processes,
    }


# ---- the loop ----------------------------------------------------------------------------------------------
def prompt_slices(config: IterativeDPOConfig, prompts: Dataset) -> list[Dataset]:
    if config.prompt_schedule == "same":
        return [prompts] * config.num_iterations
    bounds = np.linspace(0, len(prompts), config.num_iterations + 1).astype(int)
    return [prompts.select(range(bounds[i], bounds[i + 1])) for i in range(config.num_iterations)]


def make_parser():
    return make_recipe_parser(IterativeDPOConfig, IterativeDPOScriptArguments)


def main(
    script_args: IterativeDPOScriptArguments,
    training_args: IterativeDPOConfig,
    model_args: Any,
    judge: PairRM | None = None,
    eval_judge: PairRM | None = None,
) -> dict[str, Any]:
    """Run (or resume) all iterations; returns the summary (also written to summary.json and printed).

    `judge` / `eval_judge`: loaded PairRMs to use instead of `script_args.pairrm` / `eval_pairrm`."""
    config = training_args
    state = PartialState(cpu=config.use_cpu or not torch.cuda.is_available())
    out = Path(config.output_dir)
    check_run_identity(
        out / "manifest.json",
        run_identity(script_args, config, model_args, state.num_processes),
        "--output_dir",
        write=state.is_main_process,
    )
    sampling = config.sampling(script_args.use_checkpoint_sampling)
    train_prompts, eval_set = split_eval(script_args, load_prompt_dataset(script_args))
    slices = prompt_slices(config, train_prompts)
    pairrm = judge or judge_for(script_args, config.use_cpu)
    if eval_judge is None:
        eval_judge = (
            pairrm
            if script_args.eval_pairrm is None
            else judge_for(dataclasses.replace(script_args, pairrm=script_args.eval_pairrm), config.use_cpu)
        )
    peft = get_peft_config(model_args)
    zero3 = zero3_enabled()
    done = [i for i in range(1, config.num_iterations + 1) if (out / f"iteration_{i}" / "done.json").exists()]
    start = next((i for i in range(1, config.num_iterations + 1) if i not in done), config.num_iterations + 1)
    current = model_args.model_name_or_path if start == 1 else str(out / f"iteration_{start - 1}" / "model")
    if start > 1:
        logger.info("resuming: iterations 1..%d are finished, starting from %s", start - 1, current)

    evaluator = None
    if len(eval_set):
        references = list(eval_set["reference"]) if "reference" in eval_set.column_names else None
        evaluator = Evaluator(
            eval_judge,
            list(eval_set["prompt"]),
            references,
            sampling,
            config.seed,
            str(out),
            dtype=compute_dtype(config),
            backend=config.sampling_backend,
            gpu_memory_utilization=script_args.eval_gpu_memory_utilization,
        )
        if config.sampling_backend == "vllm" and state.is_main_process and not (out / "eval_before.json").exists():
            evaluator(model_args.model_name_or_path, None, 0)  # vLLM samples the initial policy from its path
        elif (state.is_main_process or zero3) and not (out / "eval_before.json").exists():
            policy, tokenizer = load_policy(model_args)  # the initial policy, even when resuming
            with gathered(policy.to(state.device)):
                evaluator(policy, tokenizer, 0, write=state.is_main_process)
            del policy
        state.wait_for_everyone()

    def evaluate(model: Any, trainer: Any, iteration: int) -> dict[str, float]:
        """Held-out metrics of the iteration's policy (main process), shared with every process and logged."""
        if evaluator is None:
            return {}
        saved = str(out / f"iteration_{iteration}" / "model")  # vLLM samples the saved policy
        result = evaluate_everywhere(evaluator, model, trainer.processing_class, iteration, saved=saved)
        metrics = {f"eval/{k}": v for k, v in result.items() if k != "step"}
        trainer.log(dict(metrics))  # to the configured report_to trackers
        return metrics

    for iteration in range(start, config.num_iterations + 1):
        policy, tokenizer = load_policy(dataclasses.replace(model_args, model_name_or_path=current))
        policy.to(state.device)
        with gathered(policy):  # ZeRO-3 partitions the policy at load time: labeling samples from the whole one
            pairs = label(
                config, iteration, slices[iteration - 1], policy.eval(), tokenizer, pairrm, current, state, sampling
            )
        stats: dict[str, Any] = {
            "iteration": iteration,
            "prompts": len(slices[iteration - 1]),
            "pairs": len(pairs),
            "mean_margin": float(np.mean(pairs["margin"])) if len(pairs) else 0.0,
            "margins": [float(m) for m in pairs["margin"]],
        }
        if len(pairs):
            warn_half_precision(policy, f"dtype={model_args.dtype}")
            stats.update(train(config, iteration, pairs, policy.train(), tokenizer, peft, evaluate))
        else:
            logger.warning(
                "iteration %d produced no pairs (all ties?); the policy is carried over unchanged", iteration
            )
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

    iterations = [
        json.loads((out / f"iteration_{i}" / "done.json").read_text()) for i in range(1, config.num_iterations + 1)
    ]
    summary: dict[str, Any] = {
        "iterations": iterations,
        "loss": "sppo" if config.sppo else "dpo",
        "eval_prompts": len(eval_set),
    }
    if evaluator is not None:
        summary["metrics"] = metrics_table(out, iterations)
        last = summary["metrics"][-1]
        summary["win_rate_after_vs_before"] = last.get("vs_initial/win_rate")
        summary["win_rate_vs_reference_before"] = summary["metrics"][0].get("vs_reference/win_rate")
        summary["win_rate_vs_reference_after"] = last.get("vs_reference/win_rate")
    if state.is_main_process:
        if evaluator is not None:
            (out / "metrics.json").write_text(json.dumps(summary["metrics"], indent=1))
        summary["plots"] = plot(out, summary.get("metrics", []), iterations)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(format_summary(config, script_args, summary))
    state.wait_for_everyone()
    return summary


def metrics_table(out: Path, iterations: list[dict]) -> list[dict[str, float]]:
    """Iteration 0 (the initial policy) and each iteration's held-out metrics, from eval_metrics.json/done.json."""
    before = json.loads((out / "eval_metrics.json").read_text())[0]
    rows = [{"iteration": 0, **{k: v for k, v in before.items() if k != "step"}}]
    for it in iterations:
        rows.append(
            {
                "iteration": it["iteration"],
                "pairs": it["pairs"],
                "mean_margin": it["mean_margin"],
                **{k[len("eval/") :]: v for k, v in it.items() if k.startswith("eval/")},
            }
        )
    return rows


def plot(out: Path, metrics: list[dict], iterations: list[dict]) -> list[str]:
    """win_rate.png (held-out win rates per iteration) and margins.png (each iteration's pair margins)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("no plots: matplotlib is not installed (pip install 'pairrm-rlhf[plots]')")
        return []
    paths = []
    if metrics:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        steps = [m["iteration"] for m in metrics]
        for key, label in (("vs_initial/win_rate", "vs initial policy"), ("vs_reference/win_rate", "vs references")):
            if any(key in m for m in metrics):
                ax.plot(steps, [m.get(key, np.nan) for m in metrics], marker="o", label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set(xlabel="iteration", ylabel="held-out win rate", ylim=(0, 1), xticks=steps)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "win_rate.png", dpi=100)
        plt.close(fig)
        paths.append(str(out / "win_rate.png"))
    if any(it.get("margins") for it in iterations):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for it in iterations:
            if it.get("margins"):
                ax.hist(it["margins"], bins=20, alpha=0.5, label=f"iteration {it['iteration']}")
        ax.set(xlabel="PairRM score margin (chosen - rejected)", ylabel="pairs")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "margins.png", dpi=100)
        plt.close(fig)
        paths.append(str(out / "margins.png"))
    return paths


def format_summary(config: IterativeDPOConfig, script_args: RecipeArguments, summary: dict[str, Any]) -> str:
    lines = [
        f"Iterative {summary['loss'].upper()} with PairRM: {len(summary['iterations'])} iteration(s), "
        f"K={config.num_responses} responses per prompt"
    ]
    for it in summary["iterations"]:
        line = (
            f"  iteration {it['iteration']}: {it['prompts']} prompts -> {it['pairs']} pairs, "
            f"mean PairRM score margin {it['mean_margin']:.3f}"
        )
        if "train_loss" in it:
            line += (
                f"; {it['steps']} steps, loss {it['train_loss']:.4f}, reward margin "
                f"{it.get('rewards/margins', float('nan')):.4f}, "
                f"accuracy {it.get('rewards/accuracies', float('nan')):.2f}"
            )
        lines.append(line)
    n = summary["eval_prompts"]
    for m in summary.get("metrics", []):
        parts = [
            f"{name} {m[key]:.3f}"
            for key, name in (
                ("vs_initial/win_rate", "win rate vs initial"),
                ("vs_reference/win_rate", "win rate vs reference"),
                ("vs_reference/ties", "ties vs reference"),
                ("mean_length", "mean length"),
            )
            if key in m
        ]
        lines.append(f"  held-out ({n} prompts) after iteration {m['iteration']}: " + ", ".join(parts))
    if script_args.pairrm == TINY:
        lines.append("  (the bundled tiny PairRM has random weights: these numbers only show that the pipeline runs)")
    lines.append(
        f"Saved to {config.output_dir} (iteration_<i>/pairs, iteration_<i>/model, metrics.json, "
        f"summary.json{', ' + ', '.join(Path(p).name for p in summary['plots']) if summary.get('plots') else ''})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    run_recipe(make_parser, main, interrupted="rerun the same command to resume")
