"""Metric names and the evaluation metrics computed from a model's outputs.

Every stored number is one row ``(run, name, split, corruption, severity) -> value``; the names
below are the vocabulary the runners write and the leaderboard reads. ``corruption`` is "" and
``severity`` 0 for rows that are not about a corruption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

ACCURACY = "accuracy"  # fraction correct, [0, 1]
LOSS = "loss"  # mean cross-entropy (no label smoothing)
ECE = "ece"  # expected calibration error, 15 equal-width bins, L1
TRAIN_THROUGHPUT = "train_images_per_s"  # steady state, warm-up steps excluded
EVAL_THROUGHPUT = "eval_images_per_s"  # steady state, first batch excluded
TRAIN_TIME = "train_time_s"  # seconds spent in training steps (evaluation excluded)
WALL_TIME = "wall_time_s"  # seconds from start to end of the run, data loading included
PEAK_MEMORY = "peak_memory_mb"  # CUDA: peak allocated; CPU: peak resident set of the process
PARAM_COUNT = "param_count"
EPOCHS = "epochs"

ECE_BINS = 15


@dataclass(frozen=True)
class MetricRow:
    name: str
    value: float
    split: str = ""
    corruption: str = ""
    severity: int = 0


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    ece: float
    images_per_s: float


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[float, float, float]:
    """Accuracy, mean cross-entropy and ECE of float ``logits`` (N, K) against ``labels`` (N,)."""
    logits = logits.float()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    ece = multiclass_calibration_error(
        logits.softmax(1), labels, num_classes=logits.shape[1], n_bins=ECE_BINS, norm="l1"
    ).item()
    return accuracy, loss, ece
