"""The single door into storage: every accepted message goes through `Delivery.commit`.

Local recipients get a copy in their Maildir (trace headers + the client's bytes); remote
recipients share one entry in the relay queue. `commit` fires only after everything is
fsynced, and only then may the caller say 250; then the relay is told of the new entry.

Invariants:
- Disk work runs in the disk thread pool, never on the reactor thread.
- Concurrent commits are grouped (group commit, `mx.commit`): while one batch is on disk
  the next requests wait and go together, so directory fsyncs and thread hand-offs are
  shared; work for one queue id is never in two batches at once.
- After a commit: the relay hears of a new queue entry (`on_queued`) and readers of the
  mailboxes that got a copy hear of it (`on_delivered`, e.g. IMAP IDLE sessions).
- A message being received is kept in memory up to `SPILL_THRESHOLD` (and while all
  messages together stay within `MEMORY_BUDGET`) and streamed to a file under
  `<data_dir>/tmp/` beyond it, so a large message never sits whole in memory. The spill file
  is created, written and removed in the disk pool, in order, with at most `SPILL_BACKLOG`
  bytes per message waiting for the disk; `commit` is called only after `flushed()`.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx import maildir
from mx.address import Address, parse_address
from mx.commit import GroupCommitter, QueueRemove, QueueUpdate, QueueWrite
from mx.config import Config
from mx.durable import unlink_quietly
from mx.routing import Destination, LocalRecipient
from mx.spool import Kind, QueueEntry, RecipientState, Spool

__all__ = ["IncomingMessage", "Envelope", "Delivery", "MemoryBudget", "new_message_id"]

log = Logger()

SPILL_THRESHOLD = 1 << 20  # bytes of one message kept in memory before it is streamed to disk
SPILL_PREFIX = "incoming."  # spill files: <data_dir>/tmp/incoming.<run>.*
# This process's spill files carry its own token, so the start-up clean-up (which runs in the
# disk pool while the listeners already take mail) never removes a file this run is writing.
_RUN_PREFIX = f"{SPILL_PREFIX}{os.urandom(4).hex()}."
SPILL_BACKLOG = 1 << 20  # bytes of one message handed to the disk pool, not yet written: then the sender waits
MEMORY_BUDGET = 64 << 20  # in-memory message bytes, all connections together; beyond it messages spill early

class _IdSource:
    """Queue ids: unique without the pid (containers all run as pid 1) and without trusting
    the clock (it may step back across a restart, or within one run).

    An id is the time in milliseconds (never going backwards within a process), a counter,
    and 40 random bits drawn from a generator seeded by the OS at start-up: two processes,
    or two runs with a clock that stepped back, collide only if 40 random bits do, and even
    then the queue publishes new records with link(), which refuses an existing name.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._random = random.Random(os.urandom(16))
        self._last = 0
        self._count = itertools.count()

    def __call__(self) -> str:
        self._last = max(self._last, int(self._clock() * 1000))
        return f"{self._last:011X}{next(self._count) & 0xFFF:03X}{self._random.getrandbits(40):010X}"


new_message_id = _IdSource()  # a short unique, roughly time-ordered id for logs, Received headers, the queue


