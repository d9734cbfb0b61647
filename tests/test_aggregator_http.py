"""The aggregator's participant HTTP API, in memory and over real loopback sockets.

A real `AggregatorService` (real store in a temporary directory, real
weighted-average backend, real worker thread) is served by `AggregatorSite`.
The coordinator is a fake whose `end_training` Deferreds the tests fire (or
not); its call timeout runs on the real reactor. docs/http-api.rst,
docs/wire-format.rst and docs/aggregator-consistency.rst are the contract.

In memory (`xaind.testing.memory_http`, a site whose own timers run on a
`MemoryReactorClock`): what the API answers. Downloads of a small model
(whole, ranges, If-Range, HEAD, ETags, 404), uploads refused or accepted
(every refusal code, chunked bodies sent one chunk per read, an answer
held until the coordinator confirms), the status page. Their answers wait
only for the service's worker threads, and arrive through the same channel,
request class and producers as on a socket, minus the kernel.

On loopback sockets (`reactor.listenTCP` on 127.0.0.1, raw TCP clients):
what an in-memory transport cannot show.

- back-pressure: ten slow readers hold the server's producers paused without
  the aggregator holding copies of the model;
- the kernel's `sendfile`, which needs a real socket: the plain-TCP download
  with pipelined requests kept in order, the model file ending early during
  a sendfile, and the same socket with sendfile switched off;
- the peer going away mid-request: a download broken off (the model file is
  closed) and an upload broken off (nothing kept);
- an upload arriving over a connection in pieces with the round's
  aggregation between them, and the TCP transport's read size enlarged
  during an upload and given back after;
- the coordinator's call timeout, in real time.
"""

from __future__ import annotations

import errno
import gc
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from xaind.aggregator.backends import WeightedAverageBackend
from xaind.aggregator.http_api import AggregatorSite
from xaind.aggregator.service import AggregatorService, ICoordinator
from xaind.aggregator.threads import DiskThreads, SerialWorker
from xaind.aggregator.store import ModelStore
from xaind.http_limits import HTTPLimits
from xaind.protocol import ErrorCode, Refusal
from xaind.web import EARLY_ANSWER_GRACE, http_status
from xaind.testing.wire import encode_local_result

from xaind.testing.fakes import FakeCoordinator
from xaind.testing.memory_http import (
    LAST_CHUNK,
    HTTPResponse,
    MemoryConnection,
    MemoryHTTP,
    chunk,
    parse_head,
    parse_response,
    parse_responses,
    request_bytes,
)
from xaind.testing.waiting import wait_until, within

MAX_UPLOAD = 64 * 1024
SHAPE = (3, 5)

Response = HTTPResponse


# -- helpers ---------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def weights(seed: int, shape: tuple[int, ...] = SHAPE, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def assert_json_error(response: Response, code: int) -> None:
    assert response.code == code, (response.code, response.body)
    assert response.header(b"content-type") == [b"application/json"]
    document = response.json
    assert set(document) == {"error", "code"} and isinstance(document["error"], str) and document["error"]
    assert http_status(Refusal("", ErrorCode(document["code"]))) == code  # a known code, of this status


class RawClient(Protocol):
    """Keeps everything it receives; `closed` fires when the connection is gone."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred = Deferred()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.connected = False
        self.closed.callback(None)

    def response(self, head_request: bool = False) -> Response:
        """The one whole response of a connection the server has closed."""
        parsed = parse_response(bytes(self.received), head_request=head_request, closed=not self.connected)
        assert parsed is not None, f"no complete response in {bytes(self.received[:200])!r}"
        response, rest = parsed
        assert rest == b"", rest
        return response


class SlowReader(Protocol):
    """Sends a GET, then reads nothing until resumed; hashes the body instead of keeping it."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.code: int | None = None
        self.headers: dict[bytes, list[bytes]] = {}
        self.digest = hashlib.sha256()
        self.body_bytes = 0
        self.closed: Deferred = Deferred()
        self.connected = False

    def connectionMade(self) -> None:
        self.connected = True
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.code is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.code, _, self.headers = parse_head(head)
        self.digest.update(data)
        self.body_bytes += len(data)

    def connectionLost(self, reason: Any) -> None:
        self.connected = False
        self.closed.callback(None)


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- the harness -----------------------------------------------------------------------


@dataclass
class Harness:
    service: AggregatorService
    coordinator: FakeCoordinator
    state_dir: Path
    http: MemoryHTTP  # in-memory connections to a site whose timers run on `site_clock`
    site_clock: MemoryReactorClock
    port: IListeningPort | None = None  # a loopback port, for the tests that need sockets
    channels: list = field(default_factory=list)  # the server's side of every socket connection
    clients: list = field(default_factory=list)  # raw clients

    def send(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None, body: bytes | None = None
    ) -> MemoryConnection:
        """Send one request in memory; its answer is to come on the returned connection."""
        return self.http.request(method, path, headers, body)

    async def request(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None, body: bytes | None = None
    ) -> Response:
        """One request in memory; the whole answer, once it arrived (within WAIT seconds)."""
        return await within(self.send(method, path, headers, body).answer())

    async def raw(self, protocol: Protocol | None = None) -> Any:
        """A raw TCP connection to the loopback port; closed after the test if still open."""
        assert self.port is not None, "serve(over_tcp=True) for a socket"
        protocol = protocol or RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        await within(connectProtocol(endpoint, protocol))
        self.clients.append(protocol)
        return protocol

    async def tcp_request(
        self, method: bytes, path: bytes, headers: dict[bytes, bytes] | None = None, body: bytes | None = None
    ) -> Response:
        """One request over a raw loopback connection: the answer exactly as sent."""
        client = await self.raw()
        client.transport.write(request_bytes(method, path, headers, body))
        await within(client.closed)
        return client.response(head_request=method == b"HEAD")

    async def drain(self) -> None:
        """Wait until every step queued in the aggregator's worker so far ran, and every disk step ended."""
        await within(self.service.settled())

    async def upload_directly(self, participant_id: str, samples: int, array: np.ndarray) -> None:
        """Admit and upload without HTTP (to set up a round)."""
        token = f"setup-{participant_id}"
        self.service.admit(participant_id, token, self.service.model.round)
        current = self.service.begin_upload(participant_id, token)
        current.write(encode_local_result(samples, array))
        await within(current.finish())

    async def aggregate_with(self, *results: tuple[int, np.ndarray]) -> None:
        """Run the current round with these results, through to the next global model."""
        for number, (samples, array) in enumerate(results):
            await self.upload_directly(f"setup-{self.service.model.round}-{number}", samples, array)
        await within(self.service.aggregate(self.service.model.round))
        await self.drain()  # the new model's shape is known to the upload checks from here on

    def round_files(self) -> list[str]:
        directory = self.state_dir / f"round-{self.service.model.round}"
        return sorted(os.listdir(directory)) if directory.exists() else []

    def upload_path(self, participant_id: str, token: str) -> bytes:
        return f"/{participant_id}/{token}".encode()


