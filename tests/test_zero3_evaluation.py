"""Held-out evaluation under DeepSpeed ZeRO-3 with two processes (issue 22 item 2): every process gathers the
partitioned parameters and samples (`recipes/_common.evaluate_everywhere`, called by online DPO, GRPO and iterative
DPO), the main process writes the files, and both get its metrics. Generating on the main process alone while the
other waits (the former online DPO / GRPO final evaluation) needs the other rank's shards: it cannot work.

accelerate 1.15 reports one process on every rank of a CPU DeepSpeed launch, so the script starts the group with
accelerate's plain `PartialState` (gloo, two processes) and partitions the policy through transformers'
`HfDeepSpeedConfig` (from_pretrained under `deepspeed.zero.Init`), as a ZeRO-3 trainer does at load."""

from __future__ import annotations

import json
import textwrap

import pytest

from recipe_scripts import RECIPES
from torchrun import launch

SCRIPT = """
import json, os, sys
sys.path.insert(0, {recipes!r})
import torch
from accelerate import PartialState
state = PartialState(cpu=True)
import deepspeed
from transformers.integrations import HfDeepSpeedConfig
deepspeed.init_distributed(dist_backend="gloo")
ds_config = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3}}}}
keep = HfDeepSpeedConfig(ds_config)  # ZeRO-3 on: from_pretrained partitions the policy across the two processes
import _common
from pairrm_rlhf.core.generation import SamplingArguments, load_policy
from pairrm_rlhf.pairrm import PairRM
model, tokenizer = load_policy("tiny", "cpu", "float32")
partitioned = all(p.numel() == 0 for p in model.parameters())
prompts = [[{{"role": "user", "content": f"Question {{i}}?"}}] for i in range(4)]
evaluator = _common.Evaluator(PairRM.from_pretrained("tiny", device="cpu"), prompts, ["An answer."] * 4,
                              SamplingArguments(max_new_tokens=4), 0, sys.argv[1])
metrics = _common.evaluate_everywhere(evaluator, model, tokenizer, 0)
with open(os.path.join(sys.argv[1], f"rank{{state.process_index}}.json"), "w") as f:
    json.dump(dict(world=state.num_processes, zero3=_common.zero3_enabled(), partitioned=partitioned,
                   metrics=metrics), f)
from pairrm_rlhf.core.distributed import end_distributed_run
end_distributed_run()
"""


@pytest.mark.multiprocess
@pytest.mark.slow
def test_evaluation_under_zero3_on_two_processes(tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'pairrm-rlhf[deepspeed]')")
    script = tmp_path / "zero3_eval.py"
    script.write_text(textwrap.dedent(SCRIPT.format(recipes=str(RECIPES))))
    out = tmp_path / "out"
    out.mkdir()
    proc = launch(script, str(out), env=dict(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES=""), processes=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["world"], r["zero3"], r["partitioned"]) for r in ranks] == [(2, True, True)] * 2
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["metrics"]["step"] == 0
    assert "vs_reference/win_rate" in ranks[0]["metrics"]
    rows = [json.loads(line) for line in (out / "eval_completions.jsonl").read_text().splitlines()]
    assert len(rows) == 4  # written once, by the main process
