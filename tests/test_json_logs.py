"""Both log formats over a whole training on the real daemons: JSON lines that parse, and no credential in either.

A coordinator and an aggregator (`twistd -n` subprocesses on loopback) with
a PB secret and enrolment tokens train two rounds with two participants
speaking HTTP, driven step by step by the test (heartbeats not held, so one
thread suffices). Uploads are refused (an unknown token, weights of the
wrong shape, bytes that are no result, a second upload of an accepted result) and accepted, a
rendez-vous is refused (an unlisted enrolment token). Then every credential
that went over the wire (the PB secret, the enrolment tokens, the training
tokens the coordinator handed out) is looked for in both daemons' logs, in
the text format and in `logging.format: json`.

Unit tests of `xaind.json_log` (event names, JSON-safe values, withheld
credential fields) come first: they need no daemon.
"""

from __future__ import annotations

import contextlib
import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from xaind.json_log import RESERVED_KEYS, WITHHELD, event_as_dict, event_as_json_line, event_name, twistd_observer
from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.testing.wire import encode_local_result
from xaind.tools import daemons

PB_SECRET = "json-logs-pb-secret-6b1f0c"
ENROLMENT_TOKENS = {"A": "enrolment-A-3e9d27c1f0", "B": "enrolment-B-a41c88e2d7"}
UNLISTED_ENROLMENT_TOKEN = "enrolment-unlisted-77aa01"
ROUNDS = 2
SHAPE = (3, 4)
HTTP_TIMEOUT = 10.0
STEP_TIMEOUT = 20.0


# -- xaind.json_log without a daemon ------------------------------------------------------------------


def event(log_format: str, **fields: Any) -> dict[str, Any]:
    return {
        "log_format": log_format,
        "log_level": LogLevel.info,
        "log_namespace": "xaind.test",
        "log_time": 1_700_000_000.25,
        "log_logger": object(),
        "log_source": None,
        **fields,
    }


@pytest.mark.parametrize(
    "log_format, name",
    [
        ("round {round} complete: asking the aggregator to aggregate", "round_complete"),
        ("{participant} asks to start training: admitting it at the aggregator", "asks_to_start_training"),
        ("{name}: selected for round {round}", "selected_for_round"),
        ("{what} crashed (error id {error_id})", "crashed"),
        ("aggregation of round {round} failed: {error}; the round runs again in {delay:g} s", "aggregation_of_round_failed"),
        ("{log_text}", "message"),
    ],
)
def test_an_event_is_named_by_the_words_of_its_format(log_format: str, name: str) -> None:
    assert event_name(event(log_format, round=3, participant="p", name="n", what="w", error_id="e", error="x", delay=1.0)) == name


def test_an_explicit_event_field_names_the_event() -> None:
    assert event_name(event("{count} rendez-vous refused", event="rendez_vous_rate_limited", count=3)) == "rendez_vous_rate_limited"


def test_a_line_has_the_reserved_keys_then_the_fields() -> None:
    line = json.loads(event_as_json_line(event("admitted {participant} for round {round}", participant="abc", round=2)))
    assert list(line)[: len(RESERVED_KEYS)] == list(RESERVED_KEYS)
    assert line == {
        "time": "2023-11-14T22:13:20.250000+00:00",
        "timestamp": 1_700_000_000.25,
        "level": "info",
        "namespace": "xaind.test",
        "event": "admitted_for_round",
        "text": "admitted abc for round 2",
        "participant": "abc",
        "round": 2,
    }


def test_values_are_json_safe_and_credential_fields_withheld() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque thing"

    line = event_as_dict(
        event(
            "{what}",
            what=Opaque(),
            ratio=np.float32(0.5),
            count=np.int64(7),
            nan=math.nan,
            shape=(2, 3),
            nested={"secret": "s3", "ok": 1},
            token="t0k",
            pb_secret="s3cr3t",
            text="a field named like a key",
        )
    )
    assert line["what"] == "opaque thing" and line["text"] == "opaque thing"
    assert line["ratio"] == 0.5 and line["count"] == 7 and line["nan"] == "nan" and line["shape"] == [2, 3]
    assert line["nested"] == {"secret": WITHHELD, "ok": 1}
    assert line["token"] == WITHHELD and line["pb_secret"] == WITHHELD
    assert line["field_text"] == "a field named like a key"
    json.dumps(line, allow_nan=False)


