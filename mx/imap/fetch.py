"""IMAP FETCH: which data items a command asks for, and each message's answer as bytes.

`parse_items` turns the arguments after the sequence set into a `FetchPlan` (macros expanded,
what the session must load: message bytes, INTERNALDATE; whether \\Seen gets set); `render`
writes one whole `* n FETCH (...)` response from the plan and what the session loaded.
`envelope`, `bodystructure` and `section_bytes` are the pieces, over `mx.mime`'s part tree.
Pure: stdlib, `mx.mime`, `mx.imap.parse` and `mx.imap.respond` only; no Twisted, no I/O.

Dovecot 2.3 is the reference where RFC 3501 leaves room (clients are used to it); the golden
answers in tests/data/mime/golden were recorded from it. Invariants and choices:
- Message bytes go out as IMAP sees a message (RFC 3501 §2.3.1 RFC822 text): a bare LF is
  sent as CRLF and a NUL as 0x80 (Dovecot does both), so the octets of a literal never end a
  line early. Sizes (BODYSTRUCTURE sizes, `crlf_size` for RFC822.SIZE) count what is sent,
  and `<origin.length>` partials slice the converted octets. Lines are counted as LFs (a last
  line without line end is no line, as Dovecot counts).
- Section numbers follow Dovecot's walk (imap-msgpart.c): in a multipart, n is the n-th
  child; a non-multipart part is its own part 1 (so `1.1` of a leaf is that leaf), and only a
  message/rfc822 part is entered further. A section that does not exist, and HEADER / TEXT of
  a part that is no message/rfc822, answer an empty literal `{0}` (Dovecot; RFC 3501 allows
  an empty string). Every BODY[...] answer is a literal, as Dovecot sends it.
- BODYSTRUCTURE shows the MIME fields as written (case of types, subtypes, parameter names
  and values kept; RFC 2231 continuations joined but not decoded, `name*` keeps its star);
  text/* gets ("charset" "us-ascii") if it names none; a multipart without parts gets one
  empty text/plain part; a message/rfc822 part always has envelope, body and lines (empty
  ones when the scanner did not open it, e.g. base64-encoded), so the grammar holds.
- ENVELOPE takes the last Date, Subject, In-Reply-To and Message-ID field and all address
  fields of a kind joined, as Dovecot does; Subject and display names are cleaned "for humans"
  (white space runs to one space, trimmed; any change makes a literal); a missing local part or
  domain is MISSING_MAILBOX / MISSING_DOMAIN; sender and reply-to default to from (§7.4.2).
- Strings from a message go out quoted or as literals (`respond.quoted` / `respond.literal`),
  never raw; the choice is Dovecot's: a literal for 8-bit octets, CR, LF or more than four
  characters to escape.
- Not here: BINARY (RFC 3516; refused as an invalid item), MODSEQ and other extension items,
  CHANGEDSINCE modifiers: `parse_items` refuses them with the BAD text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from mx import mime
from mx.imap import respond
from mx.imap.parse import Arg, Atom, ParenList, Section

__all__ = [
    "FetchError",
    "FetchPlan",
    "Item",
    "bodystructure",
    "crlf_size",
    "envelope",
    "parse_items",
    "render",
    "section_bytes",
    "with_uid",
]

Item = str | Section  # an atom item in upper case ("FLAGS", "RFC822.SIZE"), or a section

# RFC 3501 §6.4.5: the macros, and the atom items we answer.
_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_ATOMS = frozenset({"UID", "FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY", "BODYSTRUCTURE",
                    "RFC822", "RFC822.HEADER", "RFC822.TEXT"})
_NEEDS_FILE = frozenset({"ENVELOPE", "BODY", "BODYSTRUCTURE", "RFC822", "RFC822.HEADER", "RFC822.TEXT"})
# The RFC822 forms are sections under another name (§6.4.5); RFC822.HEADER does not set \Seen.
_RFC822_SECTIONS = {
    "RFC822": Section("BODY"),
    "RFC822.HEADER": Section("BODY.PEEK", text="HEADER"),
    "RFC822.TEXT": Section("BODY", text="TEXT"),
}


class FetchError(ValueError):
    """The fetch items cannot be answered; the message is the text of the BAD reply."""


# -- the plan ------------------------------------------------------------------------------

# What render does per item: a code, the item name as answered (with its space), the section.
_UID, _FLAGS, _DATE, _SIZE, _ENVELOPE, _BODY, _STRUCTURE, _SECTION = range(8)
_CODES = {"UID": _UID, "FLAGS": _FLAGS, "INTERNALDATE": _DATE, "RFC822.SIZE": _SIZE,
          "ENVELOPE": _ENVELOPE, "BODY": _BODY, "BODYSTRUCTURE": _STRUCTURE}


@dataclass(frozen=True)
class FetchPlan:
    """The normalised items of one FETCH, in the order asked, and what answering them needs."""

    items: tuple[Item, ...]
    needs_file: bool  # message bytes (and their mime scan) are read
    needs_date: bool  # INTERNALDATE is asked
    sets_seen: bool  # BODY[...] without .PEEK, RFC822 or RFC822.TEXT (RFC 3501 §6.4.5)
    uid: bool  # UID is among the items
    structures: tuple[str, ...] = ()  # ENVELOPE, BODY, BODYSTRUCTURE asked: cacheable answers
    sections: bool = False  # some item needs the octets themselves (BODY[...], RFC822...)
    tree: bool = False  # some item needs the MIME structure (not just BODY[] / RFC822 whole)
    steps: tuple[tuple[int, bytes, Section | None], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Worked out once per command, not once per message.
        object.__setattr__(self, "steps", tuple(_step(item) for item in self.items))


def _step(item: Item) -> tuple[int, bytes, Section | None]:
    if isinstance(item, Section):
        return _SECTION, _answer_name(item) + b" ", item
    if item in _RFC822_SECTIONS:
        return _SECTION, item.encode("ascii") + b" ", _RFC822_SECTIONS[item]
    return _CODES[item], item.encode("ascii") + b" ", None


def _answer_name(section: Section) -> bytes:
    """BODY[...]<origin> as answered: .PEEK dropped, header names in upper case (Dovecot)."""
    if section.fields:
        section = Section(section.name, section.part, section.text,
                          tuple(f.upper() for f in section.fields), section.partial)
    return respond.section_name(section, response=True)


def _item(arg: Arg) -> Item:
    if isinstance(arg, Section):
        if arg.name.startswith("BINARY"):
            raise FetchError("BINARY is not supported")
        return arg
    if isinstance(arg, Atom):
        name = arg.text.upper()
        if name in _ATOMS:
            return name
    text = getattr(arg, "text", None) or type(arg).__name__
    raise FetchError(f"Invalid fetch item {text[:40]!r}")


def parse_items(args: tuple[Arg, ...]) -> FetchPlan:
    """The plan for the arguments after the sequence set: a macro, one item, or a list.

    Raises FetchError (the BAD text) for anything else: no items, an empty or nested list, a
    macro inside a list (RFC 3501 §9 fetch grammar), unknown items, extra arguments.
    """
    if len(args) != 1:
        raise FetchError("FETCH needs one item or one list of items" if args else "Missing fetch items")
    arg = args[0]
    if isinstance(arg, ParenList):
        if not arg.items:
            raise FetchError("Empty list of fetch items")
        wanted = [_item(a) for a in arg.items]
    elif isinstance(arg, Atom) and arg.text.upper() in _MACROS:
        wanted = list(_MACROS[arg.text.upper()])
    else:
        wanted = [_item(arg)]
    items = tuple(dict.fromkeys(wanted))  # the same item twice is answered once
    return _plan(items)


def _plan(items: tuple[Item, ...]) -> FetchPlan:
    sections = [_RFC822_SECTIONS.get(i, i) if isinstance(i, str) else i for i in items]
    return FetchPlan(
        items=items,
        needs_file=any(isinstance(i, Section) or i in _NEEDS_FILE for i in items),
        needs_date="INTERNALDATE" in items,
        sets_seen=any(isinstance(s, Section) and s.name == "BODY" for s in sections),
        uid="UID" in items,
        structures=tuple(i for i in items if isinstance(i, str) and i in _STRUCTURES),
        sections=any(isinstance(s, Section) for s in sections),
        tree=any(isinstance(s, Section) and (s.part or s.text) or s in _STRUCTURES for s in sections),
    )


_STRUCTURES = ("ENVELOPE", "BODY", "BODYSTRUCTURE")


def structure(data: bytes, root: mime.Part, item: str) -> bytes:
    """The answer to ENVELOPE, BODY or BODYSTRUCTURE, without its name (what caches keep)."""
    if item == "ENVELOPE":
        return envelope(data, root)
    return bodystructure(data, root, item == "BODYSTRUCTURE")


def with_uid(plan: FetchPlan) -> FetchPlan:
    """The plan for UID FETCH: UID answered first unless asked already (RFC 3501 §6.4.8)."""
    return plan if plan.uid else _plan(("UID", *plan.items))


# -- strings as Dovecot writes them --------------------------------------------------------

_LITERAL_OCTETS = re.compile(rb"[\x00\r\n\x80-\xff]")
_PLAIN = re.compile(rb'[^\x00\r\n"\\\x80-\xff]*')
_MESSY = re.compile(rb'[\x00\t\r\n"\\\x80-\xff]|  |^ | $')
_WS_RUN = re.compile(rb"[ \t\r\n]+")
_NIL = b"NIL"


def _string(value: bytes) -> bytes:
    """IMAP string: quoted unless 8-bit, CR, LF or more than 4 quoted-specials (Dovecot)."""
    if _PLAIN.fullmatch(value):
        return b'"' + value + b'"'  # respond.quoted's answer when nothing needs escaping
    if b"\x00" in value:
        value = value.replace(b"\x00", b"\x80")  # a NUL would cut the string short in Dovecot
    if _LITERAL_OCTETS.search(value) or value.count(b'"') + value.count(b"\\") > 4:
        return respond.literal(value)
    return respond.quoted(value)


# Dovecot's remove_newlines_and_append: CR and LF are dropped, and a space is put where the
# next octet is neither white space nor another line end (a line break without indentation).
_LINE_END_NEXT = re.compile(rb"[\r\n](?=([^ \t\r\n])?)")


def _unfolded(m: re.Match[bytes]) -> bytes:
    return b" " if m.group(1) is not None else b""


def _nstring_nolf(value: bytes | None) -> bytes:
    """nstring of a header value with its line ends removed (Dovecot's imap_append_nstring_nolf)."""
    if value is None:
        return _NIL
    if b"\r" in value or b"\n" in value:
        value = _LINE_END_NEXT.sub(_unfolded, value)
    return _string(value)


def _humane(value: bytes) -> bytes:
    """Dovecot's string "for humans" (Subject, display names): white space runs become one
    space and the ends are trimmed; a value that needed any change goes out as a literal."""
    if not _MESSY.search(value):
        return b'"' + value + b'"'
    cleaned = _WS_RUN.sub(b" ", value.replace(b"\x00", b"\x80")).strip(b" ")
    return respond.literal(cleaned) if cleaned else b'""'


# -- header fields as stored ---------------------------------------------------------------

_FIELD_NAME_BAD = re.compile(rb"[\x00-\x20\x7f-\xff]")


def _fields(data: bytes, start: int, end: int) -> list[tuple[bytes | None, int, int, int]]:
    """The fields of the header block data[start:end], in order, up to its empty line.

    Each is (lower-case name or None for a line that is no field, start, value start, end):
    the value starts after the colon and the white space after it, and `end` includes the
    field's last line end (folded continuation lines belong to the field).
    """
    out: list[tuple[bytes | None, int, int, int]] = []
    pos = start
    find = data.find
    while pos < end:
        lf = find(b"\n", pos, end)
        stop = end if lf < 0 else lf + 1
        first = data[pos]
        if first == 0x0A or (first == 0x0D and stop == pos + 2):
            break  # the empty line
        if (first == 0x20 or first == 0x09) and out:
            name, s, v, _e = out[-1]
            out[-1] = (name, s, v, stop)
        else:
            colon = find(b":", pos, stop)
            name = data[pos:colon].rstrip(b" \t") if colon > pos else b""
            if not name or _FIELD_NAME_BAD.search(name):
                out.append((None, pos, stop, stop))
            else:
                v = colon + 1
                while v < stop and data[v] in (0x20, 0x09):
                    v += 1
                out.append((name.lower(), pos, v, stop))
        pos = stop
    return out


def _value(data: bytes, value_start: int, end: int) -> bytes:
    """A field's raw value: folding kept, the last line end dropped."""
    if end > value_start and data[end - 1] == 0x0A:
        end -= 1
        if end > value_start and data[end - 1] == 0x0D:
            end -= 1
    return data[value_start:end]


# -- message octets as IMAP sends them -----------------------------------------------------

_BARE_LF = re.compile(rb"(?<!\r)\n")


# Every octet but NUL, CR and LF: what `translate` drops to leave a message's line ends.
_NOT_NUL_CR_LF = bytes(c for c in range(256) if c not in (0x00, 0x0D, 0x0A))


def _wire(octets: bytes, crlf_clean: bool = False) -> bytes:
    """`octets` as sent: bare LF as CRLF, NUL as 0x80 (Dovecot; NUL is no CHAR8, §9).
    `crlf_clean`: the caller knows there is no bare LF (the name's ",W=" equals its size)."""
    if crlf_clean:
        return octets.replace(b"\x00", b"\x80") if b"\x00" in octets else octets
    # One C pass keeps only NUL, CR and LF (a few hundred octets for a whole message);
    # the checks run on that. Two counts over the message cost twice as much, and this
    # is most of a BODY[] FETCH's time.
    ends = octets.translate(None, _NOT_NUL_CR_LF)
    if b"\x00" in ends:
        octets = octets.replace(b"\x00", b"\x80")
    if ends.count(b"\n") != ends.count(b"\r\n"):
        octets = _BARE_LF.sub(b"\r\n", octets)
    return octets


def crlf_size(data: bytes) -> int:
    """The size IMAP reports for `data` (RFC822.SIZE): each bare LF counts as CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _find(root: mime.Part, numbers: tuple[int, ...]) -> mime.Part | None:
    """The part a section number names, walked as Dovecot's imap_msgpart_find walks."""
    part = root
    last = len(numbers) - 1
    for i, n in enumerate(numbers):
        if part.type == "multipart":  # a multipart without parts has no part n either
            if n > len(part.children):
                return None
            part = part.children[n - 1]
        elif n != 1 or (i < last and part.message is None):
            return None  # a leaf is its own part 1, and only a message goes deeper
        if i < last:
            if part.message is not None:
                part = part.message
            elif part.type == "message":
                return None  # a message the scanner did not open (encoded): nothing inside
    return part


def _end(data: bytes, part: mime.Part) -> int:
    """Where Dovecot ends `part`'s body: like `part.end`, except that a body ending with the
    close delimiter of its own multipart (or of its message's) keeps that line's line end.

    RFC 2046 §5.1.1 gives the line end before the enclosing delimiter to that delimiter, and
    mx.mime does; Dovecot reads a close delimiter line with its line end and then finds the
    enclosing delimiter at a line start (`--a--` CRLF `--b`: part a ends after the CRLF).
    Sizes and BODY[n] octets follow Dovecot, so clients see one server's numbers.
    """
    end = part.end
    eol = 2 if data.startswith(b"\r\n", end) else 1 if data.startswith(b"\n", end) else 0
    inner = part
    while inner.message is not None:
        inner = inner.message
    if not eol or not inner.children or inner.type != "multipart":
        return end
    start = data.rfind(b"\n", inner.body_offset, end) + 1
    line = data[max(start, inner.body_offset):end].rstrip(b" \t")
    boundary = inner.params.get("boundary", "")
    for codec in ("utf-8", "latin-1"):
        try:
            if line == b"--" + boundary.encode(codec).rstrip() + b"--":
                return end + eol
        except UnicodeEncodeError:
            pass
    return end


def _header_fields(data: bytes, part: mime.Part, names: frozenset[bytes], exclude: bool) -> bytes:
    """HEADER.FIELDS[.NOT]: the matching fields as stored (folding kept), then the empty line."""
    out = []
    for name, start, _v, end in _fields(data, part.offset, part.body_offset):
        if (name in names) != exclude and (name is not None or exclude):
            line = data[start:end]
            out.append(line if line.endswith(b"\n") else line + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def section_bytes(data: bytes, root: mime.Part, section: Section, crlf_clean: bool = False) -> bytes | None:
    """The octets BODY[section] answers before <partial> is applied, as sent; None when the
    section names no part (or HEADER / TEXT of a part that is no message): render sends {0}.
    `root` may be None for the whole message (BODY[]), which needs no structure."""
    if root is None or (not section.part and section.text is None):
        return _wire(data, crlf_clean)
    part = _find(root, section.part) if section.part else root
    if part is None:
        return None
    text = section.text
    if text is None:
        if not section.part:
            return _wire(data[part.offset:part.end])
        return _wire(data[part.body_offset:_end(data, part)])
    if text == "MIME":
        return _wire(data[part.offset:part.body_offset])
    if section.part:
        if part.message is None:
            return None
        part = part.message
    if text == "TEXT":
        return _wire(data[part.body_offset:_end(data, part)])
    if text == "HEADER":
        return _wire(data[part.offset:part.body_offset])
    names = frozenset(f.encode("utf-8").lower() for f in section.fields)
    return _wire(_header_fields(data, part, names, text == "HEADER.FIELDS.NOT"))


# -- ENVELOPE ------------------------------------------------------------------------------

_STRING_FIELDS = {b"date": 0, b"subject": 1, b"in-reply-to": 8, b"message-id": 9}
_ADDRESS_FIELDS = {b"from": 2, b"sender": 3, b"reply-to": 4, b"to": 5, b"cc": 6, b"bcc": 7}
_QUOTED_LOCAL = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_QUOTED_PAIR = re.compile(rb"\\(.)", re.S)


def _mailbox(local: bytes) -> bytes:
    # mx.mime keeps a quoted local part quoted; ENVELOPE wants its content (Dovecot).
    if b'"' in local:
        local = _QUOTED_LOCAL.sub(lambda m: _QUOTED_PAIR.sub(rb"\1", m.group(1)), local)
    return local or b"MISSING_MAILBOX"


def _address(a: mime.Address) -> bytes:
    return b"".join((b"(", _NIL if a.name is None else _humane(a.name), b" ",
                     _NIL if a.route is None else _string(a.route), b" ",
                     _string(_mailbox(a.mailbox)), b" ", _string(a.host or b"MISSING_DOMAIN"), b")"))


def _addresses(items: list[mime.Address | mime.Group]) -> bytes | None:
    """An address list; groups as RFC 3501 §7.4.2 writes them; None when there is none."""
    out = []
    for item in items:
        if isinstance(item, mime.Group):
            out.append(b"(NIL NIL " + _string(item.name) + b" NIL)")
            out.extend(_address(a) for a in item.members)
            out.append(b"(NIL NIL NIL NIL)")
        else:
            out.append(_address(item))
    return b"(" + b"".join(out) + b")" if out else None


# The common address lists (`a@b`, `Name <a@b>`, `"Name, Q." <a@b>`, `<a@b>`, comma-
# separated; no escapes, comments, groups, routes or domain literals) are read by one regex;
# anything else goes to mx.mime.parse_addresses, whose answer this equals (the tests check
# both on random lists). Address parsing is most of ENVELOPE's time otherwise.
_ADDR = rb"[^<>@,\"()\\:;\[\] \t\r\n]+"
_ITEM = re.compile(rb'[ \t\r\n]*(?:"([^"\\]*)"[ \t\r\n]*<(%s)@(%s)>|([^<>@,"()\\:;\[\]]*?)[ \t\r\n]*<(%s)@(%s)>'
                   rb"|(%s)@(%s)|)[ \t\r\n]*(?:,|\Z)" % ((_ADDR,) * 6))


def _parse_addresses(value: bytes) -> list[mime.Address | mime.Group]:
    out: list[mime.Address | mime.Group] = []
    pos, n, match = 0, len(value), _ITEM.match
    while pos < n:
        m = match(value, pos)
        if m is None or m.end() == pos:
            return mime.parse_addresses(value)
        pos = m.end()
        quoted, local, host, phrase, local2, host2, local3, host3 = m.groups()
        if local is not None:
            out.append(mime.Address(quoted.strip() or None, None, local, host))
        elif local2 is not None:
            out.append(mime.Address(_WS_RUN.sub(b" ", phrase).strip() or None, None, local2, host2))
        elif local3 is not None:
            out.append(mime.Address(None, None, local3, host3))
    return out


# The fields ENVELOPE reads, found by one regex instead of walking every line with _fields
# (most of ENVELOPE's time): a name at a line start (a line starting with white space
# continues the field above it, so never matches), the value as _fields/_value give it:
# white space after the colon skipped on the first line, continuation lines kept, the last
# line end dropped. The part's header ends at its empty line, so bounding the search by
# offset and body_offset finds what _fields would.
_ENVELOPE_FIELD = re.compile(
    rb"^(date|subject|in-reply-to|message-id|from|sender|reply-to|to|cc|bcc)[ \t]*:[ \t]*"
    rb"([^\n]*(?:\n[ \t][^\n]*)*)\n?", re.I | re.M)


# Rendered address lists by raw field value: a folder's From and To values repeat (the
# same correspondents), and parsing plus rendering is most of a cold ENVELOPE. Bounded:
# cleared when full. Shared by the read pool's threads (dict operations are atomic).
_ADDRESS_LISTS: dict[bytes, bytes | None] = {}
_ADDRESS_LISTS_MAX = 4096


def _address_list(values: list[bytes]) -> bytes | None:
    """The ENVELOPE address list of one or more fields of the same name (None: no address)."""
    if len(values) != 1:
        return _addresses([a for v in values for a in _parse_addresses(v)])
    value = values[0]
    try:
        return _ADDRESS_LISTS[value]
    except KeyError:
        pass
    rendered = _addresses(_parse_addresses(value))
    if len(_ADDRESS_LISTS) >= _ADDRESS_LISTS_MAX:
        _ADDRESS_LISTS.clear()
    _ADDRESS_LISTS[value] = rendered
    return rendered


def envelope_fields(data: bytes, part: mime.Part) -> tuple[list[bytes | None], dict[int, list[bytes]]]:
    """The raw values ENVELOPE is made of: the string fields by position (the last one
    wins, as in Dovecot) and the values of each address field, in order."""
    strings: list[bytes | None] = [None] * 10
    lists: dict[int, list[bytes]] = {}
    for m in _ENVELOPE_FIELD.finditer(data, part.offset, part.body_offset):
        name, value = m.group(1, 2)
        if m.end() > m.end(2) and value.endswith(b"\r"):
            value = value[:-1]  # the CR of the line end _value drops
        name = name.lower()
        index = _STRING_FIELDS.get(name)
        if index is not None:
            strings[index] = value
        else:
            lists.setdefault(_ADDRESS_FIELDS[name], []).append(value)
    return strings, lists


def envelope(data: bytes, part: mime.Part) -> bytes:
    """The ENVELOPE list "(date subject from sender reply-to to cc bcc in-reply-to message-id)"
    of the message whose header `part` has (the root, or a message/rfc822 part's `message`)."""
    strings, lists = envelope_fields(data, part)
    out = [_nstring_nolf(strings[0]), _NIL if strings[1] is None else _humane(strings[1])]
    addresses = {i: _address_list(values) for i, values in lists.items()}
    sender_default = addresses.get(2)
    for i in range(2, 8):
        value = addresses.get(i)
        if value is None and i in (3, 4):
            value = sender_default  # RFC 3501 §7.4.2: sender and reply-to default to from
        out.append(_NIL if value is None else value)
    out += [_nstring_nolf(strings[8]), _nstring_nolf(strings[9])]
    return b"(" + b" ".join(out) + b")"


# -- BODY and BODYSTRUCTURE ----------------------------------------------------------------

_MIME_FIELDS = frozenset({b"content-type", b"content-transfer-encoding", b"content-id", b"content-description",
                          b"content-disposition", b"content-language", b"content-location", b"content-md5"})
_TOKEN = re.compile(rb'[^\x00-\x20()<>@,;:\\"/\[\]?=\x7f]+')
_ATOM = re.compile(rb'[^\x00-\x20()<>@,;:\\".\[\]\x7f]+')
_EMPTY_TEXT = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0'
_EMPTY_ENVELOPE = b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
_US_ASCII = b'"charset" "us-ascii"'


def _skip(value: bytes, i: int) -> int:
    """Past white space, line ends and (nested) comments from `i` (RFC 5322 CFWS)."""
    n = len(value)
    while i < n:
        c = value[i]
        if c in (0x20, 0x09, 0x0D, 0x0A):
            i += 1
        elif c == 0x28:
            depth = 0
            while i < n:
                c = value[i]
                if c == 0x5C:
                    i += 1
                elif c == 0x28:
                    depth += 1
                elif c == 0x29:
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def _quoted_string(value: bytes, i: int) -> tuple[bytes, int]:
    """The quoted string at value[i] (a DQUOTE), unescaped; unterminated runs to the end."""
    out = bytearray()
    i += 1
    n = len(value)
    while i < n:
        c = value[i]
        if c == 0x22:
            return bytes(out), i + 1
        if c == 0x5C and i + 1 < n:
            i += 1
            c = value[i]
        if c not in (0x0D, 0x0A):
            out.append(c)
        i += 1
    return bytes(out), i


def _params(value: bytes, i: int) -> list[tuple[bytes, bytes]]:
    """`; name=value` parameters from value[i:] as written, RFC 2231 pieces joined (Dovecot's
    rfc2231_parse: `t*0*=a; t*1*=b` is ("t*", "ab") still percent-encoded; `n*0=a; n*1=b` is
    ("n", "ab")); plain parameters first, in order. A broken one is skipped to the next ";"."""
    plain: list[tuple[bytes, bytes]] = []
    pieces: dict[bytes, dict[int, tuple[bool, bytes]]] = {}
    n = len(value)
    while True:
        i = _skip(value, i)
        if i >= n:
            break
        if value[i] != 0x3B:  # ";"
            semi = value.find(b";", i)
            if semi < 0:
                break
            i = semi
        i = _skip(value, i + 1)
        m = _TOKEN.match(value, i)
        if m is None:
            continue
        key = m.group()
        i = _skip(value, m.end())
        if i >= n or value[i] != 0x3D:  # "="
            continue
        i = _skip(value, i + 1)
        if i < n and value[i] == 0x22:
            val, i = _quoted_string(value, i)
        else:
            m = _TOKEN.match(value, i)
            if m is None:
                continue
            val, i = m.group(), m.end()
        star = key.find(b"*")
        if star < 0:
            plain.append((key, val))
            continue
        base, rest = key[:star], key[star + 1:]
        extended = rest.endswith(b"*") or rest == b""
        digits = rest.rstrip(b"*")
        if (digits and not digits.isdigit()) or len(digits) > 6 or rest.count(b"*") > 1 or not base:
            plain.append((key, val))
            continue
        pieces.setdefault(base, {}).setdefault(int(digits or b"0"), (extended, val))
    for base in sorted(pieces):
        segments = pieces[base]
        if sorted(segments) != list(range(len(segments))):  # a gap: not RFC 2231 after all
            plain += [(base + b"*%d" % k + (b"*" if e else b""), v) for k, (e, v) in sorted(segments.items())]
            continue
        name = base + b"*" if segments[0][0] else base
        plain.append((name, b"".join(segments[k][1] for k in range(len(segments)))))
    return plain


def _params_list(params: list[tuple[bytes, bytes]], default_charset: bool) -> bytes:
    """body-fld-param; text/* without a charset gets ("charset" "us-ascii") (Dovecot)."""
    if not params and not default_charset:
        return _NIL
    out = [_string(k) + b" " + _string(v) for k, v in params]
    if default_charset and not any(k.lower() == b"charset" for k, _v in params):
        out.append(_US_ASCII)
    return b"(" + b" ".join(out) + b")"


class _Mime:
    """The MIME fields of one part as written: the first of each (RFC 2045 allows one)."""

    __slots__ = ("type", "subtype", "params", "encoding", "id", "description", "disposition",
                 "disposition_params", "language", "location", "md5")

    def __init__(self, data: bytes, part: mime.Part) -> None:
        found: dict[bytes, bytes] = {}
        for name, _s, v, end in _fields(data, part.offset, part.body_offset):
            if name in _MIME_FIELDS and name not in found:
                found[name] = _value(data, v, end)
        self.type: bytes | None = None
        self.subtype = b""
        self.params: list[tuple[bytes, bytes]] = []
        ctype = found.get(b"content-type")
        if ctype is not None:
            self.type, self.subtype, self.params = _content_type(ctype)
        cte = found.get(b"content-transfer-encoding")
        m = _TOKEN.match(cte, _skip(cte, 0)) if cte is not None else None
        self.encoding = m.group() if m is not None and cte is not None and _skip(cte, m.end()) == len(cte) else None
        self.id = found.get(b"content-id")
        self.description = found.get(b"content-description")
        self.location = found.get(b"content-location")
        self.md5 = found.get(b"content-md5")
        self.disposition: bytes | None = None
        self.disposition_params: list[tuple[bytes, bytes]] = []
        disp = found.get(b"content-disposition")
        if disp is not None:
            m = _TOKEN.match(disp, _skip(disp, 0))
            if m is not None:
                self.disposition = m.group()
                self.disposition_params = _params(disp, m.end())
        self.language: list[bytes] = []
        lang = found.get(b"content-language")
        if lang is not None:
            self.language = _languages(lang)


def _content_type(value: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(type, subtype, parameters) as written; a broken value keeps what could be read and
    no parameters ("garbage" is ("garbage", ""), as Dovecot answers it)."""
    i = _skip(value, 0)
    m = _TOKEN.match(value, i)
    if m is None:
        return b"", b"", []
    kind = m.group()
    i = _skip(value, m.end())
    if i >= len(value) or value[i] != 0x2F:  # "/"
        return kind, b"", []
    m = _TOKEN.match(value, _skip(value, i + 1))
    if m is None:
        return kind, b"", []
    return kind, m.group(), _params(value, m.end())


def _languages(value: bytes) -> list[bytes]:
    """Content-Language: comma-separated atoms up to the first that is none (Dovecot)."""
    out = []
    i = _skip(value, 0)
    while True:
        m = _ATOM.match(value, i)
        if m is None:
            break
        out.append(m.group())
        i = _skip(value, m.end())
        if i >= len(value) or value[i] != 0x2C:
            break
        i = _skip(value, i + 1)
    return out


def _extension(f: _Mime) -> bytes:
    """body-fld-dsp, body-fld-lang and body-fld-loc (RFC 3501 §7.4.2)."""
    if f.disposition is None:
        disposition = _NIL
    else:
        disposition = b"(" + _string(f.disposition) + b" " + _params_list(f.disposition_params, False) + b")"
    language = b"(" + b" ".join(_string(t) for t in f.language) + b")" if f.language else _NIL
    return b" ".join((disposition, language, _nstring_nolf(f.location)))


def _size_lines(data: bytes, part: mime.Part, bare_lf: bool) -> tuple[int, int]:
    """The body's size as sent (bare LFs as CRLF) and its line count (its LFs)."""
    end = _end(data, part)
    lines = data.count(b"\n", part.body_offset, end)
    size = end - part.body_offset
    if bare_lf:
        size += lines - data.count(b"\r\n", part.body_offset, end)
    return size, lines


def _write(data: bytes, part: mime.Part, extended: bool, bare_lf: bool, out: list[bytes],
           f: _Mime | None = None) -> None:
    """One body (RFC 3501 §9 `body`) without its enclosing parentheses, into `out`."""
    if f is None:
        f = _Mime(data, part)
    if part.type == "multipart":
        if part.children:
            for child in part.children:
                out.append(b"(")
                _write(data, child, extended, bare_lf, out)
                out.append(b")")
        else:  # no parts found: one empty text/plain part stands in (Dovecot)
            out.append(_EMPTY_TEXT + (b" NIL NIL NIL NIL)" if extended else b")"))
        out += [b" ", _string(f.subtype)]
        if extended:
            out += [b" ", _params_list(f.params, False), b" ", _extension(f)]
        return
    rfc822 = part.type == "message" and part.subtype == "rfc822"
    if rfc822:
        text = False
        out.append(b'"message" "rfc822"')  # as Dovecot writes it, whatever the case
    elif f.type is None:
        text = True
        out.append(b'"text" "plain"')
    else:
        text = f.type.lower() == b"text"
        out += [_string(f.type), b" ", _string(f.subtype)]
    size, lines = _size_lines(data, part, bare_lf)
    out += [b" ", _params_list(f.params, text), b" ", _nstring_nolf(f.id), b" ", _nstring_nolf(f.description),
            b" ", b'"7bit"' if f.encoding is None else _string(f.encoding), b" %d" % size]
    if text:
        out.append(b" %d" % lines)
    elif rfc822 or part.message is not None:
        embedded = part.message
        if embedded is None:  # not opened (encoded, or at the depth bound): empty, but grammatical
            out += [b" ", _EMPTY_ENVELOPE, b" ", _EMPTY_TEXT + (b" NIL NIL NIL NIL)" if extended else b")")]
        else:
            out += [b" ", envelope(data, embedded), b" ("]
            _write(data, embedded, extended, bare_lf, out)
            out.append(b")")
        out.append(b" %d" % lines)
    if extended:
        out += [b" ", _nstring_nolf(f.md5), b" ", _extension(f)]


def _plain_7bit(f: _Mime) -> bool:
    """Dovecot's message_part_data_is_plain_7bit: a text/plain; charset=us-ascii 7bit part
    with no other MIME field, which Dovecot answers in one canonical lower-case form."""
    if f.type is not None and (f.type.lower() != b"text" or f.subtype.lower() != b"plain"):
        return False
    if f.params and (len(f.params) > 1 or f.params[0][0].lower() != b"charset"
                     or f.params[0][1].lower() != b"us-ascii"):
        return False
    return (f.encoding is None or f.encoding.lower() == b"7bit") and f.id is None and f.description is None \
        and f.md5 is None and f.disposition is None and not f.language and f.location is None


def bodystructure(data: bytes, part: mime.Part, extended: bool = True) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (not) of `part` in `data`, with its parentheses."""
    bare_lf = data.count(b"\n") != data.count(b"\r\n")
    f = _Mime(data, part)
    if part.type != "multipart" and part.type != "message":
        if _plain_7bit(f):
            # Dovecot caches such a message as a flag and answers from it ever after (only the
            # very first parse shows the fields' own case): answer what it answers then.
            size, lines = _size_lines(data, part, bare_lf)
            return b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" %d %d%s)' % (
                size, lines, b" NIL NIL NIL NIL" if extended else b"")
    out = [b"("]
    _write(data, part, extended, bare_lf, out, f)
    out.append(b")")
    return b"".join(out)


# -- the response --------------------------------------------------------------------------

_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")


def _internaldate(when: float, tz_offset_minutes: int | None) -> bytes:
    """"dd-Mon-yyyy hh:mm:ss +zzzz" (RFC 3501 date-time), local time unless an offset is given."""
    t = int(when)
    if tz_offset_minutes is None:
        tm = time.localtime(t)
        offset = (tm.tm_gmtoff or 0) // 60
    else:
        tm = time.gmtime(t + tz_offset_minutes * 60)
        offset = tz_offset_minutes
    sign = b"+" if offset >= 0 else b"-"
    offset = abs(offset)
    return b'"%02d-%s-%04d %02d:%02d:%02d %s%02d%02d"' % (
        tm.tm_mday, _MONTHS[tm.tm_mon - 1], tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec,
        sign, offset // 60, offset % 60)


def _flags(flags: Sequence[str]) -> bytes:
    return b"FLAGS (" + " ".join(flags).encode("utf-8") + b")"


def render(seq: int, plan: FetchPlan, *, uid: int, flags: Sequence[str], size: int,
           internaldate: float | None, data: bytes | None, root: mime.Part | None,
           tz_offset_minutes: int | None = None, flags_changed: bool = False,
           cached: dict[str, bytes] | None = None, crlf_clean: bool = False) -> bytes:
    """One whole `* seq FETCH (...)` CRLF response for one message (see `render_into`)."""
    out: list[bytes] = []
    render_into(out, seq, plan, uid=uid, flags=flags, size=size, internaldate=internaldate, data=data, root=root,
                tz_offset_minutes=tz_offset_minutes, flags_changed=flags_changed, cached=cached,
                crlf_clean=crlf_clean)
    return b"".join(out)


def render_into(out: list[bytes], seq: int, plan: FetchPlan, *, uid: int, flags: Sequence[str], size: int,
                internaldate: float | None, data: bytes | None, root: mime.Part | None,
                tz_offset_minutes: int | None = None, flags_changed: bool = False,
                cached: dict[str, bytes] | None = None, crlf_clean: bool = False) -> None:
    """One whole `* seq FETCH (...)` CRLF response for one message, appended to `out` in
    pieces whose concatenation is the response: a literal's octets are a piece of their
    own, so a BODY[] is not copied once per layer (literal, item list, response line).
    `crlf_clean`: the caller knows `data` has no bare LF (its name's ",W=" equals its size).

    `flags` are IMAP names, already including a \\Seen this FETCH sets; with `flags_changed`
    (this FETCH just set \\Seen) FLAGS is answered first even when not asked, as Dovecot does
    (RFC 3501 §6.4.5). `size` is RFC822.SIZE (`crlf_size` of the stored octets). `data` and
    `root` (its `mime.scan`, made here when None) are needed when `plan.needs_file`, and
    `internaldate` (seconds since the epoch) when `plan.needs_date` (ValueError otherwise).
    INTERNALDATE is in the server's local time unless `tz_offset_minutes` is given.
    `cached` holds answers to ENVELOPE / BODY / BODYSTRUCTURE (from `structure`); when it
    has every one the plan asks and no section is asked, `data` is not needed.
    """
    parts: list[bytes | tuple[bytes, bytes]] = []  # (head, octets): a literal
    if flags_changed and "FLAGS" not in plan.items:
        parts.append(_flags(flags))
    if cached is not None and not plan.sections and all(i in cached for i in plan.structures):
        pass  # everything that needs the octets is answered from the cache
    elif plan.needs_file:
        cached = None
        if data is None:
            raise ValueError("this FETCH needs the message octets")
        if root is None and plan.tree:
            root = mime.scan(data)
    if plan.needs_date and internaldate is None:
        raise ValueError("this FETCH needs INTERNALDATE")
    for code, name, section in plan.steps:
        if code == _FLAGS:
            parts.append(_flags(flags))
        elif code == _UID:
            parts.append(b"UID %d" % uid)
        elif code == _SIZE:
            parts.append(b"RFC822.SIZE %d" % size)
        elif code == _DATE:
            parts.append(b"INTERNALDATE " + _internaldate(internaldate, tz_offset_minutes))  # type: ignore[arg-type]
        elif code == _ENVELOPE:
            parts.append(name + (cached["ENVELOPE"] if cached else envelope(data, root)))  # type: ignore[arg-type]
        elif code == _BODY or code == _STRUCTURE:
            item = "BODYSTRUCTURE" if code == _STRUCTURE else "BODY"
            parts.append(name + (cached[item] if cached else bodystructure(data, root, code == _STRUCTURE)))  # type: ignore[arg-type]
        else:
            assert section is not None
            octets = section_bytes(data, root, section, crlf_clean) or b""  # type: ignore[arg-type]
            if section.partial is not None:
                origin, length = section.partial
                octets = octets[origin:origin + length]
            parts.append((b"%s{%d}\r\n" % (name, len(octets)), octets))
    # Small items are joined; a literal's octets go to `out` as they are.
    line = [b"* %d FETCH (" % seq]
    sep = b""
    for part in parts:
        line.append(sep)
        sep = b" "
        if type(part) is tuple:
            line.append(part[0])
            out.append(b"".join(line))
            out.append(part[1])
            line = []
        else:
            line.append(part)
    line.append(b")\r\n")
    out.append(b"".join(line))
