"""Sampling is exactly what was asked: one explicit GenerationConfig from the user's settings
(`pairrm_rlhf.core.generation`); the checkpoint's generation_config applies only on opt-in."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.generation import NEUTRAL, SamplingArguments, build_generation_config, sample_responses

from tiny_policy import QWEN_SAMPLING

PROMPTS = [[{"role": "user", "content": "Explain the sun."}], [{"role": "user", "content": "Describe the ocean."}]]
K = 4


@pytest.fixture(scope="module")
def greedy_checkpoint(tmp_path_factory):
    """The bundled tiny policy, re-saved with a generation_config that makes sampling deterministic: top_k=1 and a
    repetition penalty (as a real checkpoint may ship them)."""
    path = tmp_path_factory.mktemp("topk1")
    model = AutoModelForCausalLM.from_pretrained(bundled("policy"))
    tokenizer = AutoTokenizer.from_pretrained(bundled("policy"))
    model.generation_config.update(top_k=1, repetition_penalty=1.3, temperature=0.7, top_p=0.8)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def test_bundled_policy_declares_qwen_sampling():
    model, _ = load(bundled("policy"))
    for name, value in QWEN_SAMPLING.items():
        assert getattr(model.generation_config, name) == value, name


def test_checkpoint_top_k_1_still_gives_k_distinct_samples(greedy_checkpoint):
    model, tokenizer = load(greedy_checkpoint)
    torch.manual_seed(0)
    samples = sample_responses(model, tokenizer, PROMPTS, K, max_new_tokens=8, temperature=1.0)
    for responses in samples:
        assert len(set(responses)) == K, responses  # the checkpoint's top_k=1 did not apply
    config = build_generation_config(model, tokenizer, SamplingArguments(max_new_tokens=8, temperature=1.0))
    assert (config.top_k, config.top_p, config.min_p, config.repetition_penalty) == (0, 1.0, 0.0, 1.0)
    assert config.temperature == 1.0 and config.do_sample


def test_checkpoint_sampling_only_on_opt_in(greedy_checkpoint):
    model, tokenizer = load(greedy_checkpoint)
    sampling = SamplingArguments(max_new_tokens=8, use_checkpoint_sampling=True)
    config = build_generation_config(model, tokenizer, sampling)
    assert (config.top_k, config.repetition_penalty, config.temperature, config.top_p) == (1, 1.3, 0.7, 0.8)
    torch.manual_seed(0)
    samples = sample_responses(model, tokenizer, PROMPTS, K, sampling=sampling)
    for responses in samples:
        assert len(set(responses)) == 1  # top_k=1: the opt-in really takes the checkpoint's fields
    # a field the user sets still wins over the checkpoint's
    config = build_generation_config(model, tokenizer, SamplingArguments(top_k=5, use_checkpoint_sampling=True))
    assert config.top_k == 5 and config.repetition_penalty == 1.3


def test_neutral_values_and_eos_from_checkpoint():
    model, tokenizer = load(bundled("policy"))
    config = build_generation_config(model, tokenizer, SamplingArguments())
    assert {k: getattr(config, k) for k in NEUTRAL} == NEUTRAL
    # Qwen-style EOS list: <|im_end|> and the pad/endoftext token both stop generation
    assert config.eos_token_id == [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]


def test_ppo_rollouts_sample_explicitly():
    from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer

    model, tokenizer = load(bundled("policy"))
    data = [{"prompt": "x"}] * 4
    trainer = PPOTrainer(
        PPOConfig(use_cpu=True, per_device_train_batch_size=2, save_final=False, temperature=0.9),
        model,
        tokenizer,
        lambda **kw: [0.0] * len(kw["prompts"]),
        data,
    )
    g = trainer.generation_config
    assert (g.top_k, g.top_p, g.repetition_penalty, g.temperature) == (0, 1.0, 1.0, 0.9)
