"""The single door into storage: every accepted message goes through `Delivery.commit`.

Local recipients get a copy in their Maildir (trace headers + the client's bytes); remote
recipients share one entry in the relay queue. `commit` fires only after everything is
fsynced, and only then may the caller say 250; then the relay is told of the new entry.

Invariants:
- Disk work runs in the disk thread pool, never on the reactor thread.
- Concurrent commits are grouped (group commit): while one batch is on disk the next
  requests wait and go together, so directory fsyncs and thread hand-offs are shared.
- A message being received is kept in memory up to `SPILL_THRESHOLD` and streamed to a
  file under `<data_dir>/tmp/` beyond it, so a large message never sits whole in memory.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx import maildir
from mx.address import Address, parse_address
from mx.config import Config
from mx.durable import Staged, discard, fsync_dir, publish, unlink_quietly
from mx.durable import sync as durable_sync
from mx.routing import Destination, LocalRecipient
from mx.spool import QueueEntry, RecipientState, Spool

__all__ = ["IncomingMessage", "Envelope", "Delivery", "GroupCommitter", "new_message_id"]

log = Logger()

# Batches on disk at once. Measured (benchmarks/smtp_accept.py, 4 KiB, C=10/50): 1 -> 907/1063
# msg/s, 2 -> 1056/1122 with the lowest p99, 4 -> 993/1078 with p99 128 ms: more parallel
# batches group fewer messages each and cost more thread trips.
MAX_BATCHES = 2
SPILL_THRESHOLD = 1 << 20
SPILL_PREFIX = "incoming."  # bytes kept in memory before a message is streamed to disk

_ids = itertools.count()


def new_message_id() -> str:
    """A short unique, roughly time-ordered id for logs, Received headers and the queue."""
    return f"{int(time.time() * 1000):x}{os.getpid() & 0xFFFF:04x}{next(_ids) & 0xFFFFF:05x}".upper()


def remove_spilled(spill_dir: Path) -> int:
    """Delete spill files left by a previous run (in a disk thread, at start-up)."""
    removed = 0
    try:
        names = os.listdir(spill_dir)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(SPILL_PREFIX):
            unlink_quietly(spill_dir / name)
            removed += 1
    return removed


class IncomingMessage:
    """The body of a message while it arrives: chunks in memory, spilled to a file if large."""

    def __init__(self, spill_dir: Path) -> None:
        self._spill_dir = spill_dir
        self._chunks: list[bytes] = []
        self._size = 0
        self._file: Any = None
        self.path: Path | None = None

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._size += len(data)
        if self._file is not None:
            self._file.write(data)
            return
        self._chunks.append(data)
        if self._size > SPILL_THRESHOLD:
            self._spill()

    def _spill(self) -> None:
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=SPILL_PREFIX, dir=self._spill_dir)
        self._file = os.fdopen(fd, "wb", buffering=1 << 20)
        self.path = Path(name)
        for chunk in self._chunks:
            self._file.write(chunk)
        self._chunks = []

    def finish(self) -> None:
        """No more data: flush the spill file (the copies, not this file, are fsynced)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def in_memory(self) -> bytes | None:
        return b"".join(self._chunks) if self.path is None else None

    def discard(self) -> None:
        self.finish()
        self._chunks = []
        if self.path is not None:
            unlink_quietly(self.path)
            self.path = None


@dataclass(frozen=True, slots=True)
class Envelope:
    msgid: str
    sender: Address | None
    recipients: tuple[tuple[Address, tuple[Destination, ...]], ...]  # as given -> where it goes
    helo: str
    peer_ip: str
    protocol: str  # "SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA" (RFC 3848), "local"
    auth_user: str | None = None
    kind: str = "message"  # "message", or "bounce"/"double-bounce" for DSNs we generate
    eight_bit: bool = False  # BODY=8BITMIME was given
    smtputf8: bool = False  # SMTPUTF8 was given


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
        if env.auth_user:
            lines.append(f"\t(authenticated as {env.auth_user})\r\n")
        lines.append(f"\tby {config.hostname}")
    else:
        lines.append(f"Received: by {config.hostname}")  # generated here (a DSN)
    lines.append(f" (mx) with {env.protocol} id {env.msgid}")
    if rcpt is not None:
        lines.append(f"\r\n\tfor <{rcpt}>")
    lines.append(f"; {date}\r\n")
    return "".join(lines).encode("utf-8")


