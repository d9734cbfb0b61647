"""Calls of one kind made in one reactor turn, sent over a link as one remote call.

The coordinator admits each selected participant at the aggregator, in
bursts: a selection of a thousand participants asks to start training
within a few turns. A PB call costs both ends more than an admission, so
the calls of one turn travel together (`admit_many`), and each caller still
gets its own answer: the remote `<name>_many` method takes a list of
argument lists and answers a list of the same length, one answer each.
(The aggregator's reports of results, batched the same way, gained nothing
measurable: they end spread over the round, one or two a turn.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from xaind.attachment import Attachment

T = TypeVar("T")


class Remote(Protocol):
    def callRemote(self, _name: str, *args: Any) -> Deferred[Any]: ...  # noqa: N802 - PB's name


class BadBatchAnswer(Exception):
    """The far end answered a batch with something else than one answer per call."""


@dataclass
class _Pending:
    arguments: list[Any]
    waiting: Deferred[Any]


class CallBatch(Generic[T]):
    """Calls of `method` (the `_many` one) over the link held by `attachment`.

    A call waits for the end of the reactor turn, or for `send_now` (another
    call on the link must not overtake it), or for a peer to attach. A call
    cancelled before it is sent (its caller's time-out) is withdrawn and never
    reaches the peer. `answer_of` turns one answer into the caller's result,
    or raises the caller's failure; a batch whose call fails fails each of
    its calls.
    """

    def __init__(self, clock: IReactorTime, method: str, attachment: Attachment[Any], answer_of: Callable[[Any], T]) -> None:
        self.clock = clock
        self.method = method
        self.attachment = attachment
        self.answer_of = answer_of
        self._pending: list[_Pending] = []
        self._sending: IDelayedCall | None = None
        self._waiting_for_peer = False

    def call(self, *arguments: Any) -> Deferred[T]:
        waiting: Deferred[T] = Deferred()
        self._pending.append(_Pending(list(arguments), waiting))
        if self._sending is None:
            self._sending = self.clock.callLater(0, self.send_now)
        return waiting

    def send_now(self) -> None:
        if self._sending is not None and self._sending.active():
            self._sending.cancel()
        self._sending = None
        peer = self.attachment.current
        if peer is None:
            if self._pending and not self._waiting_for_peer:
                self._waiting_for_peer = True
                self.attachment.when_attached().addCallback(self._attached)
            return
        batch = [pending for pending in self._pending if not pending.waiting.called]
        self._pending = []
        if batch:
            sending = peer.callRemote(self.method, [pending.arguments for pending in batch])
            sending.addCallbacks(self._answered, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _attached(self, peer: Remote) -> None:
        self._waiting_for_peer = False
        self.send_now()

    def _answered(self, answers: Any, batch: list[_Pending]) -> None:
        if not isinstance(answers, list) or len(answers) != len(batch):
            self._failed(Failure(BadBatchAnswer(f"{self.method}: {len(batch)} calls answered {answers!r:.80}")), batch)
            return
        for pending, answer in zip(batch, answers):
            if pending.waiting.called:
                continue  # its caller gave up while the batch was on its way
            try:
                result = self.answer_of(answer)
            except Exception:  # noqa: BLE001 - whatever `answer_of` raises is that caller's failure
                pending.waiting.errback(Failure())
            else:
                pending.waiting.callback(result)

    @staticmethod
    def _failed(failure: Failure, batch: list[_Pending]) -> None:
        for pending in batch:
            if not pending.waiting.called:
                pending.waiting.errback(failure)
