"""Weather corruptions (fog, frost, snow, spatter) on real CIFAR-10 test images.

Besides the contract (shape, dtypes, range, seeding, severity ordering), every corruption is
compared with an independent per-image NumPy / SciPy / scikit-image / OpenCV implementation of
the reference script's algorithm, fed with the same random layers (drawn from the same per-image
streams through the module's ``*_draws`` helpers, so the comparison covers ``corrupt`` end to
end). Snow's motion blur is compared with the authors' own call of Wand over ImageMagick 6 Q16.
"""

from __future__ import annotations

import importlib.metadata
import math
import warnings

import cv2
import numpy as np
import pytest
import scipy.ndimage
import skimage.filters
import torch
import torch.nn.functional as F
from helpers import cifar_test_images
from magick import require_wand, wand_motion_blur

from normbench.corruptions import CORRUPTIONS, RANDOM, ImageRng, corrupt
from normbench.corruptions import weather as W
from normbench.corruptions.tables import CIFAR, IMAGENET
from normbench.errors import NormbenchError

NAMES = ("fog", "frost", "snow", "spatter")
SEVERITIES = (1, 2, 3, 4, 5)
N = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def images(cifar_dir) -> torch.Tensor:
    return cifar_test_images(str(cifar_dir), N)


def _rng(seed: int, name: str, severity: int, n: int = N) -> ImageRng:
    """The streams ``corrupt(images[:n], name, severity, seed)`` draws from."""
    return ImageRng.for_images(seed, name, severity, range(n))


def _hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


# --- contract -----------------------------------------------------------------------------------


def test_registered_as_random_weather_corruptions():
    for name in NAMES:
        info = CORRUPTIONS.get(name).info
        assert info.family == "weather" and info.has(RANDOM), name


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("name", NAMES)
def test_contract(images, name, severity):
    y = corrupt(images, name, severity, seed=1)
    assert y.shape == images.shape and y.dtype == torch.uint8
    assert torch.equal(y, corrupt(images, name, severity, seed=1))
    assert not torch.equal(y, corrupt(images, name, severity, seed=2))
    assert not torch.equal(y, images)
    yf = corrupt(images.float() / 255, name, severity, seed=1)
    assert yf.shape == images.shape and yf.dtype == torch.float32
    assert yf.min() >= 0 and yf.max() <= 1
    # float32 input computes the same thing (up to the last bit before truncation)
    assert (yf * 255 + 1e-4).floor().sub(y.float()).abs().max() <= 1
    assert (yf * 255 - y.float()).abs().mean() < 1


def _mean_change(images: torch.Tensor, name: str) -> list[float]:
    return [
        (corrupt(images, name, s, seed=0).float() - images.float()).abs().mean().item()
        for s in SEVERITIES
    ]


def test_severity_ordering(images):
    for name in ("fog", "snow"):
        change = _mean_change(images, name)
        assert all(a <= b for a, b in zip(change, change[1:], strict=False)), (name, change)
    # frost: severities 4 and 5 lower the image weight (0.85, 0.75) while the frost weight
    # barely grows (0.4, 0.45), so a x + b f moves less from x than at severity 3 (about 30, 45,
    # 49, 44, 43 on these images): the reference table itself is not monotone there.
    change = _mean_change(images, "frost")
    assert change[0] <= change[1] <= change[2] and min(change[3:]) > change[0], change
    # spatter: severities 1-3 are water, 4-5 mud; each mode grows with severity, but mud at 4
    # changes less than water at 3 (about 1, 3, 7, 3, 5), again a property of the table.
    change = _mean_change(images, "spatter")
    assert change[0] <= change[1] <= change[2] and change[3] <= change[4], change
    assert change[0] > 0


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_size(images, name):
    x = F.interpolate(images[:2].float(), size=(224, 224), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8)
    for severity in (1, 5):
        y = corrupt(x, name, severity, seed=3)
        assert y.shape == (2, 3, 224, 224) and y.dtype == torch.uint8
        assert torch.equal(y, corrupt(x, name, severity, seed=3))
        assert not torch.equal(y, corrupt(x, name, severity, seed=4))


# --- fog ----------------------------------------------------------------------------------------


