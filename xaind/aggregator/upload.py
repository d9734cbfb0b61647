"""One participant's upload as it streams in: validated chunk by chunk, spooled to disk.

An `Upload` knows its bytes and its files; what its round allows (the spec,
whether it is kept) it asks through `UploadHooks`, which the aggregator
service implements. Neither side touches the other's state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, TypeVar

import numpy as np
from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from xaind.aggregator.rules import ROUND_ENDED, UploadKey, WeightsSpec
from xaind.aggregator.store import ModelStore, remove_files
from xaind.protocol import ErrorCode, Refusal
from xaind.wire import SAMPLES_BYTES, LocalResultParser, UploadRefused
from xaind.writeback import start_writeback_and_close

T = TypeVar("T")

#: Bytes of an upload spooled between two starts of their write-back to disk.
WRITEBACK_STEP_BYTES = 2 * 2**20


class UploadHooks(Protocol):
    """What an upload needs from the aggregator."""

    def check_spec(self, key: UploadKey, spec: WeightsSpec) -> None:
        """Raise UnacceptableWeights unless the round takes weights like these (so far)."""

    def run_on_disk(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a blocking step on a disk thread."""

    def step_failed(self, failure: Failure, what: str) -> None:
        """Log a blocking step that failed and that nothing waits on."""

    def upload_aborted(self, upload: Upload) -> None:
        """The upload was broken off or refused before it was complete."""

    def upload_complete(self, upload: Upload) -> Deferred[None]:
        """The upload is whole and valid: keep it; fires once the coordinator recorded it.

        Unlike the round's spec it is refused: aborted at once, and the Deferred fails.
        """


def read_result_spec(path: str) -> WeightsSpec:
    """The spec of a stored result (blocking, like the other metadata reads at start-up)."""
    with open(path, "rb") as stream:
        stream.seek(SAMPLES_BYTES)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    return WeightsSpec.of(dtype, shape)


class Upload:
    """One participant's upload as it streams in: validated chunk by chunk, spooled to disk."""

    def __init__(self, key: UploadKey, path: str, max_bytes: int, hooks: UploadHooks) -> None:
        self.key = key
        self.hooks = hooks
        self.parser = LocalResultParser(max_bytes=max_bytes)
        self.path = path
        self._file = open(path, "wb")
        try:
            #: Its own read handle: folds read it while the commit renames the file.
            self.reader: BinaryIO = open(path, "rb", buffering=0)
        except OSError:
            self._file.close()
            raise
        self.refusal: Refusal | None = None
        self.closed = False
        self._spec_checked = False
        self._spooled = 0
        self._written_back = 0  # bytes whose write-back was started

    @property
    def participant_id(self) -> str:
        return self.key.participant_id

    @property
    def token(self) -> str:
        return self.key.token

    @property
    def round(self) -> int:
        return self.key.round

    def write(self, data: bytes) -> None:
        """Take the next chunk; after a refusal the rest of the body is dropped unread."""
        if self.refusal is not None or self.closed:
            return
        try:
            self.parser.feed(data)
            if self.parser.header is not None and not self._spec_checked:
                self._spec_checked = True
                header = self.parser.header
                self.hooks.check_spec(self.key, WeightsSpec.of(header.dtype, header.shape))
        except UploadRefused as refusal:
            self.refusal = refusal
            self.abort()
            return
        self._file.write(data)
        self._spooled += len(data)
        if self._spooled - self._written_back >= WRITEBACK_STEP_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Have the disk start on what arrived so far (the commit's fsync then waits for little)."""
        self._file.flush()
        descriptor = os.dup(self._file.fileno())
        offset, self._written_back = self._written_back, self._spooled
        self.hooks.run_on_disk(start_writeback_and_close, descriptor, offset).addErrback(
            self.hooks.step_failed, f"starting the write-back of {self.path}")

    @property
    def spec(self) -> WeightsSpec | None:
        """The spec its header announced (None before the header is complete)."""
        header = self.parser.header
        return None if header is None else WeightsSpec.of(header.dtype, header.shape)

    def abort(self, refusal: Refusal | None = None) -> None:
        """Forget everything received: a broken-off or refused upload changes nothing.

        With `refusal`, the request is answered with it (at its next chunk or its end).
        """
        if self.closed:
            return
        if refusal is not None and self.refusal is None:
            self.refusal = refusal
        self.closed = True
        try:
            # On a full disk, closing flushes what is still buffered and fails;
            # the bytes are forgotten anyway, and the rest must happen regardless.
            self._file.close()
        except OSError:
            pass
        finally:
            self.reader.close()
            remove_files([self.path])
            self.hooks.upload_aborted(self)

    def finish(self) -> Deferred[None]:
        """The body ended: make the upload durable, keep and fold it, then have the coordinator record it."""
        if self.refusal is not None:
            return fail(self.refusal)
        if self.closed:
            return fail(Refusal(ROUND_ENDED, ErrorCode.ROUND_ENDED))
        try:
            self.parser.finish()
        except UploadRefused as refusal:
            self.abort()
            return fail(refusal)
        # Handed to the kernel, so that the reader (folding while it becomes durable) sees every byte.
        self._file.flush()
        # Still open while the round's rules decide: a refusal (another spec) aborts it meanwhile.
        completing = self.hooks.upload_complete(self)
        self.closed = True
        return completing

    def commit(self, store: ModelStore) -> str:
        """Make the upload durable and keep it as a result (blocking: run on a disk thread)."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            return store.commit_result(self.path, self.round, self.participant_id)
        except OSError:
            if os.path.exists(self.path):
                os.unlink(self.path)
            raise
