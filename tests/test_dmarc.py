"""Tests of `mx.mailauth.dmarc`: From domains, organisational domains, records, evaluation.

DNS is a fake `Lookup` (a table of TXT answers, `TempError`s and NXDOMAINs that records the
names asked), answering with the real `Answer` type; SPF and DKIM results are plain objects.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from mx.mailauth import dmarc
from mx.mailauth.dmarc import (
    Alignment, DMARCPolicy, Policy, RecordError, Result, evaluate, from_domains, organizational_domain,
    parse_record,
)
from mx.mailauth.lookup import Answer, BadName, Deadline, TempError

NX = object()  # the name does not exist


class FakeLookup:
    """TXT answers from a table: name -> list of texts, `NX`, or an exception to raise."""

    def __init__(self, table: dict[str, object] | None = None) -> None:
        self.table = {k.lower(): v for k, v in (table or {}).items()}
        self.asked: list[str] = []
        self.deadlines: list[object] = []

    def txt(self, name: str, deadline: Deadline | None = None) -> Answer:
        self.asked.append(name)
        self.deadlines.append(deadline)
        if len(name) > 253:
            raise BadName(name)
        entry = self.table.get(name.lower(), NX)
        if isinstance(entry, BaseException):
            raise entry
        if entry is NX:
            return Answer(name, "TXT", (), (), nxdomain=True)
        assert isinstance(entry, list)
        return Answer(name, "TXT", tuple(entry), tuple(t.encode("latin-1") for t in entry))


def sig(result: str, domain: str) -> SimpleNamespace:
    return SimpleNamespace(result=result, domain=domain, selector="s", algorithm="rsa-sha256",
                           identity=f"@{domain}", header_b="AbCdEfGh", reason="")


def no_rand() -> float:
    raise AssertionError("rand() must not be drawn here")


def run(record: str | None, from_domain: str = "example.com", *, spf: object = "none", spf_domain: str = "",
        dkim: list | None = None, rand: Callable[[], float] = no_rand, at: str | None = None,
        ) -> tuple[dmarc.DMARCResult, FakeLookup]:
    table: dict[str, object] = {}
    if record is not None:
        table[f"_dmarc.{at or from_domain}"] = [record]
    lookup = FakeLookup(table)
    return evaluate([from_domain], spf, spf_domain, dkim or [], lookup, rand=rand), lookup


class FromDomainTests(SynchronousTestCase):
    def test_cases(self) -> None:
        cases = [
            (b"From: Alice <alice@Example.COM>\r\n\r\nbody", ["example.com"]),
            (b"From: alice@example.com.\r\n", ["example.com"]),
            (b"From: a@one.example, b@two.example\r\n", ["one.example", "two.example"]),
            (b"From: a@one.example\r\nTo: x@y.example\r\nFrom: b@two.example\r\n", ["one.example", "two.example"]),
            (b"From: a@example.com, B@EXAMPLE.com\r\nFrom: c@example.com\r\n", ["example.com"]),
            ("From: Jörg <jörg@bücher.example>\r\n".encode(), ["xn--bcher-kva.example"]),
            (b"From: a@xn--bcher-kva.example\n\n", ["xn--bcher-kva.example"]),
            (b'From: "ceo@bank.example" <mallory@evil.example>\r\n', ["evil.example"]),
            (b"From: (bank.example) mallory@evil.example (Bank)\r\n", ["evil.example"]),
            (b"From: authors: a@one.example, b@two.example;\r\n", ["one.example", "two.example"]),
            (b"From: =?utf-8?q?Bank?= <a@one.example>\r\n", ["one.example"]),
            (b"From: a@one.example,\r\n\tb@two.example\r\n", ["one.example", "two.example"]),
            (b"from: a@one.example\r\n", ["one.example"]),
            (b"From: nobody\r\n", []),
            (b"From: a@[192.0.2.1]\r\n", []),
            (b"From: a@bad..example\r\n", []),
            (b"From: \r\n", []),
            (b"To: a@one.example\r\n\r\nFrom: b@two.example\r\n", []),
            (b"", []),
        ]
        for raw, expected in cases:
            self.assertEqual(from_domains(raw), expected, raw)


class OrganizationalDomainTests(SynchronousTestCase):
    def test_cases(self) -> None:
        cases = [
            ("example.com", "example.com"),
            ("mail.example.com", "example.com"),
            ("a.b.c.example.com", "example.com"),
            ("a.b.example.co.uk", "example.co.uk"),
            ("MAIL.Example.COM.", "example.com"),
            ("co.uk", "co.uk"),  # a public suffix is its own
            ("com", "com"),
            ("alice.github.io", "alice.github.io"),  # the list's private section counts
            ("www.alice.github.io", "alice.github.io"),
            ("mx.example.unknowntld", "example.unknowntld"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ]
        for domain, org in cases:
            self.assertEqual(organizational_domain(domain), org, domain)


class RecordTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(parse_record("v=DMARC1; p=reject"), DMARCPolicy(p=Policy.REJECT, sp=Policy.REJECT))

    def test_every_tag(self) -> None:
        rec = parse_record(
            "v=DMARC1; p=quarantine; sp=none; pct=25; adkim=s; aspf=s; "
            "rua=mailto:agg@example.com!10m, mailto:b@example.net; ruf=mailto:f@example.com; "
            "fo=1:d; rf=afrf; ri=3600"
        )
        self.assertEqual(rec, DMARCPolicy(
            p=Policy.QUARANTINE, sp=Policy.NONE, pct=25, adkim=Alignment.STRICT, aspf=Alignment.STRICT,
            rua=("mailto:agg@example.com!10m", "mailto:b@example.net"), ruf=("mailto:f@example.com",),
            fo="1:d", rf="afrf", ri=3600,
        ))

    def test_lenient_syntax(self) -> None:
        cases = [
            ("v=DMARC1;p=reject;", DMARCPolicy(p=Policy.REJECT, sp=Policy.REJECT)),
            ("  v = DMARC1 ;  P = Reject ; SP=QUARANTINE ", DMARCPolicy(p=Policy.REJECT, sp=Policy.QUARANTINE)),
            ("v=DMARC1; p=none; future=yes; x", DMARCPolicy(p=Policy.NONE, sp=Policy.NONE)),  # unknown tags
            ("v=DMARC1; p=reject; pct=101", DMARCPolicy(p=Policy.REJECT, sp=Policy.REJECT)),
            ("v=DMARC1; p=reject; pct=-5; adkim=x; aspf=; ri=soon",
             DMARCPolicy(p=Policy.REJECT, sp=Policy.REJECT)),
            ("v=DMARC1; p=reject; p=none", DMARCPolicy(p=Policy.REJECT, sp=Policy.REJECT)),  # first wins
            ("v=DMARC1; p=reject; rua=not a uri", DMARCPolicy(p=Policy.REJECT, sp=Policy.REJECT)),
        ]
        for text, expected in cases:
            self.assertEqual(parse_record(text), expected, text)

    def test_invalid_policy_with_rua_acts_as_none(self) -> None:
        # RFC 7489 §6.6.3: no valid p= (or an invalid sp=) but a valid rua= -> as if p=none.
        for text in ("v=DMARC1; rua=mailto:r@example.com",
                     "v=DMARC1; p=bogus; rua=mailto:r@example.com",
                     "v=DMARC1; p=reject; sp=bogus; rua=junk, mailto:r@example.com"):
            rec = parse_record(text)
            self.assertEqual((rec.p, rec.sp), (Policy.NONE, Policy.NONE), text)
            self.assertEqual(rec.rua, ("mailto:r@example.com",))

    def test_unusable(self) -> None:
        for text in ("v=DMARC1", "v=DMARC1; p=bogus", "v=DMARC1; sp=reject", "v=DMARC1; p=reject; sp=all",
                     "v=DMARC1; p=bogus; rua=nonsense", "p=reject; v=DMARC1", "v=dmarc1; p=reject",
                     "v=DMARC2; p=reject", "v=DMARC1 p=reject", "v=spf1 -all", ""):
            self.assertRaises(RecordError, parse_record, text)


class AlignmentTests(SynchronousTestCase):
    def test_dkim_relaxed(self) -> None:
        r, _ = run("v=DMARC1; p=reject", dkim=[sig("pass", "mail.example.com")])
        self.assertEqual((r.result, r.disposition, r.policy), ("pass", "none", "reject"))
        self.assertTrue(r.dkim_aligned)
        self.assertFalse(r.spf_aligned)
        self.assertEqual(r.record_domain, "example.com")

    def test_dkim_strict(self) -> None:
        r, _ = run("v=DMARC1; p=reject; adkim=s", dkim=[sig("pass", "mail.example.com")])
        self.assertEqual((r.result, r.disposition), ("fail", "reject"))
        r, _ = run("v=DMARC1; p=reject; adkim=s", dkim=[sig("pass", "EXAMPLE.com.")])
        self.assertEqual(r.result, "pass")

    def test_spf_relaxed_and_strict(self) -> None:
        r, _ = run("v=DMARC1; p=reject", spf="pass", spf_domain="bounces.example.com")
        self.assertEqual((r.result, r.spf_aligned, r.dkim_aligned), ("pass", True, False))
        r, _ = run("v=DMARC1; p=reject; aspf=s", spf="pass", spf_domain="bounces.example.com")
        self.assertEqual((r.result, r.disposition), ("fail", "reject"))
        r, _ = run("v=DMARC1; p=reject; aspf=s", spf="pass", spf_domain="example.com")
        self.assertEqual(r.result, "pass")

    def test_spf_only(self) -> None:
        r, _ = run("v=DMARC1; p=reject", spf="pass", spf_domain="example.com",
                   dkim=[sig("fail", "example.com"), sig("pass", "other.example")])
        self.assertEqual((r.result, r.spf_aligned, r.dkim_aligned), ("pass", True, False))

    def test_dkim_only(self) -> None:
        r, _ = run("v=DMARC1; p=reject", spf="fail", spf_domain="example.com",
                   dkim=[sig("pass", "other.example"), sig("pass", "example.com")])
        self.assertEqual((r.result, r.spf_aligned, r.dkim_aligned), ("pass", False, True))

    def test_result_kinds_accepted(self) -> None:
        # SPF as an object with .result, as an Enum, or a string; any case.
        for spf in (SimpleNamespace(result="pass", domain="example.com"), Result.PASS, "PASS"):
            r, _ = run("v=DMARC1; p=reject", spf=spf, spf_domain="example.com")
            self.assertEqual(r.result, "pass", spf)

    def test_unaligned(self) -> None:
        r, _ = run("v=DMARC1; p=reject", spf="pass", spf_domain="mailer.example.net",
                   dkim=[sig("pass", "mailer.example.net"), sig("pass", "com")])
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "reject", "reject"))
        self.assertEqual(r.reason, "no aligned SPF or DKIM pass")
        self.assertEqual(r.header_from, "example.com")

    def test_aligned_but_not_passing(self) -> None:
        for spf, dkim in (("fail", []), ("softfail", []), ("neutral", [sig("fail", "example.com")]),
                          ("none", [sig("permerror", "example.com"), sig("neutral", "example.com")])):
            r, _ = run("v=DMARC1; p=quarantine", spf=spf, spf_domain="example.com", dkim=dkim)
            self.assertEqual((r.result, r.disposition), ("fail", "quarantine"), (spf, dkim))

    def test_public_suffix_does_not_align(self) -> None:
        # Two customers of one public suffix (private section) are different organisations.
        r, _ = run("v=DMARC1; p=reject", "alice.github.io", dkim=[sig("pass", "mallory.github.io")])
        self.assertEqual(r.result, "fail")

    def test_p_none_fail(self) -> None:
        r, _ = run("v=DMARC1; p=none")
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "none", "none"))

    def test_u_label_from_domain(self) -> None:
        lookup = FakeLookup({"_dmarc.xn--bcher-kva.example": ["v=DMARC1; p=reject"]})
        r = evaluate(["Bücher.example"], "none", "", [sig("pass", "xn--bcher-kva.example")], lookup)
        self.assertEqual((r.result, r.header_from), ("pass", "xn--bcher-kva.example"))


class DiscoveryTests(SynchronousTestCase):
    def test_no_record(self) -> None:
        r, lookup = run(None, "mail.example.com", dkim=[sig("fail", "example.com")])
        self.assertEqual((r.result, r.policy, r.disposition, r.record_domain), ("none", "none", "none", None))
        self.assertEqual(lookup.asked, ["_dmarc.mail.example.com", "_dmarc.example.com"])

    def test_org_domain_asked_once_when_from_is_org(self) -> None:
        _, lookup = run(None, "example.com")
        self.assertEqual(lookup.asked, ["_dmarc.example.com"])

    def test_org_domain_fallback(self) -> None:
        r, lookup = run("v=DMARC1; p=reject", "a.b.example.co.uk", at="example.co.uk")
        self.assertEqual(lookup.asked, ["_dmarc.a.b.example.co.uk", "_dmarc.example.co.uk"])
        self.assertEqual((r.result, r.disposition, r.record_domain), ("fail", "reject", "example.co.uk"))

    def test_non_dmarc_txt_is_no_record(self) -> None:
        lookup = FakeLookup({"_dmarc.mail.example.com": ["v=spf1 -all", "hello"],
                             "_dmarc.example.com": ["v=DMARC1; p=quarantine"]})
        r = evaluate(["mail.example.com"], "none", "", [], lookup)
        self.assertEqual((r.result, r.disposition, r.record_domain), ("fail", "quarantine", "example.com"))

    def test_empty_answer_is_no_record(self) -> None:
        lookup = FakeLookup({"_dmarc.mail.example.com": [], "_dmarc.example.com": ["v=DMARC1; p=reject"]})
        r = evaluate(["mail.example.com"], "none", "", [], lookup)
        self.assertEqual(r.record_domain, "example.com")

    def test_several_records(self) -> None:
        lookup = FakeLookup({"_dmarc.mail.example.com": ["v=DMARC1; p=none", "v=DMARC1; p=reject"],
                             "_dmarc.example.com": ["v=DMARC1; p=reject"]})
        r = evaluate(["mail.example.com"], "none", "", [], lookup)
        self.assertEqual((r.result, r.disposition), ("none", "none"))
        self.assertIn("several DMARC records", r.reason)
        self.assertEqual(lookup.asked, ["_dmarc.mail.example.com"])  # no fallback (§6.6.3)

    def test_subdomain_policy(self) -> None:
        r, _ = run("v=DMARC1; p=reject; sp=quarantine", "mail.example.com", at="example.com")
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "quarantine", "quarantine"))
        r, _ = run("v=DMARC1; p=none; sp=reject", "example.com")  # the org domain itself: p
        self.assertEqual(r.disposition, "none")
        r, _ = run("v=DMARC1; p=quarantine", "mail.example.com", at="example.com")  # no sp=: p
        self.assertEqual(r.disposition, "quarantine")

    def test_subdomain_with_its_own_record(self) -> None:
        lookup = FakeLookup({"_dmarc.mail.example.com": ["v=DMARC1; p=quarantine; sp=none"],
                             "_dmarc.example.com": ["v=DMARC1; p=reject; sp=reject"]})
        r = evaluate(["mail.example.com"], "none", "", [], lookup)
        self.assertEqual((r.disposition, r.record_domain), ("quarantine", "mail.example.com"))
        self.assertEqual(lookup.asked, ["_dmarc.mail.example.com"])

    def test_invalid_record(self) -> None:
        r, _ = run("v=DMARC1; p=bogus", dkim=[sig("pass", "example.com")])
        self.assertEqual((r.result, r.policy, r.disposition, r.record_domain),
                         ("permerror", "none", "none", "example.com"))
        self.assertIn("invalid p= tag", r.reason)
        r, _ = run("v=DMARC1; adkim=s")
        self.assertEqual(r.result, "permerror")

    def test_invalid_policy_with_rua(self) -> None:
        r, _ = run("v=DMARC1; p=bogus; rua=mailto:d@example.com")
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "none", "none"))

    def test_name_too_long_for_dns(self) -> None:
        domain = ".".join(["a" * 60] * 4)[:245].rstrip(".") + ".com"
        r, lookup = run(None, domain)  # _dmarc.<domain> is over 253 octets: BadName, no record
        self.assertEqual(r.result, "none")
        self.assertEqual(len(lookup.asked), 2)
        self.assertGreater(len(lookup.asked[0]), 253)

    def test_deadline_passed_to_every_lookup(self) -> None:
        deadline = Deadline(10)
        lookup = FakeLookup()
        evaluate(["mail.example.com"], "none", "", [], lookup, deadline)
        self.assertEqual(lookup.deadlines, [deadline, deadline])


class TempErrorTests(SynchronousTestCase):
    def test_lookup_temperror(self) -> None:
        lookup = FakeLookup({"_dmarc.example.com": TempError("SERVFAIL")})
        r = evaluate(["example.com"], "fail", "example.com", [], lookup)
        self.assertEqual((r.result, r.policy, r.disposition), ("temperror", "none", "none"))
        self.assertEqual(r.reason, "DNS lookup of _dmarc.example.com failed: SERVFAIL")

    def test_org_lookup_temperror(self) -> None:
        lookup = FakeLookup({"_dmarc.example.com": TempError()})
        r = evaluate(["mail.example.com"], "none", "", [], lookup)
        self.assertEqual((r.result, r.disposition), ("temperror", "none"))
        self.assertEqual(r.reason, "DNS lookup of _dmarc.example.com failed")

    def test_no_fallback_after_temperror(self) -> None:
        lookup = FakeLookup({"_dmarc.mail.example.com": TempError("timeout"),
                             "_dmarc.example.com": ["v=DMARC1; p=reject"]})
        r = evaluate(["mail.example.com"], "none", "", [], lookup)
        self.assertEqual(r.result, "temperror")
        self.assertEqual(lookup.asked, ["_dmarc.mail.example.com"])

    def test_aligned_check_temperror_never_rejects(self) -> None:
        r, _ = run("v=DMARC1; p=reject", dkim=[sig("temperror", "example.com")])
        self.assertEqual((r.result, r.policy, r.disposition), ("temperror", "reject", "none"))
        r, _ = run("v=DMARC1; p=reject", spf="temperror", spf_domain="bounce.example.com")
        self.assertEqual((r.result, r.disposition), ("temperror", "none"))

    def test_unaligned_check_temperror_still_fails(self) -> None:
        r, _ = run("v=DMARC1; p=reject", spf="temperror", spf_domain="other.example",
                   dkim=[sig("temperror", "other.example")])
        self.assertEqual((r.result, r.disposition), ("fail", "reject"))

    def test_aligned_pass_beats_temperror(self) -> None:
        r, _ = run("v=DMARC1; p=reject", spf="temperror", spf_domain="example.com", dkim=[sig("pass", "example.com")])
        self.assertEqual(r.result, "pass")


class SamplingTests(SynchronousTestCase):
    def test_sampled_gets_policy(self) -> None:
        r, _ = run("v=DMARC1; p=reject; pct=50", rand=lambda: 0.49)
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "reject", "reject"))

    def test_not_sampled_gets_next_lower(self) -> None:
        r, _ = run("v=DMARC1; p=reject; pct=50", rand=lambda: 0.5)
        self.assertEqual((r.result, r.policy, r.disposition), ("fail", "quarantine", "quarantine"))
        self.assertIn("not sampled (pct=50)", r.reason)
        r, _ = run("v=DMARC1; p=quarantine; pct=50", rand=lambda: 0.99)
        self.assertEqual((r.policy, r.disposition), ("none", "none"))

    def test_sp_sampled(self) -> None:
        r, _ = run("v=DMARC1; p=none; sp=reject; pct=10", "a.example.com", at="example.com", rand=lambda: 0.5)
        self.assertEqual(r.disposition, "quarantine")

    def test_pct_zero_never_samples(self) -> None:
        r, _ = run("v=DMARC1; p=reject; pct=0", rand=lambda: 0.0)
        self.assertEqual(r.disposition, "quarantine")

    def test_rand_not_drawn(self) -> None:
        # pct=100, p=none, and passing mail never draw.
        for record, dkim in (("v=DMARC1; p=reject", []), ("v=DMARC1; p=reject; pct=100", []),
                             ("v=DMARC1; p=none; pct=10", []),
                             ("v=DMARC1; p=reject; pct=10", [sig("pass", "example.com")])):
            r, _ = run(record, dkim=dkim, rand=no_rand)
            self.assertIn(r.result, ("pass", "fail"))


class FromCountTests(SynchronousTestCase):
    def test_zero_from(self) -> None:
        lookup = FakeLookup()
        for domains in ([], ["", "not a domain"]):
            r = evaluate(domains, "pass", "example.com", [], lookup)
            self.assertEqual((r.result, r.header_from, r.policy, r.disposition, r.record_domain),
                             ("permerror", "", "none", "none", None))
        self.assertEqual(lookup.asked, [])

    def test_several_from_same_domain(self) -> None:
        lookup = FakeLookup({"_dmarc.example.com": ["v=DMARC1; p=reject"]})
        r = evaluate(["example.com", "EXAMPLE.com."], "pass", "example.com", [], lookup)
        self.assertEqual((r.result, r.header_from), ("pass", "example.com"))
        self.assertNotIn("multiple", r.reason)
        self.assertEqual(lookup.asked, ["_dmarc.example.com"])

    def test_several_from_strictest_wins(self) -> None:
        lookup = FakeLookup({"_dmarc.good.example": ["v=DMARC1; p=reject"],
                             "_dmarc.bank.example": ["v=DMARC1; p=reject"]})
        r = evaluate(["good.example", "bank.example"], "none", "", [sig("pass", "good.example")], lookup)
        self.assertEqual((r.result, r.header_from, r.disposition), ("fail", "bank.example", "reject"))
        self.assertTrue(r.reason.startswith("multiple From domains (good.example, bank.example); "), r.reason)

    def test_several_from_disposition_first(self) -> None:
        lookup = FakeLookup({"_dmarc.one.example": ["v=DMARC1; p=none"],
                             "_dmarc.two.example": ["v=DMARC1; p=quarantine"],
                             "_dmarc.three.example": TempError("timeout")})
        r = evaluate(["one.example", "two.example", "three.example"], "none", "", [], lookup)
        self.assertEqual((r.result, r.header_from, r.disposition), ("fail", "two.example", "quarantine"))

    def test_several_from_all_pass(self) -> None:
        lookup = FakeLookup({"_dmarc.one.example": ["v=DMARC1; p=reject"]})
        r = evaluate(["one.example", "two.example"], "none", "",
                     [sig("pass", "one.example"), sig("pass", "two.example")], lookup)
        # two.example has no record: none is stricter than pass.
        self.assertEqual((r.result, r.header_from), ("none", "two.example"))
        self.assertTrue(r.reason.startswith("multiple From domains"))

    def test_from_header_to_result(self) -> None:
        header = b"From: a@one.example\r\nFrom: b@mail.two.example\r\n\r\n"
        lookup = FakeLookup({"_dmarc.two.example": ["v=DMARC1; p=reject; sp=quarantine"]})
        r = evaluate(from_domains(header), "none", "", [sig("pass", "one.example")], lookup)
        self.assertEqual((r.result, r.header_from, r.disposition), ("fail", "mail.two.example", "quarantine"))
