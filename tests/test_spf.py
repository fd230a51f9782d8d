"""Tests for mx.mailauth.spf: RFC 7208 check_host() against a real twisted.names server.

One zone holds a record per case; `CASES` is the table (one generated test per row, named
after it): each result kind, each kind of syntax and limit error, temperror from a name that
never answers and from SERVFAIL, include and redirect chains, every mechanism with CIDR
lengths, macros (the RFC 7208 §7.4 examples, also end to end through exists:), exp= texts,
IPv6 and IPv4-mapped clients. check_host blocks, so it runs in a thread while the reactor
serves DNS. Separate tests cover a nameserver that never answers, the per-check deadline, and
the cache making a second check of a sender free.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.names import dns as tdns
from twisted.trial.unittest import TestCase

from mx.mailauth.lookup import Deadline, Lookup
from mx.mailauth.spf import Result, SPFResult, _Check, _PermError, check_host, parse_macro_string
from tests.test_mailauth_lookup import listen_silent, serve

IP4 = "192.0.2.10"
IP6 = "2001:db8::10"
MAPPED = "::ffff:192.0.2.10"
HELO = "helo.example.com"
LOOKUP_TIMEOUT = 0.5


def txt(name: str, *strings: str | bytes) -> tuple[str, Any]:
    return name, tdns.Record_TXT(*[s if isinstance(s, bytes) else s.encode() for s in strings], ttl=300)


def a(name: str, address: str) -> tuple[str, Any]:
    return name, tdns.Record_A(address, ttl=300)


def aaaa(name: str, address: str) -> tuple[str, Any]:
    return name, tdns.Record_AAAA(address, ttl=300)


def mx(name: str, preference: int, exchange: str) -> tuple[str, Any]:
    return name, tdns.Record_MX(preference, exchange.encode(), ttl=300)


def ptr(name: str, target: str) -> tuple[str, Any]:
    return name, tdns.Record_PTR(target.encode(), ttl=300)


def reverse4(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


EXAMPLE_COM = [
    # results
    txt("pass.example.com", "v=spf1 ip4:192.0.2.0/24 -all"),
    txt("fail.example.com", "v=spf1 ip4:198.51.100.0/24 -all"),
    txt("softfail.example.com", "v=spf1 ip4:198.51.100.0/24 ~all"),
    txt("neutral.example.com", "v=spf1 ?all"),
    txt("nomatch.example.com", "v=spf1 ip4:198.51.100.1"),
    a("norecord.example.com", IP4),
    txt("othertxt.example.com", "google-site-verification=abc"),
    txt("othertxt.example.com", "v=spf10 +all"),
    txt("casev.example.com", "V=SpF1 ~ALL"),
    txt("split.example.com", "v=spf1 ip4:192.0.2.0", "/24 -all"),
    txt("nospace.example.com", "v=spf1", "ip4:192.0.2.10"),
    txt("spaces.example.com", "v=spf1  ip4:192.0.2.10   -all "),
    txt("empty.example.com", "v=spf1"),
    # syntax errors
    txt("multi.example.com", "v=spf1 -all"),
    txt("multi.example.com", "v=spf1 +all"),
    txt("unknown.example.com", "v=spf1 ip4:192.0.2.10 foo:bar -all"),
    txt("badcidr4.example.com", "v=spf1 ip4:192.0.2.0/33 -all"),
    txt("badcidra.example.com", "v=spf1 a/33 -all"),
    txt("badcidr6.example.com", "v=spf1 ip6:2001:db8::/129 -all"),
    txt("badcidrdual.example.com", "v=spf1 mx/24//129 -all"),
    txt("zerocidr.example.com", "v=spf1 ip4:192.0.2.0/024 -all"),
    txt("badip4.example.com", "v=spf1 ip4:192.0.2 -all"),
    txt("badip6.example.com", "v=spf1 ip6:2001:db8::g -all"),
    txt("allarg.example.com", "v=spf1 -all:foo"),
    txt("badmacro.example.com", "v=spf1 exists:%{x}.example.com -all"),
    txt("zerodigit.example.com", "v=spf1 exists:%{d0}.example.com -all"),
    txt("expletter.example.com", "v=spf1 exists:%{c}.example.com -all"),
    txt("lonepercent.example.com", "v=spf1 a:foo%.example.com -all"),
    txt("notoplabel.example.com", "v=spf1 a:foo-bar -all"),
    txt("emptydomain.example.com", "v=spf1 a: -all"),
    txt("tworedirects.example.com", "v=spf1 redirect=pass.example.com redirect=fail.example.com"),
    txt("twoexps.example.com", "v=spf1 -all exp=explain.example.com exp=explain.example.com"),
    txt("tab.example.com", "v=spf1 ip4:192.0.2.10\t-all"),
    txt("nonascii.example.com", b"v=spf1 a:caf\xc3\xa9.example.com -all"),
    txt("qualifiedmod.example.com", "v=spf1 -redirect=pass.example.com"),
    txt("badmodifier.example.com", "v=spf1 ip4:192.0.2.10 foo=%{z} -all"),
    txt("goodmodifier.example.com", "v=spf1 moo.cow-far_out=man:dog/cat ip4:192.0.2.10 -all"),
    # processing limits
    a("ten.example.com", "192.0.2.99"),
    txt("ten.example.com", "v=spf1 a a a a a a a a a a ip4:192.0.2.10 -all"),
    a("eleven.example.com", "192.0.2.99"),
    txt("eleven.example.com", "v=spf1 a a a a a a a a a a a ip4:192.0.2.10 -all"),
    a("five.example.com", "192.0.2.99"),
    txt("five.example.com", "v=spf1 a a a a -all"),
    txt("nestedten.example.com", "v=spf1 include:five.example.com include:five.example.com ip4:192.0.2.10 -all"),
    txt("nestedeleven.example.com", "v=spf1 include:five.example.com include:five.example.com a ip4:192.0.2.10 -all"),
    txt("loop1.example.com", "v=spf1 include:loop2.example.com -all"),
    txt("loop2.example.com", "v=spf1 include:loop1.example.com -all"),
    txt("redirectloop.example.com", "v=spf1 redirect=redirectloop.example.com"),
    txt("void2.example.com", "v=spf1 a:nx1.example.com mx:nx2.example.com ip4:192.0.2.10 -all"),
    txt("void3.example.com", "v=spf1 a:nx1.example.com mx:nx2.example.com exists:nx3.example.com ip4:192.0.2.10 -all"),
    txt("voidnodata.example.com", "v=spf1 a:norecord.example.com//128 a:norecord.example.com "
        "a:pass.example.com ip6:2001:db8::/32 -all"),  # IPv6 client: three AAAA NODATA
    txt("mx10.example.com", "v=spf1 mx -all"),
    *[mx("mx10.example.com", i, f"m{i}.example.com") for i in range(9)],
    mx("mx10.example.com", 9, "host.example.net"),
    txt("mx11.example.com", "v=spf1 mx -all"),
    *[mx("mx11.example.com", i, f"m{i}.example.com") for i in range(10)],
    mx("mx11.example.com", 10, "host.example.net"),
    txt("includenone.example.com", "v=spf1 include:norecord.example.com -all"),
    txt("redirectnone.example.com", "v=spf1 redirect=norecord.example.com"),
    txt("includenx.example.com", "v=spf1 include:gone.example.com -all"),
    # temperror
    txt("includehang.example.com", "v=spf1 include:hang.example.com -all"),
    txt("aservfail.example.com", "v=spf1 a:servfail.example.com -all"),
    txt("mxservfail.example.com", "v=spf1 mx -all"),
    mx("mxservfail.example.com", 10, "servfail.example.com"),
    txt("existsservfail.example.com", "v=spf1 exists:servfail.example.com -all"),
    txt("redirecthang.example.com", "v=spf1 redirect=hang.example.com"),
    # mechanisms
    txt("amech.example.com", "v=spf1 a -all"),
    a("amech.example.com", IP4),
    txt("acidr.example.com", "v=spf1 a/24 -all"),
    a("acidr.example.com", "192.0.2.200"),
    txt("aother.example.com", "v=spf1 a:host.example.net -all"),
    txt("aothercidr.example.com", "v=spf1 a:wide.example.net/24 -all"),
    txt("mxmech.example.com", "v=spf1 mx -all"),
    mx("mxmech.example.com", 10, "host.example.net"),
    txt("mxcidr.example.com", "v=spf1 mx:mxmech.example.com/24 -all"),
    txt("mxnomatch.example.com", "v=spf1 mx:wide.example.net -all"),
    txt("nullmx.example.com", "v=spf1 mx ?all"),
    mx("nullmx.example.com", 0, ""),
    txt("ptr.example.com", "v=spf1 ptr -all"),
    txt("ptrother.example.com", "v=spf1 ptr:example.org -all"),
    a("host.ptr.example.com", IP4),
    aaaa("host.ptr.example.com", IP6),
    txt("exists.example.com", "v=spf1 exists:%{i}.bl.example.com -all"),
    a("192.0.2.10.bl.example.com", "127.0.0.2"),
    txt("ip6mech.example.com", "v=spf1 ip6:2001:db8::/32 -all"),
    txt("ip6host.example.com", "v=spf1 ip6:2001:db8::10 -all"),
    txt("aaaamech.example.com", "v=spf1 a//64 -all"),
    aaaa("aaaamech.example.com", "2001:db8::1"),
    txt("dualcidr.example.com", "v=spf1 a:dual.example.net/24//64 -all"),
    txt("mappedip6.example.com", "v=spf1 ip6:::ffff:192.0.2.0/120 ip6:::ffff:0:0/96 -all"),
    txt("exists6.example.com", "v=spf1 exists:%{ir}.%{v}.bl.example.com -all"),
    a("0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.bl.example.com", "127.0.0.2"),
    # include and redirect
    txt("incpass.example.com", "v=spf1 include:pass.example.com -all"),
    txt("incfail.example.com", "v=spf1 include:fail.example.com ~all"),
    txt("incneutral.example.com", "v=spf1 include:neutral.example.com -all"),
    txt("incchain.example.com", "v=spf1 include:incpass.example.com -all"),
    txt("incmacro.example.com", "v=spf1 include:pass.%{d2} -all"),
    txt("redir.example.com", "v=spf1 redirect=pass.example.com"),
    txt("redirchain.example.com", "v=spf1 ip4:198.51.100.1 redirect=redir.example.com"),
    txt("redirfail.example.com", "v=spf1 redirect=fail.example.com"),
    txt("redirfirst.example.com", "v=spf1 redirect=fail.example.com ip4:192.0.2.10"),
    txt("allbeforeredir.example.com", "v=spf1 ~all redirect=pass.example.com"),
    # macros (RFC 7208 §7.4) through DNS
    txt("email.example.com", "v=spf1 exists:%{lr-}.lp.%{ir}.%{v}._spf.%{d2} exists:%{ir}.%{v}._spf.%{d2} -all"),
    a("bad.strong.lp.3.2.0.192.in-addr._spf.example.com", "127.0.0.2"),
    a("1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com", "127.0.0.2"),
    txt("sendermacro.example.com", "v=spf1 exists:%{l1r+-}.%{o}.users.example.com -all"),
    a("bob.sendermacro.example.com.users.example.com", "127.0.0.2"),
    txt("helomacro.example.com", "v=spf1 a:%{h} -all"),
    a("sender-host.example.com", IP4),
    txt("longmacro.example.com", "v=spf1 a:%{l}.%{l}.%{l}.%{l}.%{l}.long.example.com -all"),
    # exp=
    txt("expfail.example.com", "v=spf1 -all exp=explain.example.com"),
    txt("explain.example.com", "%{i} is not one of %{d}'s designated mail servers."),
    txt("expsoft.example.com", "v=spf1 ~all exp=explain.example.com"),
    txt("expmissing.example.com", "v=spf1 -all exp=noexplain.example.com"),
    txt("exptwo.example.com", "v=spf1 -all exp=twoexplain.example.com"),
    txt("twoexplain.example.com", "one"),
    txt("twoexplain.example.com", "two"),
    txt("expbad.example.com", "v=spf1 -all exp=badexplain.example.com"),
    txt("badexplain.example.com", "bad %{x} macro"),
    txt("expmacros.example.com", "v=spf1 -all exp=macros.explain.example.com"),
    txt("macros.explain.example.com", "c=%{c} r=%{r} s=%{s} l=%{l} o=%{o} h=%{h} v=%{v} %%%_%- S=%{S} t=%{t}"),
    txt("expincluded.example.com", "v=spf1 include:incexp.example.com -all"),
    txt("incexp.example.com", "v=spf1 ip4:198.51.100.1 -all exp=explain.example.com"),
    txt("expredirect.example.com", "v=spf1 redirect=expfail.example.com exp=other.explain.example.com"),
    txt("expredirectnone.example.com", "v=spf1 redirect=fail.example.com exp=other.explain.example.com"),
    txt("other.explain.example.com", "not this one"),
    txt("expdomain.example.com", "v=spf1 -all exp=%{d2}.explain.example.com"),
    txt("example.com.explain.example.com", "see https://%{d}/why?s=%{S}"),
    txt("expp.example.com", "v=spf1 -all exp=p.explain.example.com"),
    txt("p.explain.example.com", "%{c} is %{p}"),
    txt("helo.example.com", "v=spf1 -all exp=s.explain.example.com"),
    txt("s.explain.example.com", "%{s} %{l} %{o}"),
    txt("xn--bcher-kva.example.com", "v=spf1 ip4:192.0.2.10 -all"),
    # ptr limit
    txt("ptrmany.example.com", "v=spf1 ptr -all"),
    *[a(f"n{i}.ptrmany.example.com", "192.0.2.99") for i in range(1, 11)],
    a("n11.ptrmany.example.com", "192.0.2.20"),
    a("n10.ptrten.example.com", "192.0.2.21"),
    txt("ptrten.example.com", "v=spf1 ptr -all"),
]
EXAMPLE_NET = [
    a("host.example.net", IP4),
    a("wide.example.net", "192.0.99.1"),
    a("dual.example.net", "192.0.2.1"),
    aaaa("dual.example.net", "2001:db8::1"),
]
ARPA = [
    ptr(reverse4(IP4), "host.ptr.example.com"),
    ptr(reverse4(IP4), "bogus.example.org"),
    ptr("0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa", "host.ptr.example.com"),
    *[ptr(reverse4("192.0.2.20"), f"n{i}.ptrmany.example.com") for i in range(1, 12)],
    *[ptr(reverse4("192.0.2.21"), f"n{i}.ptrten.example.com") for i in range(1, 11)],
]
HANG = ("hang.example.com",)
SERVFAIL = ("servfail.example.com",)

ANY = object()


@dataclass(frozen=True)
class Case:
    name: str
    domain: str
    expect: Result
    ip: str = IP4
    sender: str | None = None  # None: user@<domain>
    helo: str = HELO
    mechanism: object = ANY  # the deciding term, None for none
    explanation: object = None  # a string, a compiled pattern, or ANY
    reason: str = ""  # a substring of the reason

    def run(self, lookup: Lookup) -> SPFResult:
        sender = f"user@{self.domain}" if self.sender is None else self.sender
        return check_host(self.ip, self.domain, sender, helo=self.helo, lookup=lookup, receiver="mx.example.test")


P, F, S, N, NONE, PE, TE = (Result.PASS, Result.FAIL, Result.SOFTFAIL, Result.NEUTRAL, Result.NONE,
                            Result.PERMERROR, Result.TEMPERROR)
T = re.compile

CASES = [
    # --- one of each result -------------------------------------------------------------
    Case("pass", "pass.example.com", P, mechanism="ip4:192.0.2.0/24"),
    Case("fail", "fail.example.com", F, mechanism="-all"),
    Case("softfail", "softfail.example.com", S, mechanism="~all"),
    Case("neutral", "neutral.example.com", N, mechanism="?all"),
    Case("neutral_when_nothing_matches", "nomatch.example.com", N, mechanism=None, reason="no mechanism matched"),
    Case("neutral_for_an_empty_record", "empty.example.com", N),
    Case("none_without_txt", "norecord.example.com", NONE, mechanism=None),
    Case("none_for_nxdomain", "gone.example.com", NONE),
    Case("none_for_other_txt_and_spf10", "othertxt.example.com", NONE),
    Case("none_for_version_without_space", "nospace.example.com", NONE),
    Case("version_case_insensitive", "casev.example.com", S),
    Case("txt_strings_joined", "split.example.com", P),
    Case("several_spaces_between_terms", "spaces.example.com", P),
    Case("none_for_single_label_domain", "localhost", NONE),
    Case("none_for_address_literal_helo", "[192.0.2.10]", NONE, sender=""),
    Case("none_for_empty_label", "a..example.com", NONE),
    Case("none_for_long_label", "x" * 64 + ".example.com", NONE),
    Case("u_label_domain_as_a_label", "bücher.example.com", P),
    # --- permerror: syntax ------------------------------------------------------------------
    Case("two_records", "multi.example.com", PE, reason="2 SPF records"),
    Case("unknown_mechanism_even_after_a_match", "unknown.example.com", PE, mechanism="foo:bar"),
    Case("ip4_cidr_over_32", "badcidr4.example.com", PE, mechanism="ip4:192.0.2.0/33"),
    Case("a_cidr_over_32", "badcidra.example.com", PE, mechanism="a/33"),
    Case("ip6_cidr_over_128", "badcidr6.example.com", PE),
    Case("dual_cidr_over_128", "badcidrdual.example.com", PE),
    Case("cidr_with_leading_zero", "zerocidr.example.com", PE),
    Case("short_ip4", "badip4.example.com", PE),
    Case("bad_ip6", "badip6.example.com", PE),
    Case("all_with_argument", "allarg.example.com", PE),
    Case("unknown_macro_letter", "badmacro.example.com", PE, reason="macro letter"),
    Case("zero_digit_transformer", "zerodigit.example.com", PE),
    Case("exp_only_macro_in_domain", "expletter.example.com", PE),
    Case("lone_percent", "lonepercent.example.com", PE),
    Case("domain_spec_without_top_label", "notoplabel.example.com", PE),
    Case("empty_domain_spec", "emptydomain.example.com", PE),
    Case("redirect_twice", "tworedirects.example.com", PE),
    Case("exp_twice", "twoexps.example.com", PE),
    Case("tab_is_not_a_separator", "tab.example.com", PE),
    Case("non_ascii_record", "nonascii.example.com", PE, reason="non-ASCII"),
    Case("qualified_modifier", "qualifiedmod.example.com", PE),
    Case("unknown_modifier_with_bad_macro", "badmodifier.example.com", PE),
    Case("unknown_modifier_ignored", "goodmodifier.example.com", P),
    # --- permerror: limits ------------------------------------------------------------------
    Case("ten_dns_terms_allowed", "ten.example.com", P),
    Case("eleven_dns_terms", "eleven.example.com", PE, reason="more than 10"),
    Case("ten_dns_terms_across_includes", "nestedten.example.com", P),
    Case("eleven_dns_terms_across_includes", "nestedeleven.example.com", PE, reason="more than 10"),
    Case("include_loop", "loop1.example.com", PE),
    Case("redirect_loop", "redirectloop.example.com", PE),
    Case("two_void_lookups_allowed", "void2.example.com", P),
    Case("three_void_lookups", "void3.example.com", PE, reason="void"),
    Case("nodata_counts_as_void", "voidnodata.example.com", PE, ip=IP6, reason="void"),
    Case("ten_mx_records_allowed", "mx10.example.com", P),
    Case("eleven_mx_records", "mx11.example.com", PE, mechanism="mx"),
    Case("include_without_record", "includenone.example.com", PE, mechanism="include:norecord.example.com"),
    Case("include_of_nxdomain", "includenx.example.com", PE),
    Case("redirect_without_record", "redirectnone.example.com", PE),
    Case("ptr_looks_at_ten_names_only", "ptrmany.example.com", F, ip="192.0.2.20"),
    Case("ptr_tenth_name_counts", "ptrten.example.com", P, ip="192.0.2.21"),
    # --- temperror ------------------------------------------------------------------------
    Case("record_lookup_times_out", "hang.example.com", TE),
    Case("included_lookup_times_out", "includehang.example.com", TE),
    Case("redirect_lookup_times_out", "redirecthang.example.com", TE),
    Case("a_servfail", "aservfail.example.com", TE, reason="SERVFAIL"),
    Case("mx_host_servfail", "mxservfail.example.com", TE),
    Case("exists_servfail", "existsservfail.example.com", TE),
    # --- mechanisms -----------------------------------------------------------------------
    Case("a", "amech.example.com", P, mechanism="a"),
    Case("a_cidr", "acidr.example.com", P, mechanism="a/24"),
    Case("a_other_domain", "aother.example.com", P),
    Case("a_other_domain_cidr_no_match", "aothercidr.example.com", F),
    Case("mx", "mxmech.example.com", P, mechanism="mx"),
    Case("mx_other_domain_cidr", "mxcidr.example.com", P, ip="192.0.2.77"),
    Case("mx_no_match", "mxnomatch.example.com", F),
    Case("null_mx_matches_nothing", "nullmx.example.com", N),
    Case("ptr_validated_subdomain", "ptr.example.com", P, mechanism="ptr"),
    Case("ptr_unvalidated_name", "ptrother.example.com", F),
    Case("ptr_ipv6", "ptr.example.com", P, ip=IP6),
    Case("ptr_without_ptr_records", "ptr.example.com", F, ip="192.0.2.99"),
    Case("exists", "exists.example.com", P),
    Case("exists_no_match", "exists.example.com", F, ip="192.0.2.11"),
    Case("exists_ipv6_nibbles", "exists6.example.com", P, ip=IP6),
    # --- IPv6 ---------------------------------------------------------------------------
    Case("ip6", "ip6mech.example.com", P, ip=IP6, mechanism="ip6:2001:db8::/32"),
    Case("ip6_host", "ip6host.example.com", P, ip="2001:DB8:0::10"),
    Case("ip6_does_not_match_ipv4", "ip6mech.example.com", F),
    Case("ip4_does_not_match_ipv6", "pass.example.com", F, ip=IP6),
    Case("a_aaaa_cidr", "aaaamech.example.com", P, ip=IP6),
    Case("a_aaaa_cidr_outside", "aaaamech.example.com", F, ip="2001:db8:1::10"),
    Case("dual_cidr_ipv4", "dualcidr.example.com", P),
    Case("dual_cidr_ipv6", "dualcidr.example.com", P, ip="2001:db8::ffff"),
    Case("mapped_client_is_ipv4", "pass.example.com", P, ip=MAPPED),
    Case("mapped_client_not_ip6", "mappedip6.example.com", F, ip=MAPPED),
    Case("mapped_client_a", "amech.example.com", P, ip=MAPPED),
    # --- include and redirect -------------------------------------------------------------
    Case("include_pass", "incpass.example.com", P, mechanism="include:pass.example.com"),
    Case("include_fail_is_no_match", "incfail.example.com", S, mechanism="~all"),
    Case("include_neutral_is_no_match", "incneutral.example.com", F),
    Case("include_chain", "incchain.example.com", P),
    Case("include_with_macro", "incmacro.example.com", P),
    Case("redirect", "redir.example.com", P, mechanism="ip4:192.0.2.0/24"),
    Case("redirect_chain", "redirchain.example.com", P),
    Case("redirect_fail", "redirfail.example.com", F),
    Case("redirect_after_mechanisms", "redirfirst.example.com", P, mechanism="ip4:192.0.2.10"),
    Case("redirect_ignored_after_all", "allbeforeredir.example.com", S),
    # --- macros -------------------------------------------------------------------------
    Case("rfc_macros_ipv4", "email.example.com", P, ip="192.0.2.3", sender="strong-bad@email.example.com"),
    Case("rfc_macros_ipv6", "email.example.com", P, ip="2001:db8::cb01", sender="strong-bad@email.example.com"),
    Case("rfc_macros_other_sender", "email.example.com", F, ip="192.0.2.3", sender="good@email.example.com"),
    Case("sender_macros_delimiters", "sendermacro.example.com", P, sender="bob+tag@sendermacro.example.com"),
    Case("helo_macro", "helomacro.example.com", P, helo="sender-host.example.com"),
    Case("expansion_over_253_cut_from_left", "longmacro.example.com", F, sender="x" * 60 + "@longmacro.example.com"),
    # --- exp= ---------------------------------------------------------------------------
    Case("exp_on_fail", "expfail.example.com", F,
         explanation="192.0.2.10 is not one of expfail.example.com's designated mail servers."),
    Case("no_exp_on_softfail", "expsoft.example.com", S, explanation=None),
    Case("exp_name_missing", "expmissing.example.com", F, explanation=None),
    Case("exp_two_records", "exptwo.example.com", F, explanation=None),
    Case("exp_bad_macro", "expbad.example.com", F, explanation=None),
    Case("exp_macros", "expmacros.example.com", F, ip=IP6, sender="a+b@expmacros.example.com",
         explanation=T(r"c=2001:db8::10 r=mx\.example\.test s=a\+b@expmacros\.example\.com l=a\+b "
                       r"o=expmacros\.example\.com h=helo\.example\.com v=ip6 % %20 "
                       r"S=a%2Bb%40expmacros\.example\.com t=\d{10}\Z")),
    Case("exp_mapped_client_is_ipv4", "expfail.example.com", F, ip=MAPPED,
         explanation="192.0.2.10 is not one of expfail.example.com's designated mail servers."),
    Case("exp_of_included_record_unused", "expincluded.example.com", F, explanation=None),
    Case("exp_of_redirect_target_used", "expredirect.example.com", F,
         explanation="192.0.2.10 is not one of expfail.example.com's designated mail servers."),
    Case("exp_of_redirecting_record_unused", "expredirectnone.example.com", F, explanation=None),
    Case("exp_domain_macro_and_url_escape", "expdomain.example.com", F, sender="x/y@expdomain.example.com",
         explanation="see https://expdomain.example.com/why?s=x%2Fy%40expdomain.example.com"),
    Case("exp_p_macro", "expp.example.com", F, explanation="192.0.2.10 is host.ptr.example.com"),
    Case("exp_p_macro_unknown", "expp.example.com", F, ip="192.0.2.99", explanation="192.0.2.99 is unknown"),
    Case("empty_sender_is_postmaster_at_helo", "helo.example.com", F, sender="",
         explanation="postmaster@helo.example.com postmaster helo.example.com"),
    Case("sender_without_local_part", "helo.example.com", F, sender="@helo.example.com",
         explanation="postmaster@helo.example.com postmaster helo.example.com"),
]


class SPFTableTests(TestCase):
    """One test per row of `CASES` (added below the class)."""

    def setUp(self) -> None:
        self.port, self.server = serve(
            self, {"example.com": EXAMPLE_COM, "example.net": EXAMPLE_NET, "arpa": ARPA},
            hang=HANG, servfail=SERVFAIL)
        self.lookup = Lookup([("127.0.0.1", self.port)], LOOKUP_TIMEOUT)

    async def check(self, case: Case) -> None:
        got = await deferToThread(case.run, self.lookup)
        label = f"{case.name}: {got}"
        self.assertIs(type(got.result), Result)
        self.assertEqual(got.result, case.expect, label)
        if case.mechanism is not ANY:
            self.assertEqual(got.mechanism, case.mechanism, label)
        if isinstance(case.explanation, re.Pattern):
            self.assertIsNotNone(got.explanation, label)
            self.assertRegex(got.explanation, case.explanation)
        elif case.explanation is not ANY:
            self.assertEqual(got.explanation, case.explanation, label)
        self.assertIn(case.reason, got.reason, label)
        self.assertTrue(got.reason, label)


def _add_case(case: Case) -> None:
    async def test(self: SPFTableTests) -> None:
        await self.check(case)

    test.__name__ = f"test_{case.name}"
    test.__doc__ = f"{case.domain} from {case.ip}: {case.expect}"
    assert not hasattr(SPFTableTests, test.__name__), case.name
    setattr(SPFTableTests, test.__name__, test)


for _case in CASES:
    _add_case(_case)


class NoLookups:
    """A `Lookup` stand-in for expansion tests: any DNS query is a test failure."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"unexpected DNS lookup: {name}")


