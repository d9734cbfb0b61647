"""Starting the write-back of a file's dirty pages early, so that its fsync has little left to do.

An upload is fsynced before the coordinator hears of it. Spooled as it
arrives and fsynced only at its end, a round's uploads all wait on the disk
together after their last bytes (about 65 ms for 100 MB on the machine the
benchmarks ran on, most of a 10 x 10 MB round). Linux's
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts writing a range back
without waiting for it, so the disk works while the network does and the
final fsync only waits for the tail. It promises nothing about durability
(the fsync stays); where it does not exist, nothing is started early.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2


def _bind() -> Callable[[int, int, int, int], int] | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _bind()


def start_writeback(descriptor: int, offset: int) -> bool:
    """Start writing back what is dirty in `descriptor` from `offset` to its end; False if nothing was started."""
    if _sync_file_range is None:
        return False
    return _sync_file_range(descriptor, offset, 0, SYNC_FILE_RANGE_WRITE) == 0


def start_writeback_and_close(descriptor: int, offset: int) -> bool:
    """`start_writeback` on a descriptor of its own (a dup), closed afterwards: safe in another thread."""
    try:
        return start_writeback(descriptor, offset)
    finally:
        os.close(descriptor)
