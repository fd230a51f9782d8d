"""IMAP4rev1 and the extensions today's clients rely on, as mx's own sans-IO core.

Not a subclass of Twisted's `IMAP4Server` (DESIGN.md, issue 9: it runs commands pipelined
before STARTTLS, lacks LITERAL+, reads APPEND literals unbounded and turns the reactor once
per message part). The package, per DESIGN.md's `imap/` row:

- `parse`: the sans-IO command reader: RFC 3501 §9 grammar, literals (RFC 7888 LITERAL+ and
  LITERAL-), and the bounds on line length, arguments, nesting and literal size.
- `respond`: responses serialised in bulk (atom / quoted / literal chosen per string).
- `fetch`: FETCH items: ENVELOPE, BODY/BODYSTRUCTURE, sections and partials, from `mx.mime`.
- `search`: SEARCH keys compiled once, matched per message (decoded words, encodings).
- `selected`: the selected folder's numbering, flags and \\Recent; what changed, as responses.
- `listing`: LIST / LSUB patterns and attributes (CHILDREN, SPECIAL-USE, LIST-EXTENDED).
- `tasks`: the store work of each command, run in the read pool.
- `session`: states, the one table of commands per state, every command.
- `server`: the thin Twisted protocol: TLS, raw lines (AUTHENTICATE, IDLE), back-pressure.

Layer rule (tests/test_layers.py): everything but `session` and `server` is free of Twisted;
`parse`, `respond`, `fetch`, `search`, `selected` and `listing` do no I/O either.
Modified UTF-7 mailbox names live in `mx.store.utf7`, not here.
"""
