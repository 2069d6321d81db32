"""Weather corruptions: fog, frost, snow and spatter, as in the Hendrycks CIFAR/ImageNet scripts.

All four run on whole batches: every per-image random quantity is drawn from the image's own CPU
generator (:class:`~normbench.corruptions.rng.ImageRng`), stacked, and moved to the images'
device. Each corruption is split into a draw step and a
deterministic step (``*_draws`` / ``*_apply`` and the helpers below) so that the deterministic part
can be checked against per-image references given the same random layers.

Numerics follow the reference scripts' dtypes: fog and frost compute in float64, the snow blend
and the spatter overlay in float32 (the scripts' ``np.float32(x) / 255.``), the snow and liquid
layers in float64.

- fog: x + t * plasma fractal (diamond-square, one map per image), rescaled by max / (max + t).
- frost: a * x + b * a random crop of one of the first five official frost photographs (shipped
  with the ``imagecorruptions`` distribution); shrunk by 0.2 with OpenCV's bilinear rule for the
  32-px table, used at full size for the 224-px one.
- snow: a zoomed, thresholded normal field, quantised to 8 bits, ImageMagick 6 Q16's motion blur
  at an angle in [-135, -45] degrees (16-bit quanta, truncated to 8 bits), added twice (as is
  and rotated by 180 degrees) to the image brightened towards 1.5 gray + 0.5.
- spatter: a smoothed, thresholded normal field; mode 1 (mud) paints brown where a blurred mask
  reaches 0.8; mode 0 (water) builds a pale turquoise overlay from OpenCV's pipeline Canny ->
  distance transform (5x5 chamfer, DIST_L2) -> truncate at 20 -> 3x3 box blur -> histogram
  equalisation -> emboss filter -> 3x3 box blur, re-implemented here for batches with OpenCV's
  integer and float32 arithmetic. The reference divides by the overlay's maximum and yields NaN
  for an image without any liquid; here that image gets no overlay.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from normbench.corruptions import RANDOM, UINT8, register_corruption
from normbench.corruptions.ops import (
    clipped_zoom,
    device_constant,
    gaussian_filter,
    magick_motion_blur,
    pad2d,
    rgb_to_gray,
)
from normbench.corruptions.rng import ImageRng
from normbench.corruptions.tables import FROST_SCALE
from normbench.errors import NormbenchError

Uniform = Callable[[tuple[int, ...]], torch.Tensor]


def _unit_from_255(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` in [0, 255] units as [0, 1] values whose ``floor(y * 255)`` is ``floor(v)`` (or as
    ``floor(v)`` itself for uint8).

    Dividing by 255 and multiplying back can land one ulp below an integer; float64 results are
    truncated without slack, so such values are nudged up by that ulp.
    """
    if dtype == torch.uint8:
        return v.floor().to(torch.uint8)
    y = v / 255
    if y.dtype == torch.float64:
        low = torch.floor(y * 255) < torch.floor(v)
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, 2.0)), y)
    return y.to(dtype)


