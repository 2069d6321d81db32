"""The suite runner: plan, claim, execute, record, derive. The only writer of the results store.

Before the first run it loads (and on first use decodes) the datasets the runs need and prepares
their corruption sets, so that a missing or damaged data file stops the suite before anything is
written to the store; then it prints the plan: which runs are skipped (already finished), which
resume from a checkpoint, which other processes hold, and the estimated time of each and of the
whole suite on this machine (``normbench.estimate``).

Each run is then *claimed* in the store (atomically, with this process's owner id and a
heartbeat lease, so several ``normbench run`` processes on one database divide a suite between
them; a claim whose heartbeat went stale is taken over and resumed from its checkpoint) and
handed to an executor (``runners.executor``: a confined worker process per run, or a Ray task),
which streams progress and returns the result; the runner writes it in one transaction. A failed
run is recorded with its cause and the suite goes on; when this process has nothing left to
claim it waits for the runs other processes hold, taking over any whose owner died. Then the
derived rows (mCE) are recomputed.

A live display (transient, so piped output holds only the log lines) shows run k of N, the
phase, images/s and the time left. Ctrl-C stops the workers, marks their runs ``interrupted``
(their last epoch checkpoint stays) and stops; the same command resumes them. Database writes
are shielded from Ctrl-C so an interrupt never lands mid-transaction.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import functools
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
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
from normbench.metrics import MetricRow
from normbench.norms import NORMS, norm_class, parse_norm_name
from normbench.optim import OPTIMIZERS, TWO_PASS
from normbench.progress import format_duration
from normbench.runtime import provenance, resolve_device, torch_threads
from normbench.store import ClaimLost, RunStatus, Skip, Store
from normbench.submissions import NAMESPACE, SubmittedNorm
from normbench.suites import RunSpec
from runners import classify
from runners.executor import Done, Event, Executor, Job, memory_limit_mb

#: Seconds of timing per (norm, model) of a probe suite: its runs are short and many.
PROBE_CALIBRATION_SECONDS = 0.3


@dataclass(frozen=True)
class Outcome:
    spec: RunSpec
    status: str  # finished, diverged, failed, skipped
    detail: str = ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's stop, ``timeout``, ``docker stop``), handled as Ctrl-C is:
    the workers stop and their runs are marked ``interrupted``, resumable."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises ``Terminated`` instead of ending the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM until the block is done (used around database writes),
    then raise ``KeyboardInterrupt`` or ``Terminated`` (inside ``sigterm_as_interrupt``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {n: signal.signal(n, lambda signum, frame: received.append(signum)) for n in signals}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
    if signal.SIGTERM in received:
        raise Terminated
    if received:
        raise KeyboardInterrupt


def checkpoint_folder(key: str) -> Path:
    """A run's own checkpoint folder (the only place its worker may write). A checkpoint in the
    older layout (``<key>.pt`` beside the folders) is moved into it."""
    root = config.checkpoint_dir()
    folder = root / key
    legacy = root / f"{key}.pt"
    if legacy.exists() and not (folder / "state.pt").exists():
        folder.mkdir(parents=True, exist_ok=True)
        legacy.replace(folder / "state.pt")
    return folder


def checkpoint_path(key: str) -> Path:
    """The checkpoint file of a run (its last finished epoch)."""
    return checkpoint_folder(key) / "state.pt"


def owner_id() -> str:
    """Who claims runs in the store: this machine and process, and a nonce (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lease_seconds() -> float:
    """How long a claim lives without a heartbeat (``NORMBENCH_LEASE_SECONDS``, default 120 s)
    before another process may take the run over."""
    value = os.environ.get("NORMBENCH_LEASE_SECONDS", "")
    try:
        seconds = float(value) if value else 120.0
    except ValueError:
        raise NormbenchError(
            f"NORMBENCH_LEASE_SECONDS={value!r} is not a number of seconds."
        ) from None
    if not seconds > 0:
        raise NormbenchError(f"NORMBENCH_LEASE_SECONDS must be positive, not {value!r}.")
    return seconds


def label(spec: RunSpec) -> str:
    if spec.task == "gan":  # a GAN suite's axes are the generator's and discriminator's norms
        return f"G {spec.norm} / D {spec.settings['d_norm']} + {spec.optimizer} (seed {spec.seed})"
    if spec.task == "probe":  # a probe suite's axes are norms and models
        return f"{spec.norm} in {spec.settings['model_label']} (seed {spec.seed})"
    return f"{spec.norm} + {spec.optimizer} (seed {spec.seed})"


@dataclass(frozen=True)
class DataInfo:
    """What the plan needs to know of a dataset the runs use."""

    train_size: int
    test_size: int
    image_shape: tuple[int, ...]
    num_classes: int


def check_data(
    specs: list[RunSpec], data_dir: str | Path | None, device: torch.device | None = None
) -> dict[str, DataInfo]:
    """Load every dataset the runs need (decoding it into the cache on first use) and prepare
    their corruption sets, before anything is written to the store: a missing or damaged data
    file stops the suite here, with its message, and leaves the database as it was. Runs on a
    CUDA ``device`` generate their corruptions there as they evaluate (streamed), so nothing is
    generated here for them."""
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
        if spec.task == "gan":
            _prepare_real_features(spec, data_dir, info[spec.dataset], len(test))
        corruptions = spec.settings.get("corruption_set")
        if corruptions and (corruptions, spec.settings["corruption_subset"]) not in prepared:
            # generated here on first use (on the CPU); a CUDA run's set streams
            classify.corruption_source(spec, test, data_dir, device or torch.device("cpu"))
            prepared.add((corruptions, spec.settings["corruption_subset"]))
    return info


def _prepare_real_features(
    spec: RunSpec, data_dir: str | Path | None, data: DataInfo, test_size: int
) -> None:
    """Compute and cache the real images' features a GAN run scores against (once per dataset,
    split, count and feature network; a confined worker may only read the cache)."""
    from normbench import gan_metrics
    from runners.gan import real_count

    split = spec.settings["fid_real_split"]
    count = real_count(spec, data.train_size if split == "train" else test_size)
    gan_metrics.feature_network_path()  # a missing or altered network stops here, before training
    if gan_metrics.cached_real_features(spec.dataset, split, count) is not None:
        return
    what = f"features of {count:,} real {spec.dataset} {split} images (cached for later runs)"
    with progress.task(what, total=count) as advance:
        shown = [0]

        def step(done: int, total: int) -> None:
            advance(done - shown[0])
            shown[0] = done

        gan_metrics.real_features(
            spec.dataset, split, count, data_dir, device=resolve_device(None), progress=step
        )


@dataclass
class Planned:
    """One spec of the suite: its place, whether it is skipped or resumes, and its estimate."""

    index: int  # 1-based, among all the suite's specs
    spec: RunSpec
    skip: bool = False
    resume_epoch: int | None = None  # epochs a checkpoint holds, for a run that resumes
    estimate: Estimate | None = None
    held_by: str | None = None  # another process's live claim, when the plan is made


def plan_runs(specs: list[RunSpec], store: Store, force: bool, lease: float) -> list[Planned]:
    """Which runs are skipped (finished, unless ``force``), which resume from a checkpoint and
    which another process holds now (the claims decide, later; this is what the plan shows)."""
    planned = []
    now = store.db_now()
    for i, spec in enumerate(specs, 1):
        existing = store.get_run(spec.key)
        if existing is not None and existing.status is RunStatus.finished and not force:
            planned.append(Planned(i, spec, skip=True))
            continue
        resume = None
        if not force and checkpoint_path(spec.key).exists():
            resume = existing.epochs_done if existing is not None else 0
        held = None
        if (
            existing is not None
            and existing.status is RunStatus.running
            and existing.heartbeat is not None
            and now - existing.heartbeat < lease
        ):
            held = existing.owner
        planned.append(Planned(i, spec, resume_epoch=resume, held_by=held))
    return planned


def estimate_runs(
    planned: list[Planned],
    store: Store,
    device: torch.device,
    data: dict[str, DataInfo],
    here: dict,
    time_ratios: dict[str, float] | None = None,
    data_dir: str | Path | None = None,
) -> None:
    """Each remaining run's estimated seconds: from the earlier runs with its settings on this
    machine (``here``: its provenance), else calibrated (once per norm and model setting).
    A calibrated run also pays its worker's start (measured once: a fresh process that imports
    the runners and loads the dataset), which is most of a short probe or smoke run.

    A submitted norm's code never runs here: its calibration is BatchNorm's, slowed by the time
    ratio its contract check measured (``time_ratios``, by base name)."""
    calibrated: dict[tuple, tuple[Rates | None, str]] = {}
    for p in (p for p in planned if not p.skip):
        spec, d = p.spec, data[p.spec.dataset]
        base = parse_norm_name(spec.norm)[0]
        if base.startswith(NAMESPACE):
            ratio = (time_ratios or {}).get(base)
            spec = dataclasses.replace(spec, norm="batchnorm")
        found = estimate.from_history(store, p.spec, here, d.train_size, d.test_size)
        if found is not None:
            rates, n = found
            basis = f"from {n} earlier run{'s' if n > 1 else ''}"
        else:
            s = spec.settings
            if spec.task == "gan":
                key = (spec.dataset, spec.norm, s["d_norm"], s["model"], s["batch_size"],
                       s["n_dis"], "gan")  # fmt: skip
            elif spec.task == "probe":
                key = (spec.dataset, spec.norm, s["model"], repr(s["model_args"]),
                       s["batch_size"], "probe")  # fmt: skip
            else:
                two_pass = OPTIMIZERS.info(spec.optimizer).has(TWO_PASS)  # twice the work
                key = (spec.dataset, spec.norm, s["model"], repr(s["model_args"]),
                       s["batch_size"], s["eval_batch_size"], s["precision"], two_pass)  # fmt: skip
            if key not in calibrated:
                calibrated[key] = _calibrate(spec, device, d)
            rates, basis = calibrated[key]
            if rates is not None:
                start = _worker_start_seconds(spec.dataset, data_dir)
                rates = dataclasses.replace(rates, other=rates.other + start)
                basis += f" + {start:.0f} s worker start"
            if base.startswith(NAMESPACE):
                if rates is not None and ratio and math.isfinite(ratio) and ratio > 0:
                    rates = Rates(rates.train / ratio, rates.evaluation / ratio, rates.other)
                    basis = f"BatchNorm's calibration x {ratio:.2f} (the norm's contract timing)"
                else:
                    rates, basis = None, "not estimated (a submitted norm is timed in workers only)"
        breakdown = None
        if rates is not None:
            breakdown = estimate.run_breakdown(
                p.spec, rates, d.train_size, d.test_size, p.resume_epoch or 0
            )
        p.estimate = Estimate(breakdown, rates, basis)


@functools.cache
def _worker_start_seconds(dataset: str, data_dir: str | Path | None) -> float:
    """Seconds a fresh process takes to import the runners and load ``dataset`` from the
    cache: what every run pays before its first step, and most of a short probe run."""
    code = (
        "import sys, runners.probe, runners.classify\n"
        "from normbench.data import load_dataset\n"
        "load_dataset(sys.argv[1], 'train', sys.argv[2] or None)"
    )
    with progress.task("timing a worker's start for the estimate", total=None):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", code, dataset, str(data_dir or "")],
            capture_output=True,
            check=False,
        )
    return time.perf_counter() - start if done.returncode == 0 else 0.0


