"""IMAP SEARCH (`mx.imap.search`): every RFC 3501 key over a handful of messages, the syntax
errors, BADCHARSET, and hypothesis properties.

Queries are written as IMAP sends them and go through the real command reader, so the
tokens are the ones the session will pass. `CASES` pairs a query with the names of the
fixture messages it must match; fixtures cover base64 and quoted-printable bodies, encoded
words in UTF-8 and ISO-8859-1, folded and repeated fields, a multipart with an attachment
and a message/rfc822. Internal dates are made with `time.mktime`, so the cases hold in any
local time zone; one test pins the zone to check that the local calendar day is used.
"""

from __future__ import annotations

import base64
import os
import time
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mx import mime
from mx.imap import search as search_module
from mx.imap.parse import (
    NEED_DATA,
    Arg,
    Atom,
    Command,
    CommandReader,
    Literal,
    NeedContinuation,
    Nil,
    Number,
    ParenList,
    Quoted,
    Section,
    SequenceSet,
)
from mx.imap.search import (
    MAX_DEPTH,
    BadCharset,
    Need,
    Query,
    SearchError,
    body_text,
    matches,
    parse_search,
)


@dataclass
class Msg:
    seq: int
    uid: int
    flags: frozenset[str]
    size: int
    internaldate: float | None
    data: bytes | None
    root: mime.Part | None


def local(y: int, mo: int, d: int, h: int = 12, mi: int = 0, s: int = 0) -> float:
    return time.mktime((y, mo, d, h, mi, s, 0, 0, -1))


def make(seq: int, uid: int, flags: set[str], when: float | None, data: bytes) -> Msg:
    return Msg(seq, uid, frozenset(flags), len(data), when, data, mime.scan(data))


def crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


PLAIN = crlf(
    "Received: from mx1.example.org\n"
    "Date: Tue, 1 Jul 2003 10:52:37 +0200\n"
    "From: Alice Example <alice@example.org>\n"
    "To: bob@example.net\n"
    "Cc: Carol <carol@example.com>\n"
    "Bcc: dave@example.com\n"
    "Subject: Lunch on Friday\n"
    "\n"
    "Shall we meet at noon?\n"
)
B64 = crlf(
    # In UTC this is 3 Jul: SENTON must use the day as written.
    "Date: Wed, 02 Jul 2003 23:59:59 -0700\n"
    "From: =?UTF-8?Q?J=C3=B6rg?= <joerg@example.de>\n"
    "To: alice@example.org\n"
    "Subject: =?UTF-8?B?R3LDvMOfZSBhdXMgS8O2bG4=?=\n"
    "MIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
) + base64.encodebytes("Ein schöner Tag in Köln.\nBis bald!\n".encode("utf-8")).replace(b"\n", b"\r\n")
QP = crlf(
    "From: francois@example.fr\n"
    "To: Bob\n"
    " <bob@example.net>\n"
    "Subject: =?ISO-8859-1?Q?Caf=E9_cr=E8me?=\n"
    "Content-Type: text/plain; charset=iso-8859-1\n"
    "Content-Transfer-Encoding: quoted-printable\n"
    "\n"
    "Le caf=E9 est pr=EAt, ma=\n"
    "intenant.\n"
)  # no Date: never matches SENT*
MULTI = crlf(
    "Date: 3 Jul 2003 08:00:00 +0000\n"
    "From: alice@example.org\n"
    "To: bob@example.net\n"
    "Subject: Report attached\n"
    "X-Tag: first-value\n"
    "X-Tag: second-value\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="b1"\n'
    "\n"
    "preamble-text\n"
    "--b1\n"
    "Content-Type: text/plain\n"
    "\n"
    "Please see the attachment.\n"
    "--b1\n"
    "Content-Type: text/html; charset=utf-8\n"
    "\n"
    "<p>Quarterly <b>numbers</b></p>\n"
    "--b1\n"
    "Content-Type: application/octet-stream; name=report.bin\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
) + base64.encodebytes(b"SECRETWORD in binary \x00\x01").replace(b"\n", b"\r\n") + crlf(
    "--b1--\n"
    "epilogue-text\n"
)
INNER = crlf(
    "From: inner@example.org\n"
    "Subject: Inner subject\n"
    "Content-Type: text/plain; charset=utf-8\n"
    "Content-Transfer-Encoding: base64\n"
    "\n"
) + base64.encodebytes(b"inner body word\n").replace(b"\n", b"\r\n")
FWD = crlf(
    "Date: Thu, 10 Jul 03 09:00:00 GMT\n"
    "From: bob@example.net\n"
    "To: alice@example.org\n"
    "Subject: Fwd: something\n"
    'Content-Type: multipart/mixed; boundary="outer"\n'
    "\n"
    "--outer\n"
    "Content-Type: text/plain\n"
    "\n"
    "Forwarded below.\n"
    "--outer\n"
    "Content-Type: message/rfc822\n"
    "\n"
) + INNER + crlf("--outer--\n")

