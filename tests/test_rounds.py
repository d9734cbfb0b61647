"""Unit tests of the round state machine: one test per rule of docs/rounds.rst.

Every test asserts on values (participant states, counters, phase, round
number, the exact effects returned), never only that nothing raised.
"""

from __future__ import annotations

import math
import random

import pytest

from xaind.coordinator.rounds import (
    AggregationRequested,
    Counters,
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

STAND_BY = HeartbeatAnswer(HeartbeatState.STAND_BY)
REJECT = HeartbeatAnswer(HeartbeatState.REJECT)
FINISH = HeartbeatAnswer(HeartbeatState.FINISH)


def round_answer(number: int) -> HeartbeatAnswer:
    return HeartbeatAnswer(HeartbeatState.ROUND, number)


# -- helpers ---------------------------------------------------------------


def make(rounds: int = 3, ratio: float = 1.0, min_clients: int = 1, *, seed: int = 0, round: int = 0) -> RoundStateMachine:
    rules = RoundRules(rounds=rounds, participants_ratio=ratio, min_clients=min_clients)
    return RoundStateMachine(rules, round=round, rng=random.Random(seed))


def join(machine: RoundStateMachine, *ids: str) -> list:
    """Rendez-vous each id in turn (each must be accepted); return all effects."""
    effects: list = []
    for participant_id in ids:
        result = machine.rendez_vous(participant_id)
        assert result.accepted
        effects.extend(result.effects)
    return effects


def selections(effects) -> list[ParticipantsSelected]:
    return [effect for effect in effects if isinstance(effect, ParticipantsSelected)]


def selected(machine: RoundStateMachine) -> set[str]:
    return set(machine.participants_in(SELECTED))


def finish_round(machine: RoundStateMachine) -> tuple:
    """Every selected participant succeeds; return the effects of the last report."""
    effects: tuple = ()
    for participant_id in sorted(selected(machine)):
        effects = machine.end_training(participant_id, True)
    return effects


def two_selected() -> RoundStateMachine:
    """ratio 1, min_clients 2: "a" and "b" are both selected in round 0."""
    machine = make(rounds=3, ratio=1.0, min_clients=2)
    join(machine, "a", "b")
    assert selected(machine) == {"a", "b"}
    return machine


def one_selected_one_waiting() -> RoundStateMachine:
    """ratio 0.5, min_clients 1 (minimum 1): "a" is selected, "b" waits (a replacement)."""
    machine = make(rounds=3, ratio=0.5, min_clients=1)
    assert join(machine, "a") == [ParticipantsSelected(("a",), 0)]
    assert join(machine, "b") == []
    assert machine.state_of("a") is SELECTED
    assert machine.state_of("b") is WAITING
    return machine


def zoo() -> tuple[RoundStateMachine, dict[str, str]]:
    """A machine in round 1 with one participant in each state, and more waiting.

    ratio 0.5, min_clients 4 (minimum 2), 8 participants: round 0 selects 2;
    round 1 selects ceil(0.5 * 8) = 4, which take the roles selected, done,
    done-and-inactive and ignored; 4 stay waiting. Round participants stay at
    3 >= minimum, so no replacement is selected and the round does not end.
    """
    machine = make(rounds=3, ratio=0.5, min_clients=4, seed=7)
    ids = [f"p{i}" for i in range(8)]
    join(machine, *ids)
    assert len(selected(machine)) == 2
    assert finish_round(machine)[-1] == AggregationRequested(0)
    assert machine.phase is Phase.AGGREGATING
    effects = machine.end_aggregation(True)
    assert effects[0] == RoundCompleted(0)
    chosen = sorted(selected(machine))
    assert len(chosen) == 4
    roles = {"selected": chosen[0], "done": chosen[1], "done_inactive": chosen[2], "ignored": chosen[3]}
    roles["waiting"] = sorted(machine.participants_in(WAITING))[0]
    assert machine.end_training(roles["done"], True) == (SelectionEnded(roles["done"], SelectionEnd.SUCCEEDED),)
    assert machine.end_training(roles["done_inactive"], True) == (
        SelectionEnded(roles["done_inactive"], SelectionEnd.SUCCEEDED),
    )
    assert machine.heartbeat_timed_out(roles["done_inactive"]) == ()
    assert machine.end_training(roles["ignored"], False) == (SelectionEnded(roles["ignored"], SelectionEnd.FAILED),)
    assert machine.counters() == Counters(waiting=4, selected=1, done=1, done_inactive=1, ignored=1)
    assert machine.round == 1 and machine.phase is Phase.TRAINING
    return machine, roles


# -- rules and construction -----------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "min_clients", "expected"),
    [
        (1.0, 1, 1),
        (1.0, 5, 5),
        (0.5, 4, 2),
        (0.5, 3, 2),  # ceil(1.5), where floor would give 1
        (0.3, 10, 3),
        (0.75, 4, 3),
        (0.25, 3, 1),
        (0.01, 5, 1),
        (0.8, 1, 1),  # the seed's floor gave 0 here
    ],
)
def test_minimum_participants_is_ceil_of_ratio_times_min_clients(ratio, min_clients, expected):
    assert RoundRules(rounds=1, participants_ratio=ratio, min_clients=min_clients).minimum_participants == expected


