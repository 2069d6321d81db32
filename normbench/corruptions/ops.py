"""Batched image operations the corruptions share, written to match the reference libraries.

Images are float tensors (N, C, H, W). Border modes are named as in SciPy, which the reference
scripts use through scikit-image: ``nearest`` repeats the edge (a a | a b c), ``reflect`` is the
half-sample symmetric extension (b a | a b c), ``mirror`` the whole-sample one (c b | a b c; what
OpenCV calls BORDER_REFLECT_101).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

BORDER_MODES = ("nearest", "reflect", "mirror")


@functools.cache
def thread_pool() -> ThreadPoolExecutor:
    """Threads for serial C++ work that releases the GIL and starts no OpenMP team of its own
    (the JPEG codec; torch ops in these threads would each start a spinning team)."""
    return ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="corrupt")


def border_index(n: int, pad: int, mode: str, device: torch.device | None = None) -> torch.Tensor:
    """Source indices of a length-``n`` axis padded by ``pad`` on both sides in ``mode``."""
    i = torch.arange(-pad, n + pad, device=device)
    if mode == "nearest":
        return i.clamp(0, n - 1)
    if mode == "reflect":  # period 2n: 0..n-1, then n-1..0
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "mirror":  # period 2n-2: 0..n-1, then n-2..1
        if n == 1:
            return torch.zeros_like(i)
        i = i % (2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"unknown border mode {mode!r}; use one of {BORDER_MODES}")


def pad2d(x: torch.Tensor, pad_h: int, pad_w: int, mode: str) -> torch.Tensor:
    """Pad the last two axes of ``x`` by gathering with :func:`border_index` (any pad width)."""
    fast = {"nearest": "replicate", "mirror": "reflect"}.get(mode)
    if (
        fast
        and x.is_floating_point()
        and x.ndim in (3, 4)
        and pad_h < x.shape[-2]
        and pad_w < x.shape[-1]
    ):
        # torch's own padding kernels (much faster than a gather) where they apply
        return F.pad(x, (pad_w, pad_w, pad_h, pad_h), mode=fast)
    if pad_h:
        x = x.index_select(-2, border_index(x.shape[-2], pad_h, mode, x.device))
    if pad_w:
        x = x.index_select(-1, border_index(x.shape[-1], pad_w, mode, x.device))
    return x


def correlate2d(
    x: torch.Tensor, kernel: torch.Tensor | Sequence[Sequence[float]], mode: str
) -> torch.Tensor:
    """Per-channel correlation of ``x`` (N,C,H,W) with one odd 2-D ``kernel`` (OpenCV filter2D).

    The taps are used as Python numbers: pass the kernel as rows of numbers or as a CPU tensor
    (a kernel on an accelerator would be read back, which waits for its queued work)."""
    rows = kernel.tolist() if isinstance(kernel, torch.Tensor) else kernel
    kh, kw = len(rows), len(rows[0])
    h, w = x.shape[-2:]
    y = pad2d(x, kh // 2, kw // 2, mode)
    out = torch.zeros_like(x)
    # Taps accumulated one by one in row-major order (as OpenCV's filter2D does): cheaper than a
    # float64 conv2d for the small kernels used here, and rounds like the reference.
    taps = itertools.product(range(kh), range(kw))
    for (i, j), k in zip(taps, itertools.chain.from_iterable(rows), strict=True):
        if k:
            out += y[..., i : i + h, j : j + w] * k
    return out


def _scipy_gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    radius = int(truncate * sigma + 0.5)
    # computed in NumPy, as SciPy does, so the float64 weights are the same to the last bit
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """SciPy's Gaussian kernel: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    return torch.from_numpy(_scipy_gaussian_weights(sigma, truncate))


@functools.cache
def gaussian_taps(sigma: float, truncate: float = 4.0) -> tuple[float, ...]:
    """:func:`gaussian_kernel1d`'s weights as Python floats (the same doubles), made once."""
    return tuple(float(v) for v in _scipy_gaussian_weights(sigma, truncate))


