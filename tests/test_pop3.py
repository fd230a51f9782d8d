"""The sans-IO POP3 core (`mx.pop3`): framing and its bounds, the state table, responses,
the maildrop's numbering and deletion marks, and RETR/TOP bodies fed in every chunking.

Table-driven; no sockets, no Twisted reactor. The byte-exact retrieval cases run every
message through every split point (and a few multi-way splits), so a "." or a CRLF that
falls on a chunk boundary is covered wherever it falls.
"""

from __future__ import annotations

import itertools
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from mx.pop3 import (
    ALLOWED,
    MAX_COMMAND_LINE,
    MAX_SASL_LINE,
    NEED_DATA,
    BadLine,
    Command,
    Entry,
    Maildrop,
    RawLine,
    RespCode,
    Response,
    Retrieval,
    Session,
    State,
    check_allowed,
    multiline,
    parse_number,
)

ROOT = Path(__file__).resolve().parent.parent


def events(data: bytes | list[bytes], raw_after: int | None = None) -> list[object]:
    s = Session()
    out: list[object] = []
    for piece in [data] if isinstance(data, bytes) else data:
        s.receive_data(piece)
        while (e := s.next_event()) is not NEED_DATA:
            out.append(e)
            if raw_after is not None and len(out) == raw_after:
                s.expect_raw_line()
    return out


