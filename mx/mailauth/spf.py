"""SPF (RFC 7208): `check_host()` for an SMTP client's address and the MAIL FROM or HELO
identity, with every DNS lookup made through `lookup.Lookup` under one deadline.

Why our own evaluator and not pyspf (2.0.14, read for this decision): pyspf does its DNS
through a module-level `spf.DNSLookup` function over dnspython's default resolver
(`dns.resolver.query`, i.e. /etc/resolv.conf) or pydns. It cannot be given mx's
`dns.nameservers`, `dns.timeout` or a per-message deadline without monkeypatching that
global, which every thread shares; its cache lives in one query object and ignores TTLs, so a
burst from one sender repeats every lookup; and it carries Python 2 code, Received-SPF
rendering and best-guess / trusted-forwarder policies that are not check_host(). RFC 7208
is small enough to implement exactly and to test against a real DNS server.

Invariants:
- A record is parsed completely before any term is evaluated: a syntax error anywhere (an
  unknown mechanism, a bad CIDR length, a bad macro, a domain-spec that does not end in a
  macro or a top label, a duplicate redirect= or exp=, a non-ASCII octet) is permerror
  (§4.6, §3.1). Several "v=spf1" records are permerror, none is none (§4.5).
- The terms that query DNS (include, a, mx, ptr, exists, redirect) are counted over the
  whole check, nested ones included: the 11th is permerror (§4.6.4). So are a third void
  lookup (NXDOMAIN or no records, §4.6.4: counted for the a, mx (its MX query), ptr (its
  PTR query) and exists queries), and an mx whose name has more than 10 MX records; ptr looks
  at the first 10 names only.
- A lookup failure (timeout, SERVFAIL, the deadline) is temperror wherever the RFC says so
  (§4.4, §5): never permerror, never a quiet no-match, except where the RFC asks for one:
  ptr and %{p} skip failed lookups (§5.5, §7.3) and an exp= that cannot be fetched only
  loses the explanation (§6.2).
- An explanation exists only for fail and comes from the exp= of the record whose mechanism
  failed: never from an included record (its fail is only a no-match), and after a redirect
  from the target's record, not the redirecting one's (§6.2). It is macro-expanded with c, r
  and t allowed, and is printable ASCII or dropped.
- Names queried are what macro expansion produced, shortened from the left to 253 octets
  (§7.3); one that still is not a DNS name is a void lookup matching nothing. An
  IPv4-mapped IPv6 client is an IPv4 client (§5). An empty sender is postmaster@helo, a
  sender without a local part is postmaster@domain (§4.3, §2.4).
"""

from __future__ import annotations

import ipaddress
import re
import time
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

from .lookup import BadName, Deadline, Lookup, TempError

__all__ = ["Result", "SPFResult", "check_host", "MAX_DNS_TERMS", "MAX_VOID_LOOKUPS"]

MAX_DNS_TERMS = 10  # §4.6.4
MAX_VOID_LOOKUPS = 2  # §4.6.4
MAX_MX_RECORDS = 10  # §4.6.4
MAX_PTR_NAMES = 10  # §4.6.4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Result(StrEnum):
    """The results of check_host(), as §2.6 names them."""

    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    NEUTRAL = "neutral"
    NONE = "none"
    PERMERROR = "permerror"
    TEMPERROR = "temperror"


@dataclass(frozen=True)
class SPFResult:
    result: Result
    domain: str  # the domain check_host() was asked about
    explanation: str | None = None  # only for fail with a usable exp= (§6.2)
    mechanism: str | None = None  # the top-level term that decided, as written
    reason: str = ""  # for logs and Authentication-Results comments


QUALIFIERS = {"+": Result.PASS, "-": Result.FAIL, "~": Result.SOFTFAIL, "?": Result.NEUTRAL}
DNS_MECHANISMS = frozenset({"include", "a", "mx", "ptr", "exists"})