@dataclass(frozen=True, slots=True)
class QueueWrite:
    """A new relay-queue entry with the parts of its message file."""

    entry: QueueEntry
    parts: tuple[bytes | Path, ...]


@dataclass(frozen=True, slots=True)
class QueueUpdate:
    """A new state for an existing relay-queue entry."""

    entry: QueueEntry


@dataclass(frozen=True, slots=True)
class QueueRemove:
    """A finished relay-queue entry to delete."""

    entry_id: str


Job = Sequence[maildir.Delivery | QueueWrite | QueueUpdate | QueueRemove]


def commit_batch(jobs: Sequence[Job], known: set[Path], spool: Spool | None) -> list[BaseException | list[Path]]:
    """Store several messages at once (group commit), in a disk thread; one result per job.

    Each job (all the copies of one message) succeeds as a whole (the published paths) or
    fails as a whole (the exception; everything it wrote removed). Phases: write every file,
    fsync every file (the first fsync commits the file system journal for all of them, so
    the others cost little), rename them into place, fsync each folder once.
    """
    results: list[BaseException | list[Path]] = [[] for _ in jobs]
    staged: list[list[Staged]] = [[] for _ in jobs]
    folders: list[set[Path]] = [set() for _ in jobs]
    removals: list[list[str]] = [[] for _ in jobs]
    for i, job in enumerate(jobs):
        try:
            for item in job:
                if isinstance(item, maildir.Delivery):
                    staged[i].append(maildir.stage_copy(item, known))
                    continue
                assert spool is not None, "queue work needs the spool"
                if isinstance(item, QueueWrite):
                    staged[i].extend(spool.stage_new(item.entry, item.parts))
                elif isinstance(item, QueueUpdate):
                    staged[i].append(spool.stage_update(item.entry))
                else:
                    removals[i].append(item.entry_id)  # after every rename: see below
        except Exception as e:  # noqa: BLE001 - one job's disk error must not fail the batch
            results[i] = e
    for phase in (durable_sync, publish):
        for i, job in enumerate(jobs):
            if isinstance(results[i], BaseException):
                continue
            try:
                folders[i] |= phase(staged[i]) or set()
            except Exception as e:  # noqa: BLE001
                results[i] = e
    # Removals last, so a state update earlier in the batch cannot bring a removed entry back.
    for i, ids in enumerate(removals):
        if ids and spool is not None and not isinstance(results[i], BaseException):
            for entry_id in ids:
                spool.unlink_entry(entry_id)
            folders[i].add(spool.root)
    bad: dict[Path, BaseException] = {}
    for folder in set().union(*folders):
        try:
            fsync_dir(folder)
        except OSError as e:
            bad[folder] = e
    for i, job in enumerate(jobs):
        hit = next((bad[f] for f in folders[i] if f in bad), None)
        if hit is not None:
            results[i] = hit
        if isinstance(results[i], BaseException):
            _undo(job, staged[i], known, spool)
        else:
            results[i] = [s.final for s in staged[i]]
    return results


def _undo(job: Job, staged: Sequence[Staged], known: set[Path], spool: Spool | None) -> None:
    discard(staged)
    for item in job:
        if isinstance(item, QueueWrite) and spool is not None:
            unlink_quietly(spool.body_path(item.entry.id))
        elif isinstance(item, maildir.Delivery):
            known.discard(item.maildir)