def _calibrate(spec: RunSpec, device: torch.device, d: DataInfo) -> tuple[Rates | None, str]:
    with progress.task(f"timing {spec.norm} for the estimate", total=None):
        try:
            if spec.task == "gan":
                from runners.gan import calibrate

                rates = calibrate(spec, device)
                return rates, (
                    f"calibrated: {rates.train:,.0f} generated images/s training, "
                    f"{rates.evaluation:,.0f} scored images/s"
                )
            if spec.task == "probe":
                rates = estimate.calibrate_probe(
                    spec, device, d.image_shape, d.num_classes, seconds=PROBE_CALIBRATION_SECONDS
                )
                return rates, f"calibrated: {rates.train:,.0f} probed images/s"
            rates = estimate.calibrate(spec, device, d.image_shape, d.num_classes)
        except Exception as err:  # noqa: BLE001 - the run itself will report what is wrong
            cause = (str(err).splitlines() or [type(err).__name__])[0][:80]
            return None, f"not estimated (timing it failed: {cause})"
    return rates, (
        f"calibrated: {rates.train:,.0f} training, {rates.evaluation:,.0f} evaluation images/s"
    )


def print_plan(
    planned: list[Planned], device: torch.device, console: Console, slots: int = 1
) -> None:
    """The plan: how many runs are skipped, resume or start, each run's estimate and the total
    (``slots`` runs at once: the time until the last one ends, see ``estimate.makespan``)."""
    todo = [p for p in planned if not p.skip]
    skipped = len(planned) - len(todo)
    resuming = sum(p.resume_epoch is not None for p in todo)
    parts = [f"{skipped} already finished (skipped)"] if skipped else []
    parts += (
        [f"{resuming} resume{'s' if resuming == 1 else ''} from a checkpoint"] if resuming else []
    )
    held = sum(p.held_by is not None for p in todo)
    starting = len(todo) - resuming
    parts += [f"{starting} start{'s' if starting == 1 else ''}"] if starting else []
    parts += [f"{held} held by other processes now"] if held else []
    n = len(planned)
    head = f"Plan: {n} run{'s' if n != 1 else ''} on {device}: {', '.join(parts)}"
    if not todo:
        console.print(f"{head}; nothing to run.")
        return
    known = [p.estimate.seconds for p in todo if p.estimate.seconds is not None]
    span = estimate.makespan(known, slots)
    total = f"about {format_duration(span)}" if known else "unknown"
    if 0 < len(known) < len(todo):
        total = f"at least {format_duration(span)} ({len(todo) - len(known)} not estimated)"
    if slots > 1 and len(todo) > 1:
        total += f" with {slots} runs at once"
    console.print(f"{head}. Estimated time on this machine: {total}.", highlight=False)
    width = max(len(label(p.spec)) for p in todo)
    for p in todo:
        resumes = ""
        if p.resume_epoch is not None:
            if p.spec.task == "gan":
                resumes = "resumes from its last checkpoint; "
            elif p.spec.task == "probe":
                steps = len(p.spec.settings["probe_steps"])
                resumes = f"resumes after probe step {p.resume_epoch}/{steps}; "
            else:
                resumes = f"resumes after epoch {p.resume_epoch}/{p.spec.settings['epochs']}; "
        console.print(
            f"  run {f'{p.index}/{n}':>{2 * len(str(n)) + 1}}  {label(p.spec):<{width}}  "
            f"~{format_duration(p.estimate.seconds):<12} {resumes}{p.estimate.basis}",
            markup=False,
            highlight=False,
        )


