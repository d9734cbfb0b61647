"""The aggregator's round rules, event by event: which effects, in which order, and which refusals."""

from __future__ import annotations

import numpy as np
import pytest

from xaind.aggregator.rules import (
    AbortUploads,
    AdoptRound,
    Aggregate,
    CloseReader,
    FoldUpload,
    Refuse,
    RemoveFiles,
    ResetSum,
    RoundRules,
    WeightsSpec,
)
from xaind.protocol import ErrorCode, Refusal
from xaind.wire import UnacceptableWeights

SPEC = WeightsSpec((3,))
OTHER = WeightsSpec((4,))


def kept_upload(rules: RoundRules, participant_id: str, token: str = "t") -> str:
    """Admit, upload, keep and confirm one result; its path."""
    rules.admit(participant_id, token, rules.model_round)
    key = rules.begin_upload(participant_id, token)
    rules.check_spec(key, SPEC)
    rules.upload_complete(key, SPEC)
    path = f"round-{rules.model_round}/{participant_id}"
    assert Refuse not in map(type, rules.upload_kept(key, path))
    rules.confirmed(participant_id)
    return path


def refusal_code(call, *args) -> ErrorCode:
    with pytest.raises(Refusal) as refused:
        call(*args)
    return refused.value.code


def test_admit_for_another_round_or_while_aggregating_is_refused() -> None:
    rules = RoundRules(2, "model-2", SPEC)
    assert refusal_code(rules.admit, "p", "t", 1) == ErrorCode.WRONG_ROUND
    kept_upload(rules, "p")
    rules.aggregate(2)
    assert refusal_code(rules.admit, "q", "t", 2) == ErrorCode.AGGREGATING


def test_aggregate_refusals_and_the_repeated_request() -> None:
    rules = RoundRules(3, "model-3", SPEC)
    assert rules.aggregate(2) == []  # already done: the coordinator did not hear the answer
    assert refusal_code(rules.aggregate, 4) == ErrorCode.WRONG_ROUND
    assert refusal_code(rules.aggregate, 3, ["p"]) == ErrorCode.RESULTS_MISSING
    assert rules.aggregate(3) == [Aggregate(3)]
    assert refusal_code(rules.aggregate, 3) == ErrorCode.AGGREGATING
    rules.aggregation_failed()
    assert rules.aggregate(3) == [Aggregate(3)]


def test_an_upload_is_folded_while_pending_and_kept_without_a_second_fold() -> None:
    rules = RoundRules(0, None, None)
    rules.admit("p", "t", 0)
    key = rules.begin_upload("p", "t")
    assert refusal_code(rules.begin_upload, "p", "t") == ErrorCode.UPLOAD_IN_PROGRESS
    rules.check_spec(key, SPEC)
    assert rules.upload_complete(key, SPEC) == [FoldUpload(key)]
    assert rules.upload_kept(key, "r/p") == [CloseReader(key)]
    assert rules.kept == {"p": "r/p"} and rules.confirming == {"p"} and not rules.pending
    assert refusal_code(rules.begin_upload, "p", "t") == ErrorCode.ALREADY_ACCEPTED
    assert rules.confirmed("p") == [] and rules.confirming == set()


def test_a_result_the_coordinator_refuses_leaves_the_sum_and_the_disk() -> None:
    rules = RoundRules(1, "model-1", SPEC)
    kept = kept_upload(rules, "a")
    rules.admit("p", "t", 1)
    key = rules.begin_upload("p", "t")
    rules.upload_complete(key, SPEC)
    rules.upload_kept(key, "round-1/p")
    assert rules.not_confirmed("p", unreachable=False) == [
        RemoveFiles(("round-1/p",)),
        ResetSum("model-1", (kept,), ()),
        Refuse(ErrorCode.NOT_EXPECTED, "the coordinator does not expect a result for this token"),
    ]
    assert rules.kept == {"a": kept} and rules.confirming == set()


def test_an_upload_whose_token_ended_while_it_became_durable_is_removed_at_once() -> None:
    rules = RoundRules(1, "model-1", SPEC)
    rules.admit("p", "t", 1)
    key = rules.begin_upload("p", "t")
    rules.upload_complete(key, SPEC)
    rules.sync(1, [], {})  # the coordinator no longer admits p
    assert rules.upload_kept(key, "round-1/p") == [
        RemoveFiles(("round-1/p",), after_folds=False),
        ResetSum("model-1", (), ()),
        CloseReader(key),
        Refuse(ErrorCode.ROUND_ENDED, "the round this token was for has ended"),
    ]
    assert rules.kept == {} and rules.uploading == {}


