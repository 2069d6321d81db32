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
import json
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import Engine, func, select
from sqlalchemy import inspect as sa_inspect

from normbench import metrics as M
from normbench import store
from normbench.corruptions import BENCHMARK, EXTRA, FAMILIES
from normbench.errors import NormbenchError
from normbench.leaderboard import REFERENCE_NORM, Selection, gan_board, leaderboard
from normbench.robustness import CORRUPTION_ACCURACY, MCE, RELATIVE_MCE
from normbench.store import schema_revisions
from normbench.store.models import (
    Artifact,
    CurvePoint,
    Metric,
    NormSpeed,
    Run,
    RunStatus,
    Submission,
)

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


# --- Analysis: initialization probes and landscape probes ---------------------------------

#: The task of the initialization probe runs.
PROBE_TASK = "probe"
#: Runs the Analysis page reads: a diverged run's rows before it blew up are measurements too.
ANALYSED_STATUSES = (RunStatus.finished, RunStatus.diverged)
#: Per-block and per-convolution probe values, drawn against the layer index.
PROBE_PROFILES = (M.PROBE_ACT_VAR, M.PROBE_COSINE, M.PROBE_STABLE_RANK, M.PROBE_GRAD_NORM)
#: Whole-model probe summaries (layer -1) at each probed step.
PROBE_SUMMARIES = (M.PROBE_ACT_GROWTH, M.PROBE_LAST_COSINE, M.PROBE_LAST_STABLE_RANK,
                   M.PROBE_GRAD_RATIO)  # fmt: skip
#: Landscape values at each probed training step (layer -1).
LANDSCAPE_CURVES = (M.LANDSCAPE_LOSS_MIN, M.LANDSCAPE_LOSS_MAX, M.LANDSCAPE_GRAD_CHANGE_MIN,
                    M.LANDSCAPE_GRAD_CHANGE_MAX, M.LANDSCAPE_BETA)  # fmt: skip
#: Whole-run landscape and ICS summaries (step -1, layer -1).
LANDSCAPE_SUMMARIES = (M.LANDSCAPE_LOSS_RANGE_MEAN, M.LANDSCAPE_GRAD_PRED_MEAN,
                       M.LANDSCAPE_BETA_MEAN, M.ICS_L2_MEAN, M.ICS_COSINE_MEAN)  # fmt: skip
_LANDSCAPE_ROWS = (*LANDSCAPE_CURVES, *LANDSCAPE_SUMMARIES, M.ICS_L2, M.ICS_COSINE)


def _model_label():
    """A probe run's model with its arguments (``settings.model_label``), else its model."""
    return func.coalesce(Run.config[("settings", "model_label")].as_string(), Run.model)


def _probe_runs_filter(sel: Selection) -> tuple:
    return (*sel.runs(), Run.task == PROBE_TASK, Run.status.in_(ANALYSED_STATUSES))


