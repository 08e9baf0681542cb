"""Data in and out of `label`: the one dataset reader (`pairrm_rlhf.data`) and its one-line errors, bad prompts
refused before any model, a prompt longer than the policy's context refused before any generation (bounded
memory), one labeler per work directory (a file lock naming its holder), writes that fail in one line, chat
templates that cannot run for ever, and chat policies sampled through their chat template by default."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset

from pairrm_rlhf.core import generation as core_generation
from pairrm_rlhf.core import identity as core_identity
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.evaluation import read_rows as eval_read_rows
from pairrm_rlhf.labeling import PreferenceLabeler, load_prompts
from pairrm_rlhf.labeling import io as labeling_io
from pairrm_rlhf.labeling.command import main
from pairrm_rlhf.serve.openrlhf import ReferenceTable

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"prompt": "Explain the sun.", "reference": "A star."},
    {"prompt": "Describe the ocean.", "reference": "Salty."},
]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, rows: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def one_line_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pairrm-rlhf label: error: ")]
    assert len(errors) == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == errors[0], err
    return errors[0].removeprefix("pairrm-rlhf label: error: ")


# ---- one reader ----------------------------------------------------------------------------------------------
def test_the_three_readers_are_one(tmp_path):
    """JSON Lines in a `.json` file and a `.csv` file read the same through label, eval and serve's reference file
    (eval refused .csv and parsed a .json as one document; serve told them apart by a leading `[`)."""
    sources = [
        jsonl(tmp_path / "lines.json", ROWS),
        write(tmp_path / "table.csv", "prompt,reference\nExplain the sun.,A star.\nDescribe the ocean.,Salty.\n"),
        write(tmp_path / "array.json", json.dumps({"data": ROWS}, indent=2)),
    ]
    for source in sources:
        assert load_prompts(str(source)).to_list() == ROWS, source
        assert eval_read_rows(str(source)) == ROWS, source
        table = ReferenceTable.from_file(source)
        assert [table.get(r["prompt"]) for r in ROWS] == ["A star.", "Salty."], source
    one = write(tmp_path / "one.json", json.dumps({"prompt": "p", "rows": [1, 2]}))  # a row with a `rows` column
    assert load_prompts(str(one)).to_list() == eval_read_rows(str(one)) == [{"prompt": "p", "rows": [1, 2]}]


BAD_JSON = [
    ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": "b",}\n', r"line 3: invalid JSON \(Expecting property name"),
    ("five.jsonl", '{"prompt": "a"}\n5\n', r"line 2: a row must be a JSON object, got a number \(5\)"),
    ("five.json", "5", r"line 1: a row must be a JSON object, got a number \(5\)"),
    ("list.json", '[{"prompt": "a"}, 7]', r"item 1 of the array must be a JSON object, got a number \(7\)"),
    ("broken.json", '[\n{"prompt": "a"},\n{"prompt": }\n]', r"line 3: invalid JSON"),
    (
        "pretty.json",
        '{\n  "data": [\n    {"prompt": "a"},\n    {"prompt" "b"}\n  ]\n}',
        r"line 4: invalid JSON \(Expecting ':'",
    ),
]


@pytest.mark.parametrize("name, text, message", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_json_errors_name_the_file_and_line(name, text, message, tmp_path):
    path = write(tmp_path / name, text)
    for read, flag in ((load_prompts, "--dataset"), (eval_read_rows, "--data")):
        with pytest.raises(ValueError, match=f"^{flag}: {path}: {message}"):
            read(str(path))
    with pytest.raises(ValueError, match=f"^--reference_file: {path}: {message}"):
        ReferenceTable.from_file(path)


def test_column_errors_list_the_files_columns(tmp_path, capsys, no_models):
    path = jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    error = one_line_error(
        ["--dataset", str(path), "--policy", "tiny", "--pairrm", "tiny", "--output_path", str(tmp_path / "o")], capsys
    )
    assert error == f"--prompt_column: no column 'prompt' in {path} (columns: answer, question)"
    with pytest.raises(
        ValueError, match=rf"^--reference_column: no column 'reference' in {path} \(columns: answer, question\)$"
    ):
        ReferenceTable.from_file(path, prompt_column="question")


BAD_PROMPTS = [
    ([{"prompt": "a"}, {"prompt": None}], "row 1: prompt must be a string or a list of messages, got null"),
    ([{"prompt": 3}, {"prompt": 4}], "row 0: prompt must be a string or a list of messages, got a number"),
    (
        [{"prompt": [{"role": "robot", "content": "hi"}]}],
        "row 0: prompt[0] has role 'robot'; expected system, user or assistant",
    ),
    (
        [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "hi"}]}],
        "row 1: column 'prompt' holds a list but row 0 holds a string; a column must hold one kind",
    ),
    (
        [{"prompt": [{"role": "user", "content": None}]}],
        "row 0: prompt[0] content must be a string or a list of text parts",
    ),
]


@pytest.mark.parametrize("rows, message", BAD_PROMPTS, ids=["null", "number", "role", "mixed", "content"])
def test_bad_prompts_are_one_line_naming_file_and_row(rows, message, tmp_path, capsys, no_models):
    path = jsonl(tmp_path / "prompts.jsonl", rows)
    error = one_line_error(
        ["--dataset", str(path), "--policy", "tiny", "--pairrm", "tiny", "--output_path", str(tmp_path / "o")], capsys
    )
    assert path.name in error and error.endswith(message), error


def test_hub_and_folder_sources_stay_apart(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a `save_to_disk` dataset"):
        load_prompts(str(tmp_path / "empty"))
    (tmp_path / "files").mkdir()
    Dataset.from_list(ROWS).to_parquet(str(tmp_path / "files" / "part.parquet"))
    assert load_prompts(str(tmp_path / "files")).to_list() == eval_read_rows(str(tmp_path / "files")) == ROWS
    with pytest.raises(FileNotFoundError, match=r"^--dataset: file not found: \./nope\.jsonl$"):
        load_prompts("./nope.jsonl")


# ---- one long prompt --------------------------------------------------------------------------------------------
PEAK_RSS = """
import resource, subprocess, sys
limit = 8 * 2**30  # a bounded test: past this the old code fails an allocation instead of taking the machine
code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
        "from pairrm_rlhf.labeling.command import main; main(sys.argv[1:])" % (limit, limit))
