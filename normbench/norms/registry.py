"""The norm registry, the name parser, the capability flags and the factory that builds norms.

Contract for every norm: the constructor takes ``num_channels`` first; ``forward`` maps an NCHW
tensor to one of the same shape and dtype; the module exposes ``affine_parameters()``, the
learnable scale/shift parameters that the weight-decay rule exempts and that SAM-ON perturbs.
Selecting those by parameter name (as much published code does) breaks on any layer that names
them differently, so the layer itself says which they are.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from normbench.errors import NormbenchError
from normbench.registry import Entry, EntryInfo, Registry

NormFactory = Callable[..., nn.Module]
NormSpec = str | NormFactory

#: Capability flags a norm may declare in its registry info.
BATCH_STATS = "batch_stats"  # output depends on other samples of the batch in training mode
AFFINE = "affine"  # learnable per-channel scale and shift
WEIGHT = "weight"  # parametric: reparametrises the convolution's weight, not the activations
OWNS_CONV = "owns_conv"  # the norm is the whole conv-norm block (see ``OwnsConvMixin.block``)
SKIPINIT = "skipinit"  # residual models gate each residual branch with a scalar initialised to 0
#: The norm applies its own nonlinearity (FRN's TLU, the EvoNorms'), switched by the constructor
#: option ``apply_act``. Models use it *instead of* their own activation after such a norm, and
#: build the last norm of a residual branch with ``apply_act=False`` (timm's ``norm_act`` layers).
ACT = "act"

#: Constructor arguments that the model's block sets (its shape, whether the norm's own
#: activation applies), never the user.
BLOCK_ARGUMENTS = ("num_channels", "in_channels", "kernel_size", "stride", "apply_act")
_WITH_OPTIONS = re.compile(r"^\s*([^()\s]+)\s*\((.*)\)\s*$", re.DOTALL)


def norm_options(factory: NormFactory) -> dict[str, Any]:
    """The options of a norm class: its keyword constructor arguments and their defaults (none
    known for a constructor without a readable signature)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {
        p.name: p.default
        for p in parameters
        if p.name not in BLOCK_ARGUMENTS and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def parse_norm_name(name: str) -> tuple[str, dict[str, Any]]:
    """``groupnorm(groups=8)`` -> ("groupnorm", {"groups": 8}); a plain name has no options."""
    problem = _parenthesis_problem(name)
    match = _WITH_OPTIONS.match(name)
    if match is None and "(" in name and not problem:
        problem = "a misplaced parenthesis"
    if problem:
        raise NormbenchError(
            f"The norm name {name!r} has {problem}; options are written 'groupnorm(groups=8)'."
        )
    if match is None:
        return name, {}
    base, inside = match.groups()
    usage = (
        f"Norm options are keyword arguments with literal values, such as "
        f"'groupnorm(groups=8,eps=1e-3)'; got {name!r}. `normbench list norms` shows each "
        "norm's options."
    )
    try:
        call = ast.parse(f"f({inside})", mode="eval").body
        if not isinstance(call, ast.Call) or call.args:
            raise ValueError
        if any(k.arg is None for k in call.keywords):
            raise ValueError
        return base, {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError):
        raise NormbenchError(usage) from None


def _parenthesis_problem(name: str) -> str | None:
    """What is wrong with the parentheses of ``name``, if they do not pair up."""
    depth = 0
    for char in name:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return "a ')' without its '('"
    return "an unclosed parenthesis" if depth else None


class NormRegistry(Registry[NormFactory]):
    """The norm registry. A name may carry constructor options, ``groupnorm(groups=8)``: the entry
    is then a ``functools.partial`` of the class, named canonically (sorted options, defaults
    left out), so that one configuration is one leaderboard row however it was typed."""

    def get(self, name: str) -> Entry[NormFactory]:
        base, options = parse_norm_name(name)
        entry = super().get(base)
        if base == name:
            return entry
        if getattr(entry.obj, "deferred", False):
            # A submission stands in by name only here (its code runs only in workers), so its
            # options are checked when the worker builds it.
            canonical = f"{base}({','.join(f'{k}={v!r}' for k, v in sorted(options.items()))})"
            return Entry(entry.obj, dataclasses.replace(entry.info, name=canonical))
        known = norm_options(entry.obj)
        unknown = sorted(set(options) - set(known))
        if set(unknown) & set(BLOCK_ARGUMENTS):
            raise NormbenchError(
                f"{', '.join(sorted(set(unknown) & set(BLOCK_ARGUMENTS)))} of {base!r} is set by "
                "the model's block (its shape, and whether a norm's own nonlinearity applies), "
                "not in a norm name."
            )
        if unknown:
            offered = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
            raise NormbenchError(
                f"Norm {base!r} has no option {', '.join(map(repr, unknown))}; its options "
                f"(with defaults): {offered}."
            )
        options = {k: v for k, v in sorted(options.items()) if v != known[k]}
        if not options:
            return entry
        factory = functools.partial(entry.obj, **options)
        try:
            factory(64)  # bad values are reported now, not when a model is half built
        except Exception as err:  # noqa: BLE001 - any constructor error means a bad value
            raise NormbenchError(
                f"Norm {name!r} cannot be built with these options: {type(err).__name__}: {err}"
            ) from None
        canonical = f"{base}({','.join(f'{k}={v!r}' for k, v in options.items())})"
        return Entry(factory, dataclasses.replace(entry.info, name=canonical))


NORMS = NormRegistry("norm")
register_norm = NORMS.register


class AffineMixin:
    """``affine_parameters()`` for torch norm layers that keep them as ``weight`` and ``bias``."""

    def affine_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]


