"""`xaind-tcp:` listeners: several processes share a port with reusePort=yes, and the kernel spreads connections."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from twisted.internet import endpoints
from twisted.internet.testing import MemoryReactor

from xaind.config import server_endpoint_problem
from xaind.listening import with_default_backlog
from xaind.reuse_port import ReusePortServerEndpoint

#: A process listening on the port given as its argument with reusePort=yes; prints "listening" then
#: answers every connection with its own pid, until its standard input closes.
LISTENER = """
import os, sys
from twisted.internet import reactor, endpoints, protocol, stdio
class Pid(protocol.Protocol):
    def connectionMade(self):
        self.transport.write(str(os.getpid()).encode()); self.transport.loseConnection()
class Stop(protocol.Protocol):
    def connectionLost(self, reason):
        reactor.stop()
def listening(port):
    print("listening", flush=True)
endpoints.serverFromString(reactor, f"xaind-tcp:{sys.argv[1]}:interface=127.0.0.1:reusePort=yes").listen(
    protocol.Factory.forProtocol(Pid)).addCallback(listening)
stdio.StandardIO(Stop())
reactor.run()
"""


def test_the_endpoint_string_is_parsed_with_its_options() -> None:
    endpoint = endpoints.serverFromString(MemoryReactor(), "xaind-tcp:8081:interface=127.0.0.1:backlog=7:reusePort=yes")
    assert isinstance(endpoint, ReusePortServerEndpoint)
    assert (endpoint.port, endpoint.interface, endpoint.backlog, endpoint.reuse_port) == (8081, "127.0.0.1", 7, True)
    assert with_default_backlog("xaind-tcp:8081") == "xaind-tcp:8081:backlog=4096"
    assert server_endpoint_problem("xaind-tcp:8081:reusePort=perhaps") == (
        "not a valid endpoint (reusePort must be yes or no, got 'perhaps'), got 'xaind-tcp:8081:reusePort=perhaps'"
    )


def test_two_processes_share_a_port_and_the_survivor_takes_the_connections() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [
        subprocess.Popen([sys.executable, "-c", LISTENER, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None and process.stdout.readline().strip() == "listening"

        def answering_pids(count: int) -> set[int]:
            pids = set()
            for _ in range(count):
                with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
                    pids.add(int(connection.recv(32)))
            return pids

        # The kernel hashes each new connection's addresses to one of the sockets: 200 reach both.
        assert answering_pids(200) == {process.pid for process in processes}
        processes[0].kill()
        processes[0].wait(10)
        assert answering_pids(50) == {processes[1].pid}
    finally:
        for process in processes:
            if process.poll() is None:
                assert process.stdin is not None
                process.stdin.close()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)


def test_without_reuse_port_a_second_listener_is_refused() -> None:
    first = ReusePortServerEndpoint(None, 0, "127.0.0.1", reuse_port=True)
    listening = socket.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listening.bind(("127.0.0.1", 0))
    listening.listen(1)
    try:
        port = listening.getsockname()[1]
        with pytest.raises(OSError):
            ReusePortServerEndpoint(None, port, "127.0.0.1", reuse_port=False)._listen(None)  # type: ignore[arg-type]
    finally:
        listening.close()
    assert first.reuse_port
