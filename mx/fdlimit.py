"""The process's open-file limit, raised at start-up so every admitted connection gets a socket.

Each connection is a file descriptor; a soft RLIMIT_NOFILE of 1,024 (a common default)
would make `accept()` fail with EMFILE long before `limits.max_connections`. The soft limit
may be raised to the hard limit without privileges, so mx does that at start and says so;
beyond the hard limit it is the operator's call (systemd `LimitNOFILE=`, `ulimit -Hn`).
"""

from __future__ import annotations

import resource

__all__ = ["raise_nofile_limit", "below", "SPARE_FDS"]

SPARE_FDS = 64  # files beyond the connections: listeners, Maildir and queue files, logs, pipes


def raise_nofile_limit(wanted: int) -> tuple[int, int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (or leave it if it is higher already).

    Returns (old soft, new soft, hard). `wanted` (the connections plus spare) is the target
    only when there is no hard limit; callers warn when `below(new, wanted)`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                return soft, target, hard
            except (ValueError, OSError):
                pass
    return soft, soft, hard


def below(limit: int, wanted: int) -> bool:
    """Whether a limit (RLIM_INFINITY for none) is less than `wanted`."""
    return limit != resource.RLIM_INFINITY and limit < wanted
