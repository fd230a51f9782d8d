"""`dovecot-uidlist`, version 3: the folder's permanent UID <-> file name map.

Format (Dovecot's `maildir-uidlist.c`; doc.dovecot.org "Maildir Mailbox Format"):

    3 V<uidvalidity> N<nextuid> G<128-bit mailbox GUID in hex> [other header fields]
    <uid> [<key><value> ...] :<file name base>

Record fields are single uppercase letters followed by a value (`S<size>`, `W<vsize>`,
`P<pop3 uidl>`, `O<pop3 order>`, `G<guid>`); the file name is the base, cut at the first ":".
Version 1 (Courier's `1 <uidvalidity> <nextuid>` then `<uid> <file name>`) is read too.

Invariants:
- Parsing never guesses a UID: records must have strictly increasing UIDs below 2**32-1,
  else the whole list is `UidListCorrupt` (the caller rebuilds it with a new UIDVALIDITY).
  A header without V or N, an unknown version, or an empty file is corrupt too.
- Damage confined to one record (a truncated last line without its newline, a line without
  ":", a base containing "/") drops only that record and marks the list `dirty` with a
  problem text; its message is then given a fresh UID, never an old one.
- `next_uid` is always greater than every UID in the list. A smaller N is no damage:
  Dovecot appends new records under the lock and rewrites the header (and N) only when it
  rewrites the whole file, so readers must take max(N, last UID + 1), as Dovecot does.
- A partial last line may be a Dovecot append in progress seen without the lock; it is
  dropped, and the list is re-read under the lock before anything is written.
- Unknown header fields and every record's fields are kept verbatim and written back;
  fields with a key that is not an uppercase letter are dropped, as Dovecot drops them.
- `format(parse(x))` is stable, and the list is only ever written through `DotLock.replace`.
"""

from __future__ import annotations

import operator
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from mx.store.errors import StoreError

__all__ = ["UIDLIST_FILE", "UidList", "UidListCorrupt", "parse", "format_list", "read", "new_uidvalidity"]

UIDLIST_FILE = "dovecot-uidlist"
_MAX_UID = 2**32 - 1


class UidListCorrupt(StoreError):
    """The list cannot be trusted as a whole; it must be rebuilt with a new UIDVALIDITY."""


@dataclass(slots=True)
class UidList:
    uidvalidity: int
    next_uid: int
    guid: str
    uids: dict[str, int] = field(default_factory=dict)  # base -> uid, ascending uid order
    fields: dict[str, str] = field(default_factory=dict)  # base -> "S123 W125" (only if any)
    header_extra: list[str] = field(default_factory=list)  # unknown header fields, verbatim
    problems: list[str] = field(default_factory=list)  # non-fatal damage found while parsing
    dirty: bool = False  # rewrite even if nothing else changes

    @classmethod
    def fresh(cls, previous_uidvalidity: int = 0) -> UidList:
        return cls(new_uidvalidity(previous_uidvalidity), 1, secrets.token_hex(16), dirty=True)

    def assign(self, base: str) -> int:
        uid = self.next_uid
        if uid >= _MAX_UID:
            raise StoreError("UID space exhausted; the folder needs a new UIDVALIDITY")
        self.uids[base] = uid
        self.next_uid = uid + 1
        return uid


def new_uidvalidity(previous: int = 0) -> int:
    """Dovecot uses the time; never the previous value again, and it fits 32 bits."""
    v = max(int(time.time()), previous + 1)
    return v if v < 2**32 else 1


def _header(line: str) -> tuple[int, int, str, list[str], int]:
    parts = line.split()
    if not parts:
        raise UidListCorrupt("empty header")
    version = parts[0]
    if version == "1":
        if len(parts) < 3 or not (parts[1].isdigit() and parts[2].isdigit()):
            raise UidListCorrupt(f"bad version 1 header {line[:80]!r}")
        return int(parts[1]), int(parts[2]), "", [], 1
    if version != "3":
        raise UidListCorrupt(f"unknown version {version[:20]!r}")
    v = n = None
    guid = ""
    extra: list[str] = []
    for tok in parts[1:]:
        key, value = tok[0], tok[1:]
        if key == "V" and value.isdigit():
            v = int(value)
        elif key == "N" and value.isdigit():
            n = int(value)
        elif key == "G" and len(value) == 32 and all(c in "0123456789abcdefABCDEF" for c in value):
            guid = value.lower()
        elif key in "VNG":
            raise UidListCorrupt(f"bad header field {tok[:40]!r}")
        else:
            extra.append(tok)
    if not v or n is None or not 0 < v < 2**32:
        raise UidListCorrupt(f"header without valid V and N: {line[:80]!r}")
    return v, n, guid, extra, 3


# A well-formed version 3 record: what Dovecot and mx write. The careful loop in `parse` is
# the reference; this is only its fast path for a file where every line matches.
_RECORD = re.compile(r"^([1-9][0-9]{0,9}) (?:([A-Z][^ \n]*(?: [A-Z][^ \n]*)*) )?:([^/\n:]+)$", re.M)


