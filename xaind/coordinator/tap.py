"""`twistd xain-coordinator`: options and the service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService

from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.shards import ShardedAggregators
from xaind.coordinator.authentication import ParticipantAuthenticator
from xaind.coordinator.credential_files import CredentialFileError, EnrolmentTokens, RevokedCertificates
from xaind.coordinator.http_api import coordinator_site
from xaind.coordinator.metrics import CoordinatorMetrics
from xaind.coordinator.pb import coordinator_pb_factory
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import DEFAULT_CONFIG_PATH, CoordinatorSettings, ParticipantAuthentication
from xaind.daemon import DaemonOptions, begin, state_dir_checks
from xaind.listening import ListeningService
from xaind.logs import get_logger, set_repeat_interval
from xaind.metrics import COORDINATOR_METRICS_LISTENER, daemon_registry, metrics_site
from xaind.protocol import COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.ready_file import ReadyFileService
from xaind.recent_problems import RecentProblems
from xaind.state import RoundStore

log = get_logger("xaind.coordinator")


class Options(DaemonOptions):
    default_config = DEFAULT_CONFIG_PATH
    read_settings = CoordinatorSettings.from_file


def makeService(options: Options, reactor: Any = None) -> IService:
    settings: CoordinatorSettings = options.settings
    reactor = begin(settings, log, settings.pb_secret, reactor)
    set_repeat_interval(settings.log_repeat_interval)
    authenticator = participant_authenticator(settings.participant_authentication, reactor)
    metrics = CoordinatorMetrics(daemon_registry())
    with state_dir_checks(settings.state_dir):
        link: AggregatorLink | ShardedAggregators
        if settings.aggregator.shards > 1:
            link = ShardedAggregators(reactor, settings.aggregator.shards)
        else:
            link = AggregatorLink(reactor)
        link.metrics = metrics
        coordinator = cluster_coordinator(settings, link, reactor, authenticator, metrics) if settings.redis_state is not None else CoordinatorService(
            settings.federated_learning,
            settings.aggregator,
            link,
            reactor,
            store=RoundStore(settings.state_dir),
            limits=settings.participant_limits,
            repeat_interval=settings.log_repeat_interval,
            authenticator=authenticator,
            recent_problems=RecentProblems(),
            metrics=metrics,
        )
    if isinstance(link, ShardedAggregators):
        link.on_shard_lost = coordinator.shard_lost
        link.on_attached = coordinator.sync_aggregator
        link.current_view = coordinator.sync_view
    top = MultiService()
    coordinator.setServiceParent(top)
    listeners = [
        ListeningService(COORDINATOR_HTTP_LISTENER, settings.api_listen, coordinator_site(coordinator, settings.heartbeat_hold, settings.http_limits), reactor),
        ListeningService(COORDINATOR_PB_LISTENER, settings.pb_listen, coordinator_pb_factory(coordinator, link, settings.pb_secret, settings.pb_connections), reactor),
    ]
    if settings.metrics_listen is not None:
        site = metrics_site(metrics.registry, reactor, settings.http_limits)
        listeners.append(ListeningService(COORDINATOR_METRICS_LISTENER, settings.metrics_listen, site, reactor))
    for listener in listeners:
        listener.setServiceParent(top)
    if options["ready-file"] is not None:
        ReadyFileService(options["ready-file"], listeners, reactor).setServiceParent(top)
    return top


def cluster_coordinator(settings: CoordinatorSettings, link: AggregatorLink, reactor: Any, authenticator: ParticipantAuthenticator | None, metrics: CoordinatorMetrics) -> Any:
    """One of several coordinator processes sharing their state in Redis (`state.redis`); redis is imported only here."""
    from xaind.coordinator.cluster.coordinator import ClusterCoordinator

    assert settings.redis_state is not None
    return ClusterCoordinator(
        settings.redis_state,
        settings.federated_learning,
        settings.aggregator,
        link,
        reactor,
        limits=settings.participant_limits,
        repeat_interval=settings.log_repeat_interval,
        authenticator=authenticator,
        recent_problems=RecentProblems(),
        metrics=metrics,
    )


def participant_authenticator(authentication: ParticipantAuthentication, reactor: Any) -> ParticipantAuthenticator | None:
    """What a rendez-vous must show, its files read now; None with authentication off."""
    if not (authentication.enrolment_tokens or authentication.client_certificates):
        return None
    files: dict[str, Any] = {}
    for key, path, kind in (
        ("enrolment_tokens_file", authentication.enrolment_tokens_file, EnrolmentTokens),
        ("revoked_certificates_file", authentication.revoked_certificates_file, RevokedCertificates),
    ):
        if path is None:
            continue
        try:
            files[key] = kind(path, reactor)
        except CredentialFileError as error:
            # Readable when the configuration was checked, gone since: still one line.
            raise SystemExit(f"config error: participants.{key}: {error}") from None
    authenticator = ParticipantAuthenticator(
        files.get("enrolment_tokens_file"), authentication.client_certificates, files.get("revoked_certificates_file")
    )
    shown = []
    if authenticator.enrolment_tokens is not None:
        shown.append(f"an enrolment token ({len(authenticator.enrolment_tokens)} listed)")
    if authenticator.client_certificates:
        revoked = authenticator.revoked_certificates
        shown.append("a client certificate" + (f" ({len(revoked)} revoked)" if revoked is not None else ""))
    log.info("participants must authenticate: {credentials}", credentials=" or ".join(shown))
    return authenticator
