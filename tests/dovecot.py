"""A private Dovecot for interop tests and benchmarks: the independent peer on mx's Maildirs.

`start_dovecot` writes a config of its own (nothing under /etc/dovecot is read or touched,
and the system service is never started): its own `base_dir`, `state_dir` and log files,
`listen = 127.0.0.1` on two free loopback ports (POP3 and IMAP; no TLS ports unless a
certificate is given), `mail_location = maildir:<mail_root>/%d/%n` -- the exact tree mx
writes at `<data_dir>/mail/<domain>/<local>/` -- and a passwd-file passdb. It runs
`dovecot -F -c CONFIG` as a child process in its own session, waits (bounded) for `+OK` on
POP3 and `* OK` on IMAP, and stops it at cleanup (SIGTERM to the master, then SIGKILL to the
process group it leads).

Passwords: mx's users file is a Dovecot passwd-file (`address:{ARGON2ID}$argon2id$...`), and
Debian's Dovecot 2.3 verifies ARGON2ID (libsodium), so with `users_file=` Dovecot reads mx's
own file; otherwise (or if this Dovecot lacks ARGON2ID) a `{PLAIN}` passwd-file is written
from `users`.

Ownership: Dovecot refuses mail access as root ("Mail access not allowed for root", and a
userdb uid 0 is rejected outright), so when the tests run as root Dovecot's mail processes
run as `nobody` (uid/gid 65534, `first_valid_uid = 1`) and `DovecotInstance.hand_over()`
chowns the mail tree to that uid before Dovecot looks at it -- what an operator has in
production, where mx and Dovecot share one vmail user. mx, running as root in the tests,
reads and renames Dovecot's files regardless. Run as an ordinary user, Dovecot runs
rootless as that user (no chroot, the user as internal and login user) and `hand_over()`
does nothing. Auth runs as root when root, so mx's 0600 users file is readable.

Dovecot keeps its index files (`dovecot.index*`) in the Maildir root, as it does by
default; mx must ignore them (they are Dovecot's own files, like `dovecot-uidvalidity*`).
"""

from __future__ import annotations

import grp
import imaplib
import os
import poplib
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "DovecotInstance",
    "FetchedMessage",
    "dovecot_available",
    "start_dovecot",
    "supports_argon2id",
]

NOBODY = 65534
START_TIMEOUT = 20.0
SOCKET_TIMEOUT = 10.0
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin"])
_LIBEXEC = (Path("/usr/lib/dovecot"), Path("/usr/libexec/dovecot"))


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def _libexec() -> Path | None:
    for d in _LIBEXEC:
        if (d / "pop3").is_file() and (d / "imap").is_file():
            return d
    return None


_available: list[str | None] = []


def dovecot_available() -> str | None:
    """None if a private Dovecot can run here, else the reason it cannot (for `skip`)."""
    if _available:
        return _available[0]
    reason = _check()
    _available.append(reason)
    return reason


