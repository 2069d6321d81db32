"""Initialization probes of Lubana et al. (2021), "Beyond BatchNorm": what a norm does to the
signal a network propagates, measured on a few real batches.

- Activation growth: at every block output (``model.probe_blocks()``: after the residual addition
  and its ReLU), the per-channel variance over (N, H, W), averaged over channels, against depth.
- Informative forward propagation: the block output flattened per sample, Y (B x D), rows scaled
  to unit l2 norm, M = Y Y^T; the average cosine similarity between samples
  mean_i (sum_j M_ij - 1) / (B - 1), and the stable rank tr(M) / ||M||_2 of M.
- Gradient explosion: at every convolution, the Frobenius norm of dL/d(its output), L the mean
  cross-entropy of the batch.

The probe runs the model in training mode (batch statistics, as in training), one forward and one
backward pass a batch, and leaves the model exactly as it found it: parameters, buffers (running
statistics), gradients and mode. Pure torch: no data loading, no results store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normbench import metrics as M
from normbench.errors import NormbenchError
from normbench.metrics import MetricRow


def activation_variance(x: Tensor) -> Tensor:
    """Per-channel variance (biased: over the N*H*W values) averaged over channels, as a float64
    scalar; for a 2-D (N, C) input the variance is over N."""
    if x.dim() < 2:
        raise ValueError(f"activation_variance needs an (N, C, ...) tensor; got shape {x.shape}")
    dims = [0, *range(2, x.dim())]  # every dimension but the channels
    x = x.detach()
    # In the activations' own precision (a float64 copy of every activation is most of a probe's
    # cost), shifted by one value of each channel first, so that a large common offset loses no
    # precision (the variance is shift-invariant); again in float64 only where that overflows, so
    # only inf/NaN activations read as such.
    shift = x[(0, slice(None), *([0] * (x.dim() - 2)))].reshape(1, -1, *([1] * (x.dim() - 2)))
    var = torch.var(x - shift, dim=dims, correction=0).double().mean()
    if not torch.isfinite(var) and x.dtype != torch.float64:
        var = torch.var(x.double(), dim=dims, correction=0).mean()
    return var


def gram_statistics(x: Tensor) -> tuple[float, float]:
    """(average cosine similarity between the samples, stable rank of their Gram matrix) of a
    batch (B, ...), each sample flattened; B >= 2."""
    if x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(f"gram_statistics needs a batch of at least 2 samples; got {x.shape}")
    y = x.detach().reshape(x.shape[0], -1).float()
    b = y.shape[0]
    # Rows scaled by their largest magnitude first, so that the norms of huge activations do not
    # overflow in float32 (directions are all the statistics depend on).
    peak = y.abs().amax(dim=1, keepdim=True)
    y = torch.where(peak > 0, y / peak.clamp_min(torch.finfo(y.dtype).tiny), 0.0)
    norms = torch.linalg.vector_norm(y, dim=1, keepdim=True)
    # An all-zero sample (every unit dead after a ReLU) has no direction: its row stays zero, so
    # its similarity with every sample counts as 0 and it adds nothing to the trace.
    y = torch.where(norms > 0, y / norms.clamp_min(torch.finfo(y.dtype).tiny), 0.0)
    m = (y @ y.T).double()  # the B x B Gram matrix; its statistics in float64
    # sum_j M_ij - M_ii is sum_j M_ij - 1 for a unit row, and 0 for a zero row.
    cosine = ((m.sum(dim=1) - m.diagonal()) / (b - 1)).mean().item()
    top = torch.linalg.eigvalsh(m)[-1].item()  # ascending: the largest last
    # A batch of all-zero samples has a zero Gram matrix, rank 0.
    stable_rank = m.trace().item() / top if top > 0 else 0.0
    return cosine, stable_rank


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std(correction=0).item()


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.nan if a == 0 else math.copysign(math.inf, a)
    return a / b


@dataclass
class ProbeResult:
    """Per block (``block_names``) and per convolution (``conv_names``, forward order of first
    call), the mean over the probe batches and its population standard deviation.

    ``nonfinite_block`` is the index of the first block whose activations went inf/NaN, when one
    did: the probe stopped there, the block lists hold the blocks before it only and the gradient
    lists are empty. ``grad_at`` is "conv", or "block" for a model without convolutions, whose
    gradient norms are taken at the block outputs instead.
    """

    block_names: list[str]
    conv_names: list[str]
    act_var: list[float] = field(default_factory=list)
    act_var_std: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)
    cosine_std: list[float] = field(default_factory=list)
    stable_rank: list[float] = field(default_factory=list)
    stable_rank_std: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    grad_norm_std: list[float] = field(default_factory=list)
    nonfinite_block: int | None = None
    grad_at: str = "conv"

    @property
    def nonfinite_name(self) -> str | None:
        i = self.nonfinite_block
        return None if i is None else self.block_names[i]

    def rows(self, step: int) -> list[MetricRow]:
        """The probe's metric rows at training step ``step``: per block, per convolution and the
        whole-model summaries (layer -1); for a probe stopped by non-finite activations, the rows
        of the blocks before that block and the block's index (``PROBE_NONFINITE_LAYER``)."""

        def row(name: str, value: float, layer: int = -1) -> MetricRow:
            return MetricRow(name, float(value), "train", layer=layer, step=step)

        per_block = (
            (M.PROBE_ACT_VAR, self.act_var),
            (M.PROBE_ACT_VAR_STD, self.act_var_std),
            (M.PROBE_COSINE, self.cosine),
            (M.PROBE_COSINE_STD, self.cosine_std),
            (M.PROBE_STABLE_RANK, self.stable_rank),
            (M.PROBE_STABLE_RANK_STD, self.stable_rank_std),
        )
        rows = [row(name, vs[i], i) for i in range(len(self.act_var)) for name, vs in per_block]
        if self.nonfinite_block is not None:
            return [*rows, row(M.PROBE_NONFINITE_LAYER, self.nonfinite_block)]
        per_conv = (
            (M.PROBE_GRAD_NORM, self.grad_norm),
            (M.PROBE_GRAD_NORM_STD, self.grad_norm_std),
        )
        rows += [row(name, vs[i], i) for i in range(len(self.grad_norm)) for name, vs in per_conv]
        if self.act_var:
            rows += [
                row(M.PROBE_ACT_GROWTH, _ratio(self.act_var[-1], self.act_var[0])),
                row(M.PROBE_LAST_COSINE, self.cosine[-1]),
                row(M.PROBE_LAST_STABLE_RANK, self.stable_rank[-1]),
            ]
        if self.grad_norm:
            rows.append(row(M.PROBE_GRAD_RATIO, _ratio(self.grad_norm[0], self.grad_norm[-1])))
        return rows


