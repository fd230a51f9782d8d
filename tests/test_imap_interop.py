"""mx's IMAP server against an independent peer, below the socket, under garbage, in its logs.

- `DovecotSameMaildirTests`: mx and a private Dovecot (tests/dovecot.py: its own config and
  loopback ports, never the system service) serve the same Maildir at the same time. Both
  report the same UIDVALIDITY, UIDs, flags and sizes; a STORE, EXPUNGE or APPEND on one is
  announced by the other to a selected session at its next NOOP; and ENVELOPE, BODY and
  BODYSTRUCTURE are byte for byte Dovecot's (the raw FETCH responses of both, compared item
  by item). Skipped with the reason when Dovecot is not installed. As root, Dovecot's mail
  processes run as `nobody` and the tree is handed over before every Dovecot step
  (`DovecotInstance.hand_over`).
- `BelowTheSocketTests`: `IMAPServerProtocol` on a `StringTransport` with a `task.Clock`:
  the idle timer (`limits.imap_idle_timeout`, re-armed by input), IDLE's `* OK Still here`
  every 120 s, failed LOGINs delayed and then cut, the per-address brake shared with POP3
  and SMTP submission (one `Authenticator`).
- `GarbageTests`: Hypothesis sends arbitrary bytes and IMAP-ish token soup (literals, `{n+}`,
  parentheses) to a logged-in session over a real socket; the server never answers with an
  internal error, never logs one (trial fails on logged errors), and a fresh client is served.
- `LogEventTests`: login, failed login, APPEND, EXPUNGE and the session end each log one
  structured event with its fields.
- `OtherWritersTests`: a flag rename or an unlink done on disk by another program reaches a
  selected session at its next NOOP, and an unlink is never announced during a FETCH
  (RFC 3501 §7.4.1).

Blocking clients run in threads (`deferToThread`) so the reactor keeps serving; every socket
has a timeout and every wait is bounded.
"""

from __future__ import annotations

import base64
import imaplib
import os
import re
import socket
from typing import Any

from hypothesis import HealthCheck, Phase, example, given, settings, strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from mx.auth import MAX_AUTH_FAILURES
from mx.delivery import Delivery
from mx.imap.server import IMAPServerFactory
from mx.pop3server import POP3ServerFactory
from mx.routing import Router
from mx.smtpserver import SMTPServerFactory
from mx.watch import FolderWatch
from tests.dovecot import DovecotInstance, dovecot_available, start_dovecot
from tests.support import (
    CLIENT_HELO,
    SOCKET_TIMEOUT,
    add_users,
    clocked_authenticator,
    make_config,
    maildir,
)
from tests.test_imapserver import ALICE, ALICE_PW, BOB, BOB_PW, IMAPCase, message, ok

WAIT = 20.0
_LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}$")


# -- a raw client that reads whole responses ---------------------------------------------


class Wire:
    """Byte-level IMAP client: send these bytes; read whole responses, literals included.

    A response is returned as it was on the wire without its final CRLF: a `{n}` at the end
    of a line is followed by CRLF, the n octets and the rest of the response."""

    def __init__(self, port: int, timeout: float = SOCKET_TIMEOUT) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.greeting = self.response()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed by the server; unread {self.buf[:200]!r}")
        self.buf += chunk

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def response(self) -> bytes:
        parts = [self.line()]
        while (m := _LITERAL_AT_END.search(parts[-1])) is not None:
            parts.append(b"\r\n" + self.exactly(int(m.group(1))))
            parts.append(self.line())
        return b"".join(parts)

    def until_tagged(self, tag: bytes) -> list[bytes]:
        out = []
        while True:
            r = self.response()
            out.append(r)
            if r.startswith(tag + b" "):
                return out

    def command(self, data: bytes) -> list[bytes]:
        """Send one command line (CRLF added); every response up to its tagged one."""
        tag = data.split(b" ", 1)[0]
        self.send(data + b"\r\n")
        return self.until_tagged(tag)

    def ok(self, data: bytes) -> list[bytes]:
        out = self.command(data)
        tag = data.split(b" ", 1)[0]
        assert out[-1].startswith(tag + b" OK"), (data, out)
        return out[:-1]

    def append(self, tag: bytes, mailbox: bytes, content: bytes, flags: bytes = b"") -> list[bytes]:
        """APPEND with a synchronising literal (waits for the `+`)."""
        head = tag + b" APPEND " + mailbox + (b" " + flags if flags else b"") + b" {%d}\r\n" % len(content)
        self.send(head)
        first = self.response()
        assert first.startswith(b"+"), first
        self.send(content + b"\r\n")
        return self.until_tagged(tag)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- reading FETCH responses ---------------------------------------------------------------


def _skip_quoted(b: bytes, i: int) -> int:
    assert b[i : i + 1] == b'"'
    i += 1
    while True:
        c = b[i : i + 1]
        if c == b"\\":
            i += 2
        elif c == b'"':
            return i + 1
        elif not c:
            raise ValueError(f"unterminated quoted string in {b[:200]!r}")
        else:
            i += 1


def _skip_literal(b: bytes, i: int) -> int:
    m = re.compile(rb"\{(\d+)\+?\}\r\n").match(b, i)
    if m is None:
        raise ValueError(f"bad literal at {i} in {b[:200]!r}")
    return m.end() + int(m.group(1))