def test_minimum_participants_is_never_zero_even_for_a_tiny_ratio():
    assert RoundRules(participants_ratio=1e-9, min_clients=1).minimum_participants == 1


def test_ratio_08_with_one_min_client_starts_a_round_with_a_single_participant():
    # The seed's floor(0.8 * 1) == 0 meant a round never started.
    machine = make(rounds=2, ratio=0.8, min_clients=1)
    assert machine.rules.minimum_participants == 1
    result = machine.rendez_vous("solo")
    assert result == RendezVousResult(accepted=True, effects=(ParticipantsSelected(("solo",), 0),))
    assert machine.state_of("solo") is SELECTED
    assert machine.heartbeat("solo") == round_answer(0)
    assert machine.may_start_training("solo") is True


@pytest.mark.parametrize("rounds", [0, -1])
def test_rules_reject_fewer_than_one_round(rounds):
    with pytest.raises(ValueError, match="rounds"):
        RoundRules(rounds=rounds)


@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.0000001, 2.0, float("nan")])
def test_rules_reject_a_ratio_outside_zero_one(ratio):
    with pytest.raises(ValueError, match="participants_ratio"):
        RoundRules(participants_ratio=ratio)


@pytest.mark.parametrize("min_clients", [0, -3])
def test_rules_reject_fewer_than_one_min_client(min_clients):
    with pytest.raises(ValueError, match="min_clients"):
        RoundRules(min_clients=min_clients)


def test_rules_accept_the_bounds():
    rules = RoundRules(rounds=1, participants_ratio=1.0, min_clients=1)
    assert (rules.rounds, rules.participants_ratio, rules.min_clients) == (1, 1.0, 1)
    assert rules.minimum_participants == 1


def test_a_new_machine_starts_round_0_training_and_empty():
    machine = make(rounds=3)
    assert machine.round == 0
    assert machine.phase is Phase.TRAINING
    assert machine.complete is False
    assert machine.counters() == Counters()


def test_a_machine_started_at_round_rounds_is_complete():
    machine = make(rounds=3, round=3)
    assert machine.phase is Phase.COMPLETE
    assert machine.complete is True
    assert machine.heartbeat("anyone") == FINISH
    assert machine.rendez_vous("anyone") == RendezVousResult(accepted=False)
    assert machine.state_of("anyone") is None
    assert machine.counters() == Counters()


def test_a_machine_resumed_mid_training_selects_for_that_round():
    machine = make(rounds=3, round=2)
    assert machine.phase is Phase.TRAINING
    assert join(machine, "a") == [ParticipantsSelected(("a",), 2)]
    assert machine.heartbeat("a") == round_answer(2)


@pytest.mark.parametrize("start", [-1, 4])
def test_a_machine_rejects_a_round_outside_zero_to_rounds(start):
    with pytest.raises(ValueError, match="round"):
        make(rounds=3, round=start)


# -- selection ---------------------------------------------------------------


def test_nothing_is_selected_before_min_clients_are_known():
    machine = make(ratio=1.0, min_clients=3)
    assert join(machine, "a", "b") == []
    assert machine.counters() == Counters(waiting=2)
    [selection] = join(machine, "c")
    assert selection.round == 0
    assert sorted(selection.participant_ids) == ["a", "b", "c"]
    assert machine.counters() == Counters(selected=3)


def test_ratio_half_min_clients_4_selects_two_when_the_fourth_arrives():
    machine = make(ratio=0.5, min_clients=4, seed=1)
    assert machine.rules.minimum_participants == 2
    assert join(machine, "a", "b", "c") == []
    assert machine.counters() == Counters(waiting=3)
    effects = join(machine, "d")
    [selection] = selections(effects)
    assert effects == [selection]
    assert selection.round == 0
    assert len(selection.participant_ids) == 2
    assert set(selection.participant_ids) <= {"a", "b", "c", "d"}
    assert selected(machine) == set(selection.participant_ids)
    assert machine.counters() == Counters(waiting=2, selected=2)


def test_selection_size_uses_every_known_participant_not_only_min_clients():
    # ratio 0.5, min_clients 2: round 0 selects ceil(0.5 * 2) = 1; round 1,
    # with 5 known, selects ceil(0.5 * 5) = 3.
    machine = make(rounds=2, ratio=0.5, min_clients=2, seed=3)
    join(machine, "a", "b")
    assert len(selected(machine)) == 1
    assert join(machine, "c", "d", "e") == []  # enough participants: no more selected
    assert machine.counters() == Counters(waiting=4, selected=1)
    effects = finish_round(machine)
    assert effects[-1] == AggregationRequested(0)
    effects = machine.end_aggregation(True)
    assert effects[0] == RoundCompleted(0)
    [selection] = selections(effects)
    assert selection.round == 1
    assert len(selection.participant_ids) == 3
    assert machine.counters() == Counters(waiting=2, selected=3)


