"""examples/pb_participant.py, the third-party PB participant written from the documents alone.

Three of them, each a process of its own, train a whole federation of the
real daemons (`twistd -n xain-coordinator` and `twistd -n xain-aggregator`
on loopback, `xaind.tools.daemons.federation`) to the end. Their training
is whole-number arithmetic, so every global model can be checked bit for
bit against numpy's sample-weighted average of what was uploaded: the
models each participant downloaded, round by round, and the aggregator's
final model-<rounds>.npy. The example must import nothing from xaind: it
stands for a participant written by someone who has only the documents.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
from twisted.cred import portal
from twisted.cred.checkers import AllowAnonymousAccess
from twisted.internet import defer, protocol, reactor
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from xaind.protocol import COORDINATOR_PB_LISTENER
from xaind.tools import daemons

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "pb_participant.py"

ROUNDS = 5
PARTICIPANTS = 3
SHAPE = (4, 5)
HEARTBEAT_TIMEOUT = 3.0
#: The example's heartbeat pace (its own behaviour, well below HEARTBEAT_TIMEOUT).
HEARTBEAT_PERIOD = 0.2
ADMIT_TIMEOUT = 5.0
#: Bound on the whole training, from the participants' start to their exit.
TRAINING_TIMEOUT = 60.0


def imported_modules(source: str) -> set[str]:
    """Every module the source imports, absolute and relative, wherever the import statement is."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_the_example_imports_nothing_from_xaind() -> None:
    modules = imported_modules(EXAMPLE.read_text(encoding="utf-8"))
    top_levels = {name.split(".")[0] for name in modules}
    assert "xaind" not in top_levels, sorted(modules)
    assert not any(name.startswith(".") for name in modules), sorted(modules)
    # Twisted, numpy and the standard library only.
    assert top_levels - set(sys.stdlib_module_names) == {"numpy", "twisted"}, sorted(modules)


def test_imported_modules_sees_every_form_of_import() -> None:
    source = "import xaind.sdk\nfrom xaind import wire\ndef f():\n    from . import x\n"
    assert imported_modules(source) == {"xaind.sdk", "xaind", "."}


