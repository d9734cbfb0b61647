"""A connection pipelining thousands of requests does not keep the others waiting for all of them.

twisted.web answers every request a read brought, one after the other, in
the same reactor turn: 2,000 rendez-vous pipelined on one connection held
every other participant's heartbeat for their whole time (p99 159 ms,
measured with `xaind.tools.rendez_vous_flood`). A channel of either daemon
answers at most `PIPELINED_PER_TURN` requests of a connection per turn,
then reads that connection again on the next turn, after the others.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Request

from xaind.limited_channel import PIPELINED_PER_TURN
from xaind.web import JSONAPIResource, QuietSite

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
REQUEST = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


class Status(JSONAPIResource):
    def route(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


def test_pipelined_requests_are_answered_a_few_per_reactor_turn_in_order() -> None:
    site = QuietSite(Status(), reactor=MemoryReactorClock())
    channel = site.buildProtocol(CLIENT)
    transport = StringTransport(peerAddress=CLIENT)
    channel.makeConnection(transport)
    count = 5 * PIPELINED_PER_TURN + 3
    channel.dataReceived(REQUEST * count)
    answered = lambda: transport.value().count(b"HTTP/1.1 200 ")  # noqa: E731
    assert answered() == PIPELINED_PER_TURN
    assert transport.producerState == "paused"  # nothing more is read from it meanwhile
    channel.dataReceived(REQUEST)  # arrived anyway (already read): kept behind the others
    per_turn = []
    for _ in range(100):  # each pending call is the connection's next turn (a Clock would run them all in one advance)
        turns = [call for call in site.reactor.calls if call.func == channel._take_turn]
        if not turns:
            break
        turn = turns[0]
        site.reactor.calls.remove(turn)
        before = answered()
        turn.func(*turn.args, **turn.kw)
        per_turn.append(answered() - before)
    assert answered() == count + 1
    assert per_turn == [PIPELINED_PER_TURN] * 4 + [4]
    assert transport.producerState == "producing"
    assert not transport.disconnecting
    channel.connectionLost(None)
    assert site.reactor.getDelayedCalls() == [] or all(not call.active() for call in site.reactor.getDelayedCalls())


def test_a_connection_lost_while_it_waits_for_its_turn_leaves_nothing_scheduled() -> None:
    site = QuietSite(Status(), reactor=MemoryReactorClock())
    channel = site.buildProtocol(CLIENT)
    transport = StringTransport(peerAddress=CLIENT)
    channel.makeConnection(transport)
    channel.dataReceived(REQUEST * (PIPELINED_PER_TURN + 5))
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    channel.connectionLost(Failure(ConnectionDone()))
    site.reactor.advance(0)
    assert transport.value().count(b"HTTP/1.1 200 ") == PIPELINED_PER_TURN
