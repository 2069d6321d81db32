"""Shared fixtures: isolated cache and database per test, and the real CIFAR-10 mirror when present.

The real data is looked up in ``NORMBENCH_TEST_DATA_DIR``, else ``../shared/data`` next to the
repository. Tests that need it skip with the reason when it is missing; the rest still run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


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
        pytest.skip(
            "real CIFAR-10 mirror not found: set NORMBENCH_TEST_DATA_DIR or place the data in "
            "../shared/data/cifar10 (Hugging Face parquet layout)"
        )
    monkeypatch.setenv("NORMBENCH_DATA_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def cifar_c_smoke_db(tmp_path_factory, session_cache) -> Path:
    """A results database written by a real ``cifar-c`` smoke run of batchnorm and layernorm with
    SGD, made once per session and shared read-only by the tests that inspect one."""
    data = shared_data_dir()
    if data is None:
        pytest.skip("real CIFAR-10 mirror not found: set NORMBENCH_TEST_DATA_DIR")
    from helpers import invoke

    db = tmp_path_factory.mktemp("cifar-c-smoke") / "results.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
        result = invoke(
            "run", "--suite=cifar-c", "--budget=smoke", "--norms=batchnorm,layernorm",
            "--optimizers=sgd", f"--db={db}", f"--data-dir={data}",
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    return db


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of small batched ops: a second thread only adds
    synchronisation, which stalls badly when the machine's cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
