"""Tests for mx.config: defaults, every key, paths, and one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mx import config as mxconfig
from mx.config import Config, ConfigError, describe, load, parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent

FULL = """
hostname = "MX.Example.TEST"
data_dir = "data"
local_domains = ["Example.TEST", "bücher.example", "example.test"]
postmaster = "Hostmaster@example.test"

[listen]
smtp = "tcp:25"
submission = "tcp:587"
submissions = "tcp:465"
pop3 = ""
pop3s = "tcp:995"
imap = "tcp:143"
imaps = "tcp:993"

[tls]
certificate = "tls/cert.pem"
key = "/abs/key.pem"

[auth]
users_file = "passwd"
plaintext_without_tls = ["10.0.0.0/8", "2001:db8::/32"]
authenticated_header = true

[aliases]
"Postmaster@example.test" = ["alice@example.test", "Bob@Remote.example"]
"abuse@xn--bcher-kva.example" = "alice@example.test"

[relay]
port = 2525
smarthost = "smtp.provider.example:587"
smarthost_user = "relay@example.test"
smarthost_password_file = "secrets/smarthost.pw"
retry = ["30s", "1h30m"]
max_lifetime = "2d"
delay_warning = ""
tls = "required"

[dns]
nameservers = ["127.0.0.1:5353", "192.0.2.1", "[::1]:53", "2001:db8::1"]
timeout = "500ms"

[limits]
max_message_size = 1000
max_recipients = 5
max_connections_per_ip = 3
idle_timeout = "90s"
max_connections = 50
pop3_idle_timeout = "15m"

