"""The dashboard's data access: one read-only engine per database, and SQL-aggregated queries.

Nothing here writes. SQLite files are opened through a read-only URI (``mode=ro``) with
``PRAGMA query_only`` on every connection as a second lock; other databases (PostgreSQL) get
read-only transactions where the driver supports it. The schema is never created or migrated from
here: a database that is missing, empty, damaged or at another schema revision is reported as such
(:func:`database_state`) so the app can say what to do.

The functions take an ``Engine`` and return pandas frames; the app wraps them in Streamlit's
cache. Leaderboard numbers come from :func:`normbench.leaderboard.leaderboard`, which aggregates
in SQL.
"""

from __future__ import annotations

import ast
import enum
import inspect
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import Engine, func, select
from sqlalchemy import inspect as sa_inspect

from normbench import metrics as M
from normbench import store
from normbench.corruptions import BENCHMARK, EXTRA, FAMILIES
from normbench.errors import NormbenchError
from normbench.leaderboard import REFERENCE_NORM, Selection, leaderboard
from normbench.robustness import CORRUPTION_ACCURACY, MCE, RELATIVE_MCE
from normbench.store import schema_revisions
from normbench.store.models import CurvePoint, Metric, NormSpeed, Run, RunStatus, Submission

#: The prefix of norms that came in through ``normbench submit``.
SUBMISSION_PREFIX = "submission/"

#: What the leaderboard can be ranked by: label -> (column, higher is better).
RANKINGS: dict[str, tuple[str, bool]] = {
    "clean accuracy": (f"{M.ACCURACY}_mean", True),
    "mean corruption accuracy": (f"{CORRUPTION_ACCURACY}_mean", True),
    "mCE": (f"{MCE}_mean", False),
    "relative mCE": (f"{RELATIVE_MCE}_mean", False),
    "speed vs BatchNorm (side by side)": (f"{M.SPEED_VS_BN}_mean", True),
}
_RANK_METRIC = {
    "clean accuracy": M.ACCURACY,
    "mean corruption accuracy": CORRUPTION_ACCURACY,
    "mCE": MCE,
    "relative mCE": RELATIVE_MCE,
}


class DatabaseState(enum.Enum):
    missing = "missing"  # no such SQLite file
    empty = "empty"  # an empty file or database, or the schema but no runs yet
    outdated = "outdated"  # a schema revision other than this normbench's
    unusable = "unusable"  # not a database, damaged, unreachable: shown as an error
    ready = "ready"


#: How the dashboard shows each ``StoreError`` kind (others are errors).
_STATES = {
    "missing": DatabaseState.missing,
    "empty": DatabaseState.empty,
    "outdated": DatabaseState.outdated,
    "newer": DatabaseState.outdated,
}


def readonly_engine(url: str) -> Engine:
    """An engine that cannot write (see :func:`normbench.store.readonly_engine`), on a database
    that is checked first: it exists, is an undamaged SQLite file (or a reachable server) and is
    at this normbench's schema revision; else a ``NormbenchError`` that says what to do."""
    return store.readonly_engine(url)


def display_url(engine: Engine) -> str:
    """The URL as the user gave it (a plain file path for SQLite)."""
    return store.where(engine.url)


def error_state(err: Exception) -> tuple[DatabaseState, str]:
    """The state an error of opening or reading the database stands for, and its message."""
    if isinstance(err, NormbenchError):
        return _STATES.get(getattr(err, "kind", ""), DatabaseState.unusable), str(err)
    reason = (str(getattr(err, "orig", err)).strip().splitlines() or [type(err).__name__])[0]
    return DatabaseState.unusable, f"Cannot read the results database ({reason})."


def database_state(target: Engine | str) -> tuple[DatabaseState, str]:
    """The state of the database (an engine, or a URL to open read-only) and a sentence for the
    user; for a ready database, the sentence is its file or URL."""
    try:
        engine = readonly_engine(target) if isinstance(target, str) else target
        url = display_url(engine)
        with engine.connect() as conn:
            tables = set(sa_inspect(conn).get_table_names())
        if "runs" not in tables:
            return DatabaseState.empty, f"The results database {url} holds no normbench results."
        current, head = schema_revisions(engine)
        if current != head:
            return DatabaseState.outdated, (
                f"The results database {url} is at schema revision {current!r}; this dashboard "
                f"reads {head!r}. Run `normbench db upgrade --db {url}` (or use a matching "
                "normbench)."
            )
        with engine.connect() as conn:
            if not conn.execute(select(func.count(Run.id))).scalar():
                return DatabaseState.empty, f"The results database {url} has no runs yet."
    except Exception as err:  # noqa: BLE001 - whatever the driver says, the page says it calmly
        return error_state(err)
    return DatabaseState.ready, url


