"""The relay end to end: the whole server (`mx.tap.build`) in-process, real sockets on loopback.

The world is real: a twisted.names server on 127.0.0.1 serves the test zone (MX hosts at
several preferences, a domain with only an A record, a null MX, NXDOMAIN, SERVFAIL), aiosmtpd
plays the remote MX hosts on 127.0.0.2, 127.0.0.3, ... all on one port (`relay.port`), and
mail enters the queue the real way: smtplib sends it to the server's smtp port, addressed to
an alias that points at remote addresses. The relay's schedule (retries, delay warning,
max_lifetime) runs on a `Clock` started at the current time (queue arrival times are real
time); sockets run on the real reactor. `advance()` moves the clock and waits, bounded, until
no attempt is in flight.

The crash test runs `twistd -n mx` as a child process with the real clock and kills it
with SIGKILL while it drains a backlog into a slow aiosmtpd.
"""

from __future__ import annotations

import email
import email.policy
import random
import re
import time
from email.message import Message
from pathlib import Path
from typing import Any, Callable

import trustme
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.names import dns as tdns
from twisted.trial.unittest import TestCase

from mx.config import Config
from mx.smtpclient import Timeouts
from mx.spool import BOUNCED, DELIVERED, PENDING, QueueEntry
from tests.support import (
    HOSTNAME,
    RemoteHandler,
    ServFail,
    _toml,
    add_users,
    all_new_files,
    common_free_port,
    free_port,
    make_config,
    new_files,
    queue_records,
    run_mx,
    serve_dns,
    smtp_client,
    start_mail_service,
    start_remote_mx,
    start_twistd_smtp,
    write_config,
)

ALICE = "alice@example.test"
FWD = "fwd@example.test"
RCPT = "rcpt@remote.test"

SMART, MX1, MX2, AONLY, TLSMX = "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
LOOPBACKS = (SMART, MX1, MX2, AONLY, TLSMX)
MX1_NAME, MX2_NAME, TLS_NAME = "mx1.remote.test", "mx2.remote.test", "mx.tls.test"

ZONE = [
    ("remote.test", tdns.Record_MX(10, MX1_NAME.encode())),
    ("remote.test", tdns.Record_MX(20, MX2_NAME.encode())),
    (MX1_NAME, tdns.Record_A(MX1)),
    (MX2_NAME, tdns.Record_A(MX2)),
    ("aonly.test", tdns.Record_A(AONLY)),
    ("nullmx.test", tdns.Record_MX(0, b"")),
    ("tls.test", tdns.Record_MX(10, TLS_NAME.encode())),
    (TLS_NAME, tdns.Record_A(TLSMX)),
    # This host is the best MX of loop.test (not one of our domains).
    ("loop.test", tdns.Record_MX(10, HOSTNAME.encode())),
    ("loop.test", tdns.Record_MX(20, MX2_NAME.encode())),
    (HOSTNAME, tdns.Record_A("127.0.0.1")),
]

FAST = Timeouts(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5, data_init=5, data_block=5, data_end=5, quit=2)
WAIT = 20.0  # seconds: the bound on any single wait for the relay

_ca = trustme.CA()
_tls_cert = _ca.issue_cert(TLS_NAME)


def parse(path: Path) -> Message:
    return email.message_from_bytes(path.read_bytes(), policy=email.policy.default)


def report(msg: Message) -> tuple[Message, list[Message]]:
    """The per-message block and the per-recipient blocks of a DSN's delivery-status part."""
    [status] = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list) and len(blocks) >= 2, blocks
    return blocks[0], blocks[1:]


