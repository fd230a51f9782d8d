"""Our outbound ESMTP client: one connection to one MX, several transactions, a reply per recipient.

It answers for everything between "TCP connect to an IP address" and "QUIT": greeting, EHLO
(HELO fallback), the STARTTLS policy, MAIL/RCPT/DATA with or without PIPELINING, streaming
the body, and the RFC 5321 timeouts. DNS, retries and queue state belong to `relay`.

Invariants:
- Replies are matched to commands by count: the server may only send as many replies as we
  have sent commands (plus the greeting). Anything more, a malformed reply line, a line over
  4096 octets or a reply over 64 KiB aborts the connection (no desynchronisation, no
  response injection).
- After the 220 to STARTTLS, any byte the server sent in plaintext is a protocol error and
  aborts the connection (RFC 3207 §4.2, the "NO STARTTLS" class); after the handshake, the
  EHLO is repeated and only its extensions count (RFC 3207 §4.2).
- The body is dot-stuffed across chunk boundaries (RFC 5321 §4.5.2): a "." that begins any
  line, including the first and one that begins a chunk, is doubled; a trailing CR is held
  back so a CRLF is never split. Bare CR or LF are sent as CRLF (RFC 5321 §2.3.8), so no
  bare LF ever reaches the wire; the message always ends with CRLF before "." CRLF
  (RFC 5321 §4.1.1.4). The body is written 64 KiB at a time, waiting for the transport to
  drain (IPushProducer), so a large message is never buffered whole a second time.
- Every wait for a reply has its RFC 5321 §4.5.3.2 timeout; a timeout aborts the connection.
  A fatal error (timeout, lost connection, protocol violation) always closes the connection
  before it is raised; a refused MAIL, RCPT or DATA never does (RSET keeps it usable).
- The message file is read with plain blocking reads of 64 KiB (as FileSender does).
"""

from __future__ import annotations

import ipaddress
import pathlib
import re
from collections import deque
from dataclasses import dataclass
from typing import IO, Callable, Iterator, Sequence

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.interfaces import IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mx.smtp import dot_stuff
from mx.tls import opportunistic_client, verified_client

__all__ = ["Timeouts", "ServerReply", "SMTPClientError", "TransactionResult", "SMTPClientConnection",
           "ReplyParser", "CHUNK_SIZE"]

log = Logger()

CHUNK_SIZE = 64 * 1024  # body bytes read and written at a time
MAX_REPLY_LINE = 4096  # octets, with CRLF (RFC 5321 §4.5.3.1.5 allows 512; be generous)
MAX_REPLY = 64 * 1024  # octets in one (multi-line) reply
_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|$)(.*)", re.S)  # RFC 5321 §4.2
_ENHANCED = re.compile(r"([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: +|$)")  # RFC 3463, RFC 2034
_BARE = re.compile(rb"\r\n?|\n")
_DOMAIN = re.compile(r"[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63}){1,126}\.?|\[[0-9A-Fa-f:.Iv]{1,60}\]")


@dataclass(frozen=True)
class Timeouts:
    """RFC 5321 §4.5.3.2 minimums, in seconds (the TLS handshake is bounded by `ehlo`)."""

    connect: float = 30
    greeting: float = 300
    ehlo: float = 300
    mail: float = 300
    rcpt: float = 300
    data_init: float = 120
    data_block: float = 180
    data_end: float = 600
    quit: float = 30


@dataclass(frozen=True)
class ServerReply:
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


class SMTPClientError(Exception):
    """A transaction or connection failed; `temporary` says whether a retry may help."""

    def __init__(self, message: str, *, stage: str, reply: ServerReply | None = None,
                 temporary: bool | None = None) -> None:
        super().__init__(f"{message}: {reply}" if reply is not None else message)
        self.reply = reply
        self.stage = stage
        self.temporary = (not reply.permanent if reply is not None else True) if temporary is None else temporary


@dataclass(frozen=True)
class TransactionResult:
    recipients: dict[str, ServerReply]  # the reply to each RCPT, in the order given
    data: ServerReply | None  # after the final dot (or the refusal of DATA); None: nobody accepted

    def outcome(self, rcpt: str) -> ServerReply:
        reply = self.recipients[rcpt]
        if reply.code // 100 != 2 or self.data is None:
            return reply
        return self.data


class MalformedReply(Exception):
    """The server's bytes are not an SMTP reply (RFC 5321 §4.2)."""


