"""One client cannot stall the server: linear-time query parsing, a per-request work limit (413), a small request
answered within a few batch times while a large one runs, header/body timeouts (408), idle keep-alive limits, slow
senders do not take compute slots, and an empty token is a configuration error."""

import json
import random
import socket
import threading
import time

import httpx2
import numpy as np
import pytest

from pairrm_rlhf.serve import BackgroundServer, ServeArguments
from pairrm_rlhf.serve.openrlhf import QueryParser

OK = {"inputs": ["x"], "candidates_A": ["a"], "candidates_B": ["b"], "return_logits": True}


# ---- parsing ------------------------------------------------------------------------------------------------
def test_a_megabyte_query_without_end_markers_parses_in_linear_time():
    """The former `(.*?)<|im_end|>` findall rescanned the rest of the text from every `<|im_start|>`: quadratic
    (2.0 s for 98.6k characters). Each input below is 1 MB."""
    headers = ("<|im_start|>user\nhello there " * 40_000)[: 2**20] + "<|im_start|>assistant\nThe answer."
    llama = ("<|start_header_id|>user<|end_header_id|>\n\nhi " * 30_000)[
        : 2**20
    ] + "<|start_header_id|>assistant<|end_header_id|>\n\nThe answer."
    stops = "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\nThe answer." + "</s>" * 2**18
    bare = "<|im_start|>" * (2**20 // 12) + "\n" + "<|im_start|>assistant\nThe answer."
    parser = QueryParser()
    for query in (headers, llama, stops, bare):
        assert len(query) >= 2**20
        started = time.perf_counter()
        prompt, response = parser.split("query[0]", query)
        assert time.perf_counter() - started < 1.0
        assert response == "The answer."
    assert parser.split("query[0]", stops)[0] == [{"role": "user", "content": "q"}]
    # a left-truncated 1 MB prompt is found by its overlap with the query, also in linear time
    prompt = "word " * (2**20 // 5) + "<|im_start|>assistant\n"
    started = time.perf_counter()
    assert parser.split("query[0]", prompt[2**19 :] + "Yes.", prompt)[1] == "Yes."
    assert time.perf_counter() - started < 1.0


def test_a_megabyte_get_reward_is_answered(hf_model):
    query = ("<|im_start|>user\nhello there " * 40_000)[: 2**20] + "<|im_start|>assistant\nThe answer."
    config = ServeArguments(port=0, reference="ok", max_text_chars=2**21, max_body_bytes=2**22)
    with BackgroundServer(config, hf_model) as server:
        started = time.perf_counter()
        response = httpx2.post(server.url + "/get_reward", json={"query": [query]}, timeout=60)
        assert response.status_code == 200, response.text
        assert time.perf_counter() - started < 20  # was minutes: the quadratic parse alone took ~200 s at 1 MB


# ---- work ---------------------------------------------------------------------------------------------------
def test_a_request_over_the_work_limit_gets_413_before_any_forward(hf_model):
    with BackgroundServer(ServeArguments(port=0, max_request_tokens=2000, max_pairs=100), hf_model) as server:
        long = " ".join(["word"] * 400)
        body = {"inputs": ["q"], "candidates": [[long, long + " x", long + " y"]]}  # 6 pairs of ~800 tokens
        response = httpx2.post(server.url + "/rank", json=body)
        assert response.status_code == 413
        assert "tokens over 6 pair forwards; the limit is 2000 (--max_request_tokens)" in response.json()["error"]
        response = httpx2.post(
            server.url + "/rank", json={"inputs": ["q"], "candidates": [[str(i) for i in range(11)]]}
        )
        assert response.status_code == 413 and "110 pair forwards; the limit is 100" in response.json()["error"]
        assert httpx2.get(server.url + "/health").json()["batches"] == 0  # nothing was computed
        assert httpx2.post(server.url + "/compare", json=OK).status_code == 200


def test_a_small_request_is_answered_within_a_few_batch_times_while_a_large_one_runs(hf_model):
    """A /rank of 14 candidates (182 pairs of ~320 tokens) runs as ~23 engine batches of 8 pairs; a /compare sent
    meanwhile must not wait for all of them (the former queue never split a request)."""
    rng = random.Random(0)
    words = "the sun is a star ocean blue tea green music".split()
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    body = {"inputs": [text(60)], "candidates": [[text(40) for _ in range(14)]], "return_scores": True}
    with (
        BackgroundServer(ServeArguments(port=0, max_batch_pairs=8, max_wait_ms=0), hf_model) as server,
        httpx2.Client(base_url=server.url, timeout=120) as http,
    ):
        small = {**OK, "inputs": [text(60)]}
        started = time.perf_counter()
        assert http.post("/compare", json=small).status_code == 200
        idle = time.perf_counter() - started  # the small request alone: HTTP + its own batch
        result = {}

        def large():
            t0 = time.perf_counter()
            result["response"] = httpx2.post(server.url + "/rank", json=body, timeout=300)
            result["seconds"] = time.perf_counter() - t0

        thread = threading.Thread(target=large)
        batches = http.get("/health").json()["batches"]
        thread.start()
        while http.get("/health").json()["batches"] < batches + 2:  # the large request is being computed
            time.sleep(0.01)
        started = time.perf_counter()
        assert http.post("/compare", json=small).status_code == 200
        waited = time.perf_counter() - started
        thread.join(300)
        stats = http.get("/health").json()
    assert result["response"].status_code == 200
    np.testing.assert_allclose(
        result["response"].json()["result"],
        hf_model.rank(body["inputs"], body["candidates"], return_scores=True),
        atol=1e-5,
    )
    batch = stats["largest_batch_s"]
    assert stats["batches"] - batches >= 23 and result["seconds"] > 10 * stats["engine_s"] / stats["batches"]  # long
    assert waited < 3 * batch + 2 * idle, (waited, batch, idle, result["seconds"])


# ---- slow and idle clients ------------------------------------------------------------------------------------
def read_all(sock, timeout):
    """Everything the server sends until it closes the connection (or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    return data, True


def trickle(port, head, body_bytes, stop, interval=0.05):
    """Send `head`, then one byte of `body_bytes` every `interval` s until the server answers or closes."""
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(head)
        for i in range(len(body_bytes)):
            if stop.is_set():
                break
            sock.sendall(body_bytes[i : i + 1])
            time.sleep(interval)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return sock


@pytest.fixture(scope="module")
def guarded(hf_model):
    config = ServeArguments(port=0, header_timeout_s=0.6, body_timeout_s=0.6, keep_alive_s=0.6, max_concurrency=2)
    with BackgroundServer(config, hf_model) as server:
        yield server


def test_trickled_or_missing_headers_get_408_and_are_closed(guarded):
    for first in (b"", b"POST /compare HTTP/1.1\r\n"):
        with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
            started = time.perf_counter()
            sock.sendall(first)
            try:
                for _ in range(100):  # a header byte every 50 ms, forever
                    sock.sendall(b"X")
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            data, closed = read_all(sock, 5)
            assert closed and time.perf_counter() - started < 4
            assert data.startswith(b"HTTP/1.1 408") and b"--header_timeout_s" in data


def test_trickled_body_gets_408_and_is_closed(guarded):
    body = json.dumps(OK).encode()
    head = (
        b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    started = time.perf_counter()
    sock = trickle(guarded.port, head, body, threading.Event(), interval=0.1)  # needs ~6 s; the limit is 0.6 s
    with sock:
        data, closed = read_all(sock, 5)
    assert closed and time.perf_counter() - started < 6
    status = int(data.split()[1])
    assert status == 408 and b"--body_timeout_s" in data


def test_idle_keep_alive_connections_are_closed(guarded):
    with socket.create_connection(("127.0.0.1", guarded.port)) as sock:
        body = json.dumps(OK).encode()
        sock.sendall(
            b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        sock.settimeout(10)
        first = b""
        while b"\r\n\r\n" not in first or not first.endswith(b"]}"):  # the whole answer (a JSON object)
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.perf_counter()
        data, closed = read_all(sock, 5)  # nothing more is sent: the server closes the idle connection
        assert closed and data == b"" and time.perf_counter() - started < 4


def test_slow_senders_do_not_take_compute_slots(guarded, hf_model):
    """With --max_concurrency 2, eight clients trickling their bodies used to make every other request a 503."""
    body = json.dumps(OK).encode()
    head = (
        b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    stop = threading.Event()
    socks = []
    threads = [
        threading.Thread(target=lambda: socks.append(trickle(guarded.port, head, body, stop, 0.2))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.3)
        for _ in range(3):
            response = httpx2.post(guarded.url + "/compare", json=OK, timeout=30)
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(
                response.json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5
            )
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for sock in socks:
            sock.close()


def test_configuration_errors_are_found_before_loading_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="--reference_file: file not found: .*nope.jsonl"):
        ServeArguments(reference_file=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="--split_regex is not a valid regular expression"):
        ServeArguments(split_regex="(?P<prompt>")
    with pytest.raises(ValueError, match="--header_timeout_s must be a finite number > 0"):
        ServeArguments(header_timeout_s=0)
    with pytest.raises(ValueError, match="--max_request_tokens must be a positive integer"):
        ServeArguments(max_request_tokens=0)


def test_an_empty_token_is_a_configuration_error(monkeypatch):
    with pytest.raises(ValueError, match="--token is empty"):
        ServeArguments(token="")
    monkeypatch.setenv("PAIRRM_SERVER_TOKEN", "")
    with pytest.raises(ValueError, match=r"\$PAIRRM_SERVER_TOKEN is set but empty"):
        ServeArguments()
    monkeypatch.setenv("PAIRRM_SERVER_TOKEN", "from-env")
    assert ServeArguments().resolved_token() == "from-env" and ServeArguments(token="t").resolved_token() == "t"
