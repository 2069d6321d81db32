"""Blur corruptions: gaussian, glass, defocus, motion and zoom blur.

All five follow the authors' CIFAR and ImageNet scripts (Hendrycks & Dietterich 2019), batched:

* ``gaussian_blur``: scikit-image ``gaussian`` per channel (edge mode nearest, truncate 4), in
  float64 with SciPy's kernel and order of summation, so the blurred values are SciPy's bit for
  bit (uint8 input arrives as the float64 ``k / 255`` the scripts start from; float32 input that
  holds 8-bit levels is restored to it, :func:`as_float64`).
* ``glass_blur``: Gaussian blur, truncation to 8 bits, then ``iterations`` passes of the scripts'
  local shuffle, then a second Gaussian blur. The scripts' tuple "swap" on an H x W x 3 array
  copies (pixel (h, w) takes the value of its random neighbour, which keeps its own), and later
  pixels of the scan may read pixels the same pass has already rewritten; :func:`glass_shuffle`
  reproduces that sequential scan exactly by following each pixel's chain of reads
  (pointer jumping), for any ``max_delta``.
* ``defocus_blur``: the scripts' anti-aliased disk kernel, applied per channel with OpenCV's
  ``filter2D`` conventions (correlation, whole-sample symmetric border), in float64. The kernel
  is OpenCV 4's float32 kernel bit for bit (its last bits matter: a kernel summing to a hair
  under 1 truncates flat regions one level lower), except for the ImageNet severity 5 kernel,
  where 12 of 441 values differ in the last float32 bit. OpenCV applies kernels of 50 or more
  taps through a DFT, whose round-off (about 1e-16) we do not reproduce.
* ``motion_blur``: ImageMagick's ``MotionBlurImage`` (one-sided Gaussian kernel along the angle,
  edge virtual pixels) at an angle uniform in [-45, 45] degrees per image. The scripts pass the
  image through an 8-bit PNG to Wand over ImageMagick 6 Q16, which blurs the 16-bit quanta
  (8-bit level times 257) in double, rounds the sum to a 16-bit quantum and truncates that to 8
  bits when it writes the PNG; :func:`~normbench.corruptions.ops.magick_motion_blur` does the
  same, with ImageMagick's kernel and offsets computed as it computes them. The tests compare it
  with Wand pixel for pixel.
* ``zoom_blur``: the mean of the image and its centre zooms (the scripts' ``clipped_zoom``, centre
  crop and centre trim) for the zoom factors ``numpy.arange(start, stop, step)``, in float32 as
  the scripts compute it (each zoomed layer interpolated in float64 and stored in float32, as
  SciPy does). The bilinear weights are PyTorch's, not SciPy's, so a layer can differ from SciPy's
  in the last float32 bit.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from normbench.corruptions import RANDOM, UINT8, register_corruption
from normbench.corruptions.ops import (
    border_index,
    correlate2d,
    gaussian_filter,
    magick_motion_blur,
)
from normbench.corruptions.rng import ImageRng

# A float32 image made from 8-bit levels is within this much (in 8-bit units) of a level.
_LEVEL_SNAP = 1e-4


def as_float64(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64; float32 values that are rounded 8-bit levels ``k / 255`` become the
    float64 ``k / 255`` the reference scripts compute (others move by < 4e-7 at most)."""
    if x.dtype == torch.float64:
        return x
    x255 = x.double() * 255
    levels = torch.round(x255)
    return torch.where((x255 - levels).abs() < _LEVEL_SNAP, levels / 255, x.double())


