"""The recipes' held-out evaluation with `sampling_backend: vllm`, against the stand-in `vllm` module (`fake_vllm`):
vLLM samples the saved model's path (the initial model, then the saved output) with the same `SamplingParams` as
the transformers path's `GenerationConfig`, on the main process only; PPO evaluates with its rollout engine after
pushing the current weights; online DPO / GRPO's `sampling_backend: vllm` also turns on TRL's vLLM rollouts."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from fake_vllm import FakeLLM, install
from trl import ModelConfig

from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.generation import SamplingArguments, build_generation_config

from known_preference import style_judge, style_prompts
from recipe_scripts import recipe

PROMPTS = [[{"role": "user", "content": "Explain the sun."}], [{"role": "user", "content": "Describe the ocean."}]]


@pytest.fixture
def fake_vllm(monkeypatch):
    return install(monkeypatch)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each PPO run makes its own `Accelerator` (see tests/test_ppo.py)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_evaluation_samples_the_saved_paths_with_the_same_sampling(fake_vllm, tmp_path):
    common = recipe("_common")
    sampling = SamplingArguments(max_new_tokens=7, temperature=0.7)
    evaluator = common.Evaluator(style_judge(), PROMPTS, ["A star.", "Water."], sampling, 3, str(tmp_path),
                                 dtype=torch.bfloat16, backend="vllm", gpu_memory_utilization=0.25)
    common.evaluate_everywhere(evaluator, None, None, 0, saved="tiny")  # the initial model: its path
    (tmp_path / "output").mkdir()
    common.evaluate_everywhere(evaluator, None, None, 5, saved=str(tmp_path / "output"))  # the saved output
    first, second = FakeLLM.instances
    assert (first.model, second.model) == (bundled("policy"), str(tmp_path / "output"))
    assert first.engine_args == {"seed": 3, "dtype": torch.bfloat16, "gpu_memory_utilization": 0.25}
    ((method, prompts, params),) = first.calls
    assert method == "chat" and prompts == PROMPTS
    assert params == {"n": 1, "seed": 3, "max_tokens": 7, "stop": None, "temperature": 0.7, "top_p": 1.0,
                      "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    # the transformers path's GenerationConfig from the same SamplingArguments has the same numbers
    config = build_generation_config(*common.load_policy(ModelConfig(model_name_or_path="tiny")), sampling)
    assert (config.temperature, config.top_p, config.top_k, config.min_p, config.repetition_penalty,
            config.max_new_tokens) == (0.7, 1.0, 0, 0.0, 1.0, 7)
    rows = [json.loads(line) for line in (tmp_path / "eval_completions.jsonl").read_text().splitlines()]
    assert [(r["step"], r["completion"]) for r in rows] == [
        (0, "Explain the sun. #0"), (0, "Describe the ocean. #0"), (5, "Explain the sun. #0"),
        (5, "Describe the ocean. #0")]
    assert json.loads((tmp_path / "eval_before.json").read_text()) == ["Explain the sun. #0", "Describe the ocean. #0"]
    with pytest.raises(ValueError, match="sampling_backend vllm samples from the saved model: pass its path"):
        common.evaluate_everywhere(evaluator, None, None, 6)


def test_evaluation_without_vllm_is_a_one_line_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    common = recipe("_common")
    evaluator = common.Evaluator(style_judge(), PROMPTS, None, SamplingArguments(max_new_tokens=4), 0, str(tmp_path),
                                 backend="vllm")
    with pytest.raises(ImportError, match=r"^sampling_backend='vllm' needs the vllm package.*pip install vllm"):
        common.evaluate_everywhere(evaluator, None, None, 0, saved="tiny")


def test_online_dpo_and_grpo_turn_on_trls_vllm_rollouts(tmp_path):
    configs = {"online_dpo": "OnlineDPORecipeConfig", "grpo": "GRPORecipeConfig"}
    for name, cls in configs.items():
        config = getattr(recipe(name), cls)
        common = dict(output_dir=str(tmp_path), use_cpu=True, report_to="none")
        vllm = config(sampling_backend="vllm", **common)
        assert vllm.use_vllm and vllm.vllm_mode == "colocate", name  # TRL's default mode; `vllm_mode: server` too
        assert not config(**common).use_vllm, name
        with pytest.raises(ValueError, match="--sampling_backend must be one of transformers, vllm, got 'vLLM'"):
            config(sampling_backend="vLLM", **common)


def test_vllm_evaluation_of_a_lora_adapter_is_refused():
    check = recipe("_common").check_vllm_evaluation
    with pytest.raises(ValueError, match="--sampling_backend vllm: .* with use_peft the output is a LoRA adapter"):
        check("vllm", True, 8)
    check("vllm", True, 0)  # no evaluation: nothing to refuse
    check("transformers", True, 8)


def test_ppo_recipe_evaluates_with_its_rollout_engine(fake_vllm, tmp_path):
    common, ppo = recipe("_common"), recipe("ppo")
    args = common.parse(ppo.make_parser(), [
        "--model_name_or_path", "tiny", "--eval_prompts", "2", "--max_prompts", "8", "--total_episodes", "4",
        "--per_device_train_batch_size", "2", "--max_new_tokens", "5", "--num_ppo_epochs", "1", "--use_cpu", "true",
        "--sampling_backend", "vllm", "--output_dir", str(tmp_path), "--save_final", "false"])
    trainer = ppo.main(*args, judge=style_judge())
    (llm,) = FakeLLM.instances  # one engine: the rollouts' serves the evaluation too
    assert [method for method, _, _ in llm.calls] == ["chat", "generate", "generate", "chat"]
    # pushes: before the first evaluation (update 0), before rollout 2 (after update 1), before the last evaluation
    assert len(llm.synced) == 3 and trainer.vllm.synced_step == 2
    final = {k: v for k, v in trainer.accelerator.unwrap_model(trainer.model).policy.named_parameters()}
    assert all(torch.equal(llm.synced[-1][k], v) for k, v in final.items())
    assert [h["step"] for h in json.loads((tmp_path / "eval_metrics.json").read_text())] == [0, 2]
    evaluation = llm.calls[0][2]
    assert evaluation["seed"] == 42 and evaluation["max_tokens"] == 5 and evaluation["temperature"] == 0.7


def test_iterative_dpo_labels_and_evaluates_with_vllm_from_the_saved_policies(fake_vllm, tmp_path, monkeypatch):
    common, iterative = recipe("_common"), recipe("iterative_dpo")
    data = tmp_path / "style.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in style_prompts()[:10]))
    monkeypatch.setattr(FakeLLM, "text", staticmethod(lambda prompt, i: "word " * (i + 1)))  # lengths differ
    args = common.parse(iterative.make_parser(), [
        "--dataset_name", str(data), "--model_name_or_path", "tiny", "--conversational", "false", "--eval_prompts",
        "2", "--max_prompts", "10",
        "--num_iterations", "2", "--num_responses", "2", "--max_new_tokens", "6", "--per_device_train_batch_size",
        "4", "--max_length", "64", "--report_to", "none", "--save_strategy", "no", "--allow_unfinished_chosen",
        "true", "--sampling_backend", "vllm", "--eval_gpu_memory_utilization", "0.2", "--vllm_gpu_memory_utilization",
        "0.4", "--output_dir",
        str(tmp_path / "run")])
    iterative.main(*args, judge=style_judge(), eval_judge=style_judge())
    out = str(tmp_path / "run")
    # evaluation (n=1) of the initial policy, then per iteration: labeling (n=2) and evaluation of its saved model
    assert [(llm.model, llm.calls[0][2]["n"]) for llm in FakeLLM.instances] == [
        (bundled("policy"), 1), (bundled("policy"), 2), (f"{out}/iteration_1/model", 1),
        (f"{out}/iteration_1/model", 2), (f"{out}/iteration_2/model", 1)]
    evaluation_engines, labeling_engines = FakeLLM.instances[::2], FakeLLM.instances[1::2]
    assert all(llm.engine_args["gpu_memory_utilization"] == 0.2 for llm in evaluation_engines)
    # labeling: every process its own engine on its own GPU (vLLM's external launcher, as TRL's colocate mode)
    assert [(llm.engine_args["distributed_executor_backend"], llm.engine_args["gpu_memory_utilization"])
            for llm in labeling_engines] == [("external_launcher", 0.4)] * 2
    assert [h["step"] for h in json.loads((tmp_path / "run" / "eval_metrics.json").read_text())] == [0, 1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["iterations"][0]["pairs"] == 4
