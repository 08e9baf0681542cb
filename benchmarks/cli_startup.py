"""How fast the command line answers when nothing needs to load: `pairrm-rlhf --help` and an argument error.

    python benchmarks/cli_startup.py            # 10 runs of each, median and range in seconds
    python benchmarks/cli_startup.py --runs 20

Each run is a fresh process (the installed `pairrm-rlhf` console script, else `python -m pairrm_rlhf.cli`), timed
from start to exit, so it includes the interpreter's own start. The test that keeps this fast without timing
anything is tests/test_entry.py::test_help_and_argument_errors_import_no_torch (no torch, transformers or datasets
imported).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CLI = [str(BIN / "pairrm-rlhf")] if (BIN / "pairrm-rlhf").exists() else [sys.executable, "-m", "pairrm_rlhf.cli"]
CASES = {
    "pairrm-rlhf --help": (["--help"], 0),
    "pairrm-rlhf demo --examples 9 (argument error)": (["demo", "--examples", "9"], 2),
    "pairrm-rlhf demo --help": (["demo", "--help"], 0),
    "pairrm-rlhf label --help": (["label", "--help"], 0),
}


def time_once(argv: list[str], expected_code: int) -> float:
    start = time.perf_counter()
    result = subprocess.run(CLI + argv, capture_output=True)
    elapsed = time.perf_counter() - start
    if result.returncode != expected_code:
        raise SystemExit(f"{argv}: exit code {result.returncode}, expected {expected_code}: {result.stderr[-500:]!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="processes per case")
    runs = parser.parse_args().runs
    print(f"{'case':48} {'median s':>9} {'min s':>7} {'max s':>7}  ({runs} runs)")
    for name, (argv, code) in CASES.items():
        times = [time_once(argv, code) for _ in range(runs)]
        print(f"{name:48} {statistics.median(times):9.3f} {min(times):7.3f} {max(times):7.3f}")


if __name__ == "__main__":
    main()
