"""Heartbeat deadlines in a Redis sorted set, written in batches.

Every process answers heartbeats; none arms a timer per participant.
Each heartbeat's new deadline goes into `<prefix>deadlines` (participant
id scored by the time it is due by), a pipeline per `BATCH_SECONDS` or per
`BATCH_SIZE` heartbeats, whichever comes first, so heartbeats cost Redis
one command each in bulk and scale with the processes. The leader takes
the expired ones out (`scripts.POP_EXPIRED`) and drops those participants.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from xaind.coordinator.cluster.connection import RedisConnection
from xaind.coordinator.cluster.keys import Keys
from xaind.logs import get_logger

log = get_logger("xaind.coordinator.cluster")

BATCH_SECONDS = 0.05
BATCH_SIZE = 500


class HeartbeatDeadlines:
    """Deadlines to write (a time) or to remove (None), flushed in one pipeline."""

    def __init__(self, connection: RedisConnection, keys: Keys, clock: IReactorTime) -> None:
        self.connection = connection
        self.keys = keys
        self.clock = clock
        self._pending: dict[str, float | None] = {}
        self._flush: IDelayedCall | None = None
        self._writing = False
        self.closed = False

    def set(self, participant_id: str, when: float) -> None:
        self._queue(participant_id, when)

    def remove(self, participant_id: str) -> None:
        self._queue(participant_id, None)

    def _queue(self, participant_id: str, when: float | None) -> None:
        if self.closed:
            return
        self._pending[participant_id] = when
        if len(self._pending) >= BATCH_SIZE and not self._writing:
            self._write()
        elif self._flush is None:
            self._flush = self.clock.callLater(BATCH_SECONDS, self._write)

    def _write(self) -> None:
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        if self._writing or not self._pending or self.closed:
            return
        batch, self._pending = self._pending, {}
        self._writing = True
        self.connection.run(self._send, batch).addCallbacks(lambda _: self._written(), lambda failure: self._failed(batch, failure))

    def _send(self, batch: dict[str, float | None]) -> None:
        pipeline = self.connection.client.pipeline(transaction=False)
        due = {participant_id: when for participant_id, when in batch.items() if when is not None}
        gone = [participant_id for participant_id, when in batch.items() if when is None]
        if due:
            pipeline.zadd(self.keys.deadlines, due)
        if gone:
            pipeline.zrem(self.keys.deadlines, *gone)
        pipeline.execute()

    def _written(self) -> None:
        self._writing = False
        if self._pending and self._flush is None:
            self._flush = self.clock.callLater(BATCH_SECONDS, self._write)

    def _failed(self, batch: dict[str, float | None], failure: Any) -> None:
        self._writing = False
        log.warn("could not write {count} heartbeat deadline(s) to Redis: {error}", count=len(batch), error=failure.getErrorMessage())
        for participant_id, when in batch.items():
            self._pending.setdefault(participant_id, when)
        if self._flush is None and not self.closed:
            self._flush = self.clock.callLater(BATCH_SECONDS * 10, self._write)

    def close(self) -> None:
        """Write nothing more (the process stops: what the others wrote stays)."""
        self.closed = True
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None


class RedisHeartbeatDeadline:
    """The leader's heartbeat "timer" of one participant: its deadline in Redis, not a timer here.

    It stands in for the `IDelayedCall` the coordinator service keeps per
    participant, so that the service's heartbeat code runs unchanged: a
    `reset` writes the new deadline, a `cancel` removes it, and expiry is
    the leader's scan of the sorted set.
    """

    def __init__(self, participant_id: str, deadlines: HeartbeatDeadlines) -> None:
        self.participant_id = participant_id
        self.deadlines = deadlines
        self.due = 0.0
        self.cancelled = False

    def reset(self, seconds: float) -> None:
        self.due = self.deadlines.clock.seconds() + seconds
        self.deadlines.set(self.participant_id, self.due)

    def cancel(self) -> None:
        self.cancelled = True
        self.deadlines.remove(self.participant_id)

    def active(self) -> bool:
        return not self.cancelled

    def getTime(self) -> float:  # noqa: N802 - IDelayedCall's name
        return self.due
