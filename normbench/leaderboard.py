"""Leaderboard queries: norm x optimizer (x variant) rows aggregated over seeds, in SQL.

A suite that sweeps a setting within one norm and optimizer (a label-noise rate, a batch size)
labels each setting's runs with a ``variant``; rows are per (norm, optimizer, variant), so runs of
different variants are never averaged together. Suites that sweep nothing have the variant "".

Means and standard deviations are computed from ``count``, ``avg(x)`` and ``avg(x*x)`` in the
database, so the query cost does not grow with Python loops over runs. A norm's speed is the
ratio to BatchNorm each run measured side by side in its own process (``speed_vs_batchnorm``),
averaged over seeds; never a division of throughputs that runs measured at different times under
different machine load. Each run's own training throughput is shown as a property of that run.
Only finished runs give numbers; failed, diverged and interrupted runs are counted in ``status``.

A board holds one protocol version of a suite: runs made under another version (the suite's
protocol changed since) are kept apart and counted, never mixed in (:func:`kept_apart_note`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import Engine, func, select

from normbench import metrics as M
from normbench.corruptions import BENCHMARK
from normbench.robustness import (
    CORRUPTION_ACCURACY,
    CORRUPTION_ACCURACY_BN_ADAPT,
    CORRUPTION_ACCURACY_TENT,
    EXTRA_ACCURACY,
    MCE,
    RELATIVE_MCE,
)
from normbench.stats import TIE_TEST, board_ties, mean_ci
from normbench.store.models import Metric, Run, RunStatus

REFERENCE_NORM = "batchnorm"
#: The metrics a board ranks lowest first.
LOWER_IS_BETTER = (M.LOSS, M.ECE, M.WALL_TIME, MCE, RELATIVE_MCE)
#: What one leaderboard row aggregates over seeds.
GROUP = ["norm", "optimizer", "variant"]
SUMMARY_METRICS = (
    M.ACCURACY, M.LOSS, M.ECE, M.TRAIN_THROUGHPUT, M.SPEED_VS_BN, M.SPEED_VS_BN_IQR,
    M.SPEED_VS_BASE_OPTIMIZER, M.SPEED_VS_BASE_OPTIMIZER_IQR,
    M.WALL_TIME, M.PARAM_COUNT, M.PEAK_MEMORY,
    CORRUPTION_ACCURACY, EXTRA_ACCURACY, MCE, RELATIVE_MCE,
    M.LANDSCAPE_LOSS_RANGE_MEAN, M.LANDSCAPE_GRAD_PRED_MEAN, M.LANDSCAPE_BETA_MEAN,
    M.ICS_L2_MEAN, M.ICS_COSINE_MEAN,
    M.ADV_CLEAN_ACCURACY, M.FGSM_ACCURACY, M.PGD_ACCURACY,
    # test-time adaptation: clean and mean benchmark corruption accuracy, adapted
    M.ACCURACY_BN_ADAPT, M.ACCURACY_TENT, CORRUPTION_ACCURACY_BN_ADAPT, CORRUPTION_ACCURACY_TENT,
    M.LABEL_NOISE_RATE_ACTUAL,  # label-noise variants: the fraction of training labels flipped
)  # fmt: skip
#: The whole-model summaries of the initialization probes, as the probe board shows them.
PROBE_SUMMARIES = (
    M.PROBE_ACT_GROWTH, M.PROBE_LAST_COSINE, M.PROBE_LAST_STABLE_RANK, M.PROBE_GRAD_RATIO,
)  # fmt: skip


@dataclass(frozen=True)
class Selection:
    """Which runs a leaderboard covers: one suite, budget and protocol version, optionally only
    some datasets, models and optimizers (empty means all)."""

    suite: str
    budget: str
    datasets: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()
    protocol_version: int | None = None  # None: every version (only for counting them)

    def runs(self) -> tuple:
        clauses = [Run.suite == self.suite, Run.budget == self.budget]
        if self.protocol_version is not None:
            clauses.append(Run.protocol_version == self.protocol_version)
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
            Run.variant,
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
            Metric.layer == -1,
            Metric.step == -1,
        )
        .group_by(Run.norm, Run.optimizer, Run.variant, Metric.name)
    )
    with engine.connect() as conn:
        return pd.DataFrame(
            conn.execute(query).all(),
            columns=[*GROUP, "metric", "n", "mean", "mean_sq"],
        )


def protocol_versions(engine: Engine, suite: str, budget: str) -> dict[int, int]:
    """The number of runs of ``suite`` at ``budget`` per protocol version."""
    query = (
        select(Run.protocol_version, func.count(Run.id))
        .where(Run.suite == suite, Run.budget == budget)
        .group_by(Run.protocol_version)
    )
    with engine.connect() as conn:
        return dict(conn.execute(query).all())


def kept_apart_note(versions: dict[int, int], shown: int) -> str | None:
    """What the board leaves out because it was made under another protocol version, or None."""
    others = {v: n for v, n in sorted(versions.items()) if v != shown}
    if not others:
        return None
    parts = [f"{n} run{'' if n == 1 else 's'} of protocol version {v}" for v, n in others.items()]
    verb = "is" if sum(others.values()) == 1 else "are"
    return (
        f"{' and '.join(parts)} {verb} kept apart (this board shows protocol version {shown}, "
        "and numbers of different protocols are never mixed); rerun to compare."
    )


def _worst_corruptions(engine: Engine, sel: Selection) -> pd.DataFrame:
    """Per pair, the benchmark corruption with the lowest accuracy (mean over severities, seeds)."""
    query = (
        select(Run.norm, Run.optimizer, Run.variant, Metric.corruption, func.avg(Metric.value))
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name == M.ACCURACY,
            Metric.split == "test",
            Metric.corruption.in_(BENCHMARK),
            Metric.severity == 0,
        )
        .group_by(Run.norm, Run.optimizer, Run.variant, Metric.corruption)
    )
    with engine.connect() as conn:
        df = pd.DataFrame(
            conn.execute(query).all(),
            columns=[*GROUP, "worst_corruption", "worst_corruption_accuracy"],
        )
    if df.empty:
        return df
    lowest = df.groupby(GROUP).worst_corruption_accuracy.idxmin()
    return df.loc[lowest].reset_index(drop=True)


def _status_counts(engine: Engine, sel: Selection) -> pd.DataFrame:
    query = (
        select(Run.norm, Run.optimizer, Run.variant, Run.status, func.count(Run.id))
        .where(*sel.runs())
        .group_by(Run.norm, Run.optimizer, Run.variant, Run.status)
    )
    order = list(RunStatus)
    pairs: dict[tuple[str, str, str], dict[RunStatus, int]] = {}
    with engine.connect() as conn:
        for norm, optimizer, variant, status, count in conn.execute(query):
            pairs.setdefault((norm, optimizer, variant), {})[status] = count
    rows = [
        {
            "norm": norm,
            "optimizer": optimizer,
            "variant": variant,
            "runs": sum(counts.values()),
            "status": ", ".join(f"{counts[s]} {s.value}" for s in order if s in counts),
        }
        for (norm, optimizer, variant), counts in pairs.items()
    ]
    return pd.DataFrame(rows, columns=[*GROUP, "runs", "status"])


def leaderboard(
    engine: Engine,
    suite: str,
    budget: str,
    rank_by: str = M.ACCURACY,
    *,
    datasets: tuple[str, ...] = (),
    models: tuple[str, ...] = (),
    optimizers: tuple[str, ...] = (),
    protocol_version: int | None = None,
) -> pd.DataFrame:
    """One row per norm x optimizer x variant of one protocol version (default: the newest with
    runs): ``variant`` ("" unless the suite sweeps a setting), ``<metric>_mean``/``_std`` for the
    summary metrics, ``n`` (finished seeds), ``runs``, ``status``, ``protocol_version`` and
    ``rank`` (by ``rank_by``)."""
    if protocol_version is None:
        protocol_version = max(protocol_versions(engine, suite, budget), default=None)
        if protocol_version is None:
            return pd.DataFrame()
    sel = Selection(suite, budget, tuple(datasets), tuple(models), tuple(optimizers),
                    protocol_version)  # fmt: skip
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
            index=GROUP, columns="metric", values=["mean", "std"], dropna=False
        )
        wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
        n = stats[stats.metric == rank_by][[*GROUP, "n"]]
        table = counts.merge(wide.reset_index(), on=GROUP, how="left")
        table = table.merge(n, on=GROUP, how="left")
        worst = _worst_corruptions(engine, sel)
        if not worst.empty:
            table = table.merge(worst, on=GROUP, how="left")
    for column in (f"{rank_by}_mean", "n", f"{M.SPEED_VS_BN}_mean", f"{M.TRAIN_THROUGHPUT}_mean"):
        if column not in table:
            table[column] = math.nan
    table["n"] = table["n"].fillna(0).astype(int)
    table["protocol_version"] = protocol_version
    ascending = rank_by in LOWER_IS_BETTER
    table = table.sort_values(f"{rank_by}_mean", ascending=ascending, na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    table.loc[table[f"{rank_by}_mean"].isna(), "rank"] = pd.NA
    return _intervals_and_ties(engine, sel, table.reset_index(drop=True), rank_by)


def _seed_values(engine: Engine, sel: Selection, metric: str, keys: list[str]) -> dict:
    """Per row (the values of ``keys``), the finished runs' values of ``metric``: seed -> list
    of values (one per run; a seed twice only if the board mixes settings of one version)."""
    query = (
        select(*(getattr(Run, k) for k in keys), Run.seed, Metric.value)
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name == metric,
            Metric.corruption == "",
            Metric.severity == 0,
            Metric.layer == -1,
            Metric.step == -1,
        )
    )
    rows: dict[tuple, dict[int, list[float]]] = {}
    with engine.connect() as conn:
        for *key, seed, value in conn.execute(query):
            if value is not None and math.isfinite(value):  # SQL's avg skips NULLs too
                rows.setdefault(tuple(key), {}).setdefault(seed, []).append(value)
    return rows


def _intervals_and_ties(
    engine: Engine, sel: Selection, table: pd.DataFrame, rank_by: str
) -> pd.DataFrame:
    """Add the ranked metric's 95% Student-t interval over seeds (``<rank_by>_ci_low``/
    ``_ci_high``; NaN with one seed) and each row's paired test against the row above
    (``p_vs_above``, Holm-adjusted over the board; ``tied``: True, False or NA where not tested,
    see :mod:`normbench.stats`)."""
    keys = [k for k in ("norm", "optimizer", "variant") if k in table]
    values = _seed_values(engine, sel, rank_by, keys)
    low, high, per_seed = [], [], []
    for key, ranked in zip(
        table[keys].itertuples(index=False, name=None), table["rank"].notna(), strict=True
    ):
        seeds = values.get(tuple(key), {})
        flat = [v for vs in seeds.values() for v in vs]
        _, lo, hi = mean_ci(flat) if flat else (math.nan, math.nan, math.nan)
        low.append(lo)
        high.append(hi)
        # A seed run twice counts once in the pairing, by its mean.
        per_seed.append({s: sum(vs) / len(vs) for s, vs in seeds.items()} if ranked else None)
    adjusted, tied = board_ties(per_seed)
    table[f"{rank_by}_ci_low"], table[f"{rank_by}_ci_high"] = low, high
    table["p_vs_above"] = [math.nan if p is None else p for p in adjusted]
    table["tied"] = pd.array(tied, dtype="boolean")
    return table


def tie_legend(table: pd.DataFrame, mark: str = "=") -> str:
    """One sentence for under a board: what ``mark`` (a tied row) means and how many adjacent
    comparisons could not be tested."""
    ranked = int(table["rank"].notna().sum()) if "rank" in table else 0
    comparisons = max(ranked - 1, 0)
    tested = int(table["tied"].notna().sum()) if "tied" in table else 0
    text = f"{mark}: not significantly different from the row above ({TIE_TEST})."
    if tested < comparisons:
        text += (
            f" {comparisons - tested} of {comparisons} adjacent comparisons not tested: fewer "
            "than 2 seeds shared with the row above (--seeds 0,1,2 gives intervals and tests)."
        )
    return text


def probe_board(
    engine: Engine, suite: str, budget: str, *, protocol_version: int, step: int = 0
) -> pd.DataFrame:
    """The initialization probes of a probe suite: one row per model (with its arguments) and
    norm, the whole-model summaries at training step ``step`` as ``<metric>_mean``/``_std`` over
    seeds, ``n`` (seeds with values), ``runs``, ``status`` and, for a probe whose activations went
    non-finite, the block where that happened (``nonfinite_block``). Diverged probes are findings,
    so their rows count too."""
    sel = Selection(suite, budget, protocol_version=protocol_version)
    with engine.connect() as conn:
        runs = conn.execute(select(Run.id, Run.norm, Run.status, Run.config).where(*sel.runs()))
        runs = pd.DataFrame(runs.all(), columns=["run_id", "norm", "status", "config"])
        if runs.empty:
            return pd.DataFrame()
        values = conn.execute(
            select(Metric.run_id, Metric.name, Metric.value)
            .join(Run, Run.id == Metric.run_id)
            .where(
                *sel.runs(),
                Run.status.in_((RunStatus.finished, RunStatus.diverged)),
                Metric.name.in_((*PROBE_SUMMARIES, M.PROBE_NONFINITE_LAYER)),
                Metric.layer == -1,
                Metric.step == step,
            )
        )
        values = pd.DataFrame(values.all(), columns=["run_id", "metric", "value"])
    runs["model"] = [
        (c or {}).get("settings", {}).get("model_label") or (c or {}).get("settings", {})["model"]
        for c in runs.config
    ]
    keys = ["model", "norm"]
    counts = _run_counts(runs, keys)
    if values.empty:
        return counts
    values = values.merge(runs[["run_id", *keys]], on="run_id")
    stats = values.groupby([*keys, "metric"]).value.agg(["mean", "std", "count"]).reset_index()
    wide = stats.pivot_table(index=keys, columns="metric", values=["mean", "std"], dropna=False)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    table = counts.merge(wide.reset_index(), on=keys, how="left")
    n = stats[stats.metric == M.PROBE_ACT_GROWTH][[*keys, "count"]].rename(columns={"count": "n"})
    table = table.merge(n, on=keys, how="left")
    table["n"] = table["n"].fillna(0).astype(int)
    nonfinite = f"{M.PROBE_NONFINITE_LAYER}_mean"
    table["nonfinite_block"] = table.get(nonfinite, math.nan)
    table = table.drop(columns=[c for c in table if c.startswith(M.PROBE_NONFINITE_LAYER)])
    return table.sort_values(keys, key=_model_then_name).reset_index(drop=True)


def _run_counts(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per ``keys``: how many runs (``runs``) and their statuses in words (``status``:
    "2 finished, 1 diverged")."""
    order = list(RunStatus)
    return (
        runs.groupby(keys)
        .status.agg(
            runs="size",
            status=lambda st: ", ".join(
                f"{(st == s).sum()} {s.value}" for s in order if (st == s).any()
            ),
        )
        .reset_index()
    )


