"""The `mx` command: operators' administration of a mail server's files.

`mx [--config PATH] check | user add|passwd|del ADDRESS | user list |
queue list [--json] | queue show|delete ID | queue flush` (INTERFACE.md).

Invariants:
- Every command exits 0 on success, or non-zero with exactly one line `mx: ...` on stderr.
- The config comes from `--config`, else `etc/mx.toml` in the current folder, else the
  built-in defaults: the same rule `twistd -n mx` follows, so both see the same files.
- Commands work on files; a running server notices a changed users file by itself. The
  queue commands that change state go through the server when it runs (mx.control), so
  the server's view and the files never disagree. Changes to the users file are serialised by an flock on
  `<users_file>.lock`, so two concurrent `mx user ...` never lose each other's update.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence

from mx.address import AddressError, parse_address
from mx.config import Config, ConfigError, default_path, describe, load
from mx.control import server_running, write_request
from mx.durable import unlink_quietly
from mx.spool import PENDING, QueueEntry, Spool, SpoolError, check_id
from mx.users import UsersError, hash_password, normalise_user, read_users, write_users

__all__ = ["main"]


class CommandError(Exception):
    """A command failed; `str()` is the one line for stderr."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line too (its default prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"mx: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mx", description="Administer an mx mail server.")
    parser.add_argument("--config", metavar="PATH", type=Path,
                        help="config file (default: etc/mx.toml if present, else built-in defaults)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="validate the config and print the effective settings")
    check.set_defaults(handler=cmd_check)

    user = commands.add_parser("user", help="manage users (add, passwd, del, list)")
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    _actions(user_commands, "address", "ADDRESS", (
        ("add", cmd_user_add, "create a user; password from a prompt or one line on stdin"),
        ("passwd", cmd_user_passwd, "set a user's password; from a prompt or one line on stdin"),
        ("del", cmd_user_del, "delete a user (the Maildir stays)"),
    ))
    user_commands.add_parser("list", help="list users, one address a line").set_defaults(
        handler=cmd_user_list)

    queue = commands.add_parser("queue", help="inspect and manage the relay queue")
    queue_commands = queue.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    listing = queue_commands.add_parser("list", help="one row per queued message")
    listing.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    listing.set_defaults(handler=cmd_queue_list)
    _actions(queue_commands, "id", "ID", (
        ("show", cmd_queue_show, "a queued message's envelope, state and headers"),
        ("delete", cmd_queue_delete, "remove a message from the queue (no bounce is sent)"),
    ))
    queue_commands.add_parser("flush", help="the running server retries every queued message now").set_defaults(
        handler=cmd_queue_flush)

    dkim = commands.add_parser("dkim", help="DKIM signing keys")
    dkim_commands = dkim.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)
    keygen = dkim_commands.add_parser("keygen", help="make a key under <data_dir>/dkim/DOMAIN/ and print its DNS record")
    keygen.add_argument("domain", metavar="DOMAIN")
    keygen.add_argument("--selector", metavar="S", help="the selector (default: mx<yyyymm><e|r>)")
    keygen.add_argument("--algorithm", choices=("ed25519", "rsa"), default="ed25519")
    keygen.set_defaults(handler=cmd_dkim_keygen)

    records = commands.add_parser("dns-records", help="print every DNS record to publish for DOMAIN")
    records.add_argument("domain", metavar="DOMAIN")
    records.set_defaults(handler=cmd_dns_records)
    return parser


