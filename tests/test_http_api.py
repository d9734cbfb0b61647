"""The coordinator's participant HTTP API, in memory and over a real loopback socket.

The resource tree of `coordinator_site` is spoken to in raw HTTP/1.1. The
service's own timers (heartbeat, training, admit and aggregation timeouts)
run on a `Clock` the tests advance; the aggregator is a fake whose Deferreds
the tests fire. docs/http-api.rst is the contract.

In memory (`xaind.testing.memory_http`): every test but two. What they check
is what the API answers, and when: every answer depends only on the fake
aggregator and the clock, so it is complete, or visibly held, when the
request's bytes have been handed to the site's channel, with no reactor and
no polling. The site's channel timers run on a `MemoryReactorClock` of
their own, never advanced.

On a loopback socket (`reactor.listenTCP` on 127.0.0.1, twisted.web's
Agent): the two tests of a participant hanging up while its request is held
(`*_hanging_up_*`). There the client really aborts its TCP connection and
the reactor reports the loss to the channel, which is what they are about.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool, readBody

from xaind.coordinator.http_api import coordinator_site
from xaind.coordinator.rounds import ParticipantState
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings, ParticipantLimits

from xaind.testing.fakes import AdmitCall, FakeAggregator
from xaind.http_limits import HTTPLimits
from xaind.testing.memory_http import LAST_CHUNK, HTTPResponse, MemoryConnection, MemoryHTTP, chunk, request_bytes
from xaind.web import EARLY_ANSWER_GRACE
from xaind.testing.waiting import wait_until

AGGREGATOR_URL = "http://aggregator.test:18082"
DEFAULT_LIMITS = HTTPLimits()
WAIT = 10.0  # seconds: the bound on every wait for the network or a fake's call

Response = HTTPResponse

# Twisted's readBody (the socket tests' client) warns when the whole (small) body
# has arrived before it is called; the warning is about Twisted, not xaind.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody with a transport:DeprecationWarning")


# -- the server and the clients ----------------------------------------------------


@dataclass
class Harness:
    """A coordinator service and its site, spoken to in memory."""

    service: CoordinatorService
    aggregator: FakeAggregator
    clock: Clock
    heartbeat_hold: float
    http: MemoryHTTP

    def send(self, path: bytes, method: bytes = b"GET") -> MemoryConnection:
        """Send a request on a new connection; its answer, if any yet, is on the connection."""
        return self.http.request(method, path)

    def request(self, path: bytes, method: bytes = b"GET") -> Response:
        """A request that must be answered at once (nothing it depends on is held)."""
        return self.send(path, method).response()

    def get(self, path: bytes) -> Response:
        return self.request(path)

    def rendez_vous(self) -> str:
        answer = self.get(b"/rendez_vous")
        assert answer.code == 200
        assert answer.json["ok"] is True
        return answer.json["id"]

    def heartbeat(self, participant_id: str) -> dict:
        answer = self.get(b"/heartbeat/" + participant_id.encode())
        assert answer.code == 200
        return answer.json

    def admit_call(self, number: int = 0) -> AdmitCall:
        """Admit call number `number` (0-based), which the requests so far must have made."""
        assert len(self.aggregator.admits) > number, self.aggregator.admits
        return self.aggregator.admits[number]

    def counters(self) -> dict:
        return self.service.status()


@dataclass
class TCPHarness:
    """The same service behind a real loopback port, spoken to with twisted.web's Agent."""

    memory: Harness
    base: bytes
    agent: Agent
    pool: HTTPConnectionPool
    port: IListeningPort

    @property
    def service(self) -> CoordinatorService:
        return self.memory.service

    @property
    def aggregator(self) -> FakeAggregator:
        return self.memory.aggregator

    @property
    def clock(self) -> Clock:
        return self.memory.clock

    def get(self, path: bytes) -> Deferred:
        """Fires with a Response once the whole body arrived (within WAIT seconds)."""

        async def go() -> Response:
            response = await self.agent.request(b"GET", self.base + path)
            body = await readBody(response)
            headers = {name.lower(): list(values) for name, values in response.headers.getAllRawHeaders()}
            return Response(response.code, response.phrase, headers, body)

        return Deferred.fromCoroutine(go()).addTimeout(WAIT, reactor)

    async def rendez_vous(self) -> str:
        answer = await self.get(b"/rendez_vous")
        assert answer.code == 200
        assert answer.json["ok"] is True
        return answer.json["id"]

    async def heartbeat(self, participant_id: str) -> dict:
        answer = await self.get(b"/heartbeat/" + participant_id.encode())
        assert answer.code == 200
        return answer.json

    def counters(self) -> dict:
        return self.service.status()


