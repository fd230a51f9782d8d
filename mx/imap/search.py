"""IMAP SEARCH: the search-key grammar into a compiled `Query`, and whether a message matches.

`parse_search(args)` reads the arguments after `SEARCH` (RFC 3501 §6.4.4, every key of the
§9 `search-key` rule) into a `Key` tree, and compiles that tree once into nested closures,
so `matches(query, msg, ...)` costs a few attribute reads per message for flag-only keys.
`Query.need` says the most any key needs (`Need.FLAGS` < `DATE` < `HEADER` < `BODY`), so the
session loads internal dates, message bytes and the `mime` scan only when a key asks.

Invariants and choices:
- Errors: every syntax error is a `SearchError` (its text goes into the tagged BAD); an
  unsupported CHARSET is `BadCharset`, a `SearchError`, checked before any key (NO
  [BADCHARSET (UTF-8 US-ASCII)], RFC 3501 §6.4.4). Nothing else escapes `parse_search` for
  any argument tuple, and `matches` never raises for any message bytes.
- Nesting (NOT, OR, parentheses) deeper than `MAX_DEPTH` is a `SearchError`, so neither
  parsing nor matching can exhaust the stack (the reader's own bound is 16).
- Strings are astrings (a literal's octets decoded as UTF-8, whatever the CHARSET said:
  clients send UTF-8 under US-ASCII too) and match as case-insensitive substrings: both
  sides `casefold`ed, no other normalisation. An empty string matches every message that
  has the field (RFC 3501: HEADER with a zero-length string).
- Header keys (FROM, TO, CC, BCC, SUBJECT, HEADER) look at every occurrence of the field in
  the message's own header, unfolded, RFC 2047 encoded words decoded; not at embedded
  messages' headers.
- BODY searches `body_text`: the text/* leaves of the message, transfer encoding undone,
  decoded by their charset; other leaves (attachments, images) are skipped, message/rfc822
  parts are searched inside (their bodies; their headers count for TEXT, not BODY). TEXT is
  the message header, the embedded messages' headers, or BODY's text.
- Dates: BEFORE/ON/SINCE compare the calendar day of the internal date in the server's
  local time zone (`time.localtime`); SENTBEFORE/SENTON/SENTSINCE the day of the Date:
  header as written, ignoring time and zone (RFC 3501 §6.4.4). A message without a
  parseable Date: never matches a SENT* key (and so matches NOT SENTON).
- Speed: a message's texts are decoded at most once per `matches`, only when a key reads
  them; an AND or OR tries its cheapest operand first. Header and TEXT keys skip parsing
  and decoding a plain message (7-bit, no encoded words, no base64/quoted-printable text)
  whose lowered bytes lack a run of the needle (`_Texts.lacks`): a shortcut that can only
  skip misses, never change an answer.
- `*` in a sequence set is `max_seq` / `max_uid` at match time (RFC 3501 §6.4.8: `n:*`
  includes the largest even when n is above it); numbers past the end match nothing.
- Not here: SEARCHRES `$` (a SearchError until the session saves results), ESEARCH return
  options, MODSEQ, FUZZY, and any per-message cache beyond one `matches` call.
"""

from __future__ import annotations

import binascii
import datetime
import enum
import re
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_tz
from functools import lru_cache
from typing import Protocol

from mx import mime
from mx.imap.parse import (
    Arg,
    Atom,
    Number,
    ParenList,
    Quoted,
    SequenceSet,
    as_astring,
    parse_sequence_set,
)

__all__ = [
    "CHARSETS",
    "MAX_DEPTH",
    "BadCharset",
    "Key",
    "Message",
    "Need",
    "Query",
    "SearchError",
    "body_text",
    "matches",
    "parse_search",
]

CHARSETS = ("UTF-8", "US-ASCII")  # what BADCHARSET lists, in this order
MAX_DEPTH = 64
_UINT32 = 2**32 - 1
_NUMBER_MAX = 2**63 - 1  # number64 (RFC 9051 §9)


class SearchError(ValueError):
    """The SEARCH arguments do not parse; the text is for the tagged BAD."""


class BadCharset(SearchError):
    """CHARSET named a charset we do not search in: answer NO [BADCHARSET (UTF-8 US-ASCII)]."""

    def __init__(self, charset: str) -> None:
        super().__init__(f"Unsupported charset {charset[:40]!r}")
        self.charset = charset


