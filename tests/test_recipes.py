"""Recipes: learning tests against a PairRM whose preference is known, PPO internals, SPPO loss, resume, smoke runs.

The scorer is a real PairRM checkpoint (hf layout, the bundled tokenizer, loaded through `PairRM.from_pretrained`)
with hand-set weights: one attention layer in which every token attends uniformly to itself and the tokens after it
and reads a feature that is +1 on special tokens and -1 on text tokens. The two-order logit f(x,A,B) - f(x,B,A) then
only depends on the `[CLS] <|candidate2|> text [SEP]` segment of each slot, and is > 0 exactly when A has fewer
PairRM tokens than B: the scorer prefers shorter responses. The tiny random policy can learn that in a few dozen
updates (end early, use tokens that cost fewer PairRM tokens), so each trainer must raise its win rate against the
initial policy, and shorten its responses, by clear margins.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np
import pytest
import torch
from datasets import Dataset
from safetensors.torch import save_file
from transformers import DebertaV2Config

from pairrm_rlhf import PairRM, PairwiseReward
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.formats import render
from pairrm_rlhf.trl.judge import PairRMJudge
from pairrm_rlhf.core.modeling import PairRMModel
from tiny_policy import build_tiny_tokenizer


REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
CONFIGS = RECIPES / "configs"
NO_SAVE = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[], save_strategy="no", seed=0)


def recipe(name: str):
    """Import recipes/<name>.py (the recipes are scripts, not a package)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    if name == "_common":  # the recipes import it under this name: share that one module
        return importlib.import_module("_common")
    if f"recipe_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"recipe_{name}"]


