"""Recipes: learning tests against a judge whose prompt-dependent preference is known, PPO durability and
internals, SPPO's loss and soft labels, resume, per-iteration evaluation, smoke runs of the shipped configs.

The learning tests use `known_preference.StyleBackend` behind `PairRM`: prompts ask for an answer "briefly" (fewer
characters win) or "in detail" (more characters win). The last 8 prompts (4 topics never trained on, both styles)
are held out; a policy that ignores the prompt scores about 0.5 against the initial policy there, so each trainer
must reach a held-out win rate of at least MIN_WIN (judged by the same rule, which is also the ground truth).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import pytest
import torch
from datasets import Dataset

from pairrm_rlhf import PairwiseReward
from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.trl.judge import PairRMJudge

from known_preference import preferred_fraction, style_judge, style_prompts
from recipe_scripts import RECIPES, recipe
from torchrun import launch

REPO = RECIPES.parent
NO_SAVE = ["--report_to", "none", "--save_strategy", "no", "--seed", "0"]
MIN_WIN = 0.75


def parse(name: str, argv: list[str]):
    return recipe("_common").parse(recipe(name).make_parser(), argv)


def tiny_policy():
    from trl import ModelConfig

    return recipe("_common").load_policy(ModelConfig(model_name_or_path="tiny"))


@pytest.fixture(scope="module")
def style_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("style") / "style.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in style_prompts()))
    return str(path)


# ---- the known preference ------------------------------------------------------------------------------------
def test_style_judge_through_the_adapters():
    judge = style_judge()
    brief, detail = "Tell me about the sun, briefly", "Tell me about the sun, in detail"
    z = PairRMJudge(judge).two_order_logits(
        [brief, detail, brief], [["ok", "a longer answer"]] * 2 + [["same", "four"]]
    )
    np.testing.assert_allclose(z, [0.25 * 13, -0.25 * 13, 0.0])  # pinned: SCALE x (len(B) - len(A)) x style
    reward = PairwiseReward(judge, output="win")
    assert reward([brief, detail], ["short", "short"], reference=["a reference", "a reference"]) == [1.0, 0.0]
    conversational = [{"role": "user", "content": brief}]
    assert PairRMJudge(judge).judge([conversational], [["a much longer one", "tiny"]]) == [1]
    rows = style_prompts()
    assert len(rows) == 40 and all(("briefly" in r["prompt"]) != ("in detail" in r["prompt"]) for r in rows)
    held_topics = {r["prompt"].split(",")[0] for r in rows[-8:]}
    assert len(held_topics) == 4 and not held_topics & {r["prompt"].split(",")[0] for r in rows[:-8]}


# ---- learning tests --------------------------------------------------------------------------------------------
# The shipped configs' losses (PPO: clipped PPO; DPO: plain sigmoid; GRPO: TRL's default) at rates a random 2-layer
# policy needs to learn a condition in seconds (1e-3 to 1e-2, no KL penalty for PPO). GRPO takes 4 optimisation
# passes per generation batch (num_iterations, like PPO's epochs); iterative DPO trains on all pairs of its 8 samples
# per prompt (strategy all_pairs), plain sigmoid DPO as in the shipped config. Measured over seeds 0-2: docs/recipes.md.
LEARNING = {
    "ppo": [
        "--per_device_train_batch_size",
        "8",
        "--gradient_accumulation_steps",
        "2",
        "--num_ppo_epochs",
        "4",
        "--total_episodes",
        "960",
        "--max_new_tokens",
        "12",
        "--temperature",
        "1.0",
        "--learning_rate",
        "1e-3",
        "--kl_coef",
        "0.0",
        "--save_final",
        "false",
    ],
    "grpo": [
        "--max_steps",
        "200",
        "--per_device_train_batch_size",
        "16",
        "--num_generations",
        "4",
        "--num_iterations",
        "4",
        "--steps_per_generation",
        "1",
        "--max_completion_length",
        "12",
        "--temperature",
        "1.0",
        "--learning_rate",
        "5e-3",
        "--logging_steps",
        "40",
        "--reward_mode",
        "group",
        "--missing_eos_penalty",
        "0",
        *NO_SAVE,
    ],  # the EOS penalty is a second objective: measure the rule alone
    "online_dpo": [
        "--max_steps",
        "240",
        "--per_device_train_batch_size",
        "16",
        "--max_new_tokens",
        "12",
        "--max_length",
        "96",
        "--temperature",
        "1.0",
        "--learning_rate",
        "1e-2",
        "--beta",
        "0.1",
        "--logging_steps",
        "40",
        *NO_SAVE,
    ],
    "iterative_dpo": [
        "--num_iterations",
        "3",
        "--prompt_schedule",
        "same",
        "--num_responses",
        "8",
        "--strategy",
        "all_pairs",
        "--max_new_tokens",
        "12",
        "--temperature",
        "1.0",
        "--label_chunk_size",
        "32",
        "--num_train_epochs",
        "4",
        "--per_device_train_batch_size",
        "16",
        "--max_length",
        "96",
        "--learning_rate",
        "5e-3",
        "--beta",
        "0.1",
        "--loss_type",
        "sigmoid",
        "--logging_steps",
        "40",
        "--allow_unfinished_chosen",
        "true",
        *NO_SAVE,
    ],
}


def train_on_style(name: str, data: str, output_dir: Path, seed: int = 0):
    """Train `name` on the style prompts (the last 8 held out) with the known judge; returns the trained policy."""
    argv = [
        "--model_name_or_path",
        "tiny",
        "--dataset_name",
        data,
        "--conversational",
        "false",
        "--eval_prompts",
        "8",
        "--output_dir",
        str(output_dir),
        *LEARNING[name],
        "--seed",
        str(seed),
    ]
    result = recipe(name).main(*parse(name, argv), judge=style_judge())
    if name == "iterative_dpo":
        from trl import ModelConfig

        return recipe("_common").load_policy(ModelConfig(model_name_or_path=str(output_dir / "iteration_3" / "model")))[
            0
        ]
    if name == "ppo":
        return result.accelerator.unwrap_model(result.model).policy
    return result.model


def held_out_win_rate(model, seed: int = 1234) -> tuple[float, float]:
    """(judge's, ground truth's) win rate of `model` over the initial policy: 4 samples per held-out prompt."""
    common = recipe("_common")
    initial, tokenizer = tiny_policy()
    prompts = [r["prompt"] for r in style_prompts()[-8:]] * 4
    sampling = SamplingArguments(max_new_tokens=12, temperature=1.0)
    before = common.generate(initial, tokenizer, prompts, sampling, seed=seed)
    after = common.generate(model, tokenizer, prompts, sampling, seed=seed)
    return common.win_rate(style_judge(), prompts, after, before)["win_rate"], preferred_fraction(
        prompts, after, before
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LEARNING))
def test_learns_the_prompt_dependent_preference(name, style_data, tmp_path):
    model = train_on_style(name, style_data, tmp_path)
    win, truth = held_out_win_rate(model)
    print(f"{name}: held-out win rate vs the initial policy {win:.3f} (ground truth {truth:.3f})")
    assert win == pytest.approx(truth)  # the judge is the rule
    assert win >= MIN_WIN


# ---- PPO internals -----------------------------------------------------------------------------------------------
def ppo_trainer(reward_fn, **config):
    from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer

    model, tokenizer = tiny_policy()
    data = Dataset.from_dict(
        {"prompt": ["Explain the sun.", "Describe the ocean."] * 2, "reference": ["The sun is a star.", "Water."] * 2}
    )
    defaults = dict(use_cpu=True, per_device_train_batch_size=2, save_final=False, max_new_tokens=5)
    return PPOTrainer(PPOConfig(**{**defaults, **config}), model, tokenizer, reward_fn, data)


def test_ppo_advantages_and_eos_handling():
    trainer = ppo_trainer(PairwiseReward(style_judge()), kl_coef=0.1, gamma=0.9, lam=0.8, missing_eos_penalty=2.0)
    tokenizer = trainer.tokenizer
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # EOS handling on a hand-made rollout: row 0 stops at its EOS (kept), row 1 never emits one
    response = torch.tensor([[10, 11, eos, 12, 13], [20, 21, 22, 23, 24]])
    is_eos = response == eos
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.tensor(5))
    assert length.tolist() == [3, 5]
    mask = (torch.arange(5)[None] < length[:, None]).float()
    logprobs, ref_logprobs, values = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    scores = torch.tensor([1.0, 3.0])
    r = dict(
        mask=mask,
        length=length,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        penalized=scores - torch.tensor([0.0, 2.0]),
    )
    trainer._advantages(r)
    for i in range(2):  # a plain per-sequence reference implementation
        n = int(length[i])
        rewards = [-0.1 * float(logprobs[i, t] - ref_logprobs[i, t]) for t in range(n)]
        rewards[-1] += float(r["penalized"][i])
        adv, last = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = float(values[i, t + 1]) if t + 1 < n else 0.0
            last = rewards[t] + 0.9 * next_v - float(values[i, t]) + 0.9 * 0.8 * last
            adv[t] = last
        np.testing.assert_allclose(r["returns"][i, :n].numpy(), np.array(adv) + values[i, :n].numpy(), atol=1e-5)
        assert r["returns"][i, n:].abs().sum() == 0 and r["advantages"][i, n:].abs().sum() == 0
    valid = r["advantages"][mask.bool()]
    assert valid.mean().abs() < 1e-5 and valid.std() == pytest.approx(1.0, abs=1e-3)  # whitened over valid tokens
    # a real rollout: responses are truncated after their first EOS (either of the checkpoint's EOS ids)
    rollout = trainer.rollout(trainer.dataset[:2])
    eos_ids = trainer.generation_config.eos_token_id
    assert sorted(eos_ids) == sorted([eos, pad])
    for row, n in zip(rollout["response"], rollout["length"]):
        assert (row[n:] == pad).all() and not any(int(t) in eos_ids for t in row[: n - 1])
    assert torch.allclose(rollout["logprobs"] * rollout["mask"], rollout["ref_logprobs"] * rollout["mask"], atol=1e-5)
    stats = trainer.update(rollout)
    assert {
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "policy/entropy_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
    } <= set(stats)


def test_ppo_masks_rows_without_a_reward():
    def reward(prompts, completions, log_metric, **kwargs):
        log_metric("custom/seen", float(len(prompts)))
        return [None, 1.0, float("nan"), 2.0][: len(prompts)]

    trainer = ppo_trainer(reward, per_device_train_batch_size=4)
    rollout = trainer.rollout(trainer.dataset[:4])
    assert rollout["valid"].tolist() == [0.0, 1.0, 0.0, 1.0]
    for row in (0, 2):  # masked out of the losses, the whitening and the KL
        assert rollout["mask"][row].sum() == 0 and rollout["advantages"][row].abs().sum() == 0
    assert rollout["mask"][1].sum() > 0
    metrics = trainer._rollout_metrics(rollout)
    assert metrics["objective/invalid_rewards"] == 2 and metrics["custom/seen"] == 4
    assert metrics["objective/scores"] == pytest.approx(1.5)  # the mean over the rows that have a reward
    stats = trainer.update(rollout)
    assert all(np.isfinite(v) for v in stats.values())


def test_ppo_shows_a_progress_bar_with_reward_and_loss(tmp_path, capsys):
    """With logging at INFO (a CLI run), PPO's updates show one bar whose postfix carries the reward and the loss."""
    import logging

    reward = PairwiseReward(style_judge(), output="logit")
    trainer = ppo_trainer(reward, output_dir=str(tmp_path), per_device_train_batch_size=2, total_episodes=4)
    level = logging.getLogger("pairrm_rlhf").level
    logging.getLogger("pairrm_rlhf").setLevel(logging.INFO)
    try:
        trainer.train()
    finally:
        logging.getLogger("pairrm_rlhf").setLevel(level)
    err = capsys.readouterr().err
    assert "PPO" in err and "2/2" in err and "reward=" in err and "loss=" in err, err[-2000:]