MESSAGES = {
    "plain": make(1, 10, {"\\Seen"}, local(2003, 7, 1), PLAIN),
    "b64": make(2, 20, {"\\Recent"}, local(2003, 7, 2, 23, 59, 59), B64),
    "qp": make(3, 30, {"\\Answered", "\\Flagged", "Work", "$Forwarded"}, local(2003, 7, 3, 0, 0, 0), QP),
    "multi": make(4, 40, {"\\Deleted", "\\Draft"}, local(2003, 7, 3), MULTI),
    "fwd": make(5, 50, {"\\Recent", "\\Seen"}, local(2003, 7, 10), FWD),
}
ALL = set(MESSAGES)
MAX_SEQ, MAX_UID = 5, 50
SIZES = sorted(m.size for m in MESSAGES.values())
assert len(set(SIZES)) == 5, "the size cases need distinct sizes"
BY_SIZE = sorted(MESSAGES, key=lambda name: MESSAGES[name].size)


def command_args(text: bytes) -> tuple[Arg, ...]:
    """`text` (what follows "SEARCH") as the reader's argument tuple; literals allowed."""
    reader = CommandReader()
    reader.receive_data(b"A1 SEARCH " + text + b"\r\n")
    while True:
        event = reader.next_event()
        if isinstance(event, NeedContinuation):
            continue
        assert isinstance(event, Command), (text, event)
        assert reader.next_event() is NEED_DATA
        return event.args


def search(text: bytes, messages: dict[str, Msg] = MESSAGES) -> set[str]:
    query = parse_search(command_args(text))
    return {name for name, m in messages.items()
            if matches(query, m, max_seq=MAX_SEQ, max_uid=MAX_UID)}


def but(*names: str) -> set[str]:
    return ALL - set(names)