def probe_runs(engine: Engine, sel: Selection) -> pd.DataFrame:
    """The probe runs (finished or diverged) of ``sel``. Columns: id, norm, optimizer, seed,
    status, error, model, model_label, depth (``model_args["depth"]``, else NA), family (the
    model with its arguments other than depth: the runs that differ only in depth)."""
    query = (
        select(
            Run.id, Run.norm, Run.optimizer, Run.seed, Run.status, Run.error, Run.model, Run.config
        )  # fmt: skip
        .where(*_probe_runs_filter(sel))
        .order_by(Run.id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    records = []
    for run_id, norm, optimizer, seed, status, error, model, config in rows:
        settings = (config or {}).get("settings") or {}
        args = settings.get("model_args") or {}
        depth = args.get("depth")
        # written as the suites write model labels, so a family reads like one: vgg(width=16)
        others = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(args.items()) if k != "depth")
        records.append({
            "id": run_id, "norm": norm, "optimizer": optimizer, "seed": seed,
            "status": getattr(status, "value", status), "error": error or "", "model": model,
            "model_label": settings.get("model_label") or model,
            "depth": depth if isinstance(depth, int) and not isinstance(depth, bool) else None,
            "family": f"{model}({others})" if others else model,
        })  # fmt: skip
    columns = ["id", "norm", "optimizer", "seed", "status", "error", "model", "model_label",
               "depth", "family"]  # fmt: skip
    df = pd.DataFrame(records, columns=columns)
    df["depth"] = df.depth.astype("Int64")
    return df


def probe_steps(engine: Engine, sel: Selection, model_label: str) -> list[int]:
    """The training steps ``model_label``'s probe runs measured at, ascending."""
    query = (
        select(Metric.step)
        .join(Run, Metric.run_id == Run.id)
        .where(
            *_probe_runs_filter(sel),
            _model_label() == model_label,
            Metric.name.in_(PROBE_PROFILES),
            Metric.step >= 0,
        )  # fmt: skip
        .distinct()
        .order_by(Metric.step)
    )
    with engine.connect() as conn:
        return [int(s) for s in conn.scalars(query)]


def probe_profiles(engine: Engine, sel: Selection, model_label: str, step: int) -> pd.DataFrame:
    """The per-block and per-convolution probe values of ``model_label`` at training ``step``,
    over seeds. Columns: norm, name, layer, mean, min, max, n (seeds)."""
    query = (
        select(
            Run.norm,
            Metric.name,
            Metric.layer,
            func.avg(Metric.value),
            func.min(Metric.value),
            func.max(Metric.value),
            func.count(Metric.value),
        )  # fmt: skip
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *_probe_runs_filter(sel),
            _model_label() == model_label,
            Metric.name.in_(PROBE_PROFILES),
            Metric.step == step,
            Metric.layer >= 0,
        )  # fmt: skip
        .group_by(Run.norm, Metric.name, Metric.layer)
        .order_by(Run.norm, Metric.name, Metric.layer)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return pd.DataFrame(rows, columns=["norm", "name", "layer", "mean", "min", "max", "n"])


def probe_summaries(engine: Engine, sel: Selection, step: int) -> pd.DataFrame:
    """The whole-model probe summaries of every probe run of ``sel`` at training ``step``, one
    row per run and name. Columns: run_id, name, value."""
    query = (
        select(Metric.run_id, Metric.name, Metric.value)
        .join(Run, Metric.run_id == Run.id)
        .where(
            *_probe_runs_filter(sel),
            Metric.name.in_(PROBE_SUMMARIES),
            Metric.step == step,
            Metric.layer == -1,
        )  # fmt: skip
        .order_by(Metric.run_id, Metric.name)
    )
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=["run_id", "name", "value"])


def probe_divergences(engine: Engine, sel: Selection) -> pd.DataFrame:
    """The diverged probe runs of ``sel`` with the block where activations first went non-finite
    and the step it happened at (NA where the run did not record them). Columns: run_id,
    model_label, norm, seed, step, block, reason."""
    nonfinite = (
        select(Metric.run_id, Metric.step, Metric.value)
        .where(Metric.name == M.PROBE_NONFINITE_LAYER)
        .subquery()
    )
    query = (
        select(
            Run.id,
            _model_label(),
            Run.norm,
            Run.seed,
            nonfinite.c.step,
            nonfinite.c.value,
            Run.error,
        )  # fmt: skip
        .outerjoin(nonfinite, nonfinite.c.run_id == Run.id)
        .where(*sel.runs(), Run.task == PROBE_TASK, Run.status == RunStatus.diverged)
        .order_by(Run.id, nonfinite.c.step)
    )
    columns = ["run_id", "model_label", "norm", "seed", "step", "block", "reason"]
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=columns)
    df["step"] = df.step.astype("Int64")
    df["block"] = df.block.round().astype("Int64")
    df["reason"] = df.reason.fillna("")
    return df


def _landscape_runs(sel: Selection):
    """The ids of the (finished or diverged) runs of ``sel`` that stored landscape rows."""
    return (
        select(Metric.run_id)
        .join(Run, Metric.run_id == Run.id)
        .where(*sel.runs(), Run.status.in_(ANALYSED_STATUSES), Metric.name.in_(_LANDSCAPE_ROWS))
        .distinct()
    )


