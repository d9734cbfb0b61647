"""xaind.connection_limits: concurrent connections per listener and per source address.

A thousand slow sockets locked every new participant out of a daemon. Each
listener (both HTTP APIs, the coordinator's PB) now counts its
connections: over `max_connections`, or `max_connections_per_address` from
one address, a new connection is closed at once (HTTP: after a 503
`too_many_connections`, which costs nothing to write), and one log line
per interval says how many were.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.spread import pb

from xaind.connection_limits import ConnectionCounter, ConnectionLimits, LimitedPBServerFactory
from xaind.http_limits import HTTPLimits
from xaind.protocol import ErrorCode
from xaind.testing.memory_http import MemoryHTTP
from xaind.web import JSONAPIResource, QuietSite


def test_counter_admits_up_to_each_limit_and_frees_on_release() -> None:
    counter = ConnectionCounter("test", ConnectionLimits(max_connections=5, max_connections_per_address=3), Clock())
    assert [counter.admit("a") for _ in range(4)] == [True, True, True, False]
    assert [counter.admit("b") for _ in range(3)] == [True, True, False]
    assert counter.open == 5
    counter.release("a")
    assert counter.admit("c") is True
    assert counter.admit("b") is False  # the total is full again
    for address in ("a", "a", "b", "b", "c"):
        counter.release(address)
    assert counter.open == 0
    assert counter.by_address == {}


class Status(JSONAPIResource):
    def route(self, request):  # type: ignore[no-untyped-def]
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


def test_an_http_connection_over_the_limit_gets_503_too_many_connections_and_is_closed() -> None:
    site = QuietSite(Status(), limits=HTTPLimits(max_connections=10, max_connections_per_address=2))
    site.reactor = MemoryReactorClock()
    http = MemoryHTTP(site)
    first, second = http.connect(), http.connect()
    third = http.connect()
    assert third.closed_by_server
    answer = third.response()
    assert answer.code == 503
    assert answer.json["code"] == ErrorCode.TOO_MANY_CONNECTIONS.value
    first.close()
    fourth = http.request(b"GET", b"/status")
    assert fourth.response().code == 200
    second.close()
    http.close()
    assert site.connections.open == 0


def test_a_pb_connection_over_the_limit_is_refused_and_a_lost_one_frees_its_place() -> None:
    factory = LimitedPBServerFactory(pb.Root(), ConnectionLimits(max_connections=10, max_connections_per_address=1), Clock())
    address = IPv4Address("TCP", "127.0.0.1", 40001)
    broker = factory.buildProtocol(address)
    assert broker is not None
    broker.makeConnection(StringTransport(peerAddress=address))
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40002)) is None
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 40003)) is not None
    broker.connectionLost(None)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40004)) is not None
