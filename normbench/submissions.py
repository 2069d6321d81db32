"""Norms from outside normbench: ``normbench submit`` and the ``normbench.norms`` entry points.

A submission is checked against the norm contract in a confined child process first; only a norm
that passes is recorded (source text, SHA-256, contract report) as
``submission/<name>/v<version>``. The same source again is the same submission; a changed source
becomes the next version, so every leaderboard row names the exact code behind it.

Submitted code never runs in the orchestrator (the process that holds the results database): a
recorded submission named in a run (``--norms submission/...``) is known there by name only, and
its stored source, re-hashed before every use, is loaded inside the run's confined worker.

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

from normbench.contract import ContractReport, load_class, parse_target, run_contract
from normbench.errors import NormbenchError
from normbench.norms import NORMS, parse_norm_name
from normbench.registry import EntryInfo

if TYPE_CHECKING:
    from normbench.store import Store

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


class SubmittedNorm:
    """Stands for a recorded submission in the orchestrator, which never runs submitted code:
    its class is loaded only inside the confined workers (``register_source``)."""

    deferred = True  # the registry names it with options without building it

    def __init__(self, *args, **kwargs) -> None:
        raise NormbenchError(
            f"{self.name} is a submitted norm: its code runs only in confined worker processes."
        )

    name = "a submission"


def _placeholder(name: str) -> type:
    return type("SubmittedNorm", (SubmittedNorm,), {"name": name, "__doc__": SubmittedNorm.__doc__})


def check_source(name: str, source: str, sha256: str) -> None:
    """Refuse a stored source whose SHA-256 is no longer the recorded one (the database was
    edited): it is never run."""
    if hashlib.sha256(source.encode()).hexdigest() != sha256:
        raise NormbenchError(
            f"The stored source of {name} does not match its recorded SHA-256 ({sha256[:12]}...): "
            "the database was changed after it was submitted. It is not run; submit the norm "
            "again."
        )


def register_source(
    name: str, class_name: str, source: str, source_sha256: str, folder: Path
) -> None:
    """Load a submitted norm from its stored source and register it, after re-hashing the
    source (inside a worker only: this executes the submitted code)."""
    check_source(name, source, source_sha256)
    path = folder / f"norm_{source_sha256[:16]}.py"  # a file, so tracebacks and getsource work
    path.write_text(source)
    cls, _ = load_class(f"{path}:{class_name}")
    NORMS.add(name, cls, entry_info(name, cls))


def register_recorded(store: Store, names: list[str] | None) -> list[dict]:
    """Make the recorded submissions among ``names`` known to the registry by name, without
    running their code (each gets a placeholder; its class is loaded only in workers), and return
    what a worker needs to load each one: name, class name, source and SHA-256. A source that no
    longer matches its hash is refused here."""
    bases = {parse_norm_name(n)[0] for n in names or ()}  # without any options
    wanted = sorted(n for n in bases if n.startswith(NAMESPACE))
    if not wanted:
        return []
    records = []
    for submission in store.submissions(wanted):
        check_source(submission.name, submission.source, submission.source_sha256)
        if submission.name not in NORMS:
            info = EntryInfo(
                submission.name, f"submitted norm {submission.class_name} ({submission.file_name})",
                "submission", frozenset(),
            )  # fmt: skip
            NORMS.add(submission.name, _placeholder(submission.name), info)
        records.append({
            "name": submission.name, "class_name": submission.class_name,
            "source": submission.source, "source_sha256": submission.source_sha256,
        })  # fmt: skip
    return records


def submit(store_url: str, target: str, name: str | None, timeout: float) -> tuple[str, bool]:
    """Check and record ``FILE:CLASS``; returns (registered name, whether it is new).

    The file is read once, here; exactly those bytes are checked (in a confined child process
    whose verdict the checker decides) and recorded. Raises ``NormbenchError`` with every reason
    when the norm is rejected; the database is not touched (not even created) before the contract
    holds.
    """
    path, class_name = parse_target(target)
    if not path.is_file():
        raise NormbenchError(f"{path} does not exist (from {target!r}).")
    base = base_name(target, name)
    source = path.read_bytes().decode("utf-8", errors="replace")  # exactly the file, CRLF kept
    report: ContractReport = run_contract(target, timeout=timeout, source=source)
    if not report.passed:
        raise NormbenchError(
            f"{target} is rejected; the norm contract does not hold:{report.failure_list()}"
        )
    from normbench.store import open_store

    store = open_store(store_url)
    return store.add_submission(
        base_name=base,
        class_name=class_name,
        file_name=path.name,
        source=source,
        source_sha256=hashlib.sha256(source.encode()).hexdigest(),
        contract=asdict(report),
    )