class Need(enum.IntEnum):
    """The most a query needs per message; each level includes the ones below."""

    FLAGS = 0  # seq, uid, flags, size
    DATE = 1  # + internaldate
    HEADER = 2  # + data and root
    BODY = 3  # + body text decoding (same inputs as HEADER, more work)


Value = str | int | datetime.date | SequenceSet | tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class Key:
    """One search key. `name` is RFC 3501's, upper case, plus "AND" (a list of keys: the
    top level or a parenthesised list) and "SEQ" (a bare sequence set).

    `value` by name: the string as sent (FROM, BODY, ...), (field, string) for HEADER, a
    `datetime.date` for the date keys, an int for LARGER/SMALLER, the keyword for
    KEYWORD/UNKEYWORD, a `SequenceSet` for UID and SEQ, else None. `keys`: the operands of
    AND, OR (two) and NOT (one).
    """

    name: str
    value: Value = None
    keys: tuple[Key, ...] = ()


class Message(Protocol):
    """What the session passes per message (fields past `size` filled as `Query.need` says).

    Read-only members, so a frozen dataclass or a slotted class of the session's fits.
    """

    @property
    def seq(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def flags(self) -> frozenset[str]: ...  # "\\Seen" ... "\\Recent", keywords as named
    @property
    def size(self) -> int: ...
    @property
    def internaldate(self) -> float | None: ...  # when `Query.dated`
    @property
    def data(self) -> bytes | None: ...  # the whole message, need >= HEADER
    @property
    def root(self) -> mime.Part | None: ...  # mime.scan(data), need >= HEADER


# A compiled key: (message, max_seq, max_uid, per-message texts or None) -> matches?
Test = Callable[[Message, int, int, "_Texts | None"], bool]


@dataclass(frozen=True)
class Query:
    """A parsed SEARCH: the key tree (an AND), what it needs, the charset (upper case)."""

    key: Key
    need: Need
    charset: str
    test: Test = field(repr=False, compare=False)
    dated: bool = False  # a key reads the INTERNALDATE (BEFORE / ON / SINCE)


def matches(query: Query, msg: Message, *, max_seq: int, max_uid: int) -> bool:
    """Whether `msg` matches `query`; `*` in sequence sets is `max_seq` / `max_uid`."""
    texts = _Texts(msg) if query.need >= Need.HEADER else None
    return query.test(msg, max_seq, max_uid, texts)


# -- parsing --------------------------------------------------------------------------------

_FLAG_KEYS = {  # key -> (flag, whether the message must have it)
    "ANSWERED": ("\\Answered", True),
    "DELETED": ("\\Deleted", True),
    "DRAFT": ("\\Draft", True),
    "FLAGGED": ("\\Flagged", True),
    "RECENT": ("\\Recent", True),
    "SEEN": ("\\Seen", True),
    "OLD": ("\\Recent", False),
    "UNANSWERED": ("\\Answered", False),
    "UNDELETED": ("\\Deleted", False),
    "UNDRAFT": ("\\Draft", False),
    "UNFLAGGED": ("\\Flagged", False),
    "UNSEEN": ("\\Seen", False),
}
_BARE_KEYS = frozenset({"ALL", "NEW"}) | frozenset(_FLAG_KEYS)
_HEADER_KEYS = {"BCC": "bcc", "CC": "cc", "FROM": "from", "SUBJECT": "subject", "TO": "to"}
_STRING_KEYS = frozenset({"BODY", "TEXT"}) | frozenset(_HEADER_KEYS)
_DATE_KEYS = frozenset({"BEFORE", "ON", "SINCE", "SENTBEFORE", "SENTON", "SENTSINCE"})
_MONTHS = {m: i for i, m in enumerate(
    ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), 1)}
_DATE = re.compile(r"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")  # RFC 3501 §9 date-text
_DIGITS = re.compile(r"[0-9]{1,20}")
_ATOM = re.compile(r"[!#$&'+-\[^-z|}~]+")  # ATOM-CHAR: no ( ) { SP CTL % * " \ ] nor 8-bit


def parse_search(args: tuple[Arg, ...]) -> Query:
    """The arguments after SEARCH (`[CHARSET name] key...`) as a compiled `Query`."""
    charset = "US-ASCII"
    if args and isinstance(args[0], Atom) and args[0].text.upper() == "CHARSET":
        if len(args) < 2:
            raise SearchError("CHARSET needs a charset name")
        charset = _charset(args[1])
        args = args[2:]
    if not args:
        raise SearchError("SEARCH needs a search key")
    key = Key("AND", keys=_keys(args, 0))
    return Query(key, _need(key), charset, _compile(key), _dated(key))


