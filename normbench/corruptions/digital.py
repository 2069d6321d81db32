"""Digital and colour corruptions: brightness, contrast, saturate, pixelate, jpeg_compression.

Colour changes go through scikit-image's HSV conversion (as the reference does, including its
hue-0 convention for grey pixels); pixelate reproduces Pillow's BOX resampling (integer-rounded
8-bit passes, horizontal then vertical); JPEG goes through libjpeg with its default 4:2:0 chroma
subsampling, as Pillow does in the reference.
"""

from __future__ import annotations

import functools
import io
import warnings

import numpy as np
import torch
from PIL import Image

from normbench.corruptions import UINT8, register_corruption
from normbench.corruptions.ops import hsv_to_rgb, rgb_to_hsv, thread_pool
from normbench.corruptions.rng import ImageRng


@register_corruption("brightness", family="weather", description="HSV value + c")
def brightness(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return hsv_to_rgb(hsv)


@register_corruption("contrast", family="digital", description="(x - mean) c + mean per channel")
def contrast(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


@register_corruption("saturate", family="digital", description="HSV saturation s c1 + c2")
def saturate(x: torch.Tensor, c: tuple[float, float], rng: ImageRng) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return hsv_to_rgb(hsv)


@functools.cache
def pil_box_weights(in_size: int, out_size: int) -> torch.Tensor:
    """Pillow's BOX resampling as an (out_size, in_size) matrix (``precompute_coeffs``)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for j in range(lo, hi):
            t = (j - center + 0.5) / filterscale
            weights[i, j] = 1.0 if -0.5 < t <= 0.5 else 0.0
        weights[i] /= weights[i].sum()
    return weights


def pil_box_resize(x255: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N,C,H,W) 8-bit values to ``size`` x ``size`` like ``Image.resize(.., BOX)``."""
    h, w = x255.shape[-2:]
    cols = pil_box_weights(w, size).to(x255)
    rows = pil_box_weights(h, size).to(x255)
    x255 = torch.floor(x255 @ cols.T + 0.5)  # horizontal pass, rounded to 8 bits
    return torch.floor(rows @ x255 + 0.5)  # then vertical


@register_corruption("pixelate", family="digital", capabilities={UINT8},
                     description="BOX-downsample to int(s c), BOX-upsample back")  # fmt: skip
def pixelate(x: torch.Tensor, c: float, rng: ImageRng) -> torch.Tensor:
    size = x.shape[-1]
    x255 = x.double() if x.dtype == torch.uint8 else torch.round(x * 255)
    y255 = pil_box_resize(pil_box_resize(x255, int(size * c)), size)
    return y255.to(torch.uint8) if x.dtype == torch.uint8 else y255 / 255


@register_corruption("jpeg_compression", family="digital", capabilities={UINT8},
                     description="JPEG at quality q")  # fmt: skip
def jpeg_compression(x: torch.Tensor, quality: int, rng: ImageRng) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return _jpeg_round_trip(x.cpu(), int(quality)).to(x.device)
    images = torch.round(x * 255).to(torch.uint8).cpu()
    return _jpeg_round_trip(images, int(quality)).to(x) / 255


def _jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode (N,3,H,W) uint8 images with libjpeg at ``quality``.

    torchvision's batched codec runs the whole batch in C++ (about 4x faster than a Python loop
    over Pillow) and gives the same bytes as Pillow's libjpeg; its image codecs are deprecated
    in favour of TorchCodec, so Pillow is the fallback when they are gone.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg, encode_jpeg

            def round_trip(part: list[torch.Tensor]) -> list[torch.Tensor]:
                return decode_jpeg(encode_jpeg(part, quality=quality))

            # the codec releases the GIL: one share of the batch per intra-op thread
            parts = [
                list(p) for p in images.tensor_split(min(torch.get_num_threads(), len(images)))
            ]
            return torch.stack([y for part in thread_pool().map(round_trip, parts) for y in part])
    except (ImportError, RuntimeError):
        pass
    out = np.empty_like(images.permute(0, 2, 3, 1).numpy())
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality)
        with Image.open(buffer) as decoded:
            out[i] = np.asarray(decoded)
    return torch.from_numpy(out).permute(0, 3, 1, 2)
