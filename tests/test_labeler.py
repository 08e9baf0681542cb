"""Preference labeler: schema, choice of pairs, resume, edge cases, aggregation, any backend, DPO training.

Chunk integrity is in test_labeling_store.py, sampling in test_labeling_sampling.py, the `label` command (and two
processes) in test_label_command.py."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset

from pairrm_rlhf import PairRM
from pairrm_rlhf.core.aggregation import bradley_terry_scores, copeland_scores, probability, round_robin_scores
from pairrm_rlhf.core.formats import CONVERSATION_INSTRUCTION
from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.labeling import PreferenceLabeler, best_of_n_responses, select_pairs

from known_preference import ToyBackend
from tiny_policy import build_tiny_policy, build_tiny_tokenizer

PROMPTS = [
    "Explain the sun.",
    "Describe the ocean.",
    "What is green tea?",
    "Tell me about the moon.",
    "Give an example of kind words.",
    "How does one learn music?",
    "List three facts about the river.",
]
COLUMNS = {
    "prompt",
    "chosen",
    "rejected",
    "score_chosen",
    "score_rejected",
    "margin",
    "all_generated_responses",
    "all_rm_scores",
    "chosen_probs",
    "chosen_probs_win",
    "chosen_probs_lose",
    "finished",
    "prompt_index",
}
GEN = SamplingArguments(max_new_tokens=8)


@pytest.fixture(scope="module")
def policy():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_policy(tokenizer), tokenizer


def labeler_for(pairrm, policy, **kwargs) -> PreferenceLabeler:
    # the tiny random policy almost never ends within 8 tokens: these tests check the choice by score, so they let
    # unfinished responses be chosen (the EOS-aware default has its own tests below)
    kwargs = {"num_responses": 3, "sampling": GEN, "allow_unfinished_chosen": True, **kwargs}
    return PreferenceLabeler(pairrm, policy[0], policy[1], **kwargs)


@pytest.fixture(scope="module")
def standard_output(hf_model, policy):
    labeler = labeler_for(hf_model, policy)
    out = labeler.label(Dataset.from_dict({"prompt": PROMPTS}), chunk_size=3)
    return out, labeler.stats


def conversation_texts(prompt: list[dict], responses: list[str]) -> tuple[str, list[str]]:
    """PairRM's conversation format, written out here independently of the package's renderer."""
    turns, system = [], []
    for message in prompt:
        if message["role"] == "system":
            system.append(message["content"])
        elif message["role"] == "user":
            turns.append(["\n\n".join([*system, message["content"]]), None])
            system = []
        else:
            turns[-1][1] = message["content"]
    source = "\n".join(f"USER: {u}\nAssistant: <Response {k + 1}>" for k, (u, _) in enumerate(turns))
    answers = [a for _, a in turns[:-1]]
    cands = ["\n".join(f"<Response {k + 1}>: {a}" for k, a in enumerate([*answers, r])) for r in responses]
    return source, cands


def check_row_against_pairrm(pairrm, row: dict) -> None:
    """Recompute the row's scores, choice and soft labels independently with the public PairRM API."""
    responses = row["all_generated_responses"]
    if isinstance(row["prompt"], str):
        source, cands, instructions = row["prompt"], responses, None
        chosen, rejected = row["chosen"], row["rejected"]
    else:
        source, cands = conversation_texts(row["prompt"], responses)
        instructions = [CONVERSATION_INSTRUCTION]
        chosen, rejected = (row[key][0]["content"] for key in ("chosen", "rejected"))
    scores = pairrm.rank([source], [cands], instructions, return_scores=True)[0]
    np.testing.assert_allclose(row["all_rm_scores"], scores, atol=1e-5)
    # The chosen one is the first of equal best and the rejected one the last of equal worst (select_pairs'
    # stable order); texts with identical token ids score exactly equal.
    best = int(np.argmax(scores))
    worst = len(scores) - 1 - int(np.argmin(scores[::-1]))
    assert chosen == responses[best] and rejected == responses[worst]
    assert row["score_chosen"] == pytest.approx(scores[best], abs=1e-5)
    assert row["score_rejected"] == pytest.approx(scores[worst], abs=1e-5)
    assert row["margin"] == pytest.approx(scores[best] - scores[worst], abs=1e-5) and row["margin"] > 0
    n = len(cands)
    inputs, ins = [source] * n, None if instructions is None else instructions * n
    p = pairrm.probability(inputs[:1], [cands[best]], [cands[worst]], instructions=ins and ins[:1])[0]
    assert row["chosen_probs"] == pytest.approx(p, abs=1e-5)
    win = pairrm.probability(inputs, [cands[best]] * n, cands, instructions=ins).mean()  # P(c > c) = 0.5 included
    lose = pairrm.probability(inputs, [cands[worst]] * n, cands, instructions=ins).mean()
    assert row["chosen_probs_win"] == pytest.approx(win, abs=1e-5)
    assert row["chosen_probs_lose"] == pytest.approx(lose, abs=1e-5)


