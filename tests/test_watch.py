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
