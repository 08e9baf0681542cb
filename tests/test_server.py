"""`pairrm-rlhf serve` on loopback: answers equal the in-process API under concurrency, bad requests get clear 4xx
JSON and do not hurt the server, limits, auth, graceful shutdown. (The HTTP client backend: `test_remote.py`;
responsiveness under hostile clients: `test_server_hardening.py`; OpenRLHF's client: `test_openrlhf.py`.)"""

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

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import httpx2
import numpy as np
import pytest

from pairrm_rlhf import PairRMJudge, PairwiseReward
from pairrm_rlhf.backends.remote import RemoteBackend
from pairrm_rlhf.serve import BackgroundServer, ServeArguments, make_parser
from pairrm_rlhf.serve.openrlhf import QueryParser

REFERENCE = "A fixed reference answer."
TOKEN = "s3cret-token"
WORDS = [
    "the",
    "sun",
    "is",
    "a",
    "star",
    "ocean",
    "blue",
    "tea",
    "green",
    "music",
    "😀",
    "ünïcode",
    "[SEP]",
    "\n",
    "<|source|>",
]
SYSTEM = {"role": "system", "content": "You are kind."}


def config(*flags: str) -> ServeArguments:
    serve_args, _ = make_parser().parse_args_and_config(["--pairrm", "tiny", "--port", "0", *flags])
    return serve_args


def chatml(messages, response=None):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("" if response is None else f"<|im_start|>assistant\n{response}<|im_end|>")


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("refs") / "refs.jsonl"
    rows = [
        {"prompt": "Explain the sun.", "reference": "The sun is a star."},
        {"prompt": [SYSTEM, {"role": "user", "content": "Describe the ocean."}], "reference": "The ocean is big."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def server(hf_model, reference_file):
    cfg = config(
        "--reference",
        REFERENCE,
        "--reference_file",
        str(reference_file),
        "--max_wait_ms",
        "20",
        "--max_batch_pairs",
        "64",
    )
    with BackgroundServer(cfg, hf_model) as s:
        yield s


@pytest.fixture(scope="module")
def strict(hf_model):
    cfg = config(
        "--token",
        TOKEN,
        "--max_body_bytes",
        "65536",
        "--max_items",
        "8",
        "--max_text_chars",
        "1000",
        "--max_pairs",
        "20",
    )
    with BackgroundServer(cfg, hf_model) as s:
        yield s


# ---- 16 threads x 20 mixed requests == in-process -----------------------------------------------------------
def text(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 8)))


def random_request(rng):
    """(path, body, expected(hf_model) -> value comparable with the answer)."""
    n = rng.randint(1, 3)
    xs, a, b = [text(rng) for _ in range(n)], [text(rng) for _ in range(n)], [text(rng) for _ in range(n)]
    kind = rng.choice(
        ["compare", "probability", "rank", "rank_with_ref", "conversations", "judge", "pair_logits", "get_reward"]
    )
    if kind == "compare":
        return (
            "/compare",
            {"inputs": xs, "candidates_A": a, "candidates_B": b, "return_logits": True},
            lambda m: m.compare(xs, a, b, return_logits=True),
        )
    if kind == "probability":
        return (
            "/probability",
            {"inputs": xs, "candidates_A": a, "candidates_B": b, "temperature": 0.7},
            lambda m: m.probability(xs, a, b, temperature=0.7),
        )
    cands = [[text(rng) for _ in range(3)] for _ in range(n)]
    if kind == "rank":
        return (
            "/rank",
            {"inputs": xs, "candidates": cands, "return_scores": True},
            lambda m: m.rank(xs, cands, return_scores=True),
        )
    if kind == "rank_with_ref":
        return (
            "/rank_with_ref",
            {"inputs": xs, "candidates": cands, "return_scores": True, "ref_candidates": a},
            lambda m: m.rank_with_ref(xs, cands, return_scores=True, ref_candidates=a),
        )
    if kind == "conversations":
        conv_a = [[{"role": "user", "content": x}, {"role": "assistant", "content": y}] for x, y in zip(xs, a)]
        conv_b = [[{"role": "user", "content": x}, {"role": "assistant", "content": y}] for x, y in zip(xs, b)]
        return (
            "/compare_conversations",
            {"conversations_a": conv_a, "conversations_b": conv_b, "return_logits": True},
            lambda m: m.compare_conversations(conv_a, conv_b, return_logits=True),
        )
    if kind == "judge":
        pairs = [[p, q] for p, q in zip(a, b)]
        return (
            "/judge",
            {"prompts": xs, "completions": pairs, "return_scores": True, "shuffle_order": False},
            lambda m: PairRMJudge(m).judge(xs, pairs, return_scores=True, shuffle_order=False),
        )
    if kind == "pair_logits":
        triples = [[x, p, q] for x, p, q in zip(xs, a, b)]
        two = rng.random() < 0.5
        return (
            "/pair_logits",
            {"triples": triples, "two_order": two},
            lambda m: (m.two_order_logits if two else m.pair_logits)([tuple(t) for t in triples]),
        )
    prompts = [[SYSTEM, {"role": "user", "content": x}] for x in xs]
    queries = [chatml(p, r) for p, r in zip(prompts, a)]
    return "/get_reward", {"query": queries}, lambda m: PairwiseReward(m)(prompts, a, reference=[REFERENCE] * n)


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
            np.testing.assert_allclose(
                np.asarray(got, dtype=np.float64), want, rtol=0, atol=tolerance, err_msg=f"{path} {body}"
            )
    stats = httpx2.get(server.url + "/health").json()
    assert stats["status"] == "ok"
    assert stats["most_requests_in_a_batch"] > 1  # concurrent requests were coalesced


