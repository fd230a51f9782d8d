"""`mx.watch`: readers hear of changes to a Maildir folder, by inotify or by polling."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase

from mx import watch as watchmod
from mx.watch import FolderWatch


def maildir(case: TestCase) -> Path:
    root = Path(case.mktemp()).resolve()
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    return root


class InotifyTests(TestCase):
    timeout = 10

    def setUp(self) -> None:
        if watchmod._inotify is None:
            self.skipTest("no inotify on this platform")
        self.watch = FolderWatch(reactor)
        self.addCleanup(self.watch.stop)

    async def wait_for_call(self, calls: list[int], n: int) -> None:
        for _ in range(200):  # bounded: 2 s
            if len(calls) >= n:
                return
            await deferLater(reactor, 0.01)
        self.fail(f"{len(calls)} calls, wanted {n}")

    async def test_new_file_rename_and_expunge_are_heard(self) -> None:
        box = maildir(self)
        calls: list[int] = []
        self.watch.subscribe(box, lambda: calls.append(1))
        (box / "tmp" / "m1").write_bytes(b"x")
        os.rename(box / "tmp" / "m1", box / "new" / "m1")  # a delivery
        await self.wait_for_call(calls, 1)
        os.rename(box / "new" / "m1", box / "cur" / "m1:2,S")  # a flag change by anyone
        await self.wait_for_call(calls, 2)
        os.unlink(box / "cur" / "m1:2,S")  # an expunge
        await self.wait_for_call(calls, 3)

    async def test_a_burst_is_one_call_and_one_watch_serves_many_readers(self) -> None:
        box = maildir(self)
        a: list[int] = []
        b: list[int] = []
        sa = self.watch.subscribe(box, lambda: a.append(1))
        self.watch.subscribe(box, lambda: b.append(1))
        self.assertEqual(self.watch.watched(), 1)
        for i in range(20):
            (box / "new" / f"m{i}").write_bytes(b"x")
        await self.wait_for_call(a, 1)
        await deferLater(reactor, 0.1)
        self.assertLessEqual(len(a), 3)  # coalesced per reactor turn, not one per file
        self.assertEqual(len(a), len(b))
        sa.cancel()
        (box / "new" / "late").write_bytes(b"x")
        await self.wait_for_call(b, len(a) + 1)
        count = len(a)
        await deferLater(reactor, 0.1)
        self.assertEqual(len(a), count, "a cancelled subscriber is not called")

    async def test_a_failing_reader_does_not_stop_the_others(self) -> None:
        box = maildir(self)
        calls: list[int] = []

        def bad() -> None:
            raise RuntimeError("reader bug")

        self.watch.subscribe(box, bad)
        self.watch.subscribe(box, lambda: calls.append(1))
        (box / "new" / "m").write_bytes(b"x")
        await self.wait_for_call(calls, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class ReaderTests(TestCase):
    """mx.watch's own inotify reader: a burst is read at once, in whole, per watch."""

    def setUp(self) -> None:
        if watchmod._inotify is None:
            self.skipTest("no inotify on this platform")
        self.watch = FolderWatch(reactor)
        self.addCleanup(self.watch.stop)

    def test_a_burst_of_thousands_of_events_is_one_step_per_read(self) -> None:
        box = maildir(self)
        for i in range(1500):
            (box / "new" / f"m{i:04d}-with-a-name-as-long-as-a-maildir-file-name").write_bytes(b"")
        hold = self.watch.hold(box)
        first = hold.generation()
        for name in os.listdir(box / "new"):  # 3,000 events: a session's own STORE 1:1500
            os.rename(box / "new" / name, box / "cur" / (name + ":2,S"))
        after = hold.generation()  # the whole queue (over 200 KiB) drained in this one call
        self.assertIsNotNone(after)
        assert first is not None and after is not None
        self.assertGreaterEqual(after - first, 1)
        self.assertLessEqual(after - first, 2 * 8, "one step per watch per 64 KiB read, not one per event")
        self.assertEqual(hold.generation(), after, "nothing left in the queue")

    async def test_the_reactor_reads_only_for_subscribers(self) -> None:
        box = maildir(self)
        hold = self.watch.hold(box)
        first = hold.generation()
        notifier = self.watch._notifier
        self.assertNotIn(notifier, reactor.getReaders(), "a hold alone needs no reactor reads")
        (box / "new" / "m").write_bytes(b"x")
        await deferLater(reactor, 0.05)
        self.assertNotEqual(hold.generation(), first, "the queue is read when the count is asked for")
        calls: list[int] = []
        sub = self.watch.subscribe(box, lambda: calls.append(1))
        self.assertIn(notifier, reactor.getReaders())
        (box / "new" / "m2").write_bytes(b"x")
        for _ in range(200):  # bounded: 2 s
            if calls:
                break
            await deferLater(reactor, 0.01)
        self.assertTrue(calls, "a subscriber is called without anyone asking")
        sub.cancel()
        self.assertNotIn(notifier, reactor.getReaders())
        hold.cancel()

    def test_a_full_kernel_queue_counts_as_a_change_everywhere(self) -> None:
        a, b = maildir(self), maildir(self)
        ha, hb = self.watch.hold(a), self.watch.hold(b)
        ga, gb = ha.generation(), hb.generation()
        assert ga is not None and gb is not None
        notifier = self.watch._notifier
        overflow = watchmod._EVENT.pack(-1, watchmod._inotify.IN_Q_OVERFLOW, 0, 0)
        real_read = os.read
        fed = [overflow]

        def read(fd: int, n: int) -> bytes:
            if fd == notifier._fd and fed:
                return fed.pop()
            return real_read(fd, n)

        self.patch(watchmod.os, "read", read)
        notifier.doRead()
        self.assertGreater(ha.generation(), ga)
        self.assertGreater(hb.generation(), gb)

    def test_a_deleted_folder_leaves_the_other_watches_working(self) -> None:
        gone, kept = maildir(self), maildir(self)
        h_gone, h_kept = self.watch.hold(gone), self.watch.hold(kept)
        before = h_kept.generation()
        for sub in ("cur", "new", "tmp"):
            os.rmdir(gone / sub)
        os.rmdir(gone)
        h_gone.generation()  # reads the deletion (IN_DELETE_SELF, IN_IGNORED)
        (kept / "new" / "m").write_bytes(b"x")
        self.assertNotEqual(h_kept.generation(), before)
        h_gone.cancel()  # the kernel's watches are gone already: no error
        self.assertEqual(self.watch.watched(), 1)


