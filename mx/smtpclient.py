"""Our outbound ESMTP client: one connection to one MX, several transactions, a reply per recipient.

It answers for everything between "TCP connect to an IP address" and "QUIT": greeting, EHLO
(HELO fallback), the STARTTLS policy (or implicit TLS, RFC 8314), AUTH at a smarthost,
MAIL/RCPT/DATA with or without PIPELINING, streaming the body, and the RFC 5321 timeouts.
DNS, retries and queue state belong to `relay`; the reply parser and the body encoder are the
sans-IO wire pieces in `mx.smtp`.

Invariants:
- Replies are matched to commands by count: the server may only send as many replies as we
  have sent commands (plus the greeting). Anything more, a malformed reply line, a line over
  4096 octets or a reply over 64 KiB aborts the connection (no desynchronisation, no
  response injection).
- After the 220 to STARTTLS, any byte the server sent in plaintext is a protocol error and
  aborts the connection (RFC 3207 §4.2, the "NO STARTTLS" class); after the handshake, the
  EHLO is repeated and only its extensions count (RFC 3207 §4.2).
- Credentials are only ever sent over TLS: with `auth`, a server without STARTTLS, a refused
  STARTTLS or a failed handshake is a temporary error before any AUTH is written (RFC 4954
  §4 lets a client refuse plaintext mechanisms). The certificate is verified when `tls` is
  "required", else the session is encrypted without verification (Postfix's "encrypt").
  AUTH PLAIN with an initial response (RFC 4616) when offered, else AUTH LOGIN; a 5xx answer
  is permanent (stage "auth"), a 4xx temporary. The password is never logged or put into an
  error message.
- `implicit_tls`: TLS from the first byte (port 465, RFC 8314 §3); the greeting is read only
  after the handshake, and STARTTLS is never sent.
- The body is dot-stuffed across chunk boundaries (RFC 5321 §4.5.2): a "." that begins any
  line, including the first and one that begins a chunk, is doubled; a trailing CR is held
  back so a CRLF is never split. Bare CR or LF are sent as CRLF (RFC 5321 §2.3.8), so no
  bare LF ever reaches the wire; the message always ends with CRLF before "." CRLF
  (RFC 5321 §4.1.1.4). The body is written a chunk at a time (64 KiB from bytes and files),
  waiting for the transport to drain (IPushProducer) before the next chunk is asked for, so
  a large message is never buffered whole a second time.
- Every wait for a reply has its RFC 5321 §4.5.3.2 timeout; a timeout aborts the connection.
  A fatal error (timeout, lost connection, protocol violation) always closes the connection
  before it is raised; a refused MAIL, RCPT or DATA never does (RSET keeps it usable, and the
  error says so in `connection_usable`).
- The body comes from `bytes`, a `BodySource` (`await read_chunk()`, b"" at the end: the
  relay reads the spool file in its disk pool, so the reactor thread never waits on the disk),
  or a `pathlib.Path`, which is read with plain blocking reads of 64 KiB (as FileSender does;
  for tests and tools). A source that raises mid-DATA aborts the connection, so a truncated
  message never gets its final dot; its exception reaches the caller unchanged (a Path that
  cannot be read is an SMTPClientError at stage "body").
"""

from __future__ import annotations

import base64
import ipaddress
import os
import pathlib
import re
import stat
import typing
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import IO, Callable, Sequence

from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from mx.config import ConfigError, RelayConfig, RelayTLS
from mx.fasttcp import direct_connect
from mx.smtp import MAX_REPLY, MAX_REPLY_LINE, BodyEncoder, MalformedReply, ReplyParser, ServerReply
from mx.tls import opportunistic_client, verified_client

__all__ = ["Timeouts", "Stage", "ServerReply", "SMTPClientError", "TransactionResult",
           "SMTPClientConnection", "BodySource", "ReplyParser", "MalformedReply", "BodyEncoder",
           "CHUNK_SIZE", "MAX_REPLY", "MAX_REPLY_LINE", "read_password_file", "smarthost_auth"]

log = Logger()

CHUNK_SIZE = 64 * 1024  # body bytes read and written at a time
MAX_PASSWORD_FILE = 4096  # octets read from the smarthost password file
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


