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
        assert "schema revision 0003" in result.output


def test_a_database_at_the_first_revision_is_upgraded_keeping_its_rows(tmp_path):
    from alembic import command

    from dashboard.data import DatabaseState, database_state
    from normbench.store import alembic_config, create_db_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_db_engine(url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text(
            "INSERT INTO runs (id, run_key, suite, budget, protocol_version, task, dataset, model,"
            " norm, optimizer, seed, status, epochs_done, config, provenance, created_at,"
            " updated_at) VALUES (1, 'k', 's', 'smoke', 1, 'classify', 'cifar10', 'fastnet',"
            " 'batchnorm', 'sgd', 0, 'finished', 1, '{}', '{}', '2026-01-01', '2026-01-01')"
        ))  # fmt: skip
        conn.execute(text("INSERT INTO metrics (run_id, name, split, corruption, severity, value)"
                          " VALUES (1, 'accuracy', 'test', '', 0, 0.5)"))  # fmt: skip
    engine.dispose()
    before = (tmp_path / "old.db").read_bytes()
    state, message = database_state(url)
    assert state is DatabaseState.outdated and "normbench db upgrade --db" in message
    with pytest.raises(NormbenchError, match="at schema revision '0001'"):
        open_store(url, readonly=True)  # reading never migrates
    assert (tmp_path / "old.db").read_bytes() == before

    store = open_store(url)
    assert schema_revisions(store.engine)[0] == "0003"
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("metrics")}
    assert "ix_metrics_values" in indexes and "ix_metrics_lookup" not in indexes
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM metrics")).scalar() == 0.5


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


def test_mce_is_normalised_only_by_reference_runs_of_the_same_protocol_version(tmp_path):
    """The reference pair measured under protocol version 1 must not enter the mCE of runs made
    under version 2, and version 1's own mCE rows are left as they were."""
    from normbench.corruptions import BENCHMARK, SEVERITIES
    from normbench.robustness import MCE, update_mce

    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")

    def finished(key: str, version: int, norm: str, accuracy: float) -> None:
        spec = {**SPEC, "suite": "c", "protocol_version": version, "norm": norm}
        store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
        rows = [MetricRow("accuracy", accuracy + 0.1, "test")] + [  # clean, then corrupted
            MetricRow("accuracy", accuracy, "test", c, s) for c in BENCHMARK for s in SEVERITIES
        ]
        store.finish_run(key, status=RunStatus.finished, metrics=rows, curves=[], epochs_done=1)

    finished("ref-v1", 1, "batchnorm", 0.5)
    assert update_mce(store.engine, "c", "smoke", ("batchnorm", "sgd"), protocol_version=1) == 1
    finished("ref-v2", 2, "batchnorm", 0.8)  # error 0.2
    finished("ln-v2", 2, "layernorm", 0.6)  # error 0.4: twice the reference's
    assert update_mce(store.engine, "c", "smoke", ("batchnorm", "sgd"), protocol_version=2) == 2
    with store.engine.connect() as conn:
        mce = dict(conn.execute(
            text("SELECT r.run_key, m.value FROM metrics m JOIN runs r ON r.id = m.run_id "
                 "WHERE m.name = :name"), {"name": MCE},
        ).all())  # fmt: skip
    # Mixed with version 1's reference (error 0.5) it would be 100 * 0.4 / 0.35 = 114.3.
    assert mce["ln-v2"] == pytest.approx(200.0)
    assert mce["ref-v1"] == pytest.approx(100.0) and mce["ref-v2"] == pytest.approx(100.0)
