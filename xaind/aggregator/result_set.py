"""The round's results held open and read chunk by chunk: what every rule that needs them all at once builds on.

The weighted average folds each result into a running sum as it arrives.
The other rules (coordinate-wise median, trimmed mean, Krum, clipping for
differential privacy) need every result of the round at once. They hold
each checked result by a descriptor of its own and, at aggregation, read
the same range of elements from all of them into one ``rows x chunk``
float64 matrix: memory is that matrix plus the output, never the results
themselves (``O(M + N * chunk)``, not ``O(N * M)``).

A descriptor of its own (a ``dup`` of the reader it was given, or the file
opened by path) keeps a result readable when the service closes its reader
or renames its file (a pending upload becomes a kept result meanwhile).

Results must share their shape, match the global model's (if any), and
share the memory order of the round's first result when they have two or
more dimensions; a refused result changes nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from xaind.aggregator.backends import (
    BackendError,
    _AtomicOutput,
    _check_weights_dtype,
    _one_line,
    _read_exactly,
    _read_npy_header,
    _read_result_header,
    _write_exactly,
    _write_npy_header,
)
from xaind.wire import LocalResultHeader

__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "HeldResult", "HeldResultsBackend", "ModelFile", "ModelWriter", "ResultSet", "read_model_file"]

#: Bytes of the float64 ``rows x chunk`` matrix a pass over every result reads at a time.
DEFAULT_MEMORY_BUDGET_BYTES = 64 << 20


@dataclass(frozen=True)
class HeldResult:
    """One checked result: its name in messages, its own descriptor and its header."""

    what: str
    descriptor: int
    header: LocalResultHeader

    @property
    def samples(self) -> int:
        return self.header.samples


@dataclass(frozen=True)
class ModelFile:
    """The global model a round started from, as `read_model` reads it."""

    path: str
    shape: tuple[int, ...]
    fortran_order: bool
    dtype: np.dtype
    data_offset: int


def read_model_file(path: str) -> ModelFile:
    what = f"global model {path}"
    try:
        with open(path, "rb") as stream:
            shape, fortran_order, dtype = _read_npy_header(stream, what)
            data_offset = stream.tell()
            size = os.fstat(stream.fileno()).st_size
    except OSError as exc:
        raise BackendError(f"{what}: {_one_line(exc)}") from exc
    _check_weights_dtype(dtype, what)
    if size != data_offset + math.prod(shape) * dtype.itemsize:
        raise BackendError(f"{what}: {size} bytes, its .npy header announces {data_offset + math.prod(shape) * dtype.itemsize}")
    return ModelFile(path, shape, fortran_order, dtype, data_offset)


class ResultSet:
    """The round's results, each held open, and the global model it started from."""

    def __init__(self, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> None:
        self._held: list[HeldResult] = []
        self._model: ModelFile | None = None
        self._model_descriptor: int | None = None
        if memory_budget_bytes < 8:
            raise ValueError("memory_budget_bytes must be at least 8")
        self.memory_budget_bytes = memory_budget_bytes

    # -- the round

    def reset(self, global_model_path: str | None) -> None:
        """Let go of every held result; start a round from this global model (or from nothing)."""
        self.close()
        if global_model_path is not None:
            self._model = read_model_file(global_model_path)
            try:
                self._model_descriptor = os.open(global_model_path, os.O_RDONLY)
            except OSError as exc:
                raise BackendError(f"global model {global_model_path}: {_one_line(exc)}") from exc

    def close(self) -> None:
        held, self._held = self._held, []
        model_descriptor, self._model, self._model_descriptor = self._model_descriptor, None, None
        for one in held:
            os.close(one.descriptor)
        if model_descriptor is not None:
            os.close(model_descriptor)

    def __del__(self) -> None:
        # The descriptors are plain ints: a set dropped without `close` (a backend let go of) must not leak them.
        self.close()

    @property
    def model(self) -> ModelFile | None:
        return self._model

    @property
    def results(self) -> list[HeldResult]:
        """The held results, in the order they were added."""
        return list(self._held)

    def __len__(self) -> int:
        return len(self._held)

    @property
    def shape(self) -> tuple[int, ...] | None:
        if self._held:
            return self._held[0].header.shape
        return None if self._model is None else self._model.shape

    @property
    def size(self) -> int:
        shape = self.shape
        return 0 if shape is None else math.prod(shape)

    @property
    def fortran_order(self) -> bool:
        if self._held:
            return self._held[0].header.fortran_order
        return False if self._model is None else self._model.fortran_order

    @property
    def output_dtype(self) -> np.dtype:
        """The global model's dtype, or the widest of the results' in the first one's byte order."""
        if self._model is not None:
            return self._model.dtype
        if not self._held:
            raise BackendError("cannot aggregate: no results were added this round")
        first = self._held[0].header.dtype
        widest = max((held.header.dtype for held in self._held), key=lambda dtype: dtype.itemsize)
        return widest.newbyteorder(first.byteorder) if widest.byteorder != first.byteorder else widest

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        """Check and hold each (path, stream): its refusal, or None once held."""
        return [self._add(path, stream) for path, stream in sources]

    def _add(self, path: str, stream: BinaryIO | None) -> BackendError | None:
        what = f"result {path}"
        try:
            descriptor = os.dup(stream.fileno()) if stream is not None else os.open(path, os.O_RDONLY)
        except OSError as exc:
            return BackendError(f"{what}: {_one_line(exc)}")
        try:
            with open(descriptor, "rb", buffering=0, closefd=False) as view:
                view.seek(0)
                header = _read_result_header(view, what)  # type: ignore[arg-type]
                size = os.fstat(descriptor).st_size
            self._check(header, size, what)
        except (OSError, BackendError) as exc:
            os.close(descriptor)
            return exc if isinstance(exc, BackendError) else BackendError(f"{what}: {_one_line(exc)}")
        self._held.append(HeldResult(what, descriptor, header))
        return None

    def _check(self, header: LocalResultHeader, size: int, what: str) -> None:
        _check_weights_dtype(header.dtype, what)
        if size != header.total_bytes:
            raise BackendError(f"{what}: {size} bytes, its header announces {header.total_bytes}")
        if self._model is not None and header.shape != self._model.shape:
            raise BackendError(f"{what}: shape {header.shape} differs from the global model's {self._model.shape}")
        if self._held:
            first = self._held[0].header
            if header.shape != first.shape:
                raise BackendError(f"{what}: shape {header.shape} differs from this round's {first.shape}")
            if header.fortran_order != first.fortran_order and len(header.shape) >= 2:
                raise BackendError(
                    f"{what}: stored in {'Fortran' if header.fortran_order else 'C'} order, "
                    f"this round's results in the other one (this aggregation strategy needs one order)"
                )

    # -- reading

    def chunk_elements(self, rows: int) -> int:
        """Elements per chunk so that ``rows`` float64 rows of it fit the memory budget."""
        return max(1, self.memory_budget_bytes // (8 * max(1, rows)))

    def chunks(self, rows: int) -> Iterator[tuple[int, int]]:
        """(start, stop) element ranges covering the model, sized for ``rows`` rows."""
        step = self.chunk_elements(rows)
        for start in range(0, self.size, step):
            yield start, min(start + step, self.size)

    def read(self, held: HeldResult, start: int, out: np.ndarray) -> np.ndarray:
        """Elements ``start .. start+len(out)`` of a result (in file order), widened into float64 `out`."""
        dtype = held.header.dtype
        raw = np.empty(len(out) * dtype.itemsize, dtype=np.uint8)
        _read_exactly(held.descriptor, raw, held.header.data_offset + start * dtype.itemsize, held.what)
        out[...] = raw.view(dtype)
        return out

    def read_rows(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``start .. stop`` of every held result, one float64 row each."""
        rows = np.empty((len(self._held), stop - start), dtype=np.float64) if out is None else out
        for row, held in zip(rows, self._held):
            self.read(held, start, row)
        return rows

    def read_model(self, start: int, out: np.ndarray) -> np.ndarray:
        """Elements ``start .. start+len(out)`` of the global model, widened into float64 `out`."""
        if self._model is None or self._model_descriptor is None:
            raise BackendError("this round started from no global model")
        dtype = self._model.dtype
        raw = np.empty(len(out) * dtype.itemsize, dtype=np.uint8)
        _read_exactly(self._model_descriptor, raw, self._model.data_offset + start * dtype.itemsize, f"global model {self._model.path}")
        out[...] = raw.view(dtype)
        return out


class ModelWriter:
    """Writes a model of the round's shape and order chunk by chunk (float64 in, the output dtype out), atomically."""

    def __init__(self, destination_path: str, dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool) -> None:
        self._output = _AtomicOutput(destination_path)
        self.dtype, self.shape, self.fortran_order = dtype, shape, fortran_order

    def __enter__(self) -> ModelWriter:
        stream = self._output.__enter__()
        _write_npy_header(stream, self.dtype, self.shape, self.fortran_order)
        stream.flush()
        self._descriptor, self._data_offset = stream.fileno(), stream.tell()
        return self

    def write(self, start: int, values: np.ndarray) -> None:
        """Elements ``start .. start+len(values)`` (file order), converted to the output dtype."""
        out = np.asarray(values, dtype=np.float64).astype(self.dtype)
        _write_exactly(self._descriptor, out.view(np.uint8), self._data_offset + start * self.dtype.itemsize)

    def __exit__(self, *exc_info: object) -> bool:
        return self._output.__exit__(*exc_info)

    @classmethod
    def for_round(cls, destination_path: str, results: ResultSet) -> ModelWriter:
        shape = results.shape
        if shape is None:
            raise BackendError("cannot aggregate: no results were added this round")
        return cls(destination_path, results.output_dtype, shape, results.fortran_order)


class HeldResultsBackend:
    """The part of a backend that only holds the round's results (in a `ResultSet`); subclasses aggregate them.

    For the rules that read every result at aggregation (robust rules,
    differential privacy): adding a result checks its header and keeps a
    descriptor, nothing more.
    """

    def __init__(self, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> None:
        self._results = ResultSet(memory_budget_bytes)

    def reset(self, global_model_path: str | None) -> None:
        self._results.reset(global_model_path)

    def close(self) -> None:
        """Let go of the held results and the global model (their descriptors); `reset` does too."""
        self._results.close()

    @property
    def results(self) -> int:
        return len(self._results)

    def add_result(self, result_path: str, stream: BinaryIO | None = None) -> None:
        (refusal,) = self.add_results([(result_path, stream)])
        if refusal is not None:
            raise refusal

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        return self._results.add_results(sources)
