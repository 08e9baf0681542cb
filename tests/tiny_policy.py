"""Tiny, offline, deterministic chat policy (tokenizer + randomly initialised causal LM) for tests.

Nothing here touches the model hub: the tokenizer is a byte-level BPE trained in-process on a small
built-in corpus and the model is built from a config with a fixed seed.

The stand-in carries Qwen2.5-0.5B-Instruct's properties that change training and sampling: the saved checkpoint
declares `dtype: bfloat16` and stores bf16 weights, embeddings are tied, the ChatML template adds a default system
message, EOS is `[<|im_end|>, <|pad|>]` (Qwen: `[151645, 151643]`, the second also its pad) and the
generation_config samples like Qwen's (do_sample, temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.1:
Qwen/Qwen2.5-0.5B-Instruct's generation_config.json; 1.05 is the 3B/7B value).
`pairrm_rlhf/assets/tiny-policy` is `save_tiny_policy` of this module (regenerate with
`python tests/tiny_policy.py pairrm_rlhf/assets/tiny-policy`).
"""

from __future__ import annotations

import itertools
import logging
import os

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

logger = logging.getLogger(__name__)

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS: list[str] = [PAD_TOKEN, BOS_TOKEN, IM_START, IM_END]

DEFAULT_SYSTEM = "You are a helpful assistant."
# Qwen2.5's ChatML shape (without tools): a default system message when the conversation has none. BOS is never
# emitted by the template (as with Qwen2); EOS is <|im_end|>.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_INSTRUCTIONS = [
    "Explain", "Describe", "Summarize", "Tell me about", "Write a short note on", "Give an example of",
    "What is", "Why do people like", "How does one learn", "List three facts about",
]
_TOPICS = [
    "the sun", "the ocean", "a good book", "green tea", "the moon", "a small garden", "the city at night",
    "a quiet morning", "rain in spring", "the mountains", "a friendly dog", "fresh bread", "the river",
    "a long walk", "music", "the stars", "winter snow", "a helpful answer", "kind words", "simple math",
]
_RESPONSES = [
    "Sure, here is a short answer about {t}.",
    "I think {t} is interesting because it is simple and calm.",
    "Here are a few words: {t} is nice, clear and useful.",
    "Of course. People often enjoy {t} on a good day.",
    "That is a great question. In short, {t} is worth a look.",
]


# Qwen/Qwen2.5-0.5B-Instruct generation_config.json sampling fields.
QWEN_SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)


def default_corpus() -> list[str]:
    """Return the built-in deterministic corpus (a few hundred short instruction/response lines)."""
    lines: list[str] = []
    for i, (ins, topic) in enumerate(itertools.product(_INSTRUCTIONS, _TOPICS)):
        lines.append(f"{ins} {topic}.")
        lines.append(_RESPONSES[i % len(_RESPONSES)].format(t=topic))
    lines += [f"{a} + {b} = {a + b}" for a in range(10) for b in range(0, 10, 3)]
    return lines


def build_tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE tokenizer with a ChatML-like chat template.

    Special tokens: ``<|pad|>`` (pad), ``<|bos|>`` (bos, not added automatically),
    ``<|im_start|>`` and ``<|im_end|>`` (eos). Padding side is left (generation-friendly).
    """
    corpus = list(texts) if texts is not None else default_corpus()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=IM_END,
        additional_special_tokens=[IM_START],
        padding_side="left",
        model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    logger.debug("Built tiny tokenizer: vocab=%d (corpus lines=%d)", len(tokenizer), len(corpus))
    return tokenizer


def build_tiny_policy(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Build a randomly initialised tiny causal LM (``qwen2`` or ``llama``) matching ``tokenizer``.

    Initialisation is deterministic under ``seed`` and does not disturb the global torch RNG. The weights are
    `dtype` (default float32; `save_tiny_policy` stores bfloat16 like Qwen2.5); the config declares bfloat16.
    """
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if arch == "qwen2":
        config = Qwen2Config(**common)
    elif arch == "llama":
        config = LlamaConfig(**common)
    else:
        raise ValueError(f"Unsupported arch {arch!r}; expected 'qwen2' or 'llama'.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.config.dtype = torch.bfloat16  # what Qwen2.5 declares; loaders that honour it ("auto") get bf16
    model.generation_config = GenerationConfig(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id],
        **QWEN_SAMPLING,
    )
    n_params = sum(p.numel() for p in model.parameters())
    logger.debug("Built tiny %s policy with %d parameters (seed=%d)", arch, n_params, seed)
    return model


def save_tiny_policy(path: str | os.PathLike[str], *, arch: str = "qwen2", seed: int = 0) -> str:
    """Build the tiny tokenizer + policy and ``save_pretrained`` both into ``path``; return it as ``str``."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_policy(tokenizer, arch=arch, seed=seed, dtype=torch.bfloat16)
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    logger.info("Saved tiny %s policy to %s", arch, path)
    return path


if __name__ == "__main__":
    import sys

    print(save_tiny_policy(sys.argv[1]))
