"""How `mx queue` talks to a running server: request files in `<data_dir>/queue/control/`.

The server holds an exclusive flock on `<data_dir>/queue/.lock` while it runs; the command
line uses it to tell whether a server is there. With a server, `mx queue flush|delete`
drops a request file that the server picks up at once (inotify; else its once-a-second
check) and removes when done; with no server, the command acts on the queue files itself.

Pure file operations, no Twisted.

Invariants:
- A request file appears whole (written under a temporary name, then renamed).
- Only `flush` and `delete` exist; arguments are queue ids (checked), never paths.
"""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import IO

from mx.durable import unlink_quietly
from mx.spool import check_id

__all__ = ["ACTIONS", "ServerLock", "server_running", "write_request", "read_requests", "control_dir"]

ACTIONS = ("flush", "delete")
POLL_INTERVAL = 1.0


def control_dir(queue_root: Path) -> Path:
    return Path(queue_root) / "control"


def _lock_path(queue_root: Path) -> Path:
    return Path(queue_root) / ".lock"


class ServerLock:
    """The running server's claim on its queue: an flock held for the process's lifetime."""

    def __init__(self, queue_root: Path) -> None:
        self._path = _lock_path(queue_root)
        self._file: IO[bytes] | None = None

    def acquire(self) -> bool:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self._path, "ab")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            return False
        self._file = f
        return True

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


def server_running(queue_root: Path) -> bool:
    lock = ServerLock(queue_root)
    if lock.acquire():
        lock.release()
        return False
    return True


def write_request(queue_root: Path, action: str, arg: str = "") -> Path:
    """Leave a request for the server; returns the file, which the server removes when done."""
    if action not in ACTIONS:
        raise ValueError(f"unknown control action {action!r}")
    if arg:
        check_id(arg)
    folder = control_dir(queue_root)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{action}.{arg or '-'}.{secrets.token_hex(4)}"
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(b"")
    final = folder / name
    os.rename(tmp, final)
    return final


def read_requests(queue_root: Path) -> list[tuple[str, str, Path]]:
    """Pending requests as (action, arg, path), oldest first; malformed ones are removed."""
    folder = control_dir(queue_root)
    try:
        names = sorted(os.listdir(folder), key=lambda n: _mtime(folder / n))
    except FileNotFoundError:
        return []
    requests = []
    for name in names:
        if name.startswith("."):
            continue
        action, _, rest = name.partition(".")
        arg, _, _token = rest.rpartition(".")
        if action not in ACTIONS or not arg:
            unlink_quietly(folder / name)
            continue
        requests.append((action, "" if arg == "-" else arg, folder / name))
    return requests


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
