"""A PB login that gets no answer is given up after `LOGIN_TIMEOUT` and retried, not waited for forever.

The server accepts the connection and never answers (as one whose kernel
dropped the connection from a full accept queue looks to the client).
"""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from xaind.sdk import coordinator_client
from xaind.sdk.coordinator_client import PbCoordinatorClient
from xaind.sdk.http import Transient
from xaind.testing.waiting import within


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
