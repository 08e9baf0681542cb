"""Property tests of the library API's input handling: whatever callers pass (any unicode, control characters, empty
and huge strings, PairRM's added-token strings, nested lists, None, numbers), every call of `PairRM.compare`,
`probability`, `rank`, `rank_with_ref` and `compare_conversations` either succeeds with finite results or raises
ValueError/TypeError. Well-typed text must always succeed.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
VALID = settings(SETTINGS, max_examples=30)  # these run full forwards (long ones for huge text): fewer examples
TOKENS = ["<|source|>", "<|candidate1|>", "<|candidate2|>", "<|candidate|>", "[SEP]", "[CLS]", "[MASK]", "[PAD]",
          "[UNK]", "<Response 1>", "USER:", "Assistant:"]
PIECES = [*TOKENS, " ", "\n", "\r\n", "\t", "\x00", "\x1b", "\x7f", "\u200b", "\ufeff", "\u2028", "é", "ﬁ", "…",
          "Ａ", "😀", "\u0301", "a", "word "]

any_char = st.characters(exclude_categories=("Cs",))  # every code point but lone surrogates: controls, format, ...
small = st.text(any_char, max_size=30)
pieces = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)  # added tokens and specials inside text
text = st.one_of(small, pieces, st.just(""))
# Huge text is cut to PairRM's token budgets; each such pair costs a full-length forward, so it has its own test.
huge = st.builds(lambda piece, n: piece * n, st.sampled_from(["a", "<|source|> ", "😀", "[SEP]", "x y\n", "\x00\n"]),
                 st.integers(600, 30_000))
any_text = st.one_of(text, st.text(st.characters(exclude_categories=()), max_size=10))  # lone surrogates too
numbers = st.one_of(st.integers(), st.floats(), st.booleans())
junk = st.recursive(
    st.one_of(st.none(), numbers, any_text, st.binary(max_size=4)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                            st.dictionaries(st.text(max_size=3), inner, max_size=2)),
    max_leaves=6,
)
texts_or_junk = st.one_of(st.lists(any_text, max_size=3), st.lists(st.one_of(any_text, junk), max_size=3), junk)


def texts(n: int) -> st.SearchStrategy:
    """Mostly a list of n texts (sometimes with junk in it); else a list of another length, or anything at all."""
    aligned = st.lists(any_text, min_size=n, max_size=n)
    return st.one_of(aligned, aligned, st.lists(st.one_of(any_text, junk), min_size=n, max_size=n), texts_or_junk)


def candidates(n: int, k: int) -> st.SearchStrategy:
    """Mostly n lists of k texts; else ragged lists, or anything at all."""
    aligned = st.lists(texts(k), min_size=n, max_size=n)
    return st.one_of(aligned, aligned, st.lists(texts_or_junk, max_size=3), junk)


modes = st.one_of(st.sampled_from(["[A,B]+[B,A]", "[A,B]", "[B,A]"]), junk)
batch_sizes = st.one_of(st.none(), st.integers(-2, 4), junk)
temperatures = st.one_of(st.floats(), st.integers(), junk)


def check_finite(out, rows: int | None = None) -> None:
    out = np.asarray(out)
    assert out.dtype != object
    if out.dtype != bool:
        assert np.isfinite(out).all(), out
    if rows is not None:
        assert out.shape[0] == rows


def call(fn, *args, **kwargs):
    """The call's result, or None when it raised ValueError/TypeError (any other exception fails the test)."""
    try:
        result = fn(*args, **kwargs)
    except (ValueError, TypeError) as error:
        event(f"rejected: {type(error).__name__}")
        return None
    event("scored")
    return result


# ---- anything in: result or ValueError/TypeError --------------------------------------------------------------------
@SETTINGS
@given(n=st.integers(0, 3), data=st.data(), mode=modes, return_logits=st.one_of(st.booleans(), junk),
       batch_size=batch_sizes)
def test_compare_any_input(hf_model, n, data, mode, return_logits, batch_size):
    inputs, a, b = data.draw(texts(n)), data.draw(texts(n)), data.draw(texts(n))
    instructions = data.draw(st.one_of(st.none(), texts(n)))
    out = call(hf_model.compare, inputs, a, b, instructions=instructions, batch_size=batch_size,
               return_logits=return_logits, mode=mode)
    if out is not None:
        check_finite(out, len(inputs))


@SETTINGS
@given(n=st.integers(0, 3), data=st.data(), temperature=temperatures)
def test_probability_any_input(hf_model, n, data, temperature):
    inputs, a, b = data.draw(texts(n)), data.draw(texts(n)), data.draw(texts(n))
    out = call(hf_model.probability, inputs, a, b, temperature=temperature)
    if out is not None:
        check_finite(out, len(inputs))
        assert ((out >= 0) & (out <= 1)).all()


@SETTINGS
@given(n=st.integers(0, 3), k=st.integers(0, 3), data=st.data(), return_scores=st.one_of(st.booleans(), junk),
       batch_size=batch_sizes)
def test_rank_any_input(hf_model, n, k, data, return_scores, batch_size):
    inputs, cands = data.draw(texts(n)), data.draw(candidates(n, k))
    instructions = data.draw(st.one_of(st.none(), texts(n)))
    out = call(hf_model.rank, inputs, cands, instructions=instructions, return_scores=return_scores,
               batch_size=batch_size)
    if out is not None:
        check_finite(out, len(inputs))


ref_modes = st.one_of(st.sampled_from(["longest", "shortest", "median_length", "first", "last"]), junk)


