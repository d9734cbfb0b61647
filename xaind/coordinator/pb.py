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
"""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ANONYMOUS, AllowAnonymousAccess, ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from twisted.spread import pb
from zope.interface import implementer

from xaind.coordinator.aggregator_link import AggregatorLink
from xaind.coordinator.service import CoordinatorService, new_participant_id
from xaind.logs import get_logger
from xaind.protocol import AGGREGATOR_USER, PBMethod

log = get_logger("xaind.coordinator.pb")

class LoginRefused(error.UnauthorizedLogin, pb.Error):
    """A refused login, sent to the peer as a PB error instead of logged as a crash."""


@implementer(ICredentialsChecker)
class SharedSecretChecker:
    """Known PB users and their secrets (PB's login is a challenge-response: no secret on the wire)."""

    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameHashedPassword)

    def __init__(self, secrets: dict[bytes, str]) -> None:
        self._secrets = {user: secret.encode("utf-8") for user, secret in secrets.items()}

    def requestAvatarId(self, offered: Any) -> Deferred[bytes]:
        username = offered.username
        secret = self._secrets.get(username)
        if secret is not None and offered.checkPassword(secret):
            return succeed(username)
        reason = "unknown user" if secret is None else "wrong secret"
        log.warn("refused PB login for {user}: {reason}", user=username.decode("utf-8", "replace"), reason=reason)
        return fail(LoginRefused(reason))


class AggregatorPerspective(pb.Avatar):
    """What the logged-in aggregator may call on the coordinator."""

    def __init__(self, coordinator: CoordinatorService) -> None:
        self.coordinator = coordinator

    def perspective_end_training(self, participant_id: str, token: str, success: bool) -> bool:
        return self.coordinator.end_training(participant_id, token, bool(success))


class ParticipantPush:
    """Pushes news to a PB participant's mind; a vanished participant is the heartbeat's business."""

    def __init__(self, mind: pb.RemoteReference) -> None:
        self.mind = mind

    def _push(self, name: str, *args: Any) -> None:
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


class ParticipantPerspective(pb.Avatar):
    """The participant API over PB: the same semantics as HTTP, plus pushed notifications."""

    def __init__(self, coordinator: CoordinatorService, mind: pb.RemoteReference | None) -> None:
        self.coordinator = coordinator
        self.push = ParticipantPush(mind) if mind is not None else None
        self.participant_ids: set[str] = set()

    def perspective_rendez_vous(self) -> dict[str, Any]:
        participant_id = new_participant_id()
        if self.push is not None:
            # Watched before it joins: its rendez-vous may be what starts the round.
            self.coordinator.watch(participant_id, self.push)
        answer = self.coordinator.rendez_vous(participant_id)
        if self.push is not None:
            if answer.ok:
                self.participant_ids.add(participant_id)
            else:
                self.coordinator.unwatch(participant_id, self.push)
        return {"id": participant_id, "ok": answer.ok}

    def perspective_heartbeat(self, participant_id: str) -> dict[str, Any]:
        beat = self.coordinator.heartbeat(str(participant_id))
        return {"state": beat.state.value, "round": beat.round}

    def perspective_start_training(self, participant_id: str) -> Deferred[dict[str, Any]]:
        return self.coordinator.start_training(str(participant_id)).addCallback(
            lambda answer: {"ok": answer.ok, "url": answer.url, "token": answer.token}
        )

    def logout(self) -> None:
        if self.push is not None:
            for participant_id in self.participant_ids:
                self.coordinator.unwatch(participant_id, self.push)


@implementer(IRealm)
class CoordinatorRealm:
    def __init__(self, coordinator: CoordinatorService, link: AggregatorLink) -> None:
        self.coordinator = coordinator
        self.link = link

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> tuple[Any, Any, Any]:
        if pb.IPerspective not in interfaces:
            raise NotImplementedError("only PB perspectives are served")
        if avatar_id is ANONYMOUS:
            participant = ParticipantPerspective(self.coordinator, mind)
            return pb.IPerspective, participant, participant.logout
        if avatar_id != AGGREGATOR_USER or mind is None:
            raise NotImplementedError(f"no PB avatar for {avatar_id!r}")
        self.link.attach(mind)
        # Re-synchronise once the login's answer is on its way.
        self.coordinator.clock.callLater(0, self.coordinator.sync_aggregator)
        return pb.IPerspective, AggregatorPerspective(self.coordinator), lambda: self.link.detach(mind)


def coordinator_pb_factory(coordinator: CoordinatorService, link: AggregatorLink, secret: str) -> pb.PBServerFactory:
    portal = Portal(
        CoordinatorRealm(coordinator, link),
        [SharedSecretChecker({AGGREGATOR_USER: secret}), AllowAnonymousAccess()],
    )
    factory = pb.PBServerFactory(portal)
    factory.noisy = False
    return factory