def test_sync_neither_counts_nor_drops_a_result_being_confirmed() -> None:
    rules = RoundRules(0, None, None)
    counted = kept_upload(rules, "a")
    dropped = kept_upload(rules, "b")
    rules.admit("c", "t", 0)
    key = rules.begin_upload("c", "t")
    rules.upload_complete(key, SPEC)
    rules.upload_kept(key, "round-0/c")  # its confirmation is on its way
    answer = rules.sync(0, ["a", "lost"], {"a": "t"})
    assert answer.effects == [RemoveFiles((dropped,)), ResetSum(None, (counted, "round-0/c"), ())]
    assert answer.missing == ["lost"] and set(rules.kept) == {"a", "c"}


def test_sync_ahead_drops_everything_then_adopts_the_round() -> None:
    rules = RoundRules(1, "model-1", SPEC)
    path = kept_upload(rules, "a")
    answer = rules.sync(3, None, {"x": "t"})
    assert answer.effects == [RemoveFiles((path,)), ResetSum("model-1", (), ()), AdoptRound(3)]
    assert answer.model_round == 3 and rules.model_round == 3 and rules.admitted == {"x": "t"}
    assert rules.sync(2, ["a"], {}).effects == []  # behind: nothing changes


def test_aggregate_drops_the_uncounted_forgets_the_pending_and_aborts_the_uploads() -> None:
    rules = RoundRules(0, "model-0", SPEC)
    counted = kept_upload(rules, "a")
    uncounted = kept_upload(rules, "b")
    rules.admit("p", "t", 0)
    pending = rules.begin_upload("p", "t")
    rules.upload_complete(pending, SPEC)
    rules.admit("s", "t", 0)
    streaming = rules.begin_upload("s", "t")
    assert rules.aggregate(0, ["a"]) == [
        RemoveFiles((uncounted,)),
        ResetSum("model-0", (counted,), ()),
        AbortUploads((streaming,)),
        Aggregate(0),
    ]
    # The complete upload is still being made durable: no second one of p until it settles.
    assert rules.uploading == {"p": pending}
    assert rules.aggregation_done("model-1", OTHER) == [ResetSum("model-1", (), ())]
    assert rules.model_round == 1 and rules.spec == OTHER and rules.kept == {}


def test_a_header_in_flight_does_not_lock_out_the_others() -> None:
    """Issue 11, finding 4: a header of another shape with a trickled body refused every honest upload."""
    rules = RoundRules(0, None, None)
    for participant_id in ("mallory", "p", "q"):
        rules.admit(participant_id, "t", 0)
    trickled = rules.begin_upload("mallory", "t")
    rules.check_spec(trickled, OTHER)
    honest = rules.begin_upload("p", "t")
    rules.check_spec(honest, SPEC)  # accepted: no header fixes the spec
    assert rules.spec is None
    refusal = Refuse(ErrorCode.UNACCEPTABLE_WEIGHTS, "weights of shape (4,) refused: this round takes weights of shape (3,)")
    # The first complete upload fixes it; the upload of another shape still arriving is refused then.
    assert rules.upload_complete(honest, SPEC) == [AbortUploads((trickled,), refusal), FoldUpload(honest)]
    assert rules.spec == SPEC and "mallory" not in rules.uploading
    # A header of another shape arriving now is refused at once.
    late = rules.begin_upload("q", "t")
    with pytest.raises(UnacceptableWeights, match=r"this round takes weights of shape \(3,\)"):
        rules.check_spec(late, OTHER)


def test_an_upload_of_another_spec_that_completes_unchecked_is_refused() -> None:
    rules = RoundRules(1, "model-1", SPEC)
    rules.admit("p", "t", 1)
    key = rules.begin_upload("p", "t")
    refusal = Refuse(ErrorCode.UNACCEPTABLE_WEIGHTS, "weights of shape (4,) refused: this round takes weights of shape (3,)")
    assert rules.upload_complete(key, OTHER) == [AbortUploads((key,), refusal), refusal]
    assert rules.uploading == {} and rules.pending == {} and rules.completing == {}


def test_any_float_width_is_accepted() -> None:
    """Issue 11, finding 4: float32 results were refused against the float64 model the seed's aggregator makes."""
    float64 = WeightsSpec.of(np.dtype("<f8"), (3,))
    rules = RoundRules(1, "model-1", float64)
    rules.admit("p", "t", 1)
    key = rules.begin_upload("p", "t")
    for dtype in ("<f2", ">f2", "<f4", ">f4", ">f8"):
        rules.check_spec(key, WeightsSpec.of(np.dtype(dtype), (3,)))
    assert rules.upload_complete(key, WeightsSpec.of(np.dtype("<f4"), (3,))) == [FoldUpload(key)]


