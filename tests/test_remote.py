"""`PairRM(RemoteBackend(url))`: every adapter over a live local server gives the in-process numbers (labeler, judge,
rewards, Better-PairRM's re-rendering), the backend's identity and truncation rate are the served model's, and the
transport fails over, retries and reports clearly."""

import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import pytest
import torch

from pairrm_rlhf import OnlineDPOJudgeReward, PairBackend, PairRM, PairRMJudge, PairwiseReward, PreferenceLabeler
from pairrm_rlhf.backends.remote import PairRMServerError, RemoteBackend, from_wire, to_wire
from pairrm_rlhf.backends.wire import ServerInfo
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.formats import render
from pairrm_rlhf.serve import BackgroundServer, ServeArguments

SYSTEM = {"role": "system", "content": "You are kind."}
PROMPTS = [
    "Explain the sun.",
    [SYSTEM, {"role": "user", "content": "Describe the ocean."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is green tea?"},
    ],
]
COMPLETIONS = ["It is a hot star.", [{"role": "assistant", "content": "Water, mostly."}], "A drink from leaves."]
REFERENCES = ["The sun is a star.", ["Big and blue.", "Salty."], "Tea."]


def logit_tolerance(values) -> float:
    """Logits through the server's shared batches round differently from in-process batches: 1e-5 relative to the
    logits' scale (float32 kernels over other batch shapes; see test_server.py's concurrency test)."""
    return 1e-5 * max(1.0, float(np.abs(np.asarray(values, dtype=np.float64)).max()))


@pytest.fixture(scope="module")
def server(hf_model):
    with BackgroundServer(ServeArguments(port=0, max_wait_ms=2), hf_model) as s:
        yield s


@pytest.fixture(scope="module")
def remote(server):
    with RemoteBackend(server.url, retries=0) as backend:
        yield PairRM(backend)


def test_remote_backend_is_a_pair_backend(remote, hf_model, server):
    backend = remote.backend
    assert isinstance(backend, PairBackend) and backend.device.type == "cpu"
    assert backend.identity() == hf_model.backend.identity()  # the served model's, from /health
    triples = [("x " * 3000, "a " * 4000, "b"), ("short", "a", "b")]  # the first is cut to fit PairRM's budgets
    assert backend.truncation_rate(triples) == hf_model.backend.truncation_rate(triples) == 0.5
    assert backend.truncation_rate([]) == 0.0


def test_every_adapter_over_the_server_equals_in_process(remote, hf_model):
    for output in ("probability", "logit"):
        got = PairwiseReward(remote, output=output)(PROMPTS, COMPLETIONS, reference=REFERENCES)
        want = PairwiseReward(hf_model, output=output)(PROMPTS, COMPLETIONS, reference=REFERENCES)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if output == "probability" else logit_tolerance(want))
    group = PairwiseReward(remote, mode="group", group_size=3)(PROMPTS[:1] * 3, COMPLETIONS[::2] + ["No."])
    np.testing.assert_allclose(
        group,
        PairwiseReward(hf_model, mode="group", group_size=3)(PROMPTS[:1] * 3, COMPLETIONS[::2] + ["No."]),
        atol=1e-5,
    )

    pairs = [[c, "Something else entirely."] for c in ["It is a hot star.", "Water.", "A drink."]]
    assert PairRMJudge(remote).judge(PROMPTS, pairs, shuffle_order=False) == PairRMJudge(hf_model).judge(
        PROMPTS, pairs, shuffle_order=False
    )
    np.testing.assert_allclose(
        PairRMJudge(remote).judge(PROMPTS, pairs, shuffle_order=False, return_scores=True),
        PairRMJudge(hf_model).judge(PROMPTS, pairs, shuffle_order=False, return_scores=True),
        atol=1e-5,
    )
    block_prompts, block = PROMPTS[:2] * 2, COMPLETIONS[:2] + ["Cold.", [{"role": "assistant", "content": "Fire."}]]
    np.testing.assert_allclose(
        OnlineDPOJudgeReward(PairRMJudge(remote))(block_prompts, block),
        OnlineDPOJudgeReward(PairRMJudge(hf_model))(block_prompts, block),
        atol=1e-5,
    )
    assert remote.rank(["q"], [["a", "b", "c"]]).tolist() == hf_model.rank(["q"], [["a", "b", "c"]]).tolist()


