"""The `label` command: sample K responses per prompt, score them pairwise with a judge, write a DPO dataset.

`run_label(label_args, pairrm_args, sampling_args)` checks the whole configuration before loading any model (enum
values, numbers, paths: a local-looking path that does not exist is "file not found", never a hub lookup; then the
prompts are loaded and the column names checked), then loads the judge and the policy, labels (resumable, sharded
under `accelerate launch`), writes the dataset, a dataset card (`<output>.card.md`, also pushed with
`--push_to_hub`) and a margin histogram (`<output>.margins.png`, needs the `plots` extra), and prints a summary
with the paths. `make_parser` follows TRL's scripts; `python -m pairrm_rlhf.labeling.command --config X` runs it
alone (X: a YAML file or a bundled config name), with `pairrm-rlhf label`'s behaviour (`core.entry.run_command`).

Failing early and short: with `--push_to_hub` the hub is checked (a token that can write, the repo created or
writable) before any model loads; a push that fails after the dataset is saved ends with one line, `saved to X; push
failed: why`, after the summary. Ctrl-C ends with "interrupted; rerun the same command to resume": finished chunks
are kept, and the rerun gives the same dataset as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..args import PairRMArguments
from ..core.distributed import end_distributed_run
from ..core.entry import check_device, check_hub_id, check_hub_push, parse, run_command
from ..core.sampling import SamplingArguments

if TYPE_CHECKING:
    from datasets import Dataset

    from .labeler import PreferenceLabeler

# The flags parse without torch, transformers or datasets (`label --help` and argument errors answer at once); the
# functions below import the labeling machinery when they run.
logger = logging.getLogger(__name__)
POLICY_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class LabelArguments:
    """Sample K responses per prompt, score them pairwise with PairRM and write a DPO preference dataset."""

    dataset: str | None = field(
        default=None,
        metadata={
            "help": "prompts: save_to_disk dir, .json/.jsonl/.parquet/.csv file, hub id; 'tiny' = 32 bundled prompts"
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "split to label"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with prompts (strings or message lists)"})
    conversational: bool = field(
        default=True,
        metadata={
            "help": "sample through the policy's chat template: string prompts become one user message (as the recipes)"
        },
    )
    responses_column: str | None = field(
        default=None, metadata={"help": "label these existing responses instead of sampling"}
    )
    max_prompts: int | None = field(default=None, metadata={"help": "label only the first N prompts"})
    policy: str | None = field(
        default=None, metadata={"help": "causal LM to sample from (hub id or dir); 'tiny' = the bundled tiny policy"}
    )
    policy_dtype: str | None = field(
        default=None, metadata={"help": "policy dtype: auto (the checkpoint's), float32, bfloat16 or float16"}
    )
    policy_device: str | None = field(
        default=None, metadata={"help": "policy device (default: this process's accelerate device)"}
    )
    backend: str = field(default="transformers", metadata={"help": "generation backend: transformers or vllm"})
    num_responses: int = field(default=4, metadata={"help": "K responses sampled per prompt (>= 2)"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    aggregation: str = field(
        default="rank", metadata={"help": "response score: rank (reference round-robin), copeland or bradley_terry"}
    )
    strategy: str = field(
        default="best_vs_worst",
        metadata={"help": "pairs: best_vs_worst, best_vs_random, best_vs_second, all_pairs or max_min_p"},
    )
    pairs_per_prompt: int | None = field(
        default=None, metadata={"help": "pairs per prompt (default 1; all_pairs: all)"}
    )
    margin_threshold: float = field(
        default=0.0, metadata={"help": "drop pairs whose score margin is <= this (ties are always dropped)"}
    )
    allow_unfinished_chosen: bool = field(
        default=False, metadata={"help": "let a response cut at max_new_tokens (no EOS) be chosen"}
    )
    conversation_format: str = field(
        default="pairrm",
        metadata={
            "help": "single-turn conversations: pairrm (llm-blender's multi-turn format) or plain (user text + bare "
            "response, as SPPO labelled)"
        },
    )
    len_penalty: float = field(
        default=0.0, metadata={"help": "max_min_p: score penalty per response character (RLHFlow's --len_penalty)"}
    )
    probability_temperature: float = field(
        default=1.0, metadata={"help": "T of P(A>B) = sigmoid(two-order logit / 2T) in chosen_probs*"}
    )
    seed: int = field(default=0, metadata={"help": "sampling and best_vs_random seed"})
    output_path: str | None = field(default=None, metadata={"help": "where to write the preference dataset"})
    output_format: str | None = field(
        default=None, metadata={"help": "save_to_disk, jsonl or parquet (default: by output_path extension)"}
    )
    chunk_size: int = field(default=256, metadata={"help": "prompts per saved chunk (the unit of resume)"})
    work_dir: str | None = field(
        default=None, metadata={"help": "where finished chunks are kept (default: <output_path>.chunks)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "discard chunks of an earlier run with other settings"})
    keep_chunks: bool = field(default=False, metadata={"help": "keep work_dir after the output is written"})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "also push the dataset (with its card) to this hub repo id"}
    )
    hub_private: bool = field(default=True, metadata={"help": "push the dataset as private (--no_hub_private: public)"})


def validate(label_args: LabelArguments, pairrm_args: PairRMArguments, sampling_args: SamplingArguments) -> None:
    """Check every setting that needs no data or model; one-line ValueError/FileNotFoundError naming the flag."""
    from ..core import assets
    from ..core.formats import CONVERSATION_FORMATS
    from ..core.sampling import BACKENDS
    from ..core.settings import check_choice
    from .io import OUTPUT_FORMATS, output_format_of
    from .pairs import AGGREGATIONS, STRATEGIES

    a = label_args
    if not a.dataset:
        raise ValueError("--dataset is required (a local path, a hub id or 'tiny')")
    if not a.output_path:
        raise ValueError("--output_path is required")
    if a.policy is None and a.responses_column is None:
        raise ValueError("--policy is required unless --responses_column is given")
    choices = {
        "strategy": STRATEGIES,
        "aggregation": AGGREGATIONS,
        "backend": BACKENDS,
        "output_format": OUTPUT_FORMATS,
        "policy_dtype": POLICY_DTYPES,
        "conversation_format": CONVERSATION_FORMATS,
    }
    for name, allowed in choices.items():
        if getattr(a, name) is not None:
            check_choice(f"--{name}", getattr(a, name), allowed)
    limits = {
        "num_responses": (a.num_responses, 2),
        "chunk_size": (a.chunk_size, 1),
        "seed": (a.seed, 0),
        "generation_batch_size": (a.generation_batch_size, 1),
        "max_prompts": (a.max_prompts, 1),
        "pairs_per_prompt": (a.pairs_per_prompt, 1),
    }
    for name, (value, least) in limits.items():
        if value is not None and value < least:
            raise ValueError(f"--{name}: {value} is below {least}")
    if a.margin_threshold < 0:
        raise ValueError(f"--margin_threshold: {a.margin_threshold} is negative")
    if a.len_penalty < 0:
        raise ValueError(f"--len_penalty: {a.len_penalty} is negative")
    if not a.probability_temperature > 0:
        raise ValueError(f"--probability_temperature: {a.probability_temperature} must be > 0")
    for flag, name in (("--dataset", a.dataset), ("--policy", a.policy)):  # the judge's: PairRMArguments
        if name is not None and name != assets.TINY:
            assets.check_local(name, flag)
    output = Path(a.output_path)
    if (
        (a.output_format or output_format_of(a.output_path)) == "save_to_disk"
        and output.exists()
        and not (output / "dataset_info.json").exists()
    ):
        raise ValueError(f"--output_path: {a.output_path} exists and is not a saved dataset; refusing to replace it")
    if not isinstance(sampling_args, SamplingArguments):
        raise TypeError(f"sampling_args must be a SamplingArguments, got {type(sampling_args).__name__}")


def check_environment(label_args: LabelArguments, pairrm_args: PairRMArguments) -> None:
    """The checks that need this machine or the hub, before any model loads: devices exist, hub ids are cached when
    offline, and `--push_to_hub` can write (a token, the repo created or writable)."""
    a = label_args
    pairrm_args.check_environment()
    check_device(a.policy_device, "--policy_device")
    if a.responses_column is None:
        check_hub_id(a.policy, "--policy")
    if a.push_to_hub:
        check_hub_push(a.push_to_hub, "--push_to_hub", private=a.hub_private)


def run_label(
    label_args: LabelArguments,
    pairrm_args: PairRMArguments | None = None,
    sampling_args: SamplingArguments | None = None,
) -> Dataset:
    """Run the `label` command: validate, load the prompts and check their columns, load the models, label
    (resumable, sharded under accelerate), write the dataset, its card and the margin histogram, print a summary.

    Returns:
        The preference dataset.
    """
    from ..core import generation
    from ..data import check_prompts
    from .io import as_conversational, load_prompts
    from .labeler import PreferenceLabeler, _process_state, check_columns

    pairrm_args = pairrm_args or PairRMArguments()
    sampling_args = sampling_args or SamplingArguments()
    validate(label_args, pairrm_args, sampling_args)
    check_environment(label_args, pairrm_args)
    a = label_args
    state = _process_state()
    with state.main_process_first():
        dataset = load_prompts(a.dataset, a.dataset_config, a.split)
    check_columns(dataset, a.dataset, prompt_column=a.prompt_column, responses_column=a.responses_column)
    if a.max_prompts is not None:
        dataset = dataset.select(range(min(a.max_prompts, len(dataset))))
    check_prompts(dataset[a.prompt_column], a.dataset, a.prompt_column)
    if a.conversational and a.responses_column is None:
        dataset = as_conversational(dataset, a.prompt_column)
    # Everything is checked: now the slow part.
    pairrm = pairrm_args.load(device=pairrm_args.pairrm_device or str(state.device))
    policy, tokenizer = a.policy, None
    if a.responses_column is None and a.backend == "transformers":
        policy, tokenizer = generation.load_policy(a.policy, a.policy_device or state.device, a.policy_dtype)
    labeler = PreferenceLabeler(
        pairrm,
        policy,
        tokenizer,
        num_responses=a.num_responses,
        responses_column=a.responses_column,
        prompt_column=a.prompt_column,
        aggregation=a.aggregation,
        strategy=a.strategy,
        pairs_per_prompt=a.pairs_per_prompt,
        margin_threshold=a.margin_threshold,
        allow_unfinished_chosen=a.allow_unfinished_chosen,
        len_penalty=a.len_penalty,
        conversation_format=a.conversation_format,
        probability_temperature=a.probability_temperature,
        seed=a.seed,
        backend=a.backend,
        sampling=sampling_args,
        generation_batch_size=a.generation_batch_size,
        scoring_batch_size=pairrm_args.pairrm_batch_size,
    )
    labeler.policy_name = a.policy  # the name identifies the run, not the in-memory object
    labeler.dataset_name = a.dataset
    work_dir = Path(a.work_dir or f"{a.output_path}.chunks")
    result = labeler.label(dataset, work_dir, chunk_size=a.chunk_size, overwrite=a.overwrite, show_progress=True)
    if state.is_main_process:
        _write_outputs(result, labeler, a, pairrm_args, sampling_args, work_dir)
    state.wait_for_everyone()
    return result


def _write_outputs(
    result: Dataset,
    labeler: PreferenceLabeler,
    a: LabelArguments,
    pairrm_args: PairRMArguments,
    sampling_args: SamplingArguments,
    work_dir: Path,
) -> None:
    """Main process: the dataset, its card, the histogram, the optional push, the summary (with the paths).

    A push that fails after the dataset is saved is an OSError, `saved to X; push failed: why`, raised after the
    summary is printed."""
    from .io import companion_path, dataset_card, margin_histogram, push_with_card, save_dataset
    from .store import remove_store, writing

    s = labeler.stats
    output_format = save_dataset(result, a.output_path, a.output_format)
    settings = {**dataclasses.asdict(a), **dataclasses.asdict(pairrm_args), **dataclasses.asdict(sampling_args)}
    card = dataset_card(
        policy=a.policy if a.responses_column is None else None,
        judge=pairrm_args.pairrm,
        judge_identity=labeler.pairrm.backend.identity(),
        strategy=a.strategy,
        settings=settings,
        stats=s,
    )
    card_path = companion_path(a.output_path, ".card.md")
    with writing(card_path):
        card_path.write_text(card)
    plot = margin_histogram(
        result["margin"],
        companion_path(a.output_path, ".margins.png"),
        title=f"{s.pairs} pairs from {s.prompts} prompts ({a.strategy})",
    )
    push_error = None
    if a.push_to_hub:
        try:
            push_with_card(result, a.push_to_hub, card, private=a.hub_private)
        except Exception as error:  # the dataset is saved: say so, and why the push failed, in one line
            logger.debug("push to %s failed", a.push_to_hub, exc_info=True)
            push_error = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not a.keep_chunks:
        remove_store(work_dir)
    pushed = (
        f"\nPushed to {a.push_to_hub} ({'private' if a.hub_private else 'public'})"
        if a.push_to_hub and push_error is None
        else ""
    )
    print(
        f"Labeled {s.prompts} prompts -> {s.pairs} pairs ({s.ties_dropped} ties dropped, "
        f"{s.below_margin} below margin {a.margin_threshold}); mean margin {s.mean_margin:.4f}; "
        f"judge truncation rate {s.truncation_rate:.1%}; {s.unfinished} sampled responses unfinished (no EOS)\n"
        f"Wrote {a.output_path} ({output_format})\nCard: {card_path}\n"
        + (f"Margin histogram: {plot}" if plot else "Margin histogram: not written (matplotlib is not installed)")
        + pushed
    )
    if push_error is not None:
        raise OSError(f"saved to {a.output_path}; push to {a.push_to_hub} failed: {push_error}")


def make_parser(prog: str | None = None) -> Any:
    """The `label` parser (TRL script style): a `TrlParser` of (LabelArguments, PairRMArguments, SamplingArguments)."""
    from trl import TrlParser

    parser = TrlParser((LabelArguments, PairRMArguments, SamplingArguments), prog=prog)
    for action in parser._actions:  # HfArgumentParser gives `--no_X` the help of `--X`; say what it does
        if "--no_hub_private" in action.option_strings:
            action.help, action.default = "push the dataset public instead of private", argparse.SUPPRESS
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m pairrm_rlhf.labeling.command [--config X] [--flags]`: the same as `pairrm-rlhf label`."""
    prog = "pairrm-rlhf label"
    run_command(
        prog, lambda: run_label(*parse(make_parser(), argv, prog)), interrupted="rerun the same command to resume"
    )


if __name__ == "__main__":
    main()
    end_distributed_run()  # under `accelerate launch`: the orderly end of a multi-process run
