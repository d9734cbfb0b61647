"""Aggregation strategies: time and peak memory of each rule, against numpy's in-memory implementation of it.

N results of M MB of float32 (the local-result wire format, written once
with `xaind.testing.wire.encode_local_result`, each with its own values and
sample count; result 0 is a poisoned update, sign-flipped and scaled by 10,
so that the robust rules have an outlier to leave out) and a float32 global
model are written to a temporary directory. Then, for each strategy:

- xaind: in a fresh Python process, the backend the aggregator daemon would
  build: the `aggregation` section parsed by
  `AggregatorDaemonSettings.from_mapping` (the daemon's own parser), then
  `xaind.aggregator.strategies.build_backend(settings.aggregation)`,
  `reset(model)`, `add_results([...])` of all N result files
  (page cache warm, as right after their upload) and `aggregate(out)`,
  then what the daemon does next on the same worker thread, the round's
  report (`AggregationObserver.observe`: every update's norm and distance
  to the new model, a streamed pass over the results, on by default, and
  with DP the epsilon spent). `fold_s` is the wall time of add_results,
  `aggregate_s` that of aggregate, `report_s` that of the report (not in
  `time_ratio`: the numpy reference makes none); `peak_rss_mb` is the
  process's VmHWM at the end (its whole life, the interpreter, the imports
  and the report included; `aggregate_peak_rss_mb` the same before the
  report), `rss_imports_mb` its VmRSS once everything is imported and
  before the round starts, `peak_growth_mb` the difference. Each strategy runs in a process of its own so that the
  peak of one does not hide the next's.
- numpy: in another fresh process, the same rule as a framework that keeps
  every update in memory computes it: the N results loaded into one N x M
  float32 matrix (float32, as received: the dtype Flower's
  `parameters_to_ndarrays` keeps), then `np.average(..., weights=samples)`
  (which multiplies in float64: an N x M float64 temporary), `np.median`,
  a trimmed mean of `np.sort(axis=0)`, Krum's pairwise squared distances
  (float64, pair by pair), the server optimizers' update in float64 (the
  paper's, from m = 0 and v = tau**2), clipping and Gaussian noise for
  DP-FedAvg. The robust rules ignore the sample counts, as xaind's do
  (xaind/aggregator/robust.py says why); DP-FedAvg averages the clipped
  updates with equal weights.
  `numpy_s` is the load of the N results plus the rule (`numpy_load_s` the
  load alone), its memory measured as above; `time_ratio` is
  (fold_s + aggregate_s) / numpy_s.

The machine may be shared: each line also gives the CPU seconds (user +
system, all threads) of the same spans, `cpu_s` for xaind's fold and
aggregation and `numpy_cpu_s` for numpy's load and rule, and their
`cpu_ratio`, which other processes change less than wall time, and the
1-minute load average as the strategy's measurement began (`loadavg_1m`;
this part's own previous processes count in it).

Bound (not a floor): peak RSS <= 4 * M + 200 MB + the strategy's own state
(`STATE_BYTES_PER_ELEMENT`: the momentum of fedavgm, the first and second
moments of fedadam, fedyogi and fedadagrad, in float64), the bound of the
aggregator daemon, which holds the interpreter, twisted and its listeners
too; `ok` says whether the xaind backend's peak is within it. The numpy
reference needs N * M and more; its figure shows what the streaming saves.

Model (`agree`, informational): both processes write their model, which are
compared element by element here: `max_ulps` in float32 ulps of the numpy
model. For the deterministic rules they should agree within a few ulps;
for the server optimizers the reference is a transcription of the paper's
update, so a difference may be a convention (the unit tests are the
verdict); DP adds noise
from a random generator on each side, so `noise_std` (the standard
deviation of the difference, over sqrt(2)) is compared with the configured
noise_multiplier * clip_norm / N instead.

Before the measurements, the numpy fedavg reference runs once unreported:
the first process that fills several GB pays for memory the machine had
not handed out yet (on the virtual machine of the development runs, its
load of the results from the page cache took 7 s instead of 0.5-1.4 s).

A strategy that cannot be built (not implemented yet, or refused) is
reported as a failure of the part, with the backend's message, and the
other strategies still run. The temporary directory is removed in every
case.

    .venv/bin/python -m bench.strategies [--participants 20] [--model-mb 100] [--strategy fedavg --strategy median ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MB, ROOT, Results, Row, fmt, install_signal_handlers, kb_to_mb, log, shielded

#: Every strategy measured, in this order; fedavg_dp is fedavg with differential_privacy enabled.
STRATEGIES = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "median", "trimmed_mean", "krum", "multi_krum",
              "fedavg_dp")
#: Bytes per model element a strategy keeps between rounds beside the model (float64 momentum or moments).
STATE_BYTES_PER_ELEMENT = {"fedavgm": 8, "fedadam": 16, "fedyogi": 16, "fedadagrad": 16}
#: Fixed headroom of the memory bound (the interpreter, numpy, the daemon's own objects), MB.
BOUND_HEADROOM_MB = 200.0
QUICK_CELL = (20, 10.0)
FULL_CELL = (20, 100.0)

#: Each strategy's `aggregation` section of aggregator.yaml (the values documented as defaults, given explicitly
#: so that the numpy reference uses the same).
SECTIONS: dict[str, dict[str, Any]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedavgm": {"strategy": "fedavgm", "server_learning_rate": 1.0, "server_momentum": 0.9},
    "fedadam": {"strategy": "fedadam", "server_learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001},
    "fedyogi": {"strategy": "fedyogi", "server_learning_rate": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001},
    "fedadagrad": {"strategy": "fedadagrad", "server_learning_rate": 0.1, "beta_1": 0.9, "tau": 0.001},
    "median": {"strategy": "median"},
    "trimmed_mean": {"strategy": "trimmed_mean", "trim_fraction": 0.1},
    "krum": {"strategy": "krum", "byzantine": 1},
    "multi_krum": {"strategy": "multi_krum", "byzantine": 1, "krum_selected": 0},
    "fedavg_dp": {"strategy": "fedavg", "differential_privacy": {
        "enabled": True, "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1.0e-5, "sampling_rate": 1.0}},
}
#: A worker process may take this long per GB of results before it is stopped.
WORKER_SECONDS_PER_GB = 120.0
#: Standard deviation of an honest update (result - global model), per element.
UPDATE_STD = 1e-3


def samples_of(index: int) -> int:
    """Result `index`'s sample count: distinct per result, so that the weighting is exercised."""
    return 100 + index


