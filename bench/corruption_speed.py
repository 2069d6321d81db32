"""Corruption speed: normbench's batched engine vs the ``imagecorruptions`` package, per corruption.

Both run on the same real 32x32 CIFAR-10 test images in this one process, on the CPU, at every
severity. normbench corrupts a batch at once; ``imagecorruptions`` (the reference, version 1.1.2
on PyPI) is called image by image as it is designed to be, on one thread (its NumPy, SciPy and
OpenCV calls are held to one). normbench is timed twice: on one thread, for a like-with-like
ratio, and on all the cores this process may use, which is how it runs by default (the reference
has no batched or threaded mode to give the same cores to). Rates are images per second averaged
over the five severities; the aggregate ratios divide the total time of the reference by the
total time of normbench on the corruptions both complete (the reference crashes on some with
current NumPy / scikit-image; those are listed). ``imagecorruptions`` needs ``pkg_resources``
(``pip install imagecorruptions "setuptools<81"``).

    python bench/corruption_speed.py --data-dir ../shared/data [--n 1000] [--ref-n 100]
"""

from __future__ import annotations

import os

# The reference's libraries start their thread pools on import: hold them to one thread first.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from normbench.corruptions import ALL, corrupt, ops  # noqa: E402
from normbench.data import load_cifar10  # noqa: E402


def time_normbench(images: torch.Tensor, name: str, threads: int) -> float:
    """Seconds per image over all five severities, on ``threads`` threads."""
    torch.set_num_threads(threads)
    ops.thread_pool.cache_clear()  # the JPEG codec's pool takes the thread count when first used
    indices = torch.arange(len(images))
    corrupt(images[:8], name, 1)  # warm-up: caches, kernel selection
    start = time.perf_counter()
    for severity in range(1, 6):
        corrupt(images, name, severity, 0, indices)
    return (time.perf_counter() - start) / (5 * len(images))


def time_reference(reference, images: np.ndarray, name: str) -> tuple[float | None, str]:
    np.random.seed(0)
    try:
        reference(images[0], corruption_name=name, severity=1)
        start = time.perf_counter()
        for severity in range(1, 6):
            for image in images:
                reference(image, corruption_name=name, severity=severity)
    except Exception as err:  # noqa: BLE001 - a crash is a result here
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"
    return (time.perf_counter() - start) / (5 * len(images)), ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=1000, help="images per severity for normbench")
    parser.add_argument("--ref-n", type=int, default=100, help="images per severity, reference")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1

    test = load_cifar10("test", args.data_dir)
    ours_images = test.images[: args.n]
    ref_images = test.images[: args.ref_n].permute(0, 2, 3, 1).numpy()
    try:
        import cv2
        from imagecorruptions import corrupt as reference

        cv2.setNumThreads(1)
        reference_note = ""
    except Exception as err:  # noqa: BLE001
        reference, reference_note = None, f"imagecorruptions not importable ({err})"

    print(f"normbench on {args.n} and imagecorruptions on {args.ref_n} CIFAR-10 test images "
          f"(32x32) per severity, severities 1-5; reference on 1 thread, normbench on 1 and on "
          f"all {cores} cores")  # fmt: skip
    if reference_note:
        print(reference_note)
    head = ("corruption", "ours 1 thr", f"ours {cores} thr", "reference", "1 vs 1", f"{cores} vs 1")
    print(f"{head[0]:<18} {head[1]:>11} {head[2]:>11} {head[3]:>11} {head[4]:>8} {head[5]:>8}")
    print(f"{'':<18} {'img/s':>11} {'img/s':>11} {'img/s':>11} {'ratio':>8} {'ratio':>8}")
    total_one = total_all = total_ref = 0.0
    crashed = []
    for name in ALL:
        one = time_normbench(ours_images, name, 1)
        every = time_normbench(ours_images, name, cores)
        torch.set_num_threads(1)
        ref, error = time_reference(reference, ref_images, name) if reference else (None, "n/a")
        rates = f"{name:<18} {1 / one:>11,.0f} {1 / every:>11,.0f}"
        if ref is None:
            crashed.append(name)
            print(f"{rates} {'crash':>11}  {error}")
            continue
        total_one, total_all, total_ref = total_one + one, total_all + every, total_ref + ref
        print(f"{rates} {1 / ref:>11,.0f} {ref / one:>7.1f}x {ref / every:>7.1f}x")
    both = len(ALL) - len(crashed)
    if total_one:
        print(f"aggregate over the {both} corruptions both ran: normbench {both / total_one:,.0f} "
              f"img/s on 1 thread and {both / total_all:,.0f} img/s on {cores}, reference "
              f"{both / total_ref:,.0f} img/s on 1; ratio {total_ref / total_one:.1f}x at one "
              f"thread each, {total_ref / total_all:.1f}x with all cores")  # fmt: skip
    if crashed:
        print(f"reference crashed on: {', '.join(crashed)} (normbench ran all {len(ALL)})")


if __name__ == "__main__":
    main()
