"""The robust rules (median, trimmed mean, Krum, multi-Krum) against plain in-memory numpy references.

Results are written in the upload wire format and aggregated by
`RobustBackend` chunk by chunk; the references hold every result in one
float64 matrix. Tolerances: the median and the trimmed mean are exact in
float64 (then cast to the output dtype) for any input, the trimmed mean
against a transcription that sums the kept sorted values in ascending
order, and within 1e-12 (relative to the largest value) of
``scipy.stats.trim_mean``. Krum's scores and choice are exact when the
inputs are small integers (every distance is then an exact float64 sum);
for other values the scores are within 1e-9 relative and the choice is a
result whose reference score is within that of the lowest.
"""

from __future__ import annotations

import functools
import os
import tempfile
import tracemalloc
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xaind.aggregator.backends import AggregationBackend, BackendError
from xaind.aggregator.robust import (
    ROBUST_RULES,
    RobustBackend,
    minimum_results,
    robust_parameter_problem,
    trimmed_count,
)
from xaind.testing.wire import encode_local_result

DTYPES = (np.float16, np.float32, np.float64)
SHAPES = ((1,), (5,), (3, 4), (2, 3, 2))
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------
# Helpers


def write_results(directory: str | Path, arrays: Sequence[np.ndarray], samples: Sequence[int] | None = None) -> list[str]:
    paths = []
    for index, array in enumerate(arrays):
        path = os.path.join(directory, f"p{index}.result")
        with open(path, "wb") as stream:
            stream.write(encode_local_result(samples[index] if samples else 1, array))
        paths.append(path)
    return paths


def aggregate(backend: RobustBackend, directory: str | Path, paths: Sequence[str], model: str | None = None) -> np.ndarray:
    backend.reset(model)
    assert backend.add_results([(path, None) for path in paths]) == [None] * len(paths)
    destination = os.path.join(directory, "model.npy")
    backend.aggregate(destination)
    return np.load(destination)


def aggregate_file(backend: RobustBackend, directory: str | Path, paths: Sequence[str]) -> bytes:
    aggregate(backend, directory, paths)
    return Path(directory, "model.npy").read_bytes()


def widest(dtypes: Sequence[np.dtype]) -> np.dtype:
    return max((np.dtype(dtype) for dtype in dtypes), key=lambda dtype: dtype.itemsize)


def reference_median(matrix: np.ndarray) -> np.ndarray:
    return np.median(matrix, axis=0)


def reference_sorted_median(matrix: np.ndarray) -> np.ndarray:
    """The median with NaN ordered above +inf (numpy's sort order) instead of propagated."""
    ordered = np.sort(matrix, axis=0)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def reference_trimmed_mean(matrix: np.ndarray, fraction: float) -> np.ndarray:
    n = len(matrix)
    k = int(fraction * n)
    kept = np.sort(matrix, axis=0)[k : n - k]
    return functools.reduce(np.add, kept) / len(kept)


def reference_krum(matrix: np.ndarray, byzantine: int) -> tuple[list[float], list[int]]:
    """Blanchard et al.'s scores by direct differences, and the results from the lowest score up (ties: first added)."""
    n = len(matrix)
    scores = []
    for i in range(n):
        distances = sorted(float(((matrix[i] - matrix[j]) ** 2).sum()) for j in range(n) if j != i)
        scores.append(sum(distances[: n - byzantine - 2]))
    return scores, sorted(range(n), key=lambda i: (scores[i], i))


def reference_multi_krum(matrix: np.ndarray, byzantine: int, selected: int) -> tuple[np.ndarray, list[int]]:
    _, order = reference_krum(matrix, byzantine)
    chosen = order[: selected or len(matrix) - byzantine]
    return functools.reduce(np.add, matrix[sorted(chosen)]) / len(chosen), chosen


