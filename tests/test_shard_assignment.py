"""The rule that assigns a round's participants to aggregator shards: balance, determinism, stability."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xaind.coordinator.shard_assignment import NoShardError, RoundAssignment, Shard, ShardAssignmentError, choose_shard

MODEL_BYTES = 2 * 500_000_000  # a 500 MB model downloaded and uploaded

shard_lists = st.lists(
    st.builds(Shard, name=st.sampled_from("abcdefgh"), weight=st.integers(1, 3)), min_size=1, max_size=8, unique_by=lambda s: s.name
)
# A round's events: 'p' assigns the next participant, ('x', i) removes the i-th attached shard (never the last one).
events = st.lists(st.one_of(st.just("p"), st.tuples(st.just("x"), st.integers(0, 7))), max_size=80)


def run(shards: list[Shard], script: list, reassign: bool = True) -> RoundAssignment:
    assignment = RoundAssignment(shards, MODEL_BYTES)
    counter = 0
    for event in script:
        if event == "p":
            assignment.assign(f"participant-{counter}")
            counter += 1
        elif len(assignment.shards) > 1:
            orphans = assignment.remove_shard(assignment.shards[event[1] % len(assignment.shards)].name)
            if reassign:
                assignment.assign_all(orphans)
    return assignment


def counts(assignment: RoundAssignment) -> dict[str, int]:
    return {shard.name: len(assignment.participants_of(shard.name)) for shard in assignment.shards}


@given(shard_lists, events)
def test_shards_of_equal_weight_differ_by_at_most_one_participant(shards: list[Shard], script: list) -> None:
    assignment = run(shards, script)
    count = counts(assignment)
    for a in assignment.shards:
        for b in assignment.shards:
            if a.weight == b.weight:
                assert abs(count[a.name] - count[b.name]) <= 1
    assert sum(assignment.loads().values()) == MODEL_BYTES * sum(count.values())


@given(shard_lists, st.integers(0, 60))
def test_weights_share_participants_in_proportion(shards: list[Shard], participants: int) -> None:
    """Every shard's load over its weight is within one participant of every other's (greedy on exact ratios)."""
    assignment = run(shards, ["p"] * participants)
    count = counts(assignment)
    for a in assignment.shards:
        for b in assignment.shards:
            # a took its last participant only while that left it no fuller (per weight) than b would be with one more
            if count[a.name]:
                assert count[a.name] * b.weight <= (count[b.name] + 1) * a.weight


@given(shard_lists, events)
def test_same_inputs_same_assignment(shards: list[Shard], script: list) -> None:
    first, second = run(shards, script), run(list(shards), list(script))
    assert first.assignment() == second.assignment()
    assert first.loads() == second.loads()
    assert [first.participants_of(s.name) for s in first.shards] == [second.participants_of(s.name) for s in second.shards]


@given(shard_lists.filter(lambda shards: len(shards) >= 2), st.integers(0, 40), st.integers(0, 7))
def test_a_shard_leaving_moves_only_its_participants(shards: list[Shard], participants: int, leaving: int) -> None:
    assignment = run(shards, ["p"] * participants)
    before = assignment.assignment()
    gone = assignment.shards[leaving % len(assignment.shards)].name
    orphans = assignment.remove_shard(gone)
    assert set(orphans) == {p for p, shard in before.items() if shard == gone}
    moved = assignment.assign_all(orphans)
    after = assignment.assignment()
    assert {p for p in before if before[p] != after[p]} == set(orphans)
    assert all(shard.name != gone for shard in moved.values())


def test_ties_go_to_the_first_shard_in_order() -> None:
    assignment = RoundAssignment([Shard("b"), Shard("a"), Shard("c")], 10)
    assert [assignment.assign(f"p{i}").name for i in range(7)] == ["b", "a", "c", "b", "a", "c", "b"]
    assert assignment.loads() == {"b": 30, "a": 20, "c": 20}


def test_assigning_twice_keeps_the_shard_and_counts_once() -> None:
    assignment = RoundAssignment([Shard("a"), Shard("b")], 10)
    assert assignment.assign("p").name == "a"
    assert assignment.assign("p").name == "a"
    assert assignment.loads() == {"a": 10, "b": 0}


def test_a_bigger_shard_takes_more() -> None:
    assignment = RoundAssignment([Shard("small"), Shard("big", weight=3)], 1)
    assignment.assign_all(f"p{i}" for i in range(8))
    assert counts(assignment) == {"small": 2, "big": 6}


def test_shards_already_holding_participants_get_the_next_ones_last() -> None:
    assignment = RoundAssignment([Shard("a"), Shard("b")], 5)
    assignment.assign_all(["p1", "p2", "p3", "p4"])
    assignment.add_shard(Shard("late"))
    assert [assignment.assign(p).name for p in ["q1", "q2", "q3"]] == ["late", "late", "a"]


def test_release_frees_the_bytes() -> None:
    assignment = RoundAssignment([Shard("a"), Shard("b")], 7)
    assignment.assign_all(["p1", "p2", "p3"])
    assert assignment.release("p2").name == "b"
    assert assignment.release("p2") is None
    assert assignment.loads() == {"a": 14, "b": 0}
    assert assignment.assign("p4").name == "b"


def test_no_shard_is_a_clear_error() -> None:
    with pytest.raises(NoShardError, match="no aggregator shard is attached"):
        RoundAssignment([], 10).assign("p")
    assignment = RoundAssignment([Shard("a")], 10)
    assignment.assign("p")
    assert assignment.remove_shard("a") == ("p",)
    with pytest.raises(NoShardError):
        assignment.assign("p")
    with pytest.raises(NoShardError):
        choose_shard([], {}, 1)


def test_refusals() -> None:
    with pytest.raises(ShardAssignmentError, match="already attached"):
        RoundAssignment([Shard("a"), Shard("a")], 1)
    with pytest.raises(ShardAssignmentError, match="positive integer"):
        Shard("a", weight=0)
    with pytest.raises(ShardAssignmentError, match="not attached"):
        RoundAssignment([Shard("a")], 1).remove_shard("b")
