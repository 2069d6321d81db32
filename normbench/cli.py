"""The ``normbench`` command line (typer + rich).

User errors (``NormbenchError``) and bad option values are printed as one paragraph and exit with
status 2; ``run`` exits with 1 when a run of the suite failed, and Ctrl-C exits with 130 after
the launcher has recorded the interrupted run.

Importing this module is cheap (no torch, pandas, SQLAlchemy): every ``--help``, every argument
error and ``list suites`` answer at once, and each command imports what it needs. The norms that
installed packages declare are loaded only by the commands that look norms up.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, NamedTuple, NewType, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normbench import config
from normbench.errors import NormbenchError
from normbench.suite_catalog import BUDGETS, MAX_SEED

ENVIRONMENT = (
    "Environment variables:\n\n"
    "NORMBENCH_DB: the results database, an SQLAlchemy URL or an SQLite file path (--db "
    "overrides it; default: normbench.db in the per-user data directory).\n\n"
    "NORMBENCH_DATA_DIR: a directory of local dataset mirrors (--data-dir overrides it).\n\n"
    "NORMBENCH_CACHE_DIR: decoded datasets, checkpoints and downloads (default: the per-user "
    "cache directory).\n\n"
    "NORMBENCH_LEASE_SECONDS: how long a run claimed by a `normbench run` process that stopped "
    "sending heartbeats stays its own before another process takes it over (default 120).\n\n"
    "NORMBENCH_WORKER_MEMORY_MB, NORMBENCH_WORKER_CPU_SECONDS: a CPU worker's address-space "
    "limit (default: the machine's memory) and a worker's CPU-time limit (default: none for "
    "normbench's own norms; ten times the estimate, at least an hour, for submitted code)."
)

app = typer.Typer(
    help="Benchmark normalization layers: train, evaluate, store and rank norm x optimizer pairs.",
    epilog=ENVIRONMENT,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare datasets (decode once into the cache).", no_args_is_help=True)
db_app = typer.Typer(help="Manage the results database.", no_args_is_help=True)
app.add_typer(data_app, name="data")
bench_app = typer.Typer(help="Measure speed on this machine.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(bench_app, name="bench")

out = Console()
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole when captured
if not out.is_terminal:  # piped or captured: rich would wrap tables at 80 columns
    out.width = 160

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn a ``NormbenchError`` into a one-paragraph message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NormbenchError as e:
            # The message may quote text a submitted norm chose: never read it as markup.
            err.print(f"[bold red]Error:[/bold red] {escape(str(e))}", highlight=False,
                      soft_wrap=True)  # fmt: skip
            raise typer.Exit(e.exit_code) from None

    return wrapper  # type: ignore[return-value]


# Option values parsed into lists (typer's own list types would mean a repeated option).
NameList = NewType("NameList", list)  # of str
SeedList = NewType("SeedList", list)  # of int


def _names(value: str) -> list[str]:
    """Split a comma-separated list of names. Commas inside parentheses belong to a norm's
    options: "groupnorm(groups=8,eps=1e-3),frn" is two names."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(value):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise typer.BadParameter(f"{value!r} has a ')' without its '('")
        elif char == "," and depth == 0:
            items.append(value[start:i])
            start = i + 1
    if depth:
        raise typer.BadParameter(
            f"{value!r} has an unclosed parenthesis; options are written 'groupnorm(groups=8)'"
        )
    names = [name.strip() for name in [*items, value[start:]] if name.strip()]
    if not names:
        raise typer.BadParameter("expected a comma-separated list of names")
    return names


def _seeds(value: str) -> list[int]:
    try:
        seeds = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a comma-separated list of integers") from None
    if not seeds or any(not 0 <= seed <= MAX_SEED for seed in seeds):
        raise typer.BadParameter(
            f"{value!r}: seeds must be integers from 0 to {MAX_SEED} (the largest the results "
            "database stores), e.g. 0,1,2"
        )
    if len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"{value!r}: a seed is repeated")
    return seeds


Budget = StrEnum("Budget", {name: name for name in BUDGETS})
MAX_TIMEOUT = 24 * 3600  # seconds; the contract's checks take seconds, a day is surely a mistake

DataDir = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        envvar="NORMBENCH_DATA_DIR",
        show_envvar=True,
        help="Local dataset mirror directory.",
    ),
]
BudgetOption = Annotated[
    Budget | None,
    typer.Option(
        help="Default: gpu (else full) with CUDA; on a CPU, cpu where it has bfloat16 matrix "
        "units (AMX), "
        "else laptop (the first of these the suite defines; the start line says which)."
    ),
]
Db = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="NORMBENCH_DB",
        show_envvar=True,
        help="SQLAlchemy URL or SQLite file path (default: normbench.db in the per-user data "
        "directory).",
    ),
]
Norms = Annotated[
    NameList | None,
    typer.Option(
        parser=_names, metavar="NAMES", help="Comma-separated norms (default: the suite's)."
    ),
]
DNorms = Annotated[
    NameList | None,
    typer.Option(
        parser=_names,
        metavar="NAMES",
        help="Comma-separated discriminator norms of a GAN suite (default: the suite's; "
        "--norms are the generator's).",
    ),
]
Optimizers = Annotated[
    NameList | None,
    typer.Option(
        parser=_names, metavar="NAMES", help="Comma-separated optimizers (default: the suite's)."
    ),
]
Seeds = Annotated[
    SeedList | None,
    typer.Option(
        parser=_seeds,
        metavar="SEEDS",
        help="Comma-separated seeds, e.g. 0,1,2 (default: the budget's, else the suite's).",
    ),
]
Timeout = Annotated[
    float,
    typer.Option(min=1, max=MAX_TIMEOUT, help="Seconds the check may take."),
]


class ExecutorName(StrEnum):
    local = "local"
    ray = "ray"


