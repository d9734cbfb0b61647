"""`twistd xain-coordinator`: options and the service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService

from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.enrolment import EnrolmentFileError, EnrolmentTokens
from xaind.coordinator.http_api import coordinator_site
from xaind.coordinator.pb import coordinator_pb_factory
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import DEFAULT_CONFIG_PATH, CoordinatorSettings
from xaind.daemon import DaemonOptions, begin, state_dir_checks
from xaind.listening import ListeningService
from xaind.logs import get_logger, set_repeat_interval
from xaind.protocol import COORDINATOR_HTTP_LISTENER, COORDINATOR_PB_LISTENER
from xaind.ready_file import ReadyFileService
from xaind.state import RoundStore

log = get_logger("xaind.coordinator")


class Options(DaemonOptions):
    default_config = DEFAULT_CONFIG_PATH
    read_settings = CoordinatorSettings.from_file


def makeService(options: Options, reactor: Any = None) -> IService:
    settings: CoordinatorSettings = options.settings
    reactor = begin(settings, log, settings.pb_secret, reactor)
    set_repeat_interval(settings.log_repeat_interval)
    authentication = settings.participant_authentication
    enrolment = None
    if authentication.method == "enrolment_tokens" and authentication.enrolment_tokens_file is not None:
        try:
            enrolment = EnrolmentTokens(authentication.enrolment_tokens_file, reactor)
        except EnrolmentFileError as error:
            # Readable when the configuration was checked, gone since: still one line.
            raise SystemExit(f"config error: participants.enrolment_tokens_file: {error}") from None
        log.info("participants need an enrolment token: {count} listed", count=len(enrolment))
    with state_dir_checks(settings.state_dir):
        link = AggregatorLink()
        coordinator = CoordinatorService(
            settings.federated_learning,
            settings.aggregator,
            link,
            reactor,
            store=RoundStore(settings.state_dir),
            limits=settings.participant_limits,
            repeat_interval=settings.log_repeat_interval,
            enrolment=enrolment,
        )
    top = MultiService()
    coordinator.setServiceParent(top)
    listeners = [
        ListeningService(COORDINATOR_HTTP_LISTENER, settings.api_listen, coordinator_site(coordinator, settings.heartbeat_hold, settings.http_limits), reactor),
        ListeningService(COORDINATOR_PB_LISTENER, settings.pb_listen, coordinator_pb_factory(coordinator, link, settings.pb_secret, settings.pb_connections), reactor),
    ]
    for listener in listeners:
        listener.setServiceParent(top)
    if options["ready-file"] is not None:
        ReadyFileService(options["ready-file"], listeners, reactor).setServiceParent(top)
    return top
