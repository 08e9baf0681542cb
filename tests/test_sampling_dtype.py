"""Sampling for labeling and held-out evaluation computes in the run's dtype (issue 22 item 1): with `bf16: true`
the fp32 master weights sample with bf16 matmuls (autocast), never in a silent fp32 forward. Forward hooks on every
`nn.Linear` of the policy record the dtype of its output (the matmul's) during sampling; torch's CPU autocast
supports bfloat16, so this runs without a GPU."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.online_dpo import OnlineDPOConfig

from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.labeling.generation import ResponseSampler

from recipe_scripts import recipe

PROMPTS = [[{"role": "user", "content": "Explain the sun."}], [{"role": "user", "content": "Describe the ocean."}]]


@pytest.fixture(scope="module")
def fp32_policy():
    """The bundled tiny policy as a recipe loads it: fp32 master weights (it declares bf16)."""
    model = AutoModelForCausalLM.from_pretrained(bundled("policy"), dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(bundled("policy"))


@contextmanager
def matmul_dtypes(model):
    """The set of output dtypes of every nn.Linear forward inside the block."""
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def bf16_run_config(tmp_path):
    return OnlineDPOConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none")


def test_compute_dtype_follows_the_run(tmp_path):
    common = recipe("_common")
    assert common.compute_dtype(bf16_run_config(tmp_path)) == torch.bfloat16
    assert common.compute_dtype(OnlineDPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True)) is None


def test_evaluation_samples_in_bf16_under_a_bf16_run(fp32_policy, tmp_path):
    model, tokenizer = fp32_policy
    common = recipe("_common")
    sampling = SamplingArguments(max_new_tokens=4)
    dtype = common.compute_dtype(bf16_run_config(tmp_path))
    with matmul_dtypes(model) as seen:
        common.generate(model, tokenizer, PROMPTS, sampling, seed=0, dtype=dtype)
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the master weights stay fp32
    with matmul_dtypes(model) as seen:  # a run without bf16 samples in the weights' dtype
        common.generate(model, tokenizer, PROMPTS, sampling, seed=0, dtype=None)
    assert seen == {torch.float32}


def test_labeling_samples_in_bf16_under_a_bf16_run(fp32_policy):
    model, tokenizer = fp32_policy
    sampler = ResponseSampler(
        model, tokenizer, num_responses=2, sampling=SamplingArguments(max_new_tokens=4), compute_dtype=torch.bfloat16
    )
    with matmul_dtypes(model) as seen:
        responses = sampler.generate(PROMPTS, seed=0)
    assert seen == {torch.bfloat16} and [len(r) for r in responses] == [2, 2]


def test_iterative_dpo_labels_in_the_runs_dtype(fp32_policy, hf_model, tmp_path, monkeypatch):
    """The recipe hands its compute dtype to the labeler's sampler (not only to a unit under test)."""
    from accelerate import PartialState
    from datasets import Dataset

    iterative = recipe("iterative_dpo")
    model, tokenizer = fp32_policy
    script_args, config, _ = recipe("_common").parse(
        iterative.make_parser(),
        [
            "--config",
            "iterative_dpo_smoke",
            "--output_dir",
            str(tmp_path),
            "--bf16",
            "true",
            "--use_cpu",
            "true",
            "--max_new_tokens",
            "4",
            "--num_responses",
            "2",
        ],
    )
    with matmul_dtypes(model) as seen:
        iterative.label(
            config,
            1,
            Dataset.from_dict({"prompt": PROMPTS}),
            model,
            tokenizer,
            hf_model,
            "tiny",
            PartialState(cpu=True),
            config.sampling(),
        )
    assert seen == {torch.bfloat16}


