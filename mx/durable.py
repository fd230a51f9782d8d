"""Crash-safe file writes: the one place that knows how bytes become durable on POSIX.

Storage modules (`maildir`, `spool`, `users`) build on these; nothing here imports Twisted.

Invariants:
- A file is written under a temporary name, fsynced, then renamed (or, when it must not
  replace anything, linked) to its final name; that is durable only after the folder itself
  is fsynced (ext4/XFS semantics).
- `stage` + `sync` + `publish` split that up so a caller can write many files, fsync them
  all (the first fsync commits the journal for the others, so the rest cost little), rename
  them all and fsync each folder once (group commit); `atomic_write` is the one-file form.
- On any failure the temporary file is removed: no partial file ever carries a final name.
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Staged", "close_synced", "fsync_dir", "fsync_many", "stage", "sync", "discard", "publish", "atomic_write",
           "unlink_quietly"]

FSYNC_THREADS = 8  # concurrent fsyncs; more gained nothing measurable on a virtio disk


@dataclass(slots=True)
class Staged:
    """A file written under `tmp`, to be fsynced (`fd` open until then) and renamed to `final`."""

    tmp: Path | str
    final: Path | str
    fd: int | None = None
    size: int = 0
    replaces: bool = False  # `final` exists already and must survive a failed commit
    exclusive: bool = False  # `final` must not exist: published with link(), never rename()
    published: bool = False  # `final` is ours now (a failed commit removes it again)
    folder: Path | None = None  # `final`'s folder, when the caller has it at hand (else derived)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_one(target: int | Path | str) -> OSError | None:
    """fsync an open fd, or a folder by path; its error, or None."""
    try:
        if isinstance(target, int):
            os.fsync(target)
        else:
            fsync_dir(target)
    except OSError as e:
        return e
    return None


_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _fsync_pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="mx-fsync")
        return _executor


def fsync_many(targets: Sequence[int | Path | str]) -> list[OSError | None]:
    """fsync every target (an open fd, or a folder by path) concurrently; one result per
    target, None or its error. Returns only after every fsync returned, so the caller may
    close or remove any of them afterwards. Called from disk threads, never the reactor."""
    if len(targets) <= 1:
        return [_fsync_one(t) for t in targets]
    # One task per fsync thread, each taking every FSYNC_THREADS-th target: as many fsyncs in
    # flight as one task per target gave, without a Future (and the GIL it holds) per file.
    lanes = min(FSYNC_THREADS, len(targets))
    futures: list[Future[list[OSError | None]]] = []
    try:
        for lane in range(lanes):
            futures.append(_fsync_pool().submit(_fsync_lane, targets[lane::lanes]))
    except RuntimeError:  # interpreter shutting down: no new threads; the rest in a row
        pass
    results: list[OSError | None] = [None] * len(targets)
    for lane in range(lanes):
        done = futures[lane].result() if lane < len(futures) else _fsync_lane(targets[lane::lanes])
        results[lane::lanes] = done
    return results


def _fsync_lane(targets: Sequence[int | Path | str]) -> list[OSError | None]:
    return [_fsync_one(t) for t in targets]


def unlink_quietly(path: Path | str) -> None:
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


def stage(tmp: Path | str, final: Path | str, parts: Iterable[bytes | Path], mode: int = 0o600,
          folder: Path | None = None) -> Staged:
    """Create `tmp` (must not exist) from byte strings and files, not yet fsynced.

    A `Path` part is copied in 1 MiB blocks, so large messages never sit whole in memory.
    `folder` is `final`'s folder, if the caller has it (publish then needs no path work).
    """
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    size = 0
    try:
        for part in parts:
            if isinstance(part, Path):
                with open(part, "rb") as src:
                    while block := src.read(1 << 20):
                        size += _write_all(fd, block)
            else:
                size += _write_all(fd, part)
    except BaseException:
        os.close(fd)
        unlink_quietly(tmp)
        raise
    return Staged(tmp, final, fd, size, folder=folder)


def sync(staged: Sequence[Staged]) -> None:
    """fsync (concurrently) and close every staged file; on error remove them all."""
    try:
        errors = fsync_many([s.fd for s in staged if s.fd is not None])
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            raise failed
        close_synced(staged)
    except BaseException:
        discard(staged)
        raise


def close_synced(staged: Sequence[Staged]) -> None:
    """Close staged files that the caller fsynced itself (with `fsync_many`)."""
    for s in staged:
        if s.fd is not None:
            os.close(s.fd)
            s.fd = None


def discard(staged: Sequence[Staged]) -> None:
    """Forget staged files: close what is open, remove temporary and final names."""
    for s in staged:
        if s.fd is not None:
            try:
                os.close(s.fd)
            except OSError:
                pass
            s.fd = None
        unlink_quietly(s.tmp)
        if s.published and not s.replaces:
            unlink_quietly(s.final)
        s.published = False


def publish(staged: Sequence[Staged]) -> set[Path]:
    """Move every (synced) staged file into place, in order; return the folders that now
    need an fsync. An `exclusive` file is linked (link() fails if the name exists, where
    rename() would silently replace it) and its temporary name removed; others are renamed.
    If one fails, everything this call published is removed again and the error raised:
    the caller's job then failed as a whole.
    """
    try:
        for s in staged:
            assert s.fd is None, "publish after sync"
            if s.exclusive:
                os.link(s.tmp, s.final)
                s.published = True
                os.unlink(s.tmp)
            else:
                os.rename(s.tmp, s.final)
                s.published = True
    except BaseException:
        discard(staged)
        raise
    return {s.folder or Path(s.final).parent for s in staged}


def atomic_write(path: Path, data: bytes, mode: int = 0o600, *, keep_owner: bool = False) -> None:
    """Replace `path` with `data` durably: temp file, fsync, rename, fsync the folder.

    `keep_owner`: if `path` exists, the new file gets its owner, group and mode, minus any
    access for others (as far as this process may give them), so a root-run tool does not
    take a file away from the mail user; a new file gets `mode`.
    """
    path = Path(path)
    try:
        before = os.stat(path) if keep_owner else None
    except FileNotFoundError:
        before = None
    staged = stage(path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp"), path, [data], mode)
    if before is not None and staged.fd is not None:
        try:
            os.fchown(staged.fd, before.st_uid, before.st_gid)
        except PermissionError:
            pass  # not root and not ours to give away: keep our own
        os.fchmod(staged.fd, stat.S_IMODE(before.st_mode) & 0o770)
    sync([staged])
    try:
        os.replace(staged.tmp, path)
    except BaseException:
        unlink_quietly(staged.tmp)
        raise
    fsync_dir(path.parent)
