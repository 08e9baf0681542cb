"""What the recipe scripts share: TRL-style parsing, prompt data, fp32-master policies, explicit sampling, evaluation.

Not part of the library (`pairrm_rlhf` never imports recipes). Every recipe is TRL's script shape:
`make_parser()` returns a `trl.TrlParser` over (script arguments, training config, `trl.ModelConfig`), and
`main(script_args, training_args, model_args)` runs it. The script arguments are `RecipeArguments`: the judge
(`pairrm_rlhf.args.PairRMArguments`), the prompt data and the sampling opt-in. `--config NAME` also finds the configs
shipped in the package (`pairrm_rlhf/configs/NAME.yaml`, `pairrm_rlhf.args.resolve_config`). `tiny` (policy,
judge, dataset) is resolved by `pairrm_rlhf.core.assets.resolve` only.

Precision: the policy is loaded with `ModelConfig.dtype` (TRL's default `float32`), whatever the checkpoint declares,
so the trainable parameters are fp32 master weights; the GPU configs compute in bf16 through the trainer's mixed
precision (`bf16: true`). `dtype: bfloat16` (or `auto` on a bf16 checkpoint) is the opt-in to pure-bf16 training and
logs a warning: AdamW updates below bf16's resolution (~0.4% of a weight) are lost.

Sampling: every generation (TRL trainers' rollouts, PPO, labeling, evaluation) uses one explicit `GenerationConfig`
built by `pairrm_rlhf.core.generation.build_generation_config` from the config's own fields; an unset field is
neutral (no top-k/top-p/min-p, no penalty), or the checkpoint's `generation_config` value with
`use_checkpoint_sampling: true`. Labeling and evaluation sample in the run's compute dtype (`compute_dtype`: autocast
to bf16 over the fp32 masters with `bf16: true`), through `core.generation.sample_responses`, and evaluate on every
process (`evaluate_everywhere`: under ZeRO-3 each one gathers the parameters and samples).

On a machine without CUDA the parser defaults to `use_cpu: true, bf16: false` (a config or flag still wins).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import contextlib
import dataclasses
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from transformers import TrainingArguments
from transformers.trainer_callback import ProgressCallback
from trl import ModelConfig, TrlParser, get_peft_config

from pairrm_rlhf.args import PairRMArguments
from pairrm_rlhf.core import entry, generation
from pairrm_rlhf.core.assets import TINY
from pairrm_rlhf.core.distributed import cpu_deepspeed_backend, end_distributed_run
from pairrm_rlhf.core.generation import NEUTRAL, OFF, SamplingArguments, build_generation_config, sample_responses
from pairrm_rlhf.evaluation.length import length_controlled_win_rate
from pairrm_rlhf.labeling import load_prompts
from pairrm_rlhf.pairrm import PairRM
from pairrm_rlhf.trl.judge import PairRMJudge

__all__ = [
    "RecipeArguments",
    "TINY",
    "make_recipe_parser",
    "parse",
    "run_recipe",
    "quiet_log_dicts",
    "load_prompt_dataset",
    "split_eval",
    "load_policy",
    "get_peft_config",
    "sampling_kwargs",
    "compute_dtype",
    "generate",
    "win_rate",
    "Evaluator",
    "evaluate_everywhere",
    "judge_for",
    "lazy_judge",
]

logger = logging.getLogger("recipes")
metrics_logger = logging.getLogger("recipes.metrics")


@dataclass
class RecipeArguments(PairRMArguments):
    """Script arguments shared by every recipe: the judge (PairRMArguments), the prompts, the sampling opt-in."""

    dataset_name: str = field(
        default=TINY,
        metadata={"help": "prompts: hub id, save_to_disk dir, .jsonl/.parquet file; 'tiny' = the 32 bundled prompts"},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    dataset_train_split: str = field(default="train", metadata={"help": "dataset split"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with prompts (strings or message lists)"})
    reference_column: str | None = field(
        default="reference",
        metadata={"help": "column with reference responses (string or messages; None: no references)"},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    eval_prompts: int = field(
        default=0, metadata={"help": "hold out the last N prompts (at most a quarter) for evaluation; 0: no evaluation"}
    )
    conversational: bool = field(default=True, metadata={"help": "wrap string prompts as one user message"})
    use_checkpoint_sampling: bool = field(
        default=False,
        metadata={"help": "sampling fields left unset come from the checkpoint's generation_config (default: neutral)"},
    )


def make_recipe_parser(training_class: type, script_class: type = RecipeArguments) -> TrlParser:
    """`TrlParser((script_class, training_class, ModelConfig))`; without CUDA it defaults to CPU and no bf16.

    `ddp_find_unused_parameters` defaults to False (a config may set it): every trainable parameter of a causal LM
    (or its LoRA adapters) gets a gradient at every step, so DDP's search is wasted work, and torch warns on every
    process that it found nothing ("find_unused_parameters=True was specified ..."); transformers turns it on whenever
    gradient checkpointing is off."""
    parser = TrlParser((script_class, training_class, ModelConfig))
    if issubclass(training_class, TrainingArguments):  # TRL's trainers (our PPO has no DDP flags)
        parser.set_defaults(ddp_find_unused_parameters=False)
    if not torch.cuda.is_available():
        parser.set_defaults(use_cpu=True, bf16=False)
    return parser


def parse(parser: TrlParser, argv: list[str] | None = None) -> tuple[Any, ...]:
    """(script_args, training_args, model_args) from `argv` (default sys.argv); `--config NAME` may be bundled.
    Every problem found here is a one-line error (`pairrm_rlhf.core.entry.parse`). DeepSpeed on a CPU-only machine
    defaults `--ddp_backend` to gloo (`core.distributed.cpu_deepspeed_backend`: else every rank thinks it is alone)."""
    backend = cpu_deepspeed_backend()
    if backend and any("ddp_backend" in {f.name for f in dataclasses.fields(t)} for t in parser.dataclass_types):
        parser.set_defaults(ddp_backend=backend)  # a config file or the command line still wins
    script_args, training_args, model_args = entry.parse(parser, argv, os.path.basename(sys.argv[0]))
    if not model_args.model_name_or_path:
        raise ValueError("--model_name_or_path is required (a hub id, a directory, or 'tiny')")
    return script_args, training_args, model_args


def check_environment(script_args: RecipeArguments, model_args: ModelConfig) -> None:
    """The checks that need this machine, before anything loads: the judge's device, and with HF_HUB_OFFLINE that
    the judge's and the policy's hub ids are cached (one line each, naming the flag)."""
    script_args.check_environment()
    entry.check_hub_id(model_args.model_name_or_path, "--model_name_or_path")


def run_recipe(make_parser: Any, main: Any, interrupted: str | None = None) -> None:
    """A recipe's `__main__`: parse, check, run `main`, and end as every command of the package does
    (`pairrm_rlhf.core.entry.run_command`: one log handler, a user error in one line with exit code 2, Ctrl-C with
    130; then `end_distributed_run`, the orderly end of a multi-process run). Known third-party noise is silenced
    first (`quiet_known_output`)."""

    def command() -> None:
        script_args, training_args, model_args = parse(make_parser())
        check_environment(script_args, model_args)
        main(script_args, training_args, model_args)

    quiet_known_output()
    entry.run_command(os.path.basename(sys.argv[0]), command, interrupted)
    end_distributed_run()  # the orderly end of a multi-process run; nothing in one process


# ---- output: what a run prints --------------------------------------------------------------------------------
def quiet_known_output() -> None:
    """The known third-party noise of a recipe run, each silenced on purpose, here and nowhere else:

    - DeepSpeed's "Setting accelerator to CPU ... we were unable to detect it" on a machine without an accelerator:
      fixed at the source by naming the accelerator its detection would pick (`DS_ACCELERATOR=cpu`; a value the
      user set wins). Only when torch sees no accelerator, so GPU runs are untouched.
    - transformers 5's FutureWarnings "`is_gradient_checkpointing` / `gradient_checkpointing_disable` /
      `gradient_checkpointing_enable` is deprecated": TRL 1.16 calls them around every generation
      (`trl/models/utils.py`, `_unwrap_model_for_generation`), and `pairrm_rlhf.trl.ppo` calls the last one while
      `transformers>=5.0` is the floor; the recipes set no deprecated flag. Drop this with a TRL that calls the
      `activation_checkpointing` names.
    - accelerate's "Removed shared tensor {'...lm_head.weight'}" at each PPO checkpoint of a policy with tied
      embeddings: safetensors stores a shared tensor once and loading re-ties it (PPO's resume test reloads one).
    """
    if not torch.accelerator.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings(
        "ignore",
        message=r"`(is_gradient_checkpointing|gradient_checkpointing_(en|dis)able)` is deprecated",
        category=FutureWarning,
    )
    shared = logging.getLogger("accelerate.utils.other")
    if _not_removed_shared_tensor not in shared.filters:
        shared.addFilter(_not_removed_shared_tensor)


def _not_removed_shared_tensor(record: logging.LogRecord) -> bool:
    return "Removed shared tensor" not in record.getMessage()


class MetricsProgressCallback(ProgressCallback):
    """transformers' progress bar without its per-step `print(dict)`, so the recipe's summary is what a run ends
    with: each log dict goes to the `recipes.metrics` logger at DEBUG (`PAIRRM_RLHF_LOG_LEVEL=DEBUG` prints it;
    `trainer.state.log_history` and the `report_to` trackers keep every value) and the bar shows the latest loss."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not (state.is_world_process_zero and logs):
            return
        metrics_logger.debug("step %d: %s", state.global_step, logs)
        if self.training_bar is not None and isinstance(logs.get("loss"), (int, float)):
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


def quiet_log_dicts(trainer: Any) -> Any:
    """`trainer` with `MetricsProgressCallback` in place of transformers' `ProgressCallback` (if it had one)."""
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(MetricsProgressCallback())
    return trainer


# ---- data -----------------------------------------------------------------------------------------------------
def _text(value: Any) -> str:
    """A response as text: a string, or the last assistant message of a message list (e.g. UltraFeedback `chosen`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        answers = [m["content"] for m in value if m.get("role") == "assistant"]
        if answers:
            return answers[-1]
    raise ValueError(f"cannot read a reference response from {value!r:.100}")


def load_prompt_dataset(args: RecipeArguments, *, need_reference: bool = False) -> Dataset:
    """A dataset with a `prompt` column (message lists when `conversational`) and, when the source has one, a
    `reference` column of strings. Other columns are dropped."""
    data = load_prompts(args.dataset_name, args.dataset_config, args.dataset_train_split)
    if args.max_prompts is not None:
        data = data.select(range(min(args.max_prompts, len(data))))
    if args.prompt_column not in data.column_names:
        raise ValueError(
            f"--prompt_column: dataset {args.dataset_name!r} has no column {args.prompt_column!r} "
            f"(columns: {data.column_names})"
        )
    has_reference = args.reference_column is not None and args.reference_column in data.column_names
    if need_reference and not has_reference:
        raise ValueError(
            f"--reference_column: this recipe needs reference responses; dataset {args.dataset_name!r} "
            f"has no column {args.reference_column!r} (columns: {data.column_names})"
        )
    keep = [args.prompt_column] + ([args.reference_column] if has_reference else [])

    def convert(row: dict) -> dict:
        prompt = row[args.prompt_column]
        if args.conversational and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        out = {"prompt": prompt}
        if has_reference:
            out["reference"] = _text(row[args.reference_column])
        return out

    return data.select_columns(keep).map(convert, remove_columns=keep)


def split_eval(args: RecipeArguments, data: Dataset) -> tuple[Dataset, Dataset]:
    """(train, held-out): the last `eval_prompts` rows (at most a quarter of the data) are held out."""
    n_eval = min(args.eval_prompts, len(data) // 4)
    if not n_eval:
        return data, data.select([])
    return data.select(range(len(data) - n_eval)), data.select(range(len(data) - n_eval, len(data)))


# ---- the policy -----------------------------------------------------------------------------------------------
def load_policy(model_args: ModelConfig) -> tuple[Any, Any]:
    """(model, tokenizer) on the CPU in train mode, in `model_args.dtype` (default float32: fp32 masters): the one
    loader `pairrm_rlhf.core.generation.load_policy` with the `ModelConfig`'s fields."""
    model, tokenizer = generation.load_policy(
        model_args.model_name_or_path,
        "cpu",
        model_args.dtype or "float32",
        revision=model_args.model_revision,
        attn_implementation=model_args.attn_implementation,
        train=True,
    )
    warn_half_precision(model, f"dtype={model_args.dtype}")
    return model, tokenizer


def warn_half_precision(model: torch.nn.Module, how: str) -> bool:
    """Warn (and return True) when trainable parameters are not float32."""
    half = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
    if half:
        logger.warning(
            "training %s weights directly (%s): AdamW updates below their resolution are lost. "
            "The default dtype float32 keeps fp32 master weights; `bf16: true` still computes in bf16.",
            "/".join(half),
            how,
        )
    return bool(half)


def sampling_kwargs(training_args: Any, model: Any, tokenizer: Any, script_args: RecipeArguments) -> dict[str, Any]:
    """Every sampling field for a TRL trainer's `generation_kwargs`: the config's own values, unset ones neutral (or
    the checkpoint's with `use_checkpoint_sampling`), so the checkpoint's generation_config cannot change them."""
    length = getattr(training_args, "max_completion_length", None) or training_args.max_new_tokens
    sampling = SamplingArguments(
        max_new_tokens=length,
        temperature=training_args.temperature,
        top_p=training_args.top_p,
        top_k=training_args.top_k,
        min_p=training_args.min_p,
        repetition_penalty=training_args.repetition_penalty,
        use_checkpoint_sampling=script_args.use_checkpoint_sampling,
    )
    config = build_generation_config(model, tokenizer, sampling)
    names = list(NEUTRAL) + ([] if getattr(training_args, "use_vllm", False) else list(OFF))  # vLLM: its own names
    return {**{k: getattr(config, k) for k in names}, **(training_args.generation_kwargs or {})}


# ---- evaluation -----------------------------------------------------------------------------------------------
def compute_dtype(training_args: Any) -> torch.dtype | None:
    """The dtype the run computes in: bfloat16 with `bf16: true`, float16 with `fp16: true`, else None (the weights').
    Sampling for labeling and evaluation uses it too, so fp32 master weights never sample in fp32 on a bf16 run."""
    if getattr(training_args, "bf16", False):
        return torch.bfloat16
    return torch.float16 if getattr(training_args, "fp16", False) else None


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list,
    sampling: SamplingArguments,
    *,
    seed: int,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """One sampled response per prompt (`core.generation.sample_responses`), reproducible under `seed`, computed in
    `dtype` (autocast; None: the weights' dtype)."""
    model.eval()
    config = build_generation_config(model, tokenizer, sampling)
    device = next(model.parameters()).device
    out: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in range(0, len(prompts), batch_size):
            out += [
                r[0]
                for r in sample_responses(
                    model, tokenizer, prompts[s : s + batch_size], 1, generation_config=config, compute_dtype=dtype
                )
            ]
    return out


def win_rate(pairrm: PairRM, prompts: list, first: list[str], second: list[str]) -> dict[str, float]:
    """PairRM's verdicts of `first` over `second`: win rate (ties count 1/2), the length-controlled win rate (at zero
    length difference in characters, `evaluation.length`), tie rate, mean two-order logit."""
    z = PairRMJudge(pairrm).two_order_logits(prompts, [[a, b] for a, b in zip(first, second)])
    wins = (z > 0) + 0.5 * (z == 0)
    lc = length_controlled_win_rate(wins, [len(a) for a in first], [len(b) for b in second])
    return {
        "win_rate": float(np.mean(wins)),
        "lc_win_rate": lc,
        "ties": float(np.mean(z == 0)),
        "mean_logit": float(np.mean(z)),
    }


class Evaluator:
    """Held-out evaluation: the policy's samples vs the initial policy's (the first call's, kept in
    `eval_before.json`) and vs the references, by the judge. Appends to `eval_metrics.json` and the completions
    table `eval_completions.jsonl` in `output_dir`. Sampling runs under a forked RNG (training is unchanged)."""

    def __init__(
        self,
        judge: PairRM,
        prompts: list,
        references: list[str] | None,
        sampling: SamplingArguments,
        seed: int,
        output_dir: str,
        dtype: torch.dtype | None = None,
    ):
        self.judge, self.prompts, self.references, self.sampling, self.seed = judge, prompts, references, sampling, seed
        self.dtype = dtype  # the run's compute dtype (`compute_dtype`): sampling runs under autocast to it
        self.output_dir, self.before, self.history = output_dir, None, []
        history_file = os.path.join(output_dir, "eval_metrics.json")
        if os.path.exists(history_file):  # a resumed run continues the history
            with open(history_file) as f:
                self.history = json.load(f)

    def __call__(self, model: Any, tokenizer: Any, step: int, write: bool = True) -> dict[str, float]:
        """The metrics of `model` at `step`; `write=False` (the other processes under ZeRO-3) skips the files."""
        samples = generate(model, tokenizer, self.prompts, self.sampling, seed=self.seed, dtype=self.dtype)
        before_file = os.path.join(self.output_dir, "eval_before.json")
        if self.before is None and os.path.exists(before_file):  # a resumed run keeps the initial policy's samples
            with open(before_file) as f:
                self.before = json.load(f)
        if self.before is None:
            self.before = samples
            if write:
                os.makedirs(self.output_dir, exist_ok=True)
                with open(before_file, "w") as f:
                    json.dump(samples, f)
        metrics: dict[str, float] = {"step": step, "mean_length": float(sum(len(s) for s in samples) / len(samples))}
        for name, verdict in (
            ("vs_initial", win_rate(self.judge, self.prompts, samples, self.before)),
            ("vs_reference", self.references and win_rate(self.judge, self.prompts, samples, self.references)),
        ):
            if verdict:
                metrics.update({f"{name}/{k}": v for k, v in verdict.items()})
        self.history = [h for h in self.history if h["step"] < step] + [metrics]
        if not write:
            return metrics
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, "eval_metrics.json"), "w") as f:
            json.dump(self.history, f, indent=1)
        with open(os.path.join(self.output_dir, "eval_completions.jsonl"), "a") as f:
            for prompt, sample in zip(self.prompts, samples):
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": sample}) + "\n")
        return metrics


