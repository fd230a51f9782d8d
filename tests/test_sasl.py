"""mx.auth's sans-IO SASL exchange, the plaintext policy and the per-connection brakes.

Table-driven: each case is a mechanism, an initial response (or None) and the client's lines,
with the outcome expected after each step. No sockets: the protocols' framing of these
outcomes (SMTP 334/235/501/504) is tested through smtplib in test_submission.
"""

from __future__ import annotations

import base64
import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from mx.auth import (
    LOGIN_PASS,
    LOGIN_USER,
    MAX_AUTH_FAILURES,
    Challenge,
    ConnectionBrake,
    Credentials,
    FailureTracker,
    Mechanism,
    Rejected,
    SASLExchange,
    SASLProblem,
    plaintext_allowed,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


PLAIN_OK = b64("\0alice@example.test\0s3cret")
OK = Credentials("alice@example.test", "s3cret")
MALFORMED, CANCELLED = SASLProblem.MALFORMED, SASLProblem.CANCELLED

# (name, mechanism, initial, [(client line, expected outcome or problem)], first outcome)
CASES: list[tuple[str, str, str | None, object, list[tuple[str, object]]]] = [
    ("plain with initial response", "PLAIN", PLAIN_OK, OK, []),
    ("plain, lower-case mechanism", "plain", PLAIN_OK, OK, []),
    ("plain after an empty challenge", "PLAIN", None, Challenge(""), [(PLAIN_OK, OK)]),
    ("plain with authzid equal to authcid", "PLAIN", b64("ALICE@example.test\0alice@example.test\0s3cret"), OK, []),
    ("plain with another authzid", "PLAIN", b64("bob@example.test\0alice@example.test\0pw"), MALFORMED, []),
    ("plain without NULs", "PLAIN", b64("alice"), MALFORMED, []),
    ("plain, bad base64", "PLAIN", "not*base64!", MALFORMED, []),
    ("plain, '=' is an empty response", "PLAIN", "=", MALFORMED, []),
    ("plain cancelled at the challenge", "PLAIN", None, Challenge(""), [("*", CANCELLED)]),
    ("plain cancelled as initial response", "PLAIN", "*", CANCELLED, []),
    ("login step by step", "LOGIN", None, Challenge(LOGIN_USER),
     [(b64("alice@example.test"), Challenge(LOGIN_PASS)), (b64("s3cret"), OK)]),
    ("login with the user name as initial response", "LOGIN", b64("alice@example.test"), Challenge(LOGIN_PASS),
     [(b64("s3cret"), OK)]),
    ("login cancelled at the user name", "LOGIN", None, Challenge(LOGIN_USER), [("*", CANCELLED)]),
    ("login cancelled at the password", "LOGIN", None, Challenge(LOGIN_USER),
     [(b64("alice@example.test"), Challenge(LOGIN_PASS)), ("*", CANCELLED)]),
    ("login, bad base64 user", "LOGIN", None, Challenge(LOGIN_USER), [("%%%", MALFORMED)]),
    ("login, password not UTF-8", "LOGIN", None, Challenge(LOGIN_USER),
     [(b64("alice@example.test"), Challenge(LOGIN_PASS)), (base64.b64encode(b"\xff").decode(), MALFORMED)]),
    ("unknown mechanism", "CRAM-MD5", None, SASLProblem.UNKNOWN_MECHANISM, []),
    ("unknown mechanism with a response", "SCRAM-SHA-256", "biwsbj1h", SASLProblem.UNKNOWN_MECHANISM, []),
]


class ExchangeTests(SynchronousTestCase):
    def check(self, name: str, got: object, expected: object) -> None:
        if isinstance(expected, SASLProblem):
            self.assertIsInstance(got, Rejected, name)
            self.assertIs(got.problem, expected, name)  # type: ignore[union-attr]
            self.assertTrue(got.text, name)  # type: ignore[union-attr]
        else:
            self.assertEqual(got, expected, name)

    def test_table(self) -> None:
        for name, mechanism, initial, first, steps in CASES:
            sasl = SASLExchange()
            self.check(name, sasl.start(mechanism, initial), first)
            for i, (line, expected) in enumerate(steps):
                self.assertTrue(sasl.waiting, f"{name}: step {i}")
                self.check(f"{name}: step {i}", sasl.step(line), expected)
            self.assertFalse(sasl.waiting, f"{name}: over")
            # After the end, a further line is not part of any exchange.
            self.check(f"{name}: after", sasl.step(PLAIN_OK), SASLProblem.NOT_EXPECTED)

    def test_mechanism_is_an_enum(self) -> None:
        sasl = SASLExchange()
        sasl.start("login")
        self.assertIs(sasl.mechanism, Mechanism.LOGIN)

    def test_cancel_forgets_a_half_done_exchange(self) -> None:
        sasl = SASLExchange()
        sasl.start("LOGIN")
        sasl.step(b64("alice@example.test"))
        sasl.cancel()
        self.assertFalse(sasl.waiting)
        self.check("after cancel", sasl.step(b64("s3cret")), SASLProblem.NOT_EXPECTED)

    def test_restart_after_a_rejection(self) -> None:
        sasl = SASLExchange()
        self.check("bad", sasl.start("PLAIN", "%%%"), MALFORMED)
        self.assertEqual(sasl.start("PLAIN", PLAIN_OK), OK)

    def test_rejections_never_echo_the_response(self) -> None:
        secret = b64("\0alice@example.test\0hunter2") + "!"
        got = SASLExchange().start("PLAIN", secret)
        self.assertIsInstance(got, Rejected)
        self.assertNotIn("hunter2", got.text)  # type: ignore[union-attr]
        self.assertNotIn(secret, got.text)  # type: ignore[union-attr]


class PlaintextPolicyTests(SynchronousTestCase):
    NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"), ipaddress.ip_network("10.1.0.0/16"))

    def test_table(self) -> None:
        for peer, tls, expected in [
            ("127.0.0.1", False, True),
            ("::1", False, True),
            ("::ffff:127.0.0.1", False, True),  # IPv4-mapped counts as IPv4
            ("10.1.2.3", False, True),
            ("10.2.0.1", False, False),
            ("192.0.2.1", False, False),
            ("192.0.2.1", True, True),  # over TLS anyone may
            ("", False, False),
            ("not an address", False, False),
        ]:
            self.assertEqual(plaintext_allowed(peer, tls, self.NETS), expected, (peer, tls))
        self.assertFalse(plaintext_allowed("127.0.0.1", False, ()))


class BrakeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 1000.0
        self.tracker = FailureTracker(clock=lambda: self.now)

    def test_delays_then_close(self) -> None:
        brake = ConnectionBrake(self.tracker, "192.0.2.1")
        verdicts = [brake.failed() for _ in range(MAX_AUTH_FAILURES)]
        self.assertEqual([v.delay for v in verdicts[:3]], [0.0, 0.0, 0.0])
        self.assertEqual([v.close for v in verdicts], [False] * (MAX_AUTH_FAILURES - 1) + [True])
        delays = [v.delay for v in verdicts[3:-1]]
        self.assertEqual(delays, sorted(delays))
        self.assertGreater(delays[0], 0.0)
        self.assertEqual(brake.failures, MAX_AUTH_FAILURES)

    def test_address_history_counts_across_connections(self) -> None:
        for _ in range(3):
            ConnectionBrake(self.tracker, "192.0.2.1").failed()
        self.assertGreater(ConnectionBrake(self.tracker, "192.0.2.1").failed().delay, 0.0)
        self.assertEqual(ConnectionBrake(self.tracker, "192.0.2.2").failed().delay, 0.0)

    def test_blocked(self) -> None:
        brake = ConnectionBrake(self.tracker, "192.0.2.1")
        for _ in range(self.tracker.block_after):
            self.tracker.failed("192.0.2.1")
        self.assertTrue(brake.blocked())
        self.now += self.tracker.window + 1
        self.assertFalse(brake.blocked())
