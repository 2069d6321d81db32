"""Wide ResNets (Zagoruyko & Komodakis 2016): parameter counts against the papers and the
architecture, the pre-activation order, SkipInit gates, norms with their own nonlinearity, the
norms the model refuses and bad model arguments."""

import pytest
import torch
import torch.nn.functional as F
from helpers import invoke, tiny_suite
from torch import nn
from torch.overrides import TorchFunctionMode

from normbench import models
from normbench.errors import NormbenchError, SuiteError
from normbench.models import (
    CONV_BLOCKS,
    MODELS,
    NORM_ACT,
    PROBES,
    RESIDUAL_GATE,
    WideBlock,
    check_model_supports,
    conv_norm_factory,
    create_model,
    parameter_count,
)
from normbench.norms import ACT, NORMS, OWNS_CONV, affine_parameters
from normbench.suites import load_suite_file

WRNS = ("wideresnet", "wrn16_8", "wrn28_10")
SMALL = {"depth": 10, "widen_factor": 1}  # WRN-10-1: one block per group, 16-16-32-64 channels


def wrn_parameters(depth: int, k: int, num_classes: int) -> int:
    """Parameters of WRN-depth-k with BatchNorm, from the architecture: bias-free 3x3 convs, a
    bias-free 1x1 shortcut conv where a block changes the width, 2 affine parameters per norm
    channel (each block's input and its first conv's output, and the final norm), the classifier."""
    n = (depth - 4) // 6
    total = 3 * 16 * 9  # the stem, with no norm after it
    c_in = 16
    for c in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += 2 * c_in + 9 * c_in * c + 2 * c + 9 * c * c
            # The strided groups always double the width, so "shape changes" is "width changes".
            total += c_in * c if c_in != c else 0
            c_in = c
    return total + 2 * c_in + c_in * num_classes + num_classes


