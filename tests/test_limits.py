"""Aggregate bounds: the shared in-memory budget for messages being received, the spill
file's ordered writes in the disk pool, and the bounded `FailureTracker`.

Messages are `IncomingMessage`s from a real `Delivery` with a real started disk pool, and
are committed into real Maildirs; the connection limits over several services are in
test_listeners (through the whole server on loopback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mx import delivery as deliverymod
from mx.address import parse_address
from mx.auth import FailureTracker
from mx.delivery import Delivery, Envelope, MemoryBudget, new_message_id
from mx.routing import LocalRecipient
from tests.support import make_config, new_files, split_delivered

ALICE = "alice@example.test"


class BudgetCase(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.config = make_config(self)
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-limits-disk")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def delivery(self, **kwargs: Any) -> Delivery:
        return Delivery(self.config, reactor, self.pool, **kwargs)

    def spill_files(self) -> list[Path]:
        folder = self.config.data_dir / "tmp"
        return sorted(folder.iterdir()) if folder.exists() else []

    async def commit(self, delivery: Delivery, message: Any) -> Path:
        await message.flushed()
        env = Envelope(msgid=new_message_id(), sender=None, recipients=(
            (parse_address(ALICE), (LocalRecipient("alice", "example.test"),)),), helo="c", peer_ip="192.0.2.1",
            protocol="ESMTP")
        await delivery.commit(env, message)
        await message.discard()
        [path] = new_files(self.config, "alice")[-1:]
        return path


class MemoryBudgetTests(BudgetCase):
    async def test_small_message_spills_when_others_use_the_budget(self) -> None:
        """Defect C: the in-memory bytes of all messages together are bounded; beyond the
        budget even a small message goes to disk."""
        delivery = self.delivery(memory_budget=10_000)
        first = delivery.new_message(stream=True)
        first.write(b"a" * 9_000)
        self.assertFalse(first.spilled)
        self.assertEqual(delivery.memory.used, 9_000)
        second = delivery.new_message(stream=True)
        second.write(b"Subject: small\r\n\r\n")
        second.write(b"b" * 2_000)  # 2 KB: far below SPILL_THRESHOLD, but over the budget
        self.assertTrue(second.spilled)
        self.assertIsNone(second.in_memory())
        self.assertEqual(delivery.memory.used, 9_000, "a spilled message holds no budget")
        path = await self.commit(delivery, second)
        self.assertEqual(split_delivered(path.read_bytes())[2], b"Subject: small\r\n\r\n" + b"b" * 2_000)
        self.assertEqual(self.spill_files(), [])
        await first.discard()  # the first message gives its bytes back
        self.assertEqual(delivery.memory.used, 0)
        third = delivery.new_message(stream=True)
        third.write(b"c" * 9_500)
        self.assertFalse(third.spilled)
        await third.discard()

    async def test_budget_is_returned_by_commit(self) -> None:
        delivery = self.delivery(memory_budget=1_000)
        message = delivery.new_message(stream=True)
        message.write(b"Subject: x\r\n\r\nhello\r\n")
        self.assertGreater(delivery.memory.used, 0)
        await self.commit(delivery, message)
        self.assertEqual(delivery.memory.used, 0)

    def test_default_budget(self) -> None:
        self.assertEqual(self.delivery().memory.limit, deliverymod.MEMORY_BUDGET)
        self.assertEqual(deliverymod.MEMORY_BUDGET, 64 << 20)

    def test_generated_messages_never_spill(self) -> None:
        """A message mx already has whole in memory (a DSN) is not streamed to disk."""
        delivery = self.delivery(memory_budget=10)
        message = delivery.new_message()
        message.write(b"x" * (deliverymod.SPILL_THRESHOLD + 10))
        self.assertFalse(message.spilled)
        self.assertEqual(len(message.in_memory() or b""), deliverymod.SPILL_THRESHOLD + 10)
        self.assertTrue(message.flushed().called)


class SpillTests(BudgetCase):
    async def test_writes_stay_in_order_across_pool_jobs(self) -> None:
        delivery = self.delivery()
        message = delivery.new_message(stream=True)
        pieces = [bytes([65 + i % 26]) * (1000 + i) + b"\r\n" for i in range(3000)]  # about 4.5 MB
        waits = 0
        for piece in pieces:
            d = message.write(piece)
            if d is not None:
                waits += 1
                self.assertGreater(message.backlog, deliverymod.SPILL_BACKLOG)
                await d
                self.assertLessEqual(message.backlog, deliverymod.SPILL_BACKLOG)
        self.assertGreater(waits, 0)
        path = await self.commit(delivery, message)
        self.assertEqual(split_delivered(path.read_bytes())[2], b"".join(pieces))
        self.assertEqual(self.spill_files(), [])

    async def test_discard_while_writing_removes_the_file(self) -> None:
        delivery = self.delivery()
        message = delivery.new_message(stream=True)
        for _ in range(40):
            message.write(b"z" * 65536)
        self.assertTrue(message.spilled)
        await message.discard()
        self.assertEqual(self.spill_files(), [])
        self.assertIsNone(message.path)
        message.write(b"more")  # after discard: ignored, no new file
        await message.discard()
        self.assertEqual(self.spill_files(), [])

    async def test_disk_error_fails_flushed_and_leaves_nothing(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        (self.config.data_dir / "tmp").write_bytes(b"not a folder")  # mkdir/mkstemp fail
        delivery = self.delivery()
        message = delivery.new_message(stream=True)
        message.write(b"q" * (deliverymod.SPILL_THRESHOLD + 1))
        with self.assertRaises(OSError):
            await message.flushed()
        await message.discard()
        self.assertEqual((self.config.data_dir / "tmp").read_bytes(), b"not a folder")

    def test_finish_before_flushed_is_a_programming_error(self) -> None:
        delivery = self.delivery()
        message = delivery.new_message(stream=True)
        message.write(b"w" * (deliverymod.SPILL_THRESHOLD + 1))
        self.assertRaises(RuntimeError, message.finish)
        return message.discard()


class BudgetUnitTests(SynchronousTestCase):
    def test_take_and_give(self) -> None:
        budget = MemoryBudget(100)
        self.assertTrue(budget.take(60))
        self.assertFalse(budget.take(41))
        self.assertTrue(budget.take(40))
        budget.give(100)
        self.assertEqual(budget.used, 0)


class FailureTrackerBoundTests(SynchronousTestCase):
    """Defect C: the tracker remembers at most `max_clients` addresses and forgets the least
    recently failing one first, without scanning the others."""

    def setUp(self) -> None:
        self.now = 1000.0
        self.tracker = FailureTracker(clock=lambda: self.now, max_clients=3)

    def fail(self, client: str) -> None:
        self.now += 1
        self.tracker.failed(client)

    def test_least_recently_failing_is_evicted(self) -> None:
        for client in ("a", "b", "c"):
            self.fail(client)
        self.fail("a")  # a is now the most recent; b the least
        self.fail("d")
        self.assertEqual(len(self.tracker), 3)
        self.assertNotIn("b", self.tracker)
        for client in ("a", "c", "d"):
            self.assertIn(client, self.tracker)
        self.fail("e")  # then c
        self.assertNotIn("c", self.tracker)
        self.assertEqual(self.tracker.delay("a", 0), 0.0)
        self.assertEqual(len(self.tracker._recent("a")), 2)  # a's history survived

    def test_eviction_does_not_look_at_other_clients(self) -> None:
        """O(1): a full tracker's `failed` neither sorts nor scans (no `min` over clients)."""
        import builtins

        tracker = FailureTracker(clock=lambda: self.now, max_clients=1000)
        for i in range(1000):
            tracker.failed(f"192.0.2.{i}")

        def no_min(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("min() over the clients")

        real_min = builtins.min
        builtins.min = no_min  # the old eviction was min(clients, key=last failure)
        try:
            tracker.failed("198.51.100.1")
        finally:
            builtins.min = real_min
        self.assertEqual(len(tracker), 1000)
        self.assertNotIn("192.0.2.0", tracker)
        self.assertIn("198.51.100.1", tracker)

    def test_per_client_history_is_bounded(self) -> None:
        for _ in range(1000):
            self.tracker.failed("a")
        self.assertEqual(len(self.tracker._recent("a")), self.tracker.block_after)
        self.assertTrue(self.tracker.blocked("a"))

