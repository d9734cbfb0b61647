"""The coordinator service on a fake clock: timers, tokens, admission, aggregation, persistence."""

from __future__ import annotations

import errno
import itertools
import os
import random
from collections.abc import Iterator

import pytest
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from xaind.coordinator.rounds import HeartbeatAnswer, HeartbeatState, ParticipantState, Phase, RoundStateMachine
from xaind.coordinator.round_counter import RECORD_RETRY_FIRST, RECORD_RETRY_MAX
from xaind.coordinator.service import (
    AGGREGATION_RETRY_FIRST,
    AGGREGATION_RETRY_MAX,
    PUSHES_PER_TURN,
    CoordinatorService,
    StartTrainingAnswer,
    aggregation_retry_delay,
)
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings
from xaind.state import RoundProgress, RoundStore
from xaind.testing.fakes import FakeAggregator, SyncCall

HEARTBEAT_TIMEOUT = 10.0
TRAINING_TIMEOUT = 100.0
ADMIT_TIMEOUT = 5.0
AGGREGATION_TIMEOUT = 50.0
URL = "http://aggregator.test:8082"


def make_service(
    clock: Clock,
    aggregator: FakeAggregator,
    *,
    rounds: int = 3,
    ratio: float = 1.0,
    min_clients: int = 1,
    store: RoundStore | None = None,
) -> CoordinatorService:
    counter = itertools.count()
    service = CoordinatorService(
        FederatedLearningSettings(
            rounds=rounds,
            participants_ratio=ratio,
            min_clients=min_clients,
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            training_timeout=TRAINING_TIMEOUT,
        ),
        AggregatorSettings(url=URL, admit_timeout=ADMIT_TIMEOUT, aggregation_timeout=AGGREGATION_TIMEOUT),
        aggregator,
        clock,
        store=store,
        participant_ids=lambda: f"p{next(counter)}",
        tokens=lambda: f"t{next(counter)}",
    )
    if store is None:
        service.machine = RoundStateMachine(service.settings.round_rules, rng=random.Random(7))
    service.startService()
    return service


@pytest.fixture
def service(clock: Clock, aggregator: FakeAggregator):
    service = make_service(clock, aggregator)
    yield service
    service.stopService()
    assert clock.getDelayedCalls() == [], "the service left timers behind"


def result_of(deferred: Deferred) -> object:
    results: list[object] = []
    deferred.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def start(service: CoordinatorService, participant_id: str) -> StartTrainingAnswer:
    answer = result_of(service.start_training(participant_id))
    assert isinstance(answer, StartTrainingAnswer)
    return answer


def deliver(service: CoordinatorService, participant_id: str) -> None:
    answer = start(service, participant_id)
    assert answer.ok
    assert service.end_training(participant_id, answer.token, True) is True


def test_rendez_vous_hands_out_distinct_ids(service: CoordinatorService) -> None:
    first = service.rendez_vous()
    second = service.rendez_vous()
    assert first.ok and second.ok
    assert first.participant_id != second.participant_id


def test_participant_ids_are_128_random_bits_in_the_form_of_a_uuid() -> None:
    import uuid

    from xaind.coordinator.service import new_participant_id

    ids = [uuid.UUID(new_participant_id()) for _ in range(256)]
    assert all(len(str(each)) == 36 for each in ids)
    # uuid4 fixes 6 bits (version 4, variant 10); here every bit varies across the ids.
    varying = 0
    for each in ids[1:]:
        varying |= each.int ^ ids[0].int
    assert varying == 2**128 - 1


def test_participant_without_heartbeat_is_gone_after_the_timeout(service, clock) -> None:
    participant = service.rendez_vous().participant_id
    clock.advance(HEARTBEAT_TIMEOUT - 0.1)
    assert service.heartbeat(participant).state is HeartbeatState.ROUND
    clock.advance(HEARTBEAT_TIMEOUT - 0.1)
    assert service.machine.state_of(participant) is ParticipantState.SELECTED
    clock.advance(0.2)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.REJECT)


def test_heartbeats_keep_a_participant_alive_indefinitely(service, clock) -> None:
    participant = service.rendez_vous().participant_id
    for _ in range(int(TRAINING_TIMEOUT / HEARTBEAT_TIMEOUT)):
        clock.advance(HEARTBEAT_TIMEOUT * 0.9)
        assert service.heartbeat(participant).state is HeartbeatState.ROUND


