"""Strategies on the real daemons: a server optimizer's state survives SIGKILLs of the aggregator.

The participants are `xaind.sdk` ones in this process (test_sdk's
`AddingParticipant`: global model + a step of its own), so every result is
a function of the model it started from: a training interrupted by crashes
must end with the model of an uninterrupted one, bit for bit, only if the
optimizer's moments were neither lost nor applied twice.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import threads

from test_sdk import (
    SHAPE,
    STEP_TIMEOUT,
    AddingParticipant,
    Gate,
    all_finished,
    federation,
    participants_stopped_at_exit,
    sleep,
    start,
)
from xaind.recent_problems import shortened
from xaind.testing.waiting import wait_until
from xaind.tools.daemons import Federation, get_json

ROUNDS = 5
FEDADAM = {"strategy": "fedadam", "server_learning_rate": 0.25, "tau": 0.01}


async def fedadam_training(directory: Path, interrupted: bool) -> tuple[np.ndarray, list[str]]:
    """ROUNDS rounds of two participants; with `interrupted`, the aggregator is SIGKILLed twice.

    First mid-round 2: A delivered, B held in its training until the aggregator is back.
    Then as soon as both delivered round 3: while the round is aggregated, or just after.
    """
    gate = Gate({2}, {"B"}) if interrupted else None
    with federation(directory, rounds=ROUNDS, min_clients=2, aggregation=FEDADAM) as fed:
        async with participants_stopped_at_exit() as runnings:
            a = AddingParticipant("A", step=1.0, samples=10)
            b = AddingParticipant("B", step=-0.5, samples=30, gate=None if gate is None else gate.for_participant("B"))
            runnings += [start(a, fed.http_url), start(b, fed.http_url)]
            if gate is not None:
                await wait_until(lambda: 2 in a.delivered_rounds() and b.training_now == 1, STEP_TIMEOUT, "A's result of round 2")
                await threads.deferToThread(fed.aggregator.kill)
                await threads.deferToThread(fed.restart_aggregator)
                gate.opened.set()
                await wait_until(lambda: all(3 in p.delivered_rounds() for p in (a, b)), STEP_TIMEOUT, "round 3's results")
                await threads.deferToThread(fed.aggregator.kill)
                await threads.deferToThread(fed.restart_aggregator)
            await all_finished(runnings, timeout=3 * STEP_TIMEOUT)
        logs = fed.aggregator.log_text
        return fed.model(ROUNDS), [line for line in logs.splitlines() if "starts afresh" in line]


@pytest_twisted.ensureDeferred
async def test_fedadam_killed_twice_ends_with_the_model_of_an_uninterrupted_training(tmp_path: Path) -> None:
    uninterrupted, _ = await fedadam_training(tmp_path / "uninterrupted", interrupted=False)
    interrupted, afresh = await fedadam_training(tmp_path / "interrupted", interrupted=True)
    assert afresh == [], afresh
    assert uninterrupted.dtype == interrupted.dtype == np.float32
    assert uninterrupted.tobytes() == interrupted.tobytes(), (uninterrupted, interrupted)
    np.testing.assert_allclose(uninterrupted, fedadam_transcription(), rtol=2 * np.finfo(np.float32).eps, atol=0)


def fedadam_transcription() -> np.ndarray:
    """Reddi et al.'s Algorithm 2 (Adam, no bias correction, v starting at tau**2) over these participants."""
    lr, beta_1, beta_2, tau = FEDADAM["server_learning_rate"], 0.9, 0.99, FEDADAM["tau"]
    x: np.ndarray | None = None
    m, v = 0.0, tau**2
    for _ in range(ROUNDS):
        a = np.full(SHAPE, 1.0, np.float32) if x is None else x + np.float32(1.0)
        b = np.full(SHAPE, -0.5, np.float32) if x is None else x + np.float32(-0.5)
        average = (10 * a.astype(np.float64) + 30 * b.astype(np.float64)) / 40
        if x is None:
            x = average.astype(np.float32)  # no model to step from: the first round installs the average
            continue
        d = average - x.astype(np.float64)
        m = beta_1 * m + (1 - beta_1) * d
        v = beta_2 * v + (1 - beta_2) * d * d
        x = (x.astype(np.float64) + lr * m / (np.sqrt(v) + tau)).astype(np.float32)
    assert x is not None
    return x


