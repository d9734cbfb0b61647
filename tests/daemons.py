"""The daemons helper for tests: `xaind.tools.daemons` plus a pytest fixture.

Import as `from daemons import ...` (tests/ has no __init__.py, so pytest puts
tests/ on sys.path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xaind.tools.daemons import (  # noqa: F401 - re-exported for the tests
    LOOPBACK_ANY_PORT,
    POLL_INTERVAL,
    START_TIMEOUT,
    STOP_TIMEOUT,
    TWISTD,
    Daemon,
    DaemonError,
    WaitTimedOut,
    aggregator_document,
    coordinator_document,
    free_loopback_port,
    get_json,
    run_to_exit,
    run_twistd,
    twistd_command,
    wait_until,
    write_yaml,
)


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