# RFC 7208 §7.4: <sender> strong-bad@email.example.com, IPv4 192.0.2.3, IPv6 2001:db8::cb01.
RFC_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]
RFC_EXAMPLES_IPV6 = [
    ("%{ir}.%{v}._spf.%{d2}", "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"),
    ("%{c}", "2001:db8::cb01"),
    ("%{C}", "2001%3Adb8%3A%3Acb01"),
]


class MacroTests(TestCase):
    def expand(self, text: str, ip: str = "192.0.2.3", *, explain: bool = False) -> str:
        import ipaddress

        check = _Check(ipaddress.ip_address(ip), "strong-bad@email.example.com", "mx.example.org",
                       "mx.example.test", NoLookups(), None)  # type: ignore[arg-type]
        return check.expand(parse_macro_string(text, explain=explain), "email.example.com")

    def test_rfc_7208_examples(self) -> None:
        for text, expected in RFC_EXAMPLES:
            self.assertEqual(self.expand(text), expected, text)

    def test_rfc_7208_examples_ipv6(self) -> None:
        for text, expected in RFC_EXAMPLES_IPV6:
            self.assertEqual(self.expand(text, "2001:db8::cb01", explain=True), expected, text)

    def test_escapes_and_url_encoding(self) -> None:
        self.assertEqual(self.expand("%%%_%-"), "% %20")
        self.assertEqual(self.expand("%{S}"), "strong-bad%40email.example.com")
        self.assertEqual(self.expand("%{L}"), "strong-bad")
        self.assertEqual(self.expand("%{dR}"), "com.example.email")
        self.assertEqual(self.expand("%{d9}"), "email.example.com")
        self.assertEqual(self.expand("%{l+-_}"), "strong.bad")
        self.assertEqual(self.expand("%{c} %{r} %{h}", explain=True), "192.0.2.3 mx.example.test mx.example.org")
        self.assertRegex(self.expand("%{t}", explain=True), r"\A\d+\Z")

    def test_long_expansion_cut_from_the_left(self) -> None:
        import ipaddress

        check = _Check(ipaddress.ip_address(IP4), "x" * 60 + "@example.com", HELO, "unknown",
                       NoLookups(), None)  # type: ignore[arg-type]
        spec = parse_macro_string("%{l}.%{l}.%{l}.%{l}.%{l}.long.example.com")
        name = check._expand_domain(spec, "example.com")
        self.assertEqual(name, ".".join(["x" * 60] * 3) + ".long.example.com")  # §7.3: whole labels
        self.assertLessEqual(len(name), 253)
        self.assertEqual(check._expand_domain(parse_macro_string("%{d}."), "example.com"), "example.com")

    def test_malformed_macros(self) -> None:
        for text in ("%", "%x", "%{", "%{d", "%{q}", "%{d0}", "%{dx}", "%{d2rr}", "%{d;}", "a b",
                     "%{c}", "%{r}", "%{t}"):
            self.assertRaises(_PermError, parse_macro_string, text)
        for text in ("%{c}", "%{r}", "%{t}", "a b"):
            parse_macro_string(text, explain=True)  # allowed in explanations (§7.1)


