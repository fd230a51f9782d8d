"""Tests of `mx.mailauth.results`: the Authentication-Results header we write, and removing
forged ones.

Each formatting case is compared byte for byte with its golden header (inline below), and
then read back by an independent parser, the `authres` library (RFC 8601), which must find
the same methods, results, reasons and properties.
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mx.mailauth.dmarc import DMARCResult, Policy, Result
from mx.mailauth.results import authentication_results, parse_authserv_id, strip_forged

try:
    import authres
except ImportError:  # the test extra is not installed
    authres = None

ID = "mx.example.org"
_QUOTED_PAIR = re.compile(r"\\(.)")


def unquote(value: str | None) -> str | None:
    """authres gives a quoted-string's content with its quoted-pairs as written: undo them."""
    return None if value is None else _QUOTED_PAIR.sub(r"\1", value)
LONG = "a-very-long-subdomain-name.marketing.example.com"


def sig(result: str, d: str, *, s: str = "sel", a: str = "rsa-sha256", i: str | None = None,
        b: str = "AbCdEfGhIjKlMnOp", reason: str = "") -> SimpleNamespace:
    return SimpleNamespace(result=result, domain=d, selector=s, algorithm=a,
                           identity=f"@{d}" if i is None else i, header_b=b, reason=reason)


def spf(result: str, reason: str = "") -> SimpleNamespace:
    return SimpleNamespace(result=result, domain="example.com", reason=reason)


def dmarc(result: Result, header_from: str = "example.com", policy: Policy = Policy.REJECT,
          disposition: Policy = Policy.NONE, reason: str = "", record_domain: str | None = "example.com",
          ) -> DMARCResult:
    return DMARCResult(result, header_from, policy, disposition, reason, record_domain)


