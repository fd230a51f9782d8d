"""IMAP and IMAPS end to end: `imaplib` (and a raw socket client) against the whole server.

The server runs in-process (`mx.tap.build`) with smtp, imap and imaps on ephemeral loopback
ports and a certificate from a throwaway `trustme` CA. Mail arrives the real way, through
smtplib to the smtp port. Blocking clients run in threads so the reactor keeps serving.
"""

from __future__ import annotations

import imaplib
import os
import re
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trustme
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mx.listeners import Service
from tests.support import (
    HOSTNAME,
    SOCKET_TIMEOUT,
    _toml,
    add_users,
    make_config,
    maildir,
    service_ports,
    smtp_client,
    start_mail_service,
    tls_section,
    write_ca_file,
)

T = TypeVar("T")
ALICE, ALICE_PW = "alice@example.test", "alice-imap-Secret-1"
BOB, BOB_PW = "bob@example.test", "bob-imap-pw"
LISTEN = {
    "smtp": "tcp:0:interface=127.0.0.1",
    "imap": "tcp:0:interface=127.0.0.1",
    "imaps": "tcp:0:interface=127.0.0.1",
}
WAIT = 20.0
_ca = trustme.CA()


def message(subject: str, body: str = "hello\r\n", to: str = ALICE) -> bytes:
    return (f"From: Someone <someone@remote.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Tue, 01 Dec 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n{body}").encode()


def ok(result: tuple[str, Any]) -> Any:
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


class IMAPCase(TestCase):
    timeout = 120

    async def start(self, *, plaintext: list[str] | None = None, limits: dict[str, Any] | None = None) -> dict[str, int]:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        self.folder = folder
        leaf = _ca.issue_cert(HOSTNAME, "127.0.0.1", common_name=HOSTNAME)
        cert, key = folder / "cert.pem", folder / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        self.cafile = write_ca_file(folder, _ca)
        extra = tls_section(cert, key)
        if plaintext is not None:
            extra += f"\n[auth]\nplaintext_without_tls = {_toml(plaintext)}\n"
        self.config = make_config(self, listen=LISTEN, extra=extra, folder=folder, limits=limits)
        add_users(self.config, {ALICE: ALICE_PW, BOB: BOB_PW})
        self.clock = Clock()
        self.clock.advance(time.time())
        self.mail = await start_mail_service(self, self.config, clock=self.clock)
        self.ports = service_ports(self.mail)
        return self.ports

    async def restart(self) -> None:
        await self.mail.stopService()
        self.mail = await start_mail_service(self, self.config, clock=self.clock)
        self.ports = service_ports(self.mail)

    def ctx(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await deferToThread(fn, *args)

    async def deliver(self, *messages: bytes, rcpt: str = ALICE) -> None:
        def send() -> None:
            s = smtp_client(self.ports["smtp"])
            try:
                for m in messages:
                    s.sendmail("someone@remote.test", [rcpt], m)
            finally:
                s.quit()

        await self.thread(send)

    def imap(self, user: str | None = ALICE, password: str = ALICE_PW) -> imaplib.IMAP4:
        c = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=SOCKET_TIMEOUT)
        self.addCleanup(_quietly_close, c)
        if user is not None:
            ok(c.login(user, password))
        return c

    def imaps(self, user: str | None = ALICE, password: str = ALICE_PW) -> imaplib.IMAP4_SSL:
        c = imaplib.IMAP4_SSL("127.0.0.1", self.ports["imaps"], ssl_context=self._sni_ctx(), timeout=SOCKET_TIMEOUT)
        self.addCleanup(_quietly_close, c)
        if user is not None:
            ok(c.login(user, password))
        return c

    def _sni_ctx(self) -> ssl.SSLContext:
        ctx = self.ctx()
        ctx.check_hostname = False  # connected by address; the chain is still verified
        return ctx

    def raw(self) -> RawIMAP:
        r = RawIMAP(self.ports["imap"])
        self.addCleanup(r.close)
        return r


def _quietly_close(c: imaplib.IMAP4) -> None:
    try:
        c.shutdown()
    except Exception:
        pass


