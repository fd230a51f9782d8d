"""Blocking DNS for mail authentication: TXT, A, AAAA, MX and PTR answers from the configured
nameservers (`dns.nameservers`, `dns.timeout`), cached by TTL, for checks that run in a thread
pool. No Twisted here: every call blocks its thread, so it must never run on the reactor.

Invariants:
- Names are absolute, compared and cached lower-case; one trailing dot is optional. Names
  come back lower-case without the trailing dot. A name that cannot be a DNS name (empty
  label, label over 63 octets, over 253 octets, non-ASCII) raises `BadName` before any query.
- Each server is asked over UDP (a fresh socket, random port and query id, replies from
  elsewhere or not matching the question ignored), then over TCP if the reply is truncated,
  within `min(timeout, deadline.remaining())` for that server, UDP and TCP together. Servers
  are asked in order until one gives an answer; an expired deadline raises `TempError`
  before a packet is sent, so a lookup never outlives its deadline (a cached answer is still
  given after it: that costs no waiting).
- Only NOERROR and NXDOMAIN are answers. SERVFAIL, REFUSED, any other rcode, timeouts and
  socket errors move on to the next server and end as `TempError` (RFC 7208 §2.6.7
  temperror, RFC 6376 §6.1.2 TEMPFAIL, RFC 7489 §6.6.3).
- Cache (bounded LRU, `cache_size` entries): positive answers for the smallest TTL along the
  answer's CNAME chain (at most a day); negative answers (NXDOMAIN, NODATA) for the SOA's
  negative TTL, min(SOA TTL, MINIMUM) per RFC 2308 §5, at most an hour, five minutes when the
  authority section has no SOA. A TTL of 0 is not cached.
- A `TempError` is cached for `failure_ttl` seconds (5 s by default, 0 turns it off) and only
  when every server was given the full `timeout`: a burst of messages during an outage then
  costs one timeout, not one each, while a failure caused by a caller's own short deadline is
  never remembered for the next caller.
- Thread-safe: one lock guards the cache and the in-flight table and is never held during
  network I/O. Concurrent identical queries share one network query (the first asks, the
  others wait for it within their own deadline). Answers are immutable and shared.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = ["Answer", "BadName", "CacheOnly", "Deadline", "Lookup", "TempError", "WouldBlock"]

Clock = Callable[[], float]

EDNS_PAYLOAD = 1232  # DNS flag day 2020: avoids IP fragmentation
MAX_CNAME_CHAIN = 8
MAX_TTL = 86400.0
MAX_NEGATIVE_TTL = 3600.0
DEFAULT_NEGATIVE_TTL = 300.0
DEFAULT_FAILURE_TTL = 5.0


class TempError(Exception):
    """No usable answer for now: timeout, SERVFAIL, REFUSED, network error, deadline passed."""


class BadName(ValueError):
    """A name that cannot be asked in DNS (empty or over-long label, non-ASCII, too long)."""


class Deadline:
    """A point in time `seconds` from now on `clock`, shared by every lookup of one check."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self._clock())

    @property
    def expired(self) -> bool:
        return self._clock() >= self.at


@dataclass(frozen=True)
class Answer:
    """One NOERROR or NXDOMAIN answer.

    `records`: TXT texts (the strings of one record joined, decoded as latin-1 so every octet
    survives), A/AAAA address texts, MX `(preference, exchange)` pairs, PTR names; `raw`: for
    TXT, the joined strings as bytes, record by record (empty for other types).
    """

    name: str
    rdtype: str
    records: tuple[Any, ...]
    raw: tuple[bytes, ...] = ()
    nxdomain: bool = False

    @property
    def void(self) -> bool:
        """NXDOMAIN or NODATA: RFC 7208 §4.6.4's "void lookup"."""
        return not self.records

    @property
    def texts(self) -> tuple[str, ...]:
        return self.records if self.rdtype == "TXT" else ()


def _qname(name: str) -> dns.name.Name:
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text or not text.isascii():
        raise BadName(f"not a DNS name: {name!r}")
    labels = text.lower().encode("ascii").split(b".")
    if any(not 0 < len(label) < 64 for label in labels) or len(text) > 253:
        raise BadName(f"not a DNS name: {name!r}")
    return dns.name.Name([*labels, b""])  # labels taken as they are: no escapes interpreted


def _reverse(ip: str) -> dns.name.Name:
    try:
        return dns.reversename.from_address(ip)
    except (ValueError, dns.exception.SyntaxError) as e:
        raise BadName(f"not an IP address: {ip!r}") from e


def _host(name: dns.name.Name) -> str:
    """The name's labels joined by dots, lower-case, unescaped (the inverse of `_qname`)."""
    return ".".join(label.decode("latin-1") for label in name.labels if label).lower()


