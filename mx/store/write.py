"""Writing messages into a folder for IMAP: APPEND's new file and COPY's hard links.

`Folder.append` and `Folder.copy_into` are thin over these; the UIDs are given by the folder
(`Folder._assign_locked`), which runs `publish` inside the uidlist dot-lock.

Invariants:
- A message reaches cur/ only complete: APPEND writes tmp/<base>, sets its mtime (Dovecot's
  Maildir INTERNALDATE) and fsyncs it; COPY hard-links the source into tmp/ (the same inode:
  bytes and mtime are the source's) or, across file systems, copies the bytes, sets the
  source's times and fsyncs. Then `publish` links tmp/ -> cur/ (link() never replaces an
  existing name), removes the tmp/ name and fsyncs cur/ once (Dovecot copies by hard link
  into tmp/ and moves into cur/ under the uidlist lock, as here).
- Any failure removes what this call wrote, tmp/ and cur/ names alike, and is a
  `StoreError`; nothing partial ever carries a name in cur/.
- The bases one call writes sort strictly ascending in Dovecot's arrival order (seconds,
  then microseconds): whoever gives them UIDs (mx, another mx host, Dovecot) gives them in
  the caller's order.
- Keywords travel by name: a source letter is looked up in the source's `dovecot-keywords`
  and given the destination's letter for that name (allotted when missing); a letter
  without a name, or one the destination has no room for, is dropped (and logged).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from mx.durable import Staged, discard, fsync_dir, publish, stage, sync
from mx.maildir import unique_name
from mx.store.errors import StoreError
from mx.store.flags import Keywords, info_name

__all__ = ["unique_bases", "stage_message", "stage_copy", "sync_copies", "publish_into", "forget", "KeywordMap"]

# Errors after which a hard link can never work here: fall back to copying the bytes.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


def _split_time(name: str) -> tuple[int, int, str]:
    """`unique_name`'s "<sec>.M<usec><rest>" as (sec, usec, rest)."""
    sec, _, tail = name.partition(".M")
    i = 0
    while i < len(tail) and tail[i].isdigit():
        i += 1
    return int(sec), int(tail[:i]), tail[i:]


def unique_bases(sizes: Iterable[tuple[int, int | None]]) -> list[str]:
    """One new base per (size, vsize), unique as `mx.maildir.unique_name` makes them, with
    `,S=<size>` (and `,W=<vsize>` when known); strictly ascending in arrival order even
    when the clock stands still or steps back."""
    out: list[str] = []
    prev = (-1, -1)
    for size, vsize in sizes:
        sec, usec, rest = _split_time(unique_name(size))
        if (sec, usec) <= prev:
            sec, usec = prev[0], prev[1] + 1
            if usec >= 1_000_000:
                sec, usec = sec + 1, 0
        prev = (sec, usec)
        out.append(f"{sec}.M{usec}{rest}" + (f",W={vsize}" if vsize is not None else ""))
    return out


def _error(what: str, e: OSError) -> StoreError:
    return StoreError(f"{what}: {e.strerror or e}")


def _set_times(fd: int, atime_ns: int, mtime_ns: int) -> None:
    os.utime(fd, ns=(atime_ns, mtime_ns))


def stage_message(folder: Path, data: bytes, flags: frozenset[str], internaldate: float | None) -> Staged:
    """tmp/<base> with `data`, its atime and mtime set to `internaldate`, fsynced and closed;
    its final name is cur/<base>:2,<flags> (published by `publish_into`)."""
    base = unique_bases([(len(data), None)])[0]
    tmp = folder / "tmp" / base
    try:
        staged = stage(tmp, folder / "cur" / info_name(base, flags), [data])
        staged.exclusive = True
        if internaldate is not None:
            ns = round(internaldate * 1e9)
            try:
                _set_times(staged.fd, ns, ns)  # type: ignore[arg-type]
            except BaseException:
                discard([staged])
                raise
        sync([staged])
    except OSError as e:
        raise _error(f"cannot write {tmp}", e) from None
    return staged


def stage_copy(source: Path, folder: Path, base: str, flags: frozenset[str]) -> Staged:
    """`source` as tmp/<base> in `folder`: a hard link, else a byte copy with the source's
    times (left open: `sync` fsyncs it). `FileNotFoundError` when the source is gone;
    `StoreError` for anything else."""
    tmp = folder / "tmp" / base
    final = folder / "cur" / info_name(base, flags)
    try:
        os.link(source, tmp)
        return Staged(tmp, final, exclusive=True)
    except FileNotFoundError:
        if not os.path.lexists(source):
            raise
        raise StoreError(f"cannot copy into {folder}: no tmp/") from None
    except OSError as e:
        if e.errno not in _NO_LINK:
            raise _error(f"cannot link {source} into {tmp}", e) from None
    try:  # another file system (or no hard links there): copy the bytes
        st = os.stat(source)
        staged = stage(tmp, final, [source])
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _error(f"cannot copy {source} into {tmp}", e) from None
    staged.exclusive = True
    try:
        _set_times(staged.fd, st.st_atime_ns, st.st_mtime_ns)  # type: ignore[arg-type]
    except OSError as e:
        discard([staged])
        raise _error(f"cannot set the times of {tmp}", e) from None
    return staged


def sync_copies(staged: Sequence[Staged]) -> None:
    """fsync the byte copies among `staged` (hard links need none); on error remove all."""
    try:
        sync(staged)
    except OSError as e:
        raise _error("cannot write a copy", e) from None


def publish_into(staged: Sequence[Staged], cur: Path) -> None:
    """Link every staged file into cur/ (never replacing a name), drop its tmp/ name and
    fsync cur/ once; on any failure everything is removed again and `StoreError` raised."""
    if not staged:
        return
    try:
        publish(staged)
        fsync_dir(cur)
    except OSError as e:
        discard(staged)
        raise _error(f"cannot publish into {cur}", e) from None


def forget(staged: Sequence[Staged], cur: Path) -> None:
    """Undo a write whose UIDs could not be given: remove its names, then fsync cur/
    (best effort: the caller is already failing)."""
    published = any(s.published for s in staged)
    discard(staged)
    if published:
        try:
            fsync_dir(cur)
        except OSError:
            pass


class KeywordMap:
    """Source keyword letters -> destination letters, by name; cached for one copy."""

    def __init__(self, source: Keywords, dest: Keywords, *, same: bool, log: Callable[[str], None]) -> None:
        self._source, self._dest, self._same, self._log = source, dest, same, log
        self._letters: dict[str, str | None] = {}

    def flags(self, flags: frozenset[str]) -> frozenset[str]:
        if self._same or not any("a" <= c <= "z" for c in flags):
            return flags
        out = set()
        for c in flags:
            if not "a" <= c <= "z":
                out.add(c)
                continue
            if c not in self._letters:
                self._letters[c] = self._lookup(c)
            mapped = self._letters[c]
            if mapped is not None:
                out.add(mapped)
        return frozenset(out)

    def _lookup(self, letter: str) -> str | None:
        name = self._source.name(letter)
        if name is None:
            return None  # a letter its own folder does not name: no keyword to carry
        try:
            return self._dest.letter(name, create=True)
        except (StoreError, ValueError) as e:
            self._log(f"keyword {name!r} not copied: {e}")
            return None
