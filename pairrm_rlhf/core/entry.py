"""How every command and recipe starts and ends: one log handler, parsing with one-line errors, exit codes.

Every entry point (`pairrm-rlhf demo | bench | label | serve | eval`, `python -m pairrm_rlhf.<room>.command`, the
scripts in `recipes/`) has the same shape, after TRL's `trl/cli` commands (a parser built only for the command that
runs, then its run function):

    def main(argv=None):
        run_command("pairrm-rlhf label", lambda: run_label(*parse(make_parser(), argv, "pairrm-rlhf label")),
                    interrupted="rerun the same command to resume")

`run_command` installs the one log handler (`setup_logging`), runs the command and turns its end into an exit code:

- a user error (a bad value or flag, a missing file, a hub id that cannot be reached, a port that cannot be bound, a
  missing optional extra: `ValueError`, `OSError`, `ImportError`, a YAML error) prints one line,
  `<prog>: error: <what and where>`, and exits 2, before any model loads when the command checks first (they do);
  `PAIRRM_RLHF_LOG_LEVEL=DEBUG` also logs the traceback;
- Ctrl-C prints `<prog>: interrupted` (with the command's hint) and exits 130, the shell's code for SIGINT;
- anything else is a bug and keeps its traceback.

A process's last statement (`pairrm-rlhf`, a module's or recipe's `__main__`) is then
`core.distributed.end_distributed_run()`: the orderly end under `torchrun` / `accelerate launch`, nothing otherwise;
`run_command` itself returns, so a script may call a command's `main` and go on.

Parsing (`parse`): `--config NAME` also finds the configs shipped in the package (`resolve_config`), an argparse
error is the same one line (not a usage block), unknown flags are an error. Checks that need the environment
(`check_device`, `check_hub_id`) run before anything loads. Nothing here imports torch, TRL or the hub client at
module level, so `pairrm-rlhf --help` and argument errors answer without loading them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .assets import TINY, looks_local

logger = logging.getLogger(__name__)

EXIT_USAGE = 2  # argparse's code for a bad command line; used for every user error
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
LOG_LEVEL_ENV = "PAIRRM_RLHF_LOG_LEVEL"
OWN_CHECKS = ("pairrm_rlhf", "__main__", "_common")  # this package and the recipe scripts: messages name the flag
PARSING = ("argparse", "trl.scripts", "yaml")  # TrlParser, argparse and YAML report the command line or config
NETWORK_HINT = "offline? use 'tiny', a local directory, or a copy in the hub cache with HF_HUB_OFFLINE=1"


# ---- logging --------------------------------------------------------------------------------------------------
def setup_logging(level: int | str | None = None) -> None:
    """One handler on the root logger (idempotent), skipping records a library's own handler already prints.

    `level` defaults to `$PAIRRM_RLHF_LOG_LEVEL`, else INFO.
    """
    root = logging.getLogger()
    if level is None:
        level = os.environ.get(LOG_LEVEL_ENV, "INFO").upper()
    root.setLevel(level)
    if any(isinstance(h, _StderrHandler) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_not_printed_elsewhere)
    root.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (tests and notebooks replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _not_printed_elsewhere(record: logging.LogRecord) -> bool:
    """False when a logger between the record's and the root has a real handler (it printed the record already)."""
    current = logging.getLogger(record.name)
    while current is not None and current is not logging.getLogger():
        if any(not isinstance(h, logging.NullHandler) for h in current.handlers):
            return False
        if not current.propagate:
            break
        current = current.parent
    return True


# ---- parsing --------------------------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each default once: not after a help text that already states its default; a stray `%` is not a crash;
    a `--no_X` flag says what it does instead of repeating `--X`'s help."""

    def _get_help_string(self, action):
        if (
            isinstance(action, argparse._StoreFalseAction)
            and action.option_strings[0].startswith("--no_")
            and action.default is not argparse.SUPPRESS
        ):  # SUPPRESS: a command wrote this flag's own help
            return f"set {action.dest} to False (the same as --{action.dest} false)"
        help_text = action.help or ""
        return help_text if "default:" in help_text.lower() else super()._get_help_string(action)

    def _expand_help(self, action):
        try:
            return super()._expand_help(action)
        except (TypeError, ValueError, KeyError):
            return self._get_help_string(action)


def parse(parser: Any, argv: list[str] | None = None, prog: str | None = None) -> tuple[Any, ...]:
    """The dataclasses of a `trl.TrlParser` from `argv` (default `sys.argv[1:]`), with this package's conventions:
    `--config NAME` may name a bundled config, every error (argparse's too) is a one-line `ValueError`, and unknown
    flags are an error. `prog` names the command in `--help` and in errors."""
    if prog:
        parser.prog = prog
    parser.formatter_class = HelpFormatter
    parser.error = _raise_usage_error  # argparse prints a usage block and exits; we want one line
    argv = resolve_config(list(sys.argv[1:] if argv is None else argv))
    *values, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)} (see {parser.prog} --help)")
    return tuple(values)


def _raise_usage_error(message: str) -> None:
    raise ValueError(message)


def bundled_configs() -> dict[str, str]:
    """Config files shipped with the package (`pairrm_rlhf/configs/*.yaml`), by name without the extension."""
    from importlib import resources

    folder = resources.files("pairrm_rlhf") / "configs"
    return (
        {p.name.rsplit(".", 1)[0]: str(p) for p in folder.iterdir() if p.name.endswith(".yaml")}
        if folder.is_dir()
        else {}
    )