def cifar_resnet_parameters(depth: int, num_classes: int) -> int:
    """Parameters of the option-A CIFAR ResNet-depth with BatchNorm: bias-free 3x3 convs, each
    followed by a norm with 2 affine parameters per channel, parameter-free shortcuts, the
    classifier."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    c_in = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
            c_in = c
    return total + c_in * num_classes + num_classes


@pytest.mark.parametrize("num_classes", [10, 100])
def test_parameter_counts_match_the_papers_and_the_architecture(num_classes):
    # Zagoruyko & Komodakis (2016), table of CIFAR-10/100 results: WRN-16-8 11.0M, WRN-28-10 36.5M
    # (one figure for both datasets). He et al. (2016), table 6 (CIFAR-10): ResNet-56 0.85M.
    bn = conv_norm_factory("batchnorm")
    for model, depth, k, published in (("wrn16_8", 16, 8, 11.0), ("wrn28_10", 28, 10, 36.5)):
        count = parameter_count(create_model(model, block=bn, num_classes=num_classes))
        assert round(count / 1e6, 1) == published, model
        assert count == wrn_parameters(depth, k, num_classes), model
    net = create_model("wideresnet", block=bn, num_classes=num_classes, depth=22, widen_factor=3)
    assert parameter_count(net) == wrn_parameters(22, 3, num_classes)
    resnet56 = parameter_count(create_model("resnet56", block=bn, num_classes=num_classes))
    assert resnet56 == cifar_resnet_parameters(56, num_classes)
    if num_classes == 10:
        assert round(resnet56 / 1e6, 2) == 0.85
        # The formulas' values, for a reader to compare with other implementations.
        assert wrn_parameters(16, 8, 10) == 10_961_370
        assert wrn_parameters(28, 10, 10) == 36_479_194
        assert resnet56 == 853_018


def test_capabilities_leave_out_conv_blocks():
    for name in WRNS:
        assert MODELS.info(name).capabilities == {RESIDUAL_GATE, NORM_ACT, PROBES}, name
        assert MODELS.info(name).description


@pytest.mark.parametrize("norm", NORMS.names())
def test_a_small_wrn_trains_with_every_norm_it_hosts(norm):
    factory = conv_norm_factory(norm)
    if NORMS.info(norm).has(OWNS_CONV):
        with pytest.raises(NormbenchError, match=f"norm '{norm}' cannot be used with model"):
            create_model("wideresnet", block=factory, num_classes=10, **SMALL)
        return
    torch.manual_seed(0)
    net = create_model("wideresnet", block=factory, num_classes=10, **SMALL)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # Two norms a block (its input, its first conv's output) and the final one.
    assert sum(isinstance(m, NORMS.get(norm).obj) for m in net.modules()) == 2 * 3 + 1
    with torch.no_grad():
        assert torch.isfinite(net.eval()(torch.randn(1, 3, 32, 32))).all()


def test_norms_that_own_their_convolution_are_refused_before_anything_is_built(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(models, "WideResNet", build)
    hosts = [e.info.name for e in MODELS if e.info.has(CONV_BLOCKS)]
    assert hosts and not set(hosts) & set(WRNS)
    for norm in [n for n in NORMS.names() if NORMS.info(n).has(OWNS_CONV)]:
        factory = conv_norm_factory(norm)
        with pytest.raises(NormbenchError) as refused:
            check_model_supports("wrn28_10", factory)
        message = str(refused.value)
        assert message.startswith(f"norm '{norm}' cannot be used with model 'wrn28_10': it owns")
        assert message.endswith(f"Models that can host it: {', '.join(hosts)}.")
        for model in WRNS:
            with pytest.raises(NormbenchError, match="owns its convolution"):
                create_model(model, block=factory, num_classes=10)
        with pytest.raises(NormbenchError, match=f"block factory \\({', '.join(hosts)}\\)"):
            factory.norm_layer(16)


def test_blocks_are_pre_activation_with_plain_convs_before_the_addition():
    torch.manual_seed(0)
    net = create_model("wideresnet", block=conv_norm_factory("batchnorm"), num_classes=10, **SMALL)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, module in net.named_modules():
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.__setitem__(name, (args[0], out))
        )
    with torch.no_grad():
        net.eval()(torch.randn(2, 3, 32, 32))
    # The stem is a bare convolution whose output goes straight into the first block's norm.
    assert type(net.stem) is nn.Conv2d and net.stem.bias is None
    assert seen["layers.0.preact.norm"][0] is seen["stem"][1]
    assert isinstance(net.layers[0].preact.act, nn.ReLU)
    for i, b in enumerate(net.layers):
        # conv1 -> norm -> ReLU is one factory block on the pre-activated input; conv2 is plain.
        assert list(b.conv1) == [b.conv1.conv, b.conv1.norm, b.conv1.act]
        assert isinstance(b.conv1.norm, nn.BatchNorm2d) and isinstance(b.conv1.act, nn.ReLU)
        assert type(b.conv2) is nn.Conv2d and b.conv2.bias is None
        assert seen[f"layers.{i}.conv1"][0] is seen[f"layers.{i}.preact"][1]
    # Block 0 (16 -> 16) adds its raw input; blocks 1 and 2 (strided, wider) add a 1x1 conv of the
    # pre-activated input.
    x, out = seen["layers.0"]
    assert net.layers[0].shortcut is None
    assert torch.equal(out, seen["layers.0.conv2"][1] + x)
    assert not torch.allclose(out, seen["layers.0.conv2"][1] + seen["layers.0.preact"][1])
    for i in (1, 2):
        shortcut = net.layers[i].shortcut
        assert shortcut.kernel_size == (1, 1) and shortcut.stride == (2, 2)
        assert seen[f"layers.{i}.shortcut"][0] is seen[f"layers.{i}.preact"][1]
        expected = seen[f"layers.{i}.conv2"][1] + seen[f"layers.{i}.shortcut"][1]
        assert torch.equal(seen[f"layers.{i}"][1], expected)
    # The last block's sum is normalized and activated once more before pooling.
    assert seen["final.norm"][0] is seen["layers"][1]
    assert torch.equal(seen["fc"][0], seen["final"][1].mean((2, 3)))


def test_skipinit_gates_start_at_zero_so_blocks_start_as_their_shortcuts():
    torch.manual_seed(0)
    net = create_model("wideresnet", block=conv_norm_factory("skipinit"), num_classes=10, **SMALL)
    blocks = [m for m in net.modules() if isinstance(m, WideBlock)]
    assert len(blocks) == 3
    for b in blocks:
        assert b.skip_gain.ndim == 0 and b.skip_gain.item() == 0 and b.skip_gain.requires_grad
    with torch.no_grad():
        x = torch.randn(2, 16, 8, 8)
        assert torch.equal(blocks[0](x), x)
        assert torch.equal(blocks[1](x), blocks[1].shortcut(blocks[1].preact(x)))
        image = torch.randn(2, 3, 32, 32)
        before = net(image)
        for b in blocks:
            b.conv1.conv.weight.normal_()
            b.conv2.weight.normal_()
        assert torch.equal(net(image), before)
    F.cross_entropy(net(image), torch.tensor([0, 1])).backward()
    assert all(b.skip_gain.grad is not None and b.skip_gain.grad != 0 for b in blocks)
    plain = create_model("wideresnet", block=conv_norm_factory("none"), num_classes=10, **SMALL)
    assert not any("skip_gain" in key for key in plain.state_dict())


class _ReLUCalls(TorchFunctionMode):
    """Counts ReLUs executed, module or functional."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += getattr(func, "__name__", "") in ("relu", "relu_")
        return func(*args, **(kwargs or {}))


