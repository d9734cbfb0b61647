"""The coordinator's end of the aggregator link: calls wait for an aggregator, bounded by the caller; admissions in batches."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from xaind.coordinator.aggregator_link import AdmissionRefused, AggregatorLink, IAggregator


class RecordingRemote:
    """Answers every call at once; `admit_many` as the aggregator would, refusing the ids in `refused`."""

    def __init__(self, refused: tuple[str, ...] = ()) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.refused = refused

    def callRemote(self, name: str, *args: Any) -> Deferred[Any]:
        self.calls.append((name, args))
        if name == "admit_many":
            return succeed([f"wrong_round: not {pid}'s round" if pid in self.refused else None for pid, _, _ in args[0]])
        return succeed(f"{name} done")


def outcome(deferred: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    deferred.addBoth(results.append)
    return results


def test_link_provides_the_aggregator_interface() -> None:
    assert verifyObject(IAggregator, AggregatorLink(Clock()))


def test_calls_go_straight_through_when_attached() -> None:
    clock = Clock()
    link, remote = AggregatorLink(clock), RecordingRemote()
    link.attach(remote)
    assert link.is_attached()
    assert outcome(link.aggregate(4, ["p1"])) == ["aggregate done"]
    assert remote.calls == [("aggregate", (4, ["p1"]))]


def test_the_admissions_of_one_reactor_turn_are_one_call_each_answered_on_its_own() -> None:
    clock = Clock()
    link, remote = AggregatorLink(clock), RecordingRemote(refused=("p2",))
    link.attach(remote)
    admitted = [outcome(link.admit(f"p{n}", f"t{n}", 4)) for n in range(1, 4)]
    assert remote.calls == [] and admitted == [[], [], []]
    clock.advance(0)
    assert remote.calls == [("admit_many", ([["p1", "t1", 4], ["p2", "t2", 4], ["p3", "t3", 4]],))]
    assert admitted[0] == [None] and admitted[2] == [None]
    assert admitted[1][0].check(AdmissionRefused) and admitted[1][0].getErrorMessage() == "wrong_round: not p2's round"


def test_admissions_asked_before_another_call_reach_the_aggregator_before_it() -> None:
    clock = Clock()
    link, remote = AggregatorLink(clock), RecordingRemote()
    link.attach(remote)
    link.admit("p1", "t1", 4)
    link.sync(4, None, {})
    assert [name for name, _ in remote.calls] == ["admit_many", "sync"]
    clock.advance(0)
    assert len(remote.calls) == 2


def test_calls_wait_for_an_aggregator_to_attach() -> None:
    clock = Clock()
    link, remote = AggregatorLink(clock), RecordingRemote()
    admitted = outcome(link.admit("p1", "t1", 0))
    clock.advance(0)
    assert admitted == [] and remote.calls == []
    link.attach(remote)
    assert admitted == [None]
    assert remote.calls == [("admit_many", ([["p1", "t1", 0]],))]


def test_a_lost_link_fails_every_admission_of_its_batch() -> None:
    clock = Clock()
    link = AggregatorLink(clock)
    broken = RecordingRemote()
    broken.callRemote = lambda name, *args: fail(ConnectionDone("the aggregator went away"))  # type: ignore[method-assign]
    link.attach(broken)
    admitted = [outcome(link.admit(f"p{n}", f"t{n}", 0)) for n in range(2)]
    clock.advance(0)
    assert all(result[0].check(ConnectionDone) for result in admitted)


def test_a_waiting_call_is_cancelled_by_the_callers_timeout() -> None:
    clock = Clock()
    link = AggregatorLink(clock)
    waiting = link.admit("p1", "t1", 0)
    waiting.addTimeout(3, clock)
    results = outcome(waiting)
    clock.advance(3)
    assert len(results) == 1 and results[0].check(Exception)
    remote = RecordingRemote()
    link.attach(remote)
    clock.advance(0)
    assert remote.calls == [], "a timed-out call must not reach the aggregator later"


def test_detach_of_a_replaced_connection_keeps_the_new_one() -> None:
    link, old, new = AggregatorLink(Clock()), RecordingRemote(), RecordingRemote()
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