def unstuff(wire: bytes) -> bytes:
    """What a client makes of a multi-line body (RFC 1939 §3), asserting the terminator."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n", wire[-20:]
    body = wire[:-3]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(x[1:] if x.startswith(b".") else x for x in lines[:-1]) + (b"\r\n" if lines[:-1] else b"")


def retrieve(message: bytes, chunks: list[int], lines: int | None = None) -> bytes:
    """`Retrieval` fed `message` cut at the offsets `chunks`; stops feeding when done."""
    r = Retrieval(lines)
    out = b""
    cuts = [0, *chunks, len(message)]
    for a, b in itertools.pairwise(cuts):
        if r.done:
            break
        out += r.feed(message[a:b])
    return out + r.finish()


class ResponseTests(SynchronousTestCase):
    CASES = [
        (Response.positive(), b"+OK\r\n"),
        (Response.positive("2 320"), b"+OK 2 320\r\n"),
        (Response.err("no such message"), b"-ERR no such message\r\n"),
        (Response.err("Authentication failed", RespCode.AUTH), b"-ERR [AUTH] Authentication failed\r\n"),
        (Response.err("locked", RespCode.IN_USE), b"-ERR [IN-USE] locked\r\n"),
        (Response.err("later", RespCode.SYS_TEMP), b"-ERR [SYS/TEMP] later\r\n"),
        (Response.err("a\r\n+OK injected"), b"-ERR a  +OK injected\r\n"),  # never two lines
    ]

    def test_to_bytes(self) -> None:
        for response, wire in self.CASES:
            self.assertEqual(response.to_bytes(), wire, response)

    def test_multiline_stuffs_and_terminates(self) -> None:
        self.assertEqual(multiline("list", ["1 100", ".hidden", "2 5"]),
                         b"+OK list\r\n1 100\r\n..hidden\r\n2 5\r\n.\r\n")
        self.assertEqual(multiline("", []), b"+OK\r\n.\r\n")


class FramingTests(SynchronousTestCase):
    def test_commands(self) -> None:
        cases = [
            (b"STAT\r\n", [Command("STAT", "")]),
            (b"stat\r\n", [Command("STAT", "")]),
            (b"LIST 1\r\n", [Command("LIST", "1")]),
            (b"PASS secret with spaces \r\n", [Command("PASS", "secret with spaces ")]),
            (b"TOP 1 10\r\nRETR 2\r\n", [Command("TOP", "1 10"), Command("RETR", "2")]),
            (b"NOOP\n", [Command("NOOP", "")]),  # a bare LF is tolerated
            (b"USER j\xc3\xb6rg@example.test\r\n", [Command("USER", "jörg@example.test")]),
        ]
        for data, expected in cases:
            self.assertEqual(events(data), expected, data)

    def test_bad_lines_answered_once_each(self) -> None:
        cases = [
            b"\r\n",  # empty
            b"ST4T\r\n",
            b"STAT\rLIST\r\n",  # a CR inside a line
            b"US\x00ER x\r\n",
            b"USER \xff\r\n",
            b"X" * 41 + b"\r\n",  # keyword longer than RFC 2449 §3 allows
        ]
        for data in cases:
            out = events(data + b"NOOP\r\n")
            self.assertEqual(len(out), 2, data)
            self.assertIsInstance(out[0], BadLine, data)
            self.assertFalse(out[0].response.ok)  # type: ignore[attr-defined]
            self.assertEqual(out[1], Command("NOOP", ""), data)

    def test_command_line_bound(self) -> None:
        ok = b"USER " + b"a" * (MAX_COMMAND_LINE - 7) + b"\r\n"
        self.assertEqual(len(ok), MAX_COMMAND_LINE)
        self.assertIsInstance(events(ok)[0], Command)
        too_long = b"USER " + b"a" * (MAX_COMMAND_LINE - 6) + b"\r\n"
        self.assertIsInstance(events(too_long)[0], BadLine)
        # AUTH carries an initial response: its bound is the SASL one.
        auth = b"AUTH PLAIN " + b"A" * 1000 + b"\r\n"
        self.assertEqual(events(auth), [Command("AUTH", "PLAIN " + "A" * 1000)])

    def test_endless_line_is_skipped_in_bounded_memory_and_answered_once(self) -> None:
        s = Session()
        for _ in range(100):
            s.receive_data(b"x" * 4096)
            self.assertIs(s.next_event(), NEED_DATA)
            self.assertLessEqual(s.buffered, MAX_SASL_LINE + 4096)
        s.receive_data(b"still the same line\r\nSTAT\r\n")
        self.assertIsInstance(s.next_event(), BadLine)
        self.assertEqual(s.next_event(), Command("STAT", ""))
        self.assertIs(s.next_event(), NEED_DATA)

    def test_long_line_split_at_every_point_gives_one_error(self) -> None:
        data = b"USER " + b"b" * (MAX_SASL_LINE + 10) + b"\r\nQUIT\r\n"
        for cut in (1, 100, MAX_SASL_LINE, MAX_SASL_LINE + 1, MAX_SASL_LINE + 14, len(data) - 7):
            out = events([data[:cut], data[cut:]])
            self.assertEqual(len(out), 2, cut)
            self.assertIsInstance(out[0], BadLine, cut)
            self.assertEqual(out[1], Command("QUIT", ""), cut)

    def test_raw_line_after_challenge(self) -> None:
        out = events(b"AUTH PLAIN\r\nAGFsaWNlAHB3\r\nSTAT\r\n", raw_after=1)
        self.assertEqual(out, [Command("AUTH", "PLAIN"), RawLine("AGFsaWNlAHB3"), Command("STAT", "")])
        self.assertEqual(events(b"AUTH PLAIN\r\n*\r\n", raw_after=1)[1], RawLine("*"))
        self.assertEqual(events(b"AUTH PLAIN\r\n\xff\r\n", raw_after=1)[1], RawLine("\x00"))

    def test_discard_buffer_forgets_pipelined_input(self) -> None:
        s = Session()
        s.receive_data(b"STLS\r\nUSER mallory\r\nPASS x\r\n")
        self.assertEqual(s.next_event(), Command("STLS", ""))
        s.discard_buffer()
        self.assertIs(s.next_event(), NEED_DATA)
        self.assertEqual(s.buffered, 0)


class StateTableTests(SynchronousTestCase):
    TABLE = {
        # verb: (allowed in AUTHORIZATION, allowed in TRANSACTION)
        "CAPA": (True, True), "QUIT": (True, True), "USER": (True, False), "PASS": (True, False),
        "AUTH": (True, False), "STLS": (True, False), "STAT": (False, True), "LIST": (False, True),
        "UIDL": (False, True), "RETR": (False, True), "TOP": (False, True), "DELE": (False, True),
        "RSET": (False, True), "NOOP": (False, True), "APOP": (False, False), "XTND": (False, False),
        "LAST": (False, False),
    }

    def test_every_verb_in_every_state(self) -> None:
        for verb, (in_auth, in_trans) in self.TABLE.items():
            for state, allowed in ((State.AUTHORIZATION, in_auth), (State.TRANSACTION, in_trans),
                                   (State.UPDATE, False)):
                if allowed:
                    check_allowed(state, verb)
                else:
                    with self.assertRaises(Response, msg=(verb, state)) as cm:
                        check_allowed(state, verb)
                    self.assertFalse(cm.exception.ok)

    def test_table_is_complete(self) -> None:
        self.assertEqual({v for v, (a, t) in self.TABLE.items() if a or t}, set(ALLOWED))


class NumberTests(SynchronousTestCase):
    def test_parse_number(self) -> None:
        for text, value in [("1", 1), ("0", 0), ("007", 7), ("4294967295", 4294967295)]:
            self.assertEqual(parse_number(text), value)
        for text in ["", "-1", "+1", "1.0", "0x1", "١", "12345678901", " 1", "one"]:
            with self.assertRaises(Response, msg=text):
                parse_number(text)


def drop() -> Maildrop:
    return Maildrop([Entry(10, 100, "0000000A5F000001"), Entry(11, 2000, "0000000B5F000001"),
                     Entry(15, 30, "0000000F5F000001")])


class MaildropTests(SynchronousTestCase):
    def test_stat_list_uidl(self) -> None:
        m = drop()
        self.assertEqual(m.stat().to_bytes(), b"+OK 3 2130\r\n")
        self.assertEqual(m.list([]), b"+OK 3 messages\r\n1 100\r\n2 2000\r\n3 30\r\n.\r\n")
        self.assertEqual(m.list(["2"]).to_bytes(), b"+OK 2 2000\r\n")  # type: ignore[union-attr]
        self.assertEqual(m.uidl([]), b"+OK\r\n1 0000000A5F000001\r\n2 0000000B5F000001\r\n3 0000000F5F000001\r\n.\r\n")
        self.assertEqual(m.uidl(["3"]).to_bytes(), b"+OK 3 0000000F5F000001\r\n")  # type: ignore[union-attr]

    def test_dele_keeps_numbers_and_hides_the_message(self) -> None:
        m = drop()
        self.assertTrue(m.dele(["2"]).ok)
        self.assertEqual(m.stat().to_bytes(), b"+OK 2 130\r\n")
        self.assertEqual(m.list([]), b"+OK 2 messages\r\n1 100\r\n3 30\r\n.\r\n")
        self.assertEqual(m.uidl([]), b"+OK\r\n1 0000000A5F000001\r\n3 0000000F5F000001\r\n.\r\n")
        self.assertEqual(m.deleted_uids(), [11])
        for call in (lambda: m.dele(["2"]), lambda: m.list(["2"]), lambda: m.uidl(["2"]),
                     lambda: m.retr_args("RETR", ["2"]), lambda: m.retr_args("TOP", ["2", "0"])):
            with self.assertRaises(Response):
                call()
        self.assertEqual(m.rset().to_bytes(), b"+OK 3 messages\r\n")
        self.assertEqual(m.deleted_uids(), [])
        self.assertEqual(m.stat().to_bytes(), b"+OK 3 2130\r\n")

    def test_bad_arguments(self) -> None:
        m = drop()
        cases = [
            lambda: m.list(["0"]), lambda: m.list(["4"]), lambda: m.list(["1", "2"]), lambda: m.list(["x"]),
            lambda: m.uidl(["4"]), lambda: m.uidl(["1", "1"]), lambda: m.dele([]), lambda: m.dele(["1", "2"]),
            lambda: m.dele(["-1"]), lambda: m.retr_args("RETR", []), lambda: m.retr_args("RETR", ["1", "2"]),
            lambda: m.retr_args("TOP", ["1"]), lambda: m.retr_args("TOP", ["1", "-1"]),
            lambda: m.retr_args("TOP", ["9", "1"]),
        ]
        for i, call in enumerate(cases):
            with self.assertRaises(Response, msg=i) as cm:
                call()
            self.assertFalse(cm.exception.ok)
        self.assertEqual(m.deleted, set())

    def test_retr_args(self) -> None:
        m = drop()
        self.assertEqual(m.retr_args("RETR", ["1"]), (1, m.entries[0], None))
        self.assertEqual(m.retr_args("TOP", ["3", "0"]), (3, m.entries[2], 0))

    def test_empty_maildrop(self) -> None:
        m = Maildrop([])
        self.assertEqual(m.stat().to_bytes(), b"+OK 0 0\r\n")
        self.assertEqual(m.list([]), b"+OK 0 messages\r\n.\r\n")
        self.assertEqual(m.uidl([]), b"+OK\r\n.\r\n")


MESSAGES = [
    b"Subject: hi\r\n\r\nhello\r\n",
    b"Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nend\r\n.",
    b".starts with a dot\r\n\r\n.\r\n",
    b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\nl4\r\n",
    b"no final newline",
    b"",
    b"\r\n\r\nbody after an empty header\r\n",
    b"Subject: x\r\n\r\n" + b"\r\n".join(b".%d" % i for i in range(30)) + b"\r\n",
]


class RetrievalTests(SynchronousTestCase):
    def test_retr_is_byte_exact_at_every_split(self) -> None:
        for message in MESSAGES:
            expected = message if message.endswith(b"\r\n") or not message else message + b"\r\n"
            for cut in range(len(message) + 1):
                wire = retrieve(message, [cut])
                self.assertEqual(unstuff(wire), expected, (message, cut))
                self.assertNotIn(b"\r\n.\r\n", wire[:-3], (message, cut))  # never ends early

    def test_retr_with_many_small_chunks(self) -> None:
        for message in MESSAGES:
            for size in (1, 2, 3, 5):
                wire = retrieve(message, list(range(size, len(message), size)))
                self.assertEqual(wire, retrieve(message, []), (message, size))

    def test_crlf_message_goes_out_stuffed_but_otherwise_unchanged(self) -> None:
        message = b"Subject: x\r\n\r\n.\r\nfoo\r\n..bar\r\n"
        self.assertEqual(retrieve(message, []), b"Subject: x\r\n\r\n..\r\nfoo\r\n...bar\r\n.\r\n")

    def test_bare_lf_becomes_crlf(self) -> None:
        self.assertEqual(retrieve(b"A: 1\n\n.x\nend\n", [3]), b"A: 1\r\n\r\n..x\r\nend\r\n.\r\n")

    TOP = [
        # (message, lines, the unstuffed body expected)
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\nl4\r\n", 0, b"A: 1\r\nB: 2\r\n\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\nl4\r\n", 1, b"A: 1\r\nB: 2\r\n\r\nl1\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\nl4\r\n", 3, b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\n"),
        (b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\nl4\r\n", 99, b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n.l3\r\nl4\r\n"),
        (b"A: 1\r\n\r\n\r\n\r\nx\r\n", 2, b"A: 1\r\n\r\n\r\n\r\n"),  # empty body lines count
        (b"A: 1\r\n\r\nlast", 5, b"A: 1\r\n\r\nlast\r\n"),
        (b"A: 1\r\nno blank line at all\r\n", 0, b"A: 1\r\nno blank line at all\r\n"),
        (b"\r\nbody only\r\nmore\r\n", 1, b"\r\nbody only\r\n"),
        (b"A: 1\n\nl1\nl2\n", 1, b"A: 1\r\n\r\nl1\r\n"),
    ]

    def test_top_at_every_split(self) -> None:
        for message, lines, expected in self.TOP:
            for cut in range(len(message) + 1):
                self.assertEqual(unstuff(retrieve(message, [cut], lines)), expected, (message, lines, cut))
            for a, b in itertools.combinations(range(1, len(message)), 2):
                self.assertEqual(unstuff(retrieve(message, [a, b], lines)), expected, (message, lines, a, b))

    def test_top_says_when_it_has_enough(self) -> None:
        r = Retrieval(1)
        r.feed(b"A: 1\r\n\r\nl1\r\n")
        self.assertTrue(r.done)
        self.assertEqual(r.feed(b"more\r\n"), b"")
        r = Retrieval(None)
        r.feed(b"A: 1\r\n\r\nl1\r\n" * 3)
        self.assertFalse(r.done)
