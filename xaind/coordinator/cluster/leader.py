"""The leader: the coordinator service as one process runs it, its state mirrored to Redis.

`LeaderService` is `CoordinatorService` with three differences, each a
hook of the service rather than a change of its rules:

- heartbeat "timers" are deadlines in Redis (`RedisHeartbeatDeadline`),
  expired by a scan of the sorted set (`expire_due`), since every process
  answers heartbeats;
- every batch of effects is written to Redis (`StateMirror`) before the
  change is shown to anyone;
- a follower that takes over builds it from what the last leader wrote
  (`restore`), and asks the aggregator again for an aggregation that was
  under way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from xaind.coordinator.authentication import Credential
from xaind.coordinator.cluster.deadlines import HeartbeatDeadlines, RedisHeartbeatDeadline
from xaind.coordinator.cluster.state_mirror import Snapshot, StateMirror
from xaind.coordinator.rounds import AggregationRequested, Effect, Phase
from xaind.coordinator.service import CoordinatorService, TrainingDeadline
from xaind.logs import get_logger

log = get_logger("xaind.coordinator.cluster")


class LeaderService(CoordinatorService):
    """The round state machine, run by the process that holds the lease."""

    def __init__(self, *args: Any, deadlines: HeartbeatDeadlines, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadlines = deadlines
        self.mirror: StateMirror | None = None
        #: An aggregation the previous leader asked for: asked again once the aggregator is synchronised.
        self._resume_aggregation: list[str] | None = None

    # -- what the mirror reads ------------------------------------------------

    def tokens_now(self) -> dict[str, str]:
        return self._tokens

    def training_deadline(self, participant_id: str) -> float | None:
        deadline = self._training_timers.get(participant_id)
        return None if deadline is None else deadline.timer.getTime()

    def credential_of(self, participant_id: str) -> Credential | None:
        return self._enrolled_with.get(participant_id)

    def knows(self, participant_id: str) -> bool:
        return participant_id in self._heartbeat_timers

    # -- hooks ----------------------------------------------------------------

    def _arm_heartbeat_timer(self, participant_id: str) -> None:
        deadline = self._heartbeat_timers.get(participant_id)
        if not isinstance(deadline, RedisHeartbeatDeadline) or not deadline.active():
            deadline = RedisHeartbeatDeadline(participant_id, self.deadlines)
            self._heartbeat_timers[participant_id] = deadline  # type: ignore[assignment]
        deadline.reset(self.settings.heartbeat_timeout)

    def _apply(self, effects: tuple[Effect, ...]) -> None:
        if self.mirror is not None:
            for effect in effects:
                if isinstance(effect, AggregationRequested):
                    self.mirror.counted = list(effect.participant_ids)
        super()._apply(effects)
        if self.mirror is not None:
            self.mirror.changed()

    def stopService(self) -> Deferred[None] | None:
        # The deadlines in Redis stay for the next leader: stopping cancels the "timers" here only.
        self.deadlines.close()
        if self.mirror is not None:
            self.mirror.stop()
        return super().stopService()

    # -- what followers hand over ---------------------------------------------

    def join_forwarded(self, participant_id: str, credential: Credential | None) -> None:
        """A rendez-vous a follower accepted (it checked the rate, the credential and max_known)."""
        if self.machine.state_of(participant_id) is not None:
            return
        self._join(participant_id, credential)

    def expire_due(self, participant_ids: list[str]) -> None:
        """Participants whose deadline passed in Redis: dropped as their timers would have."""
        for participant_id in participant_ids:
            if participant_id in self._heartbeat_timers:
                self._heartbeat_expired(participant_id)

    # -- takeover -------------------------------------------------------------

    def restore(self, snapshot: Snapshot) -> None:
        """Training deadlines, credentials and heartbeat deadlines as the last leader left them.

        The tokens are not taken over, as a single coordinator's restart
        forgets them: an upload the aggregator finished while no leader
        could record it is dropped at the aggregator's next sync, and its
        participant, still holding a token, would be told `stand_by` until
        its training timeout. Without a token it is told `round` and trains
        again; results already recorded stay counted. (The first write of
        the new leader removes the old tokens from Redis.)
        """
        now = self.clock.seconds()
        for participant_id in list(self.machine.known_ids()):
            deadline = RedisHeartbeatDeadline(participant_id, self.deadlines)
            deadline.due = now + self.settings.heartbeat_timeout
            self._heartbeat_timers[participant_id] = deadline  # type: ignore[assignment]
        self._enrolled_with.update(snapshot.credentials)
        groups: dict[float, TrainingDeadline] = {}
        for participant_id, when in snapshot.training.items():
            if participant_id not in self._heartbeat_timers:
                continue
            group = groups.get(when)
            if group is None:
                group = groups[when] = TrainingDeadline(set())
                group.timer = self.clock.callLater(max(0.0, when - now), self._training_expired, group)
            group.participants.add(participant_id)
            self._training_timers[participant_id] = group
        if self.machine.phase is Phase.AGGREGATING and snapshot.counted is not None:
            self._resume_aggregation = snapshot.counted

    def sync_aggregator(self) -> None:
        super().sync_aggregator()
        counted, self._resume_aggregation = self._resume_aggregation, None
        if counted is None:
            return
        if not self.aggregator.is_attached():
            self._resume_aggregation = counted
            return
        if self.machine.phase is Phase.AGGREGATING and self._aggregation is None:
            log.info("asking the aggregator again for the aggregation of round {round} the previous leader asked for", round=self.machine.round)
            self._request_aggregation(self.machine.round, counted)
