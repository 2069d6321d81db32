"""Parallel local workers on a CPU: every worker with torch's default threads vs each with its
share of them (what ``normbench run --workers N`` gives each worker, see
``runners.executor.LocalExecutor.threads_per_job``).

Each configuration starts ``--workers`` processes at once; each trains the label-noise ``cpu``
budget's model (the fast net at half width, BatchNorm, batch 256, fp32, SGD) on a fixed random
batch for ``--seconds`` after a warm-up and prints its training images/s. The two
configurations alternate for ``--rounds`` rounds in this one invocation, so machine noise hits
both alike; the reference is the default threads (each worker as many threads as this process,
``torch.get_num_threads()``), and the ratio is the shared threads' total images/s over it.

    python bench/worker_threads.py [--workers 2] [--seconds 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import sys, time, torch
from normbench.normspeed import build_model, training_batch
from normbench.optim import create_optimizer, training_step
seconds = float(sys.argv[1])
model = build_model("fastnet", "batchnorm", 10, torch.device("cpu"), widths=[16, 32, 64, 128])
optimizer = create_optimizer("sgd", model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
x, y = training_batch(256, (3, 32, 32), 10, torch.device("cpu"))
def forward():
    out = model(x)
    return out, torch.nn.functional.cross_entropy(out, y)
def step():
    training_step(optimizer, forward)
for _ in range(3):
    step()
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step()
    steps += 1
print(steps * 256 / (time.perf_counter() - start), torch.get_num_threads())
"""


def run_together(workers: int, threads: int | None, seconds: float) -> tuple[float, int]:
    """Total training images/s of ``workers`` processes started at once, and their threads."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    procs = [
        subprocess.Popen([sys.executable, "-c", CHILD, str(seconds)], env=env,
                         stdout=subprocess.PIPE, text=True)  # fmt: skip
        for _ in range(workers)
    ]
    outs = [p.communicate()[0].split() for p in procs]
    if any(p.returncode for p in procs):
        sys.exit("a worker process failed")
    return sum(float(o[0]) for o in outs), int(outs[0][1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch

    from normbench.runtime import device_name

    default = torch.get_num_threads()
    share = max(1, default // args.workers)
    cpu = device_name(torch.device("cpu"))
    print(f"{args.workers} workers at once on {cpu}, {os.cpu_count()} CPUs; torch "
          f"{torch.__version__}, fp32; {args.seconds:g} s per measurement")  # fmt: skip
    ratios = []
    for r in range(args.rounds):
        time.sleep(1)
        ref, ref_threads = run_together(args.workers, None, args.seconds)
        shared, shared_threads = run_together(args.workers, share, args.seconds)
        ratios.append(shared / ref)
        print(f"round {r + 1}: {ref_threads} threads each (reference) {ref:,.0f} images/s; "
              f"{shared_threads} each {shared:,.0f} images/s; "
              f"ratio {shared / ref:.2f}")  # fmt: skip
    print(f"median ratio, {share} thread(s) per worker over {default} (reference): "
          f"{statistics.median(ratios):.2f}x total training images/s")  # fmt: skip


if __name__ == "__main__":
    main()
