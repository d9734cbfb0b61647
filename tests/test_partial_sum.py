"""Shards' partial sums and their reduce, checked against one WeightedAverageBackend over all the results.

Exactness: with integer-valued weights and sample counts every product
``n_i * x_i`` and every partial sum is an integer below 2**53, which float64
represents exactly, so the sums are the same whatever the order of the
additions (shards then shard order, or one arrival order) and the one
division makes the same float64: the reduce is bit for bit one aggregator's.
Otherwise the two differ by float64 rounding only (see the tolerance below).
"""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xaind.aggregator.backends import WeightedAverageBackend
from xaind.aggregator.optimizers import OptimizerParameters, ServerOptimizerBackend
from xaind.aggregator.result_set import HeldResultsBackend
from xaind.aggregator.partial_sum import (
    MAGIC,
    PartialSumError,
    ReducedModel,
    read_partial_sum_header,
    reduce_partial_sums,
    write_partial_sum,
)

EPS64 = 2.0**-53
DTYPES = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(">f4")]


def write_result(path: Path, samples: int, array: np.ndarray) -> str:
    with open(path, "wb") as f:
        f.write(samples.to_bytes(4, "big"))
        np.save(f, array, allow_pickle=False)
    return str(path)


Result = tuple[int, np.ndarray]  # (samples, weights)


def fold(directory: Path, name: str, results: list[Result], model: str | None, chunk_bytes: int = 4096) -> WeightedAverageBackend:
    backend = WeightedAverageBackend(chunk_bytes=chunk_bytes, threads=1)
    backend.reset(model)
    for index, (samples, array) in enumerate(results):
        backend.add_result(write_result(directory / f"{name}-{index}.result", samples, array))
    return backend


def single_and_sharded(
    directory: Path, shards: list[list[Result]], model: str | None = None, dtype: np.dtype | None = None, chunk_bytes: int = 4096
) -> tuple[np.ndarray, np.ndarray, bytes, bytes]:
    """One backend over every result (shard after shard) and the reduce of one backend per shard: arrays and file bytes."""
    single = fold(directory, "all", [result for shard in shards for result in shard], model)
    single.aggregate(str(directory / "single.npy"), dtype=dtype)
    paths = []
    for number, shard in enumerate(shards):
        paths.append(str(directory / f"shard-{number}.psum"))
        write_partial_sum(fold(directory, f"shard{number}", shard, model), paths[-1], round_number=3)
    reduce_partial_sums(paths, str(directory / "sharded.npy"), dtype=dtype, round_number=3, chunk_bytes=chunk_bytes)
    files = [(directory / name).read_bytes() for name in ("single.npy", "sharded.npy")]
    return np.load(directory / "single.npy"), np.load(directory / "sharded.npy"), files[0], files[1]


# -- strategies

shapes = st.sampled_from([(), (1,), (7,), (3, 4), (2, 3, 2), (5, 1)])


@st.composite
def rounds(draw: st.DrawFn, integer: bool) -> tuple[tuple[int, ...], list[list[Result]]]:
    shape = draw(shapes)
    shards = []
    for _ in range(draw(st.integers(1, 5))):
        shard = []
        for _ in range(draw(st.integers(0, 4))):
            dtype = draw(st.sampled_from(DTYPES))
            samples = draw(st.sampled_from([0, 0, 1, 3, 1000, 65535]))
            seed = draw(st.integers(0, 2**32 - 1))
            rng = np.random.default_rng(seed)
            values = rng.integers(-64, 65, size=shape) if integer else rng.normal(0.0, 10.0, size=shape)
            array = np.asarray(values).astype(dtype)
            if draw(st.booleans()) and len(shape) >= 2:
                array = np.asfortranarray(array)
            shard.append((samples, array))
        shards.append(shard)
    return shape, shards


def some_result(shards: list[list[Result]]) -> bool:
    return any(shards_results for shards_results in shards)


def ignored_wider_result(shards: list[list[Result]]) -> bool:
    """The one case where one backend's output dtype depends on arrival order (see the module's docs).

    A 0-sample result that arrives after a result with samples weighs nothing, and one backend does not
    widen its output dtype for it; a shard that had it before its own first result with samples did.
    """
    seen_samples = False
    for samples, _ in (result for shard in shards for result in shard):
        if samples == 0 and seen_samples:
            return True
        seen_samples = seen_samples or samples > 0
    return False


