"""One probe run (task "probe"): the initialization probes of ``normbench.probes`` on a few real
training batches, at initialization and, optionally, at later training steps.

The probe batches are ``batches`` x ``batch_size`` training images drawn once without replacement
with the run's seed (no augmentation) and probed again at every step of ``probe_steps``, so the
steps differ only in the model. Between two probe steps the model trains with the run's optimizer
at a constant learning rate on shuffled, augmented batches of the same size, from a generator of
its own. A probe that meets non-finite activations, or a training step with a non-finite loss,
ends the run as ``diverged``, with the rows measured before it.

With a checkpoint path and more than one probe step, the model, the optimizer, the training
order's position and the rows are saved after every probe step (atomically), and a rerun resumes
after the last saved one with the same rows an uninterrupted run gives.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normbench import metrics as M
from normbench.data import NORMALIZATION, ArrayDataset, TensorLoader, load_dataset
from normbench.errors import NormbenchError
from normbench.metrics import MetricRow
from normbench.models import conv_norm_factory, create_model, parameter_count
from normbench.norms import norm_source_sha256
from normbench.normspeed import build_model, training_batch
from normbench.optim import NonFiniteStep, create_optimizer, training_step
from normbench.probes import init_probe, model_blocks
from normbench.runtime import synchronize
from normbench.suites import RunSpec
from runners.classify import Progress, RunResult, _load_checkpoint, _save_checkpoint

# The training order's generator is seeded with the run's seed plus this, so that its first
# permutation is not the one the probe batches were drawn from.
TRAIN_STREAM = 1


def _check_settings(s: dict[str, Any]) -> list[int]:
    """The probe steps, after checking the settings a probe run needs."""
    steps = s["probe_steps"]
    if (
        not isinstance(steps, list | tuple)
        or not steps
        or any(not _is_int(t) or t < 0 for t in steps)
        or list(steps) != sorted(set(steps))
    ):
        raise NormbenchError(
            f"probe_steps must be distinct training steps >= 0 in ascending order; got {steps!r}"
        )
    if not _is_int(s["batch_size"]) or s["batch_size"] < 2:
        raise NormbenchError(
            f"a probe batch needs at least 2 samples (batch_size); got {s['batch_size']!r}"
        )
    if not _is_int(s["batches"]) or s["batches"] < 1:
        raise NormbenchError(f"batches must be an integer >= 1; got {s['batches']!r}")
    if s.get("precision", "fp32") != "fp32":
        raise NormbenchError(f"probes run in fp32; got precision {s['precision']!r}")
    return list(steps)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def probe_batches(
    train_set: ArrayDataset, spec: RunSpec, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` batches of ``batch_size`` training images drawn without replacement with the
    run's seed, normalized, not augmented."""
    s = spec.settings
    n = s["batches"] * s["batch_size"]
    if n > len(train_set):
        raise NormbenchError(
            f"the probe needs {s['batches']} x {s['batch_size']} = {n} training images; the "
            f"training set has {len(train_set)} (train_subset {s['train_subset']})"
        )
    generator = torch.Generator().manual_seed(spec.seed)
    idx = torch.randperm(len(train_set), generator=generator)[:n]
    chosen = ArrayDataset(train_set.images[idx], train_set.labels[idx], train_set.classes, "")
    mean, std = NORMALIZATION[spec.dataset]
    loader = TensorLoader(chosen, s["batch_size"], device=device, train=False, mean=mean, std=std)
    return list(loader)


class TrainStream:
    """Endless training batches from a ``TensorLoader``, epoch after epoch, whose position can be
    saved and restored: the generator's state at the start of the current epoch and the batches
    taken since (a restore replays them, which redraws the same crops and flips)."""

    def __init__(self, loader: TensorLoader) -> None:
        if len(loader) == 0:
            raise NormbenchError(
                f"training between probe steps needs at least one batch of {loader.batch_size} "
                f"images; the training set has {len(loader.labels)}"
            )
        self.loader = loader
        self._new_epoch()

    def _new_epoch(self) -> None:
        # A TensorLoader draws its permutation at the first batch, so the state taken here, before
        # it, replays the whole epoch.
        self.epoch_state = self.loader.generator.get_state()
        self.iterator = iter(self.loader)
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == len(self.loader):
            self._new_epoch()
        self.position += 1
        return next(self.iterator)

    def state(self) -> dict[str, Any]:
        return {"epoch_state": self.epoch_state, "position": self.position}

    def restore(self, state: dict[str, Any]) -> None:
        self.loader.generator.set_state(state["epoch_state"].cpu())
        self._new_epoch()
        for _ in range(state["position"]):
            self.next()


def _row_tuple(row: MetricRow) -> tuple:
    return (row.name, row.value, row.split, row.corruption, row.severity, row.layer, row.step)


