"""twistd's text log lines, formatted with a fraction of the Python calls.

twistd writes every event through `formatEventAsClassicLogText`: a `string.Formatter` run in
Python for the message (a wrapper object per field) and, for the time stamp, the local time
zone worked out and `strftime` called for every event. A message relayed or accepted logs
one or two events, so this was a quarter of the reactor thread in issue 11's relay and SMTP
profiles. `ClassicLogText` writes the same line, `{time} [{namespace}#{level}] {message}`:
the message by `str.format_map` (C), the time stamp once per second.

`use_with(options)` (from `mx.tap.Options`) names `twistd_observer` as twistd's `--logger`
when the operator chose none (and no syslog): twistd's own file for those options (the file,
stdout under -n, SIGUSR1 rotation, the refusal to log a daemon to stdout), written with this
formatter by `CoalescedFileLogObserver`.

`CoalescedFileLogObserver` writes the reactor thread's lines together, at most `FLUSH_DELAY`
after the first of them. twistd's observer writes and flushes every event: a write(2) on the
reactor thread, which gives up the GIL, and under load getting it back from the disk threads
cost ~60 us per event in issue 11's relay profile (the write itself ~2 us here). A timer,
not the next reactor turn: a call for the next turn would make the reactor poll once more
per turn, a syscall for a syscall. Lines from other threads, before the reactor runs and
after it stops are written at once, and whatever waits is written at shutdown and at exit,
in order.

Invariants:
- The line is exactly Twisted's for every event: anything the fast path does not cover
  (a failure and its traceback, no string format, a call `()` in the format, a missing
  field, an empty message) is handed to `formatEventAsClassicLogText` itself.
- Time stamps have whole seconds (RFC 3339 without fractions), so caching by second is exact
  (the second is the one `datetime` shows, after its rounding to microseconds).
- Lines reach the file in the order of their events; at most `MAX_WAITING` lines wait in
  memory, for at most `FLUSH_DELAY` (unless the reactor is blocked). A `kill -9` can lose
  those lines, never a message (the log is not a record mx reads back).
"""

from __future__ import annotations

import atexit
import math
import sys
import threading
from collections.abc import Callable, Mapping
from typing import IO, Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)
from twisted.python.compat import ioType
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

__all__ = ["ClassicLogText", "CoalescedFileLogObserver", "use_with", "twistd_observer"]

FLUSH_DELAY = 0.05  # seconds a line may wait for the write of its batch
MAX_WAITING = 256  # lines waiting at most; one more writes them all at once


class ClassicLogText:
    """A drop-in for `formatEventAsClassicLogText` with twistd's time format."""

    def __init__(self, time_format: str = timeFormatRFC3339) -> None:
        self._time_format = time_format
        self._second: int | None = None
        self._stamp = "-"

    def format_time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = math.floor(when)
        if round((when - second) * 1e6) >= 1_000_000:
            second += 1  # datetime rounds to the microsecond first: x.9999996 shows as x+1
        if second != self._second:
            self._stamp = formatTime(second, self._time_format)
            self._second = second
        return self._stamp

    def __call__(self, event: Mapping[str, Any]) -> str | None:
        fmt = event.get("log_format")
        if type(fmt) is not str or "()" in fmt or "log_failure" in event:
            return self._twisted(event)
        try:
            text = fmt.format_map(event)
        except Exception:  # Twisted's formatter says "Unable to format event ..." instead
            return self._twisted(event)
        if not text:
            return self._twisted(event)
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = "%s#%s" % (event.get("log_namespace", "-"), "-" if level is None else level.name)
        elif type(system) is not str:
            return self._twisted(event)
        line = "%s [%s] %s" % (self.format_time(event.get("log_time")), system, text)
        return (line.replace("\n", "\n\t") if "\n" in line else line) + "\n"

    def _twisted(self, event: Mapping[str, Any]) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=self.format_time)  # type: ignore[arg-type]


_options: dict[str, Any] = {}  # twistd's logging options, kept by `use_with`


def use_with(twistd_options: Any) -> None:
    """Make `twistd_observer` twistd's `--logger` (given as a name: twistd imports it after
    the sub-command's options are parsed), unless the operator chose one or syslog."""
    if twistd_options.get("logger") is None and not twistd_options.get("syslog"):
        _options.update((k, twistd_options.get(k)) for k in ("logfile", "syslog", "prefix", "nodaemon"))
        twistd_options["logger"] = f"{__name__}.twistd_observer"


@implementer(ILogObserver)
class CoalescedFileLogObserver:
    """`FileLogObserver`'s lines (`format_event(event)`, encoded as it would) written to `out`
    in batches rather than once per event (see the module's docstring)."""

    def __init__(self, out: IO[Any], format_event: Callable[[LogEvent], str | None]) -> None:
        self.out = out
        self._format = format_event
        self._encoding = None if ioType(out) is str else "utf-8"  # as FileLogObserver decides
        self._waiting: list[Any] = []
        # Other threads log too; reentrant because a signal handler (twistd's SIGTERM logs
        # "Received SIGTERM") can log on this thread while it holds the lock: with a plain
        # Lock that was a deadlock, the server never stopping.
        self._lock = threading.RLock()
        self._writing = False
        self._timer: IDelayedCall | None = None  # the pending flush
        self._hooked = False
        atexit.register(self.flush)

    def __call__(self, event: LogEvent) -> None:
        text = self._format(event)
        if not text:
            return
        data = text if self._encoding is None else text.encode(self._encoding)
        # Never import the reactor here: that would install the default one before twistd
        # installs the one it was told to use.
        reactor = sys.modules.get("twisted.internet.reactor")
        in_reactor = reactor is not None and getattr(reactor, "running", False) and isInIOThread()
        with self._lock:
            self._waiting.append(data)
            if self._writing:
                return  # logged from a signal handler amid our own write: that write takes it
            if in_reactor and len(self._waiting) <= MAX_WAITING:
                if self._timer is None:
                    if not self._hooked:
                        self._hooked = True
                        reactor.addSystemEventTrigger("after", "shutdown", self.flush)
                    self._timer = reactor.callLater(FLUSH_DELAY, self.flush)
                return
            self.flush()  # now: another thread, no reactor running, or the batch is full

    def flush(self) -> None:
        """Write every waiting line now (the timer's call, shutdown, exit)."""
        with self._lock:
            timer, self._timer = self._timer, None
            if timer is not None and timer.active() and isInIOThread():
                timer.cancel()  # (only the reactor's thread touches a timer; elsewhere it
                # stays and later finds nothing to write)
            self._write_waiting()

    def _write_waiting(self) -> None:
        if self._writing:
            return  # re-entered from a signal handler: the loop below writes what it adds
        self._writing = True
        try:
            while self._waiting:
                lines, self._waiting = self._waiting, []
                self.out.write(lines[0][:0].join(lines))
                self.out.flush()
        finally:
            self._writing = False


def twistd_observer() -> ILogObserver:
    """twistd's own observer for its options (file, stdout under -n, SIGUSR1 rotation, no
    daemon to stdout), writing its lines with `ClassicLogText`, in batches."""
    from twisted.scripts._twistd_unix import UnixAppLogger

    stock = UnixAppLogger(dict(_options, logger=None))._getLogObserver()  # noqa: SLF001
    out = getattr(stock, "_outFile", None)  # FileLogObserver keeps its file privately
    if not isinstance(stock, FileLogObserver) or out is None:
        return stock  # not a text file observer: leave it as twistd made it
    return CoalescedFileLogObserver(out, ClassicLogText())
