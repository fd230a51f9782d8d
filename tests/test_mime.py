"""The byte-level MIME scanner (`mx.mime`): part trees, offsets, fields, words, addresses.

Table-driven with small messages written inline. Every scanned message also goes through
`check_offsets`, which holds every part to data[body_offset:end] being its body and
data[offset:body_offset] its header. Realistic messages are compared with the stdlib
`email` parser (policy.default) as an independent oracle on content types, parameters,
part counts and leaf bodies. Random MIME trees (a seeded stdlib generator always; hypothesis
too when it is importable) scan back to the structure they were built from, and random byte
soup never raises.
"""

from __future__ import annotations

import base64
import email
import email.header
import email.policy
import io
import random
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from mx import mime
from mx.mime import Address, Group, decode_words, envelope_fields, headers, parse_addresses, parse_params, scan

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:  # another engineer adds it to the venv; the property tests skip until then
    hypothesis = None


def check_offsets(case: SynchronousTestCase, data: bytes, root: mime.Part) -> None:
    """Offsets are consistent and inside the message for every part."""
    case.assertEqual(root.offset, 0)
    for part in root.walk():
        case.assertLessEqual(0, part.offset)
        case.assertEqual(part.offset + part.header_size, part.body_offset)
        case.assertLessEqual(part.end, len(data))
        header = data[part.offset:part.body_offset]
        if part.body_size:
            case.assertTrue(header.endswith(b"\n") or header == b"", (part.section, header))
        body = data[part.body_offset:part.end]
        lines = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
        case.assertEqual(part.body_lines, lines)
        for child in part.children:
            case.assertLessEqual(part.body_offset, child.offset)
            case.assertLessEqual(child.end, part.end)
        if part.message is not None:
            case.assertEqual(part.message.offset, part.body_offset)
            case.assertEqual(part.message.end, part.end)


def tree(data: bytes, root: mime.Part) -> tuple:
    """(section, content type, body or children) for the whole tree, for comparisons."""
    def one(p: mime.Part) -> tuple:
        if p.children:
            return (p.section, p.content_type, [one(c) for c in p.children])
        if p.message is not None:
            return (p.section, p.content_type, one(p.message))
        return (p.section, p.content_type, data[p.body_offset:p.end])
    return one(root)


def crlf(text: bytes) -> bytes:
    return text.replace(b"\n", b"\r\n")


SIMPLE = b"Subject: hi\n\nline 1\nline 2\n"
MIXED = b"""\
Content-Type: multipart/mixed; boundary="XX"

preamble
--XX
Content-Type: text/plain

one
--XX

two (no header)
--XX--
epilogue
"""

