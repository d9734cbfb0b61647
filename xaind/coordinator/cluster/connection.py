"""redis-py's blocking client, called on a small thread pool of its own, never on the reactor thread.

Debian ships redis-py (python3-redis) and no Twisted Redis client; its
blocking client is well kept, and a few threads are enough for what the
coordinators send: batched pipelines, a Lua script per transition, and
a few long polls (the leader's inbox, a process's replies, the events).
The pool starts and stops with the cluster service.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from xaind.coordinator.cluster.settings import RedisStateSettings
from xaind.logs import get_logger

log = get_logger("xaind.coordinator.cluster")

T = TypeVar("T")

#: Threads for Redis calls: three long polls at most, and the rest for commands.
THREADS = 8
#: Seconds a long poll (BLPOP, a pub/sub read) blocks on the server before it returns empty.
POLL_SECONDS = 0.5


def connect(settings: RedisStateSettings) -> Any:
    """A redis-py client of `settings.url`, answers decoded to text.

    Its socket timeout is above a long poll's block, and at most the lease:
    a call that hangs longer than a lease cannot be waited for anyway.
    """
    import redis

    timeout = max(POLL_SECONDS * 4, settings.lease_seconds)
    return redis.Redis.from_url(
        settings.url,
        password=settings.password,
        decode_responses=True,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


class RedisConnection:
    """A client and the threads it is called on."""

    def __init__(self, settings: RedisStateSettings, reactor: Any, client: Any = None) -> None:
        self.settings = settings
        self.reactor = reactor
        self.client = client if client is not None else connect(settings)
        self._pool = ThreadPool(minthreads=1, maxthreads=THREADS, name="xaind-redis")
        self.running = False

    def start(self) -> None:
        self._pool.start()
        self.running = True

    def stop(self) -> None:
        self.running = False
        self._pool.stop()
        self.client.close()

    def run(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        """`function(*args, **kwargs)` on a Redis thread; its result or exception in the Deferred."""
        return deferToThreadPool(self.reactor, self._pool, function, *args, **kwargs)

    def call(self, command: str, *args: Any) -> Deferred[Any]:
        """One Redis command by its redis-py method name, e.g. `call("hgetall", key)`."""
        return self.run(getattr(self.client, command), *args)


class PollLoop(Generic[T]):
    """Calls a blocking long poll on a Redis thread again and again, handing each result to the reactor.

    The poll returns within `POLL_SECONDS` when there is nothing, so the
    loop notices `stop` soon. A failing poll (Redis restarting) is said once
    per failure streak and tried again after a pause.
    """

    #: Seconds before a failed poll is tried again.
    RETRY_SECONDS = 0.5

    def __init__(self, connection: RedisConnection, what: str, poll: Callable[[], T], handle: Callable[[T], None]) -> None:
        self.connection = connection
        self.what = what
        self.poll = poll
        self.handle = handle
        self.running = False
        self._failing = False
        self._pause: Any = None

    def start(self) -> None:
        self.running = True
        self._next()

    def stop(self) -> None:
        self.running = False
        if self._pause is not None and self._pause.active():
            self._pause.cancel()
        self._pause = None

    def _next(self) -> None:
        self._pause = None
        if not self.running or not self.connection.running:
            return
        self.connection.run(self.poll).addCallbacks(self._polled, self._failed)

    def _polled(self, result: T) -> None:
        if not self.running:
            return
        if self._failing:
            self._failing = False
            log.info("{what}: Redis answers again", what=self.what)
        try:
            self.handle(result)
        finally:
            self._next()

    def _failed(self, failure: Any) -> None:
        if not self.running:
            return
        if not self._failing:
            self._failing = True
            log.warn("{what}: Redis did not answer ({error}); trying again", what=self.what, error=failure.getErrorMessage())
        self._pause = self.connection.reactor.callLater(self.RETRY_SECONDS, self._next)
