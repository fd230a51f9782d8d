"""The store work of IMAP commands: what runs in the read pool, one call per trip.

Each function takes the session's store objects (`Mailbox`, `Folder`, the `View`) and does
blocking file I/O only: no Twisted, no responses written here (FETCH and SEARCH return bytes
or UIDs for the session to send). The session calls them through its `DeferredLock`, so a
`Folder` is used by one thread at a time.

Invariants:
- Nothing here reads a message file unless the command needs its octets: SELECT, STATUS,
  STORE, COPY, EXPUNGE and FETCH of FLAGS / UID / RFC822.SIZE / INTERNALDATE (a `stat`) never
  do; FETCH of ENVELOPE / BODY / BODYSTRUCTURE reads a file only on a cache miss.
- A message that vanished is skipped (reported as `missing`), never an exception.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import chain
from typing import Any

from mx import mime
from mx.imap import fetch, search
from mx.imap.selected import View, imap_flags, letters_for
from mx.store import Folder, Mailbox, MessageGone
from mx.store.cache import StructureCache
from mx.store.flags import check_flags

__all__ = ["Failed", "bad", "no"]


class Failed(Exception):
    """A command's tagged NO or BAD; with `bye`, a `* BYE bye` follows and the session ends."""

    def __init__(self, status: str, text: str, code: Any = None, bye: str | None = None) -> None:
        super().__init__(text)
        self.status, self.text, self.code, self.bye = status, text, code, bye


def bad(text: str) -> Failed:
    return Failed("BAD", text)


def no(text: str, code: Any = None) -> Failed:
    return Failed("NO", text, code)


@dataclass(slots=True)
class Candidate:
    """A message as `mx.imap.search.matches` reads it."""

    seq: int
    uid: int
    flags: frozenset[str]
    size: int
    internaldate: float | None = None
    data: bytes | None = None
    root: mime.Part | None = None


# -- the session -------------------------------------------------------------------------


def folders_and_subscriptions(mailbox: Mailbox) -> tuple[list[str], list[str]]:
    return mailbox.list_folders(), mailbox.subscriptions()


# -- authenticated state --------------------------------------------------


def open_folder(mailbox: Mailbox, name: str, read_only: bool) -> tuple[Folder, set[int], dict[str, str]]:
    folder = mailbox.folder(name, take_new=not read_only)
    if read_only:
        recent = {i.uid for i in folder.messages() if i.subdir == "new"}
    else:
        recent = folder.take_recent()
    return folder, recent, folder.keywords.mapping()


def select_folder(mailbox: Mailbox, name: str, read_only: bool) -> tuple[Folder, set[int], dict[str, str]]:
    """SELECT / EXAMINE in one trip: `open_folder`, NONEXISTENT if there is no such folder."""
    if not mailbox.exists(name):
        raise no("Mailbox does not exist", "NONEXISTENT")
    return open_folder(mailbox, name, read_only)


def refresh(folder: Folder) -> tuple[Any, set[int], dict[str, str]]:
    changes = folder.refresh()
    recent = folder.take_recent() if folder.take_new else set()
    return changes, recent, folder.keywords.mapping() if changes else {}


def folder_status(mailbox: Mailbox, name: str) -> dict[str, int]:
    folder = mailbox.folder(name)
    infos = folder.messages()
    return {
        "MESSAGES": len(infos),
        "RECENT": sum(1 for i in infos if i.subdir == "new"),
        "UIDNEXT": folder.next_uid,
        "UIDVALIDITY": folder.uidvalidity,
        "UNSEEN": sum(1 for i in infos if "S" not in i.flags),
    }


def read_message(folder: Folder, uid: int) -> bytes:
    fd, size = folder.open_message_fd(uid)
    try:
        # One read of the size the name gives, plus one octet to see the end of file (a
        # read of a regular file is short only at its end); a name whose size is too small
        # costs a few more reads, never a wrong answer.
        data = os.read(fd, size + 1)
        if len(data) <= size:
            return data
        chunks = [data]
        while True:
            more = os.read(fd, 1 << 20)
            if not more:
                return b"".join(chunks)
            chunks.append(more)
    finally:
        os.close(fd)


