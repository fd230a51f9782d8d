"""The byte-level MIME scanner: where each part's header and body are, and what they say.

`scan(source)` makes one pass over a stored message and returns the `Part` tree that IMAP
FETCH (BODY[section]<partial>, BODYSTRUCTURE, ENVELOPE), SEARCH and mail authentication
read: for the message and every part, the byte offsets and sizes of its header and body,
the body's line count, and the parsed MIME fields. The stored bytes are never rewritten:
offsets point into the message exactly as it is on disk, CRLF, bare LF or a mix. Stdlib
only, no Twisted, no I/O beyond reading the given file object; the `email` package is not
used (it neither keeps offsets nor bytes as they are).

Part numbering is IMAP's (RFC 3501 §6.4.5): the message is section "", the children of a
multipart are "1", "2", ... and their children "2.1", "2.1.3"; a message/rfc822 (or
message/global) part "2" holds the embedded message as `part.message` (its header is
BODY[2.HEADER], its body BODY[2.TEXT]), and "2.1" is the first child of that message if it
is a multipart, or its body if it is not. Likewise a non-multipart message's body is "1":
`find("1")` answers the message `Part` itself, whose body is that body.

Invariants and choices:
- One pass, linear time: headers end at the first empty line (found with `bytes.find`);
  boundaries are found with `bytes.find` over the multipart's body, so each byte is looked
  at once per nesting level (bounded by `max_depth`).
- RFC 2046 §5.1.1: the line end before a delimiter belongs to the delimiter, so a part's
  body stops before it. A delimiter is `--boundary` at a line start, then optionally `--`
  (the close delimiter), then spaces/tabs, then a line end or the end of the enclosing part.
  Text before the first delimiter (preamble) and after the close delimiter (epilogue) is no
  part. A missing close delimiter ends the last part at the end of the enclosing part.
- Never raises for any bytes. Bounds instead of errors: a multipart or message/rfc822 at
  depth `max_depth` is a leaf (no children, no `message`); at most `max_parts` `Part`s are
  made, and a multipart that reaches the limit keeps the children it got (`root.truncated`
  says so). A multipart with no boundary parameter, or whose boundary is never found, is a
  leaf too: `children` is empty and its body is the rest of the part.
- A header without an empty line makes the whole part header (body empty, at its end).
- The body's line count is the number of LFs in the body, plus one if the body is not empty
  and does not end with LF (a last line without line end still is a line).
- message/rfc822 is scanned as an embedded message only when its Content-Transfer-Encoding
  is 7bit, 8bit or binary (RFC 2046 §5.2.1); an encoded one is a leaf.
- Sources: bytes-like objects are scanned in place; a binary file object is read whole from
  its current position (offsets are relative to that position), so callers bound it by the
  message size limit, as SMTP and APPEND already do. No chunked scanning.
"""

from __future__ import annotations

import binascii
import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = [
    "Address", "ENVELOPE_FIELDS", "Group", "MAX_DEPTH", "MAX_PARTS", "Part", "decode_words",
    "envelope_fields", "headers", "parse_addresses", "parse_params", "scan",
]

MAX_DEPTH = 100
MAX_PARTS = 10_000
ENVELOPE_FIELDS = (
    "date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc", "in-reply-to", "message-id",
)
_MIME_FIELDS = frozenset({
    "content-type", "content-transfer-encoding", "content-id", "content-description",
    "content-disposition", "content-language", "content-location", "content-md5",
})
_WANTED = _MIME_FIELDS | frozenset(ENVELOPE_FIELDS)
_LF = 0x0A
_PADDING = re.compile(rb"[ \t]*(?:\r?\n|\Z)")


