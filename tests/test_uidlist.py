"""Tests for the store's file formats: dovecot-uidlist v3, the dot-lock, modified UTF-7."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mx.store import dotlock, uidlist, utf7
from mx.store.dotlock import DotLock
from mx.store.errors import LockTimeout, StoreError
from mx.store.uidlist import UidList, UidListCorrupt, format_list, parse

# From doc.dovecot.org "Maildir Mailbox Format": the header example, and records as Dovecot
# writes them (extension fields before the ":"), including a Dovecot-style file name.
DOVECOT_EXAMPLE = (
    b"3 V1275660208 N25022 G3085f01b7f11094c501100008c4a11c1\n"
    b"25006 :1276528487.M364837P9451.kurkku,S=1355,W=1394\n"
    b"25017 W2481 :1276533073.M242911P3632.kurkku,S=2451\n"
    b"25021 S1290 W1318 P1a2b3c :1491941793.M41850P8566V0000000000000015I0000000004F3030E_0.mx1.example.com\n"
)


class UidListFormatTests(SynchronousTestCase):
    def test_dovecot_documented_example(self) -> None:
        ul = parse(DOVECOT_EXAMPLE)
        self.assertEqual((ul.uidvalidity, ul.next_uid), (1275660208, 25022))
        self.assertEqual(ul.guid, "3085f01b7f11094c501100008c4a11c1")
        self.assertEqual(
            list(ul.uids.values()), [25006, 25017, 25021], "UIDs in file order"
        )
        self.assertEqual(ul.uids["1276528487.M364837P9451.kurkku,S=1355,W=1394"], 25006)
        self.assertEqual(ul.fields["1276533073.M242911P3632.kurkku,S=2451"], "W2481")
        self.assertEqual(
            ul.fields["1491941793.M41850P8566V0000000000000015I0000000004F3030E_0.mx1.example.com"],
            "S1290 W1318 P1a2b3c",
        )
        self.assertFalse(ul.dirty, ul.problems)
        self.assertEqual(format_list(ul), DOVECOT_EXAMPLE, "read + write is the identity")

    def test_written_by_mx_read_back(self) -> None:
        ul = UidList.fresh()
        for i in range(50):
            ul.assign(f"{1700000000 + i}.M{i}P1Q{i}.host,S={i}")
        ul.fields[next(iter(ul.uids))] = "W12"
        ul.header_extra.append("Xfuture")
        again = parse(format_list(ul))
        self.assertEqual(again.uids, ul.uids)
        self.assertEqual(again.fields, ul.fields)
        self.assertEqual((again.uidvalidity, again.next_uid, again.guid), (ul.uidvalidity, 51, ul.guid))
        self.assertEqual(again.header_extra, ["Xfuture"], "unknown header fields kept")
        self.assertFalse(again.dirty)

    def test_courier_version_1(self) -> None:
        ul = parse(b"1 1100000000 4\n1 1100000000.1234.host\n3 1100000001.99.host:2,S\n")
        self.assertEqual(ul.uids, {"1100000000.1234.host": 1, "1100000001.99.host": 3})
        self.assertEqual(ul.next_uid, 4)
        self.assertTrue(ul.dirty, "rewritten as version 3")

    def test_damage_in_one_record_drops_only_that_record(self) -> None:
        data = b"3 V5 N10 G" + b"0" * 32 + b"\n1 :a\nxx garbage\n4 no-colon here\n5 :b/c\n6 :d\n7 :trunc"
        ul = parse(data)
        self.assertEqual(ul.uids, {"a": 1, "d": 6})
        self.assertEqual(ul.next_uid, 10)
        self.assertTrue(ul.dirty)
        self.assertEqual(len(ul.problems), 4, ul.problems)

    def test_bad_extension_keys_dropped(self) -> None:
        ul = parse(b"3 V5 N10 G" + b"1" * 32 + b"\n3 S10 w1 :m\n")
        self.assertEqual(ul.fields, {"m": "S10"})
        self.assertTrue(ul.dirty)

    def test_next_uid_raised_past_highest(self) -> None:
        # Dovecot 2.3 appends records without touching N (seen: "3 V... N1" then "1 :...").
        ul = parse(b"3 V5 N2 G" + b"1" * 32 + b"\n7 :m\n")
        self.assertEqual(ul.next_uid, 8)
        self.assertFalse(ul.dirty, "not damage, no rewrite")

    def test_corrupt_lists(self) -> None:
        g = b"G" + b"a" * 32
        for data in [
            b"",
            b"\0\0\0\0garbage",
            b"2 V1 N1\n",
            b"3 N5 " + g + b"\n",
            b"3 V0 N5 " + g + b"\n",
            b"3 Vx N5 " + g + b"\n",
            b"3 V9 N5 " + g + b"\n3 :a\n2 :b\n",
            b"3 V9 N5 " + g + b"\n3 :a\n3 :b\n",
        ]:
            with self.assertRaises(UidListCorrupt, msg=repr(data)):
                parse(data)

    def test_file_names_round_trip_as_bytes(self) -> None:
        raw = b"3 V9 N3 G" + b"b" * 32 + b"\n2 :caf\xc3\xa9.\xff.host\n"
        ul = parse(raw)
        self.assertEqual(os.fsencode(next(iter(ul.uids))), b"caf\xc3\xa9.\xff.host")
        self.assertEqual(format_list(ul), raw)

    def test_new_uidvalidity_never_repeats(self) -> None:
        future = int(time.time()) + 1000
        self.assertEqual(uidlist.new_uidvalidity(future), future + 1)
        self.assertGreaterEqual(uidlist.new_uidvalidity(0), int(time.time()) - 1)


# Record lines near the simple shape "<uid> :<base>": digits, fields, colons, slashes, spaces.
_LINE = st.text(alphabet="0123456789 :/ABWx.,=\u0663", max_size=14)


class SimpleSplitTests(SynchronousTestCase):
    """`_split_simple` is a shortcut for `_RECORD`: where it answers, it must read every line
    as the regex does; where it declines, the regex (and then the careful loop) decides."""

    def check(self, lines: list[str]) -> None:
        body = "".join(line + "\n" for line in lines)
        simple = uidlist._split_simple(body)
        if simple is None:
            return
        recs = uidlist._RECORD.findall(body)
        self.assertEqual(len(recs), len(lines), body)
        self.assertEqual([(u, "", b) for u, b in zip(*simple)], recs, body)

    @settings(max_examples=400, deadline=None)
    @given(st.lists(_LINE, max_size=6))
    def test_agrees_with_the_regex(self, lines: list[str]) -> None:
        self.check(lines)

    def test_declines_what_it_does_not_read(self) -> None:
        for body in ["01 :a\n", "1 W2 :a\n", "1 :a/b\n", "1 :a:b\n", "1 :\n", " :a\n",
                     "12345678901 :a\n", "1 2 :a\n", "\u0663 :a\n", "1:a\n", "1 :a"]:
            self.assertIsNone(uidlist._split_simple(body), body)
        self.assertEqual(uidlist._split_simple("1 :a b\n7 :c\n"), (["1", "7"], ["a b", "c"]))

    def test_parse_same_either_way(self) -> None:
        head = "3 V1 N9 G3085f01b7f11094c501100008c4a11c1\n"
        plain = parse((head + "1 :a\n5 :b\n").encode())
        fielded = parse((head + "1 :a\n5 W3 :b\n").encode())
        self.assertEqual(plain.uids, fielded.uids)
        self.assertEqual((plain.fields, fielded.fields), ({}, {"b": "W3"}))
        self.assertEqual(plain.next_uid, 9)


class DotLockTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        self.dir.mkdir()
        self.target = self.dir / "dovecot-uidlist"

    def test_replace_writes_through_the_lock_file(self) -> None:
        self.target.write_bytes(b"old")
        with DotLock(self.target) as lock:
            self.assertTrue((self.dir / "dovecot-uidlist.lock").exists())
            lock.replace(b"new contents")
        self.assertEqual(self.target.read_bytes(), b"new contents")
        self.assertEqual(sorted(os.listdir(self.dir)), ["dovecot-uidlist"], "no lock or temp left")

    def test_release_without_replace_leaves_target(self) -> None:
        self.target.write_bytes(b"old")
        with DotLock(self.target):
            pass
        self.assertEqual(sorted(os.listdir(self.dir)), ["dovecot-uidlist"])
        self.assertEqual(self.target.read_bytes(), b"old")

    def test_held_lock_times_out(self) -> None:
        with DotLock(self.target):
            other = DotLock(self.target, timeout=0.05)
            e = self.assertRaises(LockTimeout, other.acquire)
            self.assertIn("dovecot-uidlist.lock", str(e))
            self.assertNotIn("\n", str(e))
        self.assertEqual(os.listdir(self.dir), [], "the loser left no temp file")

    def test_dovecot_style_excl_lock_excludes_us(self) -> None:
        fd = os.open(self.dir / "dovecot-uidlist.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.close(fd)
        self.assertRaises(LockTimeout, DotLock(self.target, timeout=0.05).acquire)

    def test_stale_by_mtime_is_broken(self) -> None:
        lock_path = self.dir / "dovecot-uidlist.lock"
        lock_path.write_bytes(b"3 V1 N1 G...")  # Dovecot's lock holds the new list, no pid
        old = time.time() - dotlock.STALE_SECONDS - 5
        os.utime(lock_path, (old, old))
        with DotLock(self.target, timeout=1) as lock:
            lock.replace(b"mine")
        self.assertEqual(self.target.read_bytes(), b"mine")

    def test_lock_of_a_dead_process_is_broken_at_once(self) -> None:
        child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                               capture_output=True, text=True, check=True)
        lock_path = self.dir / "dovecot-uidlist.lock"
        lock_path.write_text(f"{child.stdout.strip()}:{dotlock._HOST}")
        with DotLock(self.target, timeout=1) as lock:
            lock.replace(b"mine")
        self.assertEqual(self.target.read_bytes(), b"mine")

    def test_fresh_foreign_lock_is_not_broken(self) -> None:
        (self.dir / "dovecot-uidlist.lock").write_text(f"{os.getpid()}:{dotlock._HOST}")
        self.assertRaises(LockTimeout, DotLock(self.target, timeout=0.05).acquire)

    def test_lock_taken_over_is_not_replaced(self) -> None:
        lock = DotLock(self.target)
        lock.acquire()
        os.unlink(self.dir / "dovecot-uidlist.lock")  # someone judged it stale
        (self.dir / "dovecot-uidlist.lock").write_text("someone else")
        self.assertRaises(StoreError, lock.replace, b"mine")
        self.assertFalse(self.target.exists())
        self.assertEqual((self.dir / "dovecot-uidlist.lock").read_text(), "someone else")


class ModifiedUtf7Tests(SynchronousTestCase):
    CASES = [
        ("INBOX", "INBOX"),
        ("Sent Items", "Sent Items"),
        ("&", "&-"),
        ("R&D", "R&-D"),
        ("Été", "&AMk-t&AOk-"),
        ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),  # RFC 3501 §5.1.3
        ("☺!", "&Jjo-!"),
        ("😀", "&2D3eAA-"),
    ]

    def test_table(self) -> None:
        for text, wire in self.CASES:
            self.assertEqual(utf7.encode(text), wire, text)
            self.assertEqual(utf7.decode(wire), text, wire)

    def test_rejects_non_canonical(self) -> None:
        for bad in ["&", "&AMk", "&AGE-", "&Jjo=-", "é", "&,,,-", "&A-"]:
            self.assertRaises(ValueError, utf7.decode, bad)
