"""Server optimizers: the round's average taken as a pseudo-gradient and stepped with momentum or adaptivity.

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2,
and FedAvgM (Hsu et al., 2019). With ``x`` the global model the round
started from and ``a`` the round's average (what fedavg would install):

- ``d = a - x`` (the pseudo-gradient);
- fedavg:     ``x' = x + lr * d``;
- fedavgm:    ``m = momentum * m + d``; ``x' = x + lr * m``;
- fedadagrad: ``m = b1 * m + (1 - b1) * d``; ``v = v + d**2``;
- fedyogi:    ``m`` as above; ``v = v - (1 - b2) * d**2 * sign(v - d**2)``;
- fedadam:    ``m`` as above; ``v = b2 * v + (1 - b2) * d**2``;
- the adaptive three: ``x' = x + lr * m / (sqrt(v) + tau)``.

The state starts at ``m = 0`` and ``v = tau**2`` (the paper's
``v_{-1} >= tau**2``) and has no bias correction, as in the paper. The
first round of a training without a global model installs the average as
it is (there is nothing to take a step from) and leaves the state at its
start.

The state lives beside the model it belongs to, as float64 ``.npy`` files
named after it (`state_path`): ``model-7.npy`` has ``model-7.m.npy`` and
``model-7.v.npy``. The new model and its state are written side by side
as ``.tmp`` files and installed together by the store, whose state file is
the one commit point: a SIGKILL before it leaves the old model with its
old state, after it the new model with its new state, never a mix. A model
without state files (a training that began with another strategy) starts
the state afresh, which the log says.

Everything is computed in float64, chunk by chunk, so memory is a few
chunks whatever the model's size, plus what the averaging backend holds.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from xaind.aggregator.backends import AggregationBackend, BackendError, WeightedAverageBackend, _read_exactly
from xaind.aggregator.result_set import ModelFile, ModelWriter, read_model_file
from xaind.logs import get_logger

__all__ = ["OPTIMIZER_STATE", "OptimizerParameters", "ServerOptimizerBackend", "state_path"]

log = get_logger("xaind.aggregator.optimizers")

#: The state arrays each strategy keeps beside the model (float64, one element per weight).
OPTIMIZER_STATE: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavgm": ("m",),
    "fedadagrad": ("m", "v"),
    "fedyogi": ("m", "v"),
    "fedadam": ("m", "v"),
}

#: Elements of each array held at a time: 8 MiB of float64 per array.
CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class OptimizerParameters:
    rule: str
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.rule not in OPTIMIZER_STATE:
            raise ValueError(f"unknown server optimizer {self.rule!r}")


def state_path(model_path: str, name: str) -> str:
    """Where the state array `name` of the model at `model_path` lives (also for ``.npy.tmp`` models)."""
    head, separator, tail = model_path.rpartition(".npy")
    if not separator:
        raise ValueError(f"not a .npy model path: {model_path}")
    return f"{head}.{name}.npy{tail}"


def step(parameters: OptimizerParameters, x: np.ndarray, average: np.ndarray, state: dict[str, np.ndarray]) -> np.ndarray:
    """The new model for one chunk (float64 in and out); updates `state`'s arrays in place."""
    d = average - x
    p = parameters
    if p.rule == "fedavg":
        return x + p.learning_rate * d
    m = state["m"]
    if p.rule == "fedavgm":
        m *= p.momentum
        m += d
        return x + p.learning_rate * m
    m *= p.beta_1
    m += (1.0 - p.beta_1) * d
    v = state["v"]
    d2 = d * d
    if p.rule == "fedadagrad":
        v += d2
    elif p.rule == "fedyogi":
        v -= (1.0 - p.beta_2) * d2 * np.sign(v - d2)
    else:  # fedadam
        v *= p.beta_2
        v += (1.0 - p.beta_2) * d2
    return x + p.learning_rate * m / (np.sqrt(v) + p.tau)


def initial_state(parameters: OptimizerParameters, name: str, count: int) -> np.ndarray:
    return np.full(count, parameters.tau**2 if name == "v" else 0.0, dtype=np.float64)