def test_sequential_requests_are_exact(server, hf_model):
    rng = random.Random(1)
    for _ in range(16):
        path, body, expected = random_request(rng)
        assert answer_of(path, httpx2.post(server.url + path, json=body)) == np.asarray(expected(hf_model)).tolist(), (
            path
        )


def test_empty_requests(server):
    for path, body, key in [
        ("/rank", {"inputs": [], "candidates": []}, "result"),
        ("/rank_with_ref", {"inputs": [], "candidates": []}, "result"),
        ("/compare", {"inputs": [], "candidates_A": [], "candidates_B": []}, "result"),
        ("/pair_logits", {"triples": []}, "logits"),
    ]:
        response = httpx2.post(server.url + path, json=body)
        assert response.status_code == 200 and response.json() == {key: []}, (path, response.text)
    response = httpx2.post(server.url + "/get_reward", json={"query": []})
    assert response.json() == {"rewards": [], "scores": [], "extra_logs": {"pairrm_logit": []}}


def test_ranks_and_booleans(server, hf_model):
    body = {"inputs": ["q", "r"], "candidates": [["a", "bb", "ccc"], ["x", "y y", "z"]]}
    assert (
        httpx2.post(server.url + "/rank", json=body).json()["result"]
        == hf_model.rank(body["inputs"], body["candidates"]).tolist()
    )
    body = {"inputs": ["q", "q"], "candidates_A": ["a", "same"], "candidates_B": ["b b", "same"]}
    expected = hf_model.compare(body["inputs"], body["candidates_A"], body["candidates_B"]).tolist()
    assert httpx2.post(server.url + "/compare", json=body).json()["result"] == expected