def test_no_selection_while_round_participants_reach_the_minimum():
    machine = one_selected_one_waiting()
    assert join(machine, "c", "d", "e") == []
    assert machine.counters() == Counters(waiting=4, selected=1)


def test_selection_subtracts_done_participants_from_the_target():
    # ratio 0.5, min_clients 4 (minimum 2): 4 known -> 2 selected; 2 more wait.
    machine = make(ratio=0.5, min_clients=4, seed=5)
    join(machine, "a", "b", "c", "d", "e", "f")
    first, second = sorted(selected(machine))
    assert machine.end_training(first, True) == (SelectionEnded(first, SelectionEnd.SUCCEEDED),)
    waiting_before = set(machine.participants_in(WAITING))
    assert len(waiting_before) == 4
    # second is lost: participants 1 (done) < 2 and known = 1 + 4 = 5 >= 4,
    # so ceil(0.5 * 5) - 1 = 2 are selected.
    effects = machine.heartbeat_timed_out(second)
    assert effects[:2] == (SelectionEnded(second, SelectionEnd.HEARTBEAT_TIMEOUT), ParticipantRemoved(second))
    [selection] = selections(effects)
    assert len(selection.participant_ids) == 2
    assert set(selection.participant_ids) <= waiting_before
    assert machine.counters() == Counters(waiting=2, selected=2, done=1)


def test_selection_counts_done_inactive_participants_as_round_participants():
    machine = make(ratio=0.5, min_clients=4, seed=5)
    join(machine, "a", "b", "c", "d", "e", "f")
    first, second = sorted(selected(machine))
    machine.end_training(first, True)
    assert machine.heartbeat_timed_out(first) == ()
    assert machine.state_of(first) is DONE_INACTIVE
    effects = machine.heartbeat_timed_out(second)
    [selection] = selections(effects)
    # participants 1 (done-and-inactive), known 1 + 4 = 5: ceil(2.5) - 1 = 2.
    assert len(selection.participant_ids) == 2
    assert machine.counters() == Counters(waiting=2, selected=2, done_inactive=1)


def test_selection_with_the_same_seed_is_reproducible():
    picks = []
    for _ in range(2):
        machine = make(ratio=0.5, min_clients=6, seed=42)
        effects = join(machine, *(f"p{i}" for i in range(6)))
        [selection] = selections(effects)
        picks.append(selection.participant_ids)
    assert picks[0] == picks[1]
    assert len(picks[0]) == 3


def test_selection_draws_from_the_waiting_with_the_machine_rng():
    seen = set()
    for seed in range(30):
        machine = make(ratio=0.25, min_clients=4, seed=seed)
        [selection] = selections(join(machine, "a", "b", "c", "d"))
        assert len(selection.participant_ids) == 1
        seen.update(selection.participant_ids)
    assert seen == {"a", "b", "c", "d"}  # not always the first or the last to come


# -- rendez-vous ---------------------------------------------------------------


def test_rendez_vous_of_a_new_participant_makes_it_waiting():
    machine = make(min_clients=2)
    assert machine.rendez_vous("a") == RendezVousResult(accepted=True, effects=())
    assert machine.state_of("a") is WAITING
    assert machine.participants_in(WAITING) == ("a",)


def test_rendez_vous_again_of_a_waiting_participant_changes_nothing():
    machine = make(min_clients=2)
    join(machine, "a")
    assert machine.rendez_vous("a") == RendezVousResult(accepted=True, effects=())
    assert machine.state_of("a") is WAITING
    assert machine.counters() == Counters(waiting=1)


def test_rendez_vous_again_of_an_ignored_participant_keeps_it_ignored():
    machine, roles = zoo()
    before = machine.counters()
    assert machine.rendez_vous(roles["ignored"]) == RendezVousResult(accepted=True, effects=())
    assert machine.state_of(roles["ignored"]) is IGNORED
    assert machine.counters() == before


def test_rendez_vous_again_of_a_selected_participant_ignores_it_and_replaces_it():
    machine = one_selected_one_waiting()
    result = machine.rendez_vous("a")
    assert result == RendezVousResult(
        accepted=True,
        effects=(SelectionEnded("a", SelectionEnd.RESTARTED), ParticipantsSelected(("b",), 0)),
    )
    assert machine.state_of("a") is IGNORED
    assert machine.state_of("b") is SELECTED
    assert machine.may_start_training("a") is False
    assert machine.heartbeat("a") == STAND_BY


def test_rendez_vous_again_of_a_done_participant_ignores_it_for_the_round():
    machine, roles = zoo()
    result = machine.rendez_vous(roles["done"])
    assert result == RendezVousResult(accepted=True, effects=())
    assert machine.state_of(roles["done"]) is IGNORED
    assert machine.counters() == Counters(waiting=4, selected=1, done=0, done_inactive=1, ignored=2)
    # It must not train twice: it is not waiting, so it cannot be selected again.
    assert roles["done"] not in machine.participants_in(WAITING)
    assert machine.may_start_training(roles["done"]) is False


