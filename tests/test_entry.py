"""One entry-point convention (`core.entry`) for every command and recipe, run as a user runs them (subprocesses,
HF_HUB_OFFLINE=1, an empty hub cache): a bad value, a bad or busy port, an unreachable hub id and a missing device
each end in exactly one line on stderr and exit code 2, with no traceback and before any model loads; `pairrm-rlhf
--help` and an argument error import no torch; Ctrl-C during `label` says how to resume, and resuming gives the
uninterrupted result; the TRL-CLI reward functions check their environment when looked up; a recipe's output ends
with its summary, without known third-party warnings or TRL's per-step dicts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLI = [str(BIN / "pairrm-rlhf")] if (BIN / "pairrm-rlhf").exists() else [sys.executable, "-m", "pairrm_rlhf.cli"]
HUB_MISSING = (
    "nobody/nothing is not in the hub cache and HF_HUB_OFFLINE is set: use 'tiny', a local directory, or "
    "download it once without HF_HUB_OFFLINE"
)
LABEL = ["--dataset", "tiny", "--policy", "tiny", "--pairrm", "tiny", "--output_path", "OUT"]


def recipe(name: str) -> list[str]:
    return [sys.executable, str(REPO / "recipes" / f"{name}.py"), "--config", f"{name}_smoke", "--output_dir", "OUT"]


def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache"),
        "OMP_NUM_THREADS": "1",
    }


def run(argv: list[str], tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    argv = [str(tmp_path / "out") if a == "OUT" else str(tmp_path / "d.jsonl") if a == "DATA" else a for a in argv]
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    return subprocess.run(argv, capture_output=True, text=True, env=env(tmp_path), timeout=timeout, cwd=tmp_path)


# (entry point, what is wrong) -> argv and the one line it must print. The table in docs/architecture.md ("Errors")
# is this list.
CASES = {
    ("pairrm-rlhf demo", "bad value"): (CLI + ["demo", "--examples", "9"], "--examples: must be 1..3, got 9"),
    ("pairrm-rlhf demo", "hub id"): (CLI + ["demo", "--pairrm", "nobody/nothing"], f"--pairrm: {HUB_MISSING}"),
    ("pairrm-rlhf bench", "bad value"): (
        CLI + ["bench", "--shape", "huge"],
        "--shape: must be one of tiny, xsmall, base, real (PairRM: 24 layers, hidden 1024, 16 heads) or real:N "
        "(the real "
        "width, N layers), got 'huge'",
    ),
    ("pairrm-rlhf label", "bad value"): (
        CLI + ["label", *LABEL, "--num_responses", "1"],
        "--num_responses: 1 is below 2",
    ),
    ("pairrm-rlhf label", "hub id"): (
        CLI + ["label", *LABEL, "--policy", "nobody/nothing"],
        f"--policy: {HUB_MISSING}",
    ),
    ("pairrm-rlhf label", "push"): (
        CLI + ["label", *LABEL, "--push_to_hub", "me/x"],
        "--push_to_hub me/x: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it or drop --push_to_hub",
    ),
    ("pairrm-rlhf serve", "bad value"): (
        CLI + ["serve", "--pairrm", "tiny", "--max_wait_ms", "-1"],
        "--max_wait_ms must be >= 0, got -1.0",
    ),
    ("pairrm-rlhf serve", "bad port"): (
        CLI + ["serve", "--pairrm", "tiny", "--port", "99999"],
        "--port 99999: must be 0..65535 (0: any free port)",
    ),
    ("pairrm-rlhf serve", "busy port"): (
        CLI + ["serve", "--pairrm", "tiny", "--port", "BUSY"],
        "--port BUSY: cannot listen on 127.0.0.1:BUSY: Address already in use (is "
        "another server on it? pick another port, or 0 for any free one)",
    ),
    ("pairrm-rlhf serve", "hub id"): (
        CLI + ["serve", "--pairrm", "nobody/nothing", "--port", "0"],
        f"--pairrm: {HUB_MISSING}",
    ),
    ("pairrm-rlhf eval", "bad value"): (
        CLI + ["eval", "--data", "DATA", "--ties", "maybe"],
        "--ties: must be one of skip, margin, got 'maybe'",
    ),
    ("pairrm-rlhf eval", "hub id"): (
        CLI + ["eval", "--data", "DATA", "--pairrm", "nobody/nothing"],
        f"--pairrm: {HUB_MISSING}",
    ),
    ("python -m pairrm_rlhf.labeling.command", "bad value"): (
        [sys.executable, "-m", "pairrm_rlhf.labeling.command", *LABEL, "--strategy", "best"],
        "--strategy: must be one of best_vs_worst, best_vs_random, best_vs_second, all_pairs, max_min_p, got 'best'"),
    ("python -m pairrm_rlhf.evaluation.command", "bad value"): (
        [sys.executable, "-m", "pairrm_rlhf.evaluation.command", "--data", "DATA", "--orders", "three"],
        "--orders: must be one of both, single, got 'three'",
    ),
    ("python -m pairrm_rlhf.serve.command", "bad port"): (
        [sys.executable, "-m", "pairrm_rlhf.serve.command", "--pairrm", "tiny", "--port", "-1"],
        "--port -1: must be 0..65535 (0: any free port)",
    ),
    ("python -m pairrm_rlhf.bench", "bad value"): (
        [sys.executable, "-m", "pairrm_rlhf.bench", "--shape", "huge"],
        "--shape: must be one of tiny, xsmall, base, real (PairRM: 24 layers, hidden 1024, 16 heads) or "
        "real:N (the real width, N layers), got 'huge'",
    ),
    ("recipes/online_dpo.py", "bad value"): (
        recipe("online_dpo") + ["--reward", "vote"],
        "--reward must be one of judge, reference, got 'vote'",
    ),
    ("recipes/online_dpo.py", "hub id"): (
        recipe("online_dpo") + ["--model_name_or_path", "nobody/nothing"],
        f"--model_name_or_path: {HUB_MISSING}",
    ),
    ("recipes/ppo.py", "bad value"): (
        recipe("ppo") + ["--reward_output", "score"],
        "--reward_output must be one of probability, logit, win, got 'score'",
    ),
    ("recipes/ppo.py", "hub id"): (recipe("ppo") + ["--pairrm", "nobody/nothing"], f"--pairrm: {HUB_MISSING}"),
    ("recipes/iterative_dpo.py", "bad value"): (
        recipe("iterative_dpo") + ["--prompt_schedule", "random"],
        "--prompt_schedule must be one of disjoint, same, got 'random'",
    ),
    ("recipes/iterative_dpo.py", "hub id"): (
        recipe("iterative_dpo") + ["--eval_pairrm", "nobody/nothing"],
        f"--eval_pairrm: {HUB_MISSING}",
    ),
    ("recipes/grpo.py", "bad value"): (
        recipe("grpo") + ["--reward_mode", "grup"],
        "--reward_mode must be one of reference, group, got 'grup'",
    ),
    ("recipes/grpo.py", "hub id"): (
        recipe("grpo") + ["--model_name_or_path", "nobody/nothing"],
        f"--model_name_or_path: {HUB_MISSING}",
    ),
    ("recipes/grpo.py", "argparse"): (
        recipe("grpo") + ["--max_steps", "two"],
        "argument --max_steps/--max-steps: invalid int value: 'two'",
    ),
}


PROG = {
    "python -m pairrm_rlhf.labeling.command": "pairrm-rlhf label",
    "python -m pairrm_rlhf.bench": "pairrm-rlhf bench",
    "python -m pairrm_rlhf.evaluation.command": "pairrm-rlhf eval",
    "python -m pairrm_rlhf.serve.command": "pairrm-rlhf serve",
}


@pytest.mark.parametrize(
    "entry, problem",
    [
        pytest.param(e, p, id=f"{e} {p}", marks=[pytest.mark.slow] if e.startswith("recipes/") else [])  # ~15 s each
        for e, p in CASES
    ],
)
def test_every_entry_point_fails_in_one_line_with_exit_2(entry, problem, tmp_path):
    argv, message = CASES[entry, problem]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = str(busy.getsockname()[1])
    with busy:
        result = run([port if a == "BUSY" else a for a in argv], tmp_path)
    prog = Path(entry).name if entry.startswith("recipes/") else PROG.get(entry, entry)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(lines) == 1, result.stderr[-3000:]  # no model, no log line
    assert lines[0] == f"{prog}: error: {message.replace('BUSY', port)}"


def test_a_missing_cuda_is_one_line_naming_the_flag(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
    expected = f"--pairrm_device cuda: {why}; use cpu, or leave the flag unset to pick the device"
    for argv, prog in (
        (CLI + ["demo", "--pairrm_device", "cuda"], "pairrm-rlhf demo"),
        (recipe("grpo") + ["--pairrm_device", "cuda"], "grpo.py"),
    ):
        result = run(argv, tmp_path)
        assert result.returncode == 2 and result.stderr.strip() == f"{prog}: error: {expected}", result.stderr[-3000:]


# ---- startup ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [["--help"], ["demo", "--examples", "9"], ["nope"], ["label", "--help"], ["label", "--num_responses", "two"]],
)
def test_help_and_argument_errors_import_no_torch(argv):
    """The falsifiable form of "`pairrm-rlhf --help` answers in well under a second" (benchmarks/cli_startup.py
    measures it): nothing heavy is imported."""
    code = (
        "import sys\n"
        "from pairrm_rlhf.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'starlette') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == f"{0 if argv[-1] == '--help' else 2} []", result.stdout


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_during_label_says_how_to_resume_and_resuming_gives_the_same_dataset(tmp_path):
    argv = CLI + [
        "label",
        "--dataset",
        "tiny",
        "--policy",
        "tiny",
        "--pairrm",
        "tiny",
        "--num_responses",
        "3",
        "--max_new_tokens",
        "12",
        "--chunk_size",
        "2",
        "--pairrm_device",
        "cpu",
        "--policy_device",
        "cpu",
    ]
    interrupted, whole = tmp_path / "interrupted.jsonl", tmp_path / "whole.jsonl"
    process = subprocess.Popen(
        argv + ["--output_path", str(interrupted)],
        env=env(tmp_path),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    chunks = tmp_path / "interrupted.jsonl.chunks"
    deadline = time.monotonic() + 240
    while not list(chunks.glob("chunk-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "label finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "pairrm-rlhf label: interrupted; rerun the same command to resume"
    )
    assert not interrupted.exists() and 1 <= len(list(chunks.glob("chunk-*.arrow"))) < 16  # stopped mid-run

    resumed = subprocess.run(
        argv + ["--output_path", str(interrupted)], env=env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0 and "resum" in resumed.stderr.lower(), resumed.stderr[-3000:]
    fresh = subprocess.run(
        argv + ["--output_path", str(whole)], env=env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert interrupted.read_text() == whole.read_text()


# ---- the TRL CLI's reward functions -----------------------------------------------------------------------------
def test_trl_cli_reward_functions_check_the_environment_when_looked_up(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from pairrm_rlhf.trl import rewards

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    for key in rewards.ENV_VARS:
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(
        OSError,
        match="^PAIRRM_MODEL is not set and its default: llm-blender/PairRM-hf is not in the "
        "hub cache and HF_HUB_OFFLINE is set: use 'tiny'",
    ):
        _ = rewards.pairrm_reference_reward  # what TRL's `--reward_funcs module.name` does
    monkeypatch.setenv("PAIRRM_MODEL", "./no/such/dir")
    with pytest.raises(FileNotFoundError, match="^PAIRRM_MODEL: file not found: ./no/such/dir$"):
        _ = rewards.pairrm_group_reward
    monkeypatch.setenv("PAIRRM_MODEL", "tiny")
    assert rewards.pairrm_reference_reward.__name__ == "pairrm_reference_reward"  # TRL's metric names
    with pytest.raises(AttributeError):
        _ = rewards.pairrm_no_such_reward


# ---- what a recipe prints --------------------------------------------------------------------------------------
NOISE = (
    "FutureWarning",
    "Removed shared tensor",
    "Setting accelerator to CPU",
    "{'loss'",
    "{'train_runtime'",
    "Traceback",
)
SUMMARY_START = {"grpo": "GRPO: ", "ppo": "PPO: "}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SUMMARY_START))
def test_a_recipe_run_ends_with_its_summary_and_no_known_noise(name, tmp_path):
    """GRPO (TRL's log dicts, transformers' FutureWarning, DeepSpeed's CPU warning) and PPO (checkpoints of a tied
    policy: "Removed shared tensor") on the smoke configs: stdout and stderr together, in order."""
    argv = recipe(name)
    argv[argv.index("OUT")] = str(tmp_path / "out")
    result = subprocess.run(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env(tmp_path), timeout=600
    )
    output = result.stdout
    assert result.returncode == 0, output[-4000:]
    assert not [n for n in NOISE if n in output], [
        line for line in output.splitlines() if any(n in line for n in NOISE)
    ]
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    start = max(i for i, line in enumerate(lines) if line.startswith(SUMMARY_START[name]))
    assert any(line.startswith("Saved to ") for line in lines[start:]), lines[start:]
    assert all("%|" not in line and not line.startswith(("INFO", "WARNING")) for line in lines[start:]), lines[start:]


# ---- what counts as a user error --------------------------------------------------------------------------------
def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    import json as third_party  # a module outside this package raises the error

    from huggingface_hub.errors import OfflineModeIsEnabled

    from pairrm_rlhf.core.entry import run_command, user_error

    try:
        third_party.loads("{")
    except ValueError as error:
        assert user_error(error) == (
            "Expecting property name enclosed in double quotes: line 1 column 2 (char 1) "
            "(raised in json.decoder; PAIRRM_RLHF_LOG_LEVEL=DEBUG shows the traceback)"
        )
    assert user_error(OfflineModeIsEnabled("Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled)\nmore")) == (
        "Couldn't reach 'x/y' on the Hub (OfflineModeIsEnabled) ... (offline? use 'tiny', a local directory, or a copy "
        "in the hub cache with HF_HUB_OFFLINE=1)"
    )
    assert user_error(RuntimeError("shape mismatch")) is None and user_error(TypeError("x")) is None
    try:  # a loader that names the model and chains the download's failure
        try:
            raise OfflineModeIsEnabled("no network")
        except OSError as cause:
            raise OSError("cannot load 'a/b': the hub download failed") from cause
    except OSError as error:
        assert user_error(error).endswith(
            "failed (offline? use 'tiny', a local directory, or a copy in the hub cache with HF_HUB_OFFLINE=1)"
        )

    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):  # not swallowed: its traceback is printed as usual
        run_command("prog", bug)

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_command("prog", interrupted, interrupted="rerun to resume")
    assert exit_info.value.code == 130 and capsys.readouterr().err == "prog: interrupted; rerun to resume\n"