def test_one_policy_loader(monkeypatch):
    """The recipes load their policy through the one loader, `core.generation.load_policy` (issue 21 item 3), with
    their behaviour kept: train mode, on the CPU, fp32 master weights by default (the tiny policy declares bf16)."""
    from trl import ModelConfig

    from pairrm_rlhf.core import generation

    calls = []
    real = generation.load_policy
    monkeypatch.setattr(generation, "load_policy", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    model, tokenizer = recipe("_common").load_policy(ModelConfig(model_name_or_path="tiny"))
    assert [a for a, _ in calls] == [("tiny", "cpu", "float32")] and calls[0][1]["train"] is True
    assert model.training and model.device.type == "cpu" and tokenizer.pad_token is not None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    sampler_model, _ = real("tiny", "cpu")  # for sampling: eval mode, the checkpoint's dtype
    assert not sampler_model.training and {p.dtype for p in sampler_model.parameters()} == {torch.bfloat16}


def test_sppo_config_samples_as_the_authors_with_vllm(hf_model, tmp_path, monkeypatch):
    """`iterative_dpo_sppo` labels through vLLM with uclaml/SPPO's scripts/generate.py sampling: temperature 0.7,
    top_p 0.9, max_tokens 2048, K = 5 (they call generate 5 times with n=1; one call with n=5 is the same sampling).
    vLLM is not installed here: a stand-in module records the exact `SamplingParams` and `LLM` arguments."""
    import sys
    import types

    from accelerate import PartialState
    from datasets import Dataset
    from fake_vllm import keep_launcher_env

    keep_launcher_env(monkeypatch)  # the colocated engine sets RANK, MASTER_PORT, ...: restored after the test
    built = {}
    module = types.ModuleType("vllm")
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(kwargs=kwargs)

    class LLM:
        def __init__(self, model, **kwargs):
            built["model"], built["engine"] = model, kwargs

        def chat(self, conversations, params, use_tqdm=True):
            built["params"] = params.kwargs
            return [
                types.SimpleNamespace(
                    outputs=[
                        types.SimpleNamespace(text=f"answer {i}" * (i + 1), finish_reason="stop")
                        for i in range(params.kwargs["n"])
                    ]
                )
                for _ in conversations
            ]

    module.LLM = LLM
    monkeypatch.setitem(sys.modules, "vllm", module)
    iterative = recipe("iterative_dpo")
    _, config, _ = recipe("_common").parse(
        iterative.make_parser(),
        ["--config", "iterative_dpo_sppo", "--output_dir", str(tmp_path), "--use_cpu", "true", "--bf16", "false"],
    )
    assert config.sampling_backend == "vllm"
    pairs = iterative.label(
        config,
        1,
        Dataset.from_dict({"prompt": PROMPTS}),
        None,
        None,
        hf_model,
        "Qwen/Qwen2.5-0.5B-Instruct",
        PartialState(cpu=True),
        config.sampling(),
    )
    assert built["model"] == "Qwen/Qwen2.5-0.5B-Instruct" and len(pairs) == 2
    assert built["engine"]["distributed_executor_backend"] == "external_launcher"  # on this process's own GPU
    params = dict(built["params"])
    params.pop("seed")
    assert params == {
        "n": 5,
        "max_tokens": 2048,
        "stop": None,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }


def test_ppo_evaluates_in_the_runs_dtype(tmp_path, monkeypatch):
    """PPO's held-out evaluator gets the run's compute dtype, as the other recipes' do."""
    ppo = recipe("ppo")
    made = []

    class Stop(Exception):
        pass

    def recording_evaluator(*args, **kwargs):
        made.append(kwargs.get("dtype"))
        raise Stop  # the evaluator is all this test needs: no training

    monkeypatch.setattr(ppo, "Evaluator", recording_evaluator)
    args = recipe("_common").parse(
        ppo.make_parser(),
        ["--config", "ppo_smoke", "--output_dir", str(tmp_path), "--bf16", "true", "--use_cpu", "true"],
    )
    with pytest.raises(Stop):
        ppo.main(*args)
    assert made == [torch.bfloat16]
