"""Differential privacy for the average: DP-FedAvg's clipped, noised mean, and the privacy it spends.

McMahan et al., "Learning Differentially Private Recurrent Language
Models" (ICLR 2018), make federated averaging differentially private at
the level of participants (not of their samples): each participant's
update is clipped to an L2 bound, so that no one participant can move the
sum by more than that bound, and Gaussian noise proportional to the bound
hides any one participant's presence. `PrivateAverageBackend` does this on
the server, reading the round's spooled results twice, chunk by chunk
(their norms, then the clipped, noised mean): memory is one chunk per
result plus the output, never the results themselves.

`PrivacyAccountant` turns the noise, the sampling rate and the rounds run
into the ε spent at a chosen δ with Google's ``dp-accounting`` package
(the ``dp`` extra: ``pip install 'xaind[dp]'``), imported only when asked.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
from numbers import Real
from types import ModuleType
from typing import Any, BinaryIO

import numpy as np

from xaind.aggregator.backends import BackendError
from xaind.aggregator.result_set import DEFAULT_MEMORY_BUDGET_BYTES, HeldResultsBackend, ModelWriter
from xaind.aggregator.update_norms import UpdateNorm, update_norms

__all__ = [
    "PrivacyAccountant",
    "PrivacyAccountingUnavailable",
    "PrivateAverageBackend",
    "clip_factor",
    "privacy_parameter_problem",
]


class PrivacyAccountingUnavailable(RuntimeError):
    """The ``dp-accounting`` package, which computes ε, is not installed."""


def privacy_parameter_problem(clip_norm: Any, noise_multiplier: Any, delta: Any, sampling_rate: Any) -> str | None:
    """The first thing wrong with these differential-privacy parameters, in one line naming its key; None if none.

    A noise multiplier of 0 is allowed (clipping alone; ε is then infinite).
    """
    checks: list[tuple[str, Any, str, Any]] = [
        ("clip_norm", clip_norm, "> 0", lambda value: value > 0),
        ("noise_multiplier", noise_multiplier, ">= 0", lambda value: value >= 0),
        ("delta", delta, "in (0, 1)", lambda value: 0 < value < 1),
        ("sampling_rate", sampling_rate, "in (0, 1]", lambda value: 0 < value <= 1),
    ]
    for key, value, wanted, holds in checks:
        if isinstance(value, bool) or not isinstance(value, Real):
            return f"{key} must be a number {wanted}, got {value!r}"
        if not math.isfinite(value) or not holds(value):
            return f"{key} must be {wanted}, got {value!r}"
    return None


def clip_factor(norm: float, clip_norm: float) -> float:
    """What an update of L2 norm `norm` is multiplied by so that its norm is at most `clip_norm`.

    A non-finite norm (a result holding inf or nan) gives 0: such an update
    cannot be scaled into the bound, and leaving it out of the sum (it
    still counts in n) keeps every participant's contribution within it.
    """
    if not math.isfinite(norm):
        return 0.0
    return 1.0 if norm <= clip_norm else clip_norm / norm


class PrivateAverageBackend(HeldResultsBackend):
    """DP-FedAvg's aggregate with server-side fixed clipping: g + mean of clipped updates + Gaussian noise.

    With ``g`` the round's global model (zeros in the first round, when
    there is none) and ``d_i = x_i - g`` participant ``i``'s update, the new
    model is ``g + (sum_i c_i d_i) / n + N(0, sigma^2)`` per coordinate, with
    ``c_i = min(1, clip_norm / ||d_i||)`` (`clip_factor`),
    ``sigma = noise_multiplier * clip_norm / n`` and ``n`` the number of
    results.

    Equal weights, not sample counts: the noise hides one participant only
    if no participant can move the average by more than ``clip_norm / n``.
    Weighted by ``n_i / sum(n_i)``, a participant with most of the samples
    would move it by up to ``clip_norm`` (and the sample counts are the
    participants' own say, themselves a channel), so the noise would have to
    be ``n`` times larger for the same guarantee. ``n`` is taken as fixed
    by the round rules (the coordinator selects a set number of
    participants per round), not by who took part, as the paper's
    fixed-denominator estimator divides by the expected count for the same
    reason.

    Two passes over each result: its update norm is measured as it is
    added (`update_norms`), while the round's other uploads arrive, as the
    weighted average folds; aggregation then reads each chunk of every
    result once more, clips, sums, adds noise and writes the chunk. Memory:
    ``len(results) + 4`` float64 rows of a chunk within
    `memory_budget_bytes`, whatever the model's size.

    Noise: the generator is ``numpy.random.default_rng(secrets.randbits(128))``
    (a cryptographically seeded PCG64; never a fixed seed) unless `rng` is
    given, which only tests do. Draw order: one ``standard_normal`` draw per
    chunk, chunks in increasing element order (file order), scaled by
    ``sigma``; for numpy's `Generator` that is the same sequence as one
    ``standard_normal(size)`` draw of the whole model. No draw is made when
    ``noise_multiplier`` is 0. Every `aggregate` draws fresh noise, a retried
    one too: only the model the aggregator commits is ever published.

    After each `aggregate`, `last_norms` holds every result's update norm
    (in the order added) and `last_clipped` how many were scaled down (or
    left out, non-finite), for the logs and ``/status``.
    """

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        rng: np.random.Generator | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> None:
        problem = privacy_parameter_problem(clip_norm, noise_multiplier, 0.5, 1.0)
        if problem is not None:
            raise ValueError(problem)
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self._rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        super().__init__(memory_budget_bytes)
        #: Each held result's update norm, measured as it was added (None: to measure at aggregation).
        self._norms: list[UpdateNorm | None] = []
        self.last_norms: list[UpdateNorm] = []
        self.last_clipped = 0

    # -- the round: each result's norm measured as it comes, so that aggregation is one pass

    def reset(self, global_model_path: str | None) -> None:
        super().reset(global_model_path)
        self._norms = []

    def add_results(self, sources: list[tuple[str, BinaryIO | None]]) -> list[BackendError | None]:
        before = len(self._results)
        outcomes = super().add_results(sources)
        added = self._results.results[before:]
        try:
            self._norms.extend(update_norms(self._results, only=added))
        except (BackendError, OSError):
            self._norms.extend([None] * len(added))  # held all the same: measured again at aggregation
        return outcomes

    def _all_norms(self) -> list[UpdateNorm]:
        held = self._results.results
        missing = [result for result, norm in zip(held, self._norms) if norm is None]
        measured = iter(update_norms(self._results, only=missing) if missing else [])
        self._norms = [norm if norm is not None else next(measured) for norm in self._norms]
        return [norm for norm in self._norms if norm is not None]

    # -- the new global model

    def aggregate(self, destination_path: str) -> None:
        results = self._results
        n = len(results)
        if n == 0:
            raise BackendError("cannot aggregate: no results were added this round")
        norms = self._all_norms()
        factors = [clip_factor(norm.norm, self.clip_norm) for norm in norms]
        sigma = self.noise_multiplier * self.clip_norm / n
        rows_needed = n + 4  # the results, the global model, the sum, the noise, the writer's converted copy
        columns = min(results.chunk_elements(rows_needed), results.size)
        rows = np.empty((n, columns), dtype=np.float64)
        model = np.empty(columns, dtype=np.float64) if results.model is not None else None
        total = np.empty(columns, dtype=np.float64)
        noise = np.empty(columns, dtype=np.float64) if sigma > 0 else None
        with ModelWriter.for_round(destination_path, results) as writer:
            for start, stop in results.chunks(rows_needed):
                count = stop - start
                chunk = results.read_rows(start, stop, rows[:, :count])
                if model is not None:
                    results.read_model(start, model[:count])
                out = total[:count]
                out[...] = 0.0
                for row, factor in zip(chunk, factors):
                    if factor == 0.0:
                        continue
                    if model is not None:
                        np.subtract(row, model[:count], out=row)
                    if factor != 1.0:
                        np.multiply(row, factor, out=row)
                    out += row
                out /= n
                if model is not None:
                    out += model[:count]
                if noise is not None:
                    drawn = self._rng.standard_normal(out=noise[:count])
                    drawn *= sigma
                    out += drawn
                writer.write(start, out)
        self.last_norms = norms
        self.last_clipped = sum(1 for factor in factors if factor < 1.0)


class PrivacyAccountant:
    """ε spent after some rounds of the Gaussian mechanism on Poisson-sampled participants, at a fixed δ.

    Each round is ``PoissonSampledDpEvent(sampling_rate,
    GaussianDpEvent(noise_multiplier))``; `epsilon` composes ``rounds`` of
    them in ``dp-accounting``'s Rényi-DP accountant (its default orders and
    add-or-remove-one neighbouring relation) and converts to ε at `delta`.
    A noise multiplier of 0 spends ε = inf from the first round.
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        problem = privacy_parameter_problem(1.0, noise_multiplier, delta, sampling_rate)
        if problem is not None:
            raise ValueError(problem)
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)

    def epsilon(self, rounds: int) -> float:
        """ε after `rounds` rounds (0.0 for none); `PrivacyAccountingUnavailable` without ``dp-accounting``."""
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
            raise ValueError(f"rounds must be an int >= 0, got {rounds!r}")
        if rounds == 0:
            return 0.0
        _dp_accounting()  # before the cache: a package removed since must still be reported
        return _epsilon(self.noise_multiplier, self.sampling_rate, self.delta, rounds)


