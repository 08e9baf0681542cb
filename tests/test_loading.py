"""Hostile checkpoints are refused at load, before any forward, by a ValueError naming the file and the field.

Each bad checkpoint is the bundled `tiny` one (hf layout) or the reference fixture's blender layout, copied into
tmp_path with one thing changed.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pairrm_rlhf import PairRM
from pairrm_rlhf.core.assets import bundled
from pairrm_rlhf.core.loading import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "pairrm-reference"
TINY_PAIRRM = bundled("pairrm")


def copy_checkpoint(tmp_path: Path, source: str | Path = TINY_PAIRRM, name: str = "ckpt") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def refused(directory: Path, file: str, field: str, **kwargs) -> None:
    """Loading `directory` raises a ValueError that names `file` (a path ending) and `field`."""
    with pytest.raises(ValueError) as error:
        load_checkpoint(directory, **kwargs)
    message = str(error.value)
    assert re.search(re.escape(file) + r"\b", message), message
    assert field in message, message


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_attention_heads", 0),
        ("num_attention_heads", 3),  # 64 hidden is not a multiple of 3
        ("num_hidden_layers", -1),
        ("num_hidden_layers", 10**6),  # refused before a million layers are built, even on the meta device
        ("max_position_embeddings", 10**10),  # an 80 GB position-id buffer
        ("hidden_size", 2**40),  # was a RuntimeError from torch, not a ValueError naming the field
        ("intermediate_size", 2**40),
        ("hidden_size", "64"),
        ("drop_out", "0.05"),
        ("drop_out", 1.5),
        ("hidden_dropout_prob", None),
        ("layer_norm_eps", float("nan")),
        ("relative_attention", "yes"),
        ("pos_att_type", ["p2c", "c2c"]),
        ("pos_att_type", [["p2c"]]),
        ("hidden_act", "no-such-activation"),
        ("pad_token_id", -1),
        ("source_prefix_id", -5),
        ("cand1_prefix_id", 999999),
        ("cand1_prefix_id", 1.5),
        ("cand2_prefix_id", True),
        ("n_tasks", 2),
        ("pairrm_template", "vicuna"),
    ],
)
def test_bad_config_field(tmp_path, field, value):
    directory = copy_checkpoint(tmp_path)
    edit_json(directory / "config.json", **{field: value})
    refused(directory, "config.json", field)


def test_config_not_an_object(tmp_path):
    directory = copy_checkpoint(tmp_path)
    (directory / "config.json").write_text("[1, 2, 3]")
    refused(directory, "config.json", "JSON object")
    (directory / "config.json").write_text("{}")
    refused(directory, "config.json", "model_type")
    (directory / "config.json").write_text('{"model_type": "deberta-v2", ')
    refused(directory, "config.json", "not valid JSON")


def test_missing_config_is_file_not_found(tmp_path):
    directory = copy_checkpoint(tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_checkpoint(directory)


def test_integer_weights_refused(tmp_path):
    """int32 weights used to load (cast into the float parameters) and give logit 0.0 everywhere."""
    directory = copy_checkpoint(tmp_path)
    edit_weights(directory, lambda state: state.update({k: v.to(torch.int32) for k, v in state.items()}))
    refused(directory, "model.safetensors", "floating-point")


def test_non_finite_weight_refused(tmp_path):
    directory = copy_checkpoint(tmp_path)
    key = "head_layer.1.weight"

    def poison(state):
        state[key][0, 0] = float("nan")

    edit_weights(directory, poison)
    refused(directory, "model.safetensors", key)


def test_shape_inconsistent_with_config_refused(tmp_path):
    directory = copy_checkpoint(tmp_path)
    edit_json(directory / "config.json", intermediate_size=96)  # the weights have 128
    refused(directory, "model.safetensors", "intermediate.dense")
    edit_json(directory / "config.json", hidden_size=2**20, intermediate_size=2**20)  # 4 TiB if it were allocated
    refused(directory, "model.safetensors", "implies (1048576")
    directory = copy_checkpoint(tmp_path, name="no-embedding")
    edit_weights(directory, lambda state: state.pop("pretrained_model.embeddings.word_embeddings.weight"))
    refused(directory, "model.safetensors", "word_embeddings")


def test_damaged_weights_file_refused(tmp_path):
    directory = copy_checkpoint(tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    refused(directory, "model.safetensors", "cannot read the weights")


def test_bad_tokenizer_config_refused(tmp_path):
    directory = copy_checkpoint(tmp_path)
    edit_json(directory / "tokenizer_config.json", do_lower_case="false")
    refused(directory, "tokenizer_config.json", "do_lower_case")


def test_blender_layout_fields(tmp_path):
    checkpoint = copy_checkpoint(tmp_path, FIXTURES / "pairrm-blender", "blender")
    base = copy_checkpoint(tmp_path, FIXTURES / "tiny-deberta-v3", "base")
    load_checkpoint(checkpoint, base_model=base)  # the unedited copy loads
    edit_json(base / "config.json", num_attention_heads=0)
    refused(checkpoint, "base/config.json", "num_attention_heads", base_model=base)
    edit_json(base / "config.json", num_attention_heads=4)
    edit_json(checkpoint / "config.json", drop_out="0.05")
    refused(checkpoint, "blender/config.json", "drop_out", base_model=base)
    edit_json(checkpoint / "config.json", drop_out=0.05, source_maxlength=0)
    refused(checkpoint, "blender/config.json", "source_maxlength", base_model=base)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["model_name"]
    config["source_maxlength"] = 1224
    (checkpoint / "config.json").write_text(json.dumps(config))
    refused(checkpoint, "blender/config.json", "model_name")


def test_valid_copy_loads_and_scores(tmp_path):
    """The harness is not what fails: an unedited copy (and a float16 copy of the weights) loads and scores."""
    directory = copy_checkpoint(tmp_path)
    model = PairRM.from_pretrained(directory, device="cpu")
    assert model.compare(["q"], ["a"], ["b"], return_logits=True).shape == (1,)
    edit_weights(directory, lambda state: state.update({k: v.half() for k, v in state.items()}))
    load_checkpoint(directory)
