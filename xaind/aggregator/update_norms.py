"""Each participant's update norm, and its distance to the new model, measured in one streamed pass.

An operator looking for an outlier (a poisoned or broken participant)
needs to see, per round, how far each result moved from the model the
round started from, and how far it lies from the model the round produced.
Differential privacy needs the first of these too: the clipping factor of
each update is ``clip_norm / ||x_i - g||``.

Both are L2 norms over the whole model. They are accumulated chunk by
chunk from the `ResultSet` (every result's same element range at once, in
float64), so memory is the chunk matrix whatever the model's size, and
every result is read once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from xaind.aggregator.backends import BackendError, _one_line, _read_exactly
from xaind.aggregator.result_set import DEFAULT_MEMORY_BUDGET_BYTES, HeldResult, ModelFile, ResultSet, read_model_file

__all__ = ["UpdateNorm", "update_norms", "update_norms_of_files"]


@dataclass(frozen=True)
class UpdateNorm:
    """One result's update norm, and its distance to the round's new model (None when not asked for).

    `norm` is ``||x - g||_2`` with ``g`` the global model the round started
    from, or ``||x||_2`` in the first round (no model yet). Either is
    ``inf`` or ``nan`` when the result holds non-finite weights.
    """

    what: str
    samples: int
    norm: float
    distance: float | None


def update_norms(
    results: ResultSet, average_path: str | None = None, only: Sequence[HeldResult] | None = None
) -> list[UpdateNorm]:
    """The update norm of every held result (in the order held), and its distance to the model at `average_path`.

    With `only`, of those held results alone (the ones just added, measured
    while the round goes on).

    One pass over the results: each chunk reads every result's same
    elements, the global model's and the new model's, into float64 rows
    (``len(results) + 3`` rows, with a scratch row, within the set's memory
    budget) and adds their squared differences to float64 per-result totals.

    Raises `BackendError` when the new model cannot be read, differs in
    shape from the results, or when a model is stored in the other memory
    order than the results (its elements would not line up).
    """
    held = results.results if only is None else list(only)
    if not held:
        return []
    average = _checked_model(read_model_file(average_path), results, "new model") if average_path is not None else None
    if results.model is not None:
        _checked_model(results.model, results, "global model")
    squared = np.zeros(len(held), dtype=np.float64)
    distances = np.zeros(len(held), dtype=np.float64) if average is not None else None
    rows_needed = len(held) + 3  # the results, the global model, the new model, one scratch row
    columns = min(results.chunk_elements(rows_needed), results.size)
    rows = np.empty((len(held), columns), dtype=np.float64)
    model = np.empty(columns, dtype=np.float64) if results.model is not None else None
    target = np.empty(columns, dtype=np.float64) if average is not None else None
    scratch = np.empty(columns, dtype=np.float64)
    descriptor = _open(average) if average is not None else None
    try:
        for start, stop in results.chunks(rows_needed):
            count = stop - start
            chunk = rows[:, :count]
            for row, result in zip(chunk, held):
                results.read(result, start, row)
            if model is not None:
                results.read_model(start, model[:count])
            if average is not None and target is not None and descriptor is not None:
                _read_model_range(descriptor, average, start, target[:count])
            difference = scratch[:count]
            for index, row in enumerate(chunk):
                if model is not None:
                    np.subtract(row, model[:count], out=difference)
                    squared[index] += float(np.dot(difference, difference))
                else:
                    squared[index] += float(np.dot(row, row))
                if distances is not None and target is not None:
                    np.subtract(row, target[:count], out=difference)
                    distances[index] += float(np.dot(difference, difference))
    finally:
        if descriptor is not None:
            os.close(descriptor)
    return [
        UpdateNorm(
            result.what,
            result.samples,
            math.sqrt(float(squared[index])),
            None if distances is None else math.sqrt(float(distances[index])),
        )
        for index, result in enumerate(held)
    ]


def update_norms_of_files(
    result_paths: list[str],
    global_model_path: str | None,
    average_path: str | None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
) -> list[UpdateNorm]:
    """`update_norms` of these result files against this global model, after an aggregation of any rule.

    The weighted average folds results as they arrive and keeps none open:
    this reads them again from their spool files once the new model is
    written. A result refused here (unreadable, of another shape) raises
    its `BackendError`: the aggregation that just took it would have
    refused it too.
    """
    results = ResultSet(memory_budget_bytes)
    try:
        results.reset(global_model_path)
        for refusal in results.add_results([(path, None) for path in result_paths]):
            if refusal is not None:
                raise refusal
        return update_norms(results, average_path)
    finally:
        results.close()


def _checked_model(model: ModelFile, results: ResultSet, role: str) -> ModelFile:
    if model.shape != results.shape:
        raise BackendError(f"{role} {model.path}: shape {model.shape} differs from this round's results' {results.shape}")
    if len(model.shape) >= 2 and model.fortran_order != results.fortran_order:
        raise BackendError(
            f"{role} {model.path}: stored in {'Fortran' if model.fortran_order else 'C'} order, "
            f"this round's results in the other one (their elements do not line up)"
        )
    return model


def _open(model: ModelFile) -> int:
    try:
        return os.open(model.path, os.O_RDONLY)
    except OSError as exc:
        raise BackendError(f"new model {model.path}: {_one_line(exc)}") from exc


def _read_model_range(descriptor: int, model: ModelFile, start: int, out: np.ndarray) -> None:
    raw = np.empty(len(out) * model.dtype.itemsize, dtype=np.uint8)
    _read_exactly(descriptor, raw, model.data_offset + start * model.dtype.itemsize, f"new model {model.path}")
    out[...] = raw.view(model.dtype)
