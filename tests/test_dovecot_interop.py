"""Dovecot as the independent peer on mx's Maildirs: same messages, UIDs, UIDLs and flags.

mx (in-process `MailService`) delivers over SMTP into `<data_dir>/mail/<domain>/<local>/`; a
private Dovecot (tests/dovecot.py: own config, loopback ports, never the system service) is
pointed at `maildir:<data_dir>/mail/%d/%n` and authenticates against mx's own users file
(ARGON2ID). Then both read and write the same folder in turn:

- Dovecot reads what mx delivered byte for byte (POP3 RETR), and its POP3 UIDLs equal mx's
  (`%08Xu%08Xv`, Dovecot's default), whichever of the two saw the messages first;
- UIDs and UIDVALIDITY agree both ways: assigned by mx's store and reported by Dovecot's IMAP
  and `doveadm fetch`, and assigned by Dovecot (IMAP SELECT) and read by mx's store from
  Dovecot's `dovecot-uidlist`; later deliveries continue from the other's next UID;
- flags set by Dovecot (IMAP STORE: \\Seen, \\Flagged, a keyword) are mx's flags, and flags
  set by mx (`Folder.set_flags`) are Dovecot's.

Each test skips with the reason when Dovecot is not installed (`.ci/run` installs it as root)
or while the mx side it needs (`mx.store`, `mx.pop3server`) does not exist yet. As root,
Dovecot's mail processes run as `nobody` and the tests hand the tree over between steps
(`DovecotInstance.hand_over`): see tests/dovecot.py.
"""

from __future__ import annotations

import grp
import importlib.util
import imaplib
import os
import poplib
import re
from pathlib import Path
from typing import Any, Iterable

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.dovecot import DovecotInstance, dovecot_available, start_dovecot
from tests.support import DOMAIN, add_users, make_config, maildir, service_ports, smtp_client, start_mail_service

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
PASSWORDS = {ALICE: "alice-secret", BOB: "bob-secret"}
KEYWORD = "$MxInterop"


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def need_dovecot() -> None:
    reason = dovecot_available()
    if reason is not None:
        raise SkipTest(f"no private Dovecot: {reason}")


def need_store() -> None:
    if not _have("mx.store"):
        raise SkipTest("mx.store does not exist yet (issue 8, the mailbox store)")


def need_pop3() -> None:
    if not _have("mx.pop3server"):
        raise SkipTest("mx/pop3server.py does not exist yet: mx's listen.pop3 is not served (issue 8)")


def message(n: int, to: str = ALICE) -> bytes:
    body = b"".join(b"line %d of message %d, some text to make it a few hundred bytes\r\n" % (i, n)
                    for i in range(8))
    return (b"From: Sender <sender@elsewhere.test>\r\nTo: <%s>\r\nSubject: interop %d\r\n"
            b"Message-ID: <interop-%d@elsewhere.test>\r\n\r\n" % (to.encode(), n, n)) + body


def uidl(uid: int, uidvalidity: int) -> str:
    """Dovecot's default `pop3_uidl_format = %08Xu%08Xv`, as Dovecot 2.3 prints it: lower-case hex."""
    return "%08x%08x" % (uid, uidvalidity)  # Dovecot prints %X in lower case


def base_of(name: str) -> str:
    """A Maildir file name without its `:2,<flags>` info: the key in `dovecot-uidlist`."""
    return name.split(":", 1)[0]


def folder_files(box: Path) -> dict[str, Path]:
    """{base name: path} of every message file in `new/` and `cur/`."""
    out = {}
    for sub in ("new", "cur"):
        for p in (box / sub).iterdir():
            if not p.name.startswith("."):
                out[base_of(p.name)] = p
    return out


_SYSTEM = {"D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered", "S": "\\Seen",
           "T": "\\Deleted"}  # Maildir letters as Dovecot's IMAP names them ("P" is Dovecot's $Forwarded)


