"""The IMAP server protocol for the `imap` (STARTTLS) and `imaps` (implicit TLS) ports.

A thin Twisted protocol: bytes go into the sans-IO `CommandReader`, each event is handed to
the `Session` (one command at a time), and the session's bytes go out. This module owns
what is about the connection: TLS, timers, back-pressure, raw lines for AUTHENTICATE and
IDLE, the shared connection registry and the folder watch.

Invariants:
- One command at a time: while one runs, no further command is taken from the buffer (a
  raw line the command asked for is), and reading pauses once `PAUSE_BUFFER` octets wait.
- STARTTLS forgets everything the client sent after the command (RFC 3501 §6.2.1,
  CVE-2011-0411 in kind): the reader's buffer is discarded before TLS starts.
- A synchronising literal gets its `+` only after the command so far parsed, and one
  larger than `limits.max_message_size` (64 KiB before login) is refused before any of it
  is read.
- Large responses (FETCH) wait for the socket (`drain`): the transport pauses this
  protocol's producer above its buffer size, so it holds at most one batch more.
- The idle timer is `limits.imap_idle_timeout` (30 minutes, RFC 3501 §5.4); any input
  re-arms it (a new IDLE too); an IDLE gets `* OK Still here` every 2 minutes.
- Connections are admitted and released through the shared `ConnectionRegistry`; refused
  ones get `* BYE`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx.auth import Authenticator
from mx.config import Config
from mx.imap.parse import (
    MAX_LITERAL, NEED_DATA, BadCommand, Command, CommandReader, LiteralTooLarge, NeedContinuation, RawLine,
)
from mx.imap.respond import continuation, tagged, untagged_status
from mx.imap.session import Session, State
from mx.listeners import ConnectionRegistry, ListenerFactory, Service, WriteGate, client_key
from mx.tls import ServerTLS

__all__ = ["IMAPServerFactory", "IMAPServerProtocol"]

log = Logger()
T = TypeVar("T")
PAUSE_BUFFER = 256 * 1024
CLOSE_GRACE = 10.0  # seconds a closing connection may take before it is cut
MAX_ERRORS = 20  # BAD commands in a row before the connection is closed


class IMAPServerFactory(ListenerFactory):
    """One protocol per connection; counts them in the shared `ConnectionRegistry`."""

    def __init__(self, *, config: Config, reactor: IReactorFromThreads, read_pool: ThreadPool,
                 authenticator: Authenticator, watch: Any, clock: IReactorTime | None = None,
                 kind: Service | str = Service.IMAP, tls: ServerTLS | None = None,
                 implicit_tls: bool | None = None, registry: ConnectionRegistry | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.read_pool = read_pool
        self.authenticator = authenticator
        self.watch = watch
        self._join(kind, (Service.IMAP, Service.IMAPS), "an IMAP service", config.limits, self.clock, registry)
        self.tls = tls
        self.implicit_tls = self.service.implicit_tls if implicit_tls is None else implicit_tls

    def buildProtocol(self, addr: Any) -> IMAPServerProtocol:
        p = IMAPServerProtocol()
        p.factory = self
        return p

    def in_pool(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.read_pool, f, *args)


class IMAPServerProtocol(Protocol, TimeoutMixin):
    factory: IMAPServerFactory

    def __init__(self) -> None:
        self.peer_ip = ""
        self.client = ""
        self.tls_active = False
        self.session: Session | None = None
        self.reader: CommandReader | None = None
        self.errors = 0
        self.bytes_sent = 0
        self._busy = False
        self._open = False
        self._counted = False
        self._closing = False
        self._paused = False
        self._line: Deferred[bytes | None] | None = None
        self._drain = WriteGate()
        self._abort_later: Any = None

    @property
    def service(self) -> Service:
        return self.factory.service

    # -- Link, as the session sees the connection ---------------------------------------

    @property
    def tls_available(self) -> bool:
        return self.factory.tls is not None

    def write(self, data: bytes) -> None:
        if data and self.transport is not None and self._open:
            self.bytes_sent += len(data)
            self.transport.write(data)

    def start_tls(self) -> None:
        assert self.reader is not None and self.factory.tls is not None
        self.reader.discard_buffer()
        self.transport.startTLS(self.factory.tls)
        self.tls_active = True

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        # Twisted's TLS layer starts its close only once no producer is registered.
        self.transport.unregisterProducer()
        self._drain.release()
        self.transport.loseConnection()
        # A TLS peer that never answers our close_notify must not hold its slot for ever.
        self._abort_later = self.factory.clock.callLater(CLOSE_GRACE, self.transport.abortConnection)

    def read_raw_line(self) -> Deferred[bytes | None]:
        assert self.reader is not None
        self.reader.expect_raw_line()
        self._line = Deferred()
        self.factory.reactor.callLater(0, self._pump)  # the line may be in the buffer already
        return self._line

    def drain(self) -> Deferred[None]:
        """Fires when the transport takes more (it pauses us above its buffer size)."""
        if self._open and self._drain.paused:
            return self._drain.wait()
        return succeed(None)

    def in_pool(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return self.factory.in_pool(f, *args)

    def watch(self, folder: Path, callback: Callable[[], None]) -> Any:
        return self.factory.watch.subscribe(folder, callback)

    def hold(self, folder: Path) -> Any:
        return self.factory.watch.hold(folder)

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self.callLater = f.clock.callLater  # TimeoutMixin: tests pass a Clock
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "") or ""
        self.client = client_key(self.peer_ip)
        self.tls_active = f.implicit_tls
        self._open = True
        refusal = f.registry.admit(self)
        if refusal is not None:
            log.info("refused connection from {peer} on {service}: {why}", peer=self.peer_ip,
                     service=str(f.service), why=refusal.value, connections=f.registry.total)
            self.write(untagged_status("BYE", f"{f.config.hostname} {refusal.value}", "UNAVAILABLE"))
            self.close()
            return
        self._counted = True
        limits = f.config.limits
        # Before login a literal carries a name or a password: the default small bound. Only a
        # logged-in user may send APPEND literals up to the message size limit.
        self.reader = CommandReader(max_literal=MAX_LITERAL)
        self.session = Session(self, config=f.config, authenticator=f.authenticator, clock=f.clock,
                               brake=f.authenticator.brake(self.client))
        self.transport.registerProducer(self._drain, True)
        self.setTimeout(limits.imap_idle_timeout)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)
        log.info("connection from {peer} on {service}", peer=self.peer_ip, service=str(f.service))
        caps = " ".join(self.session.capability_list())
        self.write(untagged_status("OK", f"{f.config.hostname} IMAP mx ready", ["CAPABILITY", caps]))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._open = False
        if self._abort_later is not None and self._abort_later.active():
            self._abort_later.cancel()
        self.setTimeout(None)
        self._drain.release()
        line, self._line = self._line, None
        if line is not None:
            line.callback(None)
        s = self.session
        if s is not None:
            s.end()
            if s.user is not None:
                log.info("imap session of {user} from {peer} ended: {commands} commands, {octets} octets sent",
                         user=s.user, peer=self.peer_ip, commands=s.commands, octets=self.bytes_sent)
        if self._counted:
            self._counted = False
            self.factory.registry.release(self)

    def timeoutConnection(self) -> None:
        log.info("idle timeout for {peer} on {service}", peer=self.peer_ip, service=str(self.factory.service))
        self.write(untagged_status("BYE", "Disconnected for inactivity"))
        self.close()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._busy or self._line is not None:
            self.write(untagged_status("BYE", "Server shutting down", "UNAVAILABLE"))
            self.close()

    def abort(self) -> None:
        self._open = False
        self.transport.abortConnection()

    # -- input --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self.reader is None:
            return
        self.reader.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        reader = self.reader
        while self._open and reader is not None and (not self._busy or self._line is not None):
            event = reader.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, RawLine):
                line, self._line = self._line, None
                if line is not None:
                    line.callback(event.data)
                continue
            if self._line is not None:  # a command where a raw line was asked: cannot happen
                break
            if isinstance(event, Command):
                self._run(event)
            elif isinstance(event, NeedContinuation):
                self.write(continuation("Ready for literal data"))
            elif isinstance(event, LiteralTooLarge):
                self.write(tagged(event.tag, "NO", "Literal too large", "TOOBIG"))
            elif isinstance(event, BadCommand):
                self.write(tagged(event.tag, "BAD", event.text) if event.tag else
                           untagged_status("BAD", event.text))
                self.errors += 1
                if self.errors >= MAX_ERRORS:
                    self.write(untagged_status("BYE", "Too many errors"))
                    self.close()
        if self._busy and not self._paused and self._open and reader is not None and reader.buffered > PAUSE_BUFFER:
            self._paused = True
            self.transport.pauseProducing()

    def _run(self, cmd: Command) -> None:
        assert self.session is not None
        self._busy = True
        self.errors = 0
        d = Deferred.fromCoroutine(self.session.execute(cmd))
        d.addErrback(self._internal_error, cmd)
        d.addCallback(self._done)

    def _internal_error(self, failure: Failure, cmd: Command) -> bytes:
        log.failure("internal error for {peer} on {service} in {command}", failure, peer=self.peer_ip,
                    service=str(self.factory.service), command=cmd.name)
        return tagged(cmd.tag, "NO", "Internal error, try again later", "SERVERBUG")

    def _done(self, response: bytes) -> None:
        self._busy = False
        self.write(response)
        s = self.session
        if s is not None and self.reader is not None and s.state in (State.AUTHENTICATED, State.SELECTED):
            self.reader.max_literal = self.factory.config.limits.max_message_size
        if s is not None and s.state is State.LOGOUT:
            self.close()
            return
        if self._closing and self._open:
            self.write(untagged_status("BYE", "Server shutting down", "UNAVAILABLE"))
            self.close()
            return
        if self._paused and self._open:
            self._paused = False
            self.transport.resumeProducing()
        self._pump()

