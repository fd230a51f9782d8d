"""Tests of `mx.dsn`: RFC 3464 failure and delay notices, parsed back with the stdlib `email`.

Every notice is read by an independent parser (`email.message_from_bytes` with the default
policy) and checked field by field; two fixed notices are compared byte for byte with golden
files in `tests/data/dsn/` (regenerate with `MX_REGEN_GOLDEN=1`).
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mx import dsn
from mx.dsn import Notice, RecipientStatus, delay_notice, failure_notice, original_headers

GOLDEN = Path(__file__).resolve().parent / "data" / "dsn"
HOST = "mx.example.test"
SENDER = "alice@example.test"
ARRIVAL = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000
NOW = ARRIVAL + 4 * 3600
HEADERS = (
    b"Received: from client.example ([192.0.2.1]) by mx.example.test; "
    b"Tue, 14 Nov 2023 22:13:20 +0000\r\n"
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@x.test>\r\n"
    b"Subject: lunch\r\n"
    b" tomorrow?\r\n"
    b"Message-ID: <1@example.test>\r\n"
)
ORIGINAL = HEADERS + b"\r\nSee you at noon.\r\n"
BOB = RecipientStatus(
    recipient="bob@x.test",
    action="failed",
    status="5.1.1",
    diagnostic="550 5.1.1 <bob@x.test>: no such user",
    remote_mta="mx1.x.test",
    last_attempt=NOW - 60,
)
CAROL_DELAYED = RecipientStatus(
    recipient="carol@x.test",
    action="delayed",
    status="4.4.1",
    diagnostic="451 4.4.1 try again later",
    remote_mta="mx2.x.test",
    last_attempt=NOW - 60,
    will_retry_until=ARRIVAL + 5 * 86400,
)


def make(kind: str = "failed", **overrides: Any) -> Notice:
    args: dict[str, Any] = dict(
        reporting_mta=HOST,
        original_sender=SENDER,
        recipients=[BOB] if kind == "failed" else [CAROL_DELAYED],
        original=ORIGINAL,
        queue_id="Q1234",
        arrival=ARRIVAL,
        now=NOW,
        postmaster="postmaster@example.test",
    )
    args.update(overrides)
    return (failure_notice if kind == "failed" else delay_notice)(**args)


def parse(notice: Notice) -> EmailMessage:
    msg = email.message_from_bytes(notice.message, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def report_blocks(msg: EmailMessage) -> list[Message]:
    """The delivery-status part's header blocks: per-message first, then one per recipient."""
    status = list(msg.iter_parts())[1]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks


