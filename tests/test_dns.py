"""Tests for mx.dns against a real twisted.names server on loopback.

The server is authoritative for `test` (so unknown names get NXDOMAIN) and answers SERVFAIL
for `servfail.test`. Timeouts use a socket that never answers, driven by a `Clock` where the
sequence allows it; truncation uses a tiny UDP responder that always sets TC while
twisted.names answers on the same port over TCP (twisted.names itself never truncates).
"""

from __future__ import annotations

import random
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.names import authority, error, server
from twisted.names import dns as tdns
from twisted.trial.unittest import SkipTest, TestCase

from mx.dns import MXHost, PermanentDNSError, Resolver, TemporaryDNSError, _TCPTry, _UDPTry

BIG_COUNT = 40


class ServFail(Exception):
    """Raised by the test authority; twisted.names turns any non-DomainError into SERVFAIL."""


def _zone() -> list[tuple[str, Any]]:
    return [
        ("example.test", tdns.Record_MX(10, b"mx1.example.test")),
        ("example.test", tdns.Record_MX(20, b"MX2.example.test")),
        ("example.test", tdns.Record_MX(20, b"mx3.example.test")),
        ("mx1.example.test", tdns.Record_A("127.0.0.2")),
        ("mx1.example.test", tdns.Record_AAAA("::1")),
        ("mx2.example.test", tdns.Record_A("127.0.0.3")),
        ("mx3.example.test", tdns.Record_A("127.0.0.4")),
        ("alias.example.test", tdns.Record_CNAME(b"mx2.example.test")),
        ("aonly.test", tdns.Record_A("127.0.0.5")),
        ("nullmx.test", tdns.Record_MX(0, b"")),
        ("noaddr.test", tdns.Record_MX(10, b"nothing.noaddr.test")),
        ("noaddr.test", tdns.Record_MX(20, b"gone.nx.test")),
        ("halfbroken.test", tdns.Record_MX(10, b"servfail.test")),
        ("halfbroken.test", tdns.Record_MX(20, b"mx3.example.test")),
        ("big.test", tdns.Record_MX(10, b"many.big.test")),
        *[("many.big.test", tdns.Record_A(f"127.1.0.{i}")) for i in range(1, BIG_COUNT + 1)],
    ]


class ZoneAuthority(authority.FileAuthority):
    """Authoritative for `test`, records given in code (FileAuthority does the lookups)."""

    def __init__(self, records: list[tuple[str, Any]]) -> None:
        self._zone = records
        super().__init__(None)

    def loadFile(self, _: object) -> None:
        soa = tdns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1, refresh=60,
                              retry=60, expire=60, minimum=60)
        self.soa = (b"test", soa)
        self.records = {b"test": [soa]}
        for name, record in self._zone:
            self.records.setdefault(name.encode().lower(), []).append(record)


class ServFailAuthority(authority.FileAuthority):
    """SERVFAIL for servfail.test; DomainError (next authority, please) for anything else."""

    def __init__(self) -> None:
        super().__init__(None)

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Deferred[Any]:
        if name.lower() == b"servfail.test":
            return defer.fail(ServFail(name))
        return defer.fail(error.DomainError(name))


class TrackingFactory(server.DNSServerFactory):
    """A DNSServerFactory whose TCP connections the test can wait to be closed."""

    def connectionLost(self, protocol: Any) -> None:
        super().connectionLost(protocol)
        if not self.connections:
            waiting, self._waiting = getattr(self, "_waiting", []), []
            for d in waiting:
                d.callback(None)

    def all_closed(self) -> Deferred[None]:
        if not self.connections:
            return defer.succeed(None)
        for p in self.connections:
            p.transport.loseConnection()
        d: Deferred[None] = Deferred()
        self.__dict__.setdefault("_waiting", []).append(d)
        return d


class Silent(DatagramProtocol):
    """A nameserver that never answers; counts what it was sent."""

    noisy = False

    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.received += 1


class Truncating(DatagramProtocol):
    """Answers every UDP query with an empty, TC-flagged reply."""

    noisy = False

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        reply = dns.message.make_response(dns.message.from_wire(data))
        reply.flags |= dns.flags.TC
        self.transport.write(reply.to_wire(), addr)


class Tricky(DatagramProtocol):
    """Before the real answer, sends a wrong id, a wrong question and a forged reply from
    another port: all must be ignored."""

    noisy = False

    def __init__(self, forger: DatagramProtocol) -> None:
        self.forger = forger

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        query = dns.message.from_wire(data)
        wrong_id = dns.message.make_response(query)
        wrong_id.id ^= 1
        other = dns.message.make_response(dns.message.make_query("other.test", "A"))
        other.id = query.id
        forged = self.answer(query, "10.6.6.6")
        for bad in (wrong_id, other):
            self.transport.write(bad.to_wire(), addr)
        self.forger.transport.write(forged.to_wire(), addr)
        self.transport.write(b"\x00garbage", addr)
        self.transport.write(self.answer(query, "127.0.0.9").to_wire(), addr)

    @staticmethod
    def answer(query: dns.message.Message, address: str) -> dns.message.Message:
        reply = dns.message.make_response(query)
        reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", address))
        return reply


