"""Datasets as uint8 tensors, their checksummed cache, and the tensor-resident training loader.

Sources for CIFAR-10 and CIFAR-100, in order:
1. a local mirror under the data directory (``--data-dir`` / ``NORMBENCH_DATA_DIR``), either in the
   Hugging Face hub parquet layout (``cifar10/**/train-*.parquet``, ``test-*.parquet``, as
   ``uoft-cs/cifar10`` publishes it; ``cifar100/**`` for ``uoft-cs/cifar100``, whose task labels
   are its 100 fine classes) or torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``
   folder. Each dataset reads only its own files: parquet files directly in the data directory
   count only when they hold the dataset's label column;
2. torchvision's official download into the cache directory, when online.

Images are decoded once into ``(N, 3, 32, 32)`` uint8 tensors and cached as ``.npy`` files next to
a manifest holding their SHA-256; a cache file that fails its checksum is rebuilt, never used.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import pickle
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from normbench import config, progress
from normbench.errors import DataError

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CACHE_FORMAT = 1  # bump when the cached arrays' meaning changes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArrayDataset:
    """A labelled image set held as tensors: ``images`` uint8 (N,3,H,W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> ArrayDataset:
        """A fixed, seeded subset of ``n`` examples (the whole set when ``n`` is 0 or too large)."""
        idx = subset_indices(len(self), n, seed)
        if idx is None:
            return self
        return ArrayDataset(self.images[idx], self.labels[idx], self.classes, self.source)


def subset_indices(total: int, n: int, seed: int = 0) -> torch.Tensor | None:
    """Sorted indices of a seeded subset of ``n`` out of ``total`` (None: take everything)."""
    if not n or n >= total:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=g)[:n].sort().values


# --- checksummed tensor cache -------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_paths(name: str, split: str) -> tuple[Path, Path, Path]:
    root = config.cache_dir() / "datasets" / name
    return root / f"{split}-images.npy", root / f"{split}-labels.npy", root / f"{split}.json"


def _read_cache(name: str, split: str) -> ArrayDataset | None:
    """The cached split, or None when there is none or it is damaged (then it is decoded again)."""
    images_path, labels_path, manifest_path = _cache_paths(name, split)
    if not manifest_path.exists():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return None
        for path in (images_path, labels_path):
            if sha256_file(path) != manifest["sha256"][path.name]:
                raise ValueError(f"{path.name} fails its checksum")
        images = torch.from_numpy(np.load(images_path))
        labels = torch.from_numpy(np.load(labels_path)).long()
        classes, source = tuple(manifest["classes"]), manifest["source"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("The cached %s %s in %s is damaged (%s); decoding it again.", name, split,
                    manifest_path.parent, err)  # fmt: skip
        return None
    return ArrayDataset(images, labels, classes, source)


def private_tmp(path: Path) -> Path:
    """A temporary file beside ``path`` that no other process writes: several processes may fill
    one cache at once (``normbench run`` processes sharing a suite), each writes its own file and
    renames it into place atomically; their contents are the same."""
    return path.with_name(f"{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{path.suffix}")


def _write_cache(name: str, split: str, ds: ArrayDataset) -> None:
    images_path, labels_path, manifest_path = _cache_paths(name, split)
    images_path.parent.mkdir(parents=True, exist_ok=True)
    sums = {}
    for path, array in ((images_path, ds.images.numpy()), (labels_path, ds.labels.numpy())):
        tmp = private_tmp(path)
        np.save(tmp, array)
        os.replace(tmp, path)
        sums[path.name] = sha256_file(path)
    manifest = {"format": CACHE_FORMAT, "source": ds.source, "classes": list(ds.classes)}
    manifest |= {"sha256": sums, "shape": list(ds.images.shape)}
    tmp = private_tmp(manifest_path)
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, manifest_path)


# --- CIFAR-10 and CIFAR-100 ---------------------------------------------------------------------


@dataclass(frozen=True)
class CifarSpec:
    """What tells one CIFAR dataset's sources apart; the class names always come from its files."""

    name: str  # normbench's name, the mirror's parquet folder and the cache folder: "cifar10"
    title: str  # in messages: "CIFAR-10"
    hub_repo: str  # the Hugging Face dataset whose parquet layout a mirror copies
    label_column: str  # that layout's ClassLabel column of the task's labels
    batches_folder: str  # torchvision's folder of pickled batches
    batch_labels: str  # the batches' key of the task's labels
    torchvision_class: str  # the ``torchvision.datasets`` class that downloads it
    num_classes: int


