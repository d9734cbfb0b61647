"""Property tests of the round state machine: random event sequences against docs/rounds.rst.

A hypothesis rule-based state machine drives a RoundStateMachine with random
rendez-vous (new and known ids), heartbeats, heartbeat and training timeouts,
start-training checks, end-training and end-of-aggregation reports (and the
re-synchronisation calls repeat_round and resume_at), under small random
rules. Each step is checked twice:

* against a shadow model written from docs/rounds.rst (participant states,
  phase, round number, and the exact effects of the step; only the choice of
  *which* waiting participants get selected is left to the machine's rng);
* against invariants that read the machine alone (see `invariants`).

The selection bound, stated exactly (and checked on every ParticipantsSelected):
a selection happens only when the round participants p (selected + done +
done-and-inactive) are below the minimum m and known = p + waiting >=
min_clients; it moves ceil(ratio * known) - p waiting participants to
selected, which leaves `known` unchanged, so right after it p ==
ceil(ratio * known). Because known >= min_clients, ceil(ratio * known) >= m,
hence p <= max(m, ceil(ratio * known)) with equality on the second term, and
p >= m. Between selections of a round, p never grows (only selection adds
round participants), so at every step p <= the value right after the round's
last selection (`cap` below). ceil(ratio * n) is taken for the ratio as
written (Fraction(repr(ratio))), as docs/rounds.rst says: see `share`.

The round number changes only on a successful end_aggregation (by exactly 1)
or on resume_at (forward only, to the round it names, clipped to `rounds`).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from fractions import Fraction

from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from xaind.coordinator.rounds import (
    AggregationRequested,
    HeartbeatAnswer,
    HeartbeatState,
    ParticipantRemoved,
    ParticipantsSelected,
    ParticipantState,
    Phase,
    RendezVousResult,
    RoundCompleted,
    RoundRepeated,
    RoundRules,
    RoundStateMachine,
    SelectionEnd,
    SelectionEnded,
    TrainingCompleted,
)

WAITING = ParticipantState.WAITING
SELECTED = ParticipantState.SELECTED
DONE = ParticipantState.DONE
DONE_INACTIVE = ParticipantState.DONE_INACTIVE
IGNORED = ParticipantState.IGNORED

POOL = tuple(f"p{i}" for i in range(8))
NEVER_SEEN = "never-seen"  # never passed to rendez_vous
ALL_IDS = (*POOL, NEVER_SEEN)

ratios = st.one_of(
    st.sampled_from([0.1, 0.2, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.8, 0.9, 1.0]),
    st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False),
)
ids = st.sampled_from(POOL)
mostly_true = st.sampled_from([True, True, True, False])


def share(ratio: float, count: int) -> int:
    """ceil(ratio * count) for the ratio as written (0.28 of 25 is 7), not for its binary float."""
    return math.ceil(Fraction(repr(ratio)) * count)


def selections(effects) -> list[ParticipantsSelected]:
    return [effect for effect in effects if isinstance(effect, ParticipantsSelected)]


class RoundMachineProperties(RuleBasedStateMachine):
    # -- set-up --------------------------------------------------------------

    @initialize(
        rounds=st.integers(min_value=1, max_value=4),
        ratio=ratios,
        min_clients=st.integers(min_value=1, max_value=5),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        data=st.data(),
    )
    def setup(self, rounds, ratio, min_clients, seed, data):
        start = data.draw(st.one_of(st.just(0), st.integers(min_value=0, max_value=rounds)), label="start round")
        self.rules = RoundRules(rounds=rounds, participants_ratio=ratio, min_clients=min_clients)
        self.machine = RoundStateMachine(self.rules, round=start, rng=random.Random(seed))
        # The minimum, computed from the design's formula, not from the rules object.
        self.minimum = max(1, share(ratio, min_clients))
        assert self.rules.minimum_participants == self.minimum
        # Shadow model.
        self.states: dict[str, ParticipantState] = {}
        self.round = start
        self.phase = Phase.COMPLETE if start == rounds else Phase.TRAINING
        self.cap = 0  # round participants right after this round's last selection
        self.completed = self.phase is Phase.COMPLETE

    # -- the shadow model (docs/rounds.rst) ------------------------------------

    def model_counts(self) -> Counter:
        return Counter(self.states.values())

    def model_advance(self, actual_effects) -> list:
        """Selection or end of round, as the design says; returns the expected effects."""
        if self.phase is not Phase.TRAINING:
            return []
        counts = self.model_counts()
        participants = counts[SELECTED] + counts[DONE] + counts[DONE_INACTIVE]
        known = participants + counts[WAITING]
        if participants < self.minimum and known >= self.rules.min_clients:
            wanted = share(self.rules.participants_ratio, known) - participants
            assert wanted >= 1
            found = selections(actual_effects)
            assert len(found) == 1, f"expected one selection of {wanted}, got {actual_effects}"
            chosen = found[0].participant_ids
            assert found[0].round == self.round
            assert len(chosen) == wanted
            assert len(set(chosen)) == wanted
            for participant_id in chosen:
                assert self.states.get(participant_id) is WAITING, f"{participant_id} selected but not waiting"
                self.states[participant_id] = SELECTED
            self.cap = participants + wanted
            event("selection" if participants == 0 else "replacement selection")
            return [found[0]]
        if counts[SELECTED] == 0 and participants >= self.minimum:
            self.phase = Phase.AGGREGATING
            if counts[DONE_INACTIVE]:
                event("round ended with a done-and-inactive result")
            self.model_everyone_waits()
            event("round ended")
            return [AggregationRequested(self.round)]
        return []

    def model_everyone_waits(self) -> None:
        """Everyone alive goes back to waiting; the done-and-inactive are dropped."""
        for participant_id, state in list(self.states.items()):
            if state is DONE_INACTIVE:
                del self.states[participant_id]
            else:
                self.states[participant_id] = WAITING

    def model_restart_selected(self, effects) -> int:
        """Check the leading SelectionEnded(ROUND_RESTARTED) effects (in any order); return their count."""
        restarted = {pid for pid, state in self.states.items() if state is SELECTED}
        leading = effects[: len(restarted)]
        assert all(isinstance(effect, SelectionEnded) for effect in leading), effects
        assert {effect.participant_id for effect in leading} == restarted
        assert {effect.reason for effect in leading} <= {SelectionEnd.ROUND_RESTARTED}
        return len(restarted)

    def expected_heartbeat(self, participant_id: str) -> HeartbeatAnswer:
        if self.phase is Phase.COMPLETE:
            return HeartbeatAnswer(HeartbeatState.FINISH)
        state = self.states.get(participant_id)
        if state is None or state is DONE_INACTIVE:
            return HeartbeatAnswer(HeartbeatState.REJECT)
        if state is SELECTED:
            return HeartbeatAnswer(HeartbeatState.ROUND, self.round)
        return HeartbeatAnswer(HeartbeatState.STAND_BY)

    def selected_ids_or_anyone(self) -> tuple[str, ...]:
        """The selected participants, or any id when there are none (the report is then stale)."""
        return tuple(sorted(self.machine.participants_in(SELECTED))) or ALL_IDS

    # -- checks shared by every event ---------------------------------------

    def before(self) -> dict:
        return {
            "round": self.machine.round,
            "phase": self.machine.phase,
            "counters": self.machine.counters(),
            "states": {participant_id: self.machine.state_of(participant_id) for participant_id in ALL_IDS},
            "completed": self.completed,
        }

    def after(
        self,
        snapshot: dict,
        effects,
        *,
        aggregation_success: bool = False,
        resumed_at: int | None = None,
        restarted: bool = False,
    ) -> None:
        machine = self.machine
        # The round number moves only on a successful end of aggregation, by
        # exactly 1 (or, when catching up with the aggregator, to the round
        # resume_at names, and then only forward).
        if aggregation_success and snapshot["phase"] is Phase.AGGREGATING:
            assert machine.round == snapshot["round"] + 1
            event("round advanced")
        elif resumed_at is not None and machine.round != snapshot["round"]:
            assert snapshot["round"] < machine.round == min(resumed_at, self.rules.rounds)
            event("resumed at a later round")
        else:
            assert machine.round == snapshot["round"]
        # Nothing is ever selected once training is complete.
        if snapshot["completed"]:
            assert not selections(effects)
            assert machine.phase is Phase.COMPLETE
        if any(isinstance(effect, TrainingCompleted) for effect in effects):
            assert effects[-1] == TrainingCompleted(self.rules.rounds)
            assert not selections(effects)
            self.completed = True
            event("training completed")
        assert machine.complete is self.completed
        # At most one selection per event, bounded as the module docstring proves.
        found = selections(effects)
        assert len(found) <= 1
        if found:
            chosen = found[0].participant_ids
            counters = machine.counters()
            known = counters.round_participants + counters.waiting
            assert counters.round_participants - len(chosen) < self.minimum
            assert known >= self.rules.min_clients
            assert counters.round_participants == share(self.rules.participants_ratio, known)
            assert counters.round_participants <= max(self.minimum, share(self.rules.participants_ratio, known))
            assert counters.round_participants >= self.minimum
            for participant_id in chosen:
                assert machine.state_of(participant_id) is SELECTED
                if restarted:  # the round started over: anyone alive may be selected again
                    assert snapshot["states"][participant_id] in (WAITING, SELECTED, DONE, IGNORED)
                else:  # waiting, or new in this very rendez-vous
                    assert snapshot["states"][participant_id] in (WAITING, None)

    # -- events ---------------------------------------------------------------

    @rule(participant_id=ids)
    def rendez_vous(self, participant_id):
        snapshot = self.before()
        result = self.machine.rendez_vous(participant_id)
        if self.phase is Phase.COMPLETE:
            assert result == RendezVousResult(accepted=False, effects=())
            event("rendez-vous refused")
        else:
            assert result.accepted is True
            state = self.states.get(participant_id)
            expected: list = []
            if state is None:
                self.states[participant_id] = WAITING
            elif state is SELECTED:
                self.states[participant_id] = IGNORED
                expected.append(SelectionEnded(participant_id, SelectionEnd.RESTARTED))
            elif state is DONE:
                self.states[participant_id] = IGNORED
            elif state is DONE_INACTIVE:
                self.states[participant_id] = DONE
            expected += self.model_advance(result.effects)
            assert result.effects == tuple(expected)
        self.after(snapshot, result.effects)

    @rule(participant_id=st.sampled_from(ALL_IDS))
    def heartbeat(self, participant_id):
        snapshot = self.before()
        assert self.machine.heartbeat(participant_id) == self.expected_heartbeat(participant_id)
        assert self.before() == snapshot  # a heartbeat changes no state
        self.after(snapshot, ())

    @rule(participant_id=st.sampled_from(ALL_IDS))
    def heartbeat_timeout(self, participant_id):
        snapshot = self.before()
        effects = self.machine.heartbeat_timed_out(participant_id)
        state = self.states.get(participant_id)
        if state is None or state is DONE_INACTIVE:
            assert effects == ()
        elif self.phase is Phase.COMPLETE:
            # Removed as always, but nothing else happens once training is complete.
            assert effects == (ParticipantRemoved(participant_id),)
            del self.states[participant_id]
            event("removed after completion")
        else:
            expected: list = []
            if state is DONE:
                self.states[participant_id] = DONE_INACTIVE  # its result still counts
            else:
                del self.states[participant_id]
                if state is SELECTED:
                    expected.append(SelectionEnded(participant_id, SelectionEnd.HEARTBEAT_TIMEOUT))
                expected.append(ParticipantRemoved(participant_id))
            expected += self.model_advance(effects)
            assert effects == tuple(expected)
        self.after(snapshot, effects)

    def _training_timeout(self, participant_id):
        snapshot = self.before()
        effects = self.machine.training_timed_out(participant_id)
        if self.states.get(participant_id) is SELECTED:
            self.states[participant_id] = IGNORED
            expected = [SelectionEnded(participant_id, SelectionEnd.TRAINING_TIMEOUT)]
            expected += self.model_advance(effects)
            assert effects == tuple(expected)
        else:
            assert effects == ()
        self.after(snapshot, effects)

    @rule(participant_id=st.sampled_from(ALL_IDS))
    def training_timeout(self, participant_id):
        self._training_timeout(participant_id)


    @rule(data=st.data())
    def training_timeout_of_a_selected(self, data):
        self._training_timeout(data.draw(st.sampled_from(self.selected_ids_or_anyone()), label="participant"))

    @rule(participant_id=st.sampled_from(ALL_IDS))
    def start_training_check(self, participant_id):
        snapshot = self.before()
        expected = self.phase is Phase.TRAINING and self.states.get(participant_id) is SELECTED
        assert self.machine.may_start_training(participant_id) is expected
        self.after(snapshot, ())

    def _end_training(self, participant_id, success):
        snapshot = self.before()
        effects = self.machine.end_training(participant_id, success)
        if self.phase is Phase.TRAINING and self.states.get(participant_id) is SELECTED:
            if success:
                self.states[participant_id] = DONE
                expected = [SelectionEnded(participant_id, SelectionEnd.SUCCEEDED)]
            else:
                self.states[participant_id] = IGNORED
                expected = [SelectionEnded(participant_id, SelectionEnd.FAILED)]
            expected += self.model_advance(effects)
            assert effects == tuple(expected)
        else:
            assert effects == ()  # stale or unknown report
        self.after(snapshot, effects)

    @rule(participant_id=st.sampled_from(ALL_IDS), success=st.booleans())
    def end_training(self, participant_id, success):
        self._end_training(participant_id, success)

    @rule(data=st.data(), success=mostly_true)
    def end_training_of_a_selected(self, data, success):
        self._end_training(data.draw(st.sampled_from(self.selected_ids_or_anyone())), success)

    @rule()
    def every_selected_succeeds(self):
        """The common path: all of the round's results come in, one after the other."""
        for participant_id in sorted(self.machine.participants_in(SELECTED)):
            self._end_training(participant_id, True)

    @rule(participant_ids=st.lists(ids, min_size=1, max_size=len(POOL)))
    def several_rendez_vous(self, participant_ids):
        """A burst of arrivals (new and known ids), so that rounds can start and end within a run."""
        for participant_id in participant_ids:
            self.rendez_vous(participant_id)

    @rule(
        data=st.data(),
        action=st.sampled_from(["rendez_vous", "heartbeat_timeout", "training_timeout", "end_training", "end_training_failed"]),
    )
    def event_for_a_participant_in_some_state(self, data, action):
        """Draw a state first, then a participant in it, so that rare states (done,
        done-and-inactive, ignored) get their share of events too."""
        present = sorted({state for pid in POOL if (state := self.machine.state_of(pid)) is not None}, key=lambda s: s.value)
        if present:
            state = data.draw(st.sampled_from(present), label="state")
            participant_id = data.draw(st.sampled_from(sorted(self.machine.participants_in(state))), label="participant")
        else:
            participant_id = data.draw(ids, label="participant")
        if action == "rendez_vous":
            self.rendez_vous(participant_id)
        elif action == "heartbeat_timeout":
            self.heartbeat_timeout(participant_id)
        elif action == "training_timeout":
            self._training_timeout(participant_id)
        else:
            self._end_training(participant_id, action == "end_training")

    @rule(data=st.data())
    def a_selected_delivers_then_goes_silent(self, data):
        """Its result is accepted, then its heartbeat times out: done, then done-and-inactive."""
        participant_id = data.draw(st.sampled_from(self.selected_ids_or_anyone()), label="participant")
        self._end_training(participant_id, True)
        self.heartbeat_timeout(participant_id)

    @rule()
    def a_round_goes_well(self):
        """Every selected participant succeeds, then the aggregation succeeds."""
        self.every_selected_succeeds()
        self.end_aggregation(True)

    @rule(success=mostly_true)
    def end_aggregation(self, success):
        snapshot = self.before()
        effects = self.machine.end_aggregation(success)
        if self.phase is not Phase.AGGREGATING:
            assert effects == ()
        else:
            expected: list
            if success:
                expected = [RoundCompleted(self.round)]
                self.round += 1
                if self.round == self.rules.rounds:
                    self.phase = Phase.COMPLETE
                    expected.append(TrainingCompleted(self.rules.rounds))
                else:
                    self.phase = Phase.TRAINING
            else:
                expected = [RoundRepeated(self.round)]
                self.phase = Phase.TRAINING
                event("round repeated")
            self.cap = 0
            expected += self.model_advance(effects)
            assert effects == tuple(expected)
        self.after(snapshot, effects, aggregation_success=success)

    @rule()
    def repeat_round(self):
        snapshot = self.before()
        effects = self.machine.repeat_round()
        if self.phase is not Phase.TRAINING:
            assert effects == ()
        else:
            n = self.model_restart_selected(effects)
            self.model_everyone_waits()
            self.cap = 0
            expected = [*effects[:n], RoundRepeated(self.round)]
            expected += self.model_advance(effects)
            assert effects == tuple(expected)
            event("repeat_round")
        self.after(snapshot, effects, restarted=True)

    @rule(delta=st.sampled_from([-1, 0, 0, 1, 3]))
    def resume_at(self, delta):
        """The aggregator says it already aggregated up to round `self.round + delta - 1`."""
        model_round = self.machine.round + delta
        snapshot = self.before()
        effects = self.machine.resume_at(model_round)
        target_round = min(model_round, self.rules.rounds)
        if target_round <= self.round or self.phase is Phase.COMPLETE:
            assert effects == ()
        else:
            n = self.model_restart_selected(effects)
            self.model_everyone_waits()
            self.cap = 0
            expected = [*effects[:n], RoundCompleted(target_round - 1)]
            self.round = target_round
            if target_round == self.rules.rounds:
                self.phase = Phase.COMPLETE
                expected.append(TrainingCompleted(self.rules.rounds))
            else:
                self.phase = Phase.TRAINING
                expected += self.model_advance(effects)
            assert effects == tuple(expected)
        self.after(snapshot, effects, resumed_at=model_round, restarted=True)

    # -- invariants (after every step) ----------------------------------------

    @invariant()
    def machine_matches_the_model(self):
        assert self.machine.round == self.round
        assert self.machine.phase is self.phase
        for participant_id in ALL_IDS:
            assert self.machine.state_of(participant_id) is self.states.get(participant_id), participant_id

    @invariant()
    def counters_count_the_real_participants(self):
        machine = self.machine
        real = Counter(machine.state_of(participant_id) for participant_id in ALL_IDS)
        counters = machine.counters()
        assert counters.waiting == real[WAITING]
        assert counters.selected == real[SELECTED]
        assert counters.done == real[DONE]
        assert counters.done_inactive == real[DONE_INACTIVE]
        assert counters.ignored == real[IGNORED]
        assert counters.round_participants == real[SELECTED] + real[DONE] + real[DONE_INACTIVE]
        for state in ParticipantState:
            members = machine.participants_in(state)
            assert len(members) == len(set(members))
            assert set(members) == {pid for pid in ALL_IDS if machine.state_of(pid) is state}
        assert machine.state_of(NEVER_SEEN) is None

    @invariant()
    def round_participants_stay_within_the_selection_bound(self):
        counters = self.machine.counters()
        if self.machine.phase is Phase.TRAINING:
            assert counters.round_participants <= self.cap
            # Quiescence: nothing the design asks for is left undone.
            known = counters.round_participants + counters.waiting
            assert not (counters.round_participants < self.minimum and known >= self.rules.min_clients), (
                "a selection was due but did not run"
            )
            assert not (counters.selected == 0 and counters.round_participants >= self.minimum), (
                "the round was over but did not end"
            )

    @invariant()
    def aggregating_means_everyone_waits(self):
        if self.machine.phase is Phase.AGGREGATING:
            counters = self.machine.counters()
            assert counters.selected == counters.done == counters.done_inactive == counters.ignored == 0

    @invariant()
    def complete_means_finish_and_no_selection(self):
        machine = self.machine
        if machine.phase is Phase.COMPLETE:
            assert machine.complete
            assert machine.round == self.rules.rounds
            assert machine.counters().selected == 0
            for participant_id in ALL_IDS:
                assert machine.heartbeat(participant_id) == HeartbeatAnswer(HeartbeatState.FINISH)
        else:
            assert machine.round < self.rules.rounds

    @invariant()
    def start_training_exactly_for_the_selected_while_training(self):
        machine = self.machine
        for participant_id in ALL_IDS:
            expected = machine.phase is Phase.TRAINING and machine.state_of(participant_id) is SELECTED
            assert machine.may_start_training(participant_id) is expected

    @invariant()
    def heartbeats_answer_by_state(self):
        for participant_id in ALL_IDS:
            assert self.machine.heartbeat(participant_id) == self.expected_heartbeat(participant_id)

    @invariant()
    def waiting_reason_is_a_sentence(self):
        reason = self.machine.waiting_reason()
        assert isinstance(reason, str) and reason


RoundMachineProperties.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
)
TestRoundMachineProperties = RoundMachineProperties.TestCase
