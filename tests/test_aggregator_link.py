"""The coordinator's end of the aggregator link: calls wait for an aggregator, bounded by the caller."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from xaind.coordinator.aggregator_link import AggregatorLink, IAggregator


class RecordingRemote:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def callRemote(self, name: str, *args: Any) -> Deferred[Any]:
        self.calls.append((name, args))
        return succeed(f"{name} done")


def outcome(deferred: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def test_link_provides_the_aggregator_interface() -> None:
    assert verifyObject(IAggregator, AggregatorLink())


def test_calls_go_straight_through_when_attached() -> None:
    link, remote = AggregatorLink(), RecordingRemote()
    link.attach(remote)
    assert link.is_attached()
    assert outcome(link.admit("p1", "t1", 4)) == ["admit done"]
    assert outcome(link.aggregate(4, ["p1"])) == ["aggregate done"]
    assert remote.calls == [("admit", ("p1", "t1", 4)), ("aggregate", (4, ["p1"]))]


def test_calls_wait_for_an_aggregator_to_attach() -> None:
    link, remote = AggregatorLink(), RecordingRemote()
    admitted = outcome(link.admit("p1", "t1", 0))
    assert admitted == [] and remote.calls == []
    link.attach(remote)
    assert admitted == ["admit done"]
    assert remote.calls == [("admit", ("p1", "t1", 0))]


def test_a_waiting_call_is_cancelled_by_the_callers_timeout() -> None:
    link, clock = AggregatorLink(), Clock()
    waiting = link.admit("p1", "t1", 0)
    waiting.addTimeout(3, clock)
    results = outcome(waiting)
    clock.advance(3)
    assert len(results) == 1 and results[0].check(Exception)
    remote = RecordingRemote()
    link.attach(remote)
    assert remote.calls == [], "a timed-out call must not reach the aggregator later"


def test_detach_of_a_replaced_connection_keeps_the_new_one() -> None:
    link, old, new = AggregatorLink(), RecordingRemote(), RecordingRemote()
    link.attach(old)
    link.attach(new)
    link.detach(old)
    assert link.is_attached()
    link.detach(new)
    assert not link.is_attached()
    waiting = link.aggregate(1, [])
    cancelled = outcome(waiting)
    assert cancelled == []
    waiting.cancel()
    assert cancelled[0].check(CancelledError)
