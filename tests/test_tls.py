"""TLS by configuration: `ssl:` listeners on both daemons, verifying clients.

A throwaway certificate authority is made in each test with `trustme`; the
daemons are the real ones (`twistd -n` subprocesses on 127.0.0.1, OS-chosen
ports), their certificates issued for "localhost" (the name every client
verifies).
"""

from __future__ import annotations

import contextlib
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.python.failure import Failure

from xaind.config import server_endpoint_problem
from xaind.protocol import AGGREGATOR_HTTP_LISTENER as AGGREGATOR_HTTP
from xaind.protocol import COORDINATOR_HTTP_LISTENER as COORDINATOR_HTTP
from xaind.protocol import COORDINATOR_PB_LISTENER as COORDINATOR_PB
from xaind.sdk import Participant, ParticipantError, ParticipantSummary, start_participant
from xaind.sdk.runner import RetryPolicy
from xaind.sdk.tls import PeerNotTrusted
from xaind.testing.waiting import wait_until
from xaind.tools.daemons import (
    LOOPBACK_ANY_PORT,
    Daemon,
    Federation,
    ServerCertificates,
    dummy_participants_command,
    federation,
    get_json,
    run_to_exit,
    write_yaml,
)

PB_SECRET = "tls-test-secret"
HOSTNAME = "localhost"
#: Bound on one awaited step (a training, a refusal).
STEP_TIMEOUT = 60.0
FAST_RETRY = RetryPolicy(initial_delay=0.1, max_delay=0.5, retry_timeout=30.0)
SHAPE = (5, 7)


def make_certificates(directory: Path, *hostnames: str) -> ServerCertificates:
    directory.mkdir(parents=True, exist_ok=True)
    hostnames = hostnames or (HOSTNAME,)
    authority = trustme.CA()
    issued = authority.issue_cert(*hostnames)
    certificates = ServerCertificates(directory / "ca.pem", directory / "server.pem", directory / "server.key", hostnames[0])
    authority.cert_pem.write_to_path(str(certificates.ca))
    issued.cert_chain_pems[0].write_to_path(str(certificates.certificate))
    issued.private_key_pem.write_to_path(str(certificates.key))
    return certificates


