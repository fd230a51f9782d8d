"""The DNS records an operator publishes for a domain mx serves (`mx dns-records DOMAIN`).

Zone-file lines, filled in from the config: MX (this host), SPF (the domain's MX hosts may
send: `v=spf1 mx -all`), one DKIM record per key under `<data_dir>/dkim/<domain>/`, DMARC
(`p=quarantine`, reports to the postmaster), and the RFC 6186 / RFC 8314 SRV records of the
submission, IMAP and POP3 services with the configured ports (a service that is off gets
the "not provided" target ".").

Invariants: pure (reads the key files, nothing else); every name is fully qualified.
"""

from __future__ import annotations

import re
from pathlib import Path

from mx.config import Config
from mx.mailauth.keys import dns_record

__all__ = ["dns_records", "listen_port"]

# RFC 6186 (and RFC 8314 §5.1 for submissions): service label -> [listen] key
_SRV = (("_submissions._tcp", "submissions"), ("_submission._tcp", "submission"), ("_imaps._tcp", "imaps"),
        ("_imap._tcp", "imap"), ("_pop3s._tcp", "pop3s"), ("_pop3._tcp", "pop3"))
_PORT = re.compile(r"^(?:tcp6?|ssl):(?:port=)?(\d+)")


def listen_port(description: str) -> int | None:
    """The port of a Twisted endpoint string (`tcp:587:interface=...`), None when off."""
    m = _PORT.match(description or "")
    return int(m.group(1)) if m else None


def dns_records(config: Config, domain: str) -> list[str]:
    domain = domain.rstrip(".").lower()
    host = config.hostname.rstrip(".") + "."
    zone = domain + "."
    lines = [
        f"{zone} IN MX 10 {host}",
        f'{zone} IN TXT "v=spf1 mx -all"',
    ]
    key_dir = Path(config.data_dir) / "dkim" / domain
    if key_dir.is_dir():
        for key in sorted(key_dir.glob("*.key")):
            lines.append(dns_record(key, key.stem, domain))
    lines.append(f'_dmarc.{zone} IN TXT "v=DMARC1; p=quarantine; rua=mailto:{config.postmaster}"')
    for label, service in _SRV:
        port = listen_port(getattr(config.listen, service))
        if port is None:
            lines.append(f"{label}.{zone} IN SRV 0 0 0 .")  # RFC 6186 §4: not provided
        else:
            lines.append(f"{label}.{zone} IN SRV 0 1 {port} {host}")
    return lines
