"""The parts of one queue entry do not race each other.

One message to several remote domains is sent as one transaction per destination, by
different workers at once. Whatever order their answers come in (the remote answers delayed
0, 2 or 200 ms on one side), the sender gets exactly one bounce per failed recipient, each
delivered recipient is delivered once, a recipient answered 4xx is retried (and only it),
and when everything is done nothing is left in the queue: in memory, on disk, or in
`mx queue list`.

Plus the neighbours found by the same review: `mx queue delete` during an attempt, a queue
record whose body is missing, and mail accepted while the queue is still being loaded.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread

from mx.spool import PENDING
from tests.support import RemoteHandler, new_files, queue_records, run_mx
from tests.test_relay import (
    AONLY,
    MX1,
    TLS_NAME,
    TLSMX,
    RelayTestCase,
    parse,
    report,
)

A, B, C = "a@remote.test", "b@aonly.test", "c@tls.test"


class DelayedHandler(RemoteHandler):
    """A remote MX whose RCPT and DATA answers come `delay` seconds late."""

    delay = 0.0

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


OK, LATER, NEVER = None, "451 4.3.0 try again later", "550 5.1.1 no such user"

# (name, {recipient: its first answer}); each recipient's domain is its own destination.
CASES = [
    ("two: 250 + 550", {A: OK, B: NEVER}),
    ("two: 550 + 451", {A: NEVER, B: LATER}),
    ("two: 550 + 550", {A: NEVER, B: NEVER}),
    ("three: 250 + 451 + 550", {A: OK, B: LATER, C: NEVER}),
    ("three: 550 + 550 + 250", {A: NEVER, B: NEVER, C: OK}),
    ("three: 451 + 250 + 451", {A: LATER, B: OK, C: LATER}),
]


class PartsTests(RelayTestCase):
    timeout = 120

    async def run_cases(self, delay: float) -> None:
        handlers = {
            A: self.remote(handler=DelayedHandler(MX1)),
            B: self.remote(AONLY, "aonly.test", handler=DelayedHandler(AONLY)),
            C: self.remote(TLSMX, TLS_NAME, handler=DelayedHandler(TLSMX)),
        }
        await self.start(self.make(A, B, C))
        for slow in (A, B, C):  # which destination answers late
            for name, answers in CASES:
                if slow not in answers:
                    continue
                await self.one_case(f"{name} / {slow} slow / {delay}", answers, handlers, slow, delay)

    async def one_case(self, subject: str, answers: dict[str, str | None], handlers: dict[str, DelayedHandler],
                       slow: str, delay: float) -> None:
        for rcpt, handler in handlers.items():
            handler.accept_all()
            handler.delay = delay if rcpt == slow else 0.0
            handler.rcpt_replies = {rcpt: answers[rcpt]} if answers.get(rcpt) else {}
        # The alias fans out to all three; recipients outside this case are refused for good
        # by their MX up front, so they bounce too (counted below like the others).
        for rcpt in handlers:
            if rcpt not in answers:
                handlers[rcpt].rcpt_replies = {rcpt: NEVER}
        full = {r: answers.get(r, NEVER) for r in handlers}
        before = set(new_files(self.config, "alice"))
        queue_id = await self.send(subject=subject)
        await self.advance()
        await self.advance(0)
        failed = sorted(r for r, a in full.items() if a == NEVER)
        later = sorted(r for r, a in full.items() if a == LATER)
        # Exactly one bounce per failed recipient (one notice per attempt that failed some).
        new = self.new_notices(before)
        bounced = sorted(block["Final-Recipient"].removeprefix("rfc822; ") for msg in new for block in report(msg)[1])
        self.assertEqual(bounced, failed, subject)
        self.assertEqual(len(new), 1 if failed else 0, subject)
        # Each delivered recipient delivered once.
        self.assertEqual(self.deliveries(handlers, subject), Counter(r for r, a in full.items() if a is OK), subject)
        if later:
            entry = self.queued()[queue_id]
            states = {r.address: r.status for r in entry.recipients}
            self.assertEqual(sorted(a for a, s in states.items() if s == PENDING), later, subject)
            self.assertEqual(self.mail.relay.entries[queue_id].recipients, entry.recipients)
            for rcpt in later:
                handlers[rcpt].rcpt_replies = {}
            await self.advance_until(lambda: queue_id not in self.mail.relay.entries, step=70)
            expected = Counter(r for r, a in full.items() if a is not NEVER)
            self.assertEqual(self.deliveries(handlers, subject), expected, subject)
            self.assertEqual(len(self.new_notices(before)), 1 if failed else 0, subject)
        self.assertNotIn(queue_id, self.mail.relay.entries, subject)
        self.assertNotIn(queue_id, queue_records(self.config.data_dir), subject)

    def new_notices(self, before: set[Path]) -> list[Any]:
        return [parse(p) for p in new_files(self.config, "alice") if p not in before]

    def deliveries(self, handlers: dict[str, DelayedHandler], subject: str) -> Counter[str]:
        return Counter(r for h in handlers.values() for m in h.messages if m.subject == subject for r in m.rcpts)

    async def finish(self) -> None:
        self.assertQueueEmpty()
        listed = await deferToThread(run_mx, self.config.source, "queue", "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        self.assertEqual(json.loads(listed.stdout), [])

    async def test_answers_at_once(self) -> None:
        await self.run_cases(0.0)
        await self.finish()

    async def test_one_answer_2ms_late(self) -> None:
        await self.run_cases(0.002)
        await self.finish()

    async def test_one_answer_200ms_late(self) -> None:
        await self.run_cases(0.2)
        await self.finish()


class OperatorDeleteTests(RelayTestCase):
    async def test_delete_during_an_attempt_stays_deleted(self) -> None:
        # The remote sits on the message; the operator deletes it meanwhile. When the
        # remote answers 4xx, the relay must not write the entry back, on disk or in memory.
        slow = DelayedHandler(MX1)
        slow.delay = 0.3
        slow.rcpt_reply = LATER
        self.remote(handler=slow)
        await self.start(self.make(A))
        queue_id = await self.send()
        self.clock.advance(0)  # the attempt starts (intent recorded), the remote is slow
        for _ in range(100):
            if slow.mails:
                break
            await asyncio_sleep(0.01)
        self.assertTrue(await self.mail.relay.delete(queue_id))
        await self.advance()
        await self.advance(3600)
        self.assertQueueEmpty()
        self.assertEqual(len(slow.mails), 1)


def asyncio_sleep(seconds: float) -> Any:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds)


class BodiesAheadTests(RelayTestCase):
    async def test_backlog_bodies_read_ahead_exact_and_one_missing(self) -> None:
        # One connection drains a backlog: the first trip reads the next bodies too. Each is
        # sent whole and to the right transaction; one whose file vanished is still a local
        # 4.3.0 for itself alone; nothing read ahead is left held afterwards.
        mx1 = self.remote()
        mx1.rcpt_reply = LATER
        await self.start(self.make(A, delay_warning=""), per_destination=1)
        ids = [await self.send(subject=f"backlog {i}") for i in range(6)]
        await self.advance()
        self.assertEqual(len(mx1.mails), 6)
        self.mail.spool.body_path(ids[3]).unlink()  # lost under our feet
        mx1.accept_all()
        trips = []
        bodies = self.mail.relay._bodies
        real_open = bodies.open

        async def counting_open(entry_id: str, upcoming: Any) -> Any:
            trips.append((entry_id, entry_id in bodies._held))
            return await real_open(entry_id, upcoming)

        bodies.open = counting_open
        await self.advance(70)
        got = sorted(m.content.split(b"Subject: ")[1].split(b"\r\n")[0].decode() for m in mx1.messages)
        self.assertEqual(got, [f"backlog {i}" for i in range(6) if i != 3])
        for m in mx1.messages:
            self.assertTrue(m.content.endswith(b"\r\n\r\nHello there.\r\n"), m.content[-60:])
        # (How many were ahead depends on how the intents' commits were batched: at least two.)
        self.assertGreaterEqual(sum(held for _id, held in trips), 2, trips)
        self.assertNotIn((ids[3], True), trips)
        entry = self.assertDeferred(ids[3], "queued message file is unreadable", attempts=2)
        self.assertEqual(entry.recipients[0].last_enhanced, "4.3.0")
        self.assertEqual(set(self.mail.relay.entries), {ids[3]})
        self.assertEqual((bodies._held, bodies._octets), ({}, 0))


class BrokenQueueTests(RelayTestCase):
    async def test_missing_body_defers_as_local_error_then_bounces_at_max_lifetime(self) -> None:
        mx1 = self.remote()
        mx1.rcpt_reply = LATER
        await self.start(self.make(A, max_lifetime="10m", delay_warning=""))
        queue_id = await self.send()
        await self.advance()
        self.assertEqual(len(mx1.mails), 1)
        self.mail.spool.body_path(queue_id).unlink()  # lost under our feet
        mx1.accept_all()
        await self.advance(70)
        entry = self.assertDeferred(queue_id, "queued message file is unreadable", attempts=2)
        self.assertEqual(entry.recipients[0].last_enhanced, "4.3.0")
        self.assertEqual(len(mx1.mails), 1, "no transaction without a body")
        for _ in range(100):  # the worker QUITs its connection (bounded wait)
            if self.mail.relay._active == 0:
                break
            await asyncio_sleep(0.02)
        self.assertEqual(self.mail.relay._active, 0, "a connection leaked")
        await self.advance_until(lambda: queue_id not in self.mail.relay.entries)
        self.assertQueueEmpty()
        [bounce] = self.notices()
        block = self.assertBounce(bounce, "5.3.0")
        self.assertIn("unreadable", block["Diagnostic-Code"])
        self.assertEqual(mx1.messages, [])

    async def test_start_up_quarantines_bad_records_and_serves_the_rest(self) -> None:
        from twisted.logger import globalLogPublisher

        mx1 = self.remote()
        config = self.make(A)
        queue = config.data_dir / "queue"
        queue.mkdir(parents=True)
        good = entry_json("GOOD1", A)
        (queue / "GOOD1.json").write_bytes(good)
        (queue / "GOOD1.eml").write_bytes(b"Subject: survivor\r\n\r\nhi\r\n")
        (queue / "CORRUPT1.json").write_bytes(b'{"id": "CORRUPT1", "recipients": [')
        (queue / "CORRUPT1.eml").write_bytes(b"Subject: x\r\n\r\n")
        (queue / "NOBODY1.json").write_bytes(entry_json("NOBODY1", A))
        (queue / "WRONGTYPE1.json").write_bytes(b"[1, 2, 3]")
        listed = await deferToThread(run_mx, config.source, "queue", "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        # One corrupt record does not break `mx queue list`: the others are listed, the
        # broken ones named on stderr.
        self.assertEqual(sorted(r["id"] for r in json.loads(listed.stdout)), ["GOOD1", "NOBODY1"])
        self.assertIn("CORRUPT1", listed.stderr)
        self.assertIn("WRONGTYPE1", listed.stderr)
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start(config)
        await self.advance()
        quarantined = sorted(e["msgid"] for e in events if "quarantined" in e.get("log_format", ""))
        self.assertEqual(quarantined, ["CORRUPT1", "NOBODY1", "WRONGTYPE1"])
        self.assertEqual(sorted(p.name for p in (queue / "quarantine").iterdir()),
                         ["CORRUPT1.eml", "CORRUPT1.json", "NOBODY1.json", "WRONGTYPE1.json"])
        self.assertEqual([m.subject for m in mx1.messages], ["survivor"])
        self.assertQueueEmpty()


def entry_json(queue_id: str, rcpt: str) -> bytes:
    import time as _time

    from mx.spool import QueueEntry, RecipientState

    return QueueEntry(id=queue_id, sender="alice@example.test", arrival=_time.time(),
                      recipients=(RecipientState(rcpt),), size=30).to_json()


class StartUpTests(RelayTestCase):
    async def test_mail_accepted_while_the_queue_loads_is_sent_once(self) -> None:
        # The queue load is slow (a big queue); a message arrives meanwhile. It must not be
        # acknowledged before the load is done, and the load must not bring it back.
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from mx.tap import build

        mx1 = self.remote()
        config = self.make(A)
        mail = build(config, reactor, clock=self.clock, timeouts=FAST_TIMEOUTS(), rng=__import__("random").Random(1))
        original = mail.spool.load_all
        marks: list[str] = []

        def slow_load() -> Any:
            import time as _time

            _time.sleep(0.5)
            result = original()
            marks.append("loaded")
            return result

        mail.spool.load_all = slow_load  # type: ignore[method-assign]
        mail.startService()
        self.addCleanup(mail.stopService)
        from tests.support import listening_port

        self.mail = mail
        self.config = config
        mail.smtp_port = listening_port({s.name: s for s in mail.listeners}["smtp"])
        sending = Deferred_from(self.send(subject="during the load"))
        sending.addCallback(lambda qid: (marks.append("250"), qid)[1])
        queue_id = await sending
        self.assertEqual(marks, ["loaded", "250"])
        for _ in range(50):
            await self.advance()
            if queue_id not in mail.relay.entries:
                break
            await deferLater(reactor, 0.05)
        await self.advance(3600)
        self.assertEqual([m.subject for m in mx1.messages], ["during the load"])
        self.assertQueueEmpty()


def Deferred_from(coro: Any) -> Any:
    from twisted.internet.defer import Deferred

    return Deferred.fromCoroutine(coro)


def FAST_TIMEOUTS() -> Any:
    from tests.test_relay import FAST

    return FAST


class ReportedCaseTests(RelayTestCase):
    async def test_submitted_to_two_domains_550_and_250_gives_one_bounce(self) -> None:
        # The report, as a user saw it: one message submitted (AUTH on the submission port)
        # to two remote domains; one MX answers 550, the other 250. Postfix sends one bounce.
        from tests.support import add_users, make_config, service_ports, smtp_client

        ok, refused = self.remote(handler=DelayedHandler(MX1)), self.remote(AONLY, "aonly.test")
        refused.rcpt_replies = {B: NEVER}
        for delay in (0.0, 0.002, 0.2):
            ok.delay = delay
            extra = f'[relay]\nport = {self.port}\nretry = ["1m"]\n'
            extra += f'\n[dns]\nnameservers = ["127.0.0.1:{self.dns_port}"]\ntimeout = "1s"\n'
            config = make_config(self, listen={"submission": "tcp:0:interface=127.0.0.1"}, extra=extra)
            add_users(config, {"alice@example.test": "alice-pw"})
            mail = await self.start(config)
            port = service_ports(mail)["submission"]

            def submit() -> None:
                with smtp_client(port) as s:
                    s.ehlo()
                    s.login("alice@example.test", "alice-pw")
                    s.sendmail("alice@example.test", [A, B], b"Subject: report\r\n\r\nhello\r\n")

            await deferToThread(submit)
            await self.advance()
            await self.advance(3600)
            bounces = self.notices()
            self.assertEqual(len(bounces), 1, f"delay {delay}")
            self.assertEqual([b["Final-Recipient"] for b in report(bounces[0])[1]], [f"rfc822; {B}"])
            self.assertEqual([m.rcpts for m in ok.messages], [[A]])
            self.assertQueueEmpty()
            await mail.stopService()
            ok.messages.clear()


class ReusedConnectionTests(RelayTestCase):
    async def test_reused_connection_lost_while_mail_is_in_flight_is_replaced(self) -> None:
        # The remote drops a reused connection as our MAIL arrives (no reply to it): that
        # says nothing about the message, which goes on a fresh connection at once.
        class DropsSecondMail(RemoteHandler):
            async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                                  options: list[str]) -> str:
                seen = getattr(session, "mx_mails", 0) + 1
                session.mx_mails = seen
                if seen == 2:
                    server.transport.abort()
                    return "421 4.3.2 gone"  # never reaches the client
                return await super().handle_MAIL(server, session, envelope, address, options)

        await self.start(self.make(A), per_destination=1)
        await self.send(subject="one")
        await self.send(subject="two")
        await self.advance()  # no remote yet: both deferred
        mx1 = self.remote(handler=DropsSecondMail(MX1))
        await self.advance(120)
        self.assertEqual(sorted(m.subject for m in mx1.messages), ["one", "two"])
        self.assertQueueEmpty()
