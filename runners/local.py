"""The local launcher: runs a list of RunSpecs one after another in this process.

Per run it decides skip / resume / fresh start from the run key, records the status transitions
in the store, and keeps going when one run fails. Ctrl-C marks the current run ``interrupted``
(its last epoch checkpoint stays in the cache) and stops; the same command resumes it.
Database writes are shielded from Ctrl-C so an interrupt never lands mid-transaction.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from normbench import config
from normbench import metrics as M
from normbench.errors import NormbenchError
from normbench.runtime import provenance
from normbench.store import RunStatus, Store
from normbench.suites import RunSpec
from runners import classify


@dataclass(frozen=True)
class Outcome:
    spec: RunSpec
    status: str  # finished, diverged, failed, skipped
    detail: str = ""


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT until the block is done (used around database writes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def checkpoint_path(key: str) -> Path:
    return config.cache_dir() / "checkpoints" / f"{key}.pt"


def label(spec: RunSpec) -> str:
    return f"{spec.norm} + {spec.optimizer} (seed {spec.seed})"


def run_specs(
    specs: list[RunSpec],
    store: Store,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    force: bool = False,
    console: Console | None = None,
) -> list[Outcome]:
    console = console or Console(stderr=True)
    outcomes: list[Outcome] = []
    for spec in specs:
        key, ckpt = spec.key, checkpoint_path(spec.key)
        existing = store.get_run(key)
        if existing is not None and existing.status is RunStatus.finished and not force:
            console.print(
                f"[dim]skip[/dim] {label(spec)}: already finished (run {key}; --force re-runs it)"
            )
            outcomes.append(Outcome(spec, "skipped"))
            continue
        if force:
            ckpt.unlink(missing_ok=True)
        resuming = ckpt.exists()
        with deferred_interrupt():
            store.begin_run(
                spec.to_dict(),
                key,
                device=str(device),
                provenance=provenance(device),
                config={**spec.to_dict(), "protocol": spec.protocol},
                reset=not resuming,
            )
        console.print(
            f"[bold]{'resume' if resuming else 'run'}[/bold] {label(spec)} "
            f"[dim]{spec.suite}/{spec.budget}, run {key}[/dim]"
        )
        try:
            result = _run_with_progress(spec, device, data_dir, ckpt, console, store)
        except KeyboardInterrupt:
            with deferred_interrupt():
                store.mark(
                    key,
                    RunStatus.interrupted,
                    "interrupted; re-run the same command to resume from the last epoch",
                )
            raise
        except NormbenchError as err:
            # A problem with the user's input or environment (e.g. missing data) would fail every
            # run the same way: record it and stop the suite with the message.
            with deferred_interrupt():
                store.mark(key, RunStatus.failed, str(err))
            raise
        except Exception as err:  # noqa: BLE001 - one broken run must not end the suite
            detail = "".join(traceback.format_exception_only(err)).strip()
            with deferred_interrupt():
                store.mark(key, RunStatus.failed, traceback.format_exc())
            console.print(f"[red]failed[/red] {label(spec)}: {detail}")
            outcomes.append(Outcome(spec, "failed", detail))
            continue
        with deferred_interrupt():
            stored = _finish(
                store,
                key,
                status=RunStatus(result.status),
                metrics=result.metrics,
                curves=result.curves,
                epochs_done=result.epochs_done,
                diverged_step=result.diverged_step,
                error=result.reason,
                provenance_update=result.info,
            )
        if not stored:
            console.print(f"[red]failed[/red] {label(spec)}: its results could not be stored")
            outcomes.append(Outcome(spec, "failed", "results could not be stored"))
            continue
        ckpt.unlink(missing_ok=True)
        values = {m.name: m.value for m in result.metrics if not m.corruption}
        if result.status == "finished":
            detail = (
                f"accuracy {values[M.ACCURACY]:.2%}, wall time {values[M.WALL_TIME]:.0f} s, "
                f"{values.get(M.TRAIN_THROUGHPUT, float('nan')):.0f} train images/s"
            )
            console.print(f"[green]done[/green] {label(spec)}: {detail}")
        else:
            detail = result.reason or ""
            console.print(f"[yellow]{result.status}[/yellow] {label(spec)}: {detail}")
        outcomes.append(Outcome(spec, result.status, detail))
    return outcomes


def _finish(store: Store, key: str, **fields) -> bool:
    """Store a run's results; if that fails, record the failure instead of leaving it running."""
    try:
        store.finish_run(key, **fields)
    except Exception:  # noqa: BLE001 - the run must not stay "running"
        store.mark(key, RunStatus.failed, "storing the results failed:\n" + traceback.format_exc())
        return False
    return True


def _run_with_progress(
    spec: RunSpec,
    device: torch.device,
    data_dir: str | Path | None,
    ckpt: Path,
    console: Console,
    store: Store,
) -> classify.RunResult:
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("preparing data", total=None)
        eval_task = bar.add_task("evaluating", total=None, visible=False)

        def on_start(epochs: int, steps_per_epoch: int) -> None:
            bar.update(
                task,
                description=f"training {label(spec)}",
                total=epochs * steps_per_epoch,
                completed=0,
            )

        def on_epoch(epoch: int, values: dict[str, float]) -> None:
            with deferred_interrupt():
                store.record_epoch(spec.key, epoch)
            console.print(
                f"  epoch {epoch}/{spec.settings['epochs']}: train loss "
                f"{values['train_loss']:.3f}, test accuracy {values['test_accuracy']:.2%}"
            )

        def on_eval_batch(done: int, total: int) -> None:
            bar.update(eval_task, completed=done, total=total, visible=done < total)

        hooks = classify.Progress(
            on_start=on_start,
            on_step=lambda step: bar.advance(task),
            on_epoch=on_epoch,
            on_eval_batch=on_eval_batch,
        )
        return classify.run(spec, device=device, data_dir=data_dir, checkpoint=ckpt, progress=hooks)
