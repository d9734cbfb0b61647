"""The aggregator service with `storage.s3`: when downloads go to the bucket, and what a failed upload changes.

The service is tests/test_aggregator_service.py's (real store, worker and
disk threads); the bucket is a stand-in whose upload the test holds or
fails, to reach orders of events a real store makes rare: a download asked
while the upload is still under way, an aggregation whose upload outlasts
`upload_wait`. tests/test_s3.py covers the real thing with SeaweedFS.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest_twisted
from twisted.logger import LogLevel, globalLogPublisher

from xaind.aggregator.s3 import StorageUnavailable, StoredModel
from xaind.aggregator.settings import S3Settings
from xaind.aggregator.store import GlobalModel
from xaind.testing.waiting import wait_until, within

from test_aggregator_service import arrays, contribute, drain, logged_errors, make  # noqa: F401 - fixtures

UPLOAD_WAIT = 30.0  # seconds on the test's Clock


class HeldStorage:
    """A bucket whose uploads wait until the test releases them, then succeed or fail as it says."""

    def __init__(self) -> None:
        self.settings = S3Settings("http://127.0.0.1:1", "models", "key", "secret", upload_wait=UPLOAD_WAIT)
        self.release = threading.Event()
        self.failure: Exception | None = None
        self.uploads: list[int] = []
        self.removed: list[str] = []

    def upload(self, model: GlobalModel, if_absent: bool = False) -> StoredModel:
        assert threading.current_thread() is not threading.main_thread()  # off the reactor thread
        self.uploads.append(model.round)
        assert self.release.wait(10)
        if self.failure is not None:
            raise self.failure
        return StoredModel(str(model.path), f"model-{model.round}.npy")

    def remove(self, stored: StoredModel) -> None:
        self.removed.append(stored.key)

    def download_url(self, stored: StoredModel) -> str:
        return f"http://bucket/{stored.key}?signed"


def with_storage(make: Any) -> tuple[Any, HeldStorage]:
    made = make(start=False)
    storage = HeldStorage()
    made.service.storage = storage
    made.service.startService()
    return made, storage


@pytest_twisted.ensureDeferred
async def test_downloads_are_served_here_until_the_upload_is_complete(make) -> None:
    made, storage = with_storage(make)
    service = made.service
    for number, weights in enumerate(arrays(1, 2)):
        await contribute(service, f"p{number}", 5, weights)
    aggregated = service.aggregate(0)
    await wait_until(lambda: storage.uploads == [1], what="the upload of the model of round 1")
    assert service.model.round == 1 and service.download_url() is None  # installed, not yet in the bucket: served here
    assert not aggregated.called  # the coordinator hears of it once the model is in the bucket
    storage.release.set()
    assert await within(aggregated) is None
    assert service.download_url() == "http://bucket/model-1.npy?signed"
    await drain(service)


@pytest_twisted.ensureDeferred
async def test_an_upload_that_outlasts_upload_wait_lets_the_round_end_and_redirects_once_done(make) -> None:
    made, storage = with_storage(make)
    service = made.service
    await contribute(service, "p0", 5, arrays(2, 1)[0])
    aggregated = service.aggregate(0)
    await wait_until(lambda: storage.uploads == [1], what="the upload of the model of round 1")
    made.clock.advance(UPLOAD_WAIT)
    assert await within(aggregated) is None
    assert service.download_url() is None
    storage.release.set()
    await wait_until(lambda: service.download_url() is not None, what="the redirect once the upload is complete")
    await drain(service)


@pytest_twisted.ensureDeferred
async def test_a_failed_upload_is_one_warning_and_the_next_model_is_uploaded(make) -> None:
    warnings: list[str] = []

    def observe(event: dict) -> None:
        if event.get("log_namespace") == "xaind.aggregator.service" and event.get("log_level") == LogLevel.warn:
            warnings.append(event["log_format"].format(**event))

    made, storage = with_storage(make)
    service = made.service
    storage.failure = StorageUnavailable("http://127.0.0.1:1/models/model-1.npy: connection refused")
    storage.release.set()
    globalLogPublisher.addObserver(observe)
    try:
        await contribute(service, "p0", 5, arrays(3, 1)[0])
        await within(service.aggregate(0))
        assert service.download_url() is None
        assert warnings == ["uploading the model of round 1 in storage.s3 failed, downloads served here: "
                            "http://127.0.0.1:1/models/model-1.npy: connection refused"]
        storage.failure = None
        await contribute(service, "p0", 5, arrays(4, 1)[0])
        await within(service.aggregate(1))
        assert storage.uploads == [1, 2]
        assert service.download_url() == "http://bucket/model-2.npy?signed"
        assert len(warnings) == 1
    finally:
        globalLogPublisher.removeObserver(observe)
    await drain(service)


@pytest_twisted.ensureDeferred
async def test_the_model_before_the_last_is_removed_from_the_bucket(make) -> None:
    made, storage = with_storage(make)
    storage.release.set()
    service = made.service
    for round_number in range(3):
        await contribute(service, "p0", 5, arrays(10 + round_number, 1)[0])
        await within(service.aggregate(round_number))
    await drain(service)
    assert storage.uploads == [1, 2, 3]
    assert storage.removed == ["model-1.npy"]  # model-2 stays: a download redirected a moment ago may still read it
