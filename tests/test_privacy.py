"""DP-FedAvg's clipped, noised average (`PrivateAverageBackend`) and the ε it spends (`PrivacyAccountant`).

The backend is checked against a numpy transcription of McMahan et al.'s
server step on the loaded arrays: updates ``x_i - g``, each scaled by
``min(1, C / ||x_i - g||)``, summed in the order added, divided by n, plus
``g``, plus ``sigma * standard_normal(size)`` with ``sigma = z * C / n``.
Given the backend's own norms, the transcription does the same float64
operations per element in the same order, so the two are equal bit for
bit, however the model is chunked; given numpy's norms (summed in another
order) they agree within a relative 1e-12.

The accountant is checked against ``dp_accounting`` called directly; those
tests skip where the package is not installed (Debian has no package of it).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from xaind.aggregator.backends import AggregationBackend, BackendError
from xaind.aggregator import privacy
from xaind.aggregator.privacy import (
    PrivacyAccountant,
    PrivacyAccountingUnavailable,
    PrivateAverageBackend,
    clip_factor,
    privacy_parameter_problem,
)
from xaind.testing.wire import read_local_result_weights, write_local_result

RTOL = 1e-12



def write_model(path: Path, weights: np.ndarray) -> str:
    np.save(path, weights, allow_pickle=False)
    return str(path)




def transcription(
    result_paths: list[str],
    global_path: str | None,
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
    norms: list[float] | None = None,
) -> np.ndarray:
    """The paper's server step on the whole arrays, in float64, cast to the output dtype at the end."""
    results = [read_local_result_weights(path) for path in result_paths]
    model = np.load(global_path) if global_path is not None else None
    dtype = model.dtype if model is not None else max((r.dtype for r in results), key=lambda d: d.itemsize)
    g = model.astype(np.float64) if model is not None else np.zeros(results[0].shape)
    updates = [r.astype(np.float64) - g for r in results]
    if norms is None:
        norms = [float(np.linalg.norm(update)) for update in updates]
    total = np.zeros(g.shape)
    for update, norm in zip(updates, norms):
        factor = 0.0 if not math.isfinite(norm) else min(1.0, clip_norm / norm) if norm > 0 else 1.0
        if factor == 0.0:
            continue
        total += update * factor if factor != 1.0 else update
    n = len(results)
    new = total / n + g
    sigma = noise_multiplier * clip_norm / n
    if sigma > 0:
        assert rng is not None
        new = new + rng.standard_normal(g.size).reshape(g.shape) * sigma
    return new.astype(dtype)


def aggregated(backend: PrivateAverageBackend, result_paths: list[str], global_path: str | None, destination: Path) -> np.ndarray:
    backend.reset(global_path)
    for path in result_paths:
        backend.add_result(path)
    backend.aggregate(str(destination))
    return np.load(destination)


@pytest.fixture
def round_files(tmp_path: Path) -> tuple[list[str], str]:
    """Five float32/float64/float16 results around a float32 global model: two updates below C = 2, three above."""
    rng = np.random.default_rng(10)
    shape = (6, 9)
    global_model = rng.normal(size=shape).astype(np.float32)
    paths = []
    for index, (scale, dtype) in enumerate([(0.05, np.float32), (0.2, np.float64), (1.0, np.float32), (3.0, ">f8"), (0.5, np.float16)]):
        weights = (global_model + rng.normal(scale=scale, size=shape)).astype(dtype)
        paths.append(write_local_result(tmp_path / f"{index}.result", 100 * (index + 1), weights))
    return paths, write_model(tmp_path / "model-3.npy", global_model)


def test_it_is_an_aggregation_backend() -> None:
    assert isinstance(PrivateAverageBackend(1.0, 1.0), AggregationBackend)


