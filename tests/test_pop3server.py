"""POP3 and POP3S end to end: `poplib` (and a byte-exact raw client) against the whole server.

The server runs in-process (`mx.tap.build`) with smtp, pop3 and pop3s on ephemeral loopback
ports and a certificate for mx.example.test and 127.0.0.1 from a throwaway `trustme` CA.
Mail gets into the Maildirs the real way, through smtplib to the smtp port; the 10 MiB
message is placed into `new/` as another delivery agent would (its chunk boundaries must
fall on exact file offsets). Blocking clients run in threads so the reactor keeps serving.

The brakes and the idle timer are tested below the socket: `POP3ServerProtocol` on a
`StringTransport` with a `Clock` (delays are scheduled calls, not sleeps), a real
`Authenticator` and the real store in real thread pools.
"""

from __future__ import annotations

import base64
import os
import poplib
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
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
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from mx import pop3server
from mx.auth import MAX_AUTH_FAILURES
from mx.listeners import Service
from mx.maildir import unique_name
from mx.pop3server import LOCK_FILE, POP3ServerFactory, open_maildrop
from tests.support import (
    clocked_authenticator,
    HOSTNAME,
    SOCKET_TIMEOUT,
    _toml,
    add_users,
    make_config,
    maildir,
    service_ports,
    smtp_client,
    start_mail_service,
    subprocess_env,
    tls_section,
    write_ca_file,
)

T = TypeVar("T")

ALICE, ALICE_PW = "alice@example.test", "alice-pop-Secret-1"
BOB, BOB_PW = "bob@example.test", "bob-pop-pw"
LISTEN = {
    "smtp": "tcp:0:interface=127.0.0.1",
    "pop3": "tcp:0:interface=127.0.0.1",
    "pop3s": "tcp:0:interface=127.0.0.1",
}
WAIT = 20.0
UIDL_FORMAT = re.compile(rb"[0-9A-Fa-f]{16}")  # Dovecot's default %08Xu%08Xv (the case is the store's)

_ca = trustme.CA()


def plain(authcid: str, password: str) -> str:
    return base64.b64encode(f"\0{authcid}\0{password}".encode()).decode()


def message(subject: str, body: str = "hello\r\n") -> bytes:
    return (f"From: <someone@remote.test>\r\nTo: <{ALICE}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n\r\n{body}").encode()


def mail_files(config: Any, local: str = "alice") -> list[Path]:
    root = maildir(config, local)
    return sorted(p for sub in ("new", "cur") if (root / sub).is_dir() for p in (root / sub).iterdir())


def file_of(config: Any, base_marker: bytes) -> Path:
    for p in mail_files(config):
        if base_marker in p.read_bytes():
            return p
    raise AssertionError(f"no message containing {base_marker!r}")


def big_message(size: int, chunk: int) -> bytes:
    """A message of about `size` bytes with a "." line at every `chunk` file offset: the
    dot line starts exactly at the boundary, or the boundary falls between the CR and LF
    before it, or between the two dots of a ".." line."""
    out = bytearray(b"Subject: big\r\nMessage-ID: <big@remote.test>\r\n\r\n")
    k = 1
    while len(out) < size:
        boundary = k * chunk
        variant = k % 3
        start, dot_line = {0: (boundary, b".\r\n"), 1: (boundary + 1, b".\r\n"), 2: (boundary - 1, b"..\r\n")}[variant]
        fill = start - len(out)
        while fill > 0:
            n = fill if fill <= 200 else 100
            out += b"x" * (n - 2) + b"\r\n"
            fill -= n
        assert len(out) == start
        out += dot_line
        k += 1
    out += b"the end\r\n"
    return bytes(out)


def stuffed(content: bytes) -> bytes:
    """The RFC 1939 §3 wire form of a CRLF message body (after the +OK line)."""
    body = content.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    return body + b".\r\n"


class RawPOP:
    """A byte-exact POP3 client on a plain socket; every read has a timeout."""

    def __init__(self, port: int, rcvbuf: int | None = None, context: ssl.SSLContext | None = None) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(SOCKET_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        self.sock: socket.socket = sock if context is None else context.wrap_socket(sock, server_hostname=HOSTNAME)
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionError(f"closed by server; partial {self.buf[:200]!r}")
        self.buf += data

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

    def multi(self) -> list[bytes]:
        lines = []
        while (line := self.line()) != b".":
            lines.append(line)
        return lines

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, text: str) -> bytes:
        self.send(text.encode() + b"\r\n")
        return self.line()

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.sock.close()


class POP3Case(TestCase):
    timeout = 120

    async def start(self, *, plaintext: list[str] | None = None, limits: dict[str, Any] | None = None,
                    folder: Path | None = None, mark_seen: bool = False) -> dict[str, int]:
        if folder is None:
            folder = Path(self.mktemp()).resolve()
            folder.mkdir(parents=True)
        self.folder = folder
        leaf = _ca.issue_cert(HOSTNAME, "127.0.0.1", common_name=HOSTNAME)  # fetchmail wants a CN
        cert, key = folder / "cert.pem", folder / "key.pem"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())
        self.cafile = write_ca_file(folder, _ca)
        extra = tls_section(cert, key)
        if plaintext is not None:
            extra += f"\n[auth]\nplaintext_without_tls = {_toml(plaintext)}\n"
        if mark_seen:
            extra += "\n[pop3]\nmark_seen = true\n"
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

    @property
    def factory(self) -> POP3ServerFactory:
        return self.mail.registry.listeners[Service.POP3]  # type: ignore[no-any-return]

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

    def pop(self, user: str | None = ALICE, password: str = ALICE_PW) -> poplib.POP3:
        p = poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=SOCKET_TIMEOUT)
        if user is not None:
            p.user(user)
            p.pass_(password)
        return p

    async def unlocked(self) -> None:
        """Wait (bounded) until every POP3 lock of this process is released."""
        for _ in range(int(WAIT / 0.01)):
            if not self.factory.locked and not self.mail.registry.listeners[Service.POP3S].locked:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("POP3 locks not released")


