"""RSA for dkimpy through `cryptography`: the same answers, ten times faster.

dkimpy verifies RSA signatures and parses RSA public keys in pure Python (0.21 ms and
0.03 ms per message here, against 0.017 ms and 0.001 ms with OpenSSL through
`cryptography`, already a dependency); at port 25's rates that was a third of the cost of
checking DKIM. `install()` replaces the two functions in dkimpy's namespace, where its
verifier looks them up at each call. Signing stays dkimpy's (submission rates are low).

Invariants:
- Same contract as dkimpy's `RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)` (True /
  False, never an exception for a bad signature) and `parse_public_key(der)` (a dict with
  `modulus` and `publicExponent`; `UnparsableKeyError` for what is no RSA key), so dkimpy's
  own checks (key size after verify, `k=` handling) are untouched.
- Parsed keys are cached by their DER bytes (bounded), public key objects by (n, e).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

__all__ = ["install", "verify", "parse_public_key"]

_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_pure_parse = dkim.crypto.parse_public_key


@lru_cache(maxsize=1024)
def _public_key(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def verify(hash: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    algorithm = _HASHES.get(str(hash.name).lower())
    if algorithm is None:
        return dkim.crypto.RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)
    try:
        key = _public_key(public_key["modulus"], public_key["publicExponent"])
        key.verify(signature, hash.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except (InvalidSignature, ValueError, UnsupportedAlgorithm):
        return False
    return True


@lru_cache(maxsize=1024)
def _parse(data: bytes) -> tuple[int, int]:
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return numbers.n, numbers.e
    pk = _pure_parse(data)  # a bare RFC 8017 RSAPublicKey, or its UnparsableKeyError
    return pk["modulus"], pk["publicExponent"]


def parse_public_key(data: bytes) -> dict[str, int]:
    n, e = _parse(bytes(data))
    return {"modulus": n, "publicExponent": e}


def install() -> None:
    dkim.RSASSA_PKCS1_v1_5_verify = verify
    dkim.parse_public_key = parse_public_key
