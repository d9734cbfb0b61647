"""Byzantine-robust aggregation from the round's spooled results: median, trimmed mean, Krum, multi-Krum.

A participant that sends a poisoned update moves a weighted average as far
as it likes; these rules bound what a minority can do. Every one of them
needs all the round's results at once, so they are computed from the
results held open by `ResultSet`, one range of elements at a time: memory
is the ``results x chunk`` float64 matrix (sized by the set's memory budget)
plus, for Krum, an ``n x n`` float64 matrix, never the results themselves.

All rules are unweighted: a result's sample count is ignored, because it is
whatever the participant claims, and a Byzantine participant would claim a
large one to weigh more.

Rules (``n`` results, in the order they were added):

- ``median``: the coordinate-wise median (numpy's definition: for even
  ``n`` the mean of the two middle values).
- ``trimmed_mean``: per coordinate, the ``n`` values sorted, ``k =
  floor(trim_fraction * n)`` dropped at each side, the mean of the rest
  (``scipy.stats.trim_mean``'s definition).
- ``krum``: the result with the lowest Krum score (Blanchard et al.,
  "Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent",
  NeurIPS 2017): the sum of the squared L2 distances to its ``n - f - 2``
  closest other results, ``f`` the Byzantine participants assumed
  (``aggregation.byzantine``). Defined for ``n > 2f + 2`` only, as in the
  paper: fewer results are refused at aggregation (one line naming the key
  and ``n``). With ``f = 0`` that still means three results at least: with
  two, each has no neighbour left to score it and the choice would be
  arbitrary, not robust.
- ``multi_krum``: the element-wise mean, with equal weights, of the ``m``
  results with the lowest Krum scores (El Mhamdi et al., "The Hidden
  Vulnerability of Distributed Learning in Byzantium", ICML 2018); ``m =
  aggregation.krum_selected``, 0 meaning ``n - f``; ``1 <= m <= n - f``.

Ties: equal Krum scores (identical results, for one) are broken by the
order the results were added, the first added first, so a round's choice
never depends on anything but its results and their order. The
coordinate-wise rules do not depend on the order at all: the kept values
are summed in ascending order, so any permutation of the results gives the
same bits.

Not-a-number values: the coordinate-wise rules order values as numpy sorts
them, NaN above +inf, so a NaN counts as the largest value instead of
making the whole coordinate NaN as ``numpy.median`` would (one participant
could otherwise wipe out any coordinate). For finite values the rules are
exactly the definitions above. For Krum a distance that is not a number
(a result holding NaN or an infinity) counts as +inf: such a result is
farthest from every other one.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import numpy as np

from xaind.aggregator.backends import BackendError
from xaind.aggregator.result_set import DEFAULT_MEMORY_BUDGET_BYTES, HeldResultsBackend, ModelWriter

__all__ = [
    "ROBUST_RULES",
    "RobustBackend",
    "coordinate_median",
    "krum_scores",
    "krum_order",
    "minimum_results",
    "robust_parameter_problem",
    "trimmed_mean",
    "trimmed_count",
]

ROBUST_RULES = ("median", "trimmed_mean", "krum", "multi_krum")


# --------------------------------------------------------------------------
# Parameters


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def robust_parameter_problem(rule: str, trim_fraction: object, byzantine: object, krum_selected: object) -> str | None:
    """What is wrong with these parameters for `rule`, in one line naming the key; None when nothing is.

    Only the parameters the rule uses are checked, so the defaults of the
    others never stand in the way. How many results a round brings is not
    known here: `minimum_results` says what a rule needs, to compare with
    the coordinator's participants per round.
    """
    if rule not in ROBUST_RULES:
        return f"aggregation.strategy: {rule!r} is not a robust rule (one of {', '.join(ROBUST_RULES)})"
    if rule == "trimmed_mean":
        if not isinstance(trim_fraction, numbers.Real) or isinstance(trim_fraction, bool):
            return f"aggregation.trim_fraction: {trim_fraction!r} is not a number"
        if not (0.0 <= float(trim_fraction) < 0.5):
            return f"aggregation.trim_fraction: {trim_fraction!r} is outside [0, 0.5) (the fraction trimmed at each side)"
    if rule in ("krum", "multi_krum"):
        if not _is_int(byzantine):
            return f"aggregation.byzantine: {byzantine!r} is not an integer"
        if int(byzantine) < 0:  # type: ignore[call-overload]
            return f"aggregation.byzantine: {byzantine!r} is negative"
    if rule == "multi_krum":
        if not _is_int(krum_selected):
            return f"aggregation.krum_selected: {krum_selected!r} is not an integer"
        if int(krum_selected) < 0:  # type: ignore[call-overload]
            return f"aggregation.krum_selected: {krum_selected!r} is negative (0 means n - byzantine)"
    return None


def minimum_results(rule: str, byzantine: int = 0, krum_selected: int = 0) -> int:
    """The fewest results a round needs for `rule` to be defined with these (valid) parameters.

    Krum needs ``n >= 2f + 3``; multi-Krum also ``m <= n - f`` when ``m`` is
    given. The coordinate-wise rules are defined from one result on.
    """
    if rule in ("krum", "multi_krum"):
        needed = 2 * byzantine + 3
        if rule == "multi_krum" and krum_selected > 0:
            needed = max(needed, krum_selected + byzantine)
        return needed
    return 1


def trimmed_count(trim_fraction: float, n: int) -> int:
    """Values dropped at each side: ``floor(trim_fraction * n)``, as scipy's trim_mean, keeping one at least.

    The cap only matters when rounding of ``trim_fraction * n`` (with a
    fraction a hair below 0.5) reaches ``n / 2``: the rule would then have
    nothing left to average.
    """
    return min(int(trim_fraction * n), (n - 1) // 2)


# --------------------------------------------------------------------------
# The rules on one chunk (one row per result), exposed for the reference tests


def _sum_rows(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Rows added one after the other into `out`.

    An explicit order, not ``rows.sum(axis=0)``: numpy's summation order
    along an axis depends on the array's layout (pairwise for one column),
    and the output must not depend on how the elements were split in chunks.
    """
    np.copyto(out, rows[0])
    for row in rows[1:]:
        out += row
    return out