@dataclass(eq=False, slots=True)
class Part:
    """One part of a message (or the message, or an embedded message), by byte offsets.

    `offset` is where its header starts; the header is `header_size` bytes including the
    empty line that ends it; the body is `body_size` bytes at `body_offset`. `type` and
    `subtype` are lower case; `params` and `disposition_params` are decoded (RFC 2231
    continuations and charsets joined and decoded, quoted strings unquoted), names lower
    case. `encoding` is the lower-cased Content-Transfer-Encoding ("7bit" if absent). The
    raw fields (`id`, `description`, `location`, `md5`) are unfolded bytes or None.
    `envelope` holds the raw, unfolded ENVELOPE fields this header has (first of each).
    """

    section: str
    offset: int = 0
    header_size: int = 0
    body_offset: int = 0
    body_size: int = 0
    body_lines: int = 0
    type: str = "text"
    subtype: str = "plain"
    params: dict[str, str] = field(default_factory=dict)
    encoding: str = "7bit"
    id: bytes | None = None
    description: bytes | None = None
    disposition: str | None = None
    disposition_params: dict[str, str] = field(default_factory=dict)
    language: list[str] | None = None
    location: bytes | None = None
    md5: bytes | None = None
    children: list[Part] = field(default_factory=list)
    message: Part | None = None
    envelope: dict[str, bytes] = field(default_factory=dict)
    is_message: bool = False
    truncated: bool = False

    @property
    def header_offset(self) -> int:
        return self.offset

    @property
    def end(self) -> int:
        return self.body_offset + self.body_size

    @property
    def size(self) -> int:
        """Header and body together: the part as stored."""
        return self.end - self.offset

    @property
    def content_type(self) -> str:
        return f"{self.type}/{self.subtype}"

    @property
    def is_multipart(self) -> bool:
        """True when the part has children (a multipart made a leaf by the bounds has none)."""
        return bool(self.children)

    def walk(self) -> Iterator[Part]:
        """This part and every part below it, embedded messages included, in document order."""
        stack: list[Part] = [self]
        while stack:
            part = stack.pop()
            yield part
            below = list(part.children)
            if part.message is not None:
                below.append(part.message)
            stack.extend(reversed(below))

    def find(self, section: str) -> Part | None:
        """The part IMAP calls `section` ("", "1", "2.1.3"), from the message `Part`, or None.

        For a message/rfc822 part the answer is the part (its MIME header, its body being the
        whole embedded message); its `message` is the embedded message (HEADER, TEXT). An
        answer with `is_message` set for a section other than "" is a non-multipart message
        whose body that section names (its header is not part of the section).
        """
        if section == "":
            return self
        try:
            numbers = [int(n) for n in section.split(".")]
        except ValueError:
            return None
        cur = self
        parts = section.split(".")
        for i, n in enumerate(numbers):
            if str(n) != parts[i] or n < 1:
                return None
            body = False
            if cur.children:
                if n > len(cur.children):
                    return None
                cur = cur.children[n - 1]
            elif cur.is_message and n == 1:
                body = True  # the body of a non-multipart message is its part 1
            else:
                return None
            if i + 1 < len(numbers):
                if cur.message is not None:
                    cur = cur.message
                elif body or not cur.children:
                    return None
        return cur


