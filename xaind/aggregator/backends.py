"""Aggregation backends: fold validated local results into the next global model.

A backend is driven by the aggregator daemon from a worker thread (never the
reactor thread), one operation at a time, so backends need no locking:

- ``reset(global_model_path)`` starts a round from the current global model
  (a plain ``.npy`` file) or from nothing;
- ``add_result(result_path, stream=None)`` folds one validated *result file* (the local
  result wire format of ``xaind.wire``: a 4-byte big-endian unsigned sample
  count, then a ``.npy`` stream written with ``allow_pickle=False``);
- ``aggregate(destination_path)`` writes the new global model as a ``.npy``
  file; it does not change the backend's state, so the caller may retry it;
- ``results`` counts the results folded since the last reset.

Every refusal is a `BackendError`.

`WeightedAverageBackend` (the built-in default) is sample-weighted federated
averaging, ``sum(n_i * x_i) / sum(n_i)``, computed with a single running
float64 sum that each result is folded into as it is added. Memory is the sum
(model size x 8 / itemsize) plus two fixed chunk buffers per thread, whatever
the number of results: result files are read in fixed chunks, and the output
is written chunk by chunk too.

`PythonAggregatorBackend` adapts any object with the interface of the seed's
Python aggregators (``add_weights``, ``aggregate``, ``reset``,
``get_global_weights``), e.g. ``xain_aggregators.weighted_average.Aggregator``
from the ``xain-aggregators`` 0.8.0 package. Such objects take whole byte
strings, so this backend holds what they hold (usually every result).

Both accept results of any float width and byte order (the rules fix only
the shape): the built-in one folds every width into its float64 sum, the
Python one converts each result to the global model's dtype, in chunks, as
it reads it (the seed's aggregator makes float64 models; xain-sdk
participants send float32).

`load_backend` builds a backend from the aggregator's configuration.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np
from numpy.lib import format as npy_format

from xaind.priority import run_in_background
from xaind.wire import SAMPLES_BYTES, LocalResultHeader

__all__ = [
    "AGGREGATOR_METHODS",
    "AggregationBackend",
    "BackendError",
    "DEFAULT_CHUNK_BYTES",
    "PythonAggregatorBackend",
    "WeightedAverageBackend",
    "load_backend",
]

#: Float64 elements per chunk x 8. Small enough that a chunk's scratch stays in
#: the CPU cache between the weighting and the addition: folding 10 x 10 MB
#: float32 took 41 ms with 256 KiB chunks against 50 ms with 8 MiB ones.
DEFAULT_CHUNK_BYTES = 512 * 2**10

#: Below this many weights a fold or an aggregation is not split across threads.
PARALLEL_MIN_ELEMENTS = 2**18
AGGREGATOR_METHODS = ("add_weights", "aggregate", "reset", "get_global_weights")
_SUPPORTED_ITEMSIZES = (2, 4, 8)  # float16, float32, float64 (either byte order)


class BackendError(Exception):
    """An aggregation or a fold that cannot be done (no results, shapes differ, ...)."""


@runtime_checkable
class AggregationBackend(Protocol):
    def reset(self, global_model_path: str | None) -> None:
        """Start a round from this global model (a ``.npy`` file path) or from nothing."""

    def add_result(self, result_path: str, stream: BinaryIO | None = None) -> None:
        """Fold one validated result file; raises `BackendError` and changes nothing if refused.

        With `stream` (a binary file open on it, read from its start) the file
        is read there; the path names it in messages (it may be renamed meanwhile).
        """

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        """`add_result` for each (path, stream) in order: each one's refusal, or None once folded."""

    def aggregate(self, destination_path: str) -> None:
        """Write the new global model as a ``.npy`` file; `BackendError` when there is nothing to aggregate."""

    @property
    def results(self) -> int:
        """Results folded since the last reset."""


