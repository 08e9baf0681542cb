"""PPO's rollouts sampled by a colocated vLLM engine (`sampling_backend: vllm`, `pairrm_rlhf.trl.ppo_vllm`), tested
against the stand-in `vllm` module (`fake_vllm`; vLLM needs a GPU and is not installed here): the engine and the exact
`SamplingParams` built, the policy's weights pushed before the first rollout and after every update (names and
values; a LoRA policy merged out of place), the fake's tokens used as the rollouts with unfinished rows handled as the
transformers path does, seeds that a resumed run draws again, and a one-line ImportError without vLLM."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from datasets import Dataset
from fake_vllm import FakeLLM, install, keep_launcher_env

from pairrm_rlhf import PairwiseReward
from pairrm_rlhf.core.assets import bundled

from known_preference import style_judge
from recipe_scripts import recipe

DATA = Dataset.from_dict({"prompt": ["Explain the sun.", "Describe the ocean.", "Say hi.", "Name a colour."],
                          "reference": ["The sun is a star.", "Water.", "Hi.", "Blue."]})


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each PPO run makes its own `Accelerator` (see tests/test_ppo.py)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.fixture
def fake_vllm(monkeypatch):
    return install(monkeypatch)


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def trainer(peft_config=None, cls=None, **config):
    from trl import ModelConfig

    from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer

    model, tokenizer = recipe("_common").load_policy(ModelConfig(model_name_or_path="tiny"))
    defaults = dict(use_cpu=True, per_device_train_batch_size=2, save_final=False, max_new_tokens=5, seed=1,
                    num_ppo_epochs=1, learning_rate=1e-3, sampling_backend="vllm", temperature=0.7)
    return (cls or PPOTrainer)(PPOConfig(**{**defaults, **config}), model, tokenizer,
                               PairwiseReward(style_judge()), DATA, peft_config=peft_config)


def policy_weights(t) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in t.accelerator.unwrap_model(t.model).policy.named_parameters()}


def assert_same_weights(pushed: dict, expected: dict, exact: bool = True):
    assert sorted(pushed) == sorted(expected)
    for name, value in expected.items():
        if exact:
            assert torch.equal(pushed[name], value), name
        else:
            torch.testing.assert_close(pushed[name].float(), value.float(), rtol=1e-5, atol=1e-6, msg=name)


def test_the_engine_and_the_exact_sampling_params(fake_vllm):
    t = trainer()
    (llm,) = FakeLLM.instances
    assert llm.model == bundled("policy")  # the policy's own checkpoint (its weights are replaced at the first push)
    assert llm.engine_args == {"gpu_memory_utilization": 0.3, "seed": 1 + 0, "dtype": "auto",
                               "distributed_executor_backend": "external_launcher"}
    t.rollout(DATA[:2])
    ((method, prompts, params),) = llm.calls
    eos = t.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    base = params[0]["seed"]
    assert method == "generate" and [p["seed"] for p in params] == [base, base + 1]  # one seed per prompt
    for p in params:
        assert {k: v for k, v in p.items() if k != "seed"} == {
            "n": 1, "max_tokens": 5, "stop": None, "temperature": 0.7, "top_p": 1.0, "top_k": -1, "min_p": 0.0,
            "repetition_penalty": 1.0, "stop_token_ids": eos}
    # the transformers path's GenerationConfig has the same numbers (top_k 0 and -1 both mean off)
    g = t.generation_config
    assert (g.temperature, g.top_p, g.top_k, g.min_p, g.repetition_penalty, g.max_new_tokens) == (
        0.7, 1.0, 0, 0.0, 1.0, 5)
    # the prompts are the query's token ids without the left padding
    enc = t._encode(DATA[:2]["prompt"])
    assert [p["prompt_token_ids"] for p in prompts] == [
        row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]


def test_the_rollouts_are_the_engines_tokens_and_a_cut_one_is_unfinished(fake_vllm, monkeypatch):
    t = trainer()
    eos = int(t.eos_ids[0])
    answers = {0: ([7, 8, eos], "stop"), 1: ([9, 10, 11, 12, 13], "length")}  # row 1 cut at max_new_tokens
    monkeypatch.setattr(FakeLLM, "respond", staticmethod(lambda ids, params, row: answers[row]))
    seen = {}

    def reward(prompts, completions, **_):
        seen["completions"] = completions
        return [0.5, 0.5]

    t.reward_fn = reward
    r = t.rollout(DATA[:2])
    assert r["response"].tolist() == [[7, 8, eos, t.pad_id, t.pad_id], [9, 10, 11, 12, 13]]
    assert r["has_eos"].tolist() == [1.0, 0.0] and r["length"].tolist() == [3, 5]
    assert r["mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert seen["completions"] == [t.tokenizer.decode([7, 8], skip_special_tokens=True),
                                   t.tokenizer.decode([9, 10, 11, 12, 13], skip_special_tokens=True)]
    # a missing EOS is penalised as on the transformers path
    t.config.missing_eos_penalty = 2.0
    r = t.rollout(DATA[:2])
    assert r["penalized"].tolist() == [0.5, 0.5 - 2.0]


def test_weights_are_pushed_before_the_first_rollout_and_after_every_update(fake_vllm):
    from pairrm_rlhf.trl.ppo import PPOTrainer

    after_update = []

    class Recording(PPOTrainer):
        def on_update_end(self):
            after_update.append(policy_weights(self))

    t = trainer(cls=Recording, total_episodes=6)  # 3 updates of 2 rollouts
    initial = policy_weights(t)
    t.train()
    (llm,) = FakeLLM.instances
    assert len(llm.synced) == 3 and len(llm.calls) == 3  # one push before each rollout
    assert_same_weights(llm.synced[0], initial)
    assert_same_weights(llm.synced[1], after_update[0])
    assert_same_weights(llm.synced[2], after_update[1])
    assert not all(torch.equal(after_update[0][k], v) for k, v in initial.items())  # the update moved the policy
    t.vllm.sync(t.accelerator.unwrap_model(t.model).policy, t.update_step, zero3=False)
    assert_same_weights(llm.synced[3], after_update[2])  # e.g. before the final evaluation
    t.vllm.sync(t.accelerator.unwrap_model(t.model).policy, t.update_step, zero3=False)
    assert len(llm.synced) == 4  # nothing changed since: nothing pushed


def test_a_lora_policy_is_pushed_merged_and_its_base_never_moves(fake_vllm):
    t = trainer(lora(), total_episodes=4)
    t.train()
    policy = t.accelerator.unwrap_model(t.model).policy
    base = {k: v.detach().clone() for k, v in policy.named_parameters() if not v.requires_grad}
    t.vllm.sync(policy, t.update_step, zero3=False)
    merged = copy.deepcopy(policy).merge_and_unload()
    assert_same_weights(FakeLLM.instances[0].synced[-1], dict(merged.named_parameters()), exact=False)
    assert not any("lora" in name or "base_model" in name for name in FakeLLM.instances[0].synced[-1])
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in base.items())  # bitwise: no merge into the base and back


def test_a_resumed_run_draws_the_same_seeds(fake_vllm, tmp_path):
    settings = dict(total_episodes=6, save_steps=1, output_dir=str(tmp_path))
    trainer(**settings).train()
    (full,) = FakeLLM.instances
    seeds = [[p["seed"] for p in params] for _, _, params in full.calls]
    assert len({s[0] for s in seeds}) == 3  # every rollout has its own seeds
    FakeLLM.instances.clear()
    trainer(**settings, resume_from_checkpoint=str(tmp_path / "checkpoint-1")).train()
    (resumed,) = FakeLLM.instances
    assert [[p["seed"] for p in params] for _, _, params in resumed.calls] == seeds[1:]


def test_without_vllm_a_one_line_import_error(monkeypatch):
    keep_launcher_env(monkeypatch)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"^sampling_backend='vllm' needs the vllm package.*pip install vllm") as e:
        trainer()
    assert "\n" not in str(e.value)


def test_an_unknown_backend_is_refused_at_parse():
    with pytest.raises(ValueError, match="--sampling_backend must be one of transformers, vllm, got 'vlm'"):
        recipe("ppo").PPORecipeConfig(sampling_backend="vlm")
