"""Scripted participants for the heartbeat and fan-out benchmarks: K threads held until told "go".

Unlike `xain-dummy-participants` (which trains as soon as it is selected),
these wait for the driver, so that a measurement window starts when the
driver says. Each participant speaks the seed's HTTP API (its own keep-alive
connection to the coordinator, plus a heartbeat thread with another one) and
transfers weights over raw sockets (`sendall` of one shared array,
`recv_into` a reused buffer), so the client side costs as little as possible.

Modes (stdin takes `go` and `quit`; stdout gets one JSON event per line):

- `upload`: all K rendez-vous and wait to be selected for round 0 (the
  coordinator needs min_clients K), print `ready`; on `go`, all K start
  training and upload M MB at once; `uploaded` per participant, then `done`.
- `fanout`: participant 0 rendez-vous alone and is selected for round 0
  (min_clients 1), the other K-1 rendez-vous after it, participant 0 uploads
  M MB, and round 1 selects all K; each asks to start training (so the
  aggregator admits its token), then `ready`; on `go`, all K download the
  global model at once (a barrier releases them together); `downloaded`
  per participant with its first/last byte times, then `done`. Then, on
  `verify` (optional, after the timed downloads so that they carry no
  checksum work), all K download it once more at once on fresh
  connections, this time with a CRC-32 of the bytes: `verified` per
  participant (bytes, crc32), then `checked`.

Every wait is bounded by --max-seconds; SIGTERM/SIGINT or `quit` stop it.

    python -m bench.participants --port 8081 --count 20 --model-mb 100 --mode upload
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import socket
import sys
import threading
import time
import zlib
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.common import HOST, MB, KeepAlive

TRANSFER_TIMEOUT = 600.0
#: The sample count of every upload (bench.fanout checks the model made from one of them).
UPLOAD_SAMPLES = 100
_print_lock = threading.Lock()


def say(event: str, **fields: Any) -> None:
    with _print_lock:
        print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


class Stop(Exception):
    pass


def http_head(sock: socket.socket, deadline: float) -> tuple[int, int, bytes]:
    """Read a response head: (status, content length, body bytes already received)."""
    data = b""
    for _ in range(10_000):  # bounded
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            break
        if time.monotonic() > deadline:
            raise TimeoutError("no response head")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        data += chunk
    else:
        raise RuntimeError("response head too long")
    head = data[:end].decode("latin1")
    status = int(head.split(" ", 2)[1])
    length = 0
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, length, data[end + 4 :]


class Participant:
    def __init__(self, index: int, port: int, period: float, stop: threading.Event, deadline: float) -> None:
        self.index = index
        self.port = port
        self.period = period
        self.stop = stop
        self.deadline = deadline
        self.control = KeepAlive(port)
        self.id = ""
        self.selected_round = -1
        self.finished = threading.Event()
        self.news = threading.Event()
        self.error = ""
        self.path = ""
        self.agg_port = 0
        self.heartbeats: threading.Thread | None = None

    def rendez_vous(self) -> None:
        status, answer = self.control.get_json("/rendez_vous")
        if status != 200 or not answer.get("ok"):
            raise RuntimeError(f"rendez_vous answered {status} {answer}")
        self.id = answer["id"]
        self.heartbeats = threading.Thread(target=self._beat, name=f"heartbeat-{self.index}", daemon=True)
        self.heartbeats.start()

    def _beat(self) -> None:
        client = KeepAlive(self.port)
        try:
            for _ in range(int((self.deadline - time.monotonic()) / self.period) + 2):  # bounded
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                began = time.monotonic()
                status, answer = client.get_json(f"/heartbeat/{self.id}")
                state = answer.get("state") if status == 200 else None
                if state == "round" and int(answer["round"]) > self.selected_round:
                    self.selected_round = int(answer["round"])
                    self.news.set()
                elif state == "finish":
                    self.finished.set()
                    self.news.set()
                    return
                elif state not in ("round", "stand_by"):
                    self.error = f"heartbeat answered {status} {answer}"
                    self.news.set()
                    return
                self.stop.wait(max(0.0, self.period - (time.monotonic() - began)))
        except Exception as error:  # noqa: BLE001 - reported
            self.error = f"heartbeat: {type(error).__name__}: {error}"
            self.news.set()
        finally:
            client.close()

    def wait_selected(self, round_number: int) -> None:
        for _ in range(int((self.deadline - time.monotonic()) / 0.02) + 2):  # bounded
            if self.selected_round >= round_number:
                return
            if self.error:
                raise RuntimeError(self.error)
            if self.stop.is_set() or self.finished.is_set() or time.monotonic() > self.deadline:
                break
            self.news.wait(0.02)
            self.news.clear()
        raise Stop(f"participant {self.index} not selected for round {round_number}")

    def start_training(self) -> None:
        status, answer = self.control.get_json(f"/start_training/{self.id}")
        if status != 200 or not answer.get("ok"):
            raise RuntimeError(f"start_training answered {status} {answer}")
        url = urlsplit(answer["url"])
        if url.hostname != HOST:
            raise RuntimeError(f"the aggregator URL {answer['url']} is not on {HOST}")
        self.agg_port = int(url.port)
        self.path = f"{url.path.rstrip('/')}/{self.id}/{answer['token']}"

    def connect(self) -> socket.socket:
        sock = socket.create_connection((HOST, self.agg_port), timeout=TRANSFER_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def download(self, sock: socket.socket, buffer: memoryview, crc: bool = False) -> dict[str, Any]:
        """GET the global model on `sock`, counting it into `buffer` (reused); with `crc`, also its CRC-32."""
        deadline = time.monotonic() + TRANSFER_TIMEOUT
        started = time.monotonic()
        sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        status, length, rest = http_head(sock, deadline)
        first = time.monotonic()
        if status != 200:
            raise RuntimeError(f"download answered {status}: {rest[:200]!r}")
        received = len(rest)
        value = zlib.crc32(rest) if crc else 0
        for _ in range(length // 4096 + 2):  # bounded: every recv returns >= 1 byte
            if received >= length:
                break
            got = sock.recv_into(buffer[: min(len(buffer), length - received)])
            if not got:
                raise ConnectionError(f"download ended at {received} of {length} bytes")
            if crc:
                value = zlib.crc32(buffer[:got], value)
            received += got
        result = {"bytes": received, "start": started, "first_byte": first, "end": time.monotonic()}
        if crc:
            result["crc32"] = value
        return result

    def upload(self, body: list[Any], length: int) -> dict[str, Any]:
        deadline = time.monotonic() + TRANSFER_TIMEOUT
        with self.connect() as sock:
            started = time.monotonic()
            # The empty download of round 0 first, as a participant does.
            sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            status, size, _ = http_head(sock, deadline)
            if status != 200 or size != 0:
                raise RuntimeError(f"round-0 download answered {status} with {size} bytes")
            sock.sendall(f"POST {self.path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/octet-stream\r\n"
                         f"Content-Length: {length}\r\n\r\n".encode())
            for part in body:
                sock.sendall(part)
            sent = time.monotonic()
            status, size, rest = http_head(sock, deadline)
            if status != 200:
                raise RuntimeError(f"upload answered {status}: {rest[:300]!r}")
            return {"start": started, "sent": sent, "answered": time.monotonic()}


def upload_body(model_mb: float, samples: int) -> tuple[list[Any], int, np.ndarray]:
    weights = np.linspace(-1.0, 1.0, max(1, int(model_mb * MB) // 4), dtype=np.float32)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(weights))
    prefix = samples.to_bytes(4, "big") + header.getvalue()
    data = memoryview(weights).cast("B")
    return [prefix, data], len(prefix) + len(data), weights


def run_threads(targets: list[Any], name: str) -> list[Any]:
    outcomes: list[Any] = [None] * len(targets)

    def wrap(i: int) -> None:
        try:
            outcomes[i] = targets[i]()
        except BaseException as error:  # noqa: BLE001 - reported by the caller
            outcomes[i] = error

    threads = [threading.Thread(target=wrap, args=(i,), name=f"{name}-{i}", daemon=True) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TRANSFER_TIMEOUT)
    return outcomes


def download_all(participants: list[Participant], sockets: list[socket.socket], *, crc: bool) -> list[Any]:
    """Every participant downloads the model at once (a barrier), each on its socket, closed afterwards.

    With `crc`, each download is checksummed as it arrives (a "verified"
    line each): kept out of the timed downloads, which it would slow down.
    """
    barrier = threading.Barrier(len(participants), timeout=60)

    def download(p: Participant, sock: socket.socket) -> Any:
        buffer = memoryview(bytearray(4 << 20))
        barrier.wait()
        result = p.download(sock, buffer, crc=crc)
        if crc:
            say("verified", index=p.index, bytes=result["bytes"], crc32=result["crc32"])
        else:
            say("downloaded", index=p.index, **result)
        return result

    try:
        return run_threads([lambda p=p, s=s: download(p, s) for p, s in zip(participants, sockets)], "verify" if crc else "download")
    finally:
        for sock in sockets:
            sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the coordinator's HTTP port")
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--model-mb", type=float, default=100.0)
    parser.add_argument("--mode", choices=("upload", "fanout"), required=True)
    parser.add_argument("--heartbeat-period", type=float, default=1.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)

    stop = threading.Event()
    commands: list[str] = []
    command_ready = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        command_ready.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def reader() -> None:
        for line in sys.stdin:
            commands.append(line.strip())
            command_ready.set()
        commands.append("quit")
        command_ready.set()

    threading.Thread(target=reader, name="stdin", daemon=True).start()

    def wait_command(expected: str, *others: str) -> str:
        """The first of `expected`, `others` received; Stop on `quit` (unless awaited) or a signal."""
        for _ in range(int(args.max_seconds / 0.05) + 2):  # bounded
            for command in (expected, *others):
                if command in commands:
                    return command
            if stop.is_set() or "quit" in commands:
                raise Stop("told to stop")
            command_ready.wait(0.05)
            command_ready.clear()
        raise Stop(f"no {expected!r} within {args.max_seconds} s")

    deadline = time.monotonic() + args.max_seconds
    participants = [Participant(i, args.port, args.heartbeat_period, stop, deadline) for i in range(args.count)]
    try:
        body, length, _weights = upload_body(args.model_mb, samples=UPLOAD_SAMPLES)
        if args.mode == "upload":
            for p in participants:
                p.rendez_vous()
            for p in participants:
                p.wait_selected(0)
            say("ready", participants=len(participants), ids=[p.id for p in participants[:1]])
            wait_command("go")

            def upload(p: Participant) -> Any:
                p.start_training()
                timing = p.upload(body, length)
                say("uploaded", index=p.index, **timing)
                return timing

            outcomes = run_threads([lambda p=p: upload(p) for p in participants], "upload")
            errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
            say("done", errors=errors[:3], uploads=len(outcomes) - len(errors))
        else:
            first = participants[0]
            first.rendez_vous()
            first.wait_selected(0)
            for p in participants[1:]:
                p.rendez_vous()
            first.start_training()
            timing = first.upload(body, length)
            say("seeded", **timing)
            for p in participants:
                p.wait_selected(1)
            for p in participants:
                p.start_training()
            sockets = [p.connect() for p in participants]
            say("ready", participants=len(participants))
            wait_command("go")
            outcomes = download_all(participants, sockets, crc=False)
            errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
            say("done", errors=errors[:3], downloads=len(outcomes) - len(errors))
            if wait_command("verify", "quit") == "verify":
                outcomes = download_all(participants, [p.connect() for p in participants], crc=True)
                errors = [repr(o) for o in outcomes if isinstance(o, BaseException)]
                say("checked", errors=errors[:3], downloads=len(outcomes) - len(errors))
        wait_command("quit")
        return 0
    except Stop as reason:
        say("stopped", reason=str(reason))
        return 1
    except Exception as error:  # noqa: BLE001 - reported to the driver
        say("failed", error=f"{type(error).__name__}: {error}")
        return 1
    finally:
        stop.set()
        for p in participants:
            p.control.close()


if __name__ == "__main__":
    sys.exit(main())
