"""The `mx` command: operators' administration of a mail server's files.

`mx [--config PATH] check | user add|passwd|del ADDRESS | user list` (INTERFACE.md).

Invariants:
- Every command exits 0 on success, or non-zero with exactly one line `mx: ...` on stderr.
- The config comes from `--config`, else `etc/mx.toml` in the current folder, else the
  built-in defaults: the same rule `twistd -n mx` follows, so both see the same files.
- Commands work on files only (no talking to the server); a running server notices a
  changed users file by itself. Changes to the users file are serialised by an flock on
  `<users_file>.lock`, so two concurrent `mx user ...` never lose each other's update.
"""

from __future__ import annotations

import argparse
import fcntl
import getpass
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Sequence

from mx.address import AddressError, parse_address
from mx.config import Config, ConfigError, default_path, describe, load
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
    for name, handler, text in (
        ("add", cmd_user_add, "create a user; password from a prompt or one line on stdin"),
        ("passwd", cmd_user_passwd, "set a user's password; from a prompt or one line on stdin"),
        ("del", cmd_user_del, "delete a user (the Maildir stays)"),
    ):
        action = user_commands.add_parser(name, help=text)
        action.add_argument("address", metavar="ADDRESS")
        action.set_defaults(handler=handler)
    user_commands.add_parser("list", help="list users, one address a line").set_defaults(
        handler=cmd_user_list)

    # `mx queue list|show|delete|flush` registers here (its own issue): a "queue" parser
    # whose actions set `handler` like the ones above; main() needs no change.
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler: Callable[[Config, argparse.Namespace], None] = args.handler
    try:
        path = args.config if args.config is not None else default_path()
        handler(load(path), args)
    except (CommandError, ConfigError, UsersError) as e:
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


if __name__ == "__main__":
    sys.exit(main())