def dummy_participants(*arguments: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`xain-dummy-participants` with `arguments`, run to its end."""
    return subprocess.run([*dummy_participants_command(), *arguments], capture_output=True, text=True, timeout=timeout, check=False)


# -- start-up refuses unusable certificates and keys ---------------------------------------------


def unusable_key_files(certificates: ServerCertificates, directory: Path) -> dict[str, tuple[str, str]]:
    """(privateKey, certKey) pairs that cannot serve TLS, by what is wrong with them."""
    junk = directory / "junk.pem"
    junk.write_text("not a PEM file\n", encoding="utf-8")
    return {
        "missing-key": (str(directory / "missing.key"), str(certificates.certificate)),
        "key-is-a-directory": (str(directory), str(certificates.certificate)),
        "key-file-holds-no-key": (str(certificates.certificate), str(certificates.certificate)),
        "certificate-file-holds-no-certificate": (str(certificates.key), str(junk)),
    }


@pytest.mark.parametrize("case", ["missing-key", "key-is-a-directory", "key-file-holds-no-key", "certificate-file-holds-no-certificate"])
def test_unusable_certificate_or_key_is_a_problem_of_the_endpoint(tmp_path: Path, case: str) -> None:
    certificates = make_certificates(tmp_path / "tls")
    key, certificate = unusable_key_files(certificates, tmp_path)[case]
    description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
    problem = server_endpoint_problem(description)
    assert problem is not None and problem.startswith("not a valid endpoint ("), problem
    assert problem.endswith(f"got {description!r}")
    assert "\n" not in problem


@pytest.mark.parametrize(
    ("plugin", "section"),
    [("xain-coordinator", "api"), ("xain-coordinator", "pb"), ("xain-aggregator", "api")],
    ids=["coordinator-http", "coordinator-pb", "aggregator-http"],
)
def test_daemon_with_an_unusable_key_refuses_to_start_with_one_line(tmp_path: Path, plugin: str, section: str) -> None:
    certificates = make_certificates(tmp_path / "tls")
    key, certificate = unusable_key_files(certificates, tmp_path)["key-file-holds-no-key"]
    listen = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
    if plugin == "xain-coordinator":
        document: dict[str, Any] = {
            "api": {"listen": LOOPBACK_ANY_PORT},
            "pb": {"listen": LOOPBACK_ANY_PORT, "secret": PB_SECRET},
            "aggregator": {"url": "https://localhost:8082"},
            "state_dir": str(tmp_path / "state"),
        }
    else:
        document = {
            "api": {"listen": LOOPBACK_ANY_PORT},
            "coordinator": {"pb": "tcp:127.0.0.1:5555", "secret": PB_SECRET},
            "state_dir": str(tmp_path / "state"),
        }
    document[section]["listen"] = listen
    config = write_yaml(tmp_path / "daemon.yaml", document)
    result = run_to_exit(plugin, config, tmp_path / "daemon.log", cwd=tmp_path)
    assert result.returncode > 0, result.stdout
    assert "Traceback" not in result.stdout
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith(f"config error: {section}.listen: not a valid endpoint ("), lines[0]
    assert lines[0].endswith(f"got {listen!r}")


# -- a federation over TLS -----------------------------------------------------------------------


def tls_federation(
    directory: Path,
    *,
    rounds: int,
    min_clients: int,
    certificates: ServerCertificates | None = None,
    api_listen: str | None = None,
    pb_listen: str | None = None,
    participants: dict[str, Any] | None = None,
    link: dict[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Federation]:
    """Both daemons with every listener on TLS, the aggregator's PB link verifying the coordinator.

    The coordinator's listeners are `ssl:` unless `api_listen` or
    `pb_listen` say otherwise (on port 0); `participants` is its
    participants section, `link` keys added to the aggregator's
    coordinator section.
    """
    return federation(
        directory,
        secret=PB_SECRET,
        rounds=rounds,
        min_clients=min_clients,
        heartbeat_timeout=5.0,
        admit_timeout=5.0,
        call_timeout=10.0,
        tls=certificates or make_certificates(directory / "tls"),
        api_listen=api_listen,
        pb_listen=pb_listen,
        participants=participants or {},
        link=link,
    )


class AddingParticipant(Participant):
    """Returns ones * step in round 0, then the downloaded model + step; records each round."""

    def __init__(self, name: str, step: float, samples: int) -> None:
        self.name = name
        self.step = step
        self.samples = samples
        self.current_round: int | None = None
        #: round -> (downloaded weights or None, returned weights)
        self.trainings: dict[int, tuple[np.ndarray | None, np.ndarray]] = {}

    def on_round_started(self, round_number: int) -> None:
        self.current_round = round_number

    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        assert self.current_round is not None
        base = np.ones(SHAPE, dtype=np.float32) * np.float32(self.step) if weights is None else weights + np.float32(self.step)
        returned = base.astype(np.float32)
        self.trainings[self.current_round] = (None if weights is None else weights.copy(), returned.copy())
        return returned, self.samples


def expected_models(participants: list[AddingParticipant], rounds: int) -> list[np.ndarray]:
    """The global model after each round, from the participants' rules alone."""
    models: list[np.ndarray] = []
    for round_number in range(rounds):
        results = []
        for participant in participants:
            base = np.full(SHAPE, participant.step, dtype=np.float32) if not models else models[-1] + np.float32(participant.step)
            results.append((participant.samples, base.astype(np.float32)))
        total = sum(samples for samples, _ in results)
        accumulated = sum(np.float64(samples) * weights.astype(np.float64) for samples, weights in results)
        models.append((accumulated / np.float64(total)).astype(np.float32))
    return models


def four_participants() -> list[AddingParticipant]:
    """Two over HTTPS, two over PB with TLS (by their names' prefix), distinct steps and sample counts."""
    return [
        AddingParticipant("https-A", step=1.0, samples=10),
        AddingParticipant("https-B", step=2.5, samples=30),
        AddingParticipant("pbs-C", step=-0.75, samples=60),
        AddingParticipant("pbs-D", step=0.125, samples=7),
    ]


async def train_to_the_end(
    fed: Federation, participants: list[AddingParticipant], rounds: int, **options_of: Callable[[AddingParticipant], Any]
) -> None:
    """Run every participant (trusting the federation's CA, plus `options_of[key](participant)` each) until each finished every round."""
    outcomes: list[list[Any]] = []
    runners = []
    for participant in participants:
        url = fed.http_url if participant.name.startswith("https") else fed.pb_url
        options = {key: option(participant) for key, option in options_of.items()}
        runner, done = start_participant(
            participant, url, reactor=reactor, heartbeat_period=0.2, retry=FAST_RETRY, name=participant.name, ca_file=str(fed.tls.ca), **options
        )
        outcome: list[Any] = []
        done.addBoth(outcome.append)
        outcomes.append(outcome)
        runners.append(runner)
    try:
        await wait_until(lambda: all(outcomes), STEP_TIMEOUT, "every participant to finish over TLS")
    finally:
        for runner, outcome in zip(runners, outcomes):
            if not outcome:
                runner.stop()
        await wait_until(lambda: all(outcomes), 10, "the participants to stop")
    for participant, (summary,) in zip(participants, outcomes):
        assert isinstance(summary, ParticipantSummary), f"{participant.name}: {summary}"
        assert summary.rounds_delivered == list(range(rounds)), (participant.name, summary)


@pytest_twisted.ensureDeferred
async def test_http_and_pb_participants_train_over_tls_with_exact_models(tmp_path: Path) -> None:
    rounds = 3
    participants = four_participants()
    with tls_federation(tmp_path, rounds=rounds, min_clients=len(participants)) as fed:
        await train_to_the_end(fed, participants, rounds)
        models = expected_models(participants, rounds)
        for participant in participants:
            for round_number in range(rounds):
                downloaded, _ = participant.trainings[round_number]
                if round_number == 0:
                    assert downloaded is None
                else:
                    np.testing.assert_array_equal(downloaded, models[round_number - 1], err_msg=f"{participant.name}, round {round_number}")
        final = fed.model(rounds)
        assert final.dtype == np.float32 and final.shape == SHAPE
        np.testing.assert_array_equal(final, models[-1])
        status = fed.status()
        assert (status["round"], status["phase"]) == (rounds, "complete")
        assert "Traceback" not in fed.coordinator.log_text + fed.aggregator.log_text


# -- clients refuse a server they cannot trust ----------------------------------------------------


async def refusal_of(url: str, ca_file: Path) -> Any:
    """What a participant's Deferred fails with when it starts against `url`, trusting `ca_file`."""
    started = time.monotonic()
    outcome = await outcome_of(url, ca_file, None)
    # Refused at once: no retrying with backoff until the retry timeout.
    assert time.monotonic() - started < FAST_RETRY.retry_timeout / 2
    return outcome


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("transport", ["https", "pbs"])
async def test_participant_with_another_ca_is_refused_at_once_in_one_line(tmp_path: Path, transport: str) -> None:
    other_ca = make_certificates(tmp_path / "other").ca
    with tls_federation(tmp_path / "federation", rounds=1, min_clients=1) as fed:
        failure = await refusal_of(fed.http_url if transport == "https" else fed.pb_url, other_ca)
        assert failure.check(PeerNotTrusted), failure
        message = failure.getErrorMessage()
        assert "\n" not in message
        assert re.search(r"TLS refused: .*certificate verify failed", message), message
        assert fed.status()["participants"]["waiting"] == 0
        assert "Traceback" not in fed.coordinator.log_text


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("transport", ["https", "pbs"])
async def test_participant_refuses_a_certificate_for_another_host_in_one_line(tmp_path: Path, transport: str) -> None:
    certificates = make_certificates(tmp_path / "tls", "coordinator.example")
    listen = certificates.listen()
    document = {
        "api": {"listen": listen},
        "pb": {"listen": listen, "secret": PB_SECRET},
        "aggregator": {"url": "https://coordinator.example:8082"},
        "state_dir": str(tmp_path / "state"),
    }
    config = write_yaml(tmp_path / "coordinator.yaml", document)
    with Daemon("xain-coordinator", config, tmp_path, listeners=(COORDINATOR_HTTP, COORDINATOR_PB)) as coordinator:
        port = coordinator.ports[COORDINATOR_HTTP if transport == "https" else COORDINATOR_PB]
        failure = await refusal_of(f"{transport}://{HOSTNAME}:{port}", certificates.ca)
        assert failure.check(PeerNotTrusted), failure
        message = failure.getErrorMessage()
        assert "\n" not in message
        assert "TLS refused: " in message and HOSTNAME in message, message
        assert "Traceback" not in coordinator.log_text


def test_dummy_participants_with_another_ca_fail_with_one_line(tmp_path: Path) -> None:
    other_ca = make_certificates(tmp_path / "other").ca
    with tls_federation(tmp_path / "federation", rounds=1, min_clients=3) as fed:
        for url in (fed.http_url, fed.pb_url):
            result = dummy_participants("-n", "3", "--heartbeat-period", "0.2", "--coordinator-url", url, "--ca-file", str(other_ca), timeout=60)
            assert result.returncode == 1, result
            assert "Traceback" not in result.stderr
            errors = result.stderr.splitlines()
            assert len(errors) == 1, result.stderr
            assert re.fullmatch(r"failed: .*TLS refused: .*certificate verify failed.*", errors[0]), errors[0]
            assert "3 failed" in result.stdout


def test_dummy_participants_with_an_unusable_ca_file_stop_with_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("no certificate here\n", encoding="utf-8")
    result = dummy_participants("--coordinator-url", "https://localhost:1", "--ca-file", str(junk), timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"xain-dummy-participants: error: --ca-file: CA bundle {junk} holds no PEM certificate"]


def test_dummy_participants_train_over_tls(tmp_path: Path) -> None:
    with tls_federation(tmp_path, rounds=2, min_clients=4) as fed:
        result = dummy_participants("-n", "4", "--heartbeat-period", "0.2", "--coordinator-url", fed.pb_url, "--ca-file", str(fed.tls.ca), timeout=120)
        assert result.returncode == 0, result
        assert "summary: 4 participant(s) finished, 0 failed; 2 round(s)" in result.stdout
        assert fed.status()["phase"] == "complete"


def test_aggregator_refuses_a_coordinator_it_cannot_trust_with_one_line(tmp_path: Path) -> None:
    """With another CA, the link never attaches; the aggregator says why, in one error line per attempt."""
    certificates = make_certificates(tmp_path / "tls")
    other_ca = make_certificates(tmp_path / "other").ca
    (tmp_path / "coordinator").mkdir()
    (tmp_path / "aggregator").mkdir()
    coordinator_config = write_yaml(
        tmp_path / "coordinator.yaml",
        {
            "api": {"listen": certificates.listen()},
            "pb": {"listen": certificates.listen(), "secret": PB_SECRET},
            "aggregator": {"url": f"https://{HOSTNAME}:8082"},
            "state_dir": str(tmp_path / "coordinator-state"),
        },
    )
    with Daemon("xain-coordinator", coordinator_config, tmp_path / "coordinator", listeners=(COORDINATOR_HTTP, COORDINATOR_PB)) as coordinator:
        aggregator_config = write_yaml(
            tmp_path / "aggregator.yaml",
            {
                "api": {"listen": LOOPBACK_ANY_PORT},
                "coordinator": {
                    "pb": f"tcp:127.0.0.1:{coordinator.ports[COORDINATOR_PB]}",
                    "secret": PB_SECRET,
                    "ca_file": str(other_ca),
                    "tls_hostname": HOSTNAME,
                },
                "state_dir": str(tmp_path / "aggregator-state"),
            },
        )
        with Daemon("xain-aggregator", aggregator_config, tmp_path / "aggregator", listeners=(AGGREGATOR_HTTP,)) as aggregator:
            line = aggregator.wait_for_log(r"\[xaind\.aggregator\.coordinator_link#error\] .*")
            assert re.search(
                rf"the coordinator's certificate is not trusted for {HOSTNAME} \(.*certificate verify failed.*\): "
                r"check coordinator\.ca_file and coordinator\.tls_hostname$",
                line.group(0),
            ), line.group(0)
            code, status = get_json(f"https://{HOSTNAME}:{coordinator.ports[COORDINATOR_HTTP]}/status", ca_file=certificates.ca)
            assert code == 200 and status["aggregator_attached"] is False
            assert "Traceback" not in aggregator.log_text + coordinator.log_text


# -- the aggregator's link settings ----------------------------------------------------------------


def link_problems(tmp_path: Path, **coordinator: Any) -> list[str]:
    from xaind.aggregator.settings import AggregatorDaemonSettings
    from xaind.config import ConfigError

    document = {"coordinator": {"secret": PB_SECRET, **coordinator}, "state_dir": str(tmp_path / "state")}
    try:
        AggregatorDaemonSettings.from_mapping(document)
    except ConfigError as error:
        return str(error).splitlines()
    return []


def test_link_tls_settings_default_the_hostname_to_the_host_of_pb(tmp_path: Path) -> None:
    from xaind.aggregator.settings import AggregatorDaemonSettings

    ca = make_certificates(tmp_path / "tls").ca
    settings = AggregatorDaemonSettings.from_mapping(
        {"coordinator": {"secret": PB_SECRET, "pb": "tcp:coordinator.example:5555", "ca_file": str(ca)}}
    )
    assert (settings.coordinator.ca_file, settings.coordinator.tls_hostname) == (str(ca), "coordinator.example")
    plain = AggregatorDaemonSettings.from_mapping({"coordinator": {"secret": PB_SECRET}})
    assert (plain.coordinator.ca_file, plain.coordinator.tls_hostname) == (None, None)


def test_unusable_link_tls_settings_are_one_line_each(tmp_path: Path) -> None:
    ca = make_certificates(tmp_path / "tls").ca
    missing = tmp_path / "missing.pem"
    empty = tmp_path / "empty.pem"
    empty.write_text("", encoding="utf-8")
    assert link_problems(tmp_path, ca_file=str(missing)) == [
        f"config error: coordinator.ca_file: CA bundle {missing} cannot be read (No such file or directory)"
    ]
    assert link_problems(tmp_path, ca_file=str(empty)) == [f"config error: coordinator.ca_file: CA bundle {empty} holds no PEM certificate"]
    assert link_problems(tmp_path, ca_file=str(ca), pb="unix:/run/xain/pb.sock") == [
        "config error: coordinator.pb: with ca_file the link is TLS over TCP: give pb as tcp:HOST:PORT, got 'unix:/run/xain/pb.sock'"
    ]
    assert link_problems(tmp_path, tls_hostname="coordinator.example") == [
        "config error: coordinator.tls_hostname: only used with ca_file (the link is plain TCP without it)"
    ]
    issued = issue_participant_certificates(tmp_path / "clients", "aggregator", "other")
    other_key = private_key_file(issued.issued["other"], tmp_path / "other.key")
    assert link_problems(tmp_path, ca_file=str(ca), client_certificate=str(issued.issued["aggregator"])) == []
    assert link_problems(tmp_path, client_certificate=str(issued.issued["aggregator"])) == [
        "config error: coordinator.client_certificate: only used with ca_file (the link is plain TCP without it)"
    ]
    assert link_problems(tmp_path, ca_file=str(ca), client_certificate=str(issued.issued["aggregator"]), client_key=str(other_key)) == [
        f"config error: coordinator.client_certificate: the private key in {other_key} does not belong to the certificate in {issued.issued['aggregator']}"
    ]
    assert link_problems(tmp_path, ca_file=str(ca), client_certificate=str(empty)) == [
        f"config error: coordinator.client_certificate: {empty} holds no PEM certificate"
    ]
    assert link_problems(tmp_path, client_key=str(other_key)) == ["config error: coordinator.client_key: only used with client_certificate"]


# -- xaind-tls: listeners with an optional client CA ---------------------------------------------


def status_with_client_certificate(port: int, ca: Path, client: trustme.LeafCert | None) -> int:
    """The HTTP status of GET /status over TLS, presenting `client`'s certificate if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        client.configure_cert(context)
    with urllib.request.urlopen(f"https://{HOSTNAME}:{port}/status", timeout=5, context=context) as response:
        response.read()
        return response.status


@pytest.mark.parametrize("required", [False, True], ids=["client-certificate-optional", "client-certificate-required"])
def test_xaind_tls_listener_verifies_client_certificates_against_its_client_ca(tmp_path: Path, required: bool) -> None:
    certificates = make_certificates(tmp_path / "tls")
    participants_ca = trustme.CA()
    participants_ca_file = tmp_path / "participants-ca.pem"
    participants_ca.cert_pem.write_to_path(str(participants_ca_file))
    enrolled = participants_ca.issue_cert("participant-1.example")
    stranger = trustme.CA().issue_cert("participant-2.example")
    listen = (
        f"xaind-tls:0:interface=127.0.0.1:privateKey={certificates.key}:certKey={certificates.certificate}"
        f":clientCA={participants_ca_file}:requireClientCertificate={'yes' if required else 'no'}"
    )
    (tmp_path / "coordinator").mkdir()
    config = write_yaml(
        tmp_path / "coordinator.yaml",
        {
            "api": {"listen": listen},
            "pb": {"listen": LOOPBACK_ANY_PORT, "secret": PB_SECRET},
            "aggregator": {"url": f"https://{HOSTNAME}:8082"},
            "state_dir": str(tmp_path / "state"),
        },
    )
    with Daemon("xain-coordinator", config, tmp_path / "coordinator", listeners=(COORDINATOR_HTTP, COORDINATOR_PB)) as coordinator:
        port = coordinator.ports[COORDINATOR_HTTP]
        assert status_with_client_certificate(port, certificates.ca, enrolled) == 200
        with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
            status_with_client_certificate(port, certificates.ca, stranger)
        if required:
            with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
                status_with_client_certificate(port, certificates.ca, None)
        else:
            assert status_with_client_certificate(port, certificates.ca, None) == 200
        # Still serving after the refusals.
        assert status_with_client_certificate(port, certificates.ca, enrolled) == 200
        assert "Traceback" not in coordinator.log_text


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        (":clientCA={junk}", "clientCA {junk} holds no PEM certificate"),
        (":requireClientCertificate=yes", "requireClientCertificate=yes needs clientCA"),
        (":clientCA={ca}:requireClientCertificate=maybe", "requireClientCertificate must be yes or no, got 'maybe'"),
    ],
    ids=["client-ca-without-certificates", "required-without-client-ca", "required-neither-yes-nor-no"],
)
def test_unusable_xaind_tls_listener_is_one_config_line(tmp_path: Path, arguments: str, problem: str) -> None:
    certificates = make_certificates(tmp_path / "tls")
    junk = tmp_path / "junk.pem"
    junk.write_text("no certificate\n", encoding="utf-8")
    arguments = arguments.format(junk=junk, ca=certificates.ca)
    listen = f"xaind-tls:0:interface=127.0.0.1:privateKey={certificates.key}:certKey={certificates.certificate}{arguments}"
    config = write_yaml(
        tmp_path / "coordinator.yaml",
        {
            "api": {"listen": listen},
            "pb": {"listen": LOOPBACK_ANY_PORT, "secret": PB_SECRET},
            "state_dir": str(tmp_path / "state"),
        },
    )
    result = run_to_exit("xain-coordinator", config, tmp_path / "coordinator.log", cwd=tmp_path)
    assert result.returncode > 0
    assert result.stdout.splitlines() == [
        f"config error: api.listen: not a valid endpoint ({problem.format(junk=junk)}), got {listen!r}"
    ], result.stdout


# -- participants authenticated by client certificate ---------------------------------------------


@dataclass(frozen=True)
class ParticipantCertificates:
    """The participants' CA and, by name, PEM files each holding a certificate it issued and its key."""

    ca: Path
    issued: dict[str, Path]

    def listen(self, server: ServerCertificates, required: bool) -> str:
        return (
            f"xaind-tls:0:interface=127.0.0.1:privateKey={server.key}:certKey={server.certificate}"
            f":clientCA={self.ca}:requireClientCertificate={'yes' if required else 'no'}"
        )


def issue_participant_certificates(directory: Path, *names: str) -> ParticipantCertificates:
    directory.mkdir(parents=True, exist_ok=True)
    authority = trustme.CA()
    ca = directory / "participants-ca.pem"
    authority.cert_pem.write_to_path(str(ca))
    issued = {}
    for name in names:
        path = directory / f"{name}.pem"
        authority.issue_cert(f"{name}.participants.example").private_key_and_cert_chain_pem.write_to_path(str(path))
        issued[name] = path
    return ParticipantCertificates(ca, issued)


def private_key_file(pem: Path, path: Path) -> Path:
    """The private key of `pem` (a key and its certificate) alone in `path`."""
    key = re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\n", pem.read_text(), re.DOTALL)
    assert key is not None
    path.write_text(key.group(0))
    return path


def fingerprint_line(pem: Path) -> str:
    """What `openssl x509 -noout -fingerprint -sha256` prints for the first certificate of `pem`."""
    from OpenSSL import crypto

    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, pem.read_bytes())
    return "sha256 Fingerprint=" + certificate.digest("sha256").decode("ascii")


