"""The local launcher: runs a list of RunSpecs one after another in this process.

Before the first run it loads (and on first use decodes) the datasets the runs need and prepares
their corruption sets, so that a missing or damaged data file stops the suite before anything is
written to the store; then it prints the plan: which runs are skipped (already finished), which
resume from a checkpoint, and the estimated time of each and of the whole suite on this machine
(``normbench.estimate``). Per run it records the status transitions in the store, and keeps
going when one run fails. A live display on the console (transient, so piped output holds only
the log lines) shows run k of N, the phase, images/s and the time left for the run and for the
suite. Ctrl-C marks the current run ``interrupted`` (its last epoch checkpoint stays in the
cache) and stops; the same command resumes it. Database writes are shielded from Ctrl-C so an
interrupt never lands mid-transaction.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from normbench import config, estimate, progress
from normbench import metrics as M
from normbench.data import ArrayDataset, load_dataset
from normbench.errors import NormbenchError
from normbench.estimate import Estimate, Rates, RunClock
from normbench.progress import format_duration
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


@dataclass(frozen=True)
class DataInfo:
    """What the plan needs to know of a dataset the runs use."""

    train_size: int
    test_size: int
    image_shape: tuple[int, ...]
    num_classes: int


def check_data(specs: list[RunSpec], data_dir: str | Path | None) -> dict[str, DataInfo]:
    """Load every dataset the runs need (decoding it into the cache on first use) and prepare
    their corruption sets, before anything is written to the store: a missing or damaged data
    file stops the suite here, with its message, and leaves the database as it was."""
    info: dict[str, DataInfo] = {}
    tests: dict[str, ArrayDataset] = {}  # each test set loaded once, for the corruption sets below
    prepared: set[tuple[str, int]] = set()
    for spec in specs:
        if spec.dataset not in info:
            train = load_dataset(spec.dataset, "train", data_dir)
            tests[spec.dataset] = test = load_dataset(spec.dataset, "test", data_dir)
            info[spec.dataset] = DataInfo(
                len(train), len(test), tuple(train.images.shape[1:]), len(train.classes)
            )
            del train  # a large array; the runs load their own from the cache
        test = tests[spec.dataset]
        corruptions = spec.settings.get("corruption_set")
        if corruptions and (corruptions, spec.settings["corruption_subset"]) not in prepared:
            classify.corruption_source(spec, test, data_dir)  # generated here, on first use
            prepared.add((corruptions, spec.settings["corruption_subset"]))
    return info


@dataclass
class Planned:
    """One spec of the suite: its place, whether it is skipped or resumes, and its estimate."""

    index: int  # 1-based, among all the suite's specs
    spec: RunSpec
    skip: bool = False
    resume_epoch: int | None = None  # epochs a checkpoint holds, for a run that resumes
    estimate: Estimate | None = None


def plan_runs(specs: list[RunSpec], store: Store, force: bool) -> list[Planned]:
    """Which runs are skipped (finished, unless ``force``) and which resume from a checkpoint."""
    planned = []
    for i, spec in enumerate(specs, 1):
        existing = store.get_run(spec.key)
        if existing is not None and existing.status is RunStatus.finished and not force:
            planned.append(Planned(i, spec, skip=True))
            continue
        resume = None
        if not force and checkpoint_path(spec.key).exists():
            resume = existing.epochs_done if existing is not None else 0
        planned.append(Planned(i, spec, resume_epoch=resume))
    return planned


def estimate_runs(
    planned: list[Planned],
    store: Store,
    device: torch.device,
    data: dict[str, DataInfo],
    here: dict,
) -> None:
    """Each remaining run's estimated seconds: from the earlier runs with its settings on this
    machine (``here``: its provenance), else calibrated (once per norm and model setting)."""
    calibrated: dict[tuple, tuple[Rates | None, str]] = {}
    for p in (p for p in planned if not p.skip):
        spec, d = p.spec, data[p.spec.dataset]
        found = estimate.from_history(store, spec, here, d.train_size, d.test_size)
        if found is not None:
            rates, n = found
            basis = f"from {n} earlier run{'s' if n > 1 else ''}"
        else:
            s = spec.settings
            key = (spec.dataset, spec.norm, s["model"], repr(s["model_args"]), s["batch_size"],
                   s["eval_batch_size"], s["precision"])  # fmt: skip
            if key not in calibrated:
                calibrated[key] = _calibrate(spec, device, d)
            rates, basis = calibrated[key]
        breakdown = None
        if rates is not None:
            breakdown = estimate.run_breakdown(
                spec, rates, d.train_size, d.test_size, p.resume_epoch or 0
            )
        p.estimate = Estimate(breakdown, rates, basis)


def _calibrate(spec: RunSpec, device: torch.device, d: DataInfo) -> tuple[Rates | None, str]:
    with progress.task(f"timing {spec.norm} for the estimate", total=None):
        try:
            rates = estimate.calibrate(spec, device, d.image_shape, d.num_classes)
        except Exception as err:  # noqa: BLE001 - the run itself will report what is wrong
            cause = (str(err).splitlines() or [type(err).__name__])[0][:80]
            return None, f"not estimated (timing it failed: {cause})"
    return rates, (
        f"calibrated: {rates.train:,.0f} training, {rates.evaluation:,.0f} evaluation images/s"
    )


def print_plan(planned: list[Planned], device: torch.device, console: Console) -> None:
    """The plan: how many runs are skipped, resume or start, each run's estimate and the total."""
    todo = [p for p in planned if not p.skip]
    skipped = len(planned) - len(todo)
    resuming = sum(p.resume_epoch is not None for p in todo)
    parts = [f"{skipped} already finished (skipped)"] if skipped else []
    parts += (
        [f"{resuming} resume{'s' if resuming == 1 else ''} from a checkpoint"] if resuming else []
    )
    starting = len(todo) - resuming
    parts += [f"{starting} start{'s' if starting == 1 else ''}"] if starting else []
    n = len(planned)
    head = f"Plan: {n} run{'s' if n != 1 else ''} on {device}: {', '.join(parts)}"
    if not todo:
        console.print(f"{head}; nothing to run.")
        return
    known = [p.estimate.seconds for p in todo if p.estimate.seconds is not None]
    total = f"about {format_duration(sum(known))}" if known else "unknown"
    if 0 < len(known) < len(todo):
        total = f"at least {format_duration(sum(known))} ({len(todo) - len(known)} not estimated)"
    console.print(f"{head}. Estimated time on this machine: {total}.", highlight=False)
    width = max(len(label(p.spec)) for p in todo)
    for p in todo:
        resumes = ""
        if p.resume_epoch is not None:
            resumes = f"resumes after epoch {p.resume_epoch}/{p.spec.settings['epochs']}; "
        console.print(
            f"  run {f'{p.index}/{n}':>{2 * len(str(n)) + 1}}  {label(p.spec):<{width}}  "
            f"~{format_duration(p.estimate.seconds):<12} {resumes}{p.estimate.basis}",
            markup=False,
            highlight=False,
        )