def _charset(arg: Arg) -> str:
    name = as_astring(arg)
    if name is None:
        raise SearchError("Invalid charset name")
    if not name.isascii() or name.upper() not in CHARSETS:  # "\u017f".upper() is "S"
        raise BadCharset(name)
    return name.upper()


class _Args:
    """A cursor over one level of arguments."""

    __slots__ = ("items", "pos")

    def __init__(self, items: tuple[Arg, ...]) -> None:
        self.items = items
        self.pos = 0

    def more(self) -> bool:
        return self.pos < len(self.items)

    def take(self, what: str) -> Arg:
        if self.pos >= len(self.items):
            raise SearchError(f"Missing {what}")
        self.pos += 1
        return self.items[self.pos - 1]


def _keys(items: tuple[Arg, ...], depth: int) -> tuple[Key, ...]:
    """Every key of one level (the top, or inside parentheses); at least one."""
    if depth > MAX_DEPTH:
        raise SearchError("Search keys nested too deeply")
    if not items:
        raise SearchError("Empty list of search keys")
    cursor = _Args(items)
    out = []
    while cursor.more():
        out.append(_key(cursor, depth))
    return tuple(out)


def _key(cursor: _Args, depth: int) -> Key:
    """One search-key (RFC 3501 §9) from the cursor."""
    if depth > MAX_DEPTH:
        raise SearchError("Search keys nested too deeply")
    arg = cursor.take("search key")
    if isinstance(arg, ParenList):
        keys = _keys(arg.items, depth + 1)
        return keys[0] if len(keys) == 1 else Key("AND", keys=keys)
    if isinstance(arg, (Number, SequenceSet)):
        return Key("SEQ", _sequence_set(arg))
    if not isinstance(arg, Atom):
        raise SearchError("Expected a search key")
    name = arg.text.upper()
    if name in _BARE_KEYS:
        return Key(name)
    if name in _STRING_KEYS:
        return Key(name, _string(cursor.take(f"string after {name}")))
    if name in _DATE_KEYS:
        return Key(name, _date(cursor.take(f"date after {name}")))
    if name == "HEADER":
        field_name = _string(cursor.take("header field name after HEADER"))
        return Key(name, (field_name, _string(cursor.take("string after HEADER"))))
    if name in ("KEYWORD", "UNKEYWORD"):
        return Key(name, _keyword(cursor.take(f"keyword after {name}")))
    if name in ("LARGER", "SMALLER"):
        return Key(name, _number(cursor.take(f"number after {name}")))
    if name == "UID":
        return Key(name, _sequence_set(cursor.take("sequence set after UID")))
    if name == "NOT":
        return Key(name, keys=(_key(cursor, depth + 1),))
    if name == "OR":
        first = _key(cursor, depth + 1)
        return Key(name, keys=(first, _key(cursor, depth + 1)))
    if name[:1] in "0123456789*$:,":  # the reader makes Atoms of broken sequence sets
        raise SearchError(f"Invalid sequence set {arg.text[:40]!r}")
    raise SearchError(f"Unknown search key {arg.text[:40]!r}")


def _string(arg: Arg) -> str:
    value = as_astring(arg)
    if value is None:
        raise SearchError("Expected a string (UTF-8)")
    return value


def _keyword(arg: Arg) -> str:
    value = as_astring(arg)
    if value is None or not _ATOM.fullmatch(value):
        raise SearchError("Expected a keyword (an atom)")
    return value


def _number(arg: Arg) -> int:
    text = arg.text if isinstance(arg, (Atom, Number)) else ""
    if not _DIGITS.fullmatch(text) or int(text) > _NUMBER_MAX:
        raise SearchError("Expected a number")
    return int(text)


def _date(arg: Arg) -> datetime.date:
    """RFC 3501 §9 `date`: d-Mon-yyyy, as an atom or quoted."""
    text = arg.text if isinstance(arg, Atom) else arg.value if isinstance(arg, Quoted) else ""
    m = _DATE.fullmatch(text)
    month = _MONTHS.get(m.group(2).upper()) if m else None
    if m is None or month is None:
        raise SearchError("Expected a date (d-Mon-yyyy)")
    try:
        return datetime.date(int(m.group(3)), month, int(m.group(1)))
    except ValueError:
        raise SearchError(f"No such date {text!r}") from None