# ---- schema and choice ------------------------------------------------------------------------------------
def test_standard_schema_and_chosen_is_top(hf_model, standard_output):
    out, stats = standard_output
    assert set(out.column_names) == COLUMNS
    assert (
        stats.prompts == len(PROMPTS) and stats.pairs == len(out) and stats.pairs + stats.ties_dropped == len(PROMPTS)
    )
    assert len(out) >= len(PROMPTS) - 1
    assert out["prompt_index"] == sorted(set(out["prompt_index"]))  # input order, one pair per prompt
    for row in out:
        assert isinstance(row["chosen"], str) and isinstance(row["rejected"], str)
        assert row["prompt"] == PROMPTS[row["prompt_index"]]
        assert len(row["all_generated_responses"]) == 3 and len(row["all_rm_scores"]) == 3
        check_row_against_pairrm(hf_model, row)
    assert stats.mean_margin == pytest.approx(np.mean(out["margin"]))
    assert stats.scored_pairs == 3 * len(PROMPTS) and stats.truncation_rate == 0.0


def test_conversational_schema(hf_model, policy):
    from trl.data_utils import is_conversational

    single = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    multi = [
        {"role": "user", "content": "Explain the sun."},
        {"role": "assistant", "content": "It is a star."},
        {"role": "user", "content": "And the moon?"},
    ]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is music?"}]
    prompts = [*single, multi, system]
    labeler = labeler_for(hf_model, policy, num_responses=4)
    out = labeler.label(Dataset.from_dict({"prompt": prompts}), chunk_size=2)
    assert set(out.column_names) == COLUMNS
    assert labeler.stats.pairs + labeler.stats.ties_dropped == len(prompts)
    for row in out:
        assert is_conversational(row)
        assert row["prompt"] == prompts[row["prompt_index"]]
        for key in ("chosen", "rejected"):
            assert len(row[key]) == 1 and row[key][0]["role"] == "assistant"
            assert row[key][0]["content"] in row["all_generated_responses"]
        check_row_against_pairrm(hf_model, row)
    multi_row = next(r for r in out if r["prompt_index"] == 3)  # and as compare_conversations sees it
    logit = hf_model.compare_conversations(
        [multi + multi_row["chosen"]], [multi + multi_row["rejected"]], return_logits=True
    )
    assert multi_row["chosen_probs"] == pytest.approx(float(probability(logit)[0]), abs=1e-5)


# ---- durability ------------------------------------------------------------------------------------------
def test_interrupt_and_resume_is_identical(hf_model, policy, standard_output, tmp_path):
    work = tmp_path / "work"
    dataset = Dataset.from_dict({"prompt": PROMPTS})

    first = labeler_for(hf_model, policy)
    original = first._label_chunk

    def interrupted(ds, index, *a):
        if index == 1:
            raise KeyboardInterrupt("stopped before chunk 1")
        return original(ds, index, *a)

    first._label_chunk = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.label(dataset, work, chunk_size=3)
    assert sorted(p.name for p in work.glob("chunk-*")) == ["chunk-00000.arrow"]
    (work / "chunk-00001.arrow.tmp-999").write_bytes(b"half-written")  # a crash mid-write leaves only a tmp file

    resumed = labeler_for(hf_model, policy)
    labeled = []
    original = resumed._label_chunk
    resumed._label_chunk = lambda ds, index, *a: labeled.append(index) or original(ds, index, *a)
    out = resumed.label(dataset, work, chunk_size=3)
    assert labeled == [1, 2]  # chunk 0 is not redone
    assert not list(work.glob("*.tmp-*"))
    expected, expected_stats = standard_output
    assert out.to_list() == expected.to_list()  # nothing lost, nothing duplicated, input order
    assert resumed.stats == expected_stats

    again = labeler_for(hf_model, policy)
    again._label_chunk = None  # everything is done: nothing is recomputed
    assert again.label(dataset, work, chunk_size=3).to_list() == expected.to_list()

    with pytest.raises(ValueError, match="generation.num_responses: 3 -> 4"):
        labeler_for(hf_model, policy, num_responses=4).label(dataset, work, chunk_size=3)
    with pytest.raises(ValueError, match="data.chunk_size: 3 -> 2"):
        labeler_for(hf_model, policy).label(dataset, work, chunk_size=2)
    with pytest.raises(ValueError, match="generation.sampling.temperature: None -> 0.5"):
        labeler_for(hf_model, policy, sampling=SamplingArguments(max_new_tokens=8, temperature=0.5)).label(
            dataset, work, chunk_size=3
        )
    other = labeler_for(hf_model, policy, num_responses=4).label(dataset, work, chunk_size=3, overwrite=True)
    assert all(len(r) == 4 for r in other["all_generated_responses"])


