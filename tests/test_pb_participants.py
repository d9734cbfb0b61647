"""What an anonymous PB client can make the coordinator hold and log (docs/pb-protocol.rst).

The coordinator's real PB factory listens on 127.0.0.1 (an OS-chosen port)
on the real reactor, and real PB clients connect and log in: anonymously as
participants, or as the aggregator without a mind. Every wait is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import Anonymous, UsernamePassword
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import formatEvent
from twisted.spread import pb

from xaind.aggregator.coordinator_link import refusal_code
from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.pb import ParticipantPerspective, coordinator_pb_factory
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings
from xaind.protocol import AGGREGATOR_USER, ErrorCode, PBMethod
from xaind.testing.waiting import wait_until

WAIT = 10.0  # seconds: the bound on every wait
SECRET = "s3cret-for-the-pb-tests"


class Mind(pb.Referenceable):
    """A participant's mind that records what the coordinator pushes."""

    def __init__(self) -> None:
        self.selected: list[int] = []

    def remote_selected(self, round_number: int) -> None:
        self.selected.append(round_number)

    def remote_finished(self) -> None:
        pass


class SilentAggregatorMind(pb.Referenceable):
    """An aggregator's mind that never answers the coordinator's sync (not under test here)."""

    def remote_sync(self, round_number: int, done: Any, admitted: Any) -> Deferred[Any]:
        return Deferred()


@dataclass
class Listener:
    """The coordinator's PB listener, and the perspectives its realm handed out."""

    service: CoordinatorService
    port: Any
    perspectives: list[Any] = field(default_factory=list)
    factories: list[pb.PBClientFactory] = field(default_factory=list)

    async def client(self) -> pb.PBClientFactory:
        factory = pb.PBClientFactory()
        factory.noisy = False
        self.factories.append(factory)
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory, timeout=WAIT)
        return factory

    async def participant(self, mind: Any = None) -> pb.RemoteReference:
        factory = await self.client()
        return await factory.login(Anonymous(), client=mind).addTimeout(WAIT, reactor)


