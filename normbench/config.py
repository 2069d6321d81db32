"""Where normbench reads data and writes caches, checkpoints and results.

Every location is resolved in one place, in this order: an explicit argument (a CLI option), then
an environment variable, then a per-user default directory from ``platformdirs``:

- data directory: ``--data-dir`` / ``NORMBENCH_DATA_DIR`` (local dataset mirrors; optional)
- cache directory: ``NORMBENCH_CACHE_DIR``, default the user cache dir (decoded tensors,
  checkpoints, official downloads)
- checkpoints: ``--checkpoint-dir`` / ``NORMBENCH_CHECKPOINT_DIR``, default ``checkpoints`` in the
  cache directory (put it on shared storage so a run resumes on another machine)
- results database: ``--db`` / ``NORMBENCH_DB`` (any SQLAlchemy URL or a file path), default
  ``normbench.db`` in the user data dir.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import platformdirs

from normbench.errors import NormbenchError

APP = "normbench"


def data_dir(explicit: str | Path | None = None) -> Path | None:
    value = explicit or os.environ.get("NORMBENCH_DATA_DIR")
    return Path(value).expanduser().resolve() if value else None


def cache_dir() -> Path:
    value = os.environ.get("NORMBENCH_CACHE_DIR")
    path = Path(value).expanduser() if value else Path(platformdirs.user_cache_dir(APP))
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def checkpoint_dir(explicit: str | Path | None = None) -> Path:
    value = explicit or os.environ.get("NORMBENCH_CHECKPOINT_DIR")
    path = Path(value).expanduser() if value else cache_dir() / "checkpoints"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def default_db_path() -> Path:
    return Path(platformdirs.user_data_dir(APP)) / "normbench.db"


#: "scheme:" at the start of a value: what a database URL begins with. One letter is a Windows
#: drive ("C:"), not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


def db_url(explicit: str | None = None, *, create_parent: bool = True) -> str:
    """An SQLAlchemy URL; a bare path means an SQLite file at that path (whose folder is created
    unless ``create_parent`` is false, as for read-only use: then nothing is created).

    A value that starts like a URL but lacks the ``//`` after its scheme (``sqlite:/data/x.db``)
    is refused: taken as a path it would become a folder named ``sqlite:``."""
    value = explicit or os.environ.get("NORMBENCH_DB") or str(default_db_path())
    if "://" in value:
        return value
    scheme = _SCHEME.match(value)
    if scheme:
        env = os.environ.get("NORMBENCH_DB")
        # The CLI may read the variable into --db itself; then either may have given the value.
        source = "--db" if explicit and explicit != env else "NORMBENCH_DB"
        source = "--db / NORMBENCH_DB" if explicit and explicit == env else source
        rest = value[scheme.end() :]
        if scheme.group(1).lower() == "sqlite":  # the URL the value was most likely meant as
            hint = f" Did you mean sqlite:///{rest}?"
        elif "/" not in value:
            hint = f" A file whose name holds a colon can be given as ./{value}."
        else:
            hint = ""
        raise NormbenchError(
            f"{source} {value!r} starts like a database URL ({scheme.group(1)}:) but has no // "
            "after the scheme. Write an SQLite file as sqlite:////absolute/path.db (four "
            "slashes) or sqlite:///relative/path.db (three), or give just the file path; other "
            f"databases as postgresql://user@host/name.{hint}"
        )
    path = Path(value).expanduser().resolve()
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"
