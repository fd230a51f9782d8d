"""Independent IMAP clients against the whole server: mbsync (isync) and the imapclient library.

`tests.test_imapserver` drives the server with `imaplib`, which does little parsing of its
own. Here two clients written by other people check the same server: mbsync, a C program
that syncs a local Maildir both ways (over STARTTLS and over IMAPS, with docs/imap.md's
configuration), and `imapclient`, a Python library that parses ENVELOPE, BODYSTRUCTURE,
LIST, STATUS, NAMESPACE and IDLE responses strictly. Each test skips, saying why, when its
client is not installed (`.ci/run` installs isync; imapclient is `pip install imapclient`).

Every wait is bounded: sockets have timeouts, mbsync runs with a subprocess timeout, IDLE
checks have a deadline.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests.support import SOCKET_TIMEOUT, maildir, smtp_client
from tests.test_imapserver import ALICE, ALICE_PW, IMAPCase, message, ok

MBSYNC_TIMEOUT = 60.0
IDLE_DEADLINE = 2.0  # INTERFACE.md: new mail reaches an IDLE client within a second
FLAG_LETTERS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S", "\\Deleted": "T"}
MSGID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.I | re.M)


def message_id(raw: bytes) -> bytes:
    found = MSGID.search(re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0])  # in the header only
    assert found, raw[:300]
    return found.group(1)


def normalised(raw: bytes) -> tuple[bytes, bytes]:
    """(header, body) with LF line ends and mbsync's X-TUID bookkeeping header removed.

    mbsync stores Maildir files with LF and sends CRLF; the octets are otherwise the same."""
    text = raw.replace(b"\r\n", b"\n")
    header, _, body = text.partition(b"\n\n")
    header = b"\n".join(line for line in header.split(b"\n") if not line.lower().startswith(b"x-tuid:"))
    return header, body


def letters(flags: set[str]) -> str:
    return "".join(sorted(FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS))


# -- mbsync -------------------------------------------------------------------------------


def mbsync_version() -> tuple[int, ...]:
    out = subprocess.run(["mbsync", "--version"], capture_output=True, text=True, timeout=10,
                         stdin=subprocess.DEVNULL).stdout
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in found.groups() if x is not None) if found else (0,)


def mbsyncrc(*, port: int, tls: str, certificate_file: Path, local: Path, version: tuple[int, ...]) -> str:
    """docs/imap.md's mbsync configuration, for this test's server and local Maildir.

    isync 1.5 renamed `SSLType` to `TLSType` (the old name still works there, with a
    warning); 1.4 (Debian 12) knows only `SSLType`."""
    tls_key = "TLSType" if version >= (1, 5) else "SSLType"
    return (
        "IMAPAccount mx\n"
        "Host 127.0.0.1\n"
        f"Port {port}\n"
        f"User {ALICE}\n"
        f"Pass {ALICE_PW}\n"
        f"{tls_key} {tls}\n"
        f"CertificateFile {certificate_file}\n"
        "\n"
        "IMAPStore mx-remote\n"
        "Account mx\n"
        "\n"
        "MaildirStore mx-local\n"
        f"Path {local}/\n"
        f"Inbox {local}/INBOX\n"
        "SubFolders Verbatim\n"
        "\n"
        "Channel mx\n"
        "Far :mx-remote:\n"
        "Near :mx-local:\n"
        "Patterns *\n"
        "Sync All\n"
        "Create Both\n"
        "Expunge Both\n"
        "SyncState *\n"
    )


class LocalMessage:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw = path.read_bytes()
        _, _, info = path.name.partition(":2,")
        self.flags = "".join(sorted(c for c in info if c in "DFRST"))


def local_folders(root: Path) -> dict[str, dict[bytes, LocalMessage]]:
    """{mailbox name: {Message-ID: message}} of the Verbatim Maildir tree mbsync keeps."""
    out: dict[str, dict[bytes, LocalMessage]] = {}
    for cur in sorted(root.rglob("cur")):
        folder = cur.parent
        if not (folder / "new").is_dir():
            continue
        name = "/".join(folder.relative_to(root).parts)
        msgs: dict[bytes, LocalMessage] = {}
        for sub in ("cur", "new"):
            for path in sorted((folder / sub).iterdir()):
                if path.name.startswith("."):
                    continue
                m = LocalMessage(path)
                msgs[message_id(m.raw)] = m
        out[name] = msgs
    return out


class ServerMessage:
    def __init__(self, uid: int, flags: set[str], raw: bytes) -> None:
        self.uid, self.flags, self.raw = uid, flags, raw


def server_folders(c: imaplib.IMAP4) -> dict[str, dict[bytes, ServerMessage]]:
    """{mailbox name ("/" as separator, as mbsync names them): {Message-ID: message}}."""
    out: dict[str, dict[bytes, ServerMessage]] = {}
    for line in ok(c.list()):
        found = re.match(rb'\((?P<attrs>[^)]*)\) "(?P<sep>[^"]*)" "?(?P<name>[^"]*)"?$', line)
        assert found, line
        if b"\\noselect" in found["attrs"].lower() or b"\\nonexistent" in found["attrs"].lower():
            continue
        wire = found["name"].decode()
        out[wire.replace(found["sep"].decode(), "/")] = server_messages(c, wire)
    return out


def server_messages(c: imaplib.IMAP4, folder: str) -> dict[bytes, ServerMessage]:
    ok(c.select(f'"{folder}"', readonly=True))
    msgs: dict[bytes, ServerMessage] = {}
    uids = ok(c.uid("SEARCH", None, "ALL"))[0].split()
    for uid in uids:
        data = ok(c.uid("FETCH", uid, "(FLAGS)"))
        flags = set(re.search(rb"FLAGS \(([^)]*)\)", data[0]).group(1).decode().split())
        data = ok(c.uid("FETCH", uid, "(BODY.PEEK[])"))
        raw = next(part[1] for part in data if isinstance(part, tuple))
        msgs[message_id(raw)] = ServerMessage(int(uid), flags - {"\\Recent"}, raw)
    ok(c.close())
    return msgs


class MbsyncTests(IMAPCase):
    """docs/imap.md's mbsync configuration syncs a mailbox both ways, message by message."""

    timeout = 300
    mbsync_options = ["-V", "-Dn"]  # verbose, with the IMAP conversation (shown when a run fails)

    def setUp(self) -> None:
        if shutil.which("mbsync") is None:
            raise SkipTest("mbsync is not installed (Debian package isync; .ci/run installs it)")
        self.version = mbsync_version()

    def run_mbsync(self, rc: Path, home: Path) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["HOME"] = str(home)
        argv = ["mbsync", *self.mbsync_options, "-c", str(rc), "-a"]
        try:
            return subprocess.run(argv, cwd=home, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=MBSYNC_TIMEOUT)
        except subprocess.TimeoutExpired as e:  # killed; keep what it said for the failure message
            said = [x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)]
            return subprocess.CompletedProcess(argv, -9, said[0], said[1] + f"\n(killed after {MBSYNC_TIMEOUT} s)")

    async def mbsync(self, rc: Path, home: Path) -> str:
        done = await deferToThread(self.run_mbsync, rc, home)
        out = done.stdout + done.stderr
        why = f"mbsync was still running after {MBSYNC_TIMEOUT} s" if done.returncode == -9 else "mbsync failed"
        self.assertEqual(done.returncode, 0, f"{why}; the end of its output:\n{out[-20000:]}")
        return out

    async def server_view(self) -> dict[str, dict[bytes, ServerMessage]]:
        def read() -> dict[str, dict[bytes, ServerMessage]]:
            c = self.imaps()
            try:
                return server_folders(c)
            finally:
                c.logout()

        return await self.thread(read)

    async def assert_in_sync(self, local: Path) -> tuple[dict[str, dict[bytes, LocalMessage]],
                                                          dict[str, dict[bytes, ServerMessage]]]:
        near, far = local_folders(local), await self.server_view()
        self.assertEqual(sorted(near), sorted(far))
        for name in far:
            self.assertEqual(sorted(near[name]), sorted(far[name]), name)
            for mid, theirs in far[name].items():
                mine = near[name][mid]
                self.assertEqual(normalised(mine.raw), normalised(theirs.raw), (name, mid))
                self.assertEqual(mine.flags, letters(theirs.flags), (name, mid, mine.path.name, theirs.flags))
        return near, far

    async def sync_both_ways(self, port_name: str, tls: str) -> None:
        await self.start(plaintext=[])  # passwords only after TLS: STARTTLS must really happen
        await self.deliver(message("sync one", "first body\r\n.\r\nline after a dot\r\n"),
                           message("sync two"), message("sync three"), message("sync four"))

        def seed() -> None:  # a message in another folder, flagged, with a date of its own
            c = self.imaps()
            ok(c.append("Archive", "(\\Seen \\Flagged)", imaplib.Time2Internaldate(1700000000),
                        message("archived", "old news\r\n")))
            c.logout()

        await self.thread(seed)
        home = self.folder / "home"
        local = home / "Mail"
        local.mkdir(parents=True)
        rc = home / "mbsyncrc"
        # isync 1.4 matches the host name only against DNS names (not the certificate's
        # 127.0.0.1 address), so the server's certificate itself is listed: mbsync then trusts
        # exactly that certificate, as docs/imap.md has it for the self-signed one.
        rc.write_text(mbsyncrc(port=self.ports[port_name], tls=tls, certificate_file=self.folder / "cert.pem",
                               local=local, version=self.version))
        rc.chmod(0o600)

        # 1. First sync: everything comes down, folders are created locally.
        out = await self.mbsync(rc, home)
        if tls == "STARTTLS":  # and LOGIN before it would have been refused (LOGINDISABLED)
            self.assertRegex(out, r">>> \d+ STARTTLS")
        near, far = await self.assert_in_sync(local)
        self.assertEqual(len(far["INBOX"]), 4)
        self.assertEqual(set(far), {"INBOX", "Sent", "Drafts", "Trash", "Junk", "Archive"})
        self.assertEqual(near["Archive"][b"<archived@remote.test>"].flags, "FS")
        self.assertIn(b"\n.\nline after a dot\n", near["INBOX"][b"<sync.one@remote.test>"].raw)

        # 2. Local changes go up: a flag (rename), a new message (APPEND), a deletion.
        seen = near["INBOX"][b"<sync.two@remote.test>"].path
        base = seen.name.split(":2,")[0]
        seen.rename(seen.parent.parent / "cur" / f"{base}:2,S")
        near["INBOX"][b"<sync.three@remote.test>"].path.unlink()
        new_message = (b"From: Alice <alice@example.test>\nTo: <bob@example.test>\nSubject: written locally\n"
                       b"Date: Wed, 02 Dec 2026 09:00:00 +0000\nMessage-ID: <local.one@example.test>\n\n"
                       b"composed offline\nsecond line\n")
        (local / "INBOX" / "new" / "1800000000.M1P1.laptop").write_bytes(new_message)
        await self.mbsync(rc, home)
        near, far = await self.assert_in_sync(local)
        inbox = far["INBOX"]
        self.assertEqual(inbox[b"<sync.two@remote.test>"].flags, {"\\Seen"})
        self.assertNotIn(b"<sync.three@remote.test>", inbox)
        self.assertEqual(normalised(inbox[b"<local.one@example.test>"].raw), normalised(new_message))
        self.assertIn(b"\r\n", inbox[b"<local.one@example.test>"].raw)  # sent as CRLF, stored so
        self.assertEqual(len(inbox), 4)
        # The flag is in the server's Maildir file name (INTERFACE.md), the deletion is a real one.
        names = [p.name for sub in ("cur", "new") for p in (maildir(self.config, "alice") / sub).iterdir()]
        self.assertEqual(len(names), 4, names)
        self.assertEqual(sum(1 for n in names if n.endswith(":2,S")), 1, names)

        # 3. Server changes come down: a flag set by another client, a message moved away.
        def change() -> None:
            c = self.imaps()
            ok(c.select("INBOX"))
            ok(c.uid("STORE", str(inbox[b"<sync.four@remote.test>"].uid), "+FLAGS", "(\\Flagged)"))
            ok(c.uid("MOVE", str(inbox[b"<sync.one@remote.test>"].uid), "Archive"))
            c.logout()

        await self.thread(change)
        await self.mbsync(rc, home)
        near, far = await self.assert_in_sync(local)
        self.assertEqual(near["INBOX"][b"<sync.four@remote.test>"].flags, "F")
        self.assertNotIn(b"<sync.one@remote.test>", near["INBOX"])
        self.assertEqual(sorted(near["Archive"]), [b"<archived@remote.test>", b"<sync.one@remote.test>"])
        self.assertIn(b"\n.\nline after a dot\n", near["Archive"][b"<sync.one@remote.test>"].raw)

        # 4. Nothing changed: a fourth run changes nothing on either side.
        before = {name: {mid: (m.path.name, m.raw) for mid, m in msgs.items()} for name, msgs in near.items()}
        await self.mbsync(rc, home)
        near, _ = await self.assert_in_sync(local)
        self.assertEqual({name: {mid: (m.path.name, m.raw) for mid, m in msgs.items()} for name, msgs in near.items()},
                         before)

    async def test_mbsync_over_starttls(self) -> None:
        await self.sync_both_ways("imap", "STARTTLS")

    async def test_mbsync_over_imaps(self) -> None:
        await self.sync_both_ways("imaps", "IMAPS")


