"""The `label` command: its whole configuration is checked before any model loads (one-line errors naming the flag),
it writes the dataset (three formats), a dataset card and a margin histogram and prints their paths, pushes with the
card (mocked hub) after checking the hub first, reports a failed push in one line after the summary, parses
TRL-style, and two processes give what one gives."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from datasets import Dataset, load_from_disk

from pairrm_rlhf.args import PairRMArguments, bundled_configs
from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.labeling import PreferenceLabeler, load_prompts
from pairrm_rlhf.labeling.command import LabelArguments, main, make_parser, run_label

REPO = Path(__file__).resolve().parents[1]
SMOKE = bundled_configs().get("label_smoke") or str(REPO / "recipes" / "configs" / "label_smoke.yaml")
PROMPTS = ["Explain the sun.", "Describe the ocean.", "What is green tea?"]
RESPONSES = [
    ["Hot.", "It is a star at the centre of the solar system.", "no"],
    ["Blue", "Wet and big.", ""],
    ["A drink.", "Tea made from unoxidised leaves.", "tea"],
]


@pytest.fixture
def responses_file(tmp_path):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"question": p, "answers": r}) + "\n" for p, r in zip(PROMPTS, RESPONSES)))
    return path


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # one error line, no traceback (datasets may print its own progress lines while building a cache)
    errors = [line for line in err.splitlines() if line.startswith("pairrm-rlhf label: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == errors[0], err
    return errors[0].removeprefix("pairrm-rlhf label: error: ")


BASE = ["--dataset", "tiny", "--policy", "tiny", "--pairrm", "tiny"]
BAD = [
    (["--dataset", "./nope.jsonl", "--policy", "tiny"], "--dataset: file not found: ./nope.jsonl"),
    (["--dataset", "data/prompts.parquet", "--policy", "tiny"], "--dataset: file not found: data/prompts.parquet"),
    (BASE + ["--policy", "./nodir"], "--policy: file not found: ./nodir"),
    (BASE + ["--pairrm", "~/no/such/pairrm"], "--pairrm: file not found: ~/no/such/pairrm"),
    (BASE + ["--strategy", "best"],
     "--strategy: must be one of best_vs_worst, best_vs_random, best_vs_second, all_pairs, max_min_p, got 'best'"),
    (BASE + ["--aggregation", "mean"], "--aggregation: must be one of rank, copeland, bradley_terry, got 'mean'"),
    (BASE + ["--backend", "tgi"], "--backend: must be one of transformers, vllm, got 'tgi'"),
    (BASE + ["--output_format", "csv"], "--output_format: must be one of save_to_disk, jsonl, parquet, got 'csv'"),
    (
        BASE + ["--pairrm_dtype", "fp8"],
        "--pairrm_dtype: must be one of auto, float32, fp32, bfloat16, bf16, float16, fp16, got 'fp8'",
    ),
    (BASE + ["--num_responses", "1"], "--num_responses: 1 is below 2"),
    (BASE + ["--chunk_size", "0"], "--chunk_size: 0 is below 1"),
    (
        BASE + ["--prompt_column", "question"],
        "--prompt_column: no column 'question' in tiny (columns: prompt, reference)",
    ),
    (
        BASE + ["--responses_column", "answers"],
        "--responses_column: no column 'answers' in tiny (columns: prompt, reference)",
    ),
    (["--dataset", "tiny", "--pairrm", "tiny"], "--policy is required unless --responses_column is given"),
    (BASE + ["--temperature", "-1"], "temperature=-1.0 is out of range"),
    (["--config", "nope.yaml"], "--config: file not found: nope.yaml"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[-2:]) for a, _ in BAD])
def test_bad_configuration_is_one_line_before_any_model(argv, message, tmp_path, capsys, no_models):
    if "--output_path" not in argv and argv[0] != "--config":
        argv = [*argv, "--output_path", str(tmp_path / "out")]
    error = one_line_error(argv, capsys)
    assert error == message or (argv[0] == "--config" and error.startswith(message))


def test_missing_output_path_and_an_unsafe_one(tmp_path, capsys, no_models):
    assert one_line_error(BASE, capsys) == "--output_path is required"
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    error = one_line_error(BASE + ["--output_path", str(tmp_path / "notes")], capsys)
    assert error == f"--output_path: {tmp_path / 'notes'} exists and is not a saved dataset; refusing to replace it"
    with pytest.raises(ValueError, match="--strategy: must be one of"):  # the API raises the same, before loading
        run_label(LabelArguments(dataset="tiny", policy="tiny", strategy="best", output_path=str(tmp_path / "o")))
    with pytest.raises(AssertionError, match="a model was loaded"):  # a good configuration does reach the loading
        run_label(
            LabelArguments(dataset="tiny", policy="tiny", output_path=str(tmp_path / "o")),
            PairRMArguments(pairrm="tiny"),
        )


# ---- outputs -----------------------------------------------------------------------------------------------
def label_argv(responses_file, output, *extra):
    return [
        "--dataset",
        str(responses_file),
        "--prompt_column",
        "question",
        "--responses_column",
        "answers",
        "--pairrm",
        "tiny",
        "--output_path",
        str(output),
        *extra,
    ]


def settings_block(card: str, title: str) -> dict:
    return yaml.safe_load(re.search(rf"## {title}\n\n```yaml\n(.*?)```", card, re.S).group(1))


def test_outputs_card_histogram_and_paths(responses_file, tmp_path, capsys, hf_model):
    output = tmp_path / "pairs.jsonl"
    Path(f"{output}.tmp-999").write_text("left by a killed run")
    argv = label_argv(responses_file, output, "--strategy", "all_pairs", "--seed", "3")
    main(argv)
    printed = capsys.readouterr().out
    card_path, plot_path = tmp_path / "pairs.jsonl.card.md", tmp_path / "pairs.jsonl.margins.png"
    assert f"Wrote {output} (jsonl)\nCard: {card_path}\nMargin histogram: {plot_path}" in printed
    assert not Path(f"{output}.tmp-999").exists()
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot_path.stat().st_size > 5000

    card = card_path.read_text()
    pairs = len(rows)
    mean = sum(r["margin"] for r in rows) / pairs
    assert f"Labeled 3 prompts -> {pairs} pairs" in printed and f"| pairs | {pairs} |" in card
    assert f"| mean margin | {mean:.4f} |" in card and "| prompts | 3 |" in card
    assert "- **Model** (responses sampled from): existing responses (`responses_column`)" in card
    assert "- **Strategy**: all_pairs" in card
    identity = hf_model.backend.identity()  # the bundled tiny PairRM, as `--pairrm tiny` loads it
    assert f"weights digest `{identity['weights']}`, dtype float32" in card
    assert settings_block(card, "Judge identity") == json.loads(json.dumps(identity))
    parsed = make_parser().parse_args_and_config(argv)
    expected = {k: v for args in parsed for k, v in vars(args).items()}
    assert settings_block(card, "Settings") == expected
    assert yaml.safe_load(card.split("---")[1])["tags"] == ["dpo", "preference", "pairrm-rlhf"]

    for name, fmt in (("pairs.parquet", "parquet"), ("pairs_dir", "save_to_disk")):
        main(label_argv(responses_file, tmp_path / name, "--strategy", "all_pairs", "--seed", "3"))
        assert f"({fmt})" in capsys.readouterr().out
    assert pq.read_table(tmp_path / "pairs.parquet").to_pylist() == rows
    assert load_from_disk(str(tmp_path / "pairs_dir")).to_list() == rows
    assert (tmp_path / "pairs_dir.card.md").exists() and (tmp_path / "pairs_dir.margins.png").exists()


def test_no_matplotlib_no_plot_and_it_says_so(responses_file, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `from matplotlib.figure import ...` fails
    with caplog.at_level(logging.WARNING):
        main(label_argv(responses_file, tmp_path / "pairs.jsonl"))
    assert "Margin histogram: not written (matplotlib is not installed)" in capsys.readouterr().out
    assert any("pip install pairrm-rlhf[plots]" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "pairs.jsonl.margins.png").exists() and (tmp_path / "pairs.jsonl.card.md").exists()


def hub_online(monkeypatch, record: dict, role: str = "write") -> None:
    """A hub that answers (no network): logged in with a token of `role`; `create_repo` records its arguments."""
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: {"name": "me", "auth": {"accessToken": {"role": role}}})
    monkeypatch.setattr(
        HfApi,
        "create_repo",
        lambda self, repo_id, repo_type=None, private=None, exist_ok=False, **k: record.update(
            created=(repo_id, repo_type, private)
        ),
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "offline",
            "--push_to_hub me/pairs: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it or drop --push_to_hub",
        ),
        (
            "read",
            "--push_to_hub me/pairs: cannot push there: the hub token is read-only (log in with `hf auth login` or "
            "set HF_TOKEN to a token that can write)",
        ),
        (
            "no token",
            "--push_to_hub me/pairs: cannot push there: no hub token found (log in with `hf auth login` or set "
            "HF_TOKEN to a token that can write)",
        ),
    ],
)
def test_push_to_hub_is_checked_before_any_model(
    setting, message, responses_file, tmp_path, capsys, monkeypatch, no_models
):
    from huggingface_hub import constants

    if setting == "read":
        hub_online(monkeypatch, {}, role="read")
    elif setting == "no token":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("HF_TOKEN", "")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved token either
        monkeypatch.setattr("huggingface_hub.utils._auth.get_token", lambda: None)
        monkeypatch.setattr("huggingface_hub.hf_api.get_token", lambda: None)
    argv = label_argv(responses_file, tmp_path / "pairs.jsonl", "--push_to_hub", "me/pairs")
    assert one_line_error(argv, capsys) == message
    assert not (tmp_path / "pairs.jsonl").exists()


def test_a_failed_push_after_saving_prints_the_summary_and_one_line(responses_file, tmp_path, capsys, monkeypatch):
    hub_online(monkeypatch, {})

    def refuse(self, repo, **kwargs):
        raise OSError("403 Forbidden: you cannot write to me/pairs\n(request id: 42)")

    monkeypatch.setattr(Dataset, "push_to_hub", refuse)
    output = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(label_argv(responses_file, output, "--push_to_hub", "me/pairs"))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"pairrm-rlhf label: error: saved to {output}; push to me/pairs failed: "
        "403 Forbidden: you cannot write to me/pairs"
    )
    assert "Labeled 3 prompts -> " in out and f"Wrote {output} (jsonl)" in out and "Pushed to" not in out
    assert len(output.read_text().splitlines()) == 3 and (tmp_path / "pairs.jsonl.card.md").exists()


@pytest.mark.parametrize("flag, private", [([], True), (["--no_hub_private"], False)])
def test_push_to_hub_with_card(flag, private, responses_file, tmp_path, capsys, monkeypatch):
    from huggingface_hub import DatasetCard

    pushed = {}
    monkeypatch.setattr(
        Dataset,
        "push_to_hub",
        lambda self, repo, private=None, **kw: pushed.update(repo=repo, private=private, rows=len(self)),
    )
    existing = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n---\n"
    monkeypatch.setattr(DatasetCard, "load", classmethod(lambda cls, repo, repo_type=None, **kw: cls(existing)))
    monkeypatch.setattr(
        DatasetCard,
        "push_to_hub",
        lambda self, repo, repo_type=None, **kw: pushed.update(card=self.content, card_repo=repo, card_type=repo_type),
    )
    hub_online(monkeypatch, pushed)
    main(label_argv(responses_file, tmp_path / "pairs.jsonl", "--push_to_hub", "me/pairs", *flag))
    assert (pushed["repo"], pushed["private"], pushed["rows"]) == ("me/pairs", private, 3)
    assert (pushed["card_repo"], pushed["card_type"]) == ("me/pairs", "dataset")
    card = DatasetCard(pushed["card"])
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*"  # what `datasets` wrote stays
    assert card.data.tags == ["dpo", "preference", "pairrm-rlhf"]
    assert card.text.strip() == DatasetCard((tmp_path / "pairs.jsonl.card.md").read_text()).text.strip()
    assert f"Pushed to me/pairs ({'private' if private else 'public'})" in capsys.readouterr().out
    assert pushed["created"] == ("me/pairs", "dataset", private)  # checked (and created) before anything ran


# ---- parsing --------------------------------------------------------------------------------------------------
def test_parser_and_help(capsys):
    label_args, pairrm_args, sampling_args = make_parser().parse_args_and_config(["--config", SMOKE])
    assert (label_args.dataset, label_args.policy, pairrm_args.pairrm) == ("tiny", "tiny", "tiny")
    assert isinstance(sampling_args, SamplingArguments) and sampling_args.temperature == 0.7
    assert len(load_prompts(label_args.dataset)) == 32

    parsed = make_parser().parse_args_and_config(["--config", SMOKE, "--top_k", "5", "--no_hub_private"])
    assert isinstance(parsed[1], PairRMArguments) and parsed[2].top_k == 5 and parsed[0].hub_private is False
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "push the dataset public instead of private\n" in text.replace("\n" + " " * 24, " ")


# ---- two processes ---------------------------------------------------------------------------------------------
WORKER = """
import sys
from pairrm_rlhf import PairRM
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.generation import SamplingArguments, load_policy
from pairrm_rlhf.labeling import PreferenceLabeler, load_prompts
from pairrm_rlhf.labeling.command import main
from pairrm_rlhf.labeling.labeler import _process_state

