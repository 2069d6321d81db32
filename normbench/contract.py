"""The norm contract: what every normalization layer must do to get a fair leaderboard row.

``check_norm(cls)`` runs each check on small random inputs and returns one :class:`Check` per
rule, each with its own message, plus two measurements against BatchNorm on a fixed shape
(parameter overhead and forward + backward time). Norms that own their convolution are compared
with a 3x3 convolution + BatchNorm block, since their module contains that convolution.

In eval mode a sample's output must not depend on the rest of its batch: a layer that normalises
with the test batch's statistics adapts to a corrupted test set and scores better on it than it
should. The rule compares each sample alone with the same sample inside a batch of different
samples, after a few training-mode passes (so running statistics exist), up to float rounding
(``BATCH_INDEPENDENCE_RTOL``). Test-time adaptation is a method of its own, to be declared and
shown apart, never a silent advantage of a norm's row.

Every check has two halves. ``observe(cls)`` runs the norm on the inputs and records what it did:
raw outputs and gradients (tensors as JSON: dtype, shape, base64 of the raw bytes), the names and
types of what came back, and exceptions (type and first line). ``judge(observations)`` decides
every rule from those records alone; it never touches the norm. ``check_norm`` does both in this
process, for normbench's own and installed norms, which are trusted code.

A ``FILE:CLASS`` is untrusted code: it may raise, return NaN, never return, or act against the
machine and lie about its results. ``run_contract`` therefore reads the file here, hashes it, and
observes it in a child process confined by :mod:`normbench.sandbox` (no writes outside a scratch
folder, no new processes, limits on memory and CPU time), under a time limit. The child is the
only process that imports the file; what it sends is data that this process validates and judges
itself, so a forged report or a crash can make a norm fail but never pass. Anything the child
prints is ignored, except as the last lines of an error message.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import hashlib
import importlib.machinery
import importlib.util
import inspect
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normbench.errors import NormbenchError
from normbench.norms import ACT, norm_class, norm_info

#: Channel counts every check is run with (48 is not a multiple of 32: group rules get tested).
CHANNELS = (16, 48)
#: The fixed shape of the timing measurement: (N, C, H, W).
TIMING_SHAPE = (32, 64, 16, 16)
#: How far (relative to a sample's output scale, the largest absolute value of its output) the
#: eval output of a sample alone may differ from the same sample inside a batch. A layer that
#: depends on no other sample differs only by float32 rounding, because batched kernels sum in
#: another order: a few units of float32 precision (1.2e-7) per term of a reduction. 1e-4 is far
#: above that for the reductions of a norm layer and far below the change that batch statistics
#: make (of the order of the output itself).
BATCH_INDEPENDENCE_RTOL = 1e-4
#: Memory for the child process that observes a user's norm: far above what the small inputs
#: of the checks need, far below what would starve the machine.
CHILD_MEMORY_MB = 8192
#: The most elements one observed tensor may have; the checks' largest is 8 x 48 x 8 x 8.
MAX_TENSOR_ELEMENTS = 1 << 24


@dataclass
class Check:
    name: str
    passed: bool
    message: str = ""


@dataclass
class ContractReport:
    target: str
    checks: list[Check] = field(default_factory=list)
    param_overhead: float | None = None  # (params - BatchNorm's) / BatchNorm's, at C = 64
    time_ratio: float | None = None  # forward + backward time / BatchNorm's
    source_sha256: str = ""
    error: str = ""  # a failure before any check could run (import, missing class, timeout)
    isolation: str = ""  # confinement the check process could not apply, when there was some

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.checks) and all(c.passed for c in self.checks)

    def failures(self) -> list[str]:
        if self.error:
            return [self.error]
        return [f"{c.name}: {c.message}" for c in self.checks if not c.passed]

    def failure_list(self) -> str:
        """The failures as an indented bullet list, one per line, for messages."""
        return "".join(f"\n  - {failure}" for failure in self.failures())

    @classmethod
    def from_json(cls, data: dict) -> ContractReport:
        checks = [Check(**c) for c in data.pop("checks", [])]
        return cls(checks=checks, **data)


# --- loading user code ----------------------------------------------------------------------------


def parse_target(target: str) -> tuple[Path, str]:
    """``path/to/file.py:ClassName`` -> (path, class name), with a clear error otherwise."""
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name.isidentifier():
        raise NormbenchError(f"{target!r} is not FILE:CLASS (e.g. examples/my_norm.py:MyNorm).")
    return Path(path), name


def _import_class(path: Path, name: str) -> tuple[type[nn.Module] | None, dict | None]:
    """Import ``path`` and take its class ``name``: (class, None), or (None, the problem as an
    observation: ``{"problem": "import" | "missing" | "not_module", ...}``)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    module_name = f"normbench_user_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    # an explicit loader: any file name works, not only one that ends in .py
    loader = importlib.machinery.SourceFileLoader(module_name, str(path))
    spec = importlib.util.spec_from_file_location(module_name, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource needs the module registered
    try:
        spec.loader.exec_module(module)
    except BaseException as err:  # noqa: BLE001 - user code may raise anything
        del sys.modules[module_name]
        return None, {"problem": "import", "raised": _exception(err)}
    cls = getattr(module, name, None)
    if cls is None:
        return None, {"problem": "missing"}
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        return None, {"problem": "not_module"}
    return cls, None


def _load_error(path: Path | str, name: str, problem: Any) -> str:
    """The one-line message for a file whose class could not be loaded (``_import_class``)."""
    kind = problem.get("problem") if isinstance(problem, dict) else None
    if kind == "missing":
        return f"{path} has no class {name!r}."
    if kind == "not_module":
        return f"{name!r} in {path} is not a torch.nn.Module subclass."
    if kind == "import":
        try:
            kind_, message = _raised(problem.get("raised"))
        except BadObservation:
            kind_, message = "an exception", ""
        return f"{path} does not import: {kind_}: {message}"
    return f"{path} could not be loaded (the check process sent no usable reason)."


def load_class(target: str) -> tuple[type[nn.Module], str]:
    """Import the class named by ``FILE:CLASS`` in this process; returns it and the file's source
    text. Only for code already trusted (recorded, checked submissions); ``run_contract`` never
    imports the file here."""
    path, name = parse_target(target)
    if not path.is_file():
        raise NormbenchError(f"{path} does not exist (from {target!r}).")
    source = path.read_text()
    cls, problem = _import_class(path, name)
    if cls is None:
        raise NormbenchError(_load_error(path, name, problem))
    return cls, source


# --- tensors and exceptions as JSON ---------------------------------------------------------------

#: Dtypes whose raw bytes numpy reads as they are; every other dtype (bfloat16, float8, ...)
#: travels as float32 under the name of the dtype observed.
_NUMPY_DTYPES = {
    "float16": np.float16, "float32": np.float32, "float64": np.float64,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "bool": np.bool_, "complex64": np.complex64, "complex128": np.complex128,
}  # fmt: skip
_DTYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _exception(err: BaseException) -> dict:
    """An exception as an observation: its type and the first line of its message."""
    try:
        text = str(err)
    except Exception:  # noqa: BLE001 - a user's __str__ may raise too
        text = ""
    return {"type": type(err).__name__, "message": text.splitlines()[0] if text else ""}


def _describe(err: BaseException) -> str:
    kind, message = _raised(_exception(err))
    return f"raised {kind}: {message}"


def encode(value: Any) -> dict:
    """What a norm returned, as JSON: a tensor's dtype, shape and raw bytes (base64), or only the
    name of its type when it is not a tensor."""
    if not isinstance(value, torch.Tensor):
        return {"type": type(value).__name__}
    t = value.detach().cpu().resolve_conj().resolve_neg()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in _NUMPY_DTYPES:
        t = t.float()
    data = t.contiguous().numpy().tobytes()
    return {"dtype": dtype, "shape": list(t.shape), "data": base64.b64encode(data).decode()}


def _encode_or_none(value: torch.Tensor | None) -> dict | None:
    return None if value is None else encode(value)


# --- observing: the half that runs the norm -------------------------------------------------------


def _owns_conv(cls) -> bool:
    # norm_class unwraps a partial (a norm name with options) to the class that has block()
    return callable(getattr(norm_class(cls), "block", None))


def _declares_own_activation(cls) -> bool:
    """Whether the norm says it carries its own nonlinearity (capability ``act``): in the registry,
    or as the class attribute ``capabilities`` of a submitted or unregistered class."""
    info = norm_info(cls)
    if info is not None:
        return info.has(ACT)
    try:
        return ACT in (getattr(norm_class(cls), "capabilities", ()) or ())
    except Exception:  # noqa: BLE001 - a user's attribute may be anything
        return False


def _inputs(c: int, n: int = 8, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g)


Record = Callable[[dict], None]


def observe(cls: Callable[..., nn.Module], *, measure_costs: bool = True) -> dict:
    """Run every check's inputs through ``cls`` and record what happened, judging nothing.

    Returns ``{"class_name", "own_activation", "checks": {key: {"steps": [...], "raised"?}},
    "costs"?}``: each check's steps in order, each step's outputs encoded by :func:`encode`; an
    exception stops its check and is recorded as ``raised``. The steps run on the same modules in
    the same order as always, so running statistics evolve as the rules expect.
    """
    checks: dict[str, dict] = {}
    observations: dict[str, Any] = {
        "class_name": str(getattr(cls, "__name__", cls))[:200],
        "own_activation": _declares_own_activation(cls),
        "checks": checks,
    }

    def run(key: str, fn: Callable[[Record], None]) -> None:
        entry: dict[str, Any] = {"steps": []}
        checks[key] = entry
        try:
            fn(entry["steps"].append)
        except BaseException as err:  # noqa: BLE001 - user code may raise anything
            if isinstance(err, KeyboardInterrupt):
                raise
            entry["raised"] = _exception(err)

    modules: dict[int, nn.Module] = {}

    def construct(record: Record) -> None:
        for c in CHANNELS:
            torch.manual_seed(0)
            m = cls(c)
            record({"type": type(m).__name__, "module": isinstance(m, nn.Module)})
            if not isinstance(m, nn.Module):
                return
            modules[c] = m

    run("construct", construct)
    if len(modules) < len(CHANNELS):
        return observations  # nothing else can run

    def shape_and_dtype(train: bool, record: Record) -> None:
        for c, m in modules.items():
            m.train(train)
            record({"y": encode(m(_inputs(c)))})

    run("train", lambda record: shape_and_dtype(True, record))
    run("eval", lambda record: shape_and_dtype(False, record))

    def batch_of_one(record: Record) -> None:
        for c, m in modules.items():
            record({"y": encode(m.eval()(_inputs(c, n=1)))})

    run("batch_of_one", batch_of_one)

    def channels_last(record: Record) -> None:
        for c, m in modules.items():
            x = _inputs(c)
            m.eval()
            y = m(x)
            z = m(x.contiguous(memory_format=torch.channels_last))
            record({"y": encode(y), "z": encode(z)})

    run("channels_last", channels_last)

    def bfloat16(record: Record) -> None:
        for c, m in modules.items():
            half = copy.deepcopy(m).to(torch.bfloat16)
            for train in (True, False):
                record({"y": encode(half.train(train)(_inputs(c).to(torch.bfloat16)))})

    run("bfloat16", bfloat16)

    def gradients(record: Record) -> None:
        for c, m in modules.items():
            m.train()
            m.zero_grad(set_to_none=True)
            x = _inputs(c).requires_grad_()
            y = m(x)
            (y * torch.randn_like(y)).sum().backward()
            params = [
                {"name": n, "requires_grad": p.requires_grad, "grad": _encode_or_none(p.grad)}
                for n, p in m.named_parameters()
            ]
            record({"x_grad": _encode_or_none(x.grad), "params": params})

    run("gradients", gradients)

    def state_dict_round_trip(record: Record) -> None:
        for c, m in modules.items():
            m.train()
            m(_inputs(c, seed=1))  # move running statistics away from their initial values
            torch.manual_seed(1)
            fresh = cls(c)
            fresh.load_state_dict(m.state_dict())
            x = _inputs(c, seed=2)
            record({"fresh": encode(fresh.eval()(x)), "original": encode(m.eval()(x))})

    run("state_dict", state_dict_round_trip)

    def eval_batch_independence(record: Record) -> None:
        for c, m in modules.items():
            with torch.no_grad():
                m.train()
                for seed in range(5, 8):  # running statistics, where the norm keeps them
                    m(_inputs(c, seed=seed))
                m.eval()
                # the batch mixes two very different distributions, so any statistic taken over
                # it differs from each sample's own
                batch = torch.cat([_inputs(c, n=4, seed=8), _inputs(c, n=4, seed=9) * 4 + 3])
                together = m(batch)
                alone = torch.cat([m(batch[i : i + 1]) for i in range(len(batch))])
            record({"alone": encode(alone), "together": encode(together)})

    run("batch_independence", eval_batch_independence)

    def finite_outputs(record: Record) -> None:
        for c, m in modules.items():
            x = _inputs(c, seed=4)
            for train in (True, False):
                for value in (x, torch.full_like(x, 0.5), x * 1e4):
                    with torch.no_grad():
                        record({"y": encode(m.train(train)(value))})

    run("finite", finite_outputs)

    def without_own_activation(record: Record) -> None:
        # Models build the last norm of a residual branch with apply_act=False (see models.py).
        for c in CHANNELS:
            torch.manual_seed(0)
            m = cls(c, apply_act=False)
            for train in (True, False):
                record({"y": encode(m.train(train)(_inputs(c)))})

    if observations["own_activation"]:
        run("no_activation", without_own_activation)

    # A check that raised has failed whatever else it saw: the measurement would be wasted.
    if measure_costs and not any("raised" in entry for entry in checks.values()):
        try:
            overhead, ratio = measure(cls)
            observations["costs"] = {"param_overhead": overhead, "time_ratio": ratio}
        except Exception as err:  # noqa: BLE001 - user code may raise anything
            observations["costs"] = {"raised": _exception(err)}
    return observations


def _reference_module(cls, c: int) -> nn.Module:
    if _owns_conv(cls):
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
    return nn.BatchNorm2d(c)


def _fwd_bwd_seconds(module: nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    module.train()
    times = []
    for i in range(repeats + 2):
        xi = x.detach().requires_grad_()
        start = time.perf_counter()
        module(xi).sum().backward()
        if i >= 2:  # first calls allocate and pick kernels
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(cls) -> tuple[float, float]:
    """(parameter overhead, forward + backward time ratio) against BatchNorm at TIMING_SHAPE."""
    n, c, h, w = TIMING_SHAPE
    torch.manual_seed(0)
    ours, reference = cls(c), _reference_module(cls, c)
    params = sum(p.numel() for p in ours.parameters())
    ref_params = sum(p.numel() for p in reference.parameters())
    x = torch.randn(n, c, h, w)
    # interleave the two, so a change of machine load hits both alike
    pairs = [(_fwd_bwd_seconds(ours, x), _fwd_bwd_seconds(reference, x)) for _ in range(3)]
    ratio = statistics.median(a / b for a, b in pairs)
    return (params - ref_params) / ref_params, ratio


# --- judging: the half that decides, from observations alone --------------------------------------


class BadObservation(Exception):
    """An observation that is missing, malformed or inconsistent: the check fails with it."""


class _Raised(Exception):
    """The norm raised during a check: the check fails with ``raised Type: message``."""


@dataclass(frozen=True)
class Observed:
    """What a norm returned, decoded: ``values`` is None when it was not a tensor."""

    type_name: str
    dtype: str = ""  # torch's name without "torch.", as observed (bfloat16 stays bfloat16)
    values: np.ndarray | None = None

    @property
    def is_tensor(self) -> bool:
        return self.values is not None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape) if self.values is not None else ()

    def finite(self) -> bool:
        return self.values is not None and bool(np.isfinite(self.values).all())

    def torch_dtype(self) -> str:
        return f"torch.{self.dtype}"


def _text(value: Any, limit: int = 200) -> str:
    if not isinstance(value, str):
        raise BadObservation(f"expected text, got {type(value).__name__}")
    line = value.splitlines()[0] if value else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _raised(value: Any) -> tuple[str, str]:
    """(type name, first line) of a recorded exception."""
    if not isinstance(value, dict):
        raise BadObservation("an exception record is not an object")
    kind = _text(value.get("type"), 100)
    if not kind.isidentifier():
        raise BadObservation("an exception record names no type")
    return kind, _text(value.get("message", ""), 500)


def decode(value: Any) -> Observed:
    """An encoded output (see :func:`encode`) back into an array, validating every field; raises
    ``BadObservation`` for anything that is not exactly such a record."""
    if not isinstance(value, dict):
        raise BadObservation(f"an output record is {type(value).__name__}, not an object")
    if "dtype" not in value:
        type_name = _text(value.get("type"), 100)
        if type_name in ("Tensor", "Parameter", ""):
            raise BadObservation("a tensor came without its data")
        return Observed(type_name)
    dtype, shape, data = value.get("dtype"), value.get("shape"), value.get("data")
    if not isinstance(dtype, str) or not _DTYPE_NAME.match(dtype):
        raise BadObservation("a tensor has no valid dtype")
    if not isinstance(shape, list) or len(shape) > 8:
        raise BadObservation("a tensor has no valid shape")
    if not all(type(d) is int and 0 <= d <= MAX_TENSOR_ELEMENTS for d in shape):
        raise BadObservation("a tensor's shape holds something other than sizes")
    numel = math.prod(shape)
    if numel > MAX_TENSOR_ELEMENTS:
        raise BadObservation(f"a tensor of {numel} elements is larger than any check makes")
    if not isinstance(data, str):
        raise BadObservation("a tensor's data is not base64 text")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadObservation("a tensor's data is not valid base64") from None
    carrier = np.dtype(_NUMPY_DTYPES.get(dtype, np.float32))
    if len(raw) != numel * carrier.itemsize:
        raise BadObservation(
            f"a tensor of shape {tuple(shape)} came with {len(raw)} bytes, not "
            f"{numel * carrier.itemsize}"
        )
    values = np.frombuffer(raw, dtype=carrier).reshape(shape)
    return Observed("Tensor", dtype, values)


def _output(step: dict, key: str) -> Observed:
    if key not in step:
        raise BadObservation(f"a step has no {key!r}")
    return decode(step[key])


def _steps(entry: dict, labels: list) -> Iterator[tuple[Any, dict]]:
    """Each expected step with its label, in order. A step the norm never finished ends the check
    with the exception it raised; one missing without an exception is a bad observation. Once all
    steps are judged fine, an exception raised after them fails the check all the same."""
    steps = entry.get("steps")
    if not isinstance(steps, list):
        raise BadObservation("no steps")
    if len(steps) > len(labels):
        raise BadObservation(f"{len(steps)} steps where the check has {len(labels)}")
    raised = entry.get("raised")
    for i, label in enumerate(labels):
        if i == len(steps):
            if raised is None:
                raise BadObservation(f"{len(steps)} of {len(labels)} steps and no exception")
            break
        if not isinstance(steps[i], dict):
            raise BadObservation("a step is not an object")
        yield label, steps[i]
    if raised is not None:
        kind, message = _raised(raised)
        raise _Raised(f"raised {kind}: {message}")


def _per_channel() -> list:
    return list(CHANNELS)


def _judge_shape_and_dtype(entry: dict) -> str | None:
    for c, step in _steps(entry, _per_channel()):
        y, x_shape = _output(step, "y"), (8, c, 8, 8)
        if not y.is_tensor:
            return f"forward returned {y.type_name}, not a tensor"
        if y.shape != x_shape:
            return f"forward changed the shape {x_shape} -> {y.shape}"
        if y.dtype != "float32":
            return f"forward changed the dtype torch.float32 -> {y.torch_dtype()}"
    return None


def _judge_batch_of_one(entry: dict) -> str | None:
    for c, step in _steps(entry, _per_channel()):
        y = _output(step, "y")
        if y.shape != (1, c, 8, 8) or not y.finite():
            return "eval with batch size 1 gives a wrong shape or non-finite values"
    return None


def _close(a: Observed, b: Observed, rtol: float, atol: float) -> bool:
    if not (a.is_tensor and b.is_tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.allclose(a.values, b.values, rtol=rtol, atol=atol))


def _judge_channels_last(entry: dict) -> str | None:
    for _, step in _steps(entry, _per_channel()):
        if not _close(_output(step, "z"), _output(step, "y"), rtol=1e-4, atol=1e-5):
            return "a channels_last input gives a different result"
    return None


def _judge_bfloat16(entry: dict) -> str | None:
    for _, step in _steps(entry, [(c, t) for c in CHANNELS for t in (True, False)]):
        y = _output(step, "y")
        if y.dtype != "bfloat16" or not y.finite():
            made = y.torch_dtype() if y.is_tensor else f"a {y.type_name}"
            return f"bfloat16 input gives {made} or non-finite values"
    return None


def _judge_gradients(entry: dict) -> str | None:
    for c, step in _steps(entry, _per_channel()):
        x_grad = None if step.get("x_grad") is None else _output(step, "x_grad")
        if x_grad is not None and x_grad.shape != (8, c, 8, 8):
            raise BadObservation(f"an input gradient of shape {x_grad.shape}")  # autograd's is x's
        if x_grad is None or not x_grad.finite() or not np.any(x_grad.values != 0):
            return "no (finite, non-zero) gradient reaches the input"
        params = step.get("params")
        if not isinstance(params, list):
            raise BadObservation("no parameter list")
        grads, missing = [], []
        for p in params:
            if not isinstance(p, dict) or not isinstance(p.get("requires_grad"), bool):
                raise BadObservation("a parameter record is malformed")
            grad = None if p.get("grad") is None else _output(p, "grad")
            if p["requires_grad"] and grad is None:
                missing.append(_text(p.get("name"), 100))
            if grad is not None:
                grads.append(grad)
        if missing:
            return f"no gradient reaches the parameter(s) {', '.join(missing)}"
        if not all(g.finite() for g in grads):
            return "a parameter gradient is not finite"
    return None


def _judge_state_dict(entry: dict) -> str | None:
    for _, step in _steps(entry, _per_channel()):
        fresh, original = _output(step, "fresh"), _output(step, "original")
        same = (
            fresh.is_tensor
            and original.is_tensor
            and (fresh.dtype, fresh.shape) == (original.dtype, original.shape)
            and bool(np.array_equal(fresh.values, original.values))
        )
        if not same:
            return "a copy loaded from state_dict() gives different eval outputs"
    return None


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The largest per-sample ``max |a - b| / max |b|`` over the batch (in float64)."""
    wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(b) else np.float64
    a, b = a.astype(wide).reshape(len(a), -1), b.astype(wide).reshape(len(b), -1)
    scale = np.maximum(np.abs(b).max(axis=1), 1e-12)
    return float((np.abs(a - b).max(axis=1) / scale).max())


def _judge_batch_independence(entry: dict) -> str | None:
    for _, step in _steps(entry, _per_channel()):
        alone, together = _output(step, "alone"), _output(step, "together")
        if not (alone.is_tensor and together.is_tensor) or alone.shape != together.shape:
            return "in eval mode a sample alone and in a batch give outputs of different shapes"
        if alone.shape[:1] != (8,) or alone.values.size == 0:
            return f"in eval mode a batch of 8 samples gives an output of shape {alone.shape}"
        difference = _relative_difference(alone.values, together.values)
        if not math.isfinite(difference):
            return "in eval mode the output of a sample alone or in a batch is not finite"
        if difference > BATCH_INDEPENDENCE_RTOL:
            return (
                f"in eval mode a sample's output changes with the rest of its batch (by "
                f"{difference:.2g} times its largest value; float rounding stays below "
                f"{BATCH_INDEPENDENCE_RTOL:g}): the layer uses batch statistics at test time, "
                "so it adapts to the corrupted test set and inflates its robustness. "
                "Test-time adaptation is not allowed silently: it is a method to declare and "
                "show in its own column, not part of a norm's eval mode"
            )
    return None


def _judge_finite(entry: dict) -> str | None:
    labels = [
        (c, train, label)
        for c in CHANNELS
        for train in (True, False)
        for label in ("random", "constant", "large (1e4)")
    ]
    for (_, train, label), step in _steps(entry, labels):
        y = _output(step, "y")
        if not y.is_tensor:
            return f"forward returned {y.type_name}, not a tensor"
        if not y.finite():
            return f"non-finite output on {label} input in {'train' if train else 'eval'} mode"
    return None


def _judge_without_own_activation(entry: dict) -> str | None:
    for (c, _), step in _steps(entry, [(c, t) for c in CHANNELS for t in (True, False)]):
        y = _output(step, "y")
        if not y.is_tensor or y.shape != (8, c, 8, 8) or y.dtype != "float32":
            return "with apply_act=False forward does not keep the NCHW shape and dtype"
        if not y.finite():
            return "with apply_act=False the output is not finite"
    return None


#: (observation key, check name, judgement) after the constructor, in the order they run.
RULES: list[tuple[str, str, Callable[[dict], str | None]]] = [
    ("train", "forward keeps NCHW shape and dtype (train mode)", _judge_shape_and_dtype),
    ("eval", "works in eval mode", _judge_shape_and_dtype),
    ("batch_of_one", "eval with batch size 1", _judge_batch_of_one),
    ("channels_last", "channels_last input", _judge_channels_last),
    ("bfloat16", "float32 and bfloat16", _judge_bfloat16),
    ("gradients", "gradients reach the input and every parameter", _judge_gradients),
    ("state_dict", "state_dict round trip", _judge_state_dict),
    (
        "batch_independence",
        "eval output of a sample does not depend on its batch",
        _judge_batch_independence,
    ),
    ("finite", "finite output on random, constant and large inputs", _judge_finite),
]
CONSTRUCT = "constructor takes num_channels first"
NO_ACTIVATION = "declared own nonlinearity can be left out (apply_act=False)"


def _verdict(name: str, entry: Any, rule: Callable[[dict], str | None]) -> Check:
    """One rule's check; whatever the observation holds, this never raises."""
    try:
        if not isinstance(entry, dict):
            raise BadObservation("missing")
        problem = rule(entry)
    except _Raised as err:
        problem = str(err)
    except BadObservation as err:
        problem = f"the check process sent no usable observation ({err})"
    except Exception as err:  # noqa: BLE001 - hostile data must fail its check, not the judge
        problem = f"the check process sent no usable observation ({type(err).__name__})"
    return Check(name, problem is None, problem or "ok")


def judge(observations: Any) -> list[Check]:
    """Every rule's check, decided from ``observations`` (see :func:`observe`) alone."""
    observations = observations if isinstance(observations, dict) else {}
    entries = observations.get("checks")
    entries = entries if isinstance(entries, dict) else {}
    try:
        class_name = _text(observations.get("class_name"))
    except BadObservation:
        class_name = "the class"

    def construct(entry: dict) -> str | None:
        for c, step in _steps(entry, _per_channel()):
            if step.get("module") is not True:
                made = _text(step.get("type", "?"), 100)
                return f"{class_name}({c}) is a {made}, not an nn.Module"
        return None

    checks = [_verdict(CONSTRUCT, entries.get("construct"), construct)]
    if not checks[0].passed:
        return checks  # nothing else could run
    checks += [_verdict(name, entries.get(key), rule) for key, name, rule in RULES]
    if observations.get("own_activation") is True:
        entry = entries.get("no_activation")
        checks.append(_verdict(NO_ACTIVATION, entry, _judge_without_own_activation))
    return checks


def _costs(value: Any) -> tuple[float | None, float | None, Check | None]:
    """(parameter overhead, time ratio, a failed check when measuring raised) from the
    observations; numbers that cannot be true (not finite, a time ratio not above 0, fewer than
    no parameters) are reported as not measured."""
    if not isinstance(value, dict):
        return None, None, None
    if "raised" in value:
        try:
            kind, message = _raised(value["raised"])
        except BadObservation:
            return None, None, None
        failed = Check("overhead and time measurement", False, f"raised {kind}: {message}")
        return None, None, failed
    overhead, ratio = value.get("param_overhead"), value.get("time_ratio")

    def number(x: Any, low: float, strict: bool) -> float | None:
        if type(x) not in (int, float) or not math.isfinite(x):
            return None
        return float(x) if (x > low if strict else x >= low) else None

    return number(overhead, -1.0, strict=False), number(ratio, 0.0, strict=True), None


def _report(
    target: str, observations: Any, *, source_sha256: str = "", measure_costs: bool = True
) -> ContractReport:
    """The whole report from a child's (or this process's) observations."""
    report = ContractReport(target, source_sha256=source_sha256)
    observations = observations if isinstance(observations, dict) else {}
    if "load" in observations:
        path, name = target.rpartition(":")[::2]
        report.error = _load_error(path, name, observations["load"])
        return report
    report.checks = judge(observations)
    if report.passed and measure_costs:
        report.param_overhead, report.time_ratio, failed = _costs(observations.get("costs"))
        if failed is not None:
            report.checks.append(failed)
    return report


def check_norm(
    cls, target: str = "", source: str = "", *, measure_costs: bool = True
) -> ContractReport:
    """Run the whole contract on ``cls`` in this process (and, unless ``measure_costs`` is
    false, measure its parameter overhead and time against BatchNorm). For trusted code only:
    ``cls`` runs here."""
    sha = hashlib.sha256(source.encode()).hexdigest() if source else ""
    return _report(
        target or getattr(cls, "__name__", str(cls)),
        observe(cls, measure_costs=measure_costs),
        source_sha256=sha,
        measure_costs=measure_costs,
    )


# --- the confined check of a FILE:CLASS -----------------------------------------------------------

#: Environment of the check process: one thread per math library, so that no thread exists yet
#: when the process confines itself (and timings stay comparable between machines).
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _read_source(path: Path, target: str) -> bytes:
    if not path.is_file():
        raise NormbenchError(f"{path} does not exist (from {target!r}).")
    try:
        raw = path.read_bytes()
        raw.decode("utf-8")
    except OSError as err:
        raise NormbenchError(f"{path} cannot be read: {err.strerror or err}.") from None
    except UnicodeDecodeError:
        raise NormbenchError(f"{path} is not UTF-8 text, so it is no Python source.") from None
    return raw


def run_contract(
    target: str, timeout: float = 120.0, *, source: str | None = None
) -> ContractReport:
    """Check ``FILE:CLASS`` in a confined child process, killed after ``timeout`` seconds.

    The file is read here (or ``source`` is used instead of it), and exactly those bytes are
    hashed and sent to the child, which imports them from its scratch folder. The child only
    observes (see :func:`observe`); this process judges. Whatever the child does or claims, the
    report passes only when the observations it sent hold every rule.
    """
    from normbench.sandbox import Limits, Policy, launch

    path, name = parse_target(target)
    raw = _read_source(path, target) if source is None else source.encode()
    report = ContractReport(target, source_sha256=hashlib.sha256(raw).hexdigest())
    policy = Policy(limits=Limits(memory_mb=CHILD_MEMORY_MB, cpu_seconds=int(timeout) + 30))
    job = {
        "policy": policy.to_json(),
        "source": raw.decode("utf-8"),
        "file_name": path.name,
        "class_name": name,
    }
    with tempfile.TemporaryDirectory(prefix="normbench-contract-") as scratch:
        try:
            worker = launch(
                "normbench.contract", job, policy=policy, scratch=Path(scratch), env=_CHILD_ENV
            )
        except OSError as err:
            report.error = f"the check process could not start: {err}"
            return report
        try:
            observations, report.error = _await_observations(worker, timeout)
        finally:
            worker.kill()  # its whole process group, whatever it left running
        report.isolation = _isolation(worker.sandbox)
    if report.error:
        return report
    judged = _report(target, observations, source_sha256=report.source_sha256)
    judged.isolation = report.isolation
    return judged


def _await_observations(worker, timeout: float) -> tuple[dict | None, str]:
    """(the child's observations, "") or (None, what went wrong, as one phrase)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            event = worker.next_event(left) if left > 0 else None
        except EOFError:
            end = worker.wait(timeout=10)
            how = f"exited before reporting (status {end.returncode})"
            if end.returncode != 0:
                how = f"{end.cause} before reporting"
            tail = [line.strip()[:200] for line in end.log_tail.splitlines() if line.strip()]
            said = f"; its last output: {' / '.join(tail[-3:])}" if tail else ""
            return None, f"the check process {how}{said}"
        if event is None:
            return None, (
                f"the checks did not finish within {timeout:g} s (does the constructor or "
                "forward hang?)"
            )
        kind = event.get("event")
        if kind == "observations":
            return event, ""
        if kind == "protocol_error":
            detail = event.get("detail")
            return None, f"the check process broke the event protocol: {detail}"
        return None, f"the check process sent an unexpected event {str(kind)[:50]!r}"


def _isolation(applied: dict) -> str:
    """A note on the confinement the check process could not apply ("" when it applied all)."""
    if not applied:
        return ""
    missing = []
    if not applied.get("landlock_abi"):
        missing.append("Landlock (it could write files)")
    if not applied.get("seccomp"):
        missing.append("seccomp (it could start processes)")
    if not missing:
        return ""
    return (
        f"the check process ran without {' and without '.join(missing)}: this system does not "
        "provide it"
    )


def _observe_job() -> None:
    """The check process: confine itself, import the source it was sent, observe, report."""
    from normbench.sandbox import Policy, emit, enter, read_job

    job = read_job()
    enter(Policy.from_json(job["policy"]))  # before any of the user's code
    torch.set_num_threads(1)  # timings comparable between runs and machines' core counts
    folder = Path.cwd() / "source"  # the scratch folder also holds the process's log
    folder.mkdir()
    file_name = Path(str(job["file_name"])).name or "norm.py"
    path = folder / file_name
    path.write_bytes(str(job["source"]).encode("utf-8"))
    cls, problem = _import_class(path, str(job["class_name"]))
    if cls is None:
        emit({"event": "observations", "load": problem})
        return
    emit({"event": "observations", **observe(cls)})


def main(argv: list[str] | None = None) -> None:
    from normbench.sandbox import EVENT_FD_VAR

    if argv is None and len(sys.argv) == 1 and EVENT_FD_VAR in os.environ:
        _observe_job()  # started by run_contract
        return
    parser = argparse.ArgumentParser(description="Run the norm contract on FILE:CLASS.")
    parser.add_argument("target")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds (default 120)")
    args = parser.parse_args(argv)
    try:
        report = run_contract(args.target, timeout=args.timeout)
    except NormbenchError as err:
        report = ContractReport(args.target, error=str(err))
    for c in report.checks:
        print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.message}")
    if report.isolation:
        print(f"note: {report.isolation}")
    print(report.error or ("contract holds" if report.passed else "contract broken"))
    sys.exit(0 if report.passed else 2)


if __name__ == "__main__":
    main()


__all__ = [
    "BATCH_INDEPENDENCE_RTOL", "CHANNELS", "Check", "ContractReport", "check_norm", "decode",
    "encode", "judge", "load_class", "measure", "observe", "parse_target", "run_contract",
]  # fmt: skip