def _negative_ttl(reply: dns.message.Message) -> float:
    for rrset in reply.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum, MAX_NEGATIVE_TTL))  # RFC 2308 §5
    return DEFAULT_NEGATIVE_TTL


def _answer(reply: dns.message.Message, qname: dns.name.Name, rdtype: str) -> tuple[Answer, float]:
    """(answer, seconds to cache it) from a NOERROR or NXDOMAIN reply, CNAMEs followed."""
    key = _host(qname)
    if reply.rcode() == dns.rcode.NXDOMAIN:
        return Answer(key, rdtype, (), (), nxdomain=True), _negative_ttl(reply)
    wanted = dns.rdatatype.from_text(rdtype)
    name, ttl, rrset = qname, MAX_TTL, None
    for _ in range(MAX_CNAME_CHAIN):
        rrset = reply.get_rrset(reply.answer, name, dns.rdataclass.IN, wanted)
        if rrset is not None:
            ttl = min(ttl, rrset.ttl)
            break
        cname = reply.get_rrset(reply.answer, name, dns.rdataclass.IN, dns.rdatatype.CNAME)
        if cname is None:
            break
        ttl = min(ttl, cname.ttl)
        name = cname[0].target
    if rrset is None or not len(rrset):
        return Answer(key, rdtype, ()), _negative_ttl(reply)
    raw: tuple[bytes, ...] = ()
    if rdtype == "TXT":
        raw = tuple(b"".join(r.strings) for r in rrset)  # RFC 7208 §3.3, RFC 6376 §3.6.2.2
        records: tuple[Any, ...] = tuple(b.decode("latin-1") for b in raw)
    elif rdtype in ("A", "AAAA"):
        records = tuple(r.address for r in rrset)
    elif rdtype == "MX":
        records = tuple((int(r.preference), _host(r.exchange)) for r in rrset)
    else:  # PTR
        records = tuple(_host(r.target) for r in rrset)
    return Answer(key, rdtype, records, raw), float(ttl)


