"""The norm zoo: the contract for every registered norm, each zoo norm against its formula, and
the zoo inside the models (block factory, SkipInit, torchvision refusal, weight decay)."""

import copy
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import invoke, leaderboard_json, tiny_suite
from torch import nn

from normbench.errors import NormbenchError
from normbench.models import BasicBlock, conv_norm_factory, create_model
from normbench.norms import (
    AFFINE,
    BATCH_STATS,
    NORMS,
    OWNS_CONV,
    RELU_GAIN,
    WEIGHT,
    ConvNorm,
    ScaledStdConv,
    affine_parameters,
    create_norm,
)
from normbench.optim import parameter_groups
from normbench.suites import load_suite, plan

pytestmark = pytest.mark.usefixtures("one_thread")

ZOO = {  # name: family
    "frn": "frn",
    "evonorm_b0": "evonorm",
    "evonorm_s0": "evonorm",
    "variancenorm": "batch",
    "rmsnorm": "group",
    "weightnorm": "weight",
    "sws": "weight",
    "sws_gn": "weight",
    "spectral_norm": "weight",
    "convnorm": "convnorm",
    "skipinit": "none",
}
OWNING = [n for n in NORMS.names() if NORMS.info(n).has(OWNS_CONV)]
CHANNELS = (16, 48)  # 48 is not a multiple of 32: the group rules get tested


def inputs(n: int = 4, c: int = 16, size: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, size, size, generator=g) * 2 + 0.5


def per_channel(p: torch.Tensor) -> torch.Tensor:
    return p.detach().view(1, -1, 1, 1)


def kernel(conv: nn.Conv2d) -> nn.Parameter:
    """A convolution's trainable kernel: ``weight``, or the original of a parametrized weight."""
    if hasattr(conv, "parametrizations"):
        return conv.parametrizations.weight.original
    return conv.weight


def test_zoo_is_registered_with_family_and_description():
    for name, family in ZOO.items():
        info = NORMS.info(name)
        assert info.family == family and info.description, name


@pytest.mark.parametrize("name", NORMS.names())
def test_capability_flags_say_what_the_norm_does(name):
    """A flag is checked against the layer's behaviour, never restated."""
    info = NORMS.info(name)
    torch.manual_seed(0)
    norm = create_norm(name, 16).train()
    x = torch.cat([inputs(c=16, seed=1), inputs(c=16, seed=2) * 4 + 3])
    with torch.no_grad():
        # Every pass starts from the same state: a training pass may update state that the
        # output uses (spectral_norm's power iteration), which is not a dependence on the batch.
        together = copy.deepcopy(norm)(x)
        alone = torch.cat([copy.deepcopy(norm)(x[i : i + 1]) for i in range(len(x))])
    # batch_stats: in training mode a sample's output depends on the rest of its batch
    mixes = not torch.allclose(alone, together, rtol=1e-4, atol=1e-5)
    assert mixes == info.has(BATCH_STATS), name
    # owns_conv: the layer builds whole convolution blocks (of any shape, tested below)
    assert info.has(OWNS_CONV) == callable(getattr(NORMS.get(name).obj, "block", None)), name
    # weight: the kernel is reparametrised, so its scale does not change the output (up to the
    # eps of the kernel's normalization, 1e-5 against a kernel std of about 0.05)
    if info.has(WEIGHT):
        kernels = [kernel(m) for m in norm.modules() if isinstance(m, nn.Conv2d)]
        assert kernels, name
        with torch.no_grad():
            before = norm.eval()(x)
            for w in kernels:
                w.mul_(3)
            assert torch.allclose(norm(x), before, rtol=1e-3, atol=1e-4), name


