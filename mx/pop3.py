"""The POP3 wire core (RFC 1939, 2449, 2595, 5034): framing, states, replies, the maildrop.

Sans-IO (h11 style, as `mx.smtp`): `Session.receive_data(bytes)` buffers what the client
sent and `next_event()` hands back one `Command`, `RawLine` (a SASL response) or `BadLine`
at a time, or `NEED_DATA`; `check_allowed` is the one table of which command may come in
which `State`; `Maildrop` is the session's fixed view of the mailbox (message numbers,
deletion marks) and answers STAT, LIST, UIDL, DELE and RSET; `Retrieval` turns a message
fed in arbitrary chunks into the dot-stuffed body of a RETR or TOP response. Nothing here
touches a transport, a file or Twisted.

Invariants:
- Buffers are capped: a command line may hold `MAX_COMMAND_LINE` octets (255 with CRLF,
  RFC 2449 §4); an AUTH line or a SASL response `MAX_SASL_LINE`. A longer line is skipped
  to its end and answered with one `-ERR`, so the stream never desynchronises.
- Every error is a `Response` raised by the code that found it and written by the caller
  exactly once; `-ERR` responses carry RESP-CODES (RFC 2449 §8: `[AUTH]`, `[SYS/TEMP]`,
  `[IN-USE]`, ...) where one applies.
- Message numbers are fixed for the session (RFC 1939 §4): a deleted message keeps its
  number and is skipped by STAT and LIST; nothing is removed before the UPDATE state.
- Multi-line responses are dot-stuffed (RFC 1939 §3) with `mx.smtp.BodyEncoder`, which
  stuffs a "." after any chunk boundary, never splits a CRLF and ends with CRLF "." CRLF;
  a message stored with CRLF line ends goes out byte for byte as it is on disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum

from mx.smtp import LINE_TOO_LONG, BodyEncoder, take_line

__all__ = [
    "ALLOWED", "BadLine", "Command", "MAX_COMMAND_LINE", "MAX_SASL_LINE", "Maildrop", "NEED_DATA",
    "RawLine", "Response", "RespCode", "Retrieval", "Session", "State", "Entry", "check_allowed",
    "multiline", "parse_number",
]

MAX_COMMAND_LINE = 255  # RFC 2449 §4, including CRLF
MAX_SASL_LINE = 8192  # AUTH with an initial response, and SASL responses (RFC 5034 §4)
MAX_KEYWORD = 40  # RFC 2449 §3 (capability and command keywords)
_NUMBER = re.compile(r"[0-9]{1,10}")  # RFC 1939 §3: message numbers are decimal


class RespCode(StrEnum):
    """Extended response codes (RFC 2449 §8, RFC 3206)."""

    IN_USE = "IN-USE"  # RFC 2449 §8.1.1: the maildrop is locked by another session
    LOGIN_DELAY = "LOGIN-DELAY"
    SYS_TEMP = "SYS/TEMP"  # RFC 3206 §4: a temporary system problem
    SYS_PERM = "SYS/PERM"  # RFC 3206 §5
    AUTH = "AUTH"  # RFC 3206 §6: the credentials are the problem


class Response(Exception):
    """One single-line POP3 response: raise it from a handler, the dispatcher writes it."""

    def __init__(self, ok: bool, text: str, code: RespCode | None = None) -> None:
        super().__init__(ok, text, code)
        self.ok = ok
        self.text = text
        self.code = code

    @classmethod
    def err(cls, text: str, code: RespCode | None = None) -> Response:
        return cls(False, text, code)

    @classmethod
    def positive(cls, text: str = "") -> Response:
        return cls(True, text)

    def to_bytes(self) -> bytes:
        status = "+OK" if self.ok else "-ERR"
        code = f" [{self.code}]" if self.code is not None else ""
        text = f" {self.text}" if self.text else ""
        # Texts are ours; a CR or LF in one would start a fake response (never let it).
        line = f"{status}{code}{text}".replace("\r", " ").replace("\n", " ")
        return line.encode("utf-8") + b"\r\n"

    def __repr__(self) -> str:
        return f"Response({self.ok}, {self.text!r}, {self.code!r})"


def multiline(first: str, lines: Iterable[str | bytes]) -> bytes:
    """`+OK first`, the lines (dot-stuffed, RFC 1939 §3), and the terminating "." line."""
    out = [Response.positive(first).to_bytes()]
    for line in lines:
        raw = line.encode("utf-8") if isinstance(line, str) else line
        out.append(b"." + raw + b"\r\n" if raw.startswith(b".") else raw + b"\r\n")
    out.append(b".\r\n")
    return b"".join(out)


# -- framing ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # upper case
    arg: str  # the rest of the line after the first space, as sent (PASS may hold spaces)

    @property
    def args(self) -> list[str]:
        return self.arg.split()


@dataclass(frozen=True, slots=True)
class RawLine:
    """A line asked for with `expect_raw_line` (a SASL response), without its CRLF."""

    text: str


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line that cannot be a command; `response` says why."""

    response: Response