# (what follows SEARCH, the fixtures it matches)
CASES: list[tuple[bytes, set[str]]] = [
    (b"ALL", ALL),
    (b"all", ALL),
    # flags
    (b"ANSWERED", {"qp"}),
    (b"UNANSWERED", but("qp")),
    (b"DELETED", {"multi"}),
    (b"UNDELETED", but("multi")),
    (b"DRAFT", {"multi"}),
    (b"UNDRAFT", but("multi")),
    (b"FLAGGED", {"qp"}),
    (b"UNFLAGGED", but("qp")),
    (b"SEEN", {"plain", "fwd"}),
    (b"UNSEEN", {"b64", "qp", "multi"}),
    (b"RECENT", {"b64", "fwd"}),
    (b"NEW", {"b64"}),
    (b"OLD", {"plain", "qp", "multi"}),
    (b"KEYWORD Work", {"qp"}),
    (b"KEYWORD work", {"qp"}),  # keywords compare case-insensitively
    (b"KEYWORD $forwarded", {"qp"}),
    (b"KEYWORD Other", set()),
    (b"UNKEYWORD WORK", but("qp")),
    (b'KEYWORD "Work"', {"qp"}),
    # sizes
    (b"LARGER %d" % SIZES[2], set(BY_SIZE[3:])),
    (b"SMALLER %d" % SIZES[2], set(BY_SIZE[:2])),
    (b"LARGER 0", ALL),
    (b"SMALLER 0", set()),
    (b"LARGER 00%d" % SIZES[3], set(BY_SIZE[4:])),  # number = 1*DIGIT: leading zeros allowed
    (b"LARGER 9223372036854775807", set()),
    # sequence numbers and UIDs; "*" is the largest, n:* includes it even past the end
    (b"2", {"b64"}),
    (b"2:3", {"b64", "qp"}),
    (b"3:2", {"b64", "qp"}),
    (b"*", {"fwd"}),
    (b"4:*", {"multi", "fwd"}),
    (b"9:*", {"fwd"}),
    (b"1,3,5", {"plain", "qp", "fwd"}),
    (b"1:2,4:*", but("qp")),
    (b"6", set()),
    (b"4294967295", set()),
    (b"UID 20:30", {"b64", "qp"}),
    (b"UID *", {"fwd"}),
    (b"UID 45:*", {"fwd"}),
    (b"UID 60:*", {"fwd"}),
    (b"UID 1,30,31:39", {"qp"}),
    (b"UID 1:9", set()),
    (b"UID 10", {"plain"}),
    # header keys: decoded, unfolded, case-insensitive, every occurrence
    (b"FROM alice", {"plain", "multi"}),
    (b'FROM "ALICE EXAMPLE"', {"plain"}),
    (b'FROM "j\xc3\xb6rg"', {"b64"}),
    (b'FROM "J\xc3\x96RG <joerg@"', {"b64"}),
    (b"FROM {5}\r\nj\xc3\xb6rg", {"b64"}),
    (b"TO alice", {"b64", "fwd"}),
    (b'TO "bob <bob@example.net>"', {"qp"}),  # folded: the fold's line end is gone
    (b"TO bob@example.net", {"plain", "qp", "multi"}),
    (b"CC carol", {"plain"}),
    (b"CC example", {"plain"}),
    (b"BCC dave", {"plain"}),
    (b"BCC carol", set()),
    (b'SUBJECT "lunch on"', {"plain"}),
    (b'SUBJECT "GR\xc3\x9cSSE aus"', {"b64"}),  # casefold: "\xdf" is "ss"
    (b'SUBJECT "gr\xc3\xbc\xc3\x9fe aus k\xc3\xb6ln"', {"b64"}),
    (b'SUBJECT "caf\xc3\xa9 cr\xc3\xa8me"', {"qp"}),  # ISO-8859-1 Q word, "_" is a space
    (b"SUBJECT =?", set()),
    (b"SUBJECT inner", set()),  # an embedded message's header is not the message's
    (b'SUBJECT ""', ALL),
    (b"HEADER X-Tag second-value", {"multi"}),
    (b"HEADER x-tag first", {"multi"}),
    (b'HEADER X-TAG ""', {"multi"}),
    (b'HEADER Date ""', but("qp")),
    (b"HEADER Received mx1", {"plain"}),
    (b"HEADER Content-Transfer-Encoding base64", {"b64"}),
    (b'HEADER "" ""', set()),
    (b"HEADER subject friday", {"plain"}),
    # BODY: decoded text parts, not the header, not attachments
    (b"BODY noon", {"plain"}),
    (b'BODY "sch\xc3\xb6ner tag"', {"b64"}),
    (b'BODY "caf\xc3\xa9 est pr\xc3\xaat, maintenant"', {"qp"}),  # soft line break joined
    (b"BODY attachment", {"multi"}),
    (b"BODY quarterly", {"multi"}),  # text/html is text
    (b"BODY SECRETWORD", set()),  # inside an application/octet-stream
    (b"BODY preamble", set()),
    (b"BODY epilogue", set()),
    (b'BODY "inner body word"', {"fwd"}),
    (b'BODY "forwarded below"', {"fwd"}),
    (b"BODY lunch", set()),
    (b"BODY inner@example.org", set()),  # embedded headers are not BODY
    (b"BODY R3LDvMOfZSBhdXMgS8O2bG4", set()),
    (b'BODY ""', ALL),
    # TEXT: header or body
    (b"TEXT lunch", {"plain"}),
    (b"TEXT noon", {"plain"}),
    (b'TEXT "inner subject"', {"fwd"}),
    (b'TEXT "inner body"', {"fwd"}),
    (b"TEXT second-value", {"multi"}),
    (b'TEXT "k\xc3\xb6ln"', {"b64"}),
    (b"TEXT SECRETWORD", set()),
    # internal dates: the local calendar day
    (b"ON 3-Jul-2003", {"qp", "multi"}),
    (b'ON "3-jul-2003"', {"qp", "multi"}),
    (b"ON 03-JUL-2003", {"qp", "multi"}),
    (b"BEFORE 3-Jul-2003", {"plain", "b64"}),
    (b"SINCE 3-Jul-2003", {"qp", "multi", "fwd"}),
    (b"SINCE 11-Jul-2003", set()),
    (b"BEFORE 1-Jul-2003", set()),
    (b"ON 2-Jul-2003", {"b64"}),
    # Date: header days as written
    (b"SENTON 2-Jul-2003", {"b64"}),
    (b"SENTON 1-Jul-2003", {"plain"}),
    (b"SENTBEFORE 3-Jul-2003", {"plain", "b64"}),
    (b"SENTSINCE 3-Jul-2003", {"multi", "fwd"}),
    (b"SENTON 10-Jul-2003", {"fwd"}),  # two-digit year
    (b"NOT SENTON 1-Jul-2003", but("plain")),  # qp has no Date: it never matches, so NOT does
    (b"OR SENTBEFORE 1-Jan-3000 SENTSINCE 1-Jan-1900", but("qp")),
    # combinations
    (b"SEEN UNDELETED", {"plain", "fwd"}),
    (b"(SEEN UNDELETED)", {"plain", "fwd"}),
    (b"((SEEN) (UNDELETED))", {"plain", "fwd"}),
    (b"OR SEEN FLAGGED", {"plain", "qp", "fwd"}),
    (b"OR (FROM alice) (SUBJECT \"caf\xc3\xa9\")", {"plain", "multi", "qp"}),
    (b"NOT SEEN", {"b64", "qp", "multi"}),
    (b"NOT NOT SEEN", {"plain", "fwd"}),
    (b"NOT (SEEN UNDELETED)", {"b64", "qp", "multi"}),
    (b"(OR 1 2) UNSEEN", {"b64"}),
    (b"UNSEEN BODY attachment", {"multi"}),
    (b"OR OR 1 2 UID 50", {"plain", "b64", "fwd"}),
    (b"1:* NOT UID 20:40", {"plain", "fwd"}),
    (b"OR NOT FROM alice NOT TO alice", ALL),
    # CHARSET
    (b'CHARSET UTF-8 SUBJECT "gr\xc3\xbc\xc3\x9fe"', {"b64"}),
    (b"CHARSET utf-8 ALL", ALL),
    (b'CHARSET "US-ASCII" SEEN', {"plain", "fwd"}),
    (b"charset us-ascii FROM alice", {"plain", "multi"}),
]

