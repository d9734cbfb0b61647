"""`update_norms`: each result's update norm and distance to the new model, streamed, against numpy on the loaded arrays.

The reference loads every result whole (`numpy.load`), widens it to
float64 and takes `numpy.linalg.norm` of the difference. The streamed pass
sums squares chunk by chunk in another order, so the two agree within a
relative 1e-12 (tiny models: a few hundred elements, float64 totals), not
bit for bit. Small memory budgets force chunks of one to a few elements.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xaind.aggregator.backends import BackendError
from xaind.aggregator.result_set import ResultSet
from xaind.aggregator.update_norms import UpdateNorm, update_norms, update_norms_of_files
from xaind.testing.wire import read_local_result_weights, write_local_result

RTOL = 1e-12



def write_model(path: Path, weights: np.ndarray) -> str:
    np.save(path, weights, allow_pickle=False)
    return str(path)




def reference(result_paths: list[str], global_path: str | None, average_path: str | None) -> list[tuple[float, float | None]]:
    model = np.load(global_path).astype(np.float64) if global_path is not None else None
    average = np.load(average_path).astype(np.float64) if average_path is not None else None
    out = []
    for path in result_paths:
        weights = read_local_result_weights(path).astype(np.float64)
        update = weights - model if model is not None else weights
        out.append((float(np.linalg.norm(update)), None if average is None else float(np.linalg.norm(weights - average))))
    return out


def assert_matches(norms: list[UpdateNorm], expected: list[tuple[float, float | None]]) -> None:
    assert len(norms) == len(expected)
    for got, (norm, distance) in zip(norms, expected):
        assert got.norm == pytest.approx(norm, rel=RTOL, abs=1e-300)
        if distance is None:
            assert got.distance is None
        else:
            assert got.distance == pytest.approx(distance, rel=RTOL, abs=1e-300)


def holding(paths: list[str], global_path: str | None, budget: int) -> ResultSet:
    results = ResultSet(budget)
    results.reset(global_path)
    assert results.add_results([(path, None) for path in paths]) == [None] * len(paths)
    return results


@pytest.mark.parametrize("budget", [8, 8 * 7 * 3, 8 * 7 * 40, 1 << 20], ids=["1-element", "3-elements", "40-elements", "one-chunk"])
def test_norms_and_distances_equal_numpy_on_mixed_widths(tmp_path: Path, budget: int) -> None:
    rng = np.random.default_rng(1)
    shape = (7, 11)
    dtypes = [np.float16, np.float32, np.float64, ">f4"]
    paths = [
        write_local_result(tmp_path / f"{index}.result", 10 * index, rng.normal(size=shape).astype(dtype))
        for index, dtype in enumerate(dtypes)
    ]
    global_path = write_model(tmp_path / "model-0.npy", rng.normal(size=shape).astype(np.float32))
    average_path = write_model(tmp_path / "model-1.npy", rng.normal(size=shape))
    results = holding(paths, global_path, budget)
    try:
        norms = update_norms(results, average_path)
    finally:
        results.close()
    assert [(norm.what, norm.samples) for norm in norms] == [(f"result {path}", 10 * index) for index, path in enumerate(paths)]
    assert_matches(norms, reference(paths, global_path, average_path))


def test_without_a_global_model_the_update_is_the_result_itself(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    paths = [write_local_result(tmp_path / f"{index}.result", 1, rng.normal(size=50)) for index in range(3)]
    norms = update_norms_of_files(paths, None, None, memory_budget_bytes=8 * 6 * 4)
    assert_matches(norms, reference(paths, None, None))
    assert norms[0].norm == pytest.approx(float(np.linalg.norm(read_local_result_weights(paths[0]))), rel=RTOL)


def test_a_result_equal_to_the_global_model_has_norm_0_and_its_distance_to_itself_is_0(tmp_path: Path) -> None:
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write_local_result(tmp_path / "a.result", 3, weights)
    model = write_model(tmp_path / "model.npy", weights)
    (norm,) = update_norms_of_files([path], model, model, memory_budget_bytes=8)
    assert norm == UpdateNorm(f"result {path}", 3, 0.0, 0.0)


def test_fortran_order_results_and_models_line_up(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    paths = [write_local_result(tmp_path / f"{index}.result", 1, np.asfortranarray(rng.normal(size=(5, 6)))) for index in range(2)]
    global_path = write_model(tmp_path / "g.npy", np.asfortranarray(rng.normal(size=(5, 6))))
    average_path = write_model(tmp_path / "a.npy", np.asfortranarray(rng.normal(size=(5, 6))))
    norms = update_norms_of_files(paths, global_path, average_path, memory_budget_bytes=8 * 5 * 4)
    assert_matches(norms, reference(paths, global_path, average_path))


def test_a_model_in_the_other_memory_order_is_refused_in_one_line(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    paths = [write_local_result(tmp_path / "c.result", 1, rng.normal(size=(5, 6)))]
    average_path = write_model(tmp_path / "a.npy", np.asfortranarray(rng.normal(size=(5, 6))))
    with pytest.raises(BackendError, match=r"^new model .*a\.npy: stored in Fortran order, this round's results in the other one") as caught:
        update_norms_of_files(paths, None, average_path)
    assert "\n" not in str(caught.value)


def test_a_new_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    paths = [write_local_result(tmp_path / "c.result", 1, np.zeros(6))]
    average_path = write_model(tmp_path / "a.npy", np.zeros(7))
    with pytest.raises(BackendError, match=r"shape \(7,\) differs from this round's results' \(6,\)"):
        update_norms_of_files(paths, None, average_path)


def test_a_result_the_set_refuses_raises_its_refusal(tmp_path: Path) -> None:
    paths = [write_local_result(tmp_path / "a.result", 1, np.zeros(6)), write_local_result(tmp_path / "b.result", 1, np.zeros(5))]
    with pytest.raises(BackendError, match=r"b\.result: shape \(5,\) differs"):
        update_norms_of_files(paths, None, None)


def test_no_results_no_norms() -> None:
    results = ResultSet()
    assert update_norms(results) == []


def test_non_finite_weights_give_non_finite_norms(tmp_path: Path) -> None:
    paths = [
        write_local_result(tmp_path / "inf.result", 1, np.array([1.0, np.inf, 2.0])),
        write_local_result(tmp_path / "nan.result", 1, np.array([1.0, np.nan, 2.0])),
        write_local_result(tmp_path / "ok.result", 1, np.array([3.0, 0.0, 4.0])),
    ]
    norms = update_norms_of_files(paths, None, None, memory_budget_bytes=8)
    assert norms[0].norm == np.inf and np.isnan(norms[1].norm) and norms[2].norm == 5.0


@settings(max_examples=60, deadline=None)
@given(
    participants=st.integers(1, 5),
    size=st.integers(1, 40),
    chunk=st.integers(1, 50),
    with_model=st.booleans(),
    with_average=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_chunking_gives_numpy_norms(
    tmp_path_factory: pytest.TempPathFactory, participants: int, size: int, chunk: int, with_model: bool, with_average: bool, seed: int
) -> None:
    directory = tmp_path_factory.mktemp("norms")
    rng = np.random.default_rng(seed)
    paths = [write_local_result(directory / f"{index}.result", index, rng.normal(scale=10.0, size=size).astype(np.float32)) for index in range(participants)]
    global_path = write_model(directory / "g.npy", rng.normal(size=size)) if with_model else None
    average_path = write_model(directory / "a.npy", rng.normal(size=size).astype(np.float16)) if with_average else None
    norms = update_norms_of_files(paths, global_path, average_path, memory_budget_bytes=8 * (participants + 3) * chunk)
    assert_matches(norms, reference(paths, global_path, average_path))
