"""twistd entry point: `twistd -n mx [--config PATH]` builds the whole server from the config.

This is the only module that touches the global reactor; everything else gets its reactor,
clock and thread pool passed in.

Invariants:
- A config error stops start-up with one line naming the key (SystemExit), no traceback.
- Shutdown order: stop listening, let in-flight commits finish (others get 421), then stop
  the disk thread pool, so nothing acknowledged is interrupted.
- Every listening service registers its factory in one `ConnectionRegistry` (mx.listeners):
  `limits.max_connections` and `max_connections_per_ip` hold over all services together,
  and `stopService` drains them all through it.
- Three thread pools: "mx-disk" (commits, spill files, the users file refresh), "mx-auth"
  (password hashing) and "mx-read" (store reads: FETCH, SEARCH, RETR), so neither logins nor
  large reads delay the fsyncs behind SMTP's 250.
- `mx queue` requests are polled only after the relay has loaded the queue.
- Started as root with twistd's `--uid`/`--gid`: `makeService` (as root, before the drop)
  hands what the server writes in `data_dir` to that user (`hand_over`), so nothing it made
  as root is out of the unprivileged server's (or `mx` command's) reach.
"""

from __future__ import annotations

import os
import pwd
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mx import config as configmod
from mx import logtext
from mx.config import Config
from mx.auth import Authenticator
from mx.control import POLL_INTERVAL, ServerLock, control_dir, read_requests
from mx.delivery import Delivery, remove_spilled
from mx.dns import Resolver
from mx.listeners import ConnectionRegistry, Service
from mx.mailauth.gate import KEY_REFRESH, MailAuth
from mx.durable import unlink_quietly
from mx.fasttcp import direct_write
from mx.fdlimit import SPARE_FDS, below, raise_nofile_limit
from mx.imap.server import IMAPServerFactory
from mx.pop3server import POP3ServerFactory
from mx.relay import Relay
from mx.routing import LocalRecipient, Router
from mx.spool import QueueEntry, Spool
from mx.store import sweep_tmp
from mx.watch import FolderWatch
from mx.tls import ServerTLS, TLSError
from mx.smtpserver import SMTPServerFactory
from mx.users import UserDB, UsersError

__all__ = ["Options", "makeService", "MailService", "build", "drop_target", "hand_over"]

log = Logger()

DISK_THREADS = 8
AUTH_THREADS = 2
MAILAUTH_THREADS = 8  # each waits on DNS most of its time (SPF, DKIM keys, DMARC)
READ_THREADS = 4
TMP_SWEEP_INTERVAL = 86400.0  # seconds: daily
SHUTDOWN_GRACE = 10.0  # seconds a busy connection gets to finish at shutdown


class Options(usage.Options):
    optParameters = [["config", "c", None, "Path to mx.toml (default: ./etc/mx.toml if present, else built-in defaults)"]]

    def postOptions(self) -> None:
        # twistd's text log, written by mx.logtext's faster formatter (same lines), unless
        # the operator chose an observer (--logger) or syslog.
        if self.parent is not None:
            logtext.use_with(self.parent)