class ServerOptimizerBackend:
    """Wraps the averaging backend: results fold into it as usual; `aggregate` steps from its average."""

    def __init__(self, average: AggregationBackend, parameters: OptimizerParameters, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        self.average = average
        self.parameters = parameters
        self._chunk_elements = max(1, chunk_elements)
        self._model_path: str | None = None

    # -- the round: the averaging backend's

    def reset(self, global_model_path: str | None) -> None:
        self.average.reset(global_model_path)
        self._model_path = global_model_path

    def add_result(self, result_path: str, stream: BinaryIO | None = None) -> None:
        self.average.add_result(result_path, stream)

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        return self.average.add_results(sources)

    @property
    def results(self) -> int:
        return self.average.results

    # -- the step

    def aggregate(self, destination_path: str) -> None:
        if self._model_path is None:
            self.average.aggregate(destination_path)  # nothing to step from: the average, state at its start
            return
        # Not a state file (those end in .npy.tmp): a partial one, removed with its round if left behind.
        average_path = state_path(destination_path, "average") + ".partial"
        try:
            self._aggregate_average(average_path)
            self._step_to(destination_path, read_model_file(self._model_path), read_model_file(average_path))
        finally:
            _remove(average_path)

    def _aggregate_average(self, path: str) -> None:
        """The round's average in float64 where the backend can write it so (no rounding before the step)."""
        if isinstance(self.average, WeightedAverageBackend):
            self.average.aggregate(path, dtype=np.dtype(np.float64))
        else:
            self.average.aggregate(path)

    def _step_to(self, destination_path: str, model: ModelFile, average: ModelFile) -> None:
        if average.shape != model.shape:
            raise BackendError(f"the round's average has shape {average.shape}, the global model {model.shape}")
        count = math.prod(model.shape)
        names = OPTIMIZER_STATE[self.parameters.rule]
        with contextlib.ExitStack() as held:
            x_of = held.enter_context(contextlib.closing(_ArrayReader(model)))
            a_of = held.enter_context(contextlib.closing(_ArrayReader(average, like=model)))
            old_state = {name: self._open_state(held, model.path, name, count) for name in names}
            outputs = [ModelWriter(destination_path, model.dtype, model.shape, model.fortran_order)]
            outputs += [ModelWriter(state_path(destination_path, name), np.dtype(np.float64), (count,), False) for name in names]
            writers = [held.enter_context(output) for output in outputs]
            for start in range(0, count, self._chunk_elements):
                stop = min(start + self._chunk_elements, count)
                state = {name: old(start, stop) for name, old in old_state.items()}
                new = step(self.parameters, x_of(start, stop), a_of(start, stop), state)
                if not np.isfinite(new).all():
                    raise BackendError(f"the {self.parameters.rule} step made a non-finite weight (near element {start})")
                writers[0].write(start, new)
                for writer, name in zip(writers[1:], names):
                    writer.write(start, state[name])

    def _open_state(
        self, held: contextlib.ExitStack, model_path: str, name: str, count: int
    ) -> Callable[[int, int], np.ndarray]:
        path = state_path(model_path, name)
        if not os.path.exists(path):
            log.warn(
                "{strategy} state {name} of {model} is missing: it starts afresh",
                strategy=self.parameters.rule, name=name, model=os.path.basename(model_path),
            )
            return lambda start, stop: initial_state(self.parameters, name, stop - start)
        state = read_model_file(path)
        if state.dtype != np.float64 or state.shape != (count,):
            raise BackendError(f"{path}: {state.dtype} of shape {state.shape}, the state of this model is float64 of shape ({count},)")
        return held.enter_context(contextlib.closing(_ArrayReader(state)))


class _ArrayReader:
    """Reads element ranges of a stored array as float64 with positioned reads (no mapping: RSS stays a chunk)."""

    def __init__(self, file: ModelFile, like: ModelFile | None = None) -> None:
        self.file = file
        self._whole: np.ndarray | None = None
        self._descriptor: int | None = None
        if like is not None and len(file.shape) >= 2 and file.fortran_order != like.fortran_order:
            # Rare (the round's first result was in the other order than the model): read whole, reordered.
            self._whole = np.load(file.path, allow_pickle=False).ravel(order="F" if like.fortran_order else "C")
        else:
            self._descriptor = os.open(file.path, os.O_RDONLY)

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if self._whole is not None:
            return np.asarray(self._whole[start:stop], dtype=np.float64)
        assert self._descriptor is not None
        itemsize = self.file.dtype.itemsize
        raw = np.empty((stop - start) * itemsize, dtype=np.uint8)
        _read_exactly(self._descriptor, raw, self.file.data_offset + start * itemsize, self.file.path)
        return raw.view(self.file.dtype).astype(np.float64)

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
