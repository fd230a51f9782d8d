"""IMAP FETCH (`mx.imap.fetch`): item plans, each item's answer, and Dovecot's answers as gold.

Golden answers: `tests/data/mime/*.eml` is a corpus of tricky messages (nested multiparts,
message/rfc822 inside a multipart and at the top, a digest, a missing close delimiter, a
multipart without boundary and one whose boundary never comes, encoded words, RFC 2231
continuations, raw 8-bit header fields, groups and routes, broken and repeated address
fields, an empty header, a header without end, bare LF line ends, a NUL, Content-Disposition
/ -Language / -Location / -MD5, mixed case). `tests/data/mime/record.py` (run by hand, see its
docstring) delivered each message byte for byte into a Maildir folder of its own, asked a
private Dovecot 2.3 (tests/dovecot.py) `FETCH 1 <items>` for every item list in its
`COMMANDS` through imaplib's connection, and wrote the raw untagged answers to
`tests/data/mime/golden/<name>.txt`. `GoldenTests` renders the same items from the same
octets and compares them item by item (Dovecot answers FLAGS, UID and RFC822.SIZE before
the rest; mx answers in the order asked), byte for byte within each item.

Where mx knowingly answers differently, `KNOWN` holds the Dovecot octets, mx's, and why;
the test checks that the difference is exactly that one (so the table cannot go stale).
Then table tests per item, partials and sections on inline messages, and hypothesis
properties: render never raises for arbitrary octets, and what it writes is a well-formed
FETCH response (every literal's length right, parentheses balanced).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mx import mime
from mx.imap import fetch
from mx.imap.fetch import (
    FetchError,
    FetchPlan,
    _parse_addresses,
    bodystructure,
    crlf_size,
    envelope,
    parse_items,
    render,
    section_bytes,
    with_uid,
)
from mx.imap.parse import Atom, Command, CommandReader, Number, ParenList, Quoted, Section

DATA = Path(__file__).resolve().parent / "data" / "mime"
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers -------------------------------------------------------------------------------


def plan_of(items: str) -> FetchPlan:
    """The plan for `FETCH 1 <items>` as mx.imap.parse reads the command."""
    reader = CommandReader()
    reader.receive_data(b"t FETCH 1 " + items.encode("utf-8") + b"\r\n")
    event = reader.next_event()
    assert isinstance(event, Command), event
    return parse_items(event.args[1:])


def golden(name: str) -> tuple[tuple[int, int], list[tuple[str, str, bytes]]]:
    """((internaldate, UTC offset in minutes), [(items, status, untagged octets)]) of a file."""
    raw = (DATA / "golden" / f"{name}.txt").read_bytes()
    date = re.search(rb"^# internaldate (\d+) (-?\d+)$", raw, re.M)
    assert date is not None
    records = []
    pos = raw.index(b">>> ")
    while pos < len(raw):
        nl = raw.index(b"\n", pos)
        items, status, size = raw[pos + 4:nl].decode("ascii").rsplit(" ", 2)
        records.append((items, status, raw[nl + 1:nl + 1 + int(size)]))
        pos = nl + 1 + int(size) + 1
    return (int(date.group(1)), int(date.group(2))), records


def _value_end(data: bytes, i: int) -> int:
    """The end of the one value (list, quoted, literal, atom) at data[i]."""
    c = data[i:i + 1]
    if c == b"(":
        i += 1
        while data[i:i + 1] != b")":
            i = _value_end(data, i)
            if data[i:i + 1] == b" ":
                i += 1
        return i + 1
    if c == b'"':
        m = re.compile(rb'"(?:[^"\\\r\n]|\\["\\])*"').match(data, i)
        assert m is not None, data[i:i + 40]
        return m.end()
    if c == b"{":
        m = re.compile(rb"\{(\d+)\}\r\n").match(data, i)
        assert m is not None, data[i:i + 40]
        return m.end() + int(m.group(1))
    m = re.compile(rb"[^ ()\r\n\"{]+").match(data, i)
    assert m is not None, data[i:i + 40]
    return m.end()


def fetch_items(response: bytes) -> list[tuple[bytes, bytes]]:
    """The (name, value) items of one `* n FETCH (...)` CRLF response; asserts its form."""
    m = re.match(rb"\* [1-9][0-9]* FETCH \(", response)
    assert m is not None, response[:60]
    items = []
    i = m.end()
    name_re = re.compile(rb"[A-Z0-9.]+(?:\[[^\]]*\](?:<[0-9]+>)?)? ")
    while True:
        n = name_re.match(response, i)
        assert n is not None, response[i:i + 60]
        end = _value_end(response, n.end())
        items.append((n.group()[:-1], response[n.end():end]))
        if response[end:end + 1] == b" ":
            i = end + 1
            continue
        assert response[end:] == b")\r\n", response[end:end + 40]
        return items


# -- golden answers from Dovecot -----------------------------------------------------------

# (message, items) -> (Dovecot's octets, mx's octets, why mx differs). Applied to the golden
# answer before comparing, and each must apply (the Dovecot octets must be there).
KNOWN: dict[tuple[str, str], list[tuple[bytes, bytes, str]]] = {}


def known(name: str, items: list[str], dovecot: bytes, mx: bytes, why: str) -> None:
    for item in items:
        KNOWN.setdefault((name, item), []).append((dovecot, mx, why))


_ALL_BODY = ["FULL", "BODYSTRUCTURE", "(ENVELOPE BODYSTRUCTURE BODY)", "(BODY ENVELOPE RFC822.SIZE)"]
_BODY = ["FULL", "(ENVELOPE BODYSTRUCTURE BODY)", "(BODY ENVELOPE RFC822.SIZE)"]
_STRUCTURE = ["BODYSTRUCTURE", "(ENVELOPE BODYSTRUCTURE BODY)"]
known("simple", ["FULL"], b'BODY ("TEXT" "PLAIN" ("CHARSET" "US-ASCII")',
      b'BODY ("text" "plain" ("charset" "us-ascii")',
      "Dovecot caches a plain 7-bit text/plain message as a flag and answers BODY/BODYSTRUCTURE in "
      "lower case from then on; only its very first parse (this FULL) shows the header's case. mx "
      "always answers the cached form.")
known("address-edge", ["FULL", "(ENVELOPE BODYSTRUCTURE BODY)", "(BODY ENVELOPE RFC822.SIZE)"],
      b'"unclosed" "SYNTAX_ERROR"', b'"unclosed" "example.org"',
      "`To: Name <unclosed@example.org` lacks its `>`: Dovecot marks the domain SYNTAX_ERROR, mx.mime "
      "reads the address it can see.")
known("header-only", ["BODY.PEEK[HEADER.FIELDS.NOT (from Subject Content-Type)]"], b"{0}\r\n", b"{2}\r\n\r\n",
      "A header without its empty line, all fields excluded: Dovecot's header filter then adds no "
      "empty line (it does for HEADER.FIELDS); mx always ends the answer with it (RFC 3501 §6.4.5).")
for _name in [p.stem for p in DATA.glob("*.eml")]:
    known(_name, ['BODY.PEEK[HEADER.FIELDS ("subject" TO cc)]<4.30>'], b'("SUBJECT" TO CC)', b"(SUBJECT TO CC)",
          "Dovecot echoes the header list as sent, quotes included; mx.imap.parse keeps the names, "
          "not how they were quoted, so mx answers them as atoms.")
_B64 = ("A base64-encoded message/rfc822 (RFC 2046 §5.2.1 forbids it): Dovecot parses the encoded "
        "text as a message anyway (its header line keeps its line end, so the part grows by CRLF "
        "and a line); mx.mime does not open it, and mx answers the part as stored with an empty "
        "envelope and body.")
known("rfc822-base64", _ALL_BODY, b'"base64" 30 ', b'"base64" 28 ', _B64)
known("rfc822-base64", _BODY, b'"7bit" 0 0) 1', b'"7bit" 0 0) 0', _B64)
known("rfc822-base64", _STRUCTURE, b'"7bit" 0 0 NIL NIL NIL NIL) 1', b'"7bit" 0 0 NIL NIL NIL NIL) 0', _B64)
known("rfc822-base64", ["BODY.PEEK[1]"], b"{30}\r\nU3ViamVjdDogaW5uZXIKCmJvZHkK\r\n",
      b"{28}\r\nU3ViamVjdDogaW5uZXIKCmJvZHkK", _B64)
known("rfc822-base64", ["BODY.PEEK[1.HEADER]", "BODY.PEEK[1.1.MIME]"], b"{28}\r\nU3ViamVjdDogaW5uZXIKCmJvZHkK",
      b"{0}\r\n", _B64)


def apply_known(name: str, items: str, answer: bytes) -> bytes:
    for dovecot, mx, why in KNOWN.get((name, items), []):
        assert dovecot in answer, f"{name} {items}: stale KNOWN entry ({why})"
        answer = answer.replace(dovecot, mx)
    return answer


class GoldenTests(SynchronousTestCase):
    def corpus(self) -> list[str]:
        names = sorted(p.stem for p in DATA.glob("*.eml"))
        self.assertGreaterEqual(len(names), 15)
        return names

    def test_every_message_has_its_golden_answers(self) -> None:
        for name in self.corpus():
            (_date, records) = golden(name)
            self.assertGreaterEqual(len(records), 40, name)
            self.assertTrue(all(status == "OK" for _i, status, _a in records), name)

    def test_answers_equal_dovecot(self) -> None:
        compared = 0
        for name in self.corpus():
            data = (DATA / f"{name}.eml").read_bytes()
            root = mime.scan(data)
            (when, offset), records = golden(name)
            seen = False
            for items, _status, answer in records:
                plan = plan_of(items)
                changed = plan.sets_seen and not seen  # Dovecot answers FLAGS when \Seen is set
                seen = seen or plan.sets_seen
                got = render(1, plan, uid=1, flags=["\\Seen", "\\Recent"] if seen else ["\\Recent"],
                             size=crlf_size(data), internaldate=when, data=data, root=root,
                             tz_offset_minutes=offset, flags_changed=changed)
                want = apply_known(name, items, answer)
                self.assertEqual(sorted(fetch_items(got)), sorted(fetch_items(want)), f"{name}: FETCH 1 {items}")
                compared += 1
        self.assertGreaterEqual(compared, 15 * 40)

    def test_order_is_the_order_asked(self) -> None:
        data = (DATA / "simple.eml").read_bytes()
        got = render(1, plan_of("(BODY ENVELOPE RFC822.SIZE)"), uid=1, flags=(), size=crlf_size(data),
                     internaldate=None, data=data, root=None)
        self.assertEqual([n for n, _v in fetch_items(got)], [b"BODY", b"ENVELOPE", b"RFC822.SIZE"])

    def test_corpus_kinds(self) -> None:
        """The corpus keeps the cases it was built for."""
        kinds = {name: mime.scan((DATA / f"{name}.eml").read_bytes()) for name in self.corpus()}
        self.assertIsNotNone(kinds["rfc822-in-multipart"].find("2").message)
        self.assertIsNotNone(kinds["rfc822-single"].message)
        self.assertEqual(kinds["no-boundary"].children, [])
        self.assertIn(b"\r\n", (DATA / "simple.eml").read_bytes())
        self.assertNotIn(b"\r", (DATA / "bare-lf.eml").read_bytes())
        self.assertTrue((DATA / "empty-header.eml").read_bytes().startswith(b"\r\n"))
        self.assertIn(b"\x00", (DATA / "whitespace.eml").read_bytes())


# -- plans ---------------------------------------------------------------------------------

PLANS = [
    ("FLAGS", ("FLAGS",), False, False, False),
    ("flags", ("FLAGS",), False, False, False),
    ("ALL", ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"), True, True, False),
    ("FAST", ("FLAGS", "INTERNALDATE", "RFC822.SIZE"), False, True, False),
    ("full", ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"), True, True, False),
    ("(UID FLAGS)", ("UID", "FLAGS"), False, False, False),
    ("(FLAGS FLAGS uid)", ("FLAGS", "UID"), False, False, False),
    ("RFC822.SIZE", ("RFC822.SIZE",), False, False, False),
    ("BODYSTRUCTURE", ("BODYSTRUCTURE",), True, False, False),
    ("RFC822.HEADER", ("RFC822.HEADER",), True, False, False),
    ("RFC822", ("RFC822",), True, False, True),
    ("RFC822.TEXT", ("RFC822.TEXT",), True, False, True),
    ("BODY[]", (Section("BODY"),), True, False, True),
    ("BODY.PEEK[1.2.MIME]", (Section("BODY.PEEK", (1, 2), "MIME"),), True, False, False),
    ("(FLAGS BODY.PEEK[HEADER.FIELDS (A b)]<0.10>)",
     ("FLAGS", Section("BODY.PEEK", (), "HEADER.FIELDS", ("A", "b"), (0, 10))), True, False, False),
    ("(BODY.PEEK[TEXT] BODY[1])", (Section("BODY.PEEK", (), "TEXT"), Section("BODY", (1,))), True, False, True),
]

BAD_ITEMS = [
    "()", "FOO", "(FLAGS FOO)", "(ALL)", "(FLAGS (UID))", "FLAGS UID", "BINARY[1]", "BINARY.PEEK[]",
    "BINARY.SIZE[1]", "MODSEQ", "(FLAGS) (CHANGEDSINCE 1)", '"FLAGS"', "1", "BODY.PEEK", "NIL",
]


class PlanTests(SynchronousTestCase):
    def test_plans(self) -> None:
        for text, items, needs_file, needs_date, sets_seen in PLANS:
            plan = plan_of(text)
            self.assertEqual(plan.items, items, text)
            self.assertEqual((plan.needs_file, plan.needs_date, plan.sets_seen, plan.uid),
                             (needs_file, needs_date, sets_seen, "UID" in items), text)

    def test_bad_items(self) -> None:
        for text in BAD_ITEMS:
            with self.assertRaises(FetchError, msg=text) as caught:
                plan_of(text)
            self.assertTrue(str(caught.exception), text)
        for args in [(), (Atom("FLAGS"), Atom("UID")), (Number(1),), (Quoted("FLAGS"),), (ParenList(()),)]:
            self.assertRaises(FetchError, parse_items, args)

    def test_with_uid(self) -> None:
        plan = with_uid(plan_of("(FLAGS RFC822.SIZE)"))
        self.assertEqual(plan.items, ("UID", "FLAGS", "RFC822.SIZE"))
        self.assertTrue(plan.uid)
        already = plan_of("(FLAGS UID)")
        self.assertIs(with_uid(already), already)
        self.assertEqual(with_uid(plan_of("BODY[]")).sets_seen, True)

    def test_plans_compare_by_items(self) -> None:
        self.assertEqual(plan_of("(FLAGS UID)"), plan_of("(flags uid)"))
        self.assertNotEqual(plan_of("(FLAGS UID)"), plan_of("(UID FLAGS)"))


# -- items ---------------------------------------------------------------------------------

MESSAGE = (b"From: A <a@example.org>\r\nSubject: Hi\r\nX-Folded: one\r\n two\r\nTo: b@example.org\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
           b"Subject: inner\r\nx-name: v\r\n\r\ninner body\r\n--b--\r\n")


def one(items: str, data: bytes = MESSAGE, **kw: object) -> bytes:
    args: dict[str, object] = {"uid": 7, "flags": ["\\Seen"], "size": crlf_size(data), "internaldate": 0.0,
                               "data": data, "root": None, "tz_offset_minutes": 0}
    args.update(kw)
    return render(3, plan_of(items), **args)  # type: ignore[arg-type]


RENDER = [
    ("FLAGS", b"* 3 FETCH (FLAGS (\\Seen))\r\n"),
    ("UID", b"* 3 FETCH (UID 7)\r\n"),
    ("(UID FLAGS RFC822.SIZE)", b"* 3 FETCH (UID 7 FLAGS (\\Seen) RFC822.SIZE %d)\r\n" % len(MESSAGE)),
    ("INTERNALDATE", b'* 3 FETCH (INTERNALDATE "01-Jan-1970 00:00:00 +0000")\r\n'),
    ("BODY[]<0.4>", b"* 3 FETCH (BODY[]<0> {4}\r\nFrom)\r\n"),
    ("BODY.PEEK[]<2.3>", b"* 3 FETCH (BODY[]<2> {3}\r\nom:)\r\n"),
    ("BODY.PEEK[]<99999.3>", b"* 3 FETCH (BODY[]<99999> {0}\r\n)\r\n"),
    ("BODY.PEEK[1]<3.100>", b"* 3 FETCH (BODY[1]<3> {2}\r\nst)\r\n"),
    ("BODY.PEEK[1]", b"* 3 FETCH (BODY[1] {5}\r\nfirst)\r\n"),
    ("BODY.PEEK[1.1]", b"* 3 FETCH (BODY[1.1] {5}\r\nfirst)\r\n"),  # a leaf is its own part 1
    ("BODY.PEEK[1.2]", b"* 3 FETCH (BODY[1.2] {0}\r\n)\r\n"),
    ("BODY.PEEK[1.MIME]", b"* 3 FETCH (BODY[1.MIME] {28}\r\nContent-Type: text/plain\r\n\r\n)\r\n"),
    ("BODY.PEEK[1.HEADER]", b"* 3 FETCH (BODY[1.HEADER] {0}\r\n)\r\n"),  # no message: nothing
    ("BODY.PEEK[2.HEADER]", b"* 3 FETCH (BODY[2.HEADER] {29}\r\nSubject: inner\r\nx-name: v\r\n\r\n)\r\n"),
    ("BODY.PEEK[2.TEXT]", b"* 3 FETCH (BODY[2.TEXT] {10}\r\ninner body)\r\n"),
    ("BODY.PEEK[2.1]", b"* 3 FETCH (BODY[2.1] {10}\r\ninner body)\r\n"),
    ("BODY.PEEK[2.HEADER.FIELDS (X-NAME)]",
     b"* 3 FETCH (BODY[2.HEADER.FIELDS (X-NAME)] {13}\r\nx-name: v\r\n\r\n)\r\n"),
    ("BODY.PEEK[3]", b"* 3 FETCH (BODY[3] {0}\r\n)\r\n"),
    ("BODY.PEEK[HEADER.FIELDS (x-folded subject)]",
     b"* 3 FETCH (BODY[HEADER.FIELDS (X-FOLDED SUBJECT)] {36}\r\nSubject: Hi\r\nX-Folded: one\r\n two\r\n\r\n)\r\n"),
    ("BODY.PEEK[HEADER.FIELDS.NOT (From Subject x-folded To Content-Type)]",
     b"* 3 FETCH (BODY[HEADER.FIELDS.NOT (FROM SUBJECT X-FOLDED TO CONTENT-TYPE)] {21}\r\n"
     b"MIME-Version: 1.0\r\n\r\n)\r\n"),
    ("BODY.PEEK[HEADER.FIELDS (Subject)]<3.5>", b"* 3 FETCH (BODY[HEADER.FIELDS (SUBJECT)]<3> {5}\r\nject:)\r\n"),
    ("RFC822.HEADER", b"* 3 FETCH (RFC822.HEADER {%d}\r\n%s)\r\n" % (MESSAGE.index(b"\r\n\r\n") + 4,
                                                                    MESSAGE[:MESSAGE.index(b"\r\n\r\n") + 4])),
    ("RFC822.TEXT", b"* 3 FETCH (RFC822.TEXT {%d}\r\n%s)\r\n" % (len(MESSAGE) - MESSAGE.index(b"\r\n\r\n") - 4,
                                                                MESSAGE[MESSAGE.index(b"\r\n\r\n") + 4:])),
    ("RFC822", b"* 3 FETCH (RFC822 {%d}\r\n%s)\r\n" % (len(MESSAGE), MESSAGE)),
]


class RenderTests(SynchronousTestCase):
    def test_items(self) -> None:
        for items, expected in RENDER:
            self.assertEqual(one(items), expected, items)

    def test_flags_only_needs_no_message(self) -> None:
        self.assertEqual(render(1, plan_of("(UID FLAGS)"), uid=5, flags=["\\Answered", "$Label1"], size=0,
                                internaldate=None, data=None, root=None),
                         b"* 1 FETCH (UID 5 FLAGS (\\Answered $Label1))\r\n")
        self.assertEqual(render(2, plan_of("FLAGS"), uid=5, flags=(), size=0, internaldate=None, data=None,
                                root=None), b"* 2 FETCH (FLAGS ())\r\n")

    def test_needs_file_without_data(self) -> None:
        self.assertRaises(ValueError, render, 1, plan_of("ENVELOPE"), uid=1, flags=(), size=0,
                          internaldate=None, data=None, root=None)

    def test_flags_changed_answers_flags_first(self) -> None:
        self.assertEqual(one("BODY[1]", flags_changed=True), b"* 3 FETCH (FLAGS (\\Seen) BODY[1] {5}\r\nfirst)\r\n")
        self.assertEqual(one("(BODY[1] FLAGS)", flags_changed=True),
                         b"* 3 FETCH (BODY[1] {5}\r\nfirst FLAGS (\\Seen))\r\n")

    def test_internaldate(self) -> None:
        when = 1546300800 + 3600 * 13 + 61  # 2019-01-01 13:01:01 UTC
        for tz, text in [(0, b"01-Jan-2019 13:01:01 +0000"), (-300, b"01-Jan-2019 08:01:01 -0500"),
                         (330, b"01-Jan-2019 18:31:01 +0530"), (-660, b"01-Jan-2019 02:01:01 -1100"),
                         (-840, b"31-Dec-2018 23:01:01 -1400")]:
            self.assertEqual(one("INTERNALDATE", internaldate=when + 0.9, tz_offset_minutes=tz),
                             b'* 3 FETCH (INTERNALDATE "%s")\r\n' % text, tz)
        local = one("INTERNALDATE", internaldate=when, tz_offset_minutes=None)
        expect = time.strftime("%d-%b-%Y %H:%M:%S %z", time.localtime(when)).encode()
        self.assertEqual(local, b'* 3 FETCH (INTERNALDATE "%s")\r\n' % expect)
        self.assertRaises(ValueError, one, "INTERNALDATE", internaldate=None)

    def test_bare_lf_goes_out_as_crlf(self) -> None:
        data = MESSAGE.replace(b"\r\n", b"\n")
        self.assertEqual(crlf_size(data), len(MESSAGE))
        self.assertEqual(one("BODY.PEEK[]", data=data), one("BODY.PEEK[]"))
        self.assertEqual(one("BODY.PEEK[TEXT]<1.9>", data=data), one("BODY.PEEK[TEXT]<1.9>"))
        self.assertEqual(one("BODYSTRUCTURE", data=data), one("BODYSTRUCTURE"))
        mixed = b"Subject: x\n\r\na\nb\r\nc"
        self.assertEqual(section_bytes(mixed, mime.scan(mixed), Section("BODY")), b"Subject: x\r\n\r\na\r\nb\r\nc")
        self.assertEqual(crlf_size(mixed), len(mixed) + 2)

    def test_nul_goes_out_as_0x80(self) -> None:
        data = b"Subject: a\x00b\r\n\r\nx\x00y"
        self.assertEqual(one("BODY.PEEK[]", data=data), b"* 3 FETCH (BODY[] {19}\r\nSubject: a\x80b\r\n\r\nx\x80y)\r\n")
        self.assertIn(b'{3}\r\na\x80b', one("ENVELOPE", data=data))

    def test_section_bytes(self) -> None:
        root = mime.scan(MESSAGE)
        self.assertIsNone(section_bytes(MESSAGE, root, Section("BODY", (4,))))
        self.assertIsNone(section_bytes(MESSAGE, root, Section("BODY", (1,), "TEXT")))
        self.assertIsNone(section_bytes(MESSAGE, root, Section("BODY", (1, 1, 1))))
        self.assertEqual(section_bytes(MESSAGE, root, Section("BODY", (2,), "MIME")),
                         b"Content-Type: message/rfc822\r\n\r\n")
        self.assertEqual(section_bytes(MESSAGE, root, Section("BODY", (2,))), b"Subject: inner\r\nx-name: v\r\n\r\n"
                         b"inner body")
        self.assertEqual(section_bytes(MESSAGE, root, Section("BODY", (), "HEADER.FIELDS", ("NOPE",))), b"\r\n")
        # the partial is render's: section_bytes answers the whole section
        self.assertEqual(section_bytes(MESSAGE, root, Section("BODY", (1,), partial=(1, 2))), b"first")

    def test_header_fields_without_line_end(self) -> None:
        data = b"From: a@b\r\nSubject: last"
        root = mime.scan(data)
        self.assertEqual(section_bytes(data, root, Section("BODY", (), "HEADER.FIELDS", ("subject",))),
                         b"Subject: last\r\n\r\n")
        self.assertEqual(section_bytes(data, root, Section("BODY", (), "HEADER")), data)


ENVELOPES = [
    (b"", b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"),
    (b"From: A <a@x.org>\r\n",
     b'(NIL NIL (("A" NIL "a" "x.org")) (("A" NIL "a" "x.org")) (("A" NIL "a" "x.org")) NIL NIL NIL NIL NIL)'),
    (b"From: a@x.org\r\nSender: s@x.org\r\nReply-To: r@x.org\r\n",
     b'(NIL NIL ((NIL NIL "a" "x.org")) ((NIL NIL "s" "x.org")) ((NIL NIL "r" "x.org")) NIL NIL NIL NIL NIL)'),
    (b"To: g: a@x.org, b@y.org;, c@z.org\r\n",
     b'(NIL NIL NIL NIL NIL ((NIL NIL "g" NIL)(NIL NIL "a" "x.org")(NIL NIL "b" "y.org")(NIL NIL NIL NIL)'
     b'(NIL NIL "c" "z.org")) NIL NIL NIL NIL)'),
    (b"Subject: say \"a\"\r\n", b'(NIL {7}\r\nsay "a" NIL NIL NIL NIL NIL NIL NIL NIL)'),
    (b"Subject: \r\n", b'(NIL "" NIL NIL NIL NIL NIL NIL NIL NIL)'),
    (b"Message-ID: <a\\b\"c@x>\r\n", b'(NIL NIL NIL NIL NIL NIL NIL NIL NIL "<a\\\\b\\"c@x>")'),
    (b'Message-ID: <"""""@x>\r\n', b'(NIL NIL NIL NIL NIL NIL NIL NIL NIL {9}\r\n<"""""@x>)'),
    (b"Date: Mon,\r\n 1 Jan\r\n", b'("Mon, 1 Jan" NIL NIL NIL NIL NIL NIL NIL NIL NIL)'),
    (b"In-Reply-To: \xc3\xa9\r\n", b"(NIL NIL NIL NIL NIL NIL NIL NIL {2}\r\n\xc3\xa9 NIL)"),
    (b"Cc: (c) a@x.org, b@x.org (Bee)\r\n",
     b'(NIL NIL NIL NIL NIL NIL ((NIL NIL "a" "x.org")("Bee" NIL "b" "x.org")) NIL NIL NIL)'),
    (b"Bcc: <@r1,@r2:u@h>, \"q u\"@h, @h2, u2\r\n",
     b'(NIL NIL NIL NIL NIL NIL NIL ((NIL "@r1,@r2" "u" "h")(NIL NIL "q u" "h")(NIL NIL "MISSING_MAILBOX" "h2")'
     b'(NIL NIL "u2" "MISSING_DOMAIN")) NIL NIL)'),
]


class EnvelopeTests(SynchronousTestCase):
    def test_envelopes(self) -> None:
        for header, expected in ENVELOPES:
            data = header + b"\r\nbody"
            self.assertEqual(envelope(data, mime.scan(data)), expected, header)

    def test_embedded_message(self) -> None:
        root = mime.scan(MESSAGE)
        self.assertEqual(envelope(MESSAGE, root.find("2").message), b'(NIL "inner" NIL NIL NIL NIL NIL NIL NIL NIL)')


HEADER_PIECES = [b"From:", b"from :", b"To:", b"cc:", b"Subject:", b"subject\t:", b"Date: ", b"In-Reply-To:",
                 b"Message-ID:", b"Sender:", b"Reply-To:", b"BCC:", b"X-To:", b"Top:", b"to-x:", b" ", b"\t",
                 b"\r\n", b"\n", b"\r", b"a@b", b"x", b":", b"\x00", b"\xc3\xa9", b"Received: by x"]


def envelope_fields_by_walk(data: bytes, part: mime.Part) -> tuple[list[bytes | None], dict[int, list[bytes]]]:
    """The reference for fetch.envelope_fields: every line walked by fetch._fields."""
    strings: list[bytes | None] = [None] * 10
    lists: dict[int, list[bytes]] = {}
    for name, _s, v, end in fetch._fields(data, part.offset, part.body_offset):
        if name in fetch._STRING_FIELDS:
            strings[fetch._STRING_FIELDS[name]] = fetch._value(data, v, end)
        elif name in fetch._ADDRESS_FIELDS:
            lists.setdefault(fetch._ADDRESS_FIELDS[name], []).append(fetch._value(data, v, end))
    return strings, lists


class EnvelopeFieldTests(SynchronousTestCase):
    """ENVELOPE finds its fields by one regex; it must find what walking every line finds."""

    def check(self, header: bytes) -> None:
        for data in (header, header + b"\r\n\r\nbody", header + b"\n\nbody"):
            root = mime.scan(data)
            self.assertEqual(fetch.envelope_fields(data, root), envelope_fields_by_walk(data, root), data)
            self.assertEqual(envelope(data, root), envelope(data, root))  # the address list cache

    def test_cases(self) -> None:
        for header, _expected in ENVELOPES:
            self.check(header)
        self.check(b"From: a@b\r\n  continued\r\nTo: c@d")
        self.check(b" To: c@d\r\nFrom: x@y")  # a first line of white space is no field
        self.check(b"junk\r\n To: c@d")  # continues a line that is no field

    def test_seeded_headers(self) -> None:
        import random
        rng = random.Random(822)
        for _ in range(5000):
            self.check(b"".join(rng.choice(HEADER_PIECES) for _ in range(rng.randrange(16))))

    @PROPERTY
    @given(st.lists(st.sampled_from(HEADER_PIECES), max_size=24))
    def test_random_headers(self, pieces: list[bytes]) -> None:
        self.check(b"".join(pieces))

    def test_embedded_message(self) -> None:
        part = mime.scan(MESSAGE).find("2").message
        self.assertEqual(fetch.envelope_fields(MESSAGE, part), envelope_fields_by_walk(MESSAGE, part))


STRUCTURES = [
    # (header and body, BODYSTRUCTURE, BODY)
    (b"\r\nab\r\nc", b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 1 NIL NIL NIL NIL)',
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 1)'),
    (b"Content-Type: Text/HTML\r\n\r\n<p>",
     b'("Text" "HTML" ("charset" "us-ascii") NIL NIL "7bit" 3 0 NIL NIL NIL NIL)',
     b'("Text" "HTML" ("charset" "us-ascii") NIL NIL "7bit" 3 0)'),
    (b"Content-Type: image/png; name=a.png\r\nContent-Transfer-Encoding: base64\r\n\r\nAAAA",
     b'("image" "png" ("name" "a.png") NIL NIL "base64" 4 NIL NIL NIL NIL)',
     b'("image" "png" ("name" "a.png") NIL NIL "base64" 4)'),
    (b"Content-Type: application/x; a*0=one; a*1=two; b*=utf-8''%41; c*0*=x'y'%42; c*1=z\r\n\r\n",
     b'("application" "x" ("a" "onetwo" "b*" "utf-8\'\'%41" "c*" "x\'y\'%42z") NIL NIL "7bit" 0 NIL NIL NIL NIL)',
     None),
    (b"Content-Type: application/x; a*0=one; a*2=two\r\n\r\n",
     b'("application" "x" ("a*0" "one" "a*2" "two") NIL NIL "7bit" 0 NIL NIL NIL NIL)', None),
    (b"Content-Type: text/plain; charset=utf-8\r\nContent-Disposition: attachment; filename=\"a b\"\r\n"
     b"Content-Language: en, de\r\nContent-Location: x.txt\r\nContent-MD5: abc\r\nContent-ID: <i>\r\n"
     b"Content-Description: d\r\n\r\nx",
     b'("text" "plain" ("charset" "utf-8") "<i>" "d" "7bit" 1 0 "abc" ("attachment" ("filename" "a b")) '
     b'("en" "de") "x.txt")', b'("text" "plain" ("charset" "utf-8") "<i>" "d" "7bit" 1 0)'),
    (b"Content-Type: multipart/mixed\r\n\r\nno parts",
     b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" NIL NIL NIL NIL)',
     b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")'),
    (b"Content-Type: message/rfc822\r\n\r\nSubject: s\r\n\r\nb\r\n",
     b'("message" "rfc822" NIL NIL NIL "7bit" 17 (NIL "s" NIL NIL NIL NIL NIL NIL NIL NIL) '
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 1 NIL NIL NIL NIL) 3 NIL NIL NIL NIL)',
     b'("message" "rfc822" NIL NIL NIL "7bit" 17 (NIL "s" NIL NIL NIL NIL NIL NIL NIL NIL) '
     b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 1) 3)'),
    (b"Content-Type: text/plain; x=\"\xc3\xa9\"\r\n\r\n",
     b'("text" "plain" ("x" {2}\r\n\xc3\xa9 "charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)', None),
    (b"Content-Type: text\r\nContent-Transfer-Encoding: 8bit junk\r\n\r\nx",
     b'("text" "" ("charset" "us-ascii") NIL NIL "7bit" 1 0 NIL NIL NIL NIL)', None),
]


class StructureTests(SynchronousTestCase):
    def test_structures(self) -> None:
        for data, extended, plain in STRUCTURES:
            root = mime.scan(data)
            self.assertEqual(bodystructure(data, root), extended, data)
            if plain is not None:
                self.assertEqual(bodystructure(data, root, extended=False), plain, data)

    def test_nested_close_delimiter_keeps_its_line_end(self) -> None:
        """Dovecot's part ends: `--in--` CRLF `--out`: the inner multipart keeps the CRLF."""
        data = (b"Content-Type: multipart/mixed; boundary=out\r\n\r\n--out\r\n"
                b"Content-Type: multipart/alternative; boundary=in\r\n\r\n--in\r\n\r\nx\r\n--in--\r\n--out--\r\n")
        root = mime.scan(data)
        self.assertEqual(section_bytes(data, root, Section("BODY", (1,))), b"--in\r\n\r\nx\r\n--in--\r\n")
        self.assertEqual(root.find("1").end, data.index(b"--in--") + 6)  # mx.mime keeps RFC 2046's end
        self.assertIn(b'"alternative"', bodystructure(data, root, extended=False))


# -- properties ----------------------------------------------------------------------------

EVERYTHING = plan_of("(UID FLAGS INTERNALDATE RFC822.SIZE ENVELOPE BODY BODYSTRUCTURE RFC822 RFC822.HEADER "
                     "RFC822.TEXT BODY.PEEK[1.MIME] BODY[2.1]<1.20> BODY[1.HEADER] BODY[TEXT]<3.5> "
                     "BODY[HEADER.FIELDS (Subject From)] BODY[2.HEADER.FIELDS.NOT (To)] BODY[1.1.1]<0.1>)")
PIECES = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b";", b"=", b"\"", b"\\", b"(", b")", b"<", b">", b"@", b",",
          b"--b", b"--b--", b"\x00", b"\xff", b"\xc3\xa9", b"Content-Type: multipart/mixed; boundary=b",
          b"Content-Type: message/rfc822", b"Content-Type: text/plain; a*0*=x; a*1=y",
          b"Content-Disposition: inline; filename=", b"From: ", b"To: g: a@b;", b"Subject: ", b"=?utf-8?q?x?=",
          b"Content-Language: en,", b"Content-Transfer-Encoding: base64", b"x", b"a@b"]


