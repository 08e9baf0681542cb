"""Backends under `PairRM`: the contract, Better-PairRM's format and layout, RLHFlow's causal-LM judge."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from pairrm_rlhf import PairRM, PairRMJudge, PairwiseReward, PreferenceLabeler
from pairrm_rlhf.backends.rlhflow import RLHFlowScorer, swap_averaged_logit
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.backend import PairBackend
from pairrm_rlhf.core.formats import better_pairrm_source, render, rlhflow_context

from known_preference import LengthBackend
from tiny_policy import save_tiny_policy

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about the sun."},
    {"role": "assistant", "content": "The sun is a star."},
    {"role": "user", "content": "And the moon?"},
]


# ---- Better-PairRM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def better(tmp_path_factory) -> PairRM:
    directory = tmp_path_factory.mktemp("ckpt") / "tiny-Better-PairRM"  # detected by name, like maywell/Better-PairRM
    shutil.copytree(bundled("pairrm"), directory)
    return PairRM.from_pretrained(directory, device="cpu")


def test_better_pairrm_is_chosen_by_name_or_judge(better):
    assert better.template == "better-pairrm"
    layout = better.backend.layout
    assert (layout.source_max_length, layout.candidate_max_length) == (2030, 670)
    assert layout.truncate_source_left and layout.source_prefix_segment
    explicit = PairRM.from_pretrained(bundled("pairrm"), device="cpu", judge="better-pairrm")
    assert explicit.template == "better-pairrm" and explicit.backend.layout == layout
    assert PairRM.from_pretrained(bundled("pairrm"), device="cpu").template == "pairrm"
    assert isinstance(better.backend, PairBackend) and isinstance(explicit.backend, PairBackend)
    with pytest.deprecated_call():  # the name before the registry still works
        old = PairRM.from_pretrained(bundled("pairrm"), device="cpu", template="better-pairrm")
    assert old.template == "better-pairrm" and old.backend.layout == layout
    with pytest.raises(ValueError, match="judge: must be one of pairrm, better-pairrm, rlhflow, got 'vicuna'"):
        PairRM.from_pretrained(bundled("pairrm"), device="cpu", judge="vicuna")


def test_better_pairrm_rendering():
    """reward-bench's BETTER_PAIRRM_TEMPLATE (rewardbench/models/betterpairrm.py) rendered by jinja2 with
    add_generation_prompt=True gives exactly these strings (the template's indentation is part of them)."""
    source, candidate = render(CONVERSATION, "It orbits the earth.")
    assert source.startswith("Finish the following coversation")  # PairRM's text is unchanged
    assert better_pairrm_source(source) == (
        "SYSTEM MESSAGE: Be brief.\n    \n    USER: Tell me about the sun.\n    \n    ASSISTANT: The sun is a star."
        "\n    \n    USER: And the moon?\n    \n    ASSISTANT: "
    )
    assert candidate.response == "It orbits the earth."
    plain_source, plain_candidate = render("  hello!\n", "hi!")  # a plain prompt is one USER turn, trimmed
    assert better_pairrm_source(plain_source) == "USER: hello!\n    \n    ASSISTANT: "
    assert plain_candidate.response == "hi!"


def reward_bench_pair_ids(source, answer_a, answer_b) -> list[int]:
    """reward-bench's `tokenize_conv_pair` + `tokenize_pair` (rewardbench/models/betterpairrm.py) for one ordered
    pair, step by step with a transformers fast tokenizer (as transformers 4.57, which reward-bench pins, loads
    the checkpoint's tokenizer.json); the rendered source comes from `better_pairrm_source` (pinned above)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(bundled("pairrm"), "tokenizer.json"))

    def truncate_texts(text, max_length, side):  # encode without specials, cut, decode without specials
        tok.truncation_side = side
        ids = tok.encode(text, add_special_tokens=False, max_length=max_length, truncation=True)
        return tok.decode(ids, skip_special_tokens=True)

    source = truncate_texts(better_pairrm_source(source), 2030, "left")
    answer_a, answer_b = truncate_texts(answer_a, 670, "right"), truncate_texts(answer_b, 670, "right")
    tok.truncation_side = "left"
    source_ids = tok.encode("<|source|>") + tok.encode(source, max_length=2030 - 3, truncation=True)
    tok.truncation_side = "right"
    budget = (2030 + 2 * 670 - len(source_ids)) // 2
    a = tok.encode("<|candidate1|>" + answer_a, max_length=budget, truncation=True)
    b = tok.encode("<|candidate2|>" + answer_b, max_length=budget, truncation=True)
    return source_ids + a + b


LONG_TURNS = []
for _k in range(120):
    LONG_TURNS += [{"role": "user", "content": f"question number {_k} about the weather and the sea"},
                   {"role": "assistant", "content": f"answer number {_k}: it is sunny , calm and bright today !"}]


@pytest.mark.parametrize("case", ["plain", "multi-turn", "system", "long source", "long candidate"])
def test_better_pairrm_ids_equal_reward_bench(better, case):
    prompt = {
        "plain": "What is 2 + 2?", "multi-turn": CONVERSATION[1:], "system": CONVERSATION,
        "long source": LONG_TURNS + [{"role": "user", "content": "final question zebra"}],
        "long candidate": "Write a long essay.",
    }[case]
    answer_a = "word , and more . " * 900 if case == "long candidate" else "It is 4 ."
    answer_b = "No idea , sorry !"
    source, a = render(prompt, answer_a)
    _, b = render(prompt, answer_b)
    (ids, positions), = better.backend.build([(source, a, b)])
    assert ids == reward_bench_pair_ids(source, answer_a, answer_b)
    layout, tok = better.backend.layout, better.backend.tokenizer
    assert ids[:4] == [layout.cls_id, layout.source_prefix_id, layout.sep_id, layout.cls_id]
    assert [ids[p] for p in positions] == [layout.source_prefix_id, layout.cand1_prefix_id, layout.cand2_prefix_id]
    if case == "plain":  # USER: What is 2 + 2? ASSISTANT: | It is 4 . | No idea , sorry !
        assert ids == [1, 3001, 2, 1, 9, 2942, 311, 18, 2732, 12, 241, 560, 241, 677, 43, 103, 103, 909, 172, 1347, 18,
                       2, 1, 3002, 179, 12, 476, 9, 4, 2, 1, 3003, 1873, 274, 50, 61, 9, 6, 539, 97, 778, 2]
    if case == "long source":
        kept = tok.decode(ids[: positions[1]])  # cut from the left: the latest turns survive
        assert positions[1] - 1 <= 2030 and "zebra" in kept and "number 119" in kept and "number 0 " not in kept
    if case == "long candidate":  # pre-truncated to 670 tokens + 3 specials, although the budget allows more
        assert positions[2] - positions[1] == 673 and (2030 + 2 * 670 - (positions[1] - 1)) // 2 > 673
        assert better.backend.truncation_rate([(source, a, b)]) == 1.0
    if case in ("plain", "system"):
        assert better.backend.truncation_rate([(source, a, b)]) == 0.0


def test_better_pairrm_reads_clean_up_spaces_from_the_tokenizer_config(better, tmp_path):
    directory = tmp_path / "tiny-Better-PairRM"
    shutil.copytree(bundled("pairrm"), directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    cleaned = PairRM.from_pretrained(directory, device="cpu")
    assert better.backend.clean_up_spaces is False and cleaned.backend.clean_up_spaces is True
    assert cleaned.backend.identity() != better.backend.identity()
    assert better.backend.candidate_text("It is 4 , right .") == "It is 4 , right ."
    assert cleaned.backend.candidate_text("It is 4 , right .") == "It is 4, right."


def test_better_pairrm_compares_each_sides_own_history(better):
    """compare_conversations = f(x_A, A, B) - f(x_B, B, A), x_A and x_B each side's own history (reward-bench)."""
    conv_a = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
              {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "fine, thanks"}]
    conv_b = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"},
              {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "bad"}]
    z = better.compare_conversations([conv_a], [conv_b], return_logits=True)
    x_a, _ = render(conv_a[:3], "x")
    x_b, _ = render(conv_b[:3], "x")
    assert better_pairrm_source(x_a) != better_pairrm_source(x_b)
    f_ab = better.pair_logits([(x_a, "fine, thanks", "bad")])[0]
    f_ba = better.pair_logits([(x_b, "bad", "fine, thanks")])[0]
    assert z[0] == pytest.approx(f_ab - f_ba, rel=1e-5)
    shared = better.compare_conversations([conv_a], [conv_a[:3] + conv_b[3:]], return_logits=True)[0]
    assert z[0] != pytest.approx(shared, abs=1e-4)  # B's own history changes the result
    assert better.compare_conversations([conv_b], [conv_a], return_logits=True)[0] == pytest.approx(-z[0], rel=1e-5)
    one_order = better.compare_conversations([conv_a], [conv_b], mode="[A,B]", return_logits=True)
    assert one_order[0] == pytest.approx(f_ab, rel=1e-5)
    assert better.compare_conversations([conv_a], [conv_a], return_logits=True)[0] == 0.0
    with pytest.raises(ValueError, match="USER turn 1"):
        better.compare_conversations([conv_a], [conv_b[:2] + [{"role": "user", "content": "other"}] + conv_b[3:]])


