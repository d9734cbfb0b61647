"""Every use of Twisted's private attributes, in one place, checked before anything listens.

xaind streams uploads and downloads at a level twisted.web has no public
API for, so a few private parts are read here and nowhere else:

- the request line an `HTTPChannel` parsed (`_command`, `_path`), which the
  aggregator needs in `Request.gotLength`, before the body arrives, to
  stream an upload instead of letting twisted.web buffer it whole;
- the write buffer of a TCP transport (`dataBuffer`, `offset`,
  `_tempDataLen`), which must be empty before the kernel may `sendfile`
  into the socket, or bytes would go out of order;
- the pipelining parts of the channel (`_handlingRequest`, `_dataBuffer`,
  `_finishRequestBody`) that `InOrderHTTPChannel` uses on releases without
  the fix for CVE-2023-46137 (see xaind/pipelining.py).

Checked against Twisted 22.4.0 (PyPI, the oldest setup.py allows), Debian
12's python3-twisted 22.4.0-4+deb12u1 (the same channel and transport code,
with the pipelining fix backported) and 26.10.0 (the newest); the tests in
tests/test_twisted_internals.py, tests/test_pipelining.py and
tests/test_aggregator_http.py run on both 22.4.0 and the newest.

Where a part is missing the functions here raise `TwistedInternalsChanged`:
the check functions are called when a site that needs them is built, so a
Twisted release that changed them stops the daemon at start-up with the
reason, instead of quietly buffering uploads whole or sending bytes out of
order.
"""

from __future__ import annotations

import functools
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.web import http


class TwistedInternalsChanged(RuntimeError):
    """This Twisted release lacks a private part xaind relies on; xaind needs an update for it."""

    def __init__(self, what: str) -> None:
        import twisted

        super().__init__(f"Twisted {twisted.__version__}: {what} (see xaind/twisted_internals.py)")


def request_line(channel: http.HTTPChannel) -> tuple[bytes, bytes]:
    """The method and request-target of the request whose headers `channel` just parsed.

    `Request.method` and `Request.path` are only set once the whole body has
    arrived; this is for `Request.gotLength`, which runs before the body.
    """
    try:
        command, path = channel._command, channel._path
    except AttributeError as error:
        raise TwistedInternalsChanged(f"HTTPChannel has no {error.name} while a request's headers are parsed") from None
    if not isinstance(command, bytes) or not isinstance(path, bytes):
        raise TwistedInternalsChanged(f"HTTPChannel's request line is {command!r} {path!r}, not bytes")
    return command, path


def write_buffer_bytes(transport: tcp.Connection) -> int:
    """Bytes a Twisted TCP transport holds that the socket has not taken yet."""
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except AttributeError as error:
        raise TwistedInternalsChanged(f"tcp.Connection has no {error.name}") from None


class InOrderHTTPChannel(http.HTTPChannel):
    """The channel of a Twisted release without the fix, parsing a pipelined request only
    after the previous one was answered, as the fixed releases' channel does.

    Uses the channel's private parts as those releases (22.4 up to 23.8) have
    them (`check_in_order_channel` says whether they are there); it is never
    used on a release that has the fix.
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


def probe_channel(request_factory: type[http.Request]) -> http.HTTPChannel:
    """A channel over an in-memory transport, to try out how this release parses requests."""
    channel = http.HTTPChannel()
    channel.timeOut = None  # no idle timer on the reactor for a probe
    channel.requestFactory = request_factory
    channel.makeConnection(StringTransport())
    return channel


def _check_request_line() -> None:
    seen: list[tuple[bytes, bytes]] = []

    class Probe(http.Request):
        def gotLength(self, length: int | None) -> None:
            seen.append(request_line(self.channel))
            super().gotLength(length)

        def process(self) -> None:
            pass

    channel = probe_channel(Probe)
    channel.dataReceived(b"POST /probe/target HTTP/1.1\r\nHost: probe\r\nContent-Length: 1\r\n\r\nx")
    channel.connectionLost(Failure(ConnectionDone()))
    if seen != [(b"POST", b"/probe/target")]:
        raise TwistedInternalsChanged(f"gotLength saw the request line as {seen!r}")


def _check_write_buffer() -> None:
    ours, theirs = socket.socketpair()
    try:
        transport = tcp.Connection(ours, None, MemoryReactor())
        if write_buffer_bytes(transport) != 0:
            raise TwistedInternalsChanged("a new tcp.Connection's write buffer is not empty")
        # Written but not yet flushed: the count must see it.
        transport.connected = True
        transport.write(b"x" * 10)
        if write_buffer_bytes(transport) != 10:
            raise TwistedInternalsChanged("tcp.Connection's write buffer does not count what was written")
    finally:
        ours.close()
        theirs.close()


@functools.cache
def check_twisted_internals() -> None:
    """Raise `TwistedInternalsChanged` unless the request line and write buffer parts work as expected.

    Called when the aggregator's site is built (once per process).
    """
    _check_request_line()
    _check_write_buffer()


@functools.cache
def check_in_order_channel() -> None:
    """Raise `TwistedInternalsChanged` unless `InOrderHTTPChannel`'s parts exist on this release's channel."""
    if not callable(getattr(http.HTTPChannel, "_finishRequestBody", None)):
        raise TwistedInternalsChanged("HTTPChannel has no _finishRequestBody")
    channel: Any = probe_channel(http.Request)
    try:
        for name, kind in (("_handlingRequest", bool), ("_dataBuffer", list)):
            if not isinstance(getattr(channel, name, None), kind):
                raise TwistedInternalsChanged(f"HTTPChannel has no {name} ({kind.__name__})")
    finally:
        channel.connectionLost(Failure(ConnectionDone()))