def _model_then_name(column: pd.Series) -> pd.Series:
    """Models in a natural order (``vgg(depth=10)`` before ``vgg(depth=20)``): digits compare as
    numbers; norms alphabetically."""
    import re

    return column.map(lambda v: re.sub(r"\d+", lambda m: m.group().zfill(9), v))


#: The GAN board's values: the scores, the collapse indicator and the run's cost.
GAN_SUMMARIES = (
    M.GAN_FID, M.GAN_KID, M.GAN_KID_STD, M.GAN_DIVERSITY, M.GAN_COLLAPSED, M.GAN_D_LOSS,
    M.GAN_G_LOSS, M.TRAIN_THROUGHPUT, M.WALL_TIME,
)  # fmt: skip
#: What makes two GAN scores comparable: the feature network and both sample counts. Rows that
#: differ in any of them are ranked apart (``score_group``), never against each other.
GAN_SCORE_KEYS = ("feature_network", M.GAN_GEN_SAMPLES, M.GAN_REAL_SAMPLES)


def gan_board(engine: Engine, suite: str, budget: str, *, protocol_version: int) -> pd.DataFrame:
    """A GAN suite's pairs: one row per generator norm (``g_norm``), discriminator norm
    (``d_norm``), optimizer and score protocol (feature network and sample counts), with
    ``<metric>_mean``/``_std`` over finished seeds, ``n``, ``runs``, ``status``, ``collapsed``
    (seeds whose samples collapsed) and ``rank`` by FID (lower is better) within its
    ``score_group``. Runs without scores (failed, diverged) count in ``status`` only."""
    sel = Selection(suite, budget, protocol_version=protocol_version)
    with engine.connect() as conn:
        query = select(Run.id, Run.norm, Run.optimizer, Run.status, Run.config, Run.provenance)
        runs = pd.DataFrame(
            conn.execute(query.where(*sel.runs())).all(),
            columns=["run_id", "g_norm", "optimizer", "status", "config", "provenance"],
        )
        if runs.empty:
            return pd.DataFrame()
        values = conn.execute(
            select(Metric.run_id, Metric.name, Metric.value)
            .join(Run, Run.id == Metric.run_id)
            .where(
                *sel.finished_runs(),
                Metric.name.in_((*GAN_SUMMARIES, M.GAN_GEN_SAMPLES, M.GAN_REAL_SAMPLES)),
                Metric.layer == -1,
                Metric.step == -1,
            )
        )
        values = pd.DataFrame(values.all(), columns=["run_id", "metric", "value"])
    runs["d_norm"] = [(c or {}).get("settings", {}).get("d_norm", "?") for c in runs.config]
    runs["feature_network"] = [(p or {}).get("feature_network", "") for p in runs.provenance]
    counts = values[values.metric.isin((M.GAN_GEN_SAMPLES, M.GAN_REAL_SAMPLES))]
    counts = counts.pivot_table(index="run_id", columns="metric", values="value")
    runs = runs.merge(counts.reset_index(), on="run_id", how="left")
    for column in (M.GAN_GEN_SAMPLES, M.GAN_REAL_SAMPLES):
        runs[column] = runs.get(column, pd.Series(math.nan, index=runs.index)).fillna(-1)
    pair = ["g_norm", "d_norm", "optimizer"]
    keys = [*pair, *GAN_SCORE_KEYS]
    scored = runs[runs[M.GAN_GEN_SAMPLES] >= 0]
    table = _run_counts(runs, pair)
    if scored.empty:  # nothing scored yet: the pairs and their runs' statuses
        table.insert(0, "rank", pd.NA)
        table["n"], table["collapsed"], table["score_group"] = 0, 0, ""
        return table
    values = values[values.metric.isin(GAN_SUMMARIES)].merge(scored[["run_id", *keys]])
    stats = values.groupby([*keys, "metric"]).value.agg(["mean", "std", "count"]).reset_index()
    # Only the (pair, score protocol) combinations that have scores: not every pair in every group.
    wide = stats.pivot_table(index=keys, columns="metric", values=["mean", "std"], dropna=True)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    wide = wide.reset_index()
    n = stats[stats.metric == M.GAN_FID][[*keys, "count"]].rename(columns={"count": "n"})
    wide = wide.merge(n, on=keys, how="left")
    table = table.merge(wide, on=pair, how="left")
    table["n"] = table["n"].fillna(0).astype(int)
    collapsed = f"{M.GAN_COLLAPSED}_mean"
    table["collapsed"] = (table.get(collapsed, 0) * table["n"]).round().fillna(0).astype(int)
    # "network / generated / real"; "" for a pair without scores
    table["score_group"] = [
        "" if any(pd.isna(v) for v in values) else " / ".join(str(v) for v in values)
        for values in table[list(GAN_SCORE_KEYS)].itertuples(index=False)
    ]
    fid = f"{M.GAN_FID}_mean"
    if fid not in table:
        table[fid] = math.nan
    table = table.sort_values(["score_group", fid], na_position="last").reset_index(drop=True)
    table.insert(0, "rank", table.groupby("score_group")[fid].rank(method="first"))
    table.loc[table[fid].isna(), "rank"] = pd.NA
    return table