class MailService(service.MultiService):
    """The whole server: listeners (one factory per service, all in one `ConnectionRegistry`),
    the relay, and the thread pools.

    Thread pools, each started in `startService` and stopped last in `stopService`:
    - `pool` ("mx-disk"): durable writes (commits, spill files, the queue) and the users
      file's once-a-second refresh;
    - `auth_pool` ("mx-auth"): password hashing, so a burst of logins never delays a commit;
    - `read_pool` ("mx-read"): store reads (large FETCH, SEARCH, RETR), so they never delay
      the fsyncs behind SMTP's 250.
    """

    def __init__(self, config: Config, reactor: Any, **relay_options: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=DISK_THREADS, name="mx-disk")
        self.read_pool = ThreadPool(minthreads=0, maxthreads=READ_THREADS, name="mx-read")
        self.users = UserDB(config.auth.users_file)  # read once here, before the reactor runs
        self.users_refresh = LoopingCall(self._refresh_users)
        self.users_refresh.clock = reactor
        # Maildir spec: tmp/ files untouched for 36 hours are debris; swept at start-up and daily.
        self.tmp_sweep = LoopingCall(self._sweep_tmp)
        self.tmp_sweep.clock = reactor
        self.router = Router(config, self.users.exists)
        self.spool = Spool(config.data_dir / "queue")
        # Readers of a folder (IMAP IDLE next) hear of changes: inotify, or polling in the read
        # pool; deliveries by this process are announced at once.
        self.watch = FolderWatch(reactor, pool=self.read_pool)
        self.delivery = Delivery(config, reactor, self.pool, spool=self.spool, on_queued=self._queued,
                                 on_delivered=self._delivered)
        self.resolver = Resolver(reactor, config.dns.nameservers, config.dns.timeout)
        # relay_options: tests pass a task.Clock (`clock`), short `timeouts`, a `trust_root`
        self.relay = Relay(
            config, reactor, self.pool, self.spool, self.delivery, self.router, self.resolver, **relay_options
        )
        self.control = LoopingCall(self._poll_control)
        self.control.clock = reactor
        # Password hashing gets its own small pool so it never delays disk commits.
        self.auth_pool = ThreadPool(minthreads=0, maxthreads=AUTH_THREADS, name="mx-auth")
        self.authenticator = Authenticator(self.users, reactor, self.auth_pool)
        # SPF/DKIM/DMARC/ARC on the smtp port and DKIM signing on submission: blocking DNS and
        # RSA in a pool of their own, so a slow nameserver never delays logins or commits.
        self.mailauth_pool = ThreadPool(minthreads=0, maxthreads=MAILAUTH_THREADS, name="mx-mailauth")
        self.mailauth = MailAuth(config, reactor, self.mailauth_pool)
        self.keys_refresh = LoopingCall(self.mailauth.reload_keys)
        self.keys_refresh.clock = reactor
        self.tls = ServerTLS(config)  # raises TLSError naming the file
        # Every service's factory registers here: shared connection limits, one shutdown.
        self.registry = ConnectionRegistry(config.limits, reactor)
        self.listeners: list[StreamServerEndpointService] = []
        factories: dict[Service, Callable[[Service], ServerFactory]] = {
            Service.SMTP: self._smtp_factory,
            Service.SUBMISSION: self._smtp_factory,
            Service.SUBMISSIONS: self._smtp_factory,
            Service.POP3: self._pop3_factory,
            Service.POP3S: self._pop3_factory,
            Service.IMAP: self._imap_factory,
            Service.IMAPS: self._imap_factory,
        }
        for kind, make in factories.items():
            description = getattr(config.listen, kind.value)
            if description:
                self._listen(kind, description, make(kind))

    @property
    def factories(self) -> list[Any]:
        return list(self.registry.listeners.values())

    def _smtp_factory(self, kind: Service) -> SMTPServerFactory:
        return SMTPServerFactory(
            config=self.config,
            router=self.router,
            delivery=self.delivery,
            clock=self.reactor,
            kind=kind,
            tls=self.tls,
            implicit_tls=kind.implicit_tls,
            authenticator=self.authenticator,
            registry=self.registry,
            mailauth=self.mailauth,
        )

    def _pop3_factory(self, kind: Service) -> POP3ServerFactory:
        return POP3ServerFactory(
            config=self.config,
            reactor=self.reactor,
            read_pool=self.read_pool,
            authenticator=self.authenticator,
            kind=kind,
            tls=self.tls,
            implicit_tls=kind.implicit_tls,
            registry=self.registry,
        )

    def _imap_factory(self, kind: Service) -> IMAPServerFactory:
        return IMAPServerFactory(
            config=self.config,
            reactor=self.reactor,
            read_pool=self.read_pool,
            authenticator=self.authenticator,
            watch=self.watch,
            kind=kind,
            tls=self.tls,
            implicit_tls=kind.implicit_tls,
            registry=self.registry,
        )

    def _raise_file_limit(self) -> None:
        wanted = self.config.limits.max_connections + SPARE_FDS
        old, new, hard = raise_nofile_limit(wanted)
        if new != old:
            log.info("open-file limit raised from {old} to {new} (hard limit {hard})", old=old, new=new, hard=hard)
        if below(new, wanted):
            log.warn("open-file limit {new} is below limits.max_connections + {spare} = {wanted}: raise the "
                     "hard limit (e.g. systemd LimitNOFILE=) or lower max_connections",
                     new=new, spare=SPARE_FDS, wanted=wanted)

    def _listen(self, kind: Service, description: str, factory: ServerFactory) -> ServerFactory:
        endpoint = direct_write(endpoints.serverFromString(self.reactor, description))
        if kind.implicit_tls:  # RFC 8314: TLS from the first byte
            endpoint = endpoints.wrapServerTLS(self.tls, endpoint)
        svc = StreamServerEndpointService(endpoint, factory)
        svc._raiseSynchronously = True  # a port that cannot be bound stops start-up
        svc.setName(kind.value)
        svc.setServiceParent(self)
        self.listeners.append(svc)
        return factory

    def _queued(self, entry: QueueEntry) -> None:
        self.relay.enqueue(entry)

    def _delivered(self, mailboxes: tuple[LocalRecipient, ...]) -> None:
        mail_root = self.config.data_dir / "mail"
        self.watch.notify(mail_root / m.domain / m.local for m in mailboxes)

    def _sweep_tmp(self) -> Deferred[None]:
        """Stale files in every mailbox's tmp/ (older than 36 hours), in the disk pool."""
        d = deferToThreadPool(self.reactor, self.pool, sweep_tmp, self.config.data_dir / "mail")

        def done(removed: int) -> None:
            if removed:
                log.info("removed {count} stale files from Maildir tmp/ folders", count=removed)

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("could not sweep Maildir tmp/ folders", f))  # the loop goes on
        return d

    def _refresh_users(self) -> Deferred[None]:
        """The users file, once a second, in the disk pool: RCPT and AUTH read memory only."""
        d = deferToThreadPool(self.reactor, self.pool, self.users.refresh)

        def done(reloaded: bool) -> None:
            if reloaded:
                log.info("users file reloaded: {count} users", count=len(self.users.users()), path=str(self.users.path))
            elif self.users.error is not None and self.users.error != self._users_error:
                log.error("users file not reloaded, the previous users stay: {error}", error=self.users.error)
            self._users_error = self.users.error

        d.addCallback(done)
        d.addErrback(lambda f: log.failure("could not check the users file", f))  # the loop goes on
        return d

    _users_error: str | None = None

    _control_busy = False
    _control_again = False
    _control_notifier: Any = None

    def _poll_control(self) -> Deferred[None]:
        """`mx queue flush|delete` requests (mx.control): checked once a second, and at once
        when inotify says a request arrived; one check at a time (a request that arrives
        during a check gets one more check right after)."""
        if self._control_busy:
            self._control_again = True
            return succeed(None)
        self._control_busy = True
        d = self._read_control()

        def done(_: object) -> Deferred[None] | None:
            self._control_busy = False
            if self._control_again:
                self._control_again = False
                return self._poll_control()
            return None

        return d.addBoth(done)

    def _watch_control(self) -> None:
        """inotify on the control folder, so `mx queue flush` acts at once rather than within
        a second (Linux; elsewhere, or where inotify fails, the poll alone serves)."""
        try:
            from twisted.internet import inotify
            from twisted.python.filepath import FilePath

            folder = control_dir(self.spool.root)
            folder.mkdir(parents=True, exist_ok=True)
            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            notifier.watch(FilePath(str(folder)), mask=inotify.IN_MOVED_TO | inotify.IN_CREATE,
                           callbacks=[lambda _w, _p, _m: self._poll_control()])
        except Exception as e:  # no inotify here (another OS, the watch limit, a test's fake reactor)
            log.info("queue control polled once a second: inotify unavailable ({error})", error=str(e))
            return
        self._control_notifier = notifier

    def _read_control(self) -> Deferred[None]:
        root = self.spool.root
        d = deferToThreadPool(self.reactor, self.pool, read_requests, root)

        async def handle(requests: list[tuple[str, str, Path]]) -> None:
            for action, arg, path in requests:
                log.info("queue {action} requested by the operator {arg}", action=action, arg=arg)
                if action == "flush":
                    self.relay.flush()
                elif action == "delete":
                    await self.relay.delete(arg)
                await deferToThreadPool(self.reactor, self.pool, unlink_quietly, path)

        d.addCallback(lambda requests: Deferred.fromCoroutine(handle(requests)))
        d.addErrback(lambda f: log.failure("queue control failed", f))
        return d

    def startService(self) -> None:
        self._raise_file_limit()
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.pool.start()
        self.auth_pool.start()
        self.read_pool.start()
        self.mailauth_pool.start()
        self.keys_refresh.start(KEY_REFRESH, now=True)
        # Messages half-received when the last run stopped: nobody was told 250 for them.
        deferToThreadPool(self.reactor, self.pool, remove_spilled, self.delivery.spill_dir)
        self.relay.startService()
        self.users_refresh.start(UserDB.RECHECK_INTERVAL, now=False)
        self.tmp_sweep.start(TMP_SWEEP_INTERVAL, now=True)
        super().startService()
        # `mx queue delete` only once the relay has loaded the queue: never racing the load.
        assert self.relay.loaded is not None
        self.relay.loaded.addBoth(self._start_control)
        log.info(
            "mx started: hostname={hostname} data_dir={data_dir} local_domains={domains} listening={listening}",
            hostname=self.config.hostname,
            data_dir=str(self.config.data_dir),
            domains=list(self.config.local_domains),
            listening={s.name: d for s, d in zip(self.listeners, self._descriptions())},
        )

    def _start_control(self, result: object) -> object:
        if self.running and not self.control.running:
            self.control.start(POLL_INTERVAL, now=False)
            self._watch_control()
        return result  # others wait on relay.loaded too

    def _descriptions(self) -> list[str]:
        listen = self.config.listen
        return [getattr(listen, s.name) for s in self.listeners]

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[override]
        # 1. stop accepting new connections
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in self.listeners])
        # 2. drain every service through the registry: in-flight commits finish, idle
        #    connections get 421 (BYE, -ERR), the rest are cut after the grace time
        yield self.registry.shutdown(SHUTDOWN_GRACE)
        for loop in (self.control, self.users_refresh, self.tmp_sweep, self.keys_refresh):
            if loop.running:
                loop.stop()
        if self._control_notifier is not None:
            self._control_notifier.loseConnection()
            self._control_notifier = None
        # 3. the relay: running attempts get a few seconds, then are cut (intent is recorded,
        #    so a cut transaction is simply sent again after the restart)
        yield self.relay.stopService()
        service.Service.stopService(self)
        self.watch.stop()
        # 4. the thread pools last (they join their threads; nothing is pending any more)
        self.read_pool.stop()
        self.auth_pool.stop()
        self.mailauth_pool.stop()
        self.pool.stop()
        log.info("mx stopped")


