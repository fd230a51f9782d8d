"""The IMAP command reader (`mx.imap.parse`): grammar, literals, bounds, resynchronisation.

Table-driven: every case of `CASES` is fed whole, byte by byte and split at every point, and
must give the same events each way. Then the nasty cases by name, and hypothesis properties:
commands built from the AST round-trip through `mx.imap.respond` and the reader; byte soup
gives only the reader's own events with bounded memory; any split gives the same events.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mx.imap import respond
from mx.imap.parse import (
    LITERAL_MINUS_MAX,
    MAX_LINE,
    NEED_DATA,
    Arg,
    Atom,
    BadCommand,
    Command,
    CommandReader,
    Event,
    Literal,
    LiteralTooLarge,
    NeedContinuation,
    Nil,
    Number,
    ParenList,
    Quoted,
    RawLine,
    Section,
    SequenceSet,
    as_astring,
    parse_sequence_set,
)

EVENT_TYPES = (Command, NeedContinuation, BadCommand, LiteralTooLarge, RawLine)


def drain(reader: CommandReader) -> list[Event]:
    out: list[Event] = []
    while (event := reader.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def feed(chunks: list[bytes], **limits: int) -> list[Event]:
    reader = CommandReader(**limits)
    out: list[Event] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        out += drain(reader)
    return out


def whole(data: bytes, **limits: int) -> list[Event]:
    return feed([data], **limits)


def bytewise(data: bytes, **limits: int) -> list[Event]:
    return feed([data[i : i + 1] for i in range(len(data))], **limits)


def C(tag: str, name: str, *args: Arg) -> Command:
    return Command(tag, name, args)


def L(*items: Arg) -> ParenList:
    return ParenList(items)


A, Q, N, S = Atom, Quoted, Number, SequenceSet
LIMITS = {"max_line": 200, "max_args": 12, "max_depth": 4, "max_literal": 40}

# (bytes from the client, the events, reader limits or None for LIMITS)
CASES: list[tuple[bytes, list[Event]]] = [
    # commands and names
    (b"a1 NOOP\r\n", [C("a1", "NOOP")]),
    (b"a1 noop\r\n", [C("a1", "NOOP")]),
    (b"A.1/x] CAPABILITY\r\n", [C("A.1/x]", "CAPABILITY")]),
    (b"a UID FETCH 1:* FLAGS\r\n", [C("a", "UID FETCH", S("1:*"), A("FLAGS"))]),
    (b"a uid store 4 +FLAGS.SILENT (\\Seen)\r\n", [C("a", "UID STORE", N(4), A("+FLAGS.SILENT"), L(A("\\Seen")))]),
    (b"a UID\r\n", [BadCommand("a", "UID needs a command")]),
    (b"a UID (x)\r\n", [BadCommand("a", "UID needs a command")]),
    (b"a X-FOO_1.2\r\n", [C("a", "X-FOO_1.2")]),
    # atoms, numbers, NIL
    (b"a X INBOX [Gmail]/Sent \\Seen \\* 1-Feb-1994 foo%\r\n",
     [C("a", "X", A("INBOX"), A("[Gmail]/Sent"), A("\\Seen"), A("\\*"), A("1-Feb-1994"), A("foo%"))]),
    (b"a X 0 7 007 4294967296 9223372036854775807 9223372036854775808\r\n",
     [C("a", "X", N(0), N(7), A("007"), N(4294967296), N(2**63 - 1), A("9223372036854775808"))]),
    (b"a X NIL nil\r\n", [C("a", "X", Nil("NIL"), Nil("nil"))]),
    # sequence sets (RFC 3501 §9, RFC 5182 $)
    (b"a FETCH 1:*,5,7:9 x\r\n", [C("a", "FETCH", S("1:*,5,7:9"), A("x"))]),
    (b"a FETCH * $ 2,4 *:3\r\n", [C("a", "FETCH", S("*"), S("$"), S("2,4"), S("*:3"))]),
    (b"a FETCH 0:4 1: ,1 4294967296:5\r\n", [C("a", "FETCH", A("0:4"), A("1:"), A(",1"), A("4294967296:5"))]),
    # quoted strings
    (b'a LOGIN "us er" "p\\"a\\\\ss"\r\n', [C("a", "LOGIN", Q("us er"), Q('p"a\\ss'))]),
    (b'a X ""\r\n', [C("a", "X", Q(""))]),
    (b'a X "\xc3\xa9t\xc3\xa9"\r\n', [C("a", "X", Q("\u00e9t\u00e9"))]),
    (b'a X "\xff"\r\n', [BadCommand("a", "Quoted string is not UTF-8")]),
    (b'a X "bad \\n escape"\r\n', [BadCommand("a", "Invalid quoted string")]),
    (b'a X "unterminated\r\n', [BadCommand("a", "Invalid quoted string")]),
    (b'a X "cr\rinside"\r\n', [BadCommand("a", "Bare CR in command line")]),
    (b'a X "x"y\r\n', [BadCommand("a", "Expected a space between arguments")]),
    # literals
    (b"a LOGIN {4}\r\nuser {4}\r\npass\r\n",
     [NeedContinuation(4), NeedContinuation(4), C("a", "LOGIN", Literal(b"user"), Literal(b"pass"))]),
    (b"a LOGIN {4+}\r\nuser {4+}\r\npass\r\n", [C("a", "LOGIN", Literal(b"user"), Literal(b"pass"))]),
    (b"a X {0}\r\n\r\n", [NeedContinuation(0), C("a", "X", Literal(b""))]),
    (b"a X {5+}\r\n\r\n\x00{}\r\n", [C("a", "X", Literal(b"\r\n\x00{}"))]),
    (b"a X {3+}\r\nb N\r\nc NOOP\r\n", [C("a", "X", Literal(b"b N")), C("c", "NOOP")]),
    (b"a X ({2+}\r\nab {1+}\r\nc)\r\n", [C("a", "X", L(Literal(b"ab"), Literal(b"c")))]),
    (b"a X {2}\r\nab)\r\n", [NeedContinuation(2), BadCommand("a", "Unexpected )")]),
    (b"a X{3}\r\nb NOOP\r\n", [BadCommand("a", "Expected a space before the literal"), C("b", "NOOP")]),
    (b"a X{3+}\r\nabc\r\nb NOOP\r\n", [BadCommand("a", "Expected a space before the literal"), C("b", "NOOP")]),
    (b"a {3+}\r\nabc\r\nb NOOP\r\n", [BadCommand("a", "Invalid command name"), C("b", "NOOP")]),
    (b"a APPEND INBOX (\\Seen) \"1-Jan-2020 00:00:00 +0000\" {5+}\r\nhello\r\nb NOOP\r\n",
     [C("a", "APPEND", A("INBOX"), L(A("\\Seen")), Q("1-Jan-2020 00:00:00 +0000"), Literal(b"hello")), C("b", "NOOP")]),
    # literal bounds: refused before a byte is read, {n+} swallowed, {n} not expected
    (b"a APPEND x {41}\r\nb NOOP\r\n", [LiteralTooLarge("a", 41, True), C("b", "NOOP")]),
    (b"a APPEND x {41+}\r\n" + b"c NOOP\r\n" * 5 + b"x\r\nb NOOP\r\n", [LiteralTooLarge("a", 41, False), C("b", "NOOP")]),
    (b"a X {20+}\r\n" + b"x" * 20 + b" {21+}\r\n" + b"y" * 21 + b" {30}\r\nb NOOP\r\n",
     [LiteralTooLarge("a", 21, False), C("b", "NOOP")]),
    (b"a X {99999999999999999999}\r\nb NOOP\r\n", [LiteralTooLarge("a", 10**20 - 1, True), C("b", "NOOP")]),
    # lists and nesting
    (b"a X () (a (b c) NIL) ((()))\r\n", [C("a", "X", L(), L(A("a"), L(A("b"), A("c")), Nil()), L(L(L())))]),
    (b"a X ((((x))))\r\n", [C("a", "X", L(L(L(L(A("x"))))))]),
    (b"a X (((((x)))))\r\nb NOOP\r\n", [BadCommand("a", "Parentheses nested too deeply"), C("b", "NOOP")]),
    (b"a X (x\r\n", [BadCommand("a", "Missing )")]),
    (b"a X x)\r\n", [BadCommand("a", "Unexpected )")]),
    (b"a X ( x)\r\n", [BadCommand("a", "Unexpected space")]),
    (b"a X (x )\r\n", [BadCommand("a", "Unexpected )")]),
    (b"a X  x\r\n", [BadCommand("a", "Unexpected space")]),
    (b"a X x \r\n", [BadCommand("a", "Trailing space")]),
    (b"a X x(y)\r\n", [BadCommand("a", "Expected a space between arguments")]),
    # argument count (every item, lists and literals included)
    (b"a X" + b" x" * 12 + b"\r\n", [C("a", "X", *[A("x")] * 12)]),
    (b"a X" + b" x" * 13 + b"\r\n", [BadCommand("a", "Too many arguments")]),
    (b"a X (" + b" ".join([b"x"] * 11) + b")\r\n", [C("a", "X", L(*[A("x")] * 11))]),
    (b"a X (" + b" ".join([b"x"] * 12) + b")\r\n", [BadCommand("a", "Too many arguments")]),
    (b"a X" + b" x" * 11 + b" {1+}\r\nz\r\nb NOOP\r\n", [C("a", "X", *[A("x")] * 11, Literal(b"z")), C("b", "NOOP")]),
    (b"a X" + b" x" * 12 + b" {1+}\r\nz\r\nb NOOP\r\n", [BadCommand("a", "Too many arguments"), C("b", "NOOP")]),
    # fetch-att sections
    (b"a FETCH 1 BODY[]\r\n", [C("a", "FETCH", N(1), Section("BODY"))]),
    (b"a FETCH 1 body.peek[1.2.mime]\r\n", [C("a", "FETCH", N(1), Section("BODY.PEEK", (1, 2), "MIME"))]),
    (b"a FETCH 1 (BODY[HEADER.FIELDS (A B)]<0.1024> UID)\r\n",
     [C("a", "FETCH", N(1), L(Section("BODY", (), "HEADER.FIELDS", ("A", "B"), (0, 1024)), A("UID")))]),
    (b'a FETCH 1 BODY[3.HEADER.FIELDS.NOT ("x y" Date)]\r\n',
     [C("a", "FETCH", N(1), Section("BODY", (3,), "HEADER.FIELDS.NOT", ("x y", "Date")))]),
    (b"a FETCH 1 BODY[TEXT]<5.1> BODY[2.TEXT] BODY[1.HEADER] BODY[HEADER]\r\n",
     [C("a", "FETCH", N(1), Section("BODY", (), "TEXT", (), (5, 1)), Section("BODY", (2,), "TEXT"),
        Section("BODY", (1,), "HEADER"), Section("BODY", (), "HEADER"))]),
    (b"a FETCH 1 BINARY[1.2] BINARY.PEEK[] BINARY.SIZE[4]\r\n",
     [C("a", "FETCH", N(1), Section("BINARY", (1, 2)), Section("BINARY.PEEK"), Section("BINARY.SIZE", (4,)))]),
    (b"a FETCH 1 BODY[MIME]\r\n", [BadCommand("a", "Invalid section 'MIME'")]),
    (b"a FETCH 1 BODY[0]\r\n", [BadCommand("a", "Invalid section ''")]),
    (b"a FETCH 1 BODY[1.FOO]\r\n", [BadCommand("a", "Invalid section 'FOO'")]),
    (b"a FETCH 1 BODY[HEADER.FIELDS]\r\n", [BadCommand("a", "HEADER.FIELDS needs a list of header names")]),
    (b"a FETCH 1 BODY[HEADER.FIELDS ()]\r\n", [BadCommand("a", "Invalid header name in HEADER.FIELDS")]),
    (b"a FETCH 1 BODY[HEADER.FIELDS (A]\r\n", [BadCommand("a", "Invalid HEADER.FIELDS list")]),
    (b"a FETCH 1 BODY[TEXT\r\n", [BadCommand("a", "Invalid section")]),
    (b"a FETCH 1 BODY[]<1>\r\n", [BadCommand("a", "Invalid partial")]),
    (b"a FETCH 1 BODY[]<1.0>\r\n", [BadCommand("a", "Invalid partial")]),
    (b"a FETCH 1 BINARY[1.TEXT]\r\n", [BadCommand("a", "BINARY takes only a part number")]),
    (b"a FETCH 1 BINARY.SIZE[1]<0.1>\r\n", [BadCommand("a", "BINARY.SIZE takes no partial")]),
    (b"a FETCH 1 BODY[]x\r\n", [BadCommand("a", "Expected a space between arguments")]),
    # tags, empty lines, line ends, bad octets
    (b"\r\n\r\n\na NOOP\r\n", [C("a", "NOOP")]),
    (b"+ NOOP\r\n", [BadCommand(None, "Invalid tag")]),
    (b"a+ NOOP\r\n", [BadCommand(None, "Invalid tag")]),
    (b"* NOOP\r\n", [BadCommand(None, "Invalid tag")]),
    (b"a\r\n", [BadCommand("a", "Missing command name")]),
    (b"a \r\n", [BadCommand("a", "Invalid command name")]),
    (b"a 1NOOP\r\n", [BadCommand("a", "Invalid command name")]),
    (b"a NOOP\nb NOOP\r\n", [BadCommand("a", "Line must end with CRLF"), C("b", "NOOP")]),
    (b"a NOOP\rb NOOP\r\n", [BadCommand("a", "Bare CR in command line")]),
    (b"\r\r\nb NOOP\r\n", [BadCommand(None, "Bare CR in command line"), C("b", "NOOP")]),
    (b"a NO\x00OP\r\nb NOOP\r\n", [BadCommand("a", "NUL in command line"), C("b", "NOOP")]),
    (b"a X \xc3\xa9\r\n", [BadCommand("a", "Unexpected character b'\\xc3' in arguments")]),
    (b"a X {x}\r\n", [BadCommand("a", "Unexpected character b'{' in arguments")]),
    (b"a X {3+}\n", [BadCommand("a", "Line must end with CRLF")]),  # a refused {n+}: swallowed
    (b"a X {3+}\nabc\r\nb NOOP\r\n", [BadCommand("a", "Line must end with CRLF"), C("b", "NOOP")]),
    # over-long lines: answered, skipped to the end, a {n+} at their end swallowed
    (b"a X " + b"x" * 300 + b"\r\nb NOOP\r\n", [BadCommand("a", "Command line too long"), C("b", "NOOP")]),
    (b"x" * 300 + b"\r\nb NOOP\r\n", [BadCommand(None, "Command line too long"), C("b", "NOOP")]),
    (b"a X " + b"x" * 300 + b" {30+}\r\n" + b"c NOOP\r\n" * 3 + b"zzzzzz\r\nb NOOP\r\n",
     [BadCommand("a", "Command line too long"), C("b", "NOOP")]),
    (b"a X " + b"x" * 300 + b" {30}\r\nb NOOP\r\n", [BadCommand("a", "Command line too long"), C("b", "NOOP")]),
    (b"a X {3+}\r\nabc " + b"x" * 200 + b"\r\nb NOOP\r\n", [BadCommand("a", "Command line too long"), C("b", "NOOP")]),
    (b"a X " + b"x" * 190 + b" {3}\r\nabc " + b"y" * 20 + b"\r\nb NOOP\r\n",
     [NeedContinuation(3), BadCommand("a", "Command line too long"), C("b", "NOOP")]),
]


class TableTests(SynchronousTestCase):
    def test_whole(self) -> None:
        for data, expected in CASES:
            self.assertEqual(whole(data, **LIMITS), expected, data)

    def test_byte_by_byte(self) -> None:
        for data, expected in CASES:
            self.assertEqual(bytewise(data, **LIMITS), expected, data)

    def test_every_split(self) -> None:
        for data, expected in CASES:
            for i in range(len(data) + 1):
                self.assertEqual(feed([data[:i], data[i:]], **LIMITS), expected, (data, i))

    def test_all_cases_in_one_stream(self) -> None:
        # Each case resynchronises: the whole table, back to back, is every case's events.
        # (Less the one case that ends inside a swallowed literal.)
        cases = [(d, ev) for d, ev in CASES if d.endswith(b"\r\n")]
        data = b"".join(d + b"z NOOP\r\n" for d, _ in cases)
        expected = [e for _, ev in cases for e in [*ev, C("z", "NOOP")]]
        self.assertEqual(whole(data, **LIMITS), expected)
        self.assertEqual(bytewise(data, **LIMITS), expected)


class NastyTests(SynchronousTestCase):
    def test_literal_split_across_many_chunks(self) -> None:
        body = bytes(range(256)) * 40
        data = b"a APPEND INBOX {%d}\r\n" % len(body) + body + b"\r\nb NOOP\r\n"
        expected = [NeedContinuation(len(body)), C("a", "APPEND", A("INBOX"), Literal(body)), C("b", "NOOP")]
        for size in (1, 2, 3, 7, 100, 4096):
            chunks = [data[i : i + size] for i in range(0, len(data), size)]
            self.assertEqual(feed(chunks, max_literal=len(body)), expected, size)

    def test_continuation_before_the_literal_arrives(self) -> None:
        reader = CommandReader()
        reader.receive_data(b"a LOGIN {4}\r\n")
        self.assertEqual(reader.next_event(), NeedContinuation(4))
        self.assertIs(reader.next_event(), NEED_DATA)
        reader.receive_data(b"us")
        self.assertIs(reader.next_event(), NEED_DATA)
        reader.receive_data(b"er {2}\r\n")
        self.assertEqual(reader.next_event(), NeedContinuation(2))
        reader.receive_data(b"pw\r\n")
        self.assertEqual(reader.next_event(), C("a", "LOGIN", Literal(b"user"), Literal(b"pw")))

    def test_syntax_error_answered_before_continuation(self) -> None:
        # A bad command never gets a "+": the client is told BAD and sends no literal.
        self.assertEqual(whole(b"a LOGIN x) {4}\r\nb NOOP\r\n"), [BadCommand("a", "Unexpected )"), C("b", "NOOP")])
        self.assertEqual(whole(b'a LOGIN "x {4}\r\nb NOOP\r\n'), [BadCommand("a", "Invalid quoted string"), C("b", "NOOP")])
        self.assertEqual(whole(b"a\x00 LOGIN {4}\r\nb NOOP\r\n"), [BadCommand(None, "NUL in command line"), C("b", "NOOP")])

    def test_literal_plus_refused_is_swallowed(self) -> None:
        # The refused literal's content looks like commands; none of it may run.
        inner = b"x LOGOUT\r\ny DELETE INBOX\r\n"
        data = b"a APPEND INBOX {%d+}\r\n" % len(inner) + inner + b"\r\nb NOOP\r\n"
        expected = [LiteralTooLarge("a", len(inner), False), C("b", "NOOP")]
        self.assertEqual(whole(data, max_literal=10), expected)
        self.assertEqual(bytewise(data, max_literal=10), expected)

    def test_literal_minus(self) -> None:
        # RFC 7888 §5: with LITERAL- a {n+} above 4096 is refused, a {n} of the same size is not.
        big = LITERAL_MINUS_MAX + 1
        reader_limits = {"max_literal": 10**6, "max_nonsync_literal": LITERAL_MINUS_MAX}
        data = b"a APPEND x {%d+}\r\n" % big + b"x" * big + b"\r\nb NOOP\r\n"
        self.assertEqual(whole(data, **reader_limits), [LiteralTooLarge("a", big, False), C("b", "NOOP")])
        data = b"a APPEND x {%d}\r\n" % big + b"x" * big + b"\r\n"
        self.assertEqual(whole(data, **reader_limits), [NeedContinuation(big), C("a", "APPEND", A("x"), Literal(b"x" * big))])

    def test_literals_of_one_command_share_the_limit(self) -> None:
        data = b"a X {30+}\r\n" + b"x" * 30 + b" {30+}\r\n" + b"y" * 30 + b"\r\nb NOOP\r\n"
        self.assertEqual(whole(data, max_literal=50), [LiteralTooLarge("a", 30, False), C("b", "NOOP")])

    def test_gigantic_literal_announcement(self) -> None:
        reader = CommandReader()
        reader.receive_data(b"a APPEND INBOX {1073741824}\r\nb NOOP\r\n")
        self.assertEqual(drain(reader), [LiteralTooLarge("a", 2**30, True), C("b", "NOOP")])
        self.assertEqual(reader.buffered, 0)

    def test_ten_thousand_parentheses(self) -> None:
        data = b"a SEARCH " + b"(" * 10000 + b"ALL" + b")" * 10000 + b"\r\nb NOOP\r\n"
        self.assertEqual(whole(data), [BadCommand("a", "Parentheses nested too deeply"), C("b", "NOOP")])

    def test_hundred_thousand_byte_line(self) -> None:
        data = b"a SELECT " + b"x" * 100_000 + b"\r\nb NOOP\r\n"
        reader = CommandReader()
        out: list[Event] = []
        for i in range(0, len(data), 1000):
            reader.receive_data(data[i : i + 1000])
            out += drain(reader)
            self.assertLessEqual(reader.buffered, MAX_LINE)
        self.assertEqual(out, [BadCommand("a", "Command line too long"), C("b", "NOOP")])

    def test_line_limit_counts_every_segment_not_literals(self) -> None:
        lit = b"z" * 1000
        ok = b"a X {1000+}\r\n" + lit + b" " + b"y" * 50 + b"\r\n"
        self.assertEqual(whole(ok, max_line=80, max_literal=1000), [C("a", "X", Literal(lit), A("y" * 50))])
        bad = b"a X {1000+}\r\n" + lit + b" " + b"y" * 70 + b"\r\nb NOOP\r\n"
        self.assertEqual(whole(bad, max_line=80, max_literal=1000), [BadCommand("a", "Command line too long"), C("b", "NOOP")])

    def test_command_right_after_literal_crlf(self) -> None:
        data = b"a LOGIN x {3+}\r\npw!\r\nb SELECT INBOX\r\nc FETCH 1 (FLAGS)\r\n"
        self.assertEqual(
            bytewise(data),
            [C("a", "LOGIN", A("x"), Literal(b"pw!")), C("b", "SELECT", A("INBOX")), C("c", "FETCH", N(1), L(A("FLAGS")))],
        )

    def test_starttls_discards_pipelined_plaintext(self) -> None:
        # RFC 3501 §6.2.1 (the STARTTLS injection of CVE-2011-0411's kind).
        reader = CommandReader()
        reader.receive_data(b"a STARTTLS\r\nb LOGIN user pass\r\nc APPEND x {5+}\r\nab")
        self.assertEqual(reader.next_event(), C("a", "STARTTLS"))
        reader.discard_buffer()
        self.assertIs(reader.next_event(), NEED_DATA)
        self.assertEqual(reader.buffered, 0)
        reader.receive_data(b"d CAPABILITY\r\n")  # the first bytes over TLS
        self.assertEqual(drain(reader), [C("d", "CAPABILITY")])

    def test_discard_in_the_middle_of_a_literal_or_a_skip(self) -> None:
        for prefix in (b"a X {10}\r\nabc", b"a X " + b"x" * 300, b"a X {50+}\r\nab"):
            reader = CommandReader(**LIMITS)
            reader.receive_data(prefix)
            drain(reader)
            reader.discard_buffer()
            reader.receive_data(b"b NOOP\r\n")
            self.assertEqual(drain(reader), [C("b", "NOOP")], prefix)

    def test_raw_lines(self) -> None:
        reader = CommandReader(max_line=24)
        reader.receive_data(b"a IDLE\r\nDONE\r\nb AUTHENTICATE PLAIN\r\n{5+}\r\nc NOOP\r\n")
        self.assertEqual(reader.next_event(), C("a", "IDLE"))
        reader.expect_raw_line()
        self.assertEqual(reader.next_event(), RawLine(b"DONE"))
        self.assertEqual(reader.next_event(), C("b", "AUTHENTICATE", A("PLAIN")))
        reader.expect_raw_line()
        self.assertEqual(reader.next_event(), RawLine(b"{5+}"))  # raw: no literal
        self.assertEqual(reader.next_event(), C("c", "NOOP"))
        reader.expect_raw_line()
        reader.receive_data(b"x" * 30 + b" {3+}\r\nd NOOP\r\n")
        self.assertEqual(drain(reader), [BadCommand(None, "Command line too long"), C("d", "NOOP")])


class SequenceSetTests(SynchronousTestCase):
    def test_resolve(self) -> None:
        cases = [
            ("1:*", 10, ((1, 10),)),
            ("*", 10, ((10, 10),)),
            ("1:*", 0, ()),
            ("*:3", 10, ((3, 10),)),
            ("559:*", 10, ((10, 10),)),  # RFC 3501 §6.4.8: includes the last
            ("5,1:3,4,9:7,20", 10, ((1, 5), (7, 9))),
            ("2,4,6", 10, ((2, 2), (4, 4), (6, 6))),
            ("11:20", 10, ()),
            ("4294967295", 2**32 - 1, ((2**32 - 1, 2**32 - 1),)),
        ]
        for text, largest, expected in cases:
            self.assertEqual(parse_sequence_set(text, largest), expected, text)

    def test_items_and_saved(self) -> None:
        self.assertEqual(S("1:*,5,*:2").items, ((1, None), (5, 5), (None, 2)))
        self.assertTrue(S("$").saved)
        self.assertEqual(S("$").items, ())

    def test_invalid(self) -> None:
        for text in ("", "0", "1:0", "a", "1,", ",1", "1::2", "4294967296", "1 2", "$,1", "\u00e9"):
            self.assertRaises(ValueError, parse_sequence_set, text, 10)

    def test_as_astring(self) -> None:
        self.assertEqual(as_astring(A("INBOX")), "INBOX")
        self.assertEqual(as_astring(N(12)), "12")
        self.assertEqual(as_astring(S("*")), "*")
        self.assertEqual(as_astring(Nil("nil")), "nil")
        self.assertEqual(as_astring(Q("a b")), "a b")
        self.assertEqual(as_astring(Literal("\u00e9".encode())), "\u00e9")
        self.assertIsNone(as_astring(Literal(b"\xff")))
        self.assertIsNone(as_astring(L()))
        self.assertIsNone(as_astring(Section("BODY")))


# -- properties ---------------------------------------------------------------------------

_ATOM_TEXT = st.from_regex(r"\A[A-Za-z][A-Za-z0-9.\-_\]]{0,12}\Z").filter(
    lambda t: t.upper() != "NIL" and not t.upper().startswith(("BODY", "BINARY"))
)
_SEQ_NUM = st.one_of(st.just("*"), st.integers(1, 2**32 - 1).map(str))
_SEQ_ELEMENT = st.one_of(_SEQ_NUM, st.tuples(_SEQ_NUM, _SEQ_NUM).map(":".join))
_SEQ_TEXT = st.one_of(st.just("$"), st.lists(_SEQ_ELEMENT, min_size=1, max_size=4).map(",".join)).filter(
    lambda t: not t.isdigit()
)
_FIELD = st.one_of(st.from_regex(r"\A[A-Za-z][A-Za-z0-9\-]{0,8}\Z"), st.text(st.characters(codec="ascii", exclude_characters="\r\n\x00"), max_size=8))
_SECTION = st.builds(
    Section,
    name=st.sampled_from(["BODY", "BODY.PEEK"]),
    part=st.lists(st.integers(1, 2**32 - 1), max_size=3).map(tuple),
    text=st.sampled_from([None, "HEADER", "TEXT", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "MIME"]),
    fields=st.lists(_FIELD, min_size=1, max_size=3).map(tuple),
    partial=st.one_of(st.none(), st.tuples(st.integers(0, 2**40), st.integers(1, 2**40))),
).map(
    lambda s: Section(
        s.name, s.part, None if s.text == "MIME" and not s.part else s.text,
        s.fields if s.text and s.text.startswith("HEADER.FIELDS") else (), s.partial
    )
)
_BINARY = st.builds(
    Section, name=st.sampled_from(["BINARY", "BINARY.PEEK", "BINARY.SIZE"]),
    part=st.lists(st.integers(1, 99), max_size=3).map(tuple),
).map(lambda s: s if s.name == "BINARY.SIZE" else Section(s.name, s.part))
_LEAF = st.one_of(
    _ATOM_TEXT.map(Atom),
    st.from_regex(r"\A\\[A-Za-z]{1,8}\Z").map(Atom),
    st.integers(0, 2**63 - 1).map(Number),
    _SEQ_TEXT.map(SequenceSet),
    st.text(st.characters(exclude_characters="\r\n\x00", exclude_categories=["Cs"]), max_size=20).map(Quoted),
    st.binary(max_size=40).map(Literal),
    st.just(Nil()),
    _SECTION,
    _BINARY,
)
ARG = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=4).map(lambda xs: ParenList(tuple(xs))), max_leaves=12)
_NAME = st.one_of(
    st.from_regex(r"\A[A-Z][A-Z0-9\-]{0,10}\Z").filter(lambda n: n != "UID"),
    st.sampled_from(["FETCH", "STORE", "COPY", "MOVE", "SEARCH", "EXPUNGE"]).map("UID ".__add__),
)
COMMAND = st.builds(
    Command,
    tag=st.from_regex(r"\A[A-Za-z0-9.\-\]]{1,8}\Z"),
    name=_NAME,
    args=st.lists(ARG, max_size=6).map(tuple),
)


def serialise(command: Command) -> bytes:
    parts = [command.tag.encode(), command.name.encode()] + [respond.encode(a) for a in command.args]
    return b" ".join(parts) + b"\r\n"


def literals(args: tuple[Arg, ...]) -> list[int]:
    out: list[int] = []
    for arg in args:
        if isinstance(arg, Literal):
            out.append(len(arg.value))
        elif isinstance(arg, ParenList):
            out += literals(arg.items)
    return out


SOUP_PIECES = st.one_of(
    st.binary(max_size=12),
    st.sampled_from([
        b"a ", b"NOOP", b"\r\n", b"\n", b"\r", b"{5+}\r\n", b"{3}\r\n", b"{999+}\r\n", b"{12345678901}\r\n", b"(", b")",
        b'"', b"\\", b"\x00", b"\xff", b"BODY[", b"]", b"<0.5>", b"UID ", b" ", b"*", b"x" * 70, b"HEADER.FIELDS (",
    ]),
)
SOUP = st.lists(SOUP_PIECES, max_size=40).map(b"".join)
SOUP_LIMITS = {"max_line": 64, "max_args": 8, "max_depth": 3, "max_literal": 32}


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class PropertyTests(SynchronousTestCase):
    @PROPERTY
    @given(COMMAND)
    def test_round_trip(self, command: Command) -> None:
        events = whole(serialise(command), max_literal=10**6)
        self.assertEqual(events[-1], command)
        self.assertEqual(events[:-1], [NeedContinuation(n) for n in literals(command.args)])

    @PROPERTY
    @given(st.lists(COMMAND, min_size=1, max_size=5), st.lists(st.integers(0, 10**6), max_size=8))
    def test_any_split_of_a_valid_stream(self, commands: list[Command], cuts: list[int]) -> None:
        data = b"".join(serialise(c) for c in commands)
        expected = whole(data, max_literal=10**6)
        self.assertEqual([e for e in expected if isinstance(e, Command)], commands)
        self.assertEqual(feed(splits(data, cuts), max_literal=10**6), expected)

    @PROPERTY
    @given(SOUP, st.lists(st.integers(0, 10**6), max_size=8))
    def test_byte_soup(self, data: bytes, cuts: list[int]) -> None:
        reader = CommandReader(**SOUP_LIMITS)
        events: list[Event] = []
        for chunk in splits(data, cuts):
            reader.receive_data(chunk)
            while (event := reader.next_event()) is not NEED_DATA:
                self.assertIsInstance(event, EVENT_TYPES)
                events.append(event)
            # Bounded: a line's worth of input plus the literal being read, no more.
            self.assertLessEqual(reader.buffered, SOUP_LIMITS["max_line"] + SOUP_LIMITS["max_literal"])
        self.assertEqual(whole(data, **SOUP_LIMITS), events)
        self.assertEqual(bytewise(data, **SOUP_LIMITS), events)
