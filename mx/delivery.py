"""The single door into storage: every accepted message goes through `Delivery.commit`.

Local recipients get a copy in their Maildir (trace headers + the client's bytes); remote
recipients will go into the relay spool (until the relay lands, routing refuses them at
RCPT). `commit` fires only after everything is fsynced, and only then may the caller say 250.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx import maildir
from mx.address import Address
from mx.config import Config
from mx.routing import Destination, LocalRecipient, RemoteRecipient

__all__ = ["IncomingMessage", "Envelope", "Delivery", "GroupCommitter", "new_message_id"]

log = Logger()

SPILL_THRESHOLD = 1 << 20  # bytes kept in memory before a message is streamed to disk

_ids = itertools.count()


def new_message_id() -> str:
    """A short unique, roughly time-ordered id for logs, Received headers and the queue."""
    return f"{int(time.time() * 1000):x}{os.getpid() & 0xFFFF:04x}{next(_ids) & 0xFFFFF:05x}".upper()


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
        fd, name = tempfile.mkstemp(prefix="incoming.", dir=self._spill_dir)
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
            try:
                os.unlink(self.path)
            except OSError:
                pass
            self.path = None


@dataclass(frozen=True, slots=True)
class Envelope:
    msgid: str
    sender: Address | None
    recipients: tuple[tuple[Address, tuple[Destination, ...]], ...]  # as given -> where it goes
    helo: str
    peer_ip: str
    protocol: str  # "SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA" (RFC 3848)
    auth_user: str | None = None


def _ip_literal(ip: str) -> str:
    return f"IPv6:{ip}" if ":" in ip else ip


def trace_headers(config: Config, env: Envelope, rcpt: Address, when: float) -> bytes:
    """`Return-Path:` and an RFC 5321 §4.4 `Received:` header for one recipient's copy."""
    sender = str(env.sender) if env.sender is not None else ""
    date = email.utils.formatdate(when, localtime=True)
    helo = "".join(c if c.isprintable() and c not in "()" else "?" for c in env.helo) or "unknown"
    return (
        f"Return-Path: <{sender}>\r\n"
        f"Received: from {helo} ([{_ip_literal(env.peer_ip)}])\r\n"
        f"\tby {config.hostname} (mx) with {env.protocol} id {env.msgid}\r\n"
        f"\tfor <{rcpt}>; {date}\r\n"
    ).encode("utf-8")


class GroupCommitter:
    """Runs `maildir.deliver_batch` in the disk pool, several waiting jobs per thread trip."""

    def __init__(self, reactor: Any, pool: ThreadPool, max_batches: int = 4) -> None:
        self._reactor = reactor
        self._pool = pool
        self._max_batches = max_batches
        self._running = 0
        self._pending: list[tuple[Sequence[maildir.Delivery], Deferred[list[Path]]]] = []
        self._known: set[Path] = set()

    def submit(self, job: Sequence[maildir.Delivery]) -> Deferred[list[Path]]:
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
            run = deferToThreadPool(self._reactor, self._pool, maildir.deliver_batch, jobs, self._known)
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

    def __init__(self, config: Config, reactor: Any, pool: ThreadPool) -> None:
        self._config = config
        self._reactor = reactor
        self._mail_root = config.data_dir / "mail"
        self._committer = GroupCommitter(reactor, pool)
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
        return False

    def commit(self, env: Envelope, message: IncomingMessage) -> Deferred[list[Path]]:
        """Store the message for every recipient; fires when all copies are durable.

        A plain Deferred chain rather than a coroutine: this runs once per message on the
        reactor thread, and the coroutine machinery costs more than the work here.
        """
        message.finish()
        body = message.in_memory()
        now = time.time()
        copies: list[maildir.Delivery] = []
        seen: set[LocalRecipient] = set()
        for rcpt, destinations in env.recipients:
            for dest in destinations:
                if isinstance(dest, RemoteRecipient):
                    raise RuntimeError("remote recipients need the relay queue")
                if dest in seen:
                    continue  # one copy per mailbox, even if two RCPTs reach it
                seen.add(dest)
                copies.append(
                    maildir.Delivery(
                        maildir=self._mailbox_path(dest),
                        header=trace_headers(self._config, env, rcpt, now),
                        body=body,
                        body_file=message.path,
                    )
                )
        size = message.size

        def stored(files: list[Path]) -> list[Path]:
            message.discard()
            # One event per message: for local mail, accepting and delivering are one act.
            log.info(
                "accepted {msgid} size={size} delivered to {mailboxes}",
                msgid=env.msgid,
                sender=str(env.sender or ""),
                recipients=[str(r) for r, _d in env.recipients],
                mailboxes=",".join(str(d) for d in seen),
                size=size,
                peer=env.peer_ip,
                protocol=env.protocol,
            )
            return files

        def failed(failure: Failure) -> Failure:
            message.discard()
            return failure

        return self._committer.submit(copies).addCallbacks(stored, failed)
