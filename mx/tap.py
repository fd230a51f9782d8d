"""twistd entry point: `twistd -n mx [--config PATH]` builds the whole server from the config.

This is the only module that touches the global reactor; everything else gets its reactor,
clock and thread pool passed in.

Invariants:
- A config error stops start-up with one line naming the key (SystemExit), no traceback.
- Shutdown order: stop listening, let in-flight commits finish (others get 421), then stop
  the disk thread pool, so nothing acknowledged is interrupted.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from mx import config as configmod
from mx.config import Config
from mx.auth import Authenticator
from mx.control import POLL_INTERVAL, ServerLock, read_requests
from mx.delivery import Delivery, remove_spilled
from mx.dns import Resolver
from mx.durable import unlink_quietly
from mx.relay import Relay
from mx.routing import Router
from mx.spool import QueueEntry, Spool
from mx.tls import ServerTLS, TLSError
from mx.smtpserver import SMTPServerFactory
from mx.users import UserDB, UsersError

__all__ = ["Options", "makeService", "MailService", "build"]

log = Logger()

DISK_THREADS = 8
AUTH_THREADS = 2


class Options(usage.Options):
    optParameters = [["config", "c", None, "Path to mx.toml (default: ./etc/mx.toml if present, else built-in defaults)"]]


class MailService(service.MultiService):
    """The whole server: listeners, their factories, and the disk thread pool."""

    def __init__(self, config: Config, reactor: Any, **relay_options: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=DISK_THREADS, name="mx-disk")
        self.users = UserDB(config.auth.users_file)
        self.router = Router(config, self.users.exists)
        self.spool = Spool(config.data_dir / "queue")
        self.delivery = Delivery(config, reactor, self.pool, spool=self.spool, on_queued=self._queued)
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
        self.tls = ServerTLS(config)  # raises TLSError naming the file
        self.factories: list[SMTPServerFactory] = []
        self.listeners: list[StreamServerEndpointService] = []
        listen = config.listen
        for kind in ("smtp", "submission", "submissions"):
            if getattr(listen, kind):
                self._listen(kind, getattr(listen, kind))

    def _listen(self, kind: str, description: str) -> SMTPServerFactory:
        implicit = kind == "submissions"  # RFC 8314: TLS from the first byte
        factory = SMTPServerFactory(
            config=self.config,
            router=self.router,
            delivery=self.delivery,
            clock=self.reactor,
            kind=kind,
            tls=self.tls,
            implicit_tls=implicit,
            authenticator=self.authenticator,
        )
        endpoint = endpoints.serverFromString(self.reactor, description)
        if implicit:
            endpoint = endpoints.wrapServerTLS(self.tls, endpoint)
        svc = StreamServerEndpointService(endpoint, factory)
        svc._raiseSynchronously = True  # a port that cannot be bound stops start-up
        svc.setName(kind)
        svc.setServiceParent(self)
        self.factories.append(factory)
        self.listeners.append(svc)
        return factory

    def _queued(self, entry: QueueEntry) -> None:
        self.relay.enqueue(entry)

    def _poll_control(self) -> Deferred[None]:
        """`mx queue flush|delete` requests (mx.control), checked once a second."""
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
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.pool.start()
        self.auth_pool.start()
        # Messages half-received when the last run stopped: nobody was told 250 for them.
        deferToThreadPool(self.reactor, self.pool, remove_spilled, self.delivery.spill_dir)
        self.relay.startService()
        self.control.start(POLL_INTERVAL, now=False)
        super().startService()
        log.info(
            "mx started: hostname={hostname} data_dir={data_dir} local_domains={domains} listening={listening}",
            hostname=self.config.hostname,
            data_dir=str(self.config.data_dir),
            domains=list(self.config.local_domains),
            listening={s.name: d for s, d in zip(self.listeners, self._descriptions())},
        )

    def _descriptions(self) -> list[str]:
        listen = self.config.listen
        return [getattr(listen, s.name) for s in self.listeners]

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[override]
        # 1. stop accepting new connections
        yield defer.DeferredList([defer.maybeDeferred(s.stopService) for s in self.listeners])
        # 2. drain: in-flight commits finish, idle connections get 421
        yield defer.DeferredList([f.shutdown() for f in self.factories])
        if self.control.running:
            self.control.stop()
        # 3. the relay: running attempts get a few seconds, then are cut (intent is recorded,
        #    so a cut transaction is simply sent again after the restart)
        yield self.relay.stopService()
        service.Service.stopService(self)
        # 4. the thread pools last (they join their threads; nothing is pending any more)
        self.auth_pool.stop()
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
    """Certificate renewal without a restart: SIGHUP re-reads `[tls]` for new connections."""

    def handler(signum: int, frame: object) -> None:
        mail.reactor.callFromThread(mail.tls.reload)

    signal.signal(signal.SIGHUP, handler)


def makeService(options: Options) -> MailService:
    config = load_config(options["config"])
    # One server per data_dir: two relays on one queue would send everything twice.
    lock = ServerLock(config.data_dir / "queue")
    if not lock.acquire():
        raise SystemExit(f"mx: another mx server is running with data_dir {config.data_dir}")
    try:
        mail = build(config)
    except (UsersError, TLSError) as e:
        raise SystemExit(f"mx: {e}") from None
    _reload_tls_on_sighup(mail)
    mail.lock = lock  # held (the file stays open) for the life of the process
    return mail
