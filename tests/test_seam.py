"""The seam: every backend implements all of `PairBackend` with real values, `PairRM` takes its template from the
backend (never a guess), and one registry of judges decides how a name loads."""

import json
import shutil

import numpy as np
import pytest
import torch

from pairrm_rlhf import PairRM
from pairrm_rlhf.args import PairRMArguments
from pairrm_rlhf.backends import registry
from pairrm_rlhf.backends.better_pairrm import BetterPairRMScorer
from pairrm_rlhf.backends.registry import JUDGES, Judge, find_judge
from pairrm_rlhf.backends.rlhflow import RLHFlowScorer
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.backend import MEMBERS, PairBackend
from pairrm_rlhf.core.engine import PairScorer
from pairrm_rlhf.core.formats import render
from pairrm_rlhf.core.settings import MAX_TOKENS_CPU, MAX_TOKENS_CUDA, default_max_tokens, resolve_dtype
from pairrm_rlhf.pairrm import LazyPairRM

from known_preference import LengthBackend, StyleBackend, ToyBackend
from tiny_policy import save_tiny_policy

TEMPLATES = {"pairrm", "better-pairrm", "rlhflow"}
USER_A = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."},
          {"role": "user", "content": "What is the sun?"}, {"role": "assistant", "content": "A star, the nearest one."}]
USER_B = USER_A[:3] + [{"role": "assistant", "content": "No idea."}]


@pytest.fixture(scope="module")
def better(tmp_path_factory) -> PairRM:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-Better-PairRM"
    shutil.copytree(bundled("pairrm"), directory)
    return PairRM.from_pretrained(directory, device="cpu")


@pytest.fixture(scope="module")
def rlhflow(tmp_path_factory) -> PairRM:
    path = save_tiny_policy(tmp_path_factory.mktemp("rlhflow") / "tiny-llama", arch="llama")
    return PairRM.from_pretrained(path, judge="rlhflow", device="cpu", max_length=256)


def assert_implements_the_protocol(backend, template: str) -> None:
    """Every member of `PairBackend`, each with a value of the right kind and meaning."""
    assert isinstance(backend, PairBackend)
    assert backend.template == template and backend.template in TEMPLATES
    assert isinstance(backend.device, torch.device) and backend.device.type == "cpu"
    assert backend.dtype == torch.float32
    assert isinstance(backend.max_tokens, int) and backend.max_tokens == MAX_TOKENS_CPU
    source, hi = render("Say hi", "hi!")
    _, hello = render("Say hi", "hello")
    _, longer = render("Say hi", "a much longer greeting")
    triples = [(source, hi, hello), (source, hello, longer)]
    scores = backend.score(triples)
    assert scores.dtype == np.float32 and scores.shape == (2,) and np.isfinite(scores).all()
    own = backend.reference_probability(triples, 1.0)
    assert own is None or (own.shape == (2,) and ((own > 0) & (own < 1)).all())
    assert 0.0 <= backend.truncation_rate(triples) <= 1.0
    lengths = backend.pair_lengths(triples)
    assert len(lengths) == 2 and all(isinstance(n, int) and n > 0 for n in lengths)
    assert lengths[1] > lengths[0]  # the longer pair has more tokens
    identity = backend.identity()
    assert isinstance(identity, dict) and json.loads(json.dumps(identity)) == identity


def test_every_in_process_backend_implements_the_protocol(hf_model, better, rlhflow):
    assert isinstance(hf_model.backend, PairScorer)
    assert_implements_the_protocol(hf_model.backend, "pairrm")
    assert isinstance(better.backend, BetterPairRMScorer)
    assert_implements_the_protocol(better.backend, "better-pairrm")
    assert isinstance(rlhflow.backend, RLHFlowScorer)
    assert_implements_the_protocol(rlhflow.backend, "rlhflow")
    for backend in (StyleBackend(), LengthBackend(), LengthBackend(template="rlhflow")):
        assert_implements_the_protocol(backend, backend.template)


def test_each_backend_says_what_it_is(hf_model, better, rlhflow):
    """The values a remote client or the server reports come from the backend, not from guesses."""
    assert better.backend.dtype == better.backend.inner.dtype
    assert better.backend.max_tokens == better.backend.inner.max_tokens
    assert better.backend.pair_lengths([("x", "a", "b")]) == better.backend.inner.pair_lengths(
        better.backend.convert([("x", "a", "b")]))
    assert hf_model.backend.reference_probability([("x", "a", "b")], 1.0) is None
    p = rlhflow.backend.reference_probability([("x", "a", "b")], 2.0)
    assert p.shape == (1,)
    assert p[0] == pytest.approx(rlhflow.probability(["x"], ["a"], ["b"], temperature=2.0)[0], abs=1e-6)
    assert rlhflow.backend.pair_lengths([("x", "a", "b")]) == [len(rlhflow.backend.prompt_ids(("x", "a", "b"))[0])]
    assert not hasattr(BetterPairRMScorer, "__getattr__")  # no forwarding of whatever is asked


