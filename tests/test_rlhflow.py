"""RLHFlow's pair-preference judge with a real Llama-3 tokenizer: exact rendering, exact ids, the reference's
per-order temperature. References: RLHFlow/RLHF-Reward-Modeling `pair-pm/README.md` (usage) and
`pair-pm/process_pair_data.py` (training format); allenai/reward-bench `rewardbench/models/slicpairpm.py`."""

import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pairrm_rlhf import PairRM
from pairrm_rlhf.backends.rlhflow import RLHFlowScorer
from pairrm_rlhf.core.formats import render, rlhflow_context

LLAMA3 = Path(__file__).parent / "fixtures" / "llama3"
# RLHFlow's "plain" template exactly as the reference defines it (pair-pm/README.md), for the re-enactment below.
PLAIN = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n {{ message['content'] }}"
    "{% else %}\n\n<turn> assistant\n {{ message['content'] }}{% endif %}{% endfor %}\n\n\n"
)
THREE_TURNS = [
    {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Q2?"},
]


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama3")
    (directory / "tokenizer.json").write_bytes(lzma.decompress((LLAMA3 / "tokenizer.json.xz").read_bytes()))
    shutil.copy(LLAMA3 / "tokenizer_config.json", directory)
    return directory


@pytest.fixture(scope="module")
def llama3_tokenizer(llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama3_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(llama3_dir):
    """The reference's second tokenizer, `tokenizer_plain`, with the plain template set on it."""
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(llama3_dir)
    plain.chat_template = PLAIN
    return plain


@pytest.fixture(scope="module")
def judge(llama3_tokenizer) -> PairRM:
    """A 2-layer random Llama over the real Llama-3 vocabulary (the real model's tokenizer and template); a short
    RoPE wavelength makes its answer depend on the slot order, so the two orders disagree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(llama3_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192, rope_theta=1.0,
        bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=True, initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    scorer = RLHFlowScorer(model, llama3_tokenizer, device=torch.device("cpu"), max_length=8192)
    return PairRM(scorer, "causal-lm", "rlhflow")


def reference_ids(tokenizer, plain, messages, response_a, response_b) -> list[int]:
    """The reference procedure (pair-pm/README.md), step by step with transformers."""
    context = plain.apply_chat_template(messages, tokenize=False)
    prompt = f"[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False)
    return tokenizer.encode(text.replace(tokenizer.bos_token, ""), add_special_tokens=False)


def test_context_is_rendered_by_transformers(llama3_tokenizer):
    source, _ = render(THREE_TURNS, "x")
    expected = "\n\n<turn> user\n Hi\n<turn> assistant\n Hello\n<turn> user\n Q2?\n"
    assert rlhflow_context(llama3_tokenizer, source) == expected
    assert rlhflow_context(llama3_tokenizer, "Hi") == "\n\n<turn> user\n Hi\n"  # a plain prompt is one user turn
    # no system role: folded into the next user turn
    system = [{"role": "system", "content": "Be brief."}] + THREE_TURNS
    folded = rlhflow_context(llama3_tokenizer, render(system, "x")[0])
    assert folded.startswith("\n\n<turn> user\n Be brief.\n\nHi\n<turn>")


def test_prompt_ids_equal_the_reference(judge, llama3_tokenizer, plain_tokenizer):
    scorer = judge.backend
    assert (scorer.token_a, scorer.token_b) == (32, 33)
    source, a = render(THREE_TURNS, "a")
    ids, cut = scorer.prompt_ids((source, a, "b"))
    assert not cut and ids == reference_ids(llama3_tokenizer, plain_tokenizer, THREE_TURNS, "a", "b")
    # <|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] \n\n<turn> user\n Hi ... b<|eot_id|> + header
    assert ids == [
        128006, 882, 128007, 271, 58, 99465, 60, 4815, 27, 413, 29, 1217, 198, 21694, 198, 27, 413, 29, 18328, 198,
        22691, 198, 27, 413, 29, 1217, 198, 1229, 17, 5380, 510, 68883, 26289, 362, 60, 264, 510, 68883, 26289, 426,
        60, 293, 128009, 128006, 78191, 128007, 271,
    ]
    assert 128000 not in ids  # the BOS text is stripped and not added back
    conversation = [{"role": "user", "content": "How can I trick Eminem into marrying me?"}]
    for x, y in [("The only way ... good luck.", "You cannot trick Eminem."), ("B", "A")]:
        source, cand = render(conversation, x)
        expected = reference_ids(llama3_tokenizer, plain_tokenizer, conversation, x, y)
        assert scorer.prompt_ids((source, cand, y))[0] == expected


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_probability_applies_temperature_per_order(judge, llama3_tokenizer, plain_tokenizer, temperature):
    """PairRM.probability = the reference's mean over both orders of softmax([logit_A, logit_B] / T)."""
    model = judge.backend.model
    prompt, responses = "What is the sun?", ["A star.", "A planet, far from here."]
    probs = []
    for chosen_position in (0, 1):  # the reference loop (pair-pm/README.md), one plain forward per order
        ids = reference_ids(llama3_tokenizer, plain_tokenizer, [{"role": "user", "content": prompt}],
                            responses[chosen_position], responses[1 - chosen_position])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        logit_a, logit_b = float(logits[32]), float(logits[33])
        z = np.exp(logit_a / temperature) + np.exp(logit_b / temperature)
        probs.append(np.exp([logit_a, logit_b][chosen_position] / temperature) / z)
    expected = float(np.mean(probs))
    assert abs(expected - 0.5) > 1e-2  # the orders disagree: the wrong aggregation would be caught
    got = judge.probability([prompt], [responses[0]], [responses[1]], temperature=temperature)[0]
    assert got == pytest.approx(expected, rel=1e-5)
    if temperature != 1.0:  # not the two-order logit divided by 2T
        z2 = judge.compare([prompt], [responses[0]], [responses[1]], return_logits=True)[0]
        assert got != pytest.approx(1 / (1 + np.exp(-z2 / (2 * temperature))), rel=1e-4)
    assert judge.probability([prompt], ["same"], ["same"], temperature=temperature)[0] == 0.5


def test_long_context_is_cut_from_the_left(llama3_tokenizer, judge):
    scorer = RLHFlowScorer(judge.backend.model, llama3_tokenizer, device=torch.device("cpu"), max_length=120)
    turns = []
    for k in range(30):
        turns += [{"role": "user", "content": f"Tell me about the sun {k}."}, {"role": "assistant", "content": "Sure."}]
    source, a = render(turns + [{"role": "user", "content": "What is green tea?"}], "Green tea is nice.")
    ids, cut = scorer.prompt_ids((source, a, "No."))
    assert cut and len(ids) <= 120
    text = llama3_tokenizer.decode(ids)
    assert "What is green tea?\n [RESPONSE A] Green tea is nice. [RESPONSE B] No.<|eot_id|>" in text
    assert "sun 0." not in text and text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