def aggregator_status(fed: Federation) -> dict[str, Any]:
    code, answer = get_json(f"{fed.aggregator_url}/status", 5.0)
    assert code == 200, answer
    return answer


async def wait_for_report(fed: Federation, round_number: int) -> dict[str, Any]:
    """The aggregator's /status once it reports round `round_number` (reports follow the model: no wait on them)."""

    async def reported() -> dict[str, Any] | None:
        status = await threads.deferToThread(aggregator_status, fed)
        report = status["last_aggregation"]
        return status if report is not None and report["round"] == round_number else None

    deadline = time.monotonic() + STEP_TIMEOUT
    while (status := await reported()) is None:
        assert time.monotonic() < deadline, f"no report of round {round_number}: {await threads.deferToThread(aggregator_status, fed)}"
        await sleep(0.05)
    return status


@pytest_twisted.ensureDeferred
async def test_the_median_outvotes_a_poisoned_update_and_the_status_names_it(tmp_path: Path) -> None:
    """Two honest participants step +1 and +1.5 a round, a poisoned one -100: the median steps +1 exactly."""
    rounds = 3
    with federation(tmp_path, rounds=rounds, min_clients=3, aggregation={"strategy": "median"}) as fed:
        async with participants_stopped_at_exit() as runnings:
            honest = [AddingParticipant("A", step=1.0, samples=10), AddingParticipant("B", step=1.5, samples=10)]
            poisoned = AddingParticipant("C", step=-100.0, samples=1000)
            runnings += [start(participant, fed.http_url) for participant in (*honest, poisoned)]
            summaries = await all_finished(runnings, timeout=3 * STEP_TIMEOUT)
            status = await wait_for_report(fed, rounds - 1)
        np.testing.assert_array_equal(fed.model(rounds), np.full(SHAPE, rounds, np.float32))
        report = status["last_aggregation"]
        poisoned_id = summaries[2].participant_id
        assert status["strategy"] == "median" and report["results"] == 3
        assert report["outliers"] == [shortened(poisoned_id)]
        norms = {update["participant"]: update["update_norm"] for update in report["updates"]}
        # Each update is its step on every weight: ||step * ones(SHAPE)|| = |step| * sqrt(12).
        expected = {shortened(s.participant_id): abs(p.step) * np.sqrt(12) for s, p in zip(summaries, (*honest, poisoned))}
        assert norms.keys() == expected.keys()
        for participant, norm in norms.items():
            assert norm == pytest.approx(expected[participant], rel=1e-6)
        distances = sorted(update["distance_to_model"] for update in report["updates"])
        assert distances == pytest.approx([0.0, 0.5 * np.sqrt(12), 101 * np.sqrt(12)], rel=1e-6, abs=1e-9)
        assert poisoned_id not in json.dumps(status)  # ids are shortened on /status
        warnings = [line for line in fed.aggregator.log_text.splitlines() if "over 3 times the median" in line]
        assert len(warnings) == rounds and all(poisoned_id in line for line in warnings), warnings


