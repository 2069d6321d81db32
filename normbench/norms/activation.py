"""Activation-based norms of the zoo (Lubana et al. 2021): FRN + TLU, EvoNorm-B0 and -S0, Variance
Norm and RMSNorm.

FRN and the EvoNorms carry their own nonlinearity (capability ``ACT``) and take ``apply_act``: the
model uses their nonlinearity instead of its ReLU/GELU, and builds the last norm of a residual
branch without it, as the papers' ResNets do. Without its nonlinearity FRN keeps its normalization
and drops TLU; an EvoNorm is then its per-channel affine alone, as in the authors' code (their
``nonlinearity=False``) and timm's ``apply_act=False``.

Per-channel parameters are stored 1-D: the weight-decay rule spares tensors with fewer than two
dimensions, which keeps decay off the parameters that are not affine (FRN's eps, EvoNorm's v).
Statistics are computed in float32 and cast back, so bfloat16 modules and inputs work on the CPU
(bfloat16 sums of squares lose most of their precision).
"""

from __future__ import annotations

import torch
from torch import nn

from normbench.norms.classic import group_count
from normbench.norms.registry import ACT, AFFINE, BATCH_STATS, register_norm


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


class _OwnActivation(_ChannelAffine):
    """A norm with its own nonlinearity, applied when ``apply_act`` (the model's block decides)."""

    def __init__(self, num_channels: int, apply_act: bool, momentum: float | None = None) -> None:
        super().__init__(num_channels, momentum)
        self.apply_act = apply_act

    def extra_repr(self) -> str:
        return f"apply_act={self.apply_act}"


@register_norm(
    "frn",
    description="Filter response normalization + TLU (Singh & Krishnan 2019): "
    "y = gamma x / sqrt(mean_HW(x^2) + |eps|) + beta with learnable per-channel eps (init 1e-5), "
    "then max(y, tau); TLU replaces the model's activation and is left out before a residual add.",
    family="frn",
    capabilities={AFFINE, ACT},
)
class FilterResponseNorm(_OwnActivation):
    def __init__(self, num_channels: int, eps: float = 1e-5, apply_act: bool = True) -> None:
        super().__init__(num_channels, apply_act)
        self.tau = nn.Parameter(torch.zeros(num_channels)) if apply_act else None
        self.eps = nn.Parameter(torch.full((num_channels,), eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        nu2 = xf.square().mean(dim=(2, 3), keepdim=True)
        y = self.affine(xf * torch.rsqrt(nu2 + _per_channel(self.eps).abs()), torch.float32)
        if self.tau is not None:
            y = torch.maximum(y, _per_channel(self.tau))
        return y.to(x.dtype)

    def affine_parameters(self) -> list[nn.Parameter]:
        # tau is TLU's learned threshold, a per-channel shift of the activation.
        return [p for p in (self.weight, self.bias, self.tau) if p is not None]


@register_norm(
    "evonorm_b0",
    description="EvoNorm-B0 (Liu et al. 2020): x / max(sqrt(var_B(x) + eps), v x + "
    "instance_std(x)) * gamma + beta; batch variance over (N,H,W), running variance (momentum 0.1) "
    "in eval mode. Replaces the model's activation; before a residual add only gamma x + beta.",
    family="evonorm",
    capabilities={BATCH_STATS, AFFINE, ACT},
)
class EvoNormB0(_OwnActivation):
    def __init__(
        self, num_channels: int, eps: float = 1e-5, momentum: float = 0.1, apply_act: bool = True
    ) -> None:
        super().__init__(num_channels, apply_act, momentum if apply_act else None)
        self.eps = eps
        self.v = nn.Parameter(torch.ones(num_channels)) if apply_act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.v is not None:
            batch_std = _per_channel(torch.sqrt(self.variance(xf) + self.eps))
            instance_std = torch.sqrt(xf.var(dim=(2, 3), correction=0, keepdim=True) + self.eps)
            xf = xf / torch.maximum(batch_std, _per_channel(self.v) * xf + instance_std)
        return self.affine(xf, x.dtype)


@register_norm(
    "evonorm_s0",
    description="EvoNorm-S0 (Liu et al. 2020): x sigmoid(v x) / group_std(x) * gamma + beta; group "
    "std over (C/G,H,W) with 32 groups, or gcd(32, C) groups. Replaces the model's activation; "
    "before a residual add only gamma x + beta.",
    family="evonorm",
    capabilities={AFFINE, ACT},
)
class EvoNormS0(_OwnActivation):
    def __init__(
        self, num_channels: int, groups: int = 32, eps: float = 1e-5, apply_act: bool = True
    ) -> None:
        super().__init__(num_channels, apply_act)
        self.groups, self.eps = group_count(num_channels, groups), eps
        self.v = nn.Parameter(torch.ones(num_channels)) if apply_act else None

    def group_std(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(var + eps) over each group's (C/G,H,W), repeated to shape (N,C,1,1)."""
        n, c = x.shape[:2]
        # Splitting the channel dimension is a view for NCHW and channels_last alike.
        var = x.unflatten(1, (self.groups, c // self.groups)).var(dim=(2, 3, 4), correction=0)
        std = torch.sqrt(var + self.eps)
        return std.repeat_interleave(c // self.groups, dim=1).view(n, c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.v is not None:
            xf = xf * torch.sigmoid(_per_channel(self.v) * xf) / self.group_std(xf)
        return self.affine(xf, x.dtype)


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
