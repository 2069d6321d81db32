"""Train one image-classification RunSpec and evaluate it.

The loop is deliberately plain: a tensor-resident loader, autocast where the budget asks for it,
a per-step learning-rate factor, and one checkpoint per epoch so an interrupted run resumes from
its last finished epoch with the same data order (the loader's generator state is saved too).
A non-finite loss stops the run with status ``diverged`` and the step where it happened.

With the budget's ``landscape`` option, the loss-landscape and internal covariate shift probes of
``normbench.landscape`` run on the current training batch at step 0 and every ``every`` steps,
before that step's update. They leave the model and the random stream as they were, so the run
trains exactly as it would without them; their time is left out of the training time and
throughput and reported on its own.

With the budget's ``adaptation`` option, the trained model is also evaluated with its norms
adapted at test time (``normbench.adaptation``: BN adaptation, TENT) on the clean test set and
each (corruption, severity), under metric names of its own.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normbench import metrics as M
from normbench.adaptation import adapted_accuracies
from normbench.adaptation import describe as describe_adaptation
from normbench.attacks import (
    AttackSettings,
    NoInputGradient,
    adversarial_accuracy,
    pixel_normalizer,
)
from normbench.corruptions import ALL as CORRUPTIONS_ALL
from normbench.corruptions import SEVERITIES, TABLE_VERSION
from normbench.corruptions.imagenet_c import ImageNetC
from normbench.corruptions.sets import corruption_images
from normbench.data import NORMALIZATION, TensorLoader, load_dataset
from normbench.label_noise import noisy_training_set
from normbench.landscape import ics_probe, landscape_probe
from normbench.metrics import Evaluation, MetricRow
from normbench.models import conv_norm_factory, create_model, parameter_count
from normbench.norms import norm_source_sha256
from normbench.normspeed import REFERENCE, build_model, interleaved, side_by_side, training_batch
from normbench.optim import (
    DivergenceWatch,
    NonFiniteStep,
    SharpnessAware,
    create_optimizer,
    hparam_shares,
    lr_factor,
    training_step,
)
from normbench.robustness import aggregate_rows
from normbench.runtime import (
    RunMemory,
    autocast,
    autocast_dtype,
    compiled_for_training,
    configure_kernels,
    synchronize,
)
from normbench.suites import RunSpec

WARMUP_STEPS = 5  # steps per epoch left out of the throughput figure (allocator, kernel choice)


@dataclass
class RunResult:
    status: str  # "finished" or "diverged"
    metrics: list[MetricRow] = field(default_factory=list)
    curves: list[tuple[int, str, float]] = field(default_factory=list)  # (epoch, name, value)
    epochs_done: int = 0
    diverged_step: int | None = None
    reason: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # provenance added by the runner
    artifacts: dict[str, bytes] = field(default_factory=dict)  # named files (a sample grid)


@dataclass
class Progress:
    """Callbacks the launcher passes in to show progress (all optional)."""

    on_start: Callable[[int, int], None] = lambda epochs, steps_per_epoch: None
    on_step: Callable[[int], None] = lambda step: None
    on_epoch: Callable[[int, dict[str, float]], None] = lambda epoch, values: None
    on_eval_batch: Callable[[int, int], None] = lambda done, total: None  # clean test set
    # (corruption, severity) pairs evaluated so far, called with 0 before the first
    on_corruption: Callable[[int, int], None] = lambda done, total: None
    on_speed_check: Callable[[], None] = lambda: None  # the end-of-run speed check begins


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: TensorLoader,
    dtype: torch.dtype | None,
    on_batch: Callable[[int, int], None] = lambda done, total: None,
) -> Evaluation:
    """Accuracy, loss, ECE and steady-state throughput on ``loader``."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    # The first batch is left out of the rate (warm-up) unless it is the only one.
    skip = 1 if len(loader) > 1 else 0
    timed_images, start = 0, None
    for i, (x, y) in enumerate(loader):
        if i == skip:
            synchronize(loader.device)
            start = time.perf_counter()
        with autocast(loader.device, dtype):
            logits.append(model(x).float())
        labels.append(y)
        if i >= skip:
            timed_images += len(y)
        on_batch(i + 1, len(loader))
    synchronize(loader.device)
    elapsed = time.perf_counter() - start if start is not None else 0.0
    model.train(was_training)
    accuracy, loss, ece = M.classification_metrics(torch.cat(logits).cpu(), torch.cat(labels).cpu())
    rate = timed_images / elapsed if elapsed > 0 else float("nan")
    return Evaluation(accuracy, loss, ece, rate)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint intact


