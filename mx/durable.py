"""Crash-safe file writes: the one place that knows how bytes become durable on POSIX.

Storage modules (`maildir`, `spool`, `users`) build on these; nothing here imports Twisted.

Invariants:
- A file is written under a temporary name, fsynced, then renamed to its final name; the
  rename is durable only after the folder itself is fsynced (ext4/XFS semantics).
- `stage` + `publish` split that in two so a caller can write many files, rename them all and
  fsync each folder once (group commit); `atomic_write` is the one-file form.
- On any failure the temporary file is removed: no partial file ever carries a final name.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Staged", "fsync_dir", "write_synced", "stage", "publish", "atomic_write", "unlink_quietly"]


@dataclass(frozen=True, slots=True)
class Staged:
    """A fsynced file waiting under `tmp` to be renamed to `final`."""

    tmp: Path
    final: Path


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _write_all(fd: int, data: bytes | memoryview) -> int:
    view = memoryview(data)
    total = len(view)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    return total


def write_synced(path: Path, parts: Iterable[bytes | Path], mode: int = 0o600) -> int:
    """Create `path` (must not exist) from byte strings and files, fsync it; return its size.

    A `Path` part is copied in 1 MiB blocks, so large messages never sit whole in memory.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    size = 0
    try:
        for part in parts:
            if isinstance(part, Path):
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        size += _write_all(fd, block)
            else:
                size += _write_all(fd, part)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)
    return size


def stage(tmp: Path, final: Path, parts: Iterable[bytes | Path]) -> Staged:
    write_synced(tmp, parts)
    return Staged(tmp, final)


def publish(staged: Sequence[Staged]) -> set[Path]:
    """Rename every staged file into place; return the folders that now need an fsync.

    If a rename fails, the files already renamed by this call are removed again and the
    error is raised: the caller's job then failed as a whole.
    """
    done: list[Staged] = []
    try:
        for s in staged:
            os.rename(s.tmp, s.final)
            done.append(s)
    except BaseException:
        for s in done:
            unlink_quietly(s.final)
        for s in staged:
            unlink_quietly(s.tmp)
        raise
    return {s.final.parent for s in staged}


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` durably: temp file, fsync, rename, fsync the folder."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_synced(temp, [data], mode)
        os.replace(temp, path)
    except BaseException:
        unlink_quietly(temp)
        raise
    fsync_dir(path.parent)
