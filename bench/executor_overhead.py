"""What the executors cost: a suite in this process vs in confined workers, and four orchestrators
sharing one results database.

1. One small suite (by default a tiny cifar10 suite written to a temporary folder: the fast net at
   widths 16-32-32-32, one epoch on 2,048 training images, no speed check, 3 norms x 2 optimizers
   x 2 seeds = 12 runs; ``--runs`` for fewer) three ways, one after another in this invocation:

   a. the in-process loop: ``runners.classify.run`` for each spec in this process, nothing
      stored; the cost floor;
   b. ``run_suite`` with ``LocalExecutor()`` into a fresh SQLite file: the plan (data check and
      the estimate's calibration), a claim, a confined worker, the results written per run;
   c. ``run_suite`` with ``RayExecutor(None)`` on a local Ray cluster (its start and shutdown
      timed apart), if Ray is installed.

   It prints the ratios to (a), the overhead per run ((b - a) / runs) and that overhead as a
   fraction of one ``cpu``-budget cifar10 run as ``normbench.estimate`` calibrates it here. The
   overhead is split by where it goes: the plan; the time outside the runs' own wall time
   (``wall_time_s``: worker start, claim, result writes); and the runs themselves, which in a
   fresh worker process pay a cold start that the in-process loop pays once (lazy imports, first
   kernels), and which also change with the machine's load (the median training images/s shows
   it: the measurements are one after another, on a machine that may be shared).

2. Four ``normbench run`` processes started together on the same suite and the same (new) SQLite
   database, and with ``--postgres URL`` on a new database of that PostgreSQL server too: runs
   finished, runs executed by more than one process (``done`` lines per run across the four
   outputs, and rows per run key), planned runs without a finished row, lock errors or
   tracebacks in the outputs, exit statuses, and the wall time against (b).

Everything runs on the CPU. The dataset cache is a private temporary folder (``--cache-dir`` to
reuse one): the first decode of CIFAR-10 into it takes about 20 s, timed apart and not counted.

    python bench/executor_overhead.py --data-dir ../shared/data [--runs 12] [--skip-ray]
        [--suite PATH --budget B] [--postgres URL] [--cache-dir DIR] [--keep]

For ``--postgres``, ``python tests/pgserver.py start DIR`` starts a throwaway server and prints
its URL; the benchmark creates a database of its own there and drops it at the end.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from normbench.errors import NormbenchError

NORMS = ["batchnorm", "groupnorm", "layernorm"]
OPTIMIZERS = ["sgd", "adamw"]
ORCHESTRATORS = 4
ERROR_LINE = re.compile(r"database is locked|deadlock detected|Traceback", re.IGNORECASE)

TINY = """
name = "{name}"
description = "A seconds-long cifar10 suite for timing the executors."
protocol_version = 1
task = "classify"
dataset = "cifar10"
norms = {norms}
optimizers = {optimizers}
seeds = {seeds}
reference = {{ norm = "batchnorm", optimizer = "sgd" }}