# -- what clients wait for ----------------------------------------------------------------


class LogoutCloseTests(IMAPCase):
    """After `OK LOGOUT` the server closes the connection (RFC 3501 §6.1.3), over TLS too.

    mbsync waits for that end of stream before it exits; a server that keeps a TLS
    connection open after LOGOUT hangs it (and keeps the connection slot)."""

    def read_to_end(self, sock: Any) -> bytes:
        sock.settimeout(5.0)  # bounded: a server that never closes fails here, not in trial's timeout
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"connection still open 5 s after LOGOUT; got {data!r}") from None
            if not chunk:
                return data
            data += chunk

    async def test_imaps_logout_closes(self) -> None:
        await self.start()

        def run() -> None:
            raw = socket.create_connection(("127.0.0.1", self.ports["imaps"]), timeout=SOCKET_TIMEOUT)
            tls = self.ctx().wrap_socket(raw, server_hostname="127.0.0.1")
            self.addCleanup(tls.close)
            tls.sendall(f"a LOGIN {ALICE} {ALICE_PW}\r\nb LOGOUT\r\n".encode())
            said = self.read_to_end(tls)
            self.assertIn(b"b OK", said)

        await self.thread(run)

    async def test_starttls_logout_closes(self) -> None:
        await self.start(plaintext=[])

        def run() -> None:
            r = self.raw()
            self.assertTrue(r.command(b"a STARTTLS\r\n")[-1].startswith(b"a OK"))
            tls = self.ctx().wrap_socket(r.sock, server_hostname="127.0.0.1")
            self.addCleanup(tls.close)
            tls.sendall(f"b LOGIN {ALICE} {ALICE_PW}\r\nc LOGOUT\r\n".encode())
            said = self.read_to_end(tls)
            self.assertIn(b"c OK", said)

        await self.thread(run)

    async def test_plain_logout_closes(self) -> None:
        await self.start()

        def run() -> None:
            r = self.raw()
            r.send(f"a LOGIN {ALICE} {ALICE_PW}\r\nb LOGOUT\r\n".encode())
            self.assertIn(b"b OK", self.read_to_end(r.sock))

        await self.thread(run)


