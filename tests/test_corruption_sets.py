"""CIFAR-10-C sets: official files checked and read; generated sets cached with a manifest."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from normbench.corruptions import TABLE_VERSION, corrupt
from normbench.corruptions.sets import (
    ENGINE_VERSION,
    N_TEST,
    generate,
    generated_root,
    open_generated,
    open_official,
    prepare_cifar10_c,
)
from normbench.data import load_cifar10, sha256_file
from normbench.errors import DataError

TWO = ("contrast", "gaussian_noise")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_generated_set_layout_manifest_and_reuse(cifar_dir, fresh_cache):
    cset = prepare_cifar10_c(corruptions=TWO)
    root = generated_root()
    assert cset.source == "generated" and cset.root == root
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["table_version"] == TABLE_VERSION and manifest["seed"] == 0
    assert manifest["engine_version"] == ENGINE_VERSION == cset.engine_version
    assert set(manifest["sha256"]) == {"labels", *TWO}
    array = np.load(root / "gaussian_noise.npy", mmap_mode="r")
    assert array.shape == (50_000, 32, 32, 3) and array.dtype == np.uint8
    labels = np.load(root / "labels.npy")
    test = load_cifar10("test")
    assert labels.dtype == np.uint8 and np.array_equal(labels[:N_TEST], test.labels.numpy())

    # Severity 3 of contrast is the engine's output on the test set, in the original order.
    block = cset.load("contrast", 3)
    assert torch.equal(block.images, corrupt(test.images, "contrast", 3))
    assert block.labels.tolist()[:3] == [3, 8, 8]
    # A random corruption gives each test image the bytes it gets alone, from its test index.
    picked = torch.tensor([0, 4321, 9999])
    noisy = cset.load("gaussian_noise", 2).images[picked]
    assert torch.equal(noisy, corrupt(test.images[picked], "gaussian_noise", 2, 0, picked))

    # A valid cache is reused as it is; the same seed regenerates identical files.
    mtime = (root / "contrast.npy").stat().st_mtime_ns
    assert prepare_cifar10_c(corruptions=TWO).manifest["sha256"] == manifest["sha256"]
    assert (root / "contrast.npy").stat().st_mtime_ns == mtime
    again = generate(root.parent / "again", corruptions=TWO)
    assert again.manifest["sha256"] == manifest["sha256"]


def test_stale_or_damaged_generated_files_are_never_mixed(cifar_dir, fresh_cache):
    prepare_cifar10_c(corruptions=TWO)
    root = generated_root()
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["table_version"] = "an-older-table"
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert open_generated(root, 0, TWO) is None  # made by another table: not usable
    assert prepare_cifar10_c(corruptions=TWO).manifest["table_version"] == TABLE_VERSION

    with open(root / "contrast.npy", "r+b") as f:  # damage one byte of pixel data
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    assert open_generated(root, 0, TWO) is None
    fixed = prepare_cifar10_c(corruptions=TWO)
    assert torch.equal(
        fixed.load("contrast", 1).images, corrupt(load_cifar10("test").images, "contrast", 1)
    )


def test_cache_of_an_older_engine_is_regenerated_and_says_so(cifar_dir, fresh_cache, caplog):
    prepare_cifar10_c(corruptions=("gaussian_noise",))
    root = generated_root()
    manifest = json.loads((root / "manifest.json").read_text())
    new_bytes = manifest["sha256"]["gaussian_noise"]
    # What an older engine left: other bytes, its own version in the manifest.
    np.save(root / "gaussian_noise.npy", np.zeros((50_000, 32, 32, 3), np.uint8))
    manifest["engine_version"] = ENGINE_VERSION - 1
    manifest["sha256"]["gaussian_noise"] = sha256_file(root / "gaussian_noise.npy")
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert open_generated(root, 0, ("gaussian_noise",)) is None
    with caplog.at_level(logging.WARNING, logger="normbench.corruptions.sets"):
        fresh = prepare_cifar10_c(corruptions=("gaussian_noise",))
    message = caplog.text
    assert f"made by engine version {ENGINE_VERSION - 1} with parameter table {TABLE_VERSION}" in (
        message
    )
    assert f"this is engine version {ENGINE_VERSION}" in message and str(root) in message
    assert fresh.manifest["engine_version"] == ENGINE_VERSION
    assert fresh.manifest["sha256"]["gaussian_noise"] == new_bytes  # regenerated, not reused


def test_unreadable_manifest_names_the_file(fresh_cache):
    root = generated_root()
    root.mkdir(parents=True)
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json is not a readable manifest"):
        prepare_cifar10_c(corruptions=TWO)


@pytest.fixture
def official(tmp_path, cifar_dir):
    """A data directory holding official-layout CIFAR-10-C files (labels and one corruption)."""
    root = tmp_path / "data" / "CIFAR-10-C"
    root.mkdir(parents=True)
    labels = np.tile(load_cifar10("test").labels.numpy().astype(np.uint8), 5)
    np.save(root / "labels.npy", labels)
    fog = np.lib.format.open_memmap(root / "fog.npy", "w+", np.uint8, (50_000, 32, 32, 3))
    fog[N_TEST : 2 * N_TEST] = 7  # severity 2 block
    fog.flush()
    return root


def test_official_files_are_used_and_read(official, cifar_dir):
    cset = prepare_cifar10_c(official.parent, corruptions=("fog",))
    assert cset.source == "official" and cset.root == official
    block = cset.load("fog", 2)
    assert block.images.shape == (N_TEST, 3, 32, 32) and int(block.images.float().mean()) == 7
    assert torch.equal(block.labels, load_cifar10("test").labels)


def test_official_files_with_wrong_shape_dtype_or_labels_name_the_file(official, cifar_dir):
    test_labels = load_cifar10("test").labels
    np.save(official / "snow.npy", np.zeros((10, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"snow\.npy has dtype uint8 and shape \(10, 32, 32, 3\)"):
        open_official(official, test_labels)
    np.save(official / "snow.npy", np.zeros((50_000, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match=r"snow\.npy has dtype float32"):
        open_official(official, test_labels)
    (official / "snow.npy").unlink()
    np.save(official / "labels.npy", np.zeros(50_000, np.uint8))
    with pytest.raises(DataError, match="labels.npy does not hold the CIFAR-10 test labels"):
        open_official(official, test_labels)


def test_subset_sets_are_generated_for_their_rows_and_index_official_files(official, cifar_dir):
    from normbench.data import subset_indices

    generated = prepare_cifar10_c(corruptions=("contrast",), subset=200, subset_seed=3)
    indices = subset_indices(N_TEST, 200, 3)
    block = generated.load("contrast", 5)
    test = load_cifar10("test")
    assert block.images.shape == (200, 3, 32, 32)
    assert torch.equal(block.images, corrupt(test.images[indices], "contrast", 5))
    assert torch.equal(block.labels, test.labels[indices])
    assert generated.root.name == "cifar10-c-subset200-seed3"

    from_official = prepare_cifar10_c(
        official.parent, corruptions=("fog",), subset=200, subset_seed=3
    )
    sub = from_official.load("fog", 2)
    assert sub.images.shape == (200, 3, 32, 32) and torch.equal(sub.labels, test.labels[indices])
