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
