"""Server TLS: versions and ciphers, the self-signed fallback, bad files at start-up, SIGHUP.

Handshakes are real (Python's `ssl` clients on loopback, in threads) against the whole
server (`mx.tap.build`) in-process; start-up failures and the SIGHUP reload run
`twistd -n mx` as a child process. Certificates come from throwaway `trustme` CAs.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trustme
from OpenSSL import SSL
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mx import config as configmod
from mx.tls import ServerTLS, TLSError
from tests.support import (
    CLIENT_HELO,
    HOSTNAME,
    SOCKET_TIMEOUT,
    RawClient,
    client_tls_context,
    free_port,
    make_config,
    peer_certificate,
    service_ports,
    start_mail_service,
    start_twistd,
    starttls_client,
    subprocess_env,
    tls_section,
    twistd_command,
    wrap_raw,
    write_ca_file,
    write_config,
    write_tls_files,
)

T = TypeVar("T")

_ca = trustme.CA()
LISTEN = {"submission": "tcp:0:interface=127.0.0.1", "submissions": "tcp:0:interface=127.0.0.1"}


def der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))


def handshake(port: int, context: ssl.SSLContext, server_name: str = HOSTNAME) -> tuple[str, str]:
    """Implicit TLS to 127.0.0.1:`port`: (protocol version, cipher name); raises on failure."""
    with (socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as raw,
          context.wrap_socket(raw, server_hostname=server_name) as tls):
        banner = tls.recv(1024)
        assert banner.startswith(b"220 "), banner
        version, cipher = tls.version(), tls.cipher()
        assert version is not None and cipher is not None
        return version, cipher[0]


def tls11_context() -> ssl.SSLContext:
    """A client that offers only TLS 1.0/1.1 (security level 0 so OpenSSL 3 will offer them)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def local_openssl_speaks_tls11() -> bool:
    """Whether this Python/OpenSSL can complete a TLS 1.1 handshake with itself at all."""
    leaf = _ca.issue_cert(HOSTNAME)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            server_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            server_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
            server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        except (ValueError, ssl.SSLError):
            return False
    leaf.configure_cert(server_ctx)
    result: dict[str, Any] = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(SOCKET_TIMEOUT)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(SOCKET_TIMEOUT)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    result["server"] = tls.version()
            except (OSError, ssl.SSLError) as e:
                result["server"] = repr(e)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with (socket.create_connection(listener.getsockname(), timeout=SOCKET_TIMEOUT) as raw,
                  tls11_context().wrap_socket(raw) as tls):
                version = tls.version()
        except (OSError, ssl.SSLError):
            version = None
        thread.join(SOCKET_TIMEOUT)
    return version == "TLSv1.1"


class TLSCase(TestCase):
    timeout = 60

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await deferToThread(fn, *args)

    async def start(self, ca: Any = _ca, tls: bool = True, key_type: Any = None) -> dict[str, int]:
        folder = Path(self.mktemp()).resolve()
        extra = ""
        if tls:
            self.cert, self.key = write_tls_files(folder / "tls", ca, key_type=key_type)
            self.cafile = write_ca_file(folder, ca)
            extra = tls_section(self.cert, self.key)
        self.config = make_config(self, listen=LISTEN, extra=extra, folder=folder)
        self.mail = await start_mail_service(self, self.config, clock=Clock())
        self.ports = service_ports(self.mail)
        return self.ports


