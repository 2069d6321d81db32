"""Weight reparametrisations: Weight Normalization, Scaled Weight Standardization, Scaled WS
followed by GroupNorm, and spectral normalization (capability ``WEIGHT``). They transform a
convolution's weight, so they own it (``OWNS_CONV``): each is the whole conv-norm block, built for
any shape by ``block()``.

Spectral normalization keeps an estimate of the weight's top singular vectors (buffers ``_u`` and
``_v`` of ``torch.nn.utils.parametrizations.spectral_norm``) that one power iteration refines at
every training-mode forward pass; :func:`restart_power_iteration` re-estimates them after a model
re-initialises the weights, so the first step divides by the right sigma."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

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


@register_norm(
    "spectral_norm",
    description="Spectral normalization (Miyato et al. 2018) of the convolution: W / sigma(W), "
    "sigma the largest singular value of W reshaped to (out, in k k), estimated by one power "
    "iteration per training-mode forward pass (u and v kept as buffers, frozen in eval mode); "
    "with bias, no gain, no activation normalization.",
    family="weight",
    capabilities={WEIGHT, OWNS_CONV},
)
class SpectralNormConv(OwnsConvMixin, nn.Conv2d):
    """A same-padded convolution reparametrised by ``torch.nn.utils.parametrizations.
    spectral_norm`` (one power iteration per training forward, as in Miyato et al. 2018 and
    StudioGAN). The trainable kernel is ``parametrizations.weight.original``; ``weight`` is the
    normalized one, computed at each access: a model that initialises ``weight`` in place
    initialises a temporary (harmless here, since the kernel's scale divides out; initialise
    ``original`` to choose its direction). The parametrization makes the instance's class a
    subclass of this one made by torch (``isinstance`` holds), and the module is saved through its
    ``state_dict`` (torch refuses to pickle parametrized modules)."""

    def __init__(
        self,
        num_channels: int,
        *,
        in_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
    ) -> None:
        in_channels = num_channels if in_channels is None else in_channels
        super().__init__(
            in_channels, num_channels, kernel_size, stride, padding=kernel_size // 2, bias=True
        )
        # torch's default eps (1e-12, as in Miyato et al.'s code) guards the normalization of u
        # and v; no option, so that a model's spectrally normalized linear layers match its
        # convolutions.
        spectral_norm(self, n_power_iterations=1)

    def affine_parameters(self) -> list[nn.Parameter]:
        # No gain: the normalized kernel's scale is fixed at sigma = 1; the bias is the shift.
        return [self.bias]


def restart_power_iteration(module: nn.Module, iterations: int = 15) -> None:
    """Re-estimate u and v of every spectrally normalized weight inside ``module`` from the current
    weights with ``iterations`` power iterations (15, as torch does when it registers the
    parametrization). Call it after re-initialising such weights: u and v were estimated for the
    old ones."""
    for m in module.modules():
        if not parametrize.is_parametrized(m, "weight"):
            continue
        original = m.parametrizations.weight.original
        for p in m.parametrizations.weight:
            # torch's own power method on its own reshaping of the weight (private names of the
            # spectral_norm parametrization, which offers no public way to do this)
            if hasattr(p, "_power_method") and hasattr(p, "_u"):
                p._power_method(p._reshape_weight_to_matrix(original.detach()), iterations)