STRUCTURE_CASES = [
    # name, message, expected tree
    ("simple LF", SIMPLE, ("", "text/plain", b"line 1\nline 2\n")),
    ("simple CRLF", crlf(SIMPLE), ("", "text/plain", b"line 1\r\nline 2\r\n")),
    ("empty message", b"", ("", "text/plain", b"")),
    ("no blank line: all header", b"Subject: x\r\nFrom: a@b\r\n", ("", "text/plain", b"")),
    ("no blank line, no final line end", b"Subject: x", ("", "text/plain", b"")),
    ("empty header", b"\r\nbody only\r\n", ("", "text/plain", b"body only\r\n")),
    ("empty header LF", b"\nbody", ("", "text/plain", b"body")),
    ("NUL bytes", b"Subject: a\x00b\n\nx\x00\x00y\n", ("", "text/plain", b"x\x00\x00y\n")),
    ("multipart LF, preamble and epilogue", MIXED,
     ("", "multipart/mixed", [("1", "text/plain", b"one"), ("2", "text/plain", b"two (no header)")])),
    ("multipart CRLF", crlf(MIXED),
     ("", "multipart/mixed", [("1", "text/plain", b"one"), ("2", "text/plain", b"two (no header)")])),
    ("missing final boundary",
     b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\na\n--b\n\nb tail\n",
     ("", "multipart/mixed", [("1", "text/plain", b"a"), ("2", "text/plain", b"b tail\n")])),
    ("boundary never found: leaf",
     b"Content-Type: multipart/mixed; boundary=zz\n\n--b\n\na\n",
     ("", "multipart/mixed", b"--b\n\na\n")),
    ("no boundary parameter: leaf",
     b"Content-Type: multipart/mixed\n\n--b\n\na\n", ("", "multipart/mixed", b"--b\n\na\n")),
    ("empty boundary parameter: leaf",
     b'Content-Type: multipart/mixed; boundary=""\n\n--\n\na\n', ("", "multipart/mixed", b"--\n\na\n")),
    ("only a close delimiter: leaf",
     b"Content-Type: multipart/mixed; boundary=b\n\n--b--\n", ("", "multipart/mixed", b"--b--\n")),
    ("delimiter at body start, empty parts",
     b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n--b\r\n\r\n--b--",
     ("", "multipart/mixed", [("1", "text/plain", b""), ("2", "text/plain", b"")])),
    ("padding after delimiters, prefix and mid-line lookalikes",
     b"Content-Type: multipart/mixed; boundary=b\n\n--b \t\n\nx --b\n--bb\n--b-\n--b\n\ny\n--b-- \n",
     ("", "multipart/mixed", [("1", "text/plain", b"x --b\n--bb\n--b-"), ("2", "text/plain", b"y")])),
    ("mixed line ends", b"Content-Type: multipart/mixed; boundary=b\r\n\n--b\n\r\nA\r\n--b\r\n\nB\n--b--\n",
     ("", "multipart/mixed", [("1", "text/plain", b"A"), ("2", "text/plain", b"B")])),
    ("boundary with spaces, quoted",
     b'Content-Type: multipart/mixed; boundary="a b:c"\n\n--a b:c\n\nx\n--a b:c--\n',
     ("", "multipart/mixed", [("1", "text/plain", b"x")])),
    ("nested multiparts",
     b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/alternative; boundary=i\n\n"
     b"--i\n\nplain\n--i\nContent-Type: text/html\n\n<p>html</p>\n--i--\n--o\nContent-Type: image/png\n\n"
     b"PNG\n--o--\n",
     ("", "multipart/mixed", [
         ("1", "multipart/alternative", [("1.1", "text/plain", b"plain"), ("1.2", "text/html", b"<p>html</p>")]),
         ("2", "image/png", b"PNG")])),
    ("inner multipart missing its close delimiter ends at the outer one",
     b"Content-Type: multipart/mixed; boundary=o\n\n--o\nContent-Type: multipart/mixed; boundary=i\n\n"
     b"--i\n\nin\n--o\n\nout\n--o--\n",
     ("", "multipart/mixed", [("1", "multipart/mixed", [("1.1", "text/plain", b"in")]),
                              ("2", "text/plain", b"out")])),
    ("message/rfc822 part",
     b"Content-Type: multipart/mixed; boundary=o\n\n--o\n\nfirst\n--o\nContent-Type: message/rfc822\n\n"
     b"Subject: inner\nContent-Type: multipart/mixed; boundary=i\n\n--i\n\nI1\n--i\n\nI2\n--i--\n--o--\n",
     ("", "multipart/mixed", [
         ("1", "text/plain", b"first"),
         ("2", "message/rfc822", ("2", "multipart/mixed", [("2.1", "text/plain", b"I1"),
                                                          ("2.2", "text/plain", b"I2")]))])),
    ("message/global at top level",
     b"Content-Type: message/global\n\nSubject: x\n\ninner body\n",
     ("", "message/global", ("", "text/plain", b"inner body\n"))),
    ("base64 message/rfc822 is a leaf",
     b"Content-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\nU3ViamVjdDogeAoKeQo=\n",
     ("", "message/rfc822", b"U3ViamVjdDogeAoKeQo=\n")),
    ("digest children default to message/rfc822",
     b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: m1\n\nb1\n--d\nContent-Type: text/plain\n\nt\n--d--\n",
     ("", "multipart/digest", [("1", "message/rfc822", ("1", "text/plain", b"b1")), ("2", "text/plain", b"t")])),
    ("bad content type is text/plain",
     b"Content-Type: garbage\n\nx", ("", "text/plain", b"x")),
    ("huge line", b"Subject: " + b"s" * 300_000 + b"\n\n" + b"b" * 1_000_000,
     ("", "text/plain", b"b" * 1_000_000)),
]


class StructureTests(SynchronousTestCase):
    def test_structures(self) -> None:
        for name, data, expected in STRUCTURE_CASES:
            root = scan(data)
            self.assertEqual(tree(data, root), expected, name)
            check_offsets(self, data, root)
            self.assertFalse(root.truncated, name)

    def test_sources(self) -> None:
        data = crlf(MIXED)
        expected = tree(data, scan(data))
        self.assertEqual(tree(data, scan(bytearray(data))), expected)
        self.assertEqual(tree(data, scan(memoryview(data))), expected)
        self.assertEqual(tree(data, scan(io.BytesIO(data))), expected)
        # A file object is read from its current position; offsets are relative to it.
        f = io.BytesIO(b"JUNK" + data)
        f.seek(4)
        self.assertEqual(tree(data, scan(f)), expected)

    def test_header_and_body_offsets(self) -> None:
        data = crlf(MIXED)
        root = scan(data)
        self.assertEqual(data[root.offset:root.body_offset], b'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n')
        one = root.find("1")
        self.assertEqual(data[one.offset:one.body_offset], b"Content-Type: text/plain\r\n\r\n")
        self.assertEqual((one.header_offset, one.size), (one.offset, one.header_size + one.body_size))
        two = root.find("2")
        self.assertEqual((two.header_size, data[two.offset:two.end]), (2, b"\r\ntwo (no header)"))

    def test_line_counts(self) -> None:
        for body, lines in [(b"", 0), (b"a", 1), (b"a\n", 1), (b"a\r\nb", 2), (b"\n\n\n", 3), (b"a\r\n\r\n", 2)]:
            self.assertEqual(scan(b"S: x\n\n" + body).body_lines, lines, body)
        root = scan(crlf(MIXED))
        self.assertEqual([p.body_lines for p in root.children], [1, 1])

    def test_defaults(self) -> None:
        root = scan(SIMPLE)
        self.assertEqual((root.content_type, root.params, root.encoding), ("text/plain", {"charset": "us-ascii"}, "7bit"))
        self.assertEqual((root.id, root.description, root.disposition, root.language, root.location, root.md5),
                         (None, None, None, None, None, None))
        self.assertTrue(root.is_message)
        self.assertFalse(root.is_multipart)


