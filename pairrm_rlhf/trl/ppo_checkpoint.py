"""PPO checkpoints: only what training changes, in formats that hold no code, checksummed and tied to their run.

`checkpoint-<update>/` holds

    trainable.safetensors      the trainable parameters: the LoRA adapter (never the frozen base) or the whole
                               policy, and the value head
    optimizer.safetensors      the optimizer's tensors (AdamW's moments and steps), with `optimizer.json` (its
                               param groups and scalars)
    deepspeed/                 instead of the two above under DeepSpeed: the engine's own checkpoint (its partitioned
                               fp32 masters and optimizer states; frozen parameters excluded)
    scheduler.json             the learning-rate scheduler's state
    rng-<rank>.safetensors     each process's torch RNG states (CPU and CUDA)
    trainer_state.json         the update count, the log history and the reward scaling statistics
    manifest.json              written last: the run identity (`run_identity`) and the SHA-256 of every file above

Nothing is read with pickle (the DeepSpeed engine's files excepted: DeepSpeed reads them itself, after their
checksums were verified). Loading refuses, naming the file, a checkpoint without a manifest (an interrupted save), a
file missing, changed or damaged (a 0-byte RNG file, a flipped byte, a planted file replacing one), and a run with
other settings (`key: old -> new`, through `core.identity`, the labeler's mechanism). Files not in the manifest are
never read.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..core.identity import atomic_write, canonical, describe_changes, file_sha256, fingerprint, writing

logger = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
# settings that do not change a run's numbers: a resumed run may change them
VOLATILE = ("output_dir", "resume_from_checkpoint", "logging_steps", "save_steps", "save_total_limit", "save_final",
            "report_to", "eval_steps")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: incomplete, damaged, or of a run with other settings (names the file)."""


def checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-<update>` directories in `output_dir`, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def latest_complete(output_dir: str) -> str:
    """The newest checkpoint with a manifest (one without was interrupted while saving: skipped with a warning)."""
    found = checkpoints(output_dir)
    for directory in reversed(found):
        if os.path.isfile(os.path.join(directory, MANIFEST)):
            return directory
        logger.warning("skipping %s: no %s (its save was interrupted)", directory, MANIFEST)
    raise FileNotFoundError(f"resume_from_checkpoint: no complete checkpoint-<update> in {output_dir}")


def run_identity(config: Any, num_processes: int, model: torch.nn.Module | None) -> dict[str, Any]:
    """Everything a PPO run's numbers depend on that the checkpoint does not hold: the settings (but `VOLATILE`),
    the number of processes, the policy's name and its trainable parameters (count and size). Without `model`
    (before it loads) the settings and processes only."""
    identity = {"format": FORMAT, "config": {k: v for k, v in asdict(config).items() if k not in VOLATILE},
                "processes": num_processes}
    if model is not None:
        trainable = [p for p in model.parameters() if p.requires_grad]
        identity["policy"] = model.policy.config.name_or_path if hasattr(model, "policy") else None
        identity["trainable"] = {"tensors": len(trainable), "parameters": sum(p.numel() for p in trainable)}
    return canonical(identity)


# ---- saving -------------------------------------------------------------------------------------------------------
def save(trainer: Any, directory: str) -> None:
    """Write `trainer`'s state to `directory` (collective: every process calls it), the manifest last."""
    acc, path = trainer.accelerator, Path(directory)
    if acc.is_main_process and path.exists():  # an older, possibly incomplete, save of the same update
        shutil.rmtree(path)
    acc.wait_for_everyone()
    with writing(path):
        path.mkdir(parents=True, exist_ok=True)
    if trainer.deepspeed:  # the engine partitions its states across processes and saves them itself
        trainer.model.save_checkpoint(str(path / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        _save_tensors({n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                      path / "trainable.safetensors")
        tensors, meta = _flatten_optimizer(trainer.optimizer.state_dict())
        _save_tensors(tensors, path / "optimizer.safetensors")
        _write_json(path / "optimizer.json", meta)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(rng, path / f"rng-{acc.process_index}.safetensors")
    if acc.is_main_process:
        _write_json(path / "scheduler.json", trainer.scheduler.state_dict())
        _write_json(path / "trainer_state.json", {"update": trainer.update_step, "log_history": trainer.log_history,
                                                  "reward_scaling": trainer.reward_scaler.state_dict()})
    acc.wait_for_everyone()
    if acc.is_main_process:
        files = {str(f.relative_to(path)): file_sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}
        manifest = {"fingerprint": fingerprint(trainer.identity), "identity": trainer.identity,
                    "update": trainer.update_step, "files": files}
        atomic_write(path / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    acc.wait_for_everyone()


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with writing(path):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def _write_json(path: Path, value: Any) -> None:
    atomic_write(path, json.dumps(value, indent=1).encode())


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch optimizer state dict as (tensors by `<param index>.<name>`, JSON: param groups and scalar states)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- loading ------------------------------------------------------------------------------------------------------
def check_before_loading(accelerator: Any, config: Any) -> None:
    """Refuse a bad `config.resume_from_checkpoint` before the models load (minutes at 7B, and a crash after them
    wastes them): the manifest, every file's SHA-256, and the settings and process count it records (collective,
    as `load`). What needs the model (its trainable parameters) is checked again by `load`."""
    if not config.resume_from_checkpoint:
        return
    directory = str(config.resume_from_checkpoint)
    if directory.lower() == "true":
        directory = latest_complete(config.output_dir)
    deepspeed = accelerator.state.deepspeed_plugin is not None
    _verify_everywhere(accelerator, directory, run_identity(config, accelerator.num_processes, None), deepspeed)


def _verify_everywhere(accelerator: Any, directory: str, identity: dict[str, Any], deepspeed: bool) -> None:
    """`verify` on the main process; every process gets its answer, so a refusal stops all of them."""
    refusal = None
    if accelerator.is_main_process:
        try:
            verify(directory, identity, accelerator.num_processes, deepspeed)
        except CheckpointError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise CheckpointError(refusal)


def verify(directory: str, identity: dict[str, Any], num_processes: int, deepspeed: bool) -> dict[str, Any]:
    """The manifest of `directory` once every file it lists is present and intact and it records `identity` (the keys
    `identity` has: `run_identity` without a model checks the settings only); `CheckpointError` naming the file
    otherwise."""
    path = Path(directory)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"resume_from_checkpoint: {manifest_file} is missing: {directory} is not a complete "
                              "PPO checkpoint (an interrupted save, or written by an older version)")
    try:
        manifest = json.loads(manifest_file.read_text())
        files, saved = dict(manifest["files"]), manifest["identity"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"resume_from_checkpoint: {manifest_file} is unreadable ({type(error).__name__}: "
                              f"{error})") from None
    saved = {k: v for k, v in saved.items() if k in identity}
    if saved != identity:
        raise CheckpointError(f"resume_from_checkpoint: {directory} is a checkpoint of a run with other settings: "
                              f"{MANIFEST} has {describe_changes(saved, identity)}; resume with the same settings")
    model_files = ["deepspeed/latest"] if deepspeed else ["trainable.safetensors", "optimizer.safetensors",
                                                          "optimizer.json"]
    needed = [*model_files, "scheduler.json", "trainer_state.json",
              *(f"rng-{rank}.safetensors" for rank in range(num_processes))]
    for name in [*needed, *files]:
        if name not in files:
            raise CheckpointError(f"resume_from_checkpoint: {path / name} is not in {manifest_file}")
        if not (path / name).is_file():
            raise CheckpointError(f"resume_from_checkpoint: {path / name} is missing")
        if _sha256(path / name) != files[name]:
            raise CheckpointError(f"resume_from_checkpoint: {path / name} is damaged (its SHA-256 differs from the "
                                  f"one in {MANIFEST})")
    return manifest


def load(trainer: Any, directory: str) -> None:
    """Restore `trainer` from a verified `directory` (collective). The main process checks the files; every
    process gets its answer, so a refusal stops all of them."""
    acc = trainer.accelerator
    _verify_everywhere(acc, directory, trainer.identity, trainer.deepspeed)
    path = Path(directory)
    if trainer.deepspeed:
        trainer.model.load_checkpoint(str(path / "deepspeed"), tag="state", load_module_strict=False)
    else:
        model = acc.unwrap_model(trainer.model)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        saved = _read_tensors(path / "trainable.safetensors")
        if set(saved) != set(params) or any(saved[n].shape != params[n].shape for n in params):
            raise CheckpointError(f"resume_from_checkpoint: {path / 'trainable.safetensors'} holds other parameters "
                                  "than this model trains")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
        meta = _read_json(path / "optimizer.json")
        trainer.optimizer.load_state_dict(_unflatten_optimizer(_read_tensors(path / "optimizer.safetensors"), meta))
    trainer.scheduler.load_state_dict(_read_json(path / "scheduler.json"))
    rng = _read_tensors(path / f"rng-{acc.process_index}.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    state = _read_json(path / "trainer_state.json")
    trainer.update_step, trainer.log_history = int(state["update"]), list(state["log_history"])
    trainer.reward_scaler.load_state_dict(state["reward_scaling"])


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def _sha256(path: Path) -> str:
    """`file_sha256`, computed once per file version: `check_before_loading` and `load` both verify a checkpoint
    (a 7B full-parameter ZeRO-3 checkpoint is ~85 GB, about a minute of hashing)."""
    stat = path.stat()
    return _sha256_of(str(path), stat.st_size, stat.st_mtime_ns)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors' own error types: the file was verified, so this is rare
        raise CheckpointError(f"resume_from_checkpoint: {path} is unreadable ({error})") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"resume_from_checkpoint: {path} is unreadable ({error})") from None