def _actions(commands: argparse._SubParsersAction, dest: str, metavar: str,
             items: Sequence[tuple[str, Callable[[Config, argparse.Namespace], None], str]]) -> None:
    """Sub-commands that take one positional argument."""
    for name, handler, text in items:
        action = commands.add_parser(name, help=text)
        action.add_argument(dest, metavar=metavar)
        action.set_defaults(handler=handler)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Callable[[Config, argparse.Namespace], None] = args.handler
    try:
        path = args.config if args.config is not None else default_path()
        handler(load(path), args)
    except (CommandError, ConfigError, UsersError, SpoolError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    return 0


def _fail(message: str, status: int = 1) -> int:
    print(f"mx: {' '.join(message.split())}", file=sys.stderr)  # one line, whatever it says
    return status


# --- commands ----------------------------------------------------------------------------


def cmd_check(config: Config, args: argparse.Namespace) -> None:
    # What the server reads at start-up besides the config: the smarthost password file.
    from mx.smtpclient import smarthost_auth

    smarthost_auth(config.relay)  # ConfigError (one line) if missing, unreadable or too open
    sys.stdout.write(describe(config))


def cmd_user_add(config: Config, args: argparse.Namespace) -> None:
    address = normalise_user(args.address, config.local_domains)
    if address in read_users(config.auth.users_file):  # fail before asking for a password
        raise CommandError(f"user {address} already exists")
    stored = hash_password(_read_password())
    config.data_dir.mkdir(parents=True, exist_ok=True)
    config.auth.users_file.parent.mkdir(parents=True, exist_ok=True)
    with _locked(config.auth.users_file):
        users = read_users(config.auth.users_file)
        if address in users:
            raise CommandError(f"user {address} already exists")
        users[address] = stored
        write_users(config.auth.users_file, users)
    print(f"added {address}")


def cmd_user_passwd(config: Config, args: argparse.Namespace) -> None:
    address = _existing_user(config, args.address)
    stored = hash_password(_read_password())
    with _locked(config.auth.users_file):
        users = read_users(config.auth.users_file)
        if address not in users:
            raise CommandError(f"no such user: {address}")
        users[address] = stored
        write_users(config.auth.users_file, users)
    print(f"changed the password of {address}")


def cmd_user_del(config: Config, args: argparse.Namespace) -> None:
    address = _existing_user(config, args.address)
    with _locked(config.auth.users_file):
        users = read_users(config.auth.users_file)
        if users.pop(address, None) is None:
            raise CommandError(f"no such user: {address}")
        write_users(config.auth.users_file, users)
    print(f"deleted {address}")


def cmd_user_list(config: Config, args: argparse.Namespace) -> None:
    for address in sorted(read_users(config.auth.users_file)):
        print(address)


def _spool(config: Config) -> Spool:
    return Spool(config.data_dir / "queue")


def _entries(config: Config) -> list[QueueEntry]:
    """Every readable record, read-only (safe while the server runs: records are replaced
    atomically)."""
    spool = _spool(config)
    try:
        names = sorted(n for n in os.listdir(spool.root) if n.endswith(".json") and not n.startswith("."))
    except FileNotFoundError:
        return []
    entries = []
    for name in names:
        try:
            entry = spool.load(name[:-5])
        except (SpoolError, OSError) as e:
            # One broken record must not hide the rest of the queue.
            print(f"mx: skipped queue record {name}: {e}", file=sys.stderr)
            continue
        if entry is not None and entry.pending:
            entries.append(entry)
    return sorted(entries, key=lambda e: e.arrival)


def _row(entry: QueueEntry, now: float) -> dict[str, object]:
    pending = entry.pending
    last = next((r for r in reversed(pending) if r.last_error), None)
    return {
        "id": entry.id,
        "age": round(now - entry.arrival),
        "sender": entry.sender,
        "recipients": [r.address for r in pending],
        "attempts": max((r.attempts for r in pending), default=0),
        "next_attempt": min((r.next_attempt for r in pending), default=0.0),
        "last_error": last.last_error if last else None,
        "size": entry.size,
        "kind": entry.kind,
    }


def cmd_queue_list(config: Config, args: argparse.Namespace) -> None:
    now = time.time()
    rows = [_row(e, now) for e in _entries(config)]
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if not rows:
        print("queue is empty")
        return
    print(f"{'ID':<22} {'AGE':>7} {'SENDER':<28} {'TRIES':>5} {'NEXT':>7}  RECIPIENTS / LAST ERROR")
    for r in rows:
        nxt = max(0, round(float(r["next_attempt"]) - now))  # type: ignore[arg-type]
        print(
            f"{r['id']:<22} {_age(int(r['age'])):>7} {'<' + str(r['sender']) + '>':<28} "  # type: ignore[arg-type]
            f"{r['attempts']:>5} {_age(nxt):>7}  {', '.join(r['recipients'])}"  # type: ignore[arg-type]
        )
        if r["last_error"]:
            print(f"{'':<22} {'':>7} {'':<28} {'':>5} {'':>7}  {r['last_error']}")


def _age(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _queue_id(config: Config, text: str) -> str:
    try:
        check_id(text)
    except SpoolError as e:
        raise CommandError(str(e)) from None
    if _spool(config).load(text) is None:
        raise CommandError(f"no such queued message: {text}")
    return text


def cmd_queue_show(config: Config, args: argparse.Namespace) -> None:
    entry = _spool(config).load(_queue_id(config, args.id))
    assert entry is not None
    print(f"id: {entry.id}\nkind: {entry.kind}\nsender: <{entry.sender}>\nsize: {entry.size}")
    print(f"arrival: {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(entry.arrival))}")
    print(f"delay warning sent: {'yes' if entry.delay_warned else 'no'}")
    for r in entry.recipients:
        nxt = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.next_attempt)) if r.status == PENDING else "-"
        print(f"recipient: <{r.address}> {r.status}, {r.attempts} attempts, next {nxt}")
        if r.last_error:
            print(f"  last: {r.last_error}")
    print()
    try:
        with open(_spool(config).body_path(entry.id), "rb") as f:
            head = f.read(64 * 1024).split(b"\r\n\r\n", 1)[0]
        sys.stdout.write(head.decode("utf-8", "replace").replace("\r\n", "\n") + "\n")
    except OSError:
        print("(message file missing)")


