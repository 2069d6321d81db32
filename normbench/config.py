"""Where normbench reads data and writes caches, checkpoints and results.

Every location is resolved in one place, in this order: an explicit argument (a CLI option), then
an environment variable, then a per-user default directory from ``platformdirs``:

- data directory: ``--data-dir`` / ``NORMBENCH_DATA_DIR`` (local dataset mirrors; optional)
- cache directory: ``NORMBENCH_CACHE_DIR``, default the user cache dir (decoded tensors,
  checkpoints, official downloads)
- results database: ``--db`` / ``NORMBENCH_DB`` (any SQLAlchemy URL or a file path), default
  ``normbench.db`` in the user data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "normbench"


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("NORMBENCH_DATA_DIR")
    return Path(value).expanduser().resolve() if value else None


def cache_dir() -> Path:
    value = os.environ.get("NORMBENCH_CACHE_DIR")
    path = Path(value).expanduser() if value else Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def default_db_path() -> Path:
    return Path(platformdirs.user_data_dir(APP)) / "normbench.db"


def db_url(explicit: str | None = None, *, create_parent: bool = True) -> str:
    """An SQLAlchemy URL; a bare path means an SQLite file at that path (whose folder is created
    unless ``create_parent`` is false, as for read-only use)."""
    value = explicit or os.environ.get("NORMBENCH_DB") or str(default_db_path())
    if "://" in value:
        return value
    path = Path(value).expanduser().resolve()
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