class Relay:
    """A backend that scores through another one, as the server's queue and the HTTP client do. It declares every
    member itself; `declare_template=False` leaves the template out, as `RemoteBackend` once did."""

    def __init__(self, inner, declare_template: bool = True):
        self.inner = inner
        self.device, self.dtype, self.max_tokens = inner.device, inner.dtype, inner.max_tokens
        if declare_template:
            self.template = inner.template

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        return self.inner.score(triples, batch_size=batch_size, show_progress_bar=show_progress_bar)

    def reference_probability(self, triples, temperature, *, batch_size=None):
        return self.inner.reference_probability(triples, temperature, batch_size=batch_size)

    def truncation_rate(self, triples):
        return self.inner.truncation_rate(triples)

    def pair_lengths(self, triples):
        return None  # a remote backend cannot count locally

    def identity(self):
        return self.inner.identity()


def test_a_better_pairrm_backend_renders_conversations_as_better_pairrm_with_no_template_argument(better):
    """The bug of issue 21: `PairRM(backend)` over a Better-PairRM backend that reached it through a relay rendered
    `compare_conversations` in PairRM's format (wrong numbers, no error)."""
    relayed = PairRM(Relay(better.backend))
    assert relayed.template == "better-pairrm"
    z = relayed.compare_conversations([USER_A], [USER_B], return_logits=True)
    np.testing.assert_allclose(z, better.compare_conversations([USER_A], [USER_B], return_logits=True), rtol=1e-6)
    pairrm_format = PairRM(Relay(better.backend.inner)).compare_conversations([USER_A], [USER_B], return_logits=True)
    assert abs(z[0] - pairrm_format[0]) > 1e-4  # the two renderings really differ on this pair


def test_a_backend_that_does_not_say_its_template_is_refused(better):
    with pytest.raises(TypeError, match="Relay is not a PairBackend: it lacks template"):
        PairRM(Relay(better.backend, declare_template=False))
    with pytest.raises(ValueError, match="template='pairrm' disagrees with the backend's template 'better-pairrm'"):
        PairRM(better.backend, template="pairrm")
    with pytest.deprecated_call():
        assert PairRM(better.backend, template="better-pairrm").template == "better-pairrm"


# ---- the registry -------------------------------------------------------------------------------------------
class EchoBackend(ToyBackend):
    """A toy judge's backend: f(x, A, B) = len(A) - len(B), and it remembers what loaded it."""

    def __init__(self, name_or_path: str, dtype: torch.dtype, max_tokens: int | None):
        super().__init__(template="better-pairrm")
        self.name_or_path, self.dtype, self.max_tokens = name_or_path, dtype, max_tokens or MAX_TOKENS_CPU

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        return np.array([len(a) - len(b) for _, a, b in triples], dtype=np.float32)

    def identity(self):
        return {"backend": "echo", "checkpoint": self.name_or_path}


def load_echo(name_or_path, options):
    return EchoBackend(name_or_path, options.dtype, options.max_tokens), "toy"


@pytest.fixture
def toy_judge(monkeypatch):
    """Adding a judge: its backend file (EchoBackend, load_echo above) and one registry entry; nothing else."""
    judge = Judge("echo", load_echo, names=("echo-judge",), limits="none", checkpoints=("org/echo-judge-1b",))
    monkeypatch.setitem(JUDGES, judge.name, judge)
    return judge


def test_a_toy_judge_added_to_the_registry_loads_everywhere(toy_judge):
    by_name = PairRM.from_pretrained("org/echo-judge-1b", device="cpu", dtype="bf16", max_tokens=123)
    assert isinstance(by_name.backend, EchoBackend) and by_name.kind == "toy"
    assert by_name.backend.name_or_path == "org/echo-judge-1b" and by_name.backend.dtype == torch.bfloat16
    assert by_name.backend.max_tokens == 123 and by_name.template == "better-pairrm"  # from the backend
    assert by_name.compare(["p"], ["longer"], ["short"]).tolist() == [True]
    explicit = PairRM.from_pretrained("org/any-name", judge="echo", device="cpu")
    assert isinstance(explicit.backend, EchoBackend)
    args = PairRMArguments(pairrm="org/echo-judge-1b")
    assert isinstance(args.load(device="cpu").backend, EchoBackend)
    args = PairRMArguments(pairrm="org/any-name", pairrm_judge="echo", pairrm_device="cpu")
    assert isinstance(args.load().backend, EchoBackend)
    assert isinstance(args.lazy().get().backend, EchoBackend)