def landscape_curves(engine: Engine, sel: Selection) -> pd.DataFrame:
    """The landscape values over training steps, per norm and optimizer, over seeds. Columns:
    norm, optimizer, name, step, mean, min, max, n (seeds)."""
    query = (
        select(
            Run.norm,
            Run.optimizer,
            Metric.name,
            Metric.step,
            func.avg(Metric.value),
            func.min(Metric.value),
            func.max(Metric.value),
            func.count(Metric.value),
        )  # fmt: skip
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.runs(),
            Run.status.in_(ANALYSED_STATUSES),
            Metric.name.in_(LANDSCAPE_CURVES),
            Metric.step >= 0,
            Metric.layer == -1,
        )  # fmt: skip
        .group_by(Run.norm, Run.optimizer, Metric.name, Metric.step)
        .order_by(Run.norm, Run.optimizer, Metric.name, Metric.step)
    )
    columns = ["norm", "optimizer", "name", "step", "mean", "min", "max", "n"]
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=columns)


def ics_layers(engine: Engine, sel: Selection) -> pd.DataFrame:
    """Internal covariate shift per weight layer, averaged over the probed steps and seeds.
    Columns: norm, optimizer, name (ics_l2 or ics_cosine), layer, mean, n (values averaged)."""
    query = (
        select(
            Run.norm,
            Run.optimizer,
            Metric.name,
            Metric.layer,
            func.avg(Metric.value),
            func.count(Metric.value),
        )  # fmt: skip
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.runs(),
            Run.status.in_(ANALYSED_STATUSES),
            Metric.name.in_((M.ICS_L2, M.ICS_COSINE)),
            Metric.step >= 0,
            Metric.layer >= 0,
        )  # fmt: skip
        .group_by(Run.norm, Run.optimizer, Metric.name, Metric.layer)
        .order_by(Run.norm, Run.optimizer, Metric.name, Metric.layer)
    )
    columns = ["norm", "optimizer", "name", "layer", "mean", "n"]
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=columns)


def landscape_summary(engine: Engine, sel: Selection) -> pd.DataFrame:
    """Per norm and optimizer of the runs with landscape rows: the whole-run summaries (mean over
    seeds, one column each, NaN where none was stored), the clean test accuracy (mean over the
    seeds that have one), ``seeds`` and ``diverged`` (runs)."""
    runs = _landscape_runs(sel).subquery()
    wanted = (
        (Metric.name.in_(LANDSCAPE_SUMMARIES) & (Metric.step == -1) & (Metric.layer == -1))
        | ((Metric.name == M.ACCURACY) & (Metric.split == "test") & (Metric.corruption == "")
           & (Metric.severity == 0))
    )  # fmt: skip
    values = (
        select(Run.norm, Run.optimizer, Metric.name, func.avg(Metric.value))
        .join(Metric, Metric.run_id == Run.id)
        .where(Run.id.in_(select(runs.c.run_id)), wanted)
        .group_by(Run.norm, Run.optimizer, Metric.name)
    )
    counts = (
        select(Run.norm, Run.optimizer, Run.status, func.count(Run.id))
        .where(Run.id.in_(select(runs.c.run_id)))
        .group_by(Run.norm, Run.optimizer, Run.status)
    )
    with engine.connect() as conn:
        value_rows, count_rows = conn.execute(values).all(), conn.execute(counts).all()
    columns = ["norm", "optimizer", *LANDSCAPE_SUMMARIES, M.ACCURACY, "seeds", "diverged"]
    if not count_rows:
        return pd.DataFrame(columns=columns)
    counts_df = pd.DataFrame(count_rows, columns=["norm", "optimizer", "status", "runs"])
    counts_df["diverged"] = counts_df.runs.where(counts_df.status == RunStatus.diverged, 0)
    table = counts_df.groupby(["norm", "optimizer"]).agg(
        seeds=("runs", "sum"), diverged=("diverged", "sum")
    )
    if value_rows:
        wide = pd.DataFrame(value_rows, columns=["norm", "optimizer", "name", "value"]).pivot(
            index=["norm", "optimizer"], columns="name", values="value"
        )
        table = table.join(wide)
    return table.reset_index().reindex(columns=columns)


# --- Analysis readings: each norm against BatchNorm, in words ------------------------------

#: Within this factor of BatchNorm's value a ratio reads as "about the same".
SAME_FACTOR = 1.5
#: Within this difference of BatchNorm's, an average cosine similarity reads as "about the same".
SAME_COSINE = 0.05


def times(value: float) -> str:
    """A ratio for a sentence: 27x, 1.4x, 0.031x, 3.2e+07x."""
    if abs(value) >= 1e5:
        return f"{value:.1e}x"
    return f"{value:.0f}x" if abs(value) >= 10 else f"{value:.2g}x"


