"""The coordinator's Perspective Broker listener.

One `twisted.cred` portal serves everyone who speaks PB to the coordinator.
The aggregator logs in as user `aggregator` with the shared secret; the
coordinator then calls back through the aggregator's mind (`admit`, `sync`,
`aggregate`) over the same connection, and the aggregator reports finished
uploads through its perspective. Every refused login is logged.

Participants log in anonymously, as they use the HTTP API without
credentials; their mind is the callback through which the coordinator
pushes "selected for round N" and "training finished" the moment they
happen, instead of waiting for the participant's next heartbeat.

Anyone may connect, so nothing a client sends may make the coordinator
hold more per connection than it needs, or log more than one short line:
a connection pushes to its latest participant id only, a call it cannot
take (unknown name, wrong arguments) is answered with a PB error carrying
an `ErrorCode`, and a login with a mind that cannot be called is refused.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ANONYMOUS, AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.spread import pb
from zope.interface import implementer

from xaind.coordinator.aggregator_link import AggregatorLogins
from xaind.coordinator.rounds import HeartbeatState
from xaind.coordinator.service import CoordinatorService, new_participant_id
from xaind.connection_limits import ConnectionLimits, LimitedPBServerFactory, address_key
from xaind.logs import get_logger
from xaind.protocol import AGGREGATOR_USER, PARTICIPANT_PROTOCOL, PARTICIPANT_PROTOCOL_VERSION, ErrorCode, PBMethod, Refusal
from xaind.tls_server import peer_certificate_fingerprint

log = get_logger("xaind.coordinator.pb")

#: `rendez_vous` called without an argument (None is an argument, refused as any other non-string).
NO_TOKEN: Any = object()

#: Why a follower of a cluster (`state.redis`) refuses the aggregator; the aggregator's link knows it by it.
FOLLOWER_REFUSAL = "this coordinator follows the leader: the aggregator logs in at the leader"

#: The longest method name or reason a log line quotes: the peer chooses them.
MAX_QUOTED_CHARS = 80


class LoginRefused(error.UnauthorizedLogin, pb.Error):
    """A refused login, sent to the peer as a PB error instead of logged as a crash."""


class RefusedByCoordinator(pb.Error):
    """A PB call the coordinator cannot take, sent to the peer instead of logged as a crash.

    Its message is "<code>: <message>", as `RefusedByAggregator`'s on the
    other side of the link, so a client reads the code with `refusal_code`
    (xaind/aggregator/coordinator_link.py).
    """

    def __init__(self, message: str, code: ErrorCode, logged: bool = False) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        #: Said already (a flood's refusals are logged once per interval by the service).
        self.logged = logged


def _shortened(text: str) -> str:
    return text if len(text) <= MAX_QUOTED_CHARS else text[:MAX_QUOTED_CHARS] + "..."


def _quoted(text: str) -> str:
    return repr(_shortened(text))


def _printable(text: str) -> str:
    """`text` as a log line may show it: short, and quoted if it could break the line."""
    return _shortened(text) if text.isprintable() else _quoted(text)


def _peer_of(broker: pb.Broker) -> str:
    transport = getattr(broker, "transport", None)
    address = transport.getPeer() if transport is not None else None
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None else "an unknown peer"


def _text_argument(value: Any, name: str) -> str:
    """A string argument of a PB call; anything else is the caller's mistake, not a crash."""
    if not isinstance(value, str):
        raise RefusedByCoordinator(f"{name} must be a string, not {type(value).__name__}", ErrorCode.BAD_REQUEST)
    return value


#: Arguments of Twisted's login objects that must be bytes: the checker and the challenge compare them as such.
_BYTES_ARGUMENTS = ("username", "response")


def _checked_call(target: Any, prefix: str, name: str, args: Any, kw: Any) -> Any:
    """Call `target.<prefix><name>(*args, **kw)`, or raise `RefusedByCoordinator` if it cannot take the call."""
    method = getattr(target, f"{prefix}{name}", None)
    if method is None:
        raise RefusedByCoordinator(f"no PB method {_quoted(name)}", ErrorCode.NOT_FOUND)
    try:
        bound = inspect.signature(method).bind(*args, **kw)
    except TypeError as wrong:
        raise RefusedByCoordinator(f"{name}: {wrong}", ErrorCode.BAD_REQUEST) from None
    for argument in _BYTES_ARGUMENTS:
        if argument in bound.arguments and not isinstance(bound.arguments[argument], bytes):
            raise RefusedByCoordinator(f"{name}: {argument} must be bytes", ErrorCode.BAD_REQUEST)
    return method(*args, **kw)


