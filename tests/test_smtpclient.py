"""Tests for mx.smtpclient against aiosmtpd (an independent server) and tiny raw fakes.

aiosmtpd runs in its own asyncio thread via `Controller` on a free loopback port; its handler
can be switched to refuse at MAIL, RCPT or DATA and records what it stored byte for byte.
Server misbehaviour aiosmtpd cannot produce (a 554 greeting, silence, STARTTLS response
injection, malformed replies) comes from a raw Twisted `Protocol` on loopback.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate
from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SkipTest, TestCase

from mx.fasttcp import DirectWriteClient
from mx.smtp import BodyEncoder, MalformedReply, dot_stuff
from mx.smtpclient import (
    CHUNK_SIZE,
    ReplyParser,
    ServerReply,
    SMTPClientConnection,
    SMTPClientError,
    Timeouts,
)

HELO = "client.example"
MX_NAME = "mx.test.example"
FAST = Timeouts(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5, data_init=5, data_block=5,
                data_end=5, quit=2)
A, B, C = "a@y.test", "b@y.test", "c@y.test"
SENDER = "s@x.test"
MESSAGE = (b"From: s@x.test\r\nTo: a@y.test\r\nSubject: hi\r\n\r\n"
           b".leading dot\r\n.\r\n..x\r\nplain\r\n")
SMUGGLED = (b".\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@y.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nevil\r\n")

_ca = trustme.CA()
_server_cert = _ca.issue_cert(MX_NAME)


# -- aiosmtpd as the remote MX ------------------------------------------------------------


@dataclass
class Stored:
    sender: str
    rcpts: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool


class Handler:
    def __init__(self) -> None:
        self.messages: list[Stored] = []
        self.mails: list[str] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.pipelining = False
        self.sni: list[str | None] = []

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")  # aiosmtpd takes pipelined commands but does not say so
        return responses

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        self.mails.append(address)
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_reply:
            return self.data_reply
        self.messages.append(Stored(envelope.mail_from, list(envelope.rcpt_tos),
                                    envelope.original_content, list(envelope.mail_options),
                                    session.ssl is not None))
        return "250 2.0.0 queued"


class _MX(Controller):
    """Controller on port 0: learn the port before aiosmtpd's own trigger connection."""

    def _trigger_server(self) -> None:
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def start_mx(case: TestCase, handler: Handler, *, tls: bool = False, **kwargs: Any) -> int:
    if tls:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        _server_cert.configure_cert(ctx)
        ctx.sni_callback = lambda sock, name, c: handler.sni.append(name)
        kwargs["tls_context"] = ctx
    aiosmtpd_log = logging.getLogger("mail.log")  # it logs refused TLS handshakes with tracebacks
    level = aiosmtpd_log.level
    aiosmtpd_log.setLevel(logging.CRITICAL)
    case.addCleanup(aiosmtpd_log.setLevel, level)
    controller = _MX(handler, hostname="127.0.0.1", port=0, server_hostname=MX_NAME, **kwargs)
    controller.start()
    case.addCleanup(controller.stop)
    return controller.port


# -- a raw fake server for misbehaviour ---------------------------------------------------