def symmetric_correlate1d(
    x: torch.Tensor, weights: torch.Tensor | Sequence[float], dim: int, mode: str = "nearest"
) -> torch.Tensor:
    """SciPy's ``correlate1d`` with a symmetric odd kernel along ``dim``, in its order of
    operations: ``w0 x[i] + sum over j = r..1 of w_j (x[i - j] + x[i + j])``. The weights are
    used as Python numbers (a CPU tensor or a sequence of floats)."""
    r = len(weights) // 2
    n = x.shape[dim]
    padded = x.index_select(dim, border_index(n, r, mode, x.device))
    taps = weights.tolist() if isinstance(weights, torch.Tensor) else weights
    out = padded.narrow(dim, r, n) * taps[r]
    for j in range(r, 0, -1):
        out = out + (padded.narrow(dim, r - j, n) + padded.narrow(dim, r + j, n)) * taps[r + j]
    return out


def gaussian_filter(
    x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0
) -> torch.Tensor:
    """``scipy.ndimage.gaussian_filter`` over H and W of each channel (skimage ``gaussian``), bit
    for bit in float64: SciPy's kernel and summation order, rows (H) first, then columns (W).
    Shifted multiply-adds beat a float64 conv2d for these short kernels."""
    if sigma <= 0:
        return x
    k = gaussian_taps(float(sigma), float(truncate))
    return symmetric_correlate1d(symmetric_correlate1d(x, k, -2, mode), k, -1, mode)


def opencv_gaussian_kernel(ksize: int, sigma: float) -> torch.Tensor:
    """``cv2.getGaussianKernel(ksize, sigma)`` for sigma > 0 (float64)."""
    x = torch.arange(ksize, dtype=torch.float64) - (ksize - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


# --- colour -------------------------------------------------------------------------------------


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``rgb2hsv`` for (N,3,H,W) in [0,1]: H in [0,1), S = delta/V (0 if V=0)."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(1)
    delta = v - rgb.min(1).values
    s = torch.where(delta > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(
        r == v,
        (g - b) / safe,
        torch.where(g == v, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe),
    )
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, v), 1)


# Which of (v, q, p, t) each RGB channel takes in each hue sextant (scikit-image's table).
_HSV_SEXTANT = ((0, 1, 2, 2, 3, 0), (3, 0, 0, 1, 2, 2), (2, 2, 3, 0, 0, 1))


@functools.cache
def device_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor, made once per device: a copy to an accelerator on every call
    would wait for the work queued before it. Shared between calls, so never written to."""
    return torch.tensor(values, dtype=dtype, device=device)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """scikit-image's ``hsv2rgb`` for (N,3,H,W)."""
    h, s, v = hsv.unbind(1)
    hi = torch.floor(h * 6)
    f = h * 6 - hi
    candidates = torch.stack((v, v * (1 - f * s), v * (1 - s), v * (1 - (1 - f) * s)))
    sextant = hi.long() % 6
    table = device_constant(_HSV_SEXTANT, torch.int64, hsv.device)
    pick = table[:, sextant]  # (3, N, H, W) indices into candidates
    return candidates.gather(0, pick).permute(1, 0, 2, 3)


def rgb_to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """OpenCV's ``COLOR_RGB2GRAY`` weights, keeping a channel axis: (N,1,H,W)."""
    w = device_constant((0.299, 0.587, 0.114), rgb.dtype, rgb.device)
    return (rgb * w.view(1, 3, 1, 1)).sum(1, keepdim=True)


# --- geometry -----------------------------------------------------------------------------------


#: ImageMagick's ``MagickSQ2PI`` and ``MagickPI`` (``DegreesToRadians``), as doubles.
_MAGICK_SQ2PI = 2.50662827463100024161235523934010416269302368164062
_MAGICK_PI = 3.14159265358979323846264338327950288419716939937510


@functools.cache
def magick_motion_kernel(radius: float, sigma: float) -> tuple[float, ...]:
    """``MotionBlurImage``'s weights as ImageMagick 6 computes them, bit for bit: width
    ``2 ceil(radius) + 1``, ``exp(-i^2 / (2 sigma^2)) / (sqrt(2 pi) sigma)`` for i = 0..width-1,
    each divided by their sum (summed in order)."""
    width = int(2 * math.ceil(radius) + 1)
    sigma = max(abs(sigma), 1e-12)  # MagickSigma: MagickEpsilon at least
    kernel = [math.exp(-float(i * i) / (2.0 * sigma * sigma)) / (_MAGICK_SQ2PI * sigma)
              for i in range(width)]  # fmt: skip
    total = 0.0
    for value in kernel:
        total += value
    return tuple(value / total for value in kernel)