NESTED = crlf(b"""\
From: Outer <outer@example.org>
Subject: outer
Content-Type: multipart/mixed; boundary=o

--o
Content-Type: text/plain

p1
--o
Content-Type: message/rfc822

From: Inner <inner@example.org>
Subject: inner
Content-Type: multipart/alternative; boundary=i

--i
Content-Type: text/plain

i1
--i
Content-Type: multipart/related; boundary=r

--r
Content-Type: text/html

<img src=cid:x>
--r
Content-Type: image/gif
Content-ID: <x>

GIF
--r--
--i--
--o
Content-Type: message/rfc822

Subject: single

single body
--o--
""")


class FindTests(SynchronousTestCase):
    def test_sections(self) -> None:
        root = scan(NESTED)
        body = {s: NESTED[p.body_offset:p.end] for s in ["1", "2", "2.1", "2.2", "2.2.1", "2.2.2", "3", "3.1"]
                if (p := root.find(s)) is not None}
        self.assertEqual(body["1"], b"p1")
        self.assertTrue(body["2"].startswith(b"From: Inner"))
        self.assertEqual(body["2.1"], b"i1")
        self.assertTrue(body["2.2"].startswith(b"--r\r\n"))
        self.assertEqual(body["2.2.1"], b"<img src=cid:x>")
        self.assertEqual(body["2.2.2"], b"GIF")
        self.assertEqual(body["3"], b"Subject: single\r\n\r\nsingle body")
        self.assertEqual(body["3.1"], b"single body")
        self.assertIs(root.find(""), root)
        self.assertEqual(root.find("2.2.2").section, "2.2.2")
        self.assertEqual(root.find("2.2.2").id, b"<x>")
        # HEADER of 2 is the embedded message's header; 2's own header is its MIME header.
        two = root.find("2")
        self.assertEqual(NESTED[two.offset:two.body_offset], b"Content-Type: message/rfc822\r\n\r\n")
        self.assertTrue(NESTED[two.message.offset:two.message.body_offset].endswith(b"boundary=i\r\n\r\n"))
        self.assertTrue(root.find("3.1").is_message)
        for missing in ["0", "4", "1.1", "2.3", "2.2.3", "3.2", "3.1.1", "01", "1.", ".1", "x", "2..1", " 1", "-1"]:
            self.assertIsNone(root.find(missing), missing)

    def test_single_part_message(self) -> None:
        root = scan(SIMPLE)
        self.assertIs(root.find("1"), root)
        self.assertIsNone(root.find("1.1"))
        self.assertIsNone(root.find("2"))
        top = scan(b"Content-Type: message/rfc822\n\nSubject: x\n\nbody\n")
        self.assertIs(top.find("1"), top)
        self.assertIs(top.find("1.1"), top.message)

    def test_walk_order(self) -> None:
        root = scan(NESTED)
        self.assertEqual([p.section for p in root.walk()],
                         ["", "1", "2", "2", "2.1", "2.2", "2.2.1", "2.2.2", "3", "3"])


