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
- A message being received is kept in memory up to `SPILL_THRESHOLD` and streamed to a
  file under `<data_dir>/tmp/` beyond it, so a large message never sits whole in memory.
"""

from __future__ import annotations

import email.utils
import itertools
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx import maildir
from mx.address import Address, parse_address
from mx.commit import GroupCommitter, QueueRemove, QueueUpdate, QueueWrite
from mx.config import Config
from mx.durable import unlink_quietly
from mx.routing import Destination, LocalRecipient
from mx.spool import QueueEntry, RecipientState, Spool

__all__ = ["IncomingMessage", "Envelope", "Delivery", "new_message_id"]

log = Logger()

SPILL_THRESHOLD = 1 << 20
SPILL_PREFIX = "incoming."  # bytes kept in memory before a message is streamed to disk

class _IdSource:
    """Queue ids: unique without the pid (containers all run as pid 1) and without trusting
    the clock (it may step back across a restart, or within one run).

    An id is the time in milliseconds (never going backwards within a process), a counter,
    and 40 random bits drawn from a generator seeded by the OS at start-up: two processes,
    or two runs with a clock that stepped back, collide only if 40 random bits do, and even
    then the queue publishes new records with link(), which refuses an existing name.
    """

    def __init__(self, clock: Callable[[], float] = time.time, seed: bytes | None = None) -> None:
        self._clock = clock
        self._random = random.Random(seed if seed is not None else os.urandom(16))
        self._last = 0
        self._count = itertools.count()

    def __call__(self) -> str:
        self._last = max(self._last, int(self._clock() * 1000))
        return f"{self._last:011X}{next(self._count) & 0xFFF:03X}{self._random.getrandbits(40):010X}"


new_message_id = _IdSource()  # a short unique, roughly time-ordered id for logs, Received headers, the queue


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
    ) -> None:
        self._config = config
        self._reactor = reactor
        self._mail_root = config.data_dir / "mail"
        self._spool = spool
        self._on_queued = on_queued
        self.on_delivered = on_delivered  # readers (IMAP IDLE, POP3) of these mailboxes wake up
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
            if local and self.on_delivered is not None:
                self.on_delivered(tuple(local))
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
