"""Mail authentication end to end: the whole server (`mx.tap.build`) in-process, real sockets.

The world is real: a twisted.names server on 127.0.0.1 serves the test zone (SPF, DKIM key,
DMARC and ARC-sealer TXT records, MX and A records for the remote domain) and counts the
queries it gets; smtplib clients in threads send to the smtp port from 127.0.0.1 (so
`mailauth.skip_networks = []`); messages are DKIM-signed and ARC-sealed in the test with
dkimpy (and mx's `arc.seal`); aiosmtpd plays the remote MX that submitted mail is relayed to,
and checks what it got with dkimpy, mx's SPF and DMARC code and, where installed, OpenDKIM.

Inbound: the delivered copy's Authentication-Results header is compared with golden files
under tests/data/mailauth/ (header.b normalised); set MX_REGEN_GOLDEN=1 to rewrite them.

Every wait is bounded: socket timeouts, `dns.timeout = "1s"`, loops with a fixed number of
steps, trial's per-test timeout.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import shutil
import smtplib
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, TypeVar

import authres
import dkim
import dns.rdata
import dns.rdataclass
import dns.rdatatype
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.names import dns as tdns
from twisted.names import server as tserver
from twisted.trial.unittest import SkipTest, TestCase

from mx import config as configmod
from mx.mailauth import dmarc as mdmarc
from mx.mailauth import keys
from mx.mailauth import spf as mspf
from mx.mailauth.arc import seal as arc_seal
from mx.mailauth.check import header_block
from mx.mailauth.gate import KEY_REFRESH
from mx.mailauth.keys import SigningKey
from mx.mailauth.lookup import Lookup
from mx.smtpclient import Timeouts
from tests.support import (
    HOSTNAME,
    RemoteHandler,
    _toml,
    add_users,
    common_free_port,
    make_config,
    maildir,
    new_files,
    queue_records,
    run_mx,
    service_ports,
    split_delivered,
    start_mail_service,
    start_remote_mx,
    write_config,
    zone_authority,
)

T = TypeVar("T")

GOLDEN = Path(__file__).resolve().parent / "data" / "mailauth"
ALICE, ALICE_PW = "alice@example.test", "alice-mailauth-pw"
BOB, BOB_PW = "bob@example.test", "bob-mailauth-pw"
HELO = "client.helo.test"  # the clients' EHLO name: SPF-passes for 127.0.0.1
OTHER_IP = "192.0.2.1"  # the only sender some domains allow: 127.0.0.1 fails their SPF
WAIT = 20.0
FAST = Timeouts(connect=5, greeting=5, ehlo=5, mail=5, rcpt=5, data_init=5, data_block=5, data_end=5, quit=2)
REMOTE_HOST, REMOTE_NAME = "127.0.0.2", "mx.remote.test"
REMOTE_RCPT = "bob@remote.test"
SOCKET_TIMEOUT = 15.0


# --- keys (RSA generation is slow: once per run) --------------------------------------------


@functools.cache
def rsa_pem(name: str) -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def txt(value: str, ttl: int | None = 60) -> Any:
    """A TXT record holding `value`, split into strings of at most 255 octets."""
    data = value.encode("ascii")
    return tdns.Record_TXT(*[data[i:i + 255] for i in range(0, len(data), 255)] or [b""], ttl=ttl)


def key_value(name: str) -> str:
    return keys.txt_value(rsa_pem(name))


# --- the zone --------------------------------------------------------------------------------

SPF_LOCAL = "v=spf1 ip4:127.0.0.1 -all"
SPF_ELSEWHERE = f"v=spf1 ip4:{OTHER_IP} -all"


def inbound_zone() -> list[tuple[str, Any]]:
    return [
        (HELO, txt(SPF_LOCAL)),
        # good.test: everything passes for mail from 127.0.0.1 signed with its key
        ("good.test", txt(SPF_LOCAL)),
        ("sel1._domainkey.good.test", txt(key_value("good"))),
        ("_dmarc.good.test", txt("v=DMARC1; p=reject")),
        # forged senders: 127.0.0.1 is not theirs
        ("bank.test", txt(SPF_ELSEWHERE)),
        ("_dmarc.bank.test", txt("v=DMARC1; p=reject")),
        ("quar.test", txt(SPF_ELSEWHERE)),
        ("_dmarc.quar.test", txt("v=DMARC1; p=quarantine")),
        ("lax.test", txt(SPF_ELSEWHERE)),
        ("_dmarc.lax.test", txt("v=DMARC1; p=none")),
        ("nodmarc.test", txt(SPF_ELSEWHERE)),
        # a newsletter domain with p=reject whose mail goes through mailing lists
        ("strict.test", txt(SPF_ELSEWHERE)),
        ("s1._domainkey.strict.test", txt(key_value("strict"))),
        ("_dmarc.strict.test", txt("v=DMARC1; p=reject")),
        # the lists: each sends from 127.0.0.1 and seals with its own key
        ("lists.test", txt(SPF_LOCAL)),
        ("arc._domainkey.lists.test", txt(key_value("lists"))),
        ("rogue.test", txt(SPF_LOCAL)),
        ("arc._domainkey.rogue.test", txt(key_value("rogue"))),
    ]


class CountingDNSFactory(tserver.DNSServerFactory):
    """twisted.names' server, remembering every question asked (name, type name)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: list[tuple[str, str]] = []

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> Any:  # noqa: N802 (Twisted's name)
        for q in message.queries:
            self.asked.append((q.name.name.decode("ascii", "replace").lower(), tdns.QUERY_TYPES.get(q.type, str(q.type))))
        return super().handleQuery(message, protocol, address)


def serve_zone(case: TestCase, records: list[tuple[str, Any]]) -> tuple[int, CountingDNSFactory, Any]:
    """A counting twisted.names server for the zone `test` on 127.0.0.1 (UDP and TCP on one
    port); returns (port, factory, authority). Records can be added later with `publish`."""
    from twisted.internet.error import CannotListenError

    authority = zone_authority(records, origin="test")
    factory = CountingDNSFactory(authorities=[authority])
    factory.noisy = False
    udp = tdns.DNSDatagramProtocol(controller=factory)
    udp.noisy = False
    for _ in range(20):
        tcp_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        number = tcp_port.getHost().port
        try:
            udp_port = reactor.listenUDP(number, udp, interface="127.0.0.1")
        except CannotListenError:
            tcp_port.stopListening()
            continue
        case.addCleanup(tcp_port.stopListening)
        case.addCleanup(udp_port.stopListening)
        return number, factory, authority
    raise AssertionError("no port free for both UDP and TCP")


