"""How long runs take on this machine: the plan's estimate before a suite starts, and the time
left while it runs.

A run's cost is its work divided by this machine's rates (``run_breakdown``): training images
(epochs x the images of an epoch) at the training rate; the clean test set after every epoch
and, for a suite with a corruption set, 19 corruptions x 5 severities x the images per pair, at
the inference rate (once more, or with a backward pass, for test-time adaptation); an
adversarial evaluation's attack steps at the training rate; and the end-of-run speed check
(``speed_pairs`` interleaved pairs of repetitions of training steps, see
``normbench.normspeed``). The rates come from earlier
finished runs with the same settings on the same device (``from_history``: their own training
and evaluation throughput, and whatever else their wall time held), else from timing a few
training steps and inference batches of the budget's model with the run's norm
(``calibrate``; about a second per norm).

While a run goes, ``RunClock`` replaces the estimated training rate by the measured one and
scales what is still to come (this run's evaluation and speed check, the later runs) by how
much faster or slower the run goes than its estimate said.
"""

from __future__ import annotations

import functools
import heapq
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from sqlalchemy import select

from normbench import metrics as M
from normbench.corruptions import ALL as CORRUPTIONS_ALL
from normbench.corruptions import SEVERITIES
from normbench.data import random_crop, random_flip
from normbench.normspeed import MIN_REPETITION_SECONDS, build_model, training_batch
from normbench.optim import create_optimizer, training_step
from normbench.runtime import autocast, autocast_dtype, synchronize
from normbench.store import Metric, Run, RunStatus, Store
from normbench.suites import RunSpec

HISTORY_RUNS = 5  # the most recent earlier runs an estimate uses (machines change)
CALIBRATION_SECONDS = 1.0  # timed training steps per norm, after warm-up (inference: half)


@dataclass(frozen=True)
class Rates:
    """What this machine does per second for one run configuration."""

    train: float  # training images/s (forward, backward, optimizer step)
    evaluation: float  # inference images/s at the evaluation batch size
    other: float = 0.0  # seconds per run the rates do not account for (from earlier runs)


@dataclass(frozen=True)
class Breakdown:
    """Seconds of one run (or of what is left of it), by phase."""

    train: float
    evaluation: float  # the clean test set after every epoch
    corruptions: float
    speed_check: float
    other: float = 0.0

    @property
    def total(self) -> float:
        return self.train + self.evaluation + self.corruptions + self.speed_check + self.other


@dataclass(frozen=True)
class Estimate:
    """A run's estimated seconds and how they were estimated (``basis``, shown to the user)."""

    breakdown: Breakdown | None  # None: not estimated
    rates: Rates | None
    basis: str

    @property
    def seconds(self) -> float | None:
        return None if self.breakdown is None else self.breakdown.total


# --- the work of a run ---------------------------------------------------------------------------


def train_images_per_epoch(spec: RunSpec, train_size: int) -> int:
    """Images one epoch trains on: the budget's subset, in full batches (the last is dropped)."""
    s = spec.settings
    n = min(s["train_subset"], train_size) if s["train_subset"] else train_size
    return n // s["batch_size"] * s["batch_size"]


def test_images(spec: RunSpec, test_size: int) -> int:
    s = spec.settings
    return min(s["test_subset"], test_size) if s["test_subset"] else test_size


def corruption_images(spec: RunSpec, test_size: int) -> int:
    """Images evaluated under corruptions: every corruption at every severity, each on
    ``corruption_subset`` test images (all of them when 0)."""
    s = spec.settings
    if not s.get("corruption_set"):
        return 0
    per_pair = min(s["corruption_subset"], test_size) if s["corruption_subset"] else test_size
    return len(CORRUPTIONS_ALL) * len(SEVERITIES) * per_pair


def adversarial_work(spec: RunSpec, test_size: int) -> tuple[int, int]:
    """An adversarial evaluation's work: images through a forward and backward pass (the FGSM
    step and each PGD step, at about the training rate) and images only evaluated (clean, FGSM
    and PGD accuracy)."""
    a = spec.settings.get("adversarial")
    if not a:
        return 0, 0
    n = min(a["subset"], test_size) if a["subset"] else test_size
    return n * (1 + a["steps"]), 3 * n


