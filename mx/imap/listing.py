"""LIST and LSUB answers: which folder names a pattern matches and with which attributes.

Pure (no Twisted, no I/O): the session reads the folder names and subscriptions from the
store and asks here. RFC 3501 §6.3.8 (patterns, `*` and `%`), RFC 5258 (LIST-EXTENDED:
selection and return options, `\\NonExistent`, CHILDINFO), RFC 3348 (CHILDREN), RFC 6154
(SPECIAL-USE), RFC 5819 (LIST-STATUS is the session's: it needs the store).

Invariants:
- Names here are decoded (Unicode) with "." as the hierarchy separator; the wire form
  (modified UTF-7) is made only by `wire_name`.
- "INBOX" matches case-insensitively and is always listed as "INBOX".
- A name that is only a parent of existing folders (Maildir++ `.a.b` with no `.a`) is
  listed as `\\NonExistent` with LIST-EXTENDED options, else as `\\Noselect` (as Dovecot).
- Special-use attributes come from the folder's name (`mx.store.mailbox.SPECIAL_USE`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from mx.store import utf7
from mx.store.mailbox import SEPARATOR, SPECIAL_USE

__all__ = ["ListRequest", "ListEntry", "list_entries", "pattern_regex", "wire_name", "wire_to_name"]

def wire_name(name: str) -> str:
    """The mailbox name as IMAP sends it (modified UTF-7, RFC 3501 §5.1.3)."""
    return "INBOX" if name.upper() == "INBOX" else utf7.encode(name)


def wire_to_name(text: str) -> str:
    """A client's mailbox name decoded; "inbox" in any case is INBOX. ValueError if invalid.

    8-bit text (a UTF-8 quoted string) is taken as it is: clients that never learnt modified
    UTF-7 send it so, and the name has one meaning either way.
    """
    if text.upper() == "INBOX":
        return "INBOX"
    if text.upper().startswith("INBOX" + SEPARATOR):
        text = "INBOX" + text[5:]
    if not text.isascii():
        return text
    return utf7.decode(text)


def pattern_regex(reference: str, pattern: str) -> re.Pattern[str]:
    """`*` matches anything, `%` anything but the separator (RFC 3501 §6.3.8)."""
    out = []
    for ch in reference + pattern:
        if ch == "*":
            out.append(".*")
        elif ch == "%":
            out.append("[^" + re.escape(SEPARATOR) + "]*")
        else:
            out.append(re.escape(ch))
    return re.compile("".join(out), re.DOTALL)


@dataclass(frozen=True, slots=True)
class ListRequest:
    reference: str
    patterns: tuple[str, ...]
    subscribed_only: bool = False  # selection SUBSCRIBED, or LSUB
    recursive: bool = False  # RECURSIVEMATCH
    special_only: bool = False  # selection SPECIAL-USE (RFC 6154)
    extended: bool = False  # any LIST-EXTENDED syntax used
    return_subscribed: bool = False
    return_children: bool = True
    return_special: bool = True
    status: tuple[str, ...] = ()  # RETURN (STATUS (...)) items
    lsub: bool = False


@dataclass(slots=True)
class ListEntry:
    name: str
    attributes: list[str] = field(default_factory=list)
    selectable: bool = True
    child_info: bool = False  # CHILDINFO ("SUBSCRIBED") extended data


def _matches(regexes: list[re.Pattern[str]], name: str) -> bool:
    if name == "INBOX":  # INBOX is case-insensitive (RFC 3501 §5.1): "inbox", "Inbox" match
        return any(re.fullmatch(rx.pattern, name, re.IGNORECASE | re.DOTALL) for rx in regexes)
    return any(rx.fullmatch(name) for rx in regexes)


def list_entries(req: ListRequest, folders: Iterable[str], subscriptions: Iterable[str],
                 special: dict[str, str] | None = None) -> list[ListEntry]:
    """The entries to answer, in order: INBOX first, then by name."""
    special = SPECIAL_USE if special is None else special
    existing = set(folders)
    existing.add("INBOX")
    subscribed = {("INBOX" if s.upper() == "INBOX" else s) for s in subscriptions}
    parents: set[str] = set()
    for name in existing | subscribed:
        parts = name.split(SEPARATOR)
        for i in range(1, len(parts)):
            parents.add(SEPARATOR.join(parts[:i]))
    has_children = {p for p in parents if any(n.startswith(p + SEPARATOR) for n in existing)}
    regexes = [pattern_regex(req.reference, p) for p in req.patterns]
    candidates = (subscribed if req.subscribed_only else existing) | (parents if not req.subscribed_only else set())
    if req.subscribed_only and (req.recursive or req.lsub):
        candidates |= parents
    out: list[ListEntry] = []
    for name in sorted(candidates, key=lambda n: (n != "INBOX", n)):
        if not _matches(regexes, name):
            continue
        is_real = name in existing
        entry = ListEntry(name)
        attrs = entry.attributes
        if req.subscribed_only and name not in subscribed:
            # A parent shown because a child is subscribed (LSUB `%`, RFC 3501 §6.3.9;
            # RECURSIVEMATCH, RFC 5258 §3.5).
            if req.lsub:
                if not any(s.startswith(name + SEPARATOR) for s in subscribed):
                    continue
                attrs.append("\\Noselect")
                entry.selectable = False
            elif req.recursive and any(s.startswith(name + SEPARATOR) for s in subscribed):
                entry.child_info = True
                if not is_real:
                    attrs.append("\\NonExistent")
                    entry.selectable = False
            else:
                continue
        elif not is_real:
            attrs.append("\\NonExistent" if req.extended else "\\Noselect")
            entry.selectable = False
        if req.special_only and name not in special:
            continue
        if not req.lsub:
            if req.return_children:
                attrs.append("\\HasChildren" if name in has_children else "\\HasNoChildren")
            if (req.return_subscribed or req.subscribed_only) and name in subscribed:
                attrs.append("\\Subscribed")
            if req.return_special and is_real and name in special:
                attrs.append(special[name])
        out.append(entry)
    return out
