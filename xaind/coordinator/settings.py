"""The coordinator's configuration: typed, immutable, checked before start-up."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xaind.config import (
    LOG_FORMATS,
    read_metrics_listen,
    ConfigReader,
    http_url_problem,
    load_yaml_file,
    read_shared_secret,
    server_endpoint_problem,
)
from xaind.connection_limits import ConnectionLimits, read_connection_limits
from xaind.coordinator.cluster.settings import RedisStateSettings, read_redis_state
from xaind.coordinator.credential_files import EnrolmentTokens, RevokedCertificates
from xaind.coordinator.rounds import RoundRules
from xaind.http_limits import HTTPLimits, read_http_limits
from xaind.logs import DEFAULT_REPEAT_INTERVAL
from xaind.protocol import LOG_LEVELS
from xaind.tls_server import verifies_client_certificates

DEFAULT_CONFIG_PATH = "/etc/xain/coordinator.yaml"
DEFAULT_HEARTBEAT_HOLD_CAP = 5.0
#: The most `participants.max_known` (and the rendez-vous allowance) may be set to.
MAX_PARTICIPANTS_CEILING = 10_000_000
#: The most aggregator shards one coordinator takes (`aggregator.shards`).
MAX_SHARDS = 1000


@dataclass(frozen=True)
class FederatedLearningSettings:
    rounds: int = 10
    participants_ratio: float = 1.0
    min_clients: int = 1
    heartbeat_timeout: float = 15.0
    training_timeout: float = 3600.0

    @property
    def round_rules(self) -> RoundRules:
        return RoundRules(
            rounds=self.rounds,
            participants_ratio=self.participants_ratio,
            min_clients=self.min_clients,
        )


@dataclass(frozen=True)
class ParticipantLimits:
    """Who may join, and how fast (the `participants` section; why these defaults: docs/http-api.rst, Limits)."""

    #: Participants known at once; a rendez-vous beyond is refused 503 too_many_participants.
    max_known: int = 50_000
    #: Rendez-vous one source address may make per minute, as a burst (0: no limit); beyond: 429.
    rendez_vous_per_address_per_minute: int = 20_000


#: The credentials a participant may be asked to show (`participants.authentication`).
ENROLMENT_TOKENS = "enrolment_tokens"
CLIENT_CERTIFICATES = "client_certificates"
AUTHENTICATION_METHODS = ("none", ENROLMENT_TOKENS, CLIENT_CERTIFICATES)


@dataclass(frozen=True)
class ParticipantAuthentication:
    """What a rendez-vous must show (docs/http-api.rst, Authentication); off by default, as the seed's SDK shows nothing."""

    #: `("none",)`, or the credentials of which one suffices: `enrolment_tokens` (one of the tokens in
    #: `enrolment_tokens_file`) and/or `client_certificates` (verified by the listeners' `clientCA=`).
    methods: tuple[str, ...] = ("none",)
    #: One token a line, `#` comments; re-read when it changes (xaind/coordinator/credential_files.py).
    enrolment_tokens_file: str | None = None
    #: SHA-256 fingerprints of client certificates no longer admitted, one a line; re-read when it changes.
    revoked_certificates_file: str | None = None

    @property
    def enrolment_tokens(self) -> bool:
        return ENROLMENT_TOKENS in self.methods

    @property
    def client_certificates(self) -> bool:
        return CLIENT_CERTIFICATES in self.methods


@dataclass(frozen=True)
class AggregatorSettings:
    #: Handed to participants as where to download and upload (the lone aggregator; shards name their own).
    url: str = "http://localhost:8082"
    admit_timeout: float = 10.0
    aggregation_timeout: float = 600.0
    #: Aggregator shards that may attach at once (docs/scale.rst); 1: the lone aggregator at `url`.
    shards: int = 1


