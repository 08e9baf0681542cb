"""PPO at a real run's precision and durability: bf16 forwards everywhere (KL exactly 0 at step 0), no upcast of a
frozen LoRA base, adapter-only checkpoints, resume that never unpickles and refuses damaged, missing or foreign state.

Runs on the CPU: torch's CPU autocast computes matmuls in bf16, as CUDA's does.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from torch import nn

from pairrm_rlhf import PairwiseReward

from known_preference import style_judge
from recipe_scripts import recipe


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each PPO run makes its own `Accelerator`; accelerate keeps one process-wide state and refuses a second with
    other mixed precision, so an earlier test's fp32 state would refuse these bf16 runs (a new process each run in
    real use). The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def tiny_policy(dtype: str = "float32"):
    from trl import ModelConfig

    return recipe("_common").load_policy(ModelConfig(model_name_or_path="tiny", dtype=dtype))


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


DATA = Dataset.from_dict({"prompt": ["Explain the sun.", "Describe the ocean.", "Say hi.", "Name a colour."] * 2,
                          "reference": ["The sun is a star.", "Water.", "Hi.", "Blue."] * 2})


def trainer(peft_config=None, dtype="float32", reward=None, **config):
    from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer

    model, tokenizer = tiny_policy(dtype)
    defaults = dict(use_cpu=True, per_device_train_batch_size=2, save_final=False, max_new_tokens=5, seed=1,
                    num_ppo_epochs=1, learning_rate=1e-3)
    return PPOTrainer(PPOConfig(**{**defaults, **config}), model, tokenizer, reward or PairwiseReward(style_judge()),
                      DATA, peft_config=peft_config)


def record_linear_dtypes(module: nn.Module, seen: set) -> list:
    """Forward hooks on every nn.Linear of `module`: the dtype each matmul produced goes into `seen`."""
    return [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
            for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_ppo_bf16_every_forward_in_bf16_and_kl_zero_at_step_0(use_lora):
    """`bf16: true`: the policy's, the value head's and the reference's matmuls run in bf16 (the reference was
    fp32 outside autocast: a 7B reference at 28 GB, and a nonzero KL at step 0); same weights, same dtype: KL 0."""
    t = trainer(lora() if use_lora else None, dtype="bfloat16" if use_lora else "float32", bf16=True)
    model = t.accelerator.unwrap_model(t.model)
    policy_seen, value_seen, ref_seen = set(), set(), set()
    hooks = record_linear_dtypes(model.policy, policy_seen) + record_linear_dtypes(model.value_head, value_seen)
    if use_lora:  # the reference is the adapter-disabled model: record the forwards made with the adapter off
        lora_layers = [m for n, m in model.policy.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_A")]
        hooks += [m.register_forward_hook(lambda m, _i, out: (ref_seen if m.disable_adapters else policy_seen).add(
            out.dtype)) for m in lora_layers]
    else:
        hooks += record_linear_dtypes(t.ref_policy, ref_seen)
    rollout = t.rollout(DATA[[0, 1]])
    for h in hooks:
        h.remove()
    assert policy_seen == {torch.bfloat16}, policy_seen
    assert value_seen == {torch.bfloat16}, value_seen
    assert ref_seen == {torch.bfloat16}, ref_seen
    mask = rollout["mask"].bool()
    assert mask.any()
    assert torch.equal(rollout["logprobs"][mask], rollout["ref_logprobs"][mask])  # exactly: KL 0 at step 0
    assert rollout["kl"].abs().max().item() == 0.0


def test_ppo_lora_keeps_the_frozen_base_in_its_dtype():
    """A bf16 base under LoRA stays bf16 (2 bytes a parameter: no fp32 copy of a 7B base); the adapter and the
    value head are fp32 master weights."""
    t = trainer(lora(), dtype="bfloat16", bf16=True)
    model = t.accelerator.unwrap_model(t.model)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}


# ---- checkpoints ----------------------------------------------------------------------------------------------
def trained(tmp_path, peft_config=None, **config):
    settings = {"output_dir": str(tmp_path), "save_steps": 1, "total_episodes": 4, **config}
    t = trainer(peft_config, **settings)
    t.train()
    return t, settings


def test_ppo_lora_checkpoint_holds_the_adapter_not_the_base(tmp_path):
    """At 7B a checkpoint with the base is 28 GB; with LoRA only the adapter, value head and their optimizer state."""
    t, _ = trained(tmp_path, lora())
    checkpoint = Path(t.config.output_dir) / "checkpoint-1"
    size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    model = t.accelerator.unwrap_model(t.model)
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    adapter = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    assert size < base / 2, (size, base)
    assert size < 3 * adapter + 200_000, (size, adapter)  # weights + 2 Adam moments + small JSON/RNG files


class Planted:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_ppo_resume_never_unpickles_a_planted_file(tmp_path):
    """A pickle planted under a name accelerate's checkpoints used (loaded with weights_only=False: it ran code on
    resume): resuming never reads it."""
    t, settings = trained(tmp_path / "run")
    checkpoint = Path(t.config.output_dir) / "checkpoint-1"
    marker = tmp_path / "pwned"
    torch.save(Planted(str(marker)), checkpoint / "custom_checkpoint_0.pkl")
    resumed = trainer(**{**settings, "resume_from_checkpoint": str(checkpoint)})
    with contextlib.suppress(Exception):  # refusing would be fine too; running the planted code is not
        resumed.train()
    assert not marker.exists(), "resuming ran the planted pickle"
    assert resumed.update_step == 2  # and the run continued from the intact checkpoint


def rng_file(checkpoint: Path) -> Path:
    return next(f for f in sorted(checkpoint.iterdir()) if "rng" in f.name or "random_states" in f.name)


@pytest.mark.parametrize("damage", ["empty", "missing", "flipped"])
def test_ppo_resume_refuses_a_damaged_state_file_naming_it(tmp_path, damage):
    """A 0-byte RNG state file used to log INFO and continue (the run then diverged from the uninterrupted one)."""
    t, settings = trained(tmp_path)
    checkpoint = Path(t.config.output_dir) / "checkpoint-1"
    target = rng_file(checkpoint) if damage != "flipped" else next(checkpoint.glob("*.safetensors"))
    if damage == "empty":
        target.write_bytes(b"")
    elif damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"resume_from_checkpoint: .*{target.name}"):
        trainer(**{**settings, "resume_from_checkpoint": str(checkpoint)}).train()


def test_ppo_resume_refuses_changed_settings(tmp_path):
    """Resuming with another learning rate is another run: refused with the exact difference."""
    t, settings = trained(tmp_path)
    checkpoint = Path(t.config.output_dir) / "checkpoint-1"
    with pytest.raises(ValueError, match=r"config\.learning_rate: 0\.001 -> 0\.002"):
        trainer(**{**settings, "learning_rate": 2e-3, "resume_from_checkpoint": str(checkpoint)}).train()


def test_ppo_resume_latest_skips_an_interrupted_save(tmp_path):
    """`resume_from_checkpoint: true` takes the newest checkpoint whose manifest was written (saved last)."""
    t, settings = trained(tmp_path)  # checkpoints 1 and 2
    (Path(t.config.output_dir) / "checkpoint-2" / "manifest.json").unlink()  # as if killed while saving 2
    resumed = trainer(**{**settings, "resume_from_checkpoint": "true"})
    resumed.load_checkpoint("true")
    assert resumed.update_step == 1
    with pytest.raises(ValueError, match="manifest.json is missing"):
        resumed.load_checkpoint(str(Path(t.config.output_dir) / "checkpoint-2"))


@pytest.mark.parametrize("damage", ["flipped", "settings"])
def test_ppo_recipe_refuses_a_bad_checkpoint_before_loading_a_model(tmp_path, monkeypatch, damage):
    """At 7B the policy and the reference take minutes to load: a damaged or foreign checkpoint is refused first,
    naming the file or the changed setting, and no model loads."""
    ppo = recipe("ppo")
    argv = ["--config", "ppo_smoke", "--output_dir", str(tmp_path), "--use_cpu", "true", "--save_steps", "1",
            "--total_episodes", "8", "--eval_prompts", "0"]
    ppo.main(*recipe("_common").parse(ppo.make_parser(), argv))
    checkpoint = tmp_path / "checkpoint-1"
    if damage == "flipped":
        target = checkpoint / "trainable.safetensors"
        data = bytearray(target.read_bytes())
        data[-1] ^= 1
        target.write_bytes(bytes(data))
        expected = "trainable.safetensors is damaged"
    else:
        argv += ["--learning_rate", "1e-3"]
        expected = r"config\.learning_rate: .* -> 0\.001"
    loads = []
    monkeypatch.setattr(ppo, "load_policy", lambda model_args: loads.append(model_args) or tiny_policy())
    args = recipe("_common").parse(ppo.make_parser(), argv + ["--resume_from_checkpoint", str(checkpoint)])
    with pytest.raises(ValueError, match=f"resume_from_checkpoint: .*{expected}"):
        ppo.main(*args)
    assert loads == []


# ---- reward scaling ---------------------------------------------------------------------------------------------
class Scripted:
    """A reward function returning the next scores of a script (one list per call)."""

    def __init__(self, *batches):
        self.batches = list(batches)

    def __call__(self, prompts, completions, log_metric=None, **columns):
        return self.batches.pop(0)[: len(prompts)]


def test_ppo_reward_scaling_initial_and_running():
    """`initial`: the first rollout's scores define mean 0 / std 1 for the whole run (the lm-human-preferences gain
    and bias); `running`: statistics of every score so far. A missing-EOS penalty applies after scaling."""
    first, second = [2.0, 4.0, 6.0, 8.0], [10.0, 10.0, 10.0, 10.0]
    t = trainer(reward=Scripted(first, second), reward_scaling="initial", max_new_tokens=3)
    batch = DATA[[0, 1, 2, 3]]
    a, b = t.rollout(batch), t.rollout(batch)
    std = torch.tensor(first).std().item()
    expected_a, expected_b = (torch.tensor(first) - 5) / std, (torch.tensor(second) - 5) / std
    torch.testing.assert_close(a["penalized"], expected_a)
    torch.testing.assert_close(b["penalized"], expected_b)
    torch.testing.assert_close(a["scores"], torch.tensor(first))  # the logged scores stay raw

    t = trainer(reward=Scripted(first, second), reward_scaling="running", max_new_tokens=3)
    t.rollout(batch)
    b = t.rollout(batch)
    everything = torch.tensor(first + second)
    torch.testing.assert_close(b["penalized"], (torch.tensor(second) - everything.mean()) / everything.std())

    with pytest.raises(ValueError, match="reward_scaling must be one of none, initial, running"):
        trainer(reward_scaling="whiten")


def test_ppo_reward_scaling_statistics_are_checkpointed(tmp_path):
    t, settings = trained(tmp_path, reward_scaling="running")
    resumed = trainer(**settings)
    resumed.load_checkpoint(str(tmp_path / "checkpoint-2"))
    assert resumed.reward_scaler.state_dict() == t.reward_scaler.state_dict()
    assert t.reward_scaler.count == 4  # 2 updates x 2 rollouts: every valid score counted


# ---- the critic -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
def test_ppo_value_gradients_reach_the_policy_only_with_the_shared_head(separate, tmp_path):
    """`separate_critic: true` puts the value head on a copy of the initial backbone: the value loss trains the
    critic and never moves the policy (with the shared head it does)."""
    t = trainer(separate_critic=separate, output_dir=str(tmp_path))
    model = t.accelerator.unwrap_model(t.model)
    nn.init.normal_(model.value_head.weight)  # zero-initialised: no gradient would flow through it at all
    batch = t._inputs(*[x[:2] for x in (torch.tensor([[5, 6, 7]] * 2), torch.ones(2, 3, dtype=torch.long))],
                      torch.tensor([[8, 9]] * 2), torch.ones(2, 2, dtype=torch.bool))
    _, values = model(*batch)
    values.float().pow(2).sum().backward()
    policy_grads = [p.grad for p in model.policy.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert bool(policy_grads) != separate
    if separate:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.parameters())
        t.config.save_final = True
        t.train()  # a whole update runs with the separate critic, which is saved with the value head
        assert (Path(t.config.output_dir) / "critic.safetensors").exists()
