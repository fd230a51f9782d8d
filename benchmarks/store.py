#!/usr/bin/env python3
"""Mailbox store benchmark: open + list a 10,000 and a 100,000 message folder, cold and
warm, and bytes of memory per message; Dovecot's doveadm on a copy of the same folder in
the same run when it is installed.

    python3 benchmarks/store.py                 # 10,000 and 100,000 messages
    python3 benchmarks/store.py --quick         # 10,000 only
    python3 benchmarks/store.py --sizes 50000 --json out.json

Folders are generated in a temp dir (removed afterwards): names as mx delivers them
(`<sec>.M<usec>P<pid>Q<n>...,S=<size>,W=<vsize>`), half in new/, half in cur/ with
`:2,S` or `:2,RS`; the files are empty, since neither side may read bodies to list a
folder (mx's tests prove it does not). Each mx figure is a fresh Python process:

- cold: no `dovecot-uidlist` yet; mx lists new/ and cur/, gives every message a UID under
  the dot-lock and writes the list (Dovecot's first open of a Maildir does the same work);
- warm: the list exists; mx lists both directories and matches every name to its UID;
- hot: a second open in the same process (dentries and the list in memory);
- refresh: `Folder.refresh()` with nothing changed (three stats);
- B/msg: tracemalloc bytes held by an open Folder (plus the list from messages()) / n.

Page caches are not dropped (that needs root and disturbs a shared machine): "cold" is
cold for the store's state, not for the kernel. Dovecot: `doveadm mailbox status` (counts,
uidnext) and `doveadm fetch 'uid flags size.physical' all` (the full listing), on its own
copy without index files (cold) and again with them (warm); process start-up included,
so the mx column "proc" (the whole python process) is the fair one to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time, tracemalloc
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from mx.store import Folder
path, mode = Path(sys.argv[1]), sys.argv[2]
out = {}
if mode == "memory":
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    f = Folder.open(path)
    msgs = f.messages()
    out["bytes"] = tracemalloc.get_traced_memory()[0] - base
    out["peak"] = tracemalloc.get_traced_memory()[1] - base
    out["n"] = len(msgs)
else:
    t0 = time.perf_counter(); f = Folder.open(path); msgs = f.messages(); t1 = time.perf_counter()
    out["open"] = t1 - t0
    out["n"] = len(msgs)
    out["check"] = [msgs[0].uid, msgs[-1].uid, sum(m.size for m in msgs)]
    t0 = time.perf_counter(); g = Folder.open(path); g.messages(); out["hot"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(100):
        g.refresh()
    out["refresh"] = (time.perf_counter() - t0) / 100
print(json.dumps(out))
"""


def generate(path: Path, n: int) -> None:
    for sub in ("new", "cur", "tmp"):
        (path / sub).mkdir(parents=True)
    t = int(time.time()) - 86400 * 30
    for i in range(n):
        size = 2000 + (i * 37) % 20000
        base = f"{t + i // 50}.M{(i * 7919) % 1000000}P4242Q{i}R{i:08x}.bench.example,S={size},W={size + size // 40}"
        if i % 2:
            name = f"cur/{base}:2,{'RS' if i % 3 == 0 else 'S'}"
        else:
            name = f"new/{base}"
        os.close(os.open(path / name, os.O_CREAT | os.O_WRONLY, 0o600))
    old = time.time() - 60  # quiet directories, so refresh() may trust their mtimes
    for sub in ("new", "cur"):
        os.utime(path / sub, (old, old))


def mx_run(path: Path, mode: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), mode, str(ROOT)],
                         capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout), time.perf_counter() - t0