def test_judges_are_found_by_name_config_or_flag(tmp_path):
    assert find_judge("llm-blender/PairRM-hf").name == "pairrm"
    assert find_judge("maywell/Better-PairRM").name == "better-pairrm"
    assert find_judge("/models/mightbe-better-pairrm/").name == "better-pairrm"
    assert find_judge("RLHFlow/pair-preference-model-LLaMA3-8B").name == "rlhflow"
    assert find_judge("maywell/Better-PairRM", "pairrm").name == "pairrm"  # the flag wins
    directory = tmp_path / "plain-name"
    shutil.copytree(bundled("pairrm"), directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "pairrm_template": "better-pairrm"}))
    assert find_judge(directory).name == "better-pairrm"
    (directory / "config.json").write_text(json.dumps({**config, "pairrm_template": "vicuna"}))
    with pytest.raises(ValueError, match=r"config.json: field 'pairrm_template': must be one of pairrm, better-pairrm"):
        find_judge(directory)
    with pytest.raises(ValueError, match=r"--pairrm_judge: must be one of pairrm, better-pairrm, rlhflow, got 'nope'"):
        PairRMArguments(pairrm="tiny", pairrm_judge="nope")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(JUDGES["pairrm"])
    assert set(MEMBERS) == {"template", "device", "dtype", "max_tokens", "score", "reference_probability",
                            "truncation_rate", "pair_lengths", "identity"}


def test_the_deprecated_judge_flags_still_pick_the_same_judge():
    with pytest.deprecated_call():
        assert PairRMArguments(pairrm="tiny", pairrm_template="better-pairrm").pairrm_judge == "better-pairrm"
    with pytest.deprecated_call():
        assert PairRMArguments(pairrm="tiny", pairrm_backend="rlhflow").pairrm_judge == "rlhflow"
    with pytest.deprecated_call():
        assert PairRMArguments(pairrm="org/Better-PairRM", pairrm_backend="pairrm").pairrm_judge == "better-pairrm"
    with pytest.deprecated_call(), pytest.raises(ValueError, match="--pairrm_backend: must be one of pairrm, rlhflow"):
        PairRMArguments(pairrm="tiny", pairrm_backend="encoder")
    with pytest.deprecated_call():
        lazy = LazyPairRM("tiny", device="cpu", backend="pairrm")
        assert lazy.get().template == "pairrm"


# ---- shared settings -----------------------------------------------------------------------------------------
def test_one_dtype_vocabulary_and_one_token_budget():
    message = "must be one of auto, float32, fp32, bfloat16, bf16, float16, fp16, got 'fp8'"
    with pytest.raises(ValueError, match=f"^--pairrm_dtype: {message}$"):
        PairRMArguments(pairrm="tiny", pairrm_dtype="fp8")
    with pytest.raises(ValueError, match=f"^dtype: {message}$"):
        PairRM.from_pretrained("tiny", device="cpu", dtype="fp8")
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype(None, "cuda:1") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16 and resolve_dtype("auto", "cpu") == torch.float32
    assert default_max_tokens(torch.device("cpu")) == MAX_TOKENS_CPU == 8192
    assert default_max_tokens("cuda:0") == MAX_TOKENS_CUDA == 65536
    assert PairRM.from_pretrained("tiny", device="cpu").backend.max_tokens == MAX_TOKENS_CPU


class CyclicBackend(ToyBackend):
    """Rock-paper-scissors with margins: paper beats rock by 3, scissors beat paper by 1, rock beats scissors by 1,
    so a single bubble pass and the full ranking can pick different winners."""

    BEATS = {("paper", "rock"): 3.0, ("scissors", "paper"): 1.0, ("rock", "scissors"): 1.0}

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        return np.array([self.BEATS.get((a, b), 0.0) - self.BEATS.get((b, a), 0.0) for _, a, b in triples],
                        dtype=np.float32)

    def identity(self):
        return {"backend": "cyclic"}


def test_best_of_n_and_get_best_of_n_agree_by_default():
    model = PairRM(CyclicBackend())
    cands = [["rock", "paper", "scissors"]]
    for seed in range(6):
        assert model.best_of_n(["p"], cands, seed=seed) == model.get_best_of_n(["p"], cands, seed=seed)
    full = model.get_best_of_n(["p"], cands, pairrm_cmp_type="full")
    assert full == model.best_of_n(["p"], cands, pairrm_cmp_type="full") == ["paper"]
    assert any(model.best_of_n(["p"], cands, seed=seed) != full for seed in range(6))  # the defaults matter here
