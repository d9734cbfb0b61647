"""The far end of a link that comes and goes, and the calls that wait for it."""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.internet.defer import Deferred, succeed

T = TypeVar("T")


class Attachment(Generic[T]):
    """Holds the current peer of a link; calls made while there is none wait for the next one.

    Cancelling a waiting call (e.g. by the caller's time-out) removes it, so
    a call that gave up never reaches a peer that attaches later.
    """

    def __init__(self) -> None:
        self.current: T | None = None
        self._waiting: list[Deferred[T]] = []

    def attach(self, peer: T) -> None:
        self.current = peer
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(peer)

    def detach(self, peer: T) -> bool:
        """Forget `peer` unless a newer one replaced it already; True if it was current."""
        if self.current is not peer:
            return False
        self.current = None
        return True

    def when_attached(self) -> Deferred[T]:
        if self.current is not None:
            return succeed(self.current)
        waiter: Deferred[T] = Deferred(self._waiting.remove)
        self._waiting.append(waiter)
        return waiter