@pytest.fixture
def serve() -> Iterator[Any]:
    """A factory: serve(**federated_learning) -> Harness; every connection and service ended after the test."""
    harnesses: list[Harness] = []

    def make(
        admit_timeout: float = 10.0,
        aggregation_timeout: float = 600.0,
        heartbeat_hold: float = 0.0,
        limits: ParticipantLimits = ParticipantLimits(),
        **federated_learning: Any,
    ) -> Harness:
        settings = {"rounds": 3, "participants_ratio": 1.0, "min_clients": 1, "heartbeat_timeout": 15.0, "training_timeout": 3600.0}
        settings.update(federated_learning)
        clock = Clock()
        aggregator = FakeAggregator(admit_at_once=False)
        service = CoordinatorService(
            FederatedLearningSettings(**settings),
            AggregatorSettings(url=AGGREGATOR_URL, admit_timeout=admit_timeout, aggregation_timeout=aggregation_timeout),
            aggregator,
            clock=clock,
            limits=limits,
        )
        service.startService()
        site = coordinator_site(service, heartbeat_hold)
        site.reactor = MemoryReactorClock()  # the channels' idle timers: never on the real reactor
        harness = Harness(service, aggregator, clock, heartbeat_hold, MemoryHTTP(site))
        harnesses.append(harness)
        return harness

    yield make

    for harness in harnesses:
        harness.http.close()
        harness.service.stopService()


@pytest_twisted.async_yield_fixture
async def serve_tcp(serve):
    """A factory: serve_tcp(**like serve) -> TCPHarness on 127.0.0.1; port and connections closed after the test."""
    harnesses: list[TCPHarness] = []

    def make(**settings: Any) -> TCPHarness:
        memory = serve(**settings)
        port = reactor.listenTCP(0, coordinator_site(memory.service, memory.heartbeat_hold), interface="127.0.0.1")
        pool = HTTPConnectionPool(reactor, persistent=False)
        harness = TCPHarness(memory, f"http://127.0.0.1:{port.getHost().port}".encode(), Agent(reactor, pool=pool), pool, port)
        harnesses.append(harness)
        return harness

    yield make

    for harness in harnesses:
        await harness.port.stopListening()
        await harness.pool.closeCachedConnections()


def pairs(body: bytes) -> list[tuple[str, Any]]:
    """The body's top-level (key, value) pairs in order, duplicates kept."""
    return json.loads(body.decode("utf-8"), object_pairs_hook=lambda items: items)


def assert_json(response: Response, code: int = 200) -> None:
    assert response.code == code
    assert response.header(b"content-type") == [b"application/json"]


# -- rendez-vous and heartbeat --------------------------------------------------------


def test_rendez_vous_gives_a_new_id(serve):
    harness = serve(min_clients=2)
    first = harness.get(b"/rendez_vous")
    second = harness.get(b"/rendez_vous")
    for answer in (first, second):
        assert_json(answer)
        assert set(answer.json) == {"id", "ok"}
        assert isinstance(answer.json["id"], str) and answer.json["id"]
        assert answer.json["ok"] is True
    assert first.json["id"] != second.json["id"]
    assert harness.counters()["participants"]["selected"] == 2


def test_heartbeat_of_the_only_participant_says_round_0(serve):
    harness = serve(min_clients=1, participants_ratio=1.0)
    participant = harness.rendez_vous()
    answer = harness.get(b"/heartbeat/" + participant.encode())
    assert_json(answer)
    assert answer.json == {"state": "round", "round": 0}


def test_second_participant_stands_by(serve):
    harness = serve(min_clients=1, participants_ratio=1.0)
    first = harness.rendez_vous()
    second = harness.rendez_vous()
    assert harness.heartbeat(second) == {"state": "stand_by", "round": None}
    assert harness.heartbeat(first) == {"state": "round", "round": 0}


def test_unknown_id_is_rejected_with_200(serve):
    harness = serve()
    harness.rendez_vous()
    answer = harness.get(b"/heartbeat/no-such-participant")
    assert_json(answer, 200)
    assert answer.json == {"state": "reject", "round": None}


def test_heartbeats_keep_a_participant_alive_and_silence_drops_it(serve):
    harness = serve(heartbeat_timeout=15.0)
    participant = harness.rendez_vous()
    for _ in range(3):
        harness.clock.advance(10)
        assert harness.heartbeat(participant) == {"state": "round", "round": 0}
    harness.clock.advance(15)
    assert harness.heartbeat(participant) == {"state": "reject", "round": None}
    assert harness.counters()["participants"]["selected"] == 0


