"""Optimizers, their registry, the weight-decay rule and learning-rate schedules.

Weight-decay rule (recorded in every run's protocol as ``WEIGHT_DECAY_RULE``): weight decay applies
to convolution and linear weights only; norm-layer affine parameters (selected through each norm's
``affine_parameters()``, not by name) and all biases (tensors with fewer than 2 dimensions) get
none. Decaying a norm's scale changes the effective learning rate of scale-invariant layers, so the
rule changes how norms compare and is part of the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from normbench.norms import affine_parameters
from normbench.registry import Registry

WEIGHT_DECAY_RULE = "decay conv/linear weights only; none on norm affine parameters and biases"

#: Capability flag: the optimizer needs two forward/backward passes on the same batch per step.
TWO_PASS = "two_pass"

OptimizerBuilder = Callable[..., torch.optim.Optimizer]
OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
register_optimizer = OPTIMIZERS.register


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters by the weight-decay rule."""
    exempt = {id(p) for p in affine_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@register_optimizer(
    "sgd",
    description="SGD with (Nesterov) momentum.",
    family="sgd",
)
def sgd(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        parameter_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov
    )


@register_optimizer(
    "adamw",
    description="AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.",
    family="adam",
)
def adamw(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.05,
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps
    )


def create_optimizer(name: str, model: nn.Module, **hparams: Any) -> torch.optim.Optimizer:
    return OPTIMIZERS.get(name).obj(model, **hparams)


def lr_factor(
    schedule: str,
    step: int,
    total_steps: int,
    *,
    warmup: float = 0.0,
    milestones: tuple[float, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    ``warmup`` and ``milestones`` are fractions of training, so one schedule fits every budget.
    - ``onecycle``: linear warm-up from 0.1 to 1 over ``warmup``, then linear decay to 0.
    - ``cosine``: linear warm-up over ``warmup``, then half-cosine decay to 0.
    - ``multistep``: constant, multiplied by ``gamma`` at each milestone (He et al. 2016).
    """
    progress = step / max(total_steps, 1)
    if schedule == "multistep":
        return gamma ** sum(progress >= m for m in milestones)
    if warmup > 0 and progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    rest = (progress - warmup) / max(1.0 - warmup, 1e-12)
    if schedule == "onecycle":
        return max(0.0, 1.0 - rest)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(rest, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")


SCHEDULES = ("onecycle", "cosine", "multistep")