class _NonFinite(Exception):
    """Raised from a block's hook to stop the forward pass at the first non-finite block."""

    def __init__(self, block: int) -> None:
        super().__init__(block)
        self.block = block


class _Snapshot:
    """The model's parameters, buffers, gradients and mode, to put back after the probe."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.training = model, model.training
        self.params = [(p, p.detach().clone(), p.grad) for p in model.parameters()]
        self.buffers = [
            (m, name, b, b.detach().clone())
            for m in model.modules()
            for name, b in m._buffers.items()
            if b is not None
        ]

    @torch.no_grad()
    def restore(self) -> None:
        for p, value, grad in self.params:
            p.copy_(value)
            p.grad = grad
        # Each buffer is the tensor it was, holding its old values: a module that replaced one
        # (ConvNorm's running preconditioner takes the shape of its first input) gets it back.
        for module, name, buffer, value in self.buffers:
            buffer.copy_(value)
            module._buffers[name] = buffer
        self.model.train(self.training)


def model_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's blocks for the probes, or a ``NormbenchError`` when it does not list them."""
    lister = getattr(model, "probe_blocks", None)
    if lister is None:
        raise NormbenchError(
            f"model {type(model).__name__} does not list its blocks for the probes "
            "(probe_blocks()); probe a model with the 'probes' capability"
        )
    blocks = list(lister())
    if not blocks:
        raise NormbenchError(f"model {type(model).__name__} lists no blocks for the probes")
    return blocks