class CapabilityTests(POP3Case):
    async def test_capa_before_and_after_stls(self) -> None:
        await self.start()

        def client() -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, list[str]], bytes]:
            p = self.pop(None)
            before = p.capa()
            p.stls(self.ctx())
            after = p.capa()
            again = b"answered +OK"
            try:
                p._shortcmd("STLS")
            except poplib.error_proto as e:
                again = e.args[0]
            p.user(ALICE)
            p.pass_(ALICE_PW)
            logged_in = p.capa()
            p.quit()
            return before, after, logged_in, again

        before, after, logged_in, again = await self.thread(client)
        for name in ("TOP", "UIDL", "USER", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING", "IMPLEMENTATION", "STLS"):
            self.assertIn(name, before)
        self.assertIn("PLAIN", before["SASL"])
        self.assertNotIn("STLS", after)  # RFC 2595 §4: never after TLS
        self.assertIn("USER", after)
        self.assertTrue(again.startswith(b"-ERR"), again)
        self.assertNotIn("STLS", logged_in)
        self.assertIn("UIDL", logged_in)

    async def test_credentials_refused_in_plaintext_unless_allowed(self) -> None:
        await self.start(plaintext=[])  # loopback may not send passwords before TLS

        def client() -> dict[str, Any]:
            out: dict[str, Any] = {}
            p = self.pop(None)
            out["capa"] = p.capa()
            for cmd in (f"USER {ALICE}", f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"):
                try:
                    p._shortcmd(cmd)
                except poplib.error_proto as e:
                    out[cmd.split()[0]] = e.args[0]
            p.stls(self.ctx())
            p.user(ALICE)
            out["pass"] = p.pass_(ALICE_PW)
            out["stat"] = p.stat()
            p.quit()
            return out

        await self.deliver(message("one"))
        out = await self.thread(client)
        self.assertNotIn("USER", out["capa"])
        self.assertNotIn("SASL", out["capa"])
        self.assertIn("STLS", out["capa"])
        self.assertTrue(out["USER"].startswith(b"-ERR [AUTH] "), out)
        self.assertTrue(out["AUTH"].startswith(b"-ERR [AUTH] "), out)
        self.assertTrue(out["pass"].startswith(b"+OK"), out)
        self.assertEqual(out["stat"][0], 1)


class SessionTests(POP3Case):
    async def test_every_command(self) -> None:
        await self.start()
        await self.deliver(message("first", "line 1\r\n.dot line\r\nline 3\r\n"), message("second"), message("third"))

        def client() -> dict[str, Any]:
            out: dict[str, Any] = {}
            p = self.pop(None)
            out["welcome"] = p.getwelcome()
            out["user"] = p.user(ALICE)
            out["pass"] = p.pass_(ALICE_PW)
            out["noop"] = p.noop()
            out["stat"] = p.stat()
            out["list"] = p.list()
            out["list2"] = p.list(2)
            out["uidl"] = p.uidl()
            out["uidl3"] = p.uidl(3)
            out["retr"] = p.retr(1)
            out["top0"] = p.top(1, 0)
            out["top1"] = p.top(1, 1)
            out["dele"] = p.dele(2)
            out["stat_after_dele"] = p.stat()
            out["list_after_dele"] = p.list()[1]
            for name, call in [("retr_deleted", lambda: p.retr(2)), ("retr_none", lambda: p.retr(9)),
                               ("dele_twice", lambda: p.dele(2)), ("retr_zero", lambda: p.retr(0)),
                               ("user_again", lambda: p.user(ALICE)), ("top_bad", lambda: p._shortcmd("TOP 1"))]:
                try:
                    call()
                except poplib.error_proto as e:
                    out[name] = e.args[0]
            out["rset"] = p.rset()
            out["stat_after_rset"] = p.stat()
            out["quit"] = p.quit()
            return out

        out = await self.thread(client)
        self.assertTrue(out["welcome"].startswith(b"+OK "))
        self.assertNotIn(b"<", out["welcome"])  # no APOP timestamp: APOP is not offered
        for key in ("user", "pass", "noop", "dele", "rset", "quit"):
            self.assertTrue(out[key].startswith(b"+OK"), (key, out[key]))
        files = mail_files(self.config)
        sizes = [p.stat().st_size for p in sorted(files, key=lambda p: p.name)]
        self.assertEqual(out["stat"], (3, sum(sizes)))
        self.assertEqual(len(out["list"][1]), 3)
        self.assertEqual(out["list2"], b"+OK 2 " + str(int(out["list"][1][1].split()[1])).encode())
        self.assertEqual([x.split()[0] for x in out["uidl"][1]], [b"1", b"2", b"3"])
        for line in out["uidl"][1]:
            self.assertTrue(UIDL_FORMAT.fullmatch(line.split()[1]), line)
        self.assertEqual(out["uidl3"], b"+OK " + out["uidl"][1][2])
        # RETR: byte-exact (poplib unstuffs the ".dot line")
        disk = file_of(self.config, b"Subject: first").read_bytes()
        self.assertEqual(b"\r\n".join(out["retr"][1]) + b"\r\n", disk)
        self.assertIn(b".dot line", out["retr"][1])
        self.assertEqual(int(out["list"][1][0].split()[1]), len(disk))
        header = disk.split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(out["top0"][1], header + [b""])
        self.assertEqual(out["top1"][1], header + [b"", b"line 1"])
        self.assertEqual(out["stat_after_dele"][0], 2)
        self.assertEqual([x.split()[0] for x in out["list_after_dele"]], [b"1", b"3"])
        for key in ("retr_deleted", "retr_none", "dele_twice", "retr_zero", "user_again", "top_bad"):
            self.assertTrue(out[key].startswith(b"-ERR"), (key, out))
        self.assertEqual(out["stat_after_rset"][0], 3)
        self.assertEqual(len(mail_files(self.config)), 3)  # RSET undid the DELE

    async def test_auth_plain_with_and_without_initial_response(self) -> None:
        await self.start()
        await self.deliver(message("one"))

        def client() -> list[bytes]:
            out = []
            p = self.pop(None)
            out.append(p._shortcmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}"))
            out.append(p.quit())
            p = self.pop(None)
            p._putcmd("AUTH PLAIN")
            out.append(p._getline()[0])  # "+ " and an empty challenge (RFC 4616 §2)
            out.append(p._shortcmd(plain(ALICE, ALICE_PW)))
            out.append(str(p.stat()).encode())
            p._putcmd("QUIT")
            p._getresp()
            p = self.pop(None)
            p._putcmd("AUTH PLAIN")
            p._getline()
            try:
                p._shortcmd("*")
            except poplib.error_proto as e:
                out.append(e.args[0])
            out.append(p._longcmd("AUTH")[0])  # the mechanism list
            try:
                p._shortcmd("AUTH CRAM-MD5")
            except poplib.error_proto as e:
                out.append(e.args[0])
            out.append(p.quit())
            return out

        out = await self.thread(client)
        self.assertTrue(out[0].startswith(b"+OK"), out)
        self.assertEqual(out[2].rstrip(), b"+")
        self.assertTrue(out[3].startswith(b"+OK"), out)
        self.assertEqual(out[4], b"(1, %d)" % mail_files(self.config)[0].stat().st_size)
        self.assertTrue(out[5].startswith(b"-ERR"), out)  # "*" cancels (RFC 5034 §4)
        self.assertTrue(out[6].startswith(b"+OK"), out)
        self.assertTrue(out[7].startswith(b"-ERR"), out)

    async def test_wrong_password_and_unknown_user_get_auth_code(self) -> None:
        await self.start()

        def client() -> list[bytes]:
            out = []
            for user, pw in [(ALICE, "wrong"), ("nobody@example.test", "x"), ("not an address", "x")]:
                p = self.pop(None)
                p.user(user)
                try:
                    p.pass_(pw)
                except poplib.error_proto as e:
                    out.append(e.args[0])
                p.quit()
            p = self.pop(None)
            try:
                p.pass_(ALICE_PW)  # PASS without USER
            except poplib.error_proto as e:
                out.append(e.args[0])
            p.quit()
            return out

        out = await self.thread(client)
        self.assertEqual(out[:3], [b"-ERR [AUTH] Authentication failed"] * 3)
        self.assertTrue(out[3].startswith(b"-ERR"), out)

    async def test_pop3s(self) -> None:
        await self.start()
        await self.deliver(message("over tls"))

        def client() -> tuple[dict[str, list[str]], list[bytes]]:
            p = poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], context=self.ctx(), timeout=SOCKET_TIMEOUT)
            capa = p.capa()
            p.user(ALICE)
            p.pass_(ALICE_PW)
            lines = p.retr(1)[1]
            p.quit()
            return capa, lines

        capa, lines = await self.thread(client)
        self.assertNotIn("STLS", capa)
        self.assertIn("USER", capa)
        self.assertIn(b"Subject: over tls", lines)

    async def test_bad_input_never_crashes_the_session(self) -> None:
        await self.start()
        await self.deliver(message("one"))

        def client() -> list[bytes]:
            c = RawPOP(self.ports["pop3"])
            out = [c.line()]
            c.send(b"\xff\xfe\x00garbage\r\n")
            out.append(c.line())
            c.send(b"USER " + b"a" * 100_000 + b"\r\n")  # far beyond the line bound
            out.append(c.line())
            c.send(b"STAT\r\nLIST x\r\n\r\n")  # not logged in, not logged in, empty line
            out += [c.line(), c.line(), c.line()]
            out.append(c.command(f"USER {ALICE}"))
            out.append(c.command(f"PASS {ALICE_PW}"))
            for cmd in ("LIST -1", "LIST 99999999999999", "TOP 1 x", "RETR", "DELE one", "UIDL 1 2"):
                out.append(c.command(cmd))
            out.append(c.command("STAT"))
            for _ in range(25):  # unknown commands: the client is cut off after a few
                try:
                    c.send(b"XYZZY\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    break  # cut off already: what the test wants to see
            while not c.closed():
                pass
            return out

        out = await self.thread(client)
        self.assertTrue(out[0].startswith(b"+OK"))
        self.assertEqual([o[:4] for o in out[1:6]], [b"-ERR"] * 5, out)
        self.assertTrue(out[6].startswith(b"+OK") and out[7].startswith(b"+OK"), out)
        self.assertEqual([o[:4] for o in out[8:14]], [b"-ERR"] * 6, out)
        self.assertTrue(out[14].startswith(b"+OK 1 "), out)

    async def test_max_connections(self) -> None:
        await self.start(limits={"max_connections": 1})

        def client() -> bytes:
            first = RawPOP(self.ports["pop3"])
            first.line()
            second = RawPOP(self.ports["pop3"])
            refused = second.line()
            closed = second.closed()
            first.command("QUIT")
            return refused + (b" closed" if closed else b"")

        refused = await self.thread(client)
        self.assertTrue(refused.startswith(b"-ERR [SYS/TEMP] "), refused)
        self.assertTrue(refused.endswith(b" closed"), refused)

    async def test_log_events(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        await self.start()
        await self.deliver(message("one"), message("two"))

        def client() -> None:
            p = self.pop(None)
            p.user(ALICE)
            try:
                p.pass_("wrong")
            except poplib.error_proto:
                pass
            p.user(ALICE)
            p.pass_(ALICE_PW)
            p.retr(1)
            p.retr(2)
            p.dele(1)
            p.quit()

        await self.thread(client)
        pop = [e for e in events if str(e.get("log_format", "")).startswith("pop3 ")]
        failed = [e for e in pop if "login failed" in e["log_format"]]
        self.assertEqual([(e["reason"], e["peer"]) for e in failed], [("wrong password", "127.0.0.1")])
        login = [e for e in pop if e["log_format"].startswith("pop3 login {user}")]
        self.assertEqual([(e["user"], e["count"]) for e in login], [(ALICE, 2)])
        deleted = [e for e in pop if "deleted {count}" in e["log_format"]]
        self.assertEqual([e["count"] for e in deleted], [1])
        ended = [e for e in pop if "session of" in e["log_format"]]
        self.assertEqual([(e["retrieved"], e["deleted"], e["quit"]) for e in ended], [(2, 1, True)])


class STLSInjectionTests(POP3Case):
    def inject(self, injected: bytes, after: list[str]) -> dict[str, Any]:
        c = RawPOP(self.ports["pop3"])
        out: dict[str, Any] = {"banner": c.line()}
        c.send(b"STLS\r\n" + injected)  # one write
        out["stls"] = c.line()
        assert c.buf == b"", f"plaintext answered after STLS: {c.buf!r}"
        c.sock = self.ctx().wrap_socket(c.sock, server_hostname=HOSTNAME)
        out["after"] = [c.command(line) for line in after]
        c.close()
        return out

    async def test_user_injected_behind_stls_is_discarded(self) -> None:
        await self.start()
        out = await self.thread(self.inject, f"USER {ALICE}\r\n".encode(), [f"PASS {ALICE_PW}", "QUIT"])
        self.assertTrue(out["stls"].startswith(b"+OK"), out)
        # Had the injected USER counted, PASS would log in.
        self.assertTrue(out["after"][0].startswith(b"-ERR"), out)
        self.assertTrue(out["after"][1].startswith(b"+OK"), out)

    async def test_login_injected_behind_stls_does_not_log_in(self) -> None:
        await self.start()
        injected = f"USER {ALICE}\r\nPASS {ALICE_PW}\r\nSTAT\r\n".encode()
        out = await self.thread(self.inject, injected, ["STAT", "NOOP", "QUIT"])
        self.assertEqual([line[:4] for line in out["after"]], [b"-ERR", b"-ERR", b"+OK "], out)

    async def test_user_before_stls_is_forgotten(self) -> None:
        await self.start()

        def client() -> bytes:
            c = RawPOP(self.ports["pop3"])
            c.line()
            c.command(f"USER {ALICE}")
            c.command("STLS")
            c.sock = self.ctx().wrap_socket(c.sock, server_hostname=HOSTNAME)
            answer = c.command(f"PASS {ALICE_PW}")
            c.close()
            return answer

        self.assertTrue((await self.thread(client)).startswith(b"-ERR"))


class MailboxTests(POP3Case):
    async def uidls(self) -> list[bytes]:
        def client() -> list[bytes]:
            p = self.pop()
            lines = p.uidl()[1]
            p.quit()
            return lines

        return await self.thread(client)

    async def test_uidl_stable_across_sessions_restart_and_flag_rename(self) -> None:
        await self.start()
        await self.deliver(message("one"), message("two"), message("three"))
        first = await self.uidls()
        self.assertEqual(len(first), 3)
        self.assertEqual(len(set(first)), 3)
        await self.unlocked()
        self.assertEqual(await self.uidls(), first)
        # An IMAP client (or Dovecot, or a script) flags a message: a rename into cur/.
        path = file_of(self.config, b"Subject: two")
        name = path.name.split(":2,")[0]
        os.rename(path, path.parent.parent / "cur" / f"{name}:2,FS")
        await self.unlocked()
        self.assertEqual(await self.uidls(), first)
        await self.unlocked()
        await self.restart()
        self.assertEqual(await self.uidls(), first)
        # New mail gets new UIDLs; the old ones stay.
        await self.deliver(message("four"))
        await self.unlocked()
        now = await self.uidls()
        self.assertEqual(now[:3], first)
        self.assertNotIn(now[3].split()[1], [u.split()[1] for u in first])

    async def test_deletion_only_at_quit(self) -> None:
        await self.start()
        await self.deliver(message("one"), message("two"), message("three"))

        def client() -> tuple[int, bytes]:
            p = self.pop()
            p.dele(1)
            p.dele(3)
            during = len(mail_files(self.config))
            return during, p.quit()

        during, quit = await self.thread(client)
        self.assertEqual(during, 3)
        self.assertTrue(quit.startswith(b"+OK"), quit)
        left = mail_files(self.config)
        self.assertEqual(len(left), 1)
        self.assertIn(b"Subject: two", left[0].read_bytes())

    async def test_dropped_connection_deletes_nothing(self) -> None:
        await self.start()
        await self.deliver(message("one"), message("two"))

        def client() -> None:
            p = self.pop()
            p.dele(1)
            p.dele(2)
            p.sock.close()  # no QUIT

        await self.thread(client)
        await self.unlocked()
        self.assertEqual(len(mail_files(self.config)), 2)

        def again() -> tuple[int, int]:
            p = self.pop()
            count = p.stat()
            p.quit()
            return count

        self.assertEqual((await self.thread(again))[0], 2)

    async def test_retrieved_message_stays_as_delivered_by_default(self) -> None:
        # The contract (contract-smoke) reads the delivered file at its new/ path after a
        # POP3 RETR and QUIT: by default nothing is renamed.
        await self.start()
        await self.deliver(message("one"))
        before = file_of(self.config, b"Subject: one")

        def client() -> None:
            p = self.pop()
            p.retr(1)
            p.quit()

        await self.thread(client)
        self.assertEqual(file_of(self.config, b"Subject: one"), before)
        self.assertEqual(before.parent.name, "new")

    async def test_retrieved_message_is_marked_seen(self) -> None:
        await self.start(mark_seen=True)
        await self.deliver(message("one"), message("two"))

        def client() -> None:
            p = self.pop()
            p.retr(2)
            p.top(1, 0)  # TOP is not a retrieval
            p.quit()

        await self.thread(client)
        self.assertTrue(file_of(self.config, b"Subject: two").name.endswith(":2,S"))
        self.assertNotIn(":2,S", file_of(self.config, b"Subject: one").name)

    async def test_read_ahead_answers_in_and_out_of_order(self) -> None:
        # More messages than one read-ahead trip takes: RETRs in order (answered from what
        # was read ahead), then TOP of one read ahead, a jump back, a DELE, a jump forward.
        await self.start(mark_seen=True)
        count = 45
        await self.deliver(*(message(f"n{i}", body=f"body {i}\r\n") for i in range(count)))

        def client() -> dict[str, Any]:
            p = self.pop()
            out: dict[str, Any] = {"in_order": [b"\r\n".join(p.retr(k)[1]) for k in range(1, 31)]}
            out["top"] = p.top(32, 0)[1]
            out["back"] = b"\r\n".join(p.retr(3)[1])
            p.dele(33)
            try:
                p.retr(33)
            except poplib.error_proto as e:
                out["deleted"] = str(e)
            out["jump"] = b"\r\n".join(p.retr(44)[1])
            out["rest"] = [b"\r\n".join(p.retr(k)[1]) for k in (31, 32, 34)]
            p.quit()
            return out

        got = await self.thread(client)
        for k, text in enumerate(got["in_order"], 1):
            self.assertIn(f"Subject: n{k - 1}".encode(), text)
            self.assertTrue(text.endswith(f"body {k - 1}".encode()), k)
        self.assertIn(b"Subject: n31", b"\r\n".join(got["top"]))
        self.assertNotIn(b"body 31", b"\r\n".join(got["top"]))
        self.assertIn(b"Subject: n2", got["back"])
        self.assertIn("-ERR", got["deleted"])
        self.assertIn(b"Subject: n43", got["jump"])
        self.assertEqual([t.endswith(f"body {i}".encode()) for t, i in zip(got["rest"], (30, 31, 33))], [True] * 3)
        retrieved = {*range(30), 2, 43, 30, 31, 33}
        for i in range(count):
            if i == 32:
                continue  # deleted
            name = file_of(self.config, f"Subject: n{i}\r\n".encode()).name
            self.assertEqual(name.endswith(":2,S"), i in retrieved, i)

    async def test_seen_rename_after_the_reply_is_waited_for(self) -> None:
        # The \\Seen rename runs after RETR's reply; QUIT's expunge and the next session
        # must see it done (one store call at a time, the lock kept until then).
        await self.start(mark_seen=True)
        await self.deliver(message("one"), message("two"), message("three"))

        def client() -> tuple[bytes, int]:
            p = self.pop()
            p.retr(3)  # the last one: no read-ahead, the rename alone
            p.retr(1)
            p.dele(1)
            p.quit()
            p = self.pop()  # a session dropped right after a RETR
            p.retr(1)  # "two", now message 1
            p.close()  # no QUIT
            for _ in range(100):
                again = self.pop(user=None)
                try:
                    again.user(ALICE)
                    again.pass_(ALICE_PW)
                except poplib.error_proto:
                    again.close()
                    time.sleep(0.05)  # the lock goes once the rename finished
                    continue
                count = again.stat()[0]
                again.quit()
                return b"ok", count
            return b"still in use", 0

        got = await self.thread(client)
        self.assertEqual(got, (b"ok", 2))
        self.assertFalse(any(b"Subject: one" in p.read_bytes() for p in mail_files(self.config)))
        for subject in (b"Subject: two", b"Subject: three"):
            self.assertTrue(file_of(self.config, subject).name.endswith(":2,S"), subject)

    async def test_second_session_gets_in_use(self) -> None:
        await self.start()
        await self.deliver(message("one"))

        def client() -> tuple[bytes, bytes, bytes]:
            first = self.pop()
            second = self.pop(None)
            second.user(ALICE)
            try:
                second.pass_(ALICE_PW)
                refused = b"logged in"
            except poplib.error_proto as e:
                refused = e.args[0]
            pop3s = poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], context=self.ctx(), timeout=SOCKET_TIMEOUT)
            try:
                pop3s._shortcmd(f"AUTH PLAIN {plain(ALICE, ALICE_PW)}")
                other_port = b"logged in"
            except poplib.error_proto as e:
                other_port = e.args[0]
            bob = self.pop(BOB, BOB_PW)  # another user is not affected
            bob.quit()
            first.quit()
            pop3s.quit()
            return refused, other_port, second.quit()

        refused, other_port, _ = await self.thread(client)
        self.assertTrue(refused.startswith(b"-ERR [IN-USE] "), refused)
        self.assertTrue(other_port.startswith(b"-ERR [IN-USE] "), other_port)
        await self.unlocked()

        def later() -> bytes:
            p = self.pop()
            return p.quit()

        self.assertTrue((await self.thread(later)).startswith(b"+OK"))

    async def test_lock_held_by_a_killed_process_is_released(self) -> None:
        """The lock is an flock: another process holding it means [IN-USE]; its crash frees it."""
        await self.start()
        await self.deliver(message("one"))
        lock = maildir(self.config, "alice") / LOCK_FILE
        code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE,
                                  env=subprocess_env())
        self.addCleanup(lambda: holder.poll() is None and holder.kill())
        self.assertEqual(await self.thread(holder.stdout.readline), b"locked\n")  # type: ignore[union-attr]

        def attempt() -> bytes:
            p = self.pop(None)
            p.user(ALICE)
            try:
                return p.pass_(ALICE_PW)
            except poplib.error_proto as e:
                return e.args[0]
            finally:
                p.quit()

        self.assertTrue((await self.thread(attempt)).startswith(b"-ERR [IN-USE] "))
        holder.send_signal(signal.SIGKILL)
        await self.thread(holder.wait)
        holder.stdout.close()  # type: ignore[union-attr]
        self.assertTrue((await self.thread(attempt)).startswith(b"+OK"))

    async def test_vanished_file_fails_only_that_message(self) -> None:
        await self.start()
        await self.deliver(message("one"), message("two"), message("three"))

        def client() -> dict[str, Any]:
            out: dict[str, Any] = {}
            p = self.pop()
            file_of(self.config, b"Subject: two").unlink()  # another session expunged it
            try:
                p.retr(2)
            except poplib.error_proto as e:
                out["gone"] = e.args[0]
            try:
                p.top(2, 0)
            except poplib.error_proto as e:
                out["gone_top"] = e.args[0]
            out["retr1"] = p.retr(1)[1]
            out["retr3"] = p.retr(3)[1]
            out["dele"] = p.dele(1)
            out["quit"] = p.quit()
            return out

        out = await self.thread(client)
        self.assertTrue(out["gone"].startswith(b"-ERR"), out)
        self.assertTrue(out["gone_top"].startswith(b"-ERR"), out)
        self.assertIn(b"Subject: one", out["retr1"])
        self.assertIn(b"Subject: three", out["retr3"])
        self.assertTrue(out["quit"].startswith(b"+OK"), out)
        left = mail_files(self.config)
        self.assertEqual(len(left), 1)
        self.assertIn(b"Subject: three", left[0].read_bytes())