def test_bodies_have_exactly_the_seed_keys(serve):
    harness = serve(min_clients=1)
    rendez_vous = harness.get(b"/rendez_vous")
    assert_json(rendez_vous)
    rv_pairs = pairs(rendez_vous.body)
    assert [key for key, _ in rv_pairs] in (["id", "ok"], ["ok", "id"])
    participant = dict(rv_pairs)["id"]
    other = harness.get(b"/rendez_vous").json["id"]

    bodies = {
        "round": harness.get(b"/heartbeat/" + participant.encode()).body,
        "stand_by": harness.get(b"/heartbeat/" + other.encode()).body,
        "reject": harness.get(b"/heartbeat/stranger").body,
    }
    for state, body in bodies.items():
        heartbeat_pairs = pairs(body)
        assert sorted(key for key, _ in heartbeat_pairs) == ["round", "state"], body
        assert dict(heartbeat_pairs)["state"] == state
    assert dict(pairs(bodies["round"]))["round"] == 0

    harness.aggregator.admit_at_once = True
    for who in (participant, other):
        body = harness.get(b"/start_training/" + who.encode()).body
        assert sorted(key for key, _ in pairs(body)) == ["ok", "token", "url"], body


# -- start training ------------------------------------------------------------------


# -- held heartbeats (api.heartbeat_hold) -------------------------------------------------


def held(harness: Harness, participant_id: str, watched: int = 1) -> MemoryConnection:
    """Send a heartbeat that the coordinator holds; its answer is to come on the returned connection."""
    answering = harness.send(b"/heartbeat/" + participant_id.encode())
    assert harness.counters()["watched_participants"] == watched
    assert not answering.answered
    return answering


async def held_over_tcp(harness: TCPHarness, participant_id: str, watched: int = 1) -> Deferred:
    """Send a heartbeat over the socket that the coordinator holds; returns its answer to come."""
    answering = harness.get(b"/heartbeat/" + participant_id.encode())
    await wait_until(lambda: harness.counters()["watched_participants"] == watched)
    assert not answering.called
    return answering


def test_a_waiting_participants_heartbeat_is_answered_the_moment_it_is_selected(serve):
    harness = serve(min_clients=2, heartbeat_hold=5.0)
    first = harness.rendez_vous()
    answering = held(harness, first)

    harness.rendez_vous()  # the second participant starts round 0
    assert not answering.answered  # not from inside the rendez-vous...
    harness.clock.advance(0)  # ...but once it is handled, not a hold later

    answer = answering.response()
    assert_json(answer)
    assert answer.json == {"state": "round", "round": 0}
    assert harness.counters()["watched_participants"] == 0


def test_the_held_heartbeats_of_a_whole_selection_are_answered_in_one_pass(serve):
    harness = serve(min_clients=50, heartbeat_hold=5.0)
    waiting = [harness.rendez_vous() for _ in range(49)]
    answering = [held(harness, participant, watched=index + 1) for index, participant in enumerate(waiting)]
    timers = len(harness.clock.getDelayedCalls())

    harness.rendez_vous()  # the 50th starts round 0
    # One call for all 49 answers, not one each (the others: the 50th's heartbeat timer, the round's training deadline).
    assert len(harness.clock.getDelayedCalls()) - timers == 3
    harness.clock.advance(0)
    assert {connection.response().json["state"] for connection in answering} == {"round"}
    assert harness.counters()["watched_participants"] == 0


def test_a_held_heartbeat_without_news_is_answered_when_the_hold_ends_and_counts(serve):
    harness = serve(min_clients=3, heartbeat_hold=5.0, heartbeat_timeout=12.0)
    first = harness.rendez_vous()
    answering = held(harness, first)
    harness.clock.advance(4.9)
    assert not answering.answered
    harness.clock.advance(0.1)
    assert answering.response().json == {"state": "stand_by", "round": None}
    # Answered at 5 s, the hold counted as a heartbeat: alive until 5 + 12 s.
    harness.clock.advance(11.9)
    assert harness.service.machine.state_of(first) is ParticipantState.WAITING
    harness.clock.advance(0.2)
    assert harness.service.machine.state_of(first) is None


def test_a_held_heartbeat_is_answered_finish_the_moment_training_completes(serve):
    harness = serve(rounds=1, min_clients=1, heartbeat_hold=5.0)
    harness.aggregator.admit_at_once = True
    selected = harness.rendez_vous()
    waiting = harness.rendez_vous()
    answering = held(harness, waiting)
    token = harness.get(b"/start_training/" + selected.encode()).json["token"]
    assert harness.service.end_training(selected, token, True) is True
    (aggregation,) = harness.aggregator.aggregations
    assert not answering.answered  # aggregating: still no news for the waiting participant

    aggregation.deferred.callback(None)  # training is complete
    assert not answering.answered  # not from inside the state machine's event...
    harness.clock.advance(0)  # ...but once it is applied, not a hold later
    answer = answering.response()
    assert_json(answer)
    assert answer.json == {"state": "finish", "round": None}
    assert harness.counters()["watched_participants"] == 0