def _float32_result(y32: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 result in [0, 1] whose uint8 truncation is that of ``float32(y32 * 255)``."""
    if dtype == torch.float32:
        return y32
    if dtype == torch.uint8:
        return (y32.clamp(0, 1) * 255).floor_().to(torch.uint8)
    return (y32.clamp(0, 1) * 255).to(dtype) / 255


# --- fog ----------------------------------------------------------------------------------------


def plasma_fractal(
    n: int,
    mapsize: int,
    decay: float,
    rng: ImageRng | None = None,
    *,
    device: torch.device | str | None = None,
    uniform: Uniform | None = None,
) -> torch.Tensor:
    """``n`` diamond-square height maps (n, mapsize, mapsize), float64, each normalised to [0, 1].

    The wibble starts at 100 and is divided by ``decay`` after each level; each new point is the
    mean of its four neighbours (wrapping around the torus) plus ``wibble * U(-wibble, wibble)``.
    Per level three arrays of uniforms are drawn, for the squares' centres, then the diamonds on
    the corner rows, then those on the corner columns; ``uniform(shape)`` supplies U[0, 1) values
    (float64, shape (n, k, k)); by default they come from the per-image streams of ``rng``. All
    of them are drawn before the first level, in that order, and sent to the device in one copy.
    """
    if mapsize & (mapsize - 1):
        raise ValueError(f"map size must be a power of two, got {mapsize}")
    if uniform is None:
        if rng is None or len(rng) != n:
            raise ValueError("plasma_fractal needs one random stream per map or a uniform source")

        def uniform(shape: tuple[int, ...]) -> torch.Tensor:
            return rng.rand(shape[1:])

    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64, device=device)
    # Level by level (k x k new points of each kind at level k = 1, 2, 4, ..., mapsize / 2),
    # three arrays each, drawn in the order the levels use them.
    sides = [1 << level for level in range(mapsize.bit_length() - 1)]
    draws = [uniform((n, k, k)).reshape(n, k * k) for k in sides for _ in range(3)]
    uniforms = iter(
        torch.cat(draws, 1)
        .to(device=m.device, dtype=torch.float64)
        .split([k * k for k in sides for _ in range(3)], 1)
    )
    wibble = 100.0
    step = mapsize

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        u = next(uniforms).view(total.shape)
        return total / 4 + wibble * (-wibble + 2 * wibble * u)  # numpy uniform(low, high)

    while step >= 2:
        half = step // 2
        corners = m[:, ::step, ::step]
        total = corners + corners.roll(-1, 1)
        total = total + total.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(total)
        centres = m[:, half::step, half::step]
        corners = m[:, ::step, ::step]
        total = (centres + centres.roll(1, 1)) + (corners + corners.roll(-1, 2))
        m[:, ::step, half::step] = wibbled_mean(total)
        total = (centres + centres.roll(1, 2)) + (corners + corners.roll(-1, 1))
        m[:, half::step, ::step] = wibbled_mean(total)
        step //= 2
        wibble /= decay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


def fog_mapsize(h: int, w: int) -> int:
    """The next power of two >= the image size (32 for CIFAR, 256 for 224-px ImageNet)."""
    return 1 << (max(h, w) - 1).bit_length()


def fog_apply(x: torch.Tensor, params: tuple[float, float], plasma: torch.Tensor) -> torch.Tensor:
    """x + t * plasma[:H, :W] on every channel, times max(x) / (max(x) + t) per image."""
    t = params[0]
    h, w = x.shape[-2:]
    x64 = x.double()
    max_val = x64.amax(dim=(1, 2, 3), keepdim=True)
    y = x64 + t * plasma[:, None, :h, :w].to(x64)
    return (y * max_val / (max_val + t)).to(x.dtype)


@register_corruption("fog", family="weather", capabilities={RANDOM},
                     description="x + t * plasma fractal, rescaled by max / (max + t)")  # fmt: skip
def fog(x: torch.Tensor, params: tuple[float, float], rng: ImageRng) -> torch.Tensor:
    n, _, h, w = x.shape
    plasma = plasma_fractal(n, fog_mapsize(h, w), params[1], rng, device=x.device)
    return fog_apply(x, params, plasma)


# --- frost --------------------------------------------------------------------------------------

#: The reference draws ``randint(5)``: frost6.jpg is never used.
FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


def frost_path(name: str) -> Path:
    """Path of a frost photograph inside the installed ``imagecorruptions`` distribution."""
    hint = (
        "The frost corruption needs the frost photographs of the imagecorruptions package; "
        "`pip install imagecorruptions` provides them."
    )
    try:
        dist = importlib.metadata.distribution("imagecorruptions")
    except importlib.metadata.PackageNotFoundError:
        raise NormbenchError(f"imagecorruptions is not installed. {hint}") from None
    path = Path(str(dist.locate_file(f"imagecorruptions/frost/{name}")))
    if not path.is_file():
        raise NormbenchError(f"Frost photograph {name} not found at {path}. {hint}")
    return path


def resize_like_cv2(image: torch.Tensor, scale: float) -> torch.Tensor:
    """``cv2.resize(image, (0, 0), fx=scale, fy=scale)`` (INTER_LINEAR) of a (3, h, w) uint8."""
    h, w = image.shape[-2:]
    out = F.interpolate(
        image[None].float(),
        scale_factor=scale,
        mode="bilinear",
        align_corners=False,
        antialias=False,
        recompute_scale_factor=False,
    )[0]
    if out.shape[-2:] != (round(h * scale), round(w * scale)):
        raise NormbenchError(
            f"Resizing a {w}x{h} frost photograph by {scale} gave {tuple(out.shape[-2:])}, "
            "not OpenCV's rounded size."
        )
    return out.round().clamp(0, 255).to(torch.uint8)


def load_frost_textures(size: int) -> list[torch.Tensor]:
    """The five frost textures for ``size``-px images as (3, fh, fw) uint8 RGB tensors."""
    scale = FROST_SCALE[size]
    textures = []
    for name in FROST_FILES:
        with Image.open(frost_path(name)) as im:
            rgb = np.asarray(im.convert("RGB"))  # drops a PNG's alpha channel, as cv2.imread does
        texture = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
        if scale != 1:
            texture = resize_like_cv2(texture, scale)
        if texture.shape[-2] <= size or texture.shape[-1] <= size:
            raise NormbenchError(f"Frost texture {name} is too small for {size}-px images.")
        textures.append(texture)
    return textures


@functools.cache
def frost_textures(size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The textures zero-padded into one (5, 3, Hmax, Wmax) uint8 tensor, and their (5, 2) sizes."""
    textures = load_frost_textures(size)
    hmax = max(t.shape[-2] for t in textures)
    wmax = max(t.shape[-1] for t in textures)
    stack = torch.zeros(len(textures), 3, hmax, wmax, dtype=torch.uint8)
    for i, t in enumerate(textures):
        stack[i, :, : t.shape[-2], : t.shape[-1]] = t
    sizes = torch.tensor([t.shape[-2:] for t in textures])
    return stack.to(device), sizes


def frost_draws(size: int, rng: ImageRng) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: texture index in {0..4}, then crop offsets (row in [0, fh - size), column in
    [0, fw - size), exclusive upper bounds like numpy's ``randint``). All on the CPU."""
    _, sizes = frost_textures(size)
    idx = rng.randint(0, len(FROST_FILES), ())
    u = rng.rand((2,))
    span = (sizes[idx] - size).double()
    starts = torch.floor(u * span).long()
    return idx, starts[:, 0], starts[:, 1]


def frost_crops(
    size: int, idx: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The (N, 3, size, size) uint8 crops of the chosen textures."""
    stack, _ = frost_textures(size, str(device))
    _, channels, hmax, wmax = stack.shape
    ar = torch.arange(size, device=device)
    idx, rows, cols = torch.stack((idx, rows, cols)).to(device)  # the draws in one copy
    plane = idx[:, None] * channels + torch.arange(channels, device=device)  # (N, 3)
    r = rows[:, None] + ar  # (N, size)
    c = cols[:, None] + ar
    flat = (plane[:, :, None, None] * hmax + r[:, None, :, None]) * wmax + c[:, None, None, :]
    return stack.reshape(-1)[flat]


def frost_apply(x: torch.Tensor, params: tuple[float, float], crops: torch.Tensor) -> torch.Tensor:
    """clip(a * x255 + b * frost255, 0, 255), returned in [0, 1]."""
    a, b = params
    x255 = x.double() if x.dtype == torch.uint8 else x.double() * 255
    v = (a * x255 + b * crops.double()).clamp(0, 255)
    return _unit_from_255(v, x.dtype)


@register_corruption("frost", family="weather", capabilities={RANDOM, UINT8},
                     description="a x + b * random crop of a frost photograph")  # fmt: skip
def frost(x: torch.Tensor, params: tuple[float, float], rng: ImageRng) -> torch.Tensor:
    h = x.shape[-2]
    idx, rows, cols = frost_draws(h, rng)
    return frost_apply(x, params, frost_crops(h, idx, rows, cols, x.device))


# --- snow ---------------------------------------------------------------------------------------


def snow_draws(h: int, w: int, params: tuple, rng: ImageRng) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the normal field N(loc, scale) (N, 1, h, w), then the angle U(-135, -45)."""
    loc, scale = params[0], params[1]
    normal = loc + scale * rng.randn((1, h, w))
    angles = -135 + 90 * rng.rand(())
    return normal, angles


def snow_flakes(normal: torch.Tensor, params: tuple) -> torch.Tensor:
    """The zoomed, thresholded normal field as the 8-bit levels (float64) of the gray PNG that
    the scripts hand to ImageMagick, (N, 1, H, W)."""
    zoom, threshold = params[2], params[3]
    layer = clipped_zoom(normal, zoom)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    return torch.floor(layer.clamp(0, 1) * 255)  # to PIL 'L' by truncation


def snow_layer(normal: torch.Tensor, params: tuple, angles: torch.Tensor) -> torch.Tensor:
    """The motion-blurred snow layer (N, 1, H, W) in [0, 1], on 8-bit levels."""
    radius, sigma = params[4], params[5]
    flakes = snow_flakes(normal, params)
    return magick_motion_blur(flakes, radius, sigma, angles) / 255  # 8-bit PNG out of ImageMagick


def snow_apply(x: torch.Tensor, params: tuple, layer: torch.Tensor) -> torch.Tensor:
    """blend x + (1 - blend) max(x, 1.5 gray + 0.5) (float32), plus the layer and its 180-degree
    rotation (float64), clipped."""
    blend = params[6]
    x32 = x.float()
    gray = rgb_to_gray(x32)
    x32 = blend * x32 + (1 - blend) * torch.maximum(x32, gray * 1.5 + 0.5)
    layer = layer.double()
    y = x32.double() + layer + layer.flip(-2, -1)
    return y.clamp(0, 1).to(x.dtype)


@register_corruption("snow", family="weather", capabilities={RANDOM},
                     description="motion-blurred snow layer over a brightened image")  # fmt: skip
def snow(x: torch.Tensor, params: tuple, rng: ImageRng) -> torch.Tensor:
    _, _, h, w = x.shape
    normal, angles = snow_draws(h, w, params, rng)
    return snow_apply(x, params, snow_layer(normal.to(x.device), params, angles))


# --- spatter: OpenCV building blocks, batched -----------------------------------------------------

_CANNY_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _CANNY_SHIFT) + 0.5)
# 3x3 kernels as their nine taps in row-major order (Python numbers, used as scalars)
_SOBEL_X = (-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, -1.0, 0.0, 1.0)
_SOBEL_Y = (-1.0, -2.0, -1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 1.0)  # its transpose
_OFFSETS3 = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


def _correlate3(x: torch.Tensor, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    """3x3 correlation of (N, H, W) float values with ``kernel`` (nine taps, row-major), border
    ``mode``; exact for the small-integer data and kernels used here."""
    p = pad2d(x, 1, 1, mode)
    out = torch.zeros_like(x)
    # Nine shifted multiply-adds: exact here in any order, and several times faster than a
    # single-channel conv2d in float64.
    for (dr, dc), k in zip(_OFFSETS3, kernel, strict=True):
        if k:
            out += _shifted(p, 1, dr, dc) * k if k != 1 else _shifted(p, 1, dr, dc)
    return out


def _shifted(p: torch.Tensor, pad: int, dr: int, dc: int) -> torch.Tensor:
    """The view of a tensor padded by ``pad`` on H and W that is shifted by (dr, dc)."""
    h, w = p.shape[-2] - 2 * pad, p.shape[-1] - 2 * pad
    return p[..., pad + dr : pad + dr + h, pad + dc : pad + dc + w]


def canny(images: torch.Tensor, low: float = 50, high: float = 150) -> torch.Tensor:
    """``cv2.Canny(image, low, high)`` (aperture 3, L1 gradient) of (N, H, W) 8-bit images.

    Sobel derivatives with replicated borders; non-maximum suppression in four sectors with
    OpenCV's fixed-point tangent test and its tie rules (magnitude 0 outside the image); then
    hysteresis: candidates above ``low`` joined (8-connected) to a candidate above ``high``,
    grown by repeated 3x3 dilation until nothing changes. Returns a bool edge map.
    """
    x = images.float()
    dx = _correlate3(x, _SOBEL_X, "nearest").long()
    dy = _correlate3(x, _SOBEL_Y, "nearest").long()
    mag = dx.abs() + dy.abs()
    p = F.pad(mag, (1, 1, 1, 1))

    def nb(dr: int, dc: int) -> torch.Tensor:
        return _shifted(p, 1, dr, dc)

    ax = dx.abs()
    ay = dy.abs() << _CANNY_SHIFT
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << (_CANNY_SHIFT + 1))
    keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep_d = torch.where(
        (dx ^ dy) >= 0,  # same signs: the gradient points along the main diagonal
        (mag > nb(-1, -1)) & (mag > nb(1, 1)),
        (mag > nb(-1, 1)) & (mag > nb(1, -1)),
    )
    keep = torch.where(ay < tg22x, keep_h, torch.where(ay > tg67x, keep_v, keep_d))
    candidate = keep & (mag > math.floor(low))
    grown = candidate & (mag > math.floor(high))
    # A dilation that changes nothing is a fixed point: every later one changes nothing either.
    # So only every _DILATIONS_PER_CHECK-th is compared with its input (a comparison waits for
    # the device), and the edges that result are the same.
    while True:
        for _ in range(_DILATIONS_PER_CHECK - 1):
            grown = dilate3(grown) & candidate
        nxt = dilate3(grown) & candidate
        if torch.equal(nxt, grown):
            return grown
        grown = nxt


#: Hysteresis dilations between two checks for convergence (see :func:`canny`).
_DILATIONS_PER_CHECK = 8


def dilate3(mask: torch.Tensor) -> torch.Tensor:
    """3x3 dilation of an (N, H, W) bool mask (outside counts as False), as two 1-D passes."""
    p = F.pad(mask, (1, 1, 1, 1))
    rows = p[:, :-2] | p[:, 1:-1] | p[:, 2:]
    return rows[..., :-2] | rows[..., 1:-1] | rows[..., 2:]


#: OpenCV's 5x5 chamfer metric for DIST_L2: steps to the 4 edge neighbours (1), the 4 diagonal
#: ones (1.4) and the 8 knight's-move ones (2.1969).
CHAMFER_5X5 = (1.0, 1.4, 2.1969)


#: Relaxation steps of :func:`chamfer_distance` between two checks for convergence.
_RELAXATIONS_PER_CHECK = 4


def chamfer_distance(zero: torch.Tensor, cap: float = 20.0) -> torch.Tensor:
    """``min(cv2.distanceTransform(src, DIST_L2, 5), cap)`` as float32 (N, H, W).

    ``zero`` (N, H, W) bool marks the pixels that are 0 in ``src``. The 5x5 chamfer distance is
    the cheapest path to a zero pixel over the steps of :data:`CHAMFER_5X5`, summed in float32
    as OpenCV's float implementation does; pixels outside the image are not zeros. It is found
    by relaxation instead of OpenCV's two raster passes, on values clipped at ``cap`` (a path
    through a clipped value never beats the cap, so values below it are exact), until nothing
    changes (checked every :data:`_RELAXATIONS_PER_CHECK` steps: a step that changes nothing is
    a fixed point, so the steps after it change nothing either). Where paths of equal length sum
    to float32 values one ulp apart this can pick the lower one; see the tests for how often.
    """
    a, b, c = (torch.tensor(v, dtype=torch.float32) for v in CHAMFER_5X5)
    d = torch.where(zero, 0.0, cap).to(torch.float32)
    h = d.shape[-2]

    def rows(t: torch.Tensor, dr: int) -> torch.Tensor:
        return t[..., 2 + dr : 2 + dr + h, :]

    steps = 0
    while True:
        p = F.pad(d, (2, 2, 2, 2), value=cap)
        # float addition is monotonic, so min(u + s, v + s) == min(u, v) + s: group by cost
        centre = p[..., 2:-2]
        h1 = torch.minimum(p[..., 1:-3], p[..., 3:-1])  # columns -1 and +1
        h2 = torch.minimum(p[..., :-4], p[..., 4:])  # columns -2 and +2
        axial = torch.minimum(rows(h1, 0), torch.minimum(rows(centre, -1), rows(centre, 1)))
        diagonal = torch.minimum(rows(h1, -1), rows(h1, 1))
        knight = torch.minimum(
            torch.minimum(rows(h2, -1), rows(h2, 1)), torch.minimum(rows(h1, -2), rows(h1, 2))
        )
        best = torch.minimum(torch.minimum(d, axial + a), torch.minimum(diagonal + b, knight + c))
        best = best.clamp_max(cap)
        steps += 1
        if steps % _RELAXATIONS_PER_CHECK == 0 and torch.equal(best, d):
            return d
        d = best


_EMBOSS = (-2.0, -1.0, 0.0, -1.0, 1.0, 1.0, 0.0, 1.0, 2.0)
_BOX = (1.0,) * 9


def box_sum3(x: torch.Tensor) -> torch.Tensor:
    """3x3 sums of (N, H, W) with OpenCV's default border (reflect 101), in x's dtype."""
    return _correlate3(x, _BOX, "mirror")


def equalize_hist(images: torch.Tensor) -> torch.Tensor:
    """``cv2.equalizeHist`` of each (H, W) 8-bit image of an (N, H, W) integer batch.

    The lookup table maps the lowest level present to 0 and level i to
    ``round(float32(count of pixels in levels (lowest, i]) * float32(255 / (total - count of
    the lowest level))))``; an image of a single level keeps that level.
    """
    n, h, w = images.shape
    flat = images.reshape(n, -1).long()
    hist = torch.zeros(n, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    lowest = (hist > 0).long().argmax(1, keepdim=True)
    low_count = hist.gather(1, lowest)
    total = h * w
    cum = hist.cumsum(1)
    cum = cum - cum.gather(1, lowest)
    scale = torch.tensor(255.0) / (total - low_count).clamp_min(1).float()
    lut = torch.round(cum.clamp_min(0).float() * scale).clamp(0, 255).long()
    lut = torch.where(low_count == total, lowest.expand(-1, 256), lut)
    return lut.gather(1, flat).reshape(n, h, w)


def emboss(images: torch.Tensor) -> torch.Tensor:
    """``cv2.filter2D(img, CV_8U, [[-2,-1,0],[-1,1,1],[0,1,2]])``: correlation with reflect-101
    borders, saturated to [0, 255]."""
    return _correlate3(images.float(), _EMBOSS, "mirror").clamp(0, 255).long()


def water_dist(l8: torch.Tensor) -> torch.Tensor:
    """The water mask's shading (N, H, W) in 0..255 (int64), from the 8-bit liquid layer."""
    edges = canny(l8, 50, 150)
    dist = chamfer_distance(edges, 20.0)
    # cv2.blur of float32: float64 sums (exact here) times 1/9, stored as float32; uint8 truncates
    dist = (box_sum3(dist.double()) * (1 / 9)).float().floor().long()
    dist = emboss(equalize_hist(dist))
    # cv2.blur of uint8 rounds to nearest (9 never divides a sum + 1/2)
    return torch.div(box_sum3(dist.float()).long() + 4, 9, rounding_mode="floor")


def spatter_draws(h: int, w: int, params: tuple, rng: ImageRng) -> torch.Tensor:
    """The normal fields N(loc, scale), (N, 1, h, w) float64 on the CPU."""
    return params[0] + params[1] * rng.randn((1, h, w))


def spatter_liquid(normal: torch.Tensor, params: tuple) -> torch.Tensor:
    """gaussian(N(loc, scale), sigma) (mode nearest, truncate 4) with values < threshold zeroed."""
    sigma, threshold = params[2], params[3]
    liquid = gaussian_filter(normal, sigma)
    return torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)


def spatter_apply(x: torch.Tensor, params: tuple, liquid: torch.Tensor) -> torch.Tensor:
    """The overlay of the (N, 1, H, W) float64 liquid layer on x (float32 arithmetic)."""
    threshold, intensity, mode = params[3], params[4], params[5]
    x32 = (x.double() / 255).float() if x.dtype == torch.uint8 else x.float()
    if mode == 0:
        # float -> uint8 truncates; values of 256 and more wrap around, as the C cast does on x86
        l8 = torch.floor(liquid[:, 0] * 255).long() & 255
        m = l8.float() * water_dist(l8).float()
        peak = m.amax(dim=(1, 2), keepdim=True)
        m = torch.where(peak > 0, m / torch.where(peak > 0, peak, 1.0), 0.0) * intensity
        color = device_constant((175 / 255, 238 / 255, 238 / 255), torch.float32, x.device)
        y32 = x32 + m[:, None] * color.view(1, 3, 1, 1)
    else:
        mask = (liquid > threshold).double()
        m = gaussian_filter(mask, intensity).float()  # scikit-image keeps the float32 mask's type
        m = torch.where(m < 0.8, 0.0, m)
        color = device_constant((63 / 255, 42 / 255, 20 / 255), torch.float32, x.device)
        y32 = x32 * (1 - m) + color.view(1, 3, 1, 1) * m
    return _float32_result(y32.clamp(0, 1), x.dtype)


@register_corruption("spatter", family="weather", capabilities={RANDOM, UINT8},
                     description="water (mode 0) or mud (mode 1) from a liquid layer")  # fmt: skip
def spatter(x: torch.Tensor, params: tuple, rng: ImageRng) -> torch.Tensor:
    _, _, h, w = x.shape
    normal = spatter_draws(h, w, params, rng)
    return spatter_apply(x, params, spatter_liquid(normal.to(x.device), params))