def _refused_call(broker: pb.Broker, name: str, refusal: RefusedByCoordinator) -> None:
    if refusal.logged:
        return
    log.info("refused PB call {name} from {peer}: {reason}", name=_quoted(name), peer=_peer_of(broker), reason=refusal.code.value)


def _unserialized(broker: pb.Broker, name: str, args: Any, kw: Any, perspective: Any) -> tuple[Any, Any]:
    """A call's arguments as Python objects; arguments nested too deep to read are a bad request.

    Twisted's own clients cannot even send them at the default recursion
    limit; a hostile one can, and unread they would be a RecursionError
    logged as a traceback of thousands of lines.
    """
    try:
        return broker.unserialize(args, perspective), broker.unserialize(kw, perspective)
    except RecursionError:
        raise RefusedByCoordinator(f"{name}: arguments nested too deep", ErrorCode.BAD_REQUEST) from None


def _method_name(message: str | bytes) -> str:
    return message.decode("utf-8", "replace") if isinstance(message, bytes) else str(message)


class CheckedAvatar(pb.Avatar):
    """Answers a call it cannot take with a `RefusedByCoordinator` and one short log line.

    pb.Avatar would raise AttributeError or TypeError for an unknown name or
    wrong arguments, which PB logs as a traceback (and a TypeError with the
    arguments' repr, whatever their size) before it tells the peer.
    """

    #: The source address of the caller's connection (what rendez-vous are counted by).
    source: str | None = None
    #: The fingerprint of the client certificate the connection's TLS handshake verified, if any.
    certificate: bytes | None = None

    def perspectiveMessageReceived(self, broker: pb.Broker, message: str, args: Any, kw: Any) -> Any:
        if self.source is None and broker.transport is not None:
            self.source = address_key(broker.transport.getPeer())
            self.certificate = peer_certificate_fingerprint(broker.transport)
        name = _method_name(message)
        try:
            args, kw = _unserialized(broker, name, args, kw, self)
            state = _checked_call(self, "perspective_", name, args, kw)
        except RefusedByCoordinator as refusal:
            _refused_call(broker, name, refusal)
            raise
        return broker.serialize(state, self, getattr(self, f"perspective_{name}"), args, kw)


class CheckedReferenceable(pb.Referenceable):
    """Twisted's login objects (the portal's root, a login's challenger) behind the checks of `CheckedAvatar`.

    Anyone can call them before logging in; Twisted's own would log a
    traceback for an unknown name or wrong arguments. Calls are passed to
    the wrapped object's `remote_` methods, and a challenger it answers with
    is wrapped too.
    """

    def __init__(self, wrapped: pb.Referenceable) -> None:
        self.wrapped = wrapped

    def remoteMessageReceived(self, broker: pb.Broker, message: str, args: Any, kw: Any) -> Any:
        name = _method_name(message)
        try:
            args, kw = _unserialized(broker, name, args, kw, None)
            state = _checked_call(self.wrapped, "remote_", name, args, kw)
        except RefusedByCoordinator as refusal:
            _refused_call(broker, name, refusal)
            raise
        if isinstance(state, tuple):
            state = tuple(CheckedReferenceable(item) if isinstance(item, pb.Referenceable) else item for item in state)
        return broker.serialize(state, None)


@implementer(pb.IPBRoot)
class CheckedPortalRoot:
    """The portal's PB root, behind `CheckedReferenceable`."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal
        self.root = pb.IPBRoot(portal)

    def rootObject(self, broker: pb.Broker) -> CheckedReferenceable:
        return CheckedReferenceable(self.root.rootObject(broker))


@implementer(ICredentialsChecker)
class SharedSecretChecker:
    """Known PB users and their secrets (PB's login is a challenge-response: no secret on the wire)."""

    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, secrets: dict[bytes, str]) -> None:
        self._secrets = {user: secret.encode("utf-8") for user, secret in secrets.items()}

    def requestAvatarId(self, offered: Any) -> Deferred[bytes]:
        username = offered.username
        secret = self._secrets.get(username) if isinstance(username, bytes) else None
        if secret is not None and offered.checkPassword(secret):
            return succeed(username)
        reason = "unknown user" if secret is None else "wrong secret"
        user = username.decode("utf-8", "replace") if isinstance(username, bytes) else repr(username)
        log.warn("refused PB login for {user}: {reason}", user=_printable(user), reason=reason)
        return fail(LoginRefused(reason))