def batch_size_accuracy(
    engine: Engine, suite: str, budget: str, *, protocol_version: int
) -> pd.DataFrame:
    """Test accuracy per norm, optimizer, other variant (a label-noise setting crossed with the
    batch sizes; "" otherwise) and training batch size (the run's own, from its settings): one
    row each with ``mean``/``std``/``n`` over finished seeds, ``runs`` and ``status``."""
    sel = Selection(suite, budget, protocol_version=protocol_version)
    keys = ["norm", "optimizer", "variant", "batch_size"]
    with engine.connect() as conn:
        query = select(Run.id, Run.norm, Run.optimizer, Run.variant, Run.status, Run.config)
        runs = pd.DataFrame(
            conn.execute(query.where(*sel.runs())).all(),
            columns=["run_id", "norm", "optimizer", "variant", "status", "config"],
        )
        values = conn.execute(
            select(Metric.run_id, Metric.value)
            .join(Run, Run.id == Metric.run_id)
            .where(
                *sel.finished_runs(),
                Metric.name == M.ACCURACY,
                Metric.split == "test",
                Metric.corruption == "",
                Metric.severity == 0,
                Metric.layer == -1,
                Metric.step == -1,
            )
        )
        values = pd.DataFrame(values.all(), columns=["run_id", "value"])
    runs["batch_size"] = [(c or {}).get("settings", {}).get("batch_size") for c in runs.config]
    runs = runs[runs.batch_size.notna()].copy()  # a run without a batch size cannot be placed
    if runs.empty:
        return pd.DataFrame(columns=[*keys, "mean", "std", "n", "runs", "status"])
    runs["batch_size"] = runs.batch_size.astype(int)
    # The batch size has its own column: what is left of the variant is any other setting.
    runs["variant"] = [
        ", ".join(p for p in v.split(", ") if p and not p.startswith("batch "))
        for v in runs.variant
    ]
    counts = _run_counts(runs, keys)
    stats = (
        values.merge(runs[["run_id", *keys]], on="run_id")
        .groupby(keys)
        .value.agg(mean="mean", std="std", n="count")
        .reset_index()
    )
    table = counts.merge(stats, on=keys, how="left")
    table["n"] = table["n"].fillna(0).astype(int)
    return table.sort_values(keys).reset_index(drop=True)