# ---- the scorer with a known preference -----------------------------------------------------------------------
def build_short_preferring_pairrm(path: Path) -> str:
    """A 1-layer PairRM (bundled tokenizer and prefix ids) whose two-order logit prefers fewer PairRM tokens."""
    source = Path(bundled("pairrm"))
    path.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, path / f.name)
    cfg = json.loads((source / "config.json").read_text())
    cfg.update(num_hidden_layers=1, num_attention_heads=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    config = DebertaV2Config.from_dict(cfg)
    model = PairRMModel(config)
    hidden = config.hidden_size
    specials = [0, 1, 2, cfg["source_prefix_id"], cfg["cand1_prefix_id"], cfg["cand2_prefix_id"], cfg["cand_prefix_id"]]
    balanced = torch.tensor([1.0, -1.0] * (hidden // 2))  # zero mean, unit variance: LayerNorm leaves it as it is
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0)
        emb = balanced.repeat(config.vocab_size, 1)
        emb[:, 0], emb[:, 1] = -1.0, 1.0  # dim 0: the feature, -1 on text tokens ...
        emb[specials, 0], emb[specials, 1] = 1.0, -1.0  # ... +1 on [PAD] [CLS] [SEP] and the prefix tokens
        model.pretrained_model.embeddings.word_embeddings.weight.copy_(emb)
        encoder = model.pretrained_model.encoder
        span = encoder.rel_embeddings.weight.shape[0] // 2
        rel = balanced.repeat(2 * span, 1)
        rel[span + 1 :, 2], rel[span + 1 :, 3] = -1.0, 1.0  # dim 2: +1 for keys at/after the query, -1 before
        encoder.rel_embeddings.weight.copy_(rel)
        attention = encoder.layer[0].attention
        attention.self.query_proj.bias[0] = 20.0  # one constant query ...
        attention.self.key_proj.weight[0, 2] = 20.0  # ... against keys that see only the direction: c2p masks "before"
        attention.self.value_proj.weight[0, 0] = 1.0  # values carry the feature: the mean over the tokens after
        attention.output.dense.weight[0, 0] = 1.0
        model.head_layer[1].weight[0, hidden] = 1.0  # g reads dim 0 of the candidate prefix state
        model.head_layer[4].weight[0, 0] = 10.0
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def short_rm_path(tmp_path_factory) -> str:
    return build_short_preferring_pairrm(tmp_path_factory.mktemp("short-pairrm"))


@pytest.fixture(scope="module")
def short_rm(short_rm_path) -> PairRM:
    return PairRM.from_pretrained(short_rm_path, device="cpu")


def n_tokens(rm: PairRM, texts: list[str], prompt="Q") -> np.ndarray:
    """PairRM tokens of each response's candidate text, as PairRM reads it after `prompt`."""
    candidates = [render(prompt, t)[1] for t in texts]
    ids = rm.backend.tokenize(candidates)
    return np.array([len(ids[c]) for c in candidates])


def test_scorer_prefers_fewer_tokens(short_rm):
    tokenizer = build_tiny_tokenizer()
    rng = random.Random(0)
    texts = [tokenizer.decode([rng.randrange(4, len(tokenizer)) for _ in range(rng.randint(0, 12))]) for _ in range(200)]
    texts += ["", "Paris.", "The capital of France is Paris, a large city on the Seine.", "Lyon"]
    a, b = texts[0::2], texts[1::2]
    for prompt in ("Explain the sun.", [{"role": "user", "content": "Explain the sun."}]):
        z = PairRMJudge(short_rm).two_order_logits([prompt] * len(a), [[x, y] for x, y in zip(a, b)])
        diff = n_tokens(short_rm, b, prompt) - n_tokens(short_rm, a, prompt)
        assert np.array_equal(np.sign(z), np.sign(diff))  # the known preference, with ties exactly at equal counts
        assert np.abs(z[diff != 0]).min() > 0.05 and (diff != 0).mean() > 0.8
    # as a reward against a reference: shorter than the reference wins, longer loses
    reward = PairwiseReward(short_rm, output="win")
    got = reward(["Q?"] * 3, ["ok", "a much longer answer with many more words than that", "same length"],
                 reference=["a reference that is longer than ok", "short reference", "same length"])
    assert got == [1.0, 0.0, 0.5]


# ---- evaluation: win rate against the initial policy, by the same scorer; and the ground truth -----------------
def evaluate(rm: PairRM, model, tokenizer, prompts: list, before: list[str] | None = None) -> tuple[list[str], float, float]:
    common = recipe("_common")
    samples = common.generate(model, tokenizer, prompts * 2, max_new_tokens=12, temperature=1.0, seed=1234)
    if before is None:
        return samples, 0.5, float(n_tokens(rm, samples).mean())
    return samples, common.win_rate(rm, prompts * 2, samples, before), float(n_tokens(rm, samples).mean())


@pytest.fixture(scope="module")
def baseline(short_rm):
    common = recipe("_common")
    data = common.load_prompt_dataset(common.RecipeArguments(dataset="tiny"))
    prompts = list(data["prompt"])
    model, tokenizer = common.load_policy("tiny")
    before, _, length = evaluate(short_rm, model, tokenizer, prompts)
    return prompts, before, length


def check_learned(name: str, short_rm, model, tokenizer, baseline, min_win: float, min_shrink: float) -> None:
    prompts, before, length_before = baseline
    _, win, length_after = evaluate(short_rm, model, tokenizer, prompts, before)
    print(f"{name}: win rate vs initial policy {win:.3f}; PairRM tokens per response {length_before:.1f} -> {length_after:.1f}")
    assert win >= min_win
    assert length_after <= (1 - min_shrink) * length_before


# ---- learning tests ------------------------------------------------------------------------------------------
def test_ppo_learns_the_known_preference(short_rm_path, short_rm, baseline, tmp_path):
    ppo = recipe("ppo")
    config = ppo.PPORecipeConfig(
        output_dir=str(tmp_path), policy="tiny", pairrm=short_rm_path, dataset="tiny", use_cpu=True, seed=0,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, num_ppo_epochs=4, total_episodes=16 * 30,
        max_new_tokens=12, temperature=1.0, learning_rate=1e-3, kl_coef=0.02, save_final=False,
    )
    trainer = ppo.run(config)
    history = trainer.log_history
    assert len(history) == 30
    assert np.mean([h["objective/scores"] for h in history[-4:]]) > np.mean([h["objective/scores"] for h in history[:4]]) + 0.1
    assert history[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference policy's
    policy = trainer.accelerator.unwrap_model(trainer.model).policy
    check_learned("PPO", short_rm, policy, trainer.tokenizer, baseline, min_win=0.8, min_shrink=0.4)


def test_online_dpo_learns_the_known_preference(short_rm_path, short_rm, baseline, tmp_path):
    online_dpo = recipe("online_dpo")
    config = online_dpo.OnlineDPORecipeConfig(
        output_dir=str(tmp_path), policy="tiny", pairrm=short_rm_path, dataset="tiny", reward="judge", max_steps=40,
        per_device_train_batch_size=8, max_new_tokens=12, max_length=96, temperature=1.0, learning_rate=2e-3,
        beta=[0.05], logging_steps=10, **NO_SAVE,
    )
    trainer = online_dpo.run(config)
    check_learned("online DPO", short_rm, trainer.model, trainer.processing_class, baseline, min_win=0.75, min_shrink=0.25)


def test_grpo_group_rewards_learn_the_known_preference(short_rm_path, short_rm, baseline, tmp_path):
    grpo = recipe("grpo")
    config = grpo.GRPORecipeConfig(
        output_dir=str(tmp_path), policy="tiny", pairrm=short_rm_path, dataset="tiny", reward_mode="group", max_steps=40,
        per_device_train_batch_size=16, num_generations=4, max_completion_length=12, temperature=1.0,
        learning_rate=2e-3, logging_steps=10, **NO_SAVE,
    )
    trainer = grpo.run(config)
    check_learned("GRPO (group)", short_rm, trainer.model, trainer.processing_class, baseline, min_win=0.75, min_shrink=0.3)


def iterative_config(module, tmp_path, short_rm_path, **overrides):
    # DPO + NLL on the chosen responses (TRL's loss_type ["sigmoid", "sft"], as in Iterative RPO): at this learning
    # rate plain DPO iterations on 32 pairs drift (likelihood displacement) and some seeds get longer, not shorter.
    values = dict(
        output_dir=str(tmp_path), policy="tiny", pairrm=short_rm_path, dataset="tiny", num_iterations=3,
        prompt_schedule="same", num_responses=8, strategy="best_vs_worst", max_new_tokens=12, temperature=1.0,
        eval_prompts=0, label_chunk_size=16, num_train_epochs=2, per_device_train_batch_size=4, max_length=96,
        learning_rate=2e-3, beta=0.1, loss_type=["sigmoid", "sft"], logging_steps=10, **NO_SAVE,
    )
    return module.IterativeDPOConfig(**{**values, **overrides})


def test_iterative_dpo_learns_the_known_preference(short_rm_path, short_rm, baseline, tmp_path):
    iterative = recipe("iterative_dpo")
    common = recipe("_common")
    summary = iterative.run(iterative_config(iterative, tmp_path, short_rm_path))
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2, 3]
    for it in summary["iterations"]:
        assert it["pairs"] >= 28 and it["mean_margin"] > 0
    pairs = Dataset.load_from_disk(str(tmp_path / "iteration_1" / "pairs"))
    chosen = [c[0]["content"] for c in pairs["chosen"]]
    rejected = [r[0]["content"] for r in pairs["rejected"]]
    assert (n_tokens(short_rm, chosen) < n_tokens(short_rm, rejected)).all()  # labels follow the known preference
    model, tokenizer = common.load_policy(str(tmp_path / "iteration_3" / "model"))
    check_learned("iterative DPO", short_rm, model, tokenizer, baseline, min_win=0.75, min_shrink=0.3)


# ---- PPO internals ---------------------------------------------------------------------------------------------
def test_ppo_advantages_and_eos_handling(short_rm):
    from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer

    common = recipe("_common")
    model, tokenizer = common.load_policy("tiny")
    data = Dataset.from_dict({"prompt": ["Explain the sun."] * 2, "reference": ["The sun is a star."] * 2})
    config = PPOConfig(use_cpu=True, per_device_train_batch_size=2, kl_coef=0.1, gamma=0.9, lam=0.8,
                       missing_eos_penalty=2.0, save_final=False, max_new_tokens=5)
    trainer = PPOTrainer(config, model, tokenizer, PairwiseReward(short_rm), data)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # EOS handling on a hand-made rollout: row 0 stops at its EOS (kept), row 1 never emits one
    response = torch.tensor([[10, 11, eos, 12, 13], [20, 21, 22, 23, 24]])
    is_eos = response == eos
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.tensor(5))
    assert length.tolist() == [3, 5]
    mask = (torch.arange(5)[None] < length[:, None]).float()
    logprobs, ref_logprobs = torch.randn(2, 5), torch.randn(2, 5)
    values = torch.randn(2, 5)
    scores = torch.tensor([1.0, 3.0])
    r = dict(mask=mask, length=length, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values,
             penalized=scores - torch.tensor([0.0, 2.0]))
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
    # a real rollout: responses are truncated after their first EOS, recomputed logprobs are the sampled ones
    rollout = trainer.rollout(data[:2])
    for row, n in zip(rollout["response"], rollout["length"]):
        assert (row[n:] == pad).all() and (row[: n - 1] != eos).all()
    assert torch.allclose(rollout["logprobs"] * rollout["mask"], rollout["ref_logprobs"] * rollout["mask"], atol=1e-5)
    stats = trainer.update(rollout)
    assert {"policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg", "loss/value_avg",
            "val/clipfrac_avg"} <= set(stats)


# ---- SPPO: the soft loss, exactly ------------------------------------------------------------------------------
def test_sppo_loss_is_the_soft_formula(tmp_path):
    from trl import DPOConfig

    from pairrm_rlhf.trl.sppo import SPPOTrainer

    common = recipe("_common")
    model, tokenizer = common.load_policy("tiny")
    p_win, p_lose = [0.9, 0.6, 0.55, 0.7], [0.2, 0.4, 0.5, 0.1]
    data = Dataset.from_dict({"prompt": ["Explain the sun.", "Describe the ocean.", "What is tea?", "Hi."],
                              "chosen": [" A star.", " Water.", " A drink.", " Hello."],
                              "rejected": [" No.", " I do not know at all.", " ?", " Go away."],
                              "chosen_probs_win": p_win, "chosen_probs_lose": p_lose})
    beta = 0.2
    args = DPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-3,
                     beta=beta, logging_steps=1, max_length=64, **NO_SAVE)
    trainer = SPPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    # at the first step the policy is the reference: log-ratios are 0 and the loss is the targets' squares
    expected = np.mean([((w - 0.5) / beta) ** 2 + ((l - 0.5) / beta) ** 2 for w, l in zip(p_win, p_lose)]) / 2
    logged = [log for log in trainer.state.log_history if "loss" in log][0]
    assert logged["loss"] == pytest.approx(expected, rel=1e-4)
    assert logged["sppo/prob_win_chosen"] == pytest.approx(np.mean(p_win), abs=1e-6)


