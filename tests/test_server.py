"""`pairrm-rlhf serve` and `PairRMClient` on loopback: answers equal the in-process API under concurrency, bad
requests get clear 4xx JSON and do not hurt the server, limits, auth, graceful shutdown, client failover and
retries, and a GRPO run rewarded through the server."""

import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import httpx2
import numpy as np
import pytest
import torch

from pairrm_rlhf import OnlineDPOJudgeReward, PairRMJudge, PairwiseReward
from pairrm_rlhf.cli import parse_config
from pairrm_rlhf.backends.remote import PairRMClient, PairRMServerError
from pairrm_rlhf.serve.server import BackgroundServer, QueryParser, ServeConfig


REFERENCE = "A fixed reference answer."
TOKEN = "s3cret-token"
WORDS = ["the", "sun", "is", "a", "star", "ocean", "blue", "tea", "green", "music", "😀", "ünïcode", "[SEP]", "\n", "<|source|>"]
SYSTEM = {"role": "system", "content": "You are kind."}


def config(*flags: str) -> ServeConfig:
    return parse_config(ServeConfig, ["--model", "tiny", "--port", "0", *flags])


def chatml(messages, response=None):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("" if response is None else f"<|im_start|>assistant\n{response}<|im_end|>")


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("refs") / "refs.jsonl"
    rows = [{"prompt": "Explain the sun.", "reference": "The sun is a star."},
            {"prompt": [SYSTEM, {"role": "user", "content": "Describe the ocean."}], "reference": "The ocean is big."}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def server(hf_model, reference_file):
    cfg = config("--reference", REFERENCE, "--reference_file", str(reference_file), "--max_wait_ms", "20",
                 "--max_batch_pairs", "64")
    with BackgroundServer(cfg, hf_model) as s:
        yield s


@pytest.fixture(scope="module")
def strict(hf_model):
    cfg = config("--token", TOKEN, "--max_body_bytes", "65536", "--max_items", "8", "--max_text_chars", "1000",
                 "--max_pairs", "20")
    with BackgroundServer(cfg, hf_model) as s:
        yield s


# ---- 16 threads x 20 mixed requests == in-process -----------------------------------------------------------
def text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))


def random_request(rng):
    """(path, body, expected(hf_model) -> value comparable with the answer)."""
    n = rng.randint(1, 3)
    xs, a, b = [text(rng) for _ in range(n)], [text(rng) for _ in range(n)], [text(rng) for _ in range(n)]
    kind = rng.choice(["compare", "probability", "rank", "rank_with_ref", "conversations", "judge", "pair_logits", "get_reward"])
    if kind == "compare":
        return "/compare", {"inputs": xs, "candidates_A": a, "candidates_B": b, "return_logits": True}, \
            lambda m: m.compare(xs, a, b, return_logits=True)
    if kind == "probability":
        return "/probability", {"inputs": xs, "candidates_A": a, "candidates_B": b, "temperature": 0.7}, \
            lambda m: m.probability(xs, a, b, temperature=0.7)
    cands = [[text(rng) for _ in range(3)] for _ in range(n)]
    if kind == "rank":
        return "/rank", {"inputs": xs, "candidates": cands, "return_scores": True}, \
            lambda m: m.rank(xs, cands, return_scores=True)
    if kind == "rank_with_ref":
        return "/rank_with_ref", {"inputs": xs, "candidates": cands, "return_scores": True, "ref_candidates": a}, \
            lambda m: m.rank_with_ref(xs, cands, return_scores=True, ref_candidates=a)
    if kind == "conversations":
        conv_a = [[{"role": "user", "content": x}, {"role": "assistant", "content": y}] for x, y in zip(xs, a)]
        conv_b = [[{"role": "user", "content": x}, {"role": "assistant", "content": y}] for x, y in zip(xs, b)]
        return "/compare_conversations", {"conversations_a": conv_a, "conversations_b": conv_b, "return_logits": True}, \
            lambda m: m.compare_conversations(conv_a, conv_b, return_logits=True)
    if kind == "judge":
        pairs = [[p, q] for p, q in zip(a, b)]
        return "/judge", {"prompts": xs, "completions": pairs, "return_scores": True, "shuffle_order": False}, \
            lambda m: PairRMJudge(m).judge(xs, pairs, return_scores=True, shuffle_order=False)
    if kind == "pair_logits":
        triples = [[x, p, q] for x, p, q in zip(xs, a, b)]
        two = rng.random() < 0.5
        return "/pair_logits", {"triples": triples, "two_order": two}, \
            lambda m: (m.two_order_logits if two else m.pair_logits)([tuple(t) for t in triples])
    prompts = [[SYSTEM, {"role": "user", "content": x}] for x in xs]
    queries = [chatml(p, r) for p, r in zip(prompts, a)]
    return "/get_reward", {"query": queries}, \
        lambda m: PairwiseReward(m)(prompts, a, reference=[REFERENCE] * n)


