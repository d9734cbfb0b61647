"""The files shards hand each other for a reduce: partial sums to the reducer, the new model back.

The coordinator orchestrates a sharded round's end (docs/scale.rst,
Sharded aggregation) but never carries its data: it gives each file a
fresh random token, tells the shard that holds it to lend it under that
token, and tells the shard that needs it where to fetch it. The file then
travels between the shards' HTTP APIs (`GET /shard/<token>`), at the
speed of their network and never through the coordinator.

A token is good for one file of one round end: the lender keeps the last
few only, so a token seen on the wire is worthless soon after.
"""

from __future__ import annotations

import hmac
import os
import shutil
import ssl
import urllib.error
import urllib.request
from collections import OrderedDict
from typing import Any

from xaind.protocol import ErrorCode, Refusal

#: Files lent at once: a round end lends at most two per shard (its partial sum, the reduced model).
LENT_FILES_KEPT = 8

#: Bytes copied at a time by a fetch: its memory, whatever the file's size.
FETCH_CHUNK_BYTES = 1 << 20


class ShardTransferError(OSError):
    """A file could not be fetched from another shard (one line: what, from where, why)."""


class LentFiles:
    """The files this shard lends to the others, by token (the newest `LENT_FILES_KEPT`)."""

    def __init__(self, kept: int = LENT_FILES_KEPT) -> None:
        self._kept = kept
        self._files: OrderedDict[str, str] = OrderedDict()

    def lend(self, token: str, path: str) -> None:
        self._files[token] = path
        self._files.move_to_end(token)
        while len(self._files) > self._kept:
            self._files.popitem(last=False)

    def path_of(self, token: str) -> str:
        """The file lent under `token`; a `Refusal` otherwise (compared in constant time, like upload tokens)."""
        found = None
        for lent, path in self._files.items():
            if hmac.compare_digest(lent.encode(), token.encode()):
                found = path
        if found is None:
            raise Refusal("no file is lent under this token", ErrorCode.UNKNOWN_TOKEN)
        return found


def shard_file_url(shard_url: str, token: str) -> str:
    """Where another shard fetches the file lent under `token` by the shard at `shard_url`."""
    return f"{shard_url.rstrip('/')}/shard/{token}"


def fetch_file(url: str, destination: str, ca_file: str | None = None, timeout: float = 60.0) -> int:
    """Download `url` into `destination`, whole and durable or not at all; its size.

    Blocking: run it on a disk thread. The bytes are copied a chunk at a
    time into ``destination.part``, fsynced, then renamed into place.
    """
    context: Any = None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=ca_file)
    partial = destination + ".part"
    os.makedirs(os.path.dirname(os.path.abspath(destination)), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response, open(partial, "wb") as output:
            shutil.copyfileobj(response, output, FETCH_CHUNK_BYTES)
            expected = response.headers.get("content-length")
            output.flush()
            size = output.tell()
            if expected is not None and int(expected) != size:
                raise ShardTransferError(f"fetching {_without_token(url)}: {size} of {expected} bytes arrived")
            os.fsync(output.fileno())
        os.replace(partial, destination)
    except urllib.error.HTTPError as error:
        _remove(partial)
        raise ShardTransferError(f"fetching {_without_token(url)}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        _remove(partial)
        if isinstance(error, ShardTransferError):
            raise
        reason = getattr(error, "reason", None) or error
        raise ShardTransferError(f"fetching {_without_token(url)}: {reason}") from None
    return size


def _without_token(url: str) -> str:
    """The URL as it may be logged: its last segment is the token."""
    return url.rsplit("/", 1)[0] + "/<token>"


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