def test_ppo_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupt after update 2 (checkpoints every 2 updates), resume: the metrics of updates 3-4 and the final
    weights equal the uninterrupted run's."""
    from pairrm_rlhf.trl import ppo

    reward = PairwiseReward(style_judge(), output="logit")
    settings = dict(
        per_device_train_batch_size=2, total_episodes=8, save_steps=2, num_ppo_epochs=2, seed=3, learning_rate=1e-3
    )

    full = ppo_trainer(reward, output_dir=str(tmp_path / "full"), **settings)
    expected = full.train()
    assert [h["update"] for h in expected] == [1, 2, 3, 4] and (tmp_path / "full" / "checkpoint-4").is_dir()

    original = ppo.PPOTrainer.rollout
    calls = []

    def crash_on_third(self, batch):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, batch)

    monkeypatch.setattr(ppo.PPOTrainer, "rollout", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        ppo_trainer(reward, output_dir=str(tmp_path / "run"), **settings).train()
    monkeypatch.setattr(ppo.PPOTrainer, "rollout", original)
    assert ppo.checkpoints(str(tmp_path / "run")) == [str(tmp_path / "run" / "checkpoint-2")]

    resumed = ppo_trainer(reward, output_dir=str(tmp_path / "run"), resume_from_checkpoint="true", **settings)
    history = resumed.train()
    assert history == expected  # every metric of every update, bit for bit (CPU)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="resume_from_checkpoint"):
        ppo_trainer(reward, output_dir=str(tmp_path / "empty"), resume_from_checkpoint="true", **settings).train()


# ---- SPPO ---------------------------------------------------------------------------------------------------------
def test_sppo_loss_is_the_soft_formula(tmp_path):
    from trl import DPOConfig

    from pairrm_rlhf.trl.sppo import SPPOTrainer

    model, tokenizer = tiny_policy()
    p_win, p_lose = [0.9, 0.6, 0.55, 0.7], [0.2, 0.4, 0.5, 0.1]
    data = Dataset.from_dict(
        {
            "prompt": ["Explain the sun.", "Describe the ocean.", "What is tea?", "Hi."],
            "chosen": [" A star.", " Water.", " A drink.", " Hello."],
            "rejected": [" No.", " I do not know at all.", " ?", " Go away."],
            "chosen_probs_win": p_win,
            "chosen_probs_lose": p_lose,
        }
    )
    beta = 0.2
    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        beta=beta,
        logging_steps=1,
        max_length=64,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        seed=0,
    )
    trainer = SPPOTrainer(
        model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    # at the first step the policy is the reference: log-ratios are 0 and the loss is the targets' squares
    expected = np.mean([((w - 0.5) / beta) ** 2 + ((lose - 0.5) / beta) ** 2 for w, lose in zip(p_win, p_lose)]) / 2
    logged = [log for log in trainer.state.log_history if "loss" in log][0]
    assert logged["loss"] == pytest.approx(expected, rel=1e-4)
    assert logged["sppo/prob_win_chosen"] == pytest.approx(np.mean(p_win), abs=1e-6)


def test_sppo_authors_probabilities():
    """uclaml/SPPO scripts/compute_prob.py: P_i = sum_j 1 / (1 + exp(s_j - s_i)) / K, j over all K (itself too)."""
    from pairrm_rlhf.trl.sppo import authors_probabilities

    scores = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]]
    win, lose = authors_probabilities([2.0, 0.5], [-1.0, 0.5], scores)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    np.testing.assert_allclose(win, [(0.5 + sig(2) + sig(3)) / 3, 0.5], rtol=1e-12)
    np.testing.assert_allclose(lose, [(sig(-3) + sig(-1) + 0.5) / 3, 0.5], rtol=1e-12)
    assert win[0] == pytest.approx(0.7777904, abs=1e-7) and lose[0] == pytest.approx(0.2721224, abs=1e-7)


