"""Round progress on disk: atomic, validated, and absent means round 0."""

from __future__ import annotations

import os

import pytest

from xaind.state import RoundProgress, RoundStore, StateFileError, write_atomically
from xaind.writeback import start_writeback, start_writeback_and_close


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


def test_write_back_starts_on_linux_and_leaves_the_file_as_written(tmp_path):
    path = tmp_path / "spooled"
    data = os.urandom(3 * 2**20)
    with open(path, "wb") as stream:
        stream.write(data[: 2**20])
        stream.flush()
        assert start_writeback(stream.fileno(), 0) is True
        stream.write(data[2**20 :])
        stream.flush()
        assert start_writeback_and_close(os.dup(stream.fileno()), 2**20) is True
    assert path.read_bytes() == data


def test_write_back_on_its_own_descriptor_closes_it_even_when_it_fails():
    reading, writing = os.pipe()  # a pipe: sync_file_range refuses it (ESPIPE)
    os.close(writing)
    assert start_writeback_and_close(reading, 0) is False
    with pytest.raises(OSError):
        os.fstat(reading)



def test_an_atomic_write_onto_a_directory_fails_and_leaves_no_temporary_file(tmp_path) -> None:
    """How the tests make coordinator.json unwritable even for root: a directory in its place."""
    target = tmp_path / RoundStore.FILENAME
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        RoundStore(str(tmp_path)).save(RoundProgress(round=1))
    assert os.listdir(tmp_path) == [RoundStore.FILENAME]
    assert target.is_dir()