class ReplyParser:
    """Sans-IO: bytes from the server in, complete `ServerReply`s out (RFC 5321 §4.2)."""

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
        self._buf += data
        out = []
        while (lf := self._buf.find(b"\n")) >= 0:
            if lf + 1 > MAX_REPLY_LINE:
                raise MalformedReply("reply line too long")
            raw = bytes(self._buf[:lf])
            del self._buf[: lf + 1]
            reply = self._line(raw[:-1] if raw.endswith(b"\r") else raw)
            if reply is not None:
                out.append(reply)
        if len(self._buf) >= MAX_REPLY_LINE:
            raise MalformedReply("reply line too long")
        return out

    def _line(self, raw: bytes) -> ServerReply | None:
        m = _LINE.fullmatch(raw)
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


class _QuietFactory(Factory):
    """Hands out one protocol; `noisy = False` keeps a log line per connection away."""

    noisy = False

    def __init__(self, protocol: Protocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: object) -> Protocol:
        return self._protocol


@implementer(IHandshakeListener, IPushProducer)
class _Wire(Protocol):
    """The transport side: counts owed replies, queues parsed ones, fails waiters."""

    def __init__(self, reactor: object) -> None:
        self.reactor = reactor
        self.parser = ReplyParser()
        self.replies: deque[ServerReply] = deque()
        self.owed = 1  # the greeting
        self.connected = False
        self.failure: tuple[str, str | None, ServerReply | None] | None = None
        self._waiter: tuple[Deferred, str, Callable[[], bool]] | None = None
        self._timer: object = None
        self._closed: list[Deferred] = []
        self._lost = False
        self._paused = False
        self.handshake_done = False

    # -- Twisted callbacks -------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        if self.failure is not None:
            return
        try:
            replies = self.parser.feed(data)
        except MalformedReply as e:
            self.replies.clear()  # nothing from a server that broke the protocol counts
            return self.fail(str(e), None, abort=True)
        for reply in replies:
            if self.owed <= 0:
                self.replies.clear()
                return self.fail("unexpected reply from server", None, reply=reply, abort=True)
            self.owed -= 1
            self.replies.append(reply)
        self._wake()

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self._wake()

    def connectionLost(self, reason: object = None) -> None:
        self.connected = False
        self._lost = True
        self.fail(f"connection lost ({getattr(reason, 'value', reason)})", None)
        for d in self._closed:
            d.callback(None)
        self._closed.clear()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake()

    def stopProducing(self) -> None:
        pass

    # -- used by the connection ----------------------------------------------------------

    def write_commands(self, lines: Sequence[str]) -> None:
        self.owed += len(lines)
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def fail(self, message: str, stage: str | None, reply: ServerReply | None = None,
             abort: bool = False) -> None:
        if self.failure is None:
            self.failure = (message, stage, reply)
        if abort:
            self.abort()
        self._wake()

    def abort(self) -> None:
        if self.connected and self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def error(self, stage: str) -> SMTPClientError:
        assert self.failure is not None
        message, fixed, reply = self.failure
        return SMTPClientError(message, stage=fixed or stage, reply=reply, temporary=True)

    def wait(self, stage: str, timeout: float, ready: Callable[[], bool]) -> Deferred:
        """Fire when `ready()` is true, fail on failure or after `timeout` seconds."""
        if ready():
            return succeed(None)
        if self.failure is not None:
            return fail(self.error(stage))
        d: Deferred = Deferred()
        self._waiter = (d, stage, ready)
        self._timer = self.reactor.callLater(timeout, self._timed_out, stage, timeout)
        return d

    def _timed_out(self, stage: str, timeout: float) -> None:
        self._timer = None
        self.fail(f"no progress at stage {stage!r} within {timeout:g}s", "timeout", abort=True)

    def _wake(self) -> None:
        if self._waiter is None:
            return
        d, stage, ready = self._waiter
        ok = ready()
        if not ok and self.failure is None:
            return
        self._waiter = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if ok:
            d.callback(None)
        else:
            d.errback(self.error(stage))

    async def read(self, stage: str, timeout: float) -> ServerReply:
        await self.wait(stage, timeout, lambda: bool(self.replies))
        return self.replies.popleft()

    async def drain(self, timeout: float) -> None:
        # RFC 5321 §4.5.3.2.5: each block written must be taken within the data timeout.
        await self.wait("data", timeout, lambda: not self._paused)

    def when_closed(self) -> Deferred:
        if self._lost or self.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._closed.append(d)
        return d


