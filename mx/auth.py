"""Who a client is: password checks against the users file, the SASL exchange (PLAIN, LOGIN),
the plaintext-without-TLS policy and the brute-force brakes.

Shared by SMTP submission, POP3 and IMAP: each protocol keeps only its framing (SMTP's 334
challenges and 235/535 replies, IMAP's `+` continuations and tagged OK/NO).

Invariants:
- Password hashes are verified in a thread pool, never on the reactor thread (argon2id is
  deliberately slow). Users are looked up in memory only (`UserDB.lookup`).
- A failed check costs the same whether the user exists or not (a dummy hash is verified),
  so timing does not reveal which addresses have mailboxes.
- `SASLExchange` is sans-IO: lines in, `Challenge` / `Credentials` / `Rejected` out; "*"
  cancels at any step (RFC 4954 §4, RFC 3501 §6.2.2); nothing is logged there, so passwords
  never reach a log.
- SASL PLAIN's authorization identity, if given, must equal the authentication identity.
- Failures are counted per client address across connections (`FailureTracker`, bounded:
  the least recently failing address is forgotten first, in O(1)) and per connection
  (`ConnectionBrake`): answers slow down, then the connection is closed, then the address
  is refused for a while.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum, StrEnum

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mx.address import AddressError, parse_address
from mx.users import UserDB, hash_password, verify_password

__all__ = [
    "Authenticator", "Challenge", "ConnectionBrake", "Credentials", "FailureTracker", "MAX_AUTH_FAILURES",
    "MAX_TRACKED_CLIENTS", "Mechanism", "Rejected", "SASLError", "SASLExchange", "SASLProblem", "Verdict",
    "decode_b64", "decode_plain", "plaintext_allowed", "LOGIN_USER", "LOGIN_PASS",
]

log = Logger()

LOGIN_USER = base64.b64encode(b"Username:").decode()
LOGIN_PASS = base64.b64encode(b"Password:").decode()
MAX_AUTH_FAILURES = 10  # per connection; then it is closed
MAX_TRACKED_CLIENTS = 100_000  # addresses remembered by FailureTracker (memory under a distributed attack)


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


# --- the SASL exchange (sans-IO) ---------------------------------------------------------


class Mechanism(StrEnum):
    PLAIN = "PLAIN"  # RFC 4616
    LOGIN = "LOGIN"  # draft-murchison-sasl-login


MECHANISMS = tuple(Mechanism)  # in the order servers advertise them


class SASLProblem(Enum):
    UNKNOWN_MECHANISM = "unknown mechanism"  # SMTP 504 5.5.4
    MALFORMED = "malformed response"  # SMTP 501 5.5.2
    CANCELLED = "cancelled"  # the client sent "*": SMTP 501 5.0.0
    NOT_EXPECTED = "no exchange in progress"


@dataclass(frozen=True, slots=True)
class Challenge:
    """Send `text` (already base64, may be empty) and pass the client's next line to `step`."""

    text: str


@dataclass(frozen=True, slots=True)
class Credentials:
    """The exchange is complete: check these (`Authenticator.check`)."""

    username: str
    password: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """The exchange is over without credentials; `text` is safe to show the client."""

    problem: SASLProblem
    text: str


Outcome = Challenge | Credentials | Rejected


class SASLExchange:
    """One SASL authentication (RFC 4422) as a small state machine, free of I/O.

    `start(mechanism, initial)` and then `step(line)` for every client line while the last
    outcome was a `Challenge`. `initial` is the initial response (None when the client sent
    none; "=" is an empty one, RFC 4954 §4). A mechanism with server state (SCRAM) is one
    more `_step` chain here; the protocols do not change.
    """

    def __init__(self) -> None:
        self._step: Callable[[str], Outcome] | None = None
        self.mechanism: Mechanism | None = None

    @property
    def waiting(self) -> bool:
        """A challenge was sent and the client's answer is awaited."""
        return self._step is not None

    def start(self, mechanism: str, initial: str | None = None) -> Outcome:
        self._step = None
        try:
            self.mechanism = Mechanism(mechanism.upper())
        except ValueError:
            self.mechanism = None
            return Rejected(SASLProblem.UNKNOWN_MECHANISM, "Unrecognized authentication type")
        if initial is not None and initial.strip() == "*":
            return Rejected(SASLProblem.CANCELLED, "Authentication canceled")
        first = self._plain if self.mechanism is Mechanism.PLAIN else self._login_user
        if initial:
            return first(initial)
        # PLAIN's first challenge is empty (RFC 4616 §2); LOGIN asks for the user name.
        self._step = first
        return Challenge("" if self.mechanism is Mechanism.PLAIN else LOGIN_USER)

    def step(self, line: str) -> Outcome:
        """The client's answer to the last challenge; a step that challenges again sets `_step`."""
        step, self._step = self._step, None
        if step is None:
            return Rejected(SASLProblem.NOT_EXPECTED, "Unexpected line")
        if line.strip() == "*":
            return Rejected(SASLProblem.CANCELLED, "Authentication canceled")  # RFC 4954 §4
        return step(line)

    def cancel(self) -> None:
        """Forget a half-done exchange (STARTTLS, a syntax error, the connection ends)."""
        self._step = None

    def _plain(self, response: str) -> Outcome:
        try:
            username, password = decode_plain(decode_b64(response))
        except SASLError as e:
            return Rejected(SASLProblem.MALFORMED, f"Bad PLAIN response: {e}")
        return Credentials(username, password)

    def _login_user(self, response: str) -> Outcome:
        try:
            username = decode_b64(response).decode("utf-8")
        except (SASLError, UnicodeDecodeError):
            return Rejected(SASLProblem.MALFORMED, "Bad LOGIN user name")
        self._step = lambda line: self._login_password(username, line)
        return Challenge(LOGIN_PASS)

    def _login_password(self, username: str, response: str) -> Outcome:
        try:
            password = decode_b64(response).decode("utf-8")
        except (SASLError, UnicodeDecodeError):
            return Rejected(SASLProblem.MALFORMED, "Bad LOGIN password")
        return Credentials(username, password)