ExecutorOption = Annotated[
    ExecutorName,
    typer.Option(
        envvar="NORMBENCH_EXECUTOR",
        show_envvar=True,
        help="Where runs execute: local (a confined worker process per run on this machine) or "
        "ray (a Ray task per run on a Ray cluster).",
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(
        envvar="NORMBENCH_RAY_ADDRESS",
        show_envvar=True,
        help="HOST:PORT of a running Ray cluster's head (with --executor ray; default: start a "
        "local cluster on this machine).",
    ),
]
Workers = Annotated[
    int,
    typer.Option(
        min=1, max=64, envvar="NORMBENCH_WORKERS", show_envvar=True,
        help="Local worker processes at once (with --executor local).",
    ),
]  # fmt: skip
CheckpointDir = Annotated[
    str | None,
    typer.Option(
        envvar="NORMBENCH_CHECKPOINT_DIR",
        show_envvar=True,
        help="Where runs keep their epoch checkpoints (default: checkpoints in the cache "
        "directory); shared storage lets another machine resume a run.",
    ),
]


def _plugin_norms() -> None:
    """Register the norms that installed packages declare (``normbench.norms`` entry points).
    Called by the commands that look norms up, so the others never import them (nor torch)."""
    from normbench.submissions import load_entry_point_norms

    load_entry_point_norms()


def _lookup(option: str, registry: Any, names: list[str]) -> list[str]:
    """The canonical names of ``names`` given with ``option``; an unknown or malformed one is
    reported with the option that gave it."""
    try:
        return [registry.info(name).name for name in names]
    except NormbenchError as e:
        raise NormbenchError(f"Invalid value for '{option}': {e}") from None


@app.command()
@user_errors
def run(
    suite: Annotated[
        str, typer.Option(help="Suite name (see `normbench list suites`) or TOML path.")
    ],
    budget: BudgetOption = None,
    norms: Norms = None,
    optimizers: Optimizers = None,
    seeds: Seeds = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: best).")] = None,
    data_dir: DataDir = None,
    db: Db = None,
    force: Annotated[bool, typer.Option(help="Re-run runs that already finished.")] = False,
    executor: ExecutorOption = ExecutorName.local,
    ray_address: RayAddress = None,
    workers: Workers = 1,
    checkpoint_dir: CheckpointDir = None,
    d_norms: DNorms = None,
) -> None:
    """Train and evaluate every norm x optimizer x seed of a suite and store the results.

    Each run executes in its own confined worker process (or a Ray task); several `normbench
    run` processes on one database divide a suite between them.

    Exit status 1 when a run failed (its error is stored), 2 for bad input, 130 if interrupted.
    """
    where = Where(executor, ray_address, workers, checkpoint_dir)
    _run_suite(suite, budget, norms, optimizers, seeds, device, data_dir, db, force, where,
               d_norms)  # fmt: skip


class Where(NamedTuple):
    """Where the runs execute: the executor and its settings."""

    executor: ExecutorName = ExecutorName.local
    ray_address: str | None = None
    workers: int = 1
    checkpoint_dir: str | None = None


def _run_suite(
    suite: str,
    budget: Budget | None,
    norm_list: list[str] | None,
    opt_list: list[str] | None,
    seed_list: list[int] | None,
    device: str | None,
    data_dir: str | None,
    db: str | None,
    force: bool,
    where: Where,
    d_norm_list: list[str] | None = None,
) -> None:
    import os

    from normbench.norms import NORMS
    from normbench.optim import OPTIMIZERS
    from normbench.runtime import resolve_device
    from normbench.submissions import NAMESPACE
    from normbench.suites import default_budget_reason, load_suite
    from runners.executor import create_executor

    _plugin_norms()
    s = load_suite(suite)
    dev = resolve_device(device)
    budget_name, why = (budget.value, "") if budget else default_budget_reason(s, dev)
    # Bad input is reported before the database is created or touched.
    s.budget(budget_name)
    _lookup("--optimizers", OPTIMIZERS, opt_list or [])
    _lookup("--norms", NORMS, [n for n in norm_list or [] if not n.startswith(NAMESPACE)])
    _lookup("--d-norms", NORMS, [n for n in d_norm_list or [] if not n.startswith(NAMESPACE)])
    if d_norm_list and s.spec.task != "gan":
        raise NormbenchError(
            f"--d-norms chooses a GAN's discriminator norms; suite {s.name!r} is a "
            f"{s.spec.task} suite."
        )
    if where.checkpoint_dir:
        os.environ["NORMBENCH_CHECKPOINT_DIR"] = where.checkpoint_dir
    # The executor first: an unreachable Ray cluster is reported before the database is touched.
    runner = create_executor(
        where.executor.value, workers=where.workers, ray_address=where.ray_address
    )
    try:
        _run_with(runner, s, budget_name, why, dev, norm_list, opt_list, seed_list, data_dir, db,
                  force, d_norm_list)  # fmt: skip
    finally:
        runner.close()