def answer_of(path, response):
    assert response.status_code == 200, (path, response.text)
    data = response.json()
    return data["rewards"] if path == "/get_reward" else data["logits"] if path == "/pair_logits" else data["result"]


PROBABILITY_ROUTES = ("/probability", "/judge", "/get_reward")


def in_process(model, expected):
    """`expected(model)` and the largest |g| (PairRM head output) behind it: f(x,A,B) = g(x,A) - g(x,B)."""
    scale = [1.0]
    hook = model.backend.model.head_layer.register_forward_hook(lambda m, i, out: scale.append(float(out.abs().max())))
    try:
        return np.asarray(expected(model), dtype=np.float64), max(scale)
    finally:
        hook.remove()


def test_concurrent_mixed_requests_equal_in_process(server, hf_model):
    """Probabilities and rewards within 1e-5; logits within 1e-5 relative to the head outputs they are differences
    of. Coalescing puts a request's pairs into batches of other shapes than the request alone, and float32 kernels
    then round differently (measured: up to 3e-5 on logits whose head outputs are ~6, under 3e-6 on probabilities).
    A request served alone gets bitwise the in-process numbers (`test_sequential_requests_are_exact`)."""
    rng = random.Random(0)
    plans = [[random_request(rng) for _ in range(20)] for _ in range(16)]
    answers = [[None] * 20 for _ in range(16)]
    barrier = threading.Barrier(16)

    def worker(t):
        with httpx2.Client(base_url=server.url, timeout=60) as http:
            barrier.wait()
            for k, (path, body, _) in enumerate(plans[t]):
                answers[t][k] = http.post(path, json=body)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for t in range(16):
        for (path, body, expected), response in zip(plans[t], answers[t]):
            got = answer_of(path, response)
            want, scale = in_process(hf_model, expected)
            tolerance = 1e-5 if path in PROBABILITY_ROUTES else 1e-5 * scale
            np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=0, atol=tolerance, err_msg=f"{path} {body}")
    stats = httpx2.get(server.url + "/health").json()
    assert stats["status"] == "ok"
    assert stats["most_requests_in_a_batch"] > 1  # concurrent requests were coalesced


def test_sequential_requests_are_exact(server, hf_model):
    rng = random.Random(1)
    for _ in range(16):
        path, body, expected = random_request(rng)
        assert answer_of(path, httpx2.post(server.url + path, json=body)) == np.asarray(expected(hf_model)).tolist(), path


def test_empty_requests(server):
    for path, body, key in [("/rank", {"inputs": [], "candidates": []}, "result"),
                            ("/rank_with_ref", {"inputs": [], "candidates": []}, "result"),
                            ("/compare", {"inputs": [], "candidates_A": [], "candidates_B": []}, "result"),
                            ("/pair_logits", {"triples": []}, "logits"), ("/get_reward", {"query": []}, "rewards")]:
        response = httpx2.post(server.url + path, json=body)
        assert response.status_code == 200 and response.json() == {key: []}, (path, response.text)


def test_ranks_and_booleans(server, hf_model):
    body = {"inputs": ["q", "r"], "candidates": [["a", "bb", "ccc"], ["x", "y y", "z"]]}
    assert httpx2.post(server.url + "/rank", json=body).json()["result"] == hf_model.rank(body["inputs"], body["candidates"]).tolist()
    body = {"inputs": ["q", "q"], "candidates_A": ["a", "same"], "candidates_B": ["b b", "same"]}
    expected = hf_model.compare(body["inputs"], body["candidates_A"], body["candidates_B"]).tolist()
    assert httpx2.post(server.url + "/compare", json=body).json()["result"] == expected


