"""Both real daemons with metrics on, driven by hand over HTTP, their /metrics scraped at each step.

tests/test_metrics.py checks what the scrapes show as a training runs;
tests/test_metrics_dashboard.py checks that every metric the Grafana
dashboard queries is in them. Nothing here needs a reactor: every request
blocks (on loopback, with a timeout), every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from xaind.metrics import AGGREGATOR_METRICS_LISTENER, COORDINATOR_METRICS_LISTENER
from xaind.protocol import AGGREGATOR_HTTP_LISTENER, COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.tools.daemons import (
    LOOPBACK_ANY_PORT,
    Daemon,
    aggregator_document,
    coordinator_document,
    free_loopback_port,
    get_json,
    write_yaml,
)

#: Bound on one request, and on one wait for a state.
REQUEST_TIMEOUT = 5.0
WAIT_TIMEOUT = 20.0

#: What a sample is keyed by: its name (with suffix) and its labels, sorted.
SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def scrape(url: str) -> str:
    """The text of `GET url` (a /metrics page); it must answer 200."""
    with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as answer:
        assert answer.status == 200
        return answer.read().decode("utf-8")


@dataclass(frozen=True)
class Scrape:
    """One /metrics page, parsed."""

    text: str
    #: Every family's name as the parser gives it (a counter's without `_total`).
    families: frozenset[str]
    values: dict[SampleKey, float]

    @classmethod
    def of(cls, text: str) -> Scrape:
        families: set[str] = set()
        values: dict[SampleKey, float] = {}
        for family in text_string_to_metric_families(text):
            families.add(family.name)
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return cls(text, frozenset(families), values)

    def value(self, sample: str, **labels: str) -> float:
        """The value of one sample (KeyError if absent)."""
        return self.values[(sample, tuple(sorted(labels.items())))]

    def sample_names(self) -> frozenset[str]:
        return frozenset(sample for sample, _ in self.values)


@dataclass
class HttpParticipant:
    """A participant speaking the seed's HTTP protocol one blocking request at a time."""

    coordinator_url: str
    participant_id: str = ""
    aggregator_url: str = ""
    token: str = ""
    #: Every id and token handed out, to look for in what must not show them.
    secrets: list[str] = field(default_factory=list)

    def _get(self, url: str) -> dict[str, Any]:
        code, answer = get_json(url, REQUEST_TIMEOUT)
        assert code == 200, (url, code, answer)
        return answer

    def rendez_vous(self) -> None:
        answer = self._get(f"{self.coordinator_url}/rendez_vous")
        assert answer["ok"], answer
        self.participant_id = answer["id"]
        self.secrets.append(self.participant_id)

    def heartbeat(self) -> dict[str, Any]:
        return self._get(f"{self.coordinator_url}/heartbeat/{self.participant_id}")

    def start_training(self) -> None:
        answer = self._get(f"{self.coordinator_url}/start_training/{self.participant_id}")
        assert answer["ok"], answer
        self.aggregator_url, self.token = answer["url"], answer["token"]
        self.secrets.append(self.token)

    def download(self) -> bytes:
        with urllib.request.urlopen(f"{self.aggregator_url}/{self.participant_id}/{self.token}", timeout=REQUEST_TIMEOUT) as answer:
            return answer.read()

    def upload(self, body: bytes, token: str | None = None) -> tuple[int, dict[str, Any]]:
        """POST `body` as this participant's result (with another `token` if given): the status and JSON answer."""
        url = f"{self.aggregator_url}/{self.participant_id}/{self.token if token is None else token}"
        request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            with refused:
                return refused.code, json.loads(refused.read())


def local_result(weights: np.ndarray, samples: int = 10) -> bytes:
    """An upload body: the samples as 4 bytes big-endian, then the weights as `.npy`."""
    stream = io.BytesIO()
    np.save(stream, weights, allow_pickle=False)
    return struct.pack(">I", samples) + stream.getvalue()


@dataclass
class MetricsFederation:
    """A coordinator and an aggregator, each with its metrics listener, that know each other."""

    coordinator: Daemon
    aggregator: Daemon

    @property
    def http_url(self) -> str:
        return self.coordinator.url(COORDINATOR_HTTP_LISTENER).rstrip("/")

    def status(self) -> dict[str, Any]:
        code, answer = get_json(f"{self.http_url}/status", REQUEST_TIMEOUT)
        assert code == 200, answer
        return answer

    def wait_for_status(self, condition: Any, what: str) -> dict[str, Any]:
        return self.coordinator.wait_for(lambda: (lambda status: status if condition(status) else None)(self.status()), what, WAIT_TIMEOUT)

    def coordinator_metrics(self) -> Scrape:
        return Scrape.of(scrape(self.coordinator.url(COORDINATOR_METRICS_LISTENER, "/metrics")))

    def aggregator_metrics(self) -> Scrape:
        return Scrape.of(scrape(self.aggregator.url(AGGREGATOR_METRICS_LISTENER, "/metrics")))

    def describe(self) -> str:
        return (
            f"--- coordinator log ---\n{self.coordinator.log_text}{self.coordinator.output}\n"
            f"--- aggregator log ---\n{self.aggregator.log_text}{self.aggregator.output}"
        )