def test_adapters_work_on_better_pairrm(better):
    prompts = ["What is 2 + 2?", CONVERSATION]
    completions = [["4", "five"], ["It orbits the earth.", "No idea."]]
    assert set(PairRMJudge(better, seed=0).judge(prompts, completions)) <= {0, 1}
    reward = PairwiseReward(better, mode="group", group_size=2)
    values = reward(prompts=[prompts[1]] * 2, completions=completions[1])
    assert len(values) == 2 and abs(sum(values) - 1.0) < 1e-5  # probabilities of a 2-group sum to 1
    labeler = PreferenceLabeler(better, responses_column="responses")
    scores = labeler.rank_responses([prompts[0]], [["4", "five", "four"]])
    assert scores[0].shape == (3,)
    logits = better.compare(["hello!"], ["hi!"], ["go away"], return_logits=True)
    assert logits.shape == (1,) and np.isfinite(logits).all()
    conv_a = [{"role": "USER", "content": "hi"}, {"role": "ASSISTANT", "content": "hello!"}]
    conv_b = [{"role": "USER", "content": "hi"}, {"role": "ASSISTANT", "content": "go away"}]
    assert better.compare_conversations([conv_a], [conv_b], return_logits=True).shape == (1,)


# ---- knockout (any backend) -----------------------------------------------------------------------------------
def test_knockout_plays_n_minus_one_matches():
    backend = LengthBackend()
    model = PairRM(backend)
    cands = [["bb", "a", "eeeee", "ccc", "dddd"], ["x", "yy", "zzz", "w", "vvvvvv"]]
    ranks = model.rank(["p", "q"], cands, tournament="knockout")
    assert backend.scored == 2 * 4 * 2  # 2 inputs x (N-1 = 4) matches x both orders
    assert ranks[0][2] == 1 and ranks[1][4] == 1  # the longest wins
    scores = model.rank(["p"], cands[:1], tournament="knockout", return_scores=True)
    assert scores[0].max() == 3 and (scores[0] == 3).sum() == 1  # 5 candidates: 3 rounds, one champion
    full = model.rank(["p"], cands[:1])
    assert full[0][2] == 1
    with pytest.raises(ValueError, match="tournament"):
        model.rank(["p"], cands[:1], tournament="swiss")