def test_timed_out_participant_is_replaced_by_a_waiting_one(service, clock) -> None:
    lost = service.rendez_vous().participant_id
    spare = service.rendez_vous().participant_id
    assert service.heartbeat(spare).state is HeartbeatState.STAND_BY
    clock.advance(HEARTBEAT_TIMEOUT * 0.6)
    service.heartbeat(spare)
    clock.advance(HEARTBEAT_TIMEOUT * 0.6)
    assert service.heartbeat(lost).state is HeartbeatState.REJECT
    assert service.heartbeat(spare) == HeartbeatAnswer(HeartbeatState.ROUND, 0)


def test_start_training_admits_a_fresh_token_before_answering(service, aggregator) -> None:
    participant = service.rendez_vous().participant_id
    answer = start(service, participant)
    assert answer.ok and answer.url == URL
    assert [(call.participant_id, call.token, call.round) for call in aggregator.admits] == [(participant, answer.token, 0)]
    again = start(service, participant)
    assert again.ok and again.token != answer.token


def test_start_training_is_refused_to_a_participant_not_selected(service, aggregator) -> None:
    service.rendez_vous()
    waiting = service.rendez_vous().participant_id
    assert start(service, waiting) == StartTrainingAnswer(ok=False)
    assert start(service, "unknown") == StartTrainingAnswer(ok=False)
    assert aggregator.admits == []


def test_start_training_is_held_while_the_aggregator_is_away_then_refused(service, aggregator, clock) -> None:
    aggregator.admit_at_once = False
    participant = service.rendez_vous().participant_id
    answers: list[object] = []
    service.start_training(participant).addBoth(answers.append)
    clock.advance(ADMIT_TIMEOUT - 0.1)
    assert answers == []
    clock.advance(0.2)
    assert answers == [StartTrainingAnswer(ok=False)]
    assert aggregator.admits[0].deferred.called, "the admission was not cancelled"


def test_start_training_answers_as_soon_as_the_aggregator_admits(service, aggregator, clock) -> None:
    aggregator.admit_at_once = False
    participant = service.rendez_vous().participant_id
    answers: list[StartTrainingAnswer] = []
    service.start_training(participant).addCallback(answers.append)
    clock.advance(ADMIT_TIMEOUT / 2)
    aggregator.admits[0].deferred.callback(None)
    assert len(answers) == 1 and answers[0].ok


def test_start_training_refused_when_the_aggregator_refuses(service, aggregator) -> None:
    aggregator.admit = lambda *args: fail(RuntimeError("no"))  # type: ignore[method-assign]
    participant = service.rendez_vous().participant_id
    assert start(service, participant) == StartTrainingAnswer(ok=False)


def test_start_training_refused_if_the_participant_left_while_admitted(service, aggregator, clock) -> None:
    aggregator.admit_at_once = False
    participant = service.rendez_vous().participant_id
    answers: list[StartTrainingAnswer] = []
    service.start_training(participant).addCallback(answers.append)
    service.rendez_vous(participant)  # it restarted meanwhile: ignored for the round
    aggregator.admits[0].deferred.callback(None)
    assert answers == [StartTrainingAnswer(ok=False)]
    assert service.admitted_tokens() == {}


def test_end_training_with_the_admitted_token_makes_the_participant_done(service) -> None:
    service.rendez_vous()
    other = service.rendez_vous().participant_id
    selected = service.machine.participants_in(ParticipantState.SELECTED)[0]
    answer = start(service, selected)
    assert service.end_training(selected, answer.token, True) is True
    assert service.heartbeat(selected) == HeartbeatAnswer(HeartbeatState.STAND_BY)
    assert other not in service.machine.participants_in(ParticipantState.DONE)


def test_end_training_with_a_wrong_or_stale_token_changes_nothing(service, aggregator) -> None:
    participant = service.rendez_vous().participant_id
    old = start(service, participant)
    new = start(service, participant)
    assert service.end_training(participant, "forged", True) is False
    assert service.end_training(participant, old.token, True) is False
    assert service.machine.state_of(participant) is ParticipantState.SELECTED
    assert aggregator.aggregations == []
    assert service.end_training(participant, new.token, True) is True
    assert service.end_training(participant, new.token, True) is False, "a token is good for one result"