def _value_end(b: bytes, i: int) -> int:
    """Where the value starting at b[i] ends: a list, a quoted string, a literal or an atom."""
    c = b[i : i + 1]
    if c == b'"':
        return _skip_quoted(b, i)
    if c == b"{":
        return _skip_literal(b, i)
    if c == b"(":
        depth = 0
        while i < len(b):
            c = b[i : i + 1]
            if c == b'"':
                i = _skip_quoted(b, i)
                continue
            if c == b"{":
                i = _skip_literal(b, i)
                continue
            if c == b"(":
                depth += 1
            elif c == b")":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        raise ValueError(f"unbalanced list in {b[:200]!r}")
    j = i
    while j < len(b) and b[j : j + 1] not in (b" ", b")"):
        j += 1
    return j


def _name_end(b: bytes, i: int) -> int:
    """Where a FETCH item name ends: `BODY[HEADER.FIELDS (A B)]<0>` is one name."""
    j = i
    while j < len(b) and b[j : j + 1] not in (b" ", b")"):
        if b[j : j + 1] == b"[":
            j = b.index(b"]", j)
        j += 1
    return j


def fetch_items(response: bytes) -> tuple[int, dict[bytes, bytes]]:
    """`* 3 FETCH (UID 3 FLAGS (\\Seen))` -> (3, {b"UID": b"3", b"FLAGS": b"(\\Seen)"})."""
    m = re.match(rb"\* (\d+) FETCH \(", response)
    assert m is not None, response[:200]
    items: dict[bytes, bytes] = {}
    i = m.end()
    while response[i : i + 1] != b")":
        j = _name_end(response, i)
        name = response[i:j].upper()
        assert response[j : j + 1] == b" ", (name, response[:300])
        end = _value_end(response, j + 1)
        assert name not in items, (name, response[:300])
        items[name] = response[j + 1 : end]
        i = end
        if response[i : i + 1] == b" ":
            i += 1
    assert response[i + 1 :] == b"", response[i:]
    return int(m.group(1)), items


def flag_set(value: bytes, *, recent: bool = False) -> frozenset[str]:
    """`(\\Seen \\Recent $Work)` -> {"\\Seen", "$Work"} (\\Recent is a session's, not stored)."""
    assert value.startswith(b"(") and value.endswith(b")"), value
    names = value[1:-1].decode().split()
    return frozenset(n for n in names if recent or n.lower() != "\\recent")


def fetches(responses: list[bytes]) -> list[tuple[int, dict[bytes, bytes]]]:
    return [fetch_items(r) for r in responses if re.match(rb"\* \d+ FETCH ", r)]


def by_uid(responses: list[bytes]) -> dict[int, dict[bytes, bytes]]:
    out = {}
    for _seq, items in fetches(responses):
        out[int(items[b"UID"])] = items
    return out


def code_value(responses: list[bytes], code: bytes) -> bytes:
    for r in responses:
        m = re.search(rb"\[" + code + rb" ([^\]]*)\]", r)
        if m:
            return m.group(1)
    raise AssertionError(f"no [{code.decode()}] in {responses}")


def untagged_numbers(responses: list[bytes], word: bytes) -> list[int]:
    """The n of every `* n WORD` (EXISTS, EXPUNGE, RECENT)."""
    return [int(m.group(1)) for r in responses if (m := re.fullmatch(rb"\* (\d+) " + word, r))]


def need_dovecot() -> None:
    reason = dovecot_available()
    if reason is not None:
        raise SkipTest(f"no private Dovecot: {reason}")


# -- messages with some MIME to them ---------------------------------------------------------


def _headers(subject: str, extra: str = "", to: str = ALICE) -> str:
    return (f"From: \"Someone, Else\" <someone@remote.test>\r\nTo: Alice <{to}>, bob@example.test\r\n"
            f"Subject: {subject}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0100\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n{extra}")


MIME_MESSAGES = [
    # 1: plain text, encoded-word subject, Cc, In-Reply-To, Reply-To, Sender
    (_headers("=?UTF-8?Q?Gr=C3=BC=C3=9Fe?= aus   Bern",
              "Cc: Carol <carol@c.test>, \"D. Q\" <d@d.test>\r\nIn-Reply-To: <prev@remote.test>\r\n"
              "Reply-To: replies@remote.test\r\nSender: list-bounces@lists.test\r\n")
     + "\r\nhello\r\nsecond line\r\n").encode(),
    # 2: multipart/alternative, quoted-printable UTF-8 and HTML
    (_headers("alternative", "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; boundary=\"alt-b\"\r\n")
     + "\r\npreamble\r\n--alt-b\r\nContent-Type: text/plain; charset=utf-8\r\n"
       "Content-Transfer-Encoding: quoted-printable\r\n\r\nGr=C3=BC=C3=9Fe\r\nline two\r\n"
       "--alt-b\r\nContent-Type: text/html; charset=\"utf-8\"\r\n\r\n<p>hi</p>\r\n--alt-b--\r\n").encode(),
    # 3: multipart/mixed with an attachment (disposition, language, id, description, location)
    (_headers("attachment", "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=mixed1\r\n")
     + "\r\n--mixed1\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
       "--mixed1\r\nContent-Type: application/pdf; name=\"a b.pdf\"\r\n"
       "Content-Disposition: attachment; filename=\"a b.pdf\"; size=12\r\n"
       "Content-Transfer-Encoding: base64\r\nContent-ID: <part2@remote.test>\r\n"
       "Content-Description: The report\r\nContent-Language: en, de\r\n"
       "Content-Location: http://remote.test/a.pdf\r\n\r\nSGVsbG8gV29ybGQh\r\n"
       "--mixed1--\r\n").encode(),
    # 4: a forwarded message/rfc822 with its own multipart inside
    (_headers("forward", "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"outer\"\r\n")
     + "\r\n--outer\r\nContent-Type: text/plain; charset=us-ascii; format=flowed\r\n\r\nforwarding\r\n"
       "--outer\r\nContent-Type: message/rfc822\r\n\r\n"
       "From: Inner <inner@i.test>\r\nTo: undisclosed-recipients:;\r\nSubject: inner one\r\n"
       "Date: Mon, 30 Nov 2026 09:00:00 -0500\r\nMIME-Version: 1.0\r\n"
       "Content-Type: multipart/mixed; boundary=inner\r\n\r\n"
       "--inner\r\nContent-Type: text/plain\r\n\r\ninner text\r\n"
       "--inner\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
       "--inner--\r\n\r\n--outer--\r\n").encode(),
    # 5: groups, a route-less odd address, an RFC 2231 parameter, no Date
    ("From: list:a@l.test,\"B\" <b@l.test>;\r\nTo: Group: ;\r\nBcc: hidden@h.test\r\n"
     "Subject: params\r\nMessage-ID: <params@remote.test>\r\nMIME-Version: 1.0\r\n"
     "Content-Type: text/plain; charset*=utf-8''%e2%82%ac; name*0=\"long\"; name*1=\"name.txt\"\r\n"
     "Content-Transfer-Encoding: 7bit\r\n\r\nbody\r\n").encode(),
]


