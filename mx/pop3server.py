"""POP3 server protocol for the `pop3` (STLS) and `pop3s` (implicit TLS) ports.

A thin Twisted protocol over the sans-IO `mx.pop3` core: it feeds bytes in, takes one event
at a time, checks passwords through `mx.auth` and reads the user's INBOX through `mx.store`
in the read pool.

Invariants:
- One command at a time: while one is pending (a password check, a store call, a RETR being
  streamed) no further event is taken from the buffer, and the transport is paused once
  `PAUSE_BUFFER` bytes wait; so pipelined commands (RFC 2449 PIPELINING) wait their turn.
- Store calls run in the read pool (`deferToThreadPool`), one at a time per session; nothing
  blocking runs on the reactor thread.
- RETR and TOP read the file in the pool: the open and the first `FIRST_READ` bytes in one
  trip (a message that small is sent in one write); a larger one streams on in `READ_CHUNK`
  reads with a push producer on the transport: while the socket's buffer is full no further
  chunk is read, so a large message is never whole in memory on either side.
- Deletions happen only in the UPDATE state, after QUIT from TRANSACTION (RFC 1939 §6); an
  idle timeout, a shutdown or a dropped connection deletes nothing. A message sent whole by
  RETR gets the `S` flag (Dovecot does the same), in a pool trip that runs after the
  response is written (with the read-ahead of the next message); the next store call of the
  session waits for it.
- A maildrop is locked for the session (RFC 1939 §8): a per-factory set of mailbox paths plus
  an `flock` on `<maildir>/mx-pop3.lock`, taken in the pool and released by the kernel if the
  process dies; a second session gets `-ERR [IN-USE]`. The lock is released only after the
  session's last store call finished.
- Connections are admitted and released through the shared `ConnectionRegistry`; refused
  ones get `-ERR [SYS/TEMP]`.
- SASL is `mx.auth`'s (exchange, plaintext policy, brakes), the same as SMTP AUTH; here only
  its POP3 framing (RFC 5034). USER/PASS goes through the same checks and brakes.
- STLS discards everything the client sent after the command (RFC 2595 §4; no injection).
- The idle timer (`limits.pop3_idle_timeout`) is reset once per read and once per chunk sent.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx.auth import (
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
from mx.listeners import ConnectionRegistry, ListenerFactory, Service, WriteGate, client_key
from mx.maildir import MaildirError, ensure_maildir, mailbox_path
from mx.pop3 import (
    NEED_DATA,
    BadLine,
    Command,
    Entry,
    Maildrop,
    RawLine,
    RespCode,
    Response,
    Retrieval,
    Session,
    State,
    check_allowed,
    multiline,
)
from mx.store import Folder, Mailbox, MessageGone, StoreError
from mx.tls import ServerTLS

__all__ = ["LOCK_FILE", "MailboxLocked", "POP3ServerFactory", "POP3ServerProtocol", "READ_CHUNK", "open_maildrop"]

log = Logger()
T = TypeVar("T")

PAUSE_BUFFER = 64 * 1024  # stop reading while a command is pending and this much waits
READ_CHUNK = 64 * 1024  # bytes of a large message read per trip to the pool
FIRST_READ = 256 * 1024  # read with the open: a message this small costs one trip, one write
AHEAD_COUNT = 32  # messages read ahead per trip ...
AHEAD_OCTETS = 1 << 20  # ... and at most about this many octets of them
AHEAD_LOW = 8  # a new trip once fewer of the next messages than this are read already
MAX_ERRORS = 20  # unknown or out-of-place commands; then the client is cut off
LOCK_FILE = "mx-pop3.lock"
INTERNAL_ERROR = Response.err("Internal error, try again later", RespCode.SYS_TEMP)
PLAINTEXT_REFUSED = Response.err(
    "Plaintext authentication disallowed on non-secure (SSL/TLS) connections", RespCode.AUTH
)


class MailboxLocked(Exception):
    """Another POP3 session holds the maildrop (RFC 2449 §8.1.1: `[IN-USE]`)."""


# -- blocking work, run in the read pool ------------------------------------------------


def lock_maildrop(root: Path) -> int:
    """Take the session lock of the Maildir at `root` (made if missing); the open fd holds it."""
    ensure_maildir(root)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MailboxLocked(str(root)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_maildrop(root: Path) -> tuple[int, Folder, list[Entry]]:
    """Lock and open the INBOX at `root`: (lock fd, folder, the session's entries). No body
    is read: sizes come from the file names, UIDLs from the UID list."""
    fd = lock_maildrop(root)
    try:
        folder = Mailbox(root).inbox()
        # RFC 1939 §11: sizes as sent (CRLF line ends): Dovecot's ",W=" when the file has
        # bare LF line ends, else the file size.
        entries = [Entry(m.uid, m.size if m.vsize is None else m.vsize, folder.uidl(m.uid))
                   for m in folder.messages()]
    except BaseException:
        os.close(fd)
        raise
    return fd, folder, entries


def mark_seen(folder: Folder, uid: int) -> None:
    """Add `S` to a retrieved message's flags (a rename); a vanished message is left alone."""
    info = folder.get(uid)
    if info is not None and "S" not in info.flags:
        folder.set_flags(uid, info.flags | {"S"})


# -- the factory ------------------------------------------------------------------------


class POP3ServerFactory(ListenerFactory):
    """Builds one protocol per connection; counts them in the shared `ConnectionRegistry`."""

    def __init__(
        self,
        *,
        config: Config,
        reactor: IReactorFromThreads,
        read_pool: ThreadPool,
        authenticator: Authenticator,
        clock: IReactorTime | None = None,
        kind: Service | str = Service.POP3,
        tls: ServerTLS | None = None,
        implicit_tls: bool | None = None,
        registry: ConnectionRegistry | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.read_pool = read_pool
        self.authenticator = authenticator
        self._join(kind, (Service.POP3, Service.POP3S), "a POP3 service", config.limits, self.clock, registry)
        self.tls = tls
        self.implicit_tls = self.service.implicit_tls if implicit_tls is None else implicit_tls
        self.mail_root = config.data_dir / "mail"
        self.locked: set[Path] = set()  # maildrops with a session in this process
        self.open_maildrop: Callable[[Path], tuple[int, Folder, list[Entry]]] = open_maildrop

    def buildProtocol(self, addr: Any) -> POP3ServerProtocol:
        p = POP3ServerProtocol()
        p.factory = self
        return p

    def in_pool(self, f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self.reactor, self.read_pool, f, *args)


# -- the protocol -----------------------------------------------------------------------


class POP3ServerProtocol(Protocol, TimeoutMixin):
    factory: POP3ServerFactory

    def __init__(self) -> None:
        self.session = Session()
        self.state = State.AUTHORIZATION
        self.peer_ip = ""
        self.client = ""
        self.tls_active = False
        self.user: str | None = None  # canonical address, once logged in
        self.pending_user: str | None = None  # USER given, PASS awaited
        self.sasl = SASLExchange()
        self.brake: ConnectionBrake | None = None
        self.maildrop: Maildrop | None = None
        self.folder: Folder | None = None
        # Read-ahead (see `_read_ahead`): messages read for RETRs to come, by UID; the UIDs
        # retrieved and not yet renamed \\Seen; the trip to the pool in flight, if any.
        self._read: dict[int, tuple[BinaryIO | None, bytes]] = {}
        self._seen: list[int] = []
        self._ahead: Deferred[None] | None = None
        self._frontier = 0  # the message number after the last one read ahead (or skipped)
        self.errors = 0
        self._root: Path | None = None  # the locked maildrop
        self._lock_fd: int | None = None
        self._busy = False
        self._pending: Deferred[Any] | None = None
        self._open = False
        self._counted = False
        self._closing = False
        self._paused = False
        self._throttle: WriteGate | None = None

    @property
    def service(self) -> Service:
        return self.factory.service

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
            log.info(
                "refused connection from {peer} on {service}: {why}",
                peer=self.peer_ip, service=str(f.service), why=refusal.value, connections=f.registry.total,
            )
            self.transport.write(Response.err(f"{f.config.hostname} {refusal.value}", RespCode.SYS_TEMP).to_bytes())
            self.transport.loseConnection()
            return
        self._counted = True
        self._open = True
        self.brake = f.authenticator.brake(self.client)
        self.setTimeout(f.config.limits.pop3_idle_timeout)
        if hasattr(self.transport, "setTcpNoDelay"):
            self.transport.setTcpNoDelay(True)  # small replies, each awaited: no Nagle delay
        log.info("connection from {peer} on {service}", peer=self.peer_ip, service=str(f.service))
        self._write(Response.positive(f"{f.config.hostname} POP3 mx ready").to_bytes())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._open = False
        self.setTimeout(None)
        self.sasl.cancel()
        if self._throttle is not None:
            self._throttle.release()  # a RETR waiting for the socket ends now
        waits = []
        if self._ahead is not None or self._seen or self._read:
            # The trip in flight, then the \\Seen renames still owed and the files read ahead
            # that nobody will take.
            waits.append(Deferred.fromCoroutine(self._settle_ahead()))
        if self.maildrop is not None:  # not after QUIT: _update logged it and let it go
            self._log_end(quit=False)
        # The lock goes only after the session's last store call (a RETR's read, an expunge,
        # a \\Seen rename).
        if self._busy and self._pending is not None:
            waits.append(self._pending)
        if waits:
            DeferredList(waits, consumeErrors=True).addBoth(lambda r: self._release())
        else:
            self._release()
        if self._counted:
            self._counted = False
            self.factory.registry.release(self)

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        root, self._root = self._root, None
        if root is None:
            return
        if fd is None:
            self.factory.locked.discard(root)
            return
        d = self.factory.in_pool(os.close, fd)
        d.addErrback(lambda f: log.failure("could not release the POP3 lock of {root}", f, root=str(root)))
        d.addBoth(lambda _: self.factory.locked.discard(root))

    def timeoutConnection(self) -> None:
        log.info("idle timeout for {peer} on {service}", peer=self.peer_ip, service=str(self.service))
        if self._throttle is not None:
            self.abort()  # in the middle of a RETR: no response can be inserted any more
            return
        # RFC 1939 §3: an autologout timer ends the session without entering UPDATE.
        self._write(Response.err("Disconnected for inactivity").to_bytes())
        self._close()

    def close_when_idle(self) -> None:
        self._closing = True
        if not self._busy:
            self._write(Response.err("Server shutting down", RespCode.SYS_TEMP).to_bytes())
            self._close()

    def _close(self) -> None:
        self._open = False
        self.transport.loseConnection()

    def abort(self) -> None:
        self._open = False
        self.transport.abortConnection()

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

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
            if isinstance(event, Command):
                self._run(self._dispatch, event)
            elif isinstance(event, RawLine):
                self._run(self._sasl_step, event.text)
            elif isinstance(event, BadLine):
                self.sasl.cancel()
                self._error(event.response)
        if self._busy and not self._paused and self._open and self.session.buffered > PAUSE_BUFFER:
            self._paused = True
            self.transport.pauseProducing()

    def _run(self, handler: Callable[[Any], Any], arg: Any) -> None:
        try:
            result = handler(arg)
        except Response as r:
            self._write(r.to_bytes())
            return
        except Exception:
            self._write(self._internal_error(Failure()).to_bytes())
            return
        if isinstance(result, Deferred):
            self._busy = True
            self._pending = result
            result.addErrback(self._handler_failed)
            result.addCallback(self._resume)
            result.addErrback(lambda f: log.failure("internal error after a reply to {peer}", f, peer=self.peer_ip))
        elif result is not None:
            self._respond(result)

    def _handler_failed(self, failure: Failure) -> Response:
        if failure.check(Response):
            return failure.value  # type: ignore[return-value]
        return self._internal_error(failure)

    def _internal_error(self, failure: Failure) -> Response:
        """A bug or a store failure, not a client error: log it, keep the connection."""
        log.failure("internal error for {peer} on {service}", failure, peer=self.peer_ip, service=str(self.service))
        self.sasl.cancel()
        return INTERNAL_ERROR

    def _respond(self, result: Response | bytes) -> None:
        self._write(result if isinstance(result, bytes) else result.to_bytes())

    def _resume(self, result: Response | bytes | None) -> None:
        self._busy = False
        self._pending = None
        if result is not None:
            self._respond(result)
        if self._closing and self._open:
            self._write(Response.err("Server shutting down", RespCode.SYS_TEMP).to_bytes())
            self._close()
            return
        if self._paused and self._open:
            self._paused = False
            self.transport.resumeProducing()
        self._pump()

    def _error(self, response: Response) -> None:
        self._write(response.to_bytes())
        self.errors += 1
        if self.errors >= MAX_ERRORS and self._open:
            log.info("too many errors from {peer}, closing", peer=self.peer_ip)
            self._write(Response.err("Too many errors, closing connection").to_bytes())
            self._close()

    # -- commands --------------------------------------------------------------------

    def _dispatch(self, cmd: Command) -> Any:
        try:
            check_allowed(self.state, cmd.verb)
        except Response as r:
            self.sasl.cancel()
            self._error(r)
            return None
        return getattr(self, f"pop3_{cmd.verb}")(cmd.arg)

    def pop3_CAPA(self, arg: str) -> bytes:
        # RFC 2449 §5; STLS only before TLS (RFC 2595 §4), credentials only where allowed.
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._plaintext_ok():
                lines += ["USER", "SASL " + " ".join(MECHANISMS)]
            if self.factory.tls is not None and not self.tls_active:
                lines.append("STLS")
        lines.append("IMPLEMENTATION mx")
        return multiline("Capability list follows", lines)

    def pop3_NOOP(self, arg: str) -> Response:
        return Response.positive()

    def pop3_QUIT(self, arg: str) -> Response | Deferred[None] | None:
        if self.state is State.AUTHORIZATION:
            self._write(Response.positive(f"{self.factory.config.hostname} closing connection").to_bytes())
            self._close()
            return None
        return Deferred.fromCoroutine(self._update())

    async def _update(self) -> None:
        """RFC 1939 §6: the UPDATE state removes the messages marked as deleted."""
        assert self.maildrop is not None and self.folder is not None
        self.state = State.UPDATE
        await self._settle_ahead()  # one store call at a time: a \\Seen rename may be in flight
        uids = self.maildrop.deleted_uids()
        response = None
        if uids:
            try:
                removed = await self.factory.in_pool(self.folder.expunge, uids)
            except Exception:
                log.failure("could not delete messages of {user}", Failure(), user=self.user, uids=uids)
                response = Response.err("Some deleted messages were not removed", RespCode.SYS_TEMP)
            else:
                log.info(
                    "pop3 {user} deleted {count} messages at QUIT", user=self.user, count=len(removed),
                    uids=list(removed), peer=self.peer_ip,
                )
        left = len(self.maildrop) - len(uids)
        self._log_end(quit=True)
        self.maildrop = None
        if response is None:
            response = Response.positive(f"{self.factory.config.hostname} closing connection ({left} messages left)")
        self._write(response.to_bytes())
        self._close()

    def _log_end(self, quit: bool) -> None:
        m = self.maildrop
        if m is None:
            return
        log.info(
            "pop3 session of {user} from {peer} ended: {retrieved} retrieved, {deleted} deleted",
            user=self.user, peer=self.peer_ip, retrieved=len(m.retrieved),
            deleted=len(m.deleted) if quit else 0, marked=len(m.deleted), quit=quit,
        )

    # -- STLS (RFC 2595 §4) ----------------------------------------------------------

    def pop3_STLS(self, arg: str) -> None:
        tls = self.factory.tls
        if tls is None:
            raise Response.err("STLS not available")
        if self.tls_active:
            raise Response.err("Already using TLS")
        if arg:
            raise Response.err("STLS takes no arguments")
        self._write(Response.positive("Begin TLS negotiation").to_bytes())
        # RFC 2595 §4 (and CVE-2011-0411 in SMTP): commands pipelined behind STLS do not
        # count, and whatever was said before TLS (a USER) is forgotten.
        self.session.discard_buffer()
        self.transport.startTLS(tls)
        self.tls_active = True
        self.pending_user = None
        self.sasl.cancel()
        return None

    # -- USER/PASS and AUTH (RFC 1939 §7, RFC 5034): checks and brakes are mx.auth's ---

    def _plaintext_ok(self) -> bool:
        return plaintext_allowed(self.peer_ip, self.tls_active, self.factory.config.auth.plaintext_without_tls)

    def _may_try(self, username: str) -> None:
        if not self._plaintext_ok():
            self._failed_log(username, "plaintext before TLS")
            raise PLAINTEXT_REFUSED
        assert self.brake is not None
        if self.brake.blocked():
            self._failed_log(username, "too many failures from this address")
            self._write(Response.err("Too many authentication failures, try later", RespCode.SYS_TEMP).to_bytes())
            self._close()
            raise _Closed()

    def pop3_USER(self, arg: str) -> Response | None:
        name = arg.strip()
        if not name:
            raise Response.err("Syntax: USER name")
        try:
            self._may_try(name)
        except _Closed:
            return None
        self.pending_user = name
        return Response.positive()

    def pop3_PASS(self, arg: str) -> Deferred[Response | None] | None:
        username, self.pending_user = self.pending_user, None
        if username is None:
            raise Response.err("USER first")
        if not arg:
            raise Response.err("Syntax: PASS password")
        try:
            self._may_try(username)
        except _Closed:
            return None
        return Deferred.fromCoroutine(self._login(username, arg))

    def pop3_AUTH(self, arg: str) -> Response | bytes | Deferred[Response | None] | None:
        mechanism, _, initial = arg.strip().partition(" ")
        if not mechanism:
            # The mechanism list (RFC 1734 clients ask so; RFC 5034 lists them in CAPA).
            return multiline("", MECHANISMS)
        self.pending_user = None
        try:
            self._may_try("(SASL)")
        except _Closed:
            return None
        return self._sasl_outcome(self.sasl.start(mechanism, initial.strip() or None))

    def _sasl_step(self, line: str) -> Response | Deferred[Response | None]:
        return self._sasl_outcome(self.sasl.step(line))

    def _sasl_outcome(self, outcome: Challenge | Credentials | Rejected) -> Response | Deferred[Response | None]:
        if isinstance(outcome, Challenge):
            self.session.expect_raw_line()
            self._write(f"+ {outcome.text}\r\n".encode("ascii"))  # RFC 5034 §4
            return None  # type: ignore[return-value]
        if isinstance(outcome, Rejected):
            if outcome.problem is SASLProblem.CANCELLED:
                raise Response.err("Authentication canceled")  # RFC 5034 §4: -ERR to "*"
            raise Response.err(outcome.text)
        return Deferred.fromCoroutine(self._login(outcome.username, outcome.password))

    def _failed_log(self, username: str, reason: str) -> None:
        log.info(
            "pop3 login failed for {username} from {peer} on {service}: {reason}",
            username=username[:100], peer=self.peer_ip, service=str(self.service), reason=reason,
            count=self.brake.failures if self.brake is not None else 0,
        )

    async def _login(self, username: str, password: str) -> Response | None:
        f = self.factory
        auth = f.authenticator
        assert self.brake is not None
        user = await auth.check(username, password)
        if not self._open:
            return None
        if user is None:
            canonical = auth.canonical(username)
            known = canonical is not None and auth.users.lookup(canonical) is not None
            verdict = self.brake.failed()
            self._failed_log(username, "wrong password" if known else "unknown user")
            refused = Response.err("Authentication failed", RespCode.AUTH)
            if verdict.close:
                self._write(refused.to_bytes())
                self._close()
                return None
            if verdict.delay > 0:
                await deferLater(f.clock, verdict.delay, lambda: None)
            return refused
        return await self._open_maildrop(user)

    async def _open_maildrop(self, user: str) -> Response | None:
        f = self.factory
        local, _, domain = user.rpartition("@")
        try:
            root = mailbox_path(f.mail_root, domain, local)
        except MaildirError:
            self._failed_log(user, "no valid mailbox path")
            return Response.err("No mailbox for this user", RespCode.SYS_PERM)
        if root in f.locked:
            self._failed_log(user, "mailbox in use")
            return Response.err("Mailbox is locked by another POP3 session", RespCode.IN_USE)
        f.locked.add(root)
        self._root = root  # from here on, _release() gives it back
        try:
            fd, folder, entries = await f.in_pool(f.open_maildrop, root)
        except MailboxLocked:
            self._root = None
            f.locked.discard(root)
            self._failed_log(user, "mailbox in use")
            return Response.err("Mailbox is locked by another POP3 session", RespCode.IN_USE)
        except Exception:
            self._root = None
            f.locked.discard(root)
            log.failure("could not open the mailbox of {user}", Failure(), user=user, root=str(root))
            return Response.err("Cannot open the mailbox, try again later", RespCode.SYS_TEMP)
        self._lock_fd = fd
        if not self._open:
            return None  # connectionLost already ran: the pending callback releases the lock
        self.user, self.folder, self.maildrop = user, folder, Maildrop(entries)
        self.state = State.TRANSACTION
        octets = sum(e.size for e in entries)
        log.info(
            "pop3 login {user} from {peer} on {service}: {count} messages, {octets} octets",
            user=user, peer=self.peer_ip, service=str(self.service), count=len(entries), octets=octets,
            tls=self.tls_active,
        )
        return Response.positive(f"Logged in, {len(entries)} messages ({octets} octets)")

    # -- TRANSACTION (RFC 1939 §5) ---------------------------------------------------

    def pop3_STAT(self, arg: str) -> Response:
        assert self.maildrop is not None
        return self.maildrop.stat()

    def pop3_LIST(self, arg: str) -> Response | bytes:
        assert self.maildrop is not None
        return self.maildrop.list(arg.split())

    def pop3_UIDL(self, arg: str) -> Response | bytes:
        assert self.maildrop is not None
        return self.maildrop.uidl(arg.split())

    def pop3_DELE(self, arg: str) -> Response:
        assert self.maildrop is not None
        return self.maildrop.dele(arg.split())

    def pop3_RSET(self, arg: str) -> Response:
        assert self.maildrop is not None
        return self.maildrop.rset()

    def pop3_RETR(self, arg: str) -> Deferred[None] | None:
        return self._retrieve("RETR", arg)

    def pop3_TOP(self, arg: str) -> Deferred[None] | None:
        return self._retrieve("TOP", arg)

    def _retrieve(self, verb: str, arg: str) -> Deferred[None] | None:
        assert self.maildrop is not None
        n, entry, lines = self.maildrop.retr_args(verb, arg.split())
        read = self._read.pop(entry.uid, None)
        if read is not None and read[0] is None:
            # Read ahead whole: answered now, without a coroutine, a Deferred or the pool
            # (most RETRs of a session that fetches everything; ~15 us less each).
            retrieval = Retrieval(lines)
            self._write(self._head(entry, lines) + retrieval.feed(read[1]) + retrieval.finish())
            self._retrieved(n, entry, lines)
            return None
        return Deferred.fromCoroutine(self._stream(n, entry, lines, read))

    @staticmethod
    def _head(entry: Entry, lines: int | None) -> bytes:
        return Response.positive(f"{entry.size} octets" if lines is None else "top of message follows").to_bytes()

    def _retrieved(self, n: int, entry: Entry, lines: int | None) -> None:
        """After a message went out whole: RETR marks it retrieved (and owes its \\Seen
        rename); the next ones are read ahead."""
        if lines is None:
            assert self.maildrop is not None
            self.maildrop.retrieved.add(n)
            if self.factory.config.pop3.mark_seen:
                self._seen.append(entry.uid)  # renamed by the next trip, or at the session's end
            self._read_ahead(n + 1)

    async def _stream(self, n: int, entry: Entry, lines: int | None,
                      read: tuple[BinaryIO | None, bytes] | None = None) -> None:
        f = self.factory
        folder = self.folder
        assert folder is not None and self.maildrop is not None
        if read is None:
            read = await self._take_read(entry.uid)
        try:
            # One trip to the pool opens the file and reads its first FIRST_READ bytes (and
            # closes it if that was all): most messages cost one trip, and are sent at once.
            # Usually that trip was made while the client was reading the previous message.
            fh, first = read if read is not None else await f.in_pool(_open_and_read, folder, entry.uid, FIRST_READ)
        except (MessageGone, FileNotFoundError):
            log.info("pop3 message {uid} of {user} vanished", uid=entry.uid, user=self.user)
            raise Response.err(f"Message {n} is gone (deleted by another session)") from None
        except (StoreError, OSError):
            log.failure("could not read message {uid} of {user}", Failure(), uid=entry.uid, user=self.user)
            raise Response.err(f"Cannot read message {n}, try again later", RespCode.SYS_TEMP) from None
        head = self._head(entry, lines)
        retrieval = Retrieval(lines)
        out = retrieval.feed(first)
        if fh is None or retrieval.done:
            self._write(head + out + retrieval.finish())
            if fh is not None:
                await f.in_pool(fh.close)  # TOP had what it needed
            complete = True
        else:
            complete = await self._stream_rest(fh, head + out, retrieval, entry)
        if complete:
            self._retrieved(n, entry, lines)

    def _next_small(self, n: int) -> Entry | None:
        """Message `n`, if it is there and small enough to read ahead.

        Clients fetch in order: message n+1 is read while message n travels, so its RETR
        does not wait for a trip to the pool. Message files never change content (a flag
        change is a rename), so what is read ahead is what RETR would read.
        """
        maildrop = self.maildrop
        if maildrop is None or self.folder is None or not 1 <= n <= len(maildrop) or n in maildrop.deleted:
            return None
        entry = maildrop.entries[n - 1]
        return entry if entry.size < FIRST_READ else None

    def _read_ahead(self, n: int) -> None:
        """Start a trip that renames the retrieved messages \\Seen and reads the next small
        ones (from message `n` on, up to AHEAD_COUNT / AHEAD_OCTETS), unless one is in flight
        or the next AHEAD_LOW are read already. RETRs then answer from memory: one trip per
        AHEAD_COUNT messages instead of one per message. The command does not wait for it."""
        if self._ahead is not None or self.folder is None:
            return
        # Messages n .. frontier-1 were read ahead already (or are not to be: large, deleted).
        # No scan over them: a scan per RETR was 24 look-ups per message in a 10,000 RETR
        # session (a fifth of the reactor's time under cProfile).
        k = max(n, self._frontier)
        if k - n >= AHEAD_LOW and len(self._seen) < AHEAD_COUNT:
            return  # enough read already; the renames wait for the next trip
        uids: list[int] = []
        total = 0
        while len(uids) < AHEAD_COUNT and total < AHEAD_OCTETS and (entry := self._next_small(k)) is not None:
            if entry.uid not in self._read:
                uids.append(entry.uid)
                total += entry.size
            k += 1
        self._frontier = k
        if not uids and len(self._seen) < AHEAD_COUNT:
            return  # nothing to read: the renames wait for QUIT (or the next trip)
        seen, self._seen = self._seen, []
        d = self.factory.in_pool(_seen_and_read, self.folder, seen, uids)

        def arrived(result: tuple[dict[int, tuple[BinaryIO | None, bytes]], list[tuple[int, str]]]) -> None:
            read, failed = result
            self._log_not_seen(failed)
            self._read.update(read)

        def done(result: Any) -> Any:
            self._ahead = None
            return result

        d.addCallback(arrived)
        d.addErrback(lambda failure: log.failure("pop3 read-ahead of {user} failed", failure, user=self.user))
        d.addBoth(done)
        self._ahead = d

    async def _take_read(self, uid: int) -> tuple[BinaryIO | None, bytes] | None:
        """Message `uid` as read ahead, else None; first waits for the trip in flight (one
        store call at a time per session)."""
        if self._ahead is not None:
            await self._ahead
        return self._read.pop(uid, None)

    async def _settle_ahead(self) -> None:
        """Before the session's next other store call, or at its end: the trip in flight, then
        the \\Seen renames still owed, and the files read ahead closed."""
        if self._ahead is not None:
            await self._ahead
        seen, self._seen = self._seen, []
        left = [fh for fh, _first in self._read.values() if fh is not None]
        self._read.clear()
        self._frontier = 0
        if (seen or left) and self.folder is not None:
            try:
                _read, failed = await self.factory.in_pool(_seen_and_read, self.folder, seen, [], left)
            except Exception:
                log.failure("pop3 could not mark messages of {user} seen", Failure(), user=self.user)
                return
            self._log_not_seen(failed)

    def _log_not_seen(self, failed: list[tuple[int, str]]) -> None:
        for uid, why in failed:
            log.info("pop3 could not mark message {uid} of {user} seen: {why}", uid=uid, user=self.user, why=why)

    async def _stream_rest(self, fh: BinaryIO, start: bytes, retrieval: Retrieval, entry: Entry) -> bool:
        """A message larger than FIRST_READ: the rest in READ_CHUNK reads, one per pool trip,
        with a push producer so no chunk is read while the socket's buffer is full."""
        f = self.factory
        throttle = self._throttle = WriteGate()
        try:
            self.transport.registerProducer(throttle, True)
            self._write(start)
            while not retrieval.done:
                try:
                    chunk = await f.in_pool(fh.read, READ_CHUNK)
                except OSError:
                    # The +OK went out: the only honest way to fail now is to cut the line.
                    log.failure("read error in message {uid} of {user}", Failure(), uid=entry.uid, user=self.user)
                    self.abort()
                    return False
                if not self._open:
                    return False
                if not chunk:
                    break
                out = retrieval.feed(chunk)
                if out:
                    self._write(out)
                    self.resetTimeout()
                    if throttle.paused:
                        await throttle.wait()
                        if not self._open:
                            return False
            self._write(retrieval.finish())
            return True
        finally:
            self._throttle = None
            if self._open:
                self.transport.unregisterProducer()
            await f.in_pool(fh.close)


def _read_quietly(folder: Folder, uid: int) -> tuple[BinaryIO | None, bytes] | None:
    """In the pool: a read-ahead; None on any error (RETR then reads again and reports it)."""
    try:
        return _open_and_read(folder, uid, FIRST_READ)
    except Exception:
        return None


def _seen_and_read(folder: Folder, seen: list[int], uids: list[int], close: Sequence[BinaryIO] = ()
                   ) -> tuple[dict[int, tuple[BinaryIO | None, bytes]], list[tuple[int, str]]]:
    """In the pool, one trip: \\Seen for the messages in `seen`, the read-ahead of `uids`,
    and `close` closed. Returns what was read (a message that failed is left out: RETR reads
    it again and reports it) and (uid, why) of each rename that failed."""
    failed: list[tuple[int, str]] = []
    for uid in seen:
        try:
            mark_seen(folder, uid)
        except Exception as e:  # vanished or unwritable: the message was sent all the same
            failed.append((uid, str(e)))
    read = {}
    if uids:
        with folder.reading():
            for uid in uids:
                got = _read_quietly(folder, uid)
                if got is not None:
                    read[uid] = got
    for fh in close:
        fh.close()
    return read, failed


def _open_and_read(folder: Folder, uid: int, size: int) -> tuple[BinaryIO | None, bytes]:
    """In the pool: the message's first `size` bytes, and its open file if there is more.
    Read from the raw descriptor (a file object is made only for a message that has more:
    most are read whole, and the object cost more than the read)."""
    fd, _named = folder.open_message_fd(uid)
    try:
        parts = []
        got = 0
        while got < size:  # a read is short only at the end of a regular file; loop anyway
            more = os.read(fd, size - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
    except BaseException:
        os.close(fd)
        raise
    first = parts[0] if len(parts) == 1 else b"".join(parts)
    if got < size:
        os.close(fd)
        return None, first
    return os.fdopen(fd, "rb"), first


class _Closed(Exception):
    """The connection was closed while refusing a command: no response is owed."""
