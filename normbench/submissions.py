"""Norms from outside normbench: ``normbench submit`` and the ``normbench.norms`` entry points.

A submission is checked against the norm contract in a child process first; only a norm that
passes is recorded (source text, SHA-256, contract report) and registered as
``submission/<name>/v<version>``. The same source again is the same submission; a changed source
becomes the next version, so every leaderboard row names the exact code behind it. Recorded
submissions named in a run (``--norms submission/...``) are registered again from their stored
source, so an interrupted submission run resumes like any other.

Installed packages add norms through the ``normbench.norms`` entry-point group: each entry point
names a norm class (``name = "package.module:Class"``); its docstring's first line is the
description, and the class attributes ``family`` and ``capabilities`` fill the registry info.
Loading them does not import the database layer: only recording and reading submissions do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING

from normbench import config
from normbench.contract import ContractReport, load_class, parse_target, run_contract
from normbench.errors import NormbenchError
from normbench.norms import NORMS, parse_norm_name
from normbench.registry import EntryInfo

if TYPE_CHECKING:
    from normbench.store import Store, Submission

NAMESPACE = "submission/"
ENTRY_POINT_GROUP = "normbench.norms"
_NAME = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")


def entry_info(name: str, cls: type) -> EntryInfo:
    doc = (cls.__doc__ or "").strip().splitlines()
    return EntryInfo(
        name,
        doc[0] if doc else cls.__name__,
        str(getattr(cls, "family", "") or ""),
        frozenset(getattr(cls, "capabilities", ()) or ()),
    )


def load_entry_point_norms() -> list[str]:
    """Register the norms installed packages declare; returns the names added."""
    added = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in NORMS:
            continue
        try:
            cls = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must not break normbench
            raise NormbenchError(
                f"The norm entry point {ep.name!r} ({ep.value}) does not load: "
                f"{type(err).__name__}: {err}"
            ) from None
        NORMS.add(ep.name, cls, entry_info(ep.name, cls))
        added.append(ep.name)
    return added


def base_name(target: str, name: str | None) -> str:
    _, class_name = parse_target(target)
    base = (name or class_name).lower()
    if not _NAME.match(base):
        raise NormbenchError(
            f"{base!r} is not a usable norm name: use lowercase letters, digits, '_' and '-', "
            "starting with a letter (at most 64 characters)."
        )
    if base in NORMS:
        raise NormbenchError(
            f"A norm named {base!r} already exists in normbench; submit under another --name."
        )
    return base


def _module_file(sha256: str, source: str) -> Path:
    """The stored source as a file in the cache (so tracebacks and inspect.getsource work)."""
    folder = config.cache_dir() / "submissions"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"norm_{sha256[:16]}.py"
    if not path.exists() or path.read_text() != source:
        path.write_text(source)
    return path


def register(submission: Submission) -> None:
    """Register a recorded submission under its name (no-op when it already is)."""
    if submission.name in NORMS:
        return
    path = _module_file(submission.source_sha256, submission.source)
    cls, _ = load_class(f"{path}:{submission.class_name}")
    NORMS.add(submission.name, cls, entry_info(submission.name, cls))


def register_recorded(store: Store, names: list[str] | None) -> None:
    """Register the recorded submissions among ``names`` (others are left alone, so one whose
    code no longer imports only stops the runs that ask for it)."""
    bases = {parse_norm_name(n)[0] for n in names or ()}  # without any options
    wanted = [n for n in bases if n.startswith(NAMESPACE) and n not in NORMS]
    if not wanted:
        return
    from sqlalchemy import select

    from normbench.store import Submission

    with store.session() as s:
        for submission in s.scalars(select(Submission).where(Submission.name.in_(wanted))):
            register(submission)


def submit(db: str | None, target: str, name: str | None, timeout: float) -> tuple[str, bool]:
    """Check and record ``FILE:CLASS``; returns (registered name, whether it is new).

    Raises ``NormbenchError`` with every reason when the norm is rejected; the database is not
    touched (not even created) before the contract holds.
    """
    path, class_name = parse_target(target)
    if not path.is_file():
        raise NormbenchError(f"{path} does not exist (from {target!r}).")
    base = base_name(target, name)
    report: ContractReport = run_contract(target, timeout=timeout)
    if not report.passed:
        raise NormbenchError(
            f"{target} is rejected; the norm contract does not hold:{report.failure_list()}"
        )
    source = path.read_text()
    digest = hashlib.sha256(source.encode()).hexdigest()
    from sqlalchemy import func, select

    from normbench.store import Submission, open_store

    store = open_store(config.db_url(db))
    with store.session() as s, s.begin():
        same = s.scalar(
            select(Submission).where(
                Submission.base_name == base, Submission.source_sha256 == digest
            )
        )
        if same is not None:
            register(same)
            return same.name, False
        version = (
            s.scalar(select(func.max(Submission.version)).where(Submission.base_name == base)) or 0
        ) + 1
        submission = Submission(
            name=f"{NAMESPACE}{base}/v{version}",
            base_name=base,
            version=version,
            class_name=class_name,
            file_name=path.name,
            source=source,
            source_sha256=digest,
            contract=asdict(report),
        )
        s.add(submission)
    register(submission)
    return submission.name, True
