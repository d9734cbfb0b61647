"""The parts of `state.redis` against a real `redis-server`: lease, scripts, mirror, takeover, replica, deadlines.

The server is started by xaind.testing.redis (skipped with the reason when
redis-server or redis-py is missing). Redis calls run inline here
(`InlineConnection`: the same client, called on the test's thread) and
time is a `Clock`, so each step is checked on its values, without threads.
"""

from __future__ import annotations

import json
import sys
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from xaind.config import ConfigError
from xaind.testing import redis as redis_testing

if redis_testing.skip_reason() is not None:
    # The whole module: its helpers below subclass what only exists with redis-py.
    pytest.skip(redis_testing.skip_reason() or "", allow_module_level=True)

from xaind.coordinator.cluster.connection import RedisConnection  # noqa: E402
from xaind.coordinator.cluster.deadlines import HeartbeatDeadlines  # noqa: E402
from xaind.coordinator.cluster.keys import Keys  # noqa: E402
from xaind.coordinator.cluster.leader import LeaderService  # noqa: E402
from xaind.coordinator.cluster.lease import LeaderLease  # noqa: E402
from xaind.coordinator.cluster.replica import Replica  # noqa: E402
from xaind.coordinator.cluster.scripts import POP_EXPIRED  # noqa: E402
from xaind.coordinator.cluster.settings import RedisStateSettings  # noqa: E402
from xaind.coordinator.cluster.state_mirror import StateMirror, TrackedRoundStateMachine, load_snapshot  # noqa: E402
from xaind.coordinator.rounds import HeartbeatAnswer, HeartbeatState, ParticipantState, Phase  # noqa: E402
from xaind.coordinator.settings import AggregatorSettings, CoordinatorSettings, FederatedLearningSettings  # noqa: E402
from xaind.testing.fakes import FakeAggregator  # noqa: E402

T = TypeVar("T")
PREFIX = "unit:"
LEASE = 3.0


class InlineConnection(RedisConnection):
    """A real client, called on the caller's thread: the Deferred has fired when `run` returns."""

    broken = False

    def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        if self.broken:
            return fail(ConnectionError("Redis is away"))
        try:
            return succeed(function(*args, **kwargs))
        except Exception as error:  # noqa: BLE001 - handed over as the Deferred's failure
            return fail(error)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[redis_testing.RedisServer]:
    with redis_testing.RedisServer() as server:
        yield server


@pytest.fixture
def redis(redis_server: redis_testing.RedisServer) -> Any:
    client = redis_server.client()
    client.flushall()
    yield client
    client.close()


def connection(server: redis_testing.RedisServer, clock: Clock) -> InlineConnection:
    settings = RedisStateSettings(url=server.url, prefix=PREFIX, lease_seconds=LEASE)
    made = InlineConnection(settings, clock)
    made.running = True
    return made


# -- the lease --------------------------------------------------------------------------------------


def lease(server: redis_testing.RedisServer, clock: Clock, name: str, events: list[str]) -> LeaderLease:
    return LeaderLease(
        connection(server, clock), Keys(PREFIX), name, LEASE, clock, lambda: events.append(f"{name} elected"), lambda why: events.append(f"{name} lost: {why}")
    )


def test_one_process_holds_the_lease_and_the_other_takes_it_when_it_is_given_up(redis_server, redis, clock) -> None:
    events: list[str] = []
    first, second = lease(redis_server, clock, "one", events), lease(redis_server, clock, "two", events)
    first.start()
    second.start()
    assert events == ["one elected"]
    assert redis.get(f"{PREFIX}leader") == "one"
    assert 0 < redis.pttl(f"{PREFIX}leader") <= LEASE * 1000
    clock.advance(LEASE)  # renewed every third of the lease: still the same leader
    assert (first.leader, second.leader, redis.get(f"{PREFIX}leader")) == (True, False, "one")
    first.stop()
    assert redis.get(f"{PREFIX}leader") is None
    clock.advance(LEASE / 3)
    assert events == ["one elected", "two elected"]
    second.stop()


def test_a_leader_whose_lease_another_holds_loses_it_at_its_next_renewal(redis_server, redis, clock) -> None:
    events: list[str] = []
    first = lease(redis_server, clock, "one", events)
    first.start()
    redis.set(f"{PREFIX}leader", "intruder")
    clock.advance(LEASE / 3)
    assert events == ["one elected", "one lost: another process holds the lease"]
    assert (first.leader, first.lost) == (False, True)
    first.stop()
    assert redis.get(f"{PREFIX}leader") == "intruder"  # not released: it is not ours