def corruption_source(
    spec: RunSpec, test_set, data_dir: str | Path | None, device: torch.device
):
    """Where the corrupted evaluation images come from: an object with ``load(name, severity)``,
    ``source`` and ``images_per_pair``. CIFAR-10-C: the official files, else a complete cached
    set, else (on CUDA) each (corruption, severity) generated on the device as it is evaluated,
    else generated on the CPU into the cache once (normbench.corruptions.sets)."""
    s = spec.settings
    if s["corruption_set"] == "imagenet-c":
        return ImageNetC(test_set, data_dir, subset=s["corruption_subset"])
    return corruption_images(data_dir, subset=s["corruption_subset"], device=device)


def evaluate_corruptions(
    model: nn.Module,
    spec: RunSpec,
    device: torch.device,
    dtype: torch.dtype | None,
    loader_for: Callable[[Any], TensorLoader],
    cset,
    result: RunResult,
    progress: Progress,
    adapt: Callable[[Any], dict[str, float]] | None = None,
) -> list[MetricRow]:
    """Accuracy on every (corruption, severity) of the suite's corruption set, and aggregates;
    with ``adapt`` (see ``adapter``), each adapted accuracy too, under its own name."""
    result.info |= {
        "corruption_set": cset.source,
        "corruption_table": TABLE_VERSION,
        "corruption_engine": cset.engine_version,
        "corruption_subset": spec.settings["corruption_subset"],
        "corruption_images_per_pair": cset.images_per_pair,
    }
    accuracy: dict[tuple[str, int], float] = {}
    adapted: dict[str, dict[tuple[str, int], float]] = {}  # adapted metric -> its accuracies
    pairs = [(c, sev) for c in CORRUPTIONS_ALL for sev in SEVERITIES]
    progress.on_corruption(0, len(pairs))
    for i, (name, severity) in enumerate(pairs):
        images = cset.load(name, severity)
        accuracy[name, severity] = evaluate(model, loader_for(images), dtype).accuracy
        for metric, value in (adapt(images) if adapt is not None else {}).items():
            adapted.setdefault(metric, {})[name, severity] = value
        progress.on_corruption(i + 1, len(pairs))
    rows = [MetricRow(M.ACCURACY, a, "test", c, sev) for (c, sev), a in accuracy.items()]
    rows += aggregate_rows(accuracy)
    for metric, values in adapted.items():
        rows += [MetricRow(metric, a, "test", c, sev) for (c, sev), a in values.items()]
        rows += aggregate_rows(values, metric)
    return rows


def adapter(
    spec: RunSpec, model: nn.Module, device: torch.device, dtype: torch.dtype | None, result
) -> Callable[[Any], dict[str, float]] | None:
    """The budget's test-time adaptation of ``model`` (normbench.adaptation) as a function from
    one test stream (clean, or one corruption at one severity) to each method's accuracy on it;
    None when the budget has none. The protocol goes to ``result.info["adaptation"]``."""
    options = spec.settings.get("adaptation")
    if not options:
        return None
    result.info["adaptation"] = describe_adaptation(options)
    mean, std = NORMALIZATION[spec.dataset]
    return lambda ds: adapted_accuracies(
        model, ds, options, device=device, dtype=dtype, mean=mean, std=std
    )


def evaluate_adversarial(
    model: nn.Module, spec: RunSpec, test_set, device: torch.device, result: RunResult
) -> list[MetricRow]:
    """Clean, FGSM and PGD accuracy (normbench.attacks) on the budget's fixed seeded subset of
    the test images; the settings go to ``result.info["adversarial"]``. A model that cannot be
    attacked (no gradient reaches its input) gets the reason there instead of metric rows."""
    options = dict(spec.settings["adversarial"])
    subset = test_set.subset(options.pop("subset"), seed=0)  # the same images for every run
    settings = AttackSettings(**options)
    info = settings.describe() | {"images": len(subset), "random_start_seed": spec.seed}
    result.info["adversarial"] = info
    mean, std = NORMALIZATION[spec.dataset]
    try:
        acc = adversarial_accuracy(
            model,
            subset.images.to(device),
            subset.labels.to(device),
            settings,
            generator=torch.Generator().manual_seed(spec.seed),
            normalize=pixel_normalizer(mean, std, device),
        )
    except NoInputGradient as err:
        info["not_measured"] = str(err)
        return []
    return [
        MetricRow(M.ADV_CLEAN_ACCURACY, acc.clean, "test"),
        MetricRow(M.FGSM_ACCURACY, acc.fgsm, "test"),
        MetricRow(M.PGD_ACCURACY, acc.pgd, "test"),
    ]


