"""`pairrm-rlhf eval`: loaders for the public formats and `label`'s outputs, agreement, ties, best-of-4, bootstrap,
RewardBench v1 sections, Auto-J groups, predictions/tables/plots, the Hub push, and the command.

A fake judge (the longer text wins) makes every expected number computable by hand.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from pairrm_rlhf import PairRM
from pairrm_rlhf.args import PairRMArguments
from pairrm_rlhf.cli import main
from pairrm_rlhf.evaluation import (
    Example,
    autoj_groups,
    bootstrap_ci,
    detect_format,
    evaluate,
    load_examples,
    read_rows,
    rewardbench_sections,
    summarize,
)
from pairrm_rlhf.evaluation.report import calibration_bins, example_probability
from pairrm_rlhf.evaluation.sections import AUTOJ_GROUPS, REWARDBENCH_COUNTS, REWARDBENCH_SECTIONS, detect_scheme

from known_preference import LengthBackend

DATA = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture
def length_judge(monkeypatch):
    """`PairRMArguments.load` returns the fake judge (the command path runs unchanged around it; the default hub id
    it stands in for need not be in the hub cache)."""
    monkeypatch.setattr(PairRMArguments, "load", lambda self, device=None: PairRM(LengthBackend()))
    monkeypatch.setattr(PairRMArguments, "check_environment", lambda self, device=None: None)


def table(results):
    return {r.name: (r.n, r.agreement, r.skipped) for r in results}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair(subset: str, right: bool, k: int = 0) -> dict:
    """A RewardBench-style row the length judge gets right (chosen longer) or wrong."""
    long, short = f"a long and detailed answer {k}", f"short {k}"
    return {
        "subset": subset,
        "prompt": f"q{k}",
        "chosen": long if right else short,
        "rejected": short if right else long,
    }


# ---- formats -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, fmt",
    [
        ("rewardbench.jsonl", "pairs"),
        ("rewardbench2.jsonl", "best_of_n"),
        ("autoj_pairwise.jsonl", "autoj"),
        ("hhh_alignment.jsonl", "hhh"),
        ("mt_bench_human.jsonl", "mtbench"),
    ],
)
def test_formats_are_detected(name, fmt):
    assert detect_format(read_rows(str(DATA / name))[0]) == fmt


def test_reads_every_format_label_writes(tmp_path):
    """save_to_disk folder, jsonl and parquet (label's three outputs, conversational rows) give the same examples."""
    from datasets import Dataset

    rows = [
        {
            "prompt": [{"role": "user", "content": f"q{k}"}],
            "chosen": [{"role": "assistant", "content": "a much longer answer" if k % 2 else "no"}],
            "rejected": [{"role": "assistant", "content": "no" if k % 2 else "a much longer answer"}],
            "margin": 1.0,
        }
        for k in range(4)
    ]
    data = Dataset.from_list(rows)
    data.save_to_disk(str(tmp_path / "disk"))
    data.to_json(str(tmp_path / "labels.jsonl"), lines=True)
    data.to_parquet(str(tmp_path / "labels.parquet"))
    got = {}
    for source in ("disk", "labels.jsonl", "labels.parquet"):
        examples = load_examples(str(tmp_path / source))
        got[source] = table(evaluate(PairRM(LengthBackend()), examples, bootstrap=0))["overall"]
    assert got["disk"] == got["labels.jsonl"] == got["labels.parquet"] == (4, 0.5, 0)


def test_column_mapping_and_its_errors(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "good": "a long answer", "bad": "no"}])
    examples = load_examples(str(path), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (examples[0].prompt, examples[0].chosen, examples[0].rejected) == ("q", ["a long answer"], ["no"])
    with pytest.raises(
        ValueError, match=r"^--prompt_column: no column 'prompt_text' in .*qa.jsonl \(columns: bad, good, question\)$"
    ):
        load_examples(str(path), columns={"prompt": "prompt_text"})


def test_local_looking_paths_are_file_not_found_never_the_hub(tmp_path):
    for name in ("missing.jsonl", "./nope", str(tmp_path / "x.parquet"), "~/nothing/here"):
        with pytest.raises(FileNotFoundError, match=r"^--data: file not found: "):
            read_rows(name)
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="not a `save_to_disk` dataset"):
        read_rows(str(tmp_path / "folder"))


