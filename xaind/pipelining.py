"""Pipelined HTTP/1.1 requests answered one at a time, in order, on every supported Twisted.

A client may send several requests on one keep-alive connection without
waiting for the answers (pipelining). twisted.web releases before 23.10
(CVE-2023-46137; Debian backported the fix to its 22.4) parse every request
that arrived in the same TCP segment at once, so a second request is
rendered while the first one's answer is still streaming: its answer is
written into the middle of the first one's body, a second download's
producer is refused by the channel ("Cannot register producer ... was never
unregistered") and a pipelined `Connection: close` closes the connection
before the earlier answers are out.

`in_order_channel_class` tells the two kinds of release apart by behaviour,
not by version number (a distribution may carry the fix in an old release),
and only where the fix is missing returns a channel that does what the fixed
releases do: it stops parsing when a request is complete and keeps what
follows until that request is answered. The fixed releases' own channel is
used untouched everywhere else.
"""

from __future__ import annotations

import functools

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http

_TWO_PIPELINED_REQUESTS = b"GET /first HTTP/1.1\r\nHost: probe\r\n\r\nGET /second HTTP/1.1\r\nHost: probe\r\n\r\n"


def twisted_parses_pipelined_requests_in_order() -> bool:
    """Whether this Twisted's channel leaves a pipelined request alone until the one before it is answered."""

    processed: list[bytes] = []

    class Recorder(http.Request):
        """Never answered: the first request stays in progress while the second one arrives."""

        def process(self) -> None:
            processed.append(self.uri)

    channel = http.HTTPChannel()
    channel.timeOut = None  # no idle timer on the reactor for a probe
    channel.requestFactory = Recorder
    channel.makeConnection(StringTransport())
    channel.dataReceived(_TWO_PIPELINED_REQUESTS)
    channel.connectionLost(Failure(ConnectionDone()))
    return processed == [b"/first"]


class InOrderHTTPChannel(http.HTTPChannel):
    """The channel of a Twisted release without the fix, parsing a pipelined request only
    after the previous one was answered, as the fixed releases' channel does.

    Uses the channel's private parts as those releases (22.4 up to 23.8) have
    them; it is never used on a release that has the fix.
    """

    def allContentReceived(self) -> None:
        # Raw mode before the request runs: what the parser has not read yet
        # goes to rawDataReceived below and is kept until requestDone plays
        # it back (requestDone switches to line mode again, at once if the
        # request was answered on the spot).
        self.setRawMode()
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._handlingRequest:
            self._dataBuffer.append(data)
            return
        super().rawDataReceived(data)

    def _finishRequestBody(self, data: bytes) -> None:
        # What followed the body is kept before the request runs, so that a
        # request answered on the spot plays it back (the old order lost it).
        self._dataBuffer.append(data)
        self.allContentReceived()


@functools.cache
def in_order_channel_class() -> type[http.HTTPChannel] | None:
    """The channel a Site needs to answer pipelined requests in order, or None where Twisted's own does."""
    if twisted_parses_pipelined_requests_in_order():
        return None
    return InOrderHTTPChannel
