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

User code is untrusted here: it may raise, return NaN, or never return. ``run_contract`` therefore
runs the checks of a ``FILE:CLASS`` in a child process (``python -m normbench.contract``) under a
time limit and reads its JSON report; nothing user-supplied runs in the caller's process.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def load_class(target: str) -> tuple[type[nn.Module], str]:
    """Import the class named by ``FILE:CLASS``; returns it and the file's source text."""
    path, name = parse_target(target)
    if not path.is_file():
        raise NormbenchError(f"{path} does not exist (from {target!r}).")
    source = path.read_text()
    digest = hashlib.sha256(source.encode()).hexdigest()[:12]
    module_name = f"normbench_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # inspect.getsource needs the module registered
    try:
        spec.loader.exec_module(module)
    except BaseException as err:  # noqa: BLE001 - user code may raise anything
        del sys.modules[module_name]
        raise NormbenchError(f"{path} does not import: {type(err).__name__}: {err}") from None
    cls = getattr(module, name, None)
    if cls is None:
        raise NormbenchError(f"{path} has no class {name!r}.")
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise NormbenchError(f"{name!r} in {path} is not a torch.nn.Module subclass.")
    return cls, source


# --- the checks -----------------------------------------------------------------------------------


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


def _describe(err: BaseException) -> str:
    return f"raised {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-sample ``max |a - b| / max |b|`` over the batch (float64)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    scale = b.abs().amax(dim=1).clamp_min(1e-12)
    return float(((a - b).abs().amax(dim=1) / scale).max())


def _inputs(c: int, n: int = 8, size: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g)


def _run_checks(cls: Callable[..., nn.Module]) -> list[Check]:
    checks: list[Check] = []

    def check(name: str, fn: Callable[[], str | None]) -> None:
        """``fn`` returns None when the rule holds, else why not; an exception is a failure."""
        try:
            problem = fn()
        except BaseException as err:  # noqa: BLE001 - user code may raise anything
            if isinstance(err, KeyboardInterrupt):
                raise
            problem = _describe(err)
        checks.append(Check(name, problem is None, problem or "ok"))

    modules: dict[int, nn.Module] = {}

    def construct() -> str | None:
        for c in CHANNELS:
            torch.manual_seed(0)
            modules[c] = cls(c)
            if not isinstance(modules[c], nn.Module):
                made = type(modules[c]).__name__
                return f"{getattr(cls, '__name__', cls)}({c}) is a {made}, not an nn.Module"
        return None

    check("constructor takes num_channels first", construct)
    if len(modules) < len(CHANNELS):
        return checks  # nothing else can run

    def shape_and_dtype(train: bool) -> str | None:
        for c, m in modules.items():
            m.train(train)
            x = _inputs(c)
            y = m(x)
            if not isinstance(y, torch.Tensor):
                return f"forward returned {type(y).__name__}, not a tensor"
            if y.shape != x.shape:
                return f"forward changed the shape {tuple(x.shape)} -> {tuple(y.shape)}"
            if y.dtype != x.dtype:
                return f"forward changed the dtype {x.dtype} -> {y.dtype}"
        return None

    check("forward keeps NCHW shape and dtype (train mode)", lambda: shape_and_dtype(True))
    check("works in eval mode", lambda: shape_and_dtype(False))

    def batch_of_one() -> str | None:
        for c, m in modules.items():
            y = m.eval()(_inputs(c, n=1))
            if y.shape != (1, c, 8, 8) or not _finite(y):
                return "eval with batch size 1 gives a wrong shape or non-finite values"
        return None

    check("eval with batch size 1", batch_of_one)

    def channels_last() -> str | None:
        for c, m in modules.items():
            x = _inputs(c)
            m.eval()
            y = m(x)
            z = m(x.contiguous(memory_format=torch.channels_last))
            if z.shape != y.shape or not torch.allclose(z, y, rtol=1e-4, atol=1e-5):
                return "a channels_last input gives a different result"
        return None

    check("channels_last input", channels_last)

    def bfloat16() -> str | None:
        for c, m in modules.items():
            half = copy.deepcopy(m).to(torch.bfloat16)
            for train in (True, False):
                y = half.train(train)(_inputs(c).to(torch.bfloat16))
                if y.dtype != torch.bfloat16 or not _finite(y):
                    return f"bfloat16 input gives {y.dtype} or non-finite values"
        return None

    check("float32 and bfloat16", bfloat16)

    def gradients() -> str | None:
        for c, m in modules.items():
            m.train()
            m.zero_grad(set_to_none=True)
            x = _inputs(c).requires_grad_()
            y = m(x)
            (y * torch.randn_like(y)).sum().backward()
            if x.grad is None or not _finite(x.grad) or not x.grad.abs().sum() > 0:
                return "no (finite, non-zero) gradient reaches the input"
            missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
            if missing:
                return f"no gradient reaches the parameter(s) {', '.join(missing)}"
            if not all(_finite(p.grad) for p in m.parameters() if p.grad is not None):
                return "a parameter gradient is not finite"
        return None

    check("gradients reach the input and every parameter", gradients)

    def state_dict_round_trip() -> str | None:
        for c, m in modules.items():
            m.train()
            m(_inputs(c, seed=1))  # move running statistics away from their initial values
            torch.manual_seed(1)
            fresh = cls(c)
            fresh.load_state_dict(m.state_dict())
            x = _inputs(c, seed=2)
            if not torch.equal(fresh.eval()(x), m.eval()(x)):
                return "a copy loaded from state_dict() gives different eval outputs"
        return None

    check("state_dict round trip", state_dict_round_trip)

    def eval_batch_independence() -> str | None:
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
            difference = _relative_difference(alone, together)
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

    check("eval output of a sample does not depend on its batch", eval_batch_independence)

    def finite_outputs() -> str | None:
        for c, m in modules.items():
            x = _inputs(c, seed=4)
            cases = {"random": x, "constant": torch.full_like(x, 0.5), "large (1e4)": x * 1e4}
            for train in (True, False):
                for label, value in cases.items():
                    with torch.no_grad():
                        y = m.train(train)(value)
                    if not _finite(y):
                        mode = "train" if train else "eval"
                        return f"non-finite output on {label} input in {mode} mode"
        return None

    check("finite output on random, constant and large inputs", finite_outputs)

    def without_own_activation() -> str | None:
        # Models build the last norm of a residual branch with apply_act=False (see models.py).
        for c in CHANNELS:
            torch.manual_seed(0)
            m = cls(c, apply_act=False)
            for train in (True, False):
                x = _inputs(c)
                y = m.train(train)(x)
                if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
                    return "with apply_act=False forward does not keep the NCHW shape and dtype"
                if not _finite(y):
                    return "with apply_act=False the output is not finite"
        return None

    if _declares_own_activation(cls):
        check("declared own nonlinearity can be left out (apply_act=False)", without_own_activation)
    return checks


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


