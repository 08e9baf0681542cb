"""`pairrm-rlhf eval`: loaders for the public formats, agreement, ties, best-of-4, bootstrap, the command."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pairrm_rlhf import PairRM
from pairrm_rlhf.cli import main
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.evaluation import bootstrap_ci, detect_format, evaluate, load_examples, read_rows

DATA = Path(__file__).parent / "fixtures" / "eval"


class LengthBackend:
    """A fake judge: the longer text wins (f = len(A) - len(B))."""

    device = torch.device("cpu")

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        return np.array([len(a) - len(b) for _, a, b in triples], dtype=np.float32)

    def truncation_rate(self, triples):
        return 0.0


def table(results):
    return {r.name: (r.n, r.agreement, r.skipped) for r in results}


@pytest.mark.parametrize("name, fmt", [
    ("rewardbench.jsonl", "pairs"), ("rewardbench2.jsonl", "best_of_n"), ("autoj_pairwise.jsonl", "autoj"),
    ("hhh_alignment.jsonl", "hhh"), ("mt_bench_human.jsonl", "mtbench"),
])
def test_formats_are_detected(name, fmt):
    assert detect_format(read_rows(str(DATA / name))[0]) == fmt


def test_pairs_per_subset_and_overall():
    got = table(evaluate(PairRM(LengthBackend()), load_examples(str(DATA / "rewardbench.jsonl")), bootstrap=100))
    assert got["alpacaeval-easy"] == (2, 1.0, 0) and got["xstest-should-refuse"] == (2, 0.0, 0)
    assert got["overall"] == (4, 0.5, 0) and got["macro average"][1] == 0.5


def test_best_of_four():
    examples = load_examples(str(DATA / "rewardbench2.jsonl"))
    assert [len(e.rejected) for e in examples] == [3, 3, 3]
    got = table(evaluate(PairRM(LengthBackend()), examples, bootstrap=0))
    assert got["Focus"][:2] == (2, 0.5) and got["Math"][:2] == (1, 1.0)
    assert got["overall"][1] == pytest.approx(2 / 3)


def test_autoj_labels_and_ties():
    examples = load_examples(str(DATA / "autoj_pairwise.jsonl"))
    assert [e.tie for e in examples] == [False, False, True, False]
    skip = table(evaluate(PairRM(LengthBackend()), examples, bootstrap=0))
    assert skip["overall"] == (3, 1.0, 1)
    margin = table(evaluate(PairRM(LengthBackend()), examples, ties="margin", tie_margin=5.0, bootstrap=0))
    assert margin["overall"] == (4, 1.0, 0)  # the tie's |z| = 4 <= 5 counts as a right "tie" call
    strict = table(evaluate(PairRM(LengthBackend()), examples, ties="margin", tie_margin=1.0, bootstrap=0))
    assert strict["creative_writing"][:2] == (2, 0.5)


def test_hhh_and_mtbench():
    got = table(evaluate(PairRM(LengthBackend()), load_examples(str(DATA / "hhh_alignment.jsonl")), bootstrap=0))
    assert got["overall"] == (3, 1.0, 0) and set(got) >= {"harmless", "helpful", "honest"}
    examples = load_examples(str(DATA / "mt_bench_human.jsonl"))
    got = table(evaluate(PairRM(LengthBackend()), examples, bootstrap=0))
    assert got["turn 1"] == (1, 1.0, 1) and got["turn 2"] == (1, 1.0, 0)  # whole conversations (PairRM)
    other = table(evaluate(PairRM(LengthBackend(), template="rlhflow"), examples, bootstrap=0))
    assert other["turn 2"] == (0, other["turn 2"][1], 1)  # differing histories: skipped for one-context judges


def test_single_order_and_bootstrap():
    examples = load_examples(str(DATA / "rewardbench.jsonl"))
    assert table(evaluate(PairRM(LengthBackend()), examples, orders="single", bootstrap=0))["overall"][1] == 0.5
    low, high = bootstrap_ci(np.array([1.0, 0.0, 1.0, 1.0]), n=500)
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)


def test_eval_command(capsys, tmp_path):
    out = tmp_path / "results.json"
    main(["eval", "--data", str(DATA / "rewardbench.jsonl"), "--model", bundled("pairrm"), "--device", "cpu",
          "--bootstrap", "50", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "| Subset | N | Agreement | 95% CI |" in printed and "alpacaeval-easy" in printed and "**overall**" in printed
    assert '"results"' in out.read_text()
    with pytest.raises(ValueError, match="cannot tell the data format"):
        detect_format({"x": 1})
