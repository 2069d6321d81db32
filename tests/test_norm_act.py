"""Norms with their own nonlinearity run as published, and a norm's source hash covers what runs.

The rule (``normbench.models``): a block built for a norm with the ``act`` capability uses the
norm's nonlinearity instead of the model's, and the last norm of a residual branch is built
without it. Checked on the order of what a forward pass executes, outside the norms: the norms'
outputs, every ReLU/GELU (module or functional), every convolution and every residual addition.
In a pre-activation model (the Wide ResNets) a convolution, not a norm, precedes each addition,
so there every norm keeps its nonlinearity.
"""

import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from normbench.contract import check_norm, load_class
from normbench.errors import NormbenchError
from normbench.models import MODELS, NORM_ACT, BasicBlock, conv_norm_factory, create_model
from normbench.norms import (
    ACT,
    NORMS,
    create_norm,
    norm_class,
    norm_source_files,
    norm_source_sha256,
)

ACT_NORMS = [n for n in NORMS.names() if NORMS.info(n).has(ACT)]
HOSTS = [e.info.name for e in MODELS if e.info.has(NORM_ACT)]
NORM_CLASSES = tuple({norm_class(n) for n in NORMS.names()})
ACTIVATIONS = {"relu", "relu_", "gelu"}


class _Trace(TorchFunctionMode):
    """Records activations, convolutions and additions executed outside any norm layer."""

    def __init__(self, events: list, depth: list) -> None:
        super().__init__()
        self.events, self.depth = events, depth

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.depth[0]:
            if name in ACTIVATIONS:
                self.events.append(("act", name))
            elif name == "conv2d":
                self.events.append(("conv", None))
            elif name in ("add", "__add__", "add_", "__iadd__"):
                self.events.append(("add", None))
        return func(*args, **(kwargs or {}))