def test_a_leader_whose_renewals_go_unconfirmed_stops_leading_before_the_lease_runs_out(redis_server, redis, clock) -> None:
    events: list[str] = []
    first = lease(redis_server, clock, "one", events)
    first.start()
    first.connection.broken = True  # type: ignore[attr-defined]
    clock.advance(LEASE / 3)
    clock.advance(LEASE / 3)
    assert events == ["one elected"]
    clock.advance(LEASE * 0.9 - 2 * LEASE / 3)
    assert events == ["one elected", "one lost: no renewal of the lease was confirmed in time"]
    first.stop()


# -- heartbeat deadlines ---------------------------------------------------------------------------


def test_pop_expired_takes_only_the_passed_deadlines_out_of_the_set(redis) -> None:
    key = f"{PREFIX}deadlines"
    redis.zadd(key, {"a": 10.0, "b": 20.0, "c": 30.0})
    pop = redis.register_script(POP_EXPIRED)
    assert sorted(pop(keys=[key], args=[25.0, 1000])) == ["a", "b"]
    assert redis.zrange(key, 0, -1, withscores=True) == [("c", 30.0)]
    assert pop(keys=[key], args=[25.0, 1000]) == []
    assert pop(keys=[key], args=[40.0, 1000]) == ["c"]


def test_heartbeat_deadlines_are_written_in_one_batch(redis_server, redis, clock) -> None:
    deadlines = HeartbeatDeadlines(connection(redis_server, clock), Keys(PREFIX), clock)
    deadlines.set("a", 5.0)
    deadlines.set("b", 6.0)
    deadlines.set("a", 7.0)
    assert redis.zcard(f"{PREFIX}deadlines") == 0  # not yet: batched
    clock.advance(0.05)
    assert redis.zrange(f"{PREFIX}deadlines", 0, -1, withscores=True) == [("b", 6.0), ("a", 7.0)]
    deadlines.remove("b")
    clock.advance(0.05)
    assert redis.zrange(f"{PREFIX}deadlines", 0, -1, withscores=True) == [("a", 7.0)]
    deadlines.close()
    deadlines.set("c", 1.0)
    clock.advance(1)
    assert redis.zcard(f"{PREFIX}deadlines") == 1


# -- the leader's state in Redis, and a takeover from it -------------------------------------------

SETTINGS = FederatedLearningSettings(rounds=3, min_clients=2, heartbeat_timeout=10.0, training_timeout=60.0)


def leader_service(redis_server, clock: Clock, aggregator: FakeAggregator, machine: TrackedRoundStateMachine, seq: int = 0) -> tuple[LeaderService, list[dict[str, Any]]]:
    made = connection(redis_server, clock)
    ids = iter(f"participant-{number}" for number in range(100))
    tokens = iter(f"token-{number}" for number in range(100))
    service = LeaderService(
        SETTINGS, AggregatorSettings(url="http://aggregator"), aggregator, clock,
        machine=machine, deadlines=HeartbeatDeadlines(made, Keys(PREFIX), clock),
        participant_ids=lambda: next(ids), tokens=lambda: next(tokens),
    )  # fmt: skip
    published: list[dict[str, Any]] = []
    service.mirror = StateMirror(made, Keys(PREFIX), service, seq, published.append)
    return service, published