def magick_motion_offsets(width: int, angle_deg: float) -> list[tuple[int, int]]:
    """The (row, column) offset of each tap, as ``MotionBlurImage`` computes it: ``ceil(i * p /
    hypot(p) - 0.5)`` with ``p = width (sin a, cos a)``, in C doubles (Python's ``math`` calls
    the same C library functions)."""
    theta = _MAGICK_PI * angle_deg / 180.0
    point_x, point_y = width * math.sin(theta), width * math.cos(theta)
    hyp = math.hypot(point_x, point_y)
    return [(math.ceil(i * point_x / hyp - 0.5), math.ceil(i * point_y / hyp - 0.5))
            for i in range(width)]  # fmt: skip


def motion_blur(
    x: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor
) -> torch.Tensor:
    """ImageMagick's ``MotionBlurImage`` on a batch, one angle per image (not quantised).

    Tap i (weights :func:`magick_motion_kernel`) samples the pixel :func:`magick_motion_offsets`
    ahead, clamped to the image edge (ImageMagick's default "edge" virtual pixels); the weighted
    values are added tap by tap, in ImageMagick's order.
    """
    n, c, h, w = x.shape
    weights = magick_motion_kernel(float(radius), float(sigma))
    width = len(weights)
    # The offsets are computed in Python from the angles, which the corruptions draw on the CPU
    # (reading them is free there), and sent to the device in one copy.
    offsets = torch.tensor(
        [magick_motion_offsets(width, float(a)) for a in angles_deg.double().cpu().tolist()],
        dtype=torch.long,
    ).reshape(n, width, 2)
    dy, dx = offsets.to(x.device).unbind(2)  # (N, width) each
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    channel_start = (torch.arange(c, device=x.device) * (h * w)).view(1, c, 1)
    flat = x.reshape(n, c * h * w)
    out = torch.zeros_like(x)
    for tap in range(width):
        r = (rows[None] + dy[:, tap, None]).clamp(0, h - 1)  # (N, H)
        q = (cols[None] + dx[:, tap, None]).clamp(0, w - 1)  # (N, W)
        # one gather per tap over all channels (two per-axis gathers cost more)
        index = (r[:, :, None] * w + q[:, None, :]).view(n, 1, h * w) + channel_start
        out += weights[tap] * flat.gather(1, index.view(n, -1)).view(n, c, h, w)
    return out


def magick_motion_blur(
    x255: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor
) -> torch.Tensor:
    """What Wand over ImageMagick 6 Q16 (non-HDRI) makes of 8-bit images: float64 (N,C,H,W)
    values on the 0..255 scale in, 8-bit levels (float64) out.

    ImageMagick reads each level k as the 16-bit quantum 257 k, blurs in double, stores the sum
    rounded (halves up) and clamped as a 16-bit quantum, and writes the 8-bit PNG by truncating
    quantum / 257. The two steps differ from one rounding of the blurred level on about half of
    all values.
    """
    quanta = motion_blur(x255.double() * 257, radius, sigma, angles_deg)
    quanta = quanta.add_(0.5).floor_().clamp_(0, 65535)
    return torch.div(quanta, 257, rounding_mode="floor")


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """The reference scripts' centre zoom of square images: crop the central ``ceil(h/zoom)``
    square, resize it by ``zoom`` with linear interpolation (``scipy.ndimage.zoom`` order 1, which
    maps corner to corner) and trim the centre ``h x h`` back out."""
    h = x.shape[-2]
    ch = int(math.ceil(h / zoom))
    top = (h - ch) // 2
    crop = x[..., top : top + ch, top : top + ch]
    size = int(round(ch * zoom))
    zoomed = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=True)
    trim = (size - h) // 2
    return zoomed[..., trim : trim + h, trim : trim + h]
