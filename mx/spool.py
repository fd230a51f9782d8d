"""The durable relay queue: one body file and one state record per queued message.

Layout under `<data_dir>/queue/`: `<id>.eml` (the message as it will be sent, trace header
included) and `<id>.json` (envelope and per-recipient state). The record is what makes a
message exist: a body without a record is debris from a crash and is removed at start-up.

Runs in a disk thread (blocking file I/O, no Twisted here).

Invariants:
- A new message is published by linking its fsynced record into place after its fsynced
  body (link, not rename: an id that exists already fails instead of replacing another
  message); the folder fsync (shared by a batch) makes it durable. Only then is 250 sent.
- Every state change rewrites the record atomically (temp, fsync, rename, fsync folder), so
  a crash leaves either the old or the new state, never a mix, and never loses a recipient.
- A record is removed only once no recipient is pending and every bounce owed was made; a
  removal undone by a crash leaves a finished record, which start-up cleans away.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from mx.durable import Staged, atomic_write, discard, fsync_dir, stage, unlink_quietly

__all__ = ["Status", "Kind", "PENDING", "DELIVERED", "FAILED", "BOUNCED", "RecipientState", "QueueEntry", "Spool", "SpoolError"]



class Status(StrEnum):
    """A recipient is pending (to try), delivered, failed (a bounce is owed) or bounced (sent)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    BOUNCED = "bounced"


class Kind(StrEnum):
    """What a queued message is: the user's mail, a bounce we made (sender <>), or a failed
    bounce on its way to the postmaster (never bounced again)."""

    MESSAGE = "message"
    BOUNCE = "bounce"
    DOUBLE_BOUNCE = "double-bounce"


PENDING, DELIVERED, FAILED, BOUNCED = Status.PENDING, Status.DELIVERED, Status.FAILED, Status.BOUNCED
_ID = re.compile(r"[0-9A-Za-z]{1,64}\Z")
RECORD, BODY = ".json", ".eml"  # a queue id's two files (the hot paths join strings, the rest Paths)
QUARANTINE = "quarantine"  # records that could not be used, set aside at start-up
FORMAT = 1


class SpoolError(Exception):
    """A queue id or record that cannot be used."""


class RecipientState(NamedTuple):
    """One recipient's state. A NamedTuple, not a dataclass: a fanout message has 50 of these,
    and each attempt replaces and serialises every one (`_replace` and `_asdict` cost a
    fraction of `dataclasses.replace` and `asdict`)."""

    address: str  # where to send it (after alias expansion)
    original: str = ""  # the RCPT the client gave, for DSNs
    status: Status = Status.PENDING
    attempts: int = 0
    next_attempt: float = 0.0
    last_code: int | None = None
    last_enhanced: str | None = None
    last_error: str | None = None
    remote_mta: str | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    # The two changes every attempt makes to every recipient, built positionally: a
    # fan-out's fifty recipients take each one twice, and `_replace` costs 2.5x as much.
    def tried(self, next_attempt: float) -> RecipientState:
        """One more attempt, the next one due at `next_attempt`."""
        return _new_tuple(RecipientState, (self[0], self[1], self[2], self[3] + 1, next_attempt, *self[5:]))

    def delivered(self, code: int, enhanced: str | None, remote_mta: str | None) -> RecipientState:
        """Accepted by `remote_mta` with `code` (`enhanced`): DELIVERED, the last error cleared."""
        return _new_tuple(RecipientState, (self[0], self[1], DELIVERED, self[3], self[4], code, enhanced, None,
                                           remote_mta))


_new_tuple = tuple.__new__


@dataclass(frozen=True, slots=True)
class QueueEntry:
    id: str
    sender: str  # "" for the null reverse-path <>
    arrival: float
    recipients: tuple[RecipientState, ...]
    size: int = 0
    kind: Kind = Kind.MESSAGE
    eight_bit: bool = False
    smtputf8: bool = False
    delay_warned: bool = False
    peer: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def pending(self) -> tuple[RecipientState, ...]:
        return tuple(r for r in self.recipients if r.status == PENDING)

    @property
    def owed(self) -> tuple[RecipientState, ...]:
        """Failed recipients whose bounce has not been made yet."""
        return tuple(r for r in self.recipients if r.status == FAILED)

    def with_recipients(self, recipients: Iterable[RecipientState]) -> QueueEntry:
        # Positionally (the field order is asserted below the class): every attempt makes a
        # new entry two or three times, and dataclasses.replace costs 10 us to this 4 us.
        return QueueEntry(self.id, self.sender, self.arrival, tuple(recipients), self.size, self.kind,
                          self.eight_bit, self.smtputf8, self.delay_warned, self.peer, self.extra)

    def to_json(self) -> bytes:
        # By hand, not dataclasses.asdict: that deep-copies every field recursively, ~20 us
        # per recipient, and each attempt on a message writes its record twice.
        data = {name: getattr(self, name) for name in _ENTRY_FIELDS}
        data["recipients"] = [r._asdict() for r in self.recipients]
        data["format"] = FORMAT
        return json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> QueueEntry:
        try:
            data = json.loads(raw)
            data.pop("format", None)
            recipients = tuple(RecipientState(**{**r, "status": Status(r["status"])}) for r in data.pop("recipients"))
            return cls(recipients=recipients, **{**data, "kind": Kind(data.get("kind", Kind.MESSAGE))})
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SpoolError(f"unreadable queue record: {e}") from None


