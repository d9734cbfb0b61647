"""Aggregation backends, checked against plain numpy and the seed's aggregator."""

from __future__ import annotations

import io
import math
import tempfile
import textwrap
import threading
import tracemalloc
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xaind.aggregator import backends
from xaind.aggregator.backends import (
    AggregationBackend,
    BackendError,
    PythonAggregatorBackend,
    WeightedAverageBackend,
    load_backend,
)
from xaind.testing.fakes import FakeSeedAggregator

# -- helpers


def write_result(path: Path | str, samples: int, array: np.ndarray) -> str:
    with open(path, "wb") as f:
        f.write(samples.to_bytes(4, "big"))
        np.save(f, array, allow_pickle=False)
    return str(path)


def write_model(path: Path | str, array: np.ndarray) -> str:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    return str(path)


def reference(arrays: list[np.ndarray], counts: list[int], dtype: np.dtype) -> np.ndarray:
    """sum(n_i x_i) / sum(n_i) in float64 (the plain mean when every n_i is 0), cast to dtype."""
    weights = counts if sum(counts) > 0 else [1] * len(counts)
    total = np.zeros(np.shape(arrays[0]), dtype=np.float64)
    for weight, array in zip(weights, arrays):
        total = total + weight * np.asarray(array, dtype=np.float64)
    return (total / sum(weights)).astype(dtype)


def tolerance(dtype: np.dtype) -> dict[str, float]:
    eps = float(np.finfo(dtype).eps)
    return {"rtol": 4 * eps, "atol": 4 * eps}


def fold(backend: AggregationBackend, directory: Path, arrays, counts, fortran=None, global_model=None):
    """Reset, fold every result, aggregate; return the loaded output."""
    backend.reset(global_model)
    for i, (array, samples) in enumerate(zip(arrays, counts)):
        if fortran is not None and fortran[i] and np.ndim(array) >= 2:  # asfortranarray makes a scalar 1-d
            array = np.asfortranarray(array)
        backend.add_result(write_result(directory / f"result-{i}.bin", samples, array))
    assert backend.results == len(arrays)
    destination = directory / "global.npy"
    backend.aggregate(str(destination))
    return np.load(destination, allow_pickle=False)


def random_arrays(rng: np.random.Generator, shape, dtype, count: int) -> list[np.ndarray]:
    return [(rng.uniform(-10, 10, size=shape)).astype(dtype) for _ in range(count)]


def check_against_reference(out: np.ndarray, arrays, counts, dtype) -> None:
    dtype = np.dtype(dtype)
    expected = reference(arrays, counts, dtype)
    assert out.dtype == dtype
    assert out.shape == np.shape(arrays[0])
    np.testing.assert_allclose(out, expected, **tolerance(dtype))


# -- the weighted average against numpy

