"""How often a multi-process run aborts at its end (#15.5), by the way it ends.

Each run starts `--processes` gloo processes (spawned, CPU) that import `torch._dynamo` after the group exists (as
DDP does in a TRL run), all-gather one Python-created tensor, and end in one of three ways:

- `return`: the script just ends;
- `barrier_and_destroy`: `dist.barrier()` and `dist.destroy_process_group()`, then the script ends;
- `end_distributed_run`: `pairrm_rlhf.core.distributed.end_distributed_run()`.

A process that exits with SIGABRT ("terminate called without an active exception") counts as an abort. The race is
rare and load-dependent: run it with more processes than cores.

    python benchmarks/exit_race.py --runs 40 --processes 5
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ENDINGS = ("return", "barrier_and_destroy", "end_distributed_run")


def worker(rank: int, world: int, port: int, ending: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    importlib.import_module("torch._dynamo")  # after the group exists: the group now outlives destroy_process_group

    gathered = [torch.empty(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    if ending == "barrier_and_destroy":
        dist.barrier()
        dist.destroy_process_group()
    elif ending == "end_distributed_run":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from pairrm_rlhf.core.distributed import end_distributed_run

        end_distributed_run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per ending")
    parser.add_argument("--processes", type=int, default=5, help="processes per run")
    parser.add_argument("--endings", nargs="+", choices=ENDINGS, default=list(ENDINGS))
    args = parser.parse_args()
    context = mp.get_context("spawn")
    aborts = {ending: 0 for ending in args.endings}
    failures = {ending: 0 for ending in args.endings}
    for _ in range(args.runs):
        for ending in args.endings:  # interleaved, so that every ending sees the same load
            port = free_port()
            procs = [context.Process(target=worker, args=(rank, args.processes, port, ending))
                     for rank in range(args.processes)]
            for proc in procs:
                proc.start()
            for proc in procs:
                proc.join(timeout=300)
            codes = [proc.exitcode for proc in procs]
            aborts[ending] += sum(code == -signal.SIGABRT for code in codes)
            failures[ending] += sum(code not in (0, -signal.SIGABRT) for code in codes)
    exits = args.runs * args.processes
    for ending in args.endings:
        print(f"{ending:>22}: {aborts[ending]} SIGABRT, {failures[ending]} other failures in {exits} process exits "
              f"({args.runs} runs x {args.processes} processes, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