@pytest_twisted.ensureDeferred
async def test_a_participant_hanging_up_during_a_held_heartbeat_is_no_longer_watched(serve_tcp):
    harness = serve_tcp(min_clients=3, heartbeat_hold=5.0)
    first = await harness.rendez_vous()
    answering = await held_over_tcp(harness, first)
    answering.addErrback(lambda failure: None)
    answering.cancel()  # aborts the client's connection
    await wait_until(lambda: harness.counters()["watched_participants"] == 0)
    harness.clock.advance(5.0)  # the hold's end finds nothing to answer
    assert harness.service.machine.state_of(first) is ParticipantState.WAITING


def test_heartbeats_of_a_participant_holding_its_token_are_never_held(serve):
    harness = serve(min_clients=1, heartbeat_hold=5.0)
    harness.aggregator.admit_at_once = True
    participant = harness.rendez_vous()
    answer = harness.get(b"/start_training/" + participant.encode())
    assert answer.json["ok"] is True
    assert harness.heartbeat(participant) == {"state": "stand_by", "round": None}
    assert harness.counters()["watched_participants"] == 0


def test_start_training_of_a_selected_participant_admits_it_first(serve):
    harness = serve(min_clients=1)
    participant = harness.rendez_vous()
    answering = harness.send(b"/start_training/" + participant.encode())
    call = harness.admit_call()
    assert (call.participant_id, call.round) == (participant, 0)
    assert isinstance(call.token, str) and len(call.token) >= 16
    # Not answered before the aggregator admits.
    assert not answering.answered
    call.deferred.callback(None)
    answer = answering.response()
    assert_json(answer)
    assert answer.json == {"ok": True, "url": AGGREGATOR_URL, "token": call.token}
    assert harness.service.admitted_tokens() == {participant: call.token}
    assert len(harness.aggregator.admits) == 1
    # Still selected, but it holds its token: heartbeats say stand_by so that a
    # legacy participant never applies a stale `round` after its upload.
    assert harness.heartbeat(participant) == {"state": "stand_by", "round": None}
    assert harness.service.machine.state_of(participant) is ParticipantState.SELECTED


def test_start_training_with_an_aggregator_that_admits_at_once(serve):
    harness = serve(min_clients=1)
    harness.aggregator.admit_at_once = True
    participant = harness.rendez_vous()
    answer = harness.get(b"/start_training/" + participant.encode())
    assert_json(answer)
    (call,) = harness.aggregator.admits
    assert answer.json == {"ok": True, "url": AGGREGATOR_URL, "token": call.token}


def test_start_training_of_a_participant_not_selected_is_refused(serve):
    harness = serve(min_clients=1)
    harness.rendez_vous()
    waiting = harness.rendez_vous()
    for who in (waiting.encode(), b"stranger"):
        answer = harness.get(b"/start_training/" + who)
        assert_json(answer)
        assert answer.json == {"ok": False, "url": None, "token": None}
    assert harness.aggregator.admits == []
    assert harness.service.admitted_tokens() == {}


def test_start_training_is_held_until_admit_timeout_then_refused(serve):
    harness = serve(min_clients=1, admit_timeout=10.0, heartbeat_timeout=60.0)
    participant = harness.rendez_vous()
    answering = harness.send(b"/start_training/" + participant.encode())
    call = harness.admit_call()
    assert call.participant_id == participant

    harness.clock.advance(9)
    # A full round trip on another connection: the held request is still unanswered.
    status = harness.get(b"/status")
    assert status.json["participants"]["selected"] == 1
    assert not answering.answered
    assert not call.deferred.called

    harness.clock.advance(1)
    assert call.deferred.called  # given up on (cancelled by the timeout)
    answer = answering.response()
    assert_json(answer)
    assert answer.json == {"ok": False, "url": None, "token": None}
    assert harness.service.admitted_tokens() == {}
    # Refusing the start does not end its selection: it may ask again.
    assert harness.heartbeat(participant) == {"state": "round", "round": 0}
    again = harness.send(b"/start_training/" + participant.encode())
    second = harness.admit_call(1)
    assert second.token != call.token
    assert not again.answered
    second.deferred.callback(None)
    assert again.response().json == {"ok": True, "url": AGGREGATOR_URL, "token": second.token}


def test_admit_failure_answers_ok_false(serve):
    harness = serve(min_clients=1)
    participant = harness.rendez_vous()
    answering = harness.send(b"/start_training/" + participant.encode())
    call = harness.admit_call()
    assert not answering.answered
    call.deferred.errback(RuntimeError("aggregator refused"))
    answer = answering.response()
    assert_json(answer)
    assert answer.json == {"ok": False, "url": None, "token": None}


