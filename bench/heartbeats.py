"""Heartbeat load on the coordinator: 1,000 participants, alone and during a 20 x 100 MB aggregation; 10,000 participants.

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

3. 10,000 known participants (MANY), on fresh daemons (rounds 1, min_clients
   above MANY, so that every participant waits and every heartbeat is
   answered `stand_by` at once, as the 1,000 waiting ones above;
   `api.max_connections` and `api.max_connections_per_address` 12,000,
   `participants.max_known` and `participants.rendez_vous_per_address_per_minute`
   20,000, heartbeat_timeout 300 s so that none expires while the
   generators change):
   - memory: the coordinator's VmRSS (and RssAnon, and the aggregator's
     VmRSS) before any participant, after 1,000 registered and after
     10,000 registered, the rendez-vous made over REGISTER_CONNECTIONS
     shared connections (closed afterwards) so that the figure is the
     participants' own cost, not their connections'; then again once the
     generator holds one keep-alive connection per participant: the
     connections' cost apart (`coordinator_memory`, per participant and per
     connection, in bytes; target <= 10 kB = 10,240 bytes per participant);
   - capacity: the generator takes over the 10,000 registered ids
     (`hbload --ids-in`), one keep-alive connection each, one heartbeat
     outstanding per connection (no multiplexing), and runs the same
     closed loop for CLOSED_S: heartbeats/s served against the 1,000
     cell's capacity above (target: within 20 %, ratio >= 0.8) and against
     the bare twisted.web server with the same 10,000 connections;
   - at their configured period: open loop, each of the 10,000 beats every
     1 s (the SDK's default `heartbeat_period`; with `api.heartbeat_hold: 0`
     none is held), that is 10,000 heartbeats/s offered, for 10 s (the
     first period left out): served/s, p50/p99 (target: all served, p99 <
     100 ms); then the same every 2 s (5,000/s offered), to show where the
     target holds when 1 s is beyond the machine.
   In quick mode the cell keeps its 10,000 participants; its windows are
   shorter (4 s closed, 4 s open instead of 10 s and 10 s).

Latency is send -> complete answer as the generator sees it; `sched_p99_ms`
counts from the scheduled send time (includes a participant's lag when the
previous answer came late). The CPU shares are CPU seconds per wall second
(1.0: one core) of the coordinator and of the generator over each window.

    .venv/bin/python -m bench.heartbeats [--quick] [--cell 1000|10000]

(`--cell 10000` alone has no 1,000 capacity to compare with: its ratio is nan.)
"""

from __future__ import annotations

import argparse
import json
import resource
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
    read_status_kb,
    shielded,
)

PARTICIPANTS = 1000
RATE = 3000.0
UPLOADERS = 20
#: Known participants of the large cell.
MANY = 10_000
#: The periods of the open loops: the SDK's default first, then twice as long.
MANY_PERIODS = (1.0, 2.0)
#: Shared connections the large cell's participants rendez-vous over (the memory figure without theirs).
REGISTER_CONNECTIONS = 8
#: Target: coordinator memory per known participant (bytes).
MEMORY_TARGET_BYTES = 10_240


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


def measure_floor(processes: Processes, directory: Path, rate: float | None, closed_s: float, open_s: float,
                  participants: int = PARTICIPANTS) -> dict[str, Any]:
    """The bare twisted.web server's closed-loop capacity, and (unless `rate` is None) its latency at `rate`."""
    server = LineProcess(processes, "heartbeat floor server", python_module_command("hbfloor_server"))
    try:
        port = int(server.expect("listening", 30)["text"])
        out = directory / "floor.npy"
        load = LineProcess(processes, "heartbeat load (floor)", python_module_command(
            "hbload", "--port", str(port), "--participants", str(participants), "--out", str(out)))
        load.expect("registered", 300)
        load.send(f"closed {closed_s}")
        capacity = load.expect("closed", closed_s + 120)
        if rate is None:
            load.send("quit")
            load.process.wait(30)
            return {"capacity_per_s": capacity["per_s"], "capacity_p99_ms": capacity["p99_ms"]}
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
    """The 1,000-participant cells (capacity, idle, aggregating), then the 10,000-participant cell."""
    try:
        capacity_1000 = run_thousand(results, quick, tmp_parent, model_mb)
    except Exception as error:  # noqa: BLE001 - reported; the 10,000 cell still runs (without a ratio)
        results.failed("heartbeats", error)
        capacity_1000 = {"served_per_s": float("nan"), "coordinator_cpu_share": float("nan")}
    run_many(results, quick, capacity_1000, tmp_parent)


