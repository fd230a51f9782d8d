"""Smarthosts that need AUTH: the client against aiosmtpd with `auth_required`, and the relay.

aiosmtpd plays the provider's smarthost: STARTTLS with a trustme certificate and AUTH PLAIN and
LOGIN (one user, one password), or implicit TLS from the first byte as on port 465 (RFC 8314).
Its SMTP class records every AUTH command it receives, so a test can say "the password was
never sent". The relay tests run the whole server in-process (`tests.test_relay`'s set-up:
twisted.names DNS, a `Clock` for the schedule, real sockets on loopback).
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.ssl import Certificate
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mx.config import ConfigError, RelayTLS, load
from mx.relay import Relay
from mx.smtpclient import (
    SMTPClientConnection,
    Stage,
    Timeouts,
    read_password_file,
    smarthost_auth,
)
from tests import test_relay
from tests.support import RemoteHandler, write_config
from tests.test_smtpclient import fails

SMART_NAME = "smtp.provider.test"
HELO = "client.example"
USER, PASSWORD = "relay@example.test", "s3cret pässword"
SENDER, RCPT = "s@x.test", "rcpt@remote.test"
MESSAGE = b"From: s@x.test\r\nTo: rcpt@remote.test\r\nSubject: via smarthost\r\n\r\n.dot\r\nbody\r\n"
FAST = Timeouts(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5, data_init=5, data_block=5, data_end=5, quit=2)

_ca = trustme.CA()
_cert = _ca.issue_cert(SMART_NAME)
TRUST = Certificate.loadPEM(_ca.cert_pem.bytes())


# -- aiosmtpd as the provider's smarthost ----------------------------------------------------


class SmartHandler(RemoteHandler):
    """A `RemoteHandler` that also records AUTH: the commands' mechanisms and who logged in."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.auth_commands: list[str] = []  # mechanism of every AUTH command received
        self.logins: list[tuple[str, str, str]] = []  # (mechanism, user, password) tried
        self.auth_reply: str | None = None  # e.g. "454 4.7.0 try later" instead of checking

    def authenticator(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        user, password = data.login.decode(), data.password.decode()
        self.logins.append((mechanism, user, password))
        if self.auth_reply:
            return AuthResult(success=False, handled=False, message=self.auth_reply)
        return AuthResult(success=(user, password) == (USER, PASSWORD), handled=False, auth_data=data)


class _SmartSMTP(SMTP):
    async def smtp_AUTH(self, arg: str) -> None:
        self.event_handler.auth_commands.append(arg.split(" ")[0].upper() if arg else "")
        await super().smtp_AUTH(arg)


class _SmartController(Controller):
    def factory(self) -> SMTP:
        return _SmartSMTP(self.handler, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        if not self.port:  # port 0: learn the real one before aiosmtpd's own trigger connection
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


def _server_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _cert.configure_cert(ctx)
    return ctx


def start_smarthost(case: TestCase, handler: SmartHandler, *, host: str = "127.0.0.1", port: int = 0,
                    starttls: bool = True, implicit_tls: bool = False, plain_auth: bool = True,
                    auth_in_clear: bool = False) -> int:
    """aiosmtpd requiring AUTH on `host:port` (0: any free port); returns the port.

    `starttls`: offer STARTTLS (AUTH only after it, unless `auth_in_clear`); `implicit_tls`:
    TLS from the first byte instead; `plain_auth=False` offers AUTH LOGIN only.
    """
    kwargs: dict[str, Any] = {
        "auth_required": True,
        "authenticator": handler.authenticator,
        # aiosmtpd only counts STARTTLS as TLS; on implicit TLS (and for the "server offers
        # AUTH in clear" case) it must be told not to insist.
        "auth_require_tls": not (implicit_tls or auth_in_clear),
    }
    if not plain_auth:
        kwargs["auth_exclude_mechanism"] = ["PLAIN"]
    if implicit_tls:
        kwargs["ssl_context"] = _server_context()
    elif starttls:
        kwargs["tls_context"] = _server_context()
    aiosmtpd_log = logging.getLogger("mail.log")  # it logs failed sessions with tracebacks
    level = aiosmtpd_log.level
    aiosmtpd_log.setLevel(logging.CRITICAL)
    case.addCleanup(aiosmtpd_log.setLevel, level)
    controller = _SmartController(handler, hostname=host, port=port, server_hostname=SMART_NAME,
                                  ready_timeout=10, **kwargs)
    controller.start()
    case.addCleanup(controller.stop)
    return controller.port


def write_password_file(folder: Path, password: str = PASSWORD, mode: int = 0o600, name: str = "smarthost.pw") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(password + "\n", encoding="utf-8")
    os.chmod(path, mode)
    return path


class _Events:
    """Every log event while active, formatted, so a test can look for a leaked password."""

    def __init__(self, case: TestCase) -> None:
        self.texts: list[str] = []
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        self.texts.append(f"{formatEvent(event)} {event!r}")


async def connect(case: TestCase, port: int, *, tls: str = "opportunistic", auth: Any = (USER, PASSWORD),
                  **kwargs: Any) -> SMTPClientConnection:
    conn = await SMTPClientConnection.connect(reactor, "127.0.0.1", port, helo=HELO, tls=tls,
                                              tls_hostname=SMART_NAME, timeouts=FAST, auth=auth, **kwargs)
    case.addCleanup(lambda: Deferred.fromCoroutine(conn.quit()))
    return conn


# -- the client -------------------------------------------------------------------------------


class ClientAuthTests(TestCase):
    async def test_auth_plain_after_starttls(self) -> None:
        h = SmartHandler()
        events = _Events(self)
        conn = await connect(self, start_smarthost(self, h))
        self.assertTrue(conn.tls_active)
        result = await conn.send(SENDER, [RCPT], MESSAGE)
        self.assertEqual(result.data.code, 250)
        self.assertEqual(h.auth_commands, ["PLAIN"])
        self.assertEqual(h.logins, [("PLAIN", USER, PASSWORD)])
        [m] = h.messages
        self.assertEqual((m.sender, m.rcpts, m.content, m.tls), (SENDER, [RCPT], MESSAGE, True))
        self.assertTrue(any("authenticated to" in t for t in events.texts))
        self.assertFalse([t for t in events.texts if PASSWORD in t])

    async def test_auth_with_required_tls_verifies_the_certificate(self) -> None:
        h = SmartHandler()
        port = start_smarthost(self, h)
        conn = await connect(self, port, tls="required", trust_root=TRUST)
        self.assertTrue(conn.tls_active)
        await conn.send(SENDER, [RCPT], MESSAGE)
        self.assertEqual(len(h.messages), 1)
        # Not trusted: "required" refuses before any AUTH; the others just encrypt.
        h2 = SmartHandler()
        e = await fails(self, connect(self, start_smarthost(self, h2), tls=RelayTLS.REQUIRED))
        self.assertEqual((e.stage, e.temporary), (Stage.TLS, True))
        self.assertEqual(h2.auth_commands, [])

    async def test_credentials_force_tls_even_with_tls_off(self) -> None:
        h = SmartHandler()
        conn = await connect(self, start_smarthost(self, h), tls="off")
        self.assertTrue(conn.tls_active)
        await conn.send(SENDER, [RCPT], MESSAGE)
        self.assertEqual([m.tls for m in h.messages], [True])

    async def test_auth_login_fallback(self) -> None:
        h = SmartHandler()
        conn = await connect(self, start_smarthost(self, h, plain_auth=False))
        await conn.send(SENDER, [RCPT], MESSAGE)
        self.assertEqual(h.auth_commands, ["LOGIN"])
        self.assertEqual(h.logins, [("LOGIN", USER, PASSWORD)])
        self.assertEqual(len(h.messages), 1)

    async def test_wrong_password_is_permanent_at_stage_auth(self) -> None:
        for plain in (True, False):
            h = SmartHandler()
            events = _Events(self)
            e = await fails(self, connect(self, start_smarthost(self, h, plain_auth=plain),
                                          auth=(USER, "wrong password")))
            self.assertEqual((e.stage, e.temporary, e.reply.code, e.reply.enhanced),
                             ("auth", False, 535, "5.7.8"))
            self.assertIn("535 5.7.8 Authentication credentials invalid", str(e))
            self.assertNotIn("wrong password", str(e))
            self.assertFalse([t for t in events.texts if "wrong password" in t])
            self.assertEqual(h.mails, [])

    async def test_temporary_auth_failure_is_temporary(self) -> None:
        h = SmartHandler()
        h.auth_reply = "454 4.7.0 Temporary authentication failure"
        e = await fails(self, connect(self, start_smarthost(self, h)))
        self.assertEqual((e.stage, e.temporary, e.reply.code), (Stage.AUTH, True, 454))

    async def test_no_starttls_password_never_sent(self) -> None:
        # The server even offers AUTH in clear: we still refuse to use it.
        h = SmartHandler()
        events = _Events(self)
        e = await fails(self, connect(self, start_smarthost(self, h, starttls=False, auth_in_clear=True)))
        self.assertEqual((e.stage, e.temporary), (Stage.STARTTLS, True))
        self.assertIn("TLS required", str(e))
        self.assertEqual((h.auth_commands, h.logins, h.mails), ([], [], []))
        self.assertFalse([t for t in events.texts if PASSWORD in t])

    async def test_implicit_tls(self) -> None:
        h = SmartHandler()
        port = start_smarthost(self, h, implicit_tls=True)
        conn = await connect(self, port, tls="required", trust_root=TRUST, implicit_tls=True)
        self.assertTrue(conn.tls_active)
        self.assertNotIn("STARTTLS", conn.extensions)
        self.assertEqual(conn.peer_name, SMART_NAME)
        await conn.send(SENDER, [RCPT], MESSAGE)
        self.assertEqual(h.logins, [("PLAIN", USER, PASSWORD)])
        self.assertEqual([m.content for m in h.messages], [MESSAGE])

    async def test_implicit_tls_untrusted_certificate(self) -> None:
        h = SmartHandler()
        port = start_smarthost(self, h, implicit_tls=True)
        e = await fails(self, connect(self, port, tls="required", implicit_tls=True))
        self.assertEqual((e.stage, e.temporary), (Stage.TLS, True))
        self.assertEqual(h.auth_commands, [])
        # Opportunistic: encrypted all the same, without verification.
        conn = await connect(self, port, implicit_tls=True)
        self.assertTrue(conn.tls_active)

    async def test_bad_arguments(self) -> None:
        for auth in (("", PASSWORD), (USER, ""), (USER, "a\0b")):
            with self.assertRaises(ValueError):
                await SMTPClientConnection.connect(reactor, "127.0.0.1", 1, helo=HELO, tls="opportunistic",
                                                   tls_hostname=SMART_NAME, auth=auth)


class BodySourceTests(TestCase):
    async def test_asynchronous_chunks_across_dot_boundaries(self) -> None:
        # Chunks that arrive later, on other reactor turns, split right before a ".", inside
        # a CRLF before a ".", and in the middle of a would-be end marker.
        h = SmartHandler()
        conn = await connect(self, start_smarthost(self, h))
        chunks = [b"Subject: chunks\r\n\r\nline one\r\n", b".\r\nMAIL FROM:<evil@x.test>\r", b"\n.",
                  b"dot\r\n.", b"\r\n", b"x" * 900, b"\r\n\r", b"\n.\r\n.\r\n", b"end"]

        class Slow:
            def __init__(self) -> None:
                self.left = list(chunks)

            async def read_chunk(self) -> bytes:
                await deferLater(reactor, 0.001)
                return self.left.pop(0) if self.left else b""

        whole = b"".join(chunks)
        result = await conn.send(SENDER, [RCPT], Slow(), size=len(whole))
        self.assertEqual(result.data.code, 250)
        self.assertEqual([(m.rcpts, m.content) for m in h.messages], [([RCPT], whole + b"\r\n")])
        self.assertEqual(h.mails, [SENDER])
        with self.assertRaises(ValueError):
            await conn.send(SENDER, [RCPT], Slow())  # a BodySource needs size=

    async def test_failing_source_aborts_without_final_dot(self) -> None:
        h = SmartHandler()
        conn = await connect(self, start_smarthost(self, h))

        class DiskOnFire(Exception):
            pass

        class Broken:
            calls = 0

            async def read_chunk(self) -> bytes:
                self.calls += 1
                if self.calls > 1:
                    raise DiskOnFire()
                return b"Subject: half\r\n\r\nfirst part\r\n"

        with self.assertRaises(DiskOnFire):  # the source's own error, unchanged
            await conn.send(SENDER, [RCPT], Broken(), size=100)
        await deferLater(reactor, 0.2)
        self.assertEqual(h.messages, [])  # the half message never got its final dot
        e = await fails(self, conn.send(SENDER, [RCPT], MESSAGE))  # the connection is gone
        self.assertEqual((e.stage, e.temporary), (Stage.CONNECT, True))
        # A Path that cannot be opened: stage "body", nothing sent, the connection kept.
        conn2 = await connect(self, start_smarthost(self, h))
        e = await fails(self, conn2.send(SENDER, [RCPT], Path(self.mktemp())))
        self.assertEqual((e.stage, e.temporary, e.connection_usable), (Stage.BODY, True, True))
        self.assertEqual((await conn2.send(SENDER, [RCPT], MESSAGE)).data.code, 250)


# -- the password file and the config --------------------------------------------------------


class PasswordFileTests(SynchronousTestCase):
    def folder(self) -> Path:
        return Path(self.mktemp()).resolve()

    def test_first_line_without_newline(self) -> None:
        path = write_password_file(self.folder(), "pw with spaces ")
        self.assertEqual(read_password_file(path), "pw with spaces ")
        path.write_bytes(b"crlf-pw\r\nsecond line\n")
        self.assertEqual(read_password_file(path), "crlf-pw")
        path.write_bytes(b"no-newline")
        os.chmod(path, 0o400)
        self.assertEqual(read_password_file(path), "no-newline")

    def test_mode_0644_refused(self) -> None:
        path = write_password_file(self.folder(), mode=0o644)
        with self.assertRaises(ConfigError) as caught:
            read_password_file(path)
        message = str(caught.exception)
        self.assertEqual(message, f"relay.smarthost_password_file: {path} may be read by group or others "
                                  "(mode 0644); make it 0600 (chmod 600)")
        self.assertNotIn(PASSWORD, message)
        for mode in (0o640, 0o604, 0o620):
            os.chmod(path, mode)
            self.assertRaises(ConfigError, read_password_file, path)

    def test_missing_and_empty(self) -> None:
        folder = self.folder()
        with self.assertRaises(ConfigError) as caught:
            read_password_file(folder / "absent.pw")
        self.assertTrue(str(caught.exception).startswith("relay.smarthost_password_file: cannot read "))
        path = write_password_file(folder, "")
        self.assertRaises(ConfigError, read_password_file, path)

    def test_smarthost_auth_from_config(self) -> None:
        path = write_config(self, extra='[relay]\nsmarthost = "smtp.provider.test:587"\n'
                                         f'smarthost_user = "{USER}"\nsmarthost_password_file = "smarthost.pw"\n')
        config = load(path)
        self.assertEqual(config.relay.smarthost_password_file, path.parent / "smarthost.pw")
        self.assertRaises(ConfigError, smarthost_auth, config.relay)  # not there yet
        write_password_file(path.parent)
        self.assertEqual(smarthost_auth(config.relay), (USER, PASSWORD))
        self.assertIsNone(smarthost_auth(load(write_config(self)).relay))

    def test_config_errors(self) -> None:
        for extra, expected in [
            ('[relay]\nsmarthost = "smtp.provider.test"\nsmarthost_user = "u"\n',
             "relay.smarthost_password_file: required when relay.smarthost_user is set"),
            ('[relay]\nsmarthost = "smtp.provider.test"\nsmarthost_password_file = "pw"\n',
             "relay.smarthost_user: required when relay.smarthost_password_file is set"),
            ('[relay]\nsmarthost_user = "u"\nsmarthost_password_file = "pw"\n',
             "relay.smarthost_user: credentials need relay.smarthost (they are only sent there)"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                load(write_config(self, extra=extra))
            self.assertEqual(str(caught.exception), expected)


# -- the relay ---------------------------------------------------------------------------------


class _FakeConnection:
    peer_name = SMART_NAME


class SmarthostPortTests(TestCase):
    """`Relay._open`: credentials and implicit TLS reach `connect` (465 decides implicit TLS)."""

    async def open_with(self, smarthost: str) -> dict[str, Any]:
        path = write_config(self, extra=f'[relay]\nsmarthost = "{smarthost}"\nsmarthost_user = "{USER}"\n'
                                        'smarthost_password_file = "smarthost.pw"\n')
        write_password_file(path.parent)
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        async def fake_connect(*args: Any, **kwargs: Any) -> _FakeConnection:
            calls.append((args, kwargs))
            return _FakeConnection()

        relay = Relay(load(path), reactor, None, None, None, None, None, connect=fake_connect)  # type: ignore[arg-type]
        await relay._open("remote.test")
        [(args, kwargs)] = calls
        self.assertEqual(args[1:], ("192.0.2.25", int(smarthost.rpartition(":")[2])))
        return kwargs

    async def test_port_465_means_implicit_tls(self) -> None:
        kwargs = await self.open_with("192.0.2.25:465")
        self.assertEqual((kwargs["implicit_tls"], kwargs["auth"]), (True, (USER, PASSWORD)))

    async def test_port_587_means_starttls(self) -> None:
        kwargs = await self.open_with("192.0.2.25:587")
        self.assertEqual((kwargs["implicit_tls"], kwargs["auth"]), (False, (USER, PASSWORD)))


class RelaySmarthostTests(test_relay.RelayTestCase):
    def smarthost(self, **kwargs: Any) -> SmartHandler:
        handler = SmartHandler(test_relay.SMART)
        start_smarthost(self, handler, host=test_relay.SMART, port=self.port, **kwargs)
        return handler

    def make_auth(self, password: str = PASSWORD) -> Any:
        config = self.make(smarthost=f"{test_relay.SMART}:{self.port}", smarthost_user=USER,
                           smarthost_password_file="smarthost.pw")
        assert config.source is not None
        write_password_file(config.source.parent, password)
        return config

    async def test_relayed_through_auth_smarthost(self) -> None:
        smart = self.smarthost()
        await self.start(self.make_auth())
        await self.send(subject="through the provider")
        await self.advance()
        self.assertEqual(smart.logins, [("PLAIN", USER, PASSWORD)])
        self.assertEqual([(m.rcpts, m.subject, m.tls) for m in smart.messages],
                         [([test_relay.RCPT], "through the provider", True)])
        self.assertQueueEmpty()
        self.assertEqual(self.notices(), [])

    async def test_wrong_password_bounces_with_the_servers_reply(self) -> None:
        smart = self.smarthost()
        await self.start(self.make_auth(password="not the password"))
        await self.send()
        await self.advance()
        self.assertEqual(smart.mails, [])
        self.assertQueueEmpty()
        [bounce] = self.notices()
        block = self.assertBounce(bounce, "5.7.8")
        self.assertIn("535", block["Diagnostic-Code"])
        self.assertIn("Authentication credentials invalid", block["Diagnostic-Code"])
        self.assertNotIn(b"not the password", bounce.as_bytes())

    async def test_smarthost_without_starttls_defers_and_never_sees_the_password(self) -> None:
        smart = self.smarthost(starttls=False, auth_in_clear=True)
        await self.start(self.make_auth())
        queue_id = await self.send()
        await self.advance()
        self.assertDeferred(queue_id, "TLS required")
        self.assertEqual((smart.auth_commands, smart.logins, smart.mails), ([], [], []))
        self.assertEqual(self.notices(), [])
