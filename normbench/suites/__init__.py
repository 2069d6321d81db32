"""Suites: versioned TOML protocols, their validation, and the planner that expands them into runs.

A suite file names the dataset, the norms and optimizers to cross, the seeds, the reference pair
and one table per *budget* (``smoke``, ``laptop``, ``cpu``, ``full``) with the model, schedule,
augmentation and per-optimizer hyper-parameters. Unknown keys are rejected and every value is
type-checked; errors name the file and the key. Built-in suites live next to this module;
``--suite`` also accepts a path to a TOML file. The catalogue of built-in suites and the budget
names live in the light ``normbench.suite_catalog`` (re-exported here), so the command line can
list them without importing torch.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import tomllib
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from normbench.errors import NormbenchError, SuiteError
from normbench.models import (
    MODELS,
    PROBES,
    check_model_supports,
    conv_norm_factory,
    create_model,
)
from normbench.norms import BATCH_STATS, NORMS, affine_parameters, norm_class
from normbench.optim import (
    NORM_AFFINE_ONLY,
    OPTIMIZERS,
    SCHEDULES,
    TWO_PASS,
    WEIGHT_DECAY_RULE,
    hparam_shares,
    optimizer_options,
)
from normbench.registry import Registry
from normbench.suite_catalog import BUDGETS, BUILTIN_DIR, MAX_SEED, SUITES

__all__ = [
    "BUDGETS", "BUILTIN_DIR", "DATASET_NAMES", "MAX_SEED", "SUITES", "Augment", "Budget",
    "Reference", "RunSpec", "Suite", "SuiteFile", "default_budget", "default_budget_reason",
    "load_suite", "load_suite_file", "plan",
]  # fmt: skip

DATASET_NAMES = ("cifar10", "cifar100", "imagenet", "imagenette-mini")

#: The datasets whose test images each corruption set corrupts: a suite's corruption set is
#: evaluated at the budgets that train on one of them (a CIFAR-100 budget gets no CIFAR-10-C).
CORRUPTED_DATASETS = {"cifar10-c": ("cifar10",), "imagenet-c": ("imagenet", "imagenette-mini")}

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
#: A budget's own seeds, overriding the suite's (None: the suite's ``seeds``).
BudgetSeeds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_SEED)]], Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Augment(_Strict):
    crop_padding: Annotated[int, Field(ge=0, le=16)] = 0  # pixels of zero padding for crops
    flip: bool = False  # random horizontal flip


class Landscape(_Strict):
    """Loss-landscape and internal-covariate-shift probes during training (Santurkar et al.
    2018): every ``every`` training steps (and at step 0), on the current batch."""

    every: Annotated[int, Field(ge=1)]
    # the step sizes eta of the points w - eta g along the gradient g
    step_sizes: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=1)]
    ics: bool = True  # also internal covariate shift per weight layer (a pass per layer)


class Adaptation(_Strict):
    """Test-time adaptation of the norm layers on the clean and corrupted test images
    (normbench.adaptation), reported under metric names of their own: ``bn`` re-estimates the
    batch-statistics norms on each test batch (Schneider et al. 2020, N = 0), ``tent`` also takes
    one entropy-minimising Adam step per batch on the norms' affine parameters (Wang et al.
    2021). Only norms with batch statistics (and, for tent, affine parameters) qualify."""

    methods: Annotated[list[Literal["bn", "tent"]], Field(min_length=1)]
    batch_size: Annotated[int, Field(ge=1)] = 200  # test images per adaptation batch
    tent_lr: Annotated[float, Field(gt=0.0)] = 1e-3  # TENT's Adam learning rate

    @pydantic.field_validator("methods")
    @classmethod
    def _once_each(cls, methods: list[str]) -> list[str]:
        if len(set(methods)) < len(methods):
            raise ValueError(f"each method once; got {methods}")
        return methods


class Adversarial(_Strict):
    """L-infinity FGSM and PGD of the trained model (normbench.attacks) on ``subset`` test images
    (a fixed seeded subset): pixel units in [0, 1], before the mean/std normalization."""

    subset: Annotated[int, Field(ge=1)] = 1000  # test images attacked
    eps: Annotated[float, Field(ge=0.0, le=1.0)] = 8 / 255
    step_size: Annotated[float, Field(gt=0.0, le=1.0)] = 2 / 255  # per PGD step
    steps: Annotated[int, Field(ge=1)] = 20  # PGD steps
    random_start: bool = True  # PGD starts uniformly in the eps-ball (seeded by the run's seed)
    batch_size: Annotated[int, Field(ge=1)] = 500


class LabelNoise(_Strict):
    """One label-noise variant: a fraction ``rate`` of the training labels replaced, seeded by
    ``seed`` (normbench.label_noise); test labels stay clean."""

    type: Literal["symmetric", "asymmetric"]
    rate: Fraction
    seed: Annotated[int, Field(ge=0)] = 0

    @property
    def label(self) -> str:
        """The variant's name on the board: ``symmetric 40%`` (with the noise seed if not 0)."""
        seed = f" (noise seed {self.seed})" if self.seed else ""
        return f"{self.type} {100 * self.rate:g}%{seed}"


