"""SMTP worker processes: more reactors accepting mail on the same listening sockets.

One Python process runs one reactor thread; at 50 connections one message each, that thread
is the limit (issue 11). With `smtp_workers = N`, the server (the "main" process, the one
twistd started) spawns N - 1 workers. Each inherits the smtp, submission and submissions
listening sockets (the kernel hands each new connection to whichever process accepts first)
and runs the SMTP services only: the same factories, commits and mail checks as the main
process, in its own process. The main process keeps everything else: IMAP, POP3, the relay
queue manager (one per data_dir: the queue lock says which), `mx queue` requests.

A worker talks to the main process over its stdout, one line per message (`Channel`):
- `L<json>`: a log event (twisted.logger's JSON), published in the main process with
  `log_system` "smtp-worker-N", so the operator's one log has every process's events;
- `Q<json>`: a queue entry the worker committed (`QueueEntry.to_json`): the relay schedules it;
- `D<json>`: mailboxes that got a delivery (`[[domain, local], ...]`): IMAP IDLE wakes up.

Invariants:
- Workers start only once the relay has loaded the queue and the start-up clean-up of spill
  files is done: the load removes crash debris, which must never be a file a worker writes.
- The worker's stdin is its lifeline: when the main process goes (even by `kill -9`), the
  worker sees end-of-file and stops as at a SIGTERM (its commits in flight finish first).
- A worker that exits while the main process runs is started again after `RESPAWN_DELAY`
  seconds (doubling up to `RESPAWN_MAX` while it keeps dying within a minute).
- At shutdown every worker gets SIGTERM and is waited for (its drain: `SHUTDOWN_GRACE`);
  one still alive `KILL_AFTER` seconds later is killed.
- Limits (`max_connections`, `max_connections_per_ip`) hold per process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger, eventAsJSON, eventFromJSON, globalLogPublisher
from twisted.python.failure import Failure

from mx.listeners import Service

__all__ = ["Inherited", "WorkerPool", "Channel", "SMTP_SERVICES", "main"]

log = Logger()

SMTP_SERVICES = (Service.SMTP, Service.SUBMISSION, Service.SUBMISSIONS)
RESPAWN_DELAY = 1.0
RESPAWN_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that lived this long starts the respawn delay over
KILL_AFTER = 20.0  # seconds after SIGTERM (the drain's grace is 10)
MAX_LINE = 1 << 20  # a longer line from a worker is dropped (a log event is far shorter)
FIRST_FD = 3  # the child's inherited sockets: 3, 4, 5 in the order of `SMTP_SERVICES`


@dataclass(frozen=True)
class Inherited:
    """A listening socket a worker adopts: its service, descriptor and address family."""

    service: Service
    fd: int
    family: int

    def arg(self) -> str:
        return f"{self.service.value}={self.fd}:{self.family}"

    @classmethod
    def parse(cls, text: str) -> Inherited:
        name, _, rest = text.partition("=")
        fd, _, family = rest.partition(":")
        return cls(Service(name), int(fd), int(family))


class _WorkerProtocol(protocol.ProcessProtocol):
    """The main process's end of one worker: its lines, its exit."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.system = f"smtp-worker-{index}"
        self._buffer = b""
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > MAX_LINE:
            self._buffer = b""
        for line in lines:
            try:
                self.pool.received(self, line)
            except Exception:
                log.failure("bad message from {worker}", worker=self.system)

    def errReceived(self, data: bytes) -> None:
        # A worker writes to stderr only before its logging starts or as it dies.
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.error("{worker}: {line}", worker=self.system, line=line)

    def processEnded(self, reason: Failure) -> None:
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool:
    """The main process's workers: spawned, heard, restarted, stopped."""

    def __init__(self, reactor: Any, count: int, config_path: str | None, sockets: Iterable[Inherited],
                 on_queued: Callable[[bytes], None], on_delivered: Callable[[list[tuple[str, str]]], None]) -> None:
        self.reactor = reactor
        self.count = count
        self.config_path = config_path
        self.sockets = list(sockets)
        self.on_queued = on_queued
        self.on_delivered = on_delivered
        self.running = False
        self._live: dict[int, _WorkerProtocol] = {}
        self._delay: dict[int, float] = {}
        self._started: dict[int, float] = {}
        self._timers: dict[int, Any] = {}

    def start(self) -> None:
        self.running = True
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        self._timers.pop(index, None)
        if not self.running:
            return
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}
        args = [sys.executable, "-m", "mx.workers", "--index", str(index)]
        if self.config_path:
            args += ["--config", self.config_path]
        for n, sock in enumerate(self.sockets):
            child_fds[FIRST_FD + n] = sock.fd
            args += ["--listen", Inherited(sock.service, FIRST_FD + n, sock.family).arg()]
        proto = _WorkerProtocol(self, index)
        self._live[index] = proto
        self._started[index] = self.reactor.seconds()
        self.reactor.spawnProcess(proto, sys.executable, args, env=dict(os.environ), childFDs=child_fds)
        log.info("smtp worker {index} started", index=index, pid=proto.transport.pid)

    def received(self, proto: _WorkerProtocol, line: bytes) -> None:
        kind, body = line[:1], line[1:]
        if kind == b"L":
            event = eventFromJSON(body.decode("utf-8"))
            event["log_system"] = proto.system
            globalLogPublisher(event)
        elif kind == b"Q":
            self.on_queued(body)
        elif kind == b"D":
            self.on_delivered([(domain, local) for domain, local in json.loads(body)])

    def ended(self, proto: _WorkerProtocol, reason: Failure) -> None:
        index = proto.index
        if self._live.get(index) is proto:
            del self._live[index]
        if not self.running:
            return
        lived = self.reactor.seconds() - self._started.get(index, 0.0)
        delay = RESPAWN_DELAY if lived >= STABLE_AFTER else min(RESPAWN_MAX, self._delay.get(index, 0.0) * 2 or RESPAWN_DELAY)
        self._delay[index] = delay
        log.error("smtp worker {index} exited ({reason}); starting it again in {delay} s", index=index,
                  reason=reason.getErrorMessage(), delay=delay)
        self._timers[index] = self.reactor.callLater(delay, self._spawn, index)

    def stop(self) -> Deferred[None]:
        """SIGTERM to every worker; fires once all have exited (killed after `KILL_AFTER`)."""
        self.running = False
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        waits = []
        for proto in list(self._live.values()):
            _signal(proto, "TERM")
            kill = self.reactor.callLater(KILL_AFTER, _signal, proto, "KILL")
            proto.ended.addBoth(lambda r, k=kill: k.cancel() if k.active() else None)
            waits.append(proto.ended)
        return defer.gatherResults(waits).addCallback(lambda _: None)


