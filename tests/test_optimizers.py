"""Server optimizers against a plain numpy transcription of their papers, their state on disk, their settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from xaind.aggregator.backends import BackendError, WeightedAverageBackend
from xaind.aggregator.optimizers import OPTIMIZER_STATE, OptimizerParameters, ServerOptimizerBackend, state_path
from xaind.aggregator.settings import AggregationSettings, AggregatorDaemonSettings
from xaind.aggregator.store import ModelStore
from xaind.aggregator.strategies import build_backend
from xaind.config import ConfigError
from xaind.testing.wire import encode_local_result

RULES = {
    "fedavg": OptimizerParameters("fedavg", learning_rate=0.7),
    "fedavgm": OptimizerParameters("fedavgm", learning_rate=0.5, momentum=0.8),
    "fedadagrad": OptimizerParameters("fedadagrad", learning_rate=0.1, beta_1=0.85, tau=0.02),
    "fedyogi": OptimizerParameters("fedyogi", learning_rate=0.1, beta_1=0.9, beta_2=0.95, tau=0.01),
    "fedadam": OptimizerParameters("fedadam", learning_rate=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
}


class Transcription:
    """The update rules as Reddi et al. (ICLR 2021, Algorithm 2) and Hsu et al. (FedAvgM) write them, in float64."""

    def __init__(self, p: OptimizerParameters, size: int) -> None:
        self.p = p
        self.m = np.zeros(size)
        self.v = np.full(size, p.tau**2)

    def step(self, x: np.ndarray, average: np.ndarray) -> np.ndarray:
        p, d = self.p, average - x
        if p.rule == "fedavg":
            return x + p.learning_rate * d
        if p.rule == "fedavgm":
            self.m = p.momentum * self.m + d
            return x + p.learning_rate * self.m
        self.m = p.beta_1 * self.m + (1 - p.beta_1) * d
        if p.rule == "fedadagrad":
            self.v = self.v + d**2
        elif p.rule == "fedyogi":
            self.v = self.v - (1 - p.beta_2) * d**2 * np.sign(self.v - d**2)
        else:
            self.v = p.beta_2 * self.v + (1 - p.beta_2) * d**2
        return x + p.learning_rate * self.m / (np.sqrt(self.v) + p.tau)


def write_results(directory: Path, round_number: int, results: list[tuple[int, np.ndarray]]) -> list[str]:
    paths = []
    for index, (samples, weights) in enumerate(results):
        path = directory / f"result-{round_number}-{index}"
        path.write_bytes(encode_local_result(samples, weights))
        paths.append(str(path))
    return paths


def run_rounds(
    tmp_path: Path, parameters: OptimizerParameters, rounds: int, initial: np.ndarray | None, chunk_elements: int, seed: int = 5
) -> tuple[list[np.ndarray], list[np.ndarray], ModelStore]:
    """`rounds` aggregations through the store, as the daemon runs them; every model, and the transcription's."""
    rng = np.random.default_rng(seed)
    store = ModelStore(str(tmp_path / "state"))
    store.load()
    model_path = None
    if initial is not None:
        produced = store.new_model_path(0)
        np.save(produced.removesuffix(".npy.tmp") + ".npy", initial)
        os.replace(produced.removesuffix(".npy.tmp") + ".npy", produced)
        model_path = store.install_model(produced, 0).path
    backend = ServerOptimizerBackend(WeightedAverageBackend(), parameters, chunk_elements=chunk_elements)
    transcription = Transcription(parameters, 11)
    x = initial
    got, expected = [], []
    for round_number in range(rounds):
        base = np.zeros(11, np.float32) if x is None else x
        results = [(int(rng.integers(1, 50)), (base + rng.normal(0, 1, 11)).astype(dtype)) for dtype in ("<f4", ">f4", "<f8")]
        backend.reset(model_path)
        assert backend.add_results([(path, None) for path in write_results(tmp_path, round_number, results)]) == [None] * 3
        produced = store.new_model_path(round_number + 1)
        backend.aggregate(produced)
        model_path = store.install_model(produced, round_number + 1).path
        store.remove_superseded(round_number + 1)
        total = sum(samples for samples, _ in results)
        average = sum(samples * weights.astype(np.float64) for samples, weights in results) / total
        if x is None:  # no model to step from: the average, state untouched
            x = average.astype(np.float64 if initial is None else initial.dtype)
        else:
            x = transcription.step(x.astype(np.float64), average).astype(x.dtype)
        expected.append(x)
        got.append(np.load(model_path))
    for name in OPTIMIZER_STATE[parameters.rule]:
        if initial is None and rounds == 1:
            continue
        np.testing.assert_allclose(np.load(state_path(model_path, name)), getattr(transcription, name), rtol=1e-12, atol=1e-300)
    return got, expected, store


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("initial_dtype", [None, "<f4", ">f8"])
def test_each_rule_follows_its_transcription_over_several_rounds(tmp_path: Path, rule: str, initial_dtype: str | None) -> None:
    """Tolerance: the model within 2 ulp of its dtype, the state files within 1e-12 (both computed in float64)."""
    initial = None if initial_dtype is None else np.linspace(-1, 1, 11).astype(initial_dtype)
    got, expected, _ = run_rounds(tmp_path, RULES[rule], 4, initial, chunk_elements=4)
    for round_number, (model, reference) in enumerate(zip(got, expected)):
        assert model.dtype == reference.dtype and model.shape == (11,)
        np.testing.assert_allclose(model, reference, rtol=2 * np.finfo(model.dtype).eps, atol=1e-300, err_msg=f"round {round_number}")


