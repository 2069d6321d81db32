"""Digital and colour corruptions: brightness, contrast, saturate, pixelate, jpeg_compression.

Colour changes go through scikit-image's HSV conversion (as the reference does, including its
hue-0 convention for grey pixels); pixelate reproduces Pillow's BOX resampling (integer-rounded
8-bit passes, horizontal then vertical); JPEG goes through libjpeg with its default 4:2:0 chroma
subsampling, as Pillow does in the reference.

JPEG codec: libjpeg on the CPU by default, also for a batch on a GPU (copied there and back), so
every set has the reference's bytes. ``NORMBENCH_JPEG_CODEC=nvjpeg`` opts into torchvision's CUDA
codec for batches on a CUDA device: faster there, but its bytes differ from libjpeg's by a few
levels, so sets made with it say so (see :func:`jpeg_codec_on`).
"""

from __future__ import annotations

import functools
import io
import logging
import os
import warnings

import numpy as np
import torch
from PIL import Image

from normbench.corruptions import UINT8, register_corruption
from normbench.corruptions.ops import hsv_to_rgb, rgb_to_hsv, thread_pool
from normbench.corruptions.rng import ImageRng
from normbench.errors import NormbenchError

JPEG_CODECS = ("libjpeg", "nvjpeg")
JPEG_CODEC_VAR = "NORMBENCH_JPEG_CODEC"

log = logging.getLogger(__name__)


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


@functools.cache
def _box_weights_on(
    in_size: int, out_size: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    # one copy per device and dtype: a copy to a GPU per call would wait for its queued work
    return pil_box_weights(in_size, out_size).to(device=device, dtype=dtype)


def pil_box_resize(x255: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N,C,H,W) 8-bit values to ``size`` x ``size`` like ``Image.resize(.., BOX)``."""
    h, w = x255.shape[-2:]
    cols = _box_weights_on(w, size, x255.device, x255.dtype)
    rows = _box_weights_on(h, size, x255.device, x255.dtype)
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
        return jpeg_round_trip(x, int(quality))
    return jpeg_round_trip(torch.round(x * 255).to(torch.uint8), int(quality)).to(x) / 255


def jpeg_codec() -> str:
    """The chosen JPEG codec: ``NORMBENCH_JPEG_CODEC``, "libjpeg" (the default) or "nvjpeg"."""
    codec = os.environ.get(JPEG_CODEC_VAR, "").strip().lower() or "libjpeg"
    if codec not in JPEG_CODECS:
        raise NormbenchError(
            f"{JPEG_CODEC_VAR}={os.environ[JPEG_CODEC_VAR]!r} is not a JPEG codec; use one of "
            f"{', '.join(JPEG_CODECS)} (libjpeg, the default, gives the reference's bytes)."
        )
    return codec


def jpeg_codec_on(device: torch.device | str) -> str:
    """The codec ``jpeg_compression`` uses for a batch on ``device``: "nvjpeg" when it is chosen,
    the device is a CUDA one and the codec works there; "libjpeg" otherwise (with a warning, once
    per device, when nvjpeg was chosen but cannot be used)."""
    if jpeg_codec() != "nvjpeg":
        return "libjpeg"
    problem = _nvjpeg_problem(torch.device(device))
    if problem is None:
        return "nvjpeg"
    _warn_once(f"{JPEG_CODEC_VAR}=nvjpeg, but {problem}; using libjpeg on the CPU instead.")
    return "libjpeg"


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _nvjpeg_problem(device: torch.device) -> str | None:
    """Why torchvision's CUDA codec cannot round-trip images on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"the images are on {device}, not on a CUDA device"
    try:
        _nvjpeg_round_trip(torch.full((2, 3, 16, 16), 128, dtype=torch.uint8, device=device), 75)
    except Exception as err:  # noqa: BLE001 - any failure of the codec means: fall back
        return f"torchvision's CUDA JPEG codec failed on {device} ({type(err).__name__}: {err})"
    return None


def jpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode (N,3,H,W) uint8 images at ``quality`` with the codec of
    :func:`jpeg_codec_on` for their device; the result is on the images' device."""
    if jpeg_codec_on(images.device) == "nvjpeg":
        return _nvjpeg_round_trip(images, quality)
    return _jpeg_round_trip(images.cpu(), quality).to(images.device)


def _nvjpeg_round_trip(images: torch.Tensor, quality: int) -> torch.Tensor:
    """torchvision's nvjpeg encoder and decoder on a CUDA batch. The encoded bytes come back
    in one copy, since the decoder reads its input from host memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import decode_jpeg, encode_jpeg

        encoded = encode_jpeg(list(images.contiguous()), quality=quality)
        data = torch.cat(encoded).cpu().split([len(e) for e in encoded])
        return torch.stack(decode_jpeg(list(data), device=images.device))


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
