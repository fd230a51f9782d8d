#!/usr/bin/env python3
"""IMAP benchmark: mx against Dovecot's imap on identical copies of one big folder, side by side.

The folder: INBOX with N messages of exactly 4,096 bytes (CRLF lines, varied From/To/Cc/Subject/
Date/Message-ID/In-Reply-To headers), generated straight into `cur/` with mx's own file names
(`<time>.M..P..Q..R...<host>,S=4096,W=4096:2,<flags>`, as mx's delivery names them, `,W=`
the CRLF size): nine in ten are `\\Seen`, one in ten unseen, and one in a hundred carries the planted
word WORD in its body. The `dovecot-uidlist` is then written by mx's store (`mx.store.Folder.open`
in this process, before either server runs), and the tree is copied: each server gets its own
copy (Dovecot's index files, mx's files under its data_dir and the STORE renames never meet), and
both start from the same UIDs and the same UIDVALIDITY, with no index or cache of any kind.

Figures, per server, in this order (one server start; "cold" = the first time after that start,
which is also the first time ever on that copy; page caches are not dropped, so it is cold for
the server, not for the kernel):

  LOGIN+SELECT cold        connect, greeting, LOGIN, SELECT INBOX (mx: list the folder, read the
                           uidlist; Dovecot: the same plus building dovecot.index*), LOGOUT
  LOGIN+SELECT warm        the same in a fresh connection (median of 3)
                           ("of which SELECT": the SELECT command alone, send to tagged OK,
                           since LOGIN's one argon2id hash, ~0.1 s, is most of the session)
  then one session, each command timed from its send to its tagged OK:
  UID FETCH 1:* (FLAGS)    (median of 3)
  FETCH 1:* (ENVELOPE)     cold (once: every header is read; Dovecot fills its cache), then
                           warm (median of 3)
  SEARCH UNSEEN            (median of 3)
  SEARCH TEXT "WORD"       (median of 3; without FTS both read every message)
  FETCH 1:* BODY.PEEK[]    (median of 3; every byte of every message)
  STORE 1:1000 +FLAGS (\\Flagged)   (median of 3; an untimed STORE 1:1000 -FLAGS (\\Flagged)
                           resets the folder between runs; 1,000 renames on both servers)
  RSS per idle connection  on a freshly restarted server (after the bulk FETCHes mx's heap has
                           free space that new connections would fill without growing the RSS),
                           one warm-up login, then 200 connections, each logged in (no SELECT)
                           and left idle, opened one at a time; 1 s later
                           (memory after - memory before) / 200. mx: VmRSS of its one
                           process. Dovecot: the sum over every process of its session (master,
                           auth, anvil, log, config, and one `imap` per connection; the login
                           processes have exited by then), as VmRSS and as PSS (from
                           /proc/<pid>/smaps_rollup: shared pages divided among the processes
                           sharing them; the fair figure for forked processes, and the one the
                           second memory row compares mx's RSS with). mx's PSS is on stderr
                           only: it moves with other Python processes mapping the same libraries.

Each figure also has the server's CPU seconds (utime+stime from /proc; for Dovecot summed over
the processes of its session). Every response is checked: the tagged OK, the number of FETCH
responses (N, or 1,000 for STORE), the SEARCH hit counts (N/10 unseen, N/100 with WORD) and
the bytes of the BODY literals (N x 4,096); the FLAGS and ENVELOPE lines of the two servers are
compared on stderr.

The client is a plain blocking socket with one receive buffer (in this process; its CPU is on the
stderr lines), that sends one command and reads to its tagged response, skipping literals by
their length; no imaplib (whose response parsing would be the bottleneck at 100,000 messages).

Servers: mx runs as `twistd -n --pidfile '' mx --config <tmp>/mx/mx.toml` with only
`listen.imap` on a free loopback port and a users file written with `mx.users` (127.0.0.0/8 is in
`auth.plaintext_without_tls` by default, so LOGIN works without TLS). `MX_PROFILE=/tmp/prof` in
the environment runs it under twistd's cProfile (`/tmp/prof.<pid>.<time>`, read with pstats).
Dovecot is Debian's 2.3 (`apt-get install dovecot-imapd`), started privately by
tests/dovecot.py (own config, base_dir, logs and ports, never the system service) on
`maildir:<tmp>/dovecot/mail/%d/%n`, with its process and per-user connection limits raised for
the 200 idle connections; it checks passwords in the same users file (ARGON2ID), so a login
costs both one argon2id hash (~0.1 s). As root its mail processes run as nobody (its copy is
chowned). The servers run one after the other.

How to run:
    python3 benchmarks/imap.py                        # 10,000 messages, both servers
    python3 benchmarks/imap.py --messages 10000,100000
    python3 benchmarks/imap.py --messages 1000 --servers mx --idle 20 --json out.json

Exit status 1 if a server failed to start or answered a command wrongly (the command, the
server's answer and the tail of its log are printed, and the other server still runs).
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CLK_TCK = os.sysconf("SC_CLK_TCK")
USER = "bench@example.test"
PASSWORD = "bench-password"
SIZE = 4096
WORD = "quixotry"  # planted in every 100th message; nowhere else (checked by the generator)
RUNS = 3
IDLE = 200
STORE_N = 1000
HOST = socket.gethostname().replace("/", r"\057").replace(":", r"\072") or "localhost"

MX_TOML = """\
hostname = "mx.example.test"
data_dir = "data"
local_domains = ["example.test"]
postmaster = "postmaster@example.test"
[listen]
smtp = ""
submission = ""
submissions = ""
pop3 = ""
pop3s = ""
imap = "tcp:{port}:interface=127.0.0.1"
imaps = ""
[auth]
users_file = "{users}"
[limits]
max_connections_per_ip = 1000
max_connections = 1000
"""

# The 200 idle connections: Dovecot's defaults are 100 processes per service and 10
# connections per user and IP (tests/dovecot.py sets 100); later lines win in its config.
DOVECOT_EXTRA = """\
default_process_limit = 1000
default_client_limit = 4000
mail_max_userip_connections = 1000
"""


# --- the Maildir --------------------------------------------------------------------------

FIRST = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
LAST = ["Smith", "Jones", "Brown", "Taylor", "Wilson", "Martin", "Lee", "Walker", "Hall", "Young"]
DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
FILLER = (b"The quick brown fox jumps over the lazy dog while the meeting notes are reviewed "
          b"and the quarterly figures come in; nothing here is urgent, please read at leisure. ") * 4


def make_message(n):
    """Message n: exactly SIZE bytes, CRLF lines, headers that vary per message."""
    a, b = FIRST[n % 10], LAST[(n // 10) % 10]
    c, d = FIRST[(n + 3) % 10], LAST[(n // 7) % 10]
    t = time.gmtime(1767225600 + n * 37)  # 2026-01-01 onwards
    date = "%s, %d %s %d %02d:%02d:%02d +0000" % (DAYS[t.tm_wday], t.tm_mday, MONTHS[t.tm_mon - 1], t.tm_year,
                                                   t.tm_hour, t.tm_min, t.tm_sec)
    head = ("Return-Path: <%s.%s@client.example>\r\n"
            "Received: from client.example ([127.0.0.1]) by mx.example.test with ESMTP id b%07d;\r\n"
            "\t%s\r\n"
            "From: %s %s <%s.%s@client.example>\r\n"
            "To: Bench User <%s>\r\n"
            % (a.lower(), b.lower(), n, date, a, b, a.lower(), b.lower(), USER))
    if n % 3 == 0:
        head += "Cc: %s %s <%s@other.example>, team@other.example\r\n" % (c, d, c.lower())
    head += "Subject: %s report %d on the %s account\r\n" % (["Weekly", "Monthly", "Re: Daily"][n % 3], n, d)
    head += "Date: %s\r\nMessage-ID: <bench-%d@client.example>\r\n" % (date, n)
    if n % 3 == 2 and n > 0:
        head += "In-Reply-To: <bench-%d@client.example>\r\n" % (n - 1)
    head += "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    head = head.encode()
    body = bytearray()
    if n % 100 == 7:
        body += b"Hello, a line with the planted word %s in it.\r\n" % WORD.encode()
    i = 0
    while len(head) + len(body) + 78 <= SIZE:
        body += FILLER[i % 97:i % 97 + 76] + b"\r\n"
        i += 1
    rest = SIZE - len(head) - len(body)
    if rest < 2:  # room for no CRLF: the last filler line makes way for a longer last line
        del body[-78:]
        rest += 78
    body += b"x" * (rest - 2) + b"\r\n"
    data = head + bytes(body)
    assert len(data) == SIZE, len(data)
    return data


def expected(n):
    return {"unseen": sum(1 for i in range(n) if i % 10 == 9), "word": sum(1 for i in range(n) if i % 100 == 7)}


def generate(box, n):
    """N messages into `<box>/cur/` in arrival order (1 ms apart); every 10th unseen."""
    assert WORD.encode() not in FILLER and WORD.encode() not in make_message(0)
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(box, sub), exist_ok=True)
    t0 = int(time.time()) - n // 1000 - 10
    pid = os.getpid()
    cur = os.path.join(box, "cur")
    for i in range(n):
        sec, usec = t0 + i // 1000, (i % 1000) * 1000
        name = "%d.M%dP%dQ%dR%08x.%s,S=%d,W=%d:2,%s" % (sec, usec, pid, i, i * 2654435761 % (1 << 32), HOST, SIZE, SIZE,
                                                   "" if i % 10 == 9 else "S")
        path = os.path.join(cur, name)
        with open(path, "wb") as f:
            f.write(make_message(i))
        os.utime(path, (sec, sec))  # INTERNALDATE = arrival, as delivery leaves it


def assign_uids(box):
    """Write `dovecot-uidlist` with mx's store, in this process: both copies get the same UIDs."""
    from mx.store import Folder
    folder = Folder.open(Path(box))
    return len(folder.messages()), folder.uidvalidity