# ---- iterative DPO: resume, evaluation, SPPO labels ---------------------------------------------------------------
ITERATIVE_SMALL = [
    "--model_name_or_path",
    "tiny",
    "--conversational",
    "false",
    "--eval_prompts",
    "4",
    "--num_iterations",
    "2",
    "--num_responses",
    "2",
    "--max_new_tokens",
    "6",
    "--temperature",
    "1.0",
    "--label_chunk_size",
    "8",
    "--num_train_epochs",
    "1",
    "--per_device_train_batch_size",
    "4",
    "--max_length",
    "64",
    "--learning_rate",
    "1e-3",
    "--report_to",
    "none",
    "--max_prompts",
    "24",
    "--allow_unfinished_chosen",
    "true",
]  # the tiny policy never ends within 6 tokens


def test_iterative_dpo_resumes_after_a_crash(style_data, tmp_path, monkeypatch):
    iterative = recipe("iterative_dpo")
    args = parse(
        "iterative_dpo",
        [*ITERATIVE_SMALL, "--dataset_name", style_data, "--output_dir", str(tmp_path), "--save_strategy", "no"],
    )
    real_train, real_label = iterative.train, iterative.label
    calls = []

    def crashing_train(config, iteration, *rest):
        if iteration == 2:
            raise RuntimeError("simulated crash")
        return real_train(config, iteration, *rest)

    monkeypatch.setattr(iterative, "train", crashing_train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        iterative.main(*copy.deepcopy(args), judge=style_judge())
    assert (tmp_path / "iteration_1" / "done.json").exists() and not (tmp_path / "iteration_2" / "done.json").exists()
    assert (tmp_path / "iteration_2" / "pairs" / "dataset_info.json").exists()  # labeled before the crash
    assert not (tmp_path / "iteration_2" / "pairs.chunks").exists()  # removed once every process had read it
    pairs_2 = Dataset.load_from_disk(str(tmp_path / "iteration_2" / "pairs"))["chosen"]
    done_1 = (tmp_path / "iteration_1" / "done.json").stat().st_mtime_ns

    def recording_label(config, iteration, *rest):
        calls.append(iteration)
        return real_label(config, iteration, *rest)

    monkeypatch.setattr(iterative, "train", real_train)
    monkeypatch.setattr(iterative, "label", recording_label)
    summary = iterative.main(*copy.deepcopy(args), judge=style_judge())
    assert calls == [2]  # iteration 1 is skipped entirely; iteration 2 reuses its saved pairs
    assert (tmp_path / "iteration_1" / "done.json").stat().st_mtime_ns == done_1
    assert Dataset.load_from_disk(str(tmp_path / "iteration_2" / "pairs"))["chosen"] == pairs_2
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
    # per-iteration held-out evaluation: iteration 0 (initial policy) and both iterations, even across the crash
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert {
            "vs_initial/win_rate",
            "vs_initial/ties",
            "vs_reference/win_rate",
            "vs_reference/ties",
            "mean_length",
            "pairs",
            "mean_margin",
        } <= set(m)
        assert 0 <= m["vs_initial/win_rate"] <= 1
    assert metrics[0]["vs_initial/win_rate"] == 0.5 and metrics[0]["vs_initial/ties"] == 1.0  # itself
    if importlib.util.find_spec("matplotlib"):
        for png in ("win_rate.png", "margins.png"):
            assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "change, difference",
    [
        (["--learning_rate", "2e-3"], "training.learning_rate: 0.001 -> 0.002"),
        (["--num_responses", "3"], "training.num_responses: 2 -> 3"),
        (["--strategy", "best_vs_random"], "training.strategy: 'best_vs_worst' -> 'best_vs_random'"),
        (["--pairrm_dtype", "bfloat16"], "data_and_judge.pairrm_dtype: None -> 'bfloat16'"),
    ],
)
def test_iterative_dpo_refuses_to_resume_with_other_settings(style_data, tmp_path, monkeypatch, change, difference):
    """A resumed run with other settings used to reuse the old iterations silently: refused, naming the change,
    before anything is loaded or labeled (the labeler's identity mechanism, `core.identity`)."""
    iterative = recipe("iterative_dpo")
    args = [
        *ITERATIVE_SMALL,
        "--dataset_name",
        style_data,
        "--output_dir",
        str(tmp_path),
        "--save_strategy",
        "no",
        "--eval_prompts",
        "0",
    ]

    def stop(*_args, **_kwargs):
        raise RuntimeError("stopped at labeling")

    monkeypatch.setattr(iterative, "label", stop)
    with pytest.raises(RuntimeError, match="stopped at labeling"):
        iterative.main(*parse("iterative_dpo", args), judge=style_judge())
    with pytest.raises(RuntimeError, match="stopped at labeling"):  # the same settings resume
        iterative.main(*parse("iterative_dpo", args), judge=style_judge())
    with pytest.raises(ValueError, match=f"--output_dir .* other settings: manifest.json has {re.escape(difference)}"):
        iterative.main(*parse("iterative_dpo", args + change), judge=style_judge())


