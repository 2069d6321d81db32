"""The ImageNet side: ImageFolder decoding, torchvision ResNets with normbench norms, ImageNet-C
from the official folder layout or generated, and the imagenet-c smoke suite on real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import skip_or_fail
from helpers import leaderboard_json, smoke_run
from PIL import Image
from sqlalchemy import select

from normbench.corruptions.imagenet_c import ImageNetC
from normbench.data import ArrayDataset, load_dataset
from normbench.errors import DataError
from normbench.store import Metric, Run, open_store


@pytest.fixture
def imagenette(cifar_dir):
    if not (cifar_dir / "imagenette-mini" / "val").is_dir():
        skip_or_fail(f"imagenette-mini not found next to the CIFAR-10 mirror (in {cifar_dir})")
    return cifar_dir


def test_imagefolder_decodes_with_the_imagenet_eval_transform(imagenette):
    val = load_dataset("imagenette-mini", "test")
    assert val.images.shape == (500, 3, 224, 224) and val.images.dtype == torch.uint8
    assert val.classes[0] == "n01440764" and len(val.classes) == 10
    assert val.labels.bincount().tolist() == [50] * 10


def test_missing_imagefolder_says_where_to_put_it(tmp_path, fresh_cache):
    with pytest.raises(DataError, match="ImageFolder layout"):
        load_dataset("imagenet", "train", tmp_path)


def _jpeg(path, size=224, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, quality=95)


def test_official_imagenet_c_folders_are_read(tmp_path):
    classes = ("n01440764", "n02102040")
    val = ArrayDataset(torch.zeros(4, 3, 224, 224, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                       classes, "test")  # fmt: skip
    for k, wnid in enumerate(classes):
        for j in range(2):
            _jpeg(tmp_path / "ImageNet-C" / "fog" / "3" / wnid / f"ILSVRC2012_val_{k}{j}.JPEG")
    source = ImageNetC(val, tmp_path)
    fog = source.load("fog", 3)
    assert source.source.startswith("official:")
    assert fog.images.shape == (4, 3, 224, 224) and fog.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(DataError, match="snow/1 is missing"):
        source.load("snow", 1)
    _jpeg(tmp_path / "ImageNet-C" / "fog" / "3" / classes[1] / "ILSVRC2012_val_19.JPEG", size=100)
    with pytest.raises(DataError, match=r"ILSVRC2012_val_19.JPEG is \(3, 100, 100\)"):
        source.load("fog", 3)


def test_generated_imagenet_c_is_seeded(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 224, 224), dtype=torch.uint8, generator=g)
    val = ArrayDataset(images, torch.arange(6) % 2, ("a", "b"), "test")
    a = ImageNetC(val, tmp_path, subset=4).load("gaussian_noise", 2)
    b = ImageNetC(val, tmp_path, subset=4).load("gaussian_noise", 2)
    assert a.images.shape == (4, 3, 224, 224) and torch.equal(a.images, b.images)
    assert not torch.equal(
        a.images, ImageNetC(val, tmp_path, subset=4, seed=1).load("gaussian_noise", 2).images
    )


def test_imagenet_c_smoke_suite_on_imagenette(imagenette, tmp_path):
    db = str(tmp_path / "r.db")
    result = smoke_run(f"--db={db}", suite="imagenet-c")
    assert result.exit_code == 0, result.output
    with open_store(f"sqlite:///{db}").session() as s:
        run = s.scalars(select(Run)).one()
        names = s.execute(
            select(Metric.name, Metric.corruption, Metric.severity).where(Metric.run_id == run.id)
        ).all()
    assert run.model == "resnet18" and run.dataset == "imagenette-mini"
    assert len({(c, sev) for name, c, sev in names if name == "accuracy" and sev > 0}) == 95
    assert run.provenance["mce_reference"].startswith("AlexNet")
    assert run.provenance["corruption_set"] == "generated:seed0"
    assert {n for n, _, _ in names} >= {"mce", "corruption_accuracy"}
    assert "relative_mce" not in {n for n, _, _ in names}
    rows = leaderboard_json(db, suite="imagenet-c")
    assert rows[0]["norm"] == "batchnorm" and rows[0]["mce_mean"] > 0
