"""Downloads over TLS: `FileRangeProducer` falls back from sendfile to reads, every byte intact.

A twisted.web site on the real reactor serves a file through the producer,
on an `ssl:` listener (certificate from a throwaway `trustme` CA) and, for
comparison, on plain TCP; the client is the SDK's verifying HttpClient.
sendfile is counted, not replaced: over TCP it must be used, over TLS never.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from twisted.internet import endpoints, reactor
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from xaind.aggregator import download
from xaind.aggregator.download import FileRangeProducer
from xaind.sdk.http import HttpClient
from xaind.sdk.tls import load_trust_root

SIZE = 6 * 2**20 + 12345


class FileResource(Resource):
    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def render_GET(self, request: Request) -> Any:
        size = self.path.stat().st_size
        first, last = int(request.args.get(b"from", [b"0"])[0]), size - 1
        request.setHeader(b"content-length", str(last - first + 1).encode())
        FileRangeProducer(request, open(self.path, "rb"), first, last - first + 1, 256 * 1024).start()
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("transport", ["tcp", "ssl"])
async def test_download_is_whole_over_tls_without_sendfile(tmp_path: Path, transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    content = os.urandom(SIZE)
    model = tmp_path / "model.npy"
    model.write_bytes(content)
    sendfile_calls: list[int] = []
    real_sendfile = os.sendfile

    def counted_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        sendfile_calls.append(count)
        return real_sendfile(out_fd, in_fd, offset, count)

    monkeypatch.setattr(download.os, "sendfile", counted_sendfile)

    authority = trustme.CA()
    issued = authority.issue_cert("localhost")
    ca, certificate, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    authority.cert_pem.write_to_path(str(ca))
    issued.cert_chain_pems[0].write_to_path(str(certificate))
    issued.private_key_pem.write_to_path(str(key))
    if transport == "ssl":
        description = f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={certificate}"
        scheme = "https"
    else:
        description = "tcp:0:interface=127.0.0.1"
        scheme = "http"
    site = Site(FileResource(model))
    site.noisy = False
    port = await endpoints.serverFromString(reactor, description).listen(site)
    http = HttpClient(reactor, trust_root=load_trust_root(str(ca)))
    try:
        url = f"{scheme}://localhost:{port.getHost().port}/model"
        whole = await http.download(url)
        assert whole.size == SIZE and whole.data == content
        tail = await http.download(f"{url}?from=1000")
        assert tail.size == SIZE - 1000 and tail.data == content[1000:]
    finally:
        await http.close()
        await port.stopListening()
    if transport == "ssl":
        assert sendfile_calls == []
    else:
        assert sendfile_calls, "plain TCP should use sendfile (else this test proves nothing over TLS)"