[budgets.smoke]
model = "fastnet"
model_args = {{ widths = [16, 32, 32, 32] }}
epochs = 1
batch_size = 128
eval_batch_size = 500
train_subset = 2048
test_subset = 500
precision = "fp32"
speed_pairs = 0
schedule = "onecycle"
warmup = 0.25
label_smoothing = 0.2
augment = {{ crop_padding = 2, flip = true }}
optimizers.sgd = {{ lr = 0.2, momentum = 0.9, nesterov = true, weight_decay = 5e-4 }}
optimizers.adamw = {{ lr = 3e-3, weight_decay = 0.05 }}
"""


def tiny_suite(folder: Path, runs: int) -> Path:
    """A tiny suite file of exactly ``runs`` runs: both optimizers when ``runs`` is even, three
    norms when what is left divides by 3, and seeds for the rest (12: 3 x 2 x 2)."""
    optimizers = OPTIMIZERS if runs % 2 == 0 else OPTIMIZERS[:1]
    rest = runs // len(optimizers)
    norms = NORMS if rest % 3 == 0 else NORMS[:1]
    seeds = list(range(rest // len(norms)))
    path = folder / "overhead.toml"
    # A fresh suite name per invocation: its run keys are new on a database used before.
    name = f"overhead-{uuid.uuid4().hex[:8]}"
    path.write_text(
        TINY.format(name=name, norms=_toml(norms), optimizers=_toml(optimizers), seeds=seeds)
    )
    return path


def _toml(names: list[str]) -> str:
    return "[" + ", ".join(f'"{n}"' for n in names) + "]"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class StampedLog(io.TextIOBase):
    """A console's file: writes go to ``path``; the time the plan line was printed is kept, so
    the plan (data check, estimate) and the runs are timed apart."""

    def __init__(self, path: Path) -> None:
        self.file = path.open("w")
        self.plan_at: float | None = None

    def write(self, s: str) -> int:
        if self.plan_at is None and "Plan:" in s:
            self.plan_at = time.perf_counter()
        return self.file.write(s)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class Timed:
    seconds: float
    plan: float | None  # of which the plan: data check and the estimate's calibration
    in_runs: float  # the runs' own wall time (their wall_time_s metrics, summed)
    train_rate: float  # the runs' median training images/s: how loaded the machine was
    outcomes: Counter


def in_process(specs, device, data_dir) -> Timed:
    """(a) Each run in this process, one after another; nothing stored."""
    from normbench import metrics as M
    from runners import classify

    start = time.perf_counter()
    results = [classify.run(s, device=device, data_dir=data_dir) for s in specs]
    seconds = time.perf_counter() - start
    values = [{m.name: m.value for m in r.metrics if not m.corruption} for r in results]
    return Timed(
        seconds,
        None,
        sum(v.get(M.WALL_TIME, 0.0) for v in values),
        statistics.median(v.get(M.TRAIN_THROUGHPUT, math.nan) for v in values),
        Counter(r.status for r in results),
    )


def with_executor(specs, executor, device, data_dir, work: Path, name: str) -> Timed:
    """(b), (c) ``run_suite`` with ``executor`` into a fresh SQLite file (log in ``work``)."""
    from normbench.store import open_store
    from runners.suite import run_suite

    os.environ["NORMBENCH_CHECKPOINT_DIR"] = str(work / f"checkpoints-{name}")
    log = StampedLog(work / f"{name}.log")
    console = Console(file=log, width=160, color_system=None)
    start = time.perf_counter()
    try:
        store = open_store(f"sqlite:///{work / f'{name}.db'}")
        result = run_suite(
            specs, store, executor, device=device, data_dir=data_dir, console=console
        )
        seconds = time.perf_counter() - start
    finally:
        log.close()
        os.environ.pop("NORMBENCH_CHECKPOINT_DIR", None)
    plan = log.plan_at - start if log.plan_at is not None else None
    walls, rates = stored_metrics(store.engine)
    outcomes = Counter(o.status for o in result.outcomes)
    return Timed(seconds, plan, sum(walls), statistics.median(rates or [math.nan]), outcomes)


def stored_metrics(engine) -> tuple[list[float], list[float]]:
    """The stored runs' wall times and training images/s."""
    from normbench import metrics as M

    query = text("SELECT name, value FROM metrics WHERE corruption = '' AND name IN (:w, :t)")
    with engine.connect() as conn:
        rows = conn.execute(query, {"w": M.WALL_TIME, "t": M.TRAIN_THROUGHPUT}).all()
    return [v for n, v in rows if n == M.WALL_TIME], [v for n, v in rows if n != M.WALL_TIME]


def breakdown(a: Timed, b: Timed, n: int) -> str:
    """Where ``b``'s time beyond ``a``'s goes, per run: the plan, the rest outside the runs'
    own wall time (worker start, claim, writes), and the runs themselves (slower or faster, as
    the machine's load changed)."""
    plan = (b.plan or 0.0) / n
    outside = (b.seconds - (b.plan or 0.0) - b.in_runs - (a.seconds - a.in_runs)) / n
    return (
        f"the plan {plan:.2f} s, outside the runs {outside:.2f} s, in the runs "
        f"{(b.in_runs - a.in_runs) / n:+.2f} s"
    )