def forward_events(model: nn.Module, norm_classes=NORM_CLASSES, size: int = 16) -> list:
    """What a forward pass of ``model`` executes outside its norms, in order: ("norm", module),
    ("act", name), ("conv", None), ("add", None)."""
    events, depth, handles = [], [0], []

    def enter(module, args):
        depth[0] += 1

    def leave(module, args, output):
        depth[0] -= 1
        if not depth[0]:
            events.append(("norm", module))

    for m in model.modules():
        if isinstance(m, norm_classes):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.no_grad(), _Trace(events, depth):
            model.eval()(torch.randn(2, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return events


def follows(events: list) -> list[tuple]:
    """(norm module, what comes right after it) for every norm in the trace."""
    return [
        (m, events[i + 1][0] if i + 1 < len(events) else None)
        for i, (kind, m) in enumerate(events)
        if kind == "norm"
    ]


@pytest.mark.parametrize("model", HOSTS)
@pytest.mark.parametrize("norm", ACT_NORMS)
def test_no_activation_follows_a_norm_with_its_own_and_the_pre_add_norm_has_none(model, norm):
    torch.manual_seed(0)
    net = create_model(model, block=conv_norm_factory(norm), num_classes=10)
    pairs = follows(forward_events(net))
    assert pairs, "the trace saw no norm"
    for module, after in pairs:
        assert after != "act", f"the model's activation follows {module}"
        assert module.apply_act == (after != "add"), (module, after)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert sum(after == "add" for _, after in pairs) == len(blocks)
    # After the addition comes the model's own activation in a post-activation block; in a
    # pre-activation one the sum goes into the next norm, with the norm's own nonlinearity.
    events = forward_events(net)
    adds = [i for i, (kind, _) in enumerate(events) if kind == "add"]
    for i in adds:
        kind, after = events[i + 1]
        if blocks:
            assert (kind, after) == ("act", "relu")
        else:
            assert kind == "norm" and after.apply_act, (kind, after)


@pytest.mark.parametrize("model", HOSTS)
def test_the_trace_sees_the_models_activations_after_other_norms(model):
    # The same trace on BatchNorm: every norm is followed by the model's activation except the
    # last of each residual branch, so the check above could fail.
    net = create_model(model, block=conv_norm_factory("batchnorm"), num_classes=10)
    pairs = follows(forward_events(net))
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert sum(after == "act" for _, after in pairs) == len(pairs) - len(blocks)
    assert sum(after == "add" for _, after in pairs) == len(blocks)


def test_models_that_apply_their_own_activation_refuse_these_norms():
    for model in [e.info.name for e in MODELS if not e.info.has(NORM_ACT)]:
        with pytest.raises(NormbenchError, match="own nonlinearity"):
            create_model(model, block=conv_norm_factory("frn"), num_classes=10)


@pytest.mark.parametrize("norm", ACT_NORMS)
def test_without_its_activation_a_norm_is_what_the_papers_use_before_the_add(norm):
    torch.manual_seed(0)
    x = torch.randn(4, 32, 6, 6) * 2 - 1
    with_act, without = create_norm(norm, 32), create_norm(norm, 32, apply_act=False)
    assert with_act.apply_act and not without.apply_act
    y = without(x)
    if norm == "frn":  # FRN normalizes without TLU: negative values survive
        assert (y < 0).any() and not torch.equal(y, with_act(x))
        assert torch.allclose(y.square().mean((2, 3)), torch.ones(4, 32), atol=1e-3)
    else:  # the EvoNorms without their nonlinearity are their per-channel affine
        with torch.no_grad():
            without.weight.copy_(torch.linspace(0.5, 2, 32))
        assert torch.allclose(without(x), x * without.weight.view(1, -1, 1, 1))


SUBMITTED = '''
import torch
from torch import nn

class ShiftedTanhNorm(nn.Module):
    """A norm with its own tanh nonlinearity."""
    capabilities = {"act", "affine"}

    def __init__(self, num_channels, apply_act=True):
        super().__init__()
        self.apply_act = apply_act
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        y = x / x.square().mean((1, 2, 3), keepdim=True).add(1e-5).sqrt()
        y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return torch.tanh(y) if self.apply_act else y

    def affine_parameters(self):
        return [self.weight, self.bias]
'''


def test_a_submitted_norm_declares_its_own_activation(tmp_path):
    path = tmp_path / "tanh_norm.py"
    path.write_text(SUBMITTED)
    cls, _ = load_class(f"{path}:ShiftedTanhNorm")
    for model in HOSTS:
        net = create_model(model, block=conv_norm_factory(cls), num_classes=10)
        pairs = follows(forward_events(net, norm_classes=(cls,)))
        assert pairs and all(after != "act" for _, after in pairs)
        assert all(m.apply_act == (after != "add") for m, after in pairs)


def test_the_contract_checks_a_declared_activation_can_be_left_out(tmp_path):
    rule = "declared own nonlinearity can be left out (apply_act=False)"
    for norm in ACT_NORMS:
        report = check_norm(NORMS.get(norm).obj, measure_costs=False)
        assert report.passed and rule in [c.name for c in report.checks], norm
    # A class that declares the capability but has no apply_act argument breaks the rule.
    path = tmp_path / "no_switch.py"
    path.write_text(
        SUBMITTED.replace(", apply_act=True", "").replace(
            "self.apply_act = apply_act", "self.apply_act = True"
        )
    )
    cls, _ = load_class(f"{path}:ShiftedTanhNorm")
    failed = [c for c in check_norm(cls, measure_costs=False).checks if not c.passed]
    assert [c.name for c in failed] == [rule] and "apply_act" in failed[0].message
    # The rule is asked only of norms that declare the capability.
    assert rule not in [c.name for c in check_norm(NORMS.get("batchnorm").obj).checks]


def test_a_norm_name_cannot_switch_the_activation_the_model_decides():
    with pytest.raises(NormbenchError, match="apply_act of 'frn' is set by the model's block"):
        NORMS.get("frn(apply_act=False)")


# --- the source hash ------------------------------------------------------------------------------


def test_the_source_hash_covers_the_modules_a_norm_uses():
    names = {n: {f"{p.parent.name}/{p.name}" for p in norm_source_files(n)} for n in NORMS.names()}
    assert {"norms/activation.py", "norms/classic.py"} <= names["evonorm_s0"]  # group_count
    assert {"norms/weight.py", "norms/classic.py"} <= names["sws_gn"]  # built with GroupNorm
    assert {"norms/convnorm.py", "norms/classic.py"} <= names["convnorm"]  # ends in BatchNorm
    assert "norms/activation.py" not in names["batchnorm"]
    assert not any("torch" in p for files in names.values() for p in files)


def test_editing_a_helper_changes_the_hash(tmp_path, monkeypatch):
    package = tmp_path / "hashpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "helpers.py").write_text("def scale(x):\n    return 2 * x\n")
    (package / "layer.py").write_text(
        textwrap.dedent(
            """
            from torch import nn
            from hashpkg.helpers import scale

            class Scaled(nn.Module):
                def __init__(self, num_channels):
                    super().__init__()

                def forward(self, x):
                    return scale(x)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def digest() -> str:
        for name in [m for m in sys.modules if m.startswith("hashpkg")]:
            del sys.modules[name]
        from hashpkg.layer import Scaled

        return norm_source_sha256(Scaled)

    before = digest()
    assert before == digest()  # stable while nothing changes
    (package / "helpers.py").write_text("def scale(x):\n    return 3 * x\n")
    assert digest() != before
