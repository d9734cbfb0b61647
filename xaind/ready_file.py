"""`--ready-file PATH`: where a daemon tells programs that it is up and which ports it bound.

Port 0 in a listen address lets the OS choose; a program that started the
daemon (the tools, the benchmarks, the tests, a supervisor) needs the bound
ports, and should not parse log text for them. Once every listener is bound
and the reactor runs (so that SIGTERM stops the daemon cleanly), the daemon
writes, atomically (a temporary file renamed into place, so a
reader sees the whole document or none):

    {"pid": 1234, "listeners": {"coordinator HTTP API": {"host": "127.0.0.1", "port": 41234}, ...}}

keyed by the listener names of xaind.protocol. A listener on a UNIX socket
is given as {"path": ...}. The file is removed when the daemon stops cleanly,
so a file left behind names a daemon that crashed: its pid tells them apart.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.python.failure import Failure

from xaind.listening import ListeningService
from xaind.logs import get_logger
from xaind.state import write_atomically

log = get_logger("xaind.ready_file")


def listener_address(port: IListeningPort) -> dict[str, Any]:
    """How a bound port is named in the ready file."""
    address = port.getHost()
    host = getattr(address, "host", None)
    number = getattr(address, "port", None)
    if host is not None and number is not None:
        return {"host": host, "port": number}
    name = getattr(address, "name", None)
    return {"path": name.decode() if isinstance(name, bytes) else str(name)}


def ready_document(pid: int, ports: dict[str, IListeningPort]) -> dict[str, Any]:
    return {"pid": pid, "listeners": {what: listener_address(port) for what, port in ports.items()}}


class ReadyFileService(Service):
    """Writes the ready file once all `listeners` are bound; removes it at stop.

    Add it to the service tree after the listeners, so that it is stopped
    (and the file removed) before they are.
    """

    def __init__(self, path: str, listeners: list[ListeningService], reactor: Any) -> None:
        self.path = os.path.abspath(path)
        self.listeners = listeners
        self.reactor = reactor
        self._written = False

    def startService(self) -> None:
        super().startService()
        waiting: Deferred[list[Any]] = gatherResults([listener.when_listening() for listener in self.listeners], consumeErrors=True)
        waiting.addCallback(self._all_listening).addErrback(self._failed)

    def _all_listening(self, ports: list[IListeningPort]) -> None:
        # twistd starts the services before the reactor runs, and the reactor
        # installs its SIGTERM handler (a clean stop, which removes this file)
        # only when it starts running: "ready" promises that SIGTERM stops the
        # daemon cleanly, so the file waits for the running reactor.
        self.reactor.callWhenRunning(self._write, ports)

    def _write(self, ports: list[IListeningPort]) -> None:
        if not self.running:
            return
        document = ready_document(os.getpid(), {listener.what: port for listener, port in zip(self.listeners, ports)})
        write_atomically(self.path, json.dumps(document, indent=1).encode("utf-8") + b"\n")
        self._written = True
        log.info("ready: listeners written to {path}", path=self.path)

    def _failed(self, failure: Failure) -> None:
        # Whoever waits for the file would wait in vain: stop instead.
        log.critical("cannot write the ready file {path}: {error}", path=self.path, error=failure.getErrorMessage())
        self.reactor.stop()

    def stopService(self) -> None:
        super().stopService()
        if self._written:
            self._written = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def ready_file_problem(path: str) -> str | None:
    """Why `path` cannot be a ready file, or None: checked with the options, before anything listens."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        return f"--ready-file: no such directory: {directory}"
    if os.path.isdir(path):
        return f"--ready-file: is a directory: {path}"
    return None
