"""Who a client is: password checks against the users file, SASL PLAIN/LOGIN, brute-force brakes.

Shared by SMTP submission, POP3 and IMAP.

Invariants:
- Password hashes are verified in a thread pool, never on the reactor thread (argon2id is
  deliberately slow).
- A failed check costs the same whether the user exists or not (a dummy hash is verified),
  so timing does not reveal which addresses have mailboxes.
- Failures are counted per client address across connections (`FailureTracker`); the
  protocols slow down and finally refuse clients that keep failing.
- SASL PLAIN's authorization identity, if given, must equal the authentication identity.
"""

from __future__ import annotations

import base64
import binascii
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mx.address import AddressError, parse_address
from mx.users import UserDB, hash_password, verify_password

__all__ = ["Authenticator", "FailureTracker", "SASLError", "decode_plain", "decode_b64", "LOGIN_USER", "LOGIN_PASS"]

log = Logger()

LOGIN_USER = base64.b64encode(b"Username:").decode()
LOGIN_PASS = base64.b64encode(b"Password:").decode()


@functools.lru_cache(maxsize=1)
def _dummy_hash() -> str:
    # Made on first use (in a pool thread), not at import: argon2 costs 64 MiB and ~0.5 s.
    return hash_password("not a real password: equalises timing for unknown users")


def _verify(stored: str | None, password: str) -> bool:
    """In a pool thread: unknown users cost a verification too, and always fail."""
    ok = verify_password(stored or _dummy_hash(), password)
    return ok and stored is not None


class SASLError(ValueError):
    """A malformed SASL response (RFC 4954 §4: answered with 501)."""


def decode_b64(text: str) -> bytes:
    """A SASL response: base64, "=" for empty (RFC 4954 §4)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SASLError("invalid base64") from None


def decode_plain(response: bytes) -> tuple[str, str]:
    """RFC 4616: `[authzid] NUL authcid NUL passwd` -> (username, password)."""
    parts = response.split(b"\x00")
    if len(parts) != 3:
        raise SASLError("PLAIN needs authzid, authcid and password separated by NUL")
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise SASLError("PLAIN response is not UTF-8") from None
    if not authcid or not password:
        raise SASLError("empty user name or password")
    if authzid and authzid.lower() != authcid.lower():
        raise SASLError("authorization identity must equal the authentication identity")
    return authcid, password


@dataclass
class FailureTracker:
    """Recent authentication failures per client address, across connections."""

    clock: Callable[[], float] = time.monotonic
    window: float = 900.0  # failures older than this are forgotten
    free: int = 3  # failures allowed before answers slow down
    max_delay: float = 15.0
    block_after: int = 30  # recent failures after which a client is refused outright

    def __post_init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        now = self.clock()
        q = self._failures.get(client)
        if q is None:
            return deque()
        while q and now - q[0] > self.window:
            q.popleft()
        if not q:
            del self._failures[client]
        return q

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(self.clock())
        if len(self._failures) > 100_000:  # bound memory under a distributed attack
            oldest = min(self._failures, key=lambda c: self._failures[c][-1])
            del self._failures[oldest]

    def delay(self, client: str, connection_failures: int) -> float:
        """Seconds to wait before answering the next attempt (exponential, capped)."""
        n = max(len(self._recent(client)), connection_failures)
        if n <= self.free:
            return 0.0
        return min(self.max_delay, 2.0 ** (n - self.free - 1))

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.block_after


class Authenticator:
    """Checks passwords against the users file, off the reactor thread."""

    def __init__(self, users: UserDB, reactor: Any, pool: ThreadPool) -> None:
        self.users = users
        self._reactor = reactor
        self._pool = pool
        self.failures = FailureTracker()

    def canonical(self, username: str) -> str | None:
        try:
            return parse_address(username).canonical
        except AddressError:
            return None

    def check(self, username: str, password: str) -> Deferred[str | None]:
        """The user's canonical address if the password is right, else None."""
        user = self.canonical(username)
        stored = self.users.lookup(user) if user is not None else None
        d = deferToThreadPool(self._reactor, self._pool, _verify, stored, password)
        return d.addCallback(lambda ok: user if ok else None)