def _sequence_set(arg: Arg) -> SequenceSet:
    text = arg.text if isinstance(arg, (Number, SequenceSet)) else ""
    if text == "$":
        raise SearchError("$ needs SEARCHRES, which is not enabled")  # RFC 5182
    try:
        parse_sequence_set(text, 1)  # checks the syntax and that numbers fit in 32 bits
    except ValueError:
        raise SearchError(f"Invalid sequence set {text[:40]!r}") from None
    return SequenceSet(text)


_KEY_NEED = {
    **{name: Need.FLAGS for name in _BARE_KEYS},
    **{name: Need.HEADER for name in _HEADER_KEYS},
    "BODY": Need.BODY, "TEXT": Need.BODY, "HEADER": Need.HEADER,
    "BEFORE": Need.DATE, "ON": Need.DATE, "SINCE": Need.DATE,
    "SENTBEFORE": Need.HEADER, "SENTON": Need.HEADER, "SENTSINCE": Need.HEADER,
}


_INTERNALDATE_KEYS = frozenset(name for name, need in _KEY_NEED.items() if need == Need.DATE)


def _dated(key: Key) -> bool:
    # `need` says DATE for TEXT too (each level includes the ones below), but a `stat` per
    # message for dates no key reads is a tenth of a SEARCH TEXT.
    return key.name in _INTERNALDATE_KEYS or any(_dated(k) for k in key.keys)


def _need(key: Key) -> Need:
    own = _KEY_NEED.get(key.name, Need.FLAGS)
    return max([own, *(_need(k) for k in key.keys)])


# -- compiling ------------------------------------------------------------------------------


def _compile(key: Key) -> Test:
    return _COMPILERS[key.name](key)


def _compile_and(key: Key) -> Test:
    # Cheapest first: `and` stops at the first miss, so flags spare the body decoding.
    tests = [_compile(k) for k in sorted(key.keys, key=_need)]
    if len(tests) == 1:
        return tests[0]
    if len(tests) == 2:
        a, b = tests
        return lambda m, s, u, t: a(m, s, u, t) and b(m, s, u, t)

    def every(m: Message, s: int, u: int, t: _Texts | None) -> bool:
        for test in tests:
            if not test(m, s, u, t):
                return False
        return True

    return every


def _compile_or(key: Key) -> Test:
    a, b = (_compile(k) for k in sorted(key.keys, key=_need))
    return lambda m, s, u, t: a(m, s, u, t) or b(m, s, u, t)


def _compile_not(key: Key) -> Test:
    inner = _compile(key.keys[0])
    return lambda m, s, u, t: not inner(m, s, u, t)


def _compile_all(key: Key) -> Test:
    return lambda m, s, u, t: True


def _compile_flag(key: Key) -> Test:
    flag, wanted = _FLAG_KEYS[key.name]
    if wanted:
        return lambda m, s, u, t: flag in m.flags
    return lambda m, s, u, t: flag not in m.flags


def _compile_new(key: Key) -> Test:
    return lambda m, s, u, t: "\\Recent" in m.flags and "\\Seen" not in m.flags


def _compile_keyword(key: Key) -> Test:
    assert isinstance(key.value, str)
    exact, folded = key.value, key.value.casefold()

    def has(m: Message) -> bool:
        if exact in m.flags:  # the usual case: sent as stored
            return True
        return any(f.casefold() == folded for f in m.flags if not f.startswith("\\"))

    if key.name == "KEYWORD":
        return lambda m, s, u, t: has(m)
    return lambda m, s, u, t: not has(m)


def _compile_size(key: Key) -> Test:
    assert isinstance(key.value, int)
    n = key.value
    if key.name == "LARGER":
        return lambda m, s, u, t: m.size > n
    return lambda m, s, u, t: m.size < n


def _compile_seq(key: Key) -> Test:
    assert isinstance(key.value, SequenceSet)
    inside = _membership(key.value)
    if key.name == "UID":
        return lambda m, s, u, t: inside(m.uid, u)
    return lambda m, s, u, t: inside(m.seq, s)


