"""The inbound verdict: SPF, DKIM, ARC and DMARC of one message, and what to do with it.

`check_message` runs in a thread (blocking DNS through `Lookup`, which uses the configured
`dns.nameservers` and `dns.timeout`); the SMTP server calls it at the final dot of a
message on the `smtp` port and acts on the `Verdict`. `DKIMSigner` signs what submission
accepts from an authenticated user.

Invariants:
- One `Deadline` (`mailauth.deadline`) bounds all lookups of one message: when it runs out,
  the remaining checks give `temperror`; a check never waits on DNS past it.
- DNS trouble never rejects: `temperror` results are written into the header and the
  message is accepted (RFC 7489 §6.6.3 allows a 4xx; we deliver, as the issue asks).
- A check that raises (a bug, a library surprise) is logged by the caller and counts as
  `temperror` for that method: mail is never refused because of our own error.
- DMARC `p=reject` fail -> REJECT (550 5.7.1), `p=quarantine` fail -> JUNK, unless
  `mailauth.dmarc_policy = "report"`, or a passing ARC chain whose newest sealer is in
  `mailauth.trusted_arc_sealers` vouches for the message (RFC 8617 §7.2: local policy).
- The Authentication-Results header is one header with `hostname` as authserv-id; any
  incoming one claiming that id is removed from the message first (RFC 8601 §5).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mx.config import DMARCEnforcement, MailAuthConfig
from mx.mailauth import arc as arcmod
from mx.mailauth import dkim as dkimmod
from mx.mailauth import dmarc as dmarcmod
from mx.mailauth import results, spf as spfmod
from mx.mailauth.lookup import Deadline, Lookup

__all__ = ["Action", "Verdict", "check_message", "header_block"]



class Action(Enum):
    ACCEPT = "accept"
    JUNK = "junk"  # deliver into the recipients' .Junk folder
    REJECT = "reject"  # 550 5.7.1 after the final dot


@dataclass
class Verdict:
    action: Action
    header: bytes  # the Authentication-Results header to put below our trace headers
    reason: str = ""  # for the 550 text and the log
    message: bytes | None = None  # the message without forged Authentication-Results, if any
    spf: Any = None
    helo_spf: Any = None
    dkim: list[Any] = field(default_factory=list)
    arc: Any = None
    dmarc: Any = None
    errors: list[str] = field(default_factory=list)  # checks that raised: logged by the caller


def header_block(message: bytes) -> bytes:
    """The message's header, up to and with its empty line (all of it if there is none)."""
    if message.startswith((b"\r\n", b"\n")):
        return message[: 2 if message.startswith(b"\r\n") else 1]
    ends = [i for i in (message.find(b"\n\r\n"), message.find(b"\n\n")) if i >= 0]
    if not ends:
        return message
    i = min(ends)
    return message[: i + (3 if message[i + 1 : i + 2] == b"\r" else 2)]


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else ""


def _is_domain(name: str) -> bool:
    return bool(name) and "." in name and not name.startswith("[") and not name.replace(".", "").isdigit()


class _TempResult:
    """Stands for a check that could not run (it raised): reported as temperror."""

    def __init__(self, method: str, domain: str = "") -> None:
        self.result = "temperror"
        self.domain = domain
        self.reason = f"{method} check failed"
        self.explanation = None
        self.mechanism = None


def check_message(message: bytes, *, ip: str, helo: str, mail_from: str, cfg: MailAuthConfig,
                  authserv_id: str, lookup: Lookup, deadline: Deadline | None = None) -> Verdict:
    """Every enabled check of one inbound message, and the action policy gives."""
    deadline = deadline if deadline is not None else Deadline(cfg.deadline)
    errors: list[str] = []

    def guarded(method: str, fallback: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except Exception as e:  # our bug or a library's: never a reason to refuse mail
            errors.append(f"{method}: {type(e).__name__}: {e}")
            return fallback

    spf_domain = _domain_of(mail_from) or (helo if _is_domain(helo) else "")
    sender = mail_from or f"postmaster@{helo}"
    spf = helo_spf = None
    if cfg.spf:
        if spf_domain:
            spf = guarded("spf", _TempResult("spf", spf_domain), spfmod.check_host, ip, spf_domain, sender,
                          helo=helo, lookup=lookup, deadline=deadline, receiver=authserv_id)
        if _is_domain(helo):
            helo_spf = guarded("spf", _TempResult("spf", helo), spfmod.check_host, ip, helo, f"postmaster@{helo}",
                               helo=helo, lookup=lookup, deadline=deadline, receiver=authserv_id)
    dkim_failed = [dkimmod.DKIMResult("temperror", "", "", "", None, "", "dkim check failed")]
    dkim = guarded("dkim", dkim_failed, dkimmod.verify_all, message, lookup, deadline) if cfg.dkim else None
    arc = guarded("arc", None, arcmod.verify_chain, message, lookup, deadline) if cfg.arc else None
    dmarc = None
    if cfg.dmarc:
        domains = guarded("dmarc", [], dmarcmod.from_domains, header_block(message))
        dmarc = guarded("dmarc", None, dmarcmod.evaluate, domains, spf.result if spf is not None else "none",
                        spf_domain, dkim or [], lookup, deadline)
    verdict = Verdict(Action.ACCEPT, b"", spf=spf, helo_spf=helo_spf, dkim=dkim or [], arc=arc, dmarc=dmarc,
                      errors=errors)
    verdict.message = results.strip_forged(message, authserv_id)
    _decide(verdict, cfg)
    # Written after the decision: its dis= says what we did, not what the record asked.
    verdict.header = results.authentication_results(
        authserv_id, spf=spf, helo_spf=helo_spf, dkim=dkim, dmarc=verdict.dmarc, arc=arc,
        smtp_mailfrom=mail_from, helo=helo,
    )
    return verdict


def _decide(v: Verdict, cfg: MailAuthConfig) -> None:
    dkim_pass = any(getattr(r, "result", "") == "pass" for r in v.dkim)
    if cfg.reject_spf_fail and v.spf is not None and v.spf.result == "fail" and not dkim_pass:
        v.action, v.reason = Action.REJECT, f"SPF fail for {v.spf.domain}"
        return
    d = v.dmarc
    if d is None or d.result != "fail" or d.disposition == dmarcmod.Policy.NONE:
        return
    if cfg.dmarc_policy is DMARCEnforcement.REPORT:
        v.dmarc = dataclasses.replace(d, disposition=dmarcmod.Policy.NONE)  # dis= says what we do
        return
    a = v.arc
    if a is not None and a.result == "pass" and a.sealers and a.sealers[-1] in cfg.trusted_arc_sealers:
        v.dmarc = dataclasses.replace(d, disposition=dmarcmod.Policy.NONE)
        v.reason = f"DMARC fail for {d.header_from} overridden by the ARC chain of {a.sealers[-1]}"
        return
    if d.disposition == "reject":
        v.action, v.reason = Action.REJECT, f"DMARC policy of {d.header_from} rejects unauthenticated mail"
    elif d.disposition == "quarantine":
        v.action, v.reason = Action.JUNK, f"DMARC policy of {d.header_from} quarantines unauthenticated mail"