def weighted_average(results: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """sum(n_i * x_i) / sum(n_i) in float64, as float32: exact here, every product being a small whole number."""
    total = sum(samples for samples, _ in results)
    accumulated = sum(np.float64(samples) * weights.astype(np.float64) for samples, weights in results)
    return (accumulated / np.float64(total)).astype(np.float32)


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Same dtype, shape and bits."""
    assert actual.dtype == np.float32 and actual.shape == SHAPE, f"{what}: {actual.dtype} {actual.shape}"
    assert actual.tobytes() == expected.tobytes(), f"{what}:\n{actual}\n!=\n{expected}"


def as_float32(values: Any) -> np.ndarray:
    return np.array(values, dtype=np.float64).astype(np.float32)


@pytest.fixture
def running_participants() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Holds the started example processes; any still running at the end is killed."""
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(daemons.STOP_TIMEOUT)


def test_three_examples_train_five_rounds_with_the_exact_averages(
    tmp_path: Path, running_participants: list[subprocess.Popen[bytes]]
) -> None:
    with daemons.federation(
        tmp_path / "federation",
        secret=None,
        rounds=ROUNDS,
        min_clients=PARTICIPANTS,
        participants_ratio=1.0,
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        admit_timeout=ADMIT_TIMEOUT,
    ) as fed:
        endpoint = f"tcp:127.0.0.1:{fed.coordinator.ports[COORDINATOR_PB_LISTENER]}"
        records = [tmp_path / f"participant-{index}.jsonl" for index in range(PARTICIPANTS)]
        outputs = [tmp_path / f"participant-{index}.out" for index in range(PARTICIPANTS)]
        for index in range(PARTICIPANTS):
            with open(outputs[index], "wb") as output:
                running_participants.append(subprocess.Popen(
                    [sys.executable, str(EXAMPLE), "--coordinator", endpoint, "--index", str(index),
                     "--heartbeat-period", str(HEARTBEAT_PERIOD), "--record", str(records[index])],
                    stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                ))
        deadline = time.monotonic() + TRAINING_TIMEOUT  # one bound for the whole training
        for index, process in enumerate(running_participants):
            code = process.wait(max(0.0, deadline - time.monotonic()))  # raises TimeoutExpired past it
            said = outputs[index].read_text(encoding="utf-8")
            assert code == 0, f"participant {index} exited {code}: {said}"
            assert said.strip() == f"participant {index}: training finished", said
        assert fed.status()["phase"] == "complete"
        final_model = fed.model(ROUNDS)

    # (round, participant) -> that participant's line for that round
    lines: dict[tuple[int, int], dict[str, Any]] = {}
    for index, record in enumerate(records):
        for text in record.read_text(encoding="utf-8").splitlines():
            line = json.loads(text)
            assert (line["round"], index) not in lines, f"participant {index} uploaded twice in round {line['round']}"
            lines[line["round"], index] = line
    assert sorted(lines) == [(r, k) for r in range(ROUNDS) for k in range(PARTICIPANTS)]

    global_model: np.ndarray | None = None  # none before the first aggregation: an empty download
    for round_number in range(ROUNDS):
        uploads: list[tuple[int, np.ndarray]] = []
        for index in range(PARTICIPANTS):
            line = lines[round_number, index]
            what = f"round {round_number}, participant {index}"
            if global_model is None:
                assert line["downloaded"] is None, what
                expected_upload = (np.arange(20).reshape(SHAPE) + (index + 1)).astype(np.float32)
            else:
                assert_identical(as_float32(line["downloaded"]), global_model, f"{what}: download")
                expected_upload = (np.floor(global_model) + (index + 1)).astype(np.float32)
            uploaded = as_float32(line["uploaded"])
            assert_identical(uploaded, expected_upload, f"{what}: upload")
            assert line["samples"] == index + 1, what
            uploads.append((line["samples"], uploaded))
        global_model = weighted_average(uploads)
        # Element i of round r's model is i + 2 r + (1*1 + 2*2 + 3*3) / 6: not a whole number, only the
        # inputs are; what the participants sent is what they were meant to send.
        assert global_model[0, 0] == np.float32(2 * round_number + 14 / 6), global_model
    assert global_model is not None
    assert_identical(final_model, global_model, f"the aggregator's model-{ROUNDS}.npy")


# -- refusals and stops, against a stand-in coordinator that answers as told -----------------------

#: Bound on one example process run against the stand-in coordinator.
RUN_TIMEOUT = 30.0


class StandInParticipant(pb.Avatar):
    """A participant's perspective answering what the test says (not xaind's: the example's other side only)."""

    def __init__(self, mind: pb.RemoteReference | None, version: Any, heartbeats: list[dict[str, Any]], push_finished: bool) -> None:
        self.mind = mind
        self.version = version
        self.heartbeats = heartbeats
        self.push_finished = push_finished
        self.calls: list[str] = []

    def perspective_protocol_version(self) -> Any:
        self.calls.append("protocol_version")
        if isinstance(self.version, Exception):
            raise self.version
        return self.version

    def perspective_rendez_vous(self) -> dict[str, Any]:
        self.calls.append("rendez_vous")
        if self.push_finished:  # after the answer, as version 1 orders it
            reactor.callLater(0, self.mind.callRemote, "finished")
        return {"id": "participant/1", "ok": True}

    def perspective_heartbeat(self, participant_id: str) -> dict[str, Any]:
        self.calls.append(f"heartbeat {participant_id}")
        return self.heartbeats.pop(0) if len(self.heartbeats) > 1 else self.heartbeats[0]


@implementer(portal.IRealm)
class StandInRealm:
    def __init__(self, **answers: Any) -> None:
        self.answers = answers
        self.avatars: list[StandInParticipant] = []

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, StandInParticipant, Any]:
        avatar = StandInParticipant(mind, **self.answers)
        self.avatars.append(avatar)
        return pb.IPerspective, avatar, lambda: None


