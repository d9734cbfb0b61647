"""HTTP calls of a participant, on Twisted's Agent with a shared keep-alive pool.

Everything here is asynchronous and raises one of two errors: `Transient`
(worth retrying: connection refused or lost, a time-out, a 5xx) or
`Refused` (the server answered no; retrying the same request is pointless).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from twisted.internet import defer, error, protocol
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web import client, http_headers
from twisted.web.iweb import IResponse

from xaind.sdk.tls import PeerNotTrusted, https_policy, tls_refusal
from xaind.wire import SAMPLES_BYTES

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from twisted.internet.ssl import PrivateCertificate

CONTROL_TIMEOUT = 30.0
TRANSFER_TIMEOUT = 3600.0


class Transient(Exception):
    """A failure that may go away: the caller retries with backoff, waiting at least `retry_after` seconds if the server said so."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


#: Refusals that say "not now" (xaind.protocol.ErrorCode values): the same request may succeed later.
BUSY_CODES = frozenset({"rendez_vous_rate_limited", "too_many_participants", "too_many_connections"})


def _retry_after(response: Any) -> float | None:
    """The seconds of a `Retry-After` header (the delay form; a date is ignored)."""
    values = response.headers.getRawHeaders(b"retry-after") or []
    try:
        return max(0.0, float(values[0])) if values else None
    except ValueError:
        return None


class Refused(Exception):
    """The server refused the request: `status`, its JSON error message and its code.

    Decide on `code` (xaind.protocol.ErrorCode; None from a server that sends
    none); the message is for people and may change.
    """

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.code = code


NETWORK_ERRORS = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    defer.TimeoutError,
    defer.CancelledError,
    client.ResponseFailed,
    client.ResponseNeverReceived,
    client.RequestTransmissionFailed,
    client.PartialDownloadError,
)


@dataclass(frozen=True)
class Downloaded:
    """A downloaded body: its bytes (None when only counted) and its size."""

    data: bytes | None
    size: int


class _Collector(protocol.Protocol):
    """Reads a response body into one buffer (or only counts it, to save memory in load tests)."""

    def __init__(self, finished: Deferred[Downloaded], keep: bool) -> None:
        self.finished = finished
        self.keep = keep
        self.buffer = io.BytesIO()
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.keep:
            self.buffer.write(data)

    def connectionLost(self, reason: Any) -> None:
        if reason.check(client.ResponseDone, error.ConnectionDone) or (
            reason.check(client.PotentialDataLoss) and not self.keep
        ):
            self.finished.callback(Downloaded(self.buffer.getvalue() if self.keep else None, self.size))
        else:
            self.finished.errback(reason)


class ArrayBody:
    """An upload body read straight from a numpy array: no second copy of the weights."""

    def __init__(self, samples: int, weights: np.ndarray) -> None:
        weights = np.asanyarray(weights)
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(weights))
        self._prefix = samples.to_bytes(SAMPLES_BYTES, "big") + header.getvalue()
        order = "F" if weights.flags.f_contiguous and not weights.flags.c_contiguous else "C"
        contiguous = np.asarray(weights, order=order)
        self._data = memoryview(contiguous).cast("B") if contiguous.size else memoryview(b"")
        self.length = len(self._prefix) + len(self._data)
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.length - self._position
        start = self._position - len(self._prefix)
        if start >= 0:
            # Past the prefix (every read but the first): one copy, straight from the array.
            take = self._data[start : start + size]
            self._position += len(take)
            return bytes(take)
        out = bytearray()
        if self._position < len(self._prefix):
            take = self._prefix[self._position : self._position + size]
            out += take
            self._position += len(take)
            size -= len(take)
        if size > 0 and self._position < self.length:
            start = self._position - len(self._prefix)
            take = self._data[start : start + size]
            out += take
            self._position += len(take)
        return bytes(out)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self.length}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        pass