def coordinate_median(rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Median of each column of `rows` (sorted in place) into `out`.

    Sorting rather than ``np.median``: equal values (numpy's median is the
    mean of the two middle values too, computed the same way: their sum
    halved), faster (numpy partitions column by column, slower than its
    sort for a few rows), and NaN ordered last instead of propagated.
    """
    n = len(rows)
    rows.sort(axis=0)
    if n % 2:
        np.copyto(out, rows[n // 2])
    else:
        np.add(rows[n // 2 - 1], rows[n // 2], out=out)
        out /= 2.0
    return out


def trimmed_mean(rows: np.ndarray, trim: int, out: np.ndarray) -> np.ndarray:
    """Mean of each column of `rows` (sorted in place) without its `trim` lowest and `trim` highest values.

    The kept values are added in ascending order: the same values always
    give the same bits, whatever the order the results arrived in.
    """
    n = len(rows)
    rows.sort(axis=0)
    _sum_rows(rows[trim : n - trim], out)
    out /= float(n - 2 * trim)
    return out


def krum_scores(squared_distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Each result's Krum score: the sum of its ``n - f - 2`` smallest squared distances to the others.

    Distances that are not numbers count as +inf. The smallest are summed in
    ascending order (deterministic for equal distances).
    """
    n = len(squared_distances)
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs n >= 2f + 3 (n = {n}, f = {byzantine})")
    distances = np.where(np.isnan(squared_distances), np.inf, squared_distances)
    np.fill_diagonal(distances, np.inf)  # a result is not its own neighbour
    distances.sort(axis=1)
    return distances[:, :neighbours].sum(axis=1)


def krum_order(scores: np.ndarray) -> np.ndarray:
    """Result indices from the lowest score up; equal scores in the order the results were added."""
    return np.argsort(scores, kind="stable")


# --------------------------------------------------------------------------
# The backend


class RobustBackend(HeldResultsBackend):
    """One of `ROBUST_RULES` over the round's results held by a `ResultSet`.

    Memory: the ``results x chunk`` float64 matrix the set's budget allows
    (``memory_budget_bytes``) plus a chunk-wide output row, and for Krum the
    ``n x n`` float64 distance matrix; the results stay on disk. The output
    has the dtype, shape and memory order `ModelWriter.for_round` gives
    (the global model's dtype, else the widest result's).

    `aggregate` does not change what was added, so it may be retried; after
    a Krum or multi-Krum aggregation `last_selection` names the results it
    chose and `last_scores` holds every result's score, for the logs.
    """

    def __init__(
        self,
        rule: str,
        *,
        trim_fraction: float = 0.1,
        byzantine: int = 1,
        krum_selected: int = 0,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    ) -> None:
        problem = robust_parameter_problem(rule, trim_fraction, byzantine, krum_selected)
        if problem is not None:
            raise ValueError(problem)
        self.rule = rule
        self.trim_fraction = float(trim_fraction)
        self.byzantine = int(byzantine)
        self.krum_selected = int(krum_selected)
        super().__init__(memory_budget_bytes)
        self._last_selection: tuple[str, ...] | None = None
        self._last_scores: tuple[float, ...] | None = None

    # -- the round

    def reset(self, global_model_path: str | None) -> None:
        self._last_selection, self._last_scores = None, None
        super().reset(global_model_path)

    @property
    def last_selection(self) -> tuple[str, ...] | None:
        """What the last Krum / multi-Krum aggregation chose (each result's name, lowest score first); else None."""
        return self._last_selection

    @property
    def last_scores(self) -> tuple[float, ...] | None:
        """The last Krum / multi-Krum aggregation's score of every result, in the order they were added; else None."""
        return self._last_scores

    # -- the new global model

    def aggregate(self, destination_path: str) -> None:
        n = len(self._results)
        self._last_selection, self._last_scores = None, None
        if n == 0:
            raise BackendError("cannot aggregate: no results were added this round")
        if self.rule == "median":
            self._coordinate_wise(destination_path, coordinate_median)
        elif self.rule == "trimmed_mean":
            trim = trimmed_count(self.trim_fraction, n)
            self._coordinate_wise(destination_path, lambda rows, out: trimmed_mean(rows, trim, out))
        else:
            selected = self._select(n)
            self._write_mean_of(destination_path, sorted(selected))

    def _coordinate_wise(self, destination_path: str, rule: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> None:
        results = self._results
        n = len(results)
        step = results.chunk_elements(n + 1)  # the matrix and the output row
        width = min(step, results.size)
        matrix = np.empty((n, width), dtype=np.float64)
        output = np.empty(width, dtype=np.float64)
        with ModelWriter.for_round(destination_path, results) as writer:
            for start, stop in results.chunks(n + 1):
                count = stop - start
                rows = results.read_rows(start, stop, matrix[:, :count])
                writer.write(start, rule(rows, output[:count]))

    def _select(self, n: int) -> list[int]:
        """Indices of the results Krum (one) or multi-Krum (``m``) chooses, lowest score first."""
        f = self.byzantine
        if n < 2 * f + 3:
            raise BackendError(
                f"cannot aggregate with {self.rule}: {n} result{'s' if n != 1 else ''}, "
                f"aggregation.byzantine: {f} needs at least {2 * f + 3} (n >= 2 * byzantine + 3)"
            )
        if self.rule == "krum":
            m = 1
        else:
            m = self.krum_selected or n - f
            if m > n - f:
                raise BackendError(
                    f"cannot aggregate with multi_krum: aggregation.krum_selected: {m} exceeds "
                    f"n - byzantine = {n - f} ({n} results, aggregation.byzantine: {f})"
                )
        scores = krum_scores(self._squared_distances(), f)
        chosen = [int(index) for index in krum_order(scores)[:m]]
        held = self._results.results
        self._last_scores = tuple(float(score) for score in scores)
        self._last_selection = tuple(held[index].what for index in chosen)
        return chosen

    def _squared_distances(self) -> np.ndarray:
        """Pairwise squared L2 distances between the results, accumulated chunk by chunk.

        Through the Gram matrix, ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``, rather than
        the differences themselves: one BLAS product per chunk (n^2 * chunk
        multiply-adds in cache-friendly blocks, on every core) where the
        differences cost n^2 / 2 passes of numpy element-wise operations
        over the chunk, measured 10 times slower at n = 20 and 30 times at
        n = 1000 (2 cores), which a thousand results cannot afford.

        The Gram form loses precision when the vectors are long compared
        with their distances (the norms cancel), which is exactly the case
        of models near one another. So each chunk is first moved (distances
        do not change under translation) by the coordinate-wise median of
        its first ``2f + 1`` rows: with at most ``f`` Byzantine results among
        them that median lies within the honest values, so the moved honest
        vectors are about as long as their distances to one another,
        whatever the Byzantine ones send. For an odd count the median is
        one of the values, so inputs with few significant bits (small
        integers, halves) stay exact, and so do their distances.
        """
        results = self._results
        n, f = len(results), self.byzantine
        head = min(2 * f + 1, n)
        gram = np.zeros((n, n), dtype=np.float64)
        product = np.empty((n, n), dtype=np.float64)
        step = results.chunk_elements(n + head + 1)  # the matrix, the sorted head and the centre
        width = min(step, results.size)
        matrix = np.empty((n, width), dtype=np.float64)
        centre = np.empty(width, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite values become +inf distances below
            for start, stop in results.chunks(n + head + 1):
                count = stop - start
                rows = results.read_rows(start, stop, matrix[:, :count])
                centre_now = centre[:count]
                np.copyto(centre_now, np.sort(rows[:head], axis=0)[head // 2])
                centre_now[~np.isfinite(centre_now)] = 0.0  # a translation by any finite vector will do
                rows -= centre_now
                gram += np.matmul(rows, rows.T, out=product)
        upper = np.triu(gram)
        gram = upper + np.triu(upper, 1).T  # exactly symmetric, whatever the product's blocking did
        norms = np.diag(gram).copy()
        with np.errstate(invalid="ignore", over="ignore"):
            distances = norms[:, None] + norms[None, :] - 2.0 * gram
        np.maximum(distances, 0.0, out=distances)  # rounding may leave -epsilon; NaN stays NaN
        return distances

    def _write_mean_of(self, destination_path: str, indices: Sequence[int]) -> None:
        """The element-wise mean of these results (added in this order), with equal weights."""
        results = self._results
        held = [results.results[index] for index in indices]
        rows_needed = len(held) + 1
        width = min(results.chunk_elements(rows_needed), results.size)
        matrix = np.empty((len(held), width), dtype=np.float64)
        output = np.empty(width, dtype=np.float64)
        with ModelWriter.for_round(destination_path, results) as writer:
            for start, stop in results.chunks(rows_needed):
                count = stop - start
                rows = matrix[:, :count]
                for row, one in zip(rows, held):
                    results.read(one, start, row)
                mean = _sum_rows(rows, output[:count])
                if len(held) > 1:
                    mean /= float(len(held))
                writer.write(start, mean)
