"""A stand-in `vllm` module for tests (vLLM needs a GPU and is not installed here): it records what the package
gives it and answers as vLLM does, by the names and shapes of vllm/sampling_params.py, vllm/entrypoints/llm.py and
vllm/outputs.py: `SamplingParams(n, seed, max_tokens, stop, temperature, top_p, top_k, min_p, repetition_penalty,
stop_token_ids)`, `LLM(model, **engine_args)`, `LLM.generate(prompts, params, use_tqdm=...)` with string prompts or
`{"prompt_token_ids": [...]}` and one `SamplingParams` or one per prompt, `LLM.chat(conversations, params, ...)`,
`LLM.get_default_sampling_params()`, `LLM.reset_prefix_cache()`, and the colocated weight push TRL 1.16 uses,
`LLM.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, tensor)])`. Each output is
`RequestOutput.outputs[i]` with `text`, `token_ids` and `finish_reason` ("stop" or "length").
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from collections.abc import Callable

import pytest

LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeModel:
    """The engine's model: `load_weights` receives (name, tensor) pairs; kept until the push ends."""

    def __init__(self):
        self.loading: dict = {}

    def load_weights(self, weights):
        for name, tensor in weights:
            self.loading[name] = tensor.detach().clone()


def default_tokens(prompt_ids: list[int], params: dict, row: int) -> tuple[list[int], str]:
    """A response cut at max_tokens (no EOS): token 5 repeated."""
    return [5] * params["max_tokens"], "length"


class FakeLLM:
    instances: list[FakeLLM] = []
    defaults = types.SimpleNamespace(temperature=0.6, top_p=0.8, top_k=20, min_p=0.0, repetition_penalty=1.1)
    # what a token-id prompt gets: (prompt token ids, its SamplingParams kwargs, row) -> (token ids, finish reason)
    respond: Callable[[list[int], dict, int], tuple[list[int], str]] = staticmethod(default_tokens)
    # what a text prompt's i-th sample reads: (the prompt's text, i) -> text
    text: Callable[[str, int], str] = staticmethod(lambda prompt, i: f"{prompt} #{i}")

    def __init__(self, model, **engine_args):
        self.model, self.engine_args, self.calls = model, engine_args, []
        self.synced: list[dict] = []  # the weights of each completed push (name -> tensor), in order
        self.engine_model = FakeModel()
        runner = types.SimpleNamespace(model=self.engine_model)
        executor = types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner))
        self.llm_engine = types.SimpleNamespace(model_executor=executor)
        FakeLLM.instances.append(self)

    def _outputs(self, method, prompts, params):
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        recorded = [p.kwargs for p in params] if isinstance(params, list) else params.kwargs
        self.calls.append((method, prompts, recorded))
        out = []
        for row, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            if isinstance(prompt, dict):  # token ids in, token ids out
                ids, finish = FakeLLM.respond(prompt["prompt_token_ids"], p.kwargs, row)
                samples = [types.SimpleNamespace(text="", token_ids=ids, finish_reason=finish)]
            else:
                text = prompt if method == "generate" else prompt[-1]["content"]
                samples = [types.SimpleNamespace(text=FakeLLM.text(text, i), token_ids=[],
                                                 finish_reason="length" if i == 0 else "stop")
                           for i in range(p.kwargs["n"])]
            out.append(types.SimpleNamespace(outputs=samples))
        return out

    def generate(self, prompts, params, use_tqdm=True):
        return self._outputs("generate", prompts, params)

    def chat(self, conversations, params, use_tqdm=True):
        return self._outputs("chat", conversations, params)

    def get_default_sampling_params(self):
        return self.defaults

    def reset_prefix_cache(self):
        self.synced.append(self.engine_model.loading)
        self.engine_model.loading = {}


def keep_launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launcher variables PPO's vLLM engine sets (RANK, MASTER_PORT, ...) are restored after the test: a later
    test's accelerate state would otherwise see a distributed launch."""
    for name in LAUNCHER_ENV:
        monkeypatch.setenv(name, os.environ.get(name, ""))  # records the value before the test (or its absence)
        if not os.environ[name]:
            monkeypatch.delenv(name)


def install(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Make `import vllm` give the stand-in for one test (FakeLLM.instances: the engines made, newest last)."""
    keep_launcher_env(monkeypatch)
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)  # find_spec (TRL's package probe) works
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(FakeLLM, "instances", [])
    monkeypatch.setattr(FakeLLM, "respond", staticmethod(default_tokens))
    monkeypatch.setattr(FakeLLM, "text", staticmethod(lambda prompt, i: f"{prompt} #{i}"))
    return module