def check_well_formed(case: SynchronousTestCase, data: bytes) -> None:
    root = mime.scan(data)
    out = render(9, EVERYTHING, uid=1, flags=["\\Seen"], size=crlf_size(data), internaldate=0, data=data,
                 root=root, tz_offset_minutes=0)
    names = [name for name, _v in fetch_items(out)]
    case.assertEqual(len(names), len(EVERYTHING.items))
    for literal in re.finditer(rb"\{(\d+)\}\r\n", out):
        case.assertNotIn(b"\x00", out[literal.end():literal.end() + int(literal.group(1))])


ADDRESS_PIECES = [b"a", b"b.c", b"@", b"<", b">", b",", b" ", b"\t", b"\r\n", b'"', b".", b"\x0b", b"\xc3\xa9",
                  b"=?", b"Name", b"(", b")", b":", b";", b"\\", b"[", b"]"]


class AddressFastPathTests(SynchronousTestCase):
    """fetch reads common address lists with one regex; it must agree with mx.mime's parser."""

    CASES = [b"a@b", b"Name <a@b>", b'"Smith, John" <j@x>, <b@y>', b" , a@b ,, c@d, ", b'"  Sp\tN  " <s@x>',
             b"John Q. Public <j@x>", b"a b@c", b"=?utf-8?q?x?= <a@b>", b"\xc3\xa9 <a@b>", b'"" <e@x>',
             b"x\x0b <a@b>", b"a@b@c", b"<a@b> x", b"", b"g: a@b;", b"a@b (c)", b'"a\\"b" <c@d>']

    def test_cases(self) -> None:
        for value in self.CASES:
            self.assertEqual(_parse_addresses(value), mime.parse_addresses(value), value)

    def test_seeded_lists(self) -> None:
        import random
        rng = random.Random(5322)
        for _ in range(20_000):
            value = b"".join(rng.choice(ADDRESS_PIECES) for _ in range(rng.randrange(14)))
            self.assertEqual(_parse_addresses(value), mime.parse_addresses(value), value)

    @PROPERTY
    @given(st.lists(st.sampled_from(ADDRESS_PIECES), max_size=20))
    def test_random_lists(self, pieces: list[bytes]) -> None:
        value = b"".join(pieces)
        self.assertEqual(_parse_addresses(value), mime.parse_addresses(value), value)