def test_failed_result_ignores_the_participant_for_the_round(service) -> None:
    participant = service.rendez_vous().participant_id
    answer = start(service, participant)
    assert service.end_training(participant, answer.token, False) is True
    assert service.machine.state_of(participant) is ParticipantState.IGNORED
    assert service.heartbeat(participant).state is HeartbeatState.STAND_BY


def test_training_timeout_ignores_and_replaces_a_stuck_participant(service, clock) -> None:
    stuck = service.rendez_vous().participant_id
    spare = service.rendez_vous().participant_id
    for _ in range(int(TRAINING_TIMEOUT / (HEARTBEAT_TIMEOUT / 2)) + 1):
        clock.advance(HEARTBEAT_TIMEOUT / 2)
        service.heartbeat(stuck)
        service.heartbeat(spare)
    assert service.machine.state_of(stuck) is ParticipantState.IGNORED
    assert service.heartbeat(stuck).state is HeartbeatState.STAND_BY
    assert service.heartbeat(spare) == HeartbeatAnswer(HeartbeatState.ROUND, 0)


def test_training_timer_is_disarmed_once_the_result_is_in(service, clock) -> None:
    participant = service.rendez_vous().participant_id
    assert [call.func for call in clock.getDelayedCalls()].count(service._training_expired) == 1
    deliver(service, participant)
    assert service._training_expired not in [call.func for call in clock.getDelayedCalls()]


def test_round_end_asks_for_aggregation_and_success_advances_the_round(service, aggregator) -> None:
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    assert [call.round for call in aggregator.aggregations] == [0]
    assert service.status()["phase"] == "aggregating"
    assert service.heartbeat(participant).state is HeartbeatState.STAND_BY
    aggregator.aggregations[0].deferred.callback(None)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 1)


def test_aggregation_names_the_results_that_count(clock, aggregator) -> None:
    service = make_service(clock, aggregator, min_clients=2)
    first, second = service.rendez_vous().participant_id, service.rendez_vous().participant_id
    waiting = service.rendez_vous().participant_id
    deliver(service, first)
    clock.advance(HEARTBEAT_TIMEOUT / 2)
    service.heartbeat(second)
    service.heartbeat(waiting)
    clock.advance(HEARTBEAT_TIMEOUT / 2 + 0.1)  # first is gone: done and inactive, its result counts
    assert service.machine.state_of(first) is ParticipantState.DONE_INACTIVE
    deliver(service, second)
    assert [call.round for call in aggregator.aggregations] == [0]
    assert sorted(aggregator.aggregations[0].counted) == sorted([first, second])
    service.stopService()


def test_failed_aggregation_repeats_the_round_after_a_wait_doubled_by_each_failure_in_a_row(service, aggregator, clock) -> None:
    """A failure that repeats (a rule needing more results, a full disk) must not loop at full speed."""
    participant = service.rendez_vous().participant_id
    for failures, wait in enumerate([1.0, 2.0, 4.0], start=1):
        deliver(service, participant)
        aggregator.aggregations[-1].deferred.errback(RuntimeError("disk full"))
        assert aggregation_retry_delay(failures) == wait
        clock.advance(wait - 0.01)
        assert service.heartbeat(participant).state is HeartbeatState.STAND_BY
        clock.advance(0.01)
        assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 0)
    deliver(service, participant)
    aggregator.aggregations[-1].deferred.callback(None)  # a success starts the count again
    deliver(service, participant)
    aggregator.aggregations[-1].deferred.errback(RuntimeError("disk full"))
    clock.advance(AGGREGATION_RETRY_FIRST)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 1)
    assert [aggregation_retry_delay(n) for n in (6, 7, 100)] == [32.0, AGGREGATION_RETRY_MAX, AGGREGATION_RETRY_MAX]


def test_a_service_stopped_while_a_round_waits_to_run_again_leaves_no_timer(clock, aggregator) -> None:
    service = make_service(clock, aggregator)
    deliver(service, service.rendez_vous().participant_id)
    aggregator.aggregations[-1].deferred.errback(RuntimeError("disk full"))
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_aggregation_that_never_answers_times_out_and_repeats_the_round(service, aggregator, clock) -> None:
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    step = HEARTBEAT_TIMEOUT / 2
    for _ in range(int(AGGREGATION_TIMEOUT / step) - 1):
        clock.advance(step)
        assert service.heartbeat(participant).state is HeartbeatState.STAND_BY
    clock.advance(step + 0.1)
    assert service.heartbeat(participant).state is HeartbeatState.STAND_BY  # then the wait of a failed aggregation
    clock.advance(AGGREGATION_RETRY_FIRST)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 0)