class GroupCommitter:
    """Runs `commit_batch` in the disk pool, all waiting jobs together per thread trip."""

    def __init__(self, reactor: Any, pool: ThreadPool, spool: Spool | None, max_batches: int = MAX_BATCHES) -> None:
        self._reactor = reactor
        self._pool = pool
        self._spool = spool
        self._max_batches = max_batches
        self._running = 0
        self._pending: list[tuple[Job, Deferred[list[Path]]]] = []
        self._known: set[Path] = set()

    def submit(self, job: Job) -> Deferred[list[Path]]:
        d: Deferred[list[Path]] = Deferred()
        self._pending.append((job, d))
        self._kick()
        return d

    def _kick(self) -> None:
        while self._pending and self._running < self._max_batches:
            batch, self._pending = self._pending, []
            self._running += 1
            jobs = [job for job, _d in batch]
            waiting = [d for _job, d in batch]
            try:
                run = deferToThreadPool(self._reactor, self._pool, commit_batch, jobs, self._known, self._spool)
            except Exception:
                # e.g. the pool is stopped: every waiting client must still get its 451
                self._done(Failure(), waiting)
                return
            run.addBoth(self._done, waiting)

    def _done(self, results: list[Any] | Failure, waiting: list[Deferred[list[Path]]]) -> None:
        self._running -= 1
        for i, d in enumerate(waiting):
            if isinstance(results, Failure):
                d.errback(results)
            elif isinstance(results[i], BaseException):
                d.errback(Failure(results[i]))
            else:
                d.callback(results[i])
        self._kick()


class Delivery:
    """Puts accepted messages into storage, durably, and says when it is done."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        pool: ThreadPool,
        spool: Spool | None = None,
        on_queued: Callable[[QueueEntry], None] | None = None,
    ) -> None:
        self._config = config
        self._reactor = reactor
        self._mail_root = config.data_dir / "mail"
        self._spool = spool
        self._on_queued = on_queued
        self._committer = GroupCommitter(reactor, pool, spool)
        self.spill_dir = config.data_dir / "tmp"
        self._paths: dict[LocalRecipient, Path] = {}

    def _mailbox_path(self, dest: LocalRecipient) -> Path:
        path = self._paths.get(dest)
        if path is None:
            path = self._paths[dest] = maildir.mailbox_path(self._mail_root, dest.domain, dest.local)
        return path

    def new_message(self) -> IncomingMessage:
        return IncomingMessage(self.spill_dir)

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
        body: bytes | Path | None = message.in_memory()
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
            job.append(
                maildir.Delivery(
                    maildir=self._mailbox_path(dest),
                    header=trace_headers(self._config, env, rcpt, now, return_path=True),
                    body=body if isinstance(body, bytes) else None,
                    body_file=body if isinstance(body, Path) else None,
                )
            )
        entry: QueueEntry | None = None
        if remote:
            if self._spool is None:
                raise RuntimeError("remote recipients need the relay queue")
            only = next(iter(remote.values())).original if len(remote) == 1 else None
            header = trace_headers(self._config, env, only, now, return_path=False)
            entry = QueueEntry(
                id=env.msgid,
                sender=str(env.sender or ""),
                arrival=now,
                recipients=tuple(remote.values()),
                size=len(header) + message.size,
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
                queued=",".join(remote) or "-",
                size=size,
                peer=env.peer_ip,
                protocol=env.protocol,
            )
            if entry is not None and self._on_queued is not None:
                self._on_queued(entry)
            return files

        def failed(failure: Failure) -> Failure:
            message.discard()
            return failure

        return self._committer.submit(job).addCallbacks(stored, failed)

    def save_queue_entry(self, entry: QueueEntry) -> Deferred[list[Path]]:
        """Persist a relay-queue state change (grouped with other disk work)."""
        return self._committer.submit([QueueUpdate(entry)])

    def remove_queue_entry(self, entry_id: str) -> Deferred[list[Path]]:
        """Delete a finished relay-queue entry, durably."""
        return self._committer.submit([QueueRemove(entry_id)])

    def submit_generated(
        self, msgid: str, sender: str, recipient: Address, destinations: tuple[Destination, ...], data: bytes, kind: str
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
