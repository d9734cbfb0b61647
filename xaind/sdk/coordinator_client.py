"""How a participant talks to the coordinator: over HTTP (polling) or PB (push).

Both transports offer the same calls, so the participant's protocol is
written once. Over PB the coordinator also pushes "you are selected for
round N" and "training finished" the moment they happen, so a participant
does not wait for its next heartbeat to learn of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote, urlsplit

from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from twisted.cred.credentials import Anonymous
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.spread import pb

from xaind.logs import get_logger
from xaind.protocol import PARTICIPANT_PROTOCOL, PARTICIPANT_PROTOCOL_VERSION, ErrorCode, PBMethod
from xaind.sdk.http import BUSY_CODES, NETWORK_ERRORS, HttpClient, Refused, Transient
from xaind.sdk.participant import ParticipantError
from xaind.sdk.tls import PeerNotTrusted, client_tls_options, tls_refusal
from xaind.tls import LossReportingPBClientFactory

if TYPE_CHECKING:
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from twisted.internet.ssl import PrivateCertificate


@dataclass(frozen=True)
class Heartbeat:
    state: str
    round: int | None


@dataclass(frozen=True)
class TrainingTicket:
    ok: bool
    url: str | None
    token: str | None


@dataclass(frozen=True)
class RendezVous:
    participant_id: str
    ok: bool


class Notifications(Protocol):
    def selected(self, round_number: int) -> None: ...

    def finished(self) -> None: ...


class CoordinatorClient(Protocol):
    #: Whether a selection is heard only in a heartbeat's answer (HTTP), not pushed (PB).
    hears_selections_by_heartbeat: bool

    def rendez_vous(self, notifications: Notifications) -> Deferred[RendezVous]: ...

    def heartbeat(self, participant_id: str) -> Deferred[Heartbeat]: ...

    def start_training(self, participant_id: str) -> Deferred[TrainingTicket]: ...

    def close(self) -> Deferred[Any]: ...


class HttpCoordinatorClient:
    """The seed's HTTP API; notifications arrive only through heartbeats.

    An `enrolment_token` is sent with the rendez-vous as `Authorization: Bearer <token>`.
    """

    hears_selections_by_heartbeat = True

    def __init__(self, http: HttpClient, url: str, enrolment_token: str | None = None) -> None:
        self.http = http
        self.base = url.rstrip("/")
        self._rendez_vous_headers = {b"authorization": [b"Bearer " + enrolment_token.encode("utf-8")]} if enrolment_token else None

    @inlineCallbacks
    def rendez_vous(self, notifications: Notifications) -> Any:
        url = f"{self.base}/rendez_vous"
        # Headers only when there are any: an HttpClient subclass may take the URL alone.
        answer = yield (self.http.get_json(url) if self._rendez_vous_headers is None else self.http.get_json(url, self._rendez_vous_headers))
        return RendezVous(participant_id=str(answer["id"]), ok=bool(answer.get("ok", True)))

    @inlineCallbacks
    def heartbeat(self, participant_id: str) -> Any:
        answer = yield self.http.get_json(f"{self.base}/heartbeat/{quote(participant_id, safe='')}")
        return Heartbeat(state=str(answer["state"]), round=answer.get("round"))

    @inlineCallbacks
    def start_training(self, participant_id: str) -> Any:
        answer = yield self.http.get_json(f"{self.base}/start_training/{quote(participant_id, safe='')}")
        return TrainingTicket(ok=bool(answer["ok"]), url=answer.get("url"), token=answer.get("token"))

    def close(self) -> Deferred[Any]:
        from twisted.internet.defer import succeed

        return succeed(None)


class _PushReceiver(pb.Referenceable):
    """The callback reference a PB participant hands the coordinator."""

    def __init__(self) -> None:
        self.notifications: Notifications | None = None

    def remote_selected(self, round_number: int) -> None:
        if self.notifications is not None:
            self.notifications.selected(int(round_number))

    def remote_finished(self) -> None:
        if self.notifications is not None:
            self.notifications.finished()


log = get_logger("xaind.sdk")

#: Seconds a PB login may take once connected.
LOGIN_TIMEOUT = 30.0


class UnsupportedProtocol(ParticipantError):
    """The coordinator speaks a participant protocol this SDK does not know (docs/pb-protocol.rst, Versions)."""


def check_protocol(announced: Any) -> None:
    """Refuse a coordinator whose `protocol_version` answer is not one this SDK speaks.

    None stands for a coordinator without `protocol_version` (an earlier one
    of this release): version 1 without its ordering guarantee, which the
    runner does not need (a push that comes before its rendez-vous answer is
    kept until the answer).
    """
    if announced is None:
        return
    if not isinstance(announced, dict) or announced.get("name") != PARTICIPANT_PROTOCOL:
        raise UnsupportedProtocol(f"the coordinator does not speak {PARTICIPANT_PROTOCOL} (it announced {announced!r:.120})")
    version = announced.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= PARTICIPANT_PROTOCOL_VERSION:
        raise UnsupportedProtocol(
            f"the coordinator speaks {PARTICIPANT_PROTOCOL} version {version!r:.40}; this SDK knows versions 1 to "
            f"{PARTICIPANT_PROTOCOL_VERSION} (upgrade xaind)"
        )


class PbCoordinatorClient:
    """The coordinator's PB listener, logged in anonymously; reconnects on the next call.

    With `tls_hostname`, the connection is TLS, the coordinator's certificate
    verified for that host against `trust_root` (the platform's CAs when None),
    and `client_certificate` shown if the coordinator asks for one.
    An `enrolment_token` is passed as the argument of `rendez_vous`; without
    one the call takes no argument, as the seed's.
    """

    hears_selections_by_heartbeat = False

    def __init__(
        self,
        reactor: Any,
        endpoint_description: str,
        *,
        tls_hostname: str | None = None,
        port: int = 5555,
        trust_root: IOpenSSLTrustRoot | None = None,
        client_certificate: PrivateCertificate | None = None,
        enrolment_token: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.enrolment_token = enrolment_token
        self.endpoint_description = endpoint_description
        self.port = port
        self.tls_hostname = tls_hostname
        self.trust_root = trust_root
        self.client_certificate = client_certificate
        self._perspective: pb.RemoteReference | None = None
        self._connecting: Deferred[pb.RemoteReference] | None = None
        self._factory: pb.PBClientFactory | None = None
        self._receiver = _PushReceiver()
        #: The id of the last accepted rendez-vous: its pushes are resumed on every new connection.
        self._participant_id: str | None = None

    @inlineCallbacks
    def _connected(self) -> Any:
        if self._perspective is not None:
            return self._perspective
        factory = LossReportingPBClientFactory()
        factory.noisy = False
        endpoint = self._endpoint()
        try:
            broker = yield endpoint.connect(factory)
            # A connection the server's kernel dropped from a full accept queue looks open here and
            # would wait for TCP to give up (minutes): bounded, it is retried as any transient failure.
            logging_in = factory.login(Anonymous(), client=self._receiver)
            logging_in.addTimeout(LOGIN_TIMEOUT, self.reactor)
            perspective = yield logging_in
            check_protocol((yield self._announced_protocol(perspective)))
            if self._participant_id is not None:
                yield self._resume(perspective, self._participant_id)
        except NETWORK_ERRORS + (pb.PBConnectionLost, SSL.Error, VerificationError, CertificateError) as failure:
            factory.disconnect()
            refusal = tls_refusal(failure)
            if refusal is not None:
                raise PeerNotTrusted(f"PB {self.tls_hostname}: TLS refused: {refusal}") from None
            raise Transient(f"PB {self.endpoint_description}: {failure!r}") from None
        self._factory = factory
        self._perspective = perspective
        broker.notifyOnDisconnect(self._lost)
        return perspective

    @inlineCallbacks
    def _resume(self, perspective: pb.RemoteReference, participant_id: str) -> Any:
        """After a reconnection: have the participant's pushes come to this connection's mind.

        An earlier coordinator without `resume` (not_found) pushes nothing
        here; the heartbeats' answers say the same, a period later.
        """
        resuming = perspective.callRemote(PBMethod.RESUME, participant_id)
        resuming.addTimeout(LOGIN_TIMEOUT, self.reactor)
        try:
            yield resuming
        except pb.RemoteError as error:
            # Pushes are a shortcut: without them the heartbeats' answers still say everything.
            log.debug("resume of {participant} not taken: {error}", participant=participant_id, error=error)

    @inlineCallbacks
    def _announced_protocol(self, perspective: pb.RemoteReference) -> Any:
        """The coordinator's `protocol_version` answer; None if it has no such call (see `check_protocol`)."""
        asking = perspective.callRemote(PBMethod.PROTOCOL_VERSION)
        asking.addTimeout(LOGIN_TIMEOUT, self.reactor)
        try:
            return (yield asking)
        except pb.RemoteError as error:
            if str(error).startswith(f"{ErrorCode.NOT_FOUND.value}: "):
                return None
            # Not an answer about the protocol: the coordinator failed the call, which a later login may not.
            raise Transient(f"PB protocol_version: {error}") from None

    def _endpoint(self) -> Any:
        if self.tls_hostname is None:
            return endpoints.clientFromString(self.reactor, self.endpoint_description)
        options = client_tls_options(self.tls_hostname, self.trust_root, self.client_certificate)
        return endpoints.SSL4ClientEndpoint(self.reactor, self.tls_hostname, self.port, options, timeout=30)

    def _lost(self) -> None:
        self._perspective = None

    @inlineCallbacks
    def _call(self, name: str, *args: Any) -> Any:
        perspective = yield self._connected()
        try:
            calling = perspective.callRemote(name, *args)
            calling.addTimeout(30, self.reactor)
            return (yield calling)
        except (pb.PBConnectionLost, pb.DeadReferenceError) + NETWORK_ERRORS as failure:
            self._perspective = None
            raise Transient(f"PB {name}: {failure!r}") from None

    @inlineCallbacks
    def rendez_vous(self, notifications: Notifications) -> Any:
        self._receiver.notifications = notifications
        arguments = () if self.enrolment_token is None else (self.enrolment_token,)
        try:
            answer = yield self._call(PBMethod.RENDEZ_VOUS, *arguments)
        except pb.RemoteError as refusal:
            raise pb_refusal(refusal) from None
        self._participant_id = str(answer["id"]) if answer["ok"] else None
        return RendezVous(participant_id=str(answer["id"]), ok=bool(answer["ok"]))

    @inlineCallbacks
    def heartbeat(self, participant_id: str) -> Any:
        answer = yield self._call(PBMethod.HEARTBEAT, participant_id)
        return Heartbeat(state=str(answer["state"]), round=answer["round"])

    @inlineCallbacks
    def start_training(self, participant_id: str) -> Any:
        answer = yield self._call(PBMethod.START_TRAINING, participant_id)
        return TrainingTicket(ok=bool(answer["ok"]), url=answer["url"], token=answer["token"])

    def close(self) -> Deferred[Any]:
        from twisted.internet.defer import succeed

        if self._factory is not None:
            self._factory.disconnect()
        self._perspective = None
        return succeed(None)


def pb_refusal(refusal: pb.RemoteError) -> Refused | Transient:
    """A coordinator's PB refusal ("<code>: <message>") as the SDK's `Refused`, with status 0 (no HTTP status over PB).

    A "not now" (`BUSY_CODES`: a rate limit, the participant limit) is
    `Transient` instead, retried with backoff as HTTP's 429 and 503 are.
    """
    text = str(refusal)
    code, separator, message = text.partition(": ")
    if not separator:
        return Refused(0, text)
    if code in BUSY_CODES:
        return Transient(f"PB: {text}")
    return Refused(0, message, code)


def coordinator_client(reactor: Any, http: HttpClient, url: str, enrolment_token: str | None = None) -> CoordinatorClient:
    """The client for `url`: `http://…`/`https://…` for HTTP, `pb://host:port` or `pbs://host:port` (PB over TLS).

    TLS connections trust what `http` trusts (its `trust_root`) and show
    its `client_certificate`; an `enrolment_token` is shown at each rendez-vous.
    """
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in ("http", "https"):
        return HttpCoordinatorClient(http, url, enrolment_token)
    if scheme in ("pb", "pbs"):
        if not parts.hostname:
            raise ValueError(f"coordinator URL must name a host, got {url!r}")
        endpoint = f"tcp:{endpoints.quoteStringArgument(parts.hostname)}:{parts.port or 5555}"
        if scheme == "pb":
            return PbCoordinatorClient(reactor, endpoint, enrolment_token=enrolment_token)
        return PbCoordinatorClient(
            reactor,
            endpoint,
            tls_hostname=parts.hostname,
            port=parts.port or 5555,
            trust_root=http.trust_root,
            client_certificate=http.client_certificate,
            enrolment_token=enrolment_token,
        )
    raise ValueError(f"coordinator URL must be http://, https://, pb:// or pbs://, got {url!r}")


SelectedCallback = Callable[[int], None]
