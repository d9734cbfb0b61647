"""The round state in Redis: written by the leader after each change, read back at a takeover.

The leader's state machine records which participants each event moved
(`TrackedRoundStateMachine`); `StateMirror` writes those, with the round,
the phase, the tokens, the training deadlines and the credentials, in one
MULTI/EXEC transaction, and publishes the same change as an event in it,
numbered (`seq`), for the other processes' replicas. A change is durable
in Redis before anything shows it: the leader answers a request that
caused a change (an end of training, a start of training) once `flushed`
fires, and pushes to participants come from the published event.

`load_snapshot` reads all of it in one transaction: a follower's replica
starts from it, and a follower that takes over builds its leader from it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from xaind.coordinator.authentication import Credential, CredentialKind
from xaind.coordinator.cluster.connection import RedisConnection
from xaind.coordinator.cluster.keys import Keys
from xaind.coordinator.rounds import ParticipantState, Phase, RoundRules, RoundStateMachine
from xaind.logs import get_logger

if TYPE_CHECKING:
    from xaind.coordinator.cluster.leader import LeaderService

log = get_logger("xaind.coordinator.cluster")

#: Seconds before a failed write of the state is tried again.
RETRY_SECONDS = 0.2


class TrackedRoundStateMachine(RoundStateMachine):
    """The round state machine, recording which participants changed state since the last write."""

    def __init__(self, rules: RoundRules, **kwargs: Any) -> None:
        super().__init__(rules, **kwargs)
        self.dirty: set[str] = set()

    @classmethod
    def restored(cls, rules: RoundRules, round_number: int, phase: Phase, states: dict[str, ParticipantState]) -> TrackedRoundStateMachine:
        """The machine as the leader before left it in Redis."""
        machine = cls(rules, round=min(round_number, rules.rounds))
        machine.phase = Phase.COMPLETE if machine.round == rules.rounds else phase
        for participant_id, state in states.items():
            machine._move(participant_id, state)
        machine.dirty.clear()
        return machine

    def known_ids(self) -> list[str]:
        return list(self._state_of)

    def _move(self, participant_id: str, state: ParticipantState) -> None:
        super()._move(participant_id, state)
        self.dirty.add(participant_id)

    def _forget(self, participant_id: str) -> None:
        super()._forget(participant_id)
        self.dirty.add(participant_id)


def encode_credential(credential: Credential) -> str:
    return f"{credential.kind.name}:{credential.digest.hex()}"


def decode_credential(text: str) -> Credential | None:
    kind, _, digest = text.partition(":")
    try:
        return Credential(CredentialKind[kind], bytes.fromhex(digest))
    except (KeyError, ValueError):
        return None


@dataclass
class Snapshot:
    """All of the shared state, read at one instant."""

    round: int = 0
    phase: Phase = Phase.TRAINING
    seq: int = 0
    counted: list[str] | None = None
    states: dict[str, ParticipantState] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    training: dict[str, float] = field(default_factory=dict)
    credentials: dict[str, Credential] = field(default_factory=dict)
    #: Whether a leader ever wrote it (else a fresh training starts at round 0).
    written: bool = False


def load_snapshot(connection: RedisConnection, keys: Keys) -> Snapshot:
    """Read the shared state in one transaction (blocking: call it on a Redis thread)."""
    pipeline = connection.client.pipeline(transaction=True)
    for key in (keys.round, keys.participants, keys.tokens, keys.training, keys.credentials):
        pipeline.hgetall(key)
    round_hash, participants, tokens, training, credentials = pipeline.execute()
    snapshot = Snapshot(written=bool(round_hash))
    if round_hash:
        snapshot.round = int(round_hash.get("round", 0))
        snapshot.phase = Phase(round_hash.get("phase", Phase.TRAINING.value))
        snapshot.seq = int(round_hash.get("seq", 0))
        counted = round_hash.get("counted")
        snapshot.counted = json.loads(counted) if counted else None
    snapshot.states = {participant_id: ParticipantState(state) for participant_id, state in participants.items()}
    snapshot.tokens = dict(tokens)
    snapshot.training = {participant_id: float(when) for participant_id, when in training.items()}
    for participant_id, text in credentials.items():
        credential = decode_credential(text)
        if credential is not None:
            snapshot.credentials[participant_id] = credential
    return snapshot


class StateMirror:
    """Writes the leader's changes to Redis, one transaction at a time, and publishes each as an event."""

    def __init__(self, connection: RedisConnection, keys: Keys, leader: LeaderService, seq: int, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.connection = connection
        self.keys = keys
        self.leader = leader
        self.seq = seq
        self.on_event = on_event
        #: The counted results of the round being aggregated (a takeover asks for the aggregation again).
        self.counted: list[str] | None = None
        self._written_tokens: dict[str, str] = {}
        self._scheduled: IDelayedCall | None = None
        self._writing = False
        self._waiting: list[Deferred[None]] = []
        self.stopped = False

    def seed_tokens(self, tokens: dict[str, str]) -> None:
        """The tokens Redis holds already (a takeover): only changes from these are written."""
        self._written_tokens = dict(tokens)

    def changed(self) -> None:
        """Something changed: write it soon (in this reactor turn's batch)."""
        if self._scheduled is None and not self._writing and not self.stopped:
            self._scheduled = self.leader.clock.callLater(0, self._write)

    def flushed(self) -> Deferred[None]:
        """Fires once everything changed until now is in Redis."""
        waiting: Deferred[None] = Deferred()
        self._waiting.append(waiting)
        self.changed()
        return waiting

    def stop(self) -> None:
        self.stopped = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    def _write(self) -> None:
        self._scheduled = None
        if self._writing or self.stopped:
            return
        machine = self.leader.machine
        assert isinstance(machine, TrackedRoundStateMachine)
        dirty, machine.dirty = machine.dirty, set()
        waiting, self._waiting = self._waiting, []
        event = self._event(dirty)
        self._writing = True
        writing = self.connection.run(self._send, event)
        writing.addCallbacks(lambda _: self._written(event, waiting), lambda failure: self._failed(dirty, waiting, failure))

    def _event(self, dirty: set[str]) -> dict[str, Any]:
        machine = self.leader.machine
        tokens = dict(self.leader.tokens_now())
        added = {participant_id: token for participant_id, token in tokens.items() if self._written_tokens.get(participant_id) != token}
        removed = [participant_id for participant_id in self._written_tokens if participant_id not in tokens]
        states: dict[str, str | None] = {}
        training: dict[str, float | None] = {}
        credentials: dict[str, str | None] = {}
        for participant_id in dirty:
            state = machine.state_of(participant_id)
            states[participant_id] = None if state is None else state.value
            training[participant_id] = self.leader.training_deadline(participant_id) if state is ParticipantState.SELECTED else None
            credential = self.leader.credential_of(participant_id)
            credentials[participant_id] = None if credential is None else encode_credential(credential)
        if machine.phase is not Phase.AGGREGATING:
            self.counted = None
        return {
            "seq": self.seq + 1,
            "round": machine.round,
            "phase": machine.phase.value,
            "states": states,
            "tokens_added": added,
            "tokens_removed": removed,
            "training": training,
            "credentials": credentials,
            "counted": self.counted,
        }

    def _send(self, event: dict[str, Any]) -> None:
        keys = self.keys
        pipeline = self.connection.client.pipeline(transaction=True)
        pipeline.hset(
            keys.round,
            mapping={"round": event["round"], "phase": event["phase"], "seq": event["seq"], "counted": json.dumps(event["counted"]) if event["counted"] is not None else ""},
        )
        for key, values in ((keys.participants, event["states"]), (keys.training, event["training"]), (keys.credentials, event["credentials"])):
            present = {participant_id: value for participant_id, value in values.items() if value is not None}
            absent = [participant_id for participant_id, value in values.items() if value is None]
            if present:
                pipeline.hset(key, mapping=present)
            if absent:
                pipeline.hdel(key, *absent)
        if event["tokens_added"]:
            pipeline.hset(keys.tokens, mapping=event["tokens_added"])
        if event["tokens_removed"]:
            pipeline.hdel(keys.tokens, *event["tokens_removed"])
        published = {name: event[name] for name in ("seq", "round", "phase", "states", "counted")}
        published["token_holders_added"] = list(event["tokens_added"])
        published["token_holders_removed"] = event["tokens_removed"]
        pipeline.publish(keys.events, json.dumps(published, separators=(",", ":")))
        pipeline.execute()

    def _written(self, event: dict[str, Any], waiting: list[Deferred[None]]) -> None:
        self._writing = False
        self.seq = event["seq"]
        for participant_id in event["tokens_removed"]:
            self._written_tokens.pop(participant_id, None)
        self._written_tokens.update(event["tokens_added"])
        self.on_event(
            {
                "seq": event["seq"],
                "round": event["round"],
                "phase": event["phase"],
                "states": event["states"],
                "token_holders_added": list(event["tokens_added"]),
                "token_holders_removed": event["tokens_removed"],
            }
        )
        for done in waiting:
            done.callback(None)
        machine = self.leader.machine
        assert isinstance(machine, TrackedRoundStateMachine)
        if (machine.dirty or self._waiting) and not self.stopped:
            self.changed()

    def _failed(self, dirty: set[str], waiting: list[Deferred[None]], failure: Failure) -> None:
        self._writing = False
        log.warn("could not write the round state to Redis ({error}): retrying", error=failure.getErrorMessage())
        machine = self.leader.machine
        assert isinstance(machine, TrackedRoundStateMachine)
        machine.dirty |= dirty
        self._waiting[:0] = waiting
        if not self.stopped and self._scheduled is None:
            self._scheduled = self.leader.clock.callLater(RETRY_SECONDS, self._write)
