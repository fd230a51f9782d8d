#!/usr/bin/env python3
"""POP3 benchmark: mx against Dovecot's pop3 on identical copies of one Maildir, side by side.

What it measures, for each server on its own copy of the same INBOX (N messages of 4 KiB,
generated straight into `new/` with mx's own file-name format, `<time>.M..P..Q..R...<host>,S=<size>`):

  login+STAT+UIDL, 1st   USER/PASS, STAT, UIDL, QUIT in a fresh session on the untouched
                         Maildir: includes the server's UID assignment (the `dovecot-uidlist`
                         both write) and whatever else a first look costs (Dovecot: its index
                         and cache, and reading every message to learn its CRLF size).
  login+STAT+UIDL, 2nd   the same again: the warm case a POP3 client polling every few minutes sees.
  RETR all               one session: login, RETR 1..N, QUIT (no DELE; both servers mark each
                         retrieved message \\Seen by renaming its file: Dovecot's default,
                         mx's `pop3.mark_seen = true`, set here).
                         The client sends one RETR at a time by default (a round trip per
                         message, as fetchmail and getmail do; see WINDOW for why), or keeps
                         `--window N` in flight if the server lists PIPELINING; every response
                         is checked (+OK, size = LIST size, the terminating dot).

Per step: wall time (ms), msg/s (RETR), server CPU seconds per 1,000 messages (utime+stime
from /proc; for Dovecot summed over its master, the processes it has reaped, and every live
process of its session: auth, login, pop3, ...), and peak RSS (mx: VmHWM; Dovecot: the largest
sum of VmRSS over its processes, sampled every 20 ms). The table puts mx and Dovecot side by
side with the mx/Dovecot ratio of the times (< 1 means mx is faster).

Servers: mx runs as `twistd -n --pidfile '' mx --config <tmp>/mx/mx.toml` with only
`listen.pop3` on a free loopback port and a users file written with `mx.users`. Dovecot is
Debian's, started privately by tests/dovecot.py (own config dir, base_dir, logs and ports;
`mail_location = maildir:<tmp>/dovecot/mail/%d/%n`; never the system service), and it checks
passwords in the same users file (ARGON2ID), so a login costs both one argon2id hash. As root,
Dovecot's mail processes run as nobody, so its copy is chowned to nobody first. Each server runs
alone (one after the other), on a machine the benchmark shares with nothing else it starts.

How to run:
    python3 benchmarks/pop3.py                   # 10,000 messages of 4 KiB, both servers
    python3 benchmarks/pop3.py --quick           # 1,000 messages (a few seconds)
    python3 benchmarks/pop3.py --big             # 100,000 messages (about 800 MB on disk, two copies)
    python3 benchmarks/pop3.py --servers dovecot --messages 20000 --json out.json

Exit status 1 if a server failed to start or answered wrongly (mx's POP3 not there yet
counts: the message says so, and Dovecot's figures are still printed).
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CLK_TCK = os.sysconf("SC_CLK_TCK")
USER = "bench@example.test"
PASSWORD = "bench-password"
SIZE = 4096
# RETRs in flight. 1 (no pipelining, a round trip per message, as fetchmail, getmail and
# Thunderbird retrieve) by default: Dovecot 2.3.19's pop3, given several pipelined RETRs, now and
# then stops answering with commands still in its input buffer (it logs "Inactivity - no input"
# after 10 minutes) -- seen at windows 16 and 32 here; `--window N` pipelines anyway.
WINDOW = 1
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
pop3 = "tcp:{port}:interface=127.0.0.1"
pop3s = ""
imap = ""
imaps = ""
[auth]
users_file = "{users}"
[limits]
max_connections_per_ip = 1000
[pop3]
mark_seen = true  # what Dovecot does by default: RETR renames the file to :2,S
"""


# --- the Maildir --------------------------------------------------------------------------


