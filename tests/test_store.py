"""Tests for mx.store: folders, UIDs, flags, changes, robustness and scale.

Real files in a temp dir throughout; concurrency with real processes.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mx.maildir import unique_name
from mx.store import Changes, Folder, Mailbox, MessageGone, StoreError, clean_tmp
from mx.store.folder import arrival_key
from mx.store.uidlist import parse

ROOT = Path(__file__).resolve().parent.parent


def deliver(maildir: Path, body: bytes = b"Subject: t\r\n\r\nhi\r\n", name: str | None = None) -> str:
    """Drop a message into new/ as a delivery agent would (tmp/, then rename)."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    name = name or unique_name(len(body))
    tmp = maildir / "tmp" / name
    tmp.write_bytes(body)
    os.rename(tmp, maildir / "new" / name)
    return name


def age_dirs(maildir: Path, seconds: float = 10) -> None:
    """Make new/ and cur/ look untouched for a while (so refresh() may trust their mtimes)."""
    t = time.time() - seconds
    for sub in ("new", "cur"):
        os.utime(maildir / sub, (t, t))


def calm_folder(case: SynchronousTestCase, count: int) -> Path:
    """A Maildir of `count` delivered messages, moved to cur/ with UIDs, its directories aged
    (so a listing of it is calm and trusted)."""
    md = Path(case.mktemp())
    (md / "new").mkdir(parents=True)
    for _ in range(count):
        deliver(md)
    Folder.open(md, take_new=True)
    age_dirs(md)
    return md


def record_listdir(case: SynchronousTestCase) -> list[str]:
    """The directories `os.listdir` lists from now on in this test."""
    listed: list[str] = []
    real_listdir = os.listdir
    case.patch(os, "listdir", lambda p: listed.append(str(p)) or real_listdir(p))
    return listed


class FolderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.md = Path(self.mktemp())
        (self.md / "new").mkdir(parents=True)
        self.logged: list[str] = []

    def open(self, **kw: bool) -> Folder:
        return Folder.open(self.md, log=self.logged.append, **kw)

    def test_missing_cur_and_tmp_are_created(self) -> None:
        deliver(self.md)
        os.rmdir(self.md / "cur")
        os.rmdir(self.md / "tmp")
        f = self.open()
        self.assertTrue((self.md / "cur").is_dir() and (self.md / "tmp").is_dir())
        self.assertEqual(len(f.messages()), 1)

    def test_no_such_folder(self) -> None:
        e = self.assertRaises(StoreError, Folder.open, self.md / "nope")
        self.assertIn("no such folder", str(e))

    def test_uids_in_arrival_order(self) -> None:
        names = ["1700000002.M5P1.h", "1700000001.M900000P1.h", "1700000002.M40P1.h", "1700000001.M7P1.h"]
        for n in names:
            deliver(self.md, name=n)
        f = self.open()
        self.assertEqual(
            [m.base for m in f.messages()],
            ["1700000001.M7P1.h", "1700000001.M900000P1.h", "1700000002.M5P1.h", "1700000002.M40P1.h"],
        )
        self.assertEqual([m.uid for m in f.messages()], [1, 2, 3, 4])
        self.assertEqual(f.next_uid, 5)
        self.assertEqual(self.logged, [], "a first uidlist is no rebuild")

    def test_arrival_key(self) -> None:
        self.assertLess(arrival_key("9.M2P1.h"), arrival_key("10.M1P1.h"))
        self.assertLess(arrival_key("10.M2P1.h"), arrival_key("10.M10P1.h"))
        self.assertLess(arrival_key("10.12345.h"), arrival_key("10.M0P1.h"))
        self.assertEqual(arrival_key("junk"), (0, -1, "junk"))

    def test_uidlist_is_dovecot_format(self) -> None:
        n1 = deliver(self.md)
        f = self.open()
        data = (self.md / "dovecot-uidlist").read_bytes()
        head, rec, end = data.split(b"\n")
        self.assertRegex(head.decode(), r"^3 V\d+ N2 G[0-9a-f]{32}$")
        self.assertEqual(rec.decode(), f"1 :{n1}")
        self.assertEqual(end, b"")
        self.assertEqual(parse(data).uidvalidity, f.uidvalidity)

    def test_hand_made_dovecot_uidlist_is_used(self) -> None:
        a = "1276528487.M364837P9451.kurkku,S=1355,W=1394"
        b = "1276533073.M242911P3632.kurkku,S=2451"
        deliver(self.md, name=a)
        (self.md / "cur").mkdir(exist_ok=True)
        (self.md / "cur" / f"{b}:2,RS").write_bytes(b"x" * 2451)
        (self.md / "dovecot-uidlist").write_bytes(
            b"3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
            + f"25006 :{a}\n25017 W2481 :{b}\n".encode()
        )
        f = self.open()
        self.assertEqual(f.uidvalidity, 1275660208)
        m1, m2 = f.messages()
        self.assertEqual((m1.uid, m1.size, m1.vsize, m1.subdir, m1.flags), (25006, 1355, 1394, "new", frozenset()))
        self.assertEqual((m2.uid, m2.size, m2.subdir, m2.flags), (25017, 2451, "cur", frozenset("RS")))
        self.assertEqual(f.fields(25017), {"W": "2481"})
        self.assertEqual(f.uidl(25006), "000061ae4c0907b0")  # lower-case, as Dovecot 2.3 prints it
        c = deliver(self.md)
        f.refresh()
        self.assertEqual(f.get(25022).base, c)
        text = (self.md / "dovecot-uidlist").read_text()
        self.assertIn(f"25017 W2481 :{b}\n", text, "Dovecot's fields are kept")
        self.assertIn(" N25023 ", text)

    def test_pop3_uidl_field_wins(self) -> None:
        a, b = "1.M1P1.h", "2.M1P1.h"
        deliver(self.md, name=a)
        deliver(self.md, name=b)
        (self.md / "dovecot-uidlist").write_text(f"3 V7 N3 G{'c' * 32}\n1 Pold-uidl-17 :{a}\n2 P :{b}\n")
        f = self.open()
        self.assertEqual(f.uidl(1), "old-uidl-17")
        self.assertEqual(f.uidl(2), b, "an empty P means the base name")

    def test_sizes_without_S_come_from_stat(self) -> None:
        deliver(self.md, body=b"12345", name="1700000000.abc.host")
        (m,) = self.open().messages()
        self.assertEqual((m.size, m.vsize), (5, None))

    def test_sizes_from_the_name(self) -> None:
        cases = {
            "1700000001.a.host,S=10": (10, None),
            "1700000002.b.host,S=10,W=12": (10, 12),
            "1700000003.c.host,W=12,S=10": (10, 12),
            "1700000004.d.host,S=10,W=x": (10, None),
            "1700000005.e.host,S=1\u0663": (5, None),  # not ASCII digits: the file's size
            "1700000006.f.host,S=10,X=1,W=12": (10, 12),
        }
        for name in cases:
            deliver(self.md, body=b"12345", name=name)
        got = {m.base: (m.size, m.vsize) for m in self.open().messages()}
        self.assertEqual(got, cases)

    def test_unknown_files_and_dirs(self) -> None:
        deliver(self.md)
        (self.md / "new" / ".hidden").write_bytes(b"not mail")
        (self.md / "cur" / "some dir").mkdir()
        (self.md / "README.txt").write_bytes(b"operator notes")
        f = self.open()
        self.assertEqual(len(f.messages()), 1)

    def test_uid_stable_across_renames_by_anyone(self) -> None:
        n = deliver(self.md)
        uid = self.open().messages()[0].uid
        os.rename(self.md / "new" / n, self.md / "cur" / f"{n}:2,FS")  # Dovecot, a script...
        deliver(self.md)
        f = self.open()
        m = f.get(uid)
        self.assertEqual((m.base, m.subdir, m.flags), (n, "cur", frozenset("FS")))
        self.assertEqual(len(f.messages()), 2)
        self.assertEqual(self.open().uidvalidity, f.uidvalidity)

    def test_take_new_moves_to_cur(self) -> None:
        n = deliver(self.md)
        f = self.open()
        self.assertEqual(f.messages()[0].subdir, "new")
        self.assertTrue((self.md / "new" / n).exists(), "without take_new nothing moves")
        f = self.open(take_new=True)
        (m,) = f.messages()
        self.assertEqual((m.subdir, m.name, m.uid), ("cur", n + ":2,", 1))
        self.assertEqual(os.listdir(self.md / "cur"), [n + ":2,"])
        n2 = deliver(self.md)
        f.refresh()
        self.assertEqual(f.get(2).name, n2 + ":2,")

    def test_set_flags_round_trip(self) -> None:
        n = deliver(self.md)
        f = self.open()
        info = f.set_flags(1, frozenset({"S", "R", "b", "a"}))
        self.assertEqual(info.name, n + ":2,RSab")
        self.assertEqual(os.listdir(self.md / "cur"), [n + ":2,RSab"])
        self.assertEqual(os.listdir(self.md / "new"), [])
        again = self.open().get(1)
        self.assertEqual((again.flags, again.subdir, again.uid), (frozenset("RSab"), "cur", 1))
        self.assertEqual(f.set_flags(1, frozenset()).name, n + ":2,")
        self.assertRaises(ValueError, f.set_flags, 1, frozenset({"\\Seen"}))

    def test_set_flags_follows_a_foreign_rename(self) -> None:
        n = deliver(self.md)
        f = self.open()
        os.rename(self.md / "new" / n, self.md / "cur" / f"{n}:2,F")
        self.assertEqual(f.set_flags(1, frozenset("FS")).name, n + ":2,FS")

    def test_keywords_file(self) -> None:
        deliver(self.md)
        f = self.open()
        kw = f.keywords
        self.assertIsNone(kw.letter("$Forwarded"))
        self.assertEqual(kw.letter("$Forwarded", create=True), "a")
        self.assertEqual(kw.letter("Junk", create=True), "b")
        self.assertEqual(kw.letter("junk"), "b", "keywords match case-insensitively")
        self.assertEqual((self.md / "dovecot-keywords").read_text(), "0 $Forwarded\n1 Junk\n")
        f.set_flags(1, frozenset({"S", kw.letter("Junk")}))
        # Dovecot's file with a gap: index 3 is "d"; new names take the first free index.
        (self.md / "dovecot-keywords").write_text("0 $Forwarded\n3 NonJunk\nbogus line\n")
        other = self.open().keywords
        self.assertEqual(other.mapping(), {"a": "$Forwarded", "d": "NonJunk"})
        self.assertEqual(other.name("d"), "NonJunk")
        self.assertEqual(other.letter("$Label1", create=True), "b")
        self.assertEqual(f.keywords.mapping()["b"], "$Label1", "other sessions see the reload")

    def test_message_gone(self) -> None:
        n = deliver(self.md)
        deliver(self.md)
        f = self.open()
        os.unlink(self.md / "new" / n)  # another session expunged it
        self.assertRaises(MessageGone, f.open_message, 1)
        self.assertRaises(MessageGone, f.set_flags, 1, frozenset("S"))
        self.assertRaises(MessageGone, f.open_message, 99)
        self.assertEqual(f.expunge([1]), [])
        with f.open_message(2) as fh:
            self.assertEqual(fh.read(), b"Subject: t\r\n\r\nhi\r\n")
        self.assertTrue(issubclass(MessageGone, StoreError))

    def test_open_message_follows_a_rename(self) -> None:
        n = deliver(self.md, body=b"body bytes")
        f = self.open()
        os.rename(self.md / "new" / n, self.md / "cur" / f"{n}:2,S")
        with f.open_message(1) as fh:
            self.assertEqual(fh.read(), b"body bytes")
        self.assertEqual(f.get(1).flags, frozenset("S"))

    def test_reads_in_a_batch_use_the_folder_descriptors(self) -> None:
        # Within `reading()`: files in new/ and cur/ by name relative to the open folders, a
        # rename by another program still followed; the descriptors closed after.
        a, b = deliver(self.md, body=b"first"), deliver(self.md, body=b"second")
        f = self.open()
        os.rename(self.md / "new" / a, self.md / "cur" / f"{a}:2,S")  # f still says new/
        fds_before = len(os.listdir("/proc/self/fd"))
        with f.reading():
            self.assertEqual(len(os.listdir("/proc/self/fd")), fds_before + 2)
            for uid, want in ((1, b"first"), (2, b"second")):
                fd, _size = f.open_message_fd(uid)
                try:
                    self.assertEqual(os.read(fd, 100), want)
                finally:
                    os.close(fd)
            os.rename(self.md / "new" / b, self.md / "cur" / f"{b}:2,F")
            with f.open_message(2) as fh:
                self.assertEqual(fh.read(), b"second")
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds_before)
        fd, _size = f.open_message_fd(1)  # by path again
        os.close(fd)

    def test_expunge(self) -> None:
        for _ in range(3):
            deliver(self.md)
        f = self.open(take_new=True)
        self.assertEqual(f.expunge([1, 3, 42]), [1, 3])
        self.assertEqual([m.uid for m in f.messages()], [2])
        self.assertEqual(len(os.listdir(self.md / "cur")), 1)
        deliver(self.md)
        self.assertEqual([m.uid for m in self.open().messages()], [2, 4], "UIDs are never reused")

    def test_refresh_reports_new_vanished_and_flags(self) -> None:
        n1 = deliver(self.md)
        deliver(self.md)
        f = self.open()
        other = self.open()
        self.assertFalse(f.refresh())
        n3 = deliver(self.md)
        other.set_flags(2, frozenset("S"))
        os.unlink(self.md / "new" / n1)
        ch = f.refresh()
        self.assertEqual([m.base for m in ch.new], [n3])
        self.assertEqual(ch.vanished, (1,))
        self.assertEqual([(m.uid, m.flags) for m in ch.flags], [(2, frozenset("S"))])
        self.assertFalse(ch.uidvalidity_changed)
        self.assertEqual(f.refresh(), Changes((), (), ()))

    def test_refresh_is_three_stats_when_nothing_changed(self) -> None:
        for _ in range(20):
            deliver(self.md)
        age_dirs(self.md)
        f = self.open()
        calls: list[str] = []
        real_listdir, real_stat = os.listdir, os.stat
        self.patch(os, "listdir", lambda p: calls.append(f"listdir {p}") or real_listdir(p))
        self.patch(os, "stat", lambda p, *a, **k: calls.append("stat") or real_stat(p, *a, **k))
        self.assertFalse(f.refresh())
        self.assertEqual(calls, ["stat"] * 3)
        calls.clear()
        deliver(self.md)
        self.assertEqual(len(f.refresh().new), 1)
        self.assertIn(f"listdir {self.md / 'new'}", calls)

    def test_corrupt_uidlist_rebuilt_with_new_uidvalidity(self) -> None:
        for _ in range(3):
            deliver(self.md)
        f = self.open()
        old = f.uidvalidity
        (self.md / "dovecot-uidlist").write_bytes(b"\x00\x01garbage\nmore garbage\n")
        g = self.open()
        self.assertNotEqual(g.uidvalidity, old)
        self.assertEqual([m.uid for m in g.messages()], [1, 2, 3])
        self.assertEqual(len(self.logged), 1)
        self.assertIn("rebuilt with new UIDVALIDITY", self.logged[0])
        self.assertNotIn("\n", self.logged[0])
        self.assertEqual(parse((self.md / "dovecot-uidlist").read_bytes()).uidvalidity, g.uidvalidity)
        ch = f.refresh()  # the old session learns its UIDs are void
        self.assertTrue(ch.uidvalidity_changed)
        self.assertEqual(ch.vanished, (1, 2, 3))
        self.assertEqual(f.uidvalidity, g.uidvalidity)

    def test_uidvalidity_bumped_even_within_the_same_second(self) -> None:
        deliver(self.md)
        old = self.open().uidvalidity
        (self.md / "dovecot-uidlist").write_bytes(f"3 V{old} N2 G{'a' * 32}\n1 :x\n0 :y\n".encode())
        self.assertGreater(self.open().uidvalidity, old)

    def test_lost_uidlist_gets_new_uidvalidity(self) -> None:
        deliver(self.md)
        f = self.open()
        os.unlink(self.md / "dovecot-uidlist")
        deliver(self.md)
        ch = f.refresh()
        self.assertTrue(ch.uidvalidity_changed)
        self.assertEqual(len(self.logged), 1, "a list lost under an open session is logged")

    def test_truncated_uidlist_keeps_uidvalidity(self) -> None:
        names = [deliver(self.md) for _ in range(3)]
        f = self.open()
        data = (self.md / "dovecot-uidlist").read_bytes()
        (self.md / "dovecot-uidlist").write_bytes(data[: -len(names[2]) // 2])  # mid last line
        g = self.open()
        self.assertEqual(g.uidvalidity, f.uidvalidity)
        self.assertEqual([(m.uid, m.base) for m in g.messages()][:2], [(1, names[0]), (2, names[1])])
        self.assertEqual((g.messages()[2].uid, g.messages()[2].base), (4, names[2]), "a fresh UID, never 3 again")
        self.assertIn("repaired", self.logged[0])

    def test_stale_tmp_cleanup_by_mtime(self) -> None:
        deliver(self.md)
        old, fresh = self.md / "tmp" / "old", self.md / "tmp" / "fresh"
        old.write_bytes(b"x")
        fresh.write_bytes(b"y")
        t = time.time() - 37 * 3600
        os.utime(old, (t, t))
        self.assertEqual(clean_tmp(self.md), 1)
        self.assertEqual(os.listdir(self.md / "tmp"), ["fresh"])
        self.assertEqual(clean_tmp(self.md, older_than=0, now=time.time() + 1), 1)
        self.assertEqual(clean_tmp(self.md / "missing"), 0)

    def test_uidl_is_dovecot_default(self) -> None:
        deliver(self.md)
        (self.md / "dovecot-uidlist").write_text(f"3 V1234567 N300 G{'d' * 32}\n")
        f = self.open()
        self.assertEqual(f.messages()[0].uid, 300)
        self.assertEqual(f.uidl(300), "0000012c0012d687")
        f.set_flags(300, frozenset("S"))
        self.assertEqual(self.open().uidl(300), "0000012c0012d687", "unchanged by flags")


class IncrementalRefreshTests(SynchronousTestCase):
    """A refresh after renames re-reads only the names that changed (`Folder._patch`,
    `Folder._names_by_base`); whatever happened, the table must equal a fresh open's."""

    def setUp(self) -> None:
        self.md = Path(self.mktemp())
        (self.md / "new").mkdir(parents=True)
        self.names = [deliver(self.md, name=f"{1000 + i}.M{i}P1Q{i}.host,S=22") for i in range(40)]
        Folder.open(self.md, take_new=True)  # everything in cur/, UIDs 1..40
        self.f = Folder.open(self.md)
        self.f.refresh()

    def assert_same_as_fresh(self) -> None:
        self.assertEqual(self.f.table(), Folder.open(self.md).table())

    def cur_name(self, uid: int) -> str:
        base = self.f.get(uid).base
        (name,) = [n for n in os.listdir(self.md / "cur") if n.split(":")[0] == base]
        return name

    def test_own_foreign_renames_and_removals(self) -> None:
        f = self.f
        mine = f.set_flags_many([(uid, frozenset("S")) for uid in range(1, 11)])
        self.assertEqual([i.uid for i in mine], list(range(1, 11)))
        other = Folder.open(self.md)
        for uid in (12, 13, 14):
            other.set_flags(uid, frozenset("FT"))
        for uid in (20, 21):
            os.unlink(self.md / "cur" / self.cur_name(uid))
        full = Folder._rebuild
        self.patch(Folder, "_rebuild", lambda *a: self.fail("renames and removals only: no full rebuild"))
        ch = f.refresh()
        self.patch(Folder, "_rebuild", full)
        self.assertEqual(ch.new, ())
        self.assertEqual(ch.vanished, (20, 21))
        self.assertEqual([(i.uid, i.flags) for i in ch.flags], [(u, frozenset("FT")) for u in (12, 13, 14)])
        self.assert_same_as_fresh()
        self.assertFalse(f.refresh())

    def test_a_delivery_and_a_new_uid_take_the_full_path(self) -> None:
        self.f.set_flags(1, frozenset("S"))
        n = deliver(self.md)
        ch = self.f.refresh()
        self.assertEqual([(i.uid, i.base) for i in ch.new], [(41, n)])
        self.assert_same_as_fresh()
        self.assertEqual(list(self.f.table()), sorted(self.f.table()), "the table stays in UID order")

    def test_a_file_renamed_back_by_someone_else(self) -> None:
        f = self.f
        before = self.cur_name(5)
        f.set_flags(5, frozenset("S"))
        os.rename(self.md / "cur" / self.cur_name(5), self.md / "cur" / before)  # undone elsewhere
        ch = f.refresh()
        self.assertEqual([(i.uid, i.name) for i in ch.flags], [(5, before)])
        self.assert_same_as_fresh()

    def test_two_names_with_one_base(self) -> None:
        name = self.cur_name(3)
        base = name.split(":")[0]
        os.link(self.md / "cur" / name, self.md / "cur" / f"{base}:2,F")  # a stray second name
        self.f.refresh()
        self.assertIn(self.f.get(3).name, {name, f"{base}:2,F"})
        os.unlink(self.md / "cur" / f"{base}:2,F")
        self.f.refresh()
        self.assertEqual(self.f.get(3).name, name)
        self.assert_same_as_fresh()

    def test_set_flags_many_follows_renames_and_skips_the_gone(self) -> None:
        f = self.f
        os.rename(self.md / "cur" / self.cur_name(7), self.md / "cur" / f"{f.get(7).base}:2,D")
        os.unlink(self.md / "cur" / self.cur_name(8))
        got = f.set_flags_many([(7, frozenset("S")), (8, frozenset("S")), (9, frozenset()), (99, frozenset("S"))])
        self.assertEqual([(i.uid, i.flags) for i in got], [(7, frozenset("S"))])  # 9 had no flags already
        self.assertEqual(f.get(7).name, f.get(7).base + ":2,S")
        self.assertRaises(ValueError, f.set_flags_many, [(9, frozenset({"\\Seen"}))])
        f.refresh()
        self.assert_same_as_fresh()

    def test_random_histories_match_a_fresh_open(self) -> None:
        import random

        rng = random.Random(20261203)
        f = self.f
        patched = []
        real_patch = Folder._patch
        self.patch(Folder, "_patch", lambda *a: patched.append(real_patch(*a)) or patched[-1])
        for _round in range(60):
            for _ in range(rng.randrange(1, 6)):
                live = sorted(Folder.open(self.md).table())
                if not live:
                    break
                uid = rng.choice(live)
                kind = rng.randrange(5)
                if kind == 0 and f.get(uid) is not None:
                    try:
                        f.set_flags_many([(uid, frozenset(rng.sample("DFRST", rng.randrange(3))))])
                    except MessageGone:
                        pass
                elif kind == 1:
                    Folder.open(self.md).set_flags(uid, frozenset(rng.sample("DFRST", rng.randrange(3))))
                elif kind == 2 and len(live) > 5:
                    os.unlink(self.md / "cur" / Folder.open(self.md).get(uid).name)
                elif kind == 3:
                    deliver(self.md)
                else:
                    Folder.open(self.md, take_new=True)
            f.refresh()
            self.assert_same_as_fresh()
        self.assertGreater(sum(1 for p in patched if p is not None), 10, "the incremental path was taken")


class OwnChangeTrustTests(SynchronousTestCase):
    """After our own renames and removals in cur/ the next refreshes trust the stamp for two
    seconds (Dovecot's dirty_cur_time) instead of listing 10,000 names per command."""

    def setUp(self) -> None:
        self.md = calm_folder(self, 10)
        self.f = Folder.open(self.md)
        self.listed = record_listdir(self)

    def later(self, seconds: float) -> None:
        real = time.time_ns
        self.patch(time, "time_ns", lambda: real() + int(seconds * 1e9))

    def test_own_changes_do_not_re_list(self) -> None:
        f = self.f
        f.set_flags_many([(1, frozenset("S")), (2, frozenset("F"))])
        f.set_flags(3, frozenset("R"))
        f.expunge([4])
        for _ in range(3):
            self.assertFalse(f.refresh())
        self.assertEqual(self.listed, [])
        self.later(3)
        self.assertFalse(f.refresh())  # the window is over: one listing, nothing new
        self.assertTrue(self.listed)
        self.assertEqual(f.table(), Folder.open(self.md).table())

    def test_a_foreign_change_in_the_window_shows_within_two_seconds(self) -> None:
        f = self.f
        f.set_flags(1, frozenset("S"))
        self.assertFalse(f.refresh())
        Folder.open(self.md).set_flags(2, frozenset("F"))  # maybe in the same mtime tick
        first = f.refresh()
        self.later(3)
        later = f.refresh()
        self.assertEqual([(i.uid, i.flags) for i in (*first.flags, *later.flags)], [(2, frozenset("F"))])

    def test_a_delivery_in_the_window_shows_at_once(self) -> None:
        f = self.f
        f.set_flags(1, frozenset("S"))
        self.assertFalse(f.refresh())
        n = deliver(self.md)
        self.assertEqual([i.base for i in f.refresh().new], [n])

    def test_an_untrusted_table_still_re_lists(self) -> None:
        f = Folder.open(self.md)
        Folder.open(self.md).set_flags(5, frozenset("F"))  # cur/ is now fresh: not calm
        f.refresh()  # lists; the mtime is too young to trust
        self.listed.clear()
        f.set_flags(1, frozenset("S"))
        f.refresh()
        self.assertTrue(self.listed, "a table not trusted before our change is listed again")


class SharedTableTests(SynchronousTestCase):
    """A second open of a calm folder borrows the first one's table (no listing, no copy);
    a change by either never shows in the other, nor in the shared snapshot."""

    def test_borrowed_tables_are_copied_before_a_change(self) -> None:
        from mx.store import folder as folder_module

        md = calm_folder(self, 5)
        first = Folder.open(md)
        real_listdir = os.listdir
        listed = record_listdir(self)
        second, third = Folder.open(md), Folder.open(md)
        self.assertEqual(listed, [], "calm and listed already: borrowed")
        snapshot = dict(folder_module._shared.get(md, second._stamp_now())[0])
        second.set_flags(1, frozenset("F"))
        third.set_flags_many([(2, frozenset("D"))])
        third.expunge([3])
        self.assertEqual(first.get(1).flags, frozenset())
        self.assertEqual(first.get(2).flags, frozenset())
        self.assertIsNotNone(first.get(3))
        self.assertEqual(second.get(2).flags, frozenset())
        self.assertEqual(third.get(1).flags, frozenset())
        self.assertEqual(dict(folder_module._shared.get(md, first._snapshot)[0]), snapshot)
        self.patch(os, "listdir", real_listdir)
        self.assertEqual([(i.uid, i.flags) for i in first.refresh().flags], [(1, frozenset("F")), (2, frozenset("D"))])


class ScaleTests(SynchronousTestCase):
    def test_20000_messages_open_without_reading_bodies(self) -> None:
        md = Path(self.mktemp())
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        for i in range(20_000):
            sub, suffix = ("cur", ":2,S") if i % 2 else ("new", "")
            (md / sub / f"{1700000000 + i}.M{i}P1.host,S={100 + i},W={102 + i}{suffix}").write_bytes(b"")
        opened: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def counting_open(file, *a, **k):  # type: ignore[no-untyped-def]
            opened.append(str(file))
            return real_open(file, *a, **k)

        def counting_os_open(path, *a, **k):  # type: ignore[no-untyped-def]
            opened.append(str(path))
            return real_os_open(path, *a, **k)

        self.patch(builtins, "open", counting_open)
        self.patch(os, "open", counting_os_open)
        f = Folder.open(md)
        msgs = f.messages()
        self.assertEqual(len(msgs), 20_000)
        self.assertEqual(msgs[-1].size, 100 + 19_999)
        self.assertEqual(msgs[-1].vsize, 102 + 19_999)
        bodies = [p for p in opened if "/new/" in p or "/cur/" in p]
        self.assertEqual(bodies, [])
        self.assertLess(len(opened), 10, opened)
        opened.clear()
        Folder.open(md, take_new=True)
        self.assertEqual([p for p in opened if "/new/" in p or "/cur/" in p], [])


WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    from mx.maildir import unique_name
    from mx.store import Folder
    md, rounds, take = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    seen = {}
    for _ in range(rounds):
        for _ in range(2):
            name = unique_name(3)
            (md / "tmp" / name).write_bytes(b"abc")
            os.rename(md / "tmp" / name, md / "new" / name)
        f = Folder.open(md, take_new=take)
        for m in f.messages():
            if seen.setdefault(m.base, m.uid) != m.uid:
                sys.exit(f"UID of {m.base} changed: {seen[m.base]} -> {m.uid}")
    print(json.dumps(seen))
    """
)


class ConcurrencyTests(SynchronousTestCase):
    def test_two_processes_never_hand_out_one_uid_twice(self) -> None:
        md = Path(self.mktemp()).resolve()
        for sub in ("new", "cur", "tmp"):
            (md / sub).mkdir(parents=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [
            subprocess.Popen([sys.executable, "-c", WORKER, str(md), "40", take], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for take in ("0", "1", "0")
        ]
        views = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            self.assertEqual(p.returncode, 0, err)
            views.append(json.loads(out))
        merged: dict[str, int] = {}
        for view in views:
            for base, uid in view.items():
                self.assertEqual(merged.setdefault(base, uid), uid, f"{base} has two UIDs")
        self.assertEqual(len(merged), 240)
        self.assertEqual(len(set(merged.values())), 240, "no UID given to two messages")
        final = Folder.open(md)
        self.assertEqual({m.base: m.uid for m in final.messages()}, merged)
        self.assertEqual(final.next_uid, 241)
        self.assertFalse(any(n.endswith(".lock") or n.startswith(".temp") for n in os.listdir(md)))


class MailboxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp())
        (self.root / "new").mkdir(parents=True)
        self.mb = Mailbox(self.root)

    def test_folders_are_maildirplusplus(self) -> None:
        self.mb.create("Sent")
        self.mb.create("Lists.mx")
        self.mb.create("Été")
        for d in (".Sent", ".Lists.mx", ".&AMk-t&AOk-"):
            self.assertTrue((self.root / d / "cur").is_dir(), d)
            self.assertTrue((self.root / d / "maildirfolder").is_file(), d)
        self.assertEqual(self.mb.list_folders(), ["INBOX", "Lists.mx", "Sent", "Été"])
        deliver(self.root / ".Sent")
        self.assertEqual(len(self.mb.folder("Sent").messages()), 1)
        self.assertEqual(self.mb.folder("inbox").path, self.root)
        self.assertEqual(self.mb.inbox().path, self.root)
        self.assertRaises(StoreError, self.mb.create, "Sent")
        self.assertRaises(StoreError, self.mb.folder, "Drafts")

    def test_bad_names_refused(self) -> None:
        for bad in ["", ".", "a..b", ".a", "a.", "../x", "a/b", "x\0", "~x", "tab\there"]:
            self.assertRaises(StoreError, self.mb.create, bad)
        self.assertEqual(os.listdir(self.root), ["new"])

    def test_list_ignores_files_and_undecodable(self) -> None:
        (self.root / ".notadir").write_bytes(b"")
        (self.root / ".&bad").mkdir()
        (self.root / ".Trash").mkdir()
        self.assertEqual(self.mb.list_folders(), ["INBOX", "Trash"])

    def test_subscriptions_version_1(self) -> None:
        self.mb.subscribe("Sent")
        self.mb.subscribe("Lists.mx")
        self.mb.subscribe("Sent")
        self.mb.subscribe("inbox")
        self.assertEqual((self.root / "subscriptions").read_text(), "Sent\nLists.mx\nINBOX\n")
        self.mb.unsubscribe("Sent")
        self.assertEqual(self.mb.subscriptions(), ["Lists.mx", "INBOX"])
        self.assertFalse((self.root / "subscriptions.lock").exists())

    def test_subscriptions_version_2_kept(self) -> None:
        (self.root / "subscriptions").write_text("V\t2\n\nINBOX\nLists\tmx\nOdd\x01tname\n")
        self.assertEqual(self.mb.subscriptions(), ["INBOX", "Lists.mx", "Odd\tname"])
        self.mb.subscribe("Été.sub")
        self.assertEqual(
            (self.root / "subscriptions").read_text(),
            "V\t2\n\nINBOX\nLists\tmx\nOdd\x01tname\nÉté\tsub\n",
        )

    def test_clean_tmp_everywhere(self) -> None:
        self.mb.create("Junk")
        t = time.time() - 40 * 3600
        for d in (self.root, self.root / ".Junk"):
            (d / "tmp").mkdir(exist_ok=True)
            (d / "tmp" / "stale").write_bytes(b"")
            os.utime(d / "tmp" / "stale", (t, t))
        self.assertEqual(self.mb.clean_tmp(), 2)


class TableCacheTests(SynchronousTestCase):
    """A cold open takes the table an earlier one saved (mx.store.tablecache) and checks it
    against the listing; whatever happened meanwhile, the table equals an open without it."""

    def setUp(self) -> None:
        from mx.store import folder as folder_module

        self.shared = folder_module._shared
        self.md = calm_folder(self, 30)
        self.cache = Path(self.mktemp()) / "cache" / "INBOX.table"

    def cold(self) -> Folder:
        from mx.store import tablecache

        self.shared._by_path.clear()
        folder = Folder.open(self.md, table_cache=self.cache)
        tablecache.wait()  # the save runs on its own thread
        return folder

    def plain(self) -> dict[int, object]:
        self.shared._by_path.clear()
        return Folder.open(self.md).table()

    def test_second_cold_open_parses_no_name(self) -> None:
        first = self.cold()
        self.assertTrue(self.cache.exists())
        self.patch(Folder, "_make_info", lambda *a: self.fail("a name parsed although the table was saved"))
        second = self.cold()
        self.assertEqual(second.table(), first.table())
        self.assertEqual(list(second.table()), list(first.table()), "UID order")
        self.assertEqual((second.uidvalidity, second.next_uid), (first.uidvalidity, first.next_uid))

    def test_changes_since_the_save_are_seen(self) -> None:
        self.cold()
        f = Folder.open(self.md)
        f.set_flags(3, frozenset("S"))
        f.expunge([5])
        os.rename(self.md / "cur" / f.get(7).name, self.md / "cur" / (f.get(7).base + ":2,T"))
        age_dirs(self.md)
        self.assertEqual(self.cold().table(), self.plain())
        deliver(self.md)  # a new name: a new UID in the list, so a new list stamp
        age_dirs(self.md)
        got = self.cold()
        self.assertEqual(got.table(), self.plain())
        self.assertEqual(len(got.table()), 30)

    def test_a_torn_or_foreign_file_is_ignored_and_rewritten(self) -> None:
        self.cold()
        for junk in (b"", b"\x00garbage", self.cache.read_bytes()[:100]):
            self.cache.write_bytes(junk)
            self.assertEqual(self.cold().table(), self.plain())
            self.assertGreater(self.cache.stat().st_size, 1000, "rewritten")

    def test_another_list_makes_it_unusable(self) -> None:
        import marshal

        self.cold()
        head, stamp, validity, columns = marshal.loads(self.cache.read_bytes())
        columns[0] = [u + 1 for u in columns[0]]  # UIDs the list does not give these names
        self.cache.write_bytes(marshal.dumps((head, stamp, validity, columns)))
        self.assertEqual(self.cold().table(), self.plain())
        (self.md / "dovecot-uidlist").unlink()  # rebuilt: a new UIDVALIDITY
        self.shared._by_path.clear()
        rebuilt = Folder.open(self.md, table_cache=self.cache)
        self.assertEqual(rebuilt.table(), self.plain())
        from mx.store import tablecache

        tablecache.wait()