def appended_message() -> bytes:
    return (_headers("appended by dovecot", "MIME-Version: 1.0\r\nContent-Type: multipart/related; "
                     "boundary=rel; type=\"text/html\"\r\n")
            + "\r\n--rel\r\nContent-Type: text/html\r\n\r\n<img src=cid:x>\r\n"
              "--rel\r\nContent-Type: image/gif\r\nContent-ID: <x>\r\n"
              "Content-Transfer-Encoding: base64\r\n\r\nR0lGODlhAQABAAAAACw=\r\n--rel--\r\n").encode()


# -- 1. Dovecot on the same Maildir ----------------------------------------------------------


class DovecotSameMaildirTests(IMAPCase):
    timeout = 180

    async def start_both(self) -> DovecotInstance:
        need_dovecot()
        await self.start()
        self.mail_root = self.config.data_dir / "mail"
        self.mail_root.mkdir(parents=True, exist_ok=True)
        dovecot = await deferToThread(start_dovecot, self, self.mail_root, {ALICE: ALICE_PW, BOB: BOB_PW},
                                      users_file=self.config.auth.users_file)
        self.dovecot = dovecot
        return dovecot

    def tearDown(self) -> None:
        if hasattr(self, "dovecot"):
            errors = [e for e in self.dovecot.errors() if "Warning:" not in e]
            self.assertEqual(errors, [], "Dovecot logged errors on mx's Maildir:\n" + "\n".join(errors))

    def login(self, port: int) -> Wire:
        w = Wire(port)
        self.addCleanup(w.close)
        w.ok(f"L LOGIN {ALICE} {ALICE_PW}".encode())
        return w

    async def test_both_servers_on_one_maildir(self) -> None:
        dovecot = await self.start_both()
        await self.deliver(*MIME_MESSAGES)

        def run() -> None:
            mx = self.login(self.ports["imap"])
            mx_select = mx.ok(b"m1 SELECT INBOX")
            self.assertIn(b"* 5 EXISTS", mx_select)
            dovecot.hand_over()
            dc = self.login(dovecot.imap_port)
            dc_select = dc.ok(b"d1 SELECT INBOX")
            self.assertIn(b"* 5 EXISTS", dc_select, dovecot.log())

            # The same folder: UIDVALIDITY, UIDs, flags and sizes.
            self.assertEqual(code_value(mx_select, b"UIDVALIDITY"), code_value(dc_select, b"UIDVALIDITY"))
            self.assertEqual(code_value(mx_select, b"UIDNEXT"), code_value(dc_select, b"UIDNEXT"))
            self.assertEqual(mx.ok(b"m2 UID SEARCH ALL"), [b"* SEARCH 1 2 3 4 5"])
            self.assertEqual(dc.ok(b"d2 UID SEARCH ALL"), [b"* SEARCH 1 2 3 4 5"])

            def flags_and_sizes(w: Wire, tag: bytes) -> dict[int, tuple[frozenset[str], int]]:
                got = by_uid(w.ok(tag + b" UID FETCH 1:* (FLAGS RFC822.SIZE)"))
                return {uid: (flag_set(i[b"FLAGS"]), int(i[b"RFC822.SIZE"])) for uid, i in got.items()}

            mx_flags = flags_and_sizes(mx, b"m3")
            self.assertEqual(sorted(mx_flags), [1, 2, 3, 4, 5])
            self.assertEqual(flags_and_sizes(dc, b"d3"), mx_flags)

            def same_structures(mx_tag: bytes, dc_tag: bytes) -> list[int]:
                """ENVELOPE, BODY and BODYSTRUCTURE of every message: Dovecot's bytes, item by item."""
                items = b" UID FETCH 1:* (ENVELOPE BODY BODYSTRUCTURE)"
                mx_got = by_uid(mx.ok(mx_tag + items))
                dc_got = by_uid(dc.ok(dc_tag + items))
                self.assertEqual(sorted(dc_got), sorted(mx_got))
                for uid in sorted(mx_got):
                    for name in (b"ENVELOPE", b"BODY", b"BODYSTRUCTURE"):
                        self.assertEqual(mx_got[uid][name], dc_got[uid][name], f"UID {uid} {name.decode()}")
                return sorted(mx_got)

            self.assertEqual(same_structures(b"m3b", b"d3b"), [1, 2, 3, 4, 5])

            # STORE on mx: Dovecot's selected session hears of it at NOOP.
            stored = mx.ok(b"m4 UID STORE 2 +FLAGS (\\Flagged $Work)")
            self.assertEqual([flag_set(i[b"FLAGS"]) for _s, i in fetches(stored)], [{"\\Flagged", "$Work"}])
            dovecot.hand_over()
            noop = dc.ok(b"d4 NOOP")
            told = {seq: flag_set(i[b"FLAGS"]) for seq, i in fetches(noop)}
            self.assertEqual(told, {2: {"\\Flagged", "$Work"}}, f"Dovecot's NOOP: {noop}\n{dovecot.log()}")
            seen = by_uid(dc.ok(b"d5 UID FETCH 2 (FLAGS)"))
            self.assertEqual(flag_set(seen[2][b"FLAGS"]), {"\\Flagged", "$Work"})

            # STORE on Dovecot: mx's selected session hears of it at NOOP.
            dc.ok(b"d6 UID STORE 3 +FLAGS.SILENT (\\Seen \\Answered)")
            noop = mx.ok(b"m5 NOOP")
            self.assertEqual([(seq, int(i[b"UID"]), flag_set(i[b"FLAGS"])) for seq, i in fetches(noop)],
                             [(3, 3, {"\\Seen", "\\Answered"})], noop)

            # EXPUNGE on Dovecot: mx's session gets `* 4 EXPUNGE` at NOOP.
            dovecot.hand_over()
            dc.ok(b"d7 UID STORE 4 +FLAGS.SILENT (\\Deleted)")
            self.assertEqual(untagged_numbers(dc.ok(b"d8 EXPUNGE"), b"EXPUNGE"), [4])
            noop = mx.ok(b"m6 NOOP")
            self.assertEqual(untagged_numbers(noop, b"EXPUNGE"), [4], noop)
            self.assertEqual(mx.ok(b"m7 UID SEARCH ALL"), [b"* SEARCH 1 2 3 5"])

            # APPEND on Dovecot: mx's session gets EXISTS for the UID Dovecot announced.
            dovecot.hand_over()
            appended = dc.append(b"d9", b"INBOX", appended_message())
            self.assertTrue(appended[-1].startswith(b"d9 OK"), appended)
            validity, uid = code_value(appended, b"APPENDUID").split()
            self.assertEqual(validity, code_value(mx_select, b"UIDVALIDITY"))
            self.assertEqual(int(uid), 6)
            noop = mx.ok(b"m8 NOOP")
            self.assertEqual(untagged_numbers(noop, b"EXISTS"), [5], noop)
            got = fetches(mx.ok(b"m9 FETCH 5 (UID RFC822.SIZE)"))
            self.assertEqual(int(got[0][1][b"UID"]), int(uid))
            self.assertEqual(int(got[0][1][b"RFC822.SIZE"]), len(appended_message()))

            # Flags and sizes agree once more, after both wrote.
            dovecot.hand_over()
            dc.ok(b"d10 NOOP")
            mx_flags = flags_and_sizes(mx, b"m10")
            self.assertEqual(mx_flags[3][0], {"\\Seen", "\\Answered"})
            self.assertEqual(flags_and_sizes(dc, b"d11"), mx_flags)

            # ENVELOPE, BODY and BODYSTRUCTURE again, the message Dovecot appended too.
            self.assertEqual(same_structures(b"m11", b"d12"), [1, 2, 3, 5, 6])

            mx.ok(b"m12 LOGOUT")
            dc.ok(b"d13 LOGOUT")

        await self.thread(run)


