#!/usr/bin/env python3
"""Durable SMTP acceptance benchmark: mx vs. aiosmtpd, side by side.

What it measures: how fast a server accepts mail *durably* (the 250 after the final "."
means the message is fsync'ed into a Maildir).  For every (size, concurrency C, server) a
fresh server process starts in a fresh temp dir; C clients push N messages in total over
C connections (EHLO once, then MAIL/RCPT/DATA/body/"." per message, QUIT at the end).

  msg/s     messages that got 250, divided by the wall time of the run
  p50/p99   per-message latency, from MAIL sent to the 250 after the dot (ms)
  CPU/1k    server CPU seconds (utime+stime, /proc/<pid>/stat) per 1,000 messages
  RSS       peak resident set size of the server process (VmHWM), MiB
  mx/aio    ratio of the two msg/s figures

Servers: mx is `twistd -n --pidfile '' mx --config <tmp>/mx.toml` with one user,
bench@example.test.  aiosmtpd is a small embedded server whose handler, in a worker
thread, writes Return-Path + Received + message to Maildir tmp/, fsyncs it, links it into
new/ and fsyncs new/ before answering 250 -- the same discipline as mx.

The load generator is a lean asyncio raw-socket client (not smtplib) in this process; its
CPU per 1k messages is printed per run, to check it stays well below the servers'.  It
pipelines MAIL+RCPT+DATA in one write iff the server advertises PIPELINING (mx does,
aiosmtpd does not, so aiosmtpd gets one round trip per command).

How to run:
    python3 benchmarks/smtp_accept.py                  # full sweep, both servers
    python3 benchmarks/smtp_accept.py --quick          # 300 msgs, C=1,10, 4 KiB only
    python3 benchmarks/smtp_accept.py --servers aiosmtpd --concurrency 10 --json out.json

Reference figures (from the issue), on this kind of 2-core machine: Postfix ~520-600
durable msg/s at C=10..50; aiosmtpd with fsync ~440-490 msg/s.  mx's target is 2x that,
with p99 < 100 ms at C=50.  Figures are noisy on a shared VM: compare within one run.
"""
import argparse, asyncio, json, os, shutil, signal, socket, subprocess, sys, tempfile, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLK_TCK = os.sysconf("SC_CLK_TCK")
RCPT = "bench@example.test"
SENDER = "sender@client.example"

# --- Servers under test ----------------------------------------------------------------

MX_TOML = """\
hostname = "mx.example.test"
data_dir = "data"
local_domains = ["example.test"]
postmaster = "postmaster@example.test"
[listen]
smtp = "tcp:{port}:interface=127.0.0.1"
submission = ""
submissions = ""
pop3 = ""
pop3s = ""
imap = ""
imaps = ""
[limits]
max_connections_per_ip = 1000
"""

AIOSMTPD_SERVER = r'''
import asyncio, itertools, os, socket, sys, time
from email.utils import formatdate
from aiosmtpd.smtp import SMTP

port, maildir = int(sys.argv[1]), sys.argv[2]
for sub in ("tmp", "new", "cur"):
    os.makedirs(os.path.join(maildir, sub), exist_ok=True)
seq = itertools.count()  # next() on itertools.count is atomic under the GIL
host = socket.gethostname()

def deliver(sender, helo, peer, data):
    # Same durability discipline as mx: write to tmp/, fsync, link into new/, fsync new/.
    name = "%.6f.P%dQ%d.%s" % (time.time(), os.getpid(), next(seq), host)
    tmp, new = os.path.join(maildir, "tmp", name), os.path.join(maildir, "new", name)
    head = ("Return-Path: <%s>\r\nReceived: from %s ([%s]) by bench.example.test "
            "with ESMTP; %s\r\n" % (sender, helo, peer, formatdate())).encode()
    with open(tmp, "xb") as f:
        f.write(head + data)
        f.flush()
        os.fsync(f.fileno())
    os.link(tmp, new)
    os.unlink(tmp)
    dfd = os.open(os.path.dirname(new), os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)

class Handler:
    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content or envelope.content
        # fsync in the default thread pool so the event loop keeps serving other sessions
        await asyncio.get_running_loop().run_in_executor(
            None, deliver, envelope.mail_from, session.host_name, session.peer[0], data)
        return "250 OK"

async def main():
    handler = Handler()
    server = await asyncio.get_running_loop().create_server(lambda: SMTP(
        handler, hostname="bench.example.test", data_size_limit=64 << 20,
        enable_SMTPUTF8=False), "127.0.0.1", port)
    async with server:
        await server.serve_forever()

asyncio.run(main())
'''


def free_port():
    # Bind to port 0 and release it; a tiny race with other processes is acceptable here.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def count_files(path):
    try:
        return len(os.listdir(path))
    except FileNotFoundError:
        return 0