@st.composite
def rounds(draw: st.DrawFn, values: st.SearchStrategy[float], min_n: int = 1, max_n: int = 9) -> tuple[list[np.ndarray], list[int]]:
    """Results of one shape, order and random dtypes, drawn from a pool so identical results are frequent."""
    shape = draw(st.sampled_from(SHAPES))
    fortran = len(shape) >= 2 and draw(st.booleans())
    size = int(np.prod(shape))
    pool = draw(st.lists(st.lists(values, min_size=size, max_size=size), min_size=1, max_size=max_n))
    picks = draw(st.lists(st.integers(0, len(pool) - 1), min_size=min_n, max_size=max_n))
    arrays = []
    for pick in picks:
        dtype = draw(st.sampled_from(DTYPES))
        flat = np.array(pool[pick], dtype=np.float64).astype(dtype)
        arrays.append(np.asfortranarray(flat.reshape(shape)) if fortran else flat.reshape(shape))
    samples = draw(st.lists(st.integers(0, 10**6), min_size=len(arrays), max_size=len(arrays)))
    return arrays, samples


SMALL_INTEGERS = st.integers(-4, 4).map(float)
#: float16 values (exact in every dtype), many ties among them.
FLOAT16_VALUES = st.floats(-1000, 1000, width=16, allow_subnormal=False)


def as_matrix(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return np.stack([np.asarray(array, dtype=np.float64).ravel(order="K") for array in arrays])


def logical(values: np.ndarray, like: np.ndarray) -> np.ndarray:
    """A flat file-order vector back in the shape and memory order of `like`."""
    return values.reshape(like.shape, order="F" if np.isfortran(like) and like.ndim >= 2 else "C")


@pytest.fixture
def directory() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as path:
        yield path


# --------------------------------------------------------------------------
# Coordinate-wise rules


@FAST
@given(rounds(st.one_of(SMALL_INTEGERS, FLOAT16_VALUES)), st.sampled_from((8, 40, 1 << 20)))
def test_median_equals_numpy_median(drawn: tuple[list[np.ndarray], list[int]], budget: int) -> None:
    arrays, samples = drawn
    with tempfile.TemporaryDirectory() as directory:
        out = aggregate(RobustBackend("median", memory_budget_bytes=budget), directory, write_results(directory, arrays, samples))
    dtype = widest([array.dtype for array in arrays])
    expected = logical(reference_median(as_matrix(arrays)).astype(dtype), arrays[0])
    assert out.dtype == dtype and out.shape == arrays[0].shape
    assert np.isfortran(out) == np.isfortran(arrays[0])
    np.testing.assert_array_equal(out, expected)


@FAST
@given(
    rounds(st.one_of(SMALL_INTEGERS, FLOAT16_VALUES)),
    st.sampled_from((0.0, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.45, 0.49)),
    st.sampled_from((8, 56, 1 << 20)),
)
def test_trimmed_mean_equals_a_sorted_trim_mean(drawn: tuple[list[np.ndarray], list[int]], fraction: float, budget: int) -> None:
    arrays, samples = drawn
    with tempfile.TemporaryDirectory() as directory:
        backend = RobustBackend("trimmed_mean", trim_fraction=fraction, memory_budget_bytes=budget)
        out = aggregate(backend, directory, write_results(directory, arrays, samples))
    dtype = widest([array.dtype for array in arrays])
    matrix = as_matrix(arrays)
    expected = reference_trimmed_mean(matrix, fraction)
    np.testing.assert_array_equal(out, logical(expected.astype(dtype), arrays[0]))


@settings(max_examples=20, deadline=None)
@given(rounds(FLOAT16_VALUES, min_n=1, max_n=12), st.sampled_from((0.0, 0.1, 0.25, 0.4)))
def test_trimmed_mean_agrees_with_scipy(drawn: tuple[list[np.ndarray], list[int]], fraction: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    arrays, _ = drawn
    arrays = [array.astype(np.float64) for array in arrays]
    with tempfile.TemporaryDirectory() as directory:
        out = aggregate(RobustBackend("trimmed_mean", trim_fraction=fraction), directory, write_results(directory, arrays))
    matrix = as_matrix(arrays)
    expected = stats.trim_mean(matrix, fraction, axis=0)
    scale = max(1.0, float(np.abs(matrix).max()))
    np.testing.assert_allclose(out.ravel(order="K"), expected, rtol=0, atol=1e-12 * scale)


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_the_order_of_the_results_changes_no_bit(directory: str, rule: str) -> None:
    rng = np.random.default_rng(11)
    arrays = [rng.standard_normal((4, 5)) * 10.0**k for k in range(-3, 7)]
    backend = RobustBackend(rule, trim_fraction=0.2, memory_budget_bytes=8 * 11 * 3)
    first = aggregate_file(backend, directory, write_results(directory, arrays))
    for permutation in (rng.permutation(len(arrays)) for _ in range(3)):
        assert aggregate_file(backend, directory, write_results(directory, [arrays[i] for i in permutation])) == first


def test_one_result_is_its_own_median_and_trimmed_mean(directory: str) -> None:
    array = np.array([[1.5, -2.25], [np.float32(0.1), 7.0]], dtype=np.float32)
    paths = write_results(directory, [array], [0])
    for backend in (RobustBackend("median"), RobustBackend("trimmed_mean", trim_fraction=0.49)):
        out = aggregate(backend, directory, paths)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, array)


def test_even_count_median_is_the_mean_of_the_two_middle_values(directory: str) -> None:
    arrays = [np.array([v, -v, 1.0], dtype=np.float64) for v in (4.0, 1.0, 2.0, 10.0)]
    out = aggregate(RobustBackend("median"), directory, write_results(directory, arrays))
    np.testing.assert_array_equal(out, [3.0, -3.0, 1.0])


def test_nan_counts_as_the_largest_value_instead_of_spreading(directory: str) -> None:
    """One participant's NaN must not wipe out a coordinate, as numpy.median's propagation would."""
    arrays = [np.array([1.0, 2.0]), np.array([np.nan, 3.0]), np.array([0.0, np.nan]), np.array([5.0, 4.0]), np.array([2.0, 2.5])]
    paths = write_results(directory, arrays)
    median = aggregate(RobustBackend("median"), directory, paths)
    np.testing.assert_array_equal(median, reference_sorted_median(as_matrix(arrays)))
    np.testing.assert_array_equal(median, [2.0, 3.0])
    trimmed = aggregate(RobustBackend("trimmed_mean", trim_fraction=0.2), directory, paths)
    np.testing.assert_array_equal(trimmed, [(1.0 + 2.0 + 5.0) / 3, (2.5 + 3.0 + 4.0) / 3])


def test_sample_counts_are_ignored(directory: str) -> None:
    arrays = [np.full(3, float(v)) for v in (1, 2, 30)]
    for rule in ROBUST_RULES:
        backend = RobustBackend(rule, byzantine=0)
        light = aggregate(backend, directory, write_results(directory, arrays, [1, 1, 1]))
        heavy = aggregate(backend, directory, write_results(directory, arrays, [1, 1, 4_000_000]))
        np.testing.assert_array_equal(light, heavy)


def test_the_global_model_sets_the_output_dtype(directory: str) -> None:
    model = os.path.join(directory, "global.npy")
    np.save(model, np.zeros((2, 2), dtype=np.float16))
    arrays = [np.array([[0.1, 0.2], [0.3, 0.4]]) * k for k in (1, 2, 3)]
    out = aggregate(RobustBackend("median"), directory, write_results(directory, arrays), model)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, (arrays[1]).astype(np.float16))


