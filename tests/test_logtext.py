"""mx.logtext: the same log lines as Twisted's `formatEventAsClassicLogText`, and twistd wiring."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import (
    FileLogObserver,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mx import logtext
from mx.logtext import ClassicLogText

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
            self.assertIsInstance(obs, FileLogObserver)
            obs({"log_format": "hello {x}", "x": 1, "log_time": time.time(),
                 "log_namespace": "t", "log_level": LogLevel.info})
            obs._outFile.flush()  # noqa: SLF001 - the LogFile twistd opened
            with open(path) as f:
                self.assertIn("[t#info] hello 1\n", f.read())

    def test_stdout_under_nodaemon(self) -> None:
        logtext.use_with({"logfile": None, "nodaemon": True})
        obs = logtext.twistd_observer()
        self.assertIs(obs._outFile, sys.stdout)  # noqa: SLF001

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