@dataclass
class SuiteResult:
    outcomes: list[Outcome]
    mce_runs: int | None = None  # runs that got mCE rows; None when the suite has no corruptions


def run_suite(
    specs: list[RunSpec],
    store: Store,
    executor: Executor,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    force: bool = False,
    console: Console | None = None,
    submissions: list[dict] | None = None,
    derive: Callable[[Store], int] | None = None,
) -> SuiteResult:
    """Run ``specs``: check the data, print the plan with its estimate, then claim and execute
    every run this process can get (and wait for those others hold), record each result, and
    finally recompute the derived rows with ``derive`` (mCE)."""
    console = console or Console(stderr=True)
    submissions = submissions or []
    lease = lease_seconds()
    with sigterm_as_interrupt():
        with progress.display(console) as live:
            planned = plan_runs(specs, store, force, lease)
            data = check_data([p.spec for p in planned if not p.skip], data_dir, device)
            # Provenance and estimate with the threads each worker will have (parallel local
            # workers share the cores).
            with torch_threads(executor.threads_per_job()):
                here = provenance(device)
                ratios = {s["name"]: s.get("time_ratio") for s in submissions}
                estimate_runs(planned, store, device, data, here, ratios, data_dir)
            print_plan(planned, device, console, slots=executor.capacity())
            outcomes = Orchestrator(
                planned, store, executor, device=device, data_dir=data_dir, force=force,
                console=console, live=live, here=here, lease=lease, submissions=submissions,
            ).run()  # fmt: skip
        mce = None
        if derive is not None:
            with deferred_interrupt():
                mce = derive(store)
    return SuiteResult(outcomes, mce)