@contextlib.contextmanager
def certificate_federation(directory: Path, *, rounds: int, min_clients: int, revoked: tuple[str, ...] = ()) -> Iterator[tuple[Federation, ParticipantCertificates]]:
    """Both daemons over TLS with `participants.authentication: client_certificates`.

    The HTTP API asks for a client certificate without requiring one (so a
    participant without one is answered 401); the PB listener requires one,
    so the aggregator's link shows a certificate of its own.
    """
    server = make_certificates(directory / "tls")
    issued = issue_participant_certificates(directory / "participants", "A", "B", "C", "D", "revoked", "aggregator")
    revoked_file = directory / "revoked-certificates"
    revoked_file.write_text("# revoked participants\n" + "".join(f"{fingerprint_line(issued.issued[name])}\n" for name in revoked))
    with tls_federation(
        directory / "federation",
        rounds=rounds,
        min_clients=min_clients,
        certificates=server,
        api_listen=issued.listen(server, required=False),
        pb_listen=issued.listen(server, required=True),
        participants={"authentication": "client_certificates", "revoked_certificates_file": str(revoked_file)},
        link={"client_certificate": str(issued.issued["aggregator"])},
    ) as fed:
        yield fed, issued


async def outcome_of(url: str, ca_file: Path, client_certificate: Path | None) -> Any:
    """How a participant that shows `client_certificate` (or none) ends against `url`."""
    runner, done = start_participant(
        AddingParticipant("refused", step=1.0, samples=1),
        url,
        reactor=reactor,
        heartbeat_period=0.2,
        retry=FAST_RETRY,
        ca_file=str(ca_file),
        client_certificate=None if client_certificate is None else str(client_certificate),
    )
    outcome: list[Any] = []
    done.addBoth(outcome.append)
    try:
        await wait_until(lambda: outcome, 20, f"the participant at {url} to end")
    finally:
        if not outcome:
            runner.stop()
            await wait_until(lambda: outcome, 10, "the participant to stop")
    return outcome[0]