class SPFNetworkTests(TestCase):
    """The DNS going wrong as a whole: a dead server, a deadline, and the cache saving work."""

    def setUp(self) -> None:
        self.port, self.server = serve(
            self, {"example.com": EXAMPLE_COM, "example.net": EXAMPLE_NET, "arpa": ARPA},
            hang=HANG, servfail=SERVFAIL)

    async def test_temperror_from_a_nameserver_that_never_answers(self) -> None:
        port, silent = listen_silent(self)
        lookup = Lookup([("127.0.0.1", port)], 0.3)
        start = time.monotonic()
        got = await deferToThread(check_host, IP4, "pass.example.com", "user@pass.example.com",
                                  helo=HELO, lookup=lookup)
        self.assertEqual(got.result, Result.TEMPERROR)
        self.assertIn("timeout", got.reason)
        self.assertLess(time.monotonic() - start, 1.0)
        self.assertEqual(silent.received, 1)

    async def test_deadline_bounds_the_whole_check(self) -> None:
        lookup = Lookup([("127.0.0.1", self.port)], 5.0)
        start = time.monotonic()
        got = await deferToThread(check_host, IP4, "includehang.example.com", "user@includehang.example.com",
                                  helo=HELO, lookup=lookup, deadline=Deadline(0.3))
        self.assertEqual(got.result, Result.TEMPERROR)
        self.assertLess(time.monotonic() - start, 0.6)

    async def test_expired_deadline_with_nothing_cached(self) -> None:
        lookup = Lookup([("127.0.0.1", self.port)], 5.0)
        got = await deferToThread(check_host, IP4, "pass.example.com", "user@pass.example.com",
                                  helo=HELO, lookup=lookup, deadline=Deadline(0.0))
        self.assertEqual(got.result, Result.TEMPERROR)
        self.assertEqual(self.server.queries, [])

    async def test_second_check_of_a_sender_costs_no_queries(self) -> None:
        lookup = Lookup([("127.0.0.1", self.port)], 2.0)

        def run() -> SPFResult:
            return check_host(IP4, "redirchain.example.com", "user@redirchain.example.com", helo=HELO,
                              lookup=lookup)

        first = await deferToThread(run)
        asked = len(self.server.queries)
        second = await deferToThread(run)
        self.assertEqual(first, second)
        self.assertEqual(first.result, Result.PASS)
        self.assertEqual(asked, 3)  # redirchain, redir and pass: TXT each
        self.assertEqual(len(self.server.queries), asked)

    async def test_explanation_lookup_not_counted_as_a_dns_term(self) -> None:
        lookup = Lookup([("127.0.0.1", self.port)], 2.0)
        got = await deferToThread(check_host, "192.0.2.11", "ten.example.com", "user@ten.example.com",
                                  helo=HELO, lookup=lookup)
        self.assertEqual(got.result, Result.FAIL)  # ten a terms, then -all: no permerror

    def test_bad_client_address(self) -> None:
        self.assertRaises(ValueError, check_host, "not-an-ip", "pass.example.com", "", helo=HELO,
                          lookup=Lookup([("127.0.0.1", self.port)], 1.0))