class FakeServer(Protocol):
    def connectionMade(self) -> None:
        self.buf = b""
        self.in_data = False
        self.lost: Deferred[None] = Deferred()
        self.factory.conns.append(self)
        if self.factory.greeting:
            self.transport.write(self.factory.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.factory.batches.append(data)
        self.buf += data
        while True:
            if self.in_data:
                end = self.buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.factory.messages.append(self.buf[: end + 2])
                self.buf, self.in_data = self.buf[end + 5 :], False
                self.transport.write(self.factory.data_end_reply)
                continue
            line, sep, rest = self.buf.partition(b"\r\n")
            if not sep:
                return
            self.buf = rest
            command = line.decode()
            self.factory.commands.append(command)
            verb = command.split(" ")[0].upper()
            reply = self.factory.replies.get(verb, b"250 2.0.0 ok\r\n")
            self.transport.write(reply)
            if verb == "DATA" and reply.startswith(b"354"):
                self.in_data = True
            if verb == "QUIT":
                self.transport.loseConnection()
                return

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


class FakeFactory(Factory):
    protocol = FakeServer

    def __init__(self, greeting: bytes | None, replies: dict[str, bytes]) -> None:
        self.greeting = greeting
        self.replies = replies
        self.conns: list[FakeServer] = []
        self.batches: list[bytes] = []
        self.commands: list[str] = []
        self.messages: list[bytes] = []
        self.data_end_reply = b"250 2.0.0 queued\r\n"


async def start_fake(case: TestCase, greeting: bytes | None = b"220 fake.test ESMTP\r\n",
                     interface: str = "127.0.0.1", **replies: bytes) -> tuple[FakeFactory, int]:
    factory = FakeFactory(greeting, {"EHLO": b"250-fake.test\r\n250 8BITMIME\r\n", **replies})
    port = reactor.listenTCP(0, factory, interface=interface)

    async def cleanup() -> None:
        await port.stopListening()
        for conn in factory.conns:
            conn.transport.abortConnection()
            await conn.lost

    case.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return factory, port.getHost().port


# -- helpers ------------------------------------------------------------------------------


async def connect(case: TestCase, port: int, tls: str = "off", tls_hostname: str = MX_NAME,
                  host: str = "127.0.0.1", **kwargs: Any) -> SMTPClientConnection:
    conn = await SMTPClientConnection.connect(reactor, host, port, helo=HELO, tls=tls,
                                              tls_hostname=tls_hostname, timeouts=kwargs.pop("timeouts", FAST),
                                              **kwargs)
    case.addCleanup(lambda: Deferred.fromCoroutine(conn.quit()))
    return conn


async def fails(case: TestCase, coro: Any) -> SMTPClientError:
    try:
        await coro
    except SMTPClientError as e:
        return e
    case.fail("no SMTPClientError")


def boundary_message(split_crlf: bool) -> bytes:
    """Headers and padding so that the smuggling payload starts exactly at CHUNK_SIZE.

    With `split_crlf` the CR of the line ending sits at the end of chunk one and its LF
    begins chunk two, followed by the dot.
    """
    msg = b"From: s@x.test\r\nTo: a@y.test\r\nSubject: boundary\r\n\r\n"
    while len(msg) + 80 < CHUNK_SIZE:
        msg += b"x" * 78 + b"\r\n"
    end = CHUNK_SIZE + (1 if split_crlf else 0)
    msg += b"y" * (end - len(msg) - 2) + b"\r\n"
    msg += SMUGGLED
    assert msg[CHUNK_SIZE - 1 : CHUNK_SIZE + 1] == (b"\r\n" if split_crlf else b"\n.")
    return msg


# -- pure parts ---------------------------------------------------------------------------


class PureTests(TestCase):
    def test_multiline_reply_and_enhanced_codes(self) -> None:
        p = ReplyParser()
        self.assertEqual(p.feed(b"250-mx.test greets\r\n250-SIZE 100\r\n"), [])
        self.assertTrue(p.pending)
        [r] = p.feed(b"250 8BITMIME\r\n")
        self.assertEqual(r, ServerReply(250, None, "mx.test greets\nSIZE 100\n8BITMIME"))
        [r] = p.feed(b"550-5.1.1 no such\r\n550 5.1.1 user\r\n")
        self.assertEqual((r.code, r.enhanced, r.text, str(r)), (550, "5.1.1", "no such\nuser", "550 5.1.1 no such\nuser"))
        self.assertTrue(r.permanent and not r.temporary)
        [r, r2] = p.feed(b"451 4.3.0 later\r\n250\r\n")
        self.assertEqual((r.enhanced, r.text, r.temporary, r2.text), ("4.3.0", "later", True, ""))
        [r] = p.feed(b"250 5.0.0 class mismatch is text\n")  # LF alone tolerated
        self.assertEqual((r.enhanced, r.text), (None, "5.0.0 class mismatch is text"))
        self.assertFalse(p.pending)

    def test_every_split_gives_the_same_replies(self) -> None:
        # One-line replies are remembered by their bytes; a line that ends or continues a
        # multi-line reply must still be parsed as part of it, however the bytes arrive.
        stream = (b"250 2.1.0 Ok\r\n250-first\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\n"
                  b"550-5.1.1 no\r\n550 5.1.1 such user\r\n550 5.1.1 such user\r\n354 go\r\n")
        want = [ServerReply(250, "2.1.0", "Ok"), ServerReply(250, None, "first\nOk"),
                ServerReply(250, "2.1.5", "Ok"), ServerReply(250, "2.1.5", "Ok"),
                ServerReply(550, "5.1.1", "no\nsuch user"), ServerReply(550, "5.1.1", "such user"),
                ServerReply(354, None, "go")]
        for i in range(len(stream) + 1):
            p = ReplyParser()
            self.assertEqual(p.feed(stream[:i]) + p.feed(stream[i:]), want, i)
            self.assertFalse(p.pending)
        p = ReplyParser()
        with self.assertRaises(MalformedReply):  # a remembered line does not hide a code change
            p.feed(b"251-a\r\n250 2.1.0 Ok\r\n")

    def test_malformed_replies(self) -> None:
        for bad in (b"hello\r\n", b"25 x\r\n", b"250x\r\n", b"250-a\r\n251 b\r\n", b"650 x\r\n",
                    b"250 " + b"x" * 5000, b"250-" + b"x" * 1000 + b"\r\n"):
            p = ReplyParser()
            with self.assertRaises(MalformedReply, msg=bad[:20]):
                for _ in range(100):
                    p.feed(bad)

    def test_body_encoder_every_split(self) -> None:
        # Every way of cutting the message in two gives the same wire bytes.
        msg = b".a\r\n.\r\n..x\r\nb\r\n.\r\n.c\rd\ne\r\n."
        want = dot_stuff(b".a\r\n.\r\n..x\r\nb\r\n.\r\n.c\r\nd\r\ne\r\n.", True) + b"\r\n.\r\n"
        for i in range(len(msg) + 1):
            enc = BodyEncoder()
            got = enc.feed(msg[:i]) + enc.feed(msg[i:]) + enc.finish()
            self.assertEqual(got, want, i)
        enc = BodyEncoder()
        self.assertEqual(enc.finish(), b".\r\n")


# -- against aiosmtpd --------------------------------------------------------------------


class TransactionTests(TestCase):
    async def test_two_recipients_exact_content(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h))
        self.assertIn("SIZE", conn.extensions)
        self.assertFalse(conn.tls_active)
        self.assertEqual(conn.peer_name, MX_NAME)  # aiosmtpd greets with server_hostname
        result = await conn.send(SENDER, [A, B], MESSAGE, eight_bit=True)
        self.assertEqual([r.code for r in result.recipients.values()], [250, 250])
        self.assertEqual(result.data.code, 250)
        self.assertEqual(result.outcome(B).enhanced, "2.0.0")
        [m] = h.messages
        self.assertEqual((m.sender, m.rcpts, m.content), (SENDER, [A, B], MESSAGE))
        self.assertEqual(m.mail_options, [f"SIZE={len(MESSAGE)}", "BODY=8BITMIME"])
        # Writes go out at once (mx.fasttcp): without TCP_NODELAY the body's write would wait
        # for the ACK of the commands' (a delayed ACK: ~40 ms per message).
        handle = conn._wire.transport.getHandle()
        self.assertIsInstance(conn._wire.transport, DirectWriteClient)
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def test_null_sender_and_missing_final_crlf(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h))
        await conn.send("", [A], b"Subject: x\r\n\r\nno final newline")
        self.assertEqual((h.messages[0].sender, h.messages[0].content),
                         ("<>", b"Subject: x\r\n\r\nno final newline\r\n"))

    async def test_chunk_boundary_smuggling(self) -> None:
        # Research §2.4: a "." line starting exactly at a chunk boundary must be stuffed,
        # or the rest of the body becomes a second, smuggled transaction.
        h = Handler()
        conn = await connect(self, start_mx(self, h))
        path = Path(self.mktemp())
        for split in (False, True):
            msg = boundary_message(split)
            self.assertEqual(msg[CHUNK_SIZE + split : CHUNK_SIZE + split + 3], b".\r\n")
            path.write_bytes(msg)
            for source in (msg, path):
                result = await conn.send(SENDER, [A], source)
                self.assertEqual(result.data.code, 250)
                self.assertEqual((h.messages[-1].rcpts, h.messages[-1].content), ([A], msg))
        self.assertEqual(len(h.messages), 4)
        self.assertEqual(h.mails, [SENDER] * 4)

    async def test_big_message_from_file(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h))
        path = Path(self.mktemp())
        line = b"." + b"z" * 75 + b"\r\n"
        path.write_bytes(b"Subject: big\r\n\r\n" + line * 40_000)  # ~3 MiB
        result = await conn.send(SENDER, [A], path)
        self.assertEqual(result.data.code, 250)
        self.assertEqual(h.messages[0].content, path.read_bytes())

    async def test_mixed_recipient_results(self) -> None:
        for pipelining in (False, True):
            h = Handler()
            h.pipelining = pipelining
            h.rcpt_replies = {B: "450 4.2.1 mailbox busy", C: "550 5.1.1 no such user"}
            conn = await connect(self, start_mx(self, h))
            self.assertEqual("PIPELINING" in conn.extensions, pipelining)
            result = await conn.send(SENDER, [A, B, C], MESSAGE)
            self.assertEqual(list(result.recipients), [A, B, C])
            self.assertEqual([result.outcome(r).code for r in (A, B, C)], [250, 450, 550])
            self.assertEqual(str(result.outcome(C)), "550 5.1.1 no such user")
            self.assertTrue(result.outcome(B).temporary)
            self.assertEqual(result.recipients[A].code, 250)
            self.assertEqual(h.messages[0].rcpts, [A])

    async def test_all_rejected_then_reuse(self) -> None:
        for pipelining in (False, True):
            h = Handler()
            h.pipelining = pipelining
            h.rcpt_replies = {B: "550 5.1.1 no", C: "450 4.2.1 later"}
            conn = await connect(self, start_mx(self, h))
            result = await conn.send(SENDER, [B, C], MESSAGE)
            self.assertIsNone(result.data)
            self.assertEqual([result.outcome(r).code for r in (B, C)], [550, 450])
            result = await conn.send(SENDER, [A], MESSAGE)
            self.assertEqual(result.data.code, 250)
            self.assertEqual([m.rcpts for m in h.messages], [[A]])

    async def test_reuse_for_two_transactions(self) -> None:
        h = Handler()
        h.pipelining = True
        conn = await connect(self, start_mx(self, h))
        await conn.send(SENDER, [A], b"one\r\n")
        await conn.reset()
        await conn.send("t@x.test", [B, C], b"two\r\n")
        self.assertEqual([(m.sender, m.rcpts, m.content) for m in h.messages],
                         [(SENDER, [A], b"one\r\n"), ("t@x.test", [B, C], b"two\r\n")])

    async def test_mail_refused_connection_usable(self) -> None:
        for pipelining in (False, True):
            h = Handler()
            h.pipelining = pipelining
            h.mail_reply = "550 5.7.1 sender blocked"
            conn = await connect(self, start_mx(self, h))
            e = await fails(self, conn.send(SENDER, [A], MESSAGE))
            self.assertEqual((e.stage, e.reply.code, e.reply.enhanced, e.temporary), ("mail", 550, "5.7.1", False))
            h.mail_reply = None
            result = await conn.send(SENDER, [A], MESSAGE)
            self.assertEqual(result.data.code, 250)

    async def test_data_refused(self) -> None:
        h = Handler()
        h.data_reply = "451 4.3.0 try later"
        conn = await connect(self, start_mx(self, h))
        result = await conn.send(SENDER, [A, B], MESSAGE)
        self.assertEqual([result.outcome(r).code for r in (A, B)], [451, 451])
        h.data_reply = "554 5.6.0 no thanks"
        result = await conn.send(SENDER, [A], MESSAGE)
        self.assertTrue(result.outcome(A).permanent)
        h.data_reply = None
        self.assertEqual((await conn.send(SENDER, [A], MESSAGE)).data.code, 250)

    async def test_size_refused_before_mail(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h, data_size_limit=1000))
        self.assertEqual(conn.extensions["SIZE"], "1000")
        e = await fails(self, conn.send(SENDER, [A], b"x" * 70 + b"\r\n" * 30 + b"y\r\n" * 300))
        self.assertEqual((e.stage, e.temporary, e.reply), ("size", False, None))
        self.assertIn("size", str(e))
        self.assertEqual(h.mails, [])
        self.assertEqual((await conn.send(SENDER, [A], MESSAGE)).data.code, 250)

    async def test_smtputf8(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h))
        await conn.send("ü@x.test", ["ö@y.test"], MESSAGE, smtputf8=True)
        self.assertEqual((h.messages[0].sender, h.messages[0].rcpts), ("ü@x.test", ["ö@y.test"]))
        self.assertIn("SMTPUTF8", h.messages[0].mail_options)
        h2 = Handler()
        conn2 = await connect(self, start_mx(self, h2, enable_SMTPUTF8=False))
        e = await fails(self, conn2.send("ü@x.test", [A], MESSAGE, smtputf8=True))
        self.assertEqual((e.stage, e.temporary), ("mail", False))
        self.assertIn("5.6.7", str(e))
        self.assertEqual(h2.mails, [])

    async def test_abort_and_use_after_close(self) -> None:
        conn = await connect(self, start_mx(self, Handler()))
        conn.abort()
        await conn.quit()
        e = await fails(self, conn.send(SENDER, [A], MESSAGE))
        self.assertTrue(e.temporary)