class HttpClient:
    """A participant's HTTP client: JSON control calls, weight downloads and uploads.

    `https://` servers are verified against `trust_root` (the operator's CA
    bundle, `xaind.sdk.tls.load_trust_root`), or the platform's CAs without one.
    A server that asks for a client certificate is shown `client_certificate`
    (`xaind.sdk.tls.load_client_certificate`), the participant's credential
    where the coordinator authenticates participants by certificate.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        persistent: bool = True,
        max_connections: int = 2,
        trust_root: IOpenSSLTrustRoot | None = None,
        client_certificate: PrivateCertificate | None = None,
    ) -> None:
        self.reactor = reactor
        self.pool = client.HTTPConnectionPool(reactor, persistent=persistent)
        self.pool.maxPersistentPerHost = max_connections
        self.pool.retryAutomatically = False
        self.trust_root = trust_root
        self.client_certificate = client_certificate
        policy = https_policy(trust_root, client_certificate)
        self.agent = client.Agent(reactor, contextFactory=policy, pool=self.pool, connectTimeout=CONTROL_TIMEOUT)
        #: Downloads follow redirects: an aggregator with storage.s3 answers 307 to a presigned URL (docs/scale.rst).
        self.download_agent = client.RedirectAgent(self.agent, redirectLimit=3)

    def close(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()

    @inlineCallbacks
    def _request(
        self,
        method: bytes,
        url: str,
        timeout: float,
        body: Any = None,
        keep_body: bool = True,
        headers: dict[bytes, list[bytes]] | None = None,
        follow_redirects: bool = False,
    ) -> Any:
        try:
            requesting = (self.download_agent if follow_redirects else self.agent).request(
                method,
                url.encode("utf-8"),
                http_headers.Headers(headers or {}),
                client.FileBodyProducer(body, readSize=2**20) if body is not None else None,
            )
            requesting.addTimeout(timeout, self.reactor)
            response: IResponse = yield requesting
            finished: Deferred[Downloaded] = Deferred()
            response.deliverBody(_Collector(finished, keep_body or response.code != 200))
            finished.addTimeout(timeout, self.reactor)
            body: Downloaded = yield finished
        except NETWORK_ERRORS as failure:
            refusal = tls_refusal(failure)
            if refusal is not None:
                raise PeerNotTrusted(f"{url}: TLS refused: {refusal}") from None
            raise Transient(f"{method.decode()} {url}: {failure!r}") from None
        if response.code >= 500 or response.code == 429:
            # 429 and 503 are "not now" (a rate limit, the coordinator's participant limit): retried, not fatal.
            raise Transient(f"{method.decode()} {url}: HTTP {response.code} {_error_of(body.data or b'')[0]}", _retry_after(response))
        if response.code != 200:
            raise Refused(response.code, *_error_of(body.data or b""))
        return body

    @inlineCallbacks
    def get_json(self, url: str, headers: dict[bytes, list[bytes]] | None = None) -> Any:
        body = yield self._request(b"GET", url, CONTROL_TIMEOUT, headers=headers)
        try:
            return json.loads(body.data)
        except ValueError:
            raise Transient(f"GET {url}: answer is not JSON") from None

    def download(self, url: str, keep: bool = True) -> Deferred[Downloaded]:
        """The body at `url`; with `keep=False` it is only counted (load tests)."""
        return self._request(b"GET", url, TRANSFER_TIMEOUT, keep_body=keep, follow_redirects=True)

    def upload(self, url: str, samples: int, weights: np.ndarray) -> Deferred[Downloaded]:
        return self._request(
            b"POST",
            url,
            TRANSFER_TIMEOUT,
            body=ArrayBody(samples, weights),
            headers={b"content-type": [b"application/octet-stream"]},
        )


def _error_of(content: bytes) -> tuple[str, str | None]:
    """The message and the code of an error answer (`{"error": ..., "code": ...}`), as far as it has them."""
    try:
        document = json.loads(content)
    except ValueError:
        return content[:200].decode("utf-8", "replace"), None
    if isinstance(document, dict) and "error" in document:
        code = document.get("code")
        return str(document["error"]), code if isinstance(code, str) else None
    return content[:200].decode("utf-8", "replace"), None