def _membership(sset: SequenceSet) -> Callable[[int, int], bool]:
    """(number, largest) -> in the set? Resolved once, or once per `largest` when it has `*`."""
    if all(a is not None and b is not None for a, b in sset.items):
        within = _ranges_test(sset.resolve(_UINT32))
        return lambda n, largest: within(n)
    memo: list[tuple[int, Callable[[int], bool]]] = [(-1, _ranges_test(()))]

    def inside(n: int, largest: int) -> bool:
        seen, within = memo[0]
        if seen != largest:
            within = _ranges_test(sset.resolve(largest))
            memo[0] = (largest, within)  # one tuple: a reader never sees half an update
        return within(n)

    return inside


def _ranges_test(ranges: tuple[tuple[int, int], ...]) -> Callable[[int], bool]:
    if not ranges:
        return lambda n: False
    if len(ranges) == 1:
        lo, hi = ranges[0]
        return lambda n: lo <= n <= hi
    starts = [lo for lo, _hi in ranges]
    ends = [hi for _lo, hi in ranges]

    def within(n: int) -> bool:
        i = bisect_right(starts, n) - 1
        return i >= 0 and n <= ends[i]

    return within


def _compile_internal_date(key: Key) -> Test:
    assert isinstance(key.value, datetime.date)
    day = key.value.timetuple()[:3]
    compare = _DAY_COMPARE[key.name]
    return lambda m, s, u, t: compare(_local_day(m.internaldate), day)


def _compile_sent_date(key: Key) -> Test:
    assert isinstance(key.value, datetime.date)
    day = key.value.timetuple()[:3]
    compare = _DAY_COMPARE[key.name[4:]]
    return lambda m, s, u, t: t is not None and compare(t.sent_day(), day)


_Day = tuple[int, int, int]
_DAY_COMPARE: dict[str, Callable[[_Day | None, _Day], bool]] = {
    "BEFORE": lambda d, day: d is not None and d < day,
    "ON": lambda d, day: d is not None and d == day,
    "SINCE": lambda d, day: d is not None and d >= day,
}


def _local_day(timestamp: float | None) -> _Day | None:
    if timestamp is None:
        return None
    try:
        y, mo, d = time.localtime(timestamp)[:3]
    except (OverflowError, OSError, ValueError, TypeError):
        return None
    return y, mo, d


def _compile_header(key: Key) -> Test:
    if key.name == "HEADER":
        assert isinstance(key.value, tuple)
        name, needle = key.value[0].lower(), key.value[1].casefold()
    else:
        assert isinstance(key.value, str)
        name, needle = _HEADER_KEYS[key.name], key.value.casefold()
    probe = _probe(needle)

    def test(m: Message, s: int, u: int, t: _Texts | None) -> bool:
        if t is None or t.lacks(probe, _HEAD):
            return False
        return any(needle in v for v in t.values(name))

    return test


def _compile_body(key: Key) -> Test:
    assert isinstance(key.value, str)
    needle = key.value.casefold()
    if key.name == "BODY":
        # No shortcut: for plain text, decoding and folding cost what lowering the bytes would.
        return lambda m, s, u, t: t is not None and needle in t.body()

    probe = _probe(needle)

    def text(m: Message, s: int, u: int, t: _Texts | None) -> bool:
        if t is None or t.lacks(probe, _TEXT):
            return False
        return needle in t.header() or needle in t.text()

    return text


_HEAD, _TEXT = 0, 1  # what a string key reads: the header, or everything (see `_Texts.lacks`)
_SEAMS = re.compile(r"[ \t\r\n:]+")


def _probe(needle: str) -> tuple[bytes, ...]:
    """The octets a plain message (see `_Texts.lacks`) must hold, lower case, to match `needle`.

    The texts are the message's bytes cut and rejoined only at white space, line ends and the
    ": " after a field name (unfolding, "name: value", one "\n" between fields and parts), so
    each run of the needle between such seams is in the bytes themselves. A non-ASCII run is
    then in no plain (7-bit) message.
    """
    return tuple(piece.encode("utf-8") for piece in _SEAMS.split(needle) if piece)


