"""What the coordinator asks of the aggregator, and the link that carries it.

The coordinator needs two things from the aggregator: admit a participant
with a one-round token before that participant is told where to upload, and
aggregate the round's results when the round is over. `IAggregator` names
them so that the service does not care how they travel (PB in production, a
fake in unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from xaind.attachment import Attachment
from xaind.logs import get_logger
from xaind.protocol import PBMethod

log = get_logger("xaind.coordinator.aggregator_link")


class AggregatorUnavailable(Exception):
    """No aggregator is attached to the coordinator right now."""


class AdmissionRefused(Exception):
    """The aggregator refused one admission of a batch; the text is "<code>: <message>", as its PB refusals read."""


@dataclass
class _Admission:
    participant_id: str
    token: str
    round: int
    waiting: Deferred[None]


class IAggregator(Interface):
    def admit(participant_id: str, token: str, round: int) -> Deferred[None]:
        """Let `participant_id` download and upload with `token` in `round`.

        Fires once the aggregator accepts the token; fails otherwise.
        """

    def aggregate(round: int, counted: list[str]) -> Deferred[None]:
        """Fold the results of `round` into the next global model.

        `counted` names the participants whose results count: the aggregator
        drops any other and fails if one of them is missing, so no result is
        counted twice or silently left out. Fires on success; fails when the
        aggregation failed.
        """

    def sync(round: int, done: list[str] | None, admitted: dict[str, str]) -> Deferred[dict[str, Any]]:
        """Line the aggregator up with the coordinator's view of the round.

        `done`: the participants whose results count (None while an
        aggregation is pending); `admitted`: the tokens now valid. Fires with
        `{"model_round": m, "missing": [ids]}`: the aggregator's model
        version and the counted results it does not hold.
        """

    def is_attached() -> bool:
        """Whether an aggregator is connected right now (for status)."""


class RemoteAggregator(Protocol):
    """The aggregator's end as the link sees it: a PB remote reference, or a fake."""

    def callRemote(self, _name: str, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


@implementer(IAggregator)
class AggregatorLink:
    """The coordinator's end of the aggregator link.

    Calls made while no aggregator is attached wait for one: the aggregator
    may be restarting, and a participant's start-training request is better
    held briefly than refused. The caller bounds every wait with a timeout.

    Admissions made in one reactor turn travel as one `admit_many` call: a
    selection of a thousand participants asks to start training in a burst,
    and a PB call costs both daemons more than the admission itself. Any
    other call sends the admissions asked for before it first, so the
    aggregator sees them in the order they were made.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as default_reactor

            clock = default_reactor  # type: ignore[assignment]
        self.clock = clock
        self._remote: Attachment[RemoteAggregator] = Attachment()
        self._admissions: list[_Admission] = []
        self._sending: IDelayedCall | None = None
        self._waiting_for_remote = False

    def is_attached(self) -> bool:
        return self._remote.current is not None

    def attach(self, remote: RemoteAggregator) -> None:
        log.info("aggregator attached")
        self._remote.attach(remote)

    def detach(self, remote: RemoteAggregator) -> None:
        """Forget `remote` unless a newer connection has replaced it already."""
        if self._remote.detach(remote):
            log.warn("aggregator detached")

    def _call(self, name: str, *args: Any) -> Deferred[Any]:
        def call(remote: RemoteAggregator) -> Deferred[Any]:
            self._send_admissions()
            return remote.callRemote(name, *args)

        calling = self._remote.when_attached()
        calling.addCallback(call)
        return calling

    def admit(self, participant_id: str, token: str, round: int) -> Deferred[None]:
        """Queued, and sent with the other admissions of this reactor turn (withdrawn if cancelled before)."""
        waiting: Deferred[None] = Deferred()
        self._admissions.append(_Admission(participant_id, token, round, waiting))
        if self._sending is None:
            self._sending = self.clock.callLater(0, self._send_admissions)
        return waiting

    def _send_admissions(self) -> None:
        if self._sending is not None and self._sending.active():
            self._sending.cancel()
        self._sending = None
        remote = self._remote.current
        if remote is None:
            if self._admissions and not self._waiting_for_remote:
                self._waiting_for_remote = True
                self._remote.when_attached().addCallback(self._attached_for_admissions)
            return
        # Those whose caller gave up (timed out) meanwhile never reach the aggregator.
        batch = [admission for admission in self._admissions if not admission.waiting.called]
        self._admissions = []
        if not batch:
            return
        sending = remote.callRemote(PBMethod.ADMIT_MANY, [[a.participant_id, a.token, a.round] for a in batch])
        sending.addCallbacks(self._admissions_answered, self._admissions_failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _attached_for_admissions(self, remote: RemoteAggregator) -> None:
        self._waiting_for_remote = False
        self._send_admissions()

    @staticmethod
    def _admissions_answered(answers: Any, batch: list[_Admission]) -> None:
        if not isinstance(answers, list) or len(answers) != len(batch):
            AggregatorLink._admissions_failed(Failure(AdmissionRefused(f"bad_request: {len(batch)} admissions answered {answers!r:.80}")), batch)
            return
        for admission, answer in zip(batch, answers):
            if admission.waiting.called:
                continue
            if answer is None:
                admission.waiting.callback(None)
            else:
                admission.waiting.errback(AdmissionRefused(str(answer)))

    @staticmethod
    def _admissions_failed(failure: Failure, batch: list[_Admission]) -> None:
        for admission in batch:
            if not admission.waiting.called:
                admission.waiting.errback(failure)

    def aggregate(self, round: int, counted: list[str]) -> Deferred[None]:
        return self._call(PBMethod.AGGREGATE, round, counted)

    def sync(self, round: int, done: list[str] | None, admitted: dict[str, str]) -> Deferred[dict[str, Any]]:
        return self._call(PBMethod.SYNC, round, done, admitted)