@dataclass(frozen=True)
class Inputs:
    directory: Path
    model: Path
    results: list[Path]
    samples: list[int]
    elements: int
    #: Byte offset of the weights in every result file (4-byte sample count + .npy header).
    offset: int

    @property
    def model_mb(self) -> float:
        return self.elements * 4 / MB


def write_inputs(directory: Path, participants: int, model_bytes: int) -> Inputs:
    """The global model and N result files: honest updates of std UPDATE_STD around it, result 0 poisoned."""
    from xaind.testing.wire import encode_local_result

    elements = max(1, model_bytes // 4)
    rng = np.random.default_rng(20261129)
    model = rng.standard_normal(elements, dtype=np.float32)
    model_path = directory / "model-0.npy"
    np.save(model_path, model, allow_pickle=False)
    paths = []
    offset = 0
    for index in range(participants):
        update = rng.standard_normal(elements, dtype=np.float32)
        update *= np.float32(UPDATE_STD)
        if index == 0:
            update *= np.float32(-10.0)  # the poisoned one: sign-flipped and scaled by 10
        update += model
        data = encode_local_result(samples_of(index), update)
        del update
        offset = len(data) - elements * 4
        path = directory / f"result-{index}.result"
        with open(path, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())  # as the daemon spools an upload; no write-back left for the first timing
        del data
        paths.append(path)
    return Inputs(directory, model_path, paths, [samples_of(i) for i in range(participants)], elements, offset)


def state_mb(strategy: str, elements: int) -> float:
    return STATE_BYTES_PER_ELEMENT.get(strategy, 0) * elements / MB


def bound_mb(strategy: str, elements: int) -> float:
    return 4 * elements * 4 / MB + BOUND_HEADROOM_MB + state_mb(strategy, elements)


# ---------------------------------------------------------------------------
# The worker processes (python -m bench.strategies --worker xaind|numpy ...)


def _status_kb(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as stream:
        for line in stream:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def xaind_worker(strategy: str, inputs: Inputs, output: Path, state_dir: Path) -> dict[str, Any]:
    """The daemon's backend for `strategy`, one round, then its report: timings and memory of this process."""
    from xaind.aggregator.round_report import AggregationObserver
    from xaind.aggregator.settings import AggregatorDaemonSettings
    from xaind.aggregator.store import GlobalModel
    from xaind.aggregator.strategies import build_backend, last_choices

    settings = AggregatorDaemonSettings.from_mapping({
        "development": True, "state_dir": str(state_dir), "aggregation": SECTIONS[strategy]})
    aggregation = settings.aggregation
    state_dir.mkdir(parents=True, exist_ok=True)
    backend = build_backend(aggregation)
    observer = AggregationObserver(aggregation.strategy, aggregation.update_norms, aggregation.privacy)
    rss_imports_kb = _status_kb("VmRSS")
    started = time.perf_counter()
    backend.reset(str(inputs.model))
    reset_s = time.perf_counter() - started
    cpu_started = time.process_time()
    started = time.perf_counter()
    refusals = backend.add_results([(str(path), None) for path in inputs.results])
    fold_s = time.perf_counter() - started
    refused = [str(r) for r in refusals if r is not None]
    if refused:
        raise RuntimeError(f"{len(refused)} result(s) refused, e.g. {refused[0]}")
    started = time.perf_counter()
    backend.aggregate(str(output))
    aggregate_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    aggregate_peak_kb = _status_kb("VmHWM")
    # What the daemon does next on a disk thread, once the model is committed: each update's norm and
    # distance to the new model (aggregation.update_norms, on by default), and with DP the epsilon spent.
    started = time.perf_counter()
    observer.observe(last_choices(backend), 1, {f"participant-{i}": str(path) for i, path in enumerate(inputs.results)},
                     str(inputs.model), GlobalModel(1, str(output), output.stat().st_size, "bench"))
    report_s = time.perf_counter() - started
    return {"backend": type(backend).__name__, "reset_s": reset_s, "fold_s": fold_s, "aggregate_s": aggregate_s, "cpu_s": cpu_s,
            "report_s": report_s, "rss_imports_kb": rss_imports_kb, "aggregate_peak_kb": aggregate_peak_kb,
            "peak_kb": _status_kb("VmHWM")}


def _load_matrix(inputs: Inputs) -> np.ndarray:
    """All N results in one N x M float32 matrix, as a framework holding every update has them."""
    matrix = np.empty((len(inputs.results), inputs.elements), dtype=np.float32)
    for row, path in enumerate(inputs.results):
        with open(path, "rb") as stream:
            stream.seek(inputs.offset)
            if stream.readinto(memoryview(matrix[row]).cast("B")) != inputs.elements * 4:
                raise ValueError(f"{path} is shorter than its header says")
    return matrix


def _krum_scores(matrix: np.ndarray, byzantine: int) -> np.ndarray:
    """Krum's score of each result: the sum of its n - f - 2 smallest squared distances to the others."""
    n = matrix.shape[0]
    distances = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            difference = np.subtract(matrix[i], matrix[j], dtype=np.float64)
            distances[i, j] = distances[j, i] = float(np.dot(difference, difference))
    closest = max(0, n - byzantine - 2)
    return np.array([np.sort(np.delete(distances[i], i))[:closest].sum() for i in range(n)])


def _optimizer_step(strategy: str, section: dict[str, Any], model: np.ndarray, average: np.ndarray) -> np.ndarray:
    """Reddi et al.'s server update of the pseudo-gradient (average - model), the first step from m = 0, v = tau**2."""
    delta = average - model
    rate = float(section["server_learning_rate"])
    if strategy == "fedavgm":
        momentum = delta  # mu * 0 + delta
        return model + rate * momentum
    beta_1, tau = float(section["beta_1"]), float(section["tau"])
    first = (1.0 - beta_1) * delta  # beta_1 * 0 + ...
    squared = delta * delta
    start = tau * tau  # the paper's v_{-1} >= tau**2
    if strategy == "fedadam":
        second = float(section["beta_2"]) * start + (1.0 - float(section["beta_2"])) * squared
    elif strategy == "fedyogi":
        second = start - (1.0 - float(section["beta_2"])) * squared * np.sign(start - squared)
    else:  # fedadagrad
        second = start + squared
    return model + rate * first / (np.sqrt(second) + tau)


def numpy_rule(strategy: str, matrix: np.ndarray, samples: np.ndarray, model: np.ndarray) -> np.ndarray:
    """The rule of `strategy` as numpy computes it with every result in memory (float64 where numpy promotes)."""
    section = SECTIONS[strategy]
    n = matrix.shape[0]
    if strategy == "fedavg":
        return np.average(matrix, axis=0, weights=samples)
    if strategy in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        return _optimizer_step(strategy, section, model.astype(np.float64), np.average(matrix, axis=0, weights=samples))
    if strategy == "median":
        return np.median(matrix, axis=0)
    if strategy == "trimmed_mean":
        trimmed = int(math.floor(float(section["trim_fraction"]) * n))
        ordered = np.sort(matrix, axis=0)
        return ordered[trimmed:n - trimmed].mean(axis=0, dtype=np.float64)
    if strategy in ("krum", "multi_krum"):
        byzantine = int(section["byzantine"])
        scores = _krum_scores(matrix, byzantine)
        if strategy == "krum":
            return matrix[int(np.argmin(scores))]
        selected = int(section.get("krum_selected", 0)) or n - byzantine
        chosen = np.argsort(scores, kind="stable")[:selected]
        return matrix[chosen].mean(axis=0, dtype=np.float64)  # equal weights, as xaind's robust rules
    if strategy == "fedavg_dp":
        privacy = section["differential_privacy"]
        clip, noise = float(privacy["clip_norm"]), float(privacy["noise_multiplier"])
        matrix -= model  # the updates, in place (float32, as a framework clipping them would)
        norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix, dtype=np.float64))
        matrix *= np.minimum(1.0, clip / np.maximum(norms, 1e-300)).astype(np.float32)[:, None]
        average = matrix.mean(axis=0, dtype=np.float64)
        average += np.random.default_rng().normal(0.0, noise * clip / n, size=average.shape)
        return model + average
    raise ValueError(f"no numpy reference for {strategy!r}")


