"""Shared fixtures: isolated cache and database per test, and the real CIFAR-10 mirror when present.

The real data is looked up in ``NORMBENCH_TEST_DATA_DIR``, else ``../shared/data`` next to the
repository. A test that needs something the machine lacks (the data, the browser) calls
``skip_or_fail``: on a developer's machine it skips with the reason and the rest still run; in CI
it fails, so that a CI run cannot pass by testing nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MISSING_CIFAR = (
    "real CIFAR-10 mirror not found: set NORMBENCH_TEST_DATA_DIR to a folder holding cifar10/ "
    "(Hugging Face parquet layout), or place it in ../shared/data"
)


def in_ci() -> bool:
    """Whether the tests run in CI: ``CI`` is set (to anything but 0/false/no, as CI services
    set it), or ``NORMBENCH_TEST_DATA_DIR`` is, which says the data is meant to be there."""
    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return ci or bool(os.environ.get("NORMBENCH_TEST_DATA_DIR"))


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test with ``reason`` locally; fail it in CI (see ``in_ci``)."""
    if in_ci():
        pytest.fail(f"{reason} (in CI a test never skips for a missing resource)", pytrace=False)
    pytest.skip(reason)


def shared_data_dir() -> Path | None:
    value = os.environ.get("NORMBENCH_TEST_DATA_DIR")
    path = Path(value) if value else REPO.parent / "shared" / "data"
    return path if (path / "cifar10").is_dir() else None


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    """One cache directory for the whole session, so real CIFAR-10 is decoded once."""
    return tmp_path_factory.mktemp("normbench-cache")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path, session_cache) -> None:
    monkeypatch.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
    monkeypatch.setenv("NORMBENCH_DB", str(tmp_path / "results.db"))
    monkeypatch.delenv("NORMBENCH_DATA_DIR", raising=False)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps at 80 columns otherwise


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path) -> Path:
    """A private, empty cache directory (for tests of the cache itself)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("NORMBENCH_CACHE_DIR", str(path))
    return path


@pytest.fixture
def cifar_dir(monkeypatch) -> Path:
    path = shared_data_dir()
    if path is None:
        skip_or_fail(MISSING_CIFAR)
    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(path))
    return path


def smoke_db(tmp_path_factory, session_cache: Path, suite: str, norms: str) -> Path:
    """A results database written by a real smoke run of ``suite`` (``norms`` with SGD, seed 0)
    on the shared CIFAR-10 data, with the session's dataset cache."""
    data = shared_data_dir()
    if data is None:
        skip_or_fail(MISSING_CIFAR)
    from helpers import invoke

    db = tmp_path_factory.mktemp(f"{suite}-smoke") / "results.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
        result = invoke(
            "run", f"--suite={suite}", "--budget=smoke", f"--norms={norms}",
            "--optimizers=sgd", "--seeds=0", f"--db={db}", f"--data-dir={data}",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture(scope="session")
def cifar_c_smoke_db(tmp_path_factory, session_cache) -> Path:
    """A results database written by a real ``cifar-c`` smoke run of batchnorm and layernorm with
    SGD, made once per session and shared read-only by the tests that inspect one."""
    return smoke_db(tmp_path_factory, session_cache, "cifar-c", "batchnorm,layernorm")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of small batched ops: a second thread only adds
    synchronisation, which stalls badly when the machine's cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- results databases: SQLite files and a real PostgreSQL server ------------------------------

MISSING_POSTGRES = (
    "no PostgreSQL server for the tests: set NORMBENCH_TEST_POSTGRES_URL to an admin URL "
    "(postgresql+psycopg://USER@HOST:PORT/postgres, a user that may create databases), or install "
    "the server (apt-get install postgresql) so that tests/pgserver.py starts one"
)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The admin URL of a PostgreSQL server: ``NORMBENCH_TEST_POSTGRES_URL`` when set (CI starts
    one), else a throwaway one started from the installed binaries for this session."""
    given = os.environ.get("NORMBENCH_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    import pgserver

    if pgserver.binaries() is None:
        skip_or_fail(MISSING_POSTGRES)
    # Not under pytest's temporary folder: its parents are private to this user, and as root the
    # server runs as the postgres user, which must reach the folder.
    folder = Path(tempfile.mkdtemp(prefix="normbench-pg-"))
    try:
        yield pgserver.start(folder)
    finally:
        pgserver.stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """A fresh, empty database on the test server for one test, dropped after it."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    name = f"normbench_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A new results database URL on each backend: an SQLite file that does not exist yet, and
    an empty PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    return request.getfixturevalue("postgres_url")