@pytest_twisted.ensureDeferred
async def test_client_certificate_participants_train_over_tls_and_others_are_refused(tmp_path: Path) -> None:
    rounds = 3
    with certificate_federation(tmp_path, rounds=rounds, min_clients=4, revoked=("revoked",)) as (fed, issued):
        ca = fed.tls.ca
        stranger = issue_participant_certificates(tmp_path / "strangers", "S").issued["S"]
        # Refused before the training: none of them is ever known, so none can be selected. The HTTP
        # API lets a connection without a certificate in and refuses its rendez-vous; the handshake
        # refuses a certificate of another CA, and the PB listener one without a certificate.
        not_authenticated = "rendez-vous refused: not_authenticated: rendez-vous needs a client certificate from the participants' CA, not revoked"
        cases = [
            (fed.http_url, None, not_authenticated),
            (fed.http_url, issued.issued["revoked"], not_authenticated),
            (fed.http_url, stranger, r"https://localhost:\d+/rendez_vous: TLS refused: .*unknown ca"),
            (fed.pb_url, None, r"PB localhost: TLS refused: .*certificate required.*"),
        ]
        for url, certificate, expected in cases:
            failure = await outcome_of(url, ca, certificate)
            assert isinstance(failure, Failure) and failure.check(ParticipantError), (url, certificate, failure)
            message = failure.getErrorMessage()
            assert "\n" not in message and (message == expected or re.fullmatch(expected, message)), (url, certificate, message)
        assert sum(fed.status()["participants"].values()) == 0

        participants = four_participants()
        await train_to_the_end(fed, participants, rounds, client_certificate=lambda participant: str(issued.issued[participant.name[-1]]))
        models = expected_models(participants, rounds)
        np.testing.assert_array_equal(fed.model(rounds), models[-1])
        status = fed.status()
        assert (status["round"], status["phase"]) == (rounds, "complete")
        log_text = fed.coordinator.log_text
        # The refusals came within one logging.repeat_interval: one line.
        assert [line.split("] ", 1)[1] for line in log_text.splitlines() if "refused a rendez-vous" in line] == [
            "refused a rendez-vous from 127.0.0.1: no client certificate"
        ]
        assert "Traceback" not in log_text + fed.aggregator.log_text


