#!/usr/bin/env python3
"""Issue 11's FETCH lever: reading message files and sending them, four ways, side by side.

What `FETCH 1:* BODY.PEEK[]` does per message, without the IMAP session around it: a response
head (`* n FETCH (UID n BODY[] {size}`), the file's bytes, a `)`. Over loopback TCP to a
reader thread that only drains the socket, for N files of SIZE bytes in a temp dir:

  read      (mx today) one disk-thread trip per BATCH messages: open, os.read, close each,
            then one sendall of the batch's joined responses
  pread     the same with os.pread (offset 0) instead of os.read
  sendfile  per message: send the head, os.sendfile the file, send the `)` (the kernel copies
            the file; three socket calls per message)
  corked    sendfile with TCP_CORK set around each batch (the kernel joins the pieces)

Figures: wall ms for all N, and the sending thread's own CPU ms (`time.thread_time`), each
the median of ROUNDS alternating rounds. Page caches are warm (the files were just written),
as in benchmarks/imap.py's BODY[] figure.

    python3 benchmarks/fetch_io.py                  # 10,000 files of 4,096 bytes, 5 rounds
    python3 benchmarks/fetch_io.py -n 2000 -s 65536
"""

import argparse
import os
import shutil
import socket
import statistics
import tempfile
import threading
import time


def make_files(root, n, size):
    paths = []
    body = (b"x" * 76 + b"\r\n") * (size // 78 + 1)
    for i in range(n):
        p = os.path.join(root, "%d.M%dP1.host,S=%d:2,S" % (1796000000 + i, i, size))
        with open(p, "wb") as f:
            f.write(body[:size])
        paths.append(p)
    return paths


def head(i, size):
    return b"* %d FETCH (UID %d BODY[] {%d}\r\n" % (i + 1, i + 1, size)


def way_read(sock, paths, size, batch, reader):
    for start in range(0, len(paths), batch):
        out = []
        for i in range(start, min(start + batch, len(paths))):
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                data = reader(fd)
            finally:
                os.close(fd)
            out.append(head(i, len(data)))
            out.append(data)
            out.append(b")\r\n")
        sock.sendall(b"".join(out))


def way_sendfile(sock, paths, size, batch, cork):
    out_fd = sock.fileno()
    for start in range(0, len(paths), batch):
        if cork:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        for i in range(start, min(start + batch, len(paths))):
            fd = os.open(paths[i], os.O_RDONLY)
            try:
                n = os.fstat(fd).st_size
                sock.sendall(head(i, n))
                sent = 0
                while sent < n:
                    sent += os.sendfile(out_fd, fd, sent, n - sent)
            finally:
                os.close(fd)
            sock.sendall(b")\r\n")
        if cork:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)


def run(way, paths, size, batch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    expect = sum(len(head(i, size)) + size + 3 for i in range(len(paths)))
    got = [0]

    def drain():
        buf = bytearray(1 << 20)
        while got[0] < expect:
            n = client.recv_into(buf)
            if not n:
                break
            got[0] += n

    t = threading.Thread(target=drain)
    t.start()
    w0, c0 = time.perf_counter(), time.thread_time()
    if way == "read":
        way_read(server, paths, size, batch, lambda fd: os.read(fd, size + 1))
    elif way == "pread":
        way_read(server, paths, size, batch, lambda fd: os.pread(fd, size + 1, 0))
    else:
        way_sendfile(server, paths, size, batch, cork=(way == "corked"))
    c1 = time.thread_time()
    t.join(60)
    w1 = time.perf_counter()
    server.close()
    client.close()
    if got[0] != expect:
        raise SystemExit("%s: the reader got %d of %d bytes" % (way, got[0], expect))
    return (w1 - w0) * 1000, (c1 - c0) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="files (default 10,000)")
    ap.add_argument("-s", "--size", type=int, default=4096, help="bytes per file (default 4,096)")
    ap.add_argument("--batch", type=int, default=64, help="messages per trip / cork (default 64)")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    ways = ("read", "pread", "sendfile", "corked")
    root = tempfile.mkdtemp(prefix="mx-fetch-io-")
    try:
        paths = make_files(root, a.n, a.size)
        res = {w: [] for w in ways}
        for _ in range(a.rounds):
            for w in ways:  # alternating: the VM's drift hits every way alike
                res[w].append(run(w, paths, a.size, a.batch))
    finally:
        shutil.rmtree(root)
    base_wall = statistics.median(r[0] for r in res["read"])
    base_cpu = statistics.median(r[1] for r in res["read"])
    print("%d files of %d bytes, batches of %d, median of %d rounds, %s" % (
        a.n, a.size, a.batch, a.rounds, time.strftime("%Y-%m-%d %H:%M")))
    print("%-9s %9s %9s %8s %8s" % ("way", "wall ms", "cpu ms", "wall/rd", "cpu/rd"))
    for w in ways:
        wall = statistics.median(r[0] for r in res[w])
        cpu = statistics.median(r[1] for r in res[w])
        print("%-9s %9.1f %9.1f %8.2f %8.2f" % (w, wall, cpu, wall / base_wall, cpu / base_cpu))
    print("cpu = the sending thread's own CPU; rd = the `read` way (mx's)")


if __name__ == "__main__":
    main()