def publish(authority: Any, name: str, record: Any) -> None:
    authority.records.setdefault(name.lower().encode("ascii"), []).append(record)


class BlackHole(DatagramProtocol):
    """A "nameserver" that reads every query and never answers."""

    noisy = False

    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        self.received += 1


# --- messages --------------------------------------------------------------------------------

_counter = iter(range(1, 1_000_000))


def compose(from_addr: str, subject: str, *, to: str = ALICE, headers: str = "", body: str = "") -> bytes:
    n = next(_counter)
    return (
        f"{headers}"
        f"From: <{from_addr}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 12:00:{n % 60:02d} +0000\r\n"
        f"Message-ID: <m{n}.{int(time.time())}@client.example>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
        f"{body or 'Hello, this is a test message.'}\r\n"
    ).encode("ascii")


def dkim_signed(message: bytes, domain: str, selector: str, key_name: str) -> bytes:
    sig = dkim.sign(message, selector.encode(), domain.encode(), rsa_pem(key_name),
                    canonicalize=(b"relaxed", b"relaxed"),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + message


_AR_FIELD = re.compile(rb"Authentication-Results:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", re.I)


def delivered(content: bytes) -> tuple[bytes, bytes]:
    """A delivered file into (our Authentication-Results header, the bytes the client sent)."""
    _return_path, _received, rest = split_delivered(content)
    m = _AR_FIELD.match(rest)
    assert m is not None, rest[:400]
    return m.group(0), rest[m.end():]


def flat(header: bytes) -> bytes:
    """The header unfolded, white space runs as one space: for substring checks."""
    return b" ".join(header.split())


def normalized(header: bytes) -> str:
    """The header as text with every header.b value replaced by as many "B"s, unquoted (a
    prefix with "/" in it is quoted, RFC 2045 token rules; no golden line is near the
    folding limit, so the two quotes never move a fold)."""
    return re.sub(r'header\.b=("?)([A-Za-z0-9+/=]+)\1', lambda m: "header.b=" + "B" * len(m.group(2)),
                  header.decode("utf-8"))


def send(port: int, mail_from: str, rcpts: list[str], message: bytes, helo: str = HELO) -> dict[str, Any]:
    """One transaction with smtplib (blocking: run it in a thread); the replies and timing."""
    out: dict[str, Any] = {}
    s = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=SOCKET_TIMEOUT)
    try:
        s.ehlo()
        out["mail"] = s.mail(mail_from)
        out["rcpt"] = [s.rcpt(r) for r in rcpts]
        start = time.monotonic()
        code, text = s.data(message)
        out["data_seconds"] = time.monotonic() - start
        out["data"] = (code, text.decode("utf-8", "replace"))
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            pass
    finally:
        s.close()
    return out


class MailAuthCase(TestCase):
    timeout = 60

    async def thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await deferToThread(fn, *args)

    def assertGolden(self, name: str, header: bytes) -> None:
        """`header` (header.b normalised) against tests/data/mailauth/<name>.txt."""
        path = GOLDEN / f"{name}.txt"
        text = normalized(header)
        if os.environ.get("MX_REGEN_GOLDEN"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))
        self.assertEqual(text, path.read_bytes().decode("utf-8"), f"golden {path}")
        # an independent reader agrees it is one well-formed RFC 8601 header
        parsed = authres.AuthenticationResultsHeader.parse(" ".join(header.decode().split()))
        self.assertEqual(parsed.authserv_id, HOSTNAME)


# --- inbound: the checks on the smtp port ------------------------------------------------------


