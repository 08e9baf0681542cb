"""Each row of docs/migrating.md: what llm-blender and TRL <= 1.0 users wrote runs here with the same numbers."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BASE_MODEL, BLENDER_CHECKPOINT, HF_CHECKPOINT
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairrm_rlhf import OnlineDPOJudgeReward, PairRM, PairRMJudge
from pairrm_rlhf.core.assets import bundled

TOL = 1e-4
DOC = Path(__file__).parents[1] / "docs" / "migrating.md"


def test_every_row_names_a_test_that_exists():
    named = re.findall(r"`(test_[a-z0-9_]+)`", DOC.read_text())
    assert len(named) >= 12
    missing = [name for name in named if name not in globals()]
    assert not missing, f"docs/migrating.md names tests that do not exist: {missing}"


def test_loadranker_becomes_from_pretrained(golden):
    # the blender layout reads its base encoder's config and tokenizer (the hub's microsoft/deberta-v3-large, as
    # llm-blender's loadranker does; a local copy here)
    for blender in (PairRM.from_pretrained(BLENDER_CHECKPOINT, base_model=BASE_MODEL),
                    PairRM.from_pretrained(HF_CHECKPOINT)):
        got = blender.compare(golden["inputs"], golden["candidates_A"], golden["candidates_B"], return_logits=True)
        np.testing.assert_allclose(got, golden["compare_logits"], atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["[A,B]+[B,A]", "[A,B] + [B,A]", " [A,B]+ [B,A] "])
def test_compare_as_written(hf_model, golden, mode):
    got = hf_model.compare(golden["inputs"], golden["candidates_A"], golden["candidates_B"], batch_size=2,
                           return_logits=True, mode=mode)
    np.testing.assert_allclose(got, golden["compare_logits"], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="mode must be"):
        hf_model.compare(golden["inputs"], golden["candidates_A"], golden["candidates_B"], mode="[A,B]*2")


def test_rank_as_written(hf_model, golden):
    scores = hf_model.rank(golden["inputs"], golden["candidates"], return_scores=True, batch_size=1)
    np.testing.assert_allclose(scores, golden["rank_scores"], atol=TOL, rtol=0)


def test_disable_tqdm(hf_model, golden, capsys):
    args = golden["inputs"], golden["candidates_A"], golden["candidates_B"]
    got = hf_model.compare(*args, return_logits=True, disable_tqdm=True)
    np.testing.assert_allclose(got, golden["compare_logits"], atol=TOL, rtol=0)
    hf_model.rank(golden["inputs"], golden["candidates"], disable_tqdm=True)
    assert "PairRM" not in capsys.readouterr().err  # no bar
    hf_model.compare(*args, disable_tqdm=False, batch_size=1)
    assert "PairRM" in capsys.readouterr().err  # disable_tqdm=False asks for the bar, as llm-blender shows it
    with pytest.raises(ValueError, match="disagree"):
        hf_model.compare(*args, disable_tqdm=True, show_progress_bar=True)


def test_rank_with_ref_as_in_llm_blenders_readme(hf_model, golden):
    got = hf_model.rank_with_ref(golden["inputs"], golden["candidates"], return_scores=True, batch_size=2,
                                 mode="longest")
    np.testing.assert_allclose(got, golden["rank_with_ref_longest"], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="ref_mode"):
        hf_model.rank_with_ref(golden["inputs"], golden["candidates"], mode="shortest")


def test_compare_conversations_as_written(hf_model, golden):
    got = hf_model.compare_conversations(golden["conversations_a"], golden["conversations_b"], return_logits=True)
    np.testing.assert_allclose(got, golden["compare_conversations_logits"], atol=TOL, rtol=0)


def test_get_best_of_n_as_written(hf_model, golden):
    inputs, candidates = golden["inputs"][:3], [c[:3] for c in golden["candidates"][:3]]
    best = hf_model.get_best_of_n(inputs, candidates, pairrm_cmp_type="bubble", return_all=True)
    assert [sorted(b) for b in best] == [sorted(c) for c in candidates]  # every candidate, each once
    full = hf_model.get_best_of_n(inputs, candidates, pairrm_cmp_type="full")
    scores = hf_model.rank(inputs, candidates, return_scores=True)
    assert full == [c[int(np.argmax(s))] for c, s in zip(candidates, scores)]


@pytest.fixture(scope="module")
def policy():
    path = bundled("policy")
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def test_best_of_n_generate_as_written(hf_model, policy):
    model, tokenizer = policy
    torch.manual_seed(0)
    best = hf_model.best_of_n_generate(model, tokenizer, ["Tell me a joke.", "Name a color."], n=3, max_new_tokens=6)
    torch.manual_seed(0)
    samples = hf_model.n_generate(model, tokenizer, ["Tell me a joke.", "Name a color."], n=3, max_new_tokens=6)
    assert best == hf_model.get_best_of_n(["Tell me a joke.", "Name a color."], samples)


def test_best_of_n_generate_takes_message_lists(hf_model, policy):
    model, tokenizer = policy
    prompts = [[{"role": "user", "content": "Tell me a joke."}], [{"role": "user", "content": "Name a color."}]]
    torch.manual_seed(0)
    ranked = hf_model.best_of_n_generate(model, tokenizer, prompts, n=3, max_new_tokens=6, pairrm_cmp_type="full",
                                         return_all=True)
    torch.manual_seed(0)
    samples = hf_model.n_generate(model, tokenizer, prompts, n=3, max_new_tokens=6)
    for prompt, group, order in zip(prompts, samples, ranked):
        # the ranking is compare_conversations' (PairRM's multi-turn format), round robin over the samples
        convs = [prompt + [{"role": "assistant", "content": s}] for s in group]
        pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
        z = hf_model.compare_conversations([convs[i] for i, _ in pairs], [convs[j] for _, j in pairs],
                                           return_logits=True)
        scores = np.zeros(3)
        for (i, _), value in zip(pairs, z):
            scores[i] += value
        expected = [group[i] for i in np.argsort(-scores, kind="stable")]
        assert order == expected


def test_num_beams_names_the_alternative(hf_model, policy):
    model, tokenizer = policy
    with pytest.raises(ValueError, match="num_beams.*get_best_of_n"):
        hf_model.best_of_n_generate(model, tokenizer, ["Hi"], n=2, num_beams=4)


def test_pairrm_judge_as_written(hf_model, golden):
    judge = PairRMJudge(hf_model)
    pairs = [[a, b] for a, b in zip(golden["candidates_A"], golden["candidates_B"])]
    expected = [0 if z >= 0 else 1 for z in golden["compare_logits"]]
    assert judge.judge(golden["inputs"], pairs) == expected


def test_online_dpo_judge_becomes_a_reward(hf_model, golden):
    """OnlineDPO calls reward functions with prompts = 2 * prompts and keeps sample 1 when its reward is >= sample
    2's: with OnlineDPOJudgeReward, that is exactly the old judge's choice."""
    judge, reward = PairRMJudge(hf_model), OnlineDPOJudgeReward(pairrm=hf_model)
    prompts, a, b = golden["inputs"], golden["candidates_A"], golden["candidates_B"]
    rewards = reward(prompts=prompts + prompts, completions=a + b)
    n = len(prompts)
    chosen_first = [rewards[i] >= rewards[n + i] for i in range(n)]
    assert [0 if c else 1 for c in chosen_first] == judge.judge(prompts, [[x, y] for x, y in zip(a, b)])


def test_a_judge_passed_as_a_reward_says_how_to_wrap_it(hf_model):
    with pytest.raises(TypeError, match=r"PairwiseReward\(pairrm=judge.pairrm\).*OnlineDPOJudgeReward"):
        PairRMJudge(hf_model)(prompts=["Hi"], completions=["Hello"])
