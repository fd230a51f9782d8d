"""Tests for mx.users: hashing, the users file, address rules and live reload."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from unittest import SkipTest

from twisted.trial.unittest import SynchronousTestCase

from mx.users import (
    SCHEME,
    UserDB,
    UsersError,
    hash_password,
    normalise_user,
    read_users,
    verify_password,
    write_users,
)

LOCAL = ("localhost", "example.test")


class PasswordTests(SynchronousTestCase):
    def test_hash_and_verify(self) -> None:
        stored = hash_password("correct horse")
        self.assertTrue(stored.startswith(SCHEME + "$argon2id$v=19$"))
        self.assertTrue(verify_password(stored, "correct horse"))
        self.assertFalse(verify_password(stored, "correct horsE"))
        self.assertFalse(verify_password(stored, ""))
        self.assertNotEqual(hash_password("correct horse"), stored)  # salted

    def test_non_ascii_password(self) -> None:
        stored = hash_password("pässwörd ☃")
        self.assertTrue(verify_password(stored, "pässwörd ☃"))
        self.assertFalse(verify_password(stored, "passwort"))

    def test_scheme_is_case_insensitive(self) -> None:
        stored = hash_password("pw")
        self.assertTrue(verify_password("{argon2id}" + stored[len(SCHEME):], "pw"))

    def test_bad_input_is_a_mismatch_not_an_error(self) -> None:
        encoded = hash_password("pw")[len(SCHEME):]
        for stored in ["", "pw", "{PLAIN}pw", "{SHA512-CRYPT}$6$x$y", encoded,
                       SCHEME, SCHEME + "$argon2id$garbage", SCHEME + "$argon2i$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaA",
                       None, 5]:
            self.assertFalse(verify_password(stored, "pw"), repr(stored))  # type: ignore[arg-type]
        self.assertFalse(verify_password(SCHEME + encoded, None))  # type: ignore[arg-type]


    def test_libsodium_and_argon2_cffi_agree(self) -> None:
        # Hashes of the shape libsodium verifies take its path, the rest argon2-cffi's: both
        # must accept the right password and refuse a wrong one, for any parameters.
        import argon2

        shapes = [
            dict(time_cost=1, memory_cost=8, parallelism=1, salt_len=8, hash_len=16),
            dict(time_cost=2, memory_cost=64, parallelism=2, salt_len=16, hash_len=32),
            dict(time_cost=1, memory_cost=64, parallelism=4, salt_len=16, hash_len=64),
            dict(time_cost=1, memory_cost=32, parallelism=1, salt_len=64, hash_len=32),  # > 127 chars
            dict(time_cost=1, memory_cost=32, parallelism=1, salt_len=8, hash_len=4),  # a tag below libsodium's minimum
        ]
        for shape in shapes:
            stored = SCHEME + argon2.PasswordHasher(**shape).hash("pässwörd")
            self.assertTrue(verify_password(stored, "pässwörd"), shape)
            self.assertFalse(verify_password(stored, "passwörd"), shape)
            self.assertFalse(verify_password(stored[:-3] + "AAA", "pässwörd"), shape)  # another tag
        self.assertFalse(verify_password(hash_password("pw"), "\udcff"))  # not encodable: a mismatch


class FileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.path = self.folder / "users"

    def test_missing_file_has_no_users(self) -> None:
        self.assertEqual(read_users(self.path), {})

    def test_write_then_read(self) -> None:
        users = {"bob@localhost": SCHEME + "$argon2id$b", "alice@localhost": SCHEME + "$argon2id$a"}
        write_users(self.path, users)
        self.assertEqual(read_users(self.path), users)
        entries = [line for line in self.path.read_text().splitlines() if not line.startswith("#")]
        self.assertEqual(entries, ["alice@localhost:{ARGON2ID}$argon2id$a",
                                   "bob@localhost:{ARGON2ID}$argon2id$b"])

    def test_new_file_is_0600_and_leaves_no_temp_files(self) -> None:
        write_users(self.path, {"alice@localhost": SCHEME + "x"})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(sorted(p.name for p in self.folder.iterdir()), ["users"])

    def test_rewrite_keeps_group_mode_but_never_others(self) -> None:
        # A users file shared with a Dovecot (group-readable) stays so; world access goes.
        self.path.write_text("")
        os.chmod(self.path, 0o644)
        write_users(self.path, {"alice@localhost": SCHEME + "x"})
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o640)

    def test_rewrite_keeps_the_owner(self) -> None:
        # `mx user add` run as root must not take the file away from the mail user the
        # server runs as (twistd --uid): it could no longer re-read it.
        if os.geteuid() != 0:
            raise SkipTest("needs root to give the file to another user")
        self.path.write_text("")
        os.chown(self.path, 65534, 65534)
        os.chmod(self.path, 0o600)
        write_users(self.path, {"alice@localhost": SCHEME + "x"})
        st = os.stat(self.path)
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (65534, 65534, 0o600))

    def test_write_replaces_the_file(self) -> None:
        write_users(self.path, {"alice@localhost": SCHEME + "x"})
        before = os.stat(self.path).st_ino
        write_users(self.path, {})
        self.assertNotEqual(os.stat(self.path).st_ino, before)  # renamed into place, not rewritten
        self.assertEqual(read_users(self.path), {})

    def test_write_refuses_entries_that_would_break_the_format(self) -> None:
        for users in [{"a:b@localhost": "x"}, {"a@localhost": "x\nevil@localhost:y"}, {"a@localhost": ""}]:
            self.assertRaises(UsersError, write_users, self.path, users)
        self.assertFalse(self.path.exists())

    def test_read_skips_comments_and_dovecot_fields(self) -> None:
        self.path.write_text(
            "# comment\n\n  Alice@LOCALHOST:{ARGON2ID}$a:1000:1000::/home/alice::\n"
            "bob@localhost:{ARGON2ID}$b\nbob@localhost:{ARGON2ID}$second\n")
        self.assertEqual(read_users(self.path), {"alice@localhost": "{ARGON2ID}$a",
                                                 "bob@localhost": "{ARGON2ID}$b"})

    def test_read_malformed_line_names_it(self) -> None:
        for text in ["alice@localhost\n", "# ok\nnot an address:{ARGON2ID}$x\n", "alice@localhost:\n"]:
            self.path.write_text(text)
            with self.assertRaises(UsersError) as caught:
                read_users(self.path)
            self.assertIn(f"{self.path}: line ", str(caught.exception))


class NormaliseTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for text, expected in [("alice@localhost", "alice@localhost"),
                               ("Alice@LocalHost", "alice@localhost"),
                               ("a.b-c_d@example.test", "a.b-c_d@example.test"),
                               ("jörg@example.test", "jörg@example.test")]:
            self.assertEqual(normalise_user(text, LOCAL), expected)

    def test_rejected(self) -> None:
        for text in ["", "alice", "@localhost", "alice@", "alice@remote.example",
                     "../x@localhost", "a/b@localhost", ".x@localhost", "x.@localhost",
                     "a\\b@localhost", '"a b"@localhost', '".."@localhost', "#x@localhost",
                     "alice+tag@localhost", "a:b@localhost", "a\nb@localhost",
                     "alice@[127.0.0.1]", "a" * 65 + "@localhost"]:
            self.assertRaises(UsersError, normalise_user, text, LOCAL)


class UserDBTests(SynchronousTestCase):
    """The table is served from memory; `refresh()` (the server runs it in a thread pool once
    a second) is the only thing that looks at the file."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.path = folder / "users"
        self.db = UserDB(self.path)

    def test_missing_file_then_created(self) -> None:
        self.assertEqual(self.db.users(), frozenset())
        self.assertIsNone(self.db.lookup("alice@localhost"))
        write_users(self.path, {"alice@localhost": "{ARGON2ID}$a"})
        # Until the next refresh the old answer stands: lookups never touch the file.
        self.assertFalse(self.db.exists("alice@localhost"))
        self.assertTrue(self.db.refresh())
        self.assertTrue(self.db.exists("alice@localhost"))
        self.assertEqual(self.db.lookup("alice@localhost"), "{ARGON2ID}$a")
        self.assertEqual(self.db.users(), frozenset({"alice@localhost"}))
        self.assertFalse(self.db.refresh())  # unchanged: not re-read

    def test_reload_after_change_and_delete(self) -> None:
        write_users(self.path, {"alice@localhost": "{ARGON2ID}$a"})
        self.db.refresh()
        self.assertTrue(self.db.exists("alice@localhost"))
        write_users(self.path, {"alice@localhost": "{ARGON2ID}$new", "bob@localhost": "{ARGON2ID}$b"})
        self.db.refresh()
        self.assertEqual(self.db.lookup("alice@localhost"), "{ARGON2ID}$new")
        self.assertTrue(self.db.exists("bob@localhost"))
        self.path.unlink()
        self.db.refresh()
        self.assertEqual(self.db.users(), frozenset())

    def test_broken_file_keeps_previous_users(self) -> None:
        write_users(self.path, {"alice@localhost": "{ARGON2ID}$a"})
        self.db.refresh()
        self.assertTrue(self.db.exists("alice@localhost"))
        self.path.write_text("garbage line\n")
        self.assertFalse(self.db.refresh())
        self.assertTrue(self.db.exists("alice@localhost"))
        self.assertIn("line 1", self.db.error or "")
        write_users(self.path, {"bob@localhost": "{ARGON2ID}$b"})
        self.db.refresh()
        self.assertEqual(self.db.users(), frozenset({"bob@localhost"}))
        self.assertIsNone(self.db.error)

    def test_broken_file_at_start_is_an_error(self) -> None:
        self.path.write_text("garbage line\n")
        self.assertRaises(UsersError, UserDB, self.path)

    def test_lookups_never_touch_the_file(self) -> None:
        """Defect A: RCPT and AUTH run `lookup`/`exists` on the reactor thread; only
        `refresh()` may stat or read the users file."""
        write_users(self.path, {"alice@localhost": "{ARGON2ID}$a"})
        db = UserDB(self.path)
        calls: list[str] = []
        real_stat = os.stat

        def stat(*args: object, **kwargs: object) -> os.stat_result:
            calls.append(str(args[0]))
            return real_stat(*args, **kwargs)  # type: ignore[arg-type]

        self.patch(os, "stat", stat)
        self.patch(UserDB, "RECHECK_INTERVAL", 0.0)  # the old lazy refresh would stat every time
        for _ in range(3):
            self.assertTrue(db.exists("alice@localhost"))
            self.assertEqual(db.lookup("alice@localhost"), "{ARGON2ID}$a")
            self.assertEqual(db.users(), frozenset({"alice@localhost"}))
        self.assertEqual(calls, [])
        db.refresh()
        self.assertEqual(calls, [str(self.path)])
