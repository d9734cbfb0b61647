"""`--ready-file PATH`: both daemons name their bound listeners in a JSON file, gone at a clean stop.

Real `twistd -n` processes on OS-chosen loopback ports; the ports in the
file are checked against real connections and against the daemon's log.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

from xaind.tools.daemons import LOOPBACK_ANY_PORT, START_TIMEOUT, Daemon, aggregator_document, free_loopback_port, run_twistd, wait_until, write_yaml

from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER

SECRET = "ready-file-test-secret"


def coordinator_config(tmp_path: Path) -> Path:
    return write_yaml(
        tmp_path / "coordinator.yaml",
        {
            "api": {"listen": LOOPBACK_ANY_PORT},
            "pb": {"listen": LOOPBACK_ANY_PORT, "secret": SECRET},
            "aggregator": {"url": "http://localhost:8082"},
            "state_dir": str(tmp_path / "coordinator-state"),
        },
    )


def read_ready(daemon: Daemon) -> dict[str, Any]:
    document = json.loads(daemon.ready_path.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def assert_accepts_connections(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass


def test_coordinator_names_its_bound_listeners_and_removes_the_file_on_sigterm(tmp_path: Path) -> None:
    config = coordinator_config(tmp_path)
    with Daemon("xain-coordinator", config, tmp_path, listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER)) as daemon:
        document = read_ready(daemon)
        assert document["pid"] == daemon.pid
        assert set(document["listeners"]) == {COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER}
        for name, address in document["listeners"].items():
            assert address["host"] == "127.0.0.1"
            assert isinstance(address["port"], int) and address["port"] > 0
            # The log line and the ready file are written apart: the log may trail the file.
            logged = f"{name} listening on 127.0.0.1:{address['port']}"
            wait_until(lambda: logged in daemon.log_messages("xaind"), START_TIMEOUT, f"the log line {logged!r}")
            assert_accepts_connections(address["port"])
        assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]
        code = daemon.stop()
        assert code in (0, -signal.SIGTERM), daemon.output
        assert not daemon.killed
    assert not daemon.ready_path.exists()


def test_aggregator_names_its_bound_listener_and_removes_the_file_on_sigterm(tmp_path: Path) -> None:
    port = free_loopback_port()
    # The coordinator's PB port need not answer: the aggregator keeps trying in the background.
    config = write_yaml(
        tmp_path / "aggregator.yaml",
        aggregator_document(state_dir=tmp_path / "aggregator-state", port=port, coordinator_pb_port=free_loopback_port()),
    )
    with Daemon("xain-aggregator", config, tmp_path, listeners=(AGGREGATOR_HTTP_LISTENER,)) as daemon:
        document = read_ready(daemon)
        assert document == {"pid": daemon.pid, "listeners": {AGGREGATOR_HTTP_LISTENER: {"host": "127.0.0.1", "port": port}}}
        assert_accepts_connections(port)
        code = daemon.stop()
        assert code in (0, -signal.SIGTERM), daemon.output
    assert not daemon.ready_path.exists()


def test_a_ready_file_in_a_missing_directory_stops_startup_with_one_line(tmp_path: Path) -> None:
    config = coordinator_config(tmp_path)
    missing = tmp_path / "nowhere" / "ready.json"
    result = run_twistd("-n", "--pidfile=", f"--logfile={tmp_path / 'c.log'}", "xain-coordinator", "--config", str(config), "--ready-file", str(missing))
    assert result.returncode > 0, result.stdout
    assert result.stdout.splitlines() == [f"--ready-file: no such directory: {missing.parent}"]


def test_twistd_help_documents_the_option() -> None:
    for plugin in ("xain-coordinator", "xain-aggregator"):
        result = run_twistd(plugin, "--help")
        assert result.returncode == 0, result.stdout
        assert "--ready-file=" in result.stdout


# -- the service itself, on a memory reactor ---------------------------------


def test_the_file_is_written_once_every_listener_is_bound_and_the_reactor_runs_and_removed_at_stop(tmp_path: Path) -> None:
    from twisted.application.service import MultiService
    from twisted.internet.protocol import Factory
    from twisted.internet.testing import MemoryReactor

    from xaind.listening import ListeningService
    from xaind.ready_file import ReadyFileService

    reactor = MemoryReactor()
    path = tmp_path / "ready.json"
    top = MultiService()
    listeners = [ListeningService(name, "tcp:0:interface=127.0.0.1", Factory(), reactor) for name in ("one", "two")]
    for listener in listeners:
        listener.setServiceParent(top)
    ReadyFileService(str(path), listeners, reactor).setServiceParent(top)
    top.startService()
    assert not path.exists(), "written before the reactor runs (and handles SIGTERM)"
    reactor.run()
    document = json.loads(path.read_text(encoding="utf-8"))
    assert set(document["listeners"]) == {"one", "two"}
    assert all(set(address) == {"host", "port"} for address in document["listeners"].values())
    top.stopService()
    assert not path.exists()
