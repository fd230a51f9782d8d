"""IMAP responses as bytes, serialised in bulk: status lines, data, strings, lists.

Every function returns bytes built with one `b"".join`; `Responses` collects many responses
(a FETCH of 10,000 messages) into one buffer for one transport write, never a write per item.

What a value becomes (`encode`): `int` a number; `None` NIL; `bytes` verbatim (already
encoded); `str` verbatim as an atom (refused if it holds CR, LF or NUL: use `astring` /
`string` for anything that came from a user or a message); `list`/`tuple` a parenthesised
list; and the AST of `mx.imap.parse` (`Atom`, `Quoted`, `Literal`, `Section`, ...) in its
command syntax, so a parsed command serialises back to what it was.

Invariants:
- A string goes out as an atom only when every octet is an ASTRING-CHAR and it is not `NIL`;
  as a quoted string when it is 7-bit without CR, LF or NUL (escaping `"` and `\\`) and at
  most `MAX_QUOTED` octets; otherwise as a literal `{n}` CRLF octets (RFC 3501 §4.3). So no
  value can end a response line or start a fake one.
- Response text (`tagged`, `untagged_status`, `continuation`) is ours, but CR, LF and NUL in
  it are turned into spaces all the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Union

from mx.imap.parse import Atom, Literal, Nil, Number, ParenList, Quoted, Section, SequenceSet

__all__ = [
    "MAX_QUOTED",
    "Responses",
    "Value",
    "astring",
    "continuation",
    "encode",
    "literal",
    "nstring",
    "paren",
    "quoted",
    "section_name",
    "string",
    "tagged",
    "untagged",
    "untagged_status",
]

MAX_QUOTED = 1024  # longer strings go out as literals
_ASTRING_ATOM = re.compile(rb"[!#$&'+-\[\]-z|}~]+")  # ASTRING-CHAR: ATOM-CHAR and "]"
_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")
_ESCAPE = re.compile(rb'(["\\])')
_TEXT_UNSAFE = re.compile(r"[\r\n\x00]")

Value = Union[
    int, str, bytes, None, Sequence["Value"], Atom, Number, SequenceSet, Quoted, Literal, Nil, ParenList, Section
]


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def literal(value: str | bytes) -> bytes:
    """`{n}` CRLF and the octets (RFC 3501 §4.3)."""
    data = _bytes(value)
    return b"".join((b"{", str(len(data)).encode("ascii"), b"}\r\n", data))


def quoted(value: str | bytes) -> bytes:
    """A quoted string; ValueError if the value cannot be one (CR, LF, NUL)."""
    data = _bytes(value)
    if b"\r" in data or b"\n" in data or b"\x00" in data:
        raise ValueError("CR, LF and NUL cannot be quoted")
    return b'"' + _ESCAPE.sub(rb"\\\1", data) + b'"'


def string(value: str | bytes) -> bytes:
    """RFC 3501 `string`: quoted when it can be, else a literal."""
    data = _bytes(value)
    if len(data) <= MAX_QUOTED and _QUOTABLE.fullmatch(data):
        return b'"' + _ESCAPE.sub(rb"\\\1", data) + b'"'
    return literal(data)


def astring(value: str | bytes) -> bytes:
    """RFC 3501 `astring`: an atom when it can be (and is not NIL), else `string`."""
    data = _bytes(value)
    if _ASTRING_ATOM.fullmatch(data) and data.upper() != b"NIL" and len(data) <= MAX_QUOTED:
        return data
    return string(data)


def nstring(value: str | bytes | None) -> bytes:
    """RFC 3501 `nstring`: NIL for None, else `string`."""
    return b"NIL" if value is None else string(value)


def section_name(section: Section, response: bool = False) -> bytes:
    """`BODY[1.HEADER.FIELDS (A B)]<0.10>`; in a response only the origin: `<0>` (§7.4.2).

    A response names `BODY[...]` for `BODY.PEEK[...]` and `BINARY[...]` for
    `BINARY.PEEK[...]` (RFC 3501 §6.4.5, RFC 3516 §4.2).
    """
    name = section.name
    if response and name.endswith(".PEEK"):
        name = name[: -len(".PEEK")]
    spec = ".".join(str(p) for p in section.part)
    if section.text is not None:
        spec = f"{spec}.{section.text}" if spec else section.text
    out = [name.encode("ascii"), b"[", spec.encode("ascii")]
    if section.fields:
        # A "]" would end the section: such a name goes out quoted.
        out += [b" (", b" ".join(string(f) if "]" in f else astring(f) for f in section.fields), b")"]
    out.append(b"]")
    if section.partial is not None:
        origin, length = section.partial
        out.append(b"<%d>" % origin if response else b"<%d.%d>" % (origin, length))
    return b"".join(out)


def encode(value: Value) -> bytes:
    """One value as bytes (see the module docstring for what each type becomes)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bool):
        raise TypeError("a bool is not an IMAP value")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("IMAP numbers are unsigned")
        return str(value).encode("ascii")
    if isinstance(value, str):
        if _TEXT_UNSAFE.search(value):
            raise ValueError("CR, LF or NUL in an atom")
        return value.encode("utf-8")
    if value is None:
        return b"NIL"
    if isinstance(value, (Atom, Number, SequenceSet, Nil)):
        return value.text.encode("ascii")
    if isinstance(value, Quoted):
        return quoted(value.value)
    if isinstance(value, Literal):
        return literal(value.value)
    if isinstance(value, ParenList):
        return paren(value.items)
    if isinstance(value, Section):
        return section_name(value)
    if isinstance(value, (list, tuple)):
        return paren(value)
    raise TypeError(f"cannot encode {type(value).__name__} as IMAP")


