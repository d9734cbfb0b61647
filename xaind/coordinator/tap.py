"""`twistd xain-coordinator`: options and the service tree."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from xaind.config import DEVELOPMENT_SECRET, ConfigError
from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.http_api import coordinator_site
from xaind.coordinator.pb import coordinator_pb_factory
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import DEFAULT_CONFIG_PATH, CoordinatorSettings
from xaind.listening import ListeningService
from xaind.logs import get_logger, set_level
from xaind.state import RoundStore, StateFileError

log = get_logger("xaind.coordinator")


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG_PATH, "Path to the coordinator's YAML configuration."],
    ]

    def postOptions(self) -> None:
        # A bad configuration ends start-up with one line per problem and a
        # non-zero status, before twistd daemonizes, instead of a usage dump.
        try:
            self.settings = CoordinatorSettings.from_file(self["config"])
        except ConfigError as error:
            raise SystemExit(str(error)) from None


def makeService(options: Options, reactor: Any = None) -> IService:
    settings: CoordinatorSettings = options.settings
    set_level(settings.log_level)
    log.info("configuration loaded from {path}", path=os.path.abspath(settings.source or DEFAULT_CONFIG_PATH))
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        os.makedirs(settings.state_dir, exist_ok=True)
        store = RoundStore(settings.state_dir)
        link = AggregatorLink()
        coordinator = CoordinatorService(
            settings.federated_learning,
            settings.aggregator,
            link,
            reactor,
            store=store,
        )
    except OSError as error:
        raise SystemExit(f"config error: state_dir: cannot be used ({error.strerror}): {settings.state_dir}") from None
    except StateFileError as error:
        raise SystemExit(f"state error: {error}") from None

    if settings.development and settings.pb_secret == DEVELOPMENT_SECRET:
        log.warn("development configuration: the PB link uses the well-known development secret")
    top = MultiService()
    coordinator.setServiceParent(top)
    ListeningService("coordinator HTTP API", settings.api_listen, coordinator_site(coordinator), reactor).setServiceParent(top)
    ListeningService("coordinator PB", settings.pb_listen, coordinator_pb_factory(coordinator, link, settings.pb_secret), reactor).setServiceParent(top)
    return top
