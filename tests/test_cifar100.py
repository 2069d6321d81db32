"""CIFAR-100 from its two mirror layouts (fixture files written here in the official formats),
each CIFAR dataset reading only its own files, and a 100-class model trained on the loader."""

from __future__ import annotations

import io
import pickle
import socket
import urllib.error
import urllib.request

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from normbench import data
from normbench.data import (
    CIFAR10_CLASSES,
    NORMALIZATION,
    TensorLoader,
    load_cifar10,
    load_cifar100,
    load_dataset,
)
from normbench.errors import DataError
from normbench.models import conv_norm_factory, create_model

FINE = [f"fine-{i:02d}" for i in range(100)]
COARSE = [f"coarse-{i:02d}" for i in range(20)]
SIZES = {"train": 40, "test": 24}


def make_split(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` random images (N,32,32,3 uint8) with fine labels that differ from their coarse ones
    (and from their index), so that a loader taking the wrong column is caught."""
    rng = np.random.default_rng(seed)
    fine = rng.permutation(100)[:n]
    return {
        "images": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "fine": fine,
        "coarse": (fine * 7 + 3) % 20,
    }


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_hub_parquet(folder, split: str, part: dict, shards: int = 1) -> list:
    """``part`` in the layout of uoft-cs/cifar100: ``img`` Image, ``fine_label`` and
    ``coarse_label`` ClassLabels, in ``shards`` files named as the hub names them."""
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=FINE),
            "coarse_label": datasets.ClassLabel(names=COARSE),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(len(part["fine"])), shards)):
        ds = datasets.Dataset.from_dict(
            {
                "img": [{"bytes": png(part["images"][i]), "path": None} for i in rows],
                "fine_label": part["fine"][rows].tolist(),
                "coarse_label": part["coarse"][rows].tolist(),
            },
            features=features,
        )
        paths.append(folder / f"{split}-{k:05d}-of-{shards:05d}.parquet")
        ds.to_parquet(str(paths[-1]))
    return paths


def write_batches(folder, parts: dict[str, dict], key=str) -> None:
    """``parts`` as torchvision's ``cifar-100-python`` folder: the ``train`` and ``test`` batch
    dicts (``data`` uint8 (N, 3072) rows, channel-major; fine and coarse labels) and ``meta`` with
    the class names. ``key=str.encode`` writes the keys and names as bytes, as Python 3 reads the
    official Python 2 pickles with ``encoding="bytes"``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in parts.items():
        batch = {
            key("batch_label"): f"{split}ing batch 1 of 1",
            key("filenames"): [f"img_{i}.png" for i in range(len(part["fine"]))],
            key("fine_labels"): part["fine"].tolist(),
            key("coarse_labels"): part["coarse"].tolist(),
            key("data"): part["images"].transpose(0, 3, 1, 2).reshape(-1, 3072).copy(),
        }
        (folder / split).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {
        key("fine_label_names"): [key(n) for n in FINE],
        key("coarse_label_names"): [key(n) for n in COARSE],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))


def hwc(ds) -> np.ndarray:
    return ds.images.permute(0, 2, 3, 1).numpy()


@pytest.fixture
def offline(monkeypatch):
    """No download can leave the machine: torchvision fetches with urllib, and any other socket
    connection fails as well."""

    def unreachable(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    monkeypatch.setattr(socket.socket, "connect", unreachable)


@pytest.fixture
def parts():
    return {split: make_split(n, seed) for seed, (split, n) in enumerate(SIZES.items())}


@pytest.fixture
def hub_mirror(tmp_path, fresh_cache, parts):
    root = tmp_path / "mirror"
    write_hub_parquet(root / "cifar100" / "plain_text", "train", parts["train"], shards=2)
    write_hub_parquet(root / "cifar100" / "plain_text", "test", parts["test"])
    return root


def test_hub_parquet_mirror_gives_fine_labels_losslessly(hub_mirror, parts, monkeypatch):
    for split in ("train", "test"):
        ds = load_dataset("cifar100", split, hub_mirror)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (SIZES[split], 3, 32, 32)
        assert np.array_equal(hwc(ds), parts[split]["images"])
        assert ds.labels.dtype == torch.int64
        assert ds.labels.tolist() == parts[split]["fine"].tolist()
        assert ds.classes == tuple(FINE) and len(ds.classes) == 100
        assert ds.source == f"parquet:{hub_mirror / 'cifar100' / 'plain_text'}"
    monkeypatch.setattr(data, "_decode_parquet", lambda *a: pytest.fail("decoded twice"))
    cached = load_cifar100("train", hub_mirror)
    assert np.array_equal(hwc(cached), parts["train"]["images"])
    assert cached.labels.tolist() == parts["train"]["fine"].tolist()
    assert cached.classes == tuple(FINE)


def test_decoding_shows_its_progress(hub_mirror, monkeypatch):
    shown = []
    real = data.progress.task
    monkeypatch.setattr(
        data.progress, "task", lambda text, **kw: shown.append(text) or real(text, **kw)
    )
    load_cifar100("test", hub_mirror)
    assert shown == ["decoding CIFAR-100 test"]


@pytest.mark.parametrize("key", [str, str.encode], ids=["text", "bytes"])
@pytest.mark.parametrize("under", [".", "cifar100"])
def test_torchvision_batches_folder(tmp_path, fresh_cache, parts, offline, key, under):
    folder = tmp_path / under / "cifar-100-python"
    write_batches(folder, parts, key)
    for split in ("train", "test"):
        ds = load_cifar100(split, tmp_path)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (SIZES[split], 3, 32, 32)
        assert np.array_equal(hwc(ds), parts[split]["images"])
        assert ds.labels.tolist() == parts[split]["fine"].tolist()
        assert ds.classes == tuple(FINE)
        assert ds.source == f"batches:{folder}"
    assert data._read_cache("cifar100", "train") is not None


def test_cifar10_batches_folder_is_read_by_the_same_reader(tmp_path, fresh_cache, offline):
    # cifar-10-batches-py: five training batches and a test batch keyed "labels", and
    # batches.meta with "label_names".
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 14)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        rows = slice(2 * k, 2 * k + 2) if k < 5 else slice(10, 14)
        batch = {"data": images[rows].transpose(0, 3, 1, 2).reshape(-1, 3072).copy(),
                 "labels": labels[rows].tolist(), "batch_label": name}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": list(CIFAR10_CLASSES), "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    train, test = load_cifar10("train", tmp_path), load_cifar10("test", tmp_path)
    assert np.array_equal(hwc(train), images[:10]) and np.array_equal(hwc(test), images[10:])
    assert train.labels.tolist() == labels[:10].tolist()
    assert test.classes == CIFAR10_CLASSES


def test_a_parquet_mirror_wins_over_a_batches_folder(hub_mirror, parts, offline):
    other = {split: make_split(n, seed=10 + n) for split, n in SIZES.items()}
    write_batches(hub_mirror / "cifar-100-python", other)
    ds = load_cifar100("test", hub_mirror)
    assert ds.source.startswith("parquet:")
    assert np.array_equal(hwc(ds), parts["test"]["images"])


@pytest.mark.parametrize("layout", ["own-folder", "bare"])
def test_a_cifar100_mirror_is_never_read_as_cifar10(tmp_path, fresh_cache, parts, offline, layout):
    folder = tmp_path / "cifar100" if layout == "own-folder" else tmp_path
    write_hub_parquet(folder, "train", parts["train"])
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", "train", tmp_path)
    message = str(info.value)
    assert message.startswith(f"CIFAR-10 is not available: no local mirror was found in {tmp_path}")
    assert "normbench data prepare cifar10`" in message and "uoft-cs/cifar10)" in message
    assert not (fresh_cache / "datasets" / "cifar10").exists()
    # The same files are CIFAR-100's, found in either place.
    assert load_cifar100("train", tmp_path).labels.tolist() == parts["train"]["fine"].tolist()