original = PreferenceLabeler._label_chunk
def spy(self, dataset, index, *args):
    print(f"process {_process_state().process_index} labeled chunk {index}", flush=True)
    return original(self, dataset, index, *args)
PreferenceLabeler._label_chunk = spy
main(sys.argv[3:])
PreferenceLabeler._label_chunk = original
# the library call without a work_dir: results are gathered in memory
policy, tokenizer = load_policy("tiny", "cpu")
labeler = PreferenceLabeler(PairRM.from_pretrained(bundled("pairrm"), device="cpu"), policy, tokenizer,
                            num_responses=3, sampling=SamplingArguments(max_new_tokens=8), allow_unfinished_chosen=True)
out = labeler.label(load_prompts(sys.argv[2]), chunk_size=2)
if _process_state().is_main_process:
    out.save_to_disk(sys.argv[1])
from pairrm_rlhf.core.distributed import end_distributed_run
end_distributed_run()
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(hf_model, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS + ["Hi!", "Bye.", "Why?", "How?"]))
    config = tmp_path / "label.yaml"
    config.write_text(
        f"dataset: {data}\npolicy: tiny\npairrm: tiny\nnum_responses: 3\nmax_new_tokens: 8\nchunk_size: 2\n"
        "strategy: best_vs_random\npolicy_device: cpu\nallow_unfinished_chosen: true\n"  # the tiny policy never ends
    )
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]]),
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(tmp_path / "memory2"),
        str(data),
        "--config",
        str(config),
        "--output_path",
        str(tmp_path / "two"),
        "--keep_chunks",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Labeled 7 prompts") == 1  # only the main process writes and reports
    done = sorted(re.findall(r"process (\d) labeled chunk (\d)", result.stdout), key=lambda t: t[1])
    assert done == [(str(i // 2), str(i)) for i in range(4)], result.stdout  # contiguous shards, each chunk once
    assert len(list((tmp_path / "two.chunks").glob("chunk-*.arrow"))) == 4

    main(["--config", str(config), "--output_path", str(tmp_path / "one")])
    assert not (tmp_path / "one.chunks").exists()  # work_dir removed after success
    one, two = load_from_disk(str(tmp_path / "one")), load_from_disk(str(tmp_path / "two"))
    assert one.to_list() == two.to_list()
    memory = load_from_disk(str(tmp_path / "memory2"))
    from pairrm_rlhf.core.generation import load_policy

    single = PreferenceLabeler(hf_model, *load_policy("tiny", "cpu"), num_responses=3,
                               sampling=SamplingArguments(max_new_tokens=8), allow_unfinished_chosen=True)
    assert memory.to_list() == single.label(load_prompts(str(data)), chunk_size=2).to_list()