# What follows SEARCH, with a SearchError (never BadCharset) expected
ERRORS: list[bytes] = [
    b"FOO",
    b"CHARSET",
    b"CHARSET UTF-8",  # no key
    b"SEEN CHARSET UTF-8",  # CHARSET only first
    b"FROM",
    b"SUBJECT",
    b"HEADER X-Tag",
    b"HEADER",
    b"KEYWORD",
    b"KEYWORD \\Seen",  # flag-keyword is an atom
    b"KEYWORD (Work)",
    b'KEYWORD "two words"',
    b"LARGER",
    b"LARGER x",
    b"LARGER -1",
    b"LARGER 1:2",
    b"LARGER 99999999999999999999",
    b"SMALLER NIL",
    b"BEFORE",
    b"BEFORE 32-Jan-2003",
    b"BEFORE 29-Feb-2003",
    b"BEFORE 0-Jan-2003",
    b"BEFORE 1-Foo-2003",
    b"BEFORE 1-Jan-03",
    b"BEFORE 2003-01-01",
    b"BEFORE 001-Jan-2003",
    b"SINCE {10}\r\n1-Jan-2003",  # a date is never a literal
    b"ON 1-Jan-0000",
    b"SENTON (1-Jan-2003)",
    b"UID",
    b"UID foo",
    b"UID 1:",
    b"UID 0",
    b"UID 4294967296",
    b"UID $",  # SEARCHRES is not enabled
    b"$",
    b"1:",
    b"0",
    b"1:0",
    b"4294967296",
    b"*:",
    b",1",
    b"NOT",
    b"OR SEEN",
    b"OR",
    b"()",
    b"(SEEN) ()",
    b"NIL",
    b'"SEEN"',
    b"{4}\r\nSEEN",
    b"BODY[TEXT]",
    b"SUBJECT (x)",
    b"SUBJECT {2}\r\n\xff\xfe",  # a literal that is no UTF-8
    b"SEEN FOO",
]