def test_labeler_over_the_server_equals_in_process(remote, hf_model):
    from datasets import Dataset

    responses = [["Paris.", "Lyon, I think.", "It is Paris, the capital."], ["A star.", "A planet.", "Hot gas."]]
    data = Dataset.from_dict({"prompt": ["Capital of France?", "What is the sun?"], "responses": responses})
    local = PreferenceLabeler(hf_model, responses_column="responses").label(data)
    served = PreferenceLabeler(remote, responses_column="responses").label(data)
    assert local["chosen"] == served["chosen"] and local["rejected"] == served["rejected"]
    scores = np.asarray(local["all_rm_scores"], dtype=np.float64)
    np.testing.assert_allclose(
        np.asarray(served["all_rm_scores"], dtype=np.float64), scores, rtol=0, atol=logit_tolerance(scores)
    )


def test_rendered_text_travels_whole_to_a_better_pairrm_server(tmp_path):
    """Better-PairRM re-renders a conversation from the messages a `Rendered` source carries; over the wire they must
    arrive, or the served model would score PairRM's rendering instead."""
    directory = tmp_path / "tiny-Better-PairRM"  # detected by name, like maywell/Better-PairRM
    shutil.copytree(bundled("pairrm"), directory)
    better = PairRM.from_pretrained(directory, device="cpu")
    source, candidate = render(PROMPTS[1], "Water.")
    assert from_wire("t", json.loads(json.dumps(to_wire(source)))).messages == source.messages
    assert from_wire("t", json.loads(json.dumps(to_wire(candidate)))).response == "Water."
    with BackgroundServer(ServeArguments(port=0, max_wait_ms=1), better) as s, RemoteBackend(s.url) as backend:
        remote = PairRM(backend)
        want = PairwiseReward(better, output="logit")(PROMPTS, COMPLETIONS, reference=REFERENCES)
        got = PairwiseReward(remote, output="logit")(PROMPTS, COMPLETIONS, reference=REFERENCES)
        np.testing.assert_allclose(got, want, rtol=0, atol=logit_tolerance(want))
        plain = PairwiseReward(PairRM(better.backend.inner), output="logit")(PROMPTS, COMPLETIONS, reference=REFERENCES)
        assert np.abs(np.asarray(plain) - np.asarray(want)).max() > 100 * logit_tolerance(want)  # the test can tell


def test_identity_notices_a_different_model_behind_the_urls(server, tmp_path, hf_model):
    other = PairRM.from_pretrained(bundled("pairrm"), device="cpu", dtype="bfloat16")
    with BackgroundServer(ServeArguments(port=0), other) as s:
        assert RemoteBackend(s.url).identity() == other.backend.identity() != hf_model.backend.identity()
        with pytest.raises(ValueError, match="serve different models"):
            RemoteBackend([server.url, s.url]).identity()
    assert RemoteBackend([dead_url(), server.url], retries=0).identity() == hf_model.backend.identity()
    with pytest.raises(PairRMServerError, match="no PairRM server is healthy"):
        RemoteBackend(dead_url()).identity()


def test_constructor_checks():
    with pytest.raises(ValueError, match="at least one server"):
        RemoteBackend([])
    with pytest.raises(ValueError, match="http:// or https://"):
        RemoteBackend("localhost:8000")
    with pytest.raises(ValueError, match="token is empty"):
        RemoteBackend("http://localhost:8000", token="")