class Server:
    """A server subprocess in its own temp dir; subclasses define the command line."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="smtp_accept_%s_" % self.name)
        self.port = free_port()
        self.env = dict(os.environ)
        # Let the subprocess import mx (and find twisted/plugins/mx_plugin.py) from this
        # checkout even without `pip install -e`.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
        self.proc = None
        self.log_path = os.path.join(self.tmp, "server.log")
        open(self.log_path, "wb").close()
        self.maildir_new = os.path.join(self.tmp, self.maildir)

    def prepare(self):
        pass

    def start(self, ready_timeout=30.0):
        self.prepare()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.tmp, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s during startup:\n%s"
                                   % (self.name, self.proc.returncode, self.log_tail()))
            try:
                # Ready = port accepts and a 220 greeting arrives.
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("%s not ready after %.0fs:\n%s"
                           % (self.name, ready_timeout, self.log_tail()))

    def cpu_seconds(self):
        # Fields 14 and 15 (utime, stime, all threads) of /proc/<pid>/stat; split after
        # the ")" of the command name, which may contain spaces.  NaN if the server died.
        try:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError):
            return float("nan")

    def status_mib(self, field):
        """A memory figure of the server from /proc/<pid>/status (VmHWM, VmRSS), in MiB."""
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith(field + ":"))
        except (OSError, StopIteration):
            return float("nan")

    def peak_rss_mib(self):
        return self.status_mib("VmHWM")

    def log_tail(self, n=4000):
        return open(self.log_path, "rb").read()[-n:].decode("utf-8", "replace")

    def log_errors(self):
        """Lines of the server log that look like trouble (shown after each run)."""
        keys = ("Traceback", "Error", "error", "Unhandled", "CRITICAL", "WARNING")
        return [l for l in self.log_tail(1 << 24).splitlines() if any(k in l for k in keys)]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


class MxServer(Server):
    name = "mx"
    maildir = "data/mail/example.test/bench/new"

    def prepare(self):
        self.config = os.path.join(self.tmp, "mx.toml")
        with open(self.config, "w") as f:
            f.write(MX_TOML.format(port=self.port))
        # = `mx --config ... user add`, but with this interpreter (no PATH/shim surprises).
        cmd = [sys.executable, "-c", "import sys; from mx.cli import main; sys.exit(main())"]
        r = subprocess.run(cmd + ["--config", self.config, "user", "add", RCPT],
                           input=b"pw\n", cwd=self.tmp, env=self.env,
                           capture_output=True, timeout=60)
        if r.returncode:
            raise RuntimeError("mx user add failed (%d): %s"
                               % (r.returncode, (r.stdout + r.stderr).decode()[-2000:]))

    def command(self):
        # twistd's entry point run in-process rather than the `twistd` script: no pyenv
        # shim in between, so Popen's pid is the server's and /proc figures are its own.
        # (Not `python -m twisted`: that is the `twist` runner, which rejects -n.)
        # MX_PROFILE=/tmp/prof: profile the reactor thread with cProfile (twistd --profile)
        prof = os.environ.get("MX_PROFILE")
        extra = [f"--profile={prof}.{os.getpid()}.{time.time():.0f}", "--profiler=cprofile", "--savestats"] if prof else []
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile", "", *extra, "mx", "--config", self.config]


class AiosmtpdServer(Server):
    name = "aiosmtpd"
    maildir = "maildir/new"

    def command(self):
        maildir = os.path.dirname(self.maildir_new)
        return [sys.executable, "-c", AIOSMTPD_SERVER, str(self.port), maildir]


SERVERS = {"mx": MxServer, "aiosmtpd": AiosmtpdServer}

# --- Load generator --------------------------------------------------------------------


def make_message(size):
    """An RFC 5322 message of about `size` bytes: a few headers, 76-char CRLF lines,
    already terminated with CRLF.CRLF.  No line starts with '.', so no dot-stuffing."""
    head = ("From: Bench <%s>\r\nTo: <%s>\r\nSubject: smtp_accept benchmark\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench@client.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            % (SENDER, RCPT)).encode()
    text = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 " * 3
    nlines = max(0, size - len(head) + 77) // 78  # 76 chars + CRLF per line
    return head + b"".join(text[i % 64:i % 64 + 76] + b"\r\n" for i in range(nlines)) + b".\r\n"


async def read_reply(reader):
    """Read one (possibly multi-line) reply; return (code, full text)."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed by server")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines).decode("latin-1").strip()