# -- 2. below the socket, with a Clock -------------------------------------------------------


class BelowTheSocketTests(TestCase):
    """The idle timer, IDLE's keepalive and the brakes on a StringTransport with a Clock."""

    timeout = 90
    PEER = "192.0.2.7"

    def setUp(self) -> None:
        self.config = make_config(self)
        add_users(self.config, {ALICE: ALICE_PW})
        self.pool, self.clock, self.users, self.auth = clocked_authenticator(self, self.config)
        self.watch = FolderWatch(reactor, pool=self.pool)
        self.addCleanup(self.watch.stop)
        self.factory = IMAPServerFactory(
            config=self.config, reactor=reactor, read_pool=self.pool, authenticator=self.auth,
            watch=self.watch, clock=self.clock, kind="imaps",
        )

    def connect(self, ip: str = PEER) -> tuple[Any, StringTransport]:
        addr = IPv4Address("TCP", ip, 40000)
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        self.addCleanup(lambda: proto.connectionLost(None) if proto._open else None)
        self.assertTrue(transport.value().startswith(b"* OK [CAPABILITY "), transport.value())
        transport.clear()
        return proto, transport

    def short_timers(self) -> list[Any]:
        """Delayed calls other than the idle timer (30 minutes away) and IDLE's keepalive."""
        now = self.clock.seconds()
        return [c for c in self.clock.getDelayedCalls() if c.getTime() - now <= 60]

    async def until(self, transport: StringTransport, marker: bytes) -> bytes:
        """Wait (bounded, real time: the pool is real) until `marker` was written."""
        for _ in range(int(WAIT / 0.005)):
            if marker in transport.value():
                return transport.value()
            await deferLater(reactor, 0.005, lambda: None)
        self.fail(f"{marker!r} never came; written {transport.value()!r}")

    async def outcome(self, transport: StringTransport) -> tuple[bytes, float]:
        """(what was written, the delay scheduled before answering; 0 if answered at once)."""
        for _ in range(int(WAIT / 0.005)):
            if transport.value().endswith(b"\r\n"):
                return transport.value(), 0.0
            timers = self.short_timers()
            if timers:
                self.assertEqual(transport.value(), b"")
                return b"", round(timers[0].getTime() - self.clock.seconds(), 6)
            await deferLater(reactor, 0.005, lambda: None)
        self.fail("no answer")

    async def bad_login(self, proto: Any, transport: StringTransport, tag: str) -> tuple[bytes, float]:
        transport.clear()
        proto.dataReceived(f"{tag} LOGIN {ALICE} wrong\r\n".encode())
        written, delay = await self.outcome(transport)
        if delay:
            self.clock.advance(delay * 0.99)
            self.assertEqual(transport.value(), b"", "answered before the delay was over")
            self.clock.advance(delay * 0.01 + 0.001)
            written = transport.value()
        transport.clear()
        return written, delay

    async def login(self, proto: Any, transport: StringTransport) -> None:
        proto.dataReceived(f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode())
        written = await self.until(transport, b"\r\n")
        self.assertTrue(written.startswith(b"a OK [CAPABILITY "), written)
        transport.clear()

    # -- the idle timer ------------------------------------------------------------------

    async def test_idle_timeout_and_input_rearms_it(self) -> None:
        limit = self.config.limits.imap_idle_timeout
        self.assertEqual(limit, 1800.0)
        proto, transport = self.connect()
        self.clock.advance(limit - 1)
        self.assertFalse(transport.disconnecting)
        await self.login(proto, transport)  # input: the timer starts again
        proto.dataReceived(b"b SELECT INBOX\r\n")
        await self.until(transport, b"b OK")
        transport.clear()
        self.clock.advance(limit - 1)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"c NOOP\r\n")
        await self.until(transport, b"c OK")
        transport.clear()
        self.clock.advance(limit - 1)
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(transport.value(), b"* BYE Disconnected for inactivity\r\n")
        self.assertTrue(transport.disconnecting)

    async def test_idle_timeout_before_login(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(self.config.limits.imap_idle_timeout + 1)
        self.assertEqual(transport.value(), b"* BYE Disconnected for inactivity\r\n")
        self.assertTrue(transport.disconnecting)

    async def test_idle_keepalive_every_two_minutes(self) -> None:
        proto, transport = self.connect()
        await self.login(proto, transport)
        proto.dataReceived(b"b SELECT INBOX\r\n")
        await self.until(transport, b"b OK")
        transport.clear()
        proto.dataReceived(b"c IDLE\r\n")
        await self.until(transport, b"+ idling\r\n")
        await deferLater(reactor, 0.05, lambda: None)  # IDLE's own first look at the folder
        self.assertEqual(transport.value(), b"+ idling\r\n")
        transport.clear()
        self.clock.advance(119)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1.5)
        self.assertEqual(transport.value(), b"* OK Still here\r\n")
        transport.clear()
        for _ in range(13):  # up to 1680 s after IDLE began
            self.clock.advance(120)
        self.assertEqual(transport.value(), b"* OK Still here\r\n" * 13)
        transport.clear()
        self.clock.advance(1799 - 1680.5)  # 1 s before the idle timer IDLE's input armed
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"DONE\r\n")  # input: the idle timer starts again
        await self.until(transport, b"c OK")
        self.assertEqual(transport.value(), b"c OK IDLE terminated\r\n")
        transport.clear()
        self.clock.advance(300)
        self.assertEqual(transport.value(), b"", "a keepalive after DONE")
        self.clock.advance(1800 - 300 - 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(transport.value(), b"* BYE Disconnected for inactivity\r\n")
        self.assertTrue(transport.disconnecting)

    # -- failed logins -------------------------------------------------------------------

    async def test_failed_logins_are_delayed_then_cut(self) -> None:
        proto, transport = self.connect()
        delays = []
        for i in range(1, MAX_AUTH_FAILURES):
            written, delay = await self.bad_login(proto, transport, f"t{i}")
            self.assertEqual(written, f"t{i} NO [AUTHENTICATIONFAILED] Authentication failed\r\n".encode())
            self.assertFalse(transport.disconnecting)
            delays.append(delay)
        self.assertEqual(delays[:3], [0.0, 0.0, 0.0])
        self.assertGreaterEqual(delays[3], 1.0)
        nonzero = [d for d in delays if d]
        self.assertEqual(nonzero, sorted(nonzero))
        self.assertLessEqual(max(delays), 15.0)
        written, _ = await self.bad_login(proto, transport, "last")
        self.assertEqual(written, b"last NO [AUTHENTICATIONFAILED] Authentication failed\r\n"
                                  b"* BYE Too many authentication failures\r\n")
        self.assertTrue(transport.disconnecting)

    async def test_unknown_user_costs_the_same(self) -> None:
        proto, transport = self.connect()
        delays = []
        for i in range(5):
            transport.clear()
            proto.dataReceived(f"u{i} LOGIN nobody@example.test x\r\n".encode())
            written, delay = await self.outcome(transport)
            if delay:
                self.clock.advance(delay + 0.001)
                written = transport.value()
            self.assertEqual(written, f"u{i} NO [AUTHENTICATIONFAILED] Authentication failed\r\n".encode())
            delays.append(delay)
        self.assertEqual(delays, [0.0, 0.0, 0.0, 1.0, 2.0])

    async def test_failures_on_pop3_and_submission_brake_imap(self) -> None:
        """One address, one brake: 2 failures on SMTP submission and 2 on POP3 (same
        Authenticator), then IMAP's very first failure is the fifth: answered after 2 s."""
        def plain(user: str, password: str) -> str:
            return base64.b64encode(f"\0{user}\0{password}".encode()).decode()

        smtp = SMTPServerFactory(
            config=self.config, router=Router(self.config, self.users.exists),
            delivery=Delivery(self.config, reactor, self.pool), clock=self.clock,
            kind="submissions", implicit_tls=True, authenticator=self.auth,
        )
        addr = IPv4Address("TCP", self.PEER, 40001)
        sp = smtp.buildProtocol(addr)
        smtp_t = StringTransport(peerAddress=addr)
        sp.makeConnection(smtp_t)
        self.addCleanup(lambda: sp.connectionLost(None) if sp._open else None)
        sp.dataReceived(f"EHLO {CLIENT_HELO}\r\n".encode())
        for _ in range(2):
            smtp_t.clear()
            sp.dataReceived(f"AUTH PLAIN {plain(ALICE, 'wrong')}\r\n".encode())
            written, delay = await self.outcome(smtp_t)
            self.assertEqual(delay, 0.0)
            self.assertTrue(written.startswith(b"535 "), written)

        pop = POP3ServerFactory(config=self.config, reactor=reactor, read_pool=self.pool,
                                authenticator=self.auth, clock=self.clock, kind="pop3s")
        pp = pop.buildProtocol(addr)
        pt = StringTransport(peerAddress=addr)
        pp.makeConnection(pt)
        self.addCleanup(lambda: pp.connectionLost(None) if pp._open else None)
        for expected in (0.0, 1.0):  # the fourth failure of this address waits 1 s
            pt.clear()
            pp.dataReceived(f"USER {ALICE}\r\nPASS wrong\r\n".encode())
            await self.until(pt, b"+OK\r\n")
            pt.clear()
            written, delay = await self.outcome(pt)
            self.assertEqual(delay, expected)
            if delay:
                self.clock.advance(delay + 0.001)
                written = pt.value()
            self.assertTrue(written.startswith(b"-ERR [AUTH] "), written)

        proto, transport = self.connect()
        written, delay = await self.bad_login(proto, transport, "i1")
        self.assertEqual(delay, 2.0)
        self.assertEqual(written, b"i1 NO [AUTHENTICATIONFAILED] Authentication failed\r\n")
        other, t2 = self.connect("198.51.100.1")  # another address is not slowed
        _written, delay = await self.bad_login(other, t2, "o1")
        self.assertEqual(delay, 0.0)

    async def test_blocked_address_is_refused_even_the_right_password(self) -> None:
        for _ in range(self.auth.failures.block_after):
            self.auth.failures.failed(self.PEER)
        proto, transport = self.connect()
        proto.dataReceived(f"a LOGIN {ALICE} {ALICE_PW}\r\n".encode())
        # The tagged NO [UNAVAILABLE], then BYE and the close (as after the 10th failure).
        for _ in range(100):
            if transport.disconnecting:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(transport.value(), b"a NO [UNAVAILABLE] Too many authentication failures\r\n"
                                            b"* BYE Too many authentication failures, try later\r\n")
        self.assertTrue(transport.disconnecting)


# -- 3. garbage over a real socket -----------------------------------------------------------

_TOKENS = [
    b"a", b"b1", b"*", b"+", b"NOOP", b"SELECT", b"EXAMINE", b"INBOX", b"Trash", b"FETCH", b"UID", b"STORE",
    b"SEARCH", b"COPY", b"MOVE", b"APPEND", b"STATUS", b"LIST", b"LSUB", b"IDLE", b"DONE", b"CHECK", b"CLOSE",
    b"UNSELECT", b"EXPUNGE", b"ENABLE", b"ID", b"NAMESPACE", b"CAPABILITY", b"AUTHENTICATE", b"PLAIN", b"LOGIN",
    b"1", b"0", b"2:*", b"1:*", b"*:1", b"4294967295", b"4294967296", b"-1", b"1,2,3:5", b"$",
    b"FLAGS", b"+FLAGS", b"-FLAGS.SILENT", b"(\\Seen)", b"\\Deleted", b"\\Recent", b"\\Foo", b"$Work",
    b"BODY[]", b"BODY.PEEK[HEADER]", b"BODY[1.2.MIME]", b"BODY[HEADER.FIELDS (SUBJECT FROM)]", b"BODY[TEXT]<0.10>",
    b"<5.0>", b"BODYSTRUCTURE", b"ENVELOPE", b"RFC822", b"RFC822.SIZE", b"INTERNALDATE", b"ALL", b"FAST",
    b"BINARY[1]", b"CHARSET", b"UTF-8", b"KOI8-R", b"OR", b"NOT", b"HEADER", b"SUBJECT", b"SINCE", b"1-Jan-2020",
    b"BEFORE", b"LARGER", b"SMALLER", b"TEXT", b"KEYWORD", b"(MESSAGES UNSEEN)", b"RETURN", b"(CHILDREN)",
    b"(", b")", b"((", b"))", b"[", b"]", b"<", b">", b"\"", b"\"\"", b"\"quoted \\\" str\"", b"\"\\\\\"", b"NIL",
    b"%", b"\"*\"", b"&AMk-t&AOk-", b"&-", b"&Jjo", b"..", b"../x", b"\x00", b"\xff\xfe", b"\t", b"\r", b"\n",
    b"{0}", b"{", b"}", b"{3}", b"{4294967296}", b"{99999999999999999999}", b"~{2}",
]


_STARTS = [
    b"t1 FETCH 1:* ", b"t2 UID FETCH 1:* ", b"t3 FETCH 1 ", b"t4 STORE 1:* ", b"t5 UID STORE 1 ", b"t6 SEARCH ",
    b"t7 UID SEARCH ", b"t8 APPEND INBOX ", b"t9 LIST ", b"t10 STATUS INBOX ", b"t11 SELECT ", b"t12 COPY 1 ",
    b"t13 UID MOVE 1:* ", b"t14 ID ", b"t15 ENABLE ", b"t16 EXAMINE ", b"t17 CREATE ", b"t18 LIST (SPECIAL-USE) ",
    b"t19 UID EXPUNGE ", b"t20 NOOP ",
]


@st.composite
def _imapish(draw: Any) -> bytes:
    """Lines of IMAP-ish tokens, literals (`{n}`/`{n+}`, with right or wrong lengths) between."""
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        parts: list[bytes] = []
        for _ in range(draw(st.integers(0, 10))):
            if draw(st.integers(0, 9)) == 0:
                body = draw(st.binary(max_size=40))
                n = draw(st.one_of(st.just(len(body)), st.integers(0, 60)))
                plus = draw(st.booleans())
                parts.append(b"{%d%s}\r\n" % (n, b"+" if plus else b"") + body)
            else:
                parts.append(draw(st.sampled_from(_TOKENS)))
        sep = draw(st.sampled_from([b" ", b" ", b" ", b"", b"  "]))
        end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b""]))
        start = draw(st.sampled_from(_STARTS)) if draw(st.integers(0, 3)) else b""  # mostly a real command
        lines.append(start + sep.join(parts) + end)
    return b"".join(lines)