def test_iterative_dpo_resumes_inside_an_iteration(style_data, tmp_path, monkeypatch):
    """A crash in the middle of an iteration's training resumes from the DPO trainer's last checkpoint."""
    from transformers import Trainer

    iterative = recipe("iterative_dpo")
    args = [
        *ITERATIVE_SMALL,
        "--num_iterations",
        "1",
        "--dataset_name",
        style_data,
        "--output_dir",
        str(tmp_path),
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--num_train_epochs",
        "2",
        "--eval_prompts",
        "0",
    ]
    real_step = Trainer.training_step
    steps = []

    def crash_at_step_4(self, *a, **kw):
        steps.append(self.state.global_step)
        if self.state.global_step == 3 and not getattr(self, "_resumed", False):
            raise RuntimeError("simulated crash")
        return real_step(self, *a, **kw)

    monkeypatch.setattr(Trainer, "training_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        iterative.main(*parse("iterative_dpo", args), judge=style_judge())
    trainer_dir = tmp_path / "iteration_1" / "trainer"
    assert sorted(p.name for p in trainer_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    steps.clear()
    monkeypatch.setattr(Trainer, "_resumed", True, raising=False)
    summary = iterative.main(*parse("iterative_dpo", args), judge=style_judge())
    assert steps[0] == 2  # continued after the checkpoint's step, not from 0
    assert summary["iterations"][0]["steps"] == 10  # 20 pairs / 4 per step x 2 epochs, as uninterrupted


def test_sppo_uses_the_authors_labels_by_default(style_data, tmp_path):
    from pairrm_rlhf.trl.sppo import authors_probabilities

    iterative = recipe("iterative_dpo")
    args = [
        *ITERATIVE_SMALL,
        "--num_iterations",
        "1",
        "--num_responses",
        "3",
        "--dataset_name",
        style_data,
        "--output_dir",
        str(tmp_path),
        "--sppo",
        "true",
        "--beta",
        "0.001",
        "--eval_prompts",
        "0",
        "--save_strategy",
        "no",
        "--max_prompts",
        "8",
    ]
    script_args, training_args, model_args = parse("iterative_dpo", args)
    assert training_args.sppo_probabilities == "authors"
    iterative.main(script_args, training_args, model_args, judge=style_judge())
    pairs = Dataset.load_from_disk(str(tmp_path / "iteration_1" / "pairs"))
    win, lose = authors_probabilities(pairs["score_chosen"], pairs["score_rejected"], pairs["all_rm_scores"])
    np.testing.assert_allclose(pairs["chosen_probs_win"], win, rtol=1e-12)
    np.testing.assert_allclose(pairs["chosen_probs_lose"], lose, rtol=1e-12)
    with pytest.raises(ValueError, match="--sppo_probabilities"):
        iterative.main(*parse("iterative_dpo", args + ["--sppo_probabilities", "soft"]), judge=style_judge())


# ---- configs ----------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, expected",
    [
        (
            "ppo",
            [
                "model.safetensors",
                "value_head.safetensors",
                "log_history.json",
                "checkpoint-2/manifest.json",
                "eval_metrics.json",
                "eval_completions.jsonl",
            ],
        ),
        ("online_dpo", ["model.safetensors"]),
        ("grpo", ["model.safetensors"]),
        (
            "iterative_dpo",
            [
                "summary.json",
                "metrics.json",
                "eval_before.json",
                "iteration_1/model/model.safetensors",
                "iteration_1/pairs/dataset_info.json",
                "iteration_1/done.json",
            ],
        ),
    ],
)
def test_smoke_config_by_name(name, expected, tmp_path):
    """`--config <name>_smoke` finds the config shipped in the package; the script runs on a CPU-only machine."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(RECIPES / f"{name}.py"), "--config", f"{name}_smoke", "--output_dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for relative in expected:
        assert (tmp_path / relative).exists(), relative
    assert "Saved to" in proc.stdout
    if name == "iterative_dpo":
        assert (
            "pairs, mean PairRM score margin" in proc.stdout and "held-out (8 prompts) after iteration 1" in proc.stdout
        )


@pytest.mark.parametrize("recipe_name", ["online_dpo", "grpo", "iterative_dpo", "ppo"])
def test_deepspeed_without_an_accelerator_defaults_ddp_backend_to_gloo(recipe_name, monkeypatch):
    """accelerate gives every rank of a DeepSpeed run on a CPU-only machine num_processes=1 unless the backend is
    named: the TRL recipes' parsers default --ddp_backend to gloo there (a config or the command line still wins:
    argparse defaults); PPO has no such flag (its `make_accelerator` names the backend). The two-process ZeRO-3
    tests run the whole path."""
    common, seen = recipe("_common"), []
    monkeypatch.setattr(common.entry, "parse", lambda parser, argv, prog: seen.append(parser) or (0, 0, None))
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    with pytest.raises(AttributeError):  # the stand-in's model_args has no model_name_or_path: parsing ends here
        parse(recipe_name, [])
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(AttributeError):
        parse(recipe_name, [])
    before, after = (p.get_default("ddp_backend") for p in seen)
    assert (before, after) == ((None, None) if recipe_name == "ppo" else (None, "gloo"))


def test_shipped_configs_parse():
    """Every shipped config parses into its recipe's dataclasses by name (nothing is loaded)."""
    from pairrm_rlhf.args import bundled_configs

    kinds = ("iterative_dpo", "online_dpo", "grpo", "ppo")
    names = sorted(bundled_configs())
    assert {f"{k}{s}" for k in kinds for s in ("", "_smoke")} <= set(names)
    for name in names:
        kind = next((k for k in kinds if name.startswith(k)), None)
        if kind is None:
            continue  # another command's config (e.g. the labeler's)
        # bf16 is validated against the hardware when a TRL config is built: parse the GPU configs with it off here
        script_args, training_args, model_args = parse(kind, ["--config", name, "--bf16", "false"])
        if name.endswith("smoke"):
            assert model_args.model_name_or_path == "tiny" and training_args.use_cpu
        else:
            assert model_args.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct" and model_args.dtype == "float32"
            assert script_args.pairrm == "llm-blender/PairRM-hf" and "ultrafeedback" in script_args.dataset_name.lower()
    with pytest.raises(FileNotFoundError, match="--config: file not found: nope"):
        parse("ppo", ["--config", "nope"])


