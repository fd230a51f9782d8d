"""The group committer: batches durable jobs for the disk pool and keeps per-queue-id order.

A job is everything one act must store at once (all the copies of one message, a queue
state change, a queue removal); it succeeds or fails as a whole. `GroupCommitter.submit`
returns a Deferred that fires once the job is durable; while one batch is on disk the next
jobs wait and go together, so directory fsyncs and thread hand-offs are shared.

Invariants:
- Disk work runs in the disk thread pool, never on the reactor thread.
- Work for one queue id is never in two batches at once: a job that names a queue id
  already in a running batch waits (with every later job for that id, in submission order)
  until that batch is done. Two batches on disk at once could otherwise land an update after
  a removal (rename after unlink) and bring a finished or deleted record back.
- Within one batch, removals come after every rename, so an update earlier in the same
  batch cannot resurrect a removed record either.
- Maildir copies have unique names and carry no queue id: they never wait for each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mx import maildir
from mx.durable import Staged, close_synced, discard, fsync_many, publish
from mx.spool import QueueEntry, Spool

__all__ = ["QueueWrite", "QueueUpdate", "QueueRemove", "Job", "commit_batch", "GroupCommitter", "MAX_BATCHES",
           "OVERTAKE_AFTER"]

# Batches on disk at once, and how long the running one has the disk to itself. With each
# batch's fsyncs one after the other, two at once was best (4 KiB, C=10/50: 1 -> 907/1063
# msg/s, 2 -> 1056/1122). Since a batch fsyncs its files concurrently (durable.fsync_many),
# one at a time groups more and wins (one message per connection, C=50: one 1477-1542 msg/s,
# p99 41-43 ms; two 1268-1312, p99 54-55; three 1104-1161; four 1060-1085). A second batch
# still starts once the running one is slow (a big message, a stalled disk), so one job can
# never hold up everyone else's for long.
MAX_BATCHES = 2
OVERTAKE_AFTER = 0.025  # seconds; a batch of 50 x 4 KiB takes ~5-15 ms here


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


Item = maildir.Delivery | QueueWrite | QueueUpdate | QueueRemove
Job = Sequence[Item]


def queue_ids(job: Job) -> frozenset[str]:
    """The queue ids a job touches (what must not be in two batches at once)."""
    ids = set()
    for item in job:
        if isinstance(item, (QueueWrite, QueueUpdate)):
            ids.add(item.entry.id)
        elif isinstance(item, QueueRemove):
            ids.add(item.entry_id)
    return frozenset(ids)


def commit_batch(jobs: Sequence[Job], known: set[Path], spool: Spool | None) -> list[BaseException | list[Path]]:
    """Store several jobs at once (group commit), in a disk thread; one result per job.

    Each job succeeds as a whole (the published paths) or fails as a whole (the exception;
    everything it wrote removed). Phases: write every file, fsync every file (all at once:
    `fsync_many`), publish them (rename, or link for new queue files), unlink removals,
    fsync each folder (again all at once).
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
    # Every file of every job fsynced at once (concurrent fsyncs share journal commits).
    fds = [(i, s.fd) for i in range(len(jobs)) if not isinstance(results[i], BaseException)
           for s in staged[i] if s.fd is not None]
    for (i, _fd), error in zip(fds, fsync_many([fd for _i, fd in fds])):
        if error is not None and not isinstance(results[i], BaseException):
            results[i] = error
    for i, job in enumerate(jobs):
        if isinstance(results[i], BaseException):
            continue  # its files are closed and removed by _undo below
        try:
            close_synced(staged[i])
            folders[i] |= publish(staged[i])
        except Exception as e:  # noqa: BLE001
            results[i] = e
    # Removals last, so a state update earlier in the batch cannot bring a removed entry back.
    for i, ids in enumerate(removals):
        if ids and spool is not None and not isinstance(results[i], BaseException):
            for entry_id in ids:
                spool.unlink_entry(entry_id)
            folders[i].add(spool.root)
    every = list(set().union(*folders))
    bad: dict[Path, BaseException] = {f: e for f, e in zip(every, fsync_many(every)) if e is not None}
    for i, job in enumerate(jobs):
        hit = next((bad[f] for f in folders[i] if f in bad), None)
        if hit is not None:
            results[i] = hit
        if isinstance(results[i], BaseException):
            _undo(job, staged[i], known)
        else:
            results[i] = [s.final for s in staged[i]]
    return results