# §4.6.1: name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." ), then "=" for a modifier
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9_.\-]*)=(.*)\Z", re.S)
_DIRECTIVE = re.compile(r"([+\-~?]?)([A-Za-z][A-Za-z0-9_.\-]*)(.*)\Z", re.S)
_CIDR4 = r"0|[1-9][0-9]?"  # ip4-cidr-length without the "/"
_CIDR6 = r"0|[1-9][0-9]{0,2}"
_A_MX_ARGS = re.compile(rf"(?::(?P<domain>.*?))?(?:/(?P<c4>{_CIDR4}))?(?://(?P<c6>{_CIDR6}))?\Z", re.S)
_IP4_ARGS = re.compile(rf":(?P<ip>[0-9.]+)(?:/(?P<cidr>{_CIDR4}))?\Z")
_IP6_ARGS = re.compile(rf":(?P<ip>[0-9A-Fa-f:.]+)(?:/(?P<cidr>{_CIDR6}))?\Z")
_TOPLABEL = r"(?:[0-9A-Za-z]*[A-Za-z][0-9A-Za-z]*|[0-9A-Za-z]+-[0-9A-Za-z\-]*[0-9A-Za-z])"
_DOMAIN_END = re.compile(rf"\.{_TOPLABEL}\.?\Z")
_LAST_LABEL = re.compile(rf"{_TOPLABEL}\Z")
# §7.1: "%{" macro-letter transformers *delimiter "}"
_MACRO = re.compile(r"%\{([A-Za-z])([0-9]*)([rR]?)([.\-+,/_=]*)\}")
MACRO_LETTERS = frozenset("slodiphcrtv")
EXP_ONLY_LETTERS = frozenset("crt")