def run_script(source: str, tmp_path: Path, *args: str, env: dict | None = None, processes: int = 2) -> Path:
    """Run a test script (`source`, formatted with the recipes' folder) in `processes` processes (`torchrun`) with
    output_dir `tmp_path/out` and `args`; asserts that every process succeeded; returns the output_dir."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source.format(recipes=str(RECIPES))))
    out = tmp_path / "out"
    proc = launch(script, str(out), *args, env=env, processes=processes)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


# ---- two processes -----------------------------------------------------------------------------------------------
PPO_SCRIPT = """
import hashlib, json, os, sys
sys.path.insert(0, {recipes!r})
import _common, ppo
from pairrm_rlhf.trl.rewards import PairwiseReward
from pairrm_rlhf.pairrm import PairRM

script_args, training_args, model_args = _common.parse(ppo.make_parser(), [
    "--model_name_or_path", "tiny", "--pairrm", "tiny", "--dataset_name", "tiny", "--use_cpu", "true",
    "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--num_ppo_epochs", "2",
    "--total_episodes", "32", "--max_new_tokens", "6", "--learning_rate", "1e-3", "--seed", "0",
    "--output_dir", sys.argv[1]])
real_call = PairwiseReward.__call__
def call(self, *args, log_metric=None, **kwargs):  # a metric only rank 0 logs: the reduce must not hang
    if os.environ.get("RANK") == "0":
        log_metric("rank0/only", 1.0)
    return real_call(self, *args, log_metric=log_metric, **kwargs)