def _ratio_word(ratio: float, higher: str, lower: str) -> str:
    if ratio > SAME_FACTOR:
        return higher
    return lower if ratio < 1 / SAME_FACTOR else "about the same"


def _present(value) -> bool:
    return value is not None and not pd.isna(value)


def probe_readings(table: pd.DataFrame, reference: str = REFERENCE_NORM) -> dict[str, str]:
    """One sentence per norm of ``table`` (indexed by norm; columns growth, blocks, last_cosine,
    first_grad_norm, NaN where not measured) against ``reference``'s row; without a reference
    row, the norm's own numbers. The reference gets no sentence of its own."""
    ref = table.loc[reference] if reference in table.index else None
    readings = {}
    for norm, row in table.iterrows():
        if norm == reference:
            continue
        parts = []
        if _present(row.growth):
            blocks = f" over {int(row.blocks)} blocks" if _present(row.blocks) else ""
            part = f"activation growth {times(row.growth)}{blocks}"
            if ref is not None and _present(ref.growth) and ref.growth > 0:
                word = _ratio_word(row.growth / ref.growth, "faster growth", "slower growth")
                part += f" vs BatchNorm's {times(ref.growth)} ({word})"
            parts.append(part)
        else:
            parts.append("activation growth not measured")
        if _present(row.last_cosine):
            part = f"last-block sample similarity {row.last_cosine:.2f}"
            if ref is not None and _present(ref.last_cosine):
                diff = row.last_cosine - ref.last_cosine
                word = "about the same"
                if abs(diff) > SAME_COSINE:  # alike samples: deeper layers see less of the input
                    word = "less informative" if diff > 0 else "more informative"
                part += f" vs {ref.last_cosine:.2f} ({word})"
            parts.append(part)
        if _present(row.first_grad_norm):
            if ref is not None and _present(ref.first_grad_norm) and ref.first_grad_norm > 0:
                ratio = row.first_grad_norm / ref.first_grad_norm
                parts.append(f"first-layer gradient norm {times(ratio)} BatchNorm's")
            else:
                parts.append(f"first-layer gradient norm {row.first_grad_norm:.3g}")
        readings[norm] = f"{norm}: " + "; ".join(parts)
    return readings


def landscape_readings(table: pd.DataFrame, reference: str = REFERENCE_NORM) -> dict[str, str]:
    """One sentence per run label ("norm + optimizer") of ``table`` (a
    :func:`landscape_summary` frame) against ``reference`` with the same optimizer; where that
    has no row, the sentence says so."""
    readings = {}
    for row in table.itertuples(index=False):
        if row.norm == reference:
            continue
        label = f"{row.norm} + {row.optimizer}"
        ref = table[(table.norm == reference) & (table.optimizer == row.optimizer)]
        if ref.empty:
            readings[label] = f"{label}: no BatchNorm + {row.optimizer} landscape run to compare"
            continue
        ref = ref.iloc[0]
        parts = []
        for column, what, higher, lower in (
            (M.LANDSCAPE_BETA_MEAN, "beta-smoothness", "rougher landscape", "smoother landscape"),
            (M.LANDSCAPE_LOSS_RANGE_MEAN, "loss range", "wider loss variation",
             "narrower loss variation"),
            (M.LANDSCAPE_GRAD_PRED_MEAN, "gradient change", "less predictive gradients",
             "more predictive gradients"),
            (M.ICS_L2_MEAN, "ICS (l2)", "more covariate shift", "less covariate shift"),
        ):  # fmt: skip
            mine, theirs = getattr(row, column), ref[column]
            if _present(mine) and _present(theirs) and theirs > 0:
                ratio = mine / theirs
                parts.append(f"{what} {times(ratio)} BatchNorm's "
                             f"({_ratio_word(ratio, higher, lower)})")  # fmt: skip
        readings[label] = f"{label}: " + ("; ".join(parts) or "no summary to compare")
    return readings


# --- GAN suites: the board by FID, sample grids, FID over training ------------------------------

