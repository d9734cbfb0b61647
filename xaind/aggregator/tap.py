"""`twistd xain-aggregator`: options and the service tree."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from xaind.aggregator.backends import BackendError, load_backend
from xaind.aggregator.coordinator_link import CoordinatorLink
from xaind.aggregator.http_api import AggregatorSite
from xaind.aggregator.service import AggregatorService, SerialWorker
from xaind.aggregator.settings import DEFAULT_CONFIG_PATH, AggregatorDaemonSettings
from xaind.aggregator.store import ModelStore
from xaind.config import DEVELOPMENT_SECRET, ConfigError
from xaind.listening import ListeningService
from xaind.logs import get_logger, set_level
from xaind.state import StateFileError

log = get_logger("xaind.aggregator")


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "Path to the aggregator's YAML configuration."],
    ]

    def postOptions(self) -> None:
        try:
            self.settings = AggregatorDaemonSettings.from_file(self["config"])
        except ConfigError as error:
            raise SystemExit(str(error)) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    settings: AggregatorDaemonSettings = options.settings
    set_level(settings.log_level)
    log.info("configuration loaded from {path}", path=os.path.abspath(settings.source or DEFAULT_CONFIG_PATH))
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    aggregation = settings.aggregation
    try:
        backend = load_backend(aggregation.backend, aggregation.module, aggregation.class_name)
    except BackendError as error:
        raise SystemExit(f"config error: aggregation: {error}") from None
    try:
        store = ModelStore(settings.state_dir)
        link = CoordinatorLink(settings.coordinator.pb, settings.coordinator.secret, reactor)
        aggregator = AggregatorService(
            store,
            backend,
            link,
            reactor,
            max_upload_bytes=settings.max_upload_bytes,
            call_timeout=settings.coordinator.call_timeout,
            worker=SerialWorker(reactor, "xaind-aggregation"),
        )
    except OSError as error:
        raise SystemExit(f"config error: state_dir: cannot be used ({error.strerror}): {settings.state_dir}") from None
    except StateFileError as error:
        raise SystemExit(f"state error: {error}") from None
    link.serve(aggregator)
    if settings.development and settings.coordinator.secret == DEVELOPMENT_SECRET:
        log.warn("development configuration: the PB link uses the well-known development secret")

    top = MultiService()
    aggregator.setServiceParent(top)
    ListeningService("aggregator HTTP API", settings.api_listen, AggregatorSite(aggregator), reactor).setServiceParent(top)
    link.setServiceParent(top)
    return top
