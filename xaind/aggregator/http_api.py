"""The participants' HTTP API of the aggregator: weights down and up, streamed.

`GET /<id>/<token>` streams the global model from disk through a pull
producer (`download.py`: the kernel's sendfile on plain TCP), so a slow
reader holds back the sender and concurrent downloads share one file
instead of each holding a copy; `Range`, `If-Range`,
`Content-Length` and an `ETag` naming the model version are supported.

With `storage.s3` (docs/scale.rst), once the model is complete in the
bucket, the same GET or HEAD is answered 307 with a presigned URL of it
instead (`AggregatorService.download_url`).

`POST /<id>/<token>` is validated and spooled while it arrives: the request
class below takes the body chunk by chunk instead of letting twisted.web
buffer it whole, so a bad upload is refused as soon as its header shows the
problem and a good one never sits in memory.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from xaind.aggregator.download import FileRangeProducer, RangeNotSatisfiable, requested_range
from xaind.aggregator.metrics import now
from xaind.aggregator.service import AggregatorService
from xaind.aggregator.upload import Upload, storage_refusal
from xaind.aggregator.store import GlobalModel
from xaind.http_limits import HTTPLimits
from xaind.logs import get_logger
from xaind.protocol import ErrorCode, Refusal
from xaind.twisted_internals import check_twisted_internals, request_line
from xaind.web import (
    BoundedRequest,
    DiscardedBody,
    HTTPError,
    JSONAPIResource,
    QuietSite,
    crash_body,
    error_body,
    json_body,
    path_segment,
    request_path,
    require_method,
)
from xaind.wire import UploadTooLarge

log = get_logger("xaind.aggregator.http")

#: Bytes read from the model file per producer step where sendfile cannot be
#: used (TLS). With Twisted's default (64 KiB) the reactor spent itself on
#: per-chunk overhead: 20 concurrent 100 MB downloads moved 1.07 GB/s (0.22x
#: loopback); 1 MiB steps moved 1.57 GB/s (0.36x), 4 MiB steps less again. A
#: step is sent before the next is read: about one step per download in memory.
DOWNLOAD_CHUNK_BYTES = 2**20

#: Bytes asked of the socket per read while an upload arrives (Twisted's
#: default is 64 KiB): each read is one pass through HTTP parsing, the
#: upload's validation and a file write, and their per-call cost dominated.
UPLOAD_READ_BYTES = 2**20


def upload_target(raw_path: bytes) -> tuple[bytes, bytes] | None:
    """The (id, token) segments of an upload's request-target, or None if it is not one."""
    path = urlsplit(raw_path).path
    segments = path.split(b"/")
    if len(segments) != 3 or segments[0] != b"":
        return None
    return unquote_to_bytes(segments[1]), unquote_to_bytes(segments[2])


