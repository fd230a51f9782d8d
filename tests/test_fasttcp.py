"""mx.fasttcp: direct-write connections keep Twisted's ordering, back-pressure and close."""

from __future__ import annotations

import socket

from twisted.internet import defer, endpoints, reactor, task, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from mx.fasttcp import (
    DIRECT_LIMIT,
    DirectConnectReactor,
    DirectWriteClient,
    DirectWriteEndpoint,
    DirectWriteServer,
    direct_connect,
    direct_write,
)

BIG = bytes(range(256)) * ((3 * DIRECT_LIMIT) // 256)


class Talker(Protocol):
    """Writes small, big and small again on connect, then closes."""

    def connectionMade(self) -> None:
        self.factory.transports.append(self.transport)
        self.transport.write(b"220 hello\r\n")
        self.transport.write(BIG)
        for n in range(100):
            self.transport.write(b"%d\r\n" % n)
        self.transport.loseConnection()


def read_all(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


class DirectWriteTests(unittest.TestCase):
    async def test_bytes_arrive_in_order_and_the_connection_closes(self) -> None:
        factory = Factory.forProtocol(Talker)
        factory.transports = []
        port = await DirectWriteEndpoint(reactor, 0, 50, "127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        got = await threads.deferToThread(read_all, port.getHost().port)
        expected = b"220 hello\r\n" + BIG + b"".join(b"%d\r\n" % n for n in range(100))
        self.assertEqual(got, expected)
        self.assertIsInstance(factory.transports[0], DirectWriteServer)

    async def test_client_bytes_arrive_in_order(self) -> None:
        # The relay's side: a client endpoint given `direct_connect(reactor)`.
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(10)

            def accept_and_read() -> bytes:
                conn, _ = server.accept()
                with conn:
                    chunks = []
                    while data := conn.recv(65536):
                        chunks.append(data)
                    return b"".join(chunks)

            got = threads.deferToThread(accept_and_read)
            factory = Factory.forProtocol(Talker)
            factory.transports = []
            endpoint = endpoints.TCP4ClientEndpoint(direct_connect(reactor), "127.0.0.1", server.getsockname()[1])
            await endpoint.connect(factory)
            expected = b"220 hello\r\n" + BIG + b"".join(b"%d\r\n" % n for n in range(100))
            self.assertEqual(await got, expected)
        self.assertIsInstance(factory.transports[0], DirectWriteClient)

    def test_direct_connect_only_on_reactors_with_file_descriptors(self) -> None:
        self.assertIsInstance(direct_connect(reactor), DirectConnectReactor)
        self.assertEqual(direct_connect(reactor).callLater, reactor.callLater)  # the rest is the reactor's
        clock = task.Clock()
        self.assertIs(direct_connect(clock), clock)

    def test_only_plain_tcp_endpoints_are_swapped(self) -> None:
        tcp = endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
        self.assertIsInstance(direct_write(tcp), DirectWriteEndpoint)
        unix = endpoints.serverFromString(reactor, "unix:/tmp/mx-fasttcp-test.sock")
        self.assertIs(direct_write(unix), unix)

    async def test_write_after_the_peer_left_does_not_raise(self) -> None:
        done: defer.Deferred[None] = defer.Deferred()

        class Late(Protocol):
            def dataReceived(self, data: bytes) -> None:
                reactor.callLater(0.2, self.reply)

            def reply(self) -> None:
                for _ in range(50):
                    self.transport.write(b"x" * 1000)  # the peer is gone: must not raise
                self.transport.loseConnection()
                done.callback(None)

        port = await DirectWriteEndpoint(reactor, 0, 50, "127.0.0.1").listen(Factory.forProtocol(Late))
        self.addCleanup(port.stopListening)
        s = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(b"hi\r\n")
        s.close()  # reset: the replies meet a closed peer
        await done
