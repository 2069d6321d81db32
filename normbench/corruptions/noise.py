"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise."""

from __future__ import annotations

import torch

from normbench.corruptions import RANDOM, register_corruption


def _randn(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=g).to(x.device)


def _rand(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.rand(x.shape, generator=g).to(x.device)


@register_corruption("gaussian_noise", family="noise", capabilities={RANDOM},
                     description="x + N(0, c) per value")  # fmt: skip
def gaussian_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return x + c * _randn(x, g)


@register_corruption("shot_noise", family="noise", capabilities={RANDOM},
                     description="Poisson(c x) / c per value")  # fmt: skip
def shot_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return torch.poisson((x * c).cpu().double(), generator=g).to(x) / c


@register_corruption("impulse_noise", family="noise", capabilities={RANDOM},
                     description="salt and pepper on a fraction c of values, 50/50")  # fmt: skip
def impulse_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    flipped = _rand(x, g) < c
    salted = _rand(x, g) < 0.5
    x = torch.where(flipped & salted, torch.ones_like(x), x)
    return torch.where(flipped & ~salted, torch.zeros_like(x), x)


@register_corruption("speckle_noise", family="noise", capabilities={RANDOM},
                     description="x + x N(0, c) per value")  # fmt: skip
def speckle_noise(x: torch.Tensor, c: float, g: torch.Generator) -> torch.Tensor:
    return x + x * c * _randn(x, g)