def append_message(mailbox: Mailbox, name: str, data: bytes, flags: list[str], date: float | None) -> tuple[int, int]:
    if not mailbox.exists(name):
        raise no("Mailbox does not exist", "TRYCREATE")
    folder = mailbox.folder(name)
    letters = letters_for(flags, lambda k: folder.keywords.letter(k, create=True))
    info = folder.append(data, sorted(letters), date)
    return folder.assigned_uidvalidity, info.uid


# -- selected state -----------------------------


_NAME_ONLY = frozenset({"UID", "FLAGS", "RFC822.SIZE"})


def _fetch_names_only(view: View, pairs: list[tuple[int, int]], plan: fetch.FetchPlan) -> bytes:
    """FETCH of UID / FLAGS / RFC822.SIZE only (what clients sync with): one `%` format per
    message, from a template made once per distinct flag set (the flags written into it);
    the same bytes `fetch.render` makes."""
    names = _FlagNames(view)
    info_of, recent = view.info, view.recent
    items = plan.items
    wants_size = "RFC822.SIZE" in items
    wants_uid = "UID" in items
    # The numbers in the order the items come: seq, then uid and/or size.
    uid_first = not wants_size or not wants_uid or items.index("UID") < items.index("RFC822.SIZE")
    templates: dict[tuple[frozenset[str], bool], bytes] = {}

    def template(key: tuple[frozenset[str], bool]) -> bytes:
        parts = []
        for item in items:
            if item == "UID":
                parts.append(b"UID %d")
            elif item == "FLAGS":
                flags = " ".join(names.list(*key)).encode().replace(b"%", b"%%")
                parts.append(b"FLAGS (" + flags + b")")
            else:
                parts.append(b"RFC822.SIZE %d")
        made = templates[key] = b"* %d FETCH (" + b" ".join(parts) + b")\r\n"
        return made

    out: list[bytes] = []
    append = out.append
    for seq, uid in pairs:
        info = info_of.get(uid)
        if info is None:
            continue
        key = (info.flags, uid in recent)
        tmpl = templates.get(key) or template(key)
        if wants_size:
            size = info.vsize or info.size
            if wants_uid:
                append(tmpl % ((seq, uid, size) if uid_first else (seq, size, uid)))
            else:
                append(tmpl % (seq, size))
        elif wants_uid:
            append(tmpl % (seq, uid))
        else:
            append(tmpl % seq)
    return b"".join(out)


def names_only(plan: fetch.FetchPlan) -> bool:
    """Whether a FETCH is answered from the view alone (UID, FLAGS, RFC822.SIZE): no file,
    no store call; `fetch_batch` may then run on the reactor thread."""
    return not plan.needs_file and not plan.needs_date and all(i in _NAME_ONLY for i in plan.items)


def fetch_batch(folder: Folder, view: View, pairs: list[tuple[int, int]], plan: fetch.FetchPlan,
                 seen: bool, cache: StructureCache | None) -> tuple[bytes, list[Any], bool]:
    if names_only(plan):
        return _fetch_names_only(view, pairs, plan), [], False
    with folder.reading() if plan.needs_file else nullcontext():
        return _fetch_batch(folder, view, pairs, plan, seen, cache)