def adaptation_work(spec: RunSpec, test_size: int) -> tuple[int, int]:
    """Test-time adaptation's work over the clean test set and every corrupted pair: BN
    adaptation evaluates each image once more; TENT adds a forward and backward pass per image."""
    a = spec.settings.get("adaptation")
    if not a:
        return 0, 0
    images = test_images(spec, test_size) + corruption_images(spec, test_size)
    return images * ("tent" in a["methods"]), images * ("bn" in a["methods"])


def speed_check_seconds(pairs: int, step_seconds: float) -> float:
    """The end-of-run speed check (``normspeed.side_by_side``): per model a warm-up step and a
    sizing step, then ``pairs`` pairs of repetitions each of enough steps to last
    ``MIN_REPETITION_SECONDS``. Both models are taken to step as fast as the run's."""
    if not pairs or step_seconds <= 0:
        return 0.0
    repetition = max(1, math.ceil(MIN_REPETITION_SECONDS / step_seconds)) * step_seconds
    return 4 * step_seconds + 2 * pairs * repetition


def probe_units(spec: RunSpec) -> int:
    """Batches a probe run computes: each probe step's probe batches (a forward and backward
    pass each) and the training steps between them."""
    s = spec.settings
    return len(s["probe_steps"]) * s["batches"] + max(s["probe_steps"])


def gan_units(spec: RunSpec) -> tuple[int, int]:
    """A GAN run's work: generated images of its training steps (each step's ``batch_size``,
    with its discriminator steps), and images the feature network scores (the final score's and
    those of the FID checks during training)."""
    s = spec.settings
    checks = (s["steps"] - 1) // s["fid_every"] if s["fid_every"] else 0
    return s["steps"] * s["batch_size"], s["fid_samples"] + checks * s["fid_every_samples"]


def run_breakdown(
    spec: RunSpec, rates: Rates, train_size: int, test_size: int, epochs_done: int = 0
) -> Breakdown:
    """Seconds of ``spec``'s run from epoch ``epochs_done`` on, on a dataset of ``train_size``
    training and ``test_size`` test images, at ``rates``. A probe run's "epochs" are its probe
    steps, and its rate is per batch of its units (``probe_units``)."""
    s = spec.settings
    if spec.task == "gan":
        trained, scored = gan_units(spec)
        left = 1.0 - min(epochs_done, 1)
        return Breakdown(train=left * trained / rates.train,
                         evaluation=left * scored / rates.evaluation, corruptions=0.0,
                         speed_check=0.0, other=rates.other)  # fmt: skip
    if spec.task == "probe":
        left = 1.0 - epochs_done / len(s["probe_steps"])
        work = left * probe_units(spec) * s["batch_size"] / rates.train
        return Breakdown(train=work, evaluation=0.0, corruptions=0.0, speed_check=0.0,
                         other=rates.other)  # fmt: skip
    epochs = max(s["epochs"] - epochs_done, 0)
    steps_per_epoch = train_images_per_epoch(spec, train_size) // s["batch_size"]
    probe_passes = landscape_passes(spec, epochs * steps_per_epoch)
    attacked, attack_evaluated = adversarial_work(spec, test_size)
    adapt_trained, adapt_evaluated = adaptation_work(spec, test_size)
    return Breakdown(
        train=epochs * train_images_per_epoch(spec, train_size) / rates.train,
        evaluation=epochs * test_images(spec, test_size) / rates.evaluation,
        corruptions=(corruption_images(spec, test_size) + adapt_evaluated) / rates.evaluation
        + adapt_trained / rates.train,
        speed_check=speed_check_seconds(s["speed_pairs"], s["batch_size"] / rates.train),
        other=rates.other
        + (probe_passes * s["batch_size"] + attacked) / rates.train
        + attack_evaluated / rates.evaluation,
    )


