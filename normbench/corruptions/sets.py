"""CIFAR-10-C in the official layout: read the released files, or generate and cache them.

Layout (Hendrycks & Dietterich 2019): ``<corruption>.npy`` uint8 (5 R, 32, 32, 3) with the five
severities stacked in blocks of R test images in the original test order (R = 10,000 in the
release), and ``labels.npy`` (5 R,).

Official files under the data directory (``CIFAR-10-C/`` or ``cifar10-c/``) are used when present,
after their shape, dtype, length and labels are checked. Otherwise normbench generates the set
with its own engine into the cache, with a ``manifest.json`` (seed, parameter-table version,
engine version, SHA-256 of every file): a cache made by another table or engine version is
regenerated, never mixed with new files, and a warning says which versions it had. Each image's
random numbers depend on (seed, corruption, severity, test index) only, so the files do not
depend on the batch size; a GPU's arithmetic need not round as the CPU's does (CUDA divides by a
scalar as a multiplication by its reciprocal, for one), so a set made on a GPU names it in its
source.

A budget may evaluate a fixed, seeded subset of the test images per (corruption, severity):
official files are then indexed; a generated subset is cached in a directory of its own
(``cifar10-c-subset<n>-seed<s>``) holding only those rows.

A run on a GPU need not write the 950,000 images first: :func:`corruption_images` gives it a
:class:`StreamedSet` there, which corrupts each (corruption, severity) on demand on the device
from the test images held on it, and writes nothing. On the CPU the set is generated into the
cache once and reused by later runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from normbench import config, progress
from normbench.corruptions import ALL, CORRUPTIONS, SEVERITIES, TABLE_VERSION, check, corrupt
from normbench.corruptions.digital import jpeg_codec_on
from normbench.data import ArrayDataset, load_cifar10, private_tmp, sha256_file, subset_indices
from normbench.errors import DataError

# bump when a corruption's implementation changes its output. 3: random numbers drawn per image
# from (seed, corruption, severity, index); motion blur and snow quantised as ImageMagick 6 Q16.
ENGINE_VERSION = 3
N_TEST = 10_000
OFFICIAL_DIRS = ("CIFAR-10-C", "cifar10-c", "cifar10/CIFAR-10-C")
GENERATION_BATCH = 1000
#: Images a streamed set corrupts at a time on its device: large batches keep a GPU busy between
#: the per-image random draws on the CPU; the float64 intermediates of 5,000 CIFAR images take a
#: few GB at most. Random numbers are drawn per image, so the batch changes nothing in the bytes.
STREAM_BATCH = 5000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorruptedSet:
    """A CIFAR-10-C set on disk: ``rows`` images per severity in its files, and ``indices`` (the
    test-set positions evaluated; None = all) to select from them when the files are complete."""

    root: Path
    manifest: dict

    @property
    def source(self) -> str:
        return self.manifest["source"]

    @property
    def rows(self) -> int:
        return self.manifest.get("rows", N_TEST)

    @property
    def indices(self) -> list[int] | None:
        return self.manifest.get("indices")

    @property
    def images_per_pair(self) -> int:
        return self.rows if self.indices is None else len(self.indices)

    @property
    def engine_version(self) -> int | None:
        """The engine version that generated the files (None for the official release)."""
        return self.manifest.get("engine_version")

    def load(self, name: str, severity: int) -> ArrayDataset:
        """The evaluated test images of one (corruption, severity), (N,3,32,32) uint8."""
        check(name, severity)
        path = self.root / f"{name}.npy"
        if not path.exists():
            raise DataError(f"{path} is missing from the CIFAR-10-C set in {self.root}.")
        block = slice(self.rows * (severity - 1), self.rows * severity)
        images = np.load(path, mmap_mode="r")[block]
        labels = np.load(self.root / "labels.npy", mmap_mode="r")[block]
        if self.indices is not None and self.rows == N_TEST:  # a subset of complete files
            images, labels = images[self.indices], labels[self.indices]
        tensor = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous()
        classes = tuple(self.manifest.get("classes", ()))
        labels_t = torch.from_numpy(np.array(labels, dtype=np.int64))
        return ArrayDataset(tensor, labels_t, classes, f"{self.source}:{path}")


def _jpeg_note(codec: str) -> str:
    """What a set's source adds when its JPEG images did not come from libjpeg."""
    return "" if codec == "libjpeg" else f", jpeg_compression by {codec}"