def test_the_leaders_changes_are_in_redis_and_a_new_leader_resumes_from_them(redis_server, redis, clock) -> None:
    aggregator = FakeAggregator()
    service, published = leader_service(redis_server, clock, aggregator, TrackedRoundStateMachine(SETTINGS.round_rules))
    one = service.rendez_vous().participant_id
    two = service.rendez_vous().participant_id
    answers: list[Any] = []
    service.start_training(one).addCallback(answers.append)
    clock.advance(0)
    assert answers[0].token == "token-0"
    keys = Keys(PREFIX)
    assert redis.hgetall(keys.participants) == {one: "selected", two: "selected"}
    assert redis.hgetall(keys.tokens) == {one: "token-0"}
    assert {participant: float(when) for participant, when in redis.hgetall(keys.training).items()} == {one: 60.0, two: 60.0}
    assert redis.hgetall(keys.round) == {"round": "0", "phase": "training", "seq": str(published[-1]["seq"]), "counted": ""}
    assert [event["seq"] for event in published] == list(range(1, len(published) + 1))
    clock.advance(0.05)
    assert sorted(redis.zrange(keys.deadlines, 0, -1, withscores=True)) == sorted([(one, 10.0), (two, 10.0)])
    assert service.end_training(one, "token-0", True) is True
    clock.advance(0)
    assert redis.hget(keys.participants, one) == "done"
    assert redis.hgetall(keys.tokens) == {}

    # The leader dies here; another builds the same state from Redis.
    snapshot = load_snapshot(connection(redis_server, clock), keys)
    assert (snapshot.round, snapshot.phase, snapshot.states) == (0, Phase.TRAINING, {one: ParticipantState.DONE, two: ParticipantState.SELECTED})
    machine = TrackedRoundStateMachine.restored(SETTINGS.round_rules, snapshot.round, snapshot.phase, snapshot.states)
    successor, successor_published = leader_service(redis_server, clock, FakeAggregator(), machine, snapshot.seq)
    successor.restore(snapshot)
    assert successor.machine.state_of(one) is ParticipantState.DONE
    assert successor.machine.may_start_training(two)
    assert successor.admitted_tokens() == {}  # in-flight trainings start again, as after a restart
    assert successor.training_deadline(two) == 60.0
    started: list[Any] = []
    successor.start_training(two).addCallback(started.append)
    clock.advance(0)
    assert started[0].ok and successor.end_training(two, started[0].token, True)
    clock.advance(0)
    # Both results are counted: the one the first leader recorded, and the successor's.
    assert successor.mirror is not None and sorted(successor.mirror.counted or []) == sorted([one, two])
    assert redis.hget(keys.round, "phase") == "aggregating"
    assert sorted(json.loads(redis.hget(keys.round, "counted"))) == sorted([one, two])
    assert successor_published[0]["seq"] == snapshot.seq + 1


def test_a_takeover_while_aggregating_asks_the_aggregator_again(redis_server, redis, clock) -> None:
    aggregator = FakeAggregator()
    service, _ = leader_service(redis_server, clock, aggregator, TrackedRoundStateMachine(SETTINGS.round_rules))
    one, two = service.rendez_vous().participant_id, service.rendez_vous().participant_id
    for participant, token in ((one, "token-0"), (two, "token-1")):
        service.start_training(participant)
        clock.advance(0)
        service.end_training(participant, token, True)
        clock.advance(0)
    assert [call.round for call in aggregator.aggregations] == [0]
    snapshot = load_snapshot(connection(redis_server, clock), Keys(PREFIX))
    assert snapshot.phase is Phase.AGGREGATING and sorted(snapshot.counted or []) == sorted([one, two])
    second = FakeAggregator()
    machine = TrackedRoundStateMachine.restored(SETTINGS.round_rules, snapshot.round, snapshot.phase, snapshot.states)
    successor, _ = leader_service(redis_server, clock, second, machine, snapshot.seq)
    successor.restore(snapshot)
    successor.sync_aggregator()
    assert [(call.round, sorted(call.counted)) for call in second.aggregations] == [(0, sorted([one, two]))]


def test_expired_deadlines_drop_participants_as_their_timers_did(redis_server, redis, clock) -> None:
    service, _ = leader_service(redis_server, clock, FakeAggregator(), TrackedRoundStateMachine(SETTINGS.round_rules))
    one = service.rendez_vous().participant_id
    service.expire_due([one, "someone-unknown"])
    clock.advance(0)
    assert service.machine.state_of(one) is None
    assert redis.hgetall(f"{PREFIX}participants") == {}


# -- a process's replica -----------------------------------------------------------------------------


def event(seq: int, states: dict[str, str | None], *, round_number: int = 0, phase: str = "training", added: list[str] = [], removed: list[str] = []) -> dict[str, Any]:  # noqa: B006
    return {"seq": seq, "round": round_number, "phase": phase, "states": states, "token_holders_added": added, "token_holders_removed": removed}


def test_the_replica_answers_heartbeats_as_the_state_machine_and_says_the_news() -> None:
    replica = Replica()
    replica.loaded = True
    assert replica.heartbeat("a") == HeartbeatAnswer(HeartbeatState.REJECT)
    news = replica.apply(event(1, {"a": "waiting", "b": "waiting"}))
    assert news is not None and news.selected == [] and replica.heartbeat("a") == HeartbeatAnswer(HeartbeatState.STAND_BY)
    news = replica.apply(event(2, {"a": "selected"}))
    assert news is not None and news.selected == ["a"] and news.round == 0
    assert replica.heartbeat("a") == HeartbeatAnswer(HeartbeatState.ROUND, 0)
    replica.apply(event(3, {}, added=["a"]))
    assert replica.heartbeat("a") == HeartbeatAnswer(HeartbeatState.STAND_BY)  # it holds its token
    assert replica.apply(event(3, {"a": None})) is None  # applied already
    news = replica.apply(event(4, {"b": None}, removed=["a"]))
    assert news is not None and news.removed == ["b"] and replica.heartbeat("b") == HeartbeatAnswer(HeartbeatState.REJECT)
    assert replica.counters()["selected"] == 1 and replica.known_count() == 1
    assert replica.needs_reload(event(6, {}))
    news = replica.apply(event(5, {}, round_number=3, phase="complete"))
    assert news is not None and news.finished and replica.heartbeat("a") == HeartbeatAnswer(HeartbeatState.FINISH)


