"""Checks that a results database can be used before anything touches it, and short messages for
the database errors that the environment causes.

An SQLite file is looked at byte by byte before any connection: SQLite itself would happily write
a schema into a file that is not a database yet, or fail half-way through a run on a copy that was
cut short. Such files are refused and left exactly as they were. A database server is connected
to once before anything else, so that one that is down, or refuses the user or the database, is
named with what to check. Errors met later (a read-only file, a full disk, a damaged page, a lock
held too long) reach the user as a ``StoreError`` with the short cause, never with the SQL
statement that met them.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DatabaseError, DBAPIError, OperationalError

from normbench.errors import NormbenchError

#: The first 16 bytes of every SQLite database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
HEADER_BYTES = 100


class StoreError(NormbenchError):
    """A results database that cannot be used as asked; ``kind`` says why, for callers that show
    some cases differently (the dashboard shows a missing or empty database as a first-run page):
    missing, empty, not_database, damaged, outdated, newer, readonly, full, locked, unreachable,
    unusable."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def sqlite_path(url: URL) -> Path | None:
    """The file of an SQLite URL (plain or ``file:`` URI form); None for other databases and for
    in-memory SQLite."""
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database or ""
    if database.startswith("file:"):  # sqlite:///file:PATH?mode=ro&uri=true
        database = unquote(database.removeprefix("file:"))
        if database.startswith("//"):  # file:///abs/path or file://localhost/abs/path
            database = database[database.find("/", 2) :]
        if url.query.get("mode") == "memory":
            return None
    if database in ("", ":memory:"):
        return None
    return Path(database).expanduser().resolve()


def check_sqlite_file(path: Path, *, readonly: bool) -> None:
    """Refuse a file that SQLite must not open: a folder, a file that is not SQLite or is shorter
    than its own header says, and for reading, a missing or empty (0-byte) file.

    For writing, a missing file is created by SQLite (its folder must exist), and a 0-byte file
    is what SQLite takes it for: an empty database, in which the schema is then created."""
    if path.is_dir():
        raise StoreError(
            f"The results database path {path} is a folder, not a file. Give --db a file path, "
            f"such as {path / 'normbench.db'}.",
            "unusable",
        )
    if not path.exists():
        if readonly:
            raise StoreError(
                f"No results database at {path} (nothing has been run with this --db yet; "
                "`normbench run` creates it).",
                "missing",
            )
        if not path.parent.is_dir():
            raise StoreError(
                f"Cannot create the results database {path}: the folder {path.parent} does not "
                "exist. Create it, or give --db a path in an existing folder.",
                "unusable",
            )
        if not os.access(path.parent, os.W_OK):
            raise StoreError(
                f"Cannot create the results database {path}: the folder {path.parent} is not "
                "writable. Give --db a path in a folder you can write.",
                "readonly",
            )
        return
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            header = f.read(HEADER_BYTES)
    except OSError as err:
        raise StoreError(
            f"Cannot read the results database {path} ({err.strerror}). Check its permissions, "
            "or point --db at another file.",
            "unusable",
        ) from None
    if size == 0 and readonly:
        raise StoreError(
            f"The results database {path} is an empty file (0 bytes): nothing has been run "
            f"with this --db yet. `normbench run --db {path}` fills it.",
            "empty",
        )
    if size and not header.startswith(SQLITE_MAGIC):
        start = header[:16].decode("ascii", "replace")
        raise StoreError(
            f"{path} is not a normbench results database: it is not an SQLite file (it starts "
            f"with {start!r}). It was left unchanged. Point --db (or NORMBENCH_DB) at a results "
            "database, or at a new file path to start one.",
            "not_database",
        )
    expected = _expected_size(header) if size else 0
    if expected is None or size < expected:
        whole = "" if expected is None else f" of the {expected:,} bytes its header gives"
        raise StoreError(
            f"The results database {path} is damaged: it holds only {size:,} bytes{whole} (a copy "
            "or download cut short?). It was left unchanged. Restore it from a backup or point "
            "--db at another file.",
            "damaged",
        )
    if not readonly:
        # Refused before SQLite opens it: a reader of a WAL file would leave -wal/-shm files.
        if not os.access(path, os.W_OK):
            raise read_only(str(path), "the file is not writable")
        if not os.access(path.parent, os.W_OK):  # SQLite writes its journal next to the file
            raise read_only(str(path), f"its folder {path.parent} is not writable")


def _expected_size(header: bytes) -> int | None:
    """The file size an SQLite header promises (whole pages); 0 when the header does not say;
    None when the header itself is cut short or impossible."""
    if len(header) < HEADER_BYTES:
        return None
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        return None
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid only while the change counter matches "version valid for"; writers
    # older than SQLite 3.7 did not keep it.
    if pages == 0 or header[24:28] != header[92:96]:
        return 0
    return pages * page_size