@functools.lru_cache(maxsize=256)
def _epsilon(noise_multiplier: float, sampling_rate: float, delta: float, rounds: int) -> float:
    """Cached: the aggregator asks again for the same round (``/status``, the logs, the summary)."""
    dp = _dp_accounting()
    event = dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(sampling_rate, dp.GaussianDpEvent(noise_multiplier)), rounds)
    accountant = dp.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


class _NotConverging(logging.Filter):
    """Drops the RDP accountant's warnings about fractional orders it leaves out.

    For small sampling rates it warns, at every call, that its series for a
    few orders below 2 did not converge and that it leaves those orders out;
    ε is then the minimum over the others, still a valid bound. Asked for ε
    every round, the aggregator's log would fill with them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


def _dp_accounting() -> ModuleType:
    try:
        import dp_accounting
        from dp_accounting import rdp  # noqa: F401 - a submodule the package does not import itself in every release
    except ImportError as error:
        raise PrivacyAccountingUnavailable(
            f"differential privacy accounting needs the dp-accounting package ({' '.join(str(error).split())}): "
            "pip install 'xaind[dp]'"
        ) from None
    absl = logging.getLogger("absl")
    if not any(isinstance(existing, _NotConverging) for existing in absl.filters):
        absl.addFilter(_NotConverging())
    return dp_accounting
