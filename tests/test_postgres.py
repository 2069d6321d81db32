"""A results database on a real PostgreSQL server: migrations from the first revision with rows in
it, the schema against the models, the longest values each column holds, read-only access, and
the dashboard's data layer reading a leaderboard."""

import pytest
from alembic import command
from sqlalchemy import insert, text
from sqlalchemy.exc import DBAPIError
from test_store import HEAD, SPEC, schema_differences

from normbench.errors import NormbenchError
from normbench.leaderboard import Selection
from normbench.metrics import MetricRow
from normbench.store import (
    Claim,
    RunStatus,
    Submission,
    alembic_config,
    create_db_engine,
    open_store,
    readonly_engine,
    schema_revisions,
)


def test_migrations_from_the_first_revision_keep_the_rows_and_give_the_models(postgres_url):
    engine = create_db_engine(postgres_url)
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(text(
            "INSERT INTO runs (id, run_key, suite, budget, protocol_version, task, dataset, model,"
            " norm, optimizer, seed, status, epochs_done, config, provenance, created_at,"
            " updated_at) VALUES (1, 'k', 's', 'smoke', 1, 'classify', 'cifar10', 'fastnet',"
            " 'batchnorm', 'sgd', 0, 'running', 1, '{}', '{}', '2026-01-01', '2026-01-01')"
        ))  # fmt: skip
        conn.execute(text("INSERT INTO metrics (run_id, name, split, corruption, severity, value)"
                          " VALUES (1, 'accuracy', 'test', '', 0, 0.5)"))  # fmt: skip
    engine.dispose()
    with pytest.raises(NormbenchError, match="at schema revision '0001'"):
        open_store(postgres_url, readonly=True)  # reading never migrates

    store = open_store(postgres_url)
    assert schema_revisions(store.engine) == (HEAD, HEAD)
    assert schema_differences(store.engine) == []
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT value FROM metrics")).scalar() == 0.5
    run = store.get_run("k")
    assert run.heartbeat == pytest.approx(1767225600.0)  # 2026-01-01 00:00 UTC
    # A running row from before claims has no live owner: anyone takes it over.
    got = store.claim_run(SPEC, "k", owner="a", lease_seconds=3600, device="cpu", provenance={},
                          config=SPEC, reset=False)  # fmt: skip
    assert isinstance(got, Claim) and got.taken_over and got.epochs_done == 1
    store.engine.dispose()


def test_the_longest_values_the_columns_hold_round_trip(postgres_url):
    """PostgreSQL enforces string lengths (SQLite does not): a value of each column's full length
    is kept whole, and one character more is refused with the column's limit."""
    store = open_store(postgres_url)
    spec = {**SPEC, "norm": "n" * 256, "optimizer": "o" * 256, "suite": "s" * 128,
            "settings": {"model": "m" * 128}}  # fmt: skip
    store.claim_run(spec, "k" * 64, owner="w" * 128, lease_seconds=60, device="d" * 256,
                    provenance={}, config={}, reset=True)  # fmt: skip
    name, new = store.add_submission(base_name="b" * 64, class_name="C" * 128,
                                     file_name="f" * 256, source="x", source_sha256="0" * 64,
                                     contract={})  # fmt: skip
    with_options = f"{name}({'x' * (254 - len(name))})"
    store.add_norm_speeds([{"norm": with_options, "model": "m" * 128, "batch_size": 1,
                            "device": "d" * 256, "images_per_s": 1.0, "ratio_to_batchnorm": 1.0,
                            "param_count": 1, "provenance": {}}])  # fmt: skip
    run = store.get_run("k" * 64)
    assert (run.norm, run.optimizer, run.owner, run.model) == (
        "n" * 256, "o" * 256, "w" * 128, "m" * 128,
    )  # fmt: skip
    assert new and store.submissions([name])[0].file_name == "f" * 256
    with store.engine.connect() as conn:
        assert len(conn.execute(text("SELECT norm FROM norm_speed")).scalar()) == 256
    # The models' lengths are the database's: one character more is refused by the server.
    with pytest.raises(DBAPIError, match="too long"), store.engine.begin() as conn:
        conn.execute(text("UPDATE runs SET norm = :n"), {"n": "n" * 257})
    store.engine.dispose()


def finished_run(store, key: str, norm: str, accuracy: float) -> None:
    spec = {**SPEC, "norm": norm}
    store.claim_run(spec, key, owner="me", lease_seconds=60, device="cpu", provenance={},
                    config=spec, reset=True)  # fmt: skip
    store.finish_run(key, owner="me", status=RunStatus.finished, epochs_done=1, curves=[],
                     metrics=[MetricRow("accuracy", accuracy, "test")])  # fmt: skip


def test_a_readonly_engine_refuses_writes(postgres_url):
    store = open_store(postgres_url)
    finished_run(store, "k", "batchnorm", 0.5)
    store.engine.dispose()
    engine = readonly_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM runs")).scalar() == 1
    with pytest.raises(DBAPIError, match="read-only transaction"), engine.begin() as conn:
        conn.execute(insert(Submission).values(
            name="n", base_name="n", version=1, class_name="C", file_name="f", source="",
            source_sha256="", contract={},
        ))  # fmt: skip
    with pytest.raises(DBAPIError, match="read-only transaction"), engine.begin() as conn:
        conn.execute(text("UPDATE runs SET status = 'failed'"))
    engine.dispose()
    assert open_store(postgres_url).get_run("k").status is RunStatus.finished


def test_the_dashboard_reads_a_leaderboard_from_postgresql(postgres_url):
    from dashboard import data

    store = open_store(postgres_url)
    for key, norm, accuracy in (("a", "batchnorm", 0.6), ("b", "layernorm", 0.8)):
        finished_run(store, key, norm, accuracy)
    store.engine.dispose()

    engine = data.readonly_engine(postgres_url)
    state, where = data.database_state(engine)
    assert state is data.DatabaseState.ready and where.startswith("postgresql+psycopg://")
    assert data.choices(engine).runs.tolist() == [2]
    table = data.leaderboard_view(
        engine, Selection("s", "smoke", protocol_version=1), "clean accuracy"
    )
    assert table.norm.tolist() == ["layernorm", "batchnorm"]
    assert table["accuracy_mean"].tolist() == pytest.approx([0.8, 0.6])
    assert table["rank"].tolist() == [1, 2]
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM runs WHERE owner = 'me'")).scalar() == 2
    engine.dispose()