def test_dummy_participants_show_a_client_certificate(tmp_path: Path) -> None:
    with certificate_federation(tmp_path, rounds=2, min_clients=3) as (fed, issued):
        common = ["-n", "3", "--heartbeat-period", "0.2", "--ca-file", str(fed.tls.ca)]
        refused = dummy_participants(*common, "--coordinator-url", fed.http_url, timeout=60)
        assert refused.returncode == 1, refused
        assert refused.stderr.splitlines() == [
            "failed: rendez-vous refused: not_authenticated: rendez-vous needs a client certificate from the participants' CA, not revoked"
        ], refused.stderr
        key_apart = private_key_file(issued.issued["A"], tmp_path / "A.key")
        result = dummy_participants(*common, "--coordinator-url", fed.pb_url, "--client-certificate", str(issued.issued["A"]), "--client-key", str(key_apart), timeout=120)
        assert result.returncode == 0, result
        assert "summary: 3 participant(s) finished, 0 failed; 2 round(s)" in result.stdout
        assert fed.status()["phase"] == "complete"


def test_dummy_participants_with_an_unusable_client_certificate_stop_with_one_line(tmp_path: Path) -> None:
    issued = issue_participant_certificates(tmp_path, "A", "B")
    other_key = private_key_file(issued.issued["B"], tmp_path / "B.key")
    result = dummy_participants("--coordinator-url", "https://localhost:1", "--client-certificate", str(issued.issued["A"]), "--client-key", str(other_key), timeout=60)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"xain-dummy-participants: error: --client-certificate: the private key in {other_key} does not belong to the certificate in {issued.issued['A']}"
    ]
