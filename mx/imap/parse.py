"""The IMAP command reader: bytes from the client in, one command event at a time out.

Sans-IO (h11 style, as `mx.smtp` and `mx.pop3`): `CommandReader.receive_data(bytes)` buffers
what the client sent and `next_event()` hands back one `Command`, `NeedContinuation`,
`BadCommand`, `LiteralTooLarge` or `RawLine` at a time, or `NEED_DATA`. Arguments come as a
small typed AST (`Atom`, `Number`, `SequenceSet`, `Quoted`, `Literal`, `Nil`, `ParenList`,
`Section`) from the RFC 3501 §9 grammar; which argument a command wants where is the
session's business (an atom `123` may be a mailbox name: every token keeps its `text`).

Invariants:
- Framing first, grammar second: a line ends at LF; a line ending in `{n}` / `{n+}`
  (RFC 3501 §4.3, RFC 7888) announces n octets of literal that are never read as commands,
  also when the command is refused (a refused `{n+}` literal is swallowed; after a refused
  `{n}` the client sends nothing, RFC 3501 §7.5). So the stream never desynchronises.
- Each segment of a command is parsed as it arrives, so a syntax error is answered before a
  synchronising literal is asked for (the caller sends `+` only on `NeedContinuation`).
- Bounds (constructor arguments): `max_line` octets of command text (all segments, with their
  line ends and literal announcements, without literal contents); `max_args` arguments
  (every item, nested ones and literals included); `max_depth` nested parentheses;
  `max_literal` octets for one literal and for all literals of a command together (checked
  before any literal octet is read); `max_nonsync_literal` for `{n+}` (4096 with LITERAL-).
  An over-long line is answered at once and skipped to its end, keeping only a short tail to
  see a literal announcement there. After `next_event()` returns `NEED_DATA`, the reader holds
  at most `max_line` octets of line plus the literal being read.
- Lines end in CRLF (RFC 3501 §2.2): a bare LF ends the line (framing) but the command is
  refused; a CR or NUL elsewhere in a command line is refused. Empty lines are ignored.
- Quoted strings take only the `\\"` and `\\\\` escapes; 8-bit text in one must be UTF-8
  (RFC 6855); atoms are 7-bit. Literal octets are opaque (NUL allowed: the store decides).
- Not here: a literal inside a `HEADER.FIELDS` list (quoted and atom names only), `~{n}`
  literal8 (RFC 3516 APPEND), streaming a literal to disk (it is held in memory, capped).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "NEED_DATA",
    "Arg",
    "Atom",
    "BadCommand",
    "Command",
    "CommandReader",
    "Event",
    "LiteralTooLarge",
    "Literal",
    "NeedContinuation",
    "Nil",
    "Number",
    "ParenList",
    "Quoted",
    "RawLine",
    "Section",
    "SequenceSet",
    "as_astring",
    "parse_sequence_set",
    "MAX_LINE",
    "MAX_ARGS",
    "MAX_DEPTH",
    "MAX_LITERAL",
    "LITERAL_MINUS_MAX",
]

MAX_LINE = 64 * 1024  # command text without literal contents (RFC 7162 §4 asks for >= 8192)
MAX_ARGS = 1000
MAX_DEPTH = 16  # SEARCH nests parentheses; nothing legitimate needs more
MAX_LITERAL = 64 * 1024  # the default; the caller passes the message size limit for APPEND
LITERAL_MINUS_MAX = 4096  # RFC 7888 §5: the largest {n+} a LITERAL- server must accept
_UINT32 = 2**32 - 1
_NUMBER_MAX = 2**63 - 1  # number64 (RFC 9051 §9)
_TAIL = 80  # enough of a skipped line's end to see "{" 60 digits "+}" CRLF

# -- the AST ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Atom:
    """An atom as sent (case kept): a keyword, a flag (`\\Seen`), a mailbox name, a date."""

    text: str


@dataclass(frozen=True, slots=True)
class Number:
    """A canonical decimal number (no leading zero), below 2**63."""

    value: int

    @property
    def text(self) -> str:
        return str(self.value)


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A sequence set as sent (`1:*,5,7:9`), or `$` (RFC 5182 SEARCHRES): see `resolve`."""

    text: str

    @property
    def saved(self) -> bool:
        return self.text == "$"

    @property
    def items(self) -> tuple[tuple[int | None, int | None], ...]:
        """Each element as (first, last); None is `*`; a single number n is (n, n)."""
        if self.saved:
            return ()
        out = []
        for element in self.text.split(","):
            a, _sep, b = element.partition(":")
            first = None if a == "*" else int(a)
            out.append((first, first if not b else None if b == "*" else int(b)))
        return tuple(out)

    def resolve(self, largest: int) -> tuple[tuple[int, int], ...]:
        """Sorted, merged, inclusive ranges with `*` as `largest`, clamped to 1..largest.

        RFC 3501 §9: a range means the same in either order, so `559:*` includes the largest
        even when 559 is above it (§6.4.8). Numbers above `largest` match nothing; a caller
        that must refuse them (message sequence numbers, §7.4.2 BAD) checks `items` first.
        """
        spans = []
        for first, last in self.items:
            a = largest if first is None else first
            b = largest if last is None else last
            lo, hi = min(a, b), min(max(a, b), largest)
            if lo <= hi and hi >= 1:
                spans.append((max(lo, 1), hi))
        spans.sort()
        merged: list[tuple[int, int]] = []
        for lo, hi in spans:
            if merged and lo <= merged[-1][1] + 1:
                if hi > merged[-1][1]:
                    merged[-1] = (merged[-1][0], hi)
            else:
                merged.append((lo, hi))
        return tuple(merged)


