"""The built-in suite catalogue and the names and limits the command line checks before any work.

This module imports neither torch nor pydantic, so ``normbench list suites``, every ``--help``
and every argument error answer at once. Loading and validating a suite file, and planning its
runs, is ``normbench.suites`` (which re-exports everything here).
"""

from __future__ import annotations

import contextlib
import tomllib
from pathlib import Path

from normbench.registry import EntryInfo, Registry

BUILTIN_DIR = Path(__file__).parent / "suites"
#: Budget names, from the shortest recipe to the longest.
BUDGETS = ("smoke", "laptop", "cpu", "gpu", "full")
#: The largest seed a run accepts (the smallest is 0). Seeds are stored in an SQL INTEGER column,
#: which is 32-bit signed on PostgreSQL (up to 2**31 - 1; SQLite's is 64-bit), and they seed
#: torch's generators (up to 2**64 - 1) and numpy-style generators (up to 2**32 - 1), so the
#: database is the tightest limit. A larger seed is refused up front instead of failing when its
#: run is written.
MAX_SEED = 2**31 - 1

SUITES: Registry[Path] = Registry("suite")


def _register_builtin_suites() -> None:
    for path in sorted(BUILTIN_DIR.glob("*.toml")):
        description, task = "", "classify"
        with contextlib.suppress(tomllib.TOMLDecodeError):  # reported in full when loaded
            raw = tomllib.loads(path.read_text())
            description, task = raw.get("description", ""), raw.get("task", task)
        SUITES.add(path.stem, path, EntryInfo(path.stem, description, task))


_register_builtin_suites()