def test_full_training_ends_with_finish_for_everyone(clock, aggregator) -> None:
    service = make_service(clock, aggregator, rounds=2)
    participant = service.rendez_vous().participant_id
    for round_number in range(2):
        assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, round_number)
        deliver(service, participant)
        aggregator.aggregations[-1].deferred.callback(None)
    assert service.heartbeat(participant).state is HeartbeatState.FINISH
    assert service.heartbeat("never-seen").state is HeartbeatState.FINISH
    late = service.rendez_vous()
    assert late.ok is False
    assert start(service, participant) == StartTrainingAnswer(ok=False)
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_round_counter_is_persisted_after_each_successful_aggregation(clock, aggregator, tmp_path) -> None:
    store = RoundStore(str(tmp_path))
    service = make_service(clock, aggregator, rounds=3, store=store)
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    assert store.load() == RoundProgress(round=0)
    aggregator.aggregations[-1].deferred.callback(None)
    assert store.load() == RoundProgress(round=1)
    deliver(service, participant)
    aggregator.aggregations[-1].deferred.errback(RuntimeError("failed"))
    assert store.load() == RoundProgress(round=1)
    service.stopService()

    resumed = make_service(Clock(), FakeAggregator(), rounds=3, store=store)
    newcomer = resumed.rendez_vous().participant_id
    assert resumed.heartbeat(newcomer) == HeartbeatAnswer(HeartbeatState.ROUND, 1)
    resumed.stopService()


def test_a_finished_training_stays_finished_after_a_restart(clock, aggregator, tmp_path) -> None:
    store = RoundStore(str(tmp_path))
    store.save(RoundProgress(round=5))
    service = make_service(clock, aggregator, rounds=2, store=store)
    assert service.machine.complete
    assert service.rendez_vous().ok is False
    service.stopService()


def test_status_tells_what_the_round_waits_for(clock, aggregator) -> None:
    service = make_service(clock, aggregator, min_clients=3, ratio=0.5)
    service.rendez_vous()
    status = service.status()
    assert status["participants"]["waiting"] == 1
    assert status["minimum_participants"] == 2
    assert "2 more participant(s)" in status["waiting_for"]
    assert status["aggregator_attached"] is True
    service.stopService()


def test_stopping_cancels_every_timer_and_the_pending_aggregation(clock, aggregator) -> None:
    service = make_service(clock, aggregator)
    participants = [service.rendez_vous().participant_id for _ in range(5)]
    deliver_all = [p for p in participants if service.machine.state_of(p) is ParticipantState.SELECTED]
    for participant in deliver_all:
        deliver(service, participant)
    pending = aggregator.aggregations[0].deferred
    service.stopService()
    assert clock.getDelayedCalls() == []
    assert pending.called


def test_sync_tells_the_aggregator_the_tokens_and_the_counted_results(service, aggregator) -> None:
    first = service.rendez_vous().participant_id
    second = service.rendez_vous().participant_id
    selected = service.machine.participants_in(ParticipantState.SELECTED)
    assert selected == (first,)
    answer = start(service, first)
    service.sync_aggregator()
    assert aggregator.syncs[-1] == SyncCall(0, [], {first: answer.token})
    assert second not in aggregator.syncs[-1].admitted


def test_sync_while_aggregating_keeps_the_aggregators_results(service, aggregator) -> None:
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    service.sync_aggregator()
    assert aggregator.syncs[-1] == SyncCall(0, None, {})


def test_sync_catches_up_with_an_aggregation_the_coordinator_did_not_hear(clock, aggregator, tmp_path) -> None:
    store = RoundStore(str(tmp_path))
    service = make_service(clock, aggregator, rounds=5, store=store)
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    aggregator.aggregations[0].deferred.errback(RuntimeError("link lost"))  # the answer was lost ...
    aggregator.sync_answer = lambda round: {"model_round": 1, "missing": []}  # ... but it had aggregated
    service.sync_aggregator()
    assert service.machine.round == 1
    assert store.load() == RoundProgress(round=1)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 1)
    service.stopService()