def _run_with(runner, s, budget_name, why, dev, norm_list, opt_list, seed_list, data_dir, db,
              force, d_norm_list=None) -> None:  # fmt: skip
    from normbench.norms import NORMS
    from normbench.store import open_store
    from normbench.submissions import register_recorded
    from normbench.suites import plan
    from runners.suite import Terminated, run_suite

    store = open_store(config.db_url(db))
    # Submitted norms are named like any other; their code runs only in the workers.
    submissions = register_recorded(store, [*(norm_list or []), *(d_norm_list or [])])
    _lookup("--norms", NORMS, norm_list or [])
    _lookup("--d-norms", NORMS, d_norm_list or [])
    ratios = {r["name"]: r["time_ratio"] for r in _contract_ratios(store, submissions)}
    specs = plan(s, budget_name, norms=norm_list, optimizers=opt_list, seeds=seed_list,
                 d_norms=d_norm_list)  # fmt: skip
    err.print(
        f"Suite [bold]{s.name}[/bold], budget [bold]{budget_name}"
        f"[/bold]{f' ({why})' if why else ''}, on {dev}, executor {runner.name}; results in "
        f"{store.location}"
    )
    derive = None
    if s.spec.corruption_set:
        reference = (s.spec.reference.norm, s.spec.reference.optimizer)

        def derive(store) -> int:
            return store.update_mce(
                s.name, budget_name, reference, alexnet=s.spec.corruption_set == "imagenet-c",
                protocol_version=s.spec.protocol_version,
            )  # fmt: skip

    try:
        result = run_suite(
            specs, store, runner, device=dev, data_dir=data_dir, force=force, console=err,
            submissions=[{**r, "time_ratio": ratios.get(r["name"])} for r in submissions],
            derive=derive,
        )  # fmt: skip
    except KeyboardInterrupt as stop:
        terminated = isinstance(stop, Terminated)
        err.print(
            f"[yellow]{'Terminated (SIGTERM)' if terminated else 'Interrupted'}.[/yellow] The runs "
            "that had started are marked interrupted; run the same command again to go on (a run "
            "resumes from its last finished epoch)."
        )
        raise typer.Exit(143 if terminated else 130) from None
    outcomes = result.outcomes
    if derive is not None and not result.mce_runs:
        err.print(f"mCE not computed yet: the reference pair {' + '.join(reference)} has no "
                  f"finished run at budget {budget_name}.")  # fmt: skip
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.status] = counts.get(o.status, 0) + 1
    err.print(
        "Summary: "
        + ", ".join(f"{n} {status}" for status, n in counts.items())
        + f". See `normbench leaderboard --suite {s.name} --budget {budget_name}`."
    )
    if counts.get("failed"):  # a crash, not a result: scripts and CI must notice
        err.print(f"[red]{counts['failed']} run(s) failed[/red]; exit status 1.")
        raise typer.Exit(1)


def _contract_ratios(store, submissions: list[dict]) -> list[dict]:
    """Each submission's forward + backward time ratio to BatchNorm from its contract report."""
    found = []
    for row in store.submissions([r["name"] for r in submissions]):
        ratio = (row.contract or {}).get("time_ratio")
        found.append({"name": row.name, "time_ratio": ratio if isinstance(ratio, float) else None})
    return found


@app.command()
@user_errors
def check(
    target: Annotated[str, typer.Argument(help="FILE:CLASS of a norm layer, or a norm name.")],
    timeout: Timeout = 300,
) -> None:
    """Check a norm layer against the norm contract (in a separate process, time-limited)."""
    from normbench.contract import check_norm, run_contract

    if ":" in target:
        report = run_contract(target, timeout=timeout)
    else:  # a registered norm: normbench's own code or a package's, checked in this process
        from normbench.norms import NORMS

        _plugin_norms()
        report = check_norm(NORMS.get(target).obj, target)
    t = Table(title=f"norm contract: {target}")
    t.add_column("check")
    t.add_column("result")
    for c in report.checks:
        verdict = "[green]pass[/green]" if c.passed else f"[red]FAIL[/red] {escape(c.message)}"
        t.add_row(escape(c.name), verdict)
    if report.checks:
        out.print(t)
    if report.isolation:
        err.print(f"[yellow]Note:[/yellow] {escape(report.isolation)}")
    if report.passed:
        overhead = _num(report.param_overhead, "{:+.1%}", "not measured")
        ratio = _num(report.time_ratio, "{:.2f}x", "not measured")
        out.print(
            f"Contract holds. Parameters vs BatchNorm: {overhead}; forward + backward time vs "
            f"BatchNorm: {ratio}."
        )
        return
    raise NormbenchError(f"{target} breaks the norm contract:{report.failure_list()}")


@app.command()
@user_errors
def submit(
    target: Annotated[str, typer.Argument(help="FILE:CLASS of the norm layer to submit.")],
    name: Annotated[
        str | None, typer.Option(help="Name on the leaderboard (default: the class name).")
    ] = None,
    suite: Annotated[str, typer.Option(help="Suite to run the norm in.")] = "cifar-c",
    budget: BudgetOption = None,
    optimizers: Optimizers = None,
    seeds: Seeds = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N.")] = None,
    data_dir: DataDir = None,
    db: Db = None,
    timeout: Timeout = 300,
    executor: ExecutorOption = ExecutorName.local,
    ray_address: RayAddress = None,
    workers: Workers = 1,
    checkpoint_dir: CheckpointDir = None,
) -> None:
    """Check a norm layer, record it with its source and hash, and run a suite with it.

    The norm's code runs only in confined worker processes: the contract check's verdict is
    computed here from what the check process returns, never taken from it."""
    from normbench.optim import OPTIMIZERS
    from normbench.submissions import submit as record
    from normbench.suites import load_suite

    _plugin_norms()  # a submission may not take the name of an installed norm
    load_suite(suite)  # a bad suite or optimizer is reported before the norm is checked
    _lookup("--optimizers", OPTIMIZERS, optimizers or [])
    registered, new = record(config.db_url(db), target, name, timeout)
    if not new:
        err.print(f"{target} is already submitted as [bold]{registered}[/bold] (same source); "
                  "nothing to do.")  # fmt: skip
        return
    err.print(f"Contract holds; recorded as [bold]{registered}[/bold].")
    where = Where(executor, ray_address, workers, checkpoint_dir)
    _run_suite(suite, budget, [registered], optimizers, seeds, device, data_dir, db, False, where)


class ListKind(StrEnum):
    norms = "norms"
    optimizers = "optimizers"
    models = "models"
    suites = "suites"
    corruptions = "corruptions"


