"""The results schema (SQLAlchemy 2.0 typed ORM). Alembic migrations in ``db/`` create it.

- ``runs``: one row per run key with its spec, status and provenance; ``variant`` labels a setting
  a suite sweeps within one norm and optimizer ("batch 8"), "" when it sweeps none.
- ``metrics``: one row per (run, metric, split, corruption, severity, layer, step), raw floats;
  corruption is "" and severity 0 for clean metrics, so corruption suites need no schema change;
  layer and step are -1 except for the probes' per-layer and per-step rows.
- ``curve_points``: per-epoch training curves.
- ``submissions``, ``norm_speed``: submitted norms' source, and measured norm speeds.

A ``running`` run is claimed: ``owner`` names the process that runs it and ``heartbeat`` is when
that process last showed it was alive, in epoch seconds of the database's clock (one clock for
every machine that shares the database). A claim whose heartbeat is older than the lease can be
taken over (see ``Store.claim_run``).

String lengths are limits on PostgreSQL (SQLite does not enforce them); the store refuses a value
that is too long with a clear message instead of a database error.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Enum,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


class RunStatus(enum.Enum):
    running = "running"
    finished = "finished"
    failed = "failed"
    diverged = "diverged"
    interrupted = "interrupted"


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_key: Mapped[str] = mapped_column(String(64), unique=True)
    suite: Mapped[str] = mapped_column(String(128))
    budget: Mapped[str] = mapped_column(String(32))
    protocol_version: Mapped[int]
    task: Mapped[str] = mapped_column(String(32))
    dataset: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    # A registered submission name (up to 160 characters) with options.
    norm: Mapped[str] = mapped_column(String(256))
    optimizer: Mapped[str] = mapped_column(String(256))
    seed: Mapped[int]
    # A short label for a setting the suite sweeps within one norm and optimizer ("batch 8",
    # "symmetric 40%"); "" when it sweeps none.
    variant: Mapped[str] = mapped_column(String(64), default="", server_default="")
    status: Mapped[RunStatus] = mapped_column(
        Enum(RunStatus, name="run_status", native_enum=False, length=16)
    )
    error: Mapped[str | None] = mapped_column(Text)
    diverged_step: Mapped[int | None]
    epochs_done: Mapped[int] = mapped_column(default=0)
    device: Mapped[str | None] = mapped_column(String(256))
    config: Mapped[dict[str, Any]]
    provenance: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    owner: Mapped[str | None] = mapped_column(String(128))
    heartbeat: Mapped[float | None] = mapped_column(Float)

    metrics: Mapped[list[Metric]] = relationship(
        back_populates="run", cascade="all, delete-orphan", passive_deletes=True
    )
    curve_points: Mapped[list[CurvePoint]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )

    __table_args__ = (Index("ix_runs_suite_budget_status", "suite", "budget", "status"),)


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(32), default="")
    corruption: Mapped[str] = mapped_column(String(64), default="")
    severity: Mapped[int] = mapped_column(default=0)
    # A probe's block or layer index and the training step it measured at; -1 for other rows.
    layer: Mapped[int] = mapped_column(default=-1, server_default="-1")
    step: Mapped[int] = mapped_column(default=-1, server_default="-1")
    value: Mapped[float] = mapped_column(Float)

    run: Mapped[Run] = relationship(back_populates="metrics")

    __table_args__ = (
        UniqueConstraint(
            "run_id", "name", "split", "corruption", "severity", "layer", "step",
            name="uq_metric_row",
        ),
        Index("ix_metrics_values", "name", "split", "corruption", "severity", "run_id", "value"),
    )  # fmt: skip


class CurvePoint(Base):
    __tablename__ = "curve_points"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    epoch: Mapped[int]
    name: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)

    __table_args__ = (UniqueConstraint("run_id", "epoch", "name", name="uq_curve_point"),)


class Artifact(Base):
    """A named binary output of a run that is looked at rather than ranked (a GAN run's sample
    grid, ``samples.png``)."""

    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    media_type: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (UniqueConstraint("run_id", "name", name="uq_artifact"),)


class Submission(Base):
    """A norm added with ``normbench submit``: its source text and contract report, so every run
    of it can be reproduced. ``name`` is the registered name, ``submission/<base>/v<version>``."""

    __tablename__ = "submissions"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(160), unique=True)
    base_name: Mapped[str] = mapped_column(String(128))
    version: Mapped[int]
    class_name: Mapped[str] = mapped_column(String(128))
    file_name: Mapped[str] = mapped_column(String(256))
    source: Mapped[str] = mapped_column(Text)
    source_sha256: Mapped[str] = mapped_column(String(64))
    contract: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("base_name", "version", name="uq_submission_version"),
        UniqueConstraint("base_name", "source_sha256", name="uq_submission_source"),
    )


class NormSpeed(Base):
    """Forward + backward throughput of a norm inside a fixed model, from ``normbench bench
    norms``, with its ratio to BatchNorm measured in the same process."""

    __tablename__ = "norm_speed"

    id: Mapped[int] = mapped_column(primary_key=True)
    norm: Mapped[str] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(128))
    batch_size: Mapped[int]
    device: Mapped[str] = mapped_column(String(256))
    images_per_s: Mapped[float] = mapped_column(Float)
    ratio_to_batchnorm: Mapped[float] = mapped_column(Float)
    peak_memory_mb: Mapped[float | None] = mapped_column(Float)
    param_count: Mapped[int]
    provenance: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_norm_speed_norm", "norm", "created_at"),)
