"""Load PairRM checkpoints in either published layout, from the hub or a local directory.

- hf layout (`llm-blender/PairRM-hf`): a DeBERTa-v2 config with the prefix-token ids, weights, tokenizer.
- blender layout (`llm-blender/PairRM`): a ranker config naming the base encoder (`model_name`), weights.
  Only the base encoder's config and tokenizer are read, never its weights.

Everything is validated before a model is built: config types and ranges (`check_encoder_config`), the prefix ids
inside the embedding, floating-point finite weights whose shapes match the config. Each failure is a ValueError
naming the file and the field (or tensor), never a crash in torch on the first forward.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DebertaV2Config

from . import assets
from .backend import LoadOptions
from .engine import PairScorer
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


def weights_file(directory: Path) -> Path:
    """model.safetensors, else pytorch_model.bin."""
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} holds no {' or '.join(WEIGHT_FILES)}")


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors, else pytorch_model.bin (weights_only=True); every tensor floating-point and
    finite, else ValueError naming the file and the tensor."""
    path = weights_file(directory)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign bytes: say which file
        raise ValueError(f"{path}: cannot read the weights ({type(err).__name__}: {err})") from err
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise ValueError(f"{path}: expected a mapping of tensor names to tensors")
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise ValueError(f"{path}: tensor {key!r} is {dtype}; weights must be floating-point")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or infinite values")
    return state_dict


# ---- config validation --------------------------------------------------------------------------
# field: (type, minimum, maximum); absent fields take DebertaV2Config's (valid) defaults.
ENCODER_FIELDS: dict[str, tuple[type, float | None, float | None]] = {
    "vocab_size": (int, 1, None),
    "hidden_size": (int, 1, None),
    "num_hidden_layers": (int, 1, None),
    "num_attention_heads": (int, 1, None),
    "intermediate_size": (int, 1, None),
    "max_position_embeddings": (int, 1, 1 << 20),  # sizes a buffer that no weight's shape checks
    "type_vocab_size": (int, 0, None),
    "max_relative_positions": (int, None, None),
    "position_buckets": (int, None, None),
    "attention_head_size": (int, 1, None),
    "embedding_size": (int, 1, None),
    "conv_kernel_size": (int, 0, None),
    "layer_norm_eps": (float, 0, None),
    "hidden_dropout_prob": (float, 0, 1),
    "attention_probs_dropout_prob": (float, 0, 1),
    "initializer_range": (float, 0, None),
    "relative_attention": (bool, None, None),
    "position_biased_input": (bool, None, None),
    "share_att_key": (bool, None, None),
    "norm_rel_ebd": (str, None, None),
    "hidden_act": (str, None, None),
}
PAIRRM_FIELDS = {"n_tasks": (int, 1, None), "drop_out": (float, 0, 1), "pairrm_template": (str, None, None)}
RANKER_FIELDS = {**PAIRRM_FIELDS, "ranker_type": (str, None, None), "model_name": (str, None, None),
                 "source_maxlength": (int, 1, None), "candidate_maxlength": (int, 1, None)}
PREFIX_ID_FIELDS = ("source_prefix_id", "cand1_prefix_id", "cand2_prefix_id", "cand_prefix_id")
POSITION_TERMS = {"c2p", "p2c"}


def check_field(
    path: Path, config: dict, name: str, kind: type, low: float | None = None, high: float | None = None
) -> None:
    """ValueError naming `path` and `name` unless `config[name]` (when present) is of `kind` within [low, high].
    `float` fields take any finite number; `int` fields refuse booleans and 1.5."""
    if name not in config:
        return
    value = config[name]
    if kind is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        what = "a finite number"
    elif kind is int:
        valid = isinstance(value, int) and not isinstance(value, bool)
        what = "an integer"
    else:
        valid = isinstance(value, kind)
        what = {bool: "true or false", str: "a string"}.get(kind, kind.__name__)
    if valid and low is not None and value < low:
        valid = False
    if valid and high is not None and value > high:
        valid = False
    if not valid:
        bounds = ""
        if low is not None:
            bounds = f" in [{low}, {high}]" if high is not None else f" >= {low}"
        raise ValueError(f"{path}: field {name!r} must be {what}{bounds}, got {value!r:.60}")


