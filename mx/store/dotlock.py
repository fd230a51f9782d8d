"""Dovecot's dot-lock: `<file>.lock` beside a shared state file, safe on NFS.

Used for `dovecot-uidlist`, `dovecot-keywords` and `subscriptions`, so mx and Dovecot on the
same Maildir (or several mx hosts on one NFS/CephFS tree) exclude each other.

Invariants:
- The lock is taken by creating a unique temp file and `link()`ing it to `<file>.lock`; link
  is atomic on NFS where O_EXCL once was not, and a lost reply is caught by checking the temp
  file's link count (2 = we own the lock). Dovecot's own O_EXCL create of the same name
  excludes us and we exclude it.
- The lock file holds `<pid>:<host>` while held, as Dovecot's dot-locks do; a lock is stale
  when its holder is a dead process on this host, or when it has not been modified for
  `stale` seconds (Dovecot's uidlist value: 120 s). Only a lock that is still the same file
  (inode and mtime unchanged) is removed as stale.
- `replace(data)` writes the new contents into the lock file itself, fsyncs it and renames it
  over the target (Dovecot's `file_dotlock_replace`), after checking that the lock is still
  ours; readers therefore see the old file or the new one, never a mix. The folder is fsynced.
- Leaving the `with` block without `replace` removes the lock; nothing is left behind except
  after a crash, and then staleness frees it.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from mx.durable import fsync_dir
from mx.store.errors import LockTimeout, StoreError

__all__ = ["DotLock", "STALE_SECONDS", "TIMEOUT_SECONDS"]

STALE_SECONDS = 120.0  # Dovecot: MAILDIR_UIDLIST_LOCK_STALE_TIMEOUT
TIMEOUT_SECONDS = STALE_SECONDS + 2  # Dovecot waits stale + 2 s before giving up
_HOST = socket.gethostname() or "localhost"


def _pid_dead(content: bytes) -> bool:
    """True when `content` is `<pid>:<host>` naming a process of this host that is gone."""
    pid_s, sep, host = content.decode("ascii", "replace").strip().partition(":")
    if not sep or host != _HOST or not pid_s.isdigit():
        return False
    try:
        os.kill(int(pid_s), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class DotLock:
    """`with DotLock(path) as lock: ... lock.replace(data)`."""

    def __init__(
        self,
        target: Path,
        *,
        timeout: float = TIMEOUT_SECONDS,
        stale: float = STALE_SECONDS,
        mode: int = 0o600,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.target = target
        self.lock_path = target.with_name(target.name + ".lock")
        self.timeout, self.stale, self.mode = timeout, stale, mode
        self._clock, self._sleep = clock, sleep
        self._fd = -1
        self._temp: Path | None = None

    def __enter__(self) -> DotLock:
        self.acquire()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        temp = self.target.with_name(f".temp.{_HOST}.{os.getpid()}.{os.urandom(6).hex()}")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self.mode)
        except OSError as e:
            raise StoreError(f"cannot lock {self.target}: {e.strerror}") from None
        try:
            os.write(fd, f"{os.getpid()}:{_HOST}".encode())
            self._take(temp, fd)
        except BaseException:
            os.close(fd)
            _unlink(temp)
            raise
        self._fd, self._temp = fd, temp

    def _take(self, temp: Path, fd: int) -> None:
        deadline = self._clock() + self.timeout
        pause = 0.002
        while True:
            try:
                os.link(temp, self.lock_path)
                return
            except FileExistsError:
                pass
            except OSError as e:
                if os.fstat(fd).st_nlink == 2:  # NFS: the link was made, the reply was lost
                    return
                raise StoreError(f"cannot lock {self.target}: {e.strerror}") from None
            if self._break_if_stale():
                continue
            if self._clock() >= deadline:
                raise LockTimeout(f"{self.lock_path}: held by another process for over {self.timeout:g}s")
            self._sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.1)

    def _break_if_stale(self) -> bool:
        try:
            st = os.stat(self.lock_path)
            with open(self.lock_path, "rb") as f:
                head = f.read(256)
        except FileNotFoundError:
            return True  # released meanwhile: try again at once
        except OSError:
            return False
        if not (_pid_dead(head) or self._clock() - st.st_mtime > self.stale):
            return False
        try:
            again = os.stat(self.lock_path)
            if (again.st_ino, again.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                os.unlink(self.lock_path)
        except FileNotFoundError:
            pass
        return True

    def _still_ours(self) -> bool:
        try:
            return os.stat(self.lock_path).st_ino == os.fstat(self._fd).st_ino
        except FileNotFoundError:
            return False

    def replace(self, data: bytes) -> None:
        """Make `data` the target's contents (atomically, durably) and release the lock."""
        if not self.held:
            raise StoreError(f"{self.lock_path}: not locked")
        if not self._still_ours():
            self.release()
            raise StoreError(f"{self.lock_path}: lock was taken over as stale; not replacing")
        fd = self._fd
        try:
            os.ftruncate(fd, 0)
            view = memoryview(data)
            off = 0
            while off < len(view):
                off += os.pwrite(fd, view[off:], off)
            os.fsync(fd)
            os.rename(self.lock_path, self.target)
        except OSError as e:
            self.release()
            raise StoreError(f"cannot write {self.target}: {e.strerror}") from None
        fsync_dir(self.target.parent)
        self._close()

    def release(self) -> None:
        if not self.held:
            return
        if self._still_ours():
            _unlink(self.lock_path)
        self._close()

    def _close(self) -> None:
        os.close(self._fd)
        self._fd = -1
        if self._temp is not None:
            _unlink(self._temp)
            self._temp = None


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