def make_message(n):
    """A message of exactly SIZE bytes with CRLF lines, as mx stores it (trace headers first).
    No line starts with ".", so RETR's dot-stuffing costs nothing but the scan."""
    head = ("Return-Path: <sender@client.example>\r\n"
            "Received: from client.example ([127.0.0.1]) by mx.example.test with ESMTP id b%07d;\r\n"
            "\tThu, 01 Jan 2026 00:00:00 +0000\r\n"
            "From: Bench <sender@client.example>\r\nTo: <%s>\r\nSubject: pop3 benchmark %d\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench-%d@client.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            % (n, USER, n, n)).encode()
    text = b"abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 " * 3
    body = bytearray()
    i = 0
    while len(head) + len(body) + 78 <= SIZE:
        body += text[i % 64:i % 64 + 76] + b"\r\n"
        i += 1
    rest = SIZE - len(head) - len(body)
    if rest >= 2:
        body += b"x" * (rest - 2) + b"\r\n"
    data = head + bytes(body)
    assert len(data) == SIZE, len(data)
    return data


def generate(box, n):
    """N messages into `<box>/new/`, named as mx names them, in arrival order (1 ms apart)."""
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(box, sub), exist_ok=True)
    t0 = int(time.time()) - n // 1000 - 10
    pid = os.getpid()
    new = os.path.join(box, "new")
    for i in range(n):
        sec, usec = t0 + i // 1000, (i % 1000) * 1000
        name = "%d.M%dP%dQ%dR%08x.%s,S=%d,W=%d" % (sec, usec, pid, i, i * 2654435761 % (1 << 32), HOST, SIZE, SIZE)
        with open(os.path.join(new, name), "wb") as f:
            f.write(make_message(i))


# --- a small blocking POP3 client ---------------------------------------------------------


class POP3Error(Exception):
    pass


class Client:
    """Plain socket, one big receive buffer; responses parsed with bytes.find."""

    def __init__(self, port, timeout):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = bytearray()
        self.pos = 0
        self.line()  # greeting

    def _fill(self):
        data = self.sock.recv(1 << 18)
        if not data:
            raise POP3Error("connection closed by the server")
        if self.pos > (1 << 20):
            del self.buf[:self.pos]
            self.pos = 0
        self.buf += data

    def line(self):
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                out = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                if not out.startswith(b"+OK"):
                    raise POP3Error(out.decode("latin-1"))
                return out
            self._fill()

    def multi(self):
        """A multi-line response after its +OK line: the body up to (not including) the final
        ".\\r\\n", still dot-stuffed."""
        first = self.line()
        start = self.pos
        if self.buf.startswith(b".\r\n", start):
            self.pos = start + 3
            return first, b""
        scan = start - 2  # the +OK line's CRLF may begin the terminator
        while True:
            i = self.buf.find(b"\r\n.\r\n", scan)
            if i >= 0:
                body = bytes(self.buf[start:i + 2])
                self.pos = i + 5
                return first, body
            scan = max(scan, len(self.buf) - 4)
            self._fill()

    def send(self, data):
        self.sock.sendall(data)

    def command(self, cmd):
        self.send(cmd + b"\r\n")
        return self.line()

    def login(self):
        self.command(b"USER " + USER.encode())
        self.command(b"PASS " + PASSWORD.encode())

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def session_stat_uidl(port, n, timeout):
    c = Client(port, timeout)
    try:
        c.login()
        stat = c.command(b"STAT").split()
        if int(stat[1]) != n:
            raise POP3Error("STAT says %s messages, expected %d" % (stat[1].decode(), n))
        c.send(b"UIDL\r\n")
        _, body = c.multi()
        uidls = [line.split(b" ", 1)[1] for line in body.split(b"\r\n") if line]
        if len(uidls) != n:
            raise POP3Error("UIDL listed %d messages, expected %d" % (len(uidls), n))
        c.command(b"QUIT")
        return [u.decode() for u in uidls]
    finally:
        c.close()