class StreamedSet:
    """CIFAR-10-C made on demand on ``device``: :meth:`load` corrupts the evaluated test images
    (held on the device from the first load) at one (corruption, severity) and returns them
    there; nothing is written. The bytes are those a generated set of the same seed holds, when
    the device computes as the CPU does (and libjpeg makes the JPEG images)."""

    def __init__(
        self,
        test: ArrayDataset,
        *,
        seed: int = 0,
        indices: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = STREAM_BATCH,
    ) -> None:
        self.device = torch.device(device)
        self.seed, self.batch_size = seed, batch_size
        images, labels = test.images, test.labels
        if indices is not None:
            images, labels = images[indices], labels[indices]
        self._images, self._labels = images, labels  # moved to the device on the first load
        # the images' test indices fix their random numbers; a list, read on the CPU
        self.positions = list(range(len(labels))) if indices is None else indices.tolist()
        self.classes = tuple(test.classes)
        self.jpeg_codec = jpeg_codec_on(self.device)
        self.manifest = {
            "source": self.source,
            "seed": seed,
            "table_version": TABLE_VERSION,
            "engine_version": ENGINE_VERSION,
            "device": str(self.device),
            "jpeg_codec": self.jpeg_codec,
            "rows": len(labels),
            "indices": None if indices is None else indices.tolist(),
            "classes": list(self.classes),
            "streamed": True,
        }

    root = None  # nothing on disk

    @property
    def source(self) -> str:
        return (
            f"normbench engine v{ENGINE_VERSION}, generated on {self.device}, streamed"
            f"{_jpeg_note(self.jpeg_codec)}"
        )

    @property
    def rows(self) -> int:
        return len(self.positions)

    @property
    def indices(self) -> list[int] | None:
        return self.manifest["indices"]

    @property
    def images_per_pair(self) -> int:
        return self.rows

    @property
    def engine_version(self) -> int:
        return ENGINE_VERSION

    def load(self, name: str, severity: int) -> ArrayDataset:
        """The evaluated test images of one (corruption, severity), (N,3,32,32) uint8 on the
        device, corrupted now."""
        check(name, severity)
        if self._images.device != self.device:
            self._images = self._images.to(self.device)
            self._labels = self._labels.to(self.device)
        parts = []
        for lo in range(0, self.rows, self.batch_size):
            part = slice(lo, lo + self.batch_size)
            images, positions = self._images[part], self.positions[part]
            parts.append(corrupt(images, name, severity, self.seed, positions))
        source = f"{self.source}:{name}:{severity}"
        return ArrayDataset(torch.cat(parts), self._labels, self.classes, source)