def run(
    spec: RunSpec,
    *,
    device: torch.device,
    data_dir: str | Path | None = None,
    checkpoint: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Probe ``spec``'s model at every step of its ``probe_steps``, training in between."""
    progress = progress or Progress()
    s = spec.settings
    wall_start = time.perf_counter()
    steps = _check_settings(s)
    batch_size, batches = s["batch_size"], s["batches"]

    # Subsets use a fixed seed, not the run's, so every run of a budget sees the same examples.
    train_set = load_dataset(spec.dataset, "train", data_dir).subset(s["train_subset"], seed=0)
    probes = probe_batches(train_set, spec, device)

    torch.manual_seed(spec.seed)
    model = create_model(
        s["model"],
        block=conv_norm_factory(spec.norm),
        num_classes=len(train_set.classes),
        **s["model_args"],
    ).to(device, memory_format=torch.channels_last)
    blocks = model_blocks(model)
    trains = steps[-1] > 0
    optimizer = create_optimizer(spec.optimizer, model, **spec.hparams) if trains else None
    stream = None
    if trains:
        mean, std = NORMALIZATION[spec.dataset]
        stream = TrainStream(
            TensorLoader(
                train_set,
                batch_size,
                device=device,
                train=True,
                generator=torch.Generator().manual_seed(spec.seed + TRAIN_STREAM),
                crop_padding=s["augment"]["crop_padding"],
                flip=s["augment"]["flip"],
                mean=mean,
                std=std,
            )
        )

    done, step, rows, earlier_wall = 0, 0, [], 0.0
    state = _load_checkpoint(checkpoint, device) if checkpoint is not None else None
    resumed = state is not None and state.get("run_key") == spec.key
    if resumed:
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
            stream.restore(state["stream"])
        _set_rng_state(state["rng"], device)
        done, step, earlier_wall = state["probes_done"], state["step"], state["wall_seconds"]
        rows = [MetricRow(*r) for r in state["rows"]]

    result = RunResult(status="finished", epochs_done=done)
    result.info = {
        "precision": "fp32",
        "blocks": [name for name, _ in blocks],
        "convs": [],
        "probe_examples": batches * batch_size,
        "data_source": train_set.source,
        "norm_source_sha256": norm_source_sha256(spec.norm),
    }
    if resumed:
        result.info["resumed_from_probe_step"] = steps[done]
    progress.on_start(1, len(steps) * batches + steps[-1])
    unit = done * batches + step  # the units a resumed run has behind it

    def tick() -> None:
        nonlocal unit
        unit += 1
        progress.on_step(unit)

    model.train()
    for index in range(done, len(steps)):
        target = steps[index]
        while step < target:  # train up to the probe step
            x, y = stream.next()

            def forward(x=x, y=y) -> tuple[torch.Tensor, torch.Tensor]:
                out = model(x)
                return out, F.cross_entropy(out, y)

            try:
                training_step(optimizer, forward)
            except NonFiniteStep as err:
                result.status, result.diverged_step = "diverged", step
                result.reason = f"{err} at step {step}"
                break
            step += 1
            tick()
        if result.status == "diverged":
            break

        probe = init_probe(model, _ticking(probes, tick), blocks=blocks)
        rows += probe.rows(target)
        result.info["convs"] = probe.conv_names
        if probe.grad_at == "block":
            result.info["grad_norms_at"] = "block outputs: the model has no convolutions"
        if probe.nonfinite_block is not None:
            result.status, result.diverged_step = "diverged", target
            result.reason = (
                f"non-finite activations at block {probe.nonfinite_block} "
                f"({probe.nonfinite_name}) at step {target}"
            )
            break
        done = result.epochs_done = index + 1
        if checkpoint is not None and len(steps) > 1 and done < len(steps):
            _save_checkpoint(
                checkpoint,
                {
                    "run_key": spec.key,
                    "probes_done": done,
                    "step": step,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict() if optimizer is not None else {},
                    "stream": stream.state() if stream is not None else {},
                    "rng": _rng_state(device),
                    "rows": [_row_tuple(r) for r in rows],
                    "wall_seconds": earlier_wall + time.perf_counter() - wall_start,
                },
            )

    rows.append(MetricRow(M.PARAM_COUNT, float(parameter_count(model))))
    # Wall time sums the sessions of a resumed run (each from its own start, data loading included).
    rows.append(MetricRow(M.WALL_TIME, earlier_wall + time.perf_counter() - wall_start))
    result.metrics = rows
    return result


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global generators a model may draw from while it trains (dropout)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _ticking(batches, tick):
    """The batches, calling ``tick`` after each one has been probed."""
    for batch in batches:
        yield batch
        tick()


def estimate_seconds(spec: RunSpec, device: torch.device, image_shape, num_classes: int) -> float:
    """Predicted seconds of the whole run: its units (probe batches and training steps) times the
    time of one, measured on random data after a warm-up."""
    s = spec.settings
    steps = _check_settings(s)
    model = build_model(s["model"], spec.norm, num_classes, device, **s["model_args"])
    x, y = training_batch(s["batch_size"], tuple(image_shape), num_classes, device)

    def timed(fn) -> float:
        fn()  # warm-up: allocator, kernel choice
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return time.perf_counter() - start

    probe_time = timed(lambda: init_probe(model, [(x, y)]))
    seconds = len(steps) * s["batches"] * probe_time
    if steps[-1] > 0:
        optimizer = create_optimizer(spec.optimizer, model, **spec.hparams)

        def step(model: nn.Module = model) -> None:
            def forward() -> tuple[torch.Tensor, torch.Tensor]:
                out = model(x)
                return out, F.cross_entropy(out, y)

            # Random data may diverge; the time of the forward pass still counts.
            with contextlib.suppress(NonFiniteStep):
                training_step(optimizer, forward)

        seconds += steps[-1] * timed(step)
    return seconds