SHAPES = [(), (1,), (7,), (3, 4, 5), (2, 3), (1, 5), (4, 1, 3), (2, 3, 2, 2)]
COUNT_PATTERNS = {
    "positive": lambda rng, k: [int(n) for n in rng.integers(1, 1000, size=k)],
    "some-zero": lambda rng, k: [0] + [int(n) * (i % 3 != 1) for i, n in enumerate(rng.integers(1, 1000, size=k - 1))],
    "all-zero": lambda rng, k: [0] * k,
    "huge": lambda rng, k: [2**32 - 1 - i for i in range(k)],
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", ["<f4", "<f8", ">f8"])
@pytest.mark.parametrize("pattern", list(COUNT_PATTERNS))
@pytest.mark.parametrize("order", ["C", "F", "mixed"])
def test_weighted_average_matches_numpy(tmp_path, shape, dtype, pattern, order):
    rng = np.random.default_rng(abs(hash((shape, dtype, pattern, order))) % 2**32)
    k = int(rng.integers(2, 13))
    arrays = random_arrays(rng, shape, dtype, k)
    counts = COUNT_PATTERNS[pattern](rng, k)
    fortran = {"C": [False] * k, "F": [True] * k, "mixed": [i % 2 == 1 for i in range(k)]}[order]
    out = fold(WeightedAverageBackend(), tmp_path, arrays, counts, fortran)
    check_against_reference(out, arrays, counts, dtype)


@pytest.mark.parametrize("chunk_bytes", [8, 24, 56, 1024])
@pytest.mark.parametrize("first_fortran", [False, True])
def test_chunk_boundaries_and_memory_orders(tmp_path, chunk_bytes, first_fortran):
    """Chunks that split rows of the transposed view anywhere still fold element-wise."""
    rng = np.random.default_rng(chunk_bytes)
    arrays = random_arrays(rng, (3, 5, 7), np.float32, 6)
    counts = [0, 5, 0, 1, 9, 2]
    fortran = [first_fortran, not first_fortran, True, False, first_fortran, not first_fortran]
    result = tmp_path / "probe.bin"
    write_result(result, 1, np.asfortranarray(arrays[0]))
    with open(result, "rb") as f:
        f.read(4)
        np.lib.format.read_magic(f)
        assert np.lib.format.read_array_header_1_0(f)[1] is True  # really fortran_order
    out = fold(WeightedAverageBackend(chunk_bytes=chunk_bytes), tmp_path, arrays, counts, fortran)
    check_against_reference(out, arrays, counts, np.float32)
    assert np.isfortran(out) == first_fortran  # the first result's memory order


@pytest.mark.parametrize("shape", [(), (5,), (1, 4)], ids=str)
def test_fortran_flag_on_arrays_without_two_axes(tmp_path, shape):
    """A header may say fortran_order for a scalar or a 1-d array (np.save never does): same data."""
    arrays = [np.arange(math.prod(shape), dtype="<f8").reshape(shape) + i for i in range(3)]
    backend = WeightedAverageBackend()
    for i, (array, fortran) in enumerate(zip(arrays, [False, True, True])):
        path = tmp_path / f"r{i}.bin"
        with open(path, "wb") as f:
            f.write((i + 1).to_bytes(4, "big"))
            np.lib.format.write_array_header_1_0(
                f, {"descr": "<f8", "fortran_order": fortran, "shape": shape}
            )
            f.write(array.tobytes(order="F" if fortran else "C"))
        backend.add_result(str(path))
    backend.aggregate(str(tmp_path / "out.npy"))
    check_against_reference(np.load(tmp_path / "out.npy"), arrays, [1, 2, 3], np.float64)


def test_one_result_is_returned_unchanged(tmp_path):
    array = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    for samples in (0, 1, 17):
        out = fold(WeightedAverageBackend(), tmp_path, [array], [samples])
        np.testing.assert_array_equal(out, array)


def test_float16_and_mixed_byte_order(tmp_path):
    rng = np.random.default_rng(2)
    arrays = random_arrays(rng, (5, 2), np.float16, 3)
    out = fold(WeightedAverageBackend(), tmp_path, arrays, [1, 2, 3])
    check_against_reference(out, arrays, [1, 2, 3], np.float16)

    big = random_arrays(rng, (6,), ">f4", 3)
    mixed = [big[0], big[1].astype("<f4"), big[2]]
    out = fold(WeightedAverageBackend(), tmp_path, mixed, [3, 1, 4])
    assert out.dtype == np.dtype(">f4")  # the first result's dtype, byte order included
    np.testing.assert_allclose(out, reference(big, [3, 1, 4], np.float32), **tolerance(np.float32))


def test_empty_model(tmp_path):
    arrays = [np.zeros((0, 3), dtype=np.float32)] * 2
    out = fold(WeightedAverageBackend(), tmp_path, arrays, [1, 2])
    assert out.shape == (0, 3) and out.dtype == np.float32


def test_scalar_all_zero_samples_is_plain_mean(tmp_path):
    arrays = [np.array(1.0), np.array(2.0), np.array(6.0)]
    out = fold(WeightedAverageBackend(), tmp_path, arrays, [0, 0, 0])
    assert out.shape == () and out == 3.0


def test_zero_sample_results_weigh_nothing_once_one_has_samples(tmp_path):
    arrays = [np.array([100.0]), np.array([1.0]), np.array([-50.0]), np.array([3.0])]
    out = fold(WeightedAverageBackend(), tmp_path, arrays, [0, 1, 0, 3])
    np.testing.assert_array_equal(out, [2.5])


dtypes = st.sampled_from(["<f4", "<f8", ">f4", ">f8"])
shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)
counts = st.integers(0, 2**32 - 1) | st.integers(0, 3)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    dtype=dtypes,
    counts=st.lists(counts, min_size=1, max_size=12),
    orders=st.lists(st.booleans(), min_size=12, max_size=12),
    chunk_bytes=st.sampled_from([8, 40, 200, backends.DEFAULT_CHUNK_BYTES]),
    seed=st.integers(0, 2**32 - 1),
)
def test_weighted_average_property(shape, dtype, counts, orders, chunk_bytes, seed):
    rng = np.random.default_rng(seed)
    arrays = random_arrays(rng, shape, dtype, len(counts))
    with tempfile.TemporaryDirectory() as directory:
        out = fold(WeightedAverageBackend(chunk_bytes=chunk_bytes), Path(directory), arrays, counts, orders)
    check_against_reference(out, arrays, counts, dtype)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=shapes,
    dtype=dtypes,
    counts=st.lists(counts, min_size=1, max_size=10),
    orders=st.lists(st.booleans(), min_size=10, max_size=10),
    misfits=st.lists(st.booleans(), min_size=10, max_size=10),
    split=st.integers(0, 10),
    chunk_bytes=st.sampled_from([8, 40, 200, backends.DEFAULT_CHUNK_BYTES]),
    seed=st.integers(0, 2**32 - 1),
)
def test_folding_results_together_is_folding_them_one_by_one(shape, dtype, counts, orders, misfits, split, chunk_bytes, seed):
    """add_results gives what add_result one at a time gives: refusals, counts and the model, bit for bit."""
    rng = np.random.default_rng(seed)
    arrays = random_arrays(rng, shape, dtype, len(counts))
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        paths = []
        for i, (array, samples) in enumerate(zip(arrays, counts)):
            if misfits[i]:
                array = np.zeros(np.shape(array) + (2,), dtype=dtype)  # another shape: refused
            elif orders[i] and np.ndim(array) >= 2:
                array = np.asfortranarray(array)
            paths.append(write_result(directory / f"r{i}.bin", samples, array))

        one_by_one = WeightedAverageBackend(chunk_bytes=chunk_bytes)
        single: list[str | None] = []
        for path in paths:
            try:
                one_by_one.add_result(path)
                single.append(None)
            except BackendError as refusal:
                single.append(str(refusal))
        together = WeightedAverageBackend(chunk_bytes=chunk_bytes, threads=2)
        with open(paths[0], "rb", buffering=0) as stream:  # a stream instead of a path, for the first
            outcomes = together.add_results([(paths[0], stream)] + [(path, None) for path in paths[1:split]])
            outcomes += together.add_results([(path, None) for path in paths[max(split, 1):]])

        assert [None if outcome is None else str(outcome) for outcome in outcomes] == single
        assert (together.results, together.samples) == (one_by_one.results, one_by_one.samples)
        if one_by_one.results:
            one_by_one.aggregate(str(directory / "single.npy"))
            together.aggregate(str(directory / "together.npy"))
            np.testing.assert_array_equal(np.load(directory / "together.npy"), np.load(directory / "single.npy"))