def numpy_worker(strategy: str, inputs: Inputs, output: Path) -> dict[str, Any]:
    """numpy's in-memory implementation of `strategy`: timings and memory of this process."""
    rss_imports_kb = _status_kb("VmRSS")
    cpu_started = time.process_time()
    started = time.perf_counter()
    model = np.load(inputs.model)
    matrix = _load_matrix(inputs)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    values = numpy_rule(strategy, matrix, np.array(inputs.samples, dtype=np.float64), model)
    rule_s = time.perf_counter() - started
    cpu_s = time.process_time() - cpu_started
    peak_kb = _status_kb("VmHWM")
    del matrix
    np.save(output, np.asarray(values).astype(model.dtype, copy=False), allow_pickle=False)
    return {"load_s": load_s, "rule_s": rule_s, "cpu_s": cpu_s, "rss_imports_kb": rss_imports_kb, "peak_kb": peak_kb}


def _worker_main(args: argparse.Namespace) -> int:
    spec = json.loads(Path(args.inputs).read_text(encoding="utf-8"))
    inputs = Inputs(Path(spec["directory"]), Path(spec["model"]), [Path(p) for p in spec["results"]], spec["samples"],
                    spec["elements"], spec["offset"])
    if args.worker == "xaind":
        report = xaind_worker(args.strategy[0], inputs, Path(args.output), Path(args.state_dir))
    else:
        report = numpy_worker(args.strategy[0], inputs, Path(args.output))
    Path(args.report).write_text(json.dumps(report), encoding="utf-8")
    return 0


