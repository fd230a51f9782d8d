"""Message flags in Maildir file names, and the folder's `dovecot-keywords` file.

A file name is `<base>[:2,<letters>]`: the base (everything before the first ":") is the
message's identity, the letters after ":2," its flags in ASCII order (Maildir spec: "D" draft,
"F" flagged, "P" passed, "R" replied, "S" seen, "T" trashed; Dovecot: "a".."z" are keywords
numbered 0..25 in `dovecot-keywords`).

Invariants:
- `split_name` never fails: an info part other than "2," (e.g. ":1,", or none) gives no flags,
  and characters that are not ASCII letters are ignored.
- `info_name` writes letters sorted (uppercase before lowercase, as Dovecot writes them).
- Flag sets are interned: equal sets from different names are the same object (memory).
- `dovecot-keywords` is Dovecot's format, one `<index> <name>` per line; it is rewritten only
  under its dot-lock (`dovecot-keywords.lock`), by replacing the file, and an index once given
  to a name is never reused for another name while the file exists.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path

from mx.store.dotlock import DotLock
from mx.store.errors import StoreError

__all__ = [
    "SYSTEM_LETTERS",
    "KEYWORD_LETTERS",
    "EMPTY",
    "split_name",
    "info_name",
    "check_flags",
    "size_field",
    "Keywords",
    "KEYWORDS_FILE",
]

SYSTEM_LETTERS = "DFPRST"
KEYWORD_LETTERS = string.ascii_lowercase  # index 0..25
KEYWORDS_FILE = "dovecot-keywords"
EMPTY: frozenset[str] = frozenset()
_LETTERS = frozenset(string.ascii_letters)
_interned: dict[str, frozenset[str]] = {"": EMPTY}
_canonical: dict[frozenset[str], frozenset[str]] = {EMPTY: EMPTY}


def _flagset(letters: str) -> frozenset[str]:
    fs = _interned.get(letters)
    if fs is None:
        fresh = frozenset(c for c in letters if c in _LETTERS)
        if len(_interned) >= 4096:  # bounded: other programs choose the names
            return _canonical.get(fresh, fresh)
        fs = _interned[letters] = _canonical.setdefault(fresh, fresh)
    return fs


def split_name(name: str) -> tuple[str, frozenset[str]]:
    """`(base, flags)` of a Maildir file name."""
    i = name.find(":")
    if i < 0:
        return name, EMPTY
    if name.startswith("2,", i + 1):
        return name[:i], _flagset(name[i + 3 :])
    return name[:i], EMPTY


def check_flags(flags: Iterable[str]) -> frozenset[str]:
    """The flags as a set of single ASCII letters (the shared instance of that set, as names
    are parsed into); `ValueError` for anything else."""
    fs = frozenset(flags)
    bad = [f for f in fs if f not in _LETTERS]
    if bad:
        raise ValueError(f"flags must be single ASCII letters, not {sorted(bad)!r}")
    return _flagset("".join(sorted(fs)))


def info_name(base: str, flags: frozenset[str]) -> str:
    """`<base>:2,<sorted letters>`, the name a message has in cur/ with these flags."""
    return f"{base}:2,{''.join(sorted(flags))}"


def size_field(base: str, key: str) -> int | None:
    """The number after `,<key>=` in a base name (Dovecot: S = file size, W = CRLF size)."""
    i = base.find("," + key + "=")
    if i < 0:
        return None
    end = base.find(",", i + 3)
    digits = base[i + 3 :] if end < 0 else base[i + 3 : end]
    return int(digits) if digits.isascii() and digits.isdigit() else None


class Keywords:
    """One folder's keyword table: letter ("a".."z") <-> keyword name."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / KEYWORDS_FILE
        self._names: dict[int, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def reload(self) -> None:
        """Re-read the file if it changed (or vanished) since the last read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._names, self._stamp = {}, None
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._names = _parse_keywords(self.path)
            self._stamp = stamp

    def mapping(self) -> dict[str, str]:
        """letter -> keyword name."""
        return {KEYWORD_LETTERS[i]: name for i, name in sorted(self._names.items())}

    def name(self, letter: str) -> str | None:
        i = KEYWORD_LETTERS.find(letter) if len(letter) == 1 else -1
        return self._names.get(i) if i >= 0 else None

    def letter(self, name: str, *, create: bool = False) -> str | None:
        """The letter for keyword `name` (case-insensitive); with `create`, allot one."""
        found = self._find(name)
        if found is not None or not create:
            return found
        if not name or any(c in name for c in " \t\r\n\0"):
            raise ValueError(f"bad keyword name {name!r}")
        with DotLock(self.path) as lock:
            self._names = _parse_keywords(self.path) if self.path.exists() else {}
            found = self._find(name)
            if found is not None:
                return found
            free = [i for i in range(len(KEYWORD_LETTERS)) if i not in self._names]
            if not free:
                raise StoreError(f"{self.path}: all {len(KEYWORD_LETTERS)} keyword letters in use")
            self._names[free[0]] = name
            body = "".join(f"{i} {n}\n" for i, n in sorted(self._names.items()))
            lock.replace(body.encode("utf-8", "surrogateescape"))
        self._stamp = None
        self.reload()
        return KEYWORD_LETTERS[free[0]]

    def _find(self, name: str) -> str | None:
        folded = name.casefold()
        for i, n in self._names.items():
            if n == name or n.casefold() == folded:
                return KEYWORD_LETTERS[i]
        return None


def _parse_keywords(path: Path) -> dict[int, str]:
    """Lines `<index> <name>`; bad lines and indexes past "z" are skipped (Dovecot does)."""
    try:
        text = path.read_bytes().decode("utf-8", "surrogateescape")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise StoreError(f"{path}: {e.strerror}") from None
    names: dict[int, str] = {}
    for line in text.splitlines():
        idx, _, name = line.partition(" ")
        if idx.isdigit() and name and int(idx) < len(KEYWORD_LETTERS):
            names.setdefault(int(idx), name)
    return names