class ClockReactor(Clock):
    """Real UDP/TCP sockets, fake time: timeouts advance only when the test says so."""

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        return reactor.listenUDP(*args, **kwargs)

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        return reactor.connectTCP(*args, **kwargs)


class DNSTests(TestCase):
    def setUp(self) -> None:
        self.factory = TrackingFactory(authorities=[ServFailAuthority(), ZoneAuthority(_zone())])
        self.factory.noisy = False
        self.port = self.serve(tdns.DNSDatagramProtocol(controller=self.factory), self.factory)

    def serve(self, udp: DatagramProtocol, tcp: Any = None, host: str = "127.0.0.1") -> int:
        """Listen on `host` with `udp`, and with `tcp` on the same port number."""
        if tcp is None:
            udp_port = reactor.listenUDP(0, udp, interface=host)
            self.addCleanup(udp_port.stopListening)
            return udp_port.getHost().port
        for _ in range(20):  # TCP first: a failed UDP bind leaves `udp` unattached
            tcp_port = reactor.listenTCP(0, tcp, interface=host)
            number = tcp_port.getHost().port
            self.addCleanup(tcp_port.stopListening)
            try:
                udp_port = reactor.listenUDP(number, udp, interface=host)
            except CannotListenError:
                continue
            self.addCleanup(udp_port.stopListening)
            self.addCleanup(tcp.all_closed)
            return number
        self.fail("no port free for both UDP and TCP")

    def resolver(self, *ports: int, timeout: float = 2.0, attempts: int = 2, seed: int = 1,
                 clock: Any = reactor) -> Resolver:
        servers = [("127.0.0.1", p) for p in ports or (self.port,)]
        return Resolver(clock, servers, timeout, attempts, rng=random.Random(seed))

    async def assert_fails(self, coro: Any, kind: type[Exception]) -> Any:
        try:
            await coro
        except kind as e:
            return e
        self.fail(f"{kind.__name__} not raised")

    # --- MX -------------------------------------------------------------------------------

    async def test_preference_order_and_addresses(self) -> None:
        hosts = await self.resolver().mx_hosts("Example.Test.")
        self.assertEqual(hosts[0], MXHost("mx1.example.test", 10, ("::1", "127.0.0.2")))
        self.assertEqual([h.preference for h in hosts], [10, 20, 20])
        self.assertEqual({h.name for h in hosts[1:]}, {"mx2.example.test", "mx3.example.test"})
        self.assertEqual({h.addresses for h in hosts[1:]}, {("127.0.0.3",), ("127.0.0.4",)})

    async def test_equal_preferences_shuffled(self) -> None:
        resolver = self.resolver(seed=7)
        orders = set()
        for _ in range(12):
            hosts = await resolver.mx_hosts("example.test")
            self.assertEqual(hosts[0].name, "mx1.example.test")
            orders.add(tuple(h.name for h in hosts[1:]))
        self.assertEqual(orders, {("mx2.example.test", "mx3.example.test"),
                                  ("mx3.example.test", "mx2.example.test")})

    async def test_implicit_mx(self) -> None:
        hosts = await self.resolver().mx_hosts("aonly.test")
        self.assertEqual(hosts, [MXHost("aonly.test", 0, ("127.0.0.5",))])

    async def test_null_mx(self) -> None:
        e = await self.assert_fails(self.resolver().mx_hosts("nullmx.test"), PermanentDNSError)
        self.assertEqual(e.reply_code, "5.1.10")
        self.assertFalse(e.temporary)
        self.assertIn("null MX", str(e))

    async def test_nxdomain(self) -> None:
        e = await self.assert_fails(self.resolver().mx_hosts("nx.test"), PermanentDNSError)
        self.assertEqual(e.reply_code, "5.1.2")
        self.assertIn("does not exist", str(e))
        self.assertEqual(await self.resolver().addresses("nx.test"), ())

    async def test_no_address_for_any_mx(self) -> None:
        e = await self.assert_fails(self.resolver().mx_hosts("noaddr.test"), PermanentDNSError)
        self.assertIn("no address for any MX host", str(e))

    async def test_servfail(self) -> None:
        resolver = self.resolver(attempts=1)
        e = await self.assert_fails(resolver.mx_hosts("servfail.test"), TemporaryDNSError)
        self.assertEqual(e.reply_code, "4.4.3")
        self.assertTrue(e.temporary)
        await self.assert_fails(resolver.addresses("servfail.test"), TemporaryDNSError)
        self.flushLoggedErrors(ServFail)  # twisted.names log.err()s the failing authority

    async def test_mx_host_servfail_others_used(self) -> None:
        hosts = await self.resolver(attempts=1).mx_hosts("halfbroken.test")
        self.assertEqual(hosts, [MXHost("mx3.example.test", 20, ("127.0.0.4",))])
        self.flushLoggedErrors(ServFail)

    # --- addresses and raw queries --------------------------------------------------------

    async def test_addresses_follow_cname(self) -> None:
        self.assertEqual(await self.resolver().addresses("alias.example.test"), ("127.0.0.3",))

    async def test_query_returns_raw_message(self) -> None:
        reply = await self.resolver().query("nx.test", "A")
        self.assertEqual(reply.rcode(), dns.rcode.NXDOMAIN)

    async def test_truncated_reply_retried_over_tcp(self) -> None:
        port = self.serve(Truncating(), self.factory)
        hosts = await self.resolver(port).mx_hosts("big.test")
        self.assertEqual(len(hosts), 1)
        self.assertEqual(len(hosts[0].addresses), BIG_COUNT)
        self.assertEqual(hosts[0].addresses[0], "127.1.0.1")

    async def test_mismatched_replies_ignored(self) -> None:
        forger = DatagramProtocol()
        self.serve(forger)
        port = self.serve(Tricky(forger))
        reply = await self.resolver(port, attempts=1).query("example.test", "A")
        self.assertEqual([r.address for r in reply.answer[0]], ["127.0.0.9"])

    async def test_ipv6_nameserver_with_tcp_fallback(self) -> None:
        try:
            port = self.serve(Truncating(), self.factory, host="::1")
        except CannotListenError:
            raise SkipTest("no IPv6 loopback")
        resolver = Resolver(reactor, [("::1", port)], 2.0)
        hosts = await resolver.mx_hosts("example.test")
        self.assertEqual(hosts[0], MXHost("mx1.example.test", 10, ("::1", "127.0.0.2")))

    # --- timeouts and failover ------------------------------------------------------------

    async def advance(self, clock: Clock, seconds: float, pending: int = 1) -> None:
        """Once `pending` timers wait (real sockets settle in between), move time on."""
        for _ in range(1000):
            if len(clock.getDelayedCalls()) >= pending:
                break
            await deferLater(reactor, 0.001)
        else:
            self.fail(f"never saw {pending} pending timers")
        clock.advance(seconds)

    async def test_timeout_is_temporary(self) -> None:
        silent = Silent()
        clock = ClockReactor()
        resolver = self.resolver(self.serve(silent), timeout=5, attempts=2, clock=clock)
        d = Deferred.fromCoroutine(resolver.addresses("example.test"))
        await self.advance(clock, 5, pending=2)  # AAAA and A together, first attempt
        await self.advance(clock, 5, pending=2)  # second attempt
        e = await self.assert_fails(d, TemporaryDNSError)
        self.assertIn("timeout", str(e))
        self.assertEqual(silent.received, 4)
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_second_nameserver_used(self) -> None:
        silent = Silent()
        clock = ClockReactor()
        resolver = self.resolver(self.serve(silent), self.port, timeout=5, clock=clock)
        d = Deferred.fromCoroutine(resolver.mx_hosts("aonly.test"))
        await self.advance(clock, 5)  # MX: silent, then the real one answers: no MX
        await self.advance(clock, 5, pending=2)  # AAAA and A: silent, then the real one
        self.assertEqual(await d, [MXHost("aonly.test", 0, ("127.0.0.5",))])
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_real_time_timeout(self) -> None:
        resolver = self.resolver(self.serve(Silent()), timeout=0.1, attempts=2)
        await self.assert_fails(resolver.query("example.test", "MX"), TemporaryDNSError)

    async def test_refused_port_is_temporary(self) -> None:
        udp = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        closed = udp.getHost().port
        await udp.stopListening()
        resolver = self.resolver(closed, self.port, timeout=5)
        self.assertEqual(await resolver.addresses("aonly.test"), ("127.0.0.5",))

    async def test_cancel_cleans_up(self) -> None:
        d = self.resolver(self.serve(Silent()), timeout=30).query("example.test", "MX")
        await deferLater(reactor, 0.01)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        await deferLater(reactor, 0.01)
        self.assertEqual(self.open_sockets(), [])

    # --- hygiene ----------------------------------------------------------------------------

    def open_sockets(self) -> list[Any]:
        return [s for s in reactor.getReaders() + reactor.getWriters()
                if isinstance(getattr(s, "protocol", None), (_UDPTry, _TCPTry))]

    async def test_nothing_left_open(self) -> None:
        port = self.serve(Truncating(), self.factory)
        await self.resolver().mx_hosts("example.test")
        await self.resolver(port).mx_hosts("big.test")
        self.assertEqual(self.open_sockets(), [])
        timers = [c for c in reactor.getDelayedCalls()
                  if isinstance(getattr(c.func, "__self__", None), (_UDPTry, _TCPTry))]
        self.assertEqual(timers, [])

    def test_system_nameservers(self) -> None:
        resolver = Resolver(reactor, [], 1.0)
        for host, port in resolver.nameservers:
            self.assertEqual(port, 53)