class _PermError(Exception):
    def __init__(self, reason: str, term: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.term = term


# --- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Macro:
    letter: str  # as written: upper case means URL-escaped (§7.3)
    digits: int | None
    reverse: bool
    delimiters: str


MacroString = tuple[str | _Macro, ...]


@dataclass(frozen=True)
class _Mechanism:
    text: str
    qualifier: Result
    name: str
    domain: MacroString | None = None  # include, a, mx, ptr, exists
    network: IPNetwork | None = None  # ip4, ip6
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    mechanisms: tuple[_Mechanism, ...]
    redirect: MacroString | None
    exp: MacroString | None


def _scan(text: str, explain: bool) -> tuple[MacroString, bool]:
    """(parts, whether the text ends in a macro-expand) for a §7.1 macro-string, or with
    `explain` an explain-string (spaces and the c, r, t letters allowed)."""
    out: list[str | _Macro] = []
    literal: list[str] = []
    ends_in_expand = False
    i = 0
    while i < len(text):
        ch = text[i]
        ends_in_expand = ch == "%"
        if ch == "%":
            nxt = text[i + 1: i + 2]
            if nxt in ("%", "_", "-"):
                literal.append({"%": "%", "_": " ", "-": "%20"}[nxt])
                i += 2
                continue
            m = _MACRO.match(text, i)
            if m is None:
                raise _PermError(f"bad macro at {text[i:i + 12]!r}")
            letter, digits, reverse, delimiters = m.groups()
            low = letter.lower()
            if low not in MACRO_LETTERS or (low in EXP_ONLY_LETTERS and not explain):
                raise _PermError(f"macro letter {letter!r} not allowed here")  # §7.1
            if digits and int(digits) == 0:
                raise _PermError("macro digit transformer must not be zero")  # §7.3
            if literal:
                out.append("".join(literal))
                literal = []
            out.append(_Macro(letter, int(digits) if digits else None, bool(reverse), delimiters))
            i = m.end()
            continue
        if not ("\x21" <= ch <= "\x7e" or (explain and ch == " ")):
            raise _PermError(f"character {ch!r} not allowed in {text!r}")
        literal.append(ch)
        i += 1
    if literal:
        out.append("".join(literal))
    return tuple(out), ends_in_expand


def parse_macro_string(text: str, *, explain: bool = False) -> MacroString:
    """§7.1 macro-string (explain-string with `explain`); _PermError if malformed."""
    return _scan(text, explain)[0]


def _domain_spec(text: str, term: str) -> MacroString:
    """§7.1 domain-spec = macro-string domain-end."""
    try:
        spec, ends_in_expand = _scan(text, False)
    except _PermError as e:
        raise _PermError(e.reason, term) from None
    if not spec or not (ends_in_expand or _DOMAIN_END.search(text)):
        raise _PermError(f"invalid domain-spec {text!r}", term)
    return spec


def _mechanism(term: str) -> _Mechanism:
    m = _DIRECTIVE.match(term)
    if m is None:
        raise _PermError(f"unknown term {term!r}", term)
    qualifier = QUALIFIERS[m.group(1) or "+"]
    name, args = m.group(2).lower(), m.group(3)
    if name == "all":
        if args:
            raise _PermError(f"'all' takes no arguments: {term!r}", term)
        return _Mechanism(term, qualifier, name)
    if name in ("include", "exists"):
        if not args.startswith(":"):
            raise _PermError(f"{name} needs a domain: {term!r}", term)
        return _Mechanism(term, qualifier, name, _domain_spec(args[1:], term))
    if name == "ptr":
        if args and not args.startswith(":"):
            raise _PermError(f"bad ptr: {term!r}", term)
        return _Mechanism(term, qualifier, name, _domain_spec(args[1:], term) if args else None)
    if name in ("a", "mx"):
        am = _A_MX_ARGS.match(args)
        if am is None:
            raise _PermError(f"bad {name}: {term!r}", term)
        c4, c6 = int(am.group("c4") or 32), int(am.group("c6") or 128)
        if c4 > 32 or c6 > 128:
            raise _PermError(f"CIDR length out of range: {term!r}", term)
        spec = am.group("domain")
        return _Mechanism(term, qualifier, name, None if spec is None else _domain_spec(spec, term),
                          cidr4=c4, cidr6=c6)
    if name in ("ip4", "ip6"):
        im = (_IP4_ARGS if name == "ip4" else _IP6_ARGS).match(args)
        if im is None:
            raise _PermError(f"bad {name}: {term!r}", term)
        cidr = int(im.group("cidr") or (32 if name == "ip4" else 128))
        try:
            address = (ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address)(im.group("ip"))
            if cidr > address.max_prefixlen:
                raise ValueError(cidr)
            network = ipaddress.ip_network(f"{address}/{cidr}", strict=False)
        except ValueError:
            raise _PermError(f"bad {name} network: {term!r}", term) from None
        return _Mechanism(term, qualifier, name, network=network)
    raise _PermError(f"unknown mechanism {term!r}", term)


def parse_record(text: str) -> _Record:
    """The terms after "v=spf1" (§4.6.1, §12); _PermError for any syntax error."""
    if not text.isascii():
        raise _PermError("non-ASCII character in the record")  # §3.1
    mechanisms: list[_Mechanism] = []
    modifiers: dict[str, MacroString] = {}
    for term in text[6:].split(" "):  # terms are separated by 1*SP, nothing else (§4.6.1)
        if not term:
            continue
        m = _MODIFIER.match(term)
        if m is None:
            mechanisms.append(_mechanism(term))
            continue
        name, value = m.group(1).lower(), m.group(2)
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise _PermError(f"{name}= given twice", term)  # §6
            modifiers[name] = _domain_spec(value, term)
        else:  # unknown modifiers are ignored, but must be well-formed (§6)
            try:
                parse_macro_string(value, explain=True)
            except _PermError as e:
                raise _PermError(e.reason, term) from None
    return _Record(tuple(mechanisms), modifiers.get("redirect"), modifiers.get("exp"))


# --- evaluation --------------------------------------------------------------------------


def _valid_domain(domain: str) -> bool:
    """§4.3: a well-formed, multi-label name (the last label a top label)."""
    name = domain[:-1] if domain.endswith(".") else domain
    labels = name.split(".")
    return (name.isascii() and len(name) <= 253 and len(labels) > 1
            and all(0 < len(label) < 64 for label in labels) and bool(_LAST_LABEL.match(labels[-1])))


def _to_ascii(domain: str) -> str | None:
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")  # §4.3: A-labels
    except UnicodeError:
        return None


@dataclass(frozen=True)
class _Outcome:
    result: Result
    mechanism: str | None
    reason: str
    exp: MacroString | None = None  # the exp= of the record that failed
    exp_domain: str = ""


class _Check:
    """The state of one top-level check_host(): identities and the §4.6.4 counters."""

    def __init__(self, ip: IPAddress, sender: str, helo: str, receiver: str,
                 lookup: Lookup, deadline: Deadline | None) -> None:
        self.ip = ip
        self.sender = sender
        self.local, _, self.sender_domain = sender.rpartition("@")
        self.helo = helo
        self.receiver = receiver
        self.lookup = lookup
        self.deadline = deadline
        self.dns_terms = 0
        self.voids = 0
        self._validated: str | None = None

    # --- check_host() itself (§4) -------------------------------------------------------

    def check_host(self, domain: str) -> _Outcome:
        if not _valid_domain(domain):
            return _Outcome(Result.NONE, None, f"{domain!r} is not a domain name")  # §4.3
        try:
            answer = self.lookup.txt(domain, self.deadline)
        except BadName:
            return _Outcome(Result.NONE, None, f"{domain!r} is not a domain name")
        records = [raw for raw in answer.raw
                   if raw[:6].lower() == b"v=spf1" and (len(raw) == 6 or raw[6:7] == b" ")]  # §4.5
        if not records:
            return _Outcome(Result.NONE, None, f"no SPF record for {domain}")
        if len(records) > 1:
            raise _PermError(f"{len(records)} SPF records for {domain}")  # §4.5
        record = parse_record(records[0].decode("latin-1"))
        for mech in record.mechanisms:
            matched, detail = self._matches(mech, domain)
            if matched:
                reason = f"{domain}: {mech.text} matched" + (f" ({detail})" if detail else "")
                if mech.qualifier is Result.FAIL:
                    return _Outcome(Result.FAIL, mech.text, reason, record.exp, domain)
                return _Outcome(mech.qualifier, mech.text, reason)
        if record.redirect is not None:  # §6.1: only when no mechanism matched
            self._count_dns_term("redirect=")
            target = self._expand_domain(record.redirect, domain)
            outcome = self.check_host(target) if target else _Outcome(Result.NONE, None, "")
            if outcome.result is Result.NONE:
                raise _PermError(f"redirect={target} has no SPF record", "redirect=")
            return outcome
        return _Outcome(Result.NEUTRAL, None, f"{domain}: no mechanism matched")  # §4.7

    # --- mechanisms (§5) ----------------------------------------------------------------

    def _matches(self, mech: _Mechanism, domain: str) -> tuple[bool, str]:
        if mech.name == "all":
            return True, ""
        if mech.name in ("ip4", "ip6"):
            assert mech.network is not None
            return self.ip.version == mech.network.version and self.ip in mech.network, ""
        self._count_dns_term(mech.text)
        target = domain if mech.domain is None else self._expand_domain(mech.domain, domain)
        if mech.name == "include":  # §5.2
            outcome = self.check_host(target) if target else _Outcome(Result.NONE, None, "")
            if outcome.result is Result.PASS:
                return True, outcome.reason
            if outcome.result is Result.NONE:
                raise _PermError(f"include:{target} has no SPF record", mech.text)
            return False, ""
        if not target:
            self._void()
            return False, ""
        try:
            if mech.name == "a":  # §5.3
                return self._address_match(target, mech, count_void=True), ""
            if mech.name == "mx":  # §5.4
                return self._mx_match(target, mech), ""
            if mech.name == "exists":  # §5.7: an A query, even for an IPv6 client
                answer = self.lookup.a(target, self.deadline)
                if answer.void:
                    self._void()
                return not answer.void, ""
            return self._ptr_match(target), ""  # §5.5
        except BadName:
            self._void()
            return False, ""

    def _addresses(self, name: str) -> tuple[IPAddress, ...] | None:
        """The client's family of addresses of `name`; None for a void answer."""
        ask = self.lookup.a if self.ip.version == 4 else self.lookup.aaaa
        answer = ask(name, self.deadline)
        if answer.void:
            return None
        return tuple(ipaddress.ip_address(r) for r in answer.records)

    def _address_match(self, name: str, mech: _Mechanism, *, count_void: bool) -> bool:
        addresses = self._addresses(name)
        if addresses is None:
            if count_void:
                self._void()
            return False
        prefix = mech.cidr4 if self.ip.version == 4 else mech.cidr6
        network = ipaddress.ip_network(f"{self.ip}/{prefix}", strict=False)
        return any(address in network for address in addresses)

    def _mx_match(self, name: str, mech: _Mechanism) -> bool:
        answer = self.lookup.mx(name, self.deadline)
        if answer.void:
            self._void()
            return False
        if len(answer.records) > MAX_MX_RECORDS:
            raise _PermError(f"{name} has {len(answer.records)} MX records (more than 10)", mech.text)
        for _preference, exchange in answer.records:
            if exchange:
                try:
                    if self._address_match(exchange, mech, count_void=False):
                        return True
                except BadName:
                    continue
        return False

    def _validated_names(self, wanted: str | None = None) -> list[str]:
        """§5.5: the PTR names of the client whose addresses include it; with `wanted`,
        only names equal to or under it are checked. Lookup failures are skipped."""
        try:
            answer = self.lookup.ptr(str(self.ip), self.deadline)
        except TempError:
            return []
        if answer.void and wanted is not None:
            self._void()
        names = list(answer.records[:MAX_PTR_NAMES])  # §4.6.4: the rest are ignored
        if wanted is not None:
            wanted = wanted.lower().rstrip(".")
            names = [n for n in names if n == wanted or n.endswith("." + wanted)]
        validated = []
        for name in names:
            try:
                addresses = self._addresses(name)
            except (TempError, BadName):
                continue  # §5.5: that name is skipped
            if addresses and self.ip in addresses:
                validated.append(name)
        return validated

    def _ptr_match(self, target: str) -> bool:
        return bool(self._validated_names(target))

    def _count_dns_term(self, term: str) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms", term)

    def _void(self) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups")

    # --- macros (§7) --------------------------------------------------------------------

    def _macro_value(self, letter: str, domain: str) -> str:
        if letter == "s":
            return self.sender
        if letter == "l":
            return self.local
        if letter == "o":
            return self.sender_domain
        if letter == "d":
            return domain
        if letter == "i":
            if self.ip.version == 4:
                return str(self.ip)
            return ".".join(self.ip.exploded.replace(":", ""))  # §7.3: dot-format nibbles
        if letter == "p":
            return self._p(domain)
        if letter == "v":
            return "in-addr" if self.ip.version == 4 else "ip6"
        if letter == "h":
            return self.helo
        if letter == "c":
            return str(self.ip)
        if letter == "r":
            return self.receiver
        return str(int(time.time()))  # "t"

    def _p(self, domain: str) -> str:
        """§7.3 %{p}: a validated name of the client, preferring `domain` and its subdomains."""
        if self._validated is None:
            names = self._validated_names()
            self._validated = ""
            for candidate in names:
                if candidate == domain.lower():
                    self._validated = candidate
                    break
            else:
                under = [n for n in names if n.endswith("." + domain.lower())]
                self._validated = (under or names or ["unknown"])[0]
        return self._validated

    def expand(self, spec: MacroString, domain: str) -> str:
        out = []
        for part in spec:
            if isinstance(part, str):
                out.append(part)
                continue
            value = self._macro_value(part.letter.lower(), domain)
            parts = re.split("[" + re.escape(part.delimiters or ".") + "]", value)
            if part.reverse:
                parts.reverse()
            if part.digits is not None:
                parts = parts[-part.digits:]
            value = ".".join(parts)
            if part.letter.isupper():
                value = urllib.parse.quote(value, safe="-._~")  # §7.3: unreserved kept
            out.append(value)
        return "".join(out)

    def _expand_domain(self, spec: MacroString, domain: str) -> str:
        name = self.expand(spec, domain)
        if name.endswith("."):
            name = name[:-1]
        while len(name) > 253 and "." in name:  # §7.3: drop labels from the left
            name = name.split(".", 1)[1]
        return name

    def explanation(self, outcome: _Outcome) -> str | None:
        """§6.2: the expanded exp= text, or None when there is none to be had."""
        if outcome.exp is None:
            return None
        try:
            name = self._expand_domain(outcome.exp, outcome.exp_domain)
            answer = self.lookup.txt(name, self.deadline)  # not counted (§4.6.4 lists no exp)
            if len(answer.raw) != 1 or not answer.raw[0].isascii():
                return None
            text = self.expand(parse_macro_string(answer.raw[0].decode("ascii"), explain=True),
                               outcome.exp_domain)
        except (TempError, BadName, _PermError):
            return None
        return text if text.isascii() and text.isprintable() else None


def check_host(ip: str, domain: str, sender: str, *, helo: str, lookup: Lookup,
               deadline: Deadline | None = None, receiver: str = "unknown") -> SPFResult:
    """RFC 7208 check_host(<ip>, <domain>, <sender>) with the HELO name for %{h}.

    For the MAIL FROM identity pass the sender's domain; for the HELO identity (or an empty
    MAIL FROM) pass the HELO name as `domain` and "" as `sender`. Raises ValueError only for
    an `ip` that is not an IP address.
    """
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # §5: IPv4-mapped IPv6 is IPv4
    helo = helo.rstrip(".")
    if not sender:
        sender = f"postmaster@{helo}"  # §2.4
    elif "@" not in sender:
        sender = f"postmaster@{sender}"
    elif sender.startswith("@"):
        sender = "postmaster" + sender  # §4.3
    ascii_domain = _to_ascii(domain[:-1] if domain.endswith(".") else domain)
    shown = domain.rstrip(".").lower()
    if ascii_domain is None:
        return SPFResult(Result.NONE, shown, reason=f"{domain!r} is not a domain name")
    check = _Check(address, sender, helo, receiver, lookup, deadline)
    try:
        outcome = check.check_host(ascii_domain)
    except TempError as e:
        return SPFResult(Result.TEMPERROR, shown, reason=f"DNS: {e}")
    except _PermError as e:
        return SPFResult(Result.PERMERROR, shown, mechanism=e.term, reason=e.reason)
    explanation = check.explanation(outcome) if outcome.result is Result.FAIL else None
    return SPFResult(outcome.result, shown, explanation, outcome.mechanism, outcome.reason)
