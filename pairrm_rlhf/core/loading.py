"""Load PairRM checkpoints in either published layout, from the hub or a local directory.

- hf layout (`llm-blender/PairRM-hf`): a DeBERTa-v2 config with the prefix-token ids, weights, tokenizer.
- blender layout (`llm-blender/PairRM`): a ranker config naming the base encoder (`model_name`), weights.
  Only the base encoder's config and tokenizer are read, never its weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DebertaV2Config

from . import assets
from .modeling import PairRMModel
from .tokenization import PREFIX_TOKENS, PairLayout, load_text_tokenizer

logger = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EMBEDDING_KEY = "pretrained_model.embeddings.word_embeddings.weight"


def resolve(name_or_path: str | Path, patterns: list[str]) -> Path:
    """A local directory as is (`tiny`: the bundled checkpoint); otherwise the files of a hub repo matching
    `patterns` (hub cache honoured). A path-looking name that does not exist is FileNotFoundError, not a hub id."""
    path = Path(assets.resolve(name_or_path, "pairrm")).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{name_or_path!r} is a file; expected a checkpoint directory or a hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=patterns))
    except Exception as err:  # offline, unknown repo, no permission: say which name failed
        raise OSError(
            f"cannot load {str(name_or_path)!r}: it is not a local directory and the hub download failed "
            f"({type(err).__name__}: {err})"
        ) from err


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors, else pytorch_model.bin loaded with weights_only=True."""
    if (directory / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{directory} holds no {' or '.join(WEIGHT_FILES)}")


@dataclass
class Checkpoint:
    """Everything needed to build a scorer: model (on CPU, fp32), text tokenizer, pair layout, layout name."""

    model: PairRMModel
    tokenizer: object
    layout: PairLayout
    kind: str
    template: str = "pairrm"


# Input formats of encoder checkpoints: (source max, candidate max, cut the source from the left, prefix segment).
TEMPLATES = {
    "pairrm": (1224, 412, False, False),
    "better-pairrm": (2030, 670, True, True),
}


def detect_template(name_or_path: str | Path, config: dict | None = None) -> str:
    """`better-pairrm` when the checkpoint's name says so (`maywell/Better-PairRM`, any directory named
    `*Better-PairRM*`) or its config.json has `"pairrm_template": "better-pairrm"`; else `pairrm`."""
    if config and config.get("pairrm_template"):
        return str(config["pairrm_template"])
    name = Path(str(name_or_path).rstrip("/")).name.lower()
    return "better-pairrm" if "better-pairrm" in name else "pairrm"


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def load_checkpoint(
    name_or_path: str | Path, base_model: str | Path | None = None, template: str | None = None
) -> Checkpoint:
    """Read a PairRM checkpoint of either layout into a `Checkpoint`.

    `template` (`pairrm` or `better-pairrm`) sets the input format and length budgets; default by `detect_template`.
    """
    directory = resolve(name_or_path, ["*.json", "spm.model", "model.safetensors"])
    if not any((directory / name).is_file() for name in WEIGHT_FILES):  # older repos ship only a .bin
        directory = resolve(name_or_path, ["*.json", "spm.model", "pytorch_model.bin"])
    config = _read_json(directory / "config.json")
    if not config:
        raise FileNotFoundError(f"{directory} has no config.json: not a PairRM checkpoint")

    if "ranker_type" in config:  # blender layout
        if config["ranker_type"] != "pairranker":
            raise ValueError(f"{name_or_path}: ranker_type {config['ranker_type']!r} is not a PairRM ('pairranker')")
        base = resolve(base_model or config["model_name"], ["config.json", "tokenizer*.json", "spm.model"])
        encoder_config = DebertaV2Config.from_dict(_read_json(base / "config.json"))
        tokenizer_dir, kind = base, "blender"
        n_tasks, dropout = config.get("n_tasks", 1), config.get("drop_out", 0.05)
        source_max, candidate_max = config.get("source_maxlength", 1224), config.get("candidate_maxlength", 412)
    elif config.get("model_type") == "deberta-v2":  # hf layout
        encoder_config = DebertaV2Config.from_dict(config)
        tokenizer_dir, kind = directory, "hf"
        n_tasks, dropout = config.get("n_tasks", 1), config.get("drop_out", 0.05)
        source_max, candidate_max = 1224, 412
    else:
        raise ValueError(f"{directory}/config.json is neither a PairRM-hf config nor an llm-blender ranker config")
    template = template or detect_template(name_or_path, config)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {sorted(TEMPLATES)}")
    truncate_left, prefix_segment = TEMPLATES[template][2:]
    if template != "pairrm":
        source_max, candidate_max = TEMPLATES[template][:2]
    if n_tasks != 1:
        raise ValueError(f"{name_or_path}: n_tasks={n_tasks}; only single-task PairRM checkpoints are supported")

    tokenizer_config = _read_json(tokenizer_dir / "tokenizer_config.json")
    tokenizer = load_text_tokenizer(
        tokenizer_dir, tokenizer_config.get("do_lower_case", False), tokenizer_config.get("split_by_punct", False)
    )
    # The prefix tokens were appended after the base vocabulary (which ends with [MASK]).
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    prefix_ids = {token: base_vocab + i for i, token in enumerate(PREFIX_TOKENS)}
    if kind == "hf":
        prefix_ids.update(
            {
                token: config[key]
                for token, key in zip(PREFIX_TOKENS, ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id"))
                if key in config
            }
        )

    state_dict = load_state_dict(directory)
    if EMBEDDING_KEY not in state_dict:
        raise ValueError(f"{directory}: weights lack {EMBEDDING_KEY}; not a PairRM state dict")
    encoder_config.vocab_size = state_dict[EMBEDDING_KEY].shape[0]  # the resized embedding, not the base's
    model = PairRMModel(encoder_config, n_tasks=n_tasks, dropout=dropout)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match PairRM (missing {missing[:5]}, unexpected {unexpected[:5]})")
    model.eval()

    def token_id(token: str) -> int:
        found = tokenizer.token_to_id(token)
        if found is None:
            raise ValueError(f"the tokenizer in {tokenizer_dir} has no {token} token")
        return found

    layout = PairLayout(
        cls_id=token_id("[CLS]"),
        sep_id=token_id("[SEP]"),
        pad_id=encoder_config.pad_token_id if encoder_config.pad_token_id is not None else token_id("[PAD]"),
        source_prefix_id=prefix_ids["<|source|>"],
        cand1_prefix_id=prefix_ids["<|candidate1|>"],
        cand2_prefix_id=prefix_ids["<|candidate2|>"],
        source_max_length=source_max,
        candidate_max_length=candidate_max,
        truncate_source_left=truncate_left,
        source_prefix_segment=prefix_segment,
    )
    logger.info("loaded PairRM (%s layout, %s template) from %s", kind, template, directory)
    return Checkpoint(model=model, tokenizer=tokenizer, layout=layout, kind=kind, template=template)
