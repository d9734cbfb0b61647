"""Whole federated trainings: a real coordinator and a real aggregator, as operators run them.

Both daemons are real `twistd` processes (`xaind.tools.daemons.federation`)
on loopback ports, each with its own state directory under `tmp_path`.
Participants are either plain-HTTP participants driven step by step by the
test (urllib, in this process, each with a heartbeat thread of its own), or unchanged
`xain-sdk` 0.8.0 participants run as subprocesses. Every global model is
checked against the sample-weighted average computed here with numpy from
what the participants actually uploaded.

Wiring the two daemons (see `daemons.free_loopback_port`): the coordinator
starts first on OS-chosen ports; its `aggregator.url` names a loopback port
reserved beforehand; the aggregator then listens on exactly that port and
connects to the coordinator's PB port learnt from the coordinator's log.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from xaind.testing.wire import encode_local_result
from xaind.tools import daemons
from xaind.tools.daemons import get_json


PB_SECRET = "end-to-end-test-secret"

#: Short timeouts, so that a lost participant or a stuck step shows quickly.
HEARTBEAT_TIMEOUT = 2.0
ADMIT_TIMEOUT = 5.0
#: How a participant paces its heartbeats (its own behaviour, not a synchronisation).
HEARTBEAT_PERIOD = 0.2
#: Bound on any one awaited step of a training (a round, a re-link, a process exit).
STEP_TIMEOUT = 20.0
#: Per-request timeout of the test's own HTTP client.
HTTP_TIMEOUT = 10.0

SHAPE = (4, 5)


# -- the model: weights, results, the average that the aggregator must compute ------------------


def new_weights(rng: np.random.Generator, start: np.ndarray | None) -> np.ndarray:
    """One "training": float32 weights of SHAPE, kept in [0.5, 2.5] (no cancellation near 0)."""
    base = np.ones(SHAPE, dtype=np.float32) if start is None else start
    return (0.5 * base.astype(np.float64) + rng.uniform(0.25, 1.25, SHAPE)).astype(np.float32)


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def weighted_average(results: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """sum(n_i * x_i) / sum(n_i), in float64, as float32 (the uploads' dtype)."""
    assert results, "no results to average"
    total = sum(samples for samples, _ in results)
    assert total > 0
    accumulated = sum(np.float64(samples) * weights.astype(np.float64) for samples, weights in results)
    return (accumulated / np.float64(total)).astype(np.float32)


def assert_model_equals(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    assert actual.dtype == np.float32, f"{what}: dtype {actual.dtype}"
    assert actual.shape == SHAPE, f"{what}: shape {actual.shape}"
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=0, err_msg=what)


# -- the two daemons, wired together ----------------------------------------------------------------


@dataclass
class Federation(daemons.Federation):
    """A running coordinator and aggregator that know each other (see the module docstring)."""

    request_timeout: float = HTTP_TIMEOUT

    def global_model_on_disk(self) -> tuple[int, np.ndarray | None]:
        """The aggregator's committed global model: (round, weights), read from its state directory."""
        document = json.loads((self.aggregator_state / "aggregator.json").read_text(encoding="utf-8"))
        model_file = document["model_file"]
        if model_file is None:
            return document["model_round"], None
        return document["model_round"], np.load(self.aggregator_state / model_file, allow_pickle=False)


#: Start a coordinator, then an aggregator wired to it (`aggregation`: its section); stop both (and
#: any restart) at exit. See `xaind.tools.daemons.federation`.
federation = functools.partial(
    daemons.federation, secret=PB_SECRET, heartbeat_timeout=HEARTBEAT_TIMEOUT, admit_timeout=ADMIT_TIMEOUT, call_timeout=10.0, kind=Federation
)


# -- a participant speaking plain HTTP, driven by the test -----------------------------------------


class ParticipantGone(AssertionError):
    """A participant's heartbeat failed or was answered `reject`."""


def http_get(url: str) -> tuple[int, bytes, str | None]:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            return response.status, response.read(), response.headers.get("content-type")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), error.headers.get("content-type")


