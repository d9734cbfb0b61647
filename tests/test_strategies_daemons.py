"""Strategies on the real daemons: a server optimizer's state survives SIGKILLs of the aggregator.

The participants are `xaind.sdk` ones in this process (test_sdk's
`AddingParticipant`: global model + a step of its own), so every result is
a function of the model it started from: a training interrupted by crashes
must end with the model of an uninterrupted one, bit for bit, only if the
optimizer's moments were neither lost nor applied twice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    start,
)
from xaind.testing.waiting import wait_until

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