@app.command("list")
@user_errors
def list_(
    kind: Annotated[ListKind, typer.Argument(help="What to list.")],
    pattern: Annotated[str, typer.Option(help="Glob filter on names.")] = "*",
) -> None:
    """List registered norms, optimizers, models, suites or corruptions."""
    module, attribute = {
        "norms": ("normbench.norms", "NORMS"),
        "optimizers": ("normbench.optim", "OPTIMIZERS"),
        "models": ("normbench.models", "MODELS"),
        "suites": ("normbench.suite_catalog", "SUITES"),  # without torch
        "corruptions": ("normbench.corruptions", "CORRUPTIONS"),
    }[kind.value]
    if kind is ListKind.norms:
        _plugin_norms()
    registry = getattr(importlib.import_module(module), attribute)
    table = Table("name", "family", "capabilities", "description", title=kind.value)
    if kind is ListKind.norms:  # what can go in parentheses after the name: groupnorm(groups=8)
        from normbench.norms import norm_options

        table.add_column("options")
    if kind is ListKind.optimizers:  # the hyper-parameters a suite may set, with defaults
        from normbench.optim import TWO_PASS, optimizer_options

        table.add_column("hyper-parameters (default)")
    for name in registry.names(pattern):
        entry = registry.get(name)
        info = entry.info
        row = [name, info.family, ", ".join(sorted(info.capabilities)), info.description]
        if kind is ListKind.norms:
            row.append(", ".join(f"{k}={v!r}" for k, v in norm_options(entry.obj).items()))
        if kind is ListKind.optimizers:
            options = [k if v is ... else f"{k}={v!r}" for k, v in optimizer_options(name).items()]
            if info.has(TWO_PASS):
                options.append("+ the base optimizer's")
            row.append(", ".join(options))
        table.add_row(*row)
    out.print(table)


