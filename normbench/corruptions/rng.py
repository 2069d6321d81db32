"""Per-image random streams for the corruptions.

Every random number a corruption draws for an image comes from that image's own CPU generator,
seeded from (seed, corruption, severity, image index) alone. A seeded corrupted set is therefore
the same bytes however its images are batched or chunked and on whichever device the arithmetic
runs. The numbers are drawn image by image and stacked, so the corruptions themselves still work
on whole batches; drawing costs a few microseconds per image and call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

Draw = Callable[[torch.Generator, torch.Tensor], object]


def image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The generator seed of one image: a BLAKE2b digest of the four values (63 bits), the same
    in every process and on every platform, unlike Python's salted ``hash``."""
    key = f"normbench-corruption:{int(seed)}:{name}:{int(severity)}:{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class ImageRng:
    """One seeded CPU generator per image of a batch; draws return (N, *shape) CPU tensors whose
    row ``i`` comes from image ``i``'s generator (in the order the draws are made)."""

    def __init__(self, seeds: Iterable[int]) -> None:
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    @classmethod
    def for_images(cls, seed: int, name: str, severity: int, indices: Iterable[int]) -> ImageRng:
        """The streams of the images at ``indices`` (their positions in the whole dataset)."""
        return cls(image_seed(seed, name, severity, i) for i in indices)

    def __len__(self) -> int:
        return len(self.generators)

    def _fill(self, shape: tuple[int, ...], dtype: torch.dtype, draw: Draw) -> torch.Tensor:
        # each image's numbers are drawn straight into its row: no per-image tensors to stack
        out = torch.empty((len(self), *shape), dtype=dtype)
        for g, row in zip(self.generators, out, strict=True):
            draw(g, row)
        return out

    def rand(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """U[0, 1) values, (N, *shape)."""
        return self._fill(shape, dtype, lambda g, row: torch.rand(shape, generator=g, out=row))

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Standard normal values, (N, *shape)."""
        return self._fill(shape, dtype, lambda g, row: torch.randn(shape, generator=g, out=row))

    def randint(self, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Integers uniform in [low, high), int64, (N, *shape)."""
        return self._fill(
            shape, torch.int64, lambda g, row: torch.randint(low, high, shape, generator=g, out=row)
        )

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Poisson samples of the (N, ...) rates (moved to the CPU as float64), float64."""
        rates = rates.detach().cpu().double()
        if len(rates) != len(self):
            raise ValueError(f"{len(rates)} rows of rates for {len(self)} images")
        if not self.generators:
            return rates.clone()
        return torch.stack(
            [torch.poisson(r, generator=g) for r, g in zip(rates, self.generators, strict=True)]
        )
