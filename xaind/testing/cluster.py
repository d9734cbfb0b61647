"""Several `twistd -n xain-coordinator` processes on one Redis, sharing their ports, and one aggregator.

For the end-to-end tests and the benchmark of `state.redis`
(docs/scale.rst, Coordinator state in Redis). Every coordinator has the
same configuration but a directory (and state_dir) of its own; they listen
with `xaind-tcp:<port>:reusePort=yes` on ports reserved beforehand, so the
kernel spreads participants' connections over them. The leader is the
process whose id the lease key names (its pid is part of the id).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.testing.redis import RedisServer
from xaind.tools import daemons

PREFIX = "xaind-test:"


def shared_listen(port: int) -> str:
    return f"xaind-tcp:{port}:interface=127.0.0.1:reusePort=yes"


@dataclass
class EventLog:
    """The leader's published events, recorded by a thread of the test (a pub/sub subscriber)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def counted_by_round(self) -> dict[int, list[str]]:
        """The results the leader asked the aggregator to aggregate, by round (the last request of each)."""
        counted: dict[int, list[str]] = {}
        with self.lock:
            for event in self.events:
                if event["phase"] == "aggregating" and event.get("counted") is not None:
                    counted[int(event["round"])] = list(event["counted"])
        return counted

    def selected_by_round(self) -> dict[int, list[str]]:
        selected: dict[int, list[str]] = {}
        with self.lock:
            for event in self.events:
                for participant_id, state in event["states"].items():
                    if state == "selected":
                        selected.setdefault(int(event["round"]), []).append(participant_id)
        return selected


@dataclass
class Cluster:
    directory: Path
    stack: contextlib.ExitStack
    redis: RedisServer
    document: dict[str, Any]
    api_port: int
    pb_port: int
    aggregator_port: int
    coordinators: list[daemons.Daemon] = field(default_factory=list)
    aggregator: daemons.Daemon | None = None
    events: EventLog = field(default_factory=EventLog)
    starts: int = 0

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def aggregator_state(self) -> Path:
        return self.directory / "aggregator" / "state"

    def start_coordinator(self) -> daemons.Daemon:
        self.starts += 1
        name = f"coordinator-{self.starts}"
        directory = self.directory / name
        directory.mkdir(parents=True)
        document = {**self.document, "state_dir": str(directory / "state")}
        config = daemons.write_yaml(directory / "coordinator.yaml", document)
        daemon = self.stack.enter_context(
            daemons.Daemon("xain-coordinator", config, directory, listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER), name=name)
        )
        self.coordinators.append(daemon)
        return daemon

    def start_aggregator(self, secret: str) -> daemons.Daemon:
        directory = self.directory / "aggregator"
        directory.mkdir(parents=True, exist_ok=True)
        document = daemons.aggregator_document(
            state_dir=self.aggregator_state, port=self.aggregator_port, coordinator_pb_port=self.pb_port, secret=secret, call_timeout=10.0
        )
        config = daemons.write_yaml(directory / "aggregator.yaml", document)
        self.aggregator = self.stack.enter_context(daemons.Daemon("xain-aggregator", config, directory, listeners=(AGGREGATOR_HTTP_LISTENER,)))
        return self.aggregator

    def leader_process_id(self) -> str | None:
        return self.redis.client().get(f"{PREFIX}leader")

    def leader(self, timeout: float = daemons.START_TIMEOUT) -> daemons.Daemon:
        """The running coordinator that holds the lease (waited for)."""

        def holder() -> daemons.Daemon | None:
            process_id = self.leader_process_id()
            if process_id is None:
                return None
            pid = int(process_id.split(":")[1])
            for daemon in self.coordinators:
                if daemon.running and daemon.pid == pid and "leading from the shared state" in daemon.log_text:
                    return daemon
            return None

        return daemons.wait_until(holder, timeout, "a coordinator to lead")

    def round_state(self) -> dict[str, str]:
        return self.redis.client().hgetall(f"{PREFIX}round")

    def describe(self) -> str:
        parts = [f"--- {daemon.name} ---\n{daemon.log_text}{daemon.output}" for daemon in [*self.coordinators, *([self.aggregator] if self.aggregator else [])]]
        return "\n".join(parts)


@contextlib.contextmanager
def record_events(redis: RedisServer, log: EventLog) -> Iterator[None]:
    """Record every event published on the cluster's channel until the block ends."""
    client = redis.client()
    pubsub = client.pubsub()
    pubsub.subscribe(f"{PREFIX}events")
    # Subscribed once the server confirms it: an event published before would be missed (redis-py may send
    # the command only when the connection is first read).
    deadline = time.monotonic() + daemons.START_TIMEOUT
    while True:
        confirmation = pubsub.get_message(timeout=0.2)
        if confirmation is not None and confirmation.get("type") == "subscribe":
            break
        if time.monotonic() > deadline:
            raise daemons.WaitTimedOut(f"Redis did not confirm the subscription to {PREFIX}events")
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.2)
            if message and message.get("type") == "message":
                with log.lock:
                    log.events.append(json.loads(message["data"]))

    thread = threading.Thread(target=listen, name="xaind-test-events", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        pubsub.close()
        client.close()


@contextlib.contextmanager
def cluster(
    directory: Path,
    redis: RedisServer,
    *,
    secret: str,
    federated_learning: Mapping[str, Any],
    lease_seconds: float = 1.5,
    admit_timeout: float = 5.0,
) -> Iterator[Cluster]:
    """A cluster whose configuration is written, nothing started yet; every process it starts is stopped at exit."""
    api_port, pb_port, aggregator_port = (daemons.free_loopback_port() for _ in range(3))
    document = daemons.coordinator_document(
        state_dir=directory / "unused",
        aggregator_port=aggregator_port,
        federated_learning=federated_learning,
        secret=secret,
        api_listen=shared_listen(api_port),
        pb_listen=shared_listen(pb_port),
        aggregator={"admit_timeout": admit_timeout, "aggregation_timeout": 30.0},
    )
    document["state"] = {"redis": {"url": redis.url, "prefix": PREFIX, "lease_seconds": lease_seconds}}
    with contextlib.ExitStack() as stack:
        built = Cluster(directory, stack, redis, document, api_port, pb_port, aggregator_port)
        stack.callback(lambda: [daemons.release_port(port) for port in (api_port, pb_port, aggregator_port)])
        stack.enter_context(record_events(redis, built.events))
        try:
            yield built
        except BaseException:
            print(built.describe())
            raise