class CaseTests(SynchronousTestCase):
    def test_cases(self) -> None:
        for text, expected in CASES:
            with self.subTest(query=text):
                self.assertEqual(search(text), expected, text)

    def test_every_key_is_covered(self) -> None:
        keys = {"ALL", "ANSWERED", "BCC", "BEFORE", "BODY", "CC", "DELETED", "DRAFT", "FLAGGED",
                "FROM", "HEADER", "KEYWORD", "LARGER", "NEW", "NOT", "OLD", "ON", "OR", "RECENT",
                "SEEN", "SENTBEFORE", "SENTON", "SENTSINCE", "SINCE", "SMALLER", "SUBJECT",
                "TEXT", "TO", "UID", "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED",
                "UNKEYWORD", "UNSEEN"}
        used = {word.upper() for text, _ in CASES for word in text.decode("utf-8", "replace").split()}
        self.assertEqual(keys - used, set())

    def test_errors(self) -> None:
        for text in ERRORS:
            with self.subTest(query=text):
                with self.assertRaises(SearchError) as caught:
                    parse_search(command_args(text))
                self.assertNotIsInstance(caught.exception, BadCharset)
                self.assertTrue(str(caught.exception))

    def test_empty_arguments(self) -> None:
        self.assertRaises(SearchError, parse_search, ())

    def test_badcharset(self) -> None:
        for text in [b"CHARSET ISO-8859-1 ALL", b"CHARSET KOI8-R SUBJECT x", b"CHARSET UTF8 ALL",
                     b'CHARSET "" ALL', b'CHARSET "US-A\xc5\xbfCII" ALL', b"CHARSET {5}\r\nutf-7 ALL"]:
            with self.subTest(query=text):
                with self.assertRaises(BadCharset) as caught:
                    parse_search(command_args(text))
                self.assertIsInstance(caught.exception, SearchError)
        # The charset is refused before the keys are read (NO [BADCHARSET], not BAD).
        self.assertRaises(BadCharset, parse_search, command_args(b"CHARSET KOI8-R FOO"))
        self.assertEqual(BadCharset("KOI8-R").charset, "KOI8-R")

    def test_charset_and_need(self) -> None:
        table = [
            (b"ALL", Need.FLAGS, "US-ASCII"),
            (b"CHARSET utf-8 UNSEEN UID 1:* LARGER 5 KEYWORD x NOT OLD", Need.FLAGS, "UTF-8"),
            (b"OR SEEN SINCE 1-Jan-2000", Need.DATE, "US-ASCII"),
            (b"NOT (SEEN (FROM x))", Need.HEADER, "US-ASCII"),
            (b"SENTON 1-Jan-2000", Need.HEADER, "US-ASCII"),
            (b"HEADER a b", Need.HEADER, "US-ASCII"),
            (b"SEEN OR 1 (TEXT x)", Need.BODY, "US-ASCII"),
            (b"BODY x ON 1-Jan-2000", Need.BODY, "US-ASCII"),
        ]
        for text, need, charset in table:
            with self.subTest(query=text):
                query = parse_search(command_args(text))
                self.assertEqual((query.need, query.charset), (need, charset))

    def test_query_is_a_value(self) -> None:
        a = parse_search(command_args(b"OR SEEN (FROM x)"))
        b = parse_search(command_args(b"OR SEEN (FROM x)"))
        self.assertEqual(a, b)
        self.assertEqual(a.key.name, "AND")
        self.assertEqual(a.key.keys[0].name, "OR")
        self.assertEqual(a.key.keys[0].keys[1].value, "x")

    def test_nesting_is_bounded(self) -> None:
        ok = b"NOT " * (MAX_DEPTH - 1) + b"SEEN"
        self.assertEqual(search(ok), {"b64", "qp", "multi"})  # MAX_DEPTH - 1 NOTs: odd
        self.assertRaises(SearchError, parse_search, command_args(b"NOT " * (MAX_DEPTH + 1) + b"SEEN"))
        self.assertRaises(SearchError, parse_search, command_args(b"OR " * (MAX_DEPTH + 1) + b"SEEN" + b" SEEN" * (MAX_DEPTH + 1)))
        deep: Arg = Atom("SEEN")
        for _ in range(1000):  # deeper than the reader allows: built by hand
            deep = ParenList((deep,))
        self.assertRaises(SearchError, parse_search, (deep,))

    def test_star_follows_the_mailbox(self) -> None:
        query = parse_search(command_args(b"UID 8:*"))  # 8:* holds the largest UID, 7
        m = make(1, 7, set(), None, PLAIN)
        self.assertTrue(matches(query, m, max_seq=1, max_uid=7))
        self.assertFalse(matches(query, m, max_seq=1, max_uid=9))
        self.assertTrue(matches(query, m, max_seq=1, max_uid=7))
        self.assertFalse(matches(query, m, max_seq=1, max_uid=0))
        star = parse_search(command_args(b"*"))
        self.assertTrue(matches(star, m, max_seq=1, max_uid=7))
        self.assertFalse(matches(star, m, max_seq=2, max_uid=7))

    def test_flags_need_nothing_more(self) -> None:
        query = parse_search(command_args(b"OR UNSEEN (2:* LARGER 10)"))
        m = Msg(3, 3, frozenset({"\\Seen"}), 11, None, None, None)
        self.assertTrue(matches(query, m, max_seq=3, max_uid=3))

    def test_missing_date_or_data_never_matches(self) -> None:
        m = Msg(1, 1, frozenset(), 0, None, None, None)
        for text in [b"ON 1-Jan-2000", b"SINCE 1-Jan-1900", b"BEFORE 1-Jan-3000", b"FROM x", b"BODY x",
                     b"SENTSINCE 1-Jan-1900"]:
            with self.subTest(query=text):
                self.assertFalse(matches(parse_search(command_args(text)), m, max_seq=1, max_uid=1))

    def test_internal_date_uses_local_time(self) -> None:
        if not hasattr(time, "tzset"):
            self.skipTest("time.tzset is Unix only")
        old = os.environ.get("TZ")

        def restore() -> None:
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = "JST-9"  # POSIX form: UTC+9 without tz data
        time.tzset()
        # 2003-07-01 20:00 UTC is 2 Jul 05:00 in Tokyo.
        m = make(1, 1, set(), 1057089600.0, PLAIN)
        for text, expected in [(b"ON 2-Jul-2003", True), (b"ON 1-Jul-2003", False),
                               (b"SINCE 2-Jul-2003", True), (b"BEFORE 2-Jul-2003", False)]:
            with self.subTest(query=text):
                query = parse_search(command_args(text))
                self.assertEqual(matches(query, m, max_seq=1, max_uid=1), expected)

    def test_many_ranges(self) -> None:
        query = parse_search(command_args(b"UID 1:3,7,10:12,20:*"))
        inside = {n for n in range(1, 40)
                  if matches(query, Msg(1, n, frozenset(), 0, None, None, None), max_seq=1, max_uid=30)}
        self.assertEqual(inside, {1, 2, 3, 7, 10, 11, 12} | set(range(20, 31)))

    def test_hand_built_tokens(self) -> None:
        # What the reader makes, and a few it does not: still only SearchError.
        self.assertEqual(
            search_args((Atom("SUBJECT"), Literal("caf\xe9".encode("utf-8")))), {"qp"})
        for args in [(SequenceSet("x"),), (Number(0),), (Number(2**40),), (Atom("UID"), Number(0)),
                     (Section("BODY"),), (Nil(),), (Quoted("ALL"),), (Atom(""),),
                     (Atom("LARGER"), Number(2**63)), (Atom("BEFORE"), Quoted("1-Jan-2003 "))]:
            with self.subTest(args=args):
                self.assertRaises(SearchError, parse_search, args)


