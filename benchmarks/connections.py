#!/usr/bin/env python3
"""Many idle connections: what each costs the server, and whether a new client still gets
served at its usual speed while they are held (issue 11, goal 4).

mx (one `twistd -n mx` process, SMTP and IMAP on loopback) and, as the peer for IMAP, a
private Dovecot (tests/dovecot.py's launcher: own config dir, loopback ports, its default
process-per-connection `imap` service, limits raised so it admits them all):

  1. seed:    20 messages for bench@example.test (mx: delivered over SMTP; Dovecot: written
              into its Maildir).
  2. probes:  --probes rounds, one new client after the other, each a fresh connection
              (mx: after each round an untimed session expunges the round's message, so
              every round reads the same folder):
              deliver = smtplib: connect, EHLO, MAIL, RCPT, DATA (1 KiB), QUIT (mx only);
              read    = imaplib: connect, LOGIN, SELECT INBOX, FETCH * BODY.PEEK[], LOGOUT
              (mx: the FETCH must return the message the same round delivered).
  3. idle:    --smtp connections that sent EHLO and stay silent, then --imap connections that
              did LOGIN and SELECT INBOX and stay silent (asyncio, at most --concurrency
              connects in flight, each retried up to 5 times); the server's VmRSS and PSS
              (/proc smaps_rollup; for Dovecot summed over all its processes) are read before
              and after each batch: the difference / count is the memory per idle connection.
  4. probes again with every idle connection held: p50 / p99 beside the figures of step 2.
  5. held:    every idle connection sends NOOP and must get its 250 / OK: none dropped.
              The server's CPU while they were held and silent (--hold seconds) is printed.

Passwords: the users file holds a light argon2id hash (m=1 MiB, t=1, p=1; mx and Dovecot
both verify it) so that thousands of LOGINs take seconds; the cost of password hashing is
not what this measures (mx's own `mx user add` uses argon2-cffi's defaults).

File limits: the client raises its soft RLIMIT_NOFILE to the hard limit; mx raises its own
at start (mx/fdlimit.py, the log says so); Dovecot's master inherits the client's.

How to run:
    python3 benchmarks/connections.py                    # 5,000 SMTP + 5,000 IMAP; Dovecot 5,000 IMAP
    python3 benchmarks/connections.py --quick            # 500 + 500, 10 probes
    python3 benchmarks/connections.py --servers mx --smtp 8000 --imap 2000 --json out.json
Exit status 1 if a connection could not be opened or was dropped, a probe failed, or the
time budget (--timeout, 900 s) ran out.
"""
import argparse, asyncio, contextlib, imaplib, json, os, resource, shutil, signal, smtplib, socket, subprocess, sys, tempfile, time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imap import comm, cpu_of, pss_kib, session_pids, status_kib  # noqa: E402

USER = "bench@example.test"
PASSWORD = "bench-password"
SENDER = "sender@client.example"
SEED = 20

MX_TOML = """\
hostname = "mx.example.test"
data_dir = "data"
local_domains = ["example.test"]
postmaster = "postmaster@example.test"
[listen]
smtp = "tcp:{smtp}:interface=127.0.0.1"
submission = ""
submissions = ""
pop3 = ""
pop3s = ""
imap = "tcp:{imap}:interface=127.0.0.1"
imaps = ""
[auth]
users_file = "{users}"
[limits]
max_connections_per_ip = {limit}
max_connections = {limit}
idle_timeout = "30m"
imap_idle_timeout = "30m"
"""

# Dovecot's defaults admit 100 imap processes (one per logged-in connection) and 10
# connections per user and address; later lines win in its config.
DOVECOT_EXTRA = """\
default_process_limit = {limit}
default_client_limit = {clients}
mail_max_userip_connections = {limit}
service imap {{
  process_limit = {limit}
}}
service imap-login {{
  process_limit = {limit}
}}
service anvil {{
  client_limit = {clients}
}}
service stats {{
  client_limit = {clients}
}}
service auth {{
  client_limit = {clients}
}}
"""


def light_hash(password):
    import argon2
    return "{ARGON2ID}" + argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


def message(tag):
    body = ("This probe message is numbered %s.\r\n" % tag) * 28
    return ("From: <%s>\r\nTo: <%s>\r\nSubject: probe %s\r\nMessage-ID: <%s@client.example>\r\n"
            "X-Probe: %s\r\n\r\n%s\r\n" % (SENDER, USER, tag, tag, tag, body)).encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    return v[min(len(v) - 1, int(round(p / 100.0 * (len(v) - 1))))]


class Check(Exception):
    pass