# ---- edge cases ------------------------------------------------------------------------------------------
def test_empty_and_whitespace_responses(hf_model, policy):
    responses = [["", " ", "\n\t", "A real answer."], ["same", "same", "same"], ["", "Paris."], ["  ", ""]]
    dataset = Dataset.from_dict({"prompt": PROMPTS[:4], "responses": responses})
    labeler = PreferenceLabeler(hf_model, responses_column="responses")
    out = labeler.label(dataset, chunk_size=3)
    assert labeler.stats.ties_dropped >= 1  # three identical responses always tie
    assert 1 not in out["prompt_index"]
    for row in out:
        assert np.isfinite(row["all_rm_scores"]).all()
        check_row_against_pairrm(hf_model, row)

    # generated responses that are empty: a policy whose EOS logit always wins
    model = copy.deepcopy(policy[0])
    eos = policy[1].eos_token_id
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_fill(-1, torch.tensor([eos]), 1e4))
    labeler = PreferenceLabeler(hf_model, model, policy[1], num_responses=3, sampling=GEN)
    assert labeler.generate(PROMPTS[:1], 0) == [["", "", ""]]
    out = labeler.label(Dataset.from_dict({"prompt": PROMPTS[:2]}))
    assert len(out) == 0 and labeler.stats.ties_dropped == 2 and labeler.stats.prompts == 2
    assert set(out.column_names) == COLUMNS


def test_k1_and_bad_arguments(hf_model, policy):
    with pytest.raises(ValueError, match="num_responses must be >= 2"):
        labeler_for(hf_model, policy, num_responses=1)
    dataset = Dataset.from_dict({"prompt": ["hi"], "responses": [["only one"]]})
    with pytest.raises(ValueError, match=r"responses\[0\] has 1 response"):
        PreferenceLabeler(hf_model, responses_column="responses").label(dataset)
    with pytest.raises(ValueError, match="policy is required"):
        PreferenceLabeler(hf_model)
    with pytest.raises(ValueError, match="strategy"):
        labeler_for(hf_model, policy, strategy="best")
    with pytest.raises(ValueError, match="no column 'text'"):
        labeler_for(hf_model, policy, prompt_column="text").label(dataset)
    with pytest.raises(ValueError, match="n must be >= 2"):
        best_of_n_responses(hf_model, *policy, ["hi"], n=1)


# ---- aggregation and strategies ------------------------------------------------------------------------
def test_copeland_and_bradley_terry():
    strengths = np.array([0.3, 2.0, -1.5, 0.9, -0.2, 1.4])
    p = 1 / (1 + np.exp(-(strengths[:, None] - strengths[None, :])))
    fitted = bradley_terry_scores(p, l2=1e-6)
    assert list(np.argsort(-fitted)) == list(np.argsort(-strengths))
    np.testing.assert_allclose(fitted, strengths - strengths.mean(), atol=1e-3)
    np.testing.assert_array_equal(fitted, bradley_terry_scores(p, l2=1e-6))  # deterministic
    hard = bradley_terry_scores((strengths[:, None] > strengths[None, :]).astype(float))  # certain outcomes
    assert np.isfinite(hard).all() and list(np.argsort(-hard)) == list(np.argsort(-strengths))
    assert abs(hard.sum()) < 1e-4

    # a transitive single-order matrix: M[i, j] = f(c_i, c_j) with a slot bias that cancels in two orders
    m = (strengths[:, None] - strengths[None, :]) / 2 + 0.7
    np.fill_diagonal(m, 0)
    assert list(copeland_scores(m)) == [2, 5, 0, 3, 1, 4]
    cycle = np.array([[0, 1, -1], [-1, 0, 1], [1, -1, 0]], dtype=np.float32)  # rock-paper-scissors
    assert list(copeland_scores(cycle)) == [1, 1, 1]
    assert np.allclose(bradley_terry_scores(probability(cycle - cycle.T)), 0, atol=1e-6)
    np.testing.assert_allclose(round_robin_scores(m), strengths - strengths.mean(), atol=1e-6)


