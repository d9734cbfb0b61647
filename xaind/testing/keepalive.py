"""An honest participant over HTTP keep-alive with the standard library, timing each heartbeat.

Tests and benchmarks that load the coordinator with something else (a
flood, slow connections) watch one such participant train: every answer
other than 200 is a `ParticipantRefused`, its weights are `elements` float32
of the round number plus one, with 10 samples.
"""

from __future__ import annotations

import http.client
import json
import time
from typing import Any

import numpy as np

from xaind.testing.wire import encode_local_result


class ParticipantRefused(AssertionError):
    """The coordinator or the aggregator answered something else than 200 (and ok)."""


class KeepAliveParticipant:
    def __init__(self, port: int, elements: int = 8, host: str = "127.0.0.1") -> None:
        self.connection = http.client.HTTPConnection(host, port, timeout=10)
        self.elements = elements
        self.id = ""
        #: Seconds each heartbeat took, request to whole answer.
        self.latencies: list[float] = []

    def get(self, path: str) -> tuple[int, Any]:
        self.connection.request("GET", path)
        answer = self.connection.getresponse()
        return answer.status, json.loads(answer.read())

    def rendez_vous(self) -> None:
        status, document = self.get("/rendez_vous")
        if status != 200 or not document["ok"]:
            raise ParticipantRefused(f"rendez-vous answered {status}: {document}")
        self.id = document["id"]

    def heartbeat(self) -> dict[str, Any]:
        started = time.monotonic()
        status, document = self.get(f"/heartbeat/{self.id}")
        self.latencies.append(time.monotonic() - started)
        if status != 200:
            raise ParticipantRefused(f"heartbeat answered {status}: {document}")
        return document

    def train(self, round_number: int) -> None:
        status, answer = self.get(f"/start_training/{self.id}")
        if status != 200 or not answer["ok"]:
            raise ParticipantRefused(f"start_training answered {status}: {answer}")
        host, port = answer["url"].removeprefix("http://").split(":")
        upload = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            body = encode_local_result(10, np.full(self.elements, float(round_number + 1), dtype=np.float32))
            upload.request("POST", f"/{self.id}/{answer['token']}", body=body, headers={"content-type": "application/octet-stream"})
            response = upload.getresponse()
            if response.status != 200:
                raise ParticipantRefused(f"upload answered {response.status}: {response.read()[:200]!r}")
        finally:
            upload.close()

    def close(self) -> None:
        self.connection.close()