# -- imapclient ---------------------------------------------------------------------------


class IMAPClientTests(IMAPCase):
    """The `imapclient` library drives every major command and parses every answer."""

    timeout = 180

    def setUp(self) -> None:
        try:
            import imapclient  # noqa: F401
        except ImportError:
            raise SkipTest("imapclient is not installed (pip install imapclient)") from None

    def client(self, *, tls: str = "imaps") -> Any:
        from imapclient import IMAPClient

        if tls == "imaps":
            c = IMAPClient("127.0.0.1", self.ports["imaps"], ssl=True, ssl_context=self.ctx(), timeout=SOCKET_TIMEOUT)
        else:
            c = IMAPClient("127.0.0.1", self.ports["imap"], ssl=False, timeout=SOCKET_TIMEOUT)
            c.starttls(self.ctx())
        self.addCleanup(_quietly_shutdown, c)
        return c

    async def test_every_major_command(self) -> None:
        from imapclient import DELETED, FLAGGED, RECENT, SEEN
        from imapclient.response_types import BodyData, Envelope

        await self.start(plaintext=[])
        await self.deliver(
            message("plain one", "the quick brown fox\r\n"),
            message("plain two", "jumps over the lazy dog\r\n"),
            (b"From: Carol <carol@remote.test>\r\nTo: Alice <alice@example.test>, bob@example.test\r\n"
             b"Cc: \"Dave, Jr.\" <dave@remote.test>\r\nSubject: =?utf-8?q?caf=C3=A9?= report\r\n"
             b"Date: Thu, 03 Dec 2026 11:00:00 +0100\r\nMessage-ID: <multi@remote.test>\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
             b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
             b"caf\xc3\xa9 numbers attached\r\n"
             b"--b1\r\nContent-Type: application/pdf; name=\"r.pdf\"\r\nContent-Disposition: attachment; "
             b"filename=\"r.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQK\r\n--b1--\r\n"),
        )

        def run() -> None:
            c = self.client(tls="starttls")
            self.assertNotIn(b"STARTTLS", c.capabilities())  # asked again after TLS: not offered twice
            c.login(ALICE, ALICE_PW)
            caps = c.capabilities()
            for cap in (b"IMAP4REV1", b"IDLE", b"UIDPLUS", b"MOVE", b"NAMESPACE", b"SPECIAL-USE", b"ID"):
                self.assertIn(cap, caps)

            # LIST with special-use attributes; the folders exist from the first login.
            folders = {name: set(flags) for flags, _, name in c.list_folders()}
            self.assertIn("INBOX", folders)
            for name, use in (("Sent", b"\\Sent"), ("Drafts", b"\\Drafts"), ("Trash", b"\\Trash"),
                              ("Junk", b"\\Junk"), ("Archive", b"\\Archive")):
                self.assertIn(use, folders[name], folders)
            self.assertEqual(c.find_special_folder(b"\\Sent"), "Sent")
            self.assertEqual(c.list_folders(pattern="Arch%")[0][1], b".")

            selected = c.select_folder("INBOX")
            self.assertEqual(selected[b"EXISTS"], 3)
            self.assertIn(b"UIDVALIDITY", selected)
            self.assertIn(SEEN, selected[b"FLAGS"])
            uids = c.search("ALL")
            self.assertEqual(len(uids), 3)
            one, two, multi = uids
            self.assertEqual(c.search(["UNSEEN"]), uids)
            self.assertEqual(c.search(["TEXT", "lazy"]), [two])
            self.assertEqual(c.search(["TEXT", "café"], charset="UTF-8"), [multi])
            self.assertEqual(c.search(["FROM", "carol", "SINCE", "1-Dec-2000"]), [multi])

            # FETCH: ENVELOPE and BODYSTRUCTURE come back parseable.
            got = c.fetch(uids, ["ENVELOPE", "BODYSTRUCTURE", "FLAGS", "RFC822.SIZE", "INTERNALDATE"])
            self.assertEqual(sorted(got), uids)
            env = got[multi][b"ENVELOPE"]
            self.assertIsInstance(env, Envelope)
            self.assertEqual(env.subject, b"=?utf-8?q?caf=C3=A9?= report")
            self.assertEqual(env.message_id, b"<multi@remote.test>")
            self.assertEqual(env.from_[0].mailbox, b"carol")
            self.assertEqual(env.from_[0].host, b"remote.test")
            self.assertEqual([a.mailbox for a in env.to], [b"alice", b"bob"])
            self.assertEqual(env.cc[0].name, b"Dave, Jr.")
            self.assertEqual(env.date.timetuple()[:3], (2026, 12, 3))
            body = got[multi][b"BODYSTRUCTURE"]
            self.assertIsInstance(body, BodyData)
            self.assertTrue(body.is_multipart)
            parts, subtype = body[0], body[1]
            self.assertEqual(subtype, b"mixed")
            self.assertEqual(parts[0][:2], (b"text", b"plain"))
            self.assertEqual(parts[1][:2], (b"application", b"pdf"))
            self.assertEqual(parts[1][5], b"base64")
            simple = got[one][b"BODYSTRUCTURE"]
            self.assertFalse(simple.is_multipart)
            self.assertEqual(simple[:2], (b"text", b"plain"))
            self.assertNotIn(SEEN, got[one][b"FLAGS"])
            self.assertGreater(got[one][b"RFC822.SIZE"], 0)
            text = c.fetch([multi], ["BODY.PEEK[1]", "BODY.PEEK[HEADER.FIELDS (SUBJECT)]"])[multi]
            self.assertEqual(text[b"BODY[1]"], "café numbers attached".encode())  # the CRLF is the boundary's
            self.assertIn(b"Subject: =?utf-8?q?caf=C3=A9?= report", text[b"BODY[HEADER.FIELDS (SUBJECT)]"])

            # Flags.
            c.add_flags([one], [SEEN, FLAGGED, b"$Work"])
            self.assertEqual(set(c.get_flags([one])[one]), {RECENT, SEEN, FLAGGED, b"$Work"})  # recent: this session's
            c.remove_flags([one], [FLAGGED])
            self.assertEqual(set(c.get_flags([one])[one]), {RECENT, SEEN, b"$Work"})
            self.assertEqual(c.search(["UNSEEN"]), [two, multi])
            self.assertEqual(c.search(["KEYWORD", "$Work"]), [one])

            # COPY, MOVE (UIDPLUS answers), APPEND with flags and a time, EXPUNGE.
            c.copy([one], "Archive")
            c.move([two], "Trash")
            self.assertEqual(c.search("ALL"), [one, multi])
            when = time.localtime(1700000000)
            from datetime import datetime
            appended = c.append("Drafts", message("draft", "not yet\r\n"), flags=[b"\\Draft", SEEN],
                                msg_time=datetime(*when[:6]))
            self.assertRegex(appended, rb"\[APPENDUID \d+ 1\]")
            self.assertEqual(c.folder_status("Archive", [b"MESSAGES"])[b"MESSAGES"], 1)
            self.assertEqual(c.folder_status("Trash", [b"MESSAGES"])[b"MESSAGES"], 1)
            c.delete_messages([one])
            self.assertIn(DELETED, c.get_flags([one])[one])
            c.expunge()
            self.assertEqual(c.search("ALL"), [multi])
            c.unselect_folder()

            c.select_folder("Drafts", readonly=True)
            draft_uid = c.search("ALL")
            draft = c.fetch(draft_uid, ["FLAGS", "INTERNALDATE", "BODY.PEEK[]"])[draft_uid[0]]
            self.assertEqual(set(draft[b"FLAGS"]), {b"\\Draft", SEEN})
            self.assertEqual(draft[b"INTERNALDATE"].timetuple()[:6], when[:6])
            self.assertEqual(draft[b"BODY[]"], message("draft", "not yet\r\n"))
            c.close_folder()

            # Folder management and STATUS.
            c.create_folder("Projects")
            c.create_folder("Projects.mx")
            self.assertTrue(c.folder_exists("Projects.mx"))
            c.rename_folder("Projects", "Work")
            self.assertTrue(c.folder_exists("Work.mx"))
            self.assertFalse(c.folder_exists("Projects.mx"))
            c.delete_folder("Work.mx")
            self.assertFalse(c.folder_exists("Work.mx"))
            c.create_folder("Été")
            self.assertIn("Été", [name for _, _, name in c.list_folders()])
            status = c.folder_status("INBOX", [b"MESSAGES", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN", b"RECENT"])
            self.assertEqual(status[b"MESSAGES"], 1)
            self.assertEqual(status[b"UNSEEN"], 1)
            self.assertGreater(status[b"UIDNEXT"], multi)
            self.assertEqual(status[b"UIDVALIDITY"], selected[b"UIDVALIDITY"])

            # NAMESPACE and ID.
            ns = c.namespace()
            self.assertIn(ns.personal[0][1], (".", b"."))
            self.assertIsNone(ns.other)
            self.assertIsNone(ns.shared)
            server_id = c.id_({"name": "imapclient-test", "version": "1"})
            self.assertIsNotNone(server_id)
            self.assertIsInstance(c.noop()[0], bytes)
            self.assertIsInstance(c.logout(), bytes)  # the BYE text

        await self.thread(run)
        cur = maildir(self.config, "alice") / ".Drafts" / "cur"
        names = [p.name for p in cur.iterdir()]
        self.assertEqual(len(names), 1)
        self.assertTrue(names[0].endswith(":2,DS"), names)

    async def test_idle_over_imaps_sees_smtp_delivery_at_once(self) -> None:
        await self.start()
        await self.deliver(message("before idle"))
        c = await self.thread(self.client)  # connecting blocks: not in the reactor's thread
        await self.thread(c.login, ALICE, ALICE_PW)
        selected = await self.thread(c.select_folder, "INBOX")
        self.assertEqual(selected[b"EXISTS"], 1)
        await self.thread(c.idle)
        self.assertEqual(await self.thread(c.idle_check, 0.2), [])  # nothing to say yet

        def wait_for_exists() -> tuple[list[Any], float]:
            got: list[Any] = []
            end = time.monotonic() + 10.0  # bounded; the assertion below wants far less
            while time.monotonic() < end and (2, b"EXISTS") not in got:
                got += c.idle_check(timeout=max(0.0, end - time.monotonic()))
            return got, time.monotonic()

        watcher = deferToThread(wait_for_exists)
        delivered_at: list[float] = []

        def send() -> None:
            s = smtp_client(self.ports["smtp"])
            try:
                s.sendmail("someone@remote.test", [ALICE], message("during idle"))
                delivered_at.append(time.monotonic())  # the 250 after DATA: the message is on disk
            finally:
                s.quit()

        await self.thread(send)
        got, seen_at = await watcher
        self.assertIn((2, b"EXISTS"), got)
        self.assertLess(seen_at - delivered_at[0], IDLE_DEADLINE, got)
        text, responses = await self.thread(c.idle_done)
        self.assertIsInstance(text, bytes)
        fetched = await self.thread(c.fetch, "2", ["ENVELOPE"])
        (uid, data), = fetched.items()
        self.assertEqual(data[b"ENVELOPE"].subject, b"during idle")
        await self.thread(c.logout)


def _quietly_shutdown(c: Any) -> None:
    try:
        c.shutdown()
    except Exception:
        pass