class AggregatorRequest(BoundedRequest):
    """A request that streams an upload's body into an `Upload` as it arrives.

    An upload refused before its body is complete is answered at once, and
    the connection closed shortly after (`BoundedRequest.answer_early`),
    instead of reading (and dropping) the rest of a body that may be
    gigabytes long. Any other request's body is bounded as on every route.
    """

    upload: Upload | None = None
    upload_refusal: Refusal | None = None
    _read_size: int | None = None  # the transport's read size before the upload enlarged it
    _body_complete = False
    #: When the upload's headers arrived (`metrics.now`), for its duration.
    upload_began: float = 0.0

    def _answer_early(self, refusal: Refusal) -> None:
        self.upload_refusal = refusal
        if not self.answered_early:
            self.channel.site.aggregator.metrics.upload_refused(refusal.code)
        self.answer_early(refusal)

    def _refused_by_disk(self, refusal: Refusal) -> None:
        """The upload's file could not be created or written: answered at once, unless the route answers it.

        The service has undone the upload's start, so the token stays usable:
        the participant is told to come back (503) instead of getting no answer.
        """
        if not self._body_complete and not self.answered_early:
            self._answer_early(refusal)

    def _pause_body(self, paused: bool) -> None:
        """Stop (or go on) reading the body while its chunks wait in memory for the upload's file."""
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            if paused:
                transport.pauseProducing()
            else:
                transport.resumeProducing()

    def gotLength(self, length: int | None) -> None:
        # The request line is known here but `self.method`/`self.path` are
        # only set once the whole body arrived, so read them off the channel.
        command, raw_path = request_line(self.channel)
        target = upload_target(raw_path) if command == b"POST" else None
        if target is None:
            super().gotLength(length)
            return
        aggregator: AggregatorService = self.channel.site.aggregator
        self.upload_began = now()
        self.content = DiscardedBody()
        if length is not None and length > aggregator.max_upload_bytes:
            self._answer_early(
                UploadTooLarge(f"upload of {length} bytes is above limits.max_upload_bytes ({aggregator.max_upload_bytes})")
            )
            return
        try:
            participant_id = path_segment(target[0], "participant id")
            token = path_segment(target[1], "token")
            self.upload = aggregator.begin_upload(participant_id, token, self._refused_by_disk, self._pause_body)
        except Refusal as refusal:
            self._answer_early(refusal)
            return
        self._read_in_large_steps()

    def _read_in_large_steps(self) -> None:
        transport = self.channel.transport
        size = getattr(transport, "bufferSize", None)
        if isinstance(size, int) and size < UPLOAD_READ_BYTES:
            self._read_size = size
            transport.bufferSize = UPLOAD_READ_BYTES

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._body_complete = True
        # The body is in: the connection's next request (or download) gets the default back.
        if self._read_size is not None:
            self.channel.transport.bufferSize = self._read_size
            self._read_size = None
        super().requestReceived(command, path, version)

    def handleContentChunk(self, data: bytes) -> None:
        if self.upload is not None:
            self.channel.site.aggregator.metrics.bytes_received(len(data))
            try:
                self.upload.write(data)
            except OSError as error:
                # The disk filled up (or failed) mid-way: forget the upload, as if broken off.
                self.upload.abort()
                self._answer_early(storage_refusal(self.upload.participant_id, error))
                return
            refusal = self.upload.refusal
            if refusal is not None and not self.answered_early:
                self._answer_early(refusal)
        elif self.upload_refusal is None:
            super().handleContentChunk(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.upload is not None:
            self.upload.abort()
        super().connectionLost(reason)


class AggregatorAPI(JSONAPIResource):
    def __init__(self, aggregator: AggregatorService) -> None:
        super().__init__()
        self.aggregator = aggregator

    def route(self, request: Request) -> bytes | int:
        match request.postpath:
            case [b"status"]:
                require_method(request, b"GET")
                return json_body(request, 200, self.aggregator.status())
            case [b"shard", raw_token]:
                # A file lent to another shard for a round's end (xaind/aggregator/shard_files.py).
                require_method(request, b"GET")
                path = self.aggregator.lent.path_of(path_segment(raw_token, "token"))
                return self._send_lent_file(request, path)
            case [raw_id, raw_token]:
                require_method(request, b"GET", b"HEAD", b"POST")
                participant_id = path_segment(raw_id, "participant id")
                token = path_segment(raw_token, "token")
                if request.method == b"POST":
                    return self._upload(request, participant_id, token)
                self.aggregator.authorize(participant_id, token)
                return self._download(request, self.aggregator.global_model())
        raise HTTPError(ErrorCode.NOT_FOUND, f"no such resource: {request_path(request)}")

    def _download(self, request: Request, model: GlobalModel) -> bytes | int:
        url = self.aggregator.download_url()
        if url is not None:
            return self._redirect(request, model, url)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"etag", model.etag.encode())
        request.setHeader(b"cache-control", b"no-store")
        if model.path is None:
            # Before the first aggregation: the participant initialises the model.
            request.setHeader(b"content-length", b"0")
            return b""
        first, last = self._range(request, model)
        log.debug("download of the model of round {round} asked", round=model.round)
        stream = open(model.path, "rb")
        size = last - first + 1
        request.setHeader(b"content-length", str(size).encode())
        if request.method == b"HEAD":
            stream.close()
            return b""
        if size != model.size:
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {first}-{last}/{model.size}".encode())
        FileRangeProducer(request, stream, first, size, DOWNLOAD_CHUNK_BYTES, self.aggregator.metrics).start()
        return NOT_DONE_YET

    def _send_lent_file(self, request: Request, path: str) -> bytes | int:
        try:
            stream = open(path, "rb")
        except FileNotFoundError:
            raise HTTPError(ErrorCode.NOT_FOUND, "the file lent under this token is gone (a newer round superseded it)") from None
        size = os.fstat(stream.fileno()).st_size
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode())
        request.setHeader(b"cache-control", b"no-store")
        # Not counted with the participants' downloads: the shards' own traffic, once per round's end.
        FileRangeProducer(request, stream, 0, size, DOWNLOAD_CHUNK_BYTES).start()
        return NOT_DONE_YET

    @staticmethod
    def _redirect(request: Request, model: GlobalModel, url: str) -> bytes:
        """Send the participant to the model's presigned URL in `storage.s3` (GET and HEAD alike).

        307 keeps the method (a HEAD stays a HEAD). The client sends its
        `Range` again to the store, which serves it; the ETag here is the
        model version, as on a download served by the aggregator.
        """
        log.debug("download of the model of round {round} redirected to storage.s3", round=model.round)
        request.setResponseCode(307)
        request.setHeader(b"location", url.encode("ascii"))
        request.setHeader(b"etag", model.etag.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"0")
        return b""

    @staticmethod
    def _range(request: Request, model: GlobalModel) -> tuple[int, int]:
        """The inclusive byte range to send: the whole model unless one satisfiable range was asked."""
        whole = (0, model.size - 1)
        header = request.getHeader(b"range")
        if header is None or request.method == b"HEAD":
            return whole  # HEAD ignores Range (RFC 9110, 14.2)
        if_range = request.getHeader(b"if-range")
        if if_range is not None and if_range != model.etag.encode():
            return whole  # the model changed since the partial download began
        try:
            asked = requested_range(header, model.size)
        except RangeNotSatisfiable as unsatisfiable:
            raise HTTPError(ErrorCode.RANGE_NOT_SATISFIABLE, str(unsatisfiable), {b"content-range": f"bytes */{model.size}".encode()}) from None
        return whole if asked is None else asked

    def _upload(self, request: Request, participant_id: str, token: str) -> bytes | int:
        if getattr(request, "answered_early", False):
            # The refusal went out while the body arrived; this connection is done.
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        upload: Upload | None = getattr(request, "upload", None)
        refusal: Refusal | None = getattr(request, "upload_refusal", None)
        if refusal is not None:
            raise refusal
        if upload is None:
            # The body was buffered by twisted.web (request class not installed): stream it now.
            upload = self.aggregator.begin_upload(participant_id, token)
            upload.write(request.content.read())
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def accepted(_: Any) -> None:
            if not gone:
                self.aggregator.metrics.upload_accepted(now() - getattr(request, "upload_began", now()))
                request.write(json_body(request, 200, {"ok": True}))
                request.finish()

        def refused(failure: Failure) -> None:
            if gone:
                return
            self.aggregator.metrics.upload_refused(failure.value.code if failure.check(Refusal) else ErrorCode.INTERNAL_ERROR)
            if failure.check(Refusal):
                request.write(error_body(request, failure.value))
            else:
                request.write(crash_body(request, failure, f"the upload of {participant_id}"))
            request.finish()

        upload.finish().addCallbacks(accepted, refused)
        return NOT_DONE_YET


class AggregatorSite(QuietSite):
    requestFactory = AggregatorRequest

    def __init__(self, aggregator: AggregatorService, reactor: Any = None, limits: HTTPLimits = HTTPLimits()) -> None:
        # Streaming uploads and sendfile downloads read Twisted's private
        # parts: a release that changed them stops start-up here.
        check_twisted_internals()
        super().__init__(AggregatorAPI(aggregator), reactor=reactor, limits=limits)
        self.aggregator = aggregator
        self.displayTracebacks = False
        self.noisy = False
