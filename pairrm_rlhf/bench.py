"""`pairrm-rlhf bench`: the engine against the reference's schedule at its best batch size, in one process.

The reference is llm-blender's `Blender.rank` (yuchenlin/LLM-Blender `llm_blender/blender/blender.py`, default
`batch_size=8`; `compare` defaults to 4): a DataLoader of fixed groups of prompts in input order;
`CrossCompareCollator` (`llm_blender/pair_ranker/collator.py`) pads every source of a group to the group's longest
source and every candidate to the longest candidate of the whole group; `CrossCompareReranker._full_predict`
(`llm_blender/pair_ranker/ranker.py`) runs one forward per ordered pair (i, j), i != j, over the group, with the
padding moved to the end (`cat_ids`), through transformers' DeBERTa keeping every hidden state; fp32 on CPU,
`.half()` on CUDA. The baseline here does exactly that with our tokens and the same random weights, so both sides
must agree (1e-4 in fp32). Speed is reported in CPU-seconds (robust to other jobs on the machine) and wall time,
as ratios measured in the same run.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import DebertaV2Config

from .core.aggregation import round_robin_scores
from .core.assets import bundled
from .core.engine import PairScorer, cpu_supports_bf16
from .core.modeling import PairRMModel, select
from .core.settings import resolve_dtype
from .core.tokenization import PairLayout, load_text_tokenizer
from .pairrm import PairRM

logger = logging.getLogger(__name__)

SHAPES = {  # layers, hidden, heads
    "tiny": (2, 64, 2),
    "xsmall": (12, 384, 6),
    "base": (12, 768, 12),
    "real": (24, 1024, 16),  # PairRM: DeBERTa-v3-large
}
SHAPE_HELP = "tiny, xsmall, base, real (PairRM: 24 layers, hidden 1024, 16 heads) or real:N (the real width, N layers)"

# workload -> (prompts, candidates per prompt, prompt tokens (low, high), candidate tokens (low, high)), log-uniform
WORKLOADS = {
    "short": (1, 16, (10, 40), (5, 60)),
    "typical": (4, 4, (50, 400), (50, 400)),
    "long": (1, 3, (900, 1100), (450, 600)),  # ~2k-token pairs
}
REFERENCE_BATCH_SIZE = 8  # Blender.rank's default


@dataclass
class BenchArguments:
    """Benchmark the pair-scoring engine against the reference's schedule (CPU-seconds, speed-up, % of matmul peak).

    Args: one per field (each field's `help` says what it holds); every field is checked when the object is built.

    Example:
        >>> BenchArguments(shape="real:4", workloads="typical", device="cpu").layers_hidden_heads()
        (4, 1024, 16)
    """

    shape: str = field(default="real", metadata={"help": SHAPE_HELP})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (None: cuda if available)"})
    dtypes: str | None = field(
        default=None,
        metadata={
            "help": "engine dtypes, comma list of float32, bfloat16, float16 (None: float32 and bfloat16 where the "
            "CPU has bf16 instructions; bfloat16 and float16 on CUDA)"
        },
    )
    workloads: str = field(default="short,typical,long", metadata={"help": "comma list of " + ", ".join(WORKLOADS)})
    prompts: int | None = field(default=None, metadata={"help": "prompts per workload (None: the workload's own)"})
    baseline_batch_sizes: str = field(
        default="1,2,4,8",
        metadata={
            "help": "reference batch sizes (prompts per group) to try; the best and the reference's default (8) "
            "are reported"
        },
    )
    seed: int = field(default=0, metadata={"help": "workload and weight seed"})

    def __post_init__(self):
        self.layers_hidden_heads()
        unknown = [w for w in self.workload_list() if w not in WORKLOADS]
        if unknown or not self.workload_list():
            raise ValueError(f"--workloads: must be a comma list of {', '.join(WORKLOADS)}, got {self.workloads!r}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device: must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device: {self.device} asked for but no CUDA device is available")
        for name in (self.dtypes or "").split(","):
            if name.strip():
                resolve_dtype(name.strip(), torch.device("cpu"), "--dtypes")  # ValueError naming the accepted names
        sizes = self.baseline_batch_sizes.split(",")
        if not all(s.strip().isdigit() and int(s) >= 1 for s in sizes):
            raise ValueError(
                f"--baseline_batch_sizes: must be a comma list of integers >= 1, got {self.baseline_batch_sizes!r}"
            )
        if self.prompts is not None and self.prompts < 1:
            raise ValueError(f"--prompts: must be >= 1, got {self.prompts}")

    def layers_hidden_heads(self) -> tuple[int, int, int]:
        name, _, layers = self.shape.partition(":")
        if name not in SHAPES or (layers and not (name == "real" and layers.isdigit() and int(layers) >= 1)):
            raise ValueError(f"--shape: must be one of {SHAPE_HELP}, got {self.shape!r}")
        default_layers, hidden, heads = SHAPES[name]
        return (int(layers) if layers else default_layers), hidden, heads

    def workload_list(self) -> list[str]:
        return [w.strip() for w in self.workloads.split(",") if w.strip()]

    def batch_sizes(self) -> list[int]:
        return sorted({int(s) for s in self.baseline_batch_sizes.split(",")})

    def dtype_list(self, device: torch.device) -> list[torch.dtype]:
        if self.dtypes:
            return [resolve_dtype(n.strip(), device) for n in self.dtypes.split(",") if n.strip()]
        if device.type == "cuda":
            return [torch.bfloat16, torch.float16]
        return [torch.float32, torch.bfloat16] if cpu_supports_bf16() else [torch.float32]


def make_parser(prog: str | None = None):
    """The `bench` parser in TRL's script style: (BenchArguments,)."""
    from trl import TrlParser

    return TrlParser((BenchArguments,), prog=prog)


# ---- workload and model ------------------------------------------------------------------------------
def make_workload(tokenizer, workload: str, seed: int, prompts: int | None = None) -> tuple[list[str], list[list[str]]]:
    """Deterministic prompts and candidates of the workload's token lengths (log-uniform in its ranges).

    Words are single vocabulary pieces, so a text of n words is close to n tokens.
    """
    n_prompts, n_candidates, prompt_range, candidate_range = WORKLOADS[workload]
    words = sorted(
        piece[1:] for piece in tokenizer.get_vocab() if piece.startswith("▁") and piece[1:].isalpha() and len(piece) > 2
    )
    rng = random.Random(f"{workload}:{seed}")

    def text(low: int, high: int) -> str:
        n = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        return " ".join(rng.choice(words) for _ in range(n))

    sources = [text(*prompt_range) for _ in range(prompts or n_prompts)]
    return sources, [[text(*candidate_range) for _ in range(n_candidates)] for _ in sources]


def encoder_config(
    layers: int, hidden: int, heads: int, vocab_size: int, initializer_range: float = 0.02
) -> DebertaV2Config:
    """DeBERTa-v3's settings at the given size: relative attention (c2p, p2c), 256 log buckets, 512 positions."""
    return DebertaV2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        hidden_act="gelu",
        max_position_embeddings=512,
        type_vocab_size=0,
        relative_attention=True,
        max_relative_positions=-1,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        layer_norm_eps=1e-7,
        pad_token_id=0,
        initializer_range=initializer_range,
    )


