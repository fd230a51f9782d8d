"""RFC 3464 delivery status notifications: the failure bounce and the delay warning.

`failure_notice` and `delay_notice` turn a queue record's outcome into a complete
`multipart/report; report-type=delivery-status` message (RFC 6522) with three parts: a
human-readable `text/plain` explanation, the machine-readable `message/delivery-status`
(RFC 3464 §2) and the original's header block as `text/rfc822-headers` (RFC 6522 §4). The
caller hands the returned `Notice` to `delivery` like any other message. Pure: no Twisted, no I/O.

Invariants:
- A notice is never addressed to `<>` and is always sent from `<>` (RFC 3464 §2,
  RFC 5321 §4.5.5): a message from the null sender gets no notice, so `ValueError`.
- Every line ends in CRLF and holds at most 998 octets (RFC 5322 §2.1.1).
- Text that came from outside (a remote server's reply, host names, addresses, the original
  headers) cannot add a header field or a MIME part: control characters (CR, LF, NUL, ...)
  become spaces before the text is folded, folded lines always start with whitespace, and
  the boundary is random and checked against every part's content.
- Times are written in UTC, so the same inputs give the same bytes (golden tests).
- Non-ASCII addresses (SMTPUTF8, RFC 6531) are written as UTF-8 after "rfc822;" and the part
  is marked 8bit; RFC 6533's "utf-8" address type and message/global-delivery-status are not
  used, to keep the notice readable by RFC 3464 parsers. Such a notice needs SMTPUTF8 to relay.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import format_datetime
from typing import Sequence

__all__ = [
    "RecipientStatus",
    "Notice",
    "failure_notice",
    "delay_notice",
    "original_headers",
    "MAX_LINE",
]

MAX_LINE = 998  # octets, without CRLF: RFC 5322 §2.1.1 / RFC 5321 §4.5.3.1.6
_WIDTH = 78  # where we fold when there is whitespace to fold at (RFC 5322 §2.1.1 SHOULD)
_PIECE = 900  # longest run without whitespace before we break it by force
_CRLF = "\r\n"

_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")  # RFC 3463 §2
_SMTP_REPLY = re.compile(r"[245]\d\d[ -]")  # a diagnostic that is an SMTP reply
# C0/C1 controls, DEL, Unicode line/paragraph separators, lone surrogates: never in our output.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
# In the copied header block: NUL and C0 controls other than HT, and DEL (RFC 5322 §3.2.3).
_UNSAFE_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEADER_END = re.compile(rb"(?:\A|\n)\r?\n")


@dataclass(frozen=True)
class RecipientStatus:
    """One recipient's outcome, as the relay recorded it."""

    recipient: str  # the address delivery was attempted to (after alias expansion); "rfc822;" is added here
    action: str  # "failed" | "delayed" (RFC 3464 §2.3.3)
    status: str  # enhanced status code (RFC 3463), e.g. "5.1.1", "4.4.1"
    diagnostic: str | None = None  # e.g. "550 5.1.1 <bob@x.test>: no such user"
    remote_mta: str | None = None  # host name of the MX that answered
    last_attempt: float | None = None  # unix time -> Last-Attempt-Date
    will_retry_until: float | None = None  # unix time -> Will-Retry-Until (delayed only)
    original_recipient: str | None = None  # the RCPT the client gave, if an alias changed it


@dataclass(frozen=True)
class Notice:
    """A ready notice: `message` is the full RFC 5322 message in CRLF form."""

    message: bytes
    sender: str  # always "" (the null reverse-path, RFC 5321 §4.5.5)
    recipient: str  # the original envelope sender


def failure_notice(
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: Sequence[RecipientStatus],
    original: bytes,
    queue_id: str,
    arrival: float,
    now: float,
    postmaster: str,
    message_id_domain: str | None = None,
    boundary: str | None = None,
    message_id: str | None = None,
) -> Notice:
    """The bounce for recipients we gave up on (every one must have action "failed")."""
    return _notice("failed", **locals())


def delay_notice(
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: Sequence[RecipientStatus],
    original: bytes,
    queue_id: str,
    arrival: float,
    now: float,
    postmaster: str,
    message_id_domain: str | None = None,
    boundary: str | None = None,
    message_id: str | None = None,
) -> Notice:
    """The warning for recipients still being retried (every one must have action "delayed")."""
    return _notice("delayed", **locals())