@pytest.mark.parametrize("budget", [8, 8 * 9 * 5, 1 << 20], ids=["1-element-chunks", "5-element-chunks", "one-chunk"])
def test_without_noise_it_is_the_transcription_bit_for_bit_given_its_norms(tmp_path: Path, round_files: tuple[list[str], str], budget: int) -> None:
    paths, global_path = round_files
    backend = PrivateAverageBackend(2.0, 0.0, memory_budget_bytes=budget)
    got = aggregated(backend, paths, global_path, tmp_path / "model-4.npy")
    norms = [norm.norm for norm in backend.last_norms]
    expected = transcription(paths, global_path, 2.0, 0.0, norms=norms)
    assert got.dtype == np.float32 and got.shape == (6, 9)
    assert np.array_equal(got, expected)
    # Its norms are numpy's, and with numpy's norms the model agrees within the stated tolerance.
    g = np.load(global_path).astype(np.float64)
    assert norms == pytest.approx([float(np.linalg.norm(read_local_result_weights(p).astype(np.float64) - g)) for p in paths], rel=RTOL)
    np.testing.assert_allclose(got, transcription(paths, global_path, 2.0, 0.0), rtol=1e-6)  # float32 output
    assert backend.last_clipped == sum(norm > 2.0 for norm in norms) == 3
    assert [(norm.what, norm.samples) for norm in backend.last_norms] == [(f"result {p}", 100 * (i + 1)) for i, p in enumerate(paths)]


