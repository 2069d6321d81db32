"""Noisy training labels: a seeded, exact fraction of the labels replaced.

- ``symmetric``: round(rate * N) examples chosen uniformly without replacement; each gets a label
  drawn uniformly from the *other* classes (never its own), so exactly that many labels change.
- ``asymmetric`` (CIFAR-10 only, Patrini et al. 2017): the mistakes a person would make between
  similar classes, truck -> automobile, bird -> airplane, cat <-> dog, deer -> horse. Of each of
  these source classes c, round(rate * n_c) examples are flipped to its target; the other five
  classes never change. Cat and dog swap based on the original labels, so no example flips twice.

Everything draws from its own ``torch.Generator`` seeded by the noise seed, so the same labels,
kind, rate and seed give the same noisy labels on any machine and in any run, whatever the run's
own seed; every norm and optimizer of a suite trains on the same corrupted labels.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from normbench.data import ArrayDataset
from normbench.errors import NormbenchError

KINDS = ("symmetric", "asymmetric")

#: CIFAR-10's classes in label order (the asymmetric map refers to them by name).
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
#: Source class -> the similar class it is mistaken for.
ASYMMETRIC_CIFAR10 = {
    "truck": "automobile", "bird": "airplane", "cat": "dog", "dog": "cat", "deer": "horse",
}  # fmt: skip


def noisy_labels(
    labels: torch.Tensor, kind: str, rate: float, *, seed: int, num_classes: int
) -> torch.Tensor:
    """A copy of ``labels`` (integer class indices, shape (N,)) with noise ``kind`` at ``rate``
    in [0, 1), reproducible by ``seed``. Asymmetric noise needs CIFAR-10's 10 classes."""
    if kind not in KINDS:
        raise NormbenchError(f"Unknown label noise {kind!r}; choose one of {', '.join(KINDS)}.")
    if not 0.0 <= rate < 1.0:
        raise NormbenchError(f"Label noise rate must be in [0, 1); got {rate}.")
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex():
        raise NormbenchError("Labels must be a 1-D tensor of integer class indices.")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise NormbenchError(f"Labels must be class indices in [0, {num_classes}).")
    if kind == "asymmetric" and num_classes != len(CIFAR10_CLASSES):
        raise NormbenchError(
            "Asymmetric label noise maps CIFAR-10's classes (truck -> automobile, bird -> "
            f"airplane, cat <-> dog, deer -> horse); these labels have {num_classes} classes."
        )
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    noisy = labels.clone()
    if kind == "symmetric":
        chosen = torch.randperm(len(labels), generator=g)[: round(rate * len(labels))]
        # An offset in 1..C-1 added modulo C reaches every other class with equal probability
        # and never the example's own.
        offset = torch.randint(1, num_classes, (len(chosen),), generator=g, dtype=labels.dtype)
        noisy[chosen] = (labels[chosen] + offset) % num_classes
        return noisy
    for source, target in ASYMMETRIC_CIFAR10.items():
        members = (labels == CIFAR10_CLASSES.index(source)).nonzero().flatten()
        chosen = members[torch.randperm(len(members), generator=g)[: round(rate * len(members))]]
        noisy[chosen] = CIFAR10_CLASSES.index(target)
    return noisy


def flipped(labels: torch.Tensor, noisy: torch.Tensor) -> int:
    """How many labels the noise changed."""
    return int((labels.cpu() != noisy.cpu()).sum())


def noisy_training_set(ds: ArrayDataset, options: dict | None) -> tuple[ArrayDataset, dict | None]:
    """``ds`` with the labels of a run's ``label_noise`` setting ({type, rate, seed}), and what
    to record about it (the settings, the number of labels flipped and their fraction); ``ds``
    itself and None without label noise. Asymmetric noise needs CIFAR-10's classes in order."""
    if not options:
        return ds, None
    kind, rate, seed = options["type"], options["rate"], options.get("seed", 0)
    if kind == "asymmetric" and tuple(ds.classes) != CIFAR10_CLASSES:
        raise NormbenchError(
            f"Asymmetric label noise needs CIFAR-10's classes; this dataset has {len(ds.classes)} "
            f"({', '.join(ds.classes[:3])}, ...). Use symmetric noise."
        )
    labels = noisy_labels(ds.labels, kind, rate, seed=seed, num_classes=len(ds.classes))
    changed = flipped(ds.labels, labels)
    info = {
        "type": kind, "rate": rate, "seed": seed, "flipped": changed,
        "examples": len(labels), "rate_actual": changed / max(len(labels), 1),
    }  # fmt: skip
    return replace(ds, labels=labels.to(ds.labels.device)), info