def cpu_run_seconds(device) -> float:
    """One cpu-budget cifar10 run (batchnorm + sgd) as the plan estimates it on this machine:
    the fastest of three calibrations (the least disturbed by other work on the machine)."""
    from normbench import estimate
    from normbench.suites import load_suite, plan

    spec = plan(load_suite("cifar10"), "cpu", norms=["batchnorm"], optimizers=["sgd"], seeds=[0])[0]
    return min(
        estimate.run_breakdown(
            spec, estimate.calibrate(spec, device, (3, 32, 32), 10), 50_000, 10_000
        ).total
        for _ in range(3)
    )


# --- part 2: four orchestrators on one database ---------------------------------------------------


def normbench_command() -> list[str]:
    script = Path(sys.executable).with_name("normbench")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from normbench.cli import main; main()"]


@dataclass
class Concurrent:
    seconds: float
    finished: int
    rows_per_key: Counter
    done_lines: Counter  # "done <label>" lines per label across the outputs
    lost: list[str]
    errors: list[str]
    exit_codes: list[int]
    per_process: list[int]  # runs each process finished


def concurrent(url: str, suite: Path, budget: str, specs, data_dir, work: Path, name: str):
    """Four ``normbench run`` processes started together on one database."""
    from runners.suite import label

    env = {**os.environ, "NORMBENCH_CHECKPOINT_DIR": str(work / f"checkpoints-{name}")}
    cmd = [
        *normbench_command(),
        "run",
        f"--suite={suite}",
        f"--budget={budget}",
        f"--db={url}",
        "--device=cpu",
    ] + ([f"--data-dir={data_dir}"] if data_dir else [])
    logs = [work / f"{name}-{i}.log" for i in range(ORCHESTRATORS)]
    start = time.perf_counter()
    procs = []
    for path in logs:
        with path.open("w") as out:
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - start
    outputs = [p.read_text() for p in logs]

    labels = {label(s): s.key for s in specs}
    done = Counter()
    errors = []
    per_process = []
    for i, output in enumerate(outputs):
        per_process.append(0)
        for line in output.splitlines():
            if line.startswith("done "):
                done[line[5:].split(":", 1)[0]] += 1
                per_process[-1] += 1
            if ERROR_LINE.search(line):
                errors.append(f"process {i + 1}: {line.strip()}")
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT run_key, status FROM runs")).all()
    finally:
        engine.dispose()
    keys = {s.key for s in specs}
    per_key = Counter(k for k, _ in rows if k in keys)
    finished = {k for k, status in rows if k in keys and status == "finished"}
    return Concurrent(
        seconds,
        len(finished),
        per_key,
        Counter({lb: done[lb] for lb in labels}),
        sorted(keys - finished),
        errors,
        codes,
        per_process,
    )


def fresh_postgres(admin_url: str) -> tuple[str, str]:
    """A new database on the server of ``admin_url``: (its URL, its name)."""
    name = f"normbench_overhead_{uuid.uuid4().hex[:8]}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as err:
        raise NormbenchError(
            f"Could not create a database on {make_url(admin_url).render_as_string()}: "
            f"{str(err).splitlines()[0]}. --postgres needs a URL of a user who may create "
            "databases (python tests/pgserver.py start DIR prints one)."
        ) from None
    finally:
        engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False), name


def drop_postgres(admin_url: str, name: str) -> None:
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


# --- report --------------------------------------------------------------------------------------


def fmt_outcomes(counts: Counter | None) -> str:
    return ", ".join(f"{n} {s}" for s, n in sorted((counts or {}).items()))


