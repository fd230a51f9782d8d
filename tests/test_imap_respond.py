"""IMAP response serialisation (`mx.imap.respond`): string forms, lists, status lines, bulk.

Table-driven; the string forms are also read back with `mx.imap.parse`, so what the server
writes is what a client's parser of the same grammar reads.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mx.imap import respond
from mx.imap.parse import NEED_DATA, Atom, Command, CommandReader, Literal, Nil, Number, ParenList, Quoted, Section
from mx.imap.respond import (
    MAX_QUOTED,
    Responses,
    astring,
    continuation,
    encode,
    literal,
    nstring,
    paren,
    quoted,
    section_name,
    string,
    tagged,
    untagged,
    untagged_status,
)


def read_back(item: bytes) -> object:
    """The one argument a reader parses from `t X <item>`."""
    reader = CommandReader(max_literal=10**6)
    reader.receive_data(b"t X " + item + b"\r\n")
    while (event := reader.next_event()) is not NEED_DATA:
        if isinstance(event, Command):
            (arg,) = event.args
            return arg
    raise AssertionError(f"no command from {item!r}")


class StringTests(SynchronousTestCase):
    ASTRING = [
        ("INBOX", b"INBOX"),
        ("[Gmail]/Sent", b"[Gmail]/Sent"),
        ("a.b-c_d", b"a.b-c_d"),
        ("a b", b'"a b"'),
        ("", b'""'),
        ("NIL", b'"NIL"'),
        ("nil", b'"nil"'),
        ("x*", b'"x*"'),
        ("50%", b'"50%"'),
        ("(x)", b'"(x)"'),
        ('say "hi"', b'"say \\"hi\\""'),
        ("back\\slash", b'"back\\\\slash"'),
        ("{5}", b'"{5}"'),
        ("\u00e9t\u00e9", b"{5}\r\n\xc3\xa9t\xc3\xa9"),
        ("a\r\nb", b"{4}\r\na\r\nb"),
        ("nul\x00", b"{4}\r\nnul\x00"),
        (b"bytes", b"bytes"),
        (b"\xff", b"{1}\r\n\xff"),
        ("x" * (MAX_QUOTED + 1), b"{1025}\r\n" + b"x" * (MAX_QUOTED + 1)),
    ]

    def test_astring(self) -> None:
        for value, expected in self.ASTRING:
            self.assertEqual(astring(value), expected, value)

    def test_string_never_an_atom(self) -> None:
        self.assertEqual(string("INBOX"), b'"INBOX"')
        self.assertEqual(string("a\nb"), b"{3}\r\na\nb")
        self.assertEqual(string(b"x" * MAX_QUOTED), b'"' + b"x" * MAX_QUOTED + b'"')

    def test_nstring(self) -> None:
        self.assertEqual(nstring(None), b"NIL")
        self.assertEqual(nstring("NIL"), b'"NIL"')
        self.assertEqual(nstring(b""), b'""')

    def test_literal_and_quoted(self) -> None:
        self.assertEqual(literal(b""), b"{0}\r\n")
        self.assertEqual(literal("\u00e9"), b"{2}\r\n\xc3\xa9")
        self.assertEqual(quoted("\u00e9"), b'"\xc3\xa9"')
        for bad in ("a\rb", "a\nb", "a\x00b"):
            self.assertRaises(ValueError, quoted, bad)

    def test_read_back(self) -> None:
        for value, _ in self.ASTRING:
            data = value.encode() if isinstance(value, str) else value
            arg = read_back(astring(value))
            got = arg.value if isinstance(arg, Literal) else (arg.value if isinstance(arg, Quoted) else arg.text)
            self.assertEqual(got.encode() if isinstance(got, str) else got, data, value)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=60))
    def test_any_octets_read_back_as_themselves(self, data: bytes) -> None:
        arg = read_back(string(data))
        self.assertIsInstance(arg, (Quoted, Literal))
        self.assertEqual(arg.value if isinstance(arg, Literal) else arg.value.encode(), data)


class EncodeTests(SynchronousTestCase):
    def test_values(self) -> None:
        cases = [
            (5, b"5"),
            (None, b"NIL"),
            ("FLAGS", b"FLAGS"),
            (b'"raw"', b'"raw"'),
            ([], b"()"),
            (["FLAGS", ["\\Seen", "\\Answered"], "UID", 7], b"(FLAGS (\\Seen \\Answered) UID 7)"),
            ((1, (2, (3, ()))), b"(1 (2 (3 ())))"),
            (Atom("x"), b"x"),
            (Number(12), b"12"),
            (Nil(), b"NIL"),
            (Quoted('a"b'), b'"a\\"b"'),
            (Literal(b"ab"), b"{2}\r\nab"),
            (ParenList((Atom("a"), Literal(b""))), b"(a {0}\r\n)"),
        ]
        for value, expected in cases:
            self.assertEqual(encode(value), expected, value)
        self.assertEqual(paren(iter([1, 2])), b"(1 2)")

    def test_refused(self) -> None:
        self.assertRaises(ValueError, encode, "a\r\n* BYE")
        self.assertRaises(ValueError, encode, -1)
        self.assertRaises(TypeError, encode, True)
        self.assertRaises(TypeError, encode, 1.5)

    def test_sections(self) -> None:
        cases = [
            (Section("BODY"), b"BODY[]", b"BODY[]"),
            (Section("BODY.PEEK", (1, 2), "MIME"), b"BODY.PEEK[1.2.MIME]", b"BODY[1.2.MIME]"),
            (Section("BODY", (), "HEADER.FIELDS", ("A", "b c"), (0, 1024)),
             b'BODY[HEADER.FIELDS (A "b c")]<0.1024>', b'BODY[HEADER.FIELDS (A "b c")]<0>'),
            (Section("BODY", (3,), "HEADER.FIELDS.NOT", ("x]",)), b'BODY[3.HEADER.FIELDS.NOT ("x]")]',
             b'BODY[3.HEADER.FIELDS.NOT ("x]")]'),
            (Section("BINARY.PEEK", (1,), partial=(5, 10)), b"BINARY.PEEK[1]<5.10>", b"BINARY[1]<5>"),
            (Section("BINARY.SIZE", (2,)), b"BINARY.SIZE[2]", b"BINARY.SIZE[2]"),
        ]
        for section, command, response in cases:
            self.assertEqual(section_name(section), command)
            self.assertEqual(encode(section), command)
            self.assertEqual(section_name(section, response=True), response)
            self.assertEqual(read_back(command), section)


class StatusTests(SynchronousTestCase):
    def test_lines(self) -> None:
        cases = [
            (tagged("a1", "OK", "LOGIN completed"), b"a1 OK LOGIN completed\r\n"),
            (tagged("a1", "NO", "No such mailbox", "TRYCREATE"), b"a1 NO [TRYCREATE] No such mailbox\r\n"),
            (tagged("a2", "OK", "APPEND completed", ("APPENDUID", 38505, 3955)),
             b"a2 OK [APPENDUID 38505 3955] APPEND completed\r\n"),
            (tagged("a3", "BAD", "evil\r\n* OK injected"), b"a3 BAD evil  * OK injected\r\n"),
            (untagged_status("OK", "Flags permitted", ("PERMANENTFLAGS", ["\\Seen", "\\*"])),
             b"* OK [PERMANENTFLAGS (\\Seen \\*)] Flags permitted\r\n"),
            (untagged_status("BYE", "Logging out"), b"* BYE Logging out\r\n"),
            (untagged(5, "EXISTS"), b"* 5 EXISTS\r\n"),
            (untagged("CAPABILITY", "IMAP4rev1", "LITERAL+"), b"* CAPABILITY IMAP4rev1 LITERAL+\r\n"),
            (untagged("LIST", ["\\HasNoChildren"], respond.quoted("/"), astring("Sent Items")),
             b'* LIST (\\HasNoChildren) "/" "Sent Items"\r\n'),
            (untagged(1, "FETCH", ["UID", 4, section_name(Section("BODY.PEEK", partial=(0, 3)), True), literal(b"abc")]),
             b"* 1 FETCH (UID 4 BODY[]<0> {3}\r\nabc)\r\n"),
            (continuation(), b"+ \r\n"),
            (continuation("go ahead"), b"+ go ahead\r\n"),
            (continuation("x\ny"), b"+ x y\r\n"),
        ]
        for got, expected in cases:
            self.assertEqual(got, expected)

    def test_bulk(self) -> None:
        out = Responses()
        for n in range(1, 1001):
            out.untagged(n, "FETCH", ["FLAGS", ["\\Seen"], "UID", n + 100])
        out.untagged_status("OK", "still here")
        out.add(b"* 1 EXPUNGE\r\n")
        out.tagged("a", "OK", "FETCH completed")
        self.assertEqual(len(out), 1003)
        data = out.to_bytes()
        self.assertEqual(len(out), 0)
        lines = data.split(b"\r\n")
        self.assertEqual(lines[0], b"* 1 FETCH (FLAGS (\\Seen) UID 101)")
        self.assertEqual(lines[999], b"* 1000 FETCH (FLAGS (\\Seen) UID 1100)")
        self.assertEqual(lines[-4:], [b"* OK still here", b"* 1 EXPUNGE", b"a OK FETCH completed", b""])
        self.assertEqual(out.to_bytes(), b"")