# ---- resume ------------------------------------------------------------------------------------------------------
def test_iterative_dpo_resumes_after_a_crash(short_rm_path, tmp_path, monkeypatch):
    iterative = recipe("iterative_dpo")
    config = iterative_config(iterative, tmp_path, short_rm_path, num_iterations=2, num_responses=2, num_train_epochs=1,
                              eval_prompts=4, prompt_schedule="disjoint")
    real_train, real_label = iterative.train, iterative.label
    calls = []

    def crashing_train(config, iteration, *args):
        if iteration == 2:
            raise RuntimeError("simulated crash")
        return real_train(config, iteration, *args)

    monkeypatch.setattr(iterative, "train", crashing_train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        iterative.run(config)
    assert (tmp_path / "iteration_1" / "done.json").exists() and not (tmp_path / "iteration_2" / "done.json").exists()
    assert (tmp_path / "iteration_2" / "pairs" / "dataset_info.json").exists()  # labeled before the crash
    pairs_2 = Dataset.load_from_disk(str(tmp_path / "iteration_2" / "pairs"))["chosen"]
    done_1 = (tmp_path / "iteration_1" / "done.json").stat().st_mtime_ns

    def recording_label(config, iteration, *args):
        calls.append(iteration)
        return real_label(config, iteration, *args)

    monkeypatch.setattr(iterative, "train", real_train)
    monkeypatch.setattr(iterative, "label", recording_label)
    summary = iterative.run(config)
    assert calls == [2]  # iteration 1 is skipped entirely; iteration 2 reuses its saved pairs
    assert (tmp_path / "iteration_1" / "done.json").stat().st_mtime_ns == done_1
    assert Dataset.load_from_disk(str(tmp_path / "iteration_2" / "pairs"))["chosen"] == pairs_2
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2]
    assert json.loads((tmp_path / "summary.json").read_text())["eval_prompts"] == 4
    assert {"win_rate_after_vs_before", "win_rate_vs_reference_before", "win_rate_vs_reference_after"} <= set(summary)


