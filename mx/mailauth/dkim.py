"""DKIM (RFC 6376, RFC 8463 Ed25519, RFC 8301 crypto updates): every signature of an inbound
message verified into one `DKIMResult`, and the DKIM-Signature headers mx puts on mail that its
users submit. The cryptography and canonicalization are dkimpy's; the result kinds, the key
policy and the DNS are ours (through `Lookup`, from a worker thread).

Invariants:
- One result per DKIM-Signature header, in header order (top first); no header -> `[]`. At most
  `MAX_SIGNATURES` are checked; the rest are `policy` results, so a message cannot buy
  unbounded lookups and body hashing by carrying many signatures.
- A DNS temporary failure, or a `deadline` that has run out, gives `temperror` for that
  signature and never anything stronger (RFC 6376 §6.1.2 TEMPFAIL); no lookup outlives the
  deadline (`Lookup` enforces it).
- Result kinds follow RFC 8601 §2.7.1:
  `pass`; `fail` = the signature or body hash does not match, the key is revoked (empty `p=`,
  RFC 6376 §3.6.1), or the RSA key has fewer than 1024 bits (RFC 8301 §3.2); `permerror` = no
  usable key record: none published (NXDOMAIN or no TXT: RFC 6376 §6.1.2 "no key for
  signature"), unparseable, wrong `k=` for `a=`, `h=`/`s=`/`t=s` of the key not allowing this
  signature, or an RSA key over 8192 bits; `neutral` = the signature itself is malformed or not
  processable (missing or bad tags, `h=` without From, `x=` past, `t=` in the future, unknown
  algorithm); `policy` = cryptographically good but `rsa-sha1` (RFC 8301 §3.1), or not checked
  (over `MAX_SIGNATURES`); `temperror` as above. `none` is never a per-signature result.
- `l=` is honoured as RFC 6376 §3.5 says (only that many body octets are hashed); such results
  carry `body_length_limited` and say in `reason` how much of the body is unsigned, so the
  caller can be cautious. A key's `t=y` sets `testing`; the result itself is unchanged.
- A surprise inside dkimpy on hostile input becomes a `neutral` result for that signature,
  never an exception out of `verify_all`.
- `sign` signs relaxed/relaxed with sha256, no `l=`, `t=` set, the RFC 6376 §5.4.1 header set
  (plus MIME and list headers), with `OVERSIGNED` names listed once more than present so none
  can be added; one signature per key, RSA first (verifiers that look only at the top
  signature mostly know RSA), then Ed25519 (RFC 8463).
"""

from __future__ import annotations

import base64
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization

from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from mx.mailauth import fastrsa
from mx.mailauth.keys import SigningKey, normalize_domain
from mx.mailauth.lookup import BadName, Deadline, Lookup, TempError

fastrsa.install()  # OpenSSL's RSA for dkimpy's verifier (see mx.mailauth.fastrsa)

__all__ = ["DKIMResult", "MAX_SIGNATURES", "OVERSIGNED", "SIGNED", "sign", "signed_headers", "verify_all"]

MAX_SIGNATURES = 10
MIN_RSA_BITS = 1024  # RFC 8301 §3.2
MAX_RSA_BITS = 8192  # cost cap: RFC 8301 §3.2 asks verifiers for 4096
HEADER_B_CHARS = 8  # RFC 6008 §4: enough of b= to tell signatures apart

# RFC 6376 §5.4.1, plus Message-ID, the MIME headers, Sender and RFC 8058's List-Unsubscribe-Post.
SIGNED = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id", "content-description",
    "resent-date", "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-message-id",
    "in-reply-to", "references",
    "list-id", "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe", "list-post",
    "list-owner", "list-archive",
)
# Listed one more time than present (RFC 6376 §8.15): adding one breaks the signature.
OVERSIGNED = ("from", "to", "subject", "date", "message-id", "mime-version", "content-type",
              "content-transfer-encoding")