# ---------------------------------------------------------------------------
# The parent


class WorkerFailed(RuntimeError):
    """A worker process exited with an error (its last line of stderr says why)."""


def run_worker(kind: str, strategy: str, inputs_file: Path, directory: Path, timeout: float) -> tuple[dict[str, Any], Path]:
    """One worker process; its report and the model it wrote."""
    state_dir = directory / f"state-{strategy}"
    # The optimizers write their state beside the new model: the xaind model goes in the strategy's own directory.
    output = state_dir / "model-1.npy" if kind == "xaind" else directory / f"{kind}-{strategy}.npy"
    report = directory / f"{kind}-{strategy}.json"
    command = [sys.executable, "-m", "bench.strategies", "--worker", kind, "--strategy", strategy,
               "--inputs", str(inputs_file), "--output", str(output), "--report", str(report),
               "--state-dir", str(state_dir)]
    # subprocess.run kills the worker on a timeout or an interruption.
    completed = subprocess.run(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=timeout, check=False)
    if completed.returncode != 0 or not report.exists():
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        raise WorkerFailed(f"{kind} {strategy}: exit code {completed.returncode}: {lines[-1] if lines else '(no output)'}")
    return json.loads(report.read_text(encoding="utf-8")), output


def compare(strategy: str, xaind_model: Path, numpy_model: Path, participants: int) -> dict[str, Any]:
    """How far xaind's model is from numpy's, in float32 ulps of numpy's (or, for DP, the noise's std)."""
    ours = np.load(xaind_model, mmap_mode="r")
    theirs = np.load(numpy_model, mmap_mode="r")
    if ours.shape != theirs.shape:
        return {"agree": False, "max_ulps": float("nan"), "detail": f"shapes {ours.shape} vs {theirs.shape}"}
    ours, theirs = ours.reshape(-1), theirs.reshape(-1)
    step = 1 << 22
    max_ulps = 0.0
    squares = 0.0
    for start in range(0, ours.size, step):
        a = np.asarray(ours[start:start + step], dtype=np.float64)
        b = np.asarray(theirs[start:start + step], dtype=np.float64)
        difference = np.abs(a - b)
        squares += float(np.dot(difference, difference))
        max_ulps = max(max_ulps, float(np.max(difference / np.spacing(np.abs(b).astype(np.float32)))))
    if strategy == "fedavg_dp":
        privacy = SECTIONS[strategy]["differential_privacy"]
        expected = float(privacy["noise_multiplier"]) * float(privacy["clip_norm"]) / participants
        # Two independent noises: the difference has sqrt(2) times the std of either.
        noise_std = math.sqrt(squares / ours.size) / math.sqrt(2)
        return {"agree": abs(noise_std / expected - 1) < 0.05, "noise_std": noise_std, "noise_std_expected": expected}
    return {"agree": max_ulps <= 4, "max_ulps": max_ulps}


