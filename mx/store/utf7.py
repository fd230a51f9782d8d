"""Modified UTF-7 (RFC 3501 §5.1.3), the on-disk encoding of Maildir++ folder names.

Invariants:
- `encode` maps every str to printable US-ASCII; `decode(encode(s)) == s` for every s.
- `decode` accepts only canonical input (what `encode` produces): no "&" run that encodes
  printable ASCII, no padding, no bit left over, no unterminated run; else `ValueError`.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["encode", "decode"]


def _b64(chars: str) -> str:
    raw = chars.encode("utf-16-be", "surrogatepass")
    return base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")


def encode(name: str) -> str:
    """RFC 3501 §5.1.3: printable ASCII stands for itself, "&" is "&-", the rest is "&...-"."""
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if run:
                out.append("&" + _b64("".join(run)) + "-")
                run.clear()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append("&" + _b64("".join(run)) + "-")
    return "".join(out)


def decode(name: str) -> str:
    """The inverse of `encode`; `ValueError` for anything `encode` would not have written."""
    out: list[str] = []
    i = 0
    n = len(name)
    while i < n:
        ch = name[i]
        if not 0x20 <= ord(ch) <= 0x7E:
            raise ValueError(f"not modified UTF-7: {name!r}")
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ValueError(f"unterminated '&' run in {name!r}")
        run = name[i + 1 : end]
        i = end + 1
        if not run:
            out.append("&")
            continue
        if len(run) % 4 == 1 or not all(c.isalnum() or c in "+," for c in run):
            raise ValueError(f"bad base64 in {name!r}")
        try:
            raw = base64.b64decode(run.replace(",", "/") + "=" * (-len(run) % 4), validate=True)
            text = raw.decode("utf-16-be")
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ValueError(f"bad modified UTF-7 in {name!r}: {e}") from None
        if _b64(text) != run or any(0x20 <= ord(c) <= 0x7E for c in text):
            raise ValueError(f"non-canonical modified UTF-7 in {name!r}")
        out.append(text)
    return "".join(out)
