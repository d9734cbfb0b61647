"""`HeartbeatSchedule` on a `Clock`: one heartbeat at a time, every period, at once after a held one or on `now()`;
and the runner asking for one right after an upload over HTTP."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from xaind.sdk.coordinator_client import Heartbeat, RendezVous, TrainingTicket
from xaind.sdk.heartbeats import HeartbeatSchedule
from xaind.sdk.http import Downloaded
from xaind.sdk.participant import Participant
from xaind.sdk.runner import ParticipantRunner

PERIOD = 1.0


class Coordinator:
    """Records when each heartbeat left; answers it when the test says so."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.sent: list[float] = []
        self.open: list[Deferred[None]] = []

    def beat(self) -> Deferred[None]:
        self.sent.append(self.clock.seconds())
        answer: Deferred[None] = Deferred()
        self.open.append(answer)
        return answer

    def answer(self) -> None:
        self.open.pop(0).callback(None)


def started() -> tuple[Clock, Coordinator, HeartbeatSchedule]:
    clock = Clock()
    coordinator = Coordinator(clock)
    schedule = HeartbeatSchedule(clock, PERIOD, coordinator.beat)
    schedule.start()
    return clock, coordinator, schedule


def test_answered_at_once_the_next_leaves_a_period_after_the_last():
    clock, coordinator, _ = started()
    clock.advance(0.1)
    coordinator.answer()
    clock.advance(0.85)
    assert coordinator.sent == [0.0]
    clock.advance(0.05)
    assert coordinator.sent == [0.0, 1.0]


def test_after_a_held_heartbeat_the_next_leaves_at_once():
    clock, coordinator, _ = started()
    clock.advance(3.75)
    coordinator.answer()
    clock.advance(0)
    assert coordinator.sent == [0.0, 3.75]


def test_one_at_a_time_and_now_sends_at_once_or_right_after_the_one_in_flight():
    clock, coordinator, schedule = started()
    schedule.now()
    schedule.now()
    assert (coordinator.sent, len(coordinator.open)) == ([0.0], 1)
    clock.advance(0.25)
    coordinator.answer()
    clock.advance(0)
    # Asked for while one was in flight: sent once it was answered, not a period later.
    assert coordinator.sent == [0.0, 0.25]
    clock.advance(0.125)
    coordinator.answer()
    clock.advance(0.25)
    schedule.now()
    assert coordinator.sent == [0.0, 0.25, 0.625]
    coordinator.answer()
    clock.advance(PERIOD)
    assert coordinator.sent == [0.0, 0.25, 0.625, 1.625]


def test_stopped_it_sends_nothing_more():
    clock, coordinator, schedule = started()
    coordinator.answer()
    schedule.stop()
    schedule.now()
    clock.advance(10 * PERIOD)
    assert coordinator.sent == [0.0]


def test_an_unexpected_failure_is_logged_and_the_beat_goes_on():
    clock = Clock()
    calls: list[float] = []

    def broken() -> Deferred[None]:
        calls.append(clock.seconds())
        return fail(RuntimeError("boom"))

    HeartbeatSchedule(clock, PERIOD, broken).start()
    clock.advance(PERIOD)
    clock.advance(PERIOD)
    assert calls == [0.0, 1.0, 2.0]


# -- the runner: a heartbeat right after an upload's 200, over HTTP only -----------------------


class ScriptedCoordinator:
    """A coordinator client that selects its participant for round 0 at the first heartbeat, then says `stand_by`."""

    def __init__(self, clock: Clock, by_heartbeat: bool) -> None:
        self.clock = clock
        self.hears_selections_by_heartbeat = by_heartbeat
        self.heartbeats: list[float] = []

    def rendez_vous(self, notifications: Any) -> Deferred[RendezVous]:
        return succeed(RendezVous("participant-1", True))

    def heartbeat(self, participant_id: str) -> Deferred[Heartbeat]:
        self.heartbeats.append(self.clock.seconds())
        return succeed(Heartbeat("round", 0) if len(self.heartbeats) == 1 else Heartbeat("stand_by", None))

    def start_training(self, participant_id: str) -> Deferred[TrainingTicket]:
        return succeed(TrainingTicket(True, "http://aggregator.test", "token"))

    def close(self) -> Deferred[None]:
        return succeed(None)


class InstantHttp:
    """Downloads nothing (round 0 has no model) and accepts every upload at once."""

    def download(self, url: str, keep: bool = True) -> Deferred[Downloaded]:
        return succeed(Downloaded(b"", 0))

    def upload(self, url: str, samples: int, weights: np.ndarray) -> Deferred[Downloaded]:
        return succeed(Downloaded(b"", 0))


class Constant(Participant):
    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        return np.zeros(3, dtype=np.float32), 1


@pytest.mark.parametrize(("by_heartbeat", "expected"), [(True, [0.0, 0.0, 1.0]), (False, [0.0, 1.0])], ids=["http", "pb"])
def test_a_participant_that_hears_selections_by_heartbeat_sends_one_right_after_its_upload(by_heartbeat: bool, expected: list[float]) -> None:
    clock = Clock()
    coordinator = ScriptedCoordinator(clock, by_heartbeat)
    runner = ParticipantRunner(Constant(), coordinator, InstantHttp(), clock, heartbeat_period=PERIOD, train_in_thread=False)
    runner.run()
    clock.advance(0)
    clock.advance(PERIOD)
    runner.stop()
    assert runner.summary.rounds_delivered == [0]
    # Selected at the first heartbeat, delivered at once: over HTTP the next heartbeat leaves then, not a period later.
    assert coordinator.heartbeats == expected
