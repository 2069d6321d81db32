"""The results store: Alembic-managed schema, SQLite settings, and run life-cycle writes."""

import sqlite3

import pytest
from sqlalchemy import inspect, text
from typer.testing import CliRunner

from normbench.cli import app
from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.store import RunStatus, open_store, schema_revisions


def test_first_use_creates_schema_through_alembic(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    tables = set(inspect(store.engine).get_table_names())
    assert {"runs", "metrics", "curve_points", "alembic_version"} <= tables
    current, head = schema_revisions(store.engine)
    assert current == head is not None
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_db_upgrade_command_is_idempotent(tmp_path):
    db = str(tmp_path / "r.db")
    for _ in range(2):
        result = CliRunner().invoke(app, ["db", "upgrade", "--db", db])
        assert result.exit_code == 0, result.output
        assert "schema revision 0001" in result.output


def test_database_from_a_newer_normbench_is_refused(tmp_path):
    path = tmp_path / "r.db"
    open_store(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffff'")
    with pytest.raises(NormbenchError, match="newer normbench"):
        open_store(f"sqlite:///{path}")


SPEC = {
    "suite": "s",
    "budget": "smoke",
    "protocol_version": 1,
    "task": "classify",
    "dataset": "cifar10",
    "norm": "batchnorm",
    "optimizer": "sgd",
    "seed": 0,
    "settings": {"model": "fastnet"},
}


def test_run_life_cycle_and_metric_rows(tmp_path):
    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    store.begin_run(SPEC, "k1", device="cpu", provenance={"torch": "x"}, config=SPEC, reset=True)
    assert store.get_run("k1").status is RunStatus.running
    rows = [MetricRow("accuracy", 0.5, "test"), MetricRow("accuracy", 0.25, "test", "fog", 3)]
    store.finish_run(
        "k1",
        status=RunStatus.finished,
        metrics=rows,
        curves=[(1, "train_loss", 2.0)],
        epochs_done=1,
        provenance_update={"precision": "fp32"},
    )
    run = store.get_run("k1")
    assert run.status is RunStatus.finished and run.provenance == {
        "torch": "x",
        "precision": "fp32",
    }
    with store.engine.connect() as conn:
        got = conn.execute(
            text("SELECT name, split, corruption, severity, value FROM metrics ORDER BY value")
        ).all()
    assert got == [("accuracy", "test", "fog", 3, 0.25), ("accuracy", "test", "", 0, 0.5)]
    # Re-opening with reset drops the old results; the run key stays unique.
    store.begin_run(SPEC, "k1", device="cpu", provenance={}, config=SPEC, reset=True)
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM metrics")).scalar() == 0
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar() == 1


@pytest.mark.parametrize("url", ["nosuchdb://x", "postgresql+nosuchdriver://u@h/db"])
def test_unusable_database_url_is_a_clear_error(url):
    result = CliRunner().invoke(app, ["db", "upgrade", "--db", url])
    assert result.exit_code == 2 and "Cannot use the database URL" in result.output
    assert "Traceback" not in result.output
