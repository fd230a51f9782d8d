"""Maildir++ store: durable delivery of new messages into local users' Maildirs.

Runs in a disk thread (blocking file I/O, no Twisted here).

Invariants:
- A message appears in `new/` only complete and fsynced: it is written into `tmp/`, the file
  is fsynced, renamed into `new/`, and then the `new/` directory is fsynced. A failure at any
  step removes what was written, so `new/` never holds a partial file.
- File names are unique without locks: seconds, microseconds, pid, a per-process counter and
  random bits, the host name, and `,S=<size>` (Dovecot reads the size from it).
- Paths are built only from a validated user's domain and local part; `mailbox_path`
  refuses anything that could step outside `<data_dir>/mail`.
"""

from __future__ import annotations

import itertools
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mx.address import is_safe_mailbox_name

__all__ = ["MaildirError", "Delivery", "mailbox_path", "ensure_maildir", "deliver_batch", "SUBDIRS"]

SUBDIRS = ("tmp", "new", "cur")
_counter = itertools.count()
_counter_lock = threading.Lock()


class MaildirError(Exception):
    """A mailbox location that is not allowed."""


def _host_part() -> str:
    # Maildir: "/" and ":" in the host name are written as octal escapes.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"


_HOST = _host_part()


def unique_name(size: int) -> str:
    now = time.time()
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    with _counter_lock:
        n = next(_counter)
    return f"{sec}.M{usec}P{os.getpid()}Q{n}R{secrets.token_hex(4)}.{_HOST},S={size}"


def mailbox_path(mail_root: Path, domain: str, local: str) -> Path:
    """`<mail_root>/<domain>/<local>`, after checking both are single safe path components."""
    if not (is_safe_mailbox_name(domain) and is_safe_mailbox_name(local)):
        raise MaildirError(f"unsafe mailbox name {local!r}@{domain!r}")
    return mail_root / domain / local


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_maildir(path: Path) -> None:
    """Create `path` with tmp/new/cur if missing, durably (each new directory's parent fsynced)."""
    if (path / "new").is_dir() and (path / "tmp").is_dir() and (path / "cur").is_dir():
        return
    created: list[Path] = []
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
            created.append(d)
        except FileExistsError:
            pass
    for sub in SUBDIRS:
        try:
            os.mkdir(path / sub, 0o700)
            created.append(path / sub)
        except FileExistsError:
            pass
    for parent in {d.parent for d in created}:
        _fsync_dir(parent)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message copy for one Maildir: `header` then the body bytes or the body file."""

    maildir: Path
    header: bytes
    body: bytes | None = None
    body_file: Path | None = None  # a spooled body, copied when the message was large


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_copy(fd: int, d: Delivery) -> int:
    _write_all(fd, d.header)
    size = len(d.header)
    if d.body is not None:
        _write_all(fd, d.body)
        size += len(d.body)
    elif d.body_file is not None:
        with open(d.body_file, "rb") as src:
            while chunk := src.read(1 << 20):
                _write_all(fd, chunk)
                size += len(chunk)
    return size


def _write_tmp(d: Delivery, known: set[Path]) -> tuple[Path, Path]:
    """Write and fsync one copy into tmp/; return (tmp path, final new/ path)."""
    if d.maildir not in known:
        ensure_maildir(d.maildir)
        known.add(d.maildir)
    tmp = d.maildir / "tmp" / unique_name(0)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        size = _write_copy(fd, d)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    # The size is known only now; the name in new/ carries it (",S=").
    final = d.maildir / "new" / f"{tmp.name.rsplit(',S=', 1)[0]},S={size}"
    return tmp, final


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def deliver_batch(
    jobs: Sequence[Sequence[Delivery]], known: set[Path]
) -> list[BaseException | list[Path]]:
    """Deliver several messages at once (group commit); one result per job.

    Each job is all the copies of one message: it succeeds as a whole (the list of files in
    `new/`) or fails as a whole (the exception, with every file it wrote removed). Each
    file is fsynced on its own; each `new/` directory is fsynced once for the whole batch.
    `known` caches Maildirs already seen to exist, so a delivery costs no extra stat calls.
    """
    results: list[BaseException | list[Path]] = []
    moved: list[list[Path]] = []
    for job in jobs:
        done: list[tuple[Path, Path]] = []
        try:
            for d in job:
                done.append(_write_tmp(d, known))
            for tmp, final in done:
                os.rename(tmp, final)
        except Exception as e:  # noqa: BLE001 - one job's disk error must not fail the batch
            for tmp, final in done:
                _unlink_quietly(tmp)
                _unlink_quietly(final)
            known.difference_update(d.maildir for d in job)
            results.append(e)
            moved.append([])
            continue
        results.append([final for _tmp, final in done])
        moved.append([final for _tmp, final in done])
    dirs = {f.parent for files in moved for f in files}
    failed_dirs: dict[Path, BaseException] = {}
    for d in dirs:
        try:
            _fsync_dir(d)
        except OSError as e:
            failed_dirs[d] = e
    if failed_dirs:
        for i, files in enumerate(moved):
            bad = next((failed_dirs[f.parent] for f in files if f.parent in failed_dirs), None)
            if bad is not None:
                for f in files:
                    _unlink_quietly(f)
                results[i] = bad
    return results


def iter_new(maildir: Path) -> Iterable[Path]:
    """Files in `new/` (for tests and tools)."""
    try:
        return sorted((maildir / "new").iterdir())
    except FileNotFoundError:
        return []