class _Need(Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA = _Need.NEED_DATA
Event = Command | RawLine | BadLine | _Need
TOO_LONG = Response.err("Line too long")


@dataclass(slots=True)
class Session:
    """Client-to-server framing of one POP3 connection: lines in, one event at a time."""

    _buf: bytearray = field(default_factory=bytearray)
    _skipping_long_line: bool = False
    _raw_next: bool = False

    def receive_data(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def discard_buffer(self) -> None:
        """Forget everything received so far (RFC 2595 §4: nothing sent before TLS counts)."""
        self._buf.clear()
        self._skipping_long_line = False
        self._raw_next = False

    def expect_raw_line(self) -> None:
        """The next line is a SASL response, not a command (RFC 5034 §4)."""
        self._raw_next = True

    def next_event(self) -> Event:
        line, self._skipping_long_line = take_line(self._buf, MAX_SASL_LINE, self._skipping_long_line)
        if line is None:
            return NEED_DATA
        raw, self._raw_next = self._raw_next, False
        if line is LINE_TOO_LONG:
            return BadLine(TOO_LONG)
        # RFC 1939 §3: lines end in CRLF; be lenient with a bare LF (many scripts send one),
        # but a CR anywhere else is never part of a command.
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        if b"\r" in text or b"\x00" in text:
            return BadLine(Response.err("Bad characters in command"))
        if raw:
            try:
                return RawLine(text.decode("ascii"))
            except UnicodeDecodeError:
                return RawLine("\x00")  # never valid base64: the exchange fails cleanly
        return parse_command(text)


def parse_command(line: bytes) -> Command | BadLine:
    """One command line without its line end into a `Command`, or the response refusing it."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadLine(Response.err("Command is not valid UTF-8"))
    verb, _sp, arg = text.partition(" ")
    if not verb or len(verb) > MAX_KEYWORD or not verb.isascii() or not verb.isalpha():
        return BadLine(Response.err("Unknown command"))
    verb = verb.upper()
    # Only AUTH (an initial response) may be longer than RFC 2449 §4's 255 octets.
    if len(line) + 2 > MAX_COMMAND_LINE and verb != "AUTH":
        return BadLine(TOO_LONG)
    return Command(verb, arg)


# -- states -----------------------------------------------------------------------------


class State(Enum):
    AUTHORIZATION = "authorization"  # RFC 1939 §4: until USER/PASS or AUTH succeed
    TRANSACTION = "transaction"  # the maildrop is open and locked
    UPDATE = "update"  # after QUIT in TRANSACTION: deletions are carried out


AUTHORIZATION = frozenset({State.AUTHORIZATION})
TRANSACTION = frozenset({State.TRANSACTION})
# Which command may come in which state (RFC 1939 §4-§6, RFC 2449 §5, RFC 2595 §4,
# RFC 5034 §4); anything else gets -ERR. No command is read in UPDATE.
ALLOWED: dict[str, frozenset[State]] = {
    "CAPA": AUTHORIZATION | TRANSACTION,
    "QUIT": AUTHORIZATION | TRANSACTION,
    "NOOP": TRANSACTION,
    "USER": AUTHORIZATION,
    "PASS": AUTHORIZATION,
    "AUTH": AUTHORIZATION,
    "STLS": AUTHORIZATION,
    "STAT": TRANSACTION,
    "LIST": TRANSACTION,
    "UIDL": TRANSACTION,
    "RETR": TRANSACTION,
    "TOP": TRANSACTION,
    "DELE": TRANSACTION,
    "RSET": TRANSACTION,
}


def check_allowed(state: State, verb: str) -> None:
    """Raise the `-ERR` for a command that is unknown or not allowed in `state`."""
    allowed = ALLOWED.get(verb)
    if allowed is None:
        raise Response.err("Unknown command")
    if state not in allowed:
        if state is State.AUTHORIZATION:
            raise Response.err("Not logged in")
        raise Response.err(f"{verb} not allowed after login" if verb != "NOOP" else "Not logged in")


def parse_number(text: str) -> int:
    """A message number or line count argument (RFC 1939 §3: decimal, no sign)."""
    if not _NUMBER.fullmatch(text):
        raise Response.err(f"Invalid number: {text[:20]!r}")
    return int(text)


# -- the maildrop -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One message as the session sees it: the store's UID, its size and its UIDL."""

    uid: int
    size: int
    uidl: str


class Maildrop:
    """The mailbox as fixed at login (RFC 1939 §4): numbered messages and deletion marks."""

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = tuple(entries)
        self.deleted: set[int] = set()  # message numbers marked by DELE
        self.retrieved: set[int] = set()  # message numbers sent whole by RETR

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, arg: str) -> tuple[int, Entry]:
        """The live message named by `arg` (a message number), or the `-ERR` saying why not."""
        n = parse_number(arg)
        if not 1 <= n <= len(self.entries):
            raise Response.err(f"There is no message {n}")
        if n in self.deleted:
            raise Response.err(f"Message {n} is deleted")
        return n, self.entries[n - 1]

    def live(self) -> Iterable[tuple[int, Entry]]:
        return ((i, e) for i, e in enumerate(self.entries, 1) if i not in self.deleted)

    def stat(self) -> Response:
        count = octets = 0
        for _, e in self.live():
            count += 1
            octets += e.size
        return Response.positive(f"{count} {octets}")  # RFC 1939 §5: exactly "n size"

    def list(self, args: list[str]) -> Response | bytes:
        if len(args) > 1:
            raise Response.err("Syntax: LIST [msg]")
        if args:
            n, e = self.get(args[0])
            return Response.positive(f"{n} {e.size}")
        count = len(self.entries) - len(self.deleted)
        return multiline(f"{count} messages", (f"{n} {e.size}" for n, e in self.live()))

    def uidl(self, args: list[str]) -> Response | bytes:
        if len(args) > 1:
            raise Response.err("Syntax: UIDL [msg]")
        if args:
            n, e = self.get(args[0])
            return Response.positive(f"{n} {e.uidl}")
        return multiline("", (f"{n} {e.uidl}" for n, e in self.live()))

    def dele(self, args: list[str]) -> Response:
        if len(args) != 1:
            raise Response.err("Syntax: DELE msg")
        n, _ = self.get(args[0])
        self.deleted.add(n)
        return Response.positive(f"Message {n} deleted")

    def rset(self) -> Response:
        self.deleted.clear()  # RFC 1939 §5: unmark every message marked as deleted
        return Response.positive(f"{len(self.entries)} messages")

    def deleted_uids(self) -> list[int]:
        return sorted(self.entries[n - 1].uid for n in self.deleted)

    def retr_args(self, verb: str, args: list[str]) -> tuple[int, Entry, int | None]:
        """(number, entry, body lines or None for all) for `RETR n` or `TOP n m`."""
        if verb == "RETR":
            if len(args) != 1:
                raise Response.err("Syntax: RETR msg")
            n, e = self.get(args[0])
            return n, e, None
        if len(args) != 2:
            raise Response.err("Syntax: TOP msg lines")
        n, e = self.get(args[0])
        return n, e, parse_number(args[1])


# -- RETR and TOP bodies ----------------------------------------------------------------

_HEADER_END = re.compile(rb"\n\r?\n")


class Retrieval:
    """A message fed in chunks of any size into a multi-line response body: the whole of it
    (RETR), or its header, the blank line and the first `lines` body lines (TOP, RFC 1939 §7).

    `feed` returns the bytes to send for each chunk; `done` turns true when TOP has all it
    needs (stop reading); `finish()` returns the last bytes, ending with CRLF "." CRLF.
    """

    def __init__(self, lines: int | None = None) -> None:
        self._encoder = BodyEncoder()
        self._lines = lines  # body lines still to send; None: everything
        self._in_header = lines is not None
        self._tail = b"\n"  # the last bytes of the header so far ("\n": the message starts a line)
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done or not chunk:
            return b""
        if self._lines is None:
            return self._encoder.feed(chunk)
        return self._encoder.feed(self._cut(chunk))

    def finish(self) -> bytes:
        self.done = True
        return self._encoder.finish()

    def _cut(self, chunk: bytes) -> bytes:
        assert self._lines is not None
        out = b""
        if self._in_header:
            data = self._tail + chunk
            m = _HEADER_END.search(data)
            if m is None:
                self._tail = data[-2:]
                return chunk
            end = m.end() - len(self._tail)
            out, chunk = chunk[:end], chunk[end:]
            self._in_header = False
        if self._lines <= 0:
            self.done = True
            return out
        count = chunk.count(b"\n")
        if count < self._lines:
            self._lines -= count
            return out + chunk
        pos = -1
        for _ in range(self._lines):
            pos = chunk.find(b"\n", pos + 1)
        self._lines = 0
        self.done = True
        return out + chunk[: pos + 1]
