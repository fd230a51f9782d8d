"""The users file: who may log in, and with which password (Dovecot passwd-file style).

One `address:{ARGON2ID}$argon2id$...` per line; `#` comments and blank lines are ignored, and
any further `:`-separated fields (Dovecot's uid:gid:...) are ignored too, so the same file can
be shared with a Dovecot.

Invariants:
- Pure: no Twisted. Keys are canonical addresses (`Address.canonical`).
- `UserDB` answers from memory; only `refresh()` (run in a thread pool) touches the file.
- `write_users` replaces the file atomically (temp file in the same folder, fsync, rename,
  fsync the folder), sorted, keeping an existing file's owner, group and mode (0600 for a
  new one): a reader sees the old or the new file, never half.
- `verify_password` never raises for bad input; a malformed or foreign hash is a mismatch.
- A user's local part is a safe Maildir folder name and carries no `+tag`, so the login
  address, the mailbox key and the folder name are one and the same string.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import argon2
import argon2.exceptions
import nacl.exceptions
import nacl.pwhash

from mx.address import AddressError, is_safe_mailbox_name, parse_address
from mx.durable import atomic_write

__all__ = [
    "SCHEME",
    "UserDB",
    "UsersError",
    "hash_password",
    "normalise_user",
    "read_users",
    "verify_password",
    "write_users",
]

SCHEME = "{ARGON2ID}"
_HEADER = "# mx users: address:{SCHEME}hash, one per line; managed with `mx user`\n"
_hasher = argon2.PasswordHasher()  # argon2-cffi's defaults follow RFC 9106's recommendations
# The hashes libsodium verifies (PyNaCl, already here for dkimpy's Ed25519): argon2id version
# 19 with a salt and tag of at least 8 and 16 bytes, at most 127 characters. Its AVX2 code
# takes ~80 ms of CPU for argon2-cffi's default parameters where argon2-cffi's bundled
# reference build takes 130-155 ms (one login's whole CPU; Dovecot verifies with libsodium
# too). Any other shape goes to argon2-cffi, so a failure of libsodium is always a mismatch.
_SODIUM_SHAPE = re.compile(rb"\$argon2id\$v=19\$m=[1-9][0-9]{0,9},t=[1-9][0-9]{0,9},p=[1-9][0-9]{0,5}"
                           rb"\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{22,}")
_SODIUM_MAX = 127


class UsersError(Exception):
    """The users file or an address given for it is unusable; `str()` is one line."""


def hash_password(password: str) -> str:
    """A fresh salted argon2id hash of `password`, with its scheme prefix."""
    return SCHEME + _hasher.hash(password)


def verify_password(stored: str, password: str) -> bool:
    """True if `password` matches `stored` (`{ARGON2ID}$argon2id$...`)."""
    if not isinstance(stored, str) or not isinstance(password, str):
        return False
    try:
        # Dovecot treats scheme names case-insensitively.
        if stored[: len(SCHEME)].upper() != SCHEME:
            return False
        encoded = stored[len(SCHEME) :]
        if not encoded.startswith("$argon2id$"):
            return False
        raw = encoded.encode("ascii")
        if len(raw) <= _SODIUM_MAX and _SODIUM_SHAPE.fullmatch(raw):
            return nacl.pwhash.verify(raw, password.encode("utf-8"))
        return _hasher.verify(encoded, password)
    except (argon2.exceptions.Argon2Error, argon2.exceptions.InvalidHashError, ValueError,
            nacl.exceptions.CryptoError, UnicodeError):
        return False


def normalise_user(address: str, local_domains: Iterable[str]) -> str:
    """The canonical form of a new user's address; `UsersError` if it cannot be a user."""
    try:
        parsed = parse_address(address)
    except AddressError as e:
        raise UsersError(f"{address!r} is not a valid address: {e}") from None
    local = parsed.local
    # The local part becomes <data_dir>/mail/<domain>/<local>/: no path tricks, no quoting,
    # and no '+' (plus-addressing would make it unreachable as user+tag@domain).
    if not is_safe_mailbox_name(local) or local.startswith(('"', "#")) or "+" in local:
        raise UsersError(f"{address!r}: the local part cannot be a mailbox name "
                         "(no leading '.', '#' or quotes; no '/', '\\' or '+')")
    if parsed.domain not in {d.lower() for d in local_domains}:
        raise UsersError(f"{address!r}: {parsed.domain} is not a local domain")
    return parsed.canonical


def read_users(path: Path) -> dict[str, str]:
    """Canonical address -> stored hash; a missing file has no users."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsersError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, colon, rest = line.partition(":")
        stored = rest.split(":", 1)[0]
        if not colon or not stored:
            raise UsersError(f"{path}: line {number}: expected address:{{SCHEME}}hash")
        try:
            canonical = parse_address(name).canonical
        except AddressError as e:
            raise UsersError(f"{path}: line {number}: {name!r}: {e}") from None
        users.setdefault(canonical, stored)  # like Dovecot, the first entry wins
    return users


def write_users(path: Path, users: Mapping[str, str]) -> None:
    """Replace the users file atomically with `users`, sorted; a new file is mode 0600, an
    existing one keeps its owner, group and mode (e.g. the mail user's, after a root-run
    `mx user add`, or a group a Dovecot reads it as)."""
    path = Path(path)
    lines = [_HEADER]
    for address, stored in sorted(users.items()):
        if any(c in address + stored for c in ":\n\r") or not address or not stored:
            raise UsersError(f"cannot store {address!r}: ':' or a line break in the entry")
        lines.append(f"{address}:{stored}\n")
    # Created 0600, so the hashes are never readable by others, even briefly.
    atomic_write(path, "".join(lines).encode("utf-8"), mode=0o600, keep_owner=True)


class UserDB:
    """The users file as the server sees it: an in-memory table, re-read when the file
    changes, so `mx user add` takes effect without a restart.

    `lookup`, `exists` and `users` answer from memory only (they run on the reactor thread,
    at every RCPT and AUTH). `refresh()` does the file work: one `os.stat`, and a re-read
    only if the file changed; the server runs it once a second in a thread pool (`tap`),
    tests and the CLI call it directly. If a changed file cannot be read, the previous table
    stays in force and `error` says why; it is retried at the next change.

    Thread safety: `refresh` replaces the table with one assignment; readers on another
    thread see the old table or the new one, never a mix.
    """

    RECHECK_INTERVAL = 1.0  # seconds between refreshes in the server

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.error: str | None = None
        self._users: dict[str, str] = {}
        self._signature: tuple[int, int, int] | None = None
        self._refresh(initial=True)

    def lookup(self, canonical: str) -> str | None:
        """The stored hash for `canonical`, or None if there is no such user (memory only)."""
        return self._users.get(canonical)

    def exists(self, canonical: str) -> bool:
        return canonical in self._users

    def users(self) -> frozenset[str]:
        return frozenset(self._users)

    def refresh(self) -> bool:
        """Re-read the file if it changed (blocking: call it in a thread); True if re-read."""
        return self._refresh(initial=False)

    def _refresh(self, initial: bool) -> bool:
        try:
            st = os.stat(self.path)
            # An atomic replace always changes the inode; mtime and size catch in-place edits.
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = None
        if signature == self._signature and not initial:
            return False
        try:
            users = read_users(self.path) if signature is not None else {}
        except UsersError as e:
            if initial:
                raise
            self.error = str(e)
            self._signature = signature  # do not re-read a broken file every second
            return False
        self._users, self._signature, self.error = users, signature, None
        return True