# --- servers ---------------------------------------------------------------------------------


class Mx:
    name = "mx"
    delivers = True

    def __init__(self, tmp, limit):
        self.root = os.path.join(tmp, "mx")
        os.makedirs(self.root)
        self.users = os.path.join(tmp, "users")
        self.smtp_port, self.imap_port = free_port(), free_port()
        with open(os.path.join(self.root, "mx.toml"), "w") as f:
            f.write(MX_TOML.format(smtp=self.smtp_port, imap=self.imap_port, users=self.users, limit=limit))
        self.log = os.path.join(self.root, "twistd.log")
        self.proc = None

    def start(self, timeout):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile", "",
                 "mx", "--config", os.path.join(self.root, "mx.toml")],
                cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_greeting(self, self.smtp_port, b"220", timeout)
        wait_greeting(self, self.imap_port, b"* OK", timeout)

    def seed(self, n):
        for i in range(n):
            deliver(self.smtp_port, "seed-%d" % i, 30)

    def pids(self):
        return [self.proc.pid]

    def cpu(self):
        return cpu_of(self.proc.pid)

    def nofile(self):
        with open("/proc/%d/limits" % self.proc.pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
        return "?"

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, limit=3000):
        try:
            return open(self.log, "rb").read()[-limit:].decode("utf-8", "replace")
        except OSError:
            return ""

    def log_problems(self):
        keys = ("Traceback", "Unhandled", "CRITICAL", "EMFILE", "Too many open files", "refused")
        return [line for line in self.log_tail(1 << 24).splitlines() if any(k in line for k in keys)][:10]


