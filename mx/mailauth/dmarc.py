"""DMARC (RFC 7489): whose mail this claims to be, and what its owner asks us to do if unproven.

`from_domains(header)` finds the RFC5322.From domains, `evaluate(...)` looks up the DMARC
record of each (blocking DNS through `Lookup`, from a thread) and judges the SPF and DKIM
results against it: `DMARCResult.result` is the RFC 7489 §11.2 / RFC 8601 keyword and
`DMARCResult.disposition` is what the receiver should do with the message.

Invariants and choices:
- Domains are compared lower-case, in A-label form, without a trailing dot. The
  organisational domain comes from `publicsuffixlist`'s bundled list (ICANN and private
  sections, unknown TLDs count as public suffixes); no network. A public suffix is its own
  organisational domain (RFC 7489 §3.2 has no label to add).
- Record discovery (§6.6.3): TXT at `_dmarc.<From domain>`, and only when that set holds no
  DMARC record at all, at `_dmarc.<organisational domain>`. TXT records not starting with
  `v=DMARC1` are no DMARC records; two or more DMARC records in the set -> `none` (no DMARC
  processing), and no fallback. A record found at the organisational domain for a From
  subdomain applies its `sp=` (default `p=`).
- Record syntax (§6.3, §6.4): `v=DMARC1` first, tag names case-insensitive, unknown tags
  ignored, bad optional values (`pct`, `adkim`, `aspf`, `ri`, ...) replaced by defaults. A
  missing or invalid `p=` (or an invalid `sp=`) makes the record act as `p=none` when it
  has a syntactically valid `rua=` URI (§6.6.3), and is a `permerror` otherwise (§11.2).
- DMARC passes when SPF passed for an aligned domain or any DKIM signature passed for an
  aligned `d=` (§4.2); alignment is relaxed (equal organisational domains) or strict
  (equal domains) per `aspf=` / `adkim=` (§3.1).
- DNS trouble never rejects: a `TempError` from the record lookup gives `temperror`, and so
  does a failure in which an aligned SPF or DKIM check itself ended in `temperror` (it
  might have passed); both with disposition `none`.
- `pct=` sampling (§6.6.4): `rand()` (in [0, 1)) is drawn only for a failing message under
  `quarantine` or `reject` with `pct` < 100; a message not sampled gets the next less strict
  policy (reject -> quarantine, quarantine -> none).
- Several From domains (§6.6.1): each is evaluated and the strictest outcome is returned
  (disposition first, then fail > permerror > temperror > none > pass), its reason prefixed
  "multiple From domains". No From domain at all -> `permerror` (RFC 5322 requires one).
- Pure: no Twisted, no I/O except through the `Lookup` given.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from typing import Any

from publicsuffixlist import PublicSuffixList

from mx.mailauth.lookup import BadName, Deadline, Lookup, TempError
from mx.mime import Address, Group, headers, parse_addresses

__all__ = [
    "Alignment", "DMARCPolicy", "DMARCResult", "Policy", "RecordError", "Result", "evaluate",
    "from_domains", "is_dmarc_record", "normalize_domain", "organizational_domain", "parse_record",
]


class Result(StrEnum):
    """RFC 7489 §11.2 result keywords (equal to their strings)."""

    PASS = "pass"
    FAIL = "fail"
    NONE = "none"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class Policy(StrEnum):
    """`p=` / `sp=` values, also used for the disposition (RFC 7489 §6.3)."""

    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class Alignment(StrEnum):
    RELAXED = "r"
    STRICT = "s"


class RecordError(ValueError):
    """The TXT text is no usable DMARC record; the message says why."""


@dataclass(frozen=True, slots=True)
class DMARCPolicy:
    """A parsed DMARC record (RFC 7489 §6.3), defaults filled in."""

    p: Policy
    sp: Policy  # `p` when the record has no (valid) sp=
    pct: int = 100
    adkim: Alignment = Alignment.RELAXED
    aspf: Alignment = Alignment.RELAXED
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"
    rf: str = "afrf"
    ri: int = 86400


@dataclass(frozen=True, slots=True)
class DMARCResult:
    result: Result
    header_from: str  # the From domain judged ("" when the message has none)
    policy: Policy  # the policy that applies: p= or sp=, after pct sampling; none without a record
    disposition: Policy  # what to do: `policy` when the result is fail, else none
    reason: str
    record_domain: str | None = None  # where the record was found (None: no record used)
    record: DMARCPolicy | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False


# From domains ------------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")


def normalize_domain(domain: str) -> str | None:
    """`domain` lower-case, in A-labels, without a trailing dot; None if it is no domain name."""
    domain = domain.strip().rstrip(".")
    if not domain:
        return None
    if not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    domain = domain.lower()
    if len(domain) > 253 or not all(_LABEL.match(label) for label in domain.split(".")):
        return None
    return domain


def from_domains(message_header: bytes) -> list[str]:
    """The RFC5322.From domains of a header block (a whole message is fine: it stops at the
    empty line), in order of appearance, each once; lower-case A-labels.

    Every From field and every mailbox in it counts (group members too: a group is not
    allowed in From, but its members are still claimed authors). Mailboxes without a domain,
    with a domain literal or with a name that is no valid domain are left out, so a message
    whose only From address is such is one with zero From domains.
    """
    out: list[str] = []
    for name, value in headers(message_header):
        if name != "from":
            continue
        for item in parse_addresses(value):
            for address in item.members if isinstance(item, Group) else [item]:
                domain = _address_domain(address)
                if domain is not None and domain not in out:
                    out.append(domain)
    return out


def _address_domain(address: Address) -> str | None:
    if not address.host or address.host.startswith(b"["):
        return None
    try:
        host = address.host.decode("utf-8")  # RFC 6532: UTF-8 domains in internationalised mail
    except UnicodeDecodeError:
        return None
    return normalize_domain(host)


# Organisational domain ---------------------------------------------------------------------


@lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    return PublicSuffixList()  # the list bundled with the package


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label; a public suffix is its own."""
    domain = domain.strip().rstrip(".").lower()
    return _psl().privatesuffix(domain) or domain


