"""fp32 master weights: the recipes and PPOTrainer train float32 parameters whatever the checkpoint declares (the
bundled tiny policy declares bfloat16 and stores bf16 weights, like Qwen2.5-0.5B-Instruct), so one optimizer step at
each shipped config's learning rate changes every weight that has a gradient. The same step on bf16 weights loses
most updates (the control that shows the check can fail)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from pairrm_rlhf.args import bundled_configs

from recipe_scripts import recipe

TRAINING = {"ppo": "ppo", "online_dpo": "online_dpo", "grpo": "grpo", "iterative_dpo": "iterative_dpo"}


def shipped_configs() -> list[tuple[str, str]]:
    out = []
    for name in sorted(bundled_configs()):
        kind = next((k for k in sorted(TRAINING, key=len, reverse=True) if name.startswith(k)), None)
        if kind:
            out.append((name, kind))
    return out


def parsed(name: str, kind: str, tmp_path, *extra: str):
    module = recipe(kind)
    common = recipe("_common")
    return common, common.parse(module.make_parser(), ["--config", name, "--model_name_or_path", "tiny", "--bf16",
                                                       "false", "--output_dir", str(tmp_path), *extra])


def one_step(model, training_args, kind: str) -> tuple[dict, dict, dict]:
    """Parameters before/after one optimizer step of the config's optimizer at its learning rate, and the grads."""
    torch.manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (2, 12))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "ppo":
        optimizer = torch.optim.AdamW(params, lr=training_args.learning_rate, eps=training_args.adam_epsilon)
        eps = training_args.adam_epsilon
    else:
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args, model)
        optimizer = cls(params, **kwargs)
        eps = kwargs.get("eps", 1e-8)
    names = {id(p): n for n, p in model.named_parameters()}
    before = {names[id(p)]: p.detach().clone() for p in params}
    grads = {names[id(p)]: p.grad.detach().clone() for p in params}
    optimizer.step()
    after = {names[id(p)]: p.detach().clone() for p in params}
    return before, after, {k: g.abs() > eps for k, g in grads.items()}


@pytest.mark.parametrize("name, kind", shipped_configs())
def test_one_step_changes_every_weight_with_a_gradient(name, kind, tmp_path):
    common, (script_args, training_args, model_args) = parsed(name, kind, tmp_path)
    assert model_args.dtype in (None, "float32")  # every shipped config trains fp32 masters
    model, _ = common.load_policy(model_args)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before, after, has_grad = one_step(model, training_args, kind)
    for k in before:
        changed = before[k] != after[k]
        assert changed[has_grad[k]].all(), f"{name}: {k} lost {(~changed[has_grad[k]]).sum()} updates"


def test_pure_bf16_is_an_explicit_opt_in_that_warns_and_loses_updates(tmp_path, caplog):
    common, (script_args, training_args, model_args) = parsed("iterative_dpo", "iterative_dpo", tmp_path,
                                                               "--dtype", "bfloat16")
    with caplog.at_level("WARNING", logger="recipes"):
        model, _ = common.load_policy(model_args)
    assert model.dtype == torch.bfloat16 and "AdamW updates below their resolution are lost" in caplog.text
    before, after, has_grad = one_step(model, training_args, "iterative_dpo")
    changed = sum(int((before[k] != after[k])[has_grad[k]].sum()) for k in before)
    total = sum(int(has_grad[k].sum()) for k in before)
    assert changed / total < 0.2  # at lr 5e-7 bf16 weights keep almost every update's rounding away


def test_ppo_trainer_casts_to_fp32_masters_unless_opted_out(caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pairrm_rlhf.core.assets import bundled
    from pairrm_rlhf.trl.ppo import PPOConfig, PPOTrainer

    def trainer(**kw):
        model = AutoModelForCausalLM.from_pretrained(bundled("policy"))  # transformers 5: dtype "auto" -> bf16
        assert model.dtype == torch.bfloat16
        return PPOTrainer(PPOConfig(use_cpu=True, per_device_train_batch_size=2, save_final=False, **kw), model,
                          AutoTokenizer.from_pretrained(bundled("policy")), lambda **k: [0.0] * len(k["prompts"]),
                          [{"prompt": "x"}] * 2)

    t = trainer()
    assert {p.dtype for p in t.model.parameters()} == {torch.float32}
    assert {p.dtype for p in t.ref_policy.parameters()} == {torch.float32}
    with caplog.at_level("WARNING"):
        t = trainer(keep_half_precision_weights=True)
    assert torch.bfloat16 in {p.dtype for p in t.model.policy.parameters()} and "lost" in caplog.text
