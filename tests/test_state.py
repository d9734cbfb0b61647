"""Round progress on disk: atomic, validated, and absent means round 0."""

from __future__ import annotations

import os

import pytest

from xaind.state import RoundProgress, RoundStore, StateFileError, write_atomically


def test_missing_state_means_round_zero(tmp_path) -> None:
    assert RoundStore(str(tmp_path / "new")).load() == RoundProgress(round=0)


def test_saved_progress_is_loaded_back(tmp_path) -> None:
    store = RoundStore(str(tmp_path / "state"))
    store.save(RoundProgress(round=7))
    assert RoundStore(str(tmp_path / "state")).load() == RoundProgress(round=7)


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"round": -1}', b'{"round": "3"}', b'{"round": true}'])
def test_a_corrupt_state_file_is_refused_not_reset(tmp_path, content: bytes) -> None:
    (tmp_path / RoundStore.FILENAME).write_bytes(content)
    with pytest.raises(StateFileError, match="coordinator.json"):
        RoundStore(str(tmp_path)).load()


def test_atomic_write_replaces_content_and_leaves_no_temporary_file(tmp_path) -> None:
    target = tmp_path / "model.npy"
    write_atomically(str(target), b"old")
    write_atomically(str(target), b"new")
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["model.npy"]


def test_a_failed_atomic_write_keeps_the_old_content(tmp_path, monkeypatch) -> None:
    target = tmp_path / "coordinator.json"
    write_atomically(str(target), b"old")

    def broken_fsync(descriptor: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomically(str(target), b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["coordinator.json"]
