"""Thread pools that keep blocking work off the reactor thread.

The worker (one thread) runs what must happen in order: folding, resets
of the running sum, aggregating, installing a model. Disk threads run what
needs no order among itself: making uploads durable, removing old files,
rewriting the state file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from xaind.priority import run_in_background

T = TypeVar("T")


class WorkerThreads:
    """Threads that run blocking steps off the reactor thread."""

    def __init__(self, reactor: Any, name: str, threads: int) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, function, *args)


class SerialWorker(WorkerThreads):
    """One thread that runs blocking steps one at a time, in the order they were queued.

    It folds and aggregates: CPU-heavy work, run at a lower CPU priority
    (xaind.priority) so that the daemons' reactors stay responsive.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        super().__init__(reactor, name, 1)

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return super().run(_in_background, function, *args)


def _in_background(function: Callable[..., T], *args: Any) -> T:
    run_in_background()
    return function(*args)


class DiskThreads(WorkerThreads):
    """A few threads for steps that wait on the disk and need no order among themselves."""

    def __init__(self, reactor: Any, name: str, threads: int = 4) -> None:
        super().__init__(reactor, name, threads)
