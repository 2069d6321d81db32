"""CIFAR-10-C streamed on the run's device, and the JPEG codec choice.

The streamed set is checked on the CPU (the same code path a GPU takes, with ``stream=True``)
against the generated set in the cache; the CUDA tests run only where a GPU is.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from normbench.corruptions import SEVERITIES, corrupt, digital
from normbench.corruptions.digital import (
    JPEG_CODEC_VAR,
    jpeg_codec,
    jpeg_codec_on,
    jpeg_round_trip,
)
from normbench.corruptions.sets import (
    ENGINE_VERSION,
    CorruptedSet,
    StreamedSet,
    corruption_images,
    generate,
    generated_root,
    open_generated,
    prepare_cifar10_c,
)
from normbench.data import TensorLoader, load_cifar10
from normbench.errors import NormbenchError

# a random corruption, the codec round trip, and the sequential pixel shuffle
NAMES = ("gaussian_noise", "jpeg_compression", "glass_blur")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def codec_state(monkeypatch):
    """The default codec, and the once-per-device probe and warning forgotten between tests."""
    monkeypatch.delenv(JPEG_CODEC_VAR, raising=False)
    digital._warn_once.cache_clear()
    digital._nvjpeg_problem.cache_clear()


def corrupted_sets(cache) -> list:
    """The generated CIFAR-10-C folders in a cache directory."""
    return sorted(p.name for p in (cache / "datasets").glob("cifar10-c*"))


def test_streamed_set_has_the_cached_sets_bytes_and_writes_nothing(cifar_dir, fresh_cache):
    streamed = prepare_cifar10_c(corruptions=NAMES, subset=20, subset_seed=5, stream=True)
    assert isinstance(streamed, StreamedSet)
    assert streamed.source == f"normbench engine v{ENGINE_VERSION}, generated on cpu, streamed"
    assert streamed.images_per_pair == 20 and streamed.engine_version == ENGINE_VERSION
    blocks = {(n, s): streamed.load(n, s) for n in NAMES for s in SEVERITIES}
    assert corrupted_sets(fresh_cache) == []  # nothing written
    assert not generated_root(20, 5).exists()

    cached = prepare_cifar10_c(corruptions=NAMES, subset=20, subset_seed=5)
    assert isinstance(cached, CorruptedSet) and cached.source == "generated"
    assert corrupted_sets(fresh_cache) == ["cifar10-c-subset20-seed5"]
    assert streamed.indices == cached.indices and len(streamed.indices) == 20
    for (name, severity), block in blocks.items():
        expected = cached.load(name, severity)
        assert block.images.shape == (20, 3, 32, 32) and block.images.dtype == torch.uint8
        assert torch.equal(block.images, expected.images), (name, severity)
        assert torch.equal(block.labels, expected.labels)
    # not a copy of the clean images: the corruption did change them
    clean = load_cifar10("test").images[cached.indices]
    assert not torch.equal(blocks["gaussian_noise", 1].images, clean)

    # The batch on the device changes nothing: each image's numbers come from its test index.
    test = load_cifar10("test")
    small = StreamedSet(test, indices=torch.tensor(cached.indices), batch_size=7)
    assert torch.equal(small.load("glass_blur", 4).images, blocks["glass_blur", 4].images)
    # Once the cache is complete, it is read, even when streaming was asked for.
    again = prepare_cifar10_c(corruptions=NAMES, subset=20, subset_seed=5, stream=True)
    assert isinstance(again, CorruptedSet) and again.root == cached.root


def test_corruption_images_streams_on_cuda_and_caches_on_the_cpu(cifar_dir, fresh_cache):
    # On CUDA the set is streamed; it touches the device only when a pair is loaded.
    on_gpu = corruption_images(subset=20, device="cuda", corruptions=("contrast",))
    assert isinstance(on_gpu, StreamedSet) and on_gpu.root is None
    assert on_gpu.source == f"normbench engine v{ENGINE_VERSION}, generated on cuda, streamed"
    assert on_gpu.manifest["device"] == "cuda" and on_gpu.manifest["jpeg_codec"] == "libjpeg"
    assert corrupted_sets(fresh_cache) == []

    on_cpu = corruption_images(subset=20, device="cpu", corruptions=("contrast",))
    assert isinstance(on_cpu, CorruptedSet) and on_cpu.source == "generated"
    assert corrupted_sets(fresh_cache) == ["cifar10-c-subset20-seed0"]
    # the evaluation loader takes a streamed pair as it takes a cached one
    block = StreamedSet(load_cifar10("test"), indices=torch.tensor(on_cpu.indices)).load(
        "contrast", 2
    )
    assert torch.equal(block.images, on_cpu.load("contrast", 2).images)
    batches = list(TensorLoader(block, 8, device=torch.device("cpu"), train=False))
    assert [len(y) for _, y in batches] == [8, 8, 4]
    assert torch.equal(torch.cat([y for _, y in batches]), block.labels)


def test_jpeg_codec_is_libjpeg_unless_chosen(monkeypatch, caplog, cifar_dir):
    images = load_cifar10("test").images[:12]
    assert jpeg_codec() == "libjpeg" and jpeg_codec_on("cpu") == "libjpeg"
    reference = corrupt(images, "jpeg_compression", 3)

    monkeypatch.setenv(JPEG_CODEC_VAR, "mozjpeg")
    with pytest.raises(NormbenchError, match="NORMBENCH_JPEG_CODEC='mozjpeg' is not a JPEG codec"):
        corrupt(images, "jpeg_compression", 3)

    # nvjpeg chosen for a batch on the CPU: libjpeg's bytes, and a warning saying why (once)
    monkeypatch.setenv(JPEG_CODEC_VAR, "NVJPEG")
    assert jpeg_codec() == "nvjpeg"
    with caplog.at_level(logging.WARNING, logger="normbench.corruptions.digital"):
        assert torch.equal(corrupt(images, "jpeg_compression", 3), reference)
        assert torch.equal(corrupt(images, "jpeg_compression", 3), reference)
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        "NORMBENCH_JPEG_CODEC=nvjpeg, but the images are on cpu, not on a CUDA device; using "
        "libjpeg on the CPU instead."
    ]
    # float input goes through the same codec on 8-bit levels
    as_float = corrupt(images.double() / 255, "jpeg_compression", 3)
    assert torch.equal((as_float * 255).round().to(torch.uint8), reference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where CUDA is absent")
def test_nvjpeg_without_cuda_falls_back_to_libjpeg(monkeypatch, caplog, cifar_dir, fresh_cache):
    monkeypatch.setenv(JPEG_CODEC_VAR, "nvjpeg")
    with caplog.at_level(logging.WARNING, logger="normbench.corruptions.digital"):
        streamed = corruption_images(subset=20, device="cuda", corruptions=("jpeg_compression",))
    assert "torchvision's CUDA JPEG codec failed on cuda" in caplog.text
    assert streamed.jpeg_codec == "libjpeg" and "nvjpeg" not in streamed.source


def test_a_cached_jpeg_file_of_another_codec_is_regenerated_alone(cifar_dir, fresh_cache):
    names = ("contrast", "jpeg_compression")
    first = prepare_cifar10_c(corruptions=names, subset=20)
    root, sha = first.root, dict(first.manifest["sha256"])
    assert first.manifest["jpeg_codec"] == "libjpeg"
    # What a GPU with nvjpeg chosen would have left: the manifest says so.
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["jpeg_codec"] = "nvjpeg"
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert open_generated(root, 0, names, first.indices) is None
    assert open_generated(root, 0, ("contrast",), first.indices) is not None
    assert open_generated(root, 0, names, first.indices, "nvjpeg") is not None

    contrast_mtime = (root / "contrast.npy").stat().st_mtime_ns
    jpeg_mtime = (root / "jpeg_compression.npy").stat().st_mtime_ns
    fixed = prepare_cifar10_c(corruptions=names, subset=20)
    assert fixed.manifest["jpeg_codec"] == "libjpeg" and fixed.manifest["sha256"] == sha
    assert (root / "contrast.npy").stat().st_mtime_ns == contrast_mtime  # reused
    assert (root / "jpeg_compression.npy").stat().st_mtime_ns != jpeg_mtime  # made again


# --- on a GPU -----------------------------------------------------------------------------------


@CUDA
def test_streamed_set_on_cuda_stays_there_and_keeps_libjpeg_bytes(cifar_dir, fresh_cache):
    streamed = corruption_images(subset=20, device="cuda", corruptions=("jpeg_compression",))
    block = streamed.load("jpeg_compression", 4)
    assert block.images.is_cuda and block.labels.is_cuda
    loader = TensorLoader(block, 8, device=block.images.device, train=False)
    assert loader.images.data_ptr() == block.images.data_ptr()  # no copy
    cached = prepare_cifar10_c(corruptions=("jpeg_compression",), subset=20)
    assert torch.equal(block.images.cpu(), cached.load("jpeg_compression", 4).images)
    assert corrupted_sets(fresh_cache) == ["cifar10-c-subset20-seed0"]  # the CPU one only
    # a set generated into the cache on the GPU names it too
    on_gpu = generate(fresh_cache / "on-gpu", indices=torch.tensor(cached.indices), device="cuda",
                      corruptions=("contrast",))  # fmt: skip
    assert on_gpu.source == "generated on cuda"


@CUDA
def test_nvjpeg_round_trip_is_within_a_few_levels_of_libjpeg(monkeypatch, cifar_dir):
    images = load_cifar10("test").images[:256].cuda()
    # libjpeg, the default, on a CUDA batch: the CPU's bytes, returned on the GPU
    libjpeg = jpeg_round_trip(images, 40)
    assert libjpeg.is_cuda and torch.equal(libjpeg.cpu(), jpeg_round_trip(images.cpu(), 40))
    monkeypatch.setenv(JPEG_CODEC_VAR, "nvjpeg")
    assert jpeg_codec_on(images.device) == "nvjpeg"
    for quality in (80, 40):
        ours = jpeg_round_trip(images, quality)
        monkeypatch.delenv(JPEG_CODEC_VAR)
        reference = jpeg_round_trip(images, quality)
        monkeypatch.setenv(JPEG_CODEC_VAR, "nvjpeg")
        assert ours.is_cuda and ours.dtype == torch.uint8 and ours.shape == images.shape
        diff = (ours.int() - reference.int()).abs().float().mean().item()
        print(f"nvjpeg vs libjpeg at quality {quality}: mean |difference| {diff:.3f} levels")
        # a different DCT and chroma resampling move values by a few levels, no more
        assert diff < 6
    streamed = corruption_images(subset=20, device="cuda", corruptions=("jpeg_compression",))
    assert streamed.source.endswith(", jpeg_compression by nvjpeg")
