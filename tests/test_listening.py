"""Listeners get a deep accept queue unless their endpoint string sets one (xaind/listening.py)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from xaind.listening import DEFAULT_BACKLOG, ListeningService, with_default_backlog


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:8081:interface=127.0.0.1", f"tcp:8081:interface=127.0.0.1:backlog={DEFAULT_BACKLOG}"),
        ("tcp:8081:backlog=10:interface=127.0.0.1", "tcp:8081:backlog=10:interface=127.0.0.1"),
        ("ssl:8443:privateKey=k.pem", f"ssl:8443:privateKey=k.pem:backlog={DEFAULT_BACKLOG}"),
        ("xaind-tls:8443:privateKey=k.pem:clientCA=ca.pem", f"xaind-tls:8443:privateKey=k.pem:clientCA=ca.pem:backlog={DEFAULT_BACKLOG}"),
        ("unix:/run/xain/api.sock", f"unix:/run/xain/api.sock:backlog={DEFAULT_BACKLOG}"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
    ids=["tcp", "tcp-with-backlog", "ssl", "xaind-tls", "unix", "systemd-takes-none"],
)
def test_the_default_backlog_is_added_where_it_is_missing(description: str, expected: str) -> None:
    assert with_default_backlog(description) == expected


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("description", "backlog"), [("tcp:0:interface=127.0.0.1", DEFAULT_BACKLOG), ("tcp:0:interface=127.0.0.1:backlog=7", 7)])
async def test_a_bound_listener_has_that_backlog(description: str, backlog: int) -> None:
    service = ListeningService("test listener", description, Factory.forProtocol(Protocol), reactor)
    service.startService()
    try:
        port = await service.when_listening()
        assert port.backlog == backlog
    finally:
        await service.stopService()