def choices(engine: Engine) -> pd.DataFrame:
    """Every (suite, budget, protocol version, dataset, model, optimizer) with its number of
    runs."""
    keys = (Run.suite, Run.budget, Run.protocol_version, Run.dataset, Run.model, Run.optimizer)
    query = select(*keys, func.count(Run.id)).group_by(*keys)
    columns = ["suite", "budget", "protocol_version", "dataset", "model", "optimizer", "runs"]
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=columns)


def leaderboard_view(engine: Engine, sel: Selection, ranking: str) -> pd.DataFrame:
    """The leaderboard rows of ``sel`` ranked by ``ranking`` (a key of :data:`RANKINGS`), with
    ``submission`` (bool) and ``param_overhead`` (parameters relative to BatchNorm's, - 1)."""
    column, higher_is_better = RANKINGS[ranking]
    table = leaderboard(
        engine,
        sel.suite,
        sel.budget,
        rank_by=_RANK_METRIC.get(ranking, M.ACCURACY),
        datasets=sel.datasets,
        models=sel.models,
        optimizers=sel.optimizers,
        protocol_version=sel.protocol_version,
    )
    if table.empty:
        return table
    if column not in table:
        table[column] = float("nan")
    table = table.sort_values(column, ascending=not higher_is_better, na_position="last")
    table["rank"] = pd.array(range(1, len(table) + 1), dtype="Int64")
    table.loc[table[column].isna(), "rank"] = pd.NA
    table["submission"] = table.norm.str.startswith(SUBMISSION_PREFIX)
    params = f"{M.PARAM_COUNT}_mean"
    if params in table:
        reference = table.loc[table.norm == REFERENCE_NORM, params].mean()
        table["param_overhead"] = table[params] / reference - 1
    else:
        table["param_overhead"] = float("nan")
    return table.reset_index(drop=True)


def corruption_accuracy(engine: Engine, sel: Selection) -> pd.DataFrame:
    """Mean accuracy per (norm, optimizer, corruption, severity) over finished seeds; severity 0
    is the mean over the five severities. Columns: norm, optimizer, corruption, family, severity,
    accuracy, n."""
    query = (
        select(
            Run.norm,
            Run.optimizer,
            Metric.corruption,
            Metric.severity,
            func.avg(Metric.value),
            func.count(Metric.value),
        )
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.finished_runs(),
            Metric.name == M.ACCURACY,
            Metric.split == "test",
            Metric.corruption.in_(BENCHMARK + EXTRA),
        )
        .group_by(Run.norm, Run.optimizer, Metric.corruption, Metric.severity)
    )
    columns = ["norm", "optimizer", "corruption", "severity", "accuracy", "n"]
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=columns)
    family = {c: f for f, names in FAMILIES.items() for c in names}
    df.insert(3, "family", df.corruption.map(family).fillna("extra"))
    return df


def has_corruption_results(engine: Engine, sel: Selection) -> bool:
    """Whether any finished run of ``sel`` has per-corruption accuracies."""
    query = (
        select(Metric.id)
        .join(Run, Metric.run_id == Run.id)
        .where(*sel.finished_runs(), Metric.name == CORRUPTION_ACCURACY)
        .limit(1)
    )
    with engine.connect() as conn:
        return conn.execute(query).first() is not None


def runs(engine: Engine, *, norm: str | None = None, sel: Selection | None = None) -> pd.DataFrame:
    """Runs (newest first) of one norm and/or one selection, with their clean test accuracy."""
    accuracy = (
        select(Metric.run_id, Metric.value.label("accuracy"))
        .where(
            Metric.name == M.ACCURACY,
            Metric.split == "test",
            Metric.corruption == "",
            Metric.severity == 0,
        )
        .subquery()
    )
    query = select(
        Run.id,
        Run.run_key,
        Run.suite,
        Run.budget,
        Run.dataset,
        Run.model,
        Run.norm,
        Run.optimizer,
        Run.seed,
        Run.status,
        Run.epochs_done,
        accuracy.c.accuracy,
        Run.updated_at,
    ).outerjoin(accuracy, accuracy.c.run_id == Run.id)
    if norm is not None:
        query = query.where(Run.norm == norm)
    if sel is not None:
        query = query.where(*sel.runs())
    query = query.order_by(Run.updated_at.desc(), Run.id.desc())
    columns = [
        "id", "run_key", "suite", "budget", "dataset", "model", "norm", "optimizer", "seed",
        "status", "epochs_done", "accuracy", "updated_at",
    ]  # fmt: skip
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=columns)
    df["status"] = df.status.map(lambda s: s.value)
    return df