# ---- /get_reward ---------------------------------------------------------------------------------------------
def test_get_reward_openrlhf_shapes(server, hf_model):
    sun = [SYSTEM, {"role": "user", "content": "Explain the sun."}]  # file row is plain text: matched by last user turn
    ocean = [SYSTEM, {"role": "user", "content": "Describe the ocean."}]  # file row is the same conversation
    other = [{"role": "user", "content": "Unknown prompt."}]  # not in the file: --reference
    llama3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nExplain the sun.<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nIt is hot.<|eot_id|>")
    queries = [chatml(sun, "It is hot."), chatml(ocean, "Wet.") + "<|endoftext|>", chatml(other, "Hm."), llama3]
    answer = httpx2.post(server.url + "/get_reward", json={"query": queries, "labels": ["", "", "", ""]}).json()
    prompts = [sun, ocean, other, [{"role": "user", "content": "Explain the sun."}]]
    expected = PairwiseReward(hf_model)(prompts, ["It is hot.", "Wet.", "Hm.", "It is hot."],
                                        reference=["The sun is a star.", "The ocean is big.", REFERENCE, "The sun is a star."])
    np.testing.assert_allclose(answer["rewards"], expected, atol=1e-5)

    # newer OpenRLHF sends the prompts too: the split is at the prompt, plain text is fine; per-request references
    body = {"query": ["Q: Explain the sun.\nA: It is hot."], "prompts": ["Q: Explain the sun.\nA:"], "references": ["Hot."]}
    answer = httpx2.post(server.url + "/get_reward", json=body).json()
    expected = PairwiseReward(hf_model)(["Q: Explain the sun.\nA:"], ["It is hot."], reference=["Hot."])
    np.testing.assert_allclose(answer["rewards"], expected, atol=1e-5)


def test_query_parser_options():
    parser = QueryParser(separator="\nAssistant:")
    assert parser.split("q", "Human: hi\nAssistant: yo\nAssistant: hello</s>") == ("Human: hi\nAssistant: yo", "hello")
    parser = QueryParser(split_regex=r"\[INST\](?P<prompt>.*)\[/INST\](?P<response>.*)")
    assert parser.split("q", "[INST] hi [/INST] hello ") == ("hi", "hello")
    with pytest.raises(ValueError, match="q does not match"):
        parser.split("q", "hello")
    parser = QueryParser(chat_format="chatml")
    prompt, response = parser.split("q", chatml([SYSTEM, {"role": "user", "content": "a"}], "b"))
    assert prompt == [SYSTEM, {"role": "user", "content": "a"}] and response == "b"
    with pytest.raises(ValueError, match="no chat markers"):
        QueryParser().split("query[0]", "plain text")


def test_parse_config(tmp_path):
    cfg = config("--token", "t", "--strip_strings", "</s>", "<end>", "--labels_as_reference", "--chat_format", "llama3")
    assert cfg.token == "t" and cfg.strip_strings == ["</s>", "<end>"] and cfg.labels_as_reference and cfg.port == 0
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("max_wait_ms: 2.5\nmax_batch_pairs: 32\nreference: ok\n")
    cfg = parse_config(ServeConfig, ["--config", str(yaml), "--max_batch_pairs", "8"])
    assert (cfg.max_wait_ms, cfg.max_batch_pairs, cfg.reference, cfg.host) == (2.5, 8, "ok", "127.0.0.1")
    with pytest.raises(ValueError, match="chat_format"):
        ServeConfig(chat_format="vicuna")
    with pytest.raises(ValueError, match="split_regex"):
        ServeConfig(split_regex="(.*)")


