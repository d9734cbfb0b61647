"""Two coordinator processes on one Redis, sharing their ports, train to the end: also when one is killed.

Real parts only: a `redis-server` (xaind.testing.redis), two `twistd -n
xain-coordinator` with the same `state.redis` listening with
`xaind-tcp:...:reusePort=yes` on the same ports, one `twistd -n
xain-aggregator`, and participants speaking plain HTTP from threads of this
test, each request on a new connection, so the kernel spreads them over
both processes (rendez-vous at one, heartbeats and start of training at
either). Every global model is checked against the sample-weighted
average of the results the leader counted, computed here with numpy; the
leader's published events show that no participant is selected twice in a
round and that every result counts once.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xaind.testing import redis as redis_testing
from xaind.testing.cluster import Cluster, cluster
from xaind.testing.wire import encode_local_result
from xaind.tools import daemons
from xaind.tools.daemons import get_json

pytestmark = pytest.mark.skipif(redis_testing.skip_reason() is not None, reason=redis_testing.skip_reason() or "")

SECRET = "redis-cluster-test-secret"
HEARTBEAT_TIMEOUT = 5.0
#: A start of training forwarded to a leader that dies is answered refused after this (+ 1 s): below the
#: heartbeat timeout, since these participants do not heartbeat while they wait for it.
ADMIT_TIMEOUT = 2.0
#: How a participant paces its heartbeats (its own behaviour, not a synchronisation).
HEARTBEAT_PERIOD = 0.1
HTTP_TIMEOUT = 10.0
#: Bound on a whole training.
TRAINING_TIMEOUT = 120.0
SHAPE = (3, 4)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[redis_testing.RedisServer]:
    with redis_testing.RedisServer() as server:
        yield server


@pytest.fixture
def redis(redis_server: redis_testing.RedisServer) -> Iterator[redis_testing.RedisServer]:
    """The module's server, emptied for each test."""
    redis_server.client().flushall()
    yield redis_server


class Participant(threading.Thread):
    """Heartbeats; trains when told `round`; uploads weights of its own; stops at `finish`.

    Connection errors (a coordinator killed under it) are retried, as the SDK does.
    """

    def __init__(self, index: int, url: str) -> None:
        super().__init__(name=f"participant-{index}", daemon=True)
        self.index = index
        self.url = url
        self.id: str | None = None
        #: round -> (samples, weights) of its last upload for that round.
        self.uploads: dict[int, tuple[int, np.ndarray]] = {}
        #: round -> the global model it downloaded to train that round.
        self.downloads: dict[int, bytes] = {}
        self.finished = False
        self.failure: str | None = None
        #: What it is doing (shown when a test fails).
        self.step = "starting"
        self.stopping = threading.Event()
        self.rng = np.random.default_rng(1000 + index)

    def __repr__(self) -> str:
        return f"<{self.name} {self.id} {self.step!r} finished={self.finished} failure={self.failure}>"

    def _get(self, path: str) -> tuple[int, Any]:
        self.step = f"GET {path.split('/')[1]}"
        deadline = time.monotonic() + TRAINING_TIMEOUT
        while not self.stopping.is_set():
            try:
                return get_json(f"{self.url}{path}", timeout=HTTP_TIMEOUT)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                self.stopping.wait(0.1)
        raise InterruptedError("stopped")

    def run(self) -> None:
        try:
            code, answer = self._get("/rendez_vous")
            assert code == 200 and answer["ok"] is True, answer
            self.id = answer["id"]
            while not self.stopping.is_set():
                code, beat = self._get(f"/heartbeat/{self.id}")
                assert code == 200, beat
                if beat["state"] == "finish":
                    self.finished = True
                    return
                if beat["state"] == "reject":
                    self.failure = f"rejected: {beat}"
                    return
                self.step = f"heartbeat answered {beat}"
                if beat["state"] == "round":
                    self._train(int(beat["round"]))
                self.stopping.wait(HEARTBEAT_PERIOD)
        except InterruptedError:
            return
        except BaseException as error:  # noqa: BLE001 - reported by the test
            self.failure = repr(error)

    def _train(self, round_number: int) -> None:
        code, answer = self._get(f"/start_training/{self.id}")
        if code != 200 or not answer["ok"]:
            return
        url, token = answer["url"], answer["token"]
        self.step = f"download {round_number}"
        with urllib_request(f"{url}/{self.id}/{token}") as body:
            self.downloads[round_number] = body
        samples = 10 + 7 * self.index + round_number
        weights = self.rng.uniform(0.5, 2.5, SHAPE).astype(np.float32)
        self.uploads[round_number] = (samples, weights)
        self.step = f"upload {round_number}"
        try:
            post(f"{url}/{self.id}/{token}", encode_local_result(samples, weights))
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # the aggregator counts it or the round asks again


