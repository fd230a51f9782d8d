"""Shared helpers for the protocol tests: configs, users, in-process and subprocess servers.

Everything here is real: a config file written to disk and read with `mx.config.load`, a users
file written with `mx.users`, a server listening on a loopback TCP port, and blocking
clients (`smtplib`, raw sockets) that callers run in a thread (`deferToThread`) so the
reactor keeps serving while they wait. Every socket has a timeout and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from twisted.internet import endpoints
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase

from mx import config as configmod
from mx.config import Config
from mx.delivery import Delivery
from mx.routing import Router
from mx.smtpserver import SMTPServerFactory
from mx.users import UserDB, hash_password, read_users, write_users

ROOT = Path(__file__).resolve().parent.parent
HOSTNAME = "mx.example.test"
DOMAIN = "example.test"
CLIENT_HELO = "client.example"
SOCKET_TIMEOUT = 10.0
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")

_hashes: dict[str, str] = {}  # argon2 is slow on purpose: hash each test password once


# --- config and users -------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(value)


def write_config(
    case: TestCase,
    *,
    listen: Mapping[str, str] | None = None,
    limits: Mapping[str, Any] | None = None,
    aliases: Mapping[str, list[str]] | None = None,
    extra: str = "",
    folder: Path | None = None,
) -> Path:
    """Write `<tmp>/mx.toml` for mx.example.test with data in `<tmp>/data`; return its path.

    Every `[listen]` key is "" (disabled) unless given in `listen`.
    """
    if folder is None:
        folder = Path(case.mktemp()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        f"hostname = {_toml(HOSTNAME)}",
        'data_dir = "data"',
        f"local_domains = {_toml([DOMAIN])}",
        "",
        "[listen]",
    ]
    given = dict(listen or {})
    for name in SERVICES:
        lines.append(f"{name} = {_toml(given.pop(name, ''))}")
    assert not given, f"unknown services {given}"
    if limits:
        lines += ["", "[limits]"] + [f"{k} = {_toml(v)}" for k, v in limits.items()]
    if aliases:
        lines += ["", "[aliases]"] + [f"{_toml(k)} = {_toml(v)}" for k, v in aliases.items()]
    if extra:
        lines += ["", extra]
    path = folder / "mx.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_config(case: TestCase, **kwargs: Any) -> Config:
    """`write_config` then `mx.config.load` it."""
    return configmod.load(write_config(case, **kwargs))


def add_users(config: Config, users: Mapping[str, str]) -> None:
    """Add `{address: password}` to the config's users file (created if missing)."""
    path = config.auth.users_file
    path.parent.mkdir(parents=True, exist_ok=True)
    table = read_users(path)
    for address, password in users.items():
        if password not in _hashes:
            _hashes[password] = hash_password(password)
        table[address.lower()] = _hashes[password]
    write_users(path, table)


def maildir(config: Config, local: str, domain: str = DOMAIN) -> Path:
    return config.data_dir / "mail" / domain / local


def new_files(config: Config, local: str, domain: str = DOMAIN) -> list[Path]:
    try:
        return sorted((maildir(config, local, domain) / "new").iterdir())
    except FileNotFoundError:
        return []


def all_new_files(data_dir: Path) -> list[Path]:
    """Every file in any `new/` under `<data_dir>/mail`."""
    return sorted(p for p in (data_dir / "mail").glob("*/*/new/*") if p.is_file())


def split_delivered(content: bytes) -> tuple[bytes, bytes, bytes]:
    """A delivered file into (Return-Path line, the Received header, the client's bytes)."""
    first, sep, rest = content.partition(b"\r\n")
    assert sep and first.startswith(b"Return-Path: "), content[:200]
    m = re.match(rb"Received: [^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", rest)
    assert m is not None, rest[:300]
    return first, m.group(0), rest[m.end() :]


def size_from_name(path: Path) -> int:
    m = re.search(r",S=(\d+)", path.name)
    assert m is not None, path.name
    return int(m.group(1))


# --- in-process server ------------------------------------------------------------------


@dataclass
class Server:
    config: Config
    port: int
    factory: SMTPServerFactory
    pool: ThreadPool
    users: UserDB = field(repr=False)