# --- a small blocking IMAP client -------------------------------------------------------------


class IMAPError(Exception):
    pass


_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
_FETCH = re.compile(rb"^\* \d+ FETCH ", re.I)


class Response:
    __slots__ = ("status", "tagged", "nbytes", "fetches", "literal_bytes", "lines", "search")

    def __init__(self):
        self.status = self.tagged = b""
        self.nbytes = self.fetches = self.literal_bytes = 0
        self.lines = None
        self.search = None


class Client:
    """Plain socket, one receive buffer; lines found with bytes.find, literals skipped by length."""

    def __init__(self, port, timeout):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.buf = bytearray()
        self.pos = 0
        self.n = 0
        greeting = self._line()
        if not greeting.startswith(b"* OK"):
            raise IMAPError("greeting: %r" % greeting[:200])

    def _fill(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise IMAPError("connection closed by the server")
        self.buf += data
        return len(data)

    def _compact(self):
        if self.pos > (1 << 22):
            del self.buf[:self.pos]
            self.pos = 0

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                out = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return out
            self._fill()

    def command(self, cmd, keep=False):
        """Send `<tag> cmd`, read to the tagged response; IMAPError unless it is OK."""
        self.n += 1
        tag = b"A%04d" % self.n
        self.sock.sendall(tag + b" " + cmd + b"\r\n")
        r = Response()
        r.lines = [] if keep else None
        tagsp = tag + b" "
        buf = self.buf
        start = self.pos  # the start of the current logical line (literals included)
        scan = start
        nbytes = 0
        fetches = lit = 0
        while True:
            i = buf.find(b"\r\n", scan)
            if i < 0:
                scan = max(scan, len(buf) - 1)
                self._fill()
                continue
            m = _LITERAL.search(buf, max(start, i - 24), i) if buf[i - 1] == 0x7D else None  # "}"
            if m:
                size = int(m.group(1))
                end = i + 2 + size
                while len(buf) < end:
                    self._fill()
                lit += size
                scan = end
                continue
            line = buf[start:i]
            nbytes += i + 2 - start
            if line.startswith(b"* "):
                if _FETCH.match(line):
                    fetches += 1
                if keep:
                    r.lines.append(bytes(line))
                elif line[2:8].upper() == b"SEARCH" and r.search is None:
                    r.search = bytes(line)
            elif line.startswith(tagsp):
                r.tagged = bytes(line)
                r.status = line[len(tagsp):].split(b" ", 1)[0].upper()
                start = i + 2
                break
            start = scan = i + 2
            if start > (1 << 22):  # keep the buffer small on big responses
                del buf[:start]
                start = scan = 0
        self.pos = start
        self._compact()
        r.nbytes, r.fetches, r.literal_bytes = nbytes, fetches, lit
        if r.status != b"OK":
            raise IMAPError("%s -> %s" % (cmd.decode(), r.tagged.decode("latin-1")[:500]))
        return r

    def login(self):
        self.command(b'LOGIN "%s" "%s"' % (USER.encode(), PASSWORD.encode()))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --- process figures -------------------------------------------------------------------------


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_of(pid, children=True):
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def session_pids(sid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(_stat_fields(int(d))[3]) == sid:
                    out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def status_kib(pid, field):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kib(pid):
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


class MxServer:
    name = "mx"

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None

    def start(self, timeout):
        try:
            import mx.imap.server  # noqa: F401
        except ImportError as e:
            raise RuntimeError("mx has no IMAP server yet (mx/imap/server.py: %s)" % e)
        from tests.dovecot import _free_port
        root = os.path.join(self.tmp, "mx")
        self.port = _free_port()
        with open(os.path.join(root, "mx.toml"), "w") as f:
            f.write(MX_TOML.format(port=self.port, users=self.tmp + "/users"))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        self.log = os.path.join(root, "twistd.log")
        prof = os.environ.get("MX_PROFILE")
        extra = ["--profile=%s.%d.%.0f" % (prof, os.getpid(), time.time()), "--profiler=cprofile",
                 "--savestats"] if prof else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile", "",
                 *extra, "mx", "--config", os.path.join(root, "mx.toml")],
                cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_greeting(self, timeout)

    def pids(self):
        return [self.proc.pid]

    def cpu(self):
        return cpu_of(self.proc.pid)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, limit=3000):
        try:
            return open(self.log, "rb").read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""


