"""mx.mailauth.fastrsa gives dkimpy's own answers (it only makes them faster)."""

from __future__ import annotations

import hashlib

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.trial.unittest import TestCase

from mx.mailauth import dkim as _installs  # noqa: F401  (importing it installs fastrsa)
from mx.mailauth import fastrsa


class FastRSATests(TestCase):
    def test_installed_and_equal_to_the_pure_python_answers(self) -> None:
        self.assertIs(dkim.RSASSA_PKCS1_v1_5_verify, fastrsa.verify)
        self.assertIs(dkim.parse_public_key, fastrsa.parse_public_key)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pk = fastrsa.parse_public_key(der)
        self.assertEqual(pk, dkim.crypto.parse_public_key(der))
        raw = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
        self.assertEqual(fastrsa.parse_public_key(raw), dkim.crypto.parse_public_key(raw))
        for name, algorithm in (("sha256", hashes.SHA256()), ("sha1", hashes.SHA1())):
            data = b"the signed header block"
            signature = key.sign(data, padding.PKCS1v15(), algorithm)
            for sig, expected in ((signature, True), (signature[:-1] + bytes([signature[-1] ^ 1]), False),
                                  (signature[:10], False), (b"", False)):
                h1, h2 = hashlib.new(name, data), hashlib.new(name, data)
                self.assertEqual(fastrsa.verify(h1, sig, pk), expected)
                try:
                    pure = dkim.crypto.RSASSA_PKCS1_v1_5_verify(h2, sig, pk)
                except Exception:
                    pure = False
                self.assertEqual(pure, expected)
        with self.assertRaises(dkim.crypto.UnparsableKeyError):
            fastrsa.parse_public_key(b"not a key")
