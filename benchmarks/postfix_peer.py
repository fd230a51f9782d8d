"""A private Postfix instance as a benchmark peer (issue 11): loopback only, virtual(8) Maildirs.

Never the system instance: everything lives under one temp dir (config_directory with a
main.cf and master.cf written here, queue_directory, data_directory, the Maildirs and the
log file), and every command gets `-c <config_directory>`.  The package's /etc/postfix is
left as it is and its service is never started.

    peer = PostfixPeer(users=["user0@example.test", ...])
    peer.start()                  # postfix -c DIR start; waits for the 220 greeting
    cpu0 = peer.cpu_seconds()     # master + every child, reaped ones included
    ...                           # send mail to 127.0.0.1:peer.port
    peer.wait_delivered(n, 60)    # Postfix queues first: wait for the files (bounded)
    peer.stop()                   # postfix -c DIR stop; waits for master to exit
    peer.cleanup()

install() puts Postfix on the machine from Debian's package without starting a daemon: a
temporary /usr/sbin/policy-rc.d that exits 101 (only if there is none; removed after),
debconf preseeded with "No configuration", `apt-get install -y postfix`.
"""
import os, pwd, shutil, socket, subprocess, tempfile, time

CLK_TCK = os.sysconf("SC_CLK_TCK")
POSTFIX = "/usr/sbin/postfix"
POLICY_RC_D = "/usr/sbin/policy-rc.d"

MAIN_CF = """\
compatibility_level = 3.6
config_directory = {conf}
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix-peer.example.test
mydomain = example.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relayhost =
mynetworks = 127.0.0.0/8
smtpd_recipient_restrictions = permit_mynetworks, reject
smtpd_relay_restrictions = permit_mynetworks, reject
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {base}
virtual_mailbox_maps = texthash:{conf}/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_transport = virtual
smtpd_tls_security_level =
smtp_tls_security_level =
smtpd_use_tls = no
maillog_file = {log}
maillog_file_prefixes = {tmp}
biff = no
append_dot_mydomain = no
readme_directory = no
"""

# Postfix's stock services, minus what a loopback virtual-only instance never uses (pickup,
# tlsmgr, relay, lmtp and the pipe examples), chroot off (paths are in the temp dir).
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def installed():
    return os.path.exists(POSTFIX) and os.path.exists("/usr/lib/postfix/sbin/virtual")