def check_norm(
    cls, target: str = "", source: str = "", *, measure_costs: bool = True
) -> ContractReport:
    """Run the whole contract on ``cls`` in this process (and, unless ``measure_costs`` is
    false, measure its parameter overhead and time against BatchNorm)."""
    report = ContractReport(target or getattr(cls, "__name__", str(cls)))
    if source:
        report.source_sha256 = hashlib.sha256(source.encode()).hexdigest()
    report.checks = _run_checks(cls)
    if report.passed and measure_costs:
        try:
            report.param_overhead, report.time_ratio = measure(cls)
        except Exception as err:  # noqa: BLE001
            report.checks.append(Check("overhead and time measurement", False, _describe(err)))
    return report


def run_contract(target: str, timeout: float = 120.0) -> ContractReport:
    """Check ``FILE:CLASS`` in a child process, killed after ``timeout`` seconds."""
    parse_target(target)
    command = [sys.executable, "-m", "normbench.contract", target, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ContractReport(target, error=f"the checks did not finish within {timeout:g} s "
                              "(does the constructor or forward hang?)")  # fmt: skip
    lines = done.stdout.strip().splitlines()
    try:
        return ContractReport.from_json(json.loads(lines[-1]))
    except (IndexError, ValueError, TypeError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        reason = " / ".join(tail) or f"exit status {done.returncode}"
        return ContractReport(target, error=f"the check process failed: {reason}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the norm contract on FILE:CLASS.")
    parser.add_argument("target")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # timings comparable between runs and machines' core counts
    try:
        cls, source = load_class(args.target)
        report = check_norm(cls, args.target, source)
    except NormbenchError as err:
        report = ContractReport(args.target, error=str(err))
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        for c in report.checks:
            print(f"{'PASS' if c.passed else 'FAIL'}  {c.name}: {c.message}")
        print(report.error or ("contract holds" if report.passed else "contract broken"))


if __name__ == "__main__":
    main()


__all__ = ["Check", "ContractReport", "check_norm", "load_class", "measure", "run_contract"]
