"""The coordinator's status page as served: its files, their headers, its methods, and the seed's paths beside it.

The site of `coordinator_site` is spoken to in raw HTTP/1.1 in memory
(`xaind.testing.memory_http`), with a real `CoordinatorService` on a
`Clock` and a fake aggregator. The page's three files are also read as
text: everything they load must come from the coordinator itself (the page
must work with no network), and what the script looks up must exist in the
HTML. tests/test_status_page_browser.py runs the page in a real browser.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from xaind.coordinator.http_api import coordinator_site
from xaind.coordinator.service import CoordinatorService
from xaind.coordinator.settings import AggregatorSettings, FederatedLearningSettings
from xaind.coordinator.status_page_files import ASSET_TYPES, PAGE, MissingPageFile, PageFile, StatusPageFiles
from xaind.testing.fakes import FakeAggregator
from xaind.testing.memory_http import HTTPResponse, MemoryHTTP

FILES = {name: resources.files("xaind.coordinator").joinpath("status_page").joinpath(name).read_bytes() for name in (PAGE, *ASSET_TYPES)}
#: Path -> (file name, media type) of every file the coordinator serves for the page.
SERVED = {
    b"/": ("index.html", b"text/html; charset=utf-8"),
    b"/page/style.css": ("style.css", b"text/css; charset=utf-8"),
    b"/page/app.js": ("app.js", b"text/javascript; charset=utf-8"),
}
#: The seed's participant paths and /status: GET only, as before the page.
SEED_PATHS = (b"/rendez_vous", b"/heartbeat/abc", b"/start_training/abc", b"/status")


@dataclass
class Harness:
    service: CoordinatorService
    aggregator: FakeAggregator
    http: MemoryHTTP

    def request(self, path: bytes, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None) -> HTTPResponse:
        return self.http.request(method, path, headers).response()


@pytest.fixture
def harness() -> Iterator[Harness]:
    aggregator = FakeAggregator()
    service = CoordinatorService(
        FederatedLearningSettings(rounds=3, participants_ratio=1.0, min_clients=1, heartbeat_timeout=15.0, training_timeout=3600.0),
        AggregatorSettings(url="http://aggregator.test:18082", admit_timeout=10.0, aggregation_timeout=600.0),
        aggregator,
        clock=Clock(),
    )
    service.startService()
    site = coordinator_site(service)
    site.reactor = MemoryReactorClock()
    http = MemoryHTTP(site)
    yield Harness(service, aggregator, http)
    http.close()
    service.stopService()


# -- what is served -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(SERVED))
def test_each_file_is_served_with_its_type_and_revalidated(harness: Harness, path: bytes) -> None:
    name, media_type = SERVED[path]
    answer = harness.request(path)
    assert answer.code == 200
    assert answer.body == FILES[name]
    assert answer.header(b"content-type") == [media_type]
    assert answer.header(b"content-length") == [b"%d" % len(FILES[name])]
    assert answer.header(b"cache-control") == [b"no-cache"]
    assert answer.header(b"x-content-type-options") == [b"nosniff"]
    (etag,) = answer.header(b"etag")
    assert re.fullmatch(rb'"[0-9a-f]{32}"', etag)

    # Revalidated with its ETag: 304 without a body; with another, the file again.
    again = harness.request(path, headers={b"if-none-match": etag})
    assert (again.code, again.body) == (304, b"")
    assert again.header(b"etag") == [etag]
    other = harness.request(path, headers={b"if-none-match": b'"0123"'})
    assert (other.code, other.body) == (200, FILES[name])


def test_the_page_may_load_and_fetch_from_its_own_origin_only(harness: Harness) -> None:
    (policy,) = harness.request(b"/").header(b"content-security-policy")
    directives = dict(part.strip().split(b" ", 1) for part in policy.split(b";"))
    assert directives[b"default-src"] == b"'none'"
    for directive in (b"script-src", b"style-src", b"connect-src"):
        assert directives[directive] == b"'self'", directive
    assert directives[b"img-src"] == b"'self' data:"
    assert directives[b"frame-ancestors"] == b"'none'"


@pytest.mark.parametrize("path", list(SERVED))
def test_head_answers_the_headers_of_get_without_a_body(harness: Harness, path: bytes) -> None:
    get = harness.request(path)
    head = harness.request(path, b"HEAD")
    assert (head.code, head.body) == (200, b"")
    for header in (b"content-type", b"content-length", b"cache-control", b"etag"):
        assert head.header(header) == get.header(header), header


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])
@pytest.mark.parametrize("path", list(SERVED))
def test_only_get_and_head_are_answered(harness: Harness, path: bytes, method: bytes) -> None:
    answer = harness.request(path, method)
    assert answer.code == 405
    assert answer.header(b"allow") == [b"GET, HEAD"]
    assert answer.json["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "code", "error"),
    [
        (b"/page/index.html", 404, "no such file: /page/index.html"),
        (b"/page/nope.js", 404, "no such file: /page/nope.js"),
        (b"/page/", 404, "missing file name"),
        (b"/page/app.js/x", 404, "no such resource: /page/app.js/x"),
        (b"/page", 404, "no such resource: /page"),
        (b"/index.html", 404, "no such resource: /index.html"),
        (b"/page/%FF", 400, "file name is not valid UTF-8"),
    ],
)
def test_anything_else_is_a_json_refusal(harness: Harness, path: bytes, code: int, error: str) -> None:
    answer = harness.request(path)
    assert answer.code == code
    assert answer.header(b"content-type") == [b"application/json"]
    assert answer.json == {"error": error, "code": {400: "bad_request", 404: "not_found"}[code]}


# -- the seed's paths, unchanged ------------------------------------------------------------------


@pytest.mark.parametrize("path", SEED_PATHS)
@pytest.mark.parametrize("method", [b"HEAD", b"POST"])
def test_the_seed_paths_still_take_get_only(harness: Harness, path: bytes, method: bytes) -> None:
    answer = harness.request(path, method)
    assert answer.code == 405
    assert answer.header(b"allow") == [b"GET"]


def test_the_seed_paths_answer_as_before_and_status_shows_no_token_or_whole_id(harness: Harness) -> None:
    rendez_vous = harness.request(b"/rendez_vous")
    assert rendez_vous.header(b"content-type") == [b"application/json"]
    participant_id = rendez_vous.json["id"]
    assert rendez_vous.json == {"id": participant_id, "ok": True}
    assert harness.request(b"/heartbeat/" + participant_id.encode()).json == {"state": "round", "round": 0}
    started = harness.request(b"/start_training/" + participant_id.encode()).json
    assert started["ok"] is True and started["url"] == "http://aggregator.test:18082" and started["token"]

    status = harness.request(b"/status")
    assert status.code == 200
    assert status.header(b"cache-control") == [b"no-store"]
    assert status.json["round"] == 0 and status.json["participants"]["selected"] == 1
    # What the page draws is readable by anyone who reaches the API: no token, no whole id.
    assert started["token"].encode() not in status.body
    assert participant_id.encode() not in status.body


# -- the files themselves -------------------------------------------------------------------------


def test_the_files_name_no_other_origin() -> None:
    """Nothing the page loads or fetches can leave the coordinator: no URL with a scheme or a host."""
    for name, body in FILES.items():
        text = body.decode("utf-8")
        assert not re.search(r"\b[a-z][a-z0-9+.-]*://", text, re.IGNORECASE), name
        assert "@import" not in text and "@font-face" not in text, name
        # Protocol-relative references ("//host/...") in attributes, url() or strings.
        assert not re.search(r"""(?:src|href)\s*=\s*["']?//|url\(\s*["']?//|["'`]//[a-z0-9]""", text, re.IGNORECASE), name


def test_the_page_refers_to_its_own_files_only() -> None:
    html = FILES[PAGE].decode("utf-8")
    references = re.findall(r"""\b(?:src|href)\s*=\s*"([^"]*)\"""", html)
    assert references, "the page loads nothing?"
    for reference in references:
        # Relative, so that the page works behind a proxy that serves the API under a prefix.
        assert reference in {"page/style.css", "page/app.js", "status", "data:,"}, reference
    assert {"page/style.css", "page/app.js"} <= set(references)
    assert "<style" not in html and "style=" not in html, "inline styles are refused by the page's own policy"
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline scripts are refused by the page's own policy"


def test_the_script_fetches_only_status_and_finds_every_element_it_draws_in() -> None:
    script = FILES["app.js"].decode("utf-8")
    html = FILES[PAGE].decode("utf-8")
    assert re.findall(r"\bfetch\(\s*([^,)]*)", script) == ['"status"']
    assert "XMLHttpRequest" not in script and "WebSocket" not in script and "EventSource" not in script
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script and "document.write" not in script
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    states = re.search(r"const STATES = \[([^\]]*)\]", script)
    assert states is not None
    wanted = set(re.findall(r'\b(?:byId|setText)\("([^"]+)"', script))
    wanted |= {f"count-{state}" for state in re.findall(r'"(\w+)"', states[1])}
    assert wanted - ids == set()
    assert set(re.findall(r'"(\w+)"', states[1])) == {"waiting", "selected", "done", "done_inactive", "ignored"}


def test_a_missing_file_stops_the_start_instead_of_serving_half_a_page() -> None:
    files = {name: PageFile.of(body, b"text/plain") for name, body in FILES.items() if name != "app.js"}
    with pytest.raises(MissingPageFile, match="app.js"):
        StatusPageFiles(files)
