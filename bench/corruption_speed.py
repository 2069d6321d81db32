"""Corruption speed: normbench's batched engine vs the ``imagecorruptions`` package, per corruption.

Both run on the same real 32x32 CIFAR-10 test images in this one process, on the CPU, at every
severity. normbench corrupts a batch at once; ``imagecorruptions`` (the reference, version 1.1.2
on PyPI) is called image by image as it is designed to be. Rates are images per second averaged
over the five severities; the aggregate ratio divides the total time of the reference by the total
time of normbench on the corruptions both complete (the reference crashes on some with current
NumPy / scikit-image; those are listed). ``imagecorruptions`` needs ``pkg_resources``
(``pip install imagecorruptions "setuptools<81"``).

    python bench/corruption_speed.py --data-dir ../shared/data [--n 1000] [--ref-n 100]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from normbench.corruptions import ALL, corrupt
from normbench.data import load_cifar10


def time_normbench(images: torch.Tensor, name: str) -> float:
    """Seconds per image over all five severities."""
    g = torch.Generator().manual_seed(0)
    corrupt(images[:8], name, 1, g)  # warm-up: caches, kernel selection
    start = time.perf_counter()
    for severity in range(1, 6):
        corrupt(images, name, severity, g)
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

    test = load_cifar10("test", args.data_dir)
    ours_images = test.images[: args.n]
    ref_images = test.images[: args.ref_n].permute(0, 2, 3, 1).numpy()
    try:
        from imagecorruptions import corrupt as reference

        reference_note = ""
    except Exception as err:  # noqa: BLE001
        reference, reference_note = None, f"imagecorruptions not importable ({err})"

    print(f"{torch.get_num_threads()} threads; normbench on {args.n} and imagecorruptions on "
          f"{args.ref_n} CIFAR-10 test images (32x32) per severity, severities 1-5")  # fmt: skip
    if reference_note:
        print(reference_note)
    print(f"{'corruption':<18} {'normbench img/s':>16} {'reference img/s':>16} {'ratio':>8}")
    total_ours = total_ref = 0.0
    crashed = []
    for name in ALL:
        ours = time_normbench(ours_images, name)
        ref, error = time_reference(reference, ref_images, name) if reference else (None, "n/a")
        if ref is None:
            crashed.append(name)
            print(f"{name:<18} {1 / ours:>16,.0f} {'crash':>16} {'':>8}  {error}")
            continue
        total_ours += ours
        total_ref += ref
        print(f"{name:<18} {1 / ours:>16,.0f} {1 / ref:>16,.0f} {ref / ours:>7.1f}x")
    both = len(ALL) - len(crashed)
    if total_ours:
        ratio = total_ref / total_ours
        print(f"aggregate over the {both} corruptions both ran: normbench {both / total_ours:,.0f} "
              f"img/s, reference {both / total_ref:,.0f} img/s, ratio {ratio:.1f}x")  # fmt: skip
    if crashed:
        print(f"reference crashed on: {', '.join(crashed)} (normbench ran all {len(ALL)})")


if __name__ == "__main__":
    main()
