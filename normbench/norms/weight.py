"""Weight reparametrisations: Weight Normalization, Scaled Weight Standardization, and Scaled WS
followed by GroupNorm (capability ``WEIGHT``). They transform a convolution's weight, so they own
it (``OWNS_CONV``): each is the whole conv-norm block, built for any shape by ``block()``."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.classic import GroupNorm
from normbench.norms.registry import AFFINE, OWNS_CONV, WEIGHT, OwnsConvMixin, register_norm

#: sqrt(2 pi / (pi - 1)): 1 / std of relu(z) for z ~ N(0, 1), which makes ReLU variance-preserving.
RELU_GAIN = math.sqrt(2 * math.pi / (math.pi - 1))


class _ReparametrizedConv(OwnsConvMixin, nn.Conv2d):
    """A same-padded convolution whose forward uses ``effective_weight()`` instead of ``weight``,
    with a per-output-channel ``gain`` (init 1) and the ``eps`` of the weight's normalization."""

    def __init__(
        self,
        num_channels: int,
        *,
        in_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
        bias: bool = True,
        eps: float = 1e-5,
    ) -> None:
        in_channels = num_channels if in_channels is None else in_channels
        super().__init__(
            in_channels, num_channels, kernel_size, stride, padding=kernel_size // 2, bias=bias
        )
        self.gain = nn.Parameter(torch.ones(num_channels))
        self.eps = eps

    def effective_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding)

    def affine_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.gain, self.bias) if p is not None]


@register_norm(
    "weightnorm",
    description="Weight normalization (Salimans & Kingma 2016) of the convolution: W = g v / "
    "(||v|| + 1e-5) per output channel, g init 1, with bias. Only the reparametrisation: the "
    "scaled activation sqrt(2pi/(pi-1)) (relu(x) - 1/sqrt(2pi)) that Lubana et al. pair it with "
    "is an activation change and is not applied.",
    family="weight",
    capabilities={WEIGHT, OWNS_CONV},
)
class WeightNormConv(_ReparametrizedConv):
    """``weight`` holds the direction v; ``gain`` is g, the norm of each output channel's filter."""

    def effective_weight(self) -> torch.Tensor:
        v = self.weight.float()
        norm = torch.linalg.vector_norm(v, dim=(1, 2, 3), keepdim=True)
        return (self.gain.float().view(-1, 1, 1, 1) * v / (norm + self.eps)).to(self.weight.dtype)


@register_norm(
    "sws",
    description="Scaled weight standardization (Brock et al. 2021): W = sqrt(2pi/(pi-1)) g (W - "
    "mean) / ((std + 1e-5) sqrt(fan_in)) per output channel, learnable gain g (init 1) and bias.",
    family="weight",
    capabilities={WEIGHT, OWNS_CONV},
)
class ScaledStdConv(_ReparametrizedConv):
    def standardized_weight(self) -> torch.Tensor:
        """Per output channel: zero mean and std 1/sqrt(fan_in), before the gain and RELU_GAIN."""
        w = self.weight.float()
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        fan_in = w[0].numel()
        return (w - mean) / ((torch.sqrt(var) + self.eps) * math.sqrt(fan_in))

    def effective_weight(self) -> torch.Tensor:
        gain = RELU_GAIN * self.gain.float().view(-1, 1, 1, 1)
        return (gain * self.standardized_weight()).to(self.weight.dtype)


@register_norm(
    "sws_gn",
    description="Scaled weight standardization followed by GroupNorm (32 groups, or gcd(32, C)), "
    "as in BiT (Kolesnikov et al. 2020); the convolution has no bias, GroupNorm shifts.",
    family="weight",
    capabilities={WEIGHT, OWNS_CONV, AFFINE},
)
class ScaledStdConvGroupNorm(OwnsConvMixin, nn.Sequential):
    def __init__(
        self,
        num_channels: int,
        *,
        in_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 32,
    ) -> None:
        conv = ScaledStdConv.block(
            num_channels if in_channels is None else in_channels,
            num_channels,
            kernel_size,
            stride,
            bias=False,
        )
        super().__init__(OrderedDict(conv=conv, norm=GroupNorm(num_channels, groups)))

    def affine_parameters(self) -> list[nn.Parameter]:
        return [*self.conv.affine_parameters(), *self.norm.affine_parameters()]