class RelayTestCase(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.dns_port = serve_dns(self, ZONE, servfail=("servfail.test",))
        self.port = common_free_port(LOOPBACKS)  # relay.port: every remote MX listens on it
        self.clock = Clock()
        self.clock.advance(time.time())

    # -- the world -------------------------------------------------------------------------

    def remote(self, host: str = MX1, name: str = MX1_NAME, **kwargs: Any) -> RemoteHandler:
        return start_remote_mx(self, host, self.port, name, **kwargs)

    def make(self, *targets: str, **relay: Any) -> Config:
        """A config whose alias `fwd@example.test` points at `targets` (default rcpt@remote.test)."""
        settings: dict[str, Any] = {"port": self.port, "retry": ["1m", "5m"], **relay}
        extra = "[relay]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
        extra += f'\n[dns]\nnameservers = ["127.0.0.1:{self.dns_port}"]\ntimeout = "1s"\n'
        config = make_config(
            self,
            listen={"smtp": "tcp:0:interface=127.0.0.1"},
            aliases={FWD: list(targets or (RCPT,))},
            extra=extra,
        )
        add_users(config, {ALICE: "alice-pw"})
        return config

    async def start(self, config: Config, **options: Any) -> Any:
        options.setdefault("clock", self.clock)
        options.setdefault("timeouts", FAST)
        options.setdefault("rng", random.Random(5))
        self.mail = await start_mail_service(self, config, **options)
        self.config = config
        return self.mail

    async def send(self, sender: str = ALICE, rcpt: str = FWD, subject: str = "hello") -> str:
        """One message through the server's smtp port; returns its queue id."""
        body = (
            f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@client.example>\r\n\r\nHello there.\r\n"
        ).encode()

        def client() -> tuple[int, bytes]:
            with smtp_client(self.mail.smtp_port) as s:
                s.ehlo()
                assert s.mail(sender)[0] == 250
                assert s.rcpt(rcpt)[0] == 250, "recipient refused"
                reply = s.data(body)
                s.quit()
                return reply

        code, text = await deferToThread(client)
        self.assertEqual(code, 250, text)
        m = re.search(rb"id=([0-9A-Za-z]+)", text)
        assert m is not None, text
        return m.group(1).decode()

    async def advance(self, seconds: float = 0.0) -> None:
        """Move the relay's clock on and wait (bounded) until no attempt is running."""
        self.clock.advance(seconds)
        idle = self.mail.relay.wait_idle()
        idle.addTimeout(WAIT, reactor)
        await idle

    async def advance_until(self, condition: Callable[[], bool], step: float = 60.0, steps: int = 30) -> None:
        for _ in range(steps):
            if condition():
                return
            await self.advance(step)
        self.fail(f"not reached after {steps} steps of {step}s")

    # -- what came out ----------------------------------------------------------------------

    def queued(self) -> dict[str, QueueEntry]:
        return queue_records(self.config.data_dir)

    def notices(self) -> list[Message]:
        """Every DSN in alice's Maildir, oldest first."""
        return [parse(p) for p in new_files(self.config, "alice")]

    def assertQueueEmpty(self) -> None:
        self.assertEqual(self.queued(), {})
        self.assertEqual(self.mail.relay.entries, {})

    def assertDeferred(self, queue_id: str, error: str, attempts: int = 1) -> QueueEntry:
        """Still queued (in memory and on disk) with `attempts` and a last error containing `error`."""
        self.assertIn(queue_id, self.mail.relay.entries)
        entry = self.queued()[queue_id]
        [r] = entry.recipients
        self.assertEqual((r.status, r.attempts), (PENDING, attempts), r)
        self.assertIn(error, r.last_error or "", r)
        self.assertGreater(r.next_attempt, self.clock.seconds())
        return entry

    def assertBounce(self, msg: Message, status: str, action: str = "failed") -> Message:
        """A well-formed DSN to alice; returns its (single) per-recipient block."""
        self.assertEqual(msg["Return-Path"], "<>")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(msg["To"], ALICE)
        per_message, [per_rcpt] = report(msg)
        self.assertEqual(per_message["Reporting-MTA"], f"dns; {HOSTNAME}")
        self.assertEqual(per_rcpt["Action"], action)
        self.assertEqual(per_rcpt["Status"], status)
        return per_rcpt


class RoutingTests(RelayTestCase):
    async def test_preferred_mx_gets_it(self) -> None:
        mx1, mx2 = self.remote(), self.remote(MX2, MX2_NAME)
        await self.start(self.make())
        for i in range(3):
            await self.send(subject=f"message {i}")
        await self.advance()
        self.assertEqual(sorted(m.subject for m in mx1.messages), ["message 0", "message 1", "message 2"])
        self.assertEqual(mx2.mails, [])
        [first] = [m for m in mx1.messages if m.subject == "message 0"]
        self.assertEqual((first.sender, first.rcpts, first.tls), (ALICE, [RCPT], False))
        self.assertTrue(first.content.startswith(b"Received: from "), first.content[:100])
        self.assertIn(b"\r\n\r\nHello there.\r\n", first.content)
        self.assertQueueEmpty()
        self.assertEqual(all_new_files(self.config.data_dir), [])

    async def test_next_mx_when_first_refuses_connections(self) -> None:
        mx2 = self.remote(MX2, MX2_NAME)  # nothing listens on 127.0.0.2
        await self.start(self.make())
        await self.send()
        await self.advance()
        self.assertEqual([(m.host, m.rcpts) for m in mx2.messages], [(MX2, [RCPT])])
        self.assertQueueEmpty()

    async def test_next_mx_when_first_greets_with_4xx(self) -> None:
        mx1, mx2 = self.remote(), self.remote(MX2, MX2_NAME)
        mx1.greeting = "421 4.3.2 mx1.remote.test too busy, try another"
        await self.start(self.make())
        await self.send()
        await self.advance()
        self.assertEqual(mx1.mails, [])
        self.assertEqual([(m.host, m.rcpts) for m in mx2.messages], [(MX2, [RCPT])])
        self.assertQueueEmpty()

    async def test_a_record_when_no_mx(self) -> None:
        aonly = self.remote(AONLY, "aonly.test")
        await self.start(self.make("rcpt@aonly.test"))
        await self.send()
        await self.advance()
        self.assertEqual([(m.host, m.rcpts) for m in aonly.messages], [(AONLY, ["rcpt@aonly.test"])])
        self.assertQueueEmpty()

    async def test_null_mx_bounces_at_once(self) -> None:
        await self.start(self.make("rcpt@nullmx.test"))
        await self.send()
        await self.advance()
        self.assertQueueEmpty()
        [bounce] = self.notices()
        block = self.assertBounce(bounce, "5.1.10")
        self.assertIn("null MX", block["Diagnostic-Code"])

    async def test_nxdomain_bounces(self) -> None:
        await self.start(self.make("rcpt@nx.test"))
        await self.send()
        await self.advance()
        self.assertQueueEmpty()
        [bounce] = self.notices()
        block = self.assertBounce(bounce, "5.1.2")
        self.assertIn("nx.test does not exist", block["Diagnostic-Code"])

    async def test_servfail_defers(self) -> None:
        await self.start(self.make("rcpt@servfail.test"))
        queue_id = await self.send()
        await self.advance()
        self.assertDeferred(queue_id, "SERVFAIL")
        self.assertEqual(self.notices(), [])
        self.flushLoggedErrors(ServFail)  # twisted.names log.err()s the failing authority

    async def test_mx_that_is_this_host_defers(self) -> None:
        mx2 = self.remote(MX2, MX2_NAME)  # a worse MX of loop.test that would take it
        await self.start(self.make("rcpt@loop.test"))
        queue_id = await self.send()
        await self.advance()
        self.assertDeferred(queue_id, "loops back to myself")
        self.assertEqual(mx2.mails, [])
        self.assertEqual(self.notices(), [])

    async def test_smarthost_gets_everything(self) -> None:
        smart, mx1 = self.remote(SMART, "smarthost.test"), self.remote()
        await self.start(self.make(RCPT, "someone@nx.test", smarthost=f"127.0.0.1:{self.port}"))
        await self.send()
        await self.advance()
        self.assertEqual(sorted(r for m in smart.messages for r in m.rcpts), [RCPT, "someone@nx.test"])
        self.assertEqual({m.host for m in smart.messages}, {SMART})
        self.assertEqual(mx1.mails, [])
        self.assertQueueEmpty()
        self.assertEqual(self.notices(), [])


class ConnectionReuseTests(RelayTestCase):
    async def test_reused_connection_closed_by_remote_is_replaced(self) -> None:
        # One connection per destination: the second message is sent over the first one's
        # connection, which the remote has closed meanwhile. That must cost a reconnect,
        # not a deferral.
        await self.start(self.make(), per_destination=1)
        first, second = await self.send(subject="one"), await self.send(subject="two")
        await self.advance()  # no remote yet: both deferred
        self.assertDeferred(first, "refused")
        self.assertDeferred(second, "refused")

        class ClosesAfterEachMessage(RemoteHandler):
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                import asyncio

                reply = await super().handle_DATA(server, session, envelope)
                asyncio.get_running_loop().call_soon(server.transport.close)
                return reply

        mx1 = self.remote(handler=ClosesAfterEachMessage(MX1))
        await self.advance(120)
        self.assertEqual(len(mx1.messages), 2)
        self.assertQueueEmpty()


class OutcomeTests(RelayTestCase):
    async def test_4xx_then_success_after_recovery(self) -> None:
        mx1 = self.remote()
        mx1.rcpt_reply = "451 4.3.0 try again later"
        await self.start(self.make())
        queue_id = await self.send()
        await self.advance()
        entry = self.assertDeferred(queue_id, "451 4.3.0 try again later")
        self.assertEqual(entry.recipients[0].last_code, 451)
        await self.advance(30)  # retry = 1m (plus up to 10% jitter): not yet
        self.assertEqual(self.queued()[queue_id].recipients[0].attempts, 1)
        self.assertEqual(mx1.messages, [])
        mx1.accept_all()
        await self.advance(40)
        self.assertEqual([m.rcpts for m in mx1.messages], [[RCPT]])
        self.assertQueueEmpty()
        self.assertEqual(self.notices(), [])
        await self.advance(3600)
        self.assertEqual(len(mx1.messages), 1)

    async def test_5xx_bounce_content(self) -> None:
        mx1 = self.remote()
        mx1.rcpt_reply = "550 5.1.1 no such user here"
        await self.start(self.make())
        queue_id = await self.send(subject="Quarterly figures")
        await self.advance()
        self.assertQueueEmpty()
        self.assertEqual(mx1.messages, [])
        [bounce] = self.notices()
        self.assertEqual(bounce["From"].addresses[0].addr_spec, f"MAILER-DAEMON@{HOSTNAME}")
        self.assertIn("Undelivered", bounce["Subject"])
        parts = [p.get_content_type() for p in bounce.iter_parts()]
        self.assertEqual(parts, ["text/plain", "message/delivery-status", "text/rfc822-headers"])
        per_message, [block] = report(bounce)
        self.assertEqual(per_message["Reporting-MTA"], f"dns; {HOSTNAME}")
        self.assertEqual(per_message["X-Mx-Queue-ID"], queue_id)
        # RFC 3464 §2.3.2: the address attempted; §2.3.1: the one the sender gave (the alias).
        self.assertEqual(block["Final-Recipient"], f"rfc822; {RCPT}")
        self.assertEqual(block["Original-Recipient"], f"rfc822; {FWD}")
        self.assertEqual(block["Action"], "failed")
        self.assertRegex(block["Status"], r"^5\.\d{1,3}\.\d{1,3}$")
        self.assertEqual(block["Status"], "5.1.1")
        self.assertEqual(block["Remote-MTA"], f"dns; {MX1_NAME}")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 550 5.1.1 no such user here")
        self.assertIsNotNone(block["Last-Attempt-Date"])
        [headers] = [p for p in bounce.walk() if p.get_content_type() == "text/rfc822-headers"]
        original = email.message_from_bytes(headers.get_payload(decode=True), policy=email.policy.default)
        self.assertEqual(original["Subject"], "Quarterly figures")
        self.assertEqual(original["Message-ID"], "<Quarterly.figures@client.example>")
        human = bounce.get_body(("plain",)).get_content()
        self.assertIn("550 5.1.1 no such user here", human)

    async def test_no_bounce_for_null_sender(self) -> None:
        mx1 = self.remote()
        mx1.rcpt_reply = "550 5.1.1 no such user here"
        await self.start(self.make())
        await self.send(sender="")
        await self.advance()
        await self.advance(0)  # a bounce would have been queued (to a remote) or delivered by now
        self.assertQueueEmpty()
        self.assertEqual(all_new_files(self.config.data_dir), [])
        self.assertEqual(mx1.mails, ["<>"])

    async def test_delay_warning_sent_once(self) -> None:
        mx1 = self.remote()
        mx1.rcpt_reply = "451 4.3.0 try again later"
        await self.start(self.make(delay_warning="2m"))
        queue_id = await self.send(subject="slow one")
        await self.advance()
        await self.advance(70)  # the second attempt, about a minute old: no warning yet
        self.assertEqual(self.queued()[queue_id].recipients[0].attempts, 2)
        self.assertEqual(self.notices(), [])
        await self.advance_until(lambda: self.queued()[queue_id].recipients[0].attempts >= 3)
        [warning] = self.notices()  # the first attempt past 2 minutes warns
        self.assertTrue(self.queued()[queue_id].delay_warned)
        await self.advance_until(lambda: self.queued()[queue_id].recipients[0].attempts >= 5)
        self.assertEqual(len(self.notices()), 1)  # later attempts do not warn again
        block = self.assertBounce(warning, "4.3.0", action="delayed")
        self.assertIn("Delayed", warning["Subject"])
        self.assertIn("451 4.3.0 try again later", block["Diagnostic-Code"])
        self.assertIsNotNone(block["Will-Retry-Until"])
        self.assertEqual(mx1.messages, [])

    async def test_max_lifetime_bounce(self) -> None:
        mx1 = self.remote()
        mx1.rcpt_reply = "451 4.3.0 try again later"
        await self.start(self.make(max_lifetime="10m", delay_warning=""))
        queue_id = await self.send()
        arrival = self.queued()[queue_id].arrival
        await self.advance()
        await self.advance_until(lambda: queue_id not in self.mail.relay.entries)
        self.assertGreaterEqual(self.clock.seconds() - arrival, 600)
        self.assertLess(self.clock.seconds() - arrival, 600 + 5 * 60 * 1.1 + 60)
        self.assertQueueEmpty()
        [bounce] = self.notices()
        block = self.assertBounce(bounce, "5.3.0")  # the last 4.3.0, made permanent
        self.assertIn("gave up", block["Diagnostic-Code"])
        self.assertIn("451 4.3.0 try again later", block["Diagnostic-Code"])
        self.assertGreaterEqual(len(mx1.mails), 3)  # 0, ~1m, ~6m, ~11m
        self.assertEqual(mx1.messages, [])

    async def test_two_recipients_one_transaction(self) -> None:
        mx1 = self.remote()
        await self.start(self.make("a@remote.test", "b@remote.test"))
        await self.send()
        await self.advance()
        [message] = mx1.messages
        self.assertEqual(sorted(message.rcpts), ["a@remote.test", "b@remote.test"])
        self.assertEqual(mx1.mails, [ALICE])
        self.assertQueueEmpty()

    async def test_per_recipient_mix(self) -> None:
        ok, later, never = "ok@remote.test", "later@remote.test", "never@remote.test"
        mx1 = self.remote()
        mx1.rcpt_replies = {later: "450 4.2.1 mailbox busy", never: "550 5.1.1 no such user"}
        await self.start(self.make(ok, later, never))
        queue_id = await self.send()
        await self.advance()
        self.assertEqual([m.rcpts for m in mx1.messages], [[ok]])
        self.assertEqual(len(mx1.mails), 1)  # one transaction for all three
        entry = self.queued()[queue_id]
        states = {r.address: (r.status, r.attempts, r.last_code) for r in entry.recipients}
        self.assertEqual(states, {ok: (DELIVERED, 1, 250), later: (PENDING, 1, 450), never: (BOUNCED, 1, 550)})
        [bounce] = self.notices()
        block = self.assertBounce(bounce, "5.1.1")
        self.assertEqual(block["Diagnostic-Code"], "smtp; 550 5.1.1 no such user")
        # the recovered recipient alone is retried
        mx1.rcpt_replies = {}
        await self.advance(70)
        self.assertEqual([m.rcpts for m in mx1.messages], [[ok], [later]])
        self.assertQueueEmpty()
        self.assertEqual(len(self.notices()), 1)


class RestartTests(RelayTestCase):
    async def test_queue_survives_restart(self) -> None:
        config = self.make()
        first = await self.start(config)
        queue_id = await self.send()
        await self.advance()  # both MX hosts refuse connections
        self.assertDeferred(queue_id, "refused")
        await first.stopService()

        mx1 = self.remote()
        self.clock = Clock()
        self.clock.advance(time.time())
        await self.start(config)
        self.assertIn(queue_id, self.mail.relay.entries)
        self.assertEqual(mx1.mails, [])  # not before its retry time
        await self.advance(120)
        self.assertEqual([(m.subject, m.rcpts) for m in mx1.messages], [("hello", [RCPT])])
        self.assertQueueEmpty()
        await self.advance(3600)
        self.assertEqual(len(mx1.messages), 1)


class TLSTests(RelayTestCase):
    async def test_required_tls_refuses_remote_without_starttls(self) -> None:
        plain = self.remote(TLSMX, TLS_NAME)
        await self.start(self.make("rcpt@tls.test", tls="required"))
        queue_id = await self.send()
        await self.advance()
        self.assertDeferred(queue_id, "TLS")
        self.assertEqual(plain.mails, [])

    async def test_required_tls_with_valid_certificate(self) -> None:
        remote = self.remote(TLSMX, TLS_NAME, tls_cert=_tls_cert)
        trust = Certificate.loadPEM(_ca.cert_pem.bytes())
        await self.start(self.make("rcpt@tls.test", tls="required"), trust_root=trust)
        await self.send()
        await self.advance()
        self.assertEqual([(m.rcpts, m.tls) for m in remote.messages], [(["rcpt@tls.test"], True)])
        self.assertQueueEmpty()

    async def test_required_tls_refuses_untrusted_certificate(self) -> None:
        remote = self.remote(TLSMX, TLS_NAME, tls_cert=_tls_cert)
        await self.start(self.make("rcpt@tls.test", tls="required"))  # trusts the system CAs only
        queue_id = await self.send()
        await self.advance()
        entry = self.assertDeferred(queue_id, "certificate verify failed")
        self.assertEqual(entry.recipients[0].last_enhanced, "4.7.5")
        self.assertEqual(remote.mails, [])

    async def test_opportunistic_tls_used_when_offered(self) -> None:
        remote = self.remote(TLSMX, TLS_NAME, tls_cert=_tls_cert)  # not trusted: fine here
        await self.start(self.make("rcpt@tls.test"))
        await self.send()
        await self.advance()
        self.assertEqual([(m.rcpts, m.tls) for m in remote.messages], [(["rcpt@tls.test"], True)])
        self.assertQueueEmpty()


class CrashTests(TestCase):
    """SIGKILL of a `twistd -n mx` child while it drains a backlog loses no recipient."""

    timeout = 60
    BACKLOG = 200

    async def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            await deferLater(reactor, 0.02)
        self.fail(f"timed out after {timeout}s waiting for {what}")

    async def test_sigkill_while_delivering_loses_nothing(self) -> None:
        port = common_free_port((MX1,))
        smtp_port = free_port()
        # retry 1h: after the first (refused) attempt nothing moves until `mx queue flush`
        extra = f'[relay]\nsmarthost = "{MX1}:{port}"\nretry = ["1h"]\ntls = "off"\n'
        path = write_config(self, listen={"smtp": f"tcp:{smtp_port}:interface=127.0.0.1"},
                            aliases={FWD: [RCPT]}, extra=extra)
        data_dir = path.parent / "data"
        child = await deferToThread(start_twistd_smtp, self, path, smtp_port)

        def fill() -> None:
            with smtp_client(smtp_port) as s:
                s.ehlo()
                for i in range(self.BACKLOG):
                    body = f"Subject: backlog {i}\r\n\r\nmessage {i}\r\n".encode()
                    s.sendmail("sender@elsewhere.test", [FWD], body)
                s.quit()

        await deferToThread(fill)

        def all_attempted() -> bool:  # nobody listens yet: every first attempt fails
            records = queue_records(data_dir)
            return len(records) == self.BACKLOG and all(
                e.recipients[0].attempts == 1 and e.recipients[0].last_error for e in records.values())

        await self.wait(all_attempted, 20, "every first attempt")

        remote = start_remote_mx(self, MX1, port, MX1_NAME)
        remote.data_delay = 0.03
        flushed = await deferToThread(run_mx, path, "queue", "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        await self.wait(lambda: len(remote.messages) >= self.BACKLOG // 4, 20, "a quarter delivered")
        child.process.kill()  # SIGKILL, in the middle of the drain
        await deferToThread(child.process.wait, 10)
        await deferLater(reactor, 0.3, lambda: None)  # a DATA the remote had whole is counted
        at_kill = len(remote.messages)
        self.assertLess(at_kill, self.BACKLOG, "the drain finished before the kill")
        # Delivered but not yet removed from the queue when mx died: sent again after the
        # restart, so these are exactly the duplicates. (How many depends on how far the
        # removals' commits lagged the deliveries: each connection goes on to its next
        # message while the last one's removal is committed.)
        removed = self.BACKLOG - len(queue_records(data_dir))
        in_doubt = at_kill - removed
        self.assertGreaterEqual(in_doubt, 0, "a message left the queue before the remote had it")

        await deferToThread(start_twistd_smtp, self, path, smtp_port)
        flushed = await deferToThread(run_mx, path, "queue", "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        await self.wait(lambda: queue_records(data_dir) == {}, 30, "the queue to drain")

        subjects = [m.subject for m in remote.messages]
        self.assertEqual(set(subjects), {f"backlog {i}" for i in range(self.BACKLOG)})
        duplicates = len(subjects) - len(set(subjects))
        self.assertEqual(duplicates, in_doubt, f"{duplicates} duplicates, {in_doubt} in doubt at the kill")
        self.assertTrue(all(m.rcpts == [RCPT] for m in remote.messages))