def test_sync_reruns_a_round_whose_counted_results_the_aggregator_lost(clock, aggregator) -> None:
    service = make_service(clock, aggregator, min_clients=2)
    first = service.rendez_vous().participant_id
    second = service.rendez_vous().participant_id
    deliver(service, first)
    assert service.machine.state_of(second) is ParticipantState.SELECTED
    lost = {"model_round": 0, "missing": [first]}
    aggregator.sync_answer = lambda round: lost if aggregator.syncs[-1].done else {"model_round": 0, "missing": []}
    service.sync_aggregator()
    # The round restarted from scratch: both selected again, and the aggregator told to drop everything.
    assert service.machine.participants_in(ParticipantState.DONE) == ()
    assert set(service.machine.participants_in(ParticipantState.SELECTED)) == {first, second}
    assert aggregator.syncs[-1] == SyncCall(0, [], {})
    assert service.machine.round == 0
    service.stopService()


def test_a_repeated_round_tells_the_aggregator_to_drop_its_results(service, aggregator) -> None:
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    syncs_before = len(aggregator.syncs)
    aggregator.aggregations[0].deferred.errback(RuntimeError("failed"))
    service.clock.advance(AGGREGATION_RETRY_FIRST)
    assert len(aggregator.syncs) == syncs_before + 1
    assert aggregator.syncs[-1] == SyncCall(0, [], {})


def test_no_sync_is_attempted_without_an_aggregator(service, aggregator) -> None:
    aggregator.attached = False
    service.rendez_vous()
    service.sync_aggregator()
    assert aggregator.syncs == []


# -- a round counter that cannot be written ------------------------------------------------


class FailingRoundStore(RoundStore):
    """A RoundStore whose next saves raise the errors queued in `failures`, then write for real."""

    def __init__(self, state_dir: str, failures: list[OSError]) -> None:
        super().__init__(state_dir)
        self.failures = list(failures)
        self.attempts = 0

    def save(self, progress: RoundProgress) -> None:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        super().save(progress)


class RecordingNotifier:
    """A PB participant as the service sees it: records what is pushed to it."""

    def __init__(self) -> None:
        self.selections: list[int] = []
        self.finished_count = 0

    def selected(self, round_number: int) -> None:
        self.selections.append(round_number)

    def finished(self) -> None:
        self.finished_count += 1


@pytest.fixture
def service_log() -> Iterator[list[tuple[str, str]]]:
    """The service's log events, as (level name, formatted text)."""
    events: list[tuple[str, str]] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "xaind.coordinator.service":
            events.append((event["log_level"].name, formatEvent(event)))

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def warnings_in(events: list[tuple[str, str]]) -> list[str]:
    return [text for level, text in events if level in ("warn", "error", "critical")]