def run_specs(
    specs: list[RunSpec],
    store: Store,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    force: bool = False,
    console: Console | None = None,
) -> list[Outcome]:
    """Run ``specs`` one after another: check the data, print the plan with its estimate, then
    run each (skip, resume or start) with a live display of its progress and the time left."""
    console = console or Console(stderr=True)
    with progress.display(console) as live:
        planned = plan_runs(specs, store, force)
        data = check_data([p.spec for p in planned if not p.skip], data_dir)
        here = provenance(device)
        estimate_runs(planned, store, device, data, here)
        print_plan(planned, device, console)
        return _run_planned(planned, store, device, data_dir, force, console, live, here)


def _run_planned(
    planned: list[Planned],
    store: Store,
    device: torch.device,
    data_dir: str | Path | None,
    force: bool,
    console: Console,
    live: Progress,
    here: dict,
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    factor = 1.0  # how much slower than estimated the runs so far went
    for p in planned:
        spec = p.spec
        key, ckpt = spec.key, checkpoint_path(spec.key)
        if p.skip:
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
                provenance=here,
                config={**spec.to_dict(), "protocol": spec.protocol},
                reset=not resuming,
            )
        console.print(
            f"[bold]{'resume' if resuming else 'run'}[/bold] {label(spec)} "
            f"[dim]{spec.suite}/{spec.budget}, run {key}[/dim]"
        )
        later = sum(q.estimate.seconds or 0.0 for q in planned if q.index > p.index and not q.skip)
        est = p.estimate
        clock = RunClock(
            est.breakdown,
            est.rates.train if est.rates else None,
            spec.settings["batch_size"],
            later=later,
            factor=factor,
        )
        shown = RunDisplay(live, p.index, len(planned), spec, clock, console, store)
        try:
            result = classify.run(
                spec, device=device, data_dir=data_dir, checkpoint=ckpt, progress=shown.hooks()
            )
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
        finally:
            shown.close()
        if clock.measured_rate is not None and clock.rate:
            factor = clock.factor
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
            estimated = ""
            if est.seconds is not None:
                estimated = f" (estimated {format_duration(est.seconds)})"
            detail = (
                f"accuracy {values[M.ACCURACY]:.2%}, wall time {values[M.WALL_TIME]:.0f} s"
                f"{estimated}, {values.get(M.TRAIN_THROUGHPUT, float('nan')):.0f} train images/s"
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


class RunDisplay:
    """The running run's line in the live display: run k of N, the pair, the phase (epoch e/E,
    evaluation, corruptions, speed check), training images/s, and the time left for the run
    and the suite (from its ``RunClock``). Fields are refreshed at most every 0.1 s; the
    per-epoch log lines are printed above the display."""

    def __init__(
        self,
        live: Progress,
        index: int,
        count: int,
        spec: RunSpec,
        clock: RunClock,
        console: Console,
        store: Store,
    ) -> None:
        self.live, self.spec, self.clock = live, spec, clock
        self.console, self.store = console, store
        self.name = f"run {index}/{count} {escape(label(spec))}"
        self.epochs = spec.settings["epochs"]
        self.steps_per_epoch = 1
        self.first_step = 0  # steps done before this session (a resumed run)
        self.phase = "loading data"
        self.last_render = 0.0
        self.task = live.add_task(self.name, total=None, rate="", left=self._left())

    def _restart(self, total: float | None) -> None:
        """A fresh bar for the next phase (rich cannot set a task's total back to unknown)."""
        self.live.remove_task(self.task)
        self.task = self.live.add_task(self.name, total=total, rate="", left=self._left())

    def _left(self) -> str:
        run, suite = self.clock.run_left(), self.clock.suite_left()
        if run is None:
            return "time left unknown"
        text = f"run ~{format_duration(run)} left"
        if suite is not None and self.clock.later > 0:
            text += f", suite ~{format_duration(suite)} left"
        return text

    def render(self, force: bool = False, **fields) -> None:
        now = time.monotonic()
        if not force and now - self.last_render < 0.1:
            if fields:
                self.live.update(self.task, **fields)
            return
        self.last_render = now
        rate = self.clock.measured_rate if self.phase.startswith("epoch") else None
        self.live.update(
            self.task,
            description=f"{self.name}: {self.phase}",
            rate=f"{rate:,.0f} training images/s" if rate else "",
            left=self._left(),
            **fields,
        )
        if force:
            self.live.refresh()  # phase changes show at once, not at the next 0.1 s tick

    def hooks(self) -> classify.Progress:
        def on_start(epochs: int, steps_per_epoch: int) -> None:
            self.steps_per_epoch = steps_per_epoch
            self.first_step = (self.epochs - epochs) * steps_per_epoch
            self.clock.start(epochs, steps_per_epoch)
            self.phase = f"epoch {self.epochs - epochs + 1}/{self.epochs}"
            self.render(force=True, total=epochs * steps_per_epoch, completed=0)

        def on_step(step: int) -> None:
            self.clock.step()
            self.phase = f"epoch {(step - 1) // self.steps_per_epoch + 1}/{self.epochs}"
            self.render(completed=step - self.first_step)

        def on_epoch(epoch: int, values: dict[str, float]) -> None:
            with deferred_interrupt():
                self.store.record_epoch(self.spec.key, epoch)
            self.console.print(
                f"  epoch {epoch}/{self.epochs}: train loss "
                f"{values['train_loss']:.3f}, test accuracy {values['test_accuracy']:.2%}"
            )

        def on_eval_batch(done: int, total: int) -> None:
            self.clock.evaluating(done, total)
            self.phase = self.phase.split(",")[0] + f", evaluating {done}/{total} batches"
            self.render(force=done == total)

        def on_corruption(done: int, total: int) -> None:
            self.clock.corruption(done, total)
            name = self.spec.settings.get("corruption_set") or "corruptions"
            self.phase = f"evaluating {name}"
            self.render(force=True, total=total, completed=done)

        def on_speed_check() -> None:
            self.clock.speed_check()
            self.phase = "speed check against BatchNorm"
            self._restart(total=None)
            self.render(force=True)

        return classify.Progress(
            on_start=on_start,
            on_step=on_step,
            on_epoch=on_epoch,
            on_eval_batch=on_eval_batch,
            on_corruption=on_corruption,
            on_speed_check=on_speed_check,
        )

    def close(self) -> None:
        self.live.remove_task(self.task)
