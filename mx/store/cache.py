"""Parsed message structures kept between sessions: ENVELOPE, BODY and BODYSTRUCTURE answers.

A FETCH of ENVELOPE or BODYSTRUCTURE would otherwise open and scan every message each
time; with this cache a warm FETCH reads one file per folder. Blocking file I/O, called from
the read pool; one `StructureCache` belongs to one session (not shared between threads).

Invariants:
- The cache lives under `<data_dir>/cache/<domain>/<local>/`, never in the Maildir: several
  hosts sharing a mail store each keep their own, and Dovecot never sees it.
- It is only a cache: a lost, torn or foreign file is rebuilt, never trusted beyond what
  parses; a file made for another UIDVALIDITY is ignored. Nothing is fsynced.
- Messages never change once stored (RFC 3501 §2.3: a UID names fixed content), so an entry
  is valid for as long as its UID exists under the same UIDVALIDITY.
- Records are appended (`flush`); the file is rewritten (to a temporary name, then renamed)
  only at `load` when more than half of it belongs to UIDs no longer present.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

__all__ = ["StructureCache", "ITEMS"]

ITEMS = ("ENVELOPE", "BODY", "BODYSTRUCTURE")
_KIND = {name: i for i, name in enumerate(ITEMS, 1)}
_NAME = {i: name for name, i in _KIND.items()}
_MAGIC = b"MXSC1 "
_RECORD = struct.Struct("<IBI")  # uid, kind, length; then the value
_MAX_VALUE = 16 * 1024 * 1024


class StructureCache:
    """uid -> {item: answer bytes} for one folder at one UIDVALIDITY."""

    def __init__(self, path: Path, uidvalidity: int) -> None:
        self.path = path
        self.uidvalidity = uidvalidity
        self.entries: dict[int, dict[str, bytes]] = {}
        self._pending: list[bytes] = []
        self._loaded = False
        self._fresh_file = False  # the file must start with our header on the next flush

    def load(self, live: Iterable[int]) -> None:
        """Read the file (once); entries of UIDs not in `live` are dropped."""
        if self._loaded:
            return
        self._loaded = True
        live_set = set(live)
        try:
            raw = self.path.read_bytes()
        except OSError:
            self._fresh_file = True
            return
        header = _MAGIC + str(self.uidvalidity).encode() + b"\n"
        if not raw.startswith(header):
            self._fresh_file = True
            return
        pos, end = len(header), len(raw)
        total = kept = 0
        while pos + _RECORD.size <= end:
            uid, kind, length = _RECORD.unpack_from(raw, pos)
            start = pos + _RECORD.size
            if kind not in _NAME or length > _MAX_VALUE or start + length > end:
                break  # a torn or foreign tail: what parsed so far stands
            total += 1
            if uid in live_set:
                self.entries.setdefault(uid, {})[_NAME[kind]] = raw[start : start + length]
                kept += 1
            pos = start + length
        if pos != end or total > 2 * kept + 64:
            self._rewrite()

    def get(self, uid: int) -> dict[str, bytes] | None:
        return self.entries.get(uid)

    def put(self, uid: int, item: str, value: bytes) -> None:
        self.entries.setdefault(uid, {})[item] = value
        self._pending.append(_RECORD.pack(uid, _KIND[item], len(value)) + value)

    def flush(self) -> None:
        """Append what was added since the last flush; a failure only loses cache."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if self._fresh_file:
                self._fresh_file = False
                self._rewrite()
                return
            with open(self.path, "ab") as fh:
                fh.write(b"".join(pending))
        except OSError:
            pass

    def _rewrite(self) -> None:
        out = [_MAGIC + str(self.uidvalidity).encode() + b"\n"]
        for uid, items in self.entries.items():
            for name, value in items.items():
                out.append(_RECORD.pack(uid, _KIND[name], len(value)) + value)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(tmp, "wb") as fh:
                fh.write(b"".join(out))
            os.replace(tmp, self.path)
            self._pending.clear()
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