# ---- bad requests ----------------------------------------------------------------------------------------------
OK = {"inputs": ["x"], "candidates_A": ["a"], "candidates_B": ["b"]}
BAD = [
    ("/compare", b"{bad json", 400, "malformed JSON"),
    ("/compare", b"[1, 2]", 400, "must be a JSON object"),
    ("/compare", b'{"inputs": NaN}', 400, "NaN"),
    ("/compare", b"\xff\xfe\x00", 400, "malformed JSON"),
    ("/compare", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("/compare", {**OK, "inputs": "x"}, 400, "inputs must be a list"),
    ("/compare", {**OK, "candidates_A": [None]}, 400, "candidates_A[0] must be a string"),
    ("/compare", {"inputs": ["x", "y"], "candidates_A": ["a", "b"], "candidates_B": ["b", 5]}, 400, "candidates_B[1]"),
    ("/compare", {"inputs": ["x"], "candidates_A": ["a"]}, 400, "missing field 'candidates_B'"),
    ("/compare", {**OK, "bogus": 1}, 400, "unknown field 'bogus'"),
    ("/compare", {**OK, "return_logits": "yes"}, 400, "return_logits must be true or false"),
    ("/compare", {**OK, "mode": "sideways"}, 400, "mode must be"),
    ("/probability", {**OK, "temperature": 0}, 400, "temperature must be a finite number"),
    ("/probability", {**OK, "temperature": 10**400}, 400, "temperature must be a finite number"),
    ("/probability", {**OK, "temperature": "hot"}, 400, "temperature must be a number"),
    ("/rank", {"inputs": ["x"], "candidates": [["a", "b"], ["c"]]}, 400, "candidates has 2 items"),
    ("/rank", {"inputs": ["x", "y"], "candidates": [["a", "b"], ["c"]]}, 400, "candidates[1] has 1 candidates"),
    ("/rank_with_ref", {"inputs": ["x"], "candidates": [["a"]], "ref_mode": "tallest"}, 400, "ref_mode must be"),
    ("/compare_conversations", {"conversations_a": [[{"role": "user", "content": "q"}]],
                                "conversations_b": [[{"role": "user", "content": "q"}]]}, 400, "conversations_a[0]"),
    ("/judge", {"prompts": ["x"], "completions": [["a"]]}, 400, "completions[0] must be a pair"),
    ("/pair_logits", {"triples": [["a", "b"]]}, 400, "triples[0] must be a list of 3 strings"),
    ("/pair_logits", {"triples": "abc"}, 400, "triples must be a list"),
    ("/get_reward", {"query": "x"}, 400, "query must be a list"),
    ("/get_reward", {"prompts": ["x"]}, 400, "missing field 'query'"),
    ("/get_reward", {"query": [chatml([{"role": "user", "content": "q"}], "r"), 3]}, 400, "query[1] must be a string"),
    ("/get_reward", {"query": ["no markers here"]}, 400, "cannot split query[0]"),
    ("/get_reward", {"query": ["abc"], "prompts": ["xyz"]}, 400, "query[0] does not start with its prompt"),
    ("/get_reward", {"query": ["abc"], "prompts": ["a", "b"]}, 400, "prompts has 2 items but query has 1"),
    ("/get_reward", {"query": [chatml([{"role": "assistant", "content": "q"}], "r")]}, 400, "query[0]"),
    ("/nope", OK, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD, ids=[f"{i}{b[0]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_clear_4xx(server, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx2.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


def test_server_keeps_serving_after_bad_requests(server, hf_model):
    assert httpx2.get(server.url + "/compare").status_code == 405
    response = httpx2.post(server.url + "/compare", json={**OK, "return_logits": True})
    np.testing.assert_allclose(response.json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5)


# ---- auth and limits -----------------------------------------------------------------------------------------
def test_token(strict):
    body = {**OK, "return_logits": True}
    assert httpx2.post(strict.url + "/compare", json=body).status_code == 401
    wrong = httpx2.post(strict.url + "/compare", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    assert httpx2.post(strict.url + "/get_reward", json={"query": ["x"]}).status_code == 401
    right = httpx2.post(strict.url + "/compare", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert httpx2.get(strict.url + "/health").status_code == 200  # open, for load balancers; no data
    with PairRMClient(strict.url, retries=0) as client:
        with pytest.raises(PermissionError, match="401"):
            client.pair_logits([("x", "a", "b")])
    with PairRMClient(strict.url, token=TOKEN) as client:
        assert client.pair_logits([("x", "a", "b")]).shape == (1,)


@pytest.mark.parametrize("body, message", [
    ({**OK, "inputs": ["y" * 1001]}, "inputs[0] has 1001 characters; the limit is 1000"),
    ({"inputs": ["x"] * 9, "candidates_A": ["a"] * 9, "candidates_B": ["b"] * 9}, "inputs has 9 entries; the limit is 8"),
    ({"inputs": ["x"], "candidates": [["a", "b", "c", "d", "e", "f"]]}, "needs 30 pair forwards; the limit is 20"),
    ({"inputs": ["x"] * 8, "candidates": [["a", "b", "c"]] * 8, "ref_candidates": ["r"] * 8}, "needs 48 pair forwards"),
])
def test_limits(strict, body, message):
    path = "/rank_with_ref" if "ref_candidates" in body else "/rank" if "candidates" in body else "/compare"
    response = httpx2.post(strict.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 400 and message in response.json()["error"]


def raw_response(sock, timeout=10.0):
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
            data.split(b"content-length: ")[1].split(b"\r\n")[0]):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_oversize_body_refused_before_reading(strict):
    host, port = "127.0.0.1", strict.port
    auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
    # a declared 10 GiB body: refused from the headers alone, nothing of it needs to be sent
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /compare HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
                     b"Content-Length: 10737418240\r\n\r\n" + b"[" * 1000)
        status, body = raw_response(sock)
    assert status == 413 and "10737418240 bytes; the limit is 65536" in body["error"]
    # a chunked body without length: refused once the stream passes the limit; the rest is never read
    sent = 0
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /compare HTTP/1.1\r\nHost: x\r\n" + auth + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"4000\r\n" + b" " * 0x4000 + b"\r\n"
        while sent < 64 * 2**20 and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 0x4000
        status, body = raw_response(sock)
    assert status == 413 and "exceeds 65536 bytes" in body["error"]
    assert sent < 16 * 2**20  # the server answered long before the client could send it all
    assert httpx2.post(strict.url + "/compare", json=OK, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200


# ---- graceful shutdown -----------------------------------------------------------------------------------------
def test_graceful_shutdown_answers_in_flight(hf_model):
    background = BackgroundServer(config("--max_wait_ms", "1500"), hf_model).start()
    result = {}

    def request():
        result["response"] = httpx2.post(background.url + "/compare", json={**OK, "return_logits": True}, timeout=30)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(0.4)  # the request is waiting in the batcher (1.5 s window)
    started = time.monotonic()
    background.stop()
    thread.join(30)
    assert time.monotonic() - started > 0.5  # the shutdown waited for it
    assert result["response"].status_code == 200
    np.testing.assert_allclose(result["response"].json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5)
    with pytest.raises(httpx2.TransportError):
        httpx2.get(background.url + "/health", timeout=2)


SERVE = """
import logging, sys
import torch
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
from pairrm_rlhf.cli import parse_config
from pairrm_rlhf.serve.server import ServeConfig, run_serve
run_serve(parse_config(ServeConfig, sys.argv[1:]))
"""


def test_sigterm_answers_in_flight_then_exits(hf_model):
    """`run_serve` in its own process (as `pairrm-rlhf serve` runs): SIGTERM while a request waits in the batcher."""
    process = subprocess.Popen([sys.executable, "-c", SERVE, "--model", "tiny", "--device", "cpu", "--port", "0",
                                "--max_wait_ms", "1500"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, log = None, []
        while url is None:
            line = process.stderr.readline()
            assert line, "the server exited before announcing its address:\n" + "".join(log)
            log.append(line)
            if "PairRM server on " in line:
                url = line.split("PairRM server on ")[1].split()[0]
        for _ in range(100):  # bounded: until uvicorn has started
            try:
                if httpx2.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                time.sleep(0.1)
        result = {}
        thread = threading.Thread(target=lambda: result.update(
            response=httpx2.post(url + "/compare", json={**OK, "return_logits": True}, timeout=30)))
        thread.start()
        time.sleep(0.4)
        process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
        assert result["response"].status_code == 200
        np.testing.assert_allclose(result["response"].json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# ---- client ----------------------------------------------------------------------------------------------------
def dead_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


class Stub:
    """A scripted HTTP server: answers /pair_logits with the next (status, body, delay) of `script`, then the last."""

    def __init__(self, script):
        self.script, self.calls = list(script), 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                status, body, delay = stub.script[min(stub.calls, len(stub.script) - 1)]
                stub.calls += 1
                time.sleep(delay)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_client_failover_same_rewards(server, hf_model):
    prompts = ["Explain the sun.", [SYSTEM, {"role": "user", "content": "Describe the ocean."}]]
    completions = ["It is a hot star.", [{"role": "assistant", "content": "Water."}]]
    references = ["The sun is a star.", ["Big and blue.", "Salty."]]
    with PairRMClient([dead_url(), server.url], retries=0, timeout=10) as client:
        remote = client.reference_reward()
        assert remote.__name__ == "pairrm_reference"
        np.testing.assert_allclose(remote(prompts, completions, reference=references),
                                   PairwiseReward(hf_model)(prompts, completions, reference=references), atol=1e-5)
        logit = client.reference_reward(output="logit", name="ref_logit")
        assert logit.__name__ == "ref_logit"
        np.testing.assert_allclose(logit(prompts, completions, reference=references),
                                   PairwiseReward(hf_model, output="logit")(prompts, completions, reference=references), atol=1e-5)
        block_prompts, block = prompts * 2, completions + ["Cold.", [{"role": "assistant", "content": "Fire."}]]
        dpo = client.online_dpo_reward()
        assert dpo.__name__ == "pairrm_judge"
        np.testing.assert_allclose(dpo(block_prompts, block), OnlineDPOJudgeReward(PairRMJudge(hf_model))(block_prompts, block), atol=1e-5)
        group = client.group_reward(group_size=2)
        np.testing.assert_allclose(group(block_prompts[:1] * 2, block[::2]),
                                   PairwiseReward(hf_model, mode="group", group_size=2)(block_prompts[:1] * 2, block[::2]), atol=1e-5)
        assert client.pairrm.rank(["q"], [["a", "b", "c"]]).tolist() == hf_model.rank(["q"], [["a", "b", "c"]]).tolist()
        assert client.health()["status"] == "ok"


def test_client_retries_with_backoff_then_succeeds():
    stub = Stub([(503, {"error": "busy"}, 0), (500, {"error": "oops"}, 0), (200, {"logits": [0.25]}, 0)])
    try:
        with PairRMClient(stub.url, retries=2, backoff=0.01) as client:
            assert client.pair_logits([("x", "a", "b")]).tolist() == [0.25]
        assert stub.calls == 3
    finally:
        stub.close()


def test_client_errors():
    dead = [dead_url(), dead_url()]
    with PairRMClient(dead, retries=1, backoff=0.01) as client, pytest.raises(PairRMServerError) as error:
        client.pair_logits([("x", "a", "b")])
    assert all(url in str(error.value) for url in dead) and "after 2 attempt(s)" in str(error.value)

    bad = Stub([(400, {"error": "triples[0] is bad"}, 0)])  # the request's fault: not retried elsewhere
    slow = Stub([(200, {"logits": [1.0]}, 3.0)])  # times out: the next URL answers
    good = Stub([(200, {"logits": [0.5]}, 0)])
    try:
        with PairRMClient(bad.url, retries=3, backoff=0.01) as client, pytest.raises(ValueError, match="triples.0. is bad"):
            client.pair_logits([("x", "a", "b")])
        assert bad.calls == 1
        with PairRMClient([slow.url, good.url], timeout=0.5, retries=0) as client:
            assert client.pair_logits([("x", "a", "b")]).tolist() == [0.5]
            assert client.pair_logits([("x", "a", "b")]).tolist() == [0.5]  # sticks to the server that answered
        assert slow.calls == 1 and good.calls == 2
    finally:
        for stub in (bad, slow, good):
            stub.close()


def test_client_chunks_large_jobs(server, hf_model):
    triples = [(f"prompt {i}", "a" * (i % 7), "b" * (i % 5)) for i in range(50)]
    with PairRMClient(server.url, chunk_pairs=8) as client:
        np.testing.assert_allclose(client.pair_logits(triples, two_order=True), hf_model.two_order_logits(triples), atol=1e-5)


# ---- GRPO through the server ------------------------------------------------------------------------------------
def test_grpo_smoke_with_remote_reward(server, hf_model, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from tiny_policy import build_tiny_policy, build_tiny_tokenizer

    calls = []
    with PairRMClient([dead_url(), server.url], retries=1, backoff=0.01) as client:
        remote = client.reference_reward()

        def reward(prompts, completions, **kwargs):
            rewards = remote(prompts, completions, **kwargs)
            calls.append((prompts, completions, kwargs["reference"], rewards))
            return rewards

        reward.__name__ = remote.__name__
        questions = ["Explain the sun.", "Describe the ocean.", "What is green tea?", "Tell me about music."]
        data = Dataset.from_dict({"prompt": [[SYSTEM, {"role": "user", "content": q}] for q in questions],
                                  "reference": ["A star.", "Water.", "A drink.", "Sound."]})
        tokenizer = build_tiny_tokenizer()
        args = trl.GRPOConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, num_generations=2,
                              max_completion_length=8, use_cpu=True, bf16=False, report_to=[], logging_steps=1,
                              save_strategy="no", seed=0, activation_checkpointing=False)
        trainer = trl.GRPOTrainer(model=build_tiny_policy(tokenizer), reward_funcs=[reward], args=args,
                                  train_dataset=data, processing_class=tokenizer)
        trainer.train()
    assert len(calls) == 2
    local = PairwiseReward(hf_model)
    for prompts, completions, references, rewards in calls:
        np.testing.assert_allclose(rewards, local(prompts, completions, reference=references), atol=1e-5)
