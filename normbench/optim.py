"""Optimizers, their registry, the weight-decay rule, sharpness-aware wrappers and learning-rate
schedules.

Weight-decay rule (recorded in every run's protocol as ``WEIGHT_DECAY_RULE``): weight decay applies
to convolution and linear weights only; norm-layer affine parameters (selected through each norm's
``affine_parameters()``, not by name) and all biases (tensors with fewer than 2 dimensions) get
none. Decaying a norm's scale changes the effective learning rate of scale-invariant layers, so the
rule changes how norms compare and is part of the protocol.

Sharpness-aware minimization (SAM, Foret et al. 2021; ASAM, Kwon et al. 2021; SAM-ON, Mueller et
al. 2023) wraps any single-pass optimizer registered here. A two-pass step (``training_step``):
forward/backward on a batch; an ascent ``e`` on the selected parameters; forward/backward on the
same batch at ``w + e``; every parameter restored bit for bit; the base optimizer's step with the
second gradient. What the wrappers perturb is chosen through each norm's ``affine_parameters()``,
never by parameter names: all trainable parameters (``sam``, ``asam``), only the norms' affine
parameters (``sam_on``, ``asam_on``) or all but those (``sam_no_norm``). The gradient norm of the
ascent is taken over the perturbed parameters only.

Running statistics (``second_pass_stats``): the model stays in training mode for both passes, so
batch statistics normalize both. By default (``update``, what the SAM-ON reference code does and
so what its figures were measured with) the second pass also updates the running statistics, so
every buffer of the model moves twice per step. ``freeze`` restores every buffer after the second
pass, as the davda54/sam implementation advises, so the running statistics only see unperturbed
weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import torch
from annotated_types import Ge, Gt
from torch import nn

from normbench.errors import NormbenchError
from normbench.norms import affine_parameters
from normbench.registry import Entry, Registry

WEIGHT_DECAY_RULE = "decay conv/linear weights only; none on norm affine parameters and biases"

#: Capability flag: the optimizer needs two forward/backward passes on the same batch per step.
TWO_PASS = "two_pass"
#: Capability flag: the optimizer acts on the norms' affine parameters only, so a norm without any
#: leaves it nothing to do (the plan refuses such pairs).
NORM_AFFINE_ONLY = "norm_affine_only"

OptimizerBuilder = Callable[..., torch.optim.Optimizer]

#: A variant's tag: ``sgd:lr0.5`` is ``sgd`` with its own hyper-parameter table in a budget.
_VARIANT_TAG = re.compile(r"[A-Za-z0-9_.=+-]{1,40}")


class OptimizerRegistry(Registry[OptimizerBuilder]):
    """The optimizer registry. A name may carry a variant tag, ``sgd:lr0.5``: the same optimizer
    under another name, so one suite can cross two settings of it (a budget gives each name its
    own hyper-parameters) and each gets its own leaderboard row."""

    def get(self, name: str) -> Entry[OptimizerBuilder]:
        base, sep, tag = name.partition(":")
        entry = super().get(base)
        if not sep:
            return entry
        if not _VARIANT_TAG.fullmatch(tag):
            raise NormbenchError(
                f"Optimizer variant {name!r}: the tag after ':' must be 1 to 40 letters, digits "
                "or . _ = + - (e.g. 'sgd:lr0.5')."
            )
        return Entry(entry.obj, dataclasses.replace(entry.info, name=name))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        try:
            self.get(name)
        except NormbenchError:
            return False
        return True


OPTIMIZERS = OptimizerRegistry("optimizer")
register_optimizer = OPTIMIZERS.register


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split ``model``'s trainable parameters by the weight-decay rule."""
    exempt = {id(p) for p in affine_parameters(model)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@register_optimizer(
    "sgd",
    description="SGD with (Nesterov) momentum.",
    family="sgd",
)
def sgd(
    model: nn.Module,
    *,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        parameter_groups(model, weight_decay), lr=lr, momentum=momentum, nesterov=nesterov
    )


@register_optimizer(
    "adamw",
    description="AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.",
    family="adam",
)
def adamw(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.05,
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        parameter_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps
    )


@register_optimizer(
    "adam",
    description="Adam (Kingma & Ba 2015) without weight decay, as GAN training uses it (Radford et "
    "al. 2016; Miyato et al. 2018: lr 2e-4, betas (0.5, 0.999) for both networks).",
    family="adam",
)
def adam(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), eps=eps)