def training_timer_count(service: CoordinatorService, clock: Clock) -> int:
    """Participants with a training deadline armed (those selected together share one timer)."""
    return sum(len(call.args[0].participants) for call in clock.getDelayedCalls() if call.func == service._training_expired)


ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_an_unwritable_round_counter_holds_the_next_round_until_it_is_written(clock, aggregator, tmp_path, service_log) -> None:
    store = FailingRoundStore(str(tmp_path), [ENOSPC, ENOSPC, ENOSPC])
    service = make_service(clock, aggregator, rounds=3, store=store)
    notifier = RecordingNotifier()
    participant = service.rendez_vous().participant_id
    service.watch(participant, notifier)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 0)
    deliver(service, participant)
    clock.advance(7.0)
    failed_at = clock.seconds()
    aggregator.aggregations[0].deferred.callback(None)

    # The round does not move on: nothing selected, no timer, nothing pushed, the counter unchanged.
    assert (service.machine.round, service.machine.phase) == (0, Phase.AGGREGATING)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.STAND_BY)
    assert training_timer_count(service, clock) == 0
    assert notifier.selections == []
    assert store.load() == RoundProgress(round=0)
    failure = service.status()["state_write_failure"]
    assert failure == {
        "file": store.path,
        "error": "No space left on device",
        "since": failed_at,
        "attempts": 1,
        "retry_in_s": RECORD_RETRY_FIRST,
        "round": 1,
    }
    assert "round counter" in service.status()["waiting_for"]
    warnings = warnings_in(service_log)
    assert len(warnings) == 1
    assert store.path in warnings[0] and "No space left on device" in warnings[0]

    # It keeps serving meanwhile: rendez-vous, heartbeats, status.
    newcomer = service.rendez_vous()
    assert newcomer.ok
    assert service.heartbeat(newcomer.participant_id) == HeartbeatAnswer(HeartbeatState.STAND_BY)

    # Retries on the clock, with a growing delay, and no new log line per retry.
    clock.advance(RECORD_RETRY_FIRST)
    assert store.attempts == 2
    assert service.status()["state_write_failure"]["attempts"] == 2
    assert service.status()["state_write_failure"]["retry_in_s"] == 2 * RECORD_RETRY_FIRST
    assert service.status()["state_write_failure"]["since"] == failed_at
    clock.advance(2 * RECORD_RETRY_FIRST)
    assert store.attempts == 3
    assert service.machine.round == 0
    assert len(warnings_in(service_log)) == 1
    service.heartbeat(participant)
    service.heartbeat(newcomer.participant_id)

    # The fourth attempt writes: the round moves on exactly once, as it would have.
    clock.advance(4 * RECORD_RETRY_FIRST)
    assert store.attempts == 4
    assert store.load() == RoundProgress(round=1)
    assert service.status()["state_write_failure"] is None
    assert service.machine.round == 1
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.ROUND, 1)
    assert service.heartbeat(newcomer.participant_id) == HeartbeatAnswer(HeartbeatState.ROUND, 1)
    assert notifier.selections == [1]
    assert training_timer_count(service, clock) == 2
    assert len(warnings_in(service_log)) == 1
    assert any("round counter" in text and level == "info" for level, text in service_log)

    # Nothing is left over (no retry pending): the next round runs and is recorded as usual.
    assert {call.func for call in clock.getDelayedCalls()} == {service._heartbeat_expired, service._training_expired}
    deliver(service, participant)
    deliver(service, newcomer.participant_id)
    aggregator.aggregations[-1].deferred.callback(None)
    assert store.load() == RoundProgress(round=2)
    clock.advance(0)  # pushes go out from the turn after the selection
    assert notifier.selections == [1, 2]
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_retries_of_the_round_counter_back_off_up_to_a_bound(clock, aggregator, tmp_path, service_log) -> None:
    store = FailingRoundStore(str(tmp_path), [OSError(errno.EMFILE, os.strerror(errno.EMFILE))] * 20)
    service = make_service(clock, aggregator, rounds=2, store=store)
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    aggregator.aggregations[0].deferred.callback(None)
    delays = []
    for _ in range(12):
        delays.append(service.status()["state_write_failure"]["retry_in_s"])
        clock.advance(delays[-1])
    assert delays[:3] == [RECORD_RETRY_FIRST, 2 * RECORD_RETRY_FIRST, 4 * RECORD_RETRY_FIRST]
    assert max(delays) == RECORD_RETRY_MAX
    assert delays == sorted(delays)
    assert store.attempts == 13
    assert len(warnings_in(service_log)) == 1
    assert service.machine.round == 0
    # Stopping the service drops the retry with everything else.
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_a_write_failing_for_days_keeps_being_retried_at_the_bound(clock, aggregator, tmp_path, service_log) -> None:
    store = FailingRoundStore(str(tmp_path), [ENOSPC] * 3000)
    service = make_service(clock, aggregator, rounds=2, store=store)
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    aggregator.aggregations[0].deferred.callback(None)
    for _ in range(2999):
        clock.advance(RECORD_RETRY_MAX)
    assert store.attempts == 3000
    assert service.status()["state_write_failure"]["retry_in_s"] == RECORD_RETRY_MAX
    assert len(warnings_in(service_log)) == 1
    clock.advance(RECORD_RETRY_MAX)
    assert store.load() == RoundProgress(round=1)
    assert service.machine.round == 1
    service.stopService()


def test_the_last_round_is_complete_only_once_its_counter_is_written(clock, aggregator, tmp_path, service_log) -> None:
    store = FailingRoundStore(str(tmp_path), [OSError(errno.EROFS, os.strerror(errno.EROFS))])
    service = make_service(clock, aggregator, rounds=1, store=store)
    notifier = RecordingNotifier()
    participant = service.rendez_vous().participant_id
    service.watch(participant, notifier)
    deliver(service, participant)
    aggregator.aggregations[0].deferred.callback(None)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.STAND_BY)
    assert notifier.finished_count == 0
    assert service.status()["state_write_failure"]["error"] == "Read-only file system"
    clock.advance(RECORD_RETRY_FIRST)
    assert service.heartbeat(participant) == HeartbeatAnswer(HeartbeatState.FINISH)
    assert notifier.finished_count == 1
    assert store.load() == RoundProgress(round=1)
    service.stopService()