def search_args(args: tuple[Arg, ...]) -> set[str]:
    query = parse_search(args)
    return {name for name, m in MESSAGES.items() if matches(query, m, max_seq=MAX_SEQ, max_uid=MAX_UID)}


class BodyTextTests(SynchronousTestCase):
    def text(self, data: bytes) -> str:
        return body_text(data, mime.scan(data))

    def test_fixtures(self) -> None:
        self.assertEqual(self.text(PLAIN), "Shall we meet at noon?\r\n")
        self.assertEqual(self.text(B64), "Ein schöner Tag in Köln.\nBis bald!\n")
        self.assertEqual(self.text(QP), "Le café est prêt, maintenant.\r\n")
        self.assertEqual(self.text(MULTI), "Please see the attachment.\n<p>Quarterly <b>numbers</b></p>")
        self.assertEqual(self.text(FWD), "Forwarded below.\ninner body word\n")

    def test_charsets(self) -> None:
        def one(charset: str, cte: str, body: bytes) -> str:
            return self.text(b"Content-Type: text/plain; charset=" + charset.encode() +
                             b"\r\nContent-Transfer-Encoding: " + cte.encode() + b"\r\n\r\n" + body)

        self.assertEqual(one("iso-8859-1", "8bit", b"caf\xe9"), "café")
        self.assertEqual(one("us-ascii", "8bit", "café".encode("utf-8")), "café")  # mislabelled
        self.assertEqual(one("us-ascii", "8bit", b"caf\xe9"), "café")  # Latin-1, last resort
        self.assertEqual(one("utf-8", "8bit", b"caf\xe9!"), "caf\ufffd!")  # bad bytes replaced
        self.assertEqual(one("x-unknown", "8bit", b"caf\xe9"), "café")
        self.assertEqual(one("base64", "8bit", b"abc"), "abc")  # not a text codec
        self.assertEqual(one("idna", "8bit", b"caf\xe9"), "café")
        self.assertEqual(one("koi8-r", "base64", base64.b64encode("Привет".encode("koi8-r"))), "Привет")
        self.assertEqual(one("utf-8", "base64", b"Y2Fmw6k"), "café")  # padding missing
        self.assertEqual(one("utf-8", "base64", b"Y2\r\nFm w6k=\r\n===\r\n"), "café")
        self.assertEqual(one("utf-8", "base64", b"Y2Fmw6kx\r\nA"), "café1")  # a stray last char
        self.assertEqual(one("utf-8", "quoted-printable", b"caf=C3=A9=\r\n=ZZ"), "café=ZZ")
        self.assertEqual(one("utf-8", "x-uuencode", b"raw"), "raw")

    def test_non_text_leaves_are_skipped(self) -> None:
        data = crlf("Content-Type: image/png\n\nfake png bytes")
        self.assertEqual(self.text(data), "")
        data = crlf("Content-Type: multipart/mixed\n\nno boundary, so a leaf")
        self.assertEqual(self.text(data), "")

    def test_broken_encoded_word_charset(self) -> None:
        # mime.decode_words raises for a non-text codec named as charset; SEARCH must not.
        data = crlf("Subject: =?base64?B?YWJj?= and =?idna?Q?x?=\n\nbody")
        m = make(1, 1, set(), None, data)
        query = parse_search(command_args(b"OR SUBJECT and TEXT zzz"))
        self.assertTrue(matches(query, m, max_seq=1, max_uid=1))