class Stage(StrEnum):
    """Where a session or transaction failed (a str, so `e.stage == "mail"` keeps working)."""

    CONNECT = "connect"  # TCP connect, or the connection was found closed before a command
    TIMEOUT = "timeout"  # no progress within an RFC 5321 §4.5.3.2 timeout
    GREETING = "greeting"
    EHLO = "ehlo"
    STARTTLS = "starttls"
    TLS = "tls"  # the handshake (STARTTLS or implicit)
    AUTH = "auth"  # RFC 4954, at a smarthost
    MAIL = "mail"
    SIZE = "size"  # refused before MAIL: larger than the server's SIZE (RFC 1870 §6)
    RCPT = "rcpt"
    DATA = "data"
    BODY = "body"  # our own copy of the message could not be read
    RSET = "rset"
    QUIT = "quit"


class SMTPClientError(Exception):
    """A transaction or connection failed; `temporary` says whether a retry may help.

    `peer` names who answered ("name[address]"; the relay fills it in when it knows better);
    `connection_usable` is true when the session is still fine for the next transaction (a
    refused MAIL after a successful RSET, a message too big for the server).
    """

    stage: Stage
    reply: ServerReply | None
    temporary: bool
    peer: str
    connection_usable: bool

    def __init__(self, message: str, *, stage: Stage | str, reply: ServerReply | None = None,
                 temporary: bool | None = None, peer: str = "", connection_usable: bool = False) -> None:
        super().__init__(f"{message}: {reply}" if reply is not None else message)
        self.stage = Stage(stage)
        self.reply = reply
        self.temporary = (not reply.permanent if reply is not None else True) if temporary is None else temporary
        self.peer = peer
        self.connection_usable = connection_usable


@typing.runtime_checkable
class BodySource(typing.Protocol):
    """A message body handed over chunk by chunk, so reading it need not block the reactor.

    `read_chunk()` returns the next bytes (any length, boundaries anywhere: the encoder
    stuffs across them) and b"" at the end; it may be a coroutine or return a Deferred.
    `send()` needs `size=` with a BodySource. If it raises, `send()` aborts the connection
    and re-raises that exception as it is.
    """

    async def read_chunk(self) -> bytes: ...


class _BytesSource:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data)
        self._at = 0

    async def read_chunk(self) -> bytes:
        chunk = bytes(self._view[self._at : self._at + CHUNK_SIZE])
        self._at += len(chunk)
        return chunk


class _FileSource:
    """Blocking reads on the calling (reactor) thread: for `pathlib.Path` bodies only."""

    def __init__(self, fh: IO[bytes]) -> None:
        self._fh = fh

    async def read_chunk(self) -> bytes:
        try:
            return self._fh.read(CHUNK_SIZE)
        except OSError as e:
            raise SMTPClientError(f"cannot read the message: {e.strerror or e}", stage=Stage.BODY,
                                  temporary=True) from None


@dataclass(frozen=True)
class TransactionResult:
    recipients: dict[str, ServerReply]  # the reply to each RCPT, in the order given
    data: ServerReply | None  # after the final dot (or the refusal of DATA); None: nobody accepted

    def outcome(self, rcpt: str) -> ServerReply:
        reply = self.recipients[rcpt]
        if reply.code // 100 != 2 or self.data is None:
            return reply
        return self.data


def read_password_file(path: pathlib.Path) -> str:
    """The smarthost password: the first line of `path`, without its line ending.

    Blocking; call it once at start-up. The file must be a regular file that neither group
    nor others may read or write (mode 0600, 0400 or stricter); anything else, an empty
    first line or bytes that are not UTF-8 is a one-line `ConfigError` naming
    `relay.smarthost_password_file`. The password itself never appears in a message.
    """
    key = "relay.smarthost_password_file"
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{key}: {path} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigError(f"{key}: {path} may be read by group or others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}); make it 0600 (chmod 600)")
            data = f.read(MAX_PASSWORD_FILE)
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror or e}") from None
    line = data.split(b"\n", 1)[0].removesuffix(b"\r")
    try:
        password = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path}: the password is not UTF-8") from None
    if not password:
        raise ConfigError(f"{key}: {path}: the first line (the password) is empty")
    if "\0" in password:
        raise ConfigError(f"{key}: {path}: the password contains a NUL byte")
    return password


