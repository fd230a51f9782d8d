"""One user's Maildir++ tree: INBOX at the root, folders as `.Name` beside cur/ new/ tmp/.

Folder names use "." as the hierarchy separator ("Lists.mx" is `.Lists.mx/`), and every
component is modified UTF-7 on disk (RFC 3501 §5.1.3), as Dovecot's Maildir++ layout has it.

Invariants:
- A name maps to exactly one directory directly inside the root; names that could step out
  or collide ("", "." components, "/", NUL, control characters, a leading "~") are refused
  with `StoreError` before any file system call.
- "INBOX" (any case) is the root itself and is always listed first.
- A created folder has cur/ new/ tmp/ and Dovecot's `maildirfolder` marker file.
- `subscriptions` is Dovecot's file at the root: version 2 ("V\\t2" header, components
  separated by TAB, tab-escaped) is kept as version 2; a version 1 file (one name per line)
  or a new one is written as version 1, exactly as Dovecot's `subscription-file.c` does.
  It is rewritten only under its dot-lock.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mx.store import utf7
from mx.store.dotlock import DotLock
from mx.store.errors import StoreError
from mx.store.folder import Folder, clean_tmp

__all__ = ["Mailbox", "SEPARATOR", "folder_dir_name", "sweep_tmp"]

SEPARATOR = "."
SUBSCRIPTIONS_FILE = "subscriptions"
_V2_HEADER = "V\t2\n\n"


def _check_name(name: str) -> list[str]:
    parts = name.split(SEPARATOR)
    for part in parts:
        if not part or "/" in part or "\0" in part or any(ord(c) < 0x20 or ord(c) == 0x7F for c in part):
            raise StoreError(f"bad folder name {name!r}")
    if name.startswith("~") or len(name) > 255:
        raise StoreError(f"bad folder name {name!r}")
    return parts


def folder_dir_name(name: str) -> str:
    """".Sent", ".a.b", ".&AMk-t&AOk-" for "Sent", "a.b", "Été"."""
    return SEPARATOR + SEPARATOR.join(utf7.encode(p) for p in _check_name(name))


def _is_inbox(name: str) -> bool:
    return name.upper() == "INBOX"


class Mailbox:
    """A user's folders; `root` is `<data_dir>/mail/<domain>/<local>/` (the INBOX)."""

    def __init__(self, root: Path, *, log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self._log = log

    def path_of(self, name: str) -> Path:
        return self.root if _is_inbox(name) else self.root / folder_dir_name(name)

    def inbox(self, *, take_new: bool = False) -> Folder:
        return Folder.open(self.root, take_new=take_new, log=self._log)

    def folder(self, name: str, *, take_new: bool = False) -> Folder:
        """Open an existing folder; `StoreError` if there is none of that name."""
        return Folder.open(self.path_of(name), take_new=take_new, log=self._log)

    def exists(self, name: str) -> bool:
        return self.path_of(name).is_dir()

    def list_folders(self) -> list[str]:
        """"INBOX" and every `.Name` directory, decoded, sorted; undecodable names skipped."""
        names: list[str] = []
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return ["INBOX"]
        except OSError as e:
            raise StoreError(f"{self.root}: {e.strerror}") from None
        for entry in entries:
            n = entry.name
            if len(n) < 2 or n[0] != SEPARATOR or n == ".." or not entry.is_dir():
                continue
            try:
                names.append(SEPARATOR.join(utf7.decode(p) for p in n[1:].split(SEPARATOR)))
            except ValueError:
                continue
        return ["INBOX", *sorted(names)]

    def create(self, name: str) -> None:
        """Make the folder (cur/ new/ tmp/ and `maildirfolder`); `StoreError` if it exists."""
        if _is_inbox(name):
            raise StoreError("INBOX always exists")
        path = self.path_of(name)
        try:
            os.makedirs(self.root, 0o700, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            raise StoreError(f"folder {name!r} already exists") from None
        except OSError as e:
            raise StoreError(f"cannot create folder {name!r}: {e.strerror}") from None
        for sub in ("tmp", "new", "cur"):
            os.mkdir(path / sub, 0o700)
        with open(path / "maildirfolder", "wb"):
            pass

    def clean_tmp(self, older_than: float = 36 * 3600) -> int:
        """`clean_tmp` on INBOX and every folder; the number of files removed."""
        total = clean_tmp(self.root, older_than)
        for name in self.list_folders()[1:]:
            total += clean_tmp(self.path_of(name), older_than)
        return total

    # -- subscriptions -------------------------------------------------------------------

    def _read_subscriptions(self) -> tuple[int, list[str]]:
        path = self.root / SUBSCRIPTIONS_FILE
        try:
            text = path.read_bytes().decode("utf-8", "surrogateescape")
        except FileNotFoundError:
            return 1, []
        except OSError as e:
            raise StoreError(f"{path}: {e.strerror}") from None
        if text.startswith(_V2_HEADER):
            lines = text[len(_V2_HEADER) :].split("\n")
            return 2, [SEPARATOR.join(_tab_unescape(p) for p in ln.split("\t")) for ln in lines if ln]
        return 1, [ln for ln in text.split("\n") if ln]

    def subscriptions(self) -> list[str]:
        """Subscribed names, in file order, without duplicates."""
        return list(dict.fromkeys(self._read_subscriptions()[1]))

    def subscribe(self, name: str) -> None:
        self._set_subscribed(name, True)

    def unsubscribe(self, name: str) -> None:
        self._set_subscribed(name, False)

    def _set_subscribed(self, name: str, on: bool) -> None:
        if _is_inbox(name):
            name = "INBOX"
        else:
            _check_name(name)
        os.makedirs(self.root, 0o700, exist_ok=True)
        with DotLock(self.root / SUBSCRIPTIONS_FILE) as lock:
            version, names = self._read_subscriptions()
            kept = [n for n in names if n != name]
            if on:
                kept = names if name in names else [*names, name]
            if kept == names:
                return
            if version == 2:
                body = _V2_HEADER + "".join(
                    "\t".join(_tab_escape(p) for p in n.split(SEPARATOR)) + "\n" for n in kept
                )
            else:
                body = "".join(n + "\n" for n in kept)
            lock.replace(body.encode("utf-8", "surrogateescape"))


_ESC = {"\x01": "\x011", "\t": "\x01t", "\r": "\x01r", "\n": "\x01n"}
_UNESC = {v[1]: k for k, v in _ESC.items()}


def _tab_escape(s: str) -> str:
    """Dovecot's `str_append_tabescaped`."""
    return "".join(_ESC.get(c, c) for c in s)


def _tab_unescape(s: str) -> str:
    if "\x01" not in s:
        return s
    out: list[str] = []
    i = 0
    while i < len(s):
        if s[i] == "\x01" and i + 1 < len(s):
            out.append(_UNESC.get(s[i + 1], s[i + 1]))
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def sweep_tmp(mail_root: Path, older_than: float = 36 * 3600) -> int:
    """`Mailbox.clean_tmp` for every user's Maildir under `<data_dir>/mail/<domain>/<local>/`
    (at start-up and daily, in a disk thread); a mailbox that fails is skipped, not fatal.
    Returns the number of stale files removed."""
    total = 0
    try:
        domains = [d for d in os.scandir(mail_root) if d.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return 0
    for domain in domains:
        try:
            users = [u for u in os.scandir(domain.path) if u.is_dir(follow_symlinks=False)]
        except OSError:
            continue
        for user in users:
            try:
                total += Mailbox(Path(user.path)).clean_tmp(older_than)
            except (StoreError, OSError):
                continue
    return total
