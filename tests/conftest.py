"""Fixtures shared by the test modules.

The helpers behind them live in the package (`xaind.testing`,
`xaind.tools.daemons`), so that the suite imports them the same way from the
source tree and against the installed package.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from xaind.testing.fakes import FakeAggregator, FakeCoordinator


@pytest.fixture
def clock() -> Clock:
    """A clock the test advances by hand, for every timer of a service under test."""
    return Clock()


@pytest.fixture
def aggregator() -> FakeAggregator:
    """The aggregator as the coordinator's service sees it; admits at once."""
    return FakeAggregator()


@pytest.fixture
def coordinator() -> FakeCoordinator:
    """The coordinator as the aggregator's service sees it; confirms every result at once."""
    return FakeCoordinator()


@pytest.fixture
def log_events() -> Iterator[list[dict]]:
    """Every log event emitted during the test, in order."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
