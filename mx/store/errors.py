"""The store's exceptions: every failure a protocol turns into a reply.

Invariants:
- `str()` of every error is one line naming the file or folder involved, safe to log.
- `MessageGone` is a `StoreError`: a caller that handles only `StoreError` still answers.
"""

from __future__ import annotations

__all__ = ["StoreError", "MessageGone", "LockTimeout"]


class StoreError(Exception):
    """A folder or state file that cannot be used (missing, unreadable, bad name)."""


class MessageGone(StoreError):
    """The message file vanished: another session expunged it after we listed it."""


class LockTimeout(StoreError):
    """A dot-lock held by someone else (and not stale) for longer than we wait."""
