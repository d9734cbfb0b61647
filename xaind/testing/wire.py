"""The upload wire format (docs/wire-format.rst) encoded and parsed whole, for tests.

The daemons and the SDK stream uploads (`xaind.wire.LocalResultParser`,
`xaind.sdk.http`); these whole-buffer versions are the simple reference
the tests check the streaming code against, and build test uploads with.
"""

from __future__ import annotations

import io
import math
import operator
import os
from typing import BinaryIO

import numpy as np

from xaind.wire import MAX_SAMPLES, SAMPLES_BYTES, LocalResultHeader, LocalResultParser, MalformedUpload, byte_view


def read_local_result_header(stream: BinaryIO, *, max_bytes: int = 2**63) -> LocalResultHeader:
    """Parse the header of an already-stored (validated) upload from a binary file positioned at 0.

    Reads exactly the header's bytes, so the file is left positioned at
    `header.data_offset`. The data are not read (nor checked). Raises an
    `UploadRefused` subclass as `LocalResultParser` would.
    """
    parser = LocalResultParser(max_bytes=max_bytes)
    while parser.header is None:
        chunk = stream.read(parser.header_bytes_missing)
        if not chunk:
            parser.finish()  # raises: the header is incomplete
        parser.feed(chunk)
    return parser.header


def parse_local_result(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = 2**63,
    expected_shape: tuple[int, ...] | None = None,
) -> tuple[int, np.ndarray]:
    """Whole-buffer convenience over `LocalResultParser`: (samples, weights), or an `UploadRefused`.

    The weights are a read-only view into `data` (no copy), equal to what
    `numpy.load` would give (dtype, byte order, shape and order included).
    """
    parser = LocalResultParser(max_bytes=max_bytes, expected_shape=expected_shape)
    view = byte_view(data)
    parser.feed(view)
    header = parser.finish()
    order = "F" if header.fortran_order else "C"
    try:
        count = math.prod(header.shape)
        if count:
            flat = np.frombuffer(view, dtype=header.dtype, count=count, offset=header.data_offset)
            weights = flat.reshape(header.shape, order=order)
        else:
            weights = np.empty(header.shape, dtype=header.dtype, order=order)
            weights.flags.writeable = False
    except (ValueError, TypeError, MemoryError) as error:  # not expected after the parser's checks
        raise MalformedUpload(f"weights cannot be represented: {error}") from None
    return header.samples, weights


def encode_local_result(samples: int, weights: np.ndarray) -> bytes:
    """The wire format: samples as 4-byte big-endian unsigned, then numpy.save(..., allow_pickle=False)."""
    samples = operator.index(samples)
    if not 0 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be in [0, {MAX_SAMPLES}], not {samples}")
    stream = io.BytesIO()
    stream.write(samples.to_bytes(SAMPLES_BYTES, "big"))
    np.save(stream, weights, allow_pickle=False)
    return stream.getvalue()


def write_local_result(path: str | os.PathLike[str], samples: int, weights: np.ndarray) -> str:
    """Write a result file as the aggregator spools one (the upload body); its path as a string."""
    with open(path, "wb") as stream:
        stream.write(encode_local_result(samples, weights))
    return os.fspath(path)


def read_local_result_weights(path: str | os.PathLike[str]) -> np.ndarray:
    """A result file's weights as numpy loads them (the sample count skipped)."""
    with open(path, "rb") as stream:
        stream.read(SAMPLES_BYTES)
        return np.load(io.BytesIO(stream.read()), allow_pickle=False)