class urllib_request:  # noqa: N801 - a small context manager, named as what it does
    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> bytes:
        import urllib.request

        with urllib.request.urlopen(self.url, timeout=HTTP_TIMEOUT) as response:
            return response.read()

    def __exit__(self, *exc_info: object) -> None:
        return None


def post(url: str, body: bytes) -> int:
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status
    except urllib.error.HTTPError as error:
        with error:
            return error.code


def weighted_average(results: list[tuple[int, np.ndarray]]) -> np.ndarray:
    total = sum(samples for samples, _ in results)
    accumulated = sum(np.float64(samples) * weights.astype(np.float64) for samples, weights in results)
    return (accumulated / np.float64(total)).astype(np.float32)


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def start(directory: Path, redis: redis_testing.RedisServer, rounds: int, participants: int) -> Any:
    return cluster(
        directory,
        redis,
        secret=SECRET,
        federated_learning={"rounds": rounds, "min_clients": participants, "heartbeat_timeout": HEARTBEAT_TIMEOUT, "training_timeout": 60.0},
        admit_timeout=ADMIT_TIMEOUT,
    )


def run_participants(fed: Cluster, count: int) -> list[Participant]:
    participants = [Participant(index, fed.http_url) for index in range(count)]
    for participant in participants:
        participant.start()
    return participants


def finish(participants: list[Participant]) -> None:
    deadline = time.monotonic() + TRAINING_TIMEOUT
    for participant in participants:
        participant.join(max(0.1, deadline - time.monotonic()))
    for participant in participants:
        participant.stopping.set()
        participant.join(HTTP_TIMEOUT + 1)
    problems = [(participant.name, participant.failure) for participant in participants if not participant.finished]
    assert not problems, problems


def check_training(fed: Cluster, participants: list[Participant], rounds: int) -> None:
    """Exact models, each result counted once, no one selected twice in a round."""
    by_id = {participant.id: participant for participant in participants}
    counted = fed.events.counted_by_round()
    assert sorted(counted) == list(range(rounds)), counted
    expected: np.ndarray | None = None
    for round_number in range(rounds):
        ids = counted[round_number]
        assert len(ids) == len(set(ids)) == len(participants), (round_number, ids)
        if expected is not None:
            for participant_id in ids:
                np.testing.assert_array_equal(load_npy(by_id[participant_id].downloads[round_number]), expected)
        expected = weighted_average([by_id[participant_id].uploads[round_number] for participant_id in ids])
    for round_number, selected in fed.events.selected_by_round().items():
        assert len(selected) == len(set(selected)), (round_number, selected)
    final = np.load(fed.aggregator_state / f"model-{rounds}.npy", allow_pickle=False)
    np.testing.assert_allclose(final, expected, rtol=1e-6, atol=0)
    state = fed.round_state()
    assert (state["round"], state["phase"]) == (str(rounds), "complete"), state


def wait_for_round(fed: Cluster, participants: list[Participant], round_number: int) -> None:
    daemons.wait_until(lambda: int(fed.round_state().get("round", 0)) >= round_number, TRAINING_TIMEOUT, f"round {round_number}: {participants}")


def start_all(fed: Cluster) -> None:
    fed.start_coordinator()
    fed.start_coordinator()
    fed.start_aggregator(SECRET)
    fed.leader().wait_for_log("aggregator attached")


def test_two_coordinators_share_a_training_to_the_exact_end(tmp_path: Path, redis: redis_testing.RedisServer) -> None:
    rounds, count = 3, 4
    with start(tmp_path, redis, rounds, count) as fed:
        start_all(fed)
        participants = run_participants(fed, count)
        finish(participants)
        check_training(fed, participants, rounds)
        for daemon in fed.coordinators:
            assert "Traceback" not in daemon.log_text, fed.describe()


def test_the_leader_killed_mid_training_loses_nothing(tmp_path: Path, redis: redis_testing.RedisServer) -> None:
    rounds, count = 4, 4
    with start(tmp_path, redis, rounds, count) as fed:
        start_all(fed)
        first = fed.leader()
        participants = run_participants(fed, count)
        wait_for_round(fed, participants, 2)
        assert first.kill() == -9
        second = fed.leader()
        assert second is not first
        finish(participants)
        check_training(fed, participants, rounds)
        assert "leading from the shared state: round 2" in second.log_text or "leading from the shared state: round 3" in second.log_text, second.log_text


def test_the_follower_killed_mid_training_changes_nothing(tmp_path: Path, redis: redis_testing.RedisServer) -> None:
    rounds, count = 4, 4
    with start(tmp_path, redis, rounds, count) as fed:
        start_all(fed)
        leader = fed.leader()
        follower = next(daemon for daemon in fed.coordinators if daemon is not leader)
        participants = run_participants(fed, count)
        wait_for_round(fed, participants, 2)
        assert follower.kill() == -9
        finish(participants)
        check_training(fed, participants, rounds)
        assert fed.leader() is leader