def test_a_second_failure_after_recovery_is_logged_again(clock, aggregator, tmp_path, service_log) -> None:
    store = FailingRoundStore(str(tmp_path), [ENOSPC])
    service = make_service(clock, aggregator, rounds=3, store=store)
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    aggregator.aggregations[0].deferred.callback(None)
    clock.advance(RECORD_RETRY_FIRST)
    assert service.machine.round == 1
    store.failures = [ENOSPC]
    deliver(service, participant)
    aggregator.aggregations[-1].deferred.callback(None)
    assert service.status()["state_write_failure"]["round"] == 2
    assert service.status()["state_write_failure"]["attempts"] == 1
    assert len(warnings_in(service_log)) == 2
    clock.advance(RECORD_RETRY_FIRST)
    assert service.machine.round == 2
    service.stopService()


def test_a_catch_up_waits_for_its_round_counter_too(clock, aggregator, tmp_path, service_log) -> None:
    store = FailingRoundStore(str(tmp_path), [ENOSPC])
    service = make_service(clock, aggregator, rounds=5, store=store)
    participant = service.rendez_vous().participant_id
    deliver(service, participant)
    aggregator.aggregations[0].deferred.errback(RuntimeError("link lost"))  # the answer was lost ...
    aggregator.sync_answer = lambda round: {"model_round": 1, "missing": []}  # ... but it had aggregated
    service.sync_aggregator()
    assert service.machine.round == 0
    assert service.status()["state_write_failure"]["round"] == 1
    service.sync_aggregator()  # a second sync meanwhile changes nothing
    assert store.attempts == 1
    clock.advance(RECORD_RETRY_FIRST)
    assert service.machine.round == 1
    assert store.load() == RoundProgress(round=1)
    assert service.status()["state_write_failure"] is None
    assert sum("cannot write the round counter" in text for text in warnings_in(service_log)) == 1
    service.stopService()


def test_status_has_no_state_write_failure_when_writes_succeed(service) -> None:
    assert service.status()["state_write_failure"] is None


# -- a stored round counter beyond the configured rounds ---------------------------------------


@pytest.mark.parametrize("stored", [11, 99])
def test_a_stored_counter_beyond_rounds_is_complete_and_said_at_start_up(clock, aggregator, tmp_path, service_log, stored: int) -> None:
    store = RoundStore(str(tmp_path))
    store.save(RoundProgress(round=stored))
    service = make_service(clock, aggregator, rounds=10, store=store)
    assert (service.machine.round, service.machine.phase) == (10, Phase.COMPLETE)
    assert service.rendez_vous().ok is False
    assert warnings_in(service_log) == [
        f"{store.path} records {stored} aggregated rounds, more than rounds: 10 in the configuration: "
        "training is complete (remove the file to train anew)"
    ]
    assert store.load() == RoundProgress(round=stored)  # left as it is
    service.stopService()


@pytest.mark.parametrize("stored", [0, 4, 10])
def test_a_stored_counter_within_rounds_starts_without_a_warning(clock, aggregator, tmp_path, service_log, stored: int) -> None:
    store = RoundStore(str(tmp_path))
    store.save(RoundProgress(round=stored))
    service = make_service(clock, aggregator, rounds=10, store=store)
    assert service.machine.round == stored
    assert warnings_in(service_log) == []
    service.stopService()


# -- a selection of thousands (participants_ratio 1.0 with a flood of fakes waiting) --