def flag_names(folder: Any, letters: Iterable[str]) -> frozenset[str]:
    """mx's flags (Maildir letters; keywords "a".."z" via the folder's `dovecot-keywords`) as
    IMAP names."""
    out = set()
    for c in letters:
        name = _SYSTEM.get(c) or folder.keywords.name(c)
        out.add(name if name is not None else f"<unknown keyword letter {c}>")
    return frozenset(out)


def flag_letters(folder: Any, names: Iterable[str]) -> frozenset[str]:
    """IMAP flag names as mx's letters, keywords allotted in the folder's `dovecot-keywords`."""
    by_name = {v.lower(): k for k, v in _SYSTEM.items()}
    return frozenset(by_name.get(n.lower()) or folder.keywords.letter(n, create=True) for n in names)


def imap_flags(flags: Iterable[str]) -> frozenset[str]:
    """Dovecot's FETCH FLAGS without \\Recent (a session property, not stored in the Maildir)."""
    return frozenset(f for f in flags if f.lower() != "\\recent")


def uidlist_header(box: Path) -> dict[str, str]:
    """`3 V<uidvalidity> N<nextuid> G<guid>` -> {"version": "3", "V": ..., "N": ..., "G": ...}."""
    first = (box / "dovecot-uidlist").read_text().splitlines()[0].split()
    return {"version": first[0], **{field[0]: field[1:] for field in first[1:]}}


# --- IMAP / POP3 reads (blocking: run them in a thread) ------------------------------------

_FETCH = re.compile(rb"UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+)")


def imap_select(dovecot: DovecotInstance, user: str) -> tuple[int, dict[int, frozenset[str]]]:
    """SELECT INBOX and `UID FETCH 1:* (UID FLAGS)`: (UIDVALIDITY, {uid: flags})."""
    client = dovecot.imap(user, PASSWORDS[user])
    try:
        typ, _ = client.select("INBOX")
        assert typ == "OK", dovecot.log()
        uidvalidity = int(client.response("UIDVALIDITY")[1][0])
        typ, data = client.uid("FETCH", "1:*", "(UID FLAGS)")
        assert typ == "OK", (data, dovecot.log())
        found: dict[int, frozenset[str]] = {}
        for item in data:
            line = item[0] if isinstance(item, tuple) else item
            if not line:
                continue
            m = _FETCH.search(line)
            assert m, line
            uid = int(m.group(1) or m.group(4))
            flags = (m.group(2) if m.group(1) else m.group(3)).decode().split()
            found[uid] = imap_flags(flags)
        client.logout()
        return uidvalidity, found
    except BaseException:
        client.shutdown()
        raise


def imap_store(dovecot: DovecotInstance, user: str, uid: int, op: str, flags: str) -> None:
    client = dovecot.imap(user, PASSWORDS[user])
    try:
        assert client.select("INBOX")[0] == "OK"
        typ, data = client.uid("STORE", str(uid), op, flags)
        assert typ == "OK", (data, dovecot.log())
        client.logout()
    except BaseException:
        client.shutdown()
        raise


def pop3_listing(port: int, user: str, retrieve: bool = False) -> tuple[list[tuple[int, int, str]], list[bytes]]:
    """(sorted [(msg number, size, uidl)], [RETR bytes...]) from a POP3 server; QUIT (no DELE)."""
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    try:
        client.user(user)
        client.pass_(PASSWORDS[user])
        sizes = {int(n): int(s) for n, s in (line.split() for line in client.list()[1])}
        uidls = {int(n): u.decode() for n, u in (line.split() for line in client.uidl()[1])}
        assert sizes.keys() == uidls.keys(), (sizes, uidls)
        bodies = []
        if retrieve:
            for n in sorted(sizes):
                lines = client.retr(n)[1]  # poplib undoes the dot-stuffing
                bodies.append(b"".join(line + b"\r\n" for line in lines))
        client.quit()
        return sorted((n, sizes[n], uidls[n]) for n in sizes), bodies
    except BaseException:
        client.close()
        raise


