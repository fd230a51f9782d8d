"""`250` after DATA only once every file is durable: the order of the durable steps, seen.

A killed process cannot show a missing fsync (the page cache outlives it, so the SIGKILL test
passes with every `os.fsync` removed). These tests record instead, in a real in-process
server, every `os.open`/`write`/`fsync`/`rename`/`replace`/`link`/`close` on files under
`data_dir` (descriptors mapped back to their paths), and a marker when the server writes its
`250` after DATA, then check for every file that ends up in a Maildir `new/` or in `queue/`:

    data written -> the file fsynced -> renamed or linked to its final name
                 -> that name's folder fsynced -> the 250 marker

The recorders wrap the `os` module's functions (and call through to the real ones), so the
tests do not care which module does the work (durable, maildir, spool, the committer).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import (
    _toml,
    add_users,
    free_port,
    make_config,
    smtp_client,
    start_mail_service,
    start_server,
)

ALICE, BOB = "alice@example.test", "bob@example.test"
FWD, RCPT = "fwd@example.test", "rcpt@remote.test"
MESSAGE = b"From: <sender@client.example>\r\nSubject: durable\r\n\r\nkept, or never acknowledged\r\n"
DATA_OK = b"250 2.0.0 OK id="  # the reply to the final dot (RSET's 250 2.0.0 has no id)


@dataclass(frozen=True)
class Event:
    op: str  # open, write, fsync, close, rename, replace, link, 250
    path: str  # the file (for rename/replace/link: the source)
    dest: str = ""  # rename/replace/link: the new name


class Recorder:
    """Wraps `os` functions with `case.patch`; records the calls on paths under `root`."""

    def __init__(self, case: TestCase, root: Path) -> None:
        self.root = os.path.realpath(root) + os.sep
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._fds: dict[int, str] = {}
        real = {name: getattr(os, name) for name in ("open", "write", "fsync", "close", "rename", "replace", "link")}

        def path_of(p: Any, dir_fd: int | None = None) -> str:
            p = os.fsdecode(os.fspath(p))
            if dir_fd is not None and not os.path.isabs(p):
                base = self._fds.get(dir_fd)
                if base is None:
                    return ""
                p = os.path.join(base, p)
            return os.path.normpath(os.path.abspath(p))

        def mine(p: str) -> bool:
            return (p + os.sep).startswith(self.root)

        def rec_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
            fd = real["open"](path, flags, mode, dir_fd=dir_fd)
            with self._lock:
                p = path_of(path, dir_fd)
                if mine(p):
                    self._fds[fd] = p
                    self.events.append(Event("open", p))
                else:
                    self._fds.pop(fd, None)  # a reused number
            return fd

        def on_fd(op: str) -> Any:
            def wrapper(fd: int, *args: Any) -> Any:
                if op == "close":
                    # Forgotten before the real close: once closed, another thread's open may
                    # get the same number, and must not have its path taken for this one's.
                    with self._lock:
                        p = self._fds.pop(fd, None)
                        if p is not None:
                            self.events.append(Event(op, p))
                    return real[op](fd, *args)
                result = real[op](fd, *args)  # recorded once done: write/fsync returned
                with self._lock:
                    p = self._fds.get(fd)
                    if p is not None:
                        self.events.append(Event(op, p))
                return result

            return wrapper

        def on_names(op: str) -> Any:
            def wrapper(src: Any, dst: Any, *args: Any, **kwargs: Any) -> Any:
                result = real[op](src, dst, *args, **kwargs)
                with self._lock:
                    s, d = path_of(src), path_of(dst)
                    if mine(d) or mine(s):
                        self.events.append(Event(op, s, d))
                return result

            return wrapper

        case.patch(os, "open", rec_open)
        for op in ("write", "fsync", "close"):
            case.patch(os, op, on_fd(op))
        for op in ("rename", "replace", "link"):
            case.patch(os, op, on_names(op))

    def mark(self, label: str) -> None:
        with self._lock:
            self.events.append(Event(label, ""))

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)


def watch_data_reply(case: TestCase, factory: Any, recorder: Recorder) -> None:
    """Append a `250` event when a protocol of `factory` writes its reply to the final dot."""
    build = factory.buildProtocol

    def build_protocol(addr: Any) -> Any:
        protocol = build(addr)
        make_connection = protocol.makeConnection

        def connected(transport: Any) -> None:
            write = transport.write

            def recording_write(data: bytes) -> None:
                if data.startswith(DATA_OK) or b"\r\n" + DATA_OK in data:
                    recorder.mark("250")
                write(data)

            transport.write = recording_write
            make_connection(transport)

        protocol.makeConnection = connected
        return protocol

    case.patch(factory, "buildProtocol", build_protocol)


def send(port: int, rcpts: list[str]) -> tuple[int, bytes]:
    with smtp_client(port) as s:
        s.ehlo()
        assert s.mail("sender@client.example")[0] == 250
        for r in rcpts:
            code, text = s.rcpt(r)
            assert code == 250, (r, code, text)
        reply = s.data(MESSAGE)
        s.quit()
    return reply


class FsyncOrderTests(TestCase):
    timeout = 60

    def assertDurableBefore250(self, events: list[Event], finals: list[Path]) -> None:
        """For each file in `finals`: write < fsync(file) < rename/link to it < fsync(its
        folder) < the 250 marker, all among the events before that marker."""
        self.assertTrue(finals, "no files to check")
        marks = [i for i, e in enumerate(events) if e.op == "250"]
        self.assertEqual(len(marks), 1, "one 250 reply to the final dot")
        before = events[: marks[0]]
        trace = "\n".join(f"  {i:3} {e.op:7} {e.path} {e.dest}" for i, e in enumerate(events))
        for final in finals:
            name = os.path.normpath(os.path.realpath(final))
            published = [
                i for i, e in enumerate(before) if e.op in ("rename", "replace", "link") and e.dest == name
            ]
            self.assertTrue(published, f"{name} was not renamed or linked into place before the 250:\n{trace}")
            p = published[0]
            tmp = before[p].path
            writes = [i for i, e in enumerate(before[:p]) if e.op == "write" and e.path == tmp]
            self.assertTrue(writes, f"no data written to {tmp} before it became {name}:\n{trace}")
            syncs = [i for i, e in enumerate(before[:p]) if e.op == "fsync" and e.path == tmp and i > writes[-1]]
            self.assertTrue(syncs, f"{tmp} not fsynced after its last write and before it became {name}:\n{trace}")
            folder = os.path.dirname(name)
            dir_syncs = [i for i, e in enumerate(before) if i > p and e.op == "fsync" and e.path == folder]
            self.assertTrue(dir_syncs, f"{folder} not fsynced after {name} appeared and before the 250:\n{trace}")

    async def test_local_delivery(self) -> None:
        """Two local recipients: each copy in its own Maildir `new/`."""
        config = make_config(self)
        add_users(config, {ALICE: "a-pw", BOB: "b-pw"})
        server = await start_server(self, config)
        recorder = Recorder(self, config.data_dir)
        watch_data_reply(self, server.factory, recorder)
        code, text = await deferToThread(send, server.port, [ALICE, BOB])
        self.assertEqual(code, 250, text)
        finals = sorted(config.data_dir.glob("mail/*/*/new/*"))
        self.assertEqual(len(finals), 2, finals)
        self.assertDurableBefore250(recorder.snapshot(), finals)

    async def test_queued_and_local(self) -> None:
        """A local recipient and an alias to a remote one: the Maildir copy and both queue
        files (`.eml` body and `.json` record). The relay runs on a `Clock` nobody advances,
        so the queue files stay as the commit left them."""
        config = make_config(
            self,
            listen={"smtp": "tcp:0:interface=127.0.0.1"},
            aliases={FWD: [RCPT]},
            extra=f"[relay]\nsmarthost = {_toml(f'127.0.0.1:{free_port()}')}\n",
        )
        add_users(config, {ALICE: "a-pw"})
        recorder = Recorder(self, config.data_dir)
        mail = await start_mail_service(self, config, clock=Clock())
        [factory] = [f for f, s in zip(mail.factories, mail.listeners) if s.name == "smtp"]
        watch_data_reply(self, factory, recorder)
        code, text = await deferToThread(send, mail.smtp_port, [ALICE, FWD])
        self.assertEqual(code, 250, text)
        queue = config.data_dir / "queue"
        bodies, records = sorted(queue.glob("*.eml")), sorted(queue.glob("*.json"))
        self.assertEqual((len(bodies), len(records)), (1, 1), sorted(queue.iterdir()))
        mailbox = sorted(config.data_dir.glob("mail/*/*/new/*"))
        self.assertEqual(len(mailbox), 1, mailbox)
        self.assertDurableBefore250(recorder.snapshot(), mailbox + bodies + records)