def load_config(path: str | None) -> Config:
    try:
        return configmod.load(Path(path) if path else configmod.default_path())
    except configmod.ConfigError as e:
        raise SystemExit(f"mx: {e}") from None


def build(config: Config, reactor: Any = None, **relay_options: Any) -> MailService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return MailService(config, reactor, **relay_options)


def _reload_tls_on_sighup(mail: MailService) -> None:
    """Certificate renewal without a restart: SIGHUP re-reads `[tls]` for new connections,
    and the DKIM keys under `<data_dir>/dkim/`."""

    def handler(signum: int, frame: object) -> None:
        mail.reactor.callFromThread(mail.tls.reload)
        mail.reactor.callFromThread(mail.mailauth.reload_keys)  # new DKIM keys

    signal.signal(signal.SIGHUP, handler)


def drop_target(options: usage.Options) -> tuple[int, int] | None:
    """The (uid, gid) twistd switches to after `privilegedStartService` (`--uid`/`--gid`),
    -1 for "unchanged"; None when it switches nothing or we are not root.

    twistd parses its own options first and sets `.parent` on ours; the rule for a `--uid`
    without `--gid` (that user's primary group) is twistd's own
    (`twisted.scripts._twistd_unix.UnixApplicationRunner.startApplication`).
    """
    parent = getattr(options, "parent", None)
    if parent is None or os.geteuid() != 0:
        return None
    uid, gid = parent.get("uid"), parent.get("gid")  # absent where twistd has no --uid
    if uid is not None and gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise SystemExit(f"mx: --uid {uid}: no such user, so no group to run as (give --gid)") from None
    if uid in (None, 0) and gid in (None, 0):
        return None
    return (-1 if uid is None else uid, -1 if gid is None else gid)


