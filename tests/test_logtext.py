"""mx.logtext: the same log lines as Twisted's `formatEventAsClassicLogText`, and twistd wiring."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import (
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mx import logtext
from mx.logtext import ClassicLogText, CoalescedFileLogObserver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def twisted_line(event: dict) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=lambda t: formatTime(t, timeFormatRFC3339))


class Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<Thing>"


class SameLinesTests(SynchronousTestCase):
    def event(self, fmt: object, **fields: object) -> dict:
        base = {"log_format": fmt, "log_time": 1796253044.25, "log_namespace": "mx.relay",
                "log_level": LogLevel.info}
        base.update(fields)
        return base

    def assertSame(self, event: dict) -> None:
        self.assertEqual(ClassicLogText()(event), twisted_line(event), event)

    def test_table(self) -> None:
        failure = Failure(ValueError("boom"))
        events = [
            self.event("delivered {msgid} to {rcpts}", msgid="m1", rcpts="a@b,c@d"),
            self.event("next in {delay:.0f}s, {code!r}, {who.name}, {xs[1]}", delay=299.6,
                       code=421, who=Thing(), xs=[1, 2]),
            self.event("two\nlines {x}", x="and\nthree"),
            self.event("{{braces}} {x!s}", x=Thing()),
            self.event("missing {nothere}"),
            self.event("call {f()}", f=lambda: 3),
            self.event(""),
            self.event(None),
            self.event(b"bytes {x}", x=1),
            self.event("failed", log_failure=failure),
            self.event("system", log_system="pop3,12,127.0.0.1"),
            self.event("no level", log_level=None),
            self.event("no time", log_time=None),
            self.event("unicode {x}", x="é \u2028 \x00"),
            {"log_format": "bare"},
        ]
        for e in events:
            self.assertSame(e)

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=30), st.floats(0, 4e9), st.text(max_size=10))
    def test_any_format(self, fmt: str, when: float, value: str) -> None:
        self.assertSame(self.event(fmt, log_time=when, x=value, y=when))

    def test_time_cached_by_second(self) -> None:
        f = ClassicLogText()
        now = time.time()
        for t in (now, now + 0.5, now + 1.2, now - 3600 * 24 * 180):
            self.assertEqual(f.format_time(t), formatTime(t, timeFormatRFC3339))
        self.assertEqual(f.format_time(None), "-")


class TwistdWiringTests(SynchronousTestCase):
    def test_factory_keeps_twistds_file(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "mx.log")
            logtext.use_with({"logfile": path, "nodaemon": True})
            obs = logtext.twistd_observer()
            self.assertIsInstance(obs, CoalescedFileLogObserver)
            obs({"log_format": "hello {x}", "x": 1, "log_time": time.time(),
                 "log_namespace": "t", "log_level": LogLevel.info})
            obs.flush()
            with open(path) as f:
                self.assertIn("[t#info] hello 1\n", f.read())

    def test_stdout_under_nodaemon(self) -> None:
        logtext.use_with({"logfile": None, "nodaemon": True})
        obs = logtext.twistd_observer()
        self.assertIs(obs.out, sys.stdout)

    def test_twistd_uses_it_unless_told_otherwise(self) -> None:
        code = ("import sys\nfrom twisted.scripts.twistd import ServerOptions\n"
                "o = ServerOptions(); o.parseOptions(sys.argv[1:])\n"
                "print(type(o['logger']).__name__, o['logger'].__module__ if o['logger'] else '')\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        run = lambda *args: subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,  # noqa: E731
                                           capture_output=True, text=True, timeout=60)
        out = run("-n", "mx")
        self.assertEqual(out.stdout.split(), ["function", "mx.logtext"], out.stderr)  # imported by name
        out = run("-n", "--syslog", "mx")
        self.assertEqual(out.stdout.split(), ["NoneType"], out.stderr)
        out = run("-n", "--logger", "twisted.logger.textFileLogObserver", "mx")
        self.assertEqual(out.stdout.split(), ["function", "twisted.logger._file"], out.stderr)


def line_event(n: int) -> dict:
    return {"log_format": "line {n}", "n": n, "log_time": 1796253044.25, "log_namespace": "t",
            "log_level": LogLevel.info}


class CoalescedTests(TestCase):
    """One write per batch; nothing lost or reordered (trial runs the reactor)."""

    def setUp(self) -> None:
        d = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, d)
        self.path = os.path.join(d, "mx.log")
        self.out = open(self.path, "wb", buffering=0)  # like twistd's LogFile: bytes, unbuffered
        self.addCleanup(self.out.close)
        self.writes = 0
        real = self.out.write

        def counted(data: bytes) -> int:
            self.writes += 1
            return real(data)

        self.out.write = counted  # type: ignore[method-assign]
        self.obs = CoalescedFileLogObserver(self.out, ClassicLogText())

    def text(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def numbers(self) -> list[int]:
        return [int(line.rsplit(" ", 1)[1]) for line in self.text().splitlines()]

    async def turn(self, delay: float = 0.0) -> None:
        await deferLater(reactor, delay, lambda: None)

    async def test_one_write_per_batch(self) -> None:
        await self.turn()  # trial calls the test before its reactor runs
        for n in range(5):
            self.obs(line_event(n))
        await self.turn()
        self.assertEqual(self.text(), "")  # waiting for the timer
        await self.turn(logtext.FLUSH_DELAY + 0.05)
        self.assertEqual(self.numbers(), [0, 1, 2, 3, 4])
        self.assertEqual(self.writes, 1)
        self.assertIn("[t#info] line 0\n", self.text())

    async def test_other_threads_write_at_once_in_order(self) -> None:
        await self.turn()
        self.obs(line_event(1))
        await deferToThread(self.obs, line_event(2))
        self.assertEqual(self.numbers(), [1, 2])  # the waiting line first
        await self.turn(logtext.FLUSH_DELAY + 0.05)
        self.assertEqual(self.numbers(), [1, 2])

    async def test_bounded(self) -> None:
        await self.turn()
        for n in range(logtext.MAX_WAITING + 1):
            self.obs(line_event(n))
        self.assertEqual(self.numbers(), list(range(logtext.MAX_WAITING + 1)))
        self.assertEqual(self.writes, 1)

    def test_flush_and_text_files(self) -> None:
        self.obs(line_event(7))
        self.obs.flush()
        self.assertEqual(self.numbers(), [7])
        with open(self.path + ".txt", "w", encoding="utf-8") as text_out:
            obs = CoalescedFileLogObserver(text_out, ClassicLogText())
            obs({"log_format": "caf\u00e9 {n}", "n": 1, "log_time": 1.0, "log_namespace": "t",
                 "log_level": LogLevel.info})
            obs.flush()
        with open(self.path + ".txt", encoding="utf-8") as f:
            self.assertTrue(f.read().endswith("caf\u00e9 1\n"))


class ReentryTests(SynchronousTestCase):
    """A signal handler can log on the thread that is writing (twistd's SIGTERM does)."""

    def test_logging_from_inside_a_write_neither_hangs_nor_reorders(self) -> None:
        written: list[str] = []

        class Out:
            def __init__(self) -> None:
                self.entered = False

            def write(self, text: str) -> None:
                if not self.entered:  # a "signal handler" logging amid the write
                    self.entered = True
                    obs(line_event(2))
                written.append(text)

            def flush(self) -> None:
                pass

        obs = CoalescedFileLogObserver(Out(), ClassicLogText())
        atexit.unregister(obs.flush)  # a deadlocked observer would hang the exit, not fail
        t = threading.Thread(target=obs, args=(line_event(1),), daemon=True)
        t.start()
        t.join(10)
        self.assertFalse(t.is_alive(), "the observer deadlocked on its own lock")
        self.assertEqual([int(x.rsplit(" ", 1)[1]) for x in "".join(written).splitlines()], [1, 2])


class NotRunningTests(SynchronousTestCase):
    def test_without_a_running_reactor_at_once(self) -> None:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "mx.log")
            with open(path, "w", encoding="utf-8") as out:
                obs = CoalescedFileLogObserver(out, ClassicLogText())
                obs(line_event(3))
                with open(path, encoding="utf-8") as f:
                    self.assertTrue(f.read().endswith("line 3\n"))