PARAM_CASES = [
    # Content-Type value, (type, subtype), params
    (b"text/plain; charset=utf-8", ("text", "plain"), {"charset": "utf-8"}),
    (b'TEXT/HTML; CHARSET="ISO-8859-1"', ("text", "html"), {"charset": "ISO-8859-1"}),
    (b'text/plain; name="a \\"quoted\\" name.txt"', ("text", "plain"), {"name": 'a "quoted" name.txt'}),
    (b"text/plain (a comment); charset = us-ascii (another)", ("text", "plain"), {"charset": "us-ascii"}),
    (b'text/plain; name="(not a comment)"', ("text", "plain"), {"name": "(not a comment)"}),
    (b"text/plain;; ;charset=x;", ("text", "plain"), {"charset": "x"}),
    (b"text/plain; flag; charset=x", ("text", "plain"), {"charset": "x"}),
    (b"application/pdf; name=my file.pdf", ("application", "pdf"), {"name": "my file.pdf"}),
    (b'application/pdf; name="unterminated', ("application", "pdf"), {"name": "unterminated"}),
    (b"text/plain; charset=a; charset=b", ("text", "plain"), {"charset": "a"}),
    (b"text / plain ; x=1", ("text", "plain"), {"x": "1"}),
    (b"text", ("text", "plain"), {}),
    (b"text/pl@in; x=1", ("text", "plain"), {"x": "1"}),
    (b"", ("text", "plain"), {}),
    (b"application/x-stuff; title*0*=us-ascii'en'This%20is%20even%20more%20; title*1*=%2A%2A%2Afun%2A%2A%2A%20;"
     b' title*2="isn\'t it!"', ("application", "x-stuff"), {"title": "This is even more ***fun*** isn't it!"}),
    (b"application/x-stuff; title*=us-ascii'en-us'This%20is%20%2A%2A%2Afun%2A%2A%2A",
     ("application", "x-stuff"), {"title": "This is ***fun***"}),
    (b"application/octet-stream; name*=UTF-8''%E2%82%AC%20rates.txt", ("application", "octet-stream"),
     {"name": "\u20ac rates.txt"}),
    (b"application/octet-stream; name*=iso-8859-1''caf%E9", ("application", "octet-stream"), {"name": "caf\xe9"}),
    (b"application/octet-stream; name*1=b; name*0=a; name*2=c", ("application", "octet-stream"), {"name": "abc"}),
    (b"application/octet-stream; name=plain; name*=utf-8''better", ("application", "octet-stream"),
     {"name": "better"}),
    (b"application/octet-stream; name*=no-such-charset''x%41", ("application", "octet-stream"), {"name": "xA"}),
    (b"application/octet-stream; name*0*=%41; name*x=1", ("application", "octet-stream"),
     {"name": "A", "name*x": "1"}),
    ("text/plain; name=\"caf\u00e9.txt\"".encode(), ("text", "plain"), {"name": "caf\u00e9.txt"}),
    (b'text/plain; name="caf\xe9.txt"', ("text", "plain"), {"name": "caf\xe9.txt"}),
]


class FieldTests(SynchronousTestCase):
    def test_content_type_parameters(self) -> None:
        for value, (typ, sub), params in PARAM_CASES:
            root = scan(b"Content-Type: " + value + b"\r\n\r\nbody")
            self.assertEqual(((root.type, root.subtype), root.params), ((typ, sub), params), value)

    def test_folded_content_type(self) -> None:
        root = scan(b'Content-Type: multipart/mixed;\r\n\tboundary="b"\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n')
        self.assertEqual((root.params, len(root.children)), ({"boundary": "b"}, 1))

    def test_parse_params(self) -> None:
        self.assertEqual(parse_params(b'attachment; filename="a.txt"; size=3'),
                         ("attachment", {"filename": "a.txt", "size": "3"}))

    def test_other_fields(self) -> None:
        root = scan(crlf(b"""\
Content-Type: application/pdf; name=x.pdf
Content-Transfer-Encoding: BASE64 (comment)
Content-ID: <part1@example.org>
Content-Description: =?utf-8?q?caf=C3=A9?=
  menu
Content-Disposition: ATTACHMENT; filename*=utf-8''r%C3%A9sum%C3%A9.pdf; size=3
Content-Language: en, de-CH (Swiss)
Content-Location: http://example.org/x.pdf
Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==

JVBE
"""))
        self.assertEqual(root.encoding, "base64")
        self.assertEqual(root.id, b"<part1@example.org>")
        self.assertEqual(root.description, b"=?utf-8?q?caf=C3=A9?=  menu")
        self.assertEqual(decode_words(root.description), "caf\u00e9  menu")
        self.assertEqual((root.disposition, root.disposition_params),
                         ("attachment", {"filename": "r\u00e9sum\u00e9.pdf", "size": "3"}))
        self.assertEqual(root.language, ["en", "de-CH"])
        self.assertEqual(root.location, b"http://example.org/x.pdf")
        self.assertEqual(root.md5, b"Q2hlY2sgSW50ZWdyaXR5IQ==")

    def test_first_of_repeated_fields_wins(self) -> None:
        root = scan(b"Content-Type: text/html\nContent-Type: image/png\nSubject: a\nSubject: b\n\n")
        self.assertEqual((root.content_type, root.envelope["subject"]), ("text/html", b"a"))

    def test_empty_encoding(self) -> None:
        self.assertEqual(scan(b"Content-Transfer-Encoding:\n\nx").encoding, "7bit")