def check_integrity(engine: Engine, where: str) -> None:
    """``PRAGMA quick_check`` on an SQLite database (it reads every page: a fraction of a second
    for a million metric rows), so that a damaged file is refused before a run or page starts."""
    if engine.dialect.name != "sqlite":
        return
    with engine.connect() as conn:
        problems = [row[0] for row in conn.exec_driver_sql("PRAGMA quick_check(1)")]
    if problems != ["ok"]:
        first = " ".join(problems[0].replace("*** in database main ***", "").split())
        raise StoreError(
            f"The results database {where} is damaged ({first}). It was left "
            "unchanged. Restore it from a backup or point --db at another file.",
            "damaged",
        )


def check_server(engine: Engine, url: URL) -> None:
    """Connect once to a database server; one that cannot be reached, or that refuses the user,
    the password or the database, is refused with its host, port and database and what to
    check. Nothing is created on it."""
    try:
        with engine.connect():
            pass
    except DBAPIError as err:
        cause = (str(err.orig).strip().splitlines() or [type(err.orig).__name__])[0]
        port = url.port or {"postgresql": 5432}.get(url.get_backend_name())
        host = f"{url.host or 'localhost'}{f':{port}' if port else ''}"
        raise StoreError(
            f"Cannot connect to the results database {url.database!r} on {host} as user "
            f"{url.username!r} ({cause}). Check that the database server is running and "
            "accepts connections there, that the database exists (PostgreSQL: createdb), and "
            "that the user name and password in the URL are right. Nothing was created.",
            "unreachable",
        ) from None


def check_writable(engine: Engine, where: str) -> None:
    """Refuse, before anything is run, a database this process cannot write: a table is created
    inside a transaction that is then rolled back, so nothing is left behind either way."""
    if engine.dialect.name == "sqlite":
        # pysqlite never opens a transaction before DDL itself, so the probe opens one by hand.
        raw = engine.raw_connection()
        sqlite = raw.driver_connection
        try:
            sqlite.execute("BEGIN")
            try:
                sqlite.execute("CREATE TABLE _normbench_write_probe (x INTEGER)")
            finally:
                if sqlite.in_transaction:
                    sqlite.execute("ROLLBACK")
        except engine.dialect.dbapi.Error as err:
            raise describe(err, where) from None
        finally:
            raw.close()
        return
    try:
        with engine.connect() as conn, conn.begin() as transaction:
            conn.exec_driver_sql("CREATE TABLE _normbench_write_probe (x INTEGER)")
            transaction.rollback()
    except DBAPIError as err:  # a user without the right to create tables, a read-only server
        raise describe(err.orig, where) from None


def read_only(where: str, cause: str) -> StoreError:
    return StoreError(
        f"The results database {where} is read-only ({cause}), and this command writes results "
        "into it. Make the file and its folder writable, drop mode=ro from the URL, or point "
        "--db at a database you can write; `normbench leaderboard` and `normbench dashboard` "
        "read a read-only database as it is.",
        "readonly",
    )


def describe(error: BaseException, where: str) -> StoreError:
    """A one-paragraph message for a database error caused by the environment, with the driver's
    short cause (its first line) and without the statement that met it."""
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0]
    low = cause.lower()
    if "readonly" in low or "read-only" in low or "permission denied" in low:
        return read_only(where, cause)
    if "disk is full" in low or "no space" in low:
        return StoreError(
            f"The results database {where} cannot be written: the disk is full ({cause}). Free "
            "some space and run the command again; what was stored before is kept.",
            "full",
        )
    if "malformed" in low or "not a database" in low or "corrupt" in low:
        return StoreError(
            f"The results database {where} is damaged ({cause}). Restore it from a backup or "
            "point --db at another file.",
            "damaged",
        )
    if "locked" in low or "busy" in low:
        return StoreError(
            f"The results database {where} is locked by another process ({cause}). Run the "
            "command again when the other one has finished.",
            "locked",
        )
    if "unable to open" in low:
        return StoreError(
            f"Cannot open the results database {where} ({cause}). Check that its folder exists "
            "and that you may read it (and write it, for commands that store results).",
            "unusable",
        )
    return StoreError(f"Cannot use the results database {where} ({cause}).", "unusable")


def short_errors(engine: Engine, where: str) -> None:
    """Turn the engine's operational and database errors (the environment's fault: read-only,
    full, damaged, locked, unreachable) into a ``StoreError`` with the short cause. Integrity and
    programming errors are bugs in normbench and keep their traceback."""

    @event.listens_for(engine, "handle_error")
    def _short(context) -> None:
        if type(context.sqlalchemy_exception) in (OperationalError, DatabaseError):
            raise describe(context.original_exception, where) from None
