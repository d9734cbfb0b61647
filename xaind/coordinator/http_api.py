"""The participants' HTTP API of the coordinator, wire-compatible with the seed.

`GET /rendez_vous`, `GET /heartbeat/<id>`, `GET /start_training/<id>` answer
200 with a JSON state in every situation a legacy participant meets in normal
operation (it treats any other status as fatal); only requests no legacy
participant sends (unknown paths, wrong methods, undecodable ids) get a 4xx
with a JSON `{"error": ...}`. `GET /status` is for operators, and so is the
status page at `/` (HTML, its style and script under `/page/`: read-only,
drawn from `/status` by polling it; GET and HEAD only).

With `participants.authentication` on, a rendez-vous carries
`Authorization: Bearer <enrolment token>` or comes over a connection whose
client certificate the listener verified; without either it is 401
`not_authenticated` (docs/http-api.rst, Authentication).

A participant polling over HTTP learns of its selection at its next
heartbeat, on average half a period late. With `api.heartbeat_hold` > 0
the heartbeat of a participant between trainings is held until its
answer changes (it is selected, or training ends) or the hold runs out,
whichever comes first: the legacy client sends it with no timeout and
applies the answer whenever it comes, so it hears of its selection at
once when one of its heartbeats is open (hold / (hold + its period) of the
time). A held heartbeat counts as a heartbeat when it is answered too.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request, Site

from xaind.coordinator.rounds import HeartbeatAnswer
from xaind.coordinator.service import CoordinatorService, StartTrainingAnswer
from xaind.coordinator.status_page_files import StatusPageFiles, file_body
from xaind.connection_limits import address_key
from xaind.http_limits import HTTPLimits
from xaind.logs import get_logger
from xaind.protocol import ErrorCode, Refusal
from xaind.tls_server import peer_certificate_fingerprint
from xaind.web import HTTPError, JSONAPIResource, QuietSite, crash_body, encoded_json_body, json_body, path_segment, request_path, require_method

log = get_logger("xaind.coordinator.http")

T = TypeVar("T")

#: Sent with a 401 (RFC 6750): the scheme the rendez-vous takes.
WWW_AUTHENTICATE = b'Bearer realm="xaind"'


def when_answered(beat: HeartbeatAnswer | Deferred[HeartbeatAnswer], then: Callable[[HeartbeatAnswer], None]) -> None:
    """Call `then` with the heartbeat's answer: now, or once a cluster's coordinator has looked it up."""
    if isinstance(beat, Deferred):
        beat.addCallback(then)
    else:
        then(beat)


@functools.lru_cache(maxsize=1024)
def heartbeat_document(state: str, round_number: int | None) -> bytes:
    """A heartbeat's answer, encoded once: ten thousand participants are told the same few."""
    return json.dumps({"state": state, "round": round_number}, separators=(",", ":")).encode("utf-8")


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None without a usable one."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None
    scheme, _, token = header.decode("latin-1").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class AnswersSoon:
    """Held heartbeats with news, answered together right after the event that brought it.

    A selection of a thousand participants is news for a thousand held
    heartbeats: one pass over them once the state machine is done, not a
    thousand timers.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: Answering is idempotent, so a heartbeat queued twice (selected, then finished) is answered once.
        self._queued: list[HeldHeartbeat] = []
        self._pass: IDelayedCall | None = None

    def add(self, held: HeldHeartbeat) -> None:
        self._queued.append(held)
        if self._pass is None:
            self._pass = self.clock.callLater(0, self._answer_all)

    def _answer_all(self) -> None:
        self._pass = None
        queued, self._queued = self._queued, []
        for held in queued:
            held.answer()


class HeldHeartbeat:
    """A heartbeat waiting for news: a `ParticipantNotifier` for one answer."""

    def __init__(self, coordinator: CoordinatorService, request: Request, participant_id: str, hold: float, soon: AnswersSoon) -> None:
        self.coordinator = coordinator
        self.request = request
        self.participant_id = participant_id
        self.answered = False
        #: The participant hung up (an answer still being looked up is then dropped).
        self.gone = False
        self._soon = soon
        self._timer: IDelayedCall = coordinator.clock.callLater(hold, self.answer)
        request.notifyFinish().addErrback(self._gone)
        coordinator.watch(participant_id, self)

    # News arrive while the state machine applies an event: answer once it is done.

    def selected(self, round_number: int) -> None:
        self._answer_soon()

    def finished(self) -> None:
        self._answer_soon()

    def _answer_soon(self) -> None:
        if not self.answered:
            self._soon.add(self)

    def answer(self) -> None:
        if self._end():
            when_answered(self.coordinator.heartbeat(self.participant_id), self._write)

    def _write(self, beat: HeartbeatAnswer) -> None:
        log.debug("held heartbeat of {participant} answered {state}", participant=self.participant_id, state=beat.state.value)
        if self.gone:
            return
        self.request.write(encoded_json_body(self.request, 200, heartbeat_document(beat.state.value, beat.round)))
        self.request.finish()

    def _gone(self, reason: Failure) -> None:
        self.gone = True
        self._end()

    def _end(self) -> bool:
        """Stop waiting; False if it had stopped already."""
        if self.answered:
            return False
        self.answered = True
        if self._timer.active():
            self._timer.cancel()
        self.coordinator.unwatch(self.participant_id, self)
        return True


class CoordinatorAPI(JSONAPIResource):
    def __init__(self, coordinator: CoordinatorService, heartbeat_hold: float = 0.0, page: StatusPageFiles | None = None) -> None:
        super().__init__()
        self.coordinator = coordinator
        self.heartbeat_hold = heartbeat_hold
        self.answers_soon = AnswersSoon(coordinator.clock)
        # Read here, at start-up: no request waits on the disk.
        self.page = page if page is not None else StatusPageFiles.from_package()

    def route(self, request: Request) -> bytes | int:
        segments = request.postpath
        match segments:
            case [b"rendez_vous"]:
                require_method(request, b"GET")
                try:
                    answer = self.coordinator.rendez_vous(
                        source=address_key(request.getClientAddress()),
                        enrolment_token=bearer_token(request),
                        certificate=peer_certificate_fingerprint(request.channel.transport if request.channel else None),
                    )
                except Refusal as refusal:
                    if refusal.code is ErrorCode.NOT_AUTHENTICATED:
                        request.setHeader(b"www-authenticate", WWW_AUTHENTICATE)
                    raise
                if isinstance(answer, Deferred):
                    # Several coordinators (state.redis): answered once the rendez-vous is in Redis.
                    return self._answer_later(request, answer, lambda joined: json_body(request, 200, {"id": joined.participant_id, "ok": joined.ok}), "rendez-vous")
                return json_body(request, 200, {"id": answer.participant_id, "ok": answer.ok})
            case [b"heartbeat", raw_id]:
                require_method(request, b"GET")
                participant_id = path_segment(raw_id, "participant id")
                beat = self.coordinator.heartbeat(participant_id)
                if isinstance(beat, Deferred):
                    # Several coordinators (state.redis): an id this one does not know is looked up in Redis first.
                    return self._answer_later(request, beat, lambda answered: encoded_json_body(request, 200, heartbeat_document(answered.state.value, answered.round)), "heartbeat")
                if self.heartbeat_hold > 0 and self.coordinator.may_hold_heartbeat(participant_id, beat):
                    HeldHeartbeat(self.coordinator, request, participant_id, self.heartbeat_hold, self.answers_soon)
                    return NOT_DONE_YET
                return encoded_json_body(request, 200, heartbeat_document(beat.state.value, beat.round))
            case [b"start_training", raw_id]:
                require_method(request, b"GET")
                return self._start_training(request, path_segment(raw_id, "participant id"))
            case [b"status"]:
                require_method(request, b"GET")
                return json_body(request, 200, self.coordinator.status())
            case [b""]:
                require_method(request, b"GET", b"HEAD")
                return file_body(request, self.page.page)
            case [b"page", raw_name]:
                require_method(request, b"GET", b"HEAD")
                asset = self.page.asset(path_segment(raw_name, "file name"))
                if asset is None:
                    raise HTTPError(ErrorCode.NOT_FOUND, f"no such file: {request_path(request)}")
                return file_body(request, asset)
        raise HTTPError(ErrorCode.NOT_FOUND, f"no such resource: {request_path(request)}")

    def _answer_later(self, request: Request, answering: Deferred[T], body_of: Callable[[T], bytes], what: str) -> int:
        """Write the body of `answering`'s result when it comes, unless the client hung up meanwhile."""
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(answered: T) -> None:
            if not gone:
                body = body_of(answered)
                # As the answers given at once: with a length, not chunked.
                request.setHeader(b"content-length", b"%d" % len(body))
                request.write(body)
                request.finish()

        def crashed(failure: Failure) -> None:
            body = crash_body(request, failure, what)
            if not gone:
                request.write(body)
                request.finish()

        answering.addCallbacks(answer, crashed)
        return NOT_DONE_YET

    def _start_training(self, request: Request, participant_id: str) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def answer(result: StartTrainingAnswer) -> None:
            if gone:
                log.info("{participant} hung up before its start-training answer", participant=participant_id)
                if result.token is not None:
                    self.coordinator.start_training_unanswered(participant_id, result.token)
                return
            request.write(json_body(request, 200, {"ok": result.ok, "url": result.url, "token": result.token}))
            request.finish()

        def crashed(failure: Failure) -> None:
            body = crash_body(request, failure, f"start training for {participant_id}")
            if not gone:
                request.write(body)
                request.finish()

        self.coordinator.start_training(participant_id).addCallbacks(answer, crashed)
        return NOT_DONE_YET


def coordinator_site(coordinator: CoordinatorService, heartbeat_hold: float = 0.0, limits: HTTPLimits = HTTPLimits()) -> Site:
    site = QuietSite(CoordinatorAPI(coordinator, heartbeat_hold), limits=limits)
    site.displayTracebacks = False
    site.noisy = False
    return site
