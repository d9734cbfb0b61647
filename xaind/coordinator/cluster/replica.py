"""A process's local copy of the participants' states, kept current from the leader's events.

Every process answers heartbeats from its replica, as the state machine
would (`heartbeat`), and pushes the news an event brings to its own
participants: selections to their PB minds and held HTTP heartbeats, the
end of training to everyone. Events are numbered; a gap (a message lost
while the subscription reconnected) makes the process read the whole
state again (`needs_reload`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from xaind.coordinator.cluster.state_mirror import Snapshot
from xaind.coordinator.rounds import HeartbeatAnswer, HeartbeatState, ParticipantState, Phase


@dataclass
class News:
    """What an event means for the participants this process talks to."""

    selected: list[str] = field(default_factory=list)
    round: int = 0
    finished: bool = False
    removed: list[str] = field(default_factory=list)


class Replica:
    """Round, phase and participants' states, as the last event applied left them."""

    def __init__(self) -> None:
        self.round = 0
        self.phase = Phase.TRAINING
        self.seq = 0
        self.states: dict[str, ParticipantState] = {}
        self.counts: Counter[ParticipantState] = Counter()
        self.token_holders: set[str] = set()
        self.loaded = False

    def load(self, snapshot: Snapshot, rounds: int) -> None:
        self.round = snapshot.round
        self.phase = Phase.COMPLETE if snapshot.round >= rounds else snapshot.phase
        self.seq = snapshot.seq
        self.states = dict(snapshot.states)
        self.counts = Counter(self.states.values())
        self.token_holders = set(snapshot.tokens)
        self.loaded = True

    def _set(self, participant_id: str, state: ParticipantState | None) -> None:
        previous = self.states.pop(participant_id, None)
        if previous is not None:
            self.counts[previous] -= 1
        if state is not None:
            self.states[participant_id] = state
            self.counts[state] += 1

    def joined(self, participant_id: str) -> None:
        """A rendez-vous this process accepted: waiting until the leader's event says otherwise."""
        if participant_id not in self.states:
            self._set(participant_id, ParticipantState.WAITING)

    def needs_reload(self, event: dict[str, Any]) -> bool:
        return int(event["seq"]) > self.seq + 1

    def apply(self, event: dict[str, Any]) -> News | None:
        """Apply one event; None if it is one applied already."""
        seq = int(event["seq"])
        if seq <= self.seq:
            return None
        self.seq = seq
        news = News(round=int(event["round"]))
        was_complete = self.phase is Phase.COMPLETE
        self.round = int(event["round"])
        self.phase = Phase(event["phase"])
        for participant_id, value in event["states"].items():
            state = None if value is None else ParticipantState(value)
            previous = self.states.get(participant_id)
            self._set(participant_id, state)
            if state is ParticipantState.SELECTED and previous is not ParticipantState.SELECTED:
                news.selected.append(participant_id)
            elif state is None:
                news.removed.append(participant_id)
        self.token_holders.difference_update(event["token_holders_removed"])
        self.token_holders.update(event["token_holders_added"])
        news.finished = self.phase is Phase.COMPLETE and not was_complete
        return news

    def known_count(self) -> int:
        return len(self.states)

    def state_of(self, participant_id: str) -> ParticipantState | None:
        return self.states.get(participant_id)

    def heartbeat(self, participant_id: str) -> HeartbeatAnswer:
        """The state machine's answer (RoundStateMachine.heartbeat) and the service's `stand_by` for a token holder."""
        if self.phase is Phase.COMPLETE:
            return HeartbeatAnswer(HeartbeatState.FINISH)
        state = self.states.get(participant_id)
        if state is None or state is ParticipantState.DONE_INACTIVE:
            return HeartbeatAnswer(HeartbeatState.REJECT)
        if state is ParticipantState.SELECTED and participant_id not in self.token_holders:
            return HeartbeatAnswer(HeartbeatState.ROUND, self.round)
        return HeartbeatAnswer(HeartbeatState.STAND_BY)

    def counters(self) -> dict[str, int]:
        return {state.value: self.counts[state] for state in ParticipantState}
