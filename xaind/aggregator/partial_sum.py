"""A shard's partial sum, and the reduce that turns every shard's into the round's global model.

With sharded aggregation each shard (an aggregator process) folds its own
participants into its `WeightedAverageBackend` exactly as a lone aggregator
does. At the round's end each shard hands its running sum over as a
*partial sum file*, and the reduce adds them up and divides, streaming.

The partial sum file (one file: one atomic write, one transfer)::

    b"XAINPSUM"                 8 bytes, the magic string
    length                      4 bytes, big-endian: the JSON header's length
    JSON header (UTF-8)         {"version": 1, "round": int|null, "results": int,
                                 "samples": int, "shape": [int, ...]|null,
                                 "dtype": "<f4"|null, "fortran_order": bool}
    .npy stream                 the float64 running sum, in the memory order the
                                shard keeps it (``fortran_order`` in its header);
                                absent when the shard has no result

``results`` and ``samples`` are the shard's counts (0-sample results
included in ``results``), ``dtype`` the shard's output dtype (the global
model's, or the widest of its results in its first result's byte order)
and ``fortran_order`` its first result's. The sum is ``sum(n_i * x_i)``
over the shard's results with samples, or the plain sum while all of its
results have 0 samples (the backend's rule: a 0-sample result weighs
nothing once any result has samples).

The reduce combines partial sums in a fixed order, the shards' order, so
that it equals one aggregator that received the shards' results one shard
after the other:

- when some shard has samples, the sums of the shards with samples are
  added and divided by the total sample count; the sums of shards whose
  results all have 0 samples are left out (their results weigh nothing,
  as they would in one aggregator once a result with samples arrived);
- when no shard has samples, every sum (each a plain sum) is added and
  divided by the total result count (the plain mean);
- the output has the shape and memory order of the first shard with a
  result, and the widest of the shards' dtypes in that shard's byte order
  (the global model's dtype when the round started from one, as every
  shard then has it); a `dtype` argument overrides it (float64 for a server
  optimizer's step).

One aggregator's output dtype depends on arrival order in one case: without
a global model, a 0-sample result that arrives after a result with samples
is never folded and does not widen the dtype, while the shard that received
it before its own first result with samples did. The reduce then writes a
wider dtype than one aggregator fed the results shard after shard, with the
same values. Widening for every accepted result in the backend (what its
docstring says: "the widest width of the round's results") would remove
the case.

Floating point: each shard adds its results in arrival order, the reduce
adds the shards' float64 sums in shard order; one aggregator would add all
results in one arrival order. Float64 addition is not associative, so the
two may differ in the last places of the float64 average: per element by at
most ``2 (N + K) 2**-53 sum(n_i |x_i|) / sum(n_i)`` for N results in K shards
(the standard bound for N + K float64 additions, doubled; far below float32's
resolution, so a float32 model is mostly the same or one unit in the last
place apart, unless the results cancel out to an average far smaller than
themselves). With integer-valued weights and sample counts every
product and partial sum is an integer below 2**53, which float64 holds
exactly whatever the order: the reduce is then bit for bit one aggregator's.

Memory: one float64 accumulator chunk and one read chunk, whatever the
number of shards and the model's size (``O(chunk)``; partial sums are read
with positioned reads, chunk by chunk). A shard whose sum is in the other
memory order than the output (its first result was in the other order) is
read through a read-only file mapping, transposed block by block: no heap
memory beyond the chunk, but strided reads (rare: participants send one
order).

This module reads the backend's private state (``_sum``, ``_samples``...)
to export it; see `write_partial_sum`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from xaind.aggregator.backends import (
    DEFAULT_CHUNK_BYTES,
    BackendError,
    WeightedAverageBackend,
    _AtomicOutput,
    _c_order_blocks,
    _check_weights_dtype,
    _one_line,
    _read_exactly,
    _read_npy_header,
    _write_npy_header,
)
from xaind.aggregator.optimizers import ServerOptimizerBackend
from xaind.aggregator.result_set import ModelWriter

__all__ = [
    "MAGIC",
    "PartialSumError",
    "PartialSumHeader",
    "ReducedModel",
    "read_partial_sum_header",
    "reduce_partial_sums",
    "write_partial_sum",
]

MAGIC = b"XAINPSUM"
VERSION = 1
_LENGTH_BYTES = 4
_MAX_JSON_BYTES = 1 << 16
_SUM_DTYPES = (np.dtype("<f8"), np.dtype(">f8"))


class PartialSumError(BackendError):
    """A partial sum that cannot be written, read or reduced (a `BackendError`: the service handles it alike)."""


@dataclass(frozen=True)
class PartialSumHeader:
    """What a partial sum file says about itself, and where its float64 sum starts."""

    path: str
    round: int | None
    results: int
    samples: int
    shape: tuple[int, ...] | None
    dtype: np.dtype | None
    fortran_order: bool
    sum_dtype: np.dtype | None  # float64 in the byte order it was written in
    data_offset: int

    @property
    def size(self) -> int:
        return 0 if self.shape is None else math.prod(self.shape)


@dataclass(frozen=True)
class ReducedModel:
    """What the reduce wrote: the round's counts and the model's layout."""

    results: int
    samples: int
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    shards: int  # partial sums read
    contributing: int  # partial sums added (those with samples, or all when none has any)


# --------------------------------------------------------------------------
# Writing a shard's partial sum


def write_partial_sum(
    backend: WeightedAverageBackend | ServerOptimizerBackend, path: str, round_number: int | None = None
) -> PartialSumHeader:
    """Write the backend's running sum and counts to `path` (atomically and durably); its header.

    A server optimizer's averaging backend is exported (the step is taken
    once, after the reduce); any other backend cannot be sharded exactly and
    is refused. Run it on the backend's worker thread, between folds: the
    sum must not change while it is written. The backend is left as it was
    (a retried reduce may ask again).
    """
    if isinstance(backend, ServerOptimizerBackend):
        backend = backend.average  # type: ignore[assignment]
    if not isinstance(backend, WeightedAverageBackend):
        raise PartialSumError(f"{type(backend).__name__} has no partial sum: only the weighted average can be sharded")
    try:
        state = backend.running_sum()
    except BackendError as error:
        raise PartialSumError(str(error)) from None
    running_sum, results, samples = state.sum, state.results, state.samples
    shape, dtype, fortran_order = state.shape, state.dtype, state.fortran_order
    if results and (running_sum is None or shape is None or dtype is None):
        raise PartialSumError("cannot export the partial sum: the backend counts results but holds no sum")
    header = {
        "version": VERSION,
        "round": round_number,
        "results": results,
        "samples": samples,
        "shape": list(shape) if results and shape is not None else None,
        "dtype": dtype.str if results and dtype is not None else None,
        "fortran_order": fortran_order if results else False,
    }
    encoded = json.dumps(header, separators=(",", ":")).encode()
    with _AtomicOutput(path) as stream:
        stream.write(MAGIC + len(encoded).to_bytes(_LENGTH_BYTES, "big") + encoded)
        if results:
            assert running_sum is not None and shape is not None
            _write_npy_header(stream, running_sum.dtype, shape, fortran_order)
            stream.write(memoryview(running_sum).cast("B"))
    _sync_directory(path)
    return read_partial_sum_header(path)


def _sync_directory(path: str) -> None:
    """Make the rename that installed `path` durable (a crash after it keeps the file)."""
    try:
        descriptor = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError as exc:
        raise PartialSumError(f"cannot sync the directory of {path}: {_one_line(exc)}") from exc
    try:
        os.fsync(descriptor)
    except OSError as exc:
        raise PartialSumError(f"cannot sync the directory of {path}: {_one_line(exc)}") from exc
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------
# Reading one


def read_partial_sum_header(path: str) -> PartialSumHeader:
    """The header of the partial sum file at `path`, checked against its size; `PartialSumError` if invalid."""
    what = f"partial sum {path}"
    try:
        with open(path, "rb") as stream:
            header = _read_header(stream, path, what)
            size = os.fstat(stream.fileno()).st_size
    except OSError as exc:
        raise PartialSumError(f"{what}: {_one_line(exc)}") from exc
    except BackendError as exc:  # the .npy checks shared with the backend
        if isinstance(exc, PartialSumError):
            raise
        raise PartialSumError(str(exc)) from exc
    expected = header.data_offset + header.size * 8
    if size != expected:
        raise PartialSumError(f"{what}: {size} bytes, its header announces {expected}")
    return header


def _read_header(stream: Any, path: str, what: str) -> PartialSumHeader:
    lead = stream.read(len(MAGIC) + _LENGTH_BYTES)
    if len(lead) != len(MAGIC) + _LENGTH_BYTES or lead[: len(MAGIC)] != MAGIC:
        raise PartialSumError(f"{what}: not a partial sum file (no {MAGIC.decode()} magic string)")
    length = int.from_bytes(lead[len(MAGIC) :], "big")
    if length > _MAX_JSON_BYTES:
        raise PartialSumError(f"{what}: a {length}-byte header, more than {_MAX_JSON_BYTES}")
    raw = stream.read(length)
    try:
        fields = json.loads(raw)
        if not isinstance(fields, dict) or fields.get("version") != VERSION:
            raise ValueError(f"version {fields.get('version') if isinstance(fields, dict) else None}, not {VERSION}")
        results, samples = _count(fields, "results"), _count(fields, "samples")
        round_number = fields.get("round")
        if round_number is not None and (not isinstance(round_number, int) or isinstance(round_number, bool)):
            raise ValueError(f"round {round_number!r} is not an integer")
        if samples and not results:
            raise ValueError(f"{samples} samples in no result")
        fortran_order = fields.get("fortran_order")
        if not isinstance(fortran_order, bool):
            raise ValueError(f"fortran_order {fortran_order!r} is not a boolean")
        shape: tuple[int, ...] | None = None
        dtype: np.dtype | None = None
        if results:
            dims = fields.get("shape")
            if not isinstance(dims, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in dims):
                raise ValueError(f"shape {dims!r} is not a list of sizes")
            shape = tuple(dims)
            dtype = np.dtype(str(fields.get("dtype")))
    except (ValueError, TypeError) as exc:
        raise PartialSumError(f"{what}: invalid header ({_one_line(exc)})") from exc
    sum_dtype: np.dtype | None = None
    if results:
        assert dtype is not None
        _check_weights_dtype(dtype, what)
        sum_shape, sum_order, sum_dtype = _read_npy_header(stream, what)
        if sum_dtype not in _SUM_DTYPES or sum_shape != shape or sum_order != fortran_order:
            raise PartialSumError(
                f"{what}: its sum is {sum_dtype.str} of shape {sum_shape} (fortran_order {sum_order}), "
                f"its header announces float64 of shape {shape} (fortran_order {fortran_order})"
            )
    return PartialSumHeader(path, round_number, results, samples, shape, dtype, fortran_order, sum_dtype, stream.tell())


def _count(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} {value!r} is not a count")
    return value


# --------------------------------------------------------------------------
# The reduce


def reduce_partial_sums(
    paths: Sequence[str],
    destination_path: str,
    *,
    dtype: np.dtype | None = None,
    round_number: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> ReducedModel:
    """Write the round's global model at `destination_path` from every shard's partial sum, in shard order.

    `paths` must list every shard's partial sum, in the shards' fixed order
    (an empty shard's too, or leave it out: it adds nothing). With
    `round_number`, each must be of that round. The output is written
    atomically (whole or untouched). `PartialSumError` (one line) when a
    file is invalid, the rounds or shapes differ, or no shard has a result.
    """
    if chunk_bytes < 8:
        raise ValueError("chunk_bytes must be at least 8")
    headers = [read_partial_sum_header(path) for path in paths]
    if round_number is not None:
        for header in headers:
            if header.round != round_number:
                raise PartialSumError(f"partial sum {header.path} is of round {header.round}, not {round_number}")
    filled = [header for header in headers if header.results]
    if not filled:
        raise PartialSumError("cannot aggregate: no results were added this round (in any shard)")
    first = filled[0]
    assert first.shape is not None and first.dtype is not None
    for header in filled[1:]:
        if header.shape != first.shape:
            raise PartialSumError(f"partial sum {header.path}: shape {header.shape} differs from {first.path}'s {first.shape}")
    samples = sum(header.samples for header in headers)
    results = sum(header.results for header in headers)
    contributing = [header for header in filled if header.samples] if samples else filled
    widest = max((header.dtype for header in filled if header.dtype is not None), key=lambda d: d.itemsize)
    output_dtype = np.dtype(dtype) if dtype is not None else widest.newbyteorder(first.dtype.byteorder)
    _check_weights_dtype(output_dtype, "the reduced model")
    denominator = float(samples if samples else results)
    shape, fortran_order = first.shape, first.fortran_order
    with contextlib.ExitStack() as held:
        size = math.prod(shape)
        readers = [held.enter_context(contextlib.closing(_SumReader(header, fortran_order))) for header in contributing if size]
        with ModelWriter(destination_path, output_dtype, shape, fortran_order) as writer:
            _reduce_into(writer, readers, size, denominator, max(1, chunk_bytes // 8))
    return ReducedModel(results, samples, shape, output_dtype, fortran_order, len(headers), len(contributing))


def _reduce_into(writer: ModelWriter, readers: list[_SumReader], size: int, denominator: float, chunk: int) -> None:
    """Each output chunk: the first sum's elements, plus each next one's in order, divided, written."""
    total = np.empty(min(chunk, max(size, 1)), dtype=np.float64)
    raw = np.empty(len(total) * 8, dtype=np.uint8)
    for start in range(0, size, chunk):
        count = min(chunk, size - start)
        accumulator = total[:count]
        for position, reader in enumerate(readers):
            reader.add_into(accumulator, start, raw, overwrite=position == 0)
        np.divide(accumulator, denominator, out=accumulator)
        writer.write(start, accumulator)


class _SumReader:
    """One partial sum's float64 elements, in the output's memory order, chunk by chunk."""

    def __init__(self, header: PartialSumHeader, output_fortran_order: bool) -> None:
        assert header.shape is not None and header.sum_dtype is not None
        self.header = header
        self._descriptor: int | None = None
        self._transposed: np.ndarray | None = None
        if header.fortran_order == output_fortran_order or len(header.shape) < 2:
            try:
                self._descriptor = os.open(header.path, os.O_RDONLY)
            except OSError as exc:
                raise PartialSumError(f"partial sum {header.path}: {_one_line(exc)}") from exc
        else:
            # Stored in the other order: the logical array, seen in the output's order (a file mapping, not read in).
            logical = np.memmap(
                header.path, dtype=header.sum_dtype, mode="r", offset=header.data_offset,
                shape=header.shape, order="F" if header.fortran_order else "C",
            )
            self._transposed = logical.T if output_fortran_order else logical

    def add_into(self, accumulator: np.ndarray, start: int, raw: np.ndarray, overwrite: bool) -> None:
        """Add (or, for the first sum, copy) elements ``start .. start+len(accumulator)`` into `accumulator`."""
        count = len(accumulator)
        if self._descriptor is not None:
            chunk = raw[: count * 8]
            _read_exactly(self._descriptor, chunk, self.header.data_offset + start * 8, f"partial sum {self.header.path}")
            values = chunk.view(self.header.sum_dtype)
            if overwrite:
                accumulator[...] = values
            else:
                np.add(accumulator, values, out=accumulator)
            return
        assert self._transposed is not None
        position = 0
        for index, block_shape in _c_order_blocks(self._transposed.shape, start, start + count):
            piece = self._transposed[index]
            target = accumulator[position : position + piece.size].reshape(block_shape)
            if overwrite:
                target[...] = piece
            else:
                np.add(target, piece, out=target)
            position += piece.size

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None
        self._transposed = None  # the mapping goes with its last view
