"""The aggregator's state directory: the global model, its round, and the round's results.

Layout of `state_dir`:

- `aggregator.json`: `{"model_round": m, "model_file": "model-m.npy" | null, "etag": "..."}`,
  replaced atomically; it is the single commit point of an aggregation;
- `model-<m>.npy`: the global model after `m` aggregations;
- `round-<m>/<id>.partial`: an upload being received (deleted at start-up);
- `round-<m>/<id>.result`: a complete, durable result, written before the
  coordinator is told of it (a restart keeps it until a sync says whether
  the coordinator counts it) and kept until the round is aggregated, so a
  crash loses no accepted result (docs/aggregator-consistency.rst).

Everything here blocks on the disk: callers run it off the reactor thread,
except what `load` and `stored_results` read at start-up, before the
reactor runs: the metadata, and one pass over the global model to check it
(`check_model_file`, a bounded read of fixed-size chunks).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from xaind.aggregator.rules import WeightsSpec
from xaind.state import StateFileError, write_atomically
from xaind.wire import ACCEPTED_WEIGHT_TYPES

PARTIAL_SUFFIX = ".partial"
RESULT_SUFFIX = ".result"
#: A shard's partial sum in a round's directory (never taken for a result or an upload).
SHARD_SUM_SUFFIX = ".psum"
#: How much of the global model the start-up check reads at a time: its memory, whatever the model's size.
MODEL_CHECK_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class GlobalModel:
    """One version of the global model as stored on disk."""

    round: int
    path: str | None  # None before the first aggregation: participants initialise the model
    size: int
    etag: str


def _file_name(participant_id: str) -> str:
    """A file name for any participant id: ids are opaque strings, maybe with '/' in them."""
    return base64.urlsafe_b64encode(participant_id.encode("utf-8")).decode("ascii")


def _participant_id(file_name: str) -> str | None:
    """The id a result's file name stands for; None for a name `_file_name` never makes.

    The decoder alone would skip characters outside the alphabet, so the
    name must also be what the id encodes to.
    """
    try:
        participant_id = base64.urlsafe_b64decode(file_name.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError):
        return None
    return participant_id if _file_name(participant_id) == file_name else None


#: A model, its optimizer state (``model-<m>.<name>.npy``), either being written (``.tmp``, ``.partial``), or a round.
def participant_of(path: str) -> str | None:
    """Whose result or upload a file of a round's directory holds (``<id>.result``, ``<id>.<n>.partial``)."""
    return _participant_id(os.path.basename(path).split(".", 1)[0])


_NUMBERED = re.compile(r"(?:model-(\d+)(?:\.[a-z0-9_]+)?\.npy(?:\.tmp)?(?:\.partial)?|round-(\d+))")


def _round_of(name: str) -> int | None:
    """The round a state-directory entry belongs to, or None for anything else."""
    match = _NUMBERED.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1) or match.group(2))


def read_model_spec(path: str | None) -> WeightsSpec | None:
    """The spec of a stored global model: the next round's results must match it."""
    return None if path is None else read_weights_spec(path, 0)


def read_weights_spec(path: str, offset: int) -> WeightsSpec:
    """The spec of the `.npy` array that starts `offset` bytes into the file at `path` (blocking)."""
    with open(path, "rb") as stream:
        stream.seek(offset)
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    return WeightsSpec.of(dtype, shape)


def check_model_file(path: str) -> None:
    """Refuse a global model that cannot be served and aggregated as it is, naming what is wrong.

    The checks are those of an upload (wire-format.rst): a `.npy` header,
    float weights of 2, 4 or 8 bytes, exactly the bytes the header
    announces, and finite values. A model that fails one would break the
    next aggregation or spread NaN to every participant, so start-up stops
    instead. The values are read in chunks of `MODEL_CHECK_CHUNK_BYTES`.
    """
    try:
        with open(path, "rb") as stream:
            try:
                version = np.lib.format.read_magic(stream)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
            except (ValueError, SyntaxError, TypeError) as error:
                raise StateFileError(f"{path}: not a .npy model ({error})") from None
            if dtype.type not in ACCEPTED_WEIGHT_TYPES:
                raise StateFileError(f"{path}: weights of type {dtype} (a model holds float16, float32 or float64)")
            announced = stream.tell() + math.prod(shape) * dtype.itemsize
            size = os.fstat(stream.fileno()).st_size
            if size != announced:
                raise StateFileError(f"{path}: {size} bytes, its .npy header announces {announced}")
            _check_finite(path, stream, dtype)
    except OSError as error:
        raise StateFileError(f"{path}: cannot be read ({error.strerror})") from None


