"""The command line as a newcomer meets it: every `--help` works and names its subcommand, a bad configuration is one
line (`pairrm-rlhf <cmd>: error: ...`, exit code 2) before any model loads, logs are printed once, and `demo` loads
no datasets or web stack. Also the progress-bar policy shared by every long job."""

import json
import logging
import os
import re
import subprocess
import sys

import pytest

from pairrm_rlhf.args import PairRMArguments
from pairrm_rlhf.cli import COMMANDS, main
from pairrm_rlhf.core.progress import progress_enabled

DOUBLED = re.compile(r"\(default: [^)]*\)\s*\(default:")


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of `pairrm-rlhf argv` in this process."""
    code = 0
    try:
        main(list(argv))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a judge is loaded: validation must come first."""

    def refuse(self, device=None):
        raise AssertionError("a model was loaded before the configuration was checked")

    monkeypatch.setattr(PairRMArguments, "load", refuse)


def test_top_level_help_lists_every_command(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(name in out for name in COMMANDS)
    code, _, err = run_cli(capsys, "nope")
    assert code == 2 and "pairrm-rlhf: error: unknown command 'nope'" in err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_works_and_names_its_subcommand(capsys, command):
    if command == "serve":
        pytest.importorskip("starlette", reason="the serve extra is not installed")
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert out.startswith(f"usage: pairrm-rlhf {command} ")
    assert not DOUBLED.search(" ".join(out.split())), DOUBLED.search(" ".join(out.split()))


def test_help_shows_each_default_once(capsys):
    _, out, _ = run_cli(capsys, "eval", "--help")
    flat = " ".join(out.split())
    assert "e.g. pairrm, better-pairrm, rlhflow (default: from the name) --pairrm_base_model" in flat
    assert "--no_hub_private, --no-hub-private set hub_private to False" in flat
    assert "95 percent" in flat  # the help that used to crash argparse on a bare percent sign


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--data", "missing.jsonl"], "--data: file not found: missing.jsonl"),
        (["eval", "--data", "./nope"], "--data: file not found: ./nope"),
        (
            ["eval", "--data", "nobody/nothing"],
            "--data: cannot load the hub dataset 'nobody/nothing': Couldn't reach 'nobody/nothing' on the Hub "
            "(OfflineModeIsEnabled)",
        ),
        (["eval", "--data", "DATA", "--pairrm", "./nodir"], "--pairrm: file not found: ./nodir"),
        (
            ["eval", "--data", "DATA", "--format", "csv"],
            "--format: must be one of auto, pairs, labelled, best_of_n, autoj, hhh, mtbench, got 'csv'",
        ),
        (
            ["eval", "--data", "DATA", "--prompt_column", "question"],
            "--prompt_column: no column 'question' in DATA (columns: chosen, prompt, rejected, subset)",
        ),
        (["eval", "--data", "DATA", "--bootstrap", "-1"], "--bootstrap: must be >= 0 (0: no intervals), got -1"),
        (["eval", "--data", "DATA", "--ties", "maybe"], "--ties: must be one of skip, margin, got 'maybe'"),
        (["eval", "--data", "DATA", "--sections", "autoj"], "--sections autoj: not Auto-J scenarios: alpacaeval-easy"),
        (
            ["eval", "--data", "DATA", "--pairrm_dtype", "float64"],
            "--pairrm_dtype: must be one of auto, float32, fp32, bfloat16, bf16, float16, fp16, got 'float64'",
        ),
        (
            ["eval", "--data", "DATA", "--pairrm_device", "gpu"],
            "--pairrm_device: must be cpu, cuda, cuda:N or mps, got 'gpu'",
        ),
        (["eval", "--config", "nope.yaml"], "--config: file not found: nope.yaml"),
        (["demo", "--pairrm", "./nodir"], "--pairrm: file not found: ./nodir"),
        (["demo", "--bogus", "1"], "unrecognized arguments: --bogus 1 (see pairrm-rlhf demo --help)"),
        (
            ["bench", "--shape", "huge"],
            "--shape: must be one of tiny, xsmall, base, real (PairRM: 24 layers, hidden 1024, 16 heads) or real:N "
            "(the real width, N layers), got 'huge'",
        ),
        (
            ["bench", "--workloads", "typical,huge"],
            "--workloads: must be a comma list of short, typical, long, got 'typical,huge'",
        ),
        (
            ["bench", "--dtypes", "int8"],
            "--dtypes: must be one of auto, float32, fp32, bfloat16, bf16, float16, fp16, got 'int8'",
        ),
    ],
)
def test_bad_configuration_is_one_line_before_any_model_loads(capsys, tmp_path, no_model_loads, argv, message):
    data = tmp_path / "rb.jsonl"
    data.write_text(json.dumps({"subset": "alpacaeval-easy", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    argv = [str(data) if a == "DATA" else a for a in argv]
    message = message.replace("DATA", str(data))
    code, _, err = run_cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1
    assert lines[0] == f"pairrm-rlhf {argv[0]}: error: {message}" or (
        argv[1] == "--config" and lines[0].startswith(f"pairrm-rlhf {argv[0]}: error: {message} (bundled configs: ")
    )


def test_config_file_values_and_flags(capsys, tmp_path, no_model_loads):
    config = tmp_path / "eval.yaml"
    config.write_text("data: missing.jsonl\nbootstrap: 5\n")
    code, _, err = run_cli(capsys, "eval", "--config", str(config))
    assert code == 2 and err.strip() == "pairrm-rlhf eval: error: --data: file not found: missing.jsonl"
    config.write_text("data: missing.jsonl\nnot_a_field: 1\n")
    code, _, err = run_cli(capsys, "eval", "--config", str(config))
    assert code == 2 and "not_a_field" in err and len(err.strip().splitlines()) == 1


def test_demo_prints_tables(capsys):
    code, out, _ = run_cli(capsys, "demo", "--pairrm_device", "cpu")
    assert code == 0
    assert "compare(A, B)" in out and "P(A>B)" in out and "#1" in out and "#4" in out


def test_demo_loads_no_datasets_trainers_or_web_stack():
    code = (
        "import sys\n"
        "from pairrm_rlhf.cli import load_command\n"
        "parser, run = load_command('demo')\n"
        "args = parser.parse_args_and_config(['--pairrm_device', 'cpu'])\n"
        "heavy = sorted(m for m in ('datasets', 'pyarrow', 'starlette', 'uvicorn', 'matplotlib') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_each_log_record_is_printed_once():
    """The CLI's handler skips records a library's own handler prints (datasets adds a StreamHandler and propagates)."""
    code = (
        "import logging\n"
        "from pairrm_rlhf.cli import setup_logging\n"
        "setup_logging(); setup_logging()\n"
        "import datasets\n"
        "logging.getLogger('datasets.builder').warning('W-datasets')\n"
        "logging.getLogger('pairrm_rlhf.evaluation').warning('W-ours')\n"
        "logging.getLogger('pairrm_rlhf.evaluation').debug('D-ours')\n"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert err.count("W-datasets") == 1 and err.count("W-ours") == 1 and "D-ours" not in err


@pytest.mark.slow
def test_a_warning_from_a_real_command_is_printed_once(tmp_path):
    """End to end: `eval` skips an unrenderable example with one warning line."""
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pairrm_rlhf.cli",
            "eval",
            "--data",
            str(data),
            "--pairrm",
            "tiny",
            "--pairrm_device",
            "cpu",
            "--bootstrap",
            "0",
            "--no_plots",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("skipping example 1") == 1


def test_progress_policy(monkeypatch):
    logger = logging.getLogger("pairrm_rlhf.test_progress")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    logger.setLevel(logging.WARNING)
    assert progress_enabled(True, 1, logger) and not progress_enabled(False, 10, logger)  # explicit wins
    assert not progress_enabled(None, 10, logger)  # nobody watching
    assert not progress_enabled(None, 1, logger)  # one step: no bar
    logger.setLevel(logging.INFO)
    assert progress_enabled(None, 2, logger)  # INFO logging shows it
    logger.setLevel(logging.WARNING)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_enabled(None, 2, logger)  # a terminal shows it
    assert not progress_enabled(None, 1, logger)


def test_docstring_examples_run():
    import doctest

    from pairrm_rlhf import bench
    from pairrm_rlhf.core import progress
    from pairrm_rlhf.evaluation import report, sections

    for module in (progress, sections, report, bench):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted >= 1, module.__name__
