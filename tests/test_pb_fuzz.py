"""Hypothesis against the coordinator's PB methods, over a real connection to a real daemon.

A coordinator (`twistd -n`, xaind.tools.daemons) listens on 127.0.0.1 on a
port the OS chose; real PB clients log in as an anonymous participant and
as the aggregator (with the configuration's secret), and call every remote
method of their perspective, and names that are none, with arguments of
random types and sizes: nested containers, huge strings and lists (up to
PB's own size limit: banana refuses more by closing the connection, which
is checked once on its own), unknown keywords.

Each call must be answered (bounded wait): either a result, or a PB error
whose message carries an `ErrorCode` (the coded refusals of
xaind/coordinator/pb.py). After each example the same connection answers a
valid call, and at the end the daemon is alive and its log has no
traceback. Bounded: a few dozen examples per method.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.cred.credentials import Anonymous, UsernamePassword
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.spread import banana, pb

from xaind.aggregator.coordinator_link import refusal_code
from xaind.coordinator.pb import AggregatorPerspective, ParticipantPerspective
from xaind.protocol import AGGREGATOR_USER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER, ErrorCode, PBMethod
from xaind.tools.daemons import Daemon, coordinator_document, free_loopback_port, get_json, write_yaml

WAIT = 10.0  # seconds: the bound on every wait
SECRET = secrets.token_urlsafe(16)
#: Log text only a crash writes.
CRASH_MARKERS = ("Traceback (most recent call last)", "Unhandled Error", "Unhandled error")
#: Examples per fuzzed method (each a round trip on loopback: about a millisecond).
EXAMPLES = 25


def examples(strategy: st.SearchStrategy[Any], count: int = EXAMPLES) -> list[Any]:
    """`count` examples hypothesis generates from `strategy` (its edge cases first).

    The calls are made on the reactor (pytest-twisted runs every test there,
    where hypothesis's synchronous test cannot wait), so hypothesis only
    generates here; each failure names the example it met.
    """
    drawn: list[Any] = []

    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much, HealthCheck.large_base_example],
    )
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


#: The participant's calls that take no argument (rendez_vous only without enrolment tokens), and those that take its id.
WITHOUT_ARGUMENTS = (PBMethod.RENDEZ_VOUS, PBMethod.PROTOCOL_VERSION)
WITH_AN_ID = (PBMethod.HEARTBEAT, PBMethod.START_TRAINING, PBMethod.RESUME)
PARTICIPANT_METHODS = WITHOUT_ARGUMENTS + WITH_AN_ID
AGGREGATOR_METHODS = (PBMethod.END_TRAINING,)


# -- what a client may send: every type PB carries, nested, some of them huge --------------------------

#: A string or list this long is near PB's own limit (banana.SIZE_LIMIT, 640 KiB) without passing it.
HUGE = banana.SIZE_LIMIT // 2

leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**400), max_value=2**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=1, max_value=HUGE).map(lambda size: "x" * size),
    st.integers(min_value=1, max_value=HUGE).map(lambda size: b"\xff" * size),
    st.integers(min_value=1, max_value=HUGE // 32).map(lambda size: ["id"] * size),
)
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=8,
)
arguments = st.lists(values, max_size=4).map(tuple)
keywords = st.dictionaries(st.text(min_size=1, max_size=12).filter(str.isidentifier), values, max_size=2)


def unknown_names(known: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=60),
        st.integers(min_value=1, max_value=HUGE).map(lambda size: "m" * size),
        st.sampled_from(known).map(lambda name: name + "_"),
        st.sampled_from(known).map(str.upper),
        st.sampled_from(["__init__", "__class__", "logout", "coordinator", "_unwatch_all", "perspectiveMessageReceived"]),
    ).filter(lambda name: name not in known)


def remote_methods(perspective: type) -> set[str]:
    return {name.removeprefix("perspective_") for name in dir(perspective) if name.startswith("perspective_")}


def test_every_remote_method_of_both_perspectives_is_fuzzed() -> None:
    assert remote_methods(ParticipantPerspective) == set(PARTICIPANT_METHODS)
    assert remote_methods(AggregatorPerspective) == set(AGGREGATOR_METHODS)


# -- the daemon and the connections -----------------------------------------------------------------


def coordinator_daemon(directory: Path) -> Daemon:
    """A coordinator (not started) with the PB secret of these tests, where nobody is ever selected."""
    config = write_yaml(
        directory / "coordinator.yaml",
        coordinator_document(
            state_dir=directory / "state",
            aggregator_port=free_loopback_port(),
            secret=SECRET,
            # Nobody is ever selected: every call meets the same rules.
            federated_learning={"rounds": 2, "participants_ratio": 1.0, "min_clients": 1000, "heartbeat_timeout": 600.0},
        ),
    )
    return Daemon("xain-coordinator", config, directory, listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER))


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with coordinator_daemon(tmp_path_factory.mktemp("pb-fuzz")) as daemon:
        yield daemon


@pytest.fixture
def own_coordinator(tmp_path: Path) -> Iterator[Daemon]:
    """A coordinator of one test's own: what it logs cannot be blamed on another test."""
    with coordinator_daemon(tmp_path) as daemon:
        yield daemon


def no_crash_logged(daemon: Daemon) -> None:
    assert daemon.running, daemon.output
    crashes = [marker for marker in CRASH_MARKERS if marker in daemon.log_text]
    assert not crashes, daemon.log_text[-20_000:]


class Mind(pb.Referenceable):
    def remote_selected(self, round_number: int) -> None:
        pass

    def remote_finished(self) -> None:
        pass


class AggregatorMind(pb.Referenceable):
    """Answers the coordinator's calls as an aggregator that never finishes would (they are not under test)."""

    def remote_sync(self, *args: Any) -> Deferred[Any]:
        return Deferred()

    def remote_admit(self, *args: Any) -> Deferred[Any]:
        return Deferred()

    def remote_aggregate(self, *args: Any) -> Deferred[Any]:
        return Deferred()


class Connection:
    """One PB connection to the daemon, logged in."""

    def __init__(self, factory: pb.PBClientFactory, perspective: pb.RemoteReference) -> None:
        self.factory = factory
        self.perspective = perspective

    @classmethod
    async def open(cls, daemon: Daemon, credentials: Any, mind: pb.Referenceable) -> Connection:
        factory = pb.PBClientFactory()
        factory.noisy = False
        reactor.connectTCP("127.0.0.1", daemon.ports[COORDINATOR_PB_LISTENER], factory, timeout=WAIT)
        try:
            perspective = await factory.login(credentials, client=mind).addTimeout(WAIT, reactor)
        except BaseException:
            factory.disconnect()
            raise
        return cls(factory, perspective)

    async def call(self, name: str, *args: Any, **kw: Any) -> tuple[str, Any]:
        """("ok", result) or ("refused", code) for a call; anything else fails the test."""
        try:
            return "ok", await self.perspective.callRemote(name, *args, **kw).addTimeout(WAIT, reactor)
        except (pb.Error, pb.RemoteError) as error:  # a pb.Error the server raised arrives as pb.RemoteError
            code = refusal_code(str(error))
            assert code is not None, f"{name[:80]!r}: refused without a code: {str(error)[:300]}"
            return "refused", code

    def close(self) -> None:
        self.factory.disconnect()


async def participant(daemon: Daemon) -> Connection:
    return await Connection.open(daemon, Anonymous(), Mind())


async def aggregator(daemon: Daemon) -> Connection:
    return await Connection.open(daemon, UsernamePassword(AGGREGATOR_USER, SECRET.encode()), AggregatorMind())


async def still_serves(connection: Connection, daemon: Daemon) -> None:
    """The connection answers a valid call."""
    outcome, answer = await connection.call(PBMethod.HEARTBEAT, "no-such-participant")
    assert outcome == "ok" and answer == {"state": "reject", "round": None}, answer
    assert daemon.running


def shown(example: Any) -> str:
    """An example as a failure message may quote it (a huge one shortened)."""
    text = repr(example)
    return text if len(text) < 500 else text[:500] + f"... ({len(text)} characters)"


# -- the participant's perspective --------------------------------------------------------------------


def expected_participant_outcome(name: str, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[str, ErrorCode | None]:
    """What `name(*args, **kw)` must get: rendez_vous and protocol_version take nothing, the others one string `participant_id`."""
    if name in WITHOUT_ARGUMENTS:
        return ("ok", None) if not args and not kw else ("refused", ErrorCode.BAD_REQUEST)
    supplied = list(args) + ([kw["participant_id"]] if "participant_id" in kw else [])
    if len(supplied) == 1 and set(kw) <= {"participant_id"} and isinstance(supplied[0], str):
        return "ok", None
    return "refused", ErrorCode.BAD_REQUEST


@pytest.mark.parametrize("name", PARTICIPANT_METHODS)
@pytest_twisted.ensureDeferred
async def test_a_participant_method_with_random_arguments_is_answered_or_refused_with_a_code(coordinator: Daemon, name: str) -> None:
    connection = await participant(coordinator)
    try:
        for args, kw in examples(st.tuples(arguments, keywords)):
            outcome, answer = await connection.call(name, *args, **kw)
            expected, code = expected_participant_outcome(name, args, kw)
            assert outcome == expected, (name, shown((args, kw)), answer)
            if code is not None:
                assert answer == code, (name, shown((args, kw)))
            await still_serves(connection, coordinator)
    finally:
        connection.close()
    no_crash_logged(coordinator)


@pytest.mark.parametrize("name", WITH_AN_ID)
@pytest_twisted.ensureDeferred
async def test_a_participant_method_with_any_id_is_answered(coordinator: Daemon, name: str) -> None:
    connection = await participant(coordinator)
    ids = st.one_of(st.text(max_size=200), st.integers(min_value=1, max_value=HUGE).map(lambda size: "p" * size))
    try:
        for participant_id in examples(ids):
            outcome, answer = await connection.call(name, participant_id)
            assert outcome == "ok", (shown(participant_id), answer)
            if name in (PBMethod.HEARTBEAT, PBMethod.RESUME):
                assert answer == {"state": "reject", "round": None}, shown(participant_id)
            else:
                assert answer == {"ok": False, "url": None, "token": None}, shown(participant_id)
    finally:
        connection.close()
    no_crash_logged(coordinator)


@pytest_twisted.ensureDeferred
async def test_an_unknown_participant_method_is_refused_not_found(coordinator: Daemon) -> None:
    connection = await participant(coordinator)
    try:
        for name, args in examples(st.tuples(unknown_names(PARTICIPANT_METHODS), arguments)):
            assert await connection.call(name, *args) == ("refused", ErrorCode.NOT_FOUND), shown((name, args))
            await still_serves(connection, coordinator)
    finally:
        connection.close()
    no_crash_logged(coordinator)


# -- the aggregator's perspective ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_end_training_with_random_arguments_is_answered_or_refused_with_a_code(coordinator: Daemon) -> None:
    connection = await aggregator(coordinator)
    try:
        for args, kw in examples(st.tuples(arguments, keywords)):
            outcome, answer = await connection.call(PBMethod.END_TRAINING, *args, **kw)
            # No participant is selected: a call it can take is answered False (not expected).
            assert (outcome, answer) in {("ok", False), ("refused", ErrorCode.BAD_REQUEST)}, (shown((args, kw)), answer)
            assert await connection.call(PBMethod.END_TRAINING, "no-such-participant", "no-such-token", True) == ("ok", False)
        for participant_id, token, success in examples(st.tuples(st.text(max_size=200), st.text(max_size=200), values)):
            assert await connection.call(PBMethod.END_TRAINING, participant_id, token, success) == ("ok", False), shown(
                (participant_id, token, success)
            )
        for name, args in examples(st.tuples(unknown_names(AGGREGATOR_METHODS), arguments)):
            assert await connection.call(name, *args) == ("refused", ErrorCode.NOT_FOUND), shown((name, args))
        assert await connection.call(PBMethod.END_TRAINING, "no-such-participant", "no-such-token", True) == ("ok", False)
    finally:
        connection.close()
    no_crash_logged(coordinator)


# -- beyond PB's own limits ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_argument_beyond_pbs_size_limit_closes_only_that_connection(coordinator: Daemon) -> None:
    """Banana refuses a string above SIZE_LIMIT by dropping the connection: the daemon serves on, logs no traceback."""
    connection = await participant(coordinator)
    try:
        with pytest.raises((pb.PBConnectionLost, pb.DeadReferenceError, banana.BananaError)):
            await connection.perspective.callRemote(PBMethod.HEARTBEAT, "x" * (banana.SIZE_LIMIT + 1)).addTimeout(WAIT, reactor)
    finally:
        connection.close()
    fresh = await participant(coordinator)
    try:
        await still_serves(fresh, coordinator)
    finally:
        fresh.close()
    code, status = get_json(coordinator.url(COORDINATOR_HTTP_LISTENER, "/status"))
    assert code == 200 and status["phase"] == "training", status
    no_crash_logged(coordinator)


#: Lists nested this deep unjelly beyond the server's recursion limit (about 1,000 frames, 3 per level).
DEEP_NESTING = 1200


def deeply_nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest_twisted.ensureDeferred
async def test_deeply_nested_arguments_are_refused_with_a_code_and_no_traceback(own_coordinator: Daemon) -> None:
    """Twisted's own jelly cannot send such an argument at the default recursion limit; a hostile client can."""
    connection = await participant(own_coordinator)
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20 * DEEP_NESTING))  # for this client's jelly only, restored at once
    try:
        call = connection.perspective.callRemote(PBMethod.HEARTBEAT, deeply_nested(DEEP_NESTING))
    finally:
        sys.setrecursionlimit(limit)
    try:
        try:
            await call.addTimeout(WAIT, reactor)
        except pb.RemoteError as error:
            assert refusal_code(str(error)) == ErrorCode.BAD_REQUEST, str(error)[:300]
        else:
            raise AssertionError("a deeply nested participant id was answered")
        await still_serves(connection, own_coordinator)
    finally:
        connection.close()
    no_crash_logged(own_coordinator)