@pytest_twisted.ensureDeferred
async def test_participant_hanging_up_while_held_breaks_nothing(serve_tcp):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        harness = serve_tcp(min_clients=1)
        participant = await harness.rendez_vous()
        answering = harness.get(b"/start_training/" + participant.encode())
        call = await harness.aggregator.next_admit()
        hung_up: list = []
        answering.addErrback(hung_up.append)
        answering.cancel()  # aborts the client's connection
        assert len(hung_up) == 1
        # A full round trip, then the aggregator admits after the participant left.
        assert (await harness.get(b"/status")).json["participants"]["selected"] == 1
        call.deferred.callback(None)
        # The daemon still serves, and the participant may ask again.
        assert await harness.heartbeat(participant) == {"state": "round", "round": 0}
        harness.aggregator.admit_at_once = True
        answer = await harness.get(b"/start_training/" + participant.encode())
        assert answer.json == {"ok": True, "url": AGGREGATOR_URL, "token": harness.aggregator.admits[1].token}
        assert (await harness.get(b"/rendez_vous")).json["ok"] is True
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if e.get("log_failure") is not None or e.get("log_level") in (LogLevel.error, LogLevel.critical)]
    assert failures == []


# -- end of training ------------------------------------------------------------------


def test_after_the_last_round_heartbeats_finish_and_rendez_vous_says_ok_false(serve):
    harness = serve(rounds=1, min_clients=1)
    participant = harness.rendez_vous()
    harness.aggregator.admit_at_once = True
    token = harness.get(b"/start_training/" + participant.encode()).json["token"]
    assert harness.service.end_training(participant, token, True) is True

    (aggregation,) = harness.aggregator.aggregations
    assert aggregation.round == 0
    # While the aggregator works, the participant waits.
    assert harness.heartbeat(participant) == {"state": "stand_by", "round": None}
    assert harness.get(b"/status").json["phase"] == "aggregating"

    aggregation.deferred.callback(None)
    for who in (participant, "never-seen", "x"):
        assert harness.heartbeat(who) == {"state": "finish", "round": None}
    before = harness.counters()
    late = harness.get(b"/rendez_vous")
    assert harness.counters() == before  # the refused newcomer is not kept
    assert_json(late, 200)
    assert set(late.json) == {"id", "ok"}
    assert late.json["ok"] is False
    assert isinstance(late.json["id"], str) and late.json["id"]
    refused = harness.get(b"/start_training/" + participant.encode())
    assert refused.json == {"ok": False, "url": None, "token": None}
    assert len(harness.aggregator.admits) == 1
    status = harness.get(b"/status").json
    assert (status["round"], status["phase"]) == (1, "complete")


# -- status ----------------------------------------------------------------------------


def test_status_reports_round_phase_and_counters(serve):
    harness = serve(rounds=4, min_clients=2, participants_ratio=1.0)
    harness.aggregator.attached = False
    empty = harness.get(b"/status")
    assert_json(empty)
    assert empty.json == {
        "round": 0,
        "rounds": 4,
        "phase": "training",
        "minimum_participants": 2,
        "participants": {"waiting": 0, "selected": 0, "done": 0, "done_inactive": 0, "ignored": 0},
        "waiting_for": "waiting for 2 more participant(s) to rendez-vous (0 of min_clients 2 present)",
        "aggregator_attached": False,
        "aggregator_shards": [],
        "watched_participants": 0,
        "selection_to_start_training": {"count": 0},
        "state_write_failure": None,
        "finished_rounds": [],
        "seconds_since_last_aggregation": None,
        "recent_problems": [],
    }
    first = harness.rendez_vous()
    one = harness.get(b"/status").json
    assert one["participants"] == {"waiting": 1, "selected": 0, "done": 0, "done_inactive": 0, "ignored": 0}
    assert harness.heartbeat(first) == {"state": "stand_by", "round": None}

    harness.aggregator.attached = True
    harness.rendez_vous()
    two = harness.get(b"/status").json
    assert two["participants"] == {"waiting": 0, "selected": 2, "done": 0, "done_inactive": 0, "ignored": 0}
    assert (two["round"], two["phase"], two["aggregator_attached"]) == (0, "training", True)
    assert two["waiting_for"] == "waiting for 2 selected participant(s) to deliver round 0"
    assert harness.heartbeat(first) == {"state": "round", "round": 0}


# -- errors ---------------------------------------------------------------------------------


def test_wrong_method_is_405_with_allow_and_changes_nothing(serve):
    harness = serve(min_clients=1)
    participant = harness.rendez_vous()
    before = harness.counters()
    answer = harness.request(b"/rendez_vous", method=b"POST")
    assert_json(answer, 405)
    assert answer.json == {"error": "method POST not allowed on /rendez_vous; use GET", "code": "method_not_allowed"}
    assert answer.header(b"allow") == [b"GET"]
    answer = harness.request(b"/start_training/" + participant.encode(), method=b"PUT")
    assert_json(answer, 405)
    assert answer.header(b"allow") == [b"GET"]
    assert answer.json["code"] == "method_not_allowed"
    assert harness.aggregator.admits == []
    assert harness.counters() == before


