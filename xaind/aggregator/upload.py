"""One participant's upload as it streams in: validated chunk by chunk, spooled to disk.

An `Upload` knows its bytes and its files; what its round allows (the spec,
whether it is kept) it asks through `UploadHooks`, which the aggregator
service implements. Neither side touches the other's state.

Its partial file is created on a disk thread, never on the reactor: creating
a file waits for the file system's journal, which the fsyncs of other
uploads being made durable keep busy (with a thousand uploads a round, the
reactor spent a quarter of its time in `open`). Chunks that arrive before
the file is open are kept in memory, the connection paused beyond
PENDING_LIMIT bytes; a disk that refuses the file is answered 503 at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail
from twisted.python.failure import Failure

from xaind.aggregator.rules import ROUND_ENDED, UploadKey, WeightsSpec
from xaind.aggregator.store import ModelStore, read_weights_spec, remove_files
from xaind.logs import get_logger
from xaind.protocol import ErrorCode, Refusal
from xaind.wire import SAMPLES_BYTES, LocalResultParser, UploadRefused
from xaind.writeback import start_writeback_and_close

T = TypeVar("T")

log = get_logger("xaind.aggregator.upload")

#: Bytes of an upload spooled between two starts of their write-back to disk.
WRITEBACK_STEP_BYTES = 2 * 2**20
#: Bytes kept in memory while the partial file is being created; beyond, the connection is paused.
PENDING_LIMIT = 4 * 2**20


def storage_refusal(participant_id: str, error: OSError) -> Refusal:
    """The answer to an upload the disk refused (full, read-only, permissions), logged once without a traceback."""
    where = f": {error.filename}" if error.filename else ""
    log.error(
        "cannot store the upload of {participant} now ({error}); answered 503, its token stays usable",
        participant=participant_id,
        error=f"{error.strerror or error}{where}",
    )
    return Refusal(
        f"the aggregator cannot store uploads now ({error.strerror or 'disk error'}); upload again later",
        ErrorCode.STORAGE_UNAVAILABLE,
    )


def open_spool(path: str) -> tuple[BinaryIO, BinaryIO]:
    """The partial file, created, and a read handle of its own (blocking: run on a disk thread).

    The read handle lets folds read the upload while its commit renames the file.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    spool = open(path, "wb")
    try:
        reader = open(path, "rb", buffering=0)
    except OSError:
        spool.close()
        remove_files([path])
        raise
    return spool, reader


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
    return read_weights_spec(path, SAMPLES_BYTES)


class Upload:
    """One participant's upload as it streams in: validated chunk by chunk, spooled to disk."""

    def __init__(
        self,
        key: UploadKey,
        path: str,
        max_bytes: int,
        hooks: UploadHooks,
        on_refused: Callable[[Refusal], None] | None = None,
        on_backlog: Callable[[bool], None] | None = None,
    ) -> None:
        """An upload whose file is being created (on a disk thread).

        `on_refused` is told of a refusal that comes from the disk rather than
        a chunk, to answer at once; `on_backlog(True)` asks to pause the body
        while chunks wait for the file, `on_backlog(False)` to go on.
        """
        self.key = key
        self.hooks = hooks
        self.parser = LocalResultParser(max_bytes=max_bytes)
        self.path = path
        self.on_refused = on_refused
        self.on_backlog = on_backlog
        self._file: BinaryIO | None = None
        #: Its own read handle (open once the file is): folds read it while the commit renames the file.
        self.reader: BinaryIO | None = None
        self.refusal: Refusal | None = None
        self.closed = False
        self._spec_checked = False
        self._spooled = 0
        self._written_back = 0  # bytes whose write-back was started
        #: Chunks that came before the file was open, and whether the body was paused for them.
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._backlogged = False
        #: Whether creating the file ended (either way), and who waits for it.
        self._settled = False
        self._waiting: list[Deferred[None]] = []
        hooks.run_on_disk(open_spool, path).addCallbacks(self._spool_opened, self._spool_failed)

    def _spool_opened(self, handles: tuple[BinaryIO, BinaryIO]) -> None:
        spool, reader = handles
        if self.closed:
            # Broken off or refused meanwhile: nothing of it is kept. Nothing was written to the handles, so
            # closing them here costs no I/O, and they are closed even when the disk threads stopped meanwhile
            # (the service stopping); a file left then is removed at the next start-up.
            spool.close()
            reader.close()
            self.hooks.run_on_disk(remove_files, [self.path]).addErrback(self.hooks.step_failed, f"removing {self.path}")
        else:
            self._file, self.reader = spool, reader
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            try:
                for data in pending:
                    self._file.write(data)
            except OSError as error:
                self._refused_by_disk(error)
            else:
                if self._backlogged and self.on_backlog is not None:
                    self.on_backlog(False)
                self._backlogged = False
                if self._spooled - self._written_back >= WRITEBACK_STEP_BYTES:
                    self._start_writeback()
        self._settle()

    def _spool_failed(self, failure: Failure) -> None:
        failure.trap(OSError)
        if not self.closed:
            self._refused_by_disk(failure.value)
        self._settle()

    def _refused_by_disk(self, error: OSError) -> None:
        refusal = storage_refusal(self.participant_id, error)
        self.abort(refusal)
        if self.on_refused is not None:
            self.on_refused(refusal)

    def _settle(self) -> None:
        self._settled = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def _when_settled(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
        if self._settled:
            waiter.callback(None)
        else:
            self._waiting.append(waiter)
        return waiter

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
        self._spooled += len(data)
        if self._file is None:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes > PENDING_LIMIT and not self._backlogged and self.on_backlog is not None:
                self._backlogged = True
                self.on_backlog(True)
            return
        self._file.write(data)
        if self._spooled - self._written_back >= WRITEBACK_STEP_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        """Have the disk start on what arrived so far (the commit's fsync then waits for little)."""
        assert self._file is not None
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
        self._pending, self._pending_bytes = [], 0
        if self._backlogged and self.on_backlog is not None:
            # Read on: the rest of the body is dropped, and the refusal answered at its next chunk.
            self.on_backlog(False)
        self._backlogged = False
        if self._file is None or self.reader is None:
            # The file is still being created: it is removed once it is (`_spool_opened`).
            self.hooks.upload_aborted(self)
            return
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

    def close_files(self) -> None:
        """Close the spool's handles, leaving its file (the service stops; start-up removes leftover spools)."""
        for handle in (self._file, self.reader):
            if handle is not None:
                try:
                    handle.close()
                except OSError:
                    pass

    def finish(self) -> Deferred[None]:
        """The body ended: make the upload durable, keep and fold it, then have the coordinator record it."""
        if not self._settled:
            return self._when_settled().addCallback(lambda _: self.finish())
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
        assert self._file is not None  # settled and not closed: the file is open
        self._file.flush()
        # Still open while the round's rules decide: a refusal (another spec) aborts it meanwhile.
        completing = self.hooks.upload_complete(self)
        self.closed = True
        return completing

    def commit(self, store: ModelStore) -> str:
        """Make the upload durable and keep it as a result (blocking: run on a disk thread)."""
        assert self._file is not None
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            return store.commit_result(self.path, self.round, self.participant_id)
        except OSError:
            if os.path.exists(self.path):
                os.unlink(self.path)
            raise
