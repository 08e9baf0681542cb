"""`serve.batcher.QueueBackend` with a scripted inner backend: fair, bounded batches (a small request is in the next
batch however large the running one), per-request limits, a failing request does not take others down, shutdown."""

import threading
import time

import numpy as np
import pytest
import torch

from pairrm_rlhf import PairBackend
from pairrm_rlhf.serve.batcher import QueueBackend, RequestCancelled, RequestTooLarge, Ticket


class Recorder:
    """f(x, A, B) = float(A) - float(B); records every batch; `gate` holds the engine inside a batch until set;
    `lengths` prices pairs in tokens (None: cannot count)."""

    template, device, dtype, max_tokens = "pairrm", torch.device("cpu"), torch.float32, 8192

    def __init__(self, lengths=None):
        self.lengths = lengths
        self.batches: list[list] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        self.batches.append(list(triples))
        self.entered.set()
        self.gate.wait(10)
        if any(a == "boom" for _, a, _ in triples):
            raise ValueError("boom is not a number")
        return np.array([float(a) - float(b) for _, a, b in triples], dtype=np.float32)

    def truncation_rate(self, triples):
        return 0.0

    def pair_lengths(self, triples):
        return None if self.lengths is None else self.lengths(triples)

    def reference_probability(self, triples, temperature, *, batch_size=None):
        return None

    def identity(self):
        return {"backend": "recorder"}


def triples(tag, n, first=0):
    return [(tag, str(first + i), "0") for i in range(n)]


def run(queue, items, out, key):
    try:
        out[key] = queue.score(items)
    except Exception as error:  # noqa: BLE001 - checked by the test
        out[key] = error


def test_queue_is_a_pair_backend_with_the_inner_identity():
    inner = Recorder()
    queue = QueueBackend(inner)
    assert (
        isinstance(queue, PairBackend) and queue.identity() == {"backend": "recorder"} and queue.device == inner.device
    )
    assert (queue.template, queue.dtype, queue.max_tokens) == ("pairrm", torch.float32, 8192)
    assert queue.pair_lengths(triples("t", 2)) is None and queue.reference_probability(triples("t", 1), 1.0) is None


def test_small_request_goes_into_the_next_batch_while_a_large_one_runs():
    inner = Recorder()
    queue = QueueBackend(inner, max_batch_pairs=8, max_wait_ms=0).start()
    out = {}
    try:
        inner.gate.clear()
        big = threading.Thread(target=run, args=(queue, triples("big", 200), out, "big"))
        big.start()
        assert inner.entered.wait(10)  # the engine is inside the big request's first batch
        small = threading.Thread(target=run, args=(queue, triples("small", 2, 7), out, "small"))
        small.start()
        time.sleep(0.2)  # the small request is queued behind the running batch
        inner.gate.set()
        small.join(10)
        big.join(10)
    finally:
        queue.stop()
    index = next(i for i, batch in enumerate(inner.batches) if any(s == "small" for s, _, _ in batch))
    assert index == 1  # the very next batch, not after the large request's 25 batches
    assert [len(b) for b in inner.batches][:2] == [8, 8] and len(inner.batches) == 26
    np.testing.assert_array_equal(out["small"], [7.0, 8.0])
    np.testing.assert_array_equal(out["big"], np.arange(200, dtype=np.float32))  # in order, whatever the batches


def test_waiting_requests_share_each_batch_equally():
    inner = Recorder()
    queue = QueueBackend(inner, max_batch_pairs=9, max_wait_ms=0).start()
    out = {}
    try:
        inner.gate.clear()
        first = threading.Thread(target=run, args=(queue, triples("first", 1), out, "first"))
        first.start()
        assert inner.entered.wait(10)
        threads = [threading.Thread(target=run, args=(queue, triples(tag, 30), out, tag)) for tag in "abc"]
        for thread in threads:
            thread.start()
        time.sleep(0.3)
        inner.gate.set()
        for thread in threads + [first]:
            thread.join(10)
    finally:
        queue.stop()
    second = inner.batches[1]
    assert sorted(tag for tag, _, _ in second) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
    for tag in "abc":
        np.testing.assert_array_equal(out[tag], np.arange(30, dtype=np.float32))


def test_token_budget_bounds_a_batch_and_oversized_pairs_run_alone():
    inner = Recorder(lengths=lambda items: [int(a) for _, a, _ in items])  # a pair's tokens = its A
    queue = QueueBackend(inner, max_batch_pairs=100, max_batch_tokens=10, max_wait_ms=0).start()
    try:
        got = queue.score([("x", "4", "0"), ("x", "4", "0"), ("x", "4", "0"), ("x", "30", "0"), ("x", "1", "0")])
    finally:
        queue.stop()
    np.testing.assert_array_equal(got, [4, 4, 4, 30, 1])
    assert [sum(int(a) for _, a, _ in b) for b in inner.batches] == [8, 4, 30, 1]  # in order; 30 > 10 runs alone