# -- refusals


@pytest.fixture
def backend() -> WeightedAverageBackend:
    return WeightedAverageBackend(chunk_bytes=64)


def test_aggregate_without_results(tmp_path, backend):
    with pytest.raises(BackendError, match="no results"):
        backend.aggregate(str(tmp_path / "out.npy"))
    backend.reset(write_model(tmp_path / "model.npy", np.zeros(3)))
    with pytest.raises(BackendError, match="no results"):
        backend.aggregate(str(tmp_path / "out.npy"))
    assert not (tmp_path / "out.npy").exists()
    assert backend.results == 0


def refused_then_good(tmp_path, backend, bad_path, match):
    """A refused result changes nothing: the round still averages the good ones exactly."""
    good = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones((3, 4), dtype=np.float32)]
    backend.add_result(write_result(tmp_path / "good-0.bin", 3, good[0]))
    with pytest.raises(BackendError, match=match):
        backend.add_result(bad_path)
    assert backend.results == 1
    backend.add_result(write_result(tmp_path / "good-1.bin", 1, np.asfortranarray(good[1])))
    backend.aggregate(str(tmp_path / "out.npy"))
    check_against_reference(np.load(tmp_path / "out.npy"), good, [3, 1], np.float32)


def test_shape_mismatch_with_first_result(tmp_path, backend):
    bad = write_result(tmp_path / "bad.bin", 5, np.full((4, 3), 1e6, dtype=np.float32))
    refused_then_good(tmp_path, backend, bad, r"shape \(4, 3\) differs")


def test_shape_mismatch_with_global_model(tmp_path, backend):
    backend.reset(write_model(tmp_path / "model.npy", np.zeros((3, 4), dtype=np.float32)))
    bad = write_result(tmp_path / "bad.bin", 5, np.full((12,), 1e6, dtype=np.float32))
    with pytest.raises(BackendError, match="global model"):
        backend.add_result(bad)  # refused as the first result too
    assert backend.results == 0
    refused_then_good(tmp_path, backend, bad, "global model")


MIXED_WIDTHS = ["<f4", ">f2", "<f8", ">f4", ">f8", "<f2"]


@pytest.mark.parametrize("model_dtype", ["<f8", "<f4", ">f2"])
def test_any_float_width_is_converted_to_the_global_models(tmp_path, model_dtype):
    """Issue 11, finding 4: results of another width than the round's were refused (float32 against a float64 model)."""
    rng = np.random.default_rng(11)
    arrays = [rng.uniform(0.5, 2.0, size=(3, 4)).astype(dtype) for dtype in MIXED_WIDTHS]
    counts = [3, 1, 4, 1, 5, 9]
    model = write_model(tmp_path / "model.npy", np.zeros((3, 4), dtype=model_dtype))
    out = fold(WeightedAverageBackend(chunk_bytes=16), tmp_path, arrays, counts, [i % 2 == 1 for i in range(6)], model)
    check_against_reference(out, arrays, counts, model_dtype)


