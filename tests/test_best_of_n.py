"""Best of n with llm-blender's `Blender` semantics (yuchenlin/LLM-Blender `llm_blender/blender/blender.py`:
`get_best_of_n`, `get_worst_of_n`, `n_generate`, `best_of_n_generate`; bubble pass: `llm_blender/pair_ranker/ranker.py`
`_bubble_predict`)."""

import pytest
import torch

import pairrm_rlhf.best_of_n as best_of_n_module
from pairrm_rlhf import PairRM
from pairrm_rlhf.core.generation import SamplingArguments, load_policy

from known_preference import LengthBackend


def bubble_reference(candidates, order, best=True):
    """One pass of llm-blender's bubble selection over `order` with the length judge: the winner of each match
    moves on (best: cur moves on iff z > 0; worst: iff z < 0); returns [winner, losers in match order]."""
    holder, losers = order[0], []
    for nxt in order[1:]:
        z = len(candidates[holder]) - len(candidates[nxt])
        moves = z > 0 if best else z < 0
        losers.append(nxt if moves else holder)
        holder = holder if moves else nxt
    return [holder, *losers]


CANDS = [["bb", "a", "eeeee", "ccc", "dddd"], ["xx", "yy", "z", "ww", "v"]]  # input 2: ties among the longest


@pytest.mark.parametrize("best", [True, False])
def test_bubble_is_one_seeded_pass(best):
    backend = LengthBackend()
    model = PairRM(backend)
    select = model.get_best_of_n if best else model.get_worst_of_n
    result = select(["p", "q"], CANDS, return_all=True, seed=3)
    assert backend.scored == 2 * 4 * 2  # n - 1 matches per input, each in both orders
    generator = torch.Generator().manual_seed(3)
    for cands, got in zip(CANDS, result):
        order = torch.randperm(len(cands), generator=generator).tolist()
        assert got == [cands[i] for i in bubble_reference(cands, order, best)]
    assert result[0][0] == ("eeeee" if best else "a")
    assert select(["p", "q"], CANDS, seed=3) == [r[0] for r in result]
    assert select(["p", "q"], CANDS, return_all=True, seed=3) == result  # the seed fixes the order
    # ties go to the later candidate of the random order (best and worst alike)
    tied = ["xx", "yy", "ww"]
    order = torch.randperm(3, generator=torch.Generator().manual_seed(5)).tolist()
    assert select(["q"], [tied], seed=5) == [tied[order[-1]]]


def test_full_is_the_deterministic_ranking():
    model = PairRM(LengthBackend())
    cands = [["bb", "a", "eeeee", "ccc", "dd"]]
    best_first = [["eeeee", "ccc", "bb", "dd", "a"]]
    assert model.get_best_of_n(["p"], cands, pairrm_cmp_type="full", return_all=True) == best_first
    worst_first = [["a", "bb", "dd", "ccc", "eeeee"]]
    assert model.get_worst_of_n(["p"], cands, pairrm_cmp_type="full", return_all=True) == worst_first
    assert model.get_best_of_n(["p"], cands, pairrm_cmp_type="full") == ["eeeee"] == model.best_of_n(["p"], cands)
    with pytest.raises(ValueError, match="pairrm_cmp_type"):
        model.get_best_of_n(["p"], cands, pairrm_cmp_type="tournament")


def test_single_candidates_are_not_scored():
    backend = LengthBackend()
    model = PairRM(backend)
    assert model.get_best_of_n(["p", "q"], [["a"], ["b"]]) == ["a", "b"]
    assert model.get_worst_of_n(["p", "q"], [["a"], ["b"]], return_all=True) == [["a"], ["b"]]
    assert backend.scored == 0


def test_ranking_sees_instruction_plus_input(hf_model):
    cands = [["Paris.", "Lyon, I think.", "It is Paris, the capital."]]
    with_instruction = hf_model.get_best_of_n(["capital of France?"], cands, ["Answer: "], "full", return_all=True)
    joined = hf_model.get_best_of_n(["Answer: capital of France?"], cands, None, "full", return_all=True)
    assert with_instruction == joined


def test_n_generate_prompts_and_sampling(monkeypatch):
    calls = []
    monkeypatch.setattr(best_of_n_module, "sample_responses",
                        lambda model, tok, prompts, n, sampling:
                        calls.append((prompts, sampling)) or [["r"] * n for _ in prompts])
    model = PairRM(LengthBackend())
    out = model.n_generate("policy", "tok", ["a", "b", "c"], ["Do X", "Do Y", "Do Z"], n=2, batch_size=2)
    assert out == [["r", "r"]] * 3
    assert [c[0] for c in calls] == [["Do X\na", "Do Y\nb"], ["Do Z\nc"]]  # instruction + "\n" + input, in batches
    assert calls[0][1] == SamplingArguments(do_sample=True, top_p=1.0, temperature=0.7)
    calls.clear()
    model.n_generate("policy", "tok", ["a"], n=1, sampling_mode="top_k_sampling", temperature=0.2, max_new_tokens=9)
    assert calls[0] == (["a"], SamplingArguments(do_sample=True, top_k=50, temperature=0.2, max_new_tokens=9))
    calls.clear()
    model.n_generate("policy", "tok", ["a"], n=1, sampling_mode=None, do_sample=False)
    assert calls[0][1] == SamplingArguments(do_sample=False)
    with pytest.raises(ValueError, match="sampling_mode"):
        model.n_generate("policy", "tok", ["a"], sampling_mode="beam")
    with pytest.raises(TypeError, match="max_length"):
        model.n_generate("policy", "tok", ["a"], max_length=20)
    with pytest.raises(ValueError, match="instructions has 1 items but inputs has 2"):
        model.n_generate("policy", "tok", ["a", "b"], ["x"])


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny", device="cpu")


def test_best_of_n_generate_with_llm_blender_arguments(hf_model, policy):
    model, tokenizer = policy
    inputs, instructions = ["Tell me about the sun.", "What is green tea?"], ["Answer briefly.", "Be kind."]
    torch.manual_seed(0)
    samples = hf_model.n_generate(model, tokenizer, inputs, instructions, 3, "top_p_sampling", 4, max_new_tokens=8)
    assert [len(s) for s in samples] == [3, 3]
    # llm-blender's positional order: instructions, n, sampling_mode, batch_size, cmp type, return_all
    torch.manual_seed(0)
    every = hf_model.best_of_n_generate(model, tokenizer, inputs, instructions, 3, "top_p_sampling", 4, "full", True,
                                        max_new_tokens=8)
    assert every == hf_model.get_best_of_n(inputs, samples, instructions, "full", return_all=True)
    assert [sorted(e) for e in every] == [sorted(s) for s in samples]
    torch.manual_seed(0)
    best = hf_model.best_of_n_generate(model, tokenizer, inputs, instructions, n=3, max_new_tokens=8)  # bubble
    assert best == hf_model.get_best_of_n(inputs, samples, instructions)
