"""Fold throughput: the aggregator's own validation and folding code, against numpy's `a += w * b`.

K results of M MB of float32 (the local-result wire format, each with its
own values and sample count) are written to a temporary directory. Then,
with xaind's production classes, in this process:

- validate: `xaind.wire.LocalResultParser.feed()` over each result in
  64 KiB pieces (what twisted.web hands the aggregator per read), as the
  aggregator does while an upload streams in: header checks and the
  finiteness check of every weight;
- fold: `xaind.aggregator.backends.WeightedAverageBackend.add_result()` of
  each result file (page cache warm, as right after its upload), i.e. read
  in fixed chunks, weight by the sample count, add into the float64 sum.

GB/s = K*M / (validate + fold), best of REPEATS passes (7 below 200 MB);
the floor is numpy's own `a += w * b` on the same arrays (a: the float64
sum, b: the float32 weights, w: the sample count), best of as many. Also
reported, not part of the ratio: the spool (64 KiB writes to a file + fsync,
as an upload is made durable before it counts).

Weighting (`fold_model`): after the timed passes, the same backend folds the
K results once more and writes the global model with `aggregate()`; it must
be, within 1 float32 ulp everywhere, the sample-weighted average computed
here in float64 from the result files themselves (each with its own values
and sample count, so a wrong weight or a result folded twice shows). A
wrong model fails the part. The rounds part checks the daemons' committed
model end to end, but its participants all upload the same array.

    .venv/bin/python -m bench.fold [--count 20 --model-mb 100]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import MB, Results, Row, check_weighted_average, fmt, install_signal_handlers, log

PIECE = 64 * 1024
REPEATS = 3


def samples_of(index: int) -> int:
    """Result `index`'s sample count: distinct per result, so that the weighting is exercised."""
    return 100 + index


def write_results(directory: Path, count: int, model_bytes: int) -> tuple[list[Path], int]:
    """K result files; returns them and the offset of the weights in each."""
    elements = model_bytes // 4
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (elements,)})
    base = np.linspace(-1.0, 1.0, elements, dtype=np.float32)
    paths = []
    for index in range(count):
        path = directory / f"result-{index}.result"
        with open(path, "wb") as stream:
            stream.write(samples_of(index).to_bytes(4, "big") + header.getvalue())
            (base * np.float32(1 + index / 16)).tofile(stream)
        paths.append(path)
    return paths, 4 + len(header.getvalue())


def check_aggregate(results: Results, paths: list[Path], offset: int, model_mb: float, directory: Path) -> None:
    """Emit `fold_model`: the backend's aggregate of `paths` vs their float64 weighted average; raise when wrong."""
    from xaind.aggregator.backends import WeightedAverageBackend

    backend = WeightedAverageBackend()
    backend.reset(None)
    for path in paths:
        backend.add_result(str(path))
    model = directory / "model.npy"
    backend.aggregate(str(model))
    del backend
    elements = (paths[0].stat().st_size - offset) // 4
    # The weights as written (mapped, not loaded: K x M may not fit in memory), with their sample counts.
    uploads = [(samples_of(index), np.memmap(path, dtype="<f4", mode="r", offset=offset, shape=(elements,)))
               for index, path in enumerate(paths)]
    check = check_weighted_average(model, uploads)
    del uploads
    ok = bool(check["ok"])
    results.emit("fold_model", {
        "results": len(paths), "model_mb": model_mb, "elements": check.get("elements", 0),
        "max_abs_err": check["max_abs_err"], "max_ulps": check["max_ulps"],
        "not_bitwise_equal": check["not_bitwise_equal"], "target": "<=1ulp", "ok": ok,
    }, Row(f"aggregate of {len(paths)}x{model_mb:g}MB vs float64 average", f"{fmt(check['max_ulps'])} ulp max",
           "numpy float64", "-", "<=1 ulp", ok))
    if not ok:
        raise RuntimeError(f"the backend's aggregate is not the weighted average of the results: {check}")


def validate(data: bytes, max_bytes: int) -> None:
    from xaind.wire import LocalResultParser

    parser = LocalResultParser(max_bytes=max_bytes)
    view = memoryview(data)
    for start in range(0, len(view), PIECE):
        parser.feed(view[start : start + PIECE])
    parser.finish()


def spool_seconds(data: bytes, path: Path) -> float:
    view = memoryview(data)
    started = time.perf_counter()
    with open(path, "wb") as stream:
        for start in range(0, len(view), PIECE):
            stream.write(view[start : start + PIECE])
        stream.flush()
        os.fsync(stream.fileno())
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


def run(results: Results, count: int, model_mb: float, tmp_parent: str | None = None) -> None:
    from xaind.aggregator.backends import WeightedAverageBackend

    model_bytes = int(model_mb * MB)
    directory = Path(tempfile.mkdtemp(prefix="xaind-bench-fold-", dir=tmp_parent))
    try:
        paths, offset = write_results(directory, count, model_bytes)
        total = count * model_bytes
        validate_best = fold_best = numpy_best = float("inf")
        spool = []
        repeats = REPEATS if total >= 200 * MB else 2 * REPEATS + 1  # small sizes are noisier
        for repeat in range(repeats):
            validate_s = 0.0
            for path in paths:
                data = path.read_bytes()
                started = time.perf_counter()
                validate(data, len(data))
                validate_s += time.perf_counter() - started
                if repeat == 0 and len(spool) < 3:
                    spool.append(spool_seconds(data, directory / "spool.partial"))
                del data
            backend = WeightedAverageBackend()
            backend.reset(None)
            started = time.perf_counter()
            for path in paths:
                backend.add_result(str(path))
            fold_s = time.perf_counter() - started
            del backend
            validate_best, fold_best = min(validate_best, validate_s), min(fold_best, fold_s)
        # numpy's own: a += w * b over the same arrays.
        arrays = [np.fromfile(path, dtype="<f4", offset=offset) for path in paths[: min(count, max(1, 2 * 10**9 // model_bytes))]]
        weights = [float(samples_of(i)) for i in range(count)]
        a = np.zeros(model_bytes // 4, dtype=np.float64)
        for _ in range(repeats):
            started = time.perf_counter()
            for i in range(count):
                a += weights[i] * arrays[i % len(arrays)]
            numpy_best = min(numpy_best, time.perf_counter() - started)
        del arrays, a
        fold_gbps = total / (validate_best + fold_best) / 1e9
        numpy_gbps = total / numpy_best / 1e9
        ratio = fold_gbps / numpy_gbps
        ok = ratio >= 0.5
        spool_gbps = model_bytes / float(np.median(spool)) / 1e9 if spool else float("nan")
        results.emit("fold", {
            "results": count, "model_mb": model_mb, "gbps": fold_gbps,
            "validate_gbps": total / validate_best / 1e9, "fold_only_gbps": total / fold_best / 1e9,
            "numpy_gbps": numpy_gbps, "ratio": ratio, "spool_fsync_gbps": spool_gbps,
            "target": ">=0.5x_numpy", "ok": ok,
        }, Row(f"fold (validate+fold) {count}x{model_mb:g}MB", f"{fmt(fold_gbps)} GB/s",
               f"{fmt(numpy_gbps)} GB/s (numpy a+=w*b)", fmt(ratio), ">=0.5", ok))
        check_aggregate(results, paths, offset, model_mb, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--model-mb", type=float, default=100.0)
    args = parser.parse_args(argv)
    install_signal_handlers()
    results = Results(None, False)
    log(f"fold: {args.count} x {args.model_mb:g} MB")
    run(results, args.count, args.model_mb)
    print(results.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
