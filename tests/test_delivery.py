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


class DeliveredNameTests(SynchronousTestCase):
    """The delivered file's name carries its size and, when known, its CRLF size (`,W=`)."""

    def stage(self, header: bytes, body: bytes) -> Path:
        from mx import durable, maildir

        md = Path(self.mktemp())
        staged = maildir.stage_copy(maildir.Delivery(md, header, body), set())
        durable.sync([staged])
        staged.tmp.rename(staged.final)
        return staged.final

    def test_crlf_message_has_w_equal_to_s(self) -> None:
        name = self.stage(b"Return-Path: <a@b>\r\n", b"Subject: x\r\n\r\nhi\r\n").name
        size = len(b"Return-Path: <a@b>\r\nSubject: x\r\n\r\nhi\r\n")
        self.assertTrue(name.endswith(f",S={size},W={size}"), name)

    def test_bare_lf_counted_in_w(self) -> None:
        name = self.stage(b"Return-Path: <a@b>\r\n", b"Subject: x\n\nhi\r\nthere\n").name
        size = len(b"Return-Path: <a@b>\r\nSubject: x\n\nhi\r\nthere\n")
        self.assertTrue(name.endswith(f",S={size},W={size + 3}"), name)

    def test_bare_lf_count_across_parts(self) -> None:
        from mx.maildir import bare_lf_count

        self.assertEqual(bare_lf_count([b"a\r", b"\nb\n", b"", b"\n"]), 2)
        self.assertEqual(bare_lf_count([b"a\r", b"", b"\nb"]), 0)
        self.assertEqual(bare_lf_count([b"\n", b"\r\n"]), 1)
        for parts in ([b"x\r\ny\n"], [b"x\r", b"\ny\n\r", b"\r\n"], [b"\n\n\r\n"]):
            joined = b"".join(parts)
            self.assertEqual(bare_lf_count(parts), joined.count(b"\n") - joined.count(b"\r\n"))

    def test_no_w_above_the_count_limit(self) -> None:
        from mx.maildir import W_COUNT_LIMIT

        name = self.stage(b"Return-Path: <a@b>\r\n", b"Subject: x\r\n\r\n" + b"y" * W_COUNT_LIMIT + b"\r\n").name
        self.assertRegex(name, r",S=\d+$")