def resolve_config(argv: list[str]) -> list[str]:
    """`argv` with `--config NAME` replaced by the bundled config of that name when NAME is not a file.

    A missing file is a one-line `FileNotFoundError` naming the flag and the known names.
    """
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" or arg.startswith("--config="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else None)
            if value is None:
                raise ValueError("--config needs a YAML file or a bundled config name")
            if not Path(value).expanduser().is_file():
                known = bundled_configs()
                if value not in known:
                    raise FileNotFoundError(
                        f"--config: file not found: {value} (bundled configs: {', '.join(sorted(known)) or 'none'})"
                    )
                value = known[value]
            argv[i : i + (1 if "=" in arg else 2)] = ["--config", value]
            break
    return argv


# ---- checks that need the environment (run before anything loads) --------------------------------------------
def check_device(device: str | None, flag: str) -> None:
    """A one-line ValueError when `device` (cpu, cuda, cuda:N, mps) does not exist on this machine."""
    if device is None or device == "cpu":
        return
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"{flag} {device}: {why}; use cpu, or leave the flag unset to pick the device")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} mps: MPS is not available here; use cpu")


def check_hub_id(name: str | None, flag: str, repo_type: str = "model") -> None:
    """With `HF_HUB_OFFLINE` set, a one-line OSError when `name` is a hub id that is not in the local hub cache
    (nothing can be downloaded, so loading would fail later and at length). `tiny`, local paths and, online, every
    hub id pass: the download itself reports a repository that does not exist."""
    if not name or name == TINY or looks_local(name) or Path(name).expanduser().exists():
        return
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if not constants.HF_HUB_OFFLINE:
        return
    if not (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=name, repo_type=repo_type) / "snapshots").is_dir():
        raise OSError(
            f"{flag}: {name} is not in the hub cache and HF_HUB_OFFLINE is set: use 'tiny', a local "
            "directory, or download it once without HF_HUB_OFFLINE"
        )


def check_hub_push(repo_id: str, flag: str, private: bool = True, repo_type: str = "dataset") -> None:
    """Before anything is computed: a one-line OSError unless this machine can push to `repo_id` (a token that may
    write, and the repo created now or already there: `whoami` and `create_repo(exist_ok=True)`)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import LocalTokenNotFoundError

    if constants.HF_HUB_OFFLINE:
        raise OSError(f"{flag} {repo_id}: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it or drop {flag}")
    api = HfApi()
    try:
        role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
        if role == "read":
            raise OSError("the hub token is read-only")
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    except Exception as error:
        why = (
            "no hub token found"
            if isinstance(error, LocalTokenNotFoundError)
            else (str(error).strip().splitlines() or [type(error).__name__])[0]
        )
        raise OSError(
            f"{flag} {repo_id}: cannot push there: {why} (log in with `hf auth login` or set HF_TOKEN to a "
            "token that can write)"
        ) from error


# ---- running --------------------------------------------------------------------------------------------------
def user_error(error: BaseException) -> str | None:
    """The one line to print for an error the user can fix (bad value, missing file, hub or network, port, missing
    extra), or None for a bug (keep its traceback)."""
    yaml = sys.modules.get("yaml")
    user_types: tuple[type, ...] = (ValueError, OSError, ImportError) + ((yaml.YAMLError,) if yaml else ())
    if not isinstance(error, user_types):
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = (lines[0] + (" ..." if len(lines) > 1 else "")) if lines else type(error).__name__
    if _is_network(error):
        if "HF_HUB_OFFLINE" not in message:
            message += f" ({NETWORK_HINT})"
    elif (origin := _raised_in(error)) is not None:  # not one of our checks: say where, and how to see more
        message += f" (raised in {origin}; {LOG_LEVEL_ENV}=DEBUG shows the traceback)"
    return message


def _raised_in(error: BaseException) -> str | None:
    """The third-party module that raised `error` (e.g. `transformers.trainer`), or None when this package, a recipe
    script or the standard library's argument parsing did."""
    tb = error.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return None if module.split(".")[0] in OWN_CHECKS or module.startswith(PARSING) else module


def _is_network(error: BaseException | None) -> bool:
    """A hub or network failure (the hub client's errors, a connection error, transformers' 'couldn't connect'),
    or an OSError caused by one (a loader that names the model and chains the download's error)."""
    if not isinstance(error, OSError):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ == "LocalEntryNotFoundError":
        return True
    module = type(error).__module__.split(".")[0]
    return (
        module in ("httpx", "httpx2", "requests", "urllib3")
        or bool(re.search(r"couldn't connect|couldn't reach|offline mode", str(error), re.IGNORECASE))
        or (error.__cause__ is not error and _is_network(error.__cause__))
    )


def run_command(prog: str, command: Callable[[], Any], interrupted: str | None = None) -> None:
    """Run `command()` as the entry point `prog` with the package's conventions (see the module docstring).

    Args:
        prog: the name in messages, e.g. `pairrm-rlhf label` or `grpo.py`.
        command: parses its arguments and runs; its return value is ignored.
        interrupted: what to tell the user after Ctrl-C (e.g. how to resume).

    Returns:
        None when the command finished; otherwise exits (2: user error, 130: interrupted).
    """
    setup_logging()
    try:
        command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        message = user_error(error)
        if message is None:
            raise
        logger.debug("%s: user error", prog, exc_info=True)  # PAIRRM_RLHF_LOG_LEVEL=DEBUG shows the traceback
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)