def scipy_gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage ``gaussian(x, sigma)`` per channel of (N,C,H,W) float64 ``x``, bit for bit."""
    return gaussian_filter(x, sigma)


@register_corruption("gaussian_blur", family="blur",
                     description="Gaussian filter of sigma c per channel")  # fmt: skip
def gaussian_blur(x: torch.Tensor, sigma: float, rng: ImageRng) -> torch.Tensor:
    return scipy_gaussian(as_float64(x), float(sigma)).to(x.dtype)


# --- glass blur ---------------------------------------------------------------------------------


#: Pointer jumps of the glass shuffle between two convergence checks.
_JUMPS_PER_CHECK = 4


def glass_offsets(
    height: int, width: int, max_delta: int, rng: ImageRng
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of the shuffle's random offsets, ``(dx, dy)``, each (N, H - 2d, W - 2d).

    Entry ``[:, i, j]`` belongs to the ``i``-th row and ``j``-th column of the scan, i.e. to pixel
    ``(H - d - i, W - d - j)``; each offset is uniform in ``[-d, d - 1]`` (``randint(-d, d)``),
    drawn column offset first, as the scripts draw them.
    """
    d = max_delta
    draws = rng.randint(-d, d, (height - 2 * d, width - 2 * d, 2))
    return draws[..., 0], draws[..., 1]


def glass_shuffle(
    x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, max_delta: int
) -> torch.Tensor:
    """One pass of the scripts' sequential shuffle, for a batch at once.

    The scan visits rows ``h = H-d .. d+1`` (descending) and, in each, columns ``w = W-d .. d+1``
    (descending), and sets ``x[h, w] <- x[h + dy, w + dx]`` with the current values. A read of a
    pixel the scan has already rewritten takes that pixel's new value, so each pixel's final value
    is the original value at the end of its chain of such reads; the chains are followed by
    pointer jumping (about log2(H W) gathers at most). The offsets lie in ``[-d, d - 1]``, as
    :func:`glass_offsets` draws them; when ``max_delta`` is 1 they are -1 or 0, so every read
    lies at or after the reader in scan order and there are no chains to follow.
    """
    n, c, h, w = x.shape
    d = max_delta
    device = x.device
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    written = torch.zeros(h, w, dtype=torch.bool, device=device)
    written[d + 1 : h - d + 1, d + 1 : w - d + 1] = True
    # Offsets laid out on the image: scan entry [i, j] is pixel (H - d - i, W - d - j). Both
    # planes go to the device in one copy (none when they are there already).
    off_x, off_y = torch.zeros(2, n, h, w, dtype=torch.long, device=device)
    inner = (slice(None), slice(d + 1, h - d + 1), slice(d + 1, w - d + 1))
    off_x[inner], off_y[inner] = torch.stack((dx, dy)).to(device).flip(2, 3)
    src_r = rows + off_y  # (n, h, w); unwritten pixels read themselves
    src_c = cols + off_x
    src = (src_r * w + src_c).flatten(1)
    here = (rows * w + cols).expand(n, h, w).flatten(1)
    src_written = written.flatten()[src]
    src_earlier = (src_r > rows) | ((src_r == rows) & (src_c > cols))
    chained = written.flatten()[None] & src_written & src_earlier.flatten(1)
    nxt = torch.where(chained, src, here)  # chain ends point at themselves
    term = torch.where(written.flatten()[None], src, here)  # what a chain end reads
    # Each jump doubles how far along its chain a pixel points, up to the chain's end, where it
    # stays: once a jump changes nothing, no later one does. Convergence is therefore checked
    # only every few jumps, as each check waits for the device.
    jumps = 0 if d == 1 else max(1, math.ceil(math.log2(h * w)))
    for step in range(1, jumps + 1):
        jumped = nxt.gather(1, nxt)
        if step % _JUMPS_PER_CHECK == 0 and torch.equal(jumped, nxt):
            break
        nxt = jumped
    source = term.gather(1, nxt)
    flat = x.flatten(2)
    return flat.gather(2, source[:, None, :].expand(n, c, h * w)).view(n, c, h, w)


