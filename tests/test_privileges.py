"""Start as root, drop to an unprivileged user with twistd's `--uid`/`--gid`, keep working.

The real `twistd -n mx` runs as a child started as root with `--uid 65534 --gid 65534`
(`nobody`/`nogroup` on Debian). `makeService` runs as root before the drop and must leave
what it made in `data_dir` (queue lock, self-signed certificate, users file) to that user;
then the test checks that the server really runs as that user, delivers into a Maildir
(files owned by the user), relays to an aiosmtpd on loopback, and that `mx queue list` and
`mx queue flush`, run as that user too, work on the same `data_dir`.

Skipped unless running as root (CI runs as root). The user must be able to reach the test's
files and run Python: the temp folder is made 0755 and its parents are checked; if this
interpreter lives where the user cannot read it (a pyenv under a 0700 /root), the test runs
the same Python through a hard-linked mirror of its installation in the temp folder (the
venv's site-packages reused), and skips with the reason if even that is impossible.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from mx import config as configmod
from tests.support import (
    ROOT,
    _toml,
    add_users,
    free_port,
    new_files,
    queue_records,
    smtp_client,
    spawn,
    start_remote_mx,
    subprocess_env,
    wait_until_accepting,
    write_config,
)

UID = GID = 65534  # nobody / nogroup
ALICE, FWD, RCPT = "alice@example.test", "fwd@example.test", "rcpt@remote.test"
WAIT = 20.0  # seconds: the bound on every wait here
IMPORTS = "import mx.cli, mx.tap, twisted.scripts.twistd, twisted.plugins.mx_plugin"
TWISTD = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def as_user() -> dict[str, Any]:
    """`subprocess.run` arguments that start the child as UID:GID with no extra groups."""
    return {"user": UID, "group": GID, "extra_groups": []}


def untraversable(folder: Path) -> Path | None:
    """The first of `folder` and its parents that others may not search (no o+x), if any."""
    for p in [folder, *folder.parents]:
        if not os.stat(p).st_mode & stat.S_IXOTH:
            return p
    return None


def runs_as_user(python: list[str], env: dict[str, str]) -> str | None:
    """None if `python` imports mx and twistd as the user; else what went wrong."""
    try:
        done = subprocess.run([*python, "-c", IMPORTS], env=env, cwd="/", stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60, **as_user())
    except OSError as e:
        return str(e)
    if done.returncode == 0:
        return None
    return (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]


def mirror_python(folder: Path) -> tuple[list[str], dict[str, str]]:
    """This interpreter rebuilt in `folder` from hard links (no copies: fast, no space): the
    base installation without its site-packages and tests, and a venv on top whose
    site-packages is this venv's. Raises OSError (e.g. EXDEV) if linking is impossible."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    mirror = folder / "python"
    (mirror / "bin").mkdir(parents=True)
    os.link(os.path.realpath(sys.executable), mirror / "bin" / version)
    (mirror / "lib").mkdir()
    for lib in (base / "lib").glob("libpython*"):
        os.link(lib, mirror / "lib" / lib.name)
    shutil.copytree(base / "lib" / version, mirror / "lib" / version, copy_function=os.link,
                    ignore=shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter"), symlinks=True)
    venv = folder / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "lib" / version).mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {mirror / 'bin'}\ninclude-system-site-packages = false\n")
    (venv / "bin" / "python3").symlink_to(mirror / "bin" / version)
    (venv / "lib" / version / "site-packages").symlink_to(sysconfig.get_paths()["purelib"])
    for p in [folder, *(q for q in folder.rglob("*") if q.is_dir() and not q.is_symlink())]:
        p.chmod(p.stat().st_mode | 0o055)
    env = dict(subprocess_env(), LD_LIBRARY_PATH=str(mirror / "lib"), PYTHONDONTWRITEBYTECODE="1")
    return [str(venv / "bin" / "python3")], env


