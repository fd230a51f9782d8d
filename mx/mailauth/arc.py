"""ARC (RFC 8617): validating the chain of custody on inbound mail, and sealing what mx forwards,
with dkimpy's ARC code; the DNS is ours (through `Lookup`, from a worker thread).

Invariants:
- `verify_chain` gives `none` (no ARC headers), `pass` or `fail`: the three results RFC 8617
  §10.1 registers. A DNS temporary failure or a spent deadline is a `fail` with `temporary`
  set, never a `pass`, so nothing trusts a chain it could not check.
- A chain of more than 50 sets (RFC 8617 §4.2.1) fails before any lookup; every lookup is
  bounded by the deadline (`Lookup` enforces it).
- `sealers` are the ARC-Seal `d=` values by instance, oldest first: `sealers[-1]` is the
  newest sealer, the one a trust list is matched against (RFC 8617 §7.2). `aar` is the
  newest ARC-Authentication-Results payload without its `i=` tag (`authserv-id; results`).
- `oldest_pass` (RFC 8617 §5.2) for a passing chain: 0 when every ARC-Message-Signature still
  validates, else the lowest instance from which all newer ones validate; None otherwise.
- `seal` prepends nothing itself: it returns ARC-Seal, ARC-Message-Signature and
  ARC-Authentication-Results (in that order, to go on top). The chain status `cv=` is the
  `arc=` result in `authres_value` (what our own validation found), as dkimpy reads it from
  our Authentication-Results; RFC 8617 §4.1.3 allows only rsa-sha256, so the key must be RSA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import authres
import dkim

from mx.mailauth.dkim import MIN_RSA_BITS, QUIET, KeyFetcher, dkimpy_private_key, line_separator, signed_headers
from mx.mailauth.keys import SigningKey, normalize_domain
from mx.mailauth.lookup import Deadline, Lookup, TempError

__all__ = ["ARCResult", "MAX_INSTANCE", "seal", "verify_chain"]

MAX_INSTANCE = 50  # RFC 8617 §4.2.1


@dataclass(frozen=True, slots=True)
class ARCResult:
    result: str  # none, pass, fail (RFC 8617 §10.1)
    instance: int  # the highest i= (0 without ARC headers)
    sealers: list[str] = field(default_factory=list)  # ARC-Seal d= by instance, oldest first
    oldest_pass: int | None = None
    reason: str = ""
    aar: str | None = None  # the newest ARC-Authentication-Results payload: what the last sealer saw
    temporary: bool = False  # failed only because DNS failed for now (or the deadline passed)


_INSTANCE = re.compile(rb"^\s*i\s*=\s*(\d+)\s*;?\s*", re.IGNORECASE)


def _sets(a: dkim.ARC) -> tuple[int, list[str], str | None]:
    """(highest instance, sealer domains oldest first, newest AAR payload) from the headers."""
    max_instance, headers = a.sorted_arc_headers()
    seals: dict[int, str] = {}
    aar = None
    for instance, (name, value) in headers:
        lname = name.lower()
        if lname == b"arc-seal":
            try:
                d = dkim.util.parse_tag_value(value).get(b"d", b"")
            except dkim.util.InvalidTagValueList:
                d = b""
            seals.setdefault(instance, d.decode("utf-8", "replace").lower())
        elif lname == b"arc-authentication-results" and instance == max_instance and aar is None:
            aar = _INSTANCE.sub(b"", value, count=1).strip().decode("utf-8", "replace")
    return max_instance, [seals[i] for i in sorted(seals)], aar


def _oldest_pass(results: list[dict]) -> int:
    """`results` newest first: 0 if every AMS validates, else the oldest of the valid run from the newest."""
    lowest = 0
    for r in results:
        if not r.get("ams-valid"):
            return lowest
        lowest = r["instance"]
    return 0


_ARC_FIELD = re.compile(rb"(?im)^arc-(?:seal|message-signature|authentication-results)[ \t]*:")


def _header_end(message: bytes) -> int:
    ends = [i for i in (message.find(b"\n\r\n"), message.find(b"\n\n")) if i >= 0]
    return min(ends) + 1 if ends else len(message)


def verify_chain(message: bytes, lookup: Lookup, deadline: Deadline | None = None) -> ARCResult:
    """Validate the ARC chain of `message` (RFC 8617 §5.2)."""
    if not _ARC_FIELD.search(message, 0, _header_end(message)):
        return ARCResult("none", 0, reason="no ARC headers")  # most mail: no second parse
    try:
        a = dkim.ARC(message, minkey=MIN_RSA_BITS, logger=QUIET)
        max_instance, sealers, aar = _sets(a)
    except dkim.DKIMException as e:
        if re.search(rb"(?im)^arc-(seal|message-signature|authentication-results)[ \t]*:", message):
            return ARCResult("fail", 0, reason=f"message header not parseable: {e}")
        return ARCResult("none", 0, reason="no ARC headers")
    if max_instance == 0:
        return ARCResult("none", 0, reason="no ARC headers")

    def failed(reason: str, temporary: bool = False) -> ARCResult:
        return ARCResult("fail", max_instance, sealers, None, reason, aar, temporary)

    if max_instance > MAX_INSTANCE:
        return failed(f"i={max_instance} is over the limit of {MAX_INSTANCE} (RFC 8617 §4.2.1)")
    if deadline is not None and deadline.expired:
        return failed("deadline passed before the key lookups", True)
    try:
        cv, results, reason = a.verify(dnsfunc=KeyFetcher(lookup, deadline))
    except TempError as e:
        return failed(f"key lookup: {e}", True)
    except dkim.DKIMException as e:
        return failed(f"chain not processable: {e}")
    except Exception as e:  # dkimpy on hostile input: a failed chain, not a failed check
        return failed(f"verifier error: {e.__class__.__name__}: {e}")
    if cv == dkim.CV_Pass:
        return ARCResult("pass", max_instance, sealers, _oldest_pass(results), "", aar)
    if cv == dkim.CV_None:
        return ARCResult("none", 0, reason=str(reason))
    return failed(str(reason))  # CV_Fail, or None: an earlier sealer said cv=fail


_HEADER_FIELD = re.compile(rb"[^\r\n]+(?:\r?\n[ \t][^\r\n]*)*(?:\r?\n|$)")


def _without_our_results(message: bytes, authserv_id: str) -> bytes:
    """`message` minus the Authentication-Results headers that claim `authserv_id`."""
    end = re.search(rb"\r?\n\r?\n", message)
    split = len(message) if end is None else message.index(b"\n", end.start()) + 1
    head, rest = message[:split], message[split:]  # every field of `head` ends in its line end
    kept = []
    for m in _HEADER_FIELD.finditer(head):
        fld = m.group(0)
        name, _, value = fld.partition(b":")
        if name.strip().lower() == b"authentication-results":
            first = re.split(rb"[;\s]", value.strip(), maxsplit=1)[0]
            if first.decode("utf-8", "replace").lower() == authserv_id.lower():
                continue
        kept.append(fld)
    return b"".join(kept) + rest


def _authres_value(authres_value: str, authserv_id: str) -> str:
    value = " ".join(authres_value.split())  # one line: dkimpy parses it unfolded
    first = re.split(r"[;\s]", value, maxsplit=1)[0]
    if first.lower() != authserv_id.lower():
        value = f"{authserv_id}; {value}"
    try:
        parsed = authres.AuthenticationResultsHeader.parse(f"Authentication-Results: {value}")
    except authres.core.SyntaxError as e:
        raise ValueError(f"not an Authentication-Results value: {e}") from None
    arcs = [r.result.lower() for r in parsed.results if r.method == "arc"]
    if len(arcs) > 1 or any(r not in ("none", "pass", "fail") for r in arcs):
        raise ValueError("authres_value needs at most one arc= result, of none, pass or fail")
    return value


def seal(message: bytes, authres_value: str, domain: str, key: SigningKey, authserv_id: str) -> bytes:
    """The ARC set (ARC-Seal, ARC-Message-Signature, ARC-Authentication-Results) for `message`.

    `authres_value` is our Authentication-Results value (with or without the leading
    authserv-id); its `arc=` result becomes `cv=` (none when absent, which only a message
    without a chain may be). ValueError when the key is not RSA or the inputs cannot be sealed.
    """
    if key.algorithm != "rsa":
        raise ValueError("ARC seals are rsa-sha256 only (RFC 8617 §4.1.3); this key is " + key.algorithm)
    value = _authres_value(authres_value, authserv_id)
    linesep = line_separator(message)
    body = _without_our_results(message, authserv_id)
    signed = b"Authentication-Results: " + value.encode("utf-8") + linesep + body
    a = dkim.ARC(signed, logger=QUIET, signature_algorithm=b"rsa-sha256", linesep=linesep)
    include = [h for h in signed_headers([name for name, _ in a.headers]) if h != b"authentication-results"]
    try:
        headers = a.sign(key.selector.encode("ascii"), normalize_domain(domain).encode("ascii"),
                         dkimpy_private_key("rsa", key.private_bytes), authserv_id.encode("utf-8"),
                         include_headers=include)
    except dkim.DKIMException as e:
        raise ValueError(f"cannot seal: {e}") from None
    if not headers:
        raise ValueError("cannot seal: the message has an ARC chain but authres_value has no arc= result")
    return b"".join(headers)