def report_concurrent(title: str, c: Concurrent, runs: int, local: float) -> None:
    dup_lines = {lb: n for lb, n in c.done_lines.items() if n > 1}
    no_line = [lb for lb, n in c.done_lines.items() if n == 0]
    dup_rows = {k: n for k, n in c.rows_per_key.items() if n > 1}
    print(f"\n{title}")
    print(f"  wall time                  {c.seconds:8.1f} s   ({c.seconds / local:.2f} x (b))")
    print(f"  runs finished (rows)       {c.finished:8d} of {runs}")
    unseen = f" ({len(no_line)} runs without a done line)" if no_line else ""
    print(f"  duplicates: done lines     {len(dup_lines):8d}   {dup_lines or ''}{unseen}")
    print(f"  duplicates: rows per key   {len(dup_rows):8d}   {dup_rows or ''}")
    print(f"  lost runs                  {len(c.lost):8d}   {' '.join(c.lost)}")
    print(f"  lock errors / tracebacks   {len(c.errors):8d}")
    for line in c.errors[:10]:
        print(f"    {line}")
    print(f"  exit statuses              {' '.join(str(code) for code in c.exit_codes)}")
    print(f"  runs each process finished {' '.join(str(n) for n in c.per_process)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("NORMBENCH_DATA_DIR"))
    parser.add_argument(
        "--runs", type=int, default=None, help="runs of the built-in tiny suite (default 12)"
    )
    parser.add_argument("--suite", type=Path, help="another suite file (all its runs)")
    parser.add_argument("--budget", help="the budget of --suite")
    parser.add_argument("--skip-ray", action="store_true", help="leave out (c)")
    parser.add_argument("--skip-concurrent", action="store_true", help="leave out part 2")
    parser.add_argument("--postgres", help="part 2 also on a new database of this server")
    parser.add_argument("--cache-dir", help="dataset cache to use (default: a private one)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and logs")
    args = parser.parse_args()
    if args.suite and (args.runs or not args.budget):
        parser.error("--suite needs --budget, and runs all of its runs (no --runs)")
    runs = args.runs or 12
    if runs < 1:
        parser.error("--runs must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="normbench-overhead-"))
    cache = Path(args.cache_dir) if args.cache_dir else work / "cache"
    os.environ["NORMBENCH_CACHE_DIR"] = str(cache)
    try:
        return bench(args, runs, work, cache)
    except NormbenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"\nwork folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, runs: int, work: Path, cache: Path) -> int:
    from normbench.runtime import autocast_dtype
    from normbench.suites import load_suite, plan
    from runners.executor import LocalExecutor
    from runners.suite import check_data

    device = torch.device("cpu")
    suite_path = args.suite or tiny_suite(work, runs)
    budget = args.budget or "smoke"
    suite = load_suite(str(suite_path))
    specs = plan(suite, budget)
    dtype = autocast_dtype(suite.budget(budget).precision, device)
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; precision "
        f"{'bf16' if dtype is torch.bfloat16 else 'fp32'}"
    )
    print(
        f"Suite: {suite.name} at budget {budget}, {len(specs)} runs "
        f"({'built-in tiny suite' if not args.suite else suite_path})"
    )
    start = time.perf_counter()
    check_data(specs, args.data_dir)
    print(
        f"Data: loaded into the cache {cache} in {time.perf_counter() - start:.1f} s "
        "(a first decode of CIFAR-10 takes about 20 s; not counted below)"
    )
    sys.stdout.flush()

    n = len(specs)
    a = in_process(specs, device, args.data_dir)
    print(f"(a) in-process loop done: {a.seconds:.1f} s", flush=True)
    b = with_executor(specs, LocalExecutor(), device, args.data_dir, work, "local")
    print(f"(b) run_suite + LocalExecutor done: {b.seconds:.1f} s", flush=True)
    c, ray_start, ray_stop, ray_note = None, None, None, ""
    if args.skip_ray:
        ray_note = "skipped (--skip-ray)"
    else:
        try:
            import ray  # noqa: F401
        except ImportError:
            ray_note = "ray: not installed"
        else:
            from runners.ray_executor import RayExecutor

            t = time.perf_counter()
            try:
                executor = RayExecutor(None)
            except Exception as err:  # noqa: BLE001 - reported in the table, the rest goes on
                ray_note = f"ray: the local cluster did not start ({str(err).splitlines()[0]})"
            else:
                ray_start = time.perf_counter() - t
                try:
                    c = with_executor(specs, executor, device, args.data_dir, work, "ray")
                finally:
                    t = time.perf_counter()
                    executor.close()
                    ray_stop = time.perf_counter() - t
                print(f"(c) run_suite + RayExecutor done: {c.seconds:.1f} s", flush=True)
    cpu_run = cpu_run_seconds(device)

    print(f"\n1. One {n}-run suite, one run at a time")
    print(
        f"  {'':36} {'wall s':>7} {'x (a)':>6} {'plan s':>7} {'in runs s':>9} "
        f"{'outside runs':>13} {'train img/s':>11}  outcomes"
    )
    rows = [("(a) in-process loop, nothing stored", a), ("(b) run_suite + LocalExecutor", b)]
    if c is not None:
        rows.append(("(c) run_suite + RayExecutor", c))
    for name, t in rows:
        outside = (t.seconds - (t.plan or 0.0) - t.in_runs) / n
        plan = f"{t.plan:7.1f}" if t.plan is not None else f"{'-':>7}"
        print(
            f"  {name:36} {t.seconds:7.1f} {t.seconds / a.seconds:6.2f} {plan} "
            f"{t.in_runs:9.1f} {outside:9.2f} s/run {t.train_rate:11.0f}  "
            f"{fmt_outcomes(t.outcomes)}"
        )
    print(
        "  plan: data check and the estimate's calibration; in runs: the runs' own wall time "
        "(wall_time_s);\n  outside runs: the rest per run (worker start, claim, writes); "
        "train img/s: the runs' median (machine load)"
    )
    if c is None:
        print(f"  (c) {ray_note}")
    else:
        print(f"  Ray cluster start {ray_start:.1f} s, shutdown {ray_stop:.1f} s (not in (c))")
    overhead = (b.seconds - a.seconds) / n
    print(f"  overhead per run, (b - a) / {n}: {overhead:.2f} s; {breakdown(a, b, n)}")
    if c is not None:
        print(
            f"  overhead per run, (c - a) / {n}: {(c.seconds - a.seconds) / n:.2f} s; "
            f"{breakdown(a, c, n)}"
        )
    print(
        f"  one cpu-budget cifar10 run (batchnorm + sgd, 10 epochs of 50,000 images) as "
        f"normbench.estimate calibrates it here (fastest of 3 calibrations): "
        f"{cpu_run / 60:.1f} min;\n  (b - a) / {n} is {overhead / cpu_run:.2%} of it"
    )
    sys.stdout.flush()

    if args.skip_concurrent:
        return 0
    sqlite = concurrent(
        f"sqlite:///{work / 'concurrent.db'}",
        suite_path,
        budget,
        specs,
        args.data_dir,
        work,
        "sqlite",
    )
    report_concurrent(
        f"2. {ORCHESTRATORS} normbench run processes started together on one SQLite database",
        sqlite,
        n,
        b.seconds,
    )
    results = [sqlite]
    if args.postgres:
        url, name = fresh_postgres(args.postgres)
        try:
            pg = concurrent(url, suite_path, budget, specs, args.data_dir, work, "postgres")
        finally:
            drop_postgres(args.postgres, name)
        report_concurrent(
            f"2. {ORCHESTRATORS} normbench run processes started together on one "
            "PostgreSQL database",
            pg,
            n,
            b.seconds,
        )
        results.append(pg)
    bad = any(
        r.lost
        or r.errors
        or any(v > 1 for v in r.done_lines.values())
        or any(v > 1 for v in r.rows_per_key.values())
        or any(r.exit_codes)
        for r in results
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