def landscape_passes(spec: RunSpec, steps: int) -> int:
    """Forward/backward passes the landscape probes of ``steps`` training steps add (each costs
    about a training step): per probe, the gradient at w and one pass per step size, and with ICS
    one pass per weight layer more."""
    options = spec.settings.get("landscape")
    if not options or steps <= 0:
        return 0
    per_probe = 1 + len(options["step_sizes"])
    if options["ics"]:
        # one pass per weight layer, and its own pass for the gradients before the update
        per_probe += 1 + _weight_layers(
            spec.settings["model"], json.dumps(spec.settings["model_args"])
        )
    return math.ceil(steps / options["every"]) * per_probe


@functools.cache
def _weight_layers(model: str, model_args: str) -> int:
    """Convolutions and linear layers of ``model`` with BatchNorm, built on the meta device."""
    from normbench.landscape import weight_layers
    from normbench.models import conv_norm_factory, create_model

    with torch.device("meta"):
        net = create_model(model, block=conv_norm_factory("batchnorm"), num_classes=10,
                           **json.loads(model_args))  # fmt: skip
    return len(weight_layers(net))


def suite_seconds(
    specs: Iterable[RunSpec],
    rates: Mapping[str, Rates],
    sizes: Mapping[str, tuple[int, int]],
    epochs_done: Mapping[str, int] | None = None,
) -> float:
    """Seconds for ``specs`` one after another: ``rates`` by run key, ``sizes`` (training and
    test images) by dataset, ``epochs_done`` by run key for runs that resume."""
    done = epochs_done or {}
    return sum(
        run_breakdown(s, rates[s.key], *sizes[s.dataset], done.get(s.key, 0)).total for s in specs
    )


def makespan(seconds: Iterable[float], slots: int = 1) -> float:
    """Seconds until the last of runs lasting ``seconds`` ends when ``slots`` run at once, each
    run taken in order by the first slot to come free (as the orchestrator does)."""
    ends = [0.0] * max(slots, 1)
    for s in seconds:
        heapq.heapreplace(ends, ends[0] + s)
    return max(ends)


# --- where the rates come from -------------------------------------------------------------------


def from_history(
    store: Store,
    spec: RunSpec,
    provenance: Mapping[str, Any],
    train_size: int,
    test_size: int,
) -> tuple[Rates, int] | None:
    """Rates from the most recent finished runs with ``spec``'s settings, norm and optimizer on
    this machine (same device, device name and thread count as ``provenance``), and how many
    runs they come from; None when there are none."""
    query = (
        select(Run)
        .where(
            Run.status == RunStatus.finished,
            Run.budget == spec.budget,
            Run.dataset == spec.dataset,
            Run.model == spec.model,
            Run.norm == spec.norm,
            Run.optimizer == spec.optimizer,
        )
        .order_by(Run.finished_at.desc())
    )
    same = ("device", "device_name", "threads")
    with store.session() as s:
        runs = [
            r
            for r in s.scalars(query)
            if (r.config or {}).get("settings") == spec.settings
            and all((r.provenance or {}).get(k) == provenance.get(k) for k in same)
        ][:HISTORY_RUNS]
        if not runs:
            return None
        if spec.task == "probe":  # no throughputs: the whole run's wall time, as one rate
            walls = s.scalars(
                select(Metric.value).where(
                    Metric.run_id.in_([r.id for r in runs]), Metric.name == M.WALL_TIME
                )
            ).all()
            if not walls:
                return None
            images = probe_units(spec) * spec.settings["batch_size"]
            return Rates(train=images / max(statistics.median(walls), 1e-3), evaluation=1.0), len(
                runs
            )
        scored = M.GAN_FEATURE_THROUGHPUT if spec.task == "gan" else M.EVAL_THROUGHPUT
        names = (M.WALL_TIME, M.TRAIN_THROUGHPUT, scored)
        rows = s.execute(
            select(Metric.run_id, Metric.name, Metric.value).where(
                Metric.run_id.in_([r.id for r in runs]),
                Metric.name.in_(names),
                Metric.corruption == "",
            )
        ).all()
    values: dict[str, list[float]] = {name: [] for name in names}
    for _, name, value in rows:
        values[name].append(value)
    if not all(values.values()):
        return None  # runs from before these metrics were recorded
    # Medians: one run that also decoded the data or generated a corruption set does not count.
    rates = Rates(
        train=statistics.median(values[M.TRAIN_THROUGHPUT]),
        evaluation=statistics.median(values[scored]),
    )
    measured = run_breakdown(spec, rates, train_size, test_size).total
    other = max(statistics.median(values[M.WALL_TIME]) - measured, 0.0)
    return Rates(rates.train, rates.evaluation, other), len(runs)


