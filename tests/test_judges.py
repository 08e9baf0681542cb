"""PairRMJudge: TRL's former pairwise-judge contract, conversational rendering, lazy construction."""

import numpy as np
import pytest
import torch

from pairrm_rlhf import PairRM, PairRMJudge
from pairrm_rlhf.core import aggregation
from pairrm_rlhf.core.formats import CONVERSATION_INSTRUCTION, pairrm_source, render, render_conversations
from pairrm_rlhf.trl.judge import BasePairwiseJudge

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 =", "Say hi"]
PAIRS = [
    ["Paris is the capital of France.", "I think it is Lyon."],
    ["Rain falls soft and slow / on the quiet garden path / spring breathes in the grey", "rain"],
    ["4", "The answer is 4, because two plus two makes four."],
    ["hi", "hi"],  # a tie: exactly 0 logit
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def judge(hf_model) -> PairRMJudge:
    return PairRMJudge(hf_model, seed=0)


def trl_v1_judge(model, prompts, completions, shuffle_order, return_scores, temperature, seed=0):
    """TRL <= 1.0's `PairRMJudge.judge` (huggingface/trl `trl/experimental/judges/judges.py` at v1.0.0), step by
    step, over our llm-blender-compatible `rank` (which it called on `llm_blender.Blender`)."""
    flip = np.random.default_rng(seed).choice([True, False], size=len(prompts)) if shuffle_order else None
    if shuffle_order:
        completions = [pair[::-1] if f else pair for f, pair in zip(flip, completions)]
    ranks = model.rank(prompts, completions, return_scores=return_scores)
    if not return_scores:
        ranks = ranks - 1  # 1-based ranks -> 0-based
    else:
        ranks /= temperature
    if shuffle_order:
        ranks[flip] = ranks[flip][:, ::-1]
    if return_scores:
        exp = np.exp(ranks - np.amax(ranks, axis=-1, keepdims=True))
        return (exp / exp.sum(axis=-1, keepdims=True))[:, 0].tolist()
    return ranks[:, 0].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("shuffle", [False, True])
def test_judge_equals_trl_v1_pairrm_judge(judge, hf_model, temperature, shuffle):
    """Hard and soft outputs equal TRL <= 1.0's at every temperature (ties -> 0)."""
    hard = judge.judge(PROMPTS, PAIRS, shuffle_order=shuffle)
    assert hard == trl_v1_judge(hf_model, PROMPTS, PAIRS, shuffle, False, temperature) and hard[3] == 0
    soft = judge.judge(PROMPTS, PAIRS, shuffle_order=shuffle, return_scores=True, temperature=temperature)
    assert all(isinstance(s, float) for s in soft) and soft[3] == 0.5
    np.testing.assert_allclose(soft, trl_v1_judge(hf_model, PROMPTS, PAIRS, shuffle, True, temperature), rtol=1e-6)
    # = sigmoid(z / T); the calibrated probability sigmoid(z / 2T) is PairRM.probability at T / 2 ... or the judge at 2T
    z = hf_model.compare(PROMPTS, [p[0] for p in PAIRS], [p[1] for p in PAIRS], return_logits=True).astype(np.float64)
    np.testing.assert_allclose(soft, 1 / (1 + np.exp(-z / temperature)), rtol=1e-5)
    a, b = [p[0] for p in PAIRS], [p[1] for p in PAIRS]
    np.testing.assert_allclose(soft, hf_model.probability(PROMPTS, a, b, temperature=temperature / 2), rtol=1e-5)
    calibrated = judge.judge(PROMPTS, PAIRS, return_scores=True, temperature=2 * temperature)
    np.testing.assert_allclose(calibrated, hf_model.probability(PROMPTS, a, b, temperature=temperature), rtol=1e-5)


def test_soft_scores_are_trl_float32_softmax():
    from pairrm_rlhf.trl.judge import trl_soft_scores

    z = np.array([0.0, 1.0, -2.5, 80.0, -200.0], dtype=np.float32)
    np.testing.assert_array_equal(trl_soft_scores(z, 1.0)[:1], [0.5])
    expected = 1 / (1 + np.exp(-z.astype(np.float64) / 2.0))
    np.testing.assert_allclose(trl_soft_scores(z, 2.0), expected, rtol=1e-6, atol=1e-38)
    assert np.isfinite(trl_soft_scores(z, 1e-3)).all()  # no overflow at tiny temperatures
    with pytest.raises(ValueError, match="temperature"):
        trl_soft_scores(z, 0.0)


def test_shuffle_order_swaps_slots_and_maps_back(judge, hf_model, monkeypatch):
    seen = []
    original = hf_model.two_order_logits
    monkeypatch.setattr(
        hf_model, "two_order_logits", lambda triples, **kw: seen.extend(triples) or original(triples, **kw)
    )
    prompts, pairs = PROMPTS[:3] * 4, PAIRS[:3] * 4
    plain = judge.judge(prompts, pairs, shuffle_order=False, return_scores=True)
    unshuffled = list(seen)
    seen.clear()
    shuffled = judge.judge(prompts, pairs, shuffle_order=True, return_scores=True)
    swapped = [s != u for s, u in zip(seen, unshuffled)]
    assert any(swapped) and not all(swapped)  # some pairs were really scored in the other slot order
    for s, u, flip in zip(seen, unshuffled, swapped):
        assert s == ((u[0], u[2], u[1]) if flip else u)
    np.testing.assert_allclose(shuffled, plain, atol=1e-6)
    assert judge.judge(prompts, pairs, shuffle_order=True) == judge.judge(prompts, pairs, shuffle_order=False)


def test_old_trl_style_call(judge):
    assert isinstance(judge, BasePairwiseJudge)
    result = judge.judge(PROMPTS, PAIRS)  # positional, TRL's former signature
    assert isinstance(result, list) and all(r in (0, 1) for r in result) and len(result) == len(PROMPTS)


def test_conversational_equals_compare_conversations(judge, hf_model):
    prompts = [[user("Hello, who are you?")], [{"role": "USER", "content": "Name a fruit."}]]
    completions = [
        [[assistant("I am a helpful assistant.")], [assistant("go away")]],
        ["Apple.", "A banana is a fruit."],  # plain strings are the assistant's content
    ]
    conv_a = [prompts[0] + completions[0][0], [user("Name a fruit."), assistant("Apple.")]]
    conv_b = [prompts[0] + completions[0][1], [user("Name a fruit."), assistant("A banana is a fruit.")]]
    expected = aggregation.probability(hf_model.compare_conversations(conv_a, conv_b, return_logits=True), 0.5)
    np.testing.assert_allclose(judge.judge(prompts, completions, return_scores=True), expected, atol=1e-6)


def test_multi_turn_and_system_message(judge, hf_model):
    history = [user("Hi!"), assistant("Hello! How can I help?"), user("Tell me a joke.")]
    a, b = "Why did the chicken cross the road?", "No."
    expected = hf_model.compare_conversations(
        [history + [assistant(a)]], [history + [assistant(b)]], return_logits=True
    )
    np.testing.assert_allclose(
        judge.judge([history], [[[assistant(a)], [assistant(b)]]], return_scores=True),
        aggregation.probability(expected, 0.5), atol=1e-6,
    )
    # the new completion is the last <Response k>; history answers are the same in both candidates
    inputs, cands_a, _ = render_conversations([history + [assistant(a)]], [history + [assistant(b)]])
    rendered = tuple(map(str, render(history, [assistant(a)])))
    assert rendered == (pairrm_source(inputs[0], CONVERSATION_INSTRUCTION), cands_a[0])
    assert render(history, a)[1].endswith(f"<Response 2>: {a}")
    # system content goes in front of the first user turn; the instruction sentence is unchanged
    system = {"role": "system", "content": "You are terse."}
    folded = [user("You are terse.\n\nHi!")] + history[1:]
    expected = hf_model.compare_conversations([folded + [assistant(a)]], [folded + [assistant(b)]], return_logits=True)
    np.testing.assert_allclose(
        judge.judge([[system] + history], [[a, b]], return_scores=True), aggregation.probability(expected, 0.5),
        atol=1e-6,
    )
    assert render([system] + history, a)[0].startswith(CONVERSATION_INSTRUCTION + "USER: You are terse.\n\nHi!\n")


@pytest.mark.parametrize(
    "prompt, completion, match",
    [
        ([user("q"), assistant("a")], "c", "must end with a user message"),
        ([assistant("a"), user("q")], "c", r"\[0\] is an assistant message"),
        ([user("q"), user("again")], "c", "right after another user message"),
        ([user("q"), {"role": "system", "content": "s"}], "c", "no user message follows"),
        ([{"role": "tool", "content": "x"}, user("q")], "c", "has role 'tool'"),
        ([user("q")], [user("not me")], "must be an assistant message"),
    ],
)
def test_render_errors(prompt, completion, match):
    with pytest.raises(ValueError, match=match):
        render(prompt, completion)


def test_judge_input_errors(judge):
    with pytest.raises(ValueError, match=r"completions\[1\] must be a pair"):
        judge.judge(["a", "b"], [["x", "y"], ["x", "y", "z"]])
    with pytest.raises(ValueError, match="completions has 1 pairs but prompts has 2"):
        judge.judge(["a", "b"], [["x", "y"]])
    with pytest.raises(TypeError, match="prompts must be a list"):
        judge.judge("a", [["x", "y"]])


def test_construction_is_lazy(monkeypatch, tmp_path):
    """No model load and no CUDA call before the first `judge`; a bad path only fails then."""
    calls = []

    def forbidden(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called during construction")
        return fail

    for name in ("is_available", "current_device", "device_count", "init"):
        monkeypatch.setattr(torch.cuda, name, forbidden(name))
    monkeypatch.setattr(PairRM, "from_pretrained", classmethod(lambda cls, *a, **k: forbidden("from_pretrained")()))
    judge = PairRMJudge(tmp_path / "does-not-exist", dtype="float16")
    assert calls == [] and not torch.cuda.is_initialized()
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        judge.judge(["q"], [["a", "b"]])  # now it tries to load


def test_loaded_model_rejects_load_options(hf_model):
    with pytest.raises(ValueError, match="loading options"):
        PairRMJudge(hf_model, device="cpu")
