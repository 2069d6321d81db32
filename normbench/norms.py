"""Normalization layers, their registry and the one factory that builds them.

Contract for every norm: the constructor takes ``num_channels`` first; ``forward`` maps an NCHW
tensor to one of the same shape; the module exposes ``affine_parameters()``, the learnable
scale/shift parameters that the weight-decay rule exempts and that SAM-ON perturbs. Selecting
those by parameter name (as much published code does) breaks on any layer that names them
differently, so the layer itself says which they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import nn

from normbench.registry import Registry

NormFactory = Callable[..., nn.Module]
NormSpec = str | NormFactory

NORMS: Registry[NormFactory] = Registry("norm")
register_norm = NORMS.register

#: Capability flags a norm may declare in its registry info.
BATCH_STATS = "batch_stats"  # output depends on other samples of the batch in training mode
AFFINE = "affine"  # learnable per-channel scale and shift


class AffineMixin:
    """``affine_parameters()`` for torch norm layers that keep them as ``weight`` and ``bias``."""

    def affine_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]


@register_norm(
    "batchnorm",
    description="Batch normalization (Ioffe & Szegedy 2015): per-channel statistics over (N,H,W); "
    "running averages (momentum 0.1) in eval mode.",
    family="batch",
    capabilities={BATCH_STATS, AFFINE},
)
class BatchNorm(AffineMixin, nn.BatchNorm2d):
    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_channels, eps=eps, momentum=momentum)


def group_count(num_channels: int, groups: int = 32) -> int:
    """Number of groups actually used: ``groups`` when it divides the channels, else gcd(groups, C).

    The gcd keeps every group the same size and never degenerates into one channel per group
    unless ``groups`` asks for it (32 groups on 48 channels gives 16 groups of 3).
    """
    return math.gcd(groups, num_channels)


@register_norm(
    "groupnorm",
    description="Group normalization (Wu & He 2018): statistics over (H,W) and groups of channels; "
    "32 groups, or gcd(32, C) groups when C is not a multiple of 32.",
    family="group",
    capabilities={AFFINE},
)
class GroupNorm(AffineMixin, nn.GroupNorm):
    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(group_count(num_channels, groups), num_channels, eps=eps)


@register_norm(
    "layernorm",
    description="Layer normalization over (C,H,W) per sample (Ba et al. 2016), per-channel affine.",
    family="group",
    capabilities={AFFINE},
)
class LayerNorm(AffineMixin, nn.GroupNorm):
    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        # One group spanning all channels is exactly LayerNorm over (C,H,W).
        super().__init__(1, num_channels, eps=eps)


@register_norm(
    "instancenorm",
    description="Instance normalization (Ulyanov et al. 2016) over (H,W) per sample and channel, "
    "with a learnable per-channel affine.",
    family="group",
    capabilities={AFFINE},
)
class InstanceNorm(AffineMixin, nn.GroupNorm):
    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        # One group per channel equals affine InstanceNorm2d without running statistics, and the
        # GroupNorm kernel handles channels_last inputs without a layout copy.
        super().__init__(num_channels, num_channels, eps=eps)


@register_norm(
    "none",
    description="No normalization (identity). The preceding convolution gets a bias instead.",
    family="none",
)
class NoNorm(nn.Identity):
    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.num_channels = num_channels

    def affine_parameters(self) -> list[nn.Parameter]:
        return []


def create_norm(spec: NormSpec, num_channels: int, **kwargs: Any) -> nn.Module:
    """Build a norm layer from a registered name, a class or a ``functools.partial``."""
    factory = NORMS.get(spec).obj if isinstance(spec, str) else spec
    return factory(num_channels, **kwargs)


def affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every norm layer inside ``model`` (each parameter once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        select = getattr(module, "affine_parameters", None)
        if callable(select):
            for p in select():
                seen.setdefault(id(p), p)
    return list(seen.values())
