"""What followers hand the leader, and the leader's answers, through Redis lists.

Followers push messages onto `<prefix>inbox` (one list, so a participant's
rendez-vous comes before its start of training); the leader pops them in
order. A message that needs an answer names the asking process and a
request number; the leader pushes the answer onto that process's own
replies list, which one long poll per process reads and hands to the
waiting request. A request not answered in time is answered as refused.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from xaind.coordinator.cluster.connection import POLL_SECONDS, PollLoop, RedisConnection
from xaind.coordinator.cluster.keys import Keys
from xaind.logs import get_logger

log = get_logger("xaind.coordinator.cluster")

#: Messages the leader takes from the inbox at once.
INBOX_BATCH = 500
#: Seconds an answer waits in a replies list for its process (gone: the list expires).
REPLIES_EXPIRE_SECONDS = 60


def _blocking_pop_batch(connection: RedisConnection, key: str) -> list[str]:
    """Block until `key` has an item (at most POLL_SECONDS), then take up to INBOX_BATCH of them."""
    first = connection.client.blpop([key], timeout=POLL_SECONDS)
    if first is None:
        return []
    more = connection.client.lpop(key, INBOX_BATCH - 1) or []
    return [first[1], *more]


class Inbox:
    """The leader's side: pops the followers' messages and hands them, decoded, to `handle`."""

    def __init__(self, connection: RedisConnection, keys: Keys, handle: Callable[[dict[str, Any]], None]) -> None:
        self.connection = connection
        self.keys = keys
        self.handle = handle
        self.loop = PollLoop(connection, "the leader's inbox", lambda: _blocking_pop_batch(connection, keys.inbox), self._received)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    def _received(self, messages: list[str]) -> None:
        for text in messages:
            try:
                message = json.loads(text)
            except ValueError:
                log.warn("dropped an unreadable message of the leader's inbox")
                continue
            self.handle(message)

    def reply(self, message: dict[str, Any], answer: dict[str, Any]) -> Deferred[Any]:
        """Answer a forwarded request on its process's replies list."""
        key = self.keys.replies(message["process"])
        document = json.dumps({"request": message["request"], **answer}, separators=(",", ":"))

        def send() -> None:
            pipeline = self.connection.client.pipeline(transaction=False)
            pipeline.rpush(key, document)
            pipeline.expire(key, REPLIES_EXPIRE_SECONDS)
            pipeline.execute()

        return self.connection.run(send).addErrback(lambda failure: log.warn("could not answer a forwarded request: {error}", error=failure.getErrorMessage()))


class Forwarder:
    """A process's side: sends messages to the leader and waits, bounded, for the answers it asked for."""

    def __init__(self, connection: RedisConnection, keys: Keys, process_id: str) -> None:
        self.connection = connection
        self.keys = keys
        self.process_id = process_id
        self._numbers = itertools.count(1)
        self._waiting: dict[int, Deferred[dict[str, Any]]] = {}
        replies = keys.replies(process_id)
        self.loop = PollLoop(connection, "the replies of the leader", lambda: _blocking_pop_batch(connection, replies), self._received)

    def start(self) -> None:
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()
        waiting, self._waiting = self._waiting, {}
        for request in waiting.values():
            request.cancel()

    def send(self, message: dict[str, Any], deadline: tuple[str, float] | None = None) -> Deferred[Any]:
        """Push `message` onto the inbox; with `deadline`, write that heartbeat deadline in the same transaction."""
        document = json.dumps(message, separators=(",", ":"))

        def push() -> None:
            pipeline = self.connection.client.pipeline(transaction=True)
            if deadline is not None:
                pipeline.zadd(self.keys.deadlines, {deadline[0]: deadline[1]})
            pipeline.rpush(self.keys.inbox, document)
            pipeline.execute()

        return self.connection.run(push)

    def request(self, message: dict[str, Any], timeout: float) -> Deferred[dict[str, Any]]:
        """Send `message` and wait at most `timeout` seconds for the leader's answer (TimeoutError after).

        The message carries `answer_by`, the wall-clock time after which no
        one waits for the answer: a leader that gets it later (it took over
        meanwhile, or was slow) must not act on it as if it were heard.
        """
        number = next(self._numbers)
        answer: Deferred[dict[str, Any]] = Deferred(lambda _: self._waiting.pop(number, None))
        self._waiting[number] = answer
        answer.addTimeout(timeout, self.connection.reactor)

        def not_sent(failure: Any) -> None:
            waiting = self._waiting.pop(number, None)
            if waiting is not None:
                waiting.errback(failure)

        answer_by = self.connection.reactor.seconds() + timeout
        self.send({**message, "process": self.process_id, "request": number, "answer_by": answer_by}).addErrback(not_sent)
        return answer.addErrback(self._forget, number)

    def _forget(self, failure: Any, number: int) -> Any:
        self._waiting.pop(number, None)
        return failure

    def _received(self, replies: list[str]) -> None:
        for text in replies:
            try:
                reply = json.loads(text)
            except ValueError:
                continue
            waiting = self._waiting.pop(int(reply.get("request", 0)), None)
            if waiting is not None:
                waiting.callback(reply)