def scan(source: bytes | bytearray | memoryview | BinaryIO, *, max_depth: int = MAX_DEPTH,
         max_parts: int = MAX_PARTS) -> Part:
    """Scan a whole message; see the module docstring. Never raises for any message bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source) if not isinstance(source, bytes) else source
    else:
        data = source.read()
    root = Part(section="", is_message=True)
    count = 1
    stack: list[tuple[Part, int, int, int, bool]] = [(root, 0, len(data), 0, False)]
    while stack:
        part, start, end, depth, digest = stack.pop()
        boundary = _fill(part, data, start, end, digest)
        if depth >= max_depth:
            continue
        if part.type == "multipart" and boundary:
            pushed = []
            for s, e in _split(data, part.body_offset, end, boundary):
                if count >= max_parts:
                    root.truncated = True
                    break
                prefix = f"{part.section}." if part.section else ""
                child = Part(section=f"{prefix}{len(part.children) + 1}")
                part.children.append(child)
                count += 1
                pushed.append((child, s, e, depth + 1, part.subtype == "digest"))
            stack.extend(reversed(pushed))
        elif (part.type == "message" and part.subtype in ("rfc822", "global")
              and part.encoding in ("7bit", "8bit", "binary")):
            if count >= max_parts:
                root.truncated = True
                continue
            count += 1
            part.message = Part(section=part.section, is_message=True)
            stack.append((part.message, part.body_offset, end, depth + 1, False))
    return root


def _fill(part: Part, data: bytes, start: int, end: int, digest: bool) -> bytes | None:
    """Locate header and body of `part` in data[start:end] and parse its fields.

    Answers the raw boundary parameter (stripped), if there is one.
    """
    if start >= end:
        hend = start
    elif data[start] == _LF:
        hend = start + 1
    elif data.startswith(b"\r\n", start, end):
        hend = start + 2
    else:
        crlf = data.find(b"\n\r\n", start, end)
        lf = data.find(b"\n\n", start, crlf + 2 if crlf >= 0 else end)
        if lf >= 0:
            hend = lf + 2
        elif crlf >= 0:
            hend = crlf + 3
        else:
            hend = end
    part.offset = start
    part.header_size = hend - start
    part.body_offset = hend
    part.body_size = end - hend
    lines = data.count(b"\n", hend, end)
    if end > hend and data[end - 1] != _LF:
        lines += 1
    part.body_lines = lines

    found: dict[str, bytes] = {}
    if hend > start:
        for name, value in headers(data[start:hend]):
            if name in _WANTED and name not in found:
                found[name] = value
    part.envelope = {k: found[k] for k in ENVELOPE_FIELDS if k in found}
    boundary = None
    ctype = found.get("content-type")
    if ctype is not None:
        main, raw = _split_params(ctype)
        typ, slash, sub = main.partition("/")
        typ, sub = typ.strip().lower(), sub.strip().lower()
        if slash and _is_token(typ) and _is_token(sub):
            part.type, part.subtype = typ, sub
        else:  # RFC 2045 §5.2: an unparseable Content-Type means text/plain
            part.type, part.subtype = "text", "plain"
        part.params = _decode_params(raw)
        for name, value in raw:
            if name == "boundary":
                boundary = value.rstrip()
                break
        if boundary is None and "boundary" in part.params:
            boundary = part.params["boundary"].encode("utf-8").rstrip()
    elif digest:
        part.type, part.subtype = "message", "rfc822"
    else:
        part.params = {"charset": "us-ascii"}
    cte = found.get("content-transfer-encoding")
    if cte is not None:
        part.encoding = _strip_comments(cte).strip().lower().decode("latin-1") or "7bit"
    disp = found.get("content-disposition")
    if disp is not None:
        main, raw = _split_params(disp)
        part.disposition = main.strip().lower() or None
        part.disposition_params = _decode_params(raw)
    lang = found.get("content-language")
    if lang is not None:
        tags = _strip_comments(lang).replace(b",", b" ").split()
        part.language = [t.decode("latin-1") for t in tags]
    part.id = found.get("content-id")
    part.description = found.get("content-description")
    part.location = found.get("content-location")
    part.md5 = found.get("content-md5")
    return boundary or None


def _split(data: bytes, start: int, end: int, boundary: bytes) -> list[tuple[int, int]]:
    """The (start, end) of each body part between the delimiters of `boundary`."""
    delim = b"--" + boundary
    ranges: list[tuple[int, int]] = []
    cur: int | None = None
    pos = start
    while True:
        i = data.find(delim, pos, end)
        if i < 0:
            break
        if i != start and data[i - 1] != _LF:
            pos = i + 1
            continue
        j = i + len(delim)
        close = data.startswith(b"--", j, end)
        m = _PADDING.match(data, j + 2 if close else j, end)
        if m is None:
            pos = i + 1
            continue
        if cur is not None:
            stop = i
            if stop > cur:  # the line end before the delimiter is the delimiter's
                stop -= 1
                if stop > cur and data[stop - 1] == 0x0D:
                    stop -= 1
            ranges.append((cur, stop))
        if close:
            return ranges
        cur = pos = m.end()
        if pos == i:  # cannot happen (the match is past the delimiter), but never loop
            pos += 1
    if cur is not None:
        ranges.append((cur, end))
    return ranges


# Header fields ----------------------------------------------------------------------------


def headers(raw: bytes) -> list[tuple[str, bytes]]:
    """The fields of a header block, in order: (lower-case name, unfolded value).

    Folding line ends are removed (RFC 5322 §2.2.3), the value is stripped of the white space
    around it, 8-bit bytes are kept. Lines that are no field (no colon, a name with white
    space in it, an mbox "From " line) are skipped, and so are their continuation lines.
    Stops at the first empty line.
    """
    out: list[tuple[str, list[bytes]]] = []
    current: list[bytes] | None = None
    for line in raw.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            break
        if line[0] in (0x20, 0x09):
            if current is not None:
                current.append(line)
            continue
        colon = line.find(b":")
        name = line[:colon].rstrip(b" \t") if colon > 0 else b""
        if not name or any(c <= 0x20 or c >= 0x7F for c in name):
            current = None
            continue
        current = [line[colon + 1:]]
        out.append((name.decode("ascii").lower(), current))
    return [(name, b"".join(parts).strip(b" \t\r\n")) for name, parts in out]


_ENCODED_WORD = re.compile(rb"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")


def decode_words(value: bytes) -> str:
    """`value` with its RFC 2047 encoded words decoded (Q and B, any charset Python knows).

    White space between adjacent encoded words is dropped, and adjacent words in the same
    charset are decoded together (so a character split across two words survives). A word
    whose charset is unknown or whose encoding is broken is kept as it is. Text outside
    encoded words is read as UTF-8, or as Latin-1 if it is not valid UTF-8.
    """
    out: list[str] = []
    pending: tuple[str, list[bytes]] | None = None
    pos = 0

    def flush() -> None:
        nonlocal pending
        if pending is not None:
            out.append(b"".join(pending[1]).decode(pending[0], "replace"))
            pending = None

    for m in _ENCODED_WORD.finditer(value):
        between = value[pos:m.start()]
        decoded = _decode_word(m.group(1), m.group(2), m.group(3))
        if decoded is None:
            flush()
            out.append(_text(between + m.group(0)))
        else:
            if pending is None or between.strip(b" \t\r\n"):
                flush()
                out.append(_text(between))
            charset, octets = decoded
            if pending is not None and pending[0] == charset:
                pending[1].append(octets)
            else:
                flush()
                pending = (charset, [octets])
        pos = m.end()
    flush()
    out.append(_text(value[pos:]))
    return "".join(out)


def _decode_word(charset: bytes, encoding: bytes, text: bytes) -> tuple[str, bytes] | None:
    name = _codec(charset.split(b"*", 1)[0])  # RFC 2231 §5: charset*language
    if name is None:
        return None
    try:
        if encoding in (b"Q", b"q"):
            return name, binascii.a2b_qp(text, header=True)
        return name, binascii.a2b_base64(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _codec(charset: bytes) -> str | None:
    """A text codec's name; None for unknown names and for codecs that are not charsets
    ("base64", "idna", "rot13": Python knows them, but decoding with them raises)."""
    try:
        info = codecs.lookup(charset.decode("ascii"))
    except (LookupError, UnicodeDecodeError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in ("idna", "punycode"):
        return None
    return info.name


def _text(octets: bytes) -> str:
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        return octets.decode("latin-1")


# Parameters (RFC 2045 §5.1, RFC 2231) -----------------------------------------------------

_TSPECIALS = frozenset(b'()<>@,;:\\"/[]?= \t')


def _is_token(s: str) -> bool:
    return bool(s) and all(0x20 < ord(c) < 0x7F and ord(c) not in _TSPECIALS for c in s)


def _strip_comments(value: bytes) -> bytes:
    """`value` without RFC 822 comments (outside quoted strings)."""
    if b"(" not in value:
        return value
    out = bytearray()
    depth = 0
    quoted = escape = False
    for c in value:
        if escape:
            escape = False
            if depth == 0:
                out.append(c)
        elif c == 0x5C:  # backslash
            escape = True
            if depth == 0:
                out.append(c)
        elif quoted:
            out.append(c)
            if c == 0x22:
                quoted = False
        elif c == 0x28:
            depth += 1
        elif c == 0x29 and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
            if c == 0x22:
                quoted = True
    return bytes(out)


def _split_params(value: bytes) -> tuple[str, list[tuple[str, bytes]]]:
    """Split "main; a=1; b="x y"" into its main value and raw (lower-case name, value) pairs.

    Tolerant: spaces around "=", unquoted values with spaces (up to the next ";"), an
    unterminated quoted string (to the end), stray semicolons, names without a value.
    """
    value = _strip_comments(value)
    n = len(value)
    semi = value.find(b";")
    semi = n if semi < 0 else semi
    main = value[:semi].strip().decode("latin-1")
    params: list[tuple[str, bytes]] = []
    pos = semi + 1
    while pos < n:
        semi = value.find(b";", pos)
        eq = value.find(b"=", pos)
        if eq < 0 or (0 <= semi < eq):  # a name without "=": skip it
            pos = n if semi < 0 else semi + 1
            continue
        name = value[pos:eq].strip().lower().decode("latin-1")
        pos = eq + 1
        while pos < n and value[pos] in (0x20, 0x09):
            pos += 1
        if pos < n and value[pos] == 0x22:
            buf = bytearray()
            pos += 1
            while pos < n:
                c = value[pos]
                if c == 0x5C and pos + 1 < n:
                    buf.append(value[pos + 1])
                    pos += 2
                    continue
                pos += 1
                if c == 0x22:
                    break
                buf.append(c)
            raw = bytes(buf)
            semi = value.find(b";", pos)
            pos = n if semi < 0 else semi + 1
        else:
            semi = value.find(b";", pos)
            stop = n if semi < 0 else semi
            raw = value[pos:stop].strip()
            pos = stop + 1
        if name:
            params.append((name, raw))
    return main, params


def parse_params(value: bytes) -> tuple[str, dict[str, str]]:
    """A Content-Type or Content-Disposition value: (main value as given, decoded params)."""
    main, raw = _split_params(value)
    return main, _decode_params(raw)


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _decode_params(raw: list[tuple[str, bytes]]) -> dict[str, str]:
    plain: dict[str, str] = {}
    # RFC 2231: name*=cs'lang'v, name*0*=cs'lang'v, name*1=v, ... -> {name: {index: (ext, v)}}
    split: dict[str, dict[int, tuple[bool, bytes]]] = {}
    for name, value in raw:
        if "*" not in name:
            plain.setdefault(name, _text(value))
            continue
        extended = name.endswith("*")
        base = name[:-1] if extended else name
        index = 0
        if "*" in base:
            base, _, digits = base.rpartition("*")
            if not digits.isdigit() or len(digits) > 6:
                plain.setdefault(name, _text(value))
                continue
            index = int(digits)
        if base:
            split.setdefault(base, {}).setdefault(index, (extended, value))
    for base, segments in split.items():
        charset = None
        buf: list[bytes] = []
        order = sorted(segments)
        for index in order:
            extended, value = segments[index]
            if extended:
                if index == order[0] and value.count(b"'") >= 2:
                    cs, _, value = value.partition(b"'")
                    _, _, value = value.partition(b"'")
                    charset = _codec(cs) if cs else None
                value = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), value)
            buf.append(value)
        joined = b"".join(buf)
        plain[base] = joined.decode(charset, "replace") if charset else _text(joined)
    return plain


# ENVELOPE and addresses (RFC 5322 §3.4) ---------------------------------------------------


def envelope_fields(part: Part) -> dict[str, bytes | None]:
    """The raw, unfolded ENVELOPE fields (RFC 3501 §7.4.2) of a message `Part`, None if absent.

    For a message/rfc822 part, those of the embedded message. Values are bytes as stored
    (encoded words and 8-bit bytes kept); RFC 3501's defaults (sender and reply-to from
    from) and the IMAP quoting are the IMAP layer's.
    """
    source = part.message if part.message is not None else part
    return {name: source.envelope.get(name) for name in ENVELOPE_FIELDS}


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox as ENVELOPE wants it; `host` is b"" (never None) when the address has none."""

    name: bytes | None
    route: bytes | None
    mailbox: bytes
    host: bytes