# name -> (keyword arguments, golden header, what authres must read back:
#          [(method, result, reason, {ptype.property: value})])
CASES: dict[str, tuple[dict[str, Any], bytes, list[tuple[str, str, str | None, dict[str, str]]]]] = {
    "nothing checked": (
        {"smtp_mailfrom": "a@example.com", "helo": "mail.example.com"},
        b"Authentication-Results: mx.example.org; none\r\n",
        [],
    ),
    "all pass": (
        {"spf": spf("pass"), "helo_spf": spf("pass"), "dkim": [sig("pass", "example.com")],
         "dmarc": dmarc(Result.PASS, reason="aligned pass: DKIM d=example.com"), "arc": SimpleNamespace(result="none"),
         "smtp_mailfrom": "alice@example.com", "helo": "mail.example.com"},
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=pass smtp.mailfrom=alice@example.com;\r\n"
        b"\tspf=pass smtp.helo=mail.example.com;\r\n"
        b"\tdkim=pass header.d=example.com header.s=sel header.a=rsa-sha256\r\n"
        b"\t  header.b=AbCdEfGh;\r\n"
        b"\tdmarc=pass (p=reject dis=none) header.from=example.com;\r\n"
        b"\tarc=none\r\n",
        [("spf", "pass", None, {"smtp.mailfrom": "alice@example.com"}),
         ("spf", "pass", None, {"smtp.helo": "mail.example.com"}),
         ("dkim", "pass", None, {"header.d": "example.com", "header.s": "sel", "header.a": "rsa-sha256",
                                 "header.b": "AbCdEfGh"}),
         ("dmarc", "pass", None, {"header.from": "example.com"}),
         ("arc", "none", None, {})],
    ),
    "none results, unsigned, no DMARC record": (
        {"spf": spf("none", reason="no SPF record"), "dkim": [],
         "dmarc": dmarc(Result.NONE, policy=Policy.NONE, reason="no DMARC record", record_domain=None),
         "smtp_mailfrom": "bob@example.net", "helo": "client.example.net"},
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=none smtp.mailfrom=bob@example.net;\r\n"
        b"\tdkim=none;\r\n"
        b"\tdmarc=none header.from=example.com\r\n",
        [("spf", "none", None, {"smtp.mailfrom": "bob@example.net"}),
         ("dkim", "none", None, {}),
         ("dmarc", "none", None, {"header.from": "example.com"})],
    ),
    "forged: fails with reasons": (
        {"spf": spf("fail", reason="192.0.2.9 is not allowed by example.com"), "helo_spf": spf("none"),
         "dkim": [sig("fail", "example.com", reason="signature did not verify")],
         "dmarc": dmarc(Result.FAIL, policy=Policy.REJECT, disposition=Policy.REJECT,
                        reason="no aligned SPF or DKIM pass"),
         "arc": SimpleNamespace(result="fail", reason="i=1 seal does not verify"),
         "smtp_mailfrom": "ceo@example.com", "helo": "evil.example"},
        b"Authentication-Results: mx.example.org;\r\n"
        b'\tspf=fail reason="192.0.2.9 is not allowed by example.com"\r\n'
        b"\t  smtp.mailfrom=ceo@example.com;\r\n"
        b"\tspf=none smtp.helo=evil.example;\r\n"
        b'\tdkim=fail reason="signature did not verify" header.d=example.com header.s=sel\r\n'
        b"\t  header.a=rsa-sha256 header.b=AbCdEfGh;\r\n"
        b'\tdmarc=fail reason="no aligned SPF or DKIM pass" (p=reject dis=reject)\r\n'
        b"\t  header.from=example.com;\r\n"
        b'\tarc=fail reason="i=1 seal does not verify"\r\n',
        [("spf", "fail", "192.0.2.9 is not allowed by example.com", {"smtp.mailfrom": "ceo@example.com"}),
         ("spf", "none", None, {"smtp.helo": "evil.example"}),
         ("dkim", "fail", "signature did not verify", {"header.d": "example.com", "header.s": "sel",
                                                       "header.a": "rsa-sha256", "header.b": "AbCdEfGh"}),
         ("dmarc", "fail", "no aligned SPF or DKIM pass", {"header.from": "example.com"}),
         ("arc", "fail", "i=1 seal does not verify", {})],
    ),
    "long values fold where they can": (
        {"spf": spf("softfail", reason="192.0.2.1 is not one of example.com's designated mail servers (~all)"),
         "helo_spf": spf("temperror", reason="DNS timeout"),
         "dkim": [sig("fail", LONG, s="selector-2024-rotating-key", reason="body hash did not verify")],
         "dmarc": DMARCResult(Result.FAIL, LONG, Policy.QUARANTINE, Policy.QUARANTINE,
                              "no aligned SPF or DKIM pass; not sampled (pct=50)", "example.com"),
         "smtp_mailfrom": f"bounces+12345-abcdef=user@{LONG}", "helo": "mail.example.com"},
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=softfail\r\n"
        b"\t  reason=\"192.0.2.1 is not one of example.com's designated mail servers (~all)\"\r\n"
        b"\t  smtp.mailfrom=bounces+12345-abcdef=user@a-very-long-subdomain-name.marketing.example.com;\r\n"
        b'\tspf=temperror reason="DNS timeout" smtp.helo=mail.example.com;\r\n'
        b'\tdkim=fail reason="body hash did not verify"\r\n'
        b"\t  header.d=a-very-long-subdomain-name.marketing.example.com\r\n"
        b"\t  header.s=selector-2024-rotating-key header.a=rsa-sha256 header.b=AbCdEfGh;\r\n"
        b'\tdmarc=fail reason="no aligned SPF or DKIM pass; not sampled (pct=50)"\r\n'
        b"\t  (p=quarantine dis=quarantine)\r\n"
        b"\t  header.from=a-very-long-subdomain-name.marketing.example.com\r\n",
        [("spf", "softfail", "192.0.2.1 is not one of example.com's designated mail servers (~all)",
          {"smtp.mailfrom": f"bounces+12345-abcdef=user@{LONG}"}),
         ("spf", "temperror", "DNS timeout", {"smtp.helo": "mail.example.com"}),
         ("dkim", "fail", "body hash did not verify", {"header.d": LONG, "header.s": "selector-2024-rotating-key",
                                                       "header.a": "rsa-sha256", "header.b": "AbCdEfGh"}),
         ("dmarc", "fail", "no aligned SPF or DKIM pass; not sampled (pct=50)", {"header.from": LONG})],
    ),
    "two signatures, header.b prefixes told apart, header.i when it says more": (
        {"dkim": [sig("pass", "example.com", s="ed", a="ed25519-sha256", b="AAAAAAAAxyz1+/=="),
                  sig("pass", "example.com", s="rsa", b="AAAAAAAAxyz2abc", i="news@example.com"),
                  sig("neutral", "example.net", s="x", b="", i="")]},
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tdkim=pass header.d=example.com header.s=ed header.a=ed25519-sha256\r\n"
        b"\t  header.b=AAAAAAAAxyz1;\r\n"
        b"\tdkim=pass header.d=example.com header.i=news@example.com header.s=rsa\r\n"
        b"\t  header.a=rsa-sha256 header.b=AAAAAAAAxyz2;\r\n"
        b"\tdkim=neutral header.d=example.net header.s=x header.a=rsa-sha256\r\n",
        [("dkim", "pass", None, {"header.d": "example.com", "header.s": "ed", "header.a": "ed25519-sha256",
                                 "header.b": "AAAAAAAAxyz1"}),
         ("dkim", "pass", None, {"header.d": "example.com", "header.i": "news@example.com", "header.s": "rsa",
                                 "header.a": "rsa-sha256", "header.b": "AAAAAAAAxyz2"}),
         ("dkim", "neutral", None, {"header.d": "example.net", "header.s": "x", "header.a": "rsa-sha256"})],
    ),
    "quoting": (
        {"spf": spf("permerror", reason='bad "mechanism"\\ foo\r\n bar ü'),
         "dkim": [sig("pass", "example.com", b="ab/cd+ef=gh", i="@mail.example.com")],
         "smtp_mailfrom": '"john doe"@example.com', "helo": "[192.0.2.1]"},
        b"Authentication-Results: mx.example.org;\r\n"
        b'\tspf=permerror reason="bad \\"mechanism\\"\\\\ foo bar \\\\xfc"\r\n'
        b'\t  smtp.mailfrom="\\"john doe\\"@example.com";\r\n'
        b"\tdkim=pass header.d=example.com header.i=@mail.example.com header.s=sel\r\n"
        b'\t  header.a=rsa-sha256 header.b="ab/cd+ef"\r\n',
        [("spf", "permerror", 'bad "mechanism"\\ foo bar \\xfc', {"smtp.mailfrom": '"john doe"@example.com'}),
         ("dkim", "pass", None, {"header.d": "example.com", "header.i": "@mail.example.com", "header.s": "sel",
                                 "header.a": "rsa-sha256", "header.b": "ab/cd+ef"})],
    ),
    "null sender, plain strings and enums as results, zero From": (
        {"spf": "Pass", "helo_spf": Result.PASS, "dkim": [SimpleNamespace(result="temperror", domain="example.com",
                                                                          reason="key lookup timed out")],
         "dmarc": DMARCResult(Result.PERMERROR, "", Policy.NONE, Policy.NONE, "no RFC5322.From domain"),
         "smtp_mailfrom": "", "helo": "mail.example.com"},
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=pass smtp.mailfrom=postmaster@mail.example.com;\r\n"
        b"\tspf=pass smtp.helo=mail.example.com;\r\n"
        b'\tdkim=temperror reason="key lookup timed out" header.d=example.com;\r\n'
        b'\tdmarc=permerror reason="no RFC5322.From domain"\r\n',
        [("spf", "pass", None, {"smtp.mailfrom": "postmaster@mail.example.com"}),
         ("spf", "pass", None, {"smtp.helo": "mail.example.com"}),
         ("dkim", "temperror", "key lookup timed out", {"header.d": "example.com"}),
         ("dmarc", "permerror", "no RFC5322.From domain", {})],
    ),
}


