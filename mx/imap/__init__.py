"""IMAP4rev1 and the extensions today's clients rely on, as mx's own sans-IO core.

Not a subclass of Twisted's `IMAP4Server` (DESIGN.md, issue 9: it runs commands pipelined
before STARTTLS, lacks LITERAL+, reads APPEND literals unbounded and turns the reactor once
per message part). The package, per DESIGN.md's `imap/` row:

- `parse`: the sans-IO command reader: RFC 3501 §9 grammar, literals (RFC 7888 LITERAL+ and
  LITERAL-), and the bounds on line length, arguments, nesting and literal size.
- `respond`: responses serialised in bulk (atom / quoted / literal chosen per string).
- `fetch`, `search`: FETCH data items and SEARCH keys over the store and `mx.mime` (to come).
- `session`: states, the one table of commands per state, the selected-folder view (to come).
- `server`: the thin Twisted protocol: TLS, IDLE wired to change events (to come).

Layer rule (tests/test_layers.py): `parse` and `respond` are pure (no Twisted, no I/O).
Modified UTF-7 mailbox names live in `mx.store.utf7`, not here.
"""