PairwiseReward.__call__ = call
trainer = ppo.main(script_args, training_args, model_args)
acc = trainer.accelerator
digest = hashlib.sha256()
for name, p in sorted(acc.unwrap_model(trainer.model).state_dict().items()):
    digest.update(p.detach().cpu().numpy().tobytes())
with open(os.path.join(sys.argv[1], f"rank{{acc.process_index}}.json"), "w") as f:
    json.dump(dict(world=acc.num_processes, digest=digest.hexdigest(), history=trainer.log_history), f)
from pairrm_rlhf.core.distributed import end_distributed_run
end_distributed_run()
"""


@pytest.mark.multiprocess
def test_ppo_two_processes(tmp_path):
    out = run_script(PPO_SCRIPT, tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients were averaged: the replicas stayed identical
    assert ranks[0]["history"] == ranks[1]["history"]  # logged metrics are reduced over both processes
    assert [h["episode"] for h in ranks[0]["history"]] == [16, 32]
    assert all(h["rank0/only"] == 1.0 for h in ranks[0]["history"])  # the union of keys, averaged where present
    assert (out / "model.safetensors").exists() and (out / "value_head.safetensors").exists()


ITERATIVE_SCRIPT = """
import os, sys, time
sys.path.insert(0, {recipes!r})
import _common, iterative_dpo
from pairrm_rlhf.labeling.store import ChunkStore