class DovecotServer:
    name = "dovecot"

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None
        self.instance = None

    def start(self, timeout):
        from tests.dovecot import dovecot_available, launch
        reason = dovecot_available()
        if reason:
            raise RuntimeError("Dovecot not available: %s" % reason)
        root = Path(self.tmp) / "dovecot"
        self.instance = launch(root / "run", root / "mail", {USER: PASSWORD}, users_file=Path(self.tmp) / "users",
                               extra=DOVECOT_EXTRA, timeout=timeout)
        self.instance.hand_over()
        self.proc = self.instance.process
        self.port = self.instance.imap_port

    def pids(self):
        return session_pids(self.proc.pid)

    def cpu(self):
        total = cpu_of(self.proc.pid)
        for pid in self.pids():
            if pid != self.proc.pid:
                try:
                    total += cpu_of(pid)
                except OSError:
                    pass
        return total

    def stop(self):
        if self.instance:
            self.instance.stop()

    def log_tail(self, limit=3000):
        return self.instance.log(limit) if self.instance else ""


def wait_greeting(server, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError("%s exited with %s during start-up:\n%s"
                               % (server.name, server.proc.returncode, server.log_tail()))
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                if s.getsockname() != s.getpeername() and s.recv(64).startswith(b"* OK"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("%s gave no * OK greeting within %.0f s:\n%s" % (server.name, timeout, server.log_tail()))


# --- one server's run -------------------------------------------------------------------------

FIGURES = (
    ("select_cold", "LOGIN+SELECT cold"),
    ("select_cold_only", "  of which SELECT"),
    ("select_warm", "LOGIN+SELECT warm"),
    ("select_warm_only", "  of which SELECT"),
    ("flags", "UID FETCH 1:* (FLAGS)"),
    ("env_cold", "FETCH 1:* (ENVELOPE) cold"),
    ("env_warm", "FETCH 1:* (ENVELOPE) warm"),
    ("unseen", "SEARCH UNSEEN"),
    ("text", 'SEARCH TEXT "%s"' % WORD),
    ("body", "FETCH 1:* BODY.PEEK[]"),
    ("store", "STORE 1:1000 +FLAGS (\\Flagged)"),
)


class Check(Exception):
    pass


def search_count(r):
    return len(r.search.split()) - 2 if r.search else 0


def run_server(cls, tmp, n, timeout, runs, idle, deadline):
    res = {"server": cls.name, "messages": n, "figures": {}, "error": None, "compare": {}}
    srv = cls(tmp)
    exp = expected(n)
    current = ["start"]
    select_only = []

    def timed(key, fn, times):
        walls, cpus, ccpus, last = [], [], [], None
        for _ in range(times):
            if time.monotonic() > deadline:
                raise Check("out of time (--budget) before %s" % key)
            cpu0, c0, t0 = srv.cpu(), time.process_time(), time.perf_counter()
            last = fn()
            walls.append(time.perf_counter() - t0)
            cpus.append(srv.cpu() - cpu0)
            ccpus.append(time.process_time() - c0)
        fig = {"wall_s": statistics.median(walls), "server_cpu_s": statistics.median(cpus),
               "client_cpu_s": statistics.median(ccpus), "runs": walls,
               "bytes": last.nbytes + last.literal_bytes if last is not None else 0}
        res["figures"][key] = fig
        print("%-8s %-32s %9.1f ms  (runs %s)  server cpu %6.3f s  client cpu %5.2f s  %8.1f MB"
              % (cls.name, dict(FIGURES)[key], fig["wall_s"] * 1e3, " ".join("%.0f" % (w * 1e3) for w in walls),
                 fig["server_cpu_s"], fig["client_cpu_s"], fig["bytes"] / 1e6), file=sys.stderr, flush=True)
        return last

    def select_session():
        c = Client(srv.port, timeout)
        try:
            current[0] = "LOGIN"
            c.login()
            current[0] = "SELECT INBOX"
            cpu0, t0 = srv.cpu(), time.perf_counter()
            r = c.command(b"SELECT INBOX", keep=True)
            select_only.append((time.perf_counter() - t0, srv.cpu() - cpu0))
            exists = [int(x.split()[1]) for x in r.lines if x.upper().endswith(b" EXISTS")]
            if exists != [n]:
                raise Check("SELECT INBOX: EXISTS %s, expected %d" % (exists, n))
            c.command(b"LOGOUT")
            return r
        finally:
            c.close()

    def cmd(c, text, fetches=None, keep=False, search=None, literal=None):
        current[0] = text.decode()
        r = c.command(text, keep=keep)
        if fetches is not None and r.fetches != fetches:
            raise Check("%s: %d FETCH responses, expected %d (tagged: %s)"
                        % (text.decode(), r.fetches, fetches, r.tagged.decode("latin-1")))
        if search is not None and search_count(r) != search:
            raise Check("%s: %d hits, expected %d (%s...)"
                        % (text.decode(), search_count(r), search, (r.search or b"no * SEARCH")[:80].decode()))
        if literal is not None and r.literal_bytes != literal:
            raise Check("%s: %d literal bytes, expected %d" % (text.decode(), r.literal_bytes, literal))
        return r

    try:
        srv.start(60.0)
        time.sleep(0.3)
        for key, times in (("select_cold", 1), ("select_warm", runs)):
            select_only = []
            timed(key, select_session, times)
            res["figures"][key + "_only"] = {
                "wall_s": statistics.median(w for w, _ in select_only),
                "server_cpu_s": statistics.median(c for _, c in select_only), "runs": [w for w, _ in select_only]}
        c = Client(srv.port, timeout)
        try:
            current[0] = "LOGIN"
            c.login()
            cmd(c, b"SELECT INBOX")
            r = timed("flags", lambda: cmd(c, b"UID FETCH 1:* (FLAGS)", fetches=n, keep=True), runs)
            res["compare"]["flags"] = r.lines
            r = timed("env_cold", lambda: cmd(c, b"FETCH 1:* (ENVELOPE)", fetches=n, keep=True), 1)
            res["compare"]["envelope"] = r.lines
            timed("env_warm", lambda: cmd(c, b"FETCH 1:* (ENVELOPE)", fetches=n), runs)
            timed("unseen", lambda: cmd(c, b"SEARCH UNSEEN", search=exp["unseen"]), runs)
            timed("text", lambda: cmd(c, b'SEARCH TEXT "' + WORD.encode() + b'"', search=exp["word"]), runs)
            timed("body", lambda: cmd(c, b"FETCH 1:* BODY.PEEK[]", fetches=n, literal=n * SIZE), runs)
            m = min(STORE_N, n)

            # only the +FLAGS half is timed; the -FLAGS reset runs outside the clock
            walls, cpus, ccpus = [], [], []
            for _ in range(runs):
                if time.monotonic() > deadline:
                    raise Check("out of time (--budget) before STORE")
                cpu0, c0, t0 = srv.cpu(), time.process_time(), time.perf_counter()
                r = cmd(c, b"STORE 1:%d +FLAGS (\\Flagged)" % m, fetches=m)
                walls.append(time.perf_counter() - t0)
                cpus.append(srv.cpu() - cpu0)
                ccpus.append(time.process_time() - c0)
                cmd(c, b"STORE 1:%d -FLAGS (\\Flagged)" % m, fetches=m)
            res["figures"]["store"] = {"wall_s": statistics.median(walls), "server_cpu_s": statistics.median(cpus),
                                       "client_cpu_s": statistics.median(ccpus), "runs": walls, "bytes": r.nbytes}
            print("%-8s %-32s %9.1f ms  (runs %s)  server cpu %6.3f s"
                  % (cls.name, dict(FIGURES)["store"], statistics.median(walls) * 1e3,
                     " ".join("%.0f" % (w * 1e3) for w in walls), statistics.median(cpus)), file=sys.stderr, flush=True)
            current[0] = "LOGOUT"
            c.command(b"LOGOUT")
        finally:
            c.close()
        if idle:
            # A fresh server for the memory figure: after the bulk FETCHes mx's heap has free
            # space that new connections would fill without growing its RSS.
            current[0] = "restart for the idle connections"
            srv.stop()
            srv.start(60.0)
            c = Client(srv.port, timeout)  # one login first: the argon2id and start-up costs settle
            try:
                c.login()
                c.command(b"LOGOUT")
            finally:
                c.close()
            res["idle"] = idle_rss(srv, idle, timeout, deadline, current)
            print("%-8s RSS per idle connection: %.1f KiB (PSS %.1f KiB) over %d connections; %s"
                  % (cls.name, res["idle"]["rss_kib"], res["idle"]["pss_kib"], idle, res["idle"]["note"]),
                  file=sys.stderr, flush=True)
    except Exception as e:  # report and go on with the other server
        res["error"] = "%s during %s: %s" % (type(e).__name__, current[0], e)
        tail = srv.log_tail(4000) if srv.proc else ""
        res["log_tail"] = tail
        print("%-8s FAILED: %s%s" % (cls.name, res["error"], ("\n  log tail:\n" + tail) if tail else ""),
              file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return res


def idle_rss(srv, count, timeout, deadline, current):
    """Open `count` logged-in idle connections one at a time; the server's memory delta / count."""
    def totals():
        pids = srv.pids()
        return (sum(status_kib(p, "VmRSS") for p in pids), sum(pss_kib(p) for p in pids), pids)

    time.sleep(1.0)  # Dovecot: let the last session's imap process exit
    rss0, pss0, pids0 = totals()
    clients = []
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                raise Check("out of time (--budget) after %d idle connections" % i)
            current[0] = "idle connection %d: LOGIN" % (i + 1)
            c = Client(srv.port, timeout)
            clients.append(c)
            c.login()
        time.sleep(1.0)
        rss1, pss1, pids1 = totals()
        kinds = {}
        for p in pids1:
            kinds[comm(p)] = kinds.get(comm(p), 0) + 1
        note = "%d -> %d processes (%s)" % (len(pids0), len(pids1),
                                           ", ".join("%s x%d" % kv for kv in sorted(kinds.items())))
        return {"rss_kib": (rss1 - rss0) / count, "pss_kib": (pss1 - pss0) / count,
                "rss_before_kib": rss0, "rss_after_kib": rss1, "pss_before_kib": pss0, "pss_after_kib": pss1,
                "note": note}
    finally:
        for c in clients:
            c.close()


def compare(results):
    """The FLAGS and ENVELOPE lines of the two servers: how many are byte-identical."""
    ok = [r for r in results if r["compare"].get("flags") is not None]
    if len(ok) != 2:
        return
    a, b = ok
    for key in ("flags", "envelope"):
        la, lb = a["compare"].get(key), b["compare"].get(key)
        if la is None or lb is None:
            continue
        same = sum(1 for x, y in zip(la, lb) if x == y)
        print("%s lines identical in mx and Dovecot: %d of %d" % (key.upper(), same, max(len(la), len(lb))),
              file=sys.stderr)
        for x, y in zip(la, lb):
            if x != y:
                print("  first difference:\n    %s: %s\n    %s: %s" % (a["server"], x[:300].decode("latin-1"),
                                                                       b["server"], y[:300].decode("latin-1")),
                      file=sys.stderr)
                break


def table(results, n):
    by = {r["server"]: r for r in results}
    both = "mx" in by and "dovecot" in by
    head = "%-34s %10s %10s %8s %9s %9s %8s" % ("figure (%d msgs)" % n, "mx ms", "Dovecot ms", "mx/dc",
                                               "mx cpu s", "dc cpu s", "cpu mx/dc")
    out = [head, "-" * len(head)]

    def fig(s, key):
        return by.get(s, {}).get("figures", {}).get(key)

    for key, label in FIGURES:
        a, b = fig("mx", key), fig("dovecot", key)
        cells = []
        for s, f in (("mx", a), ("dovecot", b)):
            cells.append("%10.1f" % (f["wall_s"] * 1e3) if f else "%10s" % ("FAILED" if s in by else "-"))
        ratio = "%8.2f" % (a["wall_s"] / b["wall_s"]) if a and b and b["wall_s"] else "%8s" % "-"
        cpu = ["%9.3f" % f["server_cpu_s"] if f else "%9s" % "-" for f in (a, b)]
        cr = "%8.2f" % (a["server_cpu_s"] / b["server_cpu_s"]) if a and b and b["server_cpu_s"] else "%8s" % "-"
        out.append("%-34s %s %s %s %s %s %s" % (label, cells[0], cells[1], ratio, cpu[0], cpu[1], cr))
    ia, ib = by.get("mx", {}).get("idle"), by.get("dovecot", {}).get("idle")
    # mx is one process: its RSS is the figure (its PSS moves with every other Python process
    # on the machine that maps the same libraries, so it is on stderr only). Dovecot forks an
    # imap process per connection: the sum of their RSS counts the shared pages 200 times, the
    # sum of PSS once; the PSS row is the like-for-like one.
    for what, fa, fb in (("RSS per idle conn, KiB", "rss_kib", "rss_kib"),
                         ("  mx RSS vs Dovecot PSS, KiB", "rss_kib", "pss_kib")):
        cells = ["%10.1f" % i[f] if i else "%10s" % "-" for i, f in ((ia, fa), (ib, fb))]
        ratio = "%8.3f" % (ia[fa] / ib[fb]) if ia and ib and ib[fb] else "%8s" % "-"
        out.append("%-34s %s %s %s" % (what, cells[0], cells[1], ratio))
    out.append("median of %d runs (cold: one); mx/dc = mx / Dovecot (< 1: mx faster or smaller); cpu = server "
               "CPU s; idle: (memory after - before) / connections, Dovecot summed over its processes"
               % RUNS)
    if not both:
        out.append("(only %s ran)" % ", ".join(by))
    return "\n".join(out)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def run_size(n, servers, a, deadline):
    tmp = tempfile.mkdtemp(prefix="imap_bench_")
    os.chmod(tmp, 0o755)
    results = []
    try:
        t0 = time.perf_counter()
        from mx.users import hash_password, write_users
        write_users(Path(tmp) / "users", {USER: hash_password(PASSWORD)})
        first = os.path.join(tmp, "mx", "data", "mail", "example.test", "bench")
        generate(first, n)
        count, uidvalidity = assign_uids(first)
        if count != n:
            raise RuntimeError("mx's store lists %d messages, expected %d" % (count, n))
        if "dovecot" in servers:
            shutil.copytree(first, os.path.join(tmp, "dovecot", "mail", "example.test", "bench"))
        print("generated %d messages of %d bytes, uidlist by mx's store (UIDVALIDITY %d), copied, in %.1f s "
              "under %s" % (n, SIZE, uidvalidity, time.perf_counter() - t0, tmp), file=sys.stderr, flush=True)
        classes = {"mx": MxServer, "dovecot": DovecotServer}
        for s in servers:
            results.append(run_server(classes[s], tmp, n, a.timeout, RUNS, a.idle, deadline))
        compare(results)
    finally:
        if a.keep:
            print("kept %s" % tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


def main():
    global RUNS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", default="10000", help="comma-separated folder sizes (default 10000)")
    ap.add_argument("--servers", default="mx,dovecot")
    ap.add_argument("--runs", type=int, default=RUNS, help="runs per warm figure (median)")
    ap.add_argument("--idle", type=int, default=IDLE, help="idle connections for the RSS figure (0: skip)")
    ap.add_argument("--timeout", type=float, default=120.0, help="socket timeout (seconds without a byte)")
    ap.add_argument("--budget", type=float, default=1800.0, help="seconds for everything; then it stops")
    ap.add_argument("--keep", action="store_true", help="keep the temp folders (their paths are printed)")
    ap.add_argument("--json", metavar="PATH", help="dump raw results as JSON")
    a = ap.parse_args()
    RUNS = max(1, a.runs)
    signal.signal(signal.SIGTERM, _interrupted)
    sizes = [int(s.replace("_", "")) for s in a.messages.split(",") if s]
    servers = [s for s in a.servers.split(",") if s]
    if set(servers) - {"mx", "dovecot"}:
        ap.error("unknown server in %r (choose from mx, dovecot)" % a.servers)
    deadline = time.monotonic() + a.budget
    everything = []
    for n in sizes:
        results = run_size(n, servers, a, deadline)
        everything.extend(results)
        print()
        print("%d messages of %d bytes, %s, load average %s" % (n, SIZE, time.strftime("%Y-%m-%d %H:%M"),
                                                                 " ".join(open("/proc/loadavg").read().split()[:3])))
        print(table(results, n))
        for r in results:
            if r["error"]:
                print("%s: %s" % (r["server"], r["error"].splitlines()[0]))
        sys.stdout.flush()
    if a.json:
        for r in everything:
            r.pop("compare", None)
        with open(a.json, "w") as f:
            json.dump(everything, f, indent=2)
    return 1 if any(r["error"] for r in everything) else 0


if __name__ == "__main__":
    sys.exit(main())
