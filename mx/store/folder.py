"""One Maildir folder as a session sees it: UIDs, flags and sizes, and what changed since.

Blocking file I/O, called from a disk thread; a `Folder` belongs to one session and its calls
are serialised by that session (it is not shared between threads).

Invariants:
- Opening or refreshing reads directory listings, `dovecot-uidlist` and nothing else: no
  message body is ever opened except by `open_message`. Sizes come from ",S=" in the name;
  only a name without it costs one `stat`.
- A message's identity is its base name (before the first ":"); its UID is the one the
  uidlist gives that base, so a rename by anyone (flags, new/ -> cur/, Dovecot) keeps it.
- New UIDs are handed out only under the uidlist dot-lock, after re-reading the list and
  re-listing new/ and cur/ inside the lock, in arrival order (Dovecot's order: time stamp in
  the name, then microseconds, then the name). Two processes therefore never give one UID to
  two messages, nor two UIDs to one message.
- A record is dropped from the list only when its file was absent from a listing of both
  directories whose mtimes did not move during the listing and are over two seconds old;
  otherwise it is kept (a record too many is harmless, a lost one would renumber a message).
- UIDVALIDITY changes only when the list is missing or `UidListCorrupt`; a rebuild is
  reported through `log`. A list rebuilt by another process shows up in `refresh()` as
  `Changes.uidvalidity_changed` with every old UID vanished.
- `refresh()` costs three `stat` calls when new/, cur/ and the uidlist are unchanged and were
  not modified within the last two seconds of the previous listing (coarse or cached mtimes
  then cannot hide a change); otherwise it re-lists.
- This object's own renames and removals in cur/ (`set_flags`, `set_flags_many`, `expunge`)
  do not make the next refreshes re-list (Dovecot's `dirty_cur_time`): the stamp after them is
  trusted for two seconds if the table was trusted before them, and new/ or the uidlist
  changing still re-lists at once. Another program's change to cur/ inside that window
  shows up at the first refresh after it, two seconds at most later; a message it removed
  meanwhile is `MessageGone` (and a re-listing) as ever.
- A file that vanished is `MessageGone` (after one re-listing finds no other name with its
  base); it is never an `OSError` escaping to the protocol.
- The table (`messages()`, `get()`) changes only in `open`/`refresh()` and by this object's own
  `set_flags`/`expunge`. `append` and `copy_into` write files and give them UIDs but leave
  the table alone: the next `refresh()` of any Folder on that directory (this one included)
  reports them in `Changes.new`, in UID order with whatever else arrived meanwhile, so a
  session announces EXISTS from `refresh()` alone and its sequence numbers never need a
  message inserted below one already announced. The returned UIDs are for UIDPLUS.
- \\Recent (RFC 3501 §2.3.2) is the session that moved a message new/ -> cur/
  (`take_recent()`); appended and copied messages go straight into cur/, so no refresh
  makes them recent: the writing session decides that itself.
- INTERNALDATE is the file's mtime, as Dovecot's Maildir has it.
"""

from __future__ import annotations

import gc
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, NamedTuple

from mx.durable import Staged
from mx.store import tablecache, uidlist, write
from mx.store.dotlock import DotLock
from mx.store.errors import MessageGone, StoreError
from mx.store.flags import EMPTY, Keywords, _flagset, check_flags, info_name, size_field, split_name

__all__ = ["MessageInfo", "Changes", "Folder", "clean_tmp", "arrival_key"]

Log = Callable[[str], None]
_QUIET_SECONDS = 2.0  # mtimes younger than this may hide a later change in the same tick
_QUIET_NS = int(_QUIET_SECONDS * 1e9)
_CUR, _NEW = "cur", "new"


class MessageInfo(NamedTuple):
    """One message as the folder last saw it. A named tuple, not a frozen dataclass: one is
    made per message on every listing, and a tuple is built in a third of the time."""

    uid: int
    base: str  # file name before ":2," (the dovecot-uidlist key)
    name: str  # current file name (no folder part)
    subdir: str  # "new" or "cur"
    size: int  # from ",S=" in the name, else from stat
    flags: frozenset[str]  # "D","F","P","R","S","T" and keyword letters "a".."z"
    vsize: int | None = None  # size with CRLF line ends, from ",W=" in the name (Dovecot)


@dataclass(frozen=True, slots=True)
class Changes:
    new: tuple[MessageInfo, ...]
    vanished: tuple[int, ...]
    flags: tuple[MessageInfo, ...]
    uidvalidity_changed: bool = False

    def __bool__(self) -> bool:
        return bool(self.new or self.vanished or self.flags or self.uidvalidity_changed)


_NO_CHANGES = Changes((), (), ())


def arrival_key(base: str) -> tuple[int, int, str]:
    """Dovecot's `maildir_filename_sort_cmp`: seconds, then "M<usec>" of the unique part."""
    i = 0
    n = len(base)
    while i < n and "0" <= base[i] <= "9":
        i += 1
    secs = int(base[:i]) if i else 0
    usecs = -1
    if i < n and base[i] == ".":
        end = base.find(".", i + 1)
        uniq = base[i + 1 : end if end >= 0 else n]
        m = uniq.find("M")
        if m >= 0:
            j = m + 1
            while j < len(uniq) and "0" <= uniq[j] <= "9":
                j += 1
            if j > m + 1:
                usecs = int(uniq[m + 1 : j])
    return secs, usecs, base