# ---- transport --------------------------------------------------------------------------------------------------
def dead_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def health_answer(**changes):
    """A valid /health answer of a PairRM server, with `changes`."""
    return {
        "status": "ok",
        "identity": {"weights": "w"},
        "template": "pairrm",
        "dtype": "float32",
        "limits": {"max_batch_tokens": 8192, "max_pairs": 16384, "max_request_tokens": 65536, "max_body_bytes": 2**24},
        "probability": "sigmoid(z/2T)",
        "requests": 0,
        **changes,
    }


class Stub:
    """A scripted HTTP server: answers every POST with the next (status, body, delay) of `script`, then the last (a
    `bytes` body is sent as is); GET /health answers `health`."""

    def __init__(self, script, health=None, port=0):
        self.script, self.calls, self.keys = list(script), 0, []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                data = json.dumps(health if health is not None else health_answer()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                stub.keys.append(self.headers.get("Idempotency-Key"))
                status, body, delay = stub.script[min(stub.calls, len(stub.script) - 1)]
                stub.calls += 1
                time.sleep(delay)
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
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

        ThreadingHTTPServer.allow_reuse_address = True
        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_failover_to_a_live_server(server, hf_model):
    with RemoteBackend([dead_url(), server.url], retries=0, timeout=10) as backend:
        remote = PairRM(backend)
        np.testing.assert_allclose(
            PairwiseReward(remote)(PROMPTS, COMPLETIONS, reference=REFERENCES),
            PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=REFERENCES),
            atol=1e-5,
        )
        assert backend.health().template == "pairrm" and backend.health().counters["requests"] > 0


def test_retries_with_backoff_then_succeeds():
    stub = Stub([(503, {"error": "busy"}, 0), (500, {"error": "oops"}, 0), (200, {"logits": [0.25]}, 0)])
    try:
        with RemoteBackend(stub.url, retries=2, backoff=0.01) as backend:
            assert backend.score([("x", "a", "b")]).tolist() == [0.25]
        assert stub.calls == 3
    finally:
        stub.close()


def test_transport_errors():
    dead = [dead_url(), dead_url()]
    with RemoteBackend(dead, retries=1, backoff=0.01) as backend, pytest.raises(PairRMServerError) as error:
        backend.score([("x", "a", "b")])
    assert all(url in str(error.value) for url in dead) and "after 2 attempt(s)" in str(error.value)

    bad = Stub([(400, {"error": "triples[0] is bad"}, 0)])  # the request's fault: not retried elsewhere
    slow = Stub([(200, {"logits": [1.0]}, 3.0)])  # times out: the next URL answers
    good = Stub([(200, {"logits": [0.5]}, 0)])
    short = Stub([(200, {"logits": []}, 0)])  # a wrong answer is an error, not a short array
    try:
        with (
            RemoteBackend(bad.url, retries=3, backoff=0.01) as backend,
            pytest.raises(ValueError, match="triples.0. is bad"),
        ):
            backend.score([("x", "a", "b")])
        assert bad.calls == 1
        with RemoteBackend([slow.url, good.url], timeout=0.5, retries=0) as backend:
            assert backend.score([("x", "a", "b")]).tolist() == [0.5]
            assert backend.score([("x", "a", "b")]).tolist() == [0.5]  # sticks to the server that answered
        assert slow.calls == 1 and good.calls == 2
        with RemoteBackend(short.url) as backend, pytest.raises(PairRMServerError, match="expected 1 logits"):
            backend.score([("x", "a", "b")])
    finally:
        for stub in (bad, slow, good, short):
            stub.close()


