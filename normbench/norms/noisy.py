"""Noisy BatchNorm (Santurkar et al. 2018): BatchNorm whose output distribution is made to shift
on purpose, to test whether BatchNorm helps by keeping layer input distributions stable.

In training mode every output activation gets additive noise ``n ~ N(mu_c, sigma_c^2)``, iid
over samples and positions, with a distribution of its own per channel ``c`` and per draw:
``mu_c ~ U(-mean_range, mean_range)`` and ``sigma_c ~ U(1, 1 + std_range)`` (a non-zero mean and
a non-unit variance, redrawn every step). Eval mode adds nothing: it is BatchNorm.

The paper gives no values we could confirm for the ranges; ``mean_range = 1`` and
``std_range = 1`` (noise of standard deviation 1 to 2 on activations that BatchNorm scaled to
about unit variance) are our choice: a shift as large as the signal itself.

When the noise is redrawn. A draw is a pure function of the layer's ``noise_seed`` and its draw
number ``noise_draw``; the draw number advances when a backward pass reaches the layer's output,
that is once per forward/backward pass (once per training step; per pass, for a two-pass
optimizer). Forwards that no gradient flows back through see the same draw again, so the layer's
training-mode output is a function of its input and its state, as every norm's is: the same input
twice (another memory layout, a recomputation) gives the same output. Seed and draw number are
the layer's extra state (``get_extra_state``), so they are in every ``state_dict`` and checkpoint
and a resumed run draws the noise an uninterrupted one would.

The seed is taken from a hash of the global random generator's state when the layer is built,
without drawing from it: the run's seed fixes the noise, and a model with noisy BatchNorm starts
from exactly the weights the same model with BatchNorm starts from. The noise itself is drawn
from a generator of its own on the input's device, never from the global stream.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

from normbench.norms.classic import BatchNorm
from normbench.norms.registry import AFFINE, BATCH_STATS, register_norm

_MASK64 = (1 << 64) - 1


def _mix(value: int) -> int:
    """SplitMix64's finalizer: neighbouring draw numbers give unrelated generator seeds."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def _seed_from_global_state() -> int:
    """A 62-bit seed from the global CPU generator's state, which stays as it was."""
    digest = hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@register_norm(
    "noisy_batchnorm",
    description="BatchNorm followed, in training mode, by the distribution shift of Santurkar et "
    "al. (2018): iid noise N(mu_c, sigma_c^2) added to every activation, with mu_c ~ "
    "U(-mean_range, mean_range) and sigma_c ~ U(1, 1 + std_range) redrawn per channel every "
    "step (defaults 1 and 1, our choice); no noise in eval mode.",
    family="batch",
    capabilities={BATCH_STATS, AFFINE},
)
class NoisyBatchNorm(BatchNorm):
    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        mean_range: float = 1.0,
        std_range: float = 1.0,
    ) -> None:
        super().__init__(num_channels, eps=eps, momentum=momentum)
        for name, value in (("mean_range", mean_range), ("std_range", std_range)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, not {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, not {value!r}")
        self.mean_range, self.std_range = float(mean_range), float(std_range)
        self.noise_seed = _seed_from_global_state()
        self.noise_draw = 0

    def get_extra_state(self) -> dict[str, int]:
        return {"noise_seed": self.noise_seed, "noise_draw": self.noise_draw}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.noise_seed, self.noise_draw = int(state["noise_seed"]), int(state["noise_draw"])

    def noise(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The current draw's noise for an NCHW activation of ``shape`` (float32, contiguous):
        the same values whatever the activation's memory layout."""
        generator = torch.Generator(device=device)
        generator.manual_seed(_mix(self.noise_seed ^ _mix(self.noise_draw)) >> 1)
        channels = shape[1]
        mean = (torch.rand(channels, generator=generator, device=device) * 2 - 1) * self.mean_range
        std = 1 + torch.rand(channels, generator=generator, device=device) * self.std_range
        z = torch.randn(shape, generator=generator, device=device)
        return torch.addcmul(mean.view(1, -1, 1, 1), z, std.view(1, -1, 1, 1))

    def _next_draw(self, grad: torch.Tensor) -> None:
        self.noise_draw += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if not self.training:
            return out
        noise = self.noise(out.shape, out.device).to(out.dtype)
        if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
            noise = noise.contiguous(memory_format=torch.channels_last)
        out = out + noise
        if out.requires_grad:
            out.register_hook(self._next_draw)  # a backward pass through the layer: a new draw
        return out