class FormatTests(SynchronousTestCase):
    def test_golden(self) -> None:
        for name, (kwargs, golden, _) in CASES.items():
            self.assertEqual(authentication_results(ID, **kwargs), golden, name)

    def test_lines_short_where_possible(self) -> None:
        for name, (kwargs, _, _) in CASES.items():
            if name.startswith("long"):
                continue
            header = authentication_results(ID, **kwargs)
            self.assertTrue(header.endswith(b"\r\n"), name)
            for line in header[:-2].split(b"\r\n"):
                self.assertLessEqual(len(line), 78, (name, line))
                self.assertNotIn(b"\n", line)
                self.assertNotIn(b"\r", line)

    def test_one_field(self) -> None:
        # Every line after the first is a continuation (starts with white space).
        for name, (kwargs, _, _) in CASES.items():
            lines = authentication_results(ID, **kwargs)[:-2].split(b"\r\n")
            self.assertTrue(lines[0].startswith(b"Authentication-Results: mx.example.org;"), name)
            self.assertTrue(all(line[:1] in (b" ", b"\t") for line in lines[1:]), name)

    def test_authserv_id_quoted_when_not_a_token(self) -> None:
        self.assertEqual(authentication_results("mx example"), b'Authentication-Results: "mx example"; none\r\n')

    def test_parsed_back_by_authres(self) -> None:
        if authres is None:
            raise SkipTest("authres (the test extra) is not installed")
        for name, (kwargs, _, expected) in CASES.items():
            text = authentication_results(ID, **kwargs).decode("utf-8")
            parsed = authres.AuthenticationResultsHeader.parse(text.rstrip("\r\n"))
            self.assertEqual(parsed.authserv_id, ID, name)
            got = [(r.method, r.result, unquote(r.reason),
                    {f"{p.type}.{p.name}": unquote(p.value) for p in r.properties}) for r in parsed.results]
            self.assertEqual(got, expected, name)