@contextlib.contextmanager
def metrics_federation(directory: Path, *, rounds: int, min_clients: int) -> Iterator[MetricsFederation]:
    """Both daemons on loopback with `metrics.listen` on an OS-chosen port; stopped at exit."""
    aggregator_port = free_loopback_port()
    metrics = {"listen": LOOPBACK_ANY_PORT}
    with contextlib.ExitStack() as stack:
        coordinator_dir, aggregator_dir = directory / "coordinator", directory / "aggregator"
        coordinator_dir.mkdir(parents=True)
        aggregator_dir.mkdir(parents=True)
        document = coordinator_document(
            state_dir=coordinator_dir / "state",
            aggregator_port=aggregator_port,
            federated_learning={
                "rounds": rounds,
                "participants_ratio": 1.0,
                "min_clients": min_clients,
                "heartbeat_timeout": 30.0,
                "training_timeout": 60.0,
            },
            aggregator={"admit_timeout": 5.0, "aggregation_timeout": 30.0},
        )
        document["metrics"] = metrics
        config = write_yaml(coordinator_dir / "coordinator.yaml", document)
        coordinator = stack.enter_context(
            Daemon(
                "xain-coordinator",
                config,
                coordinator_dir,
                listeners=(COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER, COORDINATOR_METRICS_LISTENER),
            )
        )
        document = aggregator_document(
            state_dir=aggregator_dir / "state", port=aggregator_port, coordinator_pb_port=coordinator.ports[COORDINATOR_PB_LISTENER]
        )
        document["metrics"] = metrics
        config = write_yaml(aggregator_dir / "aggregator.yaml", document)
        aggregator = stack.enter_context(
            Daemon("xain-aggregator", config, aggregator_dir, listeners=(AGGREGATOR_HTTP_LISTENER, AGGREGATOR_METRICS_LISTENER))
        )
        fed = MetricsFederation(coordinator, aggregator)
        try:
            fed.wait_for_status(lambda status: status["aggregator_attached"], "the aggregator to attach")
            yield fed
        except BaseException:
            print(fed.describe())
            raise


@dataclass
class Training:
    """What `short_training` saw: scrapes of both daemons at each step, and the secrets handed out."""

    coordinator: dict[str, Scrape] = field(default_factory=dict)
    aggregator: dict[str, Scrape] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)

    def scrape(self, fed: MetricsFederation, step: str) -> None:
        self.coordinator[step] = fed.coordinator_metrics()
        self.aggregator[step] = fed.aggregator_metrics()


def short_training(fed: MetricsFederation, participants: int = 2, rounds: int = 2) -> Training:
    """`rounds` rounds with `participants` hand-driven participants, two uploads refused on the way, scraped at each step.

    Steps: "start" (nobody yet), "selected" (all rendez-voused and
    selected), "refused" (an upload with a wrong token, one with a
    malformed body), then "round <n>" after each aggregated round (each
    participant downloads the model, uploads its result).
    """
    training = Training()
    training.scrape(fed, "start")
    team = [HttpParticipant(fed.http_url) for _ in range(participants)]
    for participant in team:
        participant.rendez_vous()
    fed.wait_for_status(lambda status: status["participants"]["selected"] == participants, "the participants to be selected")
    training.scrape(fed, "selected")
    weights = np.linspace(-1.0, 1.0, 16, dtype=np.float32)
    for number in range(rounds):
        for participant in team:
            assert participant.heartbeat()["state"] == "round"
            participant.start_training()
            participant.download()
        if number == 0:
            first = team[0]
            wrong = "not-the-token-" + "x" * 20
            training.secrets.append(wrong)
            code, answer = first.upload(local_result(weights), token=wrong)
            assert answer.get("code") == "unknown_token", (code, answer)
            code, answer = first.upload(b"\x00\x00\x00\x0anot an npy stream at all")
            assert answer.get("code") == "malformed_upload", (code, answer)
            training.scrape(fed, "refused")
        for participant in team:
            code, answer = participant.upload(local_result(weights))
            assert (code, answer) == (200, {"ok": True}), (code, answer)
        fed.wait_for_status(lambda status, n=number: status["round"] == n + 1, f"round {number} to be aggregated")
        if number + 1 < rounds:
            fed.wait_for_status(lambda status: status["participants"]["selected"] == participants, "the next selection")
        training.scrape(fed, f"round {number}")
    for participant in team:
        training.secrets.extend(participant.secrets)
    return training