@pytest.mark.parametrize(
    ("method", "path", "code", "error"),
    [
        (b"POST", b"/rendez_vous", 405, "method POST not allowed on /rendez_vous; use GET"),
        (b"DELETE", b"/heartbeat/abc", 405, "method DELETE not allowed on /heartbeat/abc; use GET"),
        (b"GET", b"/nope", 404, "no such resource: /nope"),
        (b"GET", b"/index.html", 404, "no such resource: /index.html"),  # the status page is at / itself
        (b"GET", b"/heartbeat/a/b", 404, "no such resource: /heartbeat/a/b"),
        (b"GET", b"/rendez_vous/extra", 404, "no such resource: /rendez_vous/extra"),
        (b"GET", b"/heartbeat/", 404, "missing participant id"),
        (b"GET", b"/start_training/", 404, "missing participant id"),
        (b"GET", b"/heartbeat/%FF", 400, "participant id is not valid UTF-8"),
        (b"GET", b"/start_training/%C3%28", 400, "participant id is not valid UTF-8"),
    ],
)
def test_error_answers_are_json_and_the_daemon_keeps_serving(serve, method, path, code, error):
    harness = serve(min_clients=1)
    selected = harness.rendez_vous()
    waiting = harness.rendez_vous()
    before = harness.counters()

    answer = harness.request(path, method=method)
    assert_json(answer, code)
    expected_code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}[code]
    assert answer.json == {"error": error, "code": expected_code}
    if code == 405:
        assert answer.header(b"allow") == [b"GET"]

    # Nothing changed...
    assert harness.counters() == before
    assert harness.aggregator.admits == []
    assert harness.heartbeat(selected) == {"state": "round", "round": 0}
    assert harness.heartbeat(waiting) == {"state": "stand_by", "round": None}
    # ...and a normal rendez-vous is still served.
    newcomer = harness.get(b"/rendez_vous")
    assert_json(newcomer)
    assert newcomer.json["ok"] is True
    assert newcomer.json["id"] not in (selected, waiting)
    assert harness.counters()["participants"]["waiting"] == before["participants"]["waiting"] + 1


def test_percent_encoded_id_is_decoded(serve):
    harness = serve(min_clients=1)
    participant = harness.rendez_vous()
    escaped = "".join(f"%{byte:02X}" for byte in participant.encode())
    assert harness.heartbeat(escaped) == {"state": "round", "round": 0}
    # A query string is not part of the id.
    answer = harness.get(b"/heartbeat/" + participant.encode() + b"?x=1")
    assert answer.json == {"state": "round", "round": 0}


# -- request bodies ---------------------------------------------------------------------------


@pytest.fixture
def temporary_files(monkeypatch) -> list[object]:
    """Every temporary file twisted.web opens for a request body during the test."""
    import tempfile

    opened: list[object] = []
    real = tempfile.TemporaryFile

    def recorded(*args: Any, **kwargs: Any) -> Any:
        opened.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recorded)
    return opened


@pytest.mark.parametrize("path", [b"/status", b"/rendez_vous", b"/heartbeat/x", b"/nope"])
def test_a_body_above_the_limit_is_413_before_it_is_read_and_the_connection_closed(serve, temporary_files, path):
    harness = serve(min_clients=1)
    before = harness.counters()
    connection = harness.http.connect()
    connection.note_request(b"POST")
    connection.send(request_bytes(b"POST", path, {b"content-length": b"%d" % (500 * 2**20)}))  # the head only

    assert connection.answered
    answer = connection.responses()[0]
    assert_json(answer, 413)
    assert answer.json == {
        "error": f"request body of {500 * 2**20} bytes is above api.max_body_bytes ({DEFAULT_LIMITS.max_body_bytes})",
        "code": "body_too_large",
    }
    assert answer.header(b"connection") == [b"close"]
    connection.send(b"\0" * 65536)  # what the client keeps sending is dropped unread
    harness.http.site.reactor.advance(EARLY_ANSWER_GRACE)
    assert connection.closed_by_server
    assert len(connection.responses()) == 1
    assert temporary_files == []
    assert harness.counters() == before


def test_a_chunked_body_is_refused_once_it_grows_above_the_limit(serve, temporary_files):
    harness = serve(min_clients=1)
    connection = harness.http.connect()
    connection.note_request(b"POST")
    connection.send(request_bytes(b"POST", b"/status", {b"transfer-encoding": b"chunked"}))
    sent = 0
    while sent <= DEFAULT_LIMITS.max_body_bytes - 1000:
        connection.send(chunk(b"x" * 1000))
        sent += 1000
        assert not connection.answered, sent
    connection.send(chunk(b"x" * 1000))

    assert connection.answered
    answer = connection.responses()[0]
    assert_json(answer, 413)
    assert answer.json["code"] == "body_too_large"
    assert answer.header(b"connection") == [b"close"]
    assert temporary_files == []


def test_a_content_length_of_thousands_of_digits_is_413(serve):
    harness = serve(min_clients=1)
    connection = harness.http.connect()
    connection.note_request(b"GET")
    connection.send(request_bytes(b"GET", b"/status", {b"content-length": b"1" + b"0" * 5000}))
    answer = connection.responses()[0]
    assert_json(answer, 413)
    assert answer.json["code"] == "body_too_large"