def _check_array(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not a readable .npy file ({err}).") from None
    if array.dtype != np.uint8 or array.shape != shape:
        raise DataError(
            f"{path} has dtype {array.dtype} and shape {array.shape}; the CIFAR-10-C layout needs "
            f"uint8 of shape {shape}."
        )
    return array


def find_official(data_dir: Path | None) -> Path | None:
    if data_dir is None:
        return None
    for name in OFFICIAL_DIRS:
        if (data_dir / name / "labels.npy").exists():
            return data_dir / name
    return None


def open_official(
    root: Path, test_labels: torch.Tensor, indices: torch.Tensor | None = None
) -> CorruptedSet:
    """Validate the official release files in ``root`` (those present; all 19 are not required)."""
    labels = _check_array(root / "labels.npy", (5 * N_TEST,))
    if not np.array_equal(labels, np.tile(test_labels.numpy().astype(np.uint8), 5)):
        raise DataError(
            f"{root / 'labels.npy'} does not hold the CIFAR-10 test labels repeated five times; "
            "the files are not CIFAR-10-C in the original test order."
        )
    present = [n for n in ALL if (root / f"{n}.npy").exists()]
    for name in present:
        _check_array(root / f"{name}.npy", (5 * N_TEST, 32, 32, 3))
    manifest = {"source": "official", "root": str(root), "corruptions": present, "rows": N_TEST}
    manifest["indices"] = None if indices is None else indices.tolist()
    return CorruptedSet(root, manifest)


def _codec_matches(manifest: dict, name: str, codec: str) -> bool:
    """Whether the cached file of ``name`` was made with ``codec`` (only JPEG's depends on it;
    a manifest from before the choice existed means libjpeg)."""
    return name != "jpeg_compression" or manifest.get("jpeg_codec", "libjpeg") == codec


def _manifest_matches(manifest: dict, seed: int, indices: list[int] | None) -> bool:
    return (
        manifest.get("table_version") == TABLE_VERSION
        and manifest.get("engine_version") == ENGINE_VERSION
        and manifest.get("seed") == seed
        and manifest.get("indices") == indices
    )


def _stale_versions(manifest: dict) -> str | None:
    """What is out of date in a cached set's manifest, or None when its versions are current."""
    old = (manifest.get("engine_version"), manifest.get("table_version"))
    if old == (ENGINE_VERSION, TABLE_VERSION):
        return None
    return (
        f"it was made by engine version {old[0]} with parameter table {old[1]}; this is engine "
        f"version {ENGINE_VERSION} with parameter table {TABLE_VERSION}"
    )


def read_manifest(root: Path) -> dict | None:
    path = root / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        message = f"{path} is not a readable manifest ({err}); delete it to regenerate the set."
        raise DataError(message) from None


def open_generated(
    root: Path,
    seed: int,
    corruptions: tuple[str, ...] = ALL,
    indices: list[int] | None = None,
    jpeg_codec: str = "libjpeg",
) -> CorruptedSet | None:
    """The generated set in ``root`` if it is complete and was made by this engine and table
    (and its JPEG images by ``jpeg_codec``)."""
    manifest = read_manifest(root)
    if manifest is None or not _manifest_matches(manifest, seed, indices):
        return None
    files = manifest.get("sha256", {})
    for name in (*corruptions, "labels"):
        path = root / f"{name}.npy"
        if name not in files or not path.exists() or sha256_file(path) != files[name]:
            return None
        if not _codec_matches(manifest, name, jpeg_codec):
            return None
    return CorruptedSet(root, manifest)


def generated_root(subset: int = 0, subset_seed: int = 0) -> Path:
    name = f"cifar10-c-subset{subset}-seed{subset_seed}" if subset else "cifar10-c"
    return config.cache_dir() / "datasets" / name


def generate(
    root: Path,
    *,
    seed: int = 0,
    indices: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    data_dir: str | Path | None = None,
    corruptions: tuple[str, ...] = ALL,
    on_progress: Callable[[str, int, float], None] | None = None,
) -> CorruptedSet:
    """Generate CIFAR-10-C (of the test images at ``indices``; all by default) with the engine
    into ``root``, in the official layout, with a manifest. ``on_progress(name, severity,
    seconds)`` is called after each (corruption, severity); without it a progress bar on stderr
    shows images/s and the time left."""
    device = torch.device(device or "cpu")
    codec = jpeg_codec_on(device)
    test = load_cifar10("test", data_dir)
    images, labels = test.images, test.labels
    if indices is not None:
        images, labels = images[indices], labels[indices]
    index_list = None if indices is None else indices.tolist()
    rows = len(labels)
    root.mkdir(parents=True, exist_ok=True)
    old = read_manifest(root)
    reusable = old if old is not None and _manifest_matches(old, seed, index_list) else {}
    stale = _stale_versions(old) if old is not None else None
    if stale:
        log.warning("Regenerating the CIFAR-10-C cache in %s: %s.", root, stale)
    manifest = {
        # a GPU's floating point need not round as the CPU's does: sets made there say so
        "source": f"generated{'' if device.type == 'cpu' else f' on {device}'}{_jpeg_note(codec)}",
        "seed": seed,
        "table_version": TABLE_VERSION,
        "engine_version": ENGINE_VERSION,
        "batch_size": GENERATION_BATCH,
        "device": str(device),
        "jpeg_codec": codec,
        "rows": rows,
        "indices": index_list,
        "classes": list(test.classes),
        "seconds": {},
        "sha256": {},
    }
    labels_path = root / "labels.npy"
    np.save(labels_path, np.tile(labels.numpy().astype(np.uint8), 5))
    manifest["sha256"]["labels"] = sha256_file(labels_path)
    images = images.to(device)
    positions = torch.arange(rows) if indices is None else indices  # the images' test indices
    todo = []
    for name in corruptions:
        path, known = root / f"{name}.npy", reusable.get("sha256", {}).get(name)
        same_codec = _codec_matches(reusable, name, codec)
        if known and same_codec and path.exists() and sha256_file(path) == known:
            manifest["sha256"][name] = known
            manifest["seconds"][name] = reusable.get("seconds", {}).get(name)
        else:
            todo.append(name)
    # A caller's hook shows the progress its own way (the CLI's table); otherwise a bar does.
    bar = (
        contextlib.nullcontext(lambda n: None)
        if on_progress is not None
        else progress.task("generating CIFAR-10-C", total=len(todo) * len(SEVERITIES) * rows)
    )
    with bar as advance:
        for name in todo:
            _generate_file(root, name, images, positions, seed, manifest, on_progress, advance)
            _write_manifest(root, manifest)  # after each file: a stopped run keeps finished files
    _write_manifest(root, manifest)
    return CorruptedSet(root, manifest)


def _generate_file(
    root: Path,
    name: str,
    images: torch.Tensor,
    positions: torch.Tensor,
    seed: int,
    manifest: dict,
    on_progress: Callable[[str, int, float], None] | None,
    advance: Callable[[float], None],
) -> None:
    """Write ``<name>.npy`` (the five severities of ``images``) and record it in ``manifest``."""
    rows = len(images)
    path = root / f"{name}.npy"
    tmp = private_tmp(path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(5 * rows, 32, 32, 3))
    start = time.perf_counter()
    for severity in SEVERITIES:
        for lo in range(0, rows, GENERATION_BATCH):
            part = slice(lo, lo + GENERATION_BATCH)
            batch = corrupt(images[part], name, severity, seed, positions[part])
            first = rows * (severity - 1) + lo
            out[first : first + len(batch)] = batch.permute(0, 2, 3, 1).cpu().numpy()
            advance(len(batch))
        if on_progress is not None:
            on_progress(name, severity, time.perf_counter() - start)
    out.flush()
    del out
    os.replace(tmp, path)
    manifest["seconds"][name] = time.perf_counter() - start
    manifest["sha256"][name] = sha256_file(path)


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = private_tmp(root / "manifest.json")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, root / "manifest.json")