class InboundTests(MailAuthCase):
    async def start(self, nameservers: str | None = None, **mailauth: Any) -> Any:
        """The whole server on a smtp port with `[mailauth]` settings; alice and bob exist."""
        if nameservers is None:
            self.dns_port, self.dns, self.zone = serve_zone(self, inbound_zone())
            nameservers = f"127.0.0.1:{self.dns_port}"
        settings: dict[str, Any] = {"skip_networks": [], **mailauth}
        extra = f'[dns]\nnameservers = ["{nameservers}"]\ntimeout = "1s"\n\n[mailauth]\n'
        extra += "".join(f"{k} = {_toml(v)}\n" for k, v in settings.items())
        self.config = make_config(self, listen={"smtp": "tcp:0:interface=127.0.0.1"}, extra=extra)
        add_users(self.config, {ALICE: ALICE_PW, BOB: BOB_PW})
        clock = Clock()
        clock.advance(time.time())
        self.mail = await start_mail_service(self, self.config, clock=clock, timeouts=FAST)
        return self.mail

    async def send(self, mail_from: str, message: bytes, rcpts: list[str] | None = None,
                   helo: str = HELO) -> dict[str, Any]:
        out = await self.thread(send, self.mail.smtp_port, mail_from, rcpts or [ALICE], message, helo)
        self.assertEqual(out["mail"][0], 250, out)
        self.assertEqual([r[0] for r in out["rcpt"]], [250] * len(out["rcpt"]), out)
        return out

    def inbox(self, local: str = "alice") -> list[Path]:
        return new_files(self.config, local)

    def junk(self, local: str = "alice") -> list[Path]:
        folder = maildir(self.config, local) / ".Junk" / "new"
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def stored_anywhere(self) -> list[Path]:
        return sorted(p for p in (self.config.data_dir / "mail").glob("**/new/*") if p.is_file())

    def assertAccepted(self, out: dict[str, Any]) -> None:
        self.assertEqual(out["data"][0], 250, out)
        self.assertTrue(out["data"][1].startswith("2.0.0 "), out)

    def assertRejected(self, out: dict[str, Any]) -> None:
        self.assertEqual(out["data"][0], 550, out)
        self.assertTrue(out["data"][1].startswith("5.7.1 "), out)
        self.assertEqual(self.stored_anywhere(), [])
        self.assertEqual(queue_records(self.config.data_dir), {})

    def only_delivered(self, where: list[Path]) -> tuple[bytes, bytes, bytes]:
        """The one file in `where`: (whole content, our header, the client's bytes)."""
        self.assertEqual(len(where), 1, where)
        content = where[0].read_bytes()
        header, rest = delivered(content)
        # exactly one Authentication-Results with our id, right below Return-Path/Received
        ours = [f for f in _AR_FIELD.findall(header_block(content))
                if f.split(b":", 1)[1].split(b";", 1)[0].strip().lower() == HOSTNAME.encode()]
        self.assertEqual(ours, [header])
        return content, header, rest

    # -- pass ---------------------------------------------------------------------------------

    async def test_spf_dkim_dmarc_pass_is_delivered_with_one_golden_header(self) -> None:
        await self.start()
        message = dkim_signed(compose("news@good.test", "all pass"), "good.test", "sel1", "good")
        out = await self.send("news@good.test", message)
        self.assertAccepted(out)
        self.assertEqual(self.junk(), [])
        content, header, rest = self.only_delivered(self.inbox())
        self.assertEqual(rest, message)  # the client's bytes follow, untouched
        self.assertEqual(len(_AR_FIELD.findall(header_block(content))), 1)
        self.assertIn(b"spf=pass smtp.mailfrom=news@good.test", flat(header))
        self.assertIn(b"spf=pass smtp.helo=" + HELO.encode(), flat(header))
        self.assertRegex(header, rb"dkim=pass header\.d=good\.test header\.s=sel1\s+header\.a=rsa-sha256"
                                 rb'\s+header\.b=("?)[A-Za-z0-9+/]{8}\1;')
        b_value = re.search(rb"(?m)^DKIM-Signature:.*?\bb=([^;]+)", message, re.S)
        assert b_value is not None
        prefix = b"".join(b_value.group(1).split())[:8]
        self.assertIn(b"header.b=" + (b'"%s"' % prefix if b"/" in prefix else prefix), flat(header))
        self.assertIn(b"dmarc=pass (p=reject dis=none) header.from=good.test", flat(header))
        self.assertGolden("pass", header)

    # -- policy ---------------------------------------------------------------------------------

    async def test_forged_from_with_p_reject_gets_550_and_nothing_is_stored(self) -> None:
        await self.start()
        out = await self.send("ceo@bank.test", compose("ceo@bank.test", "wire the money"))
        self.assertRejected(out)
        self.assertIn("bank.test", out["data"][1])

    async def test_forged_from_with_a_forged_signature_gets_550(self) -> None:
        """A DKIM signature claiming d=bank.test, made with somebody else's key: no pass."""
        await self.start()
        forged = dkim_signed(compose("ceo@bank.test", "urgent"), "bank.test", "sel1", "rogue")
        out = await self.send("ceo@bank.test", forged)
        self.assertRejected(out)

    async def test_p_quarantine_fail_goes_to_junk(self) -> None:
        await self.start()
        out = await self.send("promo@quar.test", compose("promo@quar.test", "cheap pills"))
        self.assertAccepted(out)
        self.assertEqual(self.inbox(), [])
        _content, header, _rest = self.only_delivered(self.junk())
        self.assertIn(b"spf=fail", flat(header))
        self.assertIn(b"dkim=none", flat(header))
        self.assertIn(b"dmarc=fail", flat(header))
        self.assertIn(b"(p=quarantine dis=quarantine) header.from=quar.test", flat(header))
        self.assertGolden("quarantine", header)

    async def test_p_none_fail_is_delivered_to_the_inbox(self) -> None:
        await self.start()
        out = await self.send("someone@lax.test", compose("someone@lax.test", "p none"))
        self.assertAccepted(out)
        self.assertEqual(self.junk(), [])
        _content, header, _rest = self.only_delivered(self.inbox())
        self.assertIn(b"dmarc=fail", flat(header))
        self.assertIn(b"(p=none dis=none) header.from=lax.test", flat(header))
        self.assertGolden("none", header)

    async def test_report_only_delivers_a_p_reject_fail(self) -> None:
        await self.start(dmarc_policy="report")
        out = await self.send("ceo@bank.test", compose("ceo@bank.test", "report only"))
        self.assertAccepted(out)
        self.assertEqual(self.junk(), [])
        _content, header, _rest = self.only_delivered(self.inbox())
        self.assertIn(b"dmarc=fail", flat(header))
        # delivered: the disposition we applied is none (see the ARC test)
        self.assertIn(b"(p=reject dis=none) header.from=bank.test", flat(header))
        self.assertGolden("report", header)

    async def test_reject_spf_fail_without_dkim(self) -> None:
        await self.start(reject_spf_fail=True)
        out = await self.send("someone@nodmarc.test", compose("someone@nodmarc.test", "spf fail"))
        self.assertRejected(out)
        self.assertIn("SPF", out["data"][1])

    async def test_spf_fail_without_dkim_is_delivered_by_default(self) -> None:
        """The control for the test above: no DMARC record, default settings -> delivered."""
        await self.start()
        out = await self.send("someone@nodmarc.test", compose("someone@nodmarc.test", "spf fail"))
        self.assertAccepted(out)
        _content, header, _rest = self.only_delivered(self.inbox())
        self.assertIn(b"spf=fail", flat(header))
        self.assertIn(b"dmarc=none", flat(header))

    async def test_reject_spf_fail_spares_a_dkim_pass(self) -> None:
        """reject_spf_fail: an SPF fail with a passing DKIM signature is not refused."""
        await self.start(reject_spf_fail=True)
        message = dkim_signed(compose("news@good.test", "forwarded"), "good.test", "sel1", "good")
        # MAIL FROM of a domain 127.0.0.1 may not send for; the From domain's signature passes
        out = await self.send("bounce@nodmarc.test", message)
        self.assertAccepted(out)
        _content, header, _rest = self.only_delivered(self.inbox())
        self.assertIn(b"spf=fail", flat(header))
        self.assertIn(b"dkim=pass", flat(header))
        self.assertIn(b"dmarc=pass", flat(header))

    # -- forged Authentication-Results ----------------------------------------------------------

    async def test_incoming_results_claiming_our_id_are_removed(self) -> None:
        await self.start()
        forged = (
            f"Authentication-Results: {HOSTNAME}; spf=pass smtp.mailfrom=ceo@bank.test;\r\n"
            "\tdkim=pass header.d=bank.test; dmarc=pass header.from=bank.test\r\n"
            f"Authentication-Results: {HOSTNAME.upper()}.; arc=pass\r\n"
            "Authentication-Results: other.example; spf=pass smtp.mailfrom=news@good.test\r\n"
        )
        message = dkim_signed(compose("news@good.test", "forged results", headers=forged), "good.test", "sel1", "good")
        out = await self.send("news@good.test", message)
        self.assertAccepted(out)
        content, header, rest = self.only_delivered(self.inbox())
        block = header_block(content)
        self.assertEqual(block.lower().count(b"authentication-results:"), 2, block)
        self.assertIn(b"Authentication-Results: other.example; spf=pass smtp.mailfrom=news@good.test\r\n", rest)
        self.assertNotIn(b"bank.test", content)
        self.assertNotIn(b"; arc=pass", content)
        # everything else the client sent is there, byte for byte
        expected = re.sub(rb"(?i)Authentication-Results: mx\.example\.test\.?;[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*",
                          b"", message)
        self.assertEqual(rest, expected)
        self.assertIn(b"dkim=pass header.d=good.test", flat(header))  # unsigned headers removed: still valid
        self.assertIn(b"dmarc=pass", flat(header))

    # -- DNS that never answers ------------------------------------------------------------------

    async def test_dns_that_never_answers_gives_temperror_within_the_deadline(self) -> None:
        hole = BlackHole()
        port = reactor.listenUDP(0, hole, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await self.start(nameservers=f"127.0.0.1:{port.getHost().port}", deadline="3s")
        message = dkim_signed(compose("news@good.test", "slow dns"), "good.test", "sel1", "good")
        started = time.monotonic()
        out = await self.send("news@good.test", message)
        elapsed = time.monotonic() - started
        self.assertAccepted(out)  # never a 5xx (nor a 4xx) for DNS trouble
        self.assertLess(out["data_seconds"], 5.0, out)
        self.assertLess(elapsed, 6.0)
        self.assertGreater(out["data_seconds"], 0.9, "the checks did not wait for DNS at all")
        self.assertGreater(hole.received, 0)
        _content, header, _rest = self.only_delivered(self.inbox())
        self.assertIn(b"spf=temperror", flat(header))
        self.assertIn(b"dmarc=temperror", flat(header))
        self.assertRegex(header, rb"dkim=temperror")
        self.assertNotRegex(header, rb"=pass\b")

    # -- ARC -------------------------------------------------------------------------------------

    def list_message(self, sealer: str, with_dkimpy: bool) -> bytes:
        """A strict.test newsletter (DKIM-signed, p=reject) that the list `sealer` changed
        (subject tag, footer: the author's signature breaks) and sealed."""
        original = dkim_signed(compose("news@strict.test", "Newsletter", body="Issue 1."), "strict.test", "s1",
                               "strict")
        changed = original.replace(b"Subject: Newsletter", b"Subject: [list] Newsletter")
        changed += b"--\r\nlist footer\r\n"
        seen = (f"mx.{sealer}; spf=pass smtp.mailfrom=news@strict.test; dkim=pass header.d=strict.test "
                f"header.s=s1; dmarc=pass header.from=strict.test; arc=none")
        key = SigningKey("arc", "rsa", rsa_pem(sealer.split(".")[0]))
        if not with_dkimpy:
            return arc_seal(changed, seen, sealer, key, f"mx.{sealer}") + changed
        with_ar = f"Authentication-Results: {seen}\r\n".encode() + changed
        headers = dkim.arc_sign(with_ar, b"arc", sealer.encode(), key.private_bytes, f"mx.{sealer}".encode(),
                                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
        self.assertEqual(len(headers), 3, "dkimpy made no ARC set")
        return b"".join(headers) + with_ar

    async def test_trusted_arc_sealer_overrides_a_dmarc_reject(self) -> None:
        await self.start(trusted_arc_sealers=["lists.test"])
        # dkimpy's sealer, trusted: delivered
        out = await self.send("bounces@lists.test", self.list_message("lists.test", with_dkimpy=True))
        self.assertAccepted(out)
        self.assertEqual(self.junk(), [])
        _content, header, _rest = self.only_delivered(self.inbox())
        self.assertIn(b"spf=pass smtp.mailfrom=bounces@lists.test", flat(header))
        self.assertIn(b"dkim=fail", flat(header))
        self.assertIn(b"dmarc=fail", flat(header))
        self.assertIn(b"header.from=strict.test", flat(header))
        self.assertRegex(header, rb"arc=pass\r\n$")
        trusted_header = header
        # mx's own sealer, trusted: delivered too
        out = await self.send("bounces@lists.test", self.list_message("lists.test", with_dkimpy=False))
        self.assertAccepted(out)
        self.assertEqual(len(self.inbox()), 2)
        # a valid chain from a sealer nobody trusts changes nothing: p=reject
        out = await self.send("bounces@rogue.test", self.list_message("rogue.test", with_dkimpy=False))
        self.assertEqual(out["data"][0], 550, out)
        self.assertTrue(out["data"][1].startswith("5.7.1 "), out)
        self.assertEqual(len(self.inbox()), 2)
        # the header tells what was done: delivered, so the disposition is none (results.py:
        # "dis=<disposition> ... what we do"; OpenDMARC and Gmail write dis=none when local
        # policy overrides)
        self.assertIn(b"(p=reject dis=none) header.from=strict.test", flat(trusted_header))
        self.assertGolden("arc-trusted", trusted_header)

    async def test_broken_arc_chain_from_a_trusted_sealer_is_rejected(self) -> None:
        await self.start(trusted_arc_sealers=["lists.test"])
        sealed = self.list_message("lists.test", with_dkimpy=False)
        out = await self.send("bounces@lists.test", sealed.replace(b"Issue 1.", b"Issue 2."))
        self.assertEqual(out["data"][0], 550, out)
        self.assertEqual(self.stored_anywhere(), [])

    # -- the cache ---------------------------------------------------------------------------------

    async def test_second_message_from_the_same_sender_costs_no_lookups(self) -> None:
        await self.start()
        for sender, make in (
            ("news@good.test", lambda: dkim_signed(compose("news@good.test", "burst"), "good.test", "sel1", "good")),
            ("someone@nodmarc.test", lambda: compose("someone@nodmarc.test", "burst")),  # negative answers
        ):
            before = len(self.dns.asked)
            self.assertAccepted(await self.send(sender, make()))
            first = self.dns.asked[before:]
            self.assertTrue(first, "the first message asked nothing")
            after_first = len(self.dns.asked)
            self.assertAccepted(await self.send(sender, make()))
            self.assertEqual(self.dns.asked[after_first:], [], f"second message from {sender} asked again")
        names = {name for name, _type in self.dns.asked}
        for expected in ("good.test", HELO, "sel1._domainkey.good.test", "_dmarc.good.test", "nodmarc.test",
                         "_dmarc.nodmarc.test"):
            self.assertIn(expected, names)
        # each question once in all: a burst of four messages cost one set of lookups
        self.assertEqual(len(self.dns.asked), len(set(self.dns.asked)), self.dns.asked)
        self.assertEqual(len(self.inbox()), 4)


# --- outbound: signing what alice submits ----------------------------------------------------------


class RecordingHandler(RemoteHandler):
    """The remote MX, also remembering the peer address of each message."""

    def __init__(self, host: str) -> None:
        super().__init__(host)
        self.peers: list[str] = []
        self.helos: list[str] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.peers.append(session.peer[0])
        self.helos.append(session.host_name)
        return await super().handle_DATA(server, session, envelope)


def zone_line_strings(line: str) -> tuple[str, list[str]]:
    """(owner name, the character-strings) of a `NAME IN TXT "..." "..."` zone-file line."""
    m = re.fullmatch(r'(\S+) IN TXT ((?:"[^"\\]*" ?)+)', line)
    assert m is not None, line
    rdata = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.TXT, m.group(2))
    return m.group(1), [s.decode("ascii") for s in rdata.strings]  # type: ignore[attr-defined]


def tags(header_value: bytes) -> dict[bytes, bytes]:
    out = {}
    for part in b"".join(header_value.split()).split(b";"):
        if b"=" in part:
            k, _, v = part.partition(b"=")
            out[k] = v
    return out


def signatures(content: bytes) -> list[dict[bytes, bytes]]:
    block = header_block(content)
    return [tags(m.group(1)) for m in re.finditer(rb"(?im)^DKIM-Signature:((?:[^\r\n]*\r\n)(?:[ \t][^\r\n]*\r\n)*)",
                                                   block)]


class OutboundTests(MailAuthCase):
    async def start(self, *, with_keys: bool = True) -> Any:
        self.dns_port, self.dns, self.zone = serve_zone(self, [
            ("remote.test", tdns.Record_MX(10, REMOTE_NAME.encode())),
            (REMOTE_NAME, tdns.Record_A(REMOTE_HOST)),
            ("example.test", txt(SPF_LOCAL)),
            ("_dmarc.example.test", txt("v=DMARC1; p=reject")),
        ])
        self.keyzone: dict[str, str] = {}  # what is published: name -> TXT value
        self.relay_port = common_free_port((REMOTE_HOST,))
        extra = (f'[relay]\nport = {self.relay_port}\nretry = ["1m"]\n\n'
                 f'[dns]\nnameservers = ["127.0.0.1:{self.dns_port}"]\ntimeout = "1s"\n\n'
                 "[mailauth]\nskip_networks = []\n")
        self.config = make_config(self, listen={"smtp": "tcp:0:interface=127.0.0.1",
                                                "submission": "tcp:0:interface=127.0.0.1"}, extra=extra)
        add_users(self.config, {ALICE: ALICE_PW, BOB: BOB_PW})
        if with_keys:
            self.new_key("mxe", "ed25519")
            self.new_key("mxr", "rsa")
        self.remote = start_remote_mx(self, REMOTE_HOST, self.relay_port, REMOTE_NAME,
                                      handler=RecordingHandler(REMOTE_HOST))
        self.clock = Clock()
        self.clock.advance(time.time())
        self.mail = await start_mail_service(self, self.config, clock=self.clock, timeouts=FAST)
        self.submission_port = service_ports(self.mail)["submission"]
        return self.mail

    def new_key(self, selector: str, algorithm: str) -> Path:
        """Make a key under data_dir/dkim/example.test/ and publish its record (as dns_record
        gives it) in the test zone."""
        path = keys.generate(self.config.data_dir, "example.test", selector, algorithm)
        name, strings = zone_line_strings(keys.dns_record(path, selector, "example.test"))
        self.assertEqual(name, f"{selector}._domainkey.example.test.")
        publish(self.zone, name.rstrip("."), tdns.Record_TXT(*[s.encode() for s in strings], ttl=60))
        self.keyzone[name.rstrip(".")] = "".join(strings)
        return path

    def dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        value = self.keyzone.get(name.decode().rstrip(".").lower())
        return value.encode() if value is not None else None

    def submit(self, rcpt: str, message: bytes) -> dict[Any, Any]:
        s = smtplib.SMTP("127.0.0.1", self.submission_port, local_hostname="laptop.example",
                         timeout=SOCKET_TIMEOUT)
        try:
            s.ehlo()
            auth = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
            code, text = s.docmd("AUTH", "PLAIN " + auth)
            assert code == 235, (code, text)
            return s.sendmail(ALICE, [rcpt], message)
        finally:
            try:
                s.quit()
            except (smtplib.SMTPException, OSError):
                s.close()

    def outgoing(self, rcpt: str, subject: str) -> bytes:
        return (
            f"From: Alice <{ALICE}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
            "Date: Mon, 01 Jan 2024 12:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}.{time.time_ns()}@example.test>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            "See you at noon.\r\n.leading dot\r\n"
        ).encode()

    async def relayed(self) -> Any:
        """Wait (bounded) until the relay handed the queued message to the remote MX."""
        self.clock.advance(0)
        for _ in range(int(WAIT / 0.05)):
            if self.remote.messages and not queue_records(self.config.data_dir):
                break
            idle = self.mail.relay.wait_idle()
            idle.addTimeout(WAIT, reactor)
            await idle
            await deferLater(reactor, 0.05, lambda: None)
            self.clock.advance(0)
        self.assertEqual(len(self.remote.messages), 1, "the remote MX got nothing")
        self.assertEqual(queue_records(self.config.data_dir), {})
        return self.remote.messages[0]

    def verify_with_dkimpy(self, content: bytes, expected: dict[str, str]) -> None:
        """Every signature verifies with dkimpy; `expected` is {selector: a=}."""
        sigs = signatures(content)
        self.assertEqual({s[b"s"].decode(): s[b"a"].decode() for s in sigs}, expected)
        self.assertEqual({s[b"d"] for s in sigs}, {b"example.test"})
        for s in sigs:
            self.assertEqual(s[b"c"], b"relaxed/relaxed")
            self.assertNotIn(b"l", s)
        d = dkim.DKIM(content)
        for idx in range(len(sigs)):
            self.assertTrue(d.verify(idx=idx, dnsfunc=self.dnsfunc), f"dkimpy: signature {idx} does not verify")
        # a change to the body breaks every signature
        broken = dkim.DKIM(content.replace(b"See you at noon.", b"See you at one."))
        for idx in range(len(sigs)):
            try:
                ok = broken.verify(idx=idx, dnsfunc=self.dnsfunc)
            except dkim.ValidationError:
                ok = False
            self.assertFalse(ok, f"dkimpy: signature {idx} survives a changed body")

    async def submit_and_relay(self, subject: str) -> Any:
        """alice submits a message to bob@remote.test; what the remote MX received."""
        await self.start()
        body = self.outgoing(REMOTE_RCPT, subject)
        self.assertEqual(await self.thread(self.submit, REMOTE_RCPT, body), {})
        stored = await self.relayed()
        self.assertTrue(stored.content.endswith(body.split(b"\r\n\r\n", 1)[1]), stored.content[-200:])
        return stored

    async def test_submitted_mail_verifies_at_the_remote_mx(self) -> None:
        stored = await self.submit_and_relay("relayed and signed")
        self.assertEqual((stored.sender, stored.rcpts), (ALICE, [REMOTE_RCPT]))
        content = stored.content
        self.assertIn(b"Subject: relayed and signed", content)
        # DKIM: both keys, checked by dkimpy
        self.verify_with_dkimpy(content, {"mxe": "ed25519-sha256", "mxr": "rsa-sha256"})
        # over-signed: an added From/Subject breaks them
        signed = signatures(content)
        for s in signed:
            h = s[b"h"].lower().split(b":")
            for name in (b"from", b"to", b"subject", b"date", b"message-id"):
                self.assertEqual(h.count(name), 2, (name, h))
        # SPF (from the address the remote saw) and DMARC, with mx's own code over real DNS
        [peer] = self.remote.peers
        [helo] = self.remote.helos
        self.assertEqual(peer, "127.0.0.1")

        def judge() -> tuple[Any, Any]:
            lookup = Lookup([("127.0.0.1", self.dns_port)], 1.0)
            spf = mspf.check_host(peer, "example.test", ALICE, helo=helo, lookup=lookup)
            results = [SimpleNamespace(result="pass", domain=s[b"d"].decode()) for s in signed]
            verdict = mdmarc.evaluate(mdmarc.from_domains(header_block(content)), spf.result, "example.test",
                                      results, lookup)
            return spf, verdict

        spf, verdict = await self.thread(judge)
        self.assertEqual(spf.result, "pass", spf)
        self.assertEqual((verdict.result, verdict.header_from, verdict.record_domain),
                         ("pass", "example.test", "example.test"), verdict)
        self.assertTrue(verdict.spf_aligned and verdict.dkim_aligned, verdict)

    async def test_relayed_mail_verifies_with_opendkim(self) -> None:
        """OpenDKIM, an independent verifier (`opendkim -t`, keys from its TestPublicKeys file)."""
        opendkim = shutil.which("opendkim") or shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")
        if opendkim is None:
            raise SkipTest("opendkim is not installed (Debian package opendkim; .ci/run installs it)")
        content = (await self.submit_and_relay("checked by opendkim")).content
        work = Path(self.mktemp())
        work.mkdir()
        (work / "keys").write_text("".join(f"{name} {value}\n" for name, value in self.keyzone.items()))
        (work / "opendkim.conf").write_text(
            f"Mode v\nSyslog no\nMinimumKeyBits 1024\nTestPublicKeys {work / 'keys'}\nTemporaryDirectory {work}\n")
        (work / "relayed.eml").write_bytes(content)
        (work / "changed.eml").write_bytes(content.replace(b"See you at noon.", b"See you at one."))

        def run(name: str) -> str:
            out = subprocess.run([opendkim, "-x", str(work / "opendkim.conf"), "-vv", "-t", str(work / name)],
                                 capture_output=True, text=True, timeout=60)
            self.assertEqual(out.returncode, 0, out.stderr)
            return out.stdout

        good = await self.thread(run, "relayed.eml")
        self.assertIn("dkim=pass (2048-bit key) header.d=example.test", good)
        self.assertRegex(good, r"dkim=pass [^;]*header\.a=rsa-sha256 header\.s=mxr")
        self.assertRegex(good, r"dkim=pass [^;]*header\.a=ed25519-sha256 header\.s=mxe")
        bad = await self.thread(run, "changed.eml")
        self.assertNotIn("dkim=pass", bad)

    async def test_key_created_while_running_is_used_after_reload_and_by_the_timer(self) -> None:
        await self.start(with_keys=False)

        async def submit_to_bob(subject: str) -> bytes:
            before = set(new_files(self.config, "bob"))
            self.assertEqual(await self.thread(self.submit, BOB, self.outgoing(BOB, subject)), {})
            [path] = set(new_files(self.config, "bob")) - before
            return path.read_bytes()

        self.assertEqual(signatures(await submit_to_bob("no key yet")), [])
        # SIGHUP's work, in-process
        self.new_key("new1", "ed25519")
        await self.mail.mailauth.reload_keys()
        content = await submit_to_bob("after reload")
        self.verify_with_dkimpy(content, {"new1": "ed25519-sha256"})
        # no SIGHUP: the periodic look at the key folder finds it within KEY_REFRESH seconds
        self.new_key("new2", "rsa")
        started = time.monotonic()
        for _ in range(int((KEY_REFRESH + 2.0) / 0.1)):
            if any(k.selector == "new2" for k in self.mail.mailauth.keys.keys_for("example.test")):
                break
            await deferLater(reactor, 0.1, lambda: None)
        waited = time.monotonic() - started
        self.assertLess(waited, KEY_REFRESH + 1.0, "the new key was not picked up by the timer")
        content = await submit_to_bob("after the timer")
        self.verify_with_dkimpy(content, {"new1": "ed25519-sha256", "new2": "rsa-sha256"})


# --- forwarding: an alias with a remote target, ARC-sealed on the way out -------------------------

FWD, FWD_TARGET = "fwd@example.test", "someone@remote.test"
_FIELD = re.compile(rb"([^\s:]+)[ \t]*:((?:[^\r\n]*\r\n)(?:[ \t][^\r\n]*\r\n)*)")


def header_fields(content: bytes) -> list[tuple[str, bytes]]:
    """The message's header fields in order: (lower-case name, raw value with its folds)."""
    return [(m.group(1).decode("ascii").lower(), m.group(2)) for m in _FIELD.finditer(header_block(content))]


def ar_results(value: bytes) -> tuple[str, list[tuple[str, str, str | None, list[tuple[str, str, str]]]]]:
    """(authserv-id, [(method, result, reason, [(ptype, property, value)])]) of an
    Authentication-Results value, as authres reads it."""
    parsed = authres.AuthenticationResultsHeader.parse(
        "Authentication-Results: " + " ".join(value.decode("utf-8").split()))
    return parsed.authserv_id, [
        (r.method, r.result, r.reason, sorted((p.type, p.name, p.value) for p in r.properties))
        for r in parsed.results
    ]


class ForwardingTests(MailAuthCase):
    """Inbound mail on the smtp port for an alias whose target is remote: relayed with our ARC set
    (RFC 8617) sealed with example.test's RSA key, checked at the remote MX with dkimpy."""

    # the key helpers of OutboundTests, on this class's own zone (self.zone, self.keyzone)
    new_key = OutboundTests.new_key
    dnsfunc = OutboundTests.dnsfunc
    relayed = OutboundTests.relayed

    async def start(self, *, with_key: bool) -> Any:
        self.dns_port, self.dns, self.zone = serve_zone(self, inbound_zone() + [
            ("remote.test", tdns.Record_MX(10, REMOTE_NAME.encode())),
            (REMOTE_NAME, tdns.Record_A(REMOTE_HOST)),
        ])
        # what dkimpy at the remote MX may look up: the sender's key and ours
        self.keyzone: dict[str, str] = {"sel1._domainkey.good.test": key_value("good")}
        self.relay_port = common_free_port((REMOTE_HOST,))
        extra = (f'[relay]\nport = {self.relay_port}\nretry = ["1m"]\n\n'
                 f'[dns]\nnameservers = ["127.0.0.1:{self.dns_port}"]\ntimeout = "1s"\n\n'
                 "[mailauth]\nskip_networks = []\n")
        self.config = make_config(self, listen={"smtp": "tcp:0:interface=127.0.0.1"},
                                  aliases={FWD: [FWD_TARGET]}, extra=extra)
        add_users(self.config, {ALICE: ALICE_PW})
        if with_key:
            self.new_key("arc1", "rsa")
        self.remote = start_remote_mx(self, REMOTE_HOST, self.relay_port, REMOTE_NAME,
                                      handler=RecordingHandler(REMOTE_HOST))
        self.clock = Clock()
        self.clock.advance(time.time())
        self.mail = await start_mail_service(self, self.config, clock=self.clock, timeouts=FAST)
        return self.mail

    async def forward(self, subject: str) -> tuple[bytes, bytes]:
        """news@good.test (SPF, DKIM and DMARC pass) writes to the alias; (the client's bytes,
        what the remote MX received)."""
        message = dkim_signed(compose("news@good.test", subject, to=FWD), "good.test", "sel1", "good")
        out = await self.thread(send, self.mail.smtp_port, "news@good.test", [FWD], message)
        self.assertEqual(out["mail"][0], 250, out)
        self.assertEqual([r[0] for r in out["rcpt"]], [250], out)
        self.assertEqual(out["data"][0], 250, out)
        stored = await self.relayed()
        self.assertEqual((stored.sender, stored.rcpts), ("news@good.test", [FWD_TARGET]))
        self.assertEqual(sorted(p for p in (self.config.data_dir / "mail").glob("**/new/*") if p.is_file()), [])
        content = stored.content
        self.assertTrue(content.endswith(message), content[-300:])  # the client's bytes, untouched
        # the sender's own signature still verifies at the remote (ARC headers are not DKIM-Signatures)
        self.assertTrue(dkim.verify(content, dnsfunc=self.dnsfunc), "good.test's DKIM signature broke")
        return message, content

    def our_results(self, fields: list[tuple[str, bytes]]) -> bytes:
        ours = [v for n, v in fields if n == "authentication-results" and ar_results(v)[0] == HOSTNAME]
        self.assertEqual(len(ours), 1, fields)
        return ours[0]

    async def test_forwarded_mail_is_arc_sealed_and_verifies_at_the_remote(self) -> None:
        await self.start(with_key=True)
        message, content = await self.forward("to be forwarded")
        fields = header_fields(content)
        added = [n for n, _v in fields[:len(fields) - len(header_fields(message))]]
        # ours on top of the client's header: trace, then the ARC set, then our results
        self.assertEqual(added[-4:], ["arc-seal", "arc-message-signature", "arc-authentication-results",
                                      "authentication-results"], added)
        self.assertEqual([n for n, _v in fields if n.startswith("arc-")],
                         ["arc-seal", "arc-message-signature", "arc-authentication-results"])
        values = {n: v for n, v in fields if n.startswith("arc-")}
        seal_tags = tags(values["arc-seal"])
        ams_tags = tags(values["arc-message-signature"])
        self.assertEqual((seal_tags[b"i"], seal_tags[b"d"], seal_tags[b"cv"], seal_tags[b"s"], seal_tags[b"a"]),
                         (b"1", b"example.test", b"none", b"arc1", b"rsa-sha256"), seal_tags)
        self.assertEqual((ams_tags[b"i"], ams_tags[b"d"], ams_tags[b"s"], ams_tags[b"a"]),
                         (b"1", b"example.test", b"arc1", b"rsa-sha256"), ams_tags)
        aar = values["arc-authentication-results"]
        m = re.match(rb"\s*i\s*=\s*1\s*;", aar)
        self.assertIsNotNone(m, aar)
        assert m is not None
        # what we sealed is what we found: the same results as our Authentication-Results
        header = self.our_results(fields)
        self.assertIn(b"spf=pass smtp.mailfrom=news@good.test", flat(header))
        self.assertIn(b"dkim=pass header.d=good.test", flat(header))
        self.assertIn(b"dmarc=pass", flat(header))
        sealed_id, sealed = ar_results(aar[m.end():])
        found_id, found = ar_results(header)
        self.assertEqual(sealed_id, HOSTNAME)
        for method in ("spf", "dkim", "dmarc"):
            self.assertEqual([r for r in sealed if r[0] == method], [r for r in found if r[0] == method], method)
            self.assertTrue([r for r in found if r[0] == method], method)
        self.assertEqual(sealed, found)
        # dkimpy, an independent verifier, with the key as published
        cv, results, reason = await self.thread(functools.partial(dkim.arc_verify, content, dnsfunc=self.dnsfunc))
        self.assertEqual(cv, dkim.CV_Pass, (reason, results))
        self.assertEqual([r["instance"] for r in results], [1], results)
        # and the seal covers the body: a changed message no longer passes
        changed = content.replace(b"Hello, this is a test message.", b"Hello, this is a changed message.")
        self.assertNotEqual(changed, content)
        cv, _results, reason = await self.thread(functools.partial(dkim.arc_verify, changed, dnsfunc=self.dnsfunc))
        self.assertEqual(cv, dkim.CV_Fail, reason)

    async def test_without_an_rsa_key_forwarded_mail_goes_unsealed(self) -> None:
        await self.start(with_key=False)
        self.assertEqual(self.mail.mailauth.keys.keys_for("example.test"), [])
        _message, content = await self.forward("forwarded without a key")
        fields = header_fields(content)
        self.assertEqual([n for n, _v in fields if n.startswith("arc-")], [], fields)
        header = self.our_results(fields)
        self.assertIn(b"spf=pass smtp.mailfrom=news@good.test", flat(header))
        self.assertIn(b"dmarc=pass", flat(header))
        cv, _results, _reason = await self.thread(functools.partial(dkim.arc_verify, content, dnsfunc=self.dnsfunc))
        self.assertEqual(cv, dkim.CV_None)


# --- the commands: mx dkim keygen, mx dns-records ------------------------------------------------


class CommandTests(MailAuthCase):
    LISTEN = {
        "smtp": "tcp:2525:interface=127.0.0.1",
        "submission": "tcp:2587:interface=127.0.0.1",
        "submissions": "tcp:2465:interface=127.0.0.1",
        "imap": "tcp:2143",
        "imaps": "tcp:2993:interface=::1",
        # pop3 and pop3s off
    }

    def setUp(self) -> None:
        self.path = write_config(self, listen=self.LISTEN)
        self.config = configmod.load(self.path)

    async def mx(self, *args: str) -> subprocess.CompletedProcess[str]:
        return await self.thread(run_mx, self.path, *args)

    async def keygen(self, selector: str, algorithm: str) -> tuple[str, list[str], Path]:
        result = await self.mx("dkim", "keygen", "Example.Test", "--selector", selector, "--algorithm", algorithm)
        self.assertEqual(result.returncode, 0, result)
        lines = result.stdout.splitlines()
        self.assertEqual(len(lines), 1, result.stdout)  # one zone-file line on stdout
        self.assertTrue(result.stdout.endswith("\n"))
        path = self.config.data_dir / "dkim" / "example.test" / f"{selector}.key"
        self.assertIn(str(path), result.stderr)
        name, strings = zone_line_strings(lines[0])
        self.assertEqual(name, f"{selector}._domainkey.example.test.")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(path.parent.stat().st_mode), 0o700)
        self.assertEqual(keys.load(path).algorithm, algorithm)
        self.assertEqual("".join(strings), keys.txt_value(path))  # the public half of that very key
        return lines[0], strings, path

    async def test_keygen_rsa_splits_the_record_at_255(self) -> None:
        line, strings, path = await self.keygen("r2026", "rsa")
        value = "".join(strings)
        self.assertTrue(value.startswith("v=DKIM1; k=rsa; p=MII"), value)
        self.assertGreater(len(value), 255)
        self.assertEqual([len(s) for s in strings[:-1]], [255] * (len(strings) - 1))
        self.assertTrue(0 < len(strings[-1]) <= 255)
        self.assertRegex(line, r'^r2026\._domainkey\.example\.test\. IN TXT "v=DKIM1; k=rsa; p=[^"]{237}" "[^"]+"$')
        self.assertIn(b"BEGIN RSA PRIVATE KEY", path.read_bytes())
        # the record verifies what the key signs (dkimpy, with the record as published)
        message = compose(ALICE, "signed by the generated key", to=BOB)
        sig = dkim.sign(message, b"r2026", b"example.test", path.read_bytes())
        self.assertTrue(dkim.verify(sig + message, dnsfunc=lambda name, timeout=5: value.encode()))

    async def test_keygen_ed25519_is_one_string(self) -> None:
        line, strings, _path = await self.keygen("e2026", "ed25519")
        self.assertEqual(len(strings), 1)
        self.assertRegex(line, r'^e2026\._domainkey\.example\.test\. IN TXT "v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}="$')

    async def test_keygen_never_replaces_a_key(self) -> None:
        _line, _strings, path = await self.keygen("once", "ed25519")
        before = path.read_bytes()
        result = await self.mx("dkim", "keygen", "example.test", "--selector", "once", "--algorithm", "rsa")
        self.assertNotEqual(result.returncode, 0, result)
        self.assertEqual(result.stdout, "")
        self.assertIn("exists", result.stderr)
        self.assertEqual(path.read_bytes(), before)

    async def test_dns_records_lists_every_record_with_the_configured_ports(self) -> None:
        ed_line, _s, _p = await self.keygen("mxe", "ed25519")
        rsa_line, _s, _p = await self.keygen("mxr", "rsa")
        result = await self.mx("dns-records", "example.test")
        self.assertEqual((result.returncode, result.stderr), (0, ""), result)
        host = HOSTNAME + "."
        self.assertEqual(result.stdout.splitlines(), [
            f"example.test. IN MX 10 {host}",
            'example.test. IN TXT "v=spf1 mx -all"',
            ed_line,
            rsa_line,
            f'_dmarc.example.test. IN TXT "v=DMARC1; p=quarantine; rua=mailto:{self.config.postmaster}"',
            f"_submissions._tcp.example.test. IN SRV 0 1 2465 {host}",
            f"_submission._tcp.example.test. IN SRV 0 1 2587 {host}",
            f"_imaps._tcp.example.test. IN SRV 0 1 2993 {host}",
            f"_imap._tcp.example.test. IN SRV 0 1 2143 {host}",
            "_pop3s._tcp.example.test. IN SRV 0 0 0 .",
            "_pop3._tcp.example.test. IN SRV 0 0 0 .",
        ])
        # every line is valid zone-file syntax for its type
        for line in result.stdout.splitlines():
            name, _in, rdtype, rest = line.split(" ", 3)
            self.assertTrue(name.endswith("."), line)
            dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.from_text(rdtype), rest)

    async def test_dns_records_without_keys_has_no_dkim_lines(self) -> None:
        result = await self.mx("dns-records", "example.test")
        self.assertEqual(result.returncode, 0, result)
        self.assertNotIn("_domainkey", result.stdout)
        self.assertEqual(len(result.stdout.splitlines()), 9)
