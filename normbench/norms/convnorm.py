"""ConvNorm (Liu et al. 2021): Fourier-domain preconditioning of its own convolution, then a
depthwise affine convolution and BatchNorm. It replaces the conv + norm pair (``OWNS_CONV``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from normbench.norms.classic import BatchNorm
from normbench.norms.registry import AFFINE, BATCH_STATS, OWNS_CONV, OwnsConvMixin, register_norm


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
