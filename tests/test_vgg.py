"""The VGG-like net of the probes (Santurkar et al. 2018, Lubana et al. 2021): weight-layer counts,
stage layout and shapes, every norm in VGG-10, the blocks it lists for the probes and bad model
arguments; the CIFAR ResNets' width and SkipInit arguments."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench.errors import NormbenchError
from normbench.models import (
    CONV_BLOCKS,
    MODELS,
    NORM_ACT,
    PROBES,
    BasicBlock,
    ConvNormAct,
    conv_norm_factory,
    create_model,
    parameter_count,
    vgg_stage_depths,
)
from normbench.norms import NORMS

BN = conv_norm_factory("batchnorm")


def weight_layers(net: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d | nn.Linear) for m in net.modules())


@pytest.mark.parametrize(
    ("depth", "stages"),
    [(5, [1, 1, 1, 1]), (10, [2, 2, 2, 3]), (11, [2, 2, 3, 3]), (20, [4, 5, 5, 5]),
     (40, [9, 10, 10, 10])],
)  # fmt: skip
def test_depth_counts_weight_layers_spread_evenly_over_four_stages(depth, stages):
    assert vgg_stage_depths(depth - 1) == stages
    with torch.device("meta"):  # the 40-layer net is large; counting needs no memory
        net = create_model("vgg", block=BN, num_classes=10, depth=depth, width=8)
    assert weight_layers(net) == depth
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    widths = [c.out_channels for c in convs]
    assert widths == [w for stage, n in enumerate(stages) for w in [8 * 2**stage] * n]
    assert all(c.kernel_size == (3, 3) and c.stride == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    assert net.fc.in_features == 64 and net.fc.out_features == 10


def test_shapes_and_parameter_count_from_the_architecture():
    torch.manual_seed(0)
    net = create_model("vgg", block=BN, num_classes=100, depth=10, width=4)
    shapes = {}
    for name, block in net.probe_blocks():
        block.register_forward_hook(
            lambda m, a, out, name=name: shapes.__setitem__(name, out.shape)
        )
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    # Stages of 2, 2, 2 and 3 blocks; pooled after the first three: 32, 16, 8, then 4 pixels.
    expected = [(4, 32)] * 2 + [(8, 16)] * 2 + [(16, 8)] * 2 + [(32, 4)] * 3
    assert [tuple(s) for s in shapes.values()] == [(2, c, n, n) for c, n in expected]
    # Bias-free 3x3 convs, BatchNorm's 2 parameters a channel, the classifier.
    channels = [3] + [c for c, _ in expected]
    total = sum(9 * a * b + 2 * b for a, b in zip(channels, channels[1:], strict=False))
    assert parameter_count(net) == total + 32 * 100 + 100


def test_probe_blocks_are_the_conv_norm_relu_blocks_in_forward_order():
    net = create_model("vgg", block=BN, num_classes=10, depth=6, width=4)
    blocks = net.probe_blocks()
    names = dict(net.named_modules())
    assert [n for n, _ in blocks] == [
        "features.0", "features.2", "features.4", "features.6", "features.7",
    ]  # fmt: skip
    for name, module in blocks:
        assert names[name] is module and isinstance(module, ConvNormAct)
        assert isinstance(module.act, nn.ReLU)
    # The blocks' outputs are ReLU outputs: non-negative.
    outs = []
    for _, m in blocks:
        m.register_forward_hook(lambda m, a, out: outs.append(out))
    net(torch.randn(2, 3, 32, 32))
    assert len(outs) == 5 and all((o >= 0).all() for o in outs)


def test_conv_init_is_kaiming_normal_fan_in():
    torch.manual_seed(0)
    net = create_model("vgg", block=BN, num_classes=10, depth=5, width=64)
    conv = net.features[-1].conv  # 256 -> 512 channels, fan_in 256 * 9
    std = conv.weight.std().item()
    expected = (2 / (256 * 9)) ** 0.5
    assert abs(std - expected) / expected < 0.01  # 1.2M samples: the estimate is well within 1%


def test_capabilities_and_description():
    info = MODELS.info("vgg")
    assert info.capabilities == {CONV_BLOCKS, NORM_ACT, PROBES}
    assert "Santurkar" in info.description and "Lubana" in info.description
    for name in ("resnet20", "resnet56", "wrn16_8", "wrn28_10", "wideresnet"):
        assert MODELS.info(name).has(PROBES), name
    probed = [e.info.name for e in MODELS if e.info.has(PROBES)]
    with torch.device("meta"):
        for name in probed:
            net = create_model(name, block=BN, num_classes=10)
            assert net.probe_blocks(), name


@pytest.mark.parametrize("norm", NORMS.names())
def test_every_norm_builds_and_runs_in_vgg10(norm):
    factory = conv_norm_factory(norm)
    if factory.requires - MODELS.info("vgg").capabilities:
        with pytest.raises(NormbenchError, match=f"norm '{norm}' cannot be used with model 'vgg'"):
            create_model("vgg", block=factory, num_classes=10, depth=10, width=8)
        return
    torch.manual_seed(0)
    net = create_model("vgg", block=factory, num_classes=10, depth=10, width=8)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert weight_layers(net) >= 10  # norms that own a convolution may add their own


def test_skipinit_is_refused_with_its_reason():
    with pytest.raises(NormbenchError, match="no residual branches"):
        create_model("vgg", block=conv_norm_factory("skipinit"), num_classes=10)


@pytest.mark.parametrize(
    "args",
    [{"depth": 4}, {"depth": 0}, {"depth": 10.0}, {"depth": True}, {"depth": "10"},
     {"width": 0}, {"width": 1.5}, {"width": True}],
)  # fmt: skip
def test_bad_vgg_arguments_are_refused(args):
    with pytest.raises(NormbenchError, match=next(iter(args))) as refused:
        create_model("vgg", block=BN, num_classes=10, **args)
    if "depth" in args:
        assert ">= 5" in str(refused.value)


# --- the CIFAR ResNets' width and skip_init ----------------------------------------------------


def test_resnet_width_scales_the_three_stages():
    net = create_model("resnet56", block=BN, num_classes=10, width=32)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 55
    assert sorted({c.out_channels for c in convs}) == [32, 64, 128]
    assert net.fc.in_features == 128
    blocks = net.probe_blocks()
    assert [n for n, _ in blocks[:3]] == ["stem", "layers.0", "layers.1"]
    assert len(blocks) == 1 + 27 and all(isinstance(m, BasicBlock) for _, m in blocks[1:])


def test_default_resnet_is_unchanged():
    net = create_model("resnet56", block=BN, num_classes=10)
    assert parameter_count(net) == 853_018
    assert not any(m.skip_gain is not None for m in net.modules() if isinstance(m, BasicBlock))


@pytest.mark.parametrize("norm", ["batchnorm", "none", "skipinit"])
def test_skip_init_gates_every_residual_branch_for_any_norm(norm):
    torch.manual_seed(0)
    factory = conv_norm_factory(norm)
    net = create_model("resnet20", block=factory, num_classes=10, width=4, skip_init=True)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    gates = [m.skip_gain for m in blocks]
    assert len(gates) == 9 and all(g is not None and g.item() == 0 for g in gates)
    # One gate a block even when the norm asks for it too: 9 scalars more than without.
    plain = create_model("resnet20", block=factory, num_classes=10, width=4)
    assert parameter_count(net) - parameter_count(plain) == 9 * (norm != "skipinit")
    # At init every block is its shortcut followed by the ReLU: block(x) = relu(shortcut(x)).
    x = torch.randn(2, 4, 32, 32)
    for block in blocks:
        with torch.no_grad():
            y = block(x)
        assert torch.equal(y, torch.relu(block.shortcut(x)))
        x = y


@pytest.mark.parametrize(
    "args",
    [{"width": 0}, {"width": -16}, {"width": 16.0}, {"width": True}, {"skip_init": 1},
     {"skip_init": "true"}, {"skip_init": None}],
)  # fmt: skip
def test_bad_resnet_arguments_are_refused(args):
    for model in ("resnet20", "resnet56"):
        with pytest.raises(NormbenchError, match=next(iter(args))):
            create_model(model, block=BN, num_classes=10, **args)


def test_new_arguments_build_on_the_meta_device():
    with torch.device("meta"):
        net = create_model("resnet56", block=BN, num_classes=10, width=128, skip_init=True)
        vgg = create_model("vgg", block=BN, num_classes=10, depth=40, width=64)
    assert next(net.parameters()).is_meta and next(vgg.parameters()).is_meta
