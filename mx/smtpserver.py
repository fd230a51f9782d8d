"""ESMTP server protocol for the `smtp`, `submission` and `submissions` ports.

A thin Twisted protocol over the sans-IO `mx.smtp.ServerSession`: it feeds bytes in, takes
one event at a time, asks `routing` at RCPT and hands DATA to `delivery`.

Invariants:
- One command at a time: while a command is pending (a commit to disk, a password check, a
  spill file catching up), no further event is taken from the buffer and the transport is
  paused once `PAUSE_BUFFER` bytes wait, so pipelined input (and a fast DATA) waits its turn.
- Every reply goes through `_reply`; handlers raise or return `Reply` (errors in one place).
  Anything else a handler raises, at once or from its Deferred, is logged with its
  traceback and answered `451 4.3.0`; the transaction is reset (a spill file is removed)
  and the connection goes on.
- `250` after DATA is sent only after `Delivery.commit` says the copies are durable; commit
  is called only after the message's spill file is `flushed()`, and the 250 waits for the
  spill file to be removed.
- Connections are admitted and released through the shared `ConnectionRegistry`
  (per-address and global limits over all services; `421 4.7.0` beyond them).
- SASL is `mx.auth`'s (exchange, plaintext policy, brakes); here only its SMTP framing.
- The idle timer is reset once per read, not per line.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from enum import Enum, StrEnum
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mx.address import Address, AddressError, parse_path
from mx.auth import (
    MAX_AUTH_FAILURES,
    MECHANISMS,
    Authenticator,
    Challenge,
    ConnectionBrake,
    Credentials,
    Rejected,
    SASLExchange,
    SASLProblem,
    plaintext_allowed,
)
from mx.config import Config
from mx.delivery import Delivery, Envelope, IncomingMessage, new_message_id
from mx.listeners import ConnectionRegistry, ListenerFactory, Refusal, Service, client_key
from mx.mailauth.check import Action, Verdict
from mx.routing import Destination, RemoteRecipient, Router
from mx.tls import ServerTLS

if TYPE_CHECKING:
    from mx.mailauth.gate import MailAuth
from mx.smtp import (
    NEED_DATA,
    BadLine,
    RawLine,
    Command,
    DataChunk,
    DataEnd,
    Reply,
    ServerSession,
    parse_mail_args,
    parse_rcpt_args,
)

__all__ = ["MAX_AUTH_FAILURES", "SMTPServerFactory", "SMTPServerProtocol", "WithProtocol"]

log = Logger()

PAUSE_BUFFER = 64 * 1024  # stop reading while a command is pending and this much waits
MAX_ERRORS = 20  # Postfix's smtpd_hard_error_limit: then the client is cut off
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error, try again later")


class WithProtocol(StrEnum):
    """The `with` clause of our Received: header (RFC 3848)."""

    SMTP = "SMTP"
    ESMTP = "ESMTP"
    ESMTPS = "ESMTPS"  # TLS
    ESMTPA = "ESMTPA"  # AUTH
    ESMTPSA = "ESMTPSA"  # both


class State(Enum):
    GREETED = "greeted"  # connected, no HELO/EHLO yet
    READY = "ready"  # HELO/EHLO done, no transaction
    MAIL = "mail"  # MAIL accepted, collecting RCPTs
    RCPT = "rcpt"  # at least one RCPT accepted


ANY = frozenset(State)
# RFC 5321 §4.1.4: which command may come in which state; everything else gets 503.
ALLOWED: dict[str, frozenset[State]] = {
    "HELO": ANY,
    "EHLO": ANY,
    "MAIL": frozenset({State.READY}),
    "RCPT": frozenset({State.MAIL, State.RCPT}),
    "DATA": frozenset({State.RCPT}),
    "RSET": ANY,
    "NOOP": ANY,
    "VRFY": ANY,
    "EXPN": ANY,
    "HELP": ANY,
    "QUIT": ANY,
    "STARTTLS": frozenset({State.GREETED, State.READY}),
    "AUTH": frozenset({State.READY}),  # RFC 4954 §4: not during a mail transaction
}
OUT_OF_SEQUENCE = {
    "MAIL": "Send HELO/EHLO first" ,
    "RCPT": "Need MAIL before RCPT",
    "DATA": "Need RCPT before DATA",
}


class SMTPServerFactory(ListenerFactory):
    """Builds one protocol per connection; counts them in the shared `ConnectionRegistry`."""

    def __init__(
        self,
        *,
        config: Config,
        router: Router,
        delivery: Delivery,
        clock: IReactorTime,
        kind: Service | str = Service.SMTP,
        tls: ServerTLS | None = None,
        implicit_tls: bool = False,
        authenticator: Authenticator | None = None,
        registry: ConnectionRegistry | None = None,
        mailauth: MailAuth | None = None,
    ) -> None:
        self.config = config
        self.mailauth = mailauth  # SPF/DKIM/DMARC/ARC on smtp, DKIM signing on submission
        self.router = router
        self.delivery = delivery
        self.clock = clock
        self._join(kind, (Service.SMTP, Service.SUBMISSION, Service.SUBMISSIONS), "an SMTP service", config.limits,
                   clock, registry)
        self.tls = tls
        self.implicit_tls = implicit_tls
        # Submission ports (RFC 6409): AUTH, then relay anywhere; port 25 never offers AUTH.
        self.submission = self.service.submission
        self.authenticator = authenticator if self.submission else None

    @property
    def per_ip(self) -> Counter[str]:
        """Live connections per client key, over every service of the registry."""
        return self.registry.per_ip

    @property
    def shutting_down(self) -> bool:
        return self.registry.draining(self.service)

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        p = SMTPServerProtocol()
        p.factory = self
        return p

    def client_key(self, ip: str) -> str:
        return client_key(ip)


class SMTPServerProtocol(Protocol, TimeoutMixin):
    factory: SMTPServerFactory

    def __init__(self) -> None:
        self.session = ServerSession()
        self.state = State.GREETED
        self.helo = ""
        self.esmtp = False
        self.sender: Address | None = None
        self.recipients: list[tuple[Address, tuple[Destination, ...]]] = []
        self.message: IncomingMessage | None = None
        self.mail_size: int | None = None
        self.peer_ip = ""
        self.errors = 0
        self.tls_active = False
        self.user: str | None = None  # the authenticated user (canonical address)
        self.sasl = SASLExchange()
        self.brake: ConnectionBrake | None = None
        self.client = ""
        self.smtputf8 = False
        self.eight_bit = False
        self._busy = False
        self._open = False
        self._counted = False
        self._closing = False
        self._paused = False
        self._data_error: Reply | None = None  # answered at the final dot

    @property
    def service(self) -> Service:
        return self.factory.service

    @property
    def auth_failures(self) -> int:
        return self.brake.failures if self.brake is not None else 0

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self.callLater = f.clock.callLater  # TimeoutMixin uses it: tests pass a Clock
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "") or ""
        self.client = client_key(self.peer_ip)
        self.tls_active = f.implicit_tls
        refusal = f.registry.admit(self)
        if refusal is not None:
            code = "4.3.2" if refusal is Refusal.SHUTTING_DOWN else "4.7.0"
            self._refuse(Reply(421, code, f"{f.config.hostname} {refusal.value}"), refusal)
            return
        self._counted = True
        self._open = True
        if f.authenticator is not None:
            self.brake = f.authenticator.brake(self.client)
        self.setTimeout(f.config.limits.idle_timeout)
        if hasattr(self.transport, "setTcpNoDelay"):
            # Replies are small and each one is awaited: do not let Nagle hold them back.
            self.transport.setTcpNoDelay(True)
        log.info("connection from {peer} on {service}", peer=self.peer_ip, service=str(f.service))
        self._reply(Reply(220, None, f"{f.config.hostname} ESMTP mx"))

    def _refuse(self, reply: Reply, why: Refusal) -> None:
        log.info(
            "refused connection from {peer} on {service}: {why}",
            peer=self.peer_ip, service=str(self.service), why=why.value, code=reply.code,
            connections=self.factory.registry.total,
        )
        self.transport.write(reply.to_bytes())
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._open = False
        self.setTimeout(None)
        self.sasl.cancel()
        if self.message is not None:
            # A message being committed has left self.message already (_end_data).
            self.message.discard()
            self.message = None
        if self._counted:
            self._counted = False
            self.factory.registry.release(self)

    def timeoutConnection(self) -> None:
        log.info("idle timeout for {peer}", peer=self.peer_ip)
        self._reply(Reply(421, "4.4.2", f"{self.factory.config.hostname} idle timeout, closing"))
        self._close()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._busy:
            self._reply(Reply(421, "4.3.2", f"{self.factory.config.hostname} shutting down"))
            self._close()

    def _close(self) -> None:
        self._open = False
        self.transport.loseConnection()

    def abort(self) -> None:
        self._open = False
        self.transport.abortConnection()

    # -- input -----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.session.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        while self._open and not self._busy:
            event = self.session.next_event()
            if event is NEED_DATA:
                break
            if isinstance(event, DataChunk):
                if self.message is not None:
                    self._write_data(event.data)
            elif isinstance(event, Command):
                self._run(self._dispatch, event)
            elif isinstance(event, DataEnd):
                self._run(self._end_data, event)
            elif isinstance(event, RawLine):
                self._run(self._sasl_step, event.text)
            elif isinstance(event, BadLine):
                self.sasl.cancel()
                self._error(event.reply)
        if self._busy and not self._paused and self._open and self.session.buffered > PAUSE_BUFFER:
            # Pausing costs two epoll syscalls; only worth it when a client pipelines a lot.
            self._paused = True
            self.transport.pauseProducing()

    def _run(self, handler: Callable[[Any], Reply | Deferred[Reply | None] | None], arg: Any) -> None:
        try:
            result = handler(arg)
        except Reply as r:
            self._error(r) if r.code >= 500 else self._reply(r)
            return
        except Exception:
            reply = self._internal_error(Failure())
            if reply is not None:
                self._reply(reply)
            return
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._handler_failed)
            result.addCallback(self._resume)
            result.addErrback(lambda f: log.failure("internal error after a reply to {peer}", f, peer=self.peer_ip))
        elif result is not None:
            self._reply(result)

    def _handler_failed(self, failure: Failure) -> Reply | None:
        if failure.check(Reply):
            return failure.value
        return self._internal_error(failure)

    def _internal_error(self, failure: Failure) -> Reply | None:
        """A bug, not a client error: log it, forget the transaction, keep the connection."""
        log.failure(
            "internal error for {peer} on {service}", failure,
            peer=self.peer_ip, service=str(self.factory.service), code=451,
        )
        self.sasl.cancel()
        if self.session.in_data:
            # The 354 went out; answer at the final dot, never in the middle of the stream.
            self._data_error = INTERNAL_ERROR
            if self.message is not None:
                self.message.discard()
                self.message = None
            return None
        self._reset_transaction()
        return INTERNAL_ERROR

    def _write_data(self, data: bytes) -> None:
        assert self.message is not None
        try:
            wait = self.message.write(data)
        except Exception:
            self._internal_error(Failure())
            return
        if wait is not None:
            # The spill file is behind: take no more input until the disk catches up.
            self._run(lambda _: wait, None)

    def _resume(self, reply: Reply | None) -> None:
        self._busy = False
        if reply is not None:
            self._reply(reply)
        if self._closing and self._open:
            self._reply(Reply(421, "4.3.2", f"{self.factory.config.hostname} shutting down"))
            self._close()
            return
        if self._paused and self._open:
            self._paused = False
            self.transport.resumeProducing()
        self._pump()

    def _reply(self, reply: Reply) -> None:
        if self.transport is not None:
            self.transport.write(reply.to_bytes())

    def _error(self, reply: Reply) -> None:
        self._reply(reply)
        self.errors += 1
        if self.errors >= MAX_ERRORS and self._open:
            log.info("too many errors from {peer}, closing", peer=self.peer_ip)
            self._reply(Reply(421, "4.7.0", "Too many errors, closing connection"))
            self._close()

    # -- commands --------------------------------------------------------------------

    def _dispatch(self, cmd: Command) -> Reply | Deferred[Reply] | None:
        allowed = ALLOWED.get(cmd.verb)
        handler = getattr(self, f"smtp_{cmd.verb}", None) if allowed is not None else None
        if handler is None:
            if cmd.verb in ("BDAT", "ETRN", "TURN"):
                raise Reply(502, "5.5.1", f"{cmd.verb} not available")
            raise Reply(500, "5.5.2", "Syntax error, command unrecognized")
        if self.state not in allowed:
            if cmd.verb == "MAIL" and self.state != State.GREETED:
                raise Reply(503, "5.5.1", "Nested MAIL command")
            raise Reply(503, "5.5.1", OUT_OF_SEQUENCE.get(cmd.verb, "Bad sequence of commands"))
        return handler(cmd.arg)

    def _reset_transaction(self) -> None:
        self.sender = None
        self.recipients = []
        self.mail_size = None
        self._data_error = None
        if self.message is not None:
            self.message.discard()
            self.message = None
        if self.state in (State.MAIL, State.RCPT):
            self.state = State.READY

    def _greet(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name or " " in name:
            raise Reply(501, "5.5.4", "Syntax: EHLO hostname")
        self._reset_transaction()
        self.helo = name
        self.esmtp = esmtp
        self.state = State.READY

    def smtp_HELO(self, arg: str) -> Reply:
        self._greet(arg, esmtp=False)
        return Reply(250, None, f"{self.factory.config.hostname}")

    def smtp_EHLO(self, arg: str) -> Reply:
        self._greet(arg, esmtp=True)
        config = self.factory.config
        lines = [
            f"{config.hostname} greets {self.helo}",
            "PIPELINING",
            f"SIZE {config.limits.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
            "HELP",
        ]
        if self.factory.tls is not None and not self.tls_active:
            lines.append("STARTTLS")
        if self._auth_offered():
            lines.append("AUTH " + " ".join(MECHANISMS))
        # Reply.to_bytes would put the enhanced code on every line; EHLO lines carry none.
        return Reply(250, None, "\n".join(lines))

    def smtp_MAIL(self, arg: str) -> Reply:
        if self.factory.submission and self.user is None:
            raise Reply(530, "5.7.0", "Authentication required")  # RFC 4954 §6
        args = parse_mail_args(arg)
        limit = self.factory.config.limits.max_message_size
        if args.size is not None and args.size > limit:
            # RFC 1870 §6
            raise Reply(552, "5.3.4", f"Message size exceeds the limit of {limit} bytes")
        try:
            sender = parse_path(args.path)
        except AddressError as e:
            raise Reply(501, "5.1.7", f"Bad sender address: {e}") from None
        if sender is not None and not args.smtputf8 and not str(sender).isascii():
            raise Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")  # RFC 6531 §3.4
        if self.user is not None and sender is not None and not self.factory.router.may_send_as(self.user, sender):
            raise Reply(553, "5.7.1", f"<{sender}> is not an address of {self.user}")
        self.sender = sender
        self.mail_size = args.size
        self.smtputf8 = args.smtputf8
        self.eight_bit = args.body == "8BITMIME"
        self.state = State.MAIL
        return Reply(250, "2.1.0", "Sender OK")

    def smtp_RCPT(self, arg: str) -> Reply:
        config = self.factory.config
        if len(self.recipients) >= config.limits.max_recipients:
            raise Reply(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10
        path = parse_rcpt_args(arg)
        if path.lower() == "<postmaster>":
            path = f"<{config.postmaster}>"  # RFC 5321 §4.5.1: must be accepted
        try:
            rcpt = parse_path(path)
        except AddressError as e:
            raise Reply(501, "5.1.3", f"Bad recipient address: {e}") from None
        if rcpt is None:
            raise Reply(501, "5.1.3", "Null recipient not allowed")
        if not self.smtputf8 and not str(rcpt).isascii():
            raise Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        destinations = self.factory.router.resolve(rcpt, may_relay=self.user is not None)
        if any(isinstance(d, RemoteRecipient) for d in destinations) and not self.factory.delivery.accepts_remote():
            raise Reply(451, "4.3.0", f"Relaying to <{rcpt}> is not available yet, try later")
        self.recipients.append((rcpt, destinations))
        self.state = State.RCPT
        return Reply(250, "2.1.5", "Recipient OK")

    def smtp_DATA(self, arg: str) -> Reply:
        if arg:
            raise Reply(501, "5.5.4", "DATA takes no arguments")
        self.message = self.factory.delivery.new_message(stream=True)
        self.session.start_data(self.factory.config.limits.max_message_size)
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _end_data(self, end: DataEnd) -> Reply | Deferred[Reply]:
        error = end.error or self._data_error
        if error is not None:
            log.info(
                "refused message from {sender} ({peer}): {code} {text}",
                sender=str(self.sender or ""), peer=self.peer_ip, code=error.code, text=error.text,
            )
            self._reset_transaction()
            raise error
        assert self.message is not None
        env = Envelope(
            msgid=new_message_id(),
            sender=self.sender,
            recipients=tuple(self.recipients),
            helo=self.helo,
            peer_ip=self.peer_ip,
            protocol=self._protocol_name(),
            auth_user=self.user,
            eight_bit=self.eight_bit,
            smtputf8=self.smtputf8,
        )
        message, self.message = self.message, None
        self._reset_transaction()
        # The spill file (if any) is complete and closed before commit reads it; a commit
        # that raises, at once or later, becomes the errback below (a 451, file removed).
        d: Deferred[Any] = message.flushed()
        auth = self.factory.mailauth
        if auth is not None and self.factory.service is Service.SMTP and auth.checks(env.peer_ip):
            d.addCallback(lambda _: auth.check(env, message))
            d.addCallback(self._judged, env)
        elif auth is not None and self.user is not None and auth.cfg.sign:
            d.addCallback(lambda _: auth.sign(env, message))
            d.addCallback(lambda headers: dataclasses.replace(env, added_headers=headers))
        else:
            d.addCallback(lambda _: env)
        d.addCallback(self._commit, message)
        return d.addCallbacks(self._accepted, self._not_accepted, callbackArgs=(env, message), errbackArgs=(env, message))

    def _judged(self, verdict: Verdict, env: Envelope) -> Envelope | Reply:
        """Act on mail authentication: a 550 after the final dot, or the header (and Junk)."""
        if verdict.action is Action.REJECT:
            log.info("refused message from {sender} ({peer}): {code} {text}", sender=str(env.sender or ""),
                     peer=env.peer_ip, code=550, text=verdict.reason, msgid=env.msgid)
            return Reply(550, "5.7.1", f"Message refused: {verdict.reason}")
        return dataclasses.replace(env, added_headers=verdict.header, junk=verdict.action is Action.JUNK,
                                   body=verdict.message)

    def _commit(self, judged: Envelope | Reply, message: IncomingMessage) -> Any:
        if isinstance(judged, Reply):
            return judged
        return self.factory.delivery.commit(judged, message)

    def _accepted(self, outcome: object, env: Envelope, message: IncomingMessage) -> Deferred[Reply]:
        # Delivery.commit logged the message and told the relay of any queue entry; it also
        # discarded the message: the 250 waits until the spill file is gone.
        reply = outcome if isinstance(outcome, Reply) else Reply(250, "2.0.0", f"OK id={env.msgid}")
        return message.discard().addBoth(lambda _: reply)

    def _not_accepted(self, failure: Failure, env: Envelope, message: IncomingMessage) -> Deferred[Reply]:
        log.failure("could not store {msgid} from {peer}", failure, msgid=env.msgid, peer=self.peer_ip, code=451)
        reply = Reply(451, "4.3.0", "Could not store the message, try again later")
        return message.discard().addBoth(lambda _: reply)

    def _protocol_name(self) -> WithProtocol:
        # RFC 3848: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both)
        if not self.esmtp:
            return WithProtocol.SMTP
        return WithProtocol("ESMTP" + ("S" if self.tls_active else "") + ("A" if self.user else ""))

    # -- STARTTLS (RFC 3207) -----------------------------------------------------------

    def smtp_STARTTLS(self, arg: str) -> None:
        tls = self.factory.tls
        if tls is None:
            raise Reply(502, "5.5.1", "STARTTLS not available")
        if arg:
            raise Reply(501, "5.5.4", "STARTTLS takes no arguments")
        if self.tls_active:
            raise Reply(503, "5.5.1", "TLS already active")
        self._reply(Reply(220, "2.0.0", "Ready to start TLS"))
        # RFC 3207 §4.2: nothing the client sent before the handshake counts, including
        # commands pipelined behind STARTTLS (CVE-2011-0411); and the session starts over.
        self.session.discard_buffer()
        self.transport.startTLS(tls)
        self.tls_active = True
        self._reset_transaction()
        self.helo, self.esmtp, self.state = "", False, State.GREETED
        self.user = None  # an AUTH from before TLS does not count either
        self.sasl.cancel()
        return None

    # -- AUTH (RFC 4954): the exchange and the brakes are mx.auth's ---------------------

    def _auth_offered(self) -> bool:
        return self.factory.authenticator is not None and plaintext_allowed(
            self.peer_ip, self.tls_active, self.factory.config.auth.plaintext_without_tls
        )

    def smtp_AUTH(self, arg: str) -> Reply | Deferred[Reply]:
        auth = self.factory.authenticator
        if auth is None or self.brake is None:
            raise Reply(503, "5.5.1", "AUTH not available on this port")
        if self.user is not None:
            raise Reply(503, "5.5.1", "Already authenticated")
        if not self._auth_offered():
            raise Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self.brake.blocked():
            log.info("refused AUTH from {peer}: too many failures", peer=self.peer_ip)
            self._reply(Reply(421, "4.7.0", "Too many authentication failures, try later"))
            self._close()
            return None  # type: ignore[return-value]
        mechanism, _, initial = arg.partition(" ")
        return self._sasl_outcome(self.sasl.start(mechanism, initial or None))

    def _sasl_step(self, line: str) -> Reply | Deferred[Reply]:
        return self._sasl_outcome(self.sasl.step(line))

    def _sasl_outcome(self, outcome: Challenge | Credentials | Rejected) -> Reply | Deferred[Reply]:
        if isinstance(outcome, Challenge):
            self.session.expect_raw_line()
            return Reply(334, None, outcome.text)
        if isinstance(outcome, Rejected):
            if outcome.problem is SASLProblem.UNKNOWN_MECHANISM:
                raise Reply(504, "5.5.4", outcome.text)
            if outcome.problem is SASLProblem.CANCELLED:
                raise Reply(501, "5.0.0", outcome.text)  # RFC 4954 §4
            if outcome.problem is SASLProblem.NOT_EXPECTED:
                raise Reply(500, "5.5.2", outcome.text)
            raise Reply(501, "5.5.2", outcome.text)
        auth = self.factory.authenticator
        assert auth is not None
        d = auth.check(outcome.username, outcome.password)
        return d.addCallback(self._verified, outcome.username)

    def _verified(self, user: str | None, username: str) -> Reply | Deferred[Reply]:
        assert self.brake is not None
        if user is not None:
            self.user = user
            log.info("authenticated {user} from {peer} on {service}", user=user, peer=self.peer_ip, service=str(self.service))
            return Reply(235, "2.7.0", "Authentication successful")
        verdict = self.brake.failed()
        log.info(
            "authentication failed for {username} from {peer} ({count} on this connection)",
            username=username[:100], peer=self.peer_ip, count=self.brake.failures,
        )
        reply = Reply(535, "5.7.8", "Authentication credentials invalid")
        if verdict.close:
            self._reply(reply)
            self._reply(Reply(421, "4.7.0", "Too many authentication failures"))
            self._close()
            return None  # type: ignore[return-value]
        if verdict.delay <= 0:
            return reply
        return deferLater(self.factory.clock, verdict.delay, lambda: reply)

    def smtp_RSET(self, arg: str) -> Reply:
        if arg:
            raise Reply(501, "5.5.4", "RSET takes no arguments")
        self._reset_transaction()
        return Reply(250, "2.0.0", "OK")

    def smtp_NOOP(self, arg: str) -> Reply:
        return Reply(250, "2.0.0", "OK")

    def smtp_VRFY(self, arg: str) -> Reply:
        # RFC 5321 §3.5.3: 252 avoids confirming which users exist.
        return Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_EXPN(self, arg: str) -> Reply:
        raise Reply(502, "5.5.1", "EXPN not available")

    def smtp_HELP(self, arg: str) -> Reply:
        return Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT; see RFC 5321")

    def smtp_QUIT(self, arg: str) -> Reply:
        self._reply(Reply(221, "2.0.0", f"{self.factory.config.hostname} closing connection"))
        self._close()
        return None  # type: ignore[return-value]