@dataclass(frozen=True)
class CoordinatorSettings:
    api_listen: str = "tcp:8081:interface=127.0.0.1"
    #: Seconds a `stand_by` heartbeat may wait for news (see coordinator/http_api.py); 0: answer at once.
    #: Unless set: a quarter of the heartbeat timeout, at most DEFAULT_HEARTBEAT_HOLD_CAP.
    heartbeat_hold: float = 3.75
    #: Connections the PB listener keeps open (`pb.max_connections`, `pb.max_connections_per_address`).
    pb_connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: Who may join (`participants.max_known`, `participants.rendez_vous_per_address_per_minute`).
    participant_limits: ParticipantLimits = field(default_factory=ParticipantLimits)
    #: What a rendez-vous must show (`participants.authentication`, `participants.enrolment_tokens_file`).
    participant_authentication: ParticipantAuthentication = field(default_factory=ParticipantAuthentication)
    #: Seconds a flood of one kind of event is said in one line with a count (`logging.repeat_interval`).
    log_repeat_interval: float = DEFAULT_REPEAT_INTERVAL
    #: Body size and deadlines of HTTP requests (`api.max_body_bytes`, `api.header_timeout`, ...).
    http_limits: HTTPLimits = field(default_factory=HTTPLimits)
    pb_listen: str = "tcp:5555:interface=127.0.0.1"
    federated_learning: FederatedLearningSettings = field(default_factory=FederatedLearningSettings)
    aggregator: AggregatorSettings = field(default_factory=AggregatorSettings)
    state_dir: str = "/var/lib/xain/coordinator"
    log_level: str = "info"
    #: `logging.format`: "text" (twistd's lines) or "json" (one JSON object per line, for machines).
    log_format: str = "text"
    #: `metrics.listen`: where Prometheus scrapes /metrics (a Twisted endpoint string); None: no metrics listener.
    metrics_listen: str | None = None
    pb_secret: str = ""
    development: bool = False
    #: `state.redis`: the shared state of several coordinator processes (docs/scale.rst); None: one process.
    redis_state: RedisStateSettings | None = None
    source: str | None = None

    @classmethod
    def from_mapping(cls, document: Mapping[str, Any], source: str | None = None) -> CoordinatorSettings:
        """Build settings from a parsed YAML document; raises `ConfigError` listing every problem."""
        defaults = cls()
        root = ConfigReader(document)
        development = root.boolean("development", False)
        api = root.section("api")
        api_listen = api.string("listen", defaults.api_listen, validate=server_endpoint_problem)
        api_document = document.get("api")
        hold_given = isinstance(api_document, Mapping) and "heartbeat_hold" in api_document
        heartbeat_hold = api.number("heartbeat_hold", defaults.heartbeat_hold, at_least=0)
        http_limits = read_http_limits(api)
        pb = root.section("pb")
        pb_listen = pb.string("listen", defaults.pb_listen, validate=server_endpoint_problem)
        pb_secret = read_shared_secret(pb, development)
        pb_connections = read_connection_limits(pb)
        participants = root.section("participants")
        limits_defaults = ParticipantLimits()
        participant_limits = ParticipantLimits(
            max_known=participants.integer("max_known", limits_defaults.max_known, minimum=1, maximum=MAX_PARTICIPANTS_CEILING),
            rendez_vous_per_address_per_minute=participants.integer(
                "rendez_vous_per_address_per_minute", limits_defaults.rendez_vous_per_address_per_minute, minimum=0, maximum=MAX_PARTICIPANTS_CEILING
            ),
        )
        participant_authentication = read_participant_authentication(participants, {api.path('listen'): api_listen, pb.path('listen'): pb_listen})

        fl = root.section("federated_learning")
        fl_defaults = FederatedLearningSettings()
        federated_learning = FederatedLearningSettings(
            rounds=fl.integer("rounds", fl_defaults.rounds, minimum=1),
            participants_ratio=fl.number(
                "participants_ratio", fl_defaults.participants_ratio, greater_than=0, at_most=1, interval="(0, 1]"
            ),
            min_clients=fl.integer("min_clients", fl_defaults.min_clients, minimum=1),
            heartbeat_timeout=fl.number("heartbeat_timeout", fl_defaults.heartbeat_timeout, greater_than=0),
            training_timeout=fl.number("training_timeout", fl_defaults.training_timeout, greater_than=0),
        )

        agg = root.section("aggregator")
        agg_defaults = AggregatorSettings()
        aggregator = AggregatorSettings(
            url=agg.string("url", agg_defaults.url, validate=http_url_problem),
            admit_timeout=agg.number("admit_timeout", agg_defaults.admit_timeout, greater_than=0),
            aggregation_timeout=agg.number("aggregation_timeout", agg_defaults.aggregation_timeout, greater_than=0),
            shards=agg.integer("shards", agg_defaults.shards, minimum=1, maximum=MAX_SHARDS),
        )

        if not hold_given:
            # Leave a short heartbeat timeout room for the participant's own period.
            heartbeat_hold = min(DEFAULT_HEARTBEAT_HOLD_CAP, federated_learning.heartbeat_timeout / 4)
        elif heartbeat_hold >= federated_learning.heartbeat_timeout / 2:
            api.problem(
                "heartbeat_hold",
                f"must be below half of federated_learning.heartbeat_timeout ({federated_learning.heartbeat_timeout:g}), got {heartbeat_hold:g}",
            )
        state_dir = root.string("state_dir", defaults.state_dir)
        logging_section = root.section("logging")
        log_level = logging_section.choice("level", defaults.log_level, LOG_LEVELS)
        log_repeat_interval = logging_section.number("repeat_interval", defaults.log_repeat_interval, greater_than=0, at_most=3600)
        log_format = logging_section.choice("format", defaults.log_format, LOG_FORMATS)
        metrics_listen = read_metrics_listen(root)
        redis_state = read_redis_state(root)
        root.finish()
        return cls(
            api_listen=api_listen,
            heartbeat_hold=heartbeat_hold,
            http_limits=http_limits,
            pb_listen=pb_listen,
            pb_connections=pb_connections,
            participant_limits=participant_limits,
            participant_authentication=participant_authentication,
            log_repeat_interval=log_repeat_interval,
            federated_learning=federated_learning,
            aggregator=aggregator,
            state_dir=state_dir,
            log_level=log_level,
            log_format=log_format,
            metrics_listen=metrics_listen,
            pb_secret=pb_secret,
            development=development,
            redis_state=redis_state,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str) -> CoordinatorSettings:
        return cls.from_mapping(load_yaml_file(path), source=path)


