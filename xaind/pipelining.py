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
used untouched everywhere else. That channel reads the channel's private
parts, so it lives in xaind/twisted_internals.py with the other such reads.
"""

from __future__ import annotations

import functools

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web import http

from xaind.twisted_internals import InOrderHTTPChannel, check_in_order_channel, probe_channel

_TWO_PIPELINED_REQUESTS = b"GET /first HTTP/1.1\r\nHost: probe\r\n\r\nGET /second HTTP/1.1\r\nHost: probe\r\n\r\n"


def twisted_parses_pipelined_requests_in_order() -> bool:
    """Whether this Twisted's channel leaves a pipelined request alone until the one before it is answered."""

    processed: list[bytes] = []

    class Recorder(http.Request):
        """Never answered: the first request stays in progress while the second one arrives."""

        def process(self) -> None:
            processed.append(self.uri)

    channel = probe_channel(Recorder)
    channel.dataReceived(_TWO_PIPELINED_REQUESTS)
    channel.connectionLost(Failure(ConnectionDone()))
    return processed == [b"/first"]


@functools.cache
def in_order_channel_class() -> type[http.HTTPChannel] | None:
    """The channel a Site needs to answer pipelined requests in order, or None where Twisted's own does."""
    if twisted_parses_pipelined_requests_in_order():
        return None
    check_in_order_channel()
    return InOrderHTTPChannel