_ENTRY_FIELDS = tuple(f.name for f in fields(QueueEntry) if f.name != "recipients")
assert tuple(f.name for f in fields(QueueEntry)) == (
    "id", "sender", "arrival", "recipients", "size", "kind", "eight_bit", "smtputf8", "delay_warned", "peer",
    "extra"), "QueueEntry.with_recipients passes the fields positionally: update it"


def check_id(queue_id: str) -> str:
    if not _ID.match(queue_id):
        raise SpoolError(f"invalid queue id {queue_id!r}")
    return queue_id


class Spool:
    """The queue folder. All methods block on the disk: call them from the disk pool."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._prefix = f"{self.root}{os.sep}"  # the hot paths (state updates, removals) join strings

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def body_file(self, queue_id: str) -> str:
        """The body's name as a string: the relay's read-ahead names up to 17 per trip (0.6 us
        each, to 4.7 us for a Path joined with `/`)."""
        return f"{self._prefix}{check_id(queue_id)}{BODY}"

    def body_path(self, queue_id: str) -> Path:
        return Path(self.body_file(queue_id))

    def record_path(self, queue_id: str) -> Path:
        return self.root / f"{check_id(queue_id)}{RECORD}"

    def stage_new(self, entry: QueueEntry, parts: Iterable[bytes | Path]) -> list[Staged]:
        """Write the body and the record under temporary names (the caller syncs and
        publishes them, body first: the record's rename is what makes the message real)."""
        self.ensure()
        body = self.body_path(entry.id)
        record = self.record_path(entry.id)
        staged = [stage(body.with_suffix(".eml.tmp"), body, parts)]
        try:
            staged.append(stage(record.with_suffix(".json.tmp"), record, [entry.to_json()]))
        except BaseException:
            discard(staged)
            raise
        for s in staged:
            s.exclusive = True  # a new message never replaces another's files
        return staged

    def stage_update(self, entry: QueueEntry) -> Staged:
        """A new state record under a temporary name; publishing replaces the old one."""
        name = f"{check_id(entry.id)}{RECORD}"
        staged = stage(f"{self._prefix}.{name}.{secrets.token_hex(4)}.tmp", self._prefix + name, [entry.to_json()],
                       folder=self.root)
        staged.replaces = True
        return staged

    def unlink_entry(self, queue_id: str) -> None:
        """Remove a finished entry's files (record first); the caller fsyncs the folder."""
        base = self._prefix + check_id(queue_id)
        unlink_quietly(base + RECORD)
        unlink_quietly(base + BODY)

    def save(self, entry: QueueEntry) -> None:
        """Persist a state change atomically and durably."""
        atomic_write(self.record_path(entry.id), entry.to_json())

    def remove(self, queue_id: str) -> None:
        self.unlink_entry(queue_id)
        fsync_dir(self.root)

    def load(self, queue_id: str) -> QueueEntry | None:
        try:
            return QueueEntry.from_json(self.record_path(queue_id).read_bytes())
        except FileNotFoundError:
            return None

    def load_all(self) -> tuple[list[QueueEntry], list[tuple[str, str]]]:
        """Every queued message, once, at start-up; also removes crash debris.

        Returns (entries, quarantined): a record that cannot be read, or whose message file
        is missing, is moved to `quarantine/` (with its body, if any) so it neither stops
        the queue nor is retried forever; each comes back as (queue id, reason) to log.
        """
        self.ensure()
        entries: list[QueueEntry] = []
        quarantined: list[tuple[str, str]] = []
        names = os.listdir(self.root)
        records = {n[:-len(RECORD)] for n in names if n.endswith(RECORD) and not n.startswith(".")}
        for name in names:
            path = self.root / name
            if name.endswith(".tmp"):
                unlink_quietly(path)  # a write that never completed
            elif name.endswith(BODY) and name[:-len(BODY)] not in records:
                unlink_quietly(path)  # a body whose record was never published (or removed)
        for queue_id in sorted(records):
            try:
                check_id(queue_id)
                entry = QueueEntry.from_json(self.record_path(queue_id).read_bytes())
                if entry.id != queue_id:
                    raise SpoolError(f"the record names another id ({entry.id!r})")
            except (OSError, SpoolError) as e:
                quarantined.append((queue_id, self.quarantine(queue_id, f"unreadable record: {e}")))
                continue
            if not entry.pending and not entry.owed:
                self.remove(queue_id)  # finished; its removal was lost in a crash
                continue
            if not self.body_path(queue_id).is_file():
                quarantined.append((queue_id, self.quarantine(queue_id, "its message file is missing")))
                continue
            entries.append(entry)
        return entries, quarantined

    def quarantine(self, queue_id: str, reason: str) -> str:
        """Move a record (and its body) out of the queue into `quarantine/`; returns `reason`
        with where it went. The operator can inspect, repair and move it back."""
        folder = self.root / QUARANTINE
        folder.mkdir(exist_ok=True)
        for path in (self.root / f"{queue_id}{RECORD}", self.root / f"{queue_id}{BODY}"):
            try:
                os.rename(path, folder / path.name)
            except FileNotFoundError:
                pass
        fsync_dir(folder)
        fsync_dir(self.root)
        return f"{reason} (moved to {folder})"
