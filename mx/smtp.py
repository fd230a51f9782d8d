"""The SMTP wire core, shared by server and client: replies, command parsing, DATA framing.

Sans-IO (h11 style): `ServerSession.receive_data(bytes)` buffers what the peer sent and
`next_event()` hands back one `Command`, `BadLine`, `DataChunk` or `DataEnd` at a time, or
`NEED_DATA`. It never touches a transport, so the server can stop pulling events while a
command is pending and pipelining can never run two commands at once.

Invariants:
- Only CRLF "." CRLF ends DATA (RFC 5321 §4.1.1.4). A bare LF or bare CR never ends it;
  a message containing one is refused at the final dot (no SMTP smuggling, CVE-2023-51764).
- DATA is scanned and dot-unstuffed with bytes operations on whole buffers, never per line.
- Every error inside DATA (too big, too long a line, NUL, bare CR/LF) is remembered and
  answered once at the final dot (RFC 5321 §4.2.5), so the stream never desynchronises.
- Buffers are capped: a command line may hold 512 octets (RFC 5321 §4.5.3.1.4); longer
  lines are skipped to their end and answered with one error.
- The client's half lives here too: `ReplyParser` turns server bytes into `ServerReply`s
  (lines capped at 4096 octets, a reply at 64 KiB; anything else is `MalformedReply`), and
  `BodyEncoder` dot-stuffs a body fed in arbitrary chunks (a "." after any chunk boundary is
  stuffed, a CRLF is never split, bare CR/LF go out as CRLF) so a body can never end DATA
  early (RFC 5321 §4.5.2).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

__all__ = [
    "LINE_TOO_LONG",
    "take_line",
    "Reply",
    "Command",
    "RawLine",
    "BadLine",
    "DataChunk",
    "DataEnd",
    "NEED_DATA",
    "ServerSession",
    "parse_mail_args",
    "parse_rcpt_args",
    "dot_stuff",
    "MAX_COMMAND_LINE",
    "MAX_TEXT_LINE",
    "ServerReply",
    "MalformedReply",
    "ReplyParser",
    "BodyEncoder",
    "MAX_REPLY_LINE",
    "MAX_REPLY",
]

MAX_COMMAND_LINE = 512  # RFC 5321 §4.5.3.1.4, including CRLF
MAX_TEXT_LINE = 1000  # RFC 5321 §4.5.3.1.6, including CRLF
# A line (after an LF) of MAX_TEXT_LINE octets without LF (its CR counts) is too long.
# Anchored on the LF so the scan is linear: the engine jumps from LF to LF.
_LONG_LINE = re.compile(rb"\n[^\n]{%d}" % (MAX_TEXT_LINE,))
_END = b"\r\n.\r\n"


class Reply(Exception):
    """One SMTP reply: raise it from a handler, the dispatcher writes it.

    `text` may hold several lines separated by newlines: they become a multi-line reply.
    """

    def __init__(self, code: int, enhanced: str | None, text: str) -> None:
        super().__init__(code, enhanced, text)
        self.code = code
        self.enhanced = enhanced
        self.text = text

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    def to_bytes(self) -> bytes:
        lines = self.text.split("\n") or [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}\r\n")
        return "".join(out).encode("utf-8")

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.enhanced!r}, {self.text!r})"


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper case
    arg: str  # the rest of the line after one space, as sent


@dataclass(frozen=True, slots=True)
class RawLine:
    """A line asked for with `expect_raw_line` (a SASL response), without its CRLF."""

    text: str


@dataclass(frozen=True, slots=True)
class BadLine:
    """A command line that cannot be a command; `reply` says why."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class DataChunk:
    data: bytes  # dot-unstuffed message bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """The final dot arrived; `error` is the reply to give instead of accepting, if any."""

    error: Reply | None
    size: int


