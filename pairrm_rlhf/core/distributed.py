"""The end of a multi-process run: how a script started by `torchrun`/`accelerate launch` must exit.

Why a script cannot simply return. A gloo (or NCCL) worker thread runs each collective and drops its
reference to the work only after the caller has already been woken. When that work holds a tensor whose Python
object was freed meanwhile, the tensor owns the Python object, and dropping it takes the GIL. If the main thread has
begun interpreter finalization by then, CPython (before 3.14) ends the worker with `pthread_exit`; the forced unwind
reaches a `noexcept` destructor and libstdc++ calls `std::terminate`: "terminate called without an active
exception", SIGABRT, after training finished. The core dump of an aborted rank (gloo all-gather, then exit) shows
that path: `~AsyncAllgatherWork` → `TensorImpl::decref_pyobject` → `gil_scoped_acquire` → `take_gil` →
`PyThread_exit_thread` → `__gxx_personality_v0` → `std::terminate`; pytorch/pytorch#179291 describes the same.

`destroy_process_group()` does not close the window. It joins the worker threads only when the last reference to the
group goes, and in a training run that never happens: importing `torch._dynamo` while a group exists adds
references to it that are never released (torch 2.13: +10), and DDP's first construction, in every multi-process
TRL trainer, does that import. In a 2-process GRPO run the gloo threads are still running after
`destroy_process_group()`, `del trainer` and `gc.collect()`. So `end_distributed_run` does what an orderly
interpreter exit does for the user's data (non-daemon threads joined, `atexit` handlers such as trackers and
temporary directories run, logging and stdio flushed) and then leaves with `os._exit`, without the finalization in
which a worker thread can abort the process.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def cpu_deepspeed_backend() -> str | None:
    """"gloo" when DeepSpeed is requested (`ACCELERATE_USE_DEEPSPEED=true`, as `accelerate launch --use_deepspeed`
    sets it) and torch sees no accelerator; else None (accelerate's own choice: NCCL on GPUs).

    Why: for a non-CPU run accelerate asks the accelerator for its backend (`PartialState._prepare_backend`); on a
    machine without one it finds none, and "no backend" means "no distributed training": every rank reports
    num_processes=1 and process_index=0 while DeepSpeed's own process group spans all of them. Naming gloo makes it a
    real multi-process run (ZeRO-3 on CPU: the multi-process tests). PPO passes it to its `Accelerator`; the TRL
    recipes default `--ddp_backend` to it."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    import torch

    return None if torch.accelerator.is_available() else "gloo"


def _process_group_initialized() -> bool:
    if "torch.distributed" not in sys.modules:  # no torch.distributed imported: no process group (and no torch import)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def end_distributed_run() -> None:
    """End a script that runs in a process group: wait for every process, destroy the group, and exit with code 0.

    Call it as the last statement of a multi-process script, after everything is saved. Without a process group
    (a single-process run) it does nothing and returns, so a script can call it unconditionally.

    Steps: the non-daemon threads joined (as at interpreter exit), a barrier (no process leaves while another still
    uses the group), `destroy_process_group()`, the `atexit` handlers run (trackers, temporary directories,
    logging), stdout and stderr flushed, then `os._exit(0)`: the interpreter's finalization, during which a
    collective's worker thread can abort the process with SIGABRT, never starts (see the module docstring).
    """
    if not _process_group_initialized():
        return
    import torch.distributed as dist

    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    dist.barrier()
    dist.destroy_process_group()
    atexit._run_exitfuncs()  # what Py_FinalizeEx would run next; includes logging.shutdown
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken stream: nothing left to save
            pass
    os._exit(0)
