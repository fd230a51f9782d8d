"""The mx configuration: `etc/mx.toml` (or built-in defaults) into frozen dataclasses.

Invariants:
- Pure: no Twisted, no I/O beyond reading the one file. A `Config` is immutable and fully
  validated; everything downstream may trust it (domains lower-case A-labels, addresses
  canonical, paths absolute, durations in seconds, sizes in bytes).
- Every problem is a `ConfigError` whose text is one line starting with the dotted key
  (or the file name, for a missing file or a TOML syntax error).
- Relative paths resolve against the folder of the config file, or the current folder when
  there is no file, so `etc/mx.toml` and the built-in defaults name the same places.
- Inside `[listen]` a missing key disables that service; a file without a `[listen]` table
  at all keeps the default (loopback) listeners. Every other missing key takes its default.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import tomllib
import types
from dataclasses import dataclass, fields, is_dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from mx.address import AddressError, parse_address

__all__ = [
    "AuthConfig", "Config", "Pop3Config", "ConfigError", "DNSConfig", "LimitsConfig", "ListenConfig",
    "RelayConfig", "RelayTLS", "TLSConfig", "default_path", "describe", "load", "parse_duration",
    "parse_size",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s", "imap", "imaps")
DEFAULT_PATH = Path("etc/mx.toml")

# The newcomer defaults (INTERFACE.md): loopback only, unprivileged ports.
_DEFAULT_PORTS = (2525, 2587, 2465, 2110, 2995, 2143, 2993)
DEFAULT_LISTEN = {name: f"tcp:{port}:interface=127.0.0.1" for name, port in zip(SERVICES, _DEFAULT_PORTS)}
DEFAULT_RETRY = ("1m", "5m", "15m", "30m", "1h", "2h", "4h")


class ConfigError(Exception):
    """The configuration is unusable; `str()` is one line naming the key."""


class RelayTLS(StrEnum):
    """`relay.tls`: STARTTLS towards other MTAs (a str, so it compares equal to its value)."""

    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, any certificate (RFC 7672 §1.3)
    REQUIRED = "required"  # STARTTLS and a certificate valid for the MX name, or no delivery
    OFF = "off"  # plaintext, even when STARTTLS is offered


RELAY_TLS_MODES = tuple(RelayTLS)


@dataclass(frozen=True)
class ListenConfig:
    smtp: str
    submission: str
    submissions: str
    pop3: str
    pop3s: str
    imap: str
    imaps: str


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None
    key: Path | None


@dataclass(frozen=True)
class AuthConfig:
    users_file: Path
    plaintext_without_tls: tuple[IPNetwork, ...]
    authenticated_header: bool = False  # name the login in Received: (Postfix: smtpd_sasl_authenticated_header)


@dataclass(frozen=True)
class RelayConfig:
    port: int
    smarthost: tuple[str, int] | None
    # AUTH at the smarthost: both set or both empty, and only with `smarthost`. The file is
    # not read here (config stays pure): `mx.smtpclient.smarthost_auth` reads it at start-up.
    smarthost_user: str
    smarthost_password_file: Path | None
    retry: tuple[float, ...]
    max_lifetime: float
    delay_warning: float | None
    tls: RelayTLS


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[tuple[str, int], ...]
    timeout: float


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int
    max_recipients: int
    max_connections_per_ip: int
    idle_timeout: float
    max_connections: int = 1000  # all services together
    pop3_idle_timeout: float = 600.0  # RFC 1939 §3: an autologout timer of at least 10 minutes
    imap_idle_timeout: float = 1800.0  # RFC 3501 §5.4: at least 30 minutes; IDLE re-arms it


@dataclass(frozen=True)
class Pop3Config:
    # Mark a retrieved message seen (":2,S", which moves it from new/ to cur/), as Dovecot
    # does by default. Off by default: a delivered file then stays where delivery put it
    # (Dovecot's `pop3_no_flag_updates = yes`).
    mark_seen: bool = False


class DMARCEnforcement(StrEnum):
    ENFORCE = "enforce"  # p=reject -> 550 5.7.1, p=quarantine -> the recipient's .Junk
    REPORT = "report"  # the header only; everything is delivered as usual


@dataclass(frozen=True)
class MailAuthConfig:
    """Inbound checks on the `smtp` port and signing of submitted mail (issue 10)."""

    spf: bool = True  # SPF of MAIL FROM and HELO (RFC 7208)
    dkim: bool = True  # every DKIM signature (RFC 6376, RFC 8463)
    dmarc: bool = True  # DMARC alignment and policy (RFC 7489)
    arc: bool = True  # ARC chain validation (RFC 8617)
    dmarc_policy: DMARCEnforcement = DMARCEnforcement.ENFORCE
    reject_spf_fail: bool = False  # 550 5.7.1 for SPF "fail" without a DKIM pass
    trusted_arc_sealers: tuple[str, ...] = ()  # their passing ARC chain overrides a DMARC fail
    deadline: float = 20.0  # the whole check set of one message
    # Peers whose mail is not checked: programs on this host (cron, a web app) hand mail
    # to port 25 on loopback with no SPF or DKIM of their own (Postfix's mynetworks rule).
    skip_networks: tuple[IPNetwork, ...] = ()
    sign: bool = True  # DKIM-sign mail submitted by authenticated users


@dataclass(frozen=True)
class Config:
    hostname: str
    data_dir: Path
    local_domains: tuple[str, ...]
    postmaster: str
    listen: ListenConfig
    tls: TLSConfig
    auth: AuthConfig
    aliases: Mapping[str, tuple[str, ...]]
    relay: RelayConfig
    dns: DNSConfig
    limits: LimitsConfig
    pop3: Pop3Config
    source: Path | None
    mailauth: MailAuthConfig = MailAuthConfig()

    def is_local_domain(self, domain: str) -> bool:
        """True if mail for `domain` (any case, U-label or A-label) is delivered here."""
        return _domain_or_none(domain) in self.local_domains


# --- units -------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
               "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")


def parse_duration(text: str) -> float:
    """Seconds in `"500ms"`, `"30s"`, `"5m"`, `"4h"`, `"5d"`, `"1w"` or sums like `"1h30m"`."""
    if not isinstance(text, str):
        raise ValueError(f"a duration is a string with a unit like \"30s\", got {_kind(text)}")
    compact = text.strip()
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"not a duration (use a unit: ms, s, m, h, d, w): {text!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def parse_size(value: str | int) -> int:
    """Bytes in a plain integer, or `"25MiB"`, `"100KiB"`, `"1GiB"`, `"10MB"` (1000-based)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"a size is bytes or a string like \"25MiB\", got {_kind(value)}")
    match = _SIZE.fullmatch(value.strip().lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"not a size (use B, KiB, MiB, GiB, KB, MB or GB): {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_duration(seconds: float) -> str:
    """The shortest exact unit string for `seconds` (inverse of `parse_duration`)."""
    for unit in ("w", "d", "h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{round(seconds * 1000)}ms" if seconds * 1000 == int(seconds * 1000) else f"{seconds}s"


def format_size(size: int) -> str:
    """`size` in the largest binary unit that is exact, as TOML."""
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size and size % factor == 0:
            return f'"{size // factor}{unit}"'
    return str(size)


# --- loading -----------------------------------------------------------------------------


def default_path() -> Path | None:
    """`etc/mx.toml` in the current folder if it exists (what `twistd -n mx` reads)."""
    candidate = Path.cwd() / DEFAULT_PATH
    return candidate.resolve() if candidate.is_file() else None


def load(path: Path | None) -> Config:
    """Read and validate `path`; `None` gives the built-in defaults (paths against cwd)."""
    if path is None:
        return _build({}, Path.cwd().resolve(), None)
    source = (Path.cwd() / Path(path)).resolve()
    try:
        with open(source, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        message = str(e)
        # tomllib says "Invalid value (at line 3, column 9)"; we say "line 3: Invalid value".
        where = re.search(r"\s*\(at (?:line (\d+), column \d+|end of document)\)$", message)
        if where:
            place = f"line {where.group(1)}" if where.group(1) else "end of file"
            message = f"{place}: {message[: where.start()]}"
        raise ConfigError(f"{path}: {message}") from None
    return _build(raw, source.parent, source)


def _build(raw: dict[str, Any], base: Path, source: Path | None) -> Config:
    top_keys = [f.name for f in fields(Config) if f.name != "source"]
    _check_keys(raw, "", top_keys)
    path = lambda value: _path(base, value)  # noqa: E731
    optional_path = lambda value: _path(base, value) if _string(value) else None  # noqa: E731
    hostname = _get(raw, "hostname", "localhost", _domain)
    data_dir = _get(raw, "data_dir", "var", path)
    local_domains = _get(raw, "local_domains", ["localhost"], _domains)
    postmaster = _get(raw, "postmaster", f"postmaster@{local_domains[0]}", _address)
    # A [listen] table lists exactly the services wanted; without one, the newcomer set.
    listen = DEFAULT_LISTEN if "listen" not in raw else dict.fromkeys(SERVICES, "")
    # table -> (dataclass, {key: (default, converter)}); the dataclass fields are the schema.
    schema: dict[str, tuple[type, dict[str, tuple[Any, Callable[[Any], Any]]]]] = {
        "listen": (ListenConfig, {name: (listen[name], _string) for name in SERVICES}),
        "tls": (TLSConfig, {"certificate": ("", optional_path), "key": ("", optional_path)}),
        "auth": (AuthConfig, {
            "users_file": (str(data_dir / "users"), path),
            "plaintext_without_tls": (["127.0.0.0/8", "::1"], _networks),
            "authenticated_header": (False, _bool)}),
        "relay": (RelayConfig, {
            "port": (25, _port), "smarthost": ("", _smarthost),
            "smarthost_user": ("", _smarthost_user), "smarthost_password_file": ("", optional_path),
            "retry": (list(DEFAULT_RETRY), _retry), "max_lifetime": ("5d", _positive_duration),
            "delay_warning": ("4h", _optional_duration), "tls": ("opportunistic", _relay_tls)}),
        "dns": (DNSConfig, {"nameservers": ([], _nameservers), "timeout": ("5s", _positive_duration)}),
        "limits": (LimitsConfig, {
            "max_message_size": ("25MiB", _positive_size), "max_recipients": (100, _positive_int),
            "max_connections_per_ip": (20, _positive_int), "idle_timeout": ("5m", _positive_duration),
            "max_connections": (1000, _positive_int), "pop3_idle_timeout": ("10m", _positive_duration),
            "imap_idle_timeout": ("30m", _positive_duration)}),
        "pop3": (Pop3Config, {"mark_seen": (False, _bool)}),
        "mailauth": (MailAuthConfig, {
            "spf": (True, _bool), "dkim": (True, _bool), "dmarc": (True, _bool), "arc": (True, _bool),
            "dmarc_policy": ("enforce", _dmarc_enforcement), "reject_spf_fail": (False, _bool),
            "trusted_arc_sealers": ([], _optional_domains), "deadline": ("20s", _positive_duration),
            "skip_networks": (["127.0.0.0/8", "::1"], _networks), "sign": (True, _bool)}),
    }
    sections: dict[str, Any] = {}
    for name, (cls, keys) in schema.items():
        table = _table(raw, name)
        _check_keys(table, f"{name}.", keys)
        sections[name] = cls(**{
            key: _get(table, key, default, convert, f"{name}.") for key, (default, convert) in keys.items()
        })
    if (sections["tls"].certificate is None) != (sections["tls"].key is None):
        missing, given = ("key", "certificate") if sections["tls"].key is None else ("certificate", "key")
        raise ConfigError(f"tls.{missing}: required when tls.{given} is set")
    _check_smarthost_auth(sections["relay"])
    aliases = _aliases(_table(raw, "aliases"), local_domains)
    return Config(hostname=hostname, data_dir=data_dir, local_domains=local_domains,
                  postmaster=postmaster, aliases=types.MappingProxyType(aliases), source=source,
                  **sections)


def _check_keys(table: Mapping[str, Any], prefix: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


def _table(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table ([{name}]), got {_kind(value)}")
    return value


def _get(table: Mapping[str, Any], key: str, default: Any, convert: Callable[[Any], Any],
         prefix: str = "") -> Any:
    """`convert(table[key])`; the converter's ValueError becomes a ConfigError naming the key."""
    try:
        return convert(table.get(key, default))
    except ValueError as e:
        raise ConfigError(f"{prefix}{key}: {e}") from None


# --- converters: raise ValueError with the reason; the reader adds the key ---------------


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string",
             list: "an array", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} {json.dumps(value, default=str)}"


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_kind(value)}")
    return value


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"must be an array of strings, got {_kind(value)}")
    return value


def _path(base: Path, value: Any) -> Path:
    if not _string(value):
        raise ValueError("must be a non-empty path")
    return (base / Path(value).expanduser()).resolve()


def _domain_or_none(text: str) -> str | None:
    try:
        domain = parse_address(f"x@{text}").domain
    except AddressError:
        return None
    return None if domain.startswith("[") else domain


def _domain(value: Any) -> str:
    domain = _domain_or_none(_string(value))
    if domain is None:
        raise ValueError(f"must be a domain name, got {value!r}")
    return domain


def _domains(value: Any) -> tuple[str, ...]:
    domains = tuple(dict.fromkeys(_domain(v) for v in _strings(value)))
    if not domains:
        raise ValueError("must name at least one domain")
    return domains


def _optional_domains(value: Any) -> tuple[str, ...]:
    return tuple(dict.fromkeys(_domain(v) for v in _strings(value)))


def _dmarc_enforcement(value: Any) -> DMARCEnforcement:
    try:
        return DMARCEnforcement(_string(value))
    except ValueError:
        raise ValueError(f'must be "enforce" or "report", got {value!r}') from None


def _address(value: Any) -> str:
    try:
        return parse_address(_string(value)).canonical
    except AddressError as e:
        raise ValueError(f"{e}: {value!r}") from None


def _aliases(table: Mapping[str, Any], local_domains: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for key, value in table.items():
        where = f"aliases.{json.dumps(key, ensure_ascii=False)}"
        try:
            alias = parse_address(key)
        except AddressError as e:
            raise ConfigError(f"{where}: not a valid address ({e})") from None
        if alias.domain not in local_domains:
            raise ConfigError(f"{where}: the alias must be in a local domain ({', '.join(local_domains)})")
        if alias.canonical in aliases:
            raise ConfigError(f"{where}: duplicate of alias {alias.canonical}")
        try:
            targets = [value] if isinstance(value, str) else _strings(value)
            if not targets:
                raise ValueError("must name at least one address")
            aliases[alias.canonical] = tuple(dict.fromkeys(_address(t) for t in targets))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
    return aliases


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {_kind(value)}")
    return value


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"must be a positive integer, got {_kind(value)}")
    return value


def _port(value: Any) -> int:
    if _positive_int(value) > 65535:
        raise ValueError(f"must be a TCP port (1-65535), got {value}")
    return value


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"must be longer than zero, got {value!r}")
    return seconds


def _optional_duration(value: Any) -> float | None:
    return None if value == "" else _positive_duration(value)


def _retry(value: Any) -> tuple[float, ...]:
    intervals = tuple(_positive_duration(v) for v in _strings(value))
    if not intervals:
        raise ValueError("must list at least one interval")
    return intervals


def _positive_size(value: Any) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError(f"must be larger than zero, got {value!r}")
    return size


def _relay_tls(value: Any) -> RelayTLS:
    if _string(value) not in RELAY_TLS_MODES:
        raise ValueError(f"must be one of {', '.join(repr(m.value) for m in RelayTLS)}, got {value!r}")
    return RelayTLS(value)


def _smarthost_user(value: Any) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in _string(value)):  # it goes into AUTH PLAIN
        raise ValueError("must not contain control characters")
    return value