class GarbageTests(IMAPCase):
    timeout = 300

    async def test_arbitrary_bytes_to_a_logged_in_session(self) -> None:
        await self.start(limits={"max_message_size": "64KiB", "max_connections_per_ip": 200})
        await self.deliver(message("one"), message("two"), message("three"))
        port = self.ports["imap"]
        login = f"L LOGIN {ALICE} {ALICE_PW}\r\n".encode()

        def drain(w: Wire, quiet: float) -> bytes:
            """Everything the server writes until it is quiet for `quiet` seconds or closes."""
            w.sock.settimeout(quiet)
            got = w.buf
            w.buf = b""
            try:
                while True:
                    chunk = w.sock.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            except (TimeoutError, OSError):
                pass
            return got

        def fresh_client_is_served() -> None:
            w = Wire(port)
            try:
                self.assertTrue(w.greeting.startswith(b"* OK "), w.greeting)
                self.assertEqual(w.command(b"a NOOP"), [b"a OK NOOP completed"])
                w.ok(login.strip())
                out = w.command(b"b SELECT INBOX")
                self.assertTrue(out[-1].startswith(b"b OK [READ-WRITE]"), out)
                exists = untagged_numbers(out, b"EXISTS")
                self.assertEqual(len(exists), 1, out)
                listed = w.ok(b"c FETCH 1:* (UID FLAGS)") if exists[0] else []
                self.assertEqual(len(fetches(listed)), exists[0], listed)
                w.ok(b"d LOGOUT")
            finally:
                w.close()

        failures: list[bytes] = []

        @settings(max_examples=50, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                  suppress_health_check=list(HealthCheck))
        @given(st.booleans(), st.one_of(st.binary(max_size=3000), _imapish()))
        @example(True, b"x FETCH 1:* (BODY[]<0.5> BODY.PEEK[1.MIME] BINARY[1])\r\n")
        @example(False, b"x APPEND INBOX {10}\r\nabc")
        @example(False, b"x APPEND INBOX (\\Seen) {5+}\r\nhello\r\ny SELECT {5+}\r\nINBOX\r\nz FETCH 1 BODY[]\r\n")
        @example(True, b"x SEARCH CHARSET UTF-8 SUBJECT {4+}\r\n\xc3\xa9t\xc3\r\n")
        @example(True, b"x UID STORE 1:* FLAGS (\\Seen $A) {3+}\r\n$B)\r\ny UID FETCH 4294967295:* FLAGS\r\n")
        @example(True, b"x IDLE\r\nnot done\r\n" + b"(" * 5000 + b"\r\n")
        @example(False, b"x AUTHENTICATE PLAIN\r\n\xff\xff\r\n")
        @example(False, b"x LIST \"\" {3}\r\n")
        def one(select: bool, data: bytes) -> None:
            """On one connection: log in, maybe SELECT INBOX, then the bytes."""
            w = Wire(port, timeout=5.0)
            try:
                self.assertTrue(w.greeting.startswith(b"* OK "), w.greeting)
                w.ok(login.strip())
                if select:
                    w.ok(b"S SELECT INBOX")
                try:
                    w.send(data)
                except OSError:
                    pass  # the server may have closed already (too many errors)
                answer = drain(w, 0.25)
            finally:
                w.close()
            if b"SERVERBUG" in answer or b"Internal error" in answer:
                failures.append(data)
                raise AssertionError(f"internal error for {data!r}: {answer[-2000:]!r}")
            fresh_client_is_served()

        await self.thread(one)
        self.assertEqual(failures, [])