def test_a_failure_has_its_traceback() -> None:
    try:
        raise ValueError("broken")
    except ValueError:
        failure = Failure()
    line = event_as_dict(event("{what} failed", what="folding", log_failure=failure, log_level=LogLevel.critical))
    assert line["level"] == "critical" and line["event"] == "failed"
    assert "ValueError: broken" in line["traceback"]


# -- twistd's command line ---------------------------------------------------------------------------------


def parsed_twistd_options(tmp_path: Path, log_format: str, *twistd_arguments: str) -> Any:
    """twistd's options parsed as twistd parses them, for a coordinator with `logging.format: log_format`."""
    from twisted.scripts.twistd import ServerOptions

    config = daemons.write_yaml(
        tmp_path / "coordinator.yaml",
        {**daemons.coordinator_document(state_dir=tmp_path / "state", aggregator_port=1, federated_learning={"rounds": 1}), "logging": {"format": log_format}},
    )
    options = ServerOptions()
    options.parseOptions([*twistd_arguments, "xain-coordinator", "--config", str(config)])
    return options


@pytest.fixture
def restored_sigusr1() -> Iterator[None]:
    """The observer installs twistd's SIGUSR1 rotation, as twistd does: not for the rest of the session."""
    import signal

    handler = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, handler)


def test_json_configured_makes_twistd_log_json_lines_to_its_logfile(tmp_path: Path, restored_sigusr1: None) -> None:
    log_path = tmp_path / "twistd.log"
    options = parsed_twistd_options(tmp_path, "json", "-n", f"--logfile={log_path}")
    assert options["logger"] is twistd_observer
    observer = options["logger"]()
    observer(event("{what} listening on {address}", what="coordinator HTTP API", address="127.0.0.1:8081"))
    (line,) = log_path.read_text(encoding="utf-8").splitlines()
    assert json.loads(line)["event"] == "listening_on" and json.loads(line)["address"] == "127.0.0.1:8081"
    observer._outFile.close()  # the log file twistd would close at exit


def test_text_configured_leaves_twistd_alone_and_an_operators_logger_wins(tmp_path: Path) -> None:
    assert parsed_twistd_options(tmp_path, "text", "-n")["logger"] is None
    assert parsed_twistd_options(tmp_path, "json", "-n", "--logger", "twisted.logger.textFileLogObserver")["logger"].__name__ == "textFileLogObserver"
    assert parsed_twistd_options(tmp_path, "json", "--syslog")["logger"] is None


# -- a whole training on the real daemons ---------------------------------------------------------------