@pytest.fixture
def logged_errors():
    """xaind's error-level log events during the test; none are expected."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("xaind") and event.get("log_level", LogLevel.info) >= LogLevel.error:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)
    assert events == [], "unexpected errors logged: " + "; ".join(str(e.get("log_format")) for e in events)


@pytest_twisted.async_yield_fixture
async def serve(tmp_path, logged_errors):
    """A factory: serve(max_upload_bytes=..., call_timeout=..., over_tcp=...) -> Harness; all closed after the test.

    Every harness answers in memory; with `over_tcp` it also listens on a
    loopback port, through a site of its own on the real reactor.
    """
    harnesses: list[Harness] = []

    def make(max_upload_bytes: int = MAX_UPLOAD, call_timeout: float = 5.0, over_tcp: bool = False) -> Harness:
        state_dir = tmp_path / f"state-{len(harnesses)}"
        coordinator = FakeCoordinator()
        verifyObject(ICoordinator, coordinator)
        service = AggregatorService(
            ModelStore(str(state_dir)),
            WeightedAverageBackend(),
            coordinator,
            reactor,
            max_upload_bytes=max_upload_bytes,
            call_timeout=call_timeout,
            worker=SerialWorker(reactor, "test"),
            disk=DiskThreads(reactor, "test-disk"),
        )
        service.startService()
        site_clock = MemoryReactorClock()
        harness = Harness(service, coordinator, state_dir, MemoryHTTP(AggregatorSite(service, site_clock)), site_clock)
        if over_tcp:
            site = AggregatorSite(service, reactor)
            build = site.buildProtocol

            def tracked(address: Any) -> Any:
                channel = build(address)
                harness.channels.append(channel)
                return channel

            site.buildProtocol = tracked
            harness.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        harnesses.append(harness)
        return harness

    yield make

    for harness in harnesses:
        try:
            harness.http.close()
            if harness.port is not None:
                await harness.port.stopListening()
            for client in harness.clients:
                if client.connected:
                    client.transport.abortConnection()
                    await within(client.closed)
            for channel in harness.channels:
                transport = server_transport(channel)
                if transport is not None and transport.connected:
                    transport.abortConnection()
            await wait_until(lambda: not any(server_transport(c).connected for c in harness.channels))
            await harness.drain()
        finally:
            harness.service.stopService()


def server_transport(protocol: Any) -> Any:
    """The transport of one server-side connection (the site wraps its HTTPChannel)."""
    return getattr(protocol, "_channel", protocol).transport


# -- download -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_download_before_the_first_aggregation_is_empty(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    answer = await harness.request(b"GET", b"/p1/t1")
    assert answer.code == 200
    assert answer.body == b""
    assert answer.header(b"content-length") == [b"0"]
    assert answer.header(b"content-type") == [b"application/octet-stream"]
    (etag,) = answer.header(b"etag")
    assert etag.startswith(b'"') and etag.endswith(b'"') and len(etag) > 2
    head = await harness.request(b"HEAD", b"/p1/t1")
    assert head.code == 200 and head.body == b"" and head.header(b"content-length") == [b"0"]
    assert head.header(b"etag") == [etag]


@pytest_twisted.ensureDeferred
async def test_download_after_an_aggregation_streams_the_model(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    empty = await harness.request(b"GET", b"/p1/t1")
    first, second = weights(1), weights(2)
    await harness.aggregate_with((3, first), (1, second))
    expected = ((3 * first.astype(np.float64) + second) / 4).astype(np.float32)
    harness.service.admit("p1", "t1", 1)

    answer = await harness.request(b"GET", b"/p1/t1")

    model = harness.service.model
    assert answer.code == 200
    assert answer.body == Path(model.path).read_bytes()
    np.testing.assert_allclose(np.load(io.BytesIO(answer.body), allow_pickle=False), expected, rtol=1e-6)
    assert answer.header(b"content-length") == [str(model.size).encode()]
    assert answer.header(b"accept-ranges") == [b"bytes"]
    assert answer.header(b"content-type") == [b"application/octet-stream"]
    assert answer.header(b"etag") == [model.etag.encode()]
    assert answer.header(b"etag") != empty.header(b"etag")

    head = await harness.request(b"HEAD", b"/p1/t1")
    assert head.code == 200 and head.body == b""
    assert head.header(b"content-length") == [str(model.size).encode()]
    assert head.header(b"etag") == [model.etag.encode()]
    assert head.header(b"accept-ranges") == [b"bytes"]

    # The next model version has another ETag.
    await harness.aggregate_with((2, weights(3)))
    harness.service.admit("p1", "t1", 2)
    later = await harness.request(b"GET", b"/p1/t1")
    assert later.code == 200
    assert later.header(b"etag") == [harness.service.model.etag.encode()]
    assert later.header(b"etag") != answer.header(b"etag")
    assert later.body == Path(harness.service.model.path).read_bytes()


@pytest_twisted.ensureDeferred
async def test_download_ranges(serve):
    harness = serve()
    await harness.aggregate_with((1, weights(4, shape=(60,))))  # 240 data bytes after the .npy header
    harness.service.admit("p1", "t1", 1)
    model = harness.service.model
    content = Path(model.path).read_bytes()
    size = len(content)
    assert size > 200

    async def get(headers: dict[bytes, bytes]) -> Response:
        return await harness.request(b"GET", b"/p1/t1", headers)

    middle = await get({b"range": b"bytes=10-99"})
    assert middle.code == 206
    assert middle.body == content[10:100]
    assert middle.header(b"content-range") == [f"bytes 10-99/{size}".encode()]
    assert middle.header(b"content-length") == [b"90"]
    assert middle.header(b"etag") == [model.etag.encode()]

    suffix = await get({b"range": b"bytes=-50"})
    assert suffix.code == 206
    assert suffix.body == content[-50:]
    assert suffix.header(b"content-range") == [f"bytes {size - 50}-{size - 1}/{size}".encode()]

    open_ended = await get({b"range": b"bytes=100-"})
    assert open_ended.code == 206
    assert open_ended.body == content[100:]
    assert open_ended.header(b"content-range") == [f"bytes 100-{size - 1}/{size}".encode()]

    beyond = await get({b"range": f"bytes={size}-".encode()})
    assert_json_error(beyond, 416)
    assert beyond.header(b"content-range") == [f"bytes */{size}".encode()]

    stale = await get({b"range": b"bytes=10-99", b"if-range": b'"an-older-model"'})
    assert stale.code == 200
    assert stale.body == content
    assert stale.header(b"content-range") is None

    current = await get({b"range": b"bytes=10-99", b"if-range": model.etag.encode()})
    assert current.code == 206 and current.body == content[10:100]


@pytest_twisted.ensureDeferred
async def test_head_ignores_range(serve):
    harness = serve()
    await harness.aggregate_with((1, weights(5, shape=(60,))))
    harness.service.admit("p1", "t1", 1)
    size = harness.service.model.size
    plain = await harness.request(b"HEAD", b"/p1/t1")
    ranged = await harness.request(b"HEAD", b"/p1/t1", {b"range": b"bytes=10-99"})
    assert plain.header(b"content-length") == [str(size).encode()]
    assert ranged.code == plain.code == 200
    assert ranged.header(b"content-length") == plain.header(b"content-length")
    assert ranged.header(b"content-range") is None
    beyond = await harness.request(b"HEAD", b"/p1/t1", {b"range": f"bytes={size}-".encode()})
    assert beyond.code == 200 and beyond.body == b""
    assert beyond.header(b"content-length") == plain.header(b"content-length")


@pytest_twisted.ensureDeferred
async def test_several_ranges_another_unit_or_a_malformed_range_send_the_whole_model(serve):
    harness = serve()
    await harness.aggregate_with((1, weights(31, shape=(60,))))
    harness.service.admit("p1", "t1", 1)
    content = Path(harness.service.model.path).read_bytes()
    for header in (b"bytes=0-9,20-29", b"items=0-9", b"bytes=-", b"bytes=a-b"):
        answer = await harness.request(b"GET", b"/p1/t1", {b"range": header})
        assert answer.code == 200, header
        assert answer.body == content
        assert answer.header(b"content-length") == [str(len(content)).encode()]
        assert answer.header(b"content-range") is None


@pytest_twisted.ensureDeferred
async def test_range_positions_of_thousands_of_digits_are_read_as_what_they_are(serve, logged_errors):
    harness = serve()
    await harness.aggregate_with((1, weights(34, shape=(60,))))
    harness.service.admit("p1", "t1", 1)
    content = Path(harness.service.model.path).read_bytes()
    size = len(content)
    huge = b"9" * 5000  # above the 4,300 digits int() takes from a string

    to_the_end = await harness.request(b"GET", b"/p1/t1", {b"range": b"bytes=10-" + huge})
    assert to_the_end.code == 206 and to_the_end.body == content[10:]
    assert to_the_end.header(b"content-range") == [f"bytes 10-{size - 1}/{size}".encode()]
    everything = await harness.request(b"GET", b"/p1/t1", {b"range": b"bytes=-" + huge})
    assert everything.code == 200 and everything.body == content
    beyond = await harness.request(b"GET", b"/p1/t1", {b"range": b"bytes=" + huge + b"-"})
    assert_json_error(beyond, 416)
    assert beyond.header(b"content-range") == [f"bytes */{size}".encode()]
    padded = await harness.request(b"GET", b"/p1/t1", {b"range": b"bytes=" + b"0" * 5000 + b"5-" + b"0" * 5000 + b"9"})
    assert padded.code == 206 and padded.body == content[5:10]


#: Positions as a client may write them: small, long runs of one digit (beyond what int() reads), any digits.
RANGE_POSITIONS = st.one_of(
    st.just(b""),
    st.integers(min_value=0, max_value=10**6).map(lambda n: str(n).encode()),
    st.tuples(st.sampled_from(b"0123456789"), st.integers(min_value=1, max_value=6000)).map(lambda run: bytes([run[0]]) * run[1]),
    st.text("0123456789", max_size=30).map(str.encode),
)
RANGE_VALUES = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda unit, first, last, tail: unit + b"=" + first + b"-" + last + tail,
        st.sampled_from([b"bytes", b"BYTES", b"items", b""]),
        RANGE_POSITIONS,
        RANGE_POSITIONS,
        st.sampled_from([b"", b",0-1", b" ", b"x", b"-", b"\t"]),
    ),
).filter(lambda value: b"\r" not in value and b"\n" not in value and b"\x00" not in value)


@pytest_twisted.ensureDeferred
async def test_any_range_header_is_answered_200_206_or_416(serve):
    # Hypothesis drives the examples from a thread; each request is sent and
    # its answer awaited on the reactor (blockingCallFromThread).
    harness = serve()
    await harness.aggregate_with((1, weights(35, shape=(60,))))
    harness.service.admit("p1", "t1", 1)
    content = Path(harness.service.model.path).read_bytes()

    def ask(value: bytes) -> Response:
        return threads.blockingCallFromThread(reactor, lambda: within(harness.send(b"GET", b"/p1/t1", {b"range": value}).answer()))

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(value=RANGE_VALUES)
    def any_range(value: bytes) -> None:
        answer = ask(value)
        assert answer.code in (200, 206, 416), (value[:80], answer.code, answer.body[:200])
        if answer.code == 200:
            assert answer.body == content
        elif answer.code == 206:
            (content_range,) = answer.header(b"content-range")
            first, last = (int(n) for n in content_range.split(b" ")[1].split(b"/")[0].split(b"-"))
            assert answer.body == content[first : last + 1] and answer.body
        else:
            assert_json_error(answer, 416)

    await within(threads.deferToThread(any_range), 300)

@pytest_twisted.ensureDeferred
async def test_download_with_an_unknown_id_or_token_is_404(serve):
    harness = serve()
    await harness.aggregate_with((1, weights(6)))
    harness.service.admit("p1", "t1", 1)
    for path in (b"/nobody/t1", b"/p1/wrong", b"/p1/t1x", b"/p1/t"):
        answer = await harness.request(b"GET", path)
        assert_json_error(answer, 404)
        assert answer.header(b"etag") is None
    head = await harness.request(b"HEAD", b"/p1/wrong")
    assert head.code == 404 and head.body == b""


@pytest_twisted.ensureDeferred
async def test_concurrent_slow_readers_do_not_make_the_aggregator_hold_copies(serve):
    harness = serve(max_upload_bytes=64 * 2**20, over_tcp=True)
    array = np.arange(10 * 2**20, dtype=np.float32)  # 40 MiB of weights
    await harness.aggregate_with((1, array))
    del array
    model = harness.service.model
    size = model.size
    assert size > 40 * 2**20
    expected_digest = file_digest(model.path)
    readers = 10
    for number in range(readers):
        harness.service.admit(f"p{number}", f"t{number}", model.round)
    gc.collect()
    baseline = rss_bytes()
    peak = [baseline]

    def sample() -> None:
        peak[0] = max(peak[0], rss_bytes())

    clients = []
    for number in range(readers):
        request = f"GET /p{number}/t{number} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        clients.append(await harness.raw(SlowReader(request)))

    # Every download started and the server's sending side is held back by its readers: its
    # transports have paused their producers, and stay so (the kernel's buffers are full).
    def stalled() -> bool:
        return len(harness.channels) == readers and all(
            server_transport(channel).producerPaused for channel in harness.channels
        )

    observed = {"in_a_row": 0}

    def held_back() -> bool:
        sample()
        observed["in_a_row"] = observed["in_a_row"] + 1 if stalled() else 0
        return observed["in_a_row"] >= 20

    await wait_until(held_back)
    growth = peak[0] - baseline
    assert growth < 1.5 * size, f"memory grew by {growth} bytes serving {readers} x {size} bytes"
    assert all(client.code is None and client.body_bytes == 0 for client in clients)

    for client in clients:
        client.transport.resumeProducing()
    for client in clients:
        await within(client.closed, 30.0)
    for client in clients:
        assert client.code == 200
        assert client.headers[b"content-length"] == [str(size).encode()]
        assert client.body_bytes == size
        assert client.digest.hexdigest() == expected_digest


def split_responses(received: bytes) -> list[Response]:
    """Consecutive responses, as sent on one keep-alive connection that has ended."""
    responses, rest = parse_responses(received, closed=True)
    assert rest == b"", rest[:200]
    return responses


@pytest.fixture
def counted_sendfile(monkeypatch):
    """Counts the bytes os.sendfile moved (the real call still does the work)."""
    moved = {"bytes": 0, "calls": 0}
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sent = real(out_fd, in_fd, offset, count)
        moved["bytes"] += sent
        moved["calls"] += 1
        return sent

    monkeypatch.setattr(os, "sendfile", counting)
    return moved


async def model_of(harness: Harness, mib: int) -> bytes:
    """Aggregate a model of about `mib` MiB and admit p1/t1 for the next round; its bytes."""
    await harness.aggregate_with((1, np.arange(mib * 2**18, dtype=np.float32)))
    harness.service.admit("p1", "t1", harness.service.model.round)
    return Path(harness.service.model.path).read_bytes()


@pytest_twisted.ensureDeferred
async def test_on_plain_tcp_the_kernel_sends_the_model_and_keep_alive_stays_in_order(serve, counted_sendfile):
    harness = serve(max_upload_bytes=16 * 2**20, over_tcp=True)
    content = await model_of(harness, 6)
    client = await harness.raw()
    # Three requests at once on one connection: a whole download, a range, and a JSON answer.
    client.transport.write(
        b"GET /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        b"GET /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=1000-2999999\r\n\r\n"
        b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    await within(client.closed, 30.0)

    whole, part, status = split_responses(bytes(client.received))
    assert whole.code == 200 and whole.body == content
    assert part.code == 206 and part.body == content[1000:3000000]
    assert part.header(b"content-range") == [f"bytes 1000-2999999/{len(content)}".encode()]
    assert status.code == 200 and json.loads(status.body)["model_round"] == 1
    # Nearly all of it went from the file to the socket in the kernel; only the
    # headers' first piece and the pieces that wait for a full socket went through Twisted.
    assert counted_sendfile["bytes"] >= 0.8 * (len(content) + 2999000)


def open_descriptors_of(path: str) -> int:
    """How many of this process's file descriptors are open on `path`."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}") == path
        except OSError:
            pass  # closed meanwhile
    return count


