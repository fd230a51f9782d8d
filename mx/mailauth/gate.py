"""Mail authentication as the SMTP server uses it: checks and signing off the reactor thread.

`MailAuth.check(env, message)` judges an inbound message (SPF, DKIM, ARC, DMARC: `check`)
and `MailAuth.sign(env, message)` DKIM-signs a submitted one; both run in the "mx-mailauth"
thread pool (blocking DNS with the configured nameservers and timeout, RSA arithmetic,
reading a spilled message) and return Deferreds. The DKIM keys are re-read every
`KEY_REFRESH` seconds and on `reload_keys()` (SIGHUP).

Invariants:
- Nothing here blocks the reactor: the message octets of a spilled message, DNS and
  signatures are all handled in the pool. One exception, for speed: a message in memory
  (at most `INLINE_MAX`) whose every lookup is cached is checked on the reactor thread
  against the cache alone (`CacheOnly`: no I/O; a miss raises `WouldBlock` and the whole
  check is redone in the pool), as SMTP parsing is: CPU only, about 0.4 ms.
- A failure inside a check is logged and becomes `temperror`; a failure of signing is
  logged and the message goes out unsigned (never a lost message).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx.auth import ip_in
from mx.config import Config
from mx.delivery import Envelope, IncomingMessage
from mx.mailauth import arc as arcmod
from mx.mailauth import dkim as dkimmod
from mx.mailauth.check import Action, Verdict, check_message, header_block
from mx.mailauth.dmarc import from_domains
from mx.mailauth.keys import KeyStore
from mx.mailauth.lookup import Lookup, WouldBlock
from mx.routing import RemoteRecipient

__all__ = ["MailAuth", "KEY_REFRESH"]

log = Logger()
INLINE_MAX = 64 * 1024  # larger messages are always checked in the pool (canonicalisation time)
KEY_REFRESH = 5.0  # seconds between looks for new DKIM keys (INTERFACE.md: SIGHUP at the latest)


def _forwarding_domain(env: Envelope) -> str | None:
    """The local domain of the first address the message reaches only through forwarding
    (given as a local address, delivered to a remote one), None when nothing is forwarded."""
    for rcpt, destinations in env.recipients:
        if any(isinstance(d, RemoteRecipient) for d in destinations):
            return rcpt.domain.lower() if rcpt.domain else None
    return None


def _octets(message: IncomingMessage) -> bytes:
    data = message.in_memory()
    if data is not None:
        return data
    assert message.path is not None
    return Path(message.path).read_bytes()


class MailAuth:
    def __init__(self, config: Config, reactor: Any, pool: ThreadPool, lookup: Lookup | None = None) -> None:
        self.config = config
        self.cfg = config.mailauth
        self.reactor = reactor
        self.pool = pool
        self.lookup = lookup if lookup is not None else Lookup(list(config.dns.nameservers), config.dns.timeout)
        self.cached = self.lookup.cache_only()
        self.keys = KeyStore(config.data_dir)

    def checks(self, peer_ip: str) -> bool:
        """Whether mail from this peer is checked (some check on, peer not skipped)."""
        c = self.cfg
        return (c.spf or c.dkim or c.dmarc or c.arc) and not ip_in(peer_ip, c.skip_networks)

    def reload_keys(self) -> Deferred[None]:
        return deferToThreadPool(self.reactor, self.pool, self.keys.reload)

    # -- inbound ------------------------------------------------------------------------

    def check(self, env: Envelope, message: IncomingMessage) -> Deferred[Verdict]:
        mail_from = str(env.sender or "")
        data = message.in_memory()
        if data is not None and len(data) <= INLINE_MAX and _forwarding_domain(env) is None:
            # Every answer cached (a sender seen before): checked here, with no I/O at all,
            # which saves the thread round trip; the first miss sends it all to the pool.
            try:
                verdict = check_message(data, ip=env.peer_ip, helo=env.helo, mail_from=mail_from, cfg=self.cfg,
                                        authserv_id=self.config.hostname, lookup=self.cached)
            except WouldBlock:
                pass
            else:
                return succeed(self._logged(verdict, env))
        d = deferToThreadPool(self.reactor, self.pool, self._check, env, message, mail_from)
        d.addCallback(self._logged, env)
        return d

    def _check(self, env: Envelope, message: IncomingMessage, mail_from: str) -> Verdict:
        data = _octets(message)
        verdict = check_message(data, ip=env.peer_ip, helo=env.helo, mail_from=mail_from, cfg=self.cfg,
                                authserv_id=self.config.hostname, lookup=self.lookup)
        forwarder = _forwarding_domain(env)
        if forwarder is not None and verdict.action is not Action.REJECT:
            verdict.header = self._sealed(verdict, data, forwarder) + verdict.header
        return verdict

    def _sealed(self, verdict: Verdict, data: bytes, domain: str) -> bytes:
        """RFC 8617: mail we forward (an alias with a remote target) gets our ARC set, so the
        next hop can trust what we verified; sealed with the alias domain's RSA key."""
        key = next((k for k in self.keys.keys_for(domain) if k.algorithm == "rsa"), None)
        if key is None:
            return b""
        value = verdict.header.split(b":", 1)[1].decode("utf-8", "replace").strip()
        try:
            return arcmod.seal(verdict.message if verdict.message is not None else data, value, domain, key,
                               self.config.hostname)
        except ValueError as e:
            verdict.errors.append(f"arc seal: {e}")
            return b""

    def _logged(self, verdict: Verdict, env: Envelope) -> Verdict:
        for error in verdict.errors:
            log.error("mail authentication of {msgid} failed inside a check: {error}", msgid=env.msgid, error=error)
        dmarc = verdict.dmarc
        log.info(
            "authenticated {msgid} from {peer}: spf={spf} dkim={dkim} dmarc={dmarc} arc={arc} -> {action}",
            msgid=env.msgid, peer=env.peer_ip,
            spf=getattr(verdict.spf, "result", "none"),
            dkim=",".join(getattr(r, "result", "?") for r in verdict.dkim) or "none",
            dmarc=getattr(dmarc, "result", "none"), arc=getattr(verdict.arc, "result", "none"),
            action=verdict.action.value, reason=verdict.reason, header_from=getattr(dmarc, "header_from", ""),
        )
        return verdict

    # -- outbound -------------------------------------------------------------------------

    def sign(self, env: Envelope, message: IncomingMessage) -> Deferred[bytes]:
        """The DKIM-Signature headers for a submitted message (b"" without keys for its From)."""
        d = deferToThreadPool(self.reactor, self.pool, self._sign, message)

        def failed(f: Failure) -> bytes:
            log.failure("could not DKIM-sign {msgid}; sent unsigned", f, msgid=env.msgid)
            return b""

        return d.addErrback(failed)

    def _sign(self, message: IncomingMessage) -> bytes:
        data = _octets(message)
        domains = from_domains(header_block(data))
        if len(domains) != 1:
            return b""
        keys = self.keys.keys_for(domains[0])
        return dkimmod.sign(data, domains[0], keys) if keys else b""
