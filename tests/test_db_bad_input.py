"""Results databases that are bad, read-only or missing, given to every command that touches one.

Each is refused with one paragraph that names the file or the option (exit status 2, never a
traceback), before any training starts, and every file is left exactly as it was: same bytes, no
file or folder added next to it. Databases are real: written through the store by the same code a
run uses, then damaged the way files get damaged (cut short, overwritten, replaced by text).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import invoke

from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.store import RunStatus, open_store

SPEC = {
    "suite": "cifar10", "budget": "smoke", "protocol_version": 2, "task": "classify",
    "dataset": "cifar10", "norm": "batchnorm", "optimizer": "sgd", "seed": 0,
    "settings": {"model": "fastnet"},
}  # fmt: skip


@pytest.fixture(scope="module")
def real_db(tmp_path_factory) -> Path:
    """A results database with finished runs, written through the store as runs write it."""
    path = tmp_path_factory.mktemp("real") / "results.db"
    store = open_store(f"sqlite:///{path}")
    for seed in range(40):
        spec, key = {**SPEC, "seed": seed}, f"run-{seed}"
        store.begin_run(spec, key, device="cpu", provenance={}, config=spec, reset=True)
        metrics = [MetricRow("accuracy", 0.5 + seed / 100, "test")] + [
            MetricRow("accuracy", 0.4, "test", "fog", s) for s in range(1, 6)
        ]
        curves = [(e, "train_loss", 2.0 / e) for e in range(1, 20)]
        store.finish_run(key, status=RunStatus.finished, metrics=metrics, curves=curves,
                         epochs_done=19)  # fmt: skip
    store.engine.dispose()  # the last connection checkpoints the WAL into the file and removes it
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.db"]
    return path


# Each bad input: how to make it in a folder (returns the --db value), the commands it applies to,
# and what the message must say.
Make = Callable[[Path, Path], str]


def text_file(folder: Path, real: Path) -> str:
    (folder / "results.db").write_text("norm,accuracy\nbatchnorm,0.91\n")
    return str(folder / "results.db")


def truncated(folder: Path, real: Path) -> str:
    data = real.read_bytes()
    (folder / "results.db").write_bytes(data[: len(data) // 2])
    return str(folder / "results.db")


def damaged_page(folder: Path, real: Path) -> str:
    """Whole length and a valid header, but the page holding the runs table overwritten."""
    path = folder / "results.db"
    shutil.copyfile(real, path)
    with sqlite3.connect(f"file:{real}?mode=ro", uri=True) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'runs'").fetchone()[0]
    with path.open("r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xab" * 200)
    return str(path)


def zero_bytes(folder: Path, real: Path) -> str:
    (folder / "results.db").touch()
    return str(folder / "results.db")


def missing_folder(folder: Path, real: Path) -> str:
    return "missing/dir/x.db"  # relative: the tests run in ``folder``


def one_slash(folder: Path, real: Path) -> str:
    return f"sqlite:{folder}/results.db"  # sqlite:/tmp/.../results.db


def no_slash(folder: Path, real: Path) -> str:
    return "sqlite:results.db"


def postgres_one_slash(folder: Path, real: Path) -> str:
    return "postgresql:/localhost/normbench"


def read_only_uri(folder: Path, real: Path) -> str:
    shutil.copyfile(real, folder / "results.db")
    return f"sqlite:///file:{folder / 'results.db'}?mode=ro&uri=true"


def read_only_file(folder: Path, real: Path) -> str:
    shutil.copyfile(real, folder / "results.db")
    (folder / "results.db").chmod(0o444)
    return str(folder / "results.db")


def read_only_folder(folder: Path, real: Path) -> str:
    (folder / "data").mkdir()
    shutil.copyfile(real, folder / "data" / "results.db")
    (folder / "data").chmod(0o555)
    return str(folder / "data" / "results.db")


def older_schema(folder: Path, real: Path) -> str:
    """A database that an older normbench wrote: schema revision 0001."""
    from alembic import command
    from sqlalchemy import create_engine

    from normbench.store import alembic_config

    path = folder / "results.db"
    engine, cfg = create_engine(f"sqlite:///{path}"), alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    engine.dispose()
    return str(path)


def newer_schema(folder: Path, real: Path) -> str:
    path = folder / "results.db"
    shutil.copyfile(real, path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'ffff'")
    conn.close()
    return str(path)


WRITE = ("run", "db upgrade")
READ = ("leaderboard", "dashboard")
ALL = WRITE + READ
CASES: dict[str, tuple[Make, tuple[str, ...], str]] = {
    "text file": (text_file, ALL, "is not a normbench results database: it is not an SQLite file"),
    "truncated": (truncated, ALL, "is damaged: it holds only"),
    "damaged page": (damaged_page, ALL, "is damaged ("),
    "zero bytes": (zero_bytes, READ, "is an empty file (0 bytes)"),
    "missing folder": (missing_folder, READ, "No results database at"),
    "one slash": (one_slash, ALL, "has no // after the scheme"),
    "no slash": (no_slash, ALL, "Did you mean sqlite:///results.db?"),
    "postgresql one slash": (postgres_one_slash, ALL, "has no // after the scheme"),
    "read-only URI": (read_only_uri, WRITE, "is read-only (the URL opens it with mode=ro)"),
    "read-only file": (read_only_file, WRITE, "is read-only (the file is not writable)"),
    "read-only folder": (read_only_folder, WRITE, "is read-only (its folder"),
    "older schema": (older_schema, READ, "Run `normbench db upgrade --db"),
    "newer schema": (newer_schema, ALL, "a newer normbench wrote it"),
}
NEEDS_PERMISSIONS = {"read-only file", "read-only folder"}


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port already taken: should the database check ever let a bad file through, the dashboard
    command stops at the port instead of starting a server."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        s.listen()
        yield s.getsockname()[1]


def command_args(command: str, db: str, port: int) -> list[str]:
    return {
        "run": ["run", "--suite=cifar10", "--budget=smoke", "--norms=batchnorm",
                "--optimizers=sgd", f"--db={db}"],
        "db upgrade": ["db", "upgrade", f"--db={db}"],
        "leaderboard": ["leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={db}"],
        "dashboard": ["dashboard", f"--db={db}", f"--port={port}"],
    }[command]  # fmt: skip


def can_drop_root() -> bool:
    """Whether ``unshare`` can run a command as an ordinary user (in a user namespace), for
    which file permissions hold, as they do not for root."""
    try:
        return subprocess.run([*UNSHARE, "true"], capture_output=True).returncode == 0
    except OSError:
        return False


UNSHARE = ["unshare", "--user", "--map-user=1000"]


def run_as_user(args: list[str]) -> SimpleNamespace:
    """The CLI in a child process run as an ordinary user (see ``can_drop_root``)."""
    done = subprocess.run([*UNSHARE, sys.executable, "-m", "normbench.cli", *args],
                          capture_output=True, text=True)  # fmt: skip
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    return SimpleNamespace(exit_code=done.returncode, output=output)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: the SHA-256 of each file's bytes, "dir" for
    folders."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        out[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def one_line(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(
    ("case", "command"),
    [(case, command) for case, (_, commands, _) in CASES.items() for command in commands],
)
def test_a_bad_database_is_refused_untouched(
    case, command, real_db, tmp_path, monkeypatch, busy_port
):
    as_root = case in NEEDS_PERMISSIONS and os.geteuid() == 0
    if as_root and not can_drop_root():
        pytest.skip("file permissions do not bind root, and no user namespace to drop it in")
    make, _, says = CASES[case]
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)  # relative paths, and a stray "sqlite:" folder, would land here
    db = make(folder, real_db)
    before = snapshot(folder)
    try:
        args = command_args(command, db, busy_port)
        result = run_as_user(args) if as_root else invoke(*args)
    finally:
        for path in folder.rglob("*"):  # let pytest clean up what the case made read-only
            path.chmod(0o755 if path.is_dir() else 0o644)
    message = one_line(result.output)
    assert result.exit_code == 2, result.output
    assert says in message
    named = db if "://" not in db else db.split("///", 1)[1].removeprefix("file:").split("?")[0]
    assert "--db" in message or str((folder / named).resolve()) in message
    assert "Plan:" not in message  # refused before any run was planned or started
    assert "INSERT" not in message and "SELECT" not in message
    assert snapshot(folder) == before


def test_an_unusable_value_of_normbench_db_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NORMBENCH_DB", "sqlite:/data/results.db")
    result = invoke("leaderboard", "--suite=cifar10", "--budget=smoke")
    assert result.exit_code == 2
    message = one_line(result.output)
    assert "NORMBENCH_DB 'sqlite:/data/results.db'" in message  # "--db / NORMBENCH_DB" too
    assert "Did you mean sqlite:////data/results.db?" in message
    assert list(tmp_path.iterdir()) == []


def test_a_zero_byte_file_is_an_empty_database_for_a_write_command(tmp_path):
    """SQLite takes an empty file for an empty database; a write command creates the schema in
    it (as `touch results.db && normbench run --db results.db` expects), a read command refuses
    it (see above)."""
    db = tmp_path / "results.db"
    db.touch()
    result = invoke("db", "upgrade", f"--db={db}")
    assert result.exit_code == 0, result.output
    assert db.read_bytes().startswith(b"SQLite format 3\x00")
    assert open_store(f"sqlite:///{db}", readonly=True).get_run("none") is None


def test_read_commands_read_a_read_only_database_and_never_change_it(real_db, tmp_path):
    db = tmp_path / "results.db"
    shutil.copyfile(real_db, db)
    before = db.read_bytes()
    for value in (str(db), f"sqlite:///file:{db}?mode=ro&uri=true"):
        result = invoke("leaderboard", "--suite=cifar10", "--budget=smoke", f"--db={value}",
                        "--format=json")  # fmt: skip
        assert result.exit_code == 0, result.output
        assert '"norm": "batchnorm"' in result.stdout
    assert db.read_bytes() == before
    # Reading a WAL database gives it SQLite's side files, nothing else.
    assert {p.name for p in tmp_path.iterdir()} <= {db.name, f"{db.name}-wal", f"{db.name}-shm"}


def test_no_sql_statement_reaches_the_user_from_the_store(real_db, tmp_path):
    db = tmp_path / "results.db"
    shutil.copyfile(real_db, db)
    store = open_store(f"sqlite:///{db}", readonly=True)
    spec = {**SPEC, "seed": 99}
    with pytest.raises(NormbenchError) as caught:
        store.begin_run(spec, "new", device="cpu", provenance={}, config=spec, reset=True)
    message = str(caught.value)
    assert "is read-only (attempt to write a readonly database)" in message
    assert "INSERT" not in message and "[SQL" not in message and "\n" not in message
    store.engine.dispose()


def test_a_database_damaged_after_it_was_opened_gives_a_short_message(real_db, tmp_path):
    db = tmp_path / "results.db"
    shutil.copyfile(real_db, db)
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA journal_mode=DELETE")  # each read checks the file's header
    conn.close()
    store = open_store(f"sqlite:///{db}", readonly=True)
    db.write_bytes(b"not a database any more" * 100)
    with pytest.raises(NormbenchError, match=r"is damaged \(file is not a database\)") as caught:
        store.get_run("run-1")
    assert "SELECT" not in str(caught.value)
    store.engine.dispose()
