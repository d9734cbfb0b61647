"""Round time and aggregator memory, per cell of N participants x M MB x transport.

For each cell, fresh daemons (`twistd -n`, loopback, a temporary state
directory) run 1 + ROUNDS rounds with participants_ratio 1 and min_clients N,
driven by `xain-dummy-participants` processes (one per 25 participants, so
50 participants are two load processes): over HTTP with --heartbeat-period
0.2 s (a participant learns of its selection from a heartbeat: the one the
coordinator holds open, by default, or its next one; `selection_to_start_max_s`
shows the worst delay), or over PB (`--transport pb`: the coordinator
pushes selections; heartbeat 1 s, liveness only).

Round time is taken from the coordinator's own log, read as it is written
and stamped with this process's monotonic clock (twistd's timestamps have a
resolution of one second): from "selected N participant(s) for round R" to
"round R aggregated". Round 0 is a warm-up and is not counted: there is no
global model yet, so nothing is downloaded in it; rounds 1..ROUNDS move
2*N*M bytes each (N downloads and N uploads of M). The median of those
rounds is reported, split into the upload phase (selection -> the
coordinator's "round R complete: asking the aggregator to aggregate") and
the aggregation (-> "round R aggregated").

Floor of a cell: 2*N*M bytes at the loopback throughput measured by a raw
socket pair in the same run, plus numpy's time to sum N float32 arrays of M
into float64 (bench.floors). Aggregator memory: its VmHWM at the end of the
cell (the whole life of the process), against 4*M + 200 MB.

Global model (`round_model`): a fast round is worth nothing if its model is
wrong, so after the last round the model the aggregator committed (the file
its aggregator.json names, model_round 1 + ROUNDS) is compared with the
sample-weighted average of what the participants uploaded, computed here in
float64 from the very weights `xain-dummy-participants` sends (rebuilt as it
builds them: `dummy_uploads`); every element must be within 1 float32 ulp.
A wrong model fails the cell. Every participant of that tool uploads the
same array, so this checks the transfer, validation, fold and write of the
bytes end to end, not the weighting (bench.fold checks that with distinct
results).

    .venv/bin/python -m bench.rounds --cell http:10:10 --cell pb:50:1
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BIN,
    MB,
    Cluster,
    LogTail,
    MemorySampler,
    Processes,
    Results,
    Row,
    check_weighted_average,
    committed_model,
    fmt,
    install_signal_handlers,
    kb_to_mb,
    log,
    read_status_kb,
    shielded,
)
from bench.floors import Loopback, loopback, numpy_sum_seconds
from bench.tls import TLSCluster

#: Rounds measured per cell (after the warm-up round 0).
ROUNDS = 3
#: Participants per `xain-dummy-participants` process, at least (small cells)...
PER_LOAD_PROCESS = 25
#: ... and at most this many such processes (many participants: a process per core and a bit, not one per 25).
MAX_LOAD_PROCESSES = 4
HEARTBEAT_PERIOD = {"http": 0.2, "pb": 1.0}
#: From this many participants on, every participant heartbeats at the SDK's default period (1 s): a
#: thousand participants at 0.2 s would be 5,000 heartbeats a second of load while they train.
MANY_PARTICIPANTS = 100

_SELECTED = r"selected (\d+) participant\(s\) for round (\d+)"
_COMPLETE = r"round (\d+) complete: asking the aggregator to aggregate"
_AGGREGATED = r"round (\d+) aggregated"
_TRAINING_DONE = r"training complete after"
_DUMMY_ROUND = r"^round (\d+): (\d+) result\(s\) uploaded, ([\d.]+) MB moved"


@dataclass(frozen=True)
class Cell:
    transport: str
    participants: int
    #: A `--model-size` of xain-dummy-participants: "100kB", "1MB", "10MB", ...
    model_size: str

    @classmethod
    def parse(cls, text: str) -> Cell:
        """`transport:participants:size`, the size in MB ("pb:10:1") or with its unit ("pb:1000:100kB")."""
        from xaind.tools.dummy_participants import MODEL_SIZES

        transport, n, size = text.split(":")
        if transport not in ("http", "pb"):
            raise ValueError(f"transport must be http or pb, not {transport!r}")
        size = size if size in MODEL_SIZES else f"{size}MB"
        if size not in MODEL_SIZES:
            raise ValueError(f"model size must be one of {', '.join(MODEL_SIZES)} (or a number of MB), not {text.split(':')[2]!r}")
        return cls(transport, int(n), size)

    def __str__(self) -> str:
        return f"{self.transport} {self.participants}x{self.model_size}"

    @property
    def model_bytes(self) -> int:
        from xaind.tools.dummy_participants import MODEL_SIZES

        return MODEL_SIZES[self.model_size]

    @property
    def model_mb(self) -> float:
        return self.model_bytes / MB

    @property
    def heartbeat_period(self) -> float:
        return 1.0 if self.participants >= MANY_PARTICIPANTS else HEARTBEAT_PERIOD[self.transport]

    @property
    def bytes_per_round(self) -> int:
        return 2 * self.participants * self.model_bytes

    def target(self) -> str:
        if (self.participants, self.model_size) == (10, "10MB"):
            return "<=3x floor"
        if (self.participants, self.model_size) == (50, "1MB"):
            return "<=floor+1s"
        if (self.transport, self.participants, self.model_size) == ("pb", 1000, "100kB"):
            return "<=1s"
        return ""


MANY_CELLS = [Cell(t, 1000, m) for m in ("100kB", "1MB") for t in ("http", "pb")]
FULL_CELLS = [Cell(t, n, m) for n in (10, 50) for m in ("1MB", "10MB", "100MB") for t in ("http", "pb")] + MANY_CELLS
QUICK_CELLS = [Cell("http", 10, "1MB"), Cell("pb", 10, "1MB"), Cell("http", 10, "10MB"), Cell("pb", 10, "10MB"),
               Cell("http", 50, "1MB"), Cell("pb", 50, "1MB"), Cell("http", 1000, "100kB"), Cell("pb", 1000, "100kB")]


def load_counts(cell: Cell) -> list[int]:
    """Participants per `xain-dummy-participants` process of a cell (PER_LOAD_PROCESS each, the rest in the last)."""
    per_process = max(PER_LOAD_PROCESS, math.ceil(cell.participants / MAX_LOAD_PROCESSES))
    counts = []
    remaining = cell.participants
    for _ in range(math.ceil(cell.participants / per_process)):
        counts.append(min(per_process, remaining))
        remaining -= counts[-1]
    return counts


def dummy_uploads(cell: Cell) -> list[tuple[int, np.ndarray]]:
    """(samples, weights) of every participant of a cell, as `xain-dummy-participants` makes them.

    The tool (xaind/tools/dummy_participants.py, `run` and `DummyParticipant`)
    gives every participant of a process one shared read-only array,
    np.linspace(-1, 1, MODEL_SIZES[size] // 4) in float32, and 1 + index % 7
    samples (index within its process), and uploads the same every round.
    Rebuilt here rather than read back from the aggregator, so that the check
    does not trust what it checks; should the tool change what it sends, the
    check fails and this function must follow it.
    """
    from xaind.tools.dummy_participants import MODEL_SIZES

    weights = np.linspace(-1.0, 1.0, max(1, MODEL_SIZES[cell.model_size] // 4), dtype=np.float32)
    return [(1 + index % 7, weights) for count in load_counts(cell) for index in range(count)]


def check_model(cell: Cell, results: Results, state_dir: Path, tls: bool = False) -> None:
    """Emit `round_model` (the committed model vs the float64 average of the uploads); raise when it is wrong."""
    model_round, path = committed_model(state_dir)
    check = check_weighted_average(path, dummy_uploads(cell))
    ok = bool(check["ok"]) and model_round == 1 + ROUNDS
    results.emit("round_model", {
        "transport": cell.transport,
        "participants": cell.participants,
        "model_mb": cell.model_mb,
        "model_round": model_round,
        "elements": check.get("elements", 0),
        "max_abs_err": check["max_abs_err"],
        "max_ulps": check["max_ulps"],
        "not_bitwise_equal": check["not_bitwise_equal"],
        "target": "<=1ulp",
        "ok": ok,
        "tls": tls,
    }, Row(f"global model {cell}{' tls' if tls else ''} vs float64 average", f"{fmt(check['max_ulps'])} ulp max", "numpy float64", "-", "<=1 ulp", ok))
    if not ok:
        raise RuntimeError(f"the global model {path.name} (model_round {model_round}, expected {1 + ROUNDS}) is not the "
                           f"weighted average of the uploads: {check}")


def cell_timeout(cell: Cell) -> float:
    """Seconds a cell may take at worst (100 MB/s would be a very slow round)."""
    return 90.0 + (1 + ROUNDS) * cell.bytes_per_round / (100 * MB)


def start_profilers(processes: Processes, targets: dict[str, int], directory: Path) -> list[Any]:
    """py-spy (if installed in the venv) recording each target process, as collapsed stacks."""
    spy = Path(BIN) / "py-spy"
    if not spy.exists():
        raise RuntimeError(f"--profile needs py-spy: {BIN}/pip install py-spy")
    directory.mkdir(parents=True, exist_ok=True)
    return [processes.start(f"py-spy {name}", [str(spy), "record", "--pid", str(pid), "--rate", "200", "--threads", "--idle",
                                               "--format", "raw", "--output", str(directory / f"{name}.txt"), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets.items()]


def stop_profilers(profilers: list[Any]) -> None:
    for profiler in profilers:
        if profiler.poll() is None:
            profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    for profiler in profilers:
        try:
            profiler.wait(30)
        except subprocess.TimeoutExpired:
            profiler.kill()


def run_cell(cell: Cell, floor: Loopback, results: Results, tmp_parent: str | None = None,
             profile: Path | None = None, tls: bool = False) -> dict[str, Any]:
    from xaind.tools.daemons import dummy_participants_command

    directory = Path(tempfile.mkdtemp(prefix=f"xaind-bench-{cell.transport}-{cell.participants}x{cell.model_size}-", dir=tmp_parent))
    processes = Processes()
    cluster = (TLSCluster if tls else Cluster)(
        directory,
        federated_learning={
            "rounds": 1 + ROUNDS,
            "participants_ratio": 1.0,
            "min_clients": cell.participants,
            "heartbeat_timeout": 60,
            "training_timeout": 3600,
        },
        aggregator_limits={"max_upload_bytes": cell.model_bytes + MB},
    )
    timeout = cell_timeout(cell)
    tails: list[LogTail] = []
    sampler: MemorySampler | None = None
    profilers: list[Any] = []
    try:
        started = time.monotonic()
        cluster.start()
        coord_tail = LogTail(cluster.coordinator.log_path, timeout)
        agg_tail = LogTail(cluster.aggregator.log_path, timeout)
        tails = [coord_tail, agg_tail]
        for tail in tails:
            tail.start()
        sampler = MemorySampler(cluster.aggregator.pid, timeout, period=0.05,
                                cpu_pids={"aggregator": cluster.aggregator.pid, "coordinator": cluster.coordinator.pid})
        sampler.start()
        idle_kb = read_status_kb(cluster.aggregator.pid).get("VmRSS", 0)
        coordinator_idle_kb = read_status_kb(cluster.coordinator.pid).get("VmRSS", 0)
        if isinstance(cluster, TLSCluster):
            url = cluster.coordinator_url(cell.transport)
            tls_arguments = ["--ca-file", str(cluster.certificates.ca)]
        else:
            url = f"http://127.0.0.1:{cluster.coord_http}" if cell.transport == "http" else f"pb://127.0.0.1:{cluster.coord_pb}"
            tls_arguments = []
        loads = []
        outputs = []
        for index, count in enumerate(load_counts(cell)):
            output = open(directory / f"dummy-{index}.out", "w+", encoding="utf-8")
            outputs.append(output)
            loads.append(processes.start(f"xain-dummy-participants #{index}", [
                *dummy_participants_command(),
                "--number-of-participants", str(count),
                "--heartbeat-period", str(cell.heartbeat_period),
                "--model-size", cell.model_size,
                "--coordinator-url", url,
                "--transport", cell.transport,
                *tls_arguments,
            ], stdout=output, stderr=output))
            sampler.watch_cpu(f"load{index}", loads[-1].pid)
        if profile is not None:
            profilers = start_profilers(processes, {
                "coordinator": cluster.coordinator.pid, "aggregator": cluster.aggregator.pid,
                **{f"load-{i}": p.pid for i, p in enumerate(loads)}}, profile / f"{cell.transport}-{cell.participants}x{cell.model_size}")
        deadline = started + timeout
        for _ in range(int(timeout / 0.05) + 1):  # bounded: every load process ends, or the deadline
            if all(p.poll() is not None for p in loads) or time.monotonic() > deadline:
                break
            if cluster.coordinator.process.poll() is not None or cluster.aggregator.process.poll() is not None:
                break
            time.sleep(0.05)
        hwm_kb = read_status_kb(cluster.aggregator.pid).get("VmHWM", 0)
        # Every participant still known (they are forgotten only heartbeat_timeout after they stop).
        daemons_kb = {
            "coordinator": (coordinator_idle_kb, read_status_kb(cluster.coordinator.pid).get("VmRSS", 0)),
            "aggregator": (idle_kb, read_status_kb(cluster.aggregator.pid).get("VmRSS", 0)),
        }
        codes = [p.poll() for p in loads]
        coord_status = cluster.status() if isinstance(cluster, TLSCluster) else status_of(cluster.coord_http)
        stop_profilers(profilers)
        for tail in tails:
            tail.stop()
        sampler.stop()
        texts = []
        for output in outputs:
            output.seek(0)
            texts.append(output.read())
        if any(code != 0 for code in codes):
            log(f"round cell {cell}: load processes exited with {codes}; the state of things:")
            for line in diagnose(cluster, texts):
                log(f"  {line}")
            detail = " | ".join(t.strip().splitlines()[-1] if t.strip() else "" for t in texts)
            raise RuntimeError(f"load processes exited with {codes} (None: still running at the deadline, "
                               f"{timeout:.0f} s): {detail}; daemon problems: {cluster.problems()[:5]}")
        if not coord_tail.matches(_TRAINING_DONE):
            raise RuntimeError("the coordinator never logged 'training complete'")
        fields = report(cell, floor, results, coord_tail, texts, hwm_kb, sampler, idle_kb, cluster.problems(), coord_status, tls, daemons_kb)
        # After the figures (the check reads the model file, which must not count in them), before the state goes.
        check_model(cell, results, cluster.directory / "aggregator-state", tls)
        return fields
    finally:
        with shielded():
            stop_profilers(profilers)
            for tail in tails:
                tail.stop()
            if sampler is not None:
                sampler.stop()
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


def status_of(port: int) -> dict[str, Any]:
    from bench.common import KeepAlive

    client = KeepAlive(port, timeout=5)
    try:
        return client.get_json("/status")[1]
    except Exception:  # noqa: BLE001 - only informative
        return {}
    finally:
        client.close()


def diagnose(cluster: Cluster, dummy_outputs: list[str]) -> list[str]:
    """What a stuck cell looked like: both daemons' /status and last log lines, the load's output."""
    from bench.common import KeepAlive

    lines = []
    for name, port in (("coordinator", cluster.coord_http), ("aggregator", cluster.agg_http)):
        client = KeepAlive(port, timeout=5)
        try:
            lines.append(f"{name} /status: {client.get_json('/status')[1]}")
        except Exception as error:  # noqa: BLE001 - a diagnosis
            lines.append(f"{name} /status: {type(error).__name__}: {error}")
        finally:
            client.close()
    for daemon in (cluster.coordinator, cluster.aggregator):
        lines += [f"{daemon.name} log: {line}" for line in daemon.log_text.splitlines()[-12:]]
    for index, text in enumerate(dummy_outputs):
        lines += [f"load #{index}: {line}" for line in text.splitlines()[-8:]]
    return lines


def report(cell: Cell, floor: Loopback, results: Results, tail: LogTail, dummy_outputs: list[str],
           hwm_kb: int, sampler: MemorySampler, idle_kb: int, problems: list[str],
           coord_status: dict[str, Any], tls: bool = False,
           daemons_kb: dict[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    import re

    selected: dict[int, float] = {}
    for t, match in tail.matches(_SELECTED):
        selected.setdefault(int(match[2]), t)
    complete = {int(m[1]): t for t, m in tail.matches(_COMPLETE)}
    aggregated = {int(m[1]): t for t, m in tail.matches(_AGGREGATED)}
    moved: dict[int, float] = {}
    for text in dummy_outputs:
        for match in re.finditer(_DUMMY_ROUND, text, re.MULTILINE):
            moved[int(match[1])] = moved.get(int(match[1]), 0.0) + float(match[3]) * MB
    rounds = list(range(1, 1 + ROUNDS))
    missing = [r for r in [0, *rounds] if r not in selected or r not in aggregated]
    if missing:
        raise RuntimeError(f"rounds {missing} lack a selection or aggregation line in the coordinator's log")
    times = [aggregated[r] - selected[r] for r in rounds]
    uploads = [complete[r] - selected[r] for r in rounds if r in complete]
    aggregations = [aggregated[r] - complete[r] for r in rounds if r in complete]
    round_s = statistics.median(times)
    network_s = floor.time_for(cell.bytes_per_round)
    numpy_s = numpy_sum_seconds(cell.participants, cell.model_bytes)
    floor_s = network_s + numpy_s
    ratio = round_s / floor_s
    over = round_s - floor_s
    # The targets are those of plain TCP; over TLS a round is measured against its plain twin instead.
    target = "" if tls else cell.target()
    ok = None
    if target.startswith("<=3x"):
        ok = ratio <= 3.0
    elif target.startswith("<=floor+1s"):
        ok = over <= 1.0
    elif target == "<=1s":
        ok = round_s <= 1.0
    shares = sampler.cpu_shares(selected[1], aggregated[ROUNDS])
    cpu = {f"cpu_{name}": share for name, share in sorted(shares.items())}
    moved_per_round = statistics.median([moved.get(r, float("nan")) for r in rounds])
    fields = {
        "transport": cell.transport,
        "participants": cell.participants,
        "model_mb": cell.model_mb,
        "rounds": ROUNDS,
        "round_s": round_s,
        "round_min_s": min(times),
        "round_max_s": max(times),
        "upload_phase_s": statistics.median(uploads) if uploads else float("nan"),
        "aggregation_s": statistics.median(aggregations) if aggregations else float("nan"),
        "warmup_round0_s": aggregated[0] - selected[0],
        "selection_to_start_p50_s": coord_status.get("selection_to_start_training", {}).get("p50_ms", float("nan")) / 1000,
        "selection_to_start_p99_s": coord_status.get("selection_to_start_training", {}).get("p99_ms", float("nan")) / 1000,
        # Over HTTP a participant learns of its selection at once if a heartbeat of its is held, else at its next one.
        "selection_to_start_max_s": coord_status.get("selection_to_start_training", {}).get("max_ms", float("nan")) / 1000,
        "heartbeat_period_s": cell.heartbeat_period,
        "load_processes": len(load_counts(cell)),
        "bytes_per_round": cell.bytes_per_round,
        "bytes_reported_by_load": moved_per_round,
        "floor_s": floor_s,
        "floor_loopback_s": network_s,
        "floor_numpy_sum_s": numpy_s,
        "loopback_gbps": floor.best_gbps,
        "ratio": ratio,
        "over_floor_s": over,
        **cpu,
        # CPU seconds the coordinator spent per round (its share of a core times the round's length).
        "coordinator_cpu_per_round_s": shares.get("coordinator", float("nan")) * round_s,
        "load_cpu_share": sum(share for name, share in shares.items() if name.startswith("load")),
        **{f"{name}_rss_mb": kb_to_mb(end) for name, (_, end) in (daemons_kb or {}).items()},
        # RSS grown since before any participant came (their connections included), per 1,000 participants.
        **{f"{name}_mb_per_1000_participants": kb_to_mb(end - idle) * 1000 / cell.participants for name, (idle, end) in (daemons_kb or {}).items()},
        "target": target or "none",
        "ok": ok if ok is not None else "n/a",
        # Over TLS every transfer is encrypted and decrypted: the line to compare with its tls=false twin.
        "tls": tls,
    }
    label = f"round {cell}" + (" tls" if tls else "")
    results.emit("round", fields, Row(
        label, f"{fmt(round_s)} s", f"{fmt(floor_s)} s", f"{fmt(ratio)}x" + (f" (+{fmt(over)} s)" if target.startswith("<=floor") else ""),
        target or "-", ok,
    ))
    peak_mb = kb_to_mb(hwm_kb)
    bound_mb = 4 * cell.model_mb + 200
    mem_ok = peak_mb <= bound_mb
    results.emit("aggregator_memory", {
        "transport": cell.transport,
        "participants": cell.participants,
        "model_mb": cell.model_mb,
        "tls": tls,
        "peak_rss_mb": peak_mb,
        "idle_rss_mb": kb_to_mb(idle_kb),
        "sampled_max_rss_mb": kb_to_mb(sampler.max_kb("VmRSS")),
        "bound_mb": bound_mb,
        "ratio": peak_mb / bound_mb,
        "ok": mem_ok,
    }, Row(f"aggregator peak RSS {cell}" + (" tls" if tls else ""), f"{fmt(peak_mb)} MB", f"{bound_mb} MB (bound)", f"{fmt(peak_mb / bound_mb)}", "<=bound", mem_ok))
    for line in problems[:5]:
        log(f"  {cell}: {line}")
    return fields


def run(cells: list[Cell], results: Results, floor: Loopback | None = None, tmp_parent: str | None = None,
        profile: Path | None = None, tls: bool = False) -> None:
    """Every cell; with `tls`, on `ssl:` listeners with verifying clients (bench/tls.py), lines marked tls=true."""
    if floor is None:
        floor = loopback()
    for cell in cells:
        log(f"round cell {cell}{' over TLS' if tls else ''}: {1 + ROUNDS} rounds (round 0 is a warm-up)")
        started = time.monotonic()
        try:
            run_cell(cell, floor, results, tmp_parent, profile, tls)
        except Exception as error:  # noqa: BLE001 - reported, the next cell runs
            results.failed(f"round {cell}{' tls' if tls else ''}", error)
        log(f"round cell {cell} took {time.monotonic() - started:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", action="append", type=Cell.parse, help="transport:N:M, e.g. http:10:10 (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the quick cells (default: all 12)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="record every process of each cell with py-spy (collapsed stacks) into this directory")
    parser.add_argument("--tls", action="store_true",
                        help="every listener on ssl: (a throwaway CA in the temporary directory), clients verifying; "
                        "lines say tls=true")
    args = parser.parse_args(argv)
    install_signal_handlers()
    cells = args.cell or (QUICK_CELLS if args.quick else FULL_CELLS)
    results = Results(None, args.quick)
    run(cells, results, profile=args.profile, tls=args.tls)
    print(results.table())
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