class HeaderTests(SynchronousTestCase):
    def test_headers(self) -> None:
        cases = [
            (b"Subject: hi\r\nFROM: a@b\r\n\r\nbody: no\r\n", [("subject", b"hi"), ("from", b"a@b")]),
            (b"Subject: folded\r\n  twice\r\n\tthrice\r\n", [("subject", b"folded  twice\tthrice")]),
            (b"Subject: lf\n continued\n", [("subject", b"lf continued")]),
            (b"From sender Mon Jan 1\nSubject: x\n", [("subject", b"x")]),
            (b" leading continuation\nSubject: x\n", [("subject", b"x")]),
            (b"no colon here\n continuation of nothing\nA: 1\n", [("a", b"1")]),
            (b"Subject : spaced\nX-Empty:\n", [("subject", b"spaced"), ("x-empty", b"")]),
            (b"Bad Name: x\n:novalue\nB:2", [("b", b"2")]),
            ("Subject: caf\u00e9\n".encode(), [("subject", "caf\u00e9".encode())]),
            (b"Subject: \xff\xfe\x00raw\n", [("subject", b"\xff\xfe\x00raw")]),
            (b"", []),
        ]
        for raw, expected in cases:
            self.assertEqual(headers(raw), expected, raw)

    def test_huge_folded_header_is_linear(self) -> None:
        raw = b"X: a\r\n" + b" b\r\n" * 200_000 + b"\r\n"
        start = time.perf_counter()
        [(name, value)] = headers(raw)
        self.assertLess(time.perf_counter() - start, 5)
        self.assertEqual(len(value), 1 + 2 * 200_000)


WORD_CASES = [
    (b"plain text", "plain text"),
    (b"=?utf-8?q?caf=C3=A9_au_lait?=", "caf\u00e9 au lait"),
    (b"=?UTF-8?B?Y2Fmw6k=?=", "caf\u00e9"),
    (b"=?utf-8?b?Y2Fmw6k?=", "caf\u00e9"),  # padding missing
    (b"=?iso-8859-1?Q?a?= =?iso-8859-1?Q?b?=", "ab"),
    (b"=?iso-8859-1?Q?a?=\r\n =?utf-8?Q?b?=", "ab"),
    (b"=?iso-8859-1?Q?a?= x =?iso-8859-1?Q?b?=", "a x b"),
    (b"Re: =?utf-8?q?caf=C3=A9?= now", "Re: caf\u00e9 now"),
    (b"=?utf-8?b?4oI=?= =?utf-8?b?rA==?=", "\u20ac"),  # a character split over two words
    (b"=?utf-8*en?q?hello?=", "hello"),
    (b"=?no-such-charset?q?x?= y", "=?no-such-charset?q?x?= y"),
    (b"=?utf-8?x?bad-encoding?=", "=?utf-8?x?bad-encoding?="),
    (b"=?utf-8?q?unterminated", "=?utf-8?q?unterminated"),
    (b"=?shift_jis?B?k/qWe4zq?=", "\u65e5\u672c\u8a9e"),
    (b"=?koi8-r?Q?=F0=D2=C9=D7=C5=D4?=", "\u041f\u0440\u0438\u0432\u0435\u0442"),
    ("raw utf-8 caf\u00e9".encode(), "raw utf-8 caf\u00e9"),
    (b"raw latin-1 caf\xe9", "raw latin-1 caf\xe9"),
    (b"=?utf-8?q?bad_utf8_=FF?=", "bad utf8 \ufffd"),
    (b"", ""),
]


class WordTests(SynchronousTestCase):
    def test_decode_words(self) -> None:
        for raw, text in WORD_CASES:
            self.assertEqual(decode_words(raw), text, raw)

    def test_oracle(self) -> None:
        """Agree with email.header on well-formed words."""
        for raw in [b"=?utf-8?q?caf=C3=A9_au_lait?=", b"Re: =?iso-8859-1?q?na=EFve?= =?utf-8?b?w6k=?= ok",
                    b"=?utf-8?b?4oKs?= =?utf-8?b?IHJhdGVz?="]:
            oracle = str(email.header.make_header(email.header.decode_header(raw.decode("ascii"))))
            self.assertEqual(decode_words(raw), oracle, raw)


ADDRESS_CASES = [
    (b"user@example.org", [Address(None, None, b"user", b"example.org")]),
    (b"John Doe <jdoe@example.org>", [Address(b"John Doe", None, b"jdoe", b"example.org")]),
    (b'"Doe, John" <jdoe@example.org>, other@x.org',
     [Address(b"Doe, John", None, b"jdoe", b"example.org"), Address(None, None, b"other", b"x.org")]),
    (b"John Q. Public <jqp@x.org>", [Address(b"John Q. Public", None, b"jqp", b"x.org")]),
    (b"jdoe@example.org (John Doe)", [Address(b"John Doe", None, b"jdoe", b"example.org")]),
    (b"=?utf-8?q?J=C3=B6rg?= <j@x.org>", [Address(b"=?utf-8?q?J=C3=B6rg?=", None, b"j", b"x.org")]),
    ("J\u00f6rg <j@x.org>".encode(), [Address("J\u00f6rg".encode(), None, b"j", b"x.org")]),
    (b'"a b"@x.org', [Address(None, None, b'"a b"', b"x.org")]),
    (b"<@r1.org,@r2.org:u@h.org>", [Address(None, b"@r1.org,@r2.org", b"u", b"h.org")]),
    (b"u@[192.0.2.1]", [Address(None, None, b"u", b"[192.0.2.1]")]),
    (b"undisclosed-recipients:;", [Group(b"undisclosed-recipients", [])]),
    (b"Friends: a@x.org, B <b@x.org>; c@x.org",
     [Group(b"Friends", [Address(None, None, b"a", b"x.org"), Address(b"B", None, b"b", b"x.org")]),
      Address(None, None, b"c", b"x.org")]),
    (b"Open group: a@x.org", [Group(b"Open group", [Address(None, None, b"a", b"x.org")])]),
    (b"Name <unclosed@x.org", [Address(b"Name", None, b"unclosed", b"x.org")]),
    (b"Name <unclosed@x.org, b@y.org",
     [Address(b"Name", None, b"unclosed", b"x.org"), Address(None, None, b"b", b"y.org")]),
    (b"localonly", [Address(None, None, b"localonly", b"")]),
    (b", ,a@b,,", [Address(None, None, b"a", b"b")]),
    (b"<>", [Address(None, None, b"", b"")]),
    (b"", []),
    (b"  (just a comment)  ", []),
    (b"a@b@c", [Address(None, None, b"a@b", b"c")]),
    (b"first.last@sub.example.org", [Address(None, None, b"first.last", b"sub.example.org")]),
]


