"""The coordinator as the aggregator service sees it (ICoordinator), faked for the aggregator's tests."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from xaind.aggregator.service import ICoordinator


@dataclass
class EndTraining:
    participant_id: str
    token: str
    success: bool
    deferred: Deferred


@implementer(ICoordinator)
class FakeCoordinator:
    """Records every end_training; `answer` True/False fires at once, None leaves it for the test."""

    def __init__(self) -> None:
        self.calls: list[EndTraining] = []
        self.answer: bool | None = True
        self.attached = True

    def end_training(self, participant_id: str, token: str, success: bool) -> Deferred:
        deferred: Deferred = Deferred() if self.answer is None else succeed(self.answer)
        self.calls.append(EndTraining(participant_id, token, success, deferred))
        return deferred

    def is_attached(self) -> bool:
        return self.attached