# ---- agreement -----------------------------------------------------------------------------------------------
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
    other = table(evaluate(PairRM(LengthBackend(template="rlhflow")), examples, bootstrap=0))
    assert other["turn 2"] == (0, other["turn 2"][1], 1)  # differing histories: skipped for one-context judges


def test_single_order_and_bootstrap():
    examples = load_examples(str(DATA / "rewardbench.jsonl"))
    assert table(evaluate(PairRM(LengthBackend()), examples, orders="single", bootstrap=0))["overall"][1] == 0.5
    low, high = bootstrap_ci(np.array([1.0, 0.0, 1.0, 1.0]), n=500)
    assert 0.0 <= low <= 0.75 <= high <= 1.0
    assert bootstrap_ci(np.ones(5)) == (1.0, 1.0)
    assert bootstrap_ci(np.ones(5), n=0) == (None, None)  # no interval, never [nan, nan]
    no_ci = summarize([1.0, 0.0], [Example("p", ["a"], ["b"], "x"), Example("p", ["a"], ["b"], "y")], bootstrap=0)
    assert all(r.low is None and r.high is None for r in no_ci)


# ---- sections ------------------------------------------------------------------------------------------------
def test_rewardbench_constants_are_reward_benchs():
    """allenai/reward-bench rewardbench/constants.py at 05a9005: 23 subsets; math-prm weighted 984 (it has 447)."""
    assert sum(REWARDBENCH_COUNTS.values()) == 3522 and REWARDBENCH_COUNTS["math-prm"] == 984
    assert REWARDBENCH_COUNTS["xstest-should-refuse"] == 154 and REWARDBENCH_COUNTS["xstest-should-respond"] == 250
    assert sorted(s for v in REWARDBENCH_SECTIONS.values() for s in v) == sorted(REWARDBENCH_COUNTS)
    assert sum(len(v) for v in AUTOJ_GROUPS.values()) == 58


def test_rewardbench_section_weighting_by_hand():
    agreement = {
        "alpacaeval-easy": 0.5,
        "mt-bench-easy": 1.0,
        "xstest-should-refuse": 0.0,
        "xstest-should-respond": 1.0,
        "math-prm": 0.0,
        "hep-python": 1.0,
        "shp": 1.0,
        "anthropic_helpful": 0.0,
        "not-a-subset": 1.0,
    }
    got = rewardbench_sections(agreement)
    chat, safety, reasoning = (0.5 * 100 + 28) / 128, 250 / 404, 164 / 1148
    assert got["Chat"] == pytest.approx(chat) and got["Chat Hard"] is None
    assert got["Safety"] == pytest.approx(safety) and got["Reasoning"] == pytest.approx(1 / 7)
    assert got["Prior Sets"] == 0.5
    assert got["Score"] == pytest.approx((2 * chat + 2 * safety + 2 * reasoning + 0.5) / 7)
    no_prior = rewardbench_sections({"alpacaeval-easy": 1.0, "refusals-dangerous": 0.0})
    assert no_prior["Prior Sets"] is None and no_prior["Score"] == pytest.approx(0.5)  # (2*1 + 2*0) / 4


def test_autoj_groups_pool_their_scenarios():
    subsets = ["code_generation", "code_generation", "code_simplification", "chitchat", "creative_writing", "chitchat"]
    correct = [1.0, 0.0, 1.0, 1.0, 0.0, None]  # the last one a skipped tie
    examples = [Example("p", ["a"], ["b"], s) for s in subsets]
    got = table(autoj_groups(correct, examples, bootstrap=0))
    assert got["Code"] == (3, pytest.approx(2 / 3), 0)  # pooled, not the mean of scenarios (0.75)
    assert got["General Communication"] == (1, 1.0, 1) and got["Creative Writing"] == (1, 0.0, 0)
    assert got["overall"] == (5, pytest.approx(3 / 5), 1)
    assert detect_scheme(subsets) == "autoj" and detect_scheme(["alpacaeval-easy", "shp"]) == "rewardbench"
    assert detect_scheme(["alpacaeval-easy", "chitchat"]) == "none"
    with pytest.raises(ValueError, match="not Auto-J scenarios: cooking"):
        autoj_groups([1.0], [Example("p", ["a"], ["b"], "cooking")], bootstrap=0)