def original_headers(original: bytes, limit: int = 65536) -> bytes:
    """The original's header block (up to, not including, the blank line), CRLF-terminated.

    Cut at a line boundary so the result is at most `limit` bytes. Line ends become CRLF, stray
    control characters are dropped, and a line over 998 octets is split into continuation lines.
    A message without a blank line is all header block.
    """
    found = _HEADER_END.search(original)
    block = original[: found.start() + found.group().startswith(b"\n")] if found else original
    cap = limit + MAX_LINE + 2  # nothing past this can be kept: bounds the work on huge input
    lines = block[:cap].split(b"\n")
    if len(block) > cap or not lines[-1]:
        lines.pop()  # a partial line cut by the cap, or the empty tail after the last LF
    out: list[bytes] = []
    size = 0
    for raw in lines:
        line = _UNSAFE_BYTES.sub(b"", raw.removesuffix(b"\r"))
        pieces = [line[:MAX_LINE]]
        step = MAX_LINE - 1  # continuation pieces start with a space (RFC 5322 §2.2.3)
        pieces += [b" " + line[i : i + step] for i in range(MAX_LINE, len(line), step)]
        for piece in pieces:
            if size + len(piece) + 2 > limit:
                return b"".join(out)
            out.append(piece + b"\r\n")
            size += len(piece) + 2
    return b"".join(out)


def _notice(
    kind: str,
    *,
    reporting_mta: str,
    original_sender: str,
    recipients: Sequence[RecipientStatus],
    original: bytes,
    queue_id: str,
    arrival: float,
    now: float,
    postmaster: str,
    message_id_domain: str | None,
    boundary: str | None,
    message_id: str | None,
) -> Notice:
    sender = original_sender
    if sender in ("", "<>"):  # RFC 3464 §2, RFC 5321 §4.5.5: never a notice to <>
        raise ValueError("a message from the null sender never gets a notice")
    if not recipients:
        raise ValueError("a notice needs at least one recipient")
    for r in recipients:
        if r.action != kind:
            raise ValueError(f"recipient {r.recipient!r}: action {r.action!r} in a {kind} notice")
        if not _STATUS.match(r.status) or (kind == "delayed" and r.status[0] != "4"):
            raise ValueError(f"recipient {r.recipient!r}: bad status {r.status!r} for {kind}")
        if not _clean(r.recipient):
            raise ValueError("empty recipient")
    host = _clean(reporting_mta)
    mid = _clean(message_id or _message_id(queue_id, _clean(message_id_domain or host)))
    if not mid.startswith("<"):
        mid = f"<{mid}>"

    parts = [
        ("Notification", "text/plain; charset=utf-8",
         _human(kind, host, postmaster, recipients, now - arrival)),
        ("Delivery report", "message/delivery-status",
         _report(host, queue_id, sender, arrival, recipients)),
        ("Undelivered Message Headers" if kind == "failed" else "Delayed Message Headers",
         "text/rfc822-headers", original_headers(original)),
    ]
    bodies = [p[2] for p in parts]
    if boundary is None:
        boundary = _boundary(bodies)
    elif not re.fullmatch(r"[0-9A-Za-z'()+_,./:=?-]{1,70}", boundary) or any(
        boundary.encode() in b for b in bodies
    ):  # RFC 2046 §5.1.1 bchars (no space, so it needs no care when folded)
        raise ValueError(f"unusable boundary {boundary!r}")

    top = _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>")
    top += _field("To", sender)
    top += _field("Subject", "Undelivered Mail Returned to Sender" if kind == "failed"
                  else "Delayed Mail (still being retried)")
    top += _field("Date", _date(now))
    top += _field("Message-ID", mid)
    top += _field("Auto-Submitted", "auto-replied")  # RFC 3834 §5
    top += _field("MIME-Version", "1.0")
    top += _field("Content-Type",  # RFC 6522 §3
                  f'multipart/report; report-type=delivery-status; boundary="{boundary}"')
    top += _field("Content-Transfer-Encoding", _cte(b"".join(bodies)))
    out = [top.encode(), b"\r\nThis is a MIME-encapsulated message.\r\n"]
    for description, ctype, body in parts:
        out.append(f"\r\n--{boundary}\r\n".encode())
        head = _field("Content-Description", description) + _field("Content-Type", ctype)
        out += [(head + _field("Content-Transfer-Encoding", _cte(body))).encode(), b"\r\n", body]
    out.append(f"\r\n--{boundary}--\r\n".encode())
    return Notice(message=b"".join(out), sender="", recipient=sender)


def _cte(body: bytes) -> str:
    return "7bit" if body.isascii() else "8bit"  # RFC 2045 §6.2; lines are short either way