class PropertyTests(SynchronousTestCase):
    def test_seeded_soup(self) -> None:
        import random
        rng = random.Random(3501)
        for _ in range(400):
            check_well_formed(self, b"".join(rng.choice(PIECES) for _ in range(rng.randrange(60))))

    def test_mutated_corpus(self) -> None:
        """The golden corpus with octets cut, repeated and inserted: near-miss MIME."""
        import random
        rng = random.Random(2046)
        files = [p.read_bytes() for p in sorted(DATA.glob("*.eml"))]
        for _ in range(300):
            data = bytearray(rng.choice(files))
            for _ in range(rng.randrange(1, 6)):
                pos = rng.randrange(len(data) + 1)
                kind = rng.randrange(3)
                if kind == 0:
                    del data[pos:pos + rng.randrange(1, 20)]
                elif kind == 1:
                    data[pos:pos] = rng.choice(PIECES)
                else:
                    data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
            check_well_formed(self, bytes(data))

    @PROPERTY
    @given(st.binary(max_size=400))
    def test_arbitrary_octets(self, data: bytes) -> None:
        check_well_formed(self, data)

    @PROPERTY
    @given(st.lists(st.sampled_from(PIECES), max_size=80))
    def test_mime_like_soup(self, pieces: list[bytes]) -> None:
        check_well_formed(self, b"".join(pieces))