# ---- report --------------------------------------------------------------------------------------------------
def test_probability_and_calibration_bins_by_hand():
    assert example_probability(np.array([0.0, 4.0])) == pytest.approx(0.5)  # the weakest pair, sigmoid(z / 2)
    assert example_probability(np.array([2.0]), orders="single") == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert example_probability(None) is None
    records = [
        {"p_chosen": p, "correct": c}
        for p, c in [(0.05, 0.0), (0.95, 1.0), (0.91, 0.0), (1.0, 1.0), (0.55, 1.0), (0.6, None), (None, 1.0)]
    ]
    bins = calibration_bins(records, bins=10)
    assert [(b["low"], b["n"]) for b in bins] == [(0.0, 1), (0.5, 1), (0.9, 3)]
    assert bins[2]["predicted"] == pytest.approx((0.95 + 0.91 + 1.0) / 3) and bins[2]["observed"] == pytest.approx(
        2 / 3
    )


def test_eval_command_writes_predictions_tables_plots_and_card(tmp_path, length_judge, capsys):
    rows = [
        pair("alpacaeval-easy", True, 0),
        pair("alpacaeval-easy", False, 1),
        pair("mt-bench-easy", True, 2),
        pair("hep-python", True, 3),
        pair("math-prm", False, 4),
    ]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    out = tmp_path / "out"
    main(["eval", "--data", str(data), "--pairrm", "tiny", "--bootstrap", "0", "--output_dir", str(out)])
    printed = capsys.readouterr().out
    assert "| Subset | N | Agreement | Skipped |" in printed and "CI" not in printed  # no interval without bootstrap
    assert "| Chat | 60.94% |" in printed and "| Chat Hard | absent |" in printed  # (0.5*100 + 28) / 128
    assert "| Reasoning | 14.29% |" in printed  # (0*984 + 164) / 1148
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["correct"] for p in predictions] == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert predictions[0]["logits"] == [2.0 * (len(rows[0]["chosen"]) - len(rows[0]["rejected"]))]  # f(c,r) - f(r,c)
    saved = json.loads((out / "results.json").read_text())
    assert saved["rewardbench_sections"]["Chat"] == pytest.approx(78 / 128) and saved["sections"] == "rewardbench"
    assert (out / "results.md").read_text().startswith("### tiny")
    assert (out / "README.md").read_text().startswith("---\ntags:")
    for png in ("calibration.png", "subsets.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and str(out / png) in printed


def test_eval_push_is_private_by_default(tmp_path, length_judge, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            pass

        def whoami(self):  # the hub is checked before any model loads (core.entry.check_hub_push)
            return {"auth": {"accessToken": {"role": "write"}}}

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs))

        def upload_folder(self, folder_path, repo_id, **kwargs):
            calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    data = write_jsonl(tmp_path / "rb.jsonl", [pair("alpacaeval-easy", True)])
    main(
        [
            "eval",
            "--data",
            str(data),
            "--bootstrap",
            "0",
            "--output_dir",
            str(tmp_path / "o"),
            "--no_plots",
            "--push_to_hub",
            "me/results",
        ]
    )
    creates = [c for c in calls if c[0] == "create"]
    assert creates and all(
        c == ("create", "me/results", {"repo_type": "dataset", "private": True, "exist_ok": True}) for c in creates
    )
    assert calls[-1] == ("upload", "me/results", ["README.md", "predictions.jsonl", "results.json", "results.md"])


