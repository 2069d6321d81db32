"""Loss-landscape and internal covariate shift (ICS) probes of Santurkar et al. (2018), "How does
batch normalization help optimization?", taken on one batch during training.

``landscape_probe``: with ``g = grad L(w)`` over every trainable parameter, at the points
``w - eta g`` of a grid of step sizes ``eta``:

- loss variation: the lowest and highest ``L(w - eta g)`` over the grid, as in the paper's
  figure, which moves along the gradient from ``w``. ``L(w)`` itself is not part of the range
  (step sizes are positive); it is reported as ``loss``;
- gradient predictiveness: ``||grad L(w - eta g) - grad L(w)||_2`` over all parameters, lowest
  and highest over the grid;
- effective beta-smoothness: ``max_eta ||grad L(w - eta g) - grad L(w)||_2 / ||eta g||_2``.

``ics_probe``: for each weight layer ``i`` (convolutions and linear layers in forward order),
``G_i`` is the gradient of the loss w.r.t. its weight ``W_i`` and ``G'_i`` the same gradient after
the earlier layers took their gradient step ``W_j - lr G_j`` (``j < i``), on the same batch with
the same loss; the probe reports ``||G_i - G'_i||_2`` and the cosine of the angle between them.

What the passes see. The model stays in the mode it is in (training mode during training: batch
statistics). Every point of the landscape is evaluated from the state the model had at ``w``:
running statistics, the layers' extra state and the random stream are reset before each pass, so
a stochastic layer (dropout, noisy BatchNorm) draws the same masks and noise at every point and
the differences measure the landscape, not the noise. The ``G'`` passes of the ICS probe are
instead evaluated from the state the ``G`` pass left: the random stream after it and, for noisy
BatchNorm, the next noise draw (its draw advances with each backward pass). So ``G'`` sees a
fresh draw, the one the next training step would see: the distribution shift the paper injects
is part of what the ICS probe measures, as it would be part of what the next step's update meets.

Both probes leave the model exactly as they found it: parameters are restored by copying saved
values (never by adding a step back, which rounds), and so are every buffer (running statistics),
every layer's extra state and every ``.grad``; they run under ``torch.random.fork_rng`` on the
model's devices, so the training's random stream is the same with or without them. Gradients are
taken with ``torch.autograd.grad``, so ``.grad`` is never written.

Cost: a landscape probe is one forward/backward pass per step size, plus one at ``w``; an ICS
probe one per weight layer, plus one. The training loop probes every few steps.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normbench.errors import NormbenchError

LossFn = Callable[[], torch.Tensor]


@dataclass(frozen=True)
class LandscapeResult:
    """One landscape probe: ``losses[k]`` and ``grad_changes[k]`` at ``step_sizes[k]``."""

    step_sizes: tuple[float, ...]
    loss: float  # L(w)
    grad_norm: float  # ||g||_2 = ||grad L(w)||_2
    losses: tuple[float, ...]  # L(w - eta g)
    grad_changes: tuple[float, ...]  # ||grad L(w - eta g) - g||_2

    @property
    def loss_min(self) -> float:
        return _nan_or(min, self.losses)

    @property
    def loss_max(self) -> float:
        return _nan_or(max, self.losses)

    @property
    def grad_change_min(self) -> float:
        return _nan_or(min, self.grad_changes)

    @property
    def grad_change_max(self) -> float:
        return _nan_or(max, self.grad_changes)

    @property
    def beta(self) -> float:
        """Effective beta-smoothness: the largest gradient change per distance moved (NaN for a
        zero gradient, along which the model does not move)."""
        ratios = [
            change / (eta * self.grad_norm) if self.grad_norm > 0 else math.nan
            for eta, change in zip(self.step_sizes, self.grad_changes, strict=True)
        ]
        return _nan_or(max, ratios)


@dataclass(frozen=True)
class ICSResult:
    """One ICS probe: per weight layer (forward order), its module name, ``||G - G'||_2`` and
    ``cos(G, G')``."""

    layers: tuple[str, ...]
    l2: tuple[float, ...]
    cosine: tuple[float, ...]
    loss: float  # L(w), from the G pass


def _nan_or(pick: Callable, values: Sequence[float]) -> float:
    """``pick(values)``, or NaN when one of them is NaN (``min`` and ``max`` would skip it or
    not depending on where it stands)."""
    return math.nan if any(math.isnan(v) for v in values) else float(pick(values))


# --- the model's state, saved and restored exactly ------------------------------------------------


def _has_extra_state(module: nn.Module) -> bool:
    return type(module).get_extra_state is not nn.Module.get_extra_state


@dataclass
class _Snapshot:
    """Copies of what a pass may change: parameters and gradients (``with_params``), buffers and
    the layers' extra state."""

    params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor | None]]
    buffers: list[tuple[nn.Module, str, torch.Tensor]]
    extra: list[tuple[nn.Module, Any]]

    @classmethod
    @torch.no_grad()
    def take(cls, model: nn.Module, with_params: bool = True) -> _Snapshot:
        params = []
        if with_params:
            params = [
                (p, p.detach().clone(), None if p.grad is None else p.grad.detach().clone())
                for p in model.parameters()
            ]
        buffers = [
            (module, name, buffer.detach().clone())
            for module in model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        extra = [
            (module, copy.deepcopy(module.get_extra_state()))
            for module in model.modules()
            if _has_extra_state(module)
        ]
        return cls(params, buffers, extra)

    @torch.no_grad()
    def restore(self) -> None:
        for p, value, grad in self.params:
            p.copy_(value)
            if grad is None:
                p.grad = None
            elif p.grad is not None and p.grad.shape == grad.shape:
                p.grad.copy_(grad)
            else:
                p.grad = grad.clone()
        for module, name, value in self.buffers:
            current = module._buffers.get(name)
            if current is not None and current.shape == value.shape:
                current.copy_(value)
            else:  # a layer that re-created its buffer in the pass
                module._buffers[name] = value.clone()
        for module, state in self.extra:
            module.set_extra_state(copy.deepcopy(state))


class _RandomState:
    """The global random generators of the CPU and of ``devices`` (CUDA indices), to rewind."""

    def __init__(self, devices: list[int]) -> None:
        self.devices = devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(state, d)


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted(
        {t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda}
    )


@contextlib.contextmanager
def _isolated(model: nn.Module) -> Iterator[list[int]]:
    """Run the block under ``fork_rng`` on the model's CUDA devices and restore the model's
    state afterwards, however the block ends. Yields the CUDA device indices."""
    devices = _cuda_devices(model)
    snapshot = _Snapshot.take(model)
    with torch.random.fork_rng(devices=devices):
        try:
            yield devices
        finally:
            snapshot.restore()


# --- gradients ----------------------------------------------------------------------------------


def _gradients(loss_fn: LossFn, tensors: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """The loss and its gradient w.r.t. ``tensors`` (zeros for a tensor the loss does not use)."""
    with torch.enable_grad():
        loss = loss_fn()
        if loss.numel() != 1:
            raise NormbenchError(
                f"loss_fn must return a scalar loss, not shape {tuple(loss.shape)}"
            )
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return float(loss.detach().double()), [
        torch.zeros_like(t) if g is None else g.detach()
        for t, g in zip(tensors, grads, strict=True)
    ]


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    """The l2 norm of the concatenation of ``tensors``, accumulated in float64."""
    if not tensors:
        return 0.0
    norms = [torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _difference_norm(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return _norm([x.double() - y.double() for x, y in zip(a, b, strict=True)])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    denominator = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(a @ b) / denominator if denominator > 0 else math.nan


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise NormbenchError("the model has no trainable parameters to probe")
    return params


def _check_step_sizes(step_sizes: Sequence[float]) -> tuple[float, ...]:
    etas = tuple(step_sizes)
    if not etas:
        raise NormbenchError("the landscape probe needs at least one step size")
    for eta in etas:
        if isinstance(eta, bool) or not isinstance(eta, int | float):
            raise NormbenchError(f"step sizes are numbers; got {eta!r}")
        if not (math.isfinite(eta) and eta > 0):
            raise NormbenchError(f"step sizes must be finite and > 0; got {eta!r}")
    return tuple(float(eta) for eta in etas)


# --- the probes ---------------------------------------------------------------------------------


def landscape_probe(
    model: nn.Module, loss_fn: LossFn, step_sizes: Sequence[float]
) -> LandscapeResult:
    """Loss variation, gradient predictiveness and effective beta-smoothness along the gradient
    (see the module docstring). ``loss_fn()`` runs the forward pass on the batch being probed
    (under the run's autocast) and returns the scalar loss."""
    etas = _check_step_sizes(step_sizes)
    params = _trainable(model)
    with _isolated(model) as devices:
        at_w = _Snapshot.take(model, with_params=False)  # buffers, extra state: rewound per point
        random = _RandomState(devices)
        weights = [p.detach().clone() for p in params]
        loss, g = _gradients(loss_fn, params)
        losses, changes = [], []
        for eta in etas:
            at_w.restore()
            random.rewind()
            with torch.no_grad():
                for p, w, gi in zip(params, weights, g, strict=True):
                    p.copy_(torch.sub(w, gi, alpha=eta))
            loss_eta, g_eta = _gradients(loss_fn, params)
            losses.append(loss_eta)
            changes.append(_difference_norm(g_eta, g))
    return LandscapeResult(etas, loss, _norm(g), tuple(losses), tuple(changes))


def weight_layers(model: nn.Module) -> list[nn.Module]:
    """The convolutions and linear layers with a trainable ``weight`` (in module order)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
        and isinstance(m.weight, nn.Parameter)
        and m.weight.requires_grad
    ]


def ics_probe(
    model: nn.Module,
    loss_fn: LossFn,
    layers: list[nn.Module] | None = None,
    *,
    lr: float,
) -> ICSResult:
    """Internal covariate shift per weight layer (see the module docstring). ``layers``: the
    layers to probe, in forward order; by default every convolution and linear layer with a
    trainable weight, in the order the ``G`` pass first calls them (layers it never calls are
    left out). ``lr``: the step the earlier layers take, the run's current learning rate."""
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
        raise NormbenchError(f"the ICS probe's learning rate must be finite and >= 0; got {lr!r}")
    given = layers is not None
    candidates = list(layers) if given else weight_layers(model)
    for layer in candidates:
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, nn.Parameter) or not weight.requires_grad:
            raise NormbenchError(
                f"the ICS probe needs layers with a trainable weight; {type(layer).__name__} "
                "has none"
            )
    if not candidates:
        raise NormbenchError("the model has no convolution or linear layer to probe")
    if len({id(m) for m in candidates}) < len(candidates):
        raise NormbenchError("the ICS probe's layers list a layer twice")
    names = {id(m): name for name, m in model.named_modules()}
    called: list[nn.Module] = []
    seen: set[int] = set()

    def record(module: nn.Module, args: Any) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            called.append(module)

    with _isolated(model) as devices:
        handles = [] if given else [m.register_forward_pre_hook(record) for m in candidates]
        try:
            loss, grads = _gradients(loss_fn, [m.weight for m in candidates])
        finally:
            for handle in handles:
                handle.remove()
        by_layer = {id(m): g for m, g in zip(candidates, grads, strict=True)}
        order = candidates if given else called
        G = [by_layer[id(m)] for m in order]
        # What the G pass left (running statistics, noise draws, the random stream): what the
        # next training step would start from; every G' pass starts from it.
        after = _Snapshot.take(model, with_params=False)
        random = _RandomState(devices)
        l2, cosine = [], []
        for i, layer in enumerate(order):
            if i > 0:
                earlier = order[i - 1].weight
                with torch.no_grad():
                    earlier.sub_(G[i - 1], alpha=lr)  # W_j - lr G_j; undone by the snapshot
            after.restore()
            random.rewind()
            _, (g_prime,) = _gradients(loss_fn, [layer.weight])
            l2.append(_difference_norm([G[i]], [g_prime]))
            cosine.append(_cosine(G[i], g_prime))
    layer_names = tuple(names.get(id(m), type(m).__name__) for m in order)
    return ICSResult(layer_names, tuple(l2), tuple(cosine), loss)
