"""Metric names and the evaluation metrics computed from a model's outputs.

Every stored number is one row ``(run, name, split, corruption, severity) -> value``; the names
below are the vocabulary the runners write and the leaderboard reads. ``corruption`` is "" and
``severity`` 0 for rows that are not about a corruption.

The names are imported by the store and the command line, which do not need torch, so torch and
torchmetrics are imported only by the functions that compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ACCURACY = "accuracy"  # fraction correct, [0, 1]
LOSS = "loss"  # mean cross-entropy (no label smoothing)
ECE = "ece"  # expected calibration error, 15 equal-width bins, L1
# The run's own training throughput, measured while it trained: it depends on whatever else
# the machine was doing at the time, so it is a property of the run, not of the norm.
TRAIN_THROUGHPUT = "train_images_per_s"  # steady state, warm-up steps excluded
# The norm's speed: images/s of a training step (forward + backward) of the run's model
# configuration with the run's norm divided by the same with BatchNorm, timed in one process in
# interleaved repetitions at the end of the run; the median over the pairs of repetitions, and
# the interquartile range of the pairs' ratios. Machine load slows both sides alike.
SPEED_VS_BN = "speed_vs_batchnorm"
SPEED_VS_BN_IQR = "speed_vs_batchnorm_iqr"
# Training images/s with the run's two-pass optimizer / with its base optimizer, same model, side
# by side in the run's process (about 0.5: two forward/backward passes per step).
SPEED_VS_BASE_OPTIMIZER = "speed_vs_base_optimizer"
SPEED_VS_BASE_OPTIMIZER_IQR = "speed_vs_base_optimizer_iqr"
EVAL_THROUGHPUT = "eval_images_per_s"  # steady state, first batch excluded
TRAIN_TIME = "train_time_s"  # seconds spent in training steps (evaluation excluded)
WALL_TIME = "wall_time_s"  # seconds from start to end of the run, data loading included
# The run's own peak memory above what the process held when the run started (training and
# evaluation; see runtime.RunMemory): CUDA: tensor memory allocated; CPU: resident set size.
PEAK_MEMORY = "run_peak_memory_mb"
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
    import torch.nn.functional as F
    from torchmetrics.functional.classification import multiclass_calibration_error

    logits = logits.float()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    loss = F.cross_entropy(logits, labels).item()
    ece = multiclass_calibration_error(
        logits.softmax(1), labels, num_classes=logits.shape[1], n_bins=ECE_BINS, norm="l1"
    ).item()
    return accuracy, loss, ece