class ShortcutTests(SynchronousTestCase):
    """`_Texts.lacks` skips decoding when a plain message's bytes lack a run of the needle; it
    must never turn a match into a miss."""

    def one(self, query: bytes, data: bytes) -> bool:
        m = make(1, 1, set(), None, data)
        return matches(parse_search(command_args(query)), m, max_seq=1, max_uid=1)

    def test_plain_messages_still_match(self) -> None:
        folded = crlf("From: a@example.org\nTo: Bob\n <bob@example.net>\nSubject : Hi\n\nbody\n")
        table = [
            (b'TO "bob <bob@"', folded, True),  # across the fold
            (b'TEXT "bob <bob@"', folded, True),
            (b'TEXT "subject: hi"', folded, True),  # "Subject :" becomes "subject: "
            (b"TEXT subject:hi", folded, False),
            (b"TEXT body", folded, True),
            (b"TEXT {7}\r\nhi\nbody", folded, False),  # the "\n" between header and body is no text
            (b"TO nobody", folded, False),
            (b'TO "caf\xc3\xa9"', folded, False),  # non-ASCII: in no 7-bit header
            (b"TEXT {12}\r\nnet>\nsubject", folded, True),  # fields are joined by "\n"
            (b"TEXT maintenant", crlf("Content-Transfer-Encoding: quoted-printable\n\nmain=\ntenant\n"), True),
            (b"TEXT hello", crlf("Content-Transfer-Encoding: base64\n\naGVsbG8=\n"), True),
            (b"TEXT a", crlf("Content-Type: text/plain; charset=utf-7\n\n+AGE-\n"), True),
            (b'TEXT "\xc3\xa9"', crlf("Content-Type: text/plain; charset=utf-7\n\n+AOk-\n"), True),
            (b"SUBJECT hello", crlf("Subject: =?us-ascii?Q?hel?= =?us-ascii?Q?lo?=\n\n"), True),
            (b"TEXT inner", crlf("Content-Type: message/rfc822\n\nSubject: =?utf-8?Q?inn?= =?utf-8?Q?er?=\n\nx\n"),
             True),
            (b'TEXT "caf\xc3\xa9"', b"Subject: caf\xc3\xa9\r\n\r\n", True),
            (b'TEXT "caf\xc3\xa9"', b"Subject: cafe\r\n\r\n", False),
        ]
        for query, data, expected in table:
            with self.subTest(query=query, data=data):
                self.assertEqual(self.one(query, data), expected)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.sampled_from([
        b"From: ", b"To: ", b"Subject", b" : ", b":", b"\r\n", b"\n", b" ", b"\t", b"\r\n ", b"ab", b"Ab",
        b"b a", b"=?us-ascii?Q?a_b?=", b"=41", b"=\r\n", b"YWI=", b"--b\r\n", b"\xc3\xa9", b"+AGE-",
        b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
        b"Content-Type: text/plain; charset=utf-7\r\n", b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
    ]), max_size=30).map(b"".join), st.sampled_from(["a", "ab", "b a", "a:b", "AB", "b\na", "\xe9", "from", "ab a"]))
    def test_shortcut_never_changes_an_answer(self, data: bytes, needle: str) -> None:
        m = make(1, 1, set(), None, data)
        literal = Literal(needle.encode("utf-8"))
        queries = [parse_search((Atom(k), literal)) for k in ("TEXT", "FROM", "SUBJECT", "BODY")]
        queries.append(parse_search((Atom("HEADER"), Quoted("to"), literal)))
        fast = [matches(q, m, max_seq=1, max_uid=1) for q in queries]
        self.patch(search_module._Texts, "lacks", lambda self, probe, scope: False)
        slow = [matches(q, m, max_seq=1, max_uid=1) for q in queries]
        self.assertEqual(fast, slow)


