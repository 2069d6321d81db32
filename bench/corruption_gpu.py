"""CIFAR-10-C generation on a GPU: 10,000 test images x 19 corruptions x 5 severities, streamed.

Each (corruption, severity) is generated on the device the way a run on a GPU gets it
(``normbench.corruptions.sets.StreamedSet``: the test images held on the device, nothing
written) and timed per corruption between ``torch.cuda.synchronize`` calls, after a small
warm-up batch. The reference is the same engine on the CPU, measured in this invocation on the
first ``--cpu-n`` images (all severities, all the threads this process may use); the ratio is
GPU images/s over CPU images/s. The same images are compared value by value between the two
devices, since the GPU's floating point need not round as the CPU's does. The JPEG codec is
libjpeg (on the CPU, the reference's bytes) unless ``--jpeg-codec nvjpeg`` (or
``NORMBENCH_JPEG_CODEC``) chooses the CUDA one.

    python bench/corruption_gpu.py --data-dir ../shared/data [--n 10000] [--cpu-n 200]
        [--jpeg-codec libjpeg|nvjpeg] [--batch 5000]

Without CUDA it says so and exits; ``--device cpu --n 20`` runs the same code on the CPU (to
check it), and then it measures the CPU, not a GPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import torch

from normbench.corruptions import ALL, SEVERITIES, corrupt
from normbench.corruptions.digital import JPEG_CODEC_VAR, jpeg_codec_on
from normbench.corruptions.sets import N_TEST, STREAM_BATCH, StreamedSet
from normbench.data import load_cifar10

PRECISION = (
    "float64 (uint8 images become float64, as the reference's x / 255.; float32 where the "
    "reference computes in float32: noise draws, zoom blur, elastic warp, snow's blend, spatter)"
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_device(
    cset: StreamedSet, warm: torch.Tensor, name: str, keep: int
) -> tuple[float, list[torch.Tensor]]:
    """Seconds to generate all five severities of ``name`` on the set's device, and the first
    ``keep`` images of each severity (copied to the CPU outside the timed span). ``warm``, a
    few images on the device, fills the caches and starts the kernels and codec first."""
    corrupt(warm, name, 1)
    synchronize(cset.device)
    seconds, kept = 0.0, []
    for severity in SEVERITIES:
        start = time.perf_counter()
        block = cset.load(name, severity)
        synchronize(cset.device)
        seconds += time.perf_counter() - start
        kept.append(block.images[:keep].cpu())
    return seconds, kept


def time_cpu(images: torch.Tensor, name: str) -> tuple[float, list[torch.Tensor]]:
    """Seconds the CPU engine takes for the five severities of ``images``, and its outputs."""
    indices = torch.arange(len(images))
    corrupt(images[:8], name, 1)
    start = time.perf_counter()
    outputs = [corrupt(images, name, severity, 0, indices) for severity in SEVERITIES]
    return time.perf_counter() - start, outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default=None, help="default: cuda (cpu to check the code)")
    parser.add_argument("--n", type=int, default=N_TEST, help="test images per severity")
    parser.add_argument("--cpu-n", type=int, default=200, help="images for the CPU reference")
    parser.add_argument("--batch", type=int, default=STREAM_BATCH, help="images per device batch")
    parser.add_argument("--jpeg-codec", choices=("libjpeg", "nvjpeg"), default=None)
    args = parser.parse_args()
    wants_cuda = args.device is None or args.device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        print(
            f"No CUDA device here (found: {cpu_model()}); this benchmark measures GPU generation."
        )
        return 0
    if not 1 <= args.n <= N_TEST or args.cpu_n < 1 or args.batch < 1:
        parser.error(f"--n must be 1..{N_TEST}; --cpu-n and --batch at least 1")
    if args.jpeg_codec:
        os.environ[JPEG_CODEC_VAR] = args.jpeg_codec
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision's codecs
    device = torch.device(args.device or "cuda")
    cpu_n = min(args.cpu_n, args.n)
    pairs = len(ALL) * len(SEVERITIES)

    test = load_cifar10("test", args.data_dir)
    cset = StreamedSet(test, indices=torch.arange(args.n), device=device, batch_size=args.batch)
    warm = test.images[:8].to(device)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)} ({device})")
    else:
        print(f"Measuring the CPU, not a GPU (--device {device}): {cpu_model()}")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}; CPU reference: the same engine on {cpu_model()}, "
          f"{threads} threads, first {cpu_n} images")  # fmt: skip
    print(f"precision: {PRECISION}")
    print(f"JPEG codec on {device}: {jpeg_codec_on(device)} (CPU reference: libjpeg)")
    print(f"{args.n} images x {len(ALL)} corruptions x {len(SEVERITIES)} severities = "
          f"{args.n * pairs:,} images, streamed in batches of {args.batch}")  # fmt: skip
    print(f"{'corruption':<18} {'device s':>9} {'device img/s':>12} {'CPU img/s':>10} "
          f"{'ratio':>7} {'same bytes':>10} {'max diff':>8}")  # fmt: skip
    total_device = total_cpu = 0.0
    for name in ALL:
        seconds, on_device = time_device(cset, warm, name, cpu_n)
        cpu_seconds, on_cpu = time_cpu(test.images[:cpu_n], name)
        total_device, total_cpu = total_device + seconds, total_cpu + cpu_seconds
        rate, cpu_rate = 5 * args.n / seconds, 5 * cpu_n / cpu_seconds
        ours, reference = torch.stack(on_device).int(), torch.stack(on_cpu).int()
        same = (ours == reference).double().mean().item()
        worst = (ours - reference).abs().max().item()
        print(f"{name:<18} {seconds:>9.2f} {rate:>12,.0f} {cpu_rate:>10,.0f} "
              f"{rate / cpu_rate:>6.1f}x {same:>10.4%} {worst:>8}")  # fmt: skip
    rate, cpu_rate = args.n * pairs / total_device, cpu_n * pairs / total_cpu
    print(f"total: {args.n * pairs:,} images in {total_device:.1f} s on {device}, {rate:,.0f} "
          f"img/s; CPU engine {cpu_rate:,.0f} img/s; ratio {rate / cpu_rate:.1f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
