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
    python3 benchmarks/smtp_accept.py --mailauth --sizes 4096 --concurrency 10,50
    python3 benchmarks/smtp_accept.py --shape internet           # mx vs Postfix, 4 points
    python3 benchmarks/smtp_accept.py --shape internet --servers postfix --concurrency 50

--mailauth (issue 10): mx twice per (size, C), inbound checks off ("mx-off": spf = dkim =
dmarc = arc = false) and on ("mx-on": the default [mailauth], skip_networks = [] so that the
127.0.0.1 client is checked), against a loopback twisted.names server (a subprocess) that
serves client.example's SPF (`v=spf1 ip4:127.0.0.1 -all`), DKIM (RSA-2048 at
sel._domainkey) and DMARC (`p=reject`) records, TTL 1 h.  The load generator sends a pool of
distinct messages (--pool, 200) DKIM-signed with dkimpy (rsa-sha256, relaxed/relaxed) before
any timing, From: sender@client.example; before each timed run --warmup messages (C=1,
untimed, also for mx-off) warm mx's DNS cache.  After each run every delivered file is read:
mx-on's must all carry Authentication-Results with spf=pass, dkim=pass and dmarc=pass, and
mx-off's none.  The table adds on/off (throughput ratio) and cost % (1 - on/off).

--shape internet (issue 11): the internet's traffic shape, mx against a private Postfix.
The load is ../shared/tools/smtp_load.py itself, run as a subprocess per run (`-k 1`: one
message per connection, connect + EHLO + MAIL + RCPT + DATA + QUIT, no PIPELINING, one
command per round trip; `-u 10`: recipients cycle over user0..user9@example.test; `-r`
recipients per message, --rcpts, default 1 as in the issue's command).  Its JSON summary
gives msg/s, p50/p99 (MAIL sent to the 250 after the dot) and its own CPU.  Default points:
4 KiB at C = 1, 10, 50 and 100 KiB at C = 50 (--sizes/--concurrency give a cross product).
mx has the ten users; Postfix (Debian's, installed if missing: see postfix_peer.py) runs
from its own config_directory, queue_directory and data_directory in a temp dir, smtpd on a
free 127.0.0.1 port, virtual(8) delivery into Maildirs for the same ten addresses.  Postfix
queues before it delivers, so after the load the script waits (bounded, --deliver-timeout)
until every accepted message is a file in new/ and reads the CPU only then; "deliv s" is
that wait.  Postfix CPU is master plus all its processes (smtpd, cleanup, qmgr, virtual,
trivial-rewrite, postlogd, ...), the exited ones via master's cutime/cstime.

Reference figures (from the issue), on this kind of 2-core machine: Postfix ~520-600
durable msg/s at C=10..50; aiosmtpd with fsync ~440-490 msg/s.  mx's target is 2x that,
with p99 < 100 ms at C=50.  Figures are noisy on a shared VM: compare within one run.
"""
import argparse, asyncio, base64, json, os, re, shutil, signal, socket, subprocess, sys, tempfile, time

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


# --- --mailauth: a loopback DNS server and DKIM-signed messages ----------------------------

DKIM_DOMAIN, DKIM_SELECTOR = "client.example", "sel"
DNS_TTL = 3600

# argv: zone JSON ({"origin": ..., "txt": {name: [strings]}}), query log path.  Prints the
# port (UDP and TCP) on stdout once listening; writes "<name> <type>" per question to the log.
DNS_SERVER = r"""
import json, sys
from twisted.internet import reactor
from twisted.internet.error import CannotListenError
from twisted.names import authority, dns, server

zone = json.load(open(sys.argv[1]))
qlog = open(sys.argv[2], "a", buffering=1)
origin, ttl = zone["origin"].encode(), zone["ttl"]

class Zone(authority.FileAuthority):
    def __init__(self):
        super().__init__(None)

    def loadFile(self, _):
        soa = dns.Record_SOA(mname=b"ns." + origin, rname=b"root." + origin, serial=1,
                             refresh=ttl, retry=ttl, expire=ttl, minimum=ttl, ttl=ttl)
        self.soa = (origin, soa)
        self.records = {origin: [soa]}
        for name, strings in zone["txt"].items():
            self.records.setdefault(name.lower().encode(), []).append(
                dns.Record_TXT(*[x.encode() for x in strings], ttl=ttl))

class Factory(server.DNSServerFactory):
    noisy = False

    def handleQuery(self, message, protocol, address):
        for q in message.queries:
            qlog.write("%s %s\n" % (q.name.name.decode("latin-1").lower(),
                                    dns.QUERY_TYPES.get(q.type, q.type)))
        super().handleQuery(message, protocol, address)

factory = Factory(authorities=[Zone()])
udp = dns.DNSDatagramProtocol(controller=factory)
udp.noisy = False
for _ in range(50):  # TCP first: a failed UDP bind leaves `udp` unattached
    tcp = reactor.listenTCP(0, factory, interface="127.0.0.1")
    port = tcp.getHost().port
    try:
        reactor.listenUDP(port, udp, interface="127.0.0.1")
        break
    except CannotListenError:
        tcp.stopListening()
else:
    sys.exit("no port free for both UDP and TCP")
print(port, flush=True)
reactor.run()
"""


def txt_strings(value, width=250):
    """A TXT value as the <=255-octet character-strings a record holds."""
    return [value[i:i + width] for i in range(0, len(value), width)] or [""]


class MailAuthFixture:
    """The sending domain's key, its DNS server (a subprocess) and the signed message pool."""

    def __init__(self):
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        self.tmp = tempfile.mkdtemp(prefix="smtp_accept_dns_")
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.TraditionalOpenSSL,
                                             serialization.NoEncryption())
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        self.txt = {
            DKIM_DOMAIN: ["v=spf1 ip4:127.0.0.1 -all"],
            "%s._domainkey.%s" % (DKIM_SELECTOR, DKIM_DOMAIN):
                txt_strings("v=DKIM1; k=rsa; p=" + base64.b64encode(spki).decode()),
            "_dmarc." + DKIM_DOMAIN: ["v=DMARC1; p=reject"],
        }
        self.zone_path = os.path.join(self.tmp, "zone.json")
        with open(self.zone_path, "w") as f:
            json.dump({"origin": DKIM_DOMAIN, "ttl": DNS_TTL, "txt": self.txt}, f)
        self.qlog = os.path.join(self.tmp, "queries.log")
        open(self.qlog, "w").close()
        self.proc = None
        self.port = None

    def start(self):
        env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-c", DNS_SERVER, self.zone_path, self.qlog],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError("DNS server did not start (exit %s)" % self.proc.poll())
        self.port = int(line)
        self.check()

    def check(self):
        """Ask our server for each record with dnspython, as mx will (TCP too: big TXT)."""
        import dns.flags
        import dns.message
        import dns.query
        for name, strings in self.txt.items():
            q = dns.message.make_query(name, "TXT")
            r = dns.query.udp(q, "127.0.0.1", timeout=5, port=self.port)
            if r.flags & dns.flags.TC or not r.answer:
                r = dns.query.tcp(q, "127.0.0.1", timeout=5, port=self.port)
            got = [b"".join(rd.strings).decode() for rr in r.answer for rd in rr]
            if got != ["".join(strings)]:
                raise RuntimeError("DNS server answers %r for %s" % (got, name))

    def queries(self):
        """Questions the DNS server got so far (lines of its log)."""
        with open(self.qlog) as f:
            return [line.split() for line in f if line.strip()]

    def sign_pool(self, size, count):
        """`count` distinct messages of about `size` bytes, DKIM-signed, "."-terminated."""
        import dkim
        pool = []
        for i in range(count):
            raw = make_message(size, seq=i)[:-3]  # without the ".\r\n"
            sig = dkim.sign(raw, DKIM_SELECTOR.encode(), DKIM_DOMAIN.encode(), self.private_pem,
                            canonicalize=(b"relaxed", b"relaxed"),
                            include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                                             b"mime-version", b"content-type"])
            pool.append(sig + raw + b".\r\n")
        return pool

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)


