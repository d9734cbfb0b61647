"""JSON over twisted.web, shared by the coordinator's and the aggregator's HTTP APIs."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xaind.pipelining import in_order_channel_class

JSON_CONTENT_TYPE = b"application/json"


class HTTPError(Exception):
    """A request that cannot be served: answered with `status` and a JSON `{"error": ...}`."""

    def __init__(self, status: int, message: str, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def json_body(request: Request, status: int, document: Any) -> bytes:
    """Set the status and content type of `request` and return `document` encoded."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", JSON_CONTENT_TYPE)
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def error_body(request: Request, error: HTTPError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return json_body(request, error.status, {"error": error.message})


def path_segment(segment: bytes, what: str) -> str:
    """Decode one URL path segment naming `what` (an id, a token)."""
    if not segment:
        raise HTTPError(404, f"missing {what}")
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{what} is not valid UTF-8") from None


def request_path(request: Request) -> str:
    return request.path.decode("utf-8", "replace")


def require_method(request: Request, *allowed: bytes) -> None:
    if request.method not in allowed:
        names = ", ".join(method.decode() for method in allowed)
        raise HTTPError(
            405,
            f"method {request.method.decode('ascii', 'replace')} not allowed on {request_path(request)}; use {names}",
            {b"allow": ", ".join(method.decode() for method in allowed).encode()},
        )


class QuietSite(Site):
    """A Site without per-request access log lines, answering pipelined requests in order.

    At thousands of heartbeats per second an access line per request would
    cost more than the request; the daemons log events instead. The channel
    comes from `xaind.pipelining` on Twisted releases that need it.
    """

    def __init__(self, resource: Resource, *args: Any, **kwargs: Any) -> None:
        super().__init__(resource, *args, **kwargs)
        channel = in_order_channel_class()
        if channel is not None:
            self.protocol = channel

    def log(self, request: Request) -> None:
        pass


class JSONAPIResource(Resource):
    """A leaf resource that routes by path itself and answers every `HTTPError` as JSON."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        try:
            return self.route(request)
        except HTTPError as error:
            return error_body(request, error)

    def route(self, request: Request) -> bytes | int:
        raise NotImplementedError