@pytest_twisted.ensureDeferred
async def test_a_download_the_client_breaks_off_closes_the_model_file(serve):
    harness = serve(max_upload_bytes=64 * 2**20, over_tcp=True)
    content = await model_of(harness, 40)
    path = harness.service.model.path
    request = b"GET /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    reader = await harness.raw(SlowReader(request))
    await wait_until(lambda: open_descriptors_of(path) == 1)  # the download is under way, held back by the reader

    reader.transport.abortConnection()
    await within(reader.closed)

    await wait_until(lambda: open_descriptors_of(path) == 0)
    assert len(content) > 40 * 2**20 and reader.body_bytes < len(content)


@pytest_twisted.ensureDeferred
async def test_where_sendfile_cannot_be_used_the_model_goes_through_the_transport(serve, counted_sendfile, monkeypatch):
    from xaind.aggregator import download

    monkeypatch.setattr(download, "sendfile_capable", lambda transport: False)
    harness = serve(max_upload_bytes=16 * 2**20, over_tcp=True)
    content = await model_of(harness, 3)

    whole = await harness.tcp_request(b"GET", b"/p1/t1")
    part = await harness.tcp_request(b"GET", b"/p1/t1", {b"range": b"bytes=-5000"})

    assert whole.code == 200 and whole.body == content
    assert part.code == 206 and part.body == content[-5000:]
    assert counted_sendfile["calls"] == 0