class StructureTests(SynchronousTestCase):
    def test_top_headers(self) -> None:
        notice = make()
        msg = parse(notice)
        self.assertEqual(msg["From"], f"Mail Delivery System <MAILER-DAEMON@{HOST}>")
        self.assertEqual(msg["To"], SENDER)
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Date"], "Wed, 15 Nov 2023 02:13:20 +0000")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["MIME-Version"], "1.0")
        self.assertRegex(str(msg["Message-ID"]), r"\A<[^<>@\s]+@mx\.example\.test>\Z")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertTrue(msg.get_boundary())
        self.assertEqual(msg.defects, [])
        self.assertEqual((notice.sender, notice.recipient), ("", SENDER))

    def test_three_parts_in_order(self) -> None:
        parts = list(parse(make()).iter_parts())
        self.assertEqual(
            [p.get_content_type() for p in parts],
            ["text/plain", "message/delivery-status", "text/rfc822-headers"],
        )
        self.assertEqual(parts[0].get_content_charset(), "utf-8")

    def test_delivery_status_fields(self) -> None:
        blocks = report_blocks(parse(make()))
        self.assertEqual(len(blocks), 2)
        per_message, bob = blocks
        self.assertEqual(per_message["Reporting-MTA"], f"dns; {HOST}")
        self.assertEqual(per_message["X-Mx-Queue-ID"], "Q1234")
        self.assertEqual(per_message["Arrival-Date"], "Tue, 14 Nov 2023 22:13:20 +0000")
        self.assertIsNone(per_message["Original-Envelope-Id"])
        self.assertEqual(bob["Final-Recipient"], "rfc822; bob@x.test")
        self.assertIsNone(bob["Original-Recipient"])
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx1.x.test")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 <bob@x.test>: no such user")
        self.assertEqual(bob["Last-Attempt-Date"], "Wed, 15 Nov 2023 02:12:20 +0000")
        self.assertIsNone(bob["Will-Retry-Until"])

    def test_optional_fields_omitted(self) -> None:
        bare = RecipientStatus("bob@x.test", "failed", "5.4.4")
        bob = report_blocks(parse(make(recipients=[bare])))[1]
        for name in ("Remote-MTA", "Diagnostic-Code", "Last-Attempt-Date", "Will-Retry-Until"):
            self.assertIsNone(bob[name], name)

    def test_non_smtp_diagnostic_gets_own_type(self) -> None:
        r = RecipientStatus("bob@x.test", "failed", "4.4.1", "connect to mx1.x.test: refused")
        bob = report_blocks(parse(make(recipients=[r])))[1]
        self.assertEqual(bob["Diagnostic-Code"], "X-Mx; connect to mx1.x.test: refused")

    def test_rfc822_headers_part_is_original_header_block(self) -> None:
        part = list(parse(make()).iter_parts())[2]
        self.assertEqual(part.get_payload(decode=True), HEADERS)

    def test_human_part(self) -> None:
        text = list(parse(make()).iter_parts())[0].get_content()
        self.assertIn("<bob@x.test>: host mx1.x.test said: 550 5.1.1", text)
        self.assertIn("postmaster@example.test", text)
        self.assertIn("automatically generated", text)

    def test_delay_notice(self) -> None:
        msg = parse(make("delayed"))
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        carol = report_blocks(msg)[1]
        self.assertEqual(carol["Action"], "delayed")
        self.assertEqual(carol["Status"], "4.4.1")
        self.assertEqual(carol["Will-Retry-Until"], "Sun, 19 Nov 2023 22:13:20 +0000")
        text = list(msg.iter_parts())[0].get_content()
        self.assertIn("will keep trying until Sun, 19 Nov 2023 22:13:20 +0000", text)
        self.assertIn("4.0 hours", text)

    def test_two_recipients_two_blocks(self) -> None:
        dave = RecipientStatus("dave@y.test", "failed", "5.2.2", "552 5.2.2 mailbox full")
        blocks = report_blocks(parse(make(recipients=[BOB, dave])))
        self.assertEqual(len(blocks), 3)
        self.assertEqual(
            [b["Final-Recipient"] for b in blocks[1:]], ["rfc822; bob@x.test", "rfc822; dave@y.test"]
        )
        self.assertEqual([b["Status"] for b in blocks[1:]], ["5.1.1", "5.2.2"])

    def test_message_id_unique_and_domain(self) -> None:
        a, b = parse(make()), parse(make(message_id_domain="bounce.example.test"))
        self.assertNotEqual(a["Message-ID"], b["Message-ID"])
        self.assertTrue(str(b["Message-ID"]).endswith("@bounce.example.test>"))

    def test_utf8_recipient(self) -> None:
        r = RecipientStatus("jörg@bücher.test", "failed", "5.1.1")
        notice = make(recipients=[r])
        self.assertIn("Final-Recipient: rfc822; jörg@bücher.test\r\n".encode(), notice.message)
        msg = parse(notice)
        self.assertEqual(msg["Content-Transfer-Encoding"], "8bit")
        self.assertEqual(list(msg.iter_parts())[1]["Content-Transfer-Encoding"], "8bit")


