"""The aggregator service: carries out what the round's rules decide.

What the coordinator decides arrives through `admit`, `sync` and
`aggregate`; what participants send arrives through `begin_upload`. The
rules (xaind.aggregator.rules) decide what each event changes and answer
with effects; this service carries them out on threads, the disk, the
running sum and the coordinator link, and decides nothing itself. Every
disk-heavy or CPU-heavy step runs off the reactor thread, so the reactor
keeps serving downloads and heartbeats while the aggregator works.

The worker (one thread, behind the `RunningSum`) does what must happen in
order: folding, resets of the running sum, aggregating, installing a model.
What only has to be durable before the coordinator hears of it (the fsync of
an upload, whose write-back starts while it arrives), may happen any time
after (removing what a new model superseded), or rewrites the state file
when the coordinator is ahead runs on `disk` threads beside it: a round's
uploads become durable together while the earlier ones fold. In a
10 x 10 MB round this took the time from the last upload's body to the
aggregated model from ~210 ms to ~70 ms (see bench/).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    DeferredList,
    DeferredLock,
    TimeoutError,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.spread import pb
from zope.interface import Interface

from xaind.aggregator.backends import AggregationBackend, BackendError
from xaind.aggregator.partial_sum import reduce_partial_sums, write_partial_sum
from xaind.aggregator.metrics import AggregatorMetrics, now
from xaind.aggregator.rules import (
    AbortUploads,
    AdoptRound,
    Aggregate,
    CloseReader,
    Effect,
    FoldUpload,
    RemoveFiles,
    ResetSum,
    Refuse,
    RoundRules,
    UploadKey,
    WeightsSpec,
)
from xaind.aggregator.round_report import AggregationObserver, PrivacySpent, RoundReport
from xaind.aggregator.running_sum import RunningSum
from xaind.aggregator.s3 import ModelStorage, StorageUnavailable, StoredModel
from xaind.aggregator.settings import ShardSettings
from xaind.aggregator.shard_files import LentFiles, fetch_file
from xaind.aggregator.strategies import last_choices
from xaind.aggregator.store import GlobalModel, ModelStore, check_model_file, read_model_spec, remove_files
from xaind.aggregator.threads import DiskThreads, SerialWorker
from xaind.aggregator.upload import Upload, read_result_spec
from xaind.gathering import gather
from xaind.logs import get_logger
from xaind.protocol import ErrorCode, Refusal
from xaind.state import StateFileError

#: Passes `settled` makes at most (each waits for the steps the previous one's started).
SETTLE_PASSES = 100

log = get_logger("xaind.aggregator.service")

T = TypeVar("T")

# How a call over the coordinator link can fail without the aggregator being at fault.
LINK_ERRORS = (pb.PBConnectionLost, pb.DeadReferenceError, pb.RemoteError, pb.Error, CancelledError, TimeoutError)


def _write_partial_sum_file(backend: AggregationBackend, path: str, round_number: int) -> Any:
    """`write_partial_sum` into the round's directory, made if no upload made it (blocking: the worker runs it)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return write_partial_sum(backend, path, round_number)  # type: ignore[arg-type]