CIFAR10_SPEC = CifarSpec(
    name="cifar10",
    title="CIFAR-10",
    hub_repo="uoft-cs/cifar10",
    label_column="label",
    batches_folder="cifar-10-batches-py",
    batch_labels="labels",
    torchvision_class="CIFAR10",
    num_classes=10,
)
# CIFAR-100 labels every image twice, with one of 100 fine classes and one of 20 coarse ones; the
# benchmark's task is the 100-class one.
CIFAR100_SPEC = CifarSpec(
    name="cifar100",
    title="CIFAR-100",
    hub_repo="uoft-cs/cifar100",
    label_column="fine_label",
    batches_folder="cifar-100-python",
    batch_labels="fine_labels",
    torchvision_class="CIFAR100",
    num_classes=100,
)


def _unreadable(path: Path, what: str, err: BaseException) -> DataError:
    """The error for a mirror file that cannot be used: which file, why, and what to do."""
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
    # pyarrow starts with "Could not open Parquet input source '<path>': "; the path is named
    # at the start of the message already.
    cause = cause.split(f"'{path}': ", 1)[-1][:200].rstrip(".")
    return DataError(
        f"{path} {what} ({type(err).__name__}: {cause}). The file is damaged or incomplete: "
        "restore it from the mirror it was copied from (compare it with the mirror's checksums), "
        "or point --data-dir / NORMBENCH_DATA_DIR at an intact mirror."
    )


def _layout_problem(features: dict, spec: CifarSpec) -> str | None:
    """What keeps parquet columns with these ``datasets`` features from being ``spec``'s hub
    layout (None: nothing)."""
    import datasets

    label = features.get(spec.label_column)
    has_image = any(isinstance(f, datasets.Image) for f in features.values())
    if has_image and isinstance(label, datasets.ClassLabel):
        if label.num_classes == spec.num_classes:
            return None
        return (
            f"its {spec.label_column!r} column has {label.num_classes} classes; "
            f"{spec.title} has {spec.num_classes}"
        )
    return (
        f"it needs an Image column and a ClassLabel column {spec.label_column!r} (as "
        f"{spec.hub_repo} has), and has {dict(features)}"
    )


def _find_parquet(root: Path, spec: CifarSpec, split: str) -> list[Path]:
    """The split's shards: those in the dataset's own folder (``<root>/cifar10/**``), else the
    files directly in ``root`` when they hold the dataset's labels. Parquet files of another
    dataset (a ``cifar100/`` folder beside ``cifar10/``) are never taken for this one."""
    files = sorted((root / spec.name).glob(f"**/{split}-*.parquet"))
    if files:
        return files
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(root.glob(f"{split}-*.parquet"))
    for path in files:
        try:
            features = datasets.Features.from_arrow_schema(pq.read_schema(path))
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(path, "cannot be read as a parquet file", err) from None
        if _layout_problem(features, spec) is not None:
            log.debug("%s does not hold %s's labels; not used for it.", path, spec.title)
            return []
    return files


