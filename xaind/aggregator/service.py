"""The aggregator service: admitted tokens, validated uploads, folding and aggregation.

What the coordinator decides arrives through `admit`, `sync` and
`aggregate`; what participants send arrives through `begin_upload`. Every
disk-heavy or CPU-heavy step runs off the reactor thread, so the reactor
keeps serving downloads and heartbeats while the aggregator works.

The worker (one thread) does what must happen in order: folding, resets of
the running sum, aggregating, installing a model. What only has to be
durable before the coordinator hears of it (the fsync of an upload, whose
write-back starts while it arrives) or may happen any time after (removing
what a new model superseded) runs on `disk` threads beside it: a round's
uploads become durable together while the earlier ones fold. In a
10 x 10 MB round this took the time from the last upload's body to the
aggregated model from ~210 ms to ~70 ms (see bench/).
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import numpy as np
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError, inlineCallbacks
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.spread import pb
from zope.interface import Interface

from xaind.aggregator.backends import AggregationBackend, BackendError
from xaind.aggregator.store import GlobalModel, ModelStore
from xaind.logs import get_logger
from xaind.priority import run_in_background
from xaind.protocol import ErrorCode, Refusal
from xaind.writeback import start_writeback_and_close
from xaind.wire import LocalResultHeader, LocalResultParser, UnacceptableWeights, UploadRefused

log = get_logger("xaind.aggregator.service")

T = TypeVar("T")

ROUND_ENDED = "the round this token was for has ended"

#: Bytes of an upload spooled between two starts of their write-back to disk.
WRITEBACK_STEP_BYTES = 2 * 2**20

# How a call over the coordinator link can fail without the aggregator being at fault.
LINK_ERRORS = (pb.PBConnectionLost, pb.DeadReferenceError, pb.RemoteError, pb.Error, CancelledError, TimeoutError)


class ICoordinator(Interface):
    def end_training(participant_id: str, token: str, success: bool) -> Deferred[bool]:
        """Report a validated upload; fires True once the coordinator recorded it."""

    def is_attached() -> bool:
        """Whether the coordinator link is up (for status)."""


class AggregationRefused(Exception):
    """The coordinator asked for something the aggregator's state does not allow."""


@dataclass(frozen=True)
class WeightsSpec:
    """What every result of a round must look like: the float kind, its width, and the shape."""

    itemsize: int
    shape: tuple[int, ...]

    @classmethod
    def of(cls, dtype: np.dtype, shape: tuple[int, ...]) -> WeightsSpec:
        return cls(itemsize=dtype.itemsize, shape=tuple(shape))

    def describe(self) -> str:
        return f"float{self.itemsize * 8} weights of shape {self.shape}"


def read_model_spec(path: str | None) -> WeightsSpec | None:
    """The spec of a stored global model: the next round's results must match it."""
    if path is None:
        return None
    with open(path, "rb") as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    return WeightsSpec.of(dtype, shape)


def remove_files(paths: list[str]) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class _Reset:
    """A step of the running sum: start again from this global model (or from nothing)."""

    global_model_path: str | None


class WorkerThreads:
    """Threads that run blocking steps off the reactor thread."""

    def __init__(self, reactor: Any, name: str, threads: int) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, function, *args)