def test_a_small_body_is_read_and_the_request_answered(serve, temporary_files):
    harness = serve(min_clients=1)
    answer = harness.http.request(b"GET", b"/status", {b"content-type": b"text/plain"}, b"x" * DEFAULT_LIMITS.max_body_bytes).response()
    assert_json(answer, 200)
    assert answer.json["round"] == 0
    chunked = harness.http.connect()
    chunked.note_request(b"GET")
    chunked.send(request_bytes(b"GET", b"/rendez_vous", {b"transfer-encoding": b"chunked"}) + chunk(b"y" * 100) + LAST_CHUNK)
    assert_json(chunked.response(), 200)
    assert temporary_files == []


def test_max_body_bytes_is_the_sites(serve):
    harness = serve(min_clients=1)
    site = coordinator_site(harness.service, 0.0, HTTPLimits(max_body_bytes=10))
    site.reactor = MemoryReactorClock()
    http = MemoryHTTP(site)
    try:
        assert http.request(b"GET", b"/status", None, b"x" * 10).response().code == 200
        refused = http.request(b"GET", b"/status", None, b"x" * 11).responses()[0]
        assert refused.code == 413 and refused.json["error"].endswith("api.max_body_bytes (10)")
    finally:
        http.close()


# -- slow clients ----------------------------------------------------------------------------


@pytest.fixture
def http_log() -> Iterator[list[dict]]:
    """The events xaind.http logs during the test."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "xaind.http":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def trickle(connection: MemoryConnection, clock: MemoryReactorClock, data: bytes, seconds: float, every: float = 3.0) -> int:
    """Send one byte of `data` every `every` seconds for `seconds` seconds (or until the server closes); bytes sent."""
    sent = 0
    while sent < len(data) and clock.seconds() + every <= seconds and not connection.closed_by_server:
        connection.send(data[sent : sent + 1])
        sent += 1
        clock.advance(every)
    return sent


def test_a_request_head_sent_a_byte_every_3_s_is_408_after_header_timeout_and_closed(serve, http_log):
    harness = serve(min_clients=1)
    clock: MemoryReactorClock = harness.http.site.reactor
    connection = harness.http.connect()
    connection.note_request(b"GET")
    head = request_bytes(b"GET", b"/heartbeat/" + b"x" * 200)

    trickle(connection, clock, head, DEFAULT_LIMITS.header_timeout - 1)
    assert not connection.answered and not connection.closed_by_server
    trickle(connection, clock, head[10:], DEFAULT_LIMITS.header_timeout + 30)  # past the idle timeout's 60 s too

    assert connection.closed_by_server
    answer = connection.responses()[0]
    assert_json(answer, 408)
    assert answer.json == {"error": "request headers not complete within api.header_timeout (30 s)", "code": "header_timeout"}
    assert answer.header(b"connection") == [b"close"]
    assert len(http_log) == 1
    assert "api.header_timeout" in http_log[0]["reason"] and "127.0.0.1" in http_log[0]["peer"]


def test_the_header_deadline_starts_at_each_requests_first_byte_not_while_idle(serve):
    harness = serve(min_clients=1)
    clock: MemoryReactorClock = harness.http.site.reactor
    connection = harness.http.connect()
    connection.request(b"GET", b"/status", close=False)
    assert connection.answered
    clock.advance(20)  # idle on a kept-alive connection: the idle timeout's business (60 s)
    assert not connection.closed_by_server
    connection.note_request(b"GET")
    connection.send(b"GET /sta")
    clock.advance(DEFAULT_LIMITS.header_timeout - 0.1)
    assert not connection.closed_by_server
    connection.send(b"tus HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(connection.responses()) == 2 and connection.responses()[1].code == 200
    clock.advance(DEFAULT_LIMITS.header_timeout)  # no deadline left running
    assert not connection.closed_by_server


def test_a_body_below_the_minimum_rate_is_408_after_the_window_and_closed(serve, http_log):
    harness = serve(min_clients=1)
    clock: MemoryReactorClock = harness.http.site.reactor
    connection = harness.http.connect()
    connection.note_request(b"POST")
    connection.send(request_bytes(b"POST", b"/status", {b"content-length": b"4000"}))

    trickle(connection, clock, b"x" * 4000, DEFAULT_LIMITS.body_rate_window - 1)
    assert not connection.answered
    trickle(connection, clock, b"x" * 4000, DEFAULT_LIMITS.body_rate_window + 3)

    assert connection.closed_by_server
    answer = connection.responses()[0]
    assert_json(answer, 408)
    assert answer.json["code"] == "body_too_slow"
    assert answer.json["error"].startswith("request body slower than api.body_min_rate (1024 bytes/s over 30 s)")
    assert len(http_log) == 1 and "api.body_min_rate" in http_log[0]["reason"]


def test_a_slow_body_that_keeps_the_minimum_rate_gets_through(serve):
    harness = serve(min_clients=1)
    site = coordinator_site(harness.service, 0.0, HTTPLimits(max_body_bytes=2**20, body_min_rate=100, body_rate_window=10))
    clock = site.reactor = MemoryReactorClock()
    http = MemoryHTTP(site)
    try:
        connection = http.connect()
        connection.note_request(b"POST")
        connection.send(request_bytes(b"POST", b"/status", {b"content-length": b"30000"}))
        for second in range(290):  # bursts of 500 bytes with 4 s of nothing between them: 100 bytes/s on average
            if second % 5 == 0:
                connection.send(b"x" * 500)
            clock.advance(1)
            assert not connection.closed_by_server, second
        connection.send(b"x" * 1000)
        assert_json(connection.responses()[0], 405)
    finally:
        http.close()


# -- who may join: participants.max_known, participants.rendez_vous_per_address_per_minute --


@pytest.fixture
def service_log() -> Iterator[list[str]]:
    """The lines xaind.coordinator.service logs during the test."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "xaind.coordinator.service":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def test_a_rendez_vous_beyond_max_known_is_503_and_the_known_ones_go_on(serve, service_log):
    harness = serve(min_clients=3, limits=ParticipantLimits(max_known=3, rendez_vous_per_address_per_minute=0))
    known = [harness.rendez_vous() for _ in range(3)]
    before = harness.counters()["participants"]
    refused = [harness.get(b"/rendez_vous") for _ in range(100)]
    assert {answer.code for answer in refused} == {503}
    assert refused[0].json == {"error": "too many participants (3, participants.max_known): try again later", "code": "too_many_participants"}
    assert harness.counters()["participants"] == before  # nothing half-changed
    assert [harness.heartbeat(participant)["state"] for participant in known] == ["round"] * 3
    assert sum("too many participants" in line for line in service_log) == 1
    # A place is free again once a participant is forgotten.
    for participant in known[1:]:
        harness.heartbeat(participant)
    harness.clock.advance(10.0)
    for participant in known[1:]:
        harness.heartbeat(participant)
    harness.clock.advance(10.0)
    assert harness.counters()["participants"]["selected"] == 2
    assert harness.get(b"/rendez_vous").code == 200