def session_retr_all(port, n, timeout):
    c = Client(port, timeout)
    try:
        c.login()
        c.send(b"CAPA\r\n")
        _, capa = c.multi()
        pipelining = b"PIPELINING" in capa.upper()
        c.send(b"LIST\r\n")
        _, body = c.multi()
        sizes = [int(line.split()[1]) for line in body.split(b"\r\n") if line]
        if len(sizes) != n:
            raise POP3Error("LIST has %d messages, expected %d" % (len(sizes), n))
        window = WINDOW if pipelining else 1
        sent = got = total = 0
        while got < n:
            if sent < n and sent - got < window:
                batch = []
                while sent < n and sent - got + len(batch) < window:
                    batch.append(b"RETR %d\r\n" % (sent + len(batch) + 1))
                c.send(b"".join(batch))
                sent += len(batch)
            _, data = c.multi()
            got += 1
            # Dot-stuffing: no line of ours starts with ".", so the bytes are the file's.
            if len(data) != sizes[got - 1]:
                raise POP3Error("RETR %d: %d bytes, LIST said %d" % (got, len(data), sizes[got - 1]))
            total += len(data)
        c.command(b"QUIT")
        return {"pipelining": pipelining, "bytes": total}
    finally:
        c.close()


# --- process figures -------------------------------------------------------------------------


def _stat_fields(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_of(pid, children=True):
    """utime+stime (+ cutime+cstime of reaped children) of one process, in seconds."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def session_pids(sid):
    """Every live process whose session id is `sid` (Dovecot's master leads its own session)."""
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


class Server:
    name = "?"

    def __init__(self, tmp):
        self.tmp = tmp
        self.proc = None
        self.port = None

    def cpu(self):
        raise NotImplementedError

    def rss_mib(self):
        raise NotImplementedError

    def log_tail(self):
        return ""


class MxServer(Server):
    name = "mx"

    def start(self, n, timeout):
        try:
            import mx.pop3server  # noqa: F401
        except ImportError as e:
            raise RuntimeError("mx has no POP3 server yet (mx/pop3server.py: %s); run this again once "
                               "issue 8's POP3 lands" % e)
        from mx.users import hash_password, write_users
        from tests.dovecot import _free_port
        root = os.path.join(self.tmp, "mx")
        self.users = os.path.join(self.tmp, "users")
        self.port = _free_port()
        with open(os.path.join(root, "mx.toml"), "w") as f:
            f.write(MX_TOML.format(port=self.port, users=self.users))
        if not os.path.exists(self.users):
            write_users(Path(self.users), {USER: hash_password(PASSWORD)})
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
        self.log = os.path.join(root, "twistd.log")
        prof = os.environ.get("MX_PROFILE")
        extra = ["--profile=%s.%d.%.0f" % (prof, os.getpid(), time.time()), "--profiler=cprofile",
                 "--savestats"] if prof else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile", "",
                 *extra, "mx", "--config", os.path.join(root, "mx.toml")],
                cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_greeting(self, timeout)

    def cpu(self):
        return cpu_of(self.proc.pid)

    def rss_mib(self):
        return status_kib(self.proc.pid, "VmHWM") / 1024.0

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self):
        try:
            return open(self.log, "rb").read()[-3000:].decode("utf-8", "replace")
        except OSError:
            return ""


