"""twistd's text log lines, formatted with a fraction of the Python calls.

twistd writes every event through `formatEventAsClassicLogText`: a `string.Formatter` run in
Python for the message (a wrapper object per field) and, for the time stamp, the local time
zone worked out and `strftime` called for every event. A message relayed or accepted logs
one or two events, so this was a quarter of the reactor thread in issue 11's relay and SMTP
profiles. `ClassicLogText` writes the same line, `{time} [{namespace}#{level}] {message}`:
the message by `str.format_map` (C), the time stamp once per second.

`use_with(options)` (from `mx.tap.Options`) names `twistd_observer` as twistd's `--logger`
when the operator chose none (and no syslog): twistd's own observer for those options (the
file, stdout under -n, SIGUSR1 rotation, the refusal to log a daemon to stdout), with this
formatter in place of the stock one.

Invariants:
- The line is exactly Twisted's for every event: anything the fast path does not cover
  (a failure and its traceback, no string format, a call `()` in the format, a missing
  field, an empty message) is handed to `formatEventAsClassicLogText` itself.
- Time stamps have whole seconds (RFC 3339 without fractions), so caching by second is exact
  (the second is the one `datetime` shows, after its rounding to microseconds).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEventAsClassicLogText,
    formatTime,
    timeFormatRFC3339,
)

__all__ = ["ClassicLogText", "use_with", "twistd_observer"]


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


def twistd_observer() -> ILogObserver:
    """twistd's own observer for its options (file, stdout under -n, SIGUSR1 rotation, no
    daemon to stdout), writing its lines with `ClassicLogText`."""
    from twisted.scripts._twistd_unix import UnixAppLogger

    stock = UnixAppLogger(dict(_options, logger=None))._getLogObserver()  # noqa: SLF001
    out = getattr(stock, "_outFile", None)  # FileLogObserver keeps its file privately
    if not isinstance(stock, FileLogObserver) or out is None:
        return stock  # not a text file observer: leave it as twistd made it
    return FileLogObserver(out, ClassicLogText())
