"""The coordinator and the aggregator linked by Perspective Broker over real loopback sockets.

Both ends run in this process on the real reactor: the coordinator's PB
factory listens with `reactor.listenTCP(0, interface="127.0.0.1")` and the
aggregator's `CoordinatorLink` (a `ClientService`) connects to it and logs in.
Participants are played by calling the services' own API (no HTTP), so what
is tested is the link: login, re-synchronisation, admission, reports of
results, aggregation, reconnection and time-outs (docs/wire-format.rst, the PB
link; docs/rounds.rst; docs/aggregator-consistency.rst).

Nothing sleeps to synchronise: every wait is on a Deferred or a polled
condition, bounded by `WAIT` seconds.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import formatEvent

from xaind.aggregator.backends import WeightedAverageBackend
from xaind.aggregator.coordinator_link import AggregatorMind, CoordinatorLink
from xaind.aggregator.service import AggregatorService
from xaind.aggregator.threads import DiskThreads, SerialWorker
from xaind.aggregator.store import ModelStore
from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.pb import coordinator_pb_factory
from xaind.coordinator.rounds import HeartbeatState, ParticipantState, Phase
from xaind.coordinator.service import CoordinatorService, StartTrainingAnswer
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings
from xaind.protocol import Refusal
from xaind.testing.wire import encode_local_result
from xaind.testing.waiting import wait_until

WAIT = 10.0  # seconds: the bound on every wait for the link
POLL = 0.01  # seconds a participant waits between two asks
SECRET = "s3cret-for-the-pb-link"
AGGREGATOR_URL = "http://aggregator.test:18082"


# -- waiting without sleeping ------------------------------------------------------------


def bounded(deferred: Deferred, timeout: float = WAIT) -> Deferred:
    return deferred.addTimeout(timeout, reactor)


# -- the two ends ---------------------------------------------------------------------------


@dataclass
class Coordinator:
    service: CoordinatorService
    link: AggregatorLink
    factory: Any
    port: Any = None
    port_number: int = 0
    brokers: list[Any] = field(default_factory=list)  # server-side PB connections, newest last

    def listen(self) -> None:
        self.port = reactor.listenTCP(self.port_number, self.factory, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    async def stop_listening(self) -> None:
        if self.port is not None:
            port, self.port = self.port, None
            await port.stopListening()

    def open_brokers(self) -> list[Any]:
        return [broker for broker in self.brokers if not broker.disconnected]

    async def drop_connections(self) -> None:
        for broker in self.open_brokers():
            broker.transport.loseConnection()
        await wait_until(lambda: not self.open_brokers(), WAIT, "the coordinator's PB connections closed")


@dataclass
class Aggregator:
    service: AggregatorService
    link: CoordinatorLink
    state_dir: str
    syncs: list[tuple[int, list[str] | None, dict[str, str]]] = field(default_factory=list)

    async def stop(self) -> None:
        if self.link.running:
            await bounded(self.link.stopService())
        if self.service.running:
            self.service.stopService()


class SlowBackend(WeightedAverageBackend):
    """The weighted average, but `aggregate` (run in the worker thread) waits until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()
        self.started = threading.Event()

    def aggregate(self, destination_path: str) -> None:
        self.started.set()
        self.released.wait(WAIT)
        super().aggregate(destination_path)


class StallingMind(AggregatorMind):
    """The aggregator's real mind, except that it can be told to never answer admissions or aggregate."""

    stall_admit = False
    stall_aggregate = False

    def remote_admit_many(self, admissions: Any) -> Any:
        if self.stall_admit:
            return Deferred()
        return super().remote_admit_many(admissions)

    def remote_aggregate(self, round_number: int, counted: list[str] | None = None) -> Deferred[None]:
        if self.stall_aggregate:
            return Deferred()
        return super().remote_aggregate(round_number, counted)