class DovecotInteropTests(TestCase):
    timeout = 120

    async def setUp(self) -> None:
        need_dovecot()
        listen = {"smtp": "tcp:0:interface=127.0.0.1"}
        if _have("mx.pop3server"):
            listen["pop3"] = "tcp:0:interface=127.0.0.1"
        # Dovecot's default POP3 behaviour (RETR marks \Seen), so both servers compare alike.
        self.config = make_config(self, listen=listen, extra="[pop3]\nmark_seen = true\n")
        add_users(self.config, PASSWORDS)
        self.mail = await start_mail_service(self, self.config)
        self.ports = service_ports(self.mail)
        self.mail_root = self.config.data_dir / "mail"
        self.box = maildir(self.config, "alice")
        self.dovecot = await deferToThread(start_dovecot, self, self.mail_root, PASSWORDS,
                                           users_file=self.config.auth.users_file)

    def tearDown(self) -> None:
        errors = [e for e in self.dovecot.errors() if "Warning:" not in e] if hasattr(self, "dovecot") else []
        self.assertEqual(errors, [], "Dovecot logged errors on mx's Maildir:\n" + "\n".join(errors))

    async def deliver(self, numbers: Iterable[int], to: str = ALICE) -> None:
        def send() -> None:
            with smtp_client(self.ports["smtp"]) as s:
                s.ehlo()
                for n in numbers:
                    s.sendmail("sender@elsewhere.test", [to], message(n, to))

        await deferToThread(send)

    async def to_dovecot(self) -> None:
        await deferToThread(self.dovecot.hand_over)

    def inbox(self) -> Any:
        from mx.store import Mailbox

        return Mailbox(self.box).inbox()

    def mx_uids(self) -> tuple[int, dict[int, str], dict[int, frozenset[str]]]:
        """(UIDVALIDITY, {uid: base}, {uid: flags}) as mx's store sees the INBOX now."""
        folder = self.inbox()
        infos = folder.messages()
        return (folder.uidvalidity, {m.uid: m.base for m in infos},
                {m.uid: flag_names(folder, m.flags) for m in infos})

    async def dovecot_uids(self) -> dict[int, str]:
        """{uid: guid} from `doveadm fetch` (for Maildir the guid is the file's base name)."""
        found = await deferToThread(self.dovecot.fetch, ALICE)
        return {m.uid: m.guid for m in found}

    # --- Dovecot reads what mx wrote -----------------------------------------------------

    async def test_dovecot_reads_mx_delivery(self) -> None:
        """Dovecot logs in with mx's users file (ARGON2ID) and retrieves, byte-exact, what mx
        delivered; its UIDLs are `%08Xu%08Xv` of the UIDs in the `dovecot-uidlist` it wrote."""
        await self.deliver(range(3))
        await self.deliver([10], to=BOB)
        files = folder_files(self.box)
        self.assertEqual(len(files), 3)
        await self.to_dovecot()
        listing, bodies = await deferToThread(pop3_listing, self.dovecot.pop3_port, ALICE, True)
        self.assertEqual(len(listing), 3, self.dovecot.log())
        on_disk = sorted(p.read_bytes() for p in folder_files(self.box).values())
        self.assertEqual(sorted(bodies), on_disk)
        for body in bodies:  # mx's trace headers, then the client's bytes unchanged
            self.assertTrue(body.startswith(b"Return-Path: <sender@elsewhere.test>\r\nReceived: "), body[:200])
        self.assertEqual(sorted(size for _, size, _ in listing), sorted(len(b) for b in on_disk))
        header = uidlist_header(self.box)
        self.assertEqual(header["version"], "3")
        self.assertEqual([u for _, _, u in listing], [uidl(uid, int(header["V"])) for uid in (1, 2, 3)])
        bob_listing, _ = await deferToThread(pop3_listing, self.dovecot.pop3_port, BOB)
        self.assertEqual(len(bob_listing), 1)

    # --- (a) the same UIDLs from both POP3 servers ---------------------------------------

    async def test_pop3_uidl_same_mx_first(self) -> None:
        """mx's POP3 lists the messages first (its store assigns the UIDs), then Dovecot's:
        the same UIDL, size and order for every message."""
        need_pop3()
        await self.deliver(range(4))
        mx_listing, mx_bodies = await deferToThread(pop3_listing, self.ports["pop3"], ALICE, True)
        self.assertEqual(len(mx_listing), 4)
        await self.to_dovecot()
        dc_listing, dc_bodies = await deferToThread(pop3_listing, self.dovecot.pop3_port, ALICE, True)
        self.assertEqual(mx_listing, dc_listing)
        self.assertEqual(mx_bodies, dc_bodies)
        again, _ = await deferToThread(pop3_listing, self.ports["pop3"], ALICE)  # after Dovecot's writes
        self.assertEqual(again, mx_listing)

    async def test_pop3_uidl_same_dovecot_first(self) -> None:
        """Dovecot's POP3 sees the messages first (Dovecot assigns the UIDs), then mx's."""
        need_pop3()
        await self.deliver(range(4))
        await self.to_dovecot()
        dc_listing, dc_bodies = await deferToThread(pop3_listing, self.dovecot.pop3_port, ALICE, True)
        mx_listing, mx_bodies = await deferToThread(pop3_listing, self.ports["pop3"], ALICE, True)
        self.assertEqual(len(dc_listing), 4)
        self.assertEqual(mx_listing, dc_listing)
        self.assertEqual(mx_bodies, dc_bodies)

    # --- (b) UIDs and UIDVALIDITY survive both ways --------------------------------------

    async def test_uids_assigned_by_mx_are_dovecots(self) -> None:
        """mx's store assigns UIDs first; Dovecot's IMAP and doveadm report the same UIDs for
        the same files and the same UIDVALIDITY; a message mx delivers after Dovecot wrote
        the list gets the next UID in both."""
        need_store()
        await self.deliver(range(5))
        validity, mx_uids, _ = self.mx_uids()
        self.assertEqual(sorted(mx_uids), [1, 2, 3, 4, 5])
        self.assertEqual(set(mx_uids.values()), set(folder_files(self.box)))
        await self.to_dovecot()
        dc_validity, dc_flags = await deferToThread(imap_select, self.dovecot, ALICE)
        self.assertEqual(dc_validity, validity)
        self.assertEqual(sorted(dc_flags), sorted(mx_uids))
        self.assertEqual(await self.dovecot_uids(), mx_uids)
        # Dovecot has now rewritten the list (and moved new/ to cur/); the next one continues.
        await self.deliver([5])
        validity2, mx_uids2, _ = self.mx_uids()
        self.assertEqual(validity2, validity)
        self.assertEqual({u: b for u, b in mx_uids2.items() if u in mx_uids}, mx_uids)
        self.assertEqual(sorted(mx_uids2), [1, 2, 3, 4, 5, 6])
        await self.to_dovecot()
        self.assertEqual(await self.dovecot_uids(), mx_uids2)
        self.assertEqual(int(uidlist_header(self.box)["V"]), validity)

    async def test_uids_assigned_by_dovecot_are_mxs(self) -> None:
        """Dovecot assigns UIDs first (IMAP SELECT writes its `dovecot-uidlist`); mx's store
        reads that list and agrees on every UID and on UIDVALIDITY; mx's next UID follows
        Dovecot's, and Dovecot agrees with what mx added."""
        need_store()
        await self.deliver(range(5))
        await self.to_dovecot()
        dc_validity, dc_flags = await deferToThread(imap_select, self.dovecot, ALICE)
        dc_uids = await self.dovecot_uids()
        self.assertEqual(sorted(dc_flags), [1, 2, 3, 4, 5])
        header = uidlist_header(self.box)
        self.assertEqual(int(header["V"]), dc_validity)
        validity, mx_uids, _ = self.mx_uids()
        self.assertEqual(validity, dc_validity)
        self.assertEqual(mx_uids, dc_uids)
        await self.deliver([5, 6])
        _, mx_uids2, _ = self.mx_uids()
        self.assertEqual(sorted(mx_uids2), [1, 2, 3, 4, 5, 6, 7])
        await self.to_dovecot()
        self.assertEqual(await self.dovecot_uids(), mx_uids2)
        dc_validity2, _ = await deferToThread(imap_select, self.dovecot, ALICE)
        self.assertEqual(dc_validity2, dc_validity)

    async def test_uids_survive_expunge_by_dovecot(self) -> None:
        """Dovecot expunges a message (IMAP \\Deleted + EXPUNGE): mx sees the rest with the same
        UIDs, and the freed UID is never handed out again."""
        need_store()
        await self.deliver(range(3))
        _, mx_uids, _ = self.mx_uids()
        await self.to_dovecot()

        def expunge() -> None:
            client = self.dovecot.imap(ALICE, PASSWORDS[ALICE])
            assert client.select("INBOX")[0] == "OK"
            assert client.uid("STORE", "3", "+FLAGS", "(\\Deleted)")[0] == "OK"
            assert client.expunge()[0] == "OK"
            client.logout()

        await deferToThread(expunge)
        _, after, _ = self.mx_uids()
        self.assertEqual(after, {u: b for u, b in mx_uids.items() if u != 3})
        await self.deliver([3])
        _, later, _ = self.mx_uids()
        self.assertEqual(sorted(later), [1, 2, 4])
        await self.to_dovecot()
        self.assertEqual(await self.dovecot_uids(), later)

    # --- (c) flags both ways -------------------------------------------------------------

    async def test_flags_set_by_dovecot_are_seen_by_mx(self) -> None:
        """IMAP STORE on Dovecot (\\Seen \\Flagged and a keyword, then -FLAGS \\Seen): mx's store
        reports the same flags for the same UIDs, and the UIDs did not move."""
        need_store()
        await self.deliver(range(3))
        _, mx_uids, _ = self.mx_uids()
        await self.to_dovecot()
        await deferToThread(imap_store, self.dovecot, ALICE, 1, "+FLAGS", f"(\\Seen \\Flagged {KEYWORD})")
        await deferToThread(imap_store, self.dovecot, ALICE, 2, "+FLAGS", "(\\Answered \\Seen)")
        await deferToThread(imap_store, self.dovecot, ALICE, 2, "-FLAGS", "(\\Seen)")
        _, dc_flags = await deferToThread(imap_select, self.dovecot, ALICE)
        self.assertEqual(dc_flags[1], frozenset({"\\Seen", "\\Flagged", KEYWORD}))
        self.assertEqual(dc_flags[2], frozenset({"\\Answered"}))
        self.assertEqual(dc_flags[3], frozenset())
        self.assertIn(KEYWORD, (self.box / "dovecot-keywords").read_text())
        _, uids, flags = self.mx_uids()
        self.assertEqual(uids, mx_uids)
        self.assertEqual(flags, dc_flags)

    async def test_flags_set_by_mx_are_seen_by_dovecot(self) -> None:
        """`Folder.set_flags` in mx (system flags, a keyword Dovecot made and one it has never
        seen, which mx adds to `dovecot-keywords`): Dovecot's IMAP reports them all."""
        need_store()
        await self.deliver(range(3))
        await self.to_dovecot()
        await deferToThread(imap_store, self.dovecot, ALICE, 3, "+FLAGS", f"({KEYWORD})")  # Dovecot's keyword a
        folder = self.inbox()
        uids = sorted(m.uid for m in folder.messages())
        self.assertEqual(uids, [1, 2, 3])
        letter = folder.keywords.letter(KEYWORD)
        self.assertEqual(letter, "a")  # Dovecot's keyword 0, read from its dovecot-keywords
        folder.set_flags(1, flag_letters(folder, {"\\Seen", "\\Answered"}))
        folder.set_flags(2, flag_letters(folder, {"\\Flagged", "$MxOnly", KEYWORD}))
        folder.set_flags(3, flag_letters(folder, {"\\Deleted", KEYWORD}))
        self.assertEqual(folder.keywords.letter(KEYWORD), "a")
        self.assertEqual(folder.keywords.letter("$MxOnly"), "b")
        await self.to_dovecot()
        _, dc_flags = await deferToThread(imap_select, self.dovecot, ALICE)
        self.assertEqual(dc_flags, {
            1: frozenset({"\\Seen", "\\Answered"}),
            2: frozenset({"\\Flagged", "$MxOnly", KEYWORD}),
            3: frozenset({"\\Deleted", KEYWORD}),
        })
        _, _, mx_flags = self.mx_uids()
        self.assertEqual(mx_flags, dc_flags)

    async def test_pop3_retr_marks_seen_for_the_other(self) -> None:
        """A RETR on either server marks the message \\Seen in its file name; the other reads it."""
        need_pop3()
        need_store()
        await self.deliver(range(2))

        def retr_first(port: int) -> None:
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.user(ALICE)
            client.pass_(PASSWORDS[ALICE])
            client.retr(1)
            client.quit()

        await deferToThread(retr_first, self.ports["pop3"])
        await self.to_dovecot()
        _, dc_flags = await deferToThread(imap_select, self.dovecot, ALICE)
        self.assertEqual(dc_flags, {1: frozenset({"\\Seen"}), 2: frozenset()})
        await deferToThread(imap_store, self.dovecot, ALICE, 1, "-FLAGS", "(\\Seen)")
        await deferToThread(retr_first, self.dovecot.pop3_port)  # Dovecot's message 1 is UID 1
        _, _, mx_flags = self.mx_uids()
        self.assertEqual(mx_flags, {1: frozenset({"\\Seen"}), 2: frozenset()})


