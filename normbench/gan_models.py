"""GAN generators and discriminators for 32x32x3 images, built through the norm registry, with
their losses and the moving average of the generator's weights.

``build_gan(arch, g_norm, d_norm)`` builds a generator ``G(z) -> (N, 3, 32, 32)`` in [-1, 1]
(tanh) from ``z`` of shape (N, ``z_dim``) and a discriminator ``D(x) -> (N,)`` of logits, each
network with its own norm, given by registry name (options included: ``groupnorm(groups=8)``).
Every convolution followed by a norm is built by that network's block factory
(``normbench.models.conv_norm_factory``), so a norm that owns its convolution builds the pair
itself, and a norm with its own nonlinearity (FRN's TLU, the EvoNorms) replaces the activation
after it, as in the classifiers (see ``normbench.models``).

Where a norm goes (the rules are the same for G and D):

- a per-channel norm layer that precedes a convolution (the pre-activation ResNet blocks of
  ``sngan``, the linear layer's 4x4 output in ``dcgan``) is the factory's ``norm_layer``,
  followed by the activation (or built with its own);
- a convolution that the reference follows with no norm (G's last convolution to RGB, and in
  ``sngan`` the convolution before each residual addition and the 1x1 shortcuts) is a plain
  ``nn.Conv2d`` with bias;
- a norm that owns its convolution and only reparametrises its weight (capability ``weight``
  without ``affine`` or ``batch_stats``: ``weightnorm``, ``sws``, ``spectral_norm``) builds every
  convolution of its network, plain ones included, and the per-channel norm layers are left out
  (only their activation remains): it normalizes weights, not activations. A norm that owns its
  convolution and also normalizes the convolution's output (``sws_gn``, ``convnorm``) can only
  take the place of a conv-norm pair: ``dcgan`` hosts it (its convolutions to RGB stay plain, and
  no norm follows G's linear layer), the pre-activation ``sngan`` refuses it;
- with ``spectral_norm``, the network's linear layers are spectrally normalized too, as in SNGAN
  (Miyato et al. 2018) and StudioGAN's ``apply_g_sn``/``apply_d_sn``; with any other norm they are
  plain ``nn.Linear``;
- SkipInit gates the residual branches of ``sngan`` with a learnable scalar initialised to 0;
  ``dcgan`` has none and refuses it (it would train as ``none``).

``check_gan_supports(arch, g_norm, d_norm)`` makes these refusals without building anything, so
a suite plan can refuse a pair before any run starts.

``dcgan``: StudioGAN's DCGAN for CIFAR-10 (``deep_conv``). G: linear z -> 4x4x(8 width), then three
up-sampling blocks to 8, 16 and 32 pixels with 4, 2 and 1 width channels, then a 3x3 convolution
to RGB and tanh. D: three stages of a 3x3 conv-norm-LeakyReLU(0.1) and a strided one (64, 128 and
256 channels at width 64; 32 -> 16 -> 8 -> 4 pixels), a 3x3 conv-norm-LeakyReLU to 8 width
channels, global sum pooling and a linear head. Where it departs from StudioGAN:

- G's 4x4 stride-2 transposed convolutions are nearest-neighbour 2x up-sampling followed by a 3x3
  conv-norm-ReLU block from the factory, so that every registered norm, including those that own
  their convolution, builds G's blocks;
- G's linear output, seen as a 4x4 map, gets G's norm layer and a ReLU, as in Radford et al.'s
  DCGAN (StudioGAN feeds it to the first transposed convolution as it is); a norm that owns its
  convolution has no per-channel layer there, so only the ReLU follows;
- D's 4x4 stride-2 convolutions are 3x3 stride-2 ones: the factory pads by kernel // 2, which
  would make an even kernel's output 17x17;
- D's activation is LeakyReLU(0.1) (the slope of Miyato et al.'s standard CNN; StudioGAN's CIFAR
  configs use ReLU), and weights start from N(0, 0.02) with zero biases (Radford et al.;
  StudioGAN's CIFAR configs use orthogonal initialisation).

``sngan``: the SNGAN ResNet for CIFAR-10 (Miyato et al. 2018; StudioGAN's ``resnet`` at 32 px).
G (width 256): linear z -> 4x4xwidth, three up-sampling residual blocks (norm-ReLU-upsample-conv-
norm-ReLU-conv, shortcut: upsample then a 1x1 convolution), a final norm-ReLU, a 3x3 convolution
to RGB and tanh. D (width 128): an "optimized" first block (conv-norm-ReLU-conv-avgpool, shortcut:
avgpool then 1x1 conv), a pre-activation block that down-samples (avg pool after the branch and
after the 1x1 shortcut), two that do not (identity shortcuts), ReLU, global sum pooling and a
linear head. Where it departs from StudioGAN: D's shortcuts have no norm (StudioGAN puts the D
norm before the 1x1 shortcut convolution when it does not use spectral normalization; SNGAN has
no norm there), G's last norm is G's norm (StudioGAN always uses BatchNorm there), and weights
start Xavier-uniform with gain sqrt(2) in residual branches and 1 for shortcuts, the convolution
to RGB and linear layers, with zero biases (Miyato et al.'s code; StudioGAN's configs use
orthogonal initialisation).

In both, as in the classifiers, a convolution followed by a norm with a shift has no bias.
Building is deterministic under ``torch.manual_seed``. The losses (``d_loss``, ``g_loss``) are the
hinge loss and the non-saturating loss, written from their formulas; ``GeneratorEMA`` keeps the
exponential moving average of the generator's weights.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from normbench.errors import NormbenchError
from normbench.models import (
    CONV_BLOCKS,
    NORM_ACT,
    RESIDUAL_GATE,
    BlockFactory,
    conv_norm_factory,
    norm_act,
)
from normbench.norms import AFFINE, BATCH_STATS, NORMS, WEIGHT, norm_class
from normbench.norms.weight import SpectralNormConv, restart_power_iteration
from normbench.registry import Entry, Registry

#: The latent size of StudioGAN's CIFAR-10 models.
Z_DIM = 128
#: Side of the generated and discriminated images.
IMAGE_SIZE = 32
#: The adversarial losses ``d_loss`` and ``g_loss`` know.
GAN_LOSSES = ("hinge", "nonsaturating")

#: GAN capability: every convolution of the network can be a norm's own, so a norm that owns its
#: convolution and only reparametrises its weight builds all of them.
WEIGHT_CONVS = "weight_convs"


class _GanRegistry(Registry):
    """The registry of GAN architectures; an unknown name lists the known ones."""

    def get(self, name: str) -> Entry:
        if name in self:
            return super().get(name)
        closest = self.closest(name)
        hint = f"Did you mean {' or '.join(map(repr, closest))}? " if closest else ""
        raise NormbenchError(
            f"Unknown GAN architecture {name!r}. {hint}Known: {', '.join(self.names())}."
        )


GanBuilder = Callable[..., tuple[nn.Module, nn.Module]]
GAN_MODELS: _GanRegistry = _GanRegistry("GAN architecture")
register_gan = GAN_MODELS.register


# --- How one network builds its layers from its norm ----------------------------------------------


def _reparametrises_only(name: str) -> bool:
    """Whether norm ``name`` owns its convolution and normalizes only its weight, no activation."""
    info = NORMS.info(name)
    return info.has(WEIGHT) and not info.has(AFFINE) and not info.has(BATCH_STATS)


class _Layers:
    """The layers of one network with its norm: conv-norm-activation pairs from the block
    factory, the per-channel norm layers that precede a convolution, the convolutions that no norm
    follows and the linear layers (see the module docstring for the rules)."""

    def __init__(self, block: BlockFactory, name: str):
        self.block = block
        self.weight_convs = block.owns_conv and _reparametrises_only(name)
        cls = norm_class(name)
        self.spectral = isinstance(cls, type) and issubclass(cls, SpectralNormConv)
        self.skipinit = block.skipinit

    def conv_norm_act(
        self, in_channels: int, out_channels: int, stride: int, act: Callable[[], nn.Module]
    ) -> nn.Module:
        return self.block(in_channels, out_channels, 3, stride, act=act)

    def conv(self, in_channels: int, out_channels: int, kernel_size: int) -> nn.Module:
        """A convolution that no norm follows: the norm's own for a weight reparametrisation."""
        if self.weight_convs:
            return self.block(in_channels, out_channels, kernel_size, 1)
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def norm_act(self, num_channels: int, act: Callable[[], nn.Module]) -> nn.Module:
        """The norm layer on ``num_channels`` channels, then ``act`` (or the norm's own); the
        activation alone for a norm that owns its convolution (it has no per-channel layer)."""
        if self.block.owns_conv:
            return act()
        return norm_act(self.block, num_channels, act)

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        layer = nn.Linear(in_features, out_features)
        return spectral_norm(layer) if self.spectral else layer


