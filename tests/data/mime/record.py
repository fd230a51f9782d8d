"""Record Dovecot's FETCH answers for the MIME corpus: the golden files of tests/test_imap_fetch.

A one-off, run by hand when the corpus or the list of FETCH items changes (the tests only read
what it wrote; they never need Dovecot):

    . .venv/bin/activate && python3 tests/data/mime/record.py

Every `tests/data/mime/<name>.eml` is written byte for byte (CRLF, bare LF, 8-bit as it is)
into a Maildir++ folder of its own, `.<name>/cur/`, so it is message 1 there, with the file's
mtime set to a fixed INTERNALDATE. A private Dovecot (tests/dovecot.py: own config, loopback,
never the system service) runs with TZ=America/New_York, so INTERNALDATE shows a non-zero
offset. Through imaplib's connection the script SELECTs each folder and sends each command of
`COMMANDS` (`FETCH 1 <items>`) raw, reading the answer raw (literals included), and writes
`golden/<name>.txt`:

    # header lines (what recorded it)
    # internaldate <seconds since the epoch> <UTC offset in minutes at that time>
    >>> <items> <status> <n>
    <exactly n octets: the untagged responses, as Dovecot sent them>

`<status>` is the tagged answer's OK / NO / BAD. Commands that set \\Seen (RFC822,
RFC822.TEXT, BODY[...] without .PEEK) come last, in `COMMANDS` order, so the test can tell
which of them changed the flags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from tests.dovecot import launch  # noqa: E402

USER, PASSWORD = "golden@example.test", "golden-secret"
TZ = "America/New_York"
BASE_TIME = 1546300800  # 2019-01-01 00:00:00 UTC; message i gets BASE_TIME + i * 3671 seconds

COMMANDS = [
    "(FLAGS INTERNALDATE RFC822.SIZE)",
    "FULL",
    "BODYSTRUCTURE",
    "(ENVELOPE BODYSTRUCTURE BODY)",
    "(BODY ENVELOPE RFC822.SIZE)",
    "BODY.PEEK[]",
    "BODY.PEEK[HEADER]",
    "BODY.PEEK[TEXT]",
    "BODY.PEEK[HEADER.FIELDS (From SUBJECT x-long)]",
    "BODY.PEEK[HEADER.FIELDS.NOT (from Subject Content-Type)]",
    "BODY.PEEK[HEADER.FIELDS (X-None)]",
    'BODY.PEEK[HEADER.FIELDS ("subject" TO cc)]<4.30>',
    "BODY.PEEK[]<0.20>",
    "BODY.PEEK[]<10.30>",
    "BODY.PEEK[]<100000.5>",
    "BODY.PEEK[TEXT]<5.10>",
    "(RFC822.HEADER RFC822.SIZE)",
    "BODY.PEEK[1]",
    "BODY.PEEK[1.MIME]",
    "BODY.PEEK[1.HEADER]",
    "BODY.PEEK[1.TEXT]",
    "BODY.PEEK[1.1]",
    "BODY.PEEK[1.2]",
    "BODY.PEEK[1.1.MIME]",
    "BODY.PEEK[1.HEADER.FIELDS (Content-Type)]",
    "BODY.PEEK[2]",
    "BODY.PEEK[2.MIME]",
    "BODY.PEEK[2.HEADER]",
    "BODY.PEEK[2.TEXT]",
    "BODY.PEEK[2.HEADER.FIELDS (subject)]",
    "BODY.PEEK[2.1]",
    "BODY.PEEK[2.1.MIME]",
    "BODY.PEEK[2.2]",
    "BODY.PEEK[2.1.1]",
    "BODY.PEEK[2]<3.7>",
    "BODY.PEEK[2.TEXT]<0.10>",
    "BODY.PEEK[3]",
    "BODY.PEEK[9]",
    "BODY.PEEK[1.1.1.1]",
    # these set \Seen: last, in this order (the first one answers FLAGS too)
    "RFC822.TEXT",
    "RFC822",
    "BODY[1]<0.4>",
]


def read_response(client, tag: bytes) -> tuple[bytes, str]:
    """The untagged octets before the tagged line, and the tagged status word."""
    out = bytearray()
    while True:
        line = client.readline()
        if not line:
            raise EOFError("connection closed")
        if line.startswith(tag + b" "):
            return bytes(out), line.split(b" ", 2)[1].decode("ascii")
        out += line
        while line.endswith(b"}\r\n") and b"{" in line:
            size = int(line[line.rindex(b"{") + 1 : -3])
            out += client.read(size)
            line = client.readline()
            out += line


def deliver(mail_root: Path, names: list[str]) -> None:
    user_root = mail_root / "example.test" / "golden"
    for sub in ("cur", "new", "tmp"):
        (user_root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        folder = user_root / f".{name}"
        for sub in ("cur", "new", "tmp"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / "maildirfolder").touch()
        when, _offset = internaldate(i)
        path = folder / "cur" / f"{when}.M{i}P1.golden:2,"
        path.write_bytes((HERE / f"{name}.eml").read_bytes())
        os.utime(path, (when, when))


def internaldate(i: int) -> tuple[int, int]:
    """Message i's INTERNALDATE (its file's mtime) and the UTC offset Dovecot shows it in."""
    when = BASE_TIME + i * 3671
    return when, time.localtime(when).tm_gmtoff // 60


def main() -> None:
    os.environ["TZ"] = TZ  # Dovecot's import_environment passes TZ to the imap process
    time.tzset()
    names = sorted(p.stem for p in HERE.glob("*.eml"))
    version = subprocess.run(["dovecot", "--version"], capture_output=True, text=True).stdout.strip()
    work = Path(tempfile.mkdtemp(prefix="mx-golden-"))
    work.chmod(0o755)  # Dovecot's mail processes run as nobody when this runs as root
    instance = None
    try:
        mail_root = work / "mail"
        deliver(mail_root, names)
        instance = launch(work / "dovecot", mail_root, {USER: PASSWORD})
        instance.hand_over()
        client = instance.imap(USER, PASSWORD)
        for i, name in enumerate(names):
            typ, _ = client.select(name)
            assert typ == "OK", (name, typ)
            records = []
            for n, items in enumerate(COMMANDS):
                tag = b"g%d" % n
                client.send(tag + b" FETCH 1 " + items.encode("ascii") + b"\r\n")
                data, status = read_response(client, tag)
                records.append(b">>> %s %s %d\n%s\n" % (items.encode("ascii"), status.encode("ascii"),
                                                         len(data), data))
            head = (f"# Dovecot {version}, TZ={TZ}, recorded by tests/data/mime/record.py from {name}.eml\n"
                    f"# (FETCH 1 <items> in a folder holding only that message; do not edit)\n"
                    "# internaldate %d %d\n" % internaldate(i)).encode()
            (HERE / "golden" / f"{name}.txt").write_bytes(head + b"".join(records))
            print(f"{name}: {len(records)} answers")
        client.logout()
    finally:
        if instance is not None:
            instance.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