# -- configuration -------------------------------------------------------------------------------------


def problems_of(document: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        CoordinatorSettings.from_mapping({"development": True, **document})
    return str(caught.value).splitlines()


def test_state_redis_is_read_with_its_defaults(tmp_path) -> None:
    password = tmp_path / "password"
    password.write_text("s3cret\n", encoding="utf-8")
    settings = CoordinatorSettings.from_mapping({"development": True, "state": {"redis": {"url": "redis://127.0.0.1:6379/2", "password_file": str(password)}}})
    assert settings.redis_state == RedisStateSettings(url="redis://127.0.0.1:6379/2", password="s3cret", prefix="xaind:", lease_seconds=3.0)
    assert CoordinatorSettings.from_mapping({"development": True}).redis_state is None


@pytest.mark.parametrize(
    ("redis_section", "line"),
    [
        ({}, "config error: state.redis.url: is required (redis://host:port/db or unix:///path/to/socket)"),
        ({"url": "http://x"}, "config error: state.redis.url: must start with redis://, rediss:// or unix://, got 'http://x'"),
        ({"url": "redis://h/x"}, "config error: state.redis.url: the database must be a number (redis://host:port/0), got 'redis://h/x'"),
        ({"url": "redis://h", "lease_seconds": 0.5}, "config error: state.redis.lease_seconds: must be at least 1, got 0.5"),
        ({"url": "redis://h", "lease_seconds": 61}, "config error: state.redis.lease_seconds: must be at most 60, got 61"),
        ({"url": "redis://h", "prefix": "a b"}, "config error: state.redis.prefix: must be a non-empty key namespace without spaces, got 'a b'"),
        ({"url": "redis://h", "password_file": "/nonexistent/password"}, "config error: state.redis.password_file: cannot be read (No such file or directory): /nonexistent/password"),
        ({"url": "redis://h", "colour": "red"}, "config error: state.redis.colour: unknown key"),
    ],
)
def test_a_bad_state_redis_is_one_line_naming_its_key(redis_section: dict[str, Any], line: str) -> None:
    assert problems_of({"state": {"redis": redis_section}}) == [line]


def test_state_redis_without_redis_py_says_what_to_install(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "redis" else real(name, *args))
    assert problems_of({"state": {"redis": {"url": "redis://h"}}}) == [
        "config error: state.redis: needs redis-py: install python3-redis (Debian) or the redis extra (pip install 'xaind[redis]')"
    ]


def test_a_coordinator_without_state_redis_never_imports_redis() -> None:
    code = "import sys, xaind.coordinator.tap, xaind.coordinator.settings; assert 'redis' not in sys.modules, 'imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).returncode == 0


def test_twistd_says_a_bad_state_redis_in_one_line_and_exits_non_zero(tmp_path) -> None:
    from xaind.tools import daemons

    config = daemons.write_yaml(
        tmp_path / "coordinator.yaml",
        {"development": True, "state_dir": str(tmp_path / "state"), "state": {"redis": {"url": "mysql://db", "lease_seconds": 100}}},
    )
    run = daemons.run_to_exit("xain-coordinator", config, tmp_path / "coordinator.log", cwd=tmp_path)
    assert run.returncode != 0
    assert run.stdout.strip().splitlines() == [
        "config error: state.redis.url: must start with redis://, rediss:// or unix://, got 'mysql://db'",
        "config error: state.redis.lease_seconds: must be at most 60, got 100",
    ]


def test_a_password_in_the_url_is_not_shown_in_the_log() -> None:
    from xaind.coordinator.cluster.settings import shown_url

    assert shown_url("redis://:s3cret@10.0.0.1:6379/0") == "redis://:***@10.0.0.1:6379/0"
    assert shown_url("redis://user:s3cret@host/1") == "redis://user:***@host/1"
    assert shown_url("unix:///run/redis.sock") == "unix:///run/redis.sock"