def norm_speed(engine: Engine, name: str) -> pd.DataFrame:
    """The norm's rows of the speed table (``normbench bench norms``), newest first; the
    interquartile range of the interleaved pairs' ratios and the precision come from each row's
    provenance (absent in rows measured before they were recorded)."""
    query = (
        select(
            NormSpeed.created_at,
            NormSpeed.model,
            NormSpeed.batch_size,
            NormSpeed.device,
            NormSpeed.images_per_s,
            NormSpeed.ratio_to_batchnorm,
            NormSpeed.peak_memory_mb,
            NormSpeed.provenance,
        )  # fmt: skip
        .where(NormSpeed.norm == name)
        .order_by(NormSpeed.created_at.desc())
    )
    columns = ["measured", "model", "batch", "device", "images/s", "vs BatchNorm", "memory MB",
               "provenance"]  # fmt: skip
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=columns)
    provenance = df.pop("provenance")
    df.insert(6, "IQR", [p.get("ratio_iqr") for p in provenance])
    df.insert(4, "precision", [p.get("precision") for p in provenance])
    return df


def norms(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(Run.norm).distinct().order_by(Run.norm)))


@dataclass(frozen=True)
class RunDetail:
    run: dict
    metrics: pd.DataFrame  # name, split, corruption, severity, value
    curves: pd.DataFrame  # epoch, name, value


def run_detail(engine: Engine, run_id: int) -> RunDetail | None:
    with engine.connect() as conn:
        row = conn.execute(select(Run.__table__).where(Run.id == run_id)).mappings().first()
        if row is None:
            return None
        metric_rows = conn.execute(
            select(Metric.name, Metric.split, Metric.corruption, Metric.severity, Metric.value)
            .where(Metric.run_id == run_id)
            .order_by(Metric.name, Metric.corruption, Metric.severity)
        ).all()
        curve_rows = conn.execute(
            select(CurvePoint.epoch, CurvePoint.name, CurvePoint.value)
            .where(CurvePoint.run_id == run_id)
            .order_by(CurvePoint.name, CurvePoint.epoch)
        ).all()
    run = dict(row)
    run["status"] = getattr(run["status"], "value", run["status"])
    return RunDetail(
        run,
        pd.DataFrame(metric_rows, columns=["name", "split", "corruption", "severity", "value"]),
        pd.DataFrame(curve_rows, columns=["epoch", "name", "value"]),
    )


@dataclass(frozen=True)
class BaseRun:
    """The finished run of the same suite, budget, protocol version, dataset, model, norm and seed
    that trained with a two-pass optimizer's base optimizer."""

    id: int
    accuracy: float | None
    images_per_s: float | None


@dataclass(frozen=True)
class TwoPass:
    """What a run of a two-pass (sharpness-aware) optimizer recorded of its second pass; None
    where it recorded nothing."""

    base: str | None
    rho: float | None
    adaptive: bool | None  # ASAM: the ascent scaled by each weight's magnitude
    perturbed: str | None
    perturbed_parameters: int | None
    perturbed_fraction: float | None
    second_pass_stats: str | None
    speed: float | None  # training images/s with it / with the base optimizer, side by side
    speed_iqr: float | None
    speed_note: str | None  # why the run could not measure the speed, when it says
    accuracy: float | None
    images_per_s: float | None
    base_run: BaseRun | None


def two_pass(engine: Engine, detail: RunDetail) -> TwoPass | None:
    """The two-pass facts of a run whose provenance has ``two_pass`` (else None), with the run
    of its base optimizer for comparison when one finished."""
    run = detail.run
    info = (run.get("provenance") or {}).get("two_pass")
    if not isinstance(info, dict):
        return None
    hparams = (run.get("config") or {}).get("hparams") or {}
    base = info.get("base") or hparams.get("base")
    note = run["provenance"].get(M.SPEED_VS_BASE_OPTIMIZER)
    return TwoPass(
        base=base,
        rho=info.get("rho", hparams.get("rho")),
        adaptive=info.get("adaptive"),
        perturbed=info.get("perturbed"),
        perturbed_parameters=info.get("perturbed_parameters"),
        perturbed_fraction=info.get("perturbed_fraction"),
        second_pass_stats=info.get("second_pass_stats"),
        speed=_metric(detail.metrics, M.SPEED_VS_BASE_OPTIMIZER, "train"),
        speed_iqr=_metric(detail.metrics, M.SPEED_VS_BASE_OPTIMIZER_IQR, "train"),
        speed_note=note if isinstance(note, str) else None,
        accuracy=_metric(detail.metrics, M.ACCURACY, "test"),
        images_per_s=_metric(detail.metrics, M.TRAIN_THROUGHPUT, "train"),
        base_run=None if base is None else base_run(engine, run, base),
    )