def test_a_selection_of_thousands_arms_one_training_timer_and_pushes_over_several_turns(clock, aggregator) -> None:
    service = make_service(clock, aggregator, min_clients=2500)
    notifiers = {}
    for _ in range(2499):
        participant = f"pb{len(notifiers)}"
        notifiers[participant] = RecordingNotifier()
        service.watch(participant, notifiers[participant])
        service.rendez_vous(participant)
    last = f"pb{len(notifiers)}"
    notifiers[last] = RecordingNotifier()
    service.watch(last, notifiers[last])
    service.rendez_vous(last)  # the 2,500th: all are selected
    assert service.machine.counters().selected == 2500
    training_timers = [call for call in clock.getDelayedCalls() if call.func == service._training_expired]
    assert len(training_timers) == 1
    assert training_timer_count(service, clock) == 2500
    pushed = lambda: sum(len(notifier.selections) for notifier in notifiers.values())  # noqa: E731
    assert pushed() == 0  # from the next turn: the rendez-vous that selected them is answered first

    def next_turn() -> None:
        """Run the pushes' next turn alone (a Clock's advance(0) runs every turn due at once)."""
        (turn,) = [call for call in clock.getDelayedCalls() if call.func == service._push_selections]
        assert turn.getTime() == clock.seconds()
        run, arguments = turn.func, turn.args
        turn.cancel()
        run(*arguments)

    next_turn()
    assert pushed() == PUSHES_PER_TURN  # the rest waits for the next turns: heartbeats are answered between
    next_turn()
    assert pushed() == 2 * PUSHES_PER_TURN
    clock.advance(0)
    assert pushed() == 2500
    assert all(notifier.selections == [0] for notifier in notifiers.values())
    # One participant's result disarms its part of the deadline only.
    deliver(service, last)
    assert training_timer_count(service, clock) == 2499
    for participant in notifiers:
        if participant != last:
            service.heartbeat(participant)
    clock.advance(HEARTBEAT_TIMEOUT / 2)
    service.stopService()
    assert clock.getDelayedCalls() == []


# -- what /status shows of past rounds and problems --------------------------------------------------


def test_status_keeps_each_finished_rounds_duration_participants_and_outcome(service, aggregator, clock) -> None:
    assert service.status()["finished_rounds"] == [] and service.status()["seconds_since_last_aggregation"] is None
    participant = service.rendez_vous().participant_id  # selected at once: round 0 begins
    clock.advance(2)
    deliver(service, participant)
    clock.advance(1.5)
    aggregator.aggregations[-1].deferred.callback(None)  # round 1 begins
    clock.advance(0.25)
    status = service.status()
    assert status["finished_rounds"] == [{"round": 0, "duration_s": 3.5, "participants": 1, "outcome": "aggregated", "ended_at": 3.5}]
    assert status["seconds_since_last_aggregation"] == 0.25
    deliver(service, participant)
    aggregator.aggregations[-1].deferred.errback(RuntimeError("disk full"))
    clock.advance(AGGREGATION_RETRY_FIRST)
    status = service.status()
    # Repeated once the wait after the failure is over: that wait is part of the round.
    expected_end = 3.75 + AGGREGATION_RETRY_FIRST
    assert status["finished_rounds"][-1] == {"round": 1, "duration_s": expected_end - 3.5, "participants": 1, "outcome": "repeated", "ended_at": expected_end}
    assert status["seconds_since_last_aggregation"] == 0.25 + AGGREGATION_RETRY_FIRST


def test_recent_problems_keep_the_last_warnings_with_participant_ids_shortened() -> None:
    from twisted.logger import Logger, LogLevel

    from xaind.recent_problems import RecentProblems, shortened

    problems = RecentProblems(kept=2)
    logger = Logger(namespace="xaind.coordinator.service", observer=problems)
    other = Logger(namespace="twisted.web", observer=problems)
    participant = "0123456789abcdef-participant"
    logger.info("selected {participant}", participant=participant)  # below warn: not kept
    other.warn("not xaind's")
    logger.warn("no heartbeat from {participant} for {timeout} s", participant=participant, timeout=2)
    logger.error("aggregation of round {round} failed", round=3)
    logger.critical("the disk is gone")
    lines = problems.status()
    assert [(line["level"], line["text"]) for line in lines] == [
        ("error", "aggregation of round 3 failed"),
        ("critical", "the disk is gone"),
    ]
    problems = RecentProblems()
    Logger(namespace="xaind.coordinator.service", observer=problems).warn("no heartbeat from {participant}", participant=participant)
    (line,) = problems.status()
    assert line["text"] == f"no heartbeat from {shortened(participant)}" and participant not in line["text"]
    assert shortened(participant) == "01234567…" and shortened("short") == "short"
    assert LogLevel.warn.name == "warn"