class Dovecot:
    """doveadm on a private config (never the system service); None if unusable."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.conf = work / "dovecot.conf"
        self.env = {**os.environ}
        uid, gid, user = os.getuid(), os.getgid(), pwd.getpwuid(os.getuid()).pw_name
        if uid == 0:  # Dovecot refuses mail access as root: run as nobody
            nobody = pwd.getpwnam("nobody")
            uid, gid, user = nobody.pw_uid, nobody.pw_gid, "nobody"
        self.uid, self.gid = uid, gid
        self.env.update(USER=user, HOME=str(work))
        self.conf.write_text(
            f"base_dir = {work}/run\nlog_path = {work}/dovecot.log\nssl = no\n"
            f"mail_uid = {uid}\nmail_gid = {gid}\nfirst_valid_uid = 0\nfirst_valid_gid = 0\n"
        )

    def run(self, maildir: Path, *args: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        out = subprocess.run(
            ["doveadm", "-c", str(self.conf), "-o", f"mail_location=maildir:{maildir}", *args],
            env=self.env, capture_output=True, text=True, timeout=600,
        )
        if out.returncode != 0:
            raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}")
        return time.perf_counter() - t0, out.stdout

    def copy(self, src: Path, dst: Path, *, with_state: bool) -> None:
        shutil.copytree(src, dst, symlinks=True)
        if not with_state:
            for f in dst.iterdir():
                if f.is_file():
                    f.unlink()
        if os.getuid() == 0:
            for dirpath, dirnames, filenames in os.walk(dst):
                for name in [*dirnames, *filenames, ""]:
                    os.chown(os.path.join(dirpath, name) if name else dirpath, self.uid, self.gid)


def bench(n: int, work: Path, dovecot: Dovecot | None) -> dict:
    path = work / f"mx-{n}"
    t0 = time.perf_counter()
    generate(path, n)
    gen = time.perf_counter() - t0
    pristine = work / f"pristine-{n}"
    shutil.copytree(path, pristine)
    cold, cold_proc = mx_run(path, "time")
    warm, warm_proc = mx_run(path, "time")
    mem, _ = mx_run(path, "memory")
    row = {
        "n": n, "generate_s": gen,
        "mx_cold_s": cold["open"], "mx_cold_proc_s": cold_proc,
        "mx_warm_s": warm["open"], "mx_warm_proc_s": warm_proc,
        "mx_hot_s": warm["hot"], "mx_refresh_us": warm["refresh"] * 1e6,
        "mx_bytes_per_msg": mem["bytes"] / n, "mx_peak_bytes_per_msg": mem["peak"] / n,
    }
    assert cold["n"] == warm["n"] == n, (cold, warm)
    if dovecot is not None:
        try:
            d = work / f"dovecot-{n}"
            dovecot.copy(pristine, d, with_state=False)
            row["dc_status_cold_s"], _ = dovecot.run(d, "mailbox", "status", "all", "INBOX")
            row["dc_status_warm_s"], _ = dovecot.run(d, "mailbox", "status", "all", "INBOX")
            d2 = work / f"dovecot-fetch-{n}"
            dovecot.copy(pristine, d2, with_state=False)
            q = ("fetch", "uid flags size.physical", "all")
            row["dc_fetch_cold_s"], _ = dovecot.run(d2, *q)
            row["dc_fetch_warm_s"], _ = dovecot.run(d2, *q)
            # Interop check: Dovecot on mx's own Maildir (mx's dovecot-uidlist) sees mx's UIDs.
            d3 = work / f"dovecot-on-mx-{n}"
            dovecot.copy(path, d3, with_state=True)
            _t, listing = dovecot.run(d3, "-f", "tab", "fetch", "uid guid", "all")
            theirs = dict(line.split("\t")[::-1] for line in listing.splitlines()[1:] if line)
            sys.path.insert(0, str(ROOT))
            from mx.store import Folder
            ours = {m.base: str(m.uid) for m in Folder.open(path).messages()}
            row["dovecot_agrees"] = theirs == ours
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            row["dovecot_error"] = str(e)
    for p in work.iterdir():
        if p.name.endswith(f"-{n}"):
            shutil.rmtree(p, ignore_errors=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--quick", action="store_true", help="10,000 messages only")
    ap.add_argument("--no-dovecot", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    sizes = [10000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mx-store-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        dovecot = None
        if not args.no_dovecot and shutil.which("doveadm"):
            dovecot = Dovecot(work)
        else:
            print("doveadm not installed (or --no-dovecot): mx figures alone", file=sys.stderr)
        for n in sizes:
            rows.append(bench(n, work, dovecot))
            print(f"{n}: done ({json.dumps(rows[-1])})", file=sys.stderr)
    print(f"{'msgs':>7} | {'mx cold':>8} {'proc':>6} {'warm':>6} {'proc':>6} {'hot':>6} {'refresh':>8} {'B/msg':>6} {'peak':>6}"
          f" | {'dc status':>9} {'warm':>6} {'fetch':>6} {'warm':>6} | {'warm proc mx/dc-fetch':>8} agree")
    for r in rows:
        dc = (f"{r['dc_status_cold_s']:9.3f} {r['dc_status_warm_s']:6.3f} {r['dc_fetch_cold_s']:6.3f} {r['dc_fetch_warm_s']:6.3f}"
              if "dc_fetch_warm_s" in r else f"{r.get('dovecot_error', 'n/a')[:31]:>31}")
        ratio = f"{r['mx_warm_proc_s'] / r['dc_fetch_warm_s']:8.2f}" if "dc_fetch_warm_s" in r else f"{'':>8}"
        print(f"{r['n']:7d} | {r['mx_cold_s']:8.3f} {r['mx_cold_proc_s']:6.3f} {r['mx_warm_s']:6.3f} {r['mx_warm_proc_s']:6.3f}"
              f" {r['mx_hot_s']:6.3f} {r['mx_refresh_us']:6.1f}us {r['mx_bytes_per_msg']:6.0f} {r['mx_peak_bytes_per_msg']:6.0f}"
              f" | {dc} | {ratio}              {r.get('dovecot_agrees', '-')}")
    print("(seconds; mx cold/warm/hot = open + messages() inside the process, proc = whole process;"
          " dc = doveadm process wall time)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(r.get("dovecot_agrees", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
