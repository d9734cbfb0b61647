"""The round counter written before the round moves on, and held while the write fails.

A round that started before its counter was durable would run again after
a restart, and a write that failed half-way through the service's effects
used to leave the next round's selection undone. `RoundCounterWriter`
makes the move wait for the write (docs/rounds.rst, Persistence).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from xaind.logs import get_logger
from xaind.state import RoundProgress, RoundStore

# The coordinator service's namespace: to an operator these are the service's lines.
log = get_logger("xaind.coordinator.service")

#: Seconds before the first retry of a round counter that could not be written.
RECORD_RETRY_FIRST = 1.0
#: The retry delay doubles after each failed attempt, up to this many seconds.
RECORD_RETRY_MAX = 30.0


@dataclass
class UnwrittenRoundCounter:
    """A round counter that could not be written yet, and the move of the round that waits for it."""

    progress: RoundProgress
    advance: Callable[[], None]
    since: float
    error: str
    attempts: int
    retry: IDelayedCall


def describe_os_error(error: OSError) -> str:
    return error.strerror or str(error)


class RoundCounterWriter:
    """Writes the round counter before the round moves on; holds the move while the write fails.

    A round that started before its counter was durable would run again
    after a restart, and a write failing half-way through the service's
    effects left the next round's selection undone. So the move waits:
    the coordinator keeps serving in the phase it was in, the write is
    retried on the clock (the delay doubling from `RECORD_RETRY_FIRST` up to
    `RECORD_RETRY_MAX`), logged once when it starts failing and once when it
    succeeds, and the move is carried out exactly once, after the write.
    """

    def __init__(self, store: RoundStore | None, clock: IReactorTime) -> None:
        self.store = store
        self.clock = clock
        self.unwritten: UnwrittenRoundCounter | None = None

    @property
    def holding(self) -> bool:
        return self.unwritten is not None

    def write_then(self, progress: RoundProgress, advance: Callable[[], None]) -> None:
        """Write `progress`, then call `advance`; if the write fails, hold both and retry.

        Ignored while a counter is held: the round moves only through the
        held move, so no later counter can be due before it is written.
        """
        if self.store is None:
            advance()
            return
        if self.unwritten is not None:
            return
        try:
            self.store.save(progress)
        except OSError as error:
            self.unwritten = UnwrittenRoundCounter(
                progress=progress,
                advance=advance,
                since=self.clock.seconds(),
                error=describe_os_error(error),
                attempts=1,
                retry=self.clock.callLater(RECORD_RETRY_FIRST, self._retry),
            )
            log.warn(
                "cannot write the round counter to {path} ({error}): round {round} waits until it is written; "
                "retrying every {maximum} s at most",
                path=self.store.path,
                error=self.unwritten.error,
                round=progress.round,
                maximum=RECORD_RETRY_MAX,
            )
            return
        advance()

    def _retry(self) -> None:
        unwritten = self.unwritten
        if unwritten is None or self.store is None:
            return
        try:
            self.store.save(unwritten.progress)
        except OSError as error:
            unwritten.error = describe_os_error(error)
            delay = min(RECORD_RETRY_FIRST * 2 ** min(unwritten.attempts, 32), RECORD_RETRY_MAX)
            unwritten.attempts += 1
            unwritten.retry = self.clock.callLater(delay, self._retry)
            return
        self.unwritten = None
        log.info(
            "round counter {round} written to {path} after {attempts} attempts in {seconds} s: training goes on",
            round=unwritten.progress.round,
            path=self.store.path,
            attempts=unwritten.attempts + 1,
            seconds=round(self.clock.seconds() - unwritten.since, 3),
        )
        unwritten.advance()

    def stop(self) -> None:
        """Drop the held move (the service stops; a restart reads the counter still on disk)."""
        unwritten, self.unwritten = self.unwritten, None
        if unwritten is not None and unwritten.retry.active():
            unwritten.retry.cancel()

    def report(self) -> dict[str, Any] | None:
        """The `/status` field `state_write_failure`: None unless a counter is held."""
        unwritten = self.unwritten
        if unwritten is None or self.store is None:
            return None
        return {
            "file": self.store.path,
            "error": unwritten.error,
            "since": unwritten.since,
            "attempts": unwritten.attempts,
            "retry_in_s": round(max(0.0, unwritten.retry.getTime() - self.clock.seconds()), 3),
            "round": unwritten.progress.round,
        }

    def waiting_reason(self) -> str | None:
        unwritten = self.unwritten
        if unwritten is None or self.store is None:
            return None
        return f"waiting until the round counter ({unwritten.progress.round}) can be written to {self.store.path} ({unwritten.error})"