def _numpy_plasma(mapsize: int, decay: float, draws) -> np.ndarray:
    """The reference diamond-square on one map, with U[0, 1) numbers taken from ``draws``."""
    m = np.empty((mapsize, mapsize), dtype=np.float64)
    m[0, 0] = 0
    step = mapsize
    wibble = 100.0

    def wibbled_mean(a):
        u = next(draws)
        assert u.shape == a.shape
        return a / 4 + wibble * (-wibble + (wibble - -wibble) * u)

    while step >= 2:
        half = step // 2
        corners = m[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, shift=-1, axis=0)
        sq = sq + np.roll(sq, shift=-1, axis=1)
        m[half:mapsize:step, half:mapsize:step] = wibbled_mean(sq)
        dr = m[half:mapsize:step, half:mapsize:step]
        ul = m[0:mapsize:step, 0:mapsize:step]
        lt = (dr + np.roll(dr, 1, axis=0)) + (ul + np.roll(ul, -1, axis=1))
        m[0:mapsize:step, half:mapsize:step] = wibbled_mean(lt)
        tt = (dr + np.roll(dr, 1, axis=1)) + (ul + np.roll(ul, -1, axis=0))
        m[half:mapsize:step, 0:mapsize:step] = wibbled_mean(tt)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


@pytest.mark.parametrize("mapsize,decay", [(32, 1.75), (32, 3), (256, 1.4)])
def test_plasma_matches_numpy_diamond_square(mapsize, decay):
    streams = ImageRng([5, 6, 7])
    recorded = []

    def uniform(shape):
        u = streams.rand(shape[1:])
        recorded.append(u)
        return u

    n = 3
    maps = W.plasma_fractal(n, mapsize, decay, uniform=uniform)
    assert maps.shape == (n, mapsize, mapsize) and len(recorded) == 3 * int(math.log2(mapsize))
    for i in range(n):
        ref = _numpy_plasma(mapsize, decay, iter([u[i].numpy() for u in recorded]))
        np.testing.assert_allclose(maps[i].numpy(), ref, rtol=0, atol=1e-12)
        assert maps[i].min() == 0 and maps[i].max() == 1
    # the default source is the per-image streams, in the same order
    again = W.plasma_fractal(n, mapsize, decay, ImageRng([5, 6, 7]))
    assert torch.equal(again, maps)
    assert W.fog_mapsize(32, 32) == 32 and W.fog_mapsize(224, 224) == 256


@pytest.mark.parametrize("severity", SEVERITIES)
def test_fog_matches_reference_formula(images, severity):
    t, decay = CIFAR["fog"][severity - 1]
    y = corrupt(images, "fog", severity, seed=6)
    plasma = W.plasma_fractal(N, 32, decay, _rng(6, "fog", severity)).numpy()
    for i, img in enumerate(_hwc(images)):
        x = np.array(img) / 255.0
        max_val = x.max()
        x = x + t * plasma[i][:32, :32][..., None]
        ref = np.uint8(np.clip(x * max_val / (max_val + t), 0, 1) * 255)
        np.testing.assert_array_equal(y[i].permute(1, 2, 0).numpy(), ref)


# --- frost --------------------------------------------------------------------------------------


def _cv2_frost(i: int, size: int) -> np.ndarray:
    bgr = cv2.imread(str(W.frost_path(W.FROST_FILES[i])))
    if size == 32:
        bgr = cv2.resize(bgr, (0, 0), fx=0.2, fy=0.2)
    return bgr


@pytest.mark.parametrize("size", [32, 224])
def test_frost_textures_match_opencv(size):
    textures = W.load_frost_textures(size)
    assert len(textures) == 5  # frost6 is never drawn
    for i, texture in enumerate(textures):
        ref = _cv2_frost(i, size)[..., [2, 1, 0]]  # BGR -> RGB; imread drops PNG alpha
        np.testing.assert_array_equal(texture.permute(1, 2, 0).numpy(), ref)


def test_resize_like_cv2_other_scales():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    for scale in (0.2, 0.25, 0.5, 2.0):
        ours = W.resize_like_cv2(torch.from_numpy(img).permute(2, 0, 1), scale)
        ref = cv2.resize(img, (0, 0), fx=scale, fy=scale)
        assert ours.shape[1:] == ref.shape[:2]
        # OpenCV's 8-bit bilinear uses 11-bit fixed-point weights: equal up to 1 level
        assert np.abs(ours.permute(1, 2, 0).numpy().astype(int) - ref).max() <= 1
    # where torch's floor(size * scale) is not OpenCV's round(size * scale), refuse
    with pytest.raises(NormbenchError, match="rounded size"):
        W.resize_like_cv2(torch.zeros(3, 37, 53, dtype=torch.uint8), 0.2)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_frost_matches_reference_formula(images, severity):
    a, b = CIFAR["frost"][severity - 1]
    y = corrupt(images, "frost", severity, seed=7)
    idx, rows, cols = W.frost_draws(32, _rng(7, "frost", severity))
    assert idx.min() >= 0 and idx.max() <= 4
    frosts = [_cv2_frost(i, 32) for i in range(5)]
    for i, img in enumerate(_hwc(images)):
        f = frosts[idx[i]]
        r, c = int(rows[i]), int(cols[i])
        assert 0 <= r < f.shape[0] - 32 and 0 <= c < f.shape[1] - 32
        crop = f[r : r + 32, c : c + 32][..., [2, 1, 0]]
        ref = np.uint8(np.clip(a * np.array(img) + b * crop, 0, 255))
        np.testing.assert_array_equal(y[i].permute(1, 2, 0).numpy(), ref)