class Format(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


def _missing(value: Any) -> bool:
    import pandas as pd

    return value is None or bool(pd.isna(value))


def _num(value: Any, fmt: str, missing: str = "-") -> str:
    return missing if _missing(value) else fmt.format(value)


def _is_true(value: Any) -> bool:
    """True for a true flag; False for false and for a missing one (NA)."""
    return not _missing(value) and bool(value)


def _pct(mean: Any, std: Any) -> str:
    if _missing(mean):
        return "-"
    return f"{100 * mean:.2f}" + ("" if _missing(std) else f" ± {100 * std:.2f}")


@app.command()
@user_errors
def leaderboard(
    suite: Annotated[str, typer.Option(help="Suite name.")],
    budget: BudgetOption = None,
    format: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
    db: Db = None,
    step: Annotated[
        int,
        typer.Option(
            min=0, help="Probe suites: the training step whose probes to show (0: at init)."
        ),
    ] = 0,
    rank_by: Annotated[
        str | None,
        typer.Option(
            "--rank-by",
            help="Metric to rank a classify board by, e.g. pgd_accuracy (default: "
            "corruption_accuracy for suites with corruptions, else accuracy).",
        ),
    ] = None,
) -> None:
    """Rank the norm x optimizer pairs of a suite (mean ± std over seeds), read-only.

    A probe suite shows, per model and norm, the probes' whole-model summaries instead; a
    suite that sweeps batch sizes, each pair's accuracy per batch size.
    Only the suite's current protocol version; runs of other versions are counted, never mixed.
    """
    from normbench import metrics as M
    from normbench.leaderboard import (
        SUMMARY_METRICS,
        batch_size_board,
        gan_board,
        kept_apart_note,
        probe_board,
        protocol_versions,
    )
    from normbench.leaderboard import leaderboard as query
    from normbench.store import open_store
    from normbench.suites import default_budget, load_suite

    _plugin_norms()  # the suite may name them
    s = load_suite(suite)
    robustness = s.spec.corruption_set is not None
    if rank_by is not None and rank_by not in SUMMARY_METRICS:
        raise NormbenchError(
            f"--rank-by {rank_by!r} is not a board metric; choose one of "
            f"{', '.join(SUMMARY_METRICS)}."
        )
    if rank_by is not None and s.spec.task != "classify":
        raise NormbenchError(
            f"--rank-by ranks classify boards; suite {s.name!r} is a {s.spec.task} suite, whose "
            "board has its own order."
        )
    rank_by = rank_by or ("corruption_accuracy" if robustness else M.ACCURACY)
    budget_name = budget.value if budget else default_budget(s)
    # Reading never creates, migrates or writes a database.
    store = open_store(config.db_url(db, create_parent=False), readonly=True)
    version = s.spec.protocol_version
    if s.spec.task == "probe":
        table = probe_board(store.engine, s.name, budget_name, protocol_version=version, step=step)
    elif s.spec.task == "gan":
        table = gan_board(store.engine, s.name, budget_name, protocol_version=version)
    elif batch_sweep := bool(getattr(s.spec.budgets.get(budget_name), "batch_sizes", None)):
        table = batch_size_board(store.engine, s.name, budget_name, version)
    else:
        table = query(store.engine, s.name, budget_name, rank_by=rank_by, protocol_version=version)
    note = kept_apart_note(protocol_versions(store.engine, s.name, budget_name), version)
    if note:
        err.print(f"[yellow]{note}[/yellow]")
    if table.empty:
        err.print(
            f"No runs of suite {s.name!r} (protocol version {version}) at budget "
            f"{budget_name!r} in {store.location}. Produce some with "
            f"`normbench run --suite {s.name} --budget {budget_name}`."
        )
        if format is not Format.table:
            typer.echo("[]" if format is Format.json else "")
        return
    if format is Format.csv:
        typer.echo(table.to_csv(index=False), nl=False)
        return
    if format is Format.json:
        typer.echo(json.dumps(json.loads(table.to_json(orient="records")), indent=1))
        return
    title = f"{s.name} / {budget_name} (protocol version {version})"
    if s.spec.task == "probe":
        out.print(_probe_table(table, f"{title}, probes at step {step}"))
        return
    if s.spec.task == "gan":
        for group, rows in table.groupby(table.get("score_group", "").fillna(""), sort=False):
            out.print(_gan_table(rows, f"{title}{_score_group_title(group)}"))
        return
    if batch_sweep:
        out.print(_batch_size_table(table, f"{title}, test accuracy % by training batch size"))
        return
    default_rank = "corruption_accuracy" if robustness else M.ACCURACY
    if rank_by != default_rank:
        title += f", ranked by {rank_by}"
    out.print(_leaderboard_table(table, title, robustness, rank_by))


def _batch_size_table(table, title: str) -> Table:
    """The batch-size board: per pair, test accuracy at each batch size (mean ± std over seeds),
    ranked by the worst of them."""
    sizes = [c for c in table if c.startswith("batch ") and not c.endswith(" std")]

    def accuracy(column: str):
        return lambda r: _pct(r.get(column), r.get(f"{column} std"))

    columns = [
        ("#", lambda r: _num(r.get("rank"), "{:.0f}")),
        ("norm", lambda r: r["norm"]),
        ("optimizer", lambda r: r["optimizer"]),
    ]
    if (table["variant"].fillna("") != "").any():
        columns.append(("variant", lambda r: r["variant"]))
    columns += [(size, accuracy(size)) for size in sizes]
    columns += [
        ("worst %", lambda r: _pct(r.get("worst"), None)),
        ("spread (points)", lambda r: _num(_scaled(r.get("spread")), "{:.1f}")),
        ("n", lambda r: str(r["n"])),
    ]
    t = _rows_table(table, title, columns)
    t.caption = (
        "Each batch size trains with the learning rate scaled linearly (lr x size / the budget's "
        "batch size) and is evaluated in eval mode (BatchNorm with its running statistics). "
        "worst: the lowest accuracy over the batch sizes; spread: highest - lowest; n: the fewest "
        "finished seeds behind a column."
    )
    return t


def _scaled(value, factor: float = 100.0):
    """``value`` times ``factor``, or ``value`` itself when it is missing."""
    return value if _missing(value) else value * factor


def _score_group_title(group: str) -> str:
    """A GAN board's score protocol as its table's title says it."""
    if not group:
        return ", no scores yet"
    network, generated, real = group.split(" / ")
    return (
        f", FID/KID in {network} features of {float(generated):.0f} generated vs "
        f"{float(real):.0f} real images"
    )


def _mean_std_cell(metric: str, fmt: str):
    """A column's cell: ``<metric>_mean`` ± ``<metric>_std``, each formatted with ``fmt``."""

    def cell(r) -> str:
        mean, std = r.get(f"{metric}_mean"), r.get(f"{metric}_std")
        return _num(mean, fmt) + ("" if _missing(std) else f" ± {fmt.format(std)}")

    return cell


def _rows_table(table, title: str, columns) -> Table:
    """A rich table of ``table``'s rows, one column per (header, cell function)."""
    t = Table(title=title)
    for name, _ in columns:
        t.add_column(name, overflow="fold")
    for r in table.to_dict("records"):
        t.add_row(*(fn(r) for _, fn in columns))
    return t


def _gan_table(table, title: str) -> Table:
    """The GAN board: generator x discriminator norm pairs ranked by FID (lower is better)."""
    from normbench import metrics as M

    columns = [
        ("#", lambda r: _num(r.get("rank"), "{:.0f}")),
        ("G norm", lambda r: r["g_norm"]),
        ("D norm", lambda r: r["d_norm"]),
        ("optimizer", lambda r: r["optimizer"]),
        ("FID", _mean_std_cell(M.GAN_FID, "{:.1f}")),
        ("KID", _mean_std_cell(M.GAN_KID, "{:.4f}")),
        ("sample diversity", _mean_std_cell(M.GAN_DIVERSITY, "{:.3f}")),
        ("collapsed", lambda r: str(r.get("collapsed", 0))),
        ("n", lambda r: str(r.get("n", 0))),
        ("runs", lambda r: r["status"]),
    ]
    return _rows_table(table, title, columns)


def _probe_table(table, title: str) -> Table:
    """The probe board: per model and norm, the whole-model probe summaries (mean ± std over
    seeds)."""
    from normbench import metrics as M

    columns = [
        ("model", lambda r: r["model"]),
        ("norm", lambda r: r["norm"]),
        ("activation growth (last / first block)", _mean_std_cell(M.PROBE_ACT_GROWTH, "{:.3g}")),
        ("last-block sample similarity", _mean_std_cell(M.PROBE_LAST_COSINE, "{:.3f}")),
        ("last-block stable rank", _mean_std_cell(M.PROBE_LAST_STABLE_RANK, "{:.3g}")),
        ("grad norm first / last conv", _mean_std_cell(M.PROBE_GRAD_RATIO, "{:.3g}")),
        ("non-finite at block", lambda r: _num(r.get("nonfinite_block"), "{:.0f}", "")),
        ("n", lambda r: str(r.get("n", 0))),
        ("runs", lambda r: r["status"]),
    ]
    return _rows_table(table, title, columns)


def _leaderboard_table(table, title: str, robustness: bool, rank_by: str) -> Table:
    from normbench import metrics as M
    from normbench.leaderboard import tie_legend

    def mean_std(metric: str):
        """mean ± std over seeds; for the ranked metric, mean [95% interval] n=seeds (one seed
        has no interval). Accuracies in %, other metrics as they are."""
        if metric != rank_by:
            return lambda r: _pct(r.get(f"{metric}_mean"), r.get(f"{metric}_std"))
        scale, fmt = (100, "{:.2f}") if metric.endswith("accuracy") else (1, "{:.4g}")

        def cell(r) -> str:
            mean, low, high = (r.get(f"{metric}_{s}") for s in ("mean", "ci_low", "ci_high"))
            if _missing(mean):
                return "-"
            v = [fmt.format(scale * x) if not _missing(x) else "" for x in (mean, low, high)]
            ci = "" if _missing(low) else f" [{v[1]}, {v[2]}]"
            return f"{v[0]}{ci} n={r['n']}"

        return cell

    def label(text: str, metric: str) -> str:
        return f"{text} [95% CI]" if metric == rank_by else text

    def speed(r) -> str:
        ratio, iqr = r.get(f"{M.SPEED_VS_BN}_mean"), r.get(f"{M.SPEED_VS_BN_IQR}_mean")
        return _num(ratio, "{:.2f}x") + ("" if _missing(iqr) else f" (IQR {iqr:.2f})")

    def speed_vs_base(r) -> str:
        ratio = r.get(f"{M.SPEED_VS_BASE_OPTIMIZER}_mean")
        iqr = r.get(f"{M.SPEED_VS_BASE_OPTIMIZER_IQR}_mean")
        return _num(ratio, "{:.2f}x") + ("" if _missing(iqr) else f" (IQR {iqr:.2f})")

    def worst(r) -> str:
        if _missing(r.get("worst_corruption")):
            return "-"
        return f"{r['worst_corruption']} ({100 * r['worst_corruption_accuracy']:.1f})"

    columns = [
        # "=": tied with the row above (the caption's legend)
        ("#", lambda r: _num(r["rank"], "{:.0f}") + (" =" if _is_true(r.get("tied")) else "")),
        ("norm", lambda r: r["norm"]),
        ("optimizer", lambda r: r["optimizer"]),
    ]
    shown = {"corruption_accuracy", M.ACCURACY, M.ADV_CLEAN_ACCURACY, M.FGSM_ACCURACY,
             M.PGD_ACCURACY, M.ACCURACY_BN_ADAPT, M.ACCURACY_TENT}  # fmt: skip
    if rank_by not in shown:  # ranked by a metric the board has no column for: it goes first
        columns.append((label(rank_by, rank_by), mean_std(rank_by)))
    # Only a suite that sweeps a setting within a pair (label noise, batch size) has variants.
    if "variant" in table and (table["variant"].fillna("") != "").any():
        columns.append(("variant", lambda r: r["variant"]))
    # Test-time adaptation: each method's accuracy beside the plain one, when runs have them (a
    # robustness board shows the corruption accuracies; the clean ones are in --format json).
    adapted = [
        (label, metric, overall)
        for label, metric, overall in (
            ("BN-adapt", M.ACCURACY_BN_ADAPT, "corruption_accuracy_bn_adapt"),
            ("TENT", M.ACCURACY_TENT, "corruption_accuracy_tent"),
        )
        if f"{metric}_mean" in table and table[f"{metric}_mean"].notna().any()
    ]
    if robustness:
        columns += [
            (label("corruption acc %", "corruption_accuracy"), mean_std("corruption_accuracy")),
            *[(label(f"{name} corr. acc %", o), mean_std(o)) for name, _, o in adapted],
            (label("clean acc %", M.ACCURACY), mean_std(M.ACCURACY)),
            ("mCE", lambda r: _num(r.get("mce_mean"), "{:.1f}")),
            ("rel. mCE", lambda r: _num(r.get("relative_mce_mean"), "{:.1f}")),
            ("worst corruption (acc %)", worst),
        ]
    else:
        columns += [
            (label("accuracy %", M.ACCURACY), mean_std(M.ACCURACY)),
            *[(label(f"{name} accuracy %", m), mean_std(m)) for name, m, _ in adapted],
            ("ECE", lambda r: _num(r.get(f"{M.ECE}_mean"), "{:.3f}")),
        ]
    # Boards of suites with the adversarial option: accuracy on the attacked subset.
    adversarial = (
        f"{M.PGD_ACCURACY}_mean" in table and table[f"{M.PGD_ACCURACY}_mean"].notna().any()
    )
    if adversarial:
        columns += [
            (label("adv. subset clean %", M.ADV_CLEAN_ACCURACY), mean_std(M.ADV_CLEAN_ACCURACY)),
            (label("FGSM acc %", M.FGSM_ACCURACY), mean_std(M.FGSM_ACCURACY)),
            (label("PGD acc %", M.PGD_ACCURACY), mean_std(M.PGD_ACCURACY)),
        ]
    columns += [
        ("speed vs BN", speed),
    ]
    two_pass = (
        f"{M.SPEED_VS_BASE_OPTIMIZER}_mean" in table
        and table[f"{M.SPEED_VS_BASE_OPTIMIZER}_mean"].notna().any()
    )
    if two_pass:
        columns.append(("train speed vs base optimizer", speed_vs_base))
    landscape = (
        f"{M.LANDSCAPE_BETA_MEAN}_mean" in table
        and table[f"{M.LANDSCAPE_BETA_MEAN}_mean"].notna().any()
    )
    if landscape:
        columns += [
            ("loss range", lambda r: _num(r.get(f"{M.LANDSCAPE_LOSS_RANGE_MEAN}_mean"), "{:.3g}")),
            ("grad pred.", lambda r: _num(r.get(f"{M.LANDSCAPE_GRAD_PRED_MEAN}_mean"), "{:.3g}")),
            ("beta-smooth", lambda r: _num(r.get(f"{M.LANDSCAPE_BETA_MEAN}_mean"), "{:.3g}")),
            ("ICS l2", lambda r: _num(r.get(f"{M.ICS_L2_MEAN}_mean"), "{:.3g}")),
            ("ICS cos", lambda r: _num(r.get(f"{M.ICS_COSINE_MEAN}_mean"), "{:.3f}")),
        ]
    columns += [
        ("own images/s", lambda r: _num(r.get(f"{M.TRAIN_THROUGHPUT}_mean"), "{:,.0f}")),
        ("wall s", lambda r: _num(r.get(f"{M.WALL_TIME}_mean"), "{:.0f}")),
        ("runs", lambda r: r["status"]),
    ]
    caption = tie_legend(table) + " " + (
        "speed vs BN: each run's model timed against the same model with BatchNorm in its own "
        "process, in interleaved repetitions (median, interquartile range), mean over seeds. "
        "own images/s: the run's own throughput, measured during training (depends on what else "
        "the machine was doing)."
    )
    if two_pass:
        caption += (
            " train speed vs base optimizer: a two-pass optimizer (sam...) timed against its base "
            "optimizer on the run's model in the run's process, the same way."
        )
    if landscape:
        caption += (
            " Landscape probes along the gradient during training (means over the probed "
            "steps): loss range, gradient predictiveness (largest gradient change), effective "
            "beta-smoothness, internal covariate shift (l2 and cosine, over layers); lower "
            "loss range, gradient change and beta mean a smoother landscape."
        )
    if adversarial:
        caption += (
            " FGSM / PGD acc: accuracy under white-box L-infinity attacks in pixel space on a "
            "fixed subset of the test images (its clean accuracy beside them; eps, steps and "
            "subset size are in each run's info); a cheap indicator, not an AutoAttack evaluation."
        )
    if adapted:
        caption += (
            " BN-adapt / TENT: the same test images with the norms adapted at test time, each "
            "batch normalized with its own statistics (TENT also takes an entropy-minimising "
            "step on the norms' affine parameters per batch, reset for each corruption and "
            "severity); plain accuracy and mCE are without adaptation."
        )
    t = Table(title=title, caption=caption)
    for header, _ in columns:
        t.add_column(header, no_wrap=header in ("norm", "optimizer", "variant"))
    for row in table.to_dict("records"):
        t.add_row(*(cell(row) for _, cell in columns))
    return t


class ExportFormat(StrEnum):
    csv = "csv"
    json = "json"
    latex = "latex"
    markdown = "markdown"


@app.command()
@user_errors
def export(
    suite: Annotated[str, typer.Option(help="Suite name (a classify suite).")],
    format: Annotated[
        ExportFormat,
        typer.Option("--format", help="csv (metadata as leading # lines), json, latex, markdown."),
    ],
    budget: BudgetOption = None,
    output: Annotated[
        str | None, typer.Option("--output", help="File to write (default: standard output).")
    ] = None,
    rank_by: Annotated[
        str | None,
        typer.Option(
            "--rank-by",
            help="Metric to rank by (default: corruption_accuracy for suites with corruptions, "
            "else accuracy).",
        ),
    ] = None,
    db: Db = None,
) -> None:
    """Write a suite's board for a paper or report: mean [95% CI] over seeds, ties between
    neighbouring rows (paired t-test, Holm-corrected), the per-corruption table where the suite
    has one, and the protocol and normbench version, read-only."""
    from pathlib import Path

    from normbench.export import load_board, render
    from normbench.store import open_store
    from normbench.suites import default_budget, load_suite

    _plugin_norms()  # the suite may name them
    s = load_suite(suite)
    budget_name = budget.value if budget else default_budget(s)
    store = open_store(config.db_url(db, create_parent=False), readonly=True)
    board = load_board(store.engine, s, budget_name, rank_by, location=store.location)
    text = render(board, format.value)
    if output is None:
        typer.echo(text, nl=False)
        return
    path = Path(output)
    if not path.parent.is_dir():
        raise NormbenchError(f"--output {output}: folder {path.parent} does not exist.")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise NormbenchError(f"--output {output}: cannot write ({e.strerror}).") from None
    err.print(f"Wrote {format.value} board of {s.name} / {budget_name} to {escape(str(path))}")


@app.command()
@user_errors
def dashboard(
    db: Db = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8501,
    address: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 to share).")] = "localhost",
) -> None:
    """Open the leaderboard dashboard (Streamlit) on the results database, read-only."""
    import os
    import socket
    import sys
    from importlib import resources

    url = config.db_url(db, create_parent=False)
    from dashboard.data import readonly_engine

    try:
        readonly_engine(url).dispose()
    except NormbenchError:
        raise  # already one clear paragraph (missing, damaged, older schema, ...)
    except Exception as e:  # noqa: BLE001 - an unusable URL, reported as such
        raise NormbenchError(f"Cannot use the database URL {url!r}: {e}") from None
    with socket.socket() as probe:
        try:
            probe.bind((address, port))
        except OSError as e:
            raise NormbenchError(
                f"Cannot serve on {address}:{port} ({e.strerror}); choose another --port."
            ) from None
    app_path = resources.files("dashboard") / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path),
        "--server.port", str(port), "--server.address", address, "--server.headless", "true",
        "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
        "--client.toolbarMode", "viewer",
    ]  # fmt: skip
    err.print(f"Dashboard on http://{address}:{port} for {url} (Ctrl-C stops it)")
    env = {**os.environ, "NORMBENCH_DB": url}
    sys.stdout.flush()
    sys.stderr.flush()
    # The server replaces this process, so Ctrl-C and a service manager's SIGTERM reach
    # Streamlit itself and no server is ever left running without its parent.
    os.execve(sys.executable, command, env)


