"""Test-time adaptation of the norm layers: BN adaptation and TENT.

Both apply only to norms with batch statistics (capability ``BATCH_STATS``) and report accuracies
under their own metric names, never mixed into the plain (eval-mode) ones.

- **BN adaptation** (Schneider et al. 2020): every test batch is normalized with its own
  statistics (prior strength N = 0: the training-set running statistics get no weight); the
  model is otherwise in eval mode and nothing is learned. The adaptation batch size decides how
  good the estimates are (a batch of one image gives each norm its instance statistics).
- **TENT** (Wang et al. 2021): batch statistics as above, plus one Adam step per test batch on
  the entropy of the model's predictions, updating only the norms' affine parameters
  (``normbench.norms.affine_parameters``). Online, as the authors' code: a batch is predicted by
  the forward *before* its own update. The state carries over from batch to batch within one
  stream (one corruption at one severity, or the clean test set) and starts from the trained
  model for every stream (episodic per stream, as the authors' CIFAR-10-C script resets the
  model for each corruption and severity). The trained model itself is never changed: TENT
  adapts a copy.

Which layers switch to batch statistics: every module whose class is a registered norm with the
``BATCH_STATS`` capability and that holds no such norm inside it (ConvNorm keeps its running
Fourier preconditioner and only its inner BatchNorm switches). torch's batch-norm layers use the
batch's statistics in eval mode when their running statistics are detached, so they stay in eval
mode and any other training-mode behaviour (noisy BatchNorm's noise) stays off; any other such
norm is switched by its own ``training`` flag, which is what the capability says changes its
output. Everything is put back when the adaptation ends.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normbench import metrics as M
from normbench.data import TensorLoader
from normbench.norms import BATCH_STATS, affine_parameters, norm_info
from normbench.runtime import autocast

#: The adaptation methods a budget may list, and the metric name of each one's accuracy.
METRICS = {"bn": M.ACCURACY_BN_ADAPT, "tent": M.ACCURACY_TENT}
TENT_BETAS = (0.9, 0.999)  # Adam's, as in the authors' CIFAR-10-C configuration


def _has_batch_stats(module: nn.Module) -> bool:
    info = norm_info(type(module))
    return info is not None and info.has(BATCH_STATS)


def batch_stats_modules(model: nn.Module) -> list[nn.Module]:
    """The innermost norm layers of ``model`` whose output depends on the batch's statistics."""
    found = [m for m in model.modules() if _has_batch_stats(m)]
    return [m for m in found if not any(c is not m and _has_batch_stats(c) for c in m.modules())]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Within the block, the batch-statistics norms of ``model`` normalize every batch with its
    own statistics, whatever the model's mode; on exit their modes, running statistics and flags
    are as before (running buffers the switch itself touched are restored bit for bit). Yields
    the switched modules."""
    modules = batch_stats_modules(model)
    saved = []
    with torch.no_grad():
        for m in modules:
            buffers = [(n, b, b.clone()) for n, b in m.named_buffers(recurse=False)]
            saved.append((m, m.training, getattr(m, "track_running_stats", None), buffers))
            if isinstance(m, _BatchNorm):
                # Without running statistics F.batch_norm uses the batch's and updates nothing.
                m.running_mean, m.running_var, m.track_running_stats = None, None, False
            else:
                m.training = True  # this module only, not its children
    try:
        yield modules
    finally:
        with torch.no_grad():
            for m, training, track, buffers in saved:
                m.training = training
                if track is not None:
                    m.track_running_stats = track
                for name, original, value in buffers:
                    setattr(m, name, original)  # the same tensor objects, with their old values
                    original.copy_(value)


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax of each row of ``logits`` (in nats), computed in float32."""
    logp = logits.float().log_softmax(1)
    return -(logp.exp() * logp).sum(1)