def remove_spilled(spill_dir: Path) -> int:
    """Delete spill files left by a previous run (in a disk thread, at start-up); never one
    of this run's."""
    removed = 0
    try:
        names = os.listdir(spill_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(SPILL_PREFIX) and not name.startswith(_RUN_PREFIX):
            unlink_quietly(spill_dir / name)
            removed += 1
    return removed


class MemoryBudget:
    """Bytes of incoming messages held in memory, over all connections (`MEMORY_BUDGET`).

    A message that cannot take its next chunk from the budget spills to disk, even below
    `SPILL_THRESHOLD`: 5,000 clients cannot pin 5 GiB between them.
    """

    def __init__(self, limit: int = MEMORY_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, self.used


class _Job(Enum):
    WRITE = "write"
    CLOSE = "close"
    REMOVE = "remove"


class _SpillFile:
    """The spill file itself; every method runs in a disk-pool thread, one at a time."""

    def __init__(self, spill_dir: Path) -> None:
        self.dir = spill_dir
        self.file: Any = None
        self.path: Path | None = None

    def write(self, chunks: list[bytes]) -> Path:
        if self.path is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=_RUN_PREFIX, dir=self.dir)
            self.path = Path(name)
            self.file = os.fdopen(fd, "wb", buffering=0)  # our chunks are large: no second buffer
        for chunk in chunks:
            self.file.write(chunk)
        return self.path

    def close(self) -> None:
        """No fsync: the copies made from this file are fsynced, the file itself never is."""
        if self.file is not None:
            self.file.close()
            self.file = None

    def remove(self) -> None:
        self.close()
        if self.path is not None:
            unlink_quietly(self.path)
            self.path = None


class IncomingMessage:
    """The body of a message while it arrives: chunks in memory, spilled to a file if large.

    A message made with a disk pool (`Delivery.new_message(stream=True)`) spills once it
    passes `SPILL_THRESHOLD` or the shared `MemoryBudget` is used up. The file is created,
    written, closed and removed in the disk pool, one job at a time per message (writes stay
    in order; queued chunks are batched into one job). Then:

    - `write(data)` returns None, or a Deferred when more than `SPILL_BACKLOG` bytes wait for
      the disk: the caller stops feeding (pauses its transport) until it fires.
    - `flushed()` fires when every byte is in the closed file (or fails with the write
      error); only then may `Delivery.commit` read `path`. `finish()` is then a no-op.
    - `discard()` forgets the bytes and removes the file (in the pool); its Deferred fires
      when the file is gone. It may be called at any time, more than once.

    Without a pool (a message mx wrote itself, already whole in memory) nothing spills and
    everything above is synchronous.
    """

    def __init__(
        self,
        spill_dir: Path,
        *,
        reactor: IReactorFromThreads | None = None,
        pool: ThreadPool | None = None,
        budget: MemoryBudget | None = None,
    ) -> None:
        self._spill_dir = spill_dir
        self._reactor = reactor
        self._pool = pool if reactor is not None else None
        self._budget = budget
        self._chunks: list[bytes] = []
        self._size = 0
        self._held = 0  # bytes of _chunks taken from the budget
        self.path: Path | None = None  # the spill file, once its first write is done
        # spilling: everything below is only used once the message goes to disk
        self._disk: _SpillFile | None = None
        self._queue: list[bytes] = []
        self._backlog = 0  # bytes queued or being written
        self._in_flight = False
        self._want_close = False
        self._closed = False
        self._want_remove = False
        self._removed = False
        self._error: Failure | None = None
        self._drain_waiters: list[Deferred[None]] = []
        self._flush_waiters: list[Deferred[None]] = []
        self._remove_waiters: list[Deferred[None]] = []

    @property
    def size(self) -> int:
        return self._size

    @property
    def spilled(self) -> bool:
        return self._disk is not None

    @property
    def backlog(self) -> int:
        """Bytes handed to the disk pool and not yet written."""
        return self._backlog

    def write(self, data: bytes) -> Deferred[None] | None:
        if not data or self._want_remove:
            return None
        self._size += len(data)
        if self._disk is None:
            if self._pool is None or (
                self._size <= SPILL_THRESHOLD and (self._budget is None or self._budget.take(len(data)))
            ):
                self._chunks.append(data)
                self._held += len(data) if self._pool is not None else 0
                return None
            # Spill: what is in memory goes to the disk first, then everything else.
            self._disk = _SpillFile(self._spill_dir)
            self._queue, self._chunks = self._chunks, []
            self._backlog = self._size - len(data)
            self._give_back()
        if self._error is not None:
            return None  # the write failed; the error is reported by flushed()
        self._queue.append(data)
        self._backlog += len(data)
        self._kick()
        if self._backlog > SPILL_BACKLOG:
            d: Deferred[None] = Deferred()
            self._drain_waiters.append(d)
            return d
        return None

    def flushed(self) -> Deferred[None]:
        """Fires when the whole message is on disk and the file closed (at once if it never
        spilled); fails with the disk error if a write failed."""
        if self._disk is None:
            return defer.succeed(None)
        if self._error is not None:
            return defer.fail(self._error)
        if self._want_remove:
            return defer.fail(RuntimeError("message discarded"))
        self._want_close = True
        if self._closed and not self._queue and not self._in_flight:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._flush_waiters.append(d)
        self._kick()
        return d

    def finish(self) -> None:
        """No more data. For a spilled message `flushed()` must have fired (`Delivery.commit`)."""
        if self._disk is not None and not (self._closed and not self._queue):
            raise RuntimeError("the spill file is still being written: wait for flushed() first")

    def in_memory(self) -> bytes | None:
        if self._disk is not None:
            return None
        if len(self._chunks) != 1:
            # Joined once and kept: mail authentication and the commit both read it.
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0]

    def discard(self) -> Deferred[None]:
        """Forget the message; fires when its spill file (if any) is removed."""
        self._chunks = []
        self._give_back()
        if self._disk is None or self._removed:
            return defer.succeed(None)
        if not self._want_remove:
            self._want_remove = True
            self._queue, self._backlog = [], (self._backlog if self._in_flight else 0)
            self._wake(self._drain_waiters)
            failure = Failure(RuntimeError("message discarded"))
            for w in self._take(self._flush_waiters):
                w.errback(failure)
            self._kick()
        d: Deferred[None] = Deferred()
        self._remove_waiters.append(d)
        return d

    # -- the disk jobs ---------------------------------------------------------------------

    def _give_back(self) -> None:
        if self._held and self._budget is not None:
            self._budget.give(self._held)
        self._held = 0

    @staticmethod
    def _take(waiters: list[Deferred[None]]) -> list[Deferred[None]]:
        taken = list(waiters)
        waiters.clear()
        return taken

    def _wake(self, waiters: list[Deferred[None]]) -> None:
        for w in self._take(waiters):
            w.callback(None)

    def _kick(self) -> None:
        """Start the next disk job unless one is running (one at a time keeps the order)."""
        disk = self._disk
        if self._in_flight or disk is None or self._removed:
            return
        n = 0
        if self._want_remove:
            job, fn, args = _Job.REMOVE, disk.remove, ()
        elif self._queue and self._error is None:
            chunks, self._queue = self._queue, []
            n = sum(len(c) for c in chunks)
            job, fn, args = _Job.WRITE, disk.write, (chunks,)
        elif self._want_close and not self._closed:
            job, fn, args = _Job.CLOSE, disk.close, ()
        else:
            return
        assert self._reactor is not None and self._pool is not None
        self._in_flight = True
        d = deferToThreadPool(self._reactor, self._pool, fn, *args)
        d.addBoth(self._job_done, job, n)

    def _job_done(self, result: object, job: _Job, n: int) -> None:
        self._in_flight = False
        if isinstance(result, Failure):
            if job is _Job.REMOVE:
                log.failure("could not remove spill file {path}", result, path=str(self.path))
            elif self._error is None:
                self._error = result
                self._queue = []
                self._backlog = n  # subtracted below: nothing is waiting any more
        if job is _Job.WRITE:
            self._backlog -= n
            if isinstance(result, Path):
                self.path = result
        elif job is _Job.CLOSE:
            self._closed = True
        elif job is _Job.REMOVE:
            self._removed = True
            self.path = None
            self._wake(self._remove_waiters)
            return
        if self._backlog <= SPILL_BACKLOG or self._error is not None:
            self._wake(self._drain_waiters)
        if self._flush_waiters and self._error is not None:
            for w in self._take(self._flush_waiters):
                w.errback(self._error)
        elif self._flush_waiters and self._closed and not self._queue:
            self._wake(self._flush_waiters)
        self._kick()


