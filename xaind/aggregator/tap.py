"""`twistd xain-aggregator`: options and the service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService

from xaind.aggregator.backends import BackendError
from xaind.aggregator.coordinator_link import ClientTLS, CoordinatorLink
from xaind.aggregator.http_api import AggregatorSite
from xaind.aggregator.metrics import AggregatorMetrics
from xaind.aggregator.privacy import PrivacyAccountingUnavailable
from xaind.aggregator.round_report import AggregationObserver
from xaind.aggregator.service import AggregatorService
from xaind.aggregator.threads import DiskThreads, SerialWorker
from xaind.aggregator.settings import DEFAULT_CONFIG_PATH, AggregatorDaemonSettings
from xaind.aggregator.store import ModelStore
from xaind.aggregator.strategies import build_backend
from xaind.daemon import DaemonOptions, begin, state_dir_checks
from xaind.listening import ListeningService
from xaind.logs import get_logger
from xaind.metrics import AGGREGATOR_METRICS_LISTENER, daemon_registry, metrics_site
from xaind.protocol import AGGREGATOR_HTTP_LISTENER
from xaind.ready_file import ReadyFileService

log = get_logger("xaind.aggregator")


class Options(DaemonOptions):
    default_config = DEFAULT_CONFIG_PATH
    read_settings = AggregatorDaemonSettings.from_file


def makeService(options: Options, reactor: Any = None) -> IService:
    settings: AggregatorDaemonSettings = options.settings
    reactor = begin(settings, log, settings.coordinator.secret, reactor)
    aggregation = settings.aggregation
    try:
        backend = build_backend(aggregation)
    except BackendError as error:
        raise SystemExit(f"config error: aggregation: {error}") from None
    observer = AggregationObserver(aggregation.strategy, aggregation.update_norms, aggregation.privacy)
    if aggregation.privacy is not None:
        try:
            observer.privacy_spent(1)
        except PrivacyAccountingUnavailable as error:
            raise SystemExit(f"config error: aggregation.differential_privacy: {error}") from None
    with state_dir_checks(settings.state_dir):
        link_settings = settings.coordinator
        tls = None
        if link_settings.ca_file is not None and link_settings.tls_hostname is not None:
            tls = ClientTLS(link_settings.tls_hostname, link_settings.ca_file, link_settings.client_certificate, link_settings.client_key)
        link = CoordinatorLink(link_settings.pb, link_settings.secret, reactor, tls=tls)
        metrics = AggregatorMetrics(daemon_registry())
        link.metrics = metrics
        storage = None
        if settings.s3 is not None:
            from xaind.aggregator.s3 import ModelStorage

            storage = ModelStorage(settings.s3)
        aggregator = AggregatorService(
            ModelStore(settings.state_dir),
            backend,
            link,
            reactor,
            max_upload_bytes=settings.max_upload_bytes,
            call_timeout=settings.coordinator.call_timeout,
            worker=SerialWorker(reactor, "xaind-aggregation"),
            disk=DiskThreads(reactor, "xaind-disk"),
            observer=observer,
            metrics=metrics,
            storage=storage,
            shard=settings.shard,
            shard_ca_file=link_settings.ca_file,
        )
    link.serve(aggregator)
    top = MultiService()
    aggregator.setServiceParent(top)
    listeners = [ListeningService(AGGREGATOR_HTTP_LISTENER, settings.api_listen, AggregatorSite(aggregator, reactor, settings.http_limits), reactor)]
    if settings.metrics_listen is not None:
        site = metrics_site(metrics.registry, reactor, settings.http_limits)
        listeners.append(ListeningService(AGGREGATOR_METRICS_LISTENER, settings.metrics_listen, site, reactor))
    for listener in listeners:
        listener.setServiceParent(top)
    link.setServiceParent(top)
    if options["ready-file"] is not None:
        ReadyFileService(options["ready-file"], listeners, reactor).setServiceParent(top)
    return top
