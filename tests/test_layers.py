"""DESIGN.md's layering rule: the wire, config and storage modules never import Twisted.

Each module is imported in a fresh interpreter, so nothing else has pulled Twisted in first.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
PURE = ["address", "smtp", "dsn", "config", "durable", "spool", "maildir", "users", "control", "pop3", "mime"]
PURE += ["imap", "imap.parse", "imap.respond", "imap.selected", "imap.listing", "imap.tasks", "mailauth.dmarc", "mailauth.results", "mailauth.spf", "mailauth.lookup", "mailauth.check", "imap.search", "imap.fetch"]  # the IMAP package's sans-IO core
# The store package: every module of it, so a new one cannot slip past the rule.
PURE += ["store"] + sorted(f"store.{p.stem}" for p in (ROOT / "mx" / "store").glob("*.py") if p.stem != "__init__")


class LayerTests(SynchronousTestCase):
    def test_pure_modules_do_not_import_twisted(self) -> None:
        for name in PURE:
            code = f"import sys, mx.{name}; print(any(m == 'twisted' or m.startswith('twisted.') for m in sys.modules))"
            out = subprocess.run(
                [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            self.assertEqual(out.stdout.strip(), "False", f"mx.{name} imports Twisted")