@dataclass(frozen=True, slots=True)
class Envelope:
    msgid: str
    sender: Address | None
    recipients: tuple[tuple[Address, tuple[Destination, ...]], ...]  # as given -> where it goes
    helo: str
    peer_ip: str
    protocol: str  # "SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA" (RFC 3848), "local"
    auth_user: str | None = None
    kind: Kind = Kind.MESSAGE  # or a DSN we generate
    eight_bit: bool = False  # BODY=8BITMIME was given
    smtputf8: bool = False  # SMTPUTF8 was given
    # Mail authentication (mx.mailauth): headers that go right below our trace headers (an
    # Authentication-Results inbound, DKIM-Signatures on submitted mail); `junk` files local
    # copies into each recipient's .Junk folder (DMARC quarantine); `body` replaces the
    # received octets (forged Authentication-Results removed).
    added_headers: bytes = b""
    junk: bool = False
    body: bytes | None = None


def _ip_literal(ip: str) -> str:
    return f"IPv6:{ip}" if ":" in ip else ip


def trace_headers(
    config: Config, env: Envelope, rcpt: Address | str | None, when: float, *, return_path: bool
) -> bytes:
    """An RFC 5321 §4.4 `Received:` header (and `Return-Path:` for final delivery).

    `for <rcpt>` is written only for a single recipient, so a copy never shows who else
    (a Bcc, say) received the message.
    """
    date = email.utils.formatdate(when, localtime=True)
    lines = []
    if return_path:
        lines.append(f"Return-Path: <{env.sender or ''}>\r\n")
    if env.peer_ip:
        helo = "".join(c if c.isprintable() and c not in "()" else "?" for c in env.helo) or "unknown"
        lines.append(f"Received: from {helo} ([{_ip_literal(env.peer_ip)}])\r\n")
        if env.auth_user and config.auth.authenticated_header:
            # Opt-in (auth.authenticated_header), as Postfix's smtpd_sasl_authenticated_header:
            # the login is the user's business, the ESMTPA protocol name says enough (RFC 3848).
            lines.append(f"\t(authenticated as {env.auth_user})\r\n")
        lines.append(f"\tby {config.hostname}")
    else:
        lines.append(f"Received: by {config.hostname}")  # generated here (a DSN)
    lines.append(f" (mx) with {env.protocol} id {env.msgid}")
    if rcpt is not None:
        lines.append(f"\r\n\tfor <{rcpt}>")
    lines.append(f"; {date}\r\n")
    return "".join(lines).encode("utf-8")