class SafetyTests(SynchronousTestCase):
    def assert_wire_clean(self, notice: Notice) -> None:
        body = notice.message
        self.assertTrue(body.endswith(b"\r\n"))
        self.assertNotIn(b"\x00", body)
        self.assertIsNone(re.search(rb"[^\r]\n|\r[^\n]", body), "bare CR or LF")
        for line in body.split(b"\r\n"):
            self.assertLessEqual(len(line), 998)

    def test_header_injection_in_diagnostic(self) -> None:
        evil = RecipientStatus(
            "bob@x.test", "failed", "5.0.0", "550 x\r\nBcc: evil@x.test", remote_mta="h\r\nX: y"
        )
        notice = make(recipients=[evil])
        self.assert_wire_clean(notice)
        self.assertIsNone(re.search(rb"(?m)^(Bcc|X):", notice.message))
        msg = parse(notice)
        self.assertIsNone(msg["Bcc"])
        blocks = report_blocks(msg)
        self.assertEqual([b["Bcc"] for b in blocks], [None, None])
        self.assertEqual(blocks[1]["Diagnostic-Code"], "smtp; 550 x Bcc: evil@x.test")
        self.assertEqual(blocks[1]["Remote-MTA"], "dns; h X: y")

    def test_control_characters_stripped(self) -> None:
        diag = "550 a\x00b\x1b[31mc\u2028d\x85e\tf\rg\nh"
        notice = make(recipients=[RecipientStatus("bob@x.test", "failed", "5.0.0", diag)])
        self.assert_wire_clean(notice)
        for bad in ("\x1b", "\u2028", "\x85"):
            self.assertNotIn(bad.encode(), notice.message)
        bob = report_blocks(parse(notice))[1]
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 a b [31mc d e f g h")

    def test_boundary_in_diagnostic_and_original(self) -> None:
        tokens = iter(["a" * 24, "b" * 24, "c" * 16])
        self.patch(dsn.secrets, "token_hex", lambda n: next(tokens))
        first = "=_mx_dsn_" + "a" * 24
        original = (
            f'Content-Type: multipart/mixed; boundary="{first}"\r\n\r\n--{first}\r\n'
            f"Content-Type: text/plain\r\n\r\nx\r\n--{first}--\r\n"
        ).encode()
        r = RecipientStatus("bob@x.test", "failed", "5.0.0", f"550 --{first}-- oops")
        notice = make(recipients=[r], original=original)
        msg = parse(notice)
        self.assertEqual(msg.get_boundary(), "=_mx_dsn_" + "b" * 24)
        parts = list(msg.iter_parts())
        self.assertEqual(len(parts), 3)
        self.assertEqual(parts[2].get_payload(decode=True), original_headers(original))
        self.assertEqual(msg.defects, [])

    def test_given_boundary_in_content_raises(self) -> None:
        self.assertRaises(ValueError, make, boundary="lunch")
        self.assertRaises(ValueError, make, boundary="has space")

    def test_long_diagnostic_wrapped(self) -> None:
        words = " ".join(f"word{i}" for i in range(600))
        for diag in ("550 " + "x" * 5000, "550 " + words, "550 " + "ü" * 3000):
            with self.subTest(diag=diag[:20]):
                notice = make(recipients=[RecipientStatus("bob@x.test", "failed", "5.0.0", diag)])
                self.assert_wire_clean(notice)
                bob = report_blocks(parse(notice))[1]
                got = str(bob["Diagnostic-Code"]).replace(" ", "")
                self.assertEqual(got, ("smtp; " + diag).replace(" ", ""))

    def test_headers_only_original(self) -> None:
        for original in (b"Subject: a\r\nFrom: b@c.test\r\n", b"Subject: a\r\nFrom: b@c.test"):
            with self.subTest(original=original):
                part = list(parse(make(original=original)).iter_parts())[2]
                self.assertEqual(part.get_payload(decode=True), b"Subject: a\r\nFrom: b@c.test\r\n")

    def test_big_original_headers_capped(self) -> None:
        headers = b"".join(b"Received: from h%05d.example by mx; hop\r\n" % i for i in range(5000))
        original = headers + b"\r\n" + b"x" * 1000 + b"\r\n"
        self.assertGreater(len(original), 200_000)
        block = original_headers(original)
        self.assertLessEqual(len(block), 65536)
        self.assertGreater(len(block), 65536 - 100)
        self.assertTrue(original.startswith(block))
        self.assertTrue(block.endswith(b"\r\n"))
        notice = make(original=original)
        self.assertLess(len(notice.message), 70_000)
        self.assertEqual(list(parse(notice).iter_parts())[2].get_payload(decode=True), block)

    def test_invalid_arguments(self) -> None:
        delayed = CAROL_DELAYED
        cases: list[tuple[str, dict[str, Any]]] = [
            ("failed", {"original_sender": ""}),
            ("failed", {"original_sender": "<>"}),
            ("delayed", {"original_sender": ""}),
            ("failed", {"recipients": []}),
            ("failed", {"recipients": [BOB, delayed]}),
            ("delayed", {"recipients": [BOB]}),
            ("delayed", {"recipients": [RecipientStatus("c@x.test", "delayed", "5.0.0")]}),
            ("failed", {"recipients": [RecipientStatus("c@x.test", "failed", "5.1")]}),
            ("failed", {"recipients": [RecipientStatus("\r\n", "failed", "5.1.1")]}),
        ]
        for kind, overrides in cases:
            with self.subTest(kind=kind, overrides=overrides):
                self.assertRaises(ValueError, make, kind, **overrides)


class OriginalHeadersTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases = [
            (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", b"A: 1\r\nB: 2\r\n"),
            (b"A: 1\nB: 2\n\nbody\n", b"A: 1\r\nB: 2\r\n"),  # bare LF line ends
            (b"A: 1\r\n folded\r\n\r\n", b"A: 1\r\n folded\r\n"),
            (b"A: 1\r\n", b"A: 1\r\n"),
            (b"A: 1", b"A: 1\r\n"),
            (b"\r\nbody only\r\n", b""),
            (b"", b""),
            (b"A: x\x00y\rz\r\n\r\n", b"A: xyz\r\n"),  # NUL and bare CR dropped
            (b"A: \xc3\xa9\r\n\r\n", b"A: \xc3\xa9\r\n"),  # UTF-8 headers kept (RFC 6532)
        ]
        for original, expected in cases:
            with self.subTest(original=original):
                self.assertEqual(original_headers(original), expected)

    def test_limit_cuts_at_line_boundary(self) -> None:
        original = b"A: 1234\r\nB: 5678\r\n\r\n"
        self.assertEqual(original_headers(original, limit=9), b"A: 1234\r\n")
        self.assertEqual(original_headers(original, limit=17), b"A: 1234\r\n")
        self.assertEqual(original_headers(original, limit=18), b"A: 1234\r\nB: 5678\r\n")
        self.assertEqual(original_headers(original, limit=8), b"")

    def test_overlong_line_split_into_continuations(self) -> None:
        block = original_headers(b"X: " + b"y" * 3000 + b"\r\n\r\n")
        lines = block.split(b"\r\n")[:-1]
        self.assertEqual(len(lines), 4)
        self.assertTrue(all(len(line) <= 998 for line in lines))
        self.assertTrue(all(line.startswith(b" ") for line in lines[1:]))


class GoldenTests(SynchronousTestCase):
    """Fixed inputs, fixed boundary and Message-ID: the bytes must not drift unnoticed."""

    def check(self, name: str, notice: Notice) -> None:
        path = GOLDEN / name
        if os.environ.get("MX_REGEN_GOLDEN") == "1":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(notice.message)
        self.assertTrue(path.exists(), f"{path} missing: run with MX_REGEN_GOLDEN=1")
        self.assertEqual(notice.message, path.read_bytes())

    def test_failure_golden(self) -> None:
        dave = RecipientStatus(
            "dave@y.test", "failed", "4.4.1", "connect to mx.y.test[192.0.2.7]:25: timed out",
            last_attempt=NOW - 30,
        )
        notice = make(
            recipients=[BOB, dave], boundary="=_mx_dsn_golden", message_id="<dsn.golden@mx.example.test>"
        )
        self.check("failure.eml", notice)

    def test_delay_golden(self) -> None:
        notice = make(
            "delayed", boundary="=_mx_dsn_golden", message_id="<dsn.golden@mx.example.test>"
        )
        self.check("delay.eml", notice)
