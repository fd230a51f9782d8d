"""Tests for mx.mailauth.dkim (verify every signature, sign submitted mail) and mx.mailauth.keys.

DNS is a fake `Lookup` serving TXT records from a dict (a name mapped to an exception raises
it), returning real `lookup.Answer`s; the lead's integration tests use a real DNS server.
Signatures made by mx are checked by dkimpy's own verifier (in-process and its `dkimverify`
script) and by OpenDKIM (`opendkim -t` with `TestPublicKeys`, Debian package `opendkim`),
which is skipped where that is not installed.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import random
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import dkim
import dns.rdata
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mx.mailauth import dkim as mdkim
from mx.mailauth import keys
from mx.mailauth.keys import KeyStore, SigningKey
from mx.mailauth.lookup import Answer, Deadline, TempError

DOMAIN = "example.com"
MESSAGE = (
    b"Received: from client.example by mx.example.com; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: Lunch\r\n"
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"Message-ID: <lunch@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Noon at the usual place?\r\n"
    b"-- \r\n"
    b"Alice\r\n"
)


class FakeLookup:
    """`Lookup.txt` from a dict: name -> TXT text, list of texts, or an exception to raise."""

    def __init__(self, zone: dict[str, object]) -> None:
        self.zone = zone
        self.asked: list[str] = []

    def txt(self, name: str, deadline: Deadline | None = None) -> Answer:
        name = name.rstrip(".").lower()
        self.asked.append(name)
        if deadline is not None and deadline.expired:
            raise TempError(f"{name} TXT: deadline passed")
        value = self.zone.get(name)
        if isinstance(value, Exception):
            raise value
        if value is None:
            return Answer(name, "TXT", (), (), nxdomain=True)
        texts = [value] if isinstance(value, str) else list(value)  # type: ignore[arg-type]
        raw = tuple(t.encode("latin-1") for t in texts)
        return Answer(name, "TXT", tuple(texts), raw)


# --- keys made once per run (RSA generation is the slow part) ------------------------------


@functools.cache
def rsa_pem(bits: int = 2048) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@functools.cache
def ed_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _probable_prime(bits: int, rng: random.Random) -> int:
    while True:
        n = rng.getrandbits(bits) | (1 << (bits - 1)) | 1
        if all(n % p for p in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)) and _miller_rabin(n, rng):
            return n


def _miller_rabin(n: int, rng: random.Random, rounds: int = 40) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


@functools.cache
def weak_rsa_pem() -> bytes:
    """A 512-bit RSA key (cryptography refuses to generate one, so build it from two primes)."""
    rng = random.Random(512)
    e = 65537
    while True:
        p, q = _probable_prime(256, rng), _probable_prime(256, rng)
        phi = (p - 1) * (q - 1)
        if p != q and phi % e and (p * q).bit_length() == 512:
            break
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                    rsa.RSAPublicNumbers(e, p * q))
    key = numbers.private_key(unsafe_skip_rsa_key_validation=True)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def ed_seed(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return base64.b64encode(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                              serialization.NoEncryption()))


def key_name(selector: str, domain: str = DOMAIN) -> str:
    return f"{selector}._domainkey.{domain}"


def rsa_key(selector: str = "rsa1") -> SigningKey:
    return SigningKey(selector, "rsa", rsa_pem())


def ed_key(selector: str = "ed1") -> SigningKey:
    return SigningKey(selector, "ed25519", ed_pem())


def zone_for(*ks: SigningKey, domain: str = DOMAIN) -> dict[str, object]:
    return {key_name(k.selector, domain): keys.txt_value(k) for k in ks}


def dkimpy_sign(message: bytes, selector: str, pem_or_seed: bytes, algorithm: bytes = b"rsa-sha256",
                canonicalize: tuple[bytes, bytes] = (b"relaxed", b"simple"), length: bool = False) -> bytes:
    return dkim.sign(message, selector.encode(), DOMAIN.encode(), pem_or_seed, signature_algorithm=algorithm,
                     canonicalize=canonicalize, length=length) + message


def tags_of(header: bytes) -> dict[bytes, bytes]:
    name, _, value = header.partition(b":")
    return dkim.util.parse_tag_value(mdkim._unfold(value))


def split_signatures(signed: bytes) -> list[bytes]:
    """The DKIM-Signature header fields at the top of `signed`, each with its folded lines."""
    out: list[bytes] = []
    for line in signed.split(b"\r\n"):
        if line.lower().startswith(b"dkim-signature:"):
            out.append(line)
        elif line[:1] in (b" ", b"\t") and out:
            out[-1] += b"\r\n" + line
        elif out:
            break
    return out


class VerifyTests(SynchronousTestCase):
    """`verify_all`: one RFC 8601 result per signature."""

    def verify(self, message: bytes, zone: dict[str, object], deadline: Deadline | None = None
               ) -> list[mdkim.DKIMResult]:
        self.lookup = FakeLookup(zone)
        return mdkim.verify_all(message, self.lookup, deadline)

    def assertOne(self, results: list[mdkim.DKIMResult], result: str, reason_part: str = "") -> mdkim.DKIMResult:
        self.assertEqual(len(results), 1, results)
        r = results[0]
        self.assertEqual(r.result, result, r)
        self.assertIn(reason_part, r.reason)
        return r

    def test_unsigned_message_has_no_results(self) -> None:
        self.assertEqual(self.verify(MESSAGE, {}), [])
        self.assertEqual(self.lookup.asked, [])

    def test_dkimpy_rsa_2048_signatures_pass(self) -> None:
        k = rsa_key()
        for canon in ((b"simple", b"simple"), (b"relaxed", b"simple"), (b"relaxed", b"relaxed")):
            signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem(), canonicalize=canon)
            r = self.assertOne(self.verify(signed, zone_for(k)), "pass")
            self.assertEqual((r.domain, r.selector, r.algorithm, r.identity), (DOMAIN, "rsa1", "rsa-sha256",
                                                                               "@example.com"))
            self.assertEqual(r.header_b, tags_of(split_signatures(signed)[0])[b"b"][:8].decode())
            self.assertEqual(len(r.header_b), 8)
            self.assertFalse(r.body_length_limited)
            self.assertEqual(self.lookup.asked, ["rsa1._domainkey.example.com"])

    def test_dkimpy_ed25519_signature_passes(self) -> None:
        k = ed_key()
        signed = dkimpy_sign(MESSAGE, k.selector, ed_seed(ed_pem()), algorithm=b"ed25519-sha256")
        r = self.assertOne(self.verify(signed, zone_for(k)), "pass")
        self.assertEqual(r.algorithm, "ed25519-sha256")

    def test_broken_body_hash_fails(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem()).replace(b"Noon", b"Nine")
        self.assertOne(self.verify(signed, zone_for(k)), "fail", "body hash")

    def test_changed_subject_fails(self) -> None:
        k = ed_key()
        signed = dkimpy_sign(MESSAGE, k.selector, ed_seed(ed_pem()), algorithm=b"ed25519-sha256")
        signed = signed.replace(b"Subject: Lunch", b"Subject: Dinner")
        self.assertOne(self.verify(signed, zone_for(k)), "fail", "signature did not verify")

    def test_missing_key_is_permerror(self) -> None:
        # RFC 6376 §6.1.2 "no key for signature" is PERMFAIL; RFC 8601 §2.7.1 calls an
        # unrecoverable error that a later attempt will not fix permerror (not fail: nothing
        # was found not to match). NXDOMAIN and NODATA (a void answer) alike.
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        self.assertOne(self.verify(signed, {}), "permerror", "no key for signature")
        self.assertOne(self.verify(signed, {key_name("rsa1"): []}), "permerror", "no TXT record")

    def test_revoked_key_fails(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        self.assertOne(self.verify(signed, {key_name("rsa1"): "v=DKIM1; k=rsa; p="}), "fail", "revoked")

    def test_512_bit_key_fails(self) -> None:
        weak = SigningKey("weak", "rsa", weak_rsa_pem())
        signed = dkimpy_sign(MESSAGE, weak.selector, weak_rsa_pem())
        self.assertTrue(dkim.verify(signed, dnsfunc=lambda name, timeout=5: keys.txt_value(weak).encode(),
                                    minkey=512), "the weak key itself signs correctly")
        self.assertOne(self.verify(signed, zone_for(weak)), "fail", "512 bits")

    def test_temporary_dns_failure_is_temperror(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        self.assertOne(self.verify(signed, {key_name("rsa1"): TempError("SERVFAIL")}), "temperror", "SERVFAIL")

    def test_spent_deadline_is_temperror_without_a_lookup(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        self.assertOne(self.verify(signed, zone_for(k), Deadline(0)), "temperror", "deadline")
        self.assertEqual(self.lookup.asked, [])

    def test_body_length_limit_is_reported(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem(), length=True)
        r = self.assertOne(self.verify(signed, zone_for(k)), "pass", "l=")
        self.assertTrue(r.body_length_limited)
        self.assertIn("whole body signed", r.reason)
        appended = signed + b"Click here for a prize\r\n"
        r = self.assertOne(self.verify(appended, zone_for(k)), "pass", "24 of")
        self.assertTrue(r.body_length_limited)
        self.assertIn("not signed", r.reason)

    def test_two_signatures_two_results_in_header_order(self) -> None:
        r1, e1 = rsa_key(), ed_key()
        once = dkimpy_sign(MESSAGE, e1.selector, ed_seed(ed_pem()), algorithm=b"ed25519-sha256")
        twice = dkimpy_sign(once, r1.selector, rsa_pem())
        results = self.verify(twice, zone_for(r1, e1))
        self.assertEqual([(r.selector, r.result) for r in results], [("rsa1", "pass"), ("ed1", "pass")])
        # each is judged on its own: a missing RSA key does not touch the Ed25519 result
        results = self.verify(twice, zone_for(e1))
        self.assertEqual([(r.selector, r.result) for r in results], [("rsa1", "permerror"), ("ed1", "pass")])

    def test_rsa_sha1_is_policy(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem(), algorithm=b"rsa-sha1")
        self.assertOne(self.verify(signed, zone_for(k)), "policy", "RFC 8301")

    def test_key_algorithm_must_match(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        self.assertOne(self.verify(signed, {key_name("rsa1"): keys.txt_value(ed_key())}), "permerror", "k=ed25519")

    def test_key_hash_and_service_restrictions(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        value = keys.txt_value(k)
        self.assertOne(self.verify(signed, {key_name("rsa1"): value.replace("k=rsa;", "k=rsa; h=sha1;")}),
                       "permerror", "h=")
        self.assertOne(self.verify(signed, {key_name("rsa1"): value.replace("k=rsa;", "k=rsa; s=tlsrpt;")}),
                       "permerror", "s=")
        self.assertOne(self.verify(signed, {key_name("rsa1"): value.replace("k=rsa;", "k=rsa; h=sha1:sha256;")}),
                       "pass")

    def test_testing_key_is_flagged(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        value = keys.txt_value(k).replace("k=rsa;", "k=rsa; t=y;")
        r = self.assertOne(self.verify(signed, {key_name("rsa1"): value}), "pass", "t=y")
        self.assertTrue(r.testing)

    def test_garbage_key_record_is_permerror(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem())
        self.assertOne(self.verify(signed, {key_name("rsa1"): "v=DKIM1; k=rsa; p=bm90IGEga2V5"}), "permerror")
        self.assertOne(self.verify(signed, {key_name("rsa1"): "v=DKIM1; p"}), "permerror", "syntax")

    def test_malformed_signature_is_neutral_without_a_lookup(self) -> None:
        header = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa1; h=from; b=AAAA\r\n"
        r = self.assertOne(self.verify(header + MESSAGE, zone_for(rsa_key())), "neutral", "bh=")
        self.assertEqual((r.domain, r.selector), (DOMAIN, "rsa1"))
        self.assertOne(self.verify(b"DKIM-Signature: v=1; a; b\r\n" + MESSAGE, {}), "neutral", "tag list")
        no_from = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=rsa1; h=subject; bh=AAAA; b=AAAA\r\n"
        self.assertOne(self.verify(no_from + MESSAGE, zone_for(rsa_key())), "neutral", "From")
        self.assertEqual(self.lookup.asked, [])

    def test_unknown_algorithm_is_neutral(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem()).replace(b"a=rsa-sha256", b"a=rsa-md5", 1)
        self.assertOne(self.verify(signed, zone_for(k)), "neutral", "algorithm")

    def test_unparseable_header_block(self) -> None:
        k = rsa_key()
        signed = dkimpy_sign(MESSAGE, k.selector, rsa_pem()).replace(b"Subject: Lunch", b"Subject Lunch")
        self.assertOne(self.verify(signed, zone_for(k)), "neutral", "not parseable")

    def test_signature_count_is_capped(self) -> None:
        k = rsa_key()
        signed = MESSAGE
        for _ in range(mdkim.MAX_SIGNATURES + 2):
            signed = dkimpy_sign(signed, k.selector, rsa_pem())
        results = self.verify(signed, zone_for(k))
        self.assertEqual([r.result for r in results], ["pass"] * mdkim.MAX_SIGNATURES + ["policy"] * 2)
        self.assertEqual(len(self.lookup.asked), mdkim.MAX_SIGNATURES)

    def test_non_ascii_domain_looked_up_as_a_labels(self) -> None:
        k = rsa_key()
        signed = dkim.sign(MESSAGE, b"rsa1", "bücher.example".encode(), rsa_pem()) + MESSAGE
        results = self.verify(signed, {key_name("rsa1", "xn--bcher-kva.example"): keys.txt_value(k)})
        self.assertEqual([r.result for r in results], ["pass"])
        self.assertEqual(self.lookup.asked, ["rsa1._domainkey.xn--bcher-kva.example"])


class SignTests(SynchronousTestCase):
    """`sign`: what mx puts on submitted mail, checked by independent verifiers."""

    def setUp(self) -> None:
        self.keys = [ed_key(), rsa_key()]
        self.zone = zone_for(*self.keys)
        self.signed = mdkim.sign(MESSAGE, DOMAIN, self.keys) + MESSAGE

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        value = self.zone.get(name.decode().rstrip("."))
        return value.encode() if isinstance(value, str) else None

    def test_no_keys_no_signature(self) -> None:
        self.assertEqual(mdkim.sign(MESSAGE, DOMAIN, []), b"")

    def test_one_signature_per_key_rsa_on_top(self) -> None:
        sigs = split_signatures(self.signed)
        self.assertEqual([tags_of(s)[b"a"] for s in sigs], [b"rsa-sha256", b"ed25519-sha256"])
        self.assertEqual([tags_of(s)[b"s"] for s in sigs], [b"rsa1", b"ed1"])

    def test_signature_tags(self) -> None:
        for sig in split_signatures(self.signed):
            tags = tags_of(sig)
            self.assertEqual(tags[b"c"], b"relaxed/relaxed")
            self.assertEqual(tags[b"d"], b"example.com")
            self.assertNotIn(b"l", tags)
            self.assertTrue(tags[b"t"].isdigit())
            self.assertTrue(tags[b"a"].endswith(b"-sha256"))
            h = [x.strip() for x in tags[b"h"].split(b":")]
            # over-signed: listed once more than present (absent ones once), so none can be added
            for name in mdkim.OVERSIGNED:
                present = sum(1 for line in MESSAGE.split(b"\r\n\r\n")[0].split(b"\r\n")
                              if line.lower().startswith(name.encode() + b":"))
                self.assertEqual(h.count(name.encode()), present + 1, name)
            self.assertNotIn(b"received", h)
            self.assertNotIn(b"reply-to", h)  # not present, not over-signed

    def test_present_rfc6376_headers_are_signed(self) -> None:
        message = b"Reply-To: team@example.com\r\nList-Id: <lunch.example.com>\r\nCc: carol@example.net\r\n" + MESSAGE
        sig = mdkim.sign(message, DOMAIN, [rsa_key()])
        h = [x.strip() for x in tags_of(sig)[b"h"].split(b":")]
        for name in (b"reply-to", b"list-id", b"cc"):
            self.assertEqual(h.count(name), 1, name)

    def test_dkimpy_verifies_both(self) -> None:
        self.assertTrue(dkim.verify(self.signed, dnsfunc=self.dnsfunc))  # the top one, as dkim.verify does
        d = dkim.DKIM(self.signed)
        self.assertTrue(d.verify(idx=1, dnsfunc=self.dnsfunc))
        self.assertEqual(d.signature_fields[b"a"], b"ed25519-sha256")

    def test_mx_verifies_both(self) -> None:
        results = mdkim.verify_all(self.signed, FakeLookup(self.zone))
        self.assertEqual([(r.result, r.selector) for r in results], [("pass", "rsa1"), ("pass", "ed1")])

    def test_dkimverify_script(self) -> None:
        """dkimpy's `dkimverify` command itself, with its DNS answered from our zone."""
        script = (
            "import json, sys\n"
            "import dkim.dnsplug\n"
            "zone = json.loads(sys.argv[1])\n"
            "dkim.dnsplug._get_txt = lambda name, timeout=5: zone.get(name.rstrip('.'))\n"
            "from dkim.dkimverify import main\n"
            "sys.argv = ['dkimverify', '--index', sys.argv[2]]\n"
            "main()\n"
        )
        for index in ("0", "1"):
            out = subprocess.run([sys.executable, "-c", script, json.dumps(self.zone), index], input=self.signed,
                                 capture_output=True, timeout=60)
            self.assertEqual((out.returncode, out.stdout.strip()), (0, b"signature ok"), out.stderr)
        tampered = self.signed.replace(b"Subject: Lunch", b"Subject: Dinner")  # (a body change raises)
        out = subprocess.run([sys.executable, "-c", script, json.dumps(self.zone), "0"], input=tampered,
                             capture_output=True, timeout=60)
        self.assertEqual((out.returncode, out.stdout.strip()), (1, b"signature verification failed"))

    def test_added_headers_break_oversigned_signatures(self) -> None:
        for extra in (b"From: Mallory <boss@example.com>\r\n", b"Subject: URGENT\r\n", b"To: everyone@example.org\r\n",
                      b"Content-Transfer-Encoding: base64\r\n", b"Reply-To: mallory@example.net\r\n"):
            forged = extra + self.signed
            results = mdkim.verify_all(forged, FakeLookup(self.zone))
            if extra.startswith(b"Reply-To"):  # absent and not over-signed: adding it is allowed
                self.assertEqual([r.result for r in results], ["pass", "pass"])
            else:
                self.assertEqual([r.result for r in results], ["fail", "fail"], extra)

    def test_lf_message_gets_lf_headers(self) -> None:
        lf = MESSAGE.replace(b"\r\n", b"\n")
        sig = mdkim.sign(lf, DOMAIN, [rsa_key()])
        self.assertNotIn(b"\r", sig)
        self.assertTrue(sig.endswith(b"\n"))
        self.assertEqual([r.result for r in mdkim.verify_all(sig + lf, FakeLookup(self.zone))], ["pass"])

    def test_idn_domain_signs_with_a_label(self) -> None:
        sig = mdkim.sign(MESSAGE, "Bücher.Example", [rsa_key()])
        self.assertEqual(tags_of(sig)[b"d"], b"xn--bcher-kva.example")

    def test_pkcs8_rsa_key_signs(self) -> None:
        key = serialization.load_pem_private_key(rsa_pem(), password=None)
        pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        signed = mdkim.sign(MESSAGE, DOMAIN, [SigningKey("rsa1", "rsa", pkcs8)]) + MESSAGE
        self.assertEqual([r.result for r in mdkim.verify_all(signed, FakeLookup(self.zone))], ["pass"])

    def test_opendkim_verifies_both(self) -> None:
        """OpenDKIM, a second, independent verifier: `opendkim -t` with its TestPublicKeys file."""
        opendkim = shutil.which("opendkim") or shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")
        if opendkim is None:
            raise SkipTest("opendkim is not installed (Debian package opendkim; .ci/run installs it)")
        work = Path(self.mktemp())
        work.mkdir()
        (work / "keys").write_text("".join(f"{name} {value}\n" for name, value in self.zone.items()))
        (work / "opendkim.conf").write_text(
            f"Mode v\nSyslog no\nMinimumKeyBits 1024\nTestPublicKeys {work / 'keys'}\n"
            f"TemporaryDirectory {work}\n")
        (work / "good.eml").write_bytes(self.signed)
        (work / "bad.eml").write_bytes(self.signed.replace(b"Subject: Lunch", b"Subject: Dinner"))

        def run(name: str) -> str:
            out = subprocess.run([opendkim, "-x", str(work / "opendkim.conf"), "-vv", "-t", str(work / name)],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
            return out.stdout

        good = run("good.eml")
        self.assertIn("dkim=pass (2048-bit key) header.d=example.com", good)
        self.assertRegex(good, r"dkim=pass [^;]*header\.a=rsa-sha256 header\.s=rsa1")
        self.assertRegex(good, r"dkim=pass [^;]*header\.a=ed25519-sha256 header\.s=ed1")
        bad = run("bad.eml")
        self.assertNotIn("dkim=pass", bad)
        self.assertEqual(bad.count("dkim=fail"), 2, bad)


class KeysTests(SynchronousTestCase):
    """`keys`: files on disk, the DNS record, the store the server reads."""

    def setUp(self) -> None:
        self.data = Path(self.mktemp())
        self.data.mkdir()

    def test_generate_both_algorithms(self) -> None:
        paths = {alg: keys.generate(self.data, "Example.COM", f"{alg}1", alg) for alg in keys.ALGORITHMS}
        folder = self.data / "dkim" / "example.com"
        for alg, path in paths.items():
            self.assertEqual(path, folder / f"{alg}1.key")
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
            key = keys.load(path)
            self.assertEqual((key.selector, key.algorithm), (f"{alg}1", alg))
        self.assertTrue(paths["rsa"].read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----"))
        self.assertEqual(stat.S_IMODE(folder.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE((self.data / "dkim").stat().st_mode), 0o700)
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["ed255191.key", "rsa1.key"])  # no temporaries
        rsa_key = serialization.load_pem_private_key(paths["rsa"].read_bytes(), password=None)
        self.assertEqual(rsa_key.key_size, 2048)  # type: ignore[union-attr]

    def test_generate_never_overwrites(self) -> None:
        path = keys.generate(self.data, DOMAIN, "s1")
        before = path.read_bytes()
        self.assertRaises(FileExistsError, keys.generate, self.data, DOMAIN, "s1", "rsa")
        self.assertEqual(path.read_bytes(), before)

    def test_root_gives_keys_to_the_data_dir_owner(self) -> None:
        if os.geteuid() != 0:
            raise SkipTest("needs root (chown)")
        os.chown(self.data, 65534, 65534)
        path = keys.generate(self.data, DOMAIN, "s1")
        for p in (path, path.parent, path.parent.parent):
            self.assertEqual((p.stat().st_uid, p.stat().st_gid), (65534, 65534), p)

    def test_generate_refuses_bad_names_and_sizes(self) -> None:
        for selector in ("../x", "a/b", "", "-x", "x..y", "a b"):
            self.assertRaises(ValueError, keys.generate, self.data, DOMAIN, selector)
        for domain in ("../etc", "a/b", "", "."):
            self.assertRaises(ValueError, keys.generate, self.data, domain, "s1")
        self.assertRaises(ValueError, keys.generate, self.data, DOMAIN, "s1", "dsa")
        self.assertRaises(ValueError, keys.generate, self.data, DOMAIN, "s1", "rsa", 512)
        self.assertFalse((self.data / "dkim" / "etc").exists())

    def test_dns_record_rsa_split_into_strings(self) -> None:
        path = keys.generate(self.data, DOMAIN, "s2048", "rsa")
        line = keys.dns_record(path, "s2048", "Example.com")
        name, klass, rtype, rdata = line.split(" ", 3)
        self.assertEqual((name, klass, rtype), ("s2048._domainkey.example.com.", "IN", "TXT"))
        txt = dns.rdata.from_text("IN", "TXT", rdata)
        self.assertGreater(len(txt.strings), 1)
        self.assertTrue(all(len(s) <= 255 for s in txt.strings))
        value = b"".join(txt.strings).decode()
        self.assertEqual(value, keys.txt_value(path))
        self.assertTrue(value.startswith("v=DKIM1; k=rsa; p=MII"))
        # the published key is the key: a signature with the file verifies against the record
        signed = mdkim.sign(MESSAGE, DOMAIN, [keys.load(path)]) + MESSAGE
        results = mdkim.verify_all(signed, FakeLookup({key_name("s2048"): value}))
        self.assertEqual([r.result for r in results], ["pass"])

    def test_dns_record_ed25519_one_string(self) -> None:
        path = keys.generate(self.data, DOMAIN, "ed")
        line = keys.dns_record(keys.load(path), "ed", DOMAIN)
        self.assertRegex(line, r'^ed\._domainkey\.example\.com\. IN TXT "v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="$')
        raw = base64.b64decode(line.split("p=")[1].rstrip('"'))
        self.assertEqual(len(raw), 32)  # RFC 8463 §4.2: the bare public key, not SubjectPublicKeyInfo

    def test_keystore_reload_picks_up_new_keys(self) -> None:
        store = KeyStore(self.data)
        self.assertEqual(store.keys_for(DOMAIN), [])
        self.assertFalse(store.reload())  # nothing there, nothing changed
        keys.generate(self.data, DOMAIN, "ed1")
        self.assertEqual(store.keys_for(DOMAIN), [])  # not before a reload
        self.assertTrue(store.reload())
        self.assertEqual([(k.selector, k.algorithm) for k in store.keys_for("EXAMPLE.com.")], [("ed1", "ed25519")])
        self.assertFalse(store.reload())  # unchanged: nothing re-read
        keys.generate(self.data, DOMAIN, "rsa1", "rsa")
        self.assertTrue(store.reload())
        self.assertEqual(sorted(k.selector for k in store.keys_for(DOMAIN)), ["ed1", "rsa1"])
        os.unlink(self.data / "dkim" / DOMAIN / "ed1.key")
        self.assertTrue(store.reload())
        self.assertEqual([k.selector for k in store.keys_for(DOMAIN)], ["rsa1"])
        self.assertEqual(store.problems, [])

    def test_keystore_idn_domain(self) -> None:
        keys.generate(self.data, "bücher.example", "ed1")
        self.assertTrue((self.data / "dkim" / "xn--bcher-kva.example" / "ed1.key").exists())
        store = KeyStore(self.data)
        self.assertEqual(len(store.keys_for("Bücher.example")), 1)
        self.assertEqual(len(store.keys_for("xn--bcher-kva.example")), 1)

    def test_keystore_skips_bad_files_and_names_them(self) -> None:
        keys.generate(self.data, DOMAIN, "good")
        folder = self.data / "dkim" / DOMAIN
        (folder / "junk.key").write_bytes(b"not a key")
        weak = folder / "weak.key"
        weak.write_bytes(weak_rsa_pem())
        (folder / "notes.txt").write_text("ignored")
        loose = folder / "loose.key"
        loose.write_bytes(ed_pem())
        loose.chmod(0o644)
        store = KeyStore(self.data)
        self.assertEqual(sorted(k.selector for k in store.keys_for(DOMAIN)), ["good", "loose"])
        problems = "\n".join(store.problems)
        self.assertIn("junk.key", problems)
        self.assertIn("weak.key", problems)
        self.assertIn("loose.key: mode 0644", problems)
        self.assertNotIn("notes.txt", problems)

    def test_key_repr_hides_the_key(self) -> None:
        key = SigningKey("s", "ed25519", ed_pem())
        self.assertNotIn("PRIVATE", repr(key))