async def start_server(case: TestCase, config: Config, reactor: Any = None) -> Server:
    """Listen with mx's SMTP factory on 127.0.0.1:<ephemeral>, wired like `MailService._listen`.

    Cleanup (stop listening, drain connections, stop the disk pool) is registered on `case`.
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    config.data_dir.mkdir(parents=True, exist_ok=True)
    pool = ThreadPool(minthreads=1, maxthreads=4, name="test-mx-disk")
    pool.start()
    case.addCleanup(pool.stop)  # runs last
    users = UserDB(config.auth.users_file)
    router = Router(config, users.exists)
    delivery = Delivery(config, reactor, pool)
    factory = SMTPServerFactory(config=config, router=router, delivery=delivery, clock=reactor, kind="smtp")
    case.addCleanup(factory.shutdown)
    endpoint = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    listening = await endpoint.listen(factory)
    case.addCleanup(listening.stopListening)  # runs first
    return Server(config, listening.getHost().port, factory, pool, users)


def clocked_authenticator(case: TestCase, config: Config) -> tuple[ThreadPool, Any, UserDB, Any]:
    """(pool, clock, users, authenticator) for tests below the socket: real password checks
    in a small pool (stopped at cleanup), failure brakes on a `task.Clock`."""
    from twisted.internet import reactor
    from twisted.internet.task import Clock

    from mx.auth import Authenticator, FailureTracker

    pool = ThreadPool(minthreads=1, maxthreads=2, name="test-auth")
    pool.start()
    case.addCleanup(pool.stop)
    clock = Clock()
    users = UserDB(config.auth.users_file)
    auth = Authenticator(users, reactor, pool)
    auth.failures = FailureTracker(clock=clock.seconds)
    return pool, clock, users, auth


# --- blocking clients (run them in a thread) --------------------------------------------


class RawClient:
    """A byte-exact SMTP client on a plain socket; every read has a timeout."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = SOCKET_TIMEOUT) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buf += data
        return True

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed by server; partial {self.buf!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> tuple[int, str]:
        """One reply: (code, text of all lines joined by newlines, without the codes)."""
        texts = []
        while True:
            line = self.read_line()
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
                raise AssertionError(f"malformed reply line {line!r}")
            texts.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(texts)

    def replies(self, n: int) -> list[tuple[int, str]]:
        return [self.reply() for _ in range(n)]

    def command(self, line: bytes | str) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    def until_closed(self) -> list[tuple[int, str]]:
        """Every reply until the server closes the connection."""
        out = []
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    assert not self.buf, f"trailing bytes before close: {self.buf!r}"
                    return out
            out.append(self.reply())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def smtp_client(port: int, helo: str = CLIENT_HELO) -> Any:
    """An `smtplib.SMTP` connected to the server (call `.ehlo()` yourself)."""
    import smtplib

    return smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=SOCKET_TIMEOUT)


# --- subprocess server ------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    """The environment for child processes: this checkout first on the path."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        PYTHONUNBUFFERED="1",
    )


def twistd_command() -> list[str]:
    """How to run twistd with this interpreter.

    `python -m twisted` is the newer `twist` runner (no `-n`, no `--pidfile`), so use the
    `twistd` script installed next to the interpreter, or its entry point as a fallback.
    """
    script = Path(sys.executable).parent / "twistd"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


def mx_command() -> list[str]:
    script = Path(sys.executable).parent / "mx"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "mx.cli"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for configs of child processes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return port_accepts(port, host)


@dataclass
class Child:
    process: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def output(self) -> str:
        text = ""
        for p in (self.stdout, self.stderr):
            try:
                text += p.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text[-6000:]


def spawn(case: TestCase, argv: list[str], cwd: Path, name: str = "child") -> Child:
    """Start `argv` in `cwd`, output to files beside it; killed at cleanup if still running."""
    out, err = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
    with open(out, "wb") as o, open(err, "wb") as e:
        process = subprocess.Popen(argv, cwd=cwd, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=o, stderr=e)

    def reap() -> None:
        if process.poll() is None:
            process.kill()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    case.addCleanup(reap)
    return Child(process, out, err)