def init_probe(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    blocks: list[tuple[str, nn.Module]] | None = None,
) -> ProbeResult:
    """Probe ``model`` on ``batches`` of (images, labels): per block activation variance, cosine
    similarity and stable rank, per convolution the gradient norm at its output; means and
    standard deviations over the batches. ``blocks`` defaults to ``model.probe_blocks()``.

    Every ``nn.Conv2d`` counts, including convolutions a norm owns, numbered in the order of their
    first call; a model without any has its gradient norms taken at the block outputs instead
    (``grad_at`` "block"). The model is left exactly as it was (see ``_Snapshot``).
    """
    blocks = model_blocks(model) if blocks is None else list(blocks)
    names = {m: n for n, m in model.named_modules()}
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    grad_at = "conv" if convs else "block"
    targets = set(convs) if convs else {m for _, m in blocks}

    block_values: list[dict[str, list[float]]] = [
        {"var": [], "cos": [], "rank": []} for _ in blocks
    ]
    order: dict[nn.Module, int] = {}  # target module -> index, by first call
    grad_values: dict[int, list[float]] = {}
    # Per batch: the blocks already measured (a block called twice counts its first output) and
    # the targets' outputs, whose gradients the backward pass gives.
    seen: set[int] = set()
    outputs: dict[int, Tensor] = {}

    def on_block(module: nn.Module, args, out: Tensor, i: int) -> None:
        if i in seen:
            return
        seen.add(i)
        var = activation_variance(out)
        if not torch.isfinite(var):
            raise _NonFinite(i)
        cosine, rank = gram_statistics(out)
        values = block_values[i]
        values["var"].append(var.item())
        values["cos"].append(cosine)
        values["rank"].append(rank)

    def on_target(module: nn.Module, args, out: Tensor) -> None:
        index = order.setdefault(module, len(order))
        if index not in outputs and isinstance(out, Tensor) and out.requires_grad:
            outputs[index] = out

    snapshot = _Snapshot(model)
    handles = []
    nonfinite: int | None = None
    try:
        for i, (_, module) in enumerate(blocks):
            handles.append(module.register_forward_hook(lambda m, a, o, i=i: on_block(m, a, o, i)))
        handles += [m.register_forward_hook(on_target) for m in targets]
        model.train()
        done = 0
        for x, y in batches:
            if len(x) < 2:
                raise NormbenchError(f"a probe batch needs at least 2 samples; got {len(x)}")
            seen.clear()
            outputs.clear()
            try:
                with torch.enable_grad():
                    loss = F.cross_entropy(model(x).float(), y)
            except _NonFinite as err:
                nonfinite = err.block
                break
            indices = sorted(outputs)
            with torch.enable_grad():
                grads = torch.autograd.grad(loss, [outputs[i] for i in indices], allow_unused=True)
            for i, g in zip(indices, grads, strict=True):
                # None: an output the loss does not depend on, whose gradient is zero.
                norm = 0.0 if g is None else torch.linalg.vector_norm(g.double()).item()
                grad_values.setdefault(i, []).append(norm)
            del loss, grads
            outputs.clear()
            done += 1
        if not done and nonfinite is None:
            raise NormbenchError("the probe got no batches")
    finally:
        outputs.clear()
        for handle in handles:
            handle.remove()
        snapshot.restore()

    block_names = [name for name, _ in blocks]
    by_index = sorted(order, key=order.get)
    result = ProbeResult(block_names, [names.get(m, "?") for m in by_index], grad_at=grad_at)
    result.nonfinite_block = nonfinite
    measured = len(blocks) if nonfinite is None else nonfinite
    for values in block_values[:measured]:
        if not values["var"]:  # a listed block the forward pass never calls: nothing after it
            break
        for key, mean, std in (
            ("var", result.act_var, result.act_var_std),
            ("cos", result.cosine, result.cosine_std),
            ("rank", result.stable_rank, result.stable_rank_std),
        ):
            m, s = _mean_std(values[key])
            mean.append(m)
            std.append(s)
    if nonfinite is None:
        for i in range(len(by_index)):
            m, s = _mean_std(grad_values.get(i, [math.nan]))
            result.grad_norm.append(m)
            result.grad_norm_std.append(s)
    return result