class _Flight:
    """One network query that concurrent askers of the same question wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Answer | None = None
        self.error: str | None = None
        self.shared = False  # False: the asker's own deadline cut it short; ask again


class WouldBlock(BaseException):
    """A `CacheOnly` lookup missed: the caller redoes the whole check in a thread.

    A BaseException on purpose: the checks catch `Exception` to turn surprises into
    temperror, and this must pass through all of them unchanged."""


class Lookup:
    """Stub resolver over `nameservers` (empty: the system's, from /etc/resolv.conf)."""

    def __init__(self, nameservers: Sequence[tuple[str, int]], timeout: float, *,
                 cache_size: int = 10000, failure_ttl: float = DEFAULT_FAILURE_TTL,
                 clock: Clock = time.monotonic) -> None:
        if not nameservers:
            try:
                system = dns.resolver.Resolver(configure=True)  # reads /etc/resolv.conf only
                nameservers = [(str(ns), int(system.port)) for ns in system.nameservers]
            except dns.exception.DNSException:
                nameservers = []  # every query then ends in TempError, saying why
        servers = []
        for host, port in nameservers:
            try:
                servers.append((str(ipaddress.ip_address(host)), int(port)))
            except ValueError:
                raise ValueError(f"a nameserver must be an IP address, got {host!r}") from None
        self.nameservers: tuple[tuple[str, int], ...] = tuple(servers)
        self.timeout = timeout
        self.failure_ttl = failure_ttl
        self.cache_size = max(0, cache_size)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer | str]] = OrderedDict()
        self._inflight: dict[tuple[str, str], _Flight] = {}

    # --- the questions -------------------------------------------------------------------

    def txt(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._resolve(_qname(name), "TXT", deadline)

    def a(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._resolve(_qname(name), "A", deadline)

    def aaaa(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._resolve(_qname(name), "AAAA", deadline)

    def mx(self, name: str, deadline: Deadline | None = None) -> Answer:
        """MX `(preference, exchange)` pairs as published (no ordering; "" is the root)."""
        return self._resolve(_qname(name), "MX", deadline)

    def ptr(self, ip: str, deadline: Deadline | None = None) -> Answer:
        """The PTR names of address `ip` (under in-addr.arpa or ip6.arpa)."""
        return self._resolve(_reverse(ip), "PTR", deadline)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def cache_only(self) -> CacheOnly:
        """A view of this cache that never touches the network: a miss raises `WouldBlock`."""
        return CacheOnly(self)

    def _resolve_cached(self, qname: dns.name.Name, rdtype: str) -> Answer:
        key = (_host(qname), rdtype)
        with self._lock:
            cached = self._cached(key)
        if cached is None:
            raise WouldBlock(f"{key[0]} {rdtype} is not cached")
        if isinstance(cached, str):
            raise TempError(cached)
        return cached

    # --- cache and single flight ---------------------------------------------------------

    def _resolve(self, qname: dns.name.Name, rdtype: str, deadline: Deadline | None) -> Answer:
        key = (_host(qname), rdtype)
        while True:
            with self._lock:
                cached = self._cached(key)
                flight = self._inflight.get(key)
                leader = cached is None and flight is None and not (deadline and deadline.expired)
                if leader:
                    flight = self._inflight[key] = _Flight()
            if cached is not None:  # served even past the deadline: it costs no waiting
                if isinstance(cached, str):
                    raise TempError(cached)
                return cached
            if flight is None:
                raise TempError(f"{key[0]} {rdtype}: deadline passed")
            if leader:
                self._lead(key, qname, rdtype, deadline, flight)
            elif not flight.done.wait(self._wait_budget(deadline)):
                raise TempError(f"{key[0]} {rdtype}: no answer in time")
            if flight.shared or leader:
                if flight.answer is not None:
                    return flight.answer
                raise TempError(flight.error or f"{key[0]} {rdtype}: lookup failed")
            # the first asker ran out of its own time: ask for ourselves

    def _lead(self, key: tuple[str, str], qname: dns.name.Name, rdtype: str,
              deadline: Deadline | None, flight: _Flight) -> None:
        ttl: float | None = None
        try:
            outcome, ttl, flight.shared = self._fetch(qname, rdtype, deadline)
            if isinstance(outcome, Answer):
                flight.answer = outcome
            else:
                flight.error = outcome
        finally:
            with self._lock:
                if flight.shared and ttl:
                    self._store(key, ttl, flight.answer or flight.error or "")
                del self._inflight[key]
            flight.done.set()

    def _cached(self, key: tuple[str, str]) -> Answer | str | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return value

    def _store(self, key: tuple[str, str], ttl: float, value: Answer | str) -> None:
        if self.cache_size == 0 or ttl <= 0:
            return
        self._cache[key] = (self._clock() + ttl, value)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _wait_budget(self, deadline: Deadline | None) -> float:
        budget = self.timeout * max(1, len(self.nameservers)) + 1.0
        return budget if deadline is None else min(budget, deadline.remaining())

    # --- the network ---------------------------------------------------------------------

    def _fetch(self, qname: dns.name.Name, rdtype: str,
               deadline: Deadline | None) -> tuple[Answer | str, float | None, bool]:
        """(answer or error text, seconds to cache, whether others may use the outcome)."""
        label = f"{_host(qname)} {rdtype}"
        if not self.nameservers:
            return f"{label}: no nameservers configured", self.failure_ttl, True
        errors: list[str] = []
        shortened = False
        for host, port in self.nameservers:
            budget = self.timeout
            if deadline is not None:
                remaining = deadline.remaining()
                if remaining <= 0:
                    errors.append("deadline passed")
                    return f"{label}: {'; '.join(errors)}", None, False
                if remaining < budget:
                    budget, shortened = remaining, True
            request = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
            try:
                reply = self._ask(request, host, port, budget)
            except dns.exception.Timeout:
                errors.append(f"{host}: timeout after {budget:.3g}s")
                continue
            except (OSError, dns.exception.DNSException) as e:
                errors.append(f"{host}: {e.__class__.__name__}: {e}")
                continue
            rcode = reply.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                answer, ttl = _answer(reply, qname, rdtype)
                return answer, ttl, True
            errors.append(f"{host}: {dns.rcode.to_text(rcode)}")
        return f"{label}: {'; '.join(errors)}", (None if shortened else self.failure_ttl), not shortened

    def _ask(self, request: dns.message.Message, host: str, port: int,
             budget: float) -> dns.message.Message:
        start = time.monotonic()
        reply = dns.query.udp(request, host, timeout=budget, port=port,
                              ignore_unexpected=True, ignore_errors=True)
        if reply.flags & dns.flags.TC:
            left = budget - (time.monotonic() - start)
            if left <= 0:
                raise dns.exception.Timeout()
            reply = dns.query.tcp(request, host, timeout=left, port=port)
        return reply


class CacheOnly:
    """`Lookup`'s questions answered from its cache alone (no I/O, so no blocking): lets a
    message whose every lookup is cached be checked without a trip to a thread."""

    def __init__(self, lookup: Lookup) -> None:
        self._lookup = lookup

    def txt(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._lookup._resolve_cached(_qname(name), "TXT")

    def a(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._lookup._resolve_cached(_qname(name), "A")

    def aaaa(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._lookup._resolve_cached(_qname(name), "AAAA")

    def mx(self, name: str, deadline: Deadline | None = None) -> Answer:
        return self._lookup._resolve_cached(_qname(name), "MX")

    def ptr(self, ip: str, deadline: Deadline | None = None) -> Answer:
        return self._lookup._resolve_cached(_reverse(ip), "PTR")