def zero3_enabled() -> bool:
    """Is DeepSpeed ZeRO-3 active (parameters partitioned across processes)?"""
    from transformers.integrations import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


@contextlib.contextmanager
def gathered(model: Any):
    """Every parameter of `model` whole on this process for generation under ZeRO-3, as TRL's
    `unwrap_model_for_generation` does (collective: every process must enter); nothing otherwise."""
    if not zero3_enabled():
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        yield model


def evaluate_everywhere(evaluator: Evaluator, model: Any, tokenizer: Any, step: int) -> dict[str, float]:
    """`evaluator(model, ...)` as a multi-process run needs it (collective: every process must call it). Under ZeRO-3
    every process gathers the parameters and samples (generation needs every rank; the main process writes the files);
    otherwise the main process samples alone. Every process returns the main process's metrics."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    metrics: list[Any] = [None]
    if state.is_main_process or zero3_enabled():
        with gathered(model):
            metrics = [evaluator(model, tokenizer, step, write=state.is_main_process)]
    if state.num_processes > 1:
        metrics = broadcast_object_list(metrics)
    return metrics[0]


def judge_for(script_args: PairRMArguments, use_cpu: bool) -> PairRM:
    """The judge loaded from the script arguments (on the CPU when training on the CPU)."""
    return script_args.load(device="cpu" if use_cpu else None)


def lazy_judge(script_args: PairRMArguments, use_cpu: bool) -> Any:
    """The judge, loaded on first use (TRL reward functions), on the CPU when training on the CPU."""
    if use_cpu and script_args.pairrm_device is None:
        script_args = dataclasses.replace(script_args, pairrm_device="cpu")
    return script_args.lazy()