# --------------------------------------------------------------------------
# Krum and multi-Krum


@FAST
@given(rounds(SMALL_INTEGERS, min_n=3, max_n=10), st.integers(0, 3), st.sampled_from((8, 48, 1 << 20)))
def test_krum_chooses_the_reference_result_exactly(drawn: tuple[list[np.ndarray], list[int]], byzantine: int, budget: int) -> None:
    arrays, samples = drawn
    n = len(arrays)
    byzantine = min(byzantine, (n - 3) // 2)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_results(directory, arrays, samples)
        backend = RobustBackend("krum", byzantine=byzantine, memory_budget_bytes=budget)
        out = aggregate(backend, directory, paths)
    matrix = as_matrix(arrays)
    scores, order = reference_krum(matrix, byzantine)
    assert list(backend.last_scores or ()) == scores
    assert backend.last_selection == (f"result {paths[order[0]]}",)
    dtype = widest([array.dtype for array in arrays])
    np.testing.assert_array_equal(out, logical(matrix[order[0]].astype(dtype), arrays[0]))


@FAST
@given(rounds(SMALL_INTEGERS, min_n=3, max_n=10), st.integers(0, 3), st.integers(0, 8), st.sampled_from((8, 48, 1 << 20)))
def test_multi_krum_averages_the_reference_selection(
    drawn: tuple[list[np.ndarray], list[int]], byzantine: int, selected: int, budget: int
) -> None:
    arrays, samples = drawn
    n = len(arrays)
    byzantine = min(byzantine, (n - 3) // 2)
    selected = min(selected, n - byzantine)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_results(directory, arrays, samples)
        backend = RobustBackend("multi_krum", byzantine=byzantine, krum_selected=selected, memory_budget_bytes=budget)
        out = aggregate(backend, directory, paths)
    matrix = as_matrix(arrays)
    expected, chosen = reference_multi_krum(matrix, byzantine, selected)
    assert backend.last_selection == tuple(f"result {paths[i]}" for i in chosen)
    dtype = widest([array.dtype for array in arrays])
    np.testing.assert_array_equal(out, logical(expected.astype(dtype), arrays[0]))


@settings(max_examples=30, deadline=None)
@given(rounds(FLOAT16_VALUES, min_n=3, max_n=10), st.integers(0, 3))
def test_krum_scores_of_arbitrary_values_agree_with_direct_differences(drawn: tuple[list[np.ndarray], list[int]], byzantine: int) -> None:
    arrays, _ = drawn
    byzantine = min(byzantine, (len(arrays) - 3) // 2)
    with tempfile.TemporaryDirectory() as directory:
        paths = write_results(directory, arrays)
        backend = RobustBackend("krum", byzantine=byzantine, memory_budget_bytes=64)
        aggregate(backend, directory, paths)
    scores, _ = reference_krum(as_matrix(arrays), byzantine)
    got = np.array(backend.last_scores)
    scale = max(scores) or 1.0
    np.testing.assert_allclose(got, scores, rtol=1e-9, atol=1e-12 * scale)
    (chosen,) = backend.last_selection or ()
    assert scores[paths.index(chosen.removeprefix("result "))] <= min(scores) + 1e-9 * scale


def test_krum_distances_stay_accurate_far_from_the_origin(directory: str) -> None:
    """Models near one another and far from 0 (the Gram form's worst case) with a huge Byzantine result first."""
    rng = np.random.default_rng(7)
    offset = 1e6 + rng.standard_normal(500)
    honest = [offset + 1e-3 * rng.standard_normal(500) for _ in range(6)]
    arrays = [offset + 1e9, *honest]
    paths = write_results(directory, arrays)
    backend = RobustBackend("krum", byzantine=1, memory_budget_bytes=8 * 7 * 50)
    out = aggregate(backend, directory, paths)
    scores, order = reference_krum(as_matrix(arrays), 1)
    np.testing.assert_allclose(backend.last_scores or (), scores, rtol=1e-6)
    np.testing.assert_array_equal(out, arrays[order[0]])
    assert order[0] != 0


def test_identical_results_tie_to_the_first_added(directory: str) -> None:
    same = np.array([1.0, 2.0, 3.0])
    arrays = [same + 10, same, same, same, same - 10]
    paths = write_results(directory, arrays)
    backend = RobustBackend("krum", byzantine=1)
    aggregate(backend, directory, paths)
    assert backend.last_selection == (f"result {paths[1]}",)
    backend = RobustBackend("multi_krum", byzantine=1, krum_selected=2)
    aggregate(backend, directory, paths)
    assert backend.last_selection == (f"result {paths[1]}", f"result {paths[2]}")


def test_a_poisoned_result_is_not_chosen(directory: str) -> None:
    honest = [np.array([1.0, 1.0]) + 0.01 * k for k in range(4)]
    poisoned = np.array([-10.0, -10.0])
    arrays = [poisoned, *honest]
    paths = write_results(directory, arrays)
    for rule in ("krum", "multi_krum"):
        backend = RobustBackend(rule, byzantine=1)
        out = aggregate(backend, directory, paths)
        assert f"result {paths[0]}" not in (backend.last_selection or ())
        assert np.all(out > 0.9)


def test_non_finite_results_are_farthest(directory: str) -> None:
    arrays = [np.array([np.nan, 0.0]), np.array([np.inf, 1.0]), np.array([1.0, 1.0]), np.array([1.0, 2.0]), np.array([2.0, 1.0]), np.array([1.5, 1.5]), np.array([1.2, 1.1])]
    paths = write_results(directory, arrays)
    backend = RobustBackend("multi_krum", byzantine=2)
    out = aggregate(backend, directory, paths)
    assert backend.last_scores is not None
    assert backend.last_scores[:2] == (np.inf, np.inf)
    assert all(np.isfinite(backend.last_scores[2:]))
    assert set(backend.last_selection or ()) == {f"result {p}" for p in paths[2:]}
    np.testing.assert_allclose(out, np.mean(arrays[2:], axis=0))


@pytest.mark.parametrize("byzantine", [0, 1, 2, 4])
@pytest.mark.parametrize("rule", ["krum", "multi_krum"])
def test_krum_needs_2f_plus_3_results(directory: str, rule: str, byzantine: int) -> None:
    arrays = [np.array([float(k), float(-k)]) for k in range(2 * byzantine + 3)]
    paths = write_results(directory, arrays)
    backend = RobustBackend(rule, byzantine=byzantine)
    backend.reset(None)
    backend.add_results([(path, None) for path in paths[:-1]])
    destination = os.path.join(directory, "model.npy")
    with pytest.raises(BackendError) as refused:
        backend.aggregate(destination)
    message = str(refused.value)
    assert "aggregation.byzantine" in message and f"{2 * byzantine + 2} results" in message and "\n" not in message
    assert not os.path.exists(destination) and backend.results == 2 * byzantine + 2
    backend.add_result(paths[-1])
    backend.aggregate(destination)
    assert os.path.exists(destination)
    assert minimum_results(rule, byzantine) == 2 * byzantine + 3


@pytest.mark.parametrize("n", [1, 2])
def test_krum_without_byzantine_still_needs_three_results(directory: str, n: int) -> None:
    backend = RobustBackend("krum", byzantine=0)
    backend.reset(None)
    backend.add_results([(path, None) for path in write_results(directory, [np.ones(2)] * n)])
    with pytest.raises(BackendError, match=rf"{n} results?, aggregation.byzantine: 0 needs at least 3"):
        backend.aggregate(os.path.join(directory, "model.npy"))


def test_multi_krum_selected_at_most_n_minus_f(directory: str) -> None:
    arrays = [np.array([float(k)]) for k in (0, 1, 2, 3, 50)]
    paths = write_results(directory, arrays)
    out = aggregate(RobustBackend("multi_krum", byzantine=1, krum_selected=4), directory, paths)
    np.testing.assert_array_equal(out, [1.5])
    default = aggregate(RobustBackend("multi_krum", byzantine=1, krum_selected=0), directory, paths)
    np.testing.assert_array_equal(default, [1.5])
    backend = RobustBackend("multi_krum", byzantine=1, krum_selected=5)
    with pytest.raises(BackendError, match=r"aggregation\.krum_selected: 5 exceeds n - byzantine = 4 \(5 results"):
        aggregate(backend, directory, paths)
    assert minimum_results("multi_krum", 1, 5) == 6


# --------------------------------------------------------------------------
# Chunks, refusals, memory


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_many_small_chunks_give_the_same_file_as_one(directory: str, rule: str) -> None:
    rng = np.random.default_rng(3)
    arrays = [rng.integers(-20, 20, size=(7, 9)).astype(np.float32) / 4 for _ in range(9)]
    arrays[4] = arrays[2].copy()
    paths = write_results(directory, arrays)
    outputs = {
        budget: aggregate_file(RobustBackend(rule, trim_fraction=0.2, byzantine=2, krum_selected=3, memory_budget_bytes=budget), directory, paths)
        for budget in (8, 8 * 10 * 3, 8 * 10 * 17, 1 << 20)
    }
    assert len(set(outputs.values())) == 1


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_a_result_of_another_shape_changes_nothing(directory: str, rule: str) -> None:
    arrays = [np.array([1.0, 2.0, 3.0]) * k for k in (1, 2, 3, 4)]
    paths = write_results(directory, arrays)
    odd = os.path.join(directory, "odd.result")
    Path(odd).write_bytes(encode_local_result(5, np.zeros(4)))
    backend = RobustBackend(rule, byzantine=0)
    before = aggregate(backend, directory, paths)
    with pytest.raises(BackendError, match="shape"):
        backend.add_result(odd)
    assert backend.results == len(arrays)
    destination = os.path.join(directory, "again.npy")
    backend.aggregate(destination)
    np.testing.assert_array_equal(np.load(destination), before)


def test_no_results_is_refused(directory: str) -> None:
    backend = RobustBackend("median")
    backend.reset(None)
    with pytest.raises(BackendError, match="no results"):
        backend.aggregate(os.path.join(directory, "model.npy"))


def test_reset_forgets_the_round(directory: str) -> None:
    arrays = [np.array([float(k)]) for k in range(3)]
    backend = RobustBackend("krum", byzantine=0)
    aggregate(backend, directory, write_results(directory, arrays))
    assert backend.last_selection is not None
    backend.reset(None)
    assert backend.results == 0 and backend.last_selection is None and backend.last_scores is None
    assert isinstance(backend, AggregationBackend)


@pytest.mark.parametrize("rule", ROBUST_RULES)
def test_memory_stays_bounded_by_the_budget(directory: str, rule: str) -> None:
    n, m = 12, 20_000
    rng = np.random.default_rng(5)
    paths = write_results(directory, [rng.standard_normal(m) for _ in range(n)])
    backend = RobustBackend(rule, byzantine=2, memory_budget_bytes=32 << 10)
    backend.reset(None)
    backend.add_results([(path, None) for path in paths])
    tracemalloc.start()
    try:
        backend.aggregate(os.path.join(directory, "model.npy"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * (32 << 10), peak  # the budget's matrix, a raw read buffer, the head sorted for Krum
    assert peak < n * m * 8 / 10, peak  # 1.9 MB of results: well under a tenth held at once


# --------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize(
    ("rule", "trim_fraction", "byzantine", "krum_selected", "key"),
    [
        ("trimmed_mean", 0.5, 1, 0, "aggregation.trim_fraction"),
        ("trimmed_mean", -0.01, 1, 0, "aggregation.trim_fraction"),
        ("trimmed_mean", float("nan"), 1, 0, "aggregation.trim_fraction"),
        ("trimmed_mean", "0.1", 1, 0, "aggregation.trim_fraction"),
        ("trimmed_mean", True, 1, 0, "aggregation.trim_fraction"),
        ("krum", 0.1, -1, 0, "aggregation.byzantine"),
        ("krum", 0.1, 1.5, 0, "aggregation.byzantine"),
        ("multi_krum", 0.1, True, 0, "aggregation.byzantine"),
        ("multi_krum", 0.1, 1, -2, "aggregation.krum_selected"),
        ("multi_krum", 0.1, 1, 2.0, "aggregation.krum_selected"),
        ("mean", 0.1, 1, 0, "aggregation.strategy"),
    ],
)
def test_bad_parameters_are_named_in_one_line(rule: str, trim_fraction: object, byzantine: object, krum_selected: object, key: str) -> None:
    problem = robust_parameter_problem(rule, trim_fraction, byzantine, krum_selected)
    assert problem is not None and problem.startswith(f"{key}: ") and "\n" not in problem
    with pytest.raises(ValueError) as refused:
        RobustBackend(rule, trim_fraction=trim_fraction, byzantine=byzantine, krum_selected=krum_selected)  # type: ignore[arg-type]
    assert str(refused.value) == problem


@pytest.mark.parametrize(
    ("rule", "trim_fraction", "byzantine", "krum_selected"),
    [
        ("median", 7.0, -1, -1),  # parameters of the other rules are not its concern
        ("trimmed_mean", 0.0, -1, -1),
        ("trimmed_mean", 0.4999, 0, 0),
        ("krum", 0.9, 0, -1),
        ("multi_krum", 0.9, 3, 0),
        ("multi_krum", 0.9, 0, 7),
    ],
)
def test_good_parameters_pass(rule: str, trim_fraction: float, byzantine: int, krum_selected: int) -> None:
    assert robust_parameter_problem(rule, trim_fraction, byzantine, krum_selected) is None
    RobustBackend(rule, trim_fraction=trim_fraction, byzantine=byzantine, krum_selected=krum_selected)


def test_trimmed_count_is_scipys_and_leaves_one_value() -> None:
    assert [trimmed_count(0.25, n) for n in range(1, 10)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert trimmed_count(0.1, 10) == 1 and trimmed_count(1 / 3, 3) == 1 and trimmed_count(1 / 3, 6) == 2
    assert all(n - 2 * trimmed_count(0.5 - 1e-16, n) >= 1 for n in range(1, 200))