def install(timeout=600):
    """Install Debian's postfix without starting its daemon; returns None or why it failed."""
    if installed():
        return None
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "installing postfix needs root"
    made_policy = False
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        if not os.path.exists(POLICY_RC_D):  # "exit 101" = invoke-rc.d starts nothing
            with open(POLICY_RC_D, "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(POLICY_RC_D, 0o755)
            made_policy = True
        subprocess.run(["debconf-set-selections"], check=True, timeout=60, env=env,
                       input=b"postfix postfix/main_mailer_type select No configuration\n")
        r = subprocess.run(["apt-get", "install", "-y", "postfix"], env=env,
                           capture_output=True, timeout=timeout)
        if r.returncode:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True,
                                timeout=timeout)
            r = subprocess.run(["apt-get", "install", "-y", "postfix"], env=env,
                               capture_output=True, timeout=timeout)
            if r.returncode:
                return "apt-get install postfix failed (%d): %s" % (
                    r.returncode, (r.stdout + r.stderr).decode("utf-8", "replace")[-1500:])
    except (OSError, subprocess.SubprocessError) as e:
        return "installing postfix: %r" % (e,)
    finally:
        if made_policy:
            os.unlink(POLICY_RC_D)
    return None if installed() else "apt-get said yes but %s is missing" % POSTFIX


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid):
    """(ppid, utime+stime, cutime+cstime) of a pid in seconds, or None if it is gone."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after "comm)": state ppid ... utime(12th) stime cutime cstime
    return (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK,
            (int(fields[13]) + int(fields[14])) / CLK_TCK)


def descendants(root):
    """Pids whose parent chain reaches `root` (one scan of /proc)."""
    parent = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st:
                parent[int(name)] = st[0]
    out, frontier = [], {root}
    while frontier:
        kids = {p for p, pp in parent.items() if pp in frontier}
        out.extend(kids)
        frontier = kids
    return out


class PostfixPeer:
    name = "postfix"
    extra_main_cf = ()  # "name=value" lines appended to main.cf

    def __init__(self, users, domain="example.test", vuser="nobody"):
        self.users = list(users)
        self.domain = domain
        self.tmp = tempfile.mkdtemp(prefix="smtp_accept_postfix_")
        os.chmod(self.tmp, 0o755)  # virtual(8) writes as `vuser` below it
        self.conf = os.path.join(self.tmp, "etc")
        self.queue = os.path.join(self.tmp, "spool")
        self.data = os.path.join(self.tmp, "lib")
        self.base = os.path.join(self.tmp, "vmail")
        self.log_path = os.path.join(self.tmp, "maillog")
        self.port = free_port()
        pw = pwd.getpwnam(vuser)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        self.master_pid = None

    # --- set-up -------------------------------------------------------------------------

    def prepare(self):
        for d in (self.conf, self.queue, self.data, self.base):
            os.makedirs(d, exist_ok=True)
        pf = pwd.getpwnam("postfix")
        os.chown(self.data, pf.pw_uid, pf.pw_gid)
        os.chmod(self.data, 0o700)
        os.chown(self.base, self.uid, self.gid)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(MAIN_CF.format(conf=self.conf, queue=self.queue, data=self.data,
                                   domain=self.domain, base=self.base, uid=self.uid,
                                   gid=self.gid, log=self.log_path, tmp=self.tmp))
            for line in self.extra_main_cf:  # later lines win in main.cf
                name, sep, value = line.partition("=")
                if not sep:
                    raise ValueError("main.cf parameter %r is not NAME=VALUE" % line)
                f.write("%s = %s\n" % (name.strip(), value.strip()))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(MASTER_CF.format(port=self.port))
        with open(os.path.join(self.conf, "vmailbox"), "w") as f:
            for u in self.users:  # Maildir delivery: the trailing slash
                local, _, dom = u.partition("@")
                f.write("%s %s/%s/\n" % (u, dom, local))

    def postfix(self, *args, timeout=60):
        return subprocess.run([POSTFIX, "-c", self.conf, *args], capture_output=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, ready_timeout=30.0):
        self.prepare()
        r = self.postfix("start", timeout=ready_timeout + 30)
        if r.returncode:
            raise RuntimeError("postfix start failed (%d): %s\n%s" % (
                r.returncode, (r.stdout + r.stderr).decode("utf-8", "replace")[-3000:],
                self.log_tail()))
        pidfile = os.path.join(self.queue, "pid", "master.pid")
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(open(pidfile).read().split()[0])
            except (OSError, ValueError, IndexError):
                time.sleep(0.1)
                continue
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("postfix not ready after %.0fs:\n%s" % (ready_timeout,
                                                                   self.log_tail()))

    # --- measuring ----------------------------------------------------------------------

    def cpu_seconds(self):
        """CPU (user+system) of master and all its processes, the exited ones included
        (their time moves into master's cutime/cstime when master reaps them)."""
        if not self.master_pid:
            return float("nan")
        m = proc_stat(self.master_pid)
        if m is None:
            return float("nan")
        total = m[1] + m[2]
        for pid in descendants(self.master_pid):
            st = proc_stat(pid)
            if st:
                total += st[1] + st[2]
        return total

    def processes(self):
        """{command name: count} of the live Postfix processes."""
        out = {}
        for pid in [self.master_pid] + descendants(self.master_pid):
            try:
                name = open("/proc/%d/comm" % pid).read().strip()
            except OSError:
                continue
            out[name] = out.get(name, 0) + 1
        return out

    def pss_mib(self):
        """Sum of the proportional set size (shared pages split among their users) over
        the live Postfix processes, MiB: VmRSS would count the shared libraries once per
        process."""
        total = 0
        for pid in [self.master_pid] + descendants(self.master_pid):
            try:
                with open("/proc/%d/smaps_rollup" % pid) as f:
                    total += next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
            except (OSError, StopIteration):
                pass
        return total / 1024.0

    def maildir_new(self, user):
        local, _, dom = user.partition("@")
        return os.path.join(self.base, dom, local, "new")

    def delivered(self):
        n = 0
        for u in self.users:
            try:
                n += len(os.listdir(self.maildir_new(u)))
            except FileNotFoundError:
                pass
        return n

    def queued(self):
        """Message files still in Postfix's queues (incoming, active, deferred, hold)."""
        n = 0
        for q in ("incoming", "active", "deferred", "hold", "maildrop"):
            for _, _, files in os.walk(os.path.join(self.queue, q)):
                n += len(files)
        return n

    def wait_delivered(self, expect, timeout):
        """Wait (at most `timeout` s) for `expect` files in the Maildirs; returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            n = self.delivered()
            if n >= expect or time.monotonic() >= deadline:
                return n
            time.sleep(0.05)

    def log_tail(self, n=3000):
        try:
            return open(self.log_path, "rb").read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def log_errors(self):
        keys = ("fatal:", "panic:", "error:", "warning:", "status=bounced", "status=deferred",
                "reject:")
        return [l for l in self.log_tail(1 << 24).splitlines() if any(k in l for k in keys)]

    # --- tear-down ----------------------------------------------------------------------

    def stop(self, timeout=30):
        if not self.master_pid:
            return
        try:
            self.postfix("stop", timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc_stat(self.master_pid):
            time.sleep(0.1)
        if proc_stat(self.master_pid):  # still there: the one master this peer started
            try:
                self.postfix("abort", timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.master_pid = None

    def cleanup(self):
        shutil.rmtree(self.tmp, ignore_errors=True)
