"""State that must survive a restart, written so that a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass


def write_atomically(path: str, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old or the new content, never a mix.

    The data is fsynced before the rename and the directory after it, so the
    new content survives a power loss once this returns.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory_descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_descriptor)
    finally:
        os.close(directory_descriptor)


class StateFileError(Exception):
    """A state file exists but cannot be used; refusing beats silently restarting training."""


@dataclass(frozen=True)
class RoundProgress:
    """How far training got: `round` rounds were aggregated successfully."""

    round: int


class RoundStore:
    """The coordinator's round counter in `<state_dir>/coordinator.json`."""

    FILENAME = "coordinator.json"

    def __init__(self, state_dir: str) -> None:
        self.path = os.path.join(state_dir, self.FILENAME)

    def load(self) -> RoundProgress:
        try:
            with open(self.path, "rb") as stream:
                document = json.loads(stream.read())
        except FileNotFoundError:
            return RoundProgress(round=0)
        except (OSError, ValueError) as error:
            raise StateFileError(f"{self.path}: cannot be read ({error})") from None
        round_number = document.get("round") if isinstance(document, dict) else None
        if isinstance(round_number, bool) or not isinstance(round_number, int) or round_number < 0:
            raise StateFileError(f"{self.path}: 'round' must be a whole number >= 0, got {round_number!r}")
        return RoundProgress(round=round_number)

    def save(self, progress: RoundProgress) -> None:
        write_atomically(self.path, json.dumps({"round": progress.round}).encode() + b"\n")