def batch_size_board(
    engine: Engine, suite: str, budget: str, protocol_version: int
) -> pd.DataFrame:
    """A batch-size sweep: one row per norm x optimizer (x other variant), one column of mean
    test accuracy per training batch size (``batch 8``, its standard deviation over seeds in
    ``batch 8 std``), ``worst`` (the lowest of them), ``spread`` (highest - lowest), ``n`` (the
    fewest finished seeds behind a column), ``runs`` and ``status``; ranked by ``worst``."""
    long = batch_size_accuracy(engine, suite, budget, protocol_version=protocol_version)
    if long.empty:
        return pd.DataFrame()
    pair = ["norm", "optimizer", "variant"]
    sizes = sorted(long.batch_size.unique())
    table = long.groupby(pair).agg(runs=("runs", "sum"), n=("n", "min")).reset_index()
    table["status"] = [
        ", ".join(f"batch {b}: {st}" for b, st in zip(g.batch_size, g.status, strict=True))
        for _, g in long.groupby(pair)
    ]
    for size in sizes:
        at = long[long.batch_size == size].set_index(pair)
        index = table.set_index(pair).index
        table[f"batch {size}"] = at["mean"].reindex(index).to_numpy()
        table[f"batch {size} std"] = at["std"].reindex(index).to_numpy()
    means = table[[f"batch {size}" for size in sizes]]
    # A row missing a batch size (no finished run there yet) has no worst case and no rank.
    low, high = means.min(axis=1, skipna=False), means.max(axis=1, skipna=False)
    table["worst"], table["spread"] = low, high - low
    table = table.sort_values("worst", ascending=False, na_position="last").reset_index(drop=True)
    table.insert(0, "rank", pd.array(range(1, len(table) + 1), dtype="Int64"))
    table.loc[table["worst"].isna(), "rank"] = pd.NA
    return table