# ---- /get_reward ---------------------------------------------------------------------------------------------
def test_get_reward_openrlhf_shapes(server, hf_model):
    sun = [SYSTEM, {"role": "user", "content": "Explain the sun."}]  # file row is plain text: matched by last user turn
    ocean = [SYSTEM, {"role": "user", "content": "Describe the ocean."}]  # file row is the same conversation
    other = [{"role": "user", "content": "Unknown prompt."}]  # not in the file: --reference
    llama3 = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nExplain the sun.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is hot.<|eot_id|>"
    )
    queries = [chatml(sun, "It is hot."), chatml(ocean, "Wet.") + "<|endoftext|>", chatml(other, "Hm."), llama3]
    answer = httpx2.post(server.url + "/get_reward", json={"query": queries, "labels": ["", "", "", ""]}).json()
    prompts = [sun, ocean, other, [{"role": "user", "content": "Explain the sun."}]]
    references = ["The sun is a star.", "The ocean is big.", REFERENCE, "The sun is a star."]
    completions = ["It is hot.", "Wet.", "Hm.", "It is hot."]
    expected = PairwiseReward(hf_model)(prompts, completions, reference=references)
    np.testing.assert_allclose(answer["rewards"], expected, atol=1e-5)
    assert answer["scores"] == answer["rewards"]  # OpenRLHF reads `scores` first, as its own serve_rm.py sends them
    logits = PairwiseReward(hf_model, output="logit")(prompts, completions, reference=references)
    np.testing.assert_allclose(answer["extra_logs"]["pairrm_logit"], logits, atol=1e-5 * max(1.0, np.abs(logits).max()))

    # newer OpenRLHF sends the prompts too: the split is at the prompt, plain text is fine; per-request references
    body = {
        "query": ["Q: Explain the sun.\nA: It is hot."],
        "prompts": ["Q: Explain the sun.\nA:"],
        "references": ["Hot."],
    }
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
    cfg, judge = make_parser().parse_args_and_config(
        ["--config", str(yaml), "--max_batch_pairs", "8", "--pairrm", "tiny"]
    )
    assert (cfg.max_wait_ms, cfg.max_batch_pairs, cfg.reference, cfg.host, judge.pairrm) == (
        2.5,
        8,
        "ok",
        "127.0.0.1",
        "tiny",
    )
    with pytest.raises(ValueError, match="chat_format"):
        ServeArguments(chat_format="vicuna")
    with pytest.raises(ValueError, match="split_regex"):
        ServeArguments(split_regex="(.*)")
    with pytest.raises(ValueError, match="--token is empty"):
        config("--token", "")