@pytest_twisted.ensureDeferred
async def test_with_differential_privacy_the_status_reports_the_epsilon_dp_accounting_gives(tmp_path: Path) -> None:
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import rdp

    rounds, z, q, delta = 3, 1.1, 0.5, 1e-5
    privacy = {"enabled": True, "clip_norm": 0.5, "noise_multiplier": z, "delta": delta, "sampling_rate": q}
    with federation(tmp_path, rounds=rounds, min_clients=2, aggregation={"differential_privacy": privacy}) as fed:
        async with participants_stopped_at_exit() as runnings:
            runnings += [start(AddingParticipant(name, step=1.0, samples=10), fed.http_url) for name in "AB"]
            await all_finished(runnings, timeout=3 * STEP_TIMEOUT)
            status = await wait_for_report(fed, rounds - 1)
        accountant = rdp.RdpAccountant()
        accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds))
        assert status["privacy"]["rounds"] == rounds
        assert status["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(delta), rel=1e-9)
        assert status["last_aggregation"]["clipped"] == 2  # updates of norm sqrt(12) > 0.5
        assert f"privacy spent after {rounds} round(s): epsilon" in fed.aggregator.log_text
        # Noise of std z * 0.5 / 2 on every weight: the model is not the noiseless one.
        assert not np.allclose(fed.model(rounds), fed.model(rounds).flat[0])


def test_differential_privacy_without_dp_accounting_stops_start_up_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from xaind.aggregator import privacy
    from xaind.aggregator.settings import AggregatorDaemonSettings
    from xaind.aggregator.tap import Options, makeService

    def missing() -> None:
        raise privacy.PrivacyAccountingUnavailable("differential privacy accounting needs the dp-accounting package: pip install 'xaind[dp]'")

    monkeypatch.setattr(privacy, "_dp_accounting", missing)
    options = Options()
    options.settings = AggregatorDaemonSettings.from_mapping(
        {"development": True, "state_dir": str(tmp_path / "state"), "aggregation": {"differential_privacy": {"enabled": True}}},
        source=str(tmp_path / "aggregator.yaml"),
    )
    with pytest.raises(SystemExit) as caught:
        makeService(options, reactor=MemoryReactorClock())
    assert str(caught.value) == (
        "config error: aggregation.differential_privacy: differential privacy accounting needs the dp-accounting package: "
        "pip install 'xaind[dp]'"
    )


EVERY_STRATEGY = {
    "fedavg-lr": {"server_learning_rate": 0.5},
    "fedavgm": {"strategy": "fedavgm"},
    "fedadam": {"strategy": "fedadam"},
    "fedyogi": {"strategy": "fedyogi"},
    "fedadagrad": {"strategy": "fedadagrad"},
    "median": {"strategy": "median"},
    "trimmed_mean": {"strategy": "trimmed_mean", "trim_fraction": 0.34},
    "krum": {"strategy": "krum", "byzantine": 0},
    "multi_krum": {"strategy": "multi_krum", "byzantine": 0, "krum_selected": 2},
    "fedadam-dp": {"strategy": "fedadam", "differential_privacy": {"enabled": True, "clip_norm": 10.0, "noise_multiplier": 0.1}},
}


@pytest.mark.parametrize("section", EVERY_STRATEGY.values(), ids=EVERY_STRATEGY.keys())
@pytest_twisted.ensureDeferred
async def test_every_strategy_trains_on_the_real_daemons(tmp_path: Path, section: dict[str, Any]) -> None:
    """Three participants, three rounds, each strategy as aggregator.yaml names it: a finite model, reported."""
    if "differential_privacy" in section:
        pytest.importorskip("dp_accounting")
    rounds = 3
    with federation(tmp_path, rounds=rounds, min_clients=3, aggregation=section) as fed:
        async with participants_stopped_at_exit() as runnings:
            runnings += [start(AddingParticipant(name, step=step, samples=10), fed.http_url) for name, step in zip("ABC", (1.0, 2.0, 4.0))]
            await all_finished(runnings, timeout=3 * STEP_TIMEOUT)
            status = await wait_for_report(fed, rounds - 1)
        model = fed.model(rounds)
        assert model.shape == SHAPE and np.isfinite(model).all()
        assert status["strategy"] == section.get("strategy", "fedavg") and status["last_aggregation"]["results"] == 3
        assert "Traceback" not in fed.aggregator.log_text, fed.describe()