def test_without_a_model_mixed_widths_give_the_widest_in_the_first_results_byte_order(tmp_path):
    rng = np.random.default_rng(12)
    arrays = [rng.uniform(0.5, 2.0, size=(5,)).astype(dtype) for dtype in (">f2", "<f4", ">f8", "<f2")]
    out = fold(WeightedAverageBackend(), tmp_path, arrays, [2, 0, 7, 1])
    check_against_reference(out, arrays, [2, 0, 7, 1], ">f8")
    narrow = fold(WeightedAverageBackend(), tmp_path, arrays[:2], [1, 1])
    check_against_reference(narrow, arrays[:2], [1, 1], ">f4")


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "too short"),
        (b"\x00\x00\x00\x01", "not a valid .npy"),
        (b"\x00\x00\x00\x01not numpy at all", "not a valid .npy"),
    ],
)
def test_malformed_results(tmp_path, backend, content, match):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(content)
    refused_then_good(tmp_path, backend, str(bad), match)


def test_non_float_results(tmp_path, backend):
    bad = write_result(tmp_path / "bad.bin", 1, np.ones((3, 4), dtype=np.int32))
    refused_then_good(tmp_path, backend, bad, "cannot be averaged")


@pytest.mark.parametrize("change", [-1, +1])
def test_truncated_or_padded_result(tmp_path, backend, change):
    bad = Path(write_result(tmp_path / "bad.bin", 1, np.full((3, 4), 1e6, dtype=np.float32)))
    data = bad.read_bytes()
    bad.write_bytes(data[:change] if change < 0 else data + b"\0")
    refused_then_good(tmp_path, backend, str(bad), "its header announces")


def test_missing_files(tmp_path, backend):
    refused_then_good(tmp_path, backend, str(tmp_path / "nowhere.bin"), "No such file")
    with pytest.raises(BackendError, match="global model"):
        backend.reset(str(tmp_path / "nowhere.npy"))
    (tmp_path / "model.npy").write_bytes(b"garbage")
    with pytest.raises(BackendError, match="global model"):
        backend.reset(str(tmp_path / "model.npy"))


def test_first_result_refused_then_other_shape_accepted(tmp_path, backend):
    bad = tmp_path / "bad.bin"
    data = Path(write_result(bad, 1, np.ones((2, 2), dtype=np.float32))).read_bytes()
    bad.write_bytes(data[:-1])
    with pytest.raises(BackendError):
        backend.add_result(str(bad))
    out = fold(backend, tmp_path, [np.ones(5, dtype=np.float64) * 2], [4])  # the round is not bound to (2, 2)
    np.testing.assert_array_equal(out, np.full(5, 2.0))


def test_reset_clears_the_sum(tmp_path, backend):
    backend.add_result(write_result(tmp_path / "a.bin", 100, np.full((3,), 1e9, dtype=np.float64)))
    backend.add_result(write_result(tmp_path / "b.bin", 0, np.full((3,), 1e9, dtype=np.float64)))
    assert backend.results == 2
    backend.reset(None)
    assert backend.results == 0
    with pytest.raises(BackendError, match="no results"):
        backend.aggregate(str(tmp_path / "out.npy"))
    # a new round may have another shape and dtype, and starts from zero
    arrays = [np.array([[1.0, 2.0]], dtype=np.float32), np.array([[3.0, 4.0]], dtype=np.float32)]
    out = fold(backend, tmp_path, arrays, [1, 1], global_model=write_model(tmp_path / "m.npy", arrays[0]))
    np.testing.assert_array_equal(out, [[2.0, 3.0]])


def test_aggregate_changes_nothing_and_replaces_atomically(tmp_path, backend):
    arrays = [np.array([1.0, 2.0]), np.array([3.0, 6.0])]
    out = fold(backend, tmp_path, arrays, [1, 3])
    destination = tmp_path / "global.npy"
    backend.aggregate(str(destination))  # again: same answer, over the old file
    np.testing.assert_array_equal(np.load(destination), out)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []
    with pytest.raises(BackendError, match="cannot write"):
        backend.aggregate(str(tmp_path / "no-such-dir" / "global.npy"))