# --- sharpness-aware minimization ---------------------------------------------------------------

#: ``rho`` of every sharpness-aware optimizer: the radius of the ascent, strictly positive.
Rho = Annotated[float, Gt(0)]
#: What the second pass does to running statistics (see the module docstring).
SecondPassStats = Literal["update", "freeze"]
#: Added to the ascent's gradient norm, as in the SAM-ON reference code, so that a zero gradient
#: gives a zero perturbation.
NORM_EPS = 1e-16


class NonFiniteStep(ArithmeticError):
    """A training step met a non-finite loss or perturbation: the run diverged."""


class SharpnessAware:
    """A two-pass optimizer: an ascent of radius ``rho`` on ``perturbed``, then ``base``'s step
    with the gradient taken at the perturbed point.

    The ascent is ``e = rho * T^2 g / ||T g||_2`` over the perturbed parameters' gradients ``g``:
    ``T = 1`` for SAM; for ASAM (``adaptive``) ``T = |w| + eta`` elementwise, except for biases
    (a module's ``bias``), which keep ``T = 1`` unless ``normalize_bias``. Only the base optimizer
    carries state from step to step: each step's perturbation is computed, applied and undone
    within the step, so a checkpoint between steps holds everything there is.
    """

    def __init__(
        self,
        base: torch.optim.Optimizer,
        model: nn.Module,
        perturbed: list[nn.Parameter],
        *,
        rho: float,
        adaptive: bool = False,
        eta: float = 0.0,
        normalize_bias: bool = False,
        second_pass_stats: SecondPassStats = "update",
        base_name: str = "",
        selection: str = "",
    ) -> None:
        if not rho >= 0:  # 0 is allowed here (it is the base optimizer), not in suites
            raise ValueError(f"rho must be >= 0, got {rho}")
        if second_pass_stats not in ("update", "freeze"):
            raise ValueError(
                f"second_pass_stats is 'update' or 'freeze', not {second_pass_stats!r}"
            )
        self.base, self.model, self.perturbed = base, model, list(perturbed)
        self.rho, self.adaptive, self.eta = rho, adaptive, eta
        self.second_pass_stats = second_pass_stats
        self.base_name, self.selection = base_name, selection
        biases = set() if normalize_bias else _bias_ids(model)
        self._scaled = [adaptive and id(p) not in biases for p in self.perturbed]

    # What the training loop and checkpoints use of an optimizer.
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.base.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])

    def describe(self) -> dict[str, Any]:
        """What a run records of its optimizer beyond the hyper-parameters it was given."""
        total = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        count = sum(p.numel() for p in self.perturbed)
        return {
            "base": self.base_name,
            "rho": self.rho,
            "adaptive": self.adaptive,
            "perturbed": self.selection,
            "perturbed_parameters": count,
            "perturbed_fraction": count / max(total, 1),
            "second_pass_stats": self.second_pass_stats,
        }

    @torch.no_grad()
    def perturbation(self) -> list[torch.Tensor | None]:
        """The ascent ``e`` for each perturbed parameter (None where it has no gradient)."""
        scaled = []
        for p, adaptive in zip(self.perturbed, self._scaled, strict=True):
            if p.grad is None:
                scaled.append(None)
                continue
            t = p.abs().add_(self.eta) if adaptive else None
            scaled.append((t, p.grad if t is None else p.grad * t))
        present = [s for s in scaled if s is not None]
        if not present:
            return [None] * len(self.perturbed)
        norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(tg, dtype=torch.float32) for _, tg in present])
        )
        factor = self.rho / (norm + NORM_EPS)
        return [
            None if s is None else (s[1] if s[0] is None else s[1] * s[0]) * factor.to(s[1].dtype)
            for s in scaled
        ]

    def step(
        self,
        closure: Callable[[], torch.Tensor],
        watch: DivergenceWatch | None = None,
        first_loss: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The two-pass step. The first pass's gradient is in ``.grad``; ``closure`` computes the
        loss on the same batch, zeroes the gradients and backpropagates (``training_step`` makes
        it). Without ``watch``, raises ``NonFiniteStep`` with every parameter as it was before the
        step; with it, the first loss, the perturbation and the second loss go to the watch and
        nothing waits on the device."""
        e = self.perturbation()
        applied = [(p, ei) for p, ei in zip(self.perturbed, e, strict=True) if ei is not None]
        finite = (torch.isfinite(ei).all() for _, ei in applied)
        if watch is None and applied and not torch.stack(list(finite)).all():
            raise NonFiniteStep("non-finite sharpness-aware perturbation")
        with torch.no_grad():
            saved = [p.detach().clone() for p, _ in applied]
            for p, ei in applied:
                p.add_(ei)
        try:
            with self._second_pass_buffers(), torch.enable_grad():
                loss = closure()
        finally:
            with torch.no_grad():  # a copy, not w + e - e: the restore is exact
                for (p, _), w in zip(applied, saved, strict=True):
                    p.copy_(w)
        if watch is not None:
            first = [] if first_loss is None else [first_loss]
            watch.observe(*first, loss, *(ei for _, ei in applied))
        elif not torch.isfinite(loss).item():
            raise NonFiniteStep(f"non-finite training loss at the perturbed point ({loss.item()})")
        self.base.step()
        return loss

    @contextlib.contextmanager
    def _second_pass_buffers(self) -> Iterator[None]:
        if self.second_pass_stats == "update":
            yield
            return
        saved = [
            (module, name, buffer.detach().clone())
            for module in self.model.modules()
            for name, buffer in module._buffers.items()
            if buffer is not None
        ]
        try:
            yield
        finally:
            with torch.no_grad():
                for module, name, value in saved:
                    current = module._buffers.get(name)
                    if current is not None and current.shape == value.shape:
                        current.copy_(value)
                    else:  # a layer that re-created its buffer in the pass
                        module._buffers[name] = value


def _bias_ids(model: nn.Module) -> set[int]:
    """Every parameter that is some module's ``bias`` (ASAM leaves shifts unscaled)."""
    return {
        id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)
    }


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _norm_affine(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in affine_parameters(model) if p.requires_grad]