real_read = ChunkStore.read
def slow_read(self, index):  # rank 1 reads the shared chunk files 2 s late
    if os.environ.get("RANK") == "1":
        time.sleep(2)
    return real_read(self, index)
ChunkStore.read = slow_read
args = _common.parse(iterative_dpo.make_parser(), ["--config", "iterative_dpo_smoke", "--output_dir", sys.argv[1],
                                                    "--max_prompts", "16", "--eval_prompts", "0",
                                                    "--num_train_epochs", "1"])
iterative_dpo.main(*args)
from pairrm_rlhf.core.distributed import end_distributed_run
end_distributed_run()
"""


@pytest.mark.multiprocess
def test_iterative_dpo_two_processes_with_a_slow_rank(tmp_path):
    """The chunks of the labeling run are removed only after every process has read them (a barrier)."""
    out = run_script(ITERATIVE_SCRIPT, tmp_path)
    assert (out / "iteration_1" / "done.json").exists()
    assert not (out / "iteration_1" / "pairs.chunks").exists()


# ---- DeepSpeed ZeRO-3 (CPU, gloo) ---------------------------------------------------------------------------------
ZERO3_ENV = dict(
    ACCELERATE_USE_DEEPSPEED="true",
    ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
    CUDA_VISIBLE_DEVICES="",
    ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true",
    ACCELERATE_DEEPSPEED_ZERO3_INIT="true",
)

DEEPSPEED_SCRIPT = """
import json, os, sys
sys.path.insert(0, {recipes!r})
import torch
import _common, ppo

loaded = []
real_load = ppo.load_policy
def load_policy(model_args):  # records how much of each model this process holds as it loads
    model, tokenizer = real_load(model_args)
    loaded.append(sum(p.numel() for p in model.parameters()))
    return model, tokenizer
ppo.load_policy = load_policy
args = _common.parse(ppo.make_parser(), [
    "--model_name_or_path", "tiny", "--pairrm", "tiny", "--dataset_name", "tiny", "--use_cpu", "false",
    "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--num_ppo_epochs", "1",
    "--total_episodes", "16", "--max_new_tokens", "6", "--learning_rate", "1e-3", "--max_grad_norm", "0.5",
    "--seed", "0", "--eval_prompts", "4", "--save_steps", "2", "--output_dir", sys.argv[1], *sys.argv[2:]])
trainer = ppo.main(*args)
acc = trainer.accelerator
engine = trainer.model
with open(os.path.join(sys.argv[1], f"rank{{acc.process_index}}-{{len(sys.argv)}}.json"), "w") as f:
    json.dump(dict(world=acc.num_processes, stage=acc.state.deepspeed_plugin.zero_stage,
                   clip=engine.gradient_clipping(), loaded=loaded,
                   ref=type(trainer.ref_policy).__name__, history=trainer.log_history,
                   evals=len(trainer.evaluator.history)), f)
