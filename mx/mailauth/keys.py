"""DKIM signing keys on disk: `<data_dir>/dkim/<domain>/<selector>.key`, made by `mx dkim keygen`,
published with `dns_record`, and read by the server through a `KeyStore`.

Invariants:
- A key file is one PEM private key; its algorithm is its key type (RSA or Ed25519), never
  the file name. RSA keys are written as PKCS#1 (`BEGIN RSA PRIVATE KEY`, what dkimpy and
  opendkim read), Ed25519 keys as PKCS#8; either form is read.
- Key files are created 0600 in folders created 0700, written whole to a temporary name,
  fsynced and linked into place: `generate` never overwrites a key and never leaves a
  half-written `.key` behind (a crash leaves at most a dot-named temporary file). Run as
  root, it gives what it creates to the owner of `data_dir` (the user the server runs as).
- Domains are stored lower-case in A-label form; selectors and domains are checked against
  DNS label syntax before they become path components (no `/`, no `..`).
- `KeyStore.reload` re-reads keys only when a stat of the tree (folders and key files: name,
  inode, size, mtime) differs from the last one, so calling it every few seconds is cheap; a
  file that is not a usable key is skipped and named in `problems`, never fatal. The map of
  keys is replaced in one assignment, so `keys_for` from other threads sees old or new keys,
  never a mixture.
- RSA keys below 1024 bits are never used (RFC 8301 §3.2: verifiers reject them).
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mx import durable

__all__ = ["ALGORITHMS", "KeyStore", "SigningKey", "dns_record", "generate", "load", "normalize_domain",
           "txt_value"]

ALGORITHMS = ("ed25519", "rsa")
MIN_RSA_BITS = 1024  # RFC 8301 §3.2
MAX_RSA_BITS = 4096  # RFC 8301 §3.2: verifiers need not go beyond
TXT_STRING_MAX = 255  # RFC 1035 §3.3: one <character-string>
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One private key: `selector` names its DNS record, `private_bytes` is the PEM as stored."""

    selector: str
    algorithm: str  # "rsa" | "ed25519"
    private_bytes: bytes

    def __repr__(self) -> str:  # never the key itself in a log line or a traceback
        return f"SigningKey(selector={self.selector!r}, algorithm={self.algorithm!r})"


def _labels(name: str, what: str) -> str:
    text = name.strip().rstrip(".").lower()
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{what} {name!r} is not a valid domain name") from None
    if not text or len(text) > 253 or not all(_LABEL.match(label) for label in text.split(".")):
        raise ValueError(f"{what} {name!r} is not a valid {'selector' if what == 'selector' else 'domain name'}")
    return text


def normalize_domain(domain: str) -> str:
    """`domain` lower-case, A-labels, no trailing dot; ValueError if it cannot be one."""
    return _labels(domain, "domain")


def _selector(selector: str) -> str:
    return _labels(selector, "selector")  # RFC 6376 §3.1: selectors are dot-separated sub-domains


def _algorithm_of(private_key: object) -> str:
    if isinstance(private_key, rsa.RSAPrivateKey):
        return "rsa"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    raise ValueError(f"not an RSA or Ed25519 key: {type(private_key).__name__}")


def _private_key(pem: bytes) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a PEM private key without a password: {e}") from None
    _algorithm_of(key)
    assert isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey))
    return key


def load(path: Path | str) -> SigningKey:
    """The key in `path` (selector from the file name); ValueError if it is not a usable key."""
    path = Path(path)
    pem = path.read_bytes()
    key = _private_key(pem)
    algorithm = _algorithm_of(key)
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed (RFC 8301)")
    return SigningKey(_selector(path.stem), algorithm, pem)


def _owner(data_dir: Path) -> tuple[int, int] | None:
    """Whom new key files and folders belong to: `data_dir`'s owner when root runs us (so a
    root-run `mx dkim keygen` makes keys the mail user's server can read), else None."""
    if os.geteuid() != 0:
        return None
    st = os.stat(data_dir)
    return (st.st_uid, st.st_gid)


def _mkdir_private(path: Path, owner: tuple[int, int] | None) -> None:
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
    if owner is not None:
        os.chown(path, *owner)


