"""Tests for mx.mailauth.lookup against a real twisted.names server on loopback.

`Lookup` blocks, so every call runs in a thread (`deferToThread`) while the reactor serves
DNS. The server counts the questions it is asked, which is how caching is checked: a cached
answer never reaches it. Cache expiry runs on a fake clock; timeouts and deadlines run on real
time against a UDP socket that never answers, with sub-second limits.

The scaffolding here (`serve`, `Silent`) is also used by test_spf.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.names import authority, error
from twisted.names import dns as tdns
from twisted.trial.unittest import TestCase

from mx.mailauth.lookup import Answer, BadName, Deadline, Lookup, TempError
from tests.support import zone_authority
from tests.test_dns import Silent, TrackingFactory, Truncating


class QuietServFail(Exception):
    """Answered as SERVFAIL by `CountingFactory` without the error log twisted.names writes."""


class Misbehaving(authority.FileAuthority):
    """Never answers `hang` names, SERVFAILs `servfail` names, delays `slow` ones by `delay`
    seconds (then answers from `zone`); anything else goes to the next authority."""

    def __init__(self, hang: tuple[str, ...] = (), servfail: tuple[str, ...] = (),
                 slow: tuple[str, ...] = (), zone: Any = None, delay: float = 0.3) -> None:
        self.hang = {n.lower().encode() for n in hang}
        self.servfail = {n.lower().encode() for n in servfail}
        self.slow = {n.lower().encode() for n in slow}
        self.zone = zone
        self.delay = delay
        super().__init__(None)

    def loadFile(self, _: object) -> None:
        self.soa = None
        self.records = {}

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Deferred[Any]:
        key = name.lower()
        if key in self.hang:
            return Deferred()  # no reply, ever
        if key in self.servfail:
            return defer.fail(QuietServFail(name))
        if key in self.slow:
            d = deferLater(reactor, self.delay, lambda: None)
            d.addCallback(lambda _: self.zone._lookup(name, cls, type, timeout))
            return d
        return defer.fail(error.DomainError(name))


class CountingFactory(TrackingFactory):
    """A DNS server that records every question: `(name, type name)`, names lower-case."""

    noisy = False

    def __init__(self, authorities: list[Any]) -> None:
        super().__init__(authorities=authorities)
        self.queries: list[tuple[str, str]] = []

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> None:
        for q in message.queries:
            self.queries.append((q.name.name.decode("latin-1").lower(), tdns.QUERY_TYPES.get(q.type, str(q.type))))
        super().handleQuery(message, protocol, address)

    def asked(self, name: str, rdtype: str) -> int:
        return self.queries.count((name.lower(), rdtype))

    def gotResolverError(self, failure: Any, protocol: Any, message: Any, address: Any) -> None:
        if failure.check(QuietServFail):
            self.sendReply(protocol, self._responseFromMessage(message=message, rCode=tdns.ESERVER), address)
            return
        super().gotResolverError(failure, protocol, message, address)


def listen_silent(case: TestCase) -> tuple[int, Silent]:
    silent = Silent()
    port = reactor.listenUDP(0, silent, interface="127.0.0.1")
    case.addCleanup(port.stopListening)
    return port.getHost().port, silent


def serve(case: TestCase, zones: dict[str, list[tuple[str, Any]]], *, hang: tuple[str, ...] = (),
          servfail: tuple[str, ...] = (), slow: tuple[str, ...] = (),
          udp: DatagramProtocol | None = None) -> tuple[int, CountingFactory]:
    """A twisted.names server on 127.0.0.1, UDP and TCP on one port, authoritative for each
    origin in `zones` (`{origin: [(name, Record_*)]}`); stopped at cleanup. `udp` replaces
    the UDP side (e.g. `Truncating`)."""
    zone_authorities = [zone_authority(records, origin) for origin, records in zones.items()]
    slow_zone = None
    if slow:
        slow_zone = zone_authorities[0]
    factory = CountingFactory([Misbehaving(hang, servfail, slow, slow_zone), *zone_authorities])
    if udp is None:
        udp = tdns.DNSDatagramProtocol(controller=factory)
        udp.noisy = False
    for _ in range(20):  # TCP first: a failed UDP bind leaves `udp` unattached
        tcp_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        number = tcp_port.getHost().port
        try:
            udp_port = reactor.listenUDP(number, udp, interface="127.0.0.1")
        except CannotListenError:
            tcp_port.stopListening()
            continue
        case.addCleanup(tcp_port.stopListening)
        case.addCleanup(udp_port.stopListening)
        case.addCleanup(factory.all_closed)
        return number, factory
    raise AssertionError("no port free for both UDP and TCP")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


SOA_MINIMUM = 60  # tests.support.zone_authority's SOA: minimum 60, expire 60

ZONE = [
    ("multi.test", tdns.Record_TXT(b"v=spf1 ", b"ip4:192.0.2.1", b" -all", ttl=300)),
    ("multi.test", tdns.Record_TXT(b"second record", ttl=300)),
    ("octets.test", tdns.Record_TXT(b"caf\xe9", ttl=300)),
    ("short.test", tdns.Record_TXT(b"short-lived", ttl=10)),
    ("zero.test", tdns.Record_TXT(b"do not keep", ttl=0)),
    ("host.test", tdns.Record_A("192.0.2.7", ttl=300)),
    ("host.test", tdns.Record_A("192.0.2.8", ttl=300)),
    ("host.test", tdns.Record_AAAA("2001:db8::7", ttl=300)),
    ("mail.test", tdns.Record_MX(10, b"MX1.Host.Test", ttl=300)),
    ("mail.test", tdns.Record_MX(20, b"mx2.host.test", ttl=300)),
    ("nullmx.test", tdns.Record_MX(0, b"", ttl=300)),
    ("alias.test", tdns.Record_CNAME(b"host.test", ttl=120)),
    ("nodata.test", tdns.Record_A("192.0.2.9", ttl=300)),
    *[(f"n{i}.test", tdns.Record_TXT(f"name {i}".encode(), ttl=300)) for i in range(5)],
    ("big.test", tdns.Record_TXT(*[b"x" * 250] * 8, ttl=300)),
    ("slow.test", tdns.Record_TXT(b"worth the wait", ttl=300)),
]
REVERSE = [
    ("7.2.0.192.in-addr.arpa", tdns.Record_PTR(b"Host.Test", ttl=300)),
    ("7.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
     tdns.Record_PTR(b"host.test", ttl=300)),
]


class LookupTests(TestCase):
    def setUp(self) -> None:
        self.port, self.server = serve(self, {"test": ZONE, "arpa": REVERSE},
                                       hang=("hang.test",), servfail=("servfail.test",), slow=("slow.test",))
        self.clock = FakeClock()

    def lookup(self, *ports: int, timeout: float = 2.0, **kwargs: Any) -> Lookup:
        servers = [("127.0.0.1", p) for p in ports or (self.port,)]
        return Lookup(servers, timeout, clock=kwargs.pop("clock", self.clock), **kwargs)

    # --- answers -------------------------------------------------------------------------

    async def test_txt_strings_joined_per_record(self) -> None:
        answer = await deferToThread(self.lookup().txt, "multi.test")
        self.assertEqual(sorted(answer.texts), ["second record", "v=spf1 ip4:192.0.2.1 -all"])
        self.assertEqual(sorted(answer.raw), [b"second record", b"v=spf1 ip4:192.0.2.1 -all"])
        self.assertEqual(answer.records, answer.texts)
        self.assertFalse(answer.void)
        self.assertFalse(answer.nxdomain)

    async def test_txt_octets_survive_as_latin1(self) -> None:
        answer = await deferToThread(self.lookup().txt, "octets.test")
        self.assertEqual(answer.raw, (b"caf\xe9",))
        self.assertEqual(answer.texts, ("caf\xe9",))

    async def test_addresses_mx_and_ptr(self) -> None:
        lookup = self.lookup()
        a = await deferToThread(lookup.a, "host.test")
        self.assertEqual(sorted(a.records), ["192.0.2.7", "192.0.2.8"])
        self.assertEqual(a.texts, ())
        aaaa = await deferToThread(lookup.aaaa, "host.test")
        self.assertEqual(aaaa.records, ("2001:db8::7",))
        mx = await deferToThread(lookup.mx, "mail.test")
        self.assertEqual(sorted(mx.records), [(10, "mx1.host.test"), (20, "mx2.host.test")])
        null = await deferToThread(lookup.mx, "nullmx.test")
        self.assertEqual(null.records, ((0, ""),))
        ptr4 = await deferToThread(lookup.ptr, "192.0.2.7")
        self.assertEqual(ptr4.records, ("host.test",))
        ptr6 = await deferToThread(lookup.ptr, "2001:db8::7")
        self.assertEqual(ptr6.records, ("host.test",))

    async def test_cname_followed(self) -> None:
        answer = await deferToThread(self.lookup().a, "alias.test")
        self.assertEqual(sorted(answer.records), ["192.0.2.7", "192.0.2.8"])
        self.assertEqual(answer.name, "alias.test")

    async def test_nxdomain_and_nodata_are_void(self) -> None:
        lookup = self.lookup()
        nx = await deferToThread(lookup.txt, "nothing.test")
        self.assertEqual((nx.void, nx.nxdomain, nx.records), (True, True, ()))
        nodata = await deferToThread(lookup.txt, "nodata.test")
        self.assertEqual((nodata.void, nodata.nxdomain, nodata.raw), (True, False, ()))

    async def test_truncated_udp_retried_over_tcp(self) -> None:
        port, factory = serve(self, {"test": ZONE}, udp=Truncating())
        answer = await deferToThread(self.lookup(port).txt, "big.test")
        self.assertEqual(answer.raw, (b"x" * 2000,))
        self.assertEqual(factory.asked("big.test", "TXT"), 1)  # the TCP query; UDP went to Truncating

    async def test_names_case_insensitive_trailing_dot_optional(self) -> None:
        lookup = self.lookup()
        first = await deferToThread(lookup.a, "HOST.test.")
        second = await deferToThread(lookup.a, "host.TEST")
        self.assertEqual(first, second)
        self.assertEqual(first.name, "host.test")
        self.assertEqual(self.server.asked("host.test", "A"), 1)

    def test_bad_names(self) -> None:
        lookup = self.lookup()
        for name in ("", ".", "a..test", "x" * 64 + ".test", ("a" * 60 + ".") * 5 + "test",
                     "bücher.test"):
            self.assertRaises(BadName, lookup.txt, name)
        self.assertRaises(BadName, lookup.ptr, "not-an-ip")
        self.assertEqual(self.server.queries, [])
        self.assertTrue(issubclass(BadName, ValueError))

    def test_nameservers_must_be_addresses(self) -> None:
        self.assertRaises(ValueError, Lookup, [("dns.example", 53)], 1.0)

    # --- caching -------------------------------------------------------------------------

    async def test_positive_answer_cached_for_its_ttl(self) -> None:
        lookup = self.lookup()
        await deferToThread(lookup.txt, "short.test")  # TTL 10
        self.clock.now += 9.5
        await deferToThread(lookup.txt, "short.test")
        self.assertEqual(self.server.asked("short.test", "TXT"), 1)
        self.clock.now += 1
        again = await deferToThread(lookup.txt, "short.test")
        self.assertEqual(again.texts, ("short-lived",))
        self.assertEqual(self.server.asked("short.test", "TXT"), 2)

    async def test_cname_chain_cached_for_its_smallest_ttl(self) -> None:
        lookup = self.lookup()
        await deferToThread(lookup.a, "alias.test")  # CNAME TTL 120, A TTL 300
        self.clock.now += 119
        await deferToThread(lookup.a, "alias.test")
        self.assertEqual(self.server.asked("alias.test", "A"), 1)
        self.clock.now += 2
        await deferToThread(lookup.a, "alias.test")
        self.assertEqual(self.server.asked("alias.test", "A"), 2)

    async def test_ttl_zero_not_cached(self) -> None:
        lookup = self.lookup()
        await deferToThread(lookup.txt, "zero.test")
        await deferToThread(lookup.txt, "zero.test")
        self.assertEqual(self.server.asked("zero.test", "TXT"), 2)

    async def test_nodata_cached_for_soa_minimum(self) -> None:
        lookup = self.lookup()
        await deferToThread(lookup.txt, "nodata.test")
        self.clock.now += SOA_MINIMUM - 1
        await deferToThread(lookup.txt, "nodata.test")
        self.assertEqual(self.server.asked("nodata.test", "TXT"), 1)
        self.clock.now += 2
        await deferToThread(lookup.txt, "nodata.test")
        self.assertEqual(self.server.asked("nodata.test", "TXT"), 2)

    async def test_nxdomain_cached_without_soa_for_five_minutes(self) -> None:
        lookup = self.lookup()  # twisted.names puts no SOA in its NXDOMAIN replies
        first = await deferToThread(lookup.txt, "nothing.test")
        self.clock.now += 299
        second = await deferToThread(lookup.txt, "nothing.test")
        self.assertTrue(first.nxdomain and second.nxdomain)
        self.assertEqual(self.server.asked("nothing.test", "TXT"), 1)
        self.clock.now += 2
        await deferToThread(lookup.txt, "nothing.test")
        self.assertEqual(self.server.asked("nothing.test", "TXT"), 2)

    async def test_types_cached_separately(self) -> None:
        lookup = self.lookup()
        await deferToThread(lookup.a, "host.test")
        await deferToThread(lookup.aaaa, "host.test")
        await deferToThread(lookup.a, "host.test")
        self.assertEqual((self.server.asked("host.test", "A"), self.server.asked("host.test", "AAAA")), (1, 1))

    async def test_cache_is_a_bounded_lru(self) -> None:
        lookup = self.lookup(cache_size=2)
        for name in ("n0.test", "n1.test", "n0.test", "n2.test"):  # n1 is least recently used
            await deferToThread(lookup.txt, name)
        await deferToThread(lookup.txt, "n0.test")
        await deferToThread(lookup.txt, "n2.test")
        self.assertEqual(self.server.asked("n0.test", "TXT"), 1)
        self.assertEqual(self.server.asked("n2.test", "TXT"), 1)
        await deferToThread(lookup.txt, "n1.test")
        self.assertEqual(self.server.asked("n1.test", "TXT"), 2)

    async def test_servfail_is_temperror_cached_briefly(self) -> None:
        lookup = self.lookup(failure_ttl=5.0)
        for _ in range(2):
            with self.assertRaises(TempError) as caught:
                await deferToThread(lookup.txt, "servfail.test")
            self.assertIn("SERVFAIL", str(caught.exception))
        self.assertEqual(self.server.asked("servfail.test", "TXT"), 1)
        self.clock.now += 5.1
        with self.assertRaises(TempError):
            await deferToThread(lookup.txt, "servfail.test")
        self.assertEqual(self.server.asked("servfail.test", "TXT"), 2)

    async def test_failure_caching_can_be_off(self) -> None:
        lookup = self.lookup(failure_ttl=0)
        for _ in range(2):
            with self.assertRaises(TempError):
                await deferToThread(lookup.txt, "servfail.test")
        self.assertEqual(self.server.asked("servfail.test", "TXT"), 2)

    async def test_concurrent_identical_queries_share_one(self) -> None:
        lookup = self.lookup(cache_size=0)  # no cache: only the shared flight saves queries
        results: list[Answer] = []
        lock = threading.Lock()

        def ask() -> None:
            answer = lookup.txt("slow.test")
            with lock:
                results.append(answer)

        await defer.gatherResults([deferToThread(ask) for _ in range(5)])
        self.assertEqual([a.texts for a in results], [("worth the wait",)] * 5)
        self.assertEqual(self.server.asked("slow.test", "TXT"), 1)
        await deferToThread(ask)  # that flight is over: a new one
        self.assertEqual(self.server.asked("slow.test", "TXT"), 2)

    # --- failures, timeouts and deadlines ---------------------------------------------------

    async def test_dead_server_is_temperror_after_timeout(self) -> None:
        port, silent = listen_silent(self)
        lookup = self.lookup(port, timeout=0.3)
        start = time.monotonic()
        with self.assertRaises(TempError) as caught:
            await deferToThread(lookup.txt, "multi.test")
        elapsed = time.monotonic() - start
        self.assertIn("timeout", str(caught.exception))
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 1.0)
        self.assertEqual(silent.received, 1)

    async def test_deadline_cuts_the_dns_timeout(self) -> None:
        port, silent = listen_silent(self)
        lookup = self.lookup(port, timeout=5.0)
        start = time.monotonic()
        with self.assertRaises(TempError):
            await deferToThread(lookup.txt, "multi.test", Deadline(0.3))
        self.assertLess(time.monotonic() - start, 0.5)
        # A failure cut short by the caller's deadline is not remembered for the next caller.
        with self.assertRaises(TempError):
            await deferToThread(lookup.txt, "multi.test", Deadline(0.1))
        self.assertEqual(silent.received, 2)

    async def test_deadline_shared_by_several_lookups(self) -> None:
        port, silent = listen_silent(self)
        lookup = self.lookup(port, timeout=5.0)
        deadline = Deadline(0.4)

        def several() -> list[str]:
            outcomes = []
            for name in ("n0.test", "n1.test", "n2.test"):
                try:
                    lookup.txt(name, deadline)
                    outcomes.append("answer")
                except TempError:
                    outcomes.append("temperror")
            return outcomes

        start = time.monotonic()
        outcomes = await deferToThread(several)
        self.assertEqual(outcomes, ["temperror"] * 3)
        self.assertLess(time.monotonic() - start, 0.6)
        self.assertEqual(silent.received, 1)  # the later two never sent a packet

    async def test_expired_deadline_sends_nothing_but_serves_the_cache(self) -> None:
        lookup = self.lookup()
        await deferToThread(lookup.txt, "n0.test")
        gone = Deadline(0.0)
        cached = await deferToThread(lookup.txt, "n0.test", gone)
        self.assertEqual(cached.texts, ("name 0",))
        with self.assertRaises(TempError) as caught:
            await deferToThread(lookup.txt, "n1.test", gone)
        self.assertIn("deadline", str(caught.exception))
        self.assertEqual(self.server.asked("n1.test", "TXT"), 0)

    async def test_hanging_name_is_temperror(self) -> None:
        lookup = self.lookup(timeout=0.3)
        with self.assertRaises(TempError):
            await deferToThread(lookup.txt, "hang.test")

    async def test_next_server_after_a_dead_one(self) -> None:
        port, silent = listen_silent(self)
        lookup = self.lookup(port, self.port, timeout=0.3)
        answer = await deferToThread(lookup.a, "host.test")
        self.assertEqual(len(answer.records), 2)
        self.assertEqual(silent.received, 1)

    async def test_next_server_after_servfail(self) -> None:
        bad_port, bad = serve(self, {}, servfail=("host.test",))
        answer = await deferToThread(self.lookup(bad_port, self.port).a, "host.test")
        self.assertEqual(len(answer.records), 2)
        self.assertEqual(bad.asked("host.test", "A"), 1)

    def test_deadline(self) -> None:
        clock = FakeClock()
        deadline = Deadline(2.0, clock=clock)
        self.assertEqual(deadline.remaining(), 2.0)
        self.assertFalse(deadline.expired)
        clock.now += 1.5
        self.assertEqual(deadline.remaining(), 0.5)
        clock.now += 1
        self.assertEqual(deadline.remaining(), 0.0)
        self.assertTrue(deadline.expired)