class _Need(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Need.NEED_DATA

Event = Command | RawLine | BadLine | DataChunk | DataEnd | _Need


@dataclass(slots=True)
class _DataState:
    max_size: int
    size: int = 0
    error: Reply | None = None
    at_start: bool = True  # the next byte begins the first line (a "." there is stuffing)
    run: int = 0  # length of the current line so far (bytes since the last LF)
    complete: bool = False  # the end marker has been consumed


def _tail_keep(buf: bytes) -> int:
    """How many bytes at the end of `buf` could begin the end marker or a CRLF pair."""
    for n in (4, 3, 2, 1):
        if len(buf) >= n and _END.startswith(buf[-n:]):
            return n
    return 0


class _TooLong(Enum):
    LINE_TOO_LONG = "LINE_TOO_LONG"


LINE_TOO_LONG = _TooLong.LINE_TOO_LONG


def take_line(buf: bytearray, limit: int, skipping: bool) -> tuple[bytes | _TooLong | None, bool]:
    """The line framing SMTP and POP3 share: the next line of `buf`, LF included (removed
    from `buf`), `LINE_TOO_LONG` for a line over `limit` octets, or None to wait for more;
    with whether an over-long line is still being skipped.

    An over-long line costs O(limit) memory however long it is: its start is dropped as it
    arrives, the rest skipped up to its LF, and it is reported once (then framing goes on at
    the next line, so a client can never desynchronise the command stream).
    """
    lf = buf.find(b"\n")
    if skipping:
        if lf < 0:
            buf.clear()
            return None, True
        del buf[: lf + 1]
        return LINE_TOO_LONG, False
    if lf < 0:
        if len(buf) > limit:
            buf.clear()
            return None, True
        return None, False
    line = bytes(buf[: lf + 1])
    del buf[: lf + 1]
    return (LINE_TOO_LONG if len(line) > limit else line), False


@dataclass(slots=True)
class ServerSession:
    """Server-side framing of one SMTP connection: command lines, then DATA, and back."""

    _buf: bytearray = field(default_factory=bytearray)
    _skipping_long_line: bool = False
    _data: _DataState | None = None
    _raw_next: bool = False

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def discard_buffer(self) -> None:
        """Forget everything received so far (RFC 3207 §4.2: nothing sent before TLS counts)."""
        self._buf.clear()
        self._skipping_long_line = False

    def expect_raw_line(self) -> None:
        """The next line is not a command but a response (RFC 4954 §4 SASL exchanges)."""
        self._raw_next = True

    def start_data(self, max_size: int) -> None:
        """Switch to DATA mode after the server has answered 354."""
        self._data = _DataState(max_size=max_size)

    @property
    def in_data(self) -> bool:
        return self._data is not None

    def next_event(self) -> Event:
        if self._data is not None:
            return self._next_data_event(self._data)
        return self._next_command_event()

    # -- command lines --------------------------------------------------------------

    def _next_command_event(self) -> Event:
        line, self._skipping_long_line = take_line(self._buf, MAX_COMMAND_LINE, self._skipping_long_line)
        if line is None:
            return NEED_DATA
        if line is LINE_TOO_LONG:
            return BadLine(Reply(500, "5.5.6", "Line too long (RFC 5321 §4.5.3.1.4)"))
        if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
            # RFC 5321 §2.3.8: CR and LF only ever appear together as CRLF.
            self._raw_next = False
            return BadLine(Reply(500, "5.5.2", "Lines must end with CRLF"))
        if self._raw_next:
            self._raw_next = False
            try:
                return RawLine(line[:-2].decode("ascii"))
            except UnicodeDecodeError:
                return RawLine("\x00")  # never valid base64: the exchange fails cleanly
        return parse_command(line[:-2])

    # -- DATA -----------------------------------------------------------------------

    def _next_data_event(self, st: _DataState) -> Event:
        if st.complete:
            return self._finish(st)
        buf = self._buf
        if not buf:
            return NEED_DATA
        if st.at_start and buf[:1] == b".":
            if len(buf) < 3:
                return NEED_DATA  # "." or ".\r" may still become the end marker
            if buf[:3] == b".\r\n":
                del buf[:3]
                return self._finish(st)
        end = buf.find(_END)
        if end >= 0:
            chunk = bytes(buf[: end + 2])
            del buf[: end + 5]
            st.complete = True  # the next call returns DataEnd
            return self._feed(st, chunk)
        keep = _tail_keep(buf)
        if keep == len(buf):
            return NEED_DATA
        chunk = bytes(buf[: len(buf) - keep])
        del buf[: len(buf) - keep]
        return self._feed(st, chunk)

    def _feed(self, st: _DataState, chunk: bytes) -> Event:
        # RFC 5321 §4.5.2: a leading "." on a line is transparency stuffing.
        if st.at_start:
            st.at_start = False
            if chunk[:1] == b".":
                chunk = chunk[1:]
        chunk = chunk.replace(b"\r\n.", b"\r\n")
        if st.error is None:
            st.error = _check_chunk(st, chunk)
        else:
            _update_run(st, chunk)
        st.size += len(chunk)
        if st.error is None and st.size > st.max_size:
            st.error = Reply(552, "5.3.4", f"Message exceeds the size limit of {st.max_size} bytes")
        if st.error is not None:
            return DataChunk(b"")
        return DataChunk(chunk)

    def _finish(self, st: _DataState) -> DataEnd:
        self._data = None
        return DataEnd(st.error, st.size)


def _update_run(st: _DataState, chunk: bytes) -> None:
    lf = chunk.rfind(b"\n")
    st.run = st.run + len(chunk) if lf < 0 else len(chunk) - lf - 1


def _check_chunk(st: _DataState, chunk: bytes) -> Reply | None:
    """Content checks on one dot-unstuffed chunk, all in C-level bytes operations."""
    if b"\x00" in chunk:
        return Reply(554, "5.6.0", "Message contains NUL bytes")
    crlf = chunk.count(b"\r\n")
    if chunk.count(b"\n") != crlf or chunk.count(b"\r") != crlf:
        return Reply(
            554, "5.6.0", "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 §2.3.8)"
        )
    first_lf = chunk.find(b"\n")
    lead = len(chunk) if first_lf < 0 else first_lf
    too_long = st.run + lead >= MAX_TEXT_LINE or _LONG_LINE.search(chunk) is not None
    _update_run(st, chunk)
    if too_long:
        return Reply(554, "5.6.0", "Message has a line longer than 1000 bytes (RFC 5321 §4.5.3.1.6)")
    return None


# -- commands ---------------------------------------------------------------------------


def parse_command(line: bytes) -> Command | BadLine:
    """One command line without its CRLF into a `Command`, or the reply refusing it."""
    if b"\x00" in line:
        return BadLine(Reply(500, "5.5.2", "NUL byte in command"))
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadLine(Reply(500, "5.5.2", "Command is not valid UTF-8"))
    verb, _sp, arg = text.partition(" ")
    if not verb.isascii() or not verb.isalpha():
        return BadLine(Reply(500, "5.5.2", "Syntax error, command unrecognized"))
    return Command(verb.upper(), arg)


@dataclass(frozen=True, slots=True)
class MailArgs:
    path: str  # "<...>" as sent
    size: int | None = None
    body: str | None = None  # "7BIT" or "8BITMIME"
    smtputf8: bool = False


def _split_path(arg: str, keyword: str) -> tuple[str, list[str]]:
    # "FROM:<path> PARAM=X ..."; tolerate one space after the colon (common client quirk).
    if arg[: len(keyword)].upper() != keyword:
        raise Reply(501, "5.5.4", f"Syntax: {keyword}<address>")
    rest = arg[len(keyword) :].lstrip(" ")
    if not rest.startswith("<"):
        raise Reply(501, "5.1.7" if keyword == "FROM:" else "5.1.3", "Address must be in <>")
    close = rest.find(">")
    # A quoted local part may contain ">": find the ">" after any closing quote.
    if '"' in rest[:close]:
        q2 = rest.find('"', rest.find('"') + 1)
        while q2 > 0 and rest[q2 - 1] == "\\":
            q2 = rest.find('"', q2 + 1)
        close = rest.find(">", q2) if q2 > 0 else -1
    if close < 0:
        raise Reply(501, "5.5.4", "Unterminated address")
    path, params = rest[: close + 1], rest[close + 1 :]
    if params and not params.startswith(" "):
        raise Reply(501, "5.5.4", "Syntax error after address")
    return path, params.split()


def parse_mail_args(arg: str) -> MailArgs:
    """`MAIL FROM:<path> [SIZE=n] [BODY=8BITMIME] [SMTPUTF8]` (RFC 5321 §4.1.1.2, 1870, 6152, 6531)."""
    path, params = _split_path(arg, "FROM:")
    size: int | None = None
    body: str | None = None
    smtputf8 = False
    for param in params:
        key, eq, value = param.partition("=")
        key = key.upper()
        if key == "SIZE" and eq and value.isdigit() and len(value) <= 20:
            size = int(value)
        elif key == "BODY" and eq and value.upper() in ("7BIT", "8BITMIME"):
            body = value.upper()
        elif key == "SMTPUTF8" and not eq:
            smtputf8 = True
        elif key == "AUTH" and eq:
            pass  # RFC 4954 §5: an identity for the next hop; we record our own user instead
        else:
            raise Reply(555, "5.5.4", f"Unsupported MAIL parameter {key}")
    return MailArgs(path, size, body, smtputf8)


def parse_rcpt_args(arg: str) -> str:
    """`RCPT TO:<path>`; no RCPT parameters are supported (RFC 5321 §4.1.1.3)."""
    path, params = _split_path(arg, "TO:")
    if params:
        raise Reply(555, "5.5.4", f"Unsupported RCPT parameter {params[0].partition('=')[0]}")
    return path


def dot_stuff(data: bytes, at_line_start: bool = True, after_cr: bool = False) -> bytes:
    """Transparency for sending (RFC 5321 §4.5.2), on a whole buffer at once.

    Callers streaming chunks pass `at_line_start` = the previous chunk ended with CRLF and
    `after_cr` = it ended with a CR, so a "." right after a chunk boundary (even one that
    falls between CR and LF) is stuffed and can never end DATA early.
    """
    out = data.replace(b"\r\n.", b"\r\n..")
    if at_line_start and out[:1] == b".":
        out = b"." + out
    elif after_cr and out[:2] == b"\n.":
        out = b"\n." + out[1:]
    return out


# -- the client's side of the wire: replies in, message body out --------------------------

MAX_REPLY_LINE = 4096  # octets, with CRLF (RFC 5321 §4.5.3.1.5 allows 512; be generous)
MAX_REPLY = 64 * 1024  # octets in one (multi-line) reply
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.S)  # RFC 5321 §4.2
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")  # RFC 3463, RFC 2034
_BARE = re.compile(rb"\r\n?|\n")


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One reply as a client received it (the counterpart of `Reply`, which a server raises)."""

    code: int
    enhanced: str | None
    text: str  # all lines joined with "\n", the enhanced code stripped from each

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return " ".join(str(p) for p in (self.code, self.enhanced, self.text) if p)


# One-line replies already parsed, by their bytes (without CRLF): `ServerReply` is immutable
# and a line's reply depends on nothing else, so a pipelined fan-out's fifty "250 2.1.5 Ok"
# are parsed once. Bounded: emptied when it holds `_KNOWN_MAX` lines.
_KNOWN_REPLIES: dict[bytes, ServerReply] = {}
_KNOWN_MAX = 1024


class MalformedReply(Exception):
    """The server's bytes are not an SMTP reply (RFC 5321 §4.2)."""


