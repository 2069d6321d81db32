"""ImageNet-C: corrupted validation images, from the official release or generated on the fly.

The official release (Hendrycks & Dietterich 2019) lays out ``<corruption>/<severity>/<wnid>/
<file>.JPEG`` of the 224-px validation images (after Resize(256) + CenterCrop(224)); when it is
under the data directory (``ImageNet-C/`` or ``imagenet-c/``) the evaluated images are read from
it. Otherwise they are generated from the decoded validation images with the engine's ImageNet
table, batch by batch, each image's random numbers seeded by (seed, corruption, severity, its
index in the validation set); a 224-px corrupted set is too large to cache for every run (150 KB
per image and pair), so only the seed and the engine version are kept.

mCE on ImageNet-C is normalised by AlexNet's errors (``ALEXNET_ERRORS``, averaged over the five
severities, as published with the benchmark).
"""

from __future__ import annotations

from pathlib import Path

import torch

from normbench import config
from normbench.corruptions import check, corrupt
from normbench.corruptions.sets import ENGINE_VERSION
from normbench.data import ArrayDataset, subset_indices
from normbench.errors import DataError

OFFICIAL_DIRS = ("ImageNet-C", "imagenet-c")
GENERATION_BATCH = 50

ALEXNET_ERRORS = {
    "gaussian_noise": 0.886428, "shot_noise": 0.894468, "impulse_noise": 0.922640,
    "defocus_blur": 0.819880, "glass_blur": 0.826268, "motion_blur": 0.785948,
    "zoom_blur": 0.798360, "snow": 0.866816, "frost": 0.826572, "fog": 0.819324,
    "brightness": 0.564592, "contrast": 0.853204, "elastic_transform": 0.646056,
    "pixelate": 0.717840, "jpeg_compression": 0.606500, "speckle_noise": 0.845388,
    "gaussian_blur": 0.787108, "spatter": 0.717512, "saturate": 0.658248,
}  # fmt: skip


class ImageNetC:
    """The corrupted versions of a fixed, seeded subset of validation images."""

    def __init__(
        self,
        val: ArrayDataset,
        data_dir: str | Path | None = None,
        *,
        subset: int = 0,
        subset_seed: int = 0,
        seed: int = 0,
    ) -> None:
        self.indices = subset_indices(len(val), subset, subset_seed)
        self.val = val if self.indices is None else val.subset(subset, subset_seed)
        self.seed = seed
        root = config.data_dir(data_dir)
        self.official = next(
            (root / d for d in OFFICIAL_DIRS if root is not None and (root / d).is_dir()), None
        )

    @property
    def source(self) -> str:
        return f"official:{self.official}" if self.official else f"generated:seed{self.seed}"

    @property
    def images_per_pair(self) -> int:
        return len(self.val)

    @property
    def engine_version(self) -> int | None:
        """The engine version that generates the images (None for the official release)."""
        return None if self.official else ENGINE_VERSION

    def load(self, name: str, severity: int) -> ArrayDataset:
        check(name, severity)
        if self.official is not None:
            return self._load_official(name, severity)
        positions = torch.arange(len(self.val)) if self.indices is None else self.indices
        step = GENERATION_BATCH
        parts = [slice(lo, lo + step) for lo in range(0, len(self.val), step)]
        batches = [
            corrupt(self.val.images[part], name, severity, self.seed, positions[part])
            for part in parts
        ]
        return ArrayDataset(torch.cat(batches), self.val.labels, self.val.classes, self.source)

    def _load_official(self, name: str, severity: int) -> ArrayDataset:
        from torchvision import datasets as tv_datasets
        from torchvision.transforms.functional import pil_to_tensor

        folder_path = self.official / name / str(severity)
        if not folder_path.is_dir():
            raise DataError(
                f"{folder_path} is missing from the ImageNet-C release in {self.official}."
            )
        folder = tv_datasets.ImageFolder(str(folder_path))
        if tuple(folder.classes) != tuple(self.val.classes):
            raise DataError(f"{folder_path} does not have the validation set's class folders.")
        picks = range(len(folder)) if self.indices is None else self.indices.tolist()
        images = []
        for i in picks:
            path = folder.samples[i][0]
            image = pil_to_tensor(folder.loader(path))
            if image.shape != (3, 224, 224):
                raise DataError(
                    f"{path} is {tuple(image.shape)}; ImageNet-C images are 224x224 RGB."
                )
            images.append(image)
        labels = torch.tensor([folder.targets[i] for i in picks], dtype=torch.int64)
        return ArrayDataset(torch.stack(images), labels, self.val.classes, self.source)