def _seconds_per_call(fn: Callable[[], None], device: torch.device, warmup: int, budget: float):
    """Seconds one call of ``fn`` takes, after ``warmup`` calls; at least two timed calls, more
    until ``budget`` seconds have passed (at most 50)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    calls, start = 0, time.perf_counter()
    while calls < 2 or (time.perf_counter() - start < budget and calls < 50):
        fn()
        synchronize(device)
        calls += 1
    return (time.perf_counter() - start) / calls


def calibrate(
    spec: RunSpec,
    device: torch.device,
    image_shape: tuple[int, ...],
    num_classes: int,
    seconds: float = CALIBRATION_SECONDS,
) -> Rates:
    """Rates measured on random data: training steps of the budget's model with the run's norm
    and optimizer (both passes of a two-pass one) at the budget's batch size and precision, then
    inference batches."""
    s = spec.settings
    dtype = autocast_dtype(s["precision"], device)
    model = build_model(s["model"], spec.norm, num_classes, device, **s["model_args"])
    optimizer = create_optimizer(spec.optimizer, model, **spec.hparams)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s["batch_size"], *image_shape), dtype=torch.uint8).to(device)
    labels = torch.randint(0, num_classes, (s["batch_size"],)).to(device)
    padding, flip = s["augment"]["crop_padding"], s["augment"]["flip"]

    def train_step() -> None:
        # The loader's work too: augmentation and conversion are part of a training step's cost.
        batch = random_crop(images, padding, generator) if padding else images
        batch = random_flip(batch, generator) if flip else batch
        x = batch.float().div(255).contiguous(memory_format=torch.channels_last)

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            with autocast(device, dtype):
                out = model(x)
                return out, F.cross_entropy(out, labels, label_smoothing=s["label_smoothing"])

        training_step(optimizer, forward)  # both passes for a two-pass optimizer

    step = _seconds_per_call(train_step, device, warmup=2, budget=seconds)
    # Inference at the evaluation batch size, capped so that calibration stays short.
    eval_batch = min(s["eval_batch_size"], 4 * s["batch_size"])
    x_eval, _ = training_batch(eval_batch, tuple(image_shape), num_classes, device)
    model.eval()

    @torch.inference_mode()
    def infer() -> None:
        with autocast(device, dtype):
            model(x_eval)

    batch = _seconds_per_call(infer, device, warmup=1, budget=seconds / 2)
    return Rates(train=s["batch_size"] / step, evaluation=eval_batch / batch)


def calibrate_probe(
    spec: RunSpec,
    device: torch.device,
    image_shape: tuple[int, ...],
    num_classes: int,
    seconds: float = CALIBRATION_SECONDS,
) -> Rates:
    """A probe run's rate measured on random data: probe batches (forward and backward with the
    probes' hooks) of the budget's model and batch size with the run's norm. Training steps
    between probes are taken to cost the same as a probe batch."""
    from normbench.probes import init_probe

    s = spec.settings
    start = time.perf_counter()
    model = build_model(s["model"], spec.norm, num_classes, device, **s["model_args"])
    batch = training_batch(s["batch_size"], tuple(image_shape), num_classes, device)
    init_probe(model, [batch])  # a run's first batch also builds the model and warms up
    synchronize(device)
    first = time.perf_counter() - start
    seconds_per_batch = _seconds_per_call(
        lambda: init_probe(model, [batch]), device, warmup=0, budget=seconds
    )
    return Rates(
        train=s["batch_size"] / seconds_per_batch,
        evaluation=1.0,
        other=max(first - seconds_per_batch, 0.0),
    )


# --- while a run goes ----------------------------------------------------------------------------


class RunClock:
    """Time left for the running run and for the whole suite.

    ``estimate`` is the plan's breakdown of what this run still has to do and ``rate`` the
    training images/s it assumed (both None when the run was not estimated); ``later`` the
    estimated seconds of the runs after it; ``factor`` how much slower than estimated the runs
    so far went (1: as estimated). Once a few training steps are timed, training left is
    measured, and the rest is the estimate times the run's own factor (estimated / measured
    rate).
    """

    MIN_INTERVALS = 3  # timed steps before the measured rate replaces the estimate

    def __init__(
        self,
        estimate: Breakdown | None,
        rate: float | None,
        batch_size: int,
        later: float = 0.0,
        factor: float = 1.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.estimate, self.rate, self.batch_size = estimate, rate, batch_size
        self.later, self.prior_factor, self.clock = later, factor, clock
        self.steps_left = self.steps_total = 0
        self.evals_total = self.evals_done = 0
        self.eval_fraction = 0.0  # of the evaluation in progress
        self.corruption_start: float | None = None
        self.corruption_done = self.corruption_total = 0
        self.speed_start: float | None = None
        self.last_step: float | None = None
        self.timed_seconds, self.timed_images, self.intervals = 0.0, 0, 0

    # events
    def start(self, epochs: int, steps_per_epoch: int) -> None:
        self.steps_left = self.steps_total = epochs * steps_per_epoch
        self.evals_total = epochs

    def step(self, count: int = 1) -> None:
        """``count`` training steps done since the last call (progress may come in batches)."""
        now = self.clock()
        if self.last_step is not None:  # the first step after a pause holds the warm-up
            self.timed_seconds += now - self.last_step
            self.timed_images += self.batch_size * count
            self.intervals += count
        self.last_step = now
        self.steps_left = max(self.steps_left - count, 0)

    def evaluating(self, done: int, total: int) -> None:
        self.last_step = None  # the gap is evaluation, not training
        self.eval_fraction = done / total if total else 1.0
        if done >= total:
            self.evals_done, self.eval_fraction = self.evals_done + 1, 0.0

    def corruption(self, done: int, total: int) -> None:
        if self.corruption_start is None:
            self.corruption_start = self.clock()
        self.corruption_done, self.corruption_total = done, total

    def speed_check(self) -> None:
        self.speed_start = self.clock()

    # readings
    @property
    def measured_rate(self) -> float | None:
        if self.intervals < self.MIN_INTERVALS or self.timed_seconds <= 0:
            return None
        return self.timed_images / self.timed_seconds

    @property
    def factor(self) -> float:
        """Estimated / measured training rate of this run (or of the runs before it until this
        one has been timed), kept within 1/5 .. 5 so one odd reading cannot run away."""
        measured = self.measured_rate
        if measured is None or not self.rate:
            return self.prior_factor
        return min(max(self.rate / measured, 0.2), 5.0)

    def run_left(self) -> float | None:
        est, factor = self.estimate, self.factor
        if not self.steps_total:  # not training yet: the whole estimate is still ahead
            return None if est is None else est.total * factor
        rate = self.measured_rate or (self.rate / factor if self.rate else None)
        if rate is None:
            return None
        train = self.steps_left * self.batch_size / rate
        if est is None:
            return train  # the rest of an unestimated run is unknown
        evals_left = max(self.evals_total - self.evals_done - self.eval_fraction, 0.0)
        per_eval = est.evaluation / self.evals_total if self.evals_total else 0.0
        now = self.clock()
        if self.corruption_done:
            elapsed = now - self.corruption_start
            corruptions = elapsed * (self.corruption_total - self.corruption_done)
            corruptions /= self.corruption_done
        else:
            corruptions = est.corruptions * factor
        speed = est.speed_check * factor
        if self.speed_start is not None:
            speed = max(speed - (now - self.speed_start), 0.0)
        share = self.steps_left / self.steps_total if self.steps_total else 0.0
        return train + evals_left * per_eval * factor + corruptions + speed + est.other * share

    def suite_left(self) -> float | None:
        run = self.run_left()
        return None if run is None else run + self.later * self.factor