class LargeMessageTests(POP3Case):
    SIZE = 10 * 1024 * 1024

    async def put_big(self) -> bytes:
        await self.deliver(message("small"))  # creates the Maildir the real way
        content = big_message(self.SIZE, pop3server.READ_CHUNK)
        root = maildir(self.config, "alice")
        tmp = root / "tmp" / "big"
        tmp.write_bytes(content)
        os.rename(tmp, root / "new" / unique_name(len(content)))
        return content

    def login(self, c: RawPOP) -> None:
        assert c.line().startswith(b"+OK")
        assert c.command(f"USER {ALICE}").startswith(b"+OK")
        assert c.command(f"PASS {ALICE_PW}").startswith(b"+OK")

    async def test_10mib_with_dot_lines_at_every_chunk_boundary_is_byte_exact(self) -> None:
        await self.start()
        content = await self.put_big()
        boundaries = len(content) // pop3server.READ_CHUNK
        self.assertGreaterEqual(boundaries, 150)
        expected = stuffed(content)

        def client() -> tuple[bytes, bytes, list[bytes], list[bytes]]:
            c = RawPOP(self.ports["pop3"])
            self.login(c)
            first = c.command("RETR 2")
            wire = c.exactly(len(expected))
            c.send(b"LIST 2\r\n")
            listed = c.line()
            poplib_lines = []
            p = poplib.POP3_SSL("127.0.0.1", self.ports["pop3s"], context=self.ctx(), timeout=SOCKET_TIMEOUT)
            c.command("QUIT")
            c.close()
            time.sleep(0.2)
            p.user(ALICE)
            for _ in range(100):
                try:
                    p.pass_(ALICE_PW)
                    break
                except poplib.error_proto:  # the first session's lock is still being released
                    time.sleep(0.05)
                    p.user(ALICE)
            poplib_lines = p.retr(2)[1]
            p.quit()
            return first, wire, [listed], poplib_lines

        first, wire, listed, lines = await self.thread(client)
        self.assertEqual(first, f"+OK {len(content)} octets".encode())
        self.assertEqual(listed, [f"+OK 2 {len(content)}".encode()])
        self.assertEqual(len(wire), len(expected))
        self.assertTrue(wire == expected, "RETR differs from the dot-stuffed file")
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", content)

    async def test_retr_waits_for_a_slow_reader(self) -> None:
        """Back-pressure: while the client reads nothing, the server stops reading the file."""
        await self.start()
        content = await self.put_big()
        read = [0]

        class Counting:
            def __init__(self, f: Any) -> None:
                self.f = f

            def read(self, n: int) -> bytes:
                data = self.f.read(n)
                read[0] += len(data)
                return data

            def close(self) -> None:
                self.f.close()

        class Folder:
            def __init__(self, folder: Any) -> None:
                self.folder = folder

            def __getattr__(self, name: str) -> Any:
                return getattr(self.folder, name)

            def open_message(self, uid: int) -> Counting:
                return Counting(self.folder.open_message(uid))

        def opener(root: Path) -> Any:
            fd, folder, entries = open_maildrop(root)
            return fd, Folder(folder), entries

        self.factory.open_maildrop = opener

        def client() -> tuple[int, bytes]:
            c = RawPOP(self.ports["pop3"], rcvbuf=32 * 1024)
            self.login(c)
            c.send(b"RETR 2\r\n")
            time.sleep(1.0)  # the client reads nothing for a while
            stalled = read[0]
            c.line()
            wire = c.exactly(len(stuffed(content)))
            c.command("QUIT")
            return stalled, wire

        stalled, wire = await self.thread(client)
        self.assertLess(stalled, len(content) // 2, "the server read on while the client was not reading")
        self.assertEqual(wire, stuffed(content))


class BelowTheSocketTests(TestCase):
    """The brakes and the idle timer on a StringTransport with a Clock."""

    timeout = 60
    PEER = "192.0.2.7"

    def setUp(self) -> None:
        self.config = make_config(self)
        add_users(self.config, {ALICE: ALICE_PW})
        self.pool, self.clock, users, self.auth = clocked_authenticator(self, self.config)
        self.factory = POP3ServerFactory(
            config=self.config, reactor=reactor, read_pool=self.pool, authenticator=self.auth,
            clock=self.clock, kind="pop3s",
        )

    def connect(self) -> tuple[Any, StringTransport]:
        addr = IPv4Address("TCP", self.PEER, 40000)
        proto = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        proto.makeConnection(transport)
        self.addCleanup(lambda: proto.connectionLost(None) if proto._open else None)
        self.assertTrue(transport.value().startswith(b"+OK "))
        transport.clear()
        return proto, transport

    def short_timers(self) -> list[Any]:
        now = self.clock.seconds()
        return [c for c in self.clock.getDelayedCalls() if c.getTime() - now <= 60]

    async def outcome(self, transport: StringTransport) -> tuple[bytes, float]:
        for _ in range(int(WAIT / 0.005)):
            if transport.value().endswith(b"\r\n"):
                return transport.value(), 0.0
            timers = self.short_timers()
            if timers:
                self.assertEqual(transport.value(), b"")
                return b"", round(timers[0].getTime() - self.clock.seconds(), 6)
            await deferLater(reactor, 0.005, lambda: None)
        self.fail("no answer")

    async def bad_pass(self, proto: Any, transport: StringTransport) -> tuple[bytes, float]:
        proto.dataReceived(f"USER {ALICE}\r\n".encode())
        self.assertEqual(transport.value(), b"+OK\r\n")
        transport.clear()
        proto.dataReceived(b"PASS wrong\r\n")
        written, delay = await self.outcome(transport)
        if delay:
            self.clock.advance(delay * 0.99)
            self.assertEqual(transport.value(), b"", "answered before the delay was over")
            self.clock.advance(delay * 0.01 + 0.001)
            written = transport.value()
        transport.clear()
        return written, delay

    async def test_bad_passwords_are_throttled_then_cut_off(self) -> None:
        proto, transport = self.connect()
        delays = []
        for i in range(1, MAX_AUTH_FAILURES):
            written, delay = await self.bad_pass(proto, transport)
            self.assertEqual(written, b"-ERR [AUTH] Authentication failed\r\n", i)
            self.assertFalse(transport.disconnecting)
            delays.append(delay)
        self.assertEqual(delays[:3], [0.0, 0.0, 0.0])
        self.assertGreaterEqual(delays[3], 1.0)
        nonzero = [d for d in delays if d]
        self.assertEqual(nonzero, sorted(nonzero))
        written, _ = await self.bad_pass(proto, transport)
        self.assertTrue(written.startswith(b"-ERR [AUTH] "), written)
        self.assertTrue(transport.disconnecting)

    async def test_unknown_user_costs_the_same_brake(self) -> None:
        proto, transport = self.connect()
        delays = []
        for _ in range(5):
            proto.dataReceived(b"USER nobody@example.test\r\nPASS x\r\n")
            self.assertEqual(transport.value(), b"+OK\r\n")
            transport.clear()
            written, delay = await self.outcome(transport)
            if delay:
                self.clock.advance(delay + 0.001)
                written = transport.value()
            self.assertEqual(written, b"-ERR [AUTH] Authentication failed\r\n")
            transport.clear()
            delays.append(delay)
        self.assertEqual(delays[:3], [0.0, 0.0, 0.0])
        self.assertGreater(delays[3], 0.0)

    async def test_blocked_address_is_refused(self) -> None:
        for _ in range(self.auth.failures.block_after):
            self.auth.failures.failed(self.PEER)
        proto, transport = self.connect()
        proto.dataReceived(f"USER {ALICE}\r\n".encode())
        self.assertTrue(transport.value().startswith(b"-ERR [SYS/TEMP] "), transport.value())
        self.assertTrue(transport.disconnecting)

    async def login(self, proto: Any, transport: StringTransport) -> None:
        proto.dataReceived(f"USER {ALICE}\r\nPASS {ALICE_PW}\r\n".encode())
        for _ in range(int(WAIT / 0.005)):
            if transport.value().count(b"\r\n") >= 2:
                break
            await deferLater(reactor, 0.005, lambda: None)
        self.assertTrue(transport.value().split(b"\r\n")[1].startswith(b"+OK Logged in"), transport.value())
        transport.clear()

    async def test_idle_timeout_deletes_nothing(self) -> None:
        root = maildir(self.config, "alice")
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        (root / "new" / unique_name(5)).write_bytes(b"a\r\n\r\n")
        proto, transport = self.connect()
        await self.login(proto, transport)
        proto.dataReceived(b"DELE 1\r\n")
        self.assertEqual(transport.value(), b"+OK Message 1 deleted\r\n")
        transport.clear()
        self.assertEqual(self.config.limits.pop3_idle_timeout, 600.0)
        self.clock.advance(599)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"NOOP\r\n")  # a read resets the timer
        self.clock.advance(599)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(transport.value(), b"+OK\r\n-ERR Disconnected for inactivity\r\n")
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(None)
        for _ in range(int(WAIT / 0.005)):
            if not self.factory.locked:
                break
            await deferLater(reactor, 0.005, lambda: None)
        self.assertEqual(len(list((root / "new").iterdir()) + list((root / "cur").iterdir())), 1)