class SerialWorker(WorkerThreads):
    """One thread that runs blocking steps one at a time, in the order they were queued.

    It folds and aggregates: CPU-heavy work, run at a lower CPU priority
    (xaind.priority) so that the daemons' reactors stay responsive.
    """

    def __init__(self, reactor: Any, name: str) -> None:
        super().__init__(reactor, name, 1)

    def run(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        return super().run(_in_background, function, *args)


def _in_background(function: Callable[..., T], *args: Any) -> T:
    run_in_background()
    return function(*args)


class DiskThreads(WorkerThreads):
    """A few threads for steps that wait on the disk and need no order among themselves."""

    def __init__(self, reactor: Any, name: str, threads: int = 4) -> None:
        super().__init__(reactor, name, threads)


class Upload:
    """One participant's upload as it streams in: validated chunk by chunk, spooled to disk."""

    def __init__(self, aggregator: AggregatorService, participant_id: str, token: str, round_number: int) -> None:
        self.aggregator = aggregator
        self.participant_id = participant_id
        self.token = token
        self.round = round_number
        self.parser = LocalResultParser(max_bytes=aggregator.max_upload_bytes)
        self.path = aggregator.store.partial_path(round_number, participant_id)
        self._file = open(self.path, "wb")
        #: Its own read handle: folds read it while the commit renames the file.
        self.reader: BinaryIO = open(self.path, "rb", buffering=0)
        self.refusal: UploadRefused | None = None
        self.closed = False
        self.spec_checked = False
        self._spooled = 0
        self._written_back = 0  # bytes whose write-back was started

    def write(self, data: bytes) -> None:
        """Take the next chunk; after a refusal the rest of the body is dropped unread."""
        if self.refusal is not None or self.closed:
            return
        try:
            self.parser.feed(data)
            if self.parser.header is not None and not self.spec_checked:
                self.spec_checked = True
                self.aggregator.check_spec(self.parser.header)
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
        self.aggregator.run_on_disk(start_writeback_and_close, descriptor, offset).addErrback(
            self.aggregator.step_failed, f"starting the write-back of {self.path}")

    def abort(self) -> None:
        """Forget everything received: a broken-off or refused upload changes nothing."""
        if self.closed:
            return
        self.closed = True
        self._file.close()
        self.reader.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.aggregator._upload_ended(self)

    def flush(self) -> None:
        """Hand what is buffered to the kernel, so that the reader sees every byte received."""
        self._file.flush()

    def finish(self) -> Deferred[None]:
        """Make the upload durable, keep and fold it, then have the coordinator record it."""
        return self.aggregator._finish_upload(self)

    def _commit(self, store: ModelStore) -> str:
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


class AggregatorService(Service):
    name = "aggregator"

    def __init__(
        self,
        store: ModelStore,
        backend: AggregationBackend,
        coordinator: ICoordinator,
        clock: IReactorTime,
        *,
        max_upload_bytes: int,
        call_timeout: float,
        worker: SerialWorker,
        disk: DiskThreads,
    ) -> None:
        self.store = store
        self.backend = backend
        self.coordinator = coordinator
        self.clock = clock
        self.max_upload_bytes = max_upload_bytes
        self.call_timeout = call_timeout
        self.worker = worker
        self.disk = disk
        self._disk_steps: set[Deferred[None]] = set()  # each fires when its step ended
        self.model: GlobalModel = store.load()
        #: What this round's results must look like: the global model's spec,
        #: or before the first aggregation the first upload's (all must agree).
        self.spec: WeightsSpec | None = read_model_spec(self.model.path)
        self._admitted: dict[str, str] = {}
        self._accepted: dict[str, str] = {}
        self._uploading: dict[str, Upload] = {}
        self._confirming: set[str] = set()
        self._pending: dict[str, Upload] = {}  # complete uploads, folded, not yet kept
        # Changes of the running sum waiting for the worker (see _queue_sum_step).
        self._sum_steps: list[str | Upload | _Reset] = []
        self._sum_steps_lock = threading.Lock()
        self._draining = False
        self._aggregating = False
        self._recovered = store.stored_results(self.model.round)

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.worker.start()
        self.disk.start()
        self._accepted = dict(self._recovered)
        self._restart_sum()
        log.info(
            "aggregator ready: global model of round {round} ({size} bytes), {results} stored result(s) recovered",
            round=self.model.round,
            size=self.model.size,
            results=len(self._accepted),
        )

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for upload in list(self._uploading.values()):
            upload.abort()
        self.worker.stop()
        self.disk.stop()
        return None

    # -- what the coordinator asks -----------------------------------------------

    def admit(self, participant_id: str, token: str, round_number: int) -> None:
        if round_number != self.model.round:
            raise AggregationRefused(
                f"cannot admit {participant_id} for round {round_number}: the global model is at round {self.model.round}"
            )
        if self._aggregating:
            raise AggregationRefused(f"round {round_number} is being aggregated")
        self._admitted[participant_id] = token

    def sync(self, round_number: int, done: list[str] | None, admitted: dict[str, str]) -> dict[str, Any]:
        """Line up with the coordinator's view after a (re)connection or a repeated round.

        `done` lists the participants whose results the coordinator counts
        (None while it waits for an aggregation: keep everything). Results
        it does not count are dropped; results it counts that are missing
        here are reported, and the coordinator then runs the round again.
        """
        if self.model.round > round_number:
            log.info("the coordinator is at round {theirs}, the global model at {ours}", theirs=round_number, ours=self.model.round)
            return {"model_round": self.model.round, "missing": []}
        if self.model.round < round_number:
            log.warn(
                "the coordinator is at round {theirs} but the global model only at {ours}: continuing from this model",
                theirs=round_number,
                ours=self.model.round,
            )
            had_pending = self._forget_pending()
            if self._accepted:
                self._drop_results(set(self._accepted))
            elif had_pending:
                self._restart_sum()
            self.model = self.store.adopt_round(self.model, round_number)
        self._admitted = dict(admitted)
        if done is None:
            return {"model_round": self.model.round, "missing": []}
        counted = set(done)
        # A result whose report is on its way is neither counted nor refused yet.
        self._drop_results(set(self._accepted) - counted - self._confirming)
        missing = sorted(counted - set(self._accepted))
        if missing:
            log.warn("{count} result(s) the coordinator counts are missing here", count=len(missing))
        return {"model_round": self.model.round, "missing": missing}

    @inlineCallbacks
    def aggregate(self, round_number: int, counted: list[str] | None = None) -> Any:
        """Fold the results of `round_number` into the next global model.

        `counted` (from the coordinator) names the results that count: any
        other is dropped first, and a missing one fails the aggregation (the
        coordinator then runs the round again) instead of leaving it out.
        """
        if round_number == self.model.round - 1:
            return None  # already done; the coordinator did not hear the answer
        if round_number != self.model.round:
            raise AggregationRefused(f"cannot aggregate round {round_number}: the global model is at round {self.model.round}")
        if self._aggregating:
            raise AggregationRefused(f"round {round_number} is already being aggregated")
        if counted is not None:
            missing = set(counted) - set(self._accepted)
            if missing:
                raise AggregationRefused(f"{len(missing)} result(s) the coordinator counts are missing here")
        # Uploads folded but not kept yet do not count: they leave the sum, and are refused once kept.
        had_pending = self._forget_pending()
        uncounted = set(self._accepted) - set(counted) if counted is not None else set()
        if uncounted:
            self._drop_results(uncounted)
        elif had_pending:
            self._restart_sum()
        self._admitted.clear()
        for upload in list(self._uploading.values()):
            upload.abort()
        produced = self.store.new_model_path(round_number + 1)
        self._aggregating = True
        try:
            log.info("aggregating {count} result(s) of round {round}", count=len(self._accepted), round=round_number)
            yield self.worker.run(self.backend.aggregate, produced)
            model = yield self.worker.run(self.store.install_model, produced, round_number + 1)
            spec = yield self.worker.run(read_model_spec, model.path)
            self.run_on_disk(self.store.remove_superseded, model.round).addErrback(
                self.step_failed, f"removing what the model of round {model.round} superseded")
        except BackendError as error:
            log.error("aggregation of round {round} failed: {error}", round=round_number, error=error)
            raise AggregationRefused(str(error)) from None
        finally:
            self._aggregating = False
        self.model = model
        self.spec = spec
        self._accepted.clear()
        self._restart_sum()  # nothing kept or pending: the new model alone
        log.info("global model of round {round} installed ({size} bytes)", round=model.round, size=model.size)
        return None

    # -- what participants send ----------------------------------------------------

    def authorize(self, participant_id: str, token: str) -> None:
        """Refuse unless `token` is the one admitted for `participant_id` (constant time)."""
        expected = self._admitted.get(participant_id)
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            raise Refusal("unknown participant or token", ErrorCode.UNKNOWN_TOKEN)

    def begin_upload(self, participant_id: str, token: str) -> Upload:
        self.authorize(participant_id, token)
        if participant_id in self._accepted:
            raise Refusal("a result was already accepted for this token", ErrorCode.ALREADY_ACCEPTED)
        if participant_id in self._uploading:
            raise Refusal("an upload with this token is already in progress", ErrorCode.UPLOAD_IN_PROGRESS)
        upload = Upload(self, participant_id, token, self.model.round)
        self._uploading[participant_id] = upload
        return upload

    def _upload_ended(self, upload: Upload) -> None:
        if self._uploading.get(upload.participant_id) is upload:
            del self._uploading[upload.participant_id]
        self._release_spec()

    @inlineCallbacks
    def _finish_upload(self, upload: Upload) -> Any:
        """Fold a complete upload while making it durable, then have the coordinator record it.

        The result is folded (queued in the worker) as soon as it is whole,
        and made durable before the coordinator hears of it, so the
        aggregation the coordinator may start at once (this can be the
        round's last result) always includes it. Until it is kept it is "pending": resets of the
        sum fold it again from its reader, and if it is not kept, or the
        round ends first, it leaves the sum. If the coordinator does not
        record it, it is dropped again.
        """
        if upload.refusal is not None:
            raise upload.refusal
        if upload.closed:
            raise Refusal(ROUND_ENDED, ErrorCode.ROUND_ENDED)
        try:
            upload.parser.finish()
        except UploadRefused as refusal:
            upload.abort()
            raise
        upload.closed = True
        participant_id = upload.participant_id
        # Folded while it becomes durable: the fold needs only the bytes at hand.
        upload.flush()
        self._pending[participant_id] = upload
        self._fold(upload)
        kept = False
        try:
            try:
                path = yield self.run_on_disk(upload._commit, self.store)
            except OSError:
                if self._outdated(upload):  # its round's files may be gone already
                    raise Refusal(ROUND_ENDED, ErrorCode.ROUND_ENDED) from None
                raise
            if self._outdated(upload):
                self.run_on_disk(remove_files, [path]).addErrback(self.step_failed, f"removing {path}")
                raise Refusal(ROUND_ENDED, ErrorCode.ROUND_ENDED)
            self._accepted[participant_id] = path
            kept = True
        finally:
            self._settle_pending(upload, kept)
            self._upload_ended(upload)
        self._confirming.add(participant_id)
        try:
            confirming = self.coordinator.end_training(participant_id, upload.token, True)
            confirming.addTimeout(self.call_timeout, self.clock)
            confirmed = yield confirming
        except LINK_ERRORS as error:
            log.warn("could not report {participant}'s result to the coordinator: {error}", participant=participant_id, error=error)
            self._drop_results({participant_id})
            raise Refusal("the coordinator could not be reached; upload again", ErrorCode.COORDINATOR_UNREACHABLE) from None
        finally:
            self._confirming.discard(participant_id)
        if not confirmed:
            self._drop_results({participant_id})
            raise Refusal("the coordinator does not expect a result for this token", ErrorCode.NOT_EXPECTED)
        return None

    def _outdated(self, upload: Upload) -> bool:
        """Whether the round or the token an upload was for ended while it arrived or was made durable."""
        return (
            upload.round != self.model.round
            or self._aggregating
            or self._admitted.get(upload.participant_id) != upload.token
        )

    # -- disk steps --------------------------------------------------------------------

    def run_on_disk(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a blocking step on a disk thread; `settled` waits for it."""
        ended: Deferred[None] = Deferred()
        self._disk_steps.add(ended)

        def done(result: Any) -> Any:
            self._disk_steps.discard(ended)
            ended.callback(None)
            return result

        return self.disk.run(function, *args).addBoth(done)

    def step_failed(self, failure: Failure, what: str) -> None:
        """Log a blocking step that failed off the reactor thread (nothing waits on it)."""
        log.failure("{what} failed", failure, what=what)

    def settled(self) -> Deferred[Any]:
        """Fires once the worker ran every step queued so far and no disk step is running."""
        return DeferredList([self.worker.run(lambda: None), *self._disk_steps])

    # -- downloads ---------------------------------------------------------------------

    def global_model(self) -> GlobalModel:
        return self.model

    # -- folding -------------------------------------------------------------------------

    def _fold(self, source: str | Upload) -> None:
        """Queue the fold of a kept result (its path) or of a pending upload (its reader)."""
        self._queue_sum_step(source)

    def _queue_sum_step(self, step: str | Upload | _Reset) -> None:
        """Queue a change of the running sum; the worker applies them in order, folds in batches.

        One worker job drains the queue until it is empty, so a job queued on
        the worker after a step (an aggregation, a removal) runs after it.
        """
        with self._sum_steps_lock:
            self._sum_steps.append(step)
            if self._draining:
                return
            self._draining = True
        self.worker.run(self._apply_sum_steps).addCallbacks(
            self._log_fold_refusals, self.step_failed, errbackArgs=("changing the running sum",)
        )

    def _apply_sum_steps(self) -> list[tuple[str, Exception]]:
        """In the worker: apply every queued step, consecutive folds together; what failed.

        A failing step is reported and the next ones still run (the backend
        itself refuses what it can no longer fold correctly).
        """
        failed: list[tuple[str, Exception]] = []
        while True:
            with self._sum_steps_lock:
                steps, self._sum_steps = self._sum_steps, []
                if not steps:
                    self._draining = False
                    return failed
            folds: list[tuple[str, BinaryIO | None]] = []
            for step in steps + [None]:
                if folds and not isinstance(step, (str, Upload)):
                    try:
                        outcomes: list[Any] = self.backend.add_results(folds)
                    except Exception as error:  # noqa: BLE001 - a backend's bug must not stop the queue
                        outcomes = [error] * len(folds)
                    failed.extend((name, outcome) for (name, _), outcome in zip(folds, outcomes) if outcome is not None)
                    folds = []
                if isinstance(step, str):
                    folds.append((step, None))
                elif isinstance(step, Upload):
                    folds.append((step.path, step.reader))
                elif isinstance(step, _Reset):
                    try:
                        self.backend.reset(step.global_model_path)
                    except Exception as error:  # noqa: BLE001 - reported like a refused fold
                        failed.append((step.global_model_path or "the global model", error))

    def _log_fold_refusals(self, failed: list[tuple[str, Exception]]) -> None:
        for name, error in failed:
            log.error("folding {path} failed: {error}", path=name, error=error)

    def _restart_sum(self) -> None:
        """Start the running sum again from what counts now: the kept results and the pending uploads."""
        self._queue_sum_step(_Reset(self.model.path))
        for path in self._accepted.values():
            self._fold(path)
        for upload in self._pending.values():
            self._fold(upload)

    def _settle_pending(self, upload: Upload, kept: bool) -> None:
        """A pending upload was kept, or was not and leaves the sum (unless the round's sum is gone already)."""
        if self._pending.get(upload.participant_id) is upload:
            del self._pending[upload.participant_id]
            if not kept:
                self._restart_sum()
        # After every fold of it queued so far.
        self.worker.run(upload.reader.close).addErrback(self.step_failed, f"closing {upload.path}")

    def _forget_pending(self) -> bool:
        """The round's sum is being rebuilt without the pending uploads (they will not be kept)."""
        had_pending = bool(self._pending)
        self._pending.clear()
        return had_pending

    def check_spec(self, header: LocalResultHeader) -> None:
        """Refuse weights unlike the round's; the first upload before any model sets the spec."""
        spec = WeightsSpec.of(header.dtype, header.shape)
        if self.spec is None:
            self.spec = spec
        elif spec != self.spec:
            raise UnacceptableWeights(f"{spec.describe()} refused: this round takes {self.spec.describe()}")

    def _release_spec(self) -> None:
        """Before the first aggregation, forget a spec no kept or arriving result holds any more."""
        if self.model.path is None and not self._accepted and not self._uploading:
            self.spec = None

    def _drop_results(self, participant_ids: set[str]) -> None:
        if not participant_ids:
            return
        paths = [self._accepted.pop(participant_id) for participant_id in participant_ids if participant_id in self._accepted]
        # Removed in the worker, after any fold of them already queued there.
        self.worker.run(remove_files, paths).addErrback(self.step_failed, f"removing {paths}")
        self._restart_sum()
        self._release_spec()

    def status(self) -> dict[str, Any]:
        return {
            "model_round": self.model.round,
            "model_bytes": self.model.size,
            "admitted": len(self._admitted),
            "uploading": len(self._uploading),
            "accepted": len(self._accepted),
            "aggregating": self._aggregating,
            "coordinator_attached": self.coordinator.is_attached(),
        }