def _load_checkpoint(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The saved state, or None when there is none or it cannot be read (then start afresh)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the epochs it held
        path.unlink(missing_ok=True)
        return None


def run(
    spec: RunSpec,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    checkpoint: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Train and evaluate ``spec``; then time its norm side by side with BatchNorm."""
    with RunMemory(device) as memory:
        return _run(spec, device, data_dir, checkpoint, progress or Progress(), memory)


def speed_vs_batchnorm(
    spec: RunSpec, device: torch.device, dtype: torch.dtype | None, image_shape, num_classes: int
) -> list[MetricRow]:
    """The run's model configuration with its norm, timed against the same with BatchNorm in
    interleaved repetitions in this process (see ``normbench.normspeed``)."""
    s = spec.settings
    candidate, reference = (
        build_model(s["model"], norm, num_classes, device, **s["model_args"])
        for norm in (spec.norm, REFERENCE)
    )
    x, y = training_batch(s["batch_size"], tuple(image_shape), num_classes, device)
    speed = side_by_side(candidate, reference, x, y, dtype=dtype, pairs=s["speed_pairs"])
    return [
        MetricRow(M.SPEED_VS_BN, speed.ratio, "train"),
        MetricRow(M.SPEED_VS_BN_IQR, speed.iqr, "train"),
    ]


def speed_vs_base_optimizer(
    spec: RunSpec, device: torch.device, dtype: torch.dtype | None, image_shape, num_classes: int
) -> list[MetricRow]:
    """Training steps of the run's model with its two-pass optimizer against the same model with
    the base optimizer, in interleaved repetitions in this process: the cost of the second pass
    as a ratio that machine load does not skew."""
    s = spec.settings
    base, _, base_hparams = hparam_shares(spec.optimizer, spec.hparams)[-1]
    x, y = training_batch(s["batch_size"], tuple(image_shape), num_classes, device)
    steps = []
    for optimizer_name, hparams in ((spec.optimizer, spec.hparams), (base, base_hparams)):
        model = build_model(s["model"], spec.norm, num_classes, device, **s["model_args"])
        optimizer = create_optimizer(optimizer_name, model, **hparams)

        def forward(model=model) -> tuple[torch.Tensor, torch.Tensor]:
            with autocast(device, dtype):
                out = model(x)
                return out, F.cross_entropy(out, y)

        def train(n: int, optimizer=optimizer, forward=forward) -> None:
            for _ in range(n):
                training_step(optimizer, forward)

        steps.append(train)
    speed = interleaved(*steps, len(x), device, pairs=s["speed_pairs"])
    return [
        MetricRow(M.SPEED_VS_BASE_OPTIMIZER, speed.ratio, "train"),
        MetricRow(M.SPEED_VS_BASE_OPTIMIZER_IQR, speed.iqr, "train"),
    ]


#: A landscape probe's values as a checkpoint keeps them: (name, value, layer, step).
ProbeValue = tuple[str, float, int, int]


def landscape_values(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    options: dict[str, Any],
    *,
    lr: float,
    step: int,
) -> list[ProbeValue]:
    """The landscape probe (and, with ``ics``, the ICS probe at learning rate ``lr``) on the batch
    ``loss_fn`` computes the loss of, as values measured at training step ``step``."""
    r = landscape_probe(model, loss_fn, options["step_sizes"])
    values = [
        (M.LANDSCAPE_LOSS_MIN, r.loss_min, -1, step),
        (M.LANDSCAPE_LOSS_MAX, r.loss_max, -1, step),
        (M.LANDSCAPE_GRAD_CHANGE_MIN, r.grad_change_min, -1, step),
        (M.LANDSCAPE_GRAD_CHANGE_MAX, r.grad_change_max, -1, step),
        (M.LANDSCAPE_BETA, r.beta, -1, step),
    ]
    if options.get("ics", True):
        ics = ics_probe(model, loss_fn, lr=lr)
        values += [(M.ICS_L2, v, layer, step) for layer, v in enumerate(ics.l2)]
        values += [(M.ICS_COSINE, v, layer, step) for layer, v in enumerate(ics.cosine)]
    return values


def landscape_rows(values: list[ProbeValue]) -> tuple[list[MetricRow], int]:
    """Metric rows of the probes' values, then the whole-run summaries: means over the probed
    steps (and weight layers, for ICS) of the loss range, the largest gradient change, the
    effective beta-smoothness and the ICS values. Non-finite values are left out (the store
    keeps numbers only) of the rows and of the means; returns the rows and how many values
    were left out."""
    rows = [
        MetricRow(name, value, "train", layer=layer, step=step)
        for name, value, layer, step in values
        if math.isfinite(value)
    ]
    left_out = len(values) - len(rows)

    def finite(name: str) -> dict[tuple[int, int], float]:
        return {(r.step, r.layer): r.value for r in rows if r.name == name}

    low, high = finite(M.LANDSCAPE_LOSS_MIN), finite(M.LANDSCAPE_LOSS_MAX)
    summaries = {
        M.LANDSCAPE_LOSS_RANGE_MEAN: [high[k] - low[k] for k in high.keys() & low.keys()],
        M.LANDSCAPE_GRAD_PRED_MEAN: list(finite(M.LANDSCAPE_GRAD_CHANGE_MAX).values()),
        M.LANDSCAPE_BETA_MEAN: list(finite(M.LANDSCAPE_BETA).values()),
        M.ICS_L2_MEAN: list(finite(M.ICS_L2).values()),
        M.ICS_COSINE_MEAN: list(finite(M.ICS_COSINE).values()),
    }
    rows += [MetricRow(name, math.fsum(v) / len(v), "train") for name, v in summaries.items() if v]
    return rows, left_out


def _run(
    spec: RunSpec,
    device: torch.device,
    data_dir: str | Path | None,
    checkpoint: Path | None,
    progress: Progress,
    memory: RunMemory,
) -> RunResult:
    s = spec.settings
    wall_start = time.perf_counter()
    dtype = autocast_dtype(s["precision"], device)

    # Subsets use a fixed seed, not the run's, so every run of a budget sees the same examples.
    train_set = load_dataset(spec.dataset, "train", data_dir).subset(s["train_subset"], seed=0)
    # A label-noise variant trains on noisy labels (its own seed); test labels stay clean.
    train_set, label_noise = noisy_training_set(train_set, s.get("label_noise"))
    test_set = load_dataset(spec.dataset, "test", data_dir).subset(s["test_subset"], seed=0)

    torch.manual_seed(spec.seed)
    model = create_model(
        s["model"],
        block=conv_norm_factory(spec.norm),
        num_classes=len(train_set.classes),
        **s["model_args"],
    ).to(device, memory_format=torch.channels_last)
    optimizer = create_optimizer(spec.optimizer, model, **spec.hparams)
    peak_lrs = [g["lr"] for g in optimizer.param_groups]
    # On the run's device: shuffles, crop offsets and flip masks never cross the bus.
    generator = torch.Generator(device=device).manual_seed(spec.seed)
    mean, std = NORMALIZATION[spec.dataset]
    train_loader = TensorLoader(
        train_set,
        s["batch_size"],
        device=device,
        train=True,
        generator=generator,
        crop_padding=s["augment"]["crop_padding"],
        flip=s["augment"]["flip"],
        mean=mean,
        std=std,
    )

    def eval_loader(ds) -> TensorLoader:
        return TensorLoader(
            ds, s["eval_batch_size"], device=device, train=False, mean=mean, std=std
        )

    test_loader = eval_loader(test_set)
    steps_per_epoch = len(train_loader)
    total_steps = s["epochs"] * steps_per_epoch

    start_epoch, curves = 0, []
    timed_images, timed_seconds, train_seconds, earlier_wall = 0, 0.0, 0.0, 0.0
    landscape = s.get("landscape")  # None: no probes during training
    probe_values: list[ProbeValue] = []
    probes, probe_seconds = 0, 0.0
    state = _load_checkpoint(checkpoint, device) if checkpoint is not None else None
    if state is not None and state.get("run_key") == spec.key:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # the checkpoint was loaded onto the device; a generator's state lives on the CPU
        generator.set_state(state["generator"].cpu())
        start_epoch, curves = state["epoch"], state["curves"]
        timed_images, timed_seconds = state["timed_images"], state["timed_seconds"]
        train_seconds, earlier_wall = state["train_seconds"], state["wall_seconds"]
        if landscape is not None:
            probe_values = [tuple(v) for v in state["landscape_values"]]
            probes, probe_seconds = state["landscape_probes"], state["landscape_seconds"]

    result = RunResult(status="finished", curves=curves, epochs_done=start_epoch)
    result.info = {
        "precision": "bf16" if dtype is torch.bfloat16 else "fp32",
        "sync_every": s["sync_every"],
        "resumed_from_epoch": start_epoch,
        "norm_source_sha256": norm_source_sha256(spec.norm),
        "train_examples": len(train_set),
        "test_examples": len(test_set),
        "data_source": train_set.source,
    }
    if label_noise is not None:
        result.info["label_noise"] = label_noise
    if s.get("lr_scaling"):  # a batch-size variant: lr * batch_size / the budget's batch size
        result.info["lr_scaling"] = {**s["lr_scaling"], "batch_size": s["batch_size"]}
    if isinstance(optimizer, SharpnessAware):
        result.info["two_pass"] = optimizer.describe()
    result.info |= configure_kernels(device, s["cudnn_benchmark"])
    train_model = compiled_for_training(model, s, device, result.info)
    progress.on_start(s["epochs"] - start_epoch, steps_per_epoch)
    warmup = min(WARMUP_STEPS, steps_per_epoch // 4)
    # The training step never waits on the device: divergence and the step count are read back
    # every sync_every steps and after each epoch's first and last steps (see DivergenceWatch).
    watch = DivergenceWatch(device, start=start_epoch * steps_per_epoch)
    evaluation: Evaluation | None = None
    model.train()
    for epoch in range(start_epoch, s["epochs"]):
        step = epoch * steps_per_epoch
        losses, correct, seen = [], torch.zeros((), device=device), 0
        epoch_start = time.perf_counter()
        timer_start = epoch_start if warmup == 0 else None
        # Probe time, left out of the training time and of the throughput's window.
        epoch_probe_seconds, window_probe_seconds = 0.0, 0.0
        for i, (x, y) in enumerate(train_loader):
            if i == warmup and warmup > 0:
                synchronize(device)
                timer_start = time.perf_counter()
            factor = lr_factor(
                s["schedule"],
                step,
                total_steps,
                warmup=s["warmup"],
                milestones=tuple(s["milestones"]),
            )
            for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
                group["lr"] = peak * factor

            def forward(x=x, y=y) -> tuple[torch.Tensor, torch.Tensor]:
                with autocast(device, dtype):
                    out = train_model(x)
                    return out, F.cross_entropy(out, y, label_smoothing=s["label_smoothing"])

            if landscape is not None and step % landscape["every"] == 0:
                synchronize(device)
                probe_start = time.perf_counter()
                probe_values += landscape_values(
                    model,
                    lambda forward=forward: forward()[1],
                    landscape,
                    lr=optimizer.param_groups[0]["lr"],
                    step=step,
                )
                synchronize(device)
                spent = time.perf_counter() - probe_start
                probes, probe_seconds = probes + 1, probe_seconds + spent
                epoch_probe_seconds += spent
                window_probe_seconds += spent if timer_start is not None else 0.0

            out, loss = training_step(optimizer, forward, watch)
            losses.append(loss.detach())
            correct += (out.argmax(1) == y).sum()
            seen += len(y)
            step += 1
            # also after an epoch's first step: the display times the steps from there on
            if step % s["sync_every"] == 0 or i == 0 or i + 1 == steps_per_epoch:
                try:
                    progress.on_step(watch.poll())
                except NonFiniteStep as err:
                    result.status, result.diverged_step = "diverged", watch.first_bad_step
                    result.reason = str(err)
                    break
        synchronize(device)
        now = time.perf_counter()
        train_seconds += now - epoch_start - epoch_probe_seconds
        if timer_start is not None and result.status == "finished":
            timed_images += (steps_per_epoch - warmup) * s["batch_size"]
            timed_seconds += now - timer_start - window_probe_seconds
        if result.status == "diverged":
            break
        evaluation = evaluate(model, test_loader, dtype, progress.on_eval_batch)
        values = {
            "train_loss": torch.stack(losses).float().mean().item(),
            "train_accuracy": correct.item() / max(seen, 1),
            "test_loss": evaluation.loss,
            "test_accuracy": evaluation.accuracy,
            "lr": peak_lrs[0] * factor,
        }
        curves.extend((epoch + 1, name, value) for name, value in values.items())
        result.epochs_done = epoch + 1
        if checkpoint is not None and epoch + 1 < s["epochs"]:
            _save_checkpoint(
                checkpoint,
                {
                    "run_key": spec.key,
                    "epoch": epoch + 1,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "curves": curves,
                    "timed_images": timed_images,
                    "timed_seconds": timed_seconds,
                    "train_seconds": train_seconds,
                    "wall_seconds": earlier_wall + time.perf_counter() - wall_start,
                    "landscape_values": [list(v) for v in probe_values],
                    "landscape_probes": probes,
                    "landscape_seconds": probe_seconds,
                },
            )
        progress.on_epoch(epoch + 1, values)  # after the checkpoint: what it reports is saved

    rows = [
        MetricRow(M.PARAM_COUNT, float(parameter_count(model))),
        MetricRow(M.EPOCHS, float(result.epochs_done)),
        MetricRow(M.TRAIN_TIME, train_seconds),
    ]
    if label_noise is not None:
        rows.append(MetricRow(M.LABEL_NOISE_RATE_ACTUAL, label_noise["rate_actual"], "train"))
    if timed_seconds > 0:
        rows.append(MetricRow(M.TRAIN_THROUGHPUT, timed_images / timed_seconds, "train"))
    if evaluation is not None and result.status == "finished":
        rows += [
            MetricRow(M.ACCURACY, evaluation.accuracy, "test"),
            MetricRow(M.LOSS, evaluation.loss, "test"),
            MetricRow(M.ECE, evaluation.ece, "test"),
            MetricRow(M.EVAL_THROUGHPUT, evaluation.images_per_s, "test"),
        ]
        if s.get("adversarial"):
            rows += evaluate_adversarial(model, spec, test_set, device, result)
        adapt = adapter(spec, model, device, dtype, result)
        if adapt is not None:  # the clean test set, adapted
            rows += [MetricRow(name, value, "test") for name, value in adapt(test_set).items()]
        if s.get("corruption_set"):
            cset = corruption_source(spec, test_set, data_dir, device)
            rows += evaluate_corruptions(
                model, spec, device, dtype, eval_loader, cset, result, progress, adapt
            )
    if landscape is not None:
        probe_rows, left_out = landscape_rows(probe_values)
        rows += probe_rows
        result.info["landscape"] = {
            "every": landscape["every"],
            "step_sizes": list(landscape["step_sizes"]),
            "ics": landscape.get("ics", True),
            "probes": probes,
            "seconds": probe_seconds,
            "nonfinite_values": left_out,
        }
    # Wall time sums the sessions of a resumed run (each from its own start, data loading included).
    rows.append(MetricRow(M.WALL_TIME, earlier_wall + time.perf_counter() - wall_start))
    rows.append(MetricRow(M.PEAK_MEMORY, memory.peak_mb()))  # before the speed check's models
    if result.status == "finished" and s["speed_pairs"]:
        shape, classes = train_set.images.shape[1:], len(train_set.classes)
        del model, optimizer  # the speed check builds its own two models
        progress.on_speed_check()
        try:
            rows += speed_vs_batchnorm(spec, device, dtype, shape, classes)
        except torch.OutOfMemoryError:  # the trained run stands; only its speed ratio is missing
            result.info["speed_vs_batchnorm"] = "not measured: out of memory"
        if "two_pass" in result.info:
            try:
                rows += speed_vs_base_optimizer(spec, device, dtype, shape, classes)
            except (torch.OutOfMemoryError, NonFiniteStep) as err:  # random data, tiny batch
                result.info["speed_vs_base_optimizer"] = f"not measured: {err}"
    result.metrics = rows
    return result
