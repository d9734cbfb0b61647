"""The aggregator service on its own: admit, sync, uploads, aggregation, restart recovery.

A real `AggregatorService` on a real `ModelStore` in a temporary directory,
the real `WeightedAverageBackend` and a real `SerialWorker` thread; the
coordinator is a fake whose `end_training` answers at once, or never, as a
test asks. No sockets: uploads go through `begin_upload` / `write` /
`finish`. The worker delivers its results through the reactor, so the tests
run on the real reactor (pytest-twisted); the coordinator-call timeout runs
on a `Clock` the tests advance. docs/aggregator-consistency.rst and
docs/threading.rst are the contract.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from xaind.aggregator.backends import WeightedAverageBackend
from xaind.aggregator.service import AggregatorService, ICoordinator
from xaind.aggregator.store import ModelStore
from xaind.aggregator.threads import DiskThreads, SerialWorker
from xaind.aggregator.upload import Upload
from xaind.protocol import ErrorCode, Refusal
from xaind.testing.wire import encode_local_result

from xaind.testing.fakes import FakeCoordinator
from xaind.testing.waiting import WAIT, wait_until, within

# IDLE_WORKER: a test expected to fail (xfail) lets the aggregator's worker thread
# go idle before its failing assertion. On CPython 3.11 before 3.11.8, the AST
# constructor's recursion counter is shared between threads (CPython gh-106905),
# so pytest parsing this file to report the failure while the worker parses .npy
# headers (numpy uses ast.literal_eval) can crash the session with SystemError.

CALL_TIMEOUT = 5.0  # seconds on the fake clock
MAX_UPLOAD = 2**20


# -- helpers -------------------------------------------------------------------------


async def drain_worker(service: AggregatorService) -> None:
    """Wait until every step queued in the worker so far ran (disk steps may still be under way)."""
    await within(service.worker.run(lambda: None))


async def drain(service: AggregatorService) -> None:
    """Wait until every step queued in the worker so far ran, every disk step ended, and both reported back."""
    await within(service.settled())


async def upload(service: AggregatorService, participant_id: str, token: str, samples: int, weights: np.ndarray) -> None:
    """Stream one local result in small chunks, as the HTTP layer would, and finish it."""
    data = encode_local_result(samples, weights)
    current = service.begin_upload(participant_id, token)
    for start in range(0, len(data), 777):
        current.write(data[start : start + 777])
    await within(current.finish())


async def contribute(service: AggregatorService, participant_id: str, samples: int, weights: np.ndarray) -> None:
    """Admit a participant for the model's round and upload its result."""
    token = f"token-of-{participant_id}"
    service.admit(participant_id, token, service.model.round)
    await upload(service, participant_id, token, samples, weights)