class DovecotServer(Server):
    name = "dovecot"

    def start(self, n, timeout):
        from tests.dovecot import dovecot_available, launch
        reason = dovecot_available()
        if reason:
            raise RuntimeError("Dovecot not available: %s" % reason)
        from mx.users import hash_password, write_users
        self.users = os.path.join(self.tmp, "users")
        if not os.path.exists(self.users):
            write_users(Path(self.users), {USER: hash_password(PASSWORD)})
        root = Path(self.tmp) / "dovecot"
        self.instance = launch(root / "run", root / "mail", {USER: PASSWORD}, users_file=Path(self.users),
                               timeout=timeout)
        self.instance.hand_over()
        self.proc = self.instance.process
        self.port = self.instance.pop3_port
        self._peak = 0
        self._stop_sampler = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self):
        while not self._stop_sampler.wait(0.02):
            total = sum(status_kib(p, "VmRSS") for p in session_pids(self.proc.pid))
            self._peak = max(self._peak, total)

    def cpu(self):
        total = cpu_of(self.proc.pid)
        for pid in session_pids(self.proc.pid):
            if pid != self.proc.pid:
                try:
                    total += cpu_of(pid)
                except OSError:
                    pass  # exited meanwhile: its CPU moves into the master's cutime when reaped
        return total

    def rss_mib(self):
        return self._peak / 1024.0

    def stop(self):
        if getattr(self, "_sampler", None):
            self._stop_sampler.set()
            self._sampler.join(5)
        if getattr(self, "instance", None):
            self.instance.stop()

    def log_tail(self):
        return self.instance.log(3000) if getattr(self, "instance", None) else ""


