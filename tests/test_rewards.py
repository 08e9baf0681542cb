"""PairwiseReward (reference and group modes), its async variant, the OnlineDPO adapter and the CLI functions."""

import asyncio
import inspect
import threading

import numpy as np
import pytest
import torch

from pairrm_rlhf import AsyncPairwiseReward, OnlineDPOJudgeReward, PairRMJudge, PairwiseReward
from pairrm_rlhf.core import aggregation
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.trl import rewards

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 =", "Say hi"]
COMPLETIONS = ["Paris.", "rain rain rain", "The answer is 4.", "hi"]
REFERENCES = [
    "Paris is the capital of France.",
    "Soft rain on the roof / the garden drinks slowly / grey turns into green",
    "4",
    "hi",
]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_reference_probability_logit_win(hf_model):
    z = hf_model.compare(PROMPTS, COMPLETIONS, REFERENCES, return_logits=True)
    assert z[3] == 0 and (z[:3] != 0).all()
    prob = PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=REFERENCES)
    np.testing.assert_allclose(prob, hf_model.probability(PROMPTS, COMPLETIONS, REFERENCES), atol=1e-6)
    logit = PairwiseReward(hf_model, output="logit")(PROMPTS, COMPLETIONS, reference=REFERENCES)
    np.testing.assert_allclose(logit, z, atol=1e-6)
    win = PairwiseReward(hf_model, output="win")(PROMPTS, COMPLETIONS, reference=REFERENCES)
    assert win == [1.0 if v > 0 else 0.0 for v in z[:3]] + [0.5]
    hot = PairwiseReward(hf_model, temperature=0.5)(PROMPTS, COMPLETIONS, reference=REFERENCES)
    np.testing.assert_allclose(hot, hf_model.probability(PROMPTS, COMPLETIONS, REFERENCES, temperature=0.5), atol=1e-6)


def test_list_of_references_is_averaged(hf_model):
    refs = [["Paris is the capital.", "Lyon", "Paris."], "rain"]
    got = PairwiseReward(hf_model, reference_column="refs")(PROMPTS[:2], COMPLETIONS[:2], refs=refs)
    first = hf_model.probability([PROMPTS[0]] * 3, [COMPLETIONS[0]] * 3, refs[0])
    assert first[2] == 0.5  # identical to the completion
    np.testing.assert_allclose(got[0], first.mean(), atol=1e-6)
    np.testing.assert_allclose(got[1], hf_model.probability(PROMPTS[1:2], COMPLETIONS[1:2], ["rain"])[0], atol=1e-6)


def test_log_metric_gets_mean_win_rate(hf_model):
    logged = []
    reward = PairwiseReward(hf_model, name="my_reward")
    refs = [REFERENCES[0], [REFERENCES[1], COMPLETIONS[1]], REFERENCES[2], REFERENCES[3]]
    reward(PROMPTS, COMPLETIONS, reference=refs, log_metric=lambda name, value: logged.append((name, value)))
    z = hf_model.compare(PROMPTS, COMPLETIONS, REFERENCES, return_logits=True)
    wins = [float(z[0] > 0), (float(z[1] > 0) + 0.5) / 2, float(z[2] > 0), 0.5]
    assert reward.__name__ == "my_reward"
    assert len(logged) == 1 and logged[0][0] == "my_reward/win_rate"
    assert logged[0][1] == pytest.approx(np.mean(wins))


def test_conversational_reference(hf_model):
    prompts = [[{"role": "system", "content": "Be brief."}, user("Capital of France?")]]
    completions = [[assistant("Paris.")]]
    got = PairwiseReward(hf_model)(prompts, completions, reference=["It is Paris, of course."])
    folded = [user("Be brief.\n\nCapital of France?")]
    z = hf_model.compare_conversations(
        [folded + [assistant("Paris.")]], [folded + [assistant("It is Paris, of course.")]], return_logits=True
    )
    np.testing.assert_allclose(got, aggregation.probability(z), atol=1e-6)
    # a reference given as an assistant message list is the same thing
    again = PairwiseReward(hf_model)(prompts, completions, reference=[[assistant("It is Paris, of course.")]])
    np.testing.assert_allclose(again, got, atol=1e-7)


