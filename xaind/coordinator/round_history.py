"""The recent rounds as an operator looks at them: how long each took, how many it counted, how it ended.

Fed by the service with the round machine's effects (a round begins at its
first selection, ends aggregated or repeated) and read by ``/status`` (the
status page draws its chart from it). Bounded: the last `KEPT_ROUNDS`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

__all__ = ["FinishedRound", "RoundHistory"]

KEPT_ROUNDS = 200


@dataclass(frozen=True)
class FinishedRound:
    round: int
    #: From the round's first selection to the end of its aggregation (or to its failure).
    duration_s: float
    #: Results counted (the participants asked to be aggregated).
    participants: int
    outcome: str  # "aggregated" or "repeated"
    ended_at: float  # the clock's seconds (the reactor's: seconds since the epoch)

    def status(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "duration_s": round(self.duration_s, 3),
            "participants": self.participants,
            "outcome": self.outcome,
            "ended_at": self.ended_at,
        }


class RoundHistory:
    def __init__(self, clock: IReactorTime, kept: int = KEPT_ROUNDS) -> None:
        self.clock = clock
        self.rounds: deque[FinishedRound] = deque(maxlen=kept)
        self.last_aggregation_at: float | None = None
        self._began: float | None = None
        self._counted = 0

    def selected(self) -> None:
        """Participants were selected: the round began, unless it already had."""
        if self._began is None:
            self._began = self.clock.seconds()

    def aggregation_requested(self, counted: int) -> None:
        self._counted = counted

    def ended(self, round_number: int, aggregated: bool) -> FinishedRound:
        now = self.clock.seconds()
        began = self._began if self._began is not None else now
        finished = FinishedRound(round_number, now - began, self._counted, "aggregated" if aggregated else "repeated", now)
        self.rounds.append(finished)
        if aggregated:
            self.last_aggregation_at = now
        self._began, self._counted = None, 0
        return finished

    def finished(self) -> list[dict[str, Any]]:
        """The kept rounds, oldest first, as ``/status`` shows them."""
        return [finished.status() for finished in self.rounds]

    def seconds_since_last_aggregation(self) -> float | None:
        if self.last_aggregation_at is None:
            return None
        return round(self.clock.seconds() - self.last_aggregation_at, 3)