AUTH_RESULTS = re.compile(rb"^Authentication-Results:(.*(?:\r?\n[ \t].*)*)", re.M | re.I)


def auth_results_of(path):
    """The Authentication-Results header values in the header of the file at `path`."""
    with open(path, "rb") as f:
        data = f.read(1 << 16)
    head = re.split(rb"\r?\n\r?\n", data, 1)[0]
    return [re.sub(rb"\s+", b" ", m.group(1)).strip().decode("latin-1")
            for m in AUTH_RESULTS.finditer(head)]


def auth_passes(values):
    """Whether one of the headers says spf=pass, dkim=pass and dmarc=pass."""
    return any(all(re.search(r"\b%s=pass\b" % k, v) for k in ("spf", "dkim", "dmarc"))
               for v in values)


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
    mailauth = None  # None: mx's defaults (loopback skipped); "on"/"off": see --mailauth
    dns_port = None  # set by main() for --mailauth: the loopback DNS server

    def cpu_seconds(self):
        """The main process and its SMTP workers (`smtp_workers`), each utime+stime."""
        from postfix_peer import descendants, proc_stat

        total = super().cpu_seconds()
        for pid in descendants(self.proc.pid):
            st = proc_stat(pid)
            if st:
                total += st[1] + st[2]
        return total

    def config_text(self):
        text = MX_TOML.format(port=self.port)
        if self.mailauth:
            text += '[dns]\nnameservers = ["127.0.0.1:%d"]\ntimeout = "5s"\n' % self.dns_port
            text += "[mailauth]\nskip_networks = []\n"  # check the 127.0.0.1 client too
            if self.mailauth == "off":
                text += "spf = false\ndkim = false\ndmarc = false\narc = false\n"
        return text

    def prepare(self):
        self.config = os.path.join(self.tmp, "mx.toml")
        with open(self.config, "w") as f:
            f.write(self.config_text())
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
        # MX_REACTOR=asyncio|uvloop: the reactor lever of issue 11 (Twisted's asyncio reactor,
        # on uvloop's event loop for `uvloop`); default: twistd's own choice (epoll)
        choice = os.environ.get("MX_REACTOR", "")
        boot = "from twisted.scripts.twistd import run; run()"
        if choice == "uvloop":
            boot = "import asyncio, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); " + boot
        if choice in ("asyncio", "uvloop"):
            extra = [*extra, "--reactor=asyncio"]
        return [sys.executable, "-c", boot, "-n", "--pidfile", "", *extra, "mx", "--config", self.config]