def test_async_variant_runs_in_a_thread(hf_model, monkeypatch):
    threads = []
    original = hf_model.two_order_logits
    monkeypatch.setattr(
        hf_model, "two_order_logits", lambda t, **kw: threads.append(threading.current_thread()) or original(t, **kw)
    )
    reward = AsyncPairwiseReward(hf_model)
    assert inspect.iscoroutinefunction(reward.__call__)  # what TRL's is_async_callable checks
    got = asyncio.run(reward(prompts=PROMPTS, completions=COMPLETIONS, reference=REFERENCES))
    assert threads and threads[0] is not threading.main_thread()
    np.testing.assert_allclose(got, hf_model.probability(PROMPTS, COMPLETIONS, REFERENCES), atol=1e-6)


GROUP_PROMPTS = ["p one"] * 3 + ["p two"] * 2
GROUP_COMPLETIONS = ["alpha", "beta gamma", "delta epsilon zeta", "yes", "no, certainly not"]


def expected_group(hf_model, prompts, completions, spans, output):
    out = []
    for s, e in spans:
        cands = completions[s:e]
        if output == "logit":
            out += list(hf_model.rank([prompts[s]], [cands], return_scores=True)[0])
            continue
        n = e - s
        for i in range(n):
            others = [c for j, c in enumerate(cands) if j != i]
            z = hf_model.compare([prompts[s]] * (n - 1), [cands[i]] * (n - 1), others, return_logits=True)
            values = aggregation.probability(z) if output == "probability" else (z > 0) + 0.5 * (z == 0)
            out.append(float(np.mean(values)))
    return out


@pytest.mark.parametrize("output", ["probability", "logit", "win"])
def test_group_mode_is_round_robin(hf_model, output):
    reward = PairwiseReward(hf_model, mode="group", output=output)
    assert reward.__name__ == "pairrm_group"
    got = reward(GROUP_PROMPTS, GROUP_COMPLETIONS)  # no reference column needed
    expected = expected_group(hf_model, GROUP_PROMPTS, GROUP_COMPLETIONS, [(0, 3), (3, 5)], output)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    if output == "probability":
        np.testing.assert_allclose(got[3] + got[4], 1.0, atol=1e-6)


