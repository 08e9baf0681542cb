"""The benchmark command: real shape by default, the reference's padding and batch sizes, progress lines, FLOPs.

(Speed itself is reported by `pairrm-rlhf bench`, never asserted here.)
"""

import pytest
import torch
from conftest import HF_CHECKPOINT

from pairrm_rlhf.bench import Baseline, BenchArguments, build_random_pairrm, make_workload, pair_flops, run_bench
from pairrm_rlhf.core.tokenization import load_text_tokenizer


def test_bench_runs_and_matches_baseline(capsys):
    """tiny shape, 1 prompt: batch sizes 1 and 8 are one schedule (one group), run once under both names; the
    engine as issue 24 found it ('levers off') is measured in the same run, next to the engine as it is."""
    config = BenchArguments(shape="tiny", workloads="typical", prompts=1, baseline_batch_sizes="1,8", dtypes="float32")
    rows = run_bench(config)["rows"]
    assert [r["impl"] for r in rows] == ["reference bs=1=8", "engine float32 levers off", "engine float32"]
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows)  # fp32: same numbers, both engines and the reference
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 and 0 < r["peak_fraction"] for r in rows)
    assert rows[2]["speedup_vs_best"] > 0 and rows[0]["speedup_vs_default"] == rows[0]["speedup_vs_best"] == 1.0
    assert rows[2]["speedup_vs_levers_off"] == rows[1]["cpu_s"] / rows[2]["cpu_s"]
    assert rows[0]["speedup_vs_levers_off"] is None and rows[1]["speedup_vs_levers_off"] == 1.0
    assert rows[0]["executed_flops"] > rows[0]["flops"]  # the reference pads
    out = capsys.readouterr().out
    assert "estimated" in out and "CPU-s" in out and "GFLOP per CPU-second" in out
    assert "[1/3] typical  reference bs=1=8" in out and "[2/3] typical  engine float32 levers off  started" in out
    assert "[3/3] typical  engine float32" in out and "done" in out
    assert "vs best ref" in out and "% peak" in out and "vs levers off" in out


def test_levers_off_is_the_skewed_route_at_every_length(monkeypatch):
    """`PairRMModel._levers = False` (bench only) runs the engine as issue 24 found it: the skewed position route
    even past 2L-1 > 2*span, where the engine now gathers from the buckets; both give the same logits (fp32)."""
    from pairrm_rlhf.core import modeling

    routes = []
    for name in ("_SkewedPositions", "_BucketedPositions"):
        cls = getattr(modeling, name)
        monkeypatch.setattr(modeling, name, lambda *a, cls=cls, name=name: routes.append(name) or cls(*a))
    pairrm = build_random_pairrm((2, 64, 2), torch.device("cpu"), torch.float32, 0)
    triples = [(" ".join(["word"] * 200), " ".join(["reply"] * 60), "no")]  # ~270 tokens: past 256
    model = pairrm.backend.model
    on = pairrm.backend.score(triples)
    model._levers = False
    try:
        off = pairrm.backend.score(triples)
    finally:
        model._levers = True
    assert routes == ["_BucketedPositions", "_SkewedPositions"]
    assert abs(on - off).max() <= 1e-4


def test_baseline_pads_like_the_reference_collator():
    """Every row of a group: the group's longest source segment + 2 x its longest candidate segment (llm-blender's
    CrossCompareCollator pads sources and candidates separately; `cat_ids` moves the padding to the end)."""
    pairrm = build_random_pairrm((1, 32, 2), torch.device("cpu"), torch.float32, 0)
    prompts = ["one two three four five six", "x"]
    candidates = [["a", "b c"], ["d e f g h i j k l m", "n"]]
    scorer = pairrm.backend
    src = max(len(scorer.layout.source_segment(scorer.tokenize([p])[p])) for p in prompts)
    cand = max(len(scorer.tokenize([c])[c]) + 3 for cs in candidates for c in cs)
    assert Baseline(pairrm, 2).padded_length(prompts, candidates, range(2)) == src + 2 * cand
    assert Baseline(pairrm, 2).padded_lengths(prompts, candidates) == [src + 2 * cand] * 4
    alone = Baseline(pairrm, 1).padded_lengths(prompts, candidates)
    assert len(alone) == 4 and max(alone) <= src + 2 * cand and alone[0] != alone[2]


def test_workloads_are_deterministic_with_their_lengths():
    tokenizer = load_text_tokenizer(HF_CHECKPOINT)
    a = make_workload(tokenizer, "typical", seed=3)
    assert a == make_workload(tokenizer, "typical", seed=3) and len(a[0]) == 4 and len(a[1][0]) == 4
    lengths = [len(tokenizer.encode(c, add_special_tokens=False).ids) for cs in a[1] for c in cs]
    assert 40 <= min(lengths) and max(lengths) <= 500
    prompts, candidates = make_workload(tokenizer, "long", seed=0)
    long_pair = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in (prompts[0], *candidates[0][:2]))
    assert 1800 <= long_pair


def test_pair_flops_counts_linear_attention_and_position_terms():
    config = type(
        "C", (), {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "position_buckets": 256}
    )()
    # 2 layers * (2L(4h^2 + 2h*I) + 4L^2 h + 4 L R h), R = min(2L - 1, 512) relative rows
    assert pair_flops(200, config) == 2 * (
        2 * 200 * (4 * 64 * 64 + 2 * 64 * 256) + 4 * 200 * 200 * 64 + 4 * 200 * 399 * 64
    )
    assert pair_flops(683, config) == 2 * (
        2 * 683 * (4 * 64 * 64 + 2 * 64 * 256) + 4 * 683 * 683 * 64 + 4 * 683 * 512 * 64
    )


def test_arguments_are_checked_when_built():
    assert BenchArguments().layers_hidden_heads() == (24, 1024, 16)  # the real PairRM shape by default
    assert BenchArguments(shape="real:4").layers_hidden_heads() == (4, 1024, 16)
    with pytest.raises(ValueError, match=r"^--shape: must be one of tiny, .*, got 'real:0'$"):
        BenchArguments(shape="real:0")
    with pytest.raises(ValueError, match=r"^--prompts: must be >= 1, got 0$"):
        BenchArguments(prompts=0)
    with pytest.raises(ValueError, match=r"^--baseline_batch_sizes: must be a comma list of integers >= 1, got '1,x'$"):
        BenchArguments(baseline_batch_sizes="1,x")
    assert BenchArguments(workloads=" short, long ").workload_list() == ["short", "long"]
    assert BenchArguments(baseline_batch_sizes="8,1,4").batch_sizes() == [1, 4, 8]