@pytest_twisted.ensureDeferred
async def test_a_model_file_shorter_than_its_size_cuts_the_download_short(serve, logged_errors):
    harness = serve(max_upload_bytes=16 * 2**20, over_tcp=True)
    content = await model_of(harness, 2)
    os.truncate(harness.service.model.path, len(content) // 2)  # damaged behind the aggregator's back

    client = await harness.raw()
    client.transport.write(b"GET /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await within(client.closed, 30.0)

    head, _, body = bytes(client.received).partition(b"\r\n\r\n")
    code, _, headers = parse_head(head)
    assert code == 200 and headers[b"content-length"] == [str(len(content)).encode()]
    assert len(body) < len(content)  # the client can tell: fewer bytes than announced, then EOF
    assert body == content[: len(body)]
    assert ["the model file ended {left} bytes early; download abandoned"] == [e["log_format"] for e in logged_errors]
    logged_errors.clear()


# -- upload ------------------------------------------------------------------------------------


UPLOAD_HEADERS = {b"content-type": b"application/octet-stream"}


def send_upload(harness: Harness, participant_id: str, token: str, body: bytes) -> MemoryConnection:
    """An upload sent whole in memory; its answer is to come on the returned connection."""
    return harness.send(b"POST", harness.upload_path(participant_id, token), UPLOAD_HEADERS, body)


async def post(harness: Harness, participant_id: str, token: str, body: bytes) -> Response:
    """An upload in memory, and its whole answer."""
    return await within(send_upload(harness, participant_id, token, body).answer())


async def post_over_tcp(harness: Harness, participant_id: str, token: str, body: bytes) -> Response:
    return await harness.tcp_request(b"POST", harness.upload_path(participant_id, token), UPLOAD_HEADERS, body)


async def post_chunked(harness: Harness, participant_id: str, token: str, body: bytes, size: int = 4096) -> Response:
    """An upload in the chunked coding, in memory: each chunk reaches the server as one read of its socket would."""
    connection = harness.http.connect()
    connection.note_request(b"POST")
    head = request_bytes(b"POST", harness.upload_path(participant_id, token), {b"transfer-encoding": b"chunked"})
    connection.send(head)
    for start in range(0, len(body), size):
        connection.send(chunk(body[start : start + size]))
    connection.send(LAST_CHUNK)
    return await within(connection.answer())


async def assert_nothing_kept(harness: Harness, accepted: int = 0) -> None:
    await harness.drain()
    assert harness.round_files() == []
    status = harness.service.status()
    assert status["accepted"] == accepted
    assert status["uploading"] == 0


async def assert_good_upload(harness: Harness, participant_id: str, token: str, array: np.ndarray, samples: int = 4) -> None:
    """The same token can still deliver a good result, which is kept and counted."""
    calls = len(harness.coordinator.calls)
    harness.coordinator.answer = True
    answer = await post(harness, participant_id, token, encode_local_result(samples, array))
    assert answer.code == 200, answer.body
    assert answer.json == {"ok": True}
    assert [(c.participant_id, c.token, c.success) for c in harness.coordinator.calls[calls:]] == [(participant_id, token, True)]
    await harness.drain()
    assert harness.service.status()["accepted"] == 1
    assert len(harness.round_files()) == 1 and harness.round_files()[0].endswith(".result")
    await within(harness.service.aggregate(harness.service.model.round))
    np.testing.assert_array_equal(np.load(harness.service.model.path), array)


@pytest_twisted.ensureDeferred
async def test_a_good_upload_is_answered_once_the_coordinator_recorded_it(serve):
    harness = serve()
    harness.coordinator.answer = None
    harness.service.admit("p1", "t1", 0)
    array = weights(7)

    answering = send_upload(harness, "p1", "t1", encode_local_result(5, array))
    await wait_until(lambda: len(harness.coordinator.calls) == 1)  # once the worker thread checked and stored it
    call = harness.coordinator.calls[0]
    assert (call.participant_id, call.token, call.success) == ("p1", "t1", True)
    # A full request/answer round trip on another connection: the upload is still unanswered.
    status = await harness.request(b"GET", b"/status")
    assert status.code == 200 and status.json["accepted"] == 1
    assert not answering.answered and answering.received == b""

    call.deferred.callback(True)
    answer = await within(answering.answer())
    assert answer.code == 200
    assert answer.header(b"content-type") == [b"application/json"]
    assert answer.json == {"ok": True}
    assert len(harness.coordinator.calls) == 1
    await harness.drain()
    assert harness.service.status()["accepted"] == 1
    await within(harness.service.aggregate(0))
    np.testing.assert_array_equal(np.load(harness.service.model.path), array)


def _malformed_header() -> bytes:
    return (3).to_bytes(4, "big") + b"NOT A NUMPY STREAM AT ALL" + bytes(100)


def _int32() -> bytes:
    return encode_local_result(3, np.arange(15, dtype=np.int32).reshape(SHAPE))


def _wrong_shape() -> bytes:
    return encode_local_result(3, weights(8, shape=(5, 3)))


def _nan() -> bytes:
    array = weights(9)
    array[2, 1] = np.nan
    return encode_local_result(3, array)


def _too_long() -> bytes:
    return encode_local_result(3, weights(10, shape=(MAX_UPLOAD // 4 + 16,)))


def _truncated() -> bytes:
    return encode_local_result(3, weights(11))[:-7]


@pytest.mark.parametrize(
    ("make_body", "code"),
    [
        pytest.param(_malformed_header, 400, id="malformed-header"),
        pytest.param(_int32, 422, id="int32"),
        pytest.param(_wrong_shape, 422, id="wrong-shape"),
        pytest.param(_nan, 422, id="nan"),
        pytest.param(_too_long, 413, id="content-length-above-limit"),
        pytest.param(_truncated, 400, id="truncated-body"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_upload_is_refused_and_changes_nothing(serve, make_body, code):
    harness = serve()
    await harness.aggregate_with((1, weights(12)))  # a global model of SHAPE exists
    harness.service.admit("p1", "t1", 1)
    body = make_body()
    if code == 413:
        assert len(body) > MAX_UPLOAD

    answer = await post(harness, "p1", "t1", body)

    assert_json_error(answer, code)
    assert [call for call in harness.coordinator.calls if call.participant_id == "p1"] == []  # not told of it
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(13))


@pytest_twisted.ensureDeferred
async def test_a_refusal_before_the_body_is_answered_at_once_and_the_connection_closed_after_the_grace(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    heads = {
        413: request_bytes(b"POST", b"/p1/t1", {b"content-length": b"%d" % (MAX_UPLOAD + 1)}),
        404: request_bytes(b"POST", b"/p1/wrong", {b"content-length": b"1000"}),
    }
    connections: dict[int, MemoryConnection] = {}
    for code, head in heads.items():
        connection = harness.http.connect()
        connection.note_request(b"POST")
        connection.send(head)  # the head only: the body never comes
        assert connection.answered, code
        answer = connection.responses()[0]
        assert_json_error(answer, code)
        assert answer.header(b"connection") == [b"close"]
        connections[code] = connection

    harness.site_clock.advance(EARLY_ANSWER_GRACE - 0.1)
    assert not any(connection.closed_by_server for connection in connections.values())
    harness.site_clock.advance(0.1)
    assert all(connection.closed_by_server for connection in connections.values())
    for connection in connections.values():
        assert len(connection.responses()) == 1  # and nothing after it
    assert harness.coordinator.calls == []
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(32))


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(PermissionError(errno.EACCES, "Permission denied"), id="permission"),
        pytest.param(OSError(errno.ENOSPC, "No space left on device"), id="disk-full"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_upload_whose_file_cannot_be_opened_is_503_and_its_token_stays_usable(serve, logged_errors, monkeypatch, error):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    opened: list[str] = []

    def failing_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(path)
        raise error

    monkeypatch.setattr("xaind.aggregator.upload.open", failing_open, raising=False)
    connection = send_upload(harness, "p1", "t1", encode_local_result(4, weights(36)))

    await wait_until(lambda: connection.answered)  # as soon as the disk refused the file
    answer = connection.responses()[0]
    assert_json_error(answer, 503)
    assert answer.json["code"] == "storage_unavailable"
    assert answer.header(b"connection") == [b"close"]
    assert len(opened) == 1
    assert [event.get("log_failure") for event in logged_errors] == [None]  # one line, no traceback
    assert "p1" in logged_errors[0]["log_format"].format(**logged_errors[0]) and error.strerror in str(logged_errors[0]["error"])
    logged_errors.clear()
    harness.site_clock.advance(EARLY_ANSWER_GRACE)
    assert connection.closed_by_server
    assert harness.coordinator.calls == []

    monkeypatch.undo()  # the disk works again: the same token delivers
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(37))


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("close_fails", [False, True], ids=["close-works", "close-fails-too"])
async def test_an_upload_whose_file_cannot_be_written_mid_way_is_503_and_its_token_stays_usable(serve, logged_errors, monkeypatch, close_fails):
    harness = serve(max_upload_bytes=2**20)
    harness.service.admit("p1", "t1", 0)
    real_open = open

    class FullDisk:
        """The partial file on a disk that fills up after 10 kB."""

        def __init__(self, stream: Any) -> None:
            self.stream, self.written = stream, 0

        def write(self, data: bytes) -> int:
            if self.written + len(data) > 10_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(data)
            return self.stream.write(data)

        def close(self) -> None:
            self.stream.close()
            if close_fails:  # as a buffered file's flush on a full disk does
                raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.stream, name)

    def filling_open(path: str, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        stream = real_open(path, mode, *args, **kwargs)
        return FullDisk(stream) if "w" in mode else stream

    monkeypatch.setattr("xaind.aggregator.upload.open", filling_open, raising=False)
    body = encode_local_result(4, weights(42, shape=(20000,)))
    connection = harness.http.connect()
    connection.note_request(b"POST")
    connection.send(request_bytes(b"POST", b"/p1/t1", UPLOAD_HEADERS | {b"content-length": b"%d" % len(body)}))
    await harness.drain()  # the partial file is created on a disk thread
    for start in range(0, len(body), 4096):
        connection.send(body[start : start + 4096])
        if connection.answered:
            break

    assert connection.answered and start < 16384  # answered when the write failed, the rest never read
    answer = connection.responses()[0]
    assert_json_error(answer, 503)
    assert answer.json["code"] == "storage_unavailable"
    assert [event.get("log_failure") for event in logged_errors] == [None]
    logged_errors.clear()
    harness.site_clock.advance(EARLY_ANSWER_GRACE)
    assert connection.closed_by_server
    monkeypatch.undo()
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(43))


@pytest_twisted.ensureDeferred
async def test_other_paths_and_methods_are_json_errors(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    for path in (b"/", b"/p1", b"/p1/t1/extra", b"/status/x"):
        assert_json_error(await harness.request(b"GET", path), 404)
    wrong = await harness.request(b"DELETE", b"/p1/t1")
    assert_json_error(wrong, 405)
    assert wrong.header(b"allow") == [b"GET, HEAD, POST"]
    # A body on a path that is not an upload's is read as twisted.web reads any body.
    status = await harness.request(b"POST", b"/status", {b"content-type": b"application/json"}, b'{"x":1}')
    assert_json_error(status, 405)
    assert status.header(b"allow") == [b"GET"]
    assert harness.coordinator.calls == []
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(33))


@pytest.mark.parametrize(
    ("method", "path"),
    [(b"POST", b"/status"), (b"GET", b"/p1/t1"), (b"POST", b"/p1/t1/extra"), (b"PUT", b"/p1/t1")],
)
@pytest_twisted.ensureDeferred
async def test_a_body_above_the_limit_is_413_at_once_on_every_path_but_an_upload(serve, monkeypatch, method, path):
    import tempfile

    spooled: list[object] = []
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *args, **kwargs: spooled.append(args))
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    limit = HTTPLimits().max_body_bytes
    connection = harness.http.connect()
    connection.note_request(method)
    connection.send(request_bytes(method, path, {b"content-length": b"%d" % (500 * 2**20)}))  # the head only

    assert connection.answered
    answer = connection.responses()[0]
    assert_json_error(answer, 413)
    assert answer.json == {"error": f"request body of {500 * 2**20} bytes is above api.max_body_bytes ({limit})", "code": "body_too_large"}
    assert answer.header(b"connection") == [b"close"]
    harness.site_clock.advance(EARLY_ANSWER_GRACE)
    assert connection.closed_by_server
    assert spooled == []
    monkeypatch.undo()
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(38))


@pytest_twisted.ensureDeferred
async def test_an_upload_below_the_minimum_rate_is_408_and_changes_nothing(serve):
    harness = serve(max_upload_bytes=2**20)
    harness.service.admit("p1", "t1", 0)
    limits = HTTPLimits()
    body = encode_local_result(4, weights(39, shape=(20000,)))  # 80 kB
    connection = harness.http.connect()
    connection.note_request(b"POST")
    connection.send(request_bytes(b"POST", b"/p1/t1", UPLOAD_HEADERS | {b"content-length": b"%d" % len(body)}))
    sent = 0
    while not connection.closed_by_server and harness.site_clock.seconds() < 3 * limits.body_rate_window:
        connection.send(body[sent : sent + 1000])  # 1000 bytes every 3 s: 333 bytes/s
        sent += 1000
        harness.site_clock.advance(3)
    assert harness.site_clock.seconds() == pytest.approx(limits.body_rate_window, abs=3), connection.received

    assert connection.closed_by_server
    answer = connection.responses()[0]
    assert_json_error(answer, 408)
    assert answer.json["code"] == "body_too_slow"
    assert harness.coordinator.calls == []
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(40))


@pytest_twisted.ensureDeferred
async def test_an_upload_on_a_poor_link_that_stalls_gets_through(serve):
    harness = serve(max_upload_bytes=2**20)
    harness.service.admit("p1", "t1", 0)
    limits = HTTPLimits()
    array = weights(41, shape=(60000,))
    body = encode_local_result(4, array)  # 240 kB at 1.5 kB/s, in bursts with a 20 s stall each window
    window_bytes = int(limits.body_min_rate * limits.body_rate_window)
    connection = harness.http.connect()
    connection.note_request(b"POST")
    connection.send(request_bytes(b"POST", b"/p1/t1", UPLOAD_HEADERS | {b"content-length": b"%d" % len(body)}))
    sent = 0
    while sent < len(body):
        for _ in range(10):  # 10 s of sending, then 20 s of nothing
            connection.send(body[sent : sent + window_bytes // 10 + 512])
            sent += window_bytes // 10 + 512
            harness.site_clock.advance(1)
        harness.site_clock.advance(20)
        assert not connection.closed_by_server, sent

    harness.coordinator.answer = True
    answer = await within(connection.answer())
    assert answer.code == 200 and answer.json == {"ok": True}
    await harness.drain()
    assert harness.service.status()["accepted"] == 1


@pytest_twisted.ensureDeferred
async def test_a_chunked_upload_that_grows_above_the_limit_is_refused(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)  # no global model yet: any shape is welcome, not any size
    body = encode_local_result(3, weights(15, shape=(3 * MAX_UPLOAD // 4,)))  # 3 x the limit
    assert len(body) > MAX_UPLOAD

    answer = await post_chunked(harness, "p1", "t1", body)

    assert_json_error(answer, 413)
    assert harness.coordinator.calls == []
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(16))


@pytest_twisted.ensureDeferred
async def test_a_chunked_good_upload_is_accepted(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    array = weights(17, shape=(100, 7))
    answer = await post_chunked(harness, "p1", "t1", encode_local_result(2, array), size=333)
    assert answer.code == 200, answer.body
    assert answer.json == {"ok": True}
    await harness.drain()
    assert harness.service.status()["accepted"] == 1
    await within(harness.service.aggregate(0))
    np.testing.assert_array_equal(np.load(harness.service.model.path), array)


@pytest_twisted.ensureDeferred
async def test_an_upload_is_read_in_large_steps_and_the_connection_gets_the_default_back(serve, monkeypatch):
    from xaind.aggregator.http_api import UPLOAD_READ_BYTES
    from xaind.aggregator.upload import Upload

    harness = serve(max_upload_bytes=16 * 2**20, over_tcp=True)
    harness.service.admit("p1", "t1", 0)
    read_sizes: list[int] = []
    write = Upload.write

    def spying(upload: Any, data: bytes) -> None:
        read_sizes.append(server_transport(harness.channels[0]).bufferSize)
        write(upload, data)

    monkeypatch.setattr(Upload, "write", spying)
    array = np.arange(2**20, dtype=np.float32)
    body = encode_local_result(3, array)
    client = await harness.raw()
    client.transport.write(
        b"POST /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    await wait_until(lambda: client.received.endswith(b"0\r\n\r\n"))  # the chunked answer is complete
    after_upload = server_transport(harness.channels[0]).bufferSize
    client.transport.write(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    await within(client.closed)

    answer, status = split_responses(bytes(client.received))
    assert answer.code == 200 and answer.json == {"ok": True}
    assert status.code == 200
    assert read_sizes and set(read_sizes) == {UPLOAD_READ_BYTES}
    assert after_upload == 2**16  # Twisted's default, for whatever the connection does next
    await within(harness.service.aggregate(0))
    np.testing.assert_array_equal(np.load(harness.service.model.path), array)


@pytest_twisted.ensureDeferred
async def test_an_upload_with_an_unknown_id_or_token_is_404(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    body = encode_local_result(3, weights(18))
    for participant_id, token in (("nobody", "t1"), ("p1", "wrong")):
        answer = await post(harness, participant_id, token, body)
        assert_json_error(answer, 404)
    assert harness.coordinator.calls == []
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(19))


@pytest_twisted.ensureDeferred
async def test_a_second_upload_with_the_same_token_is_409(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    first = weights(20)
    assert (await post(harness, "p1", "t1", encode_local_result(3, first))).code == 200
    again = await post(harness, "p1", "t1", encode_local_result(3, weights(21)))
    assert_json_error(again, 409)
    assert len(harness.coordinator.calls) == 1
    await harness.drain()
    assert harness.service.status()["accepted"] == 1
    await within(harness.service.aggregate(0))
    np.testing.assert_array_equal(np.load(harness.service.model.path), first)


@pytest_twisted.ensureDeferred
async def test_an_upload_the_coordinator_refuses_is_409_and_dropped(serve):
    harness = serve()
    harness.service.admit("p1", "t1", 0)
    harness.coordinator.answer = False
    answer = await post(harness, "p1", "t1", encode_local_result(3, weights(24)))
    assert_json_error(answer, 409)
    assert [(c.participant_id, c.token, c.success) for c in harness.coordinator.calls] == [("p1", "t1", True)]
    await assert_nothing_kept(harness)


@pytest_twisted.ensureDeferred
async def test_an_upload_the_coordinator_does_not_confirm_is_503_after_the_call_timeout(serve):
    harness = serve(call_timeout=0.5, over_tcp=True)
    harness.service.admit("p1", "t1", 0)
    harness.coordinator.answer = None  # never fires
    started = reactor.seconds()
    answer = await post_over_tcp(harness, "p1", "t1", encode_local_result(3, weights(25)))
    elapsed = reactor.seconds() - started
    assert_json_error(answer, 503)
    assert 0.5 <= elapsed < 5.0
    assert len(harness.coordinator.calls) == 1
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(26))


@pytest_twisted.ensureDeferred
async def test_a_broken_off_upload_changes_nothing(serve):
    harness = serve(over_tcp=True)
    harness.service.admit("p1", "t1", 0)
    body = encode_local_result(3, weights(27, shape=(2000,)))
    client = await harness.raw()
    client.transport.write(
        f"POST /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    # Counted as uploading at once; its file is created on a disk thread.
    await wait_until(lambda: harness.service.status()["uploading"] == 1 and harness.round_files())
    assert [name.endswith(".partial") for name in harness.round_files()] == [True]

    client.transport.loseConnection()
    await within(client.closed)
    await wait_until(lambda: harness.service.status()["uploading"] == 0)

    assert client.received == b""
    assert harness.coordinator.calls == []
    await assert_nothing_kept(harness)
    await assert_good_upload(harness, "p1", "t1", weights(28))


@pytest_twisted.ensureDeferred
async def test_an_upload_cut_off_by_the_rounds_aggregation_is_409(serve):
    harness = serve(over_tcp=True)
    counted = weights(29)
    await harness.upload_directly("p0", 2, counted)
    harness.service.admit("p1", "t1", 0)
    body = encode_local_result(3, weights(30, shape=SHAPE))
    client = await harness.raw()
    client.transport.write(
        f"POST /p1/t1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    await wait_until(lambda: harness.service.status()["uploading"] == 1)

    await within(harness.service.aggregate(0))
    assert harness.service.status()["uploading"] == 0
    client.transport.write(body[len(body) // 2 :])
    await within(client.closed)

    assert_json_error(client.response(), 409)
    assert [c.participant_id for c in harness.coordinator.calls] == ["p0"]
    await assert_nothing_kept(harness)
    np.testing.assert_array_equal(np.load(harness.service.model.path), counted)
