"""Participant-side clipping: bound the L2 norm of what one round of training changed before it leaves.

A participant that clips its own update never hands the servers more than
``clip_norm`` of movement, whatever its data did to the training: with
server-side noise calibrated to the same bound (DP-FedAvg) that is the
contribution the privacy guarantee assumes, enforced where the data is,
and it caps the damage one diverging participant does to a plain average.
"""

from __future__ import annotations

import math
from numbers import Real

import numpy as np

from xaind.sdk.participant import ParticipantError

__all__ = ["check_clip_norm", "clip_update"]


def check_clip_norm(clip_norm: float | None) -> None:
    """`ValueError` unless `clip_norm` is None or a finite number > 0."""
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, Real) or not math.isfinite(clip_norm) or clip_norm <= 0:
        raise ValueError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")


def clip_update(trained: np.ndarray, received: np.ndarray | None, clip_norm: float) -> np.ndarray:
    """`trained` moved back towards `received` so that ``||trained - received||_2 <= clip_norm``.

    Without `received` (the first round: no global model yet) the update is
    the weights themselves, scaled towards 0. An update within the bound
    comes back unchanged (the same array); a longer one is scaled by
    ``clip_norm / ||update||``, computed in float64 and stored in `trained`'s
    dtype, so its norm is the bound up to that dtype's rounding.

    Raises `ParticipantError` when the shapes differ or the update holds
    inf or nan: no scaling bounds such an update.
    """
    if received is not None and received.shape != trained.shape:
        raise ParticipantError(f"cannot clip the update: trained weights of shape {trained.shape}, the global model's {received.shape}")
    update = np.array(trained, dtype=np.float64)
    if received is not None:
        update -= np.asarray(received, dtype=np.float64)
    norm = float(np.linalg.norm(update.ravel()))
    if not math.isfinite(norm):
        raise ParticipantError("cannot clip the update: the trained weights or the global model hold inf or nan")
    if norm <= clip_norm:
        return trained
    update *= clip_norm / norm
    if received is not None:
        update += received
    return update.astype(trained.dtype)