def test_bare_files_are_taken_only_by_the_dataset_they_hold(tmp_path, fresh_cache, offline):
    images = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(names=list(CIFAR10_CLASSES))}
    )
    rows = {"img": [{"bytes": png(im), "path": None} for im in images], "label": [0, 1, 2, 3, 4, 5]}
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(tmp_path / "test-00000-of-00001.parquet")
    )
    assert np.array_equal(hwc(load_cifar10("test", tmp_path)), images)
    with pytest.raises(DataError) as info:
        load_cifar100("test", tmp_path)
    message = str(info.value)
    assert message.startswith("CIFAR-100 is not available") and "network is unreachable" in message
    for piece in ("`normbench data prepare cifar100`", "cifar100/train-*.parquet",
                  "uoft-cs/cifar100", "cifar-100-python", "--data-dir"):  # fmt: skip
        assert piece in message, message


def test_an_empty_data_dir_offline_says_what_to_do(tmp_path, fresh_cache, offline):
    with pytest.raises(DataError, match="CIFAR-100 is not available"):
        load_dataset("cifar100", "test", tmp_path)


def test_a_damaged_shard_is_named(hub_mirror):
    damaged = hub_mirror / "cifar100" / "plain_text" / "train-00001-of-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:300])  # a copy that stopped early
    with pytest.raises(DataError) as info:
        load_cifar100("train", hub_mirror)
    assert str(info.value).startswith(f"{damaged} cannot be read as a parquet file (")
    assert "restore it from the mirror" in str(info.value)


