"""The listeners and their connections: which services run, who is connected, who may connect.

Every service (smtp, submission, submissions, pop3, pop3s, imap, imaps) registers its factory
here; every connection is admitted and released here, so the per-address and the global
limits hold over all services together, and one `shutdown(grace)` drains them all.

Invariants:
- `admit` and `release` are paired: a connection counts from an admit that returned None
  until its `release`; a refused connection never counted. The counts never go negative
  and an address whose count reaches zero is forgotten (memory bounded by live connections).
- Clients are counted by `client_key`: the IPv4 address (also when IPv4-mapped), or the
  /64 of an IPv6 address (one host's usual share).
- `limits.max_connections` bounds all services together; `limits.max_connections_per_ip`
  bounds one client over all services.
- A draining service admits nobody; its live connections are asked to close when idle and
  are aborted after `grace` seconds on the clock given (a `Clock` in tests).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from enum import Enum, StrEnum
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from mx.config import LimitsConfig

__all__ = ["Connection", "ConnectionRegistry", "Listener", "ListenerFactory", "Refusal", "Service", "WriteGate",
           "client_key"]

log = Logger()


class Service(StrEnum):
    """A listening service; the value is its `[listen]` key."""

    SMTP = "smtp"
    SUBMISSION = "submission"
    SUBMISSIONS = "submissions"
    POP3 = "pop3"
    POP3S = "pop3s"
    IMAP = "imap"
    IMAPS = "imaps"

    @property
    def implicit_tls(self) -> bool:
        """TLS from the first byte (RFC 8314)."""
        return self in (Service.SUBMISSIONS, Service.POP3S, Service.IMAPS)

    @property
    def submission(self) -> bool:
        """A mail submission port (RFC 6409): AUTH, then relay anywhere."""
        return self in (Service.SUBMISSION, Service.SUBMISSIONS)


class Refusal(Enum):
    """Why a connection is not admitted; each protocol words it (421, BYE, -ERR)."""

    SHUTTING_DOWN = "shutting down"
    TOO_MANY_FROM_CLIENT = "too many connections from your address"
    TOO_MANY = "too many connections"


class Connection(TypingProtocol):
    """What the registry needs of a live connection."""

    @property
    def service(self) -> Service: ...

    @property
    def client(self) -> str: ...

    def close_when_idle(self) -> None:
        """Say goodbye now if idle, else after the command in progress."""

    def abort(self) -> None:
        """Drop the connection at once (the drain's grace time is over)."""


class Listener(TypingProtocol):
    """A registered factory: one per service."""

    def shutdown(self, grace: float = ...) -> Deferred[None]: ...


def client_key(ip: str) -> str:
    """Per-client accounting key: the address, or its /64 for IPv6 (one host's range)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(addr)


class ConnectionRegistry:
    """The registered listeners and every live connection, with the shared limits."""

    def __init__(self, limits: LimitsConfig, clock: IReactorTime) -> None:
        self.limits = limits
        self.clock = clock
        self.per_ip: Counter[str] = Counter()
        self.listeners: dict[Service, Listener] = {}
        self._live: dict[Service, set[Connection]] = {}
        self._draining: set[Service] = set()
        self._drained: dict[Service, Deferred[None]] = {}
        self._total = 0

    def register(self, service: Service, listener: Listener) -> None:
        if service in self.listeners and self.listeners[service] is not listener:
            raise ValueError(f"{service} is already registered")
        self.listeners[service] = listener
        self._live.setdefault(service, set())

    # -- accounting ----------------------------------------------------------------------

    @property
    def total(self) -> int:
        """Live connections over all services."""
        return self._total

    def live(self, service: Service) -> frozenset[Connection]:
        return frozenset(self._live.get(service, ()))

    def draining(self, service: Service) -> bool:
        return service in self._draining

    def admit(self, conn: Connection) -> Refusal | None:
        """Count `conn` in, or say why it may not come in (then it is not counted)."""
        if conn.service in self._draining:
            return Refusal.SHUTTING_DOWN
        if self._total >= self.limits.max_connections:
            return Refusal.TOO_MANY
        if self.per_ip[conn.client] >= self.limits.max_connections_per_ip:
            return Refusal.TOO_MANY_FROM_CLIENT
        self.per_ip[conn.client] += 1
        self._total += 1
        self._live.setdefault(conn.service, set()).add(conn)
        return None

    def release(self, conn: Connection) -> None:
        """The admitted `conn` is gone (call once, from connectionLost)."""
        live = self._live.get(conn.service)
        if live is None or conn not in live:
            return
        live.discard(conn)
        self._total -= 1
        self.per_ip[conn.client] -= 1
        if self.per_ip[conn.client] <= 0:
            del self.per_ip[conn.client]
        if not live and conn.service in self._drained:
            self._drained.pop(conn.service).callback(None)

    # -- draining ------------------------------------------------------------------------

    def drain(self, service: Service, grace: float = 10.0) -> Deferred[None]:
        """Admit nobody more to `service`; close its connections when idle, abort them after
        `grace` seconds; fires when none is left."""
        self._draining.add(service)
        for conn in list(self._live.get(service, ())):
            conn.close_when_idle()
        if not self._live.get(service):
            return defer.succeed(None)
        d = self._drained.get(service)
        if d is None:
            d = self._drained[service] = Deferred()
            timer: IDelayedCall = self.clock.callLater(grace, self._abort, service)

            def done(result: None) -> None:
                if timer.active():
                    timer.cancel()
                return result

            d.addBoth(done)
        # Each caller gets its own Deferred, so one caller's callbacks never delay another.
        mine: Deferred[None] = Deferred()
        d.addBoth(lambda r: (mine.callback(None), r)[1])
        return mine

    def _abort(self, service: Service) -> None:
        conns = list(self._live.get(service, ()))
        if conns:
            log.info("aborting {count} connections on {service} after the grace time",
                     count=len(conns), service=str(service))
        for conn in conns:
            conn.abort()

    def shutdown(self, grace: float = 10.0) -> Deferred[None]:
        """Drain every registered listener (through its own `shutdown`), all at once."""
        ds = [listener.shutdown(grace) for listener in self.listeners.values()]
        return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)


class ListenerFactory(ServerFactory):
    """What every service's factory shares: its `Service`, its place in the registry (its
    own registry when none is given, as in tests that run one service), and the drain."""

    noisy = False
    service: Service
    registry: ConnectionRegistry

    def _join(self, kind: Service | str, allowed: tuple[Service, ...], what: str, limits: LimitsConfig,
              clock: IReactorTime, registry: ConnectionRegistry | None) -> None:
        self.service = Service(kind)
        if self.service not in allowed:
            raise ValueError(f"{self.service} is not {what}")
        self.registry = registry if registry is not None else ConnectionRegistry(limits, clock)
        self.registry.register(self.service, self)

    @property
    def kind(self) -> Service:
        return self.service

    @property
    def connections(self) -> frozenset[Connection]:
        return self.registry.live(self.service)

    def shutdown(self, grace: float = 10.0) -> Deferred[None]:
        """Stop: idle connections are told goodbye now, busy ones after their command or
        commit; the rest are cut after `grace` seconds."""
        return self.registry.drain(self.service, grace)


@implementer(IPushProducer)
class WriteGate:
    """A transport's view of a long response (RETR, a big FETCH): paused while the socket's
    buffer is full; `wait()` fires once the transport takes more, or when it stops."""

    def __init__(self) -> None:
        self.paused = False
        self._waiting: list[Deferred[None]] = []

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self.release()

    def stopProducing(self) -> None:
        self.paused = False
        self.release()

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def release(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
