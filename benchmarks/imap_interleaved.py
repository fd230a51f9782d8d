#!/usr/bin/env python3
"""IMAP warm figures with mx and Dovecot interleaved: one command to one server, then the
same command to the other, N times; medians side by side.

`imap.py` runs the two servers one after the other; on a shared VM whose speed drifts by 2x
within minutes (steal), the server that ran in the slow minutes loses. Here both servers run
at once, each with one logged-in session on its own copy of the same folder (generated and
numbered as `imap.py` does), and the order alternates every round, so drift hits both alike.
Cold figures (a first SELECT, a first ENVELOPE) cannot be repeated and stay in `imap.py`.

    python3 benchmarks/imap_interleaved.py                    # 10,000 messages, 15 rounds
    python3 benchmarks/imap_interleaved.py --messages 100000 --rounds 7

Figures: `SELECT INBOX` again on the open session (a re-SELECT of a calm folder), `UID FETCH
1:* (FLAGS)`, `FETCH 1:* (ENVELOPE)` (after one untimed warm-up), `SEARCH UNSEEN`, `SEARCH TEXT
"quixotry"`, `FETCH 1:* BODY.PEEK[]`, `STORE 1:1000 +FLAGS (\\Flagged)` (each followed by an
untimed `-FLAGS` on that server), `NOOP`. Each response is checked as in imap.py (counts of
FETCH responses and SEARCH hits). Server CPU per command is from /proc, as in imap.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import imap as B  # noqa: E402  (the generator, the servers and the client are imap.py's)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    n = a.messages
    exp = B.expected(n)
    m = min(B.STORE_N, n)
    figures = [
        ("SELECT INBOX (again)", b"SELECT INBOX", None),
        ("UID FETCH 1:* (FLAGS)", b"UID FETCH 1:* (FLAGS)", ("fetches", n)),
        ("FETCH 1:* (ENVELOPE) warm", b"FETCH 1:* (ENVELOPE)", ("fetches", n)),
        ("SEARCH UNSEEN", b"SEARCH UNSEEN", ("search", exp["unseen"])),
        ('SEARCH TEXT "%s"' % B.WORD, b'SEARCH TEXT "' + B.WORD.encode() + b'"', ("search", exp["word"])),
        ("FETCH 1:* BODY.PEEK[]", b"FETCH 1:* BODY.PEEK[]", ("fetches", n)),
        ("STORE 1:%d +FLAGS (\\Flagged)" % m, b"STORE 1:%d +FLAGS (\\Flagged)" % m, ("fetches", m)),
        ("NOOP", b"NOOP", None),
    ]
    tmp = tempfile.mkdtemp(prefix="imap_ab_")
    os.chmod(tmp, 0o755)
    servers = []
    try:
        from mx.users import hash_password, write_users
        write_users(Path(tmp) / "users", {B.USER: hash_password(B.PASSWORD)})
        first = os.path.join(tmp, "mx", "data", "mail", "example.test", "bench")
        B.generate(first, n)
        B.assign_uids(first)
        shutil.copytree(first, os.path.join(tmp, "dovecot", "mail", "example.test", "bench"))
        time.sleep(2.5)  # both copies calm (mtimes over two seconds old), as imap.py's are by then
        for cls in (B.MxServer, B.DovecotServer):
            srv = cls(tmp)
            srv.start(a.timeout)
            servers.append(srv)
        clients = {}
        for srv in servers:
            c = B.Client(srv.port, a.timeout)
            c.login()
            c.command(b"SELECT INBOX")
            c.command(b"FETCH 1:* (ENVELOPE)")  # the warm-up (mx fills its structure cache)
            clients[srv.name] = c
        print("%d messages of %d bytes, %s, %d rounds, load average %s" % (
            n, B.SIZE, time.strftime("%Y-%m-%d %H:%M"), a.rounds, " ".join("%.2f" % x for x in os.getloadavg())))
        print("%-34s %9s %9s %7s %9s %9s %7s" % ("figure", "mx ms", "dc ms", "mx/dc", "mx cpu", "dc cpu", "cpu"))
        print("-" * 90)
        for label, text, check in figures:
            walls = {s.name: [] for s in servers}
            cpus = {s.name: [] for s in servers}
            for i in range(a.rounds):
                for srv in (servers if i % 2 == 0 else servers[::-1]):
                    c = clients[srv.name]
                    cpu0, t0 = srv.cpu(), time.perf_counter()
                    r = c.command(text)
                    walls[srv.name].append(time.perf_counter() - t0)
                    cpus[srv.name].append(srv.cpu() - cpu0)
                    if text.startswith(b"STORE"):  # reset, untimed (as imap.py does)
                        c.command(b"STORE 1:%d -FLAGS (\\Flagged)" % m)
                    if check is not None:
                        got = r.fetches if check[0] == "fetches" else B.search_count(r)
                        if got != check[1]:
                            raise SystemExit("%s: %s %s %d, expected %d" % (srv.name, label, check[0], got, check[1]))
            w = {k: statistics.median(v) * 1e3 for k, v in walls.items()}
            cp = {k: statistics.mean(v) * 1e3 for k, v in cpus.items()}
            print("%-34s %9.2f %9.2f %7.2f %9.2f %9.2f %7s" % (
                label, w["mx"], w["dovecot"], w["mx"] / w["dovecot"], cp["mx"], cp["dovecot"],
                "%.2f" % (cp["mx"] / cp["dovecot"]) if cp["dovecot"] > 0 else "-"), flush=True)
        print("median wall ms of %d rounds, order alternating; cpu = mean server CPU ms per command (/proc "
              "ticks: 10 ms granularity, so small figures read 0); mx/dc < 1: mx faster" % a.rounds)
        return 0
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
