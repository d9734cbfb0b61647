"""When a participant sends its heartbeats: one at a time, every period, and at once when news may be near.

Over HTTP a participant hears of its selection only in a heartbeat's
answer. The coordinator holds a heartbeat of a participant between
trainings open until there is news (`api.heartbeat_hold`), so the news
arrives at once *if* a heartbeat is open then. Two rules keep one open:

* the next heartbeat leaves as soon as the previous one is answered, if
  that took a period or more (it was held), else a period after the
  previous one left: a coordinator that holds them gets one open nearly
  all the time, one that does not (the seed's) one a period, as before;
* `now()` sends one at once (or right after the one in flight), for the
  moments news is near: right after an upload's 200, the next round may be
  selected a few milliseconds later.

A fixed-rate timer (Twisted's LoopingCall) would wait for the next multiple
of the period after a held heartbeat, leaving none open for up to a period.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from xaind.logs import get_logger

log = get_logger("xaind.sdk")


class HeartbeatSchedule:
    """Calls `beat` (which handles its own errors) one at a time, by the rules above."""

    def __init__(self, clock: IReactorTime, period: float, beat: Callable[[], Deferred[Any] | None]) -> None:
        self.clock = clock
        self.period = period
        self._beat = beat
        self._timer: IDelayedCall | None = None
        self._in_flight = False
        #: `now()` was asked while one was in flight: send the next at once.
        self._again = False
        self.running = False

    def start(self) -> None:
        self.running = True
        self.now()

    def stop(self) -> None:
        self.running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def now(self) -> None:
        """A heartbeat as soon as possible: at once, or when the one in flight is answered."""
        if not self.running:
            return
        if self._in_flight:
            self._again = True
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._send()

    def _send(self) -> None:
        self._timer = None
        self._in_flight = True
        sent_at = self.clock.seconds()
        maybeDeferred(self._beat).addBoth(self._answered, sent_at)

    def _answered(self, result: Any, sent_at: float) -> None:
        self._in_flight = False
        if isinstance(result, Failure):
            log.failure("heartbeat failed unexpectedly", result)
        if not self.running:
            return
        if self._again:
            self._again = False
            delay = 0.0
        else:
            delay = max(0.0, self.period - (self.clock.seconds() - sent_at))
        self._timer = self.clock.callLater(delay, self._send)
