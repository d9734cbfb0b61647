"""`ShardedAggregators` alone: the coordinator's end of several shards, with fake shards answering its calls.

The daemons' end-to-end behaviour is in tests/test_shards.py; here each
call a round's end makes (partial sums, the reduce, the installs, the
sync's catch-up) is checked in order, with failures placed on purpose.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.spread import pb

from xaind.coordinator.shards import ShardedAggregators, ShardsUnavailable
from xaind.protocol import PBMethod


class FakeShard:
    """A shard's mind: records every call; answers as `answers` says (a value, or an exception to fail with)."""

    def __init__(self, name: str, model_round: int = 0) -> None:
        self.name = name
        self.model_round = model_round
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.failing: dict[str, Exception] = {}

    def callRemote(self, name: str, *args: Any) -> Deferred[Any]:
        self.calls.append((name, args))
        if name in self.failing:
            return fail(self.failing[name])
        match name:
            case PBMethod.SHARD:
                return succeed({"name": self.name, "url": f"http://{self.name}", "weight": 1, "model_round": self.model_round,
                                "etag": f'"m{self.model_round}"'})
            case PBMethod.ADMIT_MANY:
                return succeed([None for _ in args[0]])
            case PBMethod.PARTIAL_SUM:
                return succeed({"results": len(args[1]), "samples": len(args[1])})
            case PBMethod.REDUCE:
                self.model_round = args[0] + 1
                return succeed({"model_round": self.model_round, "etag": '"reduced"', "results": 0})
            case PBMethod.INSTALL | PBMethod.LEND_MODEL:
                if name == PBMethod.INSTALL:
                    self.model_round = args[0]
                return succeed({"model_round": self.model_round, "etag": '"reduced"'})
            case PBMethod.SYNC:
                return succeed({"model_round": max(self.model_round, args[0]), "missing": []})
        raise AssertionError(f"unexpected call {name}")

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def attached(*shards: FakeShard) -> tuple[ShardedAggregators, Clock]:
    clock = Clock()
    aggregators = ShardedAggregators(clock, shards=len(shards), tokens=iter(f"token-{n}" for n in range(1000)).__next__)
    for shard in shards:
        aggregators.attach(shard)
    return aggregators, clock


def admit_all(aggregators: ShardedAggregators, clock: Clock, participants: list[str], round_number: int = 0) -> None:
    for participant in participants:
        aggregators.admit(participant, f"t-{participant}", round_number)
    clock.advance(0)  # the admissions of one turn travel together


def test_participants_are_spread_over_the_shards_in_name_order_and_told_their_urls() -> None:
    b, a, c = FakeShard("b"), FakeShard("a"), FakeShard("c")
    aggregators, clock = attached(b, a, c)
    admit_all(aggregators, clock, ["p1", "p2", "p3", "p4"])
    assert [aggregators.url_for(p) for p in ("p1", "p2", "p3", "p4")] == ["http://a", "http://b", "http://c", "http://a"]
    assert [(shard["name"], shard["participants"]) for shard in aggregators.attached_shards()] == [("a", 2), ("b", 1), ("c", 1)]


def test_a_round_ends_with_partial_sums_the_reduce_on_the_first_and_installs_on_the_others() -> None:
    a, b, c = FakeShard("a"), FakeShard("b"), FakeShard("c")
    aggregators, clock = attached(a, b, c)
    admit_all(aggregators, clock, ["p1", "p2"])  # a and b hold results; c none
    done: list[Any] = []
    aggregators.aggregate(0, ["p1", "p2"]).addBoth(done.append)
    assert done == [None]
    assert a.names()[-2:] == [PBMethod.PARTIAL_SUM, PBMethod.REDUCE]
    reduce_args = a.calls[-1][1]
    assert reduce_args[0] == 0 and reduce_args[1][0] is None and reduce_args[1][1].startswith("http://b/shard/")
    assert b.names()[-2:] == [PBMethod.PARTIAL_SUM, PBMethod.INSTALL]
    assert PBMethod.PARTIAL_SUM not in c.names() and c.names()[-1] == PBMethod.INSTALL
    assert c.calls[-1][1][1].startswith("http://a/shard/")
    assert [shard["model_round"] for shard in aggregators.attached_shards()] == [1, 1, 1]


def test_an_install_that_fails_leaves_its_shard_behind_but_the_round_aggregated() -> None:
    a, b = FakeShard("a"), FakeShard("b")
    aggregators, clock = attached(a, b)
    admit_all(aggregators, clock, ["p1"])
    b.failing[PBMethod.INSTALL] = pb.PBConnectionLost("lost")
    done: list[Any] = []
    aggregators.aggregate(0, ["p1"]).addBoth(done.append)
    assert done == [None]
    assert [shard["model_round"] for shard in aggregators.attached_shards()] == [1, 0]
    # The next round's participants go to the shard that has the round's model only.
    admit_all(aggregators, clock, ["p2", "p3"], round_number=1)
    assert aggregators.url_for("p2") == aggregators.url_for("p3") == "http://a"


