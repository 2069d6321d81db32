"""The results store: engine set-up, schema migrations, and the short transactions runs need.

Any SQLAlchemy URL works; SQLite files get WAL journaling (readers never block the writer) and a
busy timeout, so several worker processes can share one file. The schema is created and upgraded
only by the Alembic migrations in ``db/`` (installed as ``normbench.migrations``), automatically on
first use or explicitly with ``normbench db upgrade``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from importlib import resources
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, delete, event, select
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session

from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.store.models import (
    Base,
    CurvePoint,
    Metric,
    NormSpeed,
    Run,
    RunStatus,
    Submission,
    utcnow,
)

__all__ = [
    "Base", "CurvePoint", "Metric", "NormSpeed", "Run", "RunStatus", "Store", "Submission",
    "open_store",
]  # fmt: skip

BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_db_engine(url: str) -> Engine:
    try:
        engine = create_engine(url)
    except (ArgumentError, ImportError) as err:
        raise NormbenchError(
            f"Cannot use the database URL {url!r}: {err}. Use a file path for SQLite, or an "
            "SQLAlchemy URL whose driver is installed (e.g. postgresql+psycopg://... with psycopg)."
        ) from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("normbench.migrations")))
    return cfg


def schema_revisions(engine: Engine) -> tuple[str | None, str | None]:
    """(the database's current revision, the newest revision this normbench knows)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current, head


def upgrade(engine: Engine) -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


class Store:
    """Short write transactions for the runner's life cycle of a run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def get_run(self, key: str) -> Run | None:
        with self.session() as s:
            return s.scalar(select(Run).where(Run.run_key == key))

    def begin_run(
        self,
        spec_dict: dict[str, Any],
        key: str,
        *,
        device: str,
        provenance: dict[str, Any],
        config: dict[str, Any],
        reset: bool,
    ) -> int:
        """Create or re-open the run row with status ``running``; ``reset`` drops old results."""
        with self.session() as s, s.begin():
            run = s.scalar(select(Run).where(Run.run_key == key))
            if run is None:
                fields = {
                    k: spec_dict[k]
                    for k in (
                        "suite",
                        "budget",
                        "protocol_version",
                        "task",
                        "dataset",
                        "norm",
                        "optimizer",
                        "seed",
                    )
                }
                run = Run(
                    run_key=key,
                    model=spec_dict["settings"]["model"],
                    **fields,
                    status=RunStatus.running,
                    epochs_done=0,
                    config=config,
                    provenance=provenance,
                )
                s.add(run)
            elif reset:
                s.execute(delete(Metric).where(Metric.run_id == run.id))
                s.execute(delete(CurvePoint).where(CurvePoint.run_id == run.id))
                run.epochs_done, run.finished_at = 0, None
            run.status, run.error, run.diverged_step = RunStatus.running, None, None
            run.device, run.config, run.provenance = device, config, provenance
            s.flush()
            return run.id

    def finish_run(
        self,
        key: str,
        *,
        status: RunStatus,
        metrics: Iterable[MetricRow],
        curves: Iterable[tuple[int, str, float]],
        epochs_done: int,
        diverged_step: int | None = None,
        error: str | None = None,
        provenance_update: dict[str, Any] | None = None,
    ) -> None:
        """Write a run's results and final status in one transaction."""
        with self.session() as s, s.begin():
            run = s.scalars(select(Run).where(Run.run_key == key)).one()
            s.execute(delete(Metric).where(Metric.run_id == run.id))
            s.execute(delete(CurvePoint).where(CurvePoint.run_id == run.id))
            s.add_all(
                Metric(
                    run_id=run.id,
                    name=m.name,
                    split=m.split,
                    corruption=m.corruption,
                    severity=m.severity,
                    value=float(m.value),
                )
                for m in metrics
                if math.isfinite(m.value)  # a value that is not a number is left out, not stored
            )
            s.add_all(
                CurvePoint(run_id=run.id, epoch=e, name=n, value=float(v))
                for e, n, v in curves
                if math.isfinite(v)
            )
            run.status, run.epochs_done = status, epochs_done
            run.diverged_step, run.error = diverged_step, error
            run.finished_at = utcnow()
            if provenance_update:
                run.provenance = {**run.provenance, **provenance_update}

    def record_epoch(self, key: str, epoch: int) -> None:
        """Note a checkpointed epoch, so an interrupted run shows how far it got."""
        with self.session() as s, s.begin():
            s.scalars(select(Run).where(Run.run_key == key)).one().epochs_done = epoch

    def mark(self, key: str, status: RunStatus, error: str | None = None) -> None:
        with self.session() as s, s.begin():
            run = s.scalars(select(Run).where(Run.run_key == key)).one()
            run.status, run.error = status, error


def open_store(url: str, *, readonly: bool = False, migrate: bool = True) -> Store:
    """Connect to ``url`` and bring its schema to the newest revision (unless not ``migrate``).

    ``readonly`` (read commands, the dashboard) never creates, migrates or writes anything: a
    missing SQLite file or a database at another schema revision is refused with what to do."""
    if readonly:
        return Store(_readonly_engine(url))
    engine = create_db_engine(url)
    try:
        current, head = schema_revisions(engine)
    except OperationalError as err:
        raise NormbenchError(f"Cannot open the results database {url}: {err.orig}.") from None
    if current != head:
        known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
        if current is not None and current not in known:
            raise NormbenchError(
                f"The results database {url} has schema revision {current!r}, which this version "
                "of normbench does not know (it was written by a newer normbench). Upgrade "
                "normbench or point --db at another database."
            )
        if not migrate:
            raise NormbenchError(
                f"The results database {url} is at schema revision {current!r}, not {head!r}; "
                "run `normbench db upgrade`."
            )
        upgrade(engine)
    return Store(engine)


def _readonly_engine(url: str) -> Engine:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        from pathlib import Path

        path = Path(parsed.database.removeprefix("file:")).expanduser().resolve()
        if not path.is_file():
            raise NormbenchError(
                f"No results database at {path} (nothing has been run with this --db yet; "
                "`normbench run` creates it)."
            )
        engine = create_engine(
            f"sqlite:///file:{path}?mode=ro&uri=true", connect_args={"check_same_thread": False}
        )
        event.listen(engine, "connect", _query_only)
    else:
        engine = create_db_engine(url)
    current, head = schema_revisions(engine)
    if current != head:
        raise NormbenchError(
            f"The results database {url} is at schema revision {current!r}, not {head!r}; "
            f"run `normbench db upgrade --db {url}`."
        )
    return engine


def _query_only(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA query_only = ON")