@dataclass(frozen=True, slots=True)
class Group:
    name: bytes
    members: list[Address]


_ADDR_SPECIALS = frozenset(b'()<>@,;:".[]')
_ADDR_WS = frozenset(b" \t\r\n")


def _address_tokens(value: bytes) -> list[tuple[str, bytes, int, int]]:
    """(kind, value, start, end): kind "q" quoted string (unescaped), "c" comment, "d" domain
    literal, "a" atom (any run of other bytes, 8-bit included), or the special itself."""
    tokens: list[tuple[str, bytes, int, int]] = []
    n = len(value)
    i = 0
    while i < n:
        c = value[i]
        if c in _ADDR_WS:
            i += 1
        elif c == 0x22 or c == 0x28:  # quoted string or comment
            start, depth, buf = i, 1, bytearray()
            close = 0x22 if c == 0x22 else 0x29
            i += 1
            while i < n:
                d = value[i]
                if d == 0x5C and i + 1 < n:
                    buf.append(value[i + 1])
                    i += 2
                    continue
                i += 1
                if c == 0x28 and d == 0x28:
                    depth += 1
                elif d == close:
                    depth -= 1
                    if depth == 0:
                        break
                buf.append(d)
            tokens.append(("q" if c == 0x22 else "c", bytes(buf), start, i))
        elif c == 0x5B:  # domain literal
            stop = value.find(b"]", i)
            stop = n if stop < 0 else stop + 1
            tokens.append(("d", value[i:stop], i, stop))
            i = stop
        elif c in _ADDR_SPECIALS:
            tokens.append((chr(c), bytes([c]), i, i + 1))
            i += 1
        else:
            start = i
            while i < n and value[i] not in _ADDR_SPECIALS and value[i] not in _ADDR_WS:
                i += 1
            tokens.append(("a", value[start:i], start, i))
    return tokens


