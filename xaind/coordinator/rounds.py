"""The round state machine: who trains in which round, and when a round ends.

It does no I/O and knows no reactor: inputs are events (a participant came,
its heartbeat arrived or timed out, its result was accepted, an aggregation
finished), outputs are effects the caller must carry out (arm timers, ask
the aggregator to aggregate, tell participants). This keeps every rule of
a round testable on its own and exhaustively.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Union


def ceil_share(ratio: float, count: int) -> int:
    """`ceil(ratio * count)` for the ratio as written: 0.28 of 25 is 7, not 8.

    Binary floats make 0.28 * 25 == 7.000000000000001; reading the ratio as
    its shortest decimal form keeps selection sizes what the operator meant.
    """
    return math.ceil(Fraction(repr(float(ratio))) * count)


@dataclass(frozen=True)
class RoundRules:
    """The settings that shape rounds (see docs/rounds.rst)."""

    rounds: int = 10
    participants_ratio: float = 1.0
    min_clients: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if not 0 < self.participants_ratio <= 1:
            raise ValueError(f"participants_ratio must be in (0, 1], got {self.participants_ratio}")
        if self.min_clients < 1:
            raise ValueError(f"min_clients must be at least 1, got {self.min_clients}")

    @property
    def minimum_participants(self) -> int:
        """Participants a round needs; never 0 (the seed's `floor` could make it 0)."""
        return max(1, ceil_share(self.participants_ratio, self.min_clients))


class ParticipantState(enum.Enum):
    WAITING = "waiting"
    SELECTED = "selected"
    DONE = "done"
    DONE_INACTIVE = "done_inactive"
    IGNORED = "ignored"


class Phase(enum.Enum):
    TRAINING = "training"
    AGGREGATING = "aggregating"
    COMPLETE = "complete"


class HeartbeatState(enum.Enum):
    STAND_BY = "stand_by"
    ROUND = "round"
    FINISH = "finish"
    REJECT = "reject"


@dataclass(frozen=True)
class HeartbeatAnswer:
    state: HeartbeatState
    round: int | None = None


class SelectionEnd(enum.Enum):
    """Why a participant stopped being selected."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"
    TRAINING_TIMEOUT = "training_timeout"
    RESTARTED = "restarted"
    ROUND_RESTARTED = "round_restarted"


@dataclass(frozen=True)
class ParticipantsSelected:
    """These participants now train in `round`: arm their training timers, tell them."""

    participant_ids: tuple[str, ...]
    round: int


@dataclass(frozen=True)
class SelectionEnded:
    """This participant no longer trains in the round: disarm its training timer."""

    participant_id: str
    reason: SelectionEnd


@dataclass(frozen=True)
class ParticipantRemoved:
    """This participant is no longer known: forget its heartbeat timer and token."""

    participant_id: str


@dataclass(frozen=True)
class AggregationRequested:
    """The round's results are all in: ask the aggregator to aggregate `round`.

    `participant_ids` are the participants whose results count (done and
    done-and-inactive); the aggregator checks it holds exactly those. The
    round number alone identifies the effect.
    """

    round: int
    participant_ids: tuple[str, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class RoundCompleted:
    """The aggregation of `round` succeeded; `round + 1` starts (or training ends)."""

    round: int


@dataclass(frozen=True)
class RoundRepeated:
    """The aggregation of `round` failed; the same round runs again."""

    round: int


@dataclass(frozen=True)
class TrainingCompleted:
    """All rounds are done: heartbeats answer `finish` from now on."""

    rounds: int


Effect = Union[
    ParticipantsSelected,
    SelectionEnded,
    ParticipantRemoved,
    AggregationRequested,
    RoundCompleted,
    RoundRepeated,
    TrainingCompleted,
]


@dataclass(frozen=True)
class RendezVousResult:
    accepted: bool
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True)
class Counters:
    waiting: int = 0
    selected: int = 0
    done: int = 0
    done_inactive: int = 0
    ignored: int = 0

    @property
    def round_participants(self) -> int:
        """Participants that count towards this round: selected, done, done-and-inactive."""
        return self.selected + self.done + self.done_inactive


class RoundStateMachine:
    """The rules of docs/rounds.rst, as a pure object.

    Participants are kept in one dictionary per state so that counting and
    selection cost O(1) per event (selection is O(waiting)), whatever the
    number of participants.
    """

    def __init__(
        self,
        rules: RoundRules,
        *,
        round: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= round <= rules.rounds:
            raise ValueError(f"round must be in [0, {rules.rounds}], got {round}")
        self.rules = rules
        self.round = round
        self.phase = Phase.COMPLETE if round == rules.rounds else Phase.TRAINING
        self._rng = rng if rng is not None else random.Random()
        self._by_state: dict[ParticipantState, dict[str, None]] = {state: {} for state in ParticipantState}
        self._state_of: dict[str, ParticipantState] = {}

    # -- queries ---------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.phase is Phase.COMPLETE

    def state_of(self, participant_id: str) -> ParticipantState | None:
        return self._state_of.get(participant_id)

    def known_count(self) -> int:
        """Participants known in any state."""
        return len(self._state_of)

    def participants_in(self, state: ParticipantState) -> tuple[str, ...]:
        return tuple(self._by_state[state])

    def counters(self) -> Counters:
        return Counters(
            waiting=len(self._by_state[ParticipantState.WAITING]),
            selected=len(self._by_state[ParticipantState.SELECTED]),
            done=len(self._by_state[ParticipantState.DONE]),
            done_inactive=len(self._by_state[ParticipantState.DONE_INACTIVE]),
            ignored=len(self._by_state[ParticipantState.IGNORED]),
        )

    def waiting_reason(self) -> str:
        """Why the round is not progressing right now, for operators."""
        if self.phase is Phase.COMPLETE:
            return f"training complete after {self.rules.rounds} rounds"
        if self.phase is Phase.AGGREGATING:
            return f"waiting for the aggregation of round {self.round}"
        counters = self.counters()
        if counters.selected:
            return f"waiting for {counters.selected} selected participant(s) to deliver round {self.round}"
        known = counters.round_participants + counters.waiting
        missing = self.rules.min_clients - known
        return (
            f"waiting for {missing} more participant(s) to rendez-vous "
            f"({known} of min_clients {self.rules.min_clients} present)"
        )

    def heartbeat(self, participant_id: str) -> HeartbeatAnswer:
        """The answer to a heartbeat. Heartbeats change no state here; timers live outside."""
        if self.phase is Phase.COMPLETE:
            return HeartbeatAnswer(HeartbeatState.FINISH)
        state = self._state_of.get(participant_id)
        if state is None or state is ParticipantState.DONE_INACTIVE:
            return HeartbeatAnswer(HeartbeatState.REJECT)
        if state is ParticipantState.SELECTED:
            return HeartbeatAnswer(HeartbeatState.ROUND, self.round)
        return HeartbeatAnswer(HeartbeatState.STAND_BY)

    def may_start_training(self, participant_id: str) -> bool:
        return self.phase is Phase.TRAINING and self._state_of.get(participant_id) is ParticipantState.SELECTED

    # -- events ----------------------------------------------------------

    def rendez_vous(self, participant_id: str) -> RendezVousResult:
        if self.phase is Phase.COMPLETE:
            return RendezVousResult(accepted=False)
        state = self._state_of.get(participant_id)
        effects: list[Effect] = []
        if state is None:
            self._move(participant_id, ParticipantState.WAITING)
        elif state is ParticipantState.DONE_INACTIVE:
            # Alive again: its result already counts, so it is done, not
            # waiting (it must not train twice in this round).
            self._move(participant_id, ParticipantState.DONE)
        elif state is ParticipantState.SELECTED:
            # It restarted: whatever it was training is lost for this round.
            self._move(participant_id, ParticipantState.IGNORED)
            effects.append(SelectionEnded(participant_id, SelectionEnd.RESTARTED))
        elif state is ParticipantState.DONE:
            self._move(participant_id, ParticipantState.IGNORED)
        effects.extend(self._advance())
        return RendezVousResult(accepted=True, effects=tuple(effects))

    def heartbeat_timed_out(self, participant_id: str) -> tuple[Effect, ...]:
        state = self._state_of.get(participant_id)
        if state is None or state is ParticipantState.DONE_INACTIVE:
            return ()
        if self.phase is Phase.COMPLETE:
            self._forget(participant_id)
            return (ParticipantRemoved(participant_id),)
        effects: list[Effect] = []
        if state is ParticipantState.DONE:
            self._move(participant_id, ParticipantState.DONE_INACTIVE)
        else:
            self._forget(participant_id)
            if state is ParticipantState.SELECTED:
                effects.append(SelectionEnded(participant_id, SelectionEnd.HEARTBEAT_TIMEOUT))
            effects.append(ParticipantRemoved(participant_id))
        effects.extend(self._advance())
        return tuple(effects)

    def training_timed_out(self, participant_id: str) -> tuple[Effect, ...]:
        if self._state_of.get(participant_id) is not ParticipantState.SELECTED:
            return ()
        self._move(participant_id, ParticipantState.IGNORED)
        return (SelectionEnded(participant_id, SelectionEnd.TRAINING_TIMEOUT), *self._advance())

    def end_training(self, participant_id: str, success: bool) -> tuple[Effect, ...]:
        """The aggregator validated (or refused) this participant's result."""
        if self.phase is not Phase.TRAINING or self._state_of.get(participant_id) is not ParticipantState.SELECTED:
            return ()
        if success:
            self._move(participant_id, ParticipantState.DONE)
            ended = SelectionEnded(participant_id, SelectionEnd.SUCCEEDED)
        else:
            self._move(participant_id, ParticipantState.IGNORED)
            ended = SelectionEnded(participant_id, SelectionEnd.FAILED)
        return (ended, *self._advance())

    def end_aggregation(self, success: bool) -> tuple[Effect, ...]:
        if self.phase is not Phase.AGGREGATING:
            return ()
        effects: list[Effect] = []
        if success:
            effects.append(RoundCompleted(self.round))
            self.round += 1
            if self.round == self.rules.rounds:
                self.phase = Phase.COMPLETE
                return (*effects, TrainingCompleted(self.rules.rounds))
        else:
            effects.append(RoundRepeated(self.round))
        self.phase = Phase.TRAINING
        effects.extend(self._advance())
        return tuple(effects)

    def repeat_round(self) -> tuple[Effect, ...]:
        """Run the current round again from scratch (the aggregator lost some of its results).

        Everyone alive goes back to waiting and selection starts over, so no
        result is counted without its participant having been selected in
        this attempt of the round.
        """
        if self.phase is not Phase.TRAINING:
            return ()
        effects: list[Effect] = [
            SelectionEnded(participant_id, SelectionEnd.ROUND_RESTARTED)
            for participant_id in self._by_state[ParticipantState.SELECTED]
        ]
        self._everyone_waits()
        effects.append(RoundRepeated(self.round))
        effects.extend(self._advance())
        return tuple(effects)

    def resume_at(self, round: int) -> tuple[Effect, ...]:
        """Catch up with an aggregator that already aggregated rounds up to `round - 1`.

        This happens when the answer to an aggregation was lost (link down,
        coordinator restarted before it persisted the round counter).
        """
        round = min(round, self.rules.rounds)
        if round <= self.round or self.phase is Phase.COMPLETE:
            return ()
        effects: list[Effect] = [
            SelectionEnded(participant_id, SelectionEnd.ROUND_RESTARTED)
            for participant_id in self._by_state[ParticipantState.SELECTED]
        ]
        self._everyone_waits()
        effects.append(RoundCompleted(round - 1))
        self.round = round
        if round == self.rules.rounds:
            self.phase = Phase.COMPLETE
            effects.append(TrainingCompleted(self.rules.rounds))
            return tuple(effects)
        self.phase = Phase.TRAINING
        effects.extend(self._advance())
        return tuple(effects)

    # -- internals -------------------------------------------------------

    def _move(self, participant_id: str, state: ParticipantState) -> None:
        previous = self._state_of.get(participant_id)
        if previous is not None:
            del self._by_state[previous][participant_id]
        self._by_state[state][participant_id] = None
        self._state_of[participant_id] = state

    def _forget(self, participant_id: str) -> None:
        state = self._state_of.pop(participant_id)
        del self._by_state[state][participant_id]

    def _selection_size(self, counters: Counters) -> int:
        """How many waiting participants to select now (0 when none are needed)."""
        participants = counters.round_participants
        known = participants + counters.waiting
        if participants >= self.rules.minimum_participants or known < self.rules.min_clients:
            return 0
        return ceil_share(self.rules.participants_ratio, known) - participants

    def _advance(self) -> list[Effect]:
        """Select where the rules need it, and end the round when it is over."""
        if self.phase is not Phase.TRAINING:
            return []
        effects: list[Effect] = []
        counters = self.counters()
        wanted = self._selection_size(counters)
        if wanted > 0:
            chosen = self._rng.sample(list(self._by_state[ParticipantState.WAITING]), wanted)
            for participant_id in chosen:
                self._move(participant_id, ParticipantState.SELECTED)
            effects.append(ParticipantsSelected(tuple(chosen), self.round))
            return effects
        if counters.selected == 0 and counters.round_participants >= self.rules.minimum_participants:
            counted = (*self._by_state[ParticipantState.DONE], *self._by_state[ParticipantState.DONE_INACTIVE])
            effects.append(AggregationRequested(self.round, counted))
            self._end_round()
        return effects

    def _end_round(self) -> None:
        self.phase = Phase.AGGREGATING
        self._everyone_waits()

    def _everyone_waits(self) -> None:
        """Everyone alive waits for the next selection; the inactive are dropped."""
        for participant_id in list(self._by_state[ParticipantState.DONE_INACTIVE]):
            self._forget(participant_id)
        for state in (ParticipantState.SELECTED, ParticipantState.DONE, ParticipantState.IGNORED):
            for participant_id in list(self._by_state[state]):
                self._move(participant_id, ParticipantState.WAITING)
