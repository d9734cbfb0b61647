"""`xaind-tcp:`: a TCP listener that may share its port with other processes (SO_REUSEPORT).

Several coordinator processes on one machine (state.redis, docs/scale.rst)
listen on the same address, `xaind-tcp:8081:interface=0.0.0.0:reusePort=yes`,
and the kernel spreads new connections among them; when one process dies,
new connections go to the others. Without `reusePort=yes` it is `tcp:`.

The socket is made here (SO_REUSEADDR as Twisted sets it, SO_REUSEPORT
before bind) and handed to the reactor with `adoptStreamPort`, Twisted's
public way to listen on a socket it did not create.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import Deferred, execute
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

from xaind.tls_server import endpoint_flag

DEFAULT_BACKLOG = 50


@implementer(IStreamServerEndpoint)
class ReusePortServerEndpoint:
    """Listens on `interface`:`port`, sharing the port with other processes when `reuse_port`."""

    def __init__(self, reactor: Any, port: int, interface: str = "", backlog: int = DEFAULT_BACKLOG, reuse_port: bool = False) -> None:
        if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("reusePort=yes needs SO_REUSEPORT, which this system lacks")
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.backlog = backlog
        self.reuse_port = reuse_port

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return execute(self._listen, factory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        listening = socket.socket(family, socket.SOCK_STREAM)
        try:
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind((self.interface, self.port))
            listening.listen(self.backlog)
            listening.setblocking(False)
            # The reactor listens on a duplicate of the descriptor: this one is closed either way.
            return self.reactor.adoptStreamPort(listening.fileno(), family, factory)
        finally:
            listening.close()


def reuse_port_server_endpoint(
    reactor: Any, port: str, interface: str = "", backlog: str = str(DEFAULT_BACKLOG), reusePort: str = "no"  # noqa: N803 - the endpoint string's key
) -> ReusePortServerEndpoint:
    """The endpoint of `xaind-tcp:<port>[:interface=...][:backlog=...][:reusePort=yes]`."""
    return ReusePortServerEndpoint(reactor, int(port), interface, int(backlog), endpoint_flag(reusePort, "reusePort"))