def weighted_average(results: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """sum(n_i x_i) / sum(n_i) in float64 (the plain mean when every n_i is 0), in the results' dtype."""
    counts = [samples for samples, _ in results]
    weights = counts if sum(counts) > 0 else [1] * len(counts)
    total = np.zeros(results[0][1].shape, dtype=np.float64)
    for weight, (_, array) in zip(weights, results):
        total += weight * array.astype(np.float64)
    return (total / sum(weights)).astype(results[0][1].dtype)


def assert_model_equals(path: str | None, expected: np.ndarray) -> None:
    assert path is not None
    model = np.load(path, allow_pickle=False)
    assert model.dtype == expected.dtype
    assert model.shape == expected.shape
    np.testing.assert_allclose(model, expected, rtol=4 * np.finfo(expected.dtype).eps, atol=0)


def round_files(state_dir: Path, round_number: int) -> list[str]:
    directory = state_dir / f"round-{round_number}"
    return sorted(os.listdir(directory)) if directory.exists() else []


def model_files(state_dir: Path) -> list[str]:
    return sorted(name for name in os.listdir(state_dir) if name.startswith("model-"))


def arrays(seed: int, count: int, shape: tuple[int, ...] = (3, 5), dtype: Any = np.float32) -> list[np.ndarray]:
    generator = np.random.default_rng(seed)
    return [generator.standard_normal(shape).astype(dtype) for _ in range(count)]


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def logged_errors():
    """xaind's error-level log events during the test; none are expected unless a test says so."""
    events: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace", "").startswith("xaind") and event.get("log_level", LogLevel.info) >= LogLevel.error:
            events.append(event)

    globalLogPublisher.addObserver(observe)
    state = {"events": events, "expected": False}
    yield state
    globalLogPublisher.removeObserver(observe)
    if not state["expected"]:
        assert events == [], "unexpected errors logged: " + "; ".join(str(e.get("log_format")) for e in events)


@dataclass
class Made:
    service: AggregatorService
    coordinator: FakeCoordinator
    clock: Clock
    store: ModelStore


@pytest.fixture
def make(tmp_path, logged_errors):
    """make(state_dir=tmp_path, ...) -> a started service; every service is stopped after the test."""
    made: list[Made] = []

    def build(state_dir: Path | None = None, *, coordinator: FakeCoordinator | None = None, start: bool = True) -> Made:
        coordinator = coordinator or FakeCoordinator()
        verifyObject(ICoordinator, coordinator)
        clock = Clock()
        store = ModelStore(str(state_dir or tmp_path))
        service = AggregatorService(
            store,
            WeightedAverageBackend(),
            coordinator,
            clock,
            max_upload_bytes=MAX_UPLOAD,
            call_timeout=CALL_TIMEOUT,
            worker=SerialWorker(reactor, "test"),
            disk=DiskThreads(reactor, "test-disk"),
        )
        result = Made(service, coordinator, clock, store)
        made.append(result)
        if start:
            service.startService()
        return result

    yield build
    for result in made:
        if result.service.running:
            result.service.stopService()


# -- the fake itself ------------------------------------------------------------------


def test_fake_coordinator_provides_the_interface() -> None:
    assert verifyObject(ICoordinator, FakeCoordinator())


# -- admit ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_admit_for_another_round_is_refused(make):
    service = make().service
    with pytest.raises(Refusal) as refused:
        service.admit("p1", "t1", 1)
    assert refused.value.code == ErrorCode.WRONG_ROUND
    with pytest.raises(Refusal) as refused:
        service.authorize("p1", "t1")
    assert refused.value.code == ErrorCode.UNKNOWN_TOKEN
    assert service.status()["admitted"] == 0
    service.admit("p1", "t1", 0)
    service.authorize("p1", "t1")
    assert service.status()["admitted"] == 1
    await drain(service)


# -- sync ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sync_when_the_model_is_ahead_changes_nothing(make, tmp_path):
    made = make()
    service = made.service
    await contribute(service, "p1", 4, arrays(1, 1)[0])
    await within(service.aggregate(0))
    service.admit("p2", "t2", 1)
    second = arrays(2, 1)[0]
    await contribute(service, "p3", 2, second)
    model_before = service.model
    status_before = service.status()

    answer = await within(service.sync(0, ["p1"], {"p9": "t9"}))

    assert answer == {"model_round": 1, "missing": []}
    assert service.model == model_before
    assert service.status() == status_before
    service.authorize("p2", "t2")  # the admitted tokens were not replaced
    with pytest.raises(Refusal):
        service.authorize("p9", "t9")
    assert ModelStore(str(tmp_path)).load() == model_before
    await drain(service)
    assert round_files(tmp_path, 1) == [os.path.basename(service.store.result_path(1, "p3"))]
    await within(service.aggregate(1))
    assert_model_equals(service.model.path, second)


@pytest_twisted.ensureDeferred
async def test_sync_when_the_model_is_behind_adopts_the_coordinators_round(make, tmp_path):
    service = make().service
    first = arrays(3, 1)[0]
    await contribute(service, "p1", 5, first)
    await within(service.aggregate(0))
    stale = arrays(4, 1)[0]
    await contribute(service, "p2", 5, stale)  # a result of round 1, which the coordinator left behind
    model_file = service.model.path

    answer = await within(service.sync(3, [], {"p3": "t3"}))

    assert answer == {"model_round": 3, "missing": []}
    assert service.model.round == 3
    assert service.model.path == model_file  # the same weights, now labelled round 3
    stored = ModelStore(str(tmp_path)).load()
    assert stored.round == 3 and stored.path == model_file and stored.etag == service.model.etag
    assert service.status()["accepted"] == 0
    await drain(service)
    assert round_files(tmp_path, 1) == []
    with pytest.raises(Refusal) as refused:
        service.admit("p4", "t4", 1)
    assert refused.value.code == ErrorCode.WRONG_ROUND
    service.authorize("p3", "t3")
    third = arrays(5, 1)[0]
    await upload(service, "p3", "t3", 2, third)
    await within(service.aggregate(3))
    assert service.model.round == 4
    assert_model_equals(service.model.path, third)


@pytest_twisted.ensureDeferred
async def test_sync_of_a_new_state_directory_adopts_the_round_without_a_model(make, tmp_path):
    service = make().service
    answer = await within(service.sync(2, None, {}))
    assert answer == {"model_round": 2, "missing": []}
    stored = ModelStore(str(tmp_path)).load()
    assert stored.round == 2 and stored.path is None
    await drain(service)


@pytest_twisted.ensureDeferred
async def test_sync_rewrites_the_state_file_off_the_reactor_thread_one_rewrite_at_a_time(make, tmp_path, monkeypatch):
    service = make().service
    adopt_round = service.store.adopt_round
    threads: list[threading.Thread] = []

    def recorded(model, round_number):
        threads.append(threading.current_thread())
        return adopt_round(model, round_number)

    monkeypatch.setattr(service.store, "adopt_round", recorded)
    first = service.sync(2, None, {})
    second = service.sync(4, None, {"p": "t"})
    assert service.admit("p2", "t2", 4) is None  # the rules moved on at once
    assert await within(first) == {"model_round": 2, "missing": []}
    assert await within(second) == {"model_round": 4, "missing": []}
    assert len(threads) == 2 and threading.main_thread() not in threads
    assert service.model.round == 4 and ModelStore(str(tmp_path)).load().round == 4
    await drain(service)


@pytest_twisted.ensureDeferred
async def test_sync_without_done_keeps_results_and_replaces_tokens(make, tmp_path):
    service = make().service
    results = list(zip([3, 7], arrays(6, 2)))
    for number, (samples, weights) in enumerate(results):
        await contribute(service, f"p{number}", samples, weights)
    service.admit("waiting", "old-token", 0)

    answer = await within(service.sync(0, None, {"p5": "t5"}))

    assert answer == {"model_round": 0, "missing": []}
    assert service.status()["accepted"] == 2
    with pytest.raises(Refusal):
        service.authorize("waiting", "old-token")
    service.authorize("p5", "t5")
    await drain(service)
    assert len(round_files(tmp_path, 0)) == 2
    await within(service.aggregate(0))
    assert_model_equals(service.model.path, weighted_average(results))


@pytest_twisted.ensureDeferred
async def test_sync_with_done_drops_uncounted_results_and_reports_missing_ones(make, tmp_path):
    service = make().service
    results = dict(zip(["p1", "p2", "p3"], zip([2, 9, 4], arrays(7, 3))))
    for participant_id, (samples, weights) in results.items():
        await contribute(service, participant_id, samples, weights)
    dropped_file = service.store.result_path(0, "p2")
    assert os.path.exists(dropped_file)

    answer = await within(service.sync(0, ["p1", "p3", "lost"], {"p6": "t6"}))

    assert answer == {"model_round": 0, "missing": ["lost"]}
    assert service.status()["accepted"] == 2
    service.authorize("p6", "t6")
    await drain(service)
    assert not os.path.exists(dropped_file)
    assert round_files(tmp_path, 0) == sorted(
        os.path.basename(service.store.result_path(0, participant_id)) for participant_id in ("p1", "p3")
    )
    await within(service.aggregate(0))
    assert_model_equals(service.model.path, weighted_average([results["p1"], results["p3"]]))


# -- aggregate ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_aggregate_is_the_sample_weighted_average_and_is_persisted(make, tmp_path):
    made = make()
    service = made.service
    first_round = list(zip([10, 3, 0, 7], arrays(8, 4, shape=(4, 6))))
    for number, (samples, weights) in enumerate(first_round):
        await contribute(service, f"p{number}", samples, weights)
    assert service.status()["accepted"] == 4
    assert [call.success for call in made.coordinator.calls] == [True] * 4
    assert [(call.participant_id, call.token) for call in made.coordinator.calls] == [
        (f"p{number}", f"token-of-p{number}") for number in range(4)
    ]

    assert await within(service.aggregate(0)) is None

    expected = weighted_average(first_round)
    assert service.model.round == 1
    assert_model_equals(service.model.path, expected)
    stored = ModelStore(str(tmp_path)).load()
    assert stored == service.model
    assert_model_equals(stored.path, expected)
    status = service.status()
    assert status["model_round"] == 1 and status["accepted"] == 0 and status["admitted"] == 0
    assert status["model_bytes"] == os.path.getsize(stored.path)
    await drain(service)  # what the new model superseded is removed after the answer
    assert not (tmp_path / "round-0").exists()

    # A second round starts from the new global model, whose shape uploads must have.
    second_round = list(zip([1, 2], arrays(9, 2, shape=(4, 6))))
    for number, (samples, weights) in enumerate(second_round):
        await contribute(service, f"q{number}", samples, weights)
    await within(service.aggregate(1))
    assert ModelStore(str(tmp_path)).load().round == 2
    assert_model_equals(service.model.path, weighted_average(second_round))
    await drain(service)
    assert model_files(tmp_path) == ["model-2.npy"]
    assert not (tmp_path / "round-1").exists()


@pytest_twisted.ensureDeferred
async def test_aggregate_of_results_that_all_have_0_samples_is_the_plain_mean(make):
    service = make().service
    results = list(zip([0, 0, 0], arrays(10, 3, dtype=np.float64)))
    for number, (samples, weights) in enumerate(results):
        await contribute(service, f"p{number}", samples, weights)
    await within(service.aggregate(0))
    assert_model_equals(service.model.path, np.mean([weights for _, weights in results], axis=0))


@pytest_twisted.ensureDeferred
async def test_aggregate_of_the_previous_round_after_success_is_a_no_op(make, tmp_path):
    service = make().service
    await contribute(service, "p1", 3, arrays(11, 1)[0])
    await within(service.aggregate(0))
    model = service.model
    content = Path(model.path).read_bytes()

    assert await within(service.aggregate(0)) is None

    assert service.model == model
    assert ModelStore(str(tmp_path)).load() == model
    assert Path(model.path).read_bytes() == content
    assert model_files(tmp_path) == ["model-1.npy"]


@pytest_twisted.ensureDeferred
async def test_aggregate_without_results_is_refused_and_changes_nothing(make, tmp_path, logged_errors):
    logged_errors["expected"] = True  # the failed aggregation is logged as an error
    service = make().service
    await drain(service)
    with pytest.raises(Refusal) as refused:
        await within(service.aggregate(0))
    assert refused.value.code == ErrorCode.AGGREGATION_FAILED
    assert service.model.round == 0 and service.model.path is None
    assert ModelStore(str(tmp_path)).load().round == 0
    assert model_files(tmp_path) == []
    assert service.status()["aggregating"] is False

    # With a global model: it stays, byte for byte, and the round can still be aggregated.
    await contribute(service, "p1", 3, arrays(12, 1)[0])
    await within(service.aggregate(0))
    model = service.model
    content = Path(model.path).read_bytes()
    await drain(service)
    with pytest.raises(Refusal) as refused:
        await within(service.aggregate(1))
    assert refused.value.code == ErrorCode.AGGREGATION_FAILED
    assert service.model == model
    assert ModelStore(str(tmp_path)).load() == model
    assert Path(model.path).read_bytes() == content
    assert model_files(tmp_path) == ["model-1.npy"]
    assert service.status()["aggregating"] is False and service.status()["accepted"] == 0
    later = arrays(13, 1)[0]
    await contribute(service, "p2", 1, later)
    await within(service.aggregate(1))
    assert service.model.round == 2
    assert_model_equals(service.model.path, later)
    assert [event["log_level"] for event in logged_errors["events"]] == [LogLevel.error, LogLevel.error]


@pytest_twisted.ensureDeferred
async def test_aggregate_of_another_round_is_refused(make):
    service = make().service
    await contribute(service, "p1", 3, arrays(14, 1)[0])
    with pytest.raises(Refusal) as refused:
        await within(service.aggregate(1))
    assert refused.value.code == ErrorCode.WRONG_ROUND
    assert service.model.round == 0 and service.status()["accepted"] == 1


# -- the coordinator's answer ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_upload_the_coordinator_does_not_confirm_in_time_is_dropped(make, tmp_path):
    coordinator = FakeCoordinator()
    coordinator.answer = None  # never answers
    made = make(coordinator=coordinator)
    service = made.service
    service.admit("p1", "t1", 0)
    current = service.begin_upload("p1", "t1")
    current.write(encode_local_result(3, arrays(15, 1)[0]))
    outcome: list[Any] = []
    current.finish().addBoth(outcome.append)
    await wait_until(lambda: len(coordinator.calls) == 1)
    assert outcome == []
    assert service.status()["accepted"] == 1  # kept while the coordinator is being asked
    made.clock.advance(CALL_TIMEOUT - 0.1)
    assert outcome == []
    made.clock.advance(0.1)
    assert len(outcome) == 1 and outcome[0].check(Refusal)
    assert outcome[0].value.code == ErrorCode.COORDINATOR_UNREACHABLE
    assert service.status()["accepted"] == 0
    await drain(service)
    assert round_files(tmp_path, 0) == []
    # The token is still valid: the participant may upload again.
    coordinator.answer = True
    again = arrays(16, 1)[0]
    await upload(service, "p1", "t1", 3, again)
    await within(service.aggregate(0))
    assert_model_equals(service.model.path, again)


@pytest_twisted.ensureDeferred
async def test_an_upload_the_coordinator_refuses_is_dropped(make, tmp_path):
    coordinator = FakeCoordinator()
    service = make(coordinator=coordinator).service
    kept = arrays(17, 1)[0]
    await contribute(service, "p0", 2, kept)
    coordinator.answer = False
    service.admit("p1", "t1", 0)
    with pytest.raises(Refusal) as refused:
        await upload(service, "p1", "t1", 8, arrays(18, 1)[0])
    assert refused.value.code == ErrorCode.NOT_EXPECTED
    assert service.status()["accepted"] == 1
    await drain(service)
    assert round_files(tmp_path, 0) == [os.path.basename(service.store.result_path(0, "p0"))]
    await within(service.aggregate(0))
    assert_model_equals(service.model.path, kept)


# -- restart -------------------------------------------------------------------------------


class HeldCommits:
    """Holds the commit (fsync + keep) of chosen participants' uploads on the disk thread until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *participant_ids: str) -> None:
        self.gates = {participant_id: threading.Event() for participant_id in participant_ids}
        self.reached: set[str] = set()
        commit = Upload.commit
        gates, reached = self.gates, self.reached

        def held(upload: Any, store: ModelStore) -> str:
            gate = gates.get(upload.participant_id)
            if gate is not None:
                reached.add(upload.participant_id)
                if not gate.wait(WAIT):
                    raise AssertionError(f"the commit of {upload.participant_id} was never released")
            return commit(upload, store)

        monkeypatch.setattr(Upload, "commit", held)

    def release(self, participant_id: str) -> None:
        self.gates[participant_id].set()


def start_upload(service: AggregatorService, participant_id: str, samples: int, weights: np.ndarray) -> Deferred:
    """Admit and upload, returning the upload's finish() without waiting for it."""
    token = f"token-of-{participant_id}"
    service.admit(participant_id, token, service.model.round)
    current = service.begin_upload(participant_id, token)
    current.write(encode_local_result(samples, weights))
    return current.finish()


@pytest_twisted.ensureDeferred
async def test_an_upload_folded_while_it_is_made_durable_counts_once_through_a_reset(make, monkeypatch):
    service = make().service
    held = HeldCommits(monkeypatch, "late")
    results = dict(zip(["a", "dropped", "late"], zip([2, 5, 3], arrays(40, 3))))
    await contribute(service, "a", *results["a"])
    await contribute(service, "dropped", *results["dropped"])
    late = start_upload(service, "late", *results["late"])
    await wait_until(lambda: "late" in held.reached)
    await drain_worker(service)  # its fold ran already, before it is durable

    # The coordinator does not count "dropped": the sum restarts without it, with "late" folded again.
    assert await within(service.sync(0, ["a"], {"a": "token-of-a", "late": "token-of-late"})) == {"model_round": 0, "missing": []}
    held.release("late")
    await within(late)

    await within(service.aggregate(0, ["a", "late"]))
    assert_model_equals(service.model.path, weighted_average([results["a"], results["late"]]))


@pytest_twisted.ensureDeferred
async def test_results_that_arrive_while_the_worker_is_busy_are_folded_together(make, monkeypatch):
    service = make().service
    await drain(service)
    batches: list[int] = []
    add_results = service.backend.add_results

    def counting(sources):
        batches.append(len(sources))
        return add_results(sources)

    monkeypatch.setattr(service.backend, "add_results", counting)
    gate = threading.Event()
    busy = service.worker.run(gate.wait, WAIT)  # the worker is folding something else meanwhile
    results = list(zip([3, 1, 4], arrays(46, 3)))
    uploads = [start_upload(service, f"p{number}", *result) for number, result in enumerate(results)]
    await wait_until(lambda: service.running_sum.queued() == 3)
    gate.set()
    await within(busy)
    for finished in uploads:
        await within(finished)
    await drain_worker(service)  # an upload's 200 waits for its durability, not for its fold

    assert batches == [3]
    await within(service.aggregate(0))
    assert_model_equals(service.model.path, weighted_average(results))


@pytest_twisted.ensureDeferred
async def test_an_upload_still_being_made_durable_when_the_round_is_aggregated_is_left_out(make, monkeypatch):
    service = make().service
    held = HeldCommits(monkeypatch, "late")
    counted = [(4, arrays(41, 1)[0]), (1, arrays(42, 1)[0])]
    for number, result in enumerate(counted):
        await contribute(service, f"p{number}", *result)
    late = start_upload(service, "late", 9, arrays(43, 1)[0])
    await wait_until(lambda: "late" in held.reached)
    await drain_worker(service)

    await within(service.aggregate(0, ["p0", "p1"]))
    held.release("late")
    with pytest.raises(Refusal) as refused:
        await within(late)

    assert refused.value.code == ErrorCode.ROUND_ENDED
    assert_model_equals(service.model.path, weighted_average(counted))
    await drain(service)
    assert round_files(Path(service.store.state_dir), 0) == []  # superseded, and the late one not kept


@pytest_twisted.ensureDeferred
async def test_an_upload_that_cannot_be_made_durable_leaves_the_sum(make, monkeypatch, logged_errors):
    service = make().service
    kept = (2, arrays(44, 1)[0])
    await contribute(service, "p0", *kept)
    store_commit = ModelStore.commit_result

    def failing(store: ModelStore, partial: str, round_number: int, participant_id: str) -> str:
        if participant_id == "broken":
            raise OSError(28, "No space left on device")
        return store_commit(store, partial, round_number, participant_id)

    monkeypatch.setattr(ModelStore, "commit_result", failing)
    with pytest.raises(OSError):
        await within(start_upload(service, "broken", 7, arrays(45, 1)[0]))

    assert service.status()["accepted"] == 1
    await within(service.aggregate(0, ["p0"]))
    assert_model_equals(service.model.path, weighted_average([kept]))


@pytest_twisted.ensureDeferred
async def test_restart_recovers_the_accepted_results(make, tmp_path):
    results = dict(zip(["p1", "p2", "p3"], zip([5, 0, 11], arrays(19, 3, shape=(2, 3, 4)))))

    # Without a restart, as the reference.
    control = make(tmp_path / "control").service
    for participant_id, (samples, weights) in results.items():
        await contribute(control, participant_id, samples, weights)
    await within(control.aggregate(0))
    reference = np.load(control.model.path)

    state = tmp_path / "restarted"
    first = make(state)
    for participant_id, (samples, weights) in results.items():
        await contribute(first.service, participant_id, samples, weights)
    assert len(first.coordinator.calls) == 3
    first.service.stopService()

    second = make(state)
    assert second.service.status()["accepted"] == 3
    answer = await within(second.service.sync(0, ["p1", "p2", "p3"], {}))
    assert answer == {"model_round": 0, "missing": []}
    await within(second.service.aggregate(0))
    assert second.coordinator.calls == []
    restarted = np.load(second.service.model.path)
    np.testing.assert_array_equal(restarted, reference)
    assert_model_equals(second.service.model.path, weighted_average(list(results.values())))


def test_removing_superseded_files_touches_only_older_rounds(tmp_path):
    store = ModelStore(str(tmp_path))
    store.load()
    names = ["model-1.npy", "model-2.npy.tmp", "model-3.npy", "model-4.npy.tmp", "aggregator.json", "model-x.npy"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    for number in (1, 2, 3, 4):
        (tmp_path / f"round-{number}").mkdir()
        (tmp_path / f"round-{number}" / "a.result").write_bytes(b"x")

    store.remove_superseded(3)

    left = sorted(os.listdir(tmp_path))
    assert left == ["aggregator.json", "model-3.npy", "model-4.npy.tmp", "model-x.npy", "round-3", "round-4"]
    assert os.listdir(tmp_path / "round-3") == ["a.result"]


@pytest_twisted.ensureDeferred
async def test_a_left_over_partial_upload_is_deleted_at_start_up(make, tmp_path):
    first = make()
    kept = arrays(20, 1)[0]
    await contribute(first.service, "p1", 4, kept)
    first.service.admit("p2", "t2", 0)
    broken = first.service.begin_upload("p2", "t2")
    broken.write(encode_local_result(4, arrays(21, 1)[0])[:100])
    partial = broken.path
    await drain(first.service)  # the partial file is created on a disk thread
    assert os.path.exists(partial)
    first.service.stopService()
    # As after a crash: the partial upload is still on disk.
    leftover = first.store.partial_path(0, "p3")
    Path(leftover).write_bytes(b"half an upload")

    second = make()
    assert not os.path.exists(leftover)
    assert not os.path.exists(partial)
    assert second.service.status()["accepted"] == 1
    assert round_files(tmp_path, 0) == [os.path.basename(second.store.result_path(0, "p1"))]
    await within(second.service.sync(0, ["p1"], {}))
    await within(second.service.aggregate(0))
    assert_model_equals(second.service.model.path, kept)


# -- what the aggregator must refuse, even between the HTTP layer's checks --------------------


@pytest_twisted.ensureDeferred
async def test_a_result_of_another_float_width_than_the_rounds_is_counted(make):
    """Any float width is accepted and converted; before a model the widest width is the model's."""
    made = make()
    service = made.service
    first, second = arrays(22, 2)
    await contribute(service, "p1", 1, first)
    service.admit("p2", "t2", 0)
    await upload(service, "p2", "t2", 3, second.astype(">f8"))
    await within(service.aggregate(0))
    await drain(service)  # see IDLE_WORKER
    assert [call.participant_id for call in made.coordinator.calls] == ["p1", "p2"]
    assert_model_equals(service.model.path, weighted_average([(1, first.astype(np.float64)), (3, second)]))


@pytest_twisted.ensureDeferred
async def test_an_upload_begun_right_after_an_aggregation_is_checked_against_the_new_model(make, logged_errors):
    logged_errors["expected"] = True
    made = make()
    service = made.service
    await contribute(service, "p1", 1, arrays(23, 1, shape=(3, 5))[0])
    await within(service.aggregate(0))
    # No drain: the coordinator may admit and the participant upload at once.
    service.admit("p2", "t2", 1)
    outcome: Any = None
    try:
        await upload(service, "p2", "t2", 3, arrays(24, 1, shape=(5, 3))[0])
    except Refusal as refusal:
        outcome = refusal
    await drain(service)  # see IDLE_WORKER
    assert isinstance(outcome, Refusal) and outcome.code == ErrorCode.UNACCEPTABLE_WEIGHTS
    assert service.status()["accepted"] == 0
    assert [call.participant_id for call in made.coordinator.calls] == ["p1"]


# -- the PB edge -----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_refusals_cross_the_pb_edge_with_their_code(make):
    from xaind.aggregator.coordinator_link import AggregatorMind, RefusedByAggregator, refusal_code

    service = make().service
    mind = AggregatorMind(service)
    with pytest.raises(RefusedByAggregator) as refused:
        mind.remote_admit("p1", "t1", 3)
    assert refused.value.code == ErrorCode.WRONG_ROUND
    assert refusal_code(str(refused.value)) == ErrorCode.WRONG_ROUND
    with pytest.raises(RefusedByAggregator) as refused:
        await within(mind.remote_aggregate(0, ["p1"]))
    assert refusal_code(str(refused.value)) == ErrorCode.RESULTS_MISSING
    assert await within(mind.remote_sync(0, None, {})) == {"model_round": 0, "missing": []}
    assert refusal_code("a message without a code") is None
    await drain(service)


def test_admissions_in_one_call_are_answered_each_on_its_own(make):
    from xaind.aggregator.coordinator_link import AggregatorMind, RefusedByAggregator, refusal_code

    service = make().service
    mind = AggregatorMind(service)
    answers = mind.remote_admit_many([["p1", "t1", 0], ["p2", "t2", 3], "junk", ["p3", "t3", 0]])
    assert [None if answer is None else refusal_code(answer) for answer in answers] == [
        None,
        ErrorCode.WRONG_ROUND,
        ErrorCode.BAD_REQUEST,
        None,
    ]
    service.authorize("p1", "t1")
    service.authorize("p3", "t3")
    with pytest.raises(RefusedByAggregator) as refused:
        mind.remote_admit_many("not a list")
    assert refused.value.code == ErrorCode.BAD_REQUEST


# -- the weights spec: fixed by a complete result, never by an upload still arriving ---------------


@pytest_twisted.ensureDeferred
async def test_a_trickled_upload_of_another_shape_locks_no_one_out(make, tmp_path):
    """Issue 11, finding 4: a header of another shape, its body trickled, made every honest upload a 422."""
    made = make()
    service = made.service
    trickled_body = encode_local_result(5, np.ones((7,), dtype=np.float32))
    service.admit("mallory", "tm", 0)
    trickled = service.begin_upload("mallory", "tm")
    trickled.write(trickled_body[:200])  # the header, and a little of the body: the connection stays open
    assert trickled.refusal is None and trickled.parser.header is not None
    honest = arrays(31, 2)
    await contribute(service, "p1", 2, honest[0])  # accepted: the trickled header fixed nothing
    # The spec is fixed now: the trickled upload is refused (answered at its next chunk or its end) and forgotten.
    assert trickled.refusal is not None and trickled.refusal.code == ErrorCode.UNACCEPTABLE_WEIGHTS
    assert "weights of shape (7,) refused: this round takes weights of shape (3, 5)" in str(trickled.refusal)
    trickled.write(trickled_body[200:201])
    with pytest.raises(Refusal) as refused:
        await within(trickled.finish())
    assert refused.value.code == ErrorCode.UNACCEPTABLE_WEIGHTS
    await within(service.settled())  # its files are removed on a disk thread
    assert not os.path.exists(trickled.path)
    await contribute(service, "p2", 6, honest[1])
    await within(service.aggregate(0))
    await drain(service)  # see IDLE_WORKER
    assert [call.participant_id for call in made.coordinator.calls] == ["p1", "p2"]
    assert_model_equals(service.model.path, weighted_average([(2, honest[0]), (6, honest[1])]))
    assert service.status()["uploading"] == 0


@pytest_twisted.ensureDeferred
async def test_results_recovered_before_the_first_aggregation_fix_the_spec(make, tmp_path):
    """Else a complete upload of another shape would fix it, and the backend could not fold both."""
    state = tmp_path / "restarted"
    kept = arrays(32, 1, shape=(2, 3))[0]
    first = make(state)
    await contribute(first.service, "p1", 4, kept)
    first.service.stopService()

    second = make(state)
    assert second.service.spec is not None and second.service.spec.shape == (2, 3)
    second.service.admit("p2", "t2", 0)
    with pytest.raises(Refusal) as refused:
        await upload(second.service, "p2", "t2", 1, arrays(33, 1, shape=(3, 2))[0])
    assert refused.value.code == ErrorCode.UNACCEPTABLE_WEIGHTS
    await within(second.service.sync(0, ["p1"], {}))
    await within(second.service.aggregate(0))
    await drain(second.service)  # see IDLE_WORKER
    assert_model_equals(second.service.model.path, weighted_average([(4, kept)]))


@pytest_twisted.ensureDeferred
async def test_upload_files_are_created_off_the_reactor_thread(make, monkeypatch):
    """Creating a file waits for the journal, which other uploads' fsyncs keep busy: never on the reactor."""
    from xaind.aggregator import upload as upload_module

    real_open = open
    threads: list[str] = []

    def recording_open(path, *args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(upload_module, "open", recording_open, raising=False)
    service = make().service
    await contribute(service, "p1", 3, arrays(50, 1)[0])
    assert len(threads) == 2 and threading.main_thread().name not in threads, threads  # the file and its reader


@pytest_twisted.ensureDeferred
async def test_an_upload_after_one_broken_off_has_a_file_of_its_own(make):
    """The broken-off upload's files are removed on a disk thread, maybe after the next one began: never the next one's."""
    service = make().service
    service.admit("p1", "t1", 0)
    broken = service.begin_upload("p1", "t1")
    broken.write(b"\x05")
    broken.abort()
    again = service.begin_upload("p1", "t1")
    assert again.path != broken.path
    data = encode_local_result(3, arrays(60, 1)[0])
    again.write(data)
    await within(again.finish())
    await drain(service)
    assert service.status()["accepted"] == 1
    assert not os.path.exists(broken.path)
