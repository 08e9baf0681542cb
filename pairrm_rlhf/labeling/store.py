"""The resumable chunk store of a labeling run: finished chunks on disk, each one provably of this run and intact.

A run's identity (`identity`: everything that changes its numbers) is written to `manifest.json` and into every
chunk file, with a SHA-256 of the chunk's contents (its rows as canonical JSON, its stats and the identity). On
resume (`ChunkStore.open`):

- a manifest or chunk of another identity stops the run with the list of what changed and the file's name
  (unless `overwrite`, which discards them): chunks of a K=4 run are never reused by a K=3 run, with or without
  the manifest;
- a chunk that cannot be read, lacks its metadata or fails its checksum (truncated, a flipped byte, an edited
  value) is reported by file name, deleted and labeled again;
- leftover temporary files of interrupted writes (`*.tmp-<pid>`) are deleted.

One run at a time: `open` takes the directory's lock (`lock`, a `filelock.FileLock`, released by `close` or when
the process dies) and records its holder in `lock.json`; a second labeler on the same directory stops at once
with the holder's pid, host and start time. Every chunk is written atomically (temporary file, fsync, rename).
Under several processes every process checks the store (read-only, same answer everywhere) and only the main
process takes the lock and changes files. A file that cannot be written (disk full, read-only) is a `WriteError`:
one line naming the path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..core.identity import WriteError, atomic_write, fingerprint, writing
from ..core.identity import describe_changes as _diff
from .pairs import LabelStats

logger = logging.getLogger(__name__)

WORK_FORMAT = 2  # bump when the chunk files change meaning
MANIFEST = "manifest.json"
LOCK, LOCK_OWNER = "lock", "lock.json"
_STATS, _IDENTITY, _CHECKSUM = b"pairrm_rlhf.stats", b"pairrm_rlhf.identity", b"pairrm_rlhf.sha256"


class ChunkError(ValueError):
    """A chunk file that cannot be trusted (unreadable, no metadata, or a checksum that does not match)."""


def chunk_name(index: int) -> str:
    return f"chunk-{index:05d}.arrow"


def checksum(table: pa.Table, stats: LabelStats, identity_json: str) -> str:
    """SHA-256 of a chunk's rows (canonical JSON: floats round-trip exactly), its stats and its identity."""
    digest = hashlib.sha256()
    digest.update(identity_json.encode())
    digest.update(json.dumps(asdict(stats), sort_keys=True).encode())
    for batch in table.to_batches(max_chunksize=256):
        digest.update(json.dumps(batch.to_pylist(), sort_keys=True, ensure_ascii=False).encode())
    return digest.hexdigest()


