"""Tests for what IMAP needs from mx.store: APPEND, COPY, INTERNALDATE, \\Recent, DELETE,
RENAME, special-use folders; and Dovecot reading what they wrote.

Real files in a temp dir; failures are injected by patching `os` (fsync, link) where the
store calls it. The Dovecot tests use a private Dovecot (tests/dovecot.py) and skip with the
reason when none can run here.
"""

from __future__ import annotations

import errno
import imaplib
import os
import re
import stat
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mx.maildir import ensure_maildir, unique_name
from mx.store import SPECIAL_USE, Folder, Mailbox, MessageGone, StoreError
from mx.store.folder import arrival_key
from mx.store.mailbox import TRASH_DIR
from mx.store.write import unique_bases
from tests.dovecot import DovecotInstance, dovecot_available, start_dovecot

DOMAIN = "example.test"
ALICE = f"alice@{DOMAIN}"
PASSWORDS = {ALICE: "alice-secret"}
BODY = b"From: a@example.test\r\nSubject: appended\r\n\r\nhello\r\n"
WHEN = 1_600_000_000.0  # 2020-09-13T12:26:40Z


def deliver(maildir: Path, body: bytes = b"Subject: t\r\n\r\nhi\r\n") -> str:
    """Drop a message into new/ as a delivery agent would (tmp/, then rename)."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    name = unique_name(len(body))
    (maildir / "tmp" / name).write_bytes(body)
    os.rename(maildir / "tmp" / name, maildir / "new" / name)
    return name


def files(maildir: Path, sub: str) -> list[str]:
    return sorted(os.listdir(maildir / sub))


def failing_fsync(real: Any, *, dirs_only: bool = False) -> Any:
    def fsync(fd: int) -> None:
        if not dirs_only or stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error (injected)")
        real(fd)

    return fsync


class AppendTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.md = Path(self.mktemp())
        ensure_maildir(self.md)
        self.folder = Folder.open(self.md)

    def test_append_writes_cur_with_flags_size_and_internaldate(self) -> None:
        info = self.folder.append(BODY, "SF", internaldate=WHEN)
        self.assertEqual((info.uid, info.subdir, info.flags, info.size), (1, "cur", frozenset("FS"), len(BODY)))
        self.assertEqual(files(self.md, "cur"), [info.name])
        self.assertTrue(info.name.endswith(f",S={len(BODY)}:2,FS"), info.name)
        self.assertEqual(info.name.split(":")[0], info.base)
        self.assertEqual(files(self.md, "tmp"), [], "no tmp file left on success")
        self.assertEqual(files(self.md, "new"), [])
        path = self.md / "cur" / info.name
        st = os.stat(path)
        self.assertEqual((st.st_mtime, st.st_atime), (WHEN, WHEN))
        self.assertEqual(path.read_bytes(), BODY)
        self.assertIn(f"1 :{info.base}\n", (self.md / "dovecot-uidlist").read_text())

    def test_append_without_internaldate_is_now(self) -> None:
        before = time.time()
        info = self.folder.append(BODY)
        self.assertEqual(info.flags, frozenset())
        self.assertTrue(info.name.endswith(":2,"))
        self.assertGreaterEqual(os.stat(self.md / "cur" / info.name).st_mtime, before - 1)

    def test_uids_in_order_and_stable_after_reopen(self) -> None:
        infos = [self.folder.append(BODY + b"%d" % i, "S" if i % 2 else "", WHEN + i) for i in range(5)]
        self.assertEqual([i.uid for i in infos], [1, 2, 3, 4, 5])
        again = Folder.open(self.md)
        self.assertEqual([(m.uid, m.base, m.flags) for m in again.messages()],
                         [(i.uid, i.base, i.flags) for i in infos])
        self.assertEqual(again.internaldates(range(1, 6)), {i: WHEN + i - 1 for i in range(1, 6)})
        self.assertEqual(again.uidvalidity, self.folder.uidvalidity)
        self.assertEqual(self.folder.assigned_uidvalidity, self.folder.uidvalidity)

    def test_refresh_reports_the_appended_message_once(self) -> None:
        """append leaves the table alone; refresh() then reports the message as new, once."""
        info = self.folder.append(BODY)
        self.assertIsNone(self.folder.get(info.uid))
        self.assertEqual(len(self.folder), 0)
        changes = self.folder.refresh()
        self.assertEqual([m.uid for m in changes.new], [info.uid])
        self.assertEqual(self.folder.get(info.uid), info)
        self.assertFalse(self.folder.refresh())

    def test_refresh_reports_concurrent_delivery_in_uid_order(self) -> None:
        """A message delivered into new/ before the append gets the lower UID; refresh()
        reports both, in UID order (the session never has to insert below an announced one)."""
        delivered = deliver(self.md)
        info = self.folder.append(BODY)
        self.assertEqual(info.uid, 2)
        changes = self.folder.refresh()
        self.assertEqual([(m.uid, m.base) for m in changes.new], [(1, delivered), (2, info.base)])
        self.assertEqual([m.uid for m in self.folder.messages()], [1, 2])

    def test_append_keyword_letters(self) -> None:
        letter = self.folder.keywords.letter("$Work", create=True)
        info = self.folder.append(BODY, {"S", letter})
        self.assertEqual(info.flags, frozenset({"S", "a"}))
        self.assertTrue(info.name.endswith(":2,Sa"))

    def test_bad_flags_refused_before_writing(self) -> None:
        self.assertRaises(ValueError, self.folder.append, BODY, ["\\Seen"])
        self.assertEqual(files(self.md, "tmp") + files(self.md, "cur"), [])

    def test_file_fsync_failure_leaves_nothing(self) -> None:
        self.patch(os, "fsync", failing_fsync(os.fsync))
        e = self.assertRaises(StoreError, self.folder.append, BODY)
        self.assertIn("Input/output error", str(e))
        self.assertEqual(files(self.md, "tmp") + files(self.md, "cur") + files(self.md, "new"), [])

    def test_cur_fsync_failure_leaves_nothing_in_cur(self) -> None:
        self.patch(os, "fsync", failing_fsync(os.fsync, dirs_only=True))
        self.assertRaises(StoreError, self.folder.append, BODY)
        self.assertEqual(files(self.md, "tmp") + files(self.md, "cur"), [])
        self.assertFalse((self.md / "dovecot-uidlist.lock").exists())

    def test_uidlist_write_failure_removes_the_published_file(self) -> None:
        """Published into cur/ inside the lock, then the uidlist cannot be written: the file
        goes again, so a NO to APPEND means nothing was appended."""
        from mx.store.dotlock import DotLock

        def broken(lock: DotLock, data: bytes) -> None:
            lock.release()
            raise StoreError("cannot write dovecot-uidlist (injected)")

        self.patch(DotLock, "replace", broken)
        self.assertRaises(StoreError, self.folder.append, BODY)
        self.assertEqual(files(self.md, "tmp") + files(self.md, "cur"), [])

    def test_missing_folder(self) -> None:
        folder = Folder.open(self.md)
        os.rename(self.md, str(self.md) + ".gone")
        self.assertRaises(StoreError, folder.append, BODY)


class DatesAndRecentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.md = Path(self.mktemp())
        ensure_maildir(self.md)

    def test_internaldate_is_mtime_and_follows_a_rename(self) -> None:
        n = deliver(self.md)
        os.utime(self.md / "new" / n, (WHEN, WHEN))
        deliver(self.md)
        f = Folder.open(self.md)
        self.assertEqual(f.internaldate(1), WHEN)
        os.rename(self.md / "new" / n, self.md / "cur" / f"{n}:2,S")  # another session
        self.assertEqual(f.internaldate(1), WHEN)
        self.assertEqual(f.get(1).flags, frozenset("S"))
        os.unlink(self.md / "cur" / f"{n}:2,S")
        self.assertRaises(MessageGone, f.internaldate, 1)
        self.assertRaises(MessageGone, f.internaldate, 99)
        self.assertEqual(list(f.internaldates([1, 2, 99])), [2])

    def test_take_recent(self) -> None:
        deliver(self.md)
        deliver(self.md)
        f = Folder.open(self.md, take_new=True)
        self.assertEqual(f.take_recent(), {1, 2})
        self.assertEqual(f.take_recent(), set())
        deliver(self.md)
        f.refresh()
        self.assertEqual(f.take_recent(), {3})
        other = Folder.open(self.md, take_new=True)
        self.assertEqual(other.take_recent(), set(), "only the session that moved them")
        f.append(BODY)
        f.refresh()
        self.assertEqual(f.take_recent(), set(), "an appended message goes straight to cur/")
        self.assertEqual(Folder.open(self.md).take_recent(), set())

    def test_in_new_for_examine(self) -> None:
        deliver(self.md)
        f = Folder.open(self.md)
        self.assertTrue(f.in_new(1))
        self.assertFalse(f.in_new(42))
        Folder.open(self.md, take_new=True)  # a read-write session moves it
        f.refresh()
        self.assertFalse(f.in_new(1))


class CopyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        ensure_maildir(self.root)
        self.mb = Mailbox(self.root)
        self.mb.create("Archive")
        self.src = self.mb.inbox()
        self.infos = [self.src.append(b"message %d\r\n" % i, "S" if i == 1 else "", WHEN + i) for i in range(3)]
        self.src.refresh()
        self.dest = self.mb.folder("Archive")

    def dest_files(self) -> dict[int, Path]:
        d = Folder.open(self.root / ".Archive")
        return {m.uid: d.path / m.subdir / m.name for m in d.messages()}

    def test_copy_in_given_order_with_bytes_flags_and_mtime(self) -> None:
        pairs = self.src.copy_into([3, 1, 2], self.dest)
        self.assertEqual(pairs, [(3, 1), (1, 2), (2, 3)])
        copies = self.dest_files()
        for src_uid, dest_uid in pairs:
            original = self.infos[src_uid - 1]
            copy = copies[dest_uid]
            self.assertEqual(copy.read_bytes(), b"message %d\r\n" % (src_uid - 1))
            self.assertEqual(os.stat(copy).st_mtime, WHEN + src_uid - 1)
            self.assertTrue(copy.name.endswith(":2," + "".join(sorted(original.flags))), copy.name)
            self.assertNotEqual(copy.name.split(":")[0], original.base, "a fresh unique base")
            src_path = self.root / "cur" / original.name
            self.assertEqual(os.stat(copy).st_ino, os.stat(src_path).st_ino, "a hard link")
        self.assertEqual(files(self.root / ".Archive", "tmp"), [])
        self.assertEqual(len(self.src.messages()), 3, "the source keeps its messages")

    def test_copies_reported_by_refresh_and_stable_after_reopen(self) -> None:
        self.assertEqual(len(self.dest), 0)
        pairs = self.src.copy_into([1, 2, 3], self.dest)
        self.assertEqual(len(self.dest), 0, "copy_into leaves the table alone")
        self.assertEqual([m.uid for m in self.dest.refresh().new], [d for _, d in pairs])
        self.assertFalse(self.dest.refresh())
        again = Folder.open(self.root / ".Archive")
        self.assertEqual([(m.uid, m.base) for m in again.messages()],
                         [(m.uid, m.base) for m in self.dest.messages()])
        self.assertEqual(self.dest.assigned_uidvalidity, again.uidvalidity)
        more = self.src.copy_into([2], self.dest)
        self.assertEqual(more, [(2, 4)])

    def test_vanished_and_unknown_sources_are_skipped(self) -> None:
        os.unlink(self.root / "cur" / self.infos[1].name)  # expunged by another session
        pairs = self.src.copy_into([1, 2, 77, 3], self.dest)
        self.assertEqual(pairs, [(1, 1), (3, 2)])
        self.assertEqual(sorted(self.dest_files()), [1, 2])

    def test_copy_follows_a_rename(self) -> None:
        old = self.root / "cur" / self.infos[0].name
        os.rename(old, self.root / "cur" / f"{self.infos[0].base}:2,FS")
        self.assertEqual(self.src.copy_into([1], self.dest), [(1, 1)])
        self.assertTrue(self.dest_files()[1].name.endswith(":2,FS"))

    def test_keywords_remapped_by_name(self) -> None:
        kw = self.src.keywords
        work, home = kw.letter("$Work", create=True), kw.letter("$Home", create=True)
        self.assertEqual((work, home), ("a", "b"))
        self.src.set_flags(1, {"S", work, home})
        self.src.set_flags(2, {"c"})  # a letter dovecot-keywords does not name: dropped
        self.assertEqual(self.dest.keywords.letter("$Home", create=True), "a")  # the dest's own order
        pairs = self.src.copy_into([1, 2], self.dest)
        self.dest.refresh()
        copied = self.dest.get(pairs[0][1])
        names = {self.dest.keywords.name(c) for c in copied.flags if c.islower()}
        self.assertEqual(names, {"$Work", "$Home"})
        self.assertEqual(copied.flags, frozenset({"S", "a", "b"}))
        self.assertEqual(self.dest.keywords.mapping(), {"a": "$Home", "b": "$Work"})
        self.assertEqual(self.dest.get(pairs[1][1]).flags, frozenset())

    def test_copy_into_the_same_folder(self) -> None:
        self.src.keywords.letter("$Work", create=True)
        self.src.set_flags(1, {"a"})
        pairs = self.src.copy_into([1, 2], self.src)
        self.assertEqual(pairs, [(1, 4), (2, 5)])
        new = self.src.refresh().new
        self.assertEqual([(m.uid, m.flags) for m in new], [(4, frozenset("a")), (5, frozenset("S"))])

    def test_byte_copy_across_file_systems(self) -> None:
        real_link = os.link

        def link(src: Any, dst: Any, *a: Any, **k: Any) -> None:
            if Path(dst).parent.name == "tmp":
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real_link(src, dst, *a, **k)

        self.patch(os, "link", link)
        pairs = self.src.copy_into([2, 1], self.dest)
        self.assertEqual(pairs, [(2, 1), (1, 2)])
        copies = self.dest_files()
        self.assertEqual(copies[1].read_bytes(), b"message 1\r\n")
        self.assertEqual(os.stat(copies[1]).st_mtime, WHEN + 1)
        self.assertNotEqual(os.stat(copies[1]).st_ino, os.stat(self.root / "cur" / self.infos[1].name).st_ino)
        self.assertEqual(files(self.root / ".Archive", "tmp"), [])

    def test_failed_copy_leaves_nothing(self) -> None:
        self.patch(os, "fsync", failing_fsync(os.fsync, dirs_only=True))
        self.assertRaises(StoreError, self.src.copy_into, [1, 2, 3], self.dest)
        self.assertEqual(files(self.root / ".Archive", "tmp") + files(self.root / ".Archive", "cur"), [])
        self.patch(os, "fsync", failing_fsync(os.fsync))
        self.patch(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "cross-device")))
        self.assertRaises(StoreError, self.src.copy_into, [1, 2, 3], self.dest)
        self.assertEqual(files(self.root / ".Archive", "tmp") + files(self.root / ".Archive", "cur"), [])

    def test_unique_bases_ascend_when_the_clock_stands_still(self) -> None:
        self.patch(time, "time", lambda: 1_700_000_000.5)
        bases = unique_bases([(10, None), (20, 22), (30, None)])
        self.assertEqual(len(set(bases)), 3)
        self.assertEqual([arrival_key(b)[:2] for b in bases],
                         [(1_700_000_000, 500_000), (1_700_000_000, 500_001), (1_700_000_000, 500_002)])
        self.assertTrue(bases[0].endswith(",S=10"), bases[0])
        self.assertTrue(bases[1].endswith(",S=20,W=22"), bases[1])
        self.patch(time, "time", lambda: 1_700_000_000.9999996)
        keys = [arrival_key(b)[:2] for b in unique_bases([(1, None)] * 3)]
        self.assertEqual(keys, [(1_700_000_000, 999_999), (1_700_000_001, 0), (1_700_000_001, 1)])


class MailboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        ensure_maildir(self.root)
        self.logged: list[str] = []
        self.mb = Mailbox(self.root, log=self.logged.append)

    def dirs(self) -> list[str]:
        return sorted(n for n in os.listdir(self.root) if n.startswith("."))

    def test_create_is_flat_maildirplusplus_and_utf7(self) -> None:
        self.mb.create("a.b")
        self.mb.create("Entwürfe.Été")
        self.assertEqual(self.dirs(), [".Entw&APw-rfe.&AMk-t&AOk-", ".a.b"])
        self.assertEqual(self.mb.list_folders(), ["INBOX", "Entwürfe.Été", "a.b"])
        self.assertFalse(self.mb.exists("a"))
        self.assertTrue(self.mb.has_children("a"))
        self.assertTrue(self.mb.has_children("Entwürfe"))
        self.assertFalse(self.mb.has_children("a.b"))
        self.assertFalse(self.mb.has_children("INBOX"))
        self.assertFalse(self.mb.has_children("b"))
        f = self.mb.folder("Entwürfe.Été")
        self.assertEqual(f.append(BODY).uid, 1)

    def test_delete_removes_folder_keeps_children_and_subscription(self) -> None:
        self.mb.create("a")
        self.mb.create("a.b")
        self.mb.subscribe("a")
        self.mb.folder("a").append(BODY)
        self.mb.delete("a")
        self.assertEqual(self.dirs(), [".a.b"])
        self.assertEqual(self.mb.list_folders(), ["INBOX", "a.b"])
        self.assertTrue(self.mb.has_children("a"))
        self.assertEqual(self.mb.subscriptions(), ["a"], "RFC 3501 §6.3.4: the subscription stays")
        self.assertRaises(StoreError, self.mb.delete, "a")
        self.assertRaises(StoreError, self.mb.delete, "nope")
        e = self.assertRaises(StoreError, self.mb.delete, "inbox")
        self.assertIn("INBOX", str(e))
        self.mb.create("a")  # the name can be used again
        self.assertEqual(Folder.open(self.root / ".a").messages(), [])

    def test_delete_with_a_leftover_trash(self) -> None:
        """A trash left by a crash is never listed, and the next delete removes it too."""
        leftover = self.root / TRASH_DIR
        (leftover / "cur").mkdir(parents=True)
        (leftover / "cur" / "old-message").write_bytes(b"x")
        self.assertEqual(self.mb.list_folders(), ["INBOX"])
        self.assertFalse(self.mb.has_children("DOVECOT-TRASHED"))
        self.mb.create("Junk")
        self.mb.delete("Junk")
        self.assertEqual(self.dirs(), [])

    def test_rename_with_children_keeps_uids_and_uidvalidity(self) -> None:
        for name in ("a", "a.x", "a.x.y", "ab"):
            self.mb.create(name)
        infos = [self.mb.folder("a").append(BODY + b"%d" % i) for i in range(3)]
        child = self.mb.folder("a.x").append(BODY)
        validity = self.mb.folder("a").uidvalidity
        self.mb.subscribe("a")
        self.mb.rename("a", "b")
        self.assertEqual(self.dirs(), [".ab", ".b", ".b.x", ".b.x.y"])
        moved = self.mb.folder("b")
        self.assertEqual(moved.uidvalidity, validity)
        self.assertEqual([(m.uid, m.base) for m in moved.messages()], [(i.uid, i.base) for i in infos])
        self.assertEqual([m.base for m in self.mb.folder("b.x").messages()], [child.base])
        self.assertEqual(self.mb.subscriptions(), ["a"], "subscriptions are left as they are")
        self.assertEqual(moved.append(BODY).uid, 4)

    def test_rename_refusals(self) -> None:
        for name in ("a", "a.x", "b.x", "c"):
            self.mb.create(name)
        before = self.dirs()
        self.assertRaises(StoreError, self.mb.rename, "a", "c")  # exists
        self.assertRaises(StoreError, self.mb.rename, "nope", "d")  # missing
        self.assertRaises(StoreError, self.mb.rename, "a", "a.z")  # below itself
        self.assertRaises(StoreError, self.mb.rename, "a", "a")
        self.assertRaises(StoreError, self.mb.rename, "c", "INBOX")
        e = self.assertRaises(StoreError, self.mb.rename, "a", "b")  # .a.x -> .b.x exists
        self.assertIn(".b.x", str(e))
        self.assertEqual(self.dirs(), before, "a refused rename renames nothing")
        self.mb.rename("a.x", "a.x2")
        self.assertIn(".a.x2", self.dirs())

    def test_rename_inbox_moves_its_messages(self) -> None:
        inbox = self.mb.inbox()
        kw = inbox.keywords.letter("$Work", create=True)
        delivered = deliver(self.root)
        appended = inbox.append(BODY, {"S", kw}, WHEN)
        inbox.refresh()
        validity = inbox.uidvalidity
        self.mb.rename("INBOX", "Old.Mail")
        self.assertEqual(files(self.root, "new") + files(self.root, "cur"), [])
        self.assertEqual(self.dirs(), [".Old.Mail"])
        old = self.mb.folder("Old.Mail")
        self.assertEqual([(m.uid, m.base, m.subdir) for m in old.messages()],
                         [(1, delivered, "new"), (2, appended.base, "cur")])
        self.assertEqual(old.get(2).flags, frozenset({"S", kw}))
        self.assertEqual(old.keywords.name(kw), "$Work")
        self.assertEqual(old.internaldate(2), WHEN)
        changes = inbox.refresh()
        self.assertEqual(sorted(changes.vanished), [1, 2])
        self.assertEqual(inbox.uidvalidity, validity, "INBOX stays, with its UIDVALIDITY")
        deliver(self.root)
        self.assertEqual([m.uid for m in self.mb.inbox().messages()], [3])
        self.assertRaises(StoreError, self.mb.rename, "INBOX", "Old.Mail")

    def test_special_folders_created_once(self) -> None:
        self.mb.create("Sent")
        created = self.mb.ensure_special_folders()
        self.assertEqual(created, ["Drafts", "Trash", "Junk", "Archive"])
        self.assertEqual(self.mb.list_folders(), ["INBOX", "Archive", "Drafts", "Junk", "Sent", "Trash"])
        self.assertEqual(self.mb.subscriptions(), created)
        scans: list[object] = []
        real = os.scandir
        self.patch(os, "scandir", lambda p: scans.append(p) or real(p))
        self.assertEqual(self.mb.ensure_special_folders(), [])
        self.assertEqual(len(scans), 1, "one scandir when they all exist")
        self.assertEqual(SPECIAL_USE["Sent"], "\\Sent")
        self.assertEqual(set(SPECIAL_USE), {"Sent", "Drafts", "Trash", "Junk", "Archive"})


# --- Dovecot reads what mx wrote ----------------------------------------------------------

_ITEM = re.compile(rb'UID (\d+)|FLAGS \(([^)]*)\)|INTERNALDATE "([^"]+)"')


def imap_fetch(client: imaplib.IMAP4, mailbox: str) -> tuple[int, dict[int, tuple[frozenset[str], int]]]:
    """SELECT and `UID FETCH 1:* (UID FLAGS INTERNALDATE)`: (UIDVALIDITY, {uid: (flags, epoch)})."""
    typ, _ = client.select(f'"{mailbox}"')
    assert typ == "OK", mailbox
    validity = int(client.response("UIDVALIDITY")[1][0])
    typ, data = client.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE)")
    assert typ == "OK", data
    found: dict[int, tuple[frozenset[str], int]] = {}
    for item in data:
        line = item[0] if isinstance(item, tuple) else item
        if not line:
            continue
        uid, flags, date = 0, frozenset[str](), 0
        for m in _ITEM.finditer(line):
            if m.group(1):
                uid = int(m.group(1))
            elif m.group(2) is not None:
                flags = frozenset(f for f in m.group(2).decode().split() if f != "\\Recent")
            else:
                date = int(datetime.strptime(m.group(3).decode(), "%d-%b-%Y %H:%M:%S %z").timestamp())
        found[uid] = (flags, date)
    return validity, found


_SYSTEM = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def mx_view(folder: Folder) -> tuple[int, dict[int, tuple[frozenset[str], int]]]:
    folder.refresh()
    out = {}
    for m in folder.messages():
        names = frozenset(_SYSTEM.get(c) or folder.keywords.name(c) or f"?{c}" for c in m.flags)
        out[m.uid] = (names, int(folder.internaldate(m.uid)))
    return folder.uidvalidity, out


def imap_list(client: imaplib.IMAP4) -> set[str]:
    typ, data = client.list('""', "*")
    assert typ == "OK", data
    names = set()
    for line in data:
        m = re.match(rb'\(([^)]*)\) (?:"."|NIL) (.*)$', line)
        assert m, line
        names.add(m.group(2).decode().strip('"'))
    return names


class DovecotImapInteropTests(TestCase):
    """After mx appends, copies, renames and deletes, a private Dovecot sees the same."""

    timeout = 120

    async def setUp(self) -> None:
        reason = dovecot_available()
        if reason is not None:
            raise SkipTest(f"no private Dovecot: {reason}")
        self.mail_root = Path(self.mktemp()).resolve() / "mail"
        self.box = self.mail_root / DOMAIN / "alice"
        ensure_maildir(self.box)
        self.mb = Mailbox(self.box)
        self.dovecot: DovecotInstance = await deferToThread(start_dovecot, self, self.mail_root, PASSWORDS)

    def tearDown(self) -> None:
        errors = [e for e in self.dovecot.errors() if "Warning:" not in e] if hasattr(self, "dovecot") else []
        self.assertEqual(errors, [], "Dovecot logged errors on mx's Maildir:\n" + "\n".join(errors))

    async def with_imap(self, work: Any) -> Any:
        def run() -> Any:
            self.dovecot.hand_over()
            client = self.dovecot.imap(ALICE, PASSWORDS[ALICE])
            try:
                return work(client)
            finally:
                try:
                    client.logout()
                except (imaplib.IMAP4.error, OSError):
                    pass

        return await deferToThread(run)

    async def test_appended_and_copied_messages(self) -> None:
        """UIDs, UIDVALIDITY, flags (keywords by name) and INTERNALDATE as mx wrote them."""
        self.mb.create("Archive")
        inbox = self.mb.inbox()
        work = inbox.keywords.letter("$Work", create=True)
        inbox.keywords.letter("$Unused", create=True)
        home = inbox.keywords.letter("$Home", create=True)
        specs = [("S", WHEN), ({"F", work}, WHEN + 3600), ({"R", "S", home, work}, WHEN - 86400 * 400), ("", WHEN + 7)]
        uids = [inbox.append(BODY + b"%d\r\n" % i, flags, when).uid for i, (flags, when) in enumerate(specs)]
        self.assertEqual(uids, [1, 2, 3, 4])
        archive = self.mb.folder("Archive")
        inbox.refresh()  # a session copies what it has announced
        self.assertEqual(inbox.copy_into([3, 2], archive), [(3, 1), (2, 2)])
        mx_inbox, mx_archive = mx_view(inbox), mx_view(archive)
        self.assertEqual(mx_archive[1][1], (frozenset({"\\Answered", "\\Seen", "$Home", "$Work"}), int(WHEN) - 86400 * 400))

        def fetch(client: imaplib.IMAP4) -> tuple[Any, Any]:
            return imap_fetch(client, "INBOX"), imap_fetch(client, "Archive")

        dc_inbox, dc_archive = await self.with_imap(fetch)
        self.assertEqual(dc_inbox, mx_inbox, self.dovecot.log())
        self.assertEqual(dc_archive, mx_archive, self.dovecot.log())
        # Dovecot has now written both uidlists; mx continues from them.
        self.assertEqual(inbox.append(BODY).uid, 5)
        inbox.refresh()
        self.assertEqual(inbox.copy_into([1, 5], archive), [(1, 3), (5, 4)])
        dc_archive2 = await self.with_imap(lambda c: imap_fetch(c, "Archive"))
        self.assertEqual(dc_archive2, mx_view(archive))

    async def test_rename_and_delete(self) -> None:
        """Dovecot LISTs a renamed folder (and its child) under the new name with the same
        UIDVALIDITY and UIDs; a deleted folder is gone and the trash is never listed."""
        for name in ("Work", "Work.2024", "Old"):
            self.mb.create(name)
        work = self.mb.folder("Work")
        for i in range(3):
            work.append(BODY + b"%d\r\n" % i, "S", WHEN + i)
        mx_before = mx_view(work)

        def status(client: imaplib.IMAP4) -> tuple[set[str], Any]:
            return imap_list(client), imap_fetch(client, "Work")

        names, seen = await self.with_imap(status)  # Dovecot indexes it before the rename
        self.assertEqual(names, {"INBOX", "Work", "Work.2024", "Old"})
        self.assertEqual(seen, mx_before)
        self.mb.rename("Work", "Projects")
        self.mb.delete("Old")
        (self.box / TRASH_DIR / "cur").mkdir(parents=True)  # as a crashed delete leaves it

        def after(client: imaplib.IMAP4) -> tuple[set[str], Any]:
            return imap_list(client), imap_fetch(client, "Projects")

        names, seen = await self.with_imap(after)
        self.assertEqual(names, {"INBOX", "Projects", "Projects.2024"}, self.dovecot.log())
        self.assertEqual(seen, mx_before)
        self.assertEqual(seen[0], mx_view(self.mb.folder("Projects"))[0])

    async def test_inbox_rename(self) -> None:
        inbox = self.mb.inbox()
        for i in range(2):
            inbox.append(BODY + b"%d\r\n" % i, "S", WHEN + i)
        self.mb.rename("INBOX", "Before")
        moved = mx_view(self.mb.folder("Before"))
        self.assertEqual(sorted(moved[1]), [1, 2])

        def fetch(client: imaplib.IMAP4) -> tuple[Any, Any]:
            return imap_fetch(client, "INBOX"), imap_fetch(client, "Before")

        dc_inbox, dc_before = await self.with_imap(fetch)
        self.assertEqual(dc_inbox[1], {})
        self.assertEqual(dc_inbox[0], inbox.uidvalidity)
        self.assertEqual(dc_before, moved)