@dataclass
class World:
    tmp_path: Any
    coordinators: list[Coordinator] = field(default_factory=list)
    aggregators: list[Aggregator] = field(default_factory=list)

    def coordinator(
        self,
        *,
        secret: str = SECRET,
        admit_timeout: float = 5.0,
        aggregation_timeout: float = 10.0,
        **federated_learning: Any,
    ) -> Coordinator:
        settings = {"rounds": 3, "participants_ratio": 1.0, "min_clients": 1, "heartbeat_timeout": 60.0, "training_timeout": 60.0}
        settings.update(federated_learning)
        link = AggregatorLink()
        service = CoordinatorService(
            FederatedLearningSettings(**settings),
            AggregatorSettings(url=AGGREGATOR_URL, admit_timeout=admit_timeout, aggregation_timeout=aggregation_timeout),
            link,
            clock=reactor,
        )
        factory = coordinator_pb_factory(service, link, secret)
        coordinator = Coordinator(service, link, factory)
        build = factory.buildProtocol

        def build_and_keep(addr: Any) -> Any:
            broker = build(addr)
            coordinator.brokers.append(broker)
            return broker

        factory.buildProtocol = build_and_keep
        self.coordinators.append(coordinator)
        service.startService()
        coordinator.listen()
        return coordinator

    def aggregator(
        self,
        coordinator: Coordinator,
        *,
        secret: str = SECRET,
        state_dir: str | None = None,
        mind: type[AggregatorMind] = AggregatorMind,
        backend: WeightedAverageBackend | None = None,
        call_timeout: float = 5.0,
    ) -> Aggregator:
        """A started aggregator service and its link to `coordinator` (the link is not started)."""
        state_dir = state_dir or str(self.tmp_path / "aggregator")
        link = CoordinatorLink(f"tcp:127.0.0.1:{coordinator.port_number}", secret, reactor)
        service = AggregatorService(
            ModelStore(state_dir),
            backend or WeightedAverageBackend(),
            link,
            reactor,
            max_upload_bytes=1 << 20,
            call_timeout=call_timeout,
            worker=SerialWorker(reactor, "test-aggregator"),
            disk=DiskThreads(reactor, "test-aggregator-disk"),
        )
        link.serve(service)
        link.mind = mind(service)
        aggregator = Aggregator(service, link, state_dir)
        sync = service.sync

        def recorded_sync(round_number: int, done: list[str] | None, admitted: dict[str, str]) -> dict[str, Any]:
            aggregator.syncs.append((round_number, None if done is None else list(done), dict(admitted)))
            return sync(round_number, done, admitted)

        service.sync = recorded_sync  # type: ignore[method-assign]
        self.aggregators.append(aggregator)
        service.startService()
        return aggregator

    async def linked(self, **coordinator_settings: Any) -> tuple[Coordinator, Aggregator]:
        """A coordinator and an aggregator logged in to it and synchronised with it."""
        coordinator = self.coordinator(**coordinator_settings)
        aggregator = self.aggregator(coordinator)
        aggregator.link.startService()
        await attached(coordinator, aggregator)
        return coordinator, aggregator

    async def close(self) -> None:
        for aggregator in self.aggregators:
            await aggregator.stop()
        for coordinator in self.coordinators:
            await coordinator.stop_listening()
            await coordinator.drop_connections()
            coordinator.service.stopService()


@pytest_twisted.async_yield_fixture
async def world(tmp_path):
    world = World(tmp_path)
    yield world
    await world.close()
    # No timer of either daemon may outlive it (PB and TCP clean-up calls go first).
    await wait_until(lambda: not reactor.getDelayedCalls(), 2.0, "no delayed calls left behind")



def logged(events: list[dict], text: str) -> list[str]:
    return [message for message in (formatEvent(event) for event in events) if text in message]


def unhandled_errors(events: list[dict]) -> list[str]:
    """The text (traceback included) of every logged failure, legacy `log.err` ones too."""
    return [formatEvent(event) for event in events if event.get("isError") or event.get("log_failure") is not None]


# -- helpers on the two services --------------------------------------------------------------