class VersionTests(TLSCase):
    async def test_tls12_and_tls13_accepted(self) -> None:
        await self.start()
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx = client_tls_context(self.cafile)
            ctx.minimum_version = ctx.maximum_version = version
            got, _cipher = await self.thread(handshake, self.ports["submissions"], ctx)
            self.assertEqual(got, {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version])

    async def test_tls11_refused(self) -> None:
        """TLS 1.1 (and 1.0) are refused on both the implicit and the STARTTLS port.

        The client offers TLS 1.0/1.1 at OpenSSL security level 0; `local_openssl_speaks_tls11`
        proves it really can (against a local Python server). Where the local OpenSSL cannot
        speak TLS 1.1 at all the handshake fails either way, and the test still asserts that.
        """
        await self.start()
        speaks = await self.thread(local_openssl_speaks_tls11)
        if not speaks:  # pragma: no cover - depends on the platform's OpenSSL build
            print("note: the local OpenSSL cannot offer TLS 1.1; only checking that it fails")
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            await self.thread(handshake, self.ports["submissions"], tls11_context())

        def starttls() -> None:
            with RawClient(self.ports["submission"]) as c:
                c.reply()
                c.command(f"EHLO {CLIENT_HELO}")
                assert c.command("STARTTLS")[0] == 220
                wrap_raw(c, tls11_context())
                c.command("NOOP")

        with self.assertRaises((ssl.SSLError, ConnectionError)):
            await self.thread(starttls)
        # the server is not wedged by it
        version, _ = await self.thread(handshake, self.ports["submissions"], client_tls_context(self.cafile))
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    async def test_tls12_ciphers_are_forward_secret_aead(self) -> None:
        """With an RSA certificate a TLS 1.2 client could use static RSA or CBC suites: refused."""
        await self.start(key_type=trustme.KeyType.RSA)

        def tls12(ciphers: str) -> tuple[str, str]:
            ctx = client_tls_context(self.cafile)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            ctx.set_ciphers(ciphers)
            return handshake(self.ports["submissions"], ctx)

        version, cipher = await self.thread(tls12, "ECDHE-RSA-AES128-GCM-SHA256")
        self.assertEqual((version, cipher), ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256"))
        version, cipher = await self.thread(tls12, "ECDHE-RSA-CHACHA20-POLY1305")
        self.assertEqual(cipher, "ECDHE-RSA-CHACHA20-POLY1305")
        for weak in ("AES128-GCM-SHA256:AES256-GCM-SHA384",  # no forward secrecy
                     "ECDHE-RSA-AES128-SHA:ECDHE-RSA-AES256-SHA384",  # CBC, not AEAD
                     "DHE-RSA-AES128-GCM-SHA256"):  # finite-field DHE is not offered either
            with self.assertRaises(ssl.SSLError, msg=weak):
                await self.thread(tls12, weak)

    async def test_default_client_gets_an_aead_suite(self) -> None:
        await self.start(key_type=trustme.KeyType.RSA)
        ctx = client_tls_context(self.cafile)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        _version, cipher = await self.thread(handshake, self.ports["submissions"], ctx)
        self.assertTrue(cipher.startswith("ECDHE-"), cipher)
        self.assertTrue("GCM" in cipher or "CHACHA20" in cipher, cipher)

    def test_no_compression_no_renegotiation(self) -> None:
        folder = Path(self.mktemp()).resolve()
        cert, key = write_tls_files(folder, _ca)
        config = make_config(self, extra=tls_section(cert, key), folder=folder)
        options = ServerTLS(config).getContext().set_options(0)  # returns the options in force
        self.assertTrue(options & SSL.OP_NO_COMPRESSION)
        if hasattr(SSL, "OP_NO_RENEGOTIATION"):
            self.assertTrue(options & SSL.OP_NO_RENEGOTIATION)
        self.assertTrue(options & SSL.OP_NO_TLSv1 and options & SSL.OP_NO_TLSv1_1)


class SelfSignedTests(TLSCase):
    async def test_fresh_data_dir_gets_a_working_self_signed_certificate(self) -> None:
        events: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            events.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        await self.start(tls=False)
        cert_path = self.config.data_dir / "tls" / "selfsigned-cert.pem"
        key_path = self.config.data_dir / "tls" / "selfsigned-key.pem"
        self.assertTrue(cert_path.is_file())
        self.assertEqual(stat.S_IMODE(key_path.stat().st_mode), 0o600)
        self.assertTrue(any(str(cert_path) in e for e in events), events)

        def client() -> dict[str, Any]:
            s = starttls_client(self.ports["submission"], client_tls_context(None))
            try:
                return {"der": s.sock.getpeercert(binary_form=True), "version": s.sock.version(),
                        "features": dict(s.esmtp_features)}
            finally:
                s.quit()

        out = await self.thread(client)
        self.assertEqual(out["der"], der(cert_path.read_bytes()))
        self.assertIn(out["version"], ("TLSv1.2", "TLSv1.3"))
        self.assertNotIn("starttls", out["features"])
        self.assertIn("auth", out["features"])

        # the certificate names the host, so a client pinning it can check the name
        ctx = ssl.create_default_context(cafile=str(cert_path))
        version, _ = await self.thread(handshake, self.ports["submissions"], ctx)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))

    def test_made_once_and_reused(self) -> None:
        config = make_config(self)
        first = ServerTLS(config)
        pem = first.cert_path.read_bytes()
        second = ServerTLS(config)
        self.assertEqual(second.cert_path, first.cert_path)
        self.assertEqual(second.cert_path.read_bytes(), pem)