def test_rendez_vous_again_of_a_done_inactive_participant_makes_it_done():
    machine, roles = zoo()
    result = machine.rendez_vous(roles["done_inactive"])
    assert result == RendezVousResult(accepted=True, effects=())
    assert machine.state_of(roles["done_inactive"]) is DONE
    assert machine.counters() == Counters(waiting=4, selected=1, done=2, done_inactive=0, ignored=1)
    assert machine.heartbeat(roles["done_inactive"]) == STAND_BY


def test_rendez_vous_during_aggregation_waits_and_selects_nobody():
    machine = make(ratio=1.0, min_clients=1)
    join(machine, "a")
    assert machine.end_training("a", True)[-1] == AggregationRequested(0)
    assert machine.rendez_vous("b") == RendezVousResult(accepted=True, effects=())
    assert machine.state_of("b") is WAITING
    assert machine.counters() == Counters(waiting=2)
    assert machine.heartbeat("b") == STAND_BY
    assert machine.may_start_training("b") is False


@pytest.mark.parametrize("participant_id", ["a", "stranger"])
def test_rendez_vous_after_the_last_round_is_refused(participant_id):
    machine = make(rounds=1, ratio=1.0, min_clients=1)
    join(machine, "a")
    finish_round(machine)
    machine.end_aggregation(True)
    assert machine.complete
    before = machine.state_of(participant_id)
    assert machine.rendez_vous(participant_id) == RendezVousResult(accepted=False, effects=())
    assert machine.state_of(participant_id) is before
    assert machine.state_of("stranger") is None


# -- heartbeat answers ----------------------------------------------------------


def test_heartbeat_of_a_selected_participant_answers_round_and_its_number():
    machine = make(rounds=3, ratio=1.0, min_clients=1)
    join(machine, "a")
    assert machine.heartbeat("a") == round_answer(0)
    finish_round(machine)
    effects = machine.end_aggregation(True)
    assert effects == (RoundCompleted(0), ParticipantsSelected(("a",), 1))
    assert machine.heartbeat("a") == round_answer(1)


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        ("waiting", STAND_BY),
        ("done", STAND_BY),
        ("ignored", STAND_BY),
        ("done_inactive", REJECT),
        ("selected", round_answer(1)),
    ],
)
def test_heartbeat_answer_by_state(role, expected):
    machine, roles = zoo()
    before = machine.counters()
    assert machine.heartbeat(roles[role]) == expected
    assert machine.counters() == before  # a heartbeat changes no state


def test_heartbeat_of_an_unknown_participant_is_rejected():
    machine = make()
    assert machine.heartbeat("nobody") == REJECT
    assert machine.state_of("nobody") is None


def test_heartbeat_of_a_removed_participant_is_rejected():
    machine = make(min_clients=2)
    join(machine, "a")
    assert machine.heartbeat_timed_out("a") == (ParticipantRemoved("a"),)
    assert machine.heartbeat("a") == REJECT


@pytest.mark.parametrize("participant_id", ["a", "b", "never-seen"])
def test_heartbeat_after_the_last_round_answers_finish_for_any_id(participant_id):
    machine = make(rounds=1, ratio=1.0, min_clients=1)
    join(machine, "a", "b")
    finish_round(machine)
    machine.end_aggregation(True)
    assert machine.heartbeat(participant_id) == FINISH


# -- heartbeat timeout ---------------------------------------------------------


def test_heartbeat_timeout_removes_a_waiting_participant():
    machine = make(min_clients=3)
    join(machine, "a", "b")
    assert machine.heartbeat_timed_out("a") == (ParticipantRemoved("a"),)
    assert machine.state_of("a") is None
    assert machine.counters() == Counters(waiting=1)


def test_heartbeat_timeout_removes_an_ignored_participant():
    machine, roles = zoo()
    assert machine.heartbeat_timed_out(roles["ignored"]) == (ParticipantRemoved(roles["ignored"]),)
    assert machine.state_of(roles["ignored"]) is None
    assert machine.counters() == Counters(waiting=4, selected=1, done=1, done_inactive=1, ignored=0)


def test_heartbeat_timeout_of_a_selected_participant_removes_and_replaces_it():
    machine = one_selected_one_waiting()
    effects = machine.heartbeat_timed_out("a")
    assert effects == (
        SelectionEnded("a", SelectionEnd.HEARTBEAT_TIMEOUT),
        ParticipantRemoved("a"),
        ParticipantsSelected(("b",), 0),
    )
    assert machine.state_of("a") is None
    assert machine.state_of("b") is SELECTED
    assert machine.heartbeat("b") == round_answer(0)


