"""Tests for mx.mailauth.arc: chain validation (RFC 8617 §5.2) and sealing what mx forwards.

A message is DKIM-signed by its author's domain, then sealed by one or two forwarders (as a
mailing list would), each with its own RSA key; DNS is the fake `Lookup` of test_dkim. Seals
made by mx are also checked with dkimpy's own `arc_verify`.
"""

from __future__ import annotations

import functools

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SynchronousTestCase

from mx.mailauth import arc as marc
from mx.mailauth import dkim as mdkim
from mx.mailauth import keys
from mx.mailauth.keys import SigningKey
from mx.mailauth.lookup import Deadline, TempError
from tests.test_dkim import DOMAIN, MESSAGE, FakeLookup, ed_key, key_name, rsa_key

FIRST = "forwarder.example.net"  # the first hop: an alias that forwards
SECOND = "lists.example.org"  # the second hop: a mailing list


@functools.cache
def sealer_key(domain: str) -> SigningKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return SigningKey("arc", "rsa", pem)


def zone() -> dict[str, object]:
    return {
        key_name("rsa1"): keys.txt_value(rsa_key()),
        key_name("arc", FIRST): keys.txt_value(sealer_key(FIRST)),
        key_name("arc", SECOND): keys.txt_value(sealer_key(SECOND)),
    }


def authored() -> bytes:
    return mdkim.sign(MESSAGE, DOMAIN, [rsa_key()]) + MESSAGE


def seal(message: bytes, domain: str, arc_result: str | None) -> bytes:
    authres = f"mx.{domain}; spf=pass smtp.mailfrom={DOMAIN}; dkim=pass header.d={DOMAIN} header.s=rsa1"
    if arc_result is not None:
        authres += f"; arc={arc_result}"
    return marc.seal(message, authres, domain, sealer_key(domain), f"mx.{domain}") + message


def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
    value = zone().get(name.decode().rstrip("."))
    return value.encode() if isinstance(value, str) else None


class VerifyChainTests(SynchronousTestCase):
    def verify(self, message: bytes, z: dict[str, object] | None = None,
               deadline: Deadline | None = None) -> marc.ARCResult:
        self.lookup = FakeLookup(zone() if z is None else z)
        return marc.verify_chain(message, self.lookup, deadline)

    def test_no_arc_headers_is_none(self) -> None:
        r = self.verify(authored())
        self.assertEqual((r.result, r.instance, r.sealers, r.aar), ("none", 0, [], None))
        self.assertEqual(self.lookup.asked, [])

    def test_one_seal_passes(self) -> None:
        r = self.verify(seal(authored(), FIRST, "none"))
        self.assertEqual((r.result, r.instance, r.sealers, r.oldest_pass), ("pass", 1, [FIRST], 0))
        self.assertTrue(r.aar.startswith(f"mx.{FIRST}; spf=pass"), r.aar)
        self.assertIn("arc=none", r.aar)

    def test_sealed_twice_passes(self) -> None:
        twice = seal(seal(authored(), FIRST, "none"), SECOND, "pass")
        r = self.verify(twice)
        self.assertEqual((r.result, r.instance, r.sealers, r.oldest_pass), ("pass", 2, [FIRST, SECOND], 0))
        self.assertTrue(r.aar.startswith(f"mx.{SECOND};"), r.aar)  # what the last sealer saw
        self.assertIn("arc=pass", r.aar)
        self.assertEqual(dkim.arc_verify(twice, dnsfunc=dnsfunc)[0], dkim.CV_Pass)  # dkimpy agrees
        # the author's DKIM signature is untouched by the seals
        self.assertEqual([x.result for x in mdkim.verify_all(twice, FakeLookup(zone()))], ["pass"])

    def test_altered_body_fails(self) -> None:
        twice = seal(seal(authored(), FIRST, "none"), SECOND, "pass")
        r = self.verify(twice.replace(b"Noon", b"Nine"))
        self.assertEqual((r.result, r.instance, r.sealers), ("fail", 2, [FIRST, SECOND]))
        self.assertIsNone(r.oldest_pass)
        self.assertFalse(r.temporary)

    def test_altered_header_fails(self) -> None:
        once = seal(authored(), FIRST, "none")
        self.assertEqual(self.verify(once.replace(b"Subject: Lunch", b"Subject: Dinner")).result, "fail")

    def test_altered_seal_fails(self) -> None:
        twice = seal(seal(authored(), FIRST, "none"), SECOND, "pass")
        forged = twice.replace(b"i=1; cv=none", b"i=1; cv=pass", 1)
        self.assertEqual(self.verify(forged).result, "fail")

    def test_body_changed_between_hops_still_passes_with_oldest_pass(self) -> None:
        # the list rewrites the body after the first seal, then seals: the chain (seals) holds,
        # the first AMS no longer validates, so oldest-pass names the second hop
        once = seal(authored(), FIRST, "none").replace(b"Alice\r\n", b"Alice\r\n--\r\nlist footer\r\n")
        twice = seal(once, SECOND, "pass")
        r = self.verify(twice)
        self.assertEqual((r.result, r.oldest_pass), ("pass", 2))

    def test_failed_chain_stays_failed(self) -> None:
        broken = seal(authored(), FIRST, "none").replace(b"Noon", b"Nine")
        resealed = seal(broken, SECOND, "fail")
        r = self.verify(resealed)
        self.assertEqual(r.result, "fail")

    def test_missing_sealer_key_fails(self) -> None:
        z = zone()
        del z[key_name("arc", FIRST)]
        r = self.verify(seal(authored(), FIRST, "none"), z)
        self.assertEqual(r.result, "fail")
        self.assertFalse(r.temporary)

    def test_temporary_dns_failure_fails_temporarily(self) -> None:
        z = zone()
        z[key_name("arc", FIRST)] = TempError("SERVFAIL")
        r = self.verify(seal(authored(), FIRST, "none"), z)
        self.assertEqual((r.result, r.temporary, r.sealers), ("fail", True, [FIRST]))
        self.assertIn("SERVFAIL", r.reason)
        r = self.verify(seal(authored(), FIRST, "none"), deadline=Deadline(0))
        self.assertEqual((r.result, r.temporary), ("fail", True))
        self.assertEqual(self.lookup.asked, [])

    def test_too_many_instances_fail_without_lookups(self) -> None:
        fake = (b"ARC-Seal: i=51; cv=pass; a=rsa-sha256; d=example.net; s=arc; b=AAAA\r\n"
                b"ARC-Message-Signature: i=51; a=rsa-sha256; d=example.net; s=arc; h=from; bh=AAAA; b=AAAA\r\n"
                b"ARC-Authentication-Results: i=51; mx.example.net; arc=pass\r\n")
        r = self.verify(fake + authored())
        self.assertEqual((r.result, r.instance), ("fail", 51))
        self.assertEqual(self.lookup.asked, [])