[pop3]
mark_seen = true
"""


class LoadHelper:
    def write(self, text: str, name: str = "mx.toml") -> Path:
        folder = Path(self.mktemp()).resolve()  # type: ignore[attr-defined]
        folder.mkdir(parents=True)
        path = folder / name
        path.write_text(text, encoding="utf-8")
        return path

    def load_text(self, text: str) -> Config:
        return load(self.write(text))

    def error_for(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:  # type: ignore[attr-defined]
            self.load_text(text)
        message = str(caught.exception)
        self.assertNotIn("\n", message)  # type: ignore[attr-defined]
        return message


class DefaultsTests(SynchronousTestCase, LoadHelper):
    def test_builtin_defaults(self) -> None:
        config = load(None)
        cwd = Path.cwd().resolve()
        self.assertIsNone(config.source)
        self.assertEqual(config.hostname, "localhost")
        self.assertEqual(config.data_dir, cwd / "var")
        self.assertEqual(config.local_domains, ("localhost",))
        self.assertEqual(config.postmaster, "postmaster@localhost")
        self.assertEqual(config.listen, mxconfig.ListenConfig(
            smtp="tcp:2525:interface=127.0.0.1", submission="tcp:2587:interface=127.0.0.1",
            submissions="tcp:2465:interface=127.0.0.1", pop3="tcp:2110:interface=127.0.0.1",
            pop3s="tcp:2995:interface=127.0.0.1", imap="tcp:2143:interface=127.0.0.1",
            imaps="tcp:2993:interface=127.0.0.1"))
        self.assertEqual(config.tls, mxconfig.TLSConfig(None, None))
        self.assertEqual(config.auth.users_file, cwd / "var" / "users")
        self.assertEqual(config.auth.plaintext_without_tls,
                         (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1")))
        self.assertEqual(dict(config.aliases), {})
        self.assertEqual(config.relay, mxconfig.RelayConfig(
            port=25, smarthost=None, smarthost_user="", smarthost_password_file=None,
            retry=(60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0),
            max_lifetime=5 * 86400.0, delay_warning=4 * 3600.0, tls=mxconfig.RelayTLS.OPPORTUNISTIC))
        self.assertIsInstance(config.relay.tls, mxconfig.RelayTLS)
        self.assertEqual(config.dns, mxconfig.DNSConfig(nameservers=(), timeout=5.0))
        self.assertEqual(config.limits, mxconfig.LimitsConfig(
            max_message_size=25 * 1024 * 1024, max_recipients=100, max_connections_per_ip=20,
            idle_timeout=300.0, max_connections=1000, pop3_idle_timeout=600.0))
        self.assertIs(config.auth.authenticated_header, False)  # Postfix's default: no login in Received:
        self.assertEqual(config.pop3, mxconfig.Pop3Config(mark_seen=False))

    def test_empty_file_is_defaults_relative_to_its_folder(self) -> None:
        path = self.write("")
        config = load(path)
        self.assertEqual(config.source, path)
        self.assertEqual(config.data_dir, path.parent / "var")
        self.assertEqual(config.auth.users_file, path.parent / "var" / "users")
        self.assertEqual(dataclasses.replace(config, source=None, data_dir=load(None).data_dir,
                                             auth=load(None).auth), load(None))

    def test_default_postmaster_follows_first_local_domain(self) -> None:
        config = self.load_text('local_domains = ["b.example", "a.example"]')
        self.assertEqual(config.postmaster, "postmaster@b.example")

    def test_listen_table_lists_exactly_the_services(self) -> None:
        config = self.load_text('[listen]\nsmtp = "tcp:25"\n')
        self.assertEqual(config.listen.smtp, "tcp:25")
        for name in ("submission", "submissions", "pop3", "pop3s", "imap", "imaps"):
            self.assertEqual(getattr(config.listen, name), "", name)

    def test_default_path(self) -> None:
        folder = Path(self.mktemp()).resolve()
        (folder / "etc").mkdir(parents=True)
        old = os.getcwd()
        os.chdir(folder)
        self.addCleanup(os.chdir, old)
        self.assertIsNone(mxconfig.default_path())
        (folder / "etc" / "mx.toml").write_text("")
        self.assertEqual(mxconfig.default_path(), folder / "etc" / "mx.toml")


class EveryKeyTests(SynchronousTestCase, LoadHelper):
    def test_every_key(self) -> None:
        path = self.write(FULL)
        base = path.parent
        config = load(path)
        self.assertEqual(config.hostname, "mx.example.test")
        self.assertEqual(config.data_dir, base / "data")
        self.assertEqual(config.local_domains, ("example.test", "xn--bcher-kva.example"))
        self.assertEqual(config.postmaster, "hostmaster@example.test")
        self.assertEqual(config.listen.smtp, "tcp:25")
        self.assertEqual(config.listen.pop3, "")
        self.assertEqual(config.listen.imaps, "tcp:993")
        self.assertEqual(config.tls.certificate, base / "tls" / "cert.pem")
        self.assertEqual(config.tls.key, Path("/abs/key.pem"))
        self.assertEqual(config.auth.users_file, base / "passwd")
        self.assertEqual(config.auth.plaintext_without_tls,
                         (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")))
        self.assertEqual(dict(config.aliases), {
            "postmaster@example.test": ("alice@example.test", "bob@remote.example"),
            "abuse@xn--bcher-kva.example": ("alice@example.test",),
        })
        self.assertEqual(config.relay, mxconfig.RelayConfig(
            port=2525, smarthost=("smtp.provider.example", 587), smarthost_user="relay@example.test",
            smarthost_password_file=base / "secrets" / "smarthost.pw", retry=(30.0, 5400.0),
            max_lifetime=2 * 86400.0, delay_warning=None, tls=mxconfig.RelayTLS.REQUIRED))
        self.assertEqual(config.relay.tls, "required")  # a StrEnum compares equal to its value
        self.assertEqual(config.dns.nameservers, (
            ("127.0.0.1", 5353), ("192.0.2.1", 53), ("::1", 53), ("2001:db8::1", 53)))
        self.assertEqual(config.dns.timeout, 0.5)
        self.assertEqual(config.limits, mxconfig.LimitsConfig(1000, 5, 3, 90.0, max_connections=50,
                                                                pop3_idle_timeout=900.0))
        self.assertIs(config.auth.authenticated_header, True)
        self.assertIs(config.pop3.mark_seen, True)

    def test_config_is_frozen(self) -> None:
        config = self.load_text(FULL)
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.hostname = "x"  # type: ignore[misc]
        with self.assertRaises(TypeError):
            config.aliases["x@example.test"] = ()  # type: ignore[index]

    def test_is_local_domain(self) -> None:
        config = self.load_text(FULL)
        for domain, expected in [("example.test", True), ("EXAMPLE.test", True),
                                 ("bücher.example", True), ("xn--bcher-kva.example", True),
                                 ("other.example", False), ("", False), ("[127.0.0.1]", False)]:
            self.assertEqual(config.is_local_domain(domain), expected, domain)

    def test_smarthost_forms(self) -> None:
        for text, expected in [("relay.example", ("relay.example", 25)),
                               ("relay.example:587", ("relay.example", 587)),
                               ("192.0.2.7:2525", ("192.0.2.7", 2525)),
                               ("[2001:db8::7]:587", ("2001:db8::7", 587))]:
            config = self.load_text(f'[relay]\nsmarthost = "{text}"\n')
            self.assertEqual(config.relay.smarthost, expected, text)

    def test_smarthost_credentials_come_in_pairs(self) -> None:
        path = self.write('[relay]\nsmarthost = "smtp.example:465"\nsmarthost_user = "me@example.test"\n'
                          'smarthost_password_file = "smarthost.pw"\n')
        config = load(path)  # pure: the password file need not exist yet
        self.assertEqual((config.relay.smarthost_user, config.relay.smarthost_password_file),
                         ("me@example.test", path.parent / "smarthost.pw"))
        self.assertEqual(
            self.error_for('[relay]\nsmarthost = "smtp.example"\nsmarthost_user = "u"\n'),
            "relay.smarthost_password_file: required when relay.smarthost_user is set")
        self.assertEqual(
            self.error_for('[relay]\nsmarthost = "smtp.example"\nsmarthost_password_file = "pw"\n'),
            "relay.smarthost_user: required when relay.smarthost_password_file is set")
        self.assertEqual(
            self.error_for('[relay]\nsmarthost_user = "u"\nsmarthost_password_file = "pw"\n'),
            "relay.smarthost_user: credentials need relay.smarthost (they are only sent there)")

    def test_describe_shows_auth_and_limits_keys(self) -> None:
        """`mx check` prints the new keys as TOML (a boolean is `true`/`false`, not `True`)."""
        text = describe(self.load_text("[auth]\nauthenticated_header = true\n[limits]\nmax_connections = 7\n"))
        self.assertIn("\nauthenticated_header = true\n", text)
        self.assertIn("\nmax_connections = 7\n", text)
        self.assertIn("\nauthenticated_header = false\n", describe(self.load_text("")))
        self.assertIn('\npop3_idle_timeout = "10m"\n', describe(self.load_text("")))

    def test_describe_round_trips(self) -> None:
        for text in (FULL, "", '[listen]\nimap = "tcp:143"\n'):
            config = self.load_text(text)
            again = self.load_text(describe(config))
            self.assertEqual(dataclasses.replace(again, source=None),
                             dataclasses.replace(config, source=None))
            for line in describe(config).splitlines():
                self.assertEqual(line.count(" = "), 1 if line and line[0] not in "#[" else 0, line)


class ShippedFilesTests(SynchronousTestCase):
    def test_newcomer_file_equals_builtin_defaults(self) -> None:
        shipped = load(ROOT / "etc" / "mx.toml")
        self.assertEqual(shipped.source, ROOT / "etc" / "mx.toml")
        old = os.getcwd()
        os.chdir(ROOT)
        self.addCleanup(os.chdir, old)
        self.assertEqual(dataclasses.replace(shipped, source=None), load(None))
        self.assertEqual(shipped.data_dir, ROOT / "var")

    def test_newcomer_file_names_every_key(self) -> None:
        text = (ROOT / "etc" / "mx.toml").read_text()
        for f in dataclasses.fields(Config):
            value = getattr(load(None), f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    self.assertIn(f"\n{sub.name} ", text, f"{f.name}.{sub.name}")
            elif f.name not in ("source", "aliases"):
                self.assertIn(f"\n{f.name} ", text, f.name)

    def test_production_example_loads(self) -> None:
        config = load(ROOT / "etc" / "mx-production.toml")
        self.assertEqual(config.data_dir, Path("/var/lib/mx"))
        self.assertEqual(config.listen.smtp, "tcp:25")
        self.assertIsNotNone(config.tls.certificate)
        self.assertTrue(config.tls.certificate.is_absolute())  # type: ignore[union-attr]


class ErrorTests(SynchronousTestCase, LoadHelper):
    UNKNOWN = [
        ('hostnam = "x"', "hostnam: unknown key (did you mean hostname?)"),
        ('[listen]\nsmpt = "tcp:25"', "listen.smpt: unknown key (did you mean listen.smtp?)"),
        ("[relay]\nretries = []", "relay.retries: unknown key (did you mean relay.retry?)"),
        ("[limits]\nfoo = 1", "limits.foo: unknown key"),
        ("[bogus]\nx = 1", "bogus: unknown key"),
    ]

    BAD = [
        ("hostname = 5", "hostname"),
        ('hostname = "not a host"', "hostname"),
        ('hostname = "[127.0.0.1]"', "hostname"),
        ("data_dir = 1", "data_dir"),
        ('data_dir = ""', "data_dir"),
        ('local_domains = "example.test"', "local_domains"),
        ("local_domains = []", "local_domains"),
        ('local_domains = ["bad_domain!"]', "local_domains"),
        ('postmaster = "nobody"', "postmaster"),
        ("listen = 5", "listen"),
        ("[listen]\nsmtp = 25", "listen.smtp"),
        ("[tls]\ncertificate = 1", "tls.certificate"),
        ('[tls]\ncertificate = "c.pem"', "tls.key"),
        ('[tls]\nkey = "k.pem"', "tls.certificate"),
        ('[auth]\nusers_file = ["x"]', "auth.users_file"),
        ('[auth]\nplaintext_without_tls = ["10.0.0.0/33"]', "auth.plaintext_without_tls"),
        ('[auth]\nplaintext_without_tls = "127.0.0.1"', "auth.plaintext_without_tls"),
        ('aliases = "x"', "aliases"),
        ('[aliases]\n"nobody" = "a@localhost"', 'aliases."nobody"'),
        ('[aliases]\n"a@remote.example" = "b@localhost"', 'aliases."a@remote.example"'),
        ('[aliases]\n"a@localhost" = "not an address"', 'aliases."a@localhost"'),
        ('[aliases]\n"a@localhost" = []', 'aliases."a@localhost"'),
        ('[aliases]\n"a@localhost" = 5', 'aliases."a@localhost"'),
        ('[aliases]\n"a@localhost" = "b@localhost"\n"A@localhost" = "c@localhost"',
         'aliases."A@localhost"'),
        ("[relay]\nport = 0", "relay.port"),
        ("[relay]\nport = 70000", "relay.port"),
        ('[relay]\nport = "25"', "relay.port"),
        ("[relay]\nport = true", "relay.port"),
        ('[relay]\nsmarthost = "host:port"', "relay.smarthost"),
        ('[relay]\nsmarthost = "bad host:25"', "relay.smarthost"),
        ("[relay]\nretry = []", "relay.retry"),
        ('[relay]\nretry = ["5m", "soon"]', "relay.retry"),
        ('[relay]\nretry = ["0s"]', "relay.retry"),
        ("[relay]\nmax_lifetime = 3600", "relay.max_lifetime"),
        ('[relay]\ndelay_warning = "4 hours"', "relay.delay_warning"),
        ('[relay]\ntls = "maybe"', "relay.tls"),
        ('[relay]\nsmarthost = "smtp.example"\nsmarthost_user = "u"', "relay.smarthost_password_file"),
        ('[relay]\nsmarthost = "smtp.example"\nsmarthost_password_file = "pw"', "relay.smarthost_user"),
        ('[relay]\nsmarthost_user = "u"\nsmarthost_password_file = "pw"', "relay.smarthost_user"),
        ('[relay]\nsmarthost = "smtp.example"\nsmarthost_user = "u\\n"\nsmarthost_password_file = "pw"',
         "relay.smarthost_user"),
        ('[relay]\nsmarthost_user = 5', "relay.smarthost_user"),
        ('[relay]\nsmarthost_password_file = 5', "relay.smarthost_password_file"),
        ('[dns]\nnameservers = ["ns.example"]', "dns.nameservers"),
        ('[dns]\nnameservers = ["127.0.0.1:99999"]', "dns.nameservers"),
        ('[dns]\ntimeout = "0s"', "dns.timeout"),
        ('[limits]\nmax_message_size = "25 parsecs"', "limits.max_message_size"),
        ("[limits]\nmax_message_size = 0", "limits.max_message_size"),
        ("[limits]\nmax_recipients = -1", "limits.max_recipients"),
        ("[limits]\nmax_recipients = 1.5", "limits.max_recipients"),
        ("[limits]\nmax_connections_per_ip = 0", "limits.max_connections_per_ip"),
        ("[limits]\nmax_connections = 0", "limits.max_connections"),
        ('[limits]\nmax_connections = "many"', "limits.max_connections"),
        ('[auth]\nauthenticated_header = "yes"', "auth.authenticated_header"),
        ("[auth]\nauthenticated_header = 1", "auth.authenticated_header"),
        ('[limits]\nidle_timeout = "5"', "limits.idle_timeout"),
        ('[limits]\npop3_idle_timeout = "10"', "limits.pop3_idle_timeout"),
        ('[limits]\npop3_idle_timeout = "0s"', "limits.pop3_idle_timeout"),
        ("[limits]\npop3_idle_timeout = 600", "limits.pop3_idle_timeout"),
    ]

    def test_unknown_keys_are_named(self) -> None:
        for text, expected in self.UNKNOWN:
            self.assertEqual(self.error_for(text), expected)

    def test_bad_values_name_their_key(self) -> None:
        for text, key in self.BAD:
            message = self.error_for(text)
            self.assertTrue(message.startswith(key + ": "), f"{text!r} gave {message!r}")

    def test_message_example(self) -> None:
        self.assertEqual(self.error_for("[limits]\nmax_recipients = -1"),
                         "limits.max_recipients: must be a positive integer, got an integer -1")

    def test_syntax_error_names_file_and_line(self) -> None:
        path = self.write('hostname = "x"\n\nlimits = ]\nx = 1\n')
        with self.assertRaises(ConfigError) as caught:
            load(path)
        self.assertEqual(str(caught.exception), f"{path}: line 3: Invalid value")
        path = self.write('hostname = "x"\nlimits = [\n')
        with self.assertRaises(ConfigError) as caught:
            load(path)
        self.assertEqual(str(caught.exception), f"{path}: end of file: Invalid value")

    def test_missing_file(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            load(Path("no/such/mx.toml"))
        self.assertEqual(str(caught.exception), "no/such/mx.toml: no such file")


class UnitTests(SynchronousTestCase):
    def test_durations(self) -> None:
        for text, seconds in [("30s", 30.0), ("5m", 300.0), ("4h", 14400.0), ("5d", 432000.0),
                              ("500ms", 0.5), ("1w", 604800.0), ("1h30m", 5400.0),
                              ("1.5h", 5400.0), (" 2s ", 2.0), ("0s", 0.0)]:
            self.assertEqual(parse_duration(text), seconds, text)
        for bad in ["", "5", "5 m", "m", "-5m", "5x", "1h 30m", "5M"]:
            self.assertRaises(ValueError, parse_duration, bad)
        self.assertRaises(ValueError, parse_duration, 5)  # type: ignore[arg-type]

    def test_format_duration_inverts_parse(self) -> None:
        for text in ["500ms", "30s", "90s", "5m", "4h", "5d", "2w", "1500ms"]:
            self.assertEqual(mxconfig.format_duration(parse_duration(text)), text)

    def test_sizes(self) -> None:
        for value, size in [("25MiB", 25 * 2**20), ("100KiB", 102400), ("1GiB", 2**30),
                            ("10MB", 10_000_000), ("10KB", 10_000), ("1GB", 10**9),
                            ("512", 512), ("512B", 512), (1000, 1000), (0, 0), ("25mib", 25 * 2**20)]:
            self.assertEqual(parse_size(value), size, value)
        for bad in ["", "MiB", "25 parsecs", "-1", "1TiB", -1, True, 1.5, None]:
            self.assertRaises(ValueError, parse_size, bad)


class PurityTests(SynchronousTestCase):
    def test_config_and_users_do_not_import_twisted(self) -> None:
        code = "import sys, mx.config, mx.users; sys.exit('twisted' in sys.modules)"
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT)
        self.assertEqual(result.returncode, 0)
