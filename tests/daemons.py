"""The daemons helper for tests: `xaind.tools.daemons` plus a pytest fixture.

Import as `from daemons import ...` (tests/ has no __init__.py, so pytest puts
tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from xaind.tools.daemons import (  # noqa: F401 - re-exported for the tests
    LOOPBACK_ANY_PORT,
    POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    Daemon,
    DaemonError,
    WaitTimedOut,
    aggregator_document,
    coordinator_document,
    dummy_participants_command,
    free_loopback_port,
    get_json,
    run_to_exit,
    run_twistd,
    twistd_command,
    twistd_executable,
    wait_until,
    write_yaml,
    xaind_command,
)


from xaind.protocol import AGGREGATOR_HTTP_LISTENER as AGGREGATOR_HTTP
from xaind.protocol import COORDINATOR_HTTP_LISTENER as COORDINATOR_HTTP
from xaind.protocol import COORDINATOR_PB_LISTENER as COORDINATOR_PB


def start_coordinator_for_aggregator(
    stack: contextlib.ExitStack,
    directory: Path,
    *,
    aggregator_port: int,
    secret: str,
    federated_learning: Mapping[str, Any],
    admit_timeout: float,
    api_listen: str = LOOPBACK_ANY_PORT,
    pb_listen: str = LOOPBACK_ANY_PORT,
    heartbeat_hold: float | None = None,
) -> tuple[Daemon, Path, Path]:
    """Start a coordinator (stopped by `stack`) and write the configuration of its aggregator.

    The aggregator's port must be reserved first (`free_loopback_port`): the
    coordinator hands it out, and the aggregator connects to the coordinator's
    PB port, known only once the coordinator listens. Returns the coordinator,
    the aggregator's configuration file and its state directory.
    """
    coordinator_dir = directory / "coordinator"
    aggregator_dir = directory / "aggregator"
    coordinator_dir.mkdir(parents=True)
    aggregator_dir.mkdir(parents=True)
    coordinator_config = write_yaml(
        coordinator_dir / "coordinator.yaml",
        coordinator_document(
            state_dir=coordinator_dir / "state",
            aggregator_port=aggregator_port,
            secret=secret,
            api_listen=api_listen,
            pb_listen=pb_listen,
            federated_learning=federated_learning,
            aggregator={"admit_timeout": admit_timeout, "aggregation_timeout": 30.0},
            heartbeat_hold=heartbeat_hold,
        ),
    )
    coordinator = stack.enter_context(
        Daemon("xain-coordinator", coordinator_config, coordinator_dir, listeners=(COORDINATOR_HTTP, COORDINATOR_PB))
    )
    aggregator_state = aggregator_dir / "state"
    aggregator_config = write_yaml(
        aggregator_dir / "aggregator.yaml",
        aggregator_document(
            state_dir=aggregator_state,
            port=aggregator_port,
            coordinator_pb_port=coordinator.ports[COORDINATOR_PB],
            secret=secret,
            call_timeout=10.0,
        ),
    )
    return coordinator, aggregator_config, aggregator_state


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """A pytest fixture: `daemon_factory(plugin, config, directory, listeners=...)` starts a
    `Daemon` that is stopped at teardown (use it by importing it into a test module)."""
    started: list[Daemon] = []

    def start(*args: Any, **kwargs: Any) -> Daemon:
        daemon = Daemon(*args, **kwargs)
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in reversed(started):
        if daemon.process is not None:
            daemon.stop()