run = subprocess.run([sys.executable, "-c", code, *sys.argv[1:]],
                     capture_output=True, text=True, timeout=300)
print(run.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(run.stderr[-3000:], file=sys.stderr)
"""


def label_peak(tmp_path, *argv) -> tuple[int, int, str]:
    """(exit code, peak RSS in MiB, stderr) of `label argv` in a fresh process with an 8 GiB address-space cap."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *argv],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    code, peak = run.stdout.split()
    return int(code), int(peak), run.stderr


@pytest.mark.multiprocess
def test_a_prompt_longer_than_the_policys_context_is_refused_before_generation(tmp_path):
    data = jsonl(tmp_path / "long.jsonl", [{"prompt": "Hi"}, {"prompt": "word " * 20000}])
    code, peak, err = label_peak(
        tmp_path,
        "--dataset",
        str(data),
        "--policy",
        "tiny",
        "--pairrm",
        "tiny",
        "--num_responses",
        "2",
        "--max_new_tokens",
        "8",
        "--output_path",
        str(tmp_path / "o"),
    )
    assert code == 2 and "Traceback" not in err, err
    assert re.search(
        rf"\npairrm-rlhf label: error: {data} row 1: the prompt is 400\d\d tokens for the policy; with "
        "max_new_tokens 8 its context of 512 tokens leaves room for 504: shorten or drop that prompt",
        err,
    ), err
    assert peak < 1500, peak  # MiB: the models and the check, no generation
    # the judge alone (existing responses) truncates the prompt to its budget and scores it
    data = jsonl(tmp_path / "scored.jsonl", [{"prompt": "word " * 20000, "responses": ["yes", "no, a longer one"]}])
    code, peak, err = label_peak(
        tmp_path,
        "--dataset",
        str(data),
        "--responses_column",
        "responses",
        "--pairrm",
        "tiny",
        "--output_path",
        str(tmp_path / "scored_out.jsonl"),
    )
    assert code == 0 and peak < 1500, (peak, err)
    assert "| judge truncation rate | 100.0% |" in (tmp_path / "scored_out.jsonl.card.md").read_text()


# ---- one labeler per work directory -----------------------------------------------------------------------------
HOLDER = """
import sys
from datasets import Dataset
from pairrm_rlhf import PairRM
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.labeling import PreferenceLabeler

original = PreferenceLabeler._label_chunk
def wait(self, *args):
    print("labeling", flush=True)
    sys.stdin.readline()  # hold the work directory until the test says so
    return original(self, *args)
PreferenceLabeler._label_chunk = wait
labeler = PreferenceLabeler(PairRM.from_pretrained(bundled("pairrm"), device="cpu"), responses_column="responses")
labeler.label(Dataset.from_list(eval(sys.argv[2])), sys.argv[1])
print("done", flush=True)
"""
RESPONSES = [{"prompt": "Explain the sun.", "responses": ["Hot.", "A star at the centre of the solar system."]}]


@pytest.mark.multiprocess
def test_a_second_labeler_on_the_same_work_dir_fails_fast_naming_the_first(hf_model, tmp_path):
    work = tmp_path / "work"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(work), repr(RESPONSES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert holder.stdout.readline() == "labeling\n", holder.stderr.read()
        labeler = PreferenceLabeler(hf_model, responses_column="responses")
        started = time.monotonic()
        with pytest.raises(
            ValueError,
            match=rf"^work_dir '{work}' is in use by another labeler \(pid {holder.pid} "
            rf"on {os.uname().nodename}, started 20\d\d-\d\d-\d\dT[\d:]+Z\)",
        ):
            labeler.label(Dataset.from_list(RESPONSES), work)
        assert time.monotonic() - started < 5  # at once, not after doing the work
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline() == "done\n" and holder.wait(timeout=60) == 0
    finally:
        holder.kill()
    assert labeler.label(Dataset.from_list(RESPONSES), work).num_rows == 1  # released: the next run resumes


# ---- writes that fail -------------------------------------------------------------------------------------------
def failing_open(code: int):
    def refuse(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    return refuse


@pytest.mark.parametrize(
    "module, code, culprit",
    [
        (labeling_io, errno.ENOSPC, "pairs.jsonl"),  # the output, disk full
        (core_identity, errno.EROFS, "pairs.jsonl.chunks/lock.json"),  # the work directory, read-only (atomic_write)
    ],
)
def test_a_failed_write_is_one_line_naming_the_path(module, code, culprit, tmp_path, capsys, monkeypatch):
    data = jsonl(tmp_path / "r.jsonl", RESPONSES)
    monkeypatch.setattr(module, "open", failing_open(code), raising=False)
    error = one_line_error(
        [
            "--dataset",
            str(data),
            "--responses_column",
            "responses",
            "--pairrm",
            "tiny",
            "--output_path",
            str(tmp_path / "pairs.jsonl"),
        ],
        capsys,
    )
    assert error == f"cannot write {tmp_path / culprit}: {os.strerror(code)}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line(tmp_path, capsys):
    data = jsonl(tmp_path / "r.jsonl", RESPONSES)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        error = one_line_error(
            [
                "--dataset",
                str(data),
                "--responses_column",
                "responses",
                "--pairrm",
                "tiny",
                "--output_path",
                str(tmp_path / "ro" / "pairs.jsonl"),
            ],
            capsys,
        )
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert error.startswith(f"cannot write {tmp_path / 'ro'}") and error.endswith("Permission denied")


# ---- chat templates ---------------------------------------------------------------------------------------------
NEVER_ENDS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


@pytest.mark.multiprocess
def test_chat_template_that_never_ends_is_stopped(tmp_path):
    policy = Path(shutil.copytree(bundled("policy"), tmp_path / "policy"))
    (policy / "chat_template.jinja").write_text(NEVER_ENDS)
    data = jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pairrm_rlhf.labeling.command",
            "--dataset",
            str(data),
            "--policy",
            str(policy),
            "--pairrm",
            "tiny",
            "--output_path",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"the chat template of {policy} did not finish within 1,000,000 steps" in run.stderr.splitlines()[-1]
    assert time.monotonic() - started < 100


def test_label_samples_a_chat_policy_through_its_chat_template(tmp_path, capsys, monkeypatch):
    seen = []
    render = core_generation.render_prompts
    monkeypatch.setattr(
        core_generation,
        "render_prompts",
        lambda tok, prompts: seen.extend(render(tok, prompts)) or render(tok, prompts),
    )
    data = jsonl(tmp_path / "p.jsonl", [{"prompt": "Explain the sun."}])
    argv = ["--dataset", str(data), "--policy", "tiny", "--pairrm", "tiny", "--num_responses", "2",
            "--max_new_tokens", "4", "--allow_unfinished_chosen", "true", "--output_path"]  # the tiny policy never ends
    main([*argv, str(tmp_path / "chat.jsonl")])
    assert seen == [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nExplain the sun.<|im_end|>\n<|im_start|>assistant\n"
    ]
    row = json.loads((tmp_path / "chat.jsonl").read_text().splitlines()[0])
    assert row["prompt"] == [{"role": "user", "content": "Explain the sun."}]  # TRL's conversational format
    assert row["chosen"][0]["role"] == "assistant"
    seen.clear()
    main([*argv, str(tmp_path / "raw.jsonl"), "--conversational", "false"])
    assert seen == ["Explain the sun."]
    assert json.loads((tmp_path / "raw.jsonl").read_text().splitlines()[0])["prompt"] == "Explain the sun."


def test_a_policy_without_chat_template_says_how_to_sample_raw_text(tmp_path, capsys):
    policy = Path(shutil.copytree(bundled("policy"), tmp_path / "policy"))
    (policy / "chat_template.jinja").unlink()
    data = jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    error = one_line_error(
        ["--dataset", str(data), "--policy", str(policy), "--pairrm", "tiny", "--output_path", str(tmp_path / "o")],
        capsys,
    )
    assert error == (
        "conversational prompts need a policy tokenizer with a chat template "
        "(--conversational false samples on the raw text)"
    )