_COMPILERS: dict[str, Callable[[Key], Test]] = {
    "AND": _compile_and, "OR": _compile_or, "NOT": _compile_not, "ALL": _compile_all,
    "NEW": _compile_new, **{name: _compile_flag for name in _FLAG_KEYS},
    "KEYWORD": _compile_keyword, "UNKEYWORD": _compile_keyword,
    "LARGER": _compile_size, "SMALLER": _compile_size, "UID": _compile_seq, "SEQ": _compile_seq,
    "BEFORE": _compile_internal_date, "ON": _compile_internal_date,
    "SINCE": _compile_internal_date, "SENTBEFORE": _compile_sent_date,
    "SENTON": _compile_sent_date, "SENTSINCE": _compile_sent_date,
    "HEADER": _compile_header, **{name: _compile_header for name in _HEADER_KEYS},
    "BODY": _compile_body, "TEXT": _compile_body,
}


# -- message texts --------------------------------------------------------------------------


class _Texts:
    """The decoded, case-folded texts of one message, each made on first use in one `matches`."""

    __slots__ = ("data", "root", "_fields", "_values", "_header", "_chunks", "_body", "_text",
                 "_sent", "_plain", "_lower")

    def __init__(self, msg: Message) -> None:
        self.data = msg.data if msg.data is not None else b""
        # The session scans; a missing scan (a contract slip) costs a scan, not a wrong answer.
        self.root = msg.root if msg.root is not None else mime.scan(self.data)
        self._fields: list[tuple[str, bytes]] | None = None
        self._values: dict[str, list[str]] = {}
        self._header: str | None = None
        self._chunks: list[tuple[bool, str]] | None = None
        self._body: str | None = None
        self._text: str | None = None
        self._sent: _Day | None | bool = False  # False: not looked at yet
        self._plain: list[bool | None] = [None, None]  # by scope
        self._lower: list[bytes | None] = [None, None]  # the header, the message

    def lacks(self, probe: tuple[bytes, ...], scope: int) -> bool:
        """True when no decoded text in `scope` (the header, or TEXT's all) can hold the needle.

        Most mail is plain: 7-bit, no encoded words, no base64 or quoted-printable text part,
        charsets that read ASCII as ASCII. Its decoded texts are then pieces of its own bytes
        and casefold is lower(), so when a run of the needle (see `_probe`) is not in the
        bytes, lowered, the needle is in none of the texts: no header parse, no decoding.
        """
        if not probe:
            return False
        plain = self._plain[scope]
        if plain is None:
            plain = self._plain[scope] = _is_plain(self.data, self.root, scope)
        if not plain:
            return False
        lower = self._lower[scope]
        if lower is None:
            lower = self._lower[scope] = (self.data[: self.root.body_offset] if scope == _HEAD
                                          else self.data).lower()
        return any(piece not in lower for piece in probe)

    def fields(self) -> list[tuple[str, bytes]]:
        if self._fields is None:
            self._fields = _header_fields(self.data, self.root)
        return self._fields

    def values(self, name: str) -> list[str]:
        """Every occurrence of field `name` (lower case), decoded and folded."""
        found = self._values.get(name)
        if found is None:
            found = [_words(v).casefold() for n, v in self.fields() if n == name]
            self._values[name] = found
        return found

    def header(self) -> str:
        if self._header is None:
            self._header = _header_text(self.fields()).casefold()
        return self._header

    def chunks(self) -> list[tuple[bool, str]]:
        if self._chunks is None:
            self._chunks = _chunks(self.data, self.root)
        return self._chunks

    def body(self) -> str:
        if self._body is None:
            self._body = "\n".join(c for is_header, c in self.chunks() if not is_header).casefold()
        return self._body

    def text(self) -> str:
        """Embedded headers and body texts (TEXT's part besides the message header)."""
        if self._text is None:
            self._text = "\n".join(c for _is_header, c in self.chunks()).casefold()
        return self._text

    def sent_day(self) -> _Day | None:
        if self._sent is False:
            self._sent = _sent_day(self.root.envelope.get("date"))
        assert self._sent is not True
        return self._sent


_ASCII = bytes(range(128))


@lru_cache(maxsize=64)
def _reads_ascii_as_ascii(charset: str) -> bool:
    try:
        return _ASCII.decode(charset) == _ASCII.decode("ascii")
    except (UnicodeError, LookupError, ValueError, TypeError):
        return False


def _is_plain(data: bytes, root: mime.Part, scope: int) -> bool:
    """Whether the texts `_Texts` decodes for `scope` are pieces of the message's own bytes."""
    if scope == _HEAD:
        return _plain_header(data, root)
    if not data.isascii():
        return False
    for part in root.walk():
        if scope == _TEXT and part.is_message and not _plain_header(data, part):
            return False  # the message's header, or an embedded one
        if part.type == "text" and not part.children and part.message is None:
            if part.encoding in ("base64", "quoted-printable"):
                return False
            charset = part.params.get("charset")
            if charset and not _reads_ascii_as_ascii(charset.lower()):
                return False
    return True