def _fetch_batch(folder: Folder, view: View, pairs: list[tuple[int, int]], plan: fetch.FetchPlan,
                 seen: bool, cache: StructureCache | None) -> tuple[bytes, list[Any], bool]:
    out: list[bytes] = []
    updated = []
    missing = False
    dates = folder.internaldates([u for _s, u in pairs]) if plan.needs_date else {}
    info_of = view.info
    recent = view.recent
    wanted = plan.structures
    header_only = wanted == ("ENVELOPE",) and not plan.sections
    names = _FlagNames(view)
    if cache is not None and wanted:
        cache.load(view.uids)
    else:
        cache = None
    for seq, uid in pairs:
        info = info_of.get(uid)
        if info is None:
            continue
        data = root = None
        cached = cache.get(uid) if cache is not None else None
        if plan.needs_file and (plan.sections or cached is None or any(i not in cached for i in wanted)):
            try:
                # ENVELOPE alone needs only the header: read and scan that much.
                data = read_header(folder, uid) if header_only else read_message(folder, uid)
            except MessageGone:
                missing = True
                continue
            if header_only:  # ENVELOPE reads the header's fields by offset: no scan needed
                root = mime.Part("", offset=0, header_size=len(data), body_offset=len(data))
            else:
                root = mime.scan(data) if plan.tree else None
            if cache is not None:
                for item in wanted:
                    if cached is None or item not in cached:
                        cache.put(uid, item, fetch.structure(data, root, item))
                cached = cache.get(uid)
        changed = False
        if seen and "S" not in info.flags:
            try:
                info = folder.set_flags(uid, info.flags | {"S"})
            except MessageGone:
                missing = True
                continue
            updated.append(info)
            changed = True
        flags = names.list(info.flags, uid in recent)
        fetch.render_into(out, seq, plan, uid=uid, flags=flags, size=info.vsize or info.size,
                          internaldate=dates.get(uid), data=data, root=root, flags_changed=changed, cached=cached,
                          crlf_clean=info.vsize == info.size)
    if cache is not None:
        cache.flush()
    return b"".join(out), updated, missing


def store_flags(folder: Folder, uids: list[int], op: str, names: list[str]) -> tuple[list[Any], dict[str, str]]:
    kw = folder.keywords
    letters = letters_for(names, lambda k: kw.letter(k, create=True) or "")
    known = set("DFRST") | set(kw.mapping())
    # The new set per distinct old set (a folder has a handful; letter sets are interned).
    new_of: dict[frozenset[str], frozenset[str] | None] = {}
    wanted = []
    for uid in uids:
        info = folder.get(uid)
        if info is None:
            continue
        old = info.flags
        if old not in new_of:
            if op == "FLAGS":
                new = letters | {c for c in old if c not in known}  # "P" and unnamed letters stay
            elif op == "+FLAGS":
                new = old | letters
            else:
                new = old - letters
            new_of[old] = None if new == old else check_flags(new)
        new_flags = new_of[old]
        if new_flags is not None:
            wanted.append((uid, new_flags))
    return folder.set_flags_many(wanted), kw.mapping()


def copy_messages(mailbox: Mailbox, folder: Folder, uids: list[int], name: str,
          move: bool) -> tuple[list[tuple[int, int]], int, list[int]]:
    if not mailbox.exists(name):
        raise no("Mailbox does not exist", "TRYCREATE")
    dest = mailbox.folder(name)
    pairs = folder.copy_into(uids, dest) if uids else []
    removed = folder.expunge([s for s, _d in pairs]) if move and pairs else []
    return pairs, dest.assigned_uidvalidity if pairs else dest.uidvalidity, removed


_FLAG_ONLY = frozenset({"AND", "OR", "NOT", "ALL", "NEW", "KEYWORD", "UNKEYWORD"}) | frozenset(
    k for k in ("ANSWERED", "DELETED", "DRAFT", "FLAGGED", "RECENT", "SEEN", "OLD", "UNANSWERED", "UNDELETED",
                "UNDRAFT", "UNFLAGGED", "UNSEEN"))


def _flags_decide(key: search.Key) -> bool:
    """Whether the answer depends on a message's flags (and \\Recent) alone."""
    return key.name in _FLAG_ONLY and all(_flags_decide(k) for k in key.keys)


def flags_decide(query: search.Query) -> bool:
    """Whether the view's flags (and \\Recent) alone answer `query`: no file, no date."""
    return _flags_decide(query.key)


def search_flags(view: View, query: search.Query) -> list[tuple[int, int]]:
    """A query `flags_decide` accepts, answered from the view alone (no store call)."""
    return _search_flags(view, _FlagNames(view), query.test)


def run_search(folder: Folder, view: View, query: search.Query) -> list[tuple[int, int]]:
    """(seq, uid) of the messages the query matches, in ascending order."""
    reads = query.need >= search.Need.HEADER and not _flags_decide(query.key)
    with folder.reading() if reads else nullcontext():
        return _run_search(folder, view, query)