@dataclass(frozen=True, slots=True)
class DKIMResult:
    result: str  # pass fail neutral policy temperror permerror (RFC 8601 §2.7.1)
    domain: str  # d=, lower-case ("" if the signature has none)
    selector: str  # s=
    algorithm: str  # a=, e.g. rsa-sha256, ed25519-sha256
    identity: str | None  # i= as written, None when absent
    header_b: str  # the first 8 characters of b= (RFC 6008 header.b)
    reason: str  # why, for Authentication-Results comments and the log; "" for a plain pass
    body_length_limited: bool = False  # l= present (RFC 6376 §3.5)
    testing: bool = False  # the key record says t=y (RFC 6376 §3.6.1)


class _Verdict(Exception):
    """A decision made while fetching the key: raised through dkimpy to `_verify_one`."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


class _Quiet:
    """A logger for dkimpy that drops everything: the reasons we report are our own."""

    def debug(self, *args: object, **kw: object) -> None:
        pass

    info = warning = error = exception = debug

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 (logging's name)
        return False


QUIET = _Quiet()


def query_name(name: bytes | str) -> str:
    """A key record name from a signature (`s._domainkey.d.`), U-labels to A-labels (RFC 8616 §4)."""
    text = name.decode("utf-8") if isinstance(name, bytes) else name
    text = text.rstrip(".")
    if not text.isascii():
        text = ".".join(label if label.isascii() else label.encode("idna").decode("ascii")
                        for label in text.split("."))
    return text


class KeyFetcher:
    """dkimpy's `dnsfunc`: the TXT key record of a signature, through `Lookup`.

    With `checks` (the signature's tags), the key is judged first, as RFC 6376 §6.1.2 orders,
    and a key that cannot serve the signature raises `_Verdict`; without (ARC), records are
    handed over as they are and dkimpy decides.
    """

    def __init__(self, lookup: Lookup, deadline: Deadline | None, checks: dict[bytes, bytes] | None = None) -> None:
        self.lookup = lookup
        self.deadline = deadline
        self.checks = checks
        self.testing = False

    def __call__(self, name: bytes, timeout: float = 5.0) -> bytes | None:
        try:
            qname = query_name(name)
            answer = self.lookup.txt(qname, deadline=self.deadline)
        except (BadName, UnicodeError) as e:
            if self.checks is None:
                return None
            raise _Verdict("permerror", f"key record name is not a DNS name: {e}") from None
        records = list(answer.raw)
        if not records:
            if self.checks is None:
                return None
            how = "NXDOMAIN" if answer.nxdomain else "no TXT record"
            raise _Verdict("permerror", f"no key for signature ({qname}: {how})")
        # RFC 6376 §3.6.2.2: several records make the result undefined; take a DKIM1 one if any.
        record = next((r for r in records if r.lstrip().startswith(b"v=DKIM1")), records[0])
        if self.checks is not None:
            self._judge(qname, record, self.checks)
        return record

    def _judge(self, qname: str, record: bytes, sig: dict[bytes, bytes]) -> None:
        try:
            tags = parse_tag_value(record)
        except InvalidTagValueList as e:
            raise _Verdict("permerror", f"key record syntax: {e}") from None
        if tags.get(b"v", b"DKIM1") != b"DKIM1":
            raise _Verdict("permerror", "key record is not v=DKIM1")
        if b"p" in tags and not re.sub(rb"\s+", b"", tags[b"p"]):
            raise _Verdict("fail", "key revoked (empty p=)")  # RFC 6376 §3.6.1
        kind = tags.get(b"k", b"rsa").lower()
        sig_alg = sig.get(b"a", b"").lower()
        if not sig_alg.startswith(kind + b"-"):
            raise _Verdict("permerror", f"key is k={kind.decode('ascii', 'replace')}, "
                                        f"signature a={sig_alg.decode('ascii', 'replace')}")
        if b"h" in tags:
            allowed = {h.strip().lower() for h in tags[b"h"].split(b":")}
            if sig_alg.split(b"-", 1)[1] not in allowed:
                raise _Verdict("permerror", "key h= does not allow the signature's hash")  # RFC 6376 §3.6.1
        if b"s" in tags:
            services = {s.strip().lower() for s in tags[b"s"].split(b":")}
            if not services & {b"*", b"email"}:
                raise _Verdict("permerror", "key s= is not for email")
        flags = {f.strip().lower() for f in tags.get(b"t", b"").split(b":")}
        self.testing = b"y" in flags
        if b"s" in flags and b"i" in sig:
            i_domain = sig[b"i"].rpartition(b"@")[2].lower()
            if i_domain != sig.get(b"d", b"").lower():
                raise _Verdict("permerror", "key t=s requires i= domain equal to d=")
        try:
            _pk, keysize, _ktag, _tlsrpt = dkim.evaluate_pk(qname.encode("ascii"), record)
        except (dkim.DKIMException, ValueError, TypeError) as e:
            raise _Verdict("permerror", f"unusable key: {e}") from None
        if kind == b"rsa" and keysize is not None:
            if keysize < MIN_RSA_BITS:
                raise _Verdict("fail", f"RSA key of {keysize} bits is too small (RFC 8301)")
            if keysize > MAX_RSA_BITS:
                raise _Verdict("permerror", f"RSA key of {keysize} bits is too large")


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")


def _unfold(value: bytes) -> bytes:
    return re.sub(rb"\r?\n(?=[ \t])", b"", value)


def _tags(value: bytes) -> dict[bytes, bytes] | None:
    try:
        return parse_tag_value(_unfold(value))
    except InvalidTagValueList:
        return None


def _result(result: str, tags: dict[bytes, bytes], reason: str, testing: bool = False) -> DKIMResult:
    l_tag = b"l" in tags
    return DKIMResult(
        result=result,
        domain=_text(tags.get(b"d")).lower(),
        selector=_text(tags.get(b"s")),
        algorithm=_text(tags.get(b"a")).lower(),
        identity=_text(tags[b"i"]) if b"i" in tags else None,
        header_b=_text(re.sub(rb"\s+", b"", tags.get(b"b", b""))[:HEADER_B_CHARS]),
        reason=reason,
        body_length_limited=l_tag,
        testing=testing,
    )


def _length_note(d: dkim.DKIM, tags: dict[bytes, bytes]) -> str:
    """What an `l=` leaves unsigned, for the reason text (RFC 6376 §8.2: treat with caution)."""
    limit = _text(tags.get(b"l"))
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        total = len(policy.canonicalize_body(d.body))
        unsigned = max(0, total - int(limit))
    except (InvalidCanonicalizationPolicyError, ValueError):
        return f"body length limited (l={limit})"
    if unsigned:
        return f"body length limited (l={limit}): {unsigned} of {total} body octets not signed"
    return f"body length limited (l={limit}): whole body signed"


def _verify_one(d: dkim.DKIM, idx: int, value: bytes, lookup: Lookup, deadline: Deadline | None) -> DKIMResult:
    tags = _tags(value)
    if tags is None:
        return _result("neutral", {}, "malformed DKIM-Signature tag list")
    missing = [t for t in (b"v", b"a", b"b", b"bh", b"d", b"h", b"s") if t not in tags]
    if missing:
        return _result("neutral", tags, "signature lacks " + ", ".join(f"{t.decode()}=" for t in missing))
    if b"from" not in {h.strip().lower() for h in tags[b"h"].split(b":")}:
        return _result("neutral", tags, "signature does not cover From (RFC 6376 §5.4)")
    if deadline is not None and deadline.expired:
        return _result("temperror", tags, "deadline passed before the key lookup")
    fetcher = KeyFetcher(lookup, deadline, tags)
    try:
        ok = d.verify(idx=idx, dnsfunc=fetcher)
    except TempError as e:
        return _result("temperror", tags, f"key lookup: {e}")
    except _Verdict as v:
        return _result(v.result, tags, v.reason)
    except dkim.ValidationError as e:
        if str(e).startswith("body hash mismatch"):
            return _result("fail", tags, "body hash did not verify", fetcher.testing)
        return _result("neutral", tags, f"signature not processable: {e}", fetcher.testing)
    except dkim.KeyFormatError as e:
        if "too small" in str(e):
            return _result("fail", tags, f"key too small: {e}", fetcher.testing)
        return _result("permerror", tags, f"unusable key: {e}", fetcher.testing)
    except dkim.DKIMException as e:
        return _result("neutral", tags, f"signature not processable: {e}", fetcher.testing)
    except Exception as e:  # dkimpy on hostile input: one signature's result, not the whole check
        return _result("neutral", tags, f"verifier error: {e.__class__.__name__}: {e}", fetcher.testing)
    notes = [_length_note(d, tags)] if b"l" in tags else []
    if fetcher.testing:
        notes.append("key in testing mode (t=y)")
    if not ok:
        return _result("fail", tags, "; ".join(["signature did not verify", *notes]), fetcher.testing)
    if tags[b"a"].lower() == b"rsa-sha1":
        return _result("policy", tags, "; ".join(["rsa-sha1 is not accepted (RFC 8301 §3.1)", *notes]),
                       fetcher.testing)
    return _result("pass", tags, "; ".join(notes), fetcher.testing)


_SIG_HEADER = re.compile(rb"(?im)^dkim-signature[ \t]*:")


def verify_all(message: bytes, lookup: Lookup, deadline: Deadline | None = None) -> list[DKIMResult]:
    """One `DKIMResult` per DKIM-Signature header of `message`, top first; `[]` if unsigned."""
    try:
        d = dkim.DKIM(message, minkey=MIN_RSA_BITS, logger=QUIET)
    except dkim.DKIMException as e:  # a header dkimpy cannot split: nothing can be verified
        head = message.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
        return [_result("neutral", {}, f"message header not parseable: {e}") for _ in _SIG_HEADER.finditer(head)]
    values = [v for name, v in d.headers if name.lower() == b"dkim-signature"]
    results = []
    for idx, value in enumerate(values):
        if idx >= MAX_SIGNATURES:
            results.append(_result("policy", _tags(value) or {}, f"not checked: over {MAX_SIGNATURES} signatures"))
        else:
            results.append(_verify_one(d, idx, value, lookup, deadline))
    return results


# --- signing -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def dkimpy_private_key(algorithm: str, pem: bytes) -> bytes:
    """The private key as dkimpy takes it: PKCS#1 PEM for RSA, the base64 seed for Ed25519."""
    key = serialization.load_pem_private_key(pem, password=None)
    if algorithm == "rsa" and isinstance(key, rsa.RSAPrivateKey):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
    if algorithm == "ed25519" and isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        return base64.b64encode(seed)
    raise ValueError(f"key is not {algorithm}")


def signed_headers(names: Sequence[bytes]) -> list[bytes]:
    """The `h=` list for a message whose header names are `names` (top to bottom)."""
    wanted = set(SIGNED)
    listed = [n.lower() for n in names if n.lower().decode("ascii", "replace") in wanted]
    return listed + [n.encode("ascii") for n in OVERSIGNED]


def line_separator(message: bytes) -> bytes:
    """CRLF unless the message's first line ends in a bare LF."""
    first = message.find(b"\n")
    return b"\n" if first > 0 and message[first - 1:first] != b"\r" else b"\r\n"


_ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}


def sign(message: bytes, domain: str, keys: Sequence[SigningKey]) -> bytes:
    """The DKIM-Signature headers to put on top of `message`, one per key; b"" without keys."""
    if not keys:
        return b""
    d_tag = normalize_domain(domain).encode("ascii")
    d = dkim.DKIM(message, logger=QUIET, linesep=line_separator(message))
    include = signed_headers([name for name, _ in d.headers])
    ordered = sorted(keys, key=lambda k: (k.algorithm != "rsa", k.selector))
    out = []
    for key in ordered:
        if key.algorithm not in _ALGORITHM:
            raise ValueError(f"unknown key algorithm {key.algorithm!r}")
        out.append(d.sign(key.selector.encode("ascii"), d_tag, dkimpy_private_key(key.algorithm, key.private_bytes),
                          signature_algorithm=_ALGORITHM[key.algorithm], canonicalize=(b"relaxed", b"relaxed"),
                          include_headers=include, length=False))
    return b"".join(out)
