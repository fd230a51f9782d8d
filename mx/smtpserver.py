"""ESMTP server protocol for the `smtp`, `submission` and `submissions` ports.

A thin Twisted protocol over the sans-IO `mx.smtp.ServerSession`: it feeds bytes in, takes
one event at a time, asks `routing` at RCPT and hands DATA to `delivery`.

Invariants:
- One command at a time: while a command is pending (a commit to disk), no further event is
  taken from the buffer and the transport is paused, so pipelined input waits its turn.
- Every reply goes through `_reply`; handlers raise or return `Reply` (errors in one place).
- `250` after DATA is sent only after `Delivery.commit` says the copies are durable.
- The idle timer is reset once per read, not per line.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Callable
from enum import Enum
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mx.address import Address, AddressError, parse_path
from mx.auth import LOGIN_PASS, LOGIN_USER, Authenticator, SASLError, decode_b64, decode_plain
from mx.config import Config
from mx.delivery import Delivery, Envelope, IncomingMessage, new_message_id
from mx.routing import Destination, RemoteRecipient, Router
from mx.tls import ServerTLS
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

__all__ = ["SMTPServerFactory", "SMTPServerProtocol"]

log = Logger()

PAUSE_BUFFER = 64 * 1024  # stop reading while a command is pending and this much waits
MAX_ERRORS = 20  # Postfix's smtpd_hard_error_limit: then the client is cut off
MAX_AUTH_FAILURES = 10  # per connection; then it is closed


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


class SMTPServerFactory(ServerFactory):
    """Builds one protocol per connection and keeps per-IP counts and the live set."""

    noisy = False

    def __init__(
        self,
        *,
        config: Config,
        router: Router,
        delivery: Delivery,
        clock: IReactorTime,
        kind: str = "smtp",
        tls: ServerTLS | None = None,
        implicit_tls: bool = False,
        authenticator: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.delivery = delivery
        self.clock = clock
        self.kind = kind
        self.tls = tls
        self.implicit_tls = implicit_tls
        # Submission ports (RFC 6409): AUTH, then relay anywhere; port 25 never offers AUTH.
        self.submission = kind in ("submission", "submissions")
        self.authenticator = authenticator if self.submission else None
        self.per_ip: Counter[str] = Counter()
        self.connections: set[SMTPServerProtocol] = set()
        self.shutting_down = False
        self._drained: Deferred[None] | None = None

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:
        p = SMTPServerProtocol()
        p.factory = self
        return p

    def client_key(self, ip: str) -> str:
        """Per-client accounting key: the address, or its /64 for IPv6 (one host's range)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ip
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(addr)

    def _gone(self, proto: SMTPServerProtocol) -> None:
        self.connections.discard(proto)
        if self.shutting_down and not self.connections and self._drained is not None:
            d, self._drained = self._drained, None
            d.callback(None)

    def shutdown(self, grace: float = 10.0) -> Deferred[None]:
        """Stop: idle connections get 421 now, busy ones after their commit; then wait."""
        self.shutting_down = True
        for proto in list(self.connections):
            proto.close_when_idle()
        if not self.connections:
            return defer.succeed(None)
        self._drained = Deferred()
        timer = self.clock.callLater(grace, self._abort_all)
        self._drained.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return self._drained

    def _abort_all(self) -> None:
        for proto in list(self.connections):
            proto.transport.abortConnection()


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
        self.auth_failures = 0
        self._sasl: Callable[[str], Reply | Deferred[Reply]] | None = None
        self.smtputf8 = False
        self.eight_bit = False
        self._busy = False
        self._open = False
        self._counted = False
        self._closing = False
        self._paused = False

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        f = self.factory
        self.callLater = f.clock.callLater  # TimeoutMixin uses it: tests pass a Clock
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "") or ""
        self.client = f.client_key(self.peer_ip)
        self.tls_active = f.implicit_tls
        if f.shutting_down:
            self._refuse(Reply(421, "4.3.2", f"{f.config.hostname} shutting down"), "shutting down")
            return
        if f.per_ip[self.client] >= f.config.limits.max_connections_per_ip:
            self._refuse(
                Reply(421, "4.7.0", f"{f.config.hostname} too many connections from your address"),
                "too many connections",
            )
            return
        f.per_ip[self.client] += 1
        self._counted = True
        self._open = True
        f.connections.add(self)
        self.setTimeout(f.config.limits.idle_timeout)
        if hasattr(self.transport, "setTcpNoDelay"):
            # Replies are small and each one is awaited: do not let Nagle hold them back.
            self.transport.setTcpNoDelay(True)
        log.info("connection from {peer} on {service}", peer=self.peer_ip, service=f.kind)
        self._reply(Reply(220, None, f"{f.config.hostname} ESMTP mx"))

    def _refuse(self, reply: Reply, why: str) -> None:
        log.info("refused connection from {peer} on {service}: {why}", peer=self.peer_ip, service=self.factory.kind, why=why)
        self.transport.write(reply.to_bytes())
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._open = False
        self.setTimeout(None)
        if self.message is not None and not self._busy:
            self.message.discard()
            self.message = None
        if self._counted:
            f = self.factory
            f.per_ip[self.client] -= 1
            if f.per_ip[self.client] <= 0:
                del f.per_ip[self.client]
            self._counted = False
            f._gone(self)

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
                    self.message.write(event.data)
            elif isinstance(event, Command):
                self._run(self._dispatch, event)
            elif isinstance(event, DataEnd):
                self._run(self._end_data, event)
            elif isinstance(event, RawLine):
                self._run(self._sasl_step, event.text)
            elif isinstance(event, BadLine):
                self._sasl = None
                self._error(event.reply)
        if self._busy and not self._paused and self._open and self.session.buffered > PAUSE_BUFFER:
            # Pausing costs two epoll syscalls; only worth it when a client pipelines a lot.
            self._paused = True
            self.transport.pauseProducing()

    def _run(self, handler: Callable[[Any], Reply | Deferred[Reply] | None], arg: Any) -> None:
        try:
            result = handler(arg)
        except Reply as r:
            self._error(r) if r.code >= 500 else self._reply(r)
            return
        if isinstance(result, Deferred):
            self._busy = True
            result.addErrback(self._handler_failed)
            result.addCallback(self._resume)
        elif result is not None:
            self._reply(result)

    def _handler_failed(self, failure: Failure) -> Reply:
        if failure.check(Reply):
            return failure.value
        log.failure("internal error for {peer}", failure, peer=self.peer_ip)
        return Reply(451, "4.3.0", "Internal error, try again later")

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
            lines.append("AUTH PLAIN LOGIN")
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
        self.session.start_data(self.factory.config.limits.max_message_size)
        self.message = self.factory.delivery.new_message()
        return Reply(354, None, "End data with <CR><LF>.<CR><LF>")

    def _end_data(self, end: DataEnd) -> Reply | Deferred[Reply]:
        if end.error is not None:
            log.info(
                "refused message from {sender} ({peer}): {code} {text}",
                sender=str(self.sender or ""), peer=self.peer_ip, code=end.error.code, text=end.error.text,
            )
            self._reset_transaction()
            raise end.error
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
        d = self.factory.delivery.commit(env, message)
        return d.addCallbacks(self._accepted, self._not_accepted, callbackArgs=(env, end.size), errbackArgs=(env,))

    def _accepted(self, _files: object, env: Envelope, size: int) -> Reply:
        # Delivery.commit logged the message and told the relay of any queue entry.
        return Reply(250, "2.0.0", f"OK id={env.msgid}")

    def _not_accepted(self, failure: Failure, env: Envelope) -> Reply:
        log.failure("could not store {msgid} from {peer}", failure, msgid=env.msgid, peer=self.peer_ip)
        return Reply(451, "4.3.0", "Could not store the message, try again later")

    def _protocol_name(self) -> str:
        # RFC 3848: ESMTP, ESMTPS (TLS), ESMTPA (AUTH), ESMTPSA (both)
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls_active else "") + ("A" if self.user else "")

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
        self.user, self._sasl = None, None  # an AUTH from before TLS does not count either
        return None

    # -- AUTH (RFC 4954) ---------------------------------------------------------------

    def _plaintext_ok(self) -> bool:
        try:
            ip = ipaddress.ip_address(self.peer_ip)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.factory.config.auth.plaintext_without_tls)

    def _auth_offered(self) -> bool:
        return self.factory.authenticator is not None and (self.tls_active or self._plaintext_ok())

    def smtp_AUTH(self, arg: str) -> Reply | Deferred[Reply]:
        auth = self.factory.authenticator
        if auth is None:
            raise Reply(503, "5.5.1", "AUTH not available on this port")
        if self.user is not None:
            raise Reply(503, "5.5.1", "Already authenticated")
        if not self._auth_offered():
            raise Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if auth.failures.blocked(self.client):
            log.info("refused AUTH from {peer}: too many failures", peer=self.peer_ip)
            self._reply(Reply(421, "4.7.0", "Too many authentication failures, try later"))
            self._close()
            return None  # type: ignore[return-value]
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if initial:
                return self._auth_plain(initial)
            return self._challenge("", self._auth_plain)
        if mechanism == "LOGIN":
            if initial:
                return self._login_user(initial)
            return self._challenge(LOGIN_USER, self._login_user)
        raise Reply(504, "5.5.4", "Unrecognized authentication type")

    def _challenge(self, text: str, step: Callable[[str], Reply | Deferred[Reply]]) -> Reply:
        self._sasl = step
        self.session.expect_raw_line()
        return Reply(334, None, text)

    def _sasl_step(self, line: str) -> Reply | Deferred[Reply]:
        step, self._sasl = self._sasl, None
        if step is None:
            raise Reply(500, "5.5.2", "Unexpected line")
        if line == "*":
            raise Reply(501, "5.0.0", "Authentication canceled")  # RFC 4954 §4
        return step(line)

    def _auth_plain(self, response: str) -> Deferred[Reply]:
        try:
            username, password = decode_plain(decode_b64(response))
        except SASLError as e:
            raise Reply(501, "5.5.2", f"Bad AUTH PLAIN response: {e}") from None
        return self._verify(username, password)

    def _login_user(self, response: str) -> Reply:
        try:
            username = decode_b64(response).decode("utf-8")
        except (SASLError, UnicodeDecodeError):
            raise Reply(501, "5.5.2", "Bad AUTH LOGIN user name") from None
        return self._challenge(LOGIN_PASS, lambda r: self._login_password(username, r))

    def _login_password(self, username: str, response: str) -> Deferred[Reply]:
        try:
            password = decode_b64(response).decode("utf-8")
        except (SASLError, UnicodeDecodeError):
            raise Reply(501, "5.5.2", "Bad AUTH LOGIN password") from None
        return self._verify(username, password)

    def _verify(self, username: str, password: str) -> Deferred[Reply]:
        auth = self.factory.authenticator
        assert auth is not None
        d = auth.check(username, password)
        return d.addCallback(self._verified, username)

    def _verified(self, user: str | None, username: str) -> Reply | Deferred[Reply]:
        auth = self.factory.authenticator
        assert auth is not None
        if user is not None:
            self.user = user
            log.info("authenticated {user} from {peer} on {service}", user=user, peer=self.peer_ip, service=self.factory.kind)
            return Reply(235, "2.7.0", "Authentication successful")
        self.auth_failures += 1
        auth.failures.failed(self.client)
        log.info(
            "authentication failed for {username} from {peer} ({count} on this connection)",
            username=username[:100], peer=self.peer_ip, count=self.auth_failures,
        )
        if self.auth_failures >= MAX_AUTH_FAILURES:
            self._reply(Reply(535, "5.7.8", "Authentication credentials invalid"))
            self._reply(Reply(421, "4.7.0", "Too many authentication failures"))
            self._close()
            return None  # type: ignore[return-value]
        # Slow down guessing: each further failure waits longer before it is answered.
        delay = auth.failures.delay(self.client, self.auth_failures)
        reply = Reply(535, "5.7.8", "Authentication credentials invalid")
        if delay <= 0:
            return reply
        return deferLater(self.factory.clock, delay, lambda: reply)

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