def _phrase(tokens: list[tuple[str, bytes, int, int]]) -> bytes | None:
    words = [t for t in tokens if t[0] != "c"]
    if not words:
        return None
    out = bytearray()
    prev_end = None
    for kind, value, start, stop in words:
        if prev_end is not None and start > prev_end:
            out += b" "
        out += value
        prev_end = stop
    return bytes(out).strip() or None


def _quote_local(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _addr_spec(tokens: list[tuple[str, bytes, int, int]]) -> tuple[bytes, bytes]:
    """(mailbox, host) from the tokens of an addr-spec; the last "@" splits them."""
    words = [t for t in tokens if t[0] != "c"]
    at = max((k for k, t in enumerate(words) if t[0] == "@"), default=-1)
    local = words[:at] if at >= 0 else words
    host = words[at + 1:] if at >= 0 else []
    mailbox = b"".join(_quote_local(v) if k == "q" else v for k, v, _, _ in local)
    return mailbox, b"".join(v for _, v, _, _ in host)


def _mailbox(tokens: list[tuple[str, bytes, int, int]]) -> Address | None:
    if not any(t[0] != "c" for t in tokens):
        return None
    comments = [t[1] for t in tokens if t[0] == "c"]
    lt = next((k for k, t in enumerate(tokens) if t[0] == "<"), -1)
    if lt < 0:
        mailbox, host = _addr_spec(tokens)
        # Only a comment after the addr-spec is the RFC 822 "a@b (Name)" display name; one
        # before it is just a comment (Dovecot's ENVELOPE agrees: `(x) a@b` has no name).
        last = max(t[3] for t in tokens if t[0] != "c")
        trailing = [t[1] for t in tokens if t[0] == "c" and t[2] >= last]
        name = trailing[-1].strip() if trailing and trailing[-1].strip() else None
        return Address(name, None, mailbox, host)
    name = _phrase(tokens[:lt])
    inner = tokens[lt + 1:]
    gt = next((k for k, t in enumerate(inner) if t[0] == ">"), len(inner))
    inner = inner[:gt]
    route = None
    if inner and inner[0][0] == "@":
        colon = next((k for k, t in enumerate(inner) if t[0] == ":"), -1)
        if colon >= 0:
            route = b"".join(t[1] for t in inner[:colon] if t[0] != "c") or None
            inner = inner[colon + 1:]
    if name is None and comments:
        name = comments[-1].strip() or None
    mailbox, host = _addr_spec(inner)
    return Address(name, route, mailbox, host)


def parse_addresses(value: bytes) -> list[Address | Group]:
    """An RFC 5322 address-list (From, To, Cc, ...): mailboxes and groups, in order.

    Tolerant of the common broken forms: a missing ">", ";" or domain, a bare local part,
    a display name in a trailing comment (`a@b (Name)`), unquoted dots and 8-bit bytes in
    display names, empty list members, obsolete routes (`<@a,@b:user@host>`). Display names
    are kept as stored (quoted strings unquoted, encoded words not decoded).
    """
    tokens = _address_tokens(value)
    out: list[Address | Group] = []
    group: Group | None = None
    segment: list[tuple[str, bytes, int, int]] = []
    in_angle = in_route = False
    addressy = False  # the segment has a "<" or "@", so a ":" in it starts no group

    def flush() -> None:
        nonlocal addressy
        addressy = False
        address = _mailbox(segment)
        if address is not None:
            (group.members if group is not None else out).append(address)
        segment.clear()

    for tok in tokens:
        kind = tok[0]
        if kind in ("<", "@"):
            addressy = True
        if kind == "<":
            in_angle, in_route = True, False
            segment.append(tok)
        elif kind == "@" and in_angle and segment and segment[-1][0] == "<":
            in_route = True
            segment.append(tok)
        elif kind == ">":
            in_angle = in_route = False
            segment.append(tok)
        elif in_route and kind in (",", ":"):
            if kind == ":":
                in_route = False
            segment.append(tok)
        elif kind == ",":
            in_angle = False
            flush()
        elif kind == ":" and group is None and not in_angle and not addressy:
            group = Group(_phrase(segment) or b"", [])
            segment.clear()
            addressy = False
        elif kind == ";" and group is not None:
            in_angle = False
            flush()
            out.append(group)
            group = None
        else:
            segment.append(tok)
    flush()
    if group is not None:
        out.append(group)
    return out