def test_the_first_complete_upload_fixes_the_spec_until_nothing_holds_it() -> None:
    rules = RoundRules(0, None, None)
    rules.admit("p", "t", 0)
    rules.admit("q", "t", 0)
    first = rules.begin_upload("p", "t")
    rules.check_spec(first, SPEC)
    second = rules.begin_upload("q", "t")
    rules.check_spec(second, SPEC)
    rules.upload_aborted(second)
    assert rules.spec is None  # arriving uploads hold no spec
    rules.upload_complete(first, SPEC)
    assert rules.spec == SPEC  # the complete one does, while it is made durable
    rules.upload_kept(first, "round-0/p")
    assert rules.not_confirmed("p", unreachable=False)[:2] == [RemoveFiles(("round-0/p",)), ResetSum(None, (), ())]
    assert rules.spec is None  # nothing holds it any more: the next complete upload fixes it
    with_model = RoundRules(1, "model-1", SPEC)
    with_model.admit("p", "t", 1)
    with_model.upload_aborted(with_model.begin_upload("p", "t"))
    assert with_model.spec == SPEC


def test_recovered_results_fix_the_spec_before_the_first_aggregation() -> None:
    rules = RoundRules(0, None, None)
    rules.restart({"a": "round-0/a"}, SPEC)
    assert rules.spec == SPEC
    rules.admit("p", "t", 0)
    with pytest.raises(UnacceptableWeights):
        rules.check_spec(rules.begin_upload("p", "t"), OTHER)
    with_model = RoundRules(1, "model-1", OTHER)
    with_model.restart({"a": "round-1/a"}, SPEC)
    assert with_model.spec == OTHER  # the model's spec is the last word


def test_a_forgotten_pending_upload_kept_after_its_token_was_admitted_again_is_folded_again() -> None:
    """Found by the property test: it left the sum when the failed aggregation forgot it."""
    rules = RoundRules(0, "model-0", SPEC)
    rules.admit("p", "t", 0)
    key = rules.begin_upload("p", "t")
    rules.upload_complete(key, SPEC)
    rules.aggregate(0)
    rules.aggregation_failed()
    rules.admit("p", "t", 0)
    assert refusal_code(rules.begin_upload, "p", "t") == ErrorCode.UPLOAD_IN_PROGRESS
    assert rules.upload_kept(key, "round-0/p") == [FoldUpload(key), CloseReader(key)]
    assert rules.kept == {"p": "round-0/p"}


def test_the_install_is_the_last_word_on_the_round() -> None:
    rules = RoundRules(2, "model-2", SPEC)
    rules.aggregate(2)
    rules.sync(5, None, {})
    rules.aggregation_done("model-3", SPEC)
    assert rules.model_round == 3


def test_a_restart_folds_the_recovered_results() -> None:
    rules = RoundRules(4, "model-4", SPEC)
    assert rules.restart({"a": "round-4/a", "b": "round-4/b"}) == [ResetSum("model-4", ("round-4/a", "round-4/b"), ())]
    assert refusal_code(rules.aggregate, 4, ["a", "c"]) == ErrorCode.RESULTS_MISSING


def test_an_upload_made_durable_while_its_round_is_aggregated_is_refused_even_if_admitted_again() -> None:
    """A result kept now would be dropped by the install without being counted."""
    rules = RoundRules(0, "model-0", SPEC)
    rules.admit("p", "t", 0)
    key = rules.begin_upload("p", "t")
    rules.upload_complete(key, SPEC)
    rules.aggregate(0)
    rules.sync(0, None, {"p": "t"})  # the coordinator re-sends its tokens while it waits
    effects = rules.upload_kept(key, "round-0/p")
    assert effects[0] == RemoveFiles(("round-0/p",), after_folds=False)
    assert effects[-1].code == ErrorCode.ROUND_ENDED and rules.kept == {}


def test_an_upload_made_durable_stays_in_progress_through_failed_aggregations() -> None:
    """Found by the property test: a second failed aggregation let a second upload write the same result."""
    rules = RoundRules(0, None, None)
    rules.admit("p", "t", 0)
    first = rules.begin_upload("p", "t")
    rules.check_spec(first, SPEC)
    rules.upload_complete(first, SPEC)
    for _ in range(2):
        assert AbortUploads not in map(type, rules.aggregate(0))
        rules.aggregation_failed()
    rules.admit("p", "t", 0)

    assert refusal_code(rules.begin_upload, "p", "t") == ErrorCode.UPLOAD_IN_PROGRESS
    assert CloseReader(first) in rules.upload_kept(first, "round-0/p")
    assert refusal_code(rules.begin_upload, "p", "t") == ErrorCode.ALREADY_ACCEPTED
