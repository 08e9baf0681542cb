"""Run identities and checksummed files: what lets a resumed run prove it continues the same run from intact files.

A run's identity is a JSON-able dict of everything that changes its numbers; `fingerprint` is its short digest and
`describe_changes` lists what differs between two identities (`key: old -> new`), the text of every "this directory
holds a run with other settings" refusal. Files are written atomically (`atomic_write`: temporary file, fsync,
rename) and an OSError while writing becomes a one-line `WriteError` naming the path (`writing`).

Used by the labeler's chunk store (`labeling.store`), PPO's checkpoints (`trl.ppo_checkpoint`) and the iterative
DPO recipe's run manifest: one mechanism for every resumable thing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["WriteError", "writing", "fingerprint", "canonical", "describe_changes", "atomic_write", "file_sha256",
           "check_run_identity"]


class WriteError(ValueError):
    """An output that cannot be written (disk full, read-only file system, no permission), naming the path."""


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError raised inside the block into a one-line `WriteError`: `cannot write <path>: <reason>`."""
    try:
        yield
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}") from error


def canonical(identity: dict[str, Any]) -> dict[str, Any]:
    """`identity` as it reads back from JSON (tuples as lists, other objects by repr): saved and live compare."""
    return json.loads(json.dumps(identity, sort_keys=True, default=repr))


def fingerprint(identity: dict[str, Any]) -> str:
    """A short digest of a run identity (canonical JSON)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def describe_changes(old: Any, new: Any, prefix: str = "") -> str:
    """`key: old -> new` for every leaf that differs (nested dicts by dotted key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        parts = [describe_changes(old.get(k), new.get(k), f"{prefix}{k}.") for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        return ", ".join(parts)
    return f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync and rename: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with writing(path):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_run_identity(manifest: Path, identity: dict[str, Any], where: str, write: bool = True) -> None:
    """Refuse to continue a run whose `manifest` records another identity (ValueError: the changes, the file and
    `where` — the flag that names the directory); record `identity` there when it is new (with `write`).

    An unreadable manifest is refused too: the run it belonged to cannot be proven to be this one."""
    identity = canonical(identity)
    manifest = Path(manifest)
    if manifest.exists():
        try:
            saved = json.loads(manifest.read_text())["identity"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{manifest}: unreadable run manifest ({type(error).__name__}: {error}); {where} cannot "
                             "be resumed as this run: use another one") from None
        if saved != identity:
            raise ValueError(f"{where} {str(manifest.parent)!r} holds a run with other settings: {manifest.name} has "
                             f"{describe_changes(saved, identity)}; resume with the same settings or use another "
                             f"{where}")
        return
    if write:
        with writing(manifest.parent):
            manifest.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"fingerprint": fingerprint(identity), "identity": identity}, indent=1, sort_keys=True)
        atomic_write(manifest, text.encode())