def measure(results: Results, strategy: str, inputs: Inputs, inputs_file: Path, participants: int) -> None:
    loadavg = os.getloadavg()[0]
    timeout = 60.0 + WORKER_SECONDS_PER_GB * participants * inputs.elements * 4 / 1e9
    xaind_report, xaind_model = run_worker("xaind", strategy, inputs_file, inputs.directory, timeout)
    numpy_report, numpy_model = run_worker("numpy", strategy, inputs_file, inputs.directory, timeout)
    try:
        agreement = compare(strategy, xaind_model, numpy_model, participants)
    finally:
        for path in (xaind_model, numpy_model):
            path.unlink(missing_ok=True)
        shutil.rmtree(inputs.directory / f"state-{strategy}", ignore_errors=True)
    peak = kb_to_mb(xaind_report["peak_kb"])
    imports = kb_to_mb(xaind_report["rss_imports_kb"])
    bound = bound_mb(strategy, inputs.elements)
    xaind_s = xaind_report["fold_s"] + xaind_report["aggregate_s"]
    numpy_s = numpy_report["load_s"] + numpy_report["rule_s"]
    ok = peak <= bound
    fields: dict[str, Any] = {
        "name": strategy, "participants": participants, "model_mb": inputs.model_mb,
        "fold_s": xaind_report["fold_s"], "aggregate_s": xaind_report["aggregate_s"], "report_s": xaind_report["report_s"],
        "peak_rss_mb": peak, "aggregate_peak_rss_mb": kb_to_mb(xaind_report["aggregate_peak_kb"]),
        "rss_imports_mb": imports, "peak_growth_mb": peak - imports,
        "bound_mb": bound, "state_mb": state_mb(strategy, inputs.elements),
        "numpy_s": numpy_s, "numpy_load_s": numpy_report["load_s"],
        "numpy_peak_rss_mb": kb_to_mb(numpy_report["peak_kb"]),
        "numpy_peak_growth_mb": kb_to_mb(numpy_report["peak_kb"] - numpy_report["rss_imports_kb"]),
        "time_ratio": xaind_s / numpy_s, "cpu_s": xaind_report["cpu_s"], "numpy_cpu_s": numpy_report["cpu_s"],
        "cpu_ratio": xaind_report["cpu_s"] / numpy_report["cpu_s"], "loadavg_1m": loadavg, "backend": xaind_report["backend"],
        **agreement, "ok": ok,
    }
    results.emit("strategy", fields, Row(
        f"strategy {strategy} {participants}x{inputs.model_mb:g}MB peak RSS / time",
        f"{fmt(peak, 4)} MB / {fmt(xaind_s)} s",
        f"numpy {fmt(kb_to_mb(numpy_report['peak_kb']), 4)} MB / {fmt(numpy_s)} s",
        f"{fmt(xaind_s / numpy_s)} (time)", f"<={bound:.0f} MB", ok))
    if not agreement["agree"]:
        log(f"strategy {strategy}: xaind's model differs from the numpy reference ({agreement}); see the docstring")


