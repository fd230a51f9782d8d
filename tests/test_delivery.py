"""`mx.delivery` seams: the readers' hook after a commit, and the start-up spill clean-up."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mx import delivery
from mx.routing import LocalRecipient
from tests.support import DOMAIN, add_users, make_config, new_files, smtp_client, start_server


class OnDeliveredTests(TestCase):
    async def test_readers_hear_of_each_mailbox_after_the_copies_are_durable(self) -> None:
        config = make_config(self, listen={})
        add_users(config, {f"alice@{DOMAIN}": "pw", f"bob@{DOMAIN}": "pw"})
        server = await start_server(self, config)
        heard: list[tuple[tuple[LocalRecipient, ...], int]] = []

        def on_delivered(mailboxes: tuple[LocalRecipient, ...]) -> None:
            # Called after the commit: the file is already in new/.
            heard.append((mailboxes, len(new_files(config, "alice"))))

        server.factory.delivery.on_delivered = on_delivered

        def send() -> None:
            with smtp_client(server.port) as s:
                s.sendmail("x@elsewhere.test", [f"alice@{DOMAIN}", f"Bob+tag@{DOMAIN}"], b"Subject: hi\r\n\r\nhi\r\n")

        await deferToThread(send)
        self.assertEqual(heard, [((LocalRecipient("alice", DOMAIN), LocalRecipient("bob", DOMAIN)), 1)])


class RemoveSpilledTests(SynchronousTestCase):
    def test_removes_an_earlier_runs_files_and_never_this_runs(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        old = folder / "incoming.0badc0de.abc123"
        old.write_bytes(b"half a message from the last run")
        mine = folder / f"{delivery._RUN_PREFIX}xyz"
        mine.write_bytes(b"a message arriving right now")
        other = folder / "something-else"
        other.write_bytes(b"not ours")
        self.assertEqual(delivery.remove_spilled(folder), 1)
        self.assertEqual(sorted(p.name for p in folder.iterdir()), sorted([mine.name, other.name]))

    def test_missing_folder(self) -> None:
        self.assertEqual(delivery.remove_spilled(Path(self.mktemp())), 0)