_RECURSIVE = True  # `_give(..., below=_RECURSIVE)`: everything under the folder


def _give(dir_fd: int | None, name: str, uid: int, gid: int, below: bool | tuple[str, ...] = ()) -> None:
    """chown `name` (relative to `dir_fd`) to uid:gid if root owns it; then, with `below`
    _RECURSIVE, everything under it, or just the names listed in `below`.

    This runs as root in folders the unprivileged user may have written to, so: symlinks are
    never followed (O_NOFOLLOW, and only folders and regular files are opened), each object
    is checked and changed through one open descriptor (nothing can be swapped in between),
    and a regular file with more than one link is left alone (it could be a hard link to a
    root file, planted to be handed over).
    """
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    if not (is_dir or stat.S_ISREG(st.st_mode)):
        return
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_DIRECTORY if is_dir else 0)
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return  # removed or replaced meanwhile
    try:
        st = os.fstat(fd)
        if st.st_uid == 0 and (is_dir or st.st_nlink == 1):
            os.fchown(fd, uid, gid)
        if is_dir and below:
            if below is _RECURSIVE:
                with os.scandir(fd) as entries:
                    names = [e.name for e in entries]
            else:
                names = list(below)
            for child in names:
                _give(fd, child, uid, gid, below if below is _RECURSIVE else ())
    except OSError as e:
        raise SystemExit(f"mx: cannot hand {name} to uid {uid} gid {gid} for --uid/--gid: {e.strerror}") from None
    finally:
        os.close(fd)