def check_encoder_config(path: Path, config: dict) -> None:
    """Types and ranges of a DeBERTa-v2/v3 config's fields, so building the encoder cannot fail (or mis-build)."""
    for name, (kind, low, high) in ENCODER_FIELDS.items():
        check_field(path, config, name, kind, low, high)
    defaults = DebertaV2Config()
    hidden = config.get("hidden_size", defaults.hidden_size)
    heads = config.get("num_attention_heads", defaults.num_attention_heads)
    if hidden % heads:
        raise ValueError(
            f"{path}: field 'hidden_size' ({hidden}) must be a multiple of 'num_attention_heads' ({heads})")
    if config.get("pad_token_id") is not None:
        check_field(path, config, "pad_token_id", int, 0)
    terms = config.get("pos_att_type")
    if isinstance(terms, str):
        terms = [t.strip() for t in terms.lower().split("|")]
    known = isinstance(terms, list) and all(isinstance(t, str) and t in POSITION_TERMS for t in terms)
    if terms is not None and not known:
        got = config["pos_att_type"]
        raise ValueError(f"{path}: field 'pos_att_type' must be a list of {sorted(POSITION_TERMS)}, got {got!r:.60}")
    from transformers.activations import ACT2FN

    if config.get("hidden_act", "gelu") not in ACT2FN:
        raise ValueError(
            f"{path}: field 'hidden_act' is not an activation transformers knows: {config['hidden_act']!r:.40}")


# size fields and the weight (and dimension) that shows each one's true value (vocab_size is taken from the
# embedding's rows when loading)
SIZE_TENSORS = {
    "hidden_size": ("pretrained_model.encoder.layer.0.attention.output.dense.weight", 0),
    "intermediate_size": ("pretrained_model.encoder.layer.0.intermediate.dense.weight", 0),
}


def check_shapes(path: Path, config_path: Path, state_dict: dict[str, torch.Tensor], config: DebertaV2Config) -> None:
    """`state_dict` holds exactly PairRM's tensors, each of the shape `config` gives it. The expected shapes come
    from a model built on the meta device: no memory, so a config with huge sizes fails here, not in an allocation."""
    layers = {key.split(".")[3] for key in state_dict if key.startswith("pretrained_model.encoder.layer.")}
    if config.num_hidden_layers != len(layers):
        raise ValueError(
            f"{config_path}: field 'num_hidden_layers' is {config.num_hidden_layers} "
            f"but {path} has {len(layers)} layers"
        )
    for field, (key, dim) in SIZE_TENSORS.items():  # the sizes first, so a huge one is named, not overflowed
        if key in state_dict and getattr(config, field) != state_dict[key].shape[dim]:
            shape = tuple(state_dict[key].shape)
            raise ValueError(f"{path}: tensor {key!r} has shape {shape} but {config_path} implies "
                             f"({getattr(config, field)}, ...) by its field {field!r}")
    with torch.device("meta"):
        expected = PairRMModel(config).state_dict()
    for key, tensor in state_dict.items():
        if key in expected and tensor.shape != expected[key].shape:
            raise ValueError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} "
                f"but {config_path} implies {tuple(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match PairRM (missing {missing[:5]}, unexpected {unexpected[:5]})")


@dataclass
class Checkpoint:
    """Everything needed to build a scorer: model (on CPU, fp32), text tokenizer, pair layout, layout name."""

    model: PairRMModel
    tokenizer: object
    layout: PairLayout
    kind: str
    template: str = "pairrm"


@dataclass(frozen=True)
class EncoderFormat:
    """How an encoder checkpoint lays out a pair: the length budgets and where the source is cut (`PairLayout`)."""

    source_max_length: int
    candidate_max_length: int
    truncate_source_left: bool = False
    source_prefix_segment: bool = False


# The encoder checkpoints' input formats, by template name (`core.formats`). PairRM's blender layout reads its
# budgets from its config (`source_maxlength`, `candidate_maxlength`); these are its published values.
ENCODER_FORMATS = {
    "pairrm": EncoderFormat(source_max_length=1224, candidate_max_length=412),
    "better-pairrm": EncoderFormat(
        source_max_length=2030, candidate_max_length=670, truncate_source_left=True, source_prefix_segment=True
    ),
}


