"""Table-driven tests of the sans-IO SMTP core (`mx.smtp`): framing, parsing, replies.

Every framing case is fed whole, byte by byte and in seeded random splits, and all the ways
must give the same events: a chunk boundary must never change what the server sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from twisted.trial.unittest import SynchronousTestCase

from mx.smtp import (
    MAX_COMMAND_LINE,
    NEED_DATA,
    BadLine,
    Command,
    DataChunk,
    DataEnd,
    Reply,
    ServerSession,
    dot_stuff,
    parse_command,
    parse_mail_args,
    parse_rcpt_args,
)

SEEDS = range(30)


def splits(wire: bytes) -> list[tuple[str, list[bytes]]]:
    """`wire` whole, byte by byte, and cut at random places (seeded, so reproducible)."""
    ways = [("whole", [wire]), ("bytewise", [wire[i : i + 1] for i in range(len(wire))])]
    for seed in SEEDS:
        rnd = random.Random(seed)
        cuts = sorted(rnd.sample(range(1, len(wire)), min(len(wire) - 1, rnd.randint(1, 8)))) if len(wire) > 1 else []
        bounds = [0, *cuts, len(wire)]
        ways.append((f"seed{seed}", [wire[a:b] for a, b in zip(bounds, bounds[1:])]))
    return ways


def every_two_way_split(wire: bytes) -> list[tuple[str, list[bytes]]]:
    return [(f"cut@{i}", [wire[:i], wire[i:]]) for i in range(1, len(wire))]


# --- command lines -----------------------------------------------------------------------


def command_events(chunks: list[bytes]) -> list[object]:
    """Feed `chunks` one at a time, taking every event after each; NEED_DATA is not listed."""
    s = ServerSession()
    events: list[object] = []
    for chunk in chunks:
        s.receive_data(chunk)
        for _ in range(10_000):
            ev = s.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
        else:
            raise AssertionError("next_event never asked for more data")
    return events


def bad(code: int, enhanced: str) -> tuple[str, int, str]:
    return ("bad", code, enhanced)


def summary(ev: object) -> object:
    if isinstance(ev, BadLine):
        return bad(ev.reply.code, ev.reply.enhanced or "")
    if isinstance(ev, Command):
        return ("cmd", ev.verb, ev.arg)
    raise AssertionError(f"unexpected event {ev!r}")


def cmd(verb: str, arg: str = "") -> tuple[str, str, str]:
    return ("cmd", verb, arg)


COMMAND_CASES: list[tuple[str, bytes, list[object]]] = [
    ("simple", b"NOOP\r\n", [cmd("NOOP")]),
    ("lower case verb", b"noop\r\n", [cmd("NOOP")]),
    ("argument kept as sent", b"MAIL FROM:<A@B.test> SIZE=10\r\n", [cmd("MAIL", "FROM:<A@B.test> SIZE=10")]),
    ("pipelined lines", b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n",
     [cmd("MAIL", "FROM:<a@b>"), cmd("RCPT", "TO:<c@d>"), cmd("DATA")]),
    ("incomplete line waits", b"NOOP\r\nNOO", [cmd("NOOP")]),
    ("bare LF refused", b"NOOP\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("bare CR inside refused", b"NO\rOP\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("CR CR LF refused", b"NOOP\r\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("empty line", b"\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("NUL refused", b"NOOP\x00\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("NUL in verb refused", b"NO\x00OP\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("invalid UTF-8 refused", b"NOOP \xff\xfe\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("overlong UTF-8 refused", b"VRFY \xc0\xaf\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("valid UTF-8 argument", "VRFY jörg\r\n".encode(), [cmd("VRFY", "jörg")]),
    ("non-alpha verb", b"123 x\r\nNOOP\r\n", [bad(500, "5.5.2"), cmd("NOOP")]),
    ("non-ASCII verb", "NÖOP\r\nNOOP\r\n".encode(), [bad(500, "5.5.2"), cmd("NOOP")]),
    ("exactly 512 octets with CRLF",
     b"NOOP " + b"x" * (MAX_COMMAND_LINE - 7) + b"\r\n", [cmd("NOOP", "x" * (MAX_COMMAND_LINE - 7))]),
    ("513 octets is too long",
     b"NOOP " + b"x" * (MAX_COMMAND_LINE - 6) + b"\r\nNOOP\r\n", [bad(500, "5.5.6"), cmd("NOOP")]),
    ("600-byte line: one error, then resync", b"X" * 600 + b"\r\nNOOP\r\n", [bad(500, "5.5.6"), cmd("NOOP")]),
    ("5000-byte line: one error, then resync", b"NOOP " + b"A" * 5000 + b"\r\nQUIT\r\n",
     [bad(500, "5.5.6"), cmd("QUIT")]),
    ("long line ending in bare LF: one error", b"Y" * 700 + b"\nNOOP\r\n", [bad(500, "5.5.6"), cmd("NOOP")]),
    ("long line hiding a command", b"Z" * 600 + b"RSET\r\nNOOP\r\n", [bad(500, "5.5.6"), cmd("NOOP")]),
    ("two long lines", b"a" * 600 + b"\r\n" + b"b" * 900 + b"\r\nNOOP\r\n",
     [bad(500, "5.5.6"), bad(500, "5.5.6"), cmd("NOOP")]),
]


class CommandFramingTests(SynchronousTestCase):
    def test_table(self) -> None:
        for name, wire, expected in COMMAND_CASES:
            for how, chunks in splits(wire):
                got = [summary(e) for e in command_events(chunks)]
                self.assertEqual(got, expected, f"{name} ({how})")

    def test_long_line_buffer_is_capped(self) -> None:
        # A line that never ends must not grow the buffer without bound.
        s = ServerSession()
        for _ in range(200):
            s.receive_data(b"A" * 1000)
            self.assertIs(s.next_event(), NEED_DATA)
            self.assertLessEqual(s.buffered, MAX_COMMAND_LINE + 1000)
        s.receive_data(b"\r\nNOOP\r\n")
        self.assertEqual([summary(s.next_event()), summary(s.next_event())], [bad(500, "5.5.6"), cmd("NOOP")])
        self.assertIs(s.next_event(), NEED_DATA)

    def test_discard_buffer(self) -> None:
        s = ServerSession()
        s.receive_data(b"A" * 600)
        s.next_event()
        s.receive_data(b"RSET\r\n")
        s.discard_buffer()
        self.assertEqual(s.buffered, 0)
        s.receive_data(b"NOOP\r\n")
        self.assertEqual(summary(s.next_event()), cmd("NOOP"))


class ParseCommandTests(SynchronousTestCase):
    CASES: list[tuple[bytes, object]] = [
        (b"EHLO client.example", cmd("EHLO", "client.example")),
        (b"ehlo  two spaces", cmd("EHLO", " two spaces")),
        (b"QUIT", cmd("QUIT")),
        (b"Data", cmd("DATA")),
        (b"", bad(500, "5.5.2")),
        (b" NOOP", bad(500, "5.5.2")),
        (b"NO-OP", bad(500, "5.5.2")),
        (b"NOOP\x00", bad(500, "5.5.2")),
        (b"\xff", bad(500, "5.5.2")),
    ]

    def test_table(self) -> None:
        for line, expected in self.CASES:
            self.assertEqual(summary(parse_command(line)), expected, line)


# --- DATA --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataResult:
    body: bytes
    error: tuple[int, str] | None
    size: int
    leftover: int  # bytes still buffered after DataEnd
    after: tuple[object, ...]  # command events parsed from the leftover


def run_data(chunks: list[bytes], max_size: int = 1 << 20) -> DataResult:
    """Put a session in DATA mode, feed `chunks` one at a time, take events until DataEnd.

    Chunks after the end marker are only buffered; then the leftover is parsed as commands.
    """
    s = ServerSession()
    s.start_data(max_size)
    assert s.in_data
    body = bytearray()
    end: DataEnd | None = None
    for chunk in chunks:
        s.receive_data(chunk)
        while end is None:
            ev = s.next_event()
            if ev is NEED_DATA:
                break
            if isinstance(ev, DataChunk):
                body += ev.data
            elif isinstance(ev, DataEnd):
                end = ev
            else:
                raise AssertionError(f"unexpected event in DATA: {ev!r}")
    if end is None:
        return DataResult(bytes(body), None, -1, s.buffered, ())
    assert not s.in_data
    leftover = s.buffered
    after = []
    while (ev := s.next_event()) is not NEED_DATA:
        after.append(summary(ev))
    err = (end.error.code, end.error.enhanced or "") if end.error is not None else None
    return DataResult(bytes(body), err, end.size, leftover, tuple(after))


def reference_unstuff(wire: bytes) -> tuple[bytes, bytes]:
    """An independent line-by-line reference: (message, rest after the end marker)."""
    lines = []
    pos = 0
    while True:
        eol = wire.index(b"\r\n", pos)
        line = wire[pos:eol]
        pos = eol + 2
        if line == b".":
            return b"".join(lines), wire[pos:]
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


BARE_554 = (554, "5.6.0")

# name, wire, expected body (None: do not check), expected error, commands after the end
DATA_CASES: list[tuple[str, bytes, bytes | None, tuple[int, str] | None, tuple[object, ...]]] = [
    ("simple", b"Subject: hi\r\n\r\nHello\r\n.\r\n", b"Subject: hi\r\n\r\nHello\r\n", None, ()),
    ("'.' first line: empty message", b".\r\n", b"", None, ()),
    ("'.' first line then commands", b".\r\nNOOP\r\n", b"", None, (cmd("NOOP"),)),
    ("one empty line", b"\r\n.\r\n", b"\r\n", None, ()),
    ("stuffed first line", b"..leading dot\r\n.\r\n", b".leading dot\r\n", None, ()),
    ("stuffed later lines", b"a\r\n..b\r\n...\r\n..\r\n.\r\n", b"a\r\n.b\r\n..\r\n.\r\n", None, ()),
    ("unstuffed leading dot is removed", b"a\r\n.b\r\n.\r\n", b"a\r\nb\r\n", None, ()),
    ("first line '..'", b"..\r\n.\r\n", b".\r\n", None, ()),
    ("first line '.x' (unstuffed)", b".x\r\n.\r\n", b"x\r\n", None, ()),
    ("8-bit bytes kept", b"caf\xc3\xa9 \xff\x80\xfe\r\n.\r\n", b"caf\xc3\xa9 \xff\x80\xfe\r\n", None, ()),
    ("dot in the middle of a line", b"a.b\r\n .\r\n.\r\n", b"a.b\r\n .\r\n", None, ()),
    ("bytes after the end stay buffered", b"x\r\n.\r\nNOOP\r\nRSET\r\n", b"x\r\n", None, (cmd("NOOP"), cmd("RSET"))),
    ("partial command after the end", b"x\r\n.\r\nNOO", b"x\r\n", None, ()),
    ("998 chars + CRLF ok", b"x" * 998 + b"\r\n.\r\n", b"x" * 998 + b"\r\n", None, ()),
    ("998 chars in the middle ok", b"a\r\n" + b"y" * 998 + b"\r\nb\r\n.\r\n", b"a\r\n" + b"y" * 998 + b"\r\nb\r\n", None, ()),
    ("999 chars + CRLF refused", b"x" * 999 + b"\r\n.\r\n", None, BARE_554, ()),
    ("999 chars in the middle refused", b"a\r\n" + b"y" * 999 + b"\r\nb\r\n.\r\n", None, BARE_554, ()),
    ("2000-byte line refused, nothing after it runs", b"z" * 2000 + b"\r\nRSET\r\nMAIL FROM:<e@x>\r\n.\r\nNOOP\r\n",
     None, BARE_554, (cmd("NOOP"),)),
    ("NUL refused", b"a\x00b\r\n.\r\n", None, BARE_554, ()),
    ("bare LF refused", b"a\nb\r\n.\r\n", None, BARE_554, ()),
    ("bare CR refused", b"a\rb\r\n.\r\n", None, BARE_554, ()),
    ("CR CR LF refused", b"a\r\r\n.\r\n", None, BARE_554, ()),
    ("LF CR refused", b"a\n\r\n.\r\n", None, BARE_554, ()),
    ("stuffing dot then bare CR", b"a\r\n.\rb\r\n.\r\n", None, BARE_554, ()),
    ("trailing bare CR before end", b"a\r\r\n.\r\n", None, BARE_554, ()),
]

SMUGGLED = b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n"
# Each bare variant of the end marker, then a smuggled transaction, then the real end.
SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n.\r", b"\r\n.\r", b"\r\n.\r\r\n"]
for variant in SMUGGLING:
    DATA_CASES.append((f"smuggling {variant!r}", b"Subject: x\r\n\r\nhello" + variant + SMUGGLED + b".\r\nNOOP\r\n",
                       None, BARE_554, (cmd("NOOP"),)))


class DataFramingTests(SynchronousTestCase):
    def check(self, name: str, wire: bytes, body: bytes | None, error: tuple[int, str] | None,
              after: tuple[object, ...], max_size: int = 1 << 20) -> None:
        results = {how: run_data(chunks, max_size) for how, chunks in splits(wire) + every_two_way_split(wire)}
        whole = results["whole"]
        for how, r in results.items():
            if whole.error is not None:
                # Bytes handed out before the error was seen are discarded by the caller.
                r = replace(r, body=whole.body)
            self.assertEqual(r, whole, f"{name}: {how} differs from whole")
        self.assertNotEqual(whole.size, -1, f"{name}: DATA never ended")
        self.assertEqual(whole.error, error, name)
        self.assertEqual(whole.after, after, name)
        if error is None:
            self.assertEqual(whole.size, len(whole.body), name)
            ref_body, ref_rest = reference_unstuff(wire)
            self.assertEqual(whole.body, ref_body, name)
            self.assertEqual(whole.leftover, len(ref_rest), name)
        if body is not None:
            self.assertEqual(whole.body, body, name)

    def test_table(self) -> None:
        for name, wire, body, error, after in DATA_CASES:
            self.check(name, wire, body, error, after)

    def test_bare_variants_never_end_data(self) -> None:
        for variant in SMUGGLING:
            wire = b"hello" + variant + b"more" + variant
            for how, chunks in splits(wire):
                r = run_data(chunks)
                self.assertEqual(r.size, -1, f"{variant!r} ended DATA ({how})")
                self.assertEqual(r.after, ())

    def test_end_marker_split_at_every_point(self) -> None:
        for prefix in (b"", b"x", b"line\r\n", b"..dot\r\n"):
            wire = prefix + b"\r\n.\r\n" + b"NOOP\r\n" if prefix else b".\r\nNOOP\r\n"
            ref, rest = reference_unstuff(wire)
            for how, chunks in every_two_way_split(wire) + splits(wire):
                r = run_data(chunks)
                self.assertEqual((r.body, r.error, r.after), (ref, None, (cmd("NOOP"),)), f"{wire!r} {how}")

    def test_size_cap(self) -> None:
        # The limit counts message bytes after unstuffing.
        self.check("exactly the limit", b"01234567\r\n.\r\n", b"01234567\r\n", None, (), max_size=10)
        self.check("stuffed dot does not count", b"..1234567\r\n.\r\n", b".1234567\r\n", None, (), max_size=10)
        self.check("one over the limit", b"012345678\r\n.\r\n", None, (552, "5.3.4"), (), max_size=10)
        self.check("far over the limit, then a command",
                   b"x" * 100 + b"\r\n" + b"y" * 500 + b"\r\n.\r\nNOOP\r\n", None, (552, "5.3.4"), (cmd("NOOP"),),
                   max_size=64)

    def test_size_cap_drops_data(self) -> None:
        # Once over the limit, no more message bytes are handed out (memory stays bounded).
        r = run_data([b"a" * 100 + b"\r\n"] * 50 + [b".\r\n"], max_size=1000)
        self.assertEqual(r.error, (552, "5.3.4"))
        self.assertLessEqual(len(r.body), 1000 + 102)

    def test_first_error_wins(self) -> None:
        r = run_data([b"a\x00\r\n" + b"b\n" + b"x" * 5000 + b"\r\n.\r\n"], max_size=10)
        self.assertEqual(r.error, (554, "5.6.0"))

    def test_long_mixed_message(self) -> None:
        rnd = random.Random(7)
        lines = []
        for i in range(400):
            kind = rnd.randrange(6)
            if kind == 0:
                lines.append(b"." * rnd.randint(1, 3) + b"dots %d" % i)
            elif kind == 1:
                lines.append(b"")
            elif kind == 2:
                lines.append(bytes(rnd.randrange(128, 256) for _ in range(rnd.randint(1, 60))))
            elif kind == 3:
                lines.append(b"w" * rnd.randint(900, 998))
            else:
                lines.append(b"line %d %s" % (i, b"." * rnd.randint(0, 5)))
        message = b"".join(line + b"\r\n" for line in lines)
        wire = dot_stuff(message) + b".\r\nQUIT\r\n"
        r = run_data([wire])
        self.assertEqual((r.body, r.error, r.size, r.after), (message, None, len(message), (cmd("QUIT"),)))
        for seed in range(40):
            rnd = random.Random(seed)
            cuts = sorted(rnd.sample(range(1, len(wire)), 60))
            bounds = [0, *cuts, len(wire)]
            self.assertEqual(run_data([wire[a:b] for a, b in zip(bounds, bounds[1:])]), r, f"seed {seed}")
        # A cut between every CR and LF and right after every CRLF.
        cuts = sorted({i for i in range(1, len(wire)) if wire[i - 1 : i + 1] in (b"\r\n",) or wire[i - 2 : i] == b"\r\n"})
        bounds = [0, *cuts, len(wire)]
        self.assertEqual(run_data([wire[a:b] for a, b in zip(bounds, bounds[1:])]), r)

    def test_back_to_commands_after_data(self) -> None:
        s = ServerSession()
        s.receive_data(b"NOOP\r\n")
        self.assertEqual(summary(s.next_event()), cmd("NOOP"))
        s.start_data(100)
        s.receive_data(b"a\r\n.\r\nRSET\r\n")
        self.assertEqual(s.next_event(), DataChunk(b"a\r\n"))
        self.assertEqual(s.next_event(), DataEnd(None, 3))
        self.assertEqual(summary(s.next_event()), cmd("RSET"))
        self.assertIs(s.next_event(), NEED_DATA)


# --- MAIL / RCPT arguments ----------------------------------------------------------------


class MailArgsTests(SynchronousTestCase):
    OK = [
        ("FROM:<a@b.test>", ("<a@b.test>", None, None, False)),
        ("FROM:<>", ("<>", None, None, False)),
        ("from:<a@b.test>", ("<a@b.test>", None, None, False)),
        ("FROM: <a@b.test>", ("<a@b.test>", None, None, False)),
        ("FROM:<a@b.test> SIZE=100", ("<a@b.test>", 100, None, False)),
        ("FROM:<a@b.test> size=0 body=8bitmime smtputf8", ("<a@b.test>", 0, "8BITMIME", True)),
        ("FROM:<a@b.test> BODY=7BIT", ("<a@b.test>", None, "7BIT", False)),
        ("FROM:<a@b.test> AUTH=<>", ("<a@b.test>", None, None, False)),  # RFC 4954 §5
        ("FROM:<a@b.test>  SIZE=5  ", ("<a@b.test>", 5, None, False)),
        ('FROM:<"a>b"@c.test>', ('<"a>b"@c.test>', None, None, False)),
        ('FROM:<"a\\">b"@c.test> SIZE=1', ('<"a\\">b"@c.test>', 1, None, False)),
    ]
    BAD = [
        ("FROM:a@b.test", 501, "5.1.7"),
        ("TO:<a@b.test>", 501, "5.5.4"),
        ("", 501, "5.5.4"),
        ("FROM:<a@b.test", 501, "5.5.4"),
        ("FROM:<a@b.test>SIZE=1", 501, "5.5.4"),
        ("FROM:<a@b.test> SIZE=abc", 555, "5.5.4"),
        ("FROM:<a@b.test> SIZE=", 555, "5.5.4"),
        ("FROM:<a@b.test> SIZE=-1", 555, "5.5.4"),
        ("FROM:<a@b.test> SIZE=" + "9" * 21, 555, "5.5.4"),
        ("FROM:<a@b.test> BODY=BINARYMIME", 555, "5.5.4"),
        ("FROM:<a@b.test> SMTPUTF8=yes", 555, "5.5.4"),
        ("FROM:<a@b.test> AUTH", 555, "5.5.4"),
    ]

    def test_ok(self) -> None:
        for arg, (path, size, body, utf8) in self.OK:
            got = parse_mail_args(arg)
            self.assertEqual((got.path, got.size, got.body, got.smtputf8), (path, size, body, utf8), arg)

    def test_refused(self) -> None:
        for arg, code, enhanced in self.BAD:
            with self.assertRaises(Reply, msg=arg) as cm:
                parse_mail_args(arg)
            self.assertEqual((cm.exception.code, cm.exception.enhanced), (code, enhanced), arg)


class RcptArgsTests(SynchronousTestCase):
    OK = [
        ("TO:<a@b.test>", "<a@b.test>"),
        ("to:<Postmaster>", "<Postmaster>"),
        ("TO: <a@b.test>", "<a@b.test>"),
        ("TO:<a@b.test> ", "<a@b.test>"),
    ]
    BAD = [
        ("TO:a@b.test", 501, "5.1.3"),
        ("FROM:<a@b.test>", 501, "5.5.4"),
        ("TO:<a@b.test> NOTIFY=NEVER", 555, "5.5.4"),
        ("TO:<a@b.test>x", 501, "5.5.4"),
    ]

    def test_ok(self) -> None:
        for arg, path in self.OK:
            self.assertEqual(parse_rcpt_args(arg), path, arg)

    def test_refused(self) -> None:
        for arg, code, enhanced in self.BAD:
            with self.assertRaises(Reply, msg=arg) as cm:
                parse_rcpt_args(arg)
            self.assertEqual((cm.exception.code, cm.exception.enhanced), (code, enhanced), arg)


# --- dot stuffing (the client side) --------------------------------------------------------


class DotStuffTests(SynchronousTestCase):
    CASES = [
        (b"", True, b""),
        (b"abc\r\n", True, b"abc\r\n"),
        (b".abc\r\n", True, b"..abc\r\n"),
        (b".abc\r\n", False, b".abc\r\n"),
        (b"a\r\n.\r\n", True, b"a\r\n..\r\n"),
        (b"a\r\n..b\r\n", True, b"a\r\n...b\r\n"),
        (b".\r\n.\r\n", True, b"..\r\n..\r\n"),
        (b"a.b\r\n", True, b"a.b\r\n"),
    ]

    def test_table(self) -> None:
        for data, at_start, expected in self.CASES:
            self.assertEqual(dot_stuff(data, at_start), expected, (data, at_start))

    MESSAGES = [
        b"plain\r\n",
        b".\r\n",
        b"..\r\n.\r\n...\r\n",
        b"a\r\n.\r\nb\r\n",
        b"\r\n.\r\n\r\n",
        b".start\r\nmid.dle\r\n.end\r\n",
    ]

    def test_round_trip_through_the_server_framing(self) -> None:
        for message in self.MESSAGES:
            wire = dot_stuff(message) + b".\r\n"
            r = run_data([wire])
            self.assertEqual((r.body, r.error), (message, None), message)

    def stream(self, chunks: list[bytes]) -> bytes:
        """Stuff chunk by chunk the documented way: at_line_start = previous chunk ended in
        CRLF, after_cr = it ended in CR."""
        out = []
        prev = b"\r\n"
        for chunk in chunks:
            out.append(dot_stuff(chunk, at_line_start=prev.endswith(b"\r\n"), after_cr=prev.endswith(b"\r")))
            prev = (prev + chunk)[-2:]
        return b"".join(out)

    def test_streamed_chunks_at_line_and_mid_line_boundaries(self) -> None:
        # Dot-stuffing at chunk boundaries in a client: every cut that is not between CR and LF.
        for message in self.MESSAGES:
            for i in range(1, len(message)):
                if message[i - 1 : i + 1] == b"\r\n":
                    continue
                self.assertEqual(self.stream([message[:i], message[i:]]), dot_stuff(message), (message, i))

    def test_streamed_chunks_cut_between_cr_and_lf(self) -> None:
        # A chunk ending in CR followed by one starting "\n." must still stuff that dot; with
        # only `at_line_start` the caller cannot say so, and "\r" | "\n.\r\n" would put a bare
        # end marker on the wire (the relay client would end DATA early: smuggling).
        for message in self.MESSAGES:
            for i in range(1, len(message)):
                if message[i - 1 : i + 1] != b"\r\n":
                    continue
                self.assertEqual(self.stream([message[:i], message[i:]]), dot_stuff(message), (message, i))


# --- replies --------------------------------------------------------------------------------


class ReplyTests(SynchronousTestCase):
    CASES = [
        (Reply(250, None, "OK"), b"250 OK\r\n"),
        (Reply(550, "5.1.1", "No such user"), b"550 5.1.1 No such user\r\n"),
        (Reply(250, None, "mx.example.test greets x\nPIPELINING\nSIZE 10"),
         b"250-mx.example.test greets x\r\n250-PIPELINING\r\n250 SIZE 10\r\n"),
        (Reply(214, "2.0.0", "a\nb"), b"214-2.0.0 a\r\n214 2.0.0 b\r\n"),
        (Reply(421, "4.7.0", "caf\u00e9"), "421 4.7.0 caf\u00e9\r\n".encode()),
    ]

    def test_to_bytes(self) -> None:
        for reply, wire in self.CASES:
            self.assertEqual(reply.to_bytes(), wire, reply)

    def test_is_positive(self) -> None:
        self.assertTrue(Reply(354, None, "go").is_positive)
        self.assertFalse(Reply(421, "4.4.2", "x").is_positive)

    def test_is_raisable(self) -> None:
        with self.assertRaises(Reply) as cm:
            raise Reply(503, "5.5.1", "x")
        self.assertEqual(cm.exception.code, 503)
