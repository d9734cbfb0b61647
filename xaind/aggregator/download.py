"""Streaming a byte range of the model file to one HTTP client.

Twisted's transports take only bytes, so a file sent through them is read
into the process (one copy) and then copied into the socket 128 KiB per
reactor iteration; with 20 concurrent 100 MB downloads the aggregator's
reactor thread was the bottleneck at about a third of loopback throughput.
On a plain TCP connection the kernel can move the file's pages into the
socket itself (`os.sendfile`), which this producer does whenever the
transport has nothing buffered.

When the socket is full, sendfile stops short: the producer then hands the
next small piece of the range to the transport like any writer would, which
pauses it until the socket drained that piece, and goes on with sendfile
when resumed. The transport's buffer is therefore always empty when the
kernel sends directly, so the bytes go out in order. Over TLS, or on any
transport that is not a plain socket, every piece goes through the
transport (the file is read in `chunk_bytes` steps, one step per download
in memory).

A download is a blocking read of the model file, like any file served by
twisted.web; the model was written moments before and is in the page cache.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any, BinaryIO, Protocol

from twisted.internet import tcp
from twisted.internet.interfaces import IPullProducer, ISSLTransport
from twisted.web.server import Request
from zope.interface import implementer

from xaind.logs import get_logger
from xaind.twisted_internals import write_buffer_bytes

log = get_logger("xaind.aggregator.download")

_SINGLE_RANGE = re.compile(rb"^bytes=(\d*)-(\d*)$")


class RangeNotSatisfiable(ValueError):
    """The one range asked for starts at or beyond the end of the model (answered 416)."""


def _position(digits: bytes, ceiling: int) -> int:
    """The number `digits` spell, or `ceiling` if it is larger.

    Read without `int()` on the whole string: a client may send thousands
    of digits, which `int()` refuses (above 4,300) and which mean "beyond
    the end" anyway.
    """
    significant = digits.lstrip(b"0")
    if len(significant) > len(str(ceiling)):
        return ceiling
    return min(int(significant or b"0"), ceiling)


def requested_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range of a `size`-byte body one `Range` header asks for, or None for the whole body.

    Only one `bytes` range is served; several ranges, another unit or a
    header that does not parse are ignored (RFC 9110, 14.2: the whole body
    is sent). Raises `RangeNotSatisfiable` for a range that starts at or
    beyond the end.
    """
    if header is None:
        return None
    match = _SINGLE_RANGE.match(header.replace(b" ", b""))
    if match is None or match.group(1) == match.group(2) == b"":
        return None
    start, end = match.group(1), match.group(2)
    if start == b"":
        first, last = size - _position(end, size), size - 1
    else:
        first = _position(start, size)
        last = _position(end, size - 1) if end else size - 1
    if first > last or first >= size:
        raise RangeNotSatisfiable(f"range not satisfiable for {size} bytes")
    return first, last


#: Most bytes one sendfile call may move: the socket's buffer usually
#: takes less, and the cooperator interleaves other work between calls.
SENDFILE_STEP_BYTES = 4 * 2**20


def sendfile_capable(transport: Any) -> bool:
    """Whether the kernel may write into this transport's socket directly: plain TCP, no TLS."""
    return (
        hasattr(os, "sendfile")
        and isinstance(transport, tcp.Connection)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)
    )


class DownloadMetrics(Protocol):
    """What a download reports (xaind.aggregator.metrics.AggregatorMetrics)."""

    def bytes_sent(self, count: int) -> None: ...

    def download_done(self, seconds: float) -> None: ...


@implementer(IPullProducer)
class FileRangeProducer:
    """Sends `size` bytes of `stream` from `offset` as the body of `request`, then finishes it."""

    def __init__(
        self, request: Request, stream: BinaryIO, offset: int, size: int, chunk_bytes: int, metrics: DownloadMetrics | None = None
    ) -> None:
        self.request: Request | None = request
        self.stream = stream
        self.offset = offset
        self.left = size
        self.size = size
        self.chunk_bytes = chunk_bytes
        self.transport = getattr(request.channel, "transport", None)
        self.direct = sendfile_capable(self.transport)
        self.metrics = metrics
        self.began = time.perf_counter()

    def start(self) -> None:
        self.request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.request is None:
            return
        if self.left == 0:
            self._finish()
        elif self.direct and self.request.startedWriting and write_buffer_bytes(self.transport) == 0:
            self._send_directly()
        else:
            # Headers first (the request writes them with the first piece); on
            # a direct connection a piece just above the transport's buffer
            # size, so that the transport pauses this producer until it is out.
            size = self.transport.bufferSize + 1 if self.direct else self.chunk_bytes
            self._write_piece(size)

    def _send_directly(self) -> None:
        assert self.request is not None
        wanted = min(self.left, SENDFILE_STEP_BYTES)
        try:
            sent = os.sendfile(self.transport.fileno(), self.stream.fileno(), self.offset, wanted)
        except BlockingIOError:
            sent = None
        except OSError as error:
            # The peer went away: the transport will see it and stop this producer.
            log.debug("download ended by the connection: {error}", error=error)
            self._abandon()
            return
        if sent == 0:
            self._file_ended()
            return
        if sent is not None:
            self._advance(sent)
        if self.left == 0:
            self._finish()
        elif sent is None or sent < wanted:
            # The socket is full: a piece through the transport wakes us when it has room.
            self._write_piece(self.transport.bufferSize + 1)

    def _write_piece(self, size: int) -> None:
        assert self.request is not None
        piece = os.pread(self.stream.fileno(), min(size, self.left), self.offset)
        if not piece:
            self._file_ended()
            return
        self.offset += len(piece)
        self.left -= len(piece)
        if self.metrics is not None:
            self.metrics.bytes_sent(len(piece))
        self.request.write(piece)

    def _advance(self, sent: int) -> None:
        assert self.request is not None
        self.offset += sent
        self.left -= sent
        self.request.sentLength += sent
        if self.metrics is not None:
            self.metrics.bytes_sent(sent)

    def _finish(self) -> None:
        request = self.request
        assert request is not None
        self.stopProducing()
        request.unregisterProducer()
        request.finish()
        if self.metrics is not None:
            self.metrics.download_done(time.perf_counter() - self.began)
        log.debug("download of {size} bytes handed to the kernel", size=self.size)

    def _file_ended(self) -> None:
        log.error("the model file ended {left} bytes early; download abandoned", left=self.left)
        self._abandon()

    def _abandon(self) -> None:
        """The promised length cannot be sent: drop the connection, the client sees a short body."""
        request = self.request
        self.stopProducing()
        if request is not None:
            request.unregisterProducer()
            request.channel.transport.abortConnection()

    def stopProducing(self) -> None:
        if self.request is not None:
            self.request = None
            self.stream.close()