def test_fold_failing_half_way_needs_a_reset(tmp_path, backend, monkeypatch):
    arrays = [np.arange(64, dtype=np.float64), np.ones(64)]
    backend.add_result(write_result(tmp_path / "a.bin", 1, arrays[0]))
    real_blocks = backends._c_order_blocks
    calls = []

    def failing_blocks(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:  # after the first chunk went into the sum
            raise OSError("disk on fire")
        return real_blocks(*args, **kwargs)

    monkeypatch.setattr(backends, "_c_order_blocks", failing_blocks)
    with pytest.raises(BackendError, match="disk on fire"):
        backend.add_result(write_result(tmp_path / "b.bin", 1, arrays[1]))
    monkeypatch.setattr(backends, "_c_order_blocks", real_blocks)
    with pytest.raises(BackendError, match="reset"):
        backend.aggregate(str(tmp_path / "out.npy"))
    with pytest.raises(BackendError, match="reset"):
        backend.add_result(str(tmp_path / "b.bin"))
    out = fold(backend, tmp_path, arrays, [1, 1])
    check_against_reference(out, arrays, [1, 1], np.float64)


@pytest.mark.parametrize("order", ["C", "F", "mixed"])
def test_large_results_fold_in_parallel_parts_exactly_as_in_one(tmp_path, order, monkeypatch):
    rng = np.random.default_rng(31)
    shape = (769, 1031)  # > 3 x PARALLEL_MIN_ELEMENTS weights: three parts
    assert math.prod(shape) >= 3 * backends.PARALLEL_MIN_ELEMENTS
    arrays = random_arrays(rng, shape, np.float32, 4)
    counts = [3, 0, 8, 1]
    fortran = {"C": [False] * 4, "F": [True] * 4, "mixed": [False, True, True, False]}[order]
    threads_seen: set[str] = set()
    real_read = backends._read_exactly

    def spying(*args, **kwargs):
        threads_seen.add(threading.current_thread().name)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(backends, "_read_exactly", spying)
    serial = fold(WeightedAverageBackend(threads=1), tmp_path, arrays, counts, fortran)
    assert len(threads_seen) == 1
    parallel = fold(WeightedAverageBackend(threads=3, chunk_bytes=4096), tmp_path, arrays, counts, fortran)
    assert len(threads_seen) == 3
    np.testing.assert_array_equal(parallel, serial)  # element for element the same operations
    assert np.isfortran(parallel) == np.isfortran(serial)
    check_against_reference(parallel, arrays, counts, np.float32)


def test_a_part_failing_in_a_helper_thread_fails_the_fold_like_any_other(tmp_path, monkeypatch):
    elements = 3 * backends.PARALLEL_MIN_ELEMENTS
    arrays = [np.arange(elements, dtype=np.float32), np.ones(elements, dtype=np.float32)]
    real_read = backends._read_exactly
    reads = {"helper": 0}

    def failing(*args, **kwargs):
        if threading.current_thread().name.startswith("xaind-fold"):
            reads["helper"] += 1
            if reads["helper"] == 3:  # a helper's part already went partly into the sum
                raise OSError("disk on fire")
        return real_read(*args, **kwargs)

    first = WeightedAverageBackend(threads=2, chunk_bytes=2**16)
    monkeypatch.setattr(backends, "_read_exactly", failing)
    with pytest.raises(BackendError, match="disk on fire"):
        first.add_result(write_result(tmp_path / "a.bin", 1, arrays[0]))
    assert first.results == 0  # a failed first result is forgotten entirely
    reads["helper"] = 0
    monkeypatch.setattr(backends, "_read_exactly", real_read)
    first.add_result(str(tmp_path / "a.bin"))
    monkeypatch.setattr(backends, "_read_exactly", failing)
    with pytest.raises(BackendError, match="disk on fire"):
        first.add_result(write_result(tmp_path / "b.bin", 1, arrays[1]))
    with pytest.raises(BackendError, match="reset"):
        first.aggregate(str(tmp_path / "out.npy"))
    monkeypatch.setattr(backends, "_read_exactly", real_read)
    out = fold(first, tmp_path, arrays, [1, 1])
    check_against_reference(out, arrays, [1, 1], np.float32)


# -- memory


def test_folding_many_results_does_not_grow_memory(tmp_path):
    elements = 2**20  # 4 MB of float32 per result; the float64 sum is 8 MB
    sum_bytes = elements * 8
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(elements, dtype=np.float32) for _ in range(2)]
    paths = [write_result(tmp_path / f"r{i}.bin", i, arrays[i % 2]) for i in range(10)]
    del arrays
    backend = WeightedAverageBackend()  # the default chunk size
    tracemalloc.start()
    try:
        backend.reset(None)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        backend.add_result(paths[0])
        peak_one = tracemalloc.get_traced_memory()[1] - base
        for path in paths[1:]:
            backend.add_result(path)
        current, peak = tracemalloc.get_traced_memory()
        assert peak - base < 3 * sum_bytes
        assert peak - base <= peak_one + 2**20  # no growth with the number of results (4 MB each)
        assert current - base < sum_bytes * 1.1 + 2 * backends.DEFAULT_CHUNK_BYTES

        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        backend.aggregate(str(tmp_path / "out.npy"))
        assert tracemalloc.get_traced_memory()[1] - before < sum_bytes / 2  # no full-size temporary
    finally:
        tracemalloc.stop()
    assert np.load(tmp_path / "out.npy").shape == (elements,)