def request(url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, JSON answer or raw bytes) of a GET, or of a POST of `body`."""
    sent = urllib.request.Request(url, data=body, method="GET" if body is None else "POST", headers=headers or {})
    try:
        with urllib.request.urlopen(sent, timeout=HTTP_TIMEOUT) as response:
            status, content, kind = response.status, response.read(), response.headers.get("content-type", "")
    except urllib.error.HTTPError as error:
        with error:
            status, content, kind = error.code, error.read(), error.headers.get("content-type", "")
    return status, json.loads(content) if kind.startswith("application/json") else content


@dataclass
class Participant:
    name: str
    coordinator: str
    id: str = ""
    tokens: list[str] = field(default_factory=list)

    def rendez_vous(self) -> None:
        status, answer = request(f"{self.coordinator}/rendez_vous", headers={"Authorization": f"Bearer {ENROLMENT_TOKENS[self.name]}"})
        assert status == 200 and answer["ok"] is True, answer
        self.id = answer["id"]

    def heartbeat(self) -> dict[str, Any]:
        status, answer = request(f"{self.coordinator}/heartbeat/{self.id}")
        assert status == 200, answer
        return answer

    def start_training(self) -> tuple[str, str]:
        status, answer = request(f"{self.coordinator}/start_training/{self.id}")
        assert status == 200 and answer["ok"] is True, answer
        self.tokens.append(answer["token"])
        return answer["url"], answer["token"]


def wait_for_heartbeats(participants: list[Participant], wanted: dict[str, Any]) -> None:
    """Heartbeat every participant (none held: `heartbeat_hold` 0) until each is answered `wanted`."""
    seen: dict[str, dict[str, Any]] = {}

    def all_answered() -> bool:
        for participant in participants:
            if seen.get(participant.name) != wanted:
                seen[participant.name] = participant.heartbeat()
        return all(answer == wanted for answer in seen.values())

    daemons.wait_until(all_answered, STEP_TIMEOUT, f"heartbeats answered {wanted}; last {seen}", interval=0.05)


@contextlib.contextmanager
def logging_federation(directory: Path, log_format: str) -> Iterator[tuple[daemons.Daemon, daemons.Daemon]]:
    """A coordinator and its aggregator, both with `logging.format: log_format` (debug level: every line)."""
    tokens_file = directory / "enrolment-tokens"
    directory.mkdir(parents=True, exist_ok=True)
    tokens_file.write_text("".join(f"{token}\n" for token in ENROLMENT_TOKENS.values()), encoding="utf-8")
    logging_section = {"format": log_format, "level": "debug"}
    aggregator_port = daemons.free_loopback_port()
    coordinator_dir, aggregator_dir = directory / "coordinator", directory / "aggregator"
    coordinator_dir.mkdir()
    aggregator_dir.mkdir()
    document = daemons.coordinator_document(
        state_dir=coordinator_dir / "state",
        aggregator_port=aggregator_port,
        secret=PB_SECRET,
        federated_learning={"rounds": ROUNDS, "min_clients": 2, "participants_ratio": 1.0, "heartbeat_timeout": 10.0, "training_timeout": 30.0},
        aggregator={"admit_timeout": 5.0},
        heartbeat_hold=0,
    )
    document["participants"] = {"authentication": "enrolment_tokens", "enrolment_tokens_file": str(tokens_file)}
    document["logging"] = logging_section
    with contextlib.ExitStack() as stack:
        coordinator = stack.enter_context(
            daemons.Daemon(
                "xain-coordinator",
                daemons.write_yaml(coordinator_dir / "coordinator.yaml", document),
                coordinator_dir,
                listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER),
            )
        )
        document = daemons.aggregator_document(
            state_dir=aggregator_dir / "state",
            port=aggregator_port,
            coordinator_pb_port=coordinator.ports[COORDINATOR_PB_LISTENER],
            secret=PB_SECRET,
        )
        document["logging"] = logging_section
        aggregator = stack.enter_context(
            daemons.Daemon(
                "xain-aggregator", daemons.write_yaml(aggregator_dir / "aggregator.yaml", document), aggregator_dir, listeners=(AGGREGATOR_HTTP_LISTENER,)
            )
        )
        try:
            coordinator.wait_for(
                lambda: daemons.get_json(coordinator.url(COORDINATOR_HTTP_LISTENER, "/status"))[1]["aggregator_attached"],
                "the aggregator to attach",
            )
            yield coordinator, aggregator
        except BaseException:
            print(f"--- coordinator ---\n{coordinator.log_text}{coordinator.output}\n--- aggregator ---\n{aggregator.log_text}{aggregator.output}")
            raise


def weights(value: float, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


def train(coordinator: daemons.Daemon) -> tuple[list[Participant], dict[str, int]]:
    """Two rounds with refusals along the way; returns the participants and the refusal codes seen."""
    url = coordinator.url(COORDINATOR_HTTP_LISTENER, "").rstrip("/")
    refusals: dict[str, int] = {}
    status, answer = request(f"{url}/rendez_vous", headers={"Authorization": f"Bearer {UNLISTED_ENROLMENT_TOKEN}"})
    assert status == 401, answer
    refusals[answer["code"]] = status
    participants = [Participant(name, url) for name in ENROLMENT_TOKENS]
    for participant in participants:
        participant.rendez_vous()
    for round_number in range(ROUNDS):
        wait_for_heartbeats(participants, {"state": "round", "round": round_number})
        for position, participant in enumerate(participants):
            aggregator_url, token = participant.start_training()
            status, _ = request(f"{aggregator_url}/{participant.id}/{token}")
            assert status == 200
            if position == 0:
                refused = [
                    (f"{aggregator_url}/{participant.id}/not-{token}", encode_local_result(5, weights(1.0))),
                    (f"{aggregator_url}/{participant.id}/{token}", b"not a local result"),
                ]
                if round_number > 0:  # the first round has no model yet: any shape goes
                    refused.append((f"{aggregator_url}/{participant.id}/{token}", encode_local_result(5, weights(1.0, (2, 2)))))
                for refused_url, body in refused:
                    status, answer = request(refused_url, body=body, headers={"content-type": "application/octet-stream"})
                    assert isinstance(answer, dict) and "code" in answer, (status, answer)
                    refusals[answer["code"]] = status
            status, answer = request(
                f"{aggregator_url}/{participant.id}/{token}",
                body=encode_local_result(5 + position, weights(1.0 + position)),
                headers={"content-type": "application/octet-stream"},
            )
            assert status == 200, answer
            if position == 0:
                status, answer = request(
                    f"{aggregator_url}/{participant.id}/{token}", body=encode_local_result(5, weights(1.0)), headers={"content-type": "application/octet-stream"}
                )
                refusals[answer["code"]] = status
    wait_for_heartbeats(participants, {"state": "finish", "round": None})
    return participants, refusals


#: Fields a participant's event must carry as fields in the JSON lines (the event names derive from the formats).
PARTICIPANT_EVENTS = {"admitted_for_round", "asks_to_start_training", "upload_of_complete"}


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_training_logs_no_credential_and_json_lines_parse(tmp_path: Path, log_format: str) -> None:
    with logging_federation(tmp_path, log_format) as (coordinator, aggregator):
        participants, refusals = train(coordinator)
        assert refusals == {
            "not_authenticated": 401,
            "unknown_token": 404,
            "malformed_upload": 400,
            "unacceptable_weights": 422,
            "already_accepted": 409,
        }
        status = daemons.get_json(coordinator.url(COORDINATOR_HTTP_LISTENER, "/status"))[1]
        assert status["round"] == ROUNDS, status
        training_tokens = [token for participant in participants for token in participant.tokens]
        assert len(training_tokens) == ROUNDS * len(participants)
    logs = {"coordinator": coordinator.log_text + coordinator.output, "aggregator": aggregator.log_text + aggregator.output}
    credentials = [PB_SECRET, UNLISTED_ENROLMENT_TOKEN, *ENROLMENT_TOKENS.values(), *training_tokens]
    for daemon, text in logs.items():
        assert "round 1" in text or '"round":1' in text, f"{daemon} logged the training: {text[:2000]}"
        leaked = [credential for credential in credentials if credential in text]
        assert not leaked, f"{daemon}'s {log_format} log holds credentials {leaked}"
    if log_format == "text":
        assert not logs["coordinator"].lstrip().startswith("{")
        return
    ids = {participant.id for participant in participants}
    for daemon, path in (("coordinator", coordinator.log_path), ("aggregator", aggregator.log_path)):
        lines = path.read_text(encoding="utf-8").splitlines()
        assert len(lines) > 20, lines
        events = [json.loads(line) for line in lines]
        for line in events:
            assert set(RESERVED_KEYS) <= set(line), line
            assert isinstance(line["event"], str) and line["event"], line
            assert line["level"] in {"debug", "info", "warn", "error", "critical"}, line
            assert isinstance(line["timestamp"], float) and line["time"].endswith("+00:00"), line
        # Twisted's own lines are JSON too: the file holds one format.
        assert any(line["namespace"].startswith("twisted.") for line in events), daemon
        about_participants = [line for line in events if line["event"] in PARTICIPANT_EVENTS]
        assert about_participants, f"{daemon}: no participant event among {sorted({line['event'] for line in events})}"
        for line in about_participants:
            assert line["participant"] in ids, line
            assert line["participant"] in line["text"], line
        if daemon == "aggregator":
            admitted = [line for line in events if line["event"] == "admitted_for_round"]
            assert sorted((line["round"], line["participant"]) for line in admitted) == sorted(
                (round_number, participant_id) for round_number in range(ROUNDS) for participant_id in ids
            )
        else:
            assert [line["round"] for line in events if line["event"] == "round_aggregated"] == list(range(ROUNDS))
            refused = [line for line in events if line["event"] == "not_authenticated"]
            assert [(line["level"], line["reason"]) for line in refused] == [("warn", "an unlisted enrolment token")]