def relu_calls(net: nn.Module) -> int:
    with torch.no_grad(), _ReLUCalls() as trace:
        net.eval()(torch.randn(2, 3, 32, 32))
    return trace.calls


@pytest.mark.parametrize("norm", [n for n in NORMS.names() if NORMS.info(n).has(ACT)])
def test_no_relu_follows_a_norm_with_its_own_activation(norm):
    torch.manual_seed(0)
    net = create_model("wideresnet", block=conv_norm_factory(norm), num_classes=10, **SMALL)
    norms = [m for m in net.modules() if isinstance(m, NORMS.get(norm).obj)]
    # No norm precedes an addition in a pre-activation net, so every norm keeps its own.
    assert len(norms) == 7 and all(m.apply_act for m in norms)
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert relu_calls(net) == 0
    # The same count sees the ReLU after each of BatchNorm's 7 norms.
    bn = create_model("wideresnet", block=conv_norm_factory("batchnorm"), num_classes=10, **SMALL)
    assert relu_calls(bn) == 7


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"depth": 12}, r"depth must be 6n\+4 .*got 12"),
        ({"depth": 4}, r"depth must be 6n\+4 .*got 4"),
        ({"depth": 16.0}, r"depth must be 6n\+4 .*got 16.0"),
        ({"widen_factor": 0}, "widen_factor must be an integer >= 1; got 0"),
        ({"widen_factor": 1.5}, "widen_factor must be an integer >= 1; got 1.5"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\); got 1.0"),
    ],
)
def test_bad_model_arguments_are_named(args, message):
    bn = conv_norm_factory("batchnorm")
    with pytest.raises(NormbenchError, match=message):
        create_model("wideresnet", block=bn, num_classes=10, **{**SMALL, **args})


def test_dropout_sits_between_a_blocks_convolutions():
    torch.manual_seed(0)
    bn = conv_norm_factory("batchnorm")
    net = create_model("wideresnet", block=bn, num_classes=10, dropout=0.3, **SMALL)
    b = net.layers[0]
    assert isinstance(b.dropout, nn.Dropout) and b.dropout.p == 0.3
    assert list(b.children()) == [b.preact, b.conv1, b.dropout, b.conv2]
    x = torch.randn(2, 3, 32, 32)
    assert not torch.equal(net(x), net(x))  # training: a fresh mask each call
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x), net(x))


def test_norm_affine_parameters_are_a_tiny_fraction_of_a_wrn():
    # What SAM-ON perturbs. WRN-16-8: two blocks a group; each norms its input and its first
    # conv's output, then the final norm on 512 channels.
    net = create_model("wrn16_8", block=conv_norm_factory("batchnorm"), num_classes=10)
    groups = [(16, 128), (128, 128), (128, 256), (256, 256), (256, 512), (512, 512)]
    norm_channels = sum(c_in + c for c_in, c in groups) + 512
    affine = affine_parameters(net)
    assert len(affine) == 2 * (2 * 6 + 1)
    assert sum(p.numel() for p in affine) == 2 * norm_channels == 7200
    assert sum(p.numel() for p in affine) / parameter_count(net) < 0.01


@pytest.mark.parametrize(
    ("model_args", "message"),
    [
        (
            "{ depth = 27, widen_factor = 2 }",
            "budgets.smoke.model_args: model 'wideresnet' refuses",
        ),
        ("{ depth = 16, widen = 2 }", "budgets.smoke.model_args.widen: unknown argument"),
    ],
)
def test_a_suite_with_bad_model_args_stops_before_anything_trains(tmp_path, model_args, message):
    text = tiny_suite(tmp_path).read_text()
    text = text.replace('model = "fastnet"', 'model = "wideresnet"')
    text = text.replace("model_args = { widths = [8, 8, 8, 8] }", f"model_args = {model_args}")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SuiteError, match=message):
        load_suite_file(path)
    result = invoke("run", f"--suite={path}", "--budget=smoke", f"--db={tmp_path / 'r.db'}")
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert not (tmp_path / "r.db").exists()