# --- the contract, for every registered norm ------------------------------------------------------


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("name", NORMS.names())
def test_forward_contract(name, c):
    torch.manual_seed(0)
    norm = create_norm(name, c)
    x = inputs(c=c)
    for train in (True, False):
        norm.train(train)
        start = copy.deepcopy(norm)  # both layouts from the same state (see the flags' test)
        y = norm(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        y_cl = start(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(y_cl, y, rtol=1e-4, atol=1e-5)
    norm.eval()
    one = norm(x[:1])
    assert one.shape == (1, c, 6, 6) and torch.isfinite(one).all()
    # in eval mode a sample's output does not depend on the rest of its batch
    alone = torch.cat([norm(x[i : i + 1]) for i in range(len(x))])
    assert torch.allclose(alone, norm(x), rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for train in (True, False):
            for value in (x, torch.full_like(x, 0.5), x * 1e4):
                assert torch.isfinite(norm.train(train)(value)).all()


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("name", NORMS.names())
def test_bfloat16(name, c):
    torch.manual_seed(0)
    norm = create_norm(name, c)
    half = copy.deepcopy(norm).to(torch.bfloat16)
    x = inputs(c=c)
    for train in (True, False):
        y = half.train(train)(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    # Same numbers up to bfloat16 rounding (of the input, the parameters and the output).
    y = half.train()(x.to(torch.bfloat16)).float()
    reference = norm.train()(x.to(torch.bfloat16).float())
    assert (y - reference).abs().max() <= 0.05 * reference.abs().max() + 0.05


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("name", NORMS.names())
def test_gradients_and_state_dict(name, c):
    torch.manual_seed(0)
    norm = create_norm(name, c).train()
    x = inputs(c=c).requires_grad_()
    y = norm(x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for pname, p in norm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname
    assert {id(p) for p in affine_parameters(norm)} <= {id(p) for p in norm.parameters()}

    with torch.no_grad():
        norm(inputs(c=c, seed=1))  # move running statistics away from their initial values
    torch.manual_seed(1)
    fresh = create_norm(name, c)
    fresh.load_state_dict(norm.state_dict())
    x = inputs(c=c, seed=2)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), norm.eval()(x))


@pytest.mark.parametrize("name", OWNING)
def test_owning_norms_build_blocks_of_any_shape(name):
    cls = NORMS.get(name).obj
    torch.manual_seed(0)
    for kernel_size, stride, size in ((3, 1, 7), (3, 2, 7), (3, 2, 8), (1, 1, 6), (1, 2, 7)):
        block = cls.block(5, 16, kernel_size, stride)
        assert isinstance(block, cls)
        x = torch.randn(2, 5, size, size)
        expected = nn.Conv2d(5, 16, kernel_size, stride, padding=kernel_size // 2)(x).shape
        assert block(x).shape == expected
    # cls(C) alone is a C -> C, 3x3, stride-1 block.
    assert cls(8)(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)


@pytest.mark.parametrize("name", [n for n in NORMS.names() if NORMS.info(n).has(WEIGHT)])
def test_weight_norms_list_gain_and_bias_but_not_the_weight(name):
    block = create_norm(name, 16)
    conv = block.conv if name == "sws_gn" else block
    affine = {id(p) for p in affine_parameters(block)}
    assert id(kernel(conv)) not in affine
    if name == "spectral_norm":  # the normalized kernel's scale is fixed: no gain
        assert not hasattr(conv, "gain")
    else:
        assert id(conv.gain) in affine
    if conv.bias is not None:
        assert id(conv.bias) in affine


# --- each zoo norm against its formula ------------------------------------------------------------


def test_frn_matches_its_formula():
    torch.manual_seed(0)
    frn = create_norm("frn", 8)
    with torch.no_grad():
        for p in (frn.weight, frn.bias, frn.tau):
            p.normal_()
        frn.eps.fill_(-1e-3)  # the layer uses |eps|
    x = inputs(c=8)
    nu2 = x.square().mean(dim=(2, 3), keepdim=True)
    y = per_channel(frn.weight) * x / torch.sqrt(nu2 + 1e-3) + per_channel(frn.bias)
    assert torch.allclose(frn(x), torch.maximum(y, per_channel(frn.tau)), atol=1e-5)
    assert [id(p) for p in frn.affine_parameters()] == [id(frn.weight), id(frn.bias), id(frn.tau)]


def group_std(x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    n, c = x.shape[:2]
    var = x.reshape(n, groups, -1).var(dim=-1, correction=0)
    return torch.sqrt(var + eps).repeat_interleave(c // groups, dim=1).view(n, c, 1, 1)


def test_evonorm_s0_matches_its_formula():
    torch.manual_seed(0)
    s0 = create_norm("evonorm_s0", 48)  # gcd(32, 48) = 16 groups of 3 channels
    assert s0.groups == 16
    with torch.no_grad():
        s0.v.zero_()
        s0.weight.normal_()
        s0.bias.normal_()
    x = inputs(c=48)
    expected = x * 0.5 / group_std(x, 16) * per_channel(s0.weight) + per_channel(s0.bias)
    assert torch.allclose(s0(x), expected, atol=1e-5)
    with torch.no_grad():
        s0.v.normal_()
    expected = x * torch.sigmoid(per_channel(s0.v) * x) / group_std(x, 16)
    expected = expected * per_channel(s0.weight) + per_channel(s0.bias)
    assert torch.allclose(s0(x), expected, atol=1e-5)


def test_evonorm_b0_matches_its_formula_and_tracks_the_variance():
    torch.manual_seed(0)
    b0 = create_norm("evonorm_b0", 8)
    with torch.no_grad():
        b0.v.normal_()
    x = inputs(c=8)
    batch_var = x.var(dim=(0, 2, 3), correction=0)
    instance_std = torch.sqrt(x.var(dim=(2, 3), correction=0, keepdim=True) + 1e-5)
    den = torch.maximum(
        per_channel(torch.sqrt(batch_var + 1e-5)), per_channel(b0.v) * x + instance_std
    )
    assert torch.allclose(b0.train()(x), x / den, atol=1e-5)
    n = x.numel() / 8
    assert torch.allclose(b0.running_var, 0.9 + 0.1 * batch_var * n / (n - 1))
    den = torch.maximum(
        per_channel(torch.sqrt(b0.running_var + 1e-5)), per_channel(b0.v) * x + instance_std
    )
    assert torch.allclose(b0.eval()(x), x / den, atol=1e-5)


def test_variance_norm_scales_without_centering():
    torch.manual_seed(0)
    vn = create_norm("variancenorm", 8).train()
    x = inputs(c=8)
    y = vn(x)
    assert torch.allclose(y.var(dim=(0, 2, 3), correction=0), torch.ones(8), atol=1e-4)
    std = torch.sqrt(x.var(dim=(0, 2, 3), correction=0) + 1e-5)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), x.mean(dim=(0, 2, 3)) / std, atol=1e-5)
    # On an input with zero mean per channel the output has unit second moment.
    centred = x - x.mean(dim=(0, 2, 3), keepdim=True)
    assert torch.allclose(vn(centred).square().mean(dim=(0, 2, 3)), torch.ones(8), atol=1e-4)


def test_rmsnorm_gives_unit_mean_square_over_channels():
    torch.manual_seed(0)
    y = create_norm("rmsnorm", 16)(inputs(c=16) * 3)
    assert torch.allclose(y.square().mean(dim=1), torch.ones(4, 6, 6), atol=1e-4)


def test_sws_standardizes_each_output_channel():
    torch.manual_seed(0)
    sws = ScaledStdConv.block(6, 8, 3, 1)
    with torch.no_grad():
        sws.weight.mul_(5).add_(2)
        sws.gain.uniform_(0.5, 2)
    w = sws.standardized_weight()
    fan_in = 6 * 3 * 3
    assert w.mean(dim=(1, 2, 3)).abs().max() < 1e-6
    std = w.std(dim=(1, 2, 3), correction=0)
    assert torch.allclose(std, torch.full((8,), 1 / math.sqrt(fan_in)), rtol=1e-4)
    effective = RELU_GAIN * sws.gain.view(-1, 1, 1, 1) * w
    assert torch.allclose(sws.effective_weight(), effective)
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(sws(x), F.conv2d(x, effective, sws.bias, padding=1), atol=1e-5)


def test_weightnorm_filters_have_norm_g():
    torch.manual_seed(0)
    wn = create_norm("weightnorm", 8)
    with torch.no_grad():
        wn.gain.uniform_(0.5, 2)
    norms = torch.linalg.vector_norm(wn.effective_weight(), dim=(1, 2, 3))
    v_norms = torch.linalg.vector_norm(wn.weight, dim=(1, 2, 3))
    # g v / (||v|| + 1e-5) falls short of g by g 1e-5 / (||v|| + 1e-5) at most.
    assert ((norms - wn.gain).abs() <= 1e-5 * wn.gain / v_norms + 1e-6).all()


def test_groupnorm_groups_span_layernorm_to_instancenorm():
    x = inputs(c=16)
    assert torch.allclose(
        create_norm("groupnorm", 16, groups=1)(x), create_norm("layernorm", 16)(x)
    )
    assert torch.allclose(
        create_norm("groupnorm", 16, groups=16)(x), create_norm("instancenorm", 16)(x), atol=1e-6
    )


# --- ConvNorm -------------------------------------------------------------------------------------


def test_convnorm_1x1_divides_by_the_filter_norm():
    torch.manual_seed(0)
    for stride in (1, 2):
        block = ConvNorm.block(5, 7, kernel_size=1, stride=stride)
        x = torch.randn(2, 5, 6, 6)
        norms = torch.linalg.vector_norm(block.weight.detach(), dim=(1, 2, 3)).view(1, -1, 1, 1)
        expected = F.conv2d(x, block.weight, stride=stride) / norms
        assert torch.allclose(block.preconditioned_conv(x), expected, atol=1e-5)


def numpy_convnorm(x: np.ndarray, a: np.ndarray, stride: int) -> np.ndarray:
    """The ConvNorm preconditioned convolution of one image, straight from the spec, in float64."""
    cout, cin, k, _ = a.shape
    _, h, w = x.shape
    sh, sw = h + k - 1, w + k - 1
    padded = np.pad(x, ((0, 0), (k - 1, k - 1), (k - 1, k - 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k), axis=(1, 2))
    y = np.einsum("chwij,ocij->ohw", windows, a)  # full convolution (cross-correlation)
    assert y.shape == (cout, sh, sw)
    out = np.empty_like(y)
    for o in range(cout):
        energy = sum(
            np.abs(np.fft.rfft2(np.pad(a[o, j], ((0, sh - k), (0, sw - k))))) ** 2
            for j in range(cin)
        )
        out[o] = np.fft.irfft2(np.fft.rfft2(y[o]) * energy**-0.5, s=(sh, sw))
    crop = k - 1 - k // 2
    return out[:, crop : sh - crop : stride, crop : sw - crop : stride]


@pytest.mark.parametrize("stride", [1, 2])
def test_convnorm_3x3_matches_a_numpy_implementation_of_the_spec(stride):
    torch.manual_seed(0)
    block = ConvNorm.block(3, 4, kernel_size=3, stride=stride)
    x = torch.randn(1, 3, 7, 6)  # odd and even sides, not square
    got = block.preconditioned_conv(x).detach().numpy()[0]
    expected = numpy_convnorm(
        x.numpy()[0].astype(np.float64), block.weight.detach().numpy(), stride
    )
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_convnorm_running_preconditioner():
    torch.manual_seed(0)
    block = ConvNorm(4).train()
    x = torch.randn(2, 4, 5, 5)
    size = (7, 7)  # the full convolution of a 5x5 input with a 3x3 kernel
    block(x)
    v1 = block.preconditioner(size)
    assert torch.equal(block.running_v, v1) and int(block.num_steps) == 1  # a = 1 at t = 0
    with torch.no_grad():
        block.weight.mul_(torch.rand_like(block.weight) + 0.5)
    v2 = block.preconditioner(size)
    block(x)
    a = 0.5 * (math.cos(math.pi * 1 / 40000) + 1)
    assert torch.allclose(block.running_v, a * v2 + (1 - a) * v1)
    block.num_steps.fill_(50000)  # past the ramp-down the factor stays at 0.01
    previous = block.running_v.clone()
    block(x)
    assert torch.allclose(block.running_v, 0.01 * v2 + 0.99 * previous)

    # Eval mode uses the running V, train mode the current one.
    block.eval()
    with torch.no_grad():
        block.running_v.copy_(v2)
        from_running = block.preconditioned_conv(x)
        block.running_v.mul_(4)
        assert torch.allclose(block.preconditioned_conv(x), 4 * from_running, atol=1e-5)
        assert torch.allclose(block.train().preconditioned_conv(x), from_running, atol=1e-6)
    with pytest.raises(ValueError, match="different input size"):
        block.eval()(torch.randn(1, 4, 6, 6))


def test_convnorm_affine_starts_as_identity_and_is_kept_by_model_init():
    torch.manual_seed(0)
    net = create_model("resnet20", block=conv_norm_factory("convnorm"), num_classes=10)
    block = net.stem.block  # ConvNorm, then the ReLU the block factory adds
    x = torch.randn(2, 3, 8, 8)
    z = block.preconditioned_conv(x)
    assert torch.allclose(
        F.conv2d(z, block.affine_weight, block.affine_bias, padding=1, groups=16), z, atol=1e-6
    )


# --- the zoo in the models ------------------------------------------------------------------------


# fastnet has no residual branches and refuses SkipInit (tested below).
@pytest.mark.parametrize(
    ("name", "model", "options"),
    [(name, "resnet20", {}) for name in ZOO]
    + [(name, "fastnet", {"widths": [8] * 4}) for name in ZOO if name != "skipinit"],
)
def test_models_run_forward_and_backward_with_every_zoo_norm(name, model, options):
    torch.manual_seed(0)
    net = create_model(model, block=conv_norm_factory(name), num_classes=10, **options)
    out = net(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
    assert any(isinstance(m, NORMS.get(name).obj) for m in net.modules())
    with torch.no_grad():
        assert torch.isfinite(net.eval()(torch.randn(1, 3, 16, 16))).all()


def test_skipinit_resnet_starts_as_its_shortcuts():
    torch.manual_seed(0)
    net = create_model("resnet20", block=conv_norm_factory("skipinit"), num_classes=10)
    blocks = [m for m in net.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9
    for b in blocks:
        assert b.skip_gain.ndim == 0 and b.skip_gain.item() == 0 and b.skip_gain.requires_grad
    with torch.no_grad():
        for b, channels in ((blocks[0], 16), (blocks[3], 16)):  # a plain and a strided block
            x = torch.randn(2, channels, 8, 8)
            assert torch.equal(b(x), F.relu(b.shortcut(x)))
        image = torch.randn(2, 3, 16, 16)
        before = net(image)
        for b in blocks:
            b.conv1.conv.weight.normal_()
            b.conv2.conv.weight.normal_()
        assert torch.equal(net(image), before)
    # The gates are trainable, get no weight decay and are not norm affine parameters.
    F.cross_entropy(net(image), torch.tensor([0, 1])).backward()
    assert all(b.skip_gain.grad is not None and b.skip_gain.grad != 0 for b in blocks)
    decay, no_decay = parameter_groups(net, 5e-4)
    gates = {id(b.skip_gain) for b in blocks}
    assert gates <= {id(p) for p in no_decay["params"]}
    assert not gates & {id(p) for p in affine_parameters(net)}


def test_models_without_residual_branches_refuse_skipinit():
    # On fastnet SkipInit would train exactly as "none" and give a duplicate, misleading row.
    message = r"'skipinit' cannot be used with model 'fastnet'.*no residual.*resnet20, resnet56"
    with pytest.raises(NormbenchError, match=message):
        create_model("fastnet", block=conv_norm_factory("skipinit"), num_classes=10)
    with pytest.raises(NormbenchError, match="'skipinit' cannot be used with model 'resnet18'"):
        create_model("resnet18", block=conv_norm_factory("skipinit"), num_classes=10)
    net = create_model("resnet20", block=conv_norm_factory("none"), num_classes=10)
    assert not any("skip_gain" in key for key in net.state_dict())


def test_suite_plans_refuse_a_norm_the_budget_model_cannot_host():
    cifar10, imagenet_c = load_suite("cifar10"), load_suite("imagenet-c")
    with pytest.raises(NormbenchError, match="'skipinit' cannot be used with model 'fastnet'"):
        plan(cifar10, "cpu", norms=["batchnorm", "skipinit"], optimizers=["sgd"])
    with pytest.raises(NormbenchError, match="'convnorm' cannot be used with model 'resnet18'"):
        plan(imagenet_c, "cpu", norms=["convnorm"])
    # The same norms are fine where the model can host them.
    runs = plan(cifar10, "full", norms=["skipinit", "convnorm"])
    assert {run.norm for run in runs} == {"skipinit", "convnorm"}


def test_weight_decay_spares_zoo_affine_parameters():
    net = create_model("resnet20", block=conv_norm_factory("convnorm"), num_classes=10)
    decay, no_decay = parameter_groups(net, 5e-4)
    exempt = {id(p) for p in no_decay["params"]}
    for m in net.modules():
        if isinstance(m, ConvNorm):
            assert id(m.affine_weight) in exempt  # 4-D, exempt as an affine parameter
            assert id(m.weight) in {id(p) for p in decay["params"]}


@pytest.mark.parametrize("name", OWNING)
def test_torchvision_resnets_refuse_norms_that_own_their_convolution(name):
    factory = conv_norm_factory(name)
    message = rf"norm '{name}' cannot be used with model 'resnet18': it owns its convolution"
    with pytest.raises(NormbenchError, match=message):
        create_model("resnet18", block=factory, num_classes=10)
    with pytest.raises(NormbenchError, match="owns its convolution"):
        factory.norm_layer(16)


def test_torchvision_resnets_still_take_per_channel_zoo_norms():
    net = create_model("resnet18", block=conv_norm_factory("rmsnorm"), num_classes=10)
    assert any(isinstance(m, NORMS.get("rmsnorm").obj) for m in net.modules())


def test_block_factory_accepts_owning_classes_and_partials():
    block = conv_norm_factory(ScaledStdConv)(3, 8, 3, 2)
    assert isinstance(block, ScaledStdConv) and block.stride == (2, 2)
    block = conv_norm_factory(functools.partial(ConvNorm, rampdown_steps=10))(3, 8, 1, 1)
    assert isinstance(block, ConvNorm) and block.rampdown_steps == 10
    assert block.kernel_size == (1, 1)

    class Unregistered(ScaledStdConv):
        pass

    factory = conv_norm_factory(Unregistered)
    assert factory.owns_conv and not factory.skipinit
    assert isinstance(factory(3, 8), Unregistered)


# --- Norm options in names ------------------------------------------------------------------------


def test_norm_options_in_a_name_reach_the_layers_under_one_canonical_name():
    entry = NORMS.get(" groupnorm( eps = 1e-3, groups = 4 ) ")
    assert entry.info.name == "groupnorm(eps=0.001,groups=4)"
    assert entry.info.family == "group" and entry.info.has(AFFINE)
    # Options equal to their defaults are left out, so they name the plain norm's row.
    assert NORMS.get("groupnorm(groups=32)").info.name == "groupnorm"
    assert NORMS.get("groupnorm()").obj is NORMS.get("groupnorm").obj

    def group_counts(name):
        net = create_model("resnet20", block=conv_norm_factory(name), num_classes=10)
        return {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}

    assert group_counts("groupnorm(groups=4)") == {4}
    assert group_counts("groupnorm") == {16, 32}  # gcd(32, C) for C = 16, 32, 64
    assert group_counts("sws_gn(groups=2)") == {2}  # a norm that owns its conv gets them too
    net = create_model(
        "resnet20", block=conv_norm_factory("convnorm(rampdown_steps=7)"), num_classes=10
    )
    assert {m.rampdown_steps for m in net.modules() if isinstance(m, ConvNorm)} == {7}
    x = inputs(c=16)
    assert torch.equal(
        create_norm("groupnorm(groups=16)", 16)(x), create_norm("groupnorm", 16, groups=16)(x)
    )


@pytest.mark.parametrize(
    "name, message",
    [
        ("groupnorm(grups=4)", "Norm 'groupnorm' has no option 'grups'; its options .*groups=32"),
        ("groupnorm(4)", "keyword arguments with literal values"),
        ("groupnorm(groups=four)", "keyword arguments with literal values"),
        ("groupnorm(groups=0)", "cannot be built with these options: .*positive integer"),
        ("frn(groups=4)", "Norm 'frn' has no option 'groups'"),
        ("grupnorm(groups=4)", "Unknown norm 'grupnorm'. Did you mean 'groupnorm'"),
    ],
)
def test_bad_norm_options_are_refused_with_the_reason(name, message):
    with pytest.raises(NormbenchError, match=message):
        NORMS.get(name)


def test_suite_plans_and_files_take_norm_options(tmp_path):
    runs = plan(
        load_suite("cifar10"), "cpu", norms=["groupnorm( groups=8 )", "frn"], optimizers=["sgd"]
    )
    assert [run.norm for run in runs] == ["groupnorm(groups=8)", "frn"]
    suite = tmp_path / "options.toml"
    text = load_suite("cifar10").path.read_text()
    suite.write_text(text.replace('"groupnorm"', '"groupnorm(groups=8)"', 1))
    assert "groupnorm(groups=8)" in load_suite(str(suite)).spec.norms
    suite.write_text(text.replace('"groupnorm"', '"groupnorm(grups=8)"', 1))
    with pytest.raises(NormbenchError, match=r"norms\[\d+\]: Norm 'groupnorm' has no option"):
        load_suite(str(suite))


def test_a_norm_with_options_trains_into_its_own_leaderboard_row(cifar_dir, tmp_path):
    suite, db = tiny_suite(tmp_path), tmp_path / "results.db"
    args = ("run", f"--suite={suite}", "--budget=smoke", "--optimizers=sgd", f"--db={db}")
    result = invoke(*args, "--norms=groupnorm(groups=2, eps=1e-3),groupnorm(groups=32)")
    assert result.exit_code == 0, result.output
    rows = {r["norm"]: r for r in leaderboard_json(str(db), suite=str(suite))}
    assert set(rows) == {"groupnorm(eps=0.001,groups=2)", "groupnorm"}
    assert all(r["status"] == "1 finished" for r in rows.values())
    # The same configuration spelled another way is the same run: nothing new to do.
    again = invoke(*args, "--norms=groupnorm(eps=0.001,groups=2)")
    assert again.exit_code == 0 and "skip" in again.output.lower(), again.output
    bad = invoke(*args, "--norms=groupnorm(grups=2)")
    assert bad.exit_code == 2 and "has no option 'grups'" in bad.output

    from dashboard.data import norm_info

    info = norm_info("groupnorm(eps=0.001,groups=2)")
    assert info.registered and info.family == "group" and "class GroupNorm" in info.source
