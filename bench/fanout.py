"""Download fan-out: K participants download an M MB global model from the aggregator at once.

Fresh daemons (rounds 2, min_clients 1): scripted participant 0
(`bench.participants --mode fanout`) is selected alone for round 0 and
uploads M MB, which becomes the global model of round 1; round 1 then
selects all K participants, each has its token admitted, opens its
connection to the aggregator and waits at a barrier; on "go" all K send
their GET together and read the body into a reused buffer.

Aggregate throughput = K*M bytes / (last byte of the last download - first
request sent), against the loopback throughput of a raw socket pair measured
in the same run (bench.floors). The aggregator's VmRSS is sampled every
10 ms during the downloads: it must not hold K copies of the model (bound:
4*M + 200 MB, as for rounds; growth is also given in model copies).

Downloads (`fanout_downloads`): after the timed downloads, the K participants
download the model once more, all at once again, this time with a CRC-32 of
what they receive (kept out of the timed pass, where it would slow the
readers). Each must be byte for byte the model the aggregator committed
(the file its aggregator.json names, model_round 1), and that model must be
participant 0's upload (the weighted average of one result is that result,
within 1 float32 ulp): the served bytes are checked, not only counted. A
mismatch fails the part.

    .venv/bin/python -m bench.fanout [--count 20 --model-mb 100] [--tls]

With `--tls` every listener is on `ssl:` and the participants speak TLS,
verifying the daemons against a throwaway CA (bench/tls.py): over TLS the
aggregator cannot use sendfile, every byte is encrypted on its reactor.
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

from bench.common import (
    HOST,
    MB,
    Cluster,
    LineProcess,
    MemorySampler,
    Processes,
    Results,
    Row,
    check_weighted_average,
    committed_model,
    file_crc32,
    fmt,
    install_signal_handlers,
    kb_to_mb,
    log,
    python_module_command,
    shielded,
)
from bench.floors import Loopback, loopback
from bench.participants import UPLOAD_SAMPLES, upload_body
from bench.tls import TLSCluster


def check_downloads(results: Results, cluster: Cluster, count: int, model_mb: float,
                    verified: list[dict[str, Any]], checked: dict[str, Any]) -> None:
    """Emit `fanout_downloads`: every verifying download vs the committed model file; raise on a mismatch."""
    model_round, path = committed_model(cluster.directory / "aggregator-state")
    size, crc = file_crc32(path)
    matching = sum(1 for e in verified if e.get("bytes") == size and e.get("crc32") == crc)
    # What participant 0 uploaded (bench.participants): the only result of round 0, so the model must be it.
    _, _, weights = upload_body(model_mb, samples=UPLOAD_SAMPLES)
    model = check_weighted_average(path, [(UPLOAD_SAMPLES, weights)])
    del weights
    ok = matching == count and not checked.get("errors") and model_round == 1 and bool(model["ok"])
    results.emit("fanout_downloads", {
        "downloads": count, "model_mb": model_mb, "model_round": model_round, "model_bytes": size,
        "matching": matching, "errors": len(checked.get("errors") or []), "model_max_ulps": model["max_ulps"],
        "target": "all_equal_committed_model", "ok": ok,
    }, Row(f"fan-out downloads {count}x{model_mb:g}MB = committed model", f"{matching}/{count} equal", "-", "-",
           "all equal", ok))
    if not ok:
        raise RuntimeError(f"{count - matching} of {count} downloads differ from {path.name} ({size} bytes, CRC-32 {crc:#010x}; "
                           f"model_round {model_round}, expected 1; model vs upload: {model}; errors: {checked.get('errors')})")


def run(results: Results, count: int, model_mb: float, floor: Loopback | None = None, tmp_parent: str | None = None,
        tls: bool = False) -> None:
    """The fan-out; with `tls`, on `ssl:` listeners with verifying participants (bench/tls.py), lines marked tls=true."""
    if floor is None:
        floor = loopback()
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-fanout-", dir=tmp_parent))
    processes = Processes()
    cluster = (TLSCluster if tls else Cluster)(
        directory,
        federated_learning={"rounds": 2, "participants_ratio": 1.0, "min_clients": 1,
                            "heartbeat_timeout": 60, "training_timeout": 3600},
        aggregator_limits={"max_upload_bytes": int(model_mb * MB) + 2**20},
    )
    if isinstance(cluster, TLSCluster):
        cluster.aggregator_host = HOST  # the scripted participants connect to HOST only
    sampler: MemorySampler | None = None
    try:
        cluster.start()
        arguments = ["--port", str(cluster.coord_http), "--count", str(count), "--model-mb", str(model_mb),
                     "--mode", "fanout", "--heartbeat-period", "0.2", "--max-seconds", "600"]
        if isinstance(cluster, TLSCluster):
            command = python_module_command("tls", "--ca-file", str(cluster.certificates.ca), *arguments)
        else:
            command = python_module_command("participants", *arguments)
        participants = LineProcess(processes, "scripted participants (fanout)", command)
        participants.expect("seeded", 300)
        participants.expect("ready", 300)
        sampler = MemorySampler(cluster.aggregator.pid, 900, period=0.01)
        sampler.start()
        time.sleep(0.2)
        before = time.monotonic()
        log(f"fan-out: go for {count} concurrent downloads of {model_mb:g} MB")
        participants.send("go")
        done = participants.expect("done", 600)
        after = time.monotonic()
        time.sleep(0.05)
        sampler.stop()
        if done.get("errors"):
            raise RuntimeError(f"downloads failed: {done['errors']}")
        events = [json.loads(line) for line in participants.seen if line.startswith("{")]
        downloads = [e for e in events if e.get("event") == "downloaded"]
        if len(downloads) != count:
            raise RuntimeError(f"{len(downloads)} of {count} downloads reported")
        total = sum(int(d["bytes"]) for d in downloads)
        start = min(float(d["start"]) for d in downloads)
        end = max(float(d["end"]) for d in downloads)
        gbps = total / (end - start) / 1e9
        per_download = sorted(float(d["end"]) - float(d["start"]) for d in downloads)
        model_bytes = int(downloads[0]["bytes"])
        ratio = gbps / floor.best_gbps
        # The target is plain TCP's (sendfile); over TLS the fan-out is measured against its plain twin instead.
        target, ok = ("none", None) if tls else (">=0.5x_loopback", ratio >= 0.5)
        rss_before = kb_to_mb(sampler.last_before_kb(before))
        rss_peak = kb_to_mb(sampler.max_kb("VmRSS", before, after))
        bound = 4 * model_bytes / MB + 200
        copies = (rss_peak - rss_before) / (model_bytes / MB)
        mem_ok = rss_peak <= bound
        results.emit("fanout", {
            "downloads": count, "model_mb": model_mb, "model_bytes": model_bytes, "bytes": total, "seconds": end - start,
            "throughput_gbps": gbps, "slowest_download_s": per_download[-1], "fastest_download_s": per_download[0],
            "loopback_gbps": floor.best_gbps, "ratio": ratio, "target": target, "ok": ok if ok is not None else "n/a", "tls": tls,
        }, Row(f"download fan-out {count}x{model_mb:g}MB" + (" tls" if tls else ""), f"{fmt(gbps)} GB/s", f"{fmt(floor.best_gbps)} GB/s (loopback)",
               f"{fmt(ratio)}", "-" if tls else ">=0.5", ok))
        results.emit("fanout_memory", {
            "downloads": count, "model_mb": model_mb, "rss_before_mb": rss_before, "peak_rss_mb": rss_peak,
            "growth_model_copies": copies, "bound_mb": bound, "ratio": rss_peak / bound, "ok": mem_ok,
            "samples": len(sampler.samples), "tls": tls,
        }, Row(f"aggregator RSS during fan-out {count}x{model_mb:g}MB" + (" tls" if tls else ""), f"{fmt(rss_peak)} MB",
               f"{fmt(bound)} MB (bound)", f"{fmt(rss_peak / bound)} (+{fmt(copies)} copies)", "<=bound", mem_ok))
        # The figures are out: now the second, checksummed pass (see the module docstring).
        participants.send("verify")
        checked = participants.expect("checked", 600)
        verified = [e for e in (json.loads(line) for line in participants.seen if line.startswith("{"))
                    if e.get("event") == "verified"]
        participants.send("quit")
        participants.process.wait(10)
        check_downloads(results, cluster, count, model_mb, verified, checked)
        for line in cluster.problems()[:5]:
            log(f"  fan-out: {line}")
    finally:
        with shielded():
            if sampler is not None:
                sampler.stop()
            processes.close()
            cluster.stop()
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--model-mb", type=float, default=100.0)
    parser.add_argument("--tls", action="store_true",
                        help="every listener on ssl: (a throwaway CA in the temporary directory), participants verifying; "
                        "lines say tls=true")
    args = parser.parse_args(argv)
    install_signal_handlers()
    results = Results(None, False)
    try:
        run(results, args.count, args.model_mb, tls=args.tls)
    except Exception as error:  # noqa: BLE001 - reported
        results.failed("fanout", error)
    print(results.table())
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