class SealTests(SynchronousTestCase):
    def test_three_headers_in_order(self) -> None:
        headers = marc.seal(authored(), "spf=pass smtp.mailfrom=example.com", FIRST, sealer_key(FIRST), f"mx.{FIRST}")
        names = [line.split(b":")[0] for line in headers.split(b"\r\n") if line and line[:1] not in (b" ", b"\t")]
        self.assertEqual(names, [b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results"])
        self.assertIn(b"i=1; cv=none", headers)
        self.assertIn(f"i=1; mx.{FIRST};".encode(), headers)  # authserv-id added when not given

    def test_our_own_incoming_results_are_not_repeated(self) -> None:
        forged = b"Authentication-Results: mx.forwarder.example.net; dkim=pass header.d=bank.example\r\n" + authored()
        headers = marc.seal(forged, f"mx.{FIRST}; spf=fail smtp.mailfrom=example.com", FIRST, sealer_key(FIRST),
                            f"mx.{FIRST}")
        self.assertNotIn(b"bank.example", headers)
        self.assertIn(b"spf=fail", headers)
        self.assertEqual(marc.verify_chain(headers + forged, FakeLookup(zone())).result, "pass")

    def test_ed25519_key_refused(self) -> None:
        self.assertRaises(ValueError, marc.seal, authored(), "spf=pass", FIRST, ed_key(), f"mx.{FIRST}")

    def test_existing_chain_needs_an_arc_result(self) -> None:
        once = seal(authored(), FIRST, "none")
        self.assertRaises(ValueError, marc.seal, once, f"mx.{SECOND}; spf=pass", SECOND, sealer_key(SECOND),
                          f"mx.{SECOND}")
        self.assertRaises(ValueError, marc.seal, once, f"mx.{SECOND}; arc=temperror", SECOND, sealer_key(SECOND),
                          f"mx.{SECOND}")

    def test_lf_message(self) -> None:
        lf = authored().replace(b"\r\n", b"\n")
        headers = marc.seal(lf, "arc=none", FIRST, sealer_key(FIRST), f"mx.{FIRST}")
        self.assertNotIn(b"\r", headers)
        self.assertEqual(marc.verify_chain(headers + lf, FakeLookup(zone())).result, "pass")
