"""What the recipe scripts share: the `tiny` special values, prompt data, policies, LoRA and PairRM settings.

Not part of the library (`pairrm_rlhf` never imports recipes). Special values, the same as `pairrm-rlhf label`:
`policy: tiny` is the bundled tiny test policy (`pairrm_rlhf.core.generation.load_policy`), `pairrm: tiny` the bundled tiny
PairRM (random weights), `dataset: tiny` the 32 bundled prompts with a `reference` column
(`pairrm_rlhf/assets/tiny-prompts.jsonl`). A local path of the same name always wins.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from pairrm_rlhf.cli import parse_config
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.trl.judge import PairRMJudge
from pairrm_rlhf.core.assets import TINY, bundled, resolve
from pairrm_rlhf.core.generation import load_policy as _load_policy
from pairrm_rlhf.labeling.labeler import load_prompts
from pairrm_rlhf.core.generation import sample_responses
from pairrm_rlhf.pairrm import PairRM

__all__ = ["RecipeArguments", "TINY", "parse_config", "resolve_pairrm", "load_prompt_dataset",
           "load_policy", "load_pairrm", "lora_config", "generate", "win_rate", "cli_args"]


@dataclass
class RecipeArguments:
    """Model, data and LoRA fields shared by every recipe config (mixed into the TRL / PPO config)."""

    policy: str = field(default=TINY, metadata={"help": "policy: hub id or directory; 'tiny' = the bundled tiny test policy"})
    policy_dtype: str | None = field(default=None, metadata={"help": "policy dtype: auto, bfloat16, float32 (default auto)"})
    pairrm: str = field(default="llm-blender/PairRM-hf", metadata={"help": "PairRM checkpoint (hub id or dir); 'tiny' = bundled"})
    pairrm_dtype: str | None = field(default=None, metadata={"help": "PairRM dtype (default: float32 on CPU, bfloat16 on GPU)"})
    pairrm_batch_size: int | None = field(default=None, metadata={"help": "row cap of one PairRM forward"})
    dataset: str = field(default=TINY, metadata={"help": "prompts: hub id, save_to_disk dir, .jsonl/.parquet file; 'tiny' = bundled"})
    dataset_config: str | None = field(default=None, metadata={"help": "hub dataset configuration name"})
    split: str = field(default="train", metadata={"help": "dataset split"})
    prompt_column: str = field(default="prompt", metadata={"help": "column with prompts (strings or message lists)"})
    reference_column: str | None = field(default="reference", metadata={"help": "column with reference responses (string or messages; None: no references)"})
    max_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    conversational: bool = field(default=True, metadata={"help": "wrap string prompts as one user message (chat template)"})
    use_peft: bool = field(default=False, metadata={"help": "train a LoRA adapter instead of the full policy"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "LoRA target modules (default: all-linear)"})


def cli_args(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)


def resolve_pairrm(name: str) -> str:
    """`tiny` -> the bundled tiny PairRM; anything else unchanged."""
    return resolve(name, "pairrm")


def _text(value: Any) -> str:
    """A response as text: a string, or the last assistant message of a message list (e.g. UltraFeedback `chosen`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        answers = [m["content"] for m in value if m.get("role") == "assistant"]
        if answers:
            return answers[-1]
    raise ValueError(f"cannot read a reference response from {value!r:.100}")


def load_prompt_dataset(args: RecipeArguments, *, need_reference: bool = False) -> Dataset:
    """A dataset with a `prompt` column (message lists when `conversational`) and, when the source has one, a
    `reference` column of strings. Other columns are dropped."""
    data = load_prompts(args.dataset, args.dataset_config, args.split)
    if args.max_prompts is not None:
        data = data.select(range(min(args.max_prompts, len(data))))
    if args.prompt_column not in data.column_names:
        raise ValueError(f"dataset {args.dataset!r} has no column {args.prompt_column!r} (columns: {data.column_names})")
    has_reference = args.reference_column is not None and args.reference_column in data.column_names
    if need_reference and not has_reference:
        raise ValueError(f"this recipe needs reference responses: dataset {args.dataset!r} has no column "
                         f"{args.reference_column!r} (columns: {data.column_names}); set reference_column")
    keep = [args.prompt_column] + ([args.reference_column] if has_reference else [])

    def convert(row: dict) -> dict:
        prompt = row[args.prompt_column]
        if args.conversational and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        out = {"prompt": prompt}
        if has_reference:
            out["reference"] = _text(row[args.reference_column])
        return out

    return data.select_columns(keep).map(convert, remove_columns=keep)


def load_policy(name: str, dtype: str | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) on the CPU in train mode: `tiny` is the bundled tiny policy; trainers move the model."""
    model, tokenizer = _load_policy(name, device="cpu", dtype=dtype)
    return model.train(), tokenizer


def lora_config(args: RecipeArguments) -> Any:
    """A `peft.LoraConfig` when `use_peft`, else None."""
    if not args.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=args.lora_target_modules or "all-linear", task_type="CAUSAL_LM")


def load_pairrm(args: RecipeArguments, device: str | torch.device | None = None) -> PairRM:
    return PairRM.from_pretrained(resolve_pairrm(args.pairrm), device=device, dtype=args.pairrm_dtype)


def generate(model: Any, tokenizer: Any, prompts: list, *, max_new_tokens: int, temperature: float, seed: int,
             batch_size: int = 32) -> list[str]:
    """One sampled response per prompt, reproducible under `seed`."""
    model.eval()
    out: list[str] = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for s in range(0, len(prompts), batch_size):
            out += [r[0] for r in sample_responses(model, tokenizer, prompts[s : s + batch_size], 1,
                                                   max_new_tokens=max_new_tokens, temperature=temperature)]
    return out


def win_rate(pairrm: PairRM, prompts: list, first: list[str], second: list[str]) -> float:
    """Mean PairRM win rate of `first` over `second` (two-order logit; ties count 1/2)."""
    z = PairRMJudge(pairrm).two_order_logits(prompts, [[a, b] for a, b in zip(first, second)])
    return float(np.mean((z > 0) + 0.5 * (z == 0)))
