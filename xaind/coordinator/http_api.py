"""The participants' HTTP API of the coordinator, wire-compatible with the seed.

`GET /rendez_vous`, `GET /heartbeat/<id>`, `GET /start_training/<id>` answer
200 with a JSON state in every situation a legacy participant meets in normal
operation (it treats any other status as fatal); only requests no legacy
participant sends (unknown paths, wrong methods, undecodable ids) get a 4xx
with a JSON `{"error": ...}`. `GET /status` is for operators.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request, Site

from xaind.coordinator.service import CoordinatorService, StartTrainingAnswer
from xaind.logs import get_logger
from xaind.web import HTTPError, JSONAPIResource, QuietSite, json_body, path_segment, request_path, require_method

log = get_logger("xaind.coordinator.http")


class CoordinatorAPI(JSONAPIResource):
    def __init__(self, coordinator: CoordinatorService) -> None:
        super().__init__()
        self.coordinator = coordinator

    def route(self, request: Request) -> bytes | int:
        segments = request.postpath
        match segments:
            case [b"rendez_vous"]:
                require_method(request, b"GET")
                answer = self.coordinator.rendez_vous()
                return json_body(request, 200, {"id": answer.participant_id, "ok": answer.ok})
            case [b"heartbeat", raw_id]:
                require_method(request, b"GET")
                beat = self.coordinator.heartbeat(path_segment(raw_id, "participant id"))
                return json_body(request, 200, {"state": beat.state.value, "round": beat.round})
            case [b"start_training", raw_id]:
                require_method(request, b"GET")
                return self._start_training(request, path_segment(raw_id, "participant id"))
            case [b"status"]:
                require_method(request, b"GET")
                return json_body(request, 200, self.coordinator.status())
        raise HTTPError(404, f"no such resource: {request_path(request)}")

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
            log.failure("start training for {participant} crashed", failure, participant=participant_id)
            if not gone:
                request.write(json_body(request, 500, {"error": "internal error"}))
                request.finish()

        self.coordinator.start_training(participant_id).addCallbacks(answer, crashed)
        return NOT_DONE_YET


def coordinator_site(coordinator: CoordinatorService) -> Site:
    site = QuietSite(CoordinatorAPI(coordinator))
    site.displayTracebacks = False
    site.noisy = False
    return site
