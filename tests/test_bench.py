"""The benchmark command runs end to end and its engine agrees with the reference-schedule baseline.

(Speed itself is reported by `pairrm-rlhf bench`, never asserted here.)
"""

import pytest

from pairrm_rlhf.bench import BenchArguments, make_workload, pair_flops, run_bench
from pairrm_rlhf.core.tokenization import load_text_tokenizer
from conftest import HF_CHECKPOINT


@pytest.mark.slow
def test_bench_runs_and_matches_baseline(capsys):
    result = run_bench(BenchArguments(shape="xsmall", prompts=1, tasks="rank_with_ref", device="cpu"), show_progress_bar=True)
    rows = result["rows"]
    assert [r["impl"] for r in rows] == ["baseline", "engine"]
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows)  # fp32: same numbers
    assert all(r["pairs_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    out, err = capsys.readouterr()
    assert "speed-up" in out and "rank_with_ref" in out and "MFU" in out
    assert "bench: 100%" in err and "1/1" in err  # the per-task bar


def test_workload_is_deterministic_and_varied():
    tokenizer = load_text_tokenizer(HF_CHECKPOINT)
    a = make_workload(tokenizer, 16, 4, seed=3)
    assert a == make_workload(tokenizer, 16, 4, seed=3)
    lengths = [len(tokenizer.encode(p, add_special_tokens=False).ids) for p in a[0]]
    assert min(lengths) < 60 and max(lengths) > 150  # log-uniform 10..600 tokens
    config = type("C", (), {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "position_buckets": 256})()
    # 2 layers * (2*L*(4h^2 + 2h*inter) + 4 L^2 h + 4 L * 512 * h) at L=200, h=64, inter=256
    assert pair_flops(200, config) == 2 * (2 * 200 * (4 * 64 * 64 + 2 * 64 * 256) + 4 * 200 * 200 * 64 + 4 * 200 * 512 * 64)


def test_arguments_are_checked_when_built():
    with pytest.raises(ValueError, match=r"^--prompts: must be >= 1, got 0$"):
        BenchArguments(prompts=0)
    assert BenchArguments(tasks=" rank4, rank8 ").task_list() == ["rank4", "rank8"]