def http_post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


class HttpParticipant:
    """A participant that speaks the seed's HTTP API with urllib.

    After its rendez-vous its heartbeat runs in a thread of its own every
    HEARTBEAT_PERIOD, whatever the test does meanwhile with this participant
    (starting training, downloading, "training", uploading), and stops for good
    at `finish` or `reject`, as a participant does. The test reads the answers
    to learn of selections: `mark()` then `wait_for_heartbeat(..., since=mark)`
    only considers answers to heartbeats sent after the mark.
    """

    def __init__(self, name: str, coordinator_url: str) -> None:
        self.name = name
        self.coordinator_url = coordinator_url
        self.id: str | None = None
        self._answers: list[tuple[int, dict[str, Any]]] = []  # (index of the request, answer)
        self._sent = 0
        self._failure: BaseException | None = None
        self._condition = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- coordinator

    def rendez_vous(self) -> dict[str, Any]:
        code, answer = get_json(f"{self.coordinator_url}/rendez_vous", timeout=HTTP_TIMEOUT)
        assert code == 200, answer
        assert set(answer) == {"id", "ok"}, answer
        self.id = answer["id"]
        assert isinstance(self.id, str) and self.id
        self._thread = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{self.name}", daemon=True)
        self._thread.start()
        return answer

    def _heartbeat_loop(self) -> None:
        try:
            while not self._stop.is_set():
                with self._condition:
                    index = self._sent
                    self._sent += 1
                code, answer = get_json(f"{self.coordinator_url}/heartbeat/{self.id}", timeout=HTTP_TIMEOUT)
                with self._condition:
                    if code != 200:
                        raise ParticipantGone(f"{self.name}: heartbeat answered {code} {answer}")
                    self._answers.append((index, answer))
                    self._condition.notify_all()
                if answer["state"] in ("finish", "reject"):
                    return
                self._stop.wait(HEARTBEAT_PERIOD)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting test
            with self._condition:
                self._failure = error
                self._condition.notify_all()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(HTTP_TIMEOUT + 1)

    def mark(self) -> int:
        """Heartbeats sent from now on have an index >= the mark."""
        with self._condition:
            return self._sent

    def answers(self, since: int = 0) -> list[dict[str, Any]]:
        with self._condition:
            return [answer for index, answer in self._answers if index >= since]

    def latest(self, since: int = 0) -> dict[str, Any] | None:
        answers = self.answers(since)
        return answers[-1] if answers else None

    def wait_for_heartbeat(self, wanted: Callable[[dict[str, Any]], bool], what: str, *, since: int = 0, timeout: float = STEP_TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._condition:
            while True:
                for index, answer in self._answers:
                    if index >= since and wanted(answer):
                        return answer
                if self._failure is not None:
                    raise ParticipantGone(f"{self.name} waiting for {what}: {self._failure!r}") from self._failure
                last = self._answers[-1][1] if self._answers else None
                if last is not None and last["state"] in ("finish", "reject"):
                    # Final: no heartbeat follows it, whether it came before `since` or after.
                    if wanted(last):
                        return last
                    raise ParticipantGone(f"{self.name} waiting for {what}: heartbeat answered {last}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.name}: timed out after {timeout} s waiting for {what}; last heartbeat {last}")
                self._condition.wait(min(remaining, 0.5))

    def wait_for_round(self, round_number: int, *, since: int = 0) -> None:
        expected = {"state": "round", "round": round_number}
        self.wait_for_heartbeat(lambda answer: answer == expected, f"selection for round {round_number}", since=since)

    def wait_for_finish(self, *, since: int = 0) -> None:
        self.wait_for_heartbeat(lambda answer: answer == {"state": "finish", "round": None}, "finish", since=since)

    def start_training(self) -> dict[str, Any]:
        code, answer = get_json(f"{self.coordinator_url}/start_training/{self.id}", timeout=HTTP_TIMEOUT + ADMIT_TIMEOUT)
        assert code == 200, answer
        assert set(answer) == {"ok", "url", "token"}, answer
        return answer

    # -- aggregator

    def download(self, url: str, token: str) -> bytes:
        code, body, content_type = http_get(f"{url}/{self.id}/{token}")
        assert code == 200, (self.name, code, body)
        assert content_type == "application/octet-stream", content_type
        return body

    def upload(self, url: str, token: str, samples: int, weights: np.ndarray) -> tuple[int, Any]:
        return http_post(f"{url}/{self.id}/{token}", encode_local_result(samples, weights))


@contextlib.contextmanager
def http_participants(fed: Federation, count: int) -> Iterator[list[HttpParticipant]]:
    participants = [HttpParticipant(chr(ord("A") + index), fed.http_url) for index in range(count)]
    try:
        yield participants
    finally:
        for participant in participants:
            participant.stop()


@dataclass
class Training:
    """One participant's part of a round, as the coordinator granted it."""

    url: str
    token: str
    downloaded: bytes = b""


def begin_training(fed: Federation, participant: HttpParticipant) -> Training:
    answer = participant.start_training()
    assert answer["ok"] is True, (participant.name, answer)
    assert answer["url"] == fed.aggregator_url
    assert isinstance(answer["token"], str) and answer["token"]
    training = Training(url=answer["url"], token=answer["token"])
    training.downloaded = participant.download(training.url, training.token)
    return training


def assert_download(downloaded: bytes, expected: np.ndarray | None, what: str) -> None:
    if expected is None:
        assert downloaded == b"", f"{what}: {len(downloaded)} bytes before the first aggregation"
    else:
        assert_model_equals(load_npy(downloaded), expected, what)


# -- 1. plain-HTTP participants, three full rounds ------------------------------------------------


def test_three_rounds_with_http_participants(tmp_path: Path) -> None:
    """3 participants, 3 rounds: every global model is the exact sample-weighted average of the round."""
    rounds = 3
    rng = np.random.default_rng(20240601)
    with federation(tmp_path, rounds=rounds, min_clients=3) as fed, http_participants(fed, 3) as participants:
        for participant in participants:
            assert participant.rendez_vous()["ok"] is True

        expected: np.ndarray | None = None  # the global model before round 0: none
        for round_number in range(rounds):
            for participant in participants:
                participant.wait_for_round(round_number)
            trainings = {}
            for participant in participants:
                trainings[participant.name] = begin_training(fed, participant)
                assert_download(
                    trainings[participant.name].downloaded, expected, f"global model {participant.name} got in round {round_number}"
                )

            results: list[tuple[int, np.ndarray]] = []
            # Upload in a different order each round; one participant "trains"
            # longer than the heartbeat timeout in round 1: its heartbeat goes on.
            order = participants[round_number % len(participants) :] + participants[: round_number % len(participants)]
            for position, participant in enumerate(order):
                start = None if expected is None else load_npy(trainings[participant.name].downloaded)
                weights = new_weights(rng, start)
                samples = {"A": 12, "B": 29, "C": 47}[participant.name] + 3 * round_number + position
                if round_number == 1 and position == 0:
                    mark = participant.mark()
                    time.sleep(HEARTBEAT_TIMEOUT * 1.25)
                    beats = participant.answers(since=mark)
                    assert len(beats) >= 3, beats
                    # It holds its token, so it is told stand_by (never a stale `round`),
                    # and it stays selected: the long training is not mistaken for death.
                    assert all(beat == {"state": "stand_by", "round": None} for beat in beats), beats
                    assert get_json(f"{fed.http_url}/status")[1]["participants"]["selected"] >= 1
                code, answer = participant.upload(trainings[participant.name].url, trainings[participant.name].token, samples, weights)
                assert (code, answer) == (200, {"ok": True}), (participant.name, round_number)
                results.append((samples, weights))
                # Back to waiting: no heartbeat sent after the upload's 200 selects it for this round again.
                mark = participant.mark()
                participant.wait_for_heartbeat(
                    lambda beat: beat["state"] in ("stand_by", "round", "finish"), "a heartbeat after the upload", since=mark
                )
                assert {"state": "round", "round": round_number} not in participant.answers(since=mark)
            assert len({samples for samples, _ in results}) == len(results), "sample counts must differ"
            expected = weighted_average(results)

        for participant in participants:
            participant.wait_for_finish()
        model_round, final = fed.global_model_on_disk()
        assert model_round == rounds
        assert final is not None
        assert_model_equals(final, expected, "final global model")

        status = fed.status()
        assert (status["round"], status["rounds"], status["phase"]) == (rounds, rounds, "complete")
        # After the training: rendez-vous refused (still 200), every heartbeat says finish.
        code, answer = get_json(f"{fed.http_url}/rendez_vous")
        assert code == 200 and answer["ok"] is False
        assert get_json(f"{fed.http_url}/heartbeat/{answer['id']}") == (200, {"state": "finish", "round": None})
        assert get_json(f"{fed.http_url}/start_training/{participants[0].id}") == (200, {"ok": False, "url": None, "token": None})
        assert "Traceback" not in fed.coordinator.log_text + fed.aggregator.log_text, fed.describe()


def test_a_trickled_upload_of_another_shape_locks_no_one_out(tmp_path: Path) -> None:
    """Issue 11, finding 4: before the first aggregation, a header of another shape with a trickled
    body made every honest upload a 422 for as long as its connection lived. Now the first complete
    upload fixes the shape, and the trickled one is refused then (at its next byte)."""
    rng = np.random.default_rng(20261129)
    with federation(tmp_path, rounds=1, min_clients=3) as fed, http_participants(fed, 3) as participants:
        mallory, honest_b, honest_c = participants
        for participant in participants:
            assert participant.rendez_vous()["ok"] is True
        for participant in participants:
            participant.wait_for_round(0)
        trainings = {participant.name: begin_training(fed, participant) for participant in participants}

        other_shape = encode_local_result(5, np.ones((7, 3), dtype=np.float32))
        training = trainings[mallory.name]
        with socket.create_connection(("127.0.0.1", fed.aggregator_port), timeout=HTTP_TIMEOUT) as trickle:
            head = f"POST /{mallory.id}/{training.token} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(other_shape)}\r\n\r\n"
            trickle.sendall(head.encode() + other_shape[:200])  # the .npy header and a little data; the rest is held back

            results = []
            for samples, participant in ((29, honest_b), (47, honest_c)):
                weights = new_weights(rng, None)
                code, answer = participant.upload(trainings[participant.name].url, trainings[participant.name].token, samples, weights)
                assert (code, answer) == (200, {"ok": True}), participant.name
                results.append((samples, weights))

            trickle.sendall(other_shape[200:201])
            answer = read_http_answer(trickle)
        assert answer.startswith(b"HTTP/1.1 422 "), answer
        assert b'"code":"unacceptable_weights"' in answer.replace(b" ", b""), answer
        assert b"this round takes weights of shape (4, 5)" in answer, answer

        # Mallory's token still holds: an upload of the round's shape counts.
        weights = new_weights(rng, None)
        code, answer = mallory.upload(training.url, training.token, 12, weights)
        assert (code, answer) == (200, {"ok": True})
        results.append((12, weights))
        for participant in participants:
            participant.wait_for_finish()
        model_round, final = fed.global_model_on_disk()
        assert model_round == 1 and final is not None
        assert_model_equals(final, weighted_average(results), "global model")


def read_http_answer(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (bounded by the socket's timeout and a size)."""
    received = b""
    while len(received) < 2**16:
        chunk = connection.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


# -- 2. unchanged xain-sdk 0.8.0 participants ----------------------------------------------------

#: Why the test of the legacy participants skips where xain-sdk is not installed.
XAIN_SDK_MISSING = "xain-sdk 0.8.0 comes from PyPI (pip install -e '.[test]'); Debian has no package of it"

LEGACY_PARTICIPANT = textwrap.dedent(
    '''
    """A participant written against the unchanged xain-sdk 0.8.0, recording what it sees."""

    import io
    import json
    import logging
    import sys
    import time

    import numpy as np
    from xain_sdk import ParticipantABC, configure_logging, run_participant

    SHAPE = (4, 5)


    class RecordingParticipant(ParticipantABC):
        def __init__(self, index, record_path):
            self.index = index
            self.record_path = record_path
            self.rng = np.random.default_rng(1000 + index)
            self.trainings = 0

        def record(self, **entry):
            with open(self.record_path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry) + "\\n")

        def deserialize_training_input(self, data):
            if not data:
                self.record(kind="download", weights=None)
                return None
            weights = np.load(io.BytesIO(data), allow_pickle=False)
            self.record(kind="download", weights=weights.tolist(), dtype=weights.dtype.str)
            return weights

        def train_round(self, weights):
            time.sleep(0.05)
            base = np.ones(SHAPE, dtype=np.float32) if weights is None else weights
            self.trainings += 1
            new = (0.5 * base.astype(np.float64) + self.rng.uniform(0.25, 1.25, SHAPE)).astype(np.float32)
            return 10 * (self.index + 1) + self.trainings, new

        def serialize_training_result(self, result):
            samples, weights = result
            stream = io.BytesIO()
            np.save(stream, weights, allow_pickle=False)
            self.record(kind="upload", samples=samples, weights=weights.tolist())
            return samples.to_bytes(4, "big") + stream.getvalue()


    def main():
        coordinator_url, index, record_path, heartbeat_period = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")
        configure_logging()
        run_participant(RecordingParticipant(index, record_path), coordinator_url, heartbeat_period=heartbeat_period)
        print("participant finished", flush=True)


    if __name__ == "__main__":
        main()
    '''
)


@dataclass
class LegacyParticipant:
    index: int
    process: subprocess.Popen[bytes]
    record: Path
    output: Path

    def records(self, kind: str) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        entries = [json.loads(line) for line in self.record.read_text(encoding="utf-8").splitlines()]
        return [entry for entry in entries if entry["kind"] == kind]

    def describe(self) -> str:
        return f"participant {self.index} (exit {self.process.returncode}):\n{self.output.read_text(encoding='utf-8', errors='replace')}"


@contextlib.contextmanager
def legacy_participants(fed: Federation, directory: Path, count: int) -> Iterator[list[LegacyParticipant]]:
    """`count` xain-sdk 0.8.0 participants as subprocesses; any still running at exit is killed."""
    script = directory / "legacy_participant.py"
    script.write_text(LEGACY_PARTICIPANT, encoding="utf-8")
    started: list[LegacyParticipant] = []
    try:
        for index in range(count):
            output = directory / f"participant-{index}.out"
            record = directory / f"participant-{index}.jsonl"
            with open(output, "wb") as stream:
                process = subprocess.Popen(
                    [sys.executable, str(script), fed.http_url, str(index), str(record), str(HEARTBEAT_PERIOD)],
                    cwd=directory,
                    stdin=subprocess.DEVNULL,
                    stdout=stream,
                    stderr=subprocess.STDOUT,
                )
            started.append(LegacyParticipant(index, process, record, output))
        yield started
    finally:
        for participant in started:
            if participant.process.poll() is None:
                participant.process.kill()
            participant.process.wait(10)


#: How long the three legacy participants may take, from start to exit, for the whole training.
LEGACY_TIME_BOUND = 30.0


def assert_legacy_downloads_are_the_averages(
    participants: list[LegacyParticipant], uploads: list[list[dict]], downloads: list[list[dict]], rounds: int
) -> np.ndarray | None:
    """Round r's uploads make the global model every participant downloads in round r + 1; the last average."""
    expected: np.ndarray | None = None
    for round_number in range(rounds):
        for participant, got in zip(participants, downloads):
            entry = got[round_number]
            if expected is None:
                assert entry["weights"] is None, participant.describe()
            else:
                assert entry["dtype"] == np.dtype(np.float32).str
                assert_model_equals(
                    np.array(entry["weights"], dtype=np.float32),
                    expected,
                    f"global model participant {participant.index} got in round {round_number}",
                )
        expected = weighted_average(
            [(made[round_number]["samples"], np.array(made[round_number]["weights"], dtype=np.float32)) for made in uploads]
        )
    return expected


def wait_for_clean_exits(participants: list[LegacyParticipant], time_bound: float) -> None:
    """Every participant exits by itself within `time_bound`, cleanly; one that fails ends the test at once."""
    # (The others would wait for a failed one forever.)
    deadline = time.monotonic() + time_bound
    while None in [participant.process.poll() for participant in participants]:
        failed = [participant for participant in participants if participant.process.returncode not in (None, 0)]
        if failed or time.monotonic() > deadline:
            pytest.fail(
                ("a participant failed" if failed else f"participants still running after {time_bound} s")
                + "\n"
                + "\n".join(participant.describe() for participant in participants)
            )
        time.sleep(0.05)
    for participant in participants:
        assert participant.process.returncode == 0, participant.describe()
        output = participant.output.read_text(encoding="utf-8", errors="replace")
        # xain-sdk 0.8.0 also exits 0 when its heartbeat failed or was rejected:
        # only a clean run ends with "finish" and nothing else.
        assert "Traceback" not in output, participant.describe()
        assert "rejected" not in output and "error while sending heartbeat" not in output, participant.describe()
        assert "state changed: DONE" in output and output.rstrip().endswith("participant finished"), participant.describe()


def test_three_rounds_with_unchanged_legacy_sdk_participants(tmp_path: Path) -> None:
    """Unchanged xain-sdk 0.8.0 participants train 3 rounds and exit 0; every model is the exact average.

    Each participant records what it downloads and uploads (it cannot know
    the round): its k-th download must be the average of everyone's (k-1)-th
    uploads, and the final model the average of everyone's last upload.
    """
    # The participants run on this Python (sys.executable), so it must have xain-sdk.
    pytest.importorskip("xain_sdk", reason=XAIN_SDK_MISSING)
    rounds = 3
    participants_dir = tmp_path / "participants"
    participants_dir.mkdir()
    with federation(tmp_path, rounds=rounds, min_clients=3) as fed, legacy_participants(fed, participants_dir, 3) as participants:
        wait_for_clean_exits(participants, LEGACY_TIME_BOUND)

        uploads = [participant.records("upload") for participant in participants]
        downloads = [participant.records("download") for participant in participants]
        for participant, made in zip(participants, uploads):
            assert len(made) == rounds, participant.describe()
        for participant, got in zip(participants, downloads):
            assert len(got) == rounds, participant.describe()

        assert_legacy_downloads_are_the_averages(participants, uploads, downloads, rounds)

        model_round, final = fed.global_model_on_disk()
        assert model_round == rounds
        assert final is not None
        last_uploads = [(made[-1]["samples"], np.array(made[-1]["weights"], dtype=np.float32)) for made in uploads]
        assert_model_equals(final, weighted_average(last_uploads), "final global model")
        status = fed.status()
        assert (status["round"], status["phase"]) == (rounds, "complete")
        assert "Traceback" not in fed.coordinator.log_text + fed.aggregator.log_text, fed.describe()


def test_the_seeds_pairing_xain_sdk_float32_participants_and_the_seeds_python_aggregator(tmp_path: Path) -> None:
    """Issue 11, finding 4: the seed's own `xain_aggregators.weighted_average.Aggregator` makes float64
    models; unchanged xain-sdk 0.8.0 participants upload float32. Every round's results must count
    (they were refused 422 from round 2 on), and every model must be the weighted average of them.
    """
    pytest.importorskip("xain_sdk", reason=XAIN_SDK_MISSING)
    pytest.importorskip("xain_aggregators.weighted_average", reason=XAIN_SDK_MISSING.replace("xain-sdk", "xain-aggregators"))
    rounds = 5
    participants_dir = tmp_path / "participants"
    participants_dir.mkdir()
    seed_aggregator = {"backend": "python", "module": "xain_aggregators.weighted_average", "class": "Aggregator"}
    with federation(tmp_path, rounds=rounds, min_clients=3, aggregation=seed_aggregator) as fed, legacy_participants(
        fed, participants_dir, 3
    ) as participants:
        wait_for_clean_exits(participants, 2 * LEGACY_TIME_BOUND)

        uploads = [participant.records("upload") for participant in participants]
        downloads = [participant.records("download") for participant in participants]
        for participant, made, got in zip(participants, uploads, downloads):
            assert len(made) == rounds and len(got) == rounds, participant.describe()

        def seed_average(round_number: int) -> np.ndarray:
            return weighted_average_float64(
                [(made[round_number]["samples"], np.array(made[round_number]["weights"], dtype=np.float32)) for made in uploads]
            )

        # Round r's float32 uploads make the model every participant downloads in round r + 1.
        for round_number in range(1, rounds):
            expected = seed_average(round_number - 1)
            for participant, got in zip(participants, downloads):
                entry = got[round_number]
                dtype = np.dtype(entry["dtype"])
                if int(np.__version__.split(".")[0]) >= 2:
                    # numpy 2 (NEP 50): the seed's float32 * float64 weight is float64, so is its model.
                    assert dtype == np.float64, participant.describe()
                assert_seed_model(np.array(entry["weights"], dtype=dtype), expected, f"model participant {participant.index} got in round {round_number}")

        model_round, final = fed.global_model_on_disk()
        assert model_round == rounds and final is not None
        assert_seed_model(final, seed_average(rounds - 1), "final global model")
        status = fed.status()
        assert (status["round"], status["phase"]) == (rounds, "complete")
        logs = fed.coordinator.log_text + fed.aggregator.log_text
        assert "Traceback" not in logs and "this round takes" not in logs, fed.describe()


def weighted_average_float64(results: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """sum(n_i * x_i) / sum(n_i), in float64."""
    total = sum(samples for samples, _ in results)
    return sum(np.float64(samples) * weights.astype(np.float64) for samples, weights in results) / np.float64(total)


def assert_seed_model(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Within the seed's rounding: a few ulp of its own arithmetic (positive weights, no cancellation)."""
    assert actual.dtype.kind == "f" and actual.shape == SHAPE, f"{what}: {actual.dtype} {actual.shape}"
    np.testing.assert_allclose(actual, expected, rtol=16 * np.finfo(actual.dtype).eps, atol=0, err_msg=what)


# -- 3. the aggregator is killed mid-round and comes back -----------------------------------------


@dataclass
class Ledger:
    """Every upload the aggregator accepted (200), by round and participant, in order."""

    accepted: dict[int, dict[str, list[tuple[int, np.ndarray]]]] = field(default_factory=dict)

    def add(self, round_number: int, name: str, samples: int, weights: np.ndarray) -> None:
        self.accepted.setdefault(round_number, {}).setdefault(name, []).append((samples, weights))

    def counted(self, round_number: int) -> list[tuple[int, np.ndarray]]:
        """What must count in that round: each participant's last accepted result (a rerun replaces)."""
        return [uploads[-1] for uploads in self.accepted[round_number].values()]


def test_aggregator_killed_mid_round_is_restarted_and_training_completes(tmp_path: Path) -> None:
    """SIGKILL the aggregator between two uploads of a round; restarted, it finishes the training.

    Two ways are correct: the aggregator kept A's accepted result (its state
    directory) and the round goes on with B's upload; or the round runs again
    and A's new result replaces the first. Either way each global model must
    be the exact average of each participant's last accepted result of the
    round: a result counted twice, or one dropped, changes it.
    """
    rounds = 3
    interrupted = 1
    rng = np.random.default_rng(7)
    ledger = Ledger()
    samples_of = {"A": 30, "B": 70}
    with federation(tmp_path, rounds=rounds, min_clients=2) as fed, http_participants(fed, 2) as participants:
        a, b = participants
        for participant in participants:
            assert participant.rendez_vous()["ok"] is True

        def train_and_upload(participant: HttpParticipant, round_number: int, training: Training, expected: np.ndarray | None) -> tuple[int, Any]:
            assert_download(training.downloaded, expected, f"global model {participant.name} got in round {round_number}")
            weights = new_weights(rng, None if expected is None else load_npy(training.downloaded))
            samples = samples_of[participant.name] + round_number + len(ledger.accepted.get(round_number, {}).get(participant.name, []))
            code, answer = participant.upload(training.url, training.token, samples, weights)
            if code == 200:
                ledger.add(round_number, participant.name, samples, weights)
            return code, answer

        expected: np.ndarray | None = None
        # Round 0 goes normally.
        for participant in participants:
            participant.wait_for_round(0)
        for participant in participants:
            assert train_and_upload(participant, 0, begin_training(fed, participant), expected) == (200, {"ok": True})
        expected = weighted_average(ledger.counted(0))

        # Round 1: both start training; A's upload is accepted; the aggregator dies before B's.
        for participant in participants:
            participant.wait_for_round(interrupted)
        trainings = {participant.name: begin_training(fed, participant) for participant in participants}
        assert train_and_upload(a, interrupted, trainings["A"], expected) == (200, {"ok": True})
        coordinator_pid = fed.coordinator.pid
        assert fed.aggregator.kill() == -signal.SIGKILL
        fed.wait_until_attached(False)

        fed.restart_aggregator()  # same configuration: same port, same state directory
        fed.wait_until_attached(True)

        # B uploads what it trained with the token it holds; if that is no
        # longer valid, it follows what the coordinator answers from now on.
        code, answer = train_and_upload(b, interrupted, trainings["B"], expected)
        b_first_upload = (code, answer)
        marks = {participant.name: participant.mark() for participant in participants}
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            beats = {participant.name: participant.latest(since=marks[participant.name]) for participant in participants}
            if all(beat is not None and beat["state"] in ("round", "finish") and beat["round"] != interrupted for beat in beats.values()):
                break  # both moved past the interrupted round
            assert time.monotonic() < deadline, f"round {interrupted} never completed after the restart: {beats}\n{fed.describe()}"
            for participant in participants:
                if beats[participant.name] == {"state": "round", "round": interrupted}:
                    # Selected again (the round runs again, or its token was lost): train again.
                    answer = participant.start_training()
                    if answer["ok"]:
                        training = Training(answer["url"], answer["token"], participant.download(answer["url"], answer["token"]))
                        code, _ = train_and_upload(participant, interrupted, training, expected)
                    marks[participant.name] = participant.mark()
            time.sleep(HEARTBEAT_PERIOD / 2)

        assert set(ledger.accepted[interrupted]) == {"A", "B"}, ledger.accepted[interrupted].keys()
        expected = weighted_average(ledger.counted(interrupted))

        # The remaining round(s) go normally, and each starts from the exact average.
        for round_number in range(interrupted + 1, rounds):
            for participant in participants:
                participant.wait_for_round(round_number)
            for participant in participants:
                assert train_and_upload(participant, round_number, begin_training(fed, participant), expected) == (200, {"ok": True})
            expected = weighted_average(ledger.counted(round_number))

        for participant in participants:
            participant.wait_for_finish()
        model_round, final = fed.global_model_on_disk()
        assert model_round == rounds
        assert final is not None
        assert_model_equals(final, expected, "final global model")
        status = fed.status()
        assert (status["round"], status["phase"], status["aggregator_attached"]) == (rounds, "complete", True)
        assert fed.coordinator.running and fed.coordinator.pid == coordinator_pid, "the coordinator was restarted"
        print(
            f"B's first upload after the restart: {b_first_upload}; accepted uploads in round {interrupted}: "
            f"{ {name: len(uploads) for name, uploads in ledger.accepted[interrupted].items()} }"
        )
