"""JSON over twisted.web, shared by the coordinator's and the aggregator's HTTP APIs."""

from __future__ import annotations

import io
import json
import math
import uuid
from typing import Any

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xaind.connection_limits import ConnectionCounter, address_key, make_room_for
from xaind.http_limits import HTTPLimits
from xaind.limited_channel import limited_channel_class
from xaind.logs import RepeatedEventLog, get_logger
from xaind.protocol import ErrorCode, RateLimited, Refusal

log = get_logger("xaind.web")

JSON_CONTENT_TYPE = b"application/json"

#: Seconds a client refused before its body was read gets to read the answer before the connection closes.
EARLY_ANSWER_GRACE = 2.0

#: The HTTP status of each refusal: the one place a domain refusal becomes an HTTP answer.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.INTERNAL_ERROR: 500,
    ErrorCode.UNKNOWN_TOKEN: 404,
    ErrorCode.ALREADY_ACCEPTED: 409,
    ErrorCode.UPLOAD_IN_PROGRESS: 409,
    ErrorCode.ROUND_ENDED: 409,
    ErrorCode.NOT_EXPECTED: 409,
    ErrorCode.COORDINATOR_UNREACHABLE: 503,
    ErrorCode.MALFORMED_UPLOAD: 400,
    ErrorCode.UPLOAD_TOO_LARGE: 413,
    ErrorCode.UNACCEPTABLE_WEIGHTS: 422,
    ErrorCode.RANGE_NOT_SATISFIABLE: 416,
    ErrorCode.STORAGE_UNAVAILABLE: 503,
    ErrorCode.BODY_TOO_LARGE: 413,
    ErrorCode.HEADER_TIMEOUT: 408,
    ErrorCode.BODY_TOO_SLOW: 408,
    ErrorCode.TOO_MANY_CONNECTIONS: 503,
    ErrorCode.TOO_MANY_PARTICIPANTS: 503,
    ErrorCode.NOT_AUTHENTICATED: 401,
    ErrorCode.RENDEZ_VOUS_RATE_LIMITED: 429,
    ErrorCode.WRONG_ROUND: 409,
    ErrorCode.AGGREGATING: 409,
    ErrorCode.RESULTS_MISSING: 409,
    ErrorCode.AGGREGATION_FAILED: 500,
}


class HTTPError(Refusal):
    """A refusal of the HTTP layer itself (routing, methods, ranges), with the headers it needs."""

    def __init__(self, code: ErrorCode, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message, code)
        self.headers = headers or {}


def http_status(refusal: Refusal) -> int:
    return HTTP_STATUS[refusal.code]


def error_document(refusal: Refusal) -> dict[str, str]:
    """The JSON body of a refusal: `error` for people (the seed's key), `code` for programs."""
    return {"error": refusal.message, "code": refusal.code.value}


def json_body(request: Request, status: int, document: Any) -> bytes:
    """Set the status and content type of `request` and return `document` encoded."""
    return encoded_json_body(request, status, json.dumps(document, separators=(",", ":")).encode("utf-8"))


def encoded_json_body(request: Request, status: int, encoded: bytes) -> bytes:
    """`json_body` for a document encoded already (answers that many requests share)."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return encoded


def error_body(request: Request, refusal: Refusal) -> bytes:
    for name, value in getattr(refusal, "headers", {}).items():
        request.setHeader(name, value)
    if isinstance(refusal, RateLimited):
        request.setHeader(b"retry-after", b"%d" % max(1, math.ceil(refusal.retry_after)))
    return json_body(request, http_status(refusal), error_document(refusal))


def crash_body(request: Request, failure: Any, what: str) -> bytes:
    """A JSON 500 for an unexpected exception, logged with its traceback under an id the client sees."""
    error_id = uuid.uuid4().hex[:12]
    log.failure("{what} crashed (error id {error_id})", failure, what=what, error_id=error_id)
    document = {"error": f"internal error (error id {error_id})", "code": ErrorCode.INTERNAL_ERROR.value, "error_id": error_id}
    return json_body(request, 500, document)


def path_segment(segment: bytes, what: str) -> str:
    """Decode one URL path segment naming `what` (an id, a token)."""
    if not segment:
        raise HTTPError(ErrorCode.NOT_FOUND, f"missing {what}")
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(ErrorCode.BAD_REQUEST, f"{what} is not valid UTF-8") from None


def request_path(request: Request) -> str:
    return request.path.decode("utf-8", "replace")


def require_method(request: Request, *allowed: bytes) -> None:
    if request.method not in allowed:
        names = ", ".join(method.decode() for method in allowed)
        raise HTTPError(
            ErrorCode.METHOD_NOT_ALLOWED,
            f"method {request.method.decode('ascii', 'replace')} not allowed on {request_path(request)}; use {names}",
            {b"allow": ", ".join(method.decode() for method in allowed).encode()},
        )


def early_answer(refusal: Refusal) -> bytes:
    """A whole HTTP/1.1 answer to a request refused before its body was read, closing the connection.

    Written straight to the transport: twisted.web's own response machinery
    only starts once the whole body has arrived.
    """
    body = json.dumps(error_document(refusal), separators=(",", ":")).encode("utf-8")
    status = http_status(refusal)
    head = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error")), b"content-type: application/json"]
    head += [b"cache-control: no-store", b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class DiscardedBody:
    """Stands in for `request.content` when a body is not kept (refused, or streamed elsewhere)."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, size: int = -1) -> bytes:
        return b""

    def close(self) -> None:
        pass