class BadFilesTests(TestCase):
    """Unusable certificate or key: `TLSError` naming the file; `twistd` exits with one line."""

    timeout = 60

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.cert, self.key = write_tls_files(self.folder / "tls", _ca)

    def config_file(self, cert: Path | None = None, key: Path | None = None) -> Path:
        port = free_port()
        return write_config(self, listen={"submissions": f"tcp:{port}:interface=127.0.0.1"},
                            extra=tls_section(cert or self.cert, key or self.key), folder=self.folder)

    def server_tls(self, path: Path) -> ServerTLS:
        return ServerTLS(configmod.load(path))

    def run_twistd(self, path: Path) -> subprocess.CompletedProcess[str]:
        argv = [*twistd_command(), "-n", "--pidfile", "", "mx", "--config", str(path)]
        return subprocess.run(argv, check=False, cwd=path.parent, env=subprocess_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)

    async def assertStartupFails(self, path: Path, named: Path) -> str:
        done = await deferToThread(self.run_twistd, path)
        output = done.stdout + done.stderr
        self.assertNotEqual(done.returncode, 0, output)
        self.assertIn(str(named), output)
        self.assertNotIn("Traceback", output)
        [line] = [ln for ln in output.splitlines() if str(named) in ln]
        self.assertTrue(line.startswith("mx: "), line)
        return line

    async def test_garbage_key_stops_startup(self) -> None:
        bad = self.folder / "tls" / "garbage-key.pem"
        bad.write_bytes(b"this is not a key\n")
        path = self.config_file(key=bad)
        with self.assertRaises(TLSError) as caught:
            self.server_tls(path)
        self.assertIn(str(bad), str(caught.exception))
        line = await self.assertStartupFails(path, bad)
        self.assertIn("tls.key", line)

    async def test_key_not_matching_the_certificate_stops_startup(self) -> None:
        _other_cert, other_key = write_tls_files(self.folder / "other", _ca, name="other")
        path = self.config_file(key=other_key)
        with self.assertRaises(TLSError) as caught:
            self.server_tls(path)
        self.assertIn(str(other_key), str(caught.exception))
        line = await self.assertStartupFails(path, other_key)
        self.assertIn("does not match", line)

    async def test_missing_certificate_stops_startup(self) -> None:
        missing = self.folder / "tls" / "nowhere-cert.pem"
        path = self.config_file(cert=missing)
        await self.assertStartupFails(path, missing)

    async def test_garbage_certificate_stops_startup(self) -> None:
        bad = self.folder / "tls" / "garbage-cert.pem"
        bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        path = self.config_file(cert=bad)
        with self.assertRaises(TLSError) as caught:
            self.server_tls(path)
        self.assertIn(str(bad), str(caught.exception))
        await self.assertStartupFails(path, bad)

    def test_reload_keeps_the_old_certificate_when_the_new_files_are_bad(self) -> None:
        tls = self.server_tls(self.config_file())
        before = tls.getContext()
        self.key.write_bytes(b"garbage\n")
        self.assertFalse(tls.reload())
        self.assertIs(tls.getContext(), before)
        self.flushLoggedErrors()


class ReloadTests(TestCase):
    """SIGHUP to a `twistd -n mx` child: new connections get the renewed certificate."""

    timeout = 60

    async def test_sighup_reloads_the_certificate(self) -> None:
        folder = Path(self.mktemp()).resolve()
        cert, key = write_tls_files(folder / "tls", _ca)
        old_der = der(cert.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
        port = free_port()
        path = write_config(self, listen={"submissions": f"tcp:{port}:interface=127.0.0.1"},
                            extra=tls_section(cert, key), folder=folder)
        child = await deferToThread(start_twistd, self, path, port)
        ctx = client_tls_context(write_ca_file(folder, _ca))
        self.assertEqual(await deferToThread(peer_certificate, port, ctx), old_der)

        # renewal: a new certificate (new key, new serial) replaces the files in place
        new_cert, new_key = write_tls_files(folder / "renewed", _ca)
        new_der = der(new_cert.read_bytes().split(b"-----END CERTIFICATE-----")[0] + b"-----END CERTIFICATE-----\n")
        self.assertNotEqual(new_der, old_der)
        os.replace(new_key, key)
        os.replace(new_cert, cert)
        held = await deferToThread(self.open_connection, port, ctx)  # opened before the reload
        self.addCleanup(held.close)
        child.process.send_signal(signal.SIGHUP)

        def wait_for(expected: bytes) -> bytes:
            deadline = time.monotonic() + 15
            got = b""
            while time.monotonic() < deadline:
                got = peer_certificate(port, ctx)
                if got == expected:
                    return got
                time.sleep(0.1)
            return got

        self.assertEqual(await deferToThread(wait_for, new_der), new_der, child.output())
        # the connection made before the reload keeps working on its old session
        self.assertEqual(await deferToThread(self.noop, held), 250)

        # a broken renewal: the server logs it, keeps the current certificate and keeps serving
        key.write_bytes(b"garbage\n")
        child.process.send_signal(signal.SIGHUP)

        def wait_for_log() -> bool:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if "TLS reload failed" in child.output():
                    return True
                time.sleep(0.1)
            return False

        self.assertTrue(await deferToThread(wait_for_log), child.output())
        self.assertEqual(await deferToThread(peer_certificate, port, ctx), new_der)
        self.assertIsNone(child.process.poll())

    @staticmethod
    def open_connection(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        tls = ctx.wrap_socket(raw, server_hostname=HOSTNAME)
        assert tls.recv(1024).startswith(b"220 ")
        return tls

    @staticmethod
    def noop(tls: ssl.SSLSocket) -> int:
        try:
            tls.sendall(b"NOOP\r\n")
            return int(tls.recv(1024)[:3])
        finally:
            tls.close()
