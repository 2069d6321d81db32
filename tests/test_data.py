"""CIFAR-10 sources, the checksummed tensor cache, and the tensor-resident loader."""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import invoke
from PIL import Image
from sqlalchemy import select

from normbench import data
from normbench.data import (
    CIFAR10_CLASSES,
    ArrayDataset,
    TensorLoader,
    load_cifar10,
    load_dataset,
)
from normbench.errors import DataError
from normbench.store import Run, open_store


def write_hub_parquet(
    root, split: str, images: np.ndarray, labels: list[int], raw: dict[int, bytes] | None = None
) -> None:
    """Write ``images`` (N,32,32,3 uint8) in the Hugging Face hub layout of uoft-cs/cifar10
    (``raw``: bytes stored instead of the PNG of some rows)."""
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))}
    )
    pngs = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append({"bytes": (raw or {}).get(i, buf.getvalue()), "path": None})
    ds = datasets.Dataset.from_dict({"img": pngs, "label": labels}, features=features)
    (root / "cifar10" / "plain_text").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "cifar10" / "plain_text" / f"{split}-00000-of-00001.parquet"))


@pytest.fixture
def tiny_mirror(tmp_path, fresh_cache):
    rng = np.random.default_rng(0)
    images = {
        s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        for s, n in (("train", 20), ("test", 10))
    }
    labels = {s: [i % 10 for i in range(len(images[s]))] for s in images}
    for split in images:
        write_hub_parquet(tmp_path / "mirror", split, images[split], labels[split])
    return tmp_path / "mirror", images, labels


def test_hub_parquet_mirror_decodes_losslessly(tiny_mirror):
    root, images, labels = tiny_mirror
    ds = load_cifar10("test", root)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (10, 3, 32, 32)
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), images["test"])
    assert ds.labels.tolist() == labels["test"]
    assert ds.classes == CIFAR10_CLASSES


def test_cache_is_reused_without_decoding(tiny_mirror, monkeypatch):
    root, images, _ = tiny_mirror
    load_cifar10("train", root)
    monkeypatch.setattr(data, "_decode_parquet", lambda *a: pytest.fail("decoded twice"))
    assert np.array_equal(
        load_cifar10("train", root).images.permute(0, 2, 3, 1).numpy(), images["train"]
    )


def test_corrupted_cache_file_is_detected_and_rebuilt(tiny_mirror, fresh_cache):
    root, images, _ = tiny_mirror
    load_cifar10("train", root)
    cached = fresh_cache / "datasets" / "cifar10" / "train-images.npy"
    raw = bytearray(cached.read_bytes())
    raw[-1] ^= 0xFF  # flip one pixel's bits: same size, wrong content
    cached.write_bytes(bytes(raw))
    ds = load_cifar10("train", root)
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), images["train"])
    assert data._read_cache("cifar10", "train") is not None  # rebuilt with a valid checksum


def test_missing_data_offline_says_what_to_do(tmp_path, fresh_cache, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        load_cifar10("train", tmp_path)
    message = str(info.value)
    assert "--data-dir" in message and "NORMBENCH_DATA_DIR" in message
    assert "normbench data prepare cifar10" in message and "parquet" in message


def test_wrong_content_is_rejected(tmp_path, fresh_cache):
    write_hub_parquet(tmp_path, "test", np.zeros((3, 16, 16, 3), np.uint8), [0, 1, 2])
    ds = datasets.Dataset.from_dict({"x": [1, 2]})  # a parquet file that is not an image set
    ds.to_parquet(str(tmp_path / "cifar10" / "plain_text" / "train-00000-of-00001.parquet"))
    with pytest.raises(DataError, match="Image column and a ClassLabel column"):
        load_cifar10("train", tmp_path)
    with pytest.raises(DataError, match="row 0 is a 16x16 image"):
        load_cifar10("test", tmp_path)


def test_damaged_cache_manifest_is_decoded_again(tiny_mirror, fresh_cache):
    root, images, _ = tiny_mirror
    load_cifar10("test", root)
    (fresh_cache / "datasets" / "cifar10" / "test.json").write_text("{not json")
    ds = load_cifar10("test", root)
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), images["test"])
    assert data._read_cache("cifar10", "test") is not None


def test_an_undecodable_image_names_the_file_and_row(tmp_path, fresh_cache):
    images = np.zeros((3, 32, 32, 3), np.uint8)
    write_hub_parquet(tmp_path, "test", images, [0, 1, 2], raw={1: b"\x89PNG damaged"})
    path = tmp_path / "cifar10" / "plain_text" / "test-00000-of-00001.parquet"
    with pytest.raises(DataError) as info:
        load_cifar10("test", tmp_path)
    assert str(info.value).startswith(f"{path} holds an undecodable image in row 1 (")
    assert not (fresh_cache / "datasets" / "cifar10" / "test.json").exists()


