"""The norm speed table: forward + backward throughput of each norm inside one fixed network.

Every norm is put into the same ResNet-20 (CIFAR, 32 x 32 inputs) and timed on the same batch;
BatchNorm is timed in the same process before and after the others, and each norm's ratio is
taken against the mean of those two, so a change of machine load during the table shows up as a
difference between the two BatchNorm figures rather than as a bias.

Memory: on CUDA the peak allocated memory of one training step; on the CPU (where the allocator
keeps no such figure) the bytes of the tensors autograd saves for the backward pass, which is
what a norm adds to a step's peak.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from normbench.models import conv_norm_factory, create_model, parameter_count

MODEL = "resnet20"
REFERENCE = "batchnorm"


@dataclass
class NormSpeed:
    norm: str
    images_per_s: float
    ratio: float  # images/s relative to BatchNorm in the same process
    memory_mb: float
    params: int
    error: str = ""


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)


def _saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def measure_norm(
    norm: str, batch_size: int, steps: int, device: torch.device
) -> tuple[float, float, int]:
    """(images/s, memory MB, parameters) of ``norm`` in the fixed network."""
    torch.manual_seed(0)
    model = create_model(MODEL, block=conv_norm_factory(norm), num_classes=10).to(device).train()
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    for _ in range(2):  # warm-up: allocation and kernel selection
        _step(model, x, y)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        _step(model, x, y)
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    else:
        memory = _saved_bytes(model, x, y)
    return batch_size / statistics.median(times), memory / 2**20, parameter_count(model)


def speed_table(
    norms: list[str], batch_size: int = 64, steps: int = 5, device: torch.device | None = None
) -> list[NormSpeed]:
    """Measure every norm (failures are reported per norm, not raised)."""
    device = device or torch.device("cpu")
    before = measure_norm(REFERENCE, batch_size, steps, device)
    rows = []
    for norm in norms:
        if norm == REFERENCE:
            continue
        try:
            rate, memory, params = measure_norm(norm, batch_size, steps, device)
            rows.append(NormSpeed(norm, rate, float("nan"), memory, params))
        except Exception as err:  # noqa: BLE001 - one broken norm must not hide the others
            message = f"{type(err).__name__}: {err}"
            rows.append(NormSpeed(norm, float("nan"), float("nan"), float("nan"), 0, message))
    after = measure_norm(REFERENCE, batch_size, steps, device)
    reference_rate = (before[0] + after[0]) / 2
    rows.insert(0, NormSpeed(REFERENCE, reference_rate, 1.0, before[1], before[2]))
    for row in rows[1:]:
        row.ratio = row.images_per_s / reference_rate
    return rows
