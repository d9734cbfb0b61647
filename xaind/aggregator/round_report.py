"""What an aggregation did, for an operator: each update's norm, the outliers, what a rule chose, the privacy spent.

Made on the worker thread after the new model is installed (a streamed pass
over the round's spooled results, `update_norms_of_files`), then logged and
shown in the aggregator's ``/status``. Not on the round's critical path: the
next round starts meanwhile, and the round's files are removed only after.

``/status`` is served to anyone who reaches the aggregator, and a
participant id is what a participant shows to the coordinator: ids are
shortened there (`xaind.recent_problems.shortened`); the log has them whole.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from xaind.aggregator.privacy import PrivacyAccountant
from xaind.aggregator.settings import PrivacySettings
from xaind.aggregator.store import GlobalModel, participant_of
from xaind.aggregator.update_norms import update_norms_of_files
from xaind.logs import get_logger
from xaind.recent_problems import shortened

__all__ = ["OUTLIER_FACTOR", "AggregationObserver", "ParticipantUpdate", "PrivacySpent", "RoundReport", "measure_round"]

log = get_logger("xaind.aggregator.round_report")

#: An update whose norm is more than this many times the round's median is called out in the log.
OUTLIER_FACTOR = 3.0


@dataclass(frozen=True)
class ParticipantUpdate:
    participant_id: str
    samples: int
    #: ``||result - model it started from||`` (of the result itself in a training's first round).
    update_norm: float
    #: ``||result - new model||``.
    distance_to_model: float | None


@dataclass(frozen=True)
class PrivacySpent:
    epsilon: float
    delta: float
    rounds: int
    noise_multiplier: float
    clip_norm: float
    sampling_rate: float

    def status(self) -> dict[str, Any]:
        return {
            "epsilon": _finite_or_none(self.epsilon),
            "delta": self.delta,
            "rounds": self.rounds,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "sampling_rate": self.sampling_rate,
        }


@dataclass(frozen=True)
class RoundReport:
    round: int
    strategy: str
    updates: tuple[ParticipantUpdate, ...]
    #: The participants Krum or multi-Krum chose (None for other rules).
    selected: tuple[str, ...] | None = None
    #: How many updates differential privacy clipped (None without it).
    clipped: int | None = None

    @property
    def median_norm(self) -> float | None:
        norms = [update.update_norm for update in self.updates if math.isfinite(update.update_norm)]
        return statistics.median(norms) if norms else None

    def outliers(self) -> list[ParticipantUpdate]:
        """Updates more than OUTLIER_FACTOR times the median norm, largest first (none with fewer than 3)."""
        median = self.median_norm
        if median is None or len(self.updates) < 3:
            return []
        return sorted(
            (update for update in self.updates if update.update_norm > OUTLIER_FACTOR * median),
            key=lambda update: -update.update_norm,
        )

    def status(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "strategy": self.strategy,
            "results": len(self.updates),
            "median_update_norm": self.median_norm,
            "updates": [
                {
                    "participant": shortened(update.participant_id),
                    "samples": update.samples,
                    "update_norm": _finite_or_none(update.update_norm),
                    "distance_to_model": None if update.distance_to_model is None else _finite_or_none(update.distance_to_model),
                }
                for update in self.updates
            ],
            "outliers": [shortened(update.participant_id) for update in self.outliers()],
            "selected": None if self.selected is None else [shortened(participant) for participant in self.selected],
            "clipped": self.clipped,
        }

    def log(self) -> None:
        median = self.median_norm
        largest = max(self.updates, key=lambda update: update.update_norm, default=None)
        log.info(
            "round {round} ({strategy}): {count} update(s), median norm {median}, largest {largest} from {participant}"
            "{clipped}{selected}",
            round=self.round,
            strategy=self.strategy,
            count=len(self.updates),
            median="-" if median is None else f"{median:.6g}",
            largest="-" if largest is None else f"{largest.update_norm:.6g}",
            participant="-" if largest is None else largest.participant_id,
            clipped="" if self.clipped is None else f"; {self.clipped} clipped",
            selected="" if self.selected is None else f"; chosen: {', '.join(self.selected)}",
        )
        for update in self.outliers():
            log.warn(
                "round {round}: the update of {participant} has norm {norm:.6g}, over {factor:g} times the median {median:.6g}",
                round=self.round, participant=update.participant_id, norm=update.update_norm, factor=OUTLIER_FACTOR, median=median,
            )
        for update in self.updates:
            log.debug(
                "round {round}: {participant} update norm {norm:.6g}, distance to the new model {distance}",
                round=self.round, participant=update.participant_id, norm=update.update_norm,
                distance="-" if update.distance_to_model is None else f"{update.distance_to_model:.6g}",
            )


def measure_round(
    round_number: int,
    strategy: str,
    results: Mapping[str, str],
    started_from: str | None,
    new_model: str | None,
    selected_paths: Sequence[str] | None = None,
    clipped: int | None = None,
) -> RoundReport:
    """The report of an aggregation of `results` (participant id -> result path), from its files (blocking).

    `selected_paths` name results as the backend was given them: a kept
    result's path, or the spool file of an upload folded while it was kept.
    """
    participants = sorted(results)
    paths = [results[participant] for participant in participants]
    norms = update_norms_of_files(paths, started_from, new_model)
    selected = None if selected_paths is None else tuple(participant_of(path) or path for path in selected_paths)
    updates = tuple(
        ParticipantUpdate(participant, norm.samples, norm.norm, norm.distance) for participant, norm in zip(participants, norms)
    )
    return RoundReport(round_number, strategy, updates, selected, clipped)


def _finite_or_none(value: float) -> float | None:
    """JSON has no inf or nan: a non-finite figure is shown as null."""
    return value if math.isfinite(value) else None


class AggregationObserver:
    """Makes each aggregation's report and the privacy spent so far (blocking: on the worker thread)."""

    def __init__(self, strategy: str, update_norms: bool, privacy: PrivacySettings | None) -> None:
        self.strategy = strategy
        self.update_norms = update_norms
        self.privacy = privacy
        self._accountant = (
            None if privacy is None else PrivacyAccountant(privacy.noise_multiplier, privacy.sampling_rate, privacy.delta)
        )

    @property
    def active(self) -> bool:
        return self.update_norms or self.privacy is not None

    def observe(
        self,
        choices: tuple[list[str] | None, int | None],
        round_number: int,
        results: Mapping[str, str],
        started_from: str | None,
        new_model: GlobalModel,
    ) -> tuple[RoundReport | None, PrivacySpent | None]:
        """The round's report from its files and `choices` (`last_choices` of the backend, read on its worker).

        Blocking and CPU-heavy (it reads every result once): the service runs
        it on a disk thread, beside the next round's folds rather than before them.
        """
        report = None
        if self.update_norms:
            selected, clipped = choices
            report = measure_round(round_number, self.strategy, results, started_from, new_model.path, selected, clipped)
        return report, self.privacy_spent(new_model.round)

    def privacy_spent(self, rounds: int) -> PrivacySpent | None:
        """ε after `rounds` aggregations: every model counts as a release (an upper bound if privacy came later)."""
        if self.privacy is None or self._accountant is None:
            return None
        privacy = self.privacy
        return PrivacySpent(
            self._accountant.epsilon(rounds), privacy.delta, rounds, privacy.noise_multiplier, privacy.clip_norm, privacy.sampling_rate
        )