class _BodyEncoder:
    """Dot-stuffing and CRLF for a message fed in arbitrary chunks (RFC 5321 §4.5.2, §2.3.8)."""

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


def _chunks(message: bytes | IO[bytes]) -> Iterator[bytes]:
    if isinstance(message, (bytes, bytearray, memoryview)):
        view = memoryview(message)
        for i in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[i : i + CHUNK_SIZE])
        return
    while chunk := message.read(CHUNK_SIZE):
        yield chunk


class SMTPClientConnection:
    """One SMTP session to one server. Methods must not run concurrently."""

    def __init__(self, reactor: object, wire: _Wire, host: str, port: int, helo: str,
                 tls_hostname: str, timeouts: Timeouts) -> None:
        self._reactor = reactor
        self._wire = wire
        self._helo = helo
        self._t = timeouts
        self._busy = False
        self.extensions: dict[str, str] = {}
        self.tls_active = False
        # Remote-MTA / logs: the name the server greets with (RFC 5321 §4.3.1, what loop
        # detection compares with our own name), else the MX name, else the address.
        self.peer_name = tls_hostname or host
        self._address = f"[{host}]:{port}"

    @property
    def _log_peer(self) -> str:
        return f"{self.peer_name}{self._address}"

    @classmethod
    async def connect(cls, reactor: object, host: str, port: int, *, helo: str, tls: str,
                      tls_hostname: str, trust_root: object = None, timeouts: Timeouts = Timeouts(),
                      bind_address: str | None = None) -> SMTPClientConnection:
        if tls not in ("opportunistic", "required", "off"):
            raise ValueError(f"tls must be opportunistic, required or off, not {tls!r}")
        if tls == "required" and not tls_hostname:
            raise ValueError("tls='required' needs tls_hostname")
        endpoint_type = TCP6ClientEndpoint if ipaddress.ip_address(host).version == 6 else TCP4ClientEndpoint
        endpoint = endpoint_type(reactor, host, port, timeout=timeouts.connect,
                                 bindAddress=(bind_address, 0) if bind_address else None)
        wire = _Wire(reactor)
        try:
            await endpoint.connect(_QuietFactory(wire))
        except net_error.TimeoutError as e:
            raise SMTPClientError(f"connect to [{host}]:{port} timed out", stage="timeout") from e
        except Exception as e:
            raise SMTPClientError(f"connect to [{host}]:{port} failed: {e}", stage="connect") from e
        conn = cls(reactor, wire, host, port, helo, tls_hostname, timeouts)
        try:
            await conn._open(tls, tls_hostname, trust_root)
        except BaseException as e:
            await conn._close(abort=True)
            log.warn("SMTP session with {peer} failed: {error}", peer=conn._log_peer, error=str(e),
                     stage=getattr(e, "stage", None), code=getattr(getattr(e, "reply", None), "code", None))
            raise
        log.info("SMTP session with {peer} ready (tls={tls_active})", peer=conn._log_peer,
                 tls_active=conn.tls_active, stage="ehlo")
        return conn

    async def _open(self, tls: str, tls_hostname: str, trust_root: object) -> None:
        greeting = await self._read("greeting", self._t.greeting)
        if greeting.code // 100 != 2:
            await self._quit_quietly()  # RFC 5321 §3.1: after a 554 greeting, the client SHOULD QUIT
            raise SMTPClientError("server refused the session", stage="greeting", reply=greeting)
        name = greeting.text.partition("\n")[0].partition(" ")[0]
        if _DOMAIN.fullmatch(name):
            self.peer_name = name
        await self._hello()
        if tls == "off":
            return
        if "STARTTLS" not in self.extensions:
            if tls == "required":
                await self._quit_quietly()
                raise SMTPClientError("TLS required but the server does not offer STARTTLS",
                                      stage="starttls", temporary=True)
            return
        reply = await self._command("STARTTLS", "starttls", self._t.ehlo)
        if reply.code != 220:
            if tls == "required" or reply.code == 421:
                await self._quit_quietly()
                raise SMTPClientError("STARTTLS refused", stage="starttls", reply=reply, temporary=True)
            return  # RFC 3207 §4: the session goes on as before, in plaintext
        if self._wire.replies or self._wire.parser.pending:
            # RFC 3207 §4.2: nothing sent before the handshake counts; a server that sent
            # something anyway is injecting responses.
            self._wire.fail("server sent data after its 220 to STARTTLS", "starttls", abort=True)
            raise self._wire.error("starttls")
        if tls == "required":
            creator = verified_client(tls_hostname, trust_root)
        else:
            creator = opportunistic_client(tls_hostname)
        self._wire.transport.startTLS(creator)
        await self._wire.wait("tls", self._t.ehlo, lambda: self._wire.handshake_done)
        self.tls_active = True
        await self._hello()  # RFC 3207 §4.2: forget what the server said before TLS

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self._helo}", "ehlo", self._t.ehlo)
        if reply.permanent:  # RFC 5321 §3.2: fall back to HELO
            reply = await self._command(f"HELO {self._helo}", "ehlo", self._t.ehlo)
            if reply.code // 100 == 2:
                self.extensions = {}
                return
        if reply.code // 100 != 2:
            await self._quit_quietly()
            raise SMTPClientError("EHLO/HELO refused", stage="ehlo", reply=reply)
        extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _sp, rest = line.strip().partition(" ")
            if keyword:
                extensions[keyword.upper()] = rest
        self.extensions = extensions

    # -- transactions ---------------------------------------------------------------------

    async def send(self, sender: str, recipients: Sequence[str], message: bytes | pathlib.Path, *,
                   size: int | None = None, eight_bit: bool = False,
                   smtputf8: bool = False) -> TransactionResult:
        recipients = list(recipients)
        if not recipients:
            raise ValueError("no recipients")
        for address in (sender, *recipients):
            if any(c in address for c in "\r\n\0"):  # no command injection through an address
                raise SMTPClientError(f"invalid address {address!r}", stage="mail", temporary=False)
        ext = self.extensions
        if size is None:
            size = message.stat().st_size if isinstance(message, pathlib.Path) else len(message)
        limit = ext.get("SIZE", "").strip()
        if limit.isdigit() and int(limit) and size > int(limit):  # RFC 1870 §6: don't even try
            raise SMTPClientError(f"message size {size} exceeds the server's limit of {limit} bytes",
                                  stage="size", temporary=False)
        params = [f"SIZE={size}"] if "SIZE" in ext else []
        if eight_bit and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")  # RFC 6152
        # eight_bit without 8BITMIME: sent as is. We do not downgrade to 7bit (RFC 6152 §3
        # would have us); nearly every server takes 8-bit data anyway.
        if smtputf8:
            if "SMTPUTF8" not in ext:  # RFC 6531 §3.2
                raise SMTPClientError("5.6.7 the server does not support SMTPUTF8", stage="mail",
                                      temporary=False)
            params.append("SMTPUTF8")
        self._enter()
        fh = None
        try:
            fh = message.open("rb") if isinstance(message, pathlib.Path) else None
            result = await self._transaction(sender, recipients, params, fh or message)
        except BaseException as e:
            if fh is not None or not isinstance(message, pathlib.Path):
                if not getattr(e, "_keep", False):  # all but a refused MAIL: close
                    await self._close(abort=True)
            log.warn("SMTP transaction with {peer} failed: {error}", peer=self._log_peer,
                     error=str(e), stage=getattr(e, "stage", None),
                     code=getattr(getattr(e, "reply", None), "code", None))
            raise
        finally:
            self._busy = False
            if fh is not None:
                fh.close()
        log.info("SMTP transaction with {peer}: {accepted}/{total} recipients accepted, data {code}",
                 peer=self._log_peer, accepted=sum(r.code // 100 == 2 for r in result.recipients.values()),
                 total=len(recipients), code=result.data.code if result.data else None, stage="data")
        return result

    async def _transaction(self, sender: str, recipients: list[str], params: list[str],
                           source: bytes | IO[bytes]) -> TransactionResult:
        mail = " ".join([f"MAIL FROM:<{sender}>", *params])
        rcpts = [f"RCPT TO:<{r}>" for r in recipients]
        pipelined = "PIPELINING" in self.extensions
        replies: dict[str, ServerReply] = {}
        data_reply: ServerReply | None = None
        if pipelined:  # RFC 2920 §3.1: DATA ends the group
            self._wire.write_commands([mail, *rcpts, "DATA"])
            mail_reply = _check(await self._read("mail", self._t.mail), "mail", 2)
            for r in recipients:
                replies[r] = _check(await self._read("rcpt", self._t.rcpt), "rcpt", 2)
            data_reply = _check(await self._read("data", self._t.data_init), "data", 3)
            if data_reply.code == 354 and (mail_reply.code // 100 != 2 or not _accepted(replies)):
                # RFC 2920 §3.1: a 354 with no valid recipient: end the (empty) message.
                self._wire.write_commands(["."])
                await self._read("data", self._t.data_end)
        else:
            mail_reply = _check(await self._command(mail, "mail", self._t.mail), "mail", 2)
            if mail_reply.code // 100 == 2:
                for r, line in zip(recipients, rcpts):
                    replies[r] = _check(await self._command(line, "rcpt", self._t.rcpt), "rcpt", 2)
        if mail_reply.code // 100 != 2:
            await self._rset_or_close()
            refused = SMTPClientError("sender refused", stage="mail", reply=mail_reply)
            refused._keep = True  # type: ignore[attr-defined]  # the connection stays usable
            raise refused
        if not _accepted(replies):
            await self._rset_or_close()
            return TransactionResult(replies, None)
        if not pipelined:
            data_reply = _check(await self._command("DATA", "data", self._t.data_init), "data", 3)
        assert data_reply is not None
        if data_reply.code != 354:
            await self._rset_or_close()
            return TransactionResult(replies, data_reply)
        await self._write_body(source)
        final = _check(await self._read("data", self._t.data_end), "data", 2)
        return TransactionResult(replies, final)

    async def _write_body(self, source: bytes | IO[bytes]) -> None:
        wire = self._wire
        encoder = _BodyEncoder()
        wire.transport.registerProducer(wire, True)
        try:
            for chunk in _chunks(source):
                out = encoder.feed(chunk)
                if out:
                    wire.transport.write(out)
                    await wire.drain(self._t.data_block)
            wire.owed += 1  # the reply to the final dot
            wire.transport.write(encoder.finish())
        finally:
            if wire.connected:
                wire.transport.unregisterProducer()

    async def reset(self) -> None:
        """RSET (RFC 5321 §4.1.1.5); a refusal closes the connection and raises."""
        self._enter()
        try:
            await self._rset()
        finally:
            self._busy = False

    async def quit(self) -> None:
        """QUIT, wait (bounded) for the 221, close. Never raises."""
        try:
            await self._quit_quietly()
        except BaseException:
            log.failure("closing SMTP session with {peer}", peer=self._log_peer)
            self.abort()

    def abort(self) -> None:
        """Drop the connection now (the socket closes on the next reactor turn)."""
        self._wire.fail("connection aborted", None, abort=True)

    # -- helpers --------------------------------------------------------------------------

    def _enter(self) -> None:
        if self._busy:
            raise RuntimeError("SMTPClientConnection: one operation at a time")
        if self._wire.failure is not None:
            raise self._wire.error("connect")
        self._busy = True

    async def _read(self, stage: str, timeout: float) -> ServerReply:
        try:
            return await self._wire.read(stage, timeout)
        except SMTPClientError:
            await self._close(abort=True)
            raise

    async def _command(self, line: str, stage: str, timeout: float) -> ServerReply:
        if self._wire.failure is not None:
            raise self._wire.error(stage)
        self._wire.write_commands([line])
        return await self._read(stage, timeout)

    async def _rset(self) -> None:
        reply = await self._command("RSET", "rset", self._t.mail)
        if reply.code // 100 != 2:
            await self._close(abort=True)
            raise SMTPClientError("RSET refused", stage="rset", reply=reply, temporary=True)

    async def _rset_or_close(self) -> None:
        try:
            await self._rset()
        except SMTPClientError as e:
            log.warn("RSET failed on {peer}: {error}", peer=self._log_peer, error=str(e), stage="rset")

    async def _quit_quietly(self) -> None:
        if self._wire.failure is None and self._wire.connected:
            try:
                await self._command("QUIT", "quit", self._t.quit)
            except SMTPClientError:
                pass
        await self._close(abort=False)

    async def _close(self, abort: bool) -> None:
        wire = self._wire
        if wire.connected and wire.failure is None and not abort:
            wire.fail("connection closed", None)
            closed = wire.when_closed()
            wire.transport.loseConnection()
            timer = self._reactor.callLater(self._t.quit, wire.abort)
            await closed
            if timer.active():
                timer.cancel()
        wire.fail("connection closed", None, abort=True)
        await wire.when_closed()


def _accepted(replies: dict[str, ServerReply]) -> bool:
    return any(r.code // 100 == 2 for r in replies.values())


def _check(reply: ServerReply, stage: str, positive: int) -> ServerReply:
    """A reply must be the expected positive class, 4xx or 5xx; anything else is a violation."""
    if reply.code // 100 not in (positive, 4, 5):
        raise SMTPClientError("unexpected reply", stage=stage, reply=reply, temporary=True)
    return reply