def test_small_chunks_bound_the_buffers(tmp_path):
    elements = 2**18
    paths = [write_result(tmp_path / f"r{i}.bin", 1, np.full(elements, i, dtype=np.float32)) for i in range(3)]
    backend = WeightedAverageBackend(chunk_bytes=2**14)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        for path in paths:
            backend.add_result(path)
        backend.aggregate(str(tmp_path / "out.npy"))
        assert tracemalloc.get_traced_memory()[1] - base < elements * 8 + 2 * 2**14 + 2**16
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.ones(elements, dtype=np.float32))


# -- python aggregators


def exact_weighted_average(arrays: list[np.ndarray], counts: list[int]) -> tuple[list[Fraction], list[Fraction]]:
    """Per element (in C order): sum(n_i x_i) / sum(n_i) exactly (the plain mean when every n_i is 0),
    and sum(n_i |x_i|) / sum(n_i), the scale of the rounding errors of any floating-point sum of it."""
    weights = counts if sum(counts) > 0 else [1] * len(counts)
    total = sum(weights)
    flat = [np.asarray(array, dtype=np.float64).reshape(-1) for array in arrays]
    values = [[Fraction(float(x)) for x in array] for array in flat]
    averages = [sum(w * column[i] for w, column in zip(weights, values)) / total for i in range(flat[0].size)]
    magnitudes = [sum(w * abs(column[i]) for w, column in zip(weights, values)) / total for i in range(flat[0].size)]
    return averages, magnitudes


def test_xain_aggregators_weighted_average_agrees(tmp_path):
    """Both weighted averages are within their rounding-error bounds of the exact one.

    A tolerance relative to the result cannot hold for the seed on numpy 1.x:
    there `float32 array * np.float64 scalar` is float32 (value-based
    casting; NEP 50 made it float64 in numpy 2), so xain-aggregators scales
    and sums float32 results in float32 and returns float32. Where the terms
    cancel, its error is small against sum(n_i |x_i|) / N but not against the
    result: with numpy 1.24.2, element 59 of the first case below is exactly
    0.0120283122..., the seed gives 0.0120282173 (102 float32 ulp, relative
    7.9e-6, 0.75 eps32 of sum(n_i |x_i|) / N = 1.055), while xaind's float64
    sum rounded once to float32 is within 0.5 ulp of it everywhere. With
    numpy 2 the seed answers in float64, within 4e-17 of that scale.

    So each is checked against an exact (fractions) reference with the bound
    of its own arithmetic. The seed: k scaled results (the weight rounded to
    the input's precision, then the product) and k - 1 additions in at worst
    the input's precision, at most (k + 1) u sum(n_i |x_i|) / N to first
    order; (k + 2) u is allowed. xaind: float64 products, additions and one
    division, the same (k + 2) u in float64, then one rounding to the output
    dtype (half an ulp of it).
    """
    pytest.importorskip(
        "xain_aggregators.weighted_average",
        reason="xain-aggregators 0.8.0 comes from PyPI (pip install -e '.[test]'); Debian has no package of it",
    )
    seed = load_backend("python", "xain_aggregators.weighted_average", "Aggregator")
    assert isinstance(seed, PythonAggregatorBackend)
    rng = np.random.default_rng(4)
    cases = [
        ((3, 4, 5), np.float32, [10, 0, 25, 3]),
        ((17,), np.float64, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]),
        ((2, 6), np.float64, [0, 0, 0]),
        ((), np.float32, [5, 0]),
        ((4, 3), ">f8", [2**32 - 1, 7]),
    ]
    for shape, dtype, sample_counts in cases:
        arrays = random_arrays(rng, shape, dtype, len(sample_counts))
        fortran = [i % 2 == 1 for i in range(len(sample_counts))]
        ours = fold(WeightedAverageBackend(), tmp_path, arrays, sample_counts, fortran)
        theirs = fold(seed, tmp_path, arrays, sample_counts, fortran)
        assert np.issubdtype(theirs.dtype, np.floating)
        assert theirs.size == ours.size  # the seed returns a scalar as shape (1,)
        assert ours.dtype == np.dtype(dtype) and ours.shape == shape
        averages, magnitudes = exact_weighted_average(arrays, sample_counts)
        k = len(sample_counts)
        u_input = Fraction(float(np.finfo(dtype).eps)) / 2
        u_64 = Fraction(float(np.finfo(np.float64).eps)) / 2
        for index, (exact, magnitude) in enumerate(zip(averages, magnitudes)):
            mine, seeds = Fraction(float(ours.reshape(-1)[index])), Fraction(float(theirs.reshape(-1)[index]))
            half_ulp = Fraction(float(np.spacing(np.abs(np.asarray(float(exact), dtype=ours.dtype))))) / 2
            ours_bound = half_ulp + (k + 2) * u_64 * magnitude
            theirs_bound = (k + 2) * u_input * magnitude
            assert abs(mine - exact) <= ours_bound, (shape, dtype, index, float(mine), float(exact), float(ours_bound))
            assert abs(seeds - exact) <= theirs_bound, (shape, dtype, index, float(seeds), float(exact), float(theirs_bound))
    with pytest.raises(BackendError, match="no results"):
        seed.reset(None)
        seed.aggregate(str(tmp_path / "out.npy"))


