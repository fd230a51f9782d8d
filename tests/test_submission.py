"""Submission: STARTTLS, AUTH PLAIN/LOGIN, the sender policy and the brute-force brakes.

The whole server (`mx.tap.build`) runs in-process with smtp, submission and submissions on
ephemeral loopback ports and a certificate for mx.example.test issued by a throwaway
`trustme` CA; blocking `smtplib`/raw-socket clients run in threads and verify that CA.
The relay's clock is a `task.Clock`, so a queued message stays queued until a test moves it.

The brakes are tested below the socket: `SMTPServerProtocol` on a `StringTransport` with a
`Clock` as the factory clock (so delayed answers are scheduled calls, not sleeps) and a real
`Authenticator` checking argon2 hashes in a real started thread pool.
"""

from __future__ import annotations

import base64
import re
import smtplib
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trustme
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mx.auth import FailureTracker, SASLError, decode_b64, decode_plain
from mx.delivery import Delivery
from mx.routing import Router
from mx.smtpserver import MAX_AUTH_FAILURES, SMTPServerFactory
from tests.support import (
    clocked_authenticator,
    CLIENT_HELO,
    HOSTNAME,
    RawClient,
    _toml,
    add_users,
    client_tls_context,
    common_free_port,
    make_config,
    new_files,
    queue_records,
    service_ports,
    smtp_client,
    smtps_client,
    split_delivered,
    start_mail_service,
    start_remote_mx,
    starttls_client,
    tls_section,
    wrap_raw,
    write_ca_file,
    write_tls_files,
)

T = TypeVar("T")

ALICE, ALICE_PW = "alice@example.test", "alice-Secret-pw-1"
BOB, BOB_PW = "bob@example.test", "bob-pw"
REMOTE = "someone@remote.test"
ALIASES = {
    "postmaster@example.test": [ALICE],
    "sales@example.test": [ALICE, BOB],
    "bobby@example.test": [BOB],
}
LISTEN = {
    "smtp": "tcp:0:interface=127.0.0.1",
    "submission": "tcp:0:interface=127.0.0.1",
    "submissions": "tcp:0:interface=127.0.0.1",
}
WAIT = 20.0

_ca = trustme.CA()


def b64(data: str | bytes) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")


def plain(authcid: str, password: str, authzid: str = "") -> str:
    return b64(f"{authzid}\0{authcid}\0{password}")


def r(pair: tuple[int, bytes]) -> tuple[int, str]:
    return pair[0], pair[1].decode("utf-8", "replace")


def features(s: smtplib.SMTP) -> dict[str, str]:
    return dict(s.esmtp_features)


def message(sender: str, rcpt: str, subject: str = "hello") -> bytes:
    return (
        f"From: Someone Else <ceo@elsewhere.test>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@client.example>\r\n\r\nHello from {sender}.\r\n"
    ).encode()


class SubmissionCase(TestCase):
    timeout = 60

    async def start(self, *, plaintext: list[str] | None = None, relay: dict[str, Any] | None = None,
                    authenticated_header: bool | None = None, **options: Any) -> dict[str, int]:
        """The whole server with all three SMTP listeners; returns their ports.

        `plaintext`: `auth.plaintext_without_tls` (None: the default, loopback allowed).
        """
        folder = Path(self.mktemp()).resolve()
        self.cert, self.key = write_tls_files(folder / "tls", _ca)
        self.cafile = write_ca_file(folder, _ca)
        extra = tls_section(self.cert, self.key)
        auth = {}
        if plaintext is not None:
            auth["plaintext_without_tls"] = plaintext
        if authenticated_header is not None:
            auth["authenticated_header"] = authenticated_header
        if auth:
            extra += "\n[auth]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in auth.items())
        if relay:
            extra += "\n[relay]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in relay.items())
        self.config = make_config(self, listen=LISTEN, aliases=ALIASES, extra=extra, folder=folder)
        add_users(self.config, {ALICE: ALICE_PW, BOB: BOB_PW})
        self.clock = Clock()
        self.clock.advance(time.time())  # queue arrival times are real time
        options.setdefault("clock", self.clock)
        self.mail = await start_mail_service(self, self.config, **options)
        self.ports = service_ports(self.mail)
        return self.ports

    def ctx(self) -> ssl.SSLContext:
        return client_tls_context(self.cafile)

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await deferToThread(fn, *args)

    def submission(self) -> smtplib.SMTP:
        """Connected to submission, after STARTTLS (CA verified) and a second EHLO."""
        return starttls_client(self.ports["submission"], self.ctx())

    def submissions(self) -> smtplib.SMTP:
        return smtps_client(self.ports["submissions"], self.ctx())

    def logged_in(self, port: str = "submission", user: str = ALICE, password: str = ALICE_PW) -> smtplib.SMTP:
        s = self.submission() if port == "submission" else self.submissions()
        code, _ = s.docmd("AUTH", "PLAIN " + plain(user, password))
        assert code == 235, code
        return s

    def assertReply(self, got: tuple[int, str], code: int, enhanced: str | None = None) -> None:
        self.assertEqual(got[0], code, got)
        if enhanced is not None:
            self.assertTrue(got[1].startswith(enhanced + " "), got)


