"""Labeling samples exactly what was asked: the checkpoint's generation_config applies only on request,
and transformers and vLLM get the same parameters.

vLLM is not installed here: its parameter mapping is tested with a stand-in `vllm` module (`fake_vllm`: SamplingParams
and LLM record what they are given, by vLLM's names and arguments).
"""

from __future__ import annotations

import copy
import sys

import pytest
from datasets import Dataset
from fake_vllm import FakeLLM, install

from pairrm_rlhf.core.generation import SamplingArguments, build_generation_config
from pairrm_rlhf.labeling import PreferenceLabeler
from pairrm_rlhf.labeling.labeler import _chunk_seed

from tiny_policy import build_tiny_policy, build_tiny_tokenizer

PROMPTS = ["Explain the sun.", "Describe the ocean.", "What is green tea?"]
ASKED = SamplingArguments(
    max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2, stop=["\n\n"]
)


@pytest.fixture(scope="module")
def greedy_checkpoint():
    """The tiny policy with a checkpoint generation_config that would make all K samples equal: top_k=1 plus a
    repetition penalty (as real checkpoints ship sampling fields, e.g. Qwen2.5's top_k=20, repetition_penalty=1.1)."""
    tokenizer = build_tiny_tokenizer()
    model = copy.deepcopy(build_tiny_policy(tokenizer))
    model.generation_config.update(do_sample=True, top_k=1, repetition_penalty=1.3, temperature=0.7)
    return model, tokenizer


def test_k_distinct_samples_despite_a_top_k_1_checkpoint(hf_model, greedy_checkpoint):
    model, tokenizer = greedy_checkpoint
    asked = PreferenceLabeler(
        hf_model,
        model,
        tokenizer,
        num_responses=4,
        sampling=SamplingArguments(max_new_tokens=8),
        allow_unfinished_chosen=True,
    )  # the tiny policy rarely ends within 8 tokens
    for responses in asked.generate(PROMPTS, seed=0):
        assert len(set(responses)) == 4, responses
    # the same checkpoint with its own sampling fields opted in: top_k=1 makes the K samples identical
    opted = PreferenceLabeler(
        hf_model,
        model,
        tokenizer,
        num_responses=4,
        sampling=SamplingArguments(max_new_tokens=8, use_checkpoint_sampling=True),
        allow_unfinished_chosen=True,
    )
    for responses in opted.generate(PROMPTS, seed=0):
        assert len(set(responses)) == 1, responses
    data = Dataset.from_dict({"prompt": PROMPTS})
    asked.label(data)
    opted.label(data)
    assert asked.stats.ties_dropped == 0 and asked.stats.pairs == 3
    assert opted.stats.ties_dropped == 3 and opted.stats.pairs == 0


# ---- vLLM ---------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_vllm(monkeypatch):
    return install(monkeypatch)


def vllm_call(hf_model, sampling, prompts=PROMPTS, num_responses=3):
    labeler = PreferenceLabeler(hf_model, "org/policy", backend="vllm", num_responses=num_responses, sampling=sampling)
    out = labeler.label(Dataset.from_dict({"prompt": prompts}), chunk_size=2)
    (llm,) = FakeLLM.instances
    return llm, out


def test_vllm_gets_exactly_the_asked_sampling(hf_model, fake_vllm, greedy_checkpoint):
    llm, out = vllm_call(hf_model, ASKED)
    # vLLM's finish_reason "length" (the fake's first sample of each prompt) is an unfinished response: never chosen
    assert all(row["finished"] == [False, True, True] for row in out)
    assert all(row["chosen"] != row["all_generated_responses"][0] for row in out)
    assert llm.model == "org/policy"
    assert [(method, len(prompts)) for method, prompts, _ in llm.calls] == [("generate", 2), ("generate", 1)]
    for chunk, (_, _, params) in enumerate(llm.calls):
        assert params == {
            "n": 3,
            "seed": _chunk_seed(0, chunk),
            "max_tokens": 7,
            "stop": ["\n\n"],
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 5,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
        }
    assert out["all_generated_responses"][0] == [f"{PROMPTS[0]} #{i}" for i in range(3)]
    # transformers gets the same numbers from the same SamplingArguments
    config = build_generation_config(*greedy_checkpoint, ASKED)
    hf = {k: getattr(config, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    assert hf == {k: llm.calls[0][2][k] for k in hf}
    assert (config.max_new_tokens, config.stop_strings) == (7, ["\n\n"])


def test_vllm_neutral_defaults_and_checkpoint_opt_in(hf_model, fake_vllm):
    llm, _ = vllm_call(hf_model, SamplingArguments(max_new_tokens=16))
    neutral = llm.calls[0][2]
    assert {k: neutral[k] for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "stop")} == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "stop": None,
    }
    FakeLLM.instances = []
    llm, _ = vllm_call(hf_model, SamplingArguments(max_new_tokens=16, top_p=0.95, use_checkpoint_sampling=True))
    opted = llm.calls[0][2]  # unset fields from the model's generation_config (as vLLM reads it); top_p as asked
    assert {k: opted[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty")} == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "repetition_penalty": 1.1,
    }


def test_vllm_conversations_go_through_chat(hf_model, fake_vllm):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    llm, out = vllm_call(hf_model, SamplingArguments(max_new_tokens=4), prompts=prompts, num_responses=2)
    assert [method for method, _, _ in llm.calls] == ["chat"]
    assert out["all_generated_responses"][0] == [f"{PROMPTS[0]} #0", f"{PROMPTS[0]} #1"]


def test_vllm_absent_is_a_clear_import_error(hf_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not
    with pytest.raises(ImportError, match=r"backend='vllm' needs the vllm package.*pip install vllm"):
        PreferenceLabeler(hf_model, "org/policy", backend="vllm")


def test_sampling_must_be_sampling_arguments(hf_model, greedy_checkpoint):
    with pytest.raises(TypeError, match="sampling must be a SamplingArguments, got dict"):
        PreferenceLabeler(hf_model, *greedy_checkpoint, sampling={"temperature": 0.7})