def test_each_norm_is_measured_as_its_result_is_added_and_aggregation_reads_once_more(
    tmp_path: Path, round_files: tuple[list[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pass is spread over the round, as results come; one the adding could not measure is measured late."""
    paths, global_path = round_files
    measured: list[int] = []
    real = privacy.update_norms

    def counting(results, average_path=None, only=None):  # type: ignore[no-untyped-def]
        measured.append(len(results) if only is None else len(only))
        return real(results, average_path, only)

    monkeypatch.setattr(privacy, "update_norms", counting)
    backend = PrivateAverageBackend(2.0, 0.0)
    backend.reset(global_path)
    for path in paths:
        assert backend.add_results([(path, None)]) == [None]
    assert measured == [1] * len(paths)
    backend.aggregate(str(tmp_path / "a.npy"))
    assert measured == [1] * len(paths)  # nothing measured again

    failing = iter([BackendError("unreadable for now")])

    def failing_once(results, average_path=None, only=None):  # type: ignore[no-untyped-def]
        error = next(failing, None)
        if error is not None:
            raise error
        return real(results, average_path, only)

    monkeypatch.setattr(privacy, "update_norms", failing_once)
    backend.reset(global_path)
    assert backend.add_results([(path, None) for path in paths]) == [None] * len(paths)
    backend.aggregate(str(tmp_path / "b.npy"))
    assert (tmp_path / "a.npy").read_bytes() == (tmp_path / "b.npy").read_bytes()


def test_float64_output_agrees_with_numpys_norms_within_1e_12(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    global_model = rng.normal(size=300)
    paths = [write_local_result(tmp_path / f"{i}.result", 1, global_model + rng.normal(scale=s, size=300)) for i, s in enumerate([0.01, 0.1, 1.0])]
    global_path = write_model(tmp_path / "g.npy", global_model)
    got = aggregated(PrivateAverageBackend(1.0, 0.0, memory_budget_bytes=8 * 7 * 13), paths, global_path, tmp_path / "new.npy")
    np.testing.assert_allclose(got, transcription(paths, global_path, 1.0, 0.0), rtol=RTOL, atol=1e-15)


def test_the_first_round_clips_the_results_themselves(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    paths = [write_local_result(tmp_path / f"{i}.result", 1, rng.normal(scale=s, size=(4, 5)).astype(dt)) for i, (s, dt) in enumerate([(0.1, np.float16), (5.0, np.float32)])]
    backend = PrivateAverageBackend(1.5, 0.0, memory_budget_bytes=8 * 6 * 3)
    got = aggregated(backend, paths, None, tmp_path / "model-1.npy")
    expected = transcription(paths, None, 1.5, 0.0, norms=[norm.norm for norm in backend.last_norms])
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    assert [norm.norm for norm in backend.last_norms] == pytest.approx([float(np.linalg.norm(read_local_result_weights(p).astype(np.float64))) for p in paths], rel=RTOL)


def test_with_a_seeded_generator_the_noise_is_the_transcriptions_draws_chunk_after_chunk(tmp_path: Path, round_files: tuple[list[str], str]) -> None:
    paths, global_path = round_files
    # 5 results: 9 rows of 7 elements per chunk, so the 54 elements are drawn in 8 chunks.
    backend = PrivateAverageBackend(2.0, 1.3, rng=np.random.default_rng(2024), memory_budget_bytes=8 * 9 * 7)
    got = aggregated(backend, paths, global_path, tmp_path / "model-4.npy")
    norms = [n.norm for n in backend.last_norms]
    reference_rng = np.random.default_rng(2024)
    expected = transcription(paths, global_path, 2.0, 1.3, rng=reference_rng, norms=norms)
    assert np.array_equal(got, expected)
    assert not np.allclose(got, transcription(paths, global_path, 2.0, 0.0, norms=norms), rtol=0, atol=1e-3)
    # The next aggregation (a retry, or the next round) draws the next numbers, not the same ones again.
    backend.aggregate(str(tmp_path / "again.npy"))
    again = np.load(tmp_path / "again.npy")
    assert np.array_equal(again, transcription(paths, global_path, 2.0, 1.3, rng=reference_rng, norms=norms))
    assert not np.array_equal(again, got)


def test_the_noise_has_standard_deviation_z_c_over_n(tmp_path: Path) -> None:
    # Results equal to the global model: updates are 0, so the new model minus g is the noise alone.
    size, n, clip_norm, z = 100_000, 4, 0.5, 2.0
    global_model = np.random.default_rng(13).normal(size=size)
    global_path = write_model(tmp_path / "g.npy", global_model)
    paths = [write_local_result(tmp_path / f"{i}.result", i, global_model) for i in range(n)]
    backend = PrivateAverageBackend(clip_norm, z, rng=np.random.default_rng(14), memory_budget_bytes=8 * (n + 4) * 4096)
    first = aggregated(backend, paths, global_path, tmp_path / "a.npy") - global_model
    backend.aggregate(str(tmp_path / "b.npy"))
    second = np.load(tmp_path / "b.npy") - global_model
    sigma = z * clip_norm / n
    for noise in (first, second):
        # The sample std of 100,000 normal draws is within 1 % of sigma with probability 1 - 1e-9 or so
        # (its relative standard error is 1 / sqrt(2 * 100,000) = 0.22 %); the mean within 6 standard errors of 0.
        assert abs(noise.std() / sigma - 1) < 0.01
        assert abs(noise.mean()) < 6 * sigma / math.sqrt(size)
    # Fresh noise each time: the two draws are uncorrelated.
    assert abs(np.corrcoef(first, second)[0, 1]) < 6 / math.sqrt(size)
    assert backend.last_clipped == 0 and [norm.norm for norm in backend.last_norms] == [0.0] * n


def test_the_default_generator_is_seeded_afresh_not_fixed(tmp_path: Path) -> None:
    global_path = write_model(tmp_path / "g.npy", np.zeros(64))
    path = write_local_result(tmp_path / "r.result", 1, np.zeros(64))
    outputs = [aggregated(PrivateAverageBackend(1.0, 1.0), [path], global_path, tmp_path / f"{i}.npy") for i in range(2)]
    assert not np.array_equal(outputs[0], outputs[1])
    assert all(np.count_nonzero(output) == 64 for output in outputs)


@pytest.mark.parametrize(
    ("update_norm", "expected_norm"),
    [(0.0, 0.0), (0.25, 0.25), (1.0, 1.0), (1.5, 1.0), (40.0, 1.0)],
)
def test_clipping_scales_only_updates_above_the_clip_norm(tmp_path: Path, update_norm: float, expected_norm: float) -> None:
    direction = np.array([3.0, -4.0, 0.0, 12.0]) / 13.0  # unit length
    global_model = np.array([1.0, 2.0, -3.0, 0.5])
    global_path = write_model(tmp_path / "g.npy", global_model)
    path = write_local_result(tmp_path / "r.result", 7, global_model + update_norm * direction)
    backend = PrivateAverageBackend(1.0, 0.0)
    update = aggregated(backend, [path], global_path, tmp_path / "new.npy") - global_model
    assert np.linalg.norm(update) == pytest.approx(expected_norm, rel=1e-12, abs=1e-15)
    if update_norm > 0:
        np.testing.assert_allclose(update / np.linalg.norm(update), direction, rtol=1e-12, atol=1e-15)
    assert backend.last_clipped == (1 if update_norm > 1.0 else 0)
    assert clip_factor(update_norm, 1.0) == (1.0 if update_norm <= 1.0 else 1.0 / update_norm)


def test_an_update_with_non_finite_weights_adds_nothing_but_counts_in_n(tmp_path: Path) -> None:
    global_path = write_model(tmp_path / "g.npy", np.zeros(3))
    paths = [
        write_local_result(tmp_path / "ok.result", 1, np.array([0.3, 0.0, 0.0])),
        write_local_result(tmp_path / "nan.result", 1, np.array([np.nan, 0.0, 0.0])),
        write_local_result(tmp_path / "inf.result", 1, np.array([0.0, np.inf, 0.0])),
    ]
    backend = PrivateAverageBackend(1.0, 0.0)
    got = aggregated(backend, paths, global_path, tmp_path / "new.npy")
    assert np.array_equal(got, np.array([0.3 / 3, 0.0, 0.0]))
    assert backend.last_clipped == 2


def test_equal_weights_whatever_the_sample_counts(tmp_path: Path) -> None:
    paths = [write_local_result(tmp_path / "a.result", 1, np.array([0.5, 0.0])), write_local_result(tmp_path / "b.result", 1000, np.array([0.0, 0.5]))]
    got = aggregated(PrivateAverageBackend(1.0, 0.0), paths, write_model(tmp_path / "g.npy", np.zeros(2)), tmp_path / "new.npy")
    assert np.array_equal(got, np.array([0.25, 0.25]))


def test_aggregate_changes_nothing_and_reset_starts_over(tmp_path: Path, round_files: tuple[list[str], str]) -> None:
    paths, global_path = round_files
    backend = PrivateAverageBackend(2.0, 0.0, memory_budget_bytes=8 * 9 * 5)
    first = aggregated(backend, paths, global_path, tmp_path / "a.npy")
    backend.aggregate(str(tmp_path / "b.npy"))
    assert np.array_equal(np.load(tmp_path / "b.npy"), first) and backend.results == 5
    backend.reset(None)
    assert backend.results == 0
    with pytest.raises(BackendError, match="^cannot aggregate: no results were added this round$"):
        backend.aggregate(str(tmp_path / "c.npy"))
    assert not (tmp_path / "c.npy").exists()


def test_a_result_of_another_shape_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    global_path = write_model(tmp_path / "g.npy", np.zeros(4))
    good = write_local_result(tmp_path / "good.result", 1, np.ones(4))
    bad = write_local_result(tmp_path / "bad.result", 1, np.ones(5))
    backend = PrivateAverageBackend(10.0, 0.0)
    backend.reset(global_path)
    assert [type(refusal) for refusal in backend.add_results([(good, None), (bad, None)])] == [type(None), BackendError]
    with pytest.raises(BackendError, match=r"bad\.result: shape \(5,\) differs from the global model's \(4,\)"):
        backend.add_result(bad)
    backend.aggregate(str(tmp_path / "new.npy"))
    assert np.array_equal(np.load(tmp_path / "new.npy"), np.ones(4)) and backend.results == 1
    backend.close()


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ((1.0, 1.1, 1e-5, 0.1), None),
        ((1.0, 0, 1e-5, 1), None),
        ((-1, 1.0, 1e-5, 1.0), "clip_norm must be > 0, got -1"),
        ((0.0, 1.0, 1e-5, 1.0), "clip_norm must be > 0, got 0.0"),
        ((math.inf, 1.0, 1e-5, 1.0), "clip_norm must be > 0, got inf"),
        (("1", 1.0, 1e-5, 1.0), "clip_norm must be a number > 0, got '1'"),
        ((1.0, -0.5, 1e-5, 1.0), "noise_multiplier must be >= 0, got -0.5"),
        ((1.0, True, 1e-5, 1.0), "noise_multiplier must be a number >= 0, got True"),
        ((1.0, 1.0, 0, 1.0), "delta must be in (0, 1), got 0"),
        ((1.0, 1.0, 1.0, 1.0), "delta must be in (0, 1), got 1.0"),
        ((1.0, 1.0, 1e-5, 0.0), "sampling_rate must be in (0, 1], got 0.0"),
        ((1.0, 1.0, 1e-5, 1.5), "sampling_rate must be in (0, 1], got 1.5"),
        ((1.0, 1.0, 1e-5, math.nan), "sampling_rate must be in (0, 1], got nan"),
    ],
)
def test_privacy_parameter_problem_names_the_key_in_one_line(arguments: tuple, problem: str | None) -> None:
    assert privacy_parameter_problem(*arguments) == problem


def test_bad_parameters_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"^clip_norm must be > 0, got -1$"):
        PrivateAverageBackend(-1, 1.0)
    with pytest.raises(ValueError, match=r"^delta must be in \(0, 1\), got 2$"):
        PrivacyAccountant(1.0, 1.0, 2)


# -- the accountant ------------------------------------------------------------------------------


def direct_epsilon(noise_multiplier: float, sampling_rate: float, delta: float, rounds: int) -> float:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)), rounds
        )
    )
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    ("noise_multiplier", "sampling_rate", "delta"),
    [(1.0, 1.0, 1e-5), (1.1, 0.1, 1e-5), (0.7, 0.02, 1e-6), (4.0, 0.5, 1e-3)],
)
def test_epsilon_is_dp_accountings_for_the_same_parameters(noise_multiplier: float, sampling_rate: float, delta: float) -> None:
    pytest.importorskip("dp_accounting")
    accountant = PrivacyAccountant(noise_multiplier, sampling_rate, delta)
    for rounds in (1, 5, 50):
        assert accountant.epsilon(rounds) == direct_epsilon(noise_multiplier, sampling_rate, delta, rounds)


def test_epsilon_grows_with_the_rounds_from_0() -> None:
    pytest.importorskip("dp_accounting")
    accountant = PrivacyAccountant(1.1, 0.1, 1e-5)
    epsilons = [accountant.epsilon(rounds) for rounds in (0, 1, 2, 5, 10, 100, 1000)]
    assert epsilons[0] == 0.0
    assert all(earlier < later for earlier, later in zip(epsilons, epsilons[1:]))
    assert all(math.isfinite(epsilon) for epsilon in epsilons)


def test_without_noise_epsilon_is_infinite() -> None:
    pytest.importorskip("dp_accounting")
    assert PrivacyAccountant(0.0, 1.0, 1e-5).epsilon(1) == math.inf


def test_rounds_must_be_a_count() -> None:
    accountant = PrivacyAccountant(1.0, 1.0, 1e-5)
    for rounds in (-1, 1.5, True):
        with pytest.raises(ValueError, match="^rounds must be an int >= 0"):
            accountant.epsilon(rounds)  # type: ignore[arg-type]


def test_without_dp_accounting_epsilon_says_how_to_install_it_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    accountant = PrivacyAccountant(1.0, 1.0, 1e-5)
    assert accountant.epsilon(0) == 0.0  # nothing spent needs no package
    with pytest.raises(PrivacyAccountingUnavailable) as caught:
        accountant.epsilon(3)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("differential privacy accounting needs the dp-accounting package (")
    assert message.endswith("): pip install 'xaind[dp]'")
