"""The coordinator's Perspective Broker listener.

One `twisted.cred` portal serves everyone who speaks PB to the coordinator:
the aggregator's control link and PB participants log in through it. Every
refused login is logged with the user name it tried.
"""

from __future__ import annotations

from typing import Any

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail
from twisted.spread import pb
from zope.interface import implementer

from xaind.coordinator.service import CoordinatorService
from xaind.logs import get_logger

log = get_logger("xaind.coordinator.pb")


@implementer(ICredentialsChecker)
class CoordinatorCredentialsChecker:
    """Checks PB logins against the users the coordinator knows.

    No user is known yet: the aggregator link and PB participants add theirs.
    """

    credentialInterfaces = (credentials.IUsernameHashedPassword,)

    def requestAvatarId(self, offered: Any) -> Deferred[bytes]:
        username = getattr(offered, "username", b"?")
        log.warn("refused PB login for unknown user {user!r}", user=username)
        return fail(error.UnauthorizedLogin(f"unknown user {username!r}"))


@implementer(IRealm)
class CoordinatorRealm:
    def __init__(self, coordinator: CoordinatorService) -> None:
        self.coordinator = coordinator

    def requestAvatar(self, avatar_id: bytes, mind: Any, *interfaces: Any) -> Any:
        raise NotImplementedError(f"no PB avatar for {avatar_id!r}")


def coordinator_pb_factory(coordinator: CoordinatorService) -> pb.PBServerFactory:
    portal = Portal(CoordinatorRealm(coordinator), [CoordinatorCredentialsChecker()])
    factory = pb.PBServerFactory(portal)
    factory.noisy = False
    return factory