# ---- bad requests ----------------------------------------------------------------------------------------------
OK = {"inputs": ["x"], "candidates_A": ["a"], "candidates_B": ["b"]}
BAD = [
    ("/compare", b"{bad json", 400, "malformed JSON"),
    ("/compare", b"[1, 2]", 400, "must be a JSON object"),
    ("/compare", b'{"inputs": NaN}', 400, "NaN"),
    ("/compare", b"\xff\xfe\x00", 400, "malformed JSON"),
    ("/compare", b'{"batch_size": ' + b"9" * 5000 + b"}", 400, "malformed JSON: an integer has too many digits"),
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
    (
        "/compare_conversations",
        {
            "conversations_a": [[{"role": "user", "content": "q"}]],
            "conversations_b": [[{"role": "user", "content": "q"}]],
        },
        400,
        "conversations_a[0]",
    ),
    ("/judge", {"prompts": ["x"], "completions": [["a"]]}, 400, "completions[0] must be a pair"),
    ("/pair_logits", {"triples": [["a", "b"]]}, 400, "triples[0] must be a list of 3 texts"),
    ("/pair_logits", {"triples": [["a", "b", 3]]}, 400, "triples[0][2] must be a string or an object"),
    ("/pair_logits", {"triples": [["a", "b", {"text": "c", "who": 1}]]}, 400, "triples[0][2] has unknown keys ['who']"),
    ("/pair_logits", {"triples": "abc"}, 400, "triples must be a list"),
    ("/get_reward", {"query": "x"}, 400, "query must be a list"),
    ("/get_reward", {"prompts": ["x"]}, 400, "missing field 'query'"),
    ("/get_reward", {"query": [chatml([{"role": "user", "content": "q"}], "r"), 3]}, 400, "query[1] must be a string"),
    ("/get_reward", {"query": ["no markers here"]}, 400, "cannot split query[0]"),
    ("/get_reward", {"query": ["abc"], "prompts": ["xyz"]}, 400, "query[0] neither starts with its prompt"),
    ("/get_reward", {"query": ["abc"], "bogus": 1}, 400, "unknown field 'bogus'"),
    ("/get_reward", {"query": ["abc"], "prompts": [3]}, 400, "prompts[0] must be a string"),
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
    np.testing.assert_allclose(
        response.json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5
    )


def test_an_internal_error_keeps_its_details_in_the_servers_log(server, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("tokenizers: Truncation error: Sequence to truncate too short (src/utils/truncation.rs)")

    monkeypatch.setattr(server.service.pairrm, "compare", boom)  # the PairRM the routes call
    response = httpx2.post(server.url + "/compare", json=OK)
    assert response.status_code == 500
    assert response.json()["error"] == "internal error (RuntimeError); see the server's log"
    assert "Truncation error" in caplog.text  # logged for the operator


# ---- auth and limits -----------------------------------------------------------------------------------------
def test_token(strict):
    body = {**OK, "return_logits": True}
    assert httpx2.post(strict.url + "/compare", json=body).status_code == 401
    wrong = httpx2.post(strict.url + "/compare", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "token" in wrong.json()["error"]
    assert httpx2.post(strict.url + "/compare", json=body, headers={"Authorization": "Bearer"}).status_code == 401
    assert httpx2.post(strict.url + "/get_reward", json={"query": ["x"]}).status_code == 401
    assert httpx2.post(strict.url + "/compare?token=nope", json=body).status_code == 401
    assert httpx2.post(strict.url + "/compare?token=", json=body).status_code == 401
    right = httpx2.post(strict.url + "/compare", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200
    assert httpx2.post(strict.url + f"/compare?token={TOKEN}", json=body).status_code == 200  # OpenRLHF: in the URL
    assert httpx2.get(strict.url + "/health").status_code == 200  # open, for load balancers; no data
    with RemoteBackend(strict.url, retries=0) as remote:
        with pytest.raises(PermissionError, match="401"):
            remote.score([("x", "a", "b")])
    with RemoteBackend(strict.url, token=TOKEN) as remote:
        assert remote.score([("x", "a", "b")]).shape == (1,)


@pytest.mark.parametrize(
    "body, message",
    [
        ({**OK, "inputs": ["y" * 1001]}, "inputs[0] has 1001 characters; the limit is 1000"),
        (
            {"inputs": ["x"] * 9, "candidates_A": ["a"] * 9, "candidates_B": ["b"] * 9},
            "inputs has 9 entries; the limit is 8",
        ),
        ({"inputs": ["x"], "candidates": [["a", "b", "c", "d", "e", "f"]]}, "needs 30 pair forwards; the limit is 20"),
        (
            {"inputs": ["x"] * 8, "candidates": [["a", "b", "c"]] * 8, "ref_candidates": ["r"] * 8},
            "needs 48 pair forwards",
        ),
    ],
)
def test_limits(strict, body, message):
    path = "/rank_with_ref" if "ref_candidates" in body else "/rank" if "candidates" in body else "/compare"
    response = httpx2.post(strict.url + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    status = 413 if "pair forwards" in message else 400  # too much work; malformed shapes
    assert response.status_code == status and message in response.json()["error"]


def raw_response(sock, timeout=10.0):
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
        data.split(b"content-length: ")[1].split(b"\r\n")[0]
    ):
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
        sock.sendall(
            b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Type: application/json\r\n"
            b"Content-Length: 10737418240\r\n\r\n" + b"[" * 1000
        )
        status, body = raw_response(sock)
    assert status == 413 and "10737418240 bytes; the limit is 65536" in body["error"]
    # a chunked body without length: refused once the stream passes the limit; the rest is never read
    sent = 0
    with socket.create_connection((host, port)) as sock:
        sock.sendall(
            b"POST /compare HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth + b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
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
    assert (
        httpx2.post(strict.url + "/compare", json=OK, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    )


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
    np.testing.assert_allclose(
        result["response"].json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5
    )
    with pytest.raises(httpx2.TransportError):
        httpx2.get(background.url + "/health", timeout=2)


@pytest.mark.multiprocess
def test_sigterm_answers_in_flight_then_exits(hf_model):
    """`run_serve` in its own process (as `pairrm-rlhf serve` runs): SIGTERM while a request waits in the batcher."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pairrm_rlhf.serve.command",
            "--pairrm",
            "tiny",
            "--pairrm_device",
            "cpu",
            "--port",
            "0",
            "--max_wait_ms",
            "1500",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
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
        thread = threading.Thread(
            target=lambda: result.update(
                response=httpx2.post(url + "/compare", json={**OK, "return_logits": True}, timeout=30)
            )
        )
        thread.start()
        time.sleep(0.4)
        process.send_signal(signal.SIGTERM)
        thread.join(30)
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
        assert result["response"].status_code == 200
        np.testing.assert_allclose(
            result["response"].json()["result"], hf_model.compare(["x"], ["a"], ["b"], return_logits=True), atol=1e-5
        )
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