@pytest.mark.parametrize("tournament", ["round_robin", "knockout"])
def test_rank_of_nothing_is_empty(tournament):
    model = PairRM(LengthBackend())
    for return_scores in (False, True):
        assert model.rank([], [], tournament=tournament, return_scores=return_scores).shape == (0, 0)


# ---- RLHFlow --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rlhflow(tmp_path_factory) -> PairRM:
    path = save_tiny_policy(tmp_path_factory.mktemp("rlhflow") / "tiny-llama", arch="llama")
    return PairRM.from_pretrained(path, judge="rlhflow", device="cpu", max_length=256)


def test_rlhflow_prompt_format(rlhflow):
    """Exact ids with the real Llama-3 tokenizer: tests/test_rlhflow.py. Here: the pieces, with any chat template."""
    scorer = rlhflow.backend
    assert isinstance(scorer, RLHFlowScorer) and isinstance(scorer, PairBackend) and rlhflow.template == "rlhflow"
    source, a = render(CONVERSATION, "It orbits.")
    context = rlhflow_context(scorer.tokenizer, source)
    assert context == (  # system folded into the first user turn; trim_blocks: one newline between turns
        "\n\n<turn> user\n Be brief.\n\nTell me about the sun.\n<turn> assistant\n The sun is a star."
        "\n<turn> user\n And the moon?\n"
    )
    ids, cut = scorer.prompt_ids((source, a, "No."))
    expected = scorer.tokenizer.apply_chat_template(  # the model's own template, as the reference calls it
        [{"role": "user", "content": f"[CONTEXT] {context} [RESPONSE A] It orbits. [RESPONSE B] No. \n"}],
        tokenize=False,
    )
    assert not cut and ids == scorer.tokenizer.encode(expected, add_special_tokens=False)
    assert len(scorer.tokenizer.encode("A", add_special_tokens=False)) == 1