async def attached(coordinator: Coordinator, aggregator: Aggregator, already_synced: int = 0) -> None:
    """Wait until both ends see the link and the coordinator has synchronised the aggregator once more."""
    await wait_until(
        lambda: coordinator.service.status()["aggregator_attached"] and aggregator.service.status()["coordinator_attached"],
        WAIT,
        "both ends attached",
    )
    await wait_until(lambda: len(aggregator.syncs) > already_synced, WAIT, "the coordinator synchronised the aggregator")


def admits(aggregator: Aggregator, participant_id: str, token: str) -> bool:
    try:
        aggregator.service.authorize(participant_id, token)
    except Refusal:
        return False
    return True


def selected(coordinator: Coordinator, count: int = 1) -> list[str]:
    """Rendez-vous `count` participants with their own ids; they are all selected."""
    ids = [f"participant-{index}" for index in range(count)]
    for participant_id in ids:
        assert coordinator.service.rendez_vous(participant_id).ok
    for participant_id in ids:
        assert coordinator.service.machine.state_of(participant_id) is ParticipantState.SELECTED
    return ids


async def start(coordinator: Coordinator, participant_id: str) -> StartTrainingAnswer:
    answer = await bounded(coordinator.service.start_training(participant_id))
    assert isinstance(answer, StartTrainingAnswer)
    return answer