# -- equality with one aggregator


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds(integer=True), st.integers(8, 512), st.sampled_from([None] + DTYPES[:3]))
def test_integer_weights_reduce_bit_for_bit_as_one_aggregator(round_: tuple, chunk_bytes: int, model_dtype: np.dtype | None) -> None:
    shape, shards = round_
    if not some_result(shards):
        return
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        model = None
        if model_dtype is not None:
            model = str(directory / "model.npy")
            np.save(model, np.zeros(shape, dtype=model_dtype))
        # The float64 average (what a server optimizer steps from): bit for bit, always.
        single, sharded, single_bytes, sharded_bytes = single_and_sharded(directory, shards, model, np.dtype(np.float64), chunk_bytes)
        assert single_bytes == sharded_bytes
        # The model as written: the same file, dtype and memory order included.
        single, sharded, single_bytes, sharded_bytes = single_and_sharded(directory, shards, model, None, chunk_bytes)
        if single.dtype == sharded.dtype:
            assert single_bytes == sharded_bytes
        else:
            # Only without a model, where one backend's dtype ignores 0-sample results that arrive after one with
            # samples: the reduce takes the widest of the shards' dtypes, never narrower.
            assert model is None and ignored_wider_result(shards)
            assert sharded.dtype.itemsize > single.dtype.itemsize
            assert np.array_equal(sharded.astype(single.dtype), single, equal_nan=True)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds(integer=False), st.integers(8, 512))
def test_real_valued_weights_reduce_within_float64_rounding(round_: tuple, chunk_bytes: int) -> None:
    """|reduce - one aggregator| <= 2 (N + K) 2**-53 sum(n_i |x_i|) / sum(n_i), per element (float64 average)."""
    shape, shards = round_
    results = [result for shard in shards for result in shard]
    if not results:
        return
    with tempfile.TemporaryDirectory() as name:
        single, sharded, _, _ = single_and_sharded(Path(name), shards, None, np.dtype(np.float64), chunk_bytes)
    weighted = [(n, x) for n, x in results if n > 0] or [(1, x) for _, x in results]
    magnitude = sum(n * np.abs(x.astype(np.float64)) for n, x in weighted) / sum(n for n, _ in weighted)
    bound = 2 * (len(results) + len(shards)) * EPS64 * magnitude
    assert np.all(np.abs(sharded - single) <= bound)


def test_a_worked_example_with_0_sample_results() -> None:
    """Shard 0 has only 0-sample results, shard 1 one with samples: shard 0 weighs nothing, as in one aggregator."""
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        zeros = [(0, np.array([100.0, 100.0], dtype=np.float32))] * 2
        weighted = [(2, np.array([1.0, 3.0], dtype=np.float32)), (0, np.array([-5.0, 5.0], dtype=np.float32)), (6, np.array([5.0, 7.0], dtype=np.float32))]
        single, sharded, single_bytes, sharded_bytes = single_and_sharded(directory, [zeros, weighted, []])
        assert sharded.tolist() == [4.0, 6.0]  # (2*1 + 6*5) / 8, (2*3 + 6*7) / 8
        assert single_bytes == sharded_bytes
        # Only 0-sample results: the plain mean of all of them.
        _, sharded, _, _ = single_and_sharded(directory, [zeros, [(0, np.array([1.0, 4.0], dtype=np.float32))]])
        assert sharded.tolist() == [67.0, 68.0]


def test_a_shard_in_the_other_memory_order() -> None:
    """A shard whose first result is Fortran-ordered keeps its sum so; the reduce reads it transposed."""
    rng = np.random.default_rng(5)
    c_result = (3, rng.integers(-9, 9, size=(40, 30)).astype(np.float32))
    f_result = (5, np.asfortranarray(rng.integers(-9, 9, size=(40, 30)).astype(np.float32)))
    with tempfile.TemporaryDirectory() as name:
        for order in ([[c_result], [f_result]], [[f_result], [c_result, f_result]]):
            single, sharded, single_bytes, sharded_bytes = single_and_sharded(Path(name), order, chunk_bytes=136)
            assert single_bytes == sharded_bytes


# -- the file and its refusals


def test_partial_sum_file_round_trip(tmp_path: Path) -> None:
    backend = fold(tmp_path, "r", [(2, np.arange(6, dtype=np.float32).reshape(2, 3)), (0, np.ones((2, 3), np.float16))], None)
    header = write_partial_sum(backend, str(tmp_path / "a.psum"), round_number=7)
    assert (header.round, header.results, header.samples, header.shape, header.dtype, header.fortran_order) == (
        7, 2, 2, (2, 3), np.dtype(np.float32), False,
    )
    with open(tmp_path / "a.psum", "rb") as stream:
        assert stream.read(len(MAGIC)) == MAGIC
        stream.seek(header.data_offset)
        assert np.frombuffer(stream.read(), dtype=header.sum_dtype).tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]
    assert not list(tmp_path.glob("*.partial"))
    empty = write_partial_sum(fold(tmp_path, "e", [], None), str(tmp_path / "empty.psum"))
    assert (empty.results, empty.shape, empty.size) == (0, None, 0)