# -- TLS -------------------------------------------------------------------------------------


class TLSTests(TestCase):
    async def test_opportunistic_accepts_untrusted_certificate(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h, tls=True), tls="opportunistic")
        self.assertTrue(conn.tls_active)
        self.assertNotIn("STARTTLS", conn.extensions)  # the post-TLS EHLO
        await conn.send(SENDER, [A], MESSAGE)
        self.assertTrue(h.messages[0].tls)
        self.assertEqual(h.sni, [MX_NAME])

    async def test_required_verified(self) -> None:
        h = Handler()
        trust = Certificate.loadPEM(_ca.cert_pem.bytes())
        conn = await connect(self, start_mx(self, h, tls=True), tls="required", trust_root=trust)
        self.assertTrue(conn.tls_active)
        await conn.send(SENDER, [A], MESSAGE)
        self.assertTrue(h.messages[0].tls)

    async def test_required_wrong_name(self) -> None:
        h = Handler()
        trust = Certificate.loadPEM(_ca.cert_pem.bytes())
        e = await fails(self, connect(self, start_mx(self, h, tls=True), tls="required",
                                      tls_hostname="other.test.example", trust_root=trust))
        self.assertEqual((e.stage, e.temporary), ("tls", True))

    async def test_required_untrusted(self) -> None:
        e = await fails(self, connect(self, start_mx(self, Handler(), tls=True), tls="required"))
        self.assertEqual((e.stage, e.temporary), ("tls", True))

    async def test_required_without_starttls(self) -> None:
        h = Handler()
        e = await fails(self, connect(self, start_mx(self, h), tls="required"))
        self.assertEqual((e.stage, e.temporary), ("starttls", True))
        self.assertIn("TLS required", str(e))
        self.assertEqual(h.mails, [])

    async def test_off_ignores_starttls(self) -> None:
        h = Handler()
        conn = await connect(self, start_mx(self, h, tls=True), tls="off")
        self.assertFalse(conn.tls_active)
        self.assertIn("STARTTLS", conn.extensions)
        await conn.send(SENDER, [A], MESSAGE)
        self.assertFalse(h.messages[0].tls)

    async def test_starttls_response_injection(self) -> None:
        fake, port = await start_fake(
            self, EHLO=b"250-fake.test\r\n250 STARTTLS\r\n",
            STARTTLS=b"220 go ahead\r\n250 injected\r\n")
        e = await fails(self, connect(self, port, tls="opportunistic"))
        self.assertEqual((e.stage, e.temporary), ("starttls", True))
        self.assertEqual(fake.commands, [f"EHLO {HELO}", "STARTTLS"])
        await fake.conns[0].lost


