"""The engine: same numbers as one pair at a time, whatever the batching; dedupe, budget, OOM back-off."""

import copy
import logging
import math

import numpy as np
import pytest
import torch

from pairrm_rlhf.core.engine import PairScorer


def _one_at_a_time(model, triples):
    scorer = model.backend
    return np.array([scorer._forward(scorer.build([t])) for t in triples]).ravel()


def _texts(rng, n, low, high):
    words = ["alpha", "beta", "gamma", "delta", "return", "value", "the", "of", "module", "file", "path"]
    return [" ".join(rng.choice(words, size=int(rng.integers(low, high)))) for _ in range(n)]


def test_engine_equals_one_pair_at_a_time(hf_model, golden):
    rng = np.random.default_rng(0)
    prompts = _texts(rng, 6, 1, 400) + golden["inputs"][5:6]  # includes a prompt past the source budget
    answers = _texts(rng, 8, 0, 700)
    triples = [
        (prompts[int(rng.integers(len(prompts)))], answers[int(rng.integers(8))], answers[int(rng.integers(8))])
        for _ in range(16)
    ]
    triples += triples[:5]  # duplicates
    order = rng.permutation(len(triples))
    triples = [triples[i] for i in order]
    budget = hf_model.backend.max_tokens
    try:
        hf_model.backend.max_tokens = 4096
        got = hf_model.backend.score(triples)
    finally:
        hf_model.backend.max_tokens = budget
    # float noise of different GEMM shapes only: far below the 1e-4 parity bar
    np.testing.assert_allclose(got, _one_at_a_time(hf_model, triples), atol=5e-5, rtol=0)


def test_duplicates_scored_once_and_batches_sorted_under_budget(hf_model, monkeypatch):
    rng = np.random.default_rng(1)
    texts = _texts(rng, 12, 1, 300)
    triples = [("prompt", a, b) for a in texts for b in texts if a != b][:60]
    seen = []
    original = hf_model.backend._forward

    def spy(pairs):
        seen.append([len(ids) for ids, _ in pairs])
        return original(pairs)

    monkeypatch.setattr(hf_model.backend, "_forward", spy)
    monkeypatch.setattr(hf_model.backend, "max_tokens", 3000)
    hf_model.backend.score(triples + triples[::-1])
    assert sum(len(b) for b in seen) == len(set(triples))
    for batch in seen:
        assert len(batch) == 1 or len(batch) * max(batch) <= 3000
    firsts = [b[0] for b in seen]
    assert firsts == sorted(firsts, reverse=True)  # longest batches first, lengths sorted within
    assert all(b == sorted(b, reverse=True) for b in seen)


def test_out_of_memory_splits_and_retries(hf_model, monkeypatch, caplog):
    rng = np.random.default_rng(2)
    texts = _texts(rng, 6, 1, 200)
    triples = [("q", a, b) for a in texts for b in texts if a != b]
    expected = hf_model.backend.score(triples)
    original = hf_model.backend._forward

    def flaky(pairs):
        if len(pairs) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(pairs)

    monkeypatch.setattr(hf_model.backend, "_forward", flaky)
    monkeypatch.setattr(hf_model.backend, "max_tokens", 100_000)
    with caplog.at_level(logging.WARNING):
        got = hf_model.backend.score(triples)
    np.testing.assert_allclose(got, expected, atol=5e-5, rtol=0)  # other batch shapes: float noise only
    assert "out of memory" in caplog.text
    assert hf_model.backend.max_tokens < 100_000  # the budget shrinks for later batches


