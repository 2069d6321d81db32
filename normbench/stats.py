"""Statistics for boards: confidence intervals over seeds, paired tests between rows, and the
Holm-Bonferroni correction that keeps a board's many comparisons honest.

A board ranks rows by the mean of one metric over seeds. Two neighbouring rows are *tied* when
the data cannot tell them apart: a paired t-test over the seeds both rows ran (the same seed
means the same initialization and data order, so pairing removes that shared noise), with the
p-values of all adjacent comparisons of the board adjusted together by Holm's step-down method
(:func:`board_ties`). With fewer than two shared seeds nothing is tested.

Pure numpy/scipy: no database, no pandas.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as _stats

from normbench.errors import NormbenchError

#: The level at which adjacent rows count as different (after the Holm correction).
ALPHA = 0.05
#: How the board's ties are decided, in words (for legends, captions and exported metadata).
TIE_TEST = (
    "paired t-test over shared seeds against the row directly above, p-values Holm-Bonferroni "
    f"corrected over the board's adjacent comparisons, alpha {ALPHA}"
)


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1 or not np.isfinite(array).all():
        raise NormbenchError(f"{what}: expected finite numbers, got {list(values)!r}.")
    return array


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its Student-t confidence interval at
    ``level`` (mean ± t_{(1+level)/2, n-1} · s / √n). One value has no interval: low and high
    are NaN."""
    if not 0.0 < level < 1.0:
        raise NormbenchError(f"confidence level must be between 0 and 1, got {level!r}.")
    x = _finite(values, "mean_ci")
    if x.size == 0:
        raise NormbenchError("mean_ci: no values to average.")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(_stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_test(a: Mapping[int, float], b: Mapping[int, float]) -> float | None:
    """The two-sided p-value of a paired t-test (``scipy.stats.ttest_rel``) between ``a`` and
    ``b`` (seed -> value) over the seeds both have; None with fewer than two shared seeds.

    Two degenerate cases scipy answers with NaN get their limits instead: no difference on any
    seed is p = 1 (the rows are tied), the same non-zero difference on every seed is p = 0
    (an infinite t statistic: the rows differ consistently)."""
    shared = sorted(set(a) & set(b))
    if len(shared) < 2:
        return None
    x = _finite([a[s] for s in shared], "paired_test")
    y = _finite([b[s] for s in shared], "paired_test")
    diff = x - y
    if np.all(diff == 0):
        return 1.0
    if np.all(diff == diff[0]):
        return 0.0
    return float(_stats.ttest_rel(x, y).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the order given: the i-th smallest of m p-values is
    multiplied by m - i + 1 (i from 1), made non-decreasing along that order and capped at 1.
    Rejecting where the adjusted value is below alpha controls the family-wise error at alpha."""
    p = _finite(pvalues, "holm")
    if np.any((p < 0) | (p > 1)):
        raise NormbenchError(f"holm: p-values must lie in [0, 1], got {list(pvalues)!r}.")
    m = p.size
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for i, index in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()


def board_ties(
    rows: Sequence[Mapping[int, float] | None], alpha: float = ALPHA
) -> tuple[list[float | None], list[bool | None]]:
    """For rows in ranked order (each seed -> value of the ranked metric; None for an unranked
    row), each row against the row directly above: ``(adjusted p-values, tied)``. The first row,
    unranked rows and pairs with fewer than two shared seeds are not tested (None in both)."""
    raw: list[float | None] = [None] * len(rows)
    for i in range(1, len(rows)):
        if rows[i] is not None and rows[i - 1] is not None:
            raw[i] = paired_test(rows[i - 1], rows[i])
    tested = [i for i, p in enumerate(raw) if p is not None]
    adjusted: list[float | None] = [None] * len(rows)
    for i, p in zip(tested, holm([raw[i] for i in tested]), strict=True):
        adjusted[i] = p
    tied = [None if p is None else bool(p >= alpha) for p in adjusted]
    return adjusted, tied
