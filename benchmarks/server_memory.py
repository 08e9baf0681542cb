"""Peak memory of `pairrm-rlhf serve` under the two memory-amplification attacks of the hardening issue.

1. `values`: C concurrent bodies of S bytes of `{"inputs":[{},{},...]}` (millions of tiny JSON values; each is
   refused, but a plain `json.loads` builds every one of them first).
2. `rank`: C concurrent 33 KiB `/rank` bodies with 128 candidates (16,256 ordered pairs, over the token limit;
   refused, but counting tokens pair by pair builds every pair's token list first).

Starts the server in its own process (the bundled `tiny` PairRM), or attacks `--url` with `--pid` for its memory,
and reports the server's peak resident memory (VmHWM) before and after each attack and the answers' statuses.

    python benchmarks/server_memory.py --concurrency 64 --body_mib 15
    python benchmarks/server_memory.py --url http://127.0.0.1:8123 --pid 12345   # a server started by hand
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).parent))
from server_load import start_server  # noqa: E402


def peak_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


def values_body(size: int) -> bytes:
    return b'{"inputs":[' + b",".join([b"{}"] * ((size - 13) // 3)) + b"]}"


def rank_body(candidates: int = 128) -> bytes:
    """~130 tokens a candidate: 16,256 pairs of ~290 tokens, over even a GPU server's default limit (4.2M)."""
    return json.dumps(
        {"inputs": ["Tell me about the sun. " * 4], "candidates": [[f"{i} " + "x y " * 64 for i in range(candidates)]]}
    ).encode()


def attack(url: str, route: str, body: bytes, concurrency: int, timeout: float) -> Counter:
    statuses: Counter = Counter()
    lock, barrier = threading.Lock(), threading.Barrier(concurrency)

    def client() -> None:
        barrier.wait()
        try:
            status = httpx2.post(
                url + route, content=body, headers={"Content-Type": "application/json"}, timeout=timeout
            ).status_code
        except httpx2.HTTPError as error:
            status = type(error).__name__
        with lock:
            statuses[str(status)] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def run(args: argparse.Namespace) -> dict:
    process, url = (
        (None, args.url.rstrip("/"))
        if args.url
        else start_server(
            argparse.Namespace(
                pairrm="tiny",
                max_batch_pairs=256,
                max_wait_ms=5.0,
                clients=args.concurrency,
                pairrm_device="cpu",
                token=None,
            )
        )
    )
    pid = args.pid if args.url else process.pid
    try:
        httpx2.post(url + "/compare", json={"inputs": ["x"], "candidates_A": ["a"], "candidates_B": ["b"]})  # warm
        result = {"concurrency": args.concurrency, "body_mib": args.body_mib, "baseline_mib": peak_mib(pid)}
        for name, route, body in (
            ("rank", "/rank", rank_body()),  # the smaller first: the peak only grows
            ("values", "/compare", values_body(int(args.body_mib * 2**20))),
        ):
            statuses = attack(url, route, body, args.concurrency, args.timeout)
            result[name] = {"body_bytes": len(body), "statuses": dict(statuses), "peak_mib": peak_mib(pid)}
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    return result


def report(result: dict) -> str:
    lines = [
        "| attack | concurrency | body | answers | server peak RSS |",
        "|---|---|---|---|---|",
        f"| (baseline, warmed up) | | | | {result['baseline_mib']:.0f} MiB |",
    ]
    for name in ("rank", "values"):
        r = result[name]
        lines.append(
            f"| {name} | {result['concurrency']} | {r['body_bytes'] / 2**20:.2f} MiB | {r['statuses']} | "
            f"{r['peak_mib']:.0f} MiB |"
        )
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent attacking requests")
    parser.add_argument("--body_mib", type=float, default=15.0, help="size of each `values` body, MiB")
    parser.add_argument("--url", default=None, help="attack this running server (with --pid) instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="the process id of the server at --url")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.url and args.pid is None:
        raise SystemExit("--url needs --pid (the server's process id, to read its memory)")
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