class AddressTests(SynchronousTestCase):
    def test_parse_addresses(self) -> None:
        for raw, expected in ADDRESS_CASES:
            self.assertEqual(parse_addresses(raw), expected, raw)

    def test_never_raises(self) -> None:
        rng = random.Random(5322)
        alphabet = b'ab@<>,;:"()\\[]. \t\r\n\x00\xff=?'
        for _ in range(3000):
            soup = bytes(rng.choice(alphabet) for _ in range(rng.randrange(40)))
            for item in parse_addresses(soup):
                self.assertIsInstance(item, (Address, Group))


class EnvelopeTests(SynchronousTestCase):
    def test_envelope_fields(self) -> None:
        root = scan(NESTED)
        fields = envelope_fields(root)
        self.assertEqual(list(fields), list(mime.ENVELOPE_FIELDS))
        self.assertEqual((fields["from"], fields["subject"], fields["date"]),
                         (b"Outer <outer@example.org>", b"outer", None))
        self.assertEqual(envelope_fields(root.find("2"))["subject"], b"inner")
        self.assertEqual(envelope_fields(root.find("3"))["subject"], b"single")

    def test_raw_and_unfolded(self) -> None:
        data = crlf(b"""\
Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)
Subject: =?utf-8?q?caf=C3=A9?=
 \xc3\xa9t\xc3\xa9
From: a@b
Sender: s@b
Reply-To: r@b
To: t1@b,
  t2@b
Cc: c@b
Bcc: d@b
In-Reply-To: <x@y>
Message-ID: <id@host>

body
""")
        f = envelope_fields(scan(data))
        self.assertEqual(f["subject"], b"=?utf-8?q?caf=C3=A9?= \xc3\xa9t\xc3\xa9")
        self.assertEqual(f["to"], b"t1@b,  t2@b")
        self.assertEqual((f["date"], f["sender"], f["reply-to"], f["cc"], f["bcc"], f["in-reply-to"], f["message-id"]),
                         (b"Mon, 7 Feb 1994 21:52:25 -0800 (PST)", b"s@b", b"r@b", b"c@b", b"d@b", b"<x@y>",
                          b"<id@host>"))
        self.assertEqual(len(parse_addresses(f["to"])), 2)


# Realistic messages against the stdlib email parser ---------------------------------------

REALISTIC = [
    crlf(b"""\
From: =?utf-8?q?Ren=C3=A9?= <rene@example.org>
To: team@example.org
Subject: =?utf-8?b?UmU6IHLDqXN1bcOp?=
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="=_outer"

This is a multi-part message in MIME format.
--=_outer
Content-Type: multipart/alternative; boundary="=_alt"

--=_alt
Content-Type: text/plain; charset=utf-8; format=flowed
Content-Transfer-Encoding: 8bit

caf\xc3\xa9
--=_alt
Content-Type: multipart/related; boundary="=_rel"; type="text/html"

--=_rel
Content-Type: text/html; charset=utf-8

<html><img src="cid:logo"></html>
--=_rel
Content-Type: image/png; name="logo.png"
Content-ID: <logo>
Content-Transfer-Encoding: base64

iVBORw0KGgo=
--=_rel--

--=_alt--

--=_outer
Content-Type: application/pdf; name*=utf-8''r%C3%A9sum%C3%A9.pdf
Content-Disposition: attachment; filename*0*=utf-8''r%C3%A9sum; filename*1*=%C3%A9.pdf
Content-Transfer-Encoding: base64

JVBERi0xLjQK
--=_outer
Content-Type: message/rfc822

From: inner@example.org
Subject: forwarded
Content-Type: multipart/mixed; boundary=inner

--inner
Content-Type: text/plain; charset=us-ascii

inside
--inner
Content-Type: text/x-diff; name="a.diff"

+x
--inner--
--=_outer--
epilogue
"""),
    b"""\
Subject: bare LF, no final boundary
Content-Type: multipart/alternative; boundary=abc

--abc
Content-Type: text/plain; charset="iso-8859-1"

plain
--abc
Content-Type: text/html; charset=iso-8859-1

<p>x</p>
""",
    crlf(b"""\
Subject: digest
Content-Type: multipart/digest; boundary=d

--d

Subject: one

first
--d
Content-Type: message/rfc822

Subject: two

second
--d--
"""),
    crlf(b"""\
Subject: single part with params
Content-Type: text/plain; charset="utf-8"; delsp=yes; format=flowed

hello
"""),
]


