"""TCP connections that send at once instead of waiting for the next reactor turn.

Twisted's `FileDescriptor.write` only buffers: it registers the socket for writability with
epoll, and the next reactor turn sends the bytes and unregisters it again. A mail server's
replies are small and its sockets nearly always writable, so every reply cost two
`epoll_ctl` calls and a reactor turn (issue 11's profile: ~8 % of the reactor thread at 50
connections, one message per connection). `DirectWriteServer.write` sends straight away when
nothing is buffered and buffers only what the kernel did not take, so ordering, back-pressure
(producers are paused by the buffered remainder as before) and error handling (a failed send
leaves the bytes to `doWrite`, which reports the lost connection) stay Twisted's.

`direct_write(endpoint)` swaps a plain `tcp:` server endpoint for one that listens with these
connections; any other endpoint is returned unchanged. `direct_connect(reactor)` is the
client side: the relay's connections to remote MXs send their commands and bodies the same
way (in a queue drain, two writes per transaction).

Invariants:
- Bytes leave in the order they were written: the direct send happens only when nothing is
  waiting in the transport's buffers.
- Under STARTTLS (`self.TLS`) writes take Twisted's path: the TLS layer sends its records
  through `FileDescriptor.write` itself.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, endpoints, tcp
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from zope.interface import implementer

__all__ = ["DirectWriteServer", "DirectWriteClient", "DirectWritePort", "DirectWriteEndpoint", "DirectConnectReactor",
           "direct_write", "direct_connect"]

DIRECT_LIMIT = 1 << 17  # bigger writes go through the buffer (a direct send would copy the rest)


class _DirectWrite(tcp.Connection):
    """The write that sends at once when the transport's buffers are empty."""

    def write(self, data: bytes) -> None:
        if (self.TLS or not self.connected or self.disconnecting or self._writeDisconnected
                or self._tempDataLen or len(self.dataBuffer) > self.offset
                or type(data) is not bytes or len(data) > DIRECT_LIMIT):
            super().write(data)
            return
        try:
            sent = self.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error doWrite will meet again and report
        if sent < len(data):
            super().write(data[sent:])


class DirectWriteServer(_DirectWrite, tcp.Server):
    """A server connection that sends at once when its buffers are empty."""


class DirectWriteClient(_DirectWrite, tcp.Client):
    """A client connection (the relay's, to a remote MX) that sends at once likewise."""


class DirectWriteConnector(tcp.Connector):
    def _makeTransport(self) -> DirectWriteClient:
        return DirectWriteClient(self.host, self.port, self.bindAddress, self, self.reactor)


class DirectConnectReactor:
    """A reactor whose `connectTCP` makes `DirectWriteClient` connections (what the posix
    reactors' connectTCP does, with our Connector); everything else is the reactor's own.
    Given to Twisted's TCP client endpoints, which only call `connectTCP` for an address."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30.0,
                   bindAddress: Any = None) -> DirectWriteConnector:
        c = DirectWriteConnector(host, port, factory, timeout, bindAddress, self._reactor)
        c.connect()
        return c

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def direct_connect(reactor: Any) -> Any:
    """`reactor` for client endpoints, connecting with direct-write connections when it has
    file descriptors (epoll, poll, select, asyncio); any other reactor unchanged."""
    if not hasattr(reactor, "addWriter") or not hasattr(reactor, "connectTCP"):
        return reactor
    return DirectConnectReactor(reactor)


class DirectWritePort(tcp.Port):
    transport = DirectWriteServer


@implementer(IStreamServerEndpoint)
class DirectWriteEndpoint:
    """`TCP4ServerEndpoint` / `TCP6ServerEndpoint`, listening with `DirectWritePort`."""

    def __init__(self, reactor: Any, port: int, backlog: int, interface: str) -> None:
        self._reactor = reactor
        self._port = port
        self._backlog = backlog
        self._interface = interface

    def listen(self, protocolFactory: Factory) -> defer.Deferred[IListeningPort]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: Factory) -> DirectWritePort:
        # What the posix reactors' listenTCP does, with our Port class.
        port = DirectWritePort(self._port, factory, self._backlog, self._interface, self._reactor)
        port.startListening()
        return port


def direct_write(endpoint: Any) -> Any:
    """The same listener with direct-write connections, for a plain TCP endpoint on a reactor
    with file descriptors (epoll, poll, select, asyncio); anything else unchanged."""
    if type(endpoint) not in (endpoints.TCP4ServerEndpoint, endpoints.TCP6ServerEndpoint):
        return endpoint
    reactor = endpoint._reactor  # noqa: SLF001 - the endpoint keeps its arguments privately
    if not hasattr(reactor, "addWriter"):
        return endpoint
    return DirectWriteEndpoint(reactor, endpoint._port, endpoint._backlog, endpoint._interface)  # noqa: SLF001