def test_frost_crop_offsets_cover_the_range():
    idx, rows, cols = W.frost_draws(32, ImageRng(range(20000)))
    _, sizes = W.frost_textures(32)
    assert set(idx.tolist()) == {0, 1, 2, 3, 4}
    for k in range(5):
        sel = idx == k
        assert rows[sel].min() == 0 and rows[sel].max() == sizes[k, 0] - 33
        assert cols[sel].min() == 0 and cols[sel].max() == sizes[k, 1] - 33


@pytest.fixture
def fresh_frost_cache():
    W.frost_textures.cache_clear()
    yield
    W.frost_textures.cache_clear()


def test_missing_imagecorruptions_is_a_clear_error(monkeypatch, fresh_frost_cache):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(NormbenchError, match="pip install imagecorruptions"):
        corrupt(x, "frost", 1)
    with pytest.raises(NormbenchError, match="frost photographs"):
        W.load_frost_textures(224)


# --- snow ---------------------------------------------------------------------------------------


def _numpy_clipped_zoom(img: np.ndarray, zoom: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / zoom))
    top = (h - ch) // 2
    img = scipy.ndimage.zoom(img[top : top + ch, top : top + ch], (zoom, zoom), order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim : trim + h, trim : trim + h]


@pytest.mark.parametrize("severity", SEVERITIES)
def test_snow_matches_reference_formula(images, severity):
    require_wand()
    c = CIFAR["snow"][severity - 1]
    y = corrupt(images, "snow", severity, seed=9)
    normal, angles = W.snow_draws(32, 32, c, _rng(9, "snow", severity))
    assert angles.min() >= -135 and angles.max() <= -45
    equal = 0
    for i, img in enumerate(_hwc(images)):
        layer = _numpy_clipped_zoom(normal[i, 0].numpy(), c[2])
        layer[layer < c[3]] = 0
        layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
        layer = (wand_motion_blur(layer, c[4], c[5], float(angles[i])) / 255.0)[..., None]
        x = np.array(img, dtype=np.float32) / 255.0
        gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).reshape(32, 32, 1)
        x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
        ref = np.uint8(np.clip(x + layer + np.rot90(layer, k=2), 0, 1) * 255)
        ours = y[i].permute(1, 2, 0).numpy()
        assert np.abs(ours.astype(int) - ref).max() <= 1
        equal += (ours == ref).sum()
    # last-bit differences (summation order of the blur, the zoom and the gray weights) can move
    # a value across an integer before truncation
    assert equal / (N * 32 * 32 * 3) > 0.999


@pytest.mark.parametrize("size", [32, 224])
def test_snow_layer_blur_is_imagemagick_pixel_for_pixel(size):
    # The snow layer's motion blur against Wand, given the same 8-bit flakes and angles (the
    # ImageNet table blurs with radii up to 20 at sigma up to 20).
    require_wand()
    n = 16 if size == 32 else 2
    table = CIFAR if size == 32 else IMAGENET
    for severity in SEVERITIES:
        c = table["snow"][severity - 1]
        normal, angles = W.snow_draws(size, size, c, _rng(severity, "snow", severity, n))
        flakes = W.snow_flakes(normal, c)
        assert flakes.max() > 0  # some snow to blur
        ours = (W.snow_layer(normal, c, angles)[:, 0] * 255).round().numpy().astype(int)
        for i in range(n):
            image = flakes[i, 0].numpy().astype(np.uint8)
            ref = wand_motion_blur(image, c[4], c[5], float(angles[i])).astype(int)
            assert np.abs(ours[i] - ref).max() == 0, (severity, i)


# --- spatter ------------------------------------------------------------------------------------

_KER = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])


