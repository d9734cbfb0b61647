"""A training with enrolment tokens on the real daemons (`twistd -n` subprocesses on loopback).

Two HTTP participants and one PB participant, each with its own token, run
in this process (`start_participant` on the real reactor) and train to the
exact model; participants without a token or with one not in the file are
refused 401 / `not_authenticated` and never selected. Over the whole
training, no enrolment token, no participant token (handed out at
start-training, the aggregator's) and no PB secret appears in any daemon
log line or any error body.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from xaind.sdk import Participant, ParticipantSummary, start_participant
from xaind.sdk.http import Downloaded, HttpClient
from xaind.sdk.runner import RetryPolicy
from xaind.tools import daemons
from xaind.testing.waiting import wait_until
from xaind.tools.daemons import coordinator_document, free_loopback_port, run_to_exit, write_yaml

PB_SECRET = "authentication-test-pb-secret-5f0d1e"
TOKENS = {"A": "9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e", "B": "1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d", "C": "0f1e2d3c4b5a69788796a5b4c3d2e1f0"}
UNLISTED = "deadbeefdeadbeefdeadbeefdeadbeef"
SHAPE = (2, 3)
ROUNDS = 2
STEP_TIMEOUT = 30.0
FAST_RETRY = RetryPolicy(initial_delay=0.1, max_delay=0.5, retry_timeout=30.0)


class StepParticipant(Participant):
    """Adds `step` to the global model (ones in round 0), trained on `samples` samples."""

    def __init__(self, step: float, samples: int) -> None:
        self.step = step
        self.samples = samples

    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        base = np.ones(SHAPE, dtype=np.float32) if weights is None else weights
        return (base + np.float32(self.step)).astype(np.float32), self.samples


class RecordingHttpClient(HttpClient):
    """Keeps the participant tokens it sends (the last segment of its upload URLs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokens: set[str] = set()

    def upload(self, url: str, samples: int, weights: np.ndarray) -> Deferred[Downloaded]:
        self.tokens.add(unquote(url.rsplit("/", 1)[1]))
        return super().upload(url, samples, weights)


@dataclass
class Federation(daemons.Federation):
    error_bodies: list[str] = field(default_factory=list)


def federation(directory: Path) -> contextlib.AbstractContextManager[Federation]:
    """Both daemons, the coordinator reading one enrolment token per participant from its file."""
    tokens_file = directory / "enrolment-tokens"
    tokens_file.write_text("# one token per participant\n" + "".join(f"{token}  # {name}\n" for name, token in TOKENS.items()))
    return daemons.federation(
        directory,
        secret=PB_SECRET,
        rounds=ROUNDS,
        min_clients=3,
        heartbeat_timeout=2.0,
        admit_timeout=3.0,
        call_timeout=None,
        participants={"authentication": "enrolment_tokens", "enrolment_tokens_file": str(tokens_file)},
        kind=Federation,
    )


def get_with_headers(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5.0) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def expected_model(participants: list[StepParticipant]) -> np.ndarray:
    model: np.ndarray | None = None
    for _ in range(ROUNDS):
        base = np.ones(SHAPE, dtype=np.float32) if model is None else model
        results = [((base + np.float32(p.step)).astype(np.float32), p.samples) for p in participants]
        total = sum(samples for _, samples in results)
        model = (sum(np.float64(samples) * weights.astype(np.float64) for weights, samples in results) / np.float64(total)).astype(np.float32)
    assert model is not None
    return model


@pytest_twisted.ensureDeferred
async def test_a_training_with_enrolment_tokens_refuses_the_others_and_leaks_no_secret(tmp_path: Path) -> None:
    with federation(tmp_path) as fed:
        # Refused before anyone trains: no token, an unlisted one, a PB rendez-vous without one.
        for headers in ({}, {"Authorization": f"Bearer {UNLISTED}"}, {"Authorization": f"Basic {TOKENS['A']}"}):
            code, answer = get_with_headers(f"{fed.http_url}/rendez_vous", headers)
            assert (code, answer["code"]) == (401, "not_authenticated"), answer
            fed.error_bodies.append(str(answer))
        outsiders = [StepParticipant(100.0, 1), StepParticipant(200.0, 1)]
        outsider_runs: list[list[Any]] = [[], []]
        for participant, outcome, url, token in zip(outsiders, outsider_runs, (fed.http_url, fed.pb_url), (None, UNLISTED)):
            _, done = start_participant(participant, url, reactor=reactor, heartbeat_period=0.2, retry=FAST_RETRY, enrolment_token=token)
            done.addBoth(outcome.append)
        await wait_until(lambda: all(outsider_runs), STEP_TIMEOUT, "the participants without a valid token to give up")
        for outcome in outsider_runs:
            assert not isinstance(outcome[0], ParticipantSummary)
            assert "not_authenticated" in str(outcome[0].value), outcome[0]
            fed.error_bodies.append(str(outcome[0].value))
        assert sum(fed.status()["participants"].values()) == 0

        participants = [StepParticipant(1.0, 10), StepParticipant(2.5, 30), StepParticipant(-0.75, 60)]
        clients = [RecordingHttpClient(reactor, persistent=False) for _ in participants]
        outcomes: list[list[Any]] = [[], [], []]
        for participant, client, outcome, url, name in zip(participants, clients, outcomes, (fed.http_url, fed.http_url, fed.pb_url), "ABC"):
            _, done = start_participant(
                participant, url, reactor=reactor, heartbeat_period=0.2, retry=FAST_RETRY, http=client, enrolment_token=TOKENS[name], name=name
            )
            done.addBoth(outcome.append)
        await wait_until(lambda: all(outcomes), STEP_TIMEOUT, "the three participants to finish")
        for client in clients:
            await client.close()
        summaries = [outcome[0] for outcome in outcomes]
        assert all(isinstance(summary, ParticipantSummary) for summary in summaries), summaries
        assert [summary.rounds_delivered for summary in summaries] == [list(range(ROUNDS))] * 3
        final = np.load(fed.aggregator_state / f"model-{ROUNDS}.npy", allow_pickle=False)
        np.testing.assert_allclose(final, expected_model(participants), rtol=1e-6)
        status = fed.status()
        assert (status["round"], status["phase"]) == (ROUNDS, "complete")

        participant_tokens = set().union(*(client.tokens for client in clients))
        assert len(participant_tokens) == 3 * ROUNDS
        secrets = [*TOKENS.values(), UNLISTED, PB_SECRET, *participant_tokens]
        logs = fed.coordinator.log_text + fed.coordinator.output + fed.aggregator.log_text + fed.aggregator.output
        assert "not_authenticated" in "".join(fed.error_bodies)
        for secret in secrets:
            assert secret not in logs
            assert all(secret not in body for body in fed.error_bodies)


def test_an_unreadable_token_file_stops_startup_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing-tokens"
    document = coordinator_document(
        state_dir=tmp_path / "state", aggregator_port=free_loopback_port(), secret=PB_SECRET, federated_learning={"rounds": 1}
    )
    document["participants"] = {"authentication": "enrolment_tokens", "enrolment_tokens_file": str(missing)}
    config = write_yaml(tmp_path / "coordinator.yaml", document)
    result = run_to_exit("xain-coordinator", config, tmp_path / "coordinator.log", cwd=tmp_path)
    assert result.returncode > 0, result.stdout
    assert result.stdout.splitlines() == ["config error: participants.enrolment_tokens_file: cannot read: No such file or directory"]
