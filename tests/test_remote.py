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

from pairrm_rlhf import OnlineDPOJudgeReward, PairBackend, PairRM, PairRMJudge, PairwiseReward, PreferenceLabeler
from pairrm_rlhf.backends.remote import PairRMServerError, RemoteBackend, from_wire, to_wire
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.formats import render
from pairrm_rlhf.serve import BackgroundServer, ServeArguments

SYSTEM = {"role": "system", "content": "You are kind."}
PROMPTS = ["Explain the sun.", [SYSTEM, {"role": "user", "content": "Describe the ocean."}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "What is green tea?"}]]
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
    np.testing.assert_allclose(group, PairwiseReward(hf_model, mode="group", group_size=3)(
        PROMPTS[:1] * 3, COMPLETIONS[::2] + ["No."]), atol=1e-5)

    pairs = [[c, "Something else entirely."] for c in ["It is a hot star.", "Water.", "A drink."]]
    assert PairRMJudge(remote).judge(PROMPTS, pairs, shuffle_order=False) == \
        PairRMJudge(hf_model).judge(PROMPTS, pairs, shuffle_order=False)
    np.testing.assert_allclose(PairRMJudge(remote).judge(PROMPTS, pairs, shuffle_order=False, return_scores=True),
                               PairRMJudge(hf_model).judge(PROMPTS, pairs, shuffle_order=False, return_scores=True), atol=1e-5)
    block_prompts, block = PROMPTS[:2] * 2, COMPLETIONS[:2] + ["Cold.", [{"role": "assistant", "content": "Fire."}]]
    np.testing.assert_allclose(OnlineDPOJudgeReward(PairRMJudge(remote))(block_prompts, block),
                               OnlineDPOJudgeReward(PairRMJudge(hf_model))(block_prompts, block), atol=1e-5)
    assert remote.rank(["q"], [["a", "b", "c"]]).tolist() == hf_model.rank(["q"], [["a", "b", "c"]]).tolist()


def test_labeler_over_the_server_equals_in_process(remote, hf_model):
    from datasets import Dataset

    responses = [["Paris.", "Lyon, I think.", "It is Paris, the capital."], ["A star.", "A planet.", "Hot gas."]]
    data = Dataset.from_dict({"prompt": ["Capital of France?", "What is the sun?"], "responses": responses})
    local = PreferenceLabeler(hf_model, responses_column="responses").label(data)
    served = PreferenceLabeler(remote, responses_column="responses").label(data)
    assert local["chosen"] == served["chosen"] and local["rejected"] == served["rejected"]
    scores = np.asarray(local["all_rm_scores"], dtype=np.float64)
    np.testing.assert_allclose(np.asarray(served["all_rm_scores"], dtype=np.float64), scores, rtol=0,
                               atol=logit_tolerance(scores))


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
        remote = PairRM(backend, template=better.template)
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


class Stub:
    """A scripted HTTP server: answers every POST with the next (status, body, delay) of `script`, then the last."""

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


def test_failover_to_a_live_server(server, hf_model):
    with RemoteBackend([dead_url(), server.url], retries=0, timeout=10) as backend:
        remote = PairRM(backend)
        np.testing.assert_allclose(PairwiseReward(remote)(PROMPTS, COMPLETIONS, reference=REFERENCES),
                                   PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=REFERENCES), atol=1e-5)
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
        with RemoteBackend(bad.url, retries=3, backoff=0.01) as backend, pytest.raises(ValueError, match="triples.0. is bad"):
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


def test_large_jobs_are_sent_in_chunks(server, hf_model):
    triples = [(f"prompt {i}", "a" * (i % 7), "b" * (i % 5)) for i in range(50)]
    with RemoteBackend(server.url, chunk_pairs=8) as backend:
        before = backend.health().counters["batches"]
        np.testing.assert_allclose(PairRM(backend).two_order_logits(triples), hf_model.two_order_logits(triples), atol=1e-5)
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
