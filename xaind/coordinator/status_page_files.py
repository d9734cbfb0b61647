"""The coordinator's status page: its three files, read from the package once, and their HTTP answers.

The page (`/`) and its assets (`/page/<name>`) are static: the script polls
`/status` for everything that changes. They are read when the API is built,
at start-up, so no request ever waits on the disk; an installation missing
one of them fails to start instead of serving half a page.

Every answer is revalidated (`no-cache` with a strong ETag, 304 when it
matches): the files are tiny, and a page upgraded with the package must not
run a stale script. The Content-Security-Policy lets the page load and fetch
from its own origin only, which also keeps it working with no network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources

from twisted.web.http import CACHED
from twisted.web.server import Request

__all__ = ["ASSET_TYPES", "PAGE", "MissingPageFile", "PageFile", "StatusPageFiles", "file_body"]

#: The page itself, answered at `/`.
PAGE = "index.html"
#: The files under `/page/`, by name, with their content types.
ASSET_TYPES: Mapping[str, bytes] = {
    "style.css": b"text/css; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
}
PAGE_TYPE = b"text/html; charset=utf-8"
#: Where in the package the files are.
PACKAGE = "xaind.coordinator"
DIRECTORY = "status_page"

#: Own origin only: no CDN, no font, no beacon can be loaded, and no other site may frame the page.
CONTENT_SECURITY_POLICY = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    b"base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class MissingPageFile(FileNotFoundError):
    """A file of the status page is not in the installed package."""


@dataclass(frozen=True)
class PageFile:
    body: bytes
    content_type: bytes
    #: A strong validator of `body`, computed once.
    etag: bytes

    @classmethod
    def of(cls, body: bytes, content_type: bytes) -> PageFile:
        return cls(body, content_type, b'"' + hashlib.sha256(body).hexdigest()[:32].encode("ascii") + b'"')


class StatusPageFiles:
    """The page and its assets, held in memory."""

    def __init__(self, files: Mapping[str, PageFile]) -> None:
        missing = {PAGE, *ASSET_TYPES} - set(files)
        if missing:
            raise MissingPageFile(f"the status page lacks {', '.join(sorted(missing))}")
        self.files = dict(files)

    @classmethod
    def from_package(cls) -> StatusPageFiles:
        """Read the files shipped in xaind/coordinator/status_page/ (blocking: call at start-up)."""
        folder = resources.files(PACKAGE).joinpath(DIRECTORY)
        files = {}
        for name, content_type in {PAGE: PAGE_TYPE, **ASSET_TYPES}.items():
            try:
                files[name] = PageFile.of(folder.joinpath(name).read_bytes(), content_type)
            except FileNotFoundError:
                raise MissingPageFile(f"the status page's {name} is not installed in {PACKAGE}/{DIRECTORY}") from None
        return cls(files)

    @property
    def page(self) -> PageFile:
        return self.files[PAGE]

    def asset(self, name: str) -> PageFile | None:
        """The asset called `name` (the page itself is not one), or None."""
        return self.files.get(name) if name in ASSET_TYPES else None


def file_body(request: Request, page_file: PageFile) -> bytes:
    """Answer a GET or HEAD with `page_file`: headers set, the body returned (empty for HEAD and 304)."""
    request.setHeader(b"content-type", page_file.content_type)
    request.setHeader(b"cache-control", b"no-cache")
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    if page_file.content_type == PAGE_TYPE:
        request.setHeader(b"content-security-policy", CONTENT_SECURITY_POLICY)
    if request.setETag(page_file.etag) is CACHED:
        return b""
    request.setResponseCode(200)
    if request.method == b"HEAD":
        # twisted.web would log a line for a HEAD answered with a body; its length is all it needs.
        request.setHeader(b"content-length", b"%d" % len(page_file.body))
        return b""
    return page_file.body