def smarthost_auth(relay: RelayConfig) -> tuple[str, str] | None:
    """`(user, password)` for `SMTPClientConnection.connect(auth=...)`, or None without
    credentials. Reads the password file (blocking): call it at start-up."""
    if not relay.smarthost_user or relay.smarthost_password_file is None:
        return None
    return relay.smarthost_user, read_password_file(relay.smarthost_password_file)


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

    def __init__(self, reactor: IReactorTime, implicit_tls: object = None) -> None:
        self.reactor = reactor
        self.parser = ReplyParser()
        self.replies: deque[ServerReply] = deque()
        self.owed = 1  # the greeting
        self.connected = False
        self.failure: tuple[str, Stage | None, ServerReply | None] | None = None
        self._waiter: tuple[Deferred, Stage, Callable[[], bool]] | None = None
        self._implicit_tls = implicit_tls  # a client connection creator: TLS from the first byte
        self._timer: object = None
        self._closed: list[Deferred] = []
        self._lost = False
        self._paused = False
        self.handshake_done = False

    # -- Twisted callbacks -------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        if hasattr(self.transport, "setTcpNoDelay"):
            # Commands and bodies are written at once (mx.fasttcp): a second small write
            # before the first is acknowledged must not wait for the peer's delayed ACK.
            self.transport.setTcpNoDelay(True)
        if self._implicit_tls is not None:
            self.transport.startTLS(self._implicit_tls)  # RFC 8314 §3: before any SMTP byte

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

    def fail(self, message: str, stage: Stage | None, reply: ServerReply | None = None,
             abort: bool = False) -> None:
        if self.failure is None:
            self.failure = (message, stage, reply)
        if abort:
            self.abort()
        self._wake()

    def abort(self) -> None:
        if self.connected and self.transport is not None and not self._lost:
            self.transport.abortConnection()

    def error(self, stage: Stage) -> SMTPClientError:
        assert self.failure is not None
        message, fixed, reply = self.failure
        return SMTPClientError(message, stage=fixed or stage, reply=reply, temporary=True)

    def wait(self, stage: Stage, timeout: float, ready: Callable[[], bool]) -> Deferred:
        """Fire when `ready()` is true, fail on failure or after `timeout` seconds."""
        if ready():
            return succeed(None)
        if self.failure is not None:
            return fail(self.error(stage))
        d: Deferred = Deferred()
        self._waiter = (d, stage, ready)
        self._timer = self.reactor.callLater(timeout, self._timed_out, stage, timeout)
        return d

    def _timed_out(self, stage: Stage, timeout: float) -> None:
        self._timer = None
        self.fail(f"no progress at stage {stage.value!r} within {timeout:g}s", Stage.TIMEOUT, abort=True)

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

    async def read(self, stage: Stage, timeout: float) -> ServerReply:
        await self.wait(stage, timeout, lambda: bool(self.replies))
        return self.replies.popleft()

    async def drain(self, timeout: float) -> None:
        # RFC 5321 §4.5.3.2.5: each block written must be taken within the data timeout.
        await self.wait(Stage.DATA, timeout, lambda: not self._paused)

    def when_closed(self) -> Deferred:
        if self._lost or self.transport is None:
            return succeed(None)
        d: Deferred = Deferred()
        self._closed.append(d)
        return d