@pytest.mark.parametrize("rule", ["fedavgm", "fedyogi"])
def test_the_chunk_size_changes_no_bit(tmp_path: Path, rule: str) -> None:
    initial = np.linspace(-1, 1, 11).astype("<f4")
    outputs = [run_rounds(tmp_path / str(chunk), RULES[rule], 3, initial, chunk)[0] for chunk in (1, 3, 1 << 20)]
    for models in zip(*outputs):
        assert models[0].tobytes() == models[1].tobytes() == models[2].tobytes()


def test_the_state_is_installed_with_the_model_and_leaves_with_it(tmp_path: Path) -> None:
    _, _, store = run_rounds(tmp_path, RULES["fedadam"], 3, np.zeros(11, "<f4"), chunk_elements=5)
    names = sorted(os.listdir(store.state_dir))
    assert names == ["aggregator.json", "model-3.m.npy", "model-3.npy", "model-3.v.npy"] + [n for n in names if n.startswith("round-")]
    assert json.loads(Path(store.state_path).read_text())["model_file"] == "model-3.npy"


def test_an_aggregation_not_installed_leaves_the_committed_model_and_state(tmp_path: Path) -> None:
    """A SIGKILL after the new model and state are written but before the commit point."""
    _, _, store = run_rounds(tmp_path, RULES["fedadam"], 2, np.zeros(11, "<f4"), chunk_elements=5)
    before = {name: (Path(store.state_dir) / name).read_bytes() for name in ("model-2.npy", "model-2.m.npy", "model-2.v.npy")}
    backend = ServerOptimizerBackend(WeightedAverageBackend(), RULES["fedadam"])
    backend.reset(str(Path(store.state_dir) / "model-2.npy"))
    backend.add_results([(path, None) for path in write_results(tmp_path, 9, [(1, np.ones(11, "<f4"))])])
    backend.aggregate(store.new_model_path(3))  # written, never installed
    assert store.load().path == str(Path(store.state_dir) / "model-2.npy")
    for name, data in before.items():
        assert (Path(store.state_dir) / name).read_bytes() == data


def test_a_model_without_state_starts_it_afresh_and_a_wrong_state_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model-4.npy"
    np.save(model, np.zeros(3, "<f4"))
    result = write_results(tmp_path, 0, [(1, np.ones(3, "<f4"))])
    backend = ServerOptimizerBackend(WeightedAverageBackend(), RULES["fedadam"])
    backend.reset(str(model))
    backend.add_results([(result[0], None)])
    backend.aggregate(str(tmp_path / "model-5.npy.tmp"))
    transcription = Transcription(RULES["fedadam"], 3)
    expected = transcription.step(np.zeros(3), np.ones(3)).astype("<f4")
    np.testing.assert_array_equal(np.load(tmp_path / "model-5.npy.tmp"), expected)
    np.testing.assert_allclose(np.load(tmp_path / "model-5.v.npy.tmp"), transcription.v, rtol=1e-12)

    np.save(tmp_path / "model-4.m.npy", np.zeros(4))  # of another size
    with pytest.raises(BackendError, match=r"model-4\.m\.npy: float64 of shape \(4,\)"):
        backend.aggregate(str(tmp_path / "model-5.npy.tmp"))


def test_state_paths_follow_the_model_file() -> None:
    assert state_path("/s/model-7.npy", "m") == "/s/model-7.m.npy"
    assert state_path("/s/model-7.npy.tmp", "v") == "/s/model-7.v.npy.tmp"
    with pytest.raises(ValueError):
        state_path("/s/model-7", "m")