@dataclass(frozen=True, slots=True)
class Quoted:
    """A quoted string, unescaped."""

    value: str


@dataclass(frozen=True, slots=True)
class Literal:
    """A literal's octets (synchronising or not: the same data)."""

    value: bytes


@dataclass(frozen=True, slots=True)
class Nil:
    """`NIL`, in the case it was sent (an astring `nil` is still a mailbox name to LIST)."""

    text: str = "NIL"


@dataclass(frozen=True, slots=True)
class ParenList:
    items: tuple[Arg, ...]


@dataclass(frozen=True, slots=True)
class Section:
    """A fetch-att with a section, one item: `BODY.PEEK[1.2.HEADER.FIELDS (A B)]<0.1024>`.

    `name` is upper case: BODY, BODY.PEEK, BINARY, BINARY.PEEK or BINARY.SIZE (RFC 3516).
    `text` is None, HEADER, HEADER.FIELDS, HEADER.FIELDS.NOT, TEXT or MIME (upper case);
    `fields` the header-list as sent; `partial` (origin, length) from `<origin.length>`.
    """

    name: str
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None


Arg = Atom | Number | SequenceSet | Quoted | Literal | Nil | ParenList | Section


def as_astring(arg: Arg) -> str | None:
    """An argument read as an astring (RFC 3501 §9), or None if it cannot be one.

    Literal octets are decoded as UTF-8 (RFC 6855); invalid UTF-8 gives None.
    """
    if isinstance(arg, (Atom, Number, SequenceSet, Nil)):
        return arg.text
    if isinstance(arg, Quoted):
        return arg.value
    if isinstance(arg, Literal):
        try:
            return arg.value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def parse_sequence_set(text: str, max_uid: int) -> tuple[tuple[int, int], ...]:
    """`text` as normalised ranges (see `SequenceSet.resolve`); ValueError if not a set or `$`."""
    if not _SEQUENCE_SET.fullmatch(text.encode("ascii", "replace")) or not _seq_numbers_ok(text):
        raise ValueError(f"invalid sequence set: {text[:40]!r}")
    return SequenceSet(text).resolve(max_uid)


# -- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    tag: str
    name: str  # upper case; "UID FETCH" for the UID forms (RFC 3501 §6.4.8)
    args: tuple[Arg, ...]


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """A synchronising literal `{size}` is announced: send `+ ...`, then it comes (§7.5)."""

    size: int


@dataclass(frozen=True, slots=True)
class BadCommand:
    """Answer `tag BAD text` (or `* BAD text` when the tag is None); the reader resynchronised."""

    tag: str | None
    text: str