def weights(seed: int, shape: tuple[int, ...] = (3, 4)) -> np.ndarray:
    """Small float64 weights (multiples of 1/8, so a single result's average is exactly itself)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-64, 64, size=shape).astype(np.float64) / 8


def begin(aggregator: Aggregator, participant_id: str, token: str, samples: int, array: np.ndarray) -> tuple[Any, bytes]:
    upload = aggregator.service.begin_upload(participant_id, token)
    return upload, encode_local_result(samples, array)


async def upload(aggregator: Aggregator, participant_id: str, token: str, samples: int, array: np.ndarray) -> None:
    """A participant's whole upload through the aggregator's service API, in two chunks."""
    sending, body = begin(aggregator, participant_id, token, samples, array)
    half = len(body) // 2
    sending.write(body[:half])
    sending.write(body[half:])
    await bounded(sending.finish())


def global_model(aggregator: Aggregator) -> np.ndarray:
    model = aggregator.service.global_model()
    assert model.path is not None
    return np.load(model.path, allow_pickle=False)


async def round_completed(coordinator: Coordinator, aggregator: Aggregator, round_number: int) -> None:
    await wait_until(
        lambda: coordinator.service.machine.round == round_number and aggregator.service.global_model().round == round_number,
        WAIT,
        f"both ends at round {round_number}",
    )


# -- 1. login with the right secret ------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_login_attaches_both_ends_and_syncs_the_admitted_tokens(world: World) -> None:
    coordinator = world.coordinator()
    (participant,) = selected(coordinator)
    # Asked before any aggregator is there: the request is held for the aggregator.
    starting = coordinator.service.start_training(participant)
    aggregator = world.aggregator(coordinator)
    aggregator.service.admit("ghost", "a-stale-token", 0)  # left over from before: the sync must drop it
    assert not coordinator.service.status()["aggregator_attached"]
    assert not aggregator.service.status()["coordinator_attached"]

    aggregator.link.startService()
    await attached(coordinator, aggregator)
    answer = await bounded(starting)

    assert answer.ok and answer.url == AGGREGATOR_URL and answer.token
    assert coordinator.service.status()["aggregator_attached"] is True
    assert aggregator.service.status()["coordinator_attached"] is True
    round_number, done, admitted = aggregator.syncs[0]
    assert (round_number, done) == (0, [])
    assert admitted == {participant: answer.token}
    assert coordinator.service.admitted_tokens() == {participant: answer.token}
    await wait_until(lambda: admits(aggregator, participant, answer.token), WAIT, "the participant admitted")
    assert not admits(aggregator, "ghost", "a-stale-token")
    assert aggregator.service.status()["admitted"] == len(coordinator.service.admitted_tokens())


# -- 2. login with a wrong secret -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_wrong_secret_is_refused_again_and_again_and_admission_times_out(world: World, log_events) -> None:
    coordinator = world.coordinator(secret="the-right-one", admit_timeout=0.5)
    aggregator = world.aggregator(coordinator, secret="a-wrong-one")
    aggregator.link.startService()

    def refusals() -> int:
        assert not coordinator.service.status()["aggregator_attached"], "a wrong secret was accepted"
        assert not aggregator.service.status()["coordinator_attached"], "a wrong secret was accepted"
        return len(logged(log_events, "refused PB login"))

    # The first refusal, then one after the backoff: the ClientService keeps trying.
    await wait_until(lambda: refusals() >= 2, WAIT, "two refused logins")
    assert logged(log_events, "refused PB login for aggregator: wrong secret")
    assert logged(log_events, "the coordinator refused our login")
    assert aggregator.link.client.running
    assert aggregator.service.status()["coordinator_attached"] is False
    # A refused connection is closed, not left open beside the next attempt.
    await wait_until(lambda: len(coordinator.open_brokers()) <= 1, WAIT, "the refused connections closed")

    (participant,) = selected(coordinator)
    began = reactor.seconds()
    answer = await start(coordinator, participant)
    assert answer == StartTrainingAnswer(ok=False)
    assert reactor.seconds() - began >= 0.5 - 0.05
    assert coordinator.service.admitted_tokens() == {}
    assert coordinator.service.machine.state_of(participant) is ParticipantState.SELECTED
    assert refusals() >= 2


@pytest_twisted.ensureDeferred
async def test_a_refused_login_logs_no_unhandled_error_at_the_aggregator(world: World, log_events) -> None:
    coordinator = world.coordinator(secret="the-right-one")
    aggregator = world.aggregator(coordinator, secret="a-wrong-one")
    aggregator.link.startService()
    # The second refusal comes after the first refused connection was closed on both ends.
    await wait_until(lambda: len(logged(log_events, "refused PB login")) >= 2, WAIT, "two refused logins")
    assert not [message for message in unhandled_errors(log_events) if "NoTransition" in message]


@pytest_twisted.ensureDeferred
async def test_a_refused_login_is_one_warning_at_the_coordinator(world: World, log_events) -> None:
    coordinator = world.coordinator(secret="the-right-one")
    aggregator = world.aggregator(coordinator, secret="a-wrong-one")
    aggregator.link.startService()
    await wait_until(lambda: bool(logged(log_events, "the coordinator refused our login")), WAIT, "a refused login")
    assert len(logged(log_events, "refused PB login")) == 1
    assert not [message for message in unhandled_errors(log_events) if "UnauthorizedLogin" in message]


# -- 3. a full round over the link ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_full_round_over_the_link(world: World) -> None:
    coordinator, aggregator = await world.linked(rounds=2)
    (participant,) = selected(coordinator)

    answer = await start(coordinator, participant)
    assert answer.ok and answer.url == AGGREGATOR_URL and answer.token
    assert admits(aggregator, participant, answer.token), "start training answered before the aggregator admitted"

    array = weights(1)
    await upload(aggregator, participant, answer.token, 5, array)
    # The upload is answered only after the coordinator recorded it.
    assert coordinator.service.machine.state_of(participant) is not ParticipantState.SELECTED
    await round_completed(coordinator, aggregator, 1)

    assert coordinator.service.machine.phase is Phase.TRAINING
    assert aggregator.service.status()["accepted"] == 0
    np.testing.assert_array_equal(global_model(aggregator), array)
    # The next round starts with the same participant, selected again.
    assert coordinator.service.machine.state_of(participant) is ParticipantState.SELECTED
    assert coordinator.service.heartbeat(participant).round == 1


# -- 4. the coordinator's PB listener restarts mid-round --------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_aggregator_reconnects_after_the_coordinators_listener_restarted(world: World) -> None:
    coordinator, aggregator = await world.linked(rounds=2, min_clients=2)
    one, two = selected(coordinator, 2)
    answers = {participant: await start(coordinator, participant) for participant in (one, two)}
    assert all(answer.ok for answer in answers.values())

    await coordinator.stop_listening()
    await coordinator.drop_connections()
    await wait_until(lambda: not coordinator.service.status()["aggregator_attached"]
        and not aggregator.service.status()["coordinator_attached"], WAIT, "both ends see the link down")
    # One participant's upload completes while the link is down: its report waits for the link.
    array_one, array_two = weights(2), weights(7)
    finishing_one = Deferred.fromCoroutine(upload(aggregator, one, answers[one].token, 3, array_one))
    await wait_until(lambda: aggregator.service.status()["accepted"] == 1, WAIT, "the first result kept")
    assert not finishing_one.called, "the upload was answered before the coordinator recorded it"
    synced_before = len(aggregator.syncs)
    coordinator.listen()  # the same port again

    await attached(coordinator, aggregator, already_synced=synced_before)
    assert aggregator.syncs[-1][2] == {one: answers[one].token, two: answers[two].token}
    await finishing_one
    assert coordinator.service.machine.state_of(one) is ParticipantState.DONE
    assert admits(aggregator, two, answers[two].token), "the admitted token no longer works after the reconnection"

    await upload(aggregator, two, answers[two].token, 5, array_two)
    await round_completed(coordinator, aggregator, 1)
    expected = np.average(np.stack([array_one, array_two]), axis=0, weights=[3, 5])
    np.testing.assert_allclose(global_model(aggregator), expected, rtol=1e-12, atol=0)


# -- 5. the aggregator restarts mid-round -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_aggregator_restart_mid_round_keeps_every_accepted_result_once(world: World) -> None:
    coordinator, first = await world.linked(rounds=2, min_clients=2)
    one, two = selected(coordinator, 2)
    answers = {participant: await start(coordinator, participant) for participant in (one, two)}
    assert all(answer.ok for answer in answers.values())

    array_one, array_two = weights(3), weights(4)
    await upload(first, one, answers[one].token, 3, array_one)
    assert coordinator.service.machine.state_of(one) is ParticipantState.DONE
    # The second participant's upload is half-way when the aggregator goes down.
    sending, body = begin(first, two, answers[two].token, 7, array_two)
    sending.write(body[: len(body) // 2])
    await first.stop()
    await wait_until(
        lambda: not coordinator.service.status()["aggregator_attached"],
        WAIT,
        "the coordinator saw the aggregator leave",
    )
    assert coordinator.service.machine.round == 0

    second = world.aggregator(coordinator, state_dir=first.state_dir)
    assert second.service.status()["accepted"] == 1, "the accepted result was not recovered from disk"
    second.link.startService()
    await attached(coordinator, second)
    assert second.syncs[-1] == (0, [one], {two: answers[two].token})
    assert second.service.status()["accepted"] == 1

    await upload(second, two, answers[two].token, 7, array_two)
    await round_completed(coordinator, second, 1)

    expected = np.average(np.stack([array_one, array_two]), axis=0, weights=[3, 7])
    np.testing.assert_allclose(global_model(second), expected, rtol=1e-12, atol=0)
    # Removed after the answer, on a disk thread.
    await wait_until(
        lambda: not os.path.exists(os.path.join(first.state_dir, "round-0")),
        WAIT,
        "the aggregated round's results removed",
    )


# -- 6. calls that never answer ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_admit_that_never_answers_times_out_and_leaves_the_participant_selected(world: World) -> None:
    coordinator = world.coordinator(admit_timeout=0.5)
    aggregator = world.aggregator(coordinator, mind=StallingMind)
    mind = aggregator.link.mind
    assert isinstance(mind, StallingMind)
    mind.stall_admit = True
    aggregator.link.startService()
    await attached(coordinator, aggregator)
    (participant,) = selected(coordinator)

    began = reactor.seconds()
    answer = await start(coordinator, participant)
    assert answer == StartTrainingAnswer(ok=False)
    assert reactor.seconds() - began >= 0.5 - 0.05
    assert coordinator.service.machine.state_of(participant) is ParticipantState.SELECTED
    assert coordinator.service.heartbeat(participant).state is HeartbeatState.ROUND
    assert coordinator.service.admitted_tokens() == {}
    assert coordinator.service.status()["aggregator_attached"] is True

    # Once the aggregator answers again, the same participant is admitted.
    mind.stall_admit = False
    answer = await start(coordinator, participant)
    assert answer.ok
    assert coordinator.service.admitted_tokens() == {participant: answer.token}
    assert admits(aggregator, participant, answer.token)


@pytest_twisted.ensureDeferred
async def test_an_aggregation_that_never_answers_times_out_and_the_round_runs_again(world: World) -> None:
    coordinator = world.coordinator(rounds=2, aggregation_timeout=0.5)
    aggregator = world.aggregator(coordinator, mind=StallingMind)
    mind = aggregator.link.mind
    assert isinstance(mind, StallingMind)
    mind.stall_aggregate = True
    aggregator.link.startService()
    await attached(coordinator, aggregator)
    (participant,) = selected(coordinator)

    answer = await start(coordinator, participant)
    assert answer.ok
    synced_before = len(aggregator.syncs)
    await upload(aggregator, participant, answer.token, 5, weights(5))
    assert coordinator.service.machine.phase is Phase.AGGREGATING

    await wait_until(lambda: coordinator.service.machine.phase is Phase.TRAINING, WAIT, "the aggregation timed out")
    assert coordinator.service.machine.round == 0
    assert coordinator.service.machine.state_of(participant) is ParticipantState.SELECTED
    assert coordinator.service.admitted_tokens() == {}
    # The repeated round tells the aggregator to forget the results of the failed attempt.
    await wait_until(lambda: len(aggregator.syncs) > synced_before, WAIT, "the coordinator synchronised the repeated round")
    assert aggregator.syncs[-1] == (0, [], {})
    assert aggregator.service.status()["accepted"] == 0
    assert aggregator.service.global_model().round == 0
    assert not admits(aggregator, participant, answer.token)

    # The repeated round completes with the new result only.
    mind.stall_aggregate = False
    again = await start(coordinator, participant)
    assert again.ok and again.token != answer.token
    array = weights(6)
    await upload(aggregator, participant, again.token, 2, array)
    await round_completed(coordinator, aggregator, 1)
    np.testing.assert_array_equal(global_model(aggregator), array)


@pytest_twisted.ensureDeferred
async def test_an_aggregation_that_finishes_after_the_timeout_is_caught_up(world: World) -> None:
    backend = SlowBackend()
    # admit_timeout also bounds the sync that catches up: generous, so that a loaded machine does not lose it.
    coordinator = world.coordinator(rounds=3, aggregation_timeout=0.5, admit_timeout=WAIT)
    aggregator = world.aggregator(coordinator, backend=backend)
    try:
        aggregator.link.startService()
        await attached(coordinator, aggregator)
        (participant,) = selected(coordinator)
        answer = await start(coordinator, participant)
        assert answer.ok
        array = weights(8)
        await upload(aggregator, participant, answer.token, 4, array)
        await wait_until(backend.started.is_set, WAIT, "the aggregation started")
        await wait_until(lambda: coordinator.service.machine.phase is Phase.TRAINING, WAIT, "the aggregation timed out")
        assert coordinator.service.machine.round == 0
    finally:
        backend.released.set()
    # The aggregation the coordinator gave up on finishes after all.
    await wait_until(lambda: aggregator.service.global_model().round == 1, WAIT, "the late aggregation installed")
    np.testing.assert_array_equal(global_model(aggregator), array)

    # The participant asks to train again and again (as its `round` heartbeats tell it); the
    # coordinator must line up with the aggregator's newer model rather than stay at round 0
    # for good. A refused start makes it sync; until the aggregator has applied its new
    # model to its rules (a step after the model file), the sync still says round 0.
    deadline = reactor.seconds() + WAIT
    while coordinator.service.machine.round != 1:
        assert reactor.seconds() < deadline, "not within WAIT s: the coordinator caught up with round 1"
        if coordinator.service.machine.state_of(participant) is ParticipantState.SELECTED:
            await start(coordinator, participant)
        await deferLater(reactor, POLL, lambda: None)  # a participant's pace between two asks
    again = await start(coordinator, participant)
    assert again.ok