#: The task of GAN runs (a generator with norm ``runs.norm``, a discriminator with the run's
#: ``settings.d_norm``).
GAN_TASK = "gan"
#: The artifact a finished GAN run stores its sample grid in.
SAMPLES_ARTIFACT = "samples.png"
#: Per-run values the GAN page quotes beside a sample grid (step -1, layer -1).
GAN_RUN_VALUES = (M.GAN_FID, M.GAN_KID, M.GAN_DIVERSITY, M.GAN_COLLAPSED, M.GAN_GEN_SAMPLES,
                  M.GAN_REAL_SAMPLES)  # fmt: skip


def _d_norm():
    """A GAN run's discriminator norm (``settings.d_norm``)."""
    return Run.config[("settings", "d_norm")].as_string()


def _whole_board(sel: Selection) -> tuple:
    """The runs of the board of ``sel`` (suite, budget, protocol version), whatever the filters."""
    return Selection(sel.suite, sel.budget, protocol_version=sel.protocol_version).runs()


def gan_suites(engine: Engine) -> list[str]:
    """The suites with GAN runs, by name."""
    query = select(Run.suite).where(Run.task == GAN_TASK).distinct().order_by(Run.suite)
    with engine.connect() as conn:
        return list(conn.scalars(query))


def is_gan_board(engine: Engine, sel: Selection) -> bool:
    """Whether the board of ``sel`` (its suite, budget and protocol version) holds GAN runs."""
    query = select(Run.id).where(*_whole_board(sel), Run.task == GAN_TASK).limit(1)
    with engine.connect() as conn:
        return conn.execute(query).first() is not None


def gan_board_view(engine: Engine, sel: Selection) -> pd.DataFrame:
    """The GAN board of ``sel`` (:func:`normbench.leaderboard.gan_board`) narrowed to the chosen
    optimizers (a GAN budget trains one model on one dataset: the other filters keep it whole),
    with every column the page reads (NaN where nothing was scored) and ``score_group`` "" for
    pairs without scores. Empty when no run matches."""
    table = gan_board(engine, sel.suite, sel.budget, protocol_version=sel.protocol_version)
    if table.empty:
        return table
    if sel.optimizers:
        table = table[table.optimizer.isin(sel.optimizers)].copy()
    # a board whose runs have no scores yet has only the pairs and their status
    for column in ("collapsed", "n"):
        if column not in table:
            table[column] = 0
    for column in ("rank", *(f"{m}_{s}" for m in _GAN_BOARD_VALUES for s in ("mean", "std"))):
        if column not in table:
            table[column] = float("nan")
    table["score_group"] = table.get("score_group", pd.Series("", index=table.index)).fillna("")
    # A score group holds the pairs with scored seeds in it; a pair without any scored seed is
    # listed once, under "" (the board may carry it in every group, with no seeds).
    pair = ["g_norm", "d_norm", "optimizer"]
    scored = table[table.n > 0]
    rest = table[table.n == 0].drop_duplicates(pair)
    rest = rest[~rest.set_index(pair).index.isin(scored.set_index(pair).index)]
    rest = rest.assign(score_group="", rank=float("nan"))
    return pd.concat([scored, rest]).reset_index(drop=True)


#: The board's values the Leaderboard page shows, as ``<name>_mean`` and ``<name>_std``.
_GAN_BOARD_VALUES = (M.GAN_FID, M.GAN_KID, M.GAN_DIVERSITY)


def score_groups(table: pd.DataFrame) -> list[str]:
    """The score groups of a :func:`gan_board_view` table, the one with most scored seeds first
    (then by name); "" (pairs without scores) last."""
    scored = table[table.score_group != ""]
    seeds = scored.groupby("score_group").n.sum()
    ordered = sorted(seeds.index, key=lambda g: (-seeds[g], g))
    return ordered + ([""] if (table.score_group == "").any() else [])


def score_group_parts(group: str) -> tuple[str, int, int]:
    """A score group's feature network, generated and real image counts."""
    network, generated, real = group.rsplit(" / ", 2)
    return network, round(float(generated)), round(float(real))


def score_group_title(group: str) -> str:
    """A heading for a score group's table: its sample counts."""
    if not group:
        return "No scores yet"
    _, generated, real = score_group_parts(group)
    return f"FID of {generated:,} generated vs {real:,} real images"


def score_group_caption(group: str) -> str:
    """What a score group's numbers are, for the caption of its table."""
    if not group:
        return "These pairs have no finished run with FID and KID (diverged or failed runs)."
    network, generated, real = score_group_parts(group)
    return (
        f"FID/KID in {network} features of {generated:,} generated vs {real:,} real images; "
        "lower is better."
    )