def wait_until_accepting(child: Child, port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Block until `port` accepts (or fail with the child's output); bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise AssertionError(f"server exited with {child.process.returncode}:\n{child.output()}")
        if port_accepts(port, host):
            return
        time.sleep(0.05)
    raise AssertionError(f"server did not accept on {host}:{port} within {timeout}s:\n{child.output()}")


def start_twistd(case: TestCase, config_path: Path, port: int, cwd: Path | None = None) -> Child:
    """`twistd -n --pidfile '' mx --config PATH` as a child process; waits until `port` accepts.

    Blocking: call it through `deferToThread` from an async test.
    """
    cwd = cwd or config_path.parent
    argv = [*twistd_command(), "-n", "--pidfile", "", "mx", "--config", str(config_path)]
    child = spawn(case, argv, cwd, name="twistd")
    wait_until_accepting(child, port)
    return child


# --- DNS: a twisted.names server on loopback ---------------------------------------------


class ServFail(Exception):
    """Raised by `ServFailAuthority`; twisted.names answers SERVFAIL for any non-DomainError
    (and log.err()s it: a test that triggers it calls `flushLoggedErrors(ServFail)`)."""


def _dns_imports() -> Any:
    from twisted.names import authority, dns as tdns, error, server

    return authority, tdns, error, server


def zone_authority(records: list[tuple[str, Any]], origin: str = "test") -> Any:
    """A twisted.names authority for `origin` holding `records` (`(name, Record_*)` pairs):
    names under `origin` that are not listed get NXDOMAIN."""
    authority, tdns, _error, _server = _dns_imports()

    class ZoneAuthority(authority.FileAuthority):
        def __init__(self) -> None:
            super().__init__(None)

        def loadFile(self, _: object) -> None:
            soa = tdns.Record_SOA(mname=b"ns." + origin.encode(), rname=b"root." + origin.encode(),
                                  serial=1, refresh=60, retry=60, expire=60, minimum=60)
            self.soa = (origin.encode(), soa)
            self.records = {origin.encode(): [soa]}
            for name, record in records:
                self.records.setdefault(name.encode().lower(), []).append(record)

    return ZoneAuthority()


def servfail_authority(names: tuple[str, ...]) -> Any:
    """SERVFAIL for `names`; "not mine" (the next authority answers) for anything else."""
    authority, _tdns, error, _server = _dns_imports()
    from twisted.internet import defer

    failing = {n.encode().lower() for n in names}

    class ServFailAuthority(authority.FileAuthority):
        def __init__(self) -> None:
            super().__init__(None)

        def loadFile(self, _: object) -> None:
            self.soa = None
            self.records = {}

        def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Any:
            if name.lower() in failing:
                return defer.fail(ServFail(name))
            return defer.fail(error.DomainError(name))

    return ServFailAuthority()


def serve_dns(case: TestCase, records: list[tuple[str, Any]], *, servfail: tuple[str, ...] = (),
              origin: str = "test", host: str = "127.0.0.1") -> int:
    """Run a twisted.names server for `origin` on `host`, UDP and TCP on one port; return it.

    Stopped at cleanup. `servfail` names get SERVFAIL.
    """
    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    _authority, tdns, _error, server = _dns_imports()
    factory = server.DNSServerFactory(authorities=[servfail_authority(servfail), zone_authority(records, origin)])
    factory.noisy = False
    udp = tdns.DNSDatagramProtocol(controller=factory)
    udp.noisy = False
    for _ in range(20):  # TCP first: a failed UDP bind leaves `udp` unattached
        tcp_port = reactor.listenTCP(0, factory, interface=host)
        number = tcp_port.getHost().port
        try:
            udp_port = reactor.listenUDP(number, udp, interface=host)
        except CannotListenError:
            tcp_port.stopListening()
            continue
        case.addCleanup(tcp_port.stopListening)
        case.addCleanup(udp_port.stopListening)
        return number
    raise AssertionError("no port free for both UDP and TCP")


# --- aiosmtpd as the remote MX ----------------------------------------------------------


def common_free_port(hosts: tuple[str, ...]) -> int:
    """A TCP port that was free a moment ago on every one of the loopback `hosts`."""

    def bindable(host: str, port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
        return True

    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        if all(bindable(h, port) for h in hosts[1:]):
            return port
    raise AssertionError(f"no port free on all of {hosts}")


@dataclass
class Stored:
    """One message a remote MX took (250 after DATA)."""

    host: str  # the loopback address it was received on
    sender: str
    rcpts: list[str]
    content: bytes
    tls: bool

    @property
    def subject(self) -> str:
        m = re.search(rb"^Subject: ([^\r\n]*)", self.content, re.M)
        return m.group(1).decode() if m else ""


class RemoteHandler:
    """aiosmtpd handler for a remote MX the test can steer (attributes are read per command).

    - `greeting`: sent instead of the 220 banner (e.g. "421 4.3.2 busy"), None for normal;
    - `rcpt_reply`: the reply to every RCPT not in `rcpt_replies` (None: 250);
    - `rcpt_replies`: {address: reply} for a per-recipient mix;
    - `data_reply`: the reply after the final dot instead of 250 (None: store, 250);
    - `data_delay`: seconds to sit on a message before answering (a slow MX).
    Every stored message is appended to `messages`; every MAIL to `mails`.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.greeting: str | None = None
        self.rcpt_reply: str | None = None
        self.rcpt_replies: dict[str, str] = {}
        self.data_reply: str | None = None
        self.data_delay = 0.0
        self.messages: list[Stored] = []
        self.mails: list[str] = []

    def accept_all(self) -> None:
        self.greeting = self.rcpt_reply = self.data_reply = None
        self.rcpt_replies = {}

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        self.mails.append(address)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        reply = self.rcpt_replies.get(address, self.rcpt_reply)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.data_delay:
            import asyncio

            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        self.messages.append(Stored(self.host, envelope.mail_from, list(envelope.rcpt_tos),
                                    envelope.original_content, session.ssl is not None))
        return "250 2.0.0 queued"


def start_remote_mx(case: TestCase, host: str, port: int, name: str, *, tls_cert: Any = None,
                    handler: RemoteHandler | None = None) -> RemoteHandler:
    """aiosmtpd on `host:port` (its own thread) greeting as `name`; stopped at cleanup.

    `tls_cert`: a `trustme.LeafCert` to offer STARTTLS with.
    """
    import logging
    import ssl

    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import SMTP

    class RemoteSMTP(SMTP):
        _greeted = False

        async def push(self, status: Any) -> None:
            if not self._greeted:  # the first thing sent is the banner
                self._greeted = True
                greeting = getattr(self.event_handler, "greeting", None)
                if greeting:
                    status = greeting
            await super().push(status)

    class RemoteController(Controller):
        def factory(self) -> SMTP:
            return RemoteSMTP(self.handler, **self.SMTP_kwargs)

    handler = handler or RemoteHandler(host)
    kwargs: dict[str, Any] = {}
    if tls_cert is not None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_cert.configure_cert(ctx)
        kwargs["tls_context"] = ctx
    aiosmtpd_log = logging.getLogger("mail.log")  # it logs dropped sessions with tracebacks
    level = aiosmtpd_log.level
    aiosmtpd_log.setLevel(logging.CRITICAL)
    case.addCleanup(aiosmtpd_log.setLevel, level)
    controller = RemoteController(handler, hostname=host, port=port, server_hostname=name, ready_timeout=10, **kwargs)
    controller.start()
    case.addCleanup(controller.stop)
    return handler


# --- the whole server in-process (mx.tap.build) -----------------------------------------


def listening_port(svc: Any) -> int:
    """The TCP port a started `StreamServerEndpointService` listens on."""
    found: list[int] = []

    def got(port: Any) -> Any:
        found.append(port.getHost().port)
        return port

    svc._waitingForPort.addCallback(got)  # fired at startService for TCP endpoints
    assert found, "the listener has not started"
    return found[0]


async def start_mail_service(case: TestCase, config: Config, **relay_options: Any) -> Any:
    """`mx.tap.build(config, reactor, **relay_options)`, started, queue loaded.

    Its `smtp_port` attribute is set to the smtp listener's port. Stopped at cleanup (if
    still running); with a `task.Clock` as `clock`, attempts still running at the stop are cut
    after a few real seconds by advancing that clock past the relay's grace time.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock, deferLater

    from mx import relay as relaymod
    from mx.tap import build

    mail = build(config, reactor, **relay_options)
    mail.startService()

    async def stop() -> None:
        if not mail.running:
            return
        d = mail.stopService()
        clock = relay_options.get("clock")
        for i in range(600):  # bounded: at most about 30 s
            if d.called:
                break
            await deferLater(reactor, 0.05)
            if isinstance(clock, Clock) and i > 40:
                clock.advance(relaymod.STOP_GRACE)
        await d

    case.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    await mail.relay.loaded
    listeners = {s.name: s for s in mail.listeners}
    mail.smtp_port = listening_port(listeners["smtp"]) if "smtp" in listeners else None
    return mail


def run_mx(config_path: Path, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`python -m mx.cli --config PATH ARGS...` as a subprocess (blocking: use a thread)."""
    argv = [sys.executable, "-m", "mx.cli", "--config", str(config_path), *args]
    return subprocess.run(argv, cwd=config_path.parent, env=subprocess_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def queue_records(data_dir: Path) -> dict[str, Any]:
    """{queue id: QueueEntry} read from `<data_dir>/queue/*.json` (what is on disk now)."""
    from mx.spool import QueueEntry

    out: dict[str, Any] = {}
    for path in sorted((data_dir / "queue").glob("*.json")):
        try:
            out[path.stem] = QueueEntry.from_json(path.read_bytes())
        except FileNotFoundError:
            continue  # removed meanwhile
    return out


# --- TLS: a throwaway CA (trustme), certificate files, verifying clients -------------------


def write_tls_files(folder: Path, ca: Any, hostname: str = HOSTNAME, name: str = "server",
                    key_type: Any = None) -> tuple[Path, Path]:
    """Issue a certificate for `hostname` from the `trustme.CA` `ca` and write it as
    `<folder>/<name>-cert.pem` (leaf first, then the chain) and `<folder>/<name>-key.pem`.

    `key_type`: a `trustme.KeyType` for the leaf (trustme's default is ECDSA)."""
    folder.mkdir(parents=True, exist_ok=True)
    leaf = ca.issue_cert(hostname) if key_type is None else ca.issue_cert(hostname, key_type=key_type)
    cert, key = folder / f"{name}-cert.pem", folder / f"{name}-key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return cert, key


def write_ca_file(folder: Path, ca: Any) -> Path:
    """The CA certificate as `<folder>/ca.pem` (for `ssl.create_default_context(cafile=...)`)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ca.pem"
    path.write_bytes(ca.cert_pem.bytes())
    return path


def tls_section(cert: Path, key: Path) -> str:
    """A `[tls]` section for `write_config(extra=...)`."""
    return f"[tls]\ncertificate = {_toml(str(cert))}\nkey = {_toml(str(key))}\n"


def client_tls_context(cafile: Path | None) -> Any:
    """A client `ssl.SSLContext`: verifies the server against `cafile` (hostname checked), or
    verifies nothing when `cafile` is None (the self-signed case)."""
    import ssl

    if cafile is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(cafile))


def starttls_client(port: int, context: Any, server_name: str = HOSTNAME, helo: str = CLIENT_HELO) -> Any:
    """An `smtplib.SMTP` on 127.0.0.1:`port` after EHLO, STARTTLS and EHLO again; the
    certificate is checked against `server_name` (SNI too), not the address connected to."""
    import smtplib

    s = smtplib.SMTP(local_hostname=helo, timeout=SOCKET_TIMEOUT)
    s._host = server_name  # smtplib passes _host as server_hostname to wrap_socket
    try:
        s.connect("127.0.0.1", port)
        s.ehlo()
        s.starttls(context=context)
        s.ehlo()
    except BaseException:
        s.close()
        raise
    return s


def smtps_client(port: int, context: Any, server_name: str = HOSTNAME, helo: str = CLIENT_HELO) -> Any:
    """An `smtplib.SMTP_SSL` (implicit TLS) on 127.0.0.1:`port` after EHLO; checked against
    `server_name`."""
    import smtplib

    s = smtplib.SMTP_SSL(local_hostname=helo, timeout=SOCKET_TIMEOUT, context=context)
    s._host = server_name
    try:
        s.connect("127.0.0.1", port)
        s.ehlo()
    except BaseException:
        s.close()
        raise
    return s


def wrap_raw(client: RawClient, context: Any, server_name: str = HOSTNAME) -> None:
    """TLS handshake on a `RawClient`'s socket in place (after the server's 220 to STARTTLS).

    Asserts that nothing the server sent before the handshake is still unread.
    """
    assert client.buf == b"", f"unread bytes before the TLS handshake: {client.buf!r}"
    client.sock = context.wrap_socket(client.sock, server_hostname=server_name)


def peer_certificate(port: int, context: Any = None, server_name: str = HOSTNAME) -> bytes:
    """The DER certificate an implicit-TLS listener on 127.0.0.1:`port` presents."""
    ctx = context or client_tls_context(None)
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            assert isinstance(der, bytes), der
            return der


def service_ports(mail: Any) -> dict[str, int]:
    """{service name: port} for a started `MailService` (`start_mail_service`)."""
    return {s.name: listening_port(s) for s in mail.listeners}


def start_twistd_smtp(case: TestCase, config_path: Path, port: int, timeout: float = 15.0) -> Child:
    """`start_twistd`, then wait (bounded) for a 220 banner on `port`: a bare connect can
    succeed without the server (a self-connect to a free ephemeral port, or a stranger).
    Blocking: call it through `deferToThread`."""
    child = start_twistd(case, config_path, port)
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if child.process.poll() is not None:
            raise AssertionError(f"server exited with {child.process.returncode}:\n{child.output()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                if s.getsockname() != s.getpeername() and s.recv(4).startswith(b"220"):
                    return child
        except OSError as e:
            last = e
        time.sleep(0.05)
    raise AssertionError(f"no SMTP banner on port {port} within {timeout}s ({last}):\n{child.output()}")