def wait_greeting(server, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError("%s exited with %s during start-up:\n%s"
                               % (server.name, server.proc.returncode, server.log_tail()))
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                if s.getsockname() != s.getpeername() and s.recv(64).startswith(b"+OK"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("%s gave no +OK greeting within %.0f s:\n%s" % (server.name, timeout, server.log_tail()))


# --- one server's run -------------------------------------------------------------------------


STEPS = (("uidl1", "login+STAT+UIDL, 1st"), ("uidl2", "login+STAT+UIDL, 2nd"), ("retr", "RETR all"))


def run_server(cls, tmp, n, timeout):
    res = {"server": cls.name, "messages": n, "steps": {}, "error": None}
    srv = cls(tmp)
    try:
        srv.start(n, 60.0)
        time.sleep(0.3)  # let start-up work settle before the first CPU reading
        for key, fn in (("uidl1", session_stat_uidl), ("uidl2", session_stat_uidl), ("retr", session_retr_all)):
            cpu0, c0, t0 = srv.cpu(), time.process_time(), time.perf_counter()
            out = fn(srv.port, n, timeout)
            wall = time.perf_counter() - t0
            time.sleep(0.1)  # Dovecot: let the session's pop3 process exit and be reaped
            cpu = srv.cpu() - cpu0
            step = {"wall_s": wall, "server_cpu_s": cpu, "cpu_s_per_1k": cpu / n * 1000,
                    "client_cpu_s": time.process_time() - c0, "msgs_per_s": n / wall}
            if key == "retr":
                step.update(out)
            else:
                res.setdefault("uidls", out)
            res["steps"][key] = step
            print("%-8s %-22s %9.1f ms %9.0f msg/s  cpu/1k %6.3f s  client cpu %5.2f s"
                  % (cls.name, dict(STEPS)[key], wall * 1e3, n / wall, step["cpu_s_per_1k"], step["client_cpu_s"]),
                  file=sys.stderr, flush=True)
        res["peak_rss_mib"] = srv.rss_mib()
    except Exception as e:  # report and go on with the other server
        res["error"] = "%s: %s" % (type(e).__name__, e)
        tail = srv.log_tail() if srv.proc else ""
        print("%-8s FAILED: %s%s" % (cls.name, res["error"], ("\n  log: " + tail[-1500:]) if tail else ""),
              file=sys.stderr, flush=True)
    finally:
        srv.stop()
    return res


def table(results):
    by = {r["server"]: r for r in results}
    names = [r["server"] for r in results]
    both = "mx" in by and "dovecot" in by and not by["mx"]["error"] and not by["dovecot"]["error"]
    cols = ("ms", "msg/s", "CPU/1k")
    head = "%-22s" % "step" + "".join("".join(" %9s" % c for c in cols) for _ in names)
    top = "%-22s" % "" + "".join(" " + (" %s " % s).center(len(cols) * 10 - 1, "-") for s in names)
    if both:
        head += " %9s %9s" % ("mx/dc t", "mx/dc cpu")
    out = [top, head, "-" * len(head)]
    for key, label in STEPS:
        line = "%-22s" % label
        for s in names:
            st = by[s]["steps"].get(key)
            if not st:
                line += " %9s" % "FAILED" + " %9s" % "" * (len(cols) - 1)
                continue
            line += " %9.1f %9.0f %9.3f" % (st["wall_s"] * 1e3, st["msgs_per_s"], st["cpu_s_per_1k"])
        if both:
            a, b = by["mx"]["steps"][key], by["dovecot"]["steps"][key]
            line += " %9.2f %9.2f" % (a["wall_s"] / b["wall_s"],
                                      a["server_cpu_s"] / b["server_cpu_s"] if b["server_cpu_s"] else float("nan"))
        out.append(line)
    line = "%-22s" % "peak RSS MiB"
    for s in names:
        rss = by[s].get("peak_rss_mib")
        line += (" %9.1f" % rss if rss is not None else " %9s" % "-") + " %9s" % "" * (len(cols) - 1)
    out.append(line)
    out.append("ms = wall time of the session; msg/s = messages / that time; CPU/1k = server CPU s per "
               "1,000 messages; mx/dc = mx / Dovecot (< 1: mx faster or cheaper)")
    return "\n".join(out)


def _interrupted(signum, frame):
    # A SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C: the servers and the temp folder go too.
    raise KeyboardInterrupt


def main():
    global WINDOW
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--servers", default="mx,dovecot")
    ap.add_argument("--messages", type=int, default=None, help="default 10,000")
    ap.add_argument("--big", action="store_true", help="100,000 messages")
    ap.add_argument("--quick", action="store_true", help="1,000 messages")
    ap.add_argument("--timeout", type=float, default=60.0, help="socket timeout (seconds without a byte)")
    ap.add_argument("--window", type=int, default=WINDOW, help="RETRs in flight (1: no pipelining)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    ap.add_argument("--json", metavar="PATH", help="dump raw results as JSON")
    a = ap.parse_args()
    WINDOW = max(1, a.window)
    signal.signal(signal.SIGTERM, _interrupted)
    n = a.messages or (100_000 if a.big else 1_000 if a.quick else 10_000)
    servers = [s for s in a.servers.split(",") if s]
    classes = {"mx": MxServer, "dovecot": DovecotServer}
    if set(servers) - set(classes):
        ap.error("unknown server in %r (choose from mx, dovecot)" % a.servers)

    tmp = tempfile.mkdtemp(prefix="pop3_bench_")
    os.chmod(tmp, 0o755)  # Dovecot's mail processes (nobody, when run as root) must reach their copy
    results = []
    try:
        t0 = time.perf_counter()
        first = os.path.join(tmp, "mx", "data", "mail", "example.test", "bench")
        generate(first, n)
        if "dovecot" in servers:
            copy = os.path.join(tmp, "dovecot", "mail", "example.test", "bench")
            shutil.copytree(first, copy)
        print("generated %d messages of %d bytes (two copies) in %.1f s under %s"
              % (n, SIZE, time.perf_counter() - t0, tmp), file=sys.stderr, flush=True)
        for s in servers:
            results.append(run_server(classes[s], tmp, n, a.timeout))
        ok = [r for r in results if not r["error"] and "uidls" in r]
        if len(ok) == 2:  # same files, same arrival order: the same UIDs (UIDVALIDITY differs)
            same = sum(1 for x, y in zip(ok[0]["uidls"], ok[1]["uidls"]) if x[:8].lower() == y[:8].lower())
            print("UIDs in UIDL order agree for %d of %d messages" % (same, n), file=sys.stderr)
    finally:
        if a.keep:
            print("kept %s" % tmp, file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("%d messages of %d bytes, %s" % (n, SIZE, time.strftime("%Y-%m-%d %H:%M")))
    print(table(results))
    for r in results:
        if r["error"]:
            print("%s: %s" % (r["server"], r["error"].splitlines()[0]))
    if a.json:
        for r in results:
            r.pop("uidls", None)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if any(r["error"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
