"""The rules of the aggregator's round: events in, effects out.

`RoundRules` holds what the aggregator knows of its round (the model's
round, admitted tokens, uploads in flight, results pending and kept, results
being confirmed with the coordinator, the weights spec) and decides what
each event changes. It does nothing itself: it returns effects (frozen
dataclasses below) in the order they must be carried out, or raises a
`Refusal` with a code. `xaind.aggregator.service` carries the effects out on
threads, the disk and the coordinator link. No reactor, no threads here, so
the rules can be checked step by step and by a hypothesis state machine
(tests/test_aggregator_rules_properties.py).

The running sum the effects describe always holds the round's model plus
the kept and the pending results, each once: a pending result (complete,
folded while it is being made durable) that is not kept, a kept result the
coordinator does not record, and any result the coordinator does not count
leave it again by a `ResetSum`.

The weights spec (the shape every result of the round must have) is the
global model's; before the first aggregation it is fixed by the first
*complete* upload (or by the results recovered at a restart), never by an
upload still arriving: a participant that sends a header of another shape
and trickles its body cannot lock the others out. Uploads of another shape
still arriving when the spec becomes fixed are refused then; a header of
another shape that arrives later is refused at once. Any float width is
accepted (the backends convert), so the width is no part of the spec.
"""

from __future__ import annotations

import hmac
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

from xaind.protocol import ErrorCode, Refusal
from xaind.wire import UnacceptableWeights

ROUND_ENDED = "the round this token was for has ended"


@dataclass(frozen=True)
class WeightsSpec:
    """What every result of a round must look like: its shape.

    The wire format admits float16, float32 and float64 in either byte
    order; the backends convert each result to the round's float type, so a
    float32 participant is not refused when the model is float64 (as the
    seed's Python aggregator makes it).
    """

    shape: tuple[int, ...]

    @classmethod
    def of(cls, dtype: Any, shape: tuple[int, ...]) -> WeightsSpec:
        """The spec of weights of `dtype` and `shape` (any accepted float type: the width does not count)."""
        return cls(shape=tuple(int(n) for n in shape))

    def describe(self) -> str:
        return f"weights of shape {self.shape}"


@dataclass(frozen=True)
class UploadKey:
    """One upload: whose, with which token, for which round; `number` tells repeated uploads apart."""

    participant_id: str
    token: str
    round: int
    number: int


# -- effects -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ResetSum:
    """Start the running sum again from the model, then fold the kept results and the pending uploads."""

    model_path: str | None
    kept: tuple[str, ...]
    pending: tuple[UploadKey, ...]


@dataclass(frozen=True)
class FoldUpload:
    """Fold a complete upload from what it received (it is being made durable meanwhile)."""

    upload: UploadKey


@dataclass(frozen=True)
class CloseReader:
    """The upload's reader is no longer needed: close it after every fold queued so far."""

    upload: UploadKey


@dataclass(frozen=True)
class RemoveFiles:
    """Remove files: after the folds queued so far (`after_folds`), or at once on a disk thread."""

    paths: tuple[str, ...]
    after_folds: bool = True


@dataclass(frozen=True)
class AbortUploads:
    """Break off these uploads: what they received is forgotten; each is answered `refusal` if given."""

    uploads: tuple[UploadKey, ...]
    refusal: Refuse | None = None


@dataclass(frozen=True)
class AdoptRound:
    """Relabel the global model as the one of `round` in the state file (the coordinator is ahead)."""

    round: int


@dataclass(frozen=True)
class Aggregate:
    """Fold the running sum into the model of `round + 1` and install it.

    `partial`: a shard's part instead: write the running sum as its partial
    sum, which the reduce adds to the other shards' (docs/scale.rst).
    """

    round: int
    partial: bool = False


@dataclass(frozen=True)
class Refuse:
    """Answer the request that caused the event with this refusal, after the effects before it."""

    code: ErrorCode
    message: str

    def refusal(self) -> Refusal:
        return Refusal(self.message, self.code)


Effect = Union[ResetSum, FoldUpload, CloseReader, RemoveFiles, AbortUploads, AdoptRound, Aggregate, Refuse]


@dataclass(frozen=True)
class SyncAnswer:
    """What `sync` answers the coordinator, and the effects to carry out first."""

    effects: list[Effect]
    model_round: int
    missing: list[str]


