"""Training throughput: normbench's tensor-resident loader vs a plain torchvision DataLoader loop.

Both loops train the same model (the `cpu` budget's fast net with BatchNorm, channels_last, the
budget's precision) with the same optimizer, batch size and augmentation (random crop with
2-px zero padding + horizontal flip) on the same device, in this one process. The reference is
the usual recipe: a Dataset returning PIL images, torchvision transforms
(RandomCrop, RandomHorizontalFlip, ToTensor, Normalize) and a DataLoader, measured with 0 and 2
worker processes; the ratio is taken against the faster of the two.

    python bench/train_throughput.py --data-dir ../shared/data [--steps 40] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from normbench.data import CIFAR10_MEAN, CIFAR10_STD, TensorLoader, load_dataset
from normbench.models import conv_norm_factory, create_model
from normbench.optim import create_optimizer
from normbench.runtime import autocast_dtype, resolve_device
from normbench.suites import load_suite


class PilCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: HWC uint8 -> PIL image -> transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform) -> None:
        self.data = images.permute(0, 2, 3, 1).numpy()
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def measure(batches, model, optimizer, device, dtype, warmup: int, steps: int) -> float:
    """Images/s over ``steps`` training steps after ``warmup`` steps, data loading included."""
    it = iter(batches)
    seen, start = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        x, y = next(it)
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    budget = load_suite("cifar10").budget("cpu")
    device = resolve_device(args.device)
    dtype = autocast_dtype(budget.precision, device)
    train = load_dataset("cifar10", "train", args.data_dir)
    pad, batch = budget.augment.crop_padding, budget.batch_size

    def fresh_model():
        torch.manual_seed(0)
        model = create_model(
            budget.model, block=conv_norm_factory("batchnorm"), num_classes=10, **budget.model_args
        ).to(device, memory_format=torch.channels_last)
        return model, create_optimizer("sgd", model, **budget.optimizers["sgd"])

    tf = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=pad),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )
    results: dict[str, float] = {}
    for workers in (0, 2):
        loader = DataLoader(
            PilCifar(train.images, train.labels, tf),
            batch_size=batch,
            shuffle=True,
            num_workers=workers,
            drop_last=True,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
        )
        model, opt = fresh_model()
        results[f"torchvision DataLoader, {workers} workers"] = measure(
            loader, model, opt, device, dtype, args.warmup, args.steps
        )
    model, opt = fresh_model()
    ours = TensorLoader(
        train,
        batch,
        device=device,
        train=True,
        crop_padding=pad,
        flip=True,
        generator=torch.Generator().manual_seed(0),
    )
    results["normbench TensorLoader"] = measure(
        ours, model, opt, device, dtype, args.warmup, args.steps
    )

    precision = "bf16" if dtype is not None else "fp32"
    print(
        f"device {device}, {torch.get_num_threads()} threads, model {budget.model}+batchnorm, "
        f"batch {batch}, {precision}, {args.steps} timed steps after {args.warmup} warm-up steps"
    )
    for name, rate in results.items():
        print(f"  {name:<36} {rate:8.0f} images/s")
    reference = max(v for k, v in results.items() if k.startswith("torchvision"))
    ratio = results["normbench TensorLoader"] / reference
    print(f"ratio normbench / best torchvision reference: {ratio:.2f}")


if __name__ == "__main__":
    main()