STAND_BY = {"state": "stand_by", "round": None}
VERSION_1 = {"name": "xaind-participant-pb", "version": 1}


class ExampleProcess(protocol.ProcessProtocol):
    """An example process's output (stdout and stderr together) and exit code."""

    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[int | None] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(reason.value.exitCode)  # None when killed by a signal


async def run_example_against(realm: StandInRealm) -> tuple[int | None, str]:
    """Run the example against `realm` behind a PB listener on loopback; its exit code and output."""
    factory = pb.PBServerFactory(portal.Portal(realm, [AllowAnonymousAccess()]))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        example = ExampleProcess()
        command = [sys.executable, str(EXAMPLE), "--coordinator", f"tcp:127.0.0.1:{port.getHost().port}",
                   "--index", "0", "--heartbeat-period", str(HEARTBEAT_PERIOD)]
        process = reactor.spawnProcess(example, sys.executable, command, env=dict(os.environ))
        # Bounded: a process still running after RUN_TIMEOUT is killed, which ends the wait.
        killer = reactor.callLater(RUN_TIMEOUT, process.signalProcess, "KILL")
        code = await example.ended
        assert killer.active(), f"the example did not exit within {RUN_TIMEOUT} s: {example.output!r}"
        killer.cancel()
        return code, example.output.decode("utf-8")
    finally:
        await port.stopListening()


@pytest.mark.parametrize(
    "version",
    [{"name": "xaind-participant-pb", "version": 2}, {"name": "another-protocol", "version": 1}, "1", None],
    ids=["unknown-version", "other-name", "not-a-dict", "none"],
)
@pytest_twisted.ensureDeferred
async def test_an_unknown_protocol_is_refused_with_one_line(version: Any) -> None:
    realm = StandInRealm(version=version, heartbeats=[STAND_BY], push_finished=False)
    code, output = await run_example_against(realm)
    assert code == 2, output
    assert output.count("\n") == 1 and output.startswith("participant 0: refused: unknown participant protocol"), output
    assert [avatar.calls for avatar in realm.avatars] == [["protocol_version"]]  # no rendez-vous after it


@pytest_twisted.ensureDeferred
async def test_a_coordinator_without_protocol_version_is_refused_with_one_line() -> None:
    realm = StandInRealm(version=pb.Error("not_found: no method 'protocol_version'"), heartbeats=[STAND_BY], push_finished=False)
    code, output = await run_example_against(realm)
    assert code == 2, output
    assert output == "participant 0: refused: the coordinator does not tell its protocol (not_found: no method 'protocol_version')\n"
    assert [avatar.calls for avatar in realm.avatars] == [["protocol_version"]]


@pytest_twisted.ensureDeferred
async def test_a_finished_push_stops_it_with_exit_0() -> None:
    """Heartbeats say stand_by forever: only the push can end it."""
    realm = StandInRealm(version=VERSION_1, heartbeats=[STAND_BY], push_finished=True)
    code, output = await run_example_against(realm)
    assert (code, output) == (0, "participant 0: training finished\n")
    assert realm.avatars[0].calls[:2] == ["protocol_version", "rendez_vous"]


@pytest_twisted.ensureDeferred
async def test_a_finish_heartbeat_stops_it_with_exit_0() -> None:
    realm = StandInRealm(version=VERSION_1, heartbeats=[STAND_BY, STAND_BY, {"state": "finish", "round": None}], push_finished=False)
    code, output = await run_example_against(realm)
    assert (code, output) == (0, "participant 0: training finished\n")
    # The id travels as given, and heartbeats go on after stand_by until finish.
    assert realm.avatars[0].calls == ["protocol_version", "rendez_vous"] + ["heartbeat participant/1"] * 3


@pytest_twisted.ensureDeferred
async def test_a_rejected_heartbeat_ends_it_with_one_line_and_exit_1() -> None:
    realm = StandInRealm(version=VERSION_1, heartbeats=[{"state": "reject", "round": None}], push_finished=False)
    code, output = await run_example_against(realm)
    assert (code, output) == (1, "participant 0: the coordinator no longer knows id participant/1\n")