def _aligned(identifier: str, from_domain: str, mode: Alignment) -> bool:
    """RFC 7489 §3.1.1 / §3.1.2."""
    identifier = normalize_domain(identifier or "") or ""
    if not identifier:
        return False
    if mode is Alignment.STRICT:
        return identifier == from_domain
    return organizational_domain(identifier) == organizational_domain(from_domain)


# Records -----------------------------------------------------------------------------------

_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(?:;|\Z)")  # RFC 7489 §6.4: "DMARC1" is case-sensitive
_TAG = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[^\s!,]+(?:![0-9]+[kmgtKMGT]?)?\Z")  # §6.4 dmarc-uri
_POLICIES = {p.value: p for p in Policy}
_ALIGNMENTS = {a.value: a for a in Alignment}


def is_dmarc_record(text: str) -> bool:
    """True if a TXT text starts with the `v=DMARC1` tag (RFC 7489 §6.6.3 step 3)."""
    return _VERSION.match(text) is not None


def _uris(value: str) -> tuple[str, ...]:
    return tuple(u for u in (part.strip() for part in value.split(",")) if _URI.match(u))


def parse_record(text: str) -> DMARCPolicy:
    """Parse a DMARC record (RFC 7489 §6.3, §6.4); raises `RecordError` for an unusable one."""
    if not is_dmarc_record(text):
        raise RecordError("record does not start with v=DMARC1")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        tag, eq, value = part.partition("=")
        tag = tag.strip().lower()
        if not eq or not _TAG.match(tag):
            continue  # §6.3: syntax errors in the remainder are ignored
        tags.setdefault(tag, value.strip())  # the first of a repeated tag counts
    rua = _uris(tags.get("rua", ""))
    ruf = _uris(tags.get("ruf", ""))
    p = _POLICIES.get(tags.get("p", "").lower())
    sp = _POLICIES.get(tags["sp"].lower()) if "sp" in tags else p
    if p is None or sp is None:
        problem = "no p= tag" if "p" not in tags else ("invalid p= tag" if p is None else "invalid sp= tag")
        if not rua:
            raise RecordError(f"{problem} and no valid rua=")
        p = sp = Policy.NONE  # §6.6.3: act as if the record said p=none
    pct_text = tags.get("pct", "")
    pct = int(pct_text) if re.fullmatch(r"[0-9]{1,3}", pct_text) and int(pct_text) <= 100 else 100
    ri_text = tags.get("ri", "")
    ri = int(ri_text) if re.fullmatch(r"[0-9]{1,10}", ri_text) else 86400
    return DMARCPolicy(
        p=p, sp=sp, pct=pct,
        adkim=_ALIGNMENTS.get(tags.get("adkim", "").lower(), Alignment.RELAXED),
        aspf=_ALIGNMENTS.get(tags.get("aspf", "").lower(), Alignment.RELAXED),
        rua=rua, ruf=ruf, fo=tags.get("fo") or "0", rf=tags.get("rf") or "afrf", ri=ri,
    )


class _Several(Exception):
    pass


def _records_at(domain: str, lookup: Lookup, deadline: Deadline | None) -> str | None:
    """The one DMARC record at _dmarc.<domain>, None if there is none; `_Several` if more."""
    try:
        answer = lookup.txt(f"_dmarc.{domain}", deadline=deadline)
    except BadName:  # too long with the _dmarc label: such a name cannot hold a record
        return None
    if answer.nxdomain or answer.void:
        return None
    found = [t for t in answer.texts if is_dmarc_record(t)]
    if len(found) > 1:
        raise _Several()
    return found[0] if found else None


# Evaluation --------------------------------------------------------------------------------

