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
process (`evaluate_everywhere`: under ZeRO-3 each one gathers the parameters and samples). With a recipe's
`sampling_backend: vllm` the evaluation samples with vLLM instead (`vllm_generate`: the labeler's vLLM backend, the
same `SamplingParams`) from the model's saved path, on the main process only (see `evaluate_everywhere`).

On a machine without CUDA the parser defaults to `use_cpu: true, bf16: false` (a config or flag still wins).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import dataclasses
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from _evaluation import (  # the held-out evaluation, re-exported for the recipes
    Evaluator,
    check_sampling_backend,
    check_vllm_evaluation,
    compute_dtype,
    evaluate_everywhere,
    gathered,
    generate,
    vllm_generate,
    win_rate,
    zero3_enabled,
)
from datasets import Dataset
from transformers import TrainingArguments
from transformers.trainer_callback import ProgressCallback
from trl import ModelConfig, TrlParser, get_peft_config

from pairrm_rlhf.args import PairRMArguments
from pairrm_rlhf.core import entry, generation
from pairrm_rlhf.core.assets import TINY
from pairrm_rlhf.core.distributed import cpu_deepspeed_backend, end_distributed_run
from pairrm_rlhf.core.generation import NEUTRAL, OFF, SamplingArguments, build_generation_config
from pairrm_rlhf.labeling import load_prompts
from pairrm_rlhf.pairrm import PairRM

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
    "vllm_generate",
    "check_sampling_backend",
    "check_vllm_evaluation",
    "win_rate",
    "Evaluator",
    "evaluate_everywhere",
    "gathered",
    "zero3_enabled",
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
    eval_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={
            "help": "sampling_backend vllm: the share of the GPU's memory the held-out evaluation's vLLM engine may "
            "take (vLLM's gpu_memory_utilization; the training state stays on the GPU beside it)"
        },
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


def judge_for(script_args: PairRMArguments, use_cpu: bool) -> PairRM:
    """The judge loaded from the script arguments (on the CPU when training on the CPU)."""
    return script_args.load(device="cpu" if use_cpu else None)


def lazy_judge(script_args: PairRMArguments, use_cpu: bool) -> Any:
    """The judge, loaded on first use (TRL reward functions), on the CPU when training on the CPU."""
    if use_cpu and script_args.pairrm_device is None:
        script_args = dataclasses.replace(script_args, pairrm_device="cpu")
    return script_args.lazy()
