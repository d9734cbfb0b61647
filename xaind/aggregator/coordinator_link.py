"""The aggregator's end of the PB link to the coordinator.

The aggregator is the client: it connects, logs in as `aggregator` with the
shared secret and hands over its mind, through which the coordinator calls
`admit`, `sync` and `aggregate`. The connection is kept by a `ClientService`
(reconnect with capped backoff), and the login is redone on every new
connection, so either daemon may restart at any time. A refused login is
told apart from a lost connection in the log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import MultiService
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import implementer

from xaind.aggregator.service import AggregatorService, ICoordinator
from xaind.attachment import Attachment
from xaind.config import tcp_endpoint_address
from xaind.logs import get_logger
from xaind.protocol import AGGREGATOR_USER, ErrorCode, Refusal
from xaind.tls import LossReportingPBClientFactory, client_tls_options, load_client_certificate, load_trust_root, tls_refusal

log = get_logger("xaind.aggregator.coordinator_link")


@dataclass(frozen=True)
class ClientTLS:
    """TLS for the link: the coordinator's certificate must chain to `ca_file` and name `hostname`.

    `client_certificate` (with `client_key`, or its key in the same file) is
    shown if the coordinator's PB listener asks for a certificate.
    """

    hostname: str
    ca_file: str
    client_certificate: str | None = None
    client_key: str | None = None

    def endpoint(self, reactor: Any, description: str) -> endpoints.SSL4ClientEndpoint:
        """TLS to the host and port of the `tcp:` endpoint `description`."""
        address = tcp_endpoint_address(description)
        if address is None:
            raise ValueError(f"TLS needs a tcp:HOST:PORT endpoint, got {description!r}")
        host, port = address
        certificate = load_client_certificate(self.client_certificate, self.client_key) if self.client_certificate is not None else None
        options = client_tls_options(self.hostname, load_trust_root(self.ca_file), certificate)
        return endpoints.SSL4ClientEndpoint(reactor, host, port, options)


class RefusedByAggregator(pb.Error):
    """Sent to the coordinator when the aggregator's rules do not allow a request.

    The one place a `Refusal` becomes a PB error: its message is
    "<code>: <message>", so the coordinator (which sees only the text of a
    remote failure) can tell the codes apart with `refusal_code`.
    """

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(f"{code.value}: {message}" if code is not None else message)
        self.code = code

    @classmethod
    def of(cls, refusal: Refusal) -> RefusedByAggregator:
        return cls(refusal.message, refusal.code)


def refusal_code(message: str) -> ErrorCode | None:
    """The code a RefusedByAggregator's message starts with, if any."""
    code, separator, _ = message.partition(": ")
    if not separator:
        return None
    try:
        return ErrorCode(code)
    except ValueError:
        return None


class AggregatorMind(pb.Referenceable):
    """What the coordinator may call on the aggregator."""

    def __init__(self, aggregator: AggregatorService) -> None:
        self.aggregator = aggregator

    def remote_admit(self, participant_id: str, token: str, round_number: int) -> None:
        try:
            self.aggregator.admit(participant_id, token, round_number)
        except Refusal as refusal:
            raise RefusedByAggregator.of(refusal) from None

    def remote_admit_many(self, admissions: Any) -> list[str | None]:
        """Several admissions, each `[participant_id, token, round]`: for each, None or its refusal ("<code>: <text>")."""
        if not isinstance(admissions, list):
            raise RefusedByAggregator.of(Refusal("admit_many takes a list of [participant_id, token, round]", ErrorCode.BAD_REQUEST))
        answers: list[str | None] = []
        for admission in admissions:
            try:
                if not (isinstance(admission, list) and len(admission) == 3):
                    raise Refusal(f"not [participant_id, token, round]: {admission!r:.80}", ErrorCode.BAD_REQUEST)
                participant_id, token, round_number = admission
                self.aggregator.admit(participant_id, token, round_number)
                answers.append(None)
            except Refusal as refusal:
                answers.append(str(RefusedByAggregator.of(refusal)))
        return answers

    def remote_sync(self, round_number: int, done: list[str] | None, admitted: dict[str, str]) -> Deferred[dict[str, Any]]:
        return self.aggregator.sync(round_number, done, admitted)

    def remote_aggregate(self, round_number: int, counted: list[str] | None = None) -> Deferred[None]:
        return self.aggregator.aggregate(round_number, counted).addErrback(_refused)

    # A shard's part of a round's end (docs/scale.rst, Sharded aggregation).

    def remote_shard(self) -> dict[str, Any]:
        return _answered(self.aggregator.shard_info)

    def remote_partial_sum(self, round_number: int, counted: list[str], token: str) -> Deferred[dict[str, Any]]:
        return self.aggregator.partial_sum(round_number, list(counted), token).addErrback(_refused)

    def remote_reduce(self, round_number: int, sources: list[str | None], token: str) -> Deferred[dict[str, Any]]:
        return self.aggregator.reduce(round_number, list(sources), token).addErrback(_refused)

    def remote_install(self, model_round: int, url: str, etag: str) -> Deferred[dict[str, Any]]:
        return self.aggregator.install_from(model_round, url, etag).addErrback(_refused)

    def remote_lend_model(self, token: str) -> dict[str, Any]:
        return _answered(self.aggregator.lend_model, token)


