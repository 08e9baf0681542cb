"""Every field of the reference's recorded outputs (llm-blender 0.0.2, CPU fp32) reproduced, both layouts."""

import numpy as np
import torch

TOL = 1e-4


def test_layouts_detected(hf_model, blender_model):
    assert hf_model.kind == "hf" and blender_model.kind == "blender"


def test_token_ids_equal_reference(model, golden):
    triples = list(zip(golden["inputs"], golden["candidates_A"], golden["candidates_B"]))
    built = model.backend.build(triples)
    for case, ((ids, _), expected) in enumerate(zip(built, golden["hf_input_ids"])):
        assert ids == expected, f"case {case}"


def test_forward_on_reference_ids(model, golden):
    layout = model.backend.layout
    for case, (ids, expected) in enumerate(zip(golden["hf_input_ids"], golden["hf_logits"])):
        positions = (1, ids.index(layout.cand1_prefix_id), ids.index(layout.cand2_prefix_id))
        with torch.inference_mode():
            mask = torch.ones(1, len(ids), dtype=torch.long)
            got = model.backend.model(torch.tensor([ids]), mask, torch.tensor([positions]))
        assert abs(float(got[0]) - expected) < TOL, f"case {case}"


def test_compare_single_order(model, golden):
    got = model.compare(
        golden["inputs"], golden["candidates_A"], golden["candidates_B"], mode="[A,B]", return_logits=True
    )
    np.testing.assert_allclose(got, golden["compare_AB_logits"], atol=TOL, rtol=0)


def test_compare_default(model, golden):
    got = model.compare(golden["inputs"], golden["candidates_A"], golden["candidates_B"], return_logits=True)
    np.testing.assert_allclose(got, golden["compare_logits"], atol=TOL, rtol=0)
    as_bool = model.compare(golden["inputs"], golden["candidates_A"], golden["candidates_B"])
    assert as_bool.dtype == bool
    np.testing.assert_array_equal(as_bool, np.array(golden["compare_logits"]) > 0)


def test_rank(model, golden):
    scores = model.rank(golden["inputs"], golden["candidates"], return_scores=True)
    np.testing.assert_allclose(scores, golden["rank_scores"], atol=TOL, rtol=0)
    np.testing.assert_array_equal(model.rank(golden["inputs"], golden["candidates"]), golden["ranks"])


def test_rank_with_ref(model, golden):
    longest = model.rank_with_ref(golden["inputs"], golden["candidates"], return_scores=True)
    np.testing.assert_allclose(longest, golden["rank_with_ref_longest"], atol=TOL, rtol=0)
    given = model.rank_with_ref(
        golden["inputs"], golden["candidates"], return_scores=True, ref_candidates=golden["ref_candidates"]
    )
    np.testing.assert_allclose(given, golden["rank_with_ref_given"], atol=TOL, rtol=0)


def test_compare_conversations(model, golden):
    got = model.compare_conversations(golden["conversations_a"], golden["conversations_b"], return_logits=True)
    np.testing.assert_allclose(got, golden["compare_conversations_logits"], atol=TOL, rtol=0)
