"""The server's edges: work dies with its client (queued pairs of a gone client are dropped, a retry with the same
Idempotency-Key joins the running computation, shutdown does not wait for abandoned work), the default work limit
fits the device, /health answers under a flood of idle sockets, JSON 503 + Retry-After, one log line for a client
that leaves mid-body, Content-Type and Host checks (DNS rebinding)."""

import logging
import socket
import time

import httpx2
import numpy as np
import pytest

from pairrm_rlhf import PairRM
from pairrm_rlhf.backends.remote import RemoteBackend
from pairrm_rlhf.serve import BackgroundServer, ServeArguments

OK = {"inputs": ["x"], "candidates_A": ["a"], "candidates_B": ["b"], "return_logits": True}


class Slow:
    """The tiny model, `delay` seconds per engine batch: work that takes long enough to walk away from."""

    def __init__(self, inner, delay=0.15):
        self.inner, self.delay = inner, delay
        self.template, self.device, self.dtype, self.max_tokens = "pairrm", inner.device, inner.dtype, inner.max_tokens

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        time.sleep(self.delay)
        return self.inner.score(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)

    def reference_probability(self, triples, temperature, *, batch_size=None):
        return None

    def truncation_rate(self, triples):
        return self.inner.truncation_rate(triples)

    def pair_lengths(self, triples):
        return self.inner.pair_lengths(triples)

    def identity(self):
        return self.inner.identity()


def triples(n, tag="t"):
    return [[f"{tag} prompt {i}", f"answer {i}", "another answer"] for i in range(n)]


def health(server):
    return httpx2.get(server.url + "/health").json()


def slow_server(hf_model, **config):
    config = {"port": 0, "max_wait_ms": 0, "max_batch_pairs": 2, "orphan_grace_s": 0.2, **config}
    return BackgroundServer(ServeArguments(**config), PairRM(Slow(hf_model.backend)))


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---- work dies with its client ---------------------------------------------------------------------------------
def test_the_queued_work_of_a_gone_client_is_dropped(hf_model):
    """40 pairs in batches of 2 at 0.15 s each: the client leaves after 0.5 s. Was: all 40 computed anyway."""
    with slow_server(hf_model) as server:
        with pytest.raises(httpx2.TimeoutException):
            httpx2.post(server.url + "/pair_logits", json={"triples": triples(40)}, timeout=0.5)
        wait_until(lambda: health(server)["queued_pairs"] == 0)
        time.sleep(0.5)  # the batch in flight finishes
        stats = health(server)
        assert stats["cancelled_pairs"] >= 20 and stats["pairs"] <= 20, stats
        assert httpx2.post(server.url + "/compare", json=OK).status_code == 200  # the server goes on


def test_a_retry_after_a_client_timeout_joins_the_running_computation(hf_model):
    """`RemoteBackend(timeout=0.5)` on work of ~3 s: each attempt times out and retries with the same key, joining
    the computation (then its kept result). Was: every retry computed the request again."""
    want = hf_model.pair_logits([tuple(t) for t in triples(40)])
    with slow_server(hf_model, orphan_grace_s=2.0) as server:
        with RemoteBackend(server.url, timeout=0.5, backoff=0.05, max_backoff=0.2, max_wait=30, retries=100) as backend:
            got = backend.score([tuple(t) for t in triples(40)])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        stats = health(server)
        assert stats["pairs"] == 40, stats  # computed once, not once per attempt


def test_shutdown_does_not_wait_for_abandoned_work(hf_model, caplog):
    """Was: SIGTERM waited for every queued pair of clients that had left (up to --graceful_timeout_s)."""
    server = slow_server(hf_model).start()
    with pytest.raises(httpx2.TimeoutException):
        httpx2.post(server.url + "/pair_logits", json={"triples": triples(400)}, timeout=0.3)  # ~30 s of work
    time.sleep(0.5)
    with caplog.at_level(logging.INFO):
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 5
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_default_work_limit_fits_the_device(hf_model):
    assert ServeArguments().request_token_limit("cpu") == 65536
    assert ServeArguments().request_token_limit("cuda") == 2**22
    assert ServeArguments(max_request_tokens=1000).request_token_limit("cuda") == 1000
    long = " ".join(["word"] * 1500)
    with BackgroundServer(ServeArguments(port=0), hf_model) as server:  # on CPU: 65536 tokens
        body = {"triples": [[long, long + f" {i}", long] for i in range(40)]}  # 40 pairs of ~2048 tokens
        response = httpx2.post(server.url + "/pair_logits", json=body)
        assert response.status_code == 413 and "the limit is 65536 (--max_request_tokens)" in response.json()["error"]
        assert health(server)["limits"]["max_request_tokens"] == 65536


