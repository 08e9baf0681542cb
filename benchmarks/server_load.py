"""Load test of `pairrm-rlhf serve`: N concurrent clients x M mixed requests against a live server.

Starts the server in its own process (the bundled `tiny` PairRM unless `--pairrm` says otherwise; or uses `--url`),
runs the clients as threads, and reports throughput, latency percentiles (overall and per route), errors by status,
and the server's resident memory before and after (from /proc, so Linux only; not measured with `--url`).

    python benchmarks/server_load.py --clients 8 --requests 50
    python benchmarks/server_load.py --url http://rm-0:8000 --token change-me --clients 64 --requests 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx2
import numpy as np

WORDS = ["the", "sun", "is", "a", "star", "ocean", "blue", "tea", "green", "music", "why", "how", "answer", "because"]
ROUTES = ("/compare", "/probability", "/rank", "/rank_with_ref", "/judge", "/pair_logits", "/get_reward")


def text(rng: random.Random, low: int = 3, high: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def request(rng: random.Random) -> tuple[str, dict]:
    """One random request: 1-4 inputs, 2-6 candidates, texts of 3-40 words."""
    n = rng.randint(1, 4)
    xs = [text(rng) for _ in range(n)]
    a, b = [text(rng) for _ in range(n)], [text(rng) for _ in range(n)]
    route = rng.choice(ROUTES)
    if route in ("/compare", "/probability"):
        return route, {"inputs": xs, "candidates_A": a, "candidates_B": b}
    if route in ("/rank", "/rank_with_ref"):
        k = rng.randint(2, 6)
        return route, {"inputs": xs, "candidates": [[text(rng) for _ in range(k)] for _ in xs], "return_scores": True}
    if route == "/judge":
        return route, {"prompts": xs, "completions": [[p, q] for p, q in zip(a, b)], "return_scores": True}
    if route == "/pair_logits":
        return route, {"triples": [[x, p, q] for x, p, q in zip(xs, a, b)], "two_order": True}
    queries = [f"<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n{p}<|im_end|>" for x, p in zip(xs, a)]
    return route, {"query": queries, "references": b}


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable,
        "-m",
        "pairrm_rlhf.serve.command",
        "--pairrm",
        args.pairrm,
        "--port",
        "0",
        "--max_batch_pairs",
        str(args.max_batch_pairs),
        "--max_wait_ms",
        str(args.max_wait_ms),
        "--max_concurrency",
        str(max(64, args.clients)),
    ]
    if args.pairrm_device:
        command += ["--pairrm_device", args.pairrm_device]
    if args.token:
        command += ["--token", args.token]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    log = []
    while True:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError("the server exited before announcing its address:\n" + "".join(log))
        log.append(line)
        if "PairRM server on " in line:
            url = line.split("PairRM server on ")[1].split()[0]
            break
    threading.Thread(target=lambda: process.stderr.read(), daemon=True).start()  # keep draining its log
    for _ in range(600):
        try:
            if httpx2.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx2.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"the server on {url} did not answer /health")


def run(args: argparse.Namespace) -> dict:
    process, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    pid = process.pid if process else None
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        rng = random.Random(args.seed)
        plans = [[request(rng) for _ in range(args.requests)] for _ in range(args.clients)]
        with httpx2.Client(base_url=url, headers=headers, timeout=args.timeout) as warm:  # load, compile, first batch
            for route, body in plans[0][:3]:
                warm.post(route, json=body)
        before, stats_before = rss_mib(pid), httpx2.get(url + "/health").json()
        results: list[tuple[str, int, float]] = []
        lock, barrier = threading.Lock(), threading.Barrier(args.clients)

        def client(plan: list) -> None:
            with httpx2.Client(base_url=url, headers=headers, timeout=args.timeout) as http:
                barrier.wait()
                for route, body in plan:
                    started = time.perf_counter()
                    try:
                        status = http.post(route, json=body).status_code
                    except httpx2.HTTPError as error:
                        status = type(error).__name__
                    with lock:
                        results.append((route, status, time.perf_counter() - started))

        threads = [threading.Thread(target=client, args=(plan,)) for plan in plans]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        after, stats_after = rss_mib(pid), httpx2.get(url + "/health").json()
    finally:
        if process is not None:
            process.terminate()
            process.wait(60)
    latencies = np.array([r[2] for r in results])
    errors = Counter(str(status) for _, status, _ in results if status != 200)
    per_route = {}
    for route in ROUTES:
        times = np.array([r[2] for r in results if r[0] == route])
        if len(times):
            per_route[route] = {
                "n": len(times),
                "p50_ms": 1000 * float(np.percentile(times, 50)),
                "p99_ms": 1000 * float(np.percentile(times, 99)),
            }
    pairs = stats_after["pairs"] - stats_before["pairs"]
    batches = stats_after["batches"] - stats_before["batches"]
    return {
        "clients": args.clients,
        "requests": len(results),
        "seconds": seconds,
        "requests_per_s": len(results) / seconds,
        "pairs_per_s": pairs / seconds,
        "pairs": pairs,
        "batches": batches,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "max_ms": 1000 * float(latencies.max()),
        "errors": dict(errors),
        "rss_before_mib": before,
        "rss_after_mib": after,
        "per_route": per_route,
    }


def report(result: dict) -> str:
    rss = (
        "n/a"
        if result["rss_before_mib"] is None
        else f"{result['rss_before_mib']:.0f} -> {result['rss_after_mib']:.0f} MiB"
    )
    lines = [
        "| clients | requests | s | req/s | pairs/s | p50 ms | p99 ms | max ms | errors | server RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {result['clients']} | {result['requests']} | {result['seconds']:.1f} | {result['requests_per_s']:.1f} | "
        f"{result['pairs_per_s']:.0f} | {result['p50_ms']:.0f} | {result['p99_ms']:.0f} | {result['max_ms']:.0f} | "
        f"{sum(result['errors'].values()) or 0} | {rss} |",
        "",
        "| route | n | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {route} | {r['n']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |" for route, r in result["per_route"].items()
    ]
    if result["errors"]:
        lines.append(f"\nerrors by status: {result['errors']}")
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (threads)")
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--url", default=None, help="an already running server (default: start one)")
    parser.add_argument("--token", default=os.environ.get("PAIRRM_SERVER_TOKEN"), help="the server's token")
    parser.add_argument("--pairrm", default="tiny", help="the judge of the started server")
    parser.add_argument("--pairrm_device", default=None, help="its device")
    parser.add_argument("--max_batch_pairs", type=int, default=256)
    parser.add_argument("--max_wait_ms", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    if args.clients < 1 or args.requests < 1:
        raise SystemExit("--clients and --requests must be >= 1")
    result = run(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
