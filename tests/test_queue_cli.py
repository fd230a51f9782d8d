"""`mx queue list|show|delete|flush` against a live `twistd -n mx` child process.

The server relays through a smarthost on 127.0.0.2 with `retry = ["1h"]`: while nothing
listens there, a message's first attempt fails and it stays queued with its error; aiosmtpd
is started on that address when a test wants the remote up. The command line runs as a
subprocess (`python -m mx.cli --config PATH ...`) in a thread, since it may block up to 5 s
waiting for the server to pick up a request.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mx.control import server_running
from tests.support import (
    Child,
    common_free_port,
    free_port,
    queue_records,
    run_mx,
    smtp_client,
    start_remote_mx,
    start_twistd_smtp,
    write_config,
)

ALICE = "alice@example.test"
FWD = "fwd@example.test"
RCPT = "rcpt@remote.test"
REMOTE = "127.0.0.2"


class QueueCommandTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.remote_port = common_free_port((REMOTE,))
        self.smtp_port = free_port()
        extra = f'[relay]\nsmarthost = "{REMOTE}:{self.remote_port}"\nretry = ["1h"]\ntls = "off"\n'
        self.path = write_config(self, listen={"smtp": f"tcp:{self.smtp_port}:interface=127.0.0.1"},
                                 aliases={FWD: [RCPT]}, extra=extra)
        self.data_dir = self.path.parent / "data"
        self.queue_dir = self.data_dir / "queue"

    # -- helpers -----------------------------------------------------------------------------

    async def serve(self) -> Child:
        return await deferToThread(start_twistd_smtp, self, self.path, self.smtp_port)

    async def stop(self, child: Child) -> None:
        child.process.terminate()  # SIGTERM: a clean shutdown, the queue lock released
        code = await deferToThread(child.process.wait, 15)
        # twistd ends a SIGTERM shutdown by re-raising the signal on itself (exit -15)
        self.assertIn(code, (0, -15), child.output())
        self.assertIn("mx stopped", child.output())

    async def mx(self, *args: str) -> Any:
        return await deferToThread(run_mx, self.path, *args)

    async def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            await deferLater(reactor, 0.02)
        self.fail(f"timed out after {timeout}s waiting for {what}")

    async def queue_message(self, subject: str = "queued one") -> str:
        """Send a message for the remote (down); return its id once its first attempt failed."""

        def client() -> tuple[int, bytes]:
            with smtp_client(self.smtp_port) as s:
                s.ehlo()
                s.mail(ALICE)
                s.rcpt(FWD)
                reply = s.data(f"From: <{ALICE}>\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())
                s.quit()
                return reply

        code, text = await deferToThread(client)
        self.assertEqual(code, 250, text)
        m = re.search(rb"id=([0-9A-Za-z]+)", text)
        assert m is not None, text
        queue_id = m.group(1).decode()

        def attempted() -> bool:
            entry = queue_records(self.data_dir).get(queue_id)
            return entry is not None and entry.recipients[0].attempts == 1 and bool(entry.recipients[0].last_error)

        await self.wait(attempted, 10, "the first attempt")
        return queue_id

    def files_of(self, queue_id: str) -> list[str]:
        return sorted(p.name for p in self.queue_dir.iterdir() if p.name.startswith(queue_id))

    def assertOK(self, result: Any) -> None:
        self.assertEqual((result.returncode, result.stderr), (0, ""), result)

    def assertFails(self, result: Any, text: str) -> None:
        self.assertEqual(result.returncode, 1, result)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("mx: "), result.stderr)
        self.assertIn(text, result.stderr)

    # -- tests --------------------------------------------------------------------------------

    async def test_list_json_and_show(self) -> None:
        await self.serve()
        queue_id = await self.queue_message()

        result = await self.mx("queue", "list")
        self.assertOK(result)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 3, result.stdout)  # heading, the row, its last error
        for word in ("ID", "AGE", "SENDER", "TRIES", "NEXT", "RECIPIENTS", "LAST ERROR"):
            self.assertIn(word, lines[0])
        row = rf"^{queue_id}\s+\d+s\s+<{ALICE}>\s+1\s+(59m|1h)\s+{RCPT}$"
        self.assertRegex(lines[1], row)
        self.assertIn(f"connect to [{REMOTE}]:{self.remote_port} failed", lines[2])
        self.assertIn("refused", lines[2])

        result = await self.mx("queue", "list", "--json")
        self.assertOK(result)
        [row_json] = json.loads(result.stdout)
        self.assertEqual(
            {k: row_json[k] for k in ("id", "sender", "recipients", "attempts")},
            {"id": queue_id, "sender": ALICE, "recipients": [RCPT], "attempts": 1},
        )
        self.assertGreaterEqual(row_json["age"], 0)
        self.assertLess(row_json["age"], 60)
        self.assertGreater(row_json["next_attempt"], time.time() + 50 * 60)  # retry = 1h
        self.assertIn("refused", row_json["last_error"])

        result = await self.mx("queue", "show", queue_id)
        self.assertOK(result)
        out = result.stdout
        self.assertIn(f"id: {queue_id}\n", out)
        self.assertIn(f"sender: <{ALICE}>\n", out)
        self.assertRegex(out, rf"recipient: <{re.escape(RCPT)}> pending, 1 attempts, next \d{{4}}-")
        self.assertRegex(out, r"\n  last: connect to .* refused")
        self.assertIn("\nSubject: queued one\n", out)
        self.assertRegex(out, r"\nReceived: from ")
        self.assertNotIn("body", out)  # headers only

        for command in ("show", "delete"):
            self.assertFails(await self.mx("queue", command, "0000000000UNKNOWN"), "no such queued message")
            self.assertFails(await self.mx("queue", command, "../etc"), "invalid queue id")
        self.assertEqual(list(queue_records(self.data_dir)), [queue_id])  # untouched

    async def test_flush_makes_the_server_retry_within_5s(self) -> None:
        await self.serve()
        queue_id = await self.queue_message()
        remote = start_remote_mx(self, REMOTE, self.remote_port, "smarthost.test")
        started = time.monotonic()
        result = await self.mx("queue", "flush")
        self.assertOK(result)
        await self.wait(lambda: queue_records(self.data_dir) == {}, 5 - (time.monotonic() - started),
                        "delivery after the flush")
        self.assertEqual([(m.sender, m.rcpts, m.subject) for m in remote.messages], [(ALICE, [RCPT], "queued one")])
        self.assertEqual(self.files_of(queue_id), [])
        result = await self.mx("queue", "list")
        self.assertOK(result)
        self.assertEqual(result.stdout, "queue is empty\n")

    async def test_delete_on_a_live_server(self) -> None:
        await self.serve()
        doomed = await self.queue_message("doomed")
        result = await self.mx("queue", "delete", doomed)
        self.assertOK(result)
        self.assertEqual(result.stdout, f"deleted {doomed}\n")
        self.assertEqual(self.files_of(doomed), [])
        self.assertEqual(json.loads((await self.mx("queue", "list", "--json")).stdout), [])
        # The server forgot it too: a flush delivers a later message, never the deleted one.
        kept = await self.queue_message("kept")
        remote = start_remote_mx(self, REMOTE, self.remote_port, "smarthost.test")
        self.assertOK(await self.mx("queue", "flush"))
        await self.wait(lambda: queue_records(self.data_dir) == {}, 5, "delivery after the flush")
        self.assertEqual([m.subject for m in remote.messages], ["kept"])
        self.assertEqual(self.files_of(kept), [])

    async def test_delete_without_a_server(self) -> None:
        child = await self.serve()
        queue_id = await self.queue_message()
        other = await self.queue_message("another")
        await self.stop(child)
        self.assertFalse(server_running(self.queue_dir))
        self.assertEqual(self.files_of(queue_id), [f"{queue_id}.eml", f"{queue_id}.json"])

        result = await self.mx("queue", "delete", queue_id)
        self.assertOK(result)
        self.assertEqual(result.stdout, f"deleted {queue_id}\n")
        self.assertEqual(self.files_of(queue_id), [])
        rows = json.loads((await self.mx("queue", "list", "--json")).stdout)
        self.assertEqual([r["id"] for r in rows], [other])
        self.assertFails(await self.mx("queue", "delete", queue_id), "no such queued message")
        self.assertFails(await self.mx("queue", "show", queue_id), "no such queued message")


class ControlWatchTests(TestCase):
    """In-process: a request is picked up at once (inotify), not at the next poll."""

    timeout = 30

    async def test_request_handled_without_waiting_for_the_poll(self) -> None:
        from mx import tap
        from mx.control import control_dir, write_request
        from tests.support import make_config, start_mail_service

        self.patch(tap, "POLL_INTERVAL", 3600.0)  # the poll would come in an hour
        config = make_config(self)
        mail = await start_mail_service(self, config)
        root = mail.spool.root
        await deferLater(reactor, 0.1)  # the watch is set once the queue is loaded
        started = time.monotonic()
        paths = [write_request(root, "flush") for _ in range(3)]  # a burst: each is handled
        while any(p.exists() for p in paths) and time.monotonic() - started < 5:
            await deferLater(reactor, 0.02)
        self.assertEqual([p for p in paths if p.exists()], [])
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual([n for n in control_dir(root).iterdir() if not n.name.startswith(".")], [])
