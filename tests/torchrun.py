"""Start a test script in several processes with `torch.distributed.run` (offline, one thread per process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def launch(script: Path, *args: str, env: dict | None = None, processes: int = 2) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node <processes> script *args`, output captured."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
