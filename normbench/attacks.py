"""White-box L-infinity attacks (FGSM, PGD) on a trained classifier, as a robustness metric.

The protocol follows the ConvNorm paper (Liu et al. 2021), which follows Madry et al. (2018):
the attacks perturb *pixels* in [0, 1], before the input normalization (mean/std), so ``eps`` is
in pixel units (8/255 is a change of 8 grey levels) whatever the dataset's statistics. The model
is attacked in evaluation mode (BatchNorm uses its running statistics, so each image is attacked
on its own, independently of the batch it sits in), in fp32 without autocast, with the gradient
sign of the cross-entropy loss:

- FGSM (Goodfellow et al. 2015): one step ``x + eps * sign(grad)``, clipped to [0, 1].
- PGD (Madry et al. 2018): an optional uniform random start in the eps-ball, then ``steps``
  sign steps of ``step_size``, each followed by the projection onto the eps-ball around the clean
  image and onto [0, 1].

Only the input's gradient is computed (``torch.autograd.grad``), so the model's parameters keep
their ``requires_grad`` flags and no ``.grad`` accumulates on them. These attacks are a cheap
indicator of robustness; robustness claims in the literature need a stronger, parameter-free
evaluation such as AutoAttack (Croce and Hein 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import NormbenchError

#: Maps images in [0, 1] (N, C, H, W) to what the model takes (mean/std normalized).
Normalize = Callable[[torch.Tensor], torch.Tensor]


class NoInputGradient(NormbenchError):
    """The model's loss has no usable gradient with respect to its input: it cannot be attacked
    with gradient steps (the run records this reason instead of adversarial accuracies)."""


@dataclass(frozen=True)
class AttackSettings:
    """One budget's attack settings; pixel units ([0, 1]) for ``eps`` and ``step_size``."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    steps: int = 20
    random_start: bool = True
    batch_size: int = 500

    def describe(self) -> dict[str, object]:
        """The settings and the protocol around them, as a run's provenance records them."""
        return asdict(self) | {
            "threat_model": "L-infinity",
            "space": "pixels in [0, 1], before the mean/std normalization",
            "loss": "cross-entropy, gradient sign steps",
            "model_mode": "eval",
            "precision": "fp32",
        }


@dataclass(frozen=True)
class AdversarialAccuracy:
    clean: float  # accuracy on the clean images of the subset
    fgsm: float  # on the FGSM images
    pgd: float  # on the PGD images
    images: int  # how many images were attacked


def pixel_normalizer(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> Normalize:
    """``(x - mean) / std`` per channel, channels_last like the run's loaders' batches."""
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return lambda x: ((x - m) / s).contiguous(memory_format=torch.channels_last)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _input_gradient(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, normalize: Normalize
) -> torch.Tensor:
    """The gradient of the summed cross-entropy w.r.t. the pixels ``x``, in fp32.

    The sum (not the mean) keeps each image's gradient independent of the batch size; only its
    sign is used. Autocast is switched off so that a bf16 run is still attacked in fp32."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        loss = F.cross_entropy(model(normalize(x)).float(), labels, reduction="sum")
        if not loss.requires_grad:
            raise NoInputGradient(
                "the model's output does not depend differentiably on its input (no gradient "
                "flows back to the images), so gradient attacks cannot be applied"
            )
        (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
    if grad is None:
        raise NoInputGradient(
            "the model's loss has no gradient with respect to the input images, so gradient "
            "attacks cannot be applied"
        )
    if not torch.isfinite(grad).all():
        raise NoInputGradient(
            "the gradient of the model's loss with respect to the input images is not finite "
            "(inf/NaN), so gradient attacks cannot be applied"
        )
    return grad


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Onto the L-infinity ball of radius ``eps`` around ``x``, then onto [0, 1]. The two boxes
    intersect (``x`` is in both), so clamping to one and then the other lands in both."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0.0, 1.0)


def fgsm(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    normalize: Normalize,
) -> torch.Tensor:
    """FGSM images: ``clip(images + eps * sign(grad), 0, 1)``, float, the shape of ``images``
    (float pixels in [0, 1])."""
    x = images.detach().float()
    with _eval_mode(model):
        grad = _input_gradient(model, x, labels, normalize)
    return (x + eps * grad.sign()).clamp(0.0, 1.0)


def pgd(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    random_start: bool,
    generator: torch.Generator | None,
    normalize: Normalize,
) -> torch.Tensor:
    """PGD images within ``eps`` of ``images`` (float pixels in [0, 1]) and inside [0, 1].

    The random start is uniform in the eps-ball, drawn on the CPU from ``generator`` (required
    when ``random_start``), so a seed gives the same start on every device."""
    x = images.detach().float()
    x_adv = x
    if random_start:
        if generator is None:
            raise ValueError("pgd: a random start needs an explicit generator (reproducibility)")
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float32)
        x_adv = _project(x + (2 * noise.to(x.device) - 1) * eps, x, eps)
    with _eval_mode(model):
        for _ in range(steps):
            grad = _input_gradient(model, x_adv, labels, normalize)
            x_adv = _project(x_adv + step_size * grad.sign(), x, eps)
    return x_adv.detach()


def _as_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (0..255) or float pixels, as float pixels in [0, 1]."""
    return images.float() / 255 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, normalize) -> int:
    return int((model(normalize(x)).argmax(1) == labels).sum())


def adversarial_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: AttackSettings,
    *,
    generator: torch.Generator,
    normalize: Normalize,
) -> AdversarialAccuracy:
    """Clean, FGSM and PGD accuracy of ``model`` on ``images`` (uint8, or float in [0, 1]; on
    the model's device) in batches of ``settings.batch_size``. A prediction counts as correct on
    an attacked image whatever it was on the clean one (the papers' plain accuracy). Raises
    ``NoInputGradient`` when the model cannot be attacked."""
    if len(images) == 0:
        raise NormbenchError("adversarial evaluation: no images to attack")
    clean = fgsm_correct = pgd_correct = 0
    with _eval_mode(model), torch.autocast(images.device.type, enabled=False):
        for start in range(0, len(images), settings.batch_size):
            x = _as_pixels(images[start : start + settings.batch_size])
            y = labels[start : start + settings.batch_size]
            clean += _correct(model, x, y, normalize)
            x_fgsm = fgsm(model, x, y, eps=settings.eps, normalize=normalize)
            fgsm_correct += _correct(model, x_fgsm, y, normalize)
            x_pgd = pgd(
                model,
                x,
                y,
                eps=settings.eps,
                step_size=settings.step_size,
                steps=settings.steps,
                random_start=settings.random_start,
                generator=generator,
                normalize=normalize,
            )
            pgd_correct += _correct(model, x_pgd, y, normalize)
    n = len(images)
    return AdversarialAccuracy(clean / n, fgsm_correct / n, pgd_correct / n, n)