def _signal(proto: _WorkerProtocol, name: str) -> None:
    try:
        proto.transport.signalProcess(name)
    except error.ProcessExitedAlready:
        pass


# -- the worker's side ------------------------------------------------------------------------


class Channel(protocol.Protocol):
    """The worker's end: lines to the main process on stdout (buffered by the transport,
    never blocking the reactor); stdin's end is the main process going away."""

    def __init__(self, on_lost: Callable[[], None]) -> None:
        self.on_lost = on_lost
        self._closed: Deferred[None] | None = None

    def send(self, kind: bytes, body: bytes) -> None:
        if self.transport is not None and self._closed is None:
            self.transport.write(kind + body + b"\n")

    def log_event(self, event: dict[str, Any]) -> None:
        self.send(b"L", eventAsJSON(event).encode("utf-8"))

    def close(self) -> Deferred[None]:
        """Stop sending; fires once every line sent so far is written (the worker's last
        log lines reach the main process before it exits)."""
        if self._closed is None:
            self._closed = Deferred()
            if self._lost:
                self._closed.callback(None)
            else:
                self.transport.loseConnection()
        return self._closed

    _lost = False

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        if self._closed is not None:
            self._closed.callback(None)
        else:
            self.on_lost()


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="mx.workers", description="an mx SMTP worker (started by the server)")
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--config", default=None)
    ap.add_argument("--listen", action="append", default=[], type=Inherited.parse)
    args = ap.parse_args(argv)

    from twisted.internet import reactor, stdio
    from twisted.logger import globalLogBeginner

    from mx import tap

    def orphaned() -> None:  # the main process is gone: stop as at SIGTERM
        if reactor.running:
            reactor.stop()

    channel = Channel(orphaned)
    stdio.StandardIO(channel, reactor=reactor)
    globalLogBeginner.beginLoggingTo([channel.log_event], redirectStandardIO=False)
    config = tap.load_config(args.config)
    mail = tap.build(config, reactor, inherited=args.listen, channel=channel)
    signal.signal(signal.SIGHUP, lambda *_: (reactor.callFromThread(mail.tls.reload),
                                              reactor.callFromThread(mail.mailauth.reload_keys)))

    def shutdown() -> Deferred[None]:
        d = defer.maybeDeferred(mail.stopService)
        d.addErrback(lambda f: log.failure("stopping the worker", f))
        return d.addBoth(lambda _: channel.close())

    reactor.callWhenRunning(mail.startService)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    return 0


def family_of(fd: int) -> int:
    """The address family of the listening socket `fd` (without taking ownership of it)."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        return int(s.family)
    finally:
        s.close()


if __name__ == "__main__":
    sys.exit(main())
