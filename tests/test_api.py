"""Semantics of the reference-compatible API beyond the recorded fixture."""

import numpy as np
import pytest

from pairrm_rlhf.core import aggregation


def test_probability_is_calibrated_two_order(hf_model, golden):
    inputs, a, b = golden["inputs"], golden["candidates_A"], golden["candidates_B"]
    logits = np.array(golden["compare_logits"], dtype=np.float64)
    np.testing.assert_allclose(hf_model.probability(inputs, a, b), 1 / (1 + np.exp(-logits / 2)), atol=1e-5)
    # TRL's former soft PairRMJudge score sigmoid(f(A,B) - f(B,A)) is our temperature 0.5
    half = hf_model.probability(inputs, a, b, temperature=0.5)
    np.testing.assert_allclose(half, 1 / (1 + np.exp(-logits)), atol=1e-5)
    swapped = hf_model.probability(inputs, b, a)
    np.testing.assert_allclose(hf_model.probability(inputs, a, b) + swapped, 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        hf_model.probability(inputs, a, b, temperature=0)


def test_single_order_modes_and_slot_bias(hf_model, golden):
    inputs, a, b = golden["inputs"], golden["candidates_A"], golden["candidates_B"]
    ab = hf_model.compare(inputs, a, b, mode="[A,B]", return_logits=True)
    ba = hf_model.compare(inputs, a, b, mode="[B,A]", return_logits=True)
    np.testing.assert_allclose(hf_model.compare(inputs, a, b, return_logits=True), ab - ba, atol=1e-5)
    assert not np.allclose(ab, -ba, atol=1e-3)  # PairRM is not antisymmetric


def test_identical_candidates_score_exactly_zero(hf_model):
    calls = []
    original = hf_model.backend.forward
    hf_model.backend.forward = lambda pairs: calls.append(len(pairs)) or original(pairs)
    try:
        assert hf_model.compare(["q"], ["same"], ["same"], return_logits=True)[0] == 0.0
        assert calls == []  # nothing was run
        scores = hf_model.rank_with_ref(["q"], [["a", "bb", "longest one"]], return_scores=True)
        assert scores[0, 2] == 0.0 and scores[0, 0] != 0.0
    finally:
        hf_model.backend.forward = original


def test_ranks_from_scores_share_smaller_rank():
    np.testing.assert_array_equal(aggregation.ranks_from_scores(np.array([[0.5, 2.0, 0.5, -1.0]])), [[2, 1, 2, 4]])


def test_rank_is_round_robin_of_single_order_logits(hf_model):
    cands = ["alpha", "beta gamma", "delta epsilon zeta"]
    scores = hf_model.rank(["prompt"], [cands], return_scores=True)[0]
    m = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            if i != j:
                m[i, j] = hf_model.compare(["prompt"], [cands[i]], [cands[j]], mode="[A,B]", return_logits=True)[0]
    np.testing.assert_allclose(scores, (m - m.T).sum(axis=1) / 3, atol=1e-5)


@pytest.mark.parametrize(
    "mode,index", [("longest", 2), ("shortest", 0), ("median_length", 1), ("first", 0), ("last", 2)]
)
def test_ref_modes(hf_model, mode, index):
    cands = [["a", "bb", "ccc"]]
    scores = hf_model.rank_with_ref(["q"], cands, return_scores=True, ref_mode=mode)
    assert scores[0, index] == 0.0
    explicit = hf_model.rank_with_ref(["q"], cands, return_scores=True, ref_candidates=[cands[0][index]])
    np.testing.assert_allclose(scores, explicit, atol=1e-6)


def test_instructions_are_prepended(hf_model):
    with_instr = hf_model.compare(["world"], ["a"], ["b"], instructions=["hello "], return_logits=True)
    joined = hf_model.compare(["hello world"], ["a"], ["b"], return_logits=True)
    assert with_instr[0] == pytest.approx(joined[0], abs=1e-6)


def test_best_of_n(hf_model):
    cands = [["one", "two two", "three three three"], ["x", "y", "z"]]
    scores = hf_model.rank(["p", "q"], cands, return_scores=True)
    best = hf_model.best_of_n(["p", "q"], cands)
    assert best == [c[int(np.argmax(s))] for c, s in zip(cands, scores)]
