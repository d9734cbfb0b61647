"""Waiting from a test running on the reactor: bounded, never a bare sleep."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

WAIT = 10.0  # seconds: the default bound


async def wait_until(condition: Callable[[], object], timeout: float = WAIT) -> None:
    """Return once `condition()` holds, checking every few milliseconds; fail after `timeout` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, 0.005)


def within(deferred: Deferred, seconds: float = WAIT) -> Deferred:
    """`deferred`, failed with a TimeoutError if it has not fired after `seconds`."""
    return deferred.addTimeout(seconds, reactor)