def _read_parquet(files: list[Path]):
    """The parquet files as one Arrow table, the ``datasets`` features of its columns, and the
    index of each file's first row."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for path in files:
        try:
            tables.append(pq.read_table(path))
        except (pa.ArrowException, OSError) as err:
            raise _unreadable(path, "cannot be read as a parquet file", err) from None
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowException as err:
        raise DataError(
            f"The parquet files {', '.join(str(f) for f in files)} do not share one schema "
            f"({err}); a mirror folder holds the shards of one dataset only."
        ) from None
    # The hub layout keeps its feature types (Image, ClassLabel) in the schema's metadata.
    starts = np.cumsum([0] + [len(t) for t in tables[:-1]])
    return table, datasets.Features.from_arrow_schema(table.schema), starts


def _decode_parquet(files: list[Path], split: str, spec: CifarSpec) -> ArrayDataset:
    """Decode the hub parquet layout (an Image column of PNG bytes, ``spec.label_column``).

    Reading the files with pyarrow takes well under a second; the time goes into decoding the
    PNGs (50,000 for the training set), which shows a bar with its rate and time left.
    """
    import datasets
    from PIL import Image

    table, features, starts = _read_parquet(files)
    problem = _layout_problem(features, spec)
    if problem is not None:
        raise DataError(
            f"{files[0]} is not in the Hugging Face image-classification layout of {spec.title}: "
            f"{problem}."
        )
    image_column = next(k for k, f in features.items() if isinstance(f, datasets.Image))
    classes = tuple(features[spec.label_column].names)
    encoded = table.column(image_column).combine_chunks().field("bytes")
    labels = table.column(spec.label_column).to_numpy().astype(np.int64)
    images = np.empty((len(table), 32, 32, 3), dtype=np.uint8)
    chunk = 500
    with progress.task(f"decoding {spec.title} {split}", total=len(table)) as advance:
        for lo in range(0, len(table), chunk):
            for i, png in enumerate(encoded.slice(lo, chunk).to_pylist(), start=lo):
                path = files[int(np.searchsorted(starts, i, side="right")) - 1]  # row i's file
                if png is None:
                    raise DataError(
                        f"{path}: row {i} holds no image bytes (the mirror must embed the PNG "
                        f"images, as {spec.hub_repo} does)."
                    )
                try:
                    with Image.open(io.BytesIO(png)) as im:
                        size = im.size
                        if size == (32, 32):
                            images[i] = np.asarray(im.convert("RGB"))
                except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad images
                    raise _unreadable(path, f"holds an undecodable image in row {i}", err) from None
                if size != (32, 32):
                    raise DataError(
                        f"{path}: row {i} is a {size[0]}x{size[1]} image; {spec.title} images "
                        "are 32x32."
                    )
            advance(min(chunk, len(table) - lo))
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(tensor, torch.from_numpy(labels), classes, f"parquet:{files[0].parent}")


def _find_batches(root: Path, spec: CifarSpec) -> Path | None:
    """torchvision's batches folder of the dataset in ``root`` or in its own folder there."""
    for base in (root, root / spec.name):
        if (base / spec.batches_folder).is_dir():
            return base / spec.batches_folder
    return None


# Whatever a damaged or foreign pickle makes ``pickle.load`` or the batch's contents raise.
_PICKLE_ERRORS = (
    OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
    AttributeError, ImportError,
)  # fmt: skip


