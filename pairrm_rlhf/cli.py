"""`pairrm-rlhf` command line: one subcommand per job, each configured by a dataclass.

Every subcommand takes its dataclass fields as `--flags` and `--config file.yaml` (flags override YAML),
the way TRL's scripts do.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser


def parse_config(config_class: type, argv: list[str]):
    """Parse a dataclass from `--config file.yaml` (optional) and flags; flags win."""
    parser = HfArgumentParser(config_class)
    parser.add_argument("--config", default=None, help="YAML file with any of the fields below")
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.config:
        import yaml

        with open(args.config) as f:
            values = yaml.safe_load(f) or {}
        unknown = set(values) - {f.name for f in config_class.__dataclass_fields__.values()}
        if unknown:
            parser.error(f"{args.config}: unknown fields {sorted(unknown)}")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k != "config"}
    return config_class(**fields)


@dataclass
class DemoConfig:
    """Compare and rank a few example responses with a PairRM checkpoint and print tables."""

    model: str = field(default="tiny", metadata={"help": "PairRM checkpoint (hub id or directory; tiny: the bundled one)"})
    base_model: str | None = field(default=None, metadata={"help": "blender layout: base encoder override"})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1 ... (default: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "float32, bfloat16 or float16 (default by device)"})


EXAMPLES = [
    ("What is the capital of France?", ["Paris is the capital of France.", "I think it is Lyon.", "Paris.", "France has no capital."]),
    ("Write a haiku about autumn.", ["Leaves fall, crisp and red; the cold wind hums an old song; the year breathes out slow.", "Autumn is a season.", "haiku haiku haiku", "Red leaves drift and fall."]),
    ("hello!", ["hi!", "Hello! How can I help you today?", "go away", ""]),
]


def run_demo(config: DemoConfig) -> None:
    from .pairrm import PairRM

    model = PairRM.from_pretrained(config.model, base_model=config.base_model, device=config.device, dtype=config.dtype)
    print(f"PairRM ({model.kind} layout) from {config.model} on {model.device}, {model.backend.dtype}\n")
    inputs = [prompt for prompt, _ in EXAMPLES]
    candidates = [cands for _, cands in EXAMPLES]
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
    print("\n(The bundled checkpoint has random weights: its preferences are arbitrary. Pass --model "
          "llm-blender/PairRM-hf for the real model.)")


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return (text[: width - 1] + "…" if len(text) > width else text).ljust(width)


COMMANDS = {
    "demo": (DemoConfig, run_demo),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        names = ", ".join(commands)
        print(f"usage: pairrm-rlhf {{{names}}} [--config file.yaml] [--flags]\n")
        for name, (config_class, _) in commands.items():
            print(f"  {name:8} {(config_class.__doc__ or '').strip().splitlines()[0]}")
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    if argv[0] == "label":  # TrlParser-based (labeling.command); the other subcommands follow when cli.py moves to it
        from .labeling.command import main as label_main

        return label_main(argv[1:])
    config_class, run = commands[argv[0]]
    run(parse_config(config_class, argv[1:]))


def _commands() -> dict:
    """Subcommands, imported lazily so `pairrm-rlhf demo` does not pay for TRL or datasets."""
    from .bench import BenchConfig, run_bench
    from .evaluation import EvalConfig, run_eval
    from .labeling.command import LabelArguments
    from .serve.server import ServeConfig, run_serve

    return {
        **COMMANDS,
        "bench": (BenchConfig, run_bench),
        "label": (LabelArguments, None),
        "serve": (ServeConfig, run_serve),
        "eval": (EvalConfig, run_eval),
    }


if __name__ == "__main__":
    main()