def generate(data_dir: Path | str, domain: str, selector: str, algorithm: str = "ed25519",
             bits: int = 2048) -> Path:
    """Make a new key under `<data_dir>/dkim/<domain>/<selector>.key` and return its path.

    FileExistsError if that key exists (it is never replaced); ValueError for a bad domain,
    selector, algorithm or RSA size.
    """
    domain = normalize_domain(domain)
    selector = _selector(selector)
    if algorithm == "rsa":
        if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
            raise ValueError(f"RSA keys are {MIN_RSA_BITS} to {MAX_RSA_BITS} bits, not {bits}")
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    elif algorithm == "ed25519":
        ed_key = ed25519.Ed25519PrivateKey.generate()
        pem = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    else:
        raise ValueError(f"unknown key algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    owner = _owner(Path(data_dir))
    root = Path(data_dir) / "dkim"
    _mkdir_private(root, owner)
    folder = root / domain
    _mkdir_private(folder, owner)
    path = folder / f"{selector}.key"
    if path.exists():
        raise FileExistsError(f"{path} exists; not replacing a DKIM key")
    staged = durable.stage(folder / f".{selector}.key.{secrets.token_hex(6)}.tmp", path, [pem], 0o600)
    if owner is not None and staged.fd is not None:
        try:
            os.fchown(staged.fd, *owner)
        except BaseException:
            durable.discard([staged])
            raise
    staged.exclusive = True  # published with link(): a key that appeared meanwhile survives
    durable.sync([staged])
    try:
        durable.publish([staged])
    except FileExistsError:
        raise FileExistsError(f"{path} exists; not replacing a DKIM key") from None
    durable.fsync_dir(folder)
    return path


def txt_value(key: SigningKey | Path | str | bytes) -> str:
    """The DKIM key record (RFC 6376 §3.6.1, RFC 8463 §4.2) for a key: `v=DKIM1; k=...; p=...`."""
    if isinstance(key, SigningKey):
        pem = key.private_bytes
    elif isinstance(key, bytes):
        pem = key
    else:
        pem = Path(key).read_bytes()
    private = _private_key(pem)
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"  # RFC 8463 §4.2: the bare key
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"


def dns_record(key_path_or_key: SigningKey | Path | str | bytes, selector: str, domain: str) -> str:
    """The zone-file line `S._domainkey.DOMAIN. IN TXT "..."`, split into strings of <= 255 octets."""
    value = txt_value(key_path_or_key)
    parts = [value[i:i + TXT_STRING_MAX] for i in range(0, len(value), TXT_STRING_MAX)]
    quoted = " ".join(f'"{part}"' for part in parts)  # base64 and tags: nothing to escape
    return f"{_selector(selector)}._domainkey.{normalize_domain(domain)}. IN TXT {quoted}"


def _stamp(entry: os.DirEntry[str]) -> tuple[str, int, int, int]:
    st = entry.stat(follow_symlinks=True)
    return (entry.path, st.st_ino, st.st_size, st.st_mtime_ns)


class KeyStore:
    """The keys under `<data_dir>/dkim/`, by domain; `reload()` picks up new, changed and removed keys."""

    def __init__(self, data_dir: Path | str) -> None:
        self.root = Path(data_dir) / "dkim"
        self.problems: list[str] = []  # files skipped at the last (re)load, with why: for the log
        self._keys: dict[str, tuple[SigningKey, ...]] = {}
        self._stamps: tuple[tuple[str, int, int, int], ...] | None = None
        self.reload()

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The usable keys of `domain` (any case, U- or A-labels), by selector; [] when none."""
        try:
            return list(self._keys.get(normalize_domain(domain), ()))
        except ValueError:
            return []

    def domains(self) -> list[str]:
        return sorted(self._keys)

    def _scan(self) -> tuple[tuple[tuple[str, int, int, int], ...], list[tuple[str, Path]]]:
        stamps: list[tuple[str, int, int, int]] = []
        files: list[tuple[str, Path]] = []
        try:
            domains = sorted(os.scandir(self.root), key=lambda e: e.name)
        except FileNotFoundError:
            return (), []
        for d in domains:
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                entries = sorted(os.scandir(d.path), key=lambda e: e.name)
                stamps.append(_stamp(d))
            except OSError:
                continue  # vanished or unreadable: as if absent
            for f in entries:
                if f.name.startswith(".") or not f.name.endswith(".key"):
                    continue
                try:
                    stamps.append(_stamp(f))
                except OSError:
                    continue
                files.append((d.name, Path(f.path)))
        return tuple(stamps), files

    def reload(self) -> bool:
        """Re-read the tree if anything in it changed; True when the keys were re-read."""
        stamps, files = self._scan()
        if stamps == self._stamps:
            return False
        keys: dict[str, list[SigningKey]] = {}
        problems: list[str] = []
        for domain, path in files:
            try:
                domain = normalize_domain(domain)
                key = load(path)
                mode = stat.S_IMODE(path.stat().st_mode)
            except (OSError, ValueError) as e:
                problems.append(f"{path}: {e}")
                continue
            if mode & 0o077:
                problems.append(f"{path}: mode {mode:04o} lets others read a private key; it should be 0600")
            keys.setdefault(domain, []).append(key)
        self._keys = {domain: tuple(found) for domain, found in keys.items()}
        self.problems = problems
        self._stamps = stamps
        return True