class ReplyParser:
    """Sans-IO: bytes from the server in, complete `ServerReply`s out (RFC 5321 §4.2).

    Lines are capped at `MAX_REPLY_LINE` octets and a reply at `MAX_REPLY`; a reply whose
    code changes between lines, or any line that is not `NNN[ -]text`, is `MalformedReply`.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0
        self._size = 0

    @property
    def pending(self) -> bool:
        """Bytes of a reply not yet complete are buffered."""
        return bool(self._buf) or bool(self._lines)

    def feed(self, data: bytes) -> list[ServerReply]:
        if self._buf:
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        *lines, rest = data.split(b"\n")
        out = []
        known = _KNOWN_REPLIES
        for raw in lines:
            if len(raw) >= MAX_REPLY_LINE:
                raise MalformedReply("reply line too long")
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if self._lines:  # inside a multi-line reply
                reply = self._line(raw)
                if reply is not None:
                    out.append(reply)
                continue
            # A one-line reply seen before (the 250s of a pipelined fan-out): one lookup.
            reply = known.get(raw)
            if reply is None:
                reply = self._line(raw)
                if reply is None:
                    continue  # the first line of a multi-line reply
                if len(known) >= _KNOWN_MAX:
                    known.clear()  # the lines that recur come back at once
                known[raw] = reply
            out.append(reply)
        if len(rest) >= MAX_REPLY_LINE:
            raise MalformedReply("reply line too long")
        self._buf += rest
        return out

    def _line(self, raw: bytes) -> ServerReply | None:
        m = _REPLY_LINE.fullmatch(raw)
        if m is None:
            raise MalformedReply(f"malformed reply line {raw[:80]!r}")
        code = int(m.group(1))
        if self._lines and code != self._code:  # RFC 5321 §4.2.1: one code per reply
            raise MalformedReply(f"reply code changed within a reply: {raw[:80]!r}")
        self._code = code
        self._size += len(raw) + 2
        if self._size > MAX_REPLY:
            raise MalformedReply("reply too long")
        self._lines.append(m.group(3).decode("utf-8", "replace"))
        if m.group(2) == b"-":
            return None
        enhanced = None
        lines = []
        for i, text in enumerate(self._lines):
            e = _ENHANCED.match(text)
            if e is not None and e.group(1) == str(code)[0]:
                enhanced = enhanced or (e.group(0).strip() if i == 0 else None)
                text = text[e.end():]
            lines.append(text)
        self._lines, self._size = [], 0
        return ServerReply(code, enhanced, "\n".join(lines))


class BodyEncoder:
    """Dot-stuffing and CRLF for a message fed in arbitrary chunks (RFC 5321 §4.5.2, §2.3.8).

    A "." that begins any line, including the first and one that begins a chunk, is doubled;
    a trailing CR is held back so a CRLF is never split; bare CR or LF become CRLF; `finish()`
    ends the message with CRLF (if needed) and "." CRLF (RFC 5321 §4.1.1.4).
    """

    def __init__(self) -> None:
        self._at_line_start = True  # a "." at the very start is stuffed too
        self._held = b""  # a trailing CR, kept until we know whether LF follows

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk
        self._held = b"\r" if data.endswith(b"\r") else b""
        return self._encode(data[:-1] if self._held else data)

    def finish(self) -> bytes:
        tail = self._encode(self._held)
        self._held = b""
        if not self._at_line_start:
            tail += b"\r\n"  # RFC 5321 §4.1.1.4: the end marker follows a CRLF
        return tail + b".\r\n"

    def _encode(self, data: bytes) -> bytes:
        if not data:
            return b""
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            data = _BARE.sub(b"\r\n", data)
        out = dot_stuff(data, self._at_line_start)
        self._at_line_start = data.endswith(b"\n")
        return out