class OracleTests(SynchronousTestCase):
    def test_against_email_package(self) -> None:
        for data in REALISTIC:
            ours = list(scan(data).walk())
            theirs = list(email.message_from_bytes(data, policy=email.policy.default).walk())
            self.assertEqual([p.content_type for p in ours], [m.get_content_type() for m in theirs])
            check_offsets(self, data, scan(data))
            for p, m in zip(ours, theirs):
                if "content-type" in m:
                    oracle = {k.lower(): v for k, v in m["content-type"].params.items()}
                    self.assertEqual(p.params, oracle, p.section)
                if "content-disposition" in m:
                    oracle = {k.lower(): v for k, v in m["content-disposition"].params.items()}
                    self.assertEqual((p.disposition, p.disposition_params),
                                     (m.get_content_disposition(), oracle), p.section)
                if not m.is_multipart():
                    body = data[p.body_offset:p.end]
                    if data is REALISTIC[1] and p is ours[-1]:
                        # With the close delimiter missing, email drops the last line end; we keep
                        # the part's bytes as stored, to the end of the enclosing part.
                        self.assertEqual(body[-1:], b"\n")
                        body = body[:-1]
                    if p.encoding == "base64":
                        body = base64.b64decode(body)
                    self.assertEqual(body, m.get_payload(decode=True), p.section)
                if m.get("subject") is not None and p.is_message:
                    self.assertEqual(decode_words(p.envelope["subject"]), str(m["subject"]))
        root = scan(REALISTIC[0])
        self.assertEqual(root.find("2").disposition_params["filename"], "r\u00e9sum\u00e9.pdf")
        self.assertEqual(root.find("1.2.2").id, b"<logo>")


# Bounds, hostile input and time -----------------------------------------------------------


def nested(depth: int) -> bytes:
    out = b""
    for d in range(depth):
        out += b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (d, d)
    return out + b"\nleaf\n"


