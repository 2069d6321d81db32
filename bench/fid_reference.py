"""FID and KID between CIFAR-10's training and test images with normbench's feature network.

Two sets of real images from one distribution: their FID is the floor a generator's FID is read
against. The published reference is about 3.1 for the whole training set (50,000 images) against
the test set (10,000), with the TensorFlow Inception network; FID is biased upwards at small
counts, so fewer images give a larger value (and the bias shrinks roughly as 1/count).

Training images: the first ``--count`` of a seeded permutation; test images: likewise, or the whole
split in its order when ``--count`` is 10000. Features are cached (normbench's cache directory),
so a second run only recomputes the statistics; images/s is reported for features computed in
this run, from the end of the first batch on (batches of 100 images at 299 px).

    python bench/fid_reference.py --data-dir ../shared/data [--count 10000] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from normbench import gan_metrics

PUBLISHED_TRAIN_TEST_FID = 3.1  # 50k train vs 10k test, TF Inception (as commonly reported)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def features(split: str, count: int, data_dir: str, device: torch.device, seed: int):
    """The split's features and the network's images/s computing them (None when read from
    the cache). The rate is timed from the end of the first batch to the end of the last, so it
    leaves out loading the split and the first batch's warm-up."""
    if gan_metrics.cached_real_features("cifar10", split, count, seed=seed) is not None:
        return gan_metrics.real_features("cifar10", split, count, data_dir, seed=seed), None
    marks: list[tuple[int, float]] = []

    def show(done: int, total: int | None) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append((done, time.perf_counter()))
        print(f"\r  {split}: {done}/{total} images", end="", flush=True)

    result = gan_metrics.real_features(
        "cifar10", split, count, data_dir, device=device, seed=seed, progress=show
    )
    print()
    if len(marks) < 2:
        return result, None
    (first, t0), (last, t1) = marks[0], marks[-1]
    return result, (last - first) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="folder holding cifar10/")
    parser.add_argument("--count", type=int, default=10_000, help="images per split (max 10000)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsets' permutation")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    path = gan_metrics.feature_network_path()
    print(f"network   {gan_metrics.FEATURE_NETWORK} ({path})")
    print(f"sha256    {gan_metrics.feature_network_sha256()}")
    print(f"hardware  {cpu_model()}, {torch.get_num_threads()} threads, device {device}")
    print(f"torch     {torch.__version__}")
    train, train_rate = features("train", args.count, args.data_dir, device, args.seed)
    test, test_rate = features("test", args.count, args.data_dir, device, args.seed)

    start = time.perf_counter()
    fid = gan_metrics.fid_from_features(train, test)
    fid_seconds = time.perf_counter() - start
    start = time.perf_counter()
    kid, kid_std = gan_metrics.kid_from_features(
        train, test, subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed
    )
    kid_seconds = time.perf_counter() - start
    kid_size = min(args.kid_subset_size, len(train), len(test))

    rates = [r for r in (train_rate, test_rate) if r is not None]
    rate = (
        f"{sum(rates) / len(rates):.1f} images/s after the first batch"
        if rates
        else "(features read from the cache, or one batch only: no rate)"
    )
    print(f"counts    train {len(train)}, test {len(test)}")
    print(f"features  {rate} (batch 100, 299 px)")
    print(f"FID       {fid:.3f}   ({fid_seconds:.1f} s)")
    print(
        f"KID       {kid:.5f} +- {kid_std:.5f}   ({args.kid_subsets} subsets of {kid_size}, "
        f"{kid_seconds:.1f} s)"
    )
    print(
        f"reference FID {PUBLISHED_TRAIN_TEST_FID} (50000 train vs 10000 test, TF Inception, as "
        "commonly reported); fewer images give a larger FID"
    )


if __name__ == "__main__":
    main()