class RawIMAP:
    """A byte-level client: send exactly these bytes, read lines back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        self.buf = b""
        self.eof = False
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                rest, self.buf = self.buf, b""
                self.eof = True
                return rest
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def until_tagged(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            line = self.line()
            out.append(line)
            if line.startswith(tag + b" ") or (self.eof and not self.buf):
                return out

    def command(self, data: bytes) -> list[bytes]:
        tag = data.split(b" ", 1)[0]
        self.send(data)
        return self.until_tagged(tag)

    def closed(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (TimeoutError, OSError):
            return False

    def close(self) -> None:
        self.sock.close()


# -- tests --------------------------------------------------------------------------------


class GreetingAndLoginTests(IMAPCase):
    async def test_capabilities_login_and_logout(self) -> None:
        await self.start(plaintext=[])

        def run() -> None:
            c = self.imap(user=None)
            caps = c.capabilities
            for cap in ("IMAP4REV1", "STARTTLS", "LOGINDISABLED", "IDLE", "UIDPLUS", "MOVE", "LITERAL+",
                        "NAMESPACE", "SPECIAL-USE", "ENABLE", "ID", "UNSELECT", "CHILDREN", "SASL-IR"):
                self.assertIn(cap, caps)
            self.assertNotIn("AUTH=PLAIN", caps)
            with self.assertRaises(imaplib.IMAP4.error):
                c.login(ALICE, ALICE_PW)  # refused before TLS
            ok(c.starttls(ssl_context=self._sni_ctx()))
            ok(c.capability())
            self.assertNotIn("LOGINDISABLED", c.capabilities)
            self.assertIn("AUTH=PLAIN", c.capabilities)
            ok(c.login(ALICE, ALICE_PW))
            self.assertEqual(c.logout()[0], "BYE")

        await self.thread(run)

    async def test_wrong_password_and_unknown_user(self) -> None:
        await self.start()

        def run() -> None:
            c = self.imap(user=None)
            with self.assertRaisesRegex(imaplib.IMAP4.error, "AUTHENTICATIONFAILED"):
                c.login(ALICE, "wrong")
            with self.assertRaisesRegex(imaplib.IMAP4.error, "AUTHENTICATIONFAILED"):
                c.login("nobody@example.test", "x")
            ok(c.login(ALICE, ALICE_PW))

        await self.thread(run)

    async def test_authenticate_plain_with_sasl_ir_and_continuation(self) -> None:
        await self.start()

        def run() -> None:
            r = self.raw()
            import base64
            token = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode())
            lines = r.command(b"a1 AUTHENTICATE PLAIN " + token + b"\r\n")
            self.assertTrue(lines[-1].startswith(b"a1 OK"), lines)
            r2 = self.raw()
            r2.send(b"b1 AUTHENTICATE PLAIN\r\n")
            self.assertEqual(r2.line(), b"+ ")
            r2.send(token + b"\r\n")
            self.assertTrue(r2.until_tagged(b"b1")[-1].startswith(b"b1 OK"))
            r3 = self.raw()
            r3.send(b"c1 AUTHENTICATE PLAIN\r\n")
            r3.line()
            r3.send(b"*\r\n")
            self.assertTrue(r3.until_tagged(b"c1")[-1].startswith(b"c1 BAD"))

        await self.thread(run)

    async def test_imaps(self) -> None:
        await self.start()
        await self.deliver(message("over tls"))

        def run() -> None:
            c = self.imaps()
            self.assertNotIn("STARTTLS", c.capabilities)
            data = ok(c.select("INBOX"))
            self.assertEqual(data, [b"1"])
            c.logout()

        await self.thread(run)

    async def test_starttls_injection_is_discarded(self) -> None:
        await self.start(plaintext=[])

        def run() -> None:
            r = self.raw()
            r.send(b"a STARTTLS\r\nb LOGIN alice@example.test alice-imap-Secret-1\r\n")
            self.assertTrue(r.line().startswith(b"a OK"))
            tls = self._sni_ctx().wrap_socket(r.sock, server_hostname=HOSTNAME)
            tls.sendall(b"c NOOP\r\n")
            data = b""
            while b"\r\n" not in data:
                data += tls.recv(4096)
            self.assertTrue(data.startswith(b"c OK"), data)  # no reply to b: it was never read
            tls.close()

        await self.thread(run)


class MailboxTests(IMAPCase):
    async def test_select_fetch_store_expunge(self) -> None:
        await self.start()
        await self.deliver(message("one"), message("two"), message("three"))

        def run() -> None:
            c = self.imap()
            self.assertEqual(ok(c.select("INBOX")), [b"3"])
            self.assertEqual(c.untagged_responses.get("RECENT"), [b"3"])
            data = ok(c.fetch("1:*", "(UID FLAGS RFC822.SIZE)"))
            self.assertEqual(len(data), 3)
            self.assertIn(b"UID 1 ", data[0])
            data = ok(c.uid("FETCH", "2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
            self.assertIn(b"Subject: two", data[0][1])
            ok(c.store("1", "+FLAGS", "(\\Deleted $Label1)"))
            data = ok(c.fetch("1", "(FLAGS)"))
            self.assertIn(b"\\Deleted", data[0])
            self.assertIn(b"$Label1", data[0])
            data = ok(c.expunge())
            self.assertEqual(data, [b"1"])
            self.assertEqual(ok(c.search(None, "ALL")), [b"1 2"])
            data = ok(c.fetch("1", "(BODY[])"))
            self.assertIn(b"Subject: two", data[0][1])
            data = ok(c.fetch("1", "(FLAGS)"))
            self.assertIn(b"\\Seen", data[0])
            c.logout()

        await self.thread(run)
        names = sorted(p.name for p in (maildir(self.config, "alice") / "cur").iterdir())
        self.assertEqual(len(names), 2)
        self.assertTrue(any(n.endswith(":2,S") for n in names), names)

    async def test_list_create_rename_delete_special_use(self) -> None:
        await self.start()

        def run() -> None:
            c = self.imap()
            names = ok(c.list())
            text = b"\n".join(names)
            for folder, use in (("Sent", "\\Sent"), ("Drafts", "\\Drafts"), ("Trash", "\\Trash"),
                                ("Junk", "\\Junk"), ("Archive", "\\Archive")):
                self.assertRegex(text, re.escape(use.encode()) + rb'.*"\." ' + folder.encode())
            ok(c.create("Projects.mx"))
            text = b"\n".join(ok(c.list()))
            self.assertIn(b'(\\Noselect \\HasChildren) "." Projects', text)  # a parent only
            ok(c.create("Projects"))
            ok(c.create("&AMk-t&AOk-"))  # "Été" in modified UTF-7
            text = b"\n".join(ok(c.list()))
            self.assertIn(b'"." Projects', text)
            self.assertIn(b"Projects.mx", text)
            ok(c.rename("Projects", "Work"))
            text = b"\n".join(ok(c.list()))
            self.assertIn(b"Work.mx", text)
            ok(c.delete("Work.mx"))
            self.assertNotIn(b"Work.mx", b"\n".join(ok(c.list())))
            c.logout()

        await self.thread(run)
        root = maildir(self.config, "alice")
        self.assertTrue((root / ".Sent" / "cur").is_dir())
        self.assertTrue((root / ".&AMk-t&AOk-").is_dir())

    async def test_append_copy_move(self) -> None:
        await self.start()
        await self.deliver(message("first"), message("second"))

        def run() -> None:
            c = self.imap()
            typ, data = c.append("Sent", "(\\Seen)", imaplib.Time2Internaldate(1700000000), message("sent one"))
            self.assertEqual(typ, "OK")
            self.assertRegex(data[0], rb"\[APPENDUID \d+ 1\]")
            ok(c.select("INBOX"))
            typ, data = c.copy("1", "Archive")
            self.assertEqual(typ, "OK")
            self.assertRegex(data[0], rb"\[COPYUID \d+ 1 1\]")
            typ, data = c.uid("MOVE", "2", "Trash")
            self.assertEqual(typ, "OK")
            self.assertIn(b"COPYUID", b" ".join(x for x in c.untagged_responses.get("OK", []) if x))
            self.assertEqual(ok(c.search(None, "ALL")), [b"1"])
            ok(c.select("Sent"))
            data = ok(c.fetch("1", "(FLAGS INTERNALDATE)"))
            self.assertIn(b"\\Seen", data[0])
            self.assertEqual(imaplib.Internaldate2tuple(data[0])[:6], time.localtime(1700000000)[:6])
            c.logout()

        await self.thread(run)

    async def test_uids_stable_across_restart(self) -> None:
        await self.start()
        await self.deliver(message("a"), message("b"))

        def uids() -> tuple[bytes, list[bytes]]:
            c = self.imap()
            ok(c.select("INBOX"))
            validity = c.untagged_responses["UIDVALIDITY"][0]
            got = ok(c.uid("SEARCH", None, "ALL"))
            c.logout()
            return validity, got

        before = await self.thread(uids)
        await self.restart()
        after = await self.thread(uids)
        self.assertEqual(before, after)
        self.assertEqual(before[1], [b"1 2"])


class CacheAndRecentTests(IMAPCase):
    async def test_envelope_and_bodystructure_come_from_the_cache_under_data_dir(self) -> None:
        await self.start()
        await self.deliver(message("cached subject"))
        path = next((maildir(self.config, "alice") / "new").iterdir())

        def fetch_envelope() -> bytes:
            c = self.imap()
            ok(c.select("INBOX"))
            data = ok(c.fetch("1", "(ENVELOPE BODYSTRUCTURE)"))
            c.logout()
            return data[0] if isinstance(data[0], bytes) else data[0][0]

        first = await self.thread(fetch_envelope)
        self.assertIn(b"cached subject", first)
        cache = self.config.data_dir / "cache" / "example.test" / "alice" / "INBOX.imapcache"
        self.assertTrue(cache.exists())
        self.assertFalse(any("cache" in p.name for p in maildir(self.config, "alice").rglob("*")))
        # Rewrite the stored bytes in place: a warm FETCH answers from the cache, not the file.
        now = next((maildir(self.config, "alice") / "cur").iterdir())
        now.write_bytes(now.read_bytes().replace(b"cached subject", b"edited subject"))
        self.assertEqual(await self.thread(fetch_envelope), first)
        cache.unlink()  # lost: rebuilt from the file
        self.assertIn(b"edited subject", await self.thread(fetch_envelope))
        _ = path

    async def test_recent_belongs_to_the_first_session(self) -> None:
        await self.start()
        await self.deliver(message("new one"))

        def run() -> None:
            a = self.imap()
            ok(a.select("INBOX"))
            self.assertEqual(a.untagged_responses.get("RECENT"), [b"1"])
            self.assertEqual(ok(a.search(None, "RECENT")), [b"1"])
            b = self.imap()
            ok(b.select("INBOX"))
            self.assertEqual(b.untagged_responses.get("RECENT"), [b"0"])
            self.assertEqual(ok(b.search(None, "NEW")), [b""])
            e = self.imap()
            ok(e.select("INBOX", readonly=True))
            typ, data = e.store("1", "+FLAGS", "(\\Seen)")
            self.assertEqual(typ, "NO")
            for c in (a, b, e):
                c.logout()

        await self.thread(run)

    async def test_inbox_rename_moves_the_messages(self) -> None:
        await self.start()
        await self.deliver(message("old 1"), message("old 2"))

        def run() -> None:
            c = self.imap()
            ok(c.rename("INBOX", "Old-Inbox"))
            ok(c.select("INBOX"))
            self.assertEqual(c.untagged_responses["EXISTS"][-1], b"0")
            ok(c.select("Old-Inbox"))
            self.assertEqual(c.untagged_responses["EXISTS"][-1], b"2")
            c.logout()

        await self.thread(run)

    async def test_literal_plus_append_and_pipelined_commands(self) -> None:
        await self.start()

        def run() -> None:
            r = self.raw()
            body = message("literal plus")
            r.send(f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode()
                   + b"b APPEND Drafts (\\Draft) {%d+}\r\n" % len(body) + body + b"\r\n"
                   + b"c SELECT Drafts\r\nd FETCH 1 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
            lines = r.until_tagged(b"d")
            text = b"\n".join(lines)
            self.assertIn(b"a OK", text)
            self.assertRegex(text, rb"b OK \[APPENDUID \d+ 1\]")
            self.assertIn(b"c OK [READ-WRITE]", text)
            self.assertIn(b"\\Draft", text)
            self.assertIn(b"Subject: literal plus", text)
            self.assertTrue(lines[-1].startswith(b"d OK"))

        await self.thread(run)

    async def test_search_keys_over_the_wire(self) -> None:
        await self.start()
        await self.deliver(message("alpha report", "the quick brown fox\r\n"),
                           message("=?utf-8?q?caf=C3=A9?=", "nothing here\r\n"))

        def run() -> None:
            c = self.imap()
            ok(c.select("INBOX"))
            self.assertEqual(ok(c.search(None, "TEXT", "brown")), [b"1"])
            self.assertEqual(ok(c.search(None, "SUBJECT", "alpha")), [b"1"])
            self.assertEqual(ok(c.search("UTF-8", "SUBJECT", '"caf\xc3\xa9"'.encode("latin-1").decode("utf-8")
                                         .encode("utf-8"))), [b"2"])
            self.assertEqual(ok(c.search(None, "UNSEEN")), [b"1 2"])
            self.assertEqual(ok(c.uid("SEARCH", None, "OR", "BODY", "fox", "SUBJECT", "nothing")), [b"1"])
            typ, data = c.search("KOI8-R", "ALL")
            self.assertEqual(typ, "NO")
            self.assertIn(b"BADCHARSET", data[0])
            c.logout()

        await self.thread(run)


class MoreCommandsTests(IMAPCase):
    async def test_list_extended_status_lsub_and_the_small_commands(self) -> None:
        await self.start()
        await self.deliver(message("m1"), message("m2"), message("m3"))

        def run() -> None:
            r = self.raw()
            r.command(f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode())
            lines = r.command(b'b LIST "" "*" RETURN (SUBSCRIBED CHILDREN STATUS (MESSAGES UNSEEN UIDNEXT))\r\n')
            text = b"\n".join(lines)
            self.assertIn(b'* LIST (\\HasNoChildren) "." INBOX', text)
            self.assertIn(b"* STATUS INBOX (MESSAGES 3 UNSEEN 3 UIDNEXT 4)", text)
            self.assertRegex(text, rb'\* LIST \([^)]*\\Subscribed[^)]*\\Sent[^)]*\) "\." Sent')
            lines = r.command(b'c LIST (SPECIAL-USE) "" "*"\r\n')
            self.assertEqual(len([x for x in lines if x.startswith(b"* LIST")]), 5, lines)
            lines = r.command(b'd LSUB "" "*"\r\n')
            self.assertEqual(len([x for x in lines if x.startswith(b"* LSUB")]), 5, lines)
            self.assertTrue(r.command(b'e UNSUBSCRIBE Junk\r\n')[-1].startswith(b"e OK"))
            lines = r.command(b'f LIST (SUBSCRIBED) "" "%"\r\n')
            self.assertFalse(any(b"Junk" in x for x in lines), lines)
            self.assertEqual(r.command(b'g LIST "" ""\r\n')[0], b'* LIST (\\Noselect) "." ""')
            text = b"\n".join(r.command(b"h STATUS INBOX (MESSAGES RECENT UIDVALIDITY)\r\n"))
            self.assertRegex(text, rb"\* STATUS INBOX \(MESSAGES 3 RECENT 3 UIDVALIDITY \d+\)")
            self.assertIn(b'* NAMESPACE (("" ".")) NIL NIL', b"\n".join(r.command(b"i NAMESPACE\r\n")))
            self.assertIn(b'* ID ("name" "mx"', b"\n".join(r.command(b'j ID ("name" "test")\r\n')))
            self.assertIn(b"* ENABLED", b"\n".join(r.command(b"k ENABLE CONDSTORE\r\n")))
            text = b"\n".join(r.command(b"l EXAMINE INBOX\r\n"))
            self.assertIn(b"l OK [READ-ONLY]", text)
            self.assertIn(b"* 3 RECENT", text)  # read-only: messages still in new/ count as recent
            self.assertTrue(r.command(b"m SELECT INBOX\r\n")[-1].startswith(b"m OK [READ-WRITE]"))
            r.command(b"n STORE 1:3 +FLAGS.SILENT (\\Deleted)\r\n")
            lines = r.command(b"o UID EXPUNGE 2\r\n")
            self.assertEqual(lines, [b"* 2 EXPUNGE", b"o OK EXPUNGE completed"])
            self.assertTrue(r.command(b"p CHECK\r\n")[-1].startswith(b"p OK"))
            self.assertTrue(r.command(b"q UNSELECT\r\n")[-1].startswith(b"q OK"))  # no expunge
            text = b"\n".join(r.command(b"r SELECT INBOX\r\n"))
            self.assertIn(b"* 2 EXISTS", text)
            self.assertTrue(r.command(b"s CLOSE\r\n")[-1].startswith(b"s OK"))  # expunges silently
            text = b"\n".join(r.command(b"t STATUS INBOX (MESSAGES)\r\n"))
            self.assertIn(b"* STATUS INBOX (MESSAGES 0)", text)
            self.assertTrue(r.command(b"u FETCH 1 FLAGS\r\n")[-1].startswith(b"u BAD"))  # not selected
            self.assertTrue(r.command(b"v XYZZY\r\n")[-1].startswith(b"v BAD"))

        await self.thread(run)


class QuietFolderTests(IMAPCase):
    """While inotify reports the selected folder unchanged, a command makes no refresh trip;
    a change by another program is still seen at the very next command."""

    async def test_noop_refreshes_only_after_a_change(self) -> None:
        from mx.imap import tasks

        refreshes: list[int] = []
        real = tasks.refresh

        def counting(folder: Any) -> Any:
            refreshes.append(1)
            return real(folder)

        self.patch(tasks, "refresh", counting)
        await self.start()
        await self.deliver(message("one"))
        root = maildir(self.config, "alice")

        def run() -> tuple[list[int], list[Any], list[Any]]:
            c = self.imap()
            ok(c.select("INBOX"))
            counts = []
            for _ in range(4):
                ok(c.noop())
                counts.append(len(refreshes))
            # Another program delivers (tmp/ then new/), and the client asks at once.
            (root / "tmp" / "1.M1P1.other").write_bytes(b"Subject: two\r\n\r\nbody\r\n")
            os.rename(root / "tmp" / "1.M1P1.other", root / "new" / "1.M1P1.other")
            c.untagged_responses.clear()
            ok(c.noop())
            seen = c.untagged_responses.get("EXISTS", [])
            counts.append(len(refreshes))
            # ... and another renames a message (a flag set elsewhere).
            cur = next(p for p in (root / "cur").iterdir())
            os.rename(cur, cur.with_name(cur.name.split(":")[0] + ":2,F"))
            c.untagged_responses.clear()
            ok(c.noop())
            flagged = c.untagged_responses.get("FETCH", [])
            counts.append(len(refreshes))
            c.logout()
            return counts, seen, flagged

        counts, seen, flagged = await self.thread(run)
        self.assertEqual(counts[:4], [counts[0]] * 4, "no refresh while the folder is quiet")
        self.assertEqual(seen, [b"2"])
        self.assertGreater(counts[4], counts[3])
        self.assertTrue(any(b"\\Flagged" in x for x in flagged if x), flagged)

    async def test_flag_search_answered_without_a_trip_while_quiet(self) -> None:
        from mx.imap import tasks

        trips: list[str] = []
        real = tasks.run_search

        def counting(folder: Any, view: Any, query: Any) -> Any:
            trips.append("search")
            return real(folder, view, query)

        self.patch(tasks, "run_search", counting)
        await self.start()
        await self.deliver(*(message(f"m{i}") for i in range(4)))
        root = maildir(self.config, "alice")

        def run() -> tuple[list[Any], list[str], Any, list[str], Any, list[str]]:
            c = self.imap()
            ok(c.select("INBOX"))
            ok(c.store("2", "+FLAGS", "(\\Seen)"))
            ok(c.store("3", "+FLAGS", "(\\Flagged)"))
            ok(c.noop())  # our own STORE's changes are in the view
            quiet = [ok(c.search(None, "UNSEEN")), ok(c.search(None, "SEEN")),
                     ok(c.search(None, "OR", "FLAGGED", "SEEN")), ok(c.uid("SEARCH", "NOT", "UNSEEN"))]
            after_quiet = list(trips)
            # A header search still reads the files, in the disk thread.
            subject = ok(c.search(None, "SUBJECT", "m3"))
            after_subject = list(trips)
            # Another program flags message 1 or 4: the next command is no longer quiet, so its
            # trip refreshes (after the search, as ever: the change is reported with it), and
            # the SEARCH after that answers from the refreshed view, again without a trip.
            cur = sorted((root / "cur").iterdir())
            first = next(p for p in cur if ":2," in p.name and "F" not in p.name.split(":2,")[1]
                         and "S" not in p.name.split(":2,")[1])
            os.rename(first, first.with_name(first.name.split(":")[0] + ":2,F"))
            c.untagged_responses.clear()
            ok(c.search(None, "FLAGGED"))
            told = c.untagged_responses.get("FETCH", [])
            flagged = ok(c.search(None, "FLAGGED"))
            c.logout()
            return quiet, after_quiet, subject, after_subject, (told, flagged), list(trips)

        quiet, after_quiet, subject, after_subject, (told, flagged), trips_at_end = await self.thread(run)
        self.assertEqual(quiet, [[b"1 3 4"], [b"2"], [b"2 3"], [quiet[3][0]]])
        self.assertEqual(len(quiet[3][0].split()), 1)  # the UID of message 2
        self.assertEqual(after_quiet, [], "flag SEARCHes on a quiet folder make no trip")
        self.assertEqual(subject, [b"4"])
        self.assertEqual(after_subject, ["search"])
        self.assertTrue(any(b"\\Flagged" in x for x in told if x), told)
        self.assertEqual(len(flagged[0].split()), 2, flagged)  # 3, and the one flagged elsewhere
        self.assertIn(b"3", flagged[0].split())
        self.assertEqual(trips_at_end, ["search", "search"])


class BatchedFetchTests(IMAPCase):
    """A FETCH spans several read-pool trips, the next one read while the last is sent."""

    async def test_every_message_once_in_order_across_batches(self) -> None:
        from mx.imap import session

        self.patch(session, "FETCH_BATCH", 2)
        await self.start()
        await self.deliver(*(message(f"batch {i}", body=f"body {i}\r\n") for i in range(7)))

        def run() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], list[bytes]]:
            c = self.imap()
            ok(c.select("INBOX"))
            peeked = ok(c.fetch("1:*", "(UID BODY.PEEK[TEXT])"))
            unseen = ok(c.search(None, "UNSEEN"))
            sparse = ok(c.uid("FETCH", "7,1,3:4,6:*", "(BODY.PEEK[TEXT])"))
            sparse += ok(c.fetch("5:6", "(UID BODY.PEEK[TEXT])"))  # numbered from 5
            read = ok(c.fetch("2:6", "(BODY[TEXT])"))
            after = ok(c.search(None, "SEEN"))
            c.logout()
            return peeked, unseen, read, after, sparse

        peeked, unseen, read, after, sparse = await self.thread(run)
        self.assertEqual([part[1] for part in sparse if isinstance(part, tuple)],
                         [f"body {i}\r\n".encode() for i in (0, 2, 3, 5, 6, 4, 5)])
        self.assertEqual([part[0].split()[:3] for part in sparse if isinstance(part, tuple)][-2:],
                         [[b"5", b"(UID", b"5"], [b"6", b"(UID", b"6"]])
        bodies = [part[1] for part in peeked if isinstance(part, tuple)]
        self.assertEqual(bodies, [f"body {i}\r\n".encode() for i in range(7)])
        self.assertEqual(unseen, [b"1 2 3 4 5 6 7"])
        self.assertEqual([part[1] for part in read if isinstance(part, tuple)],
                         [f"body {i}\r\n".encode() for i in range(1, 6)])
        self.assertTrue(all(b"\\Seen" in part[0] for part in read if isinstance(part, tuple)))
        self.assertEqual(after, [b"2 3 4 5 6"])

    async def test_search_by_date_and_by_text(self) -> None:
        await self.start()
        await self.deliver(message("dated", body="quixotry\r\n"), message("other"))

        def run() -> tuple[list[bytes], list[bytes], list[bytes]]:
            c = self.imap()
            ok(c.select("INBOX"))
            text = ok(c.search(None, "TEXT", "quixotry"))
            since = ok(c.search(None, "SINCE", "1-Jan-2000", "TEXT", "quixotry"))
            before = ok(c.search(None, "BEFORE", "1-Jan-2000"))
            c.logout()
            return text, since, before

        text, since, before = await self.thread(run)
        self.assertEqual((text, since, before), ([b"1"], [b"1"], [b""]))


class IdleTests(IMAPCase):
    async def test_idle_sees_delivery_and_other_sessions_store_and_expunge(self) -> None:
        await self.start()
        await self.deliver(message("one"))
        r = await self.thread(self.raw)
        await self.thread(r.command, f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode())
        await self.thread(r.command, b"b SELECT INBOX\r\n")
        r.send(b"c IDLE\r\n")
        self.assertEqual(await self.thread(r.line), b"+ idling")
        start = time.monotonic()
        await self.deliver(message("two"))
        line = await self.thread(r.line)
        self.assertEqual(line, b"* 2 EXISTS")
        self.assertLess(time.monotonic() - start, 5.0)
        await self.thread(r.line)  # RECENT

        def other() -> None:
            c = self.imap()
            ok(c.select("INBOX"))
            ok(c.store("1", "+FLAGS", "(\\Flagged)"))
            ok(c.store("2", "+FLAGS", "(\\Deleted)"))
            ok(c.expunge())
            c.logout()

        await self.thread(other)
        seen: list[bytes] = []
        while b"* 2 EXPUNGE" not in seen:
            seen.append(await self.thread(r.line))
        self.assertTrue(any(b"FETCH" in x and b"\\Flagged" in x for x in seen), seen)
        r.send(b"DONE\r\n")
        self.assertTrue((await self.thread(r.until_tagged, b"c"))[-1].startswith(b"c OK"))


    async def test_idle_after_own_store_sees_a_change_hidden_in_the_same_tick(self) -> None:
        # After our own STORE the folder's stamp is trusted for two seconds; a change by
        # another program that leaves cur/'s mtime as it was (same clock tick) must still be
        # announced to an idling client once that window ends.
        await self.start()
        await self.deliver(message("one"), message("two"))
        r = await self.thread(self.raw)
        await self.thread(r.command, f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode())
        await self.thread(r.command, b"b SELECT INBOX\r\n")
        cur = self.config.data_dir / "mail" / "example.test" / "alice" / "cur"
        t = time.time() - 30
        os.utime(cur, (t, t))
        os.utime(cur.parent / "new", (t, t))
        await self.thread(r.command, b"c NOOP\r\n")  # calm now: the table is trusted
        await self.thread(r.command, b"d STORE 1 +FLAGS (\\Seen)\r\n")
        r.send(b"e IDLE\r\n")
        self.assertEqual(await self.thread(r.line), b"+ idling")
        (name,) = [n for n in os.listdir(cur) if not n.endswith("S")]
        st = os.stat(cur)
        os.rename(cur / name, cur / (name + "F"))  # another program flags message 2 ...
        os.utime(cur, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... in the same mtime tick
        start = time.monotonic()
        line = await self.thread(r.line)
        self.assertIn(b"FETCH", line)
        self.assertIn(b"\\Flagged", line)
        self.assertLess(time.monotonic() - start, 5.0)
        r.send(b"DONE\r\n")
        self.assertTrue((await self.thread(r.until_tagged, b"e"))[-1].startswith(b"e OK"))


class BadInputTests(IMAPCase):
    async def test_bad_input_never_crashes_and_others_are_served(self) -> None:
        await self.start(limits={"max_message_size": "1MiB"})
        await self.deliver(message("keep"))

        def run() -> None:
            r = self.raw()
            # Before login a literal is a name or a password: 100 KB of one is refused unread.
            self.assertTrue(r.command(b"z LOGIN {100000}\r\n")[-1].startswith(b"z NO [TOOBIG]"))
            r.command(f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode())
            self.assertTrue(r.command(b"b APPEND INBOX {1000000000}\r\n")[-1].startswith(b"b NO [TOOBIG]"))
            self.assertTrue(r.command(b"c NOOP " + b"(" * 10000 + b"\r\n")[-1].startswith(b"c BAD"))
            self.assertTrue(r.command(b"d NOOP " + b"x" * 100000 + b"\r\n")[-1].startswith(b"d BAD"))
            self.assertTrue(r.command(b"e SELECT \x00INBOX\r\n")[-1].startswith(b"e BAD"))
            self.assertTrue(r.command(b"f FETCH 1 FLAGS\r\n")[-1].startswith(b"f BAD"))
            self.assertTrue(r.command(b"g SELECT ../../etc\r\n")[-1][:4] in (b"g NO", b"g BA"))
            r.send(b"h APPEND INBOX {10}\r\n")
            self.assertTrue(r.line().startswith(b"+"))
            r.send(b"abc")  # unterminated literal, then the client goes away
            r.close()
            c = self.imap()
            self.assertEqual(ok(c.select("INBOX")), [b"1"])
            c.logout()

        await self.thread(run)

    async def test_max_connections(self) -> None:
        await self.start(limits={"max_connections_per_ip": 2})

        def run() -> None:
            a, b = self.raw(), self.raw()
            c = RawIMAP(self.ports["imap"])
            self.assertTrue(c.greeting.startswith(b"* BYE"), c.greeting)
            c.close()
            self.assertTrue(a.greeting.startswith(b"* OK") and b.greeting.startswith(b"* OK"))

        await self.thread(run)


async def wait_for(check: Callable[[], bool], timeout: float = WAIT) -> None:
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


_ = (Service, wait_for)
