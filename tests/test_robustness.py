"""mCE and relative mCE against a suite's reference pair, from metric rows in a real results
database (``Store.update_mce``, as the suite runner calls it after every run), on SQLite and
PostgreSQL."""

import pytest
from sqlalchemy import select

from normbench.corruptions import BENCHMARK, FAMILIES, SEVERITIES
from normbench.metrics import MetricRow
from normbench.robustness import MCE, RELATIVE_MCE
from normbench.store import Metric, Run, RunStatus, open_store

REFERENCE = ("batchnorm", "sgd")
CLEAN_ERROR = 0.1


def reference_error(corruption: str, severity: int) -> float:
    """Errors that differ between corruptions and grow with severity, as real ones do."""
    return 0.15 + 0.1 * severity + 0.01 * BENCHMARK.index(corruption)


def record(store, norm: str, error_factor, *, optimizer: str = "sgd", clean=CLEAN_ERROR) -> None:
    """A finished run whose corruption errors are the reference's times ``error_factor(c)``."""
    spec = {"suite": "s", "budget": "smoke", "protocol_version": 1, "task": "classify",
            "dataset": "cifar10", "norm": norm, "optimizer": optimizer, "seed": 0,
            "settings": {"model": "fastnet"}}  # fmt: skip
    key = f"{norm}+{optimizer}"
    store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
    rows = [MetricRow("accuracy", 1 - clean, "test")] + [
        MetricRow("accuracy", 1 - error_factor(c) * reference_error(c, s), "test", c, s)
        for c in BENCHMARK
        for s in SEVERITIES
    ]
    store.finish_run(key, status=RunStatus.finished, metrics=rows, curves=[], epochs_done=1)


def test_mce_is_above_100_for_a_pair_worse_than_the_reference_and_below_for_a_better_one(
    db_url,
):
    store = open_store(db_url)
    noise = set(FAMILIES["noise"])
    # Recorded before the reference, so a reference picked by position would be the wrong run.
    record(store, "layernorm", lambda c: 1.5)
    record(store, "groupnorm", lambda c: 0.5)
    record(store, "batchnorm", lambda c: 3.0, optimizer="adamw")  # the norm, not the pair
    record(store, "instancenorm", lambda c: 2.0 if c in noise else 1.0)
    record(store, "batchnorm", lambda c: 1.0)  # the reference pair
    assert store.update_mce("s", "smoke", REFERENCE, protocol_version=1) == 5

    with store.session() as s:
        rows = s.execute(
            select(Run.norm, Run.optimizer, Metric.name, Metric.value).join(Metric)
            .where(Metric.name.in_((MCE, RELATIVE_MCE)))
        ).all()  # fmt: skip
    values = {(norm, opt, name): value for norm, opt, name, value in rows}
    mce = {(norm, opt): v for (norm, opt, name), v in values.items() if name == MCE}
    assert mce[REFERENCE] == pytest.approx(100)
    assert mce["layernorm", "sgd"] == pytest.approx(150)
    assert mce["groupnorm", "sgd"] == pytest.approx(50)
    assert mce["batchnorm", "adamw"] == pytest.approx(300)
    # mCE is a mean over corruptions: twice the errors on the 3 noise corruptions of 15
    assert mce["instancenorm", "sgd"] == pytest.approx(100 * (3 * 2 + 12) / 15)
    # relative mCE: the same clean error and more corruption error is worse than the reference
    assert values["layernorm", "sgd", RELATIVE_MCE] > 100 > values["groupnorm", "sgd", RELATIVE_MCE]
    store.engine.dispose()


def mce_rows(store) -> list[tuple]:
    with store.session() as s:
        return s.execute(
            select(Metric.id, Run.norm, Metric.name, Metric.value)
            .join(Run)
            .where(Metric.name.in_((MCE, RELATIVE_MCE)))
            .order_by(Metric.id)
        ).all()


def test_mce_rows_are_updated_in_place_and_dropped_for_runs_that_no_longer_get_one(db_url):
    """Repeating the update changes nothing (not even the rows' ids: they are upserted, never
    deleted and inserted again); a run without every corruption result gets none; normalised by
    AlexNet, the relative mCE rows go and the mCE rows are updated in place; without a finished
    reference no run keeps any."""
    store = open_store(db_url)
    record(store, "batchnorm", lambda c: 1.0)
    record(store, "layernorm", lambda c: 1.5)
    record(store, "groupnorm", lambda c: 0.5)
    assert store.update_mce("s", "smoke", REFERENCE, protocol_version=1) == 3
    first = mce_rows(store)
    assert len(first) == 6
    assert store.update_mce("s", "smoke", REFERENCE, protocol_version=1) == 3
    assert mce_rows(store) == first

    # groupnorm is run again and loses a corruption result.
    spec = {"suite": "s", "budget": "smoke", "protocol_version": 1, "task": "classify",
            "dataset": "cifar10", "norm": "groupnorm", "optimizer": "sgd", "seed": 0,
            "settings": {"model": "fastnet"}}  # fmt: skip
    store.begin_run(spec, "groupnorm+sgd", device="cpu", provenance={}, config=spec, reset=False)
    rows = [MetricRow("accuracy", 0.9, "test")] + [
        MetricRow("accuracy", 0.5, "test", c, s) for c in BENCHMARK[1:] for s in SEVERITIES
    ]
    store.finish_run("groupnorm+sgd", status=RunStatus.finished, metrics=rows, curves=[],
                     epochs_done=1)  # fmt: skip
    assert store.update_mce("s", "smoke", REFERENCE, protocol_version=1) == 2
    assert mce_rows(store) == [row for row in first if row.norm != "groupnorm"]

    kept = [row for row in first if row.norm != "groupnorm"]
    assert store.update_mce("s", "smoke", REFERENCE, alexnet=True, protocol_version=1) == 2
    alexnet = mce_rows(store)
    assert [(r.id, r.name) for r in alexnet] == [(r.id, r.name) for r in kept if r.name == MCE]
    assert [r.value for r in alexnet] != [r.value for r in kept if r.name == MCE]

    assert store.mark("batchnorm+sgd", RunStatus.failed, "gone")
    assert store.update_mce("s", "smoke", REFERENCE, protocol_version=1) == 0
    assert mce_rows(store) == []
    store.engine.dispose()