def gan_runs(engine: Engine, sel: Selection) -> pd.DataFrame:
    """Every GAN run of ``sel``, by pair and seed. Columns: id, run_key, g_norm, d_norm,
    optimizer, seed, status, error, diverged_step (NA), the final values of
    :data:`GAN_RUN_VALUES` (NaN where not stored), progress_samples (the generated images behind
    each FID over training, NA where not recorded) and has_samples (a sample grid is stored)."""
    samples = select(Artifact.run_id).where(Artifact.name == SAMPLES_ARTIFACT).distinct().subquery()
    query = (
        select(
            Run.id,
            Run.run_key,
            Run.norm,
            _d_norm(),
            Run.optimizer,
            Run.seed,
            Run.status,
            Run.error,
            Run.diverged_step,
            Run.config[("settings", "fid_every_samples")].as_integer(),
            samples.c.run_id.is_not(None),
        )  # fmt: skip
        .outerjoin(samples, samples.c.run_id == Run.id)
        .where(*sel.runs(), Run.task == GAN_TASK)
        .order_by(Run.norm, _d_norm(), Run.optimizer, Run.seed)
    )
    values = (
        select(Metric.run_id, Metric.name, Metric.value)
        .join(Run, Metric.run_id == Run.id)
        .where(
            *sel.runs(),
            Run.task == GAN_TASK,
            Metric.name.in_(GAN_RUN_VALUES),
            Metric.step == -1,
            Metric.layer == -1,
        )  # fmt: skip
    )
    columns = ["id", "run_key", "g_norm", "d_norm", "optimizer", "seed", "status", "error",
               "diverged_step", "progress_samples", "has_samples"]  # fmt: skip
    with engine.connect() as conn:
        df = pd.DataFrame(conn.execute(query).all(), columns=columns)
        value_rows = conn.execute(values).all()
    df["status"] = df.status.map(lambda s: getattr(s, "value", s))
    df["error"] = df.error.fillna("")
    df["d_norm"] = df.d_norm.fillna("?")
    df["has_samples"] = df.has_samples.astype(bool)
    for column in ("diverged_step", "progress_samples"):
        df[column] = df[column].astype("Int64")
    wide = pd.DataFrame(value_rows, columns=["id", "name", "value"]).pivot_table(
        index="id", columns="name", values="value"
    )
    df = df.merge(wide, left_on="id", right_index=True, how="left")
    return df.reindex(columns=[*columns[:-1], *GAN_RUN_VALUES, "has_samples"])


def gan_sample_grid(engine: Engine, run_key: str) -> bytes | None:
    """The sample grid a GAN run stored (PNG bytes), or None."""
    return store.run_artifact(engine, run_key, SAMPLES_ARTIFACT)


def fid_progress(engine: Engine, sel: Selection) -> pd.DataFrame:
    """FID during training per pair and generator step over seeds (finished and diverged runs:
    a diverged run's points before it blew up count). Columns: g_norm, d_norm, optimizer, step,
    mean, min, max, n (seeds)."""
    d_norm = _d_norm()
    query = (
        select(
            Run.norm,
            d_norm,
            Run.optimizer,
            Metric.step,
            func.avg(Metric.value),
            func.min(Metric.value),
            func.max(Metric.value),
            func.count(Metric.value),
        )  # fmt: skip
        .join(Metric, Metric.run_id == Run.id)
        .where(
            *sel.runs(),
            Run.task == GAN_TASK,
            Run.status.in_(ANALYSED_STATUSES),
            Metric.name == M.GAN_FID_PROGRESS,
            Metric.step >= 0,
        )  # fmt: skip
        .group_by(Run.norm, d_norm, Run.optimizer, Metric.step)
        .order_by(Run.norm, d_norm, Run.optimizer, Metric.step)
    )
    columns = ["g_norm", "d_norm", "optimizer", "step", "mean", "min", "max", "n"]
    with engine.connect() as conn:
        return pd.DataFrame(conn.execute(query).all(), columns=columns)


def gan_pair_label(df: pd.DataFrame) -> pd.Series:
    """How the GAN pages name a pair: G batchnorm / D spectral_norm + adam."""
    return "G " + df.g_norm + " / D " + df.d_norm + " + " + df.optimizer