class AggregatorPerspective(CheckedAvatar):
    """What the logged-in aggregator may call on the coordinator."""

    def __init__(self, coordinator: CoordinatorService) -> None:
        self.coordinator = coordinator

    def perspective_end_training(self, participant_id: str, token: str, success: bool) -> bool:
        return self.coordinator.end_training(
            _text_argument(participant_id, "participant_id"), _text_argument(token, "token"), bool(success)
        )


class ParticipantPush:
    """Pushes news to a PB participant's mind; a vanished participant is the heartbeat's business.

    While a rendez-vous is being answered its pushes are held (`hold`), and
    sent once the answer is (`release`): PB keeps the order of messages on a
    connection, so the participant knows its id before it hears any news of
    it (docs/pb-protocol.rst, Ordering).
    """

    def __init__(self, mind: pb.RemoteReference) -> None:
        self.mind = mind
        self._held: list[tuple[str, tuple[Any, ...]]] | None = None

    def hold(self) -> None:
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Send what was held, in order (the answer it waited for has gone out)."""
        held, self._held = self._held, None
        for name, args in held or ():
            self._push(name, *args)

    def discard(self) -> None:
        """Forget what was held: the rendez-vous it concerned was refused."""
        self._held = None

    def _push(self, name: str, *args: Any) -> None:
        if self._held is not None:
            self._held.append((name, args))
            return
        try:
            self.mind.callRemote(name, *args).addErrback(
                lambda failure: log.debug("push {name} failed: {error}", name=name, error=failure.getErrorMessage())
            )
        except pb.DeadReferenceError:
            pass

    def selected(self, round_number: int) -> None:
        self._push(PBMethod.SELECTED, round_number)

    def finished(self) -> None:
        self._push(PBMethod.FINISHED)


class ParticipantPerspective(CheckedAvatar):
    """The participant API over PB: the same semantics as HTTP, plus pushed notifications.

    A connection pushes to its latest participant id only: a client that
    rendez-vous again has given up the earlier id (the SDK does so after a
    `reject`), and anything more would let one connection make the
    coordinator hold a notifier per rendez-vous until it logs out.
    """

    def __init__(self, coordinator: CoordinatorService, mind: pb.RemoteReference | None) -> None:
        self.coordinator = coordinator
        self.push = ParticipantPush(mind) if mind is not None else None
        #: The ids pushes go to: at most one, the latest accepted rendez-vous.
        self.watched_ids: list[str] = []

    def perspective_rendez_vous(self, enrolment_token: Any = NO_TOKEN) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """Join; `enrolment_token` is needed when `participants.authentication` takes enrolment tokens, refused otherwise.

        Without them the call takes no argument, as the seed's: a token there
        is a client set up for another coordinator, said at once. A client
        certificate is the TLS connection's.
        """
        if enrolment_token is NO_TOKEN:
            enrolment_token = None
        else:
            authenticator = self.coordinator.authenticator
            if authenticator is None or not authenticator.accepts_tokens:
                raise RefusedByCoordinator(
                    "rendez_vous takes no enrolment token here (participants.authentication has no enrolment_tokens)",
                    ErrorCode.BAD_REQUEST,
                )
            enrolment_token = _text_argument(enrolment_token, "enrolment_token")
        participant_id = new_participant_id()
        if self.push is not None:
            # Watched before it joins: its rendez-vous may be what starts the round. Its pushes wait for the answer.
            self.push.hold()
            self.coordinator.watch(participant_id, self.push)
        try:
            answer = self.coordinator.rendez_vous(
                participant_id,
                source=self.source,
                enrolment_token=enrolment_token,
                token_hint="the argument of rendez_vous",
                certificate=self.certificate,
            )
        except Refusal as refusal:
            if self.push is not None:
                self.coordinator.unwatch(participant_id, self.push)
                self.push.discard()
            raise RefusedByCoordinator(refusal.message, refusal.code, logged=True) from None
        if isinstance(answer, Deferred):
            # Several coordinators (state.redis): answered once the rendez-vous is in Redis.
            return answer.addCallback(self._joined, participant_id)
        return self._joined(answer, participant_id)

    def _joined(self, answer: Any, participant_id: str) -> dict[str, Any]:
        if self.push is not None:
            if answer.ok:
                self._unwatch_all()
                self.watched_ids.append(participant_id)
                # PB writes the answer as soon as this returns; the pushes follow it on the next reactor turn.
                self.coordinator.clock.callLater(0, self.push.release)
            else:
                self.coordinator.unwatch(participant_id, self.push)
                self.push.discard()
        return {"id": participant_id, "ok": answer.ok}

    def perspective_resume(self, participant_id: str) -> dict[str, Any] | Deferred[dict[str, Any]]:
        """Push `participant_id`'s news to this connection's mind from now on (after a reconnection); a heartbeat.

        The id is the participant's bearer secret, as on every call. Answered
        as a heartbeat (and counted as one); a participant the coordinator no
        longer knows is answered `reject` and nothing is watched. As after a
        rendez-vous, the answer comes before any push.
        """
        participant_id = _text_argument(participant_id, "participant_id")
        if self.push is not None:
            self.push.hold()
        beat = self.coordinator.heartbeat(participant_id)
        if isinstance(beat, Deferred):
            return beat.addCallback(self._resumed, participant_id)
        return self._resumed(beat, participant_id)

    def _resumed(self, beat: Any, participant_id: str) -> dict[str, Any]:
        if self.push is not None:
            if beat.state is not HeartbeatState.REJECT:
                self._unwatch_all()
                self.coordinator.watch(participant_id, self.push)
                self.watched_ids.append(participant_id)
                self.coordinator.clock.callLater(0, self.push.release)
            else:
                self.push.discard()
        return {"state": beat.state.value, "round": beat.round}

    def perspective_protocol_version(self) -> dict[str, Any]:
        """Which participant protocol this coordinator speaks, for a client to refuse one it does not know."""
        return {"name": PARTICIPANT_PROTOCOL, "version": PARTICIPANT_PROTOCOL_VERSION}

    def perspective_heartbeat(self, participant_id: str) -> dict[str, Any] | Deferred[dict[str, Any]]:
        beat = self.coordinator.heartbeat(_text_argument(participant_id, "participant_id"))
        if isinstance(beat, Deferred):
            # Several coordinators (state.redis): an id this one does not know is looked up in Redis first.
            return beat.addCallback(lambda answer: {"state": answer.state.value, "round": answer.round})
        return {"state": beat.state.value, "round": beat.round}

    def perspective_start_training(self, participant_id: str) -> Deferred[dict[str, Any]]:
        return self.coordinator.start_training(_text_argument(participant_id, "participant_id")).addCallback(
            lambda answer: {"ok": answer.ok, "url": answer.url, "token": answer.token}
        )

    def _unwatch_all(self) -> None:
        if self.push is not None:
            for participant_id in self.watched_ids:
                self.coordinator.unwatch(participant_id, self.push)
        self.watched_ids.clear()

    def logout(self) -> None:
        self._unwatch_all()


@implementer(IRealm)
class CoordinatorRealm:
    def __init__(self, coordinator: CoordinatorService, link: AggregatorLogins) -> None:
        self.coordinator = coordinator
        self.link = link

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only PB perspectives are served")
        if avatar_id is ANONYMOUS:
            if mind is not None and not isinstance(mind, pb.RemoteReference):
                # Pushes would call it; a plain value would fail there, inside the coordinator's round.
                raise _refused_login("participant", "its mind is not a PB reference (a pb.Referenceable)")
            participant = ParticipantPerspective(self.coordinator, mind)
            return pb.IPerspective, participant, participant.logout
        if avatar_id != AGGREGATOR_USER:
            raise _refused_login(repr(avatar_id), "no such PB user")
        if not isinstance(mind, pb.RemoteReference):
            raise _refused_login("aggregator", "no mind (the coordinator calls the aggregator through it)")
        if not getattr(self.coordinator, "accepts_aggregator", True):
            raise _refused_login("aggregator", FOLLOWER_REFUSAL)
        self.link.attach(mind)
        # Re-synchronise once the login's answer is on its way.
        self.coordinator.clock.callLater(0, self.coordinator.sync_aggregator)
        return pb.IPerspective, AggregatorPerspective(self.coordinator), lambda: self.link.detach(mind)


def _refused_login(user: str, reason: str) -> LoginRefused:
    """A login the credentials allowed but the realm cannot serve: one line, and the peer is told."""
    log.warn("refused PB login for {user}: {reason}", user=user, reason=reason)
    return LoginRefused(f"login refused: {reason}")


def coordinator_pb_factory(
    coordinator: CoordinatorService, link: AggregatorLogins, secret: str, limits: ConnectionLimits = ConnectionLimits()
) -> pb.PBServerFactory:
    portal = Portal(
        CoordinatorRealm(coordinator, link),
        [SharedSecretChecker({AGGREGATOR_USER: secret}), AllowAnonymousAccess()],
    )
    factory = LimitedPBServerFactory(CheckedPortalRoot(portal), limits, coordinator.clock)
    factory.noisy = False
    return factory
