"""Heartbeat load on the coordinator: 1,000 registered participants, alone and during a 20 x 100 MB aggregation.

Load generator: `bench.hbload`, another process, one keep-alive connection
per participant (1,000), one heartbeat outstanding per connection.

1. Floor: the same generator against `bench.hbfloor_server`, a bare
   twisted.web process answering the same JSON with no work behind it:
   closed-loop capacity, and latency at the offered rate.
2. The coordinator (`twistd -n xain-coordinator`, with its aggregator
   attached; rounds 1, min_clients 20; every heartbeat answered at once,
   `api.heartbeat_hold: 0`): first 20 scripted participants
   (`bench.participants --mode upload`) rendez-vous and are selected, then
   the generator registers its 1,000 participants (they stay waiting: the
   round already has its 20) and measures
   - capacity: closed loop (each connection beats again as soon as it is
     answered) for CLOSED_S seconds: heartbeats/s served, vs the floor's;
   - idle: open loop at RATE heartbeats/s (each participant every
     1000/RATE s) for IDLE_S seconds before the aggregation and IDLE_S/2
     (at least 3 s) after it (pooled, so that the baseline brackets the
     busy window in time): served/s, p50/p99 latency;
   - aggregating: the same open loop continues while the 20 participants
     are told to go: each uploads M MB at once, the aggregator validates,
     spools, folds them and aggregates; the window runs from "go" to the
     coordinator's "round 0 aggregated". p99 there against the idle p99.

Latency is send -> complete answer as the generator sees it; `sched_p99_ms`
counts from the scheduled send time (includes a participant's lag when the
previous answer came late).

    .venv/bin/python -m bench.heartbeats [--quick]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    Cluster,
    LineProcess,
    LogTail,
    Processes,
    Results,
    Row,
    fmt,
    install_signal_handlers,
    log,
    percentile,
    process_cpu_seconds,
    python_module_command,
    shielded,
)

PARTICIPANTS = 1000
RATE = 3000.0
UPLOADERS = 20


def window_stats(records: np.ndarray, start: float, end: float) -> dict[str, float]:
    """Beats *sent* within [start, end): count, rate, latency percentiles (ms)."""
    if records.size == 0:
        return {"answered": 0, "per_s": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"),
                "max_ms": float("nan"), "sched_p99_ms": float("nan"), "errors": 0}
    mask = (records[:, 1] >= start) & (records[:, 1] < end)
    chosen = records[mask]
    latency = (chosen[:, 2] - chosen[:, 1]) * 1000
    from_schedule = (chosen[:, 2] - chosen[:, 0]) * 1000
    return {
        "answered": int(chosen.shape[0]),
        "per_s": chosen.shape[0] / (end - start) if end > start else float("nan"),
        "p50_ms": percentile(latency, 50),
        "p99_ms": percentile(latency, 99),
        "max_ms": float(latency.max()) if latency.size else float("nan"),
        "sched_p99_ms": percentile(from_schedule, 99),
        "errors": int((chosen[:, 3] == 0).sum()),
    }


def measure_floor(processes: Processes, directory: Path, rate: float, closed_s: float, open_s: float) -> dict[str, Any]:
    server = LineProcess(processes, "heartbeat floor server", python_module_command("hbfloor_server"))
    try:
        port = int(server.expect("listening", 30)["text"])
        out = directory / "floor.npy"
        load = LineProcess(processes, "heartbeat load (floor)", python_module_command(
            "hbload", "--port", str(port), "--participants", str(PARTICIPANTS), "--out", str(out)))
        load.expect("registered", 120)
        load.send(f"closed {closed_s}")
        capacity = load.expect("closed", closed_s + 120)
        load.send(f"open {rate} {open_s + 60}")
        opened = load.expect("opened", 30)["t"]
        time.sleep(open_s)
        load.send("stop")
        load.expect("open", 120)
        records = np.load(out)
        stats = window_stats(records, opened + 0.5, opened + open_s)
        load.send("quit")
        load.process.wait(30)
        return {"capacity_per_s": capacity["per_s"], "capacity_p99_ms": capacity["p99_ms"], **stats}
    finally:
        processes.close()


def run(results: Results, quick: bool, tmp_parent: str | None = None, model_mb: float = 100.0) -> None:
    closed_s, idle_s = (4.0, 6.0) if quick else (10.0, 15.0)
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-heartbeats-", dir=tmp_parent))
    processes = Processes()
    cluster = Cluster(
        directory / "cluster",
        federated_learning={"rounds": 1, "participants_ratio": 1.0, "min_clients": UPLOADERS,
                            "heartbeat_timeout": 60, "training_timeout": 3600},
        aggregator_limits={"max_upload_bytes": int(model_mb * 1e6) + 2**20},
        # Every heartbeat answered at once: holding them (api.heartbeat_hold) would only lower the rate.
        api_extra={"heartbeat_hold": 0},
    )
    tail: LogTail | None = None
    try:
        log(f"heartbeats: floor (bare twisted.web), {PARTICIPANTS} participants, closed {closed_s} s, open {RATE:.0f}/s {idle_s} s")
        floor = measure_floor(Processes(), directory, RATE, closed_s, idle_s)
        log(f"heartbeats: floor capacity {floor['capacity_per_s']:.0f}/s; at {RATE:.0f}/s p50 {fmt(floor['p50_ms'])} ms p99 {fmt(floor['p99_ms'])} ms")

        cluster.start()
        tail = LogTail(cluster.coordinator.log_path, 1800)
        tail.start()
        uploaders = LineProcess(processes, "scripted participants (upload)", python_module_command(
            "participants", "--port", str(cluster.coord_http), "--count", str(UPLOADERS), "--model-mb", str(model_mb),
            "--mode", "upload", "--heartbeat-period", "1.0", "--max-seconds", "900"))
        uploaders.expect("ready", 60)
        out = directory / "coordinator.npy"
        load = LineProcess(processes, "heartbeat load", python_module_command(
            "hbload", "--port", str(cluster.coord_http), "--participants", str(PARTICIPANTS), "--out", str(out)))
        registered = load.expect("registered", 120)
        log(f"heartbeats: {PARTICIPANTS} participants registered in {registered['seconds']:.2f} s; closed loop {closed_s} s")
        coord_pid = cluster.coordinator.pid
        cpu0, t0 = process_cpu_seconds(coord_pid), time.monotonic()
        load.send(f"closed {closed_s}")
        capacity = load.expect("closed", closed_s + 120)
        closed_cpu = (process_cpu_seconds(coord_pid) - cpu0) / (time.monotonic() - t0)

        load.send(f"open {RATE} 900")
        opened = load.expect("opened", 30)["t"]
        cpu1 = process_cpu_seconds(coord_pid)
        time.sleep(idle_s)
        idle_end = time.monotonic()
        idle_cpu = (process_cpu_seconds(coord_pid) - cpu1) / (idle_end - opened)
        log(f"heartbeats: go for {UPLOADERS} x {model_mb:g} MB uploads")
        uploaders.send("go")
        go = time.monotonic()
        agg_cpu0, coord_cpu0 = process_cpu_seconds(cluster.aggregator.pid), process_cpu_seconds(coord_pid)
        aggregated_at, _ = tail.wait_for(r"round 0 aggregated", 600, alive=lambda: cluster.coordinator.running)
        agg_end = time.monotonic()
        busy_cpu = (process_cpu_seconds(coord_pid) - coord_cpu0) / (agg_end - go)
        done = uploaders.expect("done", 60)
        if done.get("errors"):
            raise RuntimeError(f"uploads failed: {done['errors']}")
        events = [json.loads(line) for line in uploaders.seen if line.startswith("{")]
        uploaded = [float(e["answered"]) for e in events if e.get("event") == "uploaded"]
        # A second idle window right after, so that the baseline brackets the busy window in time.
        after_s = max(3.0, idle_s / 2)
        time.sleep(max(0.0, aggregated_at + 0.5 + after_s - time.monotonic()))
        after_end = time.monotonic()
        load.send("stop")
        opened_summary = load.expect("open", 120)
        records = np.load(out)
        agg_cpu = (process_cpu_seconds(cluster.aggregator.pid) - agg_cpu0) / (agg_end - go)
        load.send("quit")
        uploaders.send("quit")

        before = window_stats(records, opened + 0.5, idle_end)
        after = window_stats(records, aggregated_at + 0.5, after_end)
        idle_mask = ((records[:, 1] >= opened + 0.5) & (records[:, 1] < idle_end)) | (
            (records[:, 1] >= aggregated_at + 0.5) & (records[:, 1] < after_end))
        idle = window_stats(records[idle_mask], -np.inf, np.inf)
        idle["per_s"] = idle["answered"] / ((idle_end - opened - 0.5) + (after_end - aggregated_at - 0.5))
        busy = window_stats(records, go, aggregated_at)
        folding = window_stats(records, max(uploaded) if uploaded else go, aggregated_at)

        cap = capacity["per_s"]
        cap_ok = cap >= 3000
        results.emit("heartbeat_capacity", {
            "participants": PARTICIPANTS, "mode": "closed_loop", "served_per_s": cap, "p99_ms": capacity["p99_ms"],
            "floor_per_s": floor["capacity_per_s"], "ratio": cap / floor["capacity_per_s"],
            "coordinator_cpu_share": closed_cpu, "generator_cpu_share": capacity["generator_cpu_share"],
            "errors": capacity["errors"], "target": ">=3000/s", "ok": cap_ok,
        }, Row("heartbeat capacity, 1000 participants", f"{cap:.0f}/s", f"{floor['capacity_per_s']:.0f}/s (bare twisted.web)",
               f"{fmt(cap / floor['capacity_per_s'])}", ">=3000/s", cap_ok))
        idle_ok = idle["p99_ms"] < 100 and idle["per_s"] >= 0.97 * RATE
        results.emit("heartbeats", {
            "phase": "idle", "participants": PARTICIPANTS, "offered_per_s": RATE, "served_per_s": idle["per_s"],
            "p50_ms": idle["p50_ms"], "p99_ms": idle["p99_ms"], "max_ms": idle["max_ms"], "sched_p99_ms": idle["sched_p99_ms"],
            "floor_p50_ms": floor["p50_ms"], "floor_p99_ms": floor["p99_ms"], "ratio": idle["p99_ms"] / floor["p99_ms"],
            "before_p99_ms": before["p99_ms"], "after_p99_ms": after["p99_ms"],
            "window_s": (idle_end - opened - 0.5) + (after_end - aggregated_at - 0.5),
            "coordinator_cpu_share": idle_cpu, "errors": idle["errors"],
            "target": "3000/s_p99<100ms", "ok": idle_ok,
        }, Row(f"heartbeats at {RATE:.0f}/s offered, idle: served, p50/p99",
               f"{idle['per_s']:.0f}/s {fmt(idle['p50_ms'])}/{fmt(idle['p99_ms'])} ms",
               f"p99 {fmt(floor['p99_ms'])} ms (bare)", f"{fmt(idle['p99_ms'] / floor['p99_ms'])}x", "p99<100ms", idle_ok))
        busy_ratio = busy["p99_ms"] / idle["p99_ms"]
        busy_ok = busy_ratio <= 2.0 and busy["per_s"] >= 0.97 * RATE
        results.emit("heartbeats", {
            "phase": "aggregating", "participants": PARTICIPANTS, "uploads": UPLOADERS, "model_mb": model_mb,
            "offered_per_s": RATE, "served_per_s": busy["per_s"], "p50_ms": busy["p50_ms"], "p99_ms": busy["p99_ms"],
            "max_ms": busy["max_ms"], "sched_p99_ms": busy["sched_p99_ms"], "idle_p99_ms": idle["p99_ms"], "ratio": busy_ratio,
            "window_s": aggregated_at - go, "fold_window_s": aggregated_at - max(uploaded) if uploaded else float("nan"),
            "fold_window_p99_ms": folding["p99_ms"], "coordinator_cpu_share": busy_cpu, "aggregator_cpu_share": agg_cpu, "errors": busy["errors"],
            "target": "<=2x_idle_p99", "ok": busy_ok,
        }, Row(f"heartbeats during {UPLOADERS}x{model_mb:g}MB upload+fold+aggregation",
               f"{busy['per_s']:.0f}/s {fmt(busy['p50_ms'])}/{fmt(busy['p99_ms'])} ms",
               f"p99 {fmt(idle['p99_ms'])} ms (idle)", f"{fmt(busy_ratio)}x", "<=2x idle p99", busy_ok))
        for line in cluster.problems()[:5]:
            log(f"  heartbeats: {line}")
        if opened_summary.get("errors"):
            log(f"  heartbeats: {opened_summary['errors']} heartbeat(s) failed in the open loop")
    finally:
        with shielded():
            if tail is not None:
                tail.stop()
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model-mb", type=float, default=100.0)
    args = parser.parse_args(argv)
    install_signal_handlers()
    results = Results(None, args.quick)
    try:
        run(results, args.quick, model_mb=args.model_mb)
    except Exception as error:  # noqa: BLE001 - reported
        results.failed("heartbeats", error)
    print(results.table())
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