def glass_blur_with(
    x: torch.Tensor,
    params: tuple[float, int, int],
    offsets: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Glass blur with given shuffle offsets, one ``(dx, dy)`` pair per pass."""
    sigma, d, _ = params
    x8 = torch.floor(scipy_gaussian(as_float64(x), float(sigma)) * 255).clamp_(0, 255)
    # every pass's offsets go to the device in one copy
    moved = torch.stack([torch.stack(pair) for pair in offsets]).to(x.device) if offsets else ()
    for dx, dy in moved:
        x8 = glass_shuffle(x8, dx, dy, int(d))
    return scipy_gaussian(x8 / 255, float(sigma)).clamp_(0, 1).to(x.dtype)


@register_corruption("glass_blur", family="blur", capabilities={RANDOM},
                     description="blur, 8-bit, local random pixel shuffle, blur")  # fmt: skip
def glass_blur(x: torch.Tensor, c: tuple[float, int, int], rng: ImageRng) -> torch.Tensor:
    _, _, h, w = x.shape
    _, d, iterations = c
    offsets = [glass_offsets(h, w, int(d), rng) for _ in range(int(iterations))]
    return glass_blur_with(x, c, offsets)


# --- defocus blur -------------------------------------------------------------------------------


def _opencv_gaussian_taps(ksize: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(ksize, sigma, CV_32F)`` (OpenCV 4's bit-exact construction:
    ``exp(x^2 scale)`` on doubled offsets, scaled by the reciprocal of the sum), float32."""
    scale = -0.125 / (sigma * sigma)
    half = [math.exp(float(t * t) * scale) for t in range(1 - ksize, 0, 2)]
    total = 0.0
    for value in half:
        total += value
    norm = 1.0 / (total * 2 + 1.0)
    side = [value * norm for value in half]
    return np.array(side + [norm] + side[::-1], dtype=np.float32)


def _fma32(a: np.ndarray, b: np.float32, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` with one rounding, as SIMD fused multiply-adds compute it."""
    return (a.astype(np.float64) * np.float64(b) + c.astype(np.float64)).astype(np.float32)


def _opencv_symmetric_pass(a: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """One float32 pass of OpenCV's separable filter with a symmetric kernel along ``axis``
    (whole-sample symmetric border): along rows the pair terms first and the centre last, down
    columns the centre first, pairs from the inside out, accumulated with fused multiply-adds."""
    r = len(taps) // 2
    n = a.shape[axis]
    padded = np.take(a, border_index(n, r, "mirror").numpy(), axis=axis)

    def tap(j: int) -> np.ndarray:
        return np.take(padded, np.arange(r + j, r + j + n), axis=axis)

    pairs = [(tap(-j) + tap(j), taps[r + j]) for j in range(1, r + 1)]
    if axis == 1:
        acc = pairs[0][0] * pairs[0][1]
        for values, weight in [*pairs[1:], (tap(0), taps[r])]:
            acc = _fma32(values, weight, acc)
        return acc
    acc = tap(0) * taps[r]
    for values, weight in pairs:
        acc = _fma32(values, weight, acc)
    return acc


@functools.cache
def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The scripts' ``disk(radius, alias_blur)``: a normalised float32 disk on a 17 x 17 grid (a
    ``2r + 1`` grid and a 5 x 5 instead of a 3 x 3 anti-aliasing Gaussian when r > 8), blurred by
    ``cv2.GaussianBlur`` in float32 (rows, then columns; whole-sample symmetric border). Bit for
    bit OpenCV 4's kernel for every table entry but ImageNet severity 5, where 12 of its 441
    values differ in the last float32 bit. Returned as float64, with the all-zero outer rings
    removed (they add nothing to the correlation)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    taps = _opencv_gaussian_taps(ksize, alias_blur)
    blurred = _opencv_symmetric_pass(_opencv_symmetric_pass(disk, taps, 1), taps, 0)
    kernel = torch.from_numpy(blurred).double()
    while (
        kernel.shape[0] > 1
        and not kernel[0].any()
        and not kernel[-1].any()
        and not (kernel[:, 0].any() or kernel[:, -1].any())
    ):
        kernel = kernel[1:-1, 1:-1]
    return kernel


@register_corruption("defocus_blur", family="blur",
                     description="anti-aliased disk filter of radius r per channel")  # fmt: skip
def defocus_blur(x: torch.Tensor, c: tuple[float, float], rng: ImageRng) -> torch.Tensor:
    return correlate2d(as_float64(x), disk_taps(float(c[0]), float(c[1])), "mirror").to(x.dtype)


@functools.cache
def disk_taps(radius: float, alias_blur: float) -> tuple[tuple[float, ...], ...]:
    """:func:`disk_kernel`'s rows as Python numbers (read once; the correlation uses its taps
    as scalars, which a kernel on the device would have to be read back for)."""
    return tuple(tuple(row) for row in disk_kernel(radius, alias_blur).tolist())


# --- motion blur --------------------------------------------------------------------------------


def motion_blur_at(
    x: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor
) -> torch.Tensor:
    """ImageMagick 6 Q16's motion blur at the given angle per image, on 8-bit levels (uint8 in
    and out, or floats in [0, 1]; float values between levels are blurred as they are)."""
    x255 = x.double() if x.dtype == torch.uint8 else as_float64(x) * 255
    levels = magick_motion_blur(x255, radius, sigma, angles_deg)
    return levels.to(torch.uint8) if x.dtype == torch.uint8 else (levels / 255).to(x.dtype)


@register_corruption("motion_blur", family="blur", capabilities={RANDOM, UINT8},
                     description="ImageMagick motion blur, angle uniform in [-45, 45]")  # fmt: skip
def motion_blur_corruption(x: torch.Tensor, c: tuple[float, float], rng: ImageRng) -> torch.Tensor:
    angles = rng.rand(()) * 90 - 45
    return motion_blur_at(x, float(c[0]), float(c[1]), angles)


# --- zoom blur ----------------------------------------------------------------------------------


@functools.cache
def _zoom_matrix(size: int, zoom: float) -> torch.Tensor:
    """``ops.clipped_zoom`` along one axis of length ``size`` as a (size, size) float64 matrix:
    centre crop of ceil(size / zoom), corner-aligned linear resize to round(crop * zoom), centre
    trim back to ``size``."""
    crop = int(math.ceil(size / zoom))
    top = (size - crop) // 2
    zoomed = int(round(crop * zoom))
    trim = (zoomed - size) // 2
    scale = (crop - 1) / (zoomed - 1) if zoomed > 1 else 0.0
    m = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        pos = (i + trim) * scale
        lo = min(int(math.floor(pos)), crop - 1)
        frac = pos - lo
        hi = min(lo + 1, crop - 1)
        m[i, top + lo] += 1 - frac
        m[i, top + hi] += frac
    return m


@functools.cache
def _zoom_matrix_on(size: int, zoom: float, device: torch.device) -> torch.Tensor:
    # one copy per device: a copy to a GPU per zoom step would wait for the work queued before it
    return _zoom_matrix(size, zoom).to(device)


@register_corruption("zoom_blur", family="blur", capabilities={UINT8},
                     description="mean of the image and its centre zooms")  # fmt: skip
def zoom_blur(x: torch.Tensor, c: tuple[float, float, float], rng: ImageRng) -> torch.Tensor:
    zooms = np.arange(*c)
    # the scripts' (x / 255.).astype(np.float32)
    x32 = (x.double() / 255).float() if x.dtype == torch.uint8 else x.float()
    x64 = x32.double()
    out = torch.zeros_like(x32)
    for zoom in zooms:
        # clipped_zoom as one matrix per axis: linear interpolation is separable, and two small
        # matrix products beat a crop + resize + trim per zoom by a wide margin.
        a = _zoom_matrix_on(x.shape[-2], float(zoom), x.device)
        b = _zoom_matrix_on(x.shape[-1], float(zoom), x.device)
        out += (a @ x64 @ b.T).float()
    y = (x32 + out) / (len(zooms) + 1)
    # The scripts truncate the float32 product clip(y) * 255: do that for uint8, and hand its
    # exact value over for float64 (which ``from_unit`` truncates the same way).
    if x.dtype == torch.uint8:
        return y.clamp_(0, 1).mul_(255).floor_().to(torch.uint8)
    if x.dtype == torch.float64:
        return (y.clamp(0, 1) * 255).double() / 255
    return y.to(x.dtype)