def _parse_fast(text: str) -> UidList | None:
    head, nl, body = text.partition("\n")
    if not nl or (body and body[-1] != "\n") or not head.startswith("3 "):
        return None
    simple = _split_simple(body)
    if simple is not None:  # every record "<uid> :<base>": no regex, no tuple per line
        heads, bases = simple
        recs = None
        uids = list(map(int, heads))
    else:
        recs = _RECORD.findall(body)
        if len(recs) != body.count("\n"):
            return None
        uids = [int(u) for u, _f, _b in recs]
        bases = [b for _u, _f, b in recs]
    if not all(map(operator.lt, uids, uids[1:])) or (uids and uids[-1] >= _MAX_UID):
        return None
    table = dict(zip(bases, uids))
    if len(table) != len(uids):
        return None
    v, n, guid, extra, _version = _header(head)
    if not guid:
        return None
    ul = UidList(v, max(n, uids[-1] + 1) if uids else n, guid, table,
                 {b: f for _u, f, b in recs if f} if recs is not None else {}, extra)
    return ul


def _split_simple(body: str) -> tuple[list[str], list[str]] | None:
    """(uids, bases) as text when every line of `body` is `<uid> :<base>` as `_RECORD`
    reads it without fields; None otherwise (then the regex decides). A base holds no
    ":", so " :" is each line's one separator: one replace and one split do every line."""
    toks = body.replace(" :", "\n").split("\n")
    lines = body.count("\n")
    if len(toks) != 2 * lines + 1 or toks[-1]:
        return None
    heads, bases = toks[0:-1:2], toks[1::2]
    digits = "".join(heads)
    if not (digits.isascii() and digits.isdigit()) or "" in heads or "" in bases:
        return None  # fields, or an empty uid or base
    joined = "\n" + "\n".join(heads)
    if "\n0" in joined or max(map(len, heads), default=0) > 10:
        return None  # a leading zero, or more digits than _RECORD takes
    names = "\n".join(bases)
    if "/" in names or ":" in names:
        return None
    return heads, bases


def parse(data: bytes) -> UidList:
    """A list from the file's bytes (file names decoded as `os.fsdecode` does)."""
    text = os.fsdecode(data)
    if not text:
        raise UidListCorrupt("empty file")
    fast = _parse_fast(text)
    if fast is not None:
        return fast
    lines = text.split("\n")
    truncated = lines.pop()  # "" when the file ends in a newline, as written
    if not lines:
        raise UidListCorrupt("no complete header line")
    v, n, guid, extra, version = _header(lines[0])
    ul = UidList(v, n, guid or secrets.token_hex(16), header_extra=extra, dirty=not guid or version != 3)
    uids, fields, problems = ul.uids, ul.fields, ul.problems
    prev = 0
    for lineno, line in enumerate(lines[1:], 2):
        uid_s, _, rest = line.partition(" ")
        if not uid_s.isdigit():
            if line.strip():
                problems.append(f"line {lineno}: no UID")
            continue
        uid = int(uid_s)
        if not prev < uid < _MAX_UID:
            raise UidListCorrupt(f"line {lineno}: UID {uid} out of order (after {prev})")
        prev = uid
        rest = rest.lstrip(" ")
        if version == 1:
            base, exts = rest, ""
        elif rest.startswith(":"):
            base, exts = rest[1:], ""
        else:
            i = rest.find(" :")
            if i < 0:
                problems.append(f"line {lineno}: no ':' before the file name")
                continue
            exts, base = rest[:i], rest[i + 2 :]
            toks = exts.split()
            kept = [t for t in toks if "A" <= t[0] <= "Z"]
            if len(kept) != len(toks):
                problems.append(f"line {lineno}: dropped bad fields")
            exts = " ".join(kept)
        base = base.split(":", 1)[0]
        if not base or "/" in base:
            problems.append(f"line {lineno}: bad file name")
            continue
        if base in uids:
            problems.append(f"line {lineno}: {base} listed twice; keeping UID {uid}")
            del uids[base]  # re-inserted below, keeping ascending order
        uids[base] = uid
        if exts:
            fields[base] = exts
        else:
            fields.pop(base, None)
    if truncated:
        problems.append(f"truncated last line dropped: {truncated[:60]!r}")
    if prev >= ul.next_uid:  # normal: Dovecot appends records and leaves the header's N
        ul.next_uid = prev + 1
    ul.dirty = ul.dirty or bool(problems)
    return ul


def format_list(ul: UidList) -> bytes:
    head = " ".join([f"3 V{ul.uidvalidity} N{ul.next_uid} G{ul.guid}", *ul.header_extra])
    fields = ul.fields
    lines = [head]
    lines.extend(
        f"{uid} {fields[base]} :{base}" if base in fields else f"{uid} :{base}"
        for base, uid in ul.uids.items()
    )
    lines.append("")
    return os.fsencode("\n".join(lines))


def read(path: Path) -> tuple[UidList | None, tuple[int, int, int] | None]:
    """The list at `path` (None if absent) and its (inode, size, mtime_ns) stamp.

    `UidListCorrupt` if it is unusable; `StoreError` if it cannot be read.
    """
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise StoreError(f"{path}: {e.strerror}") from None
    return parse(data), (st.st_ino, st.st_size, st.st_mtime_ns)
