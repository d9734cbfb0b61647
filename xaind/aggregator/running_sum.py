"""The round's running sum: the backend's float64 sum, changed only by the worker, in order.

The reactor thread queues steps (start again from a model, fold a result);
one worker job drains the queue until it is empty, folding consecutive
results in one batch, so results that arrive while the worker is busy are
folded together. Anything else run on the worker after a step was queued
(an aggregation, a removal of the step's file) runs after that step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from xaind.aggregator.backends import AggregationBackend
from xaind.aggregator.threads import SerialWorker
from xaind.logs import get_logger

log = get_logger("xaind.aggregator.running_sum")

T = TypeVar("T")


class FoldMetrics(Protocol):
    """What the running sum reports (xaind.aggregator.metrics.AggregatorMetrics): called on the worker thread."""

    def folded_batch(self, results: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class _Reset:
    """Start again from this global model (or from nothing)."""

    global_model_path: str | None


@dataclass(frozen=True)
class _Fold:
    """Fold a result: a kept file (reader None) or a pending upload through its own reader."""

    name: str
    reader: BinaryIO | None


class RunningSum:
    """Owns the backend's sum, the queue of its changes, their lock and the worker that applies them."""

    def __init__(self, backend: AggregationBackend, worker: SerialWorker, metrics: FoldMetrics | None = None) -> None:
        self.backend = backend
        self.worker = worker
        self.metrics = metrics
        self._steps: list[_Reset | _Fold] = []
        self._lock = threading.Lock()
        self._draining = False

    # -- what the reactor thread queues ----------------------------------------------

    def reset(self, global_model_path: str | None) -> None:
        """Start the sum again from `global_model_path` (None: from nothing)."""
        self._queue(_Reset(global_model_path))

    def fold(self, name: str, reader: BinaryIO | None = None) -> None:
        """Fold the result at `name`, read through `reader` if given (a pending upload's)."""
        self._queue(_Fold(name, reader))

    def then(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run `function` on the worker after every step queued so far."""
        return self.worker.run(function, *args)

    def queued(self) -> int:
        """How many steps wait for the worker (for tests and status)."""
        with self._lock:
            return len(self._steps)

    def _queue(self, step: _Reset | _Fold) -> None:
        with self._lock:
            self._steps.append(step)
            if self._draining:
                return
            self._draining = True
        self.worker.run(self._apply).addCallbacks(self._log_refusals, self._failed)

    # -- in the worker ------------------------------------------------------------------

    def _apply(self) -> list[tuple[str, Exception]]:
        """Apply every queued step, consecutive folds together; what failed.

        A failing step is reported and the next ones still run (the backend
        itself refuses what it can no longer fold correctly).
        """
        failed: list[tuple[str, Exception]] = []
        while True:
            with self._lock:
                steps, self._steps = self._steps, []
                if not steps:
                    self._draining = False
                    return failed
            folds: list[tuple[str, BinaryIO | None]] = []
            for step in steps + [None]:
                if folds and not isinstance(step, _Fold):
                    began = time.perf_counter()
                    try:
                        outcomes: list[Any] = self.backend.add_results(folds)
                    except Exception as error:  # noqa: BLE001 - a backend's bug must not stop the queue
                        outcomes = [error] * len(folds)
                    if self.metrics is not None:
                        self.metrics.folded_batch(len(folds), time.perf_counter() - began)
                    failed.extend((name, outcome) for (name, _), outcome in zip(folds, outcomes) if outcome is not None)
                    folds = []
                if isinstance(step, _Fold):
                    folds.append((step.name, step.reader))
                elif isinstance(step, _Reset):
                    try:
                        self.backend.reset(step.global_model_path)
                    except Exception as error:  # noqa: BLE001 - reported like a refused fold
                        failed.append((step.global_model_path or "the global model", error))

    # -- back on the reactor thread ----------------------------------------------------

    @staticmethod
    def _log_refusals(failed: list[tuple[str, Exception]]) -> None:
        for name, error in failed:
            log.error("folding {path} failed: {error}", path=name, error=error)

    @staticmethod
    def _failed(failure: Failure) -> None:
        log.failure("changing the running sum failed", failure)