# ---- connections -------------------------------------------------------------------------------------------
def test_health_answers_under_600_idle_sockets(hf_model):
    """600 idle sockets locked out /compare and /health for 10 s at a time (plain-text 503). Now each client's
    oldest idle connections make room for new ones."""
    with BackgroundServer(ServeArguments(port=0), hf_model) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(600)]
        try:
            time.sleep(0.5)
            started = time.monotonic()
            response = httpx2.get(server.url + "/health", timeout=5)
            assert response.status_code == 200 and response.json()["status"] == "ok"
            assert httpx2.post(server.url + "/compare", json=OK, timeout=5).status_code == 200
            assert time.monotonic() - started < 3
        finally:
            for sock in idle:
                sock.close()


def busy_connection(port):
    """A connection with a request in progress: the head sent, the body not yet."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    )
    return sock


def test_at_the_connection_cap_the_answer_is_json_503_with_retry_after(hf_model):
    with BackgroundServer(ServeArguments(port=0, max_connections_per_client=3), hf_model) as server:
        busy = [busy_connection(server.port) for _ in range(3)]
        try:
            time.sleep(0.3)
            response = httpx2.get(server.url + "/health", timeout=5)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "too many connections" in response.json()["error"]
        finally:
            for sock in busy:
                sock.close()
        wait_until(lambda: httpx2.get(server.url + "/health").status_code == 200)


def test_a_client_that_leaves_mid_body_is_one_log_line(hf_model, caplog):
    """Was: an ERROR with a ClientDisconnect traceback for each (423 KB of log for 500 of them)."""
    with BackgroundServer(ServeArguments(port=0), hf_model) as server, caplog.at_level(logging.INFO):
        for _ in range(5):
            busy_connection(server.port).close()
        time.sleep(0.5)
        assert httpx2.post(server.url + "/compare", json=OK).status_code == 200
    lines = [r for r in caplog.records if "disconnected while sending its body" in r.getMessage()]
    assert len(lines) == 5 and all(r.exc_info is None for r in lines)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# ---- browsers: Content-Type and Host -------------------------------------------------------------------------
def test_post_needs_a_json_content_type(hf_model):
    """A web page can POST `text/plain` cross-origin without a preflight; JSON cannot be sent that way."""
    with BackgroundServer(ServeArguments(port=0), hf_model) as server:
        import json

        data = json.dumps(OK)
        for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}, {}):
            response = httpx2.post(server.url + "/compare", content=data, headers=headers)
            assert response.status_code == 415 and "application/json" in response.json()["error"], headers
        assert (
            httpx2.post(
                server.url + "/compare", content=data, headers={"Content-Type": "application/json; charset=utf-8"}
            ).status_code
            == 200
        )


def test_the_host_header_must_be_the_servers(hf_model):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends `Host: evil.example`."""
    with BackgroundServer(ServeArguments(port=0), hf_model) as server:

        def post(host):
            return httpx2.post(server.url + "/compare", json=OK, headers={"Host": host})

        response = post("evil.example")
        assert response.status_code == 403 and "--allowed_hosts" in response.json()["error"]
        assert post(f"evil.example:{server.port}").status_code == 403
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", f"localhost:{server.port}", "[::1]:8000"):
            assert post(host).status_code == 200, host
        assert httpx2.get(server.url + "/health", headers={"Host": "lb.internal"}).status_code == 200
    with BackgroundServer(ServeArguments(port=0, allowed_hosts=["rm-0.internal"]), hf_model) as server:
        assert httpx2.post(server.url + "/compare", json=OK, headers={"Host": "rm-0.internal:8000"}).status_code == 200
        assert httpx2.post(server.url + "/compare", json=OK, headers={"Host": "evil.example"}).status_code == 403


# ---- memory: bounded before parsing ------------------------------------------------------------------------------
def test_json_values_are_counted_before_parsing(hf_model):
    with BackgroundServer(ServeArguments(port=0, max_json_values=100), hf_model) as server:
        body = {"inputs": [{}] * 150}
        response = httpx2.post(server.url + "/compare", json=body)
        assert response.status_code == 400 and "the limit is 100 (--max_json_values)" in response.json()["error"]
        tricky = {"inputs": ["[{,,,}]" * 200], "candidates_A": ["a"], "candidates_B": ["b"]}  # inside strings: free
        assert httpx2.post(server.url + "/compare", json=tricky).status_code == 200


def test_bodies_held_at_once_are_capped(hf_model):
    """At most max_concurrency x max_body_bytes bytes of bodies are held (being read or computed): a slow sender's
    declared body counts from its head on, and the next body over the budget gets a JSON 503."""
    with BackgroundServer(ServeArguments(port=0, max_concurrency=1, max_body_bytes=1000), hf_model) as server:
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(
            b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 990\r\n\r\n{"
        )
        try:
            time.sleep(0.3)
            response = httpx2.post(server.url + "/compare", json=OK)
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert "--max_concurrency x --max_body_bytes" in response.json()["error"]
        finally:
            slow.close()
        wait_until(lambda: httpx2.post(server.url + "/compare", json=OK).status_code == 200)
