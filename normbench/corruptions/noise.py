"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise.

The noise is drawn per image in float32 (a quarter of the cost of float64 draws, and far finer
than an 8-bit level) and moved to the images' device and dtype.
"""

from __future__ import annotations

import torch

from normbench.corruptions import RANDOM, register_corruption
from normbench.corruptions.rng import ImageRng


def _randn(x: torch.Tensor, rng: ImageRng) -> torch.Tensor:
    return rng.randn(tuple(x.shape[1:]), torch.float32).to(x)


@register_corruption("gaussian_noise", family="noise", capabilities={RANDOM},
                     description="x + N(0, c) per value")  # fmt: skip
def gaussian_noise(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    return x + c * _randn(x, rng)


@register_corruption("shot_noise", family="noise", capabilities={RANDOM},
                     description="Poisson(c x) / c per value")  # fmt: skip
def shot_noise(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    return rng.poisson(x * c).to(x) / c


@register_corruption("impulse_noise", family="noise", capabilities={RANDOM},
                     description="salt and pepper on a fraction c of values, 50/50")  # fmt: skip
def impulse_noise(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    # both draws (in this order) sent to the device in one copy
    shape = tuple(x.shape[1:])
    u = torch.stack((rng.rand(shape, torch.float32), rng.rand(shape, torch.float32))).to(x)
    flipped = u[0] < c
    salted = u[1] < 0.5
    x = torch.where(flipped & salted, torch.ones_like(x), x)
    return torch.where(flipped & ~salted, torch.zeros_like(x), x)


@register_corruption("speckle_noise", family="noise", capabilities={RANDOM},
                     description="x + x N(0, c) per value")  # fmt: skip
def speckle_noise(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    return x + x * c * _randn(x, rng)
