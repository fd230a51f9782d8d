"""The relay manager: takes queued messages to other domains' MX hosts, retries, bounces.

Wakes on new mail (`enqueue`), on its timer, or on `flush`. Due recipients are grouped by
destination domain (one transaction carries all of a message's recipients there); a worker
per destination holds one connection and reuses it for the next message to that domain.

Invariants:
- Intent before acting (mox): an attempt is recorded (attempts + next try) in the spool
  before connecting, so a crash mid-attempt re-sends at most that one transaction later.
- One authoritative entry per message (`self.entries`): the parts of an attempt (one per
  destination, run by different workers at once) merge their outcomes into it recipient by
  recipient, with no await between reading and writing it, and never change a recipient
  that is no longer pending. The entry is settled (delay notice, bounces owed, removal)
  once per attempt, by the part that finishes last, after every part's outcome is durable.
- Each outcome is persisted before anything acts on it (bounce, removal, reschedule); saves
  write the entry's current state, and the committer keeps one id's saves and its removal
  in order, so a removed entry never comes back.
- An attempt whose message file is missing or unreadable is a local temporary failure
  (4.3.0), bounced as 5.3.0 after `max_lifetime`; a bug in an attempt defers its recipients
  the same way and drops the connection: a worker never dies with work half done.
- The queue is loaded at start-up before anything is committed (`Delivery.hold_until`), and
  the load never overwrites an entry this run already knows.
- Queue bodies are read in the disk pool (`_QueueBody`, `_BodiesAhead`), never on the reactor
  thread; bodies read ahead are bounded in count and octets and dropped when an attempt ends.
- Scheduling never rescans the folder: the queue is read once at start-up into memory and a
  heap of due times decides what runs next.
- Concurrency: at most `per_destination` connections to one domain and `max_connections`
  in all.
- A message from `<>` never bounces; a bounce that fails goes to the postmaster once; a
  failed notice to the postmaster is logged and dropped.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTCP, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx import dsn
from mx.address import AddressError, parse_address
from mx.config import Config
from mx.delivery import Delivery, new_message_id
from mx.dns import DNSError, MXHost, Resolver, TemporaryDNSError
from mx.routing import Router
from mx.smtp import Reply
from mx.smtpclient import (
    CHUNK_SIZE,
    ServerReply,
    SMTPClientConnection,
    SMTPClientError,
    Timeouts,
    smarthost_auth,
)
from mx.spool import BOUNCED, FAILED, PENDING, Kind, QueueEntry, RecipientState, Spool

__all__ = ["Relay"]

log = Logger()

PER_DESTINATION = 10
MAX_CONNECTIONS = 100
STOP_GRACE = 5.0  # seconds running attempts may finish in at shutdown
JITTER = 0.1  # up to +10% on each retry interval, so a backlog does not stampede


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one attempt meant for one recipient."""

    code: int  # the SMTP reply code, or 450/550-style for failures without a usable reply
    enhanced: str
    text: str
    peer: str = ""

    @classmethod
    def from_reply(cls, reply: ServerReply, peer: str) -> _Outcome:
        default = "2.0.0" if reply.code < 400 else "4.0.0" if reply.code < 500 else "5.0.0"
        return cls(reply.code, reply.enhanced or default, str(reply), peer)

    @classmethod
    def from_client_error(cls, e: SMTPClientError) -> _Outcome:
        peer = e.peer
        if e.reply is not None and (e.reply.code >= 500) != e.temporary:
            return cls.from_reply(e.reply, peer)
        text = str(e.reply) if e.reply is not None else str(e)
        return cls(450 if e.temporary else 550, _enhanced(e), text, peer)

    @classmethod
    def from_dns_error(cls, e: DNSError) -> _Outcome:
        if e.temporary:
            return cls(450, e.reply_code, str(e))
        # RFC 7505 §4.2: null MX is 556 5.1.10
        return cls(556 if e.reply_code == "5.1.10" else 550, e.reply_code, str(e))


class _Work:
    """One message's due recipients for one destination."""

    __slots__ = ("entry_id", "domain", "addresses")

    def __init__(self, entry_id: str, domain: str, addresses: tuple[str, ...]) -> None:
        self.entry_id = entry_id
        self.domain = domain
        self.addresses = addresses


