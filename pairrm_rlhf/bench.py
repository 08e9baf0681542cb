"""`pairrm-rlhf bench`: the engine against a baseline that follows the reference's schedule, in one process.

The baseline is what llm-blender does: for each fixed group of prompts and each ordered candidate pair
(i, j), one forward over the group, padded to its longest sequence, in input order, with `.half()` weights
on GPU and fp32 on CPU. Both sides use the same randomly initialised model and the same token layout, so
their outputs must agree (to 1e-4 in fp32). Speed is reported as ratios measured in the same run.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import re
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DebertaV2Config

from .core.aggregation import round_robin_scores
from .core.assets import bundled
from .core.engine import PairScorer
from .core.modeling import PairRMModel, select
from .core.progress import progress_enabled
from .core.tokenization import PairLayout, load_text_tokenizer
from .pairrm import PairRM, resolve_dtype

logger = logging.getLogger(__name__)

SHAPES = {  # layers, hidden, heads
    "xsmall": (12, 384, 6),
    "base": (12, 768, 12),
    "large": (24, 1024, 16),  # PairRM (DeBERTa-v3-large)
}


TASKS = {"rank4": 4, "rank8": 8, "rank_with_ref": 4}  # task -> candidates per prompt


@dataclass
class BenchArguments:
    """Benchmark the pair-scoring engine against the reference schedule (pairs/s, speed-up, MFU).

    Args: one per field (each field's `help` says what it holds); every field is checked when the object is built.

    Example:
        >>> BenchArguments(shape="xsmall", prompts=2, tasks="rank4", device="cpu").task_list()
        ['rank4']
    """

    shape: str = field(default="xsmall", metadata={"help": "xsmall (12L/384H), base (12L/768H) or large (24L/1024H)"})
    device: str | None = field(default=None, metadata={"help": "cpu or cuda (None: cuda if available)"})
    dtype: str | None = field(default=None, metadata={"help": "engine dtype: float32, bfloat16, float16 (None: by device)"})
    prompts: int | None = field(default=None, metadata={"help": "prompts in the workload (None: 8 on CPU, 256 on GPU)"})
    tasks: str = field(default="rank4,rank8,rank_with_ref", metadata={"help": "comma list of rank4, rank8, rank_with_ref"})
    baseline_batch_size: int = field(default=4, metadata={"help": "prompts per baseline batch (llm-blender's default)"})
    max_tokens: int | None = field(default=None, metadata={"help": "engine token budget per batch (None: by device)"})
    seed: int = field(default=0, metadata={"help": "workload and weight seed"})

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"--shape: must be one of {', '.join(SHAPES)}, got {self.shape!r}")
        unknown = [t for t in self.task_list() if t not in TASKS]
        if unknown or not self.task_list():
            raise ValueError(f"--tasks: must be a comma list of {', '.join(TASKS)}, got {self.tasks!r}")
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device: must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device: {self.device} asked for but no CUDA device is available")
        if self.dtype is not None:
            resolve_dtype(self.dtype, torch.device("cpu"))  # ValueError naming the accepted names
        for name in ("prompts", "baseline_batch_size", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be >= 1, got {getattr(self, name)}")

    def task_list(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]


def make_parser(prog: str | None = None):
    """The `bench` parser in TRL's script style: (BenchArguments,)."""
    from trl import TrlParser

    return TrlParser((BenchArguments,), prog=prog)


# ---- workload ------------------------------------------------------------------------------------
def make_workload(tokenizer, n_prompts: int, n_candidates: int, seed: int) -> tuple[list[str], list[list[str]]]:
    """Deterministic prompts (10-600 tokens) and responses (5-900 tokens), log-uniform lengths.

    Words are single vocabulary pieces, so a text of n words is close to n tokens. Long prompts with long
    responses exceed PairRM's budgets and get truncated, as real data does.
    """
    words = sorted(
        piece[1:] for piece in tokenizer.get_vocab() if piece.startswith("▁") and piece[1:].isalpha() and len(piece) > 2
    )
    rng = random.Random(seed)

    def text(low: int, high: int) -> str:
        n = int(math.exp(rng.uniform(math.log(low), math.log(high))))
        return " ".join(rng.choice(words) for _ in range(n))

    prompts = [text(10, 600) for _ in range(n_prompts)]
    candidates = [[text(5, 900) for _ in range(n_candidates)] for _ in range(n_prompts)]
    return prompts, candidates


def build_random_pairrm(shape: str, device: torch.device, dtype: torch.dtype, max_tokens: int | None, seed: int) -> PairRM:
    """A PairRM of the given shape with random weights and the bundled tokenizer."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    layers, hidden, heads = SHAPES[shape]
    tokenizer = load_text_tokenizer(bundled("pairrm"))
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    config = DebertaV2Config(
        vocab_size=base_vocab + 4, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=4 * hidden, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0,
        relative_attention=True, max_relative_positions=-1, position_buckets=256, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], position_biased_input=False, layer_norm_eps=1e-7,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = PairRMModel(config).eval().to(device)
    layout = PairLayout(
        cls_id=tokenizer.token_to_id("[CLS]"), sep_id=tokenizer.token_to_id("[SEP]"), pad_id=0,
        source_prefix_id=base_vocab, cand1_prefix_id=base_vocab + 1, cand2_prefix_id=base_vocab + 2,
    )
    return PairRM(PairScorer(model, tokenizer, layout, device=device, dtype=dtype, max_tokens=max_tokens))


# ---- the reference schedule ----------------------------------------------------------------------
class Baseline:
    """One forward per ordered pair over fixed groups of prompts, padded to the group's longest, unsorted,
    through transformers' own DeBERTa-v2 model (eager attention, all hidden states kept), as llm-blender runs."""

    def __init__(self, pairrm: PairRM, batch_size: int):
        scorer = pairrm.backend
        self.backend = scorer
        self.batch_size = batch_size
        self.model = copy.deepcopy(scorer.model).half() if scorer.device.type == "cuda" else scorer.model

    def forward(self, triples: list[tuple[str, str, str]]) -> np.ndarray:
        pairs = self.backend.build(triples)
        longest = max(len(ids) for ids, _ in pairs)
        input_ids = torch.full((len(pairs), longest), self.backend.layout.pad_id, dtype=torch.long)
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
        return out.cpu().numpy()

    def rank_scores(self, prompts: list[str], candidates: list[list[str]]) -> np.ndarray:
        n = len(candidates[0])
        scores = []
        for start in range(0, len(prompts), self.batch_size):
            group = range(start, min(start + self.batch_size, len(prompts)))
            matrix = np.zeros((len(group), n, n), dtype=np.float32)
            for i in range(n):
                for j in range(n):
                    if i != j:
                        matrix[:, i, j] = self.forward([(prompts[k], candidates[k][i], candidates[k][j]) for k in group])
            scores.extend(round_robin_scores(m) for m in matrix)
        return np.stack(scores)

    def rank_with_ref_scores(self, prompts: list[str], candidates: list[list[str]]) -> np.ndarray:
        refs = [max(c, key=len) for c in candidates]
        scores = np.zeros((len(prompts), len(candidates[0])), dtype=np.float32)
        for j in range(len(candidates[0])):
            for start in range(0, len(prompts), self.batch_size):
                group = range(start, min(start + self.batch_size, len(prompts)))
                ref_first = self.forward([(prompts[k], refs[k], candidates[k][j]) for k in group])
                cand_first = self.forward([(prompts[k], candidates[k][j], refs[k]) for k in group])
                scores[list(group), j] = cand_first - ref_first
        return scores


# ---- measurement -----------------------------------------------------------------------------------
def pair_flops(length: int, config: DebertaV2Config) -> float:
    """Forward FLOPs of one pair of `length` tokens: projections, FFN, attention and DeBERTa's c2p/p2c terms."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    span = 2 * config.position_buckets
    per_layer = 2 * length * (4 * h * h + 2 * h * inter) + 4 * length * length * h + 4 * length * span * h
    return float(layers * per_layer)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best dense-matmul TFLOP/s of this device in `dtype`, measured now (the MFU denominator)."""
    n, repeats = (8192, 10) if device.type == "cuda" else (2048, 2)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 3):
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out, elapsed, peak