def _check_smarthost_auth(relay: RelayConfig) -> None:
    """Smarthost credentials come as a pair, and only with a smarthost to send them to."""
    user, password_file = bool(relay.smarthost_user), relay.smarthost_password_file is not None
    if user != password_file:
        missing, given = ("smarthost_password_file", "smarthost_user") if user else (
            "smarthost_user", "smarthost_password_file")
        raise ConfigError(f"relay.{missing}: required when relay.{given} is set")
    if user and relay.smarthost is None:
        raise ConfigError("relay.smarthost_user: credentials need relay.smarthost (they are only sent there)")


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address."""
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", text)
    if match is None:
        if text.count(":") >= 2:  # bare IPv6 literal, no port
            return text, default_port
        raise ValueError(f"must be \"host\" or \"host:port\", got {text!r}")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    port = _port(int(port_text)) if port_text else default_port
    return host, port


def _smarthost(value: Any) -> tuple[str, int] | None:
    text = _string(value).strip()
    if not text:
        return None
    host, port = _host_port(text, 25)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        return _domain(host), port


def _nameservers(value: Any) -> tuple[tuple[str, int], ...]:
    servers = []
    for text in _strings(value):
        host, port = _host_port(text.strip(), 53)
        try:
            servers.append((str(ipaddress.ip_address(host)), port))
        except ValueError:
            raise ValueError(f"a name server must be an IP address, got {text!r}") from None
    return tuple(servers)


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    networks = []
    for text in _strings(value):
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP network (CIDR): {text!r}") from None
    return tuple(networks)


# --- describing --------------------------------------------------------------------------

_EMPTY_MEANS = {"certificate": "absent: self-signed certificate in data_dir", "key": "the same",
                "smarthost": "none: deliver to MX hosts", "delay_warning": "disabled",
                "smarthost_user": "no AUTH at the smarthost", "smarthost_password_file": "no AUTH",
                "nameservers": "the system resolver", **dict.fromkeys(SERVICES, "disabled")}


def describe(config: Config) -> str:
    """The effective settings as TOML, one key per line; `load()` of it gives the same Config."""
    lines = [f"# effective settings, from {config.source or 'built-in defaults'}"]
    for field in fields(config):
        value = getattr(config, field.name)
        if field.name == "source":
            continue
        if field.name == "aliases":
            lines += ["", "[aliases]"]
            lines += [f"{_toml(a)} = {_toml(t)}" for a, t in sorted(value.items())]
        elif is_dataclass(value):
            lines += ["", f"[{field.name}]"]
            for sub in fields(value):
                item = getattr(value, sub.name)
                text = format_size(item) if sub.name == "max_message_size" else _toml(item)
                if not item and sub.name in _EMPTY_MEANS:
                    text += f"  # {_EMPTY_MEANS[sub.name]}"
                lines.append(f"{sub.name} = {text}")
        else:
            lines.append(f"{field.name} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    """One value in TOML; floats are durations, (host, port) pairs are "host:port"."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
        host, port = value
        return _toml(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _toml(format_duration(value))
    if isinstance(value, int):
        return str(value)
    return json.dumps("" if value is None else str(value), ensure_ascii=False)  # a TOML basic string