@dataclass(frozen=True, slots=True)
class LiteralTooLarge:
    """A literal over the limit was announced; none of it was read and none will be parsed.

    Answer the tag (`NO [TOOBIG]` / `BAD`); the reader swallows a non-synchronising one.
    """

    tag: str
    size: int
    synchronizing: bool


@dataclass(frozen=True, slots=True)
class RawLine:
    """A line asked for with `expect_raw_line` (a SASL response, IDLE's DONE), no line end."""

    data: bytes


class _Need(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Need.NEED_DATA
Event = Command | NeedContinuation | BadCommand | LiteralTooLarge | RawLine | _Need

# -- lexical pieces -----------------------------------------------------------------------

_ANNOUNCE = re.compile(rb"\{([0-9]{1,60})(\+?)\}\r?\n\Z")
# ASTRING-CHAR except "+" (RFC 3501 §9 tag): no CTL, SP, ( ) { % * " \ or 8-bit.
_TAG = re.compile(rb"[!#$&',-9:-Z\[\]^-z|}~]+")
_NAME = re.compile(rb"[A-Za-z][A-Za-z0-9_.-]{0,63}")
# A token: 7-bit printable except ( ) " { \, with a backslash allowed first (flags).
_TOKEN = re.compile(rb"\\?[!#-'*-\[\]-z|}~]*")
_SEQ_NUMBER = rb"(?:[1-9][0-9]{0,9}|\*)"
_SEQ_ELEMENT = rb"%s(?::%s)?" % (_SEQ_NUMBER, _SEQ_NUMBER)
_SEQUENCE_SET = re.compile(rb"\$|%s(?:,%s)*" % (_SEQ_ELEMENT, _SEQ_ELEMENT))
_NUMBER = re.compile(rb"0|[1-9][0-9]{0,18}")
_QUOTED = re.compile(rb'"([^"\\\r\n\x00]*(?:\\["\\][^"\\\r\n\x00]*)*)"')
_UNESCAPE = re.compile(rb'\\(["\\])')
_SECTION_NAMES = frozenset({b"BODY", b"BODY.PEEK", b"BINARY", b"BINARY.PEEK", b"BINARY.SIZE"})
_PART = re.compile(rb"[1-9][0-9]{0,9}(?:\.[1-9][0-9]{0,9})*")
_SECTION_WORD = re.compile(rb"[A-Za-z.]+")
_FIELD = re.compile(rb"[!#$&'*-\[^-z|}~]+")  # an atom header name: ASTRING-CHAR without "]" % *
_PARTIAL = re.compile(rb"<(0|[1-9][0-9]{0,18})\.([1-9][0-9]{0,18})>")


def _seq_numbers_ok(text: str) -> bool:
    return all(int(n) <= _UINT32 for n in re.findall(r"[0-9]+", text))


class _Bad(Exception):
    """A syntax error inside the reader; becomes a `BadCommand`."""


_SEP, _ITEM, _ITEM_OR_CLOSE = 0, 1, 2


class _Args:
    """The arguments of one command, parsed segment by segment as they arrive."""

    __slots__ = ("stack", "state", "count", "max_args", "max_depth")

    def __init__(self, max_args: int, max_depth: int) -> None:
        self.stack: list[list[Arg]] = [[]]
        self.state = _SEP
        self.count = 0
        self.max_args = max_args
        self.max_depth = max_depth

    def _add(self, item: Arg | None) -> None:
        self.count += 1
        if self.count > self.max_args:
            raise _Bad("Too many arguments")
        if item is not None:
            self.stack[-1].append(item)

    def feed(self, text: bytes, literal_follows: bool) -> None:
        pos, n, stack = 0, len(text), self.stack
        while pos < n:
            c = text[pos]
            if c == 0x29:  # ")"
                if self.state == _ITEM or len(stack) == 1:
                    raise _Bad("Unexpected )")
                items = stack.pop()
                stack[-1].append(ParenList(tuple(items)))
                self.state = _SEP
                pos += 1
                continue
            if self.state == _SEP:
                if c != 0x20:
                    raise _Bad("Expected a space between arguments")
                self.state = _ITEM
                pos += 1
                continue
            if c == 0x20:
                raise _Bad("Unexpected space")
            if c == 0x28:  # "("
                if len(stack) > self.max_depth:
                    raise _Bad("Parentheses nested too deeply")
                self._add(None)
                stack.append([])
                self.state = _ITEM_OR_CLOSE
                pos += 1
                continue
            if c == 0x22:  # '"'
                value, pos = _quoted(text, pos)
                self._add(Quoted(value))
            else:
                item, pos = _token(text, pos)
                self._add(item)
            self.state = _SEP
        if literal_follows:
            if self.state == _SEP:
                raise _Bad("Expected a space before the literal")
            self._add(None)  # counted now, so a literal over the count is never read
        elif self.state == _ITEM:
            raise _Bad("Trailing space")
        elif len(stack) > 1:
            raise _Bad("Missing )")

    def literal(self, value: bytes) -> None:
        self.stack[-1].append(Literal(value))
        self.state = _SEP

    def finish(self) -> tuple[Arg, ...]:
        return tuple(self.stack[0])


def _quoted(text: bytes, pos: int) -> tuple[str, int]:
    """The quoted string starting at `pos` (a DQUOTE), unescaped, and the offset after it."""
    m = _QUOTED.match(text, pos)
    if m is None:
        raise _Bad("Invalid quoted string")
    try:
        return _UNESCAPE.sub(rb"\1", m.group(1)).decode("utf-8"), m.end()
    except UnicodeDecodeError:
        raise _Bad("Quoted string is not UTF-8") from None


def _token(text: bytes, pos: int) -> tuple[Arg, int]:
    m = _TOKEN.match(text, pos)
    assert m is not None  # the pattern matches the empty string
    token = m.group()
    if not token:
        raise _Bad(f"Unexpected character {text[pos:pos + 1]!r} in arguments")
    bracket = token.find(b"[")
    if bracket > 0 and token[:bracket].upper() in _SECTION_NAMES:
        return _section(text, pos + bracket, token[:bracket].upper().decode("ascii"))
    end = m.end()
    upper = token.upper()
    if upper == b"NIL":
        return Nil(token.decode("ascii")), end
    if _NUMBER.fullmatch(token) and int(token) <= _NUMBER_MAX:
        return Number(int(token)), end
    if _SEQUENCE_SET.fullmatch(token) and _seq_numbers_ok(token.decode("ascii")):
        return SequenceSet(token.decode("ascii")), end
    return Atom(token.decode("ascii")), end


_SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


def _header_list(text: bytes, i: int) -> tuple[list[str], int]:
    """SP "(" header-fld-name *(SP header-fld-name) ")" from `i`; names are atoms or quoted."""
    if text[i : i + 2] != b" (":
        raise _Bad("HEADER.FIELDS needs a list of header names")
    i += 2
    fields: list[str] = []
    while True:
        if text[i : i + 1] == b'"':
            value, i = _quoted(text, i)
            fields.append(value)
        else:
            f = _FIELD.match(text, i)
            if f is None:
                raise _Bad("Invalid header name in HEADER.FIELDS")
            fields.append(f.group().decode("ascii"))
            i = f.end()
        if len(fields) > MAX_ARGS:
            raise _Bad("Too many header names")
        nxt = text[i : i + 1]
        i += 1
        if nxt == b")":
            return fields, i
        if nxt != b" ":
            raise _Bad("Invalid HEADER.FIELDS list")


def _section(text: bytes, pos: int, name: str) -> tuple[Section, int]:
    """RFC 3501 §9 `section` (RFC 3516 `section-binary`) and `<partial>`, from the "["."""
    i = pos + 1
    part: tuple[int, ...] = ()
    spec: str | None = None
    fields: list[str] = []
    binary = name.startswith("BINARY")
    m = _PART.match(text, i)
    if m is not None and text[m.end() : m.end() + 1] in (b".", b"]"):
        part = tuple(int(x) for x in m.group().split(b"."))
        if any(p > _UINT32 for p in part):
            raise _Bad("Section part number too large")
        i = m.end()
        need_word = text[i : i + 1] == b"."
        i += need_word
        if need_word and binary:
            raise _Bad("BINARY takes only a part number")  # RFC 3516 §4.1
    else:
        need_word = not binary and text[i : i + 1] != b"]"
    if need_word:
        w = _SECTION_WORD.match(text, i)
        word = w.group().upper().decode("ascii") if w else ""
        if word not in _SECTION_TEXTS or (word == "MIME" and not part):
            raise _Bad(f"Invalid section {word[:20]!r}")
        spec = word
        i = w.end() if w else i
        if spec.startswith("HEADER.FIELDS"):
            fields, i = _header_list(text, i)
    if text[i : i + 1] != b"]":
        raise _Bad("Invalid section")
    i += 1
    partial = None
    if text[i : i + 1] == b"<":
        if name == "BINARY.SIZE":
            raise _Bad("BINARY.SIZE takes no partial")
        p = _PARTIAL.match(text, i)
        if p is None:
            raise _Bad("Invalid partial")
        partial = (int(p.group(1)), int(p.group(2)))
        i = p.end()
    return Section(name, part, spec, tuple(fields), partial), i


# -- the reader ---------------------------------------------------------------------------


class _Mode(Enum):
    LINE = "line"  # reading a command line (or a raw line)
    LITERAL = "literal"  # reading literal octets into the command
    DISCARD_LINE = "discard-line"  # skipping the rest of a refused command's line
    DISCARD_LITERAL = "discard-literal"  # swallowing a refused command's {n+} literal


class CommandReader:
    """Client-to-server framing and grammar of one IMAP connection."""

    def __init__(
        self,
        max_line: int = MAX_LINE,
        max_args: int = MAX_ARGS,
        max_depth: int = MAX_DEPTH,
        max_literal: int = MAX_LITERAL,
        max_nonsync_literal: int | None = None,
    ) -> None:
        self.max_line = max_line
        self.max_args = max_args
        self.max_depth = max_depth
        self.max_literal = max_literal
        self.max_nonsync_literal = max_nonsync_literal  # LITERAL_MINUS_MAX with LITERAL-
        self._buf = bytearray()
        self._scanned = 0  # octets at the front of _buf known to hold no LF
        self._raw_next = False
        self._discard_raw = False
        self._reset()

    def _reset(self) -> None:
        self._mode = _Mode.LINE
        self._line_used = 0
        self._tag: str | None = None
        self._name = ""
        self._args: _Args | None = None
        self._literal = bytearray()
        self._literal_left = 0
        self._literal_total = 0
        self._tail = b""

    # -- the caller's side

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Octets held: unread input plus the literal being read."""
        return len(self._buf) + len(self._literal)

    def discard_buffer(self) -> None:
        """Forget everything received so far (RFC 3501 §6.2.1: nothing before TLS counts)."""
        self._buf.clear()
        self._scanned = 0
        self._raw_next = False
        self._discard_raw = False
        self._reset()

    def expect_raw_line(self) -> None:
        """The next line is raw data (AUTHENTICATE response, IDLE's DONE), not a command."""
        self._raw_next = True

    def next_event(self) -> Event:
        buf = self._buf
        while True:
            mode = self._mode
            if mode is _Mode.LITERAL or mode is _Mode.DISCARD_LITERAL:
                take = min(self._literal_left, len(buf))
                if mode is _Mode.LITERAL:
                    self._literal += buf[:take]
                del buf[:take]
                self._scanned = 0
                self._literal_left -= take
                if self._literal_left:
                    return NEED_DATA
                if mode is _Mode.LITERAL:
                    assert self._args is not None
                    self._args.literal(bytes(self._literal))
                    self._literal = bytearray()
                    self._mode = _Mode.LINE
                else:
                    self._mode, self._tail = _Mode.DISCARD_LINE, b""
                continue
            lf = buf.find(b"\n", self._scanned)
            if mode is _Mode.DISCARD_LINE:
                if lf < 0:
                    self._tail = (self._tail + buf[-_TAIL:])[-_TAIL:]
                    buf.clear()
                    self._scanned = 0
                    return NEED_DATA
                end = (self._tail + buf[max(0, lf + 1 - _TAIL) : lf + 1])[-_TAIL:]
                del buf[: lf + 1]
                self._scanned = 0
                m = None if self._discard_raw else _ANNOUNCE.search(end)
                self._discard_raw = False
                if m is not None and m.group(2):
                    self._literal_left = int(m.group(1))
                    self._mode = _Mode.DISCARD_LITERAL
                else:
                    self._reset()  # after a refused {n} the client sends nothing (§7.5)
                continue
            limit = self.max_line - self._line_used
            if lf < 0:
                self._scanned = len(buf)
                if len(buf) > limit:
                    return self._too_long()
                return NEED_DATA
            if lf + 1 > limit:
                return self._too_long()
            segment = bytes(buf[: lf + 1])
            del buf[: lf + 1]
            self._scanned = 0
            self._line_used += len(segment)
            event = self._segment(segment)
            if event is not None:
                return event

    # -- inside

    def _too_long(self) -> BadCommand:
        tag = self._tag
        if self._args is None and not self._raw_next:
            head, sp, _rest = bytes(self._buf[: self.max_line]).partition(b" ")
            tag = head.decode("ascii") if sp and _TAG.fullmatch(head) else None
        self._discard_raw, self._raw_next = self._raw_next, False
        self._reset()
        self._mode = _Mode.DISCARD_LINE
        return BadCommand(tag, "Command line too long")

    def _end(self, size: int | None, sync: bool) -> None:
        """The command is over (refused): swallow an announced {n+}, else start afresh."""
        self._reset()
        if size is not None and not sync:
            self._literal_left = size
            self._mode = _Mode.DISCARD_LITERAL

    def _segment(self, segment: bytes) -> Event | None:
        if self._raw_next:
            self._raw_next = False
            self._reset()
            return RawLine(segment[:-2] if segment.endswith(b"\r\n") else segment[:-1])
        m = _ANNOUNCE.search(segment, max(0, len(segment) - _TAIL))
        size, sync = (int(m.group(1)), not m.group(2)) if m else (None, False)
        crlf = m.group().endswith(b"\r\n") if m else segment.endswith(b"\r\n")
        text = segment[: m.start()] if m else segment[: -2 if crlf else -1]
        if self._args is None:
            if m is None and not text.strip(b"\r"):
                if text:  # a lone CR: never a command
                    self._reset()
                    return BadCommand(None, "Bare CR in command line")
                self._reset()
                return None  # an empty line: ignored
            head, _sp, _rest = text.partition(b" ")
            self._tag = head.decode("ascii") if _TAG.fullmatch(head) else None
        tag = self._tag
        try:
            if not crlf:
                raise _Bad("Line must end with CRLF")  # RFC 3501 §2.2
            if b"\r" in text:
                raise _Bad("Bare CR in command line")
            if b"\x00" in text:
                raise _Bad("NUL in command line")
            if self._args is None:
                text = self._start(text)
            assert self._args is not None
            self._args.feed(text, m is not None)
        except _Bad as e:
            self._end(size, sync)
            return BadCommand(tag, str(e))
        assert tag is not None
        if size is None:
            command = Command(tag, self._name, self._args.finish())
            self._reset()
            return command
        limit = self.max_literal
        if not sync and self.max_nonsync_literal is not None:
            limit = min(limit, self.max_nonsync_literal)
        if size > limit or self._literal_total + size > self.max_literal:
            self._end(size, sync)
            return LiteralTooLarge(tag, size, sync)
        self._literal_total += size
        self._literal_left = size
        self._mode = _Mode.LITERAL
        return NeedContinuation(size) if sync else None

    def _start(self, text: bytes) -> bytes:
        """Tag SP name [SP name after UID]: sets the name, returns the arguments' text."""
        if self._tag is None:
            raise _Bad("Invalid tag")
        rest = text[len(self._tag) + 1 :]
        if len(text) <= len(self._tag):
            raise _Bad("Missing command name")
        m = _NAME.match(rest)
        if m is None or (m.end() < len(rest) and rest[m.end()] != 0x20):
            raise _Bad("Invalid command name")
        name = m.group().upper().decode("ascii")
        rest = rest[m.end() :]
        if name == "UID":
            sub = _NAME.match(rest, 1) if rest[:1] == b" " else None
            if sub is None or (sub.end() < len(rest) and rest[sub.end()] != 0x20):
                raise _Bad("UID needs a command")
            name = "UID " + sub.group().upper().decode("ascii")
            rest = rest[sub.end() :]
        self._name = name
        self._args = _Args(self.max_args, self.max_depth)
        return rest
