"""Dashboard query time on a large results database: 10,000 runs and about a million metric rows.

Writes (once, or again with ``--rebuild``) an SQLite database through normbench's own schema
(Alembic migrations) holding 10,000 finished cifar-c runs in one suite and budget, the worst case
for the leaderboard: 25 norms x 4 optimizers x 100 seeds, each with the summary metrics, the four
family means and the 15 x 5 per-(corruption, severity) accuracies plus their 15 means (104 rows
per run). Then it times the data the leaderboard page loads (the filter choices, whether there
are corruption results, and the ranked leaderboard, all aggregated in SQL) through the dashboard's
read-only engine, against a reference that loads the selection's metric rows into pandas and
aggregates there. The robustness page's per-(corruption, severity) table is timed too.

    python bench/dashboard_query.py [--db /tmp/normbench-bench.db] [--rebuild] [--repeat 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import pandas as pd
from sqlalchemy import insert, select

from dashboard import data as D
from normbench import metrics as M
from normbench.corruptions import BENCHMARK, FAMILIES, SEVERITIES
from normbench.leaderboard import Selection
from normbench.robustness import CORRUPTION_ACCURACY, FAMILY_ACCURACY, MCE, RELATIVE_MCE
from normbench.store import open_store
from normbench.store.models import Metric, Run, RunStatus

SUITE, BUDGET = "cifar-c", "cpu"
NORMS = ["batchnorm", *(f"norm{i:02d}" for i in range(24))]
OPTIMIZERS = ["sgd", "adamw", "lamb", "sam"]
SEEDS = range(100)


def build(path: Path) -> None:
    path.unlink(missing_ok=True)
    store = open_store(f"sqlite:///{path}")
    rng = random.Random(0)
    runs, metrics = [], []
    run_id = 0
    for norm in NORMS:
        skill = rng.uniform(0.6, 0.9)
        for optimizer in OPTIMIZERS:
            for seed in SEEDS:
                run_id += 1
                runs.append(
                    dict(
                        id=run_id, run_key=f"{run_id:020d}", suite=SUITE, budget=BUDGET,
                        protocol_version=1, task="classify", dataset="cifar10", model="fastnet",
                        norm=norm, optimizer=optimizer, seed=seed, status=RunStatus.finished,
                        epochs_done=10, device="cpu", config={}, provenance={},
                    )
                )  # fmt: skip
                clean = skill + rng.gauss(0, 0.01)

                def row(name, value, corruption="", severity=0, run_id=run_id):
                    return dict(run_id=run_id, name=name, split="test", corruption=corruption,
                                severity=severity, value=value)  # fmt: skip

                per = {
                    (c, s): clean * (1 - 0.08 * s * rng.random())
                    for c in BENCHMARK
                    for s in SEVERITIES
                }
                metrics += [row(M.ACCURACY, v, c, s) for (c, s), v in per.items()]
                means = {c: sum(per[c, s] for s in SEVERITIES) / 5 for c in BENCHMARK}
                metrics += [row(M.ACCURACY, v, c) for c, v in means.items()]
                metrics += [
                    row(FAMILY_ACCURACY, sum(means[c] for c in names) / len(names), family)
                    for family, names in FAMILIES.items()
                ]
                metrics += [
                    row(M.ACCURACY, clean),
                    row(M.LOSS, 1 - clean),
                    row(M.ECE, rng.uniform(0.01, 0.2)),
                    row(M.TRAIN_THROUGHPUT, rng.uniform(500, 2000)),
                    row(M.WALL_TIME, rng.uniform(200, 800)),
                    row(M.PARAM_COUNT, 1_170_000 + 1000 * NORMS.index(norm)),
                    row(CORRUPTION_ACCURACY, sum(per.values()) / len(per)),
                    row(MCE, rng.uniform(80, 120)),
                    row(RELATIVE_MCE, rng.uniform(80, 120)),
                    row(M.EVAL_THROUGHPUT, rng.uniform(2000, 8000)),
                ]
    with store.engine.begin() as conn:
        conn.execute(insert(Run), runs)
        for lo in range(0, len(metrics), 100_000):
            conn.execute(insert(Metric), metrics[lo : lo + 100_000])
    store.engine.dispose()


def page_data(engine, sel: Selection) -> tuple:
    """What the leaderboard page loads: filter choices, whether there are corruption results,
    and the ranked leaderboard."""
    return (
        D.choices(engine),
        D.has_corruption_results(engine, sel),
        D.leaderboard_view(engine, sel, "mean corruption accuracy"),
    )


def reference(engine, sel: Selection) -> pd.DataFrame:
    """Every metric row of the selection loaded into pandas and aggregated there."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(Run.norm, Run.optimizer, Metric.name, Metric.corruption)
            .add_columns(Metric.severity, Metric.value)
            .join(Metric, Metric.run_id == Run.id)
            .where(*sel.finished_runs())
        ).all()
    df = pd.DataFrame(rows, columns=["norm", "optimizer", "name", "corruption", "severity", "v"])
    return df.groupby(["norm", "optimizer", "name", "corruption", "severity"]).v.agg(
        ["mean", "std", "count"]
    )


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="/tmp/normbench-dashboard-bench.db")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    path = Path(args.db)
    if args.rebuild or not path.exists():
        start = time.perf_counter()
        build(path)
        print(f"built {path} in {time.perf_counter() - start:.1f} s")
    engine = D.readonly_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        n_runs = conn.execute(select(Run.id).order_by(Run.id.desc()).limit(1)).scalar()
        n_metrics = conn.execute(select(Metric.id).order_by(Metric.id.desc()).limit(1)).scalar()
    print(f"{n_runs:,} runs, {n_metrics:,} metric rows")
    sel = Selection(SUITE, BUDGET)
    choices, robust, board = page_data(engine, sel)  # warm: SQLite page cache
    assert robust and len(board) == len(NORMS) * len(OPTIMIZERS)
    assert board.n.eq(len(SEEDS)).all()
    ours = timed(lambda: page_data(engine, sel), args.repeat)
    ref = timed(lambda: reference(engine, sel), max(1, args.repeat // 2))
    robustness = timed(lambda: D.corruption_accuracy(engine, sel), args.repeat)
    print(f"leaderboard page data (SQL aggregates): {ours:.3f} s (median of {args.repeat})")
    print(f"reference (all rows into pandas, aggregated there): {ref:.3f} s")
    print(f"robustness page data (per corruption and severity): {robustness:.3f} s")
    print(f"ratio reference / normbench: {ref / ours:.1f}x; target < 1 s: "
          f"{'met' if ours < 1 else 'NOT met'}")  # fmt: skip


if __name__ == "__main__":
    main()
