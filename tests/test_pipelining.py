"""Pipelined requests are answered one at a time and in order, whatever the Twisted release.

The channel of the daemons' sites is driven byte by byte here (no sockets):
the Twisted releases this runs on decide which channel `QuietSite` uses, so
the older releases' channel (`InOrderHTTPChannel`) is also checked directly,
on every release. The end-to-end case (pipelined requests behind a sendfile
download on a real socket) is in test_aggregator_http.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from xaind.pipelining import in_order_channel_class, twisted_parses_pipelined_requests_in_order
from xaind.twisted_internals import InOrderHTTPChannel
from xaind.web import QuietSite

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)


class Held(Resource):
    """`/hold/<name>` waits until the test answers it; `/now/<name>` and POSTs are answered at once."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []
        self.rendered: list[bytes] = []

    def render(self, request: Request) -> bytes | int:
        self.rendered.append(request.path)
        if request.path.startswith(b"/hold/"):
            self.held.append(request)
            return NOT_DONE_YET
        return b"answer " + request.path + b" " + request.content.read()


def connect(make_channel: Callable[[QuietSite], Any], resource: Held) -> tuple[Any, StringTransport]:
    """A channel for a site serving `resource`, connected to a transport that keeps what it is sent."""
    site = QuietSite(resource)
    channel = make_channel(site)
    channel.timeOut = None  # no idle timer on the reactor
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def answer(request: Request, body: bytes) -> None:
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def get(path: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"GET " + path + b" HTTP/1.1", b"Host: 127.0.0.1", *headers]) + b"\r\n\r\n"


def post(path: bytes, body: bytes) -> bytes:
    head = [b"POST " + path + b" HTTP/1.1", b"Host: 127.0.0.1", b"Content-Length: " + str(len(body)).encode()]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def answers(transport: StringTransport) -> list[bytes]:
    """The bodies written so far, in order (every answer here has a small body and a content length)."""
    bodies = []
    for response in transport.value().split(b"HTTP/1.1 ")[1:]:
        bodies.append(response.partition(b"\r\n\r\n")[2])
    return bodies


def older_releases_channel(site: QuietSite) -> InOrderHTTPChannel:
    channel = InOrderHTTPChannel()
    channel.requestFactory = site.requestFactory
    channel.site = site
    return channel


def sites_channel(site: QuietSite) -> Any:
    return site.buildProtocol(CLIENT)


CHANNELS = pytest.mark.parametrize("make_channel", [older_releases_channel, sites_channel])


@CHANNELS
def test_a_pipelined_request_waits_until_the_one_before_it_is_answered(make_channel: Callable[[QuietSite], Any]) -> None:
    resource = Held()
    channel, transport = connect(make_channel, resource)

    channel.dataReceived(get(b"/hold/1") + get(b"/now/2") + get(b"/now/3", b"Connection: close"))

    assert resource.rendered == [b"/hold/1"]
    assert transport.value() == b"" and not transport.disconnecting
    answer(resource.held.pop(), b"first")
    assert resource.rendered == [b"/hold/1", b"/now/2", b"/now/3"]
    assert answers(transport) == [b"first", b"answer /now/2 ", b"answer /now/3 "]
    assert transport.disconnecting  # the Connection: close of the last request, after every answer
    channel.connectionLost(Failure(ConnectionDone()))


@CHANNELS
def test_what_follows_a_body_answered_at_once_is_parsed(make_channel: Callable[[QuietSite], Any]) -> None:
    resource = Held()
    channel, transport = connect(make_channel, resource)

    channel.dataReceived(post(b"/now/1", b"body") + get(b"/now/2"))

    assert resource.rendered == [b"/now/1", b"/now/2"]
    assert answers(transport) == [b"answer /now/1 body", b"answer /now/2 "]
    channel.connectionLost(Failure(ConnectionDone()))


@CHANNELS
def test_requests_arriving_after_the_held_one_wait_too(make_channel: Callable[[QuietSite], Any]) -> None:
    resource = Held()
    channel, transport = connect(make_channel, resource)

    channel.dataReceived(get(b"/hold/1"))
    channel.dataReceived(get(b"/hold/2"))
    channel.dataReceived(post(b"/now/3", b"x"))

    assert resource.rendered == [b"/hold/1"]
    answer(resource.held.pop(), b"one")
    assert resource.rendered == [b"/hold/1", b"/hold/2"]
    answer(resource.held.pop(), b"two")
    assert answers(transport) == [b"one", b"two", b"answer /now/3 x"]
    channel.connectionLost(Failure(ConnectionDone()))


def test_the_older_channel_is_used_exactly_where_twisted_lacks_the_fix() -> None:
    expected = None if twisted_parses_pipelined_requests_in_order() else InOrderHTTPChannel
    assert in_order_channel_class() is expected


def test_a_pipelined_requests_header_deadline_starts_once_the_one_before_it_is_answered() -> None:
    resource = Held()
    site = QuietSite(resource, reactor=MemoryReactorClock())
    clock = site.reactor
    limits = site.limits
    channel = site.buildProtocol(CLIENT)
    transport = StringTransport()
    channel.makeConnection(transport)

    channel.dataReceived(get(b"/hold/1") + get(b"/now/2") + b"GET /now/3 HTTP/1.1\r\nHo")  # the third never completes
    clock.advance(limits.header_timeout * 3)  # the first is answered late: no deadline runs meanwhile
    assert not transport.disconnecting and resource.rendered == [b"/hold/1"]
    answer(resource.held.pop(), b"first")
    assert answers(transport) == [b"first", b"answer /now/2 "]
    clock.advance(limits.header_timeout - 0.1)
    assert not transport.disconnecting
    clock.advance(0.1)  # the third's deadline ran from when it was played back

    assert transport.disconnecting
    assert transport.value().split(b"HTTP/1.1 ")[-1].startswith(b"408 ")
    assert b'"code":"header_timeout"' in transport.value()
    channel.connectionLost(Failure(ConnectionDone()))
    assert clock.getDelayedCalls() == []
