"""The results store: engine set-up, schema migrations, and the short transactions runs need.

Any SQLAlchemy URL works; SQLite files get WAL journaling (readers never block the writer) and a
busy timeout, so several worker processes can share one file. The schema is created and upgraded
only by the Alembic migrations in ``db/`` (installed as ``normbench.migrations``), automatically on
first use or explicitly with ``normbench db upgrade``.

A database is opened either for writing (``run``, ``submit``, ``bench``, ``db upgrade``): created
and migrated as needed, after checking that it can be written; or read-only (``leaderboard``, the
dashboard): nothing is ever created, migrated or written, and a database that is missing, empty or
at another schema revision is refused with what to do. Either way a file that is not SQLite or is
damaged is refused untouched, and the environment's database errors (read-only, disk full,
damaged, locked) reach the user as one short paragraph (see ``normbench.store.checks``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, delete, event, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session

from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.store.checks import (
    StoreError,
    check_integrity,
    check_sqlite_file,
    check_writable,
    describe,
    read_only,
    short_errors,
    sqlite_path,
)
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
    "Base", "CurvePoint", "Metric", "NormSpeed", "Run", "RunStatus", "Store", "StoreError",
    "Submission", "open_store", "readonly_engine",
]  # fmt: skip

BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _unusable_url(url: str, err: Exception) -> NormbenchError:
    return NormbenchError(
        f"Cannot use the database URL {url!r}: {err}. Use a file path for SQLite, or an "
        "SQLAlchemy URL whose driver is installed (e.g. postgresql+psycopg://... with psycopg)."
    )


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError as err:
        raise _unusable_url(url, err) from None


def _engine(url: str | URL, **kwargs: Any) -> Engine:
    try:
        return create_engine(url, **kwargs)
    except (ArgumentError, ImportError) as err:
        raise _unusable_url(str(url), err) from None


def where(url: URL) -> str:
    """The database as messages name it: the file of an SQLite database, else the URL without
    its password."""
    path = sqlite_path(url)
    return str(path) if path is not None else url.render_as_string(hide_password=True)


def create_db_engine(url: str) -> Engine:
    """An engine for writing. Before anything is written, an SQLite file that is not a database
    or is damaged is refused untouched, and a database this process cannot write (a read-only
    file, folder or URL) is refused with what to do."""
    parsed = _parse(url)
    shown, path = where(parsed), sqlite_path(parsed)
    if path is not None:
        if parsed.query.get("mode") == "ro":
            raise read_only(shown, "the URL opens it with mode=ro")
        check_sqlite_file(path, readonly=False)
        if path.exists() and path.stat().st_size:
            _inspect_sqlite(path, lambda checked: _known_revision(checked, shown))
    # The write probe uses an engine of its own: the write engine's first connection switches
    # the file to WAL, which writes to it, and must not happen to a database that is refused.
    # It waits for another process's write transaction as long as the write engine would.
    sqlite = parsed.get_backend_name() == "sqlite"
    probe = _engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000} if sqlite else {})
    short_errors(probe, shown)
    try:
        if path is None:
            check_integrity(probe, shown)
        check_writable(probe, shown)
    finally:
        probe.dispose()
    engine = _engine(parsed)
    short_errors(engine, shown)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def readonly_engine(url: str) -> Engine:
    """An engine that cannot write, on a database that is there, undamaged and at this
    normbench's schema revision (else a ``StoreError`` that says what to do). SQLite is opened
    through a read-only URI (``mode=ro``) with ``PRAGMA query_only`` as a second lock; PostgreSQL
    gets read-only transactions.

    A refused SQLite file is left exactly as it was, with no file added next to it. Reading a
    WAL database that nobody else has open gives it SQLite's ``-wal`` and ``-shm`` files, as any
    SQLite reader does (the next writer removes them); the database file itself never changes."""
    parsed = _parse(url)
    shown, path = where(parsed), sqlite_path(parsed)
    if path is not None:
        check_sqlite_file(path, readonly=True)
        _inspect_sqlite(path, lambda checked: _check_revision(checked, shown, readonly=True))
        engine = _sqlite_readonly(path)
        short_errors(engine, shown)
        return engine
    engine = _engine(parsed, pool_pre_ping=True)
    if parsed.get_backend_name() == "postgresql":

        @event.listens_for(engine, "begin")
        def _read_only(conn) -> None:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")

    short_errors(engine, shown)
    try:
        _check_revision(engine, shown, readonly=True)
    except BaseException:
        engine.dispose()
        raise
    return engine


def _inspect_sqlite(path: Path, then: Callable[[Engine], None]) -> None:
    """Run ``quick_check`` on an SQLite file, then ``then`` on the same read-only engine.

    A WAL database that nobody has open (it has no ``-wal`` file) is read as immutable here, so
    that checking, and refusing, it leaves no ``-wal``/``-shm`` files behind. A writer that
    starts meanwhile only appends to its own WAL, which these few reads do not need."""
    with path.open("rb") as f:
        header = f.read(20)
    wal = len(header) == 20 and header[18:20] == b"\x02\x02"
    idle = wal and not path.with_name(path.name + "-wal").exists()
    engine = _sqlite_readonly(path, immutable=idle)
    short_errors(engine, str(path))
    try:
        check_integrity(engine, str(path))
        then(engine)
    finally:
        engine.dispose()


def _sqlite_readonly(path: Path, *, immutable: bool = False) -> Engine:
    # A WAL database on read-only storage cannot get its shared-memory file; SQLite then opens
    # it only as immutable (no locking; fine for a file nobody can write either).
    failure: Exception | None = None
    modes = ["mode=ro&immutable=1"] if immutable else ["mode=ro", "mode=ro&immutable=1"]
    for params in modes:
        engine = _engine(
            f"sqlite:///file:{quote(str(path))}?{params}&uri=true",
            connect_args={"check_same_thread": False},
        )
        event.listen(engine, "connect", _query_only)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT count(*) FROM sqlite_master")
            return engine
        except DatabaseError as err:
            engine.dispose()
            failure = failure or err
    raise describe(failure.orig, str(path)) from None


def _query_only(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA query_only = ON")


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


def _known_revision(engine: Engine, shown: str) -> tuple[str | None, str | None]:
    """(current, head) revisions; a database that a newer normbench wrote is refused."""
    current, head = schema_revisions(engine)
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current is not None and current not in known:
        raise StoreError(
            f"The results database {shown} has schema revision {current!r}, which this version "
            "of normbench does not know (a newer normbench wrote it). Upgrade normbench (pip "
            "install -U normbench) or point --db at another database.",
            "newer",
        )
    return current, head


def _check_revision(engine: Engine, shown: str, *, readonly: bool, migrate: bool = False) -> None:
    """Refuse a database of a newer normbench; upgrade an older one if ``migrate``, else say how.
    Read-only, a database without normbench's schema is refused too."""
    current, head = _known_revision(engine, shown)
    if current == head:
        return
    if readonly and current is None:
        tables = sorted(sa_inspect(engine).get_table_names())
        if not tables:
            raise StoreError(
                f"The results database {shown} holds no normbench results yet (it is an empty "
                f"database). `normbench run --db {shown}` fills it.",
                "empty",
            )
        raise StoreError(
            f"{shown} is not a normbench results database (it holds the tables "
            f"{', '.join(tables[:5])}{', ...' if len(tables) > 5 else ''} and no normbench "
            "schema). Point --db at a results database.",
            "not_database",
        )
    if readonly or not migrate:
        why = " (reading never changes a database)" if readonly else ""
        raise StoreError(
            f"The results database {shown} is at schema revision {current!r}; this normbench "
            f"reads {head!r}. Run `normbench db upgrade --db {shown}` first{why}.",
            "outdated",
        )
    upgrade(engine)


class Store:
    """Short write transactions for the runner's life cycle of a run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def location(self) -> str:
        """The database as the user names it: the SQLite file, or the URL without password."""
        return where(self.engine.url)

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
    """Open the results database at ``url``.

    For writing (the default), the database is created if missing and brought to the newest
    schema revision (unless not ``migrate``), after checking that it is an undamaged SQLite file
    or none yet and that it can be written. A 0-byte file counts as an empty database, as SQLite
    itself treats it: the schema is created in it.

    ``readonly`` (read commands, the dashboard) never creates, migrates or writes anything: a
    database that is missing, empty, damaged or at another schema revision is refused with what
    to do (see ``readonly_engine``)."""
    if readonly:
        return Store(readonly_engine(url))
    engine = create_db_engine(url)
    _check_revision(engine, where(engine.url), readonly=False, migrate=migrate)
    return Store(engine)