class AiosmtpdServer(Server):
    name = "aiosmtpd"
    maildir = "maildir/new"

    def command(self):
        maildir = os.path.dirname(self.maildir_new)
        return [sys.executable, "-c", AIOSMTPD_SERVER, str(self.port), maildir]


class MxChecksOn(MxServer):
    name = "mx-on"
    mailauth = "on"


class MxChecksOff(MxServer):
    name = "mx-off"
    mailauth = "off"


SERVERS = {"mx": MxServer, "aiosmtpd": AiosmtpdServer, "mx-on": MxChecksOn,
           "mx-off": MxChecksOff}

# --- Load generator --------------------------------------------------------------------


def make_message(size, seq=None):
    """An RFC 5322 message of about `size` bytes: a few headers, 76-char CRLF lines,
    already terminated with CRLF.CRLF.  No line starts with '.', so no dot-stuffing.
    With `seq`, the Message-ID and the first body line carry it (distinct messages)."""
    tag = "" if seq is None else ".%d" % seq
    head = ("From: Bench <%s>\r\nTo: <%s>\r\nSubject: smtp_accept benchmark%s\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <bench%s@client.example>\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n%s"
            % (SENDER, RCPT, tag, tag, "" if seq is None else "message %d\r\n" % seq)).encode()
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


async def client(port, messages, budget, stats):
    """One connection: send messages while the shared budget lasts (message i of the run
    is messages[i % len(messages)])."""
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
            message = messages[budget[0] % len(messages)]
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