# -- 4. log events ---------------------------------------------------------------------------


class LogEventTests(IMAPCase):
    async def test_one_structured_event_each(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start()
        content = message("logged")

        def run() -> tuple[bytes, bytes]:
            c = self.imap(user=None)
            with self.assertRaises(imaplib.IMAP4.error):
                c.login(ALICE, "wrong")
            ok(c.login(ALICE, ALICE_PW))
            typ, data = c.append("INBOX", "(\\Deleted)", None, content)
            self.assertEqual(typ, "OK")
            validity, uid = re.search(rb"\[APPENDUID (\d+) (\d+)\]", data[0]).groups()
            ok(c.select("INBOX"))
            self.assertEqual(ok(c.expunge()), [b"1"])
            self.assertEqual(c.logout()[0], "BYE")
            return validity, uid

        validity, uid = await self.thread(run)

        def imap_events(prefix: str) -> list[dict[str, Any]]:
            return [e for e in events if str(e.get("log_format", "")).startswith(prefix)]

        for _ in range(int(WAIT / 0.01)):  # the session ends when the server sees the close
            if imap_events("imap session of "):
                break
            await deferLater(reactor, 0.01, lambda: None)

        failed = imap_events("imap login failed")
        self.assertEqual([(e["username"], e["peer"], e["reason"], e["count"]) for e in failed],
                         [(ALICE, "127.0.0.1", "wrong password", 1)])
        login = imap_events("imap login {user}")
        self.assertEqual([(e["user"], e["peer"], e["tls"]) for e in login], [(ALICE, "127.0.0.1", False)])
        self.assertIsInstance(login[0]["created"], list)
        appended = imap_events("imap {user} appended")
        self.assertEqual([(e["user"], e["size"], e["folder"], e["uid"], e["uidvalidity"]) for e in appended],
                         [(ALICE, len(content), "INBOX", int(uid), int(validity))])
        expunged = imap_events("imap {user} expunged")
        self.assertEqual([(e["user"], e["count"], e["folder"], e["uids"]) for e in expunged],
                         [(ALICE, 1, "INBOX", [int(uid)])])
        ended = imap_events("imap session of ")
        self.assertEqual(len(ended), 1, ended)
        self.assertEqual((ended[0]["user"], ended[0]["peer"]), (ALICE, "127.0.0.1"))
        self.assertEqual(ended[0]["commands"], 7)  # CAPABILITY, LOGIN x2, APPEND, SELECT, EXPUNGE, LOGOUT
        self.assertGreater(ended[0]["octets"], 200)
        for e in failed + login + appended + expunged + ended:  # the text renders from the fields
            self.assertNotIn("Unable to format", formatEvent(e))
            self.assertNotIn(ALICE_PW, formatEvent(e))


# -- 5. other programs on the Maildir ----------------------------------------------------------


class OtherWritersTests(IMAPCase):
    async def test_rename_and_unlink_on_disk(self) -> None:
        await self.start()
        await self.deliver(message("one"), message("two"), message("three"))
        cur = maildir(self.config, "alice") / "cur"

        def run() -> None:
            first = self.imap()
            ok(first.select("INBOX"))  # takes new/ into cur/ (and \Recent) and goes
            first.logout()
            w = Wire(self.ports["imap"])
            self.addCleanup(w.close)
            w.ok(f"a LOGIN {ALICE} {ALICE_PW}".encode())
            w.ok(b"b SELECT INBOX")
            uids = by_uid(w.ok(b"c FETCH 1:* (UID FLAGS)"))
            self.assertEqual({u: flag_set(i[b"FLAGS"], recent=True) for u, i in uids.items()},
                             {1: frozenset(), 2: frozenset(), 3: frozenset()})
            names = sorted(os.listdir(cur))
            self.assertEqual(len(names), 3)
            self.assertTrue(all(n.endswith(":2,") for n in names), names)
            by_base = {n.split(":")[0]: n for n in names}
            files = self.files_by_uid(by_base)

            # Another program sets \Flagged \Seen by renaming the file.
            os.rename(cur / files[2], cur / (files[2] + "FS"))
            noop = w.ok(b"d NOOP")
            self.assertEqual(noop, [b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Seen))"])
            self.assertEqual(w.ok(b"e NOOP"), [])  # told once

            # Another program deletes message 1: FETCH answers the rest, no EXPUNGE yet.
            os.unlink(cur / files[1])
            out = w.command(b"f FETCH 1:* (FLAGS)")
            self.assertEqual(untagged_numbers(out, b"EXPUNGE"), [], out)
            self.assertTrue(out[-1].startswith(b"f OK"), out)
            self.assertEqual(sorted(seq for seq, _i in fetches(out)), [1, 2, 3])  # the numbers stand
            out = w.command(b"g FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            self.assertEqual(untagged_numbers(out, b"EXPUNGE"), [], out)
            self.assertEqual(sorted(seq for seq, _i in fetches(out)), [2, 3], out)
            self.assertTrue(out[-1].startswith((b"g OK", b"g NO [EXPUNGEISSUED]")), out)
            out = w.command(b"h STORE 3 +FLAGS (\\Answered)")
            self.assertEqual(untagged_numbers(out, b"EXPUNGE"), [], out)
            self.assertTrue(out[-1].startswith(b"h OK"), out)
            out = w.command(b"i SEARCH ALL")
            self.assertEqual(untagged_numbers(out, b"EXPUNGE"), [], out)
            noop = w.ok(b"j NOOP")
            self.assertEqual(noop, [b"* 1 EXPUNGE"])
            self.assertEqual(w.ok(b"k UID SEARCH ALL"), [b"* SEARCH 2 3"])
            self.assertEqual(w.ok(b"l SEARCH ALL"), [b"* SEARCH 1 2"])
            w.ok(b"m LOGOUT")

        await self.thread(run)

    def files_by_uid(self, by_base: dict[str, str]) -> dict[int, str]:
        """{uid: file name} from the dovecot-uidlist the store wrote."""
        lines = (maildir(self.config, "alice") / "dovecot-uidlist").read_text().splitlines()[1:]
        out = {}
        for line in lines:
            uid, _, base = line.partition(" :")  # `<uid> [fields] :<base>`
            out[int(uid.split()[0])] = by_base[base]
        return out

