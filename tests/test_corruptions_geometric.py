"""elastic_transform on real CIFAR-10 test images, against an independent per-image reference.

The reference follows the Hendrycks scripts step by step with NumPy, OpenCV and SciPy
(``getAffineTransform`` + ``warpAffine`` with BORDER_REFLECT_101, ``gaussian_filter`` with
``mode='reflect', truncate=3``, ``map_coordinates(order=1, mode='reflect')``) and is fed the very
random numbers the batched implementation draws.

Measured against it (CIFAR, 32 images x 5 severities; ImageNet size, 2 images x 5 severities): the
uint8 results differ by at most 1 level, in about 1e-4 to 3.5e-4 of the values (float rounding
near the truncation boundaries). OpenCV's float32 bilinear warp computes its source positions in
floating point (a 0.01 px shift gives 0.01 of the neighbour, not a multiple of 1/32), so there is
no 1/32-pixel quantisation to account for; the warped float images agree to about 2e-6.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from helpers import cifar_test_images

from normbench.corruptions import CORRUPTIONS, ImageRng, corrupt, from_unit, to_unit
from normbench.corruptions.geometric import (
    bilinear_sample,
    draw,
    elastic_from_draws,
    fold_index,
)
from normbench.corruptions.ops import border_index
from normbench.corruptions.tables import CIFAR, IMAGENET

NAME = "elastic_transform"
SEVERITIES = (1, 2, 3, 4, 5)
MAX_LEVELS = 1  # largest uint8 difference from the reference
MAX_FRACTION = 1e-3  # largest fraction of uint8 values that differ from the reference at all


@pytest.fixture
def images(cifar_dir) -> torch.Tensor:
    return cifar_test_images(str(cifar_dir), 32)


def reference(
    image: np.ndarray, params: tuple[float, float, float], jitter: np.ndarray, noise: np.ndarray
) -> np.ndarray:
    """The Hendrycks elastic_transform of one uint8 (3,H,W) image with given random numbers:
    ``jitter`` (3,2) float32 offsets of the control points, ``noise`` (2,H,W) U(-1,1) fields."""
    alpha, sigma, _ = params
    img = image.transpose(1, 2, 0).astype(np.float32) / 255
    shape = img.shape
    size = shape[:2]
    center = np.float32(size) // 2
    square = min(size) // 3
    pts1 = np.float32([center + square, [center[0] + square, center[1] - square], center - square])
    pts2 = pts1 + jitter.astype(np.float32)
    m = cv2.getAffineTransform(pts1, pts2)
    img = cv2.warpAffine(img, m, size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    fields = []
    for u in noise:
        smooth = ndi.gaussian_filter(u, sigma, mode="reflect", truncate=3) if sigma > 0 else u
        fields.append((smooth * alpha).astype(np.float32)[..., None])
    dx, dy = fields
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = (y + dy).reshape(-1, 1), (x + dx).reshape(-1, 1), z.reshape(-1, 1)
    out = ndi.map_coordinates(img, indices, order=1, mode="reflect").reshape(shape)
    return np.uint8(np.clip(out, 0, 1) * 255).transpose(2, 0, 1)


def _compare(images, params, jitter, noise) -> tuple[int, float]:
    """(max abs difference, fraction of differing values) of ours vs the reference, uint8."""
    ours = from_unit(elastic_from_draws(to_unit(images), params, jitter, noise), torch.uint8)
    ref = np.stack(
        [
            reference(images[i].numpy(), params, jitter[i].numpy(), noise[i].numpy())
            for i in range(len(images))
        ]
    )
    diff = np.abs(ours.numpy().astype(np.int16) - ref.astype(np.int16))
    return int(diff.max()), float((diff > 0).mean())


def _streams(seed: int, n: int) -> ImageRng:
    """``n`` per-image random streams (for tests that need draws, not those of ``corrupt``)."""
    return ImageRng(range(1000 * seed, 1000 * seed + n))


def test_registered():
    info = CORRUPTIONS.info(NAME)
    assert info.has("random")


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shape_dtype_and_determinism(images, severity):
    a = corrupt(images, NAME, severity, 1)
    b = corrupt(images, NAME, severity, 1)
    c = corrupt(images, NAME, severity, 2)
    assert a.shape == images.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, c)
    f = corrupt(images.float() / 255, NAME, severity, 1)
    assert f.shape == images.shape and f.dtype == torch.float32
    assert f.min() >= 0 and f.max() <= 1
    assert torch.equal(from_unit(f, torch.uint8), a)  # float and uint8 paths agree


def test_severity_order(images):
    """The CIFAR protocol shrinks the affine jitter with severity (2.56 -> 0.96 px) while it grows
    the displacement field (alpha 0 -> 3.2 px, sigma 6.4 -> 0.96 px); the affine part dominates
    the pixel change, so the corruption as a whole changes images LESS at higher severity (not
    monotone non-decreasing, by the protocol's numbers). The displacement part alone grows."""
    x = images.float() / 255
    full, displacement_only = [], []
    for severity in SEVERITIES:
        params = CIFAR[NAME][severity - 1]
        jitter, noise = draw(32, 32, params[2], _streams(0, len(x)))
        full.append((elastic_from_draws(x, params, jitter, noise) - x).abs().mean().item())
        still = elastic_from_draws(x, params, torch.zeros_like(jitter), noise)
        displacement_only.append((still - x).abs().mean().item())
    assert full == sorted(full, reverse=True), full
    assert displacement_only == sorted(displacement_only), displacement_only
    assert displacement_only[0] == 0  # severity 1: alpha = sigma = 0, no displacement


def test_corrupt_uses_the_documented_draws(images):
    params = CIFAR[NAME][2]
    streams = ImageRng.for_images(5, NAME, 3, range(len(images)))
    jitter, noise = draw(32, 32, params[2], streams)
    expected = from_unit(elastic_from_draws(to_unit(images), params, jitter, noise), torch.uint8)
    assert torch.equal(corrupt(images, NAME, 3, 5), expected)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_matches_reference(images, severity):
    params = CIFAR[NAME][severity - 1]
    jitter, noise = draw(32, 32, params[2], _streams(severity, len(images)))
    max_diff, fraction = _compare(images, params, jitter, noise)
    assert max_diff <= MAX_LEVELS and fraction <= MAX_FRACTION, (max_diff, fraction)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_displacement_only_matches_map_coordinates(images, severity):
    """With zero affine jitter the warp is the identity, and what is left must match SciPy's
    gaussian_filter + map_coordinates alone (no OpenCV involved)."""
    alpha, sigma, _ = params = CIFAR[NAME][severity - 1]
    jitter, noise = draw(32, 32, params[2], _streams(severity, len(images)))
    ours = elastic_from_draws(to_unit(images), params, torch.zeros_like(jitter), noise)
    ours = from_unit(ours, torch.uint8).numpy().astype(np.int16)
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    for i in range(len(images)):
        img = images[i].numpy().astype(np.float32) / 255
        dx, dy = (
            (ndi.gaussian_filter(u, sigma, mode="reflect", truncate=3) * alpha).astype(np.float32)
            for u in noise[i].numpy()
        )
        ref = np.stack(
            [ndi.map_coordinates(ch, [rows + dy, cols + dx], order=1, mode="reflect") for ch in img]
        )
        ref = np.uint8(np.clip(ref, 0, 1) * 255).astype(np.int16)
        assert np.abs(ours[i] - ref).max() <= 1


def test_non_square_follows_the_reference_point_order(images):
    """The control points come from (H // 2, W // 2) but are used as (x, y); check that quirk on a
    non-square crop against the reference (no table exists for it, so params are passed)."""
    crop = images[:8, :, :, :24].contiguous()
    params = CIFAR[NAME][2]
    jitter, noise = draw(32, 24, params[2], _streams(3, len(crop)))
    max_diff, fraction = _compare(crop, params, jitter, noise)
    assert max_diff <= MAX_LEVELS and fraction <= MAX_FRACTION, (max_diff, fraction)


def test_imagenet_size(images):
    big = F.interpolate(images[:2].float(), size=(224, 224), mode="bilinear", align_corners=False)
    big = big.round().clamp(0, 255).to(torch.uint8)
    for severity in SEVERITIES:
        out = corrupt(big, NAME, severity, 0)
        assert out.shape == big.shape and out.dtype == torch.uint8
        params = IMAGENET[NAME][severity - 1]
        jitter, noise = draw(224, 224, params[2], _streams(severity, 2))
        max_diff, fraction = _compare(big, params, jitter, noise)
        assert max_diff <= MAX_LEVELS and fraction <= MAX_FRACTION, (severity, max_diff, fraction)


@pytest.mark.parametrize("mode", ["reflect", "mirror"])
def test_bilinear_far_outside_the_image(mode):
    """Positions several image sizes away fold back like SciPy's 'reflect' / 'mirror' modes."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, 7, 9), generator=g, dtype=torch.float64)
    rows = torch.rand((1, 5, 6), generator=g, dtype=torch.float64) * 60 - 25
    cols = torch.rand((1, 5, 6), generator=g, dtype=torch.float64) * 70 - 30
    ours = bilinear_sample(x, rows, cols, mode)[0, 0].numpy()
    ref = ndi.map_coordinates(
        x[0, 0].numpy(), [rows[0].numpy(), cols[0].numpy()], order=1, mode=mode
    )
    np.testing.assert_allclose(ours, ref, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(images):
    for severity in SEVERITIES:
        cpu = corrupt(images, NAME, severity, 0)
        gpu = corrupt(images.cuda(), NAME, severity, 0).cpu()
        diff = (cpu.int() - gpu.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= MAX_FRACTION


@pytest.mark.parametrize("mode", ["reflect", "mirror"])
def test_fold_index_agrees_with_padding_near_and_far(mode):
    # the one-fold shortcut and the periodic fold give the padding's source indices
    for n in (1, 2, 3, 5, 32):
        for span in (n, 3 * n + 7):
            i = torch.arange(-span, n + span)
            assert torch.equal(fold_index(i, n, mode), border_index(n, span, mode))