def test_group_size_separates_adjacent_groups_of_one_prompt(hf_model):
    prompts, completions = ["same"] * 4, ["a", "bb", "ccc", "dddd"]
    by_size = PairwiseReward(hf_model, mode="group", group_size=2)(prompts, completions)
    np.testing.assert_allclose(by_size, expected_group(hf_model, prompts, completions, [(0, 2), (2, 4)], "probability"),
                               atol=1e-5)
    merged = PairwiseReward(hf_model, mode="group")(prompts, completions)
    expected = expected_group(hf_model, prompts, completions, [(0, 4)], "probability")
    np.testing.assert_allclose(merged, expected, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple"):
        PairwiseReward(hf_model, mode="group", group_size=3)(prompts, completions)
    with pytest.raises(ValueError, match="prompt of row 1 differs"):
        PairwiseReward(hf_model, mode="group", group_size=2)(["x", "y"], ["a", "b"])


def test_group_split_across_processes_scores_whole_groups(hf_model, monkeypatch):
    """Simulate rank 1 of 2 holding rows 2..4 of 5 (group 0 = rows 0..2 is split): scores equal 1 process."""
    full = PairwiseReward(hf_model, mode="group")(GROUP_PROMPTS, GROUP_COMPLETIONS)
    rows = list(zip(GROUP_PROMPTS, GROUP_COMPLETIONS))
    monkeypatch.setattr(rewards, "_gather_rows", lambda local: (2, rows))
    local = PairwiseReward(hf_model, mode="group")(GROUP_PROMPTS[2:], GROUP_COMPLETIONS[2:])
    np.testing.assert_allclose(local, full[2:], atol=1e-6)


def test_errors(hf_model):
    reward = PairwiseReward(hf_model)
    with pytest.raises(ValueError, match=r"needs the dataset column 'reference'.*\['answer'\]"):
        reward(PROMPTS, COMPLETIONS, answer=REFERENCES, completion_ids=[[1]] * 4, trainer_state=None)
    with pytest.raises(ValueError, match=r"reference\[0\]\[1\] is None"):
        reward(PROMPTS[:1], COMPLETIONS[:1], reference=[["x", None]])
    with pytest.raises(ValueError, match="reference has 3 items but prompts has 4"):
        reward(PROMPTS, COMPLETIONS, reference=REFERENCES[:3])
    with pytest.raises(ValueError, match="completions has 3 items but prompts has 4"):
        reward(PROMPTS, COMPLETIONS[:3], reference=REFERENCES)
    with pytest.raises(ValueError, match="output must be one of"):
        PairwiseReward(hf_model, output="margin")
    with pytest.raises(ValueError, match="mode must be one of"):
        PairwiseReward(hf_model, mode="pairs")
    assert not isinstance(reward, torch.nn.Module) and not isinstance(OnlineDPOJudgeReward(hf_model), torch.nn.Module)


def test_online_dpo_reward_block_layout(hf_model):
    prompts, a, b = PROMPTS, COMPLETIONS, REFERENCES
    p = hf_model.probability(prompts, a, b)
    soft = OnlineDPOJudgeReward(hf_model)
    got = soft(prompts=2 * prompts, completions=a + b, completion_ids=[[0]] * 8, trainer_state=None)
    np.testing.assert_allclose(got, np.concatenate([p, 1 - p]), atol=1e-6)
    hard = OnlineDPOJudgeReward(PairRMJudge(hf_model), soft=False)(2 * prompts, a + b)
    z = hf_model.compare(prompts, a, b, return_logits=True)
    assert hard[:4] == [1.0 if v >= 0 else 0.0 for v in z] and hard[3] == 1.0  # tie: first, like the trainer's >=
    assert [x + y for x, y in zip(hard[:4], hard[4:])] == [1.0] * 4
    # trainer's rule "first chosen iff reward(first) >= reward(second)" picks PairRM's preferred sample
    chosen_first = [got[i] >= got[4 + i] for i in range(4)]
    assert chosen_first == [bool(v >= 0) for v in z]
    with pytest.raises(ValueError, match=r"prompts\[1\] and prompts\[5\] differ"):
        soft(prompts + [prompts[0], "other", prompts[2], prompts[3]], a + b)
    with pytest.raises(ValueError, match="block layout has 2 \\* B rows"):
        soft(prompts[:3], a[:3])


def test_cli_functions_use_env(monkeypatch, hf_model):
    monkeypatch.setenv("PAIRRM_MODEL", bundled("pairrm"))
    monkeypatch.setenv("PAIRRM_DEVICE", "cpu")
    monkeypatch.setenv("PAIRRM_DTYPE", "float32")
    monkeypatch.delenv("PAIRRM_BASE_MODEL", raising=False)
    assert rewards.pairrm_reference_reward.__name__ == "pairrm_reference_reward"
    got = rewards.pairrm_reference_reward(PROMPTS, COMPLETIONS, reference=REFERENCES, trainer_state=None)
    np.testing.assert_allclose(got, hf_model.probability(PROMPTS, COMPLETIONS, REFERENCES), atol=1e-5)
    got = rewards.pairrm_group_reward(GROUP_PROMPTS, GROUP_COMPLETIONS)
    np.testing.assert_allclose(
        got, expected_group(hf_model, GROUP_PROMPTS, GROUP_COMPLETIONS, [(0, 3), (3, 5)], "probability"), atol=1e-5
    )
    env_models = [m for env, m in rewards._env_models.items() if env[0] == bundled("pairrm")]
    assert len(env_models) == 1 and env_models[0].loaded  # one shared model for both functions


# ---- EOS awareness and rows without a reference (issue 22 items 3 and 7) -------------------------------------
EOS = 7


def test_missing_eos_penalty_from_completion_ids(hf_model):
    """A completion whose ids do not end with an EOS id loses `missing_eos_penalty`; finished ones are unchanged."""
    plain = PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=REFERENCES)
    ids = [[3, 4, EOS], [3, 4, 5], [EOS], [9, 11]]  # rows 1 and 3 were cut at the length limit
    metrics = {}
    aware = PairwiseReward(hf_model, eos_token_ids=[EOS, 2])(
        PROMPTS, COMPLETIONS, reference=REFERENCES, completion_ids=ids, log_metric=metrics.__setitem__)
    np.testing.assert_allclose(aware, [plain[0], plain[1] - 1.0, plain[2], plain[3] - 1.0], atol=1e-6)
    assert max(aware[1], aware[3]) <= 0 <= min(aware[0], aware[2])  # unfinished below every finished one
    assert metrics["pairrm_reference/unfinished_rate"] == 0.5
    group = PairwiseReward(hf_model, mode="group", eos_token_ids=EOS, missing_eos_penalty=0.25)
    base = PairwiseReward(hf_model, mode="group")(GROUP_PROMPTS, GROUP_COMPLETIONS)
    gids = [[EOS]] * len(GROUP_PROMPTS)
    gids[0] = [1, 2]
    np.testing.assert_allclose(group(GROUP_PROMPTS, GROUP_COMPLETIONS, completion_ids=gids),
                               [base[0] - 0.25, *base[1:]], atol=1e-6)