class Budget(_Strict):
    model: str
    dataset: Literal[DATASET_NAMES] | None = None  # type: ignore[valid-type]  # overrides the suite's
    model_args: dict[str, Any] = {}
    epochs: Annotated[int, Field(ge=1)]
    batch_size: Annotated[int, Field(ge=1)]
    eval_batch_size: Annotated[int, Field(ge=1)] = 500
    train_subset: Annotated[int, Field(ge=0)] = 0  # 0 = the whole training set
    test_subset: Annotated[int, Field(ge=0)] = 0  # 0 = the whole test set
    # test images evaluated per (corruption, severity), a fixed seeded subset; 0 = all 10,000
    corruption_subset: Annotated[int, Field(ge=0)] = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the device has it
    # interleaved repetitions of the run's model and the same with BatchNorm at the run's end
    # (0: no speed check, so the board shows no speed for these runs)
    speed_pairs: Annotated[int, Field(ge=0)] = 7
    schedule: Literal[SCHEDULES] = "onecycle"  # type: ignore[valid-type]
    warmup: Fraction = 0.0  # fraction of training
    milestones: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = []  # fractions (multistep)
    label_smoothing: Fraction = 0.0
    augment: Augment = Augment()
    landscape: Landscape | None = None  # probes during training; None: off
    adaptation: Adaptation | None = None  # BN adaptation / TENT at test time; None: off
    adversarial: Adversarial | None = None  # FGSM/PGD after the clean evaluation; None: off
    seeds: BudgetSeeds | None = None  # overrides the suite's seeds at this budget
    # Variants: each entry (and each batch size) is its own run per norm, optimizer and seed.
    label_noise: list[LabelNoise] = []  # noisy training labels; [] = clean
    # batch sizes trained with instead of batch_size, the learning rate scaled linearly
    batch_sizes: list[Annotated[int, Field(ge=2)]] = []
    # The training loop reads the device back (divergence check, progress) every sync_every
    # steps and after each epoch's first and last steps: a GPU is never left waiting on the host.
    sync_every: Annotated[int, Field(ge=1)] = 20
    compile: bool = False  # torch.compile the training forward on CUDA (never on the CPU)
    cudnn_benchmark: bool = False  # faster convolutions on CUDA; resume no longer bit-identical
    optimizers: dict[str, dict[str, Any]]  # hyper-parameters per optimizer name


class ProbeModel(_Strict):
    model: str
    model_args: dict[str, Any] = {}

    @property
    def label(self) -> str:
        """The model with its arguments, as the dashboard shows it: ``resnet56(width=32)``."""
        if not self.model_args:
            return self.model
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(self.model_args.items()))
        return f"{self.model}({args})"


class ProbeBudget(_Strict):
    """A budget of a probe suite: the initialization probes of Lubana et al. (2021) on each
    model, averaged over ``batches`` batches of ``batch_size`` training images, at each of
    ``probe_steps`` (0: at initialization; later steps train in between, at constant learning
    rate, with the budget's optimizer hyper-parameters)."""

    models: Annotated[list[ProbeModel], Field(min_length=1)]
    dataset: Literal[DATASET_NAMES] | None = None  # type: ignore[valid-type]  # overrides the suite's
    batch_size: Annotated[int, Field(ge=2)]  # samples per probe batch (the Gram matrix's size)
    batches: Annotated[int, Field(ge=1)] = 4
    probe_steps: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)] = [0]
    train_subset: Annotated[int, Field(ge=0)] = 0  # 0 = the whole training set
    precision: Literal["fp32"] = "fp32"
    augment: Augment = Augment()
    seeds: BudgetSeeds | None = None  # overrides the suite's seeds at this budget
    optimizers: dict[str, dict[str, Any]]  # hyper-parameters per optimizer name