@pytest.mark.parametrize(
    "answer",
    [
        b'{"logits": [null]}',
        b'{"logits": ["0.5"]}',
        b'{"logits": [true]}',
        b'{"logits": [1e400]}',
        b'{"logits": [NaN]}',
        b'{"logits": [[1, 2]]}',
        b'{"logits": [0.5, 0.5]}',
        b'{"logits": 0.5}',
        b"[0.5]",
        b'{"scores": [0.5]}',
        b"not json",
    ],
)
def test_an_invalid_answer_is_an_error_naming_the_server_and_route(answer):
    """Validated as the engine validates logits: a flat list of exactly n finite numbers. Was: null -> NaN,
    "0.5" -> 0.5, true -> 1.0, 1e400 -> inf, [[1,2]] -> a 2-D array. Not retried: the server answered."""
    stub = Stub([(200, answer, 0)])
    try:
        with RemoteBackend(stub.url, retries=3, backoff=0.01) as backend, pytest.raises(PairRMServerError) as error:
            backend.score([("x", "a", "b")])
        assert f"{stub.url}/pair_logits answered an invalid value" in str(error.value), error.value
        assert stub.calls == 1
    finally:
        stub.close()


@pytest.mark.parametrize(
    "route, answer",
    [
        ("truncation_rate", b'{"truncation_rate": "0.5"}'),
        ("truncation_rate", b'{"truncation_rate": 2.0}'),
        ("truncation_rate", b'{"truncation_rate": null}'),
        ("reference_probability", b'{"probabilities": [1.5]}'),
        ("reference_probability", b'{"probabilities": [null]}'),
    ],
)
def test_other_routes_validate_their_answers(route, answer):
    stub = Stub([(200, answer, 0)], health=health_answer(probability="server"))
    try:
        with RemoteBackend(stub.url) as backend, pytest.raises(PairRMServerError, match=f"{stub.url}/{route} answered"):
            if route == "truncation_rate":
                backend.truncation_rate([("x", "a", "b")])
            else:
                backend.reference_probability([("x", "a", "b")], 1.0)
    finally:
        stub.close()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"template": "vicuna"}, "unknown template"),
        ({"dtype": 16}, "`dtype` must be str"),
        ({"probability": "sigmoid(z)"}, "unknown probability rule"),
        ({"limits": {"max_pairs": 1}}, "max_batch_tokens"),
        ({"identity": None}, "`identity` must be dict"),
        ({"status": "starting"}, "not 'ok'"),
    ],
)
def test_an_invalid_health_is_an_error(change, message):
    stub = Stub([(200, {"logits": [0.0]}, 0)], health=health_answer(**change))
    try:
        with RemoteBackend(stub.url) as backend:
            with pytest.raises(PairRMServerError, match=message):
                _ = backend.template
            with pytest.raises(PairRMServerError, match=message):
                backend.identity()
    finally:
        stub.close()


def test_a_stopped_server_fails_within_the_bounded_wait():
    """A server that accepts connections but never answers (SIGSTOP: the kernel still queues connections) made
    `score()` block 484 s and `identity()` 120 s. Now every call ends within `max_wait` with one clear error."""
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)
        url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
        backend = RemoteBackend(url, timeout=0.5, max_wait=2.0, backoff=0.1)
        for call in (lambda: backend.score([("x", "a", "b")]), backend.identity):
            started = time.monotonic()
            with pytest.raises(PairRMServerError) as error:
                call()
            assert time.monotonic() - started < 3.0
            assert url in str(error.value)
    defaults = RemoteBackend("http://127.0.0.1:1")
    assert (defaults.timeout, defaults.max_wait) == (30.0, 60.0)


def test_the_default_retry_window_outlasts_a_server_restart():
    """A server down for 7 s (a restart) is waited for with the default settings; was ~3.5 s, then an error."""
    url = dead_url()
    port = int(url.rsplit(":", 1)[1])
    started: list = []
    timer = threading.Timer(7.0, lambda: started.append(Stub([(200, {"logits": [0.25]}, 0)], port=port)))
    timer.start()
    try:
        with RemoteBackend(url) as backend:
            backend._info = ServerInfo.parse("test", health_answer())  # noqa: SLF001 - /health is down too
            t0 = time.monotonic()
            assert backend.score([("x", "a", "b")]).tolist() == [0.25]
            assert time.monotonic() - t0 >= 6.5
    finally:
        timer.join()
        for stub in started:
            stub.close()


