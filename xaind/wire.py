"""The local-result wire format, parsed as it streams in.

A local result is the number of training samples as a 4-byte big-endian
unsigned integer followed by the weights as a NumPy `.npy` stream written
with `allow_pickle=False`. Uploads are validated chunk by chunk while they
arrive, so a bad one is refused as soon as its problem is visible and a
good one never has to be held whole in memory.

(Interface sketch; implementation to follow.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLES_BYTES = 4


class UploadRefused(Exception):
    """An upload that is not a valid local result; `status` is the HTTP answer."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedUpload(UploadRefused):
    status = 400


class UploadTooLarge(UploadRefused):
    status = 413


class UnacceptableWeights(UploadRefused):
    """Well-formed, but not weights this round can use (dtype, shape, non-finite values)."""

    status = 422


@dataclass(frozen=True)
class LocalResultHeader:
    samples: int
    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool
    data_offset: int  # bytes from the start of the upload to the first weight byte

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        return self.data_offset + self.data_bytes