_RANK_DISPOSITION = {Policy.NONE: 0, Policy.QUARANTINE: 1, Policy.REJECT: 2}
_RANK_RESULT = {Result.PASS: 0, Result.NONE: 1, Result.TEMPERROR: 2, Result.PERMERROR: 3, Result.FAIL: 4}
_LOWER = {Policy.REJECT: Policy.QUARANTINE, Policy.QUARANTINE: Policy.NONE, Policy.NONE: Policy.NONE}


def _word(value: Any) -> str:
    """A result keyword from a string, a (Str)Enum or an object with `.result`."""
    value = getattr(value, "result", value)
    value = getattr(value, "value", value)
    return str(value or "none").strip().lower()


def evaluate(
    header_from_domains: Sequence[str],
    spf_result: Any,
    spf_domain: str,
    dkim_results: Iterable[Any],
    lookup: Lookup,
    deadline: Deadline | None = None,
    *,
    rand: Callable[[], float] = random.random,
) -> DMARCResult:
    """The DMARC result of a message.

    `spf_result` is the SPF result keyword (or an object with `.result`) for `spf_domain`,
    the domain SPF checked (the MAIL FROM domain, or the HELO domain for a null sender);
    `dkim_results` are objects with `.result` and `.domain` (the signature's `d=`).
    """
    domains: list[str] = []
    for d in header_from_domains:
        norm = normalize_domain(d)
        if norm is not None and norm not in domains:
            domains.append(norm)
    if not domains:
        # RFC 7489 §6.6.1: a message without an RFC5322.From domain is malformed.
        return DMARCResult(Result.PERMERROR, "", Policy.NONE, Policy.NONE, "no RFC5322.From domain")
    spf_word = _word(spf_result)
    dkim = [(_word(r), getattr(r, "domain", "") or "") for r in dkim_results]
    results = [_one(d, spf_word, spf_domain, dkim, lookup, deadline, rand) for d in domains]
    if len(results) == 1:
        return results[0]
    worst = max(results, key=lambda r: (_RANK_DISPOSITION[r.disposition], _RANK_RESULT[r.result]))
    return replace(worst, reason=f"multiple From domains ({', '.join(domains)}); {worst.reason}")


def _one(domain: str, spf_word: str, spf_domain: str, dkim: list[tuple[str, str]], lookup: Lookup,
         deadline: Deadline | None, rand: Callable[[], float]) -> DMARCResult:
    org = organizational_domain(domain)
    record_domain = domain
    try:
        try:
            text = _records_at(domain, lookup, deadline)
            if text is None and org != domain:
                record_domain = org  # §6.6.3: fall back to the organisational domain
                text = _records_at(org, lookup, deadline)
        except _Several:
            return DMARCResult(Result.NONE, domain, Policy.NONE, Policy.NONE,
                               f"several DMARC records at _dmarc.{record_domain}")
    except TempError as e:
        detail = f": {e}" if str(e) else ""
        return DMARCResult(Result.TEMPERROR, domain, Policy.NONE, Policy.NONE,
                           f"DNS lookup of _dmarc.{record_domain} failed{detail}")
    if text is None:
        return DMARCResult(Result.NONE, domain, Policy.NONE, Policy.NONE, "no DMARC record")
    try:
        record = parse_record(text)
    except RecordError as e:
        return DMARCResult(Result.PERMERROR, domain, Policy.NONE, Policy.NONE,
                           f"invalid DMARC record at _dmarc.{record_domain}: {e}", record_domain)
    requested = record.p if record_domain == domain else record.sp  # §6.3 sp=: subdomains of org
    spf_aligned = spf_word == "pass" and _aligned(spf_domain, domain, record.aspf)
    dkim_aligned = [d for word, d in dkim if word == "pass" and _aligned(d, domain, record.adkim)]

    def made(result: Result, policy: Policy, disposition: Policy, reason: str) -> DMARCResult:
        return DMARCResult(result, domain, policy, disposition, reason, record_domain, record,
                           spf_aligned, bool(dkim_aligned))

    if spf_aligned or dkim_aligned:
        how = [f"DKIM d={dkim_aligned[0]}"] if dkim_aligned else []
        how += [f"SPF {normalize_domain(spf_domain)}"] if spf_aligned else []
        return made(Result.PASS, requested, Policy.NONE, "aligned pass: " + ", ".join(how))
    # A temporary failure of an aligned identifier might have been a pass: never act on it.
    if (spf_word == "temperror" and _aligned(spf_domain, domain, record.aspf)) or any(
            word == "temperror" and _aligned(d, domain, record.adkim) for word, d in dkim):
        return made(Result.TEMPERROR, requested, Policy.NONE, "temporary error in an aligned SPF or DKIM check")
    applied, reason = requested, "no aligned SPF or DKIM pass"
    if applied is not Policy.NONE and record.pct < 100 and not rand() * 100 < record.pct:
        applied = _LOWER[applied]  # §6.6.4: not sampled, next less strict policy
        reason += f"; not sampled (pct={record.pct})"
    return made(Result.FAIL, applied, applied, reason)