def declared_template(directory: Path) -> str | None:
    """The `pairrm_template` a local checkpoint's config.json declares (a Better-PairRM copy may), else None."""
    value = _read_json(Path(directory) / "config.json").get("pairrm_template") if Path(directory).is_dir() else None
    return str(value) if value else None


def _read_json(path: Path) -> dict:
    """A JSON object file, {} when absent; ValueError naming the file when it is not valid JSON or not an object."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got a JSON {type(value).__name__}")
    return value


def _encoder_config(path: Path, config: dict) -> DebertaV2Config:
    check_encoder_config(path, config)
    try:
        return DebertaV2Config.from_dict(config)
    except Exception as err:  # transformers' own (strict) field checks
        raise ValueError(f"{path}: not a valid DeBERTa-v2 config ({type(err).__name__}: {err})") from err


def load_checkpoint(
    name_or_path: str | Path, base_model: str | Path | None = None, template: str | EncoderFormat | None = None
) -> Checkpoint:
    """Read a PairRM checkpoint of either layout into a `Checkpoint`, validating it first (see the module docstring).

    Args:
        name_or_path: a local checkpoint directory, `tiny` (the bundled one) or a hub id.
        base_model: blender layout only: the base encoder's config and tokenizer (default: its `model_name`).
        template: the input format and length budgets: a name in `ENCODER_FORMATS` (`pairrm`, `better-pairrm`) or
            an `EncoderFormat` (default: the config's `pairrm_template`, else `pairrm`). Which judge a checkpoint
            is (by its name) is `backends.registry`'s business, not this loader's.

    Returns:
        The model (CPU, float32, eval mode), text tokenizer, pair layout, layout kind and template.

    Raises:
        ValueError: a file that is not a valid PairRM checkpoint, naming the file and the field or tensor.
        FileNotFoundError: no config.json (or no weights file).

    Example:
        >>> load_checkpoint("tiny").layout.cand1_prefix_id
        3002
    """
    directory = resolve(name_or_path, ["*.json", "spm.model", "model.safetensors"])
    if not any((directory / name).is_file() for name in WEIGHT_FILES):  # older repos ship only a .bin
        directory = resolve(name_or_path, ["*.json", "spm.model", "pytorch_model.bin"])
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json: not a PairRM checkpoint")
    config = _read_json(config_path)

    if "ranker_type" in config:  # blender layout
        for name, (kind_, low, high) in RANKER_FIELDS.items():
            check_field(config_path, config, name, kind_, low, high)
        if config["ranker_type"] != "pairranker":
            raise ValueError(
                f"{config_path}: field 'ranker_type' is {config['ranker_type']!r:.60}, not a PairRM ('pairranker')")
        if base_model is None and "model_name" not in config:
            raise ValueError(f"{config_path}: field 'model_name' (the base encoder) is missing; pass base_model")
        base = resolve(base_model or config["model_name"], ["config.json", "tokenizer*.json", "spm.model"])
        encoder_path = base / "config.json"
        if not encoder_path.is_file():
            raise FileNotFoundError(f"{base} has no config.json: cannot build the base encoder")
        encoder_config = _encoder_config(encoder_path, _read_json(encoder_path))
        tokenizer_dir, kind = base, "blender"
        pairrm = ENCODER_FORMATS["pairrm"]
        source_max = config.get("source_maxlength", pairrm.source_max_length)
        candidate_max = config.get("candidate_maxlength", pairrm.candidate_max_length)
    elif config.get("model_type") == "deberta-v2":  # hf layout
        for name, (kind_, low, high) in PAIRRM_FIELDS.items():
            check_field(config_path, config, name, kind_, low, high)
        for name in PREFIX_ID_FIELDS:
            check_field(config_path, config, name, int, 0)
        encoder_path = config_path
        encoder_config = _encoder_config(encoder_path, config)
        tokenizer_dir, kind = directory, "hf"
        pairrm = ENCODER_FORMATS["pairrm"]
        source_max, candidate_max = pairrm.source_max_length, pairrm.candidate_max_length
    else:
        raise ValueError(
            f"{config_path}: neither a PairRM-hf config (field 'model_type' 'deberta-v2') nor an llm-blender ranker "
            f"config (field 'ranker_type'); its fields are {sorted(config)[:10]}"
        )
    n_tasks, dropout = config.get("n_tasks", 1), config.get("drop_out", 0.05)
    from_config = template is None and bool(config.get("pairrm_template"))
    template = template or str(config.get("pairrm_template") or "pairrm")
    if isinstance(template, EncoderFormat):
        encoder_format, template = template, "custom"
    elif template in ENCODER_FORMATS:
        encoder_format = ENCODER_FORMATS[template]
    else:
        origin = f"{config_path}: field 'pairrm_template': " if from_config else ""
        raise ValueError(f"{origin}unknown template {template!r}; expected one of {sorted(ENCODER_FORMATS)}")
    truncate_left, prefix_segment = encoder_format.truncate_source_left, encoder_format.source_prefix_segment
    if template != "pairrm":
        source_max, candidate_max = encoder_format.source_max_length, encoder_format.candidate_max_length
    if n_tasks != 1:
        raise ValueError(
            f"{config_path}: field 'n_tasks' is {n_tasks}; only single-task PairRM checkpoints are supported")

    tokenizer_config_path = tokenizer_dir / "tokenizer_config.json"
    tokenizer_config = _read_json(tokenizer_config_path)
    for name in ("do_lower_case", "split_by_punct"):
        check_field(tokenizer_config_path, tokenizer_config, name, bool)
    tokenizer = load_text_tokenizer(
        tokenizer_dir, tokenizer_config.get("do_lower_case", False), tokenizer_config.get("split_by_punct", False)
    )
    # The prefix tokens were appended after the base vocabulary (which ends with [MASK]).
    base_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    prefix_ids = {token: base_vocab + i for i, token in enumerate(PREFIX_TOKENS)}
    if kind == "hf":
        prefix_ids.update({token: config[key] for token, key in zip(PREFIX_TOKENS, PREFIX_ID_FIELDS) if key in config})

    weights_path = weights_file(directory)
    state_dict = load_state_dict(directory)
    embedding = state_dict.get(EMBEDDING_KEY)
    if embedding is None or embedding.dim() != 2:
        raise ValueError(f"{weights_path}: tensor {EMBEDDING_KEY!r} is missing or not 2-D; not a PairRM state dict")
    rows = embedding.shape[0]
    if base_vocab > rows:
        raise ValueError(
            f"{tokenizer_dir}: the tokenizer has {base_vocab} tokens "
            f"but {weights_path}: {EMBEDDING_KEY!r} has {rows} rows"
        )
    for token, key in zip(PREFIX_TOKENS, PREFIX_ID_FIELDS):
        if prefix_ids[token] >= rows:
            from_config = kind == "hf" and key in config
            where = f"{config_path}: field {key!r}" if from_config else f"{token} (after the vocabulary)"
            raise ValueError(f"{where}: id {prefix_ids[token]} is outside the embedding ({weights_path}: {rows} rows)")
    if encoder_config.pad_token_id is not None and encoder_config.pad_token_id >= rows:
        pad = encoder_config.pad_token_id
        raise ValueError(f"{encoder_path}: field 'pad_token_id' ({pad}) is outside the embedding ({rows} rows)")
    encoder_config.vocab_size = rows  # the resized embedding, not the base's
    check_shapes(weights_path, encoder_path, state_dict, encoder_config)
    model = PairRMModel(encoder_config, n_tasks=n_tasks, dropout=dropout)
    model.load_state_dict(state_dict)
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


def load_pair_scorer(
    name_or_path: str | Path, options: LoadOptions, template: str | EncoderFormat
) -> tuple[PairScorer, str]:
    """An encoder checkpoint as the encoder engine on `options.device`, and its layout (`hf` or `blender`)."""
    checkpoint = load_checkpoint(name_or_path, base_model=options.base_model, template=template)
    scorer = PairScorer(
        checkpoint.model.to(options.device), checkpoint.tokenizer, checkpoint.layout, device=options.device,
        dtype=options.dtype, max_tokens=options.max_tokens,
    )
    return scorer, checkpoint.kind