class BoundedRequest(Request):
    """A request whose body may not exceed the site's `HTTPLimits.max_body_bytes`.

    twisted.web keeps any body it is sent, above 100 kB (or of unknown
    length) in a temporary file on the disk: a 500 MB POST to any route
    filled the disk that holds the daemon's state. No route but the
    aggregator's upload (which streams its body itself) uses a body, so a
    small one is kept in memory and a larger one refused with 413 as soon
    as its size shows, before any of it is kept.

    A request refused before its body arrived (`answer_early`) is answered
    at once with `connection: close`; the connection closes
    `EARLY_ANSWER_GRACE` seconds later, so the client can read the answer
    instead of seeing its unread upload reset the connection. What arrives
    meanwhile is dropped as it is read, never kept, and the rest of the
    body (which may be gigabytes) is never waited for.
    """

    answered_early = False
    _closing: IDelayedCall | None = None
    _body_bytes = 0

    @property
    def limits(self) -> HTTPLimits:
        return getattr(self.channel.site, "limits", DEFAULT_LIMITS)

    def gotLength(self, length: int | None) -> None:
        limit = self.limits.max_body_bytes
        if length is not None and length > limit:
            self.content = DiscardedBody()
            self.answer_early(Refusal(f"request body of {length} bytes is above api.max_body_bytes ({limit})", ErrorCode.BODY_TOO_LARGE))
            return
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.answered_early:
            return
        self._body_bytes += len(data)
        limit = self.limits.max_body_bytes
        if self._body_bytes > limit:
            self.content = DiscardedBody()
            self.answer_early(Refusal(f"request body above api.max_body_bytes ({limit})", ErrorCode.BODY_TOO_LARGE))
            return
        self.content.write(data)

    def answer_early(self, refusal: Refusal) -> None:
        """Answer `refusal` now, before the body is complete, and close the connection after the grace."""
        if self.answered_early:
            return
        self.answered_early = True
        self.channel.transport.write(early_answer(refusal))
        self._closing = self.channel.site.reactor.callLater(EARLY_ANSWER_GRACE, self.channel.transport.loseConnection)

    def process(self) -> None:
        if self.answered_early:
            # The answer went out while the body arrived; this connection is done.
            self.channel.transport.loseConnection()
            return
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        if self._closing is not None and self._closing.active():
            self._closing.cancel()
        super().connectionLost(reason)


DEFAULT_LIMITS = HTTPLimits()


TOO_MANY_CONNECTIONS_ANSWER = early_answer(
    Refusal("too many connections: try again later", ErrorCode.TOO_MANY_CONNECTIONS)
)


class QuietSite(Site):
    """A Site without per-request access log lines, enforcing `HTTPLimits`, answering pipelined requests in order.

    At thousands of heartbeats per second an access line per request would
    cost more than the request; the daemons log events instead. Bodies are
    bounded by `BoundedRequest`, slow clients by the channel of
    `xaind.limited_channel` (built on `xaind.pipelining`'s channel on
    Twisted releases that need it).
    """

    requestFactory = BoundedRequest

    def __init__(self, resource: Resource, *args: Any, limits: HTTPLimits = DEFAULT_LIMITS, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        self.limits = limits
        self.protocol = limited_channel_class()
        self._connections: ConnectionCounter | None = None
        self._events: RepeatedEventLog | None = None

    @property
    def connections(self) -> ConnectionCounter:
        """Made when first needed: its log's timers run on `self.reactor`, which tests replace after construction."""
        if self._connections is None:
            self._connections = ConnectionCounter("HTTP", self.limits.connections, self.reactor)
        return self._connections

    @property
    def events(self) -> RepeatedEventLog:
        """Where the channels say why they closed a connection: a thousand slow clients are not a thousand lines."""
        if self._events is None:
            self._events = RepeatedEventLog(get_logger("xaind.http"), self.reactor)
        return self._events

    def startFactory(self) -> None:
        make_room_for(self.limits.connections.max_connections)
        super().startFactory()

    def stopFactory(self) -> None:
        if self._connections is not None:
            self._connections.stop()
        if self._events is not None:
            self._events.stop()
        super().stopFactory()

    def buildProtocol(self, addr: IAddress) -> Protocol | None:
        """The site's channel, or beyond `HTTPLimits.connections` a 503 `too_many_connections` and a close."""
        key = address_key(addr)
        if not self.connections.admit(key):
            return RefusedConnection(TOO_MANY_CONNECTIONS_ANSWER)
        channel = super().buildProtocol(addr)
        channel.counted_address = key
        return channel

    def connection_ended(self, channel: Any) -> None:
        """Called once by the channel when its connection is lost: its place is free again."""
        key = getattr(channel, "counted_address", None)
        if key is not None:
            channel.counted_address = None
            self.connections.release(key)

    def log(self, request: Request) -> None:
        pass


class RefusedConnection(Protocol):
    """A connection answered with a canned reply and closed, without reading what it sends."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer

    def connectionMade(self) -> None:
        self.transport.write(self.answer)
        self.transport.loseConnection()


class JSONAPIResource(Resource):
    """A leaf resource that routes by path itself and answers in JSON whatever happens.

    A refusal gets its status and code; anything else raised is a bug,
    answered with a JSON 500 naming an error id that is in the log beside
    the traceback (never Twisted's HTML error page).
    """

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        try:
            return self.route(request)
        except Refusal as refusal:
            return error_body(request, refusal)
        except Exception:  # noqa: BLE001 - the edge answers every bug as JSON and logs it
            return crash_body(request, Failure(), f"{request.method.decode('ascii', 'replace')} {request_path(request)}")

    def route(self, request: Request) -> bytes | int:
        raise NotImplementedError
