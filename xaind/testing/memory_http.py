"""Raw HTTP/1.1 spoken to a twisted.web `Site` over in-memory transports, for tests.

Why: most tests of the daemons' HTTP APIs are about what a resource answers,
not about sockets. Served with `reactor.listenTCP` and a real client, every
request costs a connection through the kernel, and a test that wants to see
that a request is *not yet* answered can only poll the reactor for a while.
Here the site's own protocol (`site.buildProtocol`, so its request class,
its channel and its pipelining channel on old Twisted releases) is connected
to a `StringTransport`, the request's bytes are handed to it with
`dataReceived`, and whatever the server wrote is parsed from
`transport.value()`. An answer that depends only on the test's fakes and
clocks is complete, or visibly not, when `dataReceived` returns; one that
waits for the reactor (a worker thread, a streamed download) is awaited with
`MemoryConnection.answer`, which fires when the answer is complete instead
of polling for it.

The bytes are those a socket carries: a real request line, headers and body
(Content-Length or chunked, sent in whatever pieces the test chooses) go
in, and the status line, headers and body (Content-Length, chunked, or up
to the end of the connection) are parsed here, strictly, rather than by
twisted.web's own client, so that the wire format is what the tests check.

What an in-memory transport does not have, tests that need it keep a real
socket for: back-pressure from a slow reader, the kernel's `sendfile`, the
TCP transport's read size, a peer that hangs up mid-request, segments that
arrive as the network delivers them, and timeouts in real time.

Not twisted.web's test helpers (`twisted.web.test.requesthelper`): they
import twisted.trial, whose pytest hook then adds an attribute to every
`Failure` that PB on Twisted 22.4 refuses to send, and a `DummyRequest`
skips the channel, where the aggregator's upload streaming lives.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

#: The address the in-memory server pretends to listen on.
SERVER_ADDRESS = IPv4Address("TCP", "127.0.0.1", 8080)

#: The last chunk of a chunked body (no trailers).
LAST_CHUNK = b"0\r\n\r\n"

_NO_BODY_CODES = frozenset({204, 304})


class MalformedResponse(ValueError):
    """What the server wrote is not an HTTP/1.1 response."""


class ResponseNotComplete(AssertionError):
    """A response was expected to be complete and is not (yet).

    An AssertionError, so that pytest reports it as the failed expectation
    it is. `received` is everything the server wrote on the connection.
    """

    def __init__(self, message: str, received: bytes) -> None:
        super().__init__(f"{message}; received {received[:300]!r}{'...' if len(received) > 300 else ''}")
        self.received = received


@dataclass
class HTTPResponse:
    """One response as it was sent: header names in lower case, every value kept."""

    code: int
    reason: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes] | None:
        """The values of header `name` (any case), None if it was not sent."""
        return self.headers.get(name.lower())

    @property
    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


# -- the client's side of the wire ---------------------------------------------------------


def request_bytes(
    method: bytes,
    target: bytes,
    headers: Mapping[bytes, bytes] | None = None,
    body: bytes | None = None,
    *,
    close: bool = True,
) -> bytes:
    """An HTTP/1.1 request: Host, Content-Length for a body, `Connection: close` unless `close` is false."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1"]
    given = {name.lower() for name in (headers or {})}
    if body is not None and b"content-length" not in given and b"transfer-encoding" not in given:
        lines.append(b"Content-Length: %d" % len(body))
    if close and b"connection" not in given:
        lines.append(b"Connection: close")
    lines += [name + b": " + value for name, value in (headers or {}).items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def chunk(piece: bytes) -> bytes:
    """One chunk of a chunked body; `LAST_CHUNK` ends the body."""
    if not piece:
        raise ValueError("an empty chunk ends the body: send LAST_CHUNK")
    return b"%x\r\n%s\r\n" % (len(piece), piece)


# -- parsing what the server wrote ---------------------------------------------------------


def parse_head(head: bytes) -> tuple[int, bytes, dict[bytes, list[bytes]]]:
    """Status code, reason and headers (names in lower case) of a response head without its blank line."""
    status, *lines = head.split(b"\r\n")
    version, _, rest = status.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.0", b"HTTP/1.1") or len(code) != 3 or not code.isdigit():
        raise MalformedResponse(f"not an HTTP/1.x status line: {status!r}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or line[:1] in (b" ", b"\t"):
            raise MalformedResponse(f"not a header line: {line!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    return int(code), reason, headers


def _take_chunked(data: bytes) -> tuple[bytes, bytes] | None:
    """The body of the chunked coding `data` starts with and what follows it, or None if incomplete."""
    body, position = bytearray(), 0
    while True:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            return None
        size_field = data[position:line_end].split(b";")[0].strip()
        try:
            size = int(size_field, 16)
        except ValueError:
            raise MalformedResponse(f"not a chunk size: {data[position:line_end]!r}") from None
        if size == 0:
            trailers_end = data.find(b"\r\n\r\n", line_end)
            if trailers_end < 0:
                return None
            return bytes(body), data[trailers_end + 4 :]
        start, end = line_end + 2, line_end + 2 + size
        if len(data) < end + 2:
            return None
        if data[end : end + 2] != b"\r\n":
            raise MalformedResponse(f"chunk of {size} bytes not followed by CRLF: {data[end : end + 2]!r}")
        body += data[start:end]
        position = end + 2


def parse_response(data: bytes, *, head_request: bool = False, closed: bool = False) -> tuple[HTTPResponse, bytes] | None:
    """The response `data` starts with and the bytes after it; None while it is incomplete.

    `head_request`: it answers a HEAD (no body whatever the headers say).
    `closed`: the connection has ended, so a body without length or chunking
    ends here, and an incomplete response raises `ResponseNotComplete`.
    """
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if closed:
            raise ResponseNotComplete("the connection ended inside a response head", data)
        return None
    code, reason, headers = parse_head(data[:end])
    rest = data[end + 4 :]
    if head_request or code in _NO_BODY_CODES or 100 <= code < 200:
        return HTTPResponse(code, reason, headers, b""), rest
    coding = headers.get(b"transfer-encoding")
    if coding is not None:
        if coding != [b"chunked"]:
            raise MalformedResponse(f"unexpected transfer coding {coding!r}")
        taken = _take_chunked(rest)
        if taken is None:
            if closed:
                raise ResponseNotComplete("the connection ended inside a chunked body", data)
            return None
        body, rest = taken
        return HTTPResponse(code, reason, headers, body), rest
    lengths = headers.get(b"content-length")
    if lengths is not None:
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise MalformedResponse(f"bad Content-Length {lengths!r}")
        length = int(lengths[0])
        if len(rest) < length:
            if closed:
                raise ResponseNotComplete(f"the connection ended {length - len(rest)} bytes into a body of {length}", data)
            return None
        return HTTPResponse(code, reason, headers, rest[:length]), rest[length:]
    if not closed:
        return None  # the body runs to the end of the connection
    return HTTPResponse(code, reason, headers, rest), b""


def parse_responses(data: bytes, head_requests: Iterable[bool] = (), *, closed: bool = False) -> tuple[list[HTTPResponse], bytes]:
    """The complete responses at the start of `data` (as sent on one connection) and what follows them.

    `head_requests`: for each request of the connection in order, whether it
    was a HEAD; requests beyond it are taken as not.
    """
    kinds = itertools.chain(head_requests, itertools.repeat(False))
    responses: list[HTTPResponse] = []
    rest = data
    while rest:
        parsed = parse_response(rest, head_request=next(kinds), closed=closed)
        if parsed is None:
            break
        response, rest = parsed
        responses.append(response)
    return responses, rest


# -- the in-memory connection --------------------------------------------------------------


class MemoryTransport(StringTransport):
    """A `StringTransport` that tells its connection whenever the server writes or closes.

    Lenient: a real TCP transport ignores `resumeProducing` after
    `loseConnection`, which the HTTP channel may call once its last request
    is answered. It has no `bufferSize` and no file descriptor, so the
    aggregator neither enlarges its reads nor uses `sendfile` on it.
    """

    def __init__(self, host: IPv4Address, peer: IPv4Address, changed: Callable[[], None]) -> None:
        super().__init__(hostAddress=host, peerAddress=peer, lenient=True)
        self._changed = changed

    def write(self, data: bytes) -> None:
        super().write(data)
        self._changed()

    def writeSequence(self, data: Iterable[bytes]) -> None:
        super().writeSequence(data)
        self._changed()

    def loseConnection(self) -> None:
        super().loseConnection()
        self._changed()


class MemoryConnection:
    """One client connection to the site, in memory.

    The server closing the connection (`loseConnection`) only marks the
    transport; the server's protocol hears of the end (`connectionLost`,
    which is where twisted.web ends requests and timers) when the test next
    reads the connection, awaits an answer, or closes it: the moment a real
    reactor would report it, after the server's own call returned.
    """

    def __init__(self, protocol: IProtocol, peer: IPv4Address, later: Callable[[Callable[[], None]], object]) -> None:
        self.protocol = protocol
        self.transport = MemoryTransport(SERVER_ADDRESS, peer, self._changed)
        self.head_requests: list[bool] = []
        self.lost = False
        self._later = later
        self._waiters: list[tuple[int, Deferred[HTTPResponse]]] = []
        self._check_scheduled = False
        protocol.makeConnection(self.transport)

    # -- sending

    def send(self, data: bytes) -> None:
        """Bytes from the client, as one read of the server's socket would deliver them."""
        if self.lost:
            raise ConnectionDone("the connection has ended; nothing more can be sent on it")
        self.protocol.dataReceived(data)

    def request(
        self,
        method: bytes,
        target: bytes,
        headers: Mapping[bytes, bytes] | None = None,
        body: bytes | None = None,
        *,
        close: bool = True,
    ) -> None:
        """Send one whole request (see `request_bytes`)."""
        self.note_request(method)
        self.send(request_bytes(method, target, headers, body, close=close))

    def note_request(self, method: bytes) -> None:
        """Record a request sent with `send` in pieces, so that its answer is parsed right (HEAD has no body)."""
        self.head_requests.append(method == b"HEAD")

    # -- what the server did

    @property
    def received(self) -> bytes:
        """Everything the server wrote on this connection."""
        return self.transport.value()

    @property
    def closed_by_server(self) -> bool:
        """Whether the server closed (or aborted) the connection."""
        return bool(self.transport.disconnecting)

    @property
    def aborted_by_server(self) -> bool:
        """Whether the server aborted the connection (`abortConnection`)."""
        return bool(self.transport.disconnected)

    @property
    def answered(self) -> bool:
        """Whether a whole response has arrived (for every request noted, at least one)."""
        return len(self._complete()) >= max(1, len(self.head_requests))

    def responses(self) -> list[HTTPResponse]:
        """The complete responses so far; bytes after them must be the start of the next one."""
        self._deliver_end()
        responses, rest = parse_responses(self.received, self.head_requests, closed=self.lost)
        if self.lost and rest:
            raise ResponseNotComplete("bytes after the last complete response", rest)
        return responses

    def response(self) -> HTTPResponse:
        """The one response of this connection, which must be complete."""
        responses = self.responses()
        if len(responses) != 1:
            raise ResponseNotComplete(f"expected one complete response, found {len(responses)}", self.received)
        return responses[0]

    def answer(self, count: int = 1) -> Deferred[HTTPResponse]:
        """Fires with response number `count` (1-based) once it is complete.

        It fires on a later turn of the reactor, never from inside the
        server's write, so the test resumes once the server's call returned,
        as it would after reading a socket. Fails with `ResponseNotComplete`
        if the server ends the connection first. Bound it (`within`).
        """
        responses = self._complete()
        if len(responses) >= count:
            self._deliver_end()
            return succeed(responses[count - 1])
        waiter: Deferred[HTTPResponse] = Deferred()
        self._waiters.append((count, waiter))
        self._changed()  # the server may have closed already
        return waiter

    # -- ending

    def close(self) -> None:
        """End the connection (the client closing it, or the server's close reported); idempotent."""
        if not self.lost:
            self.lost = True
            self.protocol.connectionLost(Failure(ConnectionDone("in-memory connection closed")))

    def _deliver_end(self) -> None:
        if self.closed_by_server:
            self.close()

    def _complete(self) -> list[HTTPResponse]:
        return parse_responses(self.received, self.head_requests, closed=False)[0]

    def _changed(self) -> None:
        if self._waiters and not self._check_scheduled:
            self._check_scheduled = True
            self._later(self._check)

    def _check(self) -> None:
        self._check_scheduled = False
        self._deliver_end()
        waiting, self._waiters = self._waiters, []
        responses: list[HTTPResponse] | None = None
        failure: Failure | None = None
        try:
            responses = parse_responses(self.received, self.head_requests, closed=self.lost)[0]
        except (MalformedResponse, ResponseNotComplete):
            failure = Failure()
        for count, waiter in waiting:
            if responses is not None and len(responses) >= count:
                waiter.callback(responses[count - 1])
            elif failure is not None:
                waiter.errback(failure)
            elif self.lost:
                waiter.errback(Failure(ResponseNotComplete(f"the connection ended after {len(responses or [])} response(s)", self.received)))
            else:
                self._waiters.append((count, waiter))


class MemoryHTTP:
    """A client of `site` over in-memory connections, one per `request` (as a client without keep-alive).

    The site's own timers (its channels' idle timeout, the aggregator's grace
    before closing a refused upload's connection) run on `site.reactor`:
    build the site with a `MemoryReactorClock` (or set `site.reactor` to one
    before the first request) so that they wait for the test's clock and
    leave nothing on the real reactor.

    `reactor` is where an awaited answer is delivered from (`answer`); by
    default the global reactor, looked up when first needed, so that tests
    that never await do not touch it.
    """

    def __init__(self, site: Site, reactor: IReactorTime | None = None) -> None:
        self.site = site
        self.connections: list[MemoryConnection] = []
        self._reactor = reactor
        self._ports = itertools.count(40000)

    def connect(self) -> MemoryConnection:
        """A new connection from 127.0.0.1, through the site's own `buildProtocol`."""
        peer = IPv4Address("TCP", "127.0.0.1", next(self._ports))
        protocol = self.site.buildProtocol(peer)
        if protocol is None:
            raise ConnectionRefusedError(f"{self.site!r} refused a connection from {peer}")
        connection = MemoryConnection(protocol, peer, self._call_soon)
        self.connections.append(connection)
        return connection

    def request(
        self, method: bytes, target: bytes, headers: Mapping[bytes, bytes] | None = None, body: bytes | None = None
    ) -> MemoryConnection:
        """Send one request with `Connection: close` on a new connection; its answer is read from the connection."""
        connection = self.connect()
        connection.request(method, target, headers, body)
        return connection

    def close(self) -> None:
        """End every connection still open (after a test): the server ends what it still holds."""
        for connection in self.connections:
            connection.close()

    def _call_soon(self, call: Callable[[], None]) -> object:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor  # type: ignore[assignment]
        return self._reactor.callLater(0, call)
