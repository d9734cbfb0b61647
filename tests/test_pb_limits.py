"""Rendez-vous and connection limits on the coordinator's PB listener, with real PB clients on 127.0.0.1.

A PB participant is counted by the address of its connection like an HTTP
one: beyond `participants.rendez_vous_per_address_per_minute` or
`participants.max_known` its rendez-vous is refused with a coded PB error
(docs/pb-protocol.rst), and connections beyond `pb.max_connections_per_address`
are closed at once. Every wait is bounded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.cred.credentials import Anonymous
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import deferLater
from twisted.spread import pb

from xaind.aggregator.coordinator_link import refusal_code
from xaind.connection_limits import ConnectionLimits
from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.pb import coordinator_pb_factory
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings, ParticipantLimits
from xaind.protocol import ErrorCode, PBMethod

WAIT = 10.0


class Served:
    def __init__(self, service: CoordinatorService, port: Any) -> None:
        self.service = service
        self.port = port
        self.clients: list[pb.PBClientFactory] = []

    async def login(self) -> pb.RemoteReference:
        factory = pb.PBClientFactory()
        factory.noisy = False
        self.clients.append(factory)
        reactor.connectTCP("127.0.0.1", self.port.getHost().port, factory, timeout=WAIT)
        return await factory.login(Anonymous()).addTimeout(WAIT, reactor)


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Any]:
    served: list[Served] = []

    def make(limits: ParticipantLimits, connections: ConnectionLimits = ConnectionLimits()) -> Served:
        link = AggregatorLink()
        service = CoordinatorService(
            FederatedLearningSettings(rounds=3, min_clients=1000, heartbeat_timeout=600.0),
            AggregatorSettings(url="http://aggregator.test:18082"),
            link,
            clock=reactor,
            limits=limits,
        )
        service.startService()
        port = reactor.listenTCP(0, coordinator_pb_factory(service, link, "pb-limits-secret", connections), interface="127.0.0.1")
        served.append(Served(service, port))
        return served[-1]

    yield make
    for each in served:
        for client in each.clients:
            client.disconnect()
        await each.port.stopListening()
        each.service.stopService()
    deadline = reactor.seconds() + 2.0
    while reactor.getDelayedCalls() and reactor.seconds() < deadline:
        await deferLater(reactor, 0.01, lambda: None)


async def refused_code(call: Deferred) -> str | None:
    try:
        await call.addTimeout(WAIT, reactor)
    except pb.RemoteError as error:  # how a PB client sees the coordinator's RefusedByCoordinator
        return refusal_code(str(error.args[0]))
    return None


@pytest_twisted.ensureDeferred
async def test_pb_rendez_vous_beyond_the_address_allowance_are_refused_with_a_code(serve) -> None:
    served = serve(ParticipantLimits(rendez_vous_per_address_per_minute=3))
    perspective = await served.login()
    for _ in range(3):
        assert (await perspective.callRemote(PBMethod.RENDEZ_VOUS).addTimeout(WAIT, reactor))["ok"] is True
    assert await refused_code(perspective.callRemote(PBMethod.RENDEZ_VOUS)) == ErrorCode.RENDEZ_VOUS_RATE_LIMITED.value
    assert served.service.machine.known_count() == 3
    assert served.service.status()["participants"]["waiting"] == 3


@pytest_twisted.ensureDeferred
async def test_pb_rendez_vous_beyond_max_known_are_refused_with_a_code(serve) -> None:
    served = serve(ParticipantLimits(max_known=2, rendez_vous_per_address_per_minute=0))
    perspective = await served.login()
    for _ in range(2):
        await perspective.callRemote(PBMethod.RENDEZ_VOUS).addTimeout(WAIT, reactor)
    assert await refused_code(perspective.callRemote(PBMethod.RENDEZ_VOUS)) == ErrorCode.TOO_MANY_PARTICIPANTS.value
    assert served.service.machine.known_count() == 2


@pytest_twisted.ensureDeferred
async def test_a_pb_connection_beyond_the_per_address_limit_is_closed_at_once(serve) -> None:
    served = serve(ParticipantLimits(), ConnectionLimits(max_connections=10, max_connections_per_address=1))
    await served.login()
    with pytest.raises((pb.PBConnectionLost, ConnectionDone, ConnectionLost)):
        await served.login()