def _all_but_norm_affine(model: nn.Module) -> list[nn.Parameter]:
    norm = {id(p) for p in affine_parameters(model)}
    return [p for p in _trainable(model) if id(p) not in norm]


SELECTIONS: dict[str, tuple[str, Callable[[nn.Module], list[nn.Parameter]]]] = {
    "all": ("all trainable parameters", _trainable),
    "norm": ("the norms' affine parameters", _norm_affine),
    "no_norm": ("all trainable parameters but the norms' affine ones", _all_but_norm_affine),
}


def _sharpness_aware(
    model: nn.Module,
    selection: str,
    *,
    rho: float,
    base: str,
    second_pass_stats: SecondPassStats,
    adaptive: bool = False,
    eta: float = 0.0,
    normalize_bias: bool = False,
    base_hparams: dict[str, Any],
) -> SharpnessAware:
    entry = OPTIMIZERS.get(base)
    if entry.info.has(TWO_PASS):
        raise NormbenchError(
            f"base optimizer {base!r} is itself two-pass; a sharpness-aware optimizer wraps a "
            f"single-pass one ({', '.join(single_pass_optimizers())})."
        )
    what, select = SELECTIONS[selection]
    perturbed = select(model)
    if not perturbed:
        raise NormbenchError(
            f"the model has no {what.removeprefix('the ')} to perturb (a norm without affine "
            "parameters?), so this optimizer would be its base optimizer under another name."
        )
    return SharpnessAware(
        entry.obj(model, **base_hparams),
        model,
        perturbed,
        rho=rho,
        adaptive=adaptive,
        eta=eta,
        normalize_bias=normalize_bias,
        second_pass_stats=second_pass_stats,
        base_name=base,
        selection=what,
    )


@register_optimizer(
    "sam",
    description="SAM (Foret et al. 2021): ascent rho g/||g|| on all trainable parameters, then "
    "the base optimizer's step with the gradient there.",
    family="sam",
    capabilities={TWO_PASS},
)
def sam(
    model: nn.Module,
    *,
    rho: Rho = 0.1,
    base: str = "sgd",
    second_pass_stats: SecondPassStats = "update",
    **base_hparams: Any,
) -> SharpnessAware:
    return _sharpness_aware(
        model, "all", rho=rho, base=base, second_pass_stats=second_pass_stats,
        base_hparams=base_hparams,
    )  # fmt: skip