@dataclass(slots=True)
class _Attempt:
    """One attempt on one entry: its parts still running (one per destination) and the
    recipients it tries."""

    parts: int
    addresses: frozenset[str]


class _UnreadableBody(Exception):
    """The queued message file is missing or cannot be read (a local temporary failure)."""


class _QueueBody:
    """A queued message file read in the disk pool, so the reactor thread never blocks on
    it (an `smtpclient.BodySource`).

    It starts with the first `FIRST_READ` bytes, read with the open in one thread trip
    (`_BodiesAhead.open`): most messages are smaller, so they cost one trip at most (each trip
    waits for the GIL behind the reactor, so trips, not bytes, are what a drain pays for).
    Larger ones stream on in `CHUNK_SIZE` reads, one trip each.
    """

    FIRST_READ = 256 * 1024

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool, f: BinaryIO | None, first: bytes) -> None:
        self._reactor = reactor
        self._pool = pool
        self._file = f
        self._first: bytes | None = first

    async def read_chunk(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            if first:
                return first
        if self._file is None:
            return b""
        try:
            data = await deferToThreadPool(self._reactor, self._pool, self._file.read, CHUNK_SIZE)
        except OSError as e:
            self.close()
            raise _UnreadableBody(f"local error: reading the queued message failed ({e.strerror or e})") from None
        if not data:
            self.close()
        return data

    def close(self) -> None:
        self._first = None
        if self._file is not None:
            self._file.close()
            self._file = None


class _BodiesAhead:
    """Small queued bodies read ahead, several per disk-pool trip.

    A drain sends one message per transaction on each connection; a trip to the pool per
    message (a Deferred, a thread hand-off, a wake-up of the reactor) was a tenth of the
    reactor's time. So the trip that reads the body a worker needs also reads the bodies of
    the next works queued for the same destination, up to `COUNT` of them and `OCTETS`
    octets, each whole and at most `MAX_BODY` octets; the other workers of that destination
    find theirs here. Queue bodies are never rewritten, so a body read early is still right.
    Bounded: nothing is read ahead while `LIMIT` octets are held; an attempt's end drops
    what it did not use (`forget`).
    """

    COUNT = 16
    OCTETS = 1024 * 1024
    MAX_BODY = 64 * 1024
    LIMIT = 8 * 1024 * 1024

    def __init__(self, reactor: IReactorFromThreads, pool: ThreadPool, spool: Spool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._spool = spool
        self._held: dict[str, bytes] = {}
        self._octets = 0
        self._reading: set[str] = set()

    async def open(self, entry_id: str, upcoming: Sequence[str]) -> _QueueBody:
        path = self._spool.body_file(entry_id)
        data = self._held.pop(entry_id, None)
        if data is not None:
            self._octets -= len(data)
            return _QueueBody(self._reactor, self._pool, None, data)
        ahead: list[str] = []
        if self._octets < self.LIMIT:
            for other in upcoming:
                if len(ahead) >= self.COUNT:
                    break
                if other != entry_id and other not in self._held and other not in self._reading:
                    ahead.append(other)
        self._reading.update(ahead)
        try:
            f, first, more = await deferToThreadPool(
                self._reactor, self._pool, _read_bodies, path, [self._spool.body_file(i) for i in ahead],
                _QueueBody.FIRST_READ, self.MAX_BODY, self.OCTETS,
            )
        except OSError as e:
            raise _UnreadableBody(f"local error: the queued message file is unreadable ({e.strerror or e})") from None
        finally:
            self._reading.difference_update(ahead)
        for other, data in zip(ahead, more):
            if data is not None and other not in self._held:
                self._held[other] = data
                self._octets += len(data)
        return _QueueBody(self._reactor, self._pool, f, first)

    def forget(self, entry_id: str) -> None:
        data = self._held.pop(entry_id, None)
        if data is not None:
            self._octets -= len(data)

    def clear(self) -> None:
        self._held.clear()
        self._octets = 0


def _read_bodies(path: Path | str, ahead: Sequence[Path | str], size: int, max_body: int,
                 octets: int) -> tuple[BinaryIO | None, bytes, list[bytes | None]]:
    """In a disk thread: `path` as `_open_and_read` gives it (its error raised), and each
    of `ahead` whole if it has at most `max_body` octets (else, or unreadable, None), until
    `octets` were read."""
    f, first = _open_and_read(path, size)
    more: list[bytes | None] = []
    for other in ahead:
        if octets <= 0:
            break
        try:
            with open(other, "rb") as g:
                data = g.read(max_body + 1)
        except OSError:
            data = b""
        if not data or len(data) > max_body:
            more.append(None)  # read again when its turn comes (and its error told then)
            continue
        more.append(data)
        octets -= len(data)
    return f, first, more


def _open_and_read(path: Path | str, size: int) -> tuple[BinaryIO | None, bytes]:
    """In a disk thread: the file's first `size` bytes, and the open file if there is more."""
    f = open(path, "rb")
    try:
        first = f.read(size)
    except BaseException:
        f.close()
        raise
    if len(first) < size:
        f.close()
        return None, first
    return f, first


class Relay(service.Service):
    def __init__(
        self,
        config: Config,
        reactor: IReactorTCP,
        pool: ThreadPool,
        spool: Spool,
        delivery: Delivery,
        router: Router,
        resolver: Resolver,
        *,
        connect: Callable[..., Any] = SMTPClientConnection.connect,
        timeouts: Timeouts = Timeouts(),
        trust_root: Any = None,
        rng: random.Random | None = None,
        clock: IReactorTime | None = None,
        per_destination: int = PER_DESTINATION,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.config = config
        # Read once, at build time (before twistd drops root); ConfigError if unusable.
        self._smarthost_auth = smarthost_auth(config.relay)
        self.reactor = reactor
        self.pool = pool
        self.spool = spool
        self.delivery = delivery
        self.router = router
        self.resolver = resolver
        self._connect = connect
        self.timeouts = timeouts
        self.trust_root = trust_root
        self.rng = rng or random.Random()
        # Timers and "now" come from `clock` (a task.Clock in tests), sockets from `reactor`.
        self.clock: IReactorTime = clock if clock is not None else reactor  # type: ignore[assignment]
        self.now = self.clock.seconds
        self._idle: list[Deferred[None]] = []
        self.per_destination = per_destination
        self.max_connections = max_connections
        self.entries: dict[str, QueueEntry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._timer: IDelayedCall | None = None
        self._busy: set[str] = set()  # entry ids with an attempt in flight
        self._queues: dict[str, deque[_Work]] = defaultdict(deque)
        self._workers: dict[str, int] = defaultdict(int)
        self._active = 0
        self._running_tasks: set[Deferred[Any]] = set()
        self._attempts: dict[str, _Attempt] = {}  # entry id -> the attempt running on it
        self._bodies = _BodiesAhead(reactor, pool, spool)  # type: ignore[arg-type]
        self._stopping = False
        self.loaded: Deferred[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self.loaded = deferToThreadPool(self.reactor, self.pool, self.spool.load_all)
        self.loaded.addCallback(self._loaded)
        self.loaded.addErrback(lambda f: log.failure("could not read the queue", f))
        # Nothing is committed (so no 250 is given) before the queue is loaded: the load
        # cleans crash debris, which must never be a file a commit of this run is writing.
        self.delivery.hold_until(self.loaded)

    def _loaded(self, result: tuple[list[QueueEntry], list[tuple[str, str]]]) -> None:
        entries, quarantined = result
        for queue_id, reason in quarantined:
            log.error("quarantined queue record {msgid}: {reason}", msgid=queue_id, reason=reason)
        loaded = 0
        for entry in entries:
            if entry.id in self.entries:
                continue  # merge, never overwrite: this run's state is newer
            loaded += 1
            self.entries[entry.id] = entry
            if entry.owed:  # a crash came between recording a failure and its bounce
                self._busy.add(entry.id)
                d = Deferred.fromCoroutine(self._bounce_owed(entry.id))
                d.addErrback(lambda f: log.failure("could not send an owed bounce", f))
                d.addBoth(lambda _, i=entry.id: self._release(i))
            else:
                self._push(entry)
        log.info("relay queue loaded: {count} messages", count=loaded, quarantined=len(quarantined))
        self._arm()

    def stopService(self) -> Deferred[Any]:
        """Stop taking work; running attempts get `STOP_GRACE` seconds, then are cancelled
        (their intent is recorded, so they are simply tried again after a restart)."""
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        timer = self.clock.callLater(STOP_GRACE, self._cancel_running)
        self._bodies.clear()

        async def drain() -> None:
            # Tasks started meanwhile (a worker recording its last outcome) are waited for too.
            while self._running_tasks:
                if not timer.active():
                    self._cancel_running()  # past the grace time: cut what started since
                await DeferredList(list(self._running_tasks), consumeErrors=True)
            if timer.active():
                timer.cancel()

        return Deferred.fromCoroutine(drain())

    def _cancel_running(self) -> None:
        for task in list(self._running_tasks):
            task.cancel()

    # -- scheduling ------------------------------------------------------------------

    def enqueue(self, entry: QueueEntry) -> None:
        """A new entry is durable in the spool: schedule it (now, normally)."""
        self.entries[entry.id] = entry
        self._push(entry)
        self._arm()

    def flush(self) -> None:
        """Try every queued recipient now (`mx queue flush`)."""
        now = self.now()
        for entry_id, entry in list(self.entries.items()):
            if entry_id in self._busy:
                continue
            updated = entry.with_recipients(
                r._replace(next_attempt=now) if r.status == PENDING else r for r in entry.recipients
            )
            self.entries[entry_id] = updated
            self._push(updated)
        self._arm()

    def delete(self, entry_id: str) -> Deferred[bool]:
        """Remove a message from the queue (`mx queue delete`); False if unknown."""
        if self.entries.pop(entry_id, None) is None:
            return succeed(False)
        log.info("deleted {msgid} from the queue by the operator", msgid=entry_id)
        return self.delivery.remove_queue_entry(entry_id).addCallback(lambda _: True)

    def wait_idle(self) -> Deferred[None]:
        """Fires when no attempt is running or being recorded (tests, tools)."""
        d: Deferred[None] = Deferred()
        if not self._busy:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def _push(self, entry: QueueEntry) -> None:
        pending = [r.next_attempt for r in entry.recipients if r.status == PENDING]
        if pending:
            heapq.heappush(self._heap, (min(pending), next(self._seq), entry.id))

    def _arm(self) -> None:
        if self._stopping or not self.running:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self._heap:
            return
        delay = max(0.0, self._heap[0][0] - self.now())
        self._timer = self.clock.callLater(delay, self._run_due)

    def _run_due(self) -> None:
        self._timer = None
        now = self.now()
        while self._heap and self._heap[0][0] <= now:
            _when, _seq, entry_id = heapq.heappop(self._heap)
            entry = self.entries.get(entry_id)
            if entry is None or entry_id in self._busy:
                continue  # gone, or an attempt is running and will reschedule it
            due = [r for r in entry.recipients if r.status == PENDING and r.next_attempt <= now]
            if not due:
                continue  # a stale heap item; a later one exists for this entry
            self._busy.add(entry_id)
            by_domain: dict[str, list[str]] = defaultdict(list)
            for r in due:
                by_domain[self._destination(r.domain)].append(r.address)
            self._attempt(entry, by_domain)
        self._arm()

    def _destination(self, domain: str) -> str:
        return "[smarthost]" if self.config.relay.smarthost else domain

    def _update(self, entry_id: str, change: Callable[[RecipientState], RecipientState]) -> QueueEntry | None:
        """Change the authoritative entry's recipients in place (no await in here: two
        parts of one attempt never work on copies of each other's state)."""
        entry = self.entries.get(entry_id)
        if entry is None:
            return None
        entry = self.entries[entry_id] = entry.with_recipients(change(r) for r in entry.recipients)
        return entry

    def _attempt(self, entry: QueueEntry, by_domain: dict[str, list[str]]) -> None:
        # Intent first: every due recipient gets its next try recorded before we connect.
        now = self.now()
        addresses = frozenset(a for group in by_domain.values() for a in group)
        self._update(entry.id, lambda r: r.tried(now + self._interval(r.attempts + 1))
                     if r.address in addresses else r)
        self._attempts[entry.id] = _Attempt(len(by_domain), addresses)
        d = self._save(entry.id)
        d.addCallback(lambda _: self._dispatch(entry.id, by_domain))
        d.addErrback(self._attempt_failed_to_record, entry.id)

    def _attempt_failed_to_record(self, failure: Failure, entry_id: str) -> None:
        log.failure("could not record an attempt for {msgid}; retrying later", failure, msgid=entry_id)
        self._attempts.pop(entry_id, None)
        self._release(entry_id)

    def _interval(self, attempts: int) -> float:
        retry = self.config.relay.retry
        base = retry[min(attempts, len(retry)) - 1]
        return base * (1.0 + JITTER * self.rng.random())

    def _dispatch(self, entry_id: str, by_domain: dict[str, list[str]]) -> None:
        if entry_id not in self.entries:  # deleted by the operator while the intent was saved
            self._attempts.pop(entry_id, None)
            self._release(entry_id)
            return
        for dest, addresses in by_domain.items():
            self._queues[dest].append(_Work(entry_id, dest, tuple(addresses)))
            self._start_workers(dest)

    def _start_workers(self, dest: str) -> None:
        while (
            self._queues[dest]
            and self._workers[dest] < min(self.per_destination, len(self._queues[dest]) + self._workers[dest])
            and self._active < self.max_connections
            and not self._stopping
        ):
            self._workers[dest] += 1
            self._active += 1
            self._track(Deferred.fromCoroutine(self._worker(dest)), "relay worker")

    def _track(self, task: Deferred[Any], what: str) -> None:
        """Keep `task` until it is done, so that `stopService` waits for it."""
        self._running_tasks.add(task)
        task.addErrback(lambda f: log.failure("{what} crashed", f, what=what))
        task.addBoth(lambda _, t=task: self._running_tasks.discard(t))

    async def _worker(self, dest: str) -> None:
        conn: SMTPClientConnection | None = None
        try:
            queue = self._queues[dest]
            while queue and not self._stopping:
                work = queue.popleft()
                outcomes: dict[str, _Outcome] = {}
                try:
                    conn, outcomes = await self._deliver(work, conn)
                except CancelledError:
                    raise  # shutdown cut the attempt: its intent is recorded, it is simply retried
                except Exception:
                    # A bug must not leak the connection, lose the part or stall the entry:
                    # the recipients are deferred as a local temporary failure.
                    log.failure("relay attempt on {msgid} failed", msgid=work.entry_id)
                    if conn is not None:
                        conn.abort()
                        conn = None
                    outcomes = dict.fromkeys(work.addresses, _Outcome(451, "4.3.0", "local error in the relay"))
                finally:
                    # The merge happens now; persisting and settling go on beside the next
                    # transaction on this connection rather than in front of it.
                    self._track(Deferred.fromCoroutine(self._part_done(work, outcomes)), "recording an outcome")
        finally:
            if conn is not None:
                if self._stopping:
                    conn.abort()  # shutting down: no polite QUIT that could wait its timeout
                else:
                    await conn.quit()
            self._workers[dest] -= 1
            self._active -= 1
            if not self._queues[dest]:
                self._queues.pop(dest, None)
            # another destination may have waited for a free connection slot
            for other in list(self._queues):
                self._start_workers(other)

    async def _part_done(self, work: _Work, outcomes: dict[str, _Outcome]) -> None:
        """Merge one destination's outcomes into the entry, persist them, and settle the
        entry once, when its last part is done.

        A part counts as done only after its outcomes are durable, so the part that settles
        (sends bounces, removes the entry) acts on state that is all on disk.
        """
        entry_id = work.entry_id
        attempt = self._attempts.get(entry_id)
        try:
            entry = self._merge(entry_id, outcomes)
            last = attempt is None or attempt.parts <= 1
            if entry is not None and (not last or entry.pending or entry.owed):
                # (Finished with nothing owed: the removal below is durable by itself.)
                await self._save(entry_id)
        except Exception:
            log.failure("could not record the outcome for {msgid}; it is retried", msgid=entry_id)
        finally:
            if attempt is not None:
                attempt.parts -= 1
        if attempt is not None and attempt.parts > 0:
            return
        self._attempts.pop(entry_id, None)
        try:
            await self._settle(entry_id, attempt.addresses if attempt is not None else frozenset())
        except Exception:
            log.failure("could not settle {msgid}; it is retried", msgid=entry_id)
        finally:
            self._release(entry_id)

    def _release(self, entry_id: str) -> None:
        """The attempt on `entry_id` is over: schedule what is left of it."""
        self._busy.discard(entry_id)
        self._bodies.forget(entry_id)
        entry = self.entries.get(entry_id)
        if entry is not None:
            self._push(entry)
            self._arm()
        if not self._busy:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    # -- one delivery attempt --------------------------------------------------------

    async def _deliver(
        self, work: _Work, conn: SMTPClientConnection | None
    ) -> tuple[SMTPClientConnection | None, dict[str, _Outcome]]:
        """One transaction for one part: (the connection to reuse, outcome per recipient)."""
        entry = self.entries.get(work.entry_id)
        if entry is None:
            return conn, {}  # deleted by the operator meanwhile
        try:
            result = None
            if conn is not None:
                try:
                    result = await self._send(conn, entry, work)
                except SMTPClientError as e:
                    if e.reply is not None or e.stage not in ("connect", "mail"):
                        raise
                    # The remote closed the reused connection after the last transaction
                    # (a per-connection limit, an idle timeout), found before our MAIL or
                    # while it was in flight, before any reply to it: that says nothing
                    # about this message, so try once more on a fresh connection.
                    conn.abort()
                    conn = None
            if result is None:
                conn = await self._open(work.domain)
                result = await self._send(conn, entry, work)
            outcomes = _outcomes(result, work.addresses, conn.peer_name)
        except SMTPClientError as e:
            if conn is not None:
                e.peer = conn.peer_name
                if not e.connection_usable:
                    conn.abort()  # the session is in an unknown state: never reuse it
                    conn = None
            outcomes = dict.fromkeys(work.addresses, _Outcome.from_client_error(e))
        except DNSError as e:
            outcomes = dict.fromkeys(work.addresses, _Outcome.from_dns_error(e))
        except _Loop as e:
            outcomes = dict.fromkeys(work.addresses, _Outcome(450, "4.4.6", str(e)))
        except _UnreadableBody as e:
            # A local temporary failure (RFC 3463 4.3.0): retried, and bounced as 5.3.0 once
            # max_lifetime is reached, like any other temporary failure.
            outcomes = dict.fromkeys(work.addresses, _Outcome(451, "4.3.0", str(e)))
        return conn, outcomes

    async def _send(self, conn: SMTPClientConnection, entry: QueueEntry, work: _Work) -> Any:
        upcoming = [w.entry_id for w in itertools.islice(self._queues.get(work.domain, ()), _BodiesAhead.COUNT)]
        body = await self._bodies.open(entry.id, upcoming)
        try:
            return await conn.send(
                entry.sender,
                work.addresses,
                body,
                size=entry.size,
                eight_bit=entry.eight_bit,
                smtputf8=entry.smtputf8,
            )
        finally:
            body.close()

    async def _open(self, domain: str) -> SMTPClientConnection:
        """Connect to the first MX host (or the smarthost) that answers well."""
        relay = self.config.relay
        smarthost: dict[str, Any] = {}
        if relay.smarthost:
            host, port = relay.smarthost
            hosts = [MXHost(host, 0, await self._addresses(host))]
            # RFC 8314 §3: port 465 (submissions) speaks TLS from the first byte.
            smarthost = {"auth": self._smarthost_auth, "implicit_tls": port == 465}
        else:
            port = relay.port
            hosts = _below_myself(await self.resolver.mx_hosts(domain), self.config.hostname)
            if not hosts:
                # RFC 5321 §5.1: we are the best MX for a domain that is not ours.
                raise _Loop(f"mail for {domain} loops back to myself (I am its best MX host)")
        last: SMTPClientError | None = None
        for mx in hosts:
            for address in mx.addresses:
                try:
                    conn = await self._connect(
                        self.reactor,
                        address,
                        port,
                        helo=self.config.hostname,
                        tls=relay.tls,
                        tls_hostname=mx.name,
                        trust_root=self.trust_root,
                        timeouts=self.timeouts,
                        **smarthost,
                    )
                except SMTPClientError as e:
                    e.peer = f"{mx.name}[{address}]"
                    log.info(
                        "could not use {host}[{address}] for {domain}: {error}",
                        host=mx.name, address=address, domain=domain, error=str(e),
                    )
                    # Keep the most telling error: one from a host that answered (greeting,
                    # EHLO, TLS) beats a later "connection refused".
                    if last is None or last.stage in ("connect", "timeout"):
                        last = e
                    continue
                greeting_name = (conn.peer_name or "").split()[0].lower() if conn.peer_name else ""
                if greeting_name and greeting_name == self.config.hostname.lower():
                    conn.abort()
                    raise _Loop(f"mail for {domain} loops back to myself ({mx.name} greeted me with my own name)")
                return conn
        if last is not None:
            raise last
        raise TemporaryDNSError(f"no usable MX host for {domain}")

    async def _addresses(self, host: str) -> tuple[str, ...]:
        if _is_ip(host):
            return (host,)
        return await self.resolver.addresses(host)

    # -- outcomes --------------------------------------------------------------------

    def _merge(self, entry_id: str, outcomes: dict[str, _Outcome]) -> QueueEntry | None:
        """Apply one part's outcomes to the authoritative entry, by recipient, at once.

        Only recipients still pending change: a recipient another part (or an earlier
        attempt) delivered or failed is never set back.
        """
        entry = self.entries.get(entry_id)
        if entry is None or not outcomes:
            return entry
        now = self.now()
        expired = now - entry.arrival >= self.config.relay.max_lifetime
        failed: list[RecipientState] = []
        delivered: list[str] = []
        deferred: list[RecipientState] = []

        def apply(r: RecipientState) -> RecipientState:
            o = outcomes.get(r.address)
            if o is None or r.status != PENDING:
                return r
            peer = o.peer or None
            if o.code < 400:  # the common case
                delivered.append(r.address)
                return r.delivered(o.code, o.enhanced, peer)
            r = r._replace(last_code=o.code, last_enhanced=o.enhanced, last_error=o.text, remote_mta=peer)
            if o.code >= 500:
                r = r._replace(status=FAILED)
                failed.append(r)
            elif expired:
                text = f"gave up after {_days(self.config.relay.max_lifetime)}: {o.text}"
                r = r._replace(status=FAILED, last_enhanced="5" + o.enhanced[1:], last_error=text)
                failed.append(r)
            else:
                deferred.append(r)
            return r

        entry = self._update(entry_id, apply)
        _log_outcomes(entry_id, delivered, deferred, failed, now)
        return entry

    async def _settle(self, entry_id: str, attempted: frozenset[str]) -> None:
        """After the last part of an attempt: the delay warning if due, the bounce owed,
        the removal of a finished entry. Runs once per attempt."""
        entry = self.entries.get(entry_id)
        if entry is None:
            return
        now = self.now()
        deferred = [r for r in entry.recipients if r.status == PENDING and r.address in attempted]
        if (
            deferred
            and not entry.delay_warned
            and self.config.relay.delay_warning is not None
            and now - entry.arrival >= self.config.relay.delay_warning
            and entry.sender != ""
            and entry.kind == Kind.MESSAGE
        ):
            await self._notify(entry, deferred, delay=True)
            if entry_id in self.entries:
                entry = self.entries[entry_id] = replace(self.entries[entry_id], delay_warned=True)
                if not entry.owed:
                    await self._save(entry_id)
        await self._bounce_owed(entry_id)

    async def _bounce_owed(self, entry_id: str) -> None:
        """Send the bounces owed (recipients FAILED), mark them BOUNCED, drop a finished entry.

        The owed state is on disk before the bounce is made, so a crash in between sends
        the bounce after the restart (`_loaded`) rather than losing it.
        """
        entry = self.entries.get(entry_id)
        if entry is None:
            return
        owed = entry.owed
        if owed:
            try:
                await self._notify(entry, owed, delay=False)
            except Exception:
                # Still owed on disk: the next start-up tries again.
                log.failure("could not store the bounce for {msgid}; will retry at restart", msgid=entry_id)
                return
            done = {r.address for r in owed}
            entry = self._update(entry_id, lambda r: r._replace(status=BOUNCED) if r.address in done else r)
            if entry is None:
                return  # deleted by the operator meanwhile
        if not entry.pending:
            self.entries.pop(entry_id, None)
            await self.delivery.remove_queue_entry(entry_id)
        elif owed:
            await self._save(entry_id)

    def _save(self, entry_id: str) -> Deferred[None]:
        """Persist the entry's current state, unless the operator deleted it meanwhile.
        (The committer keeps saves and the removal of one id in submission order.)"""
        entry = self.entries.get(entry_id)
        if entry is None:
            return succeed(None)
        return self.delivery.save_queue_entry(entry).addCallback(lambda _: None)

    async def _notify(self, entry: QueueEntry, recipients: Sequence[RecipientState], *, delay: bool) -> None:
        """A failure or delay DSN to the sender; failed bounces go to the postmaster once."""
        if entry.kind == Kind.DOUBLE_BOUNCE:
            log.error("dropped a failed notice to the postmaster ({msgid})", msgid=entry.id)
            return
        if entry.sender == "" and entry.kind == Kind.MESSAGE:
            log.info("no bounce for {msgid}: the sender is <>", msgid=entry.id)
            return
        to = self.config.postmaster if entry.kind == Kind.BOUNCE else entry.sender
        kind = Kind.DOUBLE_BOUNCE if entry.kind == Kind.BOUNCE else Kind.BOUNCE
        original = await deferToThreadPool(self.reactor, self.pool, _read_head, self.spool.body_path(entry.id))
        statuses = [
            dsn.RecipientStatus(
                recipient=r.address,
                original_recipient=r.original if r.original and r.original != r.address else None,
                action="delayed" if delay else "failed",
                status=r.last_enhanced or ("4.0.0" if delay else "5.0.0"),
                diagnostic=r.last_error,
                remote_mta=(r.remote_mta or "").split("[")[0] or None,
                last_attempt=self.now(),
                will_retry_until=entry.arrival + self.config.relay.max_lifetime if delay else None,
            )
            for r in recipients
        ]
        make = dsn.delay_notice if delay else dsn.failure_notice
        notice = make(
            reporting_mta=self.config.hostname,
            original_sender=to,
            recipients=statuses,
            original=original,
            queue_id=entry.id,
            arrival=entry.arrival,
            now=time.time(),
            postmaster=self.config.postmaster,
        )
        try:
            rcpt = parse_address(to)
            destinations = self.router.resolve(rcpt, may_relay=True)
        except (AddressError, Reply) as e:
            log.error("cannot send a notice for {msgid} to <{to}>: {error}", msgid=entry.id, to=to, error=str(e))
            return
        await self.delivery.submit_generated(new_message_id(), "", rcpt, destinations, notice.message, kind)


class _Loop(Exception):
    """The destination would deliver back to us."""


def _outcomes(result: Any, addresses: Sequence[str], peer: str) -> dict[str, _Outcome]:
    """Each recipient's outcome of one transaction. The recipients the final 250 covers share
    its reply object, so a fan-out makes one `_Outcome` for them all."""
    made: dict[int, _Outcome] = {}
    out = {}
    for a in addresses:
        reply = result.outcome(a)
        o = made.get(id(reply))
        if o is None:
            o = made[id(reply)] = _Outcome.from_reply(reply, peer)
        out[a] = o
    return out


def _log_outcomes(
    msgid: str, delivered: list[str], deferred: list[RecipientState], failed: list[RecipientState], now: float
) -> None:
    """One event per outcome kind per attempt (not per recipient: a fan-out stays readable)."""
    if delivered:
        log.info("delivered {msgid} to {rcpts}", msgid=msgid, rcpts=",".join(delivered), rcpt=delivered)
    if deferred:
        r = deferred[0]
        log.info(
            "deferred {msgid} to {rcpts}: {error} (attempt {attempt}, next in {delay:.0f}s)",
            msgid=msgid, rcpts=",".join(d.address for d in deferred), rcpt=[d.address for d in deferred],
            error=r.last_error, code=r.last_code, attempt=r.attempts, delay=r.next_attempt - now,
        )
    for r in failed:
        log.info("bounced {msgid} to {rcpt}: {error}", msgid=msgid, rcpt=r.address, error=r.last_error, code=r.last_code)


def _below_myself(hosts: list[MXHost], hostname: str) -> list[MXHost]:
    """RFC 5321 §5.1: if we are one of the MX hosts, only better-preferred hosts may be used."""
    mine = [mx.preference for mx in hosts if mx.name.lower() == hostname.lower()]
    if not mine:
        return hosts
    return [mx for mx in hosts if mx.preference < min(mine)]


def _days(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} seconds"


def _enhanced(e: SMTPClientError) -> str:
    if e.reply is not None and e.reply.enhanced:
        return e.reply.enhanced
    if e.stage == "size":
        return "5.3.4"
    if e.stage in ("tls", "starttls"):
        return "4.7.5" if e.temporary else "5.7.5"
    if e.stage == "auth":  # RFC 4954 §6
        return "4.7.0" if e.temporary else "5.7.8"
    return "4.4.1" if e.temporary else "5.0.0"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _read_head(path: Any, limit: int = 256 * 1024) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError:
        return b""

