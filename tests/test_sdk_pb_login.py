"""The SDK's PB login: given up and retried when unanswered; refused when the coordinator's protocol is unknown.

A login that gets no answer is given up after `LOGIN_TIMEOUT` and retried,
not waited for forever: the server accepts the connection and never
answers (as one whose kernel dropped the connection from a full accept
queue looks to the client). After logging in the SDK asks for the
participant protocol's version and refuses one it does not know; an
earlier coordinator without the call is taken as version 1.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from xaind.coordinator.pb import ParticipantPerspective, ParticipantPush
from xaind.protocol import PARTICIPANT_PROTOCOL
from xaind.sdk import coordinator_client
from xaind.sdk.coordinator_client import PbCoordinatorClient, UnsupportedProtocol
from xaind.sdk.http import Transient
from xaind.testing.waiting import wait_until, within

from test_pb_ordering import Coordinator


class Silent(Protocol):
    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        pass


@pytest_twisted.ensureDeferred
async def test_an_unanswered_login_is_a_transient_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coordinator_client, "LOGIN_TIMEOUT", 0.3)
    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    client = PbCoordinatorClient(reactor, f"tcp:127.0.0.1:{port.getHost().port}")
    started = time.monotonic()
    try:
        with pytest.raises(Transient):
            await within(client.rendez_vous(None), 10)
    finally:
        await client.close()
        await port.stopListening()
    assert time.monotonic() - started < 5


# -- the participant protocol's version (docs/pb-protocol.rst, Versions) ------------------------------------------


class Noted:
    """Notifications of a participant runner, recorded."""

    def __init__(self) -> None:
        self.rounds: list[int] = []

    def selected(self, round_number: int) -> None:
        self.rounds.append(round_number)

    def finished(self) -> None:
        pass


async def rendez_vous_at(coordinator: Coordinator) -> tuple[PbCoordinatorClient, Any]:
    client = PbCoordinatorClient(reactor, f"tcp:127.0.0.1:{coordinator.port.getHost().port}")
    try:
        return client, await within(client.rendez_vous(Noted()), 10)
    except BaseException:
        await client.close()
        raise


@pytest_twisted.ensureDeferred
async def test_the_sdk_joins_a_coordinator_that_announces_version_1() -> None:
    coordinator = Coordinator(1)
    try:
        client, joined = await rendez_vous_at(coordinator)
        await client.close()
        assert joined.ok is True and coordinator.service.machine.state_of(joined.participant_id) is not None
    finally:
        await coordinator.stop()


@pytest_twisted.ensureDeferred
async def test_the_sdk_joins_an_earlier_coordinator_without_protocol_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """An earlier coordinator of this release: no protocol_version (not_found), and pushes before the answer."""
    monkeypatch.delattr(ParticipantPerspective, "perspective_protocol_version")
    monkeypatch.setattr(ParticipantPush, "hold", lambda self: None)
    coordinator = Coordinator(1)
    try:
        client, joined = await rendez_vous_at(coordinator)
        await client.close()
        assert joined.ok is True
    finally:
        await coordinator.stop()


@pytest.mark.parametrize(
    ("announced", "said"),
    [
        ({"name": PARTICIPANT_PROTOCOL, "version": 2}, "version 2; this SDK knows versions 1 to 1"),
        ({"name": "another-protocol", "version": 1}, "does not speak xaind-participant-pb"),
    ],
    ids=["newer-version", "another-protocol"],
)
@pytest_twisted.ensureDeferred
async def test_the_sdk_refuses_a_protocol_it_does_not_know(monkeypatch: pytest.MonkeyPatch, announced: dict[str, Any], said: str) -> None:
    monkeypatch.setattr(ParticipantPerspective, "perspective_protocol_version", lambda self: announced)
    coordinator = Coordinator(1)
    client = PbCoordinatorClient(reactor, f"tcp:127.0.0.1:{coordinator.port.getHost().port}")
    try:
        with pytest.raises(UnsupportedProtocol, match=said):
            await within(client.rendez_vous(Noted()), 10)
        assert coordinator.service.machine.known_count() == 0  # refused before its rendez-vous
    finally:
        await client.close()
        await coordinator.stop()


@pytest_twisted.ensureDeferred
async def test_after_a_reconnection_the_sdk_resumes_its_pushes() -> None:
    """The connection is lost after the rendez-vous: the next call logs in again and resumes the id's pushes there."""
    coordinator = Coordinator(2)
    client = PbCoordinatorClient(reactor, f"tcp:127.0.0.1:{coordinator.port.getHost().port}")
    noted = Noted()
    try:
        joined = await within(client.rendez_vous(noted), 10)
        assert client._factory is not None
        client._factory.disconnect()
        await wait_until(lambda: coordinator.service.watched_count() == 0, 10, "the lost connection's watch dropped")
        beat = await within(client.heartbeat(joined.participant_id), 10)
        assert beat.state == "stand_by" and coordinator.service.watched_count() == 1
        other = PbCoordinatorClient(reactor, f"tcp:127.0.0.1:{coordinator.port.getHost().port}")
        try:
            await within(other.rendez_vous(Noted()), 10)  # the second arrival starts round 0
            await wait_until(lambda: noted.rounds == [0], 10, "round 0 pushed to the resumed connection")
        finally:
            await other.close()
    finally:
        await client.close()
        await coordinator.stop()
