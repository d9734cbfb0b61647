"""The private parts of Twisted that xaind reads are there, and a missing one fails loudly.

Run on the oldest Twisted setup.py allows (22.4.0) and on the newest: a
release that renamed or removed one of these parts fails here, and stops
the aggregator at start-up, instead of making uploads buffer whole or
downloads send bytes out of order without a word.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.web import http

from xaind import twisted_internals
from xaind.twisted_internals import (
    InOrderHTTPChannel,
    TwistedInternalsChanged,
    check_in_order_channel,
    check_twisted_internals,
    request_line,
    write_buffer_bytes,
)


def test_the_parts_used_at_start_up_are_there() -> None:
    check_twisted_internals.__wrapped__()


def test_the_in_order_channel_parts_are_there() -> None:
    # Needed only where the pipelining fix is missing, but checked on every
    # release: InOrderHTTPChannel is tested on every release too.
    check_in_order_channel.__wrapped__()
    assert issubclass(InOrderHTTPChannel, http.HTTPChannel)


def test_request_line_is_the_parsed_method_and_target() -> None:
    seen: list[tuple[bytes, bytes]] = []

    class Probe(http.Request):
        def gotLength(self, length: int | None) -> None:
            seen.append(request_line(self.channel))
            super().gotLength(length)

    channel = http.HTTPChannel()
    channel.timeOut = None
    channel.requestFactory = Probe
    channel.makeConnection(StringTransport())
    channel.dataReceived(b"PUT /a%20b/c?d=e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n")
    channel.connectionLost(Failure(ConnectionDone()))
    assert seen == [(b"PUT", b"/a%20b/c?d=e")]


def test_a_channel_without_the_request_line_is_an_error_not_a_fallback() -> None:
    channel = http.HTTPChannel()
    with pytest.raises(TwistedInternalsChanged, match="_command"):
        request_line(channel)


def test_write_buffer_bytes_counts_unflushed_writes() -> None:
    ours, theirs = socket.socketpair()
    try:
        transport = tcp.Connection(ours, None, MemoryReactor())
        assert write_buffer_bytes(transport) == 0
        transport.connected = True
        transport.write(b"abc")
        transport.writeSequence([b"de", b"f"])
        assert write_buffer_bytes(transport) == 6
    finally:
        ours.close()
        theirs.close()


def test_a_transport_without_the_buffer_parts_is_an_error() -> None:
    class Renamed:
        dataBuffer = b""
        offset = 0

    with pytest.raises(TwistedInternalsChanged, match="_tempDataLen"):
        write_buffer_bytes(Renamed())  # type: ignore[arg-type]


def test_a_changed_channel_stops_the_start_up_check(monkeypatch: pytest.MonkeyPatch) -> None:
    def renamed(channel: http.HTTPChannel) -> tuple[bytes, bytes]:
        raise TwistedInternalsChanged("HTTPChannel has no _command while a request's headers are parsed")

    monkeypatch.setattr(twisted_internals, "request_line", renamed)
    with pytest.raises(TwistedInternalsChanged):
        check_twisted_internals.__wrapped__()


def test_a_channel_without_the_pipelining_parts_stops_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(http.HTTPChannel, "_finishRequestBody")
    with pytest.raises(TwistedInternalsChanged, match="_finishRequestBody"):
        check_in_order_channel.__wrapped__()
