"""TLS for every protocol: the server context from `[tls]` and the relay's client contexts.

One `ServerTLS` serves SMTP (STARTTLS and implicit), POP3 and IMAP alike.

Invariants:
- Server: TLS 1.2 and 1.3 only, forward-secret AEAD ciphers, no compression, no
  renegotiation (RFC 8996, RFC 7525 / BCP 195).
- Without `tls.certificate`, a self-signed certificate for `hostname` is made once in
  `<data_dir>/tls/` (and its path logged), so STARTTLS works on a newcomer's first start.
- A missing, unreadable or mismatched certificate or key is a `TLSError` naming the path;
  start-up stops on it. `reload()` (SIGHUP) swaps the certificate for new connections only,
  and keeps the old one if the new files are bad.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from zope.interface import implementer

from mx.config import Config

__all__ = ["TLSError", "ServerTLS", "ensure_self_signed", "opportunistic_client", "verified_client"]

log = Logger()

# TLS 1.2 suites with ECDHE key exchange and an AEAD cipher; TLS 1.3 suites are all such.
SERVER_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class TLSError(Exception):
    """The certificate or key cannot be used; the text names the file."""


def ensure_self_signed(data_dir: Path, hostname: str) -> tuple[Path, Path]:
    """Paths of the self-signed certificate and key for `hostname`, made on first use."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = data_dir / "tls"
    cert_path, key_path = folder / "selfsigned-cert.pem", folder / "selfsigned-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    if hostname != "localhost":
        names.append(x509.DNSName("localhost"))
    names += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    log.info("made a self-signed certificate for {hostname}: {path}", hostname=hostname, path=str(cert_path))
    return cert_path, key_path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSError(f"{what} {path}: {e.strerror}") from None


def _load_options(cert_path: Path, key_path: Path) -> CertificateOptions:
    cert_pem = _read(cert_path, "tls.certificate")
    key_pem = _read(key_path, "tls.key")
    try:
        blocks = [b"-----BEGIN CERTIFICATE-----" + b for b in cert_pem.split(b"-----BEGIN CERTIFICATE-----")[1:]]
        if not blocks:
            raise TLSError(f"tls.certificate {cert_path}: no PEM certificate in the file")
        chain = [crypto.load_certificate(crypto.FILETYPE_PEM, b) for b in blocks]
    except crypto.Error as e:
        raise TLSError(f"tls.certificate {cert_path}: not a valid PEM certificate ({_first(e)})") from None
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as e:
        raise TLSError(f"tls.key {key_path}: not a valid PEM private key ({_first(e)})") from None
    try:
        options = CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(SERVER_CIPHERS),
        )
        context = options.getContext()  # checks that the key matches the certificate
    except (SSL.Error, ValueError) as e:
        raise TLSError(f"tls.key {key_path}: does not match tls.certificate {cert_path} ({_first(e)})") from None
    # CertificateOptions already sets OP_NO_COMPRESSION; renegotiation is refused too.
    context.set_options(getattr(SSL, "OP_NO_RENEGOTIATION", 0))
    return options


def _first(e: Exception) -> str:
    args = e.args[0] if e.args else e
    if isinstance(args, list) and args and isinstance(args[0], tuple):
        return str(args[0][-1])
    return str(args)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server's TLS context factory; every new connection asks for the current one."""

    def __init__(self, config: Config) -> None:
        if config.tls.certificate is not None and config.tls.key is not None:
            self.cert_path, self.key_path = config.tls.certificate, config.tls.key
        else:
            self.cert_path, self.key_path = ensure_self_signed(config.data_dir, config.hostname)
        self._options = _load_options(self.cert_path, self.key_path)

    def getContext(self) -> SSL.Context:
        """Twisted's old-style context factory interface: `startTLS` and `wrapServerTLS`
        call it for each connection, so a reload reaches every new connection."""
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def reload(self) -> bool:
        """Re-read the certificate and key (SIGHUP); keep the old ones if the new are bad."""
        try:
            self._options = _load_options(self.cert_path, self.key_path)
        except TLSError as e:
            log.error("TLS reload failed, keeping the old certificate: {error}", error=str(e))
            return False
        log.info("TLS certificate reloaded from {path}", path=str(self.cert_path))
        return True


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedClient:
    """Opportunistic TLS (RFC 7672 §1.3): SNI sent, any certificate accepted."""

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2)  # verify=False
        try:
            ipaddress.ip_address(hostname)
            self._sni: bytes | None = None  # RFC 6066 §3: no address literals in SNI
        except ValueError:
            self._sni = hostname.encode("idna") if hostname else None

    def clientConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        conn = self._options.clientConnectionForTLS(tlsProtocol)
        if self._sni:
            conn.set_tlsext_host_name(self._sni)
        return conn


def opportunistic_client(hostname: str) -> Any:
    return _UnverifiedClient(hostname)


def verified_client(hostname: str, trust_root: Any = None) -> Any:
    """A client context that requires a certificate valid for `hostname` (service-identity)."""
    return optionsForClientTLS(hostname, trustRoot=trust_root if trust_root is not None else platformTrust())