from pairrm_rlhf.core.distributed import end_distributed_run
end_distributed_run()
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ppo_deepspeed_zero3_two_processes(tmp_path):
    """Two processes under ZeRO-3 on the CPU (DeepSpeed's CPU accelerator; gloo: `make_accelerator` names the
    backend, without which accelerate gives every rank num_processes=1): each rank loads its partitions of the policy
    and the reference only (no whole fp32 policy nor a copy of it), the batch sizes and max_grad_norm reach
    DeepSpeed's config, the reference is a DeepSpeed engine, every rank evaluates before and after (generation under
    ZeRO-3 needs every rank to gather), a checkpoint (the engine's own, checksummed) is saved, and a run resumed from
    it logs the uninterrupted run's metrics on both ranks."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'pairrm-rlhf[deepspeed]')")
    out = run_script(DEEPSPEED_SCRIPT, tmp_path, "--total_episodes", "32", env=ZERO3_ENV)
    ranks = [json.loads((out / f"rank{r}-4.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["loaded"] for r in ranks] == [[0, 0], [0, 0]]
    assert all(r["stage"] == 3 and r["clip"] == 0.5 and r["ref"] == "DeepSpeedEngine" for r in ranks)
    assert all(np.isfinite(h["loss/policy_avg"]) for h in ranks[0]["history"])
    assert (out / "model.safetensors").exists() and (out / "checkpoint-2" / "manifest.json").exists()
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 4
    assert [r["evals"] for r in ranks] == [2, 2]
    run_script(DEEPSPEED_SCRIPT, tmp_path, "--total_episodes", "32", "--resume_from_checkpoint",
               str(out / "checkpoint-2"), env=ZERO3_ENV)
    resumed = [json.loads((out / f"rank{r}-6.json").read_text()) for r in (0, 1)]
    assert resumed[0]["history"] == resumed[1]["history"] == ranks[0]["history"]


ZERO3_TRL_SCRIPT = """
import importlib, json, os, sys
sys.path.insert(0, {recipes!r})
import _common
from accelerate import PartialState

recipe = importlib.import_module(sys.argv[2])
loaded, evaluations = [], []
real_load = recipe.load_policy
def load_policy(model_args):  # how much of the policy this process holds as it loads
    model, tokenizer = real_load(model_args)
    loaded.append(sum(p.numel() for p in model.parameters()))
    return model, tokenizer
recipe.load_policy = load_policy
real_call = _common.Evaluator.__call__
def call(self, model, tokenizer, step, write=True):  # which processes sample for the held-out evaluation
    evaluations.append(step)
    return real_call(self, model, tokenizer, step, write=write)
_common.Evaluator.__call__ = call
args = _common.parse(recipe.make_parser(), ["--config", sys.argv[2] + "_smoke", "--output_dir", sys.argv[1],
                                            "--use_cpu", "false", "--eval_prompts", "4", *sys.argv[3:]])
result = recipe.main(*args)
state = PartialState()
steps = result["iterations"][0]["steps"] if isinstance(result, dict) else result.state.global_step
with open(os.path.join(sys.argv[1], f"rank{{state.process_index}}.json"), "w") as f:
    json.dump(dict(world=state.num_processes, backend=args[1].ddp_backend, zero3=_common.zero3_enabled(),
                   loaded=loaded, evaluations=evaluations, steps=steps), f)
from pairrm_rlhf.core.distributed import end_distributed_run
end_distributed_run()
"""


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, extra, steps, saved",
    [
        ("online_dpo", ["--max_steps", "2"], 2, "model.safetensors"),
        ("grpo", ["--max_steps", "2", "--beta", "0.04"], 2, "model.safetensors"),  # grpo.yaml: a KL reference
        ("iterative_dpo", ["--max_prompts", "16", "--num_train_epochs", "1"], 2, "iteration_1/model/model.safetensors"),
    ],
)
def test_trl_recipes_deepspeed_zero3_two_processes(recipe, extra, steps, saved, tmp_path):
    """Each TRL recipe trains and evaluates in two processes under ZeRO-3 on the CPU. TRL builds the accelerator
    from TrainingArguments; without `--ddp_backend gloo` (defaulted by `_common.parse` when DeepSpeed runs on a
    CPU-only machine) accelerate gives every rank num_processes=1. Each rank loads its partition only (ZeRO-3 init),
    and every rank samples for the held-out evaluation before and after training (generation under ZeRO-3 needs
    every rank to gather the parameters: a main-process-only evaluation hangs)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'pairrm-rlhf[deepspeed]')")
    out = run_script(ZERO3_TRL_SCRIPT, tmp_path, recipe, *extra, env=ZERO3_ENV)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["backend"], r["zero3"]) for r in ranks] == [(2, "gloo", True)] * 2
    assert all(r["loaded"] and set(r["loaded"]) == {0} for r in ranks)  # partitioned placeholders from the start
    assert ranks[0]["evaluations"] == ranks[1]["evaluations"] and len(ranks[0]["evaluations"]) == 2
    assert [r["steps"] for r in ranks] == [steps, steps]
    assert (out / saved).exists() and len(json.loads((out / "eval_metrics.json").read_text())) == 2
