"""Participant authentication by enrolment token: the HTTP API in memory, the PB rendez-vous, the configuration.

The coordinator service runs on a `Clock`; its site is spoken to in raw
HTTP/1.1 (`xaind.testing.memory_http`). docs/http-api.rst (Authentication)
is the contract.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher

from xaind.config import ConfigError, ConfigReader
from xaind.coordinator.authentication import ParticipantAuthenticator
from xaind.coordinator.credential_files import EnrolmentTokens, RevokedCertificates
from xaind.coordinator.http_api import coordinator_site
from xaind.coordinator.pb import ParticipantPerspective, RefusedByCoordinator
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import (
    AggregatorSettings,
    CoordinatorSettings,
    FederatedLearningSettings,
    ParticipantAuthentication,
    read_participant_authentication,
)
from xaind.protocol import ErrorCode, Refusal
from xaind.testing.fakes import FakeAggregator
from xaind.testing.memory_http import HTTPResponse, MemoryHTTP

ALICE = "3f1c0a6e9b2d4c8e7a5f1b3d9c0e2a4f"
BOB = "a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5"
SECRET = "pb-secret-for-the-configuration-tests-0123"


def write_tokens(path: Path, tokens: list[str], bump: int) -> None:
    path.write_text("# enrolment tokens\n" + "".join(f"{token}\n" for token in tokens))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))


@dataclass
class Harness:
    service: CoordinatorService
    clock: Clock
    http: MemoryHTTP
    tokens_file: Path

    def rendez_vous(self, token: str | None = None, header: bytes | None = None) -> HTTPResponse:
        if header is None and token is not None:
            header = b"Bearer " + token.encode()
        headers = {b"Authorization": header} if header is not None else None
        return self.http.request(b"GET", b"/rendez_vous", headers).response()

    def heartbeat(self, participant_id: str) -> dict:
        answer = self.http.request(b"GET", b"/heartbeat/" + participant_id.encode()).response()
        assert answer.code == 200
        return answer.json


def authenticating_service(clock: Clock, authenticator: ParticipantAuthenticator) -> CoordinatorService:
    """A started coordinator of 3 rounds that selects every participant once two are known, asking for credentials."""
    service = CoordinatorService(
        FederatedLearningSettings(rounds=3, participants_ratio=1.0, min_clients=2, heartbeat_timeout=15.0, training_timeout=3600.0),
        AggregatorSettings(url="http://aggregator.test:18082"),
        FakeAggregator(admit_at_once=False),
        clock=clock,
        authenticator=authenticator,
    )
    service.startService()
    return service


@pytest.fixture
def authenticated(tmp_path: Path) -> Iterator[Harness]:
    tokens_file = tmp_path / "tokens"
    write_tokens(tokens_file, [ALICE, BOB], 1)
    clock = Clock()
    service = authenticating_service(clock, ParticipantAuthenticator(EnrolmentTokens(str(tokens_file), clock)))
    site = coordinator_site(service)
    site.reactor = MemoryReactorClock()
    harness = Harness(service, clock, MemoryHTTP(site), tokens_file)
    yield harness
    harness.http.close()
    service.stopService()


@pytest.fixture
def coordinator_log() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: dict) -> None:
        if str(event.get("log_namespace", "")).startswith("xaind"):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def known(harness: Harness) -> int:
    return sum(harness.service.status()["participants"].values())


@pytest.mark.parametrize(
    "header",
    [None, b"Bearer ", b"Bearer " + b"0" * 32, b"Basic " + ALICE.encode(), ALICE.encode(), b"Bearer " + ALICE.encode() + b"x"],
    ids=["none", "empty", "unknown", "basic", "no-scheme", "longer"],
)
def test_a_rendez_vous_without_a_valid_token_is_401_and_changes_nothing(authenticated, coordinator_log, header):
    answer = authenticated.rendez_vous(header=header)
    assert answer.code == 401
    assert answer.json == {"error": "rendez-vous needs a valid enrolment token (Authorization: Bearer <token>)", "code": "not_authenticated"}
    assert answer.header(b"www-authenticate") == [b'Bearer realm="xaind"']
    assert known(authenticated) == 0
    assert all(ALICE not in line and BOB not in line for line in coordinator_log)


def test_a_listed_token_registers_the_participant(authenticated):
    answer = authenticated.rendez_vous(ALICE)
    assert answer.code == 200
    assert answer.json["ok"] is True
    assert len(answer.json["id"]) == 36
    assert authenticated.heartbeat(answer.json["id"])["state"] == "stand_by"
    assert known(authenticated) == 1


def test_refused_participants_are_never_selected_and_their_flood_is_one_log_line(authenticated, coordinator_log):
    first = authenticated.rendez_vous(ALICE).json["id"]
    refused = [authenticated.rendez_vous("f" * 32) for _ in range(500)]
    assert {answer.code for answer in refused} == {401}
    # min_clients 2: the refused ones did not make a round start.
    assert authenticated.heartbeat(first)["state"] == "stand_by"
    assert authenticated.service.status()["participants"]["selected"] == 0
    assert sum("enrolment token" in line for line in coordinator_log) == 1
    second = authenticated.rendez_vous(BOB).json["id"]
    assert authenticated.heartbeat(first)["state"] == "round"
    assert authenticated.heartbeat(second)["state"] == "round"
    assert authenticated.service.status()["participants"]["selected"] == 2


def test_a_revoked_token_is_refused_and_its_participant_rejected_at_its_next_heartbeat(authenticated, coordinator_log):
    alice = authenticated.rendez_vous(ALICE).json["id"]
    write_tokens(authenticated.tokens_file, [BOB], 2)
    authenticated.clock.advance(1.0)
    assert authenticated.heartbeat(alice)["state"] == "reject"
    assert known(authenticated) == 0
    assert authenticated.rendez_vous(ALICE).code == 401
    # Added again without a restart.
    write_tokens(authenticated.tokens_file, [ALICE, BOB], 3)
    authenticated.clock.advance(1.0)
    assert authenticated.rendez_vous(ALICE).code == 200
    assert all(ALICE not in line and BOB not in line for line in coordinator_log)


def test_a_pb_rendez_vous_takes_the_token_as_its_argument(authenticated):
    perspective = ParticipantPerspective(authenticated.service, None)
    with pytest.raises(RefusedByCoordinator) as caught:
        perspective.perspective_rendez_vous()
    assert caught.value.code is ErrorCode.NOT_AUTHENTICATED
    assert str(caught.value) == "not_authenticated: rendez-vous needs a valid enrolment token (the argument of rendez_vous)"
    with pytest.raises(RefusedByCoordinator) as wrong_type:
        perspective.perspective_rendez_vous(12)
    assert wrong_type.value.code is ErrorCode.BAD_REQUEST
    answer = perspective.perspective_rendez_vous(BOB)
    assert answer["ok"] is True
    assert known(authenticated) == 1


def test_without_authentication_the_seeds_call_works_and_a_token_is_refused(tmp_path):
    clock = Clock()
    service = CoordinatorService(FederatedLearningSettings(), AggregatorSettings(), FakeAggregator(), clock=clock)
    service.startService()
    try:
        perspective = ParticipantPerspective(service, None)
        assert perspective.perspective_rendez_vous()["ok"] is True
        with pytest.raises(RefusedByCoordinator) as caught:
            perspective.perspective_rendez_vous(ALICE)
        assert str(caught.value) == "bad_request: rendez_vous takes no enrolment token here (participants.authentication has no enrolment_tokens)"
        assert sum(service.status()["participants"].values()) == 1
    finally:
        service.stopService()


# -- configuration -------------------------------------------------------------------


def settings_of(participants: dict) -> CoordinatorSettings:
    return CoordinatorSettings.from_mapping({"pb": {"secret": SECRET}, "participants": participants})


def test_authentication_is_off_by_default():
    assert settings_of({}).participant_authentication == ParticipantAuthentication(methods=("none",), enrolment_tokens_file=None)


def test_enrolment_tokens_need_a_readable_file(tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, [ALICE], 1)
    on = settings_of({"authentication": "enrolment_tokens", "enrolment_tokens_file": str(tokens)})
    assert on.participant_authentication == ParticipantAuthentication(methods=("enrolment_tokens",), enrolment_tokens_file=str(tokens))


@pytest.mark.parametrize(
    ("participants", "line"),
    [
        ({"authentication": "password"}, "config error: participants.authentication: must be one of none, enrolment_tokens, client_certificates or a list of them, got a string ('password')"),
        (
            {"authentication": "enrolment_tokens"},
            "config error: participants.enrolment_tokens_file: is required when participants.authentication has enrolment_tokens",
        ),
        (
            {"authentication": "enrolment_tokens", "enrolment_tokens_file": "/nonexistent/tokens"},
            "config error: participants.enrolment_tokens_file: cannot read: No such file or directory",
        ),
        (
            {"enrolment_tokens_file": "/nonexistent/tokens"},
            "config error: participants.enrolment_tokens_file: is only used when participants.authentication has enrolment_tokens",
        ),
    ],
)
def test_bad_authentication_settings_are_one_line(participants, line):
    with pytest.raises(ConfigError) as caught:
        settings_of(participants)
    assert str(caught.value) == line


def test_without_authentication_an_authorization_header_changes_nothing():
    clock = Clock()
    service = CoordinatorService(FederatedLearningSettings(), AggregatorSettings(), FakeAggregator(), clock=clock)
    service.startService()
    site = coordinator_site(service)
    site.reactor = MemoryReactorClock()
    http = MemoryHTTP(site)
    try:
        answer = http.request(b"GET", b"/rendez_vous", {b"Authorization": b"Bearer " + ALICE.encode()}).response()
        assert (answer.code, answer.json["ok"], answer.header(b"www-authenticate")) == (200, True, None)
    finally:
        http.close()
        service.stopService()


def test_a_token_file_gone_between_the_configuration_check_and_start_up_is_one_line(tmp_path):
    from xaind.coordinator.tap import Options, makeService

    tokens = tmp_path / "tokens"
    write_tokens(tokens, [ALICE], 1)
    settings = CoordinatorSettings.from_mapping(
        {
            "pb": {"secret": SECRET},
            "state_dir": str(tmp_path / "state"),
            "participants": {"authentication": "enrolment_tokens", "enrolment_tokens_file": str(tokens)},
        },
        source=str(tmp_path / "coordinator.yaml"),
    )
    tokens.unlink()
    options = Options()
    options.settings = settings
    with pytest.raises(SystemExit) as caught:
        makeService(options, reactor=MemoryReactorClock())
    assert str(caught.value) == f"config error: participants.enrolment_tokens_file: {tokens}: cannot read: No such file or directory"


# -- client certificates -------------------------------------------------------------


#: Fingerprints of certificates a client-CA listener verified (what the edges pass on).
CERTIFICATE_A = bytes(range(32))
CERTIFICATE_B = bytes(range(32, 64))


def write_revoked(path: Path, fingerprints: list[bytes], bump: int) -> None:
    path.write_text("# revoked\n" + "".join(f"{fingerprint.hex()}\n" for fingerprint in fingerprints))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + bump * 1_000_000_000))


@pytest.fixture
def certified(tmp_path: Path) -> Iterator[tuple[CoordinatorService, Clock, Path]]:
    """A coordinator that takes client certificates or enrolment tokens, on a `Clock`."""
    revoked = tmp_path / "revoked"
    write_revoked(revoked, [], 1)
    tokens_file = tmp_path / "tokens"
    write_tokens(tokens_file, [ALICE], 1)
    clock = Clock()
    service = authenticating_service(
        clock, ParticipantAuthenticator(EnrolmentTokens(str(tokens_file), clock), True, RevokedCertificates(str(revoked), clock))
    )
    yield service, clock, revoked
    service.stopService()


def test_a_verified_certificate_or_a_listed_token_admits_and_anything_else_is_refused(certified):
    service, _, _ = certified
    with pytest.raises(Refusal) as caught:
        service.rendez_vous(source="198.51.100.7", enrolment_token="f" * 32)
    assert (caught.value.code, caught.value.message) == (
        ErrorCode.NOT_AUTHENTICATED,
        "rendez-vous needs a valid enrolment token (Authorization: Bearer <token>) or a client certificate from the participants' CA, not revoked",
    )
    by_certificate = service.rendez_vous(source="198.51.100.7", certificate=CERTIFICATE_A)
    by_token = service.rendez_vous(source="198.51.100.8", enrolment_token=ALICE)
    assert by_certificate.ok and by_token.ok
    # Two known participants: the round starts with both.
    assert service.heartbeat(by_certificate.participant_id).state.value == "round"
    assert service.status()["participants"]["selected"] == 2


def test_a_revoked_certificate_is_refused_and_its_participant_rejected_at_its_next_heartbeat(certified, coordinator_log):
    service, clock, revoked = certified
    a = service.rendez_vous(certificate=CERTIFICATE_A).participant_id
    b = service.rendez_vous(certificate=CERTIFICATE_B).participant_id
    assert service.heartbeat(a).state.value == "round"
    write_revoked(revoked, [CERTIFICATE_A], 2)
    # Within the check interval the file is not looked at.
    assert service.heartbeat(a).state.value == "round"
    clock.advance(1.0)
    assert service.heartbeat(a).state.value == "reject"
    assert service.heartbeat(b).state.value == "round"
    with pytest.raises(Refusal):
        service.rendez_vous(certificate=CERTIFICATE_A)
    assert [line for line in coordinator_log if "dropped" in line] == [f"{a} dropped: its client certificate was revoked"]


def test_a_pb_rendez_vous_shows_its_connections_certificate(certified):
    service, _, _ = certified
    perspective = ParticipantPerspective(service, None)
    with pytest.raises(RefusedByCoordinator) as caught:
        perspective.perspective_rendez_vous()
    assert caught.value.code is ErrorCode.NOT_AUTHENTICATED
    assert "(the argument of rendez_vous)" in str(caught.value)
    perspective.certificate = CERTIFICATE_B
    assert perspective.perspective_rendez_vous()["ok"] is True


def test_certificates_only_refusal_names_the_certificate(tmp_path):
    clock = Clock()
    service = CoordinatorService(
        FederatedLearningSettings(), AggregatorSettings(), FakeAggregator(), clock=clock, authenticator=ParticipantAuthenticator(None, True)
    )
    service.startService()
    try:
        with pytest.raises(Refusal) as caught:
            service.rendez_vous()
        assert caught.value.message == "rendez-vous needs a client certificate from the participants' CA, not revoked"
        perspective = ParticipantPerspective(service, None)
        with pytest.raises(RefusedByCoordinator) as token_given:
            perspective.perspective_rendez_vous(ALICE)
        assert token_given.value.code is ErrorCode.BAD_REQUEST
    finally:
        service.stopService()


def tls_listen(tmp_path: Path, client_ca: bool) -> str:
    """An `xaind-tls:` listener string (the files are not read by the participants section's checks)."""
    return f"xaind-tls:8443:privateKey={tmp_path}/k.pem:certKey={tmp_path}/c.pem" + (f":clientCA={tmp_path}/ca.pem" if client_ca else "")


def certificate_settings(tmp_path: Path, participants: dict, api_client_ca: bool = True, pb_client_ca: bool = True) -> ParticipantAuthentication:
    """`participants` read as the coordinator reads it, beside listeners with (or without) a client CA."""
    reader = ConfigReader({"participants": participants})
    section = reader.section("participants")
    authentication = read_participant_authentication(
        section, {"api.listen": tls_listen(tmp_path, api_client_ca), "pb.listen": tls_listen(tmp_path, pb_client_ca)}
    )
    reader.finish()
    return authentication


def test_client_certificates_alone_or_with_tokens(tmp_path):
    write_tokens(tmp_path / "tokens", [ALICE], 1)
    write_revoked(tmp_path / "revoked", [CERTIFICATE_A], 1)
    alone = certificate_settings(tmp_path, {"authentication": "client_certificates"})
    assert (alone.methods, alone.client_certificates, alone.enrolment_tokens) == (("client_certificates",), True, False)
    both = certificate_settings(
        tmp_path,
        {
            "authentication": ["client_certificates", "enrolment_tokens"],
            "enrolment_tokens_file": str(tmp_path / "tokens"),
            "revoked_certificates_file": str(tmp_path / "revoked"),
        },
    )
    assert both == ParticipantAuthentication(
        methods=("client_certificates", "enrolment_tokens"),
        enrolment_tokens_file=str(tmp_path / "tokens"),
        revoked_certificates_file=str(tmp_path / "revoked"),
    )


@pytest.mark.parametrize(
    ("participants", "api_client_ca", "line"),
    [
        (
            {"authentication": "client_certificates"},
            False,
            "config error: participants.authentication: client_certificates needs api.listen to be an xaind-tls: endpoint with clientCA= (docs/tls.rst)",
        ),
        ({"authentication": ["none", "client_certificates"]}, True, "config error: participants.authentication: none cannot be listed with a credential"),
        (
            {"authentication": ["client_certificates", "client_certificates"]},
            True,
            "config error: participants.authentication: lists a choice twice: client_certificates, client_certificates",
        ),
        ({"authentication": []}, True, "config error: participants.authentication: must be one of none, enrolment_tokens, client_certificates or a list of them, got a list"),
        (
            {"revoked_certificates_file": "/nonexistent/revoked"},
            True,
            "config error: participants.revoked_certificates_file: is only used when participants.authentication has client_certificates",
        ),
        (
            {"authentication": "client_certificates", "revoked_certificates_file": "/nonexistent/revoked"},
            True,
            "config error: participants.revoked_certificates_file: cannot read: No such file or directory",
        ),
        (
            {"authentication": "client_certificates", "revoked_certificates_file": "{junk}"},
            True,
            "config error: participants.revoked_certificates_file: line 1 is not a SHA-256 fingerprint (64 hex digits, colons allowed)",
        ),
    ],
    ids=["listener-without-client-ca", "none-and-more", "twice", "empty-list", "revoked-without-certificates", "revoked-missing", "revoked-junk"],
)
def test_bad_client_certificate_settings_are_one_line(tmp_path, participants, api_client_ca, line):
    junk = tmp_path / "junk"
    junk.write_text("participant 7\n")
    participants = {key: value.format(junk=junk) if isinstance(value, str) else value for key, value in participants.items()}
    with pytest.raises(ConfigError) as caught:
        certificate_settings(tmp_path, participants, api_client_ca=api_client_ca)
    assert str(caught.value) == line
