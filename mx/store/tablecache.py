"""A folder's message table kept between processes, so a cold open need not parse every name.

A first open of a folder of 100,000 messages spent most of its time making a `MessageInfo`
from each file name (flags, `,S=`, `,W=`). The table it made is written here; the next cold
open (another process, or after the shared table was dropped) reads it back and compares it
with the listing in C (`Folder._patch`), parsing only the names that differ.

Blocking file I/O, called from the read pool.

Invariants:
- Only a cache: it lives under `<data_dir>/cache/<domain>/<local>/`, never in the Maildir;
  it is used only when the `dovecot-uidlist` it was made with is the one on disk now (same
  inode, size and mtime: every rewrite of the list is a new inode) and its UIDVALIDITY
  matches; then every entry is still checked against the listing. A lost, torn, foreign or
  older file is ignored and rewritten; nothing is fsynced.
- The file is written to a temporary name and renamed, so a reader never sees half of one.
- Saving happens on a writer thread of its own (`save_later`), after the open that made the
  table has answered: it works on the immutable infos it was handed, never on a Folder.
- `marshal` is used for speed; the file is mx's own (in its private data_dir) and everything
  read back is type-checked before use.
"""

from __future__ import annotations

import marshal
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path
from typing import Any

__all__ = ["load", "save", "save_later", "wait"]

_FORMAT = 2
_MAX_BYTES = 256 << 20  # a table larger than this is not read back
_TYPES = (int, str, str, str, int, str, (int, type(None)))  # uid, base, name, subdir, size, letters, vsize


def load(path: Path, ul_stamp: tuple[int, int, int], uidvalidity: int) -> list[list[Any]] | None:
    """The saved columns [uids, bases, names, subdirs, sizes, flag letters, vsizes] in table
    order, if the file was made with this uidlist stamp and UIDVALIDITY; else None. Columns,
    not rows: each is checked and used by C loops (`map`, `set`), not a Python step per row."""
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size > _MAX_BYTES:
                return None
            data = fh.read()
        head, stamp, validity, columns = marshal.loads(data)
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if head != _FORMAT or not isinstance(stamp, tuple) or tuple(stamp) != tuple(ul_stamp) or validity != uidvalidity:
        return None
    if type(columns) is not list or len(columns) != len(_TYPES) or any(type(c) is not list for c in columns):
        return None
    if len({len(c) for c in columns}) > 1:
        return None
    for column, want in zip(columns, _TYPES):
        allowed = set(want) if isinstance(want, tuple) else {want}
        if not set(map(type, column)) <= allowed:
            return None
    if not set(columns[3]) <= {"new", "cur"}:
        return None
    return columns


def save(path: Path, ul_stamp: tuple[int, int, int], uidvalidity: int, columns: list[list[Any]]) -> None:
    """Write the columns (see `load`); errors are swallowed (it is only a cache)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(tmp, "wb") as fh:
            fh.write(marshal.dumps((_FORMAT, tuple(ul_stamp), uidvalidity, columns)))
        os.replace(tmp, path)
    except (OSError, ValueError):
        try:
            os.unlink(tmp)
        except OSError:
            pass


_writer: ThreadPoolExecutor | None = None
_last: Future[None] | None = None
_lock = threading.Lock()


def save_later(path: Path, ul_stamp: tuple[int, int, int], uidvalidity: int, infos: list[Any]) -> None:
    """`save` of these MessageInfos (a list the caller no longer changes), on the writer
    thread; the open that made them does not wait."""
    global _writer, _last
    with _lock:
        if _writer is None:
            _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mx-tablecache")
        _last = _writer.submit(_save_infos, path, ul_stamp, uidvalidity, infos)


def _save_infos(path: Path, ul_stamp: tuple[int, int, int], uidvalidity: int, infos: list[Any]) -> None:
    columns = [list(map(itemgetter(k), infos)) for k in range(7)]
    columns[5] = ["".join(sorted(f)) for f in columns[5]]
    save(path, ul_stamp, uidvalidity, columns)


def wait() -> None:
    """Until the saves handed over so far are written (tests; a clean stop)."""
    with _lock:
        last = _last
    if last is not None:
        last.result()
