"""The HTTP channel of both daemons: twisted.web's, with what it lets a client get away with bounded.

- Slow clients: twisted.web's idle timeout restarts with every byte, so a
  client sending one byte every few seconds kept its connection (and a
  file descriptor) forever; a thousand of them locked every participant
  out. A request's headers must now be complete `HTTPLimits.header_timeout`
  seconds after its first byte (an idle kept-alive connection is the idle
  timeout's business), and its body, uploads included, must bring at least
  `body_min_rate * body_rate_window` bytes in every window of
  `body_rate_window` seconds from the end of its headers. A client that
  falls behind is answered 408 (`header_timeout`, `body_too_slow`; not
  when its request was refused already), the connection closed (aborted
  if the client does not read the answer within the channel's
  `abortTimeout`), and one line logged. Nothing runs while a request is
  being answered: a held heartbeat or a download is not the client's
  sending.
- A `Content-Length` of thousands of digits made twisted.web's parser
  raise inside the reactor (`int()` refuses more than 4,300 digits) on
  the newest releases: the client got no answer and the log a traceback.
  Such a length is read as what it is, a body far above every limit, and
  refused by the request (413).

The channel is built on the one `xaind.pipelining` picks (Twisted's own,
or `InOrderHTTPChannel` on releases without the pipelining fix), so both
behaviours hold on every supported Twisted. It overrides only methods
twisted.web documents or calls by name on its channel; it reads none of
the channel's private attributes.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web import http

from xaind.http_limits import HTTPLimits
from xaind.no_delay import set_no_delay
from xaind.logs import get_logger
from xaind.pipelining import in_order_channel_class
from xaind.protocol import ErrorCode, Refusal

log = get_logger("xaind.http")

#: Digits of a `Content-Length` above which it only means "larger than any limit".
_LENGTH_DIGITS = 18
#: What such a length is read as: far above any limit, and an int() takes it.
_TOO_LARGE_LENGTH = b"9" * (_LENGTH_DIGITS + 1)


def bounded_content_length(line: bytes) -> bytes:
    """A header line, with a `Content-Length` of more than 18 digits replaced by one of 19 nines."""
    name, colon, value = line.partition(b":")
    if not colon or name.strip().lower() != b"content-length":
        return line
    digits = value.strip(b" \t")
    if len(digits) <= _LENGTH_DIGITS or not digits.isdigit():
        return line
    significant = digits.lstrip(b"0") or b"0"
    return name + b": " + (significant if len(significant) <= _LENGTH_DIGITS else _TOO_LARGE_LENGTH)


class Phase(enum.Enum):
    """Where a connection is in its current request, as far as the deadlines go."""

    IDLE = "idle"  # between requests: only the idle timeout runs
    HEADERS = "headers"  # a request's first byte arrived, its headers have not all
    BODY = "body"  # its body is arriving
    ANSWERING = "answering"  # the request is complete and being answered: no deadline
    CLOSED = "closed"


#: Requests of one connection answered in one reactor turn; the rest of its pipeline waits for the next turn.
PIPELINED_PER_TURN = 16


class LimitedChannelMixin:
    """What both daemons' channels add to twisted.web's (see the module's docstring)."""

    _phase = Phase.IDLE
    _deadline: IDelayedCall | None = None
    _window_bytes = 0  # body bytes since the body rate's current window began
    _answered_in_turn = 0  # requests answered since this connection was last read
    _next_turn: IDelayedCall | None = None

    @property
    def limits(self) -> HTTPLimits:
        return getattr(getattr(self, "site", None), "limits", None) or _DEFAULT_LIMITS

    def connectionMade(self) -> None:  # noqa: N802 - Twisted's name
        set_no_delay(self.transport)
        super().connectionMade()  # type: ignore[misc]

    # -- the request's phases, from twisted.web's channel

    def dataReceived(self, data: bytes) -> None:
        if not getattr(self, "_busyReceiving", False):
            self._answered_in_turn = 0  # a new read: a new turn
        # Blank lines between requests are allowed (RFC 9112, 2.2) and start nothing.
        if self._phase is Phase.IDLE and data.strip(b"\r\n"):
            self._phase = Phase.HEADERS
        super().dataReceived(data)  # type: ignore[misc]
        # Only a request whose headers did not all come in this read needs a
        # timer (the common request arrives whole): started now, it still
        # counts from the first byte, which arrived at this same moment.
        if self._phase is Phase.HEADERS and self._deadline is None:
            self._wait(self.limits.header_timeout, self._headers_late)

    def lineReceived(self, line: bytes) -> None:
        # A request that arrived behind one answered at once is parsed from
        # the same read, without passing through dataReceived again.
        if self._phase is Phase.IDLE and line:
            self._phase = Phase.HEADERS
        super().lineReceived(line)  # type: ignore[misc]

    def headerReceived(self, line: bytes) -> bool:
        return super().headerReceived(bounded_content_length(line))  # type: ignore[misc]

    def allHeadersReceived(self) -> None:
        self._stop_waiting()
        self._phase = Phase.BODY
        super().allHeadersReceived()  # type: ignore[misc]
        limits = self.limits
        # `length` is 0 without a body (twisted.web then completes the request at once), None if chunked.
        if self._phase is Phase.BODY and getattr(self, "length", 0) != 0 and limits.body_min_rate > 0:
            self._window_bytes = 0
            self._wait(limits.body_rate_window, self._check_body_rate)

    def rawDataReceived(self, data: bytes) -> None:
        if self._phase is Phase.BODY:
            self._window_bytes += len(data)
        super().rawDataReceived(data)  # type: ignore[misc]

    def allContentReceived(self) -> None:
        self._stop_waiting()
        self._phase = Phase.ANSWERING
        super().allContentReceived()  # type: ignore[misc]

    def requestDone(self, request: http.Request) -> None:
        # Before twisted.web plays back what was pipelined behind the request:
        # that is the next request's first bytes.
        if self._phase is Phase.ANSWERING:
            self._phase = Phase.IDLE
        super().requestDone(request)  # type: ignore[misc]
        self._answered_in_turn += 1
        if self._answered_in_turn >= PIPELINED_PER_TURN and self._next_turn is None and self._phase is not Phase.CLOSED:
            # twisted.web would answer all that is pipelined in this turn, and
            # every other connection would wait for them: the parser stops
            # (LineReceiver's `paused`), nothing more is read from this
            # connection, and both go on in the next turn.
            self.paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            self._next_turn = self.callLater(0, self._take_turn)  # type: ignore[attr-defined]

    def _take_turn(self) -> None:
        self._next_turn = None
        self._answered_in_turn = 0
        self.paused = False
        if not getattr(self, "_waitingForTransport", False):
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        self.dataReceived(b"")  # what the parser kept

    def connectionLost(self, reason: Failure) -> None:
        if self._next_turn is not None and self._next_turn.active():
            self._next_turn.cancel()
        self._next_turn = None
        self._stop_waiting()
        self._phase = Phase.CLOSED
        ended = getattr(getattr(self, "site", None), "connection_ended", None)
        if ended is not None:
            ended(self)  # its place under the site's connection limits is free
        super().connectionLost(reason)  # type: ignore[misc]

    # -- the deadlines

    def _wait(self, seconds: float, then: Callable[[], None]) -> None:
        self._stop_waiting()
        self._deadline = self.callLater(seconds, then)  # type: ignore[attr-defined]

    def _stop_waiting(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self._phase is Phase.HEADERS:
            seconds = self.limits.header_timeout
            self._give_up(ErrorCode.HEADER_TIMEOUT, f"request headers not complete within api.header_timeout ({seconds:g} s)")

    def _check_body_rate(self) -> None:
        self._deadline = None
        if self._phase is not Phase.BODY:
            return
        limits = self.limits
        if self._window_bytes < limits.body_min_rate * limits.body_rate_window:
            self._give_up(
                ErrorCode.BODY_TOO_SLOW,
                f"request body slower than api.body_min_rate ({limits.body_min_rate:g} bytes/s over "
                f"{limits.body_rate_window:g} s): {self._window_bytes} bytes in the last {limits.body_rate_window:g} s",
            )
            return
        self._window_bytes = 0
        self._wait(limits.body_rate_window, self._check_body_rate)

    def _give_up(self, code: ErrorCode, reason: str) -> None:
        """Answer 408 (unless the request was answered already), close the connection, log one line."""
        from xaind.web import early_answer  # xaind.web builds its sites with this channel

        self._phase = Phase.CLOSED
        transport: Any = self.transport  # type: ignore[attr-defined]
        events = getattr(getattr(self, "site", None), "events", None)
        if events is not None:
            events.emit(code.value, LogLevel.info, "closed the connection of {peer}: {reason}", peer=_peer(transport), reason=reason)
        else:
            log.info("closed the connection of {peer}: {reason}", peer=_peer(transport), reason=reason)
        requests = getattr(self, "requests", [])
        if not any(getattr(request, "answered_early", False) for request in requests):
            transport.write(early_answer(Refusal(reason, code)))
        transport.loseConnection()
        # A client that does not read its answer does not keep the connection either.
        self._deadline = self.callLater(getattr(self, "abortTimeout", None) or 15, transport.abortConnection)  # type: ignore[attr-defined]


_DEFAULT_LIMITS = HTTPLimits()


def _peer(transport: Any) -> str:
    address = transport.getPeer()
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else str(address)


@functools.cache
def limited_channel_class() -> type[http.HTTPChannel]:
    """The channel class of both daemons' sites, on this Twisted release."""
    base = in_order_channel_class() or http.HTTPChannel
    return type("LimitedChannel", (LimitedChannelMixin, base), {"__doc__": LimitedChannelMixin.__doc__})
