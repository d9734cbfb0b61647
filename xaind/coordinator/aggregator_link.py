"""What the coordinator asks of the aggregator, and the link that carries it.

The coordinator needs two things from the aggregator: admit a participant
with a one-round token before that participant is told where to upload, and
aggregate the round's results when the round is over. `IAggregator` names
them so that the service does not care how they travel (PB in production, a
fake in unit tests).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from xaind.attachment import Attachment
from xaind.call_batch import CallBatch
from xaind.logs import get_logger
from xaind.protocol import PBMethod

log = get_logger("xaind.coordinator.aggregator_link")


class AggregatorUnavailable(Exception):
    """No aggregator is attached to the coordinator right now."""


class AdmissionRefused(Exception):
    """The aggregator refused one admission of a batch; the text is "<code>: <message>", as its PB refusals read."""


def admission_answer(answer: Any) -> None:
    """One answer of `admit_many`: None when admitted, else its refusal."""
    if answer is not None:
        raise AdmissionRefused(str(answer))


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

    def url_for(participant_id: str) -> str | None:
        """Where the admitted participant downloads and uploads; None: `aggregator.url`."""

    def attached_shards() -> list[dict[str, Any]]:
        """The aggregator shards attached now (for status); empty with a lone aggregator."""


class LinkMetrics(Protocol):
    """What the link counts (xaind.coordinator.metrics.CoordinatorMetrics)."""

    def aggregator_attached(self) -> None: ...

    def aggregator_detached(self) -> None: ...


class RemoteAggregator(Protocol):
    """The aggregator's end as the link sees it: a PB remote reference, or a fake."""

    def callRemote(self, _name: str, *args: Any, **kwargs: Any) -> Deferred[Any]: ...


class AggregatorLogins(Protocol):
    """Where the PB realm hands a logged-in aggregator: the lone aggregator's link, or the shards."""

    def attach(self, remote: RemoteAggregator) -> Any: ...

    def detach(self, remote: RemoteAggregator) -> None: ...


@implementer(IAggregator)
class AggregatorLink:
    """The coordinator's end of the aggregator link.

    Calls made while no aggregator is attached wait for one: the aggregator
    may be restarting, and a participant's start-training request is better
    held briefly than refused. The caller bounds every wait with a timeout.

    Admissions made in one reactor turn travel as one `admit_many` call
    (xaind/call_batch.py). Any other call sends the admissions asked for
    before it first, so the aggregator sees them in the order they were made.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as default_reactor

            clock = default_reactor  # type: ignore[assignment]
        self.clock = clock
        self._remote: Attachment[RemoteAggregator] = Attachment()
        self._admissions: CallBatch[None] = CallBatch(clock, PBMethod.ADMIT_MANY, self._remote, admission_answer)
        #: Counts attachments and losses (the coordinator's `CoordinatorMetrics`); None: not counted.
        self.metrics: LinkMetrics | None = None

    def is_attached(self) -> bool:
        return self._remote.current is not None

    def attach(self, remote: RemoteAggregator) -> None:
        log.info("aggregator attached")
        if self.metrics is not None:
            self.metrics.aggregator_attached()
        self._remote.attach(remote)

    def detach(self, remote: RemoteAggregator) -> None:
        """Forget `remote` unless a newer connection has replaced it already."""
        if self._remote.detach(remote):
            log.warn("aggregator detached")
            if self.metrics is not None:
                self.metrics.aggregator_detached()

    def url_for(self, participant_id: str) -> str | None:
        """None: every participant uploads to the one aggregator at `aggregator.url`."""
        return None

    def attached_shards(self) -> list[dict[str, Any]]:
        return []

    def call(self, name: str, *args: Any) -> Deferred[Any]:
        """Call `name` on the aggregator once one is attached, after the admissions asked for before."""

        def call(remote: RemoteAggregator) -> Deferred[Any]:
            self._admissions.send_now()
            return remote.callRemote(name, *args)

        calling = self._remote.when_attached()
        calling.addCallback(call)
        return calling

    def admit(self, participant_id: str, token: str, round: int) -> Deferred[None]:
        """Sent with the other admissions of this reactor turn (see `CallBatch`)."""
        return self._admissions.call(participant_id, token, round)

    def aggregate(self, round: int, counted: list[str]) -> Deferred[None]:
        return self.call(PBMethod.AGGREGATE, round, counted)

    def sync(self, round: int, done: list[str] | None, admitted: dict[str, str]) -> Deferred[dict[str, Any]]:
        return self.call(PBMethod.SYNC, round, done, admitted)
