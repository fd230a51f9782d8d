"""Where each recipient goes: a local mailbox, a remote address, or a refusal.

Invariants:
- Local domains never relay: a local address is a known user (case-insensitive, `+tag`
  dropped), an alias expanding to users or remote addresses, or `550 5.1.1` at RCPT time.
- A remote domain is accepted only when the client may relay (authenticated), else
  `554 5.7.1`; alias targets outside our domains are always allowed (the operator chose them).
- Alias expansion is bounded (depth and fan-out) so a loop in the config cannot hang us.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mx.address import Address, AddressError, parse_address
from mx.config import Config
from mx.smtp import Reply

__all__ = ["LocalRecipient", "RemoteRecipient", "Destination", "Router"]

MAX_ALIAS_DEPTH = 8
MAX_EXPANSION = 1000


@dataclass(frozen=True, slots=True)
class LocalRecipient:
    """A user's mailbox: `local@domain` as stored in the users file (canonical)."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"


@dataclass(frozen=True, slots=True)
class RemoteRecipient:
    address: Address

    def __str__(self) -> str:
        return str(self.address)


Destination = LocalRecipient | RemoteRecipient


class Router:
    """Resolves recipients against the config's local domains and aliases and the users."""

    def __init__(self, config: Config, user_exists: Callable[[str], bool]) -> None:
        self._config = config
        self._user_exists = user_exists
        # user -> the alias addresses that deliver to it (submission senders it may use)
        self._owned: dict[str, set[str]] = {}
        for alias, targets in config.aliases.items():
            for target in targets:
                self._owned.setdefault(target, set()).add(alias)

    def may_send_as(self, user: str, sender: Address) -> bool:
        """Submission policy: a user sends as itself (any +tag, any case) or as an alias
        pointing to it."""
        return sender.key == user or sender.canonical in self._owned.get(user, ()) or (
            sender.key in self._owned.get(user, ())
        )

    def is_local(self, address: Address) -> bool:
        return self._config.is_local_domain(address.domain)

    def resolve(self, rcpt: Address, *, may_relay: bool) -> tuple[Destination, ...]:
        """The destinations of one RCPT, de-duplicated; raises `Reply` to refuse it."""
        if not self.is_local(rcpt):
            if may_relay:
                return (RemoteRecipient(rcpt),)
            raise Reply(554, "5.7.1", f"Relay access denied for <{rcpt}>")
        found: dict[str, Destination] = {}
        self._expand(rcpt, found, depth=0)
        if not found:
            raise Reply(550, "5.1.1", f"No such user <{rcpt}>")
        return tuple(found.values())

    def _expand(self, rcpt: Address, found: dict[str, Destination], depth: int) -> None:
        if depth > MAX_ALIAS_DEPTH or len(found) > MAX_EXPANSION:
            raise Reply(554, "5.4.6", f"Alias loop or expansion too large for <{rcpt}>")
        if not self.is_local(rcpt):
            found.setdefault(rcpt.canonical, RemoteRecipient(rcpt))
            return
        aliases = self._config.aliases
        targets = aliases.get(rcpt.canonical) or aliases.get(rcpt.key)
        if targets is not None:
            for target in targets:
                try:
                    address = parse_address(target)
                except AddressError:
                    continue  # config validation already refuses these; never crash here
                self._expand(address, found, depth + 1)
            return
        key = rcpt.key
        if self._user_exists(key):
            local, _, domain = key.rpartition("@")
            found.setdefault(key, LocalRecipient(local, domain))
            return
        if depth > 0:
            # An alias pointing at a local address that does not exist: a config mistake the
            # sender cannot fix, so refuse temporarily and let the operator see it.
            raise Reply(451, "4.3.0", f"Alias target <{rcpt}> has no mailbox")