class _Listing:
    """Result of listing new/ then cur/: base -> (subdir, name), plus whether it was calm."""

    __slots__ = ("files", "calm", "stamp", "in_new")

    def __init__(self, files: dict[str, tuple[str, str]], calm: bool, stamp: tuple[int, int], in_new: int = 0) -> None:
        self.files, self.calm, self.stamp = files, calm, stamp
        self.in_new = in_new  # names listed in new/: none means take_new has nothing to move


class Folder:
    """A Maildir folder: `Folder.open(path)`, then `messages()`, `refresh()`, ..."""

    def __init__(self, path: Path, *, take_new: bool = False, log: Log | None = None,
                 table_cache: Path | None = None) -> None:
        self.path = path
        self._table_cache = table_cache  # see mx.store.tablecache
        self._where = os.fspath(path)
        self._dirs: dict[str, int] | None = None  # new/ and cur/ opened for a batch (`reading`)
        self.take_new = take_new
        self.uidvalidity = 0
        self.next_uid = 1
        self.guid = ""
        self._log: Log = log or (lambda line: None)
        self._by_uid: dict[int, MessageInfo] = {}
        self._fields: dict[int, str] = {}
        # The two tables are the shared snapshot's (see _reuse_shared): copied before the
        # first change, so a second session opening a big calm folder copies nothing.
        self._borrowed = False
        self._snapshot: tuple[int, int, tuple[int, int, int] | None] | None = None
        # Until when (time_ns) `_snapshot` holds if the stamp is unchanged; None: for good
        # (a calm listing). Set after our own changes (see `_own_change`).
        self._trust_until: int | None = None
        self._own_pending = False  # our own change since the stamp: take the next one as ours
        self._keywords: Keywords | None = None
        self._parsed: tuple[tuple[int, int, int], uidlist.UidList] | None = None  # see _read_list
        # Where each message of the table is (base -> (subdir, name)) and the parsed list the
        # table was built from: a re-listing after renames (ours or anyone's) is compared
        # with this in C, and only the names that differ are parsed again (see _rebuild).
        self._placed: dict[str, tuple[str, str]] | None = None
        self._placed_from: uidlist.UidList | None = None
        # The last listing of each subdir: (its names, base -> (subdir, name)); see _names_by_base.
        self._listed: dict[str, tuple[set[str], dict[str, tuple[str, str]]]] = {}
        self._recent: set[int] = set()
        # The UIDVALIDITY under which the last append/copy_into (into this folder) gave its
        # UIDs: `uidvalidity` unless the list was rebuilt meanwhile (refresh() then says so).
        self.assigned_uidvalidity = 0

    # -- opening and syncing ------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, take_new: bool = False, log: Log | None = None,
             table_cache: Path | None = None) -> Folder:
        """Scan new/ and cur/ (creating missing cur/ tmp/), sync dovecot-uidlist, read no body.

        take_new=True: files in new/ are moved to cur/ (name + ":2,") as the session sees them.
        table_cache: where this folder's table is kept between processes (mx.store.tablecache).
        """
        folder = cls(Path(path), take_new=take_new, log=log, table_cache=table_cache)
        folder._ensure_dirs()
        folder._sync()
        return folder

    def _ensure_dirs(self) -> None:
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: no such folder")
        for sub in (_NEW, _CUR, "tmp"):
            try:
                os.mkdir(self.path / sub, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"{self.path / sub}: {e.strerror}") from None

    def _dir_mtimes(self) -> tuple[int, int]:
        try:
            return os.stat(self.path / _NEW).st_mtime_ns, os.stat(self.path / _CUR).st_mtime_ns
        except FileNotFoundError:
            self._ensure_dirs()
            return os.stat(self.path / _NEW).st_mtime_ns, os.stat(self.path / _CUR).st_mtime_ns

    def _list(self) -> _Listing:
        """List new/ then cur/ (a file moving new -> cur meanwhile is seen in cur/)."""
        for _attempt in range(3):
            before = self._dir_mtimes()
            files: dict[str, tuple[str, str]] = {}
            in_new = 0
            maps = []
            for sub in (_NEW, _CUR):
                try:
                    names = os.listdir(self.path / sub)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise StoreError(f"{self.path / sub}: {e.strerror}") from None
                if sub == _NEW:
                    in_new = len(names)
                found = self._names_by_base(sub, names)
                if found:
                    maps.append(found)
            if len(maps) == 1:
                files = maps[0]  # shared, read-only (see _names_by_base): no copy
            else:
                for found in maps:  # new/ first: cur/ wins for a message moving meanwhile
                    files.update(found)
            after = self._dir_mtimes()
            if after == before:
                break
        now_ns = time.time_ns()
        calm = after == before and all(now_ns - m > _QUIET_SECONDS * 1e9 for m in after)
        return _Listing(files, calm, after, in_new)

    def _names_by_base(self, sub: str, names: list[str]) -> dict[str, tuple[str, str]]:
        """base -> (sub, name) of one listing of `sub`; dot files are not messages (Maildir).

        Worked out from the previous listing of `sub` when few names differ (set operations
        in C, then a Python step per changed name only): after a STORE of 1,000 flags in a
        folder of 10,000, parsing every name again was most of the refresh. The result is
        shared with later listings: callers never change it."""
        now = set(names)
        prev = self._listed.get(sub)
        if prev is not None:
            before, mapping = prev
            if now == before:
                return mapping
            gone, added = before - now, now - before
            if len(gone) + len(added) <= len(now) // 4:
                patched = self._patch_names(sub, mapping, gone, added)
                if patched is not None:
                    self._listed[sub] = (now, patched)
                    return patched
        mapping = {n.partition(":")[0]: (sub, n) for n in names if n[0] != "."}
        # Two names with one base (a rename seen half-way, or a stray copy): the mapping
        # kept one of them; the next listing is made in full again.
        if len(mapping) == len(names) or len(mapping) == len(names) - sum(1 for n in now if n[0] == "."):
            self._listed[sub] = (now, mapping)
        else:
            self._listed.pop(sub, None)
        return mapping

    @staticmethod
    def _patch_names(sub: str, mapping: dict[str, tuple[str, str]], gone: set[str],
                     added: set[str]) -> dict[str, tuple[str, str]] | None:
        out = dict(mapping)
        for n in gone:
            if n[0] != ".":
                del out[n.partition(":")[0]]  # one name per base in `mapping` (checked)
        for n in added:
            if n[0] == ".":
                continue
            base = n.partition(":")[0]
            if base in out:
                return None  # two names with one base: list in full
            out[base] = (sub, n)
        return out

    def _read_list(self, fresh: bool = False) -> tuple[uidlist.UidList | None, tuple[int, int, int] | None, str]:
        """(list, stamp, why unusable) — list None when missing or corrupt.

        The last list parsed is kept with its (inode, size, mtime) stamp: every rewrite
        replaces the file (a new inode), so an equal stamp is the same content, and a
        refresh after our own renames re-lists the folder without parsing the list again."""
        parsed = None if fresh else self._parsed
        if parsed is not None:
            try:
                st = os.stat(self.path / uidlist.UIDLIST_FILE)
            except OSError:
                st = None
            if st is not None and (st.st_ino, st.st_size, st.st_mtime_ns) == parsed[0] and not parsed[1].dirty:
                return parsed[1], parsed[0], ""
        try:
            ul, stamp = uidlist.read(self.path / uidlist.UIDLIST_FILE)
        except uidlist.UidListCorrupt as e:
            return None, None, str(e)
        self._parsed = (stamp, ul) if ul is not None and stamp is not None and not fresh else None
        return ul, stamp, "" if ul is not None else "missing"

    def _sync(self) -> Changes:
        # The cyclic GC would walk the growing table again and again while it is built (a
        # third of the time at 100,000 messages); nothing built here forms a cycle.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._sync_now()
        finally:
            if was_enabled:
                gc.enable()

    def _sync_now(self) -> Changes:
        cold = not self._by_uid and not self.uidvalidity
        if cold:
            reused = self._reuse_shared()
            if reused is not None:
                return reused
        listing = self._list()
        ul, ul_stamp, why = self._read_list()
        changes = None
        cached = False
        if cold and self._table_cache is not None and ul is not None and ul_stamp is not None and not ul.dirty:
            cached = self._load_cached(ul, ul_stamp)
        if ul is not None and ul is self._placed_from and self._placed is not None and not ul.dirty:
            # The table's own list: only renamed or removed names to look at (a new name
            # makes _patch give up, and the list may need new UIDs).
            changes = self._patch(ul, listing.files, self._placed)
        worth_saving = changes is None or (cached and len(changes.flags) + len(changes.vanished) > 1000)
        if changes is None:
            if ul is None or ul.dirty or not ul.uids.keys() >= listing.files.keys():
                ul, ul_stamp, listing = self._assign_locked()
            changes = self._rebuild(ul, listing)
        if cold and worth_saving and self._table_cache is not None and listing.calm and ul_stamp is not None:
            self._save_cached(ul_stamp)
        moved = self._take_new() if self.take_new and listing.in_new else 0
        self._distrust()
        if listing.calm and not moved:
            self._snapshot = (*listing.stamp, ul_stamp)
            _shared.publish(self.path, self._snapshot, self, listing.in_new)
        return changes

    def _load_cached(self, ul: uidlist.UidList, ul_stamp: tuple[int, int, int]) -> bool:
        """A cold open: take the table saved by an earlier one with this very list, if any
        (then `_patch` checks it against the listing); False if there is none usable. Built
        with C loops (map, zip, dict): no Python step per message."""
        assert self._table_cache is not None
        columns = tablecache.load(self._table_cache, ul_stamp, ul.uidvalidity)
        if columns is None:
            return False
        uids, bases, names, subs, sizes, letters, vsizes = columns
        if list(map(ul.uids.get, bases)) != uids:
            return False  # not this list's: ignore the file
        flagsets = {text: _flagset(text) for text in set(letters)}
        infos = map(partial(tuple.__new__, MessageInfo),
                    zip(uids, bases, names, subs, sizes, map(flagsets.__getitem__, letters), vsizes))
        table = dict(zip(uids, infos))
        self.uidvalidity, self.next_uid, self.guid = ul.uidvalidity, ul.next_uid, ul.guid
        self._by_uid, self._borrowed = table, False
        self._fields = {uid: f for b, f in ul.fields.items() if f and (uid := ul.uids.get(b)) in table}
        self._placed, self._placed_from = dict(zip(bases, zip(subs, names))), ul
        return True

    def _save_cached(self, ul_stamp: tuple[int, int, int]) -> None:
        assert self._table_cache is not None
        tablecache.save_later(self._table_cache, ul_stamp, self.uidvalidity, list(self._by_uid.values()))

    def _reuse_shared(self) -> Changes | None:
        """A first open of a calm folder that another Folder of this process listed at the
        same stamp: its table, without listing (the same rule `refresh` trusts)."""
        stamp = self._stamp_now()
        found = _shared.get(self.path, stamp)
        if found is None:
            return None
        table, fields, self.uidvalidity, self.next_uid, self.guid, in_new = found
        self._by_uid, self._fields, self._borrowed = table, fields, True
        self._placed = None  # the first re-listing rebuilds in full
        self._distrust()
        self._snapshot = stamp
        if self.take_new and in_new and self._take_new():
            self._distrust()
        return Changes(tuple(table.values()), (), ())

    def _assign_locked(
        self, publish: Callable[[], None] | None = None
    ) -> tuple[uidlist.UidList, tuple[int, int, int] | None, _Listing]:
        """Under the dot-lock: re-read, re-list, give new files UIDs, rewrite if changed.

        `publish` runs first inside the lock (our own files entering cur/), so nobody lists
        them before we give them their UIDs."""
        target = self.path / uidlist.UIDLIST_FILE
        with DotLock(target, mode=_file_mode(self.path)) as lock:
            if publish is not None:
                publish()
            ul, _stamp, why = self._read_list(fresh=True)  # under the lock: from disk, then changed
            if ul is None:
                previous = self.uidvalidity
                if why != "missing":
                    try:
                        previous = max(previous, _salvage_uidvalidity(target))
                    except OSError:
                        pass
                ul = uidlist.UidList.fresh(previous)
                if why != "missing" or previous:
                    self._log(
                        f"{target}: {why}; rebuilt with new UIDVALIDITY {ul.uidvalidity}"
                        " (clients will download the folder again)"
                    )
            elif ul.problems:
                self._log(f"{target}: repaired: {'; '.join(ul.problems[:5])}")
            listing = self._list()
            files = listing.files
            changed = ul.dirty
            fresh = sorted((b for b in files if b not in ul.uids), key=arrival_key)
            for base in fresh:
                ul.assign(base)
            changed = changed or bool(fresh)
            if listing.calm:
                gone = [b for b in ul.uids if b not in files]
                for b in gone:
                    del ul.uids[b]
                    ul.fields.pop(b, None)
                changed = changed or bool(gone)
            if changed:
                lock.replace(uidlist.format_list(ul))
        stamp = None
        try:
            st = os.stat(target)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            pass
        ul.dirty = False
        return ul, stamp, listing

    def _rebuild(self, ul: uidlist.UidList, listing: _Listing) -> Changes:
        """Replace the message table from a list and a listing; report what changed."""
        old = self._by_uid
        validity_changed = bool(self.uidvalidity) and ul.uidvalidity != self.uidvalidity
        if validity_changed:
            old = {}
        self.uidvalidity, self.next_uid, self.guid = ul.uidvalidity, ul.next_uid, ul.guid
        files = listing.files
        table: dict[int, MessageInfo] = {}
        fields: dict[int, str] = {}
        placed: dict[str, tuple[str, str]] = {}
        new: list[MessageInfo] = []
        reflagged: list[MessageInfo] = []
        make_info = self._make_info
        for base, uid in ul.uids.items():
            found = files.get(base)
            if found is None:
                continue
            sub, name = found
            prev = old.get(uid)
            if prev is not None and prev.name == name and prev.subdir == sub:
                info: MessageInfo | None = prev
            else:
                info = make_info(uid, sub, name)
                if info is None:
                    continue
                if prev is None:
                    new.append(info)
                elif prev.flags != info.flags:
                    reflagged.append(info)
            table[uid] = info  # type: ignore[assignment]
            placed[base] = found
            f = ul.fields.get(base)
            if f:
                fields[uid] = f
        vanished = tuple(uid for uid in self._by_uid if uid not in table or validity_changed)
        self._by_uid, self._fields, self._borrowed = table, fields, False
        self._placed, self._placed_from = placed, ul
        return Changes(tuple(new), vanished, tuple(reflagged), validity_changed)

    def _patch(self, ul: uidlist.UidList, files: dict[str, tuple[str, str]],
               placed: dict[str, tuple[str, str]]) -> Changes | None:
        """`_rebuild` when the list is the one the table came from: the listing is compared
        with where the table has each message (dict and set operations in C), and only the
        renamed or removed names are looked at. After a STORE of 1,000 flags in a folder of
        10,000 this is ~3x quicker than parsing every name again. None: a name the table
        does not have (a new file), so it needs the full rebuild, which keeps UID order."""
        if files == placed:
            return _NO_CHANGES
        moved = files.items() - placed.items()
        if any(base not in placed for base, _where in moved):
            return None
        self._own_tables()
        table, uids = self._by_uid, ul.uids
        reflagged: list[MessageInfo] = []
        vanished: list[int] = []
        for base, (sub, name) in moved:
            prev = table[uids[base]]
            info = self._info_from(prev, sub, name)  # the same base: the same sizes
            self._place(info)
            if prev.flags != info.flags:
                reflagged.append(info)
        for base in placed.keys() - files.keys():
            uid = uids[base]
            vanished.append(uid)
            self._forget(table[uid])
        reflagged.sort()
        vanished.sort()
        return Changes((), tuple(vanished), tuple(reflagged))

    def _own_tables(self) -> None:
        """Before changing the tables in place: stop sharing them (see `_borrowed`)."""
        if self._borrowed:
            self._by_uid, self._fields, self._borrowed = dict(self._by_uid), dict(self._fields), False

    def _place(self, info: MessageInfo) -> None:
        """Put a message's current info in the table (and where it is in `_placed`)."""
        if self._borrowed:
            self._own_tables()
        self._by_uid[info.uid] = info
        if self._placed is not None:
            self._placed[info.base] = (info.subdir, info.name)

    def _forget(self, info: MessageInfo) -> None:
        if self._borrowed:
            self._own_tables()
        self._by_uid.pop(info.uid, None)
        self._fields.pop(info.uid, None)
        if self._placed is not None:
            self._placed.pop(info.base, None)

    def _make_info(self, uid: int, sub: str, name: str) -> MessageInfo | None:
        # split_name and size_field inlined: this runs once per message on every open.
        i = name.find(":")
        if i < 0:
            base, flags = name, EMPTY
        else:
            base = name[:i]
            flags = _flagset(name[i + 3 :]) if name.startswith("2,", i + 1) else EMPTY
        size = vsize = None
        j = base.find(",S=")
        tail = base[j + 3 :] if j >= 0 else ""
        if tail.isascii() and tail.isdigit():  # "...,S=4096"
            size = int(tail)
            if ",W=" in base:  # before ",S=" (Dovecot writes it after)
                vsize = size_field(base, "W")
        elif j >= 0 and (parts := tail.partition(",W="))[1] and parts[0].isdigit() and parts[2].isdigit() \
                and tail.isascii():  # "...,S=4096,W=4160": mx's and Dovecot's names, in one split
            size, vsize = int(parts[0]), int(parts[2])
        elif j >= 0:
            end = base.find(",", j + 3)
            digits = base[j + 3 :] if end < 0 else base[j + 3 : end]
            if digits.isdigit() and digits.isascii():
                size = int(digits)
            if ",W=" in base:
                vsize = size_field(base, "W")
        elif ",W=" in base:
            vsize = size_field(base, "W")
        if size is None:
            try:
                st = os.stat(self.path / sub / name)
            except FileNotFoundError:
                return None  # vanished since the listing
            if not stat.S_ISREG(st.st_mode):
                return None
            size = st.st_size
        return MessageInfo(uid, base, name, sub, size, flags, vsize)

    def _take_new(self) -> int:
        moved = 0
        for uid, info in list(self._by_uid.items()):
            if info.subdir == _NEW:
                name = info.name if ":" in info.name else info.name + ":2,"
                try:
                    os.rename(self.path / _NEW / info.name, self.path / _CUR / name)
                except FileNotFoundError:
                    found = self._find(info.base)
                    if found is None:
                        continue  # expunged meanwhile; refresh() reports it
                    self._place(self._info_from(info, *found))
                    continue
                except OSError as e:
                    raise StoreError(f"cannot move {info.name} into cur/: {e.strerror}") from None
                self._place(self._info_from(info, _CUR, name))
                self._recent.add(uid)
                moved += 1
        return moved

    @staticmethod
    def _info_from(info: MessageInfo, sub: str, name: str) -> MessageInfo:
        _base, flags = split_name(name)
        return MessageInfo(info.uid, info.base, name, sub, info.size, flags, info.vsize)

    def _find(self, base: str) -> tuple[str, str] | None:
        """Where the file with this base is now (cur/ wins), by listing; None if nowhere."""
        hit: tuple[str, str] | None = None
        for sub in (_NEW, _CUR):
            try:
                names = os.listdir(self.path / sub)
            except OSError:
                continue
            for name in names:
                if name == base or (name.startswith(base) and name[len(base)] == ":"):
                    hit = (sub, name)
        return hit

    # -- the session's view ------------------------------------------------------------

    def messages(self) -> list[MessageInfo]:
        """Every message present at the last open/refresh, sorted by UID."""
        return list(self._by_uid.values())

    def table(self) -> dict[int, MessageInfo]:
        """A copy of the view, UID -> info, in UID order (one C-level dict copy)."""
        return dict(self._by_uid)

    def get(self, uid: int) -> MessageInfo | None:
        return self._by_uid.get(uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    def _stamp_now(self) -> tuple[int, int, tuple[int, int, int] | None]:
        try:
            st = os.stat(self.path / uidlist.UIDLIST_FILE)
            ul_stamp: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            ul_stamp = None
        return (*self._dir_mtimes(), ul_stamp)

    def refresh(self) -> Changes:
        """New, vanished and re-flagged messages since the last look; cheap if none."""
        snapshot = self._snapshot
        if snapshot is not None:
            stamp = self._stamp_now()
            if self._own_pending:
                self._own_pending = False
                # cur/ moved by our own renames; new/ or the list moving is someone else.
                if stamp[0] == snapshot[0] and stamp[2] == snapshot[2]:
                    self._snapshot = stamp
                    self._trust_until = time.time_ns() + _QUIET_NS
                    return _NO_CHANGES
            elif stamp == snapshot and (self._trust_until is None or time.time_ns() < self._trust_until):
                return _NO_CHANGES
        return self._sync()

    def trust_left(self) -> float | None:
        """Seconds until the window after our own changes ends (see the module notes): a
        change another program made inside it may show only at a refresh after that.
        None: not in such a window."""
        if self._trust_until is None and not self._own_pending:
            return None
        if self._own_pending:
            return _QUIET_SECONDS
        left = (self._trust_until - time.time_ns()) / 1e9  # type: ignore[operator]
        return left if left > 0 else None

    def _distrust(self) -> None:
        """The next refresh re-lists."""
        self._snapshot, self._trust_until, self._own_pending = None, None, False

    def _own_change(self, subdir: str) -> None:
        """After our own rename or removal of a file that was in `subdir`: in cur/, if the
        table was trusted up to it, the next refresh trusts the stamp it finds for
        `_QUIET_SECONDS` (see the module notes); in new/ (new/ changed too), it re-lists."""
        if subdir == _CUR and self._snapshot is not None and (
                self._trust_until is None or time.time_ns() < self._trust_until):
            self._own_pending = True
        else:
            self._distrust()

    def uidl(self, uid: int) -> str:
        """Dovecot's POP3 UIDL: a "P" field in the uidlist wins (migrated mail; empty = the
        base name), else the default `%08Xu%08Xv`."""
        f = self._fields.get(uid)
        if f:
            for tok in f.split():
                if tok[0] == "P":
                    if len(tok) > 1:
                        return tok[1:]
                    info = self._by_uid.get(uid)
                    if info is not None:
                        return info.base
        # Dovecot 2.3 prints its %08Xu%08Xv in lower-case hex (seen from a real Dovecot).
        return f"{uid:08x}{self.uidvalidity:08x}"

    def fields(self, uid: int) -> dict[str, str]:
        """The uidlist's extension fields for a message (key letter -> value), e.g. "W"."""
        f = self._fields.get(uid, "")
        return {tok[0]: tok[1:] for tok in f.split()}

    # -- reading and changing messages -------------------------------------------------

    def _current(self, uid: int) -> MessageInfo:
        info = self._by_uid.get(uid)
        if info is None:
            raise MessageGone(f"{self.path}: no message with UID {uid}")
        return info

    def _relocate(self, info: MessageInfo) -> MessageInfo:
        found = self._find(info.base)
        if found is None:
            self._forget(info)
            self._distrust()  # let refresh() report it as vanished
            raise MessageGone(f"{self.path}: message {info.uid} ({info.base}) is gone")
        moved = self._info_from(info, *found)
        self._place(moved)
        return moved

    def open_message(self, uid: int) -> BinaryIO:
        """The message file, opened for reading; follows a rename; `MessageGone` if gone."""
        return os.fdopen(self.open_message_fd(uid)[0], "rb")

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around one trip's many message reads: `new/` and `cur/` are opened once and each
        file by its name in them, so the kernel does not walk the folder's path again per
        message (~10 % of an open + read + close of a 4 KiB message at eight path
        components). One thread at a time, as every use of a Folder; not nested."""
        dirs: dict[str, int] = {}
        for sub in (_NEW, _CUR):
            try:
                dirs[sub] = os.open(f"{self._where}/{sub}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                pass  # that one is opened by path, as without this
        self._dirs = dirs
        try:
            yield
        finally:
            self._dirs = None
            for fd in dirs.values():
                os.close(fd)

    def open_message_fd(self, uid: int) -> tuple[int, int]:
        """(raw fd, size from the name) of the message file, as `open_message` opens it. For
        the read paths that read a message whole in one `os.read` (a file object costs
        more than the read of a 4 KiB message); the caller closes the fd."""
        info = self._current(uid)
        dirs = self._dirs
        for _attempt in range(3):
            try:
                if dirs is not None and (at := dirs.get(info.subdir)) is not None:
                    return os.open(info.name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=at), info.size
                # str paths: pathlib's joins cost more than the open at 10,000 messages
                return os.open(f"{self._where}/{info.subdir}/{info.name}", os.O_RDONLY | os.O_CLOEXEC), info.size
            except FileNotFoundError:
                info = self._relocate(info)
            except OSError as e:
                raise StoreError(f"{self.path / info.subdir / info.name}: {e.strerror}") from None
        raise MessageGone(f"{self.path}: message {uid} keeps moving")

    def set_flags(self, uid: int, flags: Iterable[str]) -> MessageInfo:
        """Give a message exactly these flags: one atomic rename into cur/."""
        wanted = check_flags(flags)
        info = self._current(uid)
        for _attempt in range(3):
            name = info_name(info.base, wanted)
            if info.subdir == _CUR and info.name == name:
                return info
            try:
                os.rename(f"{self._where}/{info.subdir}/{info.name}", f"{self._where}/{_CUR}/{name}")
            except FileNotFoundError:
                info = self._relocate(info)
                continue
            except OSError as e:
                raise StoreError(f"cannot rename {info.name}: {e.strerror}") from None
            self._own_change(info.subdir)
            updated = self._info_from(info, _CUR, name)
            self._place(updated)
            return updated
        raise MessageGone(f"{self.path}: message {uid} keeps moving")

    def set_flags_many(self, wanted: Iterable[tuple[int, frozenset[str]]]) -> list[MessageInfo]:
        """`set_flags` for many messages (STORE 1:1000): the new name's flag part is made once
        per distinct flag set, and only a rename that fails takes `set_flags`' careful path.
        Returns the new info of each message renamed; unknown or vanished UIDs are skipped."""
        updated: list[MessageInfo] = []
        suffix: dict[frozenset[str], tuple[str, frozenset[str]]] = {}
        self._own_tables()
        table, where = self._by_uid, self._where
        for uid, flags in wanted:
            info = table.get(uid)
            if info is None:
                continue
            made = suffix.get(flags)
            if made is None:
                checked = check_flags(flags)
                made = suffix[flags] = (":2," + "".join(sorted(checked)), checked)
            tail, flags = made
            name = info.base + tail
            if info.subdir == _CUR and info.name == name:
                continue
            try:
                os.rename(f"{where}/{info.subdir}/{info.name}", f"{where}/{_CUR}/{name}")
            except OSError:
                try:  # moved by someone else, or an error to report: the one-message path
                    updated.append(self.set_flags(uid, flags))
                except MessageGone:
                    pass
                continue
            self._own_change(info.subdir)
            new = MessageInfo(uid, info.base, name, _CUR, info.size, flags, info.vsize)
            self._place(new)
            updated.append(new)
        return updated

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Unlink these messages; returns the UIDs this call removed (not already gone)."""
        removed: list[int] = []
        for uid in uids:
            info = self._by_uid.get(uid)
            if info is None:
                continue
            for _attempt in range(3):
                try:
                    os.unlink(f"{self._where}/{info.subdir}/{info.name}")
                except FileNotFoundError:
                    try:
                        info = self._relocate(info)
                    except MessageGone:
                        break
                    continue
                except OSError as e:
                    raise StoreError(f"cannot remove {info.name}: {e.strerror}") from None
                removed.append(uid)
                self._own_change(info.subdir)
                break
            self._forget(info)
        return removed

    # -- IMAP: dates, \\Recent, APPEND and COPY -------------------------------------------

    def internaldate(self, uid: int) -> float:
        """INTERNALDATE: the file's mtime (follows a rename; `MessageGone` if gone)."""
        info = self._current(uid)
        for _attempt in range(3):
            try:
                return os.stat(f"{self._where}/{info.subdir}/{info.name}").st_mtime
            except FileNotFoundError:
                info = self._relocate(info)
            except OSError as e:
                raise StoreError(f"{self.path / info.subdir / info.name}: {e.strerror}") from None
        raise MessageGone(f"{self.path}: message {uid} keeps moving")

    def internaldates(self, uids: Iterable[int]) -> dict[int, float]:
        """`internaldate` of each; messages that are gone are left out."""
        out: dict[int, float] = {}
        for uid in uids:
            try:
                out[uid] = self.internaldate(uid)
            except MessageGone:
                continue
        return out

    def take_recent(self) -> set[int]:
        """The UIDs this object moved from new/ to cur/ (take_new=True) since the last call:
        RFC 3501 \\Recent for the session that saw them first."""
        recent, self._recent = self._recent, set()
        return recent

    def in_new(self, uid: int) -> bool:
        """Is the message still in new/ (as of the last refresh)? \\Recent for EXAMINE."""
        info = self._by_uid.get(uid)
        return info is not None and info.subdir == _NEW

    def append(self, data: bytes, letters: Iterable[str] = (), internaldate: float | None = None) -> MessageInfo:
        """APPEND: a new message with these flags and INTERNALDATE (file mtime), durable
        before its UID is given; `StoreError` leaves nothing behind. The table is not
        changed: the next `refresh()` reports the message as new."""
        flags = check_flags(letters)
        self._ensure_dirs()
        staged = write.stage_message(self.path, data, flags, internaldate)
        uids = self._publish_and_assign([staged])
        base, name = staged.final.name.split(":", 1)[0], staged.final.name
        uid = uids.get(base)
        if uid is None:  # removed by someone else before we could list it
            raise MessageGone(f"{self.path}: appended message {base} vanished at once")
        return MessageInfo(uid, base, name, _CUR, len(data), flags)

    def copy_into(self, uids: Sequence[int], dest: Folder) -> list[tuple[int, int]]:
        """COPY: each message (in this order) as a new file in `dest` with the same bytes,
        flags (keywords re-mapped by name) and mtime: hard links where possible. Returns
        (source UID, dest UID) for the messages that still existed; `dest`'s table, like
        this one's, is not changed (its next `refresh()` reports the copies)."""
        dest._ensure_dirs()
        keymap = write.KeywordMap(self.keywords, dest.keywords, same=dest.path == self.path, log=self._log)
        infos = [info for info in map(self._by_uid.get, uids) if info is not None]
        bases = write.unique_bases((info.size, info.vsize) for info in infos)
        staged: list[Staged] = []
        copied: list[int] = []
        try:
            for info, base in zip(infos, bases):
                s = self._stage_copy(info, dest.path, base, keymap)
                if s is not None:
                    staged.append(s)
                    copied.append(info.uid)
            write.sync_copies(staged)
        except BaseException:
            write.forget(staged, dest.path / _CUR)
            raise
        if not staged:
            return []
        given = dest._publish_and_assign(staged)
        pairs = []
        for uid, s in zip(copied, staged):
            new_uid = given.get(s.final.name.split(":", 1)[0])
            if new_uid is not None:
                pairs.append((uid, new_uid))
        return pairs

    def _stage_copy(self, info: MessageInfo, dest: Path, base: str, keymap: write.KeywordMap) -> Staged | None:
        for _attempt in range(3):
            try:  # the flags of the name found: a rename by anyone is a flag change
                return write.stage_copy(self.path / info.subdir / info.name, dest, base, keymap.flags(info.flags))
            except FileNotFoundError:
                try:
                    info = self._relocate(info)
                except MessageGone:
                    return None
        return None

    def _publish_and_assign(self, staged: list[Staged]) -> dict[str, int]:
        """Publish into cur/ and give UIDs, both under the uidlist lock; base -> UID."""
        cur = self.path / _CUR
        try:
            ul, _stamp, _listing = self._assign_locked(lambda: write.publish_into(staged, cur))
        except BaseException:
            write.forget(staged, cur)
            raise
        self._distrust()
        self.assigned_uidvalidity = ul.uidvalidity
        return ul.uids

    # -- keywords ------------------------------------------------------------------------

    @property
    def keywords(self) -> Keywords:
        """The folder's `dovecot-keywords` table (letters "a".."z" <-> names)."""
        if self._keywords is None:
            self._keywords = Keywords(self.path)
        else:
            self._keywords.reload()
        return self._keywords


class _SharedTables:
    """The last calm table of the most recently listed folders, for every Folder of the
    process: a second session opening a big unchanged folder copies a dict instead of
    listing 100,000 names. Entries are immutable snapshots (MessageInfo is frozen)."""

    MAX = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_path: dict[Path, tuple[tuple[object, ...], tuple[dict[int, MessageInfo], dict[int, str], int, int, str, int]]] = {}

    def get(self, path: Path, stamp: tuple[object, ...]) -> tuple[dict[int, MessageInfo], dict[int, str], int, int, str, int] | None:
        with self._lock:
            entry = self._by_path.get(path)
        if entry is None or entry[0] != stamp:
            return None
        return entry[1]

    def publish(self, path: Path, stamp: tuple[object, ...], folder: Folder, in_new: int) -> None:
        with self._lock:
            entry = self._by_path.get(path)
            if entry is not None and entry[0] == stamp:
                return
        value = (dict(folder._by_uid), dict(folder._fields), folder.uidvalidity, folder.next_uid, folder.guid, in_new)
        with self._lock:
            self._by_path.pop(path, None)
            self._by_path[path] = (stamp, value)
            while len(self._by_path) > self.MAX:
                self._by_path.pop(next(iter(self._by_path)))


_shared = _SharedTables()


def _file_mode(folder: Path) -> int:
    """State files get the folder's permissions without execute bits (as Dovecot does)."""
    try:
        return (os.stat(folder).st_mode & 0o666) | 0o600
    except OSError:
        return 0o600


def _salvage_uidvalidity(path: Path) -> int:
    """A number the damaged list's UIDVALIDITY cannot exceed, so the new one differs.

    Its V field if readable, else the file's mtime (a list is written after its
    UIDVALIDITY is chosen, which is the time or less, so a rebuild within the same
    second still gets a new value).
    """
    with open(path, "rb") as f:
        mtime = int(os.fstat(f.fileno()).st_mtime)
        head = f.read(200).split(b"\n", 1)[0]
    for tok in head.split():
        if tok[:1] == b"V" and tok[1:].isdigit():
            return max(int(tok[1:]), mtime)
    return mtime


def clean_tmp(maildir: Path, older_than: float = 36 * 3600, *, now: float | None = None) -> int:
    """Remove files in `maildir/tmp/` untouched (atime and mtime) for `older_than` seconds.

    The Maildir specification's 36 hours; returns how many were removed.
    """
    limit = (time.time() if now is None else now) - older_than
    removed = 0
    tmp = maildir / "tmp"
    try:
        entries = list(os.scandir(tmp))
    except FileNotFoundError:
        return 0
    except OSError as e:
        raise StoreError(f"{tmp}: {e.strerror}") from None
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and max(st.st_atime, st.st_mtime) < limit:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