def wait_for(condition: Any, what: str, child: Any = None, timeout: float = WAIT) -> None:
    """Poll `condition()` (bounded); blocking, so call it in a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if child is not None and child.process.poll() is not None:
            raise AssertionError(f"server exited with {child.process.returncode} waiting for {what}:\n{child.output()}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f":\n{child.output()}" if child else ""))


def proc_ids(pid: int) -> dict[str, list[int]]:
    """The real, effective, saved and filesystem ids of `pid` from /proc/<pid>/status."""
    ids = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid"):
            ids[key] = [int(v) for v in value.split()]
        elif key == "Groups":
            ids[key] = [int(v) for v in value.split()]
    return ids


def ids_after_start(pid: int, uid: int, timeout: float) -> dict[str, list[int]]:
    """`proc_ids(pid)` once its real uid is `uid`, or when `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        ids = proc_ids(pid)
        if ids["Uid"][0] == uid or time.monotonic() >= deadline:
            return ids
        time.sleep(0.01)


class PrivilegeDropTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root: starts twistd as root with --uid/--gid (CI runs as root)")
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        self.folder.chmod(0o755)
        self.folder.parent.chmod(0o755)  # trial's mkdtemp for this test alone: 0700
        blocked = untraversable(self.folder.parent)
        if blocked is not None:
            raise SkipTest(f"uid {UID} cannot traverse {blocked} (mode {stat.S_IMODE(os.stat(blocked).st_mode):o}), "
                           "a parent of the test's temp folder")
        blocked = untraversable(ROOT)
        if blocked is not None:
            raise SkipTest(f"uid {UID} cannot traverse {blocked}, so it cannot import mx from {ROOT}")
        self.python, self.env = [sys.executable], subprocess_env()
        problem = runs_as_user(self.python, self.env)
        if problem is not None:
            try:
                self.python, self.env = mirror_python(self.folder / "interpreter")
            except OSError as e:
                raise SkipTest(f"uid {UID} cannot run {sys.executable} ({problem}), "
                               f"and it cannot be mirrored in the temp folder: {e}") from None
            again = runs_as_user(self.python, self.env)
            if again is not None:
                raise SkipTest(f"uid {UID} cannot run {sys.executable} ({problem}) nor its mirror ({again})")

    def mx(self, config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        """`mx --config PATH ARGS...` as the unprivileged user (blocking)."""
        return subprocess.run([*self.python, "-m", "mx.cli", "--config", str(config_path), *args],
                              cwd=config_path.parent, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=WAIT, **as_user())

    async def test_dropped_server_delivers_relays_and_answers_mx_queue(self) -> None:
        remote_port = free_port()
        remote = start_remote_mx(self, "127.0.0.1", remote_port, "remote.test")
        remote.rcpt_reply = "451 4.3.0 not yet"  # the first try defers: the message stays queued
        smtp_port = free_port()
        config_path = write_config(
            self,
            folder=self.folder / "etc",
            listen={"smtp": f"tcp:{smtp_port}:interface=127.0.0.1"},
            aliases={FWD: [RCPT]},
            extra=f"[relay]\nsmarthost = {_toml(f'127.0.0.1:{remote_port}')}\n"
                  'retry = ["1h"]\ntls = "off"\n',
        )
        config_path.parent.chmod(0o755)
        config = configmod.load(config_path)
        add_users(config, {ALICE: "alice-pw"})  # as root, 0600, inside data_dir
        argv = [*self.python, "-c", TWISTD, "-n", "--pidfile", "", "--uid", str(UID), "--gid", str(GID),
                "mx", "--config", str(config_path)]
        child = spawn(self, argv, config_path.parent, name="twistd")  # as root; twistd switches
        await deferToThread(wait_until_accepting, child, smtp_port, WAIT)

        # The server process itself now runs as the user: real, effective, saved, fs ids.
        # (twistd listens before it sheds privileges, so the port may accept a moment before
        # the last switch, setuid, is made: wait, bounded, for the start-up to finish.)
        ids = await deferToThread(ids_after_start, child.process.pid, UID, WAIT)
        self.assertEqual(ids["Uid"], [UID] * 4, ids)
        self.assertEqual(ids["Gid"], [GID] * 4, ids)
        self.assertNotIn(0, ids.get("Groups", []), ids)

        # Local delivery into alice's Maildir, files owned by the user.
        code, text = await deferToThread(send, smtp_port, ALICE, "local")
        self.assertEqual(code, 250, text)
        [delivered] = new_files(config, "alice")
        self.assertEqual((delivered.stat().st_uid, delivered.stat().st_gid), (UID, GID))
        self.assertIn(b"Subject: local", delivered.read_bytes())

        # Relayed: accepted into the queue, tried once (deferred by the remote's 451).
        code, text = await deferToThread(send, smtp_port, FWD, "remote")
        self.assertEqual(code, 250, text)
        await deferToThread(wait_for, lambda: attempts(config.data_dir) == [1], "the first relay attempt", child)
        [queue_id] = queue_records(config.data_dir)

        # `mx queue list` as the user.
        listed = await deferToThread(self.mx, config_path, "queue", "list", "--json")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        rows = json.loads(listed.stdout)
        self.assertEqual([(r["id"], r["recipients"]) for r in rows], [(queue_id, [RCPT])], rows)

        # `mx queue flush` as the user: the running server retries now (retry is 1h).
        remote.accept_all()
        flushed = await deferToThread(self.mx, config_path, "queue", "flush")
        self.assertEqual(flushed.returncode, 0, flushed.stderr)
        self.assertIn("flushing", flushed.stdout)  # it saw the running server (the lock)
        await deferToThread(wait_for, lambda: remote.messages, "the flushed message at the remote", child)
        [stored] = remote.messages
        self.assertEqual(stored.rcpts, [RCPT])
        self.assertEqual(stored.subject, "remote")
        await deferToThread(wait_for, lambda: not queue_records(config.data_dir), "the queue to empty", child)

        # Nothing in data_dir is left to root (what makeService made before the drop included).
        root_owned = [str(p) for p in [config.data_dir, *config.data_dir.rglob("*")] if p.lstat().st_uid != UID]
        self.assertEqual(root_owned, [])
        self.assertTrue((config.data_dir / "queue" / ".lock").exists())
        self.assertTrue((config.data_dir / "tls" / "selfsigned-key.pem").exists())


def send(port: int, rcpt: str, subject: str) -> tuple[int, bytes]:
    body = f"From: <{ALICE}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n\r\nHello.\r\n".encode()
    with smtp_client(port) as s:
        s.ehlo()
        assert s.mail("sender@client.example")[0] == 250
        code, text = s.rcpt(rcpt)
        assert code == 250, (code, text)
        reply = s.data(body)
        s.quit()
    return reply


def attempts(data_dir: Path) -> list[int]:
    return [r.attempts for e in queue_records(data_dir).values() for r in e.recipients]



class HandOverTests(TestCase):
    """`mx.tap.hand_over` and `drop_target` on their own (as root, no server)."""

    def setUp(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root: chowns root-owned files to another user")

    def test_drop_target_follows_twistd(self) -> None:
        from mx.tap import Options, drop_target

        def options(**parent: Any) -> Options:
            o = Options()
            o.parent = dict(parent)  # twistd's ServerOptions is a dict of its options too
            return o

        self.assertIsNone(drop_target(Options()))  # not under twistd
        self.assertIsNone(drop_target(options(uid=None, gid=None)))
        self.assertIsNone(drop_target(options()))  # a twistd without --uid/--gid
        self.assertEqual(drop_target(options(uid=UID, gid=GID)), (UID, GID))
        self.assertEqual(drop_target(options(uid=UID, gid=None)), (UID, pwd.getpwuid(UID).pw_gid))
        self.assertEqual(drop_target(options(uid=None, gid=GID)), (-1, GID))

    def test_only_what_the_server_writes_and_never_through_links(self) -> None:
        from mx.tap import hand_over

        folder = Path(self.mktemp()).resolve()
        config = configmod.load(write_config(self, folder=folder))
        data = config.data_dir
        outside = folder / "outside"
        outside.mkdir()
        secret, target = outside / "secret", outside / "target"
        secret.write_bytes(b"root's")
        target.write_bytes(b"root's too")
        for d in ("queue/control", "tmp", "mail/example.test/alice/new", "tls", "dkim"):
            (data / d).mkdir(parents=True, exist_ok=True)
        mine = [data / "queue" / "1.json", data / "queue" / "1.eml", data / "queue" / "control" / "flush.-.1",
                data / "tmp" / "spill", data / "tls" / "selfsigned-key.pem", data / "tls" / "selfsigned-cert.pem"]
        for p in mine:
            p.write_bytes(b"x")
        add_users(config, {ALICE: "alice-pw"})  # <data_dir>/users
        os.link(secret, data / "queue" / "2.json")  # a planted hard link to a root file
        (data / "queue" / "3.json").symlink_to(target)  # and a symlink
        (data / "tmp" / "dir").symlink_to(outside, target_is_directory=True)
        (data / "tls" / "operator-key.pem").write_bytes(b"k")  # not mx's to give
        (data / "mail" / "example.test" / "alice" / "new" / "old").write_bytes(b"m")

        hand_over(config, UID, GID)

        def owner(p: Path) -> tuple[int, int]:
            st = p.lstat()
            return st.st_uid, st.st_gid

        given = [data, data / "queue", data / "queue" / "control", data / "tmp", data / "mail", data / "tls",
                 config.auth.users_file, *mine]
        self.assertEqual({str(p): owner(p) for p in given}, {str(p): (UID, GID) for p in given})
        kept = [secret, target, outside, data / "queue" / "3.json", data / "tmp" / "dir",
                data / "tls" / "operator-key.pem", data / "dkim", data / "mail" / "example.test",
                data / "mail" / "example.test" / "alice" / "new" / "old"]
        self.assertEqual({str(p): owner(p) for p in kept}, {str(p): (0, 0) for p in kept})