# ---- what a reader of the outputs sees ---------------------------------------------------------------------------
def test_data_without_subsets_is_one_overall_row(tmp_path, length_judge, capsys):
    data = write_jsonl(
        tmp_path / "qa.jsonl", [{k: v for k, v in pair("x", k % 2 == 0, k).items() if k != "subset"} for k in range(3)]
    )
    main(["eval", "--data", str(data), "--bootstrap", "0", "--output_dir", str(tmp_path / "out"), "--no_plots"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "Subset" not in line]
    assert rows == ["| **overall** | 3 | 66.67% | 0 |"]  # not an "all" row repeating it
    # a single RewardBench subset still gets its section
    data = write_jsonl(tmp_path / "rb.jsonl", [pair("alpacaeval-easy", True, 0), pair("alpacaeval-easy", False, 1)])
    main(["eval", "--data", str(data), "--bootstrap", "0", "--output_dir", str(tmp_path / "rb"), "--no_plots"])
    assert "| Chat | 50.00% |" in capsys.readouterr().out


def test_predictions_carry_the_texts_the_label_and_the_call(tmp_path, length_judge):
    rows = [
        pair("a", True, 0),
        pair("a", False, 1),
        {"prompt": "q", "response_a": "same", "response_b": "same", "label": "tie", "subset": "a"},
    ]
    data = write_jsonl(tmp_path / "mixed.jsonl", rows[:2])
    out = tmp_path / "out"
    main(["eval", "--data", str(data), "--bootstrap", "0", "--output_dir", str(out), "--no_plots"])
    got = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for record, row in zip(got, rows):
        assert (record["prompt"], record["chosen"], record["rejected"]) == (
            row["prompt"],
            row["chosen"],
            row["rejected"],
        )
        assert record["label"] == "chosen"
    assert [r["prediction"] for r in got] == ["chosen", "rejected"] and [r["correct"] for r in got] == [1.0, 0.0]
    ties = write_jsonl(tmp_path / "ties.jsonl", [rows[2]])
    main(
        [
            "eval",
            "--data",
            str(ties),
            "--bootstrap",
            "0",
            "--output_dir",
            str(out),
            "--no_plots",
            "--ties",
            "margin",
            "--tie_margin",
            "0.5",
        ]
    )
    record = json.loads((out / "predictions.jsonl").read_text())
    assert (record["label"], record["prediction"], record["correct"]) == ("tie", "tie", 1.0)


def test_subset_names_are_escaped_in_markdown(tmp_path, length_judge):
    names = ["a|b", "<img src=x onerror=alert(1)>", "*bold* and [link](http://x)"]
    data = write_jsonl(tmp_path / "odd.jsonl", [pair(name, True, k) for k, name in enumerate(names)])
    out = tmp_path / "out"
    main(["eval", "--data", str(data), "--bootstrap", "0", "--output_dir", str(out), "--no_plots"])
    table = [line for line in (out / "results.md").read_text().splitlines() if line.startswith("| ")]
    cells = [re.split(r"(?<!\\)\|", line)[1:-1] for line in table]
    assert {len(c) for c in cells} == {4}  # no name split a row
    text = (out / "results.md").read_text() + (out / "README.md").read_text()
    assert "<img" not in text and "[link](" not in text and "*bold*" not in text
    assert r"a\|b" in text and r"\*bold\* and \[link\](http://x)" in text


@pytest.fixture
def figures(monkeypatch):
    """Every matplotlib figure saved while the test runs."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self) or original(self, *a, **k))
    return saved


def extents(fig, texts):
    fig.canvas.draw()
    return [t.get_window_extent() for t in texts if t.get_text()]


def test_calibration_counts_stay_inside_and_apart(tmp_path, figures):
    from pairrm_rlhf.evaluation.report import write_plots

    # two bins whose means are close (0.099 | 0.101), and bins at the top edge (observed 1.0)
    records = [
        {"p_chosen": p, "correct": c}
        for p, c in [(0.099, 0.0), (0.101, 0.0), (0.95, 1.0), (0.999, 1.0), (0.85, 1.0), (0.55, 1.0)]
    ]
    write_plots(tmp_path, records, summarize([1.0], [Example("p", ["a"], ["b"])], bootstrap=0), "t")
    fig = figures[0]
    ax = fig.axes[0]
    counts = extents(fig, ax.texts)
    assert len(counts) == 5
    inside = ax.get_window_extent()
    assert all(inside.x0 <= b.x0 and b.x1 <= inside.x1 and inside.y0 <= b.y0 and b.y1 <= inside.y1 for b in counts)
    assert not any(a.overlaps(b) for i, a in enumerate(counts) for b in counts[i + 1 :])
    legend = ax.get_legend().get_window_extent()
    assert not any(legend.overlaps(b) for b in counts)


def test_one_subset_plot_has_one_labelled_bar(tmp_path, length_judge, figures):
    data = write_jsonl(
        tmp_path / "one.jsonl", [{k: v for k, v in pair("x", k != 2, k).items() if k != "subset"} for k in range(3)]
    )
    main(["eval", "--data", str(data), "--bootstrap", "50", "--output_dir", str(tmp_path / "out")])
    fig = figures[1]
    ax = fig.axes[0]
    assert len(ax.patches) == 1
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["overall (n=3): 66.7%"]
    title, ticks = extents(fig, [ax.title]), extents(fig, ax.get_yticklabels() + ax.get_xticklabels())
    assert not any(title[0].overlaps(b) for b in ticks)