class SMTPClientConnection:
    """One SMTP session to one server. Methods must not run concurrently."""

    def __init__(self, reactor: IReactorTime, wire: _Wire, host: str, port: int, helo: str,
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
    async def connect(cls, reactor: IReactorTime, host: str, port: int, *, helo: str, tls: RelayTLS | str,
                      tls_hostname: str, trust_root: object = None, timeouts: Timeouts = Timeouts(),
                      bind_address: str | None = None, auth: tuple[str, str] | None = None,
                      implicit_tls: bool = False) -> SMTPClientConnection:
        """Connect to `host` (an IP address), greet, EHLO, TLS per `tls`, AUTH with `auth`.

        `reactor` provides IReactorTCP and IReactorTime. `auth` = (user, password) makes TLS
        mandatory whatever `tls` says (only "required" also verifies the certificate);
        `implicit_tls` starts TLS before the greeting (port 465, RFC 8314).
        """
        try:
            mode = RelayTLS(tls)
        except ValueError:
            raise ValueError(f"tls must be opportunistic, required or off, not {tls!r}") from None
        if mode is RelayTLS.REQUIRED and not tls_hostname:
            raise ValueError("tls='required' needs tls_hostname")
        if auth is not None and (not all(auth) or any("\0" in part for part in auth)):
            raise ValueError("auth needs a user and a password, without NUL")
        endpoint_type = TCP6ClientEndpoint if ipaddress.ip_address(host).version == 6 else TCP4ClientEndpoint
        endpoint = endpoint_type(direct_connect(reactor), host, port, timeout=timeouts.connect,
                                 bindAddress=(bind_address, 0) if bind_address else None)
        wire = _Wire(reactor, _tls_creator(mode, tls_hostname, trust_root) if implicit_tls else None)
        try:
            await endpoint.connect(_QuietFactory(wire))
        except net_error.TimeoutError as e:
            raise SMTPClientError(f"connect to [{host}]:{port} timed out", stage=Stage.TIMEOUT) from e
        except Exception as e:
            raise SMTPClientError(f"connect to [{host}]:{port} failed: {e}", stage=Stage.CONNECT) from e
        conn = cls(reactor, wire, host, port, helo, tls_hostname, timeouts)
        try:
            await conn._open(mode, tls_hostname, trust_root, auth, implicit_tls)
        except BaseException as e:
            await conn._close(abort=True)
            log.warn("SMTP session with {peer} failed: {error}", peer=conn._log_peer, error=str(e),
                     stage=getattr(e, "stage", None), code=getattr(getattr(e, "reply", None), "code", None))
            raise
        log.info("SMTP session with {peer} ready (tls={tls_active}, auth={auth})", peer=conn._log_peer,
                 tls_active=conn.tls_active, auth=auth is not None, implicit_tls=implicit_tls, stage=Stage.EHLO)
        return conn

    async def _open(self, tls: RelayTLS, tls_hostname: str, trust_root: object,
                    auth: tuple[str, str] | None, implicit_tls: bool) -> None:
        if implicit_tls:
            # RFC 8314 §3: the handshake comes first; the greeting arrives inside TLS.
            await self._wire.wait(Stage.TLS, self._t.greeting, lambda: self._wire.handshake_done)
            self.tls_active = True
        greeting = await self._read(Stage.GREETING, self._t.greeting)
        if greeting.code // 100 != 2:
            await self._quit_quietly()  # RFC 5321 §3.1: after a 554 greeting, the client SHOULD QUIT
            raise SMTPClientError("server refused the session", stage=Stage.GREETING, reply=greeting)
        name = greeting.text.partition("\n")[0].partition(" ")[0]
        if _DOMAIN.fullmatch(name):
            self.peer_name = name
        await self._hello()
        if not self.tls_active and (tls is not RelayTLS.OFF or auth is not None):
            await self._starttls(tls, tls_hostname, trust_root, for_auth=auth is not None)
        if auth is not None:
            await self._authenticate(*auth)

    async def _starttls(self, tls: RelayTLS, tls_hostname: str, trust_root: object, for_auth: bool) -> None:
        must = tls is RelayTLS.REQUIRED or for_auth
        why = " (credentials are never sent without TLS)" if for_auth else ""
        if "STARTTLS" not in self.extensions:
            if must:
                await self._quit_quietly()
                raise SMTPClientError(f"TLS required but the server does not offer STARTTLS{why}",
                                      stage=Stage.STARTTLS, temporary=True)
            return
        reply = await self._command("STARTTLS", Stage.STARTTLS, self._t.ehlo)
        if reply.code != 220:
            if must or reply.code == 421:
                await self._quit_quietly()
                raise SMTPClientError(f"STARTTLS refused{why}", stage=Stage.STARTTLS, reply=reply,
                                      temporary=True)
            return  # RFC 3207 §4: the session goes on as before, in plaintext
        if self._wire.replies or self._wire.parser.pending:
            # RFC 3207 §4.2: nothing sent before the handshake counts; a server that sent
            # something anyway is injecting responses.
            self._wire.fail("server sent data after its 220 to STARTTLS", Stage.STARTTLS, abort=True)
            raise self._wire.error(Stage.STARTTLS)
        self._wire.transport.startTLS(_tls_creator(tls, tls_hostname, trust_root))
        await self._wire.wait(Stage.TLS, self._t.ehlo, lambda: self._wire.handshake_done)
        self.tls_active = True
        await self._hello()  # RFC 3207 §4.2: forget what the server said before TLS

    async def _authenticate(self, user: str, password: str) -> None:
        """RFC 4954 AUTH: PLAIN with an initial response (RFC 4616), else LOGIN. Over TLS only."""
        if not self.tls_active:  # unreachable: _open makes TLS mandatory with credentials
            raise SMTPClientError("refusing to send credentials without TLS", stage=Stage.AUTH, temporary=True)
        offered = {m.upper() for key, rest in self.extensions.items()
                   if key == "AUTH" or key.startswith("AUTH=")
                   for m in [key[5:], *rest.split()] if m}
        if "PLAIN" in offered:
            mechanism = "PLAIN"
            token = _b64("\0" + user + "\0" + password)  # RFC 4616 §2: no authzid
            reply = await self._command(f"AUTH PLAIN {token}", Stage.AUTH, self._t.ehlo)
        elif "LOGIN" in offered:
            mechanism = "LOGIN"  # draft-murchison-sasl-login: username, then password, each asked for
            reply = await self._command("AUTH LOGIN", Stage.AUTH, self._t.ehlo)
            for answer in (user, password):
                if reply.code != 334:
                    break
                reply = await self._command(_b64(answer), Stage.AUTH, self._t.ehlo)
        else:
            await self._quit_quietly()
            raise SMTPClientError(
                f"the server offers no AUTH PLAIN or LOGIN (AUTH {' '.join(sorted(offered)) or 'not offered'})",
                stage=Stage.AUTH, temporary=True)
        if reply.code == 334:  # a challenge we have no answer for: cancel (RFC 4954 §4)
            await self._command("*", Stage.AUTH, self._t.ehlo)
            await self._quit_quietly()
            raise SMTPClientError(f"unexpected AUTH {mechanism} challenge", stage=Stage.AUTH, reply=reply,
                                  temporary=True)
        if reply.code == 235:
            log.info("authenticated to {peer} as {user} with AUTH {mechanism}", peer=self._log_peer, user=user,
                     mechanism=mechanism, stage=Stage.AUTH)
            return
        await self._quit_quietly()
        if reply.code // 100 in (4, 5):  # 535 5.7.8 bad credentials: permanent, the mail bounces
            raise SMTPClientError(f"AUTH {mechanism} as {user} refused", stage=Stage.AUTH, reply=reply)
        raise SMTPClientError(f"unexpected reply to AUTH {mechanism}", stage=Stage.AUTH, reply=reply, temporary=True)

    async def _hello(self) -> None:
        reply = await self._command(f"EHLO {self._helo}", Stage.EHLO, self._t.ehlo)
        if reply.permanent:  # RFC 5321 §3.2: fall back to HELO
            reply = await self._command(f"HELO {self._helo}", Stage.EHLO, self._t.ehlo)
            if reply.code // 100 == 2:
                self.extensions = {}
                return
        if reply.code // 100 != 2:
            await self._quit_quietly()
            raise SMTPClientError("EHLO/HELO refused", stage=Stage.EHLO, reply=reply)
        extensions = {}
        for line in reply.text.split("\n")[1:]:
            keyword, _sp, rest = line.strip().partition(" ")
            if keyword:
                extensions[keyword.upper()] = rest
        self.extensions = extensions

    # -- transactions ---------------------------------------------------------------------

    async def send(self, sender: str, recipients: Sequence[str], message: bytes | pathlib.Path | BodySource,
                   *, size: int | None = None, eight_bit: bool = False,
                   smtputf8: bool = False) -> TransactionResult:
        """One transaction. `message` is the body as bytes, a `BodySource` (then `size` is
        required) or a `pathlib.Path` (read with blocking reads: tests and tools)."""
        recipients = list(recipients)
        if not recipients:
            raise ValueError("no recipients")
        in_memory = isinstance(message, (bytes, bytearray, memoryview))
        if size is None and not (in_memory or isinstance(message, pathlib.Path)):
            raise ValueError("send() needs size= with a BodySource")
        for address in (sender, *recipients):
            if any(c in address for c in "\r\n\0"):  # no command injection through an address
                raise SMTPClientError(f"invalid address {address!r}", stage=Stage.MAIL, temporary=False,
                                      connection_usable=True)
        fh: IO[bytes] | None = None
        if isinstance(message, pathlib.Path):
            try:
                fh = message.open("rb")
                if size is None:
                    size = os.fstat(fh.fileno()).st_size
            except OSError as e:
                if fh is not None:
                    fh.close()
                raise SMTPClientError(f"cannot read the message: {e.strerror or e}", stage=Stage.BODY,
                                      temporary=True, connection_usable=True) from None
        try:
            if size is None:
                size = len(message)  # type: ignore[arg-type]  # bytes-like here
            params = self._mail_params(size, eight_bit, smtputf8)
            source: BodySource = (_FileSource(fh) if fh is not None
                                  else _BytesSource(message) if in_memory else message)  # type: ignore[arg-type]
            self._enter()
            try:
                result = await self._transaction(sender, recipients, params, source)
            except BaseException as e:
                if not (isinstance(e, SMTPClientError) and e.connection_usable):
                    await self._close(abort=True)
                log.warn("SMTP transaction with {peer} failed: {error}", peer=self._log_peer,
                         error=str(e), stage=getattr(e, "stage", None),
                         code=getattr(getattr(e, "reply", None), "code", None))
                raise
            finally:
                self._busy = False
        finally:
            if fh is not None:
                fh.close()
        log.info("SMTP transaction with {peer}: {accepted}/{total} recipients accepted, data {code}",
                 peer=self._log_peer, accepted=sum(r.code // 100 == 2 for r in result.recipients.values()),
                 total=len(recipients), code=result.data.code if result.data else None, stage=Stage.DATA)
        return result

    def _mail_params(self, size: int, eight_bit: bool, smtputf8: bool) -> list[str]:
        """MAIL FROM parameters; refuses what this server cannot take before any command."""
        ext = self.extensions
        limit = ext.get("SIZE", "").strip()
        if limit.isdigit() and int(limit) and size > int(limit):  # RFC 1870 §6: don't even try
            raise SMTPClientError(f"message size {size} exceeds the server's limit of {limit} bytes",
                                  stage=Stage.SIZE, temporary=False, connection_usable=True)
        params = [f"SIZE={size}"] if "SIZE" in ext else []
        if eight_bit and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")  # RFC 6152
        # eight_bit without 8BITMIME: sent as is. We do not downgrade to 7bit (RFC 6152 §3
        # would have us); nearly every server takes 8-bit data anyway.
        if smtputf8:
            if "SMTPUTF8" not in ext:  # RFC 6531 §3.2
                raise SMTPClientError("5.6.7 the server does not support SMTPUTF8", stage=Stage.MAIL,
                                      temporary=False, connection_usable=True)
            params.append("SMTPUTF8")
        return params

    async def _transaction(self, sender: str, recipients: list[str], params: list[str],
                           source: BodySource) -> TransactionResult:
        mail = " ".join([f"MAIL FROM:<{sender}>", *params])
        rcpts = [f"RCPT TO:<{r}>" for r in recipients]
        pipelined = "PIPELINING" in self.extensions
        replies: dict[str, ServerReply] = {}
        data_reply: ServerReply | None = None
        if pipelined:  # RFC 2920 §3.1: DATA ends the group
            self._wire.write_commands([mail, *rcpts, "DATA"])
            mail_reply = _check(await self._read(Stage.MAIL, self._t.mail), Stage.MAIL, 2)
            for r in recipients:
                replies[r] = _check(await self._read(Stage.RCPT, self._t.rcpt), Stage.RCPT, 2)
            data_reply = _check(await self._read(Stage.DATA, self._t.data_init), Stage.DATA, 3)
            if data_reply.code == 354 and (mail_reply.code // 100 != 2 or not _accepted(replies)):
                # RFC 2920 §3.1: a 354 with no valid recipient: end the (empty) message.
                self._wire.write_commands(["."])
                await self._read(Stage.DATA, self._t.data_end)
        else:
            mail_reply = _check(await self._command(mail, Stage.MAIL, self._t.mail), Stage.MAIL, 2)
            if mail_reply.code // 100 == 2:
                for r, line in zip(recipients, rcpts):
                    replies[r] = _check(await self._command(line, Stage.RCPT, self._t.rcpt), Stage.RCPT, 2)
        if mail_reply.code // 100 != 2:
            await self._rset_or_close()
            raise SMTPClientError("sender refused", stage=Stage.MAIL, reply=mail_reply,
                                  connection_usable=self._wire.failure is None)
        if not _accepted(replies):
            await self._rset_or_close()
            return TransactionResult(replies, None)
        if not pipelined:
            data_reply = _check(await self._command("DATA", Stage.DATA, self._t.data_init), Stage.DATA, 3)
        assert data_reply is not None
        if data_reply.code != 354:
            await self._rset_or_close()
            return TransactionResult(replies, data_reply)
        await self._write_body(source)
        final = _check(await self._read(Stage.DATA, self._t.data_end), Stage.DATA, 2)
        return TransactionResult(replies, final)

    async def _write_body(self, source: BodySource) -> None:
        wire = self._wire
        encoder = BodyEncoder()
        wire.transport.registerProducer(wire, True)
        try:
            # Each block is written once the next one is read, so the last goes out with the
            # final dot in one write (one send per message of one block).
            held = b""
            while True:
                # A source's own exception propagates unchanged (send() aborts the connection:
                # the message must not end with a final dot).
                chunk = await source.read_chunk()
                if not chunk:
                    break
                if wire.failure is not None:  # lost while we read: say so, don't write into the void
                    raise wire.error(Stage.DATA)
                out = encoder.feed(chunk)
                if out:
                    if held:
                        wire.transport.write(held)
                        await wire.drain(self._t.data_block)
                    held = out
            if wire.failure is not None:
                raise wire.error(Stage.DATA)
            wire.owed += 1  # the reply to the final dot
            wire.transport.write(held + encoder.finish())
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
            raise self._wire.error(Stage.CONNECT)
        self._busy = True

    async def _read(self, stage: Stage, timeout: float) -> ServerReply:
        try:
            return await self._wire.read(stage, timeout)
        except SMTPClientError:
            await self._close(abort=True)
            raise

    async def _command(self, line: str, stage: Stage, timeout: float) -> ServerReply:
        if self._wire.failure is not None:
            raise self._wire.error(stage)
        self._wire.write_commands([line])
        return await self._read(stage, timeout)

    async def _rset(self) -> None:
        reply = await self._command("RSET", Stage.RSET, self._t.mail)
        if reply.code // 100 != 2:
            await self._close(abort=True)
            raise SMTPClientError("RSET refused", stage=Stage.RSET, reply=reply, temporary=True)

    async def _rset_or_close(self) -> None:
        try:
            await self._rset()
        except SMTPClientError as e:
            log.warn("RSET failed on {peer}: {error}", peer=self._log_peer, error=str(e), stage=Stage.RSET)

    async def _quit_quietly(self) -> None:
        if self._wire.failure is None and self._wire.connected:
            try:
                await self._command("QUIT", Stage.QUIT, self._t.quit)
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


def _check(reply: ServerReply, stage: Stage, positive: int) -> ServerReply:
    """A reply must be the expected positive class, 4xx or 5xx; anything else is a violation."""
    if reply.code // 100 not in (positive, 4, 5):
        raise SMTPClientError("unexpected reply", stage=stage, reply=reply, temporary=True)
    return reply


def _tls_creator(tls: RelayTLS, hostname: str, trust_root: object) -> object:
    """A verified context for "required", else encryption without verification (SNI sent)."""
    if tls is RelayTLS.REQUIRED:
        return verified_client(hostname, trust_root)
    return opportunistic_client(hostname)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")
