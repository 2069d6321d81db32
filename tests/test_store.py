"""The results store: Alembic-managed schema, SQLite settings, and run life-cycle writes, on real
SQLite files and a real PostgreSQL server (the ``db_url`` fixture runs a test on both)."""

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, inspect, text
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from normbench.cli import app
from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.store import (
    Base,
    Claim,
    RunStatus,
    alembic_config,
    create_db_engine,
    open_store,
    schema_revisions,
)

HEAD = ScriptDirectory.from_config(alembic_config()).get_current_head()


def schema_differences(engine: Engine) -> list[str]:
    """Where the database's tables differ from the models: Alembic's comparison (tables,
    columns, types, indexes, constraints), and column by column the names, string lengths and
    nullability as reflected."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        found = [repr(d) for d in compare_metadata(context, Base.metadata)]
    reflect = inspect(engine)
    tables = set(reflect.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            found.append(f"{table.name}: no such table")
            continue
        columns = {c["name"]: c for c in reflect.get_columns(table.name)}
        if set(columns) != set(table.c.keys()):
            found.append(f"{table.name}: columns {sorted(columns)} != {sorted(table.c.keys())}")
        for column in table.c:
            got = columns.get(column.name)
            if got is None:
                continue
            length = getattr(column.type, "length", None)
            if getattr(got["type"], "length", None) != length:
                found.append(f"{table.name}.{column.name}: {got['type']!r}, model length {length}")
            if got["nullable"] != column.nullable:
                found.append(f"{table.name}.{column.name}: nullable {got['nullable']}")
    return found


def test_first_use_creates_schema_through_alembic(db_url):
    store = open_store(db_url)
    tables = set(inspect(store.engine).get_table_names())
    assert {"runs", "metrics", "curve_points", "alembic_version"} <= tables
    current, head = schema_revisions(store.engine)
    assert current == head == HEAD
    if store.engine.dialect.name == "sqlite":
        with store.engine.connect() as conn:
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    store.engine.dispose()


def test_the_migrated_schema_is_the_models(db_url):
    """Every column the models declare, with its type, length and nullability, is what the
    migrations create; a database one revision behind shows the differences."""
    engine = create_db_engine(db_url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    behind = "\n".join(schema_differences(engine))
    assert "runs.norm" in behind and "owner" in behind and "norm_speed.norm" in behind
    engine.dispose()
    store = open_store(db_url)  # upgrades to the head revision
    assert schema_differences(store.engine) == []
    store.engine.dispose()


def test_db_upgrade_command_is_idempotent(db_url):
    for _ in range(2):
        result = CliRunner().invoke(app, ["db", "upgrade", "--db", db_url])
        assert result.exit_code == 0, result.output
        assert f"schema revision {HEAD}" in result.output


def test_a_database_at_the_first_revision_is_upgraded_keeping_its_rows(tmp_path):
    from dashboard.data import DatabaseState, database_state

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
    assert schema_revisions(store.engine)[0] == HEAD
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("metrics")}
    assert "ix_metrics_values" in indexes and "ix_metrics_lookup" not in indexes
    with store.engine.connect() as conn:
        # Recreating the runs table must not cascade-delete the metrics that point at it.
        assert conn.execute(text("SELECT value FROM metrics")).scalar() == 0.5
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
    run = store.get_run("k")
    # The heartbeat of an old row is its last write (2026-01-01 00:00 UTC).
    assert run.owner is None and run.heartbeat == pytest.approx(1767225600.0)
    assert schema_differences(store.engine) == []


def test_database_from_a_newer_normbench_is_refused(db_url):
    open_store(db_url).engine.dispose()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    engine.dispose()
    with pytest.raises(NormbenchError, match="newer normbench"):
        open_store(db_url)


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


def claim(store, key: str, spec=SPEC, *, owner: str = "me", reset: bool = True, **kwargs):
    return store.claim_run(
        spec, key, owner=owner, lease_seconds=60, device="cpu", provenance={"torch": "x"},
        config=spec, reset=reset, **kwargs,
    )  # fmt: skip


def counts(store) -> tuple[int, int, int]:
    with store.engine.connect() as conn:
        return tuple(
            conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
            for table in ("runs", "metrics", "curve_points")
        )


def test_run_life_cycle_and_metric_rows(db_url):
    store = open_store(db_url)
    got = claim(store, "k1")
    assert isinstance(got, Claim) and got.previous is None
    run = store.get_run("k1")
    assert run.status is RunStatus.running and run.owner == "me"
    assert run.heartbeat == pytest.approx(store.db_now(), abs=60)
    assert store.record_epoch("k1", 1, owner="me") and store.get_run("k1").epochs_done == 1
    rows = [MetricRow("accuracy", 0.5, "test"), MetricRow("accuracy", 0.25, "test", "fog", 3),
            MetricRow("accuracy", float("nan"), "test", "snow", 1)]  # fmt: skip
    store.finish_run(
        "k1",
        owner="me",
        status=RunStatus.finished,
        metrics=rows,
        curves=[(1, "train_loss", 2.0), (2, "train_loss", float("inf"))],
        epochs_done=1,
        provenance_update={"precision": "fp32"},
    )
    run = store.get_run("k1")
    assert run.status is RunStatus.finished and run.provenance == {
        "torch": "x",
        "precision": "fp32",
    }
    assert run.finished_at is not None and run.owner == "me"
    with store.engine.connect() as conn:
        got = conn.execute(
            text("SELECT name, split, corruption, severity, value FROM metrics ORDER BY value")
        ).all()
    # Values that are not numbers are left out.
    assert got == [("accuracy", "test", "fog", 3, 0.25), ("accuracy", "test", "", 0, 0.5)]
    assert counts(store) == (1, 2, 1)
    # Re-claiming a finished run with reset drops the old results; the run key stays unique.
    again = claim(store, "k1", rerun_finished_before=store.db_now() + 1)
    assert again.previous is RunStatus.finished and again.epochs_done == 1
    assert counts(store) == (1, 0, 0) and store.get_run("k1").finished_at is None
    store.engine.dispose()


def test_begin_run_reopens_a_run_whatever_its_state(db_url):
    """``begin_run`` (one process on its own database) re-opens a run of any status and owner,
    and the writes that name no owner are its own."""
    store = open_store(db_url)
    claim(store, "k1", owner="elsewhere")
    run_id = store.begin_run(SPEC, "k1", device="cpu", provenance={}, config=SPEC, reset=False)
    assert store.get_run("k1").id == run_id and store.get_run("k1").owner == "local"
    store.finish_run("k1", status=RunStatus.finished, metrics=[], curves=[], epochs_done=3)
    assert store.begin_run(SPEC, "k1", device="cpu", provenance={}, config=SPEC, reset=True) == (
        run_id
    )
    assert store.get_run("k1").status is RunStatus.running
    assert store.mark("k1", RunStatus.interrupted, "stopped")
    run = store.get_run("k1")
    assert (run.status, run.error, run.epochs_done) == (RunStatus.interrupted, "stopped", 0)
    store.engine.dispose()


def test_text_longer_than_its_column_is_refused_before_anything_is_written(db_url):
    store = open_store(db_url)
    long_norm = "groupnorm(" + ",".join(f"o{i}=1" for i in range(60)) + ")"
    with pytest.raises(NormbenchError, match=r"norm 'groupnorm\(o0=1.*at most 256"):
        claim(store, "k1", {**SPEC, "norm": long_norm})
    with pytest.raises(NormbenchError, match="class_name .* at most 128"):
        store.add_submission(base_name="n", class_name="C" * 129, file_name="n.py", source="",
                             source_sha256="0" * 64, contract={})  # fmt: skip
    with pytest.raises(NormbenchError, match="norm speed's norm"):
        store.add_norm_speeds([{"norm": long_norm, "model": "m", "batch_size": 1, "device": "cpu",
                                "images_per_s": 1.0, "ratio_to_batchnorm": 1.0, "param_count": 1,
                                "provenance": {}}])  # fmt: skip
    assert counts(store) == (0, 0, 0)
    store.engine.dispose()


def test_submissions_are_versioned_by_source(db_url):
    store = open_store(db_url)
    fields = {"class_name": "MyNorm", "file_name": "my_norm.py", "contract": {"passed": True}}
    first = store.add_submission(base_name="mine", source="a", source_sha256="a" * 64, **fields)
    same = store.add_submission(base_name="mine", source="a", source_sha256="a" * 64, **fields)
    changed = store.add_submission(base_name="mine", source="b", source_sha256="b" * 64, **fields)
    other = store.add_submission(base_name="yours", source="a", source_sha256="a" * 64, **fields)
    assert first == ("submission/mine/v1", True) and same == ("submission/mine/v1", False)
    assert changed == ("submission/mine/v2", True) and other == ("submission/yours/v1", True)
    got = store.submissions(["submission/mine/v2", "submission/nope/v1", "submission/mine/v1"])
    assert [(s.name, s.version, s.source) for s in got] == [
        ("submission/mine/v1", 1, "a"),
        ("submission/mine/v2", 2, "b"),
    ]
    assert got[0].contract == {"passed": True}  # loaded: readable without the session
    assert store.submissions([]) == []
    store.engine.dispose()


def test_norm_speeds_are_stored_in_one_go(db_url):
    from sqlalchemy import select

    from normbench.store import NormSpeed

    store = open_store(db_url)
    rows = [
        {"norm": n, "model": "resnet20", "batch_size": 64, "device": "cpu", "images_per_s": ips,
         "ratio_to_batchnorm": ratio, "peak_memory_mb": None, "param_count": 10,
         "provenance": {"pairs": 3}}
        for n, ips, ratio in (("batchnorm", 100.0, 1.0), ("layernorm", 50.0, 0.5))
    ]  # fmt: skip
    store.add_norm_speeds(rows)
    store.add_norm_speeds([])
    with store.session() as s:
        got = s.execute(
            select(NormSpeed.norm, NormSpeed.ratio_to_batchnorm).order_by(NormSpeed.norm)
        )
        assert got.all() == [("batchnorm", 1.0), ("layernorm", 0.5)]
    store.engine.dispose()


@pytest.mark.parametrize("url", ["nosuchdb://x", "postgresql+nosuchdriver://u@h/db"])
def test_unusable_database_url_is_a_clear_error(url):
    result = CliRunner().invoke(app, ["db", "upgrade", "--db", url])
    assert result.exit_code == 2 and "Cannot use the database URL" in result.output
    assert "Traceback" not in result.output


def test_unreachable_database_server_is_named_with_what_to_check():
    import socket

    with socket.socket() as s:  # a port nothing listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        url = f"postgresql+psycopg://someone@127.0.0.1:{port}/results"
        for readonly in (False, True):
            with pytest.raises(NormbenchError) as err:
                open_store(url, readonly=readonly)
            message = str(err.value)
            assert f"'results' on 127.0.0.1:{port}" in message and "server is running" in message
        result = CliRunner().invoke(app, ["db", "upgrade", "--db", url])
    assert result.exit_code == 2 and f"127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output


def test_missing_postgresql_database_is_named_and_not_created(postgres_server):
    url = make_url(postgres_server).set(database="normbench_no_such_db")
    with pytest.raises(NormbenchError, match="'normbench_no_such_db' on 127.0.0.1.*createdb"):
        open_store(url.render_as_string(hide_password=False))
    admin = create_engine(postgres_server)
    with admin.connect() as conn:
        names = conn.execute(text("SELECT datname FROM pg_database")).scalars().all()
    admin.dispose()
    assert "normbench_no_such_db" not in names


def test_mce_is_normalised_only_by_reference_runs_of_the_same_protocol_version(db_url):
    """The reference pair measured under protocol version 1 must not enter the mCE of runs made
    under version 2, and version 1's own mCE rows are left as they were."""
    from normbench.corruptions import BENCHMARK, SEVERITIES
    from normbench.robustness import MCE

    store = open_store(db_url)

    def finished(key: str, version: int, norm: str, accuracy: float) -> None:
        spec = {**SPEC, "suite": "c", "protocol_version": version, "norm": norm}
        claim(store, key, spec)
        rows = [MetricRow("accuracy", accuracy + 0.1, "test")] + [  # clean, then corrupted
            MetricRow("accuracy", accuracy, "test", c, s) for c in BENCHMARK for s in SEVERITIES
        ]
        store.finish_run(key, owner="me", status=RunStatus.finished, metrics=rows, curves=[],
                         epochs_done=1)  # fmt: skip

    finished("ref-v1", 1, "batchnorm", 0.5)
    assert store.update_mce("c", "smoke", ("batchnorm", "sgd"), protocol_version=1) == 1
    finished("ref-v2", 2, "batchnorm", 0.8)  # error 0.2
    finished("ln-v2", 2, "layernorm", 0.6)  # error 0.4: twice the reference's
    assert store.update_mce("c", "smoke", ("batchnorm", "sgd"), protocol_version=2) == 2
    with store.engine.connect() as conn:
        mce = dict(conn.execute(
            text("SELECT r.run_key, m.value FROM metrics m JOIN runs r ON r.id = m.run_id "
                 "WHERE m.name = :name"), {"name": MCE},
        ).all())  # fmt: skip
    # Mixed with version 1's reference (error 0.5) it would be 100 * 0.4 / 0.35 = 114.3.
    assert mce["ln-v2"] == pytest.approx(200.0)
    assert mce["ref-v1"] == pytest.approx(100.0) and mce["ref-v2"] == pytest.approx(100.0)
    store.engine.dispose()
