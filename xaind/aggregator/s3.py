"""The global model in S3-compatible object storage (`storage.s3`, docs/scale.rst).

Every participant selected in a round downloads the whole model: with a
large model and many participants that is most of the bytes an aggregator
sends. With `storage.s3` the aggregator uploads each installed model once
to a bucket and answers downloads with a redirect to a presigned GET URL,
so the object store (built to serve many readers) sends them instead.

The object's key names the model's round and the ETag it was installed
with (`model-<round>-<etag>.npy`): a key is written once, by one complete
upload (S3 makes an object visible only when its PUT or multipart upload
completes), so a URL never leads to half a model or another round's.

Everything here that talks to the store blocks (boto3 is synchronous):
callers run `upload` on a disk thread. Presigning is local HMAC (no
request), cheap enough for the reactor thread, and a URL is reused for a
part of its life instead of being signed per download.

boto3 is imported only when a `ModelStorage` is made, so the daemons run
without it unless `storage.s3` is configured (the `s3` extra of setup.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from xaind.aggregator.settings import S3Settings
from xaind.aggregator.store import GlobalModel
from xaind.logs import get_logger

log = get_logger("xaind.aggregator.s3")

#: Parts of a multipart upload (S3 allows at most 10,000, each at least 5 MiB but the last).
#: 16 MiB parts carry a model up to 156 GiB; one part at a time is in memory.
PART_BYTES = 16 * 2**20
#: Seconds to connect to the store and to wait for its answers: an unreachable endpoint fails an
#: upload in seconds (logged; downloads are served by the aggregator meanwhile), not minutes.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
#: Tries of each request (botocore's "standard" retry mode: transient errors, throttling).
ATTEMPTS = 3
#: Share of `url_lifetime` for which one presigned URL is handed out again: a participant
#: given it at the end of that share still has the rest of its life to start the download.
URL_REUSE_SHARE = 0.5


class StorageUnavailable(Exception):
    """The store refused or could not be reached; the model stays served by the aggregator."""


@dataclass(frozen=True)
class StoredModel:
    """A model file complete in the bucket under `key`."""

    path: str
    key: str


def object_key(settings: S3Settings, model: GlobalModel) -> str:
    """The key of `model`'s object: its round and installed ETag, so no two models share one."""
    return f"{settings.prefix}model-{model.round}-{model.etag.strip(chr(34))}.npy"


class ModelStorage:
    """Uploads models to the bucket and signs download URLs for them."""

    def __init__(self, settings: S3Settings, clock: Callable[[], float] = time.monotonic) -> None:
        import boto3
        from botocore.config import Config

        self.settings = settings
        self._clock = clock
        self._client: Any = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint,
            region_name=settings.region,
            aws_access_key_id=settings.access_key,
            aws_secret_access_key=settings.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            ),
        )
        self._url: tuple[str, str, float] | None = None  # key, URL, when signed

    def upload(self, model: GlobalModel, if_absent: bool = False) -> StoredModel:
        """Put `model`'s file in the bucket (blocking; multipart above `PART_BYTES`).

        The file is opened once: a later aggregation may remove it meanwhile
        and the upload still reads the whole of it. `if_absent`: an object of
        the model's key and size is already there (shards install the same
        model under the same ETag, and the reducer uploaded it): no upload.
        """
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        assert model.path is not None, "no model file before the first aggregation"
        key = object_key(self.settings, model)
        if if_absent and self._stored_size(key) == model.size:
            return StoredModel(model.path, key)
        transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, use_threads=False)
        try:
            with open(model.path, "rb") as stream:
                self._client.upload_fileobj(
                    stream, self.settings.bucket, key, ExtraArgs={"ContentType": "application/octet-stream"}, Config=transfer
                )
        except (BotoCoreError, ClientError) as error:
            raise StorageUnavailable(f"{self.settings.endpoint}/{self.settings.bucket}/{key}: {error}") from None
        return StoredModel(model.path, key)

    def _stored_size(self, key: str) -> int | None:
        """The size of the object at `key`, None if there is none (blocking)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return int(self._client.head_object(Bucket=self.settings.bucket, Key=key)["ContentLength"])
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageUnavailable(f"{self.settings.endpoint}/{self.settings.bucket}/{key}: {error}") from None
        except BotoCoreError as error:
            raise StorageUnavailable(f"{self.settings.endpoint}/{self.settings.bucket}/{key}: {error}") from None

    def remove(self, stored: StoredModel) -> None:
        """Delete an object no download is sent to any more (blocking)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.settings.bucket, Key=stored.key)
        except (BotoCoreError, ClientError) as error:
            raise StorageUnavailable(f"{self.settings.endpoint}/{self.settings.bucket}/{stored.key}: {error}") from None

    def download_url(self, stored: StoredModel) -> str:
        """A presigned GET URL of `stored`, valid `url_lifetime` seconds from when it was signed."""
        signed_at = self._clock()
        if self._url is not None:
            key, url, when = self._url
            if key == stored.key and signed_at - when < self.settings.url_lifetime * URL_REUSE_SHARE:
                return url
        url = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.settings.bucket, "Key": stored.key}, ExpiresIn=self.settings.url_lifetime
        )
        self._url = (stored.key, url, signed_at)
        return url
