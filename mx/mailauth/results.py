"""The Authentication-Results header (RFC 8601): writing ours, removing forged ones.

`authentication_results(...)` formats one header from the SPF, DKIM, DMARC and ARC results
of a message; `strip_forged(message, authserv_id)` removes the incoming headers that claim
to come from us.

Invariants and choices:
- Our own formatter, not `authres`: the exact bytes (order, folding, quoting) are ours and
  golden-tested, we only ever write, and the output needs no object model; `authres` parses
  it back in the tests as an independent reader.
- One header, CRLF line ends, ending in CRLF. Result order: SPF of MAIL FROM, SPF of HELO,
  each DKIM signature in the order given, DMARC, ARC. Each result (resinfo) starts a line
  with a tab, results are separated by ";"; a line longer than 78 characters is folded
  before a property (continuation lines start with a tab and two spaces); a single item
  longer than that stays on one line.
- A result is written `method=result`, then `reason="..."` when the result is neither pass
  nor none and a reason is known (always quoted, ASCII, at most 200 characters), then its
  properties. Values are written bare when they are RFC 2045 tokens or
  `dot-atom@domain` / `@domain` forms, quoted otherwise (RFC 8601 §2.2 pvalue).
- DMARC, when a record was used, carries the comment `(p=<policy> dis=<disposition>)`
  (the policy after pct sampling, and what we do) before `header.from`.
- Nothing checked (every argument None) -> `Authentication-Results: <id>; none` (§2.2).
  `dkim=None` means DKIM was not checked; an empty list means it was and found no
  signature (`dkim=none`).
- Results are read duck-typed: `.result` (a string or a StrEnum), optional `.reason`; DKIM
  `.domain`, `.selector`, `.algorithm`, `.identity`, `.header_b`; DMARC `.header_from`,
  `.policy`, `.disposition`, `.record_domain`. A plain string is accepted for a result.
- `strip_forged` looks only at the message's top header block (up to the first empty line)
  and removes a field with all its continuation lines, leaving every other byte as it is.
- Pure: no Twisted, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["authentication_results", "parse_authserv_id", "strip_forged"]

MAX_LINE = 78  # RFC 5322 §2.1.1 SHOULD
MAX_REASON = 200
HEADER_B_PREFIX = 8  # RFC 6008 §4: at least 8 characters of b=, more if needed to tell them apart
_FIELD = "Authentication-Results"
_FIRST, _NEXT = "\t", "\t  "

# RFC 2045 token: printable US-ASCII except SPACE and tspecials ()<>@,;:\"/[]?=
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+\Z")
# RFC 8601 pvalue's [[local-part] "@"] domain-name, with a dot-atom local part (RFC 5322 atext).
_ATEXT = r"[!#$%&'*+\-/=?0-9A-Z^_`a-z{|}~]+"
_ADDRESS = re.compile(rf"(?:{_ATEXT}(?:\.{_ATEXT})*)?"
                      r"@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_BLANKS = re.compile(r"[\x00-\x20\x7f]+")


def _word(value: Any) -> str:
    value = getattr(value, "result", value)
    value = getattr(value, "value", value)
    return str(value or "none").strip().lower()


def _value(text: str) -> str:
    text = _CONTROL.sub(" ", text).strip()
    if _TOKEN.match(text) or _ADDRESS.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reason(result: Any, word: str) -> list[str]:
    reason = getattr(result, "reason", None)
    if word in ("pass", "none") or not reason:
        return []
    text = _BLANKS.sub(" ", str(reason)).strip()
    text = text.encode("ascii", "backslashreplace").decode("ascii")[:MAX_REASON]
    return ['reason="' + text.replace("\\", "\\\\").replace('"', '\\"') + '"']


def _prop(name: str, value: Any) -> list[str]:
    text = str(value or "").strip()
    return [f"{name}={_value(text)}"] if text else []


def _b_prefixes(signatures: Sequence[Any]) -> list[str]:
    """The shortest header.b prefixes (>= 8 characters) that tell the signatures apart."""
    full = [str(getattr(s, "header_b", "") or "") for s in signatures]
    distinct = {b for b in full if b}
    n = HEADER_B_PREFIX
    while n < max((len(b) for b in distinct), default=0) and len({b[:n] for b in distinct}) < len(distinct):
        n += 1
    return [b[:n] for b in full]


def _fold(items: list[str], last: bool) -> list[str]:
    lines = [_FIRST + items[0]]
    for k, item in enumerate(items[1:], start=2):
        tail = 0 if last or k < len(items) else 1  # the ";" this resinfo ends with
        if len(lines[-1]) + 1 + len(item) + tail > MAX_LINE:
            lines.append(_NEXT + item)
        else:
            lines[-1] += " " + item
    return lines


def authentication_results(
    authserv_id: str,
    *,
    spf: Any = None,
    helo_spf: Any = None,
    dkim: Sequence[Any] | None = None,
    dmarc: Any = None,
    arc: Any = None,
    smtp_mailfrom: str = "",
    helo: str = "",
) -> bytes:
    """One Authentication-Results header field, folded, ending in CRLF.

    `smtp_mailfrom` is the MAIL FROM address ("" for the null sender, written as
    `postmaster@<helo>` as RFC 7208 §2.4 checks it); `helo` the HELO/EHLO name.
    """
    results: list[list[str]] = []
    if spf is not None:
        word = _word(spf)
        sender = smtp_mailfrom or (f"postmaster@{helo}" if helo else "")
        results.append([f"spf={word}", *_reason(spf, word), *_prop("smtp.mailfrom", sender)])
    if helo_spf is not None:
        word = _word(helo_spf)
        results.append([f"spf={word}", *_reason(helo_spf, word), *_prop("smtp.helo", helo)])
    if dkim is not None:
        if not dkim:
            results.append(["dkim=none"])  # RFC 8601 §2.7.1: the message was not signed
        for sig, b in zip(dkim, _b_prefixes(dkim)):
            word = _word(sig)
            domain = str(getattr(sig, "domain", "") or "")
            identity = str(getattr(sig, "identity", "") or "")
            if domain and identity.lower() == f"@{domain.lower()}":
                identity = ""  # the default i= says nothing new
            results.append([
                f"dkim={word}", *_reason(sig, word), *_prop("header.d", domain), *_prop("header.i", identity),
                *_prop("header.s", getattr(sig, "selector", "")), *_prop("header.a", getattr(sig, "algorithm", "")),
                *_prop("header.b", b),
            ])
    if dmarc is not None:
        word = _word(dmarc)
        item = [f"dmarc={word}", *_reason(dmarc, word)]
        if getattr(dmarc, "record_domain", None):
            policy, disposition = _word(getattr(dmarc, "policy", "")), _word(getattr(dmarc, "disposition", ""))
            item.append(f"(p={policy} dis={disposition})")
        results.append(item + _prop("header.from", getattr(dmarc, "header_from", "")))
    if arc is not None:
        word = _word(arc)
        results.append([f"arc={word}", *_reason(arc, word)])
    head = f"{_FIELD}: {_value(authserv_id)};"
    if not results:
        return f"{head} none\r\n".encode()
    lines = [head]
    for k, items in enumerate(results):
        last = k == len(results) - 1
        folded = _fold(items, last)
        if not last:
            folded[-1] += ";"
        lines += folded
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


# Removing forged headers -------------------------------------------------------------------


def _skip_cfws(value: bytes, i: int) -> int:
    """The index after white space and (nested) comments from `i` on."""
    n = len(value)
    while i < n:
        c = value[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:  # "("
            depth = 0
            while i < n:
                c = value[i]
                if c == 0x5C:
                    i += 2
                    continue
                depth += c == 0x28
                depth -= c == 0x29
                i += 1
                if depth == 0:
                    break
        else:
            break
    return i


def parse_authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results field value ("" if it has none):
    a token or quoted-string after optional CFWS (RFC 8601 §2.2), lower-case, without a
    trailing dot."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == b'"':
        out = bytearray()
        i += 1
        while i < len(value) and value[i] != 0x22:
            if value[i] == 0x5C and i + 1 < len(value):
                i += 1
            out.append(value[i])
            i += 1
        ident = bytes(out)
    else:
        m = re.compile(rb"[^\s;()\"]*").match(value, i)
        ident = m.group(0) if m else b""
    return ident.decode("utf-8", "replace").strip().rstrip(".").lower()


def strip_forged(message: bytes, authserv_id: str) -> bytes | None:
    """`message` without the Authentication-Results fields of its top header block whose
    authserv-id is ours (case-insensitive; RFC 8601 §5), or None when there is none."""
    ours = authserv_id.strip().rstrip(".").lower()
    n = len(message)
    drop: list[tuple[int, int]] = []  # [start, end) of fields to remove
    field_start = -1  # start of the current field, if it is one to judge
    pos = 0
    while pos < n:
        nl = message.find(b"\n", pos)
        end = n if nl < 0 else nl + 1
        line = message[pos:end]
        if line in (b"\r\n", b"\n"):
            break  # the empty line ends the header block
        if line[:1] in (b" ", b"\t"):
            pos = end  # a continuation line belongs to the field above
            continue
        if field_start >= 0:
            _judge(message, field_start, pos, ours, drop)
            field_start = -1
        name, colon, _ = line.partition(b":")
        if colon and name.rstrip(b" \t").lower() == b"authentication-results":
            field_start = pos
        pos = end
    if field_start >= 0:
        _judge(message, field_start, pos, ours, drop)
    if not drop:
        return None
    out = bytearray()
    prev = 0
    for start, stop in drop:
        out += message[prev:start]
        prev = stop
    out += message[prev:]
    return bytes(out)


def _judge(message: bytes, start: int, stop: int, ours: str, drop: list[tuple[int, int]]) -> None:
    value = message[start:stop].partition(b":")[2]
    if parse_authserv_id(value) == ours:
        drop.append((start, stop))