class ClientProgramTests(POP3Case):
    """docs/pop3.md's fetchmail (STLS) and getmail6 (pop3s) configurations, where installed."""

    def run_program(self, argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
        # The programs run on the system's Python: not on this interpreter's path (trial -j
        # puts the whole sys.path into PYTHONPATH).
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["HOME"] = str(home)
        return subprocess.run(argv, cwd=home, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=60)

    async def test_fetchmail_over_stls(self) -> None:
        if shutil.which("fetchmail") is None:
            raise SkipTest("fetchmail is not installed")
        await self.start(plaintext=[])  # credentials only after STLS
        await self.deliver(message("for fetchmail", ".dot line\r\nbye\r\n"), message("second"))
        home = self.folder / "home"
        home.mkdir()
        out = home / "fetched"
        rc = home / ".fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f'poll 127.0.0.1 service {self.ports["pop3"]} protocol POP3 uidl\n'
            f'    user "{ALICE}" there with password "{ALICE_PW}" is "alice" here\n'
            f'    sslproto "tls1.2+" sslcertck sslcertfile "{self.cafile}" sslcommonname "{HOSTNAME}"\n'
            "    keep\n"
            f"    mda \"/bin/sh -c 'cat >> {out}'\"\n"
        )
        rc.chmod(0o600)
        argv = ["fetchmail", "-f", str(rc), "--idfile", str(home / "ids"), "--pidfile", str(home / "pid"), "-v"]
        first = await self.thread(self.run_program, argv, home)
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        self.assertIn("STLS", first.stdout + first.stderr)
        fetched = out.read_bytes()
        self.assertIn(b"\n.dot line\n", fetched.replace(b"\r\n", b"\n"))
        self.assertIn(b"Subject: second", fetched)
        await self.unlocked()
        again = await self.thread(self.run_program, argv, home)  # uidl: nothing new to fetch
        self.assertEqual(again.returncode, 1, again.stdout + again.stderr)  # 1: no mail
        self.assertEqual(out.read_bytes(), fetched)
        self.assertEqual(len(mail_files(self.config)), 2)  # keep

    @staticmethod
    def destination(target: Path) -> str:
        if os.geteuid() != 0:
            return f"[destination]\ntype = Maildir\npath = {target}/\n\n"
        # getmail delivers to a Maildir only as a user: as root (CI), through a command.
        script = f"f={target}/new/$(date +%s%N).msg; cat > $f"
        return ("[destination]\ntype = MDA_external\npath = /bin/sh\n"
                f"arguments = (\"-c\", \"{script}\")\nallow_root_commands = true\n\n")

    async def test_getmail_over_pop3s(self) -> None:
        if shutil.which("getmail") is None:
            raise SkipTest("getmail6 is not installed")
        await self.start()
        await self.deliver(message("for getmail", ".dot line\r\nbye\r\n"))
        home = self.folder / "home"
        target = home / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (target / sub).mkdir(parents=True)
        rc = home / "getmailrc"
        rc.write_text(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
            f'port = {self.ports["pop3s"]}\nusername = {ALICE}\npassword = {ALICE_PW}\n'
            f"ca_certs = {self.cafile}\nssl_cert_hostname = {HOSTNAME}\n\n"
            + self.destination(target) +
            "[options]\nread_all = false\ndelete = false\n"
        )
        argv = ["getmail", "--getmaildir", str(home), "--rcfile", str(rc)]
        first = await self.thread(self.run_program, argv, home)
        self.assertEqual(first.returncode, 0, first.stdout + first.stderr)
        got = list((target / "new").iterdir())
        self.assertEqual(len(got), 1, first.stdout)
        self.assertIn(b"\n.dot line\n", got[0].read_bytes().replace(b"\r\n", b"\n"))
        await self.unlocked()
        again = await self.thread(self.run_program, argv, home)
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)
        self.assertEqual(len(list((target / "new").iterdir())), 1)  # the UIDL was remembered
