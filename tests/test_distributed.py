"""The end of a multi-process run (`core.distributed`): a collective's worker thread that enters Python after the
script's last statement aborts the process with SIGABRT ("terminate called without an active exception") once the
interpreter is finalizing; `end_distributed_run` ends without finalization, after doing what an orderly exit does
for the user's data."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from torchrun import REPO, launch

# In a real run the window is the worker's own decref of a tensor owned by a Python object, microseconds after it
# has woken the caller; under load the worker can be descheduled there for longer than the barrier, the group's
# destruction and the start of finalization take. This script makes the worker enter Python during finalization
# every time: the work belongs to a second group (the final barrier on the default group does not wait for it), and
# after waking the caller the worker runs a Python callback that waits until the interpreter is finalizing.
SCRIPT = """
import atexit, os, sys, threading, time
import torch
import torch.distributed as dist

out, ending = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
dist.init_process_group("gloo")
side = dist.new_group(backend="gloo")
import torch._dynamo  # imported after the groups exist, as in a TRL run: they outlive destroy_process_group


class SlowFinalization:  # a module global: its __del__ runs during interpreter finalization and takes 1 s
    def __del__(self, sleep=time.sleep):
        sleep(1.0)


def until_finalizing(done, is_finalizing=sys.is_finalizing, sleep=time.sleep):
    while not is_finalizing():
        sleep(0.01)


slow_finalization = SlowFinalization()
atexit.register(lambda: open(os.path.join(out, f"atexit{rank}"), "w").close())
late_writer = threading.Thread(target=lambda: (time.sleep(0.3), open(os.path.join(out, f"thread{rank}"), "w").close()))
late_writer.start()  # a non-daemon thread still working at the end: an orderly exit waits for it
tensor = torch.ones(4)
if rank == 0:  # rank 0's side work cannot finish before rank 1 joins it, after the barrier: the callback is in place
    future = dist.all_reduce(tensor, group=side, async_op=True).get_future()
    future.then(until_finalizing)  # the side group's worker runs this after waking the waiter below
    dist.barrier()
    future.wait()
else:
    dist.barrier()
    dist.all_reduce(tensor, group=side)
print(f"rank {rank} done", flush=True)
if ending == "end_distributed_run":
    from pairrm_rlhf.core.distributed import end_distributed_run
    end_distributed_run()
    raise AssertionError("end_distributed_run returned inside a process group")
dist.barrier()  # the ending tried first: barrier and destroy_process_group, then interpreter exit (it aborts)
dist.destroy_process_group()
"""


def run_script(tmp_path: Path, ending: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ending.py"
    script.write_text(textwrap.dedent(SCRIPT))
    return launch(script, str(tmp_path), ending)


@pytest.mark.multiprocess
def test_end_distributed_run_survives_a_worker_still_busy_at_exit(tmp_path):
    proc = run_script(tmp_path, "end_distributed_run")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "rank 0 done" in output and "rank 1 done" in output
    for rank in (0, 1):  # what an orderly exit does for the user still happened
        assert (tmp_path / f"atexit{rank}").exists(), f"rank {rank}: atexit handlers did not run"
        assert (tmp_path / f"thread{rank}").exists(), f"rank {rank}: a non-daemon thread was not waited for"


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.version_info >= (3, 14), reason="CPython 3.14+ parks such a thread instead of pthread_exit")
def test_interpreter_exit_aborts_when_a_worker_enters_python(tmp_path):
    """The hazard itself, on this interpreter: the barrier + destroy_process_group ending aborts."""
    proc = run_script(tmp_path, "barrier_and_destroy")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "terminate called without an active exception" in output, output[-4000:]
    assert "SIGABRT" in output and "local_rank: 0" in output


@pytest.mark.parametrize("setup", ["", "import torch.distributed"])
def test_without_a_process_group_it_returns(setup):
    """A single-process run: nothing to end, the script goes on (in a subprocess, so that a process group some
    other test left in this interpreter can never make it exit pytest)."""
    code = "\n".join([setup, "from pairrm_rlhf.core.distributed import end_distributed_run",
                      "end_distributed_run()", "print('returned')"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "returned", proc.stderr[-2000:]
