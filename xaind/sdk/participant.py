"""The participant's side of the contract: train one round."""

from __future__ import annotations

import abc

import numpy as np


class ParticipantError(Exception):
    """A participant cannot go on (its own code failed, or the servers refuse its results)."""


class Participant(abc.ABC):
    """A party that trains the shared model on its own data, which never leaves it."""

    @abc.abstractmethod
    def train_round(self, weights: np.ndarray | None) -> tuple[np.ndarray, int]:
        """Train one round starting from the global `weights`.

        `weights` is None in the very first round: initialise the model
        yourself. Return the new weights (a float16/32/64 array) and the
        number of samples they were trained on (it weighs the result in the
        average; 0 is allowed).

        This runs in a worker thread, beside the heartbeats: it may take as
        long as the coordinator's training_timeout allows.
        """

    def on_round_started(self, round_number: int) -> None:
        """Called when the participant learns it is selected for `round_number`, before training."""

    def on_global_model_size(self, size: int) -> None:
        """Called with the size in bytes of each global model downloaded (0 before the first aggregation)."""

    def on_round_delivered(self, round_number: int) -> None:
        """Called after the result of `round_number` was accepted (for logging or metrics)."""

    def on_training_finished(self) -> None:
        """Called once the coordinator says training is complete."""
