"""The mailbox store: Maildir++ folders that Dovecot can read and write alongside mx.

No Twisted here: blocking file I/O, called by the protocols from the store thread pool.
Modules: `folder` (one folder's view: UIDs, flags, sizes, changes; IMAP's APPEND, COPY,
INTERNALDATE and \\Recent), `write` (the files APPEND and COPY put into cur/), `uidlist`
(`dovecot-uidlist` v3), `dotlock` (Dovecot's NFS-safe dot-lock), `flags` (letters in names,
`dovecot-keywords`), `mailbox` (a user's folders: create, delete, rename, special use,
subscriptions), `utf7` (folder names on disk). Delivery into `new/` stays in `mx.maildir`.

Invariants kept across the package:
- The store writes only Dovecot's own files inside a Maildir (`dovecot-uidlist`, its
  `.lock`, `dovecot-keywords`, `subscriptions`, `maildirfolder`), in Dovecot's formats;
  nothing mx needs lives only in memory or only in an mx file. (One exception, outside the
  store: `mx.pop3server`'s session lock `mx-pop3.lock`, an empty flock file Dovecot ignores,
  kept in the Maildir so the lock holds for every host sharing the mail.)
- No message body is read except through `Folder.open_message`.
"""

from mx.store.errors import LockTimeout, MessageGone, StoreError
from mx.store.flags import Keywords
from mx.store.folder import Changes, Folder, MessageInfo, clean_tmp
from mx.store.mailbox import SPECIAL_USE, Mailbox, sweep_tmp

__all__ = [
    "StoreError",
    "MessageGone",
    "LockTimeout",
    "MessageInfo",
    "Changes",
    "Folder",
    "Mailbox",
    "SPECIAL_USE",
    "Keywords",
    "clean_tmp",
    "sweep_tmp",
]
