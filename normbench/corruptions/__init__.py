"""The corruption engine: the 15 + 4 common corruptions as batched tensor operations.

Every corruption is a function ``fn(x, params, rng) -> y`` on float images ``x`` (N,3,H,W) in
[0, 1] (float64 for uint8 input, see :func:`to_unit`; code must keep ``x``'s dtype), on any
device; ``params`` is the parameter set of one severity from the table for the image size
(``tables.py``) and ``rng`` an :class:`~normbench.corruptions.rng.ImageRng`, one CPU generator
per image seeded from (seed, corruption, severity, image index), from which all of its
randomness is drawn. A seed therefore fixes each corrupted image, whatever the batch, the chunk
size or the device. :func:`corrupt` wraps them: it accepts uint8 or float batches, picks the
table, and returns the input dtype. uint8 results are truncated, as the reference scripts'
``np.uint8`` cast does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from normbench.corruptions.rng import ImageRng
from normbench.corruptions.tables import TABLE_VERSION, table_for
from normbench.errors import NormbenchError
from normbench.registry import Registry

CorruptionFn = Callable[[torch.Tensor, Any, ImageRng], torch.Tensor]

CORRUPTIONS: Registry[CorruptionFn] = Registry("corruption")
register_corruption = CORRUPTIONS.register

#: Capability flag: the corruption draws random numbers (others are deterministic).
RANDOM = "random"
#: Capability flag: the function also takes a uint8 batch as it is and returns uint8 (used for
#: those that work on 8-bit levels anyway, so the float round trip is skipped).
UINT8 = "uint8"

BENCHMARK = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)  # fmt: skip
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL = BENCHMARK + EXTRA
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
SEVERITIES = (1, 2, 3, 4, 5)

# float32 arithmetic leaves results that are integers in exact arithmetic a hair below them, where
# the reference's float64 lands on the integer; allow this much before truncating float32 results.
# Corruptions that compute in float64 return float64 and are truncated exactly, like the reference.
_FLOAT32_SLACK = 1e-4

#: On the CPU a batch is corrupted in chunks of about this many pixels (64 CIFAR images, one
#: ImageNet image): the float64 intermediates then stay in cache, which makes the engine about
#: 1.4x faster than one pass over 1,000 CIFAR images. Random numbers are drawn per image, so the
#: chunk size changes nothing in the results.
CPU_CHUNK_PIXELS = 1 << 16


def check(name: str, severity: int) -> None:
    """Raise a clear error for an unknown corruption or a severity outside 1..5."""
    CORRUPTIONS.get(name)
    if severity not in SEVERITIES:
        raise NormbenchError(f"Severity {severity!r} is out of range; valid severities are 1..5.")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1]: uint8 input becomes float64, as in the reference scripts (``x / 255.``),
    so results truncate to the same uint8 values; float input keeps its precision."""
    if images.dtype == torch.uint8:
        # by a tensor on the images' device: CUDA divides by a Python number as a multiplication
        # by its reciprocal, one bit off for some levels; a tensor divisor divides exactly
        return images.double() / torch.tensor(255.0, dtype=torch.float64, device=images.device)
    return images if images.is_floating_point() else images.float()


def from_unit(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clip to [0, 1] and return in ``dtype`` (uint8 by truncation, as ``np.uint8`` does)."""
    x = x.clamp(0, 1)
    if dtype != torch.uint8:
        return x.to(dtype)
    # in place on the clamped copy: each pass over the batch costs as much as a small corruption
    if x.dtype == torch.float64:
        return x.mul_(255).floor_().to(torch.uint8)
    return x.mul_(255).add_(_FLOAT32_SLACK).floor_().clamp_(max=255).to(torch.uint8)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    indices: torch.Tensor | Sequence[int] | None = None,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1..5) to a batch (N,3,H,W), uint8 or float.

    ``indices`` are the images' positions in their dataset (default ``0..N-1``); with ``seed``
    they fix each image's random numbers. ``chunk_size`` images are corrupted at a time (default:
    :data:`CPU_CHUNK_PIXELS` worth on the CPU, the whole batch elsewhere); it changes the speed
    only, never the result.
    """
    check(name, severity)
    if images.ndim != 4 or images.shape[1] != 3:
        raise NormbenchError(f"Expected images of shape (N, 3, H, W), got {tuple(images.shape)}.")
    _, table = table_for(images.shape[-2], images.shape[-1])
    index_list = range(len(images)) if indices is None else [int(i) for i in indices]
    if len(index_list) != len(images):
        raise NormbenchError(
            f"{len(index_list)} image indices were given for a batch of {len(images)} images; "
            "pass one dataset index per image."
        )
    if chunk_size is not None and chunk_size < 1:
        raise NormbenchError(f"The chunk size is a number of images >= 1, not {chunk_size}.")
    entry, params = CORRUPTIONS.get(name), table[name][severity - 1]

    def apply(lo: int, part: torch.Tensor) -> torch.Tensor:
        rng = ImageRng.for_images(seed, name, severity, index_list[lo : lo + len(part)])
        if part.dtype == torch.uint8 and entry.info.has(UINT8):
            return entry.obj(part, params, rng)
        return from_unit(entry.obj(to_unit(part), params, rng), part.dtype)

    chunk = chunk_size or len(images)
    if chunk_size is None and images.device.type == "cpu":
        chunk = max(1, CPU_CHUNK_PIXELS // (images.shape[-2] * images.shape[-1]))
    if len(images) <= chunk:
        return apply(0, images)
    return torch.cat([apply(lo, images[lo : lo + chunk]) for lo in range(0, len(images), chunk)])


def _register_all() -> None:
    # Importing the modules registers their corruptions.
    from normbench.corruptions import blur, digital, geometric, noise, weather  # noqa: F401


_register_all()

__all__ = [
    "ALL", "BENCHMARK", "CORRUPTIONS", "EXTRA", "FAMILIES", "RANDOM", "SEVERITIES",
    "TABLE_VERSION", "UINT8", "ImageRng", "check", "corrupt", "register_corruption",
]  # fmt: skip