def test_rlhflow_warns_when_the_template_needs_the_generation_prompt(tmp_path, caplog):
    """The reference calls apply_chat_template without add_generation_prompt; a template that adds the assistant
    header only on request (like the tiny policy's) is loaded with a warning saying so."""
    path = save_tiny_policy(tmp_path / "tiny-llama", arch="llama")
    with caplog.at_level("WARNING", logger="pairrm_rlhf.backends.rlhflow"):
        PairRM.from_pretrained(path, judge="rlhflow", device="cpu")
    assert "add_generation_prompt" in caplog.text


def test_rlhflow_strips_bos_text(rlhflow):
    scorer = rlhflow.backend
    template = scorer.tokenizer.chat_template
    try:
        scorer.tokenizer.chat_template = "{{ bos_token }}" + template
        ids, _ = scorer.prompt_ids(("hi", "a", "b"))
    finally:
        scorer.tokenizer.chat_template = template
    assert scorer.tokenizer.bos_token_id not in ids
    assert ids == scorer.prompt_ids(("hi", "a", "b"))[0]


def test_rlhflow_swap_averaging(rlhflow):
    scorer = rlhflow.backend
    t_ab, t_ba = ("What is the sun?", "A star.", "A planet."), ("What is the sun?", "A planet.", "A star.")
    f_ab, f_ba = scorer.score([t_ab, t_ba])
    assert f_ab == pytest.approx(-f_ba, abs=1e-5)  # antisymmetric by construction
    d = []
    for triple in (t_ab, t_ba):  # one plain forward per order, logits of exactly "A" and "B"
        ids, _ = scorer.prompt_ids(triple)
        with torch.inference_mode():
            logits = scorer.model(input_ids=torch.tensor([ids])).logits[0, -1]
        p = torch.softmax(logits[[scorer.token_a, scorer.token_b]].double(), dim=0)
        d.append(p)
    p_avg = float(d[0][0] + d[1][1]) / 2  # P(first is better), averaged over both orders
    assert rlhflow.probability(["What is the sun?"], ["A star."], ["A planet."])[0] == pytest.approx(p_avg, abs=1e-5)
    assert swap_averaged_logit(np.array([0.0]), np.array([0.0]))[0] == 0.0
    assert np.isfinite(swap_averaged_logit(np.array([80.0]), np.array([-80.0]))).all()
    single = RLHFlowScorer(scorer.model, scorer.tokenizer, device=scorer.device, swap_average=False)
    raw = single.score([t_ab])[0]
    assert raw == pytest.approx(float(torch.log(d[0][0] / d[0][1])), abs=1e-4)


def test_rlhflow_left_truncation_and_batching(rlhflow):
    scorer = rlhflow.backend
    turns = []
    for k in range(30):
        turns += [{"role": "user", "content": f"Tell me about the sun {k}."}, {"role": "assistant", "content": "Sure."}]
    source, a = render(turns + [{"role": "user", "content": "What is green tea?"}], "Green tea is nice.")
    ids, cut = scorer.prompt_ids((source, a, "No."))
    assert cut and len(ids) <= scorer.max_length
    text = scorer.tokenizer.decode(ids)
    assert "What is green tea?" in text and "Green tea is nice." in text and "[RESPONSE B] No." in text
    short = ("hi", "hello there", "go")
    assert scorer.truncation_rate([(source, a, "No."), short]) == 0.5
    triples = [(source, a, "No."), short, ("Explain music.", "Music is nice.", "Music is sound.")]
    batched = scorer.choice_logits(triples)
    one_by_one = scorer.choice_logits(triples, batch_size=1)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)


def test_adapters_work_on_rlhflow(rlhflow):
    prompts = ["What is the sun?", CONVERSATION]
    completions = [["A star.", "A planet."], ["It orbits.", "No idea."]]
    judge = PairRMJudge(rlhflow, seed=0)
    assert set(judge.judge(prompts, completions)) <= {0, 1}
    probs = judge.judge(prompts, completions, return_scores=True)
    flipped = judge.judge(prompts, [c[::-1] for c in completions], return_scores=True)
    np.testing.assert_allclose(np.array(probs) + np.array(flipped), 1.0, atol=1e-5)
    ranks = rlhflow.rank(["What is the sun?"], [["A star.", "A planet.", "Hot gas.", "No."]], tournament="knockout")
    assert sorted(ranks[0])[0] == 1
    labeler = PreferenceLabeler(rlhflow, responses_column="responses")
    assert labeler.rank_responses([CONVERSATION], [["a", "b", "c"]])[0].shape == (3,)