def _check_finite(path: str, stream: BinaryIO, dtype: np.dtype) -> None:
    step = max(MODEL_CHECK_CHUNK_BYTES // dtype.itemsize, 1) * dtype.itemsize
    element = 0
    while chunk := stream.read(step):
        values = np.frombuffer(chunk, dtype=dtype)
        finite = np.isfinite(values)
        if not finite.all():
            index = int(np.argmin(finite))
            raise StateFileError(f"{path}: non-finite weight {values[index]} at element {element + index}")
        element += values.size


def remove_files(paths: list[str]) -> None:
    """Remove what exists of `paths`."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def fsync_directory(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class ModelStore:
    STATE_FILE = "aggregator.json"

    def __init__(self, state_dir: str) -> None:
        self.state_dir = state_dir
        self.state_path = os.path.join(state_dir, self.STATE_FILE)

    def load(self) -> GlobalModel:
        """The stored global model, or round 0 with no model for a new state directory.

        Runs at start-up, before the reactor: the model is checked whole
        (`check_model_file`), so its time grows with the model's size.
        """
        os.makedirs(self.state_dir, exist_ok=True)
        try:
            with open(self.state_path, "rb") as stream:
                document = json.loads(stream.read())
        except FileNotFoundError:
            return GlobalModel(round=0, path=None, size=0, etag=f'"empty-{secrets.token_hex(6)}"')
        except (OSError, ValueError) as error:
            raise StateFileError(f"{self.state_path}: cannot be read ({error})") from None
        if not isinstance(document, dict):
            raise StateFileError(f"{self.state_path}: must hold a JSON object")
        round_number = document.get("model_round")
        model_file = document.get("model_file")
        etag = document.get("etag")
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
            raise StateFileError(f"{self.state_path}: 'model_round' must be a whole number >= 0")
        if not isinstance(etag, str):
            raise StateFileError(f"{self.state_path}: 'etag' must be a string")
        if model_file is None:
            return GlobalModel(round=round_number, path=None, size=0, etag=etag)
        if not isinstance(model_file, str) or os.path.basename(model_file) != model_file:
            raise StateFileError(f"{self.state_path}: 'model_file' must be a file name in {self.state_dir}")
        path = os.path.join(self.state_dir, model_file)
        try:
            size = os.stat(path).st_size
        except OSError as error:
            raise StateFileError(f"{path}: the global model is missing ({error.strerror})") from None
        check_model_file(path)
        return GlobalModel(round=round_number, path=path, size=size, etag=etag)

    # -- the round's results --------------------------------------------------

    def round_dir(self, round_number: int) -> str:
        return os.path.join(self.state_dir, f"round-{round_number}")

    def partial_path(self, round_number: int, participant_id: str, number: int = 0) -> str:
        """Where the participant's `number`-th upload is spooled (made off the reactor: `upload.open_spool`).

        Each upload has a file of its own: the files of one broken off are
        removed on a disk thread, perhaps after the participant's next upload
        began, which must not lose its file to that.
        """
        return os.path.join(self.round_dir(round_number), f"{_file_name(participant_id)}.{number}{PARTIAL_SUFFIX}")

    def result_path(self, round_number: int, participant_id: str) -> str:
        return os.path.join(self.round_dir(round_number), _file_name(participant_id) + RESULT_SUFFIX)

    def commit_result(self, partial: str, round_number: int, participant_id: str) -> str:
        """Turn a confirmed upload into a kept result (atomic rename, then a durable directory)."""
        path = self.result_path(round_number, participant_id)
        os.replace(partial, path)
        fsync_directory(os.path.dirname(path))
        return path

    def stored_results(self, round_number: int) -> dict[str, str]:
        """Results kept for `round_number`, by participant id; leftover partial uploads are removed.

        A result whose name stands for no participant id is a `StateFileError`:
        it was not written here, and guessing whose it is could count it twice.
        """
        directory = self.round_dir(round_number)
        results: dict[str, str] = {}
        try:
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            return results
        for name in names:
            path = os.path.join(directory, name)
            if name.endswith(PARTIAL_SUFFIX):
                os.unlink(path)
            elif name.endswith(RESULT_SUFFIX):
                participant_id = _participant_id(name[: -len(RESULT_SUFFIX)])
                if participant_id is None:
                    raise StateFileError(
                        f"{path}: not a result of this store (the name must be a participant id in URL-safe base64)"
                    )
                results[participant_id] = path
        return results

    # -- new global models ----------------------------------------------------

    def new_model_path(self, round_number: int) -> str:
        return os.path.join(self.state_dir, f"model-{round_number}.npy.tmp")

    def install_model(self, produced: str, round_number: int, etag: str | None = None) -> GlobalModel:
        """Make the model produced at `produced` the global model of `round_number`.

        The model file is made durable first; rewriting aggregator.json is
        the commit point. What it supersedes is left to `remove_superseded`,
        which the caller runs after answering, as nothing waits on it.
        `etag`: the one the reduce gave the model (every shard installs it
        under the same, so `storage.s3` holds it once); a new one otherwise.
        """
        with open(produced, "rb") as stream:
            os.fsync(stream.fileno())
        model_file = f"model-{round_number}.npy"
        path = os.path.join(self.state_dir, model_file)
        for companion in self._companions(produced):
            # The optimizer state written beside it: durable and in place before the commit point.
            with open(companion, "rb") as stream:
                os.fsync(stream.fileno())
            os.replace(companion, companion.removesuffix(".tmp"))
        os.replace(produced, path)
        if etag is None:
            etag = f'"m{round_number}-{secrets.token_hex(6)}"'
        document = {"model_round": round_number, "model_file": model_file, "etag": etag}
        write_atomically(self.state_path, json.dumps(document).encode() + b"\n")
        return GlobalModel(round=round_number, path=path, size=os.stat(path).st_size, etag=etag)

    @staticmethod
    def _companions(produced: str) -> list[str]:
        """The state files written beside a new model ``model-<m>.npy.tmp``: ``model-<m>.<name>.npy.tmp``."""
        directory, name = os.path.split(produced)
        stem = name.removesuffix(".npy.tmp") + "."
        return [
            os.path.join(directory, entry)
            for entry in sorted(os.listdir(directory))
            if entry.startswith(stem) and entry.endswith(".npy.tmp") and entry != name
        ]

    def shard_sum_path(self, round_number: int, shard: str) -> str:
        """Where a shard's partial sum of `round_number` is kept (its own, or one fetched for the reduce)."""
        return os.path.join(self.round_dir(round_number), f"{shard}{SHARD_SUM_SUFFIX}")

    def remove_superseded(self, round_number: int) -> None:
        """Remove the models and round directories of rounds before `round_number`.

        Only older rounds: this may run late, next to the work of a newer
        round, whose files it must not touch.
        """
        for name in os.listdir(self.state_dir):
            older = _round_of(name)
            if older is None or older >= round_number:
                continue
            path = os.path.join(self.state_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def adopt_round(self, model: GlobalModel, round_number: int) -> GlobalModel:
        """Relabel the current model as the one of `round_number` (the coordinator is ahead)."""
        etag = f'"m{round_number}-{secrets.token_hex(6)}"'
        model_file = os.path.basename(model.path) if model.path else None
        document = {"model_round": round_number, "model_file": model_file, "etag": etag}
        write_atomically(self.state_path, json.dumps(document).encode() + b"\n")
        return GlobalModel(round=round_number, path=model.path, size=model.size, etag=etag)