def test_per_request_limits():
    queue = QueueBackend(Recorder(lambda items: [100] * len(items)), max_pairs=10, max_tokens=500).start()
    try:
        with pytest.raises(RequestTooLarge, match="needs 11 pair forwards; the limit is 10 .--max_pairs."):
            queue.score(triples("t", 11))
        with pytest.raises(RequestTooLarge, match="needs 600 tokens over 6 pair forwards; the limit is 500"):
            queue.score(triples("t", 6))
        assert queue.score(triples("t", 5)).shape == (5,)
        assert queue.score([]).shape == (0,)
    finally:
        queue.stop()


def test_a_failing_request_does_not_fail_the_others_in_its_batch():
    inner = Recorder()
    queue = QueueBackend(inner, max_batch_pairs=64, max_wait_ms=300).start()
    out = {}
    try:
        threads = [
            threading.Thread(target=run, args=(queue, items, out, key))
            for key, items in [("good", triples("g", 3)), ("bad", [("b", "boom", "0")]), ("also", triples("h", 2, 5))]
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    finally:
        queue.stop()
    assert isinstance(out["bad"], ValueError) and "boom" in str(out["bad"])
    np.testing.assert_array_equal(out["good"], [0, 1, 2])
    np.testing.assert_array_equal(out["also"], [5, 6])
    assert len(inner.batches[0]) == 6  # they did share a batch first


def test_stop_fails_queued_requests_and_refuses_new_ones():
    inner = Recorder()
    queue = QueueBackend(inner, max_batch_pairs=1, max_wait_ms=0).start()
    out = {}
    inner.gate.clear()
    thread = threading.Thread(target=run, args=(queue, triples("t", 3), out, "t"))
    thread.start()
    assert inner.entered.wait(10)
    stopper = threading.Thread(target=queue.stop)
    stopper.start()  # waits for the running batch
    time.sleep(0.1)
    inner.gate.set()
    stopper.join(10)
    thread.join(10)
    assert isinstance(out["t"], RuntimeError) and "shutting down" in str(out["t"])
    with pytest.raises(RuntimeError, match="shutting down"):
        queue.score(triples("t", 1))


def test_cancel_drops_the_queued_pairs_of_a_gone_client_and_lets_the_running_batch_finish():
    inner = Recorder()
    queue = QueueBackend(inner, max_batch_pairs=2, max_wait_ms=0).start()
    ticket, out = Ticket(), {}

    def client():
        with queue.on_behalf(ticket):
            run(queue, triples("gone", 10), out, "gone")

    inner.gate.clear()
    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert inner.entered.wait(10)  # the first batch of 2 is running
        assert queue.cancel(ticket) == 8
        inner.gate.set()
        thread.join(10)
        assert isinstance(out["gone"], RequestCancelled)
        assert queue.score(triples("next", 3)).tolist() == [0, 1, 2]  # the queue goes on
        with queue.on_behalf(ticket), pytest.raises(RequestCancelled):  # later work of a gone client: refused
            queue.score(triples("late", 1))
    finally:
        queue.stop()
    # the running batch finished; the other 8 pairs never ran; then "next" in batches of 2 and 1
    assert [[tag for tag, _, _ in b] for b in inner.batches] == [["gone"] * 2, ["next"] * 2, ["next"]]
    assert queue.stats["pairs"] == 5 and queue.stats["cancelled_pairs"] == 8


class OwnProbability(Recorder):
    """A judge with its own probability rule (like RLHFlow's): P = 0.25 for every triple."""

    def reference_probability(self, triples, temperature, *, batch_size=None):
        self.calls = getattr(self, "calls", []) + [threading.current_thread().name]
        return np.full(len(triples), 0.25)


def test_own_probability_runs_on_the_engine_thread():
    queue = QueueBackend(OwnProbability(), max_pairs=4).start()
    try:
        assert queue.reference_probability(triples("t", 2), 1.0).tolist() == [0.25, 0.25]
        assert queue.backend.calls[-1] == "pairrm-engine"
        with pytest.raises(RequestTooLarge, match="needs 6 pair forwards"):  # both orders of 3 triples
            queue.reference_probability(triples("t", 3), 1.0)
    finally:
        queue.stop()