def test_heartbeat_timeout_of_the_last_selected_can_end_the_round():
    machine, roles = zoo()
    effects = machine.heartbeat_timed_out(roles["selected"])
    # done + done-and-inactive = 2 = minimum: nobody more is needed.
    assert effects == (
        SelectionEnded(roles["selected"], SelectionEnd.HEARTBEAT_TIMEOUT),
        ParticipantRemoved(roles["selected"]),
        AggregationRequested(1),
    )
    assert machine.phase is Phase.AGGREGATING
    assert machine.state_of(roles["selected"]) is None


def test_heartbeat_timeout_of_a_done_participant_keeps_its_result():
    machine = two_selected()
    machine.end_training("a", True)
    assert machine.heartbeat_timed_out("a") == ()  # not removed: no ParticipantRemoved
    assert machine.state_of("a") is DONE_INACTIVE
    assert machine.counters() == Counters(selected=1, done_inactive=1)
    assert machine.counters().round_participants == 2
    assert machine.heartbeat("a") == REJECT


def test_a_round_ends_with_a_done_inactive_result_which_is_then_dropped():
    machine = two_selected()
    machine.end_training("a", True)
    machine.heartbeat_timed_out("a")
    effects = machine.end_training("b", True)
    assert effects == (SelectionEnded("b", SelectionEnd.SUCCEEDED), AggregationRequested(0))
    assert machine.phase is Phase.AGGREGATING
    assert machine.state_of("a") is None  # forgotten
    assert machine.state_of("b") is WAITING
    assert machine.counters() == Counters(waiting=1)


@pytest.mark.parametrize("participant_id", ["nobody", "inactive"])
def test_heartbeat_timeout_of_unknown_or_done_inactive_is_a_noop(participant_id):
    machine = two_selected()
    machine.rendez_vous("inactive")  # waits: participants 2 >= minimum 2
    machine.end_training("a", True)
    machine.heartbeat_timed_out("a")
    if participant_id == "inactive":
        participant_id = "a"
    before = machine.counters()
    assert machine.heartbeat_timed_out(participant_id) == ()
    assert machine.counters() == before


def test_heartbeat_timeout_after_training_complete_still_removes_the_participant():
    # docs/rounds.rst, "Heartbeat timeout": the participant is forgotten, complete or not
    # (otherwise the finished participants stay "waiting" in the status forever).
    machine = make(rounds=1, ratio=1.0, min_clients=1)
    join(machine, "a", "b")
    finish_round(machine)
    machine.end_aggregation(True)
    assert machine.complete
    assert machine.heartbeat_timed_out("a") == (ParticipantRemoved("a"),)
    assert machine.state_of("a") is None
    assert machine.counters() == Counters(waiting=1)
    assert machine.heartbeat_timed_out("a") == ()  # already gone
    assert machine.heartbeat("a") == FINISH
    assert machine.complete


# -- training timeout ----------------------------------------------------------


def test_training_timeout_ignores_a_selected_participant_and_replaces_it():
    machine = one_selected_one_waiting()
    effects = machine.training_timed_out("a")
    assert effects == (SelectionEnded("a", SelectionEnd.TRAINING_TIMEOUT), ParticipantsSelected(("b",), 0))
    assert machine.state_of("a") is IGNORED  # still known: its heartbeat runs
    assert machine.state_of("b") is SELECTED
    assert machine.heartbeat("a") == STAND_BY


@pytest.mark.parametrize("role", ["waiting", "done", "done_inactive", "ignored", "unknown"])
def test_training_timeout_of_a_non_selected_participant_is_a_noop(role):
    machine, roles = zoo()
    roles["unknown"] = "nobody"
    state = machine.state_of(roles[role])
    before = machine.counters()
    assert machine.training_timed_out(roles[role]) == ()
    assert machine.state_of(roles[role]) is state
    assert machine.counters() == before


# -- end of training ----------------------------------------------------------


def test_end_training_success_makes_the_participant_done():
    machine = two_selected()
    assert machine.end_training("a", True) == (SelectionEnded("a", SelectionEnd.SUCCEEDED),)
    assert machine.state_of("a") is DONE
    assert machine.heartbeat("a") == STAND_BY
    assert machine.phase is Phase.TRAINING  # "b" is still selected
    assert machine.may_start_training("a") is False


def test_end_training_failure_ignores_the_participant_and_replaces_it():
    machine = one_selected_one_waiting()
    effects = machine.end_training("a", False)
    assert effects == (SelectionEnded("a", SelectionEnd.FAILED), ParticipantsSelected(("b",), 0))
    assert machine.state_of("a") is IGNORED
    assert machine.state_of("b") is SELECTED


@pytest.mark.parametrize("role", ["waiting", "done", "done_inactive", "ignored", "unknown"])
@pytest.mark.parametrize("success", [True, False])
def test_stale_end_training_reports_are_noops(role, success):
    machine, roles = zoo()
    roles["unknown"] = "nobody"
    state = machine.state_of(roles[role])
    before = machine.counters()
    assert machine.end_training(roles[role], success) == ()
    assert machine.state_of(roles[role]) is state
    assert machine.counters() == before