def _run_search(folder: Folder, view: View, query: search.Query) -> list[tuple[int, int]]:
    need = query.need
    hits: list[tuple[int, int]] = []
    max_seq = len(view.uids)
    max_uid = view.uids[-1] if view.uids else 0
    dates = folder.internaldates(list(view.uids)) if query.dated else {}
    names = _FlagNames(view)
    info_of, recent = view.info, view.recent
    test = query.test
    if _flags_decide(query.key):
        return _search_flags(view, names, test)
    for seq, uid in enumerate(view.uids, 1):
        info = info_of[uid]
        c = Candidate(seq, uid, names.set(info.flags, uid in recent), info.size, dates.get(uid))
        if need >= search.Need.HEADER:
            try:
                c.data = read_message(folder, uid)
            except MessageGone:
                continue
            c.root = mime.scan(c.data)
            if search.matches(query, c, max_seq=max_seq, max_uid=max_uid):
                hits.append((seq, uid))
        elif test(c, max_seq, max_uid, None):  # what `matches` does for flag/date keys
            hits.append((seq, uid))
    return hits


def _search_flags(view: View, names: _FlagNames, test: Any) -> list[tuple[int, int]]:
    """SEARCH UNSEEN and friends: one answer per distinct flag set (a folder has a handful
    of flag combinations), then the sequence numbers the view keeps per flag set
    (`View.groups`, made once per flag change, in one pass) of the sets that match;
    \\Recent (a few messages) is decided right afterwards."""
    uids, recent = view.uids, view.recent
    max_seq, max_uid = len(uids), (uids[-1] if uids else 0)
    answers: dict[tuple[frozenset[str], bool], bool] = {}

    def answer(seq: int, uid: int, letters: frozenset[str], is_recent: bool) -> bool:
        key = (letters, is_recent)
        hit = answers.get(key)
        if hit is None:
            c = Candidate(seq, uid, names.set(letters, is_recent), 0, None)  # flag keys read flags only
            hit = answers[key] = bool(test(c, max_seq, max_uid, None))
        return hit

    groups = view.groups()
    hits = [seqs for f, seqs in groups.items() if answer(0, 0, f, False)]
    seqs = hits[0] if len(hits) == 1 else sorted(chain.from_iterable(hits))  # sorted runs: a merge
    if recent:  # \\Recent (a few messages) may change the answer: those are decided one by one
        hit = set(seqs)
        info_of = view.info
        for uid in recent:
            seq = view.seq_of(uid)
            if seq is None:
                continue
            if answer(seq, uid, info_of[uid].flags, True):
                hit.add(seq)
            else:
                hit.discard(seq)
        seqs = sorted(hit)
    return [(seq, uids[seq - 1]) for seq in seqs]


class _FlagNames:
    """IMAP flag names per (letters, recent), worked out once per distinct set: a folder of
    100,000 messages has a handful of flag combinations (letter sets are interned)."""

    def __init__(self, view: View) -> None:
        self.keywords = view.keywords
        self._lists: dict[tuple[frozenset[str], bool], list[str]] = {}
        self._sets: dict[tuple[frozenset[str], bool], frozenset[str]] = {}

    def list(self, letters: frozenset[str], recent: bool) -> list[str]:
        key = (letters, recent)
        got = self._lists.get(key)
        if got is None:
            got = self._lists[key] = imap_flags(letters, self.keywords, recent)
        return got

    def set(self, letters: frozenset[str], recent: bool) -> frozenset[str]:
        key = (letters, recent)
        got = self._sets.get(key)
        if got is None:
            got = self._sets[key] = frozenset(self.list(letters, recent))
        return got


def read_header(folder: Folder, uid: int) -> bytes:
    """The message's header, up to and with its empty line (all of it if it has none)."""
    fd, _size = folder.open_message_fd(uid)
    try:
        data = os.read(fd, _HEADER_READ)
        while True:
            end = _header_end(data)
            if end >= 0:
                return data[:end]
            more = os.read(fd, _HEADER_READ)
            if not more:
                return data
            data += more
    finally:
        os.close(fd)


_HEADER_READ = 16 * 1024


def _header_end(data: bytes) -> int:
    if data.startswith(b"\r\n"):
        return 2
    if data.startswith(b"\n"):
        return 1
    ends = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
    if not ends:
        return -1
    i = min(ends)
    return i + (3 if data[i + 1 : i + 2] == b"\r" else 2)
