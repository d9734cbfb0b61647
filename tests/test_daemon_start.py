"""What both daemons do as they start (xaind/daemon.py `begin`)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from twisted.internet.testing import MemoryReactor

from xaind.daemon import begin
from xaind.logs import get_logger


def test_what_exists_once_the_daemon_runs_is_frozen_out_of_the_collectors_scans() -> None:
    reactor = MemoryReactor()
    settings = SimpleNamespace(log_level="info", source="/etc/xain/coordinator.yaml", development=False)
    assert begin(settings, get_logger("xaind.test"), "a-secret", reactor) is reactor
    # Frozen once the reactor runs: after start-up, not in the middle of it.
    assert [hook for hook, _, _ in reactor.whenRunningHooks] == [gc.freeze]