def test_select_pairs():
    scores = [0.1, 3.0, -2.0, 1.0, 1.0]
    assert select_pairs(scores, "best_vs_worst") == ([(1, 2)], 0, 0)
    assert select_pairs(scores, "best_vs_worst", 2) == ([(1, 2), (1, 0)], 0, 0)
    assert select_pairs(scores, "best_vs_second", 2) == ([(1, 3), (1, 4)], 0, 0)
    assert select_pairs(scores, "best_vs_worst", margin_threshold=5.0) == ([], 0, 1)
    draws = [select_pairs(scores, "best_vs_random", 2, rng=np.random.default_rng(s))[0] for s in range(20)]
    assert draws[3] == select_pairs(scores, "best_vs_random", 2, rng=np.random.default_rng(3))[0]
    assert all(len(d) == 2 and d[0][0] == 1 and d[0][1] != d[1][1] and 1 not in (d[0][1], d[1][1]) for d in draws)
    assert len({d[0][1] for d in draws}) > 1
    pairs, ties, below = select_pairs(scores, "all_pairs", margin_threshold=1.5)
    margins = [scores[c] - scores[r] for c, r in pairs]
    expected = sorted(s - t for s in scores for t in scores if s - t > 1.5)
    assert sorted(margins) == expected and margins == sorted(margins, reverse=True)
    assert ties == 1 and below == 10 - 1 - len(pairs)  # the two 1.0 tie
    assert select_pairs(scores, "all_pairs", 2)[0] == pairs[:2]
    assert select_pairs([0.5, 0.5], "best_vs_worst") == ([], 1, 0)


@pytest.mark.parametrize("aggregation", ["copeland", "bradley_terry"])
def test_labeler_aggregations(hf_model, aggregation):
    responses = [["Paris.", "Lyon.", "It is Paris, the capital.", ""], ["a", "b", "c"]]
    dataset = Dataset.from_dict({"prompt": ["Capital of France?", "Pick a letter."], "responses": responses})
    labeler = PreferenceLabeler(hf_model, responses_column="responses", aggregation=aggregation, strategy="all_pairs")
    out = labeler.label(dataset)
    for k, prompt in enumerate(dataset["prompt"]):
        (matrix,) = hf_model.pairwise_matrices([prompt], [responses[k]])
        scores = (
            copeland_scores(matrix)
            if aggregation == "copeland"
            else bradley_terry_scores(probability(matrix - matrix.T))
        )
        rows = [r for r in out if r["prompt_index"] == k]
        np.testing.assert_allclose(rows[0]["all_rm_scores"] if rows else scores, scores, atol=1e-5)
        n = len(scores)
        kept = sum(scores[i] - scores[j] > 0 for i in range(n) for j in range(n))
        assert len(rows) == kept  # all pairs with a positive margin
        assert all(r["margin"] > 0 and r["chosen_probs"] >= 0 for r in rows)


def test_best_of_n_responses(hf_model, policy):
    prompts = ["Explain the sun.", [{"role": "user", "content": "Describe the ocean."}]]
    results = best_of_n_responses(hf_model, *policy, prompts, n=3, max_new_tokens=8)
    for result in results:
        assert len(result["responses"]) == 3 and result["best"] == result["responses"][int(np.argmax(result["scores"]))]
    expected = hf_model.rank(["Explain the sun."], [results[0]["responses"]], return_scores=True)[0]
    np.testing.assert_allclose(results[0]["scores"], expected, atol=1e-5)


# ---- any backend ------------------------------------------------------------------------------------------
class LengthBackend(ToyBackend):
    """A PairBackend with nothing but the protocol: f(x, A, B) = (len(A) - len(B)) / 10 + 0.25 (a slot bias)."""

    def score(self, triples, *, batch_size=None, show_progress_bar=None):
        return np.array([(len(a) - len(b)) / 10 + 0.25 for _, a, b in triples], dtype=np.float32)

    def truncation_rate(self, triples):
        return sum(len(s) + len(a) + len(b) > 30 for s, a, b in triples) / len(triples)

    def identity(self):
        return {"backend": "length", "weights": "none"}


