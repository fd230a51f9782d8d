"""Crash safety: `250` after DATA means durable, and `new/` never holds half a message.

A real `twistd -n mx` child takes mail from several concurrent clients and is killed with
SIGKILL in the middle of it. Afterwards every acknowledged message must be in its Maildir
exactly once, and every file in `new/` must be complete.
"""

from __future__ import annotations

import os
import random
import re
import signal
import smtplib
import socket
import threading
import time
from collections import Counter

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from tests.support import (
    Child,
    SOCKET_TIMEOUT,
    add_users,
    free_port,
    maildir,
    size_from_name,
    split_delivered,
    start_twistd,
    write_config,
)
from mx import config as configmod

THREADS = 4
MAX_MESSAGES = 400  # in total, over all threads
MAX_SECONDS = 10.0  # the senders stop by then whatever happens
KILL_AFTER = 1.5  # seconds of sending before SIGKILL
USERS = ("alice", "bob")
TOKEN = re.compile(rb"X-Token: (t\d+-\d+)\r\n")


def make_body(token: str, rnd: random.Random) -> bytes:
    """A message whose last line names its token; sizes vary from tiny to over 1 MiB."""
    kind = rnd.randrange(20)
    if kind == 0:
        lines = 1200  # ~1.2 MB: the spill-to-disk path
    elif kind < 5:
        lines = rnd.randint(100, 800)
    else:
        lines = rnd.randint(1, 20)
    filler = b"".join(b"%s line %05d of the message body, padded to look like text ........\r\n" % (
        b"." if i % 13 == 0 else b"", i) for i in range(lines))
    head = f"Subject: durability {token}\r\nX-Token: {token}\r\n\r\n".encode()
    return head + filler + f"END {token}\r\n".encode()


class Sender(threading.Thread):
    """Sends messages in a loop, recording which tokens got 250 after DATA."""

    def __init__(self, index: int, port: int, budget: threading.Semaphore, deadline: float) -> None:
        super().__init__(name=f"sender-{index}", daemon=True)
        self.index = index
        self.port = port
        self.budget = budget
        self.deadline = deadline
        self.acked: list[tuple[str, str, bytes]] = []  # (token, user, body)
        self.attempted = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rnd = random.Random(self.index)
        n = 0
        try:
            with smtplib.SMTP("127.0.0.1", self.port, local_hostname=f"c{self.index}.example",
                              timeout=SOCKET_TIMEOUT) as s:
                s.ehlo()
                while time.monotonic() < self.deadline and self.budget.acquire(blocking=False):
                    token = f"t{self.index}-{n}"
                    n += 1
                    user = USERS[rnd.randrange(len(USERS))]
                    body = make_body(token, rnd)
                    self.attempted += 1
                    s.mail("sender@remote.test")
                    code, _ = s.rcpt(f"{user}@example.test")
                    if code != 250:
                        raise AssertionError(f"RCPT refused: {code}")
                    code, _ = s.data(body)  # raises unless 250
                    self.acked.append((token, user, body))
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPDataError, smtplib.SMTPResponseException,
                ConnectionError, socket.timeout, OSError):
            pass  # the server was killed: expected
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e


class CrashTests(TestCase):
    timeout = 60

    async def test_sigkill_loses_nothing_acknowledged(self) -> None:
        port = free_port()
        path = write_config(self, listen={"smtp": f"tcp:{port}:interface=127.0.0.1"},
                            limits={"max_connections_per_ip": 50})
        config = configmod.load(path)
        add_users(config, {f"{u}@example.test": "pw" for u in USERS})
        child: Child = await deferToThread(start_twistd, self, path, port)

        def run() -> list[Sender]:
            budget = threading.Semaphore(MAX_MESSAGES)
            deadline = time.monotonic() + MAX_SECONDS
            senders = [Sender(i, port, budget, deadline) for i in range(THREADS)]
            for t in senders:
                t.start()
            # Kill mid-stream: after KILL_AFTER, or earlier once 3/4 of the budget is used
            # (a fast disk gets through all of it in well under KILL_AFTER).
            kill_at = time.monotonic() + KILL_AFTER
            while (time.monotonic() < kill_at and any(t.is_alive() for t in senders)
                   and sum(t.attempted for t in senders) < MAX_MESSAGES * 3 // 4):
                time.sleep(0.005)
            os.kill(child.process.pid, signal.SIGKILL)
            child.process.wait(timeout=10)
            for t in senders:
                t.join(timeout=MAX_SECONDS + SOCKET_TIMEOUT)
            return senders

        senders = await deferToThread(run)
        self.assertEqual(child.process.returncode, -signal.SIGKILL, child.output())
        for t in senders:
            self.assertFalse(t.is_alive(), t.name)
            self.assertIsNone(t.error, f"{t.name}: {t.error!r}")
        acked = [a for t in senders for a in t.acked]
        self.assertGreater(len(acked), 0, "no message was acknowledged before the kill")

        # Every file in new/ is complete: its size is the one in its name, and it is a whole
        # delivered message (trace headers + a body ending with its own END line).
        found: Counter[str] = Counter()
        where: dict[str, tuple[str, bytes]] = {}
        for user in USERS:
            for f in sorted((maildir(config, user) / "new").glob("*")) if (maildir(config, user) / "new").is_dir() else []:
                content = f.read_bytes()
                self.assertEqual(size_from_name(f), len(content), f"{f.name}: size differs from ,S=")
                _rp, _received, body = split_delivered(content)
                m = TOKEN.search(body)
                self.assertIsNotNone(m, f"{f.name}: no token")
                assert m is not None
                token = m.group(1).decode()
                self.assertTrue(body.endswith(f"\r\nEND {token}\r\n".encode()), f"{f.name}: incomplete")
                found[token] += 1
                where[token] = (user, body)
        # Every acknowledged message is there exactly once, in the right mailbox, byte-exact.
        for token, user, body in acked:
            self.assertEqual(found[token], 1, f"{token}: {found[token]} copies")
            self.assertEqual(where[token], (user, body), token)
        # Unacknowledged messages may be there (crash after fsync, before 250) but once at most.
        self.assertEqual([t for t, n in found.items() if n != 1], [])
        attempted = sum(t.attempted for t in senders)
        self.assertLess(attempted, MAX_MESSAGES, "the senders ran out of budget before the kill")
        self.assertLessEqual(len(found), attempted)
        self.assertLessEqual(len(found) - len(acked), THREADS)  # at most one in flight per client