def _refused(failure: Failure) -> None:
    """A `Refusal` as the coordinator reads it ("<code>: <message>"); any other failure as it is."""
    failure.trap(Refusal)
    raise RefusedByAggregator.of(failure.value)


def _answered(method: Any, *args: Any) -> Any:
    try:
        return method(*args)
    except Refusal as refusal:
        raise RefusedByAggregator.of(refusal) from None


class LinkMetrics(Protocol):
    """What the link counts (xaind.aggregator.metrics.AggregatorMetrics)."""

    def logged_in(self) -> None: ...

    def link_lost(self) -> None: ...

    def login_failed(self) -> None: ...


@implementer(ICoordinator)
class CoordinatorLink(MultiService):
    """Keeps the aggregator logged in to the coordinator, and carries its reports."""

    def __init__(self, description: str, secret: str, reactor: Any, *, tls: ClientTLS | None = None) -> None:
        super().__init__()
        self.reactor = reactor
        self._credentials = UsernamePassword(AGGREGATOR_USER, secret.encode("utf-8"))
        # Its logins fail when their connection is lost (a refused TLS handshake), so ClientService retries.
        self._factory = LossReportingPBClientFactory()
        self._factory.noisy = False
        self._perspective: Attachment[pb.RemoteReference] = Attachment()
        self.mind: AggregatorMind | None = None
        #: Counts logins, failed logins and losses of the link; None: not counted.
        self.metrics: LinkMetrics | None = None
        self.tls = tls
        #: Said once: a follower coordinator refused the login (the link retries until it reaches the leader).
        self._follower_said = False
        endpoint = endpoints.clientFromString(reactor, description) if tls is None else tls.endpoint(reactor, description)
        self.client = ClientService(
            endpoint,
            self._factory,
            retryPolicy=backoffPolicy(initialDelay=0.5, maxDelay=5.0),
            clock=reactor,
            prepareConnection=self._log_in,
        )
        self.client.setServiceParent(self)

    def serve(self, aggregator: AggregatorService) -> None:
        self.mind = AggregatorMind(aggregator)

    def is_attached(self) -> bool:
        return self._perspective.current is not None

    def _log_in(self, broker: pb.Broker) -> Deferred[pb.RemoteReference]:
        logging_in = self._factory.login(self._credentials, client=self.mind)

        def logged_in(perspective: pb.RemoteReference) -> pb.RemoteReference:
            log.info("logged in to the coordinator")
            if self.metrics is not None:
                self.metrics.logged_in()
            self._perspective.attach(perspective)
            broker.notifyOnDisconnect(lambda: self._lost(perspective))
            return perspective

        def refused(failure: Failure) -> None:
            if self.metrics is not None:
                self.metrics.login_failed()
            if "follows the leader" in failure.getErrorMessage():
                # Several coordinators behind one address (state.redis): try again until the leader answers.
                if not self._follower_said:
                    self._follower_said = True
                    log.info("reached a coordinator that follows the leader: logging in again until the leader answers")
            elif failure.check(UnauthorizedLogin) or (
                failure.check(pb.RemoteError) and "Login" in str(failure.value)
            ):
                log.error("the coordinator refused our login: check coordinator.secret")
            elif self._log_tls_refusal(failure):
                pass
            else:
                log.warn("login to the coordinator failed: {error}", error=failure.getErrorMessage())
            # Dropping the connection makes ClientService try again with backoff.
            broker.transport.loseConnection()

        logging_in.addCallbacks(logged_in, refused)
        return logging_in

    def _log_tls_refusal(self, failure: Failure) -> bool:
        """Say that TLS refused the coordinator, if it did (a connection attempt or a login)."""
        refusal = tls_refusal(failure) if self.tls is not None else None
        if refusal is None or self.tls is None:
            return False
        log.error(
            "the coordinator's certificate is not trusted for {hostname} ({refusal}): "
            "check coordinator.ca_file and coordinator.tls_hostname",
            hostname=self.tls.hostname,
            refusal=refusal,
        )
        return True

    def _lost(self, perspective: pb.RemoteReference) -> None:
        if self._perspective.detach(perspective):
            log.warn("lost the link to the coordinator; reconnecting")
            if self.metrics is not None:
                self.metrics.link_lost()

    def end_training(self, participant_id: str, token: str, success: bool) -> Deferred[bool]:
        def report(perspective: pb.RemoteReference) -> Deferred[bool]:
            return perspective.callRemote("end_training", participant_id, token, success)

        return self._perspective.when_attached().addCallback(report)