# --------------------------------------------------------------------------
# .npy headers and files


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_npy_header(stream: BinaryIO, what: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Read a ``.npy`` header at the stream's position: (shape, fortran_order, dtype).

    The header's text is parsed once per distinct text (`_parse_npy_header`):
    every result of a round carries the same one, and numpy parses it with
    `ast.literal_eval`, which cost more than folding a 100 kB result.
    """
    magic = stream.read(8)
    if len(magic) < 8 or magic[:6] != npy_format.MAGIC_PREFIX:
        raise BackendError(f"{what}: not a valid .npy stream (no .npy magic string)")
    version = (magic[6], magic[7])
    if version not in ((1, 0), (2, 0)):
        raise BackendError(f"{what}: unsupported .npy format version {version[0]}.{version[1]}")
    length_bytes = 2 if version == (1, 0) else 4
    length_field = stream.read(length_bytes)
    if len(length_field) != length_bytes:
        raise BackendError(f"{what}: not a valid .npy stream (truncated header)")
    header = stream.read(int.from_bytes(length_field, "little"))
    try:
        return _parse_npy_header(magic + length_field + header)
    except ValueError as exc:
        raise BackendError(f"{what}: not a valid .npy stream ({_one_line(exc)})") from exc


@functools.lru_cache(maxsize=64)
def _parse_npy_header(raw: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """numpy's own parse of a whole ``.npy`` header (magic, length, text); raises ValueError."""
    stream = io.BytesIO(raw)
    version = npy_format.read_magic(stream)
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran_order, dtype = read(stream)
    if stream.tell() != len(raw):
        raise ValueError("truncated header")
    return tuple(int(n) for n in shape), bool(fortran_order), np.dtype(dtype)


def _check_weights_dtype(dtype: np.dtype, what: str) -> None:
    if dtype.kind != "f" or dtype.itemsize not in _SUPPORTED_ITEMSIZES or dtype.hasobject:
        raise BackendError(f"{what}: weights of dtype {dtype.str} cannot be averaged (float16/32/64 only)")


def _read_result_header(stream: BinaryIO, what: str) -> LocalResultHeader:
    raw = stream.read(SAMPLES_BYTES)
    if len(raw) != SAMPLES_BYTES:
        raise BackendError(f"{what}: too short for a local result ({len(raw)} bytes)")
    samples = int.from_bytes(raw, "big")
    shape, fortran_order, dtype = _read_npy_header(stream, what)
    return LocalResultHeader(
        samples=samples, dtype=dtype, shape=shape, fortran_order=fortran_order, data_offset=stream.tell()
    )


def _write_npy_header(stream: BinaryIO, dtype: np.dtype, shape: tuple[int, ...], fortran_order: bool) -> None:
    header = {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": fortran_order, "shape": shape}
    try:
        npy_format.write_array_header_1_0(stream, header)
    except ValueError:  # a header longer than 64 KiB needs format 2.0
        npy_format.write_array_header_2_0(stream, header)


def _check_npy_bytes(data: Any, what: str) -> None:
    """Check that ``numpy.load(allow_pickle=False)`` loads these bytes as one floating array.

    Equivalent to loading them, without a full-size copy: the header must be a
    valid ``.npy`` header of a floating dtype, and the data exactly as long as
    it announces.
    """
    view = memoryview(data).cast("B")
    stream = io.BytesIO(view[: 2**20])  # enough for any header numpy reads
    shape, _, dtype = _read_npy_header(stream, what)
    if dtype.kind != "f" or dtype.hasobject:
        raise BackendError(f"{what}: the model is of dtype {dtype.str}, not a floating array")
    expected = stream.tell() + math.prod(shape) * dtype.itemsize
    if len(view) != expected:
        raise BackendError(f"{what}: {len(view)} bytes, the .npy header announces {expected}")


class _AtomicOutput:
    """Write ``path`` through ``path.partial``: the destination is whole or untouched."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"

    def __enter__(self) -> BinaryIO:
        try:
            self.stream = open(self.partial, "wb")
        except OSError as exc:
            raise BackendError(f"cannot write {self.path}: {_one_line(exc)}") from exc
        return self.stream

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        try:
            if exc_type is None:
                self.stream.flush()
                os.fsync(self.stream.fileno())
            self.stream.close()
            if exc_type is None:
                os.replace(self.partial, self.path)
        except OSError as error:
            exc_type, exc = OSError, error
        if exc_type is not None:
            try:
                os.unlink(self.partial)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise BackendError(f"cannot write {self.path}: {_one_line(exc)}") from exc
        return False


# --------------------------------------------------------------------------
# The built-in weighted average


@dataclass(frozen=True)
class _PlannedFold:
    """One checked result, counted in, waiting for its weights to reach the sum."""

    what: str
    descriptor: int
    data_offset: int
    dtype: np.dtype
    weight: float
    restart: bool
    transposed: bool  # stored in the other memory order than the sum


def _c_order_blocks(
    shape: tuple[int, ...], start: int, stop: int, prefix: tuple[Any, ...] = ()
) -> Iterator[tuple[tuple[Any, ...], tuple[int, ...]]]:
    """Split the C-order flat range [start, stop) of an array of ``shape`` into blocks.

    Yields (index, block_shape): ``array[index]`` is a view (basic indexing)
    whose C-order flattening is the next stretch of the range, in order. A
    range splits into at most 2 * ndim - 1 blocks.
    """
    if start >= stop:
        return
    if not shape:
        yield prefix + (Ellipsis,), ()
        return
    inner = math.prod(shape[1:])
    row, offset = divmod(start, inner)
    if offset:
        end = min(stop, (row + 1) * inner)
        yield from _c_order_blocks(shape[1:], offset, end - row * inner, prefix + (row,))
        start, row = end, row + 1
        if start >= stop:
            return
    last = stop // inner
    if last > row:
        yield prefix + (slice(row, last), Ellipsis), (last - row,) + shape[1:]
    if last * inner < stop:
        yield from _c_order_blocks(shape[1:], 0, stop - last * inner, prefix + (last,))


@dataclass(frozen=True)
class RunningSumState:
    """A weighted average's running sum and counts: what a shard hands to the reduce."""

    sum: np.ndarray | None  # float64, sum(n_i * x_i) (or the plain sum while no result has samples)
    results: int
    samples: int
    shape: tuple[int, ...] | None
    dtype: np.dtype | None  # the output's dtype
    fortran_order: bool


class WeightedAverageBackend:
    """Sample-weighted federated averaging with one running float64 sum.

    The new global model is ``sum(n_i * x_i) / sum(n_i)`` over the results of
    the round, with ``n_i`` the sample count of result ``i``. When every result
    has 0 samples it is the plain mean (as the seed's weighted average does);
    otherwise a 0-sample result weighs nothing. One accumulator does both:
    while every result so far had 0 samples it holds the plain sum, and the
    first result with samples restarts it (overwrites it with ``n * x``).

    Results must share their shape, and match the shape of the global model
    given to `reset`, if any; a refused result leaves the sum untouched.
    float16, float32 and float64 in either byte order are accepted, mixed in
    one round: each is widened to float64 as it is folded. The output has the
    dtype of the global model given to `reset` (byte order included), or
    without one the widest width of the round's results in the byte order of
    its first result; the shape and the memory order are those of the
    round's first result.

    Memory order: the sum is kept in the memory order of the first result;
    a result in the other order (``fortran_order`` differs) is folded into the
    transposed view of the sum, in blocks, so the fold is element-wise equal
    to numpy on the logical arrays (slower, as it strides through memory).

    Memory: the sum (model size x 8 / itemsize), plus one raw chunk buffer and
    one float64 chunk buffer of at most ``chunk_bytes`` each per part; nothing
    else grows with the model or with the number of results.

    Parts: a large result is folded (and the output written) in up to
    ``threads`` contiguous parts side by side, read and written with
    positioned I/O; each element sees the same operations in the same order
    as in one part, so the output is identical whatever the split.

    A fold that fails half-way (an I/O error after the checks) leaves the sum
    unusable: the backend then refuses everything until the next `reset`.
    """

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int | None = None) -> None:
        if chunk_bytes < 8:
            raise ValueError("chunk_bytes must be at least 8")
        self._chunk_elements = chunk_bytes // 8
        #: Contiguous parts a large fold or aggregation is split into, each in its own
        #: thread (numpy releases the GIL): the sum's elements are disjoint between parts.
        self._parts = max(1, threads if threads is not None else min(4, os.cpu_count() or 1))
        self._part_buffers: list[tuple[np.ndarray, np.ndarray] | None] = [None] * self._parts
        self._helpers: ThreadPoolExecutor | None = None
        self.reset(None)

    # -- state

    def reset(self, global_model_path: str | None) -> None:
        global_shape, global_dtype = None, None
        if global_model_path is not None:
            what = f"global model {global_model_path}"
            try:
                with open(global_model_path, "rb") as stream:
                    global_shape, _, global_dtype = _read_npy_header(stream, what)
            except OSError as exc:
                raise BackendError(f"{what}: {_one_line(exc)}") from exc
            _check_weights_dtype(global_dtype, what)
        self._global_shape: tuple[int, ...] | None = global_shape
        self._global_dtype: np.dtype | None = global_dtype
        self._shape: tuple[int, ...] | None = None
        self._dtype: np.dtype | None = None
        self._fortran_order = False
        self._sum: np.ndarray | None = None
        self._results = 0
        self._samples = 0
        self._broken: str | None = None

    @property
    def results(self) -> int:
        return self._results

    @property
    def samples(self) -> int:
        """Sample count of the results folded since the last reset."""
        return self._samples

    def running_sum(self) -> RunningSumState:
        """The sum as it stands, for a shard's partial sum (xaind/aggregator/partial_sum.py).

        The array is the backend's own, not a copy: read it on the worker,
        between folds. `BackendError` if a failed fold left the sum unusable.
        """
        if self._broken is not None:
            raise BackendError(f"cannot export the running sum: {self._broken}; the round must be reset")
        return RunningSumState(self._sum, self._results, self._samples, self._shape, self._dtype, bool(self._fortran_order))

    # -- folding

    def add_result(self, result_path: str, stream: BinaryIO | None = None) -> None:
        (refusal,) = self.add_results([(result_path, stream)])
        if refusal is not None:
            raise refusal

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        """`add_result` for each (path, stream) in order; each one's refusal, or None once folded.

        The outcome is that of one `add_result` call per source, but results
        of the same memory order are folded in one pass over the sum: each
        chunk of the sum is read and written once for all of them instead of
        once per result (folding is bound by memory traffic).
        """
        outcomes: list[BackendError | None] = []
        planned: list[_PlannedFold] = []
        before = (self._sum, self._shape, self._dtype, self._fortran_order, self._results, self._samples)
        with contextlib.ExitStack() as opened:
            for path, stream in sources:
                what = f"result {path}"
                try:
                    if self._broken is not None:
                        raise BackendError(f"{what} refused: {self._broken}; the round must be reset")
                    if stream is None:
                        stream = opened.enter_context(open(path, "rb", buffering=0))
                    else:
                        stream.seek(0)
                    header = _read_result_header(stream, what)
                    self._check(header, os.fstat(stream.fileno()).st_size, what)
                except OSError as exc:
                    outcomes.append(BackendError(f"{what}: {_one_line(exc)}"))
                    continue
                except BackendError as exc:
                    outcomes.append(exc)
                    continue
                fold = self._plan(stream, header, what)
                if fold is not None:
                    planned.append(fold)
                outcomes.append(None)
            if planned:
                try:
                    self._fold(planned)
                except BaseException as exc:
                    failure = exc if isinstance(exc, BackendError) else BackendError(f"{planned[0].what}: {_one_line(exc)}")
                    if before[0] is None:
                        # The sum began with these: dropping it is as if none had been added.
                        self._sum, self._shape, self._dtype, self._fortran_order, self._results, self._samples = before
                    else:
                        self._broken = f"an earlier fold failed part-way ({_one_line(exc)})"
                    planned_whats = {fold.what for fold in planned}
                    outcomes = [
                        failure if outcome is None and f"result {path}" in planned_whats else outcome
                        for outcome, (path, _) in zip(outcomes, sources)
                    ]
                    if not isinstance(exc, Exception):
                        raise
        return outcomes

    def _plan(self, stream: BinaryIO, header: LocalResultHeader, what: str) -> _PlannedFold | None:
        """Count a checked result in, and say how it goes into the sum (None: it weighs nothing)."""
        if header.samples == 0 and self._samples > 0:
            self._results += 1  # weighs nothing: some result of the round has samples
            return None
        size = math.prod(header.shape)
        first = self._sum is None
        if first:
            self._sum = np.empty(size, dtype=np.float64)
            self._shape, self._dtype, self._fortran_order = header.shape, self._global_dtype or header.dtype, header.fortran_order
        elif self._global_dtype is None and self._dtype is not None and header.dtype.itemsize > self._dtype.itemsize:
            self._dtype = header.dtype.newbyteorder(self._dtype.byteorder)  # the widest, in the first one's byte order
        assert self._sum is not None and self._shape is not None
        # Overwrite the sum for the first result, and for the first result with
        # samples after 0-sample ones (which weigh nothing from then on);
        # otherwise add. Weight 1 while every result has 0 samples.
        restart = first or (header.samples > 0 and self._samples == 0)
        weight = float(header.samples) if header.samples > 0 else 1.0
        transposed = header.fortran_order != self._fortran_order and len(self._shape) >= 2
        self._results += 1
        self._samples += header.samples
        return _PlannedFold(what, stream.fileno(), stream.tell(), header.dtype, weight, restart, transposed)

    def _check(self, header: LocalResultHeader, size: int, what: str) -> None:
        _check_weights_dtype(header.dtype, what)
        if size != header.total_bytes:
            raise BackendError(f"{what}: {size} bytes, its header announces {header.total_bytes}")
        if self._global_shape is not None and header.shape != self._global_shape:
            raise BackendError(f"{what}: shape {header.shape} differs from the global model's {self._global_shape}")
        if self._shape is not None and header.shape != self._shape:
            raise BackendError(f"{what}: shape {header.shape} differs from this round's {self._shape}")

    def _buffers(self, part: int, elements: int, itemsize: int) -> tuple[np.ndarray, np.ndarray]:
        """The reused chunk buffers of one part: raw bytes for weights up to ``itemsize`` wide, and float64."""
        elements = max(1, min(self._chunk_elements, elements))
        buffers = self._part_buffers[part]
        if buffers is None or len(buffers[1]) != elements or len(buffers[0]) < elements * itemsize:
            buffers = (np.empty(elements * itemsize, dtype=np.uint8), np.empty(elements, dtype=np.float64))
            self._part_buffers[part] = buffers
        return buffers

    def _in_parts(self, size: int, work: Callable[[int, int, int], None]) -> None:
        """Run ``work(part, start, stop)`` over contiguous parts of ``range(size)``, the last in this thread.

        Returns once every part ended; raises the first part's error, if any.
        """
        parts = max(1, min(self._parts, size // PARALLEL_MIN_ELEMENTS))
        bounds = [size * part // parts for part in range(parts + 1)]
        if parts > 1 and self._helpers is None:
            self._helpers = ThreadPoolExecutor(
                max_workers=self._parts - 1, thread_name_prefix="xaind-fold", initializer=run_in_background
            )
        futures = [self._helpers.submit(work, part, bounds[part], bounds[part + 1]) for part in range(parts - 1)] if self._helpers else []
        errors: list[BaseException] = []
        try:
            work(parts - 1, bounds[parts - 1], bounds[parts])
        except BaseException as exc:  # noqa: BLE001 - raised below, once the other parts ended
            errors.append(exc)
        for future in futures:
            error = future.exception()
            if error is not None:
                errors.insert(0, error)
        if errors:
            raise errors[0]

    def _fold(self, planned: list[_PlannedFold]) -> None:
        """Apply planned folds, in order: runs of the same memory order in one pass each."""
        assert self._sum is not None and self._shape is not None
        size = len(self._sum)
        run: list[_PlannedFold] = []
        for fold in planned + [None]:  # type: ignore[list-item]
            if run and (fold is None or fold.transposed != run[0].transposed):
                self._fold_run(run, size)
                run = []
            if fold is not None:
                run.append(fold)

    def _fold_run(self, run: list[_PlannedFold], size: int) -> None:
        """Fold results that share a memory order: each element sees them in order, chunk by chunk."""
        assert self._sum is not None and self._shape is not None
        if run[0].transposed:
            # The file's flat data is the logical array transposed, in C order;
            # this is the sum (kept in the other order) seen as that array:
            sum_c_shape = self._shape[::-1] if self._fortran_order else self._shape
            target = self._sum.reshape(sum_c_shape).T
            target_shape = target.shape
        else:
            target, target_shape = self._sum, (size,)
        widest = max(fold.dtype.itemsize for fold in run)

        def fold_part(part: int, start: int, stop: int) -> None:
            raw, scratch = self._buffers(part, stop - start, widest)
            while start < stop:
                count = min(len(scratch), stop - start)
                blocks = list(_c_order_blocks(target_shape, start, start + count))
                for fold in run:
                    itemsize = fold.dtype.itemsize  # any width: each element is widened to float64 as it is added
                    chunk_bytes = raw[: count * itemsize]
                    _read_exactly(fold.descriptor, chunk_bytes, fold.data_offset + start * itemsize, fold.what)
                    chunk = chunk_bytes.view(fold.dtype)
                    if fold.weight != 1.0:
                        chunk = np.multiply(chunk, fold.weight, out=scratch[:count], dtype=np.float64)
                    position = 0
                    for index, block_shape in blocks:
                        block = target[index]
                        piece = chunk[position : position + block.size].reshape(block_shape)
                        if fold.restart:
                            block[...] = piece
                        else:
                            np.add(block, piece, out=block, dtype=np.float64)
                        position += block.size
                start += count

        self._in_parts(size, fold_part)

    # -- the new global model

    def aggregate(self, destination_path: str, dtype: np.dtype | None = None) -> None:
        """Write the average; in `dtype` instead of the round's (a server optimizer steps from it unrounded)."""
        if self._broken is not None:
            raise BackendError(f"cannot aggregate: {self._broken}; the round must be reset")
        if self._results == 0 or self._sum is None:
            raise BackendError("cannot aggregate: no results were added this round")
        assert self._shape is not None and self._dtype is not None
        denominator = float(self._samples if self._samples > 0 else self._results)
        dtype, total = dtype or self._dtype, len(self._sum)
        total_sum = self._sum
        with _AtomicOutput(destination_path) as stream:
            _write_npy_header(stream, dtype, self._shape, self._fortran_order)
            stream.flush()
            descriptor, data_offset = stream.fileno(), stream.tell()

            def write_part(part: int, start: int, stop: int) -> None:
                raw, scratch = self._buffers(part, stop - start, dtype.itemsize)
                while start < stop:
                    count = min(len(scratch), stop - start)
                    np.divide(total_sum[start : start + count], denominator, out=scratch[:count], dtype=np.float64)
                    out = raw[: count * dtype.itemsize]
                    out.view(dtype)[...] = scratch[:count]
                    _write_exactly(descriptor, out, data_offset + start * dtype.itemsize)
                    start += count

            self._in_parts(total, write_part)


def _read_exactly(descriptor: int, buffer: np.ndarray, offset: int, what: str) -> None:
    """Fill `buffer` from `descriptor` at `offset` (positioned reads: parts read side by side)."""
    view = memoryview(buffer)
    filled = 0
    while filled < len(view):
        got = os.preadv(descriptor, [view[filled:]], offset + filled)
        if not got:
            raise BackendError(f"{what}: ended early, at byte {offset + filled}")
        filled += got


def _write_exactly(descriptor: int, buffer: np.ndarray, offset: int) -> None:
    view = memoryview(buffer)
    written = 0
    while written < len(view):
        written += os.pwrite(descriptor, view[written:], offset + written)


class PythonAggregatorBackend:
    """Adapt an object with the seed's Python aggregator interface.

    ``reset`` passes the global model file's bytes (or None), ``add_result``
    the whole result file's bytes (the wire format the seed took), converted
    to the global model's dtype if it has another (without a global model,
    as sent), and
    ``aggregate`` writes the bytes the aggregator returns once they are
    checked to be a ``.npy`` stream of one floating array. An ``add_weights``
    that returns a false value (False, or None from a sloppy implementation)
    refuses the result; whatever the wrapped object raises becomes a
    `BackendError`.
    """

    def __init__(self, aggregator: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes < 8:
            raise ValueError("chunk_bytes must be at least 8")
        missing = [name for name in AGGREGATOR_METHODS if not callable(getattr(aggregator, name, None))]
        if missing:
            raise BackendError(f"{type(aggregator).__name__} lacks the aggregator method(s) {', '.join(missing)}")
        self.aggregator = aggregator
        self._name = type(aggregator).__qualname__
        self._results = 0
        self._model_dtype: np.dtype | None = None
        self._chunk_elements = chunk_bytes // 8

    @property
    def results(self) -> int:
        return self._results

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.aggregator, method)(*args)
        except Exception as exc:
            raise BackendError(f"{self._name}.{method} failed: {_one_line(exc)}") from exc

    @staticmethod
    def _read(path: str, what: str, stream: BinaryIO | None = None) -> bytes:
        try:
            if stream is not None:
                stream.seek(0)
                return stream.read()
            with open(path, "rb") as opened:
                return opened.read()
        except OSError as exc:
            raise BackendError(f"{what}: {_one_line(exc)}") from exc

    def reset(self, global_model_path: str | None) -> None:
        data = None if global_model_path is None else self._read(global_model_path, "global model")
        model_dtype = None
        if data is not None:
            what = f"global model {global_model_path}"
            _, _, model_dtype = _read_npy_header(io.BytesIO(memoryview(data)[: 2**20]), what)
            _check_weights_dtype(model_dtype, what)
        self._call("reset", data)
        self._model_dtype = model_dtype
        self._results = 0

    def _read_result(self, path: str, stream: BinaryIO | None) -> bytes:
        """The result's bytes for the aggregator: as stored, or converted to the model's dtype."""
        what = f"result {path}"
        target = self._model_dtype
        try:
            with contextlib.ExitStack() as opened:
                if stream is None:
                    stream = opened.enter_context(open(path, "rb"))
                stream.seek(0)
                header = _read_result_header(stream, what)
                if target is None or header.dtype == target:
                    stream.seek(0)
                    return stream.read()
                _check_weights_dtype(header.dtype, what)
                return self._converted(stream, header, target, what)
        except OSError as exc:
            raise BackendError(f"{what}: {_one_line(exc)}") from exc

    def _converted(self, stream: BinaryIO, header: LocalResultHeader, target: np.dtype, what: str) -> bytes:
        """The result in `target` (the stream at its data): one full-size buffer, filled chunk by chunk.

        The buffer is sized once and its bytes object handed over without a
        copy (`BytesIO.getvalue` shares it), so the conversion costs a chunk
        beyond the converted result the aggregator holds anyway.
        """
        prefix = io.BytesIO()
        prefix.write(header.samples.to_bytes(SAMPLES_BYTES, "big"))
        _write_npy_header(prefix, target, header.shape, header.fortran_order)
        elements = math.prod(header.shape)
        total = prefix.tell() + elements * target.itemsize
        output = io.BytesIO()
        if total:
            output.seek(total - 1)
            output.write(b"\0")  # one allocation of the final size
            output.seek(0)
        output.write(prefix.getbuffer())
        done = 0
        while done < elements:
            count = min(self._chunk_elements, elements - done)
            wanted = count * header.dtype.itemsize
            raw = stream.read(wanted)
            if len(raw) != wanted:
                raise BackendError(f"{what}: ended early, its header announces {header.total_bytes} bytes")
            output.write(np.frombuffer(raw, dtype=header.dtype).astype(target).tobytes())
            done += count
        if stream.read(1):
            raise BackendError(f"{what}: longer than the {header.total_bytes} bytes its header announces")
        return output.getvalue()

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        outcomes: list[BackendError | None] = []
        for path, stream in sources:
            try:
                self.add_result(path, stream)
                outcomes.append(None)
            except BackendError as refusal:
                outcomes.append(refusal)
        return outcomes

    def add_result(self, result_path: str, stream: BinaryIO | None = None) -> None:
        data = self._read_result(result_path, stream)
        if not self._call("add_weights", data):
            raise BackendError(f"result {result_path}: refused by {self._name}.add_weights")
        self._results += 1

    def aggregate(self, destination_path: str) -> None:
        if self._results == 0:
            raise BackendError("cannot aggregate: no results were added this round")
        data = self._call("aggregate")
        what = f"{self._name}.aggregate"
        try:
            _check_npy_bytes(data, what)
        except TypeError as exc:
            raise BackendError(f"{what} returned {type(data).__name__}, not bytes") from exc
        with _AtomicOutput(destination_path) as stream:
            stream.write(data)


# --------------------------------------------------------------------------
# Configuration


def load_backend(name: str, module: str | None = None, class_name: str | None = None) -> AggregationBackend:
    """The backend named in the configuration; `BackendError` (one line) if it cannot be built."""
    if name == "weighted_average":
        if module is not None or class_name is not None:
            raise BackendError("aggregation backend weighted_average takes no module or class")
        return WeightedAverageBackend()
    if name != "python":
        raise BackendError(f"unknown aggregation backend {name!r} (known: weighted_average, python)")
    if not module or not class_name:
        raise BackendError("aggregation backend python needs both a module and a class")
    try:
        imported = importlib.import_module(module)
    except BaseException as exc:  # an import may fail in any way, SystemExit included
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BackendError(f"cannot import aggregator module {module!r}: {_one_line(exc)}") from exc
    cls = getattr(imported, class_name, None)
    if cls is None:
        raise BackendError(f"aggregator module {module!r} has no class {class_name!r}")
    if not callable(cls):
        raise BackendError(f"{module}.{class_name} is not a class")
    missing = [method for method in AGGREGATOR_METHODS if not callable(getattr(cls, method, None))]
    if missing:
        raise BackendError(f"{module}.{class_name} lacks the aggregator method(s) {', '.join(missing)}")
    try:
        instance = cls()
    except Exception as exc:
        raise BackendError(f"cannot create {module}.{class_name}(): {_one_line(exc)}") from exc
    return PythonAggregatorBackend(instance)