class GanBudget(_Strict):
    """A budget of a GAN suite (``task = "gan"``): a generator and a discriminator of ``arch``
    trained for ``steps`` generator steps, ``n_dis`` discriminator steps before each, both with
    the budget's optimizer; then FID and KID of ``fid_samples`` generated images against
    ``fid_real_samples`` images of the real ``fid_real_split`` in the feature network's space."""

    arch: str  # a registered GAN architecture (normbench.gan_models)
    model_args: dict[str, Any] = {}  # the architecture's options (its widths)
    dataset: Literal[DATASET_NAMES] | None = None  # type: ignore[valid-type]  # overrides the suite's
    z_dim: Annotated[int, Field(ge=1)] = 128
    batch_size: Annotated[int, Field(ge=2)]
    steps: Annotated[int, Field(ge=1)]  # generator steps
    n_dis: Annotated[int, Field(ge=1)] = 1  # discriminator steps per generator step
    loss: Literal["hinge", "nonsaturating"] = "hinge"
    ema: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None  # generator EMA decay; None: off
    ema_start: Annotated[int, Field(ge=0)] = 0  # generator step at which the average starts
    train_subset: Annotated[int, Field(ge=0)] = 0  # 0 = the whole training set
    precision: Literal["fp32"] = "fp32"
    # the scores: generated images, and real images of which split (0 = the whole split)
    fid_samples: Annotated[int, Field(ge=2)]
    fid_real_split: Literal["train", "test"] = "train"
    fid_real_samples: Annotated[int, Field(ge=0)] = 0
    kid_subset_size: Annotated[int, Field(ge=2)] = 1000
    kid_subsets: Annotated[int, Field(ge=1)] = 100
    # FID over training: every ``fid_every`` generator steps (0: only at the end), with
    # ``fid_every_samples`` generated images (its own metric name: another sample count)
    fid_every: Annotated[int, Field(ge=0)] = 0
    fid_every_samples: Annotated[int, Field(ge=0)] = 0
    checkpoint_every: Annotated[int, Field(ge=1)] = 1000  # generator steps between checkpoints
    grid: Annotated[int, Field(ge=1, le=256)] = 64  # generated images in the saved sample grid
    seeds: BudgetSeeds | None = None  # overrides the suite's seeds at this budget
    optimizers: dict[str, dict[str, Any]]  # hyper-parameters per optimizer name (both networks)


class Reference(_Strict):
    norm: str
    optimizer: str


class SuiteFile(_Strict):
    name: str
    description: str
    protocol_version: Annotated[int, Field(ge=1)]
    task: Literal["classify"]
    dataset: Literal[DATASET_NAMES]  # type: ignore[valid-type]
    norms: list[str]
    optimizers: list[str]
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]]
    reference: Reference
    # also evaluate on it, at the budgets whose dataset it corrupts (CORRUPTED_DATASETS)
    corruption_set: Literal["cifar10-c", "imagenet-c"] | None = None
    budgets: dict[Literal[BUDGETS], Budget]  # type: ignore[valid-type]


class ProbeSuiteFile(SuiteFile):
    """A suite of ``task = "probe"``: norms x models (each budget lists its models) x seeds."""

    task: Literal["probe"]
    corruption_set: None = None
    budgets: dict[Literal[BUDGETS], ProbeBudget]  # type: ignore[valid-type]


class GanSuiteFile(SuiteFile):
    """A suite of ``task = "gan"``: generator norms (``norms``) x discriminator norms
    (``d_norms``) x optimizers x seeds."""

    task: Literal["gan"]
    d_norms: Annotated[list[str], Field(min_length=1)]
    corruption_set: None = None
    budgets: dict[Literal[BUDGETS], GanBudget]  # type: ignore[valid-type]


@dataclass(frozen=True)
class Suite:
    """A validated suite and where it came from."""

    spec: SuiteFile | ProbeSuiteFile | GanSuiteFile
    path: Path

    @property
    def name(self) -> str:
        return self.spec.name

    def budget(self, name: str) -> Budget | ProbeBudget | GanBudget:
        if name not in self.spec.budgets:
            raise NormbenchError(
                f"Suite {self.name!r} has no budget {name!r}; it defines "
                f"{', '.join(self.spec.budgets)} (valid budget names: {', '.join(BUDGETS)})."
            )
        return self.spec.budgets[name]