def test_shapes_that_differ_are_refused_in_one_line(tmp_path: Path) -> None:
    write_partial_sum(fold(tmp_path, "a", [(1, np.zeros(3, np.float32))], None), str(tmp_path / "a.psum"))
    write_partial_sum(fold(tmp_path, "b", [(1, np.zeros(4, np.float32))], None), str(tmp_path / "b.psum"))
    with pytest.raises(PartialSumError) as refusal:
        reduce_partial_sums([str(tmp_path / "a.psum"), str(tmp_path / "b.psum")], str(tmp_path / "out.npy"))
    assert "shape (4,) differs from" in str(refusal.value) and "\n" not in str(refusal.value)
    assert not (tmp_path / "out.npy").exists()


def test_refusals(tmp_path: Path) -> None:
    write_partial_sum(fold(tmp_path, "e", [], None), str(tmp_path / "empty.psum"), round_number=1)
    with pytest.raises(PartialSumError, match="no results were added this round"):
        reduce_partial_sums([str(tmp_path / "empty.psum")], str(tmp_path / "out.npy"))
    with pytest.raises(PartialSumError, match="is of round 1, not 2"):
        reduce_partial_sums([str(tmp_path / "empty.psum")], str(tmp_path / "out.npy"), round_number=2)
    write_partial_sum(fold(tmp_path, "a", [(1, np.zeros(300, np.float32))], None), str(tmp_path / "a.psum"))
    data = (tmp_path / "a.psum").read_bytes()
    (tmp_path / "short.psum").write_bytes(data[:-8])
    with pytest.raises(PartialSumError, match="its header announces"):
        read_partial_sum_header(str(tmp_path / "short.psum"))
    (tmp_path / "int.psum").write_bytes(data.replace(b'"dtype":"<f4"', b'"dtype":"<i4"'))
    with pytest.raises(PartialSumError, match="cannot be averaged"):
        read_partial_sum_header(str(tmp_path / "int.psum"))
    (tmp_path / "junk.psum").write_bytes(b"\x93NUMPY" + data[6:])
    with pytest.raises(PartialSumError, match="not a partial sum file"):
        read_partial_sum_header(str(tmp_path / "junk.psum"))
    with pytest.raises(PartialSumError, match="only the weighted average can be sharded"):
        write_partial_sum(HeldResultsBackend(), str(tmp_path / "held.psum"))  # type: ignore[arg-type]
    backend = fold(tmp_path, "b", [(1, np.zeros(3, np.float32))], None)
    backend._broken = "an earlier fold failed part-way"
    with pytest.raises(PartialSumError, match="the round must be reset"):
        write_partial_sum(backend, str(tmp_path / "b.psum"))


# -- memory


@pytest.mark.parametrize("shards", [1, 4])
def test_the_reduce_holds_a_chunk_not_the_model(tmp_path: Path, shards: int) -> None:
    """4 shards of a 2**20-element model (8 MiB sums): the reduce's peak is its chunks, whatever the count."""
    elements, chunk_bytes = 2**20, 256 * 2**10
    rng = np.random.default_rng(1)
    paths = []
    for number in range(shards):
        array = rng.standard_normal((1024, 1024)).astype(np.float32)
        if number == 1:
            array = np.asfortranarray(array)  # one shard in the other order: read through a mapping, not the heap
        backend = fold(tmp_path, f"s{number}", [(number + 1, array)], None, chunk_bytes=chunk_bytes)
        paths.append(str(tmp_path / f"s{number}.psum"))
        write_partial_sum(backend, paths[-1])
        del backend
    tracemalloc.start()
    try:
        reduced = reduce_partial_sums(paths, str(tmp_path / "out.npy"), chunk_bytes=chunk_bytes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reduced.results == shards and reduced.shape == (1024, 1024)
    assert os.path.getsize(tmp_path / "out.npy") > elements * 4
    assert peak < 4 * chunk_bytes, f"peak {peak} bytes for {shards} shard(s) of {elements * 8} bytes"


def test_a_server_optimizer_exports_its_average_and_steps_once_after_the_reduce(tmp_path: Path) -> None:
    """fedavgm sharded: each shard exports its averaging backend's sum; the float64 reduce is one aggregator's average."""
    results = [(2, np.array([1.0, 2.0], np.float32)), (1, np.array([4.0, 8.0], np.float32)), (1, np.array([0.0, 6.0], np.float32))]
    model = str(tmp_path / "model.npy")
    np.save(model, np.zeros(2, np.float32))
    paths = []
    for number, shard in enumerate([results[:1], results[1:]]):
        optimizer = ServerOptimizerBackend(fold(tmp_path, f"o{number}", shard, model), OptimizerParameters("fedavgm"))
        paths.append(str(tmp_path / f"o{number}.psum"))
        write_partial_sum(optimizer, paths[-1])
    reduced = reduce_partial_sums(paths, str(tmp_path / "average.npy"), dtype=np.dtype(np.float64))
    assert reduced == ReducedModel(3, 4, (2,), np.dtype(np.float64), False, 2, 2)
    assert np.load(tmp_path / "average.npy").tolist() == [1.5, 4.5]