class Precision(StrEnum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


@bench_app.command("norms")
@user_errors
def bench_norms(
    norms: Annotated[
        NameList | None,
        typer.Option(
            parser=_names, metavar="NAMES", help="Comma-separated norms (default: all registered)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=4096, help="Images per step.")] = 64,
    pairs: Annotated[
        int,
        typer.Option(min=2, max=100, help="Interleaved repetitions of each norm and BatchNorm."),
    ] = 7,
    precision: Annotated[
        Precision, typer.Option(help="As a budget's precision: auto = bf16 where fast, else fp32.")
    ] = Precision.auto,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: best).")] = None,
    db: Db = None,
) -> None:
    """Training-step speed and memory of each norm in ResNet-20, side by side with BatchNorm.

    Forward + backward, channels_last, the precision's autocast, interleaved with BatchNorm.

    Also whether each norm holds the norm contract."""

    from normbench import runtime
    from normbench.norms import NORMS
    from normbench.normspeed import MODEL
    from normbench.store import open_store
    from normbench.submissions import NAMESPACE, register_recorded

    _plugin_norms()
    dev = runtime.resolve_device(device)
    # Bad names are reported before the database is created or touched.
    _lookup("--norms", NORMS, [n for n in norms or [] if not n.startswith(NAMESPACE)])
    store = open_store(config.db_url(db))
    submissions = register_recorded(store, norms)
    names = norms or [n for n in NORMS.names() if not n.startswith("test-")]
    # Unknown names fail here, with the closest matches; names with options become canonical.
    names = _lookup("--norms", NORMS, names)
    err.print(
        f"{len(names)} norm(s) in {MODEL}, batch {batch_size}, {dev}, each side by side with "
        f"BatchNorm in {pairs} interleaved pairs, in a confined worker process"
    )
    measured = _normspeed_in_worker(names, submissions, batch_size, pairs, precision.value, dev)
    resolved = measured["precision"]
    setup = f"{MODEL}, batch {batch_size}, {resolved}, channels_last, {dev}"
    memory_label = "peak MB" if dev.type == "cuda" else "saved MB"
    t = Table(
        title=f"norm speed: {setup}",
        caption="vs BatchNorm: median ratio of images/s over interleaved pairs timed in one "
        "worker process (IQR: interquartile range of the pairs); batchnorm's row is a second "
        "BatchNorm model, the noise of the measurement.",
    )
    headers = ("norm", "images/s", "vs BatchNorm", "IQR", memory_label, "params", "contract",
               "note")  # fmt: skip
    for header in headers:
        t.add_column(header, no_wrap=header == "norm")
    provenance = {"torch": measured["torch"], "threads": measured["threads"],
                  "precision": resolved, "channels_last": True, "pairs": pairs}  # fmt: skip
    rows = measured["rows"]
    for r in rows:
        t.add_row(r["norm"], _num(r["images_per_s"], "{:,.0f}"), _num(r["ratio"], "{:.2f}x"),
                  _num(r["iqr"], "{:.2f}"), _num(r["memory_mb"], "{:.1f}"), f"{r['params']:,}",
                  r["contract"], r["error"])  # fmt: skip
    store.add_norm_speeds(
        {
            "norm": r["norm"], "model": MODEL, "batch_size": batch_size, "device": str(dev),
            "images_per_s": r["images_per_s"], "ratio_to_batchnorm": r["ratio"],
            "peak_memory_mb": r["memory_mb"], "param_count": r["params"],
            "provenance": {**provenance, "ratio_iqr": r["iqr"]},
        }
        for r in rows
        if not r["error"]
    )  # fmt: skip
    out.print(t)


def _normspeed_in_worker(names, submissions, batch_size, pairs, precision, dev) -> dict:
    """Run the speed table in a confined worker (submitted norms never run in this process)."""
    import tempfile

    from normbench.errors import NormbenchError
    from runners.executor import Job, memory_limit_mb, run_isolated

    with tempfile.TemporaryDirectory(prefix="normbench-bench-") as folder:
        job = Job(
            id="bench-norms", kind="normspeed", data_dir=None, checkpoint_dir=folder,
            spec={"names": names, "batch_size": batch_size, "pairs": pairs,
                  "precision": precision},
            submissions=submissions, device=str(dev), limits={"memory_mb": memory_limit_mb()},
        )  # fmt: skip
        with progress_display():
            done = run_isolated(job.to_json())
    if done["result"] is None:
        raise NormbenchError(f"The speed measurement failed: {done['error']}")
    return done["result"]


def progress_display():
    from normbench import progress

    return progress.display(err)


class DatasetName(StrEnum):
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    cifar10_c = "cifar10-c"


@data_app.command("prepare")
@user_errors
def data_prepare(
    dataset: Annotated[DatasetName, typer.Argument(help="Dataset to decode or generate.")],
    data_dir: DataDir = None,
    seed: Annotated[
        int, typer.Option(min=0, max=MAX_SEED, help="Seed of generated corruptions.")
    ] = 0,
    device: Annotated[str | None, typer.Option(help="Device that generates corruptions.")] = None,
) -> None:
    """Decode CIFAR-10 or CIFAR-100 once into the cache, or prepare CIFAR-10-C.

    cifar10-c: the official files in the data directory, else all 19 x 5 generated into the cache.
    """
    if dataset is DatasetName.cifar10_c:
        _prepare_cifar10_c(data_dir, seed, device)
        return
    from normbench import progress
    from normbench.data import load_dataset

    for split in ("train", "test"):
        with progress.display(err):
            ds = load_dataset(dataset.value, split, data_dir)
        err.print(f"{dataset.value} {split}: {len(ds)} images from {ds.source}")
    out.print(f"cached in {config.cache_dir() / 'datasets' / dataset.value}")


def _prepare_cifar10_c(data_dir: str | None, seed: int, device: str | None) -> None:
    import time

    from normbench import progress
    from normbench.corruptions.sets import prepare_cifar10_c
    from normbench.runtime import resolve_device

    dev = resolve_device(device or "cpu")
    start = time.perf_counter()
    with progress.display(err):  # decoding and generation show their bars on it
        cset = prepare_cifar10_c(data_dir, seed=seed, device=dev)
    seconds = cset.manifest.get("seconds", {})
    if seconds:
        t = Table("corruption", "seconds (5 x 10,000 images)", "images/s", title="CIFAR-10-C")
        for name, secs in seconds.items():
            t.add_row(name, "-" if secs is None else f"{secs:.1f}",
                      "-" if not secs else f"{5 * 10_000 / secs:,.0f}")  # fmt: skip
        out.print(t)
    out.print(f"CIFAR-10-C ({cset.source}) in {cset.root}; {time.perf_counter() - start:.1f} s")


@db_app.command("upgrade")
@user_errors
def db_upgrade(db: Db = None) -> None:
    """Create or upgrade the results database schema (Alembic migrations)."""
    from normbench.store import create_db_engine, schema_revisions, upgrade

    url = config.db_url(db)
    engine = create_db_engine(url)
    upgrade(engine)
    current, _ = schema_revisions(engine)
    out.print(f"{engine.url.render_as_string()} is at schema revision {current}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
