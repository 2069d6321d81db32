"""Geometric corruptions: elastic_transform, as in the Hendrycks CIFAR-10-C / ImageNet-C scripts.

Per image, with ``params = (alpha, sigma, affine)`` in pixels:

1. A random affine warp. Three control points around the centre (built from ``(H // 2, W // 2)``
   and ``min(H, W) // 3``, used as OpenCV ``(x, y)`` points exactly as the reference does, which
   only matters for non-square images) are each moved by ``U(-affine, affine)`` in x and y; the
   affine map taking the old points to the moved ones is applied like ``cv2.warpAffine``:
   ``dst(p) = src(M^-1 p)``, bilinear, whole-sample reflection at the border (BORDER_REFLECT_101).
2. A smooth random displacement field: ``dx = gaussian(U(-1, 1), sigma) * alpha``, then ``dy``,
   both with SciPy's half-sample ``reflect`` border and ``truncate=3``; the warped image is sampled
   bilinearly at ``(row + dy, col + dx)`` with half-sample reflection outside the image, like
   ``scipy.ndimage.map_coordinates(order=1, mode='reflect')``.

The random numbers are drawn by :func:`elastic_transform`; :func:`elastic_from_draws` applies
given ones. The warp's source positions are exact (float64 positions, float32 interpolation). The
OpenCV releases of the reference's time computed them in fixed point, rounded to 1/32 pixel, which
is not reproduced (it moves values at strong edges by up to a few 8-bit levels); OpenCV 5's float32
path does not round them either and agrees with this one to float rounding.
"""

from __future__ import annotations

import functools

import torch

from normbench.corruptions import RANDOM, register_corruption
from normbench.corruptions.ops import border_index, gaussian_kernel1d
from normbench.corruptions.rng import ImageRng

_TRUNCATE = 3.0  # the reference's gaussian(..., truncate=3)