def _human(kind: str, host: str, postmaster: str,
           rcpts: Sequence[RecipientStatus], age: float) -> bytes:
    lines = [f"This is the mail system at host {host}.", ""]
    if kind == "failed":
        lines += ["I'm sorry to have to inform you that your message could not be",
                  "delivered to one or more recipients. The headers of your message",
                  "are attached below.", ""]
    else:
        lines += ["#" * 68,
                  "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                  "#" * 68, "",
                  f"Your message could not be delivered for {_duration(age)} to the",
                  "recipients below. The mail system will keep trying; you will be",
                  "told if delivery finally fails.", ""]
    lines += _wrap(f"For further assistance, please send mail to {_clean(postmaster)}."
                   " If you do so, please include this problem report.", indent="")
    lines += ["", "This is an automatically generated message; please do not reply to it.",
              "", " " * 19 + "The mail system", ""]
    for r in rcpts:
        diag = _clean(r.diagnostic or "") or f"delivery status {r.status}"
        if r.remote_mta and r.diagnostic:
            diag = f"host {_clean(r.remote_mta)} said: {diag}"
        lines += _wrap(f"<{_clean(r.recipient)}>: {diag}")
        if kind == "delayed" and r.will_retry_until is not None:
            lines += _wrap(f"will keep trying until {_date(r.will_retry_until)}", first="    ")
        lines.append("")
    return _CRLF.join(lines).encode()


def _report(host: str, queue_id: str, sender: str, arrival: float,
            rcpts: Sequence[RecipientStatus]) -> bytes:
    # RFC 3464 §2.2 per-message fields, then one §2.3 block per recipient, blank-line separated.
    text = _field("Reporting-MTA", f"dns; {host}")
    text += _field("X-Mx-Queue-ID", _clean(queue_id))  # extension field, RFC 3464 §2.4
    text += _field("X-Mx-Sender", f"rfc822; {_clean(sender)}")
    text += _field("Arrival-Date", _date(arrival))
    for r in rcpts:
        text += _CRLF
        if r.original_recipient:  # RFC 3464 §2.3.1
            text += _field("Original-Recipient", f"rfc822; {_clean(r.original_recipient)}")
        text += _field("Final-Recipient", f"rfc822; {_clean(r.recipient)}")
        text += _field("Action", r.action)
        text += _field("Status", r.status)
        if r.remote_mta:
            text += _field("Remote-MTA", f"dns; {_clean(r.remote_mta)}")
        if r.diagnostic and _clean(r.diagnostic):
            diag = _clean(r.diagnostic)
            # RFC 3464 §2.3.6: "smtp" only for an SMTP reply; other text gets our X- type.
            kind = "smtp" if _SMTP_REPLY.match(diag + " ") else "X-Mx"
            text += _field("Diagnostic-Code", f"{kind}; {diag}")
        if r.last_attempt is not None:
            text += _field("Last-Attempt-Date", _date(r.last_attempt))
        if r.will_retry_until is not None and r.action == "delayed":
            text += _field("Will-Retry-Until", _date(r.will_retry_until))
    return text.encode()


def _clean(text: str) -> str:
    """Outside text made safe for one header field: no controls, whitespace runs as one space."""
    return " ".join(_UNSAFE.sub(" ", text).split())


def _field(name: str, value: str) -> str:
    """`Name: value` folded at whitespace (never inside a run over 900 octets), CRLF-ended."""
    return _CRLF.join(_wrap(value, first=f"{name}:", indent=" ")) + _CRLF


def _wrap(text: str, first: str = "", indent: str = "    ") -> list[str]:
    """Words of `text` into lines of <= 78 octets where possible and always <= 998."""
    lines: list[str] = []
    line, has_word = first, False
    for word in _clean(text).split(" "):
        for piece in _chop(word) if word else []:
            if has_word and len((line + " " + piece).encode()) > _WIDTH:
                lines.append(line)
                line = indent + piece
            else:
                line += (" " if line and not line.endswith(" ") else "") + piece
            has_word = True
    lines.append(line)
    return lines


def _chop(word: str) -> list[str]:
    """Break `word` into pieces of at most _PIECE octets of UTF-8, at character boundaries."""
    pieces, cur, size = [], [], 0
    for ch in word:
        n = len(ch.encode("utf-8", "replace"))
        if size + n > _PIECE:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    pieces.append("".join(cur))
    return pieces


def _date(t: float) -> str:
    """RFC 5322 §3.3 date-time in UTC."""
    return format_datetime(datetime.fromtimestamp(t, timezone.utc))


def _duration(seconds: float) -> str:
    if seconds < 7200:
        return f"{max(seconds, 0) / 60:.0f} minutes"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


def _message_id(queue_id: str, domain: str) -> str:
    qid = re.sub(r"[^A-Za-z0-9._-]", "", queue_id)
    return f"<dsn.{qid}.{secrets.token_hex(8)}@{domain}>"


def _boundary(contents: Sequence[bytes]) -> str:
    while True:
        boundary = f"=_mx_dsn_{secrets.token_hex(12)}"  # "=_" cannot start a QP or base64 line
        if not any(boundary.encode() in c for c in contents):
            return boundary