def paren(items: Iterable[Value]) -> bytes:
    """A parenthesised list, nested lists included."""
    return b"(" + b" ".join(encode(item) for item in items) + b")"


def _text(text: str) -> bytes:
    return _TEXT_UNSAFE.sub(" ", text).encode("utf-8")


def _code(code: Value) -> bytes:
    # A code is an atom, or an atom with arguments: ("APPENDUID", 38505, 3955).
    if isinstance(code, (list, tuple)):
        return b"[" + b" ".join(encode(part) for part in code) + b"] "
    return b"[" + encode(code) + b"] "


def _status(prefix: bytes, status: str, text: str, code: Value) -> bytes:
    parts = [prefix, b" ", status.encode("ascii"), b" "]
    if code is not None:
        parts.append(_code(code))
    parts += [_text(text), b"\r\n"]
    return b"".join(parts)


def tagged(tag: str, status: str, text: str, code: Value = None) -> bytes:
    """`tag OK|NO|BAD [code] text` CRLF (RFC 3501 §7.1)."""
    return _status(tag.encode("ascii"), status, text, code)


def untagged_status(status: str, text: str, code: Value = None) -> bytes:
    """`* OK|NO|BAD|PREAUTH|BYE [code] text` CRLF (RFC 3501 §7.1)."""
    return _status(b"*", status, text, code)


def untagged(*items: Value) -> bytes:
    """`*` and the items separated by spaces: `untagged(5, "EXISTS")`, `untagged(1, "FETCH", [...])`."""
    return b"".join((b"* ", b" ".join(encode(item) for item in items), b"\r\n"))


def continuation(text: str = "") -> bytes:
    """`+ text` CRLF: go ahead with a literal, or a SASL challenge (RFC 3501 §7.5)."""
    return b"+ " + _text(text) + b"\r\n"


class Responses:
    """Many responses into one buffer: add them, then `to_bytes()` once for one write."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def __len__(self) -> int:
        return len(self._parts)

    def add(self, response: bytes) -> None:
        self._parts.append(response)

    def untagged(self, *items: Value) -> None:
        self._parts.append(untagged(*items))

    def untagged_status(self, status: str, text: str, code: Value = None) -> None:
        self._parts.append(untagged_status(status, text, code))

    def tagged(self, tag: str, status: str, text: str, code: Value = None) -> None:
        self._parts.append(tagged(tag, status, text, code))

    def to_bytes(self) -> bytes:
        """Everything added so far, joined once; the buffer is emptied."""
        out = b"".join(self._parts)
        self._parts.clear()
        return out
