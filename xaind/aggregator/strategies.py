"""The backend `aggregation.strategy` names, built from the aggregator's settings (docs/strategies.rst).

- fedavg with the default learning rate of 1 and without differential
  privacy is the built-in weighted average alone, bit for bit as before;
- fedavg with another learning rate, and the server optimizers, wrap the
  averaging backend in a `ServerOptimizerBackend`;
- differential privacy replaces the weighted average by the clipped,
  noised equal-weight average (`PrivateAverageBackend`) under any of them;
- the robust rules (median, trimmed_mean, krum, multi_krum) read every
  result of the round at aggregation (`RobustBackend`).
"""

from __future__ import annotations

from xaind.aggregator.backends import AggregationBackend, BackendError, WeightedAverageBackend, load_backend
from xaind.aggregator.optimizers import OptimizerParameters, ServerOptimizerBackend
from xaind.aggregator.settings import ROBUST_RULES, AggregationSettings

__all__ = ["build_backend", "last_choices"]


def build_backend(aggregation: AggregationSettings) -> AggregationBackend:
    """The backend for these settings; `BackendError` (one line) if it cannot be built."""
    if aggregation.backend != "weighted_average":
        return load_backend(aggregation.backend, aggregation.module, aggregation.class_name)
    if aggregation.strategy in ROBUST_RULES:
        from xaind.aggregator.robust import RobustBackend

        return RobustBackend(
            aggregation.strategy,
            trim_fraction=aggregation.trim_fraction,
            byzantine=aggregation.byzantine,
            krum_selected=aggregation.krum_selected,
        )
    average: AggregationBackend
    if aggregation.privacy is not None:
        from xaind.aggregator.privacy import PrivateAverageBackend

        average = PrivateAverageBackend(aggregation.privacy.clip_norm, aggregation.privacy.noise_multiplier)
    else:
        average = WeightedAverageBackend()
    if aggregation.strategy == "fedavg" and aggregation.learning_rate == 1.0:
        return average
    parameters = OptimizerParameters(
        rule=aggregation.strategy,
        learning_rate=aggregation.learning_rate,
        momentum=aggregation.server_momentum,
        beta_1=aggregation.beta_1,
        beta_2=aggregation.beta_2,
        tau=aggregation.tau,
    )
    try:
        return ServerOptimizerBackend(average, parameters)
    except ValueError as error:
        raise BackendError(str(error)) from None


def last_choices(backend: AggregationBackend) -> tuple[list[str] | None, int | None]:
    """What the backend's last aggregation chose (Krum's results, as paths) and how many updates it clipped.

    (None, None) for rules that neither choose nor clip. Read on the worker
    thread, between the backend's own calls.
    """
    from xaind.aggregator.privacy import PrivateAverageBackend
    from xaind.aggregator.robust import RobustBackend

    inner = backend.average if isinstance(backend, ServerOptimizerBackend) else backend
    selected = None
    if isinstance(inner, RobustBackend) and inner.last_selection is not None:
        selected = [what.removeprefix("result ") for what in inner.last_selection]
    clipped = inner.last_clipped if isinstance(inner, PrivateAverageBackend) else None
    return selected, clipped
