"""A norm's speed as a ratio to BatchNorm, measured side by side in one process.

A ratio of two throughputs measured at different times says as much about what else the machine
was doing as about the norms. Here the model with the norm and the same model with BatchNorm are
built in one process and timed in interleaved repetitions (A B, B A, A B, ...): a change of
machine load slows both sides of a pair alike, so each pair gives one ratio, and the result is
the median over the pairs with the interquartile range of the pairs' ratios as its spread. Both
models are timed as they train: channels_last memory format, the precision's autocast dtype,
forward and backward passes of a cross-entropy loss.

Every run measures its own model configuration this way when it ends (``runners/classify.py``),
and a run with a two-pass optimizer also times its optimizer against its base optimizer the
same way (``interleaved`` takes any two training-step functions);
``normbench bench norms`` measures a table of norms in one fixed network (ResNet-20).

Memory in the table: on CUDA the peak allocated memory of one training step; on the CPU (where
the allocator keeps no such figure) the bytes of the tensors autograd saves for the backward
pass, which is what a norm adds to a step's peak.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from normbench.models import conv_norm_factory, create_model, parameter_count
from normbench.runtime import autocast, synchronize

MODEL = "resnet20"
REFERENCE = "batchnorm"
PAIRS = 7  # interleaved pairs of repetitions
MIN_REPETITION_SECONDS = 0.05  # a repetition runs enough steps to last at least this long


@dataclass(frozen=True)
class SideBySide:
    ratio: float  # median over the pairs of (norm images/s) / (BatchNorm images/s)
    iqr: float  # interquartile range of the pairs' ratios
    images_per_s: float  # the norm's model, median over its repetitions
    reference_images_per_s: float  # the BatchNorm model, median over its repetitions
    pairs: int
    steps: int  # training steps per repetition


def build_model(
    model: str, norm: str, num_classes: int, device: torch.device, **model_args
) -> nn.Module:
    """``model`` built with ``norm``, as a run builds it (channels_last, training mode)."""
    torch.manual_seed(0)
    net = create_model(model, block=conv_norm_factory(norm), num_classes=num_classes, **model_args)
    return net.to(device, memory_format=torch.channels_last).train()


def training_batch(
    batch_size: int, shape: tuple[int, ...], num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random input batch of images of ``shape`` (C, H, W), channels_last, and labels."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *shape, generator=generator)
    y = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return x.to(device, memory_format=torch.channels_last), y.to(device)


def _train_steps(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None, steps: int
) -> None:
    for _ in range(steps):
        with autocast(x.device, dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)


def side_by_side(
    candidate: nn.Module,
    reference: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    pairs: int = PAIRS,
    min_seconds: float = MIN_REPETITION_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
) -> SideBySide:
    """Time training steps of ``candidate`` and ``reference`` (two distinct models) on the same
    batch in ``pairs`` interleaved pairs of repetitions; the ratio is candidate / reference
    images/s."""
    if candidate is reference:
        raise ValueError("time two distinct models (build the reference a second time)")
    return interleaved(
        lambda steps: _train_steps(candidate, x, y, dtype, steps),
        lambda steps: _train_steps(reference, x, y, dtype, steps),
        len(x),
        x.device,
        pairs=pairs,
        min_seconds=min_seconds,
        clock=clock,
    )


def interleaved(
    candidate: Callable[[int], None],
    reference: Callable[[int], None],
    batch_size: int,
    device: torch.device,
    *,
    pairs: int = PAIRS,
    min_seconds: float = MIN_REPETITION_SECONDS,
    clock: Callable[[], float] = time.perf_counter,
) -> SideBySide:
    """Time ``candidate(steps)`` and ``reference(steps)`` (each runs that many training steps of
    ``batch_size`` images) in ``pairs`` interleaved pairs of repetitions; the ratio is candidate /
    reference images/s."""
    if pairs < 2:
        raise ValueError("side_by_side needs at least 2 pairs of repetitions")

    def seconds_per_step(run: Callable[[int], None], steps: int) -> float:
        synchronize(device)
        start = clock()
        run(steps)
        synchronize(device)
        return (clock() - start) / steps

    for run in (candidate, reference):
        run(1)  # warm-up: allocation and kernel selection
    # One more step each (warm-up too) sizes the repetitions.
    slowest = max(seconds_per_step(candidate, 1), seconds_per_step(reference, 1))
    steps = max(1, math.ceil(min_seconds / slowest)) if slowest > 0 else 1
    ours, theirs = [], []
    for i in range(pairs):
        # Alternate which side goes first, so a load that rises or falls steadily during the
        # measurement does not always favour the same side.
        if i % 2 == 0:
            ours.append(seconds_per_step(candidate, steps))
            theirs.append(seconds_per_step(reference, steps))
        else:
            theirs.append(seconds_per_step(reference, steps))
            ours.append(seconds_per_step(candidate, steps))
    ratios = [t_ref / t for t, t_ref in zip(ours, theirs, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return SideBySide(
        ratio=statistics.median(ratios),
        iqr=q3 - q1,
        images_per_s=batch_size / statistics.median(ours),
        reference_images_per_s=batch_size / statistics.median(theirs),
        pairs=pairs,
        steps=steps,
    )


@dataclass
class NormSpeed:
    norm: str
    images_per_s: float
    ratio: float  # images/s relative to BatchNorm, side by side in the same process (median)
    iqr: float  # interquartile range of the interleaved pairs' ratios
    memory_mb: float
    params: int
    error: str = ""


def _saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(x.device, dtype):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def step_memory_mb(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype) -> float:
    """CUDA: peak memory one training step allocates; CPU: the bytes autograd saves in it."""
    if x.device.type != "cuda":
        return _saved_bytes(model, x, y, dtype) / 2**20
    torch.cuda.synchronize(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    _train_steps(model, x, y, dtype, 1)
    torch.cuda.synchronize(x.device)
    return (torch.cuda.max_memory_allocated(x.device) - before) / 2**20


def speed_table(
    norms: list[str],
    batch_size: int = 64,
    pairs: int = PAIRS,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> list[NormSpeed]:
    """Each norm in ResNet-20 side by side with BatchNorm (BatchNorm itself against a second
    BatchNorm model: the noise of the measurement). A norm that fails is reported, not raised."""
    device = device or torch.device("cpu")
    x, y = training_batch(batch_size, (3, 32, 32), 10, device)
    rows = []
    for norm in dict.fromkeys([REFERENCE, *norms]):
        try:
            model = build_model(MODEL, norm, 10, device)
            reference = build_model(MODEL, REFERENCE, 10, device)
            speed = side_by_side(model, reference, x, y, dtype=dtype, pairs=pairs)
            memory = step_memory_mb(model, x, y, dtype)
            rows.append(NormSpeed(norm, speed.images_per_s, speed.ratio, speed.iqr, memory,
                                  parameter_count(model)))  # fmt: skip
        except Exception as err:  # noqa: BLE001 - one broken norm must not hide the others
            message = f"{type(err).__name__}: {err}"
            rows.append(NormSpeed(norm, math.nan, math.nan, math.nan, math.nan, 0, message))
    return rows