@register_optimizer(
    "asam",
    description="ASAM (Kwon et al. 2021): SAM with the elementwise adaptive ascent "
    "rho T^2 g/||T g||, T = |w| + eta (eta 0; biases T = 1 unless normalize_bias), on all "
    "trainable parameters.",
    family="sam",
    capabilities={TWO_PASS},
)
def asam(
    model: nn.Module,
    *,
    rho: Rho = 1.0,
    eta: Annotated[float, Ge(0)] = 0.0,
    normalize_bias: bool = False,
    base: str = "sgd",
    second_pass_stats: SecondPassStats = "update",
    **base_hparams: Any,
) -> SharpnessAware:
    return _sharpness_aware(
        model, "all", rho=rho, base=base, second_pass_stats=second_pass_stats, adaptive=True,
        eta=eta, normalize_bias=normalize_bias, base_hparams=base_hparams,
    )  # fmt: skip


@register_optimizer(
    "sam_on",
    description="SAM-ON (Mueller et al. 2023): SAM's ascent on the norms' affine parameters "
    "only (their affine_parameters()), gradient norm over those; the base step updates all.",
    family="sam",
    capabilities={TWO_PASS, NORM_AFFINE_ONLY},
)
def sam_on(
    model: nn.Module,
    *,
    rho: Rho = 0.5,
    base: str = "sgd",
    second_pass_stats: SecondPassStats = "update",
    **base_hparams: Any,
) -> SharpnessAware:
    return _sharpness_aware(
        model, "norm", rho=rho, base=base, second_pass_stats=second_pass_stats,
        base_hparams=base_hparams,
    )  # fmt: skip


@register_optimizer(
    "asam_on",
    description="ASAM-ON (Mueller et al. 2023): ASAM's elementwise adaptive ascent on the norms' "
    "affine parameters only; the base step updates all.",
    family="sam",
    capabilities={TWO_PASS, NORM_AFFINE_ONLY},
)
def asam_on(
    model: nn.Module,
    *,
    rho: Rho = 10.0,
    eta: Annotated[float, Ge(0)] = 0.0,
    normalize_bias: bool = True,
    base: str = "sgd",
    second_pass_stats: SecondPassStats = "update",
    **base_hparams: Any,
) -> SharpnessAware:
    # rho 10 with scaled shifts: the reference code's example run of ASAM-ON (WRN-28-10,
    # CIFAR-100); ASAM's own defaults (Kwon et al.) leave shifts unscaled.
    return _sharpness_aware(
        model, "norm", rho=rho, base=base, second_pass_stats=second_pass_stats, adaptive=True,
        eta=eta, normalize_bias=normalize_bias, base_hparams=base_hparams,
    )  # fmt: skip


@register_optimizer(
    "sam_no_norm",
    description="SAM without the norms (Mueller et al. 2023's ablation): the ascent on every "
    "trainable parameter except the norms' affine ones.",
    family="sam",
    capabilities={TWO_PASS},
)
def sam_no_norm(
    model: nn.Module,
    *,
    rho: Rho = 0.1,
    base: str = "sgd",
    second_pass_stats: SecondPassStats = "update",
    **base_hparams: Any,
) -> SharpnessAware:
    return _sharpness_aware(
        model, "no_norm", rho=rho, base=base, second_pass_stats=second_pass_stats,
        base_hparams=base_hparams,
    )  # fmt: skip


def single_pass_optimizers() -> list[str]:
    return [n for n in OPTIMIZERS.names() if not OPTIMIZERS.info(n).has(TWO_PASS)]


def hparam_shares(name: str, hparams: dict[str, Any]) -> list[tuple[str, OptimizerBuilder, dict]]:
    """Which builder takes which of ``hparams`` for optimizer ``name``: one builder for a plain
    optimizer; for a wrapper, its own keyword arguments, then the rest for its base optimizer
    (``base``, or the wrapper's default one). Raises ``UnknownNameError`` for an unknown base
    and ``NormbenchError`` for a two-pass base."""
    builder = OPTIMIZERS.get(name).obj
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return [(name, builder, dict(hparams))]
    own = {k: v for k, v in hparams.items() if k in params and k != "model"}
    rest = {k: v for k, v in hparams.items() if k not in own}
    base = own.get("base", params["base"].default)
    if not isinstance(base, str):
        return [(name, builder, own)]  # the wrapper's own check reports the type
    if OPTIMIZERS.get(base).info.has(TWO_PASS):
        raise NormbenchError(
            f"{base!r} is itself a two-pass optimizer; base must be a single-pass one "
            f"({', '.join(single_pass_optimizers())})."
        )
    return [(name, builder, own), *hparam_shares(base, rest)]


