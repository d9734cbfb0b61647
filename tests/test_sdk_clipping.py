"""Participant-side clipping: `start_participant(..., clip_norm=C)` uploads the update clipped to C.

The participant runs through the public API on a `Clock`, against a
scripted HTTP client that plays the seed's coordinator API (rendez-vous,
heartbeats, start_training) and an aggregator (the global model to
download, the uploads recorded): round 0 without a global model, round 1
from one, then finish. `clip_update` itself is checked against numpy.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from xaind.sdk import Participant, ParticipantError, start_participant
from xaind.sdk.clipping import check_clip_norm, clip_update
from xaind.sdk.http import Downloaded

GLOBAL_MODEL = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])  # float64, as the aggregator makes it from float64 results


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


class ScriptedServers:
    """The coordinator's HTTP API and the aggregator: selects for rounds 0 .. rounds - 1 in turn, then finishes."""

    def __init__(self, rounds: int, models: list[np.ndarray | None]) -> None:
        self.rounds = rounds
        self.models = models
        self.uploads: list[tuple[int, np.ndarray]] = []

    def get_json(self, url: str, headers: Any = None) -> Deferred[dict[str, Any]]:
        if url.endswith("/rendez_vous"):
            return succeed({"id": "p-1", "ok": True})
        if "/heartbeat/" in url:
            if len(self.uploads) < self.rounds:
                return succeed({"state": "round", "round": len(self.uploads)})
            return succeed({"state": "finish"})
        if "/start_training/" in url:
            return succeed({"ok": True, "url": "http://aggregator.test", "token": "token"})
        raise AssertionError(f"unexpected GET {url}")

    def download(self, url: str, keep: bool = True) -> Deferred[Downloaded]:
        model = self.models[len(self.uploads)]
        data = b"" if model is None else npy_bytes(model)
        return succeed(Downloaded(data, len(data)))

    def upload(self, url: str, samples: int, weights: np.ndarray) -> Deferred[Downloaded]:
        self.uploads.append((samples, np.array(weights, copy=True)))
        return succeed(Downloaded(b"", 0))


class Scripted(Participant):
    """Returns the next of its scripted trained weights; records what it was given."""

    def __init__(self, trained: list[np.ndarray]) -> None:
        self.trained = trained
        self.given: list[np.ndarray | None] = []

    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        self.given.append(weights)
        return self.trained[len(self.given) - 1], 10 * len(self.given)


def run(trained: list[np.ndarray], clip_norm: float | None) -> tuple[Scripted, ScriptedServers]:
    clock = Clock()
    participant = Scripted(trained)
    servers = ScriptedServers(len(trained), [None, GLOBAL_MODEL, GLOBAL_MODEL][: len(trained)])
    _, done = start_participant(
        participant, "http://coordinator.test", reactor=clock, http=servers, train_in_thread=False, clip_norm=clip_norm  # type: ignore[arg-type]
    )
    for _ in range(10):
        clock.advance(1.0)
    summary = []
    done.addCallback(summary.append)
    assert summary and summary[0].rounds_delivered == list(range(len(trained)))
    return participant, servers


FIRST = np.array([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]], dtype=np.float32)  # norm 5
SECOND = (GLOBAL_MODEL + np.array([[0.0, 6.0, 0.0], [8.0, 0.0, 0.0]])).astype(np.float32)  # update norm 10


def test_each_upload_is_the_update_clipped_to_clip_norm() -> None:
    participant, servers = run([FIRST, SECOND], clip_norm=2.0)
    (samples_0, upload_0), (samples_1, upload_1) = servers.uploads
    assert (samples_0, samples_1) == (10, 20)
    # Round 0 (no global model): the weights themselves, scaled to norm 2, in the participant's dtype.
    assert upload_0.dtype == np.float32
    np.testing.assert_array_equal(upload_0, np.array([[1.2, 0.0, 1.6], [0.0, 0.0, 0.0]], dtype=np.float32))
    # Round 1: the update from the downloaded global model, scaled from norm 10 to 2.
    assert participant.given[1] is not None and np.array_equal(participant.given[1], GLOBAL_MODEL)
    assert upload_1.dtype == np.float32
    np.testing.assert_allclose(upload_1, GLOBAL_MODEL + np.array([[0.0, 1.2, 0.0], [1.6, 0.0, 0.0]]), rtol=1e-7, atol=1e-7)
    assert np.linalg.norm(upload_1.astype(np.float64) - GLOBAL_MODEL) == pytest.approx(2.0, rel=1e-6)
    # The participant's own arrays are left as it returned them.
    assert np.array_equal(FIRST[0], [3.0, 0.0, 4.0]) and np.array_equal(participant.trained[1], SECOND)


