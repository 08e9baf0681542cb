"""Tokenization as PairRM was trained: same ids from tokenizer.json and from spm.model, prefixes never forged."""

import pytest
from conftest import BASE_MODEL, HF_CHECKPOINT

from pairrm_rlhf.core.tokenization import PREFIX_TOKENS, load_text_tokenizer, tokenizer_from_spm

TRICKY = [
    "Leaves fall, crisp and red\u2026 \uff21\uff0c",  # ellipsis, full-width forms
    "\ufb01ne \u00a0 ok",  # ligature, non-breaking space
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u4f60\u597d \U0001F600",
    "  spaced   out\ttext\n\nnew  ",
    "[CLS] [MASK] [PAD] [UNK] [SEP]",
    "def f(x):\n    return x * 2\n",
    "",
    "\u200b\u2028zero-width and line separators\u00ad",
    "ＡＢＣ　全角　スペース",
]


def test_spm_conversion_matches_tokenizer_json():
    from_json = load_text_tokenizer(HF_CHECKPOINT)
    from_spm = tokenizer_from_spm(BASE_MODEL / "spm.model")
    for text in TRICKY:
        spm_ids = from_spm.encode(text, add_special_tokens=False).ids
        assert spm_ids == from_json.encode(text, add_special_tokens=False).ids, text


def test_special_token_strings_are_single_tokens():
    tok = load_text_tokenizer(HF_CHECKPOINT)
    ids = tok.encode("a [MASK] b [CLS]", add_special_tokens=False).ids
    assert tok.token_to_id("[MASK]") in ids and tok.token_to_id("[CLS]") in ids


@pytest.mark.parametrize("forged", PREFIX_TOKENS)
def test_prefix_strings_in_user_text_do_not_become_prefix_tokens(model, forged):
    layout = model.backend.layout
    prefix_ids = {layout.source_prefix_id, layout.cand1_prefix_id, layout.cand2_prefix_id, layout.source_prefix_id + 3}
    text = f"please {forged} ignore {forged}"
    ids, positions = model.backend.build([(text, text, text)])[0]
    expected = [layout.source_prefix_id, layout.cand1_prefix_id, layout.cand2_prefix_id]
    assert [i for i in ids if i in prefix_ids] == expected
    assert [ids[p] for p in positions] == [layout.source_prefix_id, layout.cand1_prefix_id, layout.cand2_prefix_id]


def test_sep_in_text_becomes_space(model):
    with_sep = model.compare(
        ["Edge [SEP] case"], ["an answer with [SEP] inside"], ["x"], mode="[A,B]", return_logits=True
    )
    with_space = model.compare(["Edge   case"], ["an answer with   inside"], ["x"], mode="[A,B]", return_logits=True)
    assert with_sep[0] == pytest.approx(with_space[0], abs=1e-6)


def test_truncation_budgets(model):
    layout = model.backend.layout
    long_text = "word " * 5000
    (ids, (s, a, b)), = model.backend.build([(long_text, long_text, long_text)])
    assert a == layout.source_max_length + 1  # the source segment is cut to exactly 1224 tokens
    assert len(ids) == layout.source_max_length + 2 * layout.candidate_max_length
    cls, sep = layout.cls_id, layout.sep_id
    assert ids[0] == cls and ids[a - 2] == sep and ids[a - 1] == cls and ids[b - 2] == sep and ids[-1] == sep
    # a short source leaves its unused budget to the candidates
    (ids, (s, a, b)), = model.backend.build([("hi", long_text, long_text)])
    source_len = a - 1
    each = (layout.source_max_length + 2 * layout.candidate_max_length - source_len) // 2
    assert b - a == each and len(ids) - (b - 1) == each
    assert model.backend.truncation_rate([("hi", long_text, "short")]) == 1.0
    assert model.backend.truncation_rate([("hi", "short", "short")]) == 0.0


def test_pretruncate_cuts_and_decodes_like_transformers():
    """Better-PairRM's pre-truncation: decode(encode(text)[-n:] or [:n], skip_special_tokens=True), then the
    tokenizer's clean_up_tokenization_spaces when it is on."""
    from transformers import PreTrainedTokenizerFast

    from pairrm_rlhf.core.tokenization import pretruncate

    tok = load_text_tokenizer(HF_CHECKPOINT)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(HF_CHECKPOINT) + "/tokenizer.json")
    text = "Hello , world ! It 's [SEP] fine .  Really   fine ."
    ids = tok.encode(text, add_special_tokens=False).ids
    for side, n in [("right", 5), ("left", 5), ("right", 1000)]:
        reference.truncation_side = side
        expected = reference.decode(reference.encode(text, add_special_tokens=False, max_length=n, truncation=True),
                                    skip_special_tokens=True)
        assert pretruncate(tok, text, n, side) == expected
    whole = pretruncate(tok, text, len(ids), "left")
    assert whole == "Hello , world  It 's fine . Really fine ."  # [SEP] and the tiny vocabulary's unknown "!" dropped
    assert pretruncate(tok, text, len(ids), "left", clean_up_spaces=True) == "Hello, world  It's fine. Really fine."
    left = pretruncate(tok, text, 3, "left")
    assert left.endswith("fine .") and not left.startswith("Hello")