# -- properties -----------------------------------------------------------------------------

WORDS = sorted({"ALL", "ANSWERED", "BCC", "BEFORE", "BODY", "CC", "DELETED", "DRAFT", "FLAGGED",
                "FROM", "HEADER", "KEYWORD", "LARGER", "NEW", "NOT", "OLD", "ON", "OR", "RECENT",
                "SEEN", "SENTBEFORE", "SENTON", "SENTSINCE", "SINCE", "SMALLER", "SUBJECT",
                "TEXT", "TO", "UID", "UNANSWERED", "UNDELETED", "UNDRAFT", "UNFLAGGED",
                "UNKEYWORD", "UNSEEN", "CHARSET", "UTF-8", "US-ASCII", "KOI8-R", "1-Jan-2003",
                "31-Feb-2003", "x-tag", "\\Seen", "Work", "*", "$", "foo"})
atoms = st.one_of(st.sampled_from(WORDS), st.from_regex(r"\\?[!#-'*-\[\]-z|}~]{1,8}", fullmatch=True))
seqsets = st.from_regex(r"(?:[1-9][0-9]{0,2}|\*)(?::(?:[1-9][0-9]{0,2}|\*))?(?:,[1-9][0-9]{0,2})*",
                        fullmatch=True)
leaves = st.one_of(
    atoms.map(Atom),
    st.integers(0, 2**63 - 1).map(Number),
    seqsets.map(SequenceSet),
    st.one_of(st.sampled_from(WORDS), st.text(max_size=10)).map(Quoted),
    st.binary(max_size=10).map(Literal),
    st.just(Nil()),
    st.just(Section("BODY", (), "TEXT")),
)
token_lists = st.lists(
    st.recursive(leaves, lambda inner: st.lists(inner, max_size=4).map(lambda xs: ParenList(tuple(xs))),
                 max_leaves=20),
    max_size=12,
).map(tuple)

CHUNKS = [
    b"\r\n", b"\n", b"\r\n\r\n", b": ", b"Subject: ", b"From: ", b"Date: ", b"To: ", b" ",
    b"Date: Tue, 1 Jul 2003 10:52:37 +0200\r\n", b"Date: 31 Feb 99999 99:99 +9999\r\n",
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain; charset=", b"utf-8", b"base64", b"idna", b"utf-16", b"x-bogus",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"--b\r\n", b"--b--\r\n", b"=?utf-8?B?w6k=?=", b"=?iso-8859-1?Q?caf=E9?=", b"=?utf-7?Q?+AGE-?=",
    b"=C3=A9", b"=\r\n", b"Y2Fmw6k=", b"word", b"\xff\xfe\x00", b"caf\xc3\xa9",
]
message_bytes = st.lists(st.one_of(st.sampled_from(CHUNKS), st.binary(max_size=12)), max_size=40).map(b"".join)
QUERIES = [parse_search(command_args(text)) for text in [
    b"TEXT word", b'BODY "caf\xc3\xa9"', b"OR SUBJECT x HEADER x-tag \"\"", b"SENTON 1-Jul-2003",
    b"SENTBEFORE 1-Jan-2000", b"FROM \"\"", b"NOT (TEXT \"\" ON 1-Jan-2003 UID 1:* 1:*)",
]]


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(token_lists)
    def test_parse_raises_only_search_error(self, args: tuple[Arg, ...]) -> None:
        try:
            query = parse_search(args)
        except SearchError:
            return
        self.assertIsInstance(query, Query)
        for m in MESSAGES.values():
            self.assertIsInstance(matches(query, m, max_seq=MAX_SEQ, max_uid=MAX_UID), bool)

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(message_bytes, st.sets(st.sampled_from(["\\Seen", "\\Recent", "Work"])),
           st.one_of(st.none(), st.floats(allow_nan=True)))
    def test_matches_never_raises(self, data: bytes, flags: set[str], when: float | None) -> None:
        m = Msg(1, 1, frozenset(flags), len(data), when, data, mime.scan(data))
        for query in QUERIES:
            self.assertIsInstance(matches(query, m, max_seq=1, max_uid=1), bool)
        self.assertIsInstance(body_text(data, m.root), str)