@dataclass
class Adapted:
    """Predictions made while adapting: the logits (float32, CPU) in the loader's order, the
    labels, the mean prediction entropy of each batch and, for TENT, the adapted copy."""

    logits: torch.Tensor
    labels: torch.Tensor
    entropy: list[float] = field(default_factory=list)
    model: nn.Module | None = None

    @property
    def accuracy(self) -> float:
        return (self.logits.argmax(1) == self.labels).float().mean().item()


def _collect(batches: list[tuple[torch.Tensor, torch.Tensor]], entropy: list[float], **kw):
    logits = torch.cat([out.float().cpu() for out, _ in batches])
    labels = torch.cat([y.cpu() for _, y in batches])
    return Adapted(logits, labels, entropy, **kw)


def bn_adapt(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], dtype=None
) -> Adapted:
    """BN adaptation: each batch predicted with its own normalization statistics (N = 0), the
    model otherwise in eval mode; ``model`` is unchanged afterwards."""
    was_training = model.training
    model.eval()
    batches, entropy = [], []
    try:
        with torch.inference_mode(), batch_statistics(model):
            for x, y in loader:
                with autocast(x.device, dtype):
                    out = model(x).float()
                batches.append((out, y))
                entropy.append(softmax_entropy(out).mean().item())
    finally:
        model.train(was_training)
    return _collect(batches, entropy)


def tent(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    dtype=None,
    *,
    lr: float = 1e-3,
) -> Adapted:
    """TENT on one stream of batches, starting from a copy of ``model`` (which is unchanged):
    each batch is predicted with batch statistics, then one Adam step (``lr``, betas 0.9, 0.999,
    no weight decay) lowers the mean entropy of that prediction through the norms' affine
    parameters alone. Returns the predictions (each from before its batch's update) and the copy
    as adapted after the last batch."""
    work = copy.deepcopy(model).eval()
    params = affine_parameters(work)
    chosen = {id(p) for p in params}
    for p in work.parameters():
        p.requires_grad_(id(p) in chosen)
    optimizer = torch.optim.Adam(params, lr=lr, betas=TENT_BETAS)
    batches, entropy = [], []
    # Gradients even when the caller evaluates under inference mode or no_grad.
    with torch.inference_mode(False), torch.enable_grad(), batch_statistics(work):
        for x, y in loader:
            x = x.clone() if x.is_inference() else x  # inference tensors cannot enter autograd
            with autocast(x.device, dtype):
                out = work(x)
            loss = softmax_entropy(out).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            batches.append((out.detach(), y))
            entropy.append(loss.item())
    for p in work.parameters():
        p.requires_grad_(True)
    return _collect(batches, entropy, model=work)


def adapted_accuracies(
    model: nn.Module,
    ds,
    options: dict,
    *,
    device: torch.device,
    dtype=None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> dict[str, float]:
    """Each method of a budget's ``adaptation`` options (``methods``, ``batch_size``,
    ``tent_lr``) on one test stream ``ds`` (an ``ArrayDataset``, in its order, the last batch
    possibly smaller): metric name -> accuracy."""
    loader = TensorLoader(ds, options["batch_size"], device=device, train=False, mean=mean, std=std)
    run = {
        "bn": lambda: bn_adapt(model, loader, dtype),
        "tent": lambda: tent(model, loader, dtype, lr=options["tent_lr"]),
    }
    return {METRICS[m]: run[m]().accuracy for m in options["methods"]}


def describe(options: dict) -> dict:
    """The adaptation protocol as a run's provenance records it."""
    return {
        "methods": list(options["methods"]),
        "batch_size": options["batch_size"],
        "bn": "each test batch normalized with its own statistics (prior strength N = 0), "
        "model otherwise in eval mode, nothing learned",
        "tent": f"Adam lr {options['tent_lr']}, betas {TENT_BETAS}, one step per batch on the "
        "mean prediction entropy, norms' affine parameters only, batch statistics; each batch "
        "predicted before its update; reset to the trained model for each stream (the clean "
        "test set, each corruption at each severity)",
        "streams_in_order": "test images in their stored order, no shuffling",
    }
