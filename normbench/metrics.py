"""Metric names and the evaluation metrics computed from a model's outputs.

Every stored number is one row ``(run, name, split, corruption, severity, layer, step) -> value``;
the names below are the vocabulary the runners write and the leaderboard reads. ``corruption`` is
"" and ``severity`` 0 for rows that are not about a corruption; ``layer`` is a block or layer
index (0-based, forward order) for the probes' per-layer rows and -1 otherwise; ``step`` is the
training step a probe measured at (0: at initialization) and -1 for rows about the whole run.

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

# Initialization probes (Lubana et al. 2021), task "probe", split "train", at a training step.
# Per block (layer = block index; the block outputs a model lists in ``probe_blocks()``), the mean
# over the probe batches and the standard deviation over them:
PROBE_ACT_VAR = "probe_activation_variance"  # per-channel variance over (N,H,W), channel mean
PROBE_ACT_VAR_STD = "probe_activation_variance_std"
PROBE_COSINE = "probe_cosine_similarity"  # average cosine similarity between the batch's samples
PROBE_COSINE_STD = "probe_cosine_similarity_std"
PROBE_STABLE_RANK = "probe_stable_rank"  # of the samples' Gram matrix: trace / largest eigenvalue
PROBE_STABLE_RANK_STD = "probe_stable_rank_std"
# Per convolution (layer = conv index): Frobenius norm of the loss gradient w.r.t. its output.
PROBE_GRAD_NORM = "probe_grad_norm"
PROBE_GRAD_NORM_STD = "probe_grad_norm_std"
# Whole-model summaries (layer -1) at each probed step.
PROBE_ACT_GROWTH = "probe_activation_growth"  # last block's variance / first block's
PROBE_LAST_COSINE = "probe_last_cosine_similarity"
PROBE_LAST_STABLE_RANK = "probe_last_stable_rank"
PROBE_GRAD_RATIO = "probe_grad_norm_ratio"  # first convolution's gradient norm / last one's
PROBE_NONFINITE_LAYER = "probe_nonfinite_layer"  # the block where activations went inf/NaN

# Landscape and internal covariate shift probes (Santurkar et al. 2018) of classify runs with
# the ``landscape`` option, split "train", at a training step; along the gradient g, at the points
# w - eta g of the step-size grid:
LANDSCAPE_LOSS_MIN = "landscape_loss_min"
LANDSCAPE_LOSS_MAX = "landscape_loss_max"
LANDSCAPE_GRAD_CHANGE_MIN = "landscape_grad_change_min"  # ||grad L(w - eta g) - grad L(w)||
LANDSCAPE_GRAD_CHANGE_MAX = "landscape_grad_change_max"
LANDSCAPE_BETA = "landscape_beta_smoothness"  # max over eta of grad change / ||eta g||
# Per weight layer (layer index): the gradient before and after the earlier layers' update.
ICS_L2 = "ics_l2"
ICS_COSINE = "ics_cosine"
# Whole-run summaries (step -1): means over the probed steps (and layers, for ICS).
LANDSCAPE_LOSS_RANGE_MEAN = "landscape_loss_range_mean"
LANDSCAPE_GRAD_PRED_MEAN = "landscape_grad_predictiveness_mean"  # of the max grad change
LANDSCAPE_BETA_MEAN = "landscape_beta_smoothness_mean"
ICS_L2_MEAN = "ics_l2_mean"
ICS_COSINE_MEAN = "ics_cosine_mean"


# GAN runs (task "gan"), split: the real images' split. The scores are in the space of the
# InceptionV3 FID feature network (normbench.gan_metrics.FEATURE_NETWORK); another network's
# scores would take other names, so they never share a column.
GAN_FID = "fid"  # Frechet distance, fid_gen_samples generated vs fid_real_samples real images
GAN_KID = "kid"  # kernel inception distance (unbiased MMD^2, cubic kernel), mean over subsets
GAN_KID_STD = "kid_std"  # its standard deviation over the subsets
GAN_GEN_SAMPLES = "fid_gen_samples"  # generated images the scores used
GAN_REAL_SAMPLES = "fid_real_samples"  # real images the scores used
# FID during training (step: the generator step), with the budget's fid_every_samples images:
# another sample count than the final score, hence its own name.
GAN_FID_PROGRESS = "fid_progress"
GAN_DIVERSITY = "sample_diversity"  # mean pairwise distance of generated images (collapse: ~0)
GAN_COLLAPSED = "mode_collapsed"  # 1 when sample_diversity is under the collapse threshold
GAN_D_LOSS = "d_loss"  # mean over the last 100 generator steps
GAN_G_LOSS = "g_loss"
GAN_G_PARAMS = "generator_params"
GAN_D_PARAMS = "discriminator_params"
GAN_FEATURE_THROUGHPUT = "feature_images_per_s"  # images/s of the feature network

# Adversarial robustness of classify runs with the ``adversarial`` option (normbench.attacks),
# split "test": accuracy on a fixed seeded subset of the test images, clean and under L-infinity
# attacks in pixel space; the attack settings are in the run's info["adversarial"].
ADV_CLEAN_ACCURACY = "adversarial_clean_accuracy"  # the subset's clean images
FGSM_ACCURACY = "fgsm_accuracy"  # the subset's FGSM images (one step of eps)
PGD_ACCURACY = "pgd_accuracy"  # the subset's PGD images (steps of step_size, random start)

# Test-time adaptation (normbench.adaptation) of classify runs with the ``adaptation`` option,
# split "test": accuracy with the batch-statistics norms adapted on the test batches themselves,
# under names of their own so it is never mixed into ``accuracy``. Rows as ``accuracy``'s: the
# clean test set (corruption ""), each (corruption, severity), and per corruption the mean over
# severities (severity 0); the settings are in the run's info["adaptation"].
ACCURACY_BN_ADAPT = "accuracy_bn_adapt"  # each batch normalized with its own statistics (N = 0)
ACCURACY_TENT = "accuracy_tent"  # TENT: online entropy minimisation, reset for each stream

# Label noise (normbench.label_noise) of classify runs with a ``label_noise`` variant, split
# "train": the fraction of the training labels the run actually trained with flipped (round(rate
# * N) / N for symmetric noise); the noise settings and the count are in info["label_noise"].
LABEL_NOISE_RATE_ACTUAL = "label_noise_rate_actual"


@dataclass(frozen=True)
class MetricRow:
    name: str
    value: float
    split: str = ""
    corruption: str = ""
    severity: int = 0
    layer: int = -1
    step: int = -1


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
