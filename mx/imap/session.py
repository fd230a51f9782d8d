"""One IMAP session: its state, the one table of commands per state, and every command.

The Twisted protocol (`mx.imap.server`) feeds parsed `Command`s here one at a time and gives
the session a `Link` (write, start TLS, close, raw lines, back-pressure). Store calls run
in the read pool through `Link.in_pool`, one at a time per session (a `DeferredLock`), so a
`Folder` is never used by two threads at once; nothing blocking runs on the reactor thread.

Invariants:
- A command runs only in a state that allows it (`ALLOWED`); anything else is `BAD`.
- Untagged data for a command is written before its tagged completion; changes others
  made to the selected folder (new mail, flags, expunges) are announced after every
  command, before its tagged response, and while IDLE, but an EXPUNGE never during FETCH,
  STORE or SEARCH (RFC 3501 §7.4.1; the UID forms may, §6.4.8).
- SELECT, EXAMINE, STATUS and FETCH of FLAGS/UID/RFC822.SIZE never open a message file
  (the store reads names and `dovecot-uidlist` only).
- APPEND answers OK only after the message file and its directory are fsynced
  (`Folder.append`); a literal above `limits.max_message_size` is refused before it is read.
- LOGIN and AUTHENTICATE are refused before TLS unless the peer is in
  `auth.plaintext_without_tls` (LOGINDISABLED is then advertised); failures feed the same
  per-connection and per-IP brakes as SMTP AUTH and POP3.
- A message that vanished is skipped by FETCH (`NO [EXPUNGEISSUED]` at the end), never
  an error that ends the session.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mx.auth import Authenticator, Challenge, ConnectionBrake, Rejected, SASLExchange, SASLProblem, plaintext_allowed
from mx.config import Config
from mx.imap import fetch, search
from mx.imap.listing import ListRequest, list_entries, wire_name, wire_to_name
from mx.imap.parse import Arg, Atom, Command, Literal, Nil, ParenList, Quoted, SequenceSet, as_astring
from mx.imap.respond import astring, continuation, tagged, untagged, untagged_status
from mx.imap import tasks
from mx.imap.selected import View, pairs_in
from mx.imap.tasks import Failed, bad, no
from mx.maildir import MaildirError, mailbox_path
from mx.store import Folder, Mailbox, StoreError
from mx.store.cache import StructureCache
from mx.store.mailbox import SPECIAL_USE, folder_dir_name

__all__ = ["State", "Session", "Link", "ALLOWED", "capabilities"]

log = Logger()

FETCH_BATCH = 500  # messages per read-pool trip of a FETCH that reads files
FLAGS_BATCH = 2_000  # messages per trip when no file is read (small: the client reads the first meanwhile)
FETCH_BATCH_OCTETS = 4 << 20  # and at most this much message data per trip (one message at least)
STATUS_ITEMS = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN")
_DATE_TIME = re.compile(r"^ ?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")
_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}


class State(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"
    LOGOUT = "logout"


_ANY = {"CAPABILITY", "NOOP", "LOGOUT", "ID"}
_AUTHED = _ANY | {
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
    "STATUS", "APPEND", "NAMESPACE", "IDLE", "ENABLE",
}
_SELECTED = _AUTHED | {
    "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
    "UID SEARCH", "UID FETCH", "UID STORE", "UID COPY", "UID MOVE", "UID EXPUNGE",
}
ALLOWED: dict[State, frozenset[str]] = {
    State.NOT_AUTHENTICATED: frozenset(_ANY | {"STARTTLS", "AUTHENTICATE", "LOGIN"}),
    State.AUTHENTICATED: frozenset(_AUTHED),
    State.SELECTED: frozenset(_SELECTED),
    State.LOGOUT: frozenset(),
}
# RFC 3501 §7.4.1: no EXPUNGE while responding to these (their UID forms are fine).
_NO_EXPUNGE = frozenset({"FETCH", "STORE", "SEARCH"})


def capabilities(*, tls_available: bool, tls_active: bool, plaintext_ok: bool, authenticated: bool,
                 append_limit: int) -> list[str]:
    caps = ["IMAP4rev1", "LITERAL+", "SASL-IR", "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT",
            "CHILDREN", "UIDPLUS", "MOVE", "SPECIAL-USE", "CREATE-SPECIAL-USE", "LIST-EXTENDED",
            "LIST-STATUS", f"APPENDLIMIT={append_limit}"]
    if not authenticated:
        if tls_available and not tls_active:
            caps.append("STARTTLS")
        if plaintext_ok:
            caps += ["AUTH=PLAIN", "AUTH=LOGIN"]
        else:
            caps.append("LOGINDISABLED")
    return caps


class Link(Protocol):
    """What a session needs from its connection (`mx.imap.server` implements it)."""

    peer_ip: str
    tls_active: bool
    tls_available: bool

    def write(self, data: bytes) -> None: ...
    def start_tls(self) -> None: ...
    def close(self) -> None: ...
    def read_raw_line(self) -> Deferred[bytes | None]: ...
    def drain(self) -> Deferred[None]: ...
    def in_pool(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]: ...
    def watch(self, folder: Path, callback: Callable[[], None]) -> Any: ...
    def hold(self, folder: Path) -> Any: ...


def _uid_set(uids: Sequence[int]) -> str:
    """`1:3,7,9:10` for UIDPLUS response codes (in the order given, runs compressed)."""
    out: list[str] = []
    i = 0
    while i < len(uids):
        j = i
        while j + 1 < len(uids) and uids[j + 1] == uids[j] + 1:
            j += 1
        out.append(str(uids[i]) if i == j else f"{uids[i]}:{uids[j]}")
        i = j + 1
    return ",".join(out)


def parse_date_time(text: str) -> float:
    """RFC 3501 date-time `"17-Jul-1996 02:44:25 -0700"` as a POSIX time; ValueError if not."""
    m = _DATE_TIME.match(text)
    if not m:
        raise ValueError("bad date-time")
    day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
    month = _MONTHS.get(mon.lower())
    if month is None:
        raise ValueError("bad month")
    t = calendar.timegm((int(year), month, int(day), int(hh), int(mm), int(ss)))
    offset = (int(zh) * 60 + int(zm)) * 60
    return t - offset if sign == "+" else t + offset


class Session:
    """Commands of one connection; `execute(cmd)` returns the bytes of its tagged response."""

    def __init__(self, link: Link, *, config: Config, authenticator: Authenticator, clock: IReactorTime,
                 brake: ConnectionBrake) -> None:
        self.link = link
        self.config = config
        self.auth = authenticator
        self.clock = clock
        self.brake = brake
        self.state = State.NOT_AUTHENTICATED
        self.user: str | None = None
        self.mailbox: Mailbox | None = None
        self.folder: Folder | None = None
        self.folder_name: str | None = None
        self.view: View | None = None
        self.cache: StructureCache | None = None  # the selected folder's ENVELOPE/BODYSTRUCTURE answers
        self.sasl = SASLExchange()
        self.commands = 0
        self._lock = DeferredLock()
        self._watch: Any = None
        self._idling = False
        self._idle_dirty = False
        self._idle_busy = False
        self._keepalive: Any = None
        self._recheck: Any = None  # an idle refresh at the end of the folder's trust window
        # A refresh made in the same pool trip as the command's last store call (its folder
        # and result; None: the command itself just listed the folder). `_sync` takes it
        # instead of a trip of its own: one thread hop per command, not two.
        self._synced: tuple[Folder, Any] | None = None
        # The selected folder's change count (mx.watch.Hold) when its last refresh began, and
        # when that was: while inotify reports nothing new, `_sync` needs no trip to the pool
        # (NOOP and small FETCHes 0.2-0.3 ms sooner), for at most QUIET_TRUST seconds.
        self._hold: Any = None
        self._refreshed: tuple[int | None, float] = (None, 0.0)

    # -- plumbing ----------------------------------------------------------------------

    def store(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run `f` in the read pool after this session's previous store call finished."""
        return self._lock.run(self.link.in_pool, f, *args)

    async def store_then_sync(self, f: Callable[..., Any], *args: Any) -> Any:
        """`store(f, *args)` followed, in the same trip, by the refresh `_sync` would make
        after the command: for a command's last store call."""
        folder = self.folder

        def both() -> tuple[Any, Any]:
            result = f(*args)
            return result, tasks.refresh(folder) if folder is not None else None

        self._refreshing()
        result, synced = await self.store(both)
        if folder is not None:
            self._synced = (folder, synced)
        return result

    @property
    def plaintext_ok(self) -> bool:
        return plaintext_allowed(self.link.peer_ip, self.link.tls_active, self.config.auth.plaintext_without_tls)

    def capability_list(self) -> list[str]:
        return capabilities(tls_available=self.link.tls_available, tls_active=self.link.tls_active,
                            plaintext_ok=self.plaintext_ok, authenticated=self.state is not State.NOT_AUTHENTICATED,
                            append_limit=self.config.limits.max_message_size)

    async def execute(self, cmd: Command) -> bytes:
        self.commands += 1
        self._synced = None
        if cmd.name not in ALLOWED[self.state]:
            known = any(cmd.name in verbs for verbs in ALLOWED.values())
            return tagged(cmd.tag, "BAD", f"{cmd.name} not allowed now" if known else "Unknown command")
        handler = getattr(self, "do_" + cmd.name.replace(" ", "_"))
        try:
            result = await handler(cmd)
        except Failed as f:
            result = tagged(cmd.tag, f.status, f.text, f.code)
            if f.bye is not None:
                self.state = State.LOGOUT  # the protocol closes after writing this
                return result + untagged_status("BYE", f.bye)
        except StoreError as e:
            log.info("imap store error for {user}: {error}", user=self.user, error=str(e))
            result = tagged(cmd.tag, "NO", "Cannot do that with this mailbox now", "SERVERBUG")
        if self.state is State.SELECTED and cmd.name not in ("LOGOUT", "IDLE"):
            base = cmd.name.removeprefix("UID ")
            updates = await self._sync(expunge_ok=cmd.name.startswith("UID ") or base not in _NO_EXPUNGE)
            if updates:
                self.link.write(updates)
        return result

    async def _sync(self, expunge_ok: bool) -> bytes:
        folder, view = self.folder, self.view
        if folder is None or view is None:
            return b""
        synced, self._synced = self._synced, None
        if synced is not None and synced[0] is folder:
            if synced[1] is None:
                return b""
            changes, recent, keywords = synced[1]
        elif self._quiet():
            return view.expunged(sorted(view.pending)) if expunge_ok and view.pending else b""
        else:
            self._refreshing()
            changes, recent, keywords = await self.store(tasks.refresh, folder)
        if self.view is not view:
            return b""
        if not changes:
            if expunge_ok and view.pending:
                return view.expunged(sorted(view.pending))
            return b""
        out = view.apply(changes, recent, keywords or view.keywords, folder.next_uid, expunge_ok)
        if changes.uidvalidity_changed:
            # RFC 3501 §2.3.1.1: the list was rebuilt elsewhere; end the selection.
            self._deselect()
            self.link.write(untagged_status("BYE", "Mailbox UIDVALIDITY changed, please reconnect"))
            self.link.close()
        return out

    def _refreshing(self) -> None:
        """A refresh of the selected folder starts now: what inotify has counted so far is in
        it (a change from here on counts again)."""
        gen = self._hold.generation() if self._hold is not None else None
        self._refreshed = (gen, self.clock.seconds())

    def _quiet(self) -> bool:
        """Whether the selected folder surely has nothing new since its last refresh: inotify
        (not polling) counted no change and that refresh is under QUIET_TRUST seconds old
        (a bound for what inotify cannot see: a file system another host writes)."""
        if self._hold is None:
            return False
        gen, at = self._refreshed
        return gen is not None and self._hold.generation() == gen and self.clock.seconds() - at < QUIET_TRUST

    def end(self) -> None:
        """The connection is gone: drop watches and timers."""
        self._deselect()
        self.sasl.cancel()
        if self._keepalive is not None and self._keepalive.active():
            self._keepalive.cancel()

    # -- any state ---------------------------------------------------------------------

    async def do_CAPABILITY(self, cmd: Command) -> bytes:
        self.link.write(untagged("CAPABILITY", " ".join(self.capability_list())))
        return tagged(cmd.tag, "OK", "CAPABILITY completed")

    async def do_NOOP(self, cmd: Command) -> bytes:
        return tagged(cmd.tag, "OK", "NOOP completed")

    async def do_LOGOUT(self, cmd: Command) -> bytes:
        self.link.write(untagged_status("BYE", f"{self.config.hostname} logging out"))
        self.state = State.LOGOUT
        self._deselect()
        return tagged(cmd.tag, "OK", "LOGOUT completed")

    async def do_ID(self, cmd: Command) -> bytes:
        # RFC 2971: the client's list is only logged; ours names the software.
        if len(cmd.args) != 1 or not isinstance(cmd.args[0], (ParenList, Nil)):
            raise bad("Syntax: ID (field value ...) or ID NIL")
        self.link.write(b'* ID ("name" "mx" "vendor" "mx")\r\n')
        return tagged(cmd.tag, "OK", "ID completed")

    async def do_ENABLE(self, cmd: Command) -> bytes:
        if not cmd.args:
            raise bad("Syntax: ENABLE capability ...")
        self.link.write(b"* ENABLED\r\n")  # no extension that needs enabling is offered
        return tagged(cmd.tag, "OK", "ENABLE completed")

    # -- not authenticated -------------------------------------------------------------

    async def do_STARTTLS(self, cmd: Command) -> bytes:
        if cmd.args:
            raise bad("STARTTLS takes no arguments")
        if not self.link.tls_available or self.link.tls_active:
            raise bad("TLS is not available" if not self.link.tls_available else "TLS is already active")
        self.link.write(tagged(cmd.tag, "OK", "Begin TLS negotiation now"))
        self.link.start_tls()  # discards what the client pipelined behind STARTTLS
        self.sasl.cancel()
        return b""

    def _may_try(self, username: str) -> None:
        if not self.plaintext_ok:
            self._failed_log(username, "plaintext before TLS")
            raise no("Plaintext authentication is not allowed without TLS", "PRIVACYREQUIRED")
        if self.brake.blocked():
            self._failed_log(username, "too many failures from this address")
            raise Failed("NO", "Too many authentication failures", "UNAVAILABLE",
                         bye="Too many authentication failures, try later")

    def _failed_log(self, username: str, reason: str) -> None:
        log.info("imap login failed for {username} from {peer}: {reason}", username=username[:100],
                 peer=self.link.peer_ip, reason=reason, count=self.brake.failures)

    async def do_LOGIN(self, cmd: Command) -> bytes:
        if len(cmd.args) != 2:
            raise bad("Syntax: LOGIN user password")
        user, password = as_astring(cmd.args[0]), as_astring(cmd.args[1])
        if user is None or password is None:
            raise bad("Syntax: LOGIN user password")
        self._may_try(user)
        return await self._login(cmd.tag, user, password)

    async def do_AUTHENTICATE(self, cmd: Command) -> bytes:
        if not cmd.args or len(cmd.args) > 2 or not isinstance(cmd.args[0], Atom):
            raise bad("Syntax: AUTHENTICATE mechanism [initial-response]")
        self._may_try("(SASL)")
        initial = as_astring(cmd.args[1]) if len(cmd.args) == 2 else None
        outcome = self.sasl.start(cmd.args[0].text, initial)
        while isinstance(outcome, Challenge):
            self.link.write(continuation(outcome.text))
            line = await self.link.read_raw_line()
            if line is None:
                self.sasl.cancel()
                return b""
            try:
                text = line.decode("ascii")
            except UnicodeDecodeError:
                self.sasl.cancel()
                raise bad("Invalid SASL response") from None
            outcome = self.sasl.step(text)
        if isinstance(outcome, Rejected):
            if outcome.problem is SASLProblem.CANCELLED:
                raise bad("Authentication canceled")
            if outcome.problem is SASLProblem.UNKNOWN_MECHANISM:
                raise no("Unsupported authentication mechanism")
            raise bad(outcome.text)
        return await self._login(cmd.tag, outcome.username, outcome.password)

    async def _login(self, tag: str, username: str, password: str) -> bytes:
        user = await self.auth.check(username, password)
        if user is None:
            canonical = self.auth.canonical(username)
            known = canonical is not None and self.auth.users.lookup(canonical) is not None
            verdict = self.brake.failed()
            self._failed_log(username, "wrong password" if known else "unknown user")
            if verdict.close:
                self.link.write(tagged(tag, "NO", "Authentication failed", "AUTHENTICATIONFAILED"))
                self.link.write(untagged_status("BYE", "Too many authentication failures"))
                self.link.close()
                return b""
            if verdict.delay > 0:
                d: Deferred[None] = Deferred()
                self.clock.callLater(verdict.delay, d.callback, None)
                await d
            raise no("Authentication failed", "AUTHENTICATIONFAILED")
        local, _, domain = user.rpartition("@")
        try:
            root = mailbox_path(self.config.data_dir / "mail", domain, local)
        except MaildirError:
            self._failed_log(user, "no valid mailbox path")
            raise no("No mailbox for this user", "UNAVAILABLE") from None
        mailbox = Mailbox(root, log=lambda line: log.warn("{user}: {line}", user=user, line=line),
                          cache_dir=self.config.data_dir / "cache" / domain / local)
        try:
            created = await self.store(mailbox.ensure_special_folders)
        except StoreError as e:
            log.warn("imap: cannot make the special-use folders of {user}: {error}", user=user, error=str(e))
            created = []
        self.user, self.mailbox, self.state = user, mailbox, State.AUTHENTICATED
        log.info("imap login {user} from {peer}", user=user, peer=self.link.peer_ip, tls=self.link.tls_active,
                 created=created)
        return tagged(tag, "OK", "Logged in", ["CAPABILITY", " ".join(self.capability_list())])

    # -- authenticated: folders -------------------------------------------------------

    def _name(self, arg: Arg) -> str:
        text = as_astring(arg)
        if text is None:
            raise bad("Mailbox name expected")
        try:
            name = wire_to_name(text)
        except ValueError:
            raise no("Invalid mailbox name (modified UTF-7 expected)") from None
        if name != "INBOX":
            try:
                folder_dir_name(name.rstrip("."))  # "..", "/", control characters: refused here
            except StoreError:
                raise no("Invalid mailbox name") from None
        return name

    def _deselect(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None
        self._refreshed = (None, 0.0)
        self.folder = self.view = self.folder_name = self.cache = None
        if self.state is State.SELECTED:
            self.state = State.AUTHENTICATED

    async def do_SELECT(self, cmd: Command, read_only: bool = False) -> bytes:
        if len(cmd.args) != 1:
            raise bad(f"Syntax: {cmd.name} mailbox")
        name = self._name(cmd.args[0])
        self._deselect()
        assert self.mailbox is not None
        folder, recent, keywords = await self.store(tasks.select_folder, self.mailbox, name, read_only)
        # Watched from now on; the first command after this one still refreshes (a change
        # during the listing is not counted yet), later ones only after a change.
        self._hold = self.link.hold(folder.path)
        view = View.open(folder.table(), recent, keywords, folder.uidvalidity, folder.next_uid, read_only)
        out = [view.flags_response(), untagged(len(view), "EXISTS"), untagged(len(view.recent), "RECENT")]
        unseen = view.first_unseen()
        if unseen is not None:
            out.append(untagged_status("OK", "First unseen.", ["UNSEEN", unseen]))
        out.append(untagged_status("OK", "UIDs valid", ["UIDVALIDITY", view.uidvalidity]))
        out.append(untagged_status("OK", "Predicted next UID", ["UIDNEXT", view.next_uid]))
        self.link.write(b"".join(out))
        self.folder, self.view, self.folder_name, self.state = folder, view, name, State.SELECTED
        cache_path = self.mailbox.cache_path(name, "imapcache")
        self.cache = StructureCache(cache_path, folder.uidvalidity) if cache_path is not None else None
        self._synced = (folder, None)  # just listed: nothing to report after SELECT
        return tagged(cmd.tag, "OK", f"{'EXAMINE' if read_only else 'SELECT'} completed",
                      "READ-ONLY" if read_only else "READ-WRITE")

    async def do_EXAMINE(self, cmd: Command) -> bytes:
        return await self.do_SELECT(cmd, read_only=True)

    async def do_CREATE(self, cmd: Command) -> bytes:
        if len(cmd.args) not in (1, 2):
            raise bad("Syntax: CREATE mailbox [(USE (...))]")
        name = self._name(cmd.args[0]).rstrip(".")
        if len(cmd.args) == 2:
            # RFC 6154 §3: CREATE-SPECIAL-USE; uses are tied to the standard names here.
            opts = cmd.args[1]
            if not isinstance(opts, ParenList) or len(opts.items) != 2 or as_astring(opts.items[0]) is None \
                    or as_astring(opts.items[0]).upper() != "USE" or not isinstance(opts.items[1], ParenList):
                raise bad("Syntax: CREATE mailbox (USE (\\Sent ...))")
            for use in opts.items[1].items:
                flag = as_astring(use) or ""
                if SPECIAL_USE.get(name, "").lower() != flag.lower():
                    raise no(f"{flag} is only for the folder named "
                              + next((n for n, u in SPECIAL_USE.items() if u.lower() == flag.lower()), "(none)"),
                              "USEATTR")
        if name.upper() == "INBOX":
            raise no("INBOX always exists", "ALREADYEXISTS")
        assert self.mailbox is not None
        if await self.store(self.mailbox.exists, name):
            raise no("Mailbox already exists", "ALREADYEXISTS")
        await self.store(self.mailbox.create, name)
        log.info("imap {user} created {folder}", user=self.user, folder=name)
        return tagged(cmd.tag, "OK", "CREATE completed")

    async def do_DELETE(self, cmd: Command) -> bytes:
        if len(cmd.args) != 1:
            raise bad("Syntax: DELETE mailbox")
        name = self._name(cmd.args[0])
        if name == "INBOX":
            raise no("INBOX cannot be deleted")
        assert self.mailbox is not None
        if not await self.store(self.mailbox.exists, name):
            raise no("Mailbox does not exist", "NONEXISTENT")
        if self.folder_name == name:
            self._deselect()
        await self.store(self.mailbox.delete, name)
        log.info("imap {user} deleted {folder}", user=self.user, folder=name)
        return tagged(cmd.tag, "OK", "DELETE completed")

    async def do_RENAME(self, cmd: Command) -> bytes:
        if len(cmd.args) != 2:
            raise bad("Syntax: RENAME old new")
        old, new = self._name(cmd.args[0]), self._name(cmd.args[1]).rstrip(".")
        assert self.mailbox is not None
        if not await self.store(self.mailbox.exists, old):
            raise no("Mailbox does not exist", "NONEXISTENT")
        if new == "INBOX" or await self.store(self.mailbox.exists, new):
            raise no("Target mailbox already exists", "ALREADYEXISTS")
        if self.folder_name is not None and (self.folder_name == old or self.folder_name.startswith(old + ".")):
            if old != "INBOX":
                self._deselect()
        await self.store(self.mailbox.rename, old, new)
        log.info("imap {user} renamed {old} to {new}", user=self.user, old=old, new=new)
        return tagged(cmd.tag, "OK", "RENAME completed")

    async def do_SUBSCRIBE(self, cmd: Command, on: bool = True) -> bytes:
        if len(cmd.args) != 1:
            raise bad(f"Syntax: {cmd.name} mailbox")
        name = self._name(cmd.args[0])
        assert self.mailbox is not None
        await self.store(self.mailbox.subscribe if on else self.mailbox.unsubscribe, name)
        return tagged(cmd.tag, "OK", f"{cmd.name} completed")

    async def do_UNSUBSCRIBE(self, cmd: Command) -> bytes:
        return await self.do_SUBSCRIBE(cmd, on=False)

    async def do_NAMESPACE(self, cmd: Command) -> bytes:
        self.link.write(b'* NAMESPACE (("" ".")) NIL NIL\r\n')
        return tagged(cmd.tag, "OK", "NAMESPACE completed")

    async def do_LIST(self, cmd: Command, lsub: bool = False) -> bytes:
        req = _list_request(cmd.args, lsub)
        assert self.mailbox is not None
        if not req.patterns or req.patterns == ("",):
            # RFC 3501 §6.3.8: an empty pattern asks for the separator and the root.
            self.link.write(b'* %s (\\Noselect) "." ""\r\n' % (b"LSUB" if lsub else b"LIST"))
            return tagged(cmd.tag, "OK", f"{cmd.name} completed")
        folders, subscriptions = await self.store(tasks.folders_and_subscriptions, self.mailbox)
        entries = list_entries(req, folders, subscriptions)
        word = b"LSUB" if lsub else b"LIST"
        out = []
        for e in entries:
            line = b"* %s (%s) \".\" %s" % (word, " ".join(e.attributes).encode(), astring(wire_name(e.name)))
            if e.child_info:
                line += b' ("CHILDINFO" ("SUBSCRIBED"))'
            out.append(line + b"\r\n")
            if req.status and e.selectable:
                try:
                    status = await self.store(tasks.folder_status, self.mailbox, e.name)
                except StoreError:
                    continue
                out.append(_status_line(e.name, status, req.status))
        self.link.write(b"".join(out))
        return tagged(cmd.tag, "OK", f"{cmd.name} completed")

    async def do_LSUB(self, cmd: Command) -> bytes:
        return await self.do_LIST(cmd, lsub=True)

    async def do_STATUS(self, cmd: Command) -> bytes:
        if len(cmd.args) != 2 or not isinstance(cmd.args[1], ParenList) or not cmd.args[1].items:
            raise bad("Syntax: STATUS mailbox (items)")
        name = self._name(cmd.args[0])
        items = [(as_astring(i) or "").upper() for i in cmd.args[1].items]
        if any(i not in STATUS_ITEMS for i in items):
            raise bad("Unknown STATUS item")
        assert self.mailbox is not None
        if not await self.store(self.mailbox.exists, name):
            raise no("Mailbox does not exist", "NONEXISTENT")
        status = await self.store(tasks.folder_status, self.mailbox, name)
        self.link.write(_status_line(name, status, tuple(items)))
        return tagged(cmd.tag, "OK", "STATUS completed")

    async def do_APPEND(self, cmd: Command) -> bytes:
        args = list(cmd.args)
        if len(args) < 2 or not isinstance(args[-1], Literal):
            raise bad("Syntax: APPEND mailbox [(flags)] [date-time] literal")
        name = self._name(args[0])
        data = args[-1].value
        flags: list[str] = []
        date: float | None = None
        for extra in args[1:-1]:
            if isinstance(extra, ParenList) and not flags:
                flags = [as_astring(f) or "" for f in extra.items]
                if any(not f for f in flags):
                    raise bad("Invalid flag")
            elif isinstance(extra, Quoted) and date is None:
                try:
                    date = parse_date_time(extra.value)
                except ValueError:
                    raise bad("Invalid date-time") from None
            else:
                raise bad("Syntax: APPEND mailbox [(flags)] [date-time] literal")
        if not data:
            raise no("Empty message")
        if len(data) > self.config.limits.max_message_size:
            raise no("Message too large", "TOOBIG")
        assert self.mailbox is not None
        try:
            validity, uid = await self.store(tasks.append_message, self.mailbox, name, data, flags, date)
        except ValueError as e:
            raise bad(str(e)) from None
        log.info("imap {user} appended {size} octets to {folder} as UID {uid}", user=self.user, size=len(data),
                 folder=name, uid=uid, uidvalidity=validity)
        return tagged(cmd.tag, "OK", "APPEND completed", ["APPENDUID", validity, uid])

    # -- IDLE (RFC 2177) ---------------------------------------------------------------

    def _folder_changed(self) -> None:
        if self._idling:
            self._idle_dirty = True
            if not self._idle_busy:
                Deferred.fromCoroutine(self._idle_push())

    async def _idle_push(self) -> None:
        self._idle_busy = True
        try:
            while self._idle_dirty and self._idling:
                self._idle_dirty = False
                try:
                    updates = await self._sync(expunge_ok=True)
                except Exception:
                    log.failure("imap idle refresh failed for {user}", user=self.user)
                    return
                if updates and self._idling:
                    self.link.write(updates)
            # Inside the folder's trust window after our own changes a change by another
            # program may show only once it ends: look again then (nothing else would wake us).
            folder = self.folder
            wait = folder.trust_left() if folder is not None and self._idling else None
            if wait is not None and self._recheck is None:
                self._recheck = self.clock.callLater(wait + 0.05, self._recheck_fired)
        finally:
            self._idle_busy = False

    def _recheck_fired(self) -> None:
        self._recheck = None
        self._folder_changed()

    async def do_IDLE(self, cmd: Command) -> bytes:
        if cmd.args:
            raise bad("IDLE takes no arguments")
        if self.state is State.SELECTED:
            updates = await self._sync(expunge_ok=True)
            if updates:
                self.link.write(updates)
        self.link.write(continuation("idling"))
        self._idling = True
        self._keepalive = self.clock.callLater(IDLE_KEEPALIVE, self._still_here)
        try:
            if self.state is State.SELECTED:
                # Only an idling session hears of changes (the others see them at their next
                # command's sync): a delivery to an INBOX 10,000 sessions hold selected
                # then calls the few that idle, not all of them.
                assert self.folder is not None
                self._watch = self.link.watch(self.folder.path, self._folder_changed)
                self._folder_changed()  # anything between the sync above and now
            line = await self.link.read_raw_line()
        finally:
            self._idling = False
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            if self._keepalive is not None and self._keepalive.active():
                self._keepalive.cancel()
            self._keepalive = None
            if self._recheck is not None:
                self._recheck.cancel()
                self._recheck = None
        if line is None:
            return b""
        if line.strip().upper() != b"DONE":
            raise bad("Expected DONE")
        return tagged(cmd.tag, "OK", "IDLE terminated")

    def _still_here(self) -> None:
        # NAT boxes forget silent connections; Dovecot says this every 2 minutes too.
        if self._idling:
            self.link.write(b"* OK Still here\r\n")
            self._keepalive = self.clock.callLater(IDLE_KEEPALIVE, self._still_here)

    # -- selected ----------------------------------------------------------------------

    def _need_view(self) -> View:
        assert self.view is not None and self.folder is not None
        return self.view

    def _writable(self) -> View:
        view = self._need_view()
        if view.read_only:
            raise no("Mailbox is read-only", "READ-ONLY")
        return view

    def _select(self, arg: Arg, by_uid: bool) -> list[tuple[int, int]]:
        return pairs_in(self._need_view().uids, self._spans(arg, by_uid))

    def _spans(self, arg: Arg, by_uid: bool) -> list[tuple[int, int]]:
        """`View.spans` of a command's sequence-set argument; BAD if it is not one."""
        if not isinstance(arg, (SequenceSet, Atom)) and not (hasattr(arg, "value") and isinstance(arg.value, int)):
            raise bad("Sequence set expected")
        text = arg.text if hasattr(arg, "text") else str(arg.value)  # type: ignore[union-attr]
        if text == "$":
            raise bad("SEARCHRES is not supported")
        try:
            return self._need_view().spans(SequenceSet(text), by_uid)
        except ValueError as e:
            raise bad(str(e)) from None

    async def do_CHECK(self, cmd: Command) -> bytes:
        return tagged(cmd.tag, "OK", "CHECK completed")

    async def do_CLOSE(self, cmd: Command) -> bytes:
        view, folder = self._need_view(), self.folder
        if not view.read_only:
            uids = [u for u in view.uids if "T" in view.info[u].flags]
            if uids:
                removed = await self.store(folder.expunge, uids)  # type: ignore[union-attr]
                self._log_expunge(removed)
        self._deselect()
        return tagged(cmd.tag, "OK", "CLOSE completed")

    async def do_UNSELECT(self, cmd: Command) -> bytes:
        self._deselect()
        return tagged(cmd.tag, "OK", "UNSELECT completed")

    def _log_expunge(self, removed: Sequence[int]) -> None:
        if removed:
            log.info("imap {user} expunged {count} messages from {folder}", user=self.user, count=len(removed),
                     folder=self.folder_name, uids=list(removed)[:1000])

    async def do_EXPUNGE(self, cmd: Command, uid_set: Arg | None = None) -> bytes:
        view = self._writable()
        await self._sync(expunge_ok=False)  # the freshest flags decide
        wanted = None if uid_set is None else {u for _s, u in self._select(uid_set, True)}
        uids = [u for u in view.uids if "T" in view.info[u].flags and (wanted is None or u in wanted)
                and u not in view.pending]
        removed = await self.store(self.folder.expunge, uids) if uids else []  # type: ignore[union-attr]
        self._log_expunge(removed)
        self.link.write(view.expunged(removed))
        return tagged(cmd.tag, "OK", "EXPUNGE completed")

    async def do_UID_EXPUNGE(self, cmd: Command) -> bytes:
        if len(cmd.args) != 1:
            raise bad("Syntax: UID EXPUNGE uid-set")
        return await self.do_EXPUNGE(cmd, cmd.args[0])

    # FETCH -------------------------------------------------------------------------

    async def do_FETCH(self, cmd: Command, by_uid: bool = False) -> bytes:
        if len(cmd.args) < 2:
            raise bad("Syntax: FETCH sequence-set items")
        view = self._need_view()
        try:
            plan = fetch.parse_items(cmd.args[1:])
        except fetch.FetchError as e:
            raise bad(str(e)) from None
        if by_uid:
            plan = fetch.with_uid(plan)
        spans = self._spans(cmd.args[0], by_uid)
        # The UIDs as of now, while the batches go out: a copy of the part the set covers
        # (not of the whole view: a FETCH of one message in 100,000 stays cheap).
        first = spans[0][0] if spans else 0
        uids = view.uids[first : spans[-1][1]] if spans else []
        spans = [(i - first, j - first) for i, j in spans]
        seen = plan.sets_seen and not view.read_only
        batch = FETCH_BATCH if (plan.needs_file or plan.needs_date or seen) else FLAGS_BATCH
        chunks = _fetch_chunks(spans, uids, view, batch, FETCH_BATCH_OCTETS if plan.needs_file else 0)
        gone = False

        # UID/FLAGS/RFC822.SIZE come from the view: those batches (up to FLAGS_BATCH, ~1 ms
        # each) are made here between writes; a trip to the pool cost more than the work.
        # The last batch still makes its trip, with the refresh that follows the command in
        # it: one trip either way (making it here and the refresh a trip of its own after
        # measured no better, within this VM's drift). A quiet folder needs no refresh after
        # the command: then the last batch too is made here.
        inline = tasks.names_only(plan)
        inline_last = inline and self._quiet()

        def start(k: int) -> Deferred[Any]:
            last = k == len(chunks) - 1
            pairs = pairs_in(uids, chunks[k], first)  # made per batch: the first goes out sooner
            if inline and (not last or inline_last):
                return succeed(tasks.fetch_batch(self.folder, view, pairs, plan, seen, self.cache))
            trip = self.store_then_sync if last else self.store
            return ensureDeferred(trip(tasks.fetch_batch, self.folder, view, pairs, plan, seen, self.cache))

        # The next batch is read while this one is sent: at most two batches in memory.
        ahead = start(0) if chunks else None
        try:
            for k in range(len(chunks)):
                assert ahead is not None
                data, updated, missing = await ahead
                more = k + 1 < len(chunks)
                ahead = start(k + 1) if more and not inline else None
                for info in updated:
                    view.update_info(info)
                gone = gone or missing
                self.link.write(data)
                await self.link.drain()
                if more and inline:
                    await self._turn()  # let the reactor serve others between batches
                    ahead = start(k + 1)  # made after this batch is on its way
        finally:
            if ahead is not None:  # given up half-way (the connection went): let it finish quietly
                ahead.addErrback(lambda _f: None)
        if gone:
            raise no("Some of the requested messages no longer exist", "EXPUNGEISSUED")
        return tagged(cmd.tag, "OK", f"{cmd.name} completed")

    def _turn(self) -> Deferred[None]:
        """Fires on the reactor's next turn: work done in slices lets other connections in."""
        d: Deferred[None] = Deferred()
        self.clock.callLater(0, d.callback, None)
        return d

    async def do_UID_FETCH(self, cmd: Command) -> bytes:
        return await self.do_FETCH(cmd, by_uid=True)

    # STORE -------------------------------------------------------------------------

    async def do_STORE(self, cmd: Command, by_uid: bool = False) -> bytes:
        if len(cmd.args) < 3 or not isinstance(cmd.args[1], Atom):
            raise bad("Syntax: STORE sequence-set [+|-]FLAGS[.SILENT] (flags)")
        view = self._writable()
        item = cmd.args[1].text.upper()
        silent = item.endswith(".SILENT")
        op = item.removesuffix(".SILENT")
        if op not in ("FLAGS", "+FLAGS", "-FLAGS"):
            raise bad("Syntax: STORE sequence-set [+|-]FLAGS[.SILENT] (flags)")
        raw = cmd.args[2].items if len(cmd.args) == 3 and isinstance(cmd.args[2], ParenList) else cmd.args[2:]
        names = [as_astring(a) for a in raw]
        if any(not n or any(c in n for c in '(){ %*"\\]') and not n.startswith("\\") for n in names):
            raise bad("Invalid flag")
        pairs = self._select(cmd.args[0], by_uid)
        try:
            updated, keywords = await self.store_then_sync(tasks.store_flags, self.folder, [u for _s, u in pairs],
                                                           op, names)
        except ValueError as e:
            raise bad(str(e)) from None
        if keywords != view.keywords:
            view.keywords = keywords
            self.link.write(view.flags_response())
        for info in updated:
            view.update_info(info)
        if not silent:
            self.link.write(b"".join(view.fetch_flags(s, u, with_uid=by_uid) for s, u in pairs
                                     if u in view.info))
        return tagged(cmd.tag, "OK", f"{cmd.name} completed")

    async def do_UID_STORE(self, cmd: Command) -> bytes:
        return await self.do_STORE(cmd, by_uid=True)

    # COPY / MOVE -------------------------------------------------------------------

    async def do_COPY(self, cmd: Command, by_uid: bool = False, move: bool = False) -> bytes:
        if len(cmd.args) != 2:
            raise bad(f"Syntax: {cmd.name} sequence-set mailbox")
        view = self._writable() if move else self._need_view()
        pairs = self._select(cmd.args[0], by_uid)
        name = self._name(cmd.args[1])
        assert self.mailbox is not None
        copied, validity, removed = await self.store(tasks.copy_messages, self.mailbox, self.folder,
                                                     [u for _s, u in pairs if u not in view.pending], name, move)
        code = None
        if copied:
            code = ["COPYUID", validity, _uid_set([s for s, _d in copied]), _uid_set([d for _s, d in copied])]
        if move:
            if code is not None:
                self.link.write(untagged_status("OK", "Moved UIDs.", code))
            self.link.write(view.expunged(removed))
            self._log_expunge(removed)
            return tagged(cmd.tag, "OK", f"{cmd.name} completed")
        return tagged(cmd.tag, "OK", f"{cmd.name} completed", code)

    async def do_UID_COPY(self, cmd: Command) -> bytes:
        return await self.do_COPY(cmd, by_uid=True)

    async def do_MOVE(self, cmd: Command) -> bytes:
        return await self.do_COPY(cmd, move=True)

    async def do_UID_MOVE(self, cmd: Command) -> bytes:
        return await self.do_COPY(cmd, by_uid=True, move=True)

    # SEARCH ------------------------------------------------------------------------

    async def do_SEARCH(self, cmd: Command, by_uid: bool = False) -> bytes:
        view = self._need_view()
        try:
            query = search.parse_search(cmd.args)
        except search.BadCharset:
            raise no("Unsupported charset", ["BADCHARSET", ["UTF-8", "US-ASCII"]]) from None
        except search.SearchError as e:
            raise bad(str(e)) from None
        if tasks.flags_decide(query) and self._quiet() and (view.groups_ready or len(view) <= FLAG_SEARCH_HERE):
            # Nothing changed since the last refresh (inotify says so; see `_quiet`) and the
            # view's flags decide: answered here, without a trip to the disk thread (the trip
            # was most of a SEARCH UNSEEN's time). A big view's first pass over its messages
            # still goes to the thread.
            hits = tasks.search_flags(view, query)
        else:
            hits = await self.store_then_sync(tasks.run_search, self.folder, view, query)
        numbers = [u if by_uid else s for s, u in hits]
        self.link.write(b"* SEARCH " + " ".join(map(str, numbers)).encode() + b"\r\n" if numbers else b"* SEARCH\r\n")
        return tagged(cmd.tag, "OK", f"{cmd.name} completed")

    async def do_UID_SEARCH(self, cmd: Command) -> bytes:
        return await self.do_SEARCH(cmd, by_uid=True)


IDLE_KEEPALIVE = 120.0
QUIET_TRUST = 2.0  # seconds a refresh stands while inotify reports the folder unchanged
FLAG_SEARCH_HERE = 20_000  # a flag SEARCH on a quiet folder this small runs on the reactor (~1 ms)


def _fetch_chunks(spans: list[tuple[int, int]], uids: list[int], view: View, count: int,
                  octets: int) -> list[list[tuple[int, int]]]:
    """FETCH's index ranges (`View.spans`) cut into trips of at most `count` messages and,
    when `octets`, at most that many octets of messages (sizes from the view: no file is
    opened). Each trip is a list of index ranges [i, j) into `uids`; the pairs are made
    per trip (`pairs_in`)."""
    chunks: list[list[tuple[int, int]]] = []
    trip: list[tuple[int, int]] = []
    have = total = 0  # messages and octets in `trip`
    info_of = view.info
    for i, j in spans:
        while i < j:
            if have >= count:
                chunks.append(trip)
                trip, have, total = [], 0, 0
            if not octets:
                k = min(j, i + count - have)
            else:
                k = i
                while k < j:
                    info = info_of.get(uids[k])
                    size = info.size if info is not None else 0
                    if have + (k - i) > 0 and total + size > octets:
                        break
                    total += size
                    k += 1
                if k == i:  # this message would go over: the next trip starts with it
                    chunks.append(trip)
                    trip, have, total = [], 0, 0
                    continue
                k = min(k, i + count - have)
            trip.append((i, k))
            have += k - i
            i = k
    if trip:
        chunks.append(trip)
    return chunks


def _status_line(name: str, status: dict[str, int], items: Sequence[str]) -> bytes:
    values = " ".join(f"{i} {status[i]}" for i in items)
    return b"* STATUS %s (%s)\r\n" % (astring(wire_name(name)), values.encode())


def _list_request(args: Sequence[Arg], lsub: bool) -> ListRequest:
    """LIST [(selection)] reference (pattern | (patterns)) [RETURN (options)] (RFC 5258)."""
    args = list(args)
    selection: list[str] = []
    extended = False
    if not lsub and args and isinstance(args[0], ParenList):
        selection = [(as_astring(a) or "").upper() for a in args.pop(0).items]
        extended = True
    if len(args) < 2:
        raise bad("Syntax: LIST reference pattern")
    ref_text = as_astring(args[0])
    if ref_text is None:
        raise bad("Syntax: LIST reference pattern")
    pat_arg = args[1]
    if isinstance(pat_arg, ParenList) and not lsub:
        raw = [as_astring(p) for p in pat_arg.items]
        extended = True
    else:
        raw = [as_astring(pat_arg)]
    if any(p is None for p in raw):
        raise bad("Syntax: LIST reference pattern")
    returns: list[Arg] = []
    if len(args) > 2:
        if lsub or len(args) != 4 or (as_astring(args[2]) or "").upper() != "RETURN" or not isinstance(args[3], ParenList):
            raise bad("Syntax: LIST reference pattern [RETURN (options)]")
        returns = list(args[3].items)
        extended = True
    status: tuple[str, ...] = ()
    ret_names: set[str] = set()
    i = 0
    while i < len(returns):
        opt = (as_astring(returns[i]) or "").upper()
        if opt == "STATUS" and i + 1 < len(returns) and isinstance(returns[i + 1], ParenList):
            status = tuple((as_astring(s) or "").upper() for s in returns[i + 1].items)  # type: ignore[union-attr]
            if any(s not in STATUS_ITEMS for s in status):
                raise bad("Unknown STATUS item")
            i += 2
            continue
        ret_names.add(opt)
        i += 1
    for opt in selection:
        if opt not in ("SUBSCRIBED", "REMOTE", "RECURSIVEMATCH", "SPECIAL-USE"):
            raise bad(f"Unknown LIST selection option {opt}")
    if "RECURSIVEMATCH" in selection and len(selection) == 1:
        raise bad("RECURSIVEMATCH needs another selection option")
    try:
        reference = wire_to_name(ref_text) if ref_text else ""
        patterns = tuple(wire_to_name(p) if p and p.upper() != "INBOX" else (p or "") for p in raw)  # type: ignore[misc]
    except ValueError:
        raise no("Invalid mailbox name (modified UTF-7 expected)") from None
    return ListRequest(
        reference, patterns, subscribed_only=lsub or "SUBSCRIBED" in selection,
        recursive="RECURSIVEMATCH" in selection, special_only="SPECIAL-USE" in selection,
        extended=extended, return_subscribed="SUBSCRIBED" in ret_names,
        return_children=True, return_special=True, status=status, lsub=lsub,
    )