def test_fedavg_at_learning_rate_one_is_the_weighted_average_itself() -> None:
    assert type(build_backend(AggregationSettings())) is WeightedAverageBackend
    assert type(build_backend(AggregationSettings(server_learning_rate=1.0))) is WeightedAverageBackend
    stepped = build_backend(AggregationSettings(server_learning_rate=0.5))
    assert isinstance(stepped, ServerOptimizerBackend) and stepped.parameters.learning_rate == 0.5
    adam = build_backend(AggregationSettings(strategy="fedadam"))
    assert isinstance(adam, ServerOptimizerBackend)
    assert (adam.parameters.rule, adam.parameters.learning_rate, adam.parameters.tau) == ("fedadam", 0.1, 1e-3)


def load_aggregation(section: dict) -> AggregationSettings:
    return AggregatorDaemonSettings.from_mapping({"development": True, "aggregation": section}).aggregation


def test_strategy_parameters_are_read() -> None:
    settings = load_aggregation(
        {"strategy": "fedyogi", "server_learning_rate": 0.03, "beta_1": 0.5, "beta_2": 0.9, "tau": 0.1}
    )
    assert (settings.strategy, settings.learning_rate, settings.beta_1, settings.beta_2, settings.tau) == ("fedyogi", 0.03, 0.5, 0.9, 0.1)
    assert load_aggregation({"strategy": "fedavgm"}).learning_rate == 1.0
    assert load_aggregation({"strategy": "multi_krum", "byzantine": 2, "krum_selected": 3}).krum_selected == 3
    private = load_aggregation({"differential_privacy": {"enabled": True, "clip_norm": 2, "sampling_rate": 0.1}}).privacy
    assert private is not None and (private.clip_norm, private.sampling_rate, private.delta) == (2.0, 0.1, 1e-5)
    assert load_aggregation({"differential_privacy": {"enabled": False, "clip_norm": 2}}).privacy is None


@pytest.mark.parametrize(
    ("section", "line"),
    [
        ({"strategy": "fedsgd"}, "aggregation.strategy: must be one of fedavg, fedavgm, fedadam, fedyogi, fedadagrad, median, trimmed_mean, krum, multi_krum, got a string ('fedsgd')"),
        ({"strategy": "fedadam", "server_learning_rate": 0}, "aggregation.server_learning_rate: must be greater than 0, got 0"),
        ({"strategy": "fedavgm", "server_momentum": 1}, "aggregation.server_momentum: must be in [0, 1), got 1"),
        ({"strategy": "fedadam", "beta_1": -0.1}, "aggregation.beta_1: must be in [0, 1), got -0.1"),
        ({"strategy": "fedyogi", "beta_2": 1.5}, "aggregation.beta_2: must be in [0, 1), got 1.5"),
        ({"strategy": "fedadagrad", "tau": 0}, "aggregation.tau: must be greater than 0, got 0"),
        ({"strategy": "trimmed_mean", "trim_fraction": 0.5}, "aggregation.trim_fraction: must be in [0, 0.5), got 0.5"),
        ({"strategy": "krum", "byzantine": -1}, "aggregation.byzantine: must be at least 0, got -1"),
        ({"strategy": "multi_krum", "krum_selected": 1.5}, "aggregation.krum_selected: must be a whole number, got a number (1.5)"),
        ({"strategy": "median", "server_momentum": 0.9}, "aggregation.server_momentum: not used by strategy median (only by fedavgm)"),
        ({"strategy": "fedadam", "byzantine": 1}, "aggregation.byzantine: not used by strategy fedadam (only by krum, multi_krum)"),
        ({"strategy": "krum", "differential_privacy": {"enabled": True}}, "aggregation.differential_privacy: not used by strategy krum (only by fedavg, fedavgm, fedadam, fedyogi, fedadagrad)"),
        ({"differential_privacy": {"enabled": True, "clip_norm": 0}}, "aggregation.differential_privacy.clip_norm: must be greater than 0, got 0"),
        ({"differential_privacy": {"enabled": True, "noise_multiplier": -1}}, "aggregation.differential_privacy.noise_multiplier: must be at least 0, got -1"),
        ({"differential_privacy": {"enabled": True, "delta": 1}}, "aggregation.differential_privacy.delta: must be in (0, 1), got 1"),
        ({"differential_privacy": {"enabled": True, "sampling_rate": 0}}, "aggregation.differential_privacy.sampling_rate: must be in (0, 1], got 0"),
        ({"differential_privacy": {"clip_norms": 1}}, "aggregation.differential_privacy.clip_norms: unknown key"),
        (
            {"backend": "python", "module": "m", "class": "C", "strategy": "fedadam"},
            "aggregation.strategy: backend python aggregates with its own class: only strategy fedavg, without "
            "server_learning_rate or differential_privacy, goes with it",
        ),
    ],
)
def test_a_bad_strategy_parameter_is_one_line_naming_the_key(section: dict, line: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_aggregation(section)
    assert str(caught.value) == f"config error: {line}"
