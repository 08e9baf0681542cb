"""Bad input gets a ValueError/TypeError naming the argument and the index; odd but valid input is scored."""

import numpy as np
import pytest


def test_mismatched_lengths(hf_model):
    with pytest.raises(ValueError, match="candidates_A has 2 items but inputs has 1"):
        hf_model.compare(["x"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="instructions has 2 items but inputs has 1"):
        hf_model.compare(["x"], ["a"], ["b"], instructions=["i", "j"])
    with pytest.raises(ValueError, match="ref_candidates has 1 items but inputs has 2"):
        hf_model.rank_with_ref(["x", "y"], [["a", "b"], ["c", "d"]], ref_candidates=["r"])


def test_non_string_items(hf_model):
    with pytest.raises(TypeError, match=r"candidates_B\[1\] must be a string, got int"):
        hf_model.compare(["x", "y"], ["a", "b"], ["c", 3])
    with pytest.raises(TypeError, match=r"inputs must be a list of strings, got str"):
        hf_model.compare("x", ["a"], ["b"])
    with pytest.raises(TypeError, match=r"candidates\[0\]\[1\] must be a string, got NoneType"):
        hf_model.rank(["x"], [["a", None]])


def test_candidate_lists(hf_model):
    with pytest.raises(ValueError, match=r"candidates\[1\] is empty"):
        hf_model.rank(["x", "y"], [["a"], []])
    with pytest.raises(ValueError, match=r"candidates\[1\] has 3 candidates but candidates\[0\] has 2"):
        hf_model.rank(["x", "y"], [["a", "b"], ["c", "d", "e"]])
    with pytest.raises(ValueError, match="ref_mode must be one of"):
        hf_model.rank_with_ref(["x"], [["a", "b"]], ref_mode="best")
    with pytest.raises(ValueError, match="mode must be"):
        hf_model.compare(["x"], ["a"], ["b"], mode="A>B")


def test_malformed_conversations(hf_model):
    ok = [{"role": "USER", "content": "hi"}, {"role": "ASSISTANT", "content": "hello"}]
    with pytest.raises(ValueError, match=r"conversations_b\[0\]\[0\] has role 'ASSISTANT'; expected USER"):
        hf_model.compare_conversations([ok], [[ok[1], ok[0]]])
    with pytest.raises(ValueError, match=r"conversations_a\[0\] must have an even"):
        hf_model.compare_conversations([ok[:1]], [ok[:1]])
    with pytest.raises(ValueError, match=r"USER turn 0 of conversations_a\[0\] and conversations_b\[0\] differ"):
        hf_model.compare_conversations([ok], [[{"role": "user", "content": "other"}, ok[1]]])
    with pytest.raises(TypeError, match=r"conversations_a\[0\]\[1\] must be a dict with a string 'content'"):
        hf_model.compare_conversations([[ok[0], {"role": "ASSISTANT"}]], [ok])
    with pytest.raises(ValueError, match=r"conversations_a\[0\] has 2 turns but conversations_b\[0\] has 1"):
        hf_model.compare_conversations([ok + ok], [ok])


def test_empty_and_huge_strings_are_scored(hf_model):
    huge = "lorem ipsum " * 20000
    logits = hf_model.compare(["", huge, "x"], ["", "a", huge], [huge, "", ""], return_logits=True)
    assert logits.shape == (3,) and np.isfinite(logits).all()
    scores = hf_model.rank([""], [["", "", "a"]], return_scores=True)
    assert np.isfinite(scores).all()