def loadavg_1m() -> float:
    with open("/proc/loadavg", encoding="ascii") as stream:
        return float(stream.read().split()[0])


def cpu_us_per_heartbeat(served_per_s: float, cpu_share: float) -> float:
    """The coordinator's CPU time per heartbeat served (microseconds): what a busy machine changes least."""
    return cpu_share / served_per_s * 1e6 if served_per_s > 0 else float("nan")


def run_thousand(results: Results, quick: bool, tmp_parent: str | None = None, model_mb: float = 100.0) -> dict[str, float]:
    """Floor, capacity and latency with 1,000 participants; the capacity is returned (served_per_s, coordinator_cpu_share)."""
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
            "coordinator_cpu_us_per_heartbeat": cpu_us_per_heartbeat(cap, closed_cpu), "loadavg_1m": loadavg_1m(),
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
        return {"served_per_s": float(cap), "coordinator_cpu_share": float(closed_cpu)}
    finally:
        with shielded():
            if tail is not None:
                tail.stop()
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (kB) of a process, read after a short pause so that what it was doing is done."""
    time.sleep(1.0)
    values = read_status_kb(pid)
    return {"VmRSS": values.get("VmRSS", 0), "RssAnon": values.get("RssAnon", 0)}


def register_only(processes: Processes, port: int, count: int, ids_out: Path) -> dict[str, Any]:
    """`count` participants rendez-vous over REGISTER_CONNECTIONS shared connections; no connection stays open."""
    load = LineProcess(processes, f"registration of {count}", python_module_command(
        "hbload", "--port", str(port), "--participants", str(count), "--register-connections", str(REGISTER_CONNECTIONS),
        "--no-connections", "--ids-out", str(ids_out)))
    registered = load.expect("registered", 300)
    load.send("quit")
    load.process.wait(30)
    return registered


def run_many(results: Results, quick: bool, capacity_1000: dict[str, float], tmp_parent: str | None = None) -> None:
    """10,000 known participants: the coordinator's memory per participant, closed-loop capacity, open loops at their period."""
    closed_s, open_s = (4.0, 4.0) if quick else (10.0, 10.0)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < MANY + 1024:
        # The machine prevents this cell: the daemon and the generator each need a descriptor per connection.
        raise RuntimeError(f"the open-file hard limit ({hard}) is below {MANY} connections and 1,024 more: raise it (ulimit -Hn, LimitNOFILE)")
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-heartbeats-many-", dir=tmp_parent))
    processes = Processes()
    cluster = Cluster(
        directory / "cluster",
        # min_clients above MANY: no round starts, every participant waits and is answered stand_by.
        federated_learning={"rounds": 1, "participants_ratio": 1.0, "min_clients": MANY + 1000,
                            "heartbeat_timeout": 300, "training_timeout": 3600},
        api_extra={"heartbeat_hold": 0, "max_connections": 12_000, "max_connections_per_address": 12_000},
        participants_extra={"max_known": 2 * MANY, "rendez_vous_per_address_per_minute": 2 * MANY},
    )
    try:
        log(f"heartbeats: floor (bare twisted.web), {MANY} participants, closed {closed_s} s")
        floor = measure_floor(Processes(), directory, None, closed_s, 0.0, participants=MANY)
        log(f"heartbeats: floor capacity at {MANY} connections {floor['capacity_per_s']:.0f}/s")

        cluster.start()
        coord_pid, agg_pid = cluster.coordinator.pid, cluster.aggregator.pid
        before, agg_before = rss_kb(coord_pid), rss_kb(agg_pid)
        first = directory / "ids-1000"
        rest = directory / "ids-rest"
        registered = register_only(processes, cluster.coord_http, PARTICIPANTS, first)
        at_1000, agg_1000 = rss_kb(coord_pid), rss_kb(agg_pid)
        registered_rest = register_only(processes, cluster.coord_http, MANY - PARTICIPANTS, rest)
        at_many, agg_many = rss_kb(coord_pid), rss_kb(agg_pid)
        log(f"heartbeats: {MANY} participants registered over {REGISTER_CONNECTIONS} connections "
            f"({registered['seconds'] + registered_rest['seconds']:.1f} s); coordinator VmRSS "
            f"{before['VmRSS']} -> {at_1000['VmRSS']} -> {at_many['VmRSS']} kB")

        out = directory / "many.npy"
        load = LineProcess(processes, f"heartbeat load ({MANY})", python_module_command(
            "hbload", "--port", str(cluster.coord_http), "--ids-in", str(first), "--ids-in", str(rest), "--out", str(out)))
        connected = load.expect("registered", 300)
        with_connections = rss_kb(coord_pid)
        log(f"heartbeats: {MANY} keep-alive connections opened in {connected['seconds']:.1f} s; "
            f"coordinator VmRSS {with_connections['VmRSS']} kB; closed loop {closed_s} s")

        cpu0, t0 = process_cpu_seconds(coord_pid), time.monotonic()
        load.send(f"closed {closed_s}")
        capacity = load.expect("closed", closed_s + 120)
        closed_cpu = (process_cpu_seconds(coord_pid) - cpu0) / (time.monotonic() - t0)

        periods = []
        for period in MANY_PERIODS:  # bounded: two open loops
            rate = MANY / period
            log(f"heartbeats: open loop, each of {MANY} every {period:g} s ({rate:.0f}/s offered), {open_s} s")
            load.send(f"open {rate} {open_s + period + 60}")
            opened = load.expect("opened", 30)["t"]
            cpu1 = process_cpu_seconds(coord_pid)
            time.sleep(open_s + period)
            open_end = time.monotonic()
            open_cpu = (process_cpu_seconds(coord_pid) - cpu1) / (open_end - opened)
            load.send("stop")
            open_summary = load.expect("open", 120)
            records = np.load(out)
            # The first period left out: the participants start phase-shifted over it.
            periods.append((period, rate, window_stats(records, opened + period, open_end), open_end - opened - period,
                            open_cpu, open_summary["generator_cpu_share"], loadavg_1m()))
        load.send("quit")
        after = read_status_kb(coord_pid)

        def per_participant(rss: dict[str, int], count: int, key: str = "VmRSS") -> float:
            return (rss[key] - before[key]) * 1024 / count

        for count, rss, agg in ((PARTICIPANTS, at_1000, agg_1000), (MANY, at_many, agg_many)):
            value = per_participant(rss, count)
            ok = value <= MEMORY_TARGET_BYTES
            results.emit("coordinator_memory", {
                "participants": count, "registered_over_connections": REGISTER_CONNECTIONS,
                "rss_before_kib": before["VmRSS"], "rss_after_kib": rss["VmRSS"], "rss_per_participant_bytes": value,
                "anon_per_participant_bytes": per_participant(rss, count, "RssAnon"),
                "rss_per_1000_mib": value * 1000 / 2**20,
                "aggregator_rss_per_1000_mib": (agg["VmRSS"] - agg_before["VmRSS"]) * 1024 * 1000 / count / 2**20,
                **({"marginal_per_participant_bytes": (at_many["VmRSS"] - at_1000["VmRSS"]) * 1024 / (MANY - PARTICIPANTS)}
                   if count == MANY else {}),
                "target": f"<={MEMORY_TARGET_BYTES}", "ok": ok,
            }, Row(f"coordinator memory per known participant, {count}", f"{value:.0f} B", f"VmRSS {before['VmRSS'] / 1024:.0f} MiB before",
                   "-", "<=10 kB", ok))
        connection_bytes = (with_connections["VmRSS"] - at_many["VmRSS"]) * 1024 / MANY
        results.emit("coordinator_memory", {
            "connections": MANY, "rss_before_kib": at_many["VmRSS"], "rss_after_kib": with_connections["VmRSS"],
            "rss_per_connection_bytes": connection_bytes,
            "anon_per_connection_bytes": (with_connections["RssAnon"] - at_many["RssAnon"]) * 1024 / MANY,
            "rss_end_kib": after.get("VmRSS", 0),
        }, Row(f"coordinator memory per keep-alive connection, {MANY}", f"{connection_bytes:.0f} B", "-", "-", "-", None))

        cap = capacity["per_s"]
        at_1000 = capacity_1000["served_per_s"]
        ratio = cap / at_1000 if at_1000 > 0 else float("nan")
        cap_ok = ratio >= 0.8
        cost, cost_1000 = cpu_us_per_heartbeat(cap, closed_cpu), cpu_us_per_heartbeat(at_1000, capacity_1000["coordinator_cpu_share"])
        results.emit("heartbeat_capacity", {
            "participants": MANY, "connections": MANY, "mode": "closed_loop", "served_per_s": cap,
            "p50_ms": capacity["p50_ms"], "p99_ms": capacity["p99_ms"], "at_1000_per_s": at_1000,
            "ratio_to_1000": ratio, "floor_per_s": floor["capacity_per_s"], "ratio": cap / floor["capacity_per_s"],
            "coordinator_cpu_share": closed_cpu, "generator_cpu_share": capacity["generator_cpu_share"],
            # Per CPU second of the coordinator: the same comparison with what other processes took of the machine left out.
            "coordinator_cpu_us_per_heartbeat": cost, "at_1000_cpu_us_per_heartbeat": cost_1000,
            "cpu_normalised_ratio_to_1000": cost_1000 / cost, "loadavg_1m": loadavg_1m(),
            "errors": capacity["errors"], "target": "within_20%_of_1000", "ok": cap_ok,
        }, Row(f"heartbeat capacity, {MANY} participants", f"{cap:.0f}/s",
               f"{at_1000:.0f}/s at 1000; {floor['capacity_per_s']:.0f}/s bare", f"{fmt(ratio)}", ">=0.8x 1000", cap_ok))
        for period, rate, at_period, window_s, open_cpu, generator_cpu, load_1m in periods:
            period_ok = at_period["per_s"] >= 0.97 * rate and at_period["p99_ms"] < 100 and at_period["errors"] == 0
            results.emit("heartbeats", {
                "phase": "at_period", "participants": MANY, "period_s": period, "offered_per_s": rate,
                "served_per_s": at_period["per_s"], "p50_ms": at_period["p50_ms"], "p99_ms": at_period["p99_ms"],
                "max_ms": at_period["max_ms"], "sched_p99_ms": at_period["sched_p99_ms"], "window_s": window_s,
                "coordinator_cpu_share": open_cpu, "generator_cpu_share": generator_cpu,
                "loadavg_1m": load_1m, "errors": at_period["errors"], "target": "all_served_p99<100ms", "ok": period_ok,
            }, Row(f"heartbeats, {MANY} participants every {period:g} s: served, p50/p99",
                   f"{at_period['per_s']:.0f}/s {fmt(at_period['p50_ms'])}/{fmt(at_period['p99_ms'])} ms",
                   f"{rate:.0f}/s offered", f"{fmt(at_period['per_s'] / rate)}", "all, p99<100ms", period_ok))
        for line in cluster.problems()[:5]:
            log(f"  heartbeats: {line}")
    finally:
        with shielded():
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model-mb", type=float, default=100.0)
    parser.add_argument("--cell", choices=("1000", "10000"), default=None, help="only the 1,000 or the 10,000 cell")
    args = parser.parse_args(argv)
    install_signal_handlers()
    results = Results(None, args.quick)
    try:
        if args.cell == "1000":
            run_thousand(results, args.quick, model_mb=args.model_mb)
        elif args.cell == "10000":
            run_many(results, args.quick, {"served_per_s": float("nan"), "coordinator_cpu_share": float("nan")})
        else:
            run(results, args.quick, model_mb=args.model_mb)
    except Exception as error:  # noqa: BLE001 - reported
        results.failed("heartbeats", error)
    print(results.table())
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
