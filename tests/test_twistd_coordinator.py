"""The coordinator as operators run it: real `twistd -n xain-coordinator` processes.

Each test writes its configuration and state directory under `tmp_path`,
listens on ports the OS chooses (learnt from the daemon's `--ready-file`),
talks to it with plain blocking HTTP, and stops every process it
started (the `Daemon` context manager), whether it passes or fails.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from xaind.protocol import COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER

from xaind.tools.daemons import LOOPBACK_ANY_PORT, Daemon, get_json, run_to_exit, run_twistd, wait_until, write_yaml

PLUGIN = "xain-coordinator"
HTTP = COORDINATOR_HTTP_LISTENER
PB = COORDINATOR_PB_LISTENER

#: How a participant paces its heartbeats in these tests (its own behaviour,
#: not a synchronisation).
HEARTBEAT_PERIOD = 0.2


#: The PB link's shared secret (a configuration needs one unless it says development: true).
PB_SECRET = "twistd-test-secret"


def listeners_document() -> dict[str, Any]:
    """OS-chosen loopback ports and a PB secret: the minimum of a valid configuration here."""
    return {
        "api": {"listen": LOOPBACK_ANY_PORT},
        "pb": {"listen": LOOPBACK_ANY_PORT, "secret": PB_SECRET},
    }


def coordinator_config(tmp_path: Path, name: str = "coordinator.yaml", **federated_learning: Any) -> Path:
    """A complete, valid configuration on OS-chosen loopback ports, state under tmp_path/state."""
    settings = {
        "rounds": 10,
        "participants_ratio": 1.0,
        "min_clients": 1,
        "heartbeat_timeout": 15.0,
        "training_timeout": 3600.0,
    }
    settings.update(federated_learning)
    return write_yaml(
        tmp_path / name,
        {
            **listeners_document(),
            "federated_learning": settings,
            "aggregator": {"url": "http://localhost:8082", "admit_timeout": 1.0},
            "state_dir": str(tmp_path / "state"),
            "logging": {"level": "info"},
        },
    )


def coordinator(tmp_path: Path, config: Path | str) -> Daemon:
    return Daemon(PLUGIN, config, tmp_path, listeners=(HTTP, PB))


def rendez_vous(daemon: Daemon) -> dict[str, Any]:
    status, answer = get_json(daemon.url(HTTP, "/rendez_vous"))
    assert status == 200
    return answer


def heartbeat(daemon: Daemon, participant_id: str) -> dict[str, Any]:
    status, answer = get_json(daemon.url(HTTP, f"/heartbeat/{participant_id}"))
    assert status == 200
    return answer


def status_of(daemon: Daemon) -> dict[str, Any]:
    status, answer = get_json(daemon.url(HTTP, "/status"))
    assert status == 200
    return answer


def assert_stopped_cleanly(daemon: Daemon) -> None:
    """SIGTERM ends it through the reactor's orderly shutdown, not a kill.

    twistd re-raises the SIGTERM it received once the reactor has stopped
    (twisted.application.app._exitWithSignal), so the exit status is "killed
    by SIGTERM" (-15 here, 143 in a shell): systemd counts that as a clean
    exit. An exit status of 0 would be as good.
    """
    code = daemon.stop()
    assert not daemon.killed, "twistd ignored SIGTERM and had to be killed"
    assert code in (0, -signal.SIGTERM), f"exit code {code}: {daemon.output}"
    assert "Received SIGTERM, shutting down." in daemon.log_text
    assert daemon.log_text.rstrip().endswith("Server Shut Down.")
    assert "Traceback" not in daemon.log_text + daemon.output


def assert_one_line_failure(result: Any, expected_line: str) -> None:
    """A start-up refused with exactly `expected_line`: no traceback, no usage text, nothing else."""
    assert result.returncode != 0, result.stdout
    assert result.returncode > 0, f"died of signal {-result.returncode}: {result.stdout}"
    assert "Traceback" not in result.stdout
    assert "Usage:" not in result.stdout and "--help" not in result.stdout
    assert result.stdout.splitlines() == [expected_line]


# -- the plugin ------------------------------------------------------------------


def test_twistd_help_lists_the_coordinator_plugin() -> None:
    result = run_twistd("--help")
    assert result.returncode == 0, result.stdout
    commands = result.stdout.split("Commands:", 1)[1]
    assert re.search(r"^\s+xain-coordinator\s+xaind federated-learning coordinator", commands, re.MULTILINE), commands


# -- serving -----------------------------------------------------------------


def test_coordinator_serves_participants_and_stops_on_sigterm(tmp_path: Path) -> None:
    coordinator_config(tmp_path)
    # A path relative to the daemon's working directory: the log names it absolutely.
    with coordinator(tmp_path, "coordinator.yaml") as daemon:
        xaind_messages = daemon.log_messages("xaind")
        assert xaind_messages[0] == f"configuration loaded from {tmp_path / 'coordinator.yaml'}"
        assert daemon.ports[HTTP] != daemon.ports[PB]
        assert f"{HTTP} listening on 127.0.0.1:{daemon.ports[HTTP]}" in xaind_messages
        assert f"{PB} listening on 127.0.0.1:{daemon.ports[PB]}" in xaind_messages
        assert "coordinator ready: round 0 of 10, waiting for 1 more participant(s) to rendez-vous (0 of min_clients 1 present)" in xaind_messages

        answer = rendez_vous(daemon)
        assert set(answer) == {"id", "ok"}
        assert answer["ok"] is True
        participant = answer["id"]
        assert isinstance(participant, str) and participant

        assert heartbeat(daemon, participant) == {"state": "round", "round": 0}
        assert heartbeat(daemon, "no-such-participant") == {"state": "reject", "round": None}
        assert get_json(daemon.url(HTTP, "/start_training/no-such-participant")) == (
            200,
            {"ok": False, "url": None, "token": None},
        )

        status = status_of(daemon)
        assert status["round"] == 0
        assert status["rounds"] == 10
        assert status["phase"] == "training"
        assert status["minimum_participants"] == 1
        assert status["participants"] == {"waiting": 0, "selected": 1, "done": 0, "done_inactive": 0, "ignored": 0}
        assert status["aggregator_attached"] is False

        # The state directory is made at start-up; the round counter is
        # written only after a successful aggregation, so not yet.
        assert (tmp_path / "state").is_dir()
        assert os.listdir(tmp_path / "state") == []

        assert_stopped_cleanly(daemon)
    assert not (tmp_path / "twistd.pid").exists()


def test_pb_port_accepts_connections(tmp_path: Path) -> None:
    with coordinator(tmp_path, coordinator_config(tmp_path)) as daemon:
        with socket.create_connection(("127.0.0.1", daemon.ports[PB]), timeout=5) as connection:
            assert connection.getpeername() == ("127.0.0.1", daemon.ports[PB])
        assert_stopped_cleanly(daemon)


# -- configuration errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        (
            {"federated_learning": {"participants_ratio": 1.5}},
            "config error: federated_learning.participants_ratio: must be in (0, 1], got 1.5",
        ),
        (
            {"federated_learning": {"participant_ratio": 0.5}},
            "config error: federated_learning.participant_ratio: unknown key",
        ),
    ],
    ids=["ratio-out-of-range", "unknown-key"],
)
def test_bad_configuration_stops_startup_with_one_line(tmp_path: Path, document: dict[str, Any], expected: str) -> None:
    # Valid but for the one problem; OS-chosen ports so that a config wrongly accepted cannot clash.
    document = {**listeners_document(), **document}
    config = write_yaml(tmp_path / "coordinator.yaml", document)
    result = run_to_exit(PLUGIN, config, tmp_path / "coordinator.log", cwd=tmp_path)
    assert_one_line_failure(result, expected)


def test_missing_configuration_file_stops_startup_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = run_to_exit(PLUGIN, missing, tmp_path / "coordinator.log", cwd=tmp_path)
    assert_one_line_failure(result, f"config error: {missing}: no such file")


# -- heartbeats --------------------------------------------------------------


def test_lost_participant_is_replaced_by_a_waiting_one(tmp_path: Path) -> None:
    timeout = 1.0
    with coordinator(tmp_path, coordinator_config(tmp_path, heartbeat_timeout=timeout)) as daemon:
        a = rendez_vous(daemon)["id"]
        a_last_heartbeat = time.monotonic()  # taken before the daemon resets A's timer
        assert heartbeat(daemon, a) == {"state": "round", "round": 0}
        b = rendez_vous(daemon)["id"]
        assert heartbeat(daemon, b) == {"state": "stand_by", "round": None}
        assert status_of(daemon)["participants"] == {"waiting": 1, "selected": 1, "done": 0, "done_inactive": 0, "ignored": 0}

        # A falls silent; B keeps its heartbeat going, as a participant does.
        # A's loss shows in /status (asking A's heartbeat would keep it alive).
        answers_of_b: list[dict[str, Any]] = []

        def a_was_dropped() -> dict[str, Any] | None:
            answers_of_b.append(heartbeat(daemon, b))
            status = status_of(daemon)
            return status if status["participants"]["waiting"] == 0 else None

        status = wait_until(a_was_dropped, 10.0, "A's heartbeat timeout", interval=HEARTBEAT_PERIOD)
        noticed = time.monotonic() - a_last_heartbeat

        assert noticed >= timeout - 0.05, f"A dropped {noticed:.2f} s after its last heartbeat"
        assert status["round"] == 0
        assert status["participants"] == {"waiting": 0, "selected": 1, "done": 0, "done_inactive": 0, "ignored": 0}
        assert answers_of_b[0] == {"state": "stand_by", "round": None}
        assert all(answer in ({"state": "stand_by", "round": None}, {"state": "round", "round": 0}) for answer in answers_of_b)

        assert heartbeat(daemon, a) == {"state": "reject", "round": None}
        assert heartbeat(daemon, b) == {"state": "round", "round": 0}
        assert f"no heartbeat from {a} for {timeout} s" in daemon.log_messages("xaind")
        assert f"no heartbeat from {b}" not in daemon.log_text
        assert daemon.log_messages("xaind.coordinator.service").count("selected 1 participant(s) for round 0") == 2

        assert_stopped_cleanly(daemon)


# -- the round counter across restarts ---------------------------------------------


def write_state(tmp_path: Path, content: str) -> Path:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    path = state_dir / "coordinator.json"
    path.write_text(content, encoding="utf-8")
    return path


def test_round_counter_is_resumed_from_the_state_directory(tmp_path: Path) -> None:
    state = write_state(tmp_path, json.dumps({"round": 3}))
    with coordinator(tmp_path, coordinator_config(tmp_path, rounds=10)) as daemon:
        assert any(message.startswith("coordinator ready: round 3 of 10,") for message in daemon.log_messages("xaind"))
        participant = rendez_vous(daemon)
        assert participant["ok"] is True
        assert heartbeat(daemon, participant["id"]) == {"state": "round", "round": 3}
        assert status_of(daemon)["round"] == 3
        assert_stopped_cleanly(daemon)
    assert json.loads(state.read_text(encoding="utf-8")) == {"round": 3}


@pytest.mark.parametrize("stored_round", [4, 6, 99], ids=["all-rounds-done", "rounds-lowered-since", "far-beyond-rounds"])
def test_finished_training_is_resumed_from_the_state_directory(tmp_path: Path, stored_round: int) -> None:
    state = write_state(tmp_path, json.dumps({"round": stored_round}))
    with coordinator(tmp_path, coordinator_config(tmp_path, rounds=4)) as daemon:
        # A counter beyond `rounds` is complete too (rounds lowered since), and said in one line.
        beyond = [message for message in daemon.log_messages("xaind") if "more than rounds" in message]
        if stored_round > 4:
            assert beyond == [
                f"{state} records {stored_round} aggregated rounds, more than rounds: 4 in the configuration: "
                "training is complete (remove the file to train anew)"
            ]
            assert f"[xaind.coordinator.service#warn] {beyond[0]}" in daemon.log_text
        else:
            assert beyond == []
        assert any(message.startswith("coordinator ready: round 4 of 4,") for message in daemon.log_messages("xaind"))
        answer = rendez_vous(daemon)
        assert answer["ok"] is False
        assert heartbeat(daemon, answer["id"]) == {"state": "finish", "round": None}
        assert heartbeat(daemon, "no-such-participant") == {"state": "finish", "round": None}
        assert get_json(daemon.url(HTTP, f"/start_training/{answer['id']}")) == (200, {"ok": False, "url": None, "token": None})
        status = status_of(daemon)
        assert (status["round"], status["rounds"], status["phase"]) == (4, 4, "complete")
        assert_stopped_cleanly(daemon)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"round": ', r"cannot be read \(.+\)"),
        ('{"round": -1}', re.escape("'round' must be a whole number >= 0, got -1")),
    ],
    ids=["not-json", "negative-round"],
)
def test_unusable_state_file_stops_startup_with_one_line(tmp_path: Path, content: str, problem: str) -> None:
    state = write_state(tmp_path, content)
    config = coordinator_config(tmp_path)
    result = run_to_exit(PLUGIN, config, tmp_path / "coordinator.log", cwd=tmp_path)
    assert result.returncode > 0, result.stdout
    assert "Traceback" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert re.fullmatch(rf"state error: {re.escape(str(state))}: {problem}", lines[0]), lines[0]
    # Refusing must not "repair" the file by starting over.
    assert state.read_text(encoding="utf-8") == content
