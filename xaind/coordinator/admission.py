"""The checks a rendez-vous passes before it changes anything: rate, credential, `participants.max_known`.

Kept apart from the service so that every coordinator process of a
cluster (docs/scale.rst, Coordinator state in Redis) checks a rendez-vous
where it arrives, the same way, before handing it to the leader.
"""

from __future__ import annotations

import math

from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel

from xaind.coordinator.authentication import Credential, NotAuthenticated, ParticipantAuthenticator
from xaind.coordinator.metrics import CoordinatorMetrics
from xaind.coordinator.settings import ParticipantLimits
from xaind.logs import RepeatedEventLog
from xaind.protocol import ErrorCode, RateLimited, Refusal
from xaind.rate_limits import AddressRateLimit


class RendezVousGate:
    """Refuses a rendez-vous (`RateLimited`, `Refusal`) beyond the limits; else says what credential it showed."""

    def __init__(
        self,
        limits: ParticipantLimits,
        clock: IReactorTime,
        authenticator: ParticipantAuthenticator | None,
        metrics: CoordinatorMetrics,
        events: RepeatedEventLog,
    ) -> None:
        self.limits = limits
        self.authenticator = authenticator
        self.metrics = metrics
        self.events = events
        self._rate = AddressRateLimit(limits.rendez_vous_per_address_per_minute, clock)

    def check(
        self,
        source: str | None,
        enrolment_token: str | None,
        token_hint: str,
        certificate: bytes | None,
        known: bool,
        known_count: int,
    ) -> Credential | None:
        """The rate limit first: a flood of guesses is refused before any token is looked at."""
        if source is not None:
            wait = self._rate.take(source)
            if wait > 0:
                self.metrics.rendez_vous_refusal(ErrorCode.RENDEZ_VOUS_RATE_LIMITED)
                self.events.emit(
                    "rendez_vous_rate_limited",
                    LogLevel.warn,
                    "refused a rendez-vous from {source}: more than {allowance} a minute (participants.rendez_vous_per_address_per_minute)",
                    source=source,
                    allowance=self.limits.rendez_vous_per_address_per_minute,
                )
                raise RateLimited(
                    f"too many rendez-vous from {source} (participants.rendez_vous_per_address_per_minute): "
                    f"retry in {math.ceil(wait)} s",
                    ErrorCode.RENDEZ_VOUS_RATE_LIMITED,
                    wait,
                )
        credential = self._authenticated(enrolment_token, certificate, source, token_hint)
        if not known and known_count >= self.limits.max_known:
            self.metrics.rendez_vous_refusal(ErrorCode.TOO_MANY_PARTICIPANTS)
            self.events.emit(
                "too_many_participants",
                LogLevel.warn,
                "refused a rendez-vous from {source}: too many participants ({count}, participants.max_known)",
                source=source or "a PB participant",
                count=self.limits.max_known,
            )
            raise Refusal(
                f"too many participants ({self.limits.max_known}, participants.max_known): try again later",
                ErrorCode.TOO_MANY_PARTICIPANTS,
            )
        return credential

    def _authenticated(self, enrolment_token: str | None, certificate: bytes | None, source: str | None, token_hint: str) -> Credential | None:
        """The credential the rendez-vous showed, None with authentication off; else a `Refusal`.

        No credential goes into the log or the refusal: only what was missing.
        """
        if self.authenticator is None:
            return None
        try:
            return self.authenticator.authenticate(enrolment_token, certificate, token_hint)
        except NotAuthenticated as refused:
            self.metrics.rendez_vous_refusal(ErrorCode.NOT_AUTHENTICATED)
            self.events.emit(
                "not_authenticated",
                LogLevel.warn,
                "refused a rendez-vous from {source}: {reason}",
                source=source or "a PB participant",
                reason=refused.reason,
            )
            raise Refusal(refused.message, ErrorCode.NOT_AUTHENTICATED) from None


__all__ = ["RendezVousGate"]
