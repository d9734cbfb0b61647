"""`xain-dummy-participants`: many participants in one process, for demos and load.

All participants share one reactor and one HTTP connection pool; each
returns the same read-only weights array (uploads are streamed straight from
it) and only counts what it downloads, so the tool stays cheap enough to be
the load generator of the benchmarks.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from twisted.internet.defer import DeferredList
from twisted.logger import FilteringLogObserver, LogLevel, LogLevelFilterPredicate, globalLogBeginner, textFileLogObserver
from twisted.python.failure import Failure

from xaind.logs import set_level
from xaind.sdk import Participant, ParticipantSummary, start_participant
from xaind.sdk.http import HttpClient
from xaind.sdk.tls import CABundleError, ClientCertificateError, load_client_certificate, load_trust_root

MODEL_SIZES = {
    "100B": 100,
    "1kB": 1_000,
    "100kB": 100_000,
    "1MB": 1_000_000,
    "5MB": 5_000_000,
    "10MB": 10_000_000,
    "50MB": 50_000_000,
    "100MB": 100_000_000,
}


@dataclass
class RoundProgress:
    started: float
    results: int = 0
    bytes_moved: int = 0


@dataclass
class Progress:
    """One line per round, printed when the next round starts or training ends."""

    started: float = field(default_factory=time.monotonic)
    rounds: dict[int, RoundProgress] = field(default_factory=dict)
    printed: set[int] = field(default_factory=set)

    def selected(self, round_number: int) -> None:
        if round_number not in self.rounds:
            self.rounds[round_number] = RoundProgress(started=time.monotonic())
            for earlier in sorted(self.rounds):
                if earlier < round_number:
                    self.report(earlier)

    def delivered(self, round_number: int, bytes_moved: int) -> None:
        progress = self.rounds.setdefault(round_number, RoundProgress(started=time.monotonic()))
        progress.results += 1
        progress.bytes_moved += bytes_moved

    def report(self, round_number: int) -> None:
        if round_number in self.printed:
            return
        self.printed.add(round_number)
        progress = self.rounds[round_number]
        following = self.rounds.get(round_number + 1)
        end = following.started if following is not None else time.monotonic()
        print(
            f"round {round_number}: {progress.results} result(s) uploaded, "
            f"{progress.bytes_moved / 1e6:.1f} MB moved, {end - progress.started:.2f} s",
            flush=True,
        )

    def finish(self) -> None:
        for round_number in sorted(self.rounds):
            self.report(round_number)


class DummyParticipant(Participant):
    """Returns the same weights every round: no training, no copies."""

    def __init__(self, weights: np.ndarray, samples: int, progress: Progress) -> None:
        self.weights = weights
        self.samples = samples
        self.progress = progress
        self.downloaded = 0

    def on_round_started(self, round_number: int) -> None:
        self.progress.selected(round_number)

    def on_global_model_size(self, size: int) -> None:
        self.downloaded = size

    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        return self.weights, self.samples

    def on_round_delivered(self, round_number: int) -> None:
        self.progress.delivered(round_number, self.downloaded + self.weights.nbytes)


class WholeNumberParticipant(DummyParticipant):
    """Trains: half the global model, rounded down, plus a whole-number vector of its own.

    Its results differ between participants and rounds, yet every one is
    whole numbers, so every sum an aggregator or a shard makes is exact
    (docs/scale.rst): any run of the same participants, one aggregator or
    sharded, rounds repeated or not, gives the same models bit for bit.
    """

    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        if weights is None:
            return self.weights, self.samples
        return np.floor(weights / 2).astype(np.float32) + self.weights, self.samples


def whole_number_weights(index: int, elements: int) -> np.ndarray:
    """Participant `index`'s own vector: whole numbers in [-8, 8], different for each participant."""
    return ((np.arange(elements) * (2 * index + 1) + index) % 17 - 8).astype(np.float32)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="xain-dummy-participants",
        description="Run N dummy participants in one process through a whole training.",
    )
    parser.add_argument("--number-of-participants", "-n", type=int, default=10, metavar="N")
    parser.add_argument("--heartbeat-period", type=float, default=1.0, metavar="SECONDS")
    parser.add_argument("--coordinator-url", default="http://localhost:8081", metavar="URL")
    parser.add_argument("--model-size", choices=list(MODEL_SIZES), default="1kB")
    parser.add_argument(
        "--transport",
        choices=("http", "pb"),
        default=None,
        help="http: poll with heartbeats; pb: the coordinator pushes selections "
        "(the URL then names the PB port, e.g. pb://localhost:5555; an http:// URL is turned into "
        "pb://HOST:5555). Default: taken from the URL.",
    )
    parser.add_argument(
        "--ca-file",
        default=None,
        metavar="PEM",
        help="verify https:// and pbs:// servers (the coordinator and the aggregator) against the CA "
        "certificates in this PEM bundle instead of the platform's",
    )
    parser.add_argument(
        "--enrolment-token-file",
        default=None,
        metavar="PATH",
        help="enrolment tokens for a coordinator that asks for them (participants.authentication: "
        "enrolment_tokens), one a line, # comments: participant i shows the i-th, or all show the only one",
    )
    parser.add_argument(
        "--client-certificate",
        default=None,
        metavar="PEM",
        help="the certificate every participant shows to a TLS server that asks for one, the credential of "
        "participants.authentication: client_certificates (with its private key, unless --client-key)",
    )
    parser.add_argument("--client-key", default=None, metavar="PEM", help="the private key of --client-certificate")
    parser.add_argument(
        "--whole-number-training",
        action="store_true",
        help="each round, return half the global model rounded down plus a whole-number vector of one's own, "
        "instead of the same weights: results differ, every sum is exact, and any run of the same participants "
        "(one aggregator or sharded) gives the same models bit for bit",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log every step of every participant")
    arguments = parser.parse_args(argv)
    if arguments.number_of_participants < 1:
        parser.error("--number-of-participants must be at least 1")
    if arguments.heartbeat_period <= 0:
        parser.error("--heartbeat-period must be positive")
    scheme = urlsplit(arguments.coordinator_url).scheme
    if scheme not in ("http", "https", "pb", "pbs"):
        parser.error(f"--coordinator-url must start with http://, https://, pb:// or pbs://, got {arguments.coordinator_url!r}")
    if arguments.transport == "pb" and scheme not in ("pb", "pbs"):
        host = urlsplit(arguments.coordinator_url).hostname or "localhost"
        arguments.coordinator_url = f"{'pbs' if scheme == 'https' else 'pb'}://{host}:5555"
    elif arguments.transport == "http" and scheme in ("pb", "pbs"):
        parser.error("--transport http needs an http:// or https:// coordinator URL")
    arguments.trust_root = None
    if arguments.ca_file is not None:
        try:
            arguments.trust_root = load_trust_root(arguments.ca_file)
        except CABundleError as error:
            parser.exit(2, f"{parser.prog}: error: --ca-file: {error}\n")
    arguments.client_pair = None
    if arguments.client_key is not None and arguments.client_certificate is None:
        parser.error("--client-key needs --client-certificate")
    if arguments.client_certificate is not None:
        try:
            arguments.client_pair = load_client_certificate(arguments.client_certificate, arguments.client_key)
        except ClientCertificateError as error:
            parser.exit(2, f"{parser.prog}: error: --client-certificate: {error}\n")
    arguments.enrolment_tokens = [None] * arguments.number_of_participants
    if arguments.enrolment_token_file is not None:
        problem, tokens = read_enrolment_tokens(arguments.enrolment_token_file, arguments.number_of_participants)
        if problem is not None:
            parser.exit(2, f"{parser.prog}: error: --enrolment-token-file: {problem}\n")
        arguments.enrolment_tokens = tokens
    return arguments


def read_enrolment_tokens(path: str, participants: int) -> tuple[str | None, list[str | None]]:
    """(a problem, or None; one token per participant) from a file of one token a line, or of a single token for all."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        return f"cannot read {path}: {getattr(error, 'strerror', None) or error}", []
    tokens = [token for token in (line.split("#", 1)[0].strip() for line in lines) if token]
    if len(tokens) == 1:
        return None, [tokens[0]] * participants
    if len(tokens) < participants:
        return f"{path} has {len(tokens)} token(s), fewer than the {participants} participant(s) (give one each, or a single one for all)", []
    return None, list(tokens[:participants])


def run(arguments: argparse.Namespace, reactor: Any) -> Any:
    """Start every participant; returns a Deferred firing with their outcomes."""
    elements = max(1, MODEL_SIZES[arguments.model_size] // 4)
    weights = np.linspace(-1.0, 1.0, elements, dtype=np.float32)
    weights.setflags(write=False)
    progress = Progress()
    http = HttpClient(
        reactor, max_connections=2 * arguments.number_of_participants, trust_root=arguments.trust_root, client_certificate=arguments.client_pair
    )
    runs = []
    for index in range(arguments.number_of_participants):
        if arguments.whole_number_training:
            participant: DummyParticipant = WholeNumberParticipant(whole_number_weights(index, elements), 1 + index % 7, progress)
        else:
            participant = DummyParticipant(weights, samples=1 + index % 7, progress=progress)
        _, done = start_participant(
            participant,
            arguments.coordinator_url,
            reactor=reactor,
            heartbeat_period=arguments.heartbeat_period,
            http=http,
            train_in_thread=False,
            # The global model is kept only for participants that train from it.
            keep_downloads=arguments.whole_number_training,
            name=f"dummy-{index}",
            enrolment_token=arguments.enrolment_tokens[index],
        )
        runs.append(done)
    finished = DeferredList(runs, consumeErrors=True)
    finished.addCallback(lambda results: (progress, results))
    finished.addBoth(lambda outcome: http.close().addCallback(lambda _: outcome))
    return finished


def summarise(progress: Progress, results: list[tuple[bool, Any]], started: float) -> int:
    progress.finish()
    summaries = [value for ok, value in results if ok]
    failures = [value for ok, value in results if not ok]
    elapsed = time.monotonic() - started
    moved = sum(s.bytes_downloaded + s.bytes_uploaded for s in summaries if isinstance(s, ParticipantSummary))
    rounds = len(progress.rounds)
    print(
        f"summary: {len(summaries)} participant(s) finished, {len(failures)} failed; "
        f"{rounds} round(s); {moved / 1e6:.1f} MB moved; {elapsed:.2f} s",
        flush=True,
    )
    # Participants failing alike (a server not trusted) say so once.
    messages = dict.fromkeys(failure.getErrorMessage() if isinstance(failure, Failure) else str(failure) for failure in failures)
    for message in list(messages)[:5]:
        print(f"failed: {message}", file=sys.stderr)
    return 0 if not failures else 1


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    from twisted.internet import reactor

    level = LogLevel.debug if arguments.verbose else LogLevel.warn
    set_level(level.name)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])], redirectStandardIO=False)
    print(
        f"{arguments.number_of_participants} dummy participant(s), model {arguments.model_size}, "
        f"coordinator {arguments.coordinator_url}",
        flush=True,
    )
    started = time.monotonic()
    status: list[int] = []

    def begin() -> None:
        finished = run(arguments, reactor)
        finished.addCallback(lambda outcome: status.append(summarise(outcome[0], outcome[1], started)))
        finished.addErrback(lambda failure: (print(f"failed: {failure.getErrorMessage()}", file=sys.stderr), status.append(1)))
        finished.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(begin)
    reactor.run()
    if not status:
        print("interrupted", file=sys.stderr)
        return 130
    return status[0]


if __name__ == "__main__":
    sys.exit(main())
