"""RFC 5321 / RFC 6531 mailbox addresses: parse, format, and the key a mailbox is found by.

Invariants:
- An `Address` always holds a syntactically valid local part and a lower-case domain in
  ASCII (A-label) form, so two spellings of one domain compare equal.
- `Address.key` is how local mailboxes are matched: local part lower-cased, `+tag` removed.
- Nothing here touches the file system; `is_safe_mailbox_name` is what storage checks
  before a local part becomes a folder name.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "Address",
    "AddressError",
    "parse_address",
    "parse_path",
    "is_safe_mailbox_name",
]

# RFC 5321 §4.5.3.1.1 / §4.5.3.1.2
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256

# RFC 5322 atext, plus any non-ASCII character (RFC 6531 §3.3 extends atext with UTF8-non-ascii).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*\Z")
# RFC 5321 Quoted-string: qtextSMTP or a backslash pair of printable ASCII.
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"\Z')
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")


class AddressError(ValueError):
    """The text is not a valid address; the message says why, for an SMTP reply."""


@dataclass(frozen=True, slots=True)
class Address:
    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """The mailbox key: case-insensitive local part, `+tag` dropped."""
        return f"{base_local(self.local)}@{self.domain}"

    @property
    def canonical(self) -> str:
        """The address with its local part lower-cased (how the users file stores it)."""
        return f"{self.local.lower()}@{self.domain}"


def base_local(local: str) -> str:
    """The local part without a `+tag` and lower-cased (plus-addressing, case-insensitive)."""
    local = local.lower()
    if local.startswith('"'):
        return local
    head, plus, _tag = local.partition("+")
    return head if plus and head else local


def _normalise_domain(domain: str) -> str:
    if not domain:
        raise AddressError("empty domain")
    if domain.startswith("["):
        return _address_literal(domain)
    if domain.endswith("."):
        # RFC 5321 §2.3.5: a domain in a path is never written with a trailing dot.
        raise AddressError("domain ends with a dot")
    try:
        ascii_domain = domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        raise AddressError("domain is not a valid internationalised name") from None
    ascii_domain = ascii_domain.lower()
    if len(ascii_domain) > MAX_DOMAIN:
        raise AddressError("domain too long")
    labels = ascii_domain.split(".")
    if not all(_LABEL.match(label) for label in labels):
        raise AddressError("invalid domain")
    return ascii_domain


def _address_literal(literal: str) -> str:
    # RFC 5321 §4.1.3
    if not literal.endswith("]"):
        raise AddressError("unterminated address literal")
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError("invalid address literal") from None


def parse_address(text: str) -> Address:
    """Parse `local@domain` (no angle brackets) into an `Address`."""
    if not text or len(text) > MAX_PATH:
        raise AddressError("address empty or too long")
    if _CONTROL.search(text):
        raise AddressError("control character in address")
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address needs a local part and a domain")
    local, domain = text[:at], text[at + 1 :]
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    if not (_DOT_ATOM.match(local) or _QUOTED.match(local)):
        raise AddressError("invalid local part")
    return Address(local, _normalise_domain(domain))


def parse_path(text: str) -> Address | None:
    """Parse an RFC 5321 Reverse-path or Forward-path: `<...>`, `<>` gives None.

    A source route (`<@a,@b:user@domain>`) is accepted and ignored (RFC 5321 §4.1.1.3).
    """
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("path must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        return None
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise AddressError("invalid source route")
        inner = inner[colon + 1 :]
    return parse_address(inner)


def is_safe_mailbox_name(name: str) -> bool:
    """True if `name` can be one path component of a Maildir location without tricks."""
    return (
        bool(name)
        and name not in (".", "..")
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and len(name.encode("utf-8")) <= 255
    )
