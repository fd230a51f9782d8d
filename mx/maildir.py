"""Maildir++ store: durable delivery of new messages into local users' Maildirs.

Runs in a disk thread (blocking file I/O, no Twisted here).

Invariants:
- A message appears in `new/` only complete and fsynced: it is written into `tmp/`, the file
  is fsynced, renamed into `new/`, and then the `new/` directory is fsynced. A failure at any
  step removes what was written, so `new/` never holds a partial file.
- File names are unique without locks: seconds, microseconds, pid, a per-process counter and
  random bits, the host name, and `,S=<size>` (Dovecot reads the size from it), then
  `,W=<size with CRLF line ends>` for a message up to `W_COUNT_LIMIT` held in memory (Dovecot's
  virtual size; IMAP sends a message whose W equals S without scanning it for bare LF).
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
from dataclasses import dataclass
from pathlib import Path

from mx.address import is_safe_mailbox_name
from mx.durable import Staged, fsync_dir, stage

__all__ = ["MaildirError", "Delivery", "mailbox_path", "ensure_maildir", "stage_copy", "SUBDIRS"]

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
    for d in [*reversed(missing), *(path / sub for sub in SUBDIRS)]:
        try:
            os.mkdir(d, 0o700)
            created.append(d)
        except FileExistsError:
            pass
    if created and path.name.startswith("."):
        # A Maildir++ folder (".Junk"): Dovecot's marker, as mx.store's Mailbox.create makes.
        with open(path / "maildirfolder", "wb"):
            pass
    for parent in {d.parent for d in created}:
        fsync_dir(parent)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message copy for one Maildir: `header` then the body bytes or the body file."""

    maildir: Path
    header: bytes
    body: bytes | None = None
    body_file: Path | None = None  # a spooled body, copied when the message was large


def stage_copy(d: Delivery, known: set[Path]) -> Staged:
    """Write one copy into tmp/ (the caller fsyncs it); the final name in new/ carries its size.

    `known` caches Maildirs already seen to exist, so a delivery costs no extra stat calls.
    """
    if d.maildir not in known:
        ensure_maildir(d.maildir)
        known.add(d.maildir)
    tmp = d.maildir / "tmp" / unique_name(0)
    parts: list[bytes | Path] = [d.header]
    if d.body is not None:
        parts.append(d.body)
    elif d.body_file is not None:
        parts.append(d.body_file)
    staged = stage(tmp, tmp, parts)
    # Dovecot reads the size from ",S=" in the name; it is known only now.
    name = f"{tmp.name.rsplit(',S=', 1)[0]},S={staged.size}"
    if d.body_file is None and staged.size <= W_COUNT_LIMIT:  # two C counts; larger: IMAP scans
        name += f",W={staged.size + bare_lf_count(parts)}"  # type: ignore[arg-type]
    staged.final = d.maildir / "new" / name
    return staged


# The delivery counts bare LFs for ",W=" up to this size (~10 us at 4 KiB on a slow VM; a
# 100 KiB message would cost ~0.25 ms of the acceptance path, so it gets no ",W=").
W_COUNT_LIMIT = 32 * 1024


def bare_lf_count(parts: list[bytes]) -> int:
    """LFs not preceded by CR in the concatenation of `parts` (without joining them)."""
    count = 0
    previous = b""
    for part in parts:
        count += part.count(b"\n") - part.count(b"\r\n")
        if previous.endswith(b"\r") and part.startswith(b"\n"):
            count -= 1  # a CRLF split between two parts
        if part:
            previous = part
    return count