def read_participant_authentication(participants: ConfigReader, listeners: Mapping[str, str]) -> ParticipantAuthentication:
    """`participants.authentication` and its files, checked readable now (a problem is one config line).

    Client certificates are a credential only where a listener verified
    them: every participant listener (`listeners`, by configuration key)
    must then be `xaind-tls:` with `clientCA=`.
    """
    methods = participants.choices("authentication", ("none",), AUTHENTICATION_METHODS)
    if "none" in methods and len(methods) > 1:
        participants.problem("authentication", "none cannot be listed with a credential")
        methods = ("none",)
    authentication = ParticipantAuthentication(
        methods=methods,
        enrolment_tokens_file=participants.string("enrolment_tokens_file", "") or None,
        revoked_certificates_file=participants.string("revoked_certificates_file", "") or None,
    )
    _check_credential_file(participants, "enrolment_tokens_file", authentication.enrolment_tokens_file, ENROLMENT_TOKENS, methods, EnrolmentTokens.problem, required=True)
    _check_credential_file(
        participants, "revoked_certificates_file", authentication.revoked_certificates_file, CLIENT_CERTIFICATES, methods, RevokedCertificates.problem, required=False
    )
    if authentication.client_certificates:
        for key, description in listeners.items():
            if not verifies_client_certificates(description):
                participants.problem(
                    "authentication", f"client_certificates needs {key} to be an xaind-tls: endpoint with clientCA= (docs/tls.rst)"
                )
    return authentication


def _check_credential_file(
    participants: ConfigReader,
    key: str,
    path: str | None,
    method: str,
    methods: tuple[str, ...],
    problem_of: Callable[[str], str | None],
    required: bool,
) -> None:
    if method not in methods:
        if path is not None:
            participants.problem(key, f"is only used when participants.authentication has {method}")
    elif path is None:
        if required:
            participants.problem(key, f"is required when participants.authentication has {method}")
    else:
        problem = problem_of(path)
        if problem is not None:
            participants.problem(key, problem)