class OwnsConvMixin:
    """``block()`` for norms that are a whole conv-norm block.

    Their constructor is ``cls(num_channels, *, in_channels=None, kernel_size=3, stride=1, ...)``
    with ``num_channels`` the output channels, so ``cls(C)`` alone is a C -> C, 3x3, stride-1 block.
    """

    @classmethod
    def block(
        cls,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        **kwargs: Any,
    ) -> nn.Module:
        return cls(
            out_channels, in_channels=in_channels, kernel_size=kernel_size, stride=stride, **kwargs
        )


def create_norm(spec: NormSpec, num_channels: int, **kwargs: Any) -> nn.Module:
    """Build a norm layer from a registered name, a class or a ``functools.partial``."""
    factory = NORMS.get(spec).obj if isinstance(spec, str) else spec
    return factory(num_channels, **kwargs)


def norm_class(spec: NormSpec) -> NormFactory:
    """The class (or factory) behind a norm name, with or without options, or a partial."""
    factory = NORMS.get(spec).obj if isinstance(spec, str) else spec
    return factory.func if isinstance(factory, functools.partial) else factory


def norm_info(spec: NormSpec) -> EntryInfo | None:
    """Registry info of a norm given by name, by a registered class or by a ``functools.partial``
    of one; ``None`` for unregistered classes and factories."""
    if isinstance(spec, str):
        return NORMS.info(spec)
    target = norm_class(spec)
    return next((entry.info for entry in NORMS if entry.obj is target), None)


def affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The affine parameters of every norm layer inside ``model`` (each parameter once)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        select = getattr(module, "affine_parameters", None)
        if callable(select):
            for p in select():
                seen.setdefault(id(p), p)
    return list(seen.values())


# --- What a norm's behaviour depends on -----------------------------------------------------------


def norm_source_files(spec: NormSpec) -> list[Path]:
    """The source files a norm's behaviour depends on: the module of its class and of every base
    class, and, transitively, the modules of the classes and functions those modules use (the
    helpers a layer calls, the layers it is built from). Only the norm's own package and
    normbench are followed: other libraries (torch, the standard library) are provenance of their
    own, recorded as versions with every run."""
    cls = norm_class(spec)
    own = {(getattr(cls, "__module__", "") or "").split(".")[0], "normbench"}

    def followed(obj: Any) -> Any:
        name = obj.__name__ if inspect.ismodule(obj) else getattr(obj, "__module__", None) or ""
        return sys.modules.get(name) if name.split(".")[0] in own else None

    pending = [followed(c) for c in getattr(cls, "__mro__", (cls,))]
    seen: dict[str, Path] = {}
    while pending:
        module = pending.pop()
        file = getattr(module, "__file__", None)
        if module is None or file is None or module.__name__ in seen:
            continue
        seen[module.__name__] = Path(file)
        pending += [
            followed(value)
            for value in vars(module).values()
            if inspect.ismodule(value) or inspect.isclass(value) or inspect.isfunction(value)
        ]
    return [seen[name] for name in sorted(seen)]


def norm_source_sha256(spec: NormSpec) -> str | None:
    """SHA-256 over every file of :func:`norm_source_files`, each with its folder and file name
    (not the whole path, so the same code installed elsewhere hashes the same); ``None`` when no
    source file is found."""
    files = norm_source_files(spec)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.parent.name}/{path.name}:{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()
