"""Under 1,000 slow connections and a 100,000-rendez-vous flood from one address, a participant still trains.

The coordinator and its aggregator (`twistd -n`, the default limits of
docs/http-api.rst, Limits; `heartbeat_hold: 0` so every heartbeat is
answered at once and timed alone) on loopback. A participant that
rendez-voused before the attack heartbeats every HEARTBEAT_PERIOD s over
HTTP keep-alive and trains ROUNDS rounds; meanwhile, all from 127.0.0.1:

- SLOW connections send a request head one byte every SLOW_EVERY s (each
  is closed by `api.header_timeout` after 30 s; a closed one is opened
  again), so SLOW are open throughout;
- `xaind.tools.rendez_vous_flood` (a process of its own) asks FLOOD
  rendez-vous, pipelined on keep-alive connections, and never heartbeats:
  about `participants.rendez_vous_per_address_per_minute` are accepted,
  the rest refused 429; the round after the flood selects every fake still
  alive (`participants_ratio: 1.0`), they expire after `heartbeat_timeout`.

Printed: the participant's heartbeat latency (p50, p99, max) over the whole
run (flood, selection of the fakes, their expiry), the flood's answers,
the coordinator's peak RSS and its log lines.

    .venv/bin/python -m bench.flood [--quick]
"""

from __future__ import annotations

import argparse
import json
import selectors
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (
    HOST,
    Cluster,
    MemorySampler,
    Processes,
    Results,
    Row,
    fmt,
    install_signal_handlers,
    kb_to_mb,
    log,
    percentile,
    shielded,
)
from xaind.testing.keepalive import KeepAliveParticipant

SLOW = 1000
SLOW_EVERY = 3.0
FLOOD = 100_000
FLOOD_SECONDS = 120.0
HEARTBEAT_PERIOD = 0.02
HEARTBEAT_TIMEOUT = 15.0
ROUNDS = 3
#: Seconds the whole training may take: the flood, then two rounds waiting for the fakes to expire.
TRAINING_SECONDS = 240.0
P99_TARGET_MS = 100.0
SLOW_HEAD = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4000 + b"\r\n\r\n"


class SlowClients(threading.Thread):
    """`count` connections sending a request head a byte every `every` seconds; reopened when the server closes them."""

    def __init__(self, port: int, count: int, every: float, max_seconds: float) -> None:
        super().__init__(name="slow-clients", daemon=True)
        self.port, self.count, self.every, self.max_seconds = port, count, every, max_seconds
        self.halt = threading.Event()
        self.sockets: dict[socket.socket, int] = {}
        self.opened = 0
        self.closed_by_server = 0

    def _open(self) -> None:
        client = socket.create_connection((HOST, self.port), timeout=5)
        client.setblocking(False)
        self.sockets[client] = 0
        self.opened += 1

    def run(self) -> None:
        selector = selectors.DefaultSelector()
        try:
            for _ in range(self.count):
                self._open()
            end = time.monotonic() + self.max_seconds
            for _ in range(int(self.max_seconds / self.every) + 2):  # bounded in count and time
                for client in list(self.sockets):
                    sent = self.sockets[client]
                    try:
                        client.send(SLOW_HEAD[sent % len(SLOW_HEAD) : sent % len(SLOW_HEAD) + 1])
                        self.sockets[client] = sent + 1
                        if client.recv(65536) == b"":
                            raise ConnectionResetError
                    except BlockingIOError:
                        continue
                    except OSError:
                        client.close()
                        del self.sockets[client]
                        self.closed_by_server += 1
                        if not self.halt.is_set():
                            self._open()
                if self.halt.wait(self.every) or time.monotonic() > end:
                    break
        finally:
            selector.close()
            for client in self.sockets:
                client.close()

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)


def run(results: Results, slow: int, flood: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-flood-"))
    processes = Processes()
    cluster = Cluster(
        directory,
        {"rounds": ROUNDS, "min_clients": 1, "participants_ratio": 1.0, "heartbeat_timeout": HEARTBEAT_TIMEOUT},
        api_extra={"heartbeat_hold": 0},
    )
    slow_clients: SlowClients | None = None
    sampler: MemorySampler | None = None
    try:
        cluster.start()
        port = cluster.coord_http
        sampler = MemorySampler(cluster.coordinator.pid, TRAINING_SECONDS + 60, period=0.1)
        sampler.start()
        participant = KeepAliveParticipant(port, elements=1000, host=HOST)
        participant.rendez_vous()
        log(f"flood: {slow} slow connections, then {flood} rendez-vous from {HOST}")
        slow_clients = SlowClients(port, slow, SLOW_EVERY, TRAINING_SECONDS + 60)
        slow_clients.start()
        flooder = processes.start(
            "flood", [sys.executable, "-m", "xaind.tools.rendez_vous_flood", str(port), str(flood), str(FLOOD_SECONDS)],
            stdout=-1, text=True,
        )
        started = time.monotonic()
        deadline = started + TRAINING_SECONDS
        trained: list[int] = []
        finished = False
        beats = 0
        while time.monotonic() < deadline and not finished:
            beat = participant.heartbeat()
            beats += 1
            # The first round is trained once the flood is under way (a second in).
            if beat["state"] == "round" and beat["round"] not in trained and time.monotonic() - started > 1.0:
                participant.train(beat["round"])
                trained.append(beat["round"])
                log(f"flood: round {beat['round']} trained after {time.monotonic() - started:.1f} s")
            finished = beat["state"] == "finish" and flooder.poll() is not None
            time.sleep(HEARTBEAT_PERIOD)  # the participant's period
        seconds = time.monotonic() - started
        flood_output, _ = flooder.communicate(timeout=FLOOD_SECONDS + 10)
        flooded = json.loads(flood_output)
        latencies = np.array(participant.latencies) * 1000
        p50, p99, worst = percentile(latencies, 50), percentile(latencies, 99), float(latencies.max())
        statuses = flooded["statuses"]
        lines = cluster.coordinator.log_text.splitlines()
        ok = finished and len(trained) == ROUNDS and p99 < P99_TARGET_MS
        results.emit("flood", {
            "slow_connections": slow, "slow_reopened": slow_clients.closed_by_server,
            "rendez_vous": flood, "flood_seconds": flooded["seconds"],
            "accepted": statuses.get("200", 0), "refused_429": statuses.get("429", 0), "refused_503": statuses.get("503", 0),
            "rounds_trained": len(trained), "training_seconds": seconds, "heartbeats": len(latencies),
            "hb_p50_ms": p50, "hb_p99_ms": p99, "hb_max_ms": worst,
            "coordinator_rss_max_mb": kb_to_mb(sampler.max_kb()), "coordinator_log_lines": len(lines),
            "target": f"p99<{P99_TARGET_MS:g}ms", "ok": ok,
        }, Row(f"heartbeat p99 under {slow} slow connections + {flood} rendez-vous", f"{fmt(p99)} ms", "-", "-",
               f"<{P99_TARGET_MS:g} ms, {ROUNDS} rounds", ok))
        for line in cluster.problems()[:5]:
            log(f"  flood: {line}")
    finally:
        with shielded():
            if slow_clients is not None:
                slow_clients.stop()
            if sampler is not None:
                sampler.stop()
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 slow connections and 20,000 rendez-vous")
    args = parser.parse_args(argv)
    install_signal_handlers()
    results = Results(None, args.quick)
    try:
        run(results, 100 if args.quick else SLOW, 20_000 if args.quick else FLOOD)
    except Exception as error:  # noqa: BLE001 - reported
        results.failed("flood", error)
    print(results.table())
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