class HoldTests(TestCase):
    """A Hold counts a folder's changes without a callback, reading inotify's queue at once."""

    def setUp(self) -> None:
        self.watch = FolderWatch(reactor)
        self.addCleanup(self.watch.stop)

    def test_generation_moves_with_changes_only_and_at_once(self) -> None:
        box = maildir(self)
        hold = self.watch.hold(box)
        first = hold.generation()
        self.assertIsNotNone(first)
        self.assertEqual(hold.generation(), first)  # nothing happened
        (box / "tmp" / "m").write_bytes(b"x")
        os.rename(box / "tmp" / "m", box / "new" / "m")  # as another program delivers
        after_new = hold.generation()  # no reactor turn in between: read from the queue now
        self.assertNotEqual(after_new, first)
        os.rename(box / "new" / "m", box / "cur" / "m:2,S")
        after_flag = hold.generation()
        self.assertNotEqual(after_flag, after_new)
        (box / "dovecot-uidlist.tmp").write_text("3 V1 N1\n")
        os.rename(box / "dovecot-uidlist.tmp", box / "dovecot-uidlist")  # the list replaced
        self.assertNotEqual(hold.generation(), after_flag)

    def test_no_callback_and_the_watch_goes_with_the_last_holder(self) -> None:
        box = maildir(self)
        calls: list[int] = []
        sub = self.watch.subscribe(box, lambda: calls.append(1))
        hold = self.watch.hold(box)
        self.assertEqual(self.watch.watched(), 1)
        sub.cancel()
        self.assertEqual(self.watch.watched(), 1)  # still held
        hold.cancel()
        self.assertEqual(self.watch.watched(), 0)
        self.assertIsNone(hold.generation())

    def test_polled_folders_have_no_generation(self) -> None:
        watch = FolderWatch(Clock(), poll=True)
        self.addCleanup(watch.stop)
        hold = watch.hold(maildir(self))
        self.assertIsNone(hold.generation())


class PollingTests(TestCase):
    def test_polling_sees_changes_and_stops_with_the_last_reader(self) -> None:
        clock = Clock()
        watch = FolderWatch(clock, poll=True, interval=1.0)
        box = maildir(self)
        calls: list[int] = []
        sub = watch.subscribe(box, lambda: calls.append(1))
        clock.advance(1.0)
        clock.advance(0)
        self.assertEqual(calls, [])  # nothing changed yet
        (box / "new" / "m").write_bytes(b"x")
        st = os.stat(box / "new")
        os.utime(box / "new", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a coarse-mtime FS
        clock.advance(1.0)
        clock.advance(0)
        self.assertEqual(calls, [1])
        sub.cancel()
        self.assertEqual(watch.watched(), 0)
        self.assertFalse(watch._poller.running)

    def test_notify_announces_our_own_deliveries(self) -> None:
        clock = Clock()
        watch = FolderWatch(clock, poll=True, interval=3600.0)
        box = maildir(self)
        calls: list[int] = []
        watch.subscribe(box, lambda: calls.append(1))
        watch.notify([box, Path("/elsewhere")])
        clock.advance(0)
        self.assertEqual(calls, [1])
        watch.stop()


class DeliveryWakesReadersTests(TestCase):
    async def test_smtp_delivery_wakes_a_reader_within_a_second(self) -> None:
        from twisted.internet.threads import deferToThread

        from tests.support import DOMAIN, add_users, make_config, service_ports, smtp_client, start_mail_service

        config = make_config(self, listen={"smtp": "tcp:0:interface=127.0.0.1"})
        add_users(config, {f"alice@{DOMAIN}": "pw"})
        mail = await start_mail_service(self, config)
        box = config.data_dir / "mail" / DOMAIN / "alice"
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        heard: Deferred[None] = Deferred()
        sub = mail.watch.subscribe(box, lambda: heard.called or heard.callback(None))
        self.addCleanup(sub.cancel)

        def send() -> None:
            with smtp_client(service_ports(mail)["smtp"]) as s:
                s.sendmail("x@elsewhere.test", [f"alice@{DOMAIN}"], b"Subject: hi\r\n\r\nhi\r\n")

        await deferToThread(send)
        heard.addTimeout(1.0, reactor)
        await heard