def prepare_cifar10_c(
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    subset: int = 0,
    subset_seed: int = 0,
    device: torch.device | str | None = None,
    corruptions: tuple[str, ...] = ALL,
    on_progress: Callable[[str, int, float], None] | None = None,
    stream: bool = False,
) -> CorruptedSet | StreamedSet:
    """Official CIFAR-10-C if the data directory has it, else the cached generated set, else a
    new one: generated on ``device`` into the cache or, with ``stream``, a :class:`StreamedSet`
    on ``device`` (nothing written). ``subset`` > 0 evaluates that many seeded test images per
    (corruption, severity)."""
    for name in corruptions:
        CORRUPTIONS.get(name)
    device = torch.device(device or "cpu")
    indices = subset_indices(N_TEST, subset, subset_seed)
    official = find_official(config.data_dir(data_dir))
    if official is not None:
        return open_official(official, load_cifar10("test", data_dir).labels, indices)
    root = generated_root(subset if indices is not None else 0, subset_seed)
    index_list = None if indices is None else indices.tolist()
    cached = open_generated(root, seed, corruptions, index_list, jpeg_codec_on(device))
    if cached is not None:
        return cached
    if stream:
        test = load_cifar10("test", data_dir)
        return StreamedSet(test, seed=seed, indices=indices, device=device)
    return generate(root, seed=seed, indices=indices, device=device, data_dir=data_dir,
                    corruptions=corruptions, on_progress=on_progress)  # fmt: skip


def corruption_images(
    data_dir: str | Path | None = None,
    *,
    subset: int = 0,
    subset_seed: int = 0,
    seed: int = 0,
    device: torch.device | str | None = None,
    corruptions: tuple[str, ...] = ALL,
) -> CorruptedSet | StreamedSet:
    """The CIFAR-10-C images an evaluation on ``device`` reads: the official files, else a
    complete cached set, else streamed on a CUDA device (each pair generated there when loaded,
    nothing written), else generated on the CPU into the cache once for later runs."""
    device = torch.device(device or "cpu")
    return prepare_cifar10_c(data_dir, seed=seed, subset=subset, subset_seed=subset_seed,
                             device=device, corruptions=corruptions,
                             stream=device.type == "cuda")  # fmt: skip
