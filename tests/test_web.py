"""The HTTP edge of both daemons: every refusal and every bug answered in JSON."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xaind.protocol import ErrorCode, Refusal
from xaind.web import HTTP_STATUS, JSONAPIResource


class Routes(JSONAPIResource):
    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error = error

    def route(self, request: Request) -> bytes:
        raise self.error


def render(error: Exception) -> tuple[int, dict[str, str]]:
    # A real request on a channel over an in-memory transport. (Not twisted.web's
    # test helpers: they import twisted.trial, whose pytest hook then adds an
    # attribute to every Failure that PB on Twisted 22.4 refuses to send.)
    channel = HTTPChannel()
    channel.site = Site(Resource())
    channel.timeOut = None  # no idle timer on the reactor
    channel.makeConnection(StringTransport())
    request = Request(channel)
    request.method, request.path = b"GET", b"/boom"
    body = Routes(error).render(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    return request.code, json.loads(body)



def test_a_route_that_crashes_answers_json_500_and_logs_the_traceback_under_an_id(log_events) -> None:
    status, document = render(ZeroDivisionError("a bug"))

    assert status == 500
    assert document["code"] == "internal_error" and document["error_id"] in document["error"]
    failures = [event for event in log_events if event.get("log_failure") is not None]
    assert len(failures) == 1 and failures[0]["error_id"] == document["error_id"]
    assert failures[0]["log_failure"].check(ZeroDivisionError)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_refusal_code_has_its_status_and_is_sent(code: ErrorCode) -> None:
    status, document = render(Refusal("refused here", code))

    assert status == HTTP_STATUS[code]
    assert document == {"error": "refused here", "code": code.value}