def base_run(engine: Engine, run: dict, base: str) -> BaseRun | None:
    """The newest finished run like ``run`` (a row of the runs table) but with optimizer
    ``base``, with its clean test accuracy and own training throughput."""
    same = [getattr(Run, key) == run[key] for key in _SAME_EXPERIMENT]
    query = (
        select(Run.id)
        .where(*same, Run.optimizer == base, Run.status == RunStatus.finished)
        .order_by(Run.updated_at.desc(), Run.id.desc())
        .limit(1)
    )
    with engine.connect() as conn:
        run_id = conn.scalar(query)
        if run_id is None:
            return None
        rows = conn.execute(
            select(
                Metric.name, Metric.split, Metric.corruption, Metric.severity, Metric.value
            ).where(Metric.run_id == run_id, Metric.name.in_([M.ACCURACY, M.TRAIN_THROUGHPUT]))
        ).all()
    metrics = pd.DataFrame(rows, columns=["name", "split", "corruption", "severity", "value"])
    return BaseRun(
        run_id, _metric(metrics, M.ACCURACY, "test"), _metric(metrics, M.TRAIN_THROUGHPUT, "train")
    )


#: What a run and the run of its base optimizer share.
_SAME_EXPERIMENT = ("suite", "budget", "protocol_version", "dataset", "model", "norm", "seed")


def _metric(metrics: pd.DataFrame, name: str, split: str) -> float | None:
    """A whole-split metric (no corruption) of a run's metric rows, or None."""
    rows = metrics[
        (metrics.name == name)
        & (metrics.split == split)
        & (metrics.corruption == "")
        & (metrics.severity == 0)
    ]
    return None if rows.empty else float(rows.value.iloc[0])


@dataclass(frozen=True)
class NormInfo:
    name: str
    registered: bool
    description: str = ""
    family: str = ""
    capabilities: tuple[str, ...] = ()
    source: str = ""
    source_sha256: str = ""


def norm_info(name: str, engine: Engine | None = None) -> NormInfo:
    """What is known about a norm: for a submission, the recorded source (read, never run);
    otherwise the installed registry's description, family, capability flags and the source of
    the implementing class. Both with the source's SHA-256."""
    if name.startswith(SUBMISSION_PREFIX) and engine is not None:
        with engine.connect() as conn:
            row = conn.execute(
                select(Submission.source, Submission.source_sha256, Submission.class_name).where(
                    Submission.name == name
                )
            ).first()
        if row is not None:
            return _submitted_info(name, *row)
    from normbench.norms import NORMS, norm_class, norm_source_sha256

    try:
        entry = NORMS.get(name)  # also a name with options, such as groupnorm(groups=8)
    except NormbenchError:
        return NormInfo(name, registered=False)
    try:
        source = inspect.getsource(norm_class(entry.obj))
    except (OSError, TypeError):
        source = ""
    # The digest runs record: every source file the layer's behaviour depends on.
    digest = norm_source_sha256(entry.obj) or ""
    info = entry.info
    return NormInfo(
        name, True, info.description, info.family, tuple(sorted(info.capabilities)), source, digest
    )


def _submitted_info(name: str, source: str, digest: str, class_name: str) -> NormInfo:
    """Description, family and capabilities of a submitted class, from its syntax tree only."""
    description, family, capabilities = "", "", ()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = ast.Module(body=[], type_ignores=[])
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            description = (ast.get_docstring(node) or "").strip().split("\n")[0]
            for item in node.body:
                if isinstance(item, ast.Assign) and len(item.targets) == 1:
                    target = getattr(item.targets[0], "id", "")
                    try:
                        value = ast.literal_eval(item.value)
                    except ValueError:
                        continue
                    if target == "family":
                        family = str(value)
                    elif target == "capabilities":
                        capabilities = tuple(sorted(value))
    return NormInfo(name, True, description, family, capabilities, source, digest)


def pareto_front(df: pd.DataFrame, x: str, y: str) -> pd.Series:
    """Rows not dominated in (higher ``x``, higher ``y``): no other row is at least as good in
    both and better in one. NaN rows are never on the front."""
    valid = df[[x, y]].dropna()
    front = pd.Series(False, index=df.index)
    for i, (xi, yi) in valid.iterrows():
        at_least = (valid[x] >= xi) & (valid[y] >= yi)
        dominated = (at_least & ((valid[x] > xi) | (valid[y] > yi))).any()
        front[i] = not dominated
    return front
