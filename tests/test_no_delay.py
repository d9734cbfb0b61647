"""Every connection of the daemons' listeners, and the PB clients', has TCP_NODELAY (xaind/no_delay.py)."""

from __future__ import annotations

import socket
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.spread import pb
from twisted.web.resource import Resource
from twisted.web.server import Site

from xaind.connection_limits import ConnectionLimits, LimitedPBServerFactory
from xaind.limited_channel import limited_channel_class
from xaind.testing.waiting import wait_until, within
from xaind.tls import LossReportingPBClientFactory


def no_delay(transport: Any) -> int:
    return transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest_twisted.ensureDeferred
async def test_http_connections_of_the_daemons_sites_have_no_delay() -> None:
    site = Site(Resource())
    site.protocol = limited_channel_class()
    built: list[Any] = []
    build = site.buildProtocol
    site.buildProtocol = lambda address: built.append(build(address)) or built[-1]  # type: ignore[method-assign]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    client = await within(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(Factory.forProtocol(Protocol)))
    try:
        await wait_until(lambda: built and built[0].transport is not None)
        assert no_delay(built[0].transport) != 0
    finally:
        client.transport.loseConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_pb_connections_have_no_delay_on_both_ends() -> None:
    server = LimitedPBServerFactory(pb.Root(), ConnectionLimits(), reactor)
    brokers: list[pb.Broker] = []
    build = server.buildProtocol
    server.buildProtocol = lambda address: brokers.append(build(address)) or brokers[-1]  # type: ignore[method-assign]
    port = reactor.listenTCP(0, server, interface="127.0.0.1")
    client = LossReportingPBClientFactory()
    client_broker = await within(TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(client))
    try:
        await within(client.getRootObject())
        assert (no_delay(brokers[0].transport) != 0, no_delay(client_broker.transport) != 0) == (True, True)
    finally:
        client.disconnect()
        await port.stopListening()