def test_single_pair_out_of_memory_is_raised(hf_model, monkeypatch):
    def oom(pairs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(hf_model.backend, "_forward", oom)
    with pytest.raises(torch.OutOfMemoryError):
        hf_model.backend.score([("q", "a", "b")])


def test_non_finite_half_precision_is_recomputed_in_float32(hf_model, monkeypatch, caplog):
    triples = [("q", "a", "b"), ("q", "b", "a")]
    expected = hf_model.backend.score(triples)
    original = hf_model.backend._run

    def overflowing(pairs, dtype):
        out = original(pairs, torch.float32)
        return np.full_like(out, np.inf) if dtype == torch.float16 else out

    monkeypatch.setattr(hf_model.backend, "_run", overflowing)
    monkeypatch.setattr(hf_model.backend, "dtype", torch.float16)
    with caplog.at_level(logging.WARNING):
        got = hf_model.backend.score(triples)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert "recomputing" in caplog.text
    monkeypatch.setattr(hf_model.backend, "dtype", torch.float32)
    monkeypatch.setattr(hf_model.backend, "_run", lambda pairs, dtype: np.full(len(pairs), np.nan, dtype=np.float32))
    with pytest.raises(FloatingPointError, match="non-finite"):
        hf_model.backend.score([("q", "c", "d")])


def test_texts_with_identical_ids_are_one_input(hf_model, monkeypatch):
    """Texts that differ but tokenize alike (a double space, a zero-width space: the normalizer removes both) are one
    model input: one forward, and a two-order logit of exactly 0 even when the two orders would land in different
    batches (here batch_size=3 puts f(x,A,B) next to a long pair and f(x,B,A) alone)."""
    scorer = hf_model.backend
    a, b = "the answer is forty two", "the answer is  forty\u200btwo"
    assert scorer.tokenize([a])[a] == scorer.tokenize([b])[b]
    long_answer = " ".join(["delta"] * 300)
    rows = []
    original = scorer._forward
    monkeypatch.setattr(scorer, "_forward", lambda pairs: rows.append(len(pairs)) or original(pairs))
    logits = hf_model.compare(["q", "q"], [long_answer, a], [a, b], return_logits=True, batch_size=3)
    assert logits[1] == 0.0 and logits[0] != 0.0
    assert sum(rows) == 3  # (q, long, a), (q, a, long) and one input for both orders of (a, b)
    pairs, slot = scorer.distinct_inputs([("q", a, b), ("q", b, a), ("q", a, a), ("q", b, "x")])
    assert slot == [0, 0, 0, 1] and len(pairs) == 2
    scores = hf_model.rank(["q"], [[a, long_answer, b, "x"]], return_scores=True, batch_size=3)[0]
    assert scores[0] == scores[2]  # the same input everywhere: an exact tie, sharing a rank


def test_identity_changes_with_only_encoder_weights_or_only_dtype(hf_model):
    """One ulp in one encoder weight, or the compute dtype alone, gives another identity; the rest stays equal."""
    scorer = hf_model.backend
    base = scorer.identity()
    model = copy.deepcopy(scorer.model)
    other = PairScorer(model, scorer.tokenizer, scorer.layout, device=scorer.device)
    assert other.identity() == base
    weight = model.pretrained_model.encoder.layer[0].attention.self.query_proj.weight
    with torch.no_grad():
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(math.inf))  # in place, after a first identity()
    changed = other.identity()
    assert changed["weights"] != base["weights"]
    assert {k: v for k, v in changed.items() if k != "weights"} == {k: v for k, v in base.items() if k != "weights"}
    half = PairScorer(
        scorer.model, scorer.tokenizer, scorer.layout, device=scorer.device, dtype=torch.bfloat16
    ).identity()
    assert half["dtype"] == "bfloat16" and base["dtype"] == "float32"
    assert {k: v for k, v in half.items() if k != "dtype"} == {k: v for k, v in base.items() if k != "dtype"}


def test_cpu_supports_bf16_reads_the_cpu_flags(monkeypatch):
    from pairrm_rlhf.core.engine import cpu_supports_bf16, speed_first_dtype

    assert cpu_supports_bf16("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile")
    assert cpu_supports_bf16("flags\t\t: fpu amx_bf16 amx_tile")
    assert not cpu_supports_bf16("flags\t\t: fpu avx2 avx512f avx512_vnni")  # AVX-512 alone has no bf16 GEMM
    assert speed_first_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr("pairrm_rlhf.core.engine.cpu_supports_bf16", lambda flags=None: False)
    assert speed_first_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setattr("pairrm_rlhf.core.engine.cpu_supports_bf16", lambda flags=None: True)
    assert speed_first_dtype(torch.device("cpu")) == torch.bfloat16