MESSAGE = (
    b"Return-Path: <a@example.com>\r\n"
    b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=a@example.com;\r\n"
    b"\tdkim=pass header.d=example.com\r\n"
    b"Received: from x by mx.example.org\r\n"
    b"Authentication-Results: other.example; spf=fail\r\n"
    b"aUtHeNtIcAtIoN-rEsUlTs : (forged) MX.Example.ORG. 1; dmarc=pass\r\n"
    b"From: a@example.com\r\n"
    b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass\r\n"
    b"Authentication-Results-Extra: mx.example.org; x=y\r\n"
    b"Authentication-Results: mx.example.org.evil; dkim=pass\r\n"
    b'Authentication-Results: "mx.example.org"; none\r\n'
    b"Subject: hi\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.org; spf=pass\r\n"
    b"body\r\n"
)
STRIPPED = (
    b"Return-Path: <a@example.com>\r\n"
    b"Received: from x by mx.example.org\r\n"
    b"Authentication-Results: other.example; spf=fail\r\n"
    b"From: a@example.com\r\n"
    b"ARC-Authentication-Results: i=1; mx.example.org; spf=pass\r\n"
    b"Authentication-Results-Extra: mx.example.org; x=y\r\n"
    b"Authentication-Results: mx.example.org.evil; dkim=pass\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"Authentication-Results: mx.example.org; spf=pass\r\n"
    b"body\r\n"
)


class StripTests(SynchronousTestCase):
    def test_ours_removed_others_kept(self) -> None:
        self.assertEqual(strip_forged(MESSAGE, ID), STRIPPED)
        self.assertEqual(strip_forged(MESSAGE, "MX.EXAMPLE.ORG."), STRIPPED)

    def test_none_when_nothing_to_remove(self) -> None:
        self.assertIsNone(strip_forged(STRIPPED, ID))
        self.assertIsNone(strip_forged(b"", ID))
        self.assertIsNone(strip_forged(b"Subject: x\r\n\r\nAuthentication-Results: mx.example.org; none\r\n", ID))

    def test_bare_lf_and_edges(self) -> None:
        cases = [
            (b"Authentication-Results: mx.example.org; none\nSubject: x\n\nbody\n", b"Subject: x\n\nbody\n"),
            (b"Subject: x\nAuthentication-Results: mx.example.org;\n spf=pass\n", b"Subject: x\n"),
            (b"Authentication-Results: mx.example.org; none", b""),
            (b"Authentication-Results:mx.example.org;none\r\n\r\n", b"\r\n"),
            (b"X: 1\r\nAuthentication-Results:\r\n mx.example.org;\r\n\tnone\r\nY: 2\r\n\r\nb", b"X: 1\r\nY: 2\r\n\r\nb"),
        ]
        for message, expected in cases:
            self.assertEqual(strip_forged(message, ID), expected, message)

    def test_our_header_round_trip(self) -> None:
        # What we write is what we remove: a message relayed back to us loses our old header.
        for kwargs, _, _ in CASES.values():
            header = authentication_results(ID, **kwargs)
            self.assertEqual(strip_forged(header + b"Subject: x\r\n\r\nbody", ID), b"Subject: x\r\n\r\nbody")

    def test_parse_authserv_id(self) -> None:
        cases = [
            (b" mx.example.org; spf=pass", "mx.example.org"),
            (b"MX.Example.Org 1; none", "mx.example.org"),
            (b" (a (nested) comment) \r\n\tmx.example.org.;none", "mx.example.org"),
            (b' "mx.example.org"; none', "mx.example.org"),
            (b' "mx\\.example.org" ; none', "mx.example.org"),
            (b"mx.example.org(comment); none", "mx.example.org"),
            (b"; spf=pass", ""),
            (b"", ""),
            (b"(unterminated", ""),
        ]
        for value, expected in cases:
            self.assertEqual(parse_authserv_id(value), expected, value)