def test_updates_within_the_bound_are_uploaded_unchanged() -> None:
    _, servers = run([FIRST, SECOND], clip_norm=10.0)
    assert np.array_equal(servers.uploads[0][1], FIRST) and np.array_equal(servers.uploads[1][1], SECOND)


def test_without_clip_norm_nothing_is_clipped() -> None:
    _, servers = run([FIRST * 100, SECOND * 100], clip_norm=None)
    assert np.array_equal(servers.uploads[0][1], FIRST * 100) and np.array_equal(servers.uploads[1][1], SECOND * 100)


def test_an_update_that_cannot_be_clipped_fails_the_participant() -> None:
    clock = Clock()
    servers = ScriptedServers(1, [None])
    _, done = start_participant(
        Scripted([np.array([1.0, np.nan])]), "http://coordinator.test", reactor=clock, http=servers, train_in_thread=False, clip_norm=1.0  # type: ignore[arg-type]
    )
    clock.advance(1.0)
    failures: list[Any] = []
    done.addErrback(failures.append)
    assert failures and failures[0].check(ParticipantError)
    assert "cannot clip the update" in failures[0].getErrorMessage()
    assert servers.uploads == []


@pytest.mark.parametrize("clip_norm", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_an_unusable_clip_norm_is_refused_at_start(clip_norm: Any) -> None:
    with pytest.raises(ValueError, match="^clip_norm must be a finite number > 0, got "):
        start_participant(Scripted([]), "http://coordinator.test", reactor=Clock(), http=ScriptedServers(0, []), clip_norm=clip_norm)  # type: ignore[arg-type]


# -- clip_update ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f8"])
def test_clip_update_against_numpy(dtype: str) -> None:
    rng = np.random.default_rng(5)
    received = rng.normal(size=(4, 5))
    trained = (received + rng.normal(scale=3.0, size=(4, 5))).astype(dtype)
    update = trained.astype(np.float64) - received
    clipped = clip_update(trained, received, 1.5)
    assert clipped.dtype == np.dtype(dtype) and clipped.shape == (4, 5)
    np.testing.assert_array_equal(clipped, (received + update * (1.5 / np.linalg.norm(update))).astype(dtype))
    # The bound holds up to the rounding of the trained weights' dtype.
    tolerance = {2: 2e-2, 4: 1e-5, 8: 1e-12}[np.dtype(dtype).itemsize]
    assert np.linalg.norm(clipped.astype(np.float64) - received) == pytest.approx(1.5, rel=tolerance)


def test_clip_update_keeps_fortran_order_and_returns_short_updates_as_they_are() -> None:
    received = np.asfortranarray(np.ones((3, 2)))
    trained = np.asfortranarray(np.ones((3, 2)) * 4.0)
    clipped = clip_update(trained, received, 1.0)
    assert clipped.flags.f_contiguous
    np.testing.assert_allclose(clipped, np.ones((3, 2)) + 1.0 / np.sqrt(6.0), rtol=1e-15)
    assert clip_update(trained, received, 100.0) is trained
    assert clip_update(trained, None, 100.0) is trained


def test_clip_update_refuses_what_it_cannot_clip() -> None:
    with pytest.raises(ParticipantError, match=r"^cannot clip the update: trained weights of shape \(3,\), the global model's \(4,\)$"):
        clip_update(np.zeros(3), np.zeros(4), 1.0)
    with pytest.raises(ParticipantError, match="inf or nan"):
        clip_update(np.array([np.inf, 0.0]), None, 1.0)
    with pytest.raises(ParticipantError, match="inf or nan"):
        clip_update(np.zeros(2), np.array([0.0, np.nan]), 1.0)


def test_check_clip_norm_takes_none_and_positive_numbers() -> None:
    for good in (None, 1, 0.5, 1e9, np.float32(0.25)):
        check_clip_norm(good)
