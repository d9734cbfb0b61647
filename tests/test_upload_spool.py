"""An upload's partial file is created on a disk thread: chunks wait for it in memory, bounded, in order.

`Upload` is driven alone with hooks whose disk steps run when the test says
(`HeldDisk`), so every ordering of "chunk arrives" and "file is open" is
tried on purpose (tests/test_aggregator_service.py checks that the real
service creates the file off the reactor thread).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure

from xaind.aggregator import upload as upload_module
from xaind.aggregator.rules import UploadKey, WeightsSpec
from xaind.aggregator.upload import PENDING_LIMIT, Upload
from xaind.protocol import ErrorCode, Refusal
from xaind.testing.wire import encode_local_result

KEY = UploadKey("p1", "t1", 0, 1)


class HeldDisk:
    """UploadHooks whose disk steps wait until `run_all()`; the rest recorded."""

    def __init__(self) -> None:
        self.held: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []
        self.aborted: list[Upload] = []
        self.completed: list[Upload] = []

    def check_spec(self, key: UploadKey, spec: WeightsSpec) -> None:
        pass

    def run_on_disk(self, function: Callable[..., Any], *args: Any) -> Deferred[Any]:
        waiting: Deferred[Any] = Deferred()
        self.held.append((function, args, waiting))
        return waiting

    def run_all(self) -> None:
        while self.held:
            function, args, waiting = self.held.pop(0)
            maybeDeferred(function, *args).chainDeferred(waiting)

    def step_failed(self, failure: Failure, what: str) -> None:
        raise AssertionError(f"{what}: {failure.getErrorMessage()}")

    def upload_aborted(self, upload: Upload) -> None:
        self.aborted.append(upload)

    def upload_complete(self, upload: Upload) -> Deferred[None]:
        self.completed.append(upload)
        return succeed(None)


@pytest.fixture
def disk() -> Iterator[HeldDisk]:
    """A HeldDisk whose completed uploads' files are closed after the test, as the service's commit and fold would."""
    held = HeldDisk()
    yield held
    for upload in held.completed:
        assert upload.reader is not None and upload._file is not None
        upload.reader.close()
        upload._file.close()


def body(elements: int = 1000) -> bytes:
    return encode_local_result(3, np.linspace(-1, 1, elements, dtype=np.float32))


def test_chunks_before_the_file_is_open_are_spooled_in_order(tmp_path: Path, disk: HeldDisk) -> None:
    path = tmp_path / "round-0" / "p1.partial"
    upload = Upload(KEY, str(path), 2**20, disk)
    data = body()
    for start in range(0, len(data), 100):
        upload.write(data[start : start + 100])
    assert not path.exists()  # nothing touched the disk yet
    finished: list[Any] = []
    upload.finish().addBoth(finished.append)
    assert finished == []  # waits for the file
    disk.run_all()
    assert finished == [None] and disk.completed == [upload]
    assert path.read_bytes() == data


def test_beyond_the_pending_limit_the_body_is_paused_until_the_file_is_open(tmp_path: Path, disk: HeldDisk) -> None:
    pauses: list[bool] = []
    upload = Upload(KEY, str(tmp_path / "p1.partial"), 64 * 2**20, disk, on_backlog=pauses.append)
    data = body(3 * PENDING_LIMIT // 4)  # float32: 3 * PENDING_LIMIT bytes
    step = 2**20
    for start in range(0, len(data), step):
        upload.write(data[start : start + step])
    assert pauses == [True]
    disk.run_all()
    assert pauses == [True, False]
    upload.finish()
    disk.run_all()
    assert (tmp_path / "p1.partial").read_bytes() == data


def test_an_upload_broken_off_before_its_file_was_open_leaves_no_file(tmp_path: Path, disk: HeldDisk) -> None:
    path = tmp_path / "p1.partial"
    upload = Upload(KEY, str(path), 2**20, disk)
    upload.write(body()[:50])
    upload.abort()
    assert disk.aborted == [upload]
    disk.run_all()  # the file is created, then removed
    assert not path.exists()
    failed: list[Failure] = []
    upload.finish().addErrback(failed.append)
    assert failed and failed[0].value.code is ErrorCode.ROUND_ENDED


@pytest.mark.parametrize("error", [errno.EACCES, errno.ENOSPC], ids=["permission", "disk-full"])
def test_a_file_the_disk_refuses_is_a_storage_refusal_told_at_once(tmp_path: Path, disk: HeldDisk, monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    def refusing_open(path: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(error, os.strerror(error), path)

    monkeypatch.setattr(upload_module, "open", refusing_open, raising=False)
    refusals: list[Refusal] = []
    upload = Upload(KEY, str(tmp_path / "p1.partial"), 2**20, disk, on_refused=refusals.append)
    upload.write(body()[:50])
    disk.run_all()
    assert [refusal.code for refusal in refusals] == [ErrorCode.STORAGE_UNAVAILABLE]
    assert disk.aborted == [upload]
    failed: list[Failure] = []
    upload.finish().addErrback(failed.append)
    assert failed[0].value.code is ErrorCode.STORAGE_UNAVAILABLE


def test_an_upload_aborted_while_its_body_is_paused_lets_the_body_go_on(tmp_path: Path, disk: HeldDisk) -> None:
    """Otherwise the rest of the body would never be read, and the refusal never answered."""
    pauses: list[bool] = []
    upload = Upload(KEY, str(tmp_path / "p1.partial"), 64 * 2**20, disk, on_backlog=pauses.append)
    data = body(3 * PENDING_LIMIT // 4)
    for start in range(0, len(data), 2**20):
        upload.write(data[start : start + 2**20])
    assert pauses == [True]
    upload.abort(Refusal("the round ended", ErrorCode.ROUND_ENDED))
    assert pauses == [True, False]
    disk.run_all()
    assert pauses == [True, False] and not (tmp_path / "p1.partial").exists()