class ICoordinator(Interface):
    def end_training(participant_id: str, token: str, success: bool) -> Deferred[bool]:
        """Report a validated upload; fires True once the coordinator recorded it."""

    def is_attached() -> bool:
        """Whether the coordinator link is up (for status)."""


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
        observer: AggregationObserver | None = None,
        metrics: AggregatorMetrics | None = None,
        storage: ModelStorage | None = None,
        shard: ShardSettings | None = None,
        shard_ca_file: str | None = None,
    ) -> None:
        self.store = store
        #: `shard`: one of several aggregators; its round ends through the reduce (docs/scale.rst). None: the only one.
        self.shard = shard
        #: Trusted for fetches from other shards over https (the link's CA bundle); None: the system's.
        self.shard_ca_file = shard_ca_file
        #: What this shard lends the others for a round's end: its partial sum, the reduced model.
        self.lent = LentFiles()
        #: This shard's partial sum: (round, path), from the last `partial_sum` until a model is installed.
        self._partial_sum: tuple[int, str] | None = None
        self._reducing = False
        #: `storage.s3`: each installed model is uploaded there and its downloads redirected to it (docs/scale.rst).
        self.storage = storage
        #: The model file complete in the bucket, newest first (None until an upload completed).
        self._stored: StoredModel | None = None
        self._stored_before: StoredModel | None = None
        #: Reports each aggregation (update norms, choices, privacy spent); none: nothing beyond the model.
        self.observer = observer
        self.last_report: RoundReport | None = None
        self.privacy_spent: PrivacySpent | None = None
        self.backend = backend
        self.coordinator = coordinator
        self.clock = clock
        self.max_upload_bytes = max_upload_bytes
        self.call_timeout = call_timeout
        self.worker = worker
        self.disk = disk
        #: Counters and histograms of uploads, downloads, folds and aggregations; its collector reads the state at scrape time.
        self.metrics = metrics if metrics is not None else AggregatorMetrics()
        self.running_sum = RunningSum(backend, worker, self.metrics)
        self._disk_steps: set[Deferred[None]] = set()  # each fires when its step ended
        #: Writes of the state file, one at a time and in order (adoptions, installs).
        self._state_file = DeferredLock()
        #: Aggregation reports (update norms, privacy spent), one at a time and in order.
        self._reporting = DeferredLock()
        self.model: GlobalModel = store.load()
        self.rules = RoundRules(self.model.round, self.model.path, read_model_spec(self.model.path))
        self._uploads: dict[UploadKey, Upload] = {}  # every upload whose reader is open
        self._recovered = store.stored_results(self.model.round)
        #: Before the first aggregation the recovered results fix the spec (they share it).
        self._recovered_spec = self._spec_of_results(self._recovered) if self.model.path is None else None
        self.metrics.watch(self)

    # -- life cycle ------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.worker.start()
        self.disk.start()
        self._apply(self.rules.restart(self._recovered, self._recovered_spec))
        if self.observer is not None and self.observer.privacy is not None:
            self.privacy_spent = self.observer.privacy_spent(self.model.round)
        self._store_remotely(self.model)
        log.info(
            "aggregator ready: global model of round {round} ({size} bytes), {results} stored result(s) recovered",
            round=self.model.round,
            size=self.model.size,
            results=len(self._recovered),
        )

    @staticmethod
    def _spec_of_results(results: dict[str, str]) -> WeightsSpec | None:
        """The spec of the first readable result (a start-up metadata read); None if there is none."""
        for path in sorted(results.values()):
            try:
                return read_result_spec(path)
            except (OSError, ValueError) as error:
                log.warn("cannot read the header of the stored result {path}: {error}", path=path, error=error)
        return None

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        for upload in list(self._uploads.values()):
            upload.abort()
            upload.close_files()  # a complete one, still settling, keeps them open otherwise
        self.worker.stop()
        self.disk.stop()
        return None

    @property
    def spec(self) -> WeightsSpec | None:
        """What this round's results must look like (None: the first upload decides)."""
        return self.rules.spec

    # -- carrying out effects -------------------------------------------------------

    def _apply(self, effects: Sequence[Effect], refuse: bool = True) -> list[Deferred[Any]]:
        """Carry out `effects` in order; what to wait for. A `Refuse` is raised (unless `refuse` is false)."""
        waits: list[Deferred[Any]] = []
        for effect in effects:
            match effect:
                case ResetSum(model_path=model_path, kept=kept, pending=pending):
                    self.running_sum.reset(model_path)
                    for path in kept:
                        self.running_sum.fold(path)
                    for key in pending:
                        self._fold_upload(key)
                case FoldUpload(upload=key):
                    self._fold_upload(key)
                case CloseReader(upload=key):
                    upload = self._uploads.pop(key)
                    self.running_sum.then(upload.reader.close).addErrback(self.step_failed, f"closing {upload.path}")
                case RemoveFiles(paths=paths, after_folds=True):
                    self.running_sum.then(remove_files, list(paths)).addErrback(self.step_failed, f"removing {list(paths)}")
                case RemoveFiles(paths=paths, after_folds=False):
                    self.run_on_disk(remove_files, list(paths)).addErrback(self.step_failed, f"removing {list(paths)}")
                case AbortUploads(uploads=keys, refusal=refusal):
                    for key in keys:
                        if key in self._uploads:
                            self._uploads[key].abort(None if refusal is None else refusal.refusal())
                case AdoptRound(round=round_number):
                    waits.append(self._adopt_round(round_number))
                case Aggregate(round=round_number, partial=True):
                    waits.append(self._write_partial_sum(round_number))
                case Aggregate(round=round_number):
                    waits.append(self._aggregate(round_number))
                case Refuse():
                    if refuse:
                        raise effect.refusal()
        return waits

    def _fold_upload(self, key: UploadKey) -> None:
        upload = self._uploads[key]
        self.running_sum.fold(upload.path, upload.reader)

    def _adopt_round(self, round_number: int) -> Deferred[GlobalModel]:
        """Rewrite the state file on a disk thread, after any earlier write of it."""

        relabelled = self.model

        def adopt() -> Deferred[GlobalModel]:
            if self.model.path != relabelled.path:
                # A model installed meanwhile is the later word (as if this came before it).
                return succeed(self.model)
            return self.run_on_disk(self.store.adopt_round, relabelled, round_number)

        def adopted(model: GlobalModel) -> GlobalModel:
            if self.model.path == model.path:
                self.model = model
            return model

        return self._state_file.run(adopt).addCallback(adopted)

    @inlineCallbacks
    def _aggregate(self, round_number: int) -> Any:
        produced = self.store.new_model_path(round_number + 1)
        counted, started_from = dict(self.rules.kept), self.model.path
        began = now()
        try:
            log.info("aggregating {count} result(s) of round {round}", count=len(self.rules.kept), round=round_number)
            yield self.running_sum.then(self.backend.aggregate, produced)
            log.debug("round {round} averaged into {path}: installing it", round=round_number, path=produced)
            yield self._state_file.acquire()  # after any rewrite of the state file asked for before
            try:
                model = yield self.running_sum.then(self.store.install_model, produced, round_number + 1)
                self.model = model
            finally:
                self._state_file.release()
            spec = yield self.running_sum.then(read_model_spec, model.path)
            self._observe(round_number, counted, started_from, model)
        except BackendError as error:
            log.error("aggregation of round {round} failed: {error}", round=round_number, error=error)
            self.rules.aggregation_failed()
            self.metrics.aggregation_failed()
            raise Refusal(str(error), ErrorCode.AGGREGATION_FAILED) from None
        except Exception:
            self.rules.aggregation_failed()
            self.metrics.aggregation_failed()
            raise
        self.metrics.aggregated(len(counted), now() - began)
        self._apply(self.rules.aggregation_done(model.path, spec))  # nothing kept or pending: the new model alone
        yield self._stored_remotely(model)
        log.info("global model of round {round} installed ({size} bytes)", round=model.round, size=model.size)
        return None

    def _observe(self, round_number: int, counted: dict[str, str], started_from: str | None, model: GlobalModel) -> None:
        """Report the aggregation from its files, then remove what the model superseded (those files among them).

        Nothing waits on either: the next round starts meanwhile.
        """
        observed: Deferred[Any] = succeed(None)
        observer = self.observer
        if observer is not None and observer.active:
            # What the backend chose is read on the worker, before the next round's folds change it; the report
            # (every result read once) runs on a disk thread beside them. Reports run one at a time, so that
            # the removal after one never takes the files of the one before.
            choices = self.running_sum.then(last_choices, self.backend)

            def report() -> Deferred[Any]:
                return choices.addCallback(
                    lambda chosen: self.run_on_disk(observer.observe, chosen, round_number, counted, started_from, model))

            observed = self._reporting.run(report)
            observed.addCallbacks(self._observed, self.step_failed, errbackArgs=(f"reporting the aggregation of round {round_number}",))

        def remove(_: object) -> None:
            self.run_on_disk(self.store.remove_superseded, model.round).addErrback(
                self.step_failed, f"removing what the model of round {model.round} superseded")

        observed.addCallback(remove)

    def _observed(self, observed: tuple[RoundReport | None, PrivacySpent | None]) -> None:
        report, spent = observed
        if report is not None:
            self.last_report = report
            report.log()
        if spent is not None:
            self.privacy_spent = spent
            log.info(
                "privacy spent after {rounds} round(s): epsilon {epsilon:.4g} at delta {delta:g}",
                rounds=spent.rounds, epsilon=spent.epsilon, delta=spent.delta,
            )

    def _store_remotely(self, model: GlobalModel, if_absent: bool = False) -> Deferred[None] | None:
        """Upload `model` to `storage.s3` on a disk thread; downloads are served here until it is complete there.

        Fires when the upload ended, whether it worked or not (None: nothing to upload). A failed
        upload is one warning; the next aggregation tries again with its model.
        """
        if self.storage is None or model.path is None:
            return None
        storage = self.storage

        def stored(result: StoredModel) -> None:
            if self.model.path != result.path:
                log.info("model of round {round} uploaded after a newer one was installed: not used", round=model.round)
                self.run_on_disk(storage.remove, result).addErrback(self._storage_failed, model.round, "removing")
                return
            superseded, self._stored_before, self._stored = self._stored_before, self._stored, result
            log.info("model of round {round} in the bucket: downloads redirected to {key}", round=model.round, key=result.key)
            if superseded is not None and superseded.key != result.key:
                # The one before stays: a download redirected a moment ago may still be reading it.
                self.run_on_disk(storage.remove, superseded).addErrback(self._storage_failed, model.round, "removing an old model for")

        return self.run_on_disk(storage.upload, model, if_absent).addCallbacks(
            stored, self._storage_failed, errbackArgs=(model.round, "uploading"))

    def _stored_remotely(self, model: GlobalModel, if_absent: bool = False) -> Deferred[None]:
        """`_store_remotely`, waited for at most `upload_wait`: the next round's downloads then all go to the bucket."""
        uploaded = self._store_remotely(model, if_absent)
        if uploaded is None or self.storage is None or self.storage.settings.upload_wait <= 0:
            return succeed(None)
        return self._at_most(uploaded, self.storage.settings.upload_wait)

    def _at_most(self, step: Deferred[None], seconds: float) -> Deferred[None]:
        """Fires when `step` does or after `seconds`, whichever is first; `step` goes on either way."""
        waited: Deferred[None] = Deferred()

        def end(_: object = None) -> None:
            if not waited.called:
                waited.callback(None)

        timer = self.clock.callLater(seconds, end)
        step.addBoth(end)
        waited.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return waited

    def _storage_failed(self, failure: Failure, round_number: int, what: str) -> None:
        if failure.check(StorageUnavailable, OSError):
            log.warn("{what} the model of round {round} in storage.s3 failed, downloads served here: {error}",
                     what=what, round=round_number, error=failure.value)
        else:
            self.step_failed(failure, f"{what} the model of round {round_number} in storage.s3")

    def download_url(self) -> str | None:
        """Where a download of the current model is redirected (a presigned URL), or None: served here."""
        stored = self._stored
        if self.storage is None or stored is None or stored.path != self.model.path:
            return None
        return self.storage.download_url(stored)

    # -- what the coordinator asks -----------------------------------------------

    def admit(self, participant_id: str, token: str, round_number: int) -> None:
        self.rules.admit(participant_id, token, round_number)
        log.debug("admitted {participant} for round {round}", participant=participant_id, round=round_number)

    def sync(self, round_number: int, done: list[str] | None, admitted: dict[str, str]) -> Deferred[dict[str, Any]]:
        """Line up with the coordinator's view after a (re)connection or a repeated round (see RoundRules.sync).

        Fires once a new round the coordinator is at is written to the state file.
        """
        ours = self.rules.model_round
        if ours > round_number:
            log.info("the coordinator is at round {theirs}, the global model at {ours}", theirs=round_number, ours=ours)
        elif ours < round_number:
            log.warn(
                "the coordinator is at round {theirs} but the global model only at {ours}: continuing from this model",
                theirs=round_number,
                ours=ours,
            )
        answer = self.rules.sync(round_number, done, admitted)
        waits = self._apply(answer.effects)
        if answer.missing:
            log.warn("{count} result(s) the coordinator counts are missing here", count=len(answer.missing))
        result = {"model_round": answer.model_round, "missing": answer.missing}
        if not waits:
            return succeed(result)
        return waits[-1].addCallback(lambda _: result)

    def aggregate(self, round_number: int, counted: list[str] | None = None) -> Deferred[None]:
        """Fold the results of `round_number` into the next global model (see RoundRules.aggregate)."""
        try:
            waits = self._apply(self.rules.aggregate(round_number, counted))
        except Refusal as refusal:
            return fail(refusal)
        return waits[-1] if waits else succeed(None)

    # -- what the coordinator asks of a shard (docs/scale.rst, Sharded aggregation) -----

    def shard_info(self) -> dict[str, Any]:
        """Who this shard is, for the coordinator that it just logged in to."""
        if self.shard is None:
            raise Refusal("this aggregator is not configured as a shard (shard.name)", ErrorCode.BAD_REQUEST)
        return {
            "name": self.shard.name,
            "url": self.shard.url,
            "weight": self.shard.weight,
            "model_round": self.model.round,
            "etag": self.model.etag,
        }

    def partial_sum(self, round_number: int, counted: list[str], token: str) -> Deferred[dict[str, Any]]:
        """Write this shard's running sum of `round_number` (of exactly `counted`), and lend it under `token`."""
        try:
            waits = self._apply(self.rules.aggregate(round_number, counted, partial=True))
        except Refusal as refusal:
            return fail(refusal)

        def lend(written: dict[str, Any]) -> dict[str, Any]:
            assert self._partial_sum is not None
            self.lent.lend(token, self._partial_sum[1])
            return written

        return waits[-1].addCallback(lend)

    @inlineCallbacks
    def _write_partial_sum(self, round_number: int) -> Any:
        path = self.store.shard_sum_path(round_number, f"own-{self.shard.name if self.shard else 'shard'}")
        try:
            header = yield self.running_sum.then(_write_partial_sum_file, self.backend, path, round_number)
        except BackendError as error:
            self.rules.aggregation_failed()
            log.error("writing the partial sum of round {round} failed: {error}", round=round_number, error=error)
            raise Refusal(str(error), ErrorCode.AGGREGATION_FAILED) from None
        except Exception:
            self.rules.aggregation_failed()
            raise
        self.rules.partial_written()
        self._partial_sum = (round_number, path)
        log.info("partial sum of round {round} written: {results} result(s), {samples} sample(s)",
                 round=round_number, results=header.results, samples=header.samples)
        return {"results": header.results, "samples": header.samples}

    @inlineCallbacks
    def reduce(self, round_number: int, sources: list[str | None], token: str) -> Any:
        """The reducer's part: add every shard's partial sum in shard order into the model of `round_number + 1`.

        `sources` lists the shards in order: None for this shard's own partial
        sum, else the URL another shard lends its partial sum at. The model is
        installed here, then lent under `token` for the other shards to install.
        """
        if self._partial_sum is None or self._partial_sum[0] != round_number or self.rules.model_round != round_number:
            raise Refusal(f"no partial sum of round {round_number} here to reduce", ErrorCode.WRONG_ROUND)
        if self._reducing:
            raise Refusal(f"round {round_number} is already being reduced", ErrorCode.AGGREGATING)
        self._reducing = True
        began = now()
        try:
            own = self._partial_sum[1]
            paths: list[str] = []
            fetches: list[Deferred[int]] = []
            for index, source in enumerate(sources):
                if source is None:
                    paths.append(own)
                    continue
                path = self.store.shard_sum_path(round_number, f"fetched-{index}")
                paths.append(path)
                fetches.append(self.run_on_disk(fetch_file, source, path, self.shard_ca_file))
            if own not in paths:
                raise Refusal("the reduce must include this shard's own partial sum", ErrorCode.BAD_REQUEST)
            try:
                yield gather(fetches)
                produced = self.store.new_model_path(round_number + 1)
                reduced = yield self.running_sum.then(functools.partial(reduce_partial_sums, round_number=round_number), paths, produced)
            except (BackendError, OSError) as error:
                log.error("the reduce of round {round} failed: {error}", round=round_number, error=error)
                raise Refusal(str(error), ErrorCode.AGGREGATION_FAILED) from None
            model = yield self._install(produced, round_number + 1, None)
        finally:
            self._reducing = False
        self.metrics.aggregated(reduced.results, now() - began)
        self.lent.lend(token, model.path)
        log.info("round {round} reduced from {shards} partial sum(s) into the model of round {model_round}",
                 round=round_number, shards=len(sources), model_round=model.round)
        return {"model_round": model.round, "etag": model.etag, "results": reduced.results}

    @inlineCallbacks
    def install_from(self, model_round: int, url: str, etag: str) -> Any:
        """Fetch the model of `model_round` another shard lends at `url`, and install it under its `etag`."""
        if model_round < self.rules.model_round:
            raise Refusal(
                f"cannot install the model of round {model_round}: the global model is at round {self.rules.model_round}",
                ErrorCode.WRONG_ROUND,
            )
        if self.model.round == model_round and self.model.etag == etag:
            return {"model_round": model_round, "etag": etag}
        produced = self.store.new_model_path(model_round)
        try:
            yield self.run_on_disk(fetch_file, url, produced, self.shard_ca_file)
            yield self.run_on_disk(check_model_file, produced)
        except (OSError, StateFileError) as error:
            log.error("installing the model of round {round} from another shard failed: {error}", round=model_round, error=error)
            raise Refusal(str(error), ErrorCode.AGGREGATION_FAILED) from None
        model = yield self._install(produced, model_round, etag)
        log.info("model of round {round} installed from another shard ({size} bytes)", round=model.round, size=model.size)
        return {"model_round": model.round, "etag": model.etag}

    def lend_model(self, token: str) -> dict[str, Any]:
        """Lend the current model under `token`, for a shard that missed its install (it rejoined)."""
        if self.model.path is None:
            raise Refusal("no global model yet (round 0): nothing to lend", ErrorCode.WRONG_ROUND)
        self.lent.lend(token, self.model.path)
        return {"model_round": self.model.round, "etag": self.model.etag}

    @inlineCallbacks
    def _install(self, produced: str, model_round: int, etag: str | None) -> Any:
        """Install a model the reduce produced (here or elsewhere): the round starts from it alone."""
        yield self._state_file.acquire()  # after any rewrite of the state file asked for before
        try:
            model = yield self.running_sum.then(self.store.install_model, produced, model_round, etag)
            self.model = model
        finally:
            self._state_file.release()
        spec = yield self.running_sum.then(read_model_spec, model.path)
        self._partial_sum = None
        self._apply(self.rules.model_installed(model.round, model.path, spec))
        # Every shard installs the same model under the same ETag: the first one uploaded it already.
        yield self._stored_remotely(model, if_absent=etag is not None)
        self.run_on_disk(self.store.remove_superseded, model.round).addErrback(
            self.step_failed, f"removing what the model of round {model.round} superseded")
        return model

    # -- what participants send ----------------------------------------------------

    def authorize(self, participant_id: str, token: str) -> None:
        """Refuse unless `token` is the one admitted for `participant_id` (constant time)."""
        self.rules.authorize(participant_id, token)

    def begin_upload(
        self,
        participant_id: str,
        token: str,
        on_refused: Callable[[Refusal], None] | None = None,
        on_backlog: Callable[[bool], None] | None = None,
    ) -> Upload:
        """A new upload (its file created on a disk thread; see `Upload` for the two callbacks)."""
        key = self.rules.begin_upload(participant_id, token)
        path = self.store.partial_path(key.round, participant_id, key.number)
        upload = Upload(key, path, self.max_upload_bytes, self, on_refused, on_backlog)
        self._uploads[key] = upload
        return upload

    # UploadHooks: what an Upload asks of the aggregator.

    def check_spec(self, key: UploadKey, spec: WeightsSpec) -> None:
        self.rules.check_spec(key, spec)

    def upload_aborted(self, upload: Upload) -> None:
        self._uploads.pop(upload.key, None)
        self.rules.upload_aborted(upload.key)

    @inlineCallbacks
    def upload_complete(self, upload: Upload) -> Any:
        """Fold a complete upload while making it durable, then have the coordinator record it.

        The result is folded (queued in the worker) as soon as it is whole,
        and made durable before the coordinator hears of it, so the
        aggregation the coordinator may start at once (this can be the
        round's last result) always includes it.
        """
        key = upload.key
        spec = upload.spec
        assert spec is not None  # a complete upload has its header
        self._apply(self.rules.upload_complete(key, spec))
        log.debug("upload of {participant} complete: folding it while making it durable", participant=key.participant_id)
        try:
            path = yield self.run_on_disk(upload.commit, self.store)
        except OSError:
            self._apply(self.rules.upload_not_kept(key))  # ROUND_ENDED if its round's files may be gone already
            raise
        except Exception:
            self._apply(self.rules.upload_not_kept(key), refuse=False)
            raise
        self._apply(self.rules.upload_kept(key, path))
        log.debug("result of {participant} durable: reporting it to the coordinator", participant=key.participant_id)
        try:
            confirming = self.coordinator.end_training(key.participant_id, key.token, True)
            confirming.addTimeout(self.call_timeout, self.clock)
            confirmed = yield confirming
        except LINK_ERRORS as error:
            log.warn("could not report {participant}'s result to the coordinator: {error}", participant=key.participant_id, error=error)
            self._apply(self.rules.not_confirmed(key.participant_id, unreachable=True))
            return None
        except Exception:
            self.rules.confirmed(key.participant_id)  # no longer on its way; what it means is unknown
            raise
        if confirmed:
            log.debug("result of {participant} recorded by the coordinator", participant=key.participant_id)
            self._apply(self.rules.confirmed(key.participant_id))
        else:
            self._apply(self.rules.not_confirmed(key.participant_id, unreachable=False))
        return None

    # -- disk steps --------------------------------------------------------------------

    def run_on_disk(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run a blocking step on a disk thread; `settled` waits for it, and for what its callbacks start."""
        ended: Deferred[None] = Deferred()
        self._disk_steps.add(ended)
        outcome: Deferred[T] = Deferred()

        def done(result: Any) -> None:
            # The caller's callbacks first: the steps they start are under way before this one counts as ended.
            outcome.callback(result)
            self._disk_steps.discard(ended)
            ended.callback(None)

        self.disk.run(function, *args).addBoth(done)
        return outcome

    def step_failed(self, failure: Failure, what: str) -> None:
        """Log a blocking step that failed off the reactor thread (nothing waits on it)."""
        log.failure("{what} failed", failure, what=what)

    @inlineCallbacks
    def settled(self) -> Any:
        """Fires once the worker ran every step queued so far and no disk step is running (nor one they started)."""
        for _ in range(SETTLE_PASSES):
            yield DeferredList([self.worker.run(lambda: None), *self._disk_steps])
            if not self._disk_steps:
                return None
        return None

    # -- downloads and status ------------------------------------------------------------

    def global_model(self) -> GlobalModel:
        return self.model

    def status(self) -> dict[str, Any]:
        return {
            "model_round": self.model.round,
            "model_bytes": self.model.size,
            "admitted": len(self.rules.admitted),
            "uploading": len(self.rules.uploading),
            "accepted": len(self.rules.kept),
            "aggregating": self.rules.aggregating,
            "coordinator_attached": self.coordinator.is_attached(),
            "strategy": None if self.observer is None else self.observer.strategy,
            "last_aggregation": None if self.last_report is None else self.last_report.status(),
            "privacy": None if self.privacy_spent is None else self.privacy_spent.status(),
        }