def _plain_header(data: bytes, part: mime.Part) -> bool:
    head = data[part.offset : part.body_offset]
    return head.isascii() and b"=?" not in head  # no 8-bit text, no encoded words


def _header_fields(data: bytes, part: mime.Part) -> list[tuple[str, bytes]]:
    return mime.headers(data[part.offset : part.body_offset])


def _header_text(fields: list[tuple[str, bytes]]) -> str:
    return "\n".join(f"{name}: {_words(value)}" for name, value in fields)


def _sent_day(raw: bytes | None) -> _Day | None:
    """The day of a Date: value as written (its own zone), or None if it does not parse."""
    if raw is None:
        return None
    try:
        parsed = parsedate_tz(raw.decode("latin-1"))
        if parsed is None:
            return None
        day = datetime.date(parsed[0], parsed[1], parsed[2])
    except Exception:  # noqa: BLE001 - the stdlib parser has raised odd errors on odd input
        return None
    return day.year, day.month, day.day


def body_text(data: bytes, root: mime.Part) -> str:
    """The text BODY searches: every text/* leaf, transfer encoding undone and decoded by its
    charset, in document order, one "\\n" between parts. Attachments that are not text are
    skipped; message/rfc822 parts contribute their own text leaves (not their headers)."""
    return "\n".join(c for is_header, c in _chunks(data, root) if not is_header)


def _chunks(data: bytes, root: mime.Part) -> list[tuple[bool, str]]:
    """(is an embedded message's header, text) for `body_text` and TEXT, in document order."""
    out: list[tuple[bool, str]] = []
    for part in root.walk():  # iterative, and the scan already bounded depth and count
        if part.is_message and part is not root:
            out.append((True, _header_text(_header_fields(data, part))))
        if part.children or part.message is not None:
            continue  # a container: preamble, epilogue and MIME headers are not text
        if part.type == "text":
            out.append((False, _decode(_transfer_decode(data, part), part.params.get("charset"))))
    return out


_NOT_BASE64 = re.compile(rb"[^A-Za-z0-9+/]+")


def _transfer_decode(data: bytes, part: mime.Part) -> bytes:
    raw = data[part.body_offset : part.end]
    if part.encoding == "base64":
        try:
            return binascii.a2b_base64(raw)  # skips line ends and junk, stops at padding
        except binascii.Error:
            pass
        # Bad padding: keep only the alphabet and pad it (mailers cut and pad carelessly).
        clean = _NOT_BASE64.sub(b"", raw)
        extra = len(clean) % 4
        clean = clean[:-1] if extra == 1 else clean + b"=" * ((4 - extra) % 4)
        try:
            return binascii.a2b_base64(clean)
        except binascii.Error:
            return b""
    if part.encoding == "quoted-printable":
        return binascii.a2b_qp(raw)
    return raw  # 7bit, 8bit, binary, and unknown encodings as they are


def _decode(octets: bytes, charset: str | None) -> str:
    """Octets in `charset`; mislabelled or unknown: UTF-8, else Latin-1 (which never fails)."""
    if charset:
        try:
            return octets.decode(charset)
        except UnicodeDecodeError:
            if charset.lower().replace("-", "").replace("_", "") not in ("usascii", "ascii"):
                try:
                    return octets.decode(charset, "replace")
                except (UnicodeError, LookupError, ValueError, TypeError):
                    pass
        except (UnicodeError, LookupError, ValueError, TypeError):
            pass  # not a charset Python has, or not a text codec ("base64", "idna")
    return _fallback(octets)


def _fallback(octets: bytes) -> str:
    try:
        return octets.decode("utf-8")
    except UnicodeDecodeError:
        return octets.decode("latin-1")


def _words(value: bytes) -> str:
    """A header value with RFC 2047 words decoded; raw if the decoder trips on a charset."""
    if b"=?" not in value:
        return _fallback(value)  # what decode_words answers, without its scan
    try:
        return mime.decode_words(value)
    except (UnicodeError, LookupError, ValueError, TypeError):
        # mime.decode_words lets a non-text codec named as charset ("base64", "idna") raise.
        return _fallback(value)
