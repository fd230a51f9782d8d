"""Stale Maildir `tmp/` files (the Maildir specification's 36 hours) are removed by the
running server at start-up (and daily), in every user's Maildir and Maildir++ folder."""

from __future__ import annotations

import os
import time

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mx.store import sweep_tmp
from tests.support import make_config, start_mail_service

HOURS = 3600.0


def plant(path, age: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"half a delivery")
    then = time.time() - age
    os.utime(path, (then, then))


class SweepTests(SynchronousTestCase):
    def test_every_mailbox_and_folder(self) -> None:
        root = self.mktemp()
        from pathlib import Path

        mail = Path(root)
        stale = [mail / "a.test" / "alice" / "tmp" / "old1", mail / "b.test" / "bob" / ".Sent" / "tmp" / "old2"]
        fresh = [mail / "a.test" / "alice" / "tmp" / "new1", mail / "b.test" / "bob" / "tmp" / "new2"]
        for p in stale:
            plant(p, 40 * HOURS)
        for p in fresh:
            plant(p, 1 * HOURS)
        for box in (mail / "a.test" / "alice", mail / "b.test" / "bob", mail / "b.test" / "bob" / ".Sent"):
            for sub in ("cur", "new", "tmp"):
                (box / sub).mkdir(parents=True, exist_ok=True)
        (mail / "b.test" / "bob" / ".Sent" / "maildirfolder").write_bytes(b"")
        self.assertEqual(sweep_tmp(mail), 2)
        self.assertEqual([p.exists() for p in stale], [False, False])
        self.assertEqual([p.exists() for p in fresh], [True, True])
        self.assertEqual(sweep_tmp(mail / "missing"), 0)


class ServerSweepTests(TestCase):
    async def test_server_sweeps_at_start_up(self) -> None:
        config = make_config(self, listen={})
        box = config.data_dir / "mail" / "example.test" / "alice"
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(parents=True, exist_ok=True)
        plant(box / "tmp" / "stale", 37 * HOURS)
        plant(box / "tmp" / "fresh", 35 * HOURS)
        await start_mail_service(self, config)
        for _ in range(200):  # bounded: the sweep runs in the disk pool
            if not (box / "tmp" / "stale").exists():
                break
            await deferLater(reactor, 0.01)
        self.assertFalse((box / "tmp" / "stale").exists())
        self.assertTrue((box / "tmp" / "fresh").exists())
