"""The length-controlled win rate (evaluation/length.py) and its place next to the raw win rate in recipe evaluation."""

import sys
from pathlib import Path

import numpy as np
import pytest

from pairrm_rlhf.evaluation import length_controlled_win_rate


def simulated(intercept: float, slope: float, n: int = 4000, seed: int = 0):
    """Verdicts drawn from P(win) = sigmoid(intercept + slope * tanh(d / std(d))), d skewed towards longer firsts."""
    rng = np.random.default_rng(seed)
    second = rng.integers(50, 400, n)
    first = second + rng.normal(120, 150, n)  # the policy writes longer, mostly
    d = first - second
    p = 1 / (1 + np.exp(-(intercept + slope * np.tanh(d / d.std()))))
    return (rng.random(n) < p).astype(float), first, second


def test_a_win_rate_bought_with_length_is_removed():
    wins, first, second = simulated(intercept=0.0, slope=3.0)
    assert wins.mean() > 0.7  # the raw win rate: the judge likes the longer answers
    assert length_controlled_win_rate(wins, first, second) == pytest.approx(0.5, abs=0.03)


def test_a_win_rate_that_does_not_depend_on_length_is_kept():
    wins, first, second = simulated(intercept=np.log(0.7 / 0.3), slope=0.0)
    assert length_controlled_win_rate(wins, first, second) == pytest.approx(wins.mean(), abs=0.03)
    assert length_controlled_win_rate(wins, first, second) == pytest.approx(0.7, abs=0.03)


def test_edges():
    assert length_controlled_win_rate([1, 0, 0.5], [3, 3, 3], [2, 2, 2]) == pytest.approx(0.5)  # no length variation
    assert 0.9 < length_controlled_win_rate([1.0] * 20, range(20), [5] * 20) < 1.0  # all wins: finite, near 1
    assert np.isnan(length_controlled_win_rate([], [], []))
    with pytest.raises(ValueError, match="wins has 2 items but the length difference has 3"):
        length_controlled_win_rate([1, 0], [1, 2, 3], [1, 2, 3])
    with pytest.raises(ValueError, match=r"wins must lie in \[0, 1\]"):
        length_controlled_win_rate([2, 0], [1, 2], [3, 4])


def test_recipe_win_rate_reports_the_length_controlled_rate_next_to_the_raw_one(hf_model):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
    import _common

    prompts = ["Explain the sun.", "Describe rain.", "What is tea?", "Name a colour.", "Say hi."]
    first = ["The sun is a star, hot and bright, at the centre of our system.", "Water falls.",
             "A drink made of leaves.", "Blue, like the sky on a clear day.", "Hi!"]
    second = ["A star.", "Rain is water falling from clouds in drops.", "Tea.", "Red.", "Hello there, how are you?"]
    out = _common.win_rate(hf_model, prompts, first, second)
    z = hf_model.compare(prompts, first, second, return_logits=True)
    wins = (z > 0) + 0.5 * (z == 0)
    assert out["win_rate"] == pytest.approx(wins.mean())
    assert out["lc_win_rate"] == pytest.approx(
        length_controlled_win_rate(wins, [len(a) for a in first], [len(b) for b in second]))