def _ask_server(config: Config, action: str, arg: str = "") -> bool:
    """Hand a request to the running server; True once it has done it (within 5 s)."""
    request = write_request(config.data_dir / "queue", action, arg)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        if not request.exists():
            return True
        time.sleep(0.05)
    unlink_quietly(request)
    return False


def cmd_queue_delete(config: Config, args: argparse.Namespace) -> None:
    queue_id = _queue_id(config, args.id)
    queue_root = config.data_dir / "queue"
    if server_running(queue_root):
        if not _ask_server(config, "delete", queue_id):
            raise CommandError("the running server did not answer within 5 seconds")
    else:
        _spool(config).remove(queue_id)
    print(f"deleted {queue_id}")


def cmd_queue_flush(config: Config, args: argparse.Namespace) -> None:
    queue_root = config.data_dir / "queue"
    if server_running(queue_root):
        if not _ask_server(config, "flush"):
            raise CommandError("the running server did not answer within 5 seconds")
        print("flushing: the server is retrying every queued message")
        return
    spool = _spool(config)
    for entry in _entries(config):
        spool.save(entry.with_recipients(r._replace(next_attempt=0.0) for r in entry.recipients))
    print("no server is running: every queued message will be tried as soon as it starts")


# --- helpers -----------------------------------------------------------------------------


def _existing_user(config: Config, text: str) -> str:
    """The canonical address of an existing user. Not `normalise_user`: a user whose
    domain has since left `local_domains` must still be removable."""
    try:
        address = parse_address(text).canonical
    except AddressError as e:
        raise CommandError(f"{text!r} is not a valid address: {e}") from None
    if address not in read_users(config.auth.users_file):
        raise CommandError(f"no such user: {address}")
    return address


def _read_password() -> str:
    """Twice from a prompt on a terminal; otherwise one line from stdin (for scripts)."""
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            password = getpass.getpass("Password: ")
            if password != getpass.getpass("Password again: "):
                raise CommandError("the passwords do not match")
        except EOFError:
            raise CommandError("no password given") from None
    else:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    if not password:
        raise CommandError("empty password refused")
    return password


@contextmanager
def _locked(users_file: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of the users file."""
    fd = os.open(f"{users_file}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cmd_dkim_keygen(config: Config, args: argparse.Namespace) -> None:
    from mx.mailauth.keys import dns_record, generate

    domain = args.domain.rstrip(".").lower()
    if not domain or "/" in domain or domain.startswith("."):
        raise CommandError(f"not a domain: {args.domain!r}")
    selector = args.selector or time.strftime("mx%Y%m") + ("e" if args.algorithm == "ed25519" else "r")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*",
                        selector):
        raise CommandError(f"not a selector (letters, digits, hyphens, dots): {selector!r}")
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # a fresh install has none yet
    try:
        path = generate(config.data_dir, domain, selector, args.algorithm)
    except FileExistsError:
        raise CommandError(f"{config.data_dir / 'dkim' / domain / (selector + '.key')}: exists already") from None
    print(dns_record(path, selector, domain))
    print(f"# key written to {path}; a running server signs with it within seconds (at once on SIGHUP)",
          file=sys.stderr)


def cmd_dns_records(config: Config, args: argparse.Namespace) -> None:
    from mx.mailauth.records import dns_records

    for line in dns_records(config, args.domain):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
