"""Tests for the `mx` command, run as a real subprocess the way an operator runs it."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mx.users import read_users, verify_password

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
hostname = "mx.example.test"
data_dir = "data"
local_domains = ["example.test"]
"""


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        self.config = self.folder / "mx.toml"
        self.config.write_text(CONFIG)
        self.users_file = self.folder / "data" / "users"

    def mx(self, *args: str, stdin: str = "", config: Path | None | bool = True,
           ) -> subprocess.CompletedProcess[str]:
        """Run `mx [--config self.config] ARGS` in the test folder; stdin is not a tty."""
        argv = [sys.executable, "-m", "mx.cli"]
        if config is True:
            argv += ["--config", str(self.config)]
        elif isinstance(config, Path):
            argv += ["--config", str(config)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        return subprocess.run([*argv, *args], input=stdin, capture_output=True, text=True,
                              cwd=self.folder, env=env, timeout=60)

    def assertFails(self, result: subprocess.CompletedProcess[str], text: str) -> None:
        self.assertNotEqual(result.returncode, 0, result)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertTrue(result.stderr.startswith("mx: "), result.stderr)
        self.assertIn(text, result.stderr)

    def assertOK(self, result: subprocess.CompletedProcess[str]) -> None:
        self.assertEqual((result.returncode, result.stderr), (0, ""), result)

    # --- check ---------------------------------------------------------------------------

    def test_check_prints_effective_settings(self) -> None:
        result = self.mx("check")
        self.assertOK(result)
        self.assertIn('hostname = "mx.example.test"', result.stdout)
        self.assertIn(f'data_dir = "{self.folder / "data"}"', result.stdout)
        self.assertIn('max_message_size = "25MiB"', result.stdout)

    def test_check_without_config_uses_builtin_defaults(self) -> None:
        result = self.mx("check", config=None)
        self.assertOK(result)
        self.assertIn("built-in defaults", result.stdout)
        self.assertIn(f'data_dir = "{self.folder / "var"}"', result.stdout)

    def test_check_reads_etc_mx_toml_in_the_current_folder(self) -> None:
        (self.folder / "etc").mkdir()
        (self.folder / "etc" / "mx.toml").write_text('hostname = "found.example"\ndata_dir = "../var"\n')
        result = self.mx("check", config=None)
        self.assertOK(result)
        self.assertIn('hostname = "found.example"', result.stdout)
        self.assertIn(f'data_dir = "{self.folder / "var"}"', result.stdout)

    def test_check_bad_config(self) -> None:
        self.config.write_text("[limits]\nmax_recipients = -1\n")
        result = self.mx("check")
        self.assertEqual(result.returncode, 1)
        self.assertFails(result, "mx: limits.max_recipients: ")
        self.assertEqual(result.stdout, "")

    def test_check_unknown_key(self) -> None:
        self.config.write_text('[listen]\nsmpt = "tcp:25"\n')
        self.assertFails(self.mx("check"), "listen.smpt: unknown key")

    def test_check_reads_the_smarthost_password_file(self) -> None:
        secret = self.folder / "smarthost.pw"
        secret.write_text("s3cret\n")
        secret.chmod(0o644)
        self.config.write_text(CONFIG + '[relay]\nsmarthost = "smtp.provider.test:587"\n'
                               'smarthost_user = "me"\nsmarthost_password_file = "smarthost.pw"\n')
        result = self.mx("check")
        self.assertEqual(result.returncode, 1)
        self.assertFails(result, "relay.smarthost_password_file: ")
        self.assertNotIn("s3cret", result.stderr + result.stdout)
        secret.chmod(0o600)
        result = self.mx("check")
        self.assertOK(result)
        self.assertNotIn("s3cret", result.stdout)

    def test_check_missing_config(self) -> None:
        self.assertFails(self.mx("check", config=self.folder / "nope.toml"), "nope.toml: no such file")

    def test_usage_errors_are_one_line(self) -> None:
        for args in [(), ("user",), ("user", "add"), ("frobnicate",)]:
            result = self.mx(*args)
            self.assertEqual(result.returncode, 2, args)
            self.assertFails(result, "")

    # --- users ---------------------------------------------------------------------------

    def test_user_lifecycle(self) -> None:
        self.assertOK(self.mx("user", "list"))
        self.assertEqual(self.mx("user", "list").stdout, "")

        self.assertOK(self.mx("user", "add", "Alice@Example.TEST", stdin="secret one\n"))
        self.assertEqual(stat.S_IMODE(os.stat(self.users_file).st_mode), 0o600)
        self.assertTrue(verify_password(read_users(self.users_file)["alice@example.test"], "secret one"))

        self.assertOK(self.mx("user", "add", "bob@example.test", stdin="pw\n"))
        listed = self.mx("user", "list")
        self.assertOK(listed)
        self.assertEqual(listed.stdout, "alice@example.test\nbob@example.test\n")

        self.assertOK(self.mx("user", "passwd", "alice@example.test", stdin="secret two\n"))
        stored = read_users(self.users_file)["alice@example.test"]
        self.assertTrue(verify_password(stored, "secret two"))
        self.assertFalse(verify_password(stored, "secret one"))

        self.assertOK(self.mx("user", "del", "ALICE@example.test"))
        self.assertEqual(self.mx("user", "list").stdout, "bob@example.test\n")

    def test_add_creates_data_dir(self) -> None:
        self.config.write_text('data_dir = "deep/er/data"\n')
        self.assertOK(self.mx("user", "add", "alice@localhost", stdin="pw\n"))
        self.assertTrue((self.folder / "deep" / "er" / "data" / "users").is_file())

    def test_duplicate_add_fails(self) -> None:
        self.assertOK(self.mx("user", "add", "alice@example.test", stdin="pw\n"))
        self.assertFails(self.mx("user", "add", "ALICE@example.test", stdin="other\n"), "already exists")
        self.assertTrue(verify_password(read_users(self.users_file)["alice@example.test"], "pw"))

    def test_add_rejects_bad_addresses(self) -> None:
        for address, why in [("alice@elsewhere.example", "not a local domain"),
                             ("../x@example.test", "not a valid address"),
                             ("a/b@example.test", "mailbox name"),
                             ("alice+tag@example.test", "mailbox name"),
                             ("nobody", "not a valid address")]:
            self.assertFails(self.mx("user", "add", address, stdin="pw\n"), why)
        self.assertFalse(self.users_file.exists())

    def test_password_from_stdin(self) -> None:
        self.assertOK(self.mx("user", "add", "alice@example.test", stdin="  spaced pw \r\nignored\n"))
        self.assertTrue(verify_password(read_users(self.users_file)["alice@example.test"], "  spaced pw "))
        self.assertOK(self.mx("user", "add", "bob@example.test", stdin="no newline"))
        self.assertTrue(verify_password(read_users(self.users_file)["bob@example.test"], "no newline"))

    def test_empty_password_refused(self) -> None:
        for stdin in ["", "\n"]:
            self.assertFails(self.mx("user", "add", "alice@example.test", stdin=stdin), "empty password")
        self.assertFalse(self.users_file.exists())

    def test_unknown_user(self) -> None:
        self.assertFails(self.mx("user", "passwd", "ghost@example.test", stdin="pw\n"), "no such user")
        self.assertFails(self.mx("user", "del", "ghost@example.test"), "no such user")

    def test_bad_config_stops_user_commands(self) -> None:
        self.config.write_text('hostname = 5\n')
        self.assertFails(self.mx("user", "add", "alice@example.test", stdin="pw\n"), "hostname: ")
