"""The classic normalizers: BatchNorm, GroupNorm, LayerNorm, InstanceNorm, and none."""

from __future__ import annotations

import math

from torch import nn

from normbench.norms.registry import AFFINE, BATCH_STATS, AffineMixin, register_norm


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
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, not {groups!r}")
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