class ChunkStore:
    """Finished chunks of one labeling run in `directory` (see the module docstring).

    Args:
        directory: the work directory (created by `open`).
        identity: JSON-able description of everything that changes the run's numbers.

    Example:
        >>> store = ChunkStore(tmp_dir, {"K": 4})
        >>> done = store.open(state)          # indices of the chunks already finished and intact
        >>> store.write(3, table, stats)
        >>> table, stats = store.read(3)
    """

    def __init__(self, directory: str | os.PathLike, identity: dict[str, Any]):
        self.directory = Path(directory)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=repr))
        self.identity_json = json.dumps(self.identity, sort_keys=True)
        self.fingerprint = fingerprint(self.identity)
        self._lock: Any = None

    @property
    def manifest(self) -> Path:
        return self.directory / MANIFEST

    def path(self, index: int) -> Path:
        return self.directory / chunk_name(index)

    # ---- writing and reading ---------------------------------------------------------------------------
    def write(self, index: int, table: pa.Table, stats: LabelStats) -> None:
        """Save chunk `index` atomically with its stats, the run identity and a checksum of all three."""
        metadata = {
            **(table.schema.metadata or {}),
            _STATS: json.dumps(asdict(stats)).encode(),
            _IDENTITY: self.identity_json.encode(),
            _CHECKSUM: checksum(table, stats, self.identity_json).encode(),
        }
        table = table.replace_schema_metadata(metadata)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        atomic_write(self.path(index), sink.getvalue().to_pybytes())

    def read(self, index: int) -> tuple[pa.Table, LabelStats]:
        """Chunk `index`'s rows and stats; `ChunkError` (naming the file) when it is damaged or of another run."""
        table, stats, identity = self._read(self.path(index))
        if identity != self.identity:
            raise ChunkError(f"{self.path(index)}: a chunk of another run ({_diff(identity, self.identity)})")
        return table, stats

    def _read(self, path: Path) -> tuple[pa.Table, LabelStats, dict]:
        try:
            with pa.OSFile(str(path), "rb") as f:
                table = pa.ipc.open_file(f).read_all()
            metadata = table.schema.metadata or {}
            identity_json = metadata[_IDENTITY].decode()
            stats = LabelStats(**json.loads(metadata[_STATS]))
            saved = metadata[_CHECKSUM].decode()
            identity = json.loads(identity_json)
        except (OSError, pa.ArrowException, KeyError, ValueError, TypeError, UnicodeDecodeError) as error:
            raise ChunkError(f"{path}: unreadable chunk ({type(error).__name__}: {error})") from None
        if checksum(table, stats, identity_json) != saved:
            raise ChunkError(f"{path}: checksum mismatch (the file was changed after it was written)")
        return table, stats, identity

    # ---- resume -----------------------------------------------------------------------------------------
    def open(self, state: Any, overwrite: bool = False) -> set[int]:
        """Check the store against this run and clean it; return the indices of the chunks to reuse.

        `state` is accelerate's process state (barriers, main process). Raises ValueError (with the changed
        settings and the file) for a manifest or chunk of another run unless `overwrite`, and when another labeler
        holds the directory (see the module docstring); `close` releases it.
        """
        self._take_lock(state)
        if self.manifest.exists() and not overwrite:
            try:
                saved = json.loads(self.manifest.read_text()).get("identity")
            except (OSError, ValueError, AttributeError):
                saved = None  # a damaged manifest is rewritten; the chunks still carry their identity
            if saved is not None and saved != self.identity:
                raise ValueError(self._refusal(self.manifest, saved))
        valid, damaged, foreign = set(), [], []
        for path in sorted(self.directory.glob("chunk-*.arrow")) if self.directory.is_dir() else []:
            match = re.fullmatch(r"chunk-(\d+)\.arrow", path.name)
            if match is None:
                continue
            try:
                _, _, identity = self._read(path)
            except ChunkError as error:
                damaged.append((path, str(error)))
                continue
            if identity != self.identity:
                foreign.append((path, identity))
            else:
                valid.add(int(match.group(1)))
        if foreign and not overwrite:
            path, identity = foreign[0]
            raise ValueError(self._refusal(path, identity, more=len(foreign) - 1))
        state.wait_for_everyone()  # everyone has checked before the main process changes anything
        if state.is_main_process:
            for path, reason in damaged:
                logger.warning("Labeling %s again: %s", path.name, reason)
                path.unlink(missing_ok=True)
            for path, _ in foreign:  # only with overwrite
                logger.warning("Discarding %s: a chunk of a run with other settings (overwrite)", path.name)
                path.unlink(missing_ok=True)
            for path in self.directory.glob("*.tmp-*"):
                logger.info("Removing %s, left by an interrupted write", path.name)
                path.unlink(missing_ok=True)
            text = json.dumps({"fingerprint": self.fingerprint, "identity": self.identity}, indent=1, sort_keys=True)
            if not self.manifest.exists() or self.manifest.read_text() != text:
                atomic_write(self.manifest, text.encode())
        state.wait_for_everyone()  # everyone sees the cleaned store before new chunks appear
        return valid

    def close(self) -> None:
        """Release the directory's lock (taken by `open`; a no-op when this process holds none)."""
        if self._lock is not None:
            (self.directory / LOCK_OWNER).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def _take_lock(self, state: Any) -> None:
        """Main process: take the lock without waiting, or fail naming its holder; every process gets the answer."""
        refusal: tuple[bool, str] | None = None  # (a write failed, the message)
        if state.is_main_process and self._lock is None:
            try:
                refusal = self._lock_or_holder()
            except WriteError as error:
                refusal = (True, str(error))
        if state.num_processes > 1:  # the other processes must not wait at a barrier the main one never reaches
            from accelerate.utils import broadcast_object_list

            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise (WriteError if refusal[0] else ValueError)(refusal[1])

    def _lock_or_holder(self) -> tuple[bool, str] | None:
        from filelock import FileLock, Timeout

        with writing(self.directory):
            self.directory.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.directory / LOCK, thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:  # (an OSError itself: caught first)
            return False, self._busy()
        except OSError as error:
            raise WriteError(f"cannot write {self.directory / LOCK}: {error.strerror or error}") from error
        self._lock = lock
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            atomic_write(self.directory / LOCK_OWNER, json.dumps(owner).encode())
        except WriteError:
            self.close()
            raise
        return None

    def _busy(self) -> str:
        try:
            owner = json.loads((self.directory / LOCK_OWNER).read_text())
            holder = f"pid {owner['pid']} on {owner['host']}, started {owner['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            holder = "a process that has not recorded itself yet"
        return (f"work_dir {str(self.directory)!r} is in use by another labeler ({holder}); wait for it to end "
                "or use another work_dir")

    def _refusal(self, path: Path, old: Any, more: int = 0) -> str:
        others = f" (and {more} more chunk(s))" if more else ""
        return (
            f"work_dir {str(self.directory)!r} holds a run with other settings: {path.name}{others} has "
            f"{_diff(old, self.identity)}; use another work_dir or overwrite=True (--overwrite) to discard it"
        )


def remove_store(directory: str | os.PathLike) -> None:
    """Delete a work directory's chunk files and manifest, then the directory if nothing else is in it."""
    directory = Path(directory)
    for path in directory.glob("chunk-*.arrow"):
        path.unlink()
    for name in (MANIFEST, LOCK, LOCK_OWNER):
        (directory / name).unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        logger.warning("Left %s in place: it holds other files", directory)