def _cv2_water_steps(l8: np.ndarray) -> dict[str, np.ndarray]:
    edges = cv2.Canny(l8, 50, 150)
    dist = cv2.distanceTransform(255 - edges, cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    blurred = cv2.blur(dist, (3, 3)).astype(np.uint8)
    equalized = cv2.equalizeHist(blurred)
    embossed = cv2.filter2D(equalized, cv2.CV_8U, _KER)
    final = cv2.blur(embossed, (3, 3))
    return dict(
        edges=edges > 0, dist=dist, blurred=blurred, equalized=equalized, final=final,
        embossed=embossed,
    )  # fmt: skip


def _liquid_l8(params, n: int, size: int, seed: int) -> torch.Tensor:
    normal = W.spatter_draws(size, size, params, ImageRng(range(seed, seed + n)))
    liquid = W.spatter_liquid(normal, params)
    return torch.floor(liquid[:, 0] * 255).long() & 255


WATER_CASES = [(CIFAR["spatter"][s], 32, 64) for s in range(3)] + [(IMAGENET["spatter"][0], 224, 2)]


@pytest.mark.parametrize("params,size,n", WATER_CASES)
def test_water_steps_match_opencv(params, size, n):
    l8 = _liquid_l8(params, n, size, 10)
    edges = W.canny(l8)
    dist = W.chamfer_distance(edges)
    final = W.water_dist(l8)
    ulp = 0
    for i in range(n):
        ref = _cv2_water_steps(l8[i].numpy().astype(np.uint8))
        np.testing.assert_array_equal(edges[i].numpy(), ref["edges"])
        # distances: float32 path sums; relaxation may find a sum one ulp below OpenCV's scan
        diff = np.abs(dist[i].numpy() - ref["dist"])
        assert diff.max() <= 2e-6
        ulp += (diff > 0).sum()
        # each later step, fed with OpenCV's own input, is exact
        fed = torch.from_numpy(ref["blurred"].astype(np.int64))[None]
        np.testing.assert_array_equal(W.equalize_hist(fed)[0].numpy(), ref["equalized"])
        fed = torch.from_numpy(ref["equalized"].astype(np.int64))[None]
        np.testing.assert_array_equal(W.emboss(fed)[0].numpy(), ref["embossed"])
        blurred = (W.box_sum3(torch.from_numpy(ref["dist"])[None].double()) * (1 / 9)).float()
        np.testing.assert_array_equal(blurred.floor()[0].numpy(), ref["blurred"])
        # and so is the whole chain on these images
        np.testing.assert_array_equal(final[i].numpy(), ref["final"])
    assert ulp / (n * size * size) < 0.01


def test_equalize_hist_edge_cases():
    flat = torch.full((1, 8, 8), 37)
    assert torch.equal(W.equalize_hist(flat), flat)
    rng = np.random.default_rng(1)
    for levels in (2, 3, 17, 256):
        img = rng.integers(0, levels, size=(20, 30)).astype(np.uint8) * (255 // max(levels - 1, 1))
        ours = W.equalize_hist(torch.from_numpy(img.astype(np.int64))[None])[0].numpy()
        np.testing.assert_array_equal(ours, cv2.equalizeHist(img))


def _numpy_spatter(img: np.ndarray, normal: np.ndarray, c) -> np.ndarray:
    """The reference script's spatter on one image, from its normal field."""
    liquid = skimage.filters.gaussian(normal, sigma=c[2])
    liquid[liquid < c[3]] = 0
    x = np.array(img, dtype=np.float32) / 255.0
    if c[5] == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # values >= 256 wrap in the cast
            l8 = (liquid * 255).astype(np.uint8)
        dist = _cv2_water_steps(l8)["final"].astype(np.float32)
        m = l8 * dist
        m /= np.max(m)
        m *= c[4]
        color = np.concatenate(
            [v / 255.0 * np.ones_like(m[..., None]) for v in (175, 238, 238)], axis=2
        )
        return np.uint8(np.clip(x + m[..., None] * color, 0, 1) * 255)
    m = np.where(liquid > c[3], 1, 0)
    m = skimage.filters.gaussian(m.astype(np.float32), sigma=c[4])
    m[m < 0.8] = 0
    color = np.concatenate([v / 255.0 * np.ones_like(x[..., :1]) for v in (63, 42, 20)], axis=2)
    color *= m[..., None]
    x *= 1 - m[..., None]
    return np.uint8(np.clip(x + color, 0, 1) * 255)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_spatter_matches_reference(images, severity):
    c = CIFAR["spatter"][severity - 1]
    y = corrupt(images, "spatter", severity, seed=11)
    normal = W.spatter_draws(32, 32, c, _rng(11, "spatter", severity))
    equal = 0
    for i, img in enumerate(_hwc(images)):
        ref = _numpy_spatter(img, normal[i, 0].numpy(), c)
        ours = y[i].permute(1, 2, 0).numpy()
        assert np.abs(ours.astype(int) - ref).max() <= 1
        equal += (ours == ref).sum()
    assert equal / (N * 32 * 32 * 3) > 0.999


def test_spatter_without_liquid_leaves_the_image():
    # no value reaches the threshold: the reference divides 0 by 0; here nothing is added
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    liquid = torch.zeros(2, 1, 32, 32, dtype=torch.float64)
    y = W.spatter_apply(x, CIFAR["spatter"][0], liquid)
    assert not torch.isnan(y).any()
    assert (y - x).abs().max() < 1e-6