def hand_over(config: Config, uid: int, gid: int) -> None:
    """Before twistd's privilege drop (as root): make what the server writes in `data_dir`
    belong to the user it will run as. `uid`/`gid` -1 leave that id unchanged.

    Only root-owned objects change owner, and only these: `data_dir`; `queue/` and all in it
    (`.lock`, `control/`, messages left by an earlier run as root); `tmp/` and all in it;
    `mail/` itself (not the mailboxes: a tree of any size is not walked at every start);
    `tls/` with the self-signed pair when no certificate is configured (an operator's key
    files stay as they are: they were read as root already); the users file when it lives
    in `data_dir`. `queue/control/` is made here, so that an `mx queue flush` run as root
    does not create it root-owned, where the server could not remove its requests.
    """
    data = Path(os.path.realpath(config.data_dir))
    control = control_dir(data / "queue")
    control.mkdir(parents=True, exist_ok=True)
    inside: list[str] = []
    users = Path(os.path.realpath(config.auth.users_file))
    if users.is_relative_to(data) and users != data:
        inside = list(users.relative_to(data).parts)
    _give(None, str(data), uid, gid)
    fd = os.open(data, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _give(fd, "queue", uid, gid, _RECURSIVE)
        _give(fd, "tmp", uid, gid, _RECURSIVE)
        _give(fd, "mail", uid, gid)
        if config.tls.certificate is None:  # mx.tls.ensure_self_signed made these
            _give(fd, "tls", uid, gid, ("selfsigned-cert.pem", "selfsigned-key.pem"))
        if inside:
            _give_path(fd, inside, uid, gid)
    finally:
        os.close(fd)


def _give_path(dir_fd: int, parts: list[str], uid: int, gid: int) -> None:
    """`_give` each component of the relative path `parts` under `dir_fd`, never following a
    symlink on the way."""
    _give(dir_fd, parts[0], uid, gid)
    if len(parts) == 1:
        return
    try:
        fd = os.open(parts[0], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return
    try:
        _give_path(fd, parts[1:], uid, gid)
    finally:
        os.close(fd)


def makeService(options: Options) -> MailService:
    config = load_config(options["config"])
    target = drop_target(options)
    # One server per data_dir: two relays on one queue would send everything twice.
    lock = ServerLock(config.data_dir / "queue")
    if not lock.acquire():
        raise SystemExit(f"mx: another mx server is running with data_dir {config.data_dir}")
    try:
        mail = build(config)
    except (UsersError, TLSError, configmod.ConfigError) as e:
        raise SystemExit(f"mx: {e}") from None
    if target is not None:
        # twistd binds the listeners as root, then switches user; everything made so far
        # (the lock, the self-signed certificate) must belong to that user by then.
        hand_over(config, *target)
        log.info("data_dir {data_dir} handed to uid {uid} gid {gid} for the privilege drop",
                 data_dir=str(config.data_dir), uid=target[0], gid=target[1])
    _reload_tls_on_sighup(mail)
    mail.lock = lock  # held (the file stays open) for the life of the process
    return mail
