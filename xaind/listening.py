"""A listener service that says where it listens.

Listen addresses are endpoint strings, and port 0 lets the OS choose: the
log line naming the bound address tells an operator, and `when_listening`
tells the ready file (xaind/ready_file.py), which is how programs learn it.

A listener's queue of connections not yet accepted (`backlog=`) is
DEFAULT_BACKLOG unless the string says otherwise: Twisted's default, 50,
overflows when a thousand participants connect at once, and the kernel then
drops their handshakes silently, so that some wait for retransmissions for
a minute and more (the kernel caps the figure at `net.core.somaxconn`).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.python.failure import Failure

from xaind.config import endpoint_arguments
from xaind.logs import get_logger


class ListenError(Exception):
    """A listener could not bind its address."""


#: The accept queue of every listener whose endpoint string does not set `backlog=`.
DEFAULT_BACKLOG = 4096
#: Endpoint types that take a `backlog=` argument.
_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix", "xaind-tls", "xaind-tcp")


def with_default_backlog(description: str) -> str:
    """`description` with `backlog=DEFAULT_BACKLOG` added, unless it sets one or its type takes none."""
    kind, _, named = endpoint_arguments(description)
    if kind not in _BACKLOG_TYPES or "backlog" in named:
        return description
    return f"{description}:backlog={DEFAULT_BACKLOG}"


log = get_logger("xaind.listening")


def describe_address(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    return name.decode() if isinstance(name, bytes) else str(name or address)


class ListeningService(Service):
    def __init__(self, what: str, description: str, factory: IProtocolFactory, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.what = what
        self.description = description
        self.endpoint = endpoints.serverFromString(reactor, with_default_backlog(description))
        self.factory = factory
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None
        self._waiting: list[Deferred[IListeningPort]] = []

    def when_listening(self) -> Deferred[IListeningPort]:
        """Fires with the bound port once this listener is bound (at once if it is already)."""
        if self.port is not None:
            return succeed(self.port)
        waiting: Deferred[IListeningPort] = Deferred()
        self._waiting.append(waiting)
        return waiting

    def startService(self) -> None:
        super().startService()
        failures: list[Failure] = []
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, failures.append)
        if failures:
            # Failing synchronously makes twistd exit non-zero at start-up
            # with the reason, instead of running without a listener.
            raise ListenError(f"{self.what} cannot listen on {self.description}: {failures[0].getErrorMessage()}")
        self._listening.addErrback(self._failed)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        log.info("{what} listening on {address}", what=self.what, address=describe_address(port.getHost()))
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(port)
        return port

    def _failed(self, failure: Failure) -> None:
        log.critical(
            "{what} cannot listen on {description}: {error}",
            what=self.what,
            description=self.description,
            error=failure.getErrorMessage(),
        )
        self.reactor.stop()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