def npy_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_python_backend_passes_bytes_through(tmp_path):
    answer = npy_bytes(np.array([1.5, 2.5], dtype=np.float32))
    fake = FakeSeedAggregator(answer=memoryview(answer))
    backend = PythonAggregatorBackend(fake)
    model = write_model(tmp_path / "model.npy", np.zeros(2))
    backend.reset(model)
    result = write_result(tmp_path / "r.bin", 9, np.ones(2))
    backend.add_result(result)
    assert backend.results == 1
    backend.aggregate(str(tmp_path / "out.npy"))
    assert fake.calls == [
        ("reset", Path(model).read_bytes()),
        ("add_weights", Path(result).read_bytes()),
        ("aggregate",),
    ]
    assert (tmp_path / "out.npy").read_bytes() == answer
    backend.reset(None)
    assert fake.calls[-1] == ("reset", None) and backend.results == 0


@pytest.mark.parametrize("dtype", ["<f2", ">f2", "<f4", ">f4", ">f8"])
@pytest.mark.parametrize("fortran_order", [False, True])
def test_python_backend_converts_results_to_the_global_models_dtype(tmp_path, dtype, fortran_order):
    """Issue 11, finding 4: the aggregator gets every result in the dtype of the model it was reset with."""
    fake = FakeSeedAggregator()
    backend = PythonAggregatorBackend(fake)
    backend.reset(write_model(tmp_path / "model.npy", np.zeros((2, 3), dtype="<f8")))
    array = (np.arange(6).reshape(2, 3) / 4).astype(dtype)
    if fortran_order:
        array = np.asfortranarray(array)
    backend.add_result(write_result(tmp_path / "r.bin", 77, array))
    (name, data), = [call for call in fake.calls if call[0] == "add_weights"]
    assert type(data) is bytes and int.from_bytes(data[:4], "big") == 77
    received = np.load(io.BytesIO(data[4:]), allow_pickle=False)
    assert received.dtype == np.dtype("<f8") and received.flags.f_contiguous == fortran_order
    np.testing.assert_array_equal(received, array.astype("<f8"))
    # Before the first model there is nothing to convert to: the result goes as sent.
    backend.reset(None)
    path = write_result(tmp_path / "r.bin", 77, array)
    backend.add_result(path)
    assert fake.calls[-1] == ("add_weights", Path(path).read_bytes())


def test_python_backend_refuses_a_result_shorter_than_its_header_when_converting(tmp_path):
    backend = PythonAggregatorBackend(FakeSeedAggregator())
    backend.reset(write_model(tmp_path / "model.npy", np.zeros(4)))
    path = Path(write_result(tmp_path / "r.bin", 1, np.ones(4, dtype=np.float32)))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BackendError, match="announces"):
        backend.add_result(str(path))
    assert backend.results == 0


def test_python_backend_converts_in_chunks(tmp_path):
    """The converted result is the only full-size allocation: memory stays that of what the aggregator holds."""
    elements = 2**20
    path = write_result(tmp_path / "r.bin", 1, np.ones(elements, dtype=np.float32))
    fake = FakeSeedAggregator()
    backend = PythonAggregatorBackend(fake)
    backend.reset(write_model(tmp_path / "model.npy", np.zeros(elements)))
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        backend.add_result(path)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert len(fake.calls[-1][1]) > elements * 8
    assert peak < elements * 8 + 3 * 2**20


