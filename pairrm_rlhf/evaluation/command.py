"""`pairrm-rlhf eval`: a judge's agreement with preference labels, per subset, with intervals, files and plots.

    pairrm-rlhf eval --data labels.jsonl --pairrm tiny --output_dir eval_results
    python -m pairrm_rlhf.evaluation.command --config my_eval.yaml

The whole configuration (flags, the judge's device and hub id, `--push_to_hub`'s access, the data's columns and
format) is checked before the judge is loaded; errors are one line and exit code 2 (`core.entry.run_command`). The
judge comes from `PairRMArguments` (`--pairrm`, `--pairrm_dtype`, ...).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..args import PairRMArguments
from ..core.entry import check_hub_push, parse, run_command
from .agreement import (
    FORMATS,
    SubsetResult,
    correctness,
    example_logits,
    format_table,
    load_examples,
    subset_agreement,
    summarize,
)
from .report import dataset_card, prediction_records, push_results, write_plots, write_results
from .sections import SECTION_SCHEMES, autoj_groups, detect_scheme, format_sections, rewardbench_sections

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """Agreement of a judge with human preference labels, per subset, with bootstrap intervals.

    Args: one per field (each field's `help` says what it holds); every field is checked when the object is built.

    Example:
        >>> EvalArguments(data="labels.jsonl", ties="margin", tie_margin=0.5, bootstrap=0)  # doctest: +SKIP
    """

    data: str = field(
        metadata={
            "help": "preference data: a save_to_disk folder (what `label` writes), a "
            ".jsonl/.json/.parquet file, or a hub dataset id"
        }
    )
    format: str = field(default="auto", metadata={"help": f"one of {', '.join(FORMATS)} (auto: from the columns)"})
    prompt_column: str | None = field(default=None, metadata={"help": "the data's prompt column (None: prompt)"})
    chosen_column: str | None = field(default=None, metadata={"help": "the data's chosen column (None: chosen)"})
    rejected_column: str | None = field(default=None, metadata={"help": "the data's rejected column (None: rejected)"})
    split: str = field(default="test", metadata={"help": "hub datasets and DatasetDict folders: the split"})
    config_name: str | None = field(
        default=None, metadata={"help": "hub datasets: configuration (also the subset name)"}
    )
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N rows"})
    ties: str = field(
        default="skip", metadata={"help": "skip: leave tie labels out; margin: a tie is right when |z| <= tie_margin"}
    )
    tie_margin: float = field(default=0.0, metadata={"help": "two-order logit below which the judge calls a tie"})
    orders: str = field(default="both", metadata={"help": "both (two-order logit) or single (chosen in slot A)"})
    bootstrap: int = field(
        default=1000, metadata={"help": "bootstrap resamples for the 95 percent intervals (0: no intervals)"}
    )
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})
    sections: str = field(
        default="auto",
        metadata={
            "help": "section scores: rewardbench (v1 weighting), autoj "
            "(scenario groups), none, or auto (from the subset names)"
        },
    )
    output_dir: str = field(
        default="eval_results", metadata={"help": "folder for predictions.jsonl, results.md/json and the plots"}
    )
    plots: bool = field(default=True, metadata={"help": "write calibration.png and subsets.png (needs matplotlib)"})
    push_to_hub: str | None = field(
        default=None, metadata={"help": "also upload the results folder to this Hub dataset repo"}
    )
    hub_private: bool = field(default=True, metadata={"help": "create the Hub repo private (--no_hub_private: public)"})

    def __post_init__(self):
        for name, allowed in (
            ("format", FORMATS),
            ("ties", ("skip", "margin")),
            ("orders", ("both", "single")),
            ("sections", SECTION_SCHEMES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.bootstrap < 0:
            raise ValueError(f"--bootstrap: must be >= 0 (0: no intervals), got {self.bootstrap}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit: must be >= 1, got {self.limit}")
        if self.tie_margin < 0:
            raise ValueError(f"--tie_margin: must be >= 0, got {self.tie_margin}")
        if Path(self.output_dir).exists() and not Path(self.output_dir).is_dir():
            raise ValueError(f"--output_dir: {self.output_dir} exists and is not a folder")

    def columns(self) -> dict[str, str]:
        """Standard name -> the data's column, for the columns given."""
        return {
            k: v
            for k, v in (
                ("prompt", self.prompt_column),
                ("chosen", self.chosen_column),
                ("rejected", self.rejected_column),
            )
            if v
        }


def make_parser(prog: str | None = None) -> Any:
    """The `eval` parser in TRL's script style: a `TrlParser` of (EvalArguments, PairRMArguments)."""
    from trl import TrlParser

    return TrlParser((EvalArguments, PairRMArguments), prog=prog)


def run_eval(eval_args: EvalArguments, pairrm_args: PairRMArguments) -> list[SubsetResult]:
    """Read and check the data, load the judge, score, print the tables and write the results folder.

    Args:
        eval_args: the data, counting rules and outputs.
        pairrm_args: the judge.

    Returns:
        The per-subset results (then "macro average" and "overall").

    Example:
        >>> eval_args = EvalArguments(data="labels.jsonl", output_dir="out")
        >>> run_eval(eval_args, PairRMArguments(pairrm="tiny"))  # doctest: +SKIP
    """
    examples = load_examples(
        eval_args.data,
        eval_args.format,
        eval_args.split,
        eval_args.config_name,
        eval_args.limit,
        columns=eval_args.columns(),
    )
    if not examples:
        raise ValueError(f"--data: {eval_args.data} has no examples")
    scheme = detect_scheme([ex.subset for ex in examples]) if eval_args.sections == "auto" else eval_args.sections
    if scheme == "autoj":
        autoj_groups([None] * len(examples), examples, bootstrap=0)  # unknown scenarios fail here, before loading

    if eval_args.push_to_hub:
        check_hub_push(eval_args.push_to_hub, "--push_to_hub", private=eval_args.hub_private)
    pairrm_args.check_environment()  # the device and, offline, that a hub id is cached
    model = pairrm_args.load()
    logits = example_logits(model, examples, batch_size=pairrm_args.pairrm_batch_size, orders=eval_args.orders)
    correct = correctness(logits, examples, eval_args.ties, eval_args.tie_margin)
    results = summarize(correct, examples, eval_args.bootstrap, eval_args.seed)

    title = f"{pairrm_args.pairrm} ({model.template}) on {eval_args.data}"
    tables = [format_table(results, title)]
    summary = {
        "model": pairrm_args.pairrm,
        "template": model.template,
        "data": eval_args.data,
        "format": eval_args.format,
        "orders": eval_args.orders,
        "ties": eval_args.ties,
        "tie_margin": eval_args.tie_margin,
        "bootstrap": eval_args.bootstrap,
        "sections": scheme,
    }
    plotted = results
    if scheme == "rewardbench":
        sections = rewardbench_sections(subset_agreement(results, examples))
        tables.append(format_sections(sections))
        summary["rewardbench_sections"] = sections
    elif scheme == "autoj":
        plotted = autoj_groups(correct, examples, eval_args.bootstrap, eval_args.seed)
        tables.append(format_table(plotted, "Auto-J scenario groups"))
        summary["autoj_groups"] = [r.__dict__ for r in plotted]
    tables_md = "\n\n".join(tables)
    print(tables_md)

    records = prediction_records(examples, logits, correct, eval_args.orders, eval_args.ties, eval_args.tie_margin)
    paths = write_results(eval_args.output_dir, records, results, tables_md, summary)
    if eval_args.plots:
        paths.update(
            write_plots(eval_args.output_dir, records, plotted, f"{pairrm_args.pairrm} on {Path(eval_args.data).name}")
        )
    (Path(eval_args.output_dir) / "README.md").write_text(dataset_card(summary, tables_md))
    print("\nWrote " + ", ".join(str(p) for p in paths.values()))
    if eval_args.push_to_hub:
        url = push_results(eval_args.output_dir, eval_args.push_to_hub, private=eval_args.hub_private)
        print(f"Pushed to {url} ({'private' if eval_args.hub_private else 'public'})")
    return results


def main(argv: list[str] | None = None) -> None:
    """`python -m pairrm_rlhf.evaluation.command [--flags]`: the same as `pairrm-rlhf eval`."""
    prog = "pairrm-rlhf eval"
    run_command(prog, lambda: run_eval(*parse(make_parser(), argv, prog)))


if __name__ == "__main__":
    main()