def test_a_counted_result_on_a_shard_that_is_gone_fails_the_aggregation_and_reports_the_loss() -> None:
    a, b = FakeShard("a"), FakeShard("b")
    aggregators, clock = attached(a, b)
    lost: list[str] = []
    aggregators.on_shard_lost = lost.append
    admit_all(aggregators, clock, ["p1", "p2"])
    aggregators.detach(b)
    assert lost == ["b"]
    failed: list[Any] = []
    aggregators.aggregate(0, ["p1", "p2"]).addErrback(failed.append)
    assert failed and failed[0].check(ShardsUnavailable)
    assert PBMethod.PARTIAL_SUM not in a.names()


def test_a_sync_installs_the_newest_model_on_a_shard_behind_before_lining_every_shard_up() -> None:
    a, b = FakeShard("a", model_round=2), FakeShard("b", model_round=1)
    aggregators, _ = attached(a, b)
    answers: list[Any] = []
    aggregators.sync(2, [], {}).addBoth(answers.append)
    assert answers == [{"model_round": 2, "missing": []}]
    assert a.names()[-2:] == [PBMethod.LEND_MODEL, PBMethod.SYNC]
    assert b.names()[-2:] == [PBMethod.INSTALL, PBMethod.SYNC]
    assert b.calls[-2][1][0] == 2 and b.calls[-2][1][1].startswith("http://a/shard/")


def test_a_sync_that_finds_a_newer_model_tells_the_coordinator_to_catch_up_first() -> None:
    a, b = FakeShard("a", model_round=3), FakeShard("b", model_round=2)
    aggregators, _ = attached(a, b)
    answers: list[Any] = []
    aggregators.sync(2, None, {}).addBoth(answers.append)
    assert answers == [{"model_round": 3, "missing": []}]
    assert PBMethod.SYNC not in a.names() + b.names()


def test_logins_beyond_aggregator_shards_are_refused() -> None:
    a, b, c = FakeShard("a"), FakeShard("b"), FakeShard("c")
    clock = Clock()
    aggregators = ShardedAggregators(clock, shards=2)
    for shard in (a, b, c):
        aggregators.attach(shard)
    assert [shard["name"] for shard in aggregators.attached_shards()] == ["a", "b"]


def test_tokens_admitted_while_a_sync_waits_for_the_shards_are_in_the_sync_that_follows_them() -> None:
    """A round run again selects at once: admissions may reach a shard before the sync the repeat started.

    That sync must carry the coordinator's view as it is when it is sent, or the shard would drop the
    tokens of uploads already under way (and their results, once counted).
    """
    a, b = FakeShard("a"), FakeShard("b")
    aggregators, clock = attached(a, b)
    held: list[Deferred[Any]] = []
    real = a.callRemote

    def holding_shard_info(name: str, *args: Any) -> Deferred[Any]:
        if name == PBMethod.SHARD:
            a.calls.append((name, args))
            waiting: Deferred[Any] = Deferred()
            held.append(waiting)
            return waiting
        return real(name, *args)

    a.callRemote = holding_shard_info  # type: ignore[method-assign]
    view: dict[str, str] = {}
    aggregators.current_view = lambda: (0, [], dict(view))
    answers: list[Any] = []
    aggregators.sync(0, [], {}).addBoth(answers.append)
    admit_all(aggregators, clock, ["p1", "p2"])  # p1 to a, p2 to b, while the sync waits
    view.update({"p1": "t-p1", "p2": "t-p2"})  # the coordinator's tokens now
    held[0].callback({"name": "a", "url": "http://a", "weight": 1, "model_round": 0, "etag": '"m0"'})
    clock.advance(0)
    assert answers == [{"model_round": 0, "missing": []}]
    sync_of = {shard.name: next(args for name, args in reversed(shard.calls) if name == PBMethod.SYNC) for shard in (a, b)}
    assert sync_of["a"][2] == {"p1": "t-p1"} and sync_of["b"][2] == {"p2": "t-p2"}
    assert aggregators.url_for("p1") == "http://a" and aggregators.url_for("p2") == "http://b"


def test_results_counted_while_a_sync_waits_are_in_the_sync_that_follows_them() -> None:
    """A shard that rejoins is synced while the round goes on: a result counted meanwhile is not dropped."""
    a, b = FakeShard("a"), FakeShard("b")
    aggregators, clock = attached(a, b)
    admit_all(aggregators, clock, ["p1", "p2"])
    held: list[Deferred[Any]] = []
    real = b.callRemote

    def holding_shard_info(name: str, *args: Any) -> Deferred[Any]:
        if name == PBMethod.SHARD:
            waiting: Deferred[Any] = Deferred()
            held.append(waiting)
            return waiting
        return real(name, *args)

    b.callRemote = holding_shard_info  # type: ignore[method-assign]
    counted: list[str] = []
    aggregators.current_view = lambda: (0, list(counted), {"p1": "t-p1", "p2": "t-p2"})
    aggregators.sync(0, [], {"p1": "t-p1", "p2": "t-p2"})
    counted.append("p2")  # b's result is counted while the sync waits for b
    held[0].callback({"name": "b", "url": "http://b", "weight": 1, "model_round": 0, "etag": '"m0"'})
    sync_of_b = next(args for name, args in reversed(b.calls) if name == PBMethod.SYNC)
    assert sync_of_b[1] == ["p2"]
