"""The aggregator's state directory read at start-up (xaind/aggregator/store.py).

A state file that cannot be used must stop start-up with a `StateFileError`
naming the file and what is wrong (the daemon turns it into one line), never
an arbitrary exception, and never silently (docs/aggregator-consistency.rst).
"""

from __future__ import annotations

import base64
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

from xaind.aggregator.store import ModelStore
from xaind.state import StateFileError


def npy_bytes(array: np.ndarray) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array, allow_pickle=False)
    return stream.getvalue()


def state_with_model(state_dir: Path, content: bytes, model_file: str = "model-2.npy", model_round: int = 2) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / model_file
    path.write_bytes(content)
    document = {"model_round": model_round, "model_file": model_file, "etag": '"m2-abc"'}
    (state_dir / ModelStore.STATE_FILE).write_text(json.dumps(document), encoding="utf-8")
    return path


def refusal(state_dir: Path) -> str:
    with pytest.raises(StateFileError) as raised:
        ModelStore(str(state_dir)).load()
    return str(raised.value)


GOOD = np.arange(12, dtype=np.float32).reshape(3, 4)


def test_a_valid_model_loads(tmp_path: Path) -> None:
    path = state_with_model(tmp_path, npy_bytes(GOOD))
    model = ModelStore(str(tmp_path)).load()
    assert (model.round, model.path, model.size) == (2, str(path), path.stat().st_size)


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ">f4"])
def test_every_accepted_float_kind_loads(tmp_path: Path, dtype: str) -> None:
    state_with_model(tmp_path, npy_bytes(GOOD.astype(dtype)))
    assert ModelStore(str(tmp_path)).load().round == 2


def test_a_fortran_ordered_and_an_empty_model_load(tmp_path: Path) -> None:
    state_with_model(tmp_path / "f", npy_bytes(np.asfortranarray(GOOD)))
    state_with_model(tmp_path / "e", npy_bytes(np.zeros((0, 4), dtype=np.float32)))
    assert ModelStore(str(tmp_path / "f")).load().round == 2
    assert ModelStore(str(tmp_path / "e")).load().round == 2


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"this is not a model\n", r"not a \.npy model \(.+\)"),
        (b"", r"not a \.npy model \(.+\)"),
        (npy_bytes(GOOD)[:20], r"not a \.npy model \(.+\)"),
        (npy_bytes(GOOD)[:-5], re.escape(f"{len(npy_bytes(GOOD)) - 5} bytes, its .npy header announces {len(npy_bytes(GOOD))}")),
        (npy_bytes(GOOD) + b"\0" * 4, re.escape(f"{len(npy_bytes(GOOD)) + 4} bytes, its .npy header announces {len(npy_bytes(GOOD))}")),
        (npy_bytes(np.arange(3, dtype=np.int64)), re.escape("weights of type int64 (a model holds float16, float32 or float64)")),
        (npy_bytes(np.array([1.0, np.nan, 2.0], dtype=np.float32)), re.escape("non-finite weight nan at element 1")),
        (npy_bytes(np.array([[0.0, 1.0], [2.0, -np.inf]])), re.escape("non-finite weight -inf at element 3")),
    ],
    ids=["text", "empty", "truncated-header", "truncated-data", "trailing-bytes", "integers", "nan", "inf"],
)
def test_an_unusable_model_is_a_state_file_error_naming_it(tmp_path: Path, content: bytes, problem: str) -> None:
    path = state_with_model(tmp_path, content)
    assert re.fullmatch(rf"{re.escape(str(path))}: {problem}", refusal(tmp_path)), refusal(tmp_path)
    assert path.read_bytes() == content  # refusing repairs nothing


def test_a_nan_far_into_a_big_model_is_found_within_a_bounded_time(tmp_path: Path) -> None:
    weights = np.zeros(25 * 2**20, dtype=np.float32)  # 100 MiB
    weights[-1] = np.nan
    path = state_with_model(tmp_path, npy_bytes(weights))
    started = time.monotonic()
    message = refusal(tmp_path)
    elapsed = time.monotonic() - started
    assert message == f"{path}: non-finite weight nan at element {weights.size - 1}"
    assert elapsed < 5.0, f"checking 100 MiB took {elapsed:.2f} s"


# -- the round's results --------------------------------------------------------------------


def name_of(participant_id: str) -> str:
    return base64.urlsafe_b64encode(participant_id.encode("utf-8")).decode("ascii")


def test_stored_results_are_read_back_by_participant_id(tmp_path: Path) -> None:
    store = ModelStore(str(tmp_path))
    directory = tmp_path / "round-3"
    directory.mkdir()
    for participant_id in ("a", "b/with slash", "ü"):
        (directory / f"{name_of(participant_id)}.result").write_bytes(b"x")
    (directory / f"{name_of('c')}.partial").write_bytes(b"x")
    assert store.stored_results(3) == {
        participant_id: str(directory / f"{name_of(participant_id)}.result") for participant_id in ("a", "b/with slash", "ü")
    }
    assert sorted(path.name for path in directory.iterdir()) == sorted(
        f"{name_of(participant_id)}.result" for participant_id in ("a", "b/with slash", "ü")
    )


@pytest.mark.parametrize(
    "name",
    ["not base64!.result", "YQ.result", "YWJj=.result", base64.urlsafe_b64encode(b"\xff\xfe").decode() + ".result", "a+bc.result"],
    ids=["punctuation", "unpadded", "bad-padding", "not-utf-8", "standard-alphabet"],
)
def test_a_result_whose_name_is_not_a_participant_id_is_a_state_file_error(tmp_path: Path, name: str) -> None:
    directory = tmp_path / "round-3"
    directory.mkdir()
    path = directory / name
    path.write_bytes(b"x")
    with pytest.raises(StateFileError) as raised:
        ModelStore(str(tmp_path)).stored_results(3)
    assert str(raised.value) == f"{path}: not a result of this store (the name must be a participant id in URL-safe base64)"
    assert path.exists()
