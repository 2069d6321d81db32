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
damaged, locked, unreachable) reach the user as one short paragraph (see
``normbench.store.checks``).

Every write goes through ``Store``. Several orchestrators (processes, on one machine or many) can
share one database: each run is claimed atomically by an owner and kept with a heartbeat
(``claim_run``, ``heartbeat``); a run whose owner stopped beating is taken over, and a write by
an owner that lost its claim changes nothing (``ClaimLost``). Times of claims are read from the
database's clock, so machines whose clocks disagree still agree on whose claim is stale. SQLite
write transactions take the write lock when they begin (``BEGIN IMMEDIATE``), so a transaction
that read something never finds it changed when it writes; PostgreSQL locks the rows it reads
before writing them (``SELECT ... FOR UPDATE``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Float,
    Row,
    Table,
    and_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, CompileError, DatabaseError, IntegrityError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.functions import FunctionElement

from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.store.checks import (
    StoreError,
    check_integrity,
    check_server,
    check_sqlite_file,
    check_writable,
    describe,
    read_only,
    short_errors,
    sqlite_path,
)
from normbench.store.models import (
    Artifact,
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
    "Artifact", "Base", "Claim", "ClaimLost", "CurvePoint", "LOCAL_OWNER", "Metric", "NormSpeed",
    "Run", "RunStatus", "Skip", "Store", "StoreError", "Submission", "media_type", "open_store",
    "readonly_engine", "run_artifact",
]  # fmt: skip

BUSY_TIMEOUT_MS = 30_000

#: The execution option of the store's write transactions (``BEGIN IMMEDIATE`` on SQLite).
WRITE = "normbench_write"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # SQLAlchemy emits BEGIN itself (``_sqlite_begin``), instead of the sqlite3 module's late,
    # deferred one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn) -> None:
    # A deferred transaction that reads and then writes fails at once (without waiting for the
    # busy timeout) when another process wrote in between; a write transaction therefore takes
    # the write lock up front, waiting its turn for up to the busy timeout.
    immediate = conn.get_execution_options().get(WRITE, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _unusable_url(url: str, err: Exception) -> NormbenchError:
    driver = ""
    if url.startswith("postgresql"):
        driver = " For PostgreSQL, install the driver: pip install 'normbench[postgres]'."
    return NormbenchError(
        f"Cannot use the database URL {url!r}: {err}. Use a file path for SQLite, or an "
        "SQLAlchemy URL whose driver is installed (e.g. postgresql+psycopg://... with "
        f"psycopg).{driver}"
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
    try:
        if path is None:
            check_server(probe, parsed)
        short_errors(probe, shown)
        if path is None:
            check_integrity(probe, shown)
        check_writable(probe, shown)
    finally:
        probe.dispose()
    engine = _engine(parsed, pool_pre_ping=not sqlite)
    short_errors(engine, shown)
    if sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
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
    try:
        check_server(engine, parsed)
    except BaseException:
        engine.dispose()
        raise
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
    """Bring the database to the newest schema revision, in one transaction that holds off other
    processes upgrading it at the same time (they then find nothing left to do)."""
    cfg = alembic_config()
    with engine.execution_options(**{WRITE: True}).connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Migrations recreate SQLite tables; dropping the old ``runs`` with foreign keys on
            # would delete every metric with it (ON DELETE CASCADE). The pragma only takes
            # effect outside a transaction.
            conn.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.execute(select(func.pg_advisory_xact_lock(_lock_id("migrations"))))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first():
                    raise StoreError(
                        f"Upgrading the results database {where(engine.url)} would break links "
                        "between its rows; it was left unchanged.",
                        "damaged",
                    )
        finally:
            if sqlite:
                conn.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


def _lock_id(name: str) -> int:
    """A PostgreSQL advisory lock key (a signed 64-bit integer) for ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


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


class ClaimLost(NormbenchError):
    """The run is no longer claimed by this owner (another process took it over, or it is no
    longer running): nothing was written."""


@dataclass(frozen=True)
class Claim:
    """A run this owner now holds (status ``running``)."""

    key: str
    run_id: int
    previous: RunStatus | None  # the row's status before the claim; None if the row is new
    previous_owner: str | None
    epochs_done: int  # the row's epochs_done before the claim
    taken_over: bool  # a stale "running" claim of another owner was taken


@dataclass(frozen=True)
class Skip:
    """A run this owner did not claim, and why."""

    key: str
    reason: str  # "finished" or "claimed"
    detail: str  # e.g. "claimed by host-a:1234 (heartbeat 12 s ago)"


#: The owner of runs opened with ``begin_run``, and of writes that name no owner.
LOCAL_OWNER = "local"

#: The prefix of a submitted norm's registered name, ``submission/<base>/v<version>``.
SUBMISSION_NAMESPACE = "submission/"

#: How often a write transaction is tried again after losing a race on a unique key.
ATTEMPTS = 20

#: The run fields that come from a run's spec.
SPEC_FIELDS = (
    "suite", "budget", "protocol_version", "task", "dataset", "norm", "optimizer", "seed",
)  # fmt: skip

#: The columns of ``uq_metric_row``, which mCE rows are upserted on.
METRIC_ROW = ("run_id", "name", "split", "corruption", "severity", "layer", "step")


class db_now(FunctionElement):  # noqa: N801 - used like a SQL function
    """The database's clock in epoch seconds: one clock for every machine sharing it."""

    type = Float()
    inherit_cache = True


@compiles(db_now, "sqlite")
def _sqlite_now(element, compiler, **kw) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


@compiles(db_now, "postgresql")
def _postgresql_now(element, compiler, **kw) -> str:
    # clock_timestamp(), not now(): now() stands still for the whole transaction.
    return "CAST(extract(epoch from clock_timestamp()) AS double precision)"


@compiles(db_now)
def _other_now(element, compiler, **kw) -> str:
    raise CompileError(
        f"normbench reads the database clock of SQLite and PostgreSQL only, not of "
        f"{compiler.dialect.name}."
    )


def check_lengths(table: Table, values: Mapping[str, Any], what: str) -> None:
    """Refuse a text longer than its column holds (PostgreSQL would refuse it half-way through
    a transaction; SQLite would keep it, and a later copy to PostgreSQL would fail)."""
    for name, value in values.items():
        length = getattr(table.c[name].type, "length", None)
        if isinstance(value, str) and length is not None and len(value) > length:
            shown = value if len(value) <= 80 else f"{value[:77]}..."
            raise NormbenchError(
                f"The {what}'s {name} {shown!r} is {len(value)} characters long; the results "
                f"database holds at most {length}. Use a shorter one."
            )


def _dialect_insert(conn: Connection, table: type[Base]):
    """An INSERT with ``on_conflict_do_update`` for the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    if conn.dialect.name == "sqlite":
        return sqlite.insert(table)
    raise NormbenchError(f"Upserts are written for SQLite and PostgreSQL, not {conn.dialect.name}.")


class Store:
    """Every write to the results database, each one short transaction.

    A write that depends on what it read takes its locks first: the SQLite write lock at BEGIN,
    the row lock (``FOR UPDATE``) on PostgreSQL; conditional updates check their row counts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._writer = engine.execution_options(**{WRITE: True})

    @property
    def location(self) -> str:
        """The database as the user names it: the SQLite file, or the URL without password."""
        return where(self.engine.url)

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def db_now(self) -> float:
        """The database's clock, in epoch seconds."""
        with self.engine.connect() as conn:
            return float(conn.scalar(select(db_now())))

    def get_run(self, key: str) -> Run | None:
        with self.session() as s:
            return s.scalar(select(Run).where(Run.run_key == key))

    # --- claims ----------------------------------------------------------------------------

    def claim_run(
        self,
        spec_dict: dict[str, Any],
        key: str,
        *,
        owner: str,
        lease_seconds: float,
        device: str,
        provenance: dict[str, Any],
        config: dict[str, Any],
        reset: bool,
        rerun_finished_before: float | None = None,
    ) -> Claim | Skip:
        """Claim the run ``key`` for ``owner`` in one atomic step, or say why not.

        A new key gets its row. An existing row is taken when it is neither running nor
        finished; when it is finished and ``rerun_finished_before`` (database clock) is later
        than its last heartbeat; or when it is running and either ``owner`` already holds it or
        its heartbeat is more than ``lease_seconds`` old. Taking it sets status ``running``,
        the owner and a fresh heartbeat, clears the error and diverged step and sets device,
        config and provenance; ``reset`` also drops its metrics and curve points."""
        takeable = self._takeable(owner, lease_seconds, rerun_finished_before)
        return self._claim(spec_dict, key, owner, takeable, device, provenance, config, reset)

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
        """Create or re-open the run row with status ``running`` for ``LOCAL_OWNER``, whatever
        its state (one process on its own database); ``reset`` drops old results. Returns the
        run's id."""
        claim = self._claim(spec_dict, key, LOCAL_OWNER, true(), device, provenance, config, reset)
        assert isinstance(claim, Claim)
        return claim.run_id

    @staticmethod
    def _takeable(owner: str, lease_seconds: float, rerun_before: float | None) -> ColumnElement:
        # A running row without a heartbeat predates claims: nobody keeps it alive.
        beat = func.coalesce(Run.heartbeat, 0.0)
        conditions = [
            Run.status.not_in([RunStatus.running, RunStatus.finished]),
            and_(
                Run.status == RunStatus.running,
                or_(Run.owner == owner, beat < db_now() - float(lease_seconds)),
            ),
        ]
        if rerun_before is not None:
            conditions.append(and_(Run.status == RunStatus.finished, beat < rerun_before))
        return or_(*conditions)

    def _claim(
        self,
        spec_dict: dict[str, Any],
        key: str,
        owner: str,
        takeable: ColumnElement,
        device: str,
        provenance: dict[str, Any],
        config: dict[str, Any],
        reset: bool,
    ) -> Claim | Skip:
        settings = spec_dict["settings"]
        fields = {k: spec_dict[k] for k in SPEC_FIELDS} | {
            "model": settings["model"], "variant": settings.get("variant", "")
        }  # fmt: skip
        claimed = {
            "status": RunStatus.running, "owner": owner, "heartbeat": db_now(), "error": None,
            "diverged_step": None, "device": device, "config": config, "provenance": provenance,
        }  # fmt: skip
        check_lengths(Run.__table__, {**fields, "run_key": key, "owner": owner, "device": device},
                      "run")  # fmt: skip
        for attempt in range(ATTEMPTS):
            try:
                with self._writer.begin() as conn:
                    row = conn.execute(
                        select(Run.id, Run.status, Run.owner, Run.heartbeat, Run.epochs_done,
                               Run.finished_at, db_now().label("now"))
                        .where(Run.run_key == key)
                        .with_for_update()
                    ).one_or_none()  # fmt: skip
                    if row is None:
                        new = insert(Run).values(run_key=key, epochs_done=0, **fields, **claimed)
                        run_id = conn.execute(new).inserted_primary_key[0]
                        return Claim(key, run_id, None, None, 0, False)
                    values = dict(claimed)
                    if reset:
                        values |= {"epochs_done": 0, "finished_at": None}
                    taken = conn.execute(
                        update(Run).where(Run.id == row.id, takeable).values(**values)
                    )
                    if taken.rowcount != 1:
                        return _skip(key, row)
                    if reset:
                        conn.execute(delete(Metric).where(Metric.run_id == row.id))
                        conn.execute(delete(CurvePoint).where(CurvePoint.run_id == row.id))
                    running = row.status is RunStatus.running
                    return Claim(key, row.id, row.status, row.owner, row.epochs_done,
                                 taken_over=running and row.owner != owner)  # fmt: skip
            except IntegrityError:
                # Another process inserted the key first: take its row instead (next attempt).
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def heartbeat(self, owner: str, keys: Iterable[str]) -> set[str]:
        """Refresh the heartbeat of those ``keys`` that ``owner`` still holds (running and
        owned); returns them. A key missing from the answer was taken over."""
        keys = list(keys)
        if not keys:
            return set()
        held = and_(Run.run_key.in_(keys), Run.status == RunStatus.running, Run.owner == owner)
        with self._writer.begin() as conn:
            beat = update(Run).where(held).values(heartbeat=db_now())
            if conn.dialect.update_returning:
                return set(conn.scalars(beat.returning(Run.run_key)))
            conn.execute(beat)
            return set(conn.scalars(select(Run.run_key).where(held)))

    def _held(self, key: str, owner: str) -> ColumnElement:
        return and_(Run.run_key == key, Run.status == RunStatus.running, Run.owner == owner)

    def record_epoch(self, key: str, epoch: int, *, owner: str = LOCAL_OWNER) -> bool:
        """Note a checkpointed epoch (and that the owner is alive) while ``owner`` holds the
        run, so an interrupted run shows how far it got; False when it no longer does."""
        with self._writer.begin() as conn:
            done = conn.execute(
                update(Run)
                .where(self._held(key, owner))
                .values(epochs_done=epoch, heartbeat=db_now())
            )
            return done.rowcount == 1

    def mark(
        self, key: str, status: RunStatus, error: str | None = None, *, owner: str | None = None
    ) -> bool:
        """Set a run's status and error; with ``owner``, only while that owner holds the run.
        Returns whether the row was changed."""
        which = Run.run_key == key if owner is None else self._held(key, owner)
        with self._writer.begin() as conn:
            done = conn.execute(
                update(Run).where(which).values(status=status, error=error, heartbeat=db_now())
            )
            return done.rowcount == 1

    def finish_run(
        self,
        key: str,
        *,
        owner: str = LOCAL_OWNER,
        status: RunStatus,
        metrics: Iterable[MetricRow],
        curves: Iterable[tuple[int, str, float]],
        epochs_done: int,
        diverged_step: int | None = None,
        error: str | None = None,
        provenance_update: dict[str, Any] | None = None,
        artifacts: dict[str, bytes] | None = None,
    ) -> None:
        """Write a run's results and final status in one transaction, if ``owner`` still holds
        the run; else raise ``ClaimLost`` and write nothing. Values that are not numbers are
        left out, not stored. ``artifacts``: named files (their media type from the name's
        suffix) that replace the run's earlier ones."""
        metric_rows = [
            {"name": m.name, "split": m.split, "corruption": m.corruption,
             "severity": m.severity, "layer": m.layer, "step": m.step, "value": float(m.value)}
            for m in metrics
            if math.isfinite(m.value)
        ]  # fmt: skip
        curve_rows = [
            {"epoch": e, "name": n, "value": float(v)} for e, n, v in curves if math.isfinite(v)
        ]
        with self._writer.begin() as conn:
            run = conn.execute(
                select(Run.id, Run.status, Run.owner, Run.provenance)
                .where(Run.run_key == key)
                .with_for_update()
            ).one_or_none()
            if run is None or run.status is not RunStatus.running or run.owner != owner:
                now = "no such run" if run is None else f"it is {run.status.value}"
                if run is not None and run.status is RunStatus.running:
                    now = f"{run.owner or 'another process'} holds it now"
                raise ClaimLost(
                    f"The run {key} is no longer held by {owner} ({now}); its results were not "
                    "stored."
                )
            conn.execute(delete(Metric).where(Metric.run_id == run.id))
            conn.execute(delete(CurvePoint).where(CurvePoint.run_id == run.id))
            if metric_rows:
                conn.execute(insert(Metric), [{"run_id": run.id, **m} for m in metric_rows])
            if curve_rows:
                conn.execute(insert(CurvePoint), [{"run_id": run.id, **c} for c in curve_rows])
            conn.execute(delete(Artifact).where(Artifact.run_id == run.id))
            if artifacts:
                conn.execute(
                    insert(Artifact),
                    [
                        {"run_id": run.id, "name": name, "media_type": media_type(name),
                         "data": data}
                        for name, data in artifacts.items()
                    ],
                )  # fmt: skip
            provenance = {**run.provenance, **(provenance_update or {})}
            conn.execute(
                update(Run)
                .where(Run.id == run.id)
                .values(status=status, epochs_done=epochs_done, diverged_step=diverged_step,
                        error=error, finished_at=utcnow(), heartbeat=db_now(),
                        provenance=provenance)
            )  # fmt: skip

    # --- suite aggregates, submissions, speeds -----------------------------------------------

    def update_mce(
        self,
        suite: str,
        budget: str,
        reference: tuple[str, str],
        alexnet: bool = False,
        *,
        protocol_version: int,
    ) -> int:
        """Recompute the mCE rows of every finished run of ``suite``/``budget`` at
        ``protocol_version`` (a reference run of another protocol never normalises these);
        returns how many runs have every benchmark corruption result (0 when the reference has
        no finished run with them). With ``alexnet`` (ImageNet-C), errors are normalised by
        AlexNet's published errors instead, without relative mCE.

        One transaction, safe to run from several processes at once and to repeat: the rows are
        upserted on their unique key, and only the mCE rows of runs that no longer get one are
        deleted. Runs of the suite are updated one computation at a time (an advisory lock on
        PostgreSQL; the write lock on SQLite), so the last one to commit has seen every run
        finished before it began."""
        from normbench import metrics as M
        from normbench import robustness as R

        of_suite = and_(
            Run.suite == suite, Run.budget == budget, Run.protocol_version == protocol_version
        )
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                lock = _lock_id(f"mce/{suite}/{budget}/{protocol_version}")
                conn.execute(select(func.pg_advisory_xact_lock(lock)))
            runs = conn.execute(
                select(Run.id, Run.norm, Run.optimizer, Run.seed, Run.provenance)
                .where(of_suite, Run.status == RunStatus.finished)
                .order_by(Run.id)
                .with_for_update()
            ).all()
            accuracy = conn.execute(
                select(Metric.run_id, Metric.corruption, Metric.severity, Metric.value).where(
                    Metric.run_id.in_([r.id for r in runs]),
                    Metric.name == M.ACCURACY,
                    Metric.split == "test",
                )
            )
            errors = R.errors_of(accuracy)
            seeds = {r.id: r.seed for r in runs if (r.norm, r.optimizer) == tuple(reference)}
            table = R.mce_table({r.id: errors.get(r.id, {}) for r in runs}, seeds,
                                tuple(reference), alexnet)  # fmt: skip
            values = table.values if table is not None else {}
            rows = [
                {"run_id": run_id, "name": name, "split": "test", "corruption": "",
                 "severity": 0, "layer": -1, "step": -1, "value": value}
                for run_id, named in values.items()
                for name, value in named.items()
            ]  # fmt: skip
            suite_runs = select(Run.id).where(of_suite).scalar_subquery()
            for name in (R.MCE, R.RELATIVE_MCE):
                keep = [run_id for run_id, named in values.items() if name in named]
                conn.execute(
                    delete(Metric).where(
                        Metric.name == name,
                        Metric.run_id.in_(suite_runs),
                        Metric.run_id.not_in(keep),
                    )
                )
            for start in range(0, len(rows), 500):  # SQLite's limit on bound parameters
                upsert = _dialect_insert(conn, Metric).values(rows[start : start + 500])
                conn.execute(
                    upsert.on_conflict_do_update(
                        index_elements=list(METRIC_ROW), set_={"value": upsert.excluded.value}
                    )
                )
            relabel = [
                {"run": r.id, "provenance": {**r.provenance, "mce_reference": table.label}}
                for r in runs
                if r.id in values and r.provenance.get("mce_reference") != table.label
            ]
            if relabel:
                conn.execute(
                    update(Run)
                    .where(Run.id == bindparam("run"))
                    .values(provenance=bindparam("provenance", type_=Run.provenance.type)),
                    relabel,
                )
            return table.complete if table is not None else 0

    def add_submission(
        self,
        *,
        base_name: str,
        class_name: str,
        file_name: str,
        source: str,
        source_sha256: str,
        contract: dict[str, Any],
    ) -> tuple[str, bool]:
        """Record a submitted norm; returns its registered name ``submission/<base>/v<version>``
        and whether it is new. The same base name and source (SHA-256) is the same submission;
        a changed source is the next version. Processes submitting at the same time get
        distinct versions (a lost race on a unique key is tried again)."""
        fields = {"base_name": base_name, "class_name": class_name, "file_name": file_name,
                  "source_sha256": source_sha256}  # fmt: skip
        check_lengths(Submission.__table__, fields, "submission")
        for attempt in range(ATTEMPTS):
            try:
                with self._writer.begin() as conn:
                    same = conn.scalar(
                        select(Submission.name).where(
                            Submission.base_name == base_name,
                            Submission.source_sha256 == source_sha256,
                        )
                    )
                    if same is not None:
                        return same, False
                    latest = select(func.max(Submission.version)).where(
                        Submission.base_name == base_name
                    )
                    version = (conn.scalar(latest) or 0) + 1
                    name = f"{SUBMISSION_NAMESPACE}{base_name}/v{version}"
                    check_lengths(Submission.__table__, {"name": name}, "submission")
                    conn.execute(
                        insert(Submission).values(
                            name=name, version=version, source=source, contract=contract, **fields
                        )
                    )
                    return name, True
            except IntegrityError:
                if attempt == ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def submissions(self, names: Iterable[str]) -> list[Submission]:
        """The recorded submissions among ``names``, detached from the database (read only)."""
        names = list(names)
        if not names:
            return []
        with self.session() as s:
            found = list(
                s.scalars(
                    select(Submission).where(Submission.name.in_(names)).order_by(Submission.name)
                )
            )
            s.expunge_all()
            return found

    def add_norm_speeds(self, rows: Iterable[dict[str, Any]]) -> None:
        """Store measured norm speeds (``NormSpeed`` fields) in one transaction."""
        rows = list(rows)
        for row in rows:
            check_lengths(NormSpeed.__table__, row, "norm speed")
        if rows:
            with self._writer.begin() as conn:
                conn.execute(insert(NormSpeed), rows)


def _skip(key: str, row: Row) -> Skip:
    """Why the run of ``row`` (id, status, owner, heartbeat, epochs, finished_at, now) was not
    claimed."""
    if row.status is RunStatus.finished:
        at = f" at {row.finished_at:%Y-%m-%d %H:%M:%S} UTC" if row.finished_at else ""
        return Skip(key, "finished", f"finished{at}")
    age = "" if row.heartbeat is None else f" (heartbeat {row.now - row.heartbeat:.0f} s ago)"
    return Skip(key, "claimed", f"claimed by {row.owner or 'another process'}{age}")


#: Media types of the artifact names runs write, by suffix.
MEDIA_TYPES = {".png": "image/png", ".json": "application/json", ".csv": "text/csv"}


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(Path(name).suffix.lower(), "application/octet-stream")


def run_artifact(engine: Engine, key: str, name: str) -> bytes | None:
    """The artifact ``name`` of the run ``key``, or None."""
    query = (
        select(Artifact.data)
        .join(Run, Run.id == Artifact.run_id)
        .where(Run.run_key == key, Artifact.name == name)
    )
    with engine.connect() as conn:
        return conn.execute(query).scalar_one_or_none()


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