def build_random_pairrm(
    layers_hidden_heads: tuple[int, int, int], device: torch.device, dtype: torch.dtype, seed: int
) -> PairRM:
    """A PairRM of the given size with random weights (std 0.02) and the bundled tokenizer."""
    tokenizer = load_text_tokenizer(bundled("pairrm"))
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    model = PairRMModel(encoder_config(*layers_hidden_heads, vocab_size=base_vocab + 4)).eval().to(device)
    layout = PairLayout(
        cls_id=tokenizer.token_to_id("[CLS]"),
        sep_id=tokenizer.token_to_id("[SEP]"),
        pad_id=0,
        source_prefix_id=base_vocab,
        cand1_prefix_id=base_vocab + 1,
        cand2_prefix_id=base_vocab + 2,
    )
    return PairRM(PairScorer(model, tokenizer, layout, device=device, dtype=dtype))


# ---- the reference schedule ----------------------------------------------------------------------
class Baseline:
    """llm-blender's `rank` schedule (module docstring): per group of `batch_size` prompts, one forward per ordered
    pair (i, j), every row padded to the group's longest source + 2 x its longest candidate."""

    def __init__(self, pairrm: PairRM, batch_size: int):
        scorer = pairrm.backend
        self.backend = scorer
        self.batch_size = batch_size
        self.model = copy.deepcopy(scorer.model).half() if scorer.device.type == "cuda" else scorer.model

    def groups(self, prompts: list[str], candidates: list[list[str]]) -> list[range]:
        return [range(s, min(s + self.batch_size, len(prompts))) for s in range(0, len(prompts), self.batch_size)]

    def padded_length(self, prompts: list[str], candidates: list[list[str]], group: range) -> int:
        """The group's longest source segment + 2 x its longest candidate segment (the collator's padding)."""
        pairs = self.backend.build([(prompts[k], c, c) for k in group for c in candidates[k]])
        return max(p[1] - 1 for _, p in pairs) + 2 * max(p[2] - p[1] for _, p in pairs)

    def forward(self, triples: list[tuple[str, str, str]], length: int) -> np.ndarray:
        pairs = self.backend.build(triples)
        input_ids = torch.full((len(pairs), length), self.backend.layout.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(pairs):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        positions = torch.tensor([pos for _, pos in pairs])
        device = self.backend.device
        with torch.no_grad():  # the stock transformers encoder keeping every layer, as the reference runs it
            states = self.model.pretrained_model(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
            ).hidden_states
            out = self.model.head(select(states[-1], positions.to(device)))
        return out.float().cpu().numpy()

    def rank_scores(self, prompts: list[str], candidates: list[list[str]]) -> np.ndarray:
        n = len(candidates[0])
        scores = []
        for group in self.groups(prompts, candidates):
            length = self.padded_length(prompts, candidates, group)
            matrix = np.zeros((len(group), n, n), dtype=np.float32)
            for i in range(n):
                for j in range(n):
                    if i != j:
                        matrix[:, i, j] = self.forward(
                            [(prompts[k], candidates[k][i], candidates[k][j]) for k in group], length
                        )
            scores.extend(round_robin_scores(m) for m in matrix)
        return np.stack(scores)

    def padded_lengths(self, prompts: list[str], candidates: list[list[str]]) -> list[int]:
        """The padded length of every row the schedule runs (for its FLOP count)."""
        n = len(candidates[0])
        return [
            self.padded_length(prompts, candidates, g)
            for g in self.groups(prompts, candidates)
            for _ in range(n * (n - 1) * len(g))
        ]


# ---- measurement -----------------------------------------------------------------------------------
def pair_flops(length: int, config: DebertaV2Config) -> float:
    """Forward FLOPs of one sequence of `length` tokens (multiply-adds x 2), per layer summed over the layers:

    linear layers 2L(4h^2 + 2h*I) (Q, K, V, output; FFN in and out) + attention 4L^2 h (QK^T and AV) + the
    c2p/p2c position terms 2 x 2 L R h, with R = min(2L - 1, 2 * position_buckets) relative rows (the fewer of
    the distinct distances and the buckets); the position tables' own projections (2 x 2R h^2) are ignored.
    """
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    rows = min(2 * length - 1, 2 * config.position_buckets)
    per_layer = 2 * length * (4 * h * h + 2 * h * inter) + 4 * length * length * h + 4 * length * rows * h
    return float(layers * per_layer)


@dataclass
class Clock:
    """CPU-seconds of this process (all threads) and wall seconds of one measured call."""

    cpu: float = 0.0
    wall: float = 0.0


def timed(fn, device: torch.device):
    _sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    _sync(device)
    return out, Clock(time.process_time() - cpu, time.perf_counter() - wall)


def measure_peak(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """Best dense-matmul GFLOP per CPU-second and per wall second in `dtype`, measured now (the % of peak
    denominators)."""
    n, repeats = (8192, 10) if device.type == "cuda" else (2048, 3)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best_cpu = best_wall = float("inf")
    for _ in range(5):  # best of 5: on a shared machine one short burst can read 25% low
        _, clock = timed(lambda: [a @ b for _ in range(repeats)], device)
        best_cpu, best_wall = min(best_cpu, clock.cpu / repeats), min(best_wall, clock.wall / repeats)
    flops = 2 * n**3
    return flops / max(best_cpu, 1e-9) / 1e9, flops / best_wall / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def run_bench(config: BenchArguments) -> dict:
    """Run the benchmark, printing a line as each configuration starts and ends, then the table.

    Args:
        config: shape, device, engine dtypes, workloads and the reference batch sizes to try.

    Returns:
        {"peak": {dtype: GFLOP per CPU-s}, "rows": one dict per workload and configuration}.

    Example:
        >>> args = BenchArguments(shape="tiny", workloads="short", baseline_batch_sizes="1")
        >>> run_bench(args)["rows"][0]["impl"]  # doctest: +SKIP
        'reference bs=1'
    """
    with torch.no_grad():
        return _run_bench(config)


def _run_bench(config: BenchArguments) -> dict:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = config.dtype_list(device)
    base_dtype = torch.float16 if device.type == "cuda" else torch.float32
    pairrm = build_random_pairrm(config.layers_hidden_heads(), device, base_dtype, config.seed)
    scorer, model_config = pairrm.backend, pairrm.backend.model.config
    peaks = {dtype: measure_peak(device, dtype) for dtype in {base_dtype, *dtypes}}
    threads = torch.get_num_threads()
    layers, hidden, heads = config.layers_hidden_heads()
    print(
        f"pairrm-rlhf bench: shape {config.shape} ({layers} layers, hidden {hidden}, {heads} heads), device {device} "
        f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {threads} threads'}), "
        f"reference {_name(base_dtype)}, engine {', '.join(_name(d) for d in dtypes)}",
        flush=True,
    )
    for dtype, (per_cpu, per_wall) in peaks.items():
        print(
            f"measured matmul peak, {_name(dtype)}: {per_cpu:.0f} GFLOP per CPU-second, {per_wall:.0f} GFLOP/s wall",
            flush=True,
        )

    # the plan: every configuration and its FLOPs, for the length estimate
    plan = []
    for workload in config.workload_list():
        prompts, candidates = make_workload(scorer.tokenizer, workload, config.seed, config.prompts)
        triples = [(p, a, b) for k, p in enumerate(prompts) for a in candidates[k] for b in candidates[k] if a is not b]
        lengths = [len(ids) for ids, _ in scorer.build(triples)]
        useful = sum(pair_flops(n, model_config) for n in lengths)
        # batch sizes >= the number of prompts all run one group: the same schedule, run once under all their names
        sizes = {}
        for size in config.batch_sizes():
            sizes.setdefault(min(size, len(prompts)), []).append(size)
        for size, names in sizes.items():
            padded = sum(
                pair_flops(n, model_config) for n in Baseline(pairrm, size).padded_lengths(prompts, candidates)
            )
            impl = f"reference bs={'='.join(map(str, names))}"
            plan.append((workload, prompts, candidates, lengths, useful, impl, True, size, base_dtype, padded))
        for dtype in dtypes:  # the engine as issue 24 found it (`PairRMModel._levers` off), then as it is
            for levers, impl in ((False, f"engine {_name(dtype)} levers off"), (True, f"engine {_name(dtype)}")):
                plan.append((workload, prompts, candidates, lengths, useful, impl, levers, None, dtype, useful))
    # the estimate assumes half of the measured peak (the engine) and a third (the reference's padded, stock path)
    estimate = sum(f / (peaks[d][0] * 1e9) * (3 if size else 2) for *_, size, d, f in plan)
    print(
        f"{len(plan)} configurations, {sum(f for *_, f in plan) / 1e12:.1f} TFLOP in all: "
        f"estimated {estimate:.0f} CPU-s "
        f"(~{estimate / threads / 60:.1f} min on {threads} idle cores)\n",
        flush=True,
    )

    rows, outputs = [], {}
    for number, (workload, prompts, candidates, lengths, useful, impl, levers, size, dtype, flops) in enumerate(
        plan, 1
    ):
        tag = f"[{number}/{len(plan)}] {workload:8} {impl:26}"
        print(f"{tag} started: {len(lengths)} pairs, {sum(lengths)} tokens, {flops / 1e12:.2f} TFLOP", flush=True)
        if size:
            baseline = Baseline(pairrm, size)
            baseline.rank_scores(prompts[:1], [c[:2] for c in candidates[:1]])  # warm-up
            out, clock = timed(lambda b=baseline, p=prompts, c=candidates: b.rank_scores(p, c), device)
        else:
            scorer.dtype, scorer.model._levers = dtype, levers
            try:
                pairrm.rank(prompts[:1], [c[:2] for c in candidates[:1]], show_progress_bar=False)  # warm-up
                out, clock = timed(
                    lambda p=prompts, c=candidates: pairrm.rank(p, c, return_scores=True, show_progress_bar=False),
                    device,
                )
            finally:
                scorer.model._levers = True
        reference = outputs.setdefault(workload, out)
        row = {
            "workload": workload,
            "impl": impl,
            "dtype": _name(dtype),
            "batch_size": size,
            "levers": levers,
            "prompts": len(prompts),
            "pairs": len(lengths),
            "tokens": sum(lengths),
            "flops": useful,
            "executed_flops": flops,
            "cpu_s": clock.cpu,
            "wall_s": clock.wall,
            "tokens_per_s": sum(lengths) / clock.wall,
            "peak_fraction": useful / max(clock.cpu, 1e-9) / 1e9 / peaks[dtype][0]
            if device.type == "cpu"
            else useful / clock.wall / 1e9 / peaks[dtype][1],
            "max_abs_diff": float(np.abs(out - reference).max()),
        }
        rows.append(row)
        print(
            f"{tag} done: {clock.cpu:8.1f} CPU-s {clock.wall:8.1f} s wall, {row['peak_fraction']:6.1%} of peak, "
            f"max|diff| {row['max_abs_diff']:.1e}",
            flush=True,
        )
    _print_table(rows, device)
    return {"peak": {_name(d): p for d, p in peaks.items()}, "rows": rows}


def _print_table(rows: list[dict], device: torch.device) -> None:
    """Per workload: each configuration's cost, and its speed-up over the best and the default reference batch size."""
    key = "cpu_s" if device.type == "cpu" else "wall_s"
    header = (
        f"\n{'workload':9} {'configuration':28} {'pairs':>5} {'CPU-s':>8} {'wall s':>8} {'tokens/s':>9} "
        f"{'% peak':>7} {'vs best ref':>11} {'vs ref bs=8':>11} {'vs levers off':>13} {'max|diff|':>9}"
    )
    print(header)
    print("-" * len(header))
    for workload in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == workload]
        references = [r for r in group if r["batch_size"]]
        best = min(references, key=lambda r: r[key]) if references else None
        default = next((r for r in references if r["batch_size"] == min(REFERENCE_BATCH_SIZE, r["prompts"])), None)
        for r in group:
            r["speedup_vs_best"] = best[key] / r[key] if best else None
            r["speedup_vs_default"] = default[key] / r[key] if default else None
            off = next((o for o in group if not o["levers"] and o["dtype"] == r["dtype"]), None)
            r["speedup_vs_levers_off"] = off[key] / r[key] if off and not r["batch_size"] else None
            mark = " (best)" if r is best else ""

            def vs(x: float | None, width: int = 11) -> str:
                return f"{x:{width - 1}.2f}x" if x else f"{'-':>{width}}"

            print(
                f"{workload:9} {r['impl'] + mark:28} {r['pairs']:5d} {r['cpu_s']:8.1f} {r['wall_s']:8.1f} "
                f"{r['tokens_per_s']:9.0f} {r['peak_fraction']:7.1%} {vs(r['speedup_vs_best'])} "
                f"{vs(r['speedup_vs_default'])} {vs(r['speedup_vs_levers_off'], 13)} {r['max_abs_diff']:9.1e}"
            )
    print(
        f"\nspeed-ups are ratios of {'CPU-seconds' if key == 'cpu_s' else 'wall seconds'} measured in this run; "
        "% peak = "
        "useful FLOPs (pair_flops of the unpadded pairs) per CPU-second / the measured matmul peak per CPU-second of "
        "the configuration's dtype (on CUDA: per wall second, i.e. MFU); 'levers off' = the engine as issue 24 found "
        "it (its kept levers switched off), measured in this run; max|diff| = largest rank-score difference "
        "to the first configuration of the workload."
    )


def main(argv: list[str] | None = None) -> None:
    """`python -m pairrm_rlhf.bench [--flags]`: the same as `pairrm-rlhf bench` (`core.entry.run_command`)."""
    from .core.entry import parse, run_command

    run_command("pairrm-rlhf bench", lambda: run_bench(*parse(make_parser(), argv, "pairrm-rlhf bench")))


if __name__ == "__main__":
    main()
