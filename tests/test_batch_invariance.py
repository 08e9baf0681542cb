"""Results do not depend on batch size, token budget or input order (long, truncated cases included)."""

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # sweeps of the whole golden set (~35 s on 2 cores): in `make test`, not `make test-fast`


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_rank_and_compare_invariant_to_batch_size(hf_model, golden, batch_size):
    ref_rank = hf_model.rank(golden["inputs"], golden["candidates"], return_scores=True, batch_size=1)
    triple = golden["inputs"], golden["candidates_A"], golden["candidates_B"]
    ref_cmp = hf_model.compare(*triple, return_logits=True, batch_size=1)
    rank = hf_model.rank(golden["inputs"], golden["candidates"], return_scores=True, batch_size=batch_size)
    cmp = hf_model.compare(*triple, return_logits=True, batch_size=batch_size)
    np.testing.assert_allclose(rank, ref_rank, atol=1e-5, rtol=0)
    np.testing.assert_allclose(cmp, ref_cmp, atol=1e-5, rtol=0)


def test_invariant_to_order_and_token_budget(hf_model, golden):
    inputs, a, b = golden["inputs"], golden["candidates_A"], golden["candidates_B"]
    expected = hf_model.compare(inputs, a, b, return_logits=True)
    rng = np.random.default_rng(0)
    budget = hf_model.backend.max_tokens
    try:
        for max_tokens in (2048, 4096, 100_000):
            hf_model.backend.max_tokens = max_tokens
            perm = rng.permutation(len(inputs))
            got = hf_model.compare(
                [inputs[i] for i in perm], [a[i] for i in perm], [b[i] for i in perm], return_logits=True
            )
            np.testing.assert_allclose(got, expected[perm], atol=1e-5, rtol=0)
    finally:
        hf_model.backend.max_tokens = budget
