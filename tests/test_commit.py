"""The group committer (`mx.commit`) and queue ids: order per queue id, exclusive publishing.

Real files in a real disk thread pool. To make the race between two batches deterministic,
the spool used here takes a while to write one particular record (a slow disk for that file):
a removal submitted meanwhile must wait for it, not overtake it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mx import delivery
from mx.commit import GroupCommitter, QueueRemove, QueueUpdate, QueueWrite
from mx.durable import Staged
from mx.spool import QueueEntry, RecipientState, Spool, SpoolError


def entry(queue_id: str, attempts: int = 0) -> QueueEntry:
    return QueueEntry(id=queue_id, sender="a@example.test", arrival=time.time(),
                      recipients=(RecipientState("b@remote.test", attempts=attempts),))


class SlowSpool(Spool):
    """Staging an update of `slow_id` takes `delay` seconds (in the disk thread)."""

    slow_id = ""
    delay = 0.3

    def stage_update(self, e: QueueEntry) -> Staged:
        if e.id == self.slow_id:
            time.sleep(self.delay)
        return super().stage_update(e)


class CommitterTests(TestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.spool = SlowSpool(self.root / "queue")
        self.spool.ensure()
        self.pool = ThreadPool(minthreads=1, maxthreads=4, name="test-commit")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.committer = GroupCommitter(reactor, self.pool, self.spool)

    async def write(self, e: QueueEntry) -> None:
        await self.committer.submit([QueueWrite(e, (b"Subject: x\r\n\r\nbody\r\n",))])

    async def test_removal_never_overtaken_by_an_update_in_another_batch(self) -> None:
        # An attempt's state update is on disk (slowly) when the operator deletes the entry:
        # with two batches at once, the unlink landed first and the rename brought it back.
        await self.write(entry("Q1"))
        self.spool.slow_id = "Q1"
        update = self.committer.submit([QueueUpdate(entry("Q1", attempts=1))])
        removal = self.committer.submit([QueueRemove("Q1")])
        await DeferredList([update, removal], fireOnOneErrback=True)
        self.assertFalse(self.spool.record_path("Q1").exists(), "a removed record came back")
        self.assertFalse(self.spool.body_path("Q1").exists())

    async def test_updates_of_one_id_land_in_order(self) -> None:
        await self.write(entry("Q2"))
        self.spool.slow_id = "Q2"
        self.spool.delay = 0.05
        ds = [self.committer.submit([QueueUpdate(entry("Q2", attempts=n))]) for n in range(1, 6)]
        await DeferredList(ds, fireOnOneErrback=True)
        self.assertEqual(self.spool.load("Q2").recipients[0].attempts, 5)

    async def test_other_ids_are_not_held_back(self) -> None:
        # Only work for the same id waits: another message commits while Q3 is slow.
        await self.write(entry("Q3"))
        self.spool.slow_id = "Q3"
        self.spool.delay = 1.0
        order: list[str] = []
        slow = self.committer.submit([QueueUpdate(entry("Q3", attempts=1))])
        slow.addCallback(lambda _: order.append("Q3"))
        await self.write(entry("Q4"))
        order.append("Q4")
        await slow
        self.assertEqual(order, ["Q4", "Q3"])

    async def test_new_record_never_replaces_an_existing_one(self) -> None:
        await self.write(entry("Q5"))
        before = self.spool.body_path("Q5").read_bytes()
        other = entry("Q5", attempts=7)
        with self.assertRaises(FileExistsError):
            await self.committer.submit([QueueWrite(other, (b"Subject: other\r\n\r\n",))])
        self.assertEqual(self.spool.body_path("Q5").read_bytes(), before)
        self.assertEqual(self.spool.load("Q5").recipients[0].attempts, 0)
        self.assertEqual(sorted(p.name for p in self.spool.root.iterdir()), ["Q5.eml", "Q5.json"])

    async def test_hold_until(self) -> None:
        gate: Deferred[None] = Deferred()
        self.committer.hold_until(gate)
        done = self.committer.submit([QueueWrite(entry("Q6"), (b"x\r\n",))])
        await deferLater(0.1)
        self.assertFalse(done.called)
        self.assertFalse(self.spool.record_path("Q6").exists())
        gate.callback(None)
        await done
        self.assertTrue(self.spool.record_path("Q6").exists())


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds)


class QueueIdTests(TestCase):
    def test_unique_with_a_frozen_clock(self) -> None:
        ids = delivery._IdSource(clock=lambda: 1_700_000_000.0)
        made = [ids() for _ in range(20_000)]
        self.assertEqual(len(set(made)), len(made))

    def test_unique_across_restarts_with_a_clock_stepping_back_and_a_fixed_pid(self) -> None:
        # Two runs of a container (pid 1 both times); the second run's clock is behind.
        now = [1_700_000_100.0]
        first = delivery._IdSource(clock=lambda: now[0])
        made = {first() for _ in range(2000)}
        now[0] -= 100.0
        second = delivery._IdSource(clock=lambda: now[0])
        again = {second() for _ in range(2000)}
        self.assertEqual(made & again, set())

    def test_never_goes_backwards_within_a_run(self) -> None:
        now = [1_700_000_100.0]
        ids = delivery._IdSource(clock=lambda: now[0])
        a = ids()
        now[0] -= 3600
        b = ids()
        self.assertGreaterEqual(b[:11], a[:11])

    def test_ids_are_valid_queue_ids(self) -> None:
        from mx.spool import check_id

        check_id(delivery.new_message_id())
        self.assertLessEqual(len(delivery.new_message_id()), 64)

    def test_threads_do_not_collide(self) -> None:
        out: list[str] = []
        lock = threading.Lock()

        def run() -> None:
            mine = [delivery.new_message_id() for _ in range(2000)]
            with lock:
                out.extend(mine)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        self.assertEqual(len(set(out)), len(out))


class QueueEntryTests(TestCase):
    def test_with_recipients_keeps_every_other_field(self) -> None:
        from mx.spool import Kind
        e = QueueEntry(id="abc123", sender="a@example.test", arrival=12.5,
                       recipients=(RecipientState("b@remote.test"),), size=4096, kind=Kind.MESSAGE,
                       eight_bit=True, smtputf8=True, delay_warned=True, peer="192.0.2.1",
                       extra={"x": 1})
        new = (RecipientState("c@remote.test", attempts=2),)
        changed = e.with_recipients(iter(new))
        self.assertEqual(changed.recipients, new)
        self.assertEqual(changed, QueueEntry(**{**{n: getattr(e, n) for n in e.__slots__}, "recipients": new}))

    def test_body_file_is_body_path(self) -> None:
        spool = Spool(Path(self.mktemp()))
        self.assertEqual(spool.body_file("abc123"), str(spool.body_path("abc123")))
        self.assertRaises(SpoolError, spool.body_file, "../etc")