class Dovecot:
    name = "dovecot"
    delivers = False

    def __init__(self, tmp, limit):
        self.tmp = Path(tmp)
        self.limit = limit
        self.instance = self.proc = None

    def start(self, timeout):
        from tests.dovecot import dovecot_available, launch
        reason = dovecot_available()
        if reason:
            raise Check("Dovecot not available: %s" % reason)
        root = self.tmp / "dovecot"
        self.instance = launch(root / "run", root / "mail", {USER: PASSWORD}, users_file=self.tmp / "users",
                               extra=DOVECOT_EXTRA.format(limit=self.limit, clients=self.limit * 4),
                               timeout=timeout)
        self.instance.hand_over()
        self.proc = self.instance.process
        self.imap_port = self.instance.imap_port
        self.box = root / "mail" / "example.test" / "bench"

    def seed(self, n):
        for sub in ("new", "cur", "tmp"):
            (self.box / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (self.box / "new" / ("%d.M%dP%d.bench" % (int(time.time()), i, os.getpid()))).write_bytes(
                message("seed-%d" % i))
        uid, gid = self.instance.mail_uid, self.instance.mail_gid
        for dirpath, _, files in os.walk(self.box.parent.parent):
            os.chown(dirpath, uid, gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), uid, gid)

    def pids(self):
        return session_pids(self.proc.pid)

    def cpu(self):
        total = 0.0
        for pid in self.pids():
            try:
                total += cpu_of(pid, children=pid == self.proc.pid)
            except OSError:
                pass
        return total

    def nofile(self):
        with open("/proc/%d/limits" % self.proc.pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    return line.split()[3]
        return "?"

    def stop(self):
        if self.instance:
            self.instance.stop()

    def log_tail(self, limit=3000):
        return self.instance.log(limit) if self.instance else ""

    def log_problems(self):
        keys = ("Warning", "Error", "Fatal", "Panic")
        return [line for line in self.log_tail(1 << 24).splitlines() if any(k in line for k in keys)][:10]


def wait_greeting(server, port, prefix, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise Check("%s exited with %s during start-up:\n%s" % (server.name, server.proc.returncode,
                                                                   server.log_tail()))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.getsockname() != s.getpeername() and s.recv(64).startswith(prefix):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise Check("%s gave no greeting on port %d within %.0f s:\n%s" % (server.name, port, timeout, server.log_tail()))


# --- the new client's probes (the standard library's clients, one connection each) ------------


def deliver(port, tag, timeout):
    with smtplib.SMTP("127.0.0.1", port, local_hostname="probe.client.example", timeout=timeout) as s:
        s.sendmail(SENDER, [USER], message(tag))


@contextlib.contextmanager
def imap_session(port, timeout):
    """A logged-in imaplib client, logged out and its socket shut whatever happens."""
    c = imaplib.IMAP4("127.0.0.1", port, timeout=timeout)
    try:
        c.login(USER, PASSWORD)
        yield c
        c.logout()
    finally:
        try:
            c.shutdown()
        except OSError:
            pass


def read(port, tag, timeout):
    """LOGIN, SELECT, FETCH the newest message; with `tag`, it must be the probe's message
    (a delivery is visible as soon as its 250 came: mx delivers before it answers)."""
    with imap_session(port, timeout) as c:
        typ, data = c.select("INBOX", readonly=True)
        if typ != "OK":
            raise Check("SELECT INBOX: %s %s" % (typ, data))
        typ, data = c.fetch(b"*", "(BODY.PEEK[])")
        if typ != "OK" or not data or not isinstance(data[0], tuple):
            raise Check("FETCH * BODY.PEEK[]: %s %r" % (typ, data[:1]))
        if tag is not None and ("X-Probe: %s\r\n" % tag).encode() not in data[0][1]:
            raise Check("FETCH *: not the message just delivered (%s)" % tag)


def probes(server, rounds, label, timeout, deadline):
    out = {"deliver": [], "read": []}
    for i in range(rounds):
        if time.monotonic() > deadline:
            raise Check("out of time during the %s probes" % label)
        tag = None
        if server.delivers:
            tag = "%s-%d-%d" % (label, i, os.getpid())
            t0 = time.perf_counter()
            deliver(server.smtp_port, tag, timeout)
            out["deliver"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        read(server.imap_port, tag, timeout)
        out["read"].append(time.perf_counter() - t0)
        if tag is not None:
            expunge_newest(server.imap_port, timeout)  # untimed: every round sees the same folder
    return out


def expunge_newest(port, timeout):
    """Remove the message the round delivered, so the folder holds the seed in every round
    (else each round's SELECT would read a longer folder than the one before, and the probes
    under load would be slower for that reason alone)."""
    with imap_session(port, timeout) as c:
        typ, data = c.select("INBOX")
        if typ != "OK" or int(data[0]) <= SEED:
            raise Check("SELECT INBOX for the clean-up: %s %s" % (typ, data))
        c.store("%d:*" % (SEED + 1), "+FLAGS.SILENT", "(\\Deleted)")
        c.expunge()


# --- the idle crowd (asyncio, no library: a few bytes each way) --------------------------------


async def _reply(reader, last, timeout):
    """Read lines until `last(line)`; that line."""
    while True:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line:
            raise ConnectionError("closed by the server")
        if last(line):
            return line


def _smtp_last(line):
    return line[3:4] != b"-"


async def _smtp_open(port, i, timeout):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        line = await _reply(r, _smtp_last, timeout)
        if not line.startswith(b"220"):
            raise ConnectionError("greeting %r" % line[:80])
        w.write(b"EHLO idle%d.client.example\r\n" % i)
        line = await _reply(r, _smtp_last, timeout)
        if not line.startswith(b"250"):
            raise ConnectionError("EHLO: %r" % line[:80])
    except BaseException:
        w.close()
        raise
    return r, w


async def _imap_command(r, w, tag, text, timeout):
    w.write(tag + b" " + text + b"\r\n")
    line = await _reply(r, lambda ln: ln.startswith(tag + b" "), timeout)
    if not line.startswith(tag + b" OK"):
        raise ConnectionError("%s: %r" % (text[:20], line[:80]))


async def _imap_open(port, i, timeout):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        line = await asyncio.wait_for(r.readline(), timeout)
        if not line.startswith(b"* OK"):
            raise ConnectionError("greeting %r" % line[:80])
        await _imap_command(r, w, b"a", b'LOGIN "%s" "%s"' % (USER.encode(), PASSWORD.encode()), timeout)
        await _imap_command(r, w, b"b", b"SELECT INBOX", timeout)
    except BaseException:
        w.close()
        raise
    return r, w


async def open_many(opener, port, n, concurrency, timeout, deadline):
    conns, errors = [], []
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        err = None
        async with sem:
            for attempt in range(5):
                if time.monotonic() > deadline:
                    errors.append("out of time")
                    return
                try:
                    conns.append(await opener(port, i, timeout))
                    return
                except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                    err = e
                    await asyncio.sleep(0.2 * (attempt + 1))
        errors.append(repr(err))
    await asyncio.gather(*(one(i) for i in range(n)))
    return conns, errors


async def noop_all(conns, kind, concurrency, timeout):
    """Every held connection answers a NOOP: the count of those that did not."""
    sem = asyncio.Semaphore(concurrency)
    dead = []

    async def one(r, w):
        async with sem:
            try:
                if kind == "smtp":
                    w.write(b"NOOP\r\n")
                    line = await _reply(r, _smtp_last, timeout)
                    if not line.startswith(b"250"):
                        raise ConnectionError(repr(line[:80]))
                else:
                    await _imap_command(r, w, b"n", b"NOOP", timeout)
            except (OSError, ConnectionError, asyncio.TimeoutError) as e:
                dead.append(repr(e))
    await asyncio.gather(*(one(r, w) for r, w in conns))
    return dead


async def close_all(conns):
    for _, w in conns:
        w.close()
    await asyncio.sleep(0.1)


# --- one server's run --------------------------------------------------------------------------


def memory(server):
    pids = server.pids()
    return sum(status_kib(p, "VmRSS") for p in pids), sum(pss_kib(p) for p in pids), len(pids)


def run_server(cls, tmp, a, deadline):
    res = {"server": cls.name, "errors": [], "idle": {}, "probes": {}}
    srv = cls(tmp, a.limit)
    loop = asyncio.new_event_loop()
    held = {}
    try:
        srv.start(60)
        res["nofile"] = srv.nofile()
        srv.seed(SEED)
        probes(srv, 3, "warm", a.io_timeout, deadline)  # first LOGIN/SELECT work, caches
        res["probes"]["idle"] = probes(srv, a.probes, "before", a.io_timeout, deadline)
        time.sleep(0.5)
        kinds = [("smtp", a.smtp, _smtp_open)] if srv.delivers else []
        kinds.append(("imap", a.imap if srv.delivers else a.dovecot, _imap_open))
        for kind, n, opener in kinds:
            if n <= 0:
                continue
            port = srv.smtp_port if kind == "smtp" else srv.imap_port
            rss0, pss0, np0 = memory(srv)
            t0 = time.monotonic()
            conns, errors = loop.run_until_complete(
                open_many(opener, port, n, a.concurrency, a.io_timeout, deadline))
            took = time.monotonic() - t0
            held[kind] = conns
            time.sleep(1.0)  # Dovecot: login processes exit after the hand-over
            rss1, pss1, np1 = memory(srv)
            fig = {"wanted": n, "opened": len(conns), "open_s": took, "errors": errors[:5],
                   "failed": len(errors), "rss_kib": (rss1 - rss0) / max(1, len(conns)),
                   "pss_kib": (pss1 - pss0) / max(1, len(conns)), "processes": [np0, np1],
                   "rss_after_mib": rss1 / 1024, "pss_after_mib": pss1 / 1024}
            res["idle"][kind] = fig
            print("%-8s %-5s %5d/%-5d idle connections in %5.1f s  RSS %+7.1f KiB/conn  PSS %+7.1f KiB/conn"
                  "  (%d -> %d processes; now RSS %.0f, PSS %.0f MiB)%s"
                  % (srv.name, kind, len(conns), n, took, fig["rss_kib"], fig["pss_kib"], np0, np1,
                     rss1 / 1024, pss1 / 1024, ("  errors: %s" % errors[:3]) if errors else ""),
                  file=sys.stderr, flush=True)
            if errors:
                res["errors"].append("%s %s: %d of %d connections not opened: %s"
                                     % (srv.name, kind, len(errors), n, errors[:3]))
        if srv.name == "dovecot":
            kinds_now = {}
            for p in srv.pids():
                kinds_now[comm(p)] = kinds_now.get(comm(p), 0) + 1
            res["dovecot_processes"] = kinds_now
        res["probes"]["loaded"] = probes(srv, a.probes, "loaded", a.io_timeout, deadline)
        cpu0 = srv.cpu()
        time.sleep(a.hold)
        res["hold_cpu_s"] = srv.cpu() - cpu0
        for kind, conns in held.items():
            dead = loop.run_until_complete(noop_all(conns, kind, a.concurrency, a.io_timeout))
            res["idle"][kind]["dropped"] = len(dead)
            if dead:
                res["errors"].append("%s %s: %d of %d held connections did not answer NOOP: %s"
                                     % (srv.name, kind, len(dead), len(conns), dead[:3]))
    except (Check, OSError, smtplib.SMTPException, imaplib.IMAP4.error) as e:
        res["errors"].append("%s: %s" % (srv.name, e))
    finally:
        for conns in held.values():
            loop.run_until_complete(close_all(conns))
        loop.close()
        srv.stop()
        res["log_problems"] = srv.log_problems()
    return res


# --- report ------------------------------------------------------------------------------------


def table(results):
    lines = ["server   proto  idle conns  dropped  open s   RSS KiB/conn  PSS KiB/conn  processes"]
    for r in results:
        for kind, f in r["idle"].items():
            lines.append("%-8s %-5s %5d/%-5d %8s %7.1f %14.1f %13.1f  %6d -> %d"
                         % (r["server"], kind, f["opened"], f["wanted"], f.get("dropped", "?"), f["open_s"],
                            f["rss_kib"], f["pss_kib"], f["processes"][0], f["processes"][1]))
    lines.append("")
    lines.append("new client (ms)            p50 before  p99 before  p50 held  p99 held  held/before p50")
    for r in results:
        for what in ("deliver", "read"):
            b = r["probes"].get("idle", {}).get(what) or []
            h = r["probes"].get("loaded", {}).get(what) or []
            if not b:
                continue
            p50b, p99b, p50h, p99h = (percentile(b, 50) * 1e3, percentile(b, 99) * 1e3,
                                      percentile(h, 50) * 1e3, percentile(h, 99) * 1e3)
            label = "%s %s (%s)" % (r["server"], what, "SMTP" if what == "deliver" else "IMAP")
            lines.append("%-26s %10.1f %11.1f %9.1f %9.1f %12.2fx"
                         % (label, p50b, p99b, p50h, p99h, p50h / p50b if p50b else float("nan")))
    lines.append("")
    for r in results:
        lines.append("%-8s CPU while holding them silent: %.2f s in %.0f s; open-file limit %s%s"
                     % (r["server"], r.get("hold_cpu_s", float("nan")), ARGS.hold, r.get("nofile", "?"),
                        ("; processes %s" % ", ".join("%s x%d" % kv for kv in sorted(r["dovecot_processes"].items())))
                        if r.get("dovecot_processes") else ""))
    by = {r["server"]: r for r in results}
    if "mx" in by and "dovecot" in by and "imap" in by["mx"]["idle"] and "imap" in by["dovecot"]["idle"]:
        m, d = by["mx"]["idle"]["imap"]["pss_kib"], by["dovecot"]["idle"]["imap"]["pss_kib"]
        lines.append("IMAP memory per idle connection (PSS): Dovecot %.1f KiB / mx %.1f KiB = %.2fx"
                     % (d, m, d / m if m > 0 else float("nan")))
    return "\n".join(lines)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


ARGS = None


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smtp", type=int, default=5000, help="idle SMTP connections to mx")
    ap.add_argument("--imap", type=int, default=5000, help="idle IMAP connections to mx")
    ap.add_argument("--dovecot", type=int, default=None, help="idle IMAP connections to Dovecot (default --imap)")
    ap.add_argument("--servers", default="mx,dovecot")
    ap.add_argument("--probes", type=int, default=30, help="new-client rounds before and while they are held")
    ap.add_argument("--concurrency", type=int, default=50, help="connects in flight while opening")
    ap.add_argument("--hold", type=float, default=10.0, help="seconds to hold them silent before the NOOPs")
    ap.add_argument("--io-timeout", type=float, default=60.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="total budget, seconds")
    ap.add_argument("--quick", action="store_true", help="500 + 500 connections, 10 probes")
    ap.add_argument("--json")
    a = ARGS = ap.parse_args()
    if a.quick:
        a.smtp, a.imap, a.probes, a.hold = min(a.smtp, 500), min(a.imap, 500), 10, 3.0
    if a.dovecot is None:
        a.dovecot = a.imap
    a.limit = max(a.smtp + a.imap, a.dovecot) + 100
    nofile = raise_nofile()
    if nofile < max(a.smtp + a.imap, a.dovecot) + 200:
        sys.exit("the open-file limit (%d, hard) is too low for %d connections in this client"
                 % (nofile, a.smtp + a.imap))
    deadline = time.monotonic() + a.timeout
    tmp = tempfile.mkdtemp(prefix="mx-conns-")
    os.chmod(tmp, 0o755)  # Dovecot's mail processes run as nobody
    results = []
    try:
        with open(os.path.join(tmp, "users"), "w") as f:
            f.write("%s:%s\n" % (USER, light_hash(PASSWORD)))
        os.chmod(os.path.join(tmp, "users"), 0o600)
        for name in a.servers.split(","):
            cls = {"mx": Mx, "dovecot": Dovecot}[name]
            sub = os.path.join(tmp, name)
            os.makedirs(sub)
            shutil.copy(os.path.join(tmp, "users"), os.path.join(sub, "users"))
            results.append(run_server(cls, sub, a, deadline))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(table(results))
    failed = False
    for r in results:
        for e in r["errors"]:
            print("FAILED: %s" % e, file=sys.stderr)
            failed = True
        for line in r["log_problems"]:
            print("%s log: %s" % (r["server"], line), file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
