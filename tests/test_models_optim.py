"""Models built through the block factory, and the weight-decay rule of the optimizers."""

import pytest
import torch
from torch import nn

from normbench.models import MODELS, conv_norm_factory, create_model, parameter_count
from normbench.norms import NORMS, affine_parameters
from normbench.optim import create_optimizer, lr_factor, parameter_groups


@pytest.mark.parametrize("model", MODELS.names())
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "none"])
def test_models_build_and_run_with_any_norm(model, norm):
    torch.manual_seed(0)
    net = create_model(model, block=conv_norm_factory(norm), num_classes=10)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    norm_cls = NORMS.get(norm).obj
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()) or norm == "batchnorm"
    assert any(isinstance(m, norm_cls) for m in net.modules())


def test_resnet_parameter_counts_match_he_et_al():
    # He et al. (2016), Table 6: ResNet-20 0.27M, ResNet-56 0.85M parameters (option A shortcuts).
    bn = conv_norm_factory("batchnorm")
    assert (
        round(parameter_count(create_model("resnet20", block=bn, num_classes=10)) / 1e6, 2) == 0.27
    )
    assert (
        round(parameter_count(create_model("resnet56", block=bn, num_classes=10)) / 1e6, 2) == 0.85
    )


def test_block_factory_gives_conv_bias_only_to_parameter_free_norms():
    with_bn = conv_norm_factory("batchnorm")(3, 8)
    plain = conv_norm_factory("none")(3, 8)
    assert with_bn.conv.bias is None and plain.conv.bias is not None


class OddlyNamedNorm(nn.Module):
    """A norm whose affine parameters are not called weight/bias (and contain no 'norm'/'bn')."""

    def __init__(self, num_channels):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(num_channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(num_channels, 1, 1))

    def affine_parameters(self):
        return [self.gain, self.offset]

    def forward(self, x):
        return x * self.gain + self.offset


def test_weight_decay_rule_uses_affine_parameters_not_names():
    net = create_model("fastnet", block=conv_norm_factory(OddlyNamedNorm), num_classes=10)
    decay, no_decay = parameter_groups(net, 5e-4)
    affine = {id(p) for p in affine_parameters(net)}
    assert len(affine) == 14  # 7 norm layers x (gain, offset), 3-D tensors
    assert affine <= {id(p) for p in no_decay["params"]}
    assert all(p.ndim >= 2 and id(p) not in affine for p in decay["params"])
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    n_conv_linear = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules())
    assert len(decay["params"]) == n_conv_linear


@pytest.mark.parametrize(
    ("norm", "model"),
    [(n, "resnet20") for n in ("batchnorm", "frn", "evonorm_b0", "convnorm", "sws_gn",
                               "weightnorm", "skipinit", "none")]
    + [("groupnorm", "resnet18")],
)  # fmt: skip
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_groups_hold_exactly_the_conv_and_linear_kernels(norm, model, optimizer):
    net = create_model(model, block=conv_norm_factory(norm), num_classes=10)
    decay, no_decay = create_optimizer(optimizer, net, lr=0.1, weight_decay=1e-3).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-3, 0.0)
    # Expected from the modules themselves: the kernel of every convolution (norms that own theirs
    # included) and linear layer is decayed; every other tensor (biases, norm scales and shifts,
    # ConvNorm's 4-D depthwise affine kernel, SWS gains, SkipInit gates) is not.
    kernels = {id(m.weight) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    everything = {id(p) for p in net.parameters()}
    assert [id(p) for p in decay["params"]] == [id(p) for p in net.parameters() if id(p) in kernels]
    assert {id(p) for p in no_decay["params"]} == everything - kernels
    assert len(decay["params"]) + len(no_decay["params"]) == len(everything)  # each tensor once
    norm_cls = NORMS.get(norm).obj
    for m in net.modules():
        if isinstance(m, norm_cls):
            own = {id(p) for p in m.affine_parameters()}
            assert own <= {id(p) for p in no_decay["params"]}


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizers_step(name):
    net = create_model(
        "fastnet", block=conv_norm_factory("batchnorm"), num_classes=10, widths=(8, 8, 8, 8)
    )
    opt = create_optimizer(name, net, lr=0.01)
    before = [p.detach().clone() for p in net.parameters()]
    nn.functional.cross_entropy(net(torch.randn(4, 3, 32, 32)), torch.arange(4)).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_lr_schedules():
    assert lr_factor("onecycle", 0, 100, warmup=0.2) == pytest.approx(0.1)
    assert lr_factor("onecycle", 20, 100, warmup=0.2) == pytest.approx(1.0)
    assert lr_factor("onecycle", 60, 100, warmup=0.2) == pytest.approx(0.5)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    assert lr_factor("multistep", 49, 100, milestones=(0.5, 0.75)) == 1.0
    assert lr_factor("multistep", 50, 100, milestones=(0.5, 0.75)) == pytest.approx(0.1)
    assert lr_factor("multistep", 80, 100, milestones=(0.5, 0.75)) == pytest.approx(0.01)
