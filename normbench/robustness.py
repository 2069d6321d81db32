"""Corruption-robustness aggregates (Hendrycks & Dietterich 2019; RobustBench conventions).

Per run (stored with it):
- ``accuracy`` rows for every (corruption, severity), and per corruption the mean over severities
  (severity 0);
- ``corruption_accuracy``: the unweighted mean of the 15 x 5 benchmark accuracies;
- ``family_accuracy`` per family (noise, blur, weather, digital; corruption = family name);
- ``extra_corruption_accuracy``: the mean over the 4 held-out extras.

Across runs (recomputed after every run of a suite): ``mce`` and ``relative_mce`` (x100) against
the suite's named reference pair, averaged over the reference's finished seeds:
CE_c = sum_s E_sc / sum_s E_sc^ref, mCE = mean_c CE_c; relative CE_c = sum_s (E_sc - E_clean) /
sum_s (E_sc^ref - E_clean^ref). CIFAR has no published reference network, so the reference run
is named in each run's provenance (``mce_reference``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from normbench import metrics as M
from normbench.corruptions import BENCHMARK, EXTRA, FAMILIES, SEVERITIES
from normbench.corruptions.imagenet_c import ALEXNET_ERRORS
from normbench.metrics import MetricRow
from normbench.store.models import Metric, Run, RunStatus

CORRUPTION_ACCURACY = "corruption_accuracy"
FAMILY_ACCURACY = "family_accuracy"
EXTRA_ACCURACY = "extra_corruption_accuracy"
MCE = "mce"
RELATIVE_MCE = "relative_mce"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def aggregate_rows(accuracy: Mapping[tuple[str, int], float]) -> list[MetricRow]:
    """Per-corruption means and the suite aggregates from per-(corruption, severity) accuracies."""
    rows = []
    per_corruption = {}
    for name in {c for c, _ in accuracy}:
        per_corruption[name] = _mean(accuracy[name, s] for s in SEVERITIES)
        rows.append(MetricRow(M.ACCURACY, per_corruption[name], "test", name, 0))
    benchmark = _mean(accuracy[c, s] for c in BENCHMARK for s in SEVERITIES)
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


def _errors_by_run(session: Session, run_ids: list[int]) -> dict[int, dict]:
    rows = session.execute(
        select(Metric.run_id, Metric.corruption, Metric.severity, Metric.value).where(
            Metric.run_id.in_(run_ids), Metric.name == M.ACCURACY, Metric.split == "test"
        )
    )
    by_run: dict[int, dict] = defaultdict(dict)
    for run_id, corruption, severity, value in rows:
        if corruption == "" or severity > 0:
            by_run[run_id][corruption, severity] = 1.0 - value
    return by_run


def update_mce(
    engine: Engine,
    suite: str,
    budget: str,
    reference: tuple[str, str],
    alexnet: bool = False,
    *,
    protocol_version: int,
) -> int:
    """Recompute mCE rows of every finished run of ``suite``/``budget`` at ``protocol_version``
    (a reference run of another protocol never normalises these); returns how many runs
    got them (0 when the reference has no finished run with corruption results). With
    ``alexnet`` (ImageNet-C), errors are normalised by AlexNet's published errors instead, and
    relative mCE is not computed (its clean error is not part of that reference)."""
    with Session(engine) as session, session.begin():
        runs = session.scalars(
            select(Run).where(
                Run.suite == suite,
                Run.budget == budget,
                Run.protocol_version == protocol_version,
                Run.status == RunStatus.finished,
            )
        ).all()
        errors = _errors_by_run(session, [r.id for r in runs])
        keys = [(c, s) for c in BENCHMARK for s in SEVERITIES]
        complete = {r.id for r in runs if all(k in errors[r.id] for k in keys)}
        refs = [r for r in runs if (r.norm, r.optimizer) == reference and r.id in complete]
        session.execute(
            delete(Metric).where(
                Metric.run_id.in_([r.id for r in runs]), Metric.name.in_((MCE, RELATIVE_MCE))
            )
        )
        if alexnet:
            ref_errors = {(c, s): ALEXNET_ERRORS[c] for c, s in keys}
            ref_clean, label = None, "AlexNet (Hendrycks & Dietterich 2019)"
        elif refs:
            ref_errors = {k: _mean(errors[r.id][k] for r in refs) for k in keys}
            ref_clean = _mean(errors[r.id]["", 0] for r in refs)
            label = f"{reference[0]} + {reference[1]}, seeds {sorted(r.seed for r in refs)}"
        else:
            return 0
        for run in runs:
            if run.id not in complete or ("", 0) not in errors[run.id]:
                continue
            ours = errors[run.id]
            mce, rel = corruption_errors(ours, ours["", 0], ref_errors, ref_clean)
            values = ((MCE, mce),) if ref_clean is None else ((MCE, mce), (RELATIVE_MCE, rel))
            for name, value in values:
                session.add(Metric(run_id=run.id, name=name, split="test", value=value,
                                   corruption="", severity=0))  # fmt: skip
            run.provenance = {**run.provenance, "mce_reference": label}
        return len(complete)
