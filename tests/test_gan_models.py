"""GAN models: spectral_norm against its definition, both architectures with every norm (built or
refused before building), their structure, initialisation and one real training step, the losses
and the generator's moving average against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normbench import gan_models
from normbench.errors import NormbenchError
from normbench.gan_models import (
    GAN_MODELS,
    GeneratorEMA,
    build_gan,
    check_gan_supports,
    d_loss,
    g_loss,
)
from normbench.models import MODELS, conv_norm_factory, create_model, parameter_count
from normbench.norms import (
    NORMS,
    NoNorm,
    WeightNormConv,
    affine_parameters,
    create_norm,
    norm_class,
)
from normbench.norms.weight import SpectralNormConv, restart_power_iteration

pytestmark = pytest.mark.usefixtures("one_thread")

#: Small widths: every test network runs in milliseconds.
TINY = {"dcgan": {"width": 4}, "sngan": {"g_width": 8, "d_width": 8}}
#: The registered norms each architecture refuses (and why, in the module docstring).
REFUSED = {"dcgan": {"skipinit"}, "sngan": {"sws_gn", "convnorm"}}
BUILTIN = [n for n in NORMS.names() if not n.startswith(("test-", "submission/"))]


def sigma(weight: torch.Tensor) -> float:
    """The largest singular value of a kernel reshaped to (out, -1)."""
    return torch.linalg.matrix_norm(weight.detach().flatten(1).double(), 2).item()


def original(m: nn.Module) -> torch.Tensor:
    return m.parametrizations.weight.original


def estimate(m: nn.Module) -> torch.Tensor:
    """u^T W v: the sigma a spectrally normalized layer divides by (in eval mode)."""
    p = m.parametrizations.weight[0]
    return p._u @ original(m).detach().flatten(1) @ p._v


# --- spectral_norm --------------------------------------------------------------------------------


def test_spectral_norm_is_registered_as_a_weight_norm_that_owns_its_convolution():
    info = NORMS.info("spectral_norm")
    assert info.family == "weight" and info.capabilities == {"weight", "owns_conv"}
    assert "Miyato et al. 2018" in info.description
    block = SpectralNormConv.block(5, 7, 3, 2)
    assert isinstance(block, SpectralNormConv) and isinstance(block, nn.Conv2d)
    assert block.stride == (2, 2) and block.padding == (1, 1)
    # no gain: the bias is its only affine parameter
    assert [id(p) for p in affine_parameters(block)] == [id(block.bias)]
    assert {n for n, _ in block.named_parameters()} == {"bias", "parametrizations.weight.original"}


def test_training_passes_bring_the_largest_singular_value_to_one():
    torch.manual_seed(0)
    conv = create_norm("spectral_norm", 8).train()
    with torch.no_grad():
        original(conv).mul_(7)  # any scale: it divides out
        x = torch.randn(2, 8, 6, 6)
        for _ in range(40):
            conv(x)
        conv.eval()
        assert sigma(conv.weight) == pytest.approx(1, abs=1e-3)
        # the output is the convolution with W / sigma(W)
        exact = original(conv) / sigma(original(conv))
        assert torch.allclose(conv(x), F.conv2d(x, exact, conv.bias, padding=1), atol=1e-3)


def test_one_power_iteration_per_training_pass_and_none_in_eval_mode():
    torch.manual_seed(0)
    conv = create_norm("spectral_norm", 6)
    p = conv.parametrizations.weight[0]
    w = original(conv).detach().flatten(1)
    x = torch.randn(2, 6, 5, 5)
    u, v = p._u.clone(), p._v.clone()
    with torch.no_grad():
        conv.eval()(x)
        assert torch.equal(p._u, u) and torch.equal(p._v, v)  # eval mode leaves u and v
        y = conv(x)
    # the eval output divides by u^T W v with the stored vectors
    expected = F.conv2d(x, original(conv) / (u @ w @ v), conv.bias, padding=1)
    assert torch.allclose(y, expected, atol=1e-5)
    conv.train()(x)
    u1 = F.normalize(w @ v, dim=0)
    assert torch.allclose(p._u, u1, atol=1e-6)
    assert torch.allclose(p._v, F.normalize(w.T @ u1, dim=0), atol=1e-6)


def test_state_dict_round_trip_after_training():
    torch.manual_seed(0)
    conv = create_norm("spectral_norm", 8).train()
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    for seed in range(3):
        x = torch.randn(4, 8, 5, 5, generator=torch.Generator().manual_seed(seed))
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    state = conv.state_dict()
    assert {"parametrizations.weight.0._u", "parametrizations.weight.0._v"} <= set(state)
    torch.manual_seed(1)
    fresh = create_norm("spectral_norm", 8)
    assert not torch.equal(
        fresh.parametrizations.weight[0]._u, state["parametrizations.weight.0._u"]
    )
    fresh.load_state_dict(state)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), conv.eval()(x))


def test_restart_power_iteration_re_estimates_sigma_after_new_weights():
    torch.manual_seed(0)
    conv = create_norm("spectral_norm", 16)
    with torch.no_grad():
        original(conv).normal_()  # u and v describe the old weights
    stale = estimate(conv).item() / sigma(original(conv))
    restart_power_iteration(nn.Sequential(conv))
    fresh = estimate(conv).item() / sigma(original(conv))
    assert abs(stale) < 0.6 and fresh == pytest.approx(1, abs=0.05)


@pytest.mark.parametrize(
    ("model", "args"),
    [
        ("resnet20", {"width": 4}),
        ("vgg", {"depth": 5, "width": 4}),
        ("fastnet", {"widths": [4] * 4}),
    ],
)
def test_spectral_norm_in_the_classifiers_that_host_norms_owning_their_convolution(model, args):
    assert MODELS.info(model).has("conv_blocks")
    torch.manual_seed(0)
    net = create_model(model, block=conv_norm_factory("spectral_norm"), num_classes=10, **args)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(isinstance(m, SpectralNormConv) for m in convs)
    out = net(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, torch.tensor([0, 1])).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_wide_resnets_refuse_spectral_norm():
    with pytest.raises(NormbenchError, match="'spectral_norm' cannot be used with model 'wrn16_8'"):
        create_model("wrn16_8", block=conv_norm_factory("spectral_norm"), num_classes=10)


# --- Every norm in both architectures ------------------------------------------------------------


def run(arch: str, g_norm: str, d_norm: str, n: int = 3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    g, d = build_gan(arch, g_norm, d_norm, **TINY[arch])
    for train in (True, False):
        g.train(train), d.train(train)
        with torch.no_grad():
            images = g(torch.randn(n, 128))
            logits = d(images)
        assert images.shape == (n, 3, 32, 32) and images.dtype == torch.float32
        assert torch.isfinite(images).all() and images.abs().max() <= 1
        assert logits.shape == (n,) and torch.isfinite(logits).all()
    return g, d


@pytest.mark.parametrize("arch", ["dcgan", "sngan"])
def test_every_registered_norm_builds_and_runs_or_is_refused(arch):
    refused = set()
    for norm in BUILTIN:
        try:
            check_gan_supports(arch, norm, norm)
        except NormbenchError as err:
            refused.add(norm)
            assert f"norm {norm!r} cannot be used in the generator of GAN {arch!r}" in str(err)
            with pytest.raises(NormbenchError, match="cannot be used in the discriminator"):
                check_gan_supports(arch, "none", norm)
            with pytest.raises(NormbenchError, match="cannot be used in the generator"):
                build_gan(arch, norm, "none", **TINY[arch])
            continue
        g, d = run(arch, norm, norm, n=2)
        cls = norm_class(norm)
        if cls is not NoNorm:
            assert any(isinstance(m, cls) for m in g.modules()), norm
            assert any(isinstance(m, cls) for m in d.modules()), norm
    assert refused == REFUSED[arch]


@pytest.mark.parametrize(
    ("g_norm", "d_norm"),
    [
        ("batchnorm", "spectral_norm"),
        ("layernorm", "none"),
        ("groupnorm(groups=2)", "instancenorm"),
        ("frn", "evonorm_s0"),
        ("evonorm_b0", "layernorm"),
        ("weightnorm", "sws"),
        ("none", "batchnorm"),
    ],
)
@pytest.mark.parametrize("arch", ["dcgan", "sngan"])
def test_separate_norms_for_generator_and_discriminator(arch, g_norm, d_norm):
    g, d = run(arch, g_norm, d_norm)
    g_cls, d_cls = norm_class(g_norm), norm_class(d_norm)
    if g_cls is not NoNorm:
        assert any(isinstance(m, g_cls) for m in g.modules())
    if d_cls is not NoNorm:
        assert any(isinstance(m, d_cls) for m in d.modules())
    if g_cls is not d_cls:  # each network has its own norm only
        assert d_cls is NoNorm or not any(isinstance(m, d_cls) for m in g.modules())
        assert g_cls is NoNorm or not any(isinstance(m, g_cls) for m in d.modules())


def test_convnorm_and_sws_gn_build_dcgan_conv_norm_pairs():
    g, d = run("dcgan", "convnorm", "sws_gn")
    cls = NORMS.get("convnorm").obj
    assert sum(isinstance(m, cls) for m in g.modules()) == 3  # the up-sampling blocks
    assert type(g.to_rgb) is nn.Conv2d and isinstance(g.stem, nn.ReLU)  # no norm there
    assert sum(isinstance(m, NORMS.get("sws_gn").obj) for m in d.modules()) == 7


# --- Structure -----------------------------------------------------------------------------------


def test_dcgan_structure_and_parameter_count():
    torch.manual_seed(0)
    g, d = build_gan("dcgan", "none", "none")

    def conv(c_in, c_out, k=3):
        return c_out * c_in * k * k + c_out  # with bias: "none" has no shift

    g_expected = (128 * 512 * 16 + 512 * 16) + conv(512, 256) + conv(256, 128) + conv(128, 64)
    g_expected += conv(64, 3)
    d_expected = conv(3, 64) + conv(64, 64) + conv(64, 128) + conv(128, 128)
    d_expected += conv(128, 256) + conv(256, 256) + conv(256, 512) + (512 + 1)
    assert parameter_count(g) == g_expected == 2_607_235
    assert parameter_count(d) == d_expected == 2_326_081
    strides = [m.stride[0] for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert strides == [1, 2, 1, 2, 1, 2, 1]
    assert sum(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.1 for m in d.modules()) == 7
    # BatchNorm: a norm layer after the linear, one per block, no conv bias before it
    g, _ = build_gan("dcgan", "batchnorm", "none")
    norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [m.num_features for m in norms] == [512, 256, 128, 64]
    assert g.blocks[0].conv.bias is None and g.to_rgb.bias is not None


def test_sngan_structure_and_parameter_count():
    torch.manual_seed(0)
    g, d = build_gan("sngan", "none", "none")

    def conv(c_in, c_out, k=3):
        return c_out * c_in * k * k + c_out

    block = conv(256, 256) + conv(256, 256) + conv(256, 256, 1)
    g_expected = (128 * 256 * 16 + 256 * 16) + 3 * block + conv(256, 3)
    d_expected = conv(3, 128) + conv(128, 128) + conv(3, 128, 1)  # optimized block
    d_expected += 3 * (conv(128, 128) + conv(128, 128)) + conv(128, 128, 1) + (128 + 1)
    assert parameter_count(g) == g_expected == 4_273_155  # SNGAN's 4.3M and 1.0M
    assert parameter_count(d) == d_expected == 1_053_825
    assert [b.shortcut is None for b in d.blocks[1:]] == [False, True, True]
    assert [b.downsample for b in d.blocks[1:]] == [True, False, False]
    # pre-activation: a norm before each block and before the convolution to RGB
    g, d = build_gan("sngan", "batchnorm", "batchnorm", **TINY["sngan"])
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 3 * 2 + 1
    assert sum(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == 1 + 3 * 2


def test_sngan_blocks_compute_their_documented_forward():
    torch.manual_seed(0)
    g, d = build_gan("sngan", "batchnorm", "none", **TINY["sngan"])
    x = torch.randn(2, 8, 4, 4)
    b = g.blocks[0].eval()
    with torch.no_grad():
        up = F.interpolate(F.relu(b.preact.norm(x)), scale_factor=2, mode="nearest")
        expected = b.conv2(b.conv1(up)) + b.shortcut(F.interpolate(x, scale_factor=2))
        assert torch.allclose(b(x), expected, atol=1e-6)
        image = torch.randn(2, 3, 32, 32)
        opt = d.blocks[0]
        expected = F.avg_pool2d(opt.conv2(F.relu(opt.conv1.conv(image))), 2)
        expected = expected + opt.shortcut(F.avg_pool2d(image, 2))
        assert torch.allclose(opt(image), expected, atol=1e-6)
        h = d.blocks(image)
        assert h.shape == (2, 8, 8, 8)
        assert torch.allclose(d(image), d.head(F.relu(h).sum((2, 3)))[:, 0], atol=1e-5)


def test_spectral_norm_normalizes_every_layer_of_its_network_only():
    for arch in ("dcgan", "sngan"):
        torch.manual_seed(0)
        g, d = build_gan(arch, "batchnorm", "spectral_norm", **TINY[arch])
        layers = [m for m in d.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        assert all(hasattr(m, "parametrizations") for m in layers), arch
        assert all(isinstance(m, SpectralNormConv) for m in layers if isinstance(m, nn.Conv2d))
        assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())  # no activation norm
        assert not any(hasattr(m, "parametrizations") for m in g.modules())
        # built with sigma estimated for the initialised weights
        d.eval()
        for m in layers:
            assert estimate(m).item() / sigma(original(m)) > 0.9, (arch, m)
        with torch.no_grad():
            d.train()
            for _ in range(20):
                d(torch.randn(2, 3, 32, 32))
            d.eval()
            for m in layers:
                assert sigma(m.weight) == pytest.approx(1, abs=0.02), (arch, m)


def test_weight_reparametrisations_build_every_convolution_of_sngan():
    g, d = run("sngan", "weightnorm", "sws")
    for net, cls in ((g, WeightNormConv), (d, NORMS.get("sws").obj)):
        convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
        assert convs and all(isinstance(m, cls) for m in convs)
        assert not any(hasattr(m, "parametrizations") for m in net.modules())  # linears plain
    assert isinstance(g.blocks[0].preact, nn.ReLU)  # no per-channel layer before a conv


def test_norms_with_their_own_nonlinearity_replace_the_activation():
    g, d = run("dcgan", "evonorm_s0", "frn")
    assert not any(isinstance(m, nn.ReLU) for m in g.modules())
    assert not any(isinstance(m, nn.LeakyReLU) for m in d.modules())
    assert all(m.apply_act for m in d.modules() if isinstance(m, NORMS.get("frn").obj))
    g, _ = run("sngan", "frn", "none")
    assert not any(isinstance(m, nn.ReLU) for m in g.modules())


def test_skipinit_gates_the_sngan_blocks():
    torch.manual_seed(0)
    g, d = build_gan("sngan", "skipinit", "skipinit", **TINY["sngan"])
    blocks = [*g.blocks, *d.blocks]
    assert all(b.skip_gain.item() == 0 for b in blocks)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():  # each block starts as its shortcut
        assert torch.equal(g.blocks[0](x), g.blocks[0].shortcut(F.interpolate(x, scale_factor=2)))
    g_loss("hinge", d(g(torch.randn(2, 128)))).backward()
    assert all(b.skip_gain.grad is not None and b.skip_gain.grad != 0 for b in d.blocks)
    _, d_plain = build_gan("sngan", "none", "none", **TINY["sngan"])
    assert all(b.skip_gain is None for b in d_plain.blocks)


def test_initialisation():
    torch.manual_seed(0)
    g, d = build_gan("dcgan", "none", "none")
    weights = torch.cat([m.weight.flatten() for m in d.modules() if isinstance(m, nn.Conv2d)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(m.bias.abs().max() == 0 for m in g.modules() if isinstance(m, nn.Conv2d))
    g, d = build_gan("sngan", "none", "none", g_width=32, d_width=32)

    def xavier_bound(m, gain):
        fan_in, fan_out = m.weight[0].numel(), m.weight.shape[0] * m.weight[0, 0].numel()
        return gain * math.sqrt(6 / (fan_in + fan_out))

    b = g.blocks[1]
    for m, gain in ((b.conv2, math.sqrt(2)), (b.shortcut, 1.0), (g.to_rgb, 1.0), (d.head, 1.0)):
        bound = xavier_bound(m, gain)
        assert bound * 0.8 < m.weight.abs().max().item() <= bound
        assert m.bias.abs().max() == 0


def test_building_is_deterministic_under_the_seed():
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        g, d = build_gan("sngan", "groupnorm", "spectral_norm", **TINY["sngan"])
        z = torch.randn(2, 128)
        with torch.no_grad():
            outputs.append((g.state_dict(), d.state_dict(), d(g(z))))
    (g1, d1, y1), (g2, d2, y2) = outputs
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and all(torch.equal(d1[k], d2[k]) for k in d1)
    assert torch.equal(y1, y2)


# --- Refusals ------------------------------------------------------------------------------------


def test_unhostable_norms_are_refused_before_anything_is_built(monkeypatch):
    def build(*args, **kwargs):
        raise AssertionError("a network was built")

    monkeypatch.setattr(gan_models, "DCGANGenerator", build)
    monkeypatch.setattr(gan_models, "SNGANDiscriminator", build)
    message = (
        r"norm 'skipinit' cannot be used in the discriminator of GAN 'dcgan': it gates residual "
        r"branches .* GAN architectures that can host it: sngan\."
    )
    with pytest.raises(NormbenchError, match=message):
        build_gan("dcgan", "batchnorm", "skipinit")
    with pytest.raises(NormbenchError, match="'sws_gn' cannot be used in the discriminator of GAN"):
        build_gan("sngan", "none", "sws_gn")
    with pytest.raises(NormbenchError, match=r"pre-activation.*GAN architectures .*: dcgan\."):
        check_gan_supports("sngan", "convnorm", "none")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_gan_supports("dcgn", "none", "none"), "Unknown GAN architecture 'dcgn'. "
         "Did you mean 'dcgan'"),
        (lambda: check_gan_supports("stylegan", "none", "none"), r"Known: dcgan, sngan\."),
        (lambda: check_gan_supports("dcgan", "batchnrom", "none"), "Unknown norm 'batchnrom'"),
        (lambda: check_gan_supports("dcgan", "none", "groupnorm(grups=2)"), "has no option"),
        (lambda: check_gan_supports("dcgan", nn.BatchNorm2d, "none"), "registered norm name"),
        (lambda: build_gan("dcgan", "none", "none", widht=8), r"no option 'widht'.*width=64"),
        (lambda: build_gan("dcgan", "none", "none", width=0), "DCGAN width"),
        (lambda: build_gan("sngan", "none", "none", g_width=2.5), "SNGAN g_width"),
        (lambda: build_gan("dcgan", "none", "none", z_dim=0), "z_dim"),
        (lambda: d_loss("wgan", torch.zeros(1), torch.zeros(1)), "Unknown GAN loss 'wgan'"),
        (lambda: g_loss("vanilla", torch.zeros(1)), "known: hinge, nonsaturating"),
        (lambda: GeneratorEMA(nn.Linear(1, 1), decay=1.0), "decay"),
        (lambda: GeneratorEMA(nn.Linear(1, 1), start_step=-1), "start_step"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_a_message(call, message):
    with pytest.raises(NormbenchError, match=message):
        call()


def test_registry_and_options():
    assert GAN_MODELS.names() == ["dcgan", "sngan"]
    assert gan_models.gan_options("dcgan") == {"width": 64}
    assert gan_models.gan_options("sngan") == {"g_width": 256, "d_width": 128}
    assert all(entry.info.description for entry in GAN_MODELS)
    torch.manual_seed(0)
    g, _ = build_gan("dcgan", "none", "none", z_dim=16, width=2)
    assert g(torch.randn(2, 16)).shape == (2, 3, 32, 32)


# --- Training -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "g_norm", "d_norm", "loss"),
    [
        ("dcgan", "batchnorm", "spectral_norm", "hinge"),
        ("sngan", "batchnorm", "spectral_norm", "hinge"),
        ("sngan", "layernorm", "none", "nonsaturating"),
    ],
)
def test_one_optimisation_step_changes_both_networks(arch, g_norm, d_norm, loss):
    torch.manual_seed(0)
    g, d = build_gan(arch, g_norm, d_norm, **TINY[arch])
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    g_before = {k: v.clone() for k, v in g.state_dict().items()}
    d_before = {k: v.clone() for k, v in d.state_dict().items()}
    real = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fake = g(torch.randn(4, 128))
    real_logits, fake_logits = d(real), d(fake)
    loss_d = d_loss(loss, real_logits, fake_logits)
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    loss_g = g_loss(loss, d(g(torch.randn(4, 128))))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    assert math.isfinite(loss_d.item()) and math.isfinite(loss_g.item())
    # With every logit inside the hinge's margin (-1, 1), the head's bias gets -1 from the real
    # half of the loss and +1 from the fake half: no gradient, so it stays.
    logits = torch.cat([real_logits, fake_logits]).detach()
    margin = loss == "hinge" and bool((logits.abs() < 1).all())
    for net, before, still in ((g, g_before, []), (d, d_before, ["head.bias"] * margin)):
        unchanged = [n for n, p in net.named_parameters() if torch.equal(p, before[n])]
        assert unchanged == still
        assert all(torch.isfinite(v).all() for v in net.state_dict().values())


# --- Losses and the moving average ----------------------------------------------------------------


def test_losses_match_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = (0, 0.5, 2), relu(1 + fake) = (0, 1, 2.5)
    assert d_loss("hinge", real, fake).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert g_loss("hinge", fake).item() == pytest.approx(0.5 / 3)

    def log1p_exp(t):
        return math.log(1 + math.exp(t))

    d_ns = sum(log1p_exp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(log1p_exp(f) for f in fake) / 3
    assert d_loss("nonsaturating", real, fake).item() == pytest.approx(d_ns, rel=1e-6)
    g_ns = sum(-math.log(1 / (1 + math.exp(-f))) for f in (-2.0, 0.0, 1.5)) / 3
    assert g_loss("nonsaturating", fake).item() == pytest.approx(g_ns, rel=1e-6)
    # the generator's gradient: -1/N per logit for hinge
    logits = fake.clone().requires_grad_()
    g_loss("hinge", logits).backward()
    assert torch.allclose(logits.grad, torch.full((3,), -1 / 3))


def test_generator_ema_matches_a_hand_computation():
    g = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = GeneratorEMA(g, decay=0.9, start_step=2)
    assert not ema.module.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    values = []
    for step in (1, 2, 3):
        with torch.no_grad():
            for i, p in enumerate(g.parameters()):
                p.fill_(10.0 * step + i)
            g[1].running_mean.fill_(-step)
        g[1].num_batches_tracked += 1
        ema.update(step)
        values.append([p.clone() for p in ema.module.parameters()])
    for i, p in enumerate(ema.module.parameters()):
        first = 10.0 + i  # step 1 < start_step: copied
        assert torch.equal(values[0][i], torch.full_like(p, first))
        second = 0.9 * first + 0.1 * (20.0 + i)
        assert torch.allclose(values[1][i], torch.full_like(p, second))
        assert torch.allclose(p, torch.full_like(p, 0.9 * second + 0.1 * (30.0 + i)))
    # buffers are copied, not averaged
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), -3.0))
    assert ema.module[1].num_batches_tracked.item() == 3
    assert g[0].weight.requires_grad  # the source is untouched


def test_generator_ema_follows_gan_generators_with_stateful_norms():
    for arch, norm in (("sngan", "spectral_norm"), ("dcgan", "convnorm")):
        torch.manual_seed(0)
        g, _ = build_gan(arch, norm, "none", **TINY[arch])
        ema = GeneratorEMA(g, decay=0.5)
        g.train()(torch.randn(2, 128))  # power iteration / ConvNorm's running preconditioner
        ema.update(1)
        for (name, b), avg in zip(g.named_buffers(), ema.module.buffers(), strict=True):
            assert torch.equal(avg, b), name
        with torch.no_grad():
            images = ema.module(torch.randn(2, 128))
        assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
