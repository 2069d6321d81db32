"""Corruption-robustness aggregates (Hendrycks & Dietterich 2019; RobustBench conventions).

Per run (stored with it):
- ``accuracy`` rows for every (corruption, severity), and per corruption the mean over severities
  (severity 0);
- ``corruption_accuracy``: the unweighted mean of the 15 x 5 benchmark accuracies;
- ``family_accuracy`` per family (noise, blur, weather, digital; corruption = family name);
- ``extra_corruption_accuracy``: the mean over the 4 held-out extras;
- with test-time adaptation, the same per-corruption means and the benchmark and extras' means
  of each adapted accuracy under its own names (``ADAPTED_AGGREGATES``).

Across runs (recomputed after every run of a suite): ``mce`` and ``relative_mce`` (x100) against
the suite's named reference pair, averaged over the reference's finished seeds:
CE_c = sum_s E_sc / sum_s E_sc^ref, mCE = mean_c CE_c; relative CE_c = sum_s (E_sc - E_clean) /
sum_s (E_sc^ref - E_clean^ref). CIFAR has no published reference network, so the reference run
is named in each run's provenance (``mce_reference``).

This module computes; ``Store.update_mce`` reads the errors and writes the rows.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from normbench import metrics as M
from normbench.corruptions import BENCHMARK, EXTRA, FAMILIES, SEVERITIES
from normbench.corruptions.imagenet_c import ALEXNET_ERRORS
from normbench.metrics import MetricRow

CORRUPTION_ACCURACY = "corruption_accuracy"
FAMILY_ACCURACY = "family_accuracy"
EXTRA_ACCURACY = "extra_corruption_accuracy"
MCE = "mce"
RELATIVE_MCE = "relative_mce"
#: Test-time adaptation (normbench.adaptation): per adapted accuracy name, the names of its
#: benchmark mean and its held-out extras' mean. No family rows and no mCE for them: the mCE
#: reference's errors are its plain ones, and a ratio of adapted to plain errors would mix two
#: protocols in one number.
ADAPTED_AGGREGATES = {
    M.ACCURACY_BN_ADAPT: ("corruption_accuracy_bn_adapt", "extra_corruption_accuracy_bn_adapt"),
    M.ACCURACY_TENT: ("corruption_accuracy_tent", "extra_corruption_accuracy_tent"),
}
CORRUPTION_ACCURACY_BN_ADAPT = ADAPTED_AGGREGATES[M.ACCURACY_BN_ADAPT][0]
CORRUPTION_ACCURACY_TENT = ADAPTED_AGGREGATES[M.ACCURACY_TENT][0]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def aggregate_rows(
    accuracy: Mapping[tuple[str, int], float], metric: str = M.ACCURACY
) -> list[MetricRow]:
    """Per-corruption means and the suite aggregates from per-(corruption, severity) accuracies;
    ``metric`` names an adapted accuracy (``ADAPTED_AGGREGATES``) for its own aggregates."""
    rows = []
    per_corruption = {}
    for name in {c for c, _ in accuracy}:
        per_corruption[name] = _mean(accuracy[name, s] for s in SEVERITIES)
        rows.append(MetricRow(metric, per_corruption[name], "test", name, 0))
    benchmark = _mean(accuracy[c, s] for c in BENCHMARK for s in SEVERITIES)
    if metric != M.ACCURACY:
        overall, extra = ADAPTED_AGGREGATES[metric]
        rows.append(MetricRow(overall, benchmark, "test"))
        if all(c in per_corruption for c in EXTRA):
            rows.append(MetricRow(extra, _mean(per_corruption[c] for c in EXTRA), "test"))
        return rows
    rows.append(MetricRow(CORRUPTION_ACCURACY, benchmark, "test"))
    for family, names in FAMILIES.items():
        family_mean = _mean(per_corruption[c] for c in names)
        rows.append(MetricRow(FAMILY_ACCURACY, family_mean, "test", family))
    if all(c in per_corruption for c in EXTRA):
        rows.append(MetricRow(EXTRA_ACCURACY, _mean(per_corruption[c] for c in EXTRA), "test"))
    return rows


def corruption_errors(
    errors: Mapping[tuple[str, int], float],
    clean_error: float,
    reference: Mapping[tuple[str, int], float],
    reference_clean_error: float | None,
) -> tuple[float, float]:
    """(mCE, relative mCE), both x100, over the 15 benchmark corruptions (relative mCE is NaN
    without a reference clean error)."""
    ce, relative = [], []
    for c in BENCHMARK:
        ours = [errors[c, s] for s in SEVERITIES]
        ref = [reference[c, s] for s in SEVERITIES]
        ce.append(sum(ours) / sum(ref))
        if reference_clean_error is None:
            continue
        denominator = sum(r - reference_clean_error for r in ref)
        numerator = sum(e - clean_error for e in ours)
        relative.append(numerator / denominator if denominator else float("nan"))
    return 100 * _mean(ce), 100 * _mean(relative) if relative else float("nan")


@dataclass(frozen=True)
class MceTable:
    """The mCE rows of a suite's runs: run id -> {metric name: value}, the reference as each run's
    provenance names it, and how many runs have every benchmark (corruption, severity)."""

    values: dict[int, dict[str, float]]
    label: str
    complete: int


Errors = dict[int, dict[tuple[str, int], float]]


def errors_of(rows: Iterable[tuple[int, str, int, float]]) -> Errors:
    """Test errors by run and (corruption, severity), from (run id, corruption, severity,
    accuracy) rows of the ``accuracy`` metric; ("", 0) is the clean error. Per-corruption means
    (severity 0 of a corruption) are left out."""
    by_run: Errors = defaultdict(dict)
    for run_id, corruption, severity, value in rows:
        if corruption == "" or severity > 0:
            by_run[run_id][corruption, severity] = 1.0 - value
    return by_run


def mce_table(
    errors: Mapping[int, Mapping[tuple[str, int], float]],
    reference_seeds: Mapping[int, int],
    reference: tuple[str, str],
    alexnet: bool = False,
) -> MceTable | None:
    """mCE (and relative mCE) of every run in ``errors`` (its finished runs' errors, see
    ``errors_of``), normalised by the mean errors of the reference pair's runs
    (``reference_seeds``: run id -> seed) that have every benchmark error, or by AlexNet's
    published errors with ``alexnet`` (then without relative mCE: its clean error is not part of
    that reference). None when there is no such reference run."""
    keys = [(c, s) for c in BENCHMARK for s in SEVERITIES]
    complete = {r for r, e in errors.items() if all(k in e for k in keys)}
    refs = sorted(r for r in reference_seeds if r in complete)
    if alexnet:
        ref_errors = {(c, s): ALEXNET_ERRORS[c] for c, s in keys}
        ref_clean, label = None, "AlexNet (Hendrycks & Dietterich 2019)"
    elif refs:
        ref_errors = {k: _mean(errors[r][k] for r in refs) for k in keys}
        ref_clean = _mean(errors[r]["", 0] for r in refs)
        seeds = sorted(reference_seeds[r] for r in refs)
        label = f"{reference[0]} + {reference[1]}, seeds {seeds}"
    else:
        return None
    values = {}
    for run_id in sorted(complete):
        ours = errors[run_id]
        if ("", 0) not in ours:
            continue
        mce, rel = corruption_errors(ours, ours["", 0], ref_errors, ref_clean)
        values[run_id] = {MCE: mce} if ref_clean is None else {MCE: mce, RELATIVE_MCE: rel}
    return MceTable(values, label, len(complete))