def _check() -> str | None:
    if os.environ.get("MX_NO_DOVECOT"):
        return "MX_NO_DOVECOT is set"
    for tool in ("dovecot", "doveadm"):
        if _which(tool) is None:
            return (f"{tool} not installed (apt-get install dovecot-pop3d dovecot-imapd; "
                    ".ci/run does this when run as root)")
    if _libexec() is None:
        return "Dovecot's pop3/imap binaries are missing (install dovecot-pop3d and dovecot-imapd)"
    if os.geteuid() == 0:
        for user in ("dovecot", "dovenull"):
            try:
                pwd.getpwnam(user)
            except KeyError:
                return f"the {user!r} system user is missing (the dovecot-core package creates it)"
    try:
        out = subprocess.run([_which("dovecot") or "dovecot", "--version"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"dovecot --version failed: {e}"
    if out.returncode != 0 or not re.match(r"2\.[3-9]", out.stdout.strip()):
        return f"need Dovecot 2.3.x, found {out.stdout.strip() or out.stderr.strip()!r}"
    return None


_argon2: list[bool] = []


def supports_argon2id() -> bool:
    """Does this Dovecot verify `{ARGON2ID}` hashes (`doveadm pw -l` lists it)?"""
    if not _argon2:
        try:
            out = subprocess.run([_which("doveadm") or "doveadm", "pw", "-l"], capture_output=True,
                                 text=True, timeout=10)
            _argon2.append("ARGON2ID" in out.stdout.split())
        except (OSError, subprocess.TimeoutExpired):
            _argon2.append(False)
    return _argon2[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class FetchedMessage:
    """One message as `doveadm fetch 'uid flags guid'` reports it."""

    uid: int
    flags: frozenset[str]
    guid: str


@dataclass
class DovecotInstance:
    folder: Path          # config, state, logs (under the test's temp folder)
    config: Path
    base_dir: Path        # sockets: a short path under /tmp (unix socket paths are <108 bytes)
    mail_root: Path
    pop3_port: int
    imap_port: int
    pop3s_port: int | None
    imaps_port: int | None
    mail_uid: int
    mail_gid: int
    process: subprocess.Popen[bytes] = field(repr=False)

    # --- files --------------------------------------------------------------------------

    def log(self, limit: int = 8000) -> str:
        """The tail of Dovecot's error and info logs (for assertion messages)."""
        text = ""
        for name in ("dovecot.log", "dovecot-info.log", "dovecot.stderr"):
            try:
                text += f"--- {name}\n" + (self.folder / name).read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text[-limit:]

    def errors(self) -> list[str]:
        """Error/Fatal/Panic/Warning lines of Dovecot's error log."""
        try:
            lines = (self.folder / "dovecot.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []
        return [line for line in lines if re.search(r"\b(Error|Fatal|Panic|Warning):", line)]

    def hand_over(self) -> None:
        """Give the mail tree to Dovecot's mail user (root only; a no-op otherwise).

        Call it after mx wrote and before Dovecot reads or writes. Everything under
        `mail_root` is chowned to the mail uid; directories above it inside the test's own
        folders get o+x so that user can reach it."""
        if os.geteuid() != 0:
            return
        _chown_tree(self.mail_root, self.mail_uid, self.mail_gid)
        _make_reachable(self.mail_root)

    # --- clients ------------------------------------------------------------------------

    def pop3(self, user: str, password: str) -> poplib.POP3:
        """A logged-in `poplib.POP3` (USER/PASS) on Dovecot's POP3 port."""
        client = poplib.POP3("127.0.0.1", self.pop3_port, timeout=SOCKET_TIMEOUT)
        try:
            client.user(user)
            client.pass_(password)
        except BaseException:
            client.close()
            raise
        return client

    def imap(self, user: str, password: str) -> imaplib.IMAP4:
        """A logged-in `imaplib.IMAP4` on Dovecot's IMAP port."""
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=SOCKET_TIMEOUT)
        try:
            client.login(user, password)
        except BaseException:
            client.shutdown()
            raise
        return client

    def doveadm(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """`doveadm -c CONFIG ARGS...`; raises with the output and the log on failure."""
        argv = [_which("doveadm") or "doveadm", "-c", str(self.config), *args]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {out.returncode}:\n{out.stdout}{out.stderr}\n"
                                 f"{self.log()}")
        return out

    def fetch(self, user: str, mailbox: str = "INBOX") -> list[FetchedMessage]:
        """`doveadm fetch 'uid flags guid' mailbox M all` (Dovecot assigns UIDs if needed)."""
        out = self.doveadm("fetch", "-u", user, "uid flags guid", "mailbox", mailbox, "all").stdout
        found: list[FetchedMessage] = []
        record: dict[str, str] = {}
        for line in out.splitlines() + ["\f"]:
            if line.startswith("\f") or not line.strip():
                if "uid" in record:
                    found.append(FetchedMessage(int(record["uid"]), frozenset(record.get("flags", "").split()),
                                                record.get("guid", "")))
                record = {}
                continue
            key, _, value = line.partition(":")
            record[key.strip()] = value.strip()
        return found

    # --- lifetime -----------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the master and every process it started (idempotent, bounded)."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:  # the master leads its own session: catch children it left behind
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.base_dir, ignore_errors=True)


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        os.lchown(dirpath, uid, gid)
        for name in filenames:
            try:
                os.lchown(os.path.join(dirpath, name), uid, gid)
            except FileNotFoundError:
                pass


def _make_reachable(path: Path) -> None:
    """o+x on the ancestors of `path` that lack it, only inside the current directory
    (trial's _trial_temp; the benchmark's temp folder): never above it."""
    top = Path.cwd().resolve()
    for parent in path.resolve().parents:
        if parent == top or top not in parent.parents:
            break
        mode = parent.stat().st_mode
        if not mode & 0o001:
            os.chmod(parent, (mode & 0o7777) | 0o001)


def _passwd_line(address: str, password: str) -> str:
    if any(c in password for c in ":\n\r"):
        raise ValueError("a {PLAIN} passwd-file password cannot contain ':' or a newline")
    return f"{address.lower()}:{{PLAIN}}{password}\n"


def _config_text(
    *,
    folder: Path,
    base_dir: Path,
    mail_root: Path,
    passwd_file: Path,
    pop3_port: int,
    imap_port: int,
    pop3s_port: int,
    imaps_port: int,
    tls: tuple[Path, Path] | None,
    mail_uid: int,
    mail_gid: int,
    index_dir: Path | None,
    auth_user: str | None,
    extra: str,
) -> str:
    root = os.geteuid() == 0
    location = f"maildir:{mail_root}/%d/%n"
    if index_dir is not None:
        location += f":INDEX={index_dir}/%d/%n"
    lines = [
        "# A private test instance written by tests/dovecot.py: reads nothing under /etc/dovecot.",
        "protocols = pop3 imap",
        "listen = 127.0.0.1",
        f"base_dir = {base_dir}",
        f"state_dir = {folder / 'state'}",
        f"instance_name = mx-test-{os.getpid()}-{pop3_port}",
        f"log_path = {folder / 'dovecot.log'}",
        f"info_log_path = {folder / 'dovecot-info.log'}",
        "shutdown_clients = yes",
        "disable_plaintext_auth = no",
        "auth_mechanisms = plain login",
        f"mail_location = {location}",
        f"mail_home = {folder / 'home'}/%d/%n",
        f"mail_uid = {mail_uid}",
        f"mail_gid = {mail_gid}",
        "first_valid_uid = 1",
        "first_valid_gid = 1",
        "pop3_uidl_format = %08Xu%08Xv",  # Dovecot's default, and mx's
        "mail_max_userip_connections = 100",
        "login_greeting = Dovecot (mx interop) ready.",
        "passdb {",
        "  driver = passwd-file",
        f"  args = {passwd_file}",
        "}",
        "userdb {",
        "  driver = static",
        "  args = allow_all_users=yes",
        "}",
    ]
    if tls is not None:
        cert, key = tls
        lines += ["ssl = yes", f"ssl_cert = <{cert}", f"ssl_key = <{key}"]
    else:
        lines += ["ssl = no"]
    login_extra = [] if root else ["  chroot ="]
    lines += [
        "service pop3-login {",
        *login_extra,
        f"  inet_listener pop3 {{\n    port = {pop3_port}\n  }}",
        f"  inet_listener pop3s {{\n    port = {pop3s_port}\n  }}",
        "}",
        "service imap-login {",
        *login_extra,
        f"  inet_listener imap {{\n    port = {imap_port}\n  }}",
        f"  inet_listener imaps {{\n    port = {imaps_port}\n  }}",
        "}",
    ]
    if root:  # root can read mx's 0600 users file; "dovecot" is Dovecot's own default
        lines += ["service auth {", f"  user = {auth_user or 'root'}", "}"]
    else:  # rootless: everything runs as the current user
        me = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        lines += [
            f"default_internal_user = {me}",
            f"default_internal_group = {group}",
            f"default_login_user = {me}",
            "service anvil {\n  chroot =\n}",
            "service imap-urlauth-login {\n  chroot =\n}",
        ]
    if extra:
        lines.append(extra)
    return "\n".join(lines) + "\n"


def _greets(port: int, prefix: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
            if s.getsockname() == s.getpeername():
                return False
            return s.recv(256).startswith(prefix)
    except OSError:
        return False


def launch(
    folder: Path,
    mail_root: Path,
    users: Mapping[str, str],
    *,
    users_file: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    index_dir: Path | None = None,
    auth_user: str | None = None,
    extra: str = "",
    timeout: float = START_TIMEOUT,
) -> DovecotInstance:
    """Start a private Dovecot with its files in `folder` (no test case needed: the
    benchmark uses this); the caller must `stop()` it. See `start_dovecot`."""
    reason = dovecot_available()
    if reason is not None:
        raise RuntimeError(f"Dovecot is not available: {reason}")
    folder = folder.resolve()
    mail_root = mail_root.resolve()
    for sub in ("state", "home"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    mail_root.mkdir(parents=True, exist_ok=True)
    if users_file is not None and supports_argon2id():
        passwd_file = users_file.resolve()
    else:
        passwd_file = folder / "passwd"
        passwd_file.write_text("".join(_passwd_line(a, p) for a, p in users.items()), encoding="utf-8")
        passwd_file.chmod(0o600)
    root = os.geteuid() == 0
    mail_uid, mail_gid = (NOBODY, NOBODY) if root else (os.geteuid(), os.getegid())
    if root:
        os.chown(folder / "home", mail_uid, mail_gid)
        _make_reachable(folder / "home")
    last_error = ""
    for _attempt in range(3):  # a free port can be taken between the probe and the bind
        base_dir = Path(tempfile.mkdtemp(prefix="mxdc-", dir="/tmp"))
        base_dir.chmod(0o755)  # login processes (dovenull) must reach base_dir/login/
        ports = [_free_port() for _ in range(2)]
        tls_ports = [_free_port() for _ in range(2)] if tls is not None else [0, 0]
        config = folder / "dovecot.conf"
        config.write_text(_config_text(
            folder=folder, base_dir=base_dir, mail_root=mail_root, passwd_file=passwd_file,
            pop3_port=ports[0], imap_port=ports[1], pop3s_port=tls_ports[0], imaps_port=tls_ports[1],
            tls=tls, mail_uid=mail_uid, mail_gid=mail_gid, index_dir=index_dir, auth_user=auth_user,
            extra=extra,
        ), encoding="utf-8")
        for name in ("dovecot.log", "dovecot-info.log"):
            (folder / name).unlink(missing_ok=True)
        with open(folder / "dovecot.stderr", "wb") as err:
            process = subprocess.Popen([_which("dovecot") or "dovecot", "-F", "-c", str(config)],
                                       cwd=folder, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                       start_new_session=True)
        instance = DovecotInstance(folder, config, base_dir, mail_root, ports[0], ports[1],
                                   tls_ports[0] or None, tls_ports[1] or None, mail_uid, mail_gid, process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            if _greets(ports[0], b"+OK") and _greets(ports[1], b"* OK"):
                return instance
            time.sleep(0.05)
        last_error = instance.log()
        instance.stop()
        if "Address already in use" not in last_error:
            break
    raise RuntimeError(f"private Dovecot did not start within {timeout}s:\n{last_error}")


def start_dovecot(
    case: Any,
    mail_root: Path,
    users: Mapping[str, str],
    *,
    users_file: Path | None = None,
    tls: tuple[Path, Path] | None = None,
    index_dir: Path | None = None,
    auth_user: str | None = None,
    extra: str = "",
    timeout: float = START_TIMEOUT,
) -> DovecotInstance:
    """A private Dovecot serving `<mail_root>/<domain>/<local>/` over POP3 and IMAP on
    loopback; stopped at `case`'s cleanup. Blocking (a few hundred ms): from an async test
    call it through `deferToThread`.

    - `users`: {address: password}, the logins Dovecot accepts;
    - `users_file`: mx's users file, used as Dovecot's passwd-file if Dovecot verifies
      ARGON2ID (else `users` is written as a `{PLAIN}` passwd-file);
    - `tls`: (certificate, key) PEM files: `ssl = yes` and pop3s/imaps ports too;
    - `index_dir`: keep Dovecot's index files there instead of the Maildir root;
    - `auth_user`: the user Dovecot's auth process runs as when started as root (default
      root, so mx's 0600 users file is readable; "dovecot" is Dovecot's own default);
    - `extra`: more config lines, appended.
    """
    folder = Path(case.mktemp()).resolve()
    instance = launch(folder, mail_root, users, users_file=users_file, tls=tls, index_dir=index_dir,
                      auth_user=auth_user, extra=extra, timeout=timeout)
    case.addCleanup(instance.stop)
    return instance