def test_a_second_report_for_the_same_participant_is_a_noop():
    machine = two_selected()
    machine.end_training("a", True)
    assert machine.end_training("a", False) == ()
    assert machine.state_of("a") is DONE


def test_the_round_ends_when_no_selected_remain_and_resets_the_alive_to_waiting():
    machine = two_selected()
    join(machine, "c")  # waits: participants 2 >= minimum 2
    assert machine.state_of("c") is WAITING
    # "a" fails: participants 1 < 2 and known = 1 + 1 >= 2: "c" replaces it.
    assert machine.end_training("a", False) == (SelectionEnded("a", SelectionEnd.FAILED), ParticipantsSelected(("c",), 0))
    assert machine.end_training("b", True) == (SelectionEnded("b", SelectionEnd.SUCCEEDED),)
    assert machine.heartbeat_timed_out("b") == ()  # done-and-inactive
    assert machine.counters() == Counters(selected=1, done_inactive=1, ignored=1)
    effects = machine.end_training("c", True)
    assert effects == (SelectionEnded("c", SelectionEnd.SUCCEEDED), AggregationRequested(0))
    assert machine.phase is Phase.AGGREGATING
    assert machine.round == 0
    assert machine.state_of("a") is WAITING  # ignored, alive
    assert machine.state_of("b") is None  # inactive: dropped
    assert machine.state_of("c") is WAITING  # done, alive
    assert machine.counters() == Counters(waiting=2)


def test_the_round_waits_when_results_are_missing_and_nobody_can_be_selected():
    machine = two_selected()
    assert machine.end_training("a", False) == (SelectionEnded("a", SelectionEnd.FAILED),)
    # participants 1 < minimum 2; known 1 < min_clients 2: nothing to select yet.
    assert machine.end_training("b", True) == (SelectionEnded("b", SelectionEnd.SUCCEEDED),)
    assert machine.phase is Phase.TRAINING
    assert machine.counters() == Counters(done=1, ignored=1)
    # A newcomer makes 2 known: it is selected to complete the round.
    assert join(machine, "c") == [ParticipantsSelected(("c",), 0)]
    assert machine.end_training("c", True) == (SelectionEnded("c", SelectionEnd.SUCCEEDED), AggregationRequested(0))
    assert machine.counters() == Counters(waiting=3)


def test_a_round_where_everyone_failed_is_never_aggregated_empty():
    machine = two_selected()
    machine.end_training("a", False)
    effects = machine.end_training("b", False)
    assert effects == (SelectionEnded("b", SelectionEnd.FAILED),)
    assert machine.phase is Phase.TRAINING
    assert machine.counters() == Counters(ignored=2)


def test_during_aggregation_nobody_is_selected_and_events_do_not_end_anything():
    machine = make(ratio=1.0, min_clients=1)
    join(machine, "a")
    machine.end_training("a", True)
    assert machine.phase is Phase.AGGREGATING
    assert join(machine, "b", "c") == []
    assert machine.counters() == Counters(waiting=3)
    for participant_id in ("a", "b", "c"):
        assert machine.heartbeat(participant_id) == STAND_BY
        assert machine.may_start_training(participant_id) is False
        assert machine.end_training(participant_id, True) == ()
        assert machine.training_timed_out(participant_id) == ()
    assert machine.heartbeat_timed_out("c") == (ParticipantRemoved("c"),)
    assert machine.phase is Phase.AGGREGATING
    assert machine.counters() == Counters(waiting=2)


# -- start training -------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "expected"),
    [("selected", True), ("waiting", False), ("done", False), ("done_inactive", False), ("ignored", False), ("unknown", False)],
)
def test_may_start_training_only_for_a_selected_participant(role, expected):
    machine, roles = zoo()
    roles["unknown"] = "nobody"
    assert machine.may_start_training(roles[role]) is expected


# -- end of aggregation ----------------------------------------------------------


def test_successful_aggregation_advances_the_round_and_selects_again():
    machine = two_selected()
    join(machine, "c")
    finish_round(machine)
    assert machine.phase is Phase.AGGREGATING
    effects = machine.end_aggregation(True)
    assert effects[0] == RoundCompleted(0)
    [selection] = selections(effects)
    assert effects == (RoundCompleted(0), selection)
    assert selection.round == 1
    assert set(selection.participant_ids) == {"a", "b", "c"}  # ratio 1: all 3 known
    assert machine.round == 1
    assert machine.phase is Phase.TRAINING
    assert machine.heartbeat("c") == round_answer(1)


def test_failed_aggregation_repeats_the_same_round_with_a_fresh_selection():
    machine = two_selected()
    finish_round(machine)
    effects = machine.end_aggregation(False)
    assert effects[0] == RoundRepeated(0)
    [selection] = selections(effects)
    assert effects == (RoundRepeated(0), selection)
    assert selection.round == 0
    assert set(selection.participant_ids) == {"a", "b"}
    assert machine.round == 0
    assert machine.phase is Phase.TRAINING
    assert machine.counters() == Counters(selected=2)
    assert machine.heartbeat("a") == round_answer(0)


