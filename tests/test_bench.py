"""The benchmark command runs end to end and its engine agrees with the reference-schedule baseline.

(Speed itself is reported by `pairrm-rlhf bench`, never asserted here.)
"""

from pairrm_rlhf.bench import BenchConfig, make_workload, pair_flops, run_bench
from pairrm_rlhf.cli import main
from pairrm_rlhf.core.tokenization import load_text_tokenizer
from conftest import HF_CHECKPOINT


def test_bench_runs_and_matches_baseline(capsys):
    result = run_bench(BenchConfig(shape="xsmall", prompts=1, tasks="rank_with_ref", device="cpu"))
    rows = result["rows"]
    assert [r["impl"] for r in rows] == ["baseline", "engine"]
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows)  # fp32: same numbers
    assert all(r["pairs_per_s"] > 0 and r["tflops"] > 0 for r in rows)
    out = capsys.readouterr().out
    assert "speed-up" in out and "rank_with_ref" in out and "MFU" in out


def test_workload_is_deterministic_and_varied():
    tokenizer = load_text_tokenizer(HF_CHECKPOINT)
    a = make_workload(tokenizer, 16, 4, seed=3)
    assert a == make_workload(tokenizer, 16, 4, seed=3)
    lengths = [len(tokenizer.encode(p, add_special_tokens=False).ids) for p in a[0]]
    assert min(lengths) < 60 and max(lengths) > 150  # log-uniform 10..600 tokens
    assert pair_flops(200, type("C", (), {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "position_buckets": 256})()) > 0


def test_cli_help_lists_subcommands(capsys):
    try:
        main(["--help"])
    except SystemExit as exit:
        assert exit.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "demo" in out and "label" in out


def test_demo_prints_tables(capsys):
    main(["demo", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "compare(A, B)" in out and "P(A>B)" in out and "#1" in out and "#4" in out