def _undo(job: Job, staged: Sequence[Staged], known: set[Path]) -> None:
    # `discard` removes only what this job published: a new queue file that failed to
    # publish because the name exists belongs to someone else and stays.
    discard(staged)
    for item in job:
        if isinstance(item, maildir.Delivery):
            known.discard(item.maildir)


class GroupCommitter:
    """Runs `commit_batch` in the disk pool, waiting jobs together per thread trip."""

    def __init__(self, reactor: Any, pool: ThreadPool, spool: Spool | None,
                 max_batches: int = MAX_BATCHES, overtake_after: float = OVERTAKE_AFTER) -> None:
        self._reactor: IReactorFromThreads = reactor  # and IReactorTime, for the overtake timer
        self._clock: IReactorTime = reactor
        self._pool = pool
        self._spool = spool
        self._max_batches = max_batches
        self._overtake_after = overtake_after
        self._started: list[float] = []  # start times of the batches on disk, oldest first
        self._overtake: IDelayedCall | None = None
        self._pending: list[tuple[Job, frozenset[str], Deferred[list[Path]]]] = []
        self._on_disk: set[str] = set()  # queue ids in a running batch
        self._known: set[Path] = set()
        self._holds = 0

    def hold_until(self, d: Deferred[Any]) -> None:
        """Commit nothing until `d` fires (the relay's start-up load of the queue): jobs wait."""
        self._holds += 1

        def release(result: Any) -> Any:
            self._holds -= 1
            self._kick()
            return result

        d.addBoth(release)

    def submit(self, job: Job) -> Deferred[list[Path]]:
        d: Deferred[list[Path]] = Deferred()
        self._pending.append((job, queue_ids(job), d))
        self._kick()
        return d

    def _take(self) -> list[tuple[Job, frozenset[str], Deferred[list[Path]]]]:
        """The next batch: every pending job whose queue ids are not on disk, in order. A job
        held back also holds back every later job for the same ids (submission order)."""
        batch, held = [], []
        blocked = set(self._on_disk)
        for item in self._pending:
            ids = item[1]
            if ids and not blocked.isdisjoint(ids):
                held.append(item)
                blocked |= ids
            else:
                batch.append(item)
        self._pending = held
        return batch

    def _may_start(self) -> bool:
        """A batch may start now: none is running, or the oldest has had the disk long enough
        (else a timer asks again when it has)."""
        if len(self._started) >= self._max_batches:
            return False
        if not self._started:
            return True
        wait = self._started[0] + self._overtake_after - self._clock.seconds()
        if wait <= 0:
            return True
        if self._overtake is None:
            self._overtake = self._clock.callLater(wait, self._overtaken)
        return False

    def _overtaken(self) -> None:
        self._overtake = None
        self._kick()

    def _kick(self) -> None:
        while self._pending and not self._holds and self._may_start():
            batch = self._take()
            if not batch:
                return  # everything waits for a running batch
            started = self._clock.seconds()
            self._started.append(started)
            ids = frozenset().union(*(i for _j, i, _d in batch))
            self._on_disk |= ids
            jobs = [job for job, _i, _d in batch]
            waiting = [d for _j, _i, d in batch]
            try:
                run = deferToThreadPool(self._reactor, self._pool, commit_batch, jobs, self._known, self._spool)
            except Exception:
                # e.g. the pool is stopped: every waiting client must still get its 451
                self._done(Failure(), waiting, ids, started)
                return
            run.addBoth(self._done, waiting, ids, started)

    def _done(self, results: list[Any] | Failure, waiting: list[Deferred[list[Path]]], ids: frozenset[str],
              started: float) -> None:
        self._started.remove(started)
        if not self._started and self._overtake is not None:
            self._overtake.cancel()
            self._overtake = None
        self._on_disk -= ids
        for i, d in enumerate(waiting):
            if isinstance(results, Failure):
                d.errback(results)
            elif isinstance(results[i], BaseException):
                d.errback(Failure(results[i]))
            else:
                d.callback(results[i])
        self._kick()

