"""Tests for the offline tiny policy used across the test-suite."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairrm_rlhf.core.assets import bundled

from tiny_policy import (
    BOS_TOKEN,
    DEFAULT_SYSTEM,
    IM_END,
    IM_START,
    PAD_TOKEN,
    QWEN_SAMPLING,
    build_tiny_policy,
    build_tiny_tokenizer,
    save_tiny_policy,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Explain the sun."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_tokenizer_is_deterministic(tokenizer) -> None:
    other = build_tiny_tokenizer()
    text = "Tell me about a quiet morning. 3 + 6 = 9"
    assert tokenizer(text).input_ids == other(text).input_ids
    assert tokenizer.get_vocab() == other.get_vocab()
    assert len(tokenizer) == 320
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.bos_token == BOS_TOKEN
    assert tokenizer.eos_token == IM_END
    ids = {tokenizer.convert_tokens_to_ids(t) for t in (PAD_TOKEN, BOS_TOKEN, IM_START, IM_END)}
    assert len(ids) == 4 and tokenizer.unk_token_id not in ids
    # Special tokens are single ids, and BOS is not added automatically.
    assert tokenizer(IM_START + "hi" + IM_END).input_ids[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert tokenizer.bos_token_id not in tokenizer("hello").input_ids


def test_custom_texts() -> None:
    tok = build_tiny_tokenizer(["aaaa bbbb aaaa bbbb"] * 10, vocab_size=270)
    assert len(tok) <= 270
    assert tok.decode(tok("aaaa bbbb").input_ids) == "aaaa bbbb"


def test_chat_template(tokenizer) -> None:
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nExplain the sun.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # no system message: Qwen2.5's template adds a default one
    assert tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False, add_generation_prompt=True) == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nExplain the sun.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    assert not no_gen.endswith("assistant\n")
    full = tokenizer.apply_chat_template(MESSAGES + [{"role": "assistant", "content": "Hot."}], tokenize=False)
    assert full.endswith("<|im_start|>assistant\nHot.<|im_end|>\n")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_policy_config_and_sampling(tokenizer, arch: str) -> None:
    model = build_tiny_policy(tokenizer, arch=arch)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]  # Qwen-style
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    assert {k: getattr(model.generation_config, k) for k in QWEN_SAMPLING} == QWEN_SAMPLING
    assert model.config.tie_word_embeddings and model.config.dtype == torch.bfloat16
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    enc = tokenizer([prompt, "Hi"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, max_new_tokens=8)
    assert out.shape[0] == 2 and enc.input_ids.shape[1] < out.shape[1] <= enc.input_ids.shape[1] + 8
    assert isinstance(tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True), str)


def test_policy_is_deterministic_and_seeded(tokenizer) -> None:
    state = torch.random.get_rng_state()
    a = build_tiny_policy(tokenizer, seed=0).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    b = build_tiny_policy(tokenizer, seed=0).state_dict()
    c = build_tiny_policy(tokenizer, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_arch(tokenizer) -> None:
    with pytest.raises(ValueError):
        build_tiny_policy(tokenizer, arch="gpt9")


def test_save_load_round_trip(tmp_path, tokenizer) -> None:
    path = save_tiny_policy(tmp_path / "tiny")
    assert path == str(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    text = "Summarize fresh bread."
    assert tok(text).input_ids == tokenizer(text).input_ids
    assert tok.pad_token_id == tokenizer.pad_token_id and tok.eos_token == IM_END
    assert tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )
    # stored like Qwen2.5: bf16 weights and a bf16 dtype in config.json (transformers 5 loads "auto" by default)
    assert model.dtype == torch.bfloat16
    auto = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    assert auto.dtype == torch.bfloat16 and auto.config.dtype == torch.bfloat16
    fresh = build_tiny_policy(tokenizer, dtype=torch.bfloat16).state_dict()
    loaded = auto.state_dict()
    assert all(torch.equal(fresh[k], loaded[k]) for k in fresh)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert {k: getattr(model.generation_config, k) for k in QWEN_SAMPLING} == QWEN_SAMPLING


def test_bundled_asset_is_save_tiny_policy(tmp_path) -> None:
    """pairrm_rlhf/assets/tiny-policy is exactly what save_tiny_policy writes (regenerate it when this changes)."""
    fresh, bundled_path = save_tiny_policy(tmp_path / "tiny"), bundled("policy")
    a = AutoModelForCausalLM.from_pretrained(fresh, dtype="auto").state_dict()
    b = AutoModelForCausalLM.from_pretrained(bundled_path, dtype="auto").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.bfloat16 for k in a)
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert _settings(tmp_path / "tiny" / name) == _settings(Path(bundled_path) / name), name
    saved = (tmp_path / "tiny" / "chat_template.jinja").read_text()
    assert saved == (Path(bundled_path) / "chat_template.jinja").read_text()


def _settings(path: Path) -> dict:
    """A saved JSON file's values without the writer's version stamp, which changes with every transformers release."""
    values = json.loads(path.read_text())
    values.pop("transformers_version", None)
    return values


def test_settings_ignore_only_the_version_stamp(tmp_path) -> None:
    """The comparison above still sees any real change of a saved value."""
    (tmp_path / "a.json").write_text(json.dumps({"transformers_version": "5.24.0", "eos_token_id": 2}))
    (tmp_path / "b.json").write_text(json.dumps({"transformers_version": "5.25.0", "eos_token_id": 2}))
    (tmp_path / "c.json").write_text(json.dumps({"transformers_version": "5.24.0", "eos_token_id": 3}))
    assert _settings(tmp_path / "a.json") == _settings(tmp_path / "b.json")
    assert _settings(tmp_path / "a.json") != _settings(tmp_path / "c.json")