@dataclass
class Active:
    """A run this process has claimed and handed to the executor."""

    planned: Planned
    display: RunDisplay
    clock: RunClock


class Orchestrator:
    """Claims runs, hands them to the executor, follows their progress and records their ends."""

    def __init__(
        self,
        planned: list[Planned],
        store: Store,
        executor: Executor,
        *,
        device: torch.device,
        data_dir: str | Path | None,
        force: bool,
        console: Console,
        live: Progress,
        here: dict,
        lease: float,
        submissions: list[dict],
    ) -> None:
        self.planned, self.store, self.executor = planned, store, executor
        self.device, self.data_dir, self.force = device, data_dir, force
        self.console, self.live, self.here = console, live, here
        self.lease, self.submissions = lease, submissions
        self.owner = owner_id()
        # --force re-runs what finished before this process started, not what other processes
        # finish meanwhile.
        self.rerun_before = store.db_now() if force else None
        self.active: dict[str, Active] = {}
        self.outcomes: dict[int, Outcome] = {}
        self.pending = [p for p in planned if not p.skip]
        self.factor = 1.0  # how much slower than estimated the runs so far went
        self.last_heartbeat = time.monotonic()
        self.last_recheck = 0.0
        self.waiting_task = None

    def run(self) -> list[Outcome]:
        for p in self.planned:
            if p.skip:
                self.console.print(f"[dim]skip[/dim] {label(p.spec)}: already finished (run "
                                   f"{p.spec.key}; --force re-runs it)")  # fmt: skip
                self.outcomes[p.index] = Outcome(p.spec, "skipped")
        try:
            while self.pending or self.active:
                self._claim_more()
                if not self.active and not self.pending:
                    break
                if not self.active:  # only runs other processes hold are left
                    self._show_waiting()
                    time.sleep(min(1.0, self.lease / 8))
                    continue
                for item in self.executor.poll(0.2):
                    if isinstance(item, Done):
                        self._record(item)
                    else:
                        self._progress(item)
                self._heartbeat()
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except BaseException:
            self._abandon()
            raise
        finally:
            if self.waiting_task is not None:
                self.live.remove_task(self.waiting_task)
        return [self.outcomes[p.index] for p in self.planned if p.index in self.outcomes]

    # --- claiming -------------------------------------------------------------------------------

    def _claim_more(self) -> None:
        """Claim pending runs in order while the executor has room. A run another process holds
        stays pending (checked again every few seconds): when that process finishes it, it is
        done; when its claim goes stale, it is taken over here."""
        now = time.monotonic()
        recheck = now - self.last_recheck >= min(5.0, self.lease / 4)
        if recheck:
            self.last_recheck = now
        for p in list(self.pending):
            if len(self.active) >= self.executor.capacity():
                return
            if p.held_by is not None and not recheck:
                continue
            self._try_claim(p)

    def _try_claim(self, p: Planned) -> None:
        spec, key = p.spec, p.spec.key
        ckpt = checkpoint_path(key)
        resume = ckpt.exists() and not self.force
        with deferred_interrupt():
            claim = self.store.claim_run(
                spec.to_dict(), key, owner=self.owner, lease_seconds=self.lease,
                device=str(self.device), provenance=self.here,
                config={**spec.to_dict(), "protocol": spec.protocol}, reset=not resume,
                rerun_finished_before=self.rerun_before,
            )  # fmt: skip
        if isinstance(claim, Skip):
            if claim.reason == "finished":
                self.pending.remove(p)
                self.console.print(f"[dim]skip[/dim] {label(spec)}: finished by another process "
                                   f"(run {key})")  # fmt: skip
                self.outcomes[p.index] = Outcome(spec, "skipped", "finished by another process")
            elif p.held_by is None:
                p.held_by = claim.detail
                self.console.print(f"[dim]wait[/dim] {label(spec)}: {claim.detail}")
            return
        self.pending.remove(p)
        if self.force:
            shutil.rmtree(checkpoint_folder(key), ignore_errors=True)
        if claim.taken_over:
            self.console.print(f"[yellow]take over[/yellow] {label(spec)}: its claim by "
                               f"{claim.previous_owner} went stale")  # fmt: skip
        self._start(p, resumed=resume)

    def _start(self, p: Planned, resumed: bool) -> None:
        spec = p.spec
        self.console.print(
            f"[bold]{'resume' if resumed else 'run'}[/bold] {label(spec)} "
            f"[dim]{spec.suite}/{spec.budget}, run {spec.key}[/dim]"
        )
        later = sum(
            q.estimate.seconds or 0.0
            for q in self.pending
            if q.estimate is not None and q.held_by is None
        ) / self.executor.capacity()  # the later runs share the parallel slots
        est = p.estimate or Estimate(None, None, "")
        clock = RunClock(
            est.breakdown,
            est.rates.train if est.rates else None,
            spec.settings["batch_size"],
            later=later,
            factor=self.factor,
        )
        display = RunDisplay(self.live, p.index, len(self.planned), spec, clock, self.console)
        self.active[spec.key] = Active(p, display, clock)
        try:
            self.executor.start(self._job(p))
        except BaseException:
            del self.active[spec.key]
            display.close()
            raise

    def _job(self, p: Planned) -> Job:
        spec = p.spec
        names = [spec.norm] + ([spec.settings["d_norm"]] if spec.task == "gan" else [])
        bases = {parse_norm_name(name)[0] for name in names}
        needed = [
            {k: s[k] for k in ("name", "class_name", "source", "source_sha256")}
            for s in self.submissions
            if s["name"] in bases
        ]
        reads = []
        if spec.task == "gan":  # the feature network ships inside an installed package
            from normbench import gan_metrics

            reads.append(str(gan_metrics.feature_network_path().parent))
        seconds = p.estimate.seconds if p.estimate is not None else None
        return Job(
            id=spec.key,
            kind=spec.task,
            spec=spec.to_dict(),
            data_dir=str(self.data_dir) if self.data_dir else None,
            checkpoint_dir=str(checkpoint_folder(spec.key)),
            submissions=needed,
            device=str(self.device),
            limits={
                "memory_mb": memory_limit_mb(),
                "cpu_seconds": cpu_limit(seconds) if needed else env_cpu_limit(),
            },
            resources=resources(self.device),
            read_paths=reads,
            norm_modules=[m for name in dict.fromkeys(names) for m in norm_modules(name)],
            threads=self.executor.threads_per_job(),
        )

    # --- following and recording --------------------------------------------------------------

    def _progress(self, event: Event) -> None:
        active = self.active.get(event.job_id)
        if active is None:
            return
        data = event.data
        if data.get("event") == "epoch":
            with deferred_interrupt():
                self.store.record_epoch(event.job_id, int(data["epoch"]), owner=self.owner)
        active.display.handle(data)

    def _record(self, done: Done) -> None:
        active = self.active.pop(done.job_id, None)
        if active is None:
            return
        active.display.close()
        p, spec, key = active.planned, active.planned.spec, done.job_id
        if done.result is None:
            with deferred_interrupt():
                self.store.mark(key, RunStatus.failed, _failure(done), owner=self.owner)
            if done.user_error:
                # A problem with the user's input or environment (e.g. missing data) would fail
                # every run the same way: stop the suite with its message.
                raise NormbenchError(done.error or "the run failed")
            detail = (done.error or "").strip().splitlines()[-1:] or ["failed"]
            self.console.print(f"[red]failed[/red] {label(spec)}: {escape(detail[0])}")
            self.outcomes[p.index] = Outcome(spec, "failed", detail[0])
            return
        clock = active.clock
        if clock.measured_rate is not None and clock.rate:
            self.factor = clock.factor
        result = done.result
        try:
            metrics = [_metric_row(row) for row in result["metrics"]]
            curves = [(int(e), str(n), float(v)) for e, n, v in result["curves"]]
            artifacts = _artifacts(result.get("artifacts") or {})
            status = RunStatus(result["status"])
            if status not in (RunStatus.finished, RunStatus.diverged):
                raise ValueError(f"status {result['status']!r}")
        except (KeyError, TypeError, ValueError) as err:
            with deferred_interrupt():
                self.store.mark(key, RunStatus.failed, f"the worker's result is malformed: {err}",
                                owner=self.owner)  # fmt: skip
            self.console.print(f"[red]failed[/red] {label(spec)}: malformed result ({err})")
            self.outcomes[p.index] = Outcome(spec, "failed", "malformed result")
            return
        with deferred_interrupt():
            stored = self._finish(key, status, metrics, curves, result, artifacts)
        if not stored:
            return
        shutil.rmtree(checkpoint_folder(key), ignore_errors=True)
        # Whole-run values, and the probes' whole-model summaries at initialization.
        values = {
            m.name: m.value
            for m in metrics
            if not m.corruption and m.layer == -1 and m.step in (-1, 0)
        }
        est = p.estimate
        if status is RunStatus.finished:
            estimated = ""
            if est is not None and est.seconds is not None:
                estimated = f" (estimated {format_duration(est.seconds)})"
            nan = float("nan")
            if spec.task == "gan":
                measured = (
                    f"FID {values.get(M.GAN_FID, nan):.1f}, KID {values.get(M.GAN_KID, nan):.4f} "
                    f"({values.get(M.GAN_GEN_SAMPLES, 0):.0f} generated vs "
                    f"{values.get(M.GAN_REAL_SAMPLES, 0):.0f} real images)"
                    + (", mode collapse" if values.get(M.GAN_COLLAPSED) else "")
                )
            elif spec.task == "probe":
                measured = (
                    f"activation growth {values.get(M.PROBE_ACT_GROWTH, nan):.3g}x, last-block "
                    f"sample similarity {values.get(M.PROBE_LAST_COSINE, nan):.3f}"
                )
            else:
                measured = f"accuracy {values.get(M.ACCURACY, nan):.2%}"
            detail = f"{measured}, wall time {values.get(M.WALL_TIME, nan):.0f} s{estimated}" + (
                ""
                if spec.task == "probe"
                else f", {values.get(M.TRAIN_THROUGHPUT, nan):.0f} train images/s"
            )
            self.console.print(f"[green]done[/green] {label(spec)}: {detail}")
        else:
            detail = result.get("reason") or ""
            self.console.print(f"[yellow]{status.value}[/yellow] {label(spec)}: {detail}")
        self.outcomes[p.index] = Outcome(spec, status.value, detail)

    def _finish(self, key, status, metrics, curves, result, artifacts=None) -> bool:
        """Store a run's results in one transaction; if that fails, record the failure instead
        of leaving it running. A claim lost meanwhile (this process was taken for dead) keeps
        the other process's run and discards these results."""
        p = self.planned[[q.spec.key for q in self.planned].index(key)]
        try:
            self.store.finish_run(
                key, owner=self.owner, status=status, metrics=metrics, curves=curves,
                epochs_done=int(result.get("epochs_done", 0)),
                diverged_step=result.get("diverged_step"), error=result.get("reason"),
                provenance_update=result.get("info") or {}, artifacts=artifacts,
            )  # fmt: skip
        except ClaimLost:
            self.console.print(f"[yellow]discarded[/yellow] {label(p.spec)}: another process "
                               "took this run over meanwhile; its results stand")  # fmt: skip
            self.outcomes[p.index] = Outcome(p.spec, "skipped", "taken over by another process")
            return False
        except Exception:  # noqa: BLE001 - the run must not stay "running"
            self.store.mark(key, RunStatus.failed, "storing the results failed:\n"
                            + traceback.format_exc(), owner=self.owner)  # fmt: skip
            self.console.print(f"[red]failed[/red] {label(p.spec)}: its results could not be "
                               "stored")  # fmt: skip
            self.outcomes[p.index] = Outcome(p.spec, "failed", "results could not be stored")
            return False
        return True

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if not self.active or now - self.last_heartbeat < self.lease / 4:
            return
        self.last_heartbeat = now
        with deferred_interrupt():
            held = self.store.heartbeat(self.owner, list(self.active))
        for key in set(self.active) - held:
            self.console.print(f"[yellow]lost[/yellow] the claim of run {key} (this process "
                               "missed its heartbeats); its result will be discarded")  # fmt: skip

    def _show_waiting(self) -> None:
        text = (f"waiting for {len(self.pending)} run(s) other processes hold (taken over if "
                f"their heartbeat stops for {self.lease:.0f} s)")  # fmt: skip
        if self.waiting_task is None:
            self.waiting_task = self.live.add_task(text, total=None, rate="", left="")
        else:
            self.live.update(self.waiting_task, description=text)

    def _interrupted(self) -> None:
        with deferred_interrupt():
            for key in self.executor.cancel_all():
                self.store.mark(
                    key, RunStatus.interrupted,
                    "interrupted; re-run the same command to resume from the last epoch",
                    owner=self.owner,
                )  # fmt: skip
        for active in self.active.values():
            active.display.close()
        self.active.clear()

    def _abandon(self) -> None:
        """An error in this process: stop the workers and release their runs as failed."""
        with deferred_interrupt():
            for key in self.executor.cancel_all():
                self.store.mark(key, RunStatus.failed, "the orchestrator stopped on an error",
                                owner=self.owner)  # fmt: skip
        for active in self.active.values():
            active.display.close()
        self.active.clear()