# ---- smoke runs of every recipe with its smoke config ------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    ("ppo", ["model.safetensors", "value_head.pt", "log_history.json"]),
    ("online_dpo", ["model.safetensors"]),
    ("grpo", ["model.safetensors"]),
    ("iterative_dpo", ["summary.json", "eval_before.json", "iteration_1/model/model.safetensors",
                       "iteration_1/pairs/dataset_info.json", "iteration_1/done.json"]),
])
def test_smoke_config(name, expected, tmp_path, capsys):
    module = recipe(name)
    module.main(["--config", str(CONFIGS / f"{name}_smoke.yaml"), "--output_dir", str(tmp_path)])
    for relative in expected:
        assert (tmp_path / relative).exists(), relative
    out = capsys.readouterr().out
    assert "Saved to" in out
    if name == "iterative_dpo":
        assert "pairs, mean PairRM score margin" in out and "win rate vs reference" in out and "initial one" in out


def test_real_configs_parse():
    """Every shipped config parses into its recipe's dataclass (nothing is loaded)."""
    names = {"ppo": "PPORecipeConfig", "online_dpo": "OnlineDPORecipeConfig", "grpo": "GRPORecipeConfig",
             "iterative_dpo": "IterativeDPOConfig"}
    common = recipe("_common")
    for path in sorted(CONFIGS.glob("*.yaml")):
        name = next((n for n in sorted(names, key=len, reverse=True) if path.stem.startswith(n)), None)
        if name is None:
            continue  # another command's config (e.g. the labeler's)
        # bf16 is validated against the hardware when a TRL config is built: parse the GPU configs with it off here
        config = common.parse_config(getattr(recipe(name), names[name]), ["--config", str(path), "--bf16", "false"])
        if not path.stem.endswith("smoke"):
            assert config.policy == "Qwen/Qwen2.5-0.5B-Instruct" and config.pairrm == "llm-blender/PairRM-hf"
            assert "ultrafeedback" in config.dataset.lower()


