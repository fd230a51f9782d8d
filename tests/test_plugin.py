"""The twistd plugin as an operator meets it: `twistd --help`, `twistd -n mx`, SIGTERM, bad configs."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import (
    Child,
    RawClient,
    free_port,
    mx_command,
    port_in_use,
    smtp_client,
    spawn,
    split_delivered,
    subprocess_env,
    twistd_command,
    wait_until_accepting,
    write_config,
)

NEWCOMER_PORT = 2525


def run(argv: list[str], cwd: Path, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=subprocess_env(), input=stdin, capture_output=True, text=True,
                          timeout=timeout)


class PluginTests(TestCase):
    timeout = 60

    def folder(self) -> Path:
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        return path

    async def test_help_lists_mx(self) -> None:
        cwd = self.folder()
        result = await deferToThread(run, [*twistd_command(), "--help"], cwd)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"(?m)^\s+mx\s+\S")
        self.assertEqual(sorted(p.name for p in cwd.iterdir()), [])  # --help leaves nothing behind

    async def test_mx_help(self) -> None:
        result = await deferToThread(run, [*twistd_command(), "mx", "--help"], self.folder())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("--config", result.stdout)

    async def test_newcomer_defaults(self) -> None:
        """`twistd -n mx` with no config: loopback 2525, data in ./var, `mx user add`, SIGTERM."""
        if port_in_use(NEWCOMER_PORT):
            raise SkipTest(f"127.0.0.1:{NEWCOMER_PORT} is already in use on this machine")
        cwd = self.folder()
        child = spawn(self, [*twistd_command(), "-n", "mx"], cwd, name="twistd")
        try:
            await deferToThread(wait_until_accepting, child, NEWCOMER_PORT)
        except AssertionError:
            if "already in use" in child.output():  # lost a race for the port
                raise SkipTest(f"127.0.0.1:{NEWCOMER_PORT} was taken by another process")
            raise

        def ours() -> bool:
            # The port accepting could be someone else's server: ours must be up and say so.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and child.process.poll() is None:
                if "mx started" in child.output():
                    return True
                time.sleep(0.05)
            return False

        if not await deferToThread(ours):
            if "already in use" in child.output():
                raise SkipTest(f"127.0.0.1:{NEWCOMER_PORT} was taken by another process")
            self.fail(f"twistd -n mx did not start:\n{child.output()}")
        self.assertIn("127.0.0.1", child.output())

        added = await deferToThread(run, [*mx_command(), "user", "add", "postmaster@localhost"], cwd,
                                    "a newcomer's password\n")
        self.assertEqual((added.returncode, added.stderr), (0, ""), added)
        self.assertTrue((cwd / "var" / "users").is_file())

        body = b"Subject: hello postmaster\r\n\r\nfirst mail\r\n"

        def send() -> tuple[list[tuple[int, bytes]], tuple[int, bytes]]:
            # The server notices the new users file within a second (it stats it at most
            # once a second), so RCPT may be refused for that long: retry, bounded.
            rcpts = []
            deadline = time.monotonic() + 5
            with smtp_client(NEWCOMER_PORT) as s:
                s.ehlo()
                while True:
                    s.mail("newcomer@example.org")
                    rcpts.append(s.rcpt("postmaster@localhost"))
                    if rcpts[-1][0] == 250 or time.monotonic() > deadline:
                        break
                    s.rset()
                    time.sleep(0.2)
                result = s.data(body) if rcpts[-1][0] == 250 else (0, b"")
                s.quit()
            return rcpts, result

        rcpts, result = await deferToThread(send)
        self.assertEqual(rcpts[-1][0], 250, rcpts)
        self.assertEqual(result[0], 250, result)
        new = cwd / "var" / "mail" / "localhost" / "postmaster" / "new"
        files = list(new.iterdir())
        self.assertEqual(len(files), 1, files)
        return_path, received, delivered = split_delivered(files[0].read_bytes())
        self.assertEqual(return_path, b"Return-Path: <newcomer@example.org>")
        self.assertIn(b"by localhost ", received)
        self.assertEqual(delivered, body)

        def stop() -> tuple[int | None, float]:
            started = time.monotonic()
            child.process.send_signal(signal.SIGTERM)
            try:
                code = child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            return code, time.monotonic() - started

        code, took = await deferToThread(stop)
        self.assertStoppedCleanly(code, child, took)

    def assertStoppedCleanly(self, code: int | None, child: Child, took: float = 0.0) -> None:
        """An orderly stop: in time, no traceback, "mx stopped" logged, exit status 0 or SIGTERM.

        twistd (since Twisted 21) re-raises the signal that stopped the reactor, so a plain
        `twistd -n mx` stopped with SIGTERM ends "killed by SIGTERM" (status 143) after a
        complete shutdown; `test_sigterm_exit_status_is_zero` holds the stricter wish.
        """
        self.assertIn(code, (0, -signal.SIGTERM), f"after {took:.1f}s:\n{child.output()}")
        output = child.output()
        self.assertNotIn("Traceback", output)
        self.assertIn("mx stopped", output)

    async def test_sigterm_with_a_client_connected(self) -> None:
        """A connected idle client gets 421 at shutdown and the server still exits 0 in time."""
        port = free_port()
        path = write_config(self, listen={"smtp": f"tcp:{port}:interface=127.0.0.1"})
        child = spawn(self, [*twistd_command(), "-n", "--pidfile", "", "mx", "--config", str(path)],
                      path.parent, name="twistd")
        await deferToThread(wait_until_accepting, child, port)

        def scenario() -> tuple[list[tuple[int, str]], int | None]:
            with RawClient(port) as c:
                c.reply()
                c.command("EHLO client.example")
                child.process.send_signal(signal.SIGTERM)
                replies = c.until_closed()
            try:
                code = child.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                code = None
            return replies, code

        replies, code = await deferToThread(scenario)
        self.assertEqual([c for c, _ in replies], [421], replies)
        self.assertTrue(replies[0][1].startswith("4.3.2 "), replies)
        self.assertStoppedCleanly(code, child)

    async def test_unknown_key_stops_startup(self) -> None:
        cwd = self.folder()
        (cwd / "bad.toml").write_text('hostname = "mx.example.test"\n\n[limits]\nmax_mesage_size = "1MiB"\n')
        result = await deferToThread(
            run, [*twistd_command(), "-n", "--pidfile", "", "mx", "--config", "bad.toml"], cwd, "", 30)
        self.assertNotEqual(result.returncode, 0, result)
        output = result.stdout + result.stderr
        self.assertIn("limits.max_mesage_size", output)
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "max_mesage_size" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertFalse(re.search(r"(?m)^\s+File \"", output), output)

    async def test_missing_config_file_stops_startup(self) -> None:
        cwd = self.folder()
        result = await deferToThread(
            run, [*twistd_command(), "-n", "--pidfile", "", "mx", "--config", "nowhere.toml"], cwd, "", 30)
        self.assertNotEqual(result.returncode, 0, result)
        self.assertIn("nowhere.toml", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    async def test_port_in_use_stops_startup(self) -> None:
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            port = blocker.getsockname()[1]
            path = write_config(self, listen={"smtp": f"tcp:{port}:interface=127.0.0.1"})
            result = await deferToThread(
                run, [*twistd_command(), "-n", "--pidfile", "", "mx", "--config", str(path)], path.parent, "", 30)
        self.assertNotEqual(result.returncode, 0, result)
        self.assertIn(str(port), result.stdout + result.stderr)

