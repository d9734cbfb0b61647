"""A minimal PB participant of xaind, written from docs/pb-protocol.rst, docs/http-api.rst and docs/wire-format.rst.

Only Twisted, numpy and the standard library: no xaind import, so it shows what
a third party needs to take part. Its "training" is deterministic whole-number
arithmetic, so that the averages the aggregator makes can be checked exactly:
participant K sends arange(20).reshape(SHAPE) + (K + 1) in the first round (the
download is empty then) and floor(global) + (K + 1) afterwards, weighted K + 1
samples: every round's model differs from the last, and every element from the others.

    python examples/pb_participant.py --coordinator tcp:127.0.0.1:5555 --index 0

Exit code 0 once training is finished, 1 on a failure or a reject, 2 when it refuses the
coordinator's protocol; each with one line saying why.
"""

import argparse
import io
import json
import struct
import sys
from urllib.parse import quote

import numpy as np
from twisted.cred.credentials import Anonymous
from twisted.internet import defer, endpoints, protocol, reactor, task
from twisted.spread import pb
from twisted.web.client import Agent, FileBodyProducer, ResponseDone
from twisted.web.http_headers import Headers

PROTOCOL = ["xaind-participant-pb", 1]  # the name and the one version this participant knows
SHAPE = (4, 5)


class Body(protocol.Protocol):
    """Collects a response body (Twisted's readBody warns about Agent's own transport)."""

    def __init__(self, response):
        self.parts, self.done = [], defer.Deferred()
        response.deliverBody(self)

    def dataReceived(self, data):
        self.parts.append(data)

    def connectionLost(self, reason):
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class Participant(pb.Referenceable):
    """The login's mind (it takes the pushes) and the participant's life: version, rendez-vous, heartbeats, rounds."""

    def __init__(self, index, heartbeat_period, record):
        self.index, self.period, self.record = index, heartbeat_period, record
        self.coordinator = self.id = None
        self.training = False  # a push and a heartbeat may both say "round": train once
        self.agent = Agent(reactor)
        self.exit_code = None

    async def run(self, endpoint):
        factory = pb.PBClientFactory()
        await endpoints.clientFromString(reactor, endpoint).connect(factory)
        self.coordinator = await factory.login(Anonymous(), client=self)
        try:
            version = await self.coordinator.callRemote("protocol_version")
        except pb.RemoteError as error:  # the coordinator's "<code>: <message>", raised by await
            # An older coordinator lacks the call ("not_found: ..."): refused, as anything but
            # version 1, which promises the rendez-vous answer before any push about the new id.
            return self.stop(2, f"refused: the coordinator does not tell its protocol ({error})")
        if not isinstance(version, dict) or [version.get("name"), version.get("version")] != PROTOCOL:
            return self.stop(2, f"refused: unknown participant protocol {version!r}, this participant speaks {PROTOCOL}")
        answer = await self.coordinator.callRemote("rendez_vous")
        if not answer["ok"]:
            return self.stop(0, "training is already complete")
        self.id = answer["id"]
        # Heartbeats are required even over PB (pushes do not count); a failed one ends the participant.
        task.LoopingCall(lambda: defer.ensureDeferred(self.heartbeat())).start(self.period).addErrback(self.fail)

    async def heartbeat(self):
        answer = await self.coordinator.callRemote("heartbeat", self.id)
        if answer["state"] == "round":
            self.train(answer["round"])
        elif answer["state"] == "finish":
            self.stop(0, "training finished")
        elif answer["state"] == "reject":
            self.stop(1, f"the coordinator no longer knows id {self.id}")

    def remote_selected(self, round_number):
        if self.id is not None:  # version 1: nothing is pushed about our id before we have it
            self.train(round_number)

    def remote_finished(self):
        self.stop(0, "training finished")

    def train(self, round_number):
        if not self.training and self.exit_code is None:
            self.training = True
            defer.ensureDeferred(self.train_once(round_number)).addErrback(self.fail).addBoth(self.trained)

    def trained(self, _):
        self.training = False
        if self.exit_code is not None:  # finished while the last upload was answered: it is recorded now
            reactor.stop()

    async def train_once(self, round_number):
        answer = await self.coordinator.callRemote("start_training", self.id)
        if not answer["ok"]:
            return  # no longer selected: the next heartbeat says what now
        url = f"{answer['url']}/{quote(self.id, safe='')}/{quote(answer['token'], safe='')}"
        response = await self.agent.request(b"GET", url.encode("ascii"))
        body = await Body(response).done
        if response.code != 200:
            raise RuntimeError(f"download answered {response.code}: {body[:200]!r}")
        downloaded = np.load(io.BytesIO(body), allow_pickle=False) if body else None
        start = np.arange(np.prod(SHAPE)).reshape(SHAPE) if downloaded is None else np.floor(downloaded)
        weights = (start + (self.index + 1)).astype(np.float32)
        stream = io.BytesIO()
        stream.write(struct.pack(">I", self.index + 1))  # the sample count, then the .npy
        np.save(stream, weights, allow_pickle=False)
        stream.seek(0)
        headers = Headers({b"content-type": [b"application/octet-stream"]})
        response = await self.agent.request(b"POST", url.encode("ascii"), headers, FileBodyProducer(stream))
        body = await Body(response).done
        if response.code != 200:
            raise RuntimeError(f"upload answered {response.code}: {body[:200]!r}")
        if self.record:
            line = {"round": round_number, "samples": self.index + 1, "uploaded": weights.tolist(),
                    "downloaded": None if downloaded is None else downloaded.tolist()}
            with open(self.record, "a", encoding="utf-8") as file:
                file.write(json.dumps(line) + "\n")

    def fail(self, failure):
        self.stop(1, f"failed: {failure.getErrorMessage()}")

    def stop(self, code, why):
        if self.exit_code is None:
            self.exit_code = code
            print(f"participant {self.index}: {why}", file=sys.stderr if code else sys.stdout, flush=True)
            if not self.training:  # else trained() stops, once the upload in flight is answered
                reactor.callLater(0, reactor.stop)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", default="tcp:127.0.0.1:5555", help="the coordinator's PB endpoint")
    parser.add_argument("--index", type=int, required=True, help="K: sends K + 1 samples")
    parser.add_argument("--heartbeat-period", type=float, default=1.0, help="seconds, below heartbeat_timeout")
    parser.add_argument("--record", help="append one JSON line per accepted upload")
    arguments = parser.parse_args()
    participant = Participant(arguments.index, arguments.heartbeat_period, arguments.record)
    reactor.callWhenRunning(lambda: defer.ensureDeferred(participant.run(arguments.coordinator)).addErrback(participant.fail))
    reactor.run()
    sys.exit(1 if participant.exit_code is None else participant.exit_code)


if __name__ == "__main__":
    main()