def _unpickle(path: Path) -> dict[str, object]:
    # The official batches are Python 2 pickles: latin-1 decodes their strings (and numpy's array
    # bytes) as torchvision does. Keys are read as text whichever way a file was written.
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    if not isinstance(entry, dict):
        raise TypeError(f"it holds a {type(entry).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _read_batches(folder: Path, spec: CifarSpec, split: str) -> ArrayDataset:
    """Read torchvision's folder of pickled batches, in the format of the official archives:
    per batch a dict of ``data`` (N, 3072) uint8 rows (channels, then rows, then columns) and the
    labels (``spec.batch_labels``), and a meta file with the class names.

    The files are read here rather than through torchvision's dataset class, which accepts only
    files whose MD5 is the official archive's; a mirror is checked by what it decodes to instead
    (shapes, labels, class count), and the decoded cache by its SHA-256.
    """
    from torchvision import datasets as tv_datasets

    tv_class = getattr(tv_datasets, spec.torchvision_class)
    batches = [
        name for name, _md5 in (tv_class.train_list if split == "train" else tv_class.test_list)
    ]
    images, labels = [], []
    path = folder
    try:
        for name in batches:
            path = folder / name
            entry = _unpickle(path)
            data = np.asarray(entry["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"its data is {data.dtype} {data.shape}, not uint8 (N, 3072)")
            images.append(data.reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[spec.batch_labels], dtype=np.int64))
            if len(labels[-1]) != len(images[-1]):
                raise ValueError(f"{len(images[-1])} images but {len(labels[-1])} labels")
        path = folder / tv_class.meta["filename"]
        names = _unpickle(path)[tv_class.meta["key"]]
        classes = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    except _PICKLE_ERRORS as err:
        raise _unreadable(path, f"is not a readable {spec.title} batch file", err) from None
    tensor = torch.from_numpy(np.concatenate(images))
    return ArrayDataset(
        tensor, torch.from_numpy(np.concatenate(labels)), classes, f"batches:{folder}"
    )


def _download(spec: CifarSpec, split: str) -> ArrayDataset:
    """The official archive, fetched (once) by torchvision into the cache directory, which checks
    its MD5 and the extracted files' before reading them."""
    from torchvision import datasets as tv_datasets

    root = config.cache_dir() / "downloads"
    tv_class = getattr(tv_datasets, spec.torchvision_class)
    ds = tv_class(str(root), train=split == "train", download=True)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(ds.targets, dtype=torch.int64)  # CIFAR-100's fine labels
    return ArrayDataset(images, labels, tuple(ds.classes), f"torchvision:{root}")


def _missing_message(spec: CifarSpec, data_dir: Path | None, reason: str) -> str:
    where = f"in {data_dir}" if data_dir else "(no data directory set)"
    return (
        f"{spec.title} is not available: no local mirror was found {where}, and the official "
        f"download failed ({reason}). Either connect to the internet and run `normbench data "
        f"prepare {spec.name}` (torchvision downloads it into the cache directory), or put a "
        f"mirror in the Hugging Face parquet layout ({spec.name}/train-*.parquet and "
        f"{spec.name}/test-*.parquet, as published by {spec.hub_repo}) or torchvision's "
        f"{spec.batches_folder} folder under a directory and pass it with --data-dir or "
        "NORMBENCH_DATA_DIR."
    )


def _build_cifar(spec: CifarSpec, split: str, data_dir: Path | None) -> ArrayDataset:
    """The split from the first source that has it: a parquet mirror, a batches folder, the
    official download."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DataError(f"The data directory {data_dir} does not exist.")
        files = _find_parquet(data_dir, spec, split)
        if files:
            return _decode_parquet(files, split, spec)
        folder = _find_batches(data_dir, spec)
        if folder is not None:
            return _read_batches(folder, spec, split)
    try:
        return _download(spec, split)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; bad archives raise Runtime
        raise DataError(_missing_message(spec, data_dir, str(err) or type(err).__name__)) from None


def _check_cifar(ds: ArrayDataset, spec: CifarSpec, split: str) -> None:
    """Refuse a split that is not the dataset: the class count is the dataset's, the classes
    themselves come from its files."""
    ok = (
        ds.images.ndim == 4
        and ds.images.dtype == torch.uint8
        and tuple(ds.images.shape[1:]) == (3, 32, 32)
        and len(ds) > 0
        and len(ds.labels) == len(ds.images)
        and len(ds.classes) == spec.num_classes
        and 0 <= int(ds.labels.min()) <= int(ds.labels.max()) < len(ds.classes)
    )
    if not ok:
        raise DataError(
            f"{spec.title} {split} from {ds.source} is not {spec.title}: images of shape "
            f"{tuple(ds.images.shape)}, {len(ds.labels)} labels, {len(ds.classes)} classes "
            f"(expected (N, 3, 32, 32) uint8 images, N labels in 0..{spec.num_classes - 1} and "
            f"{spec.num_classes} classes)."
        )


def _load_cifar(spec: CifarSpec, split: str, data_dir: str | Path | None) -> ArrayDataset:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cached = _read_cache(spec.name, split)
    if cached is not None:
        return cached
    ds = _build_cifar(spec, split, config.data_dir(data_dir))
    _check_cifar(ds, spec, split)
    _write_cache(spec.name, split, ds)
    return ds


def load_cifar10(split: str, data_dir: str | Path | None = None) -> ArrayDataset:
    """CIFAR-10 ``split`` ("train" or "test") as uint8 tensors, from the cache when it is valid."""
    return _load_cifar(CIFAR10_SPEC, split, data_dir)


def load_cifar100(split: str, data_dir: str | Path | None = None) -> ArrayDataset:
    """CIFAR-100 ``split`` ("train" or "test") with its 100 fine labels, as uint8 tensors, from the
    cache when it is valid."""
    return _load_cifar(CIFAR100_SPEC, split, data_dir)


# --- ImageFolder datasets (ImageNet and subsets) -------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGEFOLDER_DIRS = {"imagenet": ("imagenet", "ILSVRC2012"), "imagenette-mini": ("imagenette-mini",)}
# The tensor-resident loader keeps a dataset decoded in memory (150 KB per 224-px image): fine for
# subsets such as imagenette, not for the 1.28M ImageNet training images.
MAX_RESIDENT_IMAGES = 100_000


def _imagefolder_root(name: str, split: str, data_dir: Path | None) -> Path:
    candidates = [data_dir / d / split for d in IMAGEFOLDER_DIRS[name]] if data_dir else []
    for path in candidates:
        if path.is_dir():
            return path
    where = ", ".join(str(c) for c in candidates) or "(no data directory set)"
    raise DataError(
        f"{name} {split} images not found (looked in {where}). Put the dataset in the ImageFolder "
        f"layout ({name}/train/<wnid>/*.JPEG and {name}/val/<wnid>/*.JPEG) under a directory "
        "and pass it with --data-dir or NORMBENCH_DATA_DIR."
    )


def _decode_imagefolder(root: Path, name: str) -> ArrayDataset:
    """Decode an ImageFolder split with the ImageNet evaluation transform, Resize(256) +
    CenterCrop(224), into (N, 3, 224, 224) uint8."""
    from torchvision import datasets as tv_datasets
    from torchvision import transforms

    folder = tv_datasets.ImageFolder(str(root))
    if len(folder) > MAX_RESIDENT_IMAGES:
        raise DataError(
            f"{root} holds {len(folder):,} images; normbench keeps datasets decoded in memory and "
            f"supports up to {MAX_RESIDENT_IMAGES:,} per split. Use a subset of the images."
        )
    transform = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()]
    )
    images = torch.empty((len(folder), 3, 224, 224), dtype=torch.uint8)
    with progress.task(f"decoding {name} {root.name}", total=len(folder)) as advance:
        for i, (path, _) in enumerate(folder.samples):
            try:
                images[i] = transform(folder.loader(path))
            except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad images
                raise _unreadable(Path(path), "is not a readable image", err) from None
            advance(1)
    labels = torch.tensor(folder.targets, dtype=torch.int64)
    return ArrayDataset(images, labels, tuple(folder.classes), f"imagefolder:{root}")


def load_imagefolder(name: str, split: str, data_dir: str | Path | None = None) -> ArrayDataset:
    """An ImageFolder dataset split ("train" or "val"; "test" means "val") as uint8 tensors."""
    split = "val" if split == "test" else split
    cached = _read_cache(name, split)
    if cached is not None:
        return cached
    ds = _decode_imagefolder(_imagefolder_root(name, split, config.data_dir(data_dir)), name)
    _write_cache(name, split, ds)
    return ds


DATASETS = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagenet": functools.partial(load_imagefolder, "imagenet"),
    "imagenette-mini": functools.partial(load_imagefolder, "imagenette-mini"),
}
#: Per-channel mean and std used to normalize each dataset's images.
NORMALIZATION = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "imagenette-mini": (IMAGENET_MEAN, IMAGENET_STD),
}


def load_dataset(name: str, split: str, data_dir: str | Path | None = None) -> ArrayDataset:
    try:
        loader = DATASETS[name]
    except KeyError:
        raise DataError(f"Unknown dataset {name!r}; known: {', '.join(DATASETS)}.") from None
    return loader(split, data_dir)


# --- tensor-resident loader ---------------------------------------------------------------------


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``padding`` pixels with zero fill, for a whole batch at once.

    Equivalent to torchvision's ``RandomCrop(size, padding)`` per image: two gathers (rows, then
    columns) on the zero-padded batch pick each image's own window.
    """
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    span = 2 * padding + 1
    offsets = torch.randint(0, span, (2, n), generator=generator, device=generator.device)
    dy, dx = offsets.to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    cols = dx[:, None] + torch.arange(w, device=images.device)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    draws = torch.rand(len(images), generator=generator, device=generator.device)
    flip = (draws < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class TensorLoader:
    """Batches from a dataset held as one uint8 tensor on the run device.

    Shuffling, random crops and flips are done batched on the device with an explicit generator,
    so there is no per-image Python or PIL work and the order is reproducible (and resumable, via
    the generator's state). With a generator on the loader's device (the default, and what the
    runners pass) the permutation, crop offsets and flip masks are drawn there, so on a GPU no
    batch and no random number crosses the bus; a CPU generator also works (its draws are
    copied). A CPU generator and a CUDA one with the same seed give different streams.
    Batches come out normalized, float32, channels_last.
    """

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        *,
        device: torch.device,
        train: bool,
        generator: torch.Generator | None = None,
        crop_padding: int = 0,
        flip: bool = False,
        mean: tuple[float, ...] = CIFAR10_MEAN,
        std: tuple[float, ...] = CIFAR10_STD,
        drop_last: bool | None = None,
    ) -> None:
        self.images = ds.images.to(device)
        self.labels = ds.labels.to(device)
        self.batch_size, self.device, self.train = batch_size, device, train
        self.generator = generator or torch.Generator(device=device).manual_seed(0)
        self.crop_padding, self.flip = crop_padding, flip
        self.drop_last = train if drop_last is None else drop_last
        std_t = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
        self.scale = 1.0 / std_t
        self.shift = -torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255 / std_t

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift, images.float(), self.scale)
        return x.contiguous(memory_format=torch.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self.generator, device=self.generator.device)
            order = order.to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self.images[idx]
            if self.train and self.crop_padding:
                images = random_crop(images, self.crop_padding, self.generator)
            if self.train and self.flip:
                images = random_flip(images, self.generator)
            yield self.normalize(images), self.labels[idx]
