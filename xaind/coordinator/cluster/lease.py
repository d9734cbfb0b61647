"""The leader's lease: one process at a time runs the rounds.

A process becomes leader with `SET <prefix>leader <process id> NX PX
<lease>` and keeps the lease by pushing its expiry back every third of
it, with a Lua compare-and-pexpire (a renewal succeeds only while the key
still names this process). Its leadership ends, as far as it is
concerned, a tenth of a lease before the lease it last renewed would run
out in Redis: if no renewal has been confirmed by then, another process
may be about to take over, and this one must not act on stale leadership.
`on_lost` is then called once (the cluster service stops the process).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure

from xaind.coordinator.cluster.connection import RedisConnection
from xaind.coordinator.cluster.keys import Keys
from xaind.coordinator.cluster.scripts import RELEASE_LEASE, RENEW_LEASE
from xaind.logs import get_logger

log = get_logger("xaind.coordinator.cluster")

#: The share of the lease by which leadership ends before the lease would expire in Redis.
SAFETY_MARGIN = 0.1


class LeaderLease:
    """Tries to take the lease until it has it, then renews it; says when it is won and when lost."""

    def __init__(
        self,
        connection: RedisConnection,
        keys: Keys,
        process_id: str,
        lease_seconds: float,
        clock: IReactorTime,
        on_elected: Callable[[], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.process_id = process_id
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.leader = False
        self.lost = False
        self._renew = connection.client.register_script(RENEW_LEASE)
        self._release = connection.client.register_script(RELEASE_LEASE)
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._asking = False
        self._ends: IDelayedCall | None = None
        self._stopped = False

    @property
    def _lease_ms(self) -> int:
        return int(self.lease_seconds * 1000)

    def start(self) -> None:
        self._loop.start(self.lease_seconds / 3, now=True)

    def stop(self) -> Deferred[Any]:
        """Stop renewing; a leader gives the lease up so that a follower takes over at once."""
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        self._cancel_end()
        if not self.leader or self.lost:
            return succeed(None)
        self.leader = False
        releasing = self.connection.run(self._release, keys=[self.keys.leader], args=[self.process_id])
        return releasing.addErrback(lambda failure: log.warn("could not give the lease up: {error}", error=failure.getErrorMessage()))

    def _tick(self) -> None:
        if self._asking or self._stopped or self.lost:
            return
        self._asking = True
        sent = self.clock.seconds()
        if self.leader:
            asking = self.connection.run(self._renew, keys=[self.keys.leader], args=[self.process_id, self._lease_ms])
            asking.addCallbacks(lambda renewed: self._renewed(bool(renewed), sent), self._failed)
        else:
            asking = self.connection.run(self.connection.client.set, self.keys.leader, self.process_id, nx=True, px=self._lease_ms)
            asking.addCallbacks(lambda taken: self._taken(bool(taken), sent), self._failed)
        asking.addBoth(self._asked)

    def _asked(self, result: object) -> None:
        self._asking = False

    def _taken(self, taken: bool, sent: float) -> None:
        if not taken or self._stopped:
            return
        self.leader = True
        self._lease_confirmed(sent)
        log.info("this process is the leader now (lease of {seconds:g} s)", seconds=self.lease_seconds)
        self.on_elected()

    def _renewed(self, renewed: bool, sent: float) -> None:
        if self._stopped or self.lost:
            return
        if not renewed:
            self._lose("another process holds the lease")
            return
        self._lease_confirmed(sent)

    def _failed(self, failure: Failure) -> None:
        # A leader whose renewals fail loses its leadership when `_ends` fires; a follower tries again.
        log.warn("lease: Redis did not answer ({error})", error=failure.getErrorMessage())

    def _lease_confirmed(self, sent: float) -> None:
        """The lease runs until `sent` + the lease in Redis: leadership ends a margin before."""
        self._cancel_end()
        remaining = sent + self.lease_seconds * (1 - SAFETY_MARGIN) - self.clock.seconds()
        self._ends = self.clock.callLater(max(0.0, remaining), self._lose, "no renewal of the lease was confirmed in time")

    def _cancel_end(self) -> None:
        if self._ends is not None and self._ends.active():
            self._ends.cancel()
        self._ends = None

    def _lose(self, reason: str) -> None:
        if self.lost or self._stopped:
            return
        self.lost = True
        self.leader = False
        self._cancel_end()
        if self._loop.running:
            self._loop.stop()
        self.on_lost(reason)
