"""A coordinator that says "not now" (429 rate limit, 503 participant limit) is retried, not fatal.

The HTTP client runs against a small twisted.web site on 127.0.0.1 that
refuses the first rendez-vous with `429` and `Retry-After`; the PB refusal
codes are mapped by `pb_refusal` alone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.spread import pb
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xaind.sdk import Participant, ParticipantError, ParticipantSummary, start_participant
from xaind.sdk.coordinator_client import pb_refusal
from xaind.sdk.http import Refused, Transient
from xaind.sdk.runner import RetryPolicy
from xaind.testing.waiting import wait_until


class NoTraining(Participant):
    def train_round(self, weights: Any) -> Any:
        raise AssertionError("never selected")


class BusyCoordinator(Resource):
    """Refuses the first `refusals` rendez-vous with `status` and `Retry-After: 1`, then answers "training is over"."""

    isLeaf = True

    def __init__(self, refusals: int, status: int, code: str) -> None:
        super().__init__()
        self.refusals = refusals
        self.status = status
        self.code = code
        self.times: list[float] = []

    def render_GET(self, request: Request) -> bytes:  # noqa: N802 - twisted.web's name
        self.times.append(reactor.seconds())
        request.setHeader(b"content-type", b"application/json")
        if len(self.times) <= self.refusals:
            request.setResponseCode(self.status)
            request.setHeader(b"retry-after", b"1")
            return json.dumps({"error": "not now", "code": self.code}).encode()
        return json.dumps({"id": "0" * 32, "ok": False}).encode()


async def participant_against(coordinator: BusyCoordinator, retry_timeout: float) -> Any:
    """How a participant that never trains ends against `coordinator` (a summary or a Failure)."""
    port = reactor.listenTCP(0, Site(coordinator), interface="127.0.0.1")
    try:
        _, done = start_participant(
            NoTraining(),
            f"http://127.0.0.1:{port.getHost().port}",
            reactor=reactor,
            retry=RetryPolicy(initial_delay=0.05, max_delay=0.1, retry_timeout=retry_timeout),
        )
        outcome: list[Any] = []
        done.addBoth(outcome.append)
        await wait_until(lambda: outcome, timeout=20)
    finally:
        await port.stopListening()
    return outcome[0]


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(("status", "code"), [(429, "rendez_vous_rate_limited"), (503, "too_many_participants")])
async def test_a_busy_coordinator_is_asked_again_after_its_retry_after(status: int, code: str) -> None:
    coordinator = BusyCoordinator(refusals=2, status=status, code=code)
    summary = await participant_against(coordinator, retry_timeout=30.0)
    assert isinstance(summary, ParticipantSummary), summary
    assert (len(coordinator.times), summary.retries) == (3, 2)
    # The backoff alone would have asked again after 0.05 s and 0.1 s.
    gaps = [later - earlier for earlier, later in zip(coordinator.times, coordinator.times[1:])]
    assert min(gaps) >= 0.95, gaps


@pytest_twisted.ensureDeferred
async def test_a_retry_after_beyond_the_retry_timeout_gives_up_at_once() -> None:
    coordinator = BusyCoordinator(refusals=100, status=429, code="rendez_vous_rate_limited")
    failure = await participant_against(coordinator, retry_timeout=0.5)
    assert failure.check(ParticipantError)
    assert failure.getErrorMessage().startswith("rendez-vous: gave up after 0 s: GET http://127.0.0.1:"), failure.getErrorMessage()
    assert len(coordinator.times) == 1


@pytest.mark.parametrize(
    ("text", "kind", "code"),
    [
        ("rendez_vous_rate_limited: too many rendez-vous from 127.0.0.1: retry in 3 s", Transient, None),
        ("too_many_participants: too many participants (50000, participants.max_known): try again later", Transient, None),
        ("not_authenticated: rendez-vous needs a valid enrolment token (the argument of rendez_vous)", Refused, "not_authenticated"),
        ("something without a code", Refused, None),
    ],
    ids=["rate-limited", "too-many-participants", "not-authenticated", "uncoded"],
)
def test_pb_refusals_that_say_not_now_are_transient(text: str, kind: type, code: str | None) -> None:
    mapped = pb_refusal(pb.RemoteError("xaind.coordinator.pb.RefusedByCoordinator", text, None))
    assert type(mapped) is kind
    if isinstance(mapped, Refused):
        assert (mapped.status, mapped.code) == (0, code)