def quit_quietly(s: smtplib.SMTP) -> None:
    try:
        s.quit()
    except (smtplib.SMTPException, OSError):
        s.close()


class TLSClientTests(SubmissionCase):
    async def test_starttls_on_submission_verifies_the_ca(self) -> None:
        await self.start(plaintext=[])

        def client() -> dict[str, Any]:
            s = smtp_client(self.ports["submission"])
            s._host = HOSTNAME
            out: dict[str, Any] = {}
            try:
                s.ehlo()
                out["before"] = features(s)
                out["auth_before"] = r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW)))
                out["starttls"] = r(s.starttls(context=self.ctx()))
                out["cipher"] = s.sock.cipher()
                out["version"] = s.sock.version()
                out["san"] = s.sock.getpeercert()["subjectAltName"]
                s.ehlo()
                out["after"] = features(s)
                out["starttls_again"] = r(s.docmd("STARTTLS"))
                out["login"] = r(s.login(ALICE, ALICE_PW))
                s.sendmail(ALICE, [BOB], message(ALICE, BOB))
            finally:
                quit_quietly(s)
            return out

        out = await self.thread(client)
        self.assertIn("starttls", out["before"])
        self.assertNotIn("auth", out["before"])
        self.assertReply(out["auth_before"], 538, "5.7.11")
        self.assertReply(out["starttls"], 220, "2.0.0")
        self.assertIn(out["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertIn(("DNS", HOSTNAME), out["san"])
        self.assertNotIn("starttls", out["after"])
        self.assertEqual(out["after"]["auth"].split(), ["PLAIN", "LOGIN"])
        for ext in ("pipelining", "8bitmime", "enhancedstatuscodes", "smtputf8", "size"):
            self.assertIn(ext, out["after"])
        self.assertReply(out["starttls_again"], 503, "5.5.1")
        self.assertReply(out["login"], 235, "2.7.0")
        [path] = new_files(self.config, "bob")
        _rp, received, _rest = split_delivered(path.read_bytes())
        self.assertIn(b"with ESMTPSA", received)

    async def test_implicit_tls_on_submissions_verifies_the_ca(self) -> None:
        await self.start(plaintext=[])

        def client() -> dict[str, Any]:
            s = self.submissions()
            try:
                out = {"features": features(s), "version": s.sock.version(),
                       "starttls": r(s.docmd("STARTTLS")), "login": r(s.login(ALICE, ALICE_PW))}
                s.sendmail(ALICE, [BOB], message(ALICE, BOB))
            finally:
                quit_quietly(s)
            return out

        out = await self.thread(client)
        self.assertIn(out["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertNotIn("starttls", out["features"])
        self.assertEqual(out["features"]["auth"].split(), ["PLAIN", "LOGIN"])
        self.assertReply(out["starttls"], 503, "5.5.1")
        self.assertReply(out["login"], 235, "2.7.0")
        [path] = new_files(self.config, "bob")
        self.assertIn(b"with ESMTPSA", split_delivered(path.read_bytes())[1])

    async def test_client_without_the_ca_refuses_the_certificate(self) -> None:
        """Verification is real: a client trusting only the system roots fails the handshake."""
        await self.start()
        system_only = ssl.create_default_context()

        def starttls() -> None:
            starttls_client(self.ports["submission"], system_only).close()

        def implicit() -> None:
            smtps_client(self.ports["submissions"], system_only).close()

        for fn in (starttls, implicit):
            with self.assertRaises(ssl.SSLCertVerificationError):
                await self.thread(fn)

    async def test_wrong_hostname_refused_by_a_checking_client(self) -> None:
        await self.start()

        def client() -> None:
            starttls_client(self.ports["submission"], self.ctx(), server_name="other.example.test").close()

        with self.assertRaises(ssl.SSLCertVerificationError):
            await self.thread(client)

    async def test_auth_offered_before_tls_to_a_plaintext_peer(self) -> None:
        """The default `plaintext_without_tls` holds 127.0.0.0/8: AUTH works without TLS."""
        await self.start()

        def client() -> dict[str, Any]:
            s = smtp_client(self.ports["submission"])
            try:
                s.ehlo()
                return {"features": features(s), "auth": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW))),
                        "mail": r(s.mail(ALICE))}
            finally:
                quit_quietly(s)

        out = await self.thread(client)
        self.assertIn("starttls", out["features"])
        self.assertEqual(out["features"]["auth"].split(), ["PLAIN", "LOGIN"])
        self.assertReply(out["auth"], 235, "2.7.0")
        self.assertReply(out["mail"], 250)

    async def test_smtp_port_offers_starttls_but_never_auth(self) -> None:
        await self.start()  # loopback is a plaintext peer, and still no AUTH on port 25

        def client() -> dict[str, Any]:
            s = smtp_client(self.ports["smtp"])
            s._host = HOSTNAME
            try:
                s.ehlo()
                out: dict[str, Any] = {"before": features(s),
                                       "auth_before": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW)))}
                s.starttls(context=self.ctx())
                s.ehlo()
                out["after"] = features(s)
                out["auth_after"] = r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW)))
                out["auth_login"] = r(s.docmd("AUTH", "LOGIN"))
                out["relay"] = (r(s.mail(ALICE)), r(s.rcpt(REMOTE)))
                s.rset()
                s.sendmail("someone@outside.test", [BOB], message("someone@outside.test", BOB))
                return out
            finally:
                quit_quietly(s)

        out = await self.thread(client)
        self.assertIn("starttls", out["before"])
        self.assertNotIn("auth", out["before"])
        self.assertReply(out["auth_before"], 503, "5.5.1")
        self.assertNotIn("starttls", out["after"])
        self.assertNotIn("auth", out["after"])
        self.assertReply(out["auth_after"], 503, "5.5.1")
        self.assertReply(out["auth_login"], 503, "5.5.1")
        self.assertReply(out["relay"][0], 250)
        self.assertReply(out["relay"][1], 554, "5.7.1")
        [path] = new_files(self.config, "bob")
        _rp, received, _rest = split_delivered(path.read_bytes())
        self.assertIn(b"with ESMTPS ", received)
        self.assertNotIn(b"authenticated", received)

    async def test_starttls_with_an_argument_is_refused(self) -> None:
        await self.start()

        def client() -> tuple[int, str]:
            with RawClient(self.ports["submission"]) as c:
                c.reply()
                c.command(f"EHLO {CLIENT_HELO}")
                got = c.command("STARTTLS now")
                c.command("QUIT")
                return got

        self.assertReply(await self.thread(client), 501, "5.5.4")


