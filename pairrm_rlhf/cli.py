"""`pairrm-rlhf`: one subcommand per job, in TRL's script style.

    pairrm-rlhf demo | bench | label | serve | eval  [--config file.yaml or a bundled name] [--flags]

Each subcommand's module has `make_parser(subparsers=None)` (a `trl.TrlParser` over its dataclasses, the judge's
being `args.PairRMArguments`) and a run function taking those dataclasses in order; `python -m <module>` runs it
alone. Modules are imported only for the subcommand that runs (`demo` loads no datasets, TRL trainers or web stack).
Flags override `--config` values; `env:` in the YAML sets environment variables (TrlParser).

Errors in the configuration (a missing file, a bad value, an unknown column) are found before any model loads and
end the command with one line, `pairrm-rlhf <cmd>: error: ...`, and exit code 2. Logging: the library only has a
NullHandler; this CLI installs one handler on the root logger and leaves out records that a library's own handler
(datasets, transformers) already prints, so nothing is printed twice.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from .args import PairRMArguments, resolve_config
from .core.distributed import end_distributed_run

logger = logging.getLogger(__name__)

# name -> (module with make_parser, run function, one-line help); imported only when the subcommand runs
COMMANDS = {
    "demo": ("pairrm_rlhf.cli", "run_demo", "compare and rank a few example responses and print tables"),
    "bench": ("pairrm_rlhf.bench", "run_bench", "benchmark the pair-scoring engine against the reference schedule"),
    "label": ("pairrm_rlhf.labeling.command", "run_label", "generate responses and label preference pairs with a judge"),
    "serve": ("pairrm_rlhf.serve.command", "run_serve", "serve a judge over HTTP (also OpenRLHF's remote reward model)"),
    "eval": ("pairrm_rlhf.evaluation.command", "run_eval", "agreement of a judge with preference labels, per subset"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not after a help text that already states its default; a stray `%` is not a crash;
    a `--no_X` flag says what it does instead of repeating `--X`'s help."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction) and action.option_strings[0].startswith("--no_"):
            return f"set {action.dest} to False (the same as --{action.dest} false)"
        help_text = action.help or ""
        return help_text if "default:" in help_text.lower() else super()._get_help_string(action)

    def _expand_help(self, action):
        try:
            return super()._expand_help(action)
        except (TypeError, ValueError, KeyError):
            return self._get_help_string(action)


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
    ("What is the capital of France?", ["Paris is the capital of France.", "I think it is Lyon.", "Paris.", "France has no capital."]),
    ("Write a haiku about autumn.", ["Leaves fall, crisp and red; the cold wind hums an old song; the year breathes out slow.", "Autumn is a season.", "haiku haiku haiku", "Red leaves drift and fall."]),
    ("hello!", ["hi!", "Hello! How can I help you today?", "go away", ""]),
]


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `demo` parser: (DemoArguments, PairRMArguments); the judge defaults to the bundled `tiny` PairRM."""
    from trl import TrlParser

    dataclass_types = (DemoArguments, PairRMArguments)
    parser = (subparsers.add_parser("demo", help=DemoArguments.__doc__.splitlines()[0], dataclass_types=dataclass_types)
              if subparsers is not None else TrlParser(dataclass_types, prog=prog))
    parser.set_defaults(pairrm="tiny")
    return parser


def run_demo(demo_args: DemoArguments, pairrm_args: PairRMArguments) -> None:
    """Print `compare` and `rank` tables for the built-in examples."""
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
        print("\n(The bundled checkpoint has random weights: its preferences are arbitrary. Pass --pairrm "
              "llm-blender/PairRM-hf for the real model.)")


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


def setup_logging(level: int = logging.INFO) -> None:
    """One handler on the root logger (idempotent), skipping records a library's own handler already prints."""
    root = logging.getLogger()
    if any(getattr(h, "_pairrm_rlhf", False) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_not_printed_elsewhere)
    handler._pairrm_rlhf = True
    root.addHandler(handler)
    root.setLevel(level)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _not_printed_elsewhere(record: logging.LogRecord) -> bool:
    """False when a logger between the record's and the root has a real handler (it printed the record already)."""
    current = logging.getLogger(record.name)
    while current is not None and current is not logging.getLogger():
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return False
        if not current.propagate:
            break
        current = current.parent
    return True


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pairrm-rlhf", description="PairRM for RLHF: a judge, its adapters and tools.",
                                     epilog="`pairrm-rlhf <command> --help` lists a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run `pairrm-rlhf <command> [flags]`.

    Args:
        argv: the arguments after the program name (default: `sys.argv[1:]`).

    Returns:
        None; exits with code 2 and one line on stderr on a configuration error. In a process group (`label` under
        `accelerate launch`) it ends the process with `core.distributed.end_distributed_run` instead of returning.

    Example:
        >>> main(["demo", "--pairrm_device", "cpu"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if argv and argv[0] in ("-h", "--help"):
            parser.print_help()
            sys.exit(0)
        parser.print_usage(sys.stderr)
        problem = f"unknown command {argv[0]!r}" if argv else "a command is required"
        print(f"pairrm-rlhf: error: {problem} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    name, rest = argv[0], argv[1:]
    setup_logging(logging.getLevelName(os.environ.get("PAIRRM_RLHF_LOG_LEVEL", "INFO").upper()))
    try:
        parser, run = load_command(name)
        *values, unknown = parser.parse_args_and_config(resolve_config(rest), return_remaining_strings=True)
        if unknown:
            raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see pairrm-rlhf {name} --help)")
        run(*values)
    except (ValueError, FileNotFoundError) as err:
        logger.debug("configuration error", exc_info=True)  # PAIRRM_RLHF_LOG_LEVEL=DEBUG shows the traceback
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"pairrm-rlhf {name}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except ImportError as err:  # an optional extra that is not installed (serve, plots)
        print(f"pairrm-rlhf {name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    end_distributed_run()  # under `accelerate launch` / `torchrun` (label): the orderly end; else nothing


if __name__ == "__main__":
    main()