def test_retries_send_one_idempotency_key():
    stub = Stub([(503, {"error": "busy"}, 0), (200, {"logits": [0.5]}, 0)])
    try:
        with RemoteBackend(stub.url, backoff=0.01) as backend:
            backend.score([("x", "a", "b")])
            backend.score([("x", "a", "b")])
        first, retry, other = stub.keys
        assert first and first == retry != other  # a retry joins; a new call is new work
    finally:
        stub.close()


# ---- what the backend is, from /health ---------------------------------------------------------------------------
def test_remote_backend_learns_what_the_served_judge_is(remote, hf_model):
    backend = remote.backend
    assert (backend.template, backend.dtype, backend.max_tokens) == ("pairrm", torch.float32, 8192)
    assert backend.pair_lengths([("x", "a", "b")]) is None
    assert backend.reference_probability([("x", "a", "b")], 1.0) is None  # PairRM's default rule


def test_compare_conversations_over_a_better_pairrm_server_equals_in_process(tmp_path):
    """`PairRM(RemoteBackend(url))`, told nothing, renders conversations in Better-PairRM's format (each side's own
    history) because the server's /health says so. Was: PairRM's format, other numbers, no error."""
    directory = tmp_path / "tiny-Better-PairRM"  # detected by name, like maywell/Better-PairRM
    shutil.copytree(bundled("pairrm"), directory)
    better = PairRM.from_pretrained(directory, device="cpu")
    conv_a = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello, how are you?"},
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine, thanks"},
    ]
    conv_b = (
        conv_a[:1]
        + [{"role": "assistant", "content": "go away"}]
        + conv_a[2:3]
        + [{"role": "assistant", "content": "bad"}]
    )
    with BackgroundServer(ServeArguments(port=0, max_wait_ms=1), better) as s, RemoteBackend(s.url) as backend:
        remote = PairRM(backend)
        assert remote.template == "better-pairrm"
        want = better.compare_conversations([conv_a, conv_b], [conv_b, conv_a], return_logits=True)
        got = remote.compare_conversations([conv_a, conv_b], [conv_b, conv_a], return_logits=True)
        np.testing.assert_allclose(got, want, rtol=0, atol=logit_tolerance(want))
        assert (
            remote.compare_conversations([conv_a], [conv_b]) == better.compare_conversations([conv_a], [conv_b])
        ).all()
        as_pairrm = PairRM(better.backend.inner).compare_conversations([conv_a], [conv_b], return_logits=True)
        assert abs(as_pairrm[0] - want[0]) > 100 * logit_tolerance(want)  # the test can tell the formats apart


class OwnRule:
    """A judge with its own probability rule, like RLHFlow's: (sigmoid(f(x,A,B)/T) + sigmoid(-f(x,B,A)/T)) / 2."""

    def __init__(self, inner):
        self.inner = inner
        self.template, self.device, self.dtype, self.max_tokens = "pairrm", inner.device, inner.dtype, inner.max_tokens

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        return self.inner.score(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)

    def reference_probability(self, triples, temperature, *, batch_size=None):
        if not triples:
            return np.zeros(0)
        f = self.inner.score([*triples, *((s, b, a) for s, a, b in triples)]).astype(np.float64)
        ab, ba = f[: len(triples)], f[len(triples) :]
        return (1 / (1 + np.exp(-ab / temperature)) + 1 / (1 + np.exp(ba / temperature))) / 2

    def truncation_rate(self, triples):
        return self.inner.truncation_rate(triples)

    def pair_lengths(self, triples):
        return self.inner.pair_lengths(triples)

    def identity(self):
        return {**self.inner.identity(), "rule": "own"}


