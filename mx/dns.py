"""DNS for the relay: MX hosts and addresses of a domain, from dnspython messages sent over
Twisted UDP (TCP when truncated), never blocking the reactor.

Invariants:
- Names are always absolute (no search list); exchange names come back lower-case without
  the trailing dot.
- Each try uses a fresh, connected UDP socket (random source port and query id) and accepts
  only a reply from the server asked whose id and question match; anything else is ignored.
- A try ends with its timer cancelled and its socket closed *before* its result is delivered,
  whether it answered, timed out, failed or was cancelled: no leaked DelayedCalls or ports.
- `query` returns raw messages; the rcode is interpreted only by `addresses` and `mx_hosts`:
  NXDOMAIN and null MX are permanent, SERVFAIL/REFUSED/timeouts temporary (RFC 5321 §5.1,
  RFC 7505). An empty answer never becomes a bounce while a lookup failed temporarily.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol, Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

__all__ = ["DNSError", "MXHost", "PermanentDNSError", "Resolver", "TemporaryDNSError"]

log = Logger()

EDNS_PAYLOAD = 1232  # DNS flag day 2020: avoids IP fragmentation
MAX_CNAME_CHAIN = 8


class DNSError(Exception):
    """A lookup that did not give a usable answer; `reply_code` is the enhanced status code."""

    temporary: bool = True
    default_code: str = "4.4.3"

    def __init__(self, text: str, reply_code: str | None = None) -> None:
        super().__init__(text)
        self.reply_code: str = reply_code or self.default_code


class TemporaryDNSError(DNSError):
    """SERVFAIL, REFUSED, timeout or network error: try again later (RFC 3463 4.4.3)."""


class PermanentDNSError(DNSError):
    """NXDOMAIN, null MX or no address at all: bounce now."""

    temporary = False
    default_code = "5.1.2"


@dataclass(frozen=True)
class MXHost:
    name: str  # lower-case, no trailing dot
    preference: int
    addresses: tuple[str, ...]  # IPv6 first, then IPv4


def _records(msg: dns.message.Message, qname: dns.name.Name, rdtype: int) -> list[Any]:
    """The rdatas of type `rdtype` for `qname` in the answer, following CNAMEs found there."""
    name = qname
    for _ in range(MAX_CNAME_CHAIN):
        rrset = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, rdtype)
        if rrset is not None:
            return list(rrset)
        cname = msg.get_rrset(msg.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            return []
        name = cname[0].target
    return []


def _parse_reply(data: bytes) -> dns.message.Message | None:
    try:
        return dns.message.from_wire(data, raise_on_truncation=True)
    except dns.message.Truncated as e:
        return e.message()  # header and question at least; the caller retries over TCP
    except Exception as e:  # malformed datagrams are noise, not errors
        log.info("DNS: unparsable reply ignored: {error}", error=repr(e))
        return None


class _Try:
    """One query to one server; `deferred` fires once the socket is closed."""

    def __init__(self, reactor: Any, request: dns.message.Message,
                 server: tuple[str, int], timeout: float) -> None:
        self.reactor = reactor
        self.request = request
        self.wire = request.to_wire()
        self.server = server
        self.timeout = timeout
        self.deferred: Deferred[dns.message.Message] = Deferred(self._cancel)
        self._timer: Any = None
        self._outcome: dns.message.Message | Failure | None = None

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _deliver(self, _: object = None) -> None:
        self._stop_timer()
        if not self.deferred.called:
            assert self._outcome is not None
            if isinstance(self._outcome, Failure):
                self.deferred.errback(self._outcome)
            else:
                self.deferred.callback(self._outcome)

    def _matches(self, msg: dns.message.Message | None) -> bool:
        if msg is None or not self.request.is_response(msg):
            log.info("DNS: ignored reply that does not match the query to {server}",
                     server=self.server[0])
            return False
        return True

    def _cancel(self, _: Deferred[dns.message.Message]) -> None:
        self._stop_timer()


class _UDPTry(_Try, DatagramProtocol):
    noisy = False

    def start(self) -> Deferred[dns.message.Message]:
        host = self.server[0]
        try:
            self.port = self.reactor.listenUDP(0, self, interface="::" if ":" in host else "")
        except CannotListenError as e:
            return defer.fail(TemporaryDNSError(f"cannot open a UDP socket: {e}"))
        self._timer = self.reactor.callLater(self.timeout, self._timed_out)
        try:
            self.transport.connect(host, self.server[1])  # kernel filters other sources
            self.transport.write(self.wire)
        except OSError as e:
            self._finish(Failure(TemporaryDNSError(f"cannot send to {host}: {e}")))
        return self.deferred

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if self._outcome is not None or addr[1] != self.server[1] or (
                ipaddress.ip_address(addr[0]) != ipaddress.ip_address(self.server[0])):
            return  # connect() already makes the kernel drop other sources
        msg = _parse_reply(data)
        if self._matches(msg):
            assert msg is not None
            self._finish(msg)

    def connectionRefused(self) -> None:
        self._finish(Failure(TemporaryDNSError(f"{self.server[0]}: port unreachable")))

    def stopProtocol(self) -> None:
        # The epoll reactor closes a connected UDP port itself on EPOLLERR (an ICMP port
        # unreachable) without calling connectionRefused; the socket closes as we return.
        if self._outcome is None:
            self._outcome = Failure(TemporaryDNSError(f"{self.server[0]}: port unreachable"))
            self._deliver()

    def _timed_out(self) -> None:
        self._timer = None
        self._finish(Failure(TemporaryDNSError(f"timeout waiting for {self.server[0]}")))

    def _finish(self, outcome: dns.message.Message | Failure) -> None:
        if self._outcome is not None:
            return
        self._outcome = outcome
        self._stop_timer()
        defer.maybeDeferred(self.port.stopListening).addBoth(self._deliver)

    def _cancel(self, d: Deferred[dns.message.Message]) -> None:
        super()._cancel(d)
        if self._outcome is None:
            self._outcome = Failure(defer.CancelledError())
            self.port.stopListening()


class _TCPTry(_Try, Int16StringReceiver):
    def start(self) -> Deferred[dns.message.Message]:
        host, port = self.server
        endpoint_type = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        endpoint = endpoint_type(self.reactor, host, port, timeout=self.timeout)
        self._timer = self.reactor.callLater(self.timeout, self._timed_out)
        factory = Factory.forProtocol(lambda: self)
        factory.noisy = False
        self._connecting: Deferred[Any] | None = endpoint.connect(factory)
        self._connecting.addCallbacks(lambda _: setattr(self, "_connecting", None),
                                      self._connect_failed)
        return self.deferred

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        if self._outcome is None:
            self._outcome = Failure(TemporaryDNSError(
                f"TCP connection to {self.server[0]} failed: {reason.getErrorMessage()}"))
        self._deliver()

    def connectionMade(self) -> None:
        self.sendString(self.wire)

    def stringReceived(self, data: bytes) -> None:
        if self._outcome is not None:
            return
        msg = _parse_reply(data)
        if self._matches(msg):
            assert msg is not None
            self._outcome = msg
            self._stop_timer()
            self.transport.loseConnection()

    def connectionLost(self, reason: object = None) -> None:
        if self._outcome is None:
            self._outcome = Failure(TemporaryDNSError(
                f"TCP connection to {self.server[0]} closed before a reply"))
        self._deliver()

    def _timed_out(self) -> None:
        self._timer = None
        self._outcome = Failure(TemporaryDNSError(f"timeout waiting for {self.server[0]} (TCP)"))
        self._abort()

    def _abort(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()  # -> _connect_failed
        elif self.transport is not None:
            self.transport.abortConnection()  # -> connectionLost

    def _cancel(self, d: Deferred[dns.message.Message]) -> None:
        super()._cancel(d)
        if self._outcome is None:
            self._outcome = Failure(defer.CancelledError())
            self._abort()


class Resolver:
    """Stub resolver asking recursive `nameservers` in order, `attempts` rounds."""

    def __init__(self, reactor: Any, nameservers: Sequence[tuple[str, int]], timeout: float,
                 attempts: int = 2, *, rng: random.Random | None = None) -> None:
        if not nameservers:
            try:
                system = dns.resolver.Resolver(configure=True)  # reads /etc/resolv.conf only
                nameservers = [(str(ns), 53) for ns in system.nameservers]
            except dns.exception.DNSException as e:
                log.warn("DNS: no system nameservers: {error}", error=str(e))
        servers = []
        for host, port in nameservers:
            try:
                servers.append((str(ipaddress.ip_address(host)), int(port)))
            except ValueError:
                log.warn("DNS: nameserver {host!r} is not an IP address; skipped", host=host)
        self.reactor = reactor
        self.nameservers: tuple[tuple[str, int], ...] = tuple(servers)
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.rng = rng or random.Random()

    def query(self, name: str, rdtype: str) -> Deferred[dns.message.Message]:
        """The raw reply to `name`/`rdtype`; TemporaryDNSError when no server answers."""
        return Deferred.fromCoroutine(self._query(name, rdtype))

    async def _query(self, name: str, rdtype: str) -> dns.message.Message:
        qname = _absolute(name)
        last: DNSError = TemporaryDNSError("no nameservers configured")
        for attempt in range(1, self.attempts + 1):
            for server in self.nameservers:
                request = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
                try:
                    reply = await _UDPTry(self.reactor, request, server, self.timeout).start()
                    if reply.flags & dns.flags.TC:
                        log.info("DNS {qname} {rdtype}: truncated reply from {server}; using TCP",
                                 qname=name, rdtype=rdtype, server=server[0])
                        reply = await _TCPTry(self.reactor, request, server, self.timeout).start()
                    return reply
                except TemporaryDNSError as e:
                    last = e
                    log.info("DNS {qname} {rdtype}: {server} attempt {attempt} failed: {error}",
                             qname=name, rdtype=rdtype, server=server[0], attempt=attempt,
                             error=str(e))
        raise TemporaryDNSError(f"{name} {rdtype}: no answer from any nameserver ({last})")

    async def _lookup(self, name: str, rdtype: str) -> tuple[list[Any], bool]:
        """(records, nxdomain) for a NOERROR or NXDOMAIN reply; TemporaryDNSError otherwise."""
        reply = await self.query(name, rdtype)
        rcode = reply.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            return [], True
        if rcode != dns.rcode.NOERROR:
            raise TemporaryDNSError(f"{name} {rdtype}: {dns.rcode.to_text(rcode)}")
        return _records(reply, _absolute(name), dns.rdatatype.from_text(rdtype)), False

    async def addresses(self, host: str) -> tuple[str, ...]:
        """AAAA then A addresses of `host` (both asked at once); () if it has none."""
        results = await DeferredList(
            [Deferred.fromCoroutine(self._lookup(host, t)) for t in ("AAAA", "A")],
            consumeErrors=True,
        )
        found: list[str] = []
        failures: list[DNSError] = []
        nxdomain = False
        for ok, result in results:
            if not ok:
                if not result.check(TemporaryDNSError):
                    result.raiseException()  # a bad name, or a bug
                failures.append(result.value)
                continue
            records, nx = result
            nxdomain = nxdomain or nx
            for r in records:
                if r.address not in found:
                    found.append(r.address)
        if not found and failures and not nxdomain:
            # RFC 5321 §4.5.4.1: an empty answer caused by a failure is not a bounce.
            raise TemporaryDNSError(f"address lookup for {host} failed: {failures[0]}")
        return tuple(found)

    async def mx_hosts(self, domain: str) -> list[MXHost]:
        """Where to deliver mail for `domain`, most preferred first (RFC 5321 §5.1)."""
        domain = domain.rstrip(".").lower()
        records, nxdomain = await self._lookup(domain, "MX")
        if nxdomain:
            raise PermanentDNSError(f"domain {domain} does not exist", "5.1.2")
        if not records:  # RFC 5321 §5.1: implicit MX
            addrs = await self.addresses(domain)
            if not addrs:
                raise PermanentDNSError(f"{domain} has no MX and no address records", "5.1.2")
            return [MXHost(domain, 0, addrs)]
        if len(records) == 1 and records[0].exchange == dns.name.root:
            raise PermanentDNSError(  # RFC 7505 §3
                f"{domain} does not accept mail (null MX)", "5.1.10")
        by_preference: dict[int, list[str]] = {}
        seen: set[str] = set()
        for r in sorted(records, key=lambda r: r.preference):
            name = r.exchange.to_text(omit_final_dot=True).lower()
            if r.exchange != dns.name.root and name not in seen:  # "." among others: skip
                seen.add(name)
                by_preference.setdefault(r.preference, []).append(name)
        ordered: list[tuple[str, int]] = []
        for preference, names in sorted(by_preference.items()):
            self.rng.shuffle(names)  # RFC 5321 §5.1: equal preferences in random order
            ordered.extend((name, preference) for name in names)
        results = await DeferredList(
            [Deferred.fromCoroutine(self.addresses(name)) for name, _ in ordered],
            consumeErrors=True,
        )
        hosts: list[MXHost] = []
        temporary: DNSError | None = None
        for (name, preference), (ok, result) in zip(ordered, results):
            if not ok:
                if not result.check(DNSError):
                    result.raiseException()
                if result.value.temporary:
                    temporary = temporary or result.value
                log.info("DNS {domain}: MX host {host} skipped: {error}",
                         domain=domain, host=name, error=str(result.value))
            elif result:
                hosts.append(MXHost(name, preference, result))
        if hosts:
            return hosts
        if temporary is not None:
            raise TemporaryDNSError(f"no address for any MX host of {domain} yet: {temporary}")
        raise PermanentDNSError(f"no address for any MX host of {domain}", "5.4.4")


def _absolute(name: str) -> dns.name.Name:
    try:
        return dns.name.from_text(name.rstrip(".") + ".")
    except dns.exception.DNSException as e:
        raise PermanentDNSError(f"invalid domain name {name!r}: {e}", "5.1.2") from e
