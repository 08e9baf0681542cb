"""A labeling run never mixes models, settings or damaged chunks into its output.

Each case changes one thing between an interrupted run and its resume, or damages one chunk file, and checks that it
is detected by file name and that nothing of it reaches the output.
"""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest
import torch
from conftest import HF_CHECKPOINT
from datasets import Dataset

from pairrm_rlhf import PairRM
from pairrm_rlhf.core.generation import SamplingArguments
from pairrm_rlhf.labeling import PreferenceLabeler
from pairrm_rlhf.labeling.store import ChunkStore

from tiny_policy import build_tiny_policy, build_tiny_tokenizer

PROMPTS = ["Explain the sun.", "Describe the ocean.", "What is green tea?", "Tell me about the moon.", "Hi!"]
RESPONSES = [[f"Answer {k} about {p.lower()}", f"No idea {k}.", f"Maybe: {p} {'x' * k}"] for k, p in enumerate(PROMPTS)]
DATA = Dataset.from_dict({"prompt": PROMPTS, "responses": RESPONSES})


def labeler(pairrm: PairRM, **kwargs) -> PreferenceLabeler:
    return PreferenceLabeler(pairrm, responses_column="responses", **kwargs)


@pytest.fixture(scope="module")
def expected(hf_model):
    return labeler(hf_model).label(DATA, chunk_size=2).to_list()


@pytest.fixture
def work(hf_model, tmp_path):
    """A finished run's work dir (3 chunks of 2, 2, 1 prompts)."""
    labeler(hf_model).label(DATA, tmp_path / "work", chunk_size=2)
    return tmp_path / "work"


def resume(pairrm, work, **kwargs):
    """Resume in `work`; returns the output and the chunk indices that were labeled again."""
    again = labeler(pairrm, **kwargs)
    labeled, original = [], again._label_chunk
    again._label_chunk = lambda ds, index, *a: labeled.append(index) or original(ds, index, *a)
    return again.label(DATA, work, chunk_size=2), labeled


# ---- another model or other settings: refused, naming the file and what changed ---------------------------
def test_changed_encoder_weights_are_refused(hf_model, work):
    other = PairRM.from_pretrained(HF_CHECKPOINT, device="cpu")
    with torch.no_grad():  # the encoder only: the head (all the old fingerprint hashed) stays the same
        next(p for n, p in other.backend.model.named_parameters() if "encoder" in n and "layer" in n).add_(1e-3)
    with pytest.raises(ValueError, match=r"manifest.json has judge.weights: '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        resume(other, work)
    (work / "manifest.json").unlink()  # without the manifest every chunk still carries its identity
    with pytest.raises(ValueError, match=r"chunk-00000.arrow \(and 2 more chunk\(s\)\) has judge.weights"):
        resume(other, work)


def test_changed_dtype_is_refused(work):
    bf16 = PairRM.from_pretrained(HF_CHECKPOINT, device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="manifest.json has judge.dtype: 'float32' -> 'bfloat16';"):
        resume(bf16, work)
    (work / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"chunk-00000.arrow \(and 2 more chunk\(s\)\) has judge.dtype"):
        resume(bf16, work)


def test_overwrite_relabels_with_the_new_model(hf_model, work):
    bf16 = PairRM.from_pretrained(HF_CHECKPOINT, device="cpu", dtype="bfloat16")
    (work / "manifest.json").unlink()
    out = labeler(bf16).label(DATA, work, chunk_size=2, overwrite=True)
    assert out.to_list() == labeler(bf16).label(DATA, chunk_size=2).to_list()
    identity = json.loads((work / "manifest.json").read_text())["identity"]
    assert identity["judge"]["dtype"] == "bfloat16"


def test_manifest_deleted_k4_chunks_are_not_reused_by_k3(hf_model, tmp_path):
    tokenizer = build_tiny_tokenizer()
    policy = build_tiny_policy(tokenizer)
    data = Dataset.from_dict({"prompt": PROMPTS[:4]})
    sampling = SamplingArguments(max_new_tokens=4)

    def run(k, overwrite=False):
        lab = PreferenceLabeler(hf_model, policy, tokenizer, num_responses=k, sampling=sampling)
        return lab.label(data, tmp_path / "work", chunk_size=2, overwrite=overwrite)

    run(4)
    (tmp_path / "work" / "manifest.json").unlink()
    with pytest.raises(
        ValueError, match=r"chunk-00000.arrow \(and 1 more chunk\(s\)\) has generation.num_responses: 4 -> 3"
    ):
        run(3)
    assert all(len(r) == 3 for r in run(3, overwrite=True)["all_generated_responses"])


# ---- damaged chunks: reported by name, labeled again, never in the output ---------------------------------
def damage_truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damage_flip_letter(path):
    data = bytearray(path.read_bytes())
    where = data.find(b"No idea 2.")  # a response of prompt 2, in chunk 1
    assert where > 0
    data[where] ^= 0x20  # "N" -> "n": the Arrow structure stays valid
    path.write_bytes(bytes(data))


def damage_margin(path):
    """Set a margin to -123.0 and rewrite a structurally valid file with the original metadata."""
    with pa.OSFile(str(path), "rb") as f:
        table = pa.ipc.open_file(f).read_all()
    margins = table.column("margin").to_pylist()
    margins[0] = -123.0
    table = table.set_column(table.schema.get_field_index("margin"), "margin", pa.array(margins, pa.float64()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:  # schema metadata (stats, identity, checksum) kept
        writer.write_table(table)
    path.write_bytes(sink.getvalue().to_pybytes())


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_letter, damage_margin])
def test_damaged_chunk_is_reported_and_relabeled(hf_model, work, expected, damage, caplog):
    damage(work / "chunk-00001.arrow")
    with caplog.at_level(logging.WARNING, logger="pairrm_rlhf.labeling.store"):
        out, labeled = resume(hf_model, work)
    assert labeled == [1]
    assert any("chunk-00001.arrow" in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    assert out.to_list() == expected
    assert -123.0 not in out["margin"] and "no idea 2." not in str(out["all_generated_responses"])


def test_chunk_damaged_after_the_check_fails_naming_it(hf_model, work):
    """A chunk read for the output is checked again: damage after `open` is an error naming the file."""
    store = ChunkStore(work, labeler(hf_model).identity(DATA, 2))
    with pytest.raises(ValueError, match="chunk-00002.arrow: checksum mismatch"):
        damage_margin(work / "chunk-00002.arrow")
        store.read(2)


def test_stale_temporary_files_are_removed(hf_model, work, expected):
    (work / "chunk-00003.arrow.tmp-4242").write_bytes(b"partial")
    (work / "manifest.json.tmp-4242").write_text("{")
    out, labeled = resume(hf_model, work)
    assert labeled == [] and out.to_list() == expected
    assert sorted(p.name for p in work.iterdir()) == [f"chunk-0000{i}.arrow" for i in range(3)] + [
        "lock",
        "manifest.json",
    ]
