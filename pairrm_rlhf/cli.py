"""`pairrm-rlhf`: one subcommand per job, in TRL's script style.

    pairrm-rlhf demo | bench | label | serve | eval  [--config file.yaml or a bundled name] [--flags]

Each subcommand's module has `make_parser()` (a `trl.TrlParser` over its dataclasses, the judge's being
`args.PairRMArguments`), a run function taking those dataclasses in order and a `main(argv)`, so
`python -m <module>` runs it alone with the same behaviour. Like TRL's `trl/cli` commands, a subcommand's module is
imported only when that subcommand runs: `pairrm-rlhf --help` imports no torch, and `demo` loads no datasets, TRL
trainers or web stack. Flags override `--config` values; `env:` in the YAML sets environment variables (TrlParser).

Starting and ending follow `core.entry` (shared with the recipes): one log handler, and a user error (a bad value, a
missing file, an unreachable hub id, a busy port) is found before any model loads and ends the command with one
line, `pairrm-rlhf <cmd>: error: ...`, and exit code 2; Ctrl-C ends with exit code 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .args import PairRMArguments
from .core.distributed import end_distributed_run
from .core.entry import HelpFormatter, parse, run_command, setup_logging  # noqa: F401 (setup_logging: API)

logger = logging.getLogger(__name__)

# name -> (module with make_parser, run function, one-line help); imported only when the subcommand runs
COMMANDS = {
    "demo": ("pairrm_rlhf.cli", "run_demo", "compare and rank a few example responses and print tables"),
    "bench": ("pairrm_rlhf.bench", "run_bench", "benchmark the pair-scoring engine against the reference schedule"),
    "label": (
        "pairrm_rlhf.labeling.command",
        "run_label",
        "generate responses and label preference pairs with a judge",
    ),
    "serve": (
        "pairrm_rlhf.serve.command",
        "run_serve",
        "serve a judge over HTTP (also OpenRLHF's remote reward model)",
    ),
    "eval": ("pairrm_rlhf.evaluation.command", "run_eval", "agreement of a judge with preference labels, per subset"),
}
# what to tell the user after Ctrl-C, by subcommand
INTERRUPTED = {"label": "rerun the same command to resume"}


# ---- demo ----------------------------------------------------------------------------------------------------
@dataclass
class DemoArguments:
    """Compare and rank a few example responses with a judge and print tables.

    Example:
        >>> run_demo(DemoArguments(examples=1), PairRMArguments(pairrm="tiny", pairrm_device="cpu"))  # doctest: +SKIP
    """

    examples: int = field(default=3, metadata={"help": "how many of the built-in examples to show (1-3)"})

    def __post_init__(self):
        if not 1 <= self.examples <= len(EXAMPLES):
            raise ValueError(f"--examples: must be 1..{len(EXAMPLES)}, got {self.examples}")


EXAMPLES = [
    (
        "What is the capital of France?",
        ["Paris is the capital of France.", "I think it is Lyon.", "Paris.", "France has no capital."],
    ),
    (
        "Write a haiku about autumn.",
        [
            "Leaves fall, crisp and red; the cold wind hums an old song; the year breathes out slow.",
            "Autumn is a season.",
            "haiku haiku haiku",
            "Red leaves drift and fall.",
        ],
    ),
    ("hello!", ["hi!", "Hello! How can I help you today?", "go away", ""]),
]


def make_parser(prog: str | None = None):
    """The `demo` parser: (DemoArguments, PairRMArguments); the judge defaults to the bundled `tiny` PairRM."""
    from trl import TrlParser

    parser = TrlParser((DemoArguments, PairRMArguments), prog=prog)
    parser.set_defaults(pairrm="tiny")
    return parser


def run_demo(demo_args: DemoArguments, pairrm_args: PairRMArguments) -> None:
    """Print `compare` and `rank` tables for the built-in examples."""
    pairrm_args.check_environment()  # the device and, offline, that a hub id is cached
    model = pairrm_args.load()
    print(f"PairRM ({model.kind} layout) from {pairrm_args.pairrm} on {model.device}, {model.backend.dtype}\n")
    examples = EXAMPLES[: demo_args.examples]
    inputs = [prompt for prompt, _ in examples]
    candidates = [cands for _, cands in examples]
    first = [c[0] for c in candidates]
    second = [c[1] for c in candidates]
    logits = model.compare(inputs, first, second, return_logits=True)
    probs = model.probability(inputs, first, second)
    print("compare(A, B): two-order logit f(x,A,B) - f(x,B,A) and P(A > B)")
    print(f"{'prompt':32} {'A':28} {'B':28} {'logit':>8} {'P(A>B)':>7}")
    for x, a, b, z, p in zip(inputs, first, second, logits, probs):
        print(f"{_cut(x, 32)} {_cut(a, 28)} {_cut(b, 28)} {z:8.3f} {p:7.3f}")
    scores = model.rank(inputs, candidates, return_scores=True)
    ranks = model.rank(inputs, candidates)
    print("\nrank: round-robin score of every candidate (rank 1 = best)")
    for x, cands, row_scores, row_ranks in zip(inputs, candidates, scores, ranks):
        print(f"\n  {_cut(x, 70)}")
        for cand, s, r in sorted(zip(cands, row_scores, row_ranks), key=lambda t: t[2]):
            print(f"    #{r}  {s:8.3f}  {_cut(cand or '(empty)', 60)}")
    if pairrm_args.pairrm == "tiny":
        print(
            "\n(The bundled checkpoint has random weights: its preferences are arbitrary. Pass --pairrm "
            "llm-blender/PairRM-hf for the real model.)"
        )


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return (text[: width - 1] + "…" if len(text) > width else text).ljust(width)


# ---- dispatch ------------------------------------------------------------------------------------------------
def load_command(name: str) -> tuple[argparse.ArgumentParser, Callable]:
    """The parser (named `pairrm-rlhf <name>` in its usage line) and run function of a subcommand."""
    module_name, run_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser, run = module.make_parser(), getattr(module, run_name)
    parser.prog = f"pairrm-rlhf {name}"
    parser.formatter_class = HelpFormatter
    return parser, run


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pairrm-rlhf",
        description="PairRM for RLHF: a judge, its adapters and tools.",
        epilog="`pairrm-rlhf <command> --help` lists a command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run `pairrm-rlhf <command> [flags]`.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        None; on a user error exits with code 2 and one line on stderr (`core.entry.run_command`), on Ctrl-C with
        130. In a process group (`label` under `accelerate launch`) it ends the process with
        `core.distributed.end_distributed_run` instead of returning.

    Example:
        >>> main(["demo", "--pairrm_device", "cpu"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            sys.exit(0)
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(
            f"pairrm-rlhf: error: {problem} (choose from {', '.join(COMMANDS)}; see pairrm-rlhf --help)",
            file=sys.stderr,
        )
        sys.exit(2)
    name, rest = argv[0], argv[1:]

    def command() -> None:
        parser, run = load_command(name)
        run(*parse(parser, rest, f"pairrm-rlhf {name}"))

    run_command(f"pairrm-rlhf {name}", command, interrupted=INTERRUPTED.get(name))
    end_distributed_run()  # under `accelerate launch` / `torchrun` (label): the orderly end; else nothing


if __name__ == "__main__":
    main()