def norm_modules(name: str) -> list[dict]:
    """The module that registered ``name``, when it is not normbench's own, a submission or an
    installed entry point's (workers load those themselves): a script or a test registered it
    at run time, and the worker must import it to know the name."""
    cls = norm_class(NORMS.get(name).obj)
    module = sys.modules.get(getattr(cls, "__module__", "") or "")
    if module is None or module.__name__.split(".")[0] in ("normbench", "builtins"):
        return []
    if isinstance(cls, type) and issubclass(cls, SubmittedNorm):
        return []
    file = getattr(module, "__file__", None)
    return [{"module": module.__name__, "file": file, "norms": [parse_norm_name(name)[0]]}]


#: What a run may store as artifacts: names (a letter or digit, then letters, digits, ".", "_"
#: or "-"), how many, and how large in all. A worker's result is untrusted input.
ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_ARTIFACTS, MAX_ARTIFACT_BYTES = 8, 16 * 2**20


def _artifacts(sent: dict) -> dict[str, bytes]:
    """A worker's artifacts (name -> base64 text) decoded; ValueError for anything else."""
    if not isinstance(sent, dict) or len(sent) > MAX_ARTIFACTS:
        raise ValueError(f"artifacts must be a mapping of at most {MAX_ARTIFACTS} files")
    out, total = {}, 0
    for name, text in sent.items():
        if not isinstance(name, str) or not ARTIFACT_NAME.match(name) or not isinstance(text, str):
            raise ValueError(f"bad artifact {str(name)[:80]!r}")
        try:
            out[name] = base64.b64decode(text.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise ValueError(f"artifact {name!r} is not base64") from None
        total += len(out[name])
        if total > MAX_ARTIFACT_BYTES:
            raise ValueError(f"artifacts larger than {MAX_ARTIFACT_BYTES // 2**20} MiB")
    return out


def _metric_row(row: list) -> MetricRow:
    """A metric row as a worker sends it: name, value, split, corruption, severity, and for the
    probes' rows layer and step."""
    name, value, split, corruption, severity, *where = row
    if len(where) not in (0, 2):
        raise ValueError(f"a metric row has {len(row)} fields")
    layer, step = (int(where[0]), int(where[1])) if where else (-1, -1)
    return MetricRow(str(name), float(value), str(split), str(corruption), int(severity),
                     layer, step)  # fmt: skip


def _failure(done: Done) -> str:
    error = done.error or "the worker failed"
    return f"{error}\n\nworker log (last lines):\n{done.log_tail}" if done.log_tail else error


def env_cpu_limit() -> int | None:
    value = os.environ.get("NORMBENCH_WORKER_CPU_SECONDS")
    return int(value) if value else None


def cpu_limit(estimated_seconds: float | None) -> int:
    """The CPU-time limit of a worker running submitted code: ``NORMBENCH_WORKER_CPU_SECONDS``,
    else ten times the run's estimate on every core, at least an hour (a day when unknown)."""
    fixed = env_cpu_limit()
    if fixed:
        return fixed
    cores = os.cpu_count() or 1
    if estimated_seconds is None:
        return 24 * 3600 * cores
    return int(max(3600, 10 * estimated_seconds * cores))


def resources(device: torch.device) -> dict[str, float]:
    """What one run asks of a node (Ray schedules by it): a GPU and a core on CUDA, else every
    core of a node (a CPU run's threads use them all)."""
    if device.type == "cuda":
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": float(os.cpu_count() or 1), "num_gpus": 0}


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
    ) -> None:
        self.live, self.spec, self.clock = live, spec, clock
        self.console = console
        self.name = f"run {index}/{count} {escape(label(spec))}"
        # A probe run reports its probe batches and training steps as the steps of one "epoch".
        self.epochs = 1 if spec.task in ("probe", "gan") else spec.settings["epochs"]
        self.steps_per_epoch = 1
        self.first_step = 0  # steps done before this session (a resumed run)
        self.last_step = 0  # the last step reported
        self.phase = "loading data"
        self.rate_unit = {"probe": "probed images/s", "gan": "generated images/s"}.get(
            spec.task, "training images/s"
        )
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
        busy = self.phase.startswith(("epoch", "probing", "training"))
        rate = self.clock.measured_rate if busy else None
        self.live.update(
            self.task,
            description=f"{self.name}: {self.phase}",
            rate=f"{rate:,.0f} {self.rate_unit}" if rate else "",
            left=self._left(),
            **fields,
        )
        if force:
            self.live.refresh()  # phase changes show at once, not at the next 0.1 s tick

    def handle(self, event: dict) -> None:
        """Show one progress event of the run's worker."""
        kind = event.get("event")
        if kind == "start":
            epochs, steps_per_epoch = int(event["epochs"]), int(event["steps_per_epoch"])
            self.steps_per_epoch = steps_per_epoch
            self.first_step = self.last_step = (self.epochs - epochs) * steps_per_epoch
            self.clock.start(epochs, steps_per_epoch)
            self.phase = {"probe": "probing", "gan": "training"}.get(
                self.spec.task, f"epoch {self.epochs - epochs + 1}/{self.epochs}"
            )
            self.render(force=True, total=epochs * steps_per_epoch, completed=0)
        elif kind == "step":
            step = int(event["step"])
            self.clock.step(max(step - self.last_step, 1))
            self.last_step = step
            if self.spec.task not in ("probe", "gan"):
                self.phase = f"epoch {(step - 1) // self.steps_per_epoch + 1}/{self.epochs}"
            self.render(completed=step - self.first_step)
        elif kind == "epoch" and self.spec.task in ("probe", "gan"):
            pass  # a probe step was checkpointed, a GAN trained: nothing to report
        elif kind == "epoch":
            values = event.get("values") or {}
            self.console.print(
                f"  epoch {int(event['epoch'])}/{self.epochs}: train loss "
                f"{float(values.get('train_loss', math.nan)):.3f}, test accuracy "
                f"{float(values.get('test_accuracy', math.nan)):.2%}"
            )
        elif kind == "eval":
            done, total = int(event["done"]), int(event["total"])
            self.clock.evaluating(done, total)
            what = "scoring" if self.spec.task == "gan" else "evaluating"
            self.phase = self.phase.split(",")[0] + f", {what} {done}/{total} batches"
            self.render(force=done == total)
        elif kind == "corruption":
            done, total = int(event["done"]), int(event["total"])
            self.clock.corruption(done, total)
            name = self.spec.settings.get("corruption_set") or "corruptions"
            self.phase = f"evaluating {name}"
            self.render(force=True, total=total, completed=done)
        elif kind == "speed_check":
            self.clock.speed_check()
            self.phase = "speed check against BatchNorm"
            self._restart(total=None)
            self.render(force=True)

    def close(self) -> None:
        self.live.remove_task(self.task)
