"""A PB participant hears the answer to its rendez-vous before any push concerning it (docs/pb-protocol.rst, Ordering).

The coordinator's real PB factory listens on 127.0.0.1 on the real
reactor; plain `twisted.spread.pb` clients (no `xaind.sdk`) log in with a
mind that records, in arrival order, the answers and the pushes. Each run
is arranged so that the round starts on that participant's arrival: its
own rendez-vous is what selects it, which is when a push could overtake
the answer. Many runs, each with a fresh coordinator.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import Anonymous
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.spread import pb

from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.pb import coordinator_pb_factory
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings
from xaind.protocol import PARTICIPANT_PROTOCOL, PARTICIPANT_PROTOCOL_VERSION, PBMethod
from xaind.testing.waiting import wait_until

WAIT = 10.0
RUNS = 40


class RecordingMind(pb.Referenceable):
    """What a client written from the document sees, in the order it arrives."""

    def __init__(self, events: list[tuple[str, Any]]) -> None:
        self.events = events

    def remote_selected(self, round_number: int) -> None:
        self.events.append(("selected", round_number))

    def remote_finished(self) -> None:
        self.events.append(("finished", None))


class Coordinator:
    """A fresh coordinator service behind its real PB listener on loopback."""

    def __init__(self, min_clients: int) -> None:
        settings = FederatedLearningSettings(rounds=2, participants_ratio=1.0, min_clients=min_clients,
                                             heartbeat_timeout=600.0, training_timeout=600.0)
        self.link = AggregatorLink()
        self.service = CoordinatorService(settings, AggregatorSettings(url="http://aggregator.test:1", admit_timeout=5.0),
                                          self.link, clock=reactor)
        self.service.startService()
        self.port = reactor.listenTCP(0, coordinator_pb_factory(self.service, self.link, "secret"), interface="127.0.0.1")
        self.clients: list[pb.PBClientFactory] = []

    async def login(self, mind: pb.Referenceable) -> pb.RemoteReference:
        factory = pb.PBClientFactory()
        factory.noisy = False
        self.clients.append(factory)
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory, timeout=WAIT)
        return await factory.login(Anonymous(), client=mind).addTimeout(WAIT, reactor)

    async def stop(self) -> None:
        for factory in self.clients:
            factory.disconnect()
        await self.port.stopListening()
        self.service.stopService()
        await deferLater(reactor, 0, lambda: None)


async def rendez_vous_recorded(perspective: pb.RemoteReference, events: list[tuple[str, Any]]) -> str:
    """The client's rendez-vous; its answer recorded among the events when it arrives."""
    answer = await perspective.callRemote(PBMethod.RENDEZ_VOUS).addTimeout(WAIT, reactor)
    assert answer["ok"] is True
    events.append(("answer", answer["id"]))
    return str(answer["id"])


def pushed_after_the_answer(events: list[tuple[str, Any]]) -> None:
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "answer", events
    assert kinds.count("selected") == 1, events


@pytest.mark.parametrize("min_clients", [1, 3], ids=["first-arrival-starts", "third-arrival-starts"])
@pytest_twisted.ensureDeferred
async def test_the_rendez_vous_answer_arrives_before_the_push_of_the_round_it_starts(min_clients: int) -> None:
    for _ in range(RUNS):
        coordinator = Coordinator(min_clients)
        try:
            logs = [[] for _ in range(min_clients)]
            perspectives = [await coordinator.login(RecordingMind(events)) for events in logs]
            for perspective, events in zip(perspectives[:-1], logs[:-1]):
                await rendez_vous_recorded(perspective, events)
            assert all(events == [("answer", events[0][1])] for events in logs[:-1])  # no round before the last arrival
            last = logs[-1]
            participant_id = await rendez_vous_recorded(perspectives[-1], last)
            await wait_until(lambda: ("selected", 0) in last, WAIT, "the push of round 0")
            pushed_after_the_answer(last)
            assert coordinator.service.machine.state_of(participant_id).value == "selected"
            for events in logs[:-1]:
                await wait_until(lambda: ("selected", 0) in events, WAIT, "the others' push of round 0")
        finally:
            await coordinator.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_rendez_vous_sends_no_push_held_for_it() -> None:
    """Training complete: the rendez-vous is answered ok false, and nothing is pushed to the mind."""
    coordinator = Coordinator(1)
    try:
        events: list[tuple[str, Any]] = []
        coordinator.service.machine.resume_at(2)  # both rounds done: training complete
        perspective = await coordinator.login(RecordingMind(events))
        answer = await perspective.callRemote(PBMethod.RENDEZ_VOUS).addTimeout(WAIT, reactor)
        assert answer["ok"] is False
        # A push released after the answer would be written before the answer to a later call on this connection.
        await perspective.callRemote(PBMethod.HEARTBEAT, answer["id"]).addTimeout(WAIT, reactor)
        assert events == []
    finally:
        await coordinator.stop()


@pytest_twisted.ensureDeferred
async def test_the_coordinator_announces_its_participant_protocol_version() -> None:
    coordinator = Coordinator(1)
    try:
        perspective = await coordinator.login(RecordingMind([]))
        answer = await perspective.callRemote(PBMethod.PROTOCOL_VERSION).addTimeout(WAIT, reactor)
        assert answer == {"name": PARTICIPANT_PROTOCOL, "version": PARTICIPANT_PROTOCOL_VERSION} == {"name": "xaind-participant-pb", "version": 1}
    finally:
        await coordinator.stop()



@pytest_twisted.ensureDeferred
async def test_a_participant_that_reconnects_resumes_its_pushes_on_the_new_connection() -> None:
    """resume(id) on a new connection: answered as a heartbeat, then the id's pushes reach the new mind."""
    coordinator = Coordinator(2)
    try:
        first: list[tuple[str, Any]] = []
        old = await coordinator.login(RecordingMind(first))
        participant_id = await rendez_vous_recorded(old, first)
        coordinator.clients[0].disconnect()  # the connection is lost; the id stays known
        await wait_until(lambda: coordinator.service.watched_count() == 0, WAIT, "the lost connection's watch dropped")

        resumed: list[tuple[str, Any]] = []
        new = await coordinator.login(RecordingMind(resumed))
        answer = await new.callRemote(PBMethod.RESUME, participant_id).addTimeout(WAIT, reactor)
        assert answer == {"state": "stand_by", "round": None}
        resumed.append(("answer", participant_id))
        other: list[tuple[str, Any]] = []
        await rendez_vous_recorded(await coordinator.login(RecordingMind(other)), other)  # the round starts
        await wait_until(lambda: ("selected", 0) in resumed, WAIT, "the push of round 0 on the new connection")
        pushed_after_the_answer(resumed)
        assert first == [("answer", participant_id)]
    finally:
        await coordinator.stop()


@pytest_twisted.ensureDeferred
async def test_resuming_an_unknown_id_is_a_reject_and_watches_nothing() -> None:
    coordinator = Coordinator(1)
    try:
        events: list[tuple[str, Any]] = []
        perspective = await coordinator.login(RecordingMind(events))
        answer = await perspective.callRemote(PBMethod.RESUME, "no-such-participant").addTimeout(WAIT, reactor)
        assert answer == {"state": "reject", "round": None}
        assert coordinator.service.watched_count() == 0 and events == []
    finally:
        await coordinator.stop()