def test_a_shard_without_fine_labels_is_named(tmp_path, fresh_cache, parts):
    # CIFAR-10's layout in CIFAR-100's folder: an Image and a ClassLabel column, but not
    # ``fine_label``; it must not be decoded with whatever labels it has.
    folder = tmp_path / "cifar100"
    folder.mkdir()
    features = datasets.Features(
        {"img": datasets.Image(), "coarse_label": datasets.ClassLabel(names=COARSE)}
    )
    rows = {"img": [{"bytes": png(im), "path": None} for im in parts["test"]["images"]],
            "coarse_label": parts["test"]["coarse"].tolist()}  # fmt: skip
    path = folder / "test-00000-of-00001.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    with pytest.raises(DataError) as info:
        load_cifar100("test", tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path} is not in the Hugging Face image-classification layout")
    assert "ClassLabel column 'fine_label'" in message and "uoft-cs/cifar100" in message


def test_a_fine_label_column_of_the_wrong_size_is_refused(tmp_path, fresh_cache, parts):
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=FINE[:50])}
    )
    rows = {"img": [{"bytes": png(im), "path": None} for im in parts["test"]["images"][:3]],
            "fine_label": [0, 1, 2]}  # fmt: skip
    path = tmp_path / "cifar100" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    with pytest.raises(DataError, match="'fine_label' column has 50 classes; CIFAR-100 has 100"):
        load_cifar100("test", tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "no-fine-labels"])
def test_a_damaged_batch_file_is_named(tmp_path, fresh_cache, parts, offline, damage):
    folder = tmp_path / "cifar-100-python"
    write_batches(folder, parts)
    if damage == "truncated":
        (folder / "test").write_bytes((folder / "test").read_bytes()[:500])
    else:
        batch = pickle.loads((folder / "test").read_bytes())
        del batch["fine_labels"]
        (folder / "test").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError) as info:
        load_cifar100("test", tmp_path)
    assert str(info.value).startswith(f"{folder / 'test'} is not a readable CIFAR-100 batch file (")
    assert not (fresh_cache / "datasets" / "cifar100").exists()


def test_labels_outside_the_classes_are_refused(tmp_path, fresh_cache, parts, offline):
    parts["test"]["fine"][0] = 100
    write_batches(tmp_path / "cifar-100-python", {"test": parts["test"], "train": parts["train"]})
    with pytest.raises(
        DataError, match=r"CIFAR-100 test from .* is not CIFAR-100.*labels in 0\.\.99"
    ):
        load_cifar100("test", tmp_path)


def test_a_100_class_model_trains_on_the_loader(hub_mirror):
    ds = load_dataset("cifar100", "train", hub_mirror)
    mean, std = NORMALIZATION["cifar100"]
    assert mean == (0.5071, 0.4865, 0.4409) and std == (0.2673, 0.2564, 0.2762)
    loader = TensorLoader(ds, 16, device=torch.device("cpu"), train=True, crop_padding=4,
                          flip=True, mean=mean, std=std)  # fmt: skip
    torch.manual_seed(0)
    model = create_model("resnet20", block=conv_norm_factory("batchnorm"),
                         num_classes=len(ds.classes))  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    for x, y in loader:
        logits = model(x)
        assert logits.shape == (16, 100)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        seen += y.tolist()
    labels = ds.labels.tolist()
    assert len(seen) == 32 and set(seen) <= set(labels)  # two full batches of the 40 images
    assert max(labels) >= 10  # labels past CIFAR-10's range reach the 100-way head
