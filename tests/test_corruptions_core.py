"""The corruption engine's contract, noise and digital corruptions, on real CIFAR-10 test images.

Deterministic corruptions are compared with independent per-image implementations of the spec
(scikit-image, Pillow); random ones are checked for statistics, determinism and range, and every
random corruption for giving each image the same bytes whatever the chunking, batch or device.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.color
import torch
from helpers import cifar_test_images
from PIL import Image

from normbench.corruptions import (
    ALL,
    BENCHMARK,
    CORRUPTIONS,
    EXTRA,
    FAMILIES,
    RANDOM,
    UINT8,
    corrupt,
    from_unit,
)
from normbench.corruptions.rng import image_seed
from normbench.corruptions.tables import CIFAR, IMAGENET
from normbench.errors import NormbenchError, UnknownNameError

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise")

pytestmark = pytest.mark.usefixtures("one_thread")
DIGITAL = ("brightness", "contrast", "saturate", "pixelate", "jpeg_compression")


@pytest.fixture
def images(cifar_dir) -> torch.Tensor:
    return cifar_test_images(str(cifar_dir), 128)


def test_names_tables_and_families_are_consistent():
    assert len(BENCHMARK) == 15 and len(EXTRA) == 4 and len(set(ALL)) == 19
    assert set(CIFAR) == set(IMAGENET) == set(ALL)
    assert sum(len(v) for v in FAMILIES.values()) == 15
    assert all(len(v) == 5 for v in CIFAR.values()) and all(len(v) == 5 for v in IMAGENET.values())


def test_bad_input_is_a_clear_error():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(UnknownNameError, match="Did you mean 'gaussian_noise'"):
        corrupt(x, "gausian_noise", 1)
    for severity in (0, 6, "3"):
        with pytest.raises(NormbenchError, match="valid severities are 1..5"):
            corrupt(x, "contrast", severity)
    with pytest.raises(NormbenchError, match="No corruption parameter table for 64x64"):
        corrupt(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(NormbenchError, match=r"shape \(N, 3, H, W\)"):
        corrupt(torch.zeros(3, 32, 32, dtype=torch.uint8), "contrast", 1)
    with pytest.raises(NormbenchError, match="2 image indices were given for a batch of 1"):
        corrupt(x, "snow", 1, indices=[0, 1])
    with pytest.raises(NormbenchError, match="chunk size is a number of images >= 1, not 0"):
        corrupt(x, "snow", 1, chunk_size=0)


RANDOM_NAMES = [n for n in ALL if CORRUPTIONS.info(n).has(RANDOM)]


def test_random_corruptions_are_the_same_bytes_for_any_chunk_size(cifar_dir):
    # 16 images: chunks of 1, of 7 (the last one short) and one chunk of all.
    images = cifar_test_images(str(cifar_dir), 16)
    assert len(RANDOM_NAMES) == 11
    for name in RANDOM_NAMES:
        for severity in range(1, 6):
            whole = corrupt(images, name, severity, 5, chunk_size=1000)
            assert not torch.equal(whole, images)
            for chunk in (1, 7):
                chunked = corrupt(images, name, severity, 5, chunk_size=chunk)
                assert torch.equal(chunked, whole), (name, severity, chunk)


def test_an_image_keeps_its_corruption_in_any_batch(cifar_dir):
    images = cifar_test_images(str(cifar_dir), 64)
    picked = torch.tensor([50, 3, 17, 63])
    for name in RANDOM_NAMES:
        full = corrupt(images, name, 4, seed=2)
        alone = corrupt(images[picked], name, 4, seed=2, indices=picked)
        assert torch.equal(alone, full[picked]), name
        # the index, not the position in the batch, picks the random numbers
        assert not torch.equal(corrupt(images[picked], name, 4, seed=2), full[picked]), name


def test_image_seeds_are_a_stable_digest():
    # The seeds fix every generated set: a change here changes all their bytes and must come
    # with a new ENGINE_VERSION (normbench/corruptions/sets.py).
    assert image_seed(0, "snow", 1, 0) == 3059357346121376131
    seeds = {
        image_seed(s, n, v, i) for s in (0, 1) for n in ALL for v in range(1, 6) for i in (0, 1)
    }
    assert len(seeds) == 2 * len(ALL) * 5 * 2 and all(0 <= x < 2**63 for x in seeds)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_random_corruptions_are_the_same_bytes_on_cpu_and_cuda(cifar_dir):
    # The random numbers are drawn on the CPU for either device. elastic_transform's float32
    # bilinear sampling may round differently on CUDA (its own CUDA test allows one level on a
    # tiny fraction of values); every other random corruption must give the same bytes.
    images = cifar_test_images(str(cifar_dir), 64)
    for name in RANDOM_NAMES:
        for severity in range(1, 6):
            cpu = corrupt(images, name, severity, 1)
            cuda = corrupt(images.cuda(), name, severity, 1).cpu()
            if name == "elastic_transform":
                diff = (cpu.int() - cuda.int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3, severity
            else:
                assert torch.equal(cpu, cuda), (name, severity)


def _mean_change(images: torch.Tensor, name: str) -> list[float]:
    return [
        (corrupt(images, name, s, seed=0).float() - images.float()).abs().mean().item()
        for s in range(1, 6)
    ]


@pytest.mark.parametrize("name", NOISE + DIGITAL)
def test_shape_dtype_determinism_and_severity_order(images, name):
    changes = _mean_change(images, name)
    if name == "saturate":
        # Not monotone by design of the protocol: severities 1-2 desaturate (x0.3, x0.1) and 3-5
        # oversaturate (x1.5, x2 + 0.1, x2.5 + 0.2); each half is monotone.
        assert changes[0] < changes[1] and changes[2] < changes[3] < changes[4], changes
    else:
        assert changes == sorted(changes), changes  # more severe changes the images more
    for severity in range(1, 6):
        a = corrupt(images, name, severity, 1)
        b = corrupt(images, name, severity, 1)
        assert a.shape == images.shape and a.dtype == torch.uint8 and torch.equal(a, b)
        if CORRUPTIONS.info(name).has("random"):
            c = corrupt(images, name, severity, 2)
            assert not torch.equal(a, c)
        as_float = corrupt(images.float() / 255, name, severity, 1)
        assert as_float.dtype == torch.float32 and as_float.min() >= 0 and as_float.max() <= 1


@pytest.mark.parametrize("name", [n for n in ALL if CORRUPTIONS.info(n).has(UINT8)])
def test_uint8_shortcut_equals_the_float64_path(images, name):
    # Corruptions that take uint8 directly must give what the float64 round trip gives.
    assert name in {"jpeg_compression", "pixelate", "motion_blur", "zoom_blur", "frost", "spatter"}
    for severity in range(1, 6):
        direct = corrupt(images[:96], name, severity, 3)
        x64 = images[:96].double() / 255
        via_float = corrupt(x64, name, severity, 3)
        assert torch.equal(direct, from_unit(via_float, torch.uint8))


def _reference(name: str, c, img: np.ndarray) -> np.ndarray:
    """The spec, one HWC uint8 image at a time, with scikit-image and Pillow."""
    x = img / 255.0
    if name == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        return np.uint8(np.clip((x - means) * c + means, 0, 1) * 255)
    if name in ("brightness", "saturate"):
        hsv = skimage.color.rgb2hsv(x)
        if name == "brightness":
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        else:
            hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
        return np.uint8(np.clip(skimage.color.hsv2rgb(hsv), 0, 1) * 255)
    pil = Image.fromarray(img)
    if name == "pixelate":
        small = pil.resize((int(32 * c), int(32 * c)), Image.BOX)
        return np.asarray(small.resize((32, 32), Image.BOX))
    buffer = io.BytesIO()
    pil.save(buffer, "JPEG", quality=c)
    return np.asarray(Image.open(buffer))


@pytest.mark.parametrize("severity", range(1, 6))
@pytest.mark.parametrize("name", DIGITAL)
def test_deterministic_digital_corruptions_match_the_spec(images, name, severity):
    ours = corrupt(images, name, severity).permute(0, 2, 3, 1).numpy().astype(int)
    c = CIFAR[name][severity - 1]
    ref = np.stack([_reference(name, c, img) for img in images.permute(0, 2, 3, 1).numpy()])
    # uint8 input is processed in float64 like the reference, so the results are identical.
    assert np.array_equal(ours, ref.astype(int))


def test_noise_statistics():
    gray = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    for severity, c in enumerate(CIFAR["gaussian_noise"], start=1):
        out = corrupt(gray, "gaussian_noise", severity, seed=0).float() / 255
        assert out.std().item() == pytest.approx(c, rel=0.05)
    for severity, c in enumerate(CIFAR["impulse_noise"], start=1):
        out = corrupt(gray, "impulse_noise", severity, seed=0)
        changed = ((out == 0) | (out == 255)).float().mean().item()
        assert changed == pytest.approx(c, rel=0.15)
    for severity, c in enumerate(CIFAR["shot_noise"], start=1):
        out = corrupt(gray, "shot_noise", severity, seed=0).float()
        assert out.mean().item() == pytest.approx(127.5, abs=1.0)  # unbiased, then truncated
        assert (out / 255).std().item() == pytest.approx((128 / 255 / c) ** 0.5, rel=0.05)
    for severity, c in enumerate(CIFAR["speckle_noise"], start=1):
        out = corrupt(gray, "speckle_noise", severity, seed=0).float() / 255
        assert out.std().item() == pytest.approx(c * 128 / 255, rel=0.05)


def test_imagenet_table_is_used_for_224_px_images():
    x = torch.full((2, 3, 224, 224), 100, dtype=torch.uint8)
    out = corrupt(x, "contrast", 5)
    assert out.shape == x.shape and torch.equal(out, x)  # a flat image has no contrast to lose
    checker = torch.zeros_like(x)
    checker[..., ::2, :] = 200
    lowered = corrupt(checker, "contrast", 1).float()
    assert lowered.max() - lowered.min() == pytest.approx(200 * IMAGENET["contrast"][0], abs=1)


def test_jpeg_fallback_through_pillow_gives_the_same_bytes(images, monkeypatch):
    import torchvision.io

    from normbench.corruptions.digital import _jpeg_round_trip

    batched = _jpeg_round_trip(images[:16], 40)

    def unavailable(*args, **kwargs):
        raise RuntimeError("image codecs removed")

    monkeypatch.setattr(torchvision.io, "encode_jpeg", unavailable)
    assert torch.equal(_jpeg_round_trip(images[:16], 40), batched)