def test_a_leader_that_loses_its_lease_stops_at_once_and_another_leads(tmp_path: Path, redis: redis_testing.RedisServer) -> None:
    """Paused past its lease (SIGSTOP), the leader wakes up to find it lost: it exits 70 with one critical line."""
    import signal

    with start(tmp_path, redis, 2, 2) as fed:
        fed.start_coordinator()
        fed.start_coordinator()
        first = fed.leader()
        assert first.process is not None
        first.process.send_signal(signal.SIGSTOP)
        try:
            second = daemons.wait_until(lambda: next((daemon for daemon in [fed.leader()] if daemon is not first), None), 20, "another leader")
        finally:
            first.process.send_signal(signal.SIGCONT)
        assert second is not first
        daemons.wait_until(lambda: not first.running, 20, "the old leader to exit")
        assert first.process.returncode == 70
        lost = [message for message in first.log_messages("xaind.coordinator.cluster") if message.startswith("lost the leader's lease")]
        assert len(lost) == 1, first.log_text
        assert "leading from the shared state" not in first.log_text.split("lost the leader's lease")[1]
        assert second.running


@pytest.mark.parametrize("kill_leader", [False, True], ids=["steady", "leader-killed"])
def test_sdk_participants_over_pb_get_their_pushes_from_either_coordinator(tmp_path: Path, redis: redis_testing.RedisServer, kill_leader: bool) -> None:
    """`xain-dummy-participants --transport pb` (xaind.sdk): selections pushed by whichever process holds the connection.

    Every participant uploads linspace(-1, 1), so every global model is
    exactly that; the leader's events show every round counting each
    participant once.
    """
    import re
    import subprocess

    from xaind.tools.dummy_participants import MODEL_SIZES

    rounds, count = 4, 4
    with start(tmp_path, redis, rounds, count) as fed:
        start_all(fed)
        first = fed.leader()
        command = [*daemons.dummy_participants_command(), "-n", str(count), "--heartbeat-period", "0.2", "--transport", "pb",
                   "--coordinator-url", f"pb://127.0.0.1:{fed.pb_port}"]
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as tool:
            try:
                if kill_leader:
                    daemons.wait_until(lambda: int(fed.round_state().get("round", 0)) >= 2, TRAINING_TIMEOUT, "round 2")
                    assert first.kill() == -9
                output, _ = tool.communicate(timeout=TRAINING_TIMEOUT)
            finally:
                if tool.poll() is None:
                    tool.kill()
                    tool.wait(10)
        assert tool.returncode == 0, output
        assert re.findall(r"^summary: (\d+) participant\(s\) finished, (\d+) failed", output, re.MULTILINE) == [(str(count), "0")], output
        counted = fed.events.counted_by_round()
        assert sorted(counted) == list(range(rounds)), counted
        assert all(len(ids) == len(set(ids)) == count for ids in counted.values()), counted
        final = np.load(fed.aggregator_state / f"model-{rounds}.npy", allow_pickle=False)
        elements = max(1, MODEL_SIZES["1kB"] // 4)
        np.testing.assert_allclose(final, np.linspace(-1.0, 1.0, elements, dtype=np.float32), rtol=1e-6, atol=1e-7)
        assert fed.round_state()["phase"] == "complete"


def test_unchanged_legacy_sdk_participants_train_on_two_coordinators(tmp_path: Path, redis: redis_testing.RedisServer) -> None:
    """xain-sdk 0.8.0, unchanged, against two coordinators behind one port: exit 0, every model the exact average.

    Its `requests` session keeps a connection, so each participant mostly talks
    to one process; the rendez-vous, the heartbeats and the starts of training
    of the three spread over both.
    """
    pytest.importorskip("xain_sdk", reason="xain-sdk 0.8.0 comes from PyPI (pip install -e '.[test]')")
    from test_end_to_end import assert_legacy_downloads_are_the_averages, legacy_participants, wait_for_clean_exits

    rounds, count = 3, 3
    participants_dir = tmp_path / "participants"
    participants_dir.mkdir()
    with start(tmp_path / "cluster", redis, rounds, count) as fed:
        start_all(fed)
        with legacy_participants(fed, participants_dir, count) as participants:  # type: ignore[arg-type]
            wait_for_clean_exits(participants, 60.0)
            uploads = [participant.records("upload") for participant in participants]
            downloads = [participant.records("download") for participant in participants]
            assert all(len(made) == rounds for made in uploads), [participant.describe() for participant in participants]
            expected = assert_legacy_downloads_are_the_averages(participants, uploads, downloads, rounds)
        last = weighted_average([(made[-1]["samples"], np.array(made[-1]["weights"], dtype=np.float32)) for made in uploads])
        final = np.load(fed.aggregator_state / f"model-{rounds}.npy", allow_pickle=False)
        np.testing.assert_allclose(final, last, rtol=1e-6, atol=0)
        assert expected is not None
        assert fed.round_state()["phase"] == "complete"
