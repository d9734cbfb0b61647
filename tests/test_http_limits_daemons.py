"""The HTTP limits of both daemons as a client on the network meets them: real `twistd -n` processes.

`head -c 500M /dev/zero | curl -X POST -T - localhost:8081/status` had the
coordinator spool the body to a temporary file; the same on the
aggregator's `/status`. Here a raw socket sends such a chunked body to each
real daemon (started with a configured body limit, on an OS-chosen loopback
port) and must get a 413 JSON answer and a closed connection after a few
kilobytes, while the daemon goes on serving. The deadlines' timing is
tested on a clock in tests/test_http_api.py and tests/test_aggregator_http.py.
"""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path

import pytest

from xaind.http_limits import HTTPLimits
from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER
from xaind.testing.memory_http import parse_response
from xaind.web import EARLY_ANSWER_GRACE
from xaind.tools.daemons import Daemon, aggregator_document, coordinator_document, free_loopback_port, get_json, write_yaml

#: Seconds the whole exchange may take (the server closes 2 s after its answer).
EXCHANGE_TIMEOUT = 20.0
#: Bytes the client offers at most: more than the server can read in its grace, so it is the server that ends it.
OFFERED_BYTES = 2**40
#: Bytes that may be in flight (the two sockets' buffers) when the answer arrives.
IN_FLIGHT_BYTES = 32 * 2**20
#: api.max_body_bytes in the daemons' configuration (the default is HTTPLimits().max_body_bytes).
CONFIGURED_MAX_BODY_BYTES = 1000
assert CONFIGURED_MAX_BODY_BYTES != HTTPLimits().max_body_bytes
CHUNK = b"%x\r\n%s\r\n" % (2**16, b"\0" * 2**16)


def lone_daemon(tmp_path: Path, daemon: str, **api: int) -> tuple[Daemon, str]:
    """The coordinator or the aggregator alone (not started), with `api` added to its api section, and its HTTP listener."""
    if daemon == "coordinator":
        document = coordinator_document(
            state_dir=tmp_path / "state", aggregator_port=free_loopback_port(), federated_learning={"rounds": 1, "min_clients": 1}
        )
        plugin, listener = "xain-coordinator", COORDINATOR_HTTP_LISTENER
    else:
        document = aggregator_document(state_dir=tmp_path / "state", port=0, coordinator_pb_port=free_loopback_port())
        plugin, listener = "xain-aggregator", AGGREGATOR_HTTP_LISTENER
    document["api"].update(api)
    config = write_yaml(tmp_path / f"{daemon}.yaml", document)
    return Daemon(plugin, config, tmp_path, listeners=(listener,)), listener


def post_endless_body(port: int, path: bytes) -> tuple[bytes, int | None, float | None, bool]:
    """POST a chunked body of zeros until the server answers and closes.

    Returns what the server sent, the bytes offered when its first bytes
    arrived, the seconds from then until it closed, and whether it closed.
    """
    received = b""
    sent = 0
    sent_at_answer: int | None = None
    answered_at: float | None = None
    closing_seconds: float | None = None
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.setblocking(False)
        client.sendall(b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        deadline = time.monotonic() + EXCHANGE_TIMEOUT
        pending = b""
        while time.monotonic() < deadline and not closed:
            want_write = [client] if sent < OFFERED_BYTES else []
            readable, writable, _ = select.select([client], want_write, [], 0.5)
            if readable:
                try:
                    data = client.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data and answered_at is None:
                    sent_at_answer, answered_at = sent, time.monotonic()
                if not data:
                    closed = True
                    closing_seconds = None if answered_at is None else time.monotonic() - answered_at
                received += data
            if writable:
                pending = pending or CHUNK
                try:
                    count = client.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    continue  # the server closed; the read side tells
                except BlockingIOError:
                    continue
                sent += count
                pending = pending[count:]
    return received, sent_at_answer, closing_seconds, closed


@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
def test_an_endless_post_to_status_is_413_after_a_few_kilobytes_and_the_daemon_keeps_serving(tmp_path: Path, daemon: str) -> None:
    # A limit other than the default, so that the daemon is seen to take it from its configuration.
    running, listener = lone_daemon(tmp_path, daemon, max_body_bytes=CONFIGURED_MAX_BODY_BYTES)
    with running:
        port = running.ports[listener]
        received, offered, closing_seconds, closed = post_endless_body(port, b"/status")

        parsed = parse_response(received, closed=True)
        assert parsed is not None
        answer, rest = parsed
        assert rest == b""
        assert answer.code == 413, received[:300]
        assert json.loads(answer.body) == {"error": f"request body above api.max_body_bytes ({CONFIGURED_MAX_BODY_BYTES})", "code": "body_too_large"}
        assert answer.header(b"connection") == [b"close"]
        assert closed and closing_seconds is not None and closing_seconds < EARLY_ANSWER_GRACE + 5
        assert offered is not None and offered < IN_FLIGHT_BYTES  # answered once the limit was passed
        status, _ = get_json(running.url(listener, "/status"))
        assert status == 200
        assert running.running
        assert "Unhandled" not in running.log_text and "Traceback" not in running.log_text


#: api.max_connections_per_address in the daemons' configuration for the connection test.
CONFIGURED_PER_ADDRESS = 5


def read_until_closed(client: socket.socket, timeout: float = EXCHANGE_TIMEOUT) -> bytes:
    client.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = client.recv(65536)
        if not data:
            break
        received += data
    return received


@pytest.mark.parametrize("daemon", ["coordinator", "aggregator"])
def test_a_connection_beyond_the_per_address_limit_is_answered_503_and_closed(tmp_path: Path, daemon: str) -> None:
    running, listener = lone_daemon(tmp_path, daemon, max_connections_per_address=CONFIGURED_PER_ADDRESS)
    with running:
        port = running.ports[listener]
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(CONFIGURED_PER_ADDRESS)]
        try:
            # The daemon counts a connection once it accepted it: a request on each shows they are all in.
            for client in held:
                client.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert client.recv(65536).startswith(b"HTTP/1.1 200")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as beyond:
                parsed = parse_response(read_until_closed(beyond), closed=True)
            assert parsed is not None
            answer, _ = parsed
            assert answer.code == 503
            assert json.loads(answer.body)["code"] == "too_many_connections"
        finally:
            for client in held:
                client.close()
        # Their places are free again once the daemon saw them close.
        running.wait_for(lambda: get_json(running.url(listener, "/status"))[0] == 200, "a new connection served", timeout=10)
        assert running.running
        assert "Traceback" not in running.log_text and "Unhandled" not in running.log_text
        assert sum("refused a connection" in line for line in running.log_text.splitlines()) == 1