@SETTINGS
@given(n=st.integers(0, 3), k=st.integers(0, 3), data=st.data(), ref_mode=ref_modes, return_scores=st.booleans())
def test_rank_with_ref_any_input(hf_model, n, k, data, ref_mode, return_scores):
    inputs, cands = data.draw(texts(n)), data.draw(candidates(n, k))
    ref_candidates = data.draw(st.one_of(st.none(), texts(n)))
    out = call(hf_model.rank_with_ref, inputs, cands, ref_mode=ref_mode, ref_candidates=ref_candidates,
               return_scores=return_scores)
    if out is not None:
        check_finite(out, len(inputs))


roles = st.one_of(st.sampled_from(["user", "USER", "assistant", "Assistant", "system", ""]), junk)


@st.composite
def conversation_pairs(draw):
    """Two lists of conversations: mostly valid (same USER turns, alternating roles), sometimes with one message
    replaced by junk or a wrong role, sometimes anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return draw(junk), draw(junk)
    sides = ([], [])
    for _ in range(draw(st.integers(0, 2))):
        turns = draw(st.lists(st.tuples(any_text, any_text, any_text), min_size=1, max_size=2))
        for side, pick in zip(sides, (1, 2)):
            side.append([m for t in turns
                         for m in ({"role": "user", "content": t[0]}, {"role": "assistant", "content": t[pick]})])
    if sides[0] and draw(st.booleans()):
        conv = draw(st.sampled_from(sides[draw(st.integers(0, 1))]))
        i = draw(st.integers(0, len(conv) - 1))
        conv[i] = draw(st.one_of(junk, st.fixed_dictionaries({"role": roles, "content": st.one_of(any_text, junk)})))
    return sides


@SETTINGS
@given(convs=conversation_pairs(), mode=modes, return_logits=st.booleans())
def test_compare_conversations_any_input(hf_model, convs, mode, return_logits):
    conv_a, conv_b = convs
    out = call(hf_model.compare_conversations, conv_a, conv_b, return_logits=return_logits, mode=mode)
    if out is not None:
        check_finite(out, len(conv_a))


# ---- well-typed text in: always a finite result ---------------------------------------------------------------------
@st.composite
def aligned(draw, lists: int, max_n: int = 3):
    n = draw(st.integers(1, max_n))
    return [draw(st.lists(text, min_size=n, max_size=n)) for _ in range(lists)]


@VALID
@given(data=aligned(3), temperature=st.floats(0.01, 100))
def test_valid_text_always_scores(hf_model, data, temperature):
    inputs, a, b = data
    logits = hf_model.compare(inputs, a, b, return_logits=True)
    check_finite(logits, len(inputs))
    assert (hf_model.compare(inputs, a, a, return_logits=True) == 0).all()  # A vs A is exactly a tie
    p = hf_model.probability(inputs, a, b, temperature=temperature)
    check_finite(p, len(inputs))
    assert ((p >= 0) & (p <= 1)).all()


@VALID
@given(inputs=st.lists(text, min_size=1, max_size=2), n=st.integers(1, 3), data=st.data())
def test_valid_candidates_always_rank(hf_model, inputs, n, data):
    candidates = [data.draw(st.lists(text, min_size=n, max_size=n)) for _ in inputs]
    ranks = hf_model.rank(inputs, candidates)
    assert ranks.shape == (len(inputs), n) and ((ranks >= 1) & (ranks <= n)).all()
    scores = hf_model.rank_with_ref(inputs, candidates, return_scores=True, ref_candidates=[c[0] for c in candidates])
    check_finite(scores, len(inputs))
    assert (scores[:, 0] == 0).all()  # a candidate equal to its reference scores exactly 0


@VALID
@given(turns=st.lists(st.tuples(text, text, text), min_size=1, max_size=2))
def test_valid_conversations_always_compare(hf_model, turns):
    conv_a = [m for u, a, _ in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    conv_b = [m for u, _, b in turns for m in ({"role": "USER", "content": u}, {"role": "ASSISTANT", "content": b})]
    check_finite(hf_model.compare_conversations([conv_a], [conv_b], return_logits=True), 1)


@settings(SETTINGS, max_examples=10)
@given(slot=st.integers(0, 2), big=huge, other=text)
def test_huge_text_is_truncated_and_scored(hf_model, slot, big, other):
    args = [[other], [other], [other + "!"]]
    args[slot] = [big]
    check_finite(hf_model.compare(*args, return_logits=True), 1)
    scores = hf_model.rank_with_ref([args[0][0]], [[args[1][0], args[2][0]]], return_scores=True, ref_mode="longest")
    check_finite(scores, 1)


def test_empty_inputs_and_extreme_temperatures(hf_model):
    assert hf_model.rank_with_ref([], [], return_scores=True).shape == (0, 0)
    assert hf_model.rank([], [], return_scores=True).shape == (0, 0)
    for bad in (10**400, float("inf"), float("nan"), 0, -1):
        with pytest.raises(ValueError, match="temperature"):
            hf_model.probability(["x"], ["a"], ["b"], temperature=bad)
    with pytest.raises(TypeError, match="temperature"):
        hf_model.probability(["x"], ["a"], ["b"], temperature="hot")
    with pytest.raises(ValueError, match=r"inputs\[0\] is not valid Unicode"):
        hf_model.compare(["\ud800"], ["a"], ["b"])
    with pytest.raises(ValueError, match="batch_size"):
        hf_model.compare(["x"], ["a"], ["b"], batch_size=0)