def test_aggregation_with_too_few_participants_left_waits_for_more():
    machine = two_selected()
    finish_round(machine)
    machine.heartbeat_timed_out("a")  # waiting: removed
    assert machine.end_aggregation(True) == (RoundCompleted(0),)
    assert machine.round == 1
    assert machine.phase is Phase.TRAINING
    assert machine.counters() == Counters(waiting=1)
    assert set(selections(join(machine, "c"))[0].participant_ids) == {"b", "c"}


def test_training_completes_after_rounds_successful_aggregations():
    machine = make(rounds=2, ratio=1.0, min_clients=1)
    join(machine, "a")
    assert finish_round(machine) == (SelectionEnded("a", SelectionEnd.SUCCEEDED), AggregationRequested(0))
    assert machine.end_aggregation(True) == (RoundCompleted(0), ParticipantsSelected(("a",), 1))
    assert finish_round(machine) == (SelectionEnded("a", SelectionEnd.SUCCEEDED), AggregationRequested(1))
    assert machine.end_aggregation(True) == (RoundCompleted(1), TrainingCompleted(2))
    assert machine.round == 2
    assert machine.phase is Phase.COMPLETE
    assert machine.complete is True
    assert machine.heartbeat("a") == FINISH
    assert machine.heartbeat("never-seen") == FINISH
    assert machine.rendez_vous("new") == RendezVousResult(accepted=False)
    assert machine.may_start_training("a") is False
    assert selected(machine) == set()


def test_failed_aggregations_do_not_count_towards_rounds():
    machine = make(rounds=1, ratio=1.0, min_clients=1)
    join(machine, "a")
    for _ in range(3):
        finish_round(machine)
        assert machine.end_aggregation(False) == (RoundRepeated(0), ParticipantsSelected(("a",), 0))
        assert machine.round == 0
    finish_round(machine)
    assert machine.end_aggregation(True) == (RoundCompleted(0), TrainingCompleted(1))
    assert machine.complete


@pytest.mark.parametrize("success", [True, False])
def test_end_aggregation_while_training_is_a_noop(success):
    machine = two_selected()
    assert machine.end_aggregation(success) == ()
    assert machine.round == 0
    assert machine.phase is Phase.TRAINING
    assert machine.counters() == Counters(selected=2)


@pytest.mark.parametrize("success", [True, False])
def test_end_aggregation_after_completion_is_a_noop(success):
    machine = make(rounds=2, round=2)
    assert machine.end_aggregation(success) == ()
    assert machine.round == 2
    assert machine.phase is Phase.COMPLETE


def test_a_second_end_aggregation_does_not_advance_twice():
    machine = two_selected()
    join(machine, "c")
    finish_round(machine)
    machine.end_aggregation(True)
    assert machine.end_aggregation(True) == ()
    assert machine.round == 1


def test_nothing_is_selected_after_training_completes():
    machine = make(rounds=1, ratio=1.0, min_clients=1)
    join(machine, "a")
    finish_round(machine)
    effects = machine.end_aggregation(True)
    assert not selections(effects)
    assert machine.rendez_vous("b").accepted is False
    assert machine.training_timed_out("a") == ()
    assert machine.end_training("a", True) == ()
    assert selected(machine) == set()


# -- waiting_reason ---------------------------------------------------------------


def test_waiting_reason_counts_missing_participants():
    machine = make(ratio=1.0, min_clients=3)
    join(machine, "a")
    reason = machine.waiting_reason()
    assert "2 more" in reason
    assert "1 of min_clients 3" in reason


def test_waiting_reason_names_selected_count_and_round():
    machine = two_selected()
    machine.end_training("a", True)
    reason = machine.waiting_reason()
    assert "1 selected" in reason
    assert "round 0" in reason


def test_waiting_reason_during_aggregation_names_the_round():
    machine = make(ratio=1.0, min_clients=1, round=1)
    join(machine, "a")
    finish_round(machine)
    reason = machine.waiting_reason()
    assert "aggregation" in reason
    assert "round 1" in reason


def test_waiting_reason_when_complete_names_the_rounds():
    machine = make(rounds=4, round=4)
    reason = machine.waiting_reason()
    assert "complete" in reason
    assert "4 rounds" in reason


# -- exact shares (the ratio as written, not its binary float) ------------------------


@pytest.mark.parametrize(
    ("ratio", "count", "expected"),
    [
        (0.07, 100, 7),
        (0.14, 50, 7),
        (0.28, 25, 7),
        (0.28, 75, 21),
        (0.55, 100, 55),
        (0.56, 25, 14),
        (0.68, 75, 51),
    ],
)
def test_minimum_participants_is_exact_for_decimal_ratios(ratio, count, expected):
    # Binary floats give e.g. 0.28 * 25 == 7.000000000000001, whose ceil is 8.
    assert math.ceil(ratio * count) == expected + 1  # the artefact the rule must not copy
    assert RoundRules(participants_ratio=ratio, min_clients=count).minimum_participants == expected


