"""mx.listeners: the shared connection accounting, and tap's registry of listeners.

The registry is plain bookkeeping: it is tested with small connection objects and a `Clock`.
The limits over several services are tested through the whole server (`mx.tap`) with raw
sockets on loopback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mx.config import LimitsConfig
from mx.listeners import ConnectionRegistry, Refusal, Service, client_key
from tests.support import RawClient, make_config, service_ports, start_mail_service


def limits(per_ip: int = 20, total: int = 1000) -> LimitsConfig:
    return LimitsConfig(max_message_size=1000, max_recipients=10, max_connections_per_ip=per_ip,
                        idle_timeout=60.0, max_connections=total)


@dataclass(eq=False)
class Conn:
    service: Service
    client: str
    closed: bool = False
    aborted: bool = False
    registry: ConnectionRegistry | None = field(default=None, repr=False)
    busy: bool = False

    def close_when_idle(self) -> None:
        self.closed = True
        if not self.busy and self.registry is not None:
            self.registry.release(self)

    def abort(self) -> None:
        self.aborted = True
        if self.registry is not None:
            self.registry.release(self)


class Listener:
    def __init__(self, registry: ConnectionRegistry, service: Service) -> None:
        self.registry, self.service, self.grace = registry, service, None

    def shutdown(self, grace: float = 10.0) -> Deferred[None]:
        self.grace = grace
        return self.registry.drain(self.service, grace)


class ClientKeyTests(SynchronousTestCase):
    def test_table(self) -> None:
        for ip, key in [
            ("192.0.2.1", "192.0.2.1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
            ("2001:db8:1:3::9", "2001:db8:1:3::/64"),
            ("unix", "unix"),
        ]:
            self.assertEqual(client_key(ip), key, ip)


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_per_client_limit_over_all_services(self) -> None:
        reg = ConnectionRegistry(limits(per_ip=2), self.clock)
        a, b, c = (Conn(s, "192.0.2.1") for s in (Service.SMTP, Service.SUBMISSION, Service.IMAP))
        self.assertIsNone(reg.admit(a))
        self.assertIsNone(reg.admit(b))
        self.assertIs(reg.admit(c), Refusal.TOO_MANY_FROM_CLIENT)
        self.assertIsNone(reg.admit(Conn(Service.SMTP, "192.0.2.2")))  # another client
        self.assertEqual(dict(reg.per_ip), {"192.0.2.1": 2, "192.0.2.2": 1})
        reg.release(a)
        self.assertIsNone(reg.admit(c))

    def test_global_limit_and_release(self) -> None:
        reg = ConnectionRegistry(limits(total=3), self.clock)
        conns = [Conn(Service.SMTP if i % 2 else Service.SUBMISSIONS, f"192.0.2.{i}") for i in range(4)]
        self.assertEqual([reg.admit(c) for c in conns], [None, None, None, Refusal.TOO_MANY])
        self.assertEqual(reg.total, 3)
        reg.release(conns[0])
        reg.release(conns[0])  # a second release changes nothing
        reg.release(conns[3])  # never admitted: nothing to release
        self.assertEqual(reg.total, 2)
        self.assertIsNone(reg.admit(conns[3]))
        for c in conns[1:]:
            reg.release(c)
        self.assertEqual((reg.total, dict(reg.per_ip)), (0, {}))

    def test_drain_closes_idle_and_aborts_busy_after_grace(self) -> None:
        reg = ConnectionRegistry(limits(), self.clock)
        smtp, sub = Listener(reg, Service.SMTP), Listener(reg, Service.SUBMISSION)
        reg.register(Service.SMTP, smtp)
        reg.register(Service.SUBMISSION, sub)
        idle = Conn(Service.SMTP, "192.0.2.1", registry=reg)
        busy = Conn(Service.SUBMISSION, "192.0.2.2", registry=reg, busy=True)
        for c in (idle, busy):
            self.assertIsNone(reg.admit(c))
        d = reg.shutdown(5.0)
        self.assertEqual((smtp.grace, sub.grace), (5.0, 5.0))
        self.assertTrue(idle.closed and busy.closed)
        self.assertFalse(d.called)
        self.assertIs(reg.admit(Conn(Service.SMTP, "192.0.2.3")), Refusal.SHUTTING_DOWN)
        self.clock.advance(4.9)
        self.assertFalse(busy.aborted)
        self.clock.advance(0.2)
        self.assertTrue(busy.aborted)
        self.assertTrue(d.called)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_of_one_service_leaves_the_others(self) -> None:
        reg = ConnectionRegistry(limits(), self.clock)
        a = Conn(Service.SMTP, "192.0.2.1", registry=reg)
        b = Conn(Service.SUBMISSION, "192.0.2.1", registry=reg)
        reg.admit(a)
        reg.admit(b)
        d = reg.drain(Service.SMTP)
        self.assertTrue(d.called)
        self.assertTrue(a.closed)
        self.assertFalse(b.closed)
        self.assertIsNone(reg.admit(Conn(Service.SUBMISSION, "192.0.2.5")))

    def test_one_factory_per_service(self) -> None:
        reg = ConnectionRegistry(limits(), self.clock)
        reg.register(Service.SMTP, Listener(reg, Service.SMTP))
        self.assertRaises(ValueError, reg.register, Service.SMTP, Listener(reg, Service.SMTP))

    def test_service_is_a_str_enum(self) -> None:
        self.assertEqual(Service("submissions"), "submissions")
        self.assertTrue(Service.SUBMISSIONS.implicit_tls and Service.SUBMISSIONS.submission)
        self.assertFalse(Service.SMTP.submission or Service.SMTP.implicit_tls)


LISTEN = {"smtp": "tcp:0:interface=127.0.0.1", "submission": "tcp:0:interface=127.0.0.1"}


class MailServiceTests(TestCase):
    timeout = 60

    async def start(self, **limits_: Any) -> Any:
        config = make_config(self, listen=LISTEN, limits=limits_ or None)
        clock = Clock()
        clock.advance(time.time())
        return await start_mail_service(self, config, clock=clock)

    async def test_max_connections_across_two_services(self) -> None:
        """Defect C: `limits.max_connections` holds over all services together."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        mail = await self.start(max_connections=2)
        ports = service_ports(mail)
        clients: list[RawClient] = []
        self.addCleanup(lambda: [c.close() for c in clients])

        def connect(port: int) -> tuple[int, str]:
            c = RawClient(port)
            clients.append(c)
            return c.reply()

        self.assertEqual((await deferToThread(connect, ports["smtp"]))[0], 220)
        self.assertEqual((await deferToThread(connect, ports["submission"]))[0], 220)

        def refused(port: int) -> tuple[tuple[int, str], list[tuple[int, str]]]:
            with RawClient(port) as c:
                return c.reply(), c.until_closed()

        for port in (ports["smtp"], ports["submission"]):
            first, rest = await deferToThread(refused, port)
            self.assertEqual(first[0], 421, first)
            self.assertTrue(first[1].startswith("4.7.0 "), first)
            self.assertEqual(rest, [])
        refusals = [e for e in events if e.get("log_format", "").startswith("refused connection")]
        self.assertEqual(len(refusals), 2)
        self.assertEqual({e["why"] for e in refusals}, {Refusal.TOO_MANY.value})

        def quit_first() -> list[int]:
            c = clients.pop(0)
            c.send(b"QUIT\r\n")
            out = [code for code, _ in c.until_closed()]
            c.close()
            return out

        self.assertEqual(await deferToThread(quit_first), [221])
        self.assertEqual((await deferToThread(connect, ports["submission"]))[0], 220)  # a slot is free

    async def test_every_service_registers_one_factory(self) -> None:
        mail = await self.start()
        self.assertEqual(set(mail.registry.listeners), {Service.SMTP, Service.SUBMISSION})
        for kind, factory in mail.registry.listeners.items():
            self.assertIs(factory.registry, mail.registry)
            self.assertIs(factory.kind, kind)

    async def test_read_pool_started_and_stopped(self) -> None:
        """Seam G: a separate pool for store reads, started and stopped with the others."""
        mail = await self.start()
        self.assertEqual(mail.read_pool.name, "mx-read")
        self.assertTrue(mail.read_pool.started)
        self.assertIsNot(mail.read_pool, mail.pool)
        await mail.stopService()
        self.assertFalse(mail.read_pool.started)
        self.assertFalse(mail.pool.started)

    async def test_queue_control_starts_after_the_queue_is_loaded(self) -> None:
        """Seam H: `mx queue delete` never races the relay's start-up load of the queue."""
        from mx.tap import build
        from twisted.internet import reactor

        config = make_config(self, listen={})
        clock = Clock()
        mail = build(config, reactor, clock=clock)
        mail.startService()
        self.addCleanup(mail.stopService)
        # The load runs in the disk pool and is reported through the reactor: not yet.
        self.assertFalse(mail.relay.loaded.called)
        self.assertFalse(mail.control.running)
        await mail.relay.loaded
        self.assertTrue(mail.control.running)
        self.assertTrue(mail.users_refresh.running)

    async def test_users_refresh_runs_off_the_reactor_thread(self) -> None:
        """Defect A: the users file is re-read by the LoopingCall, in a pool thread."""
        import threading

        from mx import users as usersmod
        from tests.support import add_users

        mail = await self.start()
        self.assertFalse(mail.users.exists("newcomer@example.test"))
        add_users(mail.config, {"newcomer@example.test": "pw"})
        threads: list[threading.Thread] = []
        real = usersmod.read_users

        def read_users(path: Any) -> Any:
            threads.append(threading.current_thread())
            return real(path)

        self.patch(usersmod, "read_users", read_users)
        await mail._refresh_users()  # what the LoopingCall runs every second
        self.assertTrue(mail.users.exists("newcomer@example.test"))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())
