"""Waiting for several calls at once, and failing as the first of them that failed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, FirstError, gatherResults
from twisted.python.failure import Failure


def gather(calls: Iterable[Deferred[Any]]) -> Deferred[list[Any]]:
    """Every call's result, in order; or the failure of the first call that failed, as it was.

    `gatherResults` wraps that failure in a `FirstError`, which callers
    that trap specific exceptions (a `Refusal`, a lost link) would miss.
    """

    def unwrapped(failure: Failure) -> Failure:
        if failure.check(FirstError):
            return failure.value.subFailure  # type: ignore[no-any-return]
        return failure

    return gatherResults(list(calls), consumeErrors=True).addErrback(unwrapped)
