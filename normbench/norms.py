"""Normalization layers, their registry and the one factory that builds them.

Contract for every norm: the constructor takes ``num_channels`` first; ``forward`` maps an NCHW
tensor to one of the same shape and dtype; the module exposes ``affine_parameters()``, the
learnable scale/shift parameters that the weight-decay rule exempts and that SAM-ON perturbs.
Selecting those by parameter name (as much published code does) breaks on any layer that names
them differently, so the layer itself says which they are.

Besides the classics (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, none) the registry holds the
"norm zoo" of Lubana et al. (2021) and ConvNorm (Liu et al. 2021):

- activation-based: FRN + TLU, EvoNorm-B0 and -S0, Variance Norm, RMSNorm;
- weight-based (capability ``WEIGHT``): Weight Normalization, Scaled Weight Standardization, and
  Scaled WS followed by GroupNorm. They reparametrise a convolution's weight, so they own it;
- ConvNorm: Fourier-domain preconditioning of its own convolution, then a depthwise affine
  convolution and BatchNorm;
- SkipInit: no normalization; residual models gate each branch with a scalar initialised to 0.

A norm that owns its convolution (capability ``OWNS_CONV``) is the whole conv-norm block: its
classmethod ``block(in_channels, out_channels, kernel_size, stride)`` builds one for any shape,
and ``cls(num_channels)`` builds a 3x3, stride-1, ``num_channels -> num_channels`` block so it
still fits the NCHW -> NCHW contract. The zoo's layers compute their statistics in float32 and
cast back, so bfloat16 modules and inputs work on the CPU (bfloat16 sums of squares lose most of
their precision, and ``torch.fft`` has no bfloat16 kernels).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import NormbenchError
from normbench.registry import Entry, EntryInfo, Registry

NormFactory = Callable[..., nn.Module]
NormSpec = str | NormFactory

#: Constructor arguments that the model's block sets (its shape), never the user.
BLOCK_ARGUMENTS = ("num_channels", "in_channels", "kernel_size", "stride")
_WITH_OPTIONS = re.compile(r"^\s*([^()\s]+)\s*\((.*)\)\s*$", re.DOTALL)


def norm_options(factory: NormFactory) -> dict[str, Any]:
    """The options of a norm class: its keyword constructor arguments and their defaults (none
    known for a constructor without a readable signature)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in parameters
        if p.name not in BLOCK_ARGUMENTS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def parse_norm_name(name: str) -> tuple[str, dict[str, Any]]:
    """``groupnorm(groups=8)`` -> ("groupnorm", {"groups": 8}); a plain name has no options."""
    match = _WITH_OPTIONS.match(name)
    if match is None:
        return name, {}
    base, inside = match.groups()
    usage = (
        f"Norm options are keyword arguments with literal values, such as "
        f"'groupnorm(groups=8,eps=1e-3)'; got {name!r}. `normbench list norms` shows each "
        "norm's options."
    )
    try:
        call = ast.parse(f"f({inside})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError
        if any(k.arg is None for k in call.keywords):
            raise ValueError
        return base, {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        raise NormbenchError(usage) from None


class NormRegistry(Registry[NormFactory]):
    """The norm registry. A name may carry constructor options, ``groupnorm(groups=8)``: the entry
    is then a ``functools.partial`` of the class, named canonically (sorted options, defaults
    left out), so that one configuration is one leaderboard row however it was typed."""

    def get(self, name: str) -> Entry[NormFactory]:
        base, options = parse_norm_name(name)
        entry = super().get(base)
        if base == name:
            return entry
        known = norm_options(entry.obj)
        unknown = sorted(set(options) - set(known))
        if unknown:
            offered = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise NormbenchError(
                f"Norm {base!r} has no option {', '.join(map(repr, unknown))}; its options "
                f"(with defaults): {offered}."
            )
        options = {k: v for k, v in sorted(options.items()) if v != known[k]}
        if not options:
            return entry
        factory = functools.partial(entry.obj, **options)
        try:
            factory(64)  # bad values are reported now, not when a model is half built
        except Exception as err:  # noqa: BLE001 - any constructor error means a bad value
            raise NormbenchError(
                f"Norm {name!r} cannot be built with these options: {type(err).__name__}: {err}"
            ) from None
        canonical = f"{base}({','.join(f'{k}={v!r}' for k, v in options.items())})"
        return Entry(factory, dataclasses.replace(entry.info, name=canonical))


NORMS = NormRegistry("norm")
register_norm = NORMS.register

#: Capability flags a norm may declare in its registry info.
BATCH_STATS = "batch_stats"  # output depends on other samples of the batch in training mode
AFFINE = "affine"  # learnable per-channel scale and shift
WEIGHT = "weight"  # parametric: reparametrises the convolution's weight, not the activations
OWNS_CONV = "owns_conv"  # the norm is the whole conv-norm block (see ``block()``)
SKIPINIT = "skipinit"  # residual models gate each residual branch with a scalar initialised to 0


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


# --- The norm zoo: activation-based layers --------------------------------------------------------
#
# Per-channel parameters are stored 1-D: the weight-decay rule spares tensors with fewer than two
# dimensions, which keeps decay off the parameters that are not affine (FRN's eps, EvoNorm's v).


def _per_channel(p: torch.Tensor) -> torch.Tensor:
    """A 1-D per-channel tensor as float32, shaped to broadcast over NCHW."""
    return p.float().view(1, -1, 1, 1)


def _batch_variance(x: torch.Tensor, running_var: torch.Tensor, momentum: float) -> torch.Tensor:
    """Biased per-channel variance of ``x`` over (N,H,W); folds the unbiased estimate into
    ``running_var`` like ``nn.BatchNorm2d``, so eval statistics compare like for like with it."""
    var = x.var(dim=(0, 2, 3), correction=0)
    n = x.numel() // x.shape[1]
    with torch.no_grad():
        running_var.lerp_((var * (n / max(n - 1, 1))).to(running_var.dtype), momentum)
    return var


class _ChannelAffine(nn.Module):
    """Base of the zoo's activation norms: the learnable per-channel scale ``weight`` (init 1) and
    shift ``bias`` (init 0) that ``affine()`` applies in float32 and casts back to the input's
    dtype. Norms with batch statistics pass ``momentum`` and get ``running_var`` and
    ``variance()``."""

    def __init__(self, num_channels: int, momentum: float | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        if momentum is not None:
            self.momentum = momentum
            self.register_buffer("running_var", torch.ones(num_channels))

    def variance(self, xf: torch.Tensor) -> torch.Tensor:
        """The batch variance in training (updating ``running_var``), the running one in eval."""
        if self.training:
            return _batch_variance(xf, self.running_var, self.momentum)
        return self.running_var.float()

    def affine(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (y * _per_channel(self.weight) + _per_channel(self.bias)).to(dtype)

    def affine_parameters(self) -> list[nn.Parameter]:
        return [self.weight, self.bias]


@register_norm(
    "frn",
    description="Filter response normalization + TLU (Singh & Krishnan 2019): "
    "y = gamma x / sqrt(mean_HW(x^2) + |eps|) + beta with learnable per-channel eps (init 1e-5), "
    "then max(y, tau).",
    family="frn",
    capabilities={AFFINE},
)
class FilterResponseNorm(_ChannelAffine):
    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels)
        self.tau = nn.Parameter(torch.zeros(num_channels))
        self.eps = nn.Parameter(torch.full((num_channels,), eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        nu2 = xf.square().mean(dim=(2, 3), keepdim=True)
        y = self.affine(xf * torch.rsqrt(nu2 + _per_channel(self.eps).abs()), torch.float32)
        return torch.maximum(y, _per_channel(self.tau)).to(x.dtype)

    def affine_parameters(self) -> list[nn.Parameter]:
        # tau is TLU's learned threshold, a per-channel shift of the activation.
        return [self.weight, self.bias, self.tau]


@register_norm(
    "evonorm_b0",
    description="EvoNorm-B0 (Liu et al. 2020): x / max(sqrt(var_B(x) + eps), v x + "
    "instance_std(x)) * gamma + beta; batch variance over (N,H,W), running variance (momentum 0.1) "
    "in eval mode.",
    family="evonorm",
    capabilities={BATCH_STATS, AFFINE},
)
class EvoNormB0(_ChannelAffine):
    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_channels, momentum)
        self.eps = eps
        self.v = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        batch_std = _per_channel(torch.sqrt(self.variance(xf) + self.eps))
        instance_std = torch.sqrt(xf.var(dim=(2, 3), correction=0, keepdim=True) + self.eps)
        denominator = torch.maximum(batch_std, _per_channel(self.v) * xf + instance_std)
        return self.affine(xf / denominator, x.dtype)


@register_norm(
    "evonorm_s0",
    description="EvoNorm-S0 (Liu et al. 2020): x sigmoid(v x) / group_std(x) * gamma + beta; group "
    "std over (C/G,H,W) with 32 groups, or gcd(32, C) groups.",
    family="evonorm",
    capabilities={AFFINE},
)
class EvoNormS0(_ChannelAffine):
    def __init__(self, num_channels: int, groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(num_channels)
        self.groups, self.eps = group_count(num_channels, groups), eps
        self.v = nn.Parameter(torch.ones(num_channels))

    def group_std(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(var + eps) over each group's (C/G,H,W), repeated to shape (N,C,1,1)."""
        n, c = x.shape[:2]
        # Splitting the channel dimension is a view for NCHW and channels_last alike.
        var = x.unflatten(1, (self.groups, c // self.groups)).var(dim=(2, 3, 4), correction=0)
        std = torch.sqrt(var + self.eps)
        return std.repeat_interleave(c // self.groups, dim=1).view(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.sigmoid(_per_channel(self.v) * xf) / self.group_std(xf)
        return self.affine(y, x.dtype)


@register_norm(
    "variancenorm",
    description="Variance normalization (Daneshmand et al. 2020, as in Lubana et al. 2021): "
    "BatchNorm without mean subtraction, x / sqrt(var_B + eps), running variance in eval mode, "
    "per-channel affine.",
    family="batch",
    capabilities={BATCH_STATS, AFFINE},
)
class VarianceNorm(_ChannelAffine):
    def __init__(self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_channels, momentum)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.affine(xf * _per_channel(torch.rsqrt(self.variance(xf) + self.eps)), x.dtype)


@register_norm(
    "rmsnorm",
    description="RMSNorm (Zhang & Sennrich 2019) over channels: x / sqrt(mean_C(x^2) + eps) * "
    "gamma + beta, per sample and spatial position.",
    family="group",
    capabilities={AFFINE},
)
class RMSNorm(_ChannelAffine):
    def __init__(self, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__(num_channels)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.affine(
            xf * torch.rsqrt(xf.square().mean(dim=1, keepdim=True) + self.eps), x.dtype
        )


# --- The norm zoo: norms that own their convolution -----------------------------------------------


class OwnsConvMixin:
    """``block()`` for norms that are a whole conv-norm block.

    Their constructor is ``cls(num_channels, *, in_channels=None, kernel_size=3, stride=1, ...)``
    with ``num_channels`` the output channels, so ``cls(C)`` alone is a C -> C, 3x3, stride-1 block.
    """

    @classmethod
    def block(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        **kwargs: Any,
    ) -> nn.Module:
        return cls(
            out_channels, in_channels=in_channels, kernel_size=kernel_size, stride=stride, **kwargs
        )


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
    "convnorm",
    description="ConvNorm (Liu et al. 2021): the convolution's output is preconditioned per output "
    "channel in the Fourier domain by (sum_j |FFT(kernel_kj)|^2)^(-1/2) (running average in eval "
    "mode), then a depthwise kxk affine convolution with bias and BatchNorm.",
    family="convnorm",
    capabilities={OWNS_CONV, BATCH_STATS, AFFINE},
)
class ConvNorm(OwnsConvMixin, nn.Conv2d):
    """``weight`` is the convolution's kernel A (Cout x Cin x k x k).

    The preconditioned convolution computes the full convolution y (stride 1, padding k-1, spatial
    size S), multiplies each output channel's spectrum by V_k = (sum_j |FFT_S(a_kj)|^2)^(-1/2) (an
    unnormalised rfft of the kernel zero-padded to S; V is computed from the detached weight), crops
    k-1-p per border (p = k//2, the same padding) and subsamples by the stride: the result has the
    shape of ``nn.Conv2d(k, stride, padding=k//2)``'s output. A 1x1 kernel has a flat spectrum, so
    V_k = (sum_j a_kj^2)^(-1/2) and no FFT is needed.

    Training uses the current V and folds it into ``running_v`` with the factor
    a = max((cos(pi min(t, T) / T) + 1) / 2, 0.01), T = ``rampdown_steps``, t = ``num_steps``
    (a = 1 at the first step); eval mode uses ``running_v``. ``running_v`` has the shape of V, which
    depends on the input size for kernels larger than 1x1.
    """

    def __init__(
        self,
        num_channels: int,
        *,
        in_channels: int | None = None,
        kernel_size: int = 3,
        stride: int = 1,
        rampdown_steps: int = 40000,
        eps: float = 1e-12,
    ) -> None:
        in_channels = num_channels if in_channels is None else in_channels
        super().__init__(
            in_channels, num_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
        )
        self.rampdown_steps = rampdown_steps
        # The official code has no eps, but a channel whose kernels all have a spectral zero at one
        # frequency (an all-zero kernel, or some symmetric ones) gets an infinite gain there and a
        # NaN output (inf * 0). 1e-12 is negligible next to sum_j |FFT(a_kj)|^2, which is of
        # order 1 for initialised and trained kernels.
        self.eps = eps
        # Kept as parameters, not an nn.Conv2d, so that models re-initialising their convolutions
        # leave the affine transform at its identity initialisation (like BatchNorm's 1 and 0).
        k = kernel_size
        affine = torch.zeros(num_channels, 1, k, k)
        affine[:, 0, (k - 1) // 2, (k - 1) // 2] = 1.0  # the centre tap of padding="same"
        self.affine_weight = nn.Parameter(affine)
        self.affine_bias = nn.Parameter(torch.zeros(num_channels))
        self.norm = BatchNorm(num_channels)
        self.register_buffer("running_v", torch.empty(0))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    @property
    def _pointwise(self) -> bool:
        return self.kernel_size == (1, 1)

    def preconditioner(self, size: tuple[int, int]) -> torch.Tensor:
        """V for a full-convolution output of spatial ``size``: shape (Cout,) for a 1x1 kernel,
        else (Cout, size[0], size[1] // 2 + 1), the rfft2 layout."""
        a = self.weight.detach().float()
        if self._pointwise:
            energy = a.square().sum(dim=(1, 2, 3))
        else:
            energy = torch.fft.rfft2(a, s=size).abs().square().sum(dim=1)
        return torch.pow(energy + self.eps, -0.5)

    def _v_shape(self, size: tuple[int, int]) -> tuple[int, ...]:
        if self._pointwise:
            return (self.out_channels,)
        return (self.out_channels, size[0], size[1] // 2 + 1)

    def _update_running_v(self, v: torch.Tensor) -> None:
        with torch.no_grad():
            if self.running_v.shape != v.shape:
                # The first step (a = 1), or a new input size: there is no average to continue.
                self.running_v = v.to(self.running_v.dtype).clone()
            else:
                t = self.num_steps.clamp(max=self.rampdown_steps).float()
                a = (0.5 * (torch.cos(math.pi * t / self.rampdown_steps) + 1)).clamp(min=0.01)
                self.running_v.lerp_(v.to(self.running_v.dtype), a.to(self.running_v.dtype))
            self.num_steps += 1

    def _v(self, size: tuple[int, int]) -> torch.Tensor:
        if self.training:
            v = self.preconditioner(size)
            self._update_running_v(v)
            return v
        if self.running_v.numel() == 0:
            # Never trained: the first training step would set running V to exactly this.
            return self.preconditioner(size)
        if self.running_v.shape != self._v_shape(size):
            raise ValueError(
                f"ConvNorm's running preconditioner was estimated for a different input size "
                f"({tuple(self.running_v.shape)}, need {self._v_shape(size)}); evaluate at the "
                "training resolution"
            )
        return self.running_v.float()

    def preconditioned_conv(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution with its output preconditioned, before the affine transform and BN."""
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        y = F.conv2d(x, self.weight, None, 1, (kh - 1, kw - 1))
        size = (y.shape[-2], y.shape[-1])
        v = self._v(size)
        if self._pointwise:
            z = y.float() * v.view(1, -1, 1, 1)
        else:
            z = torch.fft.irfft2(torch.fft.rfft2(y.float()) * v, s=size)
        ch, cw = kh - 1 - ph, kw - 1 - pw
        z = z[:, :, ch : size[0] - ch : sh, cw : size[1] - cw : sw]
        return z.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.preconditioned_conv(x)
        z = F.conv2d(z, self.affine_weight, self.affine_bias, padding="same", groups=z.shape[1])
        return self.norm(z)

    def affine_parameters(self) -> list[nn.Parameter]:
        # The depthwise convolution is ConvNorm's affine transform: a per-channel scale generalised
        # to a kxk filter, plus the shift.
        return [self.affine_weight, self.affine_bias, *self.norm.affine_parameters()]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # running_v takes the shape of the checkpoint's V (it depends on the training input size).
        saved = state_dict.get(prefix + "running_v")
        if saved is not None and saved.shape != self.running_v.shape:
            self.running_v = self.running_v.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --- The norm zoo: SkipInit ----------------------------------------------------------------------


@register_norm(
    "skipinit",
    description="No normalization plus SkipInit (De & Smith 2020): residual blocks multiply their "
    "residual branch by a learnable scalar initialised to 0. Models without residual branches "
    "refuse it.",
    family="none",
    capabilities={SKIPINIT},
)
class SkipInit(NoNorm):
    """The identity; the SKIPINIT capability is what makes residual models add the gates."""


def create_norm(spec: NormSpec, num_channels: int, **kwargs: Any) -> nn.Module:
    """Build a norm layer from a registered name, a class or a ``functools.partial``."""
    factory = NORMS.get(spec).obj if isinstance(spec, str) else spec
    return factory(num_channels, **kwargs)


def norm_class(spec: NormSpec) -> NormFactory:
    """The class (or factory) behind a norm name, with or without options, or a partial."""
    factory = NORMS.get(spec).obj if isinstance(spec, str) else spec
    return factory.func if isinstance(factory, functools.partial) else factory


def norm_info(spec: NormSpec) -> EntryInfo | None:
    """Registry info of a norm given by name, by a registered class or by a ``functools.partial``
    of one; ``None`` for unregistered classes and factories."""
    if isinstance(spec, str):
        return NORMS.info(spec)
    target = norm_class(spec)
    return next((entry.info for entry in NORMS if entry.obj is target), None)


def affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every norm layer inside ``model`` (each parameter once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        select = getattr(module, "affine_parameters", None)
        if callable(select):
            for p in select():
                seen.setdefault(id(p), p)
    return list(seen.values())