def optimizer_options(name: str) -> dict[str, Any]:
    """The keyword arguments of optimizer ``name`` with their defaults (``...``: required)."""
    params = inspect.signature(OPTIMIZERS.get(name).obj).parameters
    return {
        n: ... if p.default is inspect.Parameter.empty else p.default
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def create_optimizer(
    name: str, model: nn.Module, **hparams: Any
) -> torch.optim.Optimizer | SharpnessAware:
    return OPTIMIZERS.get(name).obj(model, **hparams)


class DivergenceWatch:
    """Non-finite losses noticed on the device, so a training step needs no host sync.

    Each step folds whether its loss (and, for a two-pass optimizer, its perturbation and second
    loss) is finite into a device tensor holding the first bad step; a device counter counts the
    steps done. :meth:`poll` reads both in one transfer (the only sync): the loop calls it every
    few steps and at the end of each epoch, and it raises ``NonFiniteStep`` naming the first bad
    step. Parameters may have been updated by the bad step and the few after it before the poll
    notices; the run stops there as diverged, so nothing is saved from them.
    """

    def __init__(self, device: torch.device, start: int = 0) -> None:
        self.steps = torch.full((), start, dtype=torch.long, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, *values: torch.Tensor) -> None:
        """Note whether ``values`` of the current step are all finite (no sync)."""
        bad = torch.stack([~torch.isfinite(v).all() for v in values]).any()
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.steps, self.first_bad)

    def step_done(self) -> None:
        self.steps += 1

    def poll(self) -> int:
        """The number of steps done (one host sync); raises ``NonFiniteStep`` with the first
        step whose loss or perturbation was not finite, if any."""
        done, first_bad = torch.stack([self.steps, self.first_bad]).tolist()
        if first_bad >= 0:
            raise NonFiniteStep(f"non-finite training loss or perturbation at step {first_bad}")
        return done

    @property
    def first_bad_step(self) -> int:
        return int(self.first_bad)


def training_step(
    optimizer: torch.optim.Optimizer | SharpnessAware,
    forward: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    watch: DivergenceWatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimization step on one batch; returns the first pass's output and loss.

    ``forward()`` computes the model's output and loss on the batch (under the run's autocast); a
    two-pass optimizer calls it again at its perturbed point. Without ``watch``, raises
    ``NonFiniteStep`` for a non-finite loss or perturbation, before any parameter changes (one
    host sync per check). With ``watch``, the step never waits on the device: finiteness goes to
    the watch, which the caller polls every few steps.
    """
    out, loss = forward()
    if watch is None and not torch.isfinite(loss).item():
        raise NonFiniteStep(f"non-finite training loss ({loss.item()})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if isinstance(optimizer, SharpnessAware):

        def second_pass() -> torch.Tensor:
            _, again = forward()
            optimizer.zero_grad(set_to_none=True)
            again.backward()
            return again

        optimizer.step(second_pass, watch=watch, first_loss=loss)
    else:
        if watch is not None:
            watch.observe(loss)
        optimizer.step()
    if watch is not None:
        watch.step_done()
    return out, loss


def lr_factor(
    schedule: str,
    step: int,
    total_steps: int,
    *,
    warmup: float = 0.0,
    milestones: tuple[float, ...] = (),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    ``warmup`` and ``milestones`` are fractions of training, so one schedule fits every budget.
    - ``onecycle``: linear warm-up from 0.1 to 1 over ``warmup``, then linear decay to 0.
    - ``cosine``: linear warm-up over ``warmup``, then half-cosine decay to 0.
    - ``multistep``: constant, multiplied by ``gamma`` at each milestone (He et al. 2016).
    """
    progress = step / max(total_steps, 1)
    if schedule == "multistep":
        return gamma ** sum(progress >= m for m in milestones)
    if warmup > 0 and progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    rest = (progress - warmup) / max(1.0 - warmup, 1e-12)
    if schedule == "onecycle":
        return max(0.0, 1.0 - rest)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(rest, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}")


SCHEDULES = ("onecycle", "cosine", "multistep")