def test_labeler_needs_only_the_backend_protocol(tmp_path):
    backend = LengthBackend()
    responses = [["a", "bbb", "bb"], ["a much longer answer here", "short", "mid-size one"]]
    dataset = Dataset.from_dict({"prompt": ["Say it.", "Explain."], "responses": responses})
    labeler = PreferenceLabeler(backend, responses_column="responses")  # a bare backend is wrapped in PairRM
    assert isinstance(labeler.pairrm, PairRM) and labeler.pairrm.backend is backend
    out = labeler.label(dataset, tmp_path / "work", chunk_size=1)
    assert [(r["chosen"], r["rejected"]) for r in out] == [("bbb", "a"), ("a much longer answer here", "short")]
    # round-robin s_i = (1/K) sum_j f(i,j) - f(j,i) = (1/3) sum_j (len_i - len_j) / 5 (the slot bias cancels)
    assert out[0]["score_chosen"] == pytest.approx((2 + 1) / 15, abs=1e-6)
    assert out[0]["score_rejected"] == pytest.approx((-2 - 1) / 15, abs=1e-6)
    # truncation through the protocol: 2 of prompt 2's pairs are over 30 characters (long+short, long+mid)
    assert labeler.stats.scored_pairs == 6 and labeler.stats.truncated_pairs == 2
    assert '"backend": "length"' in (tmp_path / "work" / "manifest.json").read_text()
    with pytest.raises(TypeError, match="PairRM or a PairBackend"):
        PreferenceLabeler(object(), responses_column="responses")


@pytest.mark.slow
@pytest.mark.parametrize("form", ["standard", "conversational"])
def test_output_trains_with_dpo(form, hf_model, standard_output, policy, tmp_path):
    from trl import DPOConfig, DPOTrainer

    if form == "standard":
        dataset = standard_output[0]
    else:
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS[:4]]
        dataset = labeler_for(hf_model, policy).label(Dataset.from_dict({"prompt": prompts}))
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        max_length=64,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        activation_checkpointing=False,
        logging_steps=1,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 2
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


# ---- EOS awareness (issue 22 item 3) -------------------------------------------------------------------------
def test_sampled_responses_know_whether_they_finished(policy):
    """The transformers sampler flags a response cut at max_new_tokens; one that stopped early is finished."""
    from pairrm_rlhf.core.formats import Response
    from pairrm_rlhf.core.generation import sample_responses

    model, tokenizer = policy
    cut = sample_responses(model, tokenizer, PROMPTS[:2], 2, max_new_tokens=6)
    assert all(isinstance(r, Response) for rs in cut for r in rs)
    assert not any(r.finished for rs in cut for r in rs)  # the tiny policy does not end within 6 tokens
    eos_everywhere = copy.deepcopy(model)  # a policy that always says EOS first
    with torch.no_grad():
        eos_everywhere.lm_head.bias = torch.nn.Parameter(torch.zeros(eos_everywhere.config.vocab_size))
        eos_everywhere.lm_head.bias[tokenizer.eos_token_id] = 1e4
    done = sample_responses(eos_everywhere, tokenizer, PROMPTS[:2], 2, max_new_tokens=6)
    assert all(r.finished for rs in done for r in rs)


def test_unfinished_response_is_never_chosen_by_default(hf_model):
    from pairrm_rlhf.core.formats import Response

    prompt = "Explain the sun."
    texts = ["The sun is a star that gives light and heat to the earth and it is very", "Hot.", "A star."]
    scores = PreferenceLabeler(hf_model, responses_column="r").rank_responses([prompt], [texts])[0]
    top = int(np.argmax(scores))  # the judge's favourite: make it the one cut at the length limit
    responses = [[Response(t, finished=i != top) for i, t in enumerate(texts)]]
    rows, stats = PreferenceLabeler(hf_model, responses_column="r").label_rows([prompt], responses)
    assert len(rows) == 1 and rows[0]["chosen"] != texts[top]
    assert rows[0]["chosen"] == texts[int(np.argmax(np.where(np.arange(3) == top, -np.inf, scores)))]
    assert rows[0]["finished"] == [i != top for i in range(3)] and stats.unfinished == 1
    rows, _ = PreferenceLabeler(hf_model, responses_column="r", allow_unfinished_chosen=True).label_rows(
        [prompt], responses
    )
    assert rows[0]["chosen"] == texts[top]
    # none finished: no pair for that prompt
    rows, _ = PreferenceLabeler(hf_model, responses_column="r").label_rows(
        [prompt], [[Response(t, finished=False) for t in ("a b c", "d")]]
    )
    assert rows == []