def _location(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _check_name(registry: Registry, name: str, path: Path, key: str) -> None:
    try:
        registry.get(name)  # a norm name may carry options: the norm registry parses them
    except NormbenchError as err:
        raise SuiteError(f"{path}: {key}: {err}") from None


def _check_hparams(path: Path, key: str, optimizer: str, hparams: dict[str, Any]) -> None:
    """Check ``hparams`` of ``optimizer`` against its builder's keyword arguments; a wrapper's
    (``sam``...) own ones first, then the rest against its base optimizer's."""
    try:
        shares = hparam_shares(optimizer, hparams)
    except NormbenchError as err:
        raise SuiteError(f"{path}: {key}.base: {err}") from None
    wrapper = len(shares) > 1
    for i, (name, builder, share) in enumerate(shares):
        last = i == len(shares) - 1
        _check_builder_hparams(path, key, name, builder, share, wrapper and last, shares[0][0])


def _check_builder_hparams(
    path: Path,
    key: str,
    optimizer: str,
    builder: Any,
    hparams: dict[str, Any],
    is_base: bool,
    wrapper: str,
) -> None:
    params = inspect.signature(builder).parameters
    allowed = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for hp in hparams:
        if hp not in allowed:
            what = f"optimizer {optimizer!r}"
            if is_base:
                own = list(optimizer_options(wrapper))
                what = f"{wrapper!r} with base optimizer {optimizer!r} (allowed: {', '.join(own)})"
            raise SuiteError(
                f"{path}: {key}.{hp}: unknown hyper-parameter for {what}; "
                f"allowed{' for the base' if is_base else ''}: {', '.join(allowed)}."
            )
    missing = [
        n for n in allowed if params[n].default is inspect.Parameter.empty and n not in hparams
    ]
    if missing:
        raise SuiteError(
            f"{path}: {key}: missing required hyper-parameter(s) {', '.join(missing)}."
        )
    # Type-check against the builder's annotations, constraints included (rho > 0). JSON mode:
    # TOML arrays may fill tuples, but a string is never silently turned into a number.
    hints = typing.get_type_hints(builder, include_extras=True)
    fields: dict[str, Any] = {n: (hints.get(n, Any), params[n].default) for n in allowed}
    for n in allowed:
        if params[n].default is inspect.Parameter.empty:
            fields[n] = (hints.get(n, Any), ...)
    model = pydantic.create_model(
        f"{optimizer}_hparams", __config__=ConfigDict(strict=True), **fields
    )
    try:
        model.model_validate_json(json.dumps(hparams))
    except ValidationError as err:
        e = err.errors()[0]
        raise SuiteError(f"{path}: {key}.{_location(e['loc'])}: {e['msg']}.") from None


def _check_model_args(path: Path, key: str, model: str, model_args: dict[str, Any]) -> None:
    """Check ``model_args`` against the model's builder: names, then values, by building the
    model on the meta device (no memory, no computation), so that a bad ``depth`` stops the
    command before anything trains instead of failing every run."""
    params = inspect.signature(MODELS.get(model).obj).parameters
    allowed = [n for n in params if n not in ("block", "num_classes")]
    unknown = [n for n in model_args if n not in allowed]
    if unknown:
        raise SuiteError(
            f"{path}: {key}.{unknown[0]}: unknown argument of model {model!r}; it takes "
            f"{', '.join(allowed) or 'none'}."
        )
    try:
        with torch.device("meta"):
            create_model(model, block=conv_norm_factory("batchnorm"), num_classes=10, **model_args)
    except (NormbenchError, TypeError, ValueError) as err:
        raise SuiteError(f"{path}: {key}: model {model!r} refuses {model_args}: {err}") from None


def _check_probe_budget(path: Path, bname: str, budget: ProbeBudget) -> None:
    """A probe budget's models exist, take their arguments and list their blocks for the
    probes; its probe steps ascend."""
    for i, choice in enumerate(budget.models):
        key = f"budgets.{bname}.models[{i}]"
        _check_name(MODELS, choice.model, path, f"{key}.model")
        if not MODELS.info(choice.model).has(PROBES):
            hosts = [e.info.name for e in MODELS if e.info.has(PROBES)]
            raise SuiteError(
                f"{path}: {key}.model: model {choice.model!r} does not list its blocks for the "
                f"probes; models that do: {', '.join(hosts)}."
            )
        _check_model_args(path, f"{key}.model_args", choice.model, choice.model_args)
    labels = [m.label for m in budget.models]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise SuiteError(f"{path}: budgets.{bname}.models: {twice} is listed twice.")
    steps = budget.probe_steps
    if steps != sorted(set(steps)):
        raise SuiteError(
            f"{path}: budgets.{bname}.probe_steps: must ascend without repeats; got {steps}."
        )


def _check_gan_budget(path: Path, bname: str, budget: GanBudget) -> None:
    """A GAN budget's architecture exists and its counts fit together."""
    from normbench.gan_models import GAN_MODELS, gan_options

    _check_name(GAN_MODELS, budget.arch, path, f"budgets.{bname}.arch")
    known = gan_options(budget.arch)
    for option, value in budget.model_args.items():
        if option not in known:
            offered = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise SuiteError(
                f"{path}: budgets.{bname}.model_args.{option}: GAN {budget.arch!r} has no such "
                f"option; its options (with defaults): {offered}."
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SuiteError(
                f"{path}: budgets.{bname}.model_args.{option}: must be a positive integer; got "
                f"{value!r}."
            )
    if budget.fid_every and budget.fid_every_samples < 2:
        raise SuiteError(
            f"{path}: budgets.{bname}.fid_every_samples: FID over training (fid_every = "
            f"{budget.fid_every}) needs at least 2 generated images per check."
        )
    if budget.ema_start >= budget.steps and budget.ema is not None:
        raise SuiteError(
            f"{path}: budgets.{bname}.ema_start: the average starts at step {budget.ema_start}, "
            f"after the last of {budget.steps} steps."
        )


def _check_variants(path: Path, bname: str, budget: Budget) -> None:
    """A budget's variants are distinct, and a batch-size sweep has a learning rate to scale."""
    labels = [n.label for n in budget.label_noise]
    for key, values in (("label_noise", labels), ("batch_sizes", budget.batch_sizes)):
        twice = [v for v in values if values.count(v) > 1]
        if twice:
            raise SuiteError(f"{path}: budgets.{bname}.{key}: {twice[0]} is listed twice.")
    if budget.batch_sizes:
        for opt, hparams in budget.optimizers.items():
            if not isinstance(hparams.get("lr"), int | float):
                raise SuiteError(
                    f"{path}: budgets.{bname}.optimizers.{opt}.lr: batch_sizes scales the "
                    "learning rate linearly with the batch size, so it needs an explicit lr."
                )


def load_suite_file(path: Path) -> Suite:
    """Read and validate a suite file; every problem is a ``SuiteError`` naming file and key."""
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as err:
        raise SuiteError(f"{path}: cannot read suite file ({err.strerror}).") from None
    except tomllib.TOMLDecodeError as err:
        raise SuiteError(f"{path}: not valid TOML: {err}.") from None
    try:
        task = raw.get("task") if isinstance(raw, dict) else None
        schema = {"probe": ProbeSuiteFile, "gan": GanSuiteFile}.get(task, SuiteFile)
        spec = schema.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            what = (
                "unknown key (not part of the suite schema)"
                if e["type"] == "extra_forbidden"
                else e["msg"]
            )
            problems.append(f"{_location(e['loc'])}: {what}")
        raise SuiteError(f"{path}: invalid suite file: " + "; ".join(problems) + ".") from None
    for i, norm in enumerate(spec.norms):
        _check_name(NORMS, norm, path, f"norms[{i}]")
    for i, opt in enumerate(spec.optimizers):
        _check_name(OPTIMIZERS, opt, path, f"optimizers[{i}]")
    for i, norm in enumerate(getattr(spec, "d_norms", ())):
        _check_name(NORMS, norm, path, f"d_norms[{i}]")
    _check_name(NORMS, spec.reference.norm, path, "reference.norm")
    _check_name(OPTIMIZERS, spec.reference.optimizer, path, "reference.optimizer")
    for bname, budget in spec.budgets.items():
        if budget.seeds is not None and len(set(budget.seeds)) < len(budget.seeds):
            raise SuiteError(f"{path}: budgets.{bname}.seeds: a seed is repeated.")
        if isinstance(budget, ProbeBudget):
            _check_probe_budget(path, bname, budget)
        elif isinstance(budget, GanBudget):
            _check_gan_budget(path, bname, budget)
        else:
            _check_name(MODELS, budget.model, path, f"budgets.{bname}.model")
            _check_model_args(path, f"budgets.{bname}.model_args", budget.model, budget.model_args)
        for opt, hparams in budget.optimizers.items():
            _check_name(OPTIMIZERS, opt, path, f"budgets.{bname}.optimizers.{opt}")
            _check_hparams(path, f"budgets.{bname}.optimizers.{opt}", opt, hparams)
        if isinstance(budget, ProbeBudget | GanBudget):
            continue
        if budget.speed_pairs == 1:
            raise SuiteError(
                f"{path}: budgets.{bname}.speed_pairs: a ratio needs at least 2 pairs of "
                "repetitions (or 0 for no speed check)."
            )
        if budget.schedule == "multistep" and not budget.milestones:
            raise SuiteError(
                f"{path}: budgets.{bname}.milestones: required by schedule 'multistep'."
            )
        _check_variants(path, bname, budget)
    if not spec.budgets:
        raise SuiteError(
            f"{path}: budgets: a suite needs at least one budget ({', '.join(BUDGETS)})."
        )
    return Suite(spec, path)


def load_suite(name_or_path: str) -> Suite:
    """A built-in suite by name, or a suite file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return load_suite_file(path)
    return load_suite_file(SUITES.get(name_or_path).obj)


def default_budget_reason(suite: Suite, device: torch.device | None = None) -> tuple[str, str]:
    """The budget a run of ``suite`` on ``device`` (default: the best one here) uses when none is
    named, and a one-line reason for the user.

    With CUDA the ``gpu`` recipe (seconds to minutes a run) comes first, then the literature's
    ``full``; on a CPU, ``cpu`` is sized for bfloat16 matrix units (AMX) and ``laptop`` for two
    fp32 cores. The first preferred budget the suite defines wins,
    else the suite's first budget.
    """
    from normbench.runtime import fast_bf16, resolve_device

    device = device or resolve_device()
    if device.type == "cuda":
        prefer, where = ("gpu", "full", "cpu", "laptop"), "with CUDA"
    elif fast_bf16(device):
        prefer, where = ("cpu", "laptop"), "on a CPU with bfloat16 matrix units (AMX)"
    else:
        prefer, where = ("laptop", "cpu"), "on a CPU without bfloat16 matrix units"
    defined = list(suite.spec.budgets)
    candidates = [b for b in prefer if b in defined]
    if not candidates:
        return defined[0], f"the suite's first budget; it defines none of {', '.join(prefer)}"
    chosen, why = candidates[0], f"the default {where}"
    if len(candidates) > 1:
        other = candidates[1]
        length = "longer" if BUDGETS.index(other) > BUDGETS.index(chosen) else "shorter"
        why += f"; --budget {other} is the {length} recipe"
    return chosen, why


def default_budget(suite: Suite, device: torch.device | None = None) -> str:
    """The budget a run of ``suite`` on ``device`` uses when none is named (see
    :func:`default_budget_reason`)."""
    return default_budget_reason(suite, device)[0]


# --- planning ------------------------------------------------------------------------------------


@functools.cache
def _budget_defaults(task: str = "classify") -> dict[str, Any]:
    defaults = {}
    schema = {"probe": ProbeBudget, "gan": GanBudget}.get(task, Budget)
    for name, field_info in schema.model_fields.items():
        if not field_info.is_required():
            value = field_info.get_default(call_default_factory=True)
            defaults[name] = value.model_dump() if isinstance(value, BaseModel) else value
    return defaults


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run's numbers. Its hash (with the protocol version) is the
    run key."""

    suite: str
    budget: str
    protocol_version: int
    task: str
    dataset: str
    norm: str
    optimizer: str
    seed: int
    settings: dict[str, Any] = field(hash=False)  # the resolved budget: model, schedule, ...
    hparams: dict[str, Any] = field(hash=False)  # the optimizer's hyper-parameters

    @property
    def model(self) -> str:
        return self.settings["model"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def key(self) -> str:
        # Settings left at their schema defaults are not hashed, so adding a new budget option
        # with a default never changes the keys (and results) of existing runs.
        defaults = _budget_defaults(self.task)
        spec = self.to_dict()
        spec["settings"] = {
            k: v for k, v in self.settings.items() if k not in defaults or v != defaults[k]
        }
        canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:20]

    @property
    def protocol(self) -> dict[str, Any]:
        """What a reader needs to know to reproduce the run, beyond the spec itself."""
        if self.task == "gan":
            s = self.settings
            return {
                "training": (
                    f"{s['n_dis']} discriminator step(s) per generator step, {s['loss']} loss, "
                    f"both networks with {self.optimizer}; real images scaled to [-1, 1], no "
                    "augmentation"
                ),
                "scores": (
                    f"FID and KID of {s['fid_samples']} generated images against "
                    f"{s['fid_real_samples'] or 'all'} {s['fid_real_split']} images in the "
                    "InceptionV3 FID feature space (2048-d pool features)"
                ),
                "generator_ema": s["ema"],
                "label": f"G {self.norm} / D {s['d_norm']}",
            }
        if self.task == "probe":
            return {
                "probes": (
                    "Lubana et al. 2021: per block output, per-channel variance over (N,H,W) "
                    "averaged over channels; average cosine similarity between samples and "
                    "stable rank (trace / largest eigenvalue) of the samples' Gram matrix; per "
                    "convolution, the Frobenius norm of the loss gradient w.r.t. its output"
                ),
                "probe_batches": "fixed, seeded by the run's seed; training mode (batch "
                "statistics); no augmentation; normalized by the training-set mean and std",
                "training_between_probes": "constant learning rate, the budget's batch size",
                "label": f"{self.norm} in {self.settings.get('model_label', self.model)}",
            }
        return {
            "weight_decay_rule": WEIGHT_DECAY_RULE,
            "train_transforms": "random crop (zero padding) + horizontal flip, batched on device",
            "eval_transforms": "none (32x32 input), normalized by the training-set mean and std",
            "label": f"{self.norm} + {self.optimizer}",
        } | self._two_pass_protocol() | self._variant_protocol()

    def _variant_protocol(self) -> dict[str, Any]:
        s, out = self.settings, {}
        if s.get("variant"):
            out["label"] = f"{self.norm} + {self.optimizer} ({s['variant']})"
        if s.get("label_noise"):
            noise = s["label_noise"]
            out["label_noise"] = (
                f"{noise['type']} noise on {100 * noise['rate']:g}% of the training labels "
                f"(noise seed {noise['seed']}, fixed for every run); test labels clean"
            )
        if s.get("lr_scaling"):
            base = s["lr_scaling"]["base_batch_size"]
            out["batch_size"] = (
                f"batch {s['batch_size']}, learning rate scaled linearly: lr * "
                f"{s['batch_size']} / {base} (the budget's batch size)"
            )
        return out

    def _two_pass_protocol(self) -> dict[str, Any]:
        if not OPTIMIZERS.info(self.optimizer).has(TWO_PASS):
            return {}
        options = optimizer_options(self.optimizer)
        stats = self.hparams.get("second_pass_stats", options["second_pass_stats"])
        base = self.hparams.get("base", options["base"])
        return {
            "two_pass_step": (
                f"forward/backward; ascent of radius rho on the selected parameters; forward/"
                f"backward on the same batch at the perturbed point; exact restore; a {base} "
                "step with the second gradient; training mode in both passes"
            ),
            "second_pass_running_statistics": (
                "updated (they move twice per step)"
                if stats == "update"
                else "frozen (restored after the second pass)"
            ),
        }


def _has_affine(norm: str) -> bool:
    """Whether ``norm``'s layers have affine parameters: a small block is built on the CPU. A
    submitted norm (a placeholder here, its code runs only in workers) is checked by its run."""
    if getattr(norm_class(NORMS.get(norm).obj), "deferred", False):
        return True
    try:
        block = conv_norm_factory(norm)(64, 64, 3, 1)
    except Exception:  # noqa: BLE001 - the run builds the model and reports what is wrong
        return True
    return bool(affine_parameters(block))


def _check_adaptation(norm: str, methods: list[str], suite: str) -> None:
    """Refuse a norm that test-time adaptation cannot touch: without batch statistics there is
    nothing to re-estimate (the adapted accuracy would be the plain one under another name), and
    TENT without affine parameters has nothing to learn."""
    leave_out = f"Leave {norm!r} out (--norms) or run a suite without adaptation"
    if not NORMS.info(norm).has(BATCH_STATS):
        with_stats = [e.info.name for e in NORMS if e.info.has(BATCH_STATS)]
        raise NormbenchError(
            f"Suite {suite!r} adapts the norms at test time ({', '.join(methods)}), which "
            f"re-estimates batch statistics, and norm {norm!r} has none: its adapted accuracy "
            f"would be its plain one. Norms with batch statistics: {', '.join(with_stats)}. "
            f"{leave_out}."
        )
    if "tent" in methods and not _has_affine(norm):
        raise NormbenchError(
            f"Suite {suite!r} runs TENT, which learns only the norms' affine parameters, and "
            f"norm {norm!r} has none. {leave_out}."
        )


def plan(
    suite: Suite,
    budget: str,
    *,
    norms: list[str] | None = None,
    optimizers: list[str] | None = None,
    seeds: list[int] | None = None,
    d_norms: list[str] | None = None,
) -> list[RunSpec]:
    """Expand a suite at one budget into run specs (norm-major order, then optimizer, then seed;
    for a GAN suite, generator norm, then discriminator norm: ``d_norms``)."""
    b = suite.budget(budget)
    # Canonical names: "groupnorm(groups=8)" however spelled, so one configuration is one row.
    norms = [NORMS.info(norm).name for norm in norms or suite.spec.norms]
    optimizers = optimizers or list(suite.spec.optimizers)
    # --seeds, else the budget's own seeds, else the suite's. Seeds are never settings: a run's
    # seed is its own field of the spec, so a budget that names its seeds keeps every run key.
    if seeds is None:
        seeds = list(suite.spec.seeds if b.seeds is None else b.seeds)
    if isinstance(b, GanBudget):
        return _plan_gan(suite, budget, b, norms, optimizers, seeds, d_norms)
    models = b.models if isinstance(b, ProbeBudget) else [ProbeModel(model=b.model)]
    for norm in norms:
        # Refused up front, so a suite never stops halfway on a combination that cannot run.
        for choice in models:
            check_model_supports(choice.model, conv_norm_factory(norm))
    for opt in optimizers:
        if OPTIMIZERS.get(opt).info.has(NORM_AFFINE_ONLY):
            for norm in norms:
                if not _has_affine(norm):
                    raise NormbenchError(
                        f"Optimizer {opt!r} perturbs only the norms' affine parameters, and norm "
                        f"{norm!r} has none: the pair would be its base optimizer under another "
                        f"name. Leave {norm!r} out (--norms) or {opt!r} out (--optimizers)."
                    )
        if opt not in b.optimizers:
            raise NormbenchError(
                f"Suite {suite.name!r} gives no hyper-parameters for optimizer {opt!r} at budget "
                f"{budget!r} (it has: {', '.join(b.optimizers)}). Add a "
                f"[budgets.{budget}.optimizers.{opt}] table to {suite.path}."
            )
    if isinstance(b, Budget) and b.adaptation is not None:
        for norm in norms:
            _check_adaptation(norm, b.adaptation.methods, suite.name)
    dataset = b.dataset or suite.spec.dataset
    if isinstance(b, ProbeBudget):
        common = b.model_dump(exclude={"optimizers", "models", "seeds"})
        variants = [
            {**common, "model": m.model, "model_args": dict(m.model_args), "model_label": m.label}
            for m in b.models
        ]
    else:
        settings = b.model_dump(exclude={"optimizers", "seeds"})
        if dataset in CORRUPTED_DATASETS.get(suite.spec.corruption_set, ()):
            settings["corruption_set"] = suite.spec.corruption_set
        variants = _variants(b, settings, dataset)
    return [
        RunSpec(
            suite=suite.name,
            budget=budget,
            protocol_version=suite.spec.protocol_version,
            task=suite.spec.task,
            dataset=dataset,
            norm=norm,
            optimizer=opt,
            seed=seed,
            settings=settings,
            hparams=_scaled_lr(dict(b.optimizers[opt]), settings),
        )
        for norm in norms
        for settings in variants
        for opt in optimizers
        for seed in seeds
    ]


def _variants(b: Budget, settings: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """The settings of each variant of a classify budget: one per label-noise entry x batch size
    (either list may be empty), each labelled ``settings["variant"]``; just ``settings`` when
    the budget sweeps nothing. A variant's settings hold its own noise entry and batch size
    only, so adding an entry to a list never changes the run keys of the others."""
    for noise in b.label_noise:
        if noise.type == "asymmetric" and dataset != "cifar10":
            raise NormbenchError(
                f"Asymmetric label noise flips CIFAR-10's similar classes (truck -> automobile, "
                f"bird -> airplane, cat <-> dog, deer -> horse); dataset {dataset!r} has no such "
                "map. Use symmetric noise there."
            )
    if not b.label_noise and not b.batch_sizes:
        return [settings]
    noises = [(n.label, n.model_dump()) for n in b.label_noise] or [None]
    sizes = list(b.batch_sizes) or [None]
    variants = []
    for noise in noises:
        for size in sizes:
            v = {**settings, "label_noise": [], "batch_sizes": []}
            labels = []
            if noise is not None:
                labels.append(noise[0])
                v["label_noise"] = noise[1]
            if size is not None:
                labels.append(f"batch {size}")
                v["batch_size"] = size
                # Linear scaling (Goyal et al. 2017): the lr stays per image as at batch_size.
                v["lr_scaling"] = {"base_batch_size": b.batch_size, "factor": size / b.batch_size}
            v["variant"] = ", ".join(labels)
            variants.append(v)
    return variants


def _scaled_lr(hparams: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """``hparams`` with the learning rate a batch-size variant trains with (lr * size / the
    budget's batch size); unchanged for other runs."""
    scaling = settings.get("lr_scaling")
    if scaling is None:
        return hparams
    return {**hparams, "lr": hparams["lr"] * scaling["factor"]}


def _plan_gan(
    suite: Suite,
    budget: str,
    b: GanBudget,
    g_norms: list[str],
    optimizers: list[str],
    seeds: list[int],
    d_norms: list[str] | None = None,
) -> list[RunSpec]:
    """A GAN suite's runs: generator norm x discriminator norm x optimizer x seed. A run's
    ``norm`` is its generator's norm; ``settings["d_norm"]`` its discriminator's."""
    from normbench.gan_models import check_gan_supports

    d_norms = [NORMS.info(norm).name for norm in d_norms or suite.spec.d_norms]
    for g_norm in g_norms:
        for d_norm in d_norms:
            check_gan_supports(b.arch, g_norm, d_norm)
    for opt in optimizers:
        if opt not in b.optimizers:
            raise NormbenchError(
                f"Suite {suite.name!r} gives no hyper-parameters for optimizer {opt!r} at budget "
                f"{budget!r} (it has: {', '.join(b.optimizers)}). Add a "
                f"[budgets.{budget}.optimizers.{opt}] table to {suite.path}."
            )
    common = b.model_dump(exclude={"optimizers", "arch", "seeds"})
    return [
        RunSpec(
            suite=suite.name,
            budget=budget,
            protocol_version=suite.spec.protocol_version,
            task="gan",
            dataset=b.dataset or suite.spec.dataset,
            norm=g_norm,
            optimizer=opt,
            seed=seed,
            settings={**common, "model": b.arch, "d_norm": d_norm},
            hparams=dict(b.optimizers[opt]),
        )
        for g_norm in g_norms
        for d_norm in d_norms
        for opt in optimizers
        for seed in seeds
    ]
