"""Change notification for Maildir folders: who reads a folder hears soon after it changes.

A reader (an IMAP IDLE session; a POP3 session needs none) subscribes to a folder's path
and gets a call, coalesced, after any file appears in, vanishes from or is renamed within
its `new/` or `cur/`. The store stays pure (`Folder.refresh()` says *what* changed); this
module, in the protocol layer, says *when* to ask.

Invariants:
- One inotify instance per process and one kernel watch per directory, shared by every
  subscriber of that folder (10,000 IDLE sessions on one INBOX cost one watch, not 10,000
  file descriptors); the watch goes when the last subscriber does.
- Where inotify is missing or cannot watch (another OS, the watch limit reached) and always
  when `poll` is set (NFS: other hosts' writes never reach this host's inotify), the folder
  is polled instead: two `stat`s of `new/` and `cur/` every `interval` seconds, in the given
  thread pool so a slow file server never stalls the reactor.
- Deliveries by this process are announced directly (`notify`), so a reader hears of its
  own server's mail at once even without inotify.
- Callbacks for one folder are coalesced into one call per reactor turn, and a subscriber's
  exception is logged, never propagated to the others.
- A selected IMAP folder is held (`hold`): a change counter, no callback. The reactor reads
  inotify only while some folder has a subscriber; a Hold drains the kernel's queue itself
  when asked for its count, so events nobody waits for cost the reactor nothing. A full
  kernel queue (IN_Q_OVERFLOW) counts as a change of every watched folder.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["FolderWatch", "Hold", "Subscription", "POLL_INTERVAL"]

log = Logger()

POLL_INTERVAL = 1.0  # seconds between polls where inotify does not serve
SUBDIRS = ("new", "cur")

try:  # Linux only
    from twisted.internet import inotify as _inotify
    from twisted.python.filepath import FilePath

    _MASK = (_inotify.IN_CREATE | _inotify.IN_MOVED_TO | _inotify.IN_MOVED_FROM | _inotify.IN_DELETE
             | _inotify.IN_ATTRIB | _inotify.IN_DELETE_SELF | _inotify.IN_MOVE_SELF)
    _ROOT_MASK = _MASK | _inotify.IN_CLOSE_WRITE
    class _INotify(_inotify.INotify):  # type: ignore[misc, name-defined]
        """Twisted's INotify with a reader that costs little per event.

        Twisted's reader reads 8 KiB per reactor turn, slices its buffer after every event
        (quadratic in a burst) and makes a FilePath per event. A session's own STORE 1:1000
        is 2,000 events (a rename is IN_MOVED_FROM + IN_MOVED_TO): read that way, 20-30 ms of
        the reactor (issue 11). Here one `doRead` drains the queue in 64 KiB reads, walks
        each with offsets, and calls every touched watch's callbacks once, with the events'
        masks OR-ed; a callback gets the watched directory, never the file's name (nobody
        here needs it). A watch the kernel dropped (IN_IGNORED: its directory was deleted)
        is forgotten; the other watches go on (Twisted's reader closes the whole notifier
        at an IN_DELETE_SELF).
        """

        def doRead(self) -> None:
            masks: dict[int, int] = {}
            while True:
                try:
                    data = os.read(self._fd, _READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                end, offset = len(data), 0
                while offset + _EVENT_SIZE <= end:  # the kernel never splits an event over reads
                    wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                    offset += _EVENT_SIZE + size
                    masks[wd] = masks.get(wd, 0) | mask
                if end < _READ_SIZE - _MAX_EVENT:
                    break  # the queue is drained (one more read would say EAGAIN)
            overflow = masks.pop(-1, 0) & _inotify.IN_Q_OVERFLOW
            if overflow:  # the kernel's queue was full and events were lost: anything may have changed
                masks = dict.fromkeys(self._watchpoints, _inotify.IN_Q_OVERFLOW) | masks
            for wd, mask in masks.items():
                iwp = self._watchpoints.get(wd)
                if iwp is None:
                    continue
                if mask & _inotify.IN_IGNORED:
                    del self._watchpoints[wd]
                    self._watchpaths.pop(iwp.path, None)
                for callback in iwp.callbacks:
                    callback(iwp, iwp.path, mask)

except ImportError:  # pragma: no cover - other platforms poll
    _inotify = None  # type: ignore[assignment]

_EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
_EVENT_SIZE = _EVENT.size
_MAX_EVENT = _EVENT_SIZE + 256  # NAME_MAX + 1, padded
_READ_SIZE = 1 << 16


def _stamp(folder: Path) -> tuple[int, ...]:
    """In a thread: what polling compares (mtime and inode of new/ and cur/; -1 if missing)."""
    out: list[int] = []
    for sub in SUBDIRS:
        try:
            st = os.stat(folder / sub)
            out += [st.st_mtime_ns, st.st_ino]
        except OSError:
            out += [-1, -1]
    return tuple(out)


@dataclass(eq=False)
class Subscription:
    """One reader's interest in one folder; `cancel()` ends it."""

    folder: Path
    callback: Callable[[], None]
    _watch: FolderWatch | None = field(default=None, repr=False)

    def cancel(self) -> None:
        if self._watch is not None:
            self._watch._unsubscribe(self)
            self._watch = None