class SharedUsersFileTests(TestCase):
    """Issue 8 §3 as a new user would try it: the users file shared with Dovecot's auth
    (`chgrp dovecot users; chmod 640 users`) stays readable by Dovecot after mx rewrites it."""

    timeout = 60

    async def test_dovecot_auth_after_mx_rewrites_users_file(self) -> None:
        need_dovecot()
        if os.geteuid() != 0:
            raise SkipTest("needs root (chgrp to the dovecot group, auth as the dovecot user)")
        config = make_config(self)
        add_users(config, {ALICE: PASSWORDS[ALICE]})
        users = config.auth.users_file
        gid = grp.getgrnam("dovecot").gr_gid
        os.chown(users, -1, gid)
        os.chmod(users, 0o640)
        for d in [users.parent, *users.parent.parents]:  # let the dovecot user reach the file
            if d == Path.cwd().resolve():
                break
            os.chmod(d, os.stat(d).st_mode | 0o001)
        mail_root = config.data_dir / "mail"
        dovecot = await deferToThread(start_dovecot, self, mail_root, PASSWORDS, users_file=users,
                                      auth_user="dovecot")
        await deferToThread(dovecot.hand_over)
        add_users(config, {BOB: PASSWORDS[BOB]})  # mx rewrites the file (`mx user add`)
        st = os.stat(users)
        self.assertEqual((st.st_gid, st.st_mode & 0o777), (gid, 0o640))

        def login(user: str) -> None:
            client = dovecot.pop3(user, PASSWORDS[user])
            try:
                client.stat()
                client.quit()
            except BaseException:
                client.close()
                raise

        for user in (ALICE, BOB):
            try:
                await deferToThread(login, user)
            except (poplib.error_proto, imaplib.IMAP4.error) as e:
                self.fail(f"Dovecot login of {user} failed after mx rewrote the users file: {e}\n{dovecot.log()}")