def test_select_pairs_with_finished_flags():
    scores = [3.0, 1.0, 2.0, -1.0]
    finished = [False, True, True, False]
    assert select_pairs(scores, "best_vs_worst", finished=finished) == ([(2, 3)], 0, 0)
    assert select_pairs(scores, "best_vs_second", finished=finished) == ([], 0, 1)  # the next is the cut 3.0
    pairs, _, _ = select_pairs(scores, "all_pairs", finished=finished)
    assert pairs and all(finished[c] for c, _ in pairs)
    assert select_pairs(scores, "best_vs_worst", finished=[False] * 4) == ([], 0, 0)
    with pytest.raises(ValueError, match="finished has 3 flags but there are 4 scores"):
        select_pairs(scores, finished=[True] * 3)


# ---- RLHFlow's length-penalised selection -----------------------------------------------------------------------
def test_max_min_p_is_rlhflows_length_penalised_best_vs_worst():
    """RLHFlow/Online-RLHF run_dpo.py `max_min_p`: argmax/argmin of score - len_penalty * len, ordered by raw score."""
    scores = [2.0, 1.9, 0.0, -1.0]
    lengths = [400, 10, 50, 30]
    assert select_pairs(scores, "max_min_p", lengths=lengths) == ([(0, 3)], 0, 0)  # no penalty: best vs worst
    # 0.01 per character: 2.0 - 4.0 = -2.0 is now the lowest, 1.9 - 0.1 the highest -> the pair (1, 0), and the
    # raw scores order it: the long one (2.0) stays chosen, as in RLHFlow's code
    assert select_pairs(scores, "max_min_p", lengths=lengths, len_penalty=0.01) == ([(0, 1)], 0, 0)
    # with a threshold above that raw margin (0.1) the long answer no longer wins a pair
    assert select_pairs(scores, "max_min_p", lengths=lengths, len_penalty=0.01, margin_threshold=0.5) == ([], 0, 1)
    assert select_pairs([1.0, 1.0], "max_min_p", lengths=[5, 3]) == ([], 1, 0)
    assert select_pairs(scores, "max_min_p", lengths=lengths, len_penalty=0.01, finished=[False, True, True, True]) == (
        [],
        0,
        0,
    )  # the chosen would be the unfinished one
    with pytest.raises(ValueError, match=r"max_min_p needs one length per response \(4\), got None"):
        select_pairs(scores, "max_min_p")


def test_labeler_max_min_p_uses_response_lengths(hf_model):
    prompt = "Explain the sun."
    texts = ["The sun is a star that gives light and heat to the earth every single day.", "Hot.", "A star.", "Sun."]
    labeler = PreferenceLabeler(hf_model, responses_column="r", strategy="max_min_p", len_penalty=0.05)
    rows, _ = labeler.label_rows([prompt], [texts])
    scores = np.array(rows[0]["all_rm_scores"]) if rows else labeler.rank_responses([prompt], [texts])[0]
    penalised = scores - 0.05 * np.array([len(t) for t in texts])
    pair = sorted([int(np.argmax(penalised)), int(np.argmin(penalised))], key=lambda i: -scores[i])
    if scores[pair[0]] == scores[pair[1]]:
        assert rows == []
    else:
        assert [rows[0]["chosen"], rows[0]["rejected"]] == [texts[pair[0]], texts[pair[1]]]
    identity = labeler.identity(Dataset.from_dict({"prompt": [prompt], "r": [texts]}), 8)
    assert identity["selection"]["len_penalty"] == 0.05
    with pytest.raises(ValueError, match="len_penalty must be >= 0"):
        PreferenceLabeler(hf_model, responses_column="r", len_penalty=-1)


def test_labeler_plain_conversation_format_scores_the_user_text(hf_model):
    texts = [["Hot.", "A star, the one we orbit.", "Sun."]]
    chat = [[{"role": "user", "content": "Explain the sun."}]]
    as_text = PreferenceLabeler(hf_model, responses_column="r").rank_responses(["Explain the sun."], texts)
    plain = PreferenceLabeler(hf_model, responses_column="r", conversation_format="plain").rank_responses(chat, texts)
    default = PreferenceLabeler(hf_model, responses_column="r").rank_responses(chat, texts)
    np.testing.assert_allclose(plain[0], as_text[0], atol=1e-6)
    assert not np.allclose(default[0], as_text[0], atol=1e-4)
    with pytest.raises(ValueError, match="conversation_format"):
        PreferenceLabeler(hf_model, responses_column="r", conversation_format="chatml")