class BoundsTests(SynchronousTestCase):
    def test_max_depth(self) -> None:
        data = nested(10)
        deepest = max(len(p.section.split(".")) for p in scan(data).walk())
        self.assertEqual(deepest, 10)
        root = scan(data, max_depth=3)
        check_offsets(self, data, root)
        leaf = root.find("1.1.1")
        self.assertEqual((leaf.content_type, leaf.children), ("multipart/mixed", []))
        self.assertIsNone(root.find("1.1.1.1"))
        # message/rfc822 nesting counts too
        msgs = b"Content-Type: message/rfc822\n\n" * 5 + b"\nx"
        self.assertEqual(sum(1 for _ in scan(msgs, max_depth=2).walk()), 3)

    def test_default_depth_is_bounded_without_recursion(self) -> None:
        data = nested(5000)
        root = scan(data)
        self.assertEqual(sum(1 for _ in root.walk()), mime.MAX_DEPTH + 1)
        check_offsets(self, data, root)

    def test_max_parts(self) -> None:
        data = b"Content-Type: multipart/mixed; boundary=b\n\n" + b"--b\n\nx\n" * 100 + b"--b--\n"
        self.assertEqual(len(scan(data).children), 100)
        root = scan(data, max_parts=10)
        self.assertEqual((len(root.children), root.truncated), (9, True))
        self.assertEqual(sum(1 for _ in scan(data, max_parts=1).walk()), 1)
        self.assertTrue(scan(b"Content-Type: message/rfc822\n\nS: x\n\n", max_parts=1).truncated)

    def test_byte_soup_never_raises(self) -> None:
        rng = random.Random(2046)
        pieces = [b"--b", b"--b--", b"\r\n", b"\n", b"\r", b" ", b"Content-Type: multipart/mixed; boundary=b",
                  b"Content-Type: message/rfc822", b"Content-Type: multipart/digest; boundary=\"b\"",
                  b"Content-Transfer-Encoding: base64", b"\x00", b"\xff", b":", b";", b"=?utf-8?q?x?=",
                  b"name*0*=x'y'%", b"\t", b"x"]
        for _ in range(2000):
            soup = b"".join(rng.choice(pieces) for _ in range(rng.randrange(60)))
            root = scan(soup)
            check_offsets(self, soup, root)
            for p in root.walk():
                decode_words(p.envelope.get("subject", b""))
                parse_addresses(p.envelope.get("from", b""))
        for _ in range(300):
            soup = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
            check_offsets(self, soup, scan(soup))

    def test_linear_time(self) -> None:
        """Hostile shapes scale linearly: an 8x bigger input takes far less than 64x as long."""
        def shapes(n: int) -> list[bytes]:
            head = b"Content-Type: multipart/mixed; boundary=b\n\n"
            return [
                head + b"--b\n\nx\n" * n,                          # many parts
                head + b"x--b" * n,                                # lookalikes not at line start
                head + b"--bx\n" * n,                              # lookalikes with a longer boundary
                head + b"--b" + b" " * (8 * n) + b"x\n--b\n\ny",   # long padding that is no delimiter
                b"S: x\n" * n,                                     # header without end
                nested(50) * (n // 100 + 1),
            ]

        def timed(n: int) -> float:
            start = time.perf_counter()
            for data in shapes(n):
                scan(data)
            return time.perf_counter() - start

        small = min(timed(5000) for _ in range(3))
        big = min(timed(40000) for _ in range(3))
        self.assertLess(big, max(small, 0.01) * 30)


# Random MIME trees ------------------------------------------------------------------------


def random_tree(rng: random.Random, depth: int = 0) -> tuple[bytes, tuple]:
    """A random MIME entity (header + body bytes) and its expected `tree` shape (sections
    filled in by `number`). Bodies never contain a line starting with "--"."""
    eol = rng.choice([b"\r\n", b"\n"])
    kind = rng.choice(["leaf", "leaf", "multi", "message"] if depth < 4 else ["leaf"])
    if kind == "leaf":
        ctype = rng.choice([None, "text/plain", "text/html", "image/png", "application/octet-stream"])
        words = [b"hello", b"w\xc3\xb6rld", b"-", b"x--y", b"\x00", b"", b"  "]
        body = eol.join(b" ".join(rng.choice(words) for _ in range(rng.randrange(4)))
                        for _ in range(rng.randrange(4)))
        header = b"" if ctype is None else b"Content-Type: " + ctype.encode() + eol
        return header + eol + body, (ctype or "text/plain", body)
    if kind == "message":
        inner, shape = random_tree(rng, depth + 1)
        return b"Content-Type: message/rfc822" + eol + eol + b"Subject: s" + eol + inner, ("message/rfc822", shape)
    boundary = b"b%d_%d" % (depth, rng.randrange(10**6))
    sub = rng.choice(["mixed", "alternative", "related"])
    children = [random_tree(rng, depth + 1) for _ in range(rng.randint(1, 4))]
    quoted = rng.random() < 0.5
    out = b"Content-Type: multipart/" + sub.encode() + b"; boundary=" + (
        b'"' + boundary + b'"' if quoted else boundary) + eol + eol
    if rng.random() < 0.5:
        out += b"preamble" + eol
    for data, _ in children:
        out += b"--" + boundary + eol + data + eol
    if rng.random() < 0.8:
        out += b"--" + boundary + b"--" + eol
        if rng.random() < 0.5:
            out += b"epilogue" + eol
    else:
        out = out[:-len(eol)]  # no close delimiter: the last part ends at the end
    return out, ("multipart/" + sub, [shape for _, shape in children])


def number(shape: tuple, section: str) -> tuple:
    ctype, rest = shape
    if isinstance(rest, list):
        prefix = f"{section}." if section else ""
        return (section, ctype, [number(s, f"{prefix}{i}") for i, s in enumerate(rest, 1)])
    if isinstance(rest, tuple):
        return (section, ctype, number(rest, section))
    return (section, ctype, rest)


class RandomTreeTests(SynchronousTestCase):
    def check_random_tree(self, rng: random.Random) -> None:
        data, shape = random_tree(rng)
        data = b"Subject: random" + (b"\r\n" if data.startswith(b"\r\n") else b"\n") + data
        root = scan(data)
        self.assertEqual(tree(data, root), number(shape, ""))
        check_offsets(self, data, root)

    def test_seeded_random_trees(self) -> None:
        for seed in range(500):
            self.check_random_tree(random.Random(seed))

    if hypothesis is not None:
        @hypothesis.settings(max_examples=300, deadline=None)
        @hypothesis.given(st.randoms(use_true_random=False))
        def test_hypothesis_random_trees(self, rng: random.Random) -> None:
            self.check_random_tree(rng)

        @hypothesis.settings(max_examples=500, deadline=None)
        @hypothesis.given(st.binary(max_size=2000))
        def test_hypothesis_byte_soup(self, data: bytes) -> None:
            root = scan(data)
            check_offsets(self, data, root)
            for p in root.walk():
                decode_words(p.envelope.get("subject", b""))
                parse_addresses(p.envelope.get("to", b""))
    else:
        def test_hypothesis_random_trees(self) -> None:
            raise SkipTest("hypothesis is not installed")

        test_hypothesis_byte_soup = test_hypothesis_random_trees