def run_bench(config: BenchArguments, show_progress_bar: bool | None = None) -> dict:
    """Run the benchmark, print a table and return the measured rows.

    Args:
        config: the workload, model shape and device.
        show_progress_bar: a bar over the tasks (None: `core.progress.progress_enabled`).

    Returns:
        {"peak_tflops": measured matmul peak, "rows": one dict per task and implementation}.

    Example:
        >>> run_bench(BenchArguments(prompts=1, tasks="rank4", device="cpu"))["rows"][0]["impl"]  # doctest: +SKIP
        'baseline'
    """
    with torch.no_grad():
        return _run_bench(config, show_progress_bar)


def _run_bench(config: BenchArguments, show_progress_bar: bool | None = None) -> dict:
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(config.dtype, device)
    pairrm = build_random_pairrm(config.shape, device, dtype, config.max_tokens, config.seed)
    baseline = Baseline(pairrm, config.baseline_batch_size)
    baseline_dtype = torch.float16 if device.type == "cuda" else torch.float32
    n_prompts = config.prompts or (256 if device.type == "cuda" else 8)
    peak = measure_peak_tflops(device, dtype)
    encoder_config = pairrm.backend.model.config

    print(f"pairrm-rlhf bench: shape={config.shape} ({encoder_config.num_hidden_layers}L/{encoder_config.hidden_size}H) "
          f"device={device} ({_device_name(device)}, {torch.get_num_threads()} threads) engine dtype={_name(dtype)} "
          f"baseline dtype={_name(baseline_dtype)} prompts={n_prompts} token budget={pairrm.backend.max_tokens}")
    print(f"measured matmul peak in {_name(dtype)}: {peak:.2f} TFLOP/s\n")
    header = f"{'task':14} {'impl':9} {'pairs':>6} {'time s':>8} {'pairs/s':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak MiB':>9} {'speed-up':>9} {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    tasks = config.task_list()
    bar = tqdm(total=len(tasks), unit="task", desc="bench", disable=not progress_enabled(show_progress_bar, len(tasks), logger))
    for task in tasks:
        bar.set_postfix_str(task)
        n_candidates = TASKS[task]
        prompts, candidates = make_workload(pairrm.backend.tokenizer, n_prompts, n_candidates, config.seed)
        if task == "rank_with_ref":
            refs = [max(c, key=len) for c in candidates]
            triples = [t for k, p in enumerate(prompts) for c in candidates[k] for t in ((p, c, refs[k]), (p, refs[k], c))]
            run_engine = lambda: pairrm.rank_with_ref(prompts, candidates, return_scores=True, show_progress_bar=False)
            run_base = lambda: baseline.rank_with_ref_scores(prompts, candidates)
        else:
            triples = [(p, a, b) for k, p in enumerate(prompts) for a in candidates[k] for b in candidates[k] if a is not b]
            run_engine = lambda: pairrm.rank(prompts, candidates, return_scores=True, show_progress_bar=False)
            run_base = lambda: baseline.rank_scores(prompts, candidates)
        lengths = [len(ids) for ids, _ in pairrm.backend.build(triples)]
        tokens, flops = sum(lengths), sum(pair_flops(n, encoder_config) for n in lengths)
        # warm up both paths on one prompt (kernels, allocator), then time the whole workload
        pairrm.rank(prompts[:1], candidates[:1], show_progress_bar=False)
        baseline.rank_scores(prompts[:1], candidates[:1])
        base_out, base_time, base_peak = _timed(run_base, device)
        eng_out, eng_time, eng_peak = _timed(run_engine, device)
        diff = float(np.abs(eng_out - base_out).max())
        for impl, seconds, mem in (("baseline", base_time, base_peak), ("engine", eng_time, eng_peak)):
            row = {
                "task": task, "impl": impl, "pairs": len(triples), "seconds": seconds,
                "pairs_per_s": len(triples) / seconds, "tokens_per_s": tokens / seconds,
                "tflops": flops / seconds / 1e12, "mfu": flops / seconds / 1e12 / peak, "peak_mib": mem / 2**20,
                "speedup": base_time / seconds, "max_abs_diff": diff,
            }
            rows.append(row)
            bar.write(f"{task:14} {impl:9} {row['pairs']:6d} {seconds:8.2f} {row['pairs_per_s']:9.1f} {row['tokens_per_s']:10.0f} "
                      f"{row['tflops']:8.3f} {row['mfu']:6.1%} {row['peak_mib']:9.0f} {row['speedup']:8.2f}x {diff:10.2e}",
                      file=sys.stdout)
        bar.update(1)
    bar.close()
    print("\npairs = ordered pairs the task needs; tokens = their unpadded tokens; speed-up = baseline time / time; "
          "MFU = achieved / measured matmul peak; peak MiB = CUDA peak allocated (GPU) or process max RSS (CPU).")
    return {"peak_tflops": peak, "rows": rows}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def main(argv: list[str] | None = None) -> None:
    """`python -m pairrm_rlhf.bench [--flags]`: the same as `pairrm-rlhf bench` (`core.entry.run_command`)."""
    from .core.entry import parse, run_command

    run_command("pairrm-rlhf bench", lambda: run_bench(*parse(make_parser(), argv, "pairrm-rlhf bench")))


if __name__ == "__main__":
    main()