class InjectionTests(SubmissionCase):
    """RFC 3207 §4.2 / CVE-2011-0411: commands pipelined behind STARTTLS are discarded."""

    def inject(self, port: int, injected: bytes, after_tls: list[str]) -> dict[str, Any]:
        with RawClient(port) as c:
            out: dict[str, Any] = {"banner": c.reply()}
            c.send(f"EHLO {CLIENT_HELO}\r\n".encode())
            out["ehlo"] = c.reply()
            c.send(b"STARTTLS\r\n" + injected)  # one write
            out["starttls"] = c.reply()
            wrap_raw(c, self.ctx())  # asserts no plaintext reply is waiting
            out["replies"] = [c.command(line) for line in after_tls]
            out["rest"] = self.rest(c)
        return out

    @staticmethod
    def rest(c: RawClient) -> list[tuple[int, str]]:
        """Replies until the server closes (an SSL EOF without close_notify counts as closed)."""
        try:
            return c.until_closed()
        except (ssl.SSLEOFError, ConnectionResetError):
            return []

    async def check(self, service: str, injected: bytes) -> None:
        await self.start()
        after = ["NOOP", "MAIL FROM:<a@example.test>", "HELP", "QUIT"]
        out = await self.thread(self.inject, self.ports[service], injected, after)
        self.assertEqual(out["starttls"][0], 220, out)
        codes = [code for code, _ in out["replies"]]
        # Had the injected command been answered, every reply would be one step behind.
        self.assertEqual(codes, [250, 503, 214, 221], out)
        self.assertEqual(out["replies"][1][1], "5.5.1 Send HELO/EHLO first", out)
        self.assertEqual(out["rest"], [])

    async def test_rset_injected_on_submission(self) -> None:
        await self.check("submission", b"RSET\r\n")

    async def test_mail_injected_on_submission(self) -> None:
        await self.check("submission", b"MAIL FROM:<a@example.test>\r\n")

    async def test_rset_injected_on_smtp(self) -> None:
        await self.check("smtp", b"RSET\r\n")

    async def test_mail_injected_on_smtp(self) -> None:
        await self.check("smtp", b"MAIL FROM:<a@example.test>\r\nRCPT TO:<bob@example.test>\r\n")

    async def test_auth_injected_on_submission_does_not_log_in(self) -> None:
        """An injected AUTH (from a man in the middle) is neither answered nor effective."""
        await self.start(plaintext=["127.0.0.0/8"])
        after = [f"EHLO {CLIENT_HELO}", "MAIL FROM:<alice@example.test>", "QUIT"]
        injected = f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n".encode()
        out = await self.thread(self.inject, self.ports["submission"], injected, after)
        self.assertEqual([code for code, _ in out["replies"]], [250, 530, 221], out)

    async def test_auth_from_before_starttls_is_forgotten(self) -> None:
        """RFC 3207 §4.2: the server discards what it knew before TLS, the AUTH included."""
        await self.start()  # loopback may AUTH in plaintext

        def client() -> dict[str, Any]:
            with RawClient(self.ports["submission"]) as c:
                c.reply()
                c.command(f"EHLO {CLIENT_HELO}")
                out = {"auth": c.command(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"),
                       "mail": c.command(f"MAIL FROM:<{ALICE}>")}
                # STARTTLS in the middle of a transaction is out of sequence: RSET first
                out["starttls_in_mail"] = c.command("STARTTLS")
                c.command("RSET")
                out["starttls"] = c.command("STARTTLS")
                wrap_raw(c, self.ctx())
                out["ehlo"] = c.command(f"EHLO {CLIENT_HELO}")
                out["mail_after"] = c.command(f"MAIL FROM:<{ALICE}>")
                c.command("QUIT")
                return out

        out = await self.thread(client)
        self.assertReply(out["auth"], 235)
        self.assertReply(out["mail"], 250)
        self.assertReply(out["starttls_in_mail"], 503)
        self.assertReply(out["starttls"], 220)
        self.assertReply(out["mail_after"], 530, "5.7.0")



class AuthTests(SubmissionCase):
    def session(self, steps: Callable[[smtplib.SMTP], T], port: str = "submission") -> T:
        s = self.submission() if port == "submission" else self.submissions()
        try:
            return steps(s)
        finally:
            quit_quietly(s)

    async def test_plain_good_and_bad(self) -> None:
        await self.start(plaintext=[])

        def steps(s: smtplib.SMTP) -> dict[str, Any]:
            return {
                "mail_first": r(s.mail(ALICE)),
                "wrong": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, "wrong"))),
                "unknown": r(s.docmd("AUTH", "PLAIN " + plain("nobody@example.test", ALICE_PW))),
                "mail_still": r(s.mail(ALICE)),
                "good": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW))),
                "again": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW))),
                "mail": r(s.mail(ALICE)),
            }

        out = await self.thread(self.session, steps)
        self.assertReply(out["mail_first"], 530, "5.7.0")
        self.assertReply(out["wrong"], 535, "5.7.8")
        self.assertReply(out["unknown"], 535, "5.7.8")
        self.assertEqual(out["wrong"][1], out["unknown"][1])  # no hint which part was wrong
        self.assertReply(out["mail_still"], 530, "5.7.0")
        self.assertReply(out["good"], 235, "2.7.0")
        self.assertReply(out["again"], 503, "5.5.1")
        self.assertReply(out["mail"], 250)

    async def test_plain_with_challenge_and_case_insensitive_user(self) -> None:
        await self.start()

        def steps(s: smtplib.SMTP) -> list[tuple[int, str]]:
            return [r(s.docmd("AUTH", "PLAIN")), r(s.docmd(plain("Alice@Example.TEST", ALICE_PW)))]

        challenge, done = await self.thread(self.session, steps, "submissions")
        self.assertEqual(challenge, (334, ""))
        self.assertReply(done, 235, "2.7.0")

    async def test_plain_authzid(self) -> None:
        await self.start()

        def steps(s: smtplib.SMTP) -> dict[str, Any]:
            return {
                "other": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW, authzid=BOB))),
                "mail": r(s.mail(BOB)),
                "same": r(s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW, authzid=ALICE))),
            }

        out = await self.thread(self.session, steps)
        self.assertIn(out["other"][0], (501, 535), out)  # refused, whichever way
        self.assertReply(out["mail"], 530, "5.7.0")
        self.assertReply(out["same"], 235, "2.7.0")

    async def test_login_good_and_bad(self) -> None:
        await self.start(plaintext=[])

        def steps(s: smtplib.SMTP) -> dict[str, Any]:
            return {
                "start": r(s.docmd("AUTH", "LOGIN")),
                "user": r(s.docmd(b64(ALICE))),
                "bad": r(s.docmd(b64("wrong"))),
                "start2": r(s.docmd("AUTH", "LOGIN")),
                "user2": r(s.docmd(b64(ALICE))),
                "good": r(s.docmd(b64(ALICE_PW))),
                "mail": r(s.mail(ALICE)),
            }

        out = await self.thread(self.session, steps)
        self.assertEqual(out["start"], (334, "VXNlcm5hbWU6"))  # "Username:"
        self.assertEqual(out["user"], (334, "UGFzc3dvcmQ6"))  # "Password:"
        self.assertReply(out["bad"], 535, "5.7.8")
        self.assertReply(out["good"], 235, "2.7.0")
        self.assertReply(out["mail"], 250)

    async def test_login_with_initial_response_through_smtplib(self) -> None:
        """smtplib's own LOGIN, with (`AUTH LOGIN <user>`) and without an initial response."""
        await self.start()

        def attempt(password: str, initial: bool) -> tuple[int, str]:
            s = self.submissions()
            try:
                s.user, s.password = ALICE, password
                try:
                    return r(s.auth("LOGIN", s.auth_login, initial_response_ok=initial))
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code, e.smtp_error.decode()
            finally:
                quit_quietly(s)

        for initial in (True, False):
            self.assertReply(await self.thread(attempt, ALICE_PW, initial), 235, "2.7.0")
            self.assertReply(await self.thread(attempt, "nope", initial), 535, "5.7.8")

    async def test_smtplib_login_method(self) -> None:
        """What a stock client does: `login()` picks a mechanism from the EHLO list."""
        await self.start()

        def client() -> tuple[tuple[int, str], str]:
            s = self.submission()
            try:
                got = r(s.login(ALICE, ALICE_PW))
                try:
                    s2 = self.submissions()
                    s2.login(ALICE, "wrong")
                    return got, "no error"
                except smtplib.SMTPAuthenticationError as e:
                    s2.close()
                    return got, f"{e.smtp_code}"
            finally:
                quit_quietly(s)

        good, bad = await self.thread(client)
        self.assertReply(good, 235)
        self.assertEqual(bad, "535")

    async def test_cancel_and_malformed_responses(self) -> None:
        await self.start()

        def steps(s: smtplib.SMTP) -> dict[str, Any]:
            out = {}
            s.docmd("AUTH", "PLAIN")
            out["plain_cancel"] = r(s.docmd("*"))
            s.docmd("AUTH", "LOGIN")
            out["login_cancel_user"] = r(s.docmd("*"))
            s.docmd("AUTH", "LOGIN")
            s.docmd(b64(ALICE))
            out["login_cancel_password"] = r(s.docmd("*"))
            out["bad_base64"] = r(s.docmd("AUTH", "PLAIN not*base64!"))
            out["no_nuls"] = r(s.docmd("AUTH", "PLAIN " + b64("alice")))
            out["mechanism"] = r(s.docmd("AUTH", "CRAM-MD5"))
            out["mail"] = r(s.mail(ALICE))
            out["noop"] = r(s.noop())  # the session is still in step
            return out

        out = await self.thread(self.session, steps)
        for key in ("plain_cancel", "login_cancel_user", "login_cancel_password"):
            self.assertReply(out[key], 501)
        self.assertReply(out["bad_base64"], 501)
        self.assertReply(out["no_nuls"], 501)
        self.assertReply(out["mechanism"], 504)
        self.assertReply(out["mail"], 530, "5.7.0")
        self.assertReply(out["noop"], 250)

    async def test_passwords_never_logged(self) -> None:
        from twisted.logger import formatEvent, globalLogPublisher

        events: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            events.append(formatEvent(event) + repr(sorted(event.items(), key=lambda kv: kv[0])))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.start()

        def steps(s: smtplib.SMTP) -> list[int]:
            return [s.docmd("AUTH", "PLAIN " + plain(ALICE, "Wrong-Guess-77"))[0],
                    s.docmd("AUTH", "LOGIN " + b64(ALICE))[0], s.docmd(b64("Wrong-Guess-78"))[0],
                    s.docmd("AUTH", "PLAIN " + plain(ALICE, ALICE_PW))[0]]

        self.assertEqual(await self.thread(self.session, steps), [535, 334, 535, 235])
        text = "\n".join(events)
        self.assertIn("authenticated alice@example.test", text)
        for secret in ("Wrong-Guess-77", "Wrong-Guess-78", ALICE_PW, b64("Wrong-Guess-78"), plain(ALICE, ALICE_PW)):
            self.assertNotIn(secret, text)

    async def test_mail_before_auth_on_both_submission_ports(self) -> None:
        await self.start()

        def client(port: str) -> tuple[int, str]:
            s = self.submission() if port == "submission" else self.submissions()
            try:
                return r(s.mail(ALICE))
            finally:
                quit_quietly(s)

        for port in ("submission", "submissions"):
            self.assertReply(await self.thread(client, port), 530, "5.7.0")

    async def test_auth_before_tls_from_a_non_plaintext_peer(self) -> None:
        await self.start(plaintext=["10.0.0.0/8"])  # loopback is not in it

        def client() -> dict[str, Any]:
            with RawClient(self.ports["submission"]) as c:
                c.reply()
                out = {"ehlo": c.command(f"EHLO {CLIENT_HELO}"),
                       "plain": c.command(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"),
                       "login": c.command("AUTH LOGIN"),
                       "mail": c.command(f"MAIL FROM:<{ALICE}>")}
                c.command("QUIT")
                return out

        out = await self.thread(client)
        self.assertNotIn("AUTH", out["ehlo"][1])
        self.assertReply(out["plain"], 538, "5.7.11")
        self.assertReply(out["login"], 538, "5.7.11")
        self.assertReply(out["mail"], 530, "5.7.0")


class SenderPolicyTests(SubmissionCase):
    async def test_sender_ownership(self) -> None:
        await self.start()

        def client() -> dict[str, tuple[int, str]]:
            s = self.logged_in()
            out = {}
            try:
                for sender in (ALICE, "alice+lists@example.test", "ALICE@Example.Test", "postmaster@example.test",
                               "sales@example.test", "", BOB, "bobby@example.test", "alice@remote.test",
                               "alice@other.example.test"):
                    out[sender] = r(s.mail(sender))
                    s.rset()
            finally:
                quit_quietly(s)
            return out

        out = await self.thread(client)
        for ok in (ALICE, "alice+lists@example.test", "ALICE@Example.Test", "postmaster@example.test",
                   "sales@example.test", ""):
            self.assertReply(out[ok], 250, "2.1.0")
        for refused in (BOB, "bobby@example.test", "alice@remote.test", "alice@other.example.test"):
            self.assertReply(out[refused], 553, "5.7.1")

    async def deliver_as_alice(self) -> tuple[bytes, bytes]:
        """ALICE submits to BOB on submissions; (BOB's Received header, the whole file)."""
        body = message(ALICE, BOB, "local")

        def client() -> dict[Any, Any]:
            s = self.logged_in("submissions")
            try:
                return s.sendmail(ALICE, [BOB], body)
            finally:
                quit_quietly(s)

        self.assertEqual(await self.thread(client), {})
        [path] = new_files(self.config, "bob")
        content = path.read_bytes()
        return split_delivered(content)[1], content

    async def test_received_does_not_name_the_login_by_default(self) -> None:
        """Defect D: like Postfix (smtpd_sasl_authenticated_header = no), the login stays private;
        the protocol name still says AUTH was used (RFC 3848)."""
        await self.start()
        received, content = await self.deliver_as_alice()
        self.assertIn(b"with ESMTPSA", received)
        self.assertNotIn(b"authenticated", received)
        self.assertNotIn(ALICE.encode(), received)

    async def test_received_names_the_login_when_configured(self) -> None:
        await self.start(authenticated_header=True)
        received, _content = await self.deliver_as_alice()
        self.assertIn(b"with ESMTPSA", received)
        self.assertIn(f"(authenticated as {ALICE})".encode(), received)

    async def test_local_delivery_names_the_user_not_the_password(self) -> None:
        await self.start(authenticated_header=True)
        body = message(ALICE, BOB, "local")

        def client() -> dict[Any, Any]:
            s = self.logged_in("submissions")
            try:
                return s.sendmail("alice+sent@example.test", [BOB, "bobby@example.test"], body)
            finally:
                quit_quietly(s)

        self.assertEqual(await self.thread(client), {})
        [path] = new_files(self.config, "bob")  # both recipients are bob: one copy
        content = path.read_bytes()
        return_path, received, rest = split_delivered(content)
        self.assertEqual(return_path, b"Return-Path: <alice+sent@example.test>")
        self.assertIn(b"with ESMTPSA", received)
        self.assertIn(ALICE.encode(), received)
        self.assertIn(HOSTNAME.encode(), received)
        self.assertEqual(rest, body)  # the header From: is not rewritten
        for secret in (ALICE_PW.encode(), b64(ALICE_PW).encode(), plain(ALICE, ALICE_PW).encode()):
            self.assertNotIn(secret, content)

    async def test_remote_recipient_is_queued(self) -> None:
        await self.start()

        def client() -> tuple[Any, ...]:
            s = self.logged_in()
            try:
                return r(s.mail(ALICE)), r(s.rcpt(REMOTE)), r(s.data(message(ALICE, REMOTE)))
            finally:
                quit_quietly(s)

        mail, rcpt, data = await self.thread(client)
        self.assertReply(mail, 250)
        self.assertReply(rcpt, 250, "2.1.5")
        self.assertReply(data, 250, "2.0.0")
        queue_id = re.search(r"id=(\w+)", data[1]).group(1)  # type: ignore[union-attr]
        records = queue_records(self.config.data_dir)
        self.assertIn(queue_id, records)
        entry = records[queue_id]
        self.assertEqual(entry.sender, ALICE)
        self.assertEqual([rc.address for rc in entry.recipients], [REMOTE])

    async def test_unauthenticated_relay_refused_on_smtp(self) -> None:
        await self.start()

        def client() -> tuple[Any, ...]:
            s = smtp_client(self.ports["smtp"])
            try:
                s.ehlo()
                return r(s.mail(ALICE)), r(s.rcpt(REMOTE))
            finally:
                quit_quietly(s)

        mail, rcpt = await self.thread(client)
        self.assertReply(mail, 250)
        self.assertReply(rcpt, 554, "5.7.1")
        self.assertEqual(queue_records(self.config.data_dir), {})

    async def test_authenticated_relay_reaches_the_remote_mx(self) -> None:
        port = common_free_port(("127.0.0.1",))
        remote = start_remote_mx(self, "127.0.0.1", port, "smarthost.remote.test")
        await self.start(relay={"smarthost": f"127.0.0.1:{port}", "tls": "off", "retry": ["1m"]})
        body = message(ALICE, REMOTE, "relayed")

        def client() -> dict[Any, Any]:
            s = self.logged_in()
            try:
                return s.sendmail(ALICE, [REMOTE], body)
            finally:
                quit_quietly(s)

        self.assertEqual(await self.thread(client), {})
        self.clock.advance(0)  # the relay's timers run on self.clock
        for _ in range(int(WAIT / 0.05)):
            if remote.messages and not queue_records(self.config.data_dir):
                break
            idle = self.mail.relay.wait_idle()
            idle.addTimeout(WAIT, reactor)
            await idle
            await deferLater(reactor, 0.05, lambda: None)
            self.clock.advance(0)
        [stored] = remote.messages
        self.assertEqual((stored.sender, stored.rcpts), (ALICE, [REMOTE]))
        self.assertIn(b"Subject: relayed", stored.content)
        self.assertIn(b"with ESMTPSA", stored.content)
        self.assertNotIn(ALICE_PW.encode(), stored.content)
        self.assertEqual(queue_records(self.config.data_dir), {})


# --- the brakes, below the socket -------------------------------------------------------


class FailureTrackerTests(TestCase):
    timeout = 10

    def setUp(self) -> None:
        self.now = 1000.0
        self.tracker = FailureTracker(clock=lambda: self.now, window=900.0, free=3, max_delay=15.0, block_after=30)

    def add(self, client: str, times: int) -> None:
        for _ in range(times):
            self.tracker.failed(client)

    def test_no_delay_for_the_first_failures(self) -> None:
        self.assertEqual(self.tracker.delay("192.0.2.1", 0), 0.0)
        self.add("192.0.2.1", 2)
        self.assertEqual(self.tracker.delay("192.0.2.1", 0), 0.0)

    def test_delay_grows_and_is_capped(self) -> None:
        delays = []
        for _ in range(12):
            self.add("192.0.2.1", 1)
            delays.append(self.tracker.delay("192.0.2.1", 0))
        grown = [d for d in delays if d > 0]
        self.assertEqual(grown[:4], [1.0, 2.0, 4.0, 8.0])
        self.assertEqual(max(delays), 15.0)
        self.assertEqual(delays, sorted(delays))

    def test_connection_failures_count_even_when_the_address_is_new(self) -> None:
        self.assertGreater(self.tracker.delay("192.0.2.9", 5), 0.0)

    def test_addresses_are_separate(self) -> None:
        self.add("192.0.2.1", 10)
        self.assertEqual(self.tracker.delay("192.0.2.2", 0), 0.0)
        self.assertFalse(self.tracker.blocked("192.0.2.2"))

    def test_window_expiry(self) -> None:
        self.add("192.0.2.1", 10)
        self.assertGreater(self.tracker.delay("192.0.2.1", 0), 0.0)
        self.now += 899.0
        self.assertGreater(self.tracker.delay("192.0.2.1", 0), 0.0)
        self.now += 2.0
        self.assertEqual(self.tracker.delay("192.0.2.1", 0), 0.0)
        self.assertFalse(self.tracker.blocked("192.0.2.1"))

    def test_old_failures_drop_out_one_by_one(self) -> None:
        self.add("192.0.2.1", 2)
        self.now += 600.0
        self.add("192.0.2.1", 2)  # 4 recent
        self.assertGreater(self.tracker.delay("192.0.2.1", 0), 0.0)
        self.now += 301.0  # the first two expire: 2 recent
        self.assertEqual(self.tracker.delay("192.0.2.1", 0), 0.0)

    def test_block_after_n(self) -> None:
        self.add("192.0.2.1", 29)
        self.assertFalse(self.tracker.blocked("192.0.2.1"))
        self.add("192.0.2.1", 1)
        self.assertTrue(self.tracker.blocked("192.0.2.1"))
        self.now += 901.0
        self.assertFalse(self.tracker.blocked("192.0.2.1"))


class SASLDecodingTests(TestCase):
    def test_plain(self) -> None:
        self.assertEqual(decode_plain(b"\0alice@example.test\0pw"), ("alice@example.test", "pw"))
        self.assertEqual(decode_plain(b"ALICE@example.test\0alice@example.test\0pw"), ("alice@example.test", "pw"))
        for bad in (b"alice\0pw", b"\0\0pw", b"\0alice\0", b"bob\0alice\0pw", b"\0a\xff\0pw", b"a\0b\0c\0d"):
            with self.assertRaises(SASLError, msg=bad):
                decode_plain(bad)

    def test_base64(self) -> None:
        self.assertEqual(decode_b64("="), b"")
        self.assertEqual(decode_b64(b64("hi")), b"hi")
        with self.assertRaises(SASLError):
            decode_b64("%%%")


class ThrottleTests(TestCase):
    """Per-connection and per-address brakes on a StringTransport with a Clock."""

    timeout = 60
    PEER = "192.0.2.7"

    def setUp(self) -> None:
        self.config = make_config(self)
        add_users(self.config, {ALICE: ALICE_PW})
        self.pool, self.clock, users, self.auth = clocked_authenticator(self, self.config)
        self.factory = SMTPServerFactory(
            config=self.config, router=Router(self.config, users.exists),
            delivery=Delivery(self.config, reactor, self.pool), clock=self.clock,
            kind="submissions", implicit_tls=True, authenticator=self.auth,
        )

    def connect(self, ip: str = PEER) -> tuple[Any, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", ip, 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        proto.makeConnection(transport)
        self.addCleanup(lambda: proto.connectionLost(None) if proto._open else None)
        self.assertTrue(transport.value().startswith(b"220 "))
        transport.clear()
        proto.dataReceived(f"EHLO {CLIENT_HELO}\r\n".encode())
        self.assertIn(b"AUTH PLAIN LOGIN", transport.value())
        transport.clear()
        return proto, transport

    def short_timers(self) -> list[Any]:
        """Delayed calls other than the idle timer (minutes away)."""
        now = self.clock.seconds()
        return [c for c in self.clock.getDelayedCalls() if c.getTime() - now <= 60]

    async def outcome(self, transport: StringTransport) -> tuple[bytes, float]:
        """Wait (bounded, real time) for the password check: (what was written, the delay the
        server scheduled before answering; 0 if it answered at once)."""
        for _ in range(int(WAIT / 0.005)):
            if transport.value().endswith(b"\r\n"):
                return transport.value(), 0.0
            timers = self.short_timers()
            if timers:
                self.assertEqual(transport.value(), b"")  # nothing said before the delay
                return b"", round(timers[0].getTime() - self.clock.seconds(), 6)
            await deferLater(reactor, 0.005, lambda: None)
        self.fail("no answer to AUTH")

    async def bad_auth(self, proto: Any, transport: StringTransport) -> tuple[bytes, float]:
        """One wrong password: (the answer, the delay before it)."""
        transport.clear()
        proto.dataReceived(f"AUTH PLAIN {plain(ALICE, 'wrong')}\r\n".encode())
        written, delay = await self.outcome(transport)
        if delay:
            self.clock.advance(delay * 0.99)
            self.assertEqual(transport.value(), b"", "answered before the delay was over")
            self.clock.advance(delay * 0.01 + 0.001)
            written = transport.value()
        transport.clear()
        return written, delay

    async def test_fourth_failure_is_answered_later(self) -> None:
        proto, transport = self.connect()
        delays = []
        for _ in range(4):
            written, delay = await self.bad_auth(proto, transport)
            self.assertTrue(written.startswith(b"535 5.7.8 "), written)
            delays.append(delay)
        self.assertEqual(delays[:2], [0.0, 0.0])
        self.assertGreaterEqual(delays[3], 1.0)

    async def test_first_three_failures_are_answered_at_once(self) -> None:
        """Issue 4: "after 3 failures on a connection, each further attempt is delayed"."""
        proto, transport = self.connect()
        delays = [(await self.bad_auth(proto, transport))[1] for _ in range(3)]
        self.assertEqual(delays, [0.0, 0.0, 0.0])

    async def test_delays_grow_and_tenth_failure_closes(self) -> None:
        proto, transport = self.connect()
        delays = []
        for i in range(1, MAX_AUTH_FAILURES):
            written, delay = await self.bad_auth(proto, transport)
            self.assertTrue(written.startswith(b"535 5.7.8 "), (i, written))
            self.assertFalse(transport.disconnecting)
            delays.append(delay)
        nonzero = [d for d in delays if d]
        self.assertEqual(nonzero, sorted(nonzero))
        self.assertGreater(nonzero[-1], nonzero[0])
        self.assertLessEqual(max(delays), 15.0)
        written, _ = await self.bad_auth(proto, transport)
        self.assertEqual(written.split(b"\r\n")[:2][1][:4], b"421 ", written)
        self.assertTrue(written.startswith(b"535 5.7.8 "), written)
        self.assertTrue(transport.disconnecting)

    async def test_good_password_after_failures_still_works(self) -> None:
        proto, transport = self.connect()
        for _ in range(2):
            await self.bad_auth(proto, transport)
        proto.dataReceived(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n".encode())
        written, delay = await self.outcome(transport)
        self.assertEqual((written[:4], delay), (b"235 ", 0.0))

    async def test_failures_are_counted_across_connections(self) -> None:
        first, t1 = self.connect()
        for _ in range(3):
            await self.bad_auth(first, t1)
        first.dataReceived(b"QUIT\r\n")
        first.connectionLost(None)
        second, t2 = self.connect()  # same address, fresh connection
        _written, delay = await self.bad_auth(second, t2)
        self.assertGreater(delay, 0.0)
        other, t3 = self.connect("198.51.100.1")  # another address is not slowed
        _written, delay = await self.bad_auth(other, t3)
        self.assertEqual(delay, 0.0)

    async def test_blocked_address_is_refused(self) -> None:
        for _ in range(self.auth.failures.block_after):
            self.auth.failures.failed(self.PEER)
        proto, transport = self.connect()
        proto.dataReceived(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n".encode())
        self.assertTrue(transport.value().startswith(b"421 4.7.0 "), transport.value())
        self.assertTrue(transport.disconnecting)
        self.clock.advance(self.auth.failures.window + 1)  # forgotten after the window
        proto2, transport2 = self.connect()
        proto2.dataReceived(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}\r\n".encode())
        written, _ = await self.outcome(transport2)
        self.assertTrue(written.startswith(b"235 "), written)
