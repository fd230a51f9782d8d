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
- DELETE renames the folder to Dovecot's `..DOVECOT-TRASHED` inside the root (or into it,
  under a unique name, when it exists), fsyncs the root, then removes that tree: the folder
  vanishes atomically and a crash leaves only the trash, which no listing shows (its name has
  an empty component) and the next delete removes. Children (".a.b" of "a") stay: Maildir++
  has no real parents, so "a" becomes a non-existent parent (`has_children`).
- RENAME renames the directory and each child's with `rename()`, so the uidlist (and its
  UIDVALIDITY) moves along, as Dovecot does; INBOX instead gives all its messages to a new
  folder and stays, empty, with its UIDVALIDITY (RFC 3501 §6.3.5). Neither DELETE nor
  RENAME touches `subscriptions` (RFC 3501 §6.3.4; Dovecot leaves them too).
- Special use (RFC 6154) is by name only (`SPECIAL_USE`), as Dovecot's default config marks
  `mailbox Sent { special_use = \\Sent }`.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from mx.durable import atomic_write, fsync_dir
from mx.store import utf7
from mx.store.dotlock import DotLock
from mx.store.errors import StoreError
from mx.store.flags import KEYWORDS_FILE
from mx.store.folder import Folder, clean_tmp

__all__ = ["Mailbox", "SEPARATOR", "SPECIAL_USE", "TRASH_DIR", "folder_dir_name", "sweep_tmp"]

SEPARATOR = "."
SUBSCRIPTIONS_FILE = "subscriptions"
TRASH_DIR = "..DOVECOT-TRASHED"  # Dovecot's MAILBOX_LIST_MAILDIR_TRASH_DIR_NAME, sep twice
_V2_HEADER = "V\t2\n\n"