JUNK_FOLDER = ".Junk"  # Maildir++ folder of DMARC-quarantined mail (RFC 6154 \\Junk)


class Delivery:
    """Puts accepted messages into storage, durably, and says when it is done."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pool: ThreadPool,
        spool: Spool | None = None,
        on_queued: Callable[[QueueEntry], None] | None = None,
        on_delivered: Callable[[tuple[LocalRecipient, ...]], None] | None = None,
        memory_budget: int = MEMORY_BUDGET,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self._mail_root = config.data_dir / "mail"
        self._spool = spool
        self._on_queued = on_queued
        self.on_delivered = on_delivered  # readers (IMAP IDLE, POP3) of these mailboxes wake up
        self._committer = GroupCommitter(reactor, pool, spool)
        self.spill_dir = config.data_dir / "tmp"
        self._pool = pool
        self.memory = MemoryBudget(memory_budget)  # shared by every message being received
        self._paths: dict[LocalRecipient, Path] = {}

    def _mailbox_path(self, dest: LocalRecipient) -> Path:
        path = self._paths.get(dest)
        if path is None:
            path = self._paths[dest] = maildir.mailbox_path(self._mail_root, dest.domain, dest.local)
        return path

    def new_message(self, *, stream: bool = False) -> IncomingMessage:
        """A message to fill with `write`. `stream=True` for one arriving from a client: it
        may spill to disk (in the disk pool) and must be `flushed()` before `commit`.
        Without it, a message mx already has whole in memory (a DSN): never spills."""
        if not stream:
            return IncomingMessage(self.spill_dir)
        return IncomingMessage(self.spill_dir, reactor=self._reactor, pool=self._pool, budget=self.memory)

    def accepts_remote(self) -> bool:
        """Whether remote recipients can be taken (the relay queue exists)."""
        return self._spool is not None

    def commit(self, env: Envelope, message: IncomingMessage) -> Deferred[list[Path]]:
        """Store the message for every recipient; fires when all copies are durable.

        Local recipients get a Maildir copy each, remote ones share one queue entry. A plain
        Deferred chain rather than a coroutine: this runs once per message on the reactor
        thread, and the coroutine machinery costs more than the work here.
        """
        message.finish()
        body: bytes | Path | None = env.body if env.body is not None else message.in_memory()
        if body is None:
            body = message.path
        now = time.time()
        job: list[maildir.Delivery | QueueWrite] = []
        local: dict[LocalRecipient, Address] = {}
        remote: dict[str, RecipientState] = {}
        for rcpt, destinations in env.recipients:
            for dest in destinations:
                if isinstance(dest, LocalRecipient):
                    local.setdefault(dest, rcpt)  # one copy per mailbox, even if two RCPTs reach it
                else:
                    address = str(dest.address)
                    remote.setdefault(address, RecipientState(address=address, original=str(rcpt)))
        for dest, rcpt in local.items():
            folder = self._mailbox_path(dest)
            job.append(
                maildir.Delivery(
                    maildir=folder / JUNK_FOLDER if env.junk else folder,
                    header=trace_headers(self._config, env, rcpt, now, return_path=True) + env.added_headers,
                    body=body if isinstance(body, bytes) else None,
                    body_file=body if isinstance(body, Path) else None,
                )
            )
        entry: QueueEntry | None = None
        if remote:
            if self._spool is None:
                raise RuntimeError("remote recipients need the relay queue")
            only = next(iter(remote.values())).original if len(remote) == 1 else None
            header = trace_headers(self._config, env, only, now, return_path=False) + env.added_headers
            entry = QueueEntry(
                id=env.msgid,
                sender=str(env.sender or ""),
                arrival=now,
                recipients=tuple(remote.values()),
                size=len(header) + (len(env.body) if env.body is not None else message.size),
                kind=env.kind,
                eight_bit=env.eight_bit,
                smtputf8=env.smtputf8,
                peer=env.peer_ip,
            )
            job.append(QueueWrite(entry, (header, body)))
        size = message.size

        def stored(files: list[Path]) -> list[Path]:
            message.discard()
            # One event per message: for local mail, accepting and delivering are one act.
            log.info(
                "accepted {msgid} size={size} delivered to {mailboxes} queued for {queued}",
                msgid=env.msgid,
                sender=str(env.sender or ""),
                recipients=[str(r) for r, _d in env.recipients],
                mailboxes=",".join(str(d) for d in local) or "-",
                junk=env.junk,
                queued=",".join(remote) or "-",
                size=size,
                peer=env.peer_ip,
                protocol=env.protocol,
            )
            if entry is not None and self._on_queued is not None:
                self._on_queued(entry)
            if local and self.on_delivered is not None:
                self.on_delivered(tuple(local))
            return files

        def failed(failure: Failure) -> Failure:
            message.discard()
            return failure

        return self._committer.submit(job).addCallbacks(stored, failed)

    def hold_until(self, d: Deferred[Any]) -> None:
        """Store nothing before `d` fires (the queue's start-up load): commits wait for it."""
        self._committer.hold_until(d)

    def save_queue_entry(self, entry: QueueEntry) -> Deferred[list[Path]]:
        """Persist a relay-queue state change (grouped with other disk work)."""
        return self._committer.submit([QueueUpdate(entry)])

    def remove_queue_entry(self, entry_id: str) -> Deferred[list[Path]]:
        """Delete a finished relay-queue entry, durably."""
        return self._committer.submit([QueueRemove(entry_id)])

    def submit_generated(
        self, msgid: str, sender: str, recipient: Address, destinations: tuple[Destination, ...], data: bytes, kind: Kind
    ) -> Deferred[list[Path]]:
        """Store a message mx wrote itself (a DSN) like any other: the same door."""
        message = self.new_message()
        message.write(data)
        env = Envelope(
            msgid=msgid,
            sender=parse_address(sender) if sender else None,
            recipients=((recipient, destinations),),
            helo=self._config.hostname,
            peer_ip="",
            protocol="local",
            kind=kind,
            eight_bit=True,
            smtputf8=not str(recipient).isascii(),
        )
        return self.commit(env, message)