# --- policy: where passwords may be sent, and the brakes ---------------------------------


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def plaintext_allowed(peer_ip: str, tls_active: bool, plaintext_without_tls: Iterable[IPNetwork]) -> bool:
    """May this client send a password (`auth.plaintext_without_tls`, RFC 4954 §4 / RFC 8314)?"""
    return tls_active or ip_in(peer_ip, plaintext_without_tls)


def ip_in(peer_ip: str, networks: Iterable[IPNetwork]) -> bool:
    """Is this address (an IPv4-mapped IPv6 one as its IPv4) in one of the networks?"""
    try:
        ip = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


@dataclass
class FailureTracker:
    """Recent authentication failures per client address, across connections.

    At most `max_clients` addresses are remembered; the least recently failing one is
    forgotten first (an ordered dict: O(1) per failure, whatever the number of clients).
    """

    clock: Callable[[], float] = time.monotonic
    window: float = 900.0  # failures older than this are forgotten
    free: int = 3  # failures allowed before answers slow down
    max_delay: float = 15.0
    block_after: int = 30  # recent failures after which a client is refused outright
    max_clients: int = MAX_TRACKED_CLIENTS

    def __post_init__(self) -> None:
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def __contains__(self, client: str) -> bool:
        return client in self._failures

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
        q = self._failures.get(client)
        if q is None:
            # Only the last block_after failures matter: beyond them the client is blocked.
            q = self._failures[client] = deque(maxlen=self.block_after)
        else:
            self._failures.move_to_end(client)
        q.append(self.clock())
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def delay(self, client: str, connection_failures: int) -> float:
        """Seconds to wait before answering the next attempt (exponential, capped)."""
        n = max(len(self._recent(client)), connection_failures)
        if n <= self.free:
            return 0.0
        return min(self.max_delay, 2.0 ** (n - self.free - 1))

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.block_after


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do after a failed attempt: wait `delay` seconds, then answer; or close."""

    delay: float
    close: bool


class ConnectionBrake:
    """The brakes for one connection: its own failure count plus its address's history."""

    def __init__(self, tracker: FailureTracker, client: str, max_failures: int = MAX_AUTH_FAILURES) -> None:
        self.tracker = tracker
        self.client = client
        self.max_failures = max_failures
        self.failures = 0

    def blocked(self) -> bool:
        """Refuse this address outright (too many recent failures, any connection)."""
        return self.tracker.blocked(self.client)

    def failed(self) -> Verdict:
        self.failures += 1
        self.tracker.failed(self.client)
        if self.failures >= self.max_failures:
            return Verdict(0.0, close=True)
        # Slow down guessing: each further failure waits longer before it is answered.
        return Verdict(self.tracker.delay(self.client, self.failures), close=False)


class Authenticator:
    """Checks passwords against the users file, off the reactor thread."""

    def __init__(self, users: UserDB, reactor: IReactorFromThreads, pool: ThreadPool) -> None:
        self.users = users
        self._reactor = reactor
        self._pool = pool
        self.failures = FailureTracker()

    def brake(self, client: str) -> ConnectionBrake:
        """The failure brakes for a new connection from `client` (a `client_key`)."""
        return ConnectionBrake(self.failures, client)

    def canonical(self, username: str) -> str | None:
        try:
            return parse_address(username).canonical
        except AddressError:
            return None

    def check(self, username: str, password: str) -> Deferred[str | None]:
        """The user's canonical address if the password is right, else None."""
        user = self.canonical(username)
        stored = self.users.lookup(user) if user is not None else None  # memory only
        d = deferToThreadPool(self._reactor, self._pool, _verify, stored, password)
        return d.addCallback(lambda ok: user if ok else None)
