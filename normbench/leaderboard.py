"""Leaderboard queries: norm x optimizer rows aggregated over seeds, in SQL.

Means and standard deviations are computed from ``count``, ``avg(x)`` and ``avg(x*x)`` in the
database, so the query cost does not grow with Python loops over runs. Throughput is compared as a
ratio to BatchNorm with the same optimizer on the same device, then averaged over devices.
Only finished runs give numbers; failed, diverged and interrupted runs are counted in ``status``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import Engine, func, select

from normbench import metrics as M
from normbench.corruptions import BENCHMARK
from normbench.robustness import CORRUPTION_ACCURACY, EXTRA_ACCURACY, MCE, RELATIVE_MCE
from normbench.store.models import Metric, Run, RunStatus

REFERENCE_NORM = "batchnorm"
SUMMARY_METRICS = (
    M.ACCURACY, M.LOSS, M.ECE, M.TRAIN_THROUGHPUT, M.WALL_TIME, M.PARAM_COUNT,
    CORRUPTION_ACCURACY, EXTRA_ACCURACY, MCE, RELATIVE_MCE,
)  # fmt: skip


@dataclass(frozen=True)
class Selection:
    """Which runs a leaderboard covers: one suite and budget, optionally only some datasets,
    models and optimizers (empty means all)."""

    suite: str
    budget: str
    datasets: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()

    def runs(self) -> tuple:
        clauses = [Run.suite == self.suite, Run.budget == self.budget]
        for column, values in (
            (Run.dataset, self.datasets),
            (Run.model, self.models),
            (Run.optimizer, self.optimizers),
        ):
            if values:
                clauses.append(column.in_(values))
        return tuple(clauses)

    def finished_runs(self) -> tuple:
        """The filter every number on the leaderboard shares: finished runs only."""
        return (*self.runs(), Run.status == RunStatus.finished)


def _metric_stats(engine: Engine, sel: Selection) -> pd.DataFrame:
    query = (
        select(
            Run.norm,
            Run.optimizer,
            Metric.name,
            func.count(Metric.value).label("n"),
            func.avg(Metric.value).label("mean"),
            func.avg(Metric.value * Metric.value).label("mean_sq"),
        )
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name.in_(SUMMARY_METRICS),
            Metric.corruption == "",
            Metric.severity == 0,
        )
        .group_by(Run.norm, Run.optimizer, Metric.name)
    )
    with engine.connect() as conn:
        return pd.DataFrame(
            conn.execute(query).all(),
            columns=["norm", "optimizer", "metric", "n", "mean", "mean_sq"],
        )


def _throughput_ratios(engine: Engine, sel: Selection) -> pd.DataFrame:
    query = (
        select(Run.norm, Run.optimizer, Run.device, func.avg(Metric.value).label("rate"))
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name == M.TRAIN_THROUGHPUT,
        )
        .group_by(Run.norm, Run.optimizer, Run.device)
    )
    with engine.connect() as conn:
        df = pd.DataFrame(
            conn.execute(query).all(), columns=["norm", "optimizer", "device", "rate"]
        )
    ref = df[df.norm == REFERENCE_NORM][["optimizer", "device", "rate"]]
    df = df.merge(ref, on=["optimizer", "device"], how="left", suffixes=("", "_ref"))
    df["throughput_ratio"] = df.rate / df.rate_ref
    return df.groupby(["norm", "optimizer"], as_index=False).throughput_ratio.mean()


def _worst_corruptions(engine: Engine, sel: Selection) -> pd.DataFrame:
    """Per pair, the benchmark corruption with the lowest accuracy (mean over severities, seeds)."""
    query = (
        select(Run.norm, Run.optimizer, Metric.corruption, func.avg(Metric.value))
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name == M.ACCURACY,
            Metric.split == "test",
            Metric.corruption.in_(BENCHMARK),
            Metric.severity == 0,
        )
        .group_by(Run.norm, Run.optimizer, Metric.corruption)
    )
    with engine.connect() as conn:
        df = pd.DataFrame(
            conn.execute(query).all(),
            columns=["norm", "optimizer", "worst_corruption", "worst_corruption_accuracy"],
        )
    if df.empty:
        return df
    lowest = df.groupby(["norm", "optimizer"]).worst_corruption_accuracy.idxmin()
    return df.loc[lowest].reset_index(drop=True)


def _status_counts(engine: Engine, sel: Selection) -> pd.DataFrame:
    query = (
        select(Run.norm, Run.optimizer, Run.status, func.count(Run.id))
        .where(*sel.runs())
        .group_by(Run.norm, Run.optimizer, Run.status)
    )
    order = list(RunStatus)
    pairs: dict[tuple[str, str], dict[RunStatus, int]] = {}
    with engine.connect() as conn:
        for norm, optimizer, status, count in conn.execute(query):
            pairs.setdefault((norm, optimizer), {})[status] = count
    rows = [
        {
            "norm": norm,
            "optimizer": optimizer,
            "runs": sum(counts.values()),
            "status": ", ".join(f"{counts[s]} {s.value}" for s in order if s in counts),
        }
        for (norm, optimizer), counts in pairs.items()
    ]
    return pd.DataFrame(rows, columns=["norm", "optimizer", "runs", "status"])


def leaderboard(
    engine: Engine,
    suite: str,
    budget: str,
    rank_by: str = M.ACCURACY,
    *,
    datasets: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
    optimizers: tuple[str, ...] = (),
) -> pd.DataFrame:
    """One row per norm x optimizer: ``<metric>_mean``/``_std`` for the summary metrics, ``n``
    (finished seeds), ``throughput_ratio``, ``runs``, ``status`` and ``rank`` (by ``rank_by``)."""
    sel = Selection(suite, budget, tuple(datasets), tuple(models), tuple(optimizers))
    counts = _status_counts(engine, sel)
    if counts.empty:
        return pd.DataFrame()
    stats = _metric_stats(engine, sel)
    table = counts
    if not stats.empty:
        var = (stats.mean_sq - stats["mean"] ** 2).clip(lower=0) * stats.n / (stats.n - 1)
        stats["std"] = [
            math.sqrt(v) if n > 1 else math.nan for v, n in zip(var, stats.n, strict=True)
        ]
        wide = stats.pivot_table(
            index=["norm", "optimizer"], columns="metric", values=["mean", "std"], dropna=False
        )
        wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
        n = stats[stats.metric == rank_by][["norm", "optimizer", "n"]]
        table = counts.merge(wide.reset_index(), on=["norm", "optimizer"], how="left")
        table = table.merge(n, on=["norm", "optimizer"], how="left")
        for extra in (_throughput_ratios, _worst_corruptions):
            found = extra(engine, sel)
            if not found.empty:
                table = table.merge(found, on=["norm", "optimizer"], how="left")
    for column in (f"{rank_by}_mean", "n", "throughput_ratio"):
        if column not in table:
            table[column] = math.nan
    table["n"] = table["n"].fillna(0).astype(int)
    ascending = rank_by in (M.LOSS, M.ECE, M.WALL_TIME, MCE, RELATIVE_MCE)
    table = table.sort_values(f"{rank_by}_mean", ascending=ascending, na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    table.loc[table[f"{rank_by}_mean"].isna(), "rank"] = pd.NA
    return table.reset_index(drop=True)
