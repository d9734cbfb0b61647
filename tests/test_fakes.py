"""Each fake of xaind.testing.fakes stands for the real interface, so it cannot drift from it unnoticed."""

from __future__ import annotations

import inspect

import pytest
from zope.interface.verify import verifyClass, verifyObject

from xaind.aggregator.backends import AGGREGATOR_METHODS, PythonAggregatorBackend
from xaind.aggregator.coordinator_link import CoordinatorLink
from xaind.aggregator.service import ICoordinator
from xaind.coordinator.aggregator_link import AggregatorLink, IAggregator
from xaind.testing.fakes import FakeAggregator, FakeCoordinator, FakeSeedAggregator


def test_the_fake_aggregator_provides_what_the_coordinator_link_provides() -> None:
    assert verifyObject(IAggregator, FakeAggregator())
    assert verifyClass(IAggregator, AggregatorLink)


def test_the_fake_coordinator_provides_what_the_aggregator_link_provides() -> None:
    assert verifyObject(ICoordinator, FakeCoordinator())
    assert verifyClass(ICoordinator, CoordinatorLink)


@pytest.mark.parametrize("method", AGGREGATOR_METHODS)
def test_the_fake_seed_aggregator_has_the_seed_interface(method: str) -> None:
    """The seed's interface: reset(weights), add_weights(data), aggregate(), get_global_weights()."""
    arguments = {"reset": ["global_weights"], "add_weights": ["data"], "aggregate": [], "get_global_weights": []}
    assert list(inspect.signature(getattr(FakeSeedAggregator(), method)).parameters) == arguments[method]
    PythonAggregatorBackend(FakeSeedAggregator())  # the backend's own check of the interface


def test_the_fake_seed_aggregator_matches_the_seeds_own_class() -> None:
    seed = pytest.importorskip("xain_aggregators.weighted_average", reason="xain-aggregators is installed from PyPI only")
    for method in AGGREGATOR_METHODS:
        theirs = list(inspect.signature(getattr(seed.Aggregator, method)).parameters)[1:]  # without self
        ours = list(inspect.signature(getattr(FakeSeedAggregator, method)).parameters)[1:]
        assert len(ours) == len(theirs), (method, ours, theirs)
