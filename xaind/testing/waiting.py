"""Waiting from a test that runs on the reactor: bounded, never a bare sleep."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

T = TypeVar("T")

#: Seconds: the default bound on every wait.
WAIT = 10.0
#: Seconds between two checks of a condition.
CHECK_INTERVAL = 0.005


def _reactor():  # type: ignore[no-untyped-def]
    # Imported when first used, not at import time, so that importing this
    # module does not install the default reactor before a test picks one.
    from twisted.internet import reactor

    return reactor


async def wait_until(condition: Callable[[], T], timeout: float = WAIT, what: str = "the condition") -> T:
    """`condition()` once it is truthy, checked every few milliseconds; fail after `timeout` seconds, naming `what`.

    The condition runs on the reactor thread: it must be quick.
    """
    reactor = _reactor()
    deadline = reactor.seconds() + timeout
    while True:
        result = condition()
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, CHECK_INTERVAL)


def within(deferred: Deferred[T], seconds: float = WAIT) -> Deferred[T]:
    """`deferred`, failed with a TimeoutError if it has not fired after `seconds`."""
    return deferred.addTimeout(seconds, _reactor())