def _kernel(module: nn.Module) -> torch.Tensor:
    """A layer's trainable weight: ``weight``, or the original of a parametrized one."""
    if hasattr(module, "parametrizations") and "weight" in module.parametrizations:
        return module.parametrizations.weight.original
    return module.weight


def _initialise(module: nn.Module, init: Callable[[torch.Tensor], Any]) -> None:
    """``init`` every convolution and linear kernel inside ``module``; zero their biases. Norm
    layers keep their own initialisation."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                init(_kernel(m))
                if m.bias is not None:
                    m.bias.zero_()


def _normal_002(weight: torch.Tensor) -> None:
    nn.init.normal_(weight, 0.0, 0.02)


def _xavier(gain: float) -> Callable[[torch.Tensor], Any]:
    return functools.partial(nn.init.xavier_uniform_, gain=gain)


def _upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="nearest")


def _positive_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NormbenchError(f"{what} must be a positive integer; got {value!r}")
    return value


# --- DCGAN (StudioGAN's deep_conv for CIFAR-10) ---------------------------------------------------

_LEAKY_RELU = functools.partial(nn.LeakyReLU, 0.1)


class DCGANGenerator(nn.Module):
    """z -> linear -> 4x4x(8 width) -> norm-ReLU -> 3 x (upsample, 3x3 conv-norm-ReLU) ->
    3x3 conv to RGB -> tanh."""

    def __init__(self, layers: _Layers, *, z_dim: int, width: int):
        super().__init__()
        channels = [8 * width, 4 * width, 2 * width, width]
        self.z_dim, self.bottom = z_dim, channels[0]
        self.linear = layers.linear(z_dim, channels[0] * 4 * 4)
        self.stem = layers.norm_act(channels[0], nn.ReLU)
        self.blocks = nn.Sequential(
            *(
                layers.conv_norm_act(c_in, c_out, 1, nn.ReLU)
                for c_in, c_out in zip(channels, channels[1:], strict=False)
            )
        )
        self.to_rgb = layers.conv(width, 3, 3)
        _initialise(self, _normal_002)
        restart_power_iteration(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.linear(z).view(-1, self.bottom, 4, 4))
        for block in self.blocks:
            x = block(_upsample(x))
        return torch.tanh(self.to_rgb(x))


class DCGANDiscriminator(nn.Module):
    """3 x (3x3 conv-norm-LReLU, 3x3 stride-2 conv-norm-LReLU) -> 3x3 conv-norm-LReLU ->
    global sum pooling -> linear."""

    def __init__(self, layers: _Layers, *, width: int):
        super().__init__()
        channels = [3, width, 2 * width, 4 * width]
        stages: list[nn.Module] = []
        for c_in, c_out in zip(channels, channels[1:], strict=False):
            stages.append(layers.conv_norm_act(c_in, c_out, 1, _LEAKY_RELU))
            stages.append(layers.conv_norm_act(c_out, c_out, 2, _LEAKY_RELU))
        self.features = nn.Sequential(*stages)
        self.final = layers.conv_norm_act(4 * width, 8 * width, 1, _LEAKY_RELU)
        self.head = layers.linear(8 * width, 1)
        _initialise(self, _normal_002)
        restart_power_iteration(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.final(self.features(x)).sum(dim=(2, 3))
        return self.head(h).squeeze(1)


@register_gan(
    "dcgan",
    description="StudioGAN's DCGAN for CIFAR-10 (z 128): G linear -> 4x4x512, upsample + 3x3 "
    "conv-norm-ReLU blocks to 256, 128, 64 channels, conv to RGB, tanh; D 3x3 conv-norm-"
    "LeakyReLU(0.1) stages of 64, 128, 256 channels (the second of each strided), conv to 512, "
    "sum pooling, linear; N(0, 0.02) init; model_args width (64: those channel counts).",
    family="dcgan",
    capabilities={CONV_BLOCKS, WEIGHT_CONVS, NORM_ACT},
)
def dcgan(
    *, g_block: _Layers, d_block: _Layers, z_dim: int = Z_DIM, width: int = 64
) -> tuple[nn.Module, nn.Module]:
    width = _positive_int(width, "DCGAN width (64 in StudioGAN)")
    return (
        DCGANGenerator(g_block, z_dim=z_dim, width=width),
        DCGANDiscriminator(d_block, width=width),
    )


# --- SNGAN ResNet (Miyato et al. 2018; StudioGAN's resnet at 32 px) -------------------------------

_RESIDUAL_GAIN = math.sqrt(2)  # Xavier gain of a residual branch's convolutions


class _Residual(nn.Module):
    """A residual block's gate: with SkipInit the branch is multiplied by ``skip_gain``, a
    learnable scalar initialised to 0, so the block starts as its shortcut."""

    def _gate(self, layers: _Layers) -> None:
        self.skip_gain = nn.Parameter(torch.zeros(())) if layers.skipinit else None

    def _gated(self, branch: torch.Tensor) -> torch.Tensor:
        return branch if self.skip_gain is None else self.skip_gain * branch


class SNGANGenBlock(_Residual):
    """norm-ReLU, upsample, 3x3 conv-norm-ReLU, 3x3 conv; plus the upsampled input through a 1x1
    convolution."""

    def __init__(self, layers: _Layers, in_channels: int, out_channels: int):
        super().__init__()
        self.preact = layers.norm_act(in_channels, nn.ReLU)
        self.conv1 = layers.conv_norm_act(in_channels, out_channels, 1, nn.ReLU)
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        self.shortcut = layers.conv(in_channels, out_channels, 1)
        self._gate(layers)
        _initialise(self.conv1, _xavier(_RESIDUAL_GAIN))
        _initialise(self.conv2, _xavier(_RESIDUAL_GAIN))
        _initialise(self.shortcut, _xavier(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(self.conv1(_upsample(self.preact(x))))
        return self._gated(branch) + self.shortcut(_upsample(x))


class SNGANDiscOptBlock(_Residual):
    """The first block ("optimized": no pre-activation on the image): 3x3 conv-norm-ReLU, 3x3
    conv, 2x2 average pool; plus the average-pooled input through a 1x1 convolution."""

    def __init__(self, layers: _Layers, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = layers.conv_norm_act(in_channels, out_channels, 1, nn.ReLU)
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        self.shortcut = layers.conv(in_channels, out_channels, 1)
        self._gate(layers)
        _initialise(self.conv1, _xavier(_RESIDUAL_GAIN))
        _initialise(self.conv2, _xavier(_RESIDUAL_GAIN))
        _initialise(self.shortcut, _xavier(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = F.avg_pool2d(self.conv2(self.conv1(x)), 2)
        return self._gated(branch) + self.shortcut(F.avg_pool2d(x, 2))


class SNGANDiscBlock(_Residual):
    """norm-ReLU, 3x3 conv-norm-ReLU, 3x3 conv (then a 2x2 average pool when down-sampling);
    the shortcut is a 1x1 convolution (then the pool) where the shape changes, else the input."""

    def __init__(self, layers: _Layers, in_channels: int, out_channels: int, downsample: bool):
        super().__init__()
        self.downsample = downsample
        self.preact = layers.norm_act(in_channels, nn.ReLU)
        self.conv1 = layers.conv_norm_act(in_channels, out_channels, 1, nn.ReLU)
        self.conv2 = layers.conv(out_channels, out_channels, 3)
        reshape = downsample or in_channels != out_channels
        self.shortcut = layers.conv(in_channels, out_channels, 1) if reshape else None
        self._gate(layers)
        _initialise(self.conv1, _xavier(_RESIDUAL_GAIN))
        _initialise(self.conv2, _xavier(_RESIDUAL_GAIN))
        if self.shortcut is not None:
            _initialise(self.shortcut, _xavier(1.0))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self._pool(self.conv2(self.conv1(self.preact(x))))
        shortcut = x if self.shortcut is None else self._pool(self.shortcut(x))
        return self._gated(branch) + shortcut


class SNGANGenerator(nn.Module):
    """z -> linear -> 4x4xwidth -> 3 up-sampling residual blocks -> norm-ReLU -> 3x3 conv to RGB
    -> tanh."""

    def __init__(self, layers: _Layers, *, z_dim: int, width: int):
        super().__init__()
        self.z_dim, self.width = z_dim, width
        self.linear = layers.linear(z_dim, width * 4 * 4)
        self.blocks = nn.Sequential(*(SNGANGenBlock(layers, width, width) for _ in range(3)))
        self.final = layers.norm_act(width, nn.ReLU)
        self.to_rgb = layers.conv(width, 3, 3)
        _initialise(self.linear, _xavier(1.0))
        _initialise(self.to_rgb, _xavier(1.0))
        restart_power_iteration(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.linear(z).view(-1, self.width, 4, 4))
        return torch.tanh(self.to_rgb(self.final(x)))


class SNGANDiscriminator(nn.Module):
    """Optimized block (3 -> width, 32 -> 16 px), a down-sampling block (16 -> 8 px), two more
    blocks at 8 px, ReLU, global sum pooling, linear."""

    def __init__(self, layers: _Layers, *, width: int):
        super().__init__()
        self.blocks = nn.Sequential(
            SNGANDiscOptBlock(layers, 3, width),
            SNGANDiscBlock(layers, width, width, downsample=True),
            SNGANDiscBlock(layers, width, width, downsample=False),
            SNGANDiscBlock(layers, width, width, downsample=False),
        )
        self.head = layers.linear(width, 1)
        _initialise(self.head, _xavier(1.0))
        restart_power_iteration(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.head(h).squeeze(1)


@register_gan(
    "sngan",
    description="SNGAN ResNet for CIFAR-10 (Miyato et al. 2018; StudioGAN's resnet at 32 px, z "
    "128): G 3 up-sampling pre-activation residual blocks of 256 channels, norm-ReLU, conv to "
    "RGB, tanh; D 4 residual blocks of 128 channels (the first optimized, the first two "
    "down-sampling), ReLU, sum pooling, linear; Xavier init; model_args g_width (256), d_width "
    "(128).",
    family="sngan",
    capabilities={WEIGHT_CONVS, RESIDUAL_GATE, NORM_ACT},
)
def sngan(
    *,
    g_block: _Layers,
    d_block: _Layers,
    z_dim: int = Z_DIM,
    g_width: int = 256,
    d_width: int = 128,
) -> tuple[nn.Module, nn.Module]:
    g_width = _positive_int(g_width, "SNGAN g_width (256 in the paper)")
    d_width = _positive_int(d_width, "SNGAN d_width (128 in the paper)")
    return (
        SNGANGenerator(g_block, z_dim=z_dim, width=g_width),
        SNGANDiscriminator(d_block, width=d_width),
    )


# --- Which norms a GAN hosts, and building one ----------------------------------------------------

_NEEDS = {
    CONV_BLOCKS: "owns its convolution and normalizes that convolution's output, but GAN {arch!r} "
    "puts its norm layers before their convolutions (pre-activation); only norms that own their "
    "convolution and reparametrise its weight alone (such as weightnorm, sws, spectral_norm) "
    "fit there",
    WEIGHT_CONVS: "reparametrises the weight of every convolution, but GAN {arch!r} has "
    "convolutions that a norm cannot build",
    RESIDUAL_GATE: "gates residual branches (SkipInit), but GAN {arch!r} has no residual "
    "branches, so it would train as 'none'",
    NORM_ACT: "applies its own nonlinearity, but GAN {arch!r} applies its own activation after "
    "every norm, so both would run",
}


def _requirements(block: BlockFactory, name: str) -> frozenset[str]:
    """The GAN capabilities norm ``name`` needs to act as itself in a network."""
    needs = set(block.requires)
    if block.owns_conv and _reparametrises_only(name):
        needs = (needs - {CONV_BLOCKS}) | {WEIGHT_CONVS}
    return frozenset(needs)


def _factory(norm: object, role: str) -> BlockFactory:
    if not isinstance(norm, str):
        raise NormbenchError(
            f"the {role}'s norm must be a registered norm name such as 'batchnorm' or "
            f"'groupnorm(groups=8)'; got {norm!r}"
        )
    try:
        return conv_norm_factory(norm)
    except TypeError as err:  # options the norm's block() refuses
        raise NormbenchError(f"the {role}'s norm {norm!r} cannot build blocks: {err}") from None


def check_gan_supports(arch: str, g_norm: str, d_norm: str) -> None:
    """Raise ``NormbenchError`` when GAN ``arch`` cannot host ``g_norm`` in its generator or
    ``d_norm`` in its discriminator as those norms (unknown names included), building nothing."""
    info = GAN_MODELS.get(arch).info
    for role, norm in (("generator", g_norm), ("discriminator", d_norm)):
        block = _factory(norm, role)
        missing = sorted(_requirements(block, norm) - info.capabilities)
        if missing:
            needs = _requirements(block, norm)
            hosts = [e.info.name for e in GAN_MODELS if needs <= e.info.capabilities]
            reasons = "; ".join(_NEEDS[c].format(arch=arch) for c in missing)
            raise NormbenchError(
                f"norm {norm!r} cannot be used in the {role} of GAN {arch!r}: it {reasons}. "
                f"GAN architectures that can host it: {', '.join(hosts) or 'none'}."
            )


def gan_options(arch: str) -> dict[str, Any]:
    """The options (``model_args``) of GAN ``arch`` with their defaults, ``z_dim`` left out."""
    parameters = inspect.signature(GAN_MODELS.get(arch).obj).parameters.values()
    skip = {"g_block", "d_block", "z_dim"}
    return {p.name: p.default for p in parameters if p.name not in skip}


def build_gan(
    arch: str, g_norm: str, d_norm: str, *, z_dim: int = Z_DIM, **options: Any
) -> tuple[nn.Module, nn.Module]:
    """The generator and the discriminator of GAN ``arch`` with norms ``g_norm`` and ``d_norm``
    (registry names, options allowed), for 32x32x3 images and latents of size ``z_dim``.
    ``options`` are the architecture's ``model_args`` (``gan_options``). With ``spectral_norm``
    a network's linear layers are spectrally normalized too, as in SNGAN. A norm the architecture
    cannot host is refused before anything is built."""
    check_gan_supports(arch, g_norm, d_norm)
    z_dim = _positive_int(z_dim, "z_dim")
    known = gan_options(arch)
    unknown = sorted(set(options) - set(known))
    if unknown:
        offered = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise NormbenchError(
            f"GAN {arch!r} has no option {', '.join(map(repr, unknown))}; its options (with "
            f"defaults): {offered}."
        )
    g_layers = _Layers(conv_norm_factory(g_norm), g_norm)
    d_layers = _Layers(conv_norm_factory(d_norm), d_norm)
    return GAN_MODELS.get(arch).obj(g_block=g_layers, d_block=d_layers, z_dim=z_dim, **options)


# --- Losses ---------------------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in GAN_LOSSES:
        raise NormbenchError(f"Unknown GAN loss {kind!r}; known: {', '.join(GAN_LOSSES)}.")


def d_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on its logits for real and for generated images (batch means):

    - hinge (Lim & Ye 2017; Miyato et al. 2018): mean(relu(1 - real)) + mean(relu(1 + fake));
    - nonsaturating (Goodfellow et al. 2014), binary cross-entropy with real = 1, fake = 0:
      mean(softplus(-real)) + mean(softplus(fake)), softplus(-t) = -log sigmoid(t).
    """
    _check_kind(kind)
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss on the discriminator's logits for generated images: -mean(fake) for
    hinge, mean(softplus(-fake)) = -mean(log sigmoid(fake)) for nonsaturating."""
    _check_kind(kind)
    if kind == "hinge":
        return -fake_logits.mean()
    return F.softplus(-fake_logits).mean()


# --- The generator's moving average ---------------------------------------------------------------


class GeneratorEMA:
    """The exponential moving average of a generator's weights, as StudioGAN's ``apply_g_ema``.

    ``module`` is a copy of the generator, in eval mode and without gradients. ``update(step)``,
    called after each generator step, sets each parameter of the copy to
    ``decay * average + (1 - decay) * current`` (to the current value before ``start_step``) and
    copies every buffer (BatchNorm's running statistics, spectral norm's u and v): an average of
    running statistics would describe no network's activations.
    """

    def __init__(self, generator: nn.Module, decay: float = 0.999, start_step: int = 0) -> None:
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay < 1:
            raise NormbenchError(f"EMA decay must be in [0, 1); got {decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise NormbenchError(f"EMA start_step must be an integer >= 0; got {start_step!r}")
        self.source, self.decay, self.start_step = generator, float(decay), start_step
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> None:
        averaged = dict(self.module.named_parameters())
        for name, p in self.source.named_parameters():
            if step < self.start_step:
                averaged[name].copy_(p)
            else:
                averaged[name].mul_(self.decay).add_(p, alpha=1 - self.decay)
        copies = dict(self.module.named_buffers())
        for name, b in self.source.named_buffers():
            if copies[name].shape == b.shape:
                copies[name].copy_(b)
            else:  # a buffer whose shape follows the input (ConvNorm's running preconditioner)
                owner, _, leaf = name.rpartition(".")
                setattr(self.module.get_submodule(owner), leaf, b.detach().clone())