@dataclass(eq=False)
class Hold:
    """A reader's wish to know whether `folder` changed, without a callback (a session that
    has the folder selected but does not idle); `cancel()` ends it."""

    folder: Path
    _watch: FolderWatch | None = field(default=None, repr=False)

    def generation(self) -> int | None:
        """How many changes inotify has reported for the folder so far, counting what the
        kernel queued up to now; None where the folder is polled (then only a look at the
        folder can tell). The same number twice: nothing in the folder changed between."""
        return self._watch._generation_now(self.folder) if self._watch is not None else None

    def cancel(self) -> None:
        if self._watch is not None:
            self._watch._release(self)
            self._watch = None


@dataclass(eq=False)
class _Watched:
    subscribers: list[Subscription] = field(default_factory=list)
    inotify_paths: list[Any] = field(default_factory=list)
    polling: bool = False
    stamp: tuple[int, ...] | None = None
    pending: IDelayedCall | None = None
    holds: int = 0
    generation: int = 0  # changes seen (inotify events, own deliveries)


class FolderWatch:
    """Every watched folder of the process, with inotify or polling underneath."""

    def __init__(self, reactor: Any, *, pool: ThreadPool | None = None, poll: bool = False,
                 interval: float = POLL_INTERVAL, use_inotify: bool = True) -> None:
        self._reactor: IReactorTime = reactor
        self._pool = pool
        self._poll_always = poll
        self._folders: dict[Path, _Watched] = {}
        self._notifier: Any = None
        self._reading = False  # the notifier is registered with the reactor
        self._callbacks = 0  # subscribers over all folders (holds not counted)
        self._use_inotify = use_inotify and _inotify is not None
        self._poller = LoopingCall(self._poll)
        self._poller.clock = reactor
        self._interval = interval

    # -- subscribing -----------------------------------------------------------------------

    def subscribe(self, folder: Path, callback: Callable[[], None]) -> Subscription:
        """Call `callback()` (soon, once per burst) whenever `folder` changes."""
        folder = Path(folder)
        watched = self._folders.get(folder)
        if watched is None:
            watched = self._folders[folder] = _Watched()
            self._start_watching(folder, watched)
        sub = Subscription(folder, callback, self)
        watched.subscribers.append(sub)
        self._callbacks += 1
        self._update_reading()
        return sub

    def hold(self, folder: Path) -> Hold:
        """Watch `folder` for `Hold.generation`; no callback, so a delivery to a folder that
        10,000 sessions hold selected costs one counter step, not 10,000 calls."""
        folder = Path(folder)
        watched = self._folders.get(folder)
        if watched is None:
            watched = self._folders[folder] = _Watched()
            self._start_watching(folder, watched)
        watched.holds += 1
        return Hold(folder, self)

    def _generation_now(self, folder: Path) -> int | None:
        watched = self._folders.get(folder)
        if watched is None or watched.polling or self._notifier is None:
            return None
        # Events the kernel queued before now (a file another process moved into new/ just
        # before the client's command) are read here, not on a later reactor turn.
        self._notifier.doRead()
        return watched.generation

    def _release(self, hold: Hold) -> None:
        watched = self._folders.get(hold.folder)
        if watched is None or watched.holds <= 0:
            return
        watched.holds -= 1
        self._drop_if_unused(hold.folder, watched)

    def _unsubscribe(self, sub: Subscription) -> None:
        watched = self._folders.get(sub.folder)
        if watched is None:
            return
        try:
            watched.subscribers.remove(sub)
        except ValueError:
            return
        self._callbacks -= 1
        self._update_reading()
        self._drop_if_unused(sub.folder, watched)

    def _update_reading(self) -> None:
        """The reactor reads inotify only while someone wants a callback (IDLE). A Hold
        reads the queue itself when asked (`generation`): a session's own STORE 1:1000 (2,000
        events) then never wakes the reactor while the disk thread renames, nor makes it
        fight that thread for the GIL (measured: STORE 1:1000 27-28 ms read as it happened,
        against 18-19 ms without watches)."""
        if self._notifier is None:
            return
        wanted = self._callbacks > 0
        if wanted and not self._reading:
            self._notifier.startReading()
        elif not wanted and self._reading:
            self._notifier.stopReading()
        self._reading = wanted

    def _drop_if_unused(self, folder: Path, watched: _Watched) -> None:
        if watched.subscribers or watched.holds:
            return
        del self._folders[folder]
        if watched.pending is not None and watched.pending.active():
            watched.pending.cancel()
        for path in watched.inotify_paths:
            try:
                self._notifier.ignore(path)
            except KeyError:
                pass
        self._update_poller()

    def watched(self) -> int:
        """How many folders have subscribers (for tests and the operator's logs)."""
        return len(self._folders)

    def stop(self) -> None:
        for watched in list(self._folders.values()):
            for sub in list(watched.subscribers):
                sub.cancel()
        if self._poller.running:
            self._poller.stop()
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None

    # -- announcing ------------------------------------------------------------------------

    def notify(self, folders: Iterable[Path]) -> None:
        """This process changed `folders` (a delivery): tell their readers now."""
        for folder in folders:
            watched = self._folders.get(Path(folder))
            if watched is not None:
                self._changed(watched)

    def _changed(self, watched: _Watched) -> None:
        watched.generation += 1
        if watched.subscribers and (watched.pending is None or not watched.pending.active()):
            watched.pending = self._reactor.callLater(0, self._fire, watched)

    def _fire(self, watched: _Watched) -> None:
        watched.pending = None
        for sub in list(watched.subscribers):
            try:
                sub.callback()
            except Exception:
                log.failure("a folder change callback failed for {folder}", folder=str(sub.folder))

    # -- inotify ---------------------------------------------------------------------------

    def _start_watching(self, folder: Path, watched: _Watched) -> None:
        if self._use_inotify and not self._poll_always:
            try:
                if self._notifier is None:
                    self._notifier = _INotify(self._reactor)
                    self._reading = False
                    self._update_reading()
                for sub in SUBDIRS:
                    path = FilePath(str(folder / sub))
                    self._notifier.watch(path, mask=_MASK, callbacks=[lambda _w, _p, _m, w=watched: self._changed(w)])
                    watched.inotify_paths.append(path)
                # The folder itself: `dovecot-uidlist` and `dovecot-keywords` are replaced
                # there (a new UIDVALIDITY, new keyword names) with no file of new/ or cur/
                # changing. Subfolders' own files are not reported here (not recursive).
                path = FilePath(str(folder))
                self._notifier.watch(path, mask=_ROOT_MASK, callbacks=[lambda _w, _p, _m, w=watched: self._changed(w)])
                watched.inotify_paths.append(path)
                return
            except Exception as e:  # no inotify here, the watch limit, a missing folder
                log.info("polling {folder}: inotify unavailable ({error})", folder=str(folder), error=str(e))
                for path in watched.inotify_paths:
                    try:
                        self._notifier.ignore(path)
                    except Exception:
                        pass
                watched.inotify_paths = []
        watched.polling = True
        self._update_poller()

    # -- polling ---------------------------------------------------------------------------

    def _update_poller(self) -> None:
        wanted = any(w.polling for w in self._folders.values())
        if wanted and not self._poller.running:
            self._poller.start(self._interval, now=True)
        elif not wanted and self._poller.running:
            self._poller.stop()

    def _poll(self) -> Deferred[None]:
        polled = [(folder, w) for folder, w in self._folders.items() if w.polling]
        if not polled:
            return succeed(None)
        folders = [folder for folder, _w in polled]
        if self._pool is not None:
            d = deferToThreadPool(self._reactor, self._pool, lambda: [_stamp(f) for f in folders])  # type: ignore[arg-type]
        else:
            d = succeed([_stamp(f) for f in folders])

        def compare(stamps: list[tuple[int, ...]]) -> None:
            for (_folder, watched), stamp in zip(polled, stamps):
                if watched.stamp is not None and stamp != watched.stamp:
                    self._changed(watched)
                watched.stamp = stamp

        d.addCallback(compare)
        d.addErrback(lambda f: log.failure("polling Maildir folders failed", f))
        return d