# RFC 6154 attributes of the folders every user gets (`ensure_special_folders`).
SPECIAL_USE: dict[str, str] = {
    "Sent": "\\Sent",
    "Drafts": "\\Drafts",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
    "Archive": "\\Archive",
}


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

    def __init__(self, root: Path, *, log: Callable[[str], None] | None = None,
                 cache_dir: Path | None = None) -> None:
        self.root = Path(root)
        self._log = log
        # `<data_dir>/cache/<domain>/<local>`: the folders' saved tables (mx.store.tablecache)
        self.cache_dir = cache_dir

    def path_of(self, name: str) -> Path:
        return self.root if _is_inbox(name) else self.root / folder_dir_name(name)

    def cache_path(self, name: str, kind: str) -> Path | None:
        """Where a cache of folder `name` lives: `<cache_dir>/INBOX.<kind>` or
        `<cache_dir>/.<Folder>.<kind>` (its Maildir++ directory name); None without a cache_dir.
        Kinds: "table" (mx.store.tablecache), "imapcache" (mx.store.cache)."""
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{'INBOX' if _is_inbox(name) else folder_dir_name(name)}.{kind}"

    def inbox(self, *, take_new: bool = False) -> Folder:
        return self.folder("INBOX", take_new=take_new)

    def folder(self, name: str, *, take_new: bool = False) -> Folder:
        """Open an existing folder; `StoreError` if there is none of that name."""
        return Folder.open(self.path_of(name), take_new=take_new, log=self._log,
                           table_cache=self.cache_path(name, "table"))

    def exists(self, name: str) -> bool:
        return self.path_of(name).is_dir()

    def _scan(self) -> dict[str, str]:
        """{folder name: directory name} of every `.Name` directory (one scandir); names that
        do not decode, or have an empty component (`..DOVECOT-TRASHED`), are skipped."""
        found: dict[str, str] = {}
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return found
        except OSError as e:
            raise StoreError(f"{self.root}: {e.strerror}") from None
        for entry in entries:
            n = entry.name
            if len(n) < 2 or n[0] != SEPARATOR or not entry.is_dir():
                continue
            parts = n[1:].split(SEPARATOR)
            if "" in parts:
                continue
            try:
                found[SEPARATOR.join(utf7.decode(p) for p in parts)] = n
            except ValueError:
                continue
        return found

    def list_folders(self) -> list[str]:
        """"INBOX" and every `.Name` directory, decoded, sorted; undecodable names skipped."""
        return ["INBOX", *sorted(self._scan())]

    def has_children(self, name: str) -> bool:
        """Is there a folder below `name` ("a.b" for "a")? `name` itself need not exist
        (a Maildir++ parent is only implied). INBOX has none: Maildir++ folders are its
        siblings."""
        if _is_inbox(name):
            return False
        prefix = folder_dir_name(name) + SEPARATOR
        return any(d.startswith(prefix) for d in self._scan().values())

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
        try:
            for sub in ("tmp", "new", "cur"):
                os.mkdir(path / sub, 0o700)
            with open(path / "maildirfolder", "wb"):
                pass
            fsync_dir(path)
            fsync_dir(self.root)
        except OSError as e:
            raise StoreError(f"cannot create folder {name!r}: {e.strerror}") from None

    def delete(self, name: str) -> None:
        """Remove the folder and its messages; its children and its subscription stay
        (RFC 3501 §6.3.4). `StoreError` for INBOX or a folder that does not exist."""
        if _is_inbox(name):
            raise StoreError("INBOX cannot be deleted")  # RFC 3501 §6.3.4
        path = self.path_of(name)
        if not path.is_dir():
            raise StoreError(f"no folder {name!r}")
        trash = self.root / TRASH_DIR
        target = trash
        for _attempt in range(5):  # Dovecot's `mailbox_list_delete_maildir_via_trash`
            try:
                os.rename(path, target)
                break
            except FileNotFoundError:
                if not path.is_dir():
                    raise StoreError(f"no folder {name!r}") from None
                target = trash  # the trash was removed meanwhile
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or target != trash:
                    raise StoreError(f"cannot delete folder {name!r}: {e.strerror}") from None
                # A trash left by a crash or a delete in progress: go inside it.
                target = trash / f"{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(8)}"
        else:
            raise StoreError(f"cannot delete folder {name!r}: the trash keeps changing")
        try:
            fsync_dir(self.root)
        except OSError as e:
            raise StoreError(f"cannot delete folder {name!r}: {e.strerror}") from None
        self._remove_trash(trash)

    def _remove_trash(self, trash: Path) -> None:
        def failed(_func: object, path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
            if not isinstance(exc_info[1], FileNotFoundError):  # another delete is removing it too
                problems.append(f"{path}: {exc_info[1]}")

        problems: list[str] = []
        shutil.rmtree(trash, onerror=failed)  # onexc only from Python 3.12
        if problems and self._log is not None:
            self._log(f"{trash}: not all removed (the next delete retries): {problems[0]}")

    def rename(self, old: str, new: str) -> None:
        """RENAME `old` (and every folder below it) to `new`, keeping UIDs and UIDVALIDITY;
        INBOX's messages move into a new folder `new` instead (RFC 3501 §6.3.5).
        `StoreError` if `new` (or a child's new name) exists, `old` does not, or `new` is
        below `old`. Subscriptions are left as they are."""
        if _is_inbox(new):
            raise StoreError("INBOX already exists")
        new_dir = folder_dir_name(new)
        if _is_inbox(old):
            self._rename_inbox(new)
            return
        old_dir = folder_dir_name(old)
        if old_dir == new_dir:
            raise StoreError(f"folder {new!r} already exists")
        if new_dir.startswith(old_dir + SEPARATOR):
            raise StoreError(f"cannot rename {old!r} below itself")
        if not (self.root / old_dir).is_dir():
            raise StoreError(f"no folder {old!r}")
        moves = [(old_dir, new_dir)]
        try:
            entries = sorted(e.name for e in os.scandir(self.root) if e.is_dir())
        except OSError as e:
            raise StoreError(f"{self.root}: {e.strerror}") from None
        moves += [(d, new_dir + d[len(old_dir) :]) for d in entries if d.startswith(old_dir + SEPARATOR)]
        for _src, dst in moves:
            if os.path.lexists(self.root / dst):
                raise StoreError(f"folder {new!r} already exists" if dst == new_dir else f"{dst} already exists")
        failed: list[str] = []
        for src, dst in moves:
            try:
                os.rename(self.root / src, self.root / dst)
            except OSError as e:
                if src == old_dir:
                    raise StoreError(f"cannot rename {old!r}: {e.strerror}") from None
                failed.append(f"{src}: {e.strerror}")
        try:
            fsync_dir(self.root)
        except OSError as e:
            raise StoreError(f"cannot rename {old!r}: {e.strerror}") from None
        if failed:
            raise StoreError(f"renamed {old!r} but not all below it: {'; '.join(failed[:3])}")

    def _rename_inbox(self, new: str) -> None:
        """Create `new` and move every message of INBOX (new/ and cur/) into it; the
        keywords file goes first, so the letters in the moved names keep their meaning."""
        self.create(new)
        dest = self.path_of(new)
        try:
            keywords = (self.root / KEYWORDS_FILE).read_bytes()
        except FileNotFoundError:
            keywords = None
        except OSError as e:
            raise StoreError(f"{self.root / KEYWORDS_FILE}: {e.strerror}") from None
        try:
            if keywords is not None:
                atomic_write(dest / KEYWORDS_FILE, keywords)
            for sub in ("new", "cur"):  # new/ first: a file moving to cur/ meanwhile is seen there
                try:
                    names = os.listdir(self.root / sub)
                except FileNotFoundError:
                    continue
                for n in names:
                    if n[0] == ".":
                        continue
                    try:
                        os.rename(self.root / sub / n, dest / sub / n)
                    except FileNotFoundError:
                        continue  # expunged or moved meanwhile
            for d in (dest / "new", dest / "cur", self.root / "new", self.root / "cur"):
                fsync_dir(d)
        except OSError as e:
            raise StoreError(f"cannot move INBOX into {new!r}: {e.strerror}") from None
        Folder.open(dest, log=self._log)  # UIDs in the new folder, in arrival order

    def ensure_special_folders(self) -> list[str]:
        """Create and subscribe the `SPECIAL_USE` folders that are missing; the names
        created (none, at the cost of one scandir, when they all exist)."""
        existing = self._scan()
        created: list[str] = []
        for name in SPECIAL_USE:
            if name in existing:
                continue
            try:
                self.create(name)
            except StoreError:
                if self.exists(name):  # created by another session meanwhile
                    continue
                raise
            self.subscribe(name)
            created.append(name)
        return created

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