class SpeedTests(SynchronousTestCase):
    """Generous bounds (10x what a laptop does), so only a gross slowdown fails."""

    def test_flags_only_is_cheap(self) -> None:
        plan = with_uid(plan_of("FLAGS"))
        flags = ["\\Seen", "\\Answered"]
        start = time.perf_counter()
        for seq in range(1, 10_001):
            render(seq, plan, uid=seq, flags=flags, size=0, internaldate=None, data=None, root=None)
        self.assertLess(time.perf_counter() - start, 0.5)

    def test_envelope_for_many(self) -> None:
        data = (DATA / "nested.eml").read_bytes()
        root = mime.scan(data)
        plan = plan_of("(UID ENVELOPE)")
        start = time.perf_counter()
        for seq in range(1, 10_001):
            render(seq, plan, uid=seq, flags=(), size=0, internaldate=None, data=data, root=root)
        self.assertLess(time.perf_counter() - start, 5.0)




class CrlfCleanTests(SynchronousTestCase):
    """`crlf_clean` (the name's ,W= equals its size) skips the bare-LF scan of BODY[] only."""

    def test_same_bytes_as_the_scan_for_a_clean_message(self) -> None:
        data = b"Subject: x\r\n\r\nhi\x00there\r\n"
        for items in ("BODY.PEEK[]", "BODY.PEEK[]<2.5>", "BODY.PEEK[TEXT]", "RFC822"):
            plan = plan_of(items)
            args = dict(uid=1, flags=(), size=len(data), internaldate=None, data=data, root=None)
            self.assertEqual(render(1, plan, **args, crlf_clean=True), render(1, plan, **args))  # type: ignore[arg-type]
        self.assertIn(b"hi\x80there", render(1, plan_of("BODY.PEEK[]"), uid=1, flags=(), size=len(data),
                                             internaldate=None, data=data, root=None, crlf_clean=True))