def test_xain_aggregators_with_a_float64_model_and_float32_results(tmp_path):
    """The seed's pairing: its aggregator makes float64 models, xain-sdk participants send float32."""
    pytest.importorskip(
        "xain_aggregators.weighted_average",
        reason="xain-aggregators 0.8.0 comes from PyPI (pip install -e '.[test]'); Debian has no package of it",
    )
    seed = load_backend("python", "xain_aggregators.weighted_average", "Aggregator")
    rng = np.random.default_rng(13)
    arrays = [rng.uniform(0.5, 2.0, size=(4, 5)).astype(dtype) for dtype in ("<f4", ">f4", "<f2", "<f8")]
    model = write_model(tmp_path / "model.npy", np.ones((4, 5), dtype=np.float64))
    out = fold(seed, tmp_path, arrays, [10, 20, 30, 40], global_model=model)
    np.testing.assert_allclose(out, reference(arrays, [10, 20, 30, 40], np.float64), rtol=1e-12)


@pytest.mark.parametrize("accept", [False, None, "raise"])
def test_python_backend_refused_result(tmp_path, accept):
    backend = PythonAggregatorBackend(FakeSeedAggregator(accept=accept))
    with pytest.raises(BackendError) as caught:
        backend.add_result(write_result(tmp_path / "r.bin", 1, np.ones(2)))
    assert "\n" not in str(caught.value)
    assert backend.results == 0


@pytest.mark.parametrize(
    "answer, match",
    [
        (b"", "not a valid .npy"),
        (b"\x93NUMPY garbage", "unsupported .npy format version"),
        (b"\x93NUMPY\x01\x00garbage", "not a valid .npy"),
        (npy_bytes(np.arange(3)), "not a floating array"),
        (npy_bytes(np.ones(3))[:-1], "header announces"),
        (npy_bytes(np.ones(3)) + b"x", "header announces"),
        (None, "NoneType"),
        ("text", "str"),
    ],
)
def test_python_backend_bad_aggregate(tmp_path, answer, match):
    backend = PythonAggregatorBackend(FakeSeedAggregator(answer=answer))
    with pytest.raises(BackendError, match="no results"):
        backend.aggregate(str(tmp_path / "out.npy"))
    backend.add_result(write_result(tmp_path / "r.bin", 1, np.ones(3)))
    with pytest.raises(BackendError, match=match):
        backend.aggregate(str(tmp_path / "out.npy"))
    assert not (tmp_path / "out.npy").exists()


# -- load_backend


def test_load_backend_builtin():
    backend = load_backend("weighted_average")
    assert isinstance(backend, WeightedAverageBackend)
    assert isinstance(backend, AggregationBackend)
    assert isinstance(PythonAggregatorBackend(FakeSeedAggregator()), AggregationBackend)


@pytest.fixture
def aggregator_module(tmp_path, monkeypatch):
    (tmp_path / "my_aggregators.py").write_text(
        textwrap.dedent(
            """
            class Good:
                def reset(self, global_weights): pass
                def add_weights(self, data): return True
                def aggregate(self): return b""
                def get_global_weights(self): return b""

            class NoGlobalWeights:
                def reset(self, global_weights): pass
                def add_weights(self, data): return True
                def aggregate(self): return b""

            class Explodes(Good):
                def __init__(self):
                    raise RuntimeError("no GPU")

            not_a_class = 42
            """
        )
    )
    (tmp_path / "broken_module.py").write_text("import does_not_exist_anywhere\n")
    (tmp_path / "syntax_module.py").write_text("def (:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_aggregators"


def test_load_backend_python(aggregator_module):
    backend = load_backend("python", aggregator_module, "Good")
    assert isinstance(backend, PythonAggregatorBackend)
    assert type(backend.aggregator).__name__ == "Good"


@pytest.mark.parametrize(
    "args, match",
    [
        (("federated_median",), "unknown aggregation backend 'federated_median'"),
        (("python",), "needs both a module and a class"),
        (("python", "my_aggregators"), "needs both a module and a class"),
        (("weighted_average", "my_aggregators", "Good"), "takes no module or class"),
        (("python", "no_such_module_xyz", "Good"), "cannot import aggregator module 'no_such_module_xyz'"),
        (("python", "broken_module", "Good"), "cannot import aggregator module 'broken_module'"),
        (("python", "syntax_module", "Good"), "cannot import aggregator module 'syntax_module'"),
        (("python", "my_aggregators", "Missing"), "has no class 'Missing'"),
        (("python", "my_aggregators", "not_a_class"), "not a class"),
        (("python", "my_aggregators", "NoGlobalWeights"), "lacks the aggregator method.* get_global_weights"),
        (("python", "my_aggregators", "Explodes"), "cannot create my_aggregators.Explodes.*no GPU"),
    ],
)
def test_load_backend_refusals(aggregator_module, args, match):
    with pytest.raises(BackendError, match=match) as caught:
        load_backend(*args)
    assert "\n" not in str(caught.value)