async def client(port, message, budget, stats):
    """One connection: send messages while the shared budget lasts."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        code, text = await read_reply(reader)
        if code != 220:
            raise ConnectionError("greeting: " + text)
        writer.write(b"EHLO client.example\r\n")
        code, text = await read_reply(reader)
        if code != 250:
            raise ConnectionError("EHLO: " + text)
        pipelining = "PIPELINING" in text.upper()
        stats["pipelining"] = pipelining
        envelope = [b"MAIL FROM:<%s>\r\n" % SENDER.encode(),
                    b"RCPT TO:<%s>\r\n" % RCPT.encode(), b"DATA\r\n"]
        while budget[0] > 0:
            budget[0] -= 1  # claim a message; single-threaded, so no lock needed
            t0 = time.perf_counter()
            codes = []
            if pipelining:
                writer.write(b"".join(envelope))
                for _ in envelope:
                    codes.append(await read_reply(reader))
            else:
                for cmd in envelope:
                    writer.write(cmd)
                    codes.append(await read_reply(reader))
                    if codes[-1][0] >= 400:
                        break
            if codes[-1][0] == 354:
                writer.write(message)
                codes.append(await read_reply(reader))
            if [c for c, _ in codes] == [250, 250, 354, 250]:
                stats["latencies"].append(time.perf_counter() - t0)
                stats["ok"] += 1
            else:
                stats["errors"].append(" | ".join(t for _, t in codes))
                writer.write(b"RSET\r\n")
                await read_reply(reader)
        writer.write(b"QUIT\r\n")
        await read_reply(reader)
    finally:
        writer.close()


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100.0 * len(sorted_values)))]


async def load(port, message, n, concurrency, timeout):
    budget = [n]
    stats = {"ok": 0, "latencies": [], "errors": [], "pipelining": None, "aborted": False}
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(client(port, message, budget, stats))
             for _ in range(concurrency)]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    stats["elapsed"] = time.perf_counter() - t0
    if pending:
        stats["aborted"] = True
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for t in done:
        if t.exception() is not None:  # a dead connection: its in-flight message is lost
            stats["errors"].append("client: %r" % t.exception())
    return stats


def run_one(server_cls, size, concurrency, n, timeout):
    """One fresh server process + one load run; returns a result dict."""
    res = {"server": server_cls.name, "size": size, "concurrency": concurrency,
           "messages": n}
    srv = server_cls()
    try:
        srv.start()
        cpu0 = srv.cpu_seconds()
        client_cpu0 = time.process_time()
        stats = asyncio.run(load(srv.port, make_message(size), n, concurrency, timeout))
        client_cpu = time.process_time() - client_cpu0
        # A server may move mail into the Maildir after the 250 (e.g. from a queue): wait
        # (bounded) for the files to show up, and read CPU only then so that work counts.
        deadline = time.monotonic() + 15
        while count_files(srv.maildir_new) < stats["ok"] and time.monotonic() < deadline:
            time.sleep(0.1)
        files = count_files(srv.maildir_new)
        # Cheap content check: every stored file must hold at least the whole message.
        short = sum(1 for e in os.scandir(srv.maildir_new) if e.stat().st_size < size - 3) \
            if files else 0
        cpu = srv.cpu_seconds() - cpu0
        if srv.proc.poll() is not None:
            stats["errors"].append("server exited with code %s" % srv.proc.returncode)
        lat = sorted(stats["latencies"])
        ok = stats["ok"]
        res.update(
            ok=ok, failures=n - ok, aborted=stats["aborted"], errors=stats["errors"][:100],
            error_count=len(stats["errors"]),
            elapsed_s=stats["elapsed"], msgs_per_s=ok / stats["elapsed"],
            p50_ms=percentile(lat, 50) * 1e3, p99_ms=percentile(lat, 99) * 1e3,
            max_ms=(lat[-1] * 1e3 if lat else float("nan")),
            server_cpu_s=cpu, cpu_s_per_1k=cpu / ok * 1000 if ok else float("nan"),
            client_cpu_s_per_1k=client_cpu / ok * 1000 if ok else float("nan"),
            peak_rss_mib=srv.peak_rss_mib(), maildir_files=files, short_files=short,
            pipelining=stats["pipelining"])
    except Exception as e:  # report and go on with the other runs
        res.update(ok=0, failures=n, aborted=True, errors=[str(e)], msgs_per_s=0.0)
    finally:
        srv.stop()
        res["log_errors"] = srv.log_errors()[:20]
        srv.cleanup()
    return res


# --- Reporting ---------------------------------------------------------------------------


def describe(r):
    """One progress line per run (stderr), including anything that went wrong."""
    if "p50_ms" not in r:
        return "%-8s size=%-6d C=%-3d FAILED: %s" % (r["server"], r["size"],
                                                    r["concurrency"], r["errors"][0][:2000])
    s = ("%-8s size=%-6d C=%-3d %7.1f msg/s  p50 %6.1f ms  p99 %6.1f ms  "
         "cpu/1k %5.2f s  rss %5.1f MiB  client cpu/1k %5.2f s  pipelining=%s"
         % (r["server"], r["size"], r["concurrency"], r["msgs_per_s"], r["p50_ms"],
            r["p99_ms"], r["cpu_s_per_1k"], r["peak_rss_mib"], r["client_cpu_s_per_1k"],
            r["pipelining"]))
    if r["aborted"]:
        s += "\n    ABORTED by timeout after %.1f s: %d of %d messages got 250" % (
            r["elapsed_s"], r["ok"], r["messages"])
    if r["errors"]:
        s += "\n    %d FAILURES: %s" % (r["error_count"], "\n      ".join(r["errors"][:5]))
    # After an abort, messages cut off between fsync and 250 may legitimately be on disk.
    if r["maildir_files"] < r["ok"] or (r["maildir_files"] != r["ok"] and not r["aborted"]):
        s += "\n    WARNING: %d files in Maildir new/ but %d messages got 250" % (
            r["maildir_files"], r["ok"])
    if r["short_files"]:
        s += "\n    WARNING: %d files in Maildir new/ are shorter than the message sent" % (
            r["short_files"])
    for line in r["log_errors"][:5]:
        s += "\n    server log: " + line[:300]
    return s


def table(results, servers):
    by_key = {(r["server"], r["size"], r["concurrency"]): r for r in results}
    rows = sorted({(r["size"], r["concurrency"]) for r in results})
    cols = ("msg/s", "p50 ms", "p99 ms", "CPU/1k", "RSS MiB")
    group = len(cols) * 9  # each cell is " %8s"
    both = "mx" in servers and "aiosmtpd" in servers
    top = "%12s" % "" + "".join(" " + (" %s " % s).center(group - 1, "-") for s in servers)
    head = "%7s %4s" % ("size", "C") + "".join(
        "".join(" %8s" % c for c in cols) for _ in servers)
    if both:
        head += " %8s" % "mx/aio"
    out = [top, head, "-" * len(head)]
    for size, c in rows:
        line = "%7s %4d" % ("%dK" % (size // 1024) if size >= 1024 else size, c)
        for s in servers:
            r = by_key.get((s, size, c))
            if not r or "p50_ms" not in r:
                line += " %8s" % "FAILED" + " %8s" % "" * (len(cols) - 1)
                continue
            mark = "!" if r["aborted"] or r["failures"] else ""  # ! = aborted or failures
            line += " %8s %8.1f %8.1f %8.2f %8.1f" % (
                "%.1f%s" % (r["msgs_per_s"], mark), r["p50_ms"], r["p99_ms"],
                r["cpu_s_per_1k"], r["peak_rss_mib"])
        if both:
            a, b = by_key.get(("mx", size, c)), by_key.get(("aiosmtpd", size, c))
            ok = all(x and "p50_ms" in x and x["msgs_per_s"] for x in (a, b))
            line += " %8s" % ("%.2f" % (a["msgs_per_s"] / b["msgs_per_s"]) if ok else "-")
        out.append(line)
    out.append("CPU/1k = server CPU s per 1,000 msgs; RSS = peak VmHWM; "
               "! = run aborted or had failures")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]
    ap.add_argument("--servers", default="mx,aiosmtpd")
    ap.add_argument("--concurrency", type=ints, default=None, help="default 1,10,50")
    ap.add_argument("--messages", type=int, default=None, help="default 2000")
    ap.add_argument("--sizes", type=ints, default=None, help="default 4096,102400")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    ap.add_argument("--quick", action="store_true",
                    help="300 messages, C=1,10, 4 KiB only (explicit flags still win)")
    ap.add_argument("--json", metavar="PATH", help="dump raw results as JSON")
    a = ap.parse_args()
    conc = a.concurrency or ([1, 10] if a.quick else [1, 10, 50])
    n = a.messages or (300 if a.quick else 2000)
    sizes = a.sizes or ([4096] if a.quick else [4096, 102400])
    servers = [s for s in a.servers.split(",") if s]
    if set(servers) - set(SERVERS):
        ap.error("unknown server in %r (choose from %s)" % (a.servers, ", ".join(SERVERS)))

    results = []
    # Interleave servers within each (size, C) so slow drift of the machine (page cache,
    # disk) affects both sides alike.  Fresh server process per (server, size, C): clean
    # peak RSS and an empty Maildir for every run.
    for size in sizes:
        for c in conc:
            for s in servers:
                r = run_one(SERVERS[s], size, c, n, a.timeout)
                results.append(r)
                print(describe(r), file=sys.stderr, flush=True)
    print()
    print("%d messages per run, %s" % (n, time.strftime("%Y-%m-%d %H:%M")))
    print(table(results, servers))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    bad = any(r["failures"] or r["aborted"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