def run(results: Results, participants: int, model_mb: float, strategies: list[str] | None = None,
        tmp_parent: str | None = None) -> None:
    """Every strategy of `strategies` (all by default) at participants x model_mb; one failing does not stop the rest."""
    chosen = list(strategies or STRATEGIES)
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-strategies-", dir=tmp_parent))
    try:
        log(f"strategies: writing {participants} x {model_mb:g} MB results")
        inputs = write_inputs(directory, participants, int(model_mb * MB))
        inputs_file = directory / "inputs.json"
        inputs_file.write_text(json.dumps({
            "directory": str(inputs.directory), "model": str(inputs.model), "results": [str(p) for p in inputs.results],
            "samples": inputs.samples, "elements": inputs.elements, "offset": inputs.offset}), encoding="utf-8")
        # Not reported: the first process to fill several GB paid for memory the machine had not handed out yet
        # (a numpy load of 2 GB from the page cache took 7 s first, 0.5-1.4 s afterwards, in development runs).
        log("strategies: warm-up (numpy fedavg, not reported)")
        try:
            run_worker("numpy", "fedavg", inputs_file, directory, 60.0 + WORKER_SECONDS_PER_GB * participants * model_mb / 1e3)
        finally:
            (directory / "numpy-fedavg.npy").unlink(missing_ok=True)
        for strategy in chosen:
            log(f"strategies: {strategy}")
            try:
                measure(results, strategy, inputs, inputs_file, participants)
            except (WorkerFailed, subprocess.TimeoutExpired, OSError, ValueError) as error:
                results.failed(f"strategies {strategy}", error)
    finally:
        with shielded():  # 2 GB of results: a Ctrl-C must not cut their removal short
            shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--participants", type=int, default=None, help=f"N (default {FULL_CELL[0]}; quick {QUICK_CELL[0]})")
    parser.add_argument("--model-mb", type=float, default=None, help=f"M (default {FULL_CELL[1]:g}; quick {QUICK_CELL[1]:g})")
    parser.add_argument("--strategy", action="append", choices=STRATEGIES, help="one strategy (repeat for more; default all)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_CELL[0]} x {QUICK_CELL[1]:g} MB")
    parser.add_argument("--tmp-dir", default=None, help="parent of the temporary directory (default: $TMPDIR or /tmp)")
    # The worker processes this module starts for itself.
    parser.add_argument("--worker", choices=("xaind", "numpy"), help=argparse.SUPPRESS)
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return _worker_main(args)
    install_signal_handlers()
    default_n, default_mb = QUICK_CELL if args.quick else FULL_CELL
    participants = args.participants or default_n
    model_mb = args.model_mb or default_mb
    results = Results(None, args.quick)
    log(f"strategies: {participants} x {model_mb:g} MB")
    try:
        run(results, participants, model_mb, args.strategy, args.tmp_dir)
    except KeyboardInterrupt:
        log("interrupted: the worker process was stopped and the temporary directory removed")
        return 130
    return results.report()


if __name__ == "__main__":
    sys.exit(main())