# -- misbehaving servers ------------------------------------------------------------------


class FakeServerTests(TestCase):
    async def test_greeting_554(self) -> None:
        fake, port = await start_fake(self, b"554 5.7.1 go away\r\n", QUIT=b"221 bye\r\n")
        e = await fails(self, connect(self, port))
        self.assertEqual((e.stage, e.reply.code, e.temporary), ("greeting", 554, False))
        self.assertEqual(fake.commands, ["QUIT"])

    async def test_greeting_timeout(self) -> None:
        fake, port = await start_fake(self, None)
        e = await fails(self, connect(self, port, timeouts=Timeouts(greeting=0.3)))
        self.assertEqual((e.stage, e.temporary), ("timeout", True))
        await fake.conns[0].lost

    async def test_data_end_timeout(self) -> None:
        fake, port = await start_fake(self, DATA=b"354 go\r\n")
        fake.data_end_reply = b""  # takes the message, never answers the final dot
        conn = await connect(self, port, timeouts=Timeouts(data_end=0.3))
        e = await fails(self, conn.send(SENDER, [A], MESSAGE))
        self.assertEqual((e.stage, e.temporary), ("timeout", True))
        self.assertEqual(fake.messages, [dot_stuff(MESSAGE)])
        await fake.conns[0].lost

    async def test_connection_refused(self) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        e = await fails(self, connect(self, port))
        self.assertEqual((e.stage, e.temporary), ("connect", True))

    async def test_malformed_and_unsolicited_replies(self) -> None:
        for ehlo in (b"250-fake\r\n251 x\r\n", b"250-" + b"x" * 5000, b"250 ok\r\n250 extra\r\n"):
            fake, port = await start_fake(self, EHLO=ehlo)
            e = await fails(self, connect(self, port))
            self.assertEqual((e.stage, e.temporary), ("ehlo", True))

    async def test_helo_fallback(self) -> None:
        fake, port = await start_fake(self, EHLO=b"502 5.5.1 what\r\n", DATA=b"354 go\r\n")
        conn = await connect(self, port)
        self.assertEqual(conn.extensions, {})
        self.assertEqual(conn.peer_name, "fake.test")  # the greeting's name, not tls_hostname
        await conn.send(SENDER, [A], MESSAGE)
        self.assertEqual(fake.commands[:2], [f"EHLO {HELO}", f"HELO {HELO}"])

    async def test_pipelining_one_write(self) -> None:
        for pipelining in (False, True):
            ehlo = b"250-fake\r\n250 PIPELINING\r\n" if pipelining else b"250 fake\r\n"
            fake, port = await start_fake(self, EHLO=ehlo, DATA=b"354 go\r\n")
            conn = await connect(self, port)
            await conn.send(SENDER, [A, B], MESSAGE)
            envelope = f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{A}>\r\nRCPT TO:<{B}>\r\nDATA\r\n".encode()
            self.assertEqual(envelope in fake.batches, pipelining)
            self.assertEqual(fake.messages, [dot_stuff(MESSAGE)])

    async def test_ipv6_literal(self) -> None:
        try:
            fake, port = await start_fake(self, interface="::1", DATA=b"354 go\r\n")
        except CannotListenError:
            raise SkipTest("no IPv6 loopback")
        conn = await connect(self, port, host="::1", tls_hostname="")
        self.assertEqual(conn.peer_name, "fake.test")  # from the greeting
        await conn.send(SENDER, [A], MESSAGE)
        self.assertEqual(fake.messages, [dot_stuff(MESSAGE)])

    async def test_opportunistic_starttls_refused_goes_on_in_plaintext(self) -> None:
        fake, port = await start_fake(self, EHLO=b"250-fake.test\r\n250 STARTTLS\r\n",
                                      STARTTLS=b"454 4.7.0 not now\r\n", DATA=b"354 go\r\n")
        conn = await connect(self, port, tls="opportunistic")
        self.assertFalse(conn.tls_active)
        await conn.send(SENDER, [A], MESSAGE)
        self.assertEqual(fake.messages, [dot_stuff(MESSAGE)])
