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
from typing import Any, BinaryIO

from twisted.internet import tcp
from twisted.internet.interfaces import IPullProducer, ISSLTransport
from twisted.web.server import Request
from zope.interface import implementer

from xaind.logs import get_logger
from xaind.twisted_internals import write_buffer_bytes

log = get_logger("xaind.aggregator.download")

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


@implementer(IPullProducer)
class FileRangeProducer:
    """Sends `size` bytes of `stream` from `offset` as the body of `request`, then finishes it."""

    def __init__(self, request: Request, stream: BinaryIO, offset: int, size: int, chunk_bytes: int) -> None:
        self.request: Request | None = request
        self.stream = stream
        self.offset = offset
        self.left = size
        self.chunk_bytes = chunk_bytes
        self.transport = getattr(request.channel, "transport", None)
        self.direct = sendfile_capable(self.transport)

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
        self.request.write(piece)

    def _advance(self, sent: int) -> None:
        assert self.request is not None
        self.offset += sent
        self.left -= sent
        self.request.sentLength += sent

    def _finish(self) -> None:
        request = self.request
        assert request is not None
        self.stopProducing()
        request.unregisterProducer()
        request.finish()

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