def fold_index(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Map integer indices anywhere on the line into ``0..n-1`` by the border ``mode``.

    ``reflect``: half-sample symmetric (period 2n, ``b a | a b``); ``mirror``: whole-sample
    (period 2n - 2, ``c b | a b c``, OpenCV's BORDER_REFLECT_101).
    """
    if mode not in ("reflect", "mirror"):
        raise ValueError(f"unknown border mode {mode!r}; use 'reflect' or 'mirror'")
    if (mode == "mirror" and n == 1) or i.numel() == 0:
        return torch.zeros_like(i)
    period = 2 * n if mode == "reflect" else 2 * n - 2
    # The folds below cover indices in [n - period, period). Integer division is slow on the CPU,
    # so there the remainder is taken only where indices lie beyond that, which reading their
    # bounds tells at no cost. On an accelerator that read would wait for the device's queued
    # work, while the remainder is cheap: it is always taken (with the same result).
    if not _reads_are_free(i) or not _within(i, n - period, period):
        i = i % period
    before = -i - 1 if mode == "reflect" else -i
    return torch.where(i < 0, before, torch.where(i >= n, period - 1 - i + (mode == "mirror"), i))


def _reads_are_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values into Python costs no wait for a device (CPU tensors)."""
    return t.device.type == "cpu"


def _within(i: torch.Tensor, low: int, high: int) -> bool:
    """Whether all of ``i`` lies in [low, high) (one read of the tensor)."""
    lo, hi = i.aminmax()
    return bool((lo >= low) & (hi < high))


def bilinear_sample(
    x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str
) -> torch.Tensor:
    """Sample ``x`` (N,C,H,W) bilinearly at float positions ``rows``, ``cols`` (N,Ho,Wo).

    The four neighbours ``floor`` and ``floor + 1`` of each position are folded into the image by
    :func:`fold_index`, so positions may lie anywhere. Returns (N,C,Ho,Wo) in ``x``'s dtype.
    """
    n, c, h, w = x.shape
    out_shape = rows.shape[1:]
    r0 = torch.floor(rows)
    c0 = torch.floor(cols)
    fr = (rows - r0).to(x.dtype).reshape(n, 1, -1)
    fc = (cols - c0).to(x.dtype).reshape(n, 1, -1)
    r0 = r0.long()
    c0 = c0.long()
    ra, rb = fold_index(r0, h, mode), fold_index(r0 + 1, h, mode)
    ca, cb = fold_index(c0, w, mode), fold_index(c0 + 1, w, mode)
    flat = x.reshape(n, c, h * w)

    def at(r: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        idx = (r * w + q).reshape(n, 1, -1).expand(n, c, -1)
        return flat.gather(2, idx)

    top = at(ra, ca) * (1 - fc) + at(ra, cb) * fc
    bottom = at(rb, ca) * (1 - fc) + at(rb, cb) * fc
    return (top * (1 - fr) + bottom * fr).reshape(n, c, *out_shape)


@functools.cache
def _gaussian_matrix_on(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    # one copy per device: copying the matrices to a GPU on every call would wait for the work
    # queued before them
    return gaussian_matrix(n, sigma, device)


def gaussian_matrix(n: int, sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """(n, n) float64 matrix ``K`` with ``K @ v`` = SciPy's 1-D Gaussian filter of ``v``.

    Border ``reflect`` (half-sample) and ``truncate=3``; taps that fall outside the axis, however
    far (the kernel may be much longer than the axis), are folded back onto it. ``sigma <= 0`` is
    the identity, as ``scipy.ndimage.gaussian_filter`` leaves the input unchanged then.
    """
    if sigma <= 0:
        return torch.eye(n, dtype=torch.float64, device=device)
    k = gaussian_kernel1d(sigma, _TRUNCATE)
    radius = len(k) // 2
    table = border_index(n, radius, "reflect")  # source of positions -radius .. n + radius - 1
    src = table[torch.arange(n)[:, None] + torch.arange(2 * radius + 1)[None, :]]
    m = torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, src, k.expand(n, -1).contiguous())
    return m.to(device)


def control_points(h: int, w: int) -> torch.Tensor:
    """The reference's three source points (3, 2) float32, as OpenCV ``(x, y)`` points.

    They are built from ``(H // 2, W // 2)``, a (row, column) pair, but passed as (x, y); the
    reference does this and so do we (it is symmetric for square images).
    """
    c0, c1 = float(h // 2), float(w // 2)
    s = float(min(h, w) // 3)
    return torch.tensor([[c0 + s, c1 + s], [c0 + s, c1 - s], [c0 - s, c1 - s]], dtype=torch.float32)


def affine_source_positions(
    h: int, w: int, jitter: torch.Tensor, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source (rows, cols) (N,H,W) float64 of the warp that moves the control points by
    ``jitter`` (N,3,2) float32: ``dst(p) = src(M^-1 p)`` with ``M pts1 = pts1 + jitter``."""
    pts1 = control_points(h, w).to(jitter.device)
    pts2 = pts1 + jitter.float()  # float32, as the reference adds them
    n = jitter.shape[0]
    ones = torch.ones(n, 3, 1, dtype=torch.float64, device=jitter.device)
    # The inverse map takes pts2 back to pts1: [pts2, 1] @ Minv^T = pts1.
    a = torch.cat((pts2.double(), ones), 2)
    minv_t = torch.linalg.solve(a, pts1.double().expand(n, 3, 2))  # (N, 3, 2)
    minv = minv_t.transpose(1, 2).to(device)  # (N, 2, 3): rows (x', y')
    ys = torch.arange(h, dtype=torch.float64, device=device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64, device=device).view(1, 1, w)

    def coef(i: int, j: int) -> torch.Tensor:
        return minv[:, i, j].view(n, 1, 1)

    cols = coef(0, 0) * xs + coef(0, 1) * ys + coef(0, 2)
    rows = coef(1, 0) * xs + coef(1, 1) * ys + coef(1, 2)
    return rows, cols


def displacement(noise: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """``gaussian(noise, sigma) * alpha`` per map of ``noise`` (N,2,H,W), as float32."""
    h, w = noise.shape[-2:]
    noise = noise.double()
    kh = _gaussian_matrix_on(h, float(sigma), noise.device)
    kw = _gaussian_matrix_on(w, float(sigma), noise.device)
    return (kh @ noise @ kw.T * alpha).float()


def elastic_from_draws(
    x: torch.Tensor, params: tuple[float, float, float], jitter: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """elastic_transform of ``x`` (N,3,H,W) with given random numbers, as float32.

    ``jitter`` (N,3,2): the control-point offsets, ``U(-affine, affine)`` as float32; ``noise``
    (N,2,H,W): the ``U(-1, 1)`` fields of dx (index 0) and dy (index 1), float64. The image is
    processed in float32, as the reference's is (``np.float32(image) / 255``), so the result
    truncates to 8 bits like a float32 one.
    """
    alpha, sigma, _ = params
    x = x.float()
    n, _, h, w = x.shape
    rows, cols = affine_source_positions(h, w, jitter, x.device)
    warped = bilinear_sample(x, rows, cols, "mirror")
    d = displacement(noise.to(x.device), alpha, sigma)  # (N, 2, H, W): dx, dy
    ys = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w)
    return bilinear_sample(warped, ys + d[:, 1].double(), xs + d[:, 0].double(), "reflect")


def draw(h: int, w: int, affine: float, rng: ImageRng) -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of a batch, per image in the reference's order: the control-point
    jitter (N,3,2) float32, then the dx and dy noise fields (N,2,H,W) float64 in [-1, 1)."""
    jitter = ((rng.rand((3, 2)) * 2 - 1) * affine).float()
    noise = rng.rand((2, h, w)) * 2 - 1
    return jitter, noise


@register_corruption("elastic_transform", family="digital", capabilities={RANDOM},
                     description="random affine warp, then a smooth random displacement field"
                     )  # fmt: skip
def elastic_transform(
    x: torch.Tensor, params: tuple[float, float, float], rng: ImageRng
) -> torch.Tensor:
    _, _, h, w = x.shape
    jitter, noise = draw(h, w, params[2], rng)
    return elastic_from_draws(x, params, jitter, noise)