def test_an_own_probability_rule_is_computed_by_the_server(hf_model):
    """An RLHFlow-style judge's P(A > B) is not a function of f alone (the temperature applies per order): the
    server reports `probability: server` and answers POST /reference_probability with the in-process numbers."""
    judge = OwnRule(hf_model.backend)
    triples = [("What is the sun?", "A star.", "A planet."), ("Hi", "Hello!", "Go away."), ("q", "same", "same")]
    with BackgroundServer(ServeArguments(port=0, max_wait_ms=1), PairRM(judge)) as s, RemoteBackend(s.url) as backend:
        assert backend.info().probability == "server"
        for temperature in (1.0, 0.3):
            np.testing.assert_allclose(
                backend.reference_probability(triples, temperature),
                judge.reference_probability(triples, temperature),
                rtol=0,
                atol=1e-6,
            )
        z = PairRM(backend).two_order_logits(triples)  # the default rule would give sigmoid(z / 2T): other numbers
        assert np.abs(1 / (1 + np.exp(-z / 0.6)) - judge.reference_probability(triples, 0.3)).max() > 1e-3


def test_large_jobs_are_sent_in_chunks(server, hf_model):
    triples = [(f"prompt {i}", "a" * (i % 7), "b" * (i % 5)) for i in range(50)]
    with RemoteBackend(server.url, chunk_pairs=8) as backend:
        before = backend.health().counters["batches"]
        np.testing.assert_allclose(
            PairRM(backend).two_order_logits(triples), hf_model.two_order_logits(triples), atol=1e-5
        )
        assert backend.health().counters["batches"] - before >= 100 // 8  # at least one batch per request of 8 pairs


# ---- GRPO through the server ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_grpo_smoke_with_remote_reward(server, hf_model, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from tiny_policy import build_tiny_policy, build_tiny_tokenizer

    calls = []
    with RemoteBackend([dead_url(), server.url], retries=1, backoff=0.01) as backend:
        remote = PairwiseReward(PairRM(backend))

        def reward(prompts, completions, **kwargs):
            rewards = remote(prompts, completions, **kwargs)
            calls.append((prompts, completions, kwargs["reference"], rewards))
            return rewards

        reward.__name__ = remote.__name__
        questions = ["Explain the sun.", "Describe the ocean.", "What is green tea?", "Tell me about music."]
        data = Dataset.from_dict(
            {
                "prompt": [[SYSTEM, {"role": "user", "content": q}] for q in questions],
                "reference": ["A star.", "Water.", "A drink.", "Sound."],
            }
        )
        tokenizer = build_tiny_tokenizer()
        args = trl.GRPOConfig(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=2,
            num_generations=2,
            max_completion_length=8,
            use_cpu=True,
            bf16=False,
            report_to=[],
            logging_steps=1,
            save_strategy="no",
            seed=0,
            activation_checkpointing=False,
        )
        trainer = trl.GRPOTrainer(
            model=build_tiny_policy(tokenizer),
            reward_funcs=[reward],
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )
        trainer.train()
    assert len(calls) == 2
    local = PairwiseReward(hf_model)
    for prompts, completions, references, rewards in calls:
        np.testing.assert_allclose(rewards, local(prompts, completions, reference=references), atol=1e-5)


def test_without_the_serve_extra_the_import_error_says_what_to_install():
    import subprocess
    import sys

    code = """
import importlib, sys
for blocked, module in [("httpx2", "pairrm_rlhf.backends.remote"), ("starlette", "pairrm_rlhf.serve"),
                        ("uvicorn", "pairrm_rlhf.serve")]:
    saved = sys.modules.pop(blocked, None)
    sys.modules[blocked] = None
    try:
        importlib.import_module(module)
    except ImportError as error:
        print(blocked, "|", error)
    else:
        print(blocked, "| imported")
    sys.modules.pop(blocked)
    if saved is not None:
        sys.modules[blocked] = saved
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3
    for line, blocked in zip(out, ["httpx2", "starlette", "uvicorn"]):
        assert line.startswith(blocked) and f"({blocked} is missing): pip install 'pairrm-rlhf[serve]'" in line, line
