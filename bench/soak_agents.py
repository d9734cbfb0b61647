"""Misbehaving participants for the soak (`bench.soak`), one thread each, in a process of their own.

They speak the participant HTTP API with `http.client` (no SDK), so they can
do what the SDK never does:

* `dropout`: heartbeats until selected, asks for its token, starts the model
  download and hangs up after its first bytes, then falls silent (no more
  heartbeats), so the coordinator must drop it after `heartbeat_timeout` and
  select another participant in its place; after `--dropout-pause` s it
  comes back under a new id (a new rendez-vous), like a device back online.
* `garbage`: heartbeats until selected, asks for its token, uploads a
  malformed result (cycling through random bytes, a wrong shape, a NaN, an
  integer dtype, a truncated body), which must be refused with a 4xx and a
  JSON `code`; then uploads a valid one with the same token, which must be
  accepted (a refused upload leaves its token usable). The valid result is
  the weights `xain-dummy-participants` uploads, so the global model stays
  what it would be without this agent. In round 0 (no global model yet, the
  first upload sets the round's shape) it leaves the wrong shape out.

Driven by lines on stdin (`counts`: print the counts so far; `stop`: finish
and print them), it prints `counts {json}` lines on stdout. Every loop is
bounded by `--max-seconds` and by a count; every socket has a timeout; only
127.0.0.1 is spoken to.

    python -m bench.soak_agents --port 8081 --elements 250000 --max-seconds 900
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from bench.common import HOST
from xaind.testing.wire import encode_local_result

#: Seconds every request may take (a held heartbeat is answered within `api.heartbeat_hold`).
REQUEST_TIMEOUT = 20.0
HEARTBEAT_PERIOD = 0.2
#: Garbage uploads cycle through these.
GARBAGE_KINDS = ("random_bytes", "wrong_shape", "nan", "int_dtype", "truncated")


class Finished(Exception):
    """Training is complete (`finish`), or the agent was told to stop."""


def request(port: int, method: str, path: str, body: bytes | None = None,
            read_limit: int | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection to 127.0.0.1:port; `read_limit` reads only that much of the body, then hangs up."""
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT)
    try:
        headers = {"content-type": "application/octet-stream"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read(read_limit) if read_limit is not None else response.read()
        return response.status, data
    finally:
        connection.close()


def garbage(kind: str, weights: np.ndarray) -> bytes:
    if kind == "random_bytes":
        return np.random.default_rng().bytes(4096)
    if kind == "wrong_shape":
        return encode_local_result(3, np.zeros(weights.shape[0] + 1, dtype=np.float32))
    if kind == "nan":
        bad = weights.copy()
        bad[len(bad) // 2] = np.nan
        return encode_local_result(3, bad)
    if kind == "int_dtype":
        return encode_local_result(3, np.zeros(weights.shape, dtype=np.int32))
    if kind == "truncated":
        return encode_local_result(3, weights)[:-100]
    raise ValueError(f"unknown garbage kind {kind!r}")


class Agent(threading.Thread):
    """One misbehaving participant: rendez-vous, heartbeats, and its misdeed whenever it is selected."""

    def __init__(self, kind: str, port: int, weights: np.ndarray, deadline: float, halt: threading.Event,
                 counts: Counter[str], lock: threading.Lock, dropout_pause: float) -> None:
        super().__init__(name=f"agent-{kind}", daemon=True)
        self.kind = kind
        self.port = port
        self.weights = weights
        self.valid = encode_local_result(2, weights)
        self.deadline = deadline
        self.halt = halt
        self.counts = counts
        self.lock = lock
        self.dropout_pause = dropout_pause
        self.garbage_index = 0
        self.error = ""

    def count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def pause(self, seconds: float) -> None:
        if self.halt.wait(seconds) or time.monotonic() > self.deadline:
            raise Finished()

    def get_json(self, path: str) -> dict[str, Any]:
        status, body = request(self.port, "GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: HTTP {status} {body[:200]!r}")
        return json.loads(body)

    def run(self) -> None:
        try:
            for _ in range(100_000):  # bounded: one pass per rendez-vous, and by the deadline
                if not self.one_life():
                    break
        except Finished:
            pass
        except (OSError, http.client.HTTPException, RuntimeError, ValueError) as error:
            self.error = f"{type(error).__name__}: {error}"
            self.count(f"{self.kind}_error")

    def one_life(self) -> bool:
        """Rendez-vous and heartbeat until selected, misbehave; False once training is complete."""
        answer = self.get_json("/rendez_vous")
        if not answer.get("ok"):
            return False
        participant = answer["id"]
        self.count(f"{self.kind}_rendez_vous")
        for _ in range(1_000_000):  # bounded by the deadline through pause()
            beat = self.get_json(f"/heartbeat/{participant}")
            state = beat.get("state")
            if state == "finish":
                return False
            if state == "reject":
                self.count(f"{self.kind}_rejected")
                return True
            if state == "round":
                if self.kind == "dropout":
                    self.drop_out(participant)
                    return True
                self.upload_garbage(participant, int(beat["round"]))
            self.pause(HEARTBEAT_PERIOD)
        return True

    def start_training(self, participant: str) -> tuple[int, str] | None:
        answer = self.get_json(f"/start_training/{participant}")
        if not answer.get("ok"):
            self.count(f"{self.kind}_start_training_refused")
            return None
        url = urlsplit(answer["url"])
        if url.hostname not in (HOST, "localhost") or url.port is None:
            raise RuntimeError(f"the aggregator URL {answer['url']!r} is not on {HOST}")
        return url.port, f"/{participant}/{answer['token']}"

    def drop_out(self, participant: str) -> None:
        started = self.start_training(participant)
        if started is not None:
            port, path = started
            request(port, "GET", path, read_limit=1024)  # hangs up after the first kilobyte
        self.count("dropout_silent")
        self.pause(self.dropout_pause)

    def upload_garbage(self, participant: str, round_number: int) -> None:
        started = self.start_training(participant)
        if started is None:
            return
        port, path = started
        kinds = [k for k in GARBAGE_KINDS if round_number > 0 or k != "wrong_shape"]
        kind = kinds[self.garbage_index % len(kinds)]
        self.garbage_index += 1
        try:
            status, body = request(port, "POST", path, body=garbage(kind, self.weights))
        except (ConnectionResetError, BrokenPipeError):
            # Refused at once with `connection: close` while the body was still being sent.
            self.count(f"garbage_{kind}_reset")
        else:
            code = json.loads(body).get("code", "") if body.startswith(b"{") else ""
            if 400 <= status < 500 and code:
                self.count(f"garbage_{kind}_{status}_{code}")
                self.count("garbage_refused")
            else:
                self.count(f"garbage_{kind}_unexpected_{status}")
                self.count("garbage_unexpected")
        status, body = request(port, "POST", path, body=self.valid)
        if status == 200:
            self.count("garbage_then_valid_accepted")
        else:
            code = json.loads(body).get("code", "") if body.startswith(b"{") else ""
            self.count(f"garbage_then_valid_{status}_{code}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="the coordinator's HTTP port on 127.0.0.1")
    parser.add_argument("--elements", type=int, required=True, help="float32 elements of the model")
    parser.add_argument("--max-seconds", type=float, required=True)
    parser.add_argument("--dropout-pause", type=float, default=6.0, help="seconds a dropped-out agent stays away")
    parser.add_argument("--agents", default="dropout,garbage", help="comma-separated kinds, one thread each")
    args = parser.parse_args(argv)
    weights = np.linspace(-1.0, 1.0, args.elements, dtype=np.float32)
    deadline = time.monotonic() + args.max_seconds
    halt = threading.Event()
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    agents = [Agent(kind, args.port, weights, deadline, halt, counts, lock, args.dropout_pause)
              for kind in args.agents.split(",") if kind]
    for agent in agents:
        agent.start()

    def emit() -> None:
        with lock:
            snapshot = dict(counts)
        snapshot["errors"] = [a.error for a in agents if a.error]
        print("counts " + json.dumps(snapshot, sort_keys=True), flush=True)

    for _ in range(100_000):  # bounded: one command per line, and stdin ends with the parent
        line = sys.stdin.readline()
        if not line or line.strip() == "stop":
            break
        if line.strip() == "counts":
            emit()
    halt.set()
    for agent in agents:
        agent.join(REQUEST_TIMEOUT + 5)
    emit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
