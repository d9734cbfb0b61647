"""Heartbeats per second with 1, 2 and 4 coordinator processes on Redis, against one process without it.

Each cell starts its coordinator process(es) afresh, loopback only:

- ``none``: one `twistd -n xain-coordinator`, no `state.redis` (today's
  default), listening with ``tcp:``;
- ``redis-N``: a `redis-server` (xaind.testing.redis) and N coordinators with
  the same `state.redis`, sharing their HTTP port with
  ``xaind-tcp:...:reusePort=yes`` (the kernel spreads the connections).

No aggregator is needed: `min_clients` is above the participants, so no
round starts and every heartbeat is a plain `stand_by` (api.heartbeat_hold
0: answered at once). The same load generator as the heartbeats part
(`bench.hbload`, another process) registers P participants, each on a
keep-alive connection of its own, then runs a closed loop for a bounded
time: every participant sends its next heartbeat when the last is answered.
Printed per cell: the rate served, p50/p99 latency, and the CPU share
(CPU seconds / wall second) of each coordinator process, of redis-server
and of the load generator.

The machine has 2 cores: the load generator, the coordinators and Redis
share them, so 4 processes cannot run 4 times as fast here; the cells show
what a process costs and how the work spreads, not a many-core machine's
scaling.

    .venv/bin/python -m bench.redis_heartbeats [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import LineProcess, Processes, Results, Row, fmt, install_signal_handlers, log, process_cpu_seconds, python_module_command
from xaind.protocol import COORDINATOR_HTTP_LISTENER
from xaind.tools import daemons

PARTICIPANTS = 1000
CELLS = ("none", "redis-1", "redis-2", "redis-4")
PREFIX = "bench:"


def redis_missing() -> str | None:
    from xaind.testing.redis import skip_reason

    return skip_reason()


def coordinator_document(directory: Path, listen: str, redis_url: str | None) -> dict[str, Any]:
    document = daemons.coordinator_document(
        state_dir=directory / "state",
        aggregator_port=daemons.free_loopback_port(),
        federated_learning={"rounds": 1, "min_clients": PARTICIPANTS * 10, "heartbeat_timeout": 60, "training_timeout": 3600},
        api_listen=listen,
        heartbeat_hold=0,
    )
    if redis_url is not None:
        document["state"] = {"redis": {"url": redis_url, "prefix": PREFIX}}
    return document


def measure(results: Results, cell: str, closed_s: float, tmp_parent: str | None) -> None:
    directory = Path(tempfile.mkdtemp(prefix=f"xaind-bench-redis-{cell}-", dir=tmp_parent))
    processes = Processes()
    count = 1 if cell == "none" else int(cell.split("-")[1])
    try:
        with contextlib.ExitStack() as stack:
            redis = None
            if cell != "none":
                from xaind.testing.redis import RedisServer

                redis = stack.enter_context(RedisServer())
            port = daemons.free_loopback_port()
            listen = f"tcp:{port}:interface=127.0.0.1" if redis is None else f"xaind-tcp:{port}:interface=127.0.0.1:reusePort=yes"
            coordinators = []
            for index in range(count):
                own = directory / f"coordinator-{index}"
                own.mkdir()
                config = daemons.write_yaml(own / "coordinator.yaml", coordinator_document(own, listen, None if redis is None else redis.url))
                coordinators.append(stack.enter_context(daemons.Daemon("xain-coordinator", config, own, listeners=(COORDINATOR_HTTP_LISTENER,), name=f"coordinator-{index}")))
            if redis is not None:
                daemons.wait_until(lambda: any("leading from the shared state" in daemon.log_text for daemon in coordinators), 30, "a leader")
            load = LineProcess(processes, "heartbeat load", python_module_command(
                "hbload", "--port", str(port), "--participants", str(PARTICIPANTS), "--out", str(directory / "records.npy")))
            registered = load.expect("registered", 120)
            pids = {daemon.name: daemon.pid for daemon in coordinators}
            if redis is not None and redis.process is not None:
                pids["redis-server"] = redis.process.pid
            pids["generator"] = load.process.pid
            before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
            started = time.monotonic()
            load.send(f"closed {closed_s}")
            closed = load.expect("closed", closed_s + 120)
            elapsed = time.monotonic() - started
            shares = {name: (process_cpu_seconds(pid) - before[name]) / elapsed for name, pid in pids.items()}
            load.send("quit")
            fields = {
                "cell": cell,
                "processes": count,
                "participants": PARTICIPANTS,
                "registered_s": registered["seconds"],
                "per_s": closed["per_s"],
                "p50_ms": closed["p50_ms"],
                "p99_ms": closed["p99_ms"],
                "errors": closed["errors"],
                **{f"cpu_{name.replace('-', '_')}": share for name, share in shares.items()},
                "cores": 2,
            }
            results.emit("redis_heartbeats", fields, Row(
                f"heartbeats/s, {cell} ({count} coordinator(s))", f"{closed['per_s']:.0f}/s p99 {fmt(closed['p99_ms'])} ms",
                "-", "-", "-", None))
    finally:
        processes.close()
        shutil.rmtree(directory, ignore_errors=True)


def run(results: Results, quick: bool, tmp_parent: str | None = None) -> None:
    missing = redis_missing()
    if missing is not None:
        log(f"redis: skipped ({missing})")
        results.emit("redis_heartbeats_skipped", {"reason": missing})
        return
    closed_s = 4.0 if quick else 10.0
    for cell in CELLS:
        log(f"redis: {cell}, {PARTICIPANTS} participants, closed loop {closed_s:g} s (2 cores: generator, coordinators and Redis share them)")
        measure(results, cell, closed_s, tmp_parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 s closed loops instead of 10 s")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary directories (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)
    install_signal_handlers()
    results = Results(None, args.quick)
    try:
        run(results, args.quick, args.tmp_dir)
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    except (RuntimeError, TimeoutError, OSError, daemons.DaemonError) as error:
        results.failed("redis", error)
    return results.report()


if __name__ == "__main__":
    raise SystemExit(main())