@pytest_twisted.async_yield_fixture
async def listener():
    settings = FederatedLearningSettings(
        rounds=3, participants_ratio=1.0, min_clients=1, heartbeat_timeout=600.0, training_timeout=600.0
    )
    link = AggregatorLink()
    service = CoordinatorService(
        settings, AggregatorSettings(url="http://aggregator.test:18082", admit_timeout=5.0), link, clock=reactor
    )
    factory = coordinator_pb_factory(service, link, SECRET)
    realm = factory.root.portal.realm
    request_avatar = realm.requestAvatar
    found = Listener(service, None)

    def recorded(avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        answer = request_avatar(avatar_id, mind, *interfaces)
        found.perspectives.append(answer[1])
        return answer

    realm.requestAvatar = recorded
    service.startService()
    found.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield found
    for client in found.factories:
        client.disconnect()
    await found.port.stopListening()
    service.stopService()
    deadline = reactor.seconds() + 2.0
    while reactor.getDelayedCalls() and reactor.seconds() < deadline:
        await deferLater(reactor, 0.01, lambda: None)



def messages(events: list[dict], namespace: str = "") -> list[str]:
    return [formatEvent(event) for event in events if event.get("log_namespace", "").startswith(namespace)]


def failures(events: list[dict]) -> list[str]:
    """Every logged failure or error (each one a traceback in twistd's log)."""
    return [formatEvent(event) for event in events if event.get("isError") or event.get("log_failure") is not None]


async def refused_with(call: Deferred) -> str:
    """The message of the PB error a remote call failed with."""
    try:
        answer = await call.addTimeout(WAIT, reactor)
    except pb.Error as error:  # a copied pb.Error arrives as pb.RemoteError (a pb.Error)
        return str(getattr(error, "remoteType", b"")) + " " + str(error)
    except Exception as error:  # noqa: BLE001 - whatever it is, it is the failure under test
        return f"{type(error).__name__} {error}"
    raise AssertionError(f"the call was answered {answer!r}, not refused")


def code_of(message: str) -> ErrorCode | None:
    return refusal_code(message.split(" ", 1)[1] if " " in message else message)


# -- what one connection makes the coordinator hold -----------------------------------------------------

RENDEZ_VOUS_ON_ONE_CONNECTION = 20_000
BATCH = 500  # calls in flight at once


@pytest_twisted.ensureDeferred
async def test_many_rendez_vous_on_one_connection_keep_its_bookkeeping_constant(listener: Listener) -> None:
    mind = Mind()
    perspective = await listener.participant(mind)
    (server_side,) = listener.perspectives
    assert isinstance(server_side, ParticipantPerspective)
    last_id = None
    for batch in range(1, RENDEZ_VOUS_ON_ONE_CONNECTION // BATCH + 1):
        answers = await gatherResults(
            [perspective.callRemote(PBMethod.RENDEZ_VOUS) for _ in range(BATCH)]
        ).addTimeout(WAIT, reactor)
        assert all(answer["ok"] for answer in answers)
        last_id = answers[-1]["id"]
        # The bookkeeping never grows past one id: the connection's latest.
        watching = sum(1 for notifier in listener.service._notifiers.values() if notifier is server_side.push)
        assert watching == 1, f"after {batch * BATCH} rendez-vous, {watching} ids push to this connection"
        assert len(server_side.watched_ids) == 1
    assert server_side.watched_ids == [last_id]
    assert listener.service._notifiers[last_id] is server_side.push


@pytest_twisted.ensureDeferred
async def test_the_latest_id_of_a_connection_still_gets_its_pushes(listener: Listener) -> None:
    mind = Mind()
    perspective = await listener.participant(mind)
    first = await perspective.callRemote(PBMethod.RENDEZ_VOUS)  # selected for round 0 at once (min_clients 1)
    await wait_until(lambda: mind.selected == [0], WAIT, "the first id's selection pushed")
    second = await perspective.callRemote(PBMethod.RENDEZ_VOUS)
    (server_side,) = listener.perspectives
    assert server_side.watched_ids == [second["id"]]
    assert first["id"] not in listener.service._notifiers
    assert (await perspective.callRemote(PBMethod.HEARTBEAT, second["id"]))["state"] == "stand_by"


# -- calls it cannot take ----------------------------------------------------------------------------------


BAD_CALLS = [
    pytest.param(PBMethod.HEARTBEAT, (), ErrorCode.BAD_REQUEST, id="missing-argument"),
    pytest.param(PBMethod.HEARTBEAT, ("a", "b", "c"), ErrorCode.BAD_REQUEST, id="too-many-arguments"),
    pytest.param(PBMethod.HEARTBEAT, ([1, 2, 3],), ErrorCode.BAD_REQUEST, id="id-not-a-string"),
    pytest.param(PBMethod.START_TRAINING, (None,), ErrorCode.BAD_REQUEST, id="start-training-none"),
    pytest.param(PBMethod.RENDEZ_VOUS, ("extra",), ErrorCode.BAD_REQUEST, id="rendez-vous-with-argument"),
    pytest.param("no_such_method", (), ErrorCode.NOT_FOUND, id="unknown-method"),
    pytest.param("x" * 5000, (), ErrorCode.NOT_FOUND, id="huge-unknown-method"),
]


@pytest.mark.parametrize(("method", "arguments", "code"), BAD_CALLS)
@pytest_twisted.ensureDeferred
async def test_a_call_with_bad_arguments_is_refused_with_a_code_and_one_short_line(
    listener: Listener, log_events: list[dict], method: str, arguments: tuple[Any, ...], code: ErrorCode
) -> None:
    perspective = await listener.participant(Mind())
    calls = 50
    for _ in range(calls):
        message = await refused_with(perspective.callRemote(method, *arguments))
        assert code_of(message) == code, message
    assert failures(log_events) == []
    lines = messages(log_events, "xaind.coordinator.pb")
    assert len(lines) <= calls
    assert all(len(line) < 300 and "Traceback" not in line for line in lines), lines
    # The connection still serves good calls.
    assert (await perspective.callRemote(PBMethod.RENDEZ_VOUS))["ok"] is True


@pytest_twisted.ensureDeferred
async def test_the_aggregator_perspective_refuses_bad_arguments_too(listener: Listener, log_events: list[dict]) -> None:
    factory = await listener.client()
    perspective = await factory.login(
        UsernamePassword(AGGREGATOR_USER, SECRET.encode()), client=SilentAggregatorMind()
    ).addTimeout(WAIT, reactor)
    message = await refused_with(perspective.callRemote(PBMethod.END_TRAINING, "only-one-argument"))
    assert code_of(message) == ErrorCode.BAD_REQUEST, message
    message = await refused_with(perspective.callRemote(PBMethod.END_TRAINING, 1, 2, True))
    assert code_of(message) == ErrorCode.BAD_REQUEST, message
    assert failures(log_events) == []


# -- logins it cannot take ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_aggregator_login_without_a_mind_is_refused_with_one_line(listener: Listener, log_events: list[dict]) -> None:
    factory = await listener.client()
    message = await refused_with(factory.login(UsernamePassword(AGGREGATOR_USER, SECRET.encode()), client=None))
    assert "mind" in message, message
    assert failures(log_events) == []
    lines = messages(log_events, "xaind.coordinator.pb")
    assert lines == ["refused PB login for aggregator: no mind (the coordinator calls the aggregator through it)"]
    assert listener.service.clock is reactor and not listener.perspectives


@pytest.mark.parametrize("mind", [5, "a string", [1, 2]], ids=["int", "str", "list"])
@pytest_twisted.ensureDeferred
async def test_a_participant_login_with_a_mind_that_is_no_reference_is_refused(
    listener: Listener, log_events: list[dict], mind: Any
) -> None:
    factory = await listener.client()
    message = await refused_with(factory.login(Anonymous(), client=mind))
    assert "mind" in message, message
    assert failures(log_events) == []
    assert len(messages(log_events, "xaind.coordinator.pb")) == 1


# -- calls before logging in: the portal's root and a login's challenger --------------------------------


ROOT_CALLS = [
    pytest.param("no_such_method", (), ErrorCode.NOT_FOUND, id="unknown-method"),
    pytest.param("login", (), ErrorCode.BAD_REQUEST, id="login-without-username"),
    pytest.param("login", (5,), ErrorCode.BAD_REQUEST, id="login-with-int-username"),
    pytest.param("login", ("aggregator",), ErrorCode.BAD_REQUEST, id="login-with-str-username"),
    pytest.param("loginAnonymous", (None, None), ErrorCode.BAD_REQUEST, id="anonymous-with-two-minds"),
]


@pytest.mark.parametrize(("method", "arguments", "code"), ROOT_CALLS)
@pytest_twisted.ensureDeferred
async def test_a_bad_call_on_the_login_root_is_refused_with_a_code_and_no_traceback(
    listener: Listener, log_events: list[dict], method: str, arguments: tuple[Any, ...], code: ErrorCode
) -> None:
    factory = await listener.client()
    root = await factory.getRootObject().addTimeout(WAIT, reactor)
    message = await refused_with(root.callRemote(method, *arguments))
    assert code_of(message) == code, message
    assert failures(log_events) == []
    assert len(messages(log_events, "xaind.coordinator.pb")) == 1


@pytest_twisted.ensureDeferred
async def test_a_bad_response_to_the_login_challenge_is_refused_with_a_code_and_no_traceback(
    listener: Listener, log_events: list[dict]
) -> None:
    factory = await listener.client()
    root = await factory.getRootObject().addTimeout(WAIT, reactor)
    _, challenger = await root.callRemote("login", AGGREGATOR_USER).addTimeout(WAIT, reactor)
    for arguments in [(), (b"response",), (5, None), (b"a", None, "extra")]:
        message = await refused_with(challenger.callRemote("respond", *arguments))
        assert code_of(message) == ErrorCode.BAD_REQUEST, (arguments, message)
    # A well-formed wrong answer is a refused login, as ever.
    message = await refused_with(challenger.callRemote("respond", b"\0" * 16, None))
    assert "wrong secret" in message, message
    assert failures(log_events) == []


@pytest_twisted.ensureDeferred
async def test_five_thousand_bad_calls_log_a_bounded_amount(listener: Listener, log_events: list[dict]) -> None:
    perspective = await listener.participant(Mind())
    calls = 5000
    for _ in range(calls // BATCH):
        results = await gatherResults(
            [
                perspective.callRemote(PBMethod.HEARTBEAT).addErrback(lambda failure: refusal_code(failure.getErrorMessage()))
                for _ in range(BATCH)
            ]
        ).addTimeout(WAIT, reactor)
        assert results == [ErrorCode.BAD_REQUEST] * BATCH
    assert failures(log_events) == []
    logged = messages(log_events, "xaind.coordinator.pb")
    assert len(logged) == calls
    assert sum(len(line) + 1 for line in logged) < calls * 100  # 4.3 MB of tracebacks before