async def load(port, messages, n, concurrency, timeout):
    budget = [n]
    stats = {"ok": 0, "latencies": [], "errors": [], "pipelining": None, "aborted": False}
    t0 = time.perf_counter()
    tasks = [asyncio.ensure_future(client(port, messages, budget, stats))
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


def check_auth_headers(srv, res):
    """--mailauth: read every delivered file; count those whose Authentication-Results say
    spf=pass dkim=pass dmarc=pass, and those with any Authentication-Results at all."""
    names = sorted(os.listdir(srv.maildir_new)) if os.path.isdir(srv.maildir_new) else []
    passing = with_header = 0
    sample = None
    for name in names:
        values = auth_results_of(os.path.join(srv.maildir_new, name))
        with_header += bool(values)
        passing += auth_passes(values)
        if values and (sample is None or not auth_passes(values)):
            sample = values  # the first failing one, else the first
    res.update(auth_files=len(names), auth_pass=passing, auth_header=with_header,
               auth_sample=sample)


def run_one(server_cls, size, concurrency, n, timeout, messages=None, warmup=0,
            fixture=None):
    """One fresh server process + one load run; returns a result dict.  `messages` is the
    pool to send (default: one plain message of `size`); `warmup` messages go first, C=1,
    outside the figures; with `fixture` (--mailauth) the delivered files' headers and the
    DNS questions asked during the timed run are recorded."""
    res = {"server": server_cls.name, "size": size, "concurrency": concurrency,
           "messages": n, "warmup": warmup}
    messages = messages or [make_message(size)]
    srv = server_cls()
    try:
        srv.start()
        if warmup:
            w = asyncio.run(load(srv.port, messages, warmup, 1, timeout))
            if w["ok"] != warmup:
                raise RuntimeError("warm-up: %d of %d got 250: %s"
                                   % (w["ok"], warmup, "; ".join(w["errors"][:3])))
        q0 = len(fixture.queries()) if fixture else 0
        cpu0 = srv.cpu_seconds()
        client_cpu0 = time.process_time()
        stats = asyncio.run(load(srv.port, messages, n, concurrency, timeout))
        client_cpu = time.process_time() - client_cpu0
        # A server may move mail into the Maildir after the 250 (e.g. from a queue): wait
        # (bounded) for the files to show up, and read CPU only then so that work counts.
        deadline = time.monotonic() + 15
        while count_files(srv.maildir_new) < stats["ok"] + warmup and time.monotonic() < deadline:
            time.sleep(0.1)
        files = count_files(srv.maildir_new) - warmup
        if fixture:
            res["dns_queries"] = len(fixture.queries()) - q0
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
        if fixture:
            check_auth_headers(srv, res)
    except Exception as e:  # report and go on with the other runs
        res.update(ok=0, failures=n, aborted=True, errors=[str(e)], msgs_per_s=0.0)
    finally:
        srv.stop()
        res["log_errors"] = srv.log_errors()[:20]
        srv.cleanup()
    return res


# --- --shape internet: one message per connection, smtp_load.py as the client, Postfix peer --

SMTP_LOAD = os.path.join(os.path.dirname(REPO), "shared", "tools", "smtp_load.py")
INTERNET_POINTS = [(4096, 1), (4096, 10), (4096, 50), (102400, 50)]
INTERNET_DOMAIN = "example.test"


def internet_users(count):
    # smtp_load.py's recipients: user0..user{U-1}@DOMAIN (-u)
    return ["user%d@%s" % (i, INTERNET_DOMAIN) for i in range(count)]


class MxInternet(MxServer):
    """mx with the load generator's users (added in one subprocess through mx's CLI)."""
    users = internet_users(10)

    def prepare(self):
        self.config = os.path.join(self.tmp, "mx.toml")
        with open(self.config, "w") as f:
            f.write(self.config_text())
        code = ("import io, sys\nfrom mx.cli import main\n"
                "for u in sys.argv[2:]:\n"
                "    sys.stdin = io.StringIO('pw\\n')\n"
                "    if main(['--config', sys.argv[1], 'user', 'add', u]): sys.exit(1)\n")
        r = subprocess.run([sys.executable, "-c", code, self.config, *self.users],
                           cwd=self.tmp, env=self.env, capture_output=True, timeout=120)
        if r.returncode:
            raise RuntimeError("mx user add failed (%d): %s"
                               % (r.returncode, (r.stdout + r.stderr).decode()[-2000:]))

    def user_new_dirs(self):
        return [os.path.join(self.tmp, "data", "mail", INTERNET_DOMAIN, u.split("@")[0], "new")
                for u in self.users]

    def delivered(self):
        return sum(count_files(d) for d in self.user_new_dirs())

    def wait_delivered(self, expect, timeout):
        deadline = time.monotonic() + timeout  # mx's 250 means already in new/
        while self.delivered() < expect and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.delivered()

    def short_files(self, size):
        return sum(1 for d in self.user_new_dirs() if os.path.isdir(d)
                   for e in os.scandir(d) if e.stat().st_size < size)

    def mem_mib(self):
        return self.peak_rss_mib()


def postfix_class():
    import postfix_peer  # benchmarks/, beside this script

    class PostfixInternet(postfix_peer.PostfixPeer):
        users = internet_users(10)

        def __init__(self):
            super().__init__(self.users, domain=INTERNET_DOMAIN)

        def short_files(self, size):
            return sum(1 for u in self.users if os.path.isdir(self.maildir_new(u))
                       for e in os.scandir(self.maildir_new(u)) if e.stat().st_size < size)

        def mem_mib(self):
            return self.pss_mib()

    return PostfixInternet


def run_smtp_load(port, size, concurrency, n, rcpts, users, timeout):
    """One smtp_load.py run (a subprocess); returns its JSON summary."""
    cmd = [sys.executable, SMTP_LOAD, "127.0.0.1:%d" % port, "-n", str(n), "-s", str(size),
           "-c", str(concurrency), "-k", "1", "-r", str(rcpts), "-u", str(users),
           "--domain", INTERNET_DOMAIN, "--timeout", "30", "--max-seconds", str(timeout),
           "--json", "-"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 120,
                       stdin=subprocess.DEVNULL)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if not lines:
        raise RuntimeError("smtp_load.py exited %d without a summary: %s %s"
                           % (r.returncode, r.stdout[-1000:], r.stderr[-2000:]))
    summary = json.loads(lines[-1])
    summary["command"] = " ".join(["smtp_load.py"] + cmd[2:-2])
    summary["text"] = [l for l in r.stdout.splitlines() if not l.startswith("{")]
    return summary


def run_internet_one(name, server_cls, size, concurrency, n, rcpts, users, timeout,
                     deliver_timeout):
    res = {"server": name, "size": size, "concurrency": concurrency, "messages": n,
           "rcpts": rcpts}
    srv = None
    try:
        srv = server_cls()
        srv.start()
        cpu0 = srv.cpu_seconds()
        s = run_smtp_load(srv.port, size, concurrency, n, rcpts, users, timeout)
        t_end = time.monotonic()
        ok = s["ok"]
        # Postfix answers 250 once the message is in its queue: wait for the Maildir files
        # (bounded) and read the CPU only then, so that delivery counts.
        delivered = srv.wait_delivered(ok * rcpts, deliver_timeout)
        deliver_s = time.monotonic() - t_end
        cpu = srv.cpu_seconds() - cpu0
        res.update(
            ok=ok, failures=n - ok, errors={k: v for k, v in s["errors"].items() if v},
            error_samples=s["err_samples"],
            aborted=ok < n, elapsed_s=s["elapsed_s"], msgs_per_s=s["msgs_per_s"],
            p50_ms=s["lat_ms"]["p50"], p99_ms=s["lat_ms"]["p99"], max_ms=s["lat_ms"]["max"],
            conn_p50_ms=s["conn_setup_ms"]["p50"], conn_p99_ms=s["conn_setup_ms"]["p99"],
            connections=s["connections"], server_cpu_s=cpu,
            cpu_s_per_1k=cpu / ok * 1000 if ok else float("nan"),
            client_cpu_s_per_1k=s["client_cpu_s"] / ok * 1000 if ok else float("nan"),
            delivered=delivered, expected=ok * rcpts, deliver_s=deliver_s,
            end_to_end_msgs_per_s=(delivered / rcpts) / (s["elapsed_s"] + deliver_s),
            # Postfix stores LF line ends: a file may be up to one byte per 78-byte line
            # shorter than the CRLF message sent (its added headers make up for it at 4 KiB)
            short_files=srv.short_files(size - size // 70), mem_mib=srv.mem_mib(),
            load_command=s["command"], load_line=s["text"][:2])
        if name == "postfix":
            res["processes"] = srv.processes()
            res["queued_after"] = srv.queued()
    except Exception as e:  # report and go on with the other runs
        res.update(ok=0, failures=n, aborted=True, errors={"run": 1},
                   error_samples=[str(e)[-3000:]], msgs_per_s=0.0)
    finally:
        if srv is not None:
            srv.stop()
            res["log_errors"] = srv.log_errors()[:20]
            srv.cleanup()
    return res


def describe_internet(r):
    if "p50_ms" not in r:
        return "%-8s size=%-6d C=%-3d FAILED: %s" % (
            r["server"], r["size"], r["concurrency"], " | ".join(r["error_samples"])[:3000])
    s = ("%-8s size=%-6d C=%-3d %7.1f msg/s  p50 %7.1f ms  p99 %7.1f ms  max %7.1f ms  "
         "conn p50 %5.1f ms  cpu/1k %5.2f s  client cpu/1k %5.2f s  mem %5.1f MiB  "
         "delivered %d/%d, last %.2f s after the load"
         % (r["server"], r["size"], r["concurrency"], r["msgs_per_s"], r["p50_ms"],
            r["p99_ms"], r["max_ms"], r["conn_p50_ms"], r["cpu_s_per_1k"],
            r["client_cpu_s_per_1k"], r["mem_mib"], r["delivered"], r["expected"], r["deliver_s"]))
    if r.get("processes"):
        s += "\n    processes at the end: " + ", ".join(
            "%s %d" % kv for kv in sorted(r["processes"].items()))
    if r["failures"] or r["errors"]:
        s += "\n    %d of %d got no 250; errors %s: %s" % (
            r["failures"], r["messages"], r["errors"], " | ".join(r["error_samples"])[:1000])
    if r["delivered"] != r["expected"]:
        s += "\n    WARNING: %d files in the Maildirs, %d expected" % (r["delivered"],
                                                                    r["expected"])
    if r["short_files"]:
        s += "\n    WARNING: %d delivered files are shorter than the message sent" % (
            r["short_files"])
    for line in r.get("log_errors", [])[:5]:
        s += "\n    server log: " + line[:300]
    return s


def internet_ok(r):
    return ("p50_ms" in r and not r["failures"] and not r["errors"]
            and r["delivered"] == r["expected"] and not r["short_files"])


def table_internet(results, servers):
    by_key = {(r["server"], r["size"], r["concurrency"]): r for r in results}
    rows = []
    for r in results:
        if (r["size"], r["concurrency"]) not in rows:
            rows.append((r["size"], r["concurrency"]))
    cols = ("msg/s", "p50 ms", "p99 ms", "CPU/1k", "deliv s", "MiB")
    group = len(cols) * 9
    pair = "mx" in servers and "postfix" in servers
    top = "%12s" % "" + "".join(" " + (" %s " % s).center(group - 1, "-") for s in servers)
    head = "%7s %4s" % ("size", "C") + "".join(
        "".join(" %8s" % c for c in cols) for _ in servers)
    if pair:
        head += " %8s %8s" % ("mx/pf", "CPU pf/mx")
    out = [top, head, "-" * len(head)]
    for size, c in rows:
        line = "%7s %4d" % ("%dK" % (size // 1024) if size >= 1024 else size, c)
        for s in servers:
            r = by_key.get((s, size, c))
            if not r or "p50_ms" not in r:
                line += " %8s" % "FAILED" + " %8s" % "" * (len(cols) - 1)
                continue
            mark = "" if internet_ok(r) else "!"
            line += " %8s %8.1f %8.1f %8.2f %8.2f %8.1f" % (
                "%.1f%s" % (r["msgs_per_s"], mark), r["p50_ms"], r["p99_ms"],
                r["cpu_s_per_1k"], r["deliver_s"], r["mem_mib"])
        if pair:
            a, b = by_key.get(("mx", size, c)), by_key.get(("postfix", size, c))
            if all(x and "p50_ms" in x and x["msgs_per_s"] for x in (a, b)):
                line += " %8.2f %9.2f" % (a["msgs_per_s"] / b["msgs_per_s"],
                                          b["cpu_s_per_1k"] / a["cpu_s_per_1k"])
            else:
                line += " %8s %9s" % ("-", "-")
        out.append(line)
    out.append("one message per connection, no PIPELINING (smtp_load.py -k 1); CPU/1k = server "
               "CPU s per 1,000 msgs, delivery included (Postfix: all its processes); deliv s = "
               "wait after the load until every message was a Maildir file; MiB = mx peak "
               "VmHWM, Postfix sum of PSS of its processes at the end; ! = failures or "
               "missing files")
    return "\n".join(out)


def main_internet(a, ap):
    """--shape internet; see the module docstring."""
    servers = [s for s in (a.servers or "mx,postfix").split(",") if s]
    if set(servers) - {"mx", "postfix"}:
        ap.error("--shape internet compares mx and postfix (got %r)" % a.servers)
    if not os.path.exists(SMTP_LOAD):
        ap.error("the load generator %s is missing" % SMTP_LOAD)
    n = a.messages or (300 if a.quick else 2000)
    if a.sizes or a.concurrency or a.quick:
        sizes = a.sizes or [4096]
        conc = a.concurrency or ([1, 10] if a.quick else [1, 10, 50])
        points = [(size, c) for size in sizes for c in conc]
    else:
        points = INTERNET_POINTS
    classes = {"mx": MxInternet}
    MxInternet.users = internet_users(a.users)
    if "postfix" in servers:
        import postfix_peer
        why = postfix_peer.install()
        if why:
            print("Postfix is not available, so it is left out: %s" % why, file=sys.stderr)
            servers.remove("postfix")
        else:
            classes["postfix"] = postfix_class()
            classes["postfix"].users = internet_users(a.users)
            classes["postfix"].extra_main_cf = a.postfix_param
            v = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
            print("Postfix %s" % v, file=sys.stderr)
    if not servers:
        return 1
    results = []
    started = time.monotonic()
    for size, c in points:
        for s in servers:  # interleaved per point: machine drift hits both sides alike
            r = run_internet_one(s, classes[s], size, c, n, a.rcpts, a.users, a.timeout,
                                 a.deliver_timeout)
            results.append(r)
            print(describe_internet(r), file=sys.stderr, flush=True)
    print()
    print("%d messages per run, one per connection, %d recipient(s) each over %d users, "
          "%s (%.0f s in all)" % (n, a.rcpts, a.users, time.strftime("%Y-%m-%d %H:%M"),
                                  time.monotonic() - started))
    print("load: smtp_load.py 127.0.0.1:PORT -n %d -s SIZE -c C -k 1 -r %d -u %d "
          "--domain %s" % (n, a.rcpts, a.users, INTERNET_DOMAIN))
    print(table_internet(results, servers))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all(internet_ok(r) for r in results) else 1


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
    if "auth_files" in r:
        s += "\n    %d files: %d with spf=pass dkim=pass dmarc=pass, %d with Authentication-" \
             "Results; %d DNS questions in the timed run" % (
                 r["auth_files"], r["auth_pass"], r["auth_header"], r["dns_queries"])
        want = r["auth_files"] if r["server"] == "mx-on" else 0
        if (r["auth_pass"] if want else r["auth_header"]) != want:
            s += "\n    WARNING: expected %s" % (
                "every file to pass SPF, DKIM and DMARC" if want else "no Authentication-Results")
        if r["auth_sample"]:
            s += "\n    Authentication-Results:%s %s" % (
                " (failing)" if want and not auth_passes(r["auth_sample"]) else "",
                " || ".join(r["auth_sample"]))
    for line in r["log_errors"][:5]:
        s += "\n    server log: " + line[:300]
    return s


def auth_ok(r):
    """--mailauth: the delivered files say what they should (see describe)."""
    if "auth_files" not in r:  # not --mailauth, or the run failed (counted as such)
        return True
    if r["server"] == "mx-on":
        return r["auth_files"] > 0 and r["auth_pass"] == r["auth_files"]
    return r["auth_header"] == 0


def table(results, servers):
    by_key = {(r["server"], r["size"], r["concurrency"]): r for r in results}
    rows = sorted({(r["size"], r["concurrency"]) for r in results})
    cols = ("msg/s", "p50 ms", "p99 ms", "CPU/1k", "RSS MiB")
    group = len(cols) * 9  # each cell is " %8s"
    both = "mx" in servers and "aiosmtpd" in servers
    onoff = "mx-on" in servers and "mx-off" in servers
    top = "%12s" % "" + "".join(" " + (" %s " % s).center(group - 1, "-") for s in servers)
    head = "%7s %4s" % ("size", "C") + "".join(
        "".join(" %8s" % c for c in cols) for _ in servers)
    if both:
        head += " %8s" % "mx/aio"
    if onoff:
        head += " %8s %8s %8s" % ("on/off", "cost %", "CPU +")
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
        if onoff:
            a, b = by_key.get(("mx-on", size, c)), by_key.get(("mx-off", size, c))
            if all(x and "p50_ms" in x and x["msgs_per_s"] for x in (a, b)):
                ratio = a["msgs_per_s"] / b["msgs_per_s"]
                line += " %8.2f %8.1f %8.2f" % (ratio, (1 - ratio) * 100,
                                                a["cpu_s_per_1k"] - b["cpu_s_per_1k"])
            else:
                line += " %8s %8s %8s" % ("-", "-", "-")
        out.append(line)
    out.append("CPU/1k = server CPU s per 1,000 msgs; RSS = peak VmHWM; "
               "! = run aborted or had failures")
    if onoff:
        out.append("on/off = mx-on msg/s / mx-off msg/s; cost % = 1 - on/off; "
                   "CPU + = CPU/1k on - off (s per 1,000 msgs)")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda s: [int(x) for x in s.split(",") if x]
    ap.add_argument("--servers", default=None,
                    help="default mx,aiosmtpd; with --mailauth mx-off,mx-on")
    ap.add_argument("--concurrency", type=ints, default=None, help="default 1,10,50")
    ap.add_argument("--messages", type=int, default=None, help="default 2000")
    ap.add_argument("--sizes", type=ints, default=None, help="default 4096,102400")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    ap.add_argument("--quick", action="store_true",
                    help="300 messages, C=1,10, 4 KiB only (explicit flags still win)")
    ap.add_argument("--json", metavar="PATH", help="dump raw results as JSON")
    ap.add_argument("--mailauth", action="store_true",
                    help="mx with inbound checks off and on (servers mx-off,mx-on), loopback "
                         "DNS, DKIM-signed messages; see the module docstring")
    ap.add_argument("--pool", type=int, default=200,
                    help="--mailauth: distinct signed messages per size (default 200)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed messages (C=1) before each run (default 20 with "
                         "--mailauth, else 0)")
    ap.add_argument("--shape", choices=("reuse", "internet"), default="reuse",
                    help="reuse (default): connections reused, pipelined where offered, mx "
                         "vs aiosmtpd; internet: smtp_load.py -k 1, one message per "
                         "connection, no pipelining, mx vs Postfix (see the docstring)")
    ap.add_argument("--rcpts", type=int, default=1,
                    help="--shape internet: recipients per message (smtp_load.py -r)")
    ap.add_argument("--users", type=int, default=10,
                    help="--shape internet: mailboxes user0..user{N-1} (smtp_load.py -u)")
    ap.add_argument("--postfix-param", action="append", default=[], metavar="NAME=VALUE",
                    help="--shape internet: an extra main.cf line for Postfix (repeatable; "
                         "e.g. in_flow_delay=0 to see its flow control's share of p99)")
    ap.add_argument("--deliver-timeout", type=float, default=120.0,
                    help="--shape internet: seconds to wait after a run for every accepted "
                         "message to be in the Maildirs (Postfix queues first)")
    a = ap.parse_args()
    if a.shape == "internet":
        if a.mailauth:
            ap.error("--mailauth and --shape internet do not combine")
        return main_internet(a, ap)
    conc = a.concurrency or ([1, 10] if a.quick else [1, 10, 50])
    n = a.messages or (300 if a.quick else 2000)
    sizes = a.sizes or ([4096] if a.quick else [4096, 102400])
    servers_arg = a.servers or ("mx-off,mx-on" if a.mailauth else "mx,aiosmtpd")
    servers = [s for s in servers_arg.split(",") if s]
    if set(servers) - set(SERVERS):
        ap.error("unknown server in %r (choose from %s)" % (servers_arg, ", ".join(SERVERS)))
    if not a.mailauth and {"mx-on", "mx-off"} & set(servers):
        ap.error("mx-on and mx-off need --mailauth (their DNS server)")
    warmup = a.warmup if a.warmup is not None else (20 if a.mailauth else 0)

    fixture = MailAuthFixture() if a.mailauth else None
    pools = {}
    results = []
    try:
        if fixture:
            fixture.start()
            MxServer.dns_port = fixture.port
            for size in sizes:  # signed before any timing: client CPU is not the server's
                t0 = time.process_time()
                pools[size] = fixture.sign_pool(size, a.pool)
                print("signed %d messages of %d bytes (RSA-2048) in %.1f s CPU; DNS on "
                      "127.0.0.1:%d" % (a.pool, size, time.process_time() - t0, fixture.port),
                      file=sys.stderr, flush=True)
        # Interleave servers within each (size, C) so slow drift of the machine (page cache,
        # disk) affects both sides alike.  Fresh server process per (server, size, C): clean
        # peak RSS and an empty Maildir for every run.
        for size in sizes:
            for c in conc:
                for s in servers:
                    r = run_one(SERVERS[s], size, c, n, a.timeout, messages=pools.get(size),
                                warmup=warmup, fixture=fixture)
                    results.append(r)
                    print(describe(r), file=sys.stderr, flush=True)
    finally:
        if fixture:
            fixture.stop()
            fixture.cleanup()
    print()
    print("%d messages per run%s, %s" % (
        n, " (after %d untimed)" % warmup if warmup else "", time.strftime("%Y-%m-%d %H:%M")))
    print(table(results, servers))
    if a.mailauth:
        for r in results:
            if "auth_files" in r and not auth_ok(r):
                print("AUTH CHECK FAILED: %s size=%d C=%d: %d of %d files pass, %d with "
                      "Authentication-Results" % (r["server"], r["size"], r["concurrency"],
                                                   r["auth_pass"], r["auth_files"],
                                                   r["auth_header"]))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    bad = any(r["failures"] or r["aborted"] or not auth_ok(r) for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
