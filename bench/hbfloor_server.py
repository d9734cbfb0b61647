"""The heartbeat floor: a bare twisted.web server answering the coordinator's JSON, nothing else.

Same reactor, same HTTP/1.1 implementation, same JSON answers as the
coordinator's participant API, without any of its work (no state machine,
no timers): what one Twisted process on this machine serves at most with the
benchmark's load generator. Prints `listening PORT` once it listens on
127.0.0.1; stops on SIGTERM/SIGINT.

    python -m bench.hbfloor_server
"""

from __future__ import annotations

import json
import sys
import uuid

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class Answers(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.postpath[:1] == [b"rendez_vous"]:
            return json.dumps({"id": str(uuid.uuid4()), "ok": True}, separators=(",", ":")).encode()
        return json.dumps({"state": "stand_by", "round": None}, separators=(",", ":")).encode()


class QuietSite(Site):
    def log(self, request: Request) -> None:
        pass


def main() -> int:
    site = QuietSite(Answers())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=2048)
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