# ---- two processes -----------------------------------------------------------------------------------------------
PPO_SCRIPT = """
import hashlib, json, os, sys
import torch
sys.path.insert(0, {recipes!r})
import ppo
config = ppo.PPORecipeConfig(output_dir=sys.argv[1], policy="tiny", pairrm="tiny", dataset="tiny", use_cpu=True,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, num_ppo_epochs=2,
                             total_episodes=32, max_new_tokens=6, learning_rate=1e-3, seed=0)
trainer = ppo.run(config)
acc = trainer.accelerator
digest = hashlib.sha256()
for name, p in sorted(acc.unwrap_model(trainer.model).state_dict().items()):
    digest.update(p.detach().cpu().numpy().tobytes())
with open(os.path.join(sys.argv[1], f"rank{{acc.process_index}}.json"), "w") as f:
    json.dump(dict(world=acc.num_processes, digest=digest.hexdigest(), history=trainer.log_history), f)
"""


def test_ppo_two_processes(tmp_path):
    script = tmp_path / "ppo_2proc.py"
    script.write_text(textwrap.dedent(PPO_SCRIPT.format(recipes=str(RECIPES))))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ["PYTHONPATH"]]))
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients were averaged: the replicas stayed identical
    assert ranks[0]["history"] == ranks[1]["history"]  # logged metrics are reduced over both processes
    assert [h["episode"] for h in ranks[0]["history"]] == [16, 32]
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "value_head.pt").exists()