def test_missing_eos_errors(hf_model):
    with pytest.raises(ValueError, match="no completion_ids were passed"):
        PairwiseReward(hf_model, eos_token_ids=EOS)(PROMPTS, COMPLETIONS, reference=REFERENCES)
    with pytest.raises(ValueError, match=r"one id list per completion \(4\), got 3"):
        PairwiseReward(hf_model, eos_token_ids=EOS)(PROMPTS, COMPLETIONS, reference=REFERENCES,
                                                   completion_ids=[[EOS]] * 3)
    with pytest.raises(ValueError, match="eos_token_ids must be"):
        PairwiseReward(hf_model, eos_token_ids=[])
    with pytest.raises(ValueError, match="missing_eos_penalty must be >= 0"):
        PairwiseReward(hf_model, missing_eos_penalty=-1)


def test_rows_without_reference_are_not_applicable_under_trl_aggregation(hf_model):
    """None for rows without a reference; with TRL's aggregation (None -> NaN, weighted nansum over reward
    functions) the other task's reward alone decides those rows."""
    refs = [REFERENCES[0], None, [], REFERENCES[3]]
    metrics = {}
    out = PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=refs, log_metric=metrics.__setitem__)
    full = PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=REFERENCES)
    assert out[1] is None and out[2] is None
    np.testing.assert_allclose([out[0], out[3]], [full[0], full[3]], atol=1e-6)
    assert PairwiseReward(hf_model)(PROMPTS[1:3], COMPLETIONS[1:3], reference=[None, None]) == [None, None]
    other = [None, 0.3, 0.7, None]  # e.g. a math-correctness reward for the rows PairRM does not cover
    per_func = torch.tensor([[r if r is not None else torch.nan for r in col] for col in (out, other)]).T
    total = per_func.nansum(dim=1)  # what GRPOTrainer does with reward_weights = 1
    np.testing.assert_allclose(total.numpy(), [full[0], 0.3, 0.7, full[3]], atol=1e-6)
    assert metrics["pairrm_reference/win_rate"] == pytest.approx(
        np.mean([float(z > 0) + 0.5 * float(z == 0) for z in
                 hf_model.compare([PROMPTS[0], PROMPTS[3]], [COMPLETIONS[0], COMPLETIONS[3]],
                                  [REFERENCES[0], REFERENCES[3]], return_logits=True)]))


def test_plain_rendering_of_single_turn_conversations(hf_model):
    """conversation_format='plain': a single-turn conversation scores as its user text (system folded in) with the
    bare response, as SPPO's scripts/rank.py passed them; multi-turn conversations keep PairRM's format."""
    chats = [[user(p)] for p in PROMPTS]
    as_text = PairwiseReward(hf_model)(PROMPTS, COMPLETIONS, reference=REFERENCES)
    plain = PairwiseReward(hf_model, conversation_format="plain")
    np.testing.assert_allclose(plain(chats, COMPLETIONS, reference=REFERENCES), as_text, atol=1e-6)
    default = PairwiseReward(hf_model)(chats, COMPLETIONS, reference=REFERENCES)
    assert not np.allclose(default, as_text, atol=1e-4)  # the multi-turn format is a different input
    system = [[{"role": "system", "content": "Be brief."}, user(p)] for p in PROMPTS]
    folded = [f"Be brief.\n\n{p}" for p in PROMPTS]
    np.testing.assert_allclose(plain(system, COMPLETIONS, reference=REFERENCES),
                               PairwiseReward(hf_model)(folded, COMPLETIONS, reference=REFERENCES), atol=1e-6)
    multi = [[user("Hi"), assistant("Hello!"), user(p)] for p in PROMPTS]
    np.testing.assert_allclose(plain(multi, COMPLETIONS, reference=REFERENCES),
                               PairwiseReward(hf_model)(multi, COMPLETIONS, reference=REFERENCES), atol=1e-6)
    group = PairwiseReward(hf_model, mode="group", conversation_format="plain")
    np.testing.assert_allclose(group([[user(p)] for p in GROUP_PROMPTS], GROUP_COMPLETIONS),
                               PairwiseReward(hf_model, mode="group")(GROUP_PROMPTS, GROUP_COMPLETIONS), atol=1e-6)
    with pytest.raises(ValueError, match="conversation_format"):
        PairwiseReward(hf_model, conversation_format="chatml")
