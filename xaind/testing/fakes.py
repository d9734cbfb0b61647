"""One fake per collaborator of the daemons' services, for unit tests.

Each records the calls it gets and answers with Deferreds the test fires
(or at once, when told to), so a test decides the order in which a slow
network or a slow disk would answer. tests/test_fakes.py checks each against
the interface it stands for, so a change of that interface breaks the fake
loudly rather than the tests quietly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from xaind.aggregator.service import ICoordinator
from xaind.coordinator.aggregator_link import IAggregator
from xaind.testing.waiting import WAIT, within


@dataclass
class AdmitCall:
    participant_id: str
    token: str
    round: int
    deferred: Deferred[None]


@dataclass
class AggregateCall:
    round: int
    counted: list[str]
    deferred: Deferred[None]


@dataclass
class SyncCall:
    round: int
    done: list[str] | None
    admitted: dict[str, str]


def in_step(round: int) -> dict[str, Any]:
    """The answer of an aggregator in step with the coordinator: same model round, no result missing."""
    return {"model_round": round, "missing": []}


@implementer(IAggregator)
class FakeAggregator:
    """The aggregator as the coordinator's service sees it.

    `admit` answers at once while `admit_at_once` holds (an attached
    aggregator on a fast link), else with a Deferred the test fires;
    `aggregate` always leaves its Deferred to the test; `sync` answers at
    once with `sync_answer(round)`.
    """

    def __init__(self, *, admit_at_once: bool = True) -> None:
        self.admit_at_once = admit_at_once
        self.attached = True
        self.admits: list[AdmitCall] = []
        self.aggregations: list[AggregateCall] = []
        self.syncs: list[SyncCall] = []
        self.sync_answer: Callable[[int], dict[str, Any]] = in_step
        self._admit_waiters: list[tuple[int, Deferred[AdmitCall]]] = []

    def admit(self, participant_id: str, token: str, round: int) -> Deferred[None]:
        deferred: Deferred[None] = succeed(None) if self.admit_at_once else Deferred()
        call = AdmitCall(participant_id, token, round, deferred)
        self.admits.append(call)
        self._wake_admit_waiters()
        return deferred

    def aggregate(self, round: int, counted: list[str]) -> Deferred[None]:
        call = AggregateCall(round, list(counted), Deferred())
        self.aggregations.append(call)
        return call.deferred

    def sync(self, round: int, done: list[str] | None, admitted: dict[str, str]) -> Deferred[dict[str, Any]]:
        self.syncs.append(SyncCall(round, None if done is None else list(done), dict(admitted)))
        return succeed(self.sync_answer(round))

    def is_attached(self) -> bool:
        return self.attached

    def url_for(self, participant_id: str) -> str | None:
        return None

    def attached_shards(self) -> list[dict[str, Any]]:
        return []

    def next_admit(self, already: int = 0, timeout: float = WAIT) -> Deferred[AdmitCall]:
        """Fires with admit call number `already` (0-based) once it has been made, within `timeout` seconds."""
        if len(self.admits) > already:
            return succeed(self.admits[already])
        waiter: Deferred[AdmitCall] = Deferred()
        self._admit_waiters.append((already, waiter))
        return within(waiter, timeout)

    def _wake_admit_waiters(self) -> None:
        from twisted.internet import reactor

        waiting, self._admit_waiters = self._admit_waiters, []
        for index, waiter in waiting:
            if len(self.admits) > index:
                # On the next reactor turn, not from inside admit(): a test resumed
                # here would run before the service has even set its admit timeout.
                reactor.callLater(0, waiter.callback, self.admits[index])
            else:
                self._admit_waiters.append((index, waiter))


@dataclass
class EndTrainingCall:
    participant_id: str
    token: str
    success: bool
    deferred: Deferred[bool]


@implementer(ICoordinator)
class FakeCoordinator:
    """The coordinator as the aggregator's service sees it.

    `end_training` answers `answer` at once when it is True or False, and
    leaves the Deferred to the test when it is None.
    """

    def __init__(self) -> None:
        self.calls: list[EndTrainingCall] = []
        self.answer: bool | None = True
        self.attached = True

    def end_training(self, participant_id: str, token: str, success: bool) -> Deferred[bool]:
        deferred: Deferred[bool] = Deferred() if self.answer is None else succeed(self.answer)
        self.calls.append(EndTrainingCall(participant_id, token, success, deferred))
        return deferred

    def is_attached(self) -> bool:
        return self.attached


class SeedAggregatorRefused(ValueError):
    """What a `FakeSeedAggregator` told to raise raises from add_weights."""


@dataclass
class FakeSeedAggregator:
    """An aggregator class with the seed's Python interface (reset, add_weights, aggregate, get_global_weights).

    `accept` is what add_weights returns (or "raise" to raise), `answer` what
    aggregate returns; every call is recorded in `calls`.
    """

    accept: Any = True
    answer: Any = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)

    def reset(self, global_weights: bytes | None) -> None:
        self.calls.append(("reset", global_weights))

    def add_weights(self, data: bytes) -> Any:
        self.calls.append(("add_weights", data))
        if self.accept == "raise":
            raise SeedAggregatorRefused("bad\nweights")
        return self.accept

    def aggregate(self) -> Any:
        self.calls.append(("aggregate",))
        return self.answer

    def get_global_weights(self) -> bytes:
        return b""