class RoundRules:
    """The aggregator's round as a pure state machine (see the module docstring)."""

    def __init__(self, model_round: int, model_path: str | None, spec: WeightsSpec | None) -> None:
        self.model_round = model_round
        self.model_path = model_path
        #: What this round's results must look like: the global model's spec, or before
        #: the first aggregation that of the recovered or the first complete results.
        self.spec = spec
        #: The specs of the uploads still arriving whose header was accepted.
        self.arriving: dict[UploadKey, WeightsSpec] = {}
        self.admitted: dict[str, str] = {}
        self.kept: dict[str, str] = {}  # durable results, by participant id
        self.uploading: dict[str, UploadKey] = {}
        self.pending: dict[str, UploadKey] = {}  # complete uploads, folded, not yet kept
        #: Complete uploads not settled yet (kept or not), pending or forgotten by an aggregation.
        self.completing: dict[str, UploadKey] = {}
        self.confirming: set[str] = set()
        self.aggregating = False
        self._aggregated_round = model_round
        self._numbers = itertools.count()

    # -- start ------------------------------------------------------------------------------

    def restart(self, recovered: dict[str, str], recovered_spec: WeightsSpec | None = None) -> list[Effect]:
        """Start from the results kept on disk for the model's round (of `recovered_spec`)."""
        self.kept = dict(recovered)
        if self.spec is None and recovered:
            self.spec = recovered_spec
        return [self._reset_sum()]

    # -- what the coordinator asks ------------------------------------------------------------

    def admit(self, participant_id: str, token: str, round_number: int) -> None:
        if round_number != self.model_round:
            raise Refusal(
                f"cannot admit {participant_id} for round {round_number}: the global model is at round {self.model_round}",
                ErrorCode.WRONG_ROUND,
            )
        if self.aggregating:
            raise Refusal(f"round {round_number} is being aggregated", ErrorCode.AGGREGATING)
        self.admitted[participant_id] = token

    def sync(self, round_number: int, done: list[str] | None, admitted: dict[str, str]) -> SyncAnswer:
        """Line up with the coordinator's view after a (re)connection or a repeated round.

        `done` lists the participants whose results the coordinator counts
        (None while it waits for an aggregation: keep everything). Results
        it does not count are dropped; results it counts that are missing
        here are reported, and the coordinator then runs the round again.
        """
        if self.model_round > round_number:
            return SyncAnswer([], self.model_round, [])
        effects: list[Effect] = []
        if self.model_round < round_number:
            had_pending = self._forget_pending()
            if self.kept:
                effects += self._drop_results(set(self.kept))
            elif had_pending:
                effects.append(self._reset_sum())
            self.model_round = round_number
            effects.append(AdoptRound(round_number))
        self.admitted = dict(admitted)
        if done is None:
            return SyncAnswer(effects, self.model_round, [])
        counted = set(done)
        # A result whose report is on its way is neither counted nor refused yet.
        effects += self._drop_results(set(self.kept) - counted - self.confirming)
        return SyncAnswer(effects, self.model_round, sorted(counted - set(self.kept)))

    def aggregate(self, round_number: int, counted: list[str] | None = None, partial: bool = False) -> list[Effect]:
        """Start aggregating `round_number`; no effects if it was aggregated already.

        `counted` (from the coordinator) names the results that count: any
        other is dropped first, and a missing one refuses the aggregation
        (the coordinator then runs the round again) instead of leaving it out.
        A `partial` aggregation (a shard's part) is never "done already": its
        model comes from the reduce, so a shard past the round refuses it.
        """
        if round_number == self.model_round - 1 and not partial:
            return []  # already done; the coordinator did not hear the answer
        if round_number != self.model_round:
            raise Refusal(
                f"cannot aggregate round {round_number}: the global model is at round {self.model_round}",
                ErrorCode.WRONG_ROUND,
            )
        if self.aggregating:
            raise Refusal(f"round {round_number} is already being aggregated", ErrorCode.AGGREGATING)
        if counted is not None:
            missing = set(counted) - set(self.kept)
            if missing:
                raise Refusal(f"{len(missing)} result(s) the coordinator counts are missing here", ErrorCode.RESULTS_MISSING)
        effects: list[Effect] = []
        # Complete uploads still being made durable stay "uploading" until they settle, so that
        # no second upload of the same participant writes the same result file meanwhile.
        completing = dict(self.completing)
        # Uploads folded but not kept yet do not count: they leave the sum, and are refused once kept.
        had_pending = self._forget_pending()
        uncounted = set(self.kept) - set(counted) if counted is not None else set()
        if uncounted:
            effects += self._drop_results(uncounted)
        elif had_pending:
            effects.append(self._reset_sum())
        self.admitted.clear()
        streaming = tuple(key for key in self.uploading.values() if key.participant_id not in completing)
        if streaming:
            effects.append(AbortUploads(streaming))
            for key in streaming:
                self._upload_ended(key)
        self.aggregating = True
        self._aggregated_round = round_number
        effects.append(Aggregate(round_number, partial))
        return effects

    def aggregation_done(self, model_path: str, spec: WeightsSpec | None) -> list[Effect]:
        """The model of the next round is installed: the round starts from it alone.

        The install is the last word on the model's round, even when a sync
        adopted a later round while the aggregation ran.
        """
        self.aggregating = False
        self.model_round = self._aggregated_round + 1
        self.model_path = model_path
        self.spec = spec
        self.kept.clear()
        return [self._reset_sum()]

    def aggregation_failed(self) -> None:
        """Nothing changed: the results stay, and the coordinator may ask again."""
        self.aggregating = False

    def partial_written(self) -> None:
        """A shard's partial sum is written: its results stay (a failed reduce asks again) until a model is installed.

        No upload can start meanwhile: the aggregation cleared the tokens,
        and the coordinator admits none before the next round or a repeat.
        """
        self.aggregating = False

    def model_installed(self, model_round: int, model_path: str, spec: WeightsSpec | None) -> list[Effect]:
        """A model made by the reduce (here or on another shard) is the global model of `model_round`.

        Whatever this shard held of an earlier round is dropped: the model
        already counts it. The round then starts from the model alone, as
        after `aggregation_done`.
        """
        if model_round < self.model_round:
            raise Refusal(
                f"cannot install the model of round {model_round}: the global model is at round {self.model_round}",
                ErrorCode.WRONG_ROUND,
            )
        effects: list[Effect] = []
        # As in `aggregate`: complete uploads settle by themselves, refused as of an ended round.
        streaming = tuple(key for key in self.uploading.values() if key.participant_id not in self.completing)
        if streaming:
            effects.append(AbortUploads(streaming))
            for key in streaming:
                self._upload_ended(key)
        self._forget_pending()
        paths = tuple(self.kept.values())
        self.kept.clear()
        if paths:
            effects.append(RemoveFiles(paths))
        self.admitted.clear()
        self.aggregating = False
        self.model_round = model_round
        self._aggregated_round = model_round - 1
        self.model_path = model_path
        self.spec = spec
        effects.append(self._reset_sum())
        return effects

    # -- what participants send ------------------------------------------------------------------

    def authorize(self, participant_id: str, token: str) -> None:
        """Refuse unless `token` is the one admitted for `participant_id` (constant time)."""
        expected = self.admitted.get(participant_id)
        if expected is None or not hmac.compare_digest(expected.encode(), token.encode()):
            raise Refusal("unknown participant or token", ErrorCode.UNKNOWN_TOKEN)

    def begin_upload(self, participant_id: str, token: str) -> UploadKey:
        self.authorize(participant_id, token)
        if participant_id in self.kept:
            raise Refusal("a result was already accepted for this token", ErrorCode.ALREADY_ACCEPTED)
        if participant_id in self.uploading:
            raise Refusal("an upload with this token is already in progress", ErrorCode.UPLOAD_IN_PROGRESS)
        key = UploadKey(participant_id, token, self.model_round, next(self._numbers))
        self.uploading[participant_id] = key
        return key

    def check_spec(self, key: UploadKey, spec: WeightsSpec) -> None:
        """The header of an arriving upload: refused if unlike the fixed spec; no header fixes it."""
        if self.spec is not None and spec != self.spec:
            raise UnacceptableWeights(self._refusal_text(spec))
        if self.uploading.get(key.participant_id) == key:
            self.arriving[key] = spec

    def upload_aborted(self, key: UploadKey) -> None:
        """An upload was broken off or refused before it was complete."""
        self._upload_ended(key)

    def upload_complete(self, key: UploadKey, spec: WeightsSpec) -> list[Effect]:
        """A whole, valid upload: folded at once while it is made durable (it is pending).

        Refused (an `AbortUploads` of it with its refusal) if unlike the fixed
        spec; the first complete upload before any model or result fixes the
        spec, and the uploads of another spec still arriving are refused then.
        """
        self.arriving.pop(key, None)
        effects: list[Effect] = []
        if self.spec is not None and spec != self.spec:
            self._upload_ended(key)
            refusal = Refuse(ErrorCode.UNACCEPTABLE_WEIGHTS, self._refusal_text(spec))
            return [AbortUploads((key,), refusal), refusal]
        self.pending[key.participant_id] = key
        self.completing[key.participant_id] = key
        if self.spec is None:
            self.spec = spec
            for other, other_spec in list(self.arriving.items()):
                if other_spec != spec:
                    self._upload_ended(other)
                    effects.append(AbortUploads((other,), Refuse(ErrorCode.UNACCEPTABLE_WEIGHTS, self._refusal_text(other_spec))))
        effects.append(FoldUpload(key))
        return effects

    def upload_kept(self, key: UploadKey, path: str) -> list[Effect]:
        """A pending upload is durable at `path`: kept and reported, unless its round or token ended."""
        if self._outdated(key):
            return [
                RemoveFiles((path,), after_folds=False),
                *self._settle_pending(key, kept=False),
                Refuse(ErrorCode.ROUND_ENDED, ROUND_ENDED),
            ]
        self.kept[key.participant_id] = path
        effects = self._settle_pending(key, kept=True)
        self.confirming.add(key.participant_id)
        return effects

    def upload_not_kept(self, key: UploadKey) -> list[Effect]:
        """Making a pending upload durable failed; a `Refuse` if its round's files may be gone already."""
        outdated = self._outdated(key)
        effects = self._settle_pending(key, kept=False)
        if outdated:
            effects.append(Refuse(ErrorCode.ROUND_ENDED, ROUND_ENDED))
        return effects

    def confirmed(self, participant_id: str) -> list[Effect]:
        """The coordinator recorded the result."""
        self.confirming.discard(participant_id)
        return []

    def not_confirmed(self, participant_id: str, unreachable: bool) -> list[Effect]:
        """The coordinator refused the result, or could not be asked: it is dropped again."""
        effects = self._drop_results({participant_id})
        self.confirming.discard(participant_id)
        if unreachable:
            effects.append(Refuse(ErrorCode.COORDINATOR_UNREACHABLE, "the coordinator could not be reached; upload again"))
        else:
            effects.append(Refuse(ErrorCode.NOT_EXPECTED, "the coordinator does not expect a result for this token"))
        return effects

    # -- helpers ------------------------------------------------------------------------------------

    def _outdated(self, key: UploadKey) -> bool:
        """Whether the round or the token an upload was for ended while it arrived or was made durable."""
        return key.round != self.model_round or self.aggregating or self.admitted.get(key.participant_id) != key.token

    def _refusal_text(self, spec: WeightsSpec) -> str:
        assert self.spec is not None
        return f"{spec.describe()} refused: this round takes {self.spec.describe()}"

    def _upload_ended(self, key: UploadKey) -> None:
        self.arriving.pop(key, None)
        if self.uploading.get(key.participant_id) == key:
            del self.uploading[key.participant_id]
        if self.completing.get(key.participant_id) == key:
            del self.completing[key.participant_id]
        self._release_spec()

    def _settle_pending(self, key: UploadKey, kept: bool) -> list[Effect]:
        """A pending upload was kept, or was not and leaves the sum (unless the round's sum is gone already)."""
        effects: list[Effect] = []
        if self.pending.get(key.participant_id) == key:
            del self.pending[key.participant_id]
            if not kept:
                effects.append(self._reset_sum())
        elif kept:
            # It left the sum while pending (an aggregation that then failed forgot it) and its
            # token was admitted again meanwhile: kept now, so it is folded again, once.
            effects.append(FoldUpload(key))
        effects.append(CloseReader(key))
        self._upload_ended(key)
        return effects

    def _forget_pending(self) -> bool:
        """The round's sum is being rebuilt without the pending uploads (they will not be kept)."""
        had_pending = bool(self.pending)
        self.pending.clear()
        return had_pending

    def _reset_sum(self) -> ResetSum:
        """What counts now: the model, the kept results and the pending uploads."""
        return ResetSum(self.model_path, tuple(self.kept.values()), tuple(self.pending.values()))

    def _release_spec(self) -> None:
        """Before the first aggregation, forget a spec no kept or complete result holds any more."""
        if self.model_path is None and not self.kept and not self.completing:
            self.spec = None

    def _drop_results(self, participant_ids: Iterable[str]) -> list[Effect]:
        participant_ids = set(participant_ids)
        if not participant_ids:
            return []
        paths = tuple(self.kept.pop(participant_id) for participant_id in participant_ids if participant_id in self.kept)
        # Removed in the worker, after any fold of them already queued there.
        effects: list[Effect] = [RemoveFiles(paths), self._reset_sum()]
        self._release_spec()
        return effects