def test_selection_size_is_exact_for_decimal_ratios():
    # 0.56 * 25 == 14.000000000000002 in floats: 14 of 25 are selected, not 15.
    machine = make(ratio=0.56, min_clients=25, seed=0)
    [selection] = selections(join(machine, *(f"p{i}" for i in range(25))))
    assert len(selection.participant_ids) == 14
    assert machine.counters() == Counters(waiting=11, selected=14)


# -- repeat_round and resume_at (re-synchronisation with the aggregator) ----------------
#
# docs/rounds.rst, "Repeated rounds and catching up" (the coordinator calls
# them after the aggregator link comes back).


def test_repeat_round_sends_everyone_back_to_waiting_and_selects_afresh():
    machine, roles = zoo()
    effects = machine.repeat_round()
    [selection] = selections(effects)
    assert effects == (SelectionEnded(roles["selected"], SelectionEnd.ROUND_RESTARTED), RoundRepeated(1), selection)
    assert selection.round == 1
    # 7 alive (the done-and-inactive one is dropped), ceil(0.5 * 7) = 4 selected.
    assert len(selection.participant_ids) == 4
    assert machine.state_of(roles["done_inactive"]) is None
    assert machine.round == 1
    assert machine.phase is Phase.TRAINING
    assert machine.counters() == Counters(waiting=3, selected=4)


def test_repeat_round_does_not_count_earlier_results():
    machine = two_selected()
    machine.end_training("a", True)
    effects = machine.repeat_round()
    assert effects[:2] == (SelectionEnded("b", SelectionEnd.ROUND_RESTARTED), RoundRepeated(0))
    [selection] = selections(effects)
    assert set(selection.participant_ids) == {"a", "b"}  # "a" must deliver again
    assert machine.counters() == Counters(selected=2)


def test_repeat_round_waits_when_too_few_are_left():
    machine = two_selected()
    machine.end_training("a", True)
    machine.heartbeat_timed_out("a")  # done-and-inactive: dropped by the repeat
    assert machine.repeat_round() == (SelectionEnded("b", SelectionEnd.ROUND_RESTARTED), RoundRepeated(0))
    assert machine.state_of("a") is None
    assert machine.counters() == Counters(waiting=1)


def test_repeat_round_outside_training_is_a_noop():
    machine = make(ratio=1.0, min_clients=1)
    join(machine, "a")
    finish_round(machine)
    assert machine.phase is Phase.AGGREGATING
    assert machine.repeat_round() == ()
    assert machine.phase is Phase.AGGREGATING
    complete = make(rounds=2, round=2)
    assert complete.repeat_round() == ()
    assert complete.complete


def test_resume_at_a_later_round_skips_to_it():
    machine, roles = zoo()
    effects = machine.resume_at(2)
    [selection] = selections(effects)
    assert effects == (SelectionEnded(roles["selected"], SelectionEnd.ROUND_RESTARTED), RoundCompleted(1), selection)
    assert selection.round == 2
    assert machine.round == 2
    assert machine.phase is Phase.TRAINING
    assert machine.state_of(roles["done_inactive"]) is None
    assert machine.counters() == Counters(waiting=3, selected=4)


def test_resume_at_during_aggregation_moves_on():
    machine = make(rounds=3, ratio=1.0, min_clients=1)
    join(machine, "a")
    finish_round(machine)
    assert machine.resume_at(1) == (RoundCompleted(0), ParticipantsSelected(("a",), 1))
    assert machine.round == 1
    assert machine.end_aggregation(True) == ()  # the aggregation it replaced is over


@pytest.mark.parametrize("target", [3, 99])
def test_resume_at_the_last_round_or_beyond_completes_training(target):
    machine = two_selected()
    effects = machine.resume_at(target)
    assert set(effects[:2]) == {
        SelectionEnded("a", SelectionEnd.ROUND_RESTARTED),
        SelectionEnded("b", SelectionEnd.ROUND_RESTARTED),
    }
    assert effects[2:] == (RoundCompleted(2), TrainingCompleted(3))
    assert machine.round == 3
    assert machine.complete
    assert machine.heartbeat("a") == FINISH
    assert machine.rendez_vous("c") == RendezVousResult(accepted=False)


@pytest.mark.parametrize("target", [-1, 0, 1])
def test_resume_at_the_current_or_an_earlier_round_is_a_noop(target):
    machine = make(rounds=3, ratio=1.0, min_clients=2, round=1)
    join(machine, "a", "b")
    assert machine.resume_at(target) == ()
    assert machine.round == 1
    assert machine.counters() == Counters(selected=2)


def test_resume_at_after_completion_is_a_noop():
    machine = make(rounds=2, round=2)
    assert machine.resume_at(5) == ()
    assert machine.round == 2
    assert machine.complete