# --- a damaged mirror is refused before anything is written --------------------------------------

DAMAGE = {
    "truncated": lambda good: good.read_bytes()[: 1 << 16],  # a copy that stopped early
    "garbage": lambda good: b"this is not a parquet file\n" * 100,
}


def snapshot(folder):
    """Every entry under ``folder``: link target or size, modification time and content hash."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            found[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            stat = path.stat()
            found[str(path)] = (stat.st_size, stat.st_mtime_ns, data.sha256_file(path))
    return found


@pytest.fixture(params=sorted(DAMAGE))
def bad_mirror(request, cifar_dir, tmp_path, fresh_cache, monkeypatch):
    """The real mirror's layout with its test file linked and its training file damaged, and an
    empty cache (so that a good decoded copy cannot hide the damaged file)."""
    monkeypatch.delenv("NORMBENCH_DATA_DIR")
    root = tmp_path / "bad-mirror"
    (root / "cifar10").mkdir(parents=True)
    name = "test-00000-of-00001.parquet"
    (root / "cifar10" / name).symlink_to(cifar_dir / "cifar10" / name)
    damaged = root / "cifar10" / "train-00000-of-00001.parquet"
    damaged.write_bytes(DAMAGE[request.param](cifar_dir / "cifar10" / damaged.name))
    return root, damaged


def test_a_damaged_parquet_file_is_refused_naming_it(bad_mirror):
    root, damaged = bad_mirror
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", root)
    message = str(info.value)
    assert message.startswith(f"{damaged} cannot be read as a parquet file (ArrowInvalid: ")
    assert "Parquet magic bytes not found" in message  # the short cause
    assert "restore it from the mirror" in message and "--data-dir" in message


def test_the_cli_refuses_a_damaged_mirror_and_changes_nothing(bad_mirror, tmp_path, fresh_cache):
    root, damaged = bad_mirror
    before = snapshot(root)
    db = tmp_path / "results.db"
    prepare = invoke("data", "prepare", "cifar10", f"--data-dir={root}")
    run = invoke("run", "--suite=cifar10", "--budget=smoke", "--norms=batchnorm",
                 "--optimizers=sgd", f"--data-dir={root}", f"--db={db}")  # fmt: skip
    for result in (prepare, run):
        assert result.exit_code == 2, result.output
        error = result.output[result.output.index("Error: ") :]
        assert error.startswith(f"Error: {damaged} cannot be read as a parquet file"), error
    assert snapshot(root) == before
    with open_store(f"sqlite:///{db}").session() as s:
        assert s.scalars(select(Run)).all() == []
    assert not (fresh_cache / "datasets" / "cifar10" / "train.json").exists()


def _toy(n=64):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return ArrayDataset(images, torch.arange(n) % 10, CIFAR10_CLASSES, "toy")


def test_random_crop_matches_per_image_padded_crop():
    images = _toy(16).images
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    out = data.random_crop(images, 4, g1)
    dy, dx = torch.randint(0, 9, (2, 16), generator=g2)
    padded = F.pad(images, (4, 4, 4, 4))
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, dy[i] : dy[i] + 32, dx[i] : dx[i] + 32])


def test_loader_is_seeded_covers_the_data_and_normalizes():
    ds = _toy(64)

    def batches(seed):
        loader = TensorLoader(
            ds,
            16,
            device=torch.device("cpu"),
            train=True,
            generator=torch.Generator().manual_seed(seed),
            crop_padding=2,
            flip=True,
        )
        return list(loader)

    a, b, c = batches(0), batches(0), batches(1)
    assert len(a) == 4 and all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b, strict=True))
    assert not torch.equal(a[0][0], c[0][0])
    assert sorted(torch.cat([y for _, y in a]).tolist()) == sorted(ds.labels.tolist())
    x, _ = a[0]
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    test = TensorLoader(ds, 10, device=torch.device("cpu"), train=False)
    assert len(test) == 7 and sum(len(y) for _, y in test) == 64  # no example dropped in eval
    first, _ = next(iter(test))
    expected = (
        ds.images[:10].float() / 255 - torch.tensor(data.CIFAR10_MEAN).view(1, 3, 1, 1)
    ) / torch.tensor(data.CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(first, expected, atol=1e-5)


def test_real_cifar10_mirror(cifar_dir):
    test = load_cifar10("test")
    assert test.images.shape == (10_000, 3, 32, 32)
    assert test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # original test order
    means = test.images.float().mean((0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.494214, 0.485131, 0.450409]), atol=1e-5)
    train = load_cifar10("train")
    assert (
        train.images.shape == (50_000, 3, 32, 32)
        and train.labels.bincount().tolist() == [5000] * 10
    )