def test_rendez_vous_from_one_address_beyond_its_allowance_are_429_with_retry_after(serve, service_log):
    harness = serve(limits=ParticipantLimits(rendez_vous_per_address_per_minute=6))
    for _ in range(6):
        harness.rendez_vous()
    refused = harness.get(b"/rendez_vous")
    assert refused.code == 429
    assert refused.header(b"retry-after") == [b"10"]  # 6 a minute: one every 10 s
    assert refused.json["code"] == "rendez_vous_rate_limited"
    for _ in range(1000):
        assert harness.get(b"/rendez_vous").code == 429
    assert sum("rendez-vous" in line and "127.0.0.1" in line for line in service_log) == 1
    harness.clock.advance(10.0)
    harness.rendez_vous()
    assert harness.counters()["participants"]["waiting"] + harness.counters()["participants"]["selected"] == 7


def test_participants_expiring_by_the_thousand_are_a_few_log_lines(serve, service_log):
    harness = serve(limits=ParticipantLimits(rendez_vous_per_address_per_minute=0), training_timeout=20.0)
    for _ in range(1000):
        harness.rendez_vous()
    harness.clock.advance(15.0)  # heartbeat_timeout: all forgotten
    harness.clock.advance(60.0)
    assert harness.counters()["participants"]["waiting"] == 0
    expired = [line for line in service_log if "no heartbeat from" in line]
    assert len(expired) == 2, expired
    assert "more like it in the last" in expired[1]
    assert len(service_log) < 20, service_log


def test_a_thousand_slow_clients_closed_together_are_two_log_lines(serve, http_log):
    harness = serve(min_clients=1)
    clock: MemoryReactorClock = harness.http.site.reactor
    connections = [harness.http.connect() for _ in range(1000)]
    for connection in connections:
        connection.note_request(b"GET")
        connection.send(b"GET /stat")
    clock.advance(DEFAULT_LIMITS.header_timeout)
    assert all(connection.closed_by_server for connection in connections)
    assert len(http_log) == 1
    clock.advance(10.0)  # logging.repeat_interval's default
    assert len(http_log) == 2
    assert formatEvent(http_log[1]).endswith("(and 999 more like it in the last 10 s)")


def test_heartbeat_answers_are_encoded_once_per_state_and_round():
    from xaind.coordinator.http_api import heartbeat_document

    assert heartbeat_document("round", 3) == b'{"state":"round","round":3}'
    assert heartbeat_document("stand_by", None) is heartbeat_document("stand_by", None)
